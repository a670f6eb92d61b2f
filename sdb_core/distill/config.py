"""Knowledge distillation's settings: torch-free, the one source of their defaults."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..train_config import TrainConfig


@dataclass
class DistillConfig:
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the KD term; 1 − α on cross-entropy with the transfer labels
    label_smoothing: float = 0.0  # only on the cross-entropy term
    use_labels: bool = True  # False: the student sees the teacher only
    cache_teacher: bool = True  # ask the teacher once per sample (no augmentation here)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=0.01))

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
