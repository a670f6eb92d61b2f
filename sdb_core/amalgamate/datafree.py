"""Data-free knowledge amalgamation with a group-stack dual-GAN (Ye et al., CVPR 2020, arXiv 2003.09088).

Setting: M frozen multi-label teachers (:class:`~sdb_core.amalgamate.multilabel.MultiLabelNet`
with B blocks each), each on its own label ids, and a target label set drawn from their
union. The recipe sees the teachers' weights and nothing else: no image, no label.

1. **Group-stack generator.** B generator blocks map noise to an image; the output of
   block j has the shape of the input of the last j blocks of a teacher, so it is judged
   by those blocks of every teacher (frozen), through a per-teacher *filter* (global
   pooling + two FC layers: a channel gate into that teacher's feature space). The last
   block's output is the image and enters every teacher unfiltered. Losses per judged
   stage (DAFL, arXiv 1904.01186, adapted to multi-label outputs): one-hot on the
   teacher's thresholded outputs (ε = 0.5), activation of the teacher's last features,
   information entropy of the batch's label frequencies, sparsity of the outputs; plus
   the consistency of every intermediate stage's predictions with the deepest stage's.
   Trained stage by stage (stage k trains generator blocks 1..k against stages ≤ k).
2. **Dual generator (the student).** Trained block by block on generated images: the
   output of its block b goes through a filter into teacher m's feature space at the
   same depth and through the rest of teacher m, and matches teacher m on the target
   labels that m holds (the task-level filter: m's other labels are ignored).
3. **Regrouping.** The student's blocks, then one branch per teacher (its last filter
   and a copy of that teacher's head, restricted to the target labels it holds): one
   multi-branch network whose outputs are the target labels in the order asked; an
   end-to-end fine-tune on generated images closes the gap the frozen blocks leave.

Additions beyond the paper, each a config field (``PAPER_RECIPE`` turns them all off): a
BN-statistics prior (``w_bn``), a label-conditioned generator (``label_rate``), mode seeking in
the image stage (``w_modeseek``), random shifts and affine warps of the student's generated
images (``shift``, ``warp``), and an adversarial fine-tune (``w_adv``, off by default).

The same student architecture trained on other images (real ones, noise, a DAFL single
generator) is what :func:`distill_student` does; ``benchmarks/datafree.py`` compares them.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..progress import Progress
from ..train import TrainConfig, fit, pick_device

PhaseFn = Callable[[str], Callable[[Progress], None]]
VARIANTS = ("dual_gan", "single_generator")
# The paper's generator losses with DAFL's weights and none of this module's additions
# (``replace(cfg, **PAPER_RECIPE)``): the one-hot loss on the teachers' own thresholded outputs,
# activation, entropy, sparsity, consistency; no BN prior, no label conditioning, no mode seeking,
# no shifts or warps, no adversarial fine-tune.
PAPER_RECIPE = {"label_rate": 0.0, "shift": False, "warp": (0.0, 0.0, 0.0), "w_bn": 0.0, "w_adv": 0.0,
                "w_activation": 0.1, "w_entropy": 5.0, "w_sparsity": 0.5, "w_modeseek": 0.0}


# --------------------------------------------------------------------------- config
@dataclass
class TeacherSpec:
    """A frozen multi-label teacher and the global label id of each of its outputs."""

    model: nn.Module
    labels: Sequence[int]
    name: str = ""


@dataclass
class DataFreeConfig:
    teachers: Sequence[TeacherSpec]
    target: Sequence[int]  # the student's labels, in its output order
    in_shape: tuple[int, int, int]  # the teachers' input (C, H, W)
    variant: str = "dual_gan"  # dual_gan | single_generator (DAFL-style, the benchmark's ablation)
    student_widths: tuple[int, ...] = (8, 16, 32)
    latent: int = 64
    # Generator: samples drawn per epoch and epochs per stage (B stages; the single generator
    # gets all of them in its one stage, so both see the same number of generator steps).
    gen_samples: int = 2048
    gen_epochs: int = 2
    # The last (image) stage's epochs: the costliest stage and the one that needs the steps (at 4
    # epochs of 2,048 the teachers were unsure of most generated images; seed 0, student 20 epochs
    # at lr 1e-2: 10 image epochs 79.3 mAP, 20: 85.3); None: gen_epochs.
    image_epochs: int | None = 20
    gen_lr: float = 5e-3
    # Student: epochs per block, then end to end; samples (fresh generator images) per epoch. The
    # student was under-trained at 9 end-to-end epochs and lr 2e-3 (seed 0, same generator: 68.1
    # mAP; 20 epochs 76.9; 20 at 5e-3 80.3; 20 at 1e-2 85.3; 20 at 2e-2 81.2; 40 at 5e-3 85.0).
    # Still rising at 20 and 40 (lr 1e-2; seed 1, shifts only: 20 epochs 76.7, 40: 81.1; with warps,
    # seed 0: 40 86.2, 60 87.9; seed 1: 40 85.9, 60 87.8).
    student_samples: int = 2048
    block_epochs: int = 1
    finetune_epochs: int = 60
    student_lr: float = 1e-2
    batch_size: int = 64
    threshold: float = 0.5  # ε of the one-hot loss
    # Loss weights. DAFL's are α = 0.1 (activation) and β = 5 (entropy), what the single-generator
    # baseline uses (PAPER_RECIPE). With label-conditioned targets (label_rate > 0) the targets
    # already set how many labels each image has and balance them over the labels, so the entropy
    # and sparsity terms are off by default (with them on, seed 0: 50.3 mAP; off: 59.0). The
    # defaults come from a few exploratory runs on seed 0 (README), not a tuned search.
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
    # Scratch runs, weight 2: seed 1 (student 40 epochs) 85.9 -> 87.0; seed 0 (60 epochs) 87.9 -> 90.6.
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
    # Seed 1 scratch, student 40 epochs: shifts alone 81.1 mAP, + warps (15, 0.2, 0.1) 85.9.
    warp: tuple[float, float, float] = (15.0, 0.2, 0.1)
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str | None = None  # one checkpoint per stage; a rerun resumes
    grid_dir: str | None = None  # a PNG grid of generated images after every generator stage

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.teachers:
            raise ValueError("at least one teacher is needed")
        if len(self.in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {self.in_shape!r}")
        held = {int(label) for t in self.teachers for label in t.labels}
        missing = [t for t in self.target if int(t) not in held]
        if not self.target or missing:
            raise ValueError(f"target labels must be a non-empty subset of the teachers' labels {sorted(held)}; "
                             f"not held by any teacher: {missing}")
        if len(set(map(int, self.target))) != len(self.target):
            raise ValueError(f"target labels repeat: {list(self.target)}")
        for t in self.teachers:
            if len(set(map(int, t.labels))) != len(t.labels):
                raise ValueError(f"teacher {t.name!r} lists a label twice: {list(t.labels)}")
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


@dataclass
class DataFreeResult:
    student: MultiBranchStudent
    generator: GroupStackGenerator
    target: list[int]
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # stage -> per-epoch metrics
    grids: list[Path] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- modules
def _entry_shapes(teacher: nn.Module, in_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Input shape of every block of ``teacher`` (entry 0 is the image), from one zero batch."""
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    with torch.no_grad():
        feats = teacher.features(torch.zeros(1, *in_shape, device=device))
    return [tuple(in_shape)] + [tuple(f.shape[1:]) for f in feats[:-1]]


