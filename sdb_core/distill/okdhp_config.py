"""OKDHP's settings (the pose data, the multi-branch network, the training): torch-free, the one source of
their defaults. :mod:`sdb_core.distill.okdhp` imports them from here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..train_config import TrainConfig

if TYPE_CHECKING:
    from ..data.pose import PoseData


def pose_train_config(**over) -> TrainConfig:
    """The reference optimiser for pose: Adam 2.5e-4, no weight decay, /10 at 50% and 75% of training."""
    return TrainConfig(**{"epochs": 20, "batch_size": 32, "lr": 2.5e-4, "optimizer": "adam", "weight_decay": 0.0,
                          "schedule": "step", **over})


@dataclass
class PoseDataConfig:
    data: str = "synthetic-pose"  # synthetic-pose | coco-keypoints:PATH
    root: str = ".sdb/data"       # where synthetic sets are written and relative paths start
    n_train: int = 800
    n_test: int = 200
    input_size: int = 64
    data_seed: int = 0            # the synthetic set's seed, fixed across training seeds

    def __post_init__(self) -> None:
        if self.input_size < 16 or self.input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16 >= 16, got {self.input_size}")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")

    def load(self) -> PoseData:
        from ..data.pose import load_pose_data

        return load_pose_data(self.data, root=self.root, input_size=self.input_size, n_train=self.n_train,
                              n_test=self.n_test, seed=self.data_seed)


@dataclass
class OKDHPConfig:
    data: PoseDataConfig = field(default_factory=PoseDataConfig)
    width: int = 32
    shared_stacks: int = 1
    branch_stacks: tuple[int, ...] = (1, 1, 1)  # equal: balanced; different depths: unbalanced
    target_branch: int = 0                      # the branch that is deployed
    ensemble: str = "fau"                       # fau | mean (the ablation: plain average of the branches)
    w_kd: float = 2.0
    w_ens: float = 1.0
    rampup: float = 0.43                        # ramp-up length as a fraction of training (60/140 in the paper)
    detach_ensemble: bool = True
    train: TrainConfig = field(default_factory=pose_train_config)

    def __post_init__(self) -> None:
        self.branch_stacks = tuple(int(b) for b in self.branch_stacks)
        if len(self.branch_stacks) < 2 or min(self.branch_stacks) < 1:
            raise ValueError(f"branch_stacks needs >= 2 branches of >= 1 stack, got {list(self.branch_stacks)}")
        if not 0 <= self.target_branch < len(self.branch_stacks):
            raise ValueError(f"target_branch must index branch_stacks, got {self.target_branch}")
        if self.ensemble not in ("fau", "mean"):
            raise ValueError(f"ensemble must be 'fau' or 'mean', got {self.ensemble!r}")
        if self.width < 4 or self.shared_stacks < 0:
            raise ValueError(f"need width >= 4 and shared_stacks >= 0, got {self.width}, {self.shared_stacks}")
        if self.w_kd < 0 or self.w_ens < 0 or not 0 <= self.rampup <= 1:
            raise ValueError(f"need w_kd, w_ens >= 0 and rampup in [0, 1], got {self.w_kd}, {self.w_ens}, "
                             f"{self.rampup}")

    @property
    def target_stacks(self) -> int:
        return self.shared_stacks + self.branch_stacks[self.target_branch]
