"""Stacked hourglass networks (Newell et al. 2016) and the multi-branch form OKDHP trains.

``StackedHourglass``: a stride-4 stem, then ``stacks`` hourglasses, each predicting heatmaps that
are fed back into the next stack (intermediate supervision). ``forward`` returns the last stack's
heatmaps (B, J, H/4, W/4); ``forward_all`` every stack's.

``MultiBranchHourglass``: the stem and the first ``shared_stacks`` are shared, then each of the
branches has its own stacks (``branch_stacks``, one depth per branch: equal depths are balanced
OKDHP, different depths the unbalanced variant). ``branch(b)`` is branch ``b`` alone as a plain
``StackedHourglass`` sharing the trained modules: the network that gets deployed.

These are heatmap regressors, not classifiers, so they are not in the classifier zoo's registry.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Residual(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1, plus the (projected) input."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = max(cout // 2, 1)
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, mid, 1),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, mid, 3, padding=1),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, cout, 1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.skip(x)


class Hourglass(nn.Module):
    """Pool ``depth`` times, then upsample back, adding a same-resolution skip at every level."""

    def __init__(self, ch: int, depth: int):
        super().__init__()
        self.up = Residual(ch, ch)
        self.down = Residual(ch, ch)
        self.inner = Hourglass(ch, depth - 1) if depth > 1 else Residual(ch, ch)
        self.out = Residual(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        low = self.out(self.inner(self.down(F.max_pool2d(x, 2))))
        return self.up(x) + F.interpolate(low, scale_factor=2.0, mode="nearest")


class Stem(nn.Module):
    """7x7 stride-2 conv, a residual, 2x2 max-pool, two residuals: features at stride 4."""

    def __init__(self, width: int, in_ch: int = 3):
        super().__init__()
        half = max(width // 2, 1)
        self.conv = nn.Sequential(nn.Conv2d(in_ch, half, 7, stride=2, padding=3), nn.BatchNorm2d(half),
                                  nn.ReLU(inplace=True))
        self.res1 = Residual(half, width)
        self.res2 = nn.Sequential(Residual(width, width), Residual(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(F.max_pool2d(self.res1(self.conv(x)), 2))


class Stack(nn.Module):
    """One hourglass with its heatmap head; ``merge`` feeds features and heatmaps to a next stack."""

    def __init__(self, width: int, num_joints: int, depth: int, merge: bool):
        super().__init__()
        self.hg = Hourglass(width, depth)
        self.res = Residual(width, width)
        self.fc = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.score = nn.Conv2d(width, num_joints, 1)
        self.merge_feat = nn.Conv2d(width, width, 1) if merge else None
        self.merge_heat = nn.Conv2d(num_joints, width, 1) if merge else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.fc(self.res(self.hg(x)))
        heat = self.score(y)
        if self.merge_feat is not None:
            x = x + self.merge_feat(y) + self.merge_heat(heat)
        return x, heat


def _depth(size: int, depth: int | None) -> int:
    """Default hourglass depth: pool down to 2x2 (4 at 64x64 heatmaps, 3 at 16x16), at least 1."""
    if depth is not None:
        return depth
    d = 0
    while size % 2 == 0 and size > 2 and d < 4:
        size //= 2
        d += 1
    return max(d, 1)


class StackedHourglass(nn.Module):
    def __init__(self, num_joints: int = 17, width: int = 32, stacks: int = 2, in_shape=(3, 64, 64),
                 depth: int | None = None, *, _modules: tuple[nn.Module, Sequence[nn.Module]] | None = None):
        super().__init__()
        self.num_joints, self.in_shape, self.width = num_joints, tuple(in_shape), width
        if _modules is not None:  # a view of a multi-branch net's branch: the same module objects
            self.stem, stacks_ = _modules
            self.stacks = nn.ModuleList(stacks_)
            return
        if stacks < 1:
            raise ValueError(f"stacks must be >= 1, got {stacks}")
        d = _depth(in_shape[-1] // 4, depth)
        self.stem = Stem(width, in_shape[0])
        self.stacks = nn.ModuleList(Stack(width, num_joints, d, merge=i < stacks - 1) for i in range(stacks))

    def forward_all(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        heats = []
        for s in self.stacks:
            x, h = s(x)
            heats.append(h)
        return heats

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_all(x)[-1]


class FeatureAggregation(nn.Module):
    """OKDHP's Feature Aggregation Unit: per-branch, per-joint ensemble weights from the shared feature.

    Parallel 3x3, 5x5, 7x7 convolutions and a 3x3 max-pool path see the shared feature at several
    receptive fields; their sum is pooled to a vector, squeezed by a linear layer, and one linear
    head per branch scores every joint; a softmax across branches turns the scores into weights.
    """

    def __init__(self, width: int, num_branches: int, num_joints: int, channels: int | None = None,
                 hidden: int = 64):
        super().__init__()
        c = channels or width
        self.paths = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, c, k, padding=k // 2), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
            for k in (3, 5, 7))
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(width, c, 1), nn.BatchNorm2d(c),
                                  nn.ReLU(inplace=True))
        self.squeeze = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(hidden, num_joints) for _ in range(num_branches))

    def forward(self, feat: Tensor) -> Tensor:
        """(B, C, h, w) -> weights (B, branches, joints), summing to one across branches."""
        u = self.pool(feat)
        for p in self.paths:
            u = u + p(feat)
        z = self.squeeze(u.mean(dim=(2, 3)))
        return torch.softmax(torch.stack([h(z) for h in self.heads], dim=1), dim=1)


class MultiBranchHourglass(nn.Module):
    def __init__(self, num_joints: int = 17, width: int = 32, shared_stacks: int = 1,
                 branch_stacks: Sequence[int] = (1, 1, 1), in_shape=(3, 64, 64), depth: int | None = None,
                 ensemble: str = "fau", fau_channels: int | None = None):
        super().__init__()
        if shared_stacks < 0 or len(branch_stacks) < 2 or min(branch_stacks) < 1:
            raise ValueError(f"need shared_stacks >= 0 and >= 2 branches of >= 1 stack, got {shared_stacks}, "
                             f"{list(branch_stacks)}")
        if ensemble not in ("fau", "mean"):
            raise ValueError(f"ensemble must be 'fau' or 'mean', got {ensemble!r}")
        self.num_joints, self.in_shape, self.width = num_joints, tuple(in_shape), width
        self.branch_stacks, self.ensemble = list(branch_stacks), ensemble
        d = _depth(in_shape[-1] // 4, depth)
        self.stem = Stem(width, in_shape[0])
        self.shared = nn.ModuleList(Stack(width, num_joints, d, merge=True) for _ in range(shared_stacks))
        self.branches = nn.ModuleList(
            nn.ModuleList(Stack(width, num_joints, d, merge=i < n - 1) for i in range(n)) for n in branch_stacks)
        self.fau = (FeatureAggregation(width, len(branch_stacks), num_joints, fau_channels)
                    if ensemble == "fau" else None)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def forward_all(self, x: Tensor) -> tuple[list[Tensor], list[list[Tensor]], Tensor, Tensor]:
        """Shared stacks' heatmaps, each branch's heatmaps (every stack), the ensemble, and its weights."""
        x = self.stem(x)
        shared = []
        for s in self.shared:
            x, h = s(x)
            shared.append(h)
        outs = []
        for branch in self.branches:
            y, heats = x, []
            for s in branch:
                y, h = s(y)
                heats.append(h)
            outs.append(heats)
        finals = torch.stack([o[-1] for o in outs], dim=1)  # (B, branches, J, h, w)
        if self.fau is not None:
            w = self.fau(x)
        else:
            w = finals.new_full(finals.shape[:3], 1.0 / self.num_branches)
        ensemble = (finals * w[..., None, None]).sum(dim=1)
        return shared, outs, ensemble, w

    def forward(self, x: Tensor) -> Tensor:
        """The ensemble heatmaps."""
        return self.forward_all(x)[2]

    def branch(self, b: int) -> StackedHourglass:
        """Branch ``b`` alone (stem, shared stacks, its own stacks) as a plain network for deployment."""
        if not 0 <= b < self.num_branches:
            raise ValueError(f"branch must be in [0, {self.num_branches}), got {b}")
        return StackedHourglass(self.num_joints, self.width, in_shape=self.in_shape,
                                _modules=(self.stem, [*self.shared, *self.branches[b]]))
