"""The glue between a named data set, a model zoo name and a recipe, shared by the CLI
(``sdb wrap``, ``sdb distill``) and the job kinds: both build the same spec and call the
same function, which calls the recipe functions of ``sdb_core``.

``phase`` is how a caller watches: ``phase("teacher")`` returns the progress callback for
that phase (the CLI draws a bar, a job reports fraction and metrics to the store).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdb_core.progress import Progress

PhaseFn = Callable[[str], Callable[[Progress], None] | None]
Log = Callable[[str], None]


def _no_phase(_: str) -> None:
    return None


@dataclass
class WrapSpec:
    data: str
    arch: str
    out: str | os.PathLike  # bundle directory, or FILE.sdb for a zip
    name: str | None = None  # default DATA-ARCH
    version: str = "1"
    teacher: str | os.PathLike | None = None  # weights; None: train a teacher first
    teacher_epochs: int | None = None  # None: the architecture's teacher schedule (sdb_core.models.schedules)
    save_teacher: str | os.PathLike | None = None
    mode: str = "sdb"  # sdb | nasty
    lam: float = 0.3  # SDBConfig's (a test keeps them equal; importing it here would import torch)
    epochs: int = 15
    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0
    # The self-check's thresholds, in points on a held-out part of the training split (Thresholds'
    # defaults, kept equal by the same test), its attempts and time budget.
    max_accuracy_drop: float = 1.0
    max_keyed_drop: float = 1.5
    min_leak_margin: float = 2.0
    check_attempts: int = 4
    check_budget: float | None = None  # seconds


@dataclass
class WrapOutcome:
    bundle: Path
    name: str
    metrics: dict[str, float]
    report: dict
    teacher_history: list[dict] = field(default_factory=list)


def wrap_to_bundle(spec: WrapSpec, master_key: bytes, *, phase: PhaseFn = _no_phase, log: Log = print,
                   should_cancel: Callable[[], bool] | None = None) -> WrapOutcome:
    """Load the data, get a teacher (given or trained), wrap it with the SDB or Nasty recipe, export."""
    from sdb_core.bundle import export_bundle
    from sdb_core.data import load_dataset
    from sdb_core.models import create_model
    from sdb_core.models.schedules import teacher_config, teacher_shift
    from sdb_core.protect import CheckConfig, NastyConfig, SDBConfig, Thresholds, wrap, wrap_nasty
    from sdb_core.protect.check import teacher_data
    from sdb_core.train import accuracy, seed_everything, train_classifier
    from sdb_core.weights import load_weights, save_weights

    data = load_dataset(spec.data)
    check = CheckConfig(thresholds=Thresholds(spec.max_accuracy_drop, spec.max_keyed_drop, spec.min_leak_margin),
                        max_attempts=spec.check_attempts, budget_seconds=spec.check_budget, seed=spec.seed)
    seed_everything(spec.seed)
    teacher = create_model(spec.arch, num_classes=data.num_classes, in_shape=data.in_shape)
    teacher_history: list[dict] = []
    if spec.teacher:
        load_weights(teacher, spec.teacher)
    else:  # not on the part the wrap's check holds out (an SDB wrap's): there it must be unseen
        train = (teacher_data(data, check) if spec.mode == "sdb" else data).train
        cfg = teacher_config(spec.arch, epochs=spec.teacher_epochs, batch_size=spec.batch_size, seed=spec.seed)
        h = train_classifier(teacher, train, cfg, shift=teacher_shift(data.in_shape), progress=phase("teacher"),
                             should_cancel=should_cancel)
        teacher_history = h.epochs
        if spec.save_teacher:
            save_weights(teacher, spec.save_teacher)
    log(f"teacher {spec.arch} on {spec.data}: test accuracy {accuracy(teacher, data.test):.2f}%")

    # Start from each recipe's own training defaults (e.g. its gradient clip), then apply the spec.
    flags = {"epochs": spec.epochs, "lr": spec.lr, "batch_size": spec.batch_size, "seed": spec.seed}
    if spec.mode == "nasty":
        result = wrap_nasty(teacher, data, NastyConfig(train=replace(NastyConfig().train, **flags)),
                            progress=phase("wrap"), should_cancel=should_cancel)
    else:
        # WrapRefused propagates: the caller exits non-zero (CLI) or fails the job, with its message.
        result = wrap(teacher, data, SDBConfig(lam=spec.lam, train=replace(SDBConfig().train, **flags)),
                      check=check, progress=phase("wrap"), should_cancel=should_cancel, log=log)
    r = result.report
    metrics = {k: r[k] for k in ("teacher_acc", "public_acc", "keyed_acc", "agreement") if k in r}
    name = spec.name or f"{spec.data.split(':')[0]}-{spec.arch}"
    extra = {"arch": spec.arch, "data": spec.data, **({"check": r["check"]} if "check" in r else {})}
    out = export_bundle(result.box, spec.out, name=name, version=spec.version, in_shape=data.in_shape,
                        mean=data.mean, std=data.std, labels=data.labels,
                        master_key=master_key if result.box.has_key else None,
                        metrics=metrics, extra=extra)
    return WrapOutcome(Path(out), name, metrics, r, teacher_history)


def bundle_teacher(path: str | os.PathLike, master_key: bytes | None, authorized: bool) -> Callable:
    """A bundle as a teacher callable: its keyed path (needs the master key) or its public outputs."""
    import torch

    from sdb_core.bundle import load_bundle

    bundle = load_bundle(path, master_key if authorized else None)
    if authorized and not bundle.has_key:
        raise ValueError(f"bundle {path} has no key (Nasty mode): it cannot be distilled with authorization")

    def teacher(x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().cpu().numpy()
        if authorized:
            return torch.from_numpy(bundle.distill_logits(xs))
        return torch.log(torch.from_numpy(bundle.predict(xs)).clamp_min(1e-8))

    return teacher


def weights_teacher(path: str | os.PathLike, arch: str, data) -> Any:
    from sdb_core.models import create_model
    from sdb_core.weights import load_weights

    teacher = create_model(arch, num_classes=data.num_classes, in_shape=data.in_shape)
    return load_weights(teacher, path)


@dataclass
class DistillSpec:
    student: str
    data: str
    transfer: int = 0  # transfer-set size drawn from the train split; 0: all of it
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0


@dataclass
class DistillOutcome:
    student: Any
    accuracy: float
    transfer_size: int
    history: list[dict]
    seconds: float


def distill_student(spec: DistillSpec, teacher: Callable | Any | None, *, data=None, phase: PhaseFn = _no_phase,
                    should_cancel: Callable[[], bool] | None = None) -> DistillOutcome:
    """Train a ``spec.student`` from ``teacher`` (None: labels only) on the data set's transfer split."""
    from sdb_core.data import load_dataset, transfer_split
    from sdb_core.distill import DistillConfig, distill
    from sdb_core.models import create_model
    from sdb_core.train import TrainConfig, accuracy, seed_everything

    data = data if data is not None else load_dataset(spec.data)
    transfer = transfer_split(data, spec.transfer, spec.seed) if spec.transfer else data.train
    seed_everything(spec.seed)
    student = create_model(spec.student, num_classes=data.num_classes, in_shape=data.in_shape)
    cfg = DistillConfig(temperature=spec.temperature, alpha=spec.alpha,
                        train=TrainConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                                          seed=spec.seed))
    result = distill(student, transfer, teacher, cfg, progress=phase("distill"), should_cancel=should_cancel)
    return DistillOutcome(student, accuracy(student, data.test), len(transfer), result.history.epochs,
                          result.history.seconds)
