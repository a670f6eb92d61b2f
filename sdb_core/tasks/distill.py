"""The ``distill`` task: a student from a teacher (plain weights, a bundle's keyed path or public outputs, any
callable) or from labels alone, on a named data set."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..distill.config import DistillConfig
from ..progress import Hooks
from .refs import ModelRef, class_order, image_size_for


@dataclass(frozen=True)
class DistillTask:
    student: str  # its zoo architecture
    data: str
    teacher: ModelRef | None = None  # None: labels only (or a callable passed to ``run``)
    keyed: bool = False  # a bundle teacher: its keyed path (needs the master key), else its public outputs
    transfer: int = 0  # transfer-set size drawn from the train split; 0: all of it
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0

    @classmethod
    def from_options(cls, student: str, data: str, *, temperature: float | None = None, alpha: float | None = None,
                     epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
                     **task) -> DistillTask:
        """The task from the flat options the CLI's flags and the job's params share; ``None`` keeps a default
        (``epochs``: the default sized by optimiser steps, :attr:`DistillConfig.min_steps`; given, exactly that many)."""
        given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
        base = DistillConfig()
        dcfg = replace(base, **given(temperature=temperature, alpha=alpha),
                       min_steps=base.min_steps if epochs is None else None,
                       train=replace(base.train, **given(epochs=epochs, lr=lr, batch_size=batch_size)))
        return cls(student=student, data=data, distill=dcfg, **task)


# A student within this share of the way from chance to 100% learned little (a job's explicit epochs: 2 at transfer
# 300 ran 10 steps and stayed at 9% on digits, and the job "succeeded" without a word); said in the log.
LEARNED_LITTLE = 0.1


@dataclass
class DistillOutcome:
    student: Any
    accuracy: float
    transfer_size: int
    history: list[dict]
    seconds: float


def bundle_teacher(path, master_key: bytes | None, keyed: bool, data=None) -> Callable:
    """A bundle as a teacher callable: its keyed path's logits (needs the master key) or its public outputs' log-probs.
    With ``data``, a bundle that cannot teach on it (another input shape, another number of classes) is refused here,
    before any sample is drawn (or charged to a key's quota)."""
    import torch

    from ..bundle import load_bundle

    bundle = load_bundle(path, master_key if keyed else None)
    if keyed and not bundle.has_key:
        raise ValueError(f"bundle {path} has no key (Nasty mode): it cannot be distilled with authorization")
    if data is not None:
        takes, classes = list(bundle.meta["input"]["shape"]), len(bundle.meta.get("labels") or [])
        if takes != list(data.in_shape) or classes != data.num_classes:
            raise ValueError(f"the teacher {bundle.name!r} takes inputs {takes} and answers {classes} classes; the data "
                             f"set {data.name!r} has inputs {list(data.in_shape)} and {data.num_classes} classes: "
                             "distil it on a data set of its own kind")
    order = None if data is None else class_order(bundle.meta.get("labels"), data, f"the teacher {bundle.name!r}")

    def teacher(x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().cpu().numpy()
        out = bundle.distill_logits(xs) if keyed else bundle.predict(xs)
        z = torch.from_numpy(out) if keyed else torch.log(torch.from_numpy(out).clamp_min(1e-8))
        if order is not None:  # the set's classes, in its order
            z = z[:, order]
        return z.to(x.device)

    return teacher


def teacher_of(cfg: DistillTask, data, master_key: bytes | None = None) -> Callable | Any | None:
    """The task's teacher as a network or a callable (None: labels only)."""
    from ..train import pick_device

    ref = cfg.teacher
    if ref is None:
        return None
    if ref.kind == "bundle":
        return bundle_teacher(ref.bundle, master_key, cfg.keyed, data)
    if ref.kind == "weights":  # on the device the student trains on: asked once per sample there
        return ref.classifier(data, "teacher").to(pick_device(cfg.distill.train.device))
    raise ValueError(f"distill needs a teacher with weights or a bundle, got {ref.describe()}")


def run(cfg: DistillTask, out: str | os.PathLike, hooks: Hooks | None = None, *, teacher: Callable | Any | None = None,
        data=None, master_key: bytes | None = None, charge: Callable[[int], None] | None = None) -> DistillOutcome:
    """Train ``cfg.student`` on the transfer split from the teacher (``teacher`` overrides ``cfg.teacher``, e.g.
    a remote server's keyed path) and save its weights to ``out`` (safetensors). ``charge`` is called once,
    before the teacher is asked anything, with the number of samples it will be asked for (the service
    charges a key's quota there; raising stops the task before any is drawn)."""
    from ..data import load_dataset, transfer_split
    from ..distill import distill
    from ..models import create_model
    from ..outputs import out_file
    from ..train import accuracy, chance_of, seed_everything
    from ..weights import save_weights

    out_file(out, "the student's weights file")  # before any work: a path it cannot write is refused now
    hooks = hooks or Hooks()
    data = data if data is not None else load_dataset(cfg.data, image_size=image_size_for(cfg.data, cfg.teacher))
    if cfg.transfer > len(data.train):  # before the teacher is built or anything is charged
        raise ValueError(f"transfer asks for {cfg.transfer} images; the train split of {data.name} has "
                         f"{len(data.train)}: ask for at most that many (0: all of them)")
    if teacher is None:
        teacher = teacher_of(cfg, data, master_key)
    transfer = transfer_split(data, cfg.transfer, cfg.seed) if cfg.transfer else data.train
    seed_everything(cfg.seed)
    student = create_model(cfg.student, num_classes=data.num_classes, in_shape=data.in_shape)
    dcfg = cfg.distill.for_transfer(len(transfer))  # its epochs fixed: the history says how many it trained
    dcfg = replace(dcfg, train=replace(dcfg.train, seed=cfg.seed))
    if charge is not None and teacher is not None:  # a cached teacher is asked once per sample, else every epoch
        charge(len(transfer) * (1 if dcfg.cache_teacher else dcfg.train.epochs))
    result = distill(student, transfer, teacher, dcfg, progress=hooks.phase("distill"), should_cancel=hooks.should_cancel)
    save_weights(student, out)
    acc, chance = accuracy(student, data.test), chance_of(data.test.tensors[1])
    if acc - chance < LEARNED_LITTLE * (100.0 - chance):  # said, not refused: the weights are what was asked for
        steps = dcfg.train.epochs * -(-len(transfer) // dcfg.train.batch_size)
        hooks.log(f"warning: the student scores {acc:.1f}% on the test split, chance {chance:.1f}%: it learned "
                  f"little in {dcfg.train.epochs} epoch(s) of {len(transfer)} images ({steps} optimiser steps); "
                  "train more epochs (left out, the recipe's schedule) or give it more transfer images")
    return DistillOutcome(student, acc, len(transfer), result.history.epochs, result.history.seconds)
