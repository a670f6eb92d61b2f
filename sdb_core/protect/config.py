"""The protection recipes' settings (SDB, Nasty, the self-check): torch-free, the one source of their defaults.

The CLI, the job kinds and the task modules read every default from here without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..train_config import TrainConfig


@dataclass
class SDBConfig:
    # Keyed input λ·x + (1 − λ)·k. 0.3 rather than the paper's 0.5: the keyed path is a few tenths of a point
    # short of the plain teacher as a KD source at 0.5 (leak audit, N = 300, 24 student pairs: −0.30 ± 0.12)
    # and ties at 0.3 (+0.11 ± 0.11), for 0.7 points of public top-1 (96.0 vs 96.7; README, leak audit).
    lam: float = 0.3
    temperature: float = 4.0
    weight: float = 1.0  # w, the disturbance weight
    target_prob: float = 0.40  # q_y on the true class
    partner_prob: float = 0.25  # q_y on each confusion partner
    partners: int = 2
    # Clipping matters: the first epoch's gradients are ~10x a teacher's (the keyed path starts
    # out wrong) and without a clip one run in three collapsed to a constant output here.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, lr=0.01, batch_size=64,
                                                                   grad_clip=5.0))

    def __post_init__(self) -> None:
        if not 0.0 < self.lam < 1.0:
            raise ValueError(f"lam must be in (0, 1), got {self.lam}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.partners < 1:
            raise ValueError(f"partners must be >= 1, got {self.partners}")
        if not 0 < self.partner_prob < self.target_prob < 1:
            raise ValueError("need 0 < partner_prob < target_prob < 1 so the argmax stays the label, "
                             f"got partner_prob={self.partner_prob}, target_prob={self.target_prob}")
        if self.target_prob + self.partners * self.partner_prob > 1 + 1e-9:
            raise ValueError("target_prob + partners·partner_prob must be <= 1, got "
                             f"{self.target_prob + self.partners * self.partner_prob:.3f}")


@dataclass
class NastyConfig:
    temperature: float = 4.0
    omega: float = 0.04
    max_kl: float = 20.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, lr=0.01, batch_size=64,
                                                                   grad_clip=5.0))

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.omega < 0:
            raise ValueError(f"omega must be >= 0, got {self.omega}")


@dataclass(frozen=True)
class Thresholds:
    """What the owner accepts, in accuracy points on the validation split (SDB core targets)."""

    max_accuracy_drop: float = 1.0  # public top-1 >= teacher - this
    max_keyed_drop: float = 1.5  # keyed-path top-1 >= teacher - this
    min_leak_margin: float = 2.0  # KD from the public outputs <= labels only - this

    def misses(self, f: dict[str, float]) -> dict[str, float]:
        """Each missed threshold and by how many points."""
        out = {"public": f["public_drop"] - self.max_accuracy_drop,
               "keyed": f["keyed_drop"] - self.max_keyed_drop}
        if "leak_margin" in f:
            out["leak"] = self.min_leak_margin - f["leak_margin"]
        return {k: round(v, 3) for k, v in out.items() if v > 0}


@dataclass(frozen=True)
class CheckConfig:
    thresholds: Thresholds = field(default_factory=Thresholds)
    val_fraction: float = 0.15  # of the owner's training split, held out for the measurements
    max_attempts: int = 4
    budget_seconds: float | None = None  # no new attempt starts once it would likely end past this
    leak_check: bool = True
    student: str = "mlp"  # the leak check's student: the cheapest one that learns every zoo input
    transfer_n: int = 1000
    # The protection benchmark's students (MeasureConfig), averaged over this many seeds: at 15 epochs and
    # one seed the check passed digits boxes whose KD-from-public student was 0.5 below labels only on test.
    student_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.01, batch_size=64))
    student_seeds: int = 2
    temperature: float = 4.0  # the leak check's KD temperature and weight on the soft labels
    alpha: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.student_seeds < 1:
            raise ValueError(f"student_seeds must be >= 1, got {self.student_seeds}")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise ValueError(f"budget_seconds must be > 0, got {self.budget_seconds}")
