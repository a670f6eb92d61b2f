"""The scene tasks of task branching (segmentation, depth, edges): channels, ground truth, losses, metrics.

Shared by the student, its teachers and the labelled baseline of :mod:`sdb_core.amalgamate.branching`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdb_core.amalgamate.config import TASKS  # noqa: F401 (re-exported)
from sdb_core.data.scenes import Scenes, edge_map
from sdb_core.train import device_of

# ---- tasks ---------------------------------------------------------------------------------------

def task_channels(task: str, num_classes: int) -> int:
    return num_classes + 1 if task == "seg" else 1


def task_labels(task: str, scenes: Scenes) -> Tensor:
    """The ground truth of ``task`` (for teachers, the scratch baseline and evaluation only)."""
    if task == "seg":
        return torch.from_numpy(scenes.seg)
    if task == "depth":
        return torch.from_numpy(scenes.depth)[:, None]
    return torch.from_numpy(edge_map(scenes.seg))[:, None]


def label_loss(task: str, out: Tensor, y: Tensor) -> Tensor:
    """Supervised loss of one task's output against its ground truth."""
    if task == "seg":
        return F.cross_entropy(out, y)
    if task == "depth":
        return F.l1_loss(out, y)
    return F.binary_cross_entropy_with_logits(out, y, pos_weight=torch.tensor(4.0, device=out.device))


def teacher_loss(task: str, out: Tensor, teacher_out: Tensor) -> Tensor:
    """The amalgamation loss: the student's output against the teacher's on the same image."""
    if task == "seg":
        return F.cross_entropy(out, teacher_out.argmax(1))
    if task == "depth":
        return F.l1_loss(out, teacher_out)
    return F.binary_cross_entropy_with_logits(out, torch.sigmoid(teacher_out))


# ---- metrics -------------------------------------------------------------------------------------

def miou(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Mean intersection-over-union in percent over the classes present in pred or target."""
    k = num_classes + 1
    conf = torch.bincount((target.reshape(-1) * k + pred.reshape(-1)), minlength=k * k).reshape(k, k).double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float(100.0 * (inter[present] / union[present]).mean())


def depth_errors(pred: Tensor, target: Tensor) -> dict[str, float]:
    diff = pred.double() - target.double()
    return {"rmse": float(diff.pow(2).mean().sqrt()), "abs_rel": float((diff.abs() / target.double()).mean())}


def edge_f1(logits: Tensor, target: Tensor) -> float:
    pred = logits > 0
    tgt = target > 0.5
    tp = (pred & tgt).sum().item()
    precision, recall = tp / max(pred.sum().item(), 1), tp / max(tgt.sum().item(), 1)
    return 100.0 * 2 * precision * recall / max(precision + recall, 1e-12)


@torch.no_grad()
def predict_tasks(model: nn.Module, images: Tensor, batch_size: int = 100) -> dict[str, Tensor]:
    """Every task's outputs on ``images`` (eval mode, the model where it lives), on the images' device."""
    model.eval()
    device = device_of(model)
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, len(images), batch_size):
        for t, out in model.forward_tasks(images[i:i + batch_size].to(device)).items():
            parts.setdefault(t, []).append(out.float().to(images.device))
    return {t: torch.cat(v) for t, v in parts.items()}


def evaluate(model: nn.Module, scenes: Scenes, num_classes: int) -> dict[str, float]:
    """Metrics of every task ``model.forward_tasks`` returns, against the scenes' exact labels."""
    out = predict_tasks(model, torch.from_numpy(scenes.images))
    metrics: dict[str, float] = {}
    if "seg" in out:
        metrics["miou"] = miou(out["seg"].argmax(1), task_labels("seg", scenes), num_classes)
    if "depth" in out:
        metrics.update(depth_errors(out["depth"], task_labels("depth", scenes)))
    if "edges" in out:
        metrics["edge_f1"] = edge_f1(out["edges"], task_labels("edges", scenes))
    return metrics
