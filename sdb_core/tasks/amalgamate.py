"""The ``amalgamate`` task: one student from several teachers and no labels, by a method registered by name
(``afk``, ``branching``, ``datafree``); the student is written under ``out`` as weights and a bundle.

A teacher is a network of one of this project's families (``multilabel``: ``MultiLabelNet``; ``encdec``:
``EncDec``), named by a :class:`ModelRef` whose ``arch`` is the family: a weights file, or a bundle (a
hosted model the service resolved, whose graph is read back into the network, see
:mod:`sdb_core.onnx_torch`). This torch-free config names the teachers and holds the options the methods
share (one ``lr``, one ``layer_epochs``, ... whose default depends on the method, see :func:`schedule`);
each reads its default from the recipe config it feeds, and ``run`` builds that config.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..amalgamate.config import FAMILIES, AFKConfig, BranchingConfig, TeacherSpec
from ..amalgamate.datafree.config import DataFreeConfig
from ..progress import Hooks
from ..registry import Registry
from .refs import ModelRef

METHODS = ("afk", "branching", "datafree")  # the registry below holds exactly these
TEACHER_WIDTHS = (16, 32, 64)  # a multilabel teacher's blocks when its weights file comes without widths
# Where a method's measured default is not its recipe's: AFK's benchmark fine-tunes 6 epochs
# (benchmarks/amalgamation.py; AFKConfig's own default is 4); task branching keeps the lr of the
# other multi-teacher students (BranchingConfig's own is 5e-3).
AFK_FINETUNE_EPOCHS = 6
BRANCHING_LR = 3e-3


def _default(cls, name: str) -> Any:
    """A dataclass field's default, also one made by a factory."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if callable(f.default_factory) else f.default


@dataclass(frozen=True)
class Teacher:
    name: str
    ref: ModelRef  # arch: the family; weights, or a (resolved hosted) bundle
    labels: tuple[int, ...] | None = None  # multilabel: the label id of each output, in order
    widths: tuple[int, ...] | None = None  # channels per block; a multilabel weights file: TEACHER_WIDTHS
    in_channels: int = 1
    task: str | None = None  # branching: the teacher's dense task (seg, depth or edges)

    def __post_init__(self) -> None:
        if self.ref.arch not in FAMILIES:
            raise ValueError(f"teacher {self.name}: the family (ref.arch) must be one of {', '.join(FAMILIES)}, "
                             f"got {self.ref.arch!r}")

    @property
    def family(self) -> str:
        return self.ref.arch

    @property
    def depth(self) -> int:
        return len(self.widths or TEACHER_WIDTHS)


@dataclass(frozen=True)
class AmalgamateTask:
    method: str
    teachers: tuple[Teacher, ...]
    # ---- multi-label methods (afk, datafree) ----
    tasks: tuple[int, ...] | None = None  # the label ids the student learns; None: all the teachers know
    grid: int = AFKConfig.grid  # digit composites: grid x grid cells of 28 px
    transfer: int = AFKConfig.n_transfer  # unlabeled transfer images (afk: composites, branching: scenes)
    student_widths: tuple[int, ...] | None = None
    width_scale: float = AFKConfig.width_scale
    layer_epochs: int | None = None  # None: the method's (schedule)
    finetune_epochs: int | None = None
    lr: float | None = None
    batch_size: int = DataFreeConfig.batch_size  # AFK's training default is the same
    eval_n: int = AFKConfig.eval_n  # test composites (branching: test scenes) for the report
    # ---- branching (synthetic scenes) ----
    scene_size: int = BranchingConfig.size
    scene_classes: int = BranchingConfig.num_classes
    epochs: int = BranchingConfig.epochs  # the student's, the first part searching
    candidates: tuple[str, ...] | None = None  # stages a task may branch out after
    # ---- datafree ----
    gen_epochs: int = DataFreeConfig.gen_epochs
    image_epochs: int = DataFreeConfig.image_epochs
    samples: int = DataFreeConfig.gen_samples  # generated images per epoch (generator and student)
    name: str | None = None  # the student bundle's model name; default the method's
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown amalgamation method {self.method!r}; known: {', '.join(METHODS)}")
        if not self.teachers:
            raise ValueError("at least one teacher is needed")

    @property
    def target(self) -> list[int]:
        """The label ids the student learns."""
        return list(self.tasks) if self.tasks else sorted({k for t in self.teachers for k in t.labels or ()})

    def with_schedule(self) -> AmalgamateTask:
        """This task with the method's student schedule where it leaves one unset."""
        return replace(self, **{k: v for k, v in schedule(self.method).items() if getattr(self, k) is None})


