"""The distiller: train a student from any teacher callable.

A teacher is anything that maps an input batch to logits: an ``nn.Module``, a box's
keyed path (``box.distill_logits``), a public probability API wrapped by
``probs_to_logits``, or a remote endpoint. With no teacher it is the hard-label baseline.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..train import History, Progress, device_of, evaluating, fit, predict_logits
from .config import DistillConfig
from .losses import kd_loss

Teacher = Callable[[Tensor], Tensor]


@dataclass
class DistillResult:
    student: nn.Module
    history: History


def as_teacher(teacher: nn.Module | Teacher) -> Teacher:
    """A module becomes a frozen callable that runs it in eval mode, each module left in the mode the owner gave it
    in between (as :func:`~sdb_core.train.predict_logits` leaves it); any other callable is used as given."""
    if isinstance(teacher, nn.Module):
        @torch.no_grad()
        def call(x: Tensor) -> Tensor:
            device = device_of(teacher)
            # a copy: a forward that writes into its input (x.sub_(m)) would change the student's transfer set,
            # of which x is often a view
            with evaluating(teacher):
                return teacher(x.to(device, copy=True))

        return call
    return teacher


def distill(
    student: nn.Module,
    transfer: TensorDataset,
    teacher: nn.Module | Teacher | None,
    cfg: DistillConfig | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> DistillResult:
    """Train ``student`` on ``transfer`` (x, y) from ``teacher``; ``None`` means labels only."""
    cfg = cfg or DistillConfig()
    x, y = transfer.tensors[0], transfer.tensors[1]

    if teacher is None:
        def step(batch):
            xb, yb = batch
            return F.cross_entropy(student(xb), yb, label_smoothing=cfg.label_smoothing)

        history = fit(student, TensorDataset(x, y), step, cfg.train, progress=progress,
                      should_cancel=should_cancel)
        return DistillResult(student, history)

    call = as_teacher(teacher)
    labels_or_none = (lambda yb: yb) if cfg.use_labels else (lambda yb: None)

    if cfg.cache_teacher:
        with torch.no_grad():
            t_logits = predict_logits(call, x)

        def step(batch):
            xb, yb, tb = batch
            return kd_loss(student(xb), tb, labels_or_none(yb), cfg.temperature, cfg.alpha, cfg.label_smoothing)

        data = TensorDataset(x, y, t_logits)
    else:
        def step(batch):
            xb, yb = batch
            with torch.no_grad():
                tb = torch.as_tensor(call(xb)).to(xb.device).float()
            return kd_loss(student(xb), tb, labels_or_none(yb), cfg.temperature, cfg.alpha, cfg.label_smoothing)

        data = TensorDataset(x, y)
    history = fit(student, data, step, cfg.train, progress=progress, should_cancel=should_cancel)
    return DistillResult(student, history)
