"""The multi-label network family that amalgamation teachers and students share, and its metric.

``MultiLabelNet`` is a stack of conv stages (``blocks``) and a head (global max pool + linear,
one logit per label; a sigmoid gives each label's probability). Stages are exposed one by
one because the amalgamation recipes work block by block: ``features(x)`` returns every
stage's output, ``forward_from(h, start)`` runs the rest of the network on a stage input,
which is how a student's features are projected through a teacher.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from sdb_core.progress import Progress
from sdb_core.train import History, TrainConfig, fit, predict_logits


def conv_stage(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """conv3x3 - BN - ReLU - maxpool2: one block of the family."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )


class MultiLabelHead(nn.Module):
    """Global max pool + linear: a label is present if its pattern fires anywhere in the image."""

    def __init__(self, channels: int, num_labels: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_labels)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(torch.amax(h, dim=(2, 3)))


class MultiLabelNet(nn.Module):
    """conv stages of ``widths`` channels, each halving the grid (the first also strides by ``stem_stride``).

    With the default ``stem_stride=2`` a 56x56 composite goes 14 -> 7 -> 3: a 28 px digit is
    7x7 after the first stage, enough to tell digits apart and four times cheaper on a CPU
    than keeping full resolution.
    """

    def __init__(self, in_channels: int, num_labels: int, widths: Sequence[int] = (32, 64, 128), *,
                 stem_stride: int = 2):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {list(widths)}")
        if in_channels < 1 or num_labels < 1:
            raise ValueError(f"in_channels and num_labels must be >= 1, got {in_channels}, {num_labels}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.in_channels, self.num_labels, self.widths = in_channels, num_labels, tuple(widths)
        self.stem_stride = stem_stride
        chans = [in_channels, *widths]
        self.blocks = nn.ModuleList(
            conv_stage(chans[i], chans[i + 1], stem_stride if i == 0 else 1) for i in range(len(widths)))
        self.head = MultiLabelHead(widths[-1], num_labels)

    def features(self, x: Tensor) -> list[Tensor]:
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward_from(self, h: Tensor, start: int) -> Tensor:
        for block in self.blocks[start:]:
            h = block(h)
        return self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from(x, 0)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one label: precision averaged over the recall steps, ties counted as one threshold.

    The same definition as scikit-learn's ``average_precision_score`` (no interpolation).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(targets) > 0.5
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # The last index of each run of equal scores: one threshold per distinct score.
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last]
    if tps[-1] == 0:
        return float("nan")
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_label_ap(scores, targets) -> np.ndarray:
    """AP in percent for every column; NaN for a label with no positive."""
    s, y = np.asarray(scores), np.asarray(targets)
    if s.shape != y.shape or s.ndim != 2:
        raise ValueError(f"scores and targets must both be (N, L), got {s.shape} and {y.shape}")
    return 100.0 * np.array([average_precision(s[:, j], y[:, j]) for j in range(s.shape[1])])


def mean_average_precision(scores, targets) -> float:
    """mAP in percent: the mean over labels that have at least one positive."""
    ap = per_label_ap(scores, targets)
    if np.isnan(ap).all():
        raise ValueError("no label has a positive example: mAP is undefined")
    return float(np.nanmean(ap))


def reported_aps(scores, targets) -> list[float | None]:
    """:func:`per_label_ap` as a report shows it: None (JSON null) for a label with no positive, not NaN."""
    return [None if np.isnan(a) else float(a) for a in per_label_ap(scores, targets)]


def reported_map(scores, targets) -> float | None:
    """:func:`mean_average_precision` as a report shows it: None when no label has a positive (a small ``eval_n``
    can draw none), as with no evaluation at all, so that the trained student is kept and the mAP shown as n/a."""
    aps = [a for a in reported_aps(scores, targets) if a is not None]
    return float(np.mean(aps)) if aps else None


def predict_probs(model: nn.Module | Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 500) -> Tensor:
    """Sigmoid of the logits, in eval mode, on ``x``'s device (the model runs where it lives)."""
    return torch.sigmoid(predict_logits(model, x, batch_size))


def _tensor(a) -> Tensor:
    return a.float() if isinstance(a, Tensor) else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def train_multilabel(
    model: nn.Module,
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    cfg: TrainConfig,
    *,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> History:
    """Supervised multi-label training: BCE on every label (how a teacher, or the scratch baseline, is made).

    ``y`` may hold soft targets in [0, 1] as well as 0/1 labels.
    """
    xt, yt = _tensor(x), _tensor(y)
    if len(xt) != len(yt):
        raise ValueError(f"x and y differ in length: {len(xt)} vs {len(yt)}")

    def step(batch):
        xb, yb = batch
        return F.binary_cross_entropy_with_logits(model(xb), yb)

    return fit(model, TensorDataset(xt, yt), step, cfg, progress=progress, should_cancel=should_cancel)
