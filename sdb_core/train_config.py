"""How a recipe trains (epochs, optimizer, schedule, device): torch-free, so every config can embed it."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # what TrainConfig.device takes


def check_device(device: object, what: str = "device") -> None:
    """Raise ``ValueError`` naming ``device`` unless it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise ValueError(f"{what} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be cosine|step|constant, got {self.schedule!r}")
        check_device(self.device, "TrainConfig.device")


def epochs_for_steps(steps: int, samples: int, batch_size: int) -> int:
    """Epochs that give at least ``steps`` optimiser steps over ``samples`` items in batches of ``batch_size`` (the
    last batch of an epoch partial, as ``fit`` cuts them)."""
    return math.ceil(steps / max(math.ceil(samples / batch_size), 1))


def gentler(train: TrainConfig, clip: float, lr_factor: float = 0.5) -> TrainConfig:
    """The training to retry a run that diverged with: the step times ``lr_factor`` and gradients clipped at
    ``clip``, unless ``train`` clips tighter already."""
    return replace(train, lr=train.lr * lr_factor, grad_clip=min(train.grad_clip or clip, clip))
