"""Nasty Teacher (ICLR 2021): the keyless baseline mode. Nobody can distill, not even the owner.

    L = CE(z, y) − ω·T²·KL(p_a^T ‖ p_z^T)

The disturbance is unbounded, so it is capped (``max_kl``): past the cap the term stops
pushing, which keeps the run finite without changing the method where it matters. A wrap
given a :class:`CheckConfig` checks itself as an SDB wrap does (:mod:`.check`); the
``wrap`` task (``sdb wrap --mode nasty``, the ``wrap`` job) always gives one.
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
from .check import checked_wrap
from .config import CheckConfig, NastyConfig
from .sdb import WrapResult, frozen_and_trainable, public_report, require_finite_network
from .teacher import FiniteWatch


def wrap_nasty(
    teacher: nn.Module,
    data,
    cfg: NastyConfig | None = None,
    *,
    check: CheckConfig | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> WrapResult:
    """Fine-tune ``teacher`` into a keyless Nasty Teacher box.

    ``check=None`` runs the recipe once on all of ``data.train`` and reports on ``data.test``. With a
    :class:`CheckConfig` the wrap holds out part of ``data.train``, adapts ω until the box meets
    ``check.thresholds`` there (no keyed threshold: there is no keyed path) and raises
    :class:`~.check.WrapRefused` when no setting does; the report's ``check`` holds the figures.
    """
    cfg = cfg or NastyConfig()
    if check is not None:
        return checked_wrap(teacher, data, cfg, check, progress=progress, should_cancel=should_cancel, log=log)
    data = data.checked()
    device = pick_device(cfg.train.device)
    frozen, model = frozen_and_trainable(teacher, device, data)
    T = cfg.temperature

    watch = FiniteWatch()

    def step(batch):
        x, y = batch
        z = model(x)
        with torch.no_grad():
            a = frozen(x)
        watch.add(a)
        ce = F.cross_entropy(z, y)
        kl = soft_kl(z, a, T).clamp(max=cfg.max_kl)
        return ce - cfg.omega * kl, {"ce": ce.detach(), "kl": kl.detach()}

    t0 = time.perf_counter()
    try:
        history = fit(model, data.train, step, cfg.train, progress=progress, should_cancel=should_cancel)
    except FloatingPointError:
        watch.check()  # a NaN the teacher's logits made is not a divergence
        raise
    watch.check()
    require_finite_network(model.eval(), data.train.tensors[0])
    box = SafeDistillationBox(model.eval(), None, mode="nasty", temperature=T)
    report = public_report(frozen, box, data.test)
    report.update(mode="nasty", temperature=T, seconds=time.perf_counter() - t0,
                  step_seconds=history.step_seconds, history=history.epochs)
    return WrapResult(box, report)
