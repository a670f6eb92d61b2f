"""The small task model a transferability ranking trains when it is given a target data set, not a target model.

``ZooNet`` is one small encoder (five conv blocks) with a head for one task: image-level classes
(``"cls"``), per-pixel classes (``"seg"``), per-pixel regression (``"reg"``) or per-pixel binary
(``"bin"``). ``sdb transfer rank`` and the ``transferability`` job train a weak classifier of it on the
target data and compare the sources with it at ``FEATURE_LAYER``; the DEPARA benchmark's zoo
(``benchmarks/depara_zoo.py``) is made of these models.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from sdb_core.progress import Progress
from sdb_core.train import TrainConfig, fit, seed_everything

ENCODER_LAYERS = tuple(f"encoder.{i}" for i in range(5))  # the layers layer selection scores
FEATURE_LAYER = ENCODER_LAYERS[-1]  # what model selection and the probes read by default


class ZooNet(nn.Module):
    """Five conv blocks (32 → 16 → 16 → 8 → 4 → 4 px) and a head for one task."""

    def __init__(self, kind: str, outputs: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        w = width
        self.kind, self.outputs = kind, outputs

        def block(cin, cout, pool):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                                 *([nn.MaxPool2d(2)] if pool else []))

        self.encoder = nn.Sequential(block(in_channels, w, True), block(w, 2 * w, False), block(2 * w, 2 * w, True),
                                     block(2 * w, 4 * w, True), block(4 * w, 4 * w, False))
        if kind == "cls":
            # The 4x4 grid is kept (not pooled away): rotation and counting need where things are.
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * w, outputs))
        else:
            def up(cin, cout):
                return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                                     nn.ReLU(inplace=True))

            self.head = nn.Sequential(up(4 * w, 2 * w), up(2 * w, w), nn.Upsample(scale_factor=2, mode="nearest"),
                                      nn.Conv2d(w, outputs, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def task_loss(kind: str, out: Tensor, y: Tensor) -> Tensor:
    if kind in ("cls", "seg"):
        return F.cross_entropy(out, y)
    if kind == "reg":
        return F.mse_loss(out, y)
    return F.binary_cross_entropy_with_logits(out, y)


def train_task_model(name: str, data: TensorDataset, cfg: TrainConfig, *, kind: str, outputs: int, width: int = 16,
                     progress: Callable[[Progress], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> ZooNet:
    """A ``ZooNet`` of ``kind`` with ``outputs`` outputs trained on ``data`` by ``fit``; ``name`` (what the model
    is for) does not change the training."""
    in_channels = data.tensors[0].shape[1]
    seed_everything(cfg.seed)
    model = ZooNet(kind, int(outputs), in_channels, width)

    def step(batch):
        x, y = batch
        return task_loss(kind, model(x), y)

    fit(model, data, step, cfg, progress=progress, should_cancel=should_cancel)
    return model.eval()
