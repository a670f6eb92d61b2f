"""``amalgamate``: one student from several teachers, no labels (``method: afk | branching | datafree``).

A teacher is a hosted model (``model``; its ONNX graph is read back into the network it was
exported from, :mod:`sdb_core.amalgamate.hosted`) or a weights file under the data dir
(``weights``: safetensors, or a tensors-only torch file), with its architecture family and, for
the multi-label methods, the label id of each output (a hosted model's own labels when they are
label ids).
Every method is one function registered in ``METHODS`` (and optionally a submission check
in ``CHECKS``); this module only dispatches. Artifacts of every method: ``report.json`` and
``curves.png`` (written by the runner), plus the method's own (AFK: ``student.sdb``, an ONNX
bundle of task ``multilabel``, and ``student.safetensors``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...errors import invalid
from .base import NAME_PATTERN, JobParams, Submission, job_kind, served_model_path, weights_file

MAX_LABEL = 1000


class TeacherRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    model: str | None = Field(None, pattern=NAME_PATTERN, description="a hosted model (plain, of the arch family)")
    model_version: str | None = Field(None, description="its version (default: the latest, pinned at submission)")
    weights: str | None = Field(None, description="or the teacher's weights file, relative to the data dir")
    arch: Literal["multilabel", "encdec"] = Field("multilabel", description="the teacher's architecture family")
    widths: list[int] | None = Field(None, min_length=1, max_length=8, description="channels per block")
    labels: list[int] | None = Field(None, min_length=1, max_length=MAX_LABEL,
                                     description="multi-label teachers: the label id of each output, in order")
    in_channels: int = Field(1, ge=1, le=16)
    task: Literal["seg", "depth", "edges"] | None = Field(None, description="branching: the teacher's dense task")

    @model_validator(mode="after")
    def _sane(self):
        if (self.model is None) == (self.weights is None):
            raise ValueError(f"teacher {self.name}: give exactly one of model (a hosted model) or weights (a file)")
        if self.labels is not None and (len(set(self.labels)) != len(self.labels)
                                        or not all(0 <= k < MAX_LABEL for k in self.labels)):
            raise ValueError(f"teacher {self.name}: labels must be distinct ids in [0, {MAX_LABEL}), got {self.labels}")
        if self.widths is not None and not all(1 <= w <= 4096 for w in self.widths):
            raise ValueError(f"teacher {self.name}: widths must be in [1, 4096], got {self.widths}")
        return self


class AmalgamateParams(JobParams):
    method: Literal["afk", "branching", "datafree"]
    teachers: list[TeacherRef] = Field(min_length=1, max_length=8)
    # ---- multi-label methods (afk, datafree) ----
    tasks: list[int] | None = Field(None, min_length=1, max_length=MAX_LABEL,
                                    description="the label ids the student learns; default all the teachers know")
    grid: int = Field(2, ge=1, le=4, description="digit composites: grid x grid cells of 28 px")
    transfer: int = Field(3000, ge=16, le=100_000, description="unlabeled transfer images generated")
    student_widths: list[int] | None = Field(None, min_length=1, max_length=8)
    width_scale: float = Field(0.85, gt=0, le=4)
    layer_epochs: int | None = Field(None, ge=0, le=100,
                                     description="epochs per block, layer-wise (default: afk 2, datafree 1)")
    finetune_epochs: int | None = Field(None, ge=0, le=1000, description="end-to-end epochs (default: afk 6, datafree 60)")
    lr: float | None = Field(None, gt=0, le=10, description="student Adam lr (default: datafree 1e-2, others 3e-3)")
    batch_size: int = Field(64, ge=1, le=4096)
    eval_n: int = Field(1000, ge=0, le=100_000, description="test composites for the report's mAP")
    # ---- branching (synthetic scenes; transfer = unlabeled scenes, eval_n = test scenes) ----
    scene_size: int = Field(64, ge=16, le=512, description="branching: scene side in pixels")
    scene_classes: int = Field(4, ge=1, le=6, description="branching: shape classes of the scenes")
    epochs: int = Field(10, ge=2, le=1000, description="branching: student epochs, the first half searching")
    candidates: list[str] | None = Field(None, min_length=1, max_length=16,
                                         description="branching: stages a task may branch out after")
    # ---- datafree ----
    gen_epochs: int = Field(2, ge=0, le=1000, description="datafree: generator epochs per feature stage")
    image_epochs: int = Field(20, ge=0, le=1000, description="datafree: generator epochs of the image stage")
    samples: int = Field(2048, ge=16, le=1_000_000, description="datafree: generated images per epoch")

    @model_validator(mode="after")
    def _distinct(self):
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be distinct, got {names}")
        if self.tasks is not None and len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct, got {self.tasks}")
        return self


RunFn = Callable[[Any, AmalgamateParams], dict]
# A method's submission check gets the hosted teachers' networks, rebuilt once by ``check``.
CheckFn = Callable[[AmalgamateParams, Submission, dict[str, Any]], AmalgamateParams]
METHODS: dict[str, RunFn] = {}
CHECKS: dict[str, CheckFn] = {}


def method(name: str, check: CheckFn | None = None):
    """Register ``run(ctx, params) -> report`` for ``method: name`` (and its submission check)."""

    def add(fn: RunFn) -> RunFn:
        METHODS[name] = fn
        if check is not None:
            CHECKS[name] = check
        return fn

    return add


def _teacher_net(t: TeacherRef, queue):
    """The teacher's torch network (eval mode): rebuilt from a hosted model's graph, or its weights file."""
    if t.model is not None:
        from sdb_core.amalgamate.hosted import teacher_from_bundle

        return teacher_from_bundle(served_model_path(queue, t.model, t.model_version), t.arch)[0]
    from sdb_core.weights import load_weights, read_state_dict

    if t.arch == "encdec":
        from sdb_core.models.encdec import encdec_from_state

        state = read_state_dict(t.weights)
        net = encdec_from_state(state)
        net.load_state_dict(state)
        return net.eval()
    from sdb_core.amalgamate.multilabel import MultiLabelNet

    return load_weights(MultiLabelNet(t.in_channels, len(t.labels), t.widths or AFK_WIDTHS), t.weights).eval()


# The methods' student schedules and lr (branching has its own ``epochs``); each method's default is
# the one its benchmark measured (datafree's student was under-trained at 9 epochs and lr 3e-3).
SCHEDULES = {"afk": {"layer_epochs": 2, "finetune_epochs": 6, "lr": 3e-3},
             "datafree": {"layer_epochs": 1, "finetune_epochs": 60, "lr": 1e-2},
             "branching": {"lr": 3e-3}}
DENSE_TASKS = {"segmentation": "seg", "depth": "depth", "edges": "edges"}  # bundle task -> branching task


def _hosted(t: TeacherRef, sub: Submission) -> tuple[TeacherRef, Any]:
    """Pin a hosted teacher's version and read its graph now, so a model of the wrong family is a 400
    before anything is queued; what the graph says (widths, channels, labels, task) fills the gaps.
    Returns the completed reference and the rebuilt network."""
    from sdb_core.amalgamate.hosted import teacher_from_bundle

    version = sub.models.get(t.model, t.model_version).version  # 404 when it is not hosted
    t = t.model_copy(update={"model_version": version})
    net, meta = teacher_from_bundle(served_model_path(sub.queue, t.model, version), t.arch)
    update: dict[str, Any] = {"widths": list(net.widths), "in_channels": net.in_channels}
    if t.arch == "multilabel" and t.labels is None:
        names = meta.get("labels") or []
        if len(names) == net.num_labels and all(str(n).isdigit() and int(n) < MAX_LABEL for n in names):
            update["labels"] = [int(n) for n in names]
    if t.arch == "multilabel" and t.labels is not None and len(t.labels) != net.num_labels:
        raise ValueError(f"teacher {t.name}: model {t.model} has {net.num_labels} outputs, {len(t.labels)} labels given")
    if t.arch == "encdec" and t.task is None and meta.get("task") in DENSE_TASKS:
        update["task"] = DENSE_TASKS[meta["task"]]
    return t.model_copy(update=update), net


def check(p: AmalgamateParams, sub: Submission) -> AmalgamateParams:
    if p.method not in METHODS:
        raise invalid(f"amalgamation method {p.method!r} is not available here; available: "
                      f"{', '.join(sorted(METHODS))}", "invalid_params")
    teachers, hosted = [], {}
    try:
        for t in p.teachers:
            if t.model is not None:
                t, hosted[t.name] = _hosted(t, sub)
            else:
                t = t.model_copy(update={"weights": weights_file(t.weights, sub.settings)})
            teachers.append(t)
    except ValueError as e:
        raise invalid(str(e), "invalid_params") from None
    defaults = {f: v for f, v in SCHEDULES.get(p.method, {}).items() if getattr(p, f) is None}
    p = p.model_copy(update={"teachers": teachers, **defaults})
    extra = CHECKS.get(p.method)
    return extra(p, sub, hosted) if extra is not None else p


@job_kind("amalgamate", AmalgamateParams, check)
def run(ctx, p: AmalgamateParams) -> dict:
    fn = METHODS.get(p.method)
    if fn is None:  # registered at submission, gone now: a worker running older code
        raise ValueError(f"amalgamation method {p.method!r} is not available on this worker")
    return fn(ctx, p)


# ---- AFK ----------------------------------------------------------------------------------------

AFK_WIDTHS = [16, 32, 64]


def _multilabel_problems(p: AmalgamateParams, method: str, blocks_why: str) -> tuple[list[str], set[int]]:
    """What AFK and datafree both ask of their teachers: multilabel and labelled, the tasks among
    their labels, one depth, and student_widths of that depth. Returns (problems, depths)."""
    problems = []
    for t in p.teachers:
        if t.arch != "multilabel":
            problems.append(f"teacher {t.name}: {method} takes multilabel teachers, got arch {t.arch!r}")
        if t.labels is None:
            problems.append(f"teacher {t.name}: {method} needs the label id of each output (labels)")
    union = {k for t in p.teachers for k in (t.labels or [])}
    if p.tasks is not None and not set(p.tasks) <= union:
        problems.append(f"tasks {sorted(set(p.tasks) - union)} are not taught by any teacher")
    depths = {len(t.widths or AFK_WIDTHS) for t in p.teachers}
    if len(depths) > 1:
        problems.append(f"{blocks_why}: teachers need the same number of blocks, got {sorted(depths)}")
    if p.student_widths is not None and depths and len(p.student_widths) != min(depths):
        problems.append(f"student_widths needs {min(depths)} entries, got {len(p.student_widths)}")
    return problems, depths


def _check_afk(p: AmalgamateParams, sub: Submission, hosted: dict[str, Any]) -> AmalgamateParams:
    problems, _ = _multilabel_problems(p, "AFK", "AFK trains block by block")
    if any(t.in_channels != 1 for t in p.teachers):
        problems.append("AFK here trains on digit composites: teachers take 1 input channel")
    if problems:
        raise invalid("; ".join(problems), "invalid_params")
    return p


@method("afk", _check_afk)
def run_afk(ctx, p: AmalgamateParams) -> dict:
    import torch

    from sdb_core.amalgamate.afk import AFKConfig, TeacherSpec, afk
    from sdb_core.bundle import export_bundle
    from sdb_core.train import TrainConfig
    from sdb_core.weights import save_weights

    teachers = [TeacherSpec(t.name, _teacher_net(t, ctx.queue), t.labels) for t in p.teachers]
    tasks = p.tasks or sorted({k for t in p.teachers for k in t.labels})
    cfg = AFKConfig(
        teachers=teachers, tasks=tasks, n_transfer=p.transfer, grid=p.grid, data_seed=p.seed,
        student_widths=p.student_widths, width_scale=p.width_scale, layer_epochs=p.layer_epochs,
        finetune_epochs=p.finetune_epochs, eval_n=p.eval_n,
        train=TrainConfig(optimizer="adam", lr=p.lr, weight_decay=0.0, batch_size=p.batch_size, seed=p.seed),
    )
    depth = len(teachers[0].model.blocks)
    ctx.plan(**{f"block{i}": p.layer_epochs for i in range(depth)}, finetune=p.finetune_epochs)
    phases: dict[str, Any] = {}

    def progress(stage, prog):
        if stage not in phases:
            phases[stage] = ctx.phase(stage)
        phases[stage](prog)

    ctx.log(f"AFK: {len(teachers)} teachers, tasks {tasks}, {p.transfer} unlabeled composites")
    res = afk(cfg, progress=progress, should_cancel=ctx.should_cancel)
    save_weights(res.student, ctx.artifacts / "student.safetensors")
    side = 28 * p.grid
    with torch.no_grad():
        export_bundle(res.student, ctx.artifacts / "student.sdb", name=f"afk-{ctx.job.id[:8]}",
                      in_shape=(1, side, side), mean=(0.0,), std=(1.0,), labels=[str(k) for k in tasks],
                      task="multilabel", metrics={"map": res.map, "teacher_map": res.teacher_map},
                      extra={"amalgamation": {"method": "afk", "tasks": tasks,
                                              "teachers": [t.name for t in p.teachers]}})
    report = res.report()
    shown = "n/a" if res.map is None else f"{res.map:.2f}"
    ctx.log(f"student mAP {shown} (teachers {res.teacher_map}), {res.params} parameters "
            f"(teachers {sum(res.teacher_params.values())})")
    return {"summary": f"AFK student for tasks {tasks}: mAP {shown}, {res.params} parameters",
            "metrics": {"student_map": res.map, "teacher_map": res.teacher_map, "params": res.params},
            "result": {"bundle": "student.sdb", "weights": "student.safetensors", "tasks": tasks,
                       "widths": list(res.student.widths), "params": res.params,
                       "teacher_params": res.teacher_params, "active_channels": report["active_channels"]},
            "afk": report}


# ---- data-free: group-stack dual-GAN ------------------------------------------------------------


def _check_datafree(p: AmalgamateParams, sub: Submission, hosted: dict[str, Any]) -> AmalgamateParams:
    problems, depths = _multilabel_problems(p, "datafree", "the group stack judges block by block")
    if depths and min(depths) < 2:
        problems.append("the group stack needs teachers of at least 2 blocks")
    if len({t.in_channels for t in p.teachers}) > 1:
        problems.append("teachers must take the same number of input channels")
    if problems:
        raise invalid("; ".join(problems), "invalid_params")
    return p


@method("datafree", _check_datafree)
def run_datafree(ctx, p: AmalgamateParams) -> dict:
    """No image reaches the recipe; test composites are drawn afterwards only to score the result."""
    import torch

    from sdb_core.amalgamate.datafree import DataFreeConfig, TeacherSpec, datafree
    from sdb_core.amalgamate.multilabel import count_params, mean_average_precision, predict_probs
    from sdb_core.bundle import export_bundle
    from sdb_core.weights import save_weights

    specs = [TeacherSpec(_teacher_net(t, ctx.queue), t.labels, t.name) for t in p.teachers]
    hosted = [t.name for t in p.teachers if t.model is not None]
    if hosted:
        ctx.log(f"hosted teachers {', '.join(hosted)} carry no BatchNorm statistics (their export folded them): "
                "the BN-statistics prior has nothing to match for them")
    tasks = p.tasks or sorted({k for t in p.teachers for k in t.labels})
    widths = p.student_widths or [max(4, w // 2) for w in specs[0].model.widths]
    side, channels = 28 * p.grid, p.teachers[0].in_channels
    cfg = DataFreeConfig(
        teachers=specs, target=tasks, in_shape=(channels, side, side), student_widths=tuple(widths),
        gen_samples=p.samples, gen_epochs=p.gen_epochs, image_epochs=p.image_epochs, student_samples=p.samples,
        block_epochs=p.layer_epochs, finetune_epochs=p.finetune_epochs, student_lr=p.lr, batch_size=p.batch_size, seed=p.seed,
        # The image grids go beside the other artifacts: only top-level files are listed and served.
        checkpoint_dir=str(ctx.workdir / "checkpoints"), grid_dir=str(ctx.artifacts))
    depth = len(specs[0].model.blocks)
    ctx.plan(**{f"generator_stage{k}": p.gen_epochs if k < depth else p.image_epochs for k in range(1, depth + 1)},
             **{f"student_block{b}": p.layer_epochs for b in range(1, depth + 1)}, student_finetune=p.finetune_epochs)
    ctx.log(f"data-free amalgamation: {len(specs)} teachers, tasks {tasks}, no data; student widths {widths}")
    res = datafree(cfg, phase=ctx.phase, should_cancel=ctx.should_cancel)

    student_map, teacher_map = None, {}
    if p.eval_n and channels == 1:
        from sdb_core.data.composites import make_composites

        x, y = make_composites(p.eval_n, split="test", grid=p.grid, seed=p.seed)
        x = torch.as_tensor(x)
        student_map = mean_average_precision(predict_probs(res.student, x), y[:, tasks])
        teacher_map = {s.name: mean_average_precision(predict_probs(s.model, x), y[:, list(s.labels)]) for s in specs}
    params = count_params(res.student)
    teacher_params = {s.name: count_params(s.model) for s in specs}
    save_weights(res.student, ctx.artifacts / "student.safetensors")
    with torch.no_grad():
        export_bundle(res.student.cpu(), ctx.artifacts / "student.sdb", name=f"datafree-{ctx.job.id[:8]}",
                      in_shape=(channels, side, side), mean=(0.0,) * channels, std=(1.0,) * channels,
                      labels=[str(k) for k in tasks], task="multilabel",
                      metrics={"map": student_map, "teacher_map": teacher_map},
                      extra={"amalgamation": {"method": "datafree", "tasks": tasks,
                                              "teachers": [t.name for t in p.teachers]}})
    grids = sorted(str(g.relative_to(ctx.artifacts)) for g in res.grids)
    shown = "n/a" if student_map is None else f"{student_map:.2f}"
    ctx.log(f"student mAP {shown} (teachers {teacher_map}), {params} parameters in {res.seconds:.0f} s")
    return {"summary": f"data-free student for tasks {tasks}: mAP {shown}, {params} parameters",
            "metrics": {"student_map": student_map, "teacher_map": teacher_map, "params": params},
            "result": {"bundle": "student.sdb", "weights": "student.safetensors", "tasks": tasks, "widths": widths,
                       "params": params, "teacher_params": teacher_params, "grids": grids},
            "datafree": {"history": res.history, "seconds": res.seconds}}


# ---- task branching: one student for scene parsing + depth (+ edges) -----------------------------


def _check_branching(p: AmalgamateParams, sub: Submission, hosted: dict[str, Any]) -> AmalgamateParams:
    from sdb_core.weights import WeightsError

    problems = []
    nets = {}
    for t in p.teachers:
        if t.arch != "encdec":
            problems.append(f"teacher {t.name}: branching takes encoder-decoder teachers (arch 'encdec'), "
                            f"got {t.arch!r}")
        if t.task is None:
            problems.append(f"teacher {t.name}: branching needs the teacher's task (seg, depth or edges)")
        if t.arch == "encdec":
            try:
                nets[t.name] = hosted[t.name] if t.name in hosted else _teacher_net(t, sub.queue)
            except (WeightsError, ValueError) as e:
                problems.append(f"teacher {t.name}: {e}")
    tasks = [t.task for t in p.teachers if t.task is not None]
    if len(set(tasks)) != len(tasks):
        problems.append(f"one teacher per task, got tasks {tasks}")
    if nets:
        levels = {len(n.widths) for n in nets.values()}
        if len(levels) > 1:
            problems.append(f"teachers need the same number of encoder stages to branch into, got {sorted(levels)}")
        if p.student_widths is not None and len(p.student_widths) != min(levels):
            problems.append(f"student_widths needs {min(levels)} entries, got {len(p.student_widths)}")
        if p.scene_size % 2 ** (min(levels) - 1):
            problems.append(f"scene_size must be divisible by {2 ** (min(levels) - 1)}")
        for t in p.teachers:
            n = nets.get(t.name)
            want = {"seg": p.scene_classes + 1}.get(t.task or "", 1)
            if n is not None and (n.in_channels != 3 or n.out_channels != want):
                problems.append(f"teacher {t.name}: a {t.task} teacher on RGB scenes of {p.scene_classes} classes "
                                f"maps 3 channels to {want}, this one {n.in_channels} to {n.out_channels}")
        if p.candidates:
            names = next(iter(nets.values())).stage_names[:-1]
            bad = [c for c in p.candidates if c not in names]
            if bad:
                problems.append(f"candidates {bad} are not stages to branch after; stages: {', '.join(names)}")
    if problems:
        raise invalid("; ".join(problems), "invalid_params")
    return p


@method("branching", _check_branching)
def run_branching(ctx, p: AmalgamateParams) -> dict:
    from sdb_core.amalgamate.branching import BranchingConfig, branching, export_student, prediction_figure
    from sdb_core.data.scenes import make_scenes
    from sdb_core.weights import save_weights

    teachers = {t.task: _teacher_net(t, ctx.queue) for t in p.teachers}
    first = next(iter(teachers.values()))
    widths = tuple(p.student_widths or first.widths)
    search = max(1, min(p.epochs - 1, round(p.epochs * 0.5)))
    cfg = BranchingConfig(tasks=tuple(teachers), size=p.scene_size, num_classes=p.scene_classes,
                          n_train=p.transfer, n_test=max(1, p.eval_n), teacher_widths=first.widths, widths=widths,
                          convs=first.convs, epochs=p.epochs, candidates=tuple(p.candidates) if p.candidates else None,
                          scratch=False, batch_size=p.batch_size, lr=p.lr, seed=p.seed)
    train = make_scenes(p.transfer, size=p.scene_size, num_classes=p.scene_classes, seed=1000 + p.seed)
    test = make_scenes(cfg.n_test, size=p.scene_size, num_classes=p.scene_classes, seed=2000 + p.seed)
    ctx.plan(search=search, finetune=p.epochs - search)
    ctx.log(f"task branching: teachers {', '.join(f'{t.name} ({t.task})' for t in p.teachers)}, "
            f"{p.transfer} unlabeled {p.scene_size}px scenes, student widths {list(widths)}")
    res = branching(cfg, teachers=teachers, train=train, test=test, phase=ctx.phase,
                    should_cancel=ctx.should_cancel, log=ctx.log)
    student = res.student_model
    save_weights(student, ctx.artifacts / "student.safetensors")
    export_student(student, ctx.artifacts / "student.sdb", name=f"branching-{ctx.job.id[:8]}", size=p.scene_size,
                   num_classes=p.scene_classes, class_names=test.class_names,
                   metrics={"student": res.student, "teachers": res.teachers},
                   extra={"amalgamation": {"method": "branching", "teachers": [t.name for t in p.teachers]}})
    prediction_figure(student, res.teacher_models, test, ctx.artifacts / "predictions.png",
                      num_classes=p.scene_classes)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in res.student.items() if k != "params")
    ctx.log(f"student {shown}; {res.student['params']} parameters (teachers {res.teacher_params}); "
            f"branch points {res.branch_points}")
    return {"summary": f"branched student for {', '.join(teachers)}: {shown}",
            "metrics": {"student": res.student, "teachers": res.teachers, "params": res.student["params"]},
            "result": {"bundle": "student.sdb", "weights": "student.safetensors", "figure": "predictions.png",
                       "tasks": list(teachers), "branch_points": res.branch_points,
                       "params": res.student["params"], "teacher_params": res.teacher_params},
            "branching": {"search_losses": res.search_losses, "history": res.history, "seconds": res.seconds}}
