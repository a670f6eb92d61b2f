"""The data-free recipe end to end: :func:`datafree` turns the teachers' weights into a student."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from sdb_core.train import pick_device

from .config import DataFreeConfig, PhaseFn, TeacherSpec
from .images import augment, save_grid
from .networks import GroupStackGenerator, MultiBranchStudent, new_student
from .stages import distill_student, train_dual, train_generator


@dataclass
class DataFreeResult:
    student: MultiBranchStudent
    generator: GroupStackGenerator
    target: list[int]
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # stage -> per-epoch metrics
    grids: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def check_teachers(cfg: DataFreeConfig, teachers: Sequence[TeacherSpec]) -> None:
    """Raise ``ValueError`` unless the teachers hold every target label."""
    if not teachers:
        raise ValueError("at least one teacher is needed")
    held = {int(label) for t in teachers for label in t.labels}
    missing = [t for t in cfg.target if int(t) not in held]
    if not cfg.target or missing:
        raise ValueError(f"target labels must be a non-empty subset of the teachers' labels {sorted(held)}; "
                         f"not held by any teacher: {missing}")


def _freeze(teachers: Sequence[TeacherSpec], device: torch.device) -> None:
    for t in teachers:
        t.model.to(device).eval()
        for p in t.model.parameters():
            p.requires_grad_(False)


def datafree(cfg: DataFreeConfig, teachers: Sequence[TeacherSpec], *, phase: PhaseFn | None = None,
             should_cancel: Callable[[], bool] | None = None) -> DataFreeResult:
    """Amalgamate the teachers into one student for ``cfg.target`` from their weights alone
    (frozen, moved to ``cfg.device``; the student and the generator are handed back there).

    ``phase(name)`` gives the progress callback of each stage (generator stages, student
    blocks, fine-tune); ``should_cancel`` stops at the next step (``Cancelled``).
    """
    import time

    check_teachers(cfg, teachers)
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    _freeze(teachers, device)
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
