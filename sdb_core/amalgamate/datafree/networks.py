"""The data-free recipe's networks and how each is shaped after the teachers.

Feature filters, the group-stack generator (:func:`build_generator`) and the dual generator,
the student, block by block (:func:`build_student`) and regrouped into branches (:func:`regroup`).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdb_core.train import device_of

from .config import DataFreeConfig, TeacherSpec, label_plan, label_union


def _entry_shapes(teacher: nn.Module, in_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Input shape of every block of ``teacher`` (entry 0 is the image), from one zero batch."""
    device = device_of(teacher)
    with torch.no_grad():
        feats = teacher.features(torch.zeros(1, *in_shape, device=device))
    return [tuple(in_shape)] + [tuple(f.shape[1:]) for f in feats[:-1]]


def _output_shapes(net: nn.Module, in_shape: Sequence[int]) -> list[tuple[int, ...]]:
    device = device_of(net)
    with torch.no_grad():
        return [tuple(f.shape[1:]) for f in net.features(torch.zeros(1, *in_shape, device=device))]


class FeatureFilter(nn.Module):
    """Global pooling + two FC layers → a per-sample channel gate in the target feature space.

    A 1×1 projection first when the channel counts differ (another teacher's, or the
    narrower student's). The gate is 2·sigmoid with a zero-initialised last layer, so a
    new filter starts as the identity (or the plain projection) instead of halving
    every feature.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(8, c_out // 2)
        self.proj = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)
        self.fc1 = nn.Linear(c_in, hidden)
        self.fc2 = nn.Linear(hidden, c_out)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor) -> Tensor:
        gate = 2.0 * torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean(dim=(2, 3))))))
        return self.proj(h) * gate[:, :, None, None]


class GroupStackGenerator(nn.Module):
    """B blocks from noise to image; ``forward(z)`` returns every block's output, shallowest first.

    ``shapes[j]`` is the output shape of block j+1: the input shape of a teacher's last j+1
    blocks, so ``shapes[-1]`` is the image shape. Feature stages end in BN + LeakyReLU, the
    image stage in a sigmoid (pixels in [0, 1], like the teachers' inputs).
    """

    def __init__(self, latent: int, shapes: Sequence[Sequence[int]], n_labels: int = 0, label_rate: float = 0.0):
        super().__init__()
        if len(shapes) < 2:
            raise ValueError("a group stack needs at least 2 blocks (a feature stage and the image)")
        if n_labels and not 0.0 < label_rate < 1.0:
            raise ValueError(f"a label-conditioned generator needs label_rate in (0, 1), got {label_rate}")
        self.latent, self.shapes = latent, [tuple(s) for s in shapes]
        self.n_labels, self.label_rate = int(n_labels), float(label_rate)
        c0, h0, w0 = self.shapes[0]
        self.fc = nn.Linear(latent + self.n_labels, c0 * h0 * w0)
        blocks = [nn.Sequential(nn.BatchNorm2d(c0), nn.LeakyReLU(0.2), nn.Conv2d(c0, c0, 3, padding=1, bias=False),
                                nn.BatchNorm2d(c0), nn.LeakyReLU(0.2))]
        for (c_prev, _, _), (c, h, w) in zip(self.shapes[:-2], self.shapes[1:-1]):
            blocks.append(nn.Sequential(nn.Upsample(size=(h, w), mode="nearest"),
                                        nn.Conv2d(c_prev, c, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(c), nn.LeakyReLU(0.2)))
        c_prev = self.shapes[-2][0]
        c_img, h, w = self.shapes[-1]
        mid = max(c_prev // 2, 8)
        blocks.append(nn.Sequential(nn.Upsample(size=(h, w), mode="nearest"),
                                    nn.Conv2d(c_prev, mid, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(mid), nn.LeakyReLU(0.2),
                                    nn.Conv2d(mid, c_img, 3, padding=1), nn.Sigmoid()))
        self.blocks = nn.ModuleList(blocks)

    def draw(self, n: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor | None]:
        """Noise for ``n`` images and, for a label-conditioned generator, their multi-hot targets, on
        ``device`` (default: the generator's own)."""
        device = device_of(self) if device is None else device
        z = torch.randn(n, self.latent, device=device)
        if not self.n_labels:
            return z, None
        y = (torch.rand(n, self.n_labels, device=device) < self.label_rate).float()
        # at least one label per image, as in a composite that is never blank (a label drawn for every image and
        # kept where it has none: counting those first would read a number back from the device at every draw)
        empty = y.sum(1, keepdim=True) == 0
        one = F.one_hot(torch.randint(0, self.n_labels, (n,), device=device), self.n_labels).to(y.dtype)
        return z, torch.where(empty, one, y)

    def forward(self, z: Tensor, stages: int | None = None, y: Tensor | None = None) -> list[Tensor]:
        c0, h0, w0 = self.shapes[0]
        if self.n_labels:
            if y is None:
                raise ValueError("this generator is label-conditioned: pass y (see draw)")
            z = torch.cat([z, y], 1)
        h = self.fc(z).view(len(z), c0, h0, w0)
        outs = []
        for blk in self.blocks[: stages or len(self.blocks)]:
            h = blk(h)
            outs.append(h)
        return outs

    def sample(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``n`` images (eval mode, no grad), on ``device`` (default: the generator's own)."""
        was = self.training
        self.eval()
        with torch.no_grad():
            z, y = self.draw(n, device)
            x = self(z, y=y)[-1]
        self.train(was)
        return x


class Branch(nn.Module):
    """One teacher's part of the regrouped student: filter, that teacher's head, its target labels."""

    def __init__(self, filt: nn.Module, head: nn.Module, index: Sequence[int]):
        super().__init__()
        self.filter, self.head = filt, head
        self.register_buffer("index", torch.as_tensor(list(index), dtype=torch.long))

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.filter(h)).index_select(1, self.index)


class MultiBranchStudent(nn.Module):
    """Shared student blocks, then one branch per teacher; logits of the target labels in order."""

    def __init__(self, blocks: nn.ModuleList, branches: Sequence[Branch], order: Sequence[int], labels: Sequence[int]):
        super().__init__()
        self.blocks, self.branches = blocks, nn.ModuleList(branches)
        self.labels = [int(v) for v in labels]
        self.register_buffer("order", torch.as_tensor(list(order), dtype=torch.long))

    def trunk(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return torch.cat([b(h) for b in self.branches], dim=1).index_select(1, self.order)


def build_generator(cfg: DataFreeConfig,
                    teachers: Sequence[TeacherSpec]) -> tuple[GroupStackGenerator, nn.ModuleList]:
    """The generator shaped after the first teacher, and filters[j][m] for every feature stage j and teacher m."""
    entries = [_entry_shapes(t.model, cfg.in_shape) for t in teachers]
    depth = {len(e) for e in entries}
    if len(depth) != 1:
        raise ValueError(f"teachers must have the same number of blocks, got {sorted(depth)}")
    n_blocks = depth.pop()
    for e in entries[1:]:
        if [s[1:] for s in e] != [s[1:] for s in entries[0]]:
            raise ValueError("teachers' feature maps must have the same spatial sizes block by block")
    # Stage j (1-based) enters the teachers at block n_blocks - j; the last stage is the image.
    shapes = [entries[0][n_blocks - j] for j in range(1, n_blocks + 1)]
    n_labels = len(label_union(teachers)[0]) if cfg.label_rate > 0 else 0
    gen = GroupStackGenerator(cfg.latent, shapes, n_labels, cfg.label_rate)
    filters = nn.ModuleList(
        nn.ModuleList(FeatureFilter(shapes[j][0], entries[m][n_blocks - 1 - j][0]) for m in range(len(teachers)))
        for j in range(n_blocks - 1))
    return gen, filters


def build_student(cfg: DataFreeConfig, teachers: Sequence[TeacherSpec]
                  ) -> tuple[nn.ModuleList, nn.ModuleList, list[list[int]], list[int]]:
    """Student blocks (a MultiLabelNet's), filters[b][m] from student block b into teacher m's block b output."""
    from sdb_core.amalgamate.multilabel import MultiLabelNet

    seed_net = MultiLabelNet(cfg.in_shape[0], len(cfg.target), widths=cfg.student_widths)
    blocks = seed_net.blocks
    depth = len(teachers[0].model.blocks)
    if len(blocks) != depth:
        raise ValueError(f"the student needs as many blocks as the teachers ({depth}), "
                         f"got student_widths={cfg.student_widths}")
    s_shapes = _output_shapes(seed_net, cfg.in_shape)
    t_shapes = [_output_shapes(t.model, cfg.in_shape) for t in teachers]
    for m, ts in enumerate(t_shapes):
        if [s[1:] for s in ts] != [s[1:] for s in s_shapes]:
            raise ValueError(f"student and teacher {m} feature maps differ in size: {s_shapes} vs {ts}")
    filters = nn.ModuleList(nn.ModuleList(FeatureFilter(s_shapes[b][0], t_shapes[m][b][0]) for m in range(len(teachers)))
                            for b in range(len(blocks)))
    cols, order = label_plan(teachers, cfg.target)
    return blocks, filters, cols, order


def regroup(blocks: nn.ModuleList, filters: nn.ModuleList, teachers: Sequence[TeacherSpec],
            cols: list[list[int]], order: list[int], target: Sequence[int]) -> MultiBranchStudent:
    """One multi-branch network: the blocks, then per contributing teacher its last filter and a copy of its head;
    all of it on the blocks' device (the teachers may live elsewhere: ``new_student`` builds on the CPU)."""
    branches = []
    for m, idx in enumerate(cols):
        if idx:
            head = copy.deepcopy(teachers[m].model.head)
            for p in head.parameters():
                p.requires_grad_(True)
            branches.append(Branch(filters[-1][m], head, idx))
    return MultiBranchStudent(blocks, branches, order, target).to(device_of(blocks))


def new_student(cfg: DataFreeConfig, teachers: Sequence[TeacherSpec]) -> MultiBranchStudent:
    """The student architecture before any training (the baselines' starting point)."""
    blocks, filters, cols, order = build_student(cfg, teachers)
    return regroup(blocks, filters, teachers, cols, order, cfg.target)
