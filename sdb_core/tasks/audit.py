"""The ``audit`` task: attack a model's public outputs (a bundle's public path or a plain model) and measure the leak."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..progress import Hooks
from ..protect.config import AuditConfig
from .refs import ModelRef, class_order, image_size_for


@dataclass(frozen=True)
class AuditTask:
    data: str  # the attacker's transfer images and the test split
    target: ModelRef  # a bundle (its public path; no master key is ever used) or arch + weights
    audit: AuditConfig = field(default_factory=AuditConfig)
    threads: int = 0  # torch and ONNX Runtime threads (0: their defaults)

    def __post_init__(self) -> None:
        if self.target.kind not in ("bundle", "weights"):
            raise ValueError(f"audit needs a bundle or a plain model's weights, got {self.target.describe()}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: the defaults), got {self.threads}")


@dataclass
class AuditOutcome:
    report: object  # sdb_core.protect.audit.AuditReport
    paths: dict[str, Path]  # report.json, table.txt, advantages.png under ``out``


def load_target(ref: ModelRef, data, threads: int = 0):
    """What the attacker queries: a bundle loaded without its key, or a plain network; its input must be the data's."""
    if ref.kind == "weights":
        return ref.classifier(data, "target")
    from ..bundle import load_bundle, ort_options

    target = load_bundle(ref.bundle, session_options=ort_options(threads))
    if list(target.meta["input"]["shape"]) != list(data.in_shape):
        raise ValueError(f"{ref.describe()}: input shape {target.meta['input']['shape']} does not match "
                         f"{data.name}'s {list(data.in_shape)}")
    classes = len(target.meta.get("labels") or [])
    if classes and classes != data.num_classes:  # its answers cannot be scored against this set's labels
        raise ValueError(f"{ref.describe()} answers {classes} classes; the data set {data.name!r} has "
                         f"{data.num_classes}: audit it on a data set of its own classes")
    order = class_order(target.meta.get("labels"), data, ref.describe())
    if order is not None:  # its public outputs over the set's classes, in the set's order (as an attacker reads them)
        from ..protect.attacks import PublicAPI, public_api

        api = public_api(target)
        return PublicAPI(lambda x: api._probs(x)[:, order], "probs", 3, api.lam, api.name)
    return target


def run(cfg: AuditTask, out: str | os.PathLike, hooks: Hooks | None = None) -> AuditOutcome:
    """Run every attack family of ``cfg.audit`` on the public outputs; write the report, table and chart to ``out``."""
    import torch

    from ..data import load_dataset
    from ..outputs import out_dir
    from ..protect.audit import audit

    out_dir(out)  # before any work: a path it cannot write is refused now
    hooks = hooks or Hooks()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.data, image_size=image_size_for(cfg.data, cfg.target))
    a = cfg.audit
    if a.transfer_n > len(data.train):  # the attacker's transfer set is drawn from the train split
        raise ValueError(f"transfer asks for {a.transfer_n} images; the train split of {data.name} has "
                         f"{len(data.train)}: ask for at most that many")
    target = load_target(cfg.target, data, cfg.threads)
    hooks.log(f"auditing {cfg.target.describe()} on {cfg.data} under policy {a.policy}: N={a.transfer_n}, "
              f"{a.student} students")
    report = audit(target, data, a, progress=hooks.phase("audit"), should_cancel=hooks.should_cancel, log=hooks.log)
    return AuditOutcome(report, report.save(out))