def _output_shapes(net: nn.Module, in_shape: Sequence[int]) -> list[tuple[int, ...]]:
    device = next(iter(net.parameters()), torch.empty(0)).device
    with torch.no_grad():
        return [tuple(f.shape[1:]) for f in net.features(torch.zeros(1, *in_shape, device=device))]


class FeatureFilter(nn.Module):
    """Global pooling + two FC layers → a per-sample channel gate in the target feature space.

    A 1×1 projection first when the channel counts differ (another teacher's, or the
    narrower student's). The gate is 2·sigmoid with a zero-initialised last layer, so a
    new filter starts as the identity (or the plain projection) instead of halving
    every feature.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(8, c_out // 2)
        self.proj = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)
        self.fc1 = nn.Linear(c_in, hidden)
        self.fc2 = nn.Linear(hidden, c_out)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor) -> Tensor:
        gate = 2.0 * torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean(dim=(2, 3))))))
        return self.proj(h) * gate[:, :, None, None]


class GroupStackGenerator(nn.Module):
    """B blocks from noise to image; ``forward(z)`` returns every block's output, shallowest first.

    ``shapes[j]`` is the output shape of block j+1: the input shape of a teacher's last j+1
    blocks, so ``shapes[-1]`` is the image shape. Feature stages end in BN + LeakyReLU, the
    image stage in a sigmoid (pixels in [0, 1], like the teachers' inputs).
    """

    def __init__(self, latent: int, shapes: Sequence[Sequence[int]], n_labels: int = 0, label_rate: float = 0.0):
        super().__init__()
        if len(shapes) < 2:
            raise ValueError("a group stack needs at least 2 blocks (a feature stage and the image)")
        if n_labels and not 0.0 < label_rate < 1.0:
            raise ValueError(f"a label-conditioned generator needs label_rate in (0, 1), got {label_rate}")
        self.latent, self.shapes = latent, [tuple(s) for s in shapes]
        self.n_labels, self.label_rate = int(n_labels), float(label_rate)
        c0, h0, w0 = self.shapes[0]
        self.fc = nn.Linear(latent + self.n_labels, c0 * h0 * w0)
        blocks = [nn.Sequential(nn.BatchNorm2d(c0), nn.LeakyReLU(0.2), nn.Conv2d(c0, c0, 3, padding=1, bias=False),
                                nn.BatchNorm2d(c0), nn.LeakyReLU(0.2))]
        for (c_prev, _, _), (c, h, w) in zip(self.shapes[:-2], self.shapes[1:-1]):
            blocks.append(nn.Sequential(nn.Upsample(size=(h, w), mode="nearest"),
                                        nn.Conv2d(c_prev, c, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(c), nn.LeakyReLU(0.2)))
        c_prev = self.shapes[-2][0]
        c_img, h, w = self.shapes[-1]
        mid = max(c_prev // 2, 8)
        blocks.append(nn.Sequential(nn.Upsample(size=(h, w), mode="nearest"),
                                    nn.Conv2d(c_prev, mid, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(mid), nn.LeakyReLU(0.2),
                                    nn.Conv2d(mid, c_img, 3, padding=1), nn.Sigmoid()))
        self.blocks = nn.ModuleList(blocks)

    def draw(self, n: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
        """Noise for ``n`` images and, for a label-conditioned generator, their multi-hot targets."""
        z = torch.randn(n, self.latent, device=device)
        if not self.n_labels:
            return z, None
        y = (torch.rand(n, self.n_labels, device=device) < self.label_rate).float()
        empty = y.sum(1) == 0  # at least one label per image, as in a composite that is never blank
        y[empty, torch.randint(0, self.n_labels, (int(empty.sum()),), device=device)] = 1.0
        return z, y

    def forward(self, z: Tensor, stages: int | None = None, y: Tensor | None = None) -> list[Tensor]:
        c0, h0, w0 = self.shapes[0]
        if self.n_labels:
            if y is None:
                raise ValueError("this generator is label-conditioned: pass y (see draw)")
            z = torch.cat([z, y], 1)
        h = self.fc(z).view(len(z), c0, h0, w0)
        outs = []
        for blk in self.blocks[: stages or len(self.blocks)]:
            h = blk(h)
            outs.append(h)
        return outs

    def sample(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """``n`` images (eval mode, no grad)."""
        was = self.training
        self.eval()
        with torch.no_grad():
            z, y = self.draw(n, device)
            x = self(z, y=y)[-1]
        self.train(was)
        return x


class Branch(nn.Module):
    """One teacher's part of the regrouped student: filter, that teacher's head, its target labels."""

    def __init__(self, filt: nn.Module, head: nn.Module, index: Sequence[int]):
        super().__init__()
        self.filter, self.head = filt, head
        self.register_buffer("index", torch.as_tensor(list(index), dtype=torch.long))

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.filter(h)).index_select(1, self.index)


class MultiBranchStudent(nn.Module):
    """Shared student blocks, then one branch per teacher; logits of the target labels in order."""

    def __init__(self, blocks: nn.ModuleList, branches: Sequence[Branch], order: Sequence[int], labels: Sequence[int]):
        super().__init__()
        self.blocks, self.branches = blocks, nn.ModuleList(branches)
        self.labels = [int(v) for v in labels]
        self.register_buffer("order", torch.as_tensor(list(order), dtype=torch.long))

    def trunk(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return torch.cat([b(h) for b in self.branches], dim=1).index_select(1, self.order)


# --------------------------------------------------------------------------- losses
def one_hot_loss(logits: Tensor, threshold: float = 0.5, target: Tensor | None = None) -> Tensor:
    """BCE of the outputs against their own thresholded probabilities: confident, teacher-like outputs.
    A label-conditioned generator gives the ``target`` its image was drawn for instead."""
    if target is None:
        target = (torch.sigmoid(logits) > threshold).float()
    return F.binary_cross_entropy_with_logits(logits, target.detach())


def activation_loss(features: Tensor) -> Tensor:
    """−mean |features| of the teacher's last block: images that excite the teacher (DAFL's L_a)."""
    return -features.abs().mean()


def entropy_loss(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """−H of the batch's label frequencies (mean probability per label, normalised to sum 1).

    DAFL's information entropy for multi-label outputs: minimising it spreads the
    positives over all labels instead of one label lighting up on every image.
    """
    freq = torch.sigmoid(logits).mean(dim=0)
    q = freq / freq.sum().clamp_min(eps)
    return (q * torch.log(q.clamp_min(eps))).sum()


def sparsity_loss(logits: Tensor) -> Tensor:
    """Mean probability (L1 of the outputs): few positives per image, as in the real label sets."""
    return torch.sigmoid(logits).mean()


def consistency_loss(stage_logits: Tensor, final_logits: Tensor) -> Tensor:
    """An intermediate stage's predictions should agree with the deepest stage's (held fixed)."""
    return F.binary_cross_entropy_with_logits(stage_logits, torch.sigmoid(final_logits).detach())


def soft_bce(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """BCE of the student to the teacher's per-label probabilities (multi-label KD)."""
    return F.binary_cross_entropy_with_logits(student_logits, torch.sigmoid(teacher_logits))


