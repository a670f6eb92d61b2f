"""Knowledge distillation's settings: torch-free, the one source of their defaults."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..train_config import TrainConfig, epochs_for_steps

# A student trained for a fixed number of epochs is under-trained on a small transfer set: 20 epochs of 1,000 images
# at batch 64 are 320 SGD steps, and an MLP there is still far from its teacher (T=4 KL on the transfer set: digits
# 0.17, 0.04 at 2,000 steps; mnist-5k 0.41, 0.05 at 1,600) and 1-2 points of test accuracy short (digits 94.6 -> 95.9
# at 2,000 steps; mnist-5k keyed path 92.0 -> 93.5 at 1,600). Past ~2,000 steps the curves flatten (digits 96.0 at
# 3,200). The teacher is asked once per sample (cache_teacher), so training longer costs seconds, not keyed samples.
# A set of 100 batches or more (6,400 images at batch 64) keeps train.epochs.
MIN_STEPS = 2000


@dataclass
class DistillConfig:
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the KD term; 1 − α on cross-entropy with the transfer labels
    label_smoothing: float = 0.0  # only on the cross-entropy term
    use_labels: bool = True  # False: the student sees the teacher only
    cache_teacher: bool = True  # ask the teacher once per sample (no augmentation here)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=0.01))
    # train.epochs, or more where those are fewer optimiser steps than this (see MIN_STEPS); None: train.epochs
    # exactly (an epoch count the caller gave). Applied by for_transfer (the distill task, `sdb distill`, the job).
    min_steps: int | None = MIN_STEPS

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.min_steps is not None and self.min_steps < 1:
            raise ValueError(f"min_steps must be >= 1 or None, got {self.min_steps}")

    def for_transfer(self, samples: int) -> DistillConfig:
        """This config with the epochs a transfer set of ``samples`` trains for fixed: ``train.epochs``, or enough
        for ``min_steps`` optimiser steps at ``train.batch_size`` where that is more (``min_steps`` None then)."""
        if self.min_steps is None:
            return self
        epochs = max(self.train.epochs, epochs_for_steps(self.min_steps, samples, self.train.batch_size))
        return replace(self, train=replace(self.train, epochs=epochs), min_steps=None)
