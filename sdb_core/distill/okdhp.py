"""OKDHP: one-stage online knowledge distillation for pose (Li et al., ICCV 2021, arXiv 2108.02092).

A multi-branch hourglass shares its stem and first stacks; every branch predicts heatmaps, the
Feature Aggregation Unit weights the branches' final heatmaps per joint into an ensemble, and the
ensemble teaches every branch back through a pixel-wise KL. One branch is then deployed alone.

    L = Σ_branches Σ_stacks MSE_w(H, Y) + Σ_shared MSE_w(H, Y) + w_ens·MSE_w(E, Y)
        + w_kd·r(t)·Σ_branches Σ_stacks KL_pix(E ‖ H)

MSE_w is the visibility-weighted heatmap MSE, KL_pix the KL between the softmax over the h×w pixels
of each joint map, summed over pixels and joints and divided by batch·h·w, and r the ramp-up
exp(−5(1 − t/L)²) with t in epochs and L = ``rampup``·epochs, as in the authors' code (Adam 2.5e-4,
w_kd 2, w_ens 1, L 60 of 140 epochs). Unlike that code the ensemble is detached in the KL term by
default: it is the teacher and has its own supervised term, so the students do not pull it towards them.

Also here, trained through the same loop: a single network alone (the baseline, and the teacher of
the two-stage baseline) and two-stage KD from a larger pre-trained teacher (FPD, Zhang et al. 2019:
α·MSE to the teacher's heatmaps + (1 − α)·MSE to the targets).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdb_core.data.pose import PoseData
from sdb_core.models.hourglass import MultiBranchHourglass, StackedHourglass
from sdb_core.progress import Progress
from sdb_core.train import History, TrainConfig, device_of, fit, seed_everything

from .okdhp_config import OKDHPConfig, PoseDataConfig, pose_train_config  # noqa: F401 (re-exported)
from .pose_metrics import evaluate, evaluate_heatmaps, predict_heatmaps

ProgressFn = Callable[[Progress], None] | None


@dataclass
class OKDHPResult:
    model: MultiBranchHourglass
    target: StackedHourglass                  # the deployed branch alone
    metrics: dict[str, float]                 # target pck/ap, ensemble_*, mean_ensemble_*, branch{b}_pck
    history: History
    seconds: float
    gflops: float
    data: PoseData = field(repr=False)


# ---------------------------------------------------------------- losses

def heatmap_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """0.5·mean of the squared error over joints and pixels, each joint map weighted by ``weight`` (B, J)."""
    w = weight[:, :, None, None]
    return 0.5 * ((pred - target) * w).pow(2).mean()


def pixel_kl(student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) over the h×w pixels of each joint map, summed over pixels
    and joints, divided by batch·h·w; joint maps with weight 0 do not count."""
    b, j, h, w = student.shape
    log_s = F.log_softmax(student.reshape(b, j, h * w), dim=-1)
    log_t = F.log_softmax(teacher.reshape(b, j, h * w), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, J)
    if weight is not None:
        kl = kl * (weight > 0)
    return kl.sum() / (b * h * w)