# --------------------------------------------------------------------------- helpers
def run_teacher(teacher: nn.Module, h: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """Blocks ``start:`` then the head on a block input: (last block's features, logits)."""
    for blk in teacher.blocks[start:]:
        h = blk(h)
    return h, teacher.head(h)


def bn_statistics_loss(teacher: nn.Module, h: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`run_teacher`, plus how far the batch statistics entering the teacher's BN layers
    (blocks ``start:``) are from the running statistics the teacher kept of its training data.

    Not in the paper: the BN prior of DeepInversion (Yin et al., CVPR 2020). Here the teachers'
    max-pool heads are otherwise satisfied by a few blobs (see the README's figures).
    """
    terms: list[Tensor] = []

    def hook(mod: nn.BatchNorm2d, inputs, _out) -> None:
        x = inputs[0]
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        terms.append(torch.linalg.vector_norm(mean - mod.running_mean) + torch.linalg.vector_norm(var - mod.running_var))

    handles = [m.register_forward_hook(hook) for blk in teacher.blocks[start:] for m in blk.modules()
               if isinstance(m, nn.BatchNorm2d)]
    try:
        feats, logits = run_teacher(teacher, h, start)
    finally:
        for hd in handles:
            hd.remove()
    return feats, logits, (torch.stack(terms).mean() if terms else h.new_zeros(()))


def random_shift(x: Tensor) -> Tensor:
    """Every image rolled (cyclically) by its own random offset in both directions."""
    n, _, h, w = x.shape
    dy = torch.randint(0, h, (n, 1, 1), device=x.device)
    dx = torch.randint(0, w, (n, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :, None] - dy) % h  # (n, h, 1)
    cols = (torch.arange(w, device=x.device)[None, None, :] - dx) % w  # (n, 1, w)
    return x[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def random_warp(x: Tensor, degrees: float, scale: float, shear: float) -> Tensor:
    """Every image through its own random affine map about the centre (zero outside the image)."""
    n = len(x)
    if not (degrees or scale or shear):
        return x

    def uniform(r: float) -> Tensor:
        return (torch.rand(n, device=x.device) * 2 - 1) * r

    angle, s, sh = uniform(degrees * math.pi / 180), 1 + uniform(scale), uniform(shear)
    cos, sin, zero = torch.cos(angle) / s, torch.sin(angle) / s, torch.zeros(n, device=x.device)
    theta = torch.stack([torch.stack([cos, sh - sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def augment(x: Tensor, cfg: DataFreeConfig) -> Tensor:
    """What the student sees of a generated batch: shifted (``cfg.shift``), then warped (``cfg.warp``)."""
    if cfg.shift:
        x = random_shift(x)
    return random_warp(x, *cfg.warp)


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


def _freeze(teachers: Sequence[TeacherSpec], device: torch.device) -> list[nn.Module]:
    nets = []
    for t in teachers:
        net = t.model.to(device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        nets.append(net)
    return nets


def _sampler_data(n: int) -> TensorDataset:
    """Step counter for ``fit``: the batches only say how many fresh samples to draw."""
    return TensorDataset(torch.zeros(n))


def save_grid(images: Tensor, path: str | Path, nrow: int = 8) -> Path:
    """A PNG grid of images (N, C, H, W), values in [0, 1]; feature maps are shown as channel means."""
    from PIL import Image

    x = images.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        x = x.abs().mean(dim=1, keepdim=True)
        x = x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    x = x.clamp(0, 1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    canvas = torch.ones(c, rows * (h + 2) + 2, ncol * (w + 2) + 2)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = x[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(path)
    return path


def _ckpt(cfg: DataFreeConfig, name: str) -> Path | None:
    return Path(cfg.checkpoint_dir) / f"{name}.pt" if cfg.checkpoint_dir else None


def _train_cfg(cfg: DataFreeConfig, epochs: int, lr: float) -> TrainConfig:
    # Adam without weight decay, as GAN generators and data-free students are trained.
    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=lr, optimizer="adam", weight_decay=0.0,
                       schedule="cosine", seed=cfg.seed, device=cfg.device)


# --------------------------------------------------------------------------- stages
class _GenStage(nn.Module):
    """What ``fit`` trains and checkpoints in a generator stage: the generator and every filter."""

    def __init__(self, generator: GroupStackGenerator, filters: nn.ModuleList):
        super().__init__()
        self.generator, self.filters = generator, filters


def build_generator(cfg: DataFreeConfig, teachers: Sequence[nn.Module]) -> tuple[GroupStackGenerator, nn.ModuleList]:
    """The generator shaped after the first teacher, and filters[j][m] for every feature stage j and teacher m."""
    entries = [_entry_shapes(t, cfg.in_shape) for t in teachers]
    depth = {len(e) for e in entries}
    if len(depth) != 1:
        raise ValueError(f"teachers must have the same number of blocks, got {sorted(depth)}")
    n_blocks = depth.pop()
    for e in entries[1:]:
        if [s[1:] for s in e] != [s[1:] for s in entries[0]]:
            raise ValueError("teachers' feature maps must have the same spatial sizes block by block")
    # Stage j (1-based) enters the teachers at block n_blocks - j; the last stage is the image.
    shapes = [entries[0][n_blocks - j] for j in range(1, n_blocks + 1)]
    n_labels = len(label_union(cfg.teachers)[0]) if cfg.label_rate > 0 else 0
    gen = GroupStackGenerator(cfg.latent, shapes, n_labels, cfg.label_rate)
    filters = nn.ModuleList(
        nn.ModuleList(FeatureFilter(shapes[j][0], entries[m][n_blocks - 1 - j][0]) for m in range(len(teachers)))
        for j in range(n_blocks - 1))
    return gen, filters


def generator_loss(gen: GroupStackGenerator, filters: nn.ModuleList, teachers: Sequence[nn.Module], z: Tensor,
                   stages: int, cfg: DataFreeConfig, *, intermediate: bool = True,
                   y: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The group-stack loss of generator stages 1..``stages`` over every teacher.

    With ``intermediate=False`` only the deepest stage is judged and by the DAFL terms
    alone (one-hot, activation, entropy): the single-generator baseline. With ``y`` (a
    label-conditioned generator's targets over :func:`label_union`'s labels) the one-hot
    term is each teacher's BCE to its part of ``y`` instead of to its own thresholded outputs.
    """
    n_blocks, half = len(gen.blocks), len(z) // 2
    seek = cfg.w_modeseek > 0 and stages == n_blocks and half > 0
    if seek and y is not None:
        y = torch.cat([y[:half], y[:half], y[2 * half:]])  # pairs: image i and i + half share a target
    outs = gen(z, stages, y)
    cols = label_union(cfg.teachers)[1] if y is not None else None
    total = z.new_zeros(())
    parts = {"onehot": 0.0, "act": 0.0, "ent": 0.0, "sparse": 0.0, "cons": 0.0}
    if seek:
        x = outs[-1]
        ms = (x[:half] - x[half:2 * half]).abs().mean() / (z[:half] - z[half:2 * half]).abs().mean().clamp_min(1e-8)
        total = total - cfg.w_modeseek * ms
        parts["modeseek"] = ms.item()
    judged = range(1, stages + 1) if intermediate else [stages]
    for m, teacher in enumerate(teachers):
        logits_by_stage = {}
        for j in judged:
            h = outs[j - 1]
            if j < n_blocks:
                h = filters[j - 1][m](h)
            if intermediate and cfg.w_bn > 0:
                feats, logits, bn = bn_statistics_loss(teacher, h, n_blocks - j)
                parts["bn"] = parts.get("bn", 0.0) + bn.item()
            else:
                (feats, logits), bn = run_teacher(teacher, h, n_blocks - j), 0.0
            logits_by_stage[j] = logits
            oh = one_hot_loss(logits, cfg.threshold, None if y is None else y[:, cols[m]])
            act, ent = activation_loss(feats), entropy_loss(logits)
            loss = cfg.w_onehot * oh + cfg.w_activation * act + cfg.w_entropy * ent + cfg.w_bn * bn
            parts["onehot"] += oh.item()
            parts["act"] += act.item()
            parts["ent"] += ent.item()
            if intermediate:
                sp = sparsity_loss(logits)
                loss = loss + cfg.w_sparsity * sp
                parts["sparse"] += sp.item()
            total = total + loss
        if intermediate:
            for j in judged:
                if j < stages:
                    c = consistency_loss(logits_by_stage[j], logits_by_stage[stages])
                    total = total + cfg.w_consistency * c
                    parts["cons"] += c.item()
    return total, parts


def train_generator(cfg: DataFreeConfig, teachers: Sequence[nn.Module], device: torch.device, *,
                    phase: PhaseFn | None = None, should_cancel: Callable[[], bool] | None = None,
                    grids: list[Path] | None = None, history: dict | None = None) -> GroupStackGenerator:
    gen, filters = build_generator(cfg, teachers)
    holder = _GenStage(gen, filters)
    n_blocks = len(gen.blocks)
    image_epochs = cfg.gen_epochs if cfg.image_epochs is None else cfg.image_epochs
    if cfg.variant == "single_generator":
        plan = [(n_blocks, cfg.gen_epochs * (n_blocks - 1) + image_epochs, False, "generator")]
    else:
        plan = [(k, cfg.gen_epochs if k < n_blocks else image_epochs, True, f"generator_stage{k}")
                for k in range(1, n_blocks + 1)]
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed + 7)
    grid_z, grid_y = gen.draw(32)  # the same images shown after every stage
    torch.random.set_rng_state(state)
    for stages, epochs, intermediate, name in plan:
        def step(batch, stages=stages, intermediate=intermediate):
            z, y = gen.draw(len(batch[0]), device)
            return generator_loss(gen, filters, teachers, z, stages, cfg, intermediate=intermediate, y=y)

        hist = fit(holder, _sampler_data(cfg.gen_samples), step, _train_cfg(cfg, epochs, cfg.gen_lr),
                   progress=phase(name) if phase else None, should_cancel=should_cancel, checkpoint=_ckpt(cfg, name))
        if history is not None:
            history[name] = hist.epochs
        if cfg.grid_dir and grids is not None:
            gen.eval()
            with torch.no_grad():
                shown = gen(grid_z.to(device), stages, None if grid_y is None else grid_y.to(device))[-1]
            grids.append(save_grid(shown, Path(cfg.grid_dir) / f"grid_{name}.png"))
    gen.eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    return gen


def build_student(cfg: DataFreeConfig, teachers: Sequence[nn.Module]) -> tuple[nn.ModuleList, nn.ModuleList, list[list[int]], list[int]]:
    """Student blocks (a MultiLabelNet's), filters[b][m] from student block b into teacher m's block b output."""
    from .multilabel import MultiLabelNet

    seed_net = MultiLabelNet(cfg.in_shape[0], len(cfg.target), widths=cfg.student_widths)
    blocks = seed_net.blocks
    if len(blocks) != len(teachers[0].blocks):
        raise ValueError(f"the student needs as many blocks as the teachers ({len(teachers[0].blocks)}), "
                         f"got student_widths={cfg.student_widths}")
    s_shapes = _output_shapes(seed_net, cfg.in_shape)
    t_shapes = [_output_shapes(t, cfg.in_shape) for t in teachers]
    for m, ts in enumerate(t_shapes):
        if [s[1:] for s in ts] != [s[1:] for s in s_shapes]:
            raise ValueError(f"student and teacher {m} feature maps differ in size: {s_shapes} vs {ts}")
    filters = nn.ModuleList(nn.ModuleList(FeatureFilter(s_shapes[b][0], t_shapes[m][b][0]) for m in range(len(teachers)))
                            for b in range(len(blocks)))
    cols, order = label_plan(cfg.teachers, cfg.target)
    return blocks, filters, cols, order


def regroup(blocks: nn.ModuleList, filters: nn.ModuleList, teachers: Sequence[nn.Module], cols: list[list[int]],
            order: list[int], target: Sequence[int]) -> MultiBranchStudent:
    """One multi-branch network: the blocks, then per contributing teacher its last filter and a copy of its head."""
    branches = []
    for m, idx in enumerate(cols):
        if idx:
            head = copy.deepcopy(teachers[m].head)
            for p in head.parameters():
                p.requires_grad_(True)
            branches.append(Branch(filters[-1][m], head, idx))
    return MultiBranchStudent(blocks, branches, order, target)


def new_student(cfg: DataFreeConfig, teachers: Sequence[nn.Module]) -> MultiBranchStudent:
    """The student architecture before any training (the baselines' starting point)."""
    blocks, filters, cols, order = build_student(cfg, teachers)
    return regroup(blocks, filters, teachers, cols, order, cfg.target)


def _targets(teachers: Sequence[nn.Module], cols: list[list[int]], order: list[int], x: Tensor) -> Tensor:
    """The teachers' logits on the target labels, in target order."""
    with torch.no_grad():
        outs = [t(x).index_select(1, torch.as_tensor(c, device=x.device)) for t, c in zip(teachers, cols) if c]
        return torch.cat(outs, 1).index_select(1, torch.as_tensor(order, device=x.device))


def distill_student(student: MultiBranchStudent, teachers: Sequence[nn.Module], cfg: DataFreeConfig,
                    source: Tensor | Callable[[int], Tensor], *, epochs: int, name: str = "finetune",
                    phase: PhaseFn | None = None, should_cancel: Callable[[], bool] | None = None) -> list[dict]:
    """Train ``student`` end to end to the teachers' target-label probabilities on ``source``.

    ``source`` is a tensor of images (real ones, for the data-driven bound) or a function
    drawing ``n`` fresh images (noise, a generator).
    """
    cols, order = label_plan(cfg.teachers, cfg.target)
    if isinstance(source, Tensor):
        data = TensorDataset(source)

        def images(batch):
            return batch[0]
    else:
        data = _sampler_data(cfg.student_samples)

        def images(batch):
            return source(len(batch[0]))

    def step(batch):
        x = images(batch)
        return soft_bce(student(x), _targets(teachers, cols, order, x))

    hist = fit(student, data, step, _train_cfg(cfg, epochs, cfg.student_lr),
               progress=phase(name) if phase else None, should_cancel=should_cancel, checkpoint=_ckpt(cfg, name))
    return hist.epochs


class _BlockStage(nn.Module):
    """What ``fit`` checkpoints in a student stage: all student blocks and that stage's filters."""

    def __init__(self, blocks: nn.ModuleList, filters: nn.ModuleList):
        super().__init__()
        self.blocks, self.filters = blocks, filters


def _dual_step(blocks: nn.ModuleList, filters: nn.ModuleList, teachers: Sequence[nn.Module], cols: list[list[int]],
               b: int, sample: Callable[[int], Tensor]):
    """Step of student block ``b``: its output → filter → the rest of teacher m ≈ teacher m on m's target labels."""
    index = [torch.as_tensor(c, dtype=torch.long) for c in cols]

    def step(batch):
        x = sample(len(batch[0]))
        with torch.no_grad():
            wanted = [t(x) if c else None for t, c in zip(teachers, cols)]
            h = x
            for blk in blocks[:b]:  # earlier blocks are done: fixed, BN statistics included
                blk.eval()
                h = blk(h)
        h = blocks[b](h)
        loss, metrics = h.new_zeros(()), {}
        for m, c in enumerate(cols):
            if not c:
                continue  # the task-level filter: a teacher holding no target label teaches nothing
            ix = index[m].to(h.device)
            _, out = run_teacher(teachers[m], filters[b][m](h), b + 1)
            part = soft_bce(out.index_select(1, ix), wanted[m].index_select(1, ix))
            metrics[f"bce_t{m}"] = part.item()
            loss = loss + part
        return loss, metrics

    return step


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; the gradient comes back multiplied by ``-scale`` (the generator ascends what the student descends)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


class _AdvStage(nn.Module):
    """What ``fit`` trains and checkpoints in the adversarial fine-tune: the student and the generator."""

    def __init__(self, student: MultiBranchStudent, generator: GroupStackGenerator):
        super().__init__()
        self.student, self.generator = student, generator


def adversarial_finetune(student: MultiBranchStudent, gen: GroupStackGenerator, teachers: Sequence[nn.Module],
                         cfg: DataFreeConfig, *, epochs: int, name: str = "student_finetune",
                         phase: PhaseFn | None = None, should_cancel: Callable[[], bool] | None = None) -> list[dict]:
    """The student's end-to-end fine-tune with the generator trained against it (``cfg.w_adv`` > 0).

    One loss, one optimizer: the student minimises its BCE to the teachers' probabilities on
    fresh generated images; the generator gets the reversed gradient of that BCE through the
    student (scaled by ``w_adv``), plus the teachers' one-hot and BN-prior terms on the image,
    so that it seeks images the student gets wrong without leaving what the teachers recognise.
    """
    cols, order = label_plan(cfg.teachers, cfg.target)
    union_cols = label_union(cfg.teachers)[1]
    for p in gen.parameters():
        p.requires_grad_(True)

    def step(batch):
        z, y = gen.draw(len(batch[0]), batch[0].device)
        x = augment(gen(z, y=y)[-1], cfg)
        gen_loss, picked = x.new_zeros(()), []
        for m, t in enumerate(teachers):
            _, logits, bn = bn_statistics_loss(t, x, 0) if cfg.w_bn > 0 else (*run_teacher(t, x, 0), 0.0)
            oh = one_hot_loss(logits, cfg.threshold, None if y is None else y[:, union_cols[m]])
            gen_loss = gen_loss + cfg.w_onehot * oh + cfg.w_bn * bn
            if cols[m]:
                picked.append(logits.detach().index_select(1, torch.as_tensor(cols[m], device=x.device)))
        wanted = torch.cat(picked, 1).index_select(1, torch.as_tensor(order, device=x.device))
        kd = soft_bce(student(_ReverseGrad.apply(x, cfg.w_adv)), wanted)
        return kd + gen_loss, {"kd": kd.item(), "gen": gen_loss.item()}

    hist = fit(_AdvStage(student, gen), _sampler_data(cfg.student_samples), step,
               _train_cfg(cfg, epochs, cfg.student_lr), progress=phase(name) if phase else None,
               should_cancel=should_cancel, checkpoint=_ckpt(cfg, name))
    gen.eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    return hist.epochs


def train_dual(cfg: DataFreeConfig, teachers: Sequence[nn.Module], sample: Callable[[int], Tensor], *,
               phase: PhaseFn | None = None, should_cancel: Callable[[], bool] | None = None,
               history: dict | None = None, generator: GroupStackGenerator | None = None) -> MultiBranchStudent:
    """The dual generator: block by block through the teachers' remaining blocks, then regrouped and fine-tuned."""
    device = pick_device(cfg.device)
    blocks, filters, cols, order = build_student(cfg, teachers)
    blocks.to(device)
    filters.to(device)
    for b in range(len(blocks)):
        name = f"student_block{b + 1}"
        hist = fit(_BlockStage(blocks, filters[b]), _sampler_data(cfg.student_samples),
                   _dual_step(blocks, filters, teachers, cols, b, sample),
                   _train_cfg(cfg, cfg.block_epochs, cfg.student_lr),
                   params=list(blocks[b].parameters()) + list(filters[b].parameters()),
                   progress=phase(name) if phase else None, should_cancel=should_cancel, checkpoint=_ckpt(cfg, name))
        if history is not None:
            history[name] = hist.epochs
    student = regroup(blocks, filters, teachers, cols, order, cfg.target)
    if cfg.w_adv > 0 and generator is not None:
        ft = adversarial_finetune(student, generator, teachers, cfg, epochs=cfg.finetune_epochs, phase=phase,
                                  should_cancel=should_cancel)
    else:
        ft = distill_student(student, teachers, cfg, sample, epochs=cfg.finetune_epochs, name="student_finetune",
                             phase=phase, should_cancel=should_cancel)
    if history is not None:
        history["student_finetune"] = ft
    return student.eval()


# --------------------------------------------------------------------------- the recipe
def datafree(cfg: DataFreeConfig, *, phase: PhaseFn | None = None,
             should_cancel: Callable[[], bool] | None = None) -> DataFreeResult:
    """Amalgamate the teachers into one student for ``cfg.target`` from their weights alone.

    ``phase(name)`` gives the progress callback of each stage (generator stages, student
    blocks, fine-tune); ``should_cancel`` stops at the next step (``Cancelled``).
    """
    import time

    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    teachers = _freeze(cfg.teachers, device)
    history: dict[str, list[dict[str, float]]] = {}
    grids: list[Path] = []
    gen = train_generator(cfg, teachers, device, phase=phase, should_cancel=should_cancel, grids=grids,
                          history=history)

    def sample(n: int) -> Tensor:
        with torch.no_grad():
            z, y = gen.draw(n, device)
            return augment(gen(z, y=y)[-1], cfg)

    if cfg.variant == "dual_gan":
        student = train_dual(cfg, teachers, sample, phase=phase, should_cancel=should_cancel, history=history,
                             generator=gen)
    else:  # DAFL: the student learns end to end from the generator's images
        student = new_student(cfg, teachers).to(device)
        history["student"] = distill_student(student, teachers, replace(cfg, finetune_epochs=0), sample,
                                             epochs=cfg.finetune_epochs + cfg.block_epochs * len(student.blocks),
                                             name="student", phase=phase, should_cancel=should_cancel)
    if cfg.grid_dir:
        grids.append(save_grid(gen.sample(32, device), Path(cfg.grid_dir) / "grid_final.png"))
    return DataFreeResult(student=student.eval(), generator=gen, target=[int(t) for t in cfg.target],
                          history=history, grids=grids, seconds=time.perf_counter() - t0)
