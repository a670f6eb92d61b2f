"""The amalgamation recipes' settings: torch-free, the one source of their defaults (AFK's and task
branching's; the data-free recipe's are in :mod:`sdb_core.amalgamate.datafree.config`), and
:class:`TeacherSpec`, the multi-label teacher AFK and the data-free recipe take.

The recipes import them from here. A config holds settings only: the teachers' networks (and AFK's
transfer images) are the recipe's arguments. Building one imports nothing, reading its defaults neither.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..train_config import TrainConfig

if TYPE_CHECKING:
    from .multilabel import MultiLabelNet

FAMILIES = ("multilabel", "encdec")  # the teacher networks a hosted bundle is read back into (hosted.py)
TASKS = ("seg", "depth", "edges")  # the dense scene tasks task branching knows


# ---- the multi-label teachers (AFK, data-free) ---------------------------------------------------

@dataclass
class TeacherSpec:
    """A trained multi-label teacher, the global label id of each of its outputs (in order), and its name."""

    name: str
    model: MultiLabelNet
    labels: list[int]

    def __post_init__(self) -> None:
        self.labels = [int(v) for v in self.labels]
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"teacher {self.name!r}: labels must be distinct and non-empty, got {self.labels}")
        if getattr(self.model, "num_labels", len(self.labels)) != len(self.labels):
            raise ValueError(f"teacher {self.name!r} has {self.model.num_labels} outputs but "
                             f"{len(self.labels)} label ids")


# ---- AFK ----------------------------------------------------------------------------------------

@dataclass
class AFKConfig:
    tasks: list[int]                       # the requested label ids, a subset of the teachers' union
    n_transfer: int = 3000                 # composites drawn when the recipe gets no transfer images
    grid: int = 2
    data_seed: int = 0
    student_widths: Sequence[int] | None = None  # None = sized from the requested share (see below)
    width_scale: float = 0.85
    layer_epochs: int = 2                  # per block, layer-wise stage
    finetune_epochs: int = 4               # end to end
    feature_weight: float = 1.0
    gate_l1: float = 1e-3
    # 10: the gates then close 10-30% of each task's last-block channels in the benchmark's
    # budget (at 1 none moved below 0.5), and seed 0's full student went 97.70 -> 97.89 mAP.
    gate_scale: float = 10.0               # see FilteredStudent
    relevance_samples: int = 256           # images used to measure the teachers' channel relevance
    # Adam: on these composites it reached 97.6 mAP in 6 epochs where SGD (lr 0.05) reached 95.8.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="adam", lr=3e-3, weight_decay=0.0))
    eval_n: int = 1000                     # test composites for the report (labels used for scoring only)

    def __post_init__(self) -> None:  # what needs the teachers: afk.check_teachers
        self.tasks = [int(k) for k in self.tasks]
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct and non-empty, got {self.tasks}")
        for name in ("layer_epochs", "finetune_epochs", "n_transfer", "relevance_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.width_scale > 0:
            raise ValueError(f"width_scale must be > 0, got {self.width_scale}")


# ---- task branching ------------------------------------------------------------------------

@dataclass
class BranchingConfig:
    tasks: tuple[str, ...] = ("seg", "depth")  # add "edges" for a third teacher
    size: int = 64
    num_classes: int = 4
    n_train: int = 600
    n_test: int = 200
    teacher_widths: tuple[int, ...] = (8, 16, 32)
    widths: tuple[int, ...] = (8, 16, 32)  # the student's (and the scratch network's)
    convs: int = 1  # 3x3 convs per encoder stage (decoder stages have two)
    teacher_epochs: int = 6
    epochs: int = 10  # the student's: search + fine-tune
    search_fraction: float = 0.5  # part of the student's epochs spent sampling branch points
    candidates: tuple[str, ...] | None = None  # stages a task may branch out after; default: bottleneck on
    scratch: bool = True  # also train the same-shaped multi-task network with labels
    batch_size: int = 16
    lr: float = 5e-3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (sdb_core.train.pick_device)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.widths, self.teacher_widths = tuple(self.widths), tuple(self.teacher_widths)
        if self.candidates is not None:
            self.candidates = tuple(self.candidates)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or len(self.tasks) < 1 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct names from {TASKS}, got {self.tasks!r}")
        if len(self.widths) != len(self.teacher_widths):
            raise ValueError(f"student and teachers need the same number of levels (stages to branch "
                             f"into), got widths {self.widths!r} and teacher_widths {self.teacher_widths!r}")
        if self.size % 2 ** (len(self.widths) - 1):
            raise ValueError(f"size {self.size} must be divisible by {2 ** (len(self.widths) - 1)}")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")
        if self.epochs < 2:
            raise ValueError(f"epochs must be >= 2 (search, then fine-tune), got {self.epochs}")
        if not 0.0 < self.search_fraction < 1.0:
            raise ValueError(f"search_fraction must be in (0, 1), got {self.search_fraction}")
        if len(self.widths) < 2 or min(self.widths) < 1 or self.convs < 1:
            raise ValueError(f"widths needs >= 2 positive entries and convs >= 1, got {self.widths!r}, {self.convs!r}")
        if self.candidates is not None and not self.candidates:
            raise ValueError("candidates must name at least one stage")
        if self.candidates:  # named after the network's stages (building one imports torch)
            from ..models.encdec import EncDec

            valid = EncDec(3, 1, self.widths, self.convs).stage_names[:-1]  # nothing of a teacher after its head
            for c in self.candidates:
                if c not in valid:
                    raise ValueError(f"candidate {c!r} is not a stage to branch after; stages: {', '.join(valid)}")

    @property
    def search_epochs(self) -> int:
        """The student's epochs that sample branch points (at least one, and one left to fine-tune)."""
        return max(1, min(self.epochs - 1, round(self.epochs * self.search_fraction)))
