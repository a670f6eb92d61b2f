"""How each zoo architecture is trained as a teacher: one documented schedule per family.

A wrap is judged on a good teacher, so ``sdb wrap --train-teacher``, the ``wrap`` job and the
benchmarks train each architecture the way its family is usually trained (plain CNNs and MLPs
with a small SGD step, ResNets and WRNs with SGD at 0.1 and a cosine schedule, the ViT with
Adam), with random shifts of up to 1/14 of the image side (2 pixels at 28 and 32; small sets overfit
without them, 8-pixel digits get none).
Figures each schedule reaches: docs/protection.md.
"""
from __future__ import annotations

from typing import Any

# Plain dicts (TrainConfig's fields), so this module imports no torch.
_SGD_SMALL = {"epochs": 15, "lr": 0.02, "optimizer": "sgd"}
_SGD_RESNET = {"epochs": 30, "lr": 0.1, "optimizer": "sgd"}
_ADAM_VIT = {"epochs": 60, "lr": 3e-3, "optimizer": "adam", "weight_decay": 5e-5}

SCHEDULES: dict[str, dict[str, Any]] = {
    "cnn": _SGD_SMALL, "lenet": _SGD_SMALL, "mlp": _SGD_SMALL,
    "resnet8": _SGD_RESNET, "resnet20": _SGD_RESNET, "resnet56": _SGD_RESNET, "resnet8_gn": _SGD_RESNET,
    "wrn16_1": _SGD_RESNET, "wrn16_2": _SGD_RESNET, "wrn40_1": _SGD_RESNET, "wrn40_2": _SGD_RESNET,
    "vit_tiny": _ADAM_VIT,
}
DEFAULT = _SGD_SMALL  # an architecture with no schedule of its own (a model outside the zoo)


def teacher_schedule(arch: str) -> dict[str, Any]:
    """The TrainConfig fields ``arch`` is trained with as a teacher (a copy: callers may change it)."""
    return dict(SCHEDULES.get(arch, DEFAULT))


def teacher_shift(in_shape) -> int:
    """Pixels of random shift for a teacher on ``in_shape`` inputs (``train_classifier(shift=...)``); images only."""
    return min(in_shape[-2:]) // 14 if len(in_shape) == 3 else 0


def teacher_config(arch: str, **overrides):
    """``TrainConfig`` of ``arch``'s teacher schedule, with ``overrides`` (e.g. ``seed``, ``epochs``) on top."""
    from sdb_core.train import TrainConfig

    return TrainConfig(**{**teacher_schedule(arch), **{k: v for k, v in overrides.items() if v is not None}})
