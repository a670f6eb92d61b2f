"""The data-free recipe's settings: its config and defaults, and which teacher gives each label.

Its teachers, :class:`~sdb_core.amalgamate.config.TeacherSpec`, are the recipe's argument, not settings.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sdb_core.progress import Progress

from ..config import TeacherSpec  # the one multi-label teacher (AFK's too), re-exported here

PhaseFn = Callable[[str], Callable[[Progress], None]]
VARIANTS = ("dual_gan", "single_generator")
# The paper's generator losses with DAFL's weights and none of this package's additions
# (``replace(cfg, **PAPER_RECIPE)``): the one-hot loss on the teachers' own thresholded outputs,
# activation, entropy, sparsity, consistency; no BN prior, no label conditioning, no mode seeking,
# no shifts or warps, no adversarial fine-tune.
PAPER_RECIPE = {"label_rate": 0.0, "shift": False, "warp": (0.0, 0.0, 0.0), "w_bn": 0.0, "w_adv": 0.0,
                "w_activation": 0.1, "w_entropy": 5.0, "w_sparsity": 0.5, "w_modeseek": 0.0}


@dataclass
class DataFreeConfig:
    target: Sequence[int]  # the student's labels, in its output order (a subset of the teachers')
    in_shape: tuple[int, int, int]  # the teachers' input (C, H, W)
    variant: str = "dual_gan"  # dual_gan | single_generator (DAFL-style, the benchmark's ablation)
    student_widths: tuple[int, ...] = (8, 16, 32)
    latent: int = 64
    # Generator: samples drawn per epoch and epochs per stage (B stages; the single generator
    # gets all of them in its one stage, so both see the same number of generator steps).
    gen_samples: int = 2048
    gen_epochs: int = 2
    # The last (image) stage's epochs: the costliest stage, and the one that needs the steps (with
    # fewer the teachers stay unsure of the images; docs/notes/datafree.md); None: gen_epochs.
    image_epochs: int | None = 20
    gen_lr: float = 5e-3
    # Student: epochs per block, then end to end; samples (fresh generator images) per epoch. Many
    # end-to-end epochs at a high lr: with fewer the student is under-trained (docs/notes/datafree.md).
    student_samples: int = 2048
    block_epochs: int = 1
    finetune_epochs: int = 60
    student_lr: float = 1e-2
    batch_size: int = 64
    threshold: float = 0.5  # ε of the one-hot loss
    # Loss weights. DAFL's are α = 0.1 (activation) and β = 5 (entropy), what the single-generator
    # baseline uses (PAPER_RECIPE). With label-conditioned targets (label_rate > 0) the targets
    # already set how many labels each image has and balance them over the labels, so the entropy
    # and sparsity terms are off by default (on, they cost mAP). The defaults come from a few
    # exploratory runs (docs/notes/datafree.md), not a tuned search.
    w_onehot: float = 1.0
    w_activation: float = 0.0
    w_entropy: float = 0.0
    w_sparsity: float = 0.0
    w_consistency: float = 1.0
    w_bn: float = 1.0  # the BN-statistics prior (not in the paper; see bn_statistics_loss)
    # Mode seeking in the image stage (not in the paper; MSGAN, Mao et al., CVPR 2019): the two
    # halves of each batch are drawn for the same targets, and the mean pixel distance of paired
    # images per unit of noise distance is maximised with this weight. The conditioned generator
    # otherwise nearly ignores its noise (each label drawn in a few recurring strokes). 0 = off.
    # Measured in docs/notes/datafree.md.
    w_modeseek: float = 2.0
    # Label-conditioned generator (not in the paper; 0 = the paper's one-hot loss on the teachers'
    # own thresholded outputs). > 0: every image is drawn for a random multi-hot target over the
    # teachers' labels, each label on with this chance (at least one per image), fed to the
    # generator with the noise; the one-hot loss is the BCE of each teacher to its part of it.
    label_rate: float = 0.25
    # Adversarial fine-tune (not in the paper; DFAD / ZSKT style): during the student's end-to-end
    # fine-tune the generator keeps learning, to keep the teachers' judgement of its images (the
    # one-hot and BN-prior terms) while maximising, with this weight, the student-teacher
    # disagreement the student minimises (a gradient reversal on the student's input). 0 = off.
    w_adv: float = 0.0
    # Random cyclic shifts of every generated image the student learns from (not in the paper; the
    # jitter of DeepInversion). The teachers label the shifted image, so the targets stay exact;
    # it spreads the few placements a generator settles on over the whole image.
    shift: bool = True
    # Random affine warps of the same images after the shift (not in the paper; the usual jitter of
    # image augmentation): rotation up to ± warp[0] degrees, scale 1 ± warp[1], shear ± warp[2],
    # zero outside. Again the teachers label the warped image. The generator draws each label in a
    # few recurring strokes (its noise barely matters); warps turn them into many. (0, 0, 0) = off.
    # Measured in docs/notes/datafree.md.
    warp: tuple[float, float, float] = (15.0, 0.2, 0.1)
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str | None = None  # one checkpoint per stage; a rerun resumes
    grid_dir: str | None = None  # a PNG grid of generated images after every generator stage

    def __post_init__(self) -> None:  # what needs the teachers: recipe.check_teachers
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if len(self.in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {self.in_shape!r}")
        if len(set(map(int, self.target))) != len(self.target):
            raise ValueError(f"target labels repeat: {list(self.target)}")
        if self.w_adv < 0 or self.w_modeseek < 0:
            raise ValueError(f"w_adv and w_modeseek must be >= 0, got {self.w_adv}, {self.w_modeseek}")
        if not 0.0 <= self.label_rate < 1.0:
            raise ValueError(f"label_rate must be in [0, 1), got {self.label_rate}")
        if len(self.warp) != 3 or min(self.warp) < 0 or self.warp[1] >= 1:
            raise ValueError(f"warp must be (degrees, scale, shear), all >= 0 and scale < 1, got {self.warp!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("gen_samples", "student_samples", "batch_size", "latent"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gen_epochs", "image_epochs", "block_epochs", "finetune_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def label_plan(teachers: Sequence[TeacherSpec], target: Sequence[int]) -> tuple[list[list[int]], list[int]]:
    """Which outputs of which teacher give each target label (the first teacher holding it).

    Returns per teacher the column indices it contributes (empty: the teacher has no branch)
    and the permutation that puts the branches' concatenated outputs into target order.
    """
    owner = {}
    for m, t in enumerate(teachers):
        for col, label in enumerate(t.labels):
            owner.setdefault(int(label), (m, col))
    cols: list[list[int]] = [[] for _ in teachers]
    placed: list[int] = []  # target labels in concatenation order
    for m in range(len(teachers)):
        for label in target:
            if owner[int(label)][0] == m:
                cols[m].append(owner[int(label)][1])
                placed.append(int(label))
    order = [placed.index(int(label)) for label in target]
    return cols, order


def label_union(teachers: Sequence[TeacherSpec]) -> tuple[list[int], list[list[int]]]:
    """The teachers' labels, sorted and once each, and per teacher the position of each of its outputs in that list."""
    union = sorted({int(label) for t in teachers for label in t.labels})
    return union, [[union.index(int(label)) for label in t.labels] for t in teachers]