def schedule(method: str) -> dict[str, float]:
    """The student schedule (``layer_epochs``, ``finetune_epochs``, ``lr``) a method runs by default."""
    if method == "afk":
        return {"layer_epochs": AFKConfig.layer_epochs, "finetune_epochs": AFK_FINETUNE_EPOCHS,
                "lr": _default(AFKConfig, "train").lr}
    if method == "datafree":
        return {"layer_epochs": DataFreeConfig.block_epochs, "finetune_epochs": DataFreeConfig.finetune_epochs,
                "lr": DataFreeConfig.student_lr}
    return {"lr": BRANCHING_LR}


def teacher_network(t: Teacher) -> Any:
    """The teacher's torch network (eval mode): rebuilt from a bundle's graph, or its weights file."""
    ref = t.ref
    if ref.kind == "bundle":
        from ..onnx_torch import teacher_from_bundle

        return teacher_from_bundle(ref.bundle, t.family)[0]
    if ref.kind != "weights":
        raise ValueError(f"teacher {t.name}: {ref.describe()} is neither a weights file nor a bundle")
    from ..weights import load_weights, read_state_dict

    if t.family == "encdec":
        from ..models.encdec import encdec_from_state

        state = read_state_dict(ref.weights)
        net = encdec_from_state(state)
        net.load_state_dict(state)
        return net.eval()
    from ..amalgamate.multilabel import MultiLabelNet

    return load_weights(MultiLabelNet(t.in_channels, len(t.labels), t.widths or TEACHER_WIDTHS), ref.weights).eval()


# ---- the methods, by name -------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    run: Callable[[AmalgamateTask, Path, Hooks, Path | None], dict]
    problems: Callable[[AmalgamateTask, dict[str, Any]], list[str]]  # what a submission must not have
    plan: Callable[[AmalgamateTask], dict[str, float]]  # the phases and their epochs, in order


RECIPES: Registry = Registry("amalgamation method")


def method(name: str, problems, plan):
    """Register ``run(cfg, out, hooks, work) -> report`` as the method ``name``, with its checks and plan."""

    def add(fn):
        RECIPES.register(Method(fn, problems, plan), name=name)
        return fn

    return add


