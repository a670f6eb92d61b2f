"""``amalgamate``: one student from several teachers' weights, no labels (``method: afk | branching | datafree``).

Teachers are weights files under the data dir (safetensors, or a tensors-only torch file),
each with its architecture and, for the multi-label methods, the label id of each output.
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
from .base import NAME_PATTERN, JobParams, Submission, job_kind, weights_file

MAX_LABEL = 1000


class TeacherRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    weights: str = Field(description="the teacher's weights file, relative to the data dir")
    arch: str = Field("multilabel", description="the teacher's architecture family")
    widths: list[int] | None = Field(None, min_length=1, max_length=8, description="channels per block")
    labels: list[int] | None = Field(None, min_length=1, max_length=MAX_LABEL,
                                     description="multi-label teachers: the label id of each output, in order")
    in_channels: int = Field(1, ge=1, le=16)

    @model_validator(mode="after")
    def _sane(self):
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
    layer_epochs: int = Field(2, ge=0, le=100, description="AFK: epochs per block, layer-wise")
    finetune_epochs: int = Field(6, ge=0, le=1000, description="AFK: end-to-end epochs")
    lr: float = Field(3e-3, gt=0, le=10)
    batch_size: int = Field(64, ge=1, le=4096)
    eval_n: int = Field(1000, ge=0, le=100_000, description="test composites for the report's mAP")

    @model_validator(mode="after")
    def _distinct(self):
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be distinct, got {names}")
        if self.tasks is not None and len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct, got {self.tasks}")
        return self


RunFn = Callable[[Any, AmalgamateParams], dict]
CheckFn = Callable[[AmalgamateParams, Submission], AmalgamateParams]
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


def check(p: AmalgamateParams, sub: Submission) -> AmalgamateParams:
    if p.method not in METHODS:
        raise invalid(f"amalgamation method {p.method!r} is not available here; available: "
                      f"{', '.join(sorted(METHODS))}", "invalid_params")
    try:
        teachers = [t.model_copy(update={"weights": weights_file(t.weights, sub.settings)}) for t in p.teachers]
    except ValueError as e:
        raise invalid(str(e), "invalid_params") from None
    p = p.model_copy(update={"teachers": teachers})
    extra = CHECKS.get(p.method)
    return extra(p, sub) if extra is not None else p


@job_kind("amalgamate", AmalgamateParams, check)
def run(ctx, p: AmalgamateParams) -> dict:
    fn = METHODS.get(p.method)
    if fn is None:  # registered at submission, gone now: a worker running older code
        raise ValueError(f"amalgamation method {p.method!r} is not available on this worker")
    return fn(ctx, p)


# ---- AFK ----------------------------------------------------------------------------------------

AFK_WIDTHS = [16, 32, 64]


def _check_afk(p: AmalgamateParams, sub: Submission) -> AmalgamateParams:
    problems = []
    for t in p.teachers:
        if t.arch != "multilabel":
            problems.append(f"teacher {t.name}: AFK takes multilabel teachers, got arch {t.arch!r}")
        if t.labels is None:
            problems.append(f"teacher {t.name}: AFK needs the label id of each output (labels)")
    union = {k for t in p.teachers for k in (t.labels or [])}
    if p.tasks is not None and not set(p.tasks) <= union:
        problems.append(f"tasks {sorted(set(p.tasks) - union)} are not taught by any teacher")
    depths = {len(t.widths or AFK_WIDTHS) for t in p.teachers}
    if len(depths) > 1:
        problems.append(f"AFK trains block by block: teachers need the same number of blocks, got {sorted(depths)}")
    if p.student_widths is not None and depths and len(p.student_widths) != min(depths):
        problems.append(f"student_widths needs {min(depths)} entries, got {len(p.student_widths)}")
    if any(t.in_channels != 1 for t in p.teachers):
        problems.append("AFK here trains on digit composites: teachers take 1 input channel")
    if problems:
        raise invalid("; ".join(problems), "invalid_params")
    return p


@method("afk", _check_afk)
def run_afk(ctx, p: AmalgamateParams) -> dict:
    import torch

    from sdb_core.amalgamate.afk import AFKConfig, TeacherSpec, afk
    from sdb_core.amalgamate.multilabel import MultiLabelNet
    from sdb_core.bundle import export_bundle
    from sdb_core.train import TrainConfig
    from sdb_core.weights import load_weights, save_weights

    teachers = []
    for t in p.teachers:
        model = MultiLabelNet(t.in_channels, len(t.labels), t.widths or AFK_WIDTHS)
        teachers.append(TeacherSpec(t.name, load_weights(model, t.weights).eval(), t.labels))
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
