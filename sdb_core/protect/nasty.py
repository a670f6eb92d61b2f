"""Nasty Teacher (ICLR 2021): the keyless baseline mode. Nobody can distill, not even the owner.

    L = CE(z, y) − ω·T²·KL(p_a^T ‖ p_z^T)

The disturbance is unbounded, so it is capped (``max_kl``): past the cap the term stops
pushing, which keeps the run finite without changing the method where it matters.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..distill.losses import soft_kl
from ..train import Progress, fit, pick_device
from .box import SafeDistillationBox
from .config import NastyConfig
from .sdb import WrapResult, frozen_and_trainable, public_report


def wrap_nasty(
    teacher: nn.Module,
    data,
    cfg: NastyConfig | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> WrapResult:
    cfg = cfg or NastyConfig()
    device = pick_device(cfg.train.device)
    frozen, model = frozen_and_trainable(teacher, device)
    T = cfg.temperature

    def step(batch):
        x, y = batch
        z = model(x)
        with torch.no_grad():
            a = frozen(x)
        ce = F.cross_entropy(z, y)
        kl = soft_kl(z, a, T).clamp(max=cfg.max_kl)
        return ce - cfg.omega * kl, {"ce": ce.item(), "kl": kl.item()}

    t0 = time.perf_counter()
    history = fit(model, data.train, step, cfg.train, progress=progress, should_cancel=should_cancel)
    box = SafeDistillationBox(model.eval(), None, mode="nasty", temperature=T)
    report = public_report(frozen, box, data.test)
    report.update(mode="nasty", temperature=T, seconds=time.perf_counter() - t0,
                  step_seconds=history.step_seconds, history=history.epochs)
    return WrapResult(box, report)