def problems(cfg: AmalgamateTask, networks: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with the task for its method, one sentence each (empty: it can run). ``networks``:
    teachers already rebuilt, by name (a hosted one's); branching loads the others to check them."""
    return RECIPES.get(cfg.method).problems(cfg, networks or {})


def plan(cfg: AmalgamateTask) -> dict[str, float]:
    """The run's phases in order with their epochs (a job splits its progress over them)."""
    return RECIPES.get(cfg.method).plan(cfg.with_schedule())


def run(cfg: AmalgamateTask, out: str | os.PathLike, hooks: Hooks | None = None, *,
        work: str | os.PathLike | None = None) -> dict:
    """Load the teachers, amalgamate, evaluate and write the student (``student.safetensors``,
    ``student.sdb``, and the method's figures) to the directory ``out``; ``work`` keeps resumable
    checkpoints. Returns the report (summary, metrics, result and the method's own record)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from ..outputs import out_dir

    out_dir(out)  # before any work: a path it cannot write is refused now
    hooks = hooks or Hooks()
    hooks.plan(**plan(cfg))
    return RECIPES.get(cfg.method).run(cfg.with_schedule(), out, hooks, None if work is None else Path(work))


# ---- AFK --------------------------------------------------------------------------------------------

def _teacher_specs(cfg: AmalgamateTask) -> list[TeacherSpec]:
    """The multi-label teachers (AFK's, datafree's), their networks loaded."""
    return [TeacherSpec(t.name, teacher_network(t), list(t.labels)) for t in cfg.teachers]


def _multilabel_problems(cfg: AmalgamateTask, method_name: str, blocks_why: str) -> tuple[list[str], set[int]]:
    """What AFK and datafree both ask of their teachers: multilabel and labelled, the tasks among
    their labels, one depth, and student_widths of that depth. Returns (problems, depths)."""
    out = []
    for t in cfg.teachers:
        if t.family != "multilabel":
            out.append(f"teacher {t.name}: {method_name} takes multilabel teachers, got arch {t.family!r}")
        if t.labels is None:
            out.append(f"teacher {t.name}: {method_name} needs the label id of each output (labels)")
    union = {k for t in cfg.teachers for k in (t.labels or [])}
    if cfg.tasks is not None and not set(cfg.tasks) <= union:
        out.append(f"tasks {sorted(set(cfg.tasks) - union)} are not taught by any teacher")
    depths = {t.depth for t in cfg.teachers}
    if len(depths) > 1:
        out.append(f"{blocks_why}: teachers need the same number of blocks, got {sorted(depths)}")
    if cfg.student_widths is not None and depths and len(cfg.student_widths) != min(depths):
        out.append(f"student_widths needs {min(depths)} entries, got {len(cfg.student_widths)}")
    return out, depths


def _afk_problems(cfg: AmalgamateTask, networks: dict[str, Any]) -> list[str]:
    out, _ = _multilabel_problems(cfg, "AFK", "AFK trains block by block")
    if any(t.in_channels != 1 for t in cfg.teachers):
        out.append("AFK here trains on digit composites: teachers take 1 input channel")
    return out


def _afk_plan(cfg: AmalgamateTask) -> dict[str, float]:
    return {**{f"block{i}": cfg.layer_epochs for i in range(cfg.teachers[0].depth)}, "finetune": cfg.finetune_epochs}


@method("afk", _afk_problems, _afk_plan)
def _afk(cfg: AmalgamateTask, out: Path, hooks: Hooks, work: Path | None) -> dict:
    import torch

    from ..amalgamate.afk import afk
    from ..bundle import export_bundle
    from ..weights import save_weights

    teachers = _teacher_specs(cfg)
    tasks = cfg.target
    train = replace(_default(AFKConfig, "train"), lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
    acfg = AFKConfig(tasks=tasks, n_transfer=cfg.transfer, grid=cfg.grid, data_seed=cfg.seed,
                     student_widths=cfg.student_widths, width_scale=cfg.width_scale, layer_epochs=cfg.layer_epochs,
                     finetune_epochs=cfg.finetune_epochs, eval_n=cfg.eval_n, train=train)
    phases: dict[str, Any] = {}

    def progress(stage, prog):
        if stage not in phases:
            phases[stage] = hooks.phase(stage)
        if phases[stage] is not None:
            phases[stage](prog)

    hooks.log(f"AFK: {len(teachers)} teachers, tasks {tasks}, {cfg.transfer} unlabeled composites")
    res = afk(acfg, teachers, progress=progress, should_cancel=hooks.should_cancel)
    save_weights(res.student, out / "student.safetensors")
    side = 28 * cfg.grid
    with torch.no_grad():
        export_bundle(res.student, out / "student.sdb", name=cfg.name or "afk", in_shape=(1, side, side),
                      mean=(0.0,), std=(1.0,), labels=[str(k) for k in tasks], task="multilabel",
                      metrics={"map": res.map, "teacher_map": res.teacher_map},
                      extra={"amalgamation": {"method": "afk", "tasks": tasks,
                                              "teachers": [t.name for t in cfg.teachers]}})
    report = res.report()
    shown = "n/a" if res.map is None else f"{res.map:.2f}"
    hooks.log(f"student mAP {shown} (teachers {res.teacher_map}), {res.params} parameters "
              f"(teachers {sum(res.teacher_params.values())})")
    return {"summary": f"AFK student for tasks {tasks}: mAP {shown}, {res.params} parameters",
            "metrics": {"student_map": res.map, "teacher_map": res.teacher_map, "params": res.params},
            "result": {"bundle": "student.sdb", "weights": "student.safetensors", "tasks": tasks,
                       "widths": list(res.student.widths), "params": res.params,
                       "teacher_params": res.teacher_params, "active_channels": report["active_channels"]},
            "afk": report}


# ---- data-free: group-stack dual-GAN ----------------------------------------------------------------

def _datafree_problems(cfg: AmalgamateTask, networks: dict[str, Any]) -> list[str]:
    out, depths = _multilabel_problems(cfg, "datafree", "the group stack judges block by block")
    if depths and min(depths) < 2:
        out.append("the group stack needs teachers of at least 2 blocks")
    if len({t.in_channels for t in cfg.teachers}) > 1:
        out.append("teachers must take the same number of input channels")
    return out


def _datafree_plan(cfg: AmalgamateTask) -> dict[str, float]:
    depth = cfg.teachers[0].depth
    return {**{f"generator_stage{k}": cfg.gen_epochs if k < depth else cfg.image_epochs for k in range(1, depth + 1)},
            **{f"student_block{b}": cfg.layer_epochs for b in range(1, depth + 1)},
            "student_finetune": cfg.finetune_epochs}


@method("datafree", _datafree_problems, _datafree_plan)
def _datafree(cfg: AmalgamateTask, out: Path, hooks: Hooks, work: Path | None) -> dict:
    """No image reaches the recipe; test composites are drawn afterwards only to score the result."""
    import torch

    from ..amalgamate.datafree import datafree
    from ..amalgamate.multilabel import count_params, predict_probs, reported_map
    from ..bundle import export_bundle
    from ..weights import save_weights

    specs = _teacher_specs(cfg)
    bundled = [t.name for t in cfg.teachers if t.ref.kind == "bundle"]
    if bundled:
        hooks.log(f"hosted teachers {', '.join(bundled)} carry no BatchNorm statistics (their export folded "
                  "them): the BN-statistics prior has nothing to match for them")
    tasks = cfg.target
    widths = list(cfg.student_widths) if cfg.student_widths else [max(4, w // 2) for w in specs[0].model.widths]
    side, channels = 28 * cfg.grid, cfg.teachers[0].in_channels
    dcfg = DataFreeConfig(
        target=tasks, in_shape=(channels, side, side), student_widths=tuple(widths),
        gen_samples=cfg.samples, gen_epochs=cfg.gen_epochs, image_epochs=cfg.image_epochs,
        student_samples=cfg.samples, block_epochs=cfg.layer_epochs, finetune_epochs=cfg.finetune_epochs,
        student_lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
        # The image grids go beside the other outputs (a job lists and serves only top-level files).
        checkpoint_dir=None if work is None else str(work / "checkpoints"), grid_dir=str(out))
    hooks.log(f"data-free amalgamation: {len(specs)} teachers, tasks {tasks}, no data; student widths {widths}")
    res = datafree(dcfg, specs, phase=hooks.phase, should_cancel=hooks.should_cancel)

    student_map, teacher_map = None, {}
    if cfg.eval_n and channels == 1:
        from ..data.composites import make_composites

        x, y = make_composites(cfg.eval_n, split="test", grid=cfg.grid, seed=cfg.seed)
        x = torch.as_tensor(x)
        student_map = reported_map(predict_probs(res.student, x), y[:, tasks])  # None: no positive drawn
        teacher_map = {s.name: reported_map(predict_probs(s.model, x), y[:, list(s.labels)]) for s in specs}
    params = count_params(res.student)
    teacher_params = {s.name: count_params(s.model) for s in specs}
    save_weights(res.student, out / "student.safetensors")
    with torch.no_grad():
        export_bundle(res.student.cpu(), out / "student.sdb", name=cfg.name or "datafree",
                      in_shape=(channels, side, side), mean=(0.0,) * channels, std=(1.0,) * channels,
                      labels=[str(k) for k in tasks], task="multilabel",
                      metrics={"map": student_map, "teacher_map": teacher_map},
                      extra={"amalgamation": {"method": "datafree", "tasks": tasks,
                                              "teachers": [t.name for t in cfg.teachers]}})
    grids = sorted(str(g.relative_to(out)) for g in res.grids)
    shown = "n/a" if student_map is None else f"{student_map:.2f}"
    hooks.log(f"student mAP {shown} (teachers {teacher_map}), {params} parameters in {res.seconds:.0f} s")
    return {"summary": f"data-free student for tasks {tasks}: mAP {shown}, {params} parameters",
            "metrics": {"student_map": student_map, "teacher_map": teacher_map, "params": params},
            "result": {"bundle": "student.sdb", "weights": "student.safetensors", "tasks": tasks, "widths": widths,
                       "params": params, "teacher_params": teacher_params, "grids": grids},
            "datafree": {"history": res.history, "seconds": res.seconds}}


# ---- task branching: one student for scene parsing + depth (+ edges) --------------------------------

def _branching_problems(cfg: AmalgamateTask, networks: dict[str, Any]) -> list[str]:
    out = []
    nets = {}
    for t in cfg.teachers:
        if t.family != "encdec":
            out.append(f"teacher {t.name}: branching takes encoder-decoder teachers (arch 'encdec'), "
                       f"got {t.family!r}")
        if t.task is None:
            out.append(f"teacher {t.name}: branching needs the teacher's task (seg, depth or edges)")
        if t.family == "encdec":
            from ..weights import WeightsError

            try:
                nets[t.name] = networks[t.name] if t.name in networks else teacher_network(t)
            except (WeightsError, ValueError) as e:
                out.append(f"teacher {t.name}: {e}")
    tasks = [t.task for t in cfg.teachers if t.task is not None]
    if len(set(tasks)) != len(tasks):
        out.append(f"one teacher per task, got tasks {tasks}")
    if nets:
        levels = {len(n.widths) for n in nets.values()}
        if len(levels) > 1:
            out.append(f"teachers need the same number of encoder stages to branch into, got {sorted(levels)}")
        if cfg.student_widths is not None and len(cfg.student_widths) != min(levels):
            out.append(f"student_widths needs {min(levels)} entries, got {len(cfg.student_widths)}")
        if cfg.scene_size % 2 ** (min(levels) - 1):
            out.append(f"scene_size must be divisible by {2 ** (min(levels) - 1)}")
        for t in cfg.teachers:
            n = nets.get(t.name)
            want = {"seg": cfg.scene_classes + 1}.get(t.task or "", 1)
            if n is not None and (n.in_channels != 3 or n.out_channels != want):
                out.append(f"teacher {t.name}: a {t.task} teacher on RGB scenes of {cfg.scene_classes} classes "
                           f"maps 3 channels to {want}, this one {n.in_channels} to {n.out_channels}")
        if cfg.candidates:
            names = next(iter(nets.values())).stage_names[:-1]
            bad = [c for c in cfg.candidates if c not in names]
            if bad:
                out.append(f"candidates {bad} are not stages to branch after; stages: {', '.join(names)}")
    return out


def _branching_plan(cfg: AmalgamateTask) -> dict[str, float]:
    search = BranchingConfig(epochs=cfg.epochs).search_epochs
    return {"search": search, "finetune": cfg.epochs - search}


@method("branching", _branching_problems, _branching_plan)
def _branching(cfg: AmalgamateTask, out: Path, hooks: Hooks, work: Path | None) -> dict:
    from ..amalgamate.branching import branching, export_student, prediction_figure
    from ..data.scenes import make_scenes
    from ..weights import save_weights

    teachers = {t.task: teacher_network(t) for t in cfg.teachers}
    first = next(iter(teachers.values()))
    widths = tuple(cfg.student_widths or first.widths)
    bcfg = BranchingConfig(tasks=tuple(teachers), size=cfg.scene_size, num_classes=cfg.scene_classes,
                           n_train=cfg.transfer, n_test=max(1, cfg.eval_n), teacher_widths=first.widths,
                           widths=widths, convs=first.convs, epochs=cfg.epochs,
                           candidates=tuple(cfg.candidates) if cfg.candidates else None, scratch=False,
                           batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    train = make_scenes(cfg.transfer, size=cfg.scene_size, num_classes=cfg.scene_classes, seed=1000 + cfg.seed)
    test = make_scenes(bcfg.n_test, size=cfg.scene_size, num_classes=cfg.scene_classes, seed=2000 + cfg.seed)
    hooks.log(f"task branching: teachers {', '.join(f'{t.name} ({t.task})' for t in cfg.teachers)}, "
              f"{cfg.transfer} unlabeled {cfg.scene_size}px scenes, student widths {list(widths)}")
    res = branching(bcfg, teachers=teachers, train=train, test=test, phase=hooks.phase,
                    should_cancel=hooks.should_cancel, log=hooks.log)
    student = res.student_model
    save_weights(student, out / "student.safetensors")
    export_student(student, out / "student.sdb", name=cfg.name or "branching", size=cfg.scene_size,
                   num_classes=cfg.scene_classes, class_names=test.class_names,
                   metrics={"student": res.student, "teachers": res.teachers},
                   extra={"amalgamation": {"method": "branching", "teachers": [t.name for t in cfg.teachers]}})
    prediction_figure(student, res.teacher_models, test, out / "predictions.png", num_classes=cfg.scene_classes)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in res.student.items() if k != "params")
    hooks.log(f"student {shown}; {res.student['params']} parameters (teachers {res.teacher_params}); "
              f"branch points {res.branch_points}")
    return {"summary": f"branched student for {', '.join(teachers)}: {shown}",
            "metrics": {"student": res.student, "teachers": res.teachers, "params": res.student["params"]},
            "result": {"bundle": "student.sdb", "weights": "student.safetensors", "figure": "predictions.png",
                       "tasks": list(teachers), "branch_points": res.branch_points,
                       "params": res.student["params"], "teacher_params": res.teacher_params},
            "branching": {"search_losses": res.search_losses, "history": res.history, "seconds": res.seconds}}


assert set(RECIPES.names()) == set(METHODS), "every method is registered, and only those"