def rampup(epoch: float, length: float) -> float:
    """exp(−5(1 − t/L)²), from 0.0067 at t = 0 to 1 at t ≥ L (Laine & Aila's consistency ramp-up)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


# ---------------------------------------------------------------- helpers

@torch.no_grad()
def count_gflops(model: nn.Module, in_shape: Sequence[int]) -> float:
    """Multiply-adds (in G, the pose papers' 'GFLOPs') of one forward pass on one input, counted over
    every Conv2d and Linear with forward hooks."""
    macs = [0]

    def conv(m: nn.Conv2d, _inp, out: Tensor) -> None:
        macs[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def lin(m: nn.Linear, _inp, out: Tensor) -> None:
        macs[0] += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else lin)
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was = model.training
    model.eval()
    device = device_of(model)
    try:
        model(torch.zeros(1, *in_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return macs[0] / 1e9


def _epoch_counter(n_items: int, batch_size: int) -> Callable[[], float]:
    """Epochs done so far (fractional), advanced once per call: the step function's clock for the ramp-up."""
    steps = max(math.ceil(n_items / batch_size), 1)
    state = [0]

    def tick() -> float:
        e = state[0] / steps
        state[0] += 1
        return e

    return tick


# ---------------------------------------------------------------- single network (baseline, teacher, FPD)

def train_single(model: StackedHourglass, data: PoseData, cfg: TrainConfig, *,
                 teacher: nn.Module | None = None, alpha: float = 0.5, progress: ProgressFn = None,
                 should_cancel: Callable[[], bool] | None = None) -> History:
    """Every stack's heatmaps to the targets (MSE_w); with ``teacher``: α·MSE to the teacher's final
    heatmaps + (1 − α)·MSE to the targets (FPD), the teacher frozen in eval mode. The teacher runs where it
    lives (a pre-trained one on the CPU teaches a student trained on ``cfg.device``), its maps come back."""
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    def step(batch):
        x, y, w = batch
        heats = model.forward_all(x)
        gt = sum(heatmap_mse(h, y, w) for h in heats)
        if teacher is None:
            return gt
        with torch.no_grad():
            t = teacher(x.to(device_of(teacher))).to(x.device)
        # The teacher's maps are a target for every joint: an unlabelled joint still has a teacher guess.
        kd = sum(heatmap_mse(h, t, torch.ones_like(w)) for h in heats)
        return alpha * kd + (1 - alpha) * gt, {"gt": gt.detach(), "kd": kd.detach()}

    return fit(model, data.train, step, cfg, progress=progress, should_cancel=should_cancel)


@dataclass
class SingleResult:
    model: StackedHourglass
    metrics: dict[str, float]
    seconds: float           # training time, including the teacher's for two-stage KD
    gflops: float
    history: History
    teacher_metrics: dict[str, float] | None = None


def baseline(cfg: OKDHPConfig, data: PoseData | None = None, progress: ProgressFn = None) -> SingleResult:
    """The target architecture trained alone."""
    data = data or cfg.data.load()
    seed_everything(cfg.train.seed)
    model = StackedHourglass(17, cfg.width, cfg.target_stacks, data.in_shape)
    t0 = time.perf_counter()
    hist = train_single(model, data, cfg.train, progress=progress)
    secs = time.perf_counter() - t0
    return SingleResult(model, evaluate(model, data.test, data.test_ann_file), secs,
                        count_gflops(model, data.in_shape), hist)


def two_stage(cfg: OKDHPConfig, data: PoseData | None = None, *, teacher_width: int = 64, teacher_stacks: int = 4,
              alpha: float = 0.5, progress: ProgressFn = None) -> SingleResult:
    """FPD: a larger teacher trained first, then the target architecture distilled from it."""
    data = data or cfg.data.load()
    seed_everything(cfg.train.seed)
    teacher = StackedHourglass(17, teacher_width, teacher_stacks, data.in_shape)
    t0 = time.perf_counter()
    train_single(teacher, data, cfg.train, progress=progress)
    teacher_metrics = evaluate(teacher, data.test, data.test_ann_file)
    seed_everything(cfg.train.seed)
    student = StackedHourglass(17, cfg.width, cfg.target_stacks, data.in_shape)
    hist = train_single(student, data, cfg.train, teacher=teacher, alpha=alpha, progress=progress)
    secs = time.perf_counter() - t0
    return SingleResult(student, evaluate(student, data.test, data.test_ann_file), secs,
                        count_gflops(student, data.in_shape), hist, teacher_metrics)


# ---------------------------------------------------------------- the recipe

def okdhp_loss(model: MultiBranchHourglass, batch, cfg: OKDHPConfig, ramp: float) -> tuple[Tensor, dict]:
    """One step's loss (the module docstring's L) at ramp-up value ``ramp``, and its parts for the log."""
    x, y, w = batch
    shared, outs, ens, _ = model.forward_all(x)
    hard = sum(heatmap_mse(h, y, w) for h in shared) + sum(heatmap_mse(h, y, w) for o in outs for h in o)
    teacher = ens.detach() if cfg.detach_ensemble else ens
    soft = sum(pixel_kl(h, teacher, w) for o in outs for h in o)
    ens_loss = heatmap_mse(ens, y, w)
    loss = hard + cfg.w_ens * ens_loss + cfg.w_kd * ramp * soft
    return loss, {"hard": hard.detach(), "ens": ens_loss.detach(), "kd": soft.detach(), "ramp": ramp}


def okdhp(cfg: OKDHPConfig, data: PoseData | None = None, *, progress: ProgressFn = None,
          should_cancel: Callable[[], bool] | None = None) -> OKDHPResult:
    """Train the multi-branch network online; report the target branch, the ensemble and each branch.
    The networks are trained on ``cfg.train.device`` and handed back there."""
    data = data or cfg.data.load()
    seed_everything(cfg.train.seed)
    model = MultiBranchHourglass(17, cfg.width, cfg.shared_stacks, cfg.branch_stacks, data.in_shape,
                                 ensemble=cfg.ensemble)
    clock = _epoch_counter(len(data.train), cfg.train.batch_size)
    ramp_len = cfg.rampup * cfg.train.epochs

    def step(batch):
        return okdhp_loss(model, batch, cfg, rampup(clock(), ramp_len))

    t0 = time.perf_counter()
    hist = fit(model, data.train, step, cfg.train, progress=progress, should_cancel=should_cancel)
    secs = time.perf_counter() - t0
    target = model.branch(cfg.target_branch).eval()
    metrics = branch_metrics(model, data, cfg.target_branch)
    return OKDHPResult(model, target, metrics, hist, secs, count_gflops(target, data.in_shape), data)


@torch.no_grad()
def branch_metrics(model: MultiBranchHourglass, data: PoseData, target_branch: int = 0) -> dict[str, float]:
    """PCK/AP of the target branch, the model's ensemble and the plain mean of the branches; PCK per branch."""
    model.eval()
    test = data.test
    device = device_of(model)
    finals, ens = [], []
    for i in range(0, len(test), 128):
        _, outs, e, _ = model.forward_all(test.images[i:i + 128].to(device))
        finals.append(torch.stack([o[-1] for o in outs], 1).cpu())
        ens.append(e.cpu())
    finals_t, ens_t = torch.cat(finals), torch.cat(ens)
    m: dict[str, float] = {}
    for k, v in evaluate_heatmaps(finals_t[:, target_branch], test, data.test_ann_file).items():
        m[k] = v
    for k, v in evaluate_heatmaps(ens_t, test, data.test_ann_file).items():
        m[f"ensemble_{k}"] = v
    for k, v in evaluate_heatmaps(finals_t.mean(1), test, data.test_ann_file).items():
        m[f"mean_ensemble_{k}"] = v
    for b in range(finals_t.shape[1]):
        m[f"branch{b}_pck"] = evaluate_heatmaps(finals_t[:, b], test)["pck"]
    return m


def predict_keypoints(model: nn.Module, data_split, stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (N, J, 2) in crop pixels and scores (N, J) of a network over a split."""
    from .pose_metrics import decode_heatmaps

    return decode_heatmaps(predict_heatmaps(model, data_split), stride)


def pose_bundle_meta(data: PoseData) -> dict:
    """What a pose bundle's meta carries beyond the input: joint names, skeleton, stride, flip pairs."""
    from sdb_core.data.pose import FLIP_PAIRS, KEYPOINTS, SKELETON

    return {"pose": {"joints": KEYPOINTS, "skeleton": SKELETON, "flip_pairs": [list(p) for p in FLIP_PAIRS],
                     "stride": data.train.stride, "input_size": data.train.input_size,
                     "heatmap_size": data.train.heatmap_size}}


def export_pose_bundle(target: nn.Module, data: PoseData, out: str | Path, *, name: str, version: str = "1",
                       metrics: dict | None = None) -> Path:
    """The deployed branch alone as a plain (no key) bundle of task ``pose``: input a normalised crop,
    output heatmaps (B, J, h, w); joint names and stride in the meta."""
    from sdb_core.bundle import export_bundle
    from sdb_core.data.pose import KEYPOINTS

    return export_bundle(target.eval(), out, name=name, version=version, in_shape=data.in_shape,
                         mean=data.train.mean, std=data.train.std, labels=KEYPOINTS, master_key=None,
                         task="pose", metrics=metrics or {}, extra=pose_bundle_meta(data))
