"""``amalgamate``: one student from several teachers, no labels (``method: afk | branching | datafree``).

A teacher is the jobs' one model reference (:class:`~.base.ModelParam`) with the family's fields: a
hosted model (``model``, ``version``; a plain one, whose ONNX graph is read back into the network it
was exported from, :mod:`sdb_core.onnx_torch`, so it must be on the key's allowlist, and a protected
one is refused) or uploaded weights (``file``: safetensors, or a tensors-only torch file), with its
architecture family (``arch``) and, for the multi-label methods, the label id of each output (a
hosted model's own labels when they are label ids). This module checks access and files, pins hosted
versions, and hands the task to :mod:`sdb_core.tasks.amalgamate`, where every method is registered
by name. Artifacts of every method: ``report.json`` and ``curves.png`` (written by the runner), plus
the method's own (AFK: ``student.sdb``, an ONNX bundle of task ``multilabel``, and
``student.safetensors``).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from sdb_core.amalgamate.config import FAMILIES, TASKS
from sdb_core.tasks import amalgamate
from sdb_core.tasks.amalgamate import METHODS, AmalgamateTask, Teacher

from ...errors import invalid
from .base import (
    NAME_PATTERN,
    Access,
    JobParams,
    ModelParam,
    Submission,
    check_model,
    job_kind,
    model_ref,
    served_model_path,
)

MAX_LABEL = 1000
DENSE_TASKS = {"segmentation": "seg", "depth": "depth", "edges": "edges"}  # bundle task -> branching task
_T = AmalgamateTask  # its defaults (read from the recipes' configs)
_AFK, _DATAFREE = amalgamate.schedule("afk"), amalgamate.schedule("datafree")


class TeacherParam(ModelParam):
    """A teacher: a hosted model or uploaded weights, of an architecture family, and what the family needs."""

    HOSTED_ARCH = True  # a hosted graph is read back into a network of this family
    ONNX = False  # the recipes work stage by stage through the family's network: weights of it, not any graph

    name: str = Field(pattern=NAME_PATTERN)
    arch: Literal[FAMILIES] = Field(FAMILIES[0], description="the teacher's architecture family")
    widths: list[int] | None = Field(None, min_length=1, max_length=8, description="channels per block")
    labels: list[int] | None = Field(None, min_length=1, max_length=MAX_LABEL,
                                     description="multi-label teachers: the label id of each output, in order")
    in_channels: int = Field(1, ge=1, le=16)
    task: Literal[TASKS] | None = Field(None, description="branching: the teacher's dense task")

    @model_validator(mode="after")
    def _sane(self):
        if self.num_classes is not None:
            raise ValueError(f"teacher {self.name}: labels (one id per output) say what a teacher outputs, "
                             "not num_classes")
        if self.labels is not None and (len(set(self.labels)) != len(self.labels)
                                        or not all(0 <= k < MAX_LABEL for k in self.labels)):
            raise ValueError(f"teacher {self.name}: labels must be distinct ids in [0, {MAX_LABEL}), got {self.labels}")
        if self.widths is not None and not all(1 <= w <= 4096 for w in self.widths):
            raise ValueError(f"teacher {self.name}: widths must be in [1, 4096], got {self.widths}")
        return self

    def _check_arch(self, arch: str) -> None:
        pass  # a family, not a zoo architecture: its Literal type checks it


class AmalgamateParams(JobParams):
    method: Literal[METHODS]
    teachers: list[TeacherParam] = Field(min_length=1, max_length=8)
    # ---- multi-label methods (afk, datafree) ----
    tasks: list[int] | None = Field(None, min_length=1, max_length=MAX_LABEL,
                                    description="the label ids the student learns; default all the teachers know")
    grid: int = Field(_T.grid, ge=1, le=4, description="digit composites: grid x grid cells of 28 px")
    transfer: int = Field(_T.transfer, ge=16, le=100_000, description="unlabeled transfer images generated")
    student_widths: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None, min_length=1, max_length=8, description="the student's channels per block, each in [1, 4096] as a teacher's")
    width_scale: float = Field(_T.width_scale, gt=0, le=4)
    layer_epochs: int | None = Field(None, ge=0, le=100, description="epochs per block, layer-wise (default: afk "
                                     f"{_AFK['layer_epochs']}, datafree {_DATAFREE['layer_epochs']})")
    finetune_epochs: int | None = Field(None, ge=0, le=1000, description="end-to-end epochs (default: afk "
                                        f"{_AFK['finetune_epochs']}, datafree {_DATAFREE['finetune_epochs']})")
    lr: float | None = Field(None, gt=0, le=10, description=f"student Adam lr (default: afk {_AFK['lr']:g}, datafree "
                             f"{_DATAFREE['lr']:g}, branching {amalgamate.schedule('branching')['lr']:g})")
    batch_size: int = Field(_T.batch_size, ge=1, le=4096)
    eval_n: int = Field(_T.eval_n, ge=0, le=100_000, description="test composites for the report's mAP (0: none, "
                        "mAP n/a); branching: test scenes, at least 1")
    # ---- branching (synthetic scenes; transfer = unlabeled scenes, eval_n = test scenes) ----
    scene_size: int = Field(_T.scene_size, ge=16, le=512, description="branching: scene side in pixels")
    scene_classes: int = Field(_T.scene_classes, ge=1, le=6, description="branching: shape classes of the scenes")
    epochs: int = Field(_T.epochs, ge=2, le=1000, description="branching: student epochs, the first half searching")
    candidates: list[str] | None = Field(None, min_length=1, max_length=16,
                                         description="branching: stages a task may branch out after")
    # ---- datafree ----
    gen_epochs: int = Field(_T.gen_epochs, ge=0, le=1000, description="datafree: generator epochs per feature stage")
    image_epochs: int = Field(_T.image_epochs, ge=0, le=1000, description="datafree: generator epochs of the image stage")
    samples: int = Field(_T.samples, ge=16, le=1_000_000, description="datafree: generated images per epoch")

    @model_validator(mode="after")
    def _distinct(self):
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be distinct, got {names}")
        if self.tasks is not None and len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct, got {self.tasks}")
        return self

    @model_validator(mode="after")
    def _student_trains(self):
        """Refuse what would ship an untrained student or ignore a field: afk and datafree train theirs only in
        layer_epochs and finetune_epochs (datafree's generator epochs train no student); branching's tasks are its
        teachers' ``task`` and it scores its student (and draws predictions.png) on eval_n test scenes."""
        if self.method in ("afk", "datafree"):
            run = {f: v if v is not None else amalgamate.schedule(self.method)[f]
                   for f, v in (("layer_epochs", self.layer_epochs), ("finetune_epochs", self.finetune_epochs))}
            if not sum(run.values()):
                raise ValueError(f"{self.method} would train no student: layer_epochs + finetune_epochs is 0 "
                                 f"({', '.join(f'{f} {v}' for f, v in run.items())}); give either more than 0")
        elif self.method == "branching":
            if self.tasks is not None:
                raise ValueError("branching does not read tasks: its student learns its teachers' tasks "
                                 "(each teacher's task field)")
            if self.eval_n < 1:
                raise ValueError("branching scores its student on eval_n test scenes: eval_n must be at least 1, "
                                 f"got {self.eval_n}")
        return self


    def reads(self) -> list[Access]:
        return [a for t in self.teachers for a in t.reads("graph")]


def _hosted(t: TeacherParam, sub: Submission) -> tuple[TeacherParam, Any]:
    """Read a hosted teacher's graph now (its version pinned), so a model of the wrong family is a 400
    before anything is queued; what the graph says (widths, channels, labels, task) fills the gaps.
    Returns the completed reference and the rebuilt network."""
    from sdb_core.onnx_torch import teacher_from_bundle

    net, meta = teacher_from_bundle(served_model_path(sub.settings, sub.queue, t.model, t.version), t.arch)
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
    teachers, hosted = [], {}
    for t in p.teachers:
        t = check_model(t, sub, "graph", f"teacher {t.name}")  # 403 and 404 here; the version pinned
        if t.model is not None:
            try:
                t, hosted[t.name] = _hosted(t, sub)
            except ValueError as e:
                raise invalid(str(e), "invalid_params") from None
        teachers.append(t)
    defaults = {f: v for f, v in amalgamate.schedule(p.method).items() if getattr(p, f) is None}
    p = p.model_copy(update={"teachers": teachers, **defaults})
    problems = amalgamate.problems(_task(p, sub), hosted)  # branching loads the weights files' teachers to check them
    if problems:
        raise invalid("; ".join(problems), "invalid_params")
    return p


def _task(p: AmalgamateParams, who, name: str | None = None) -> AmalgamateTask:
    """The task of these params, every teacher resolved for the job's key (hosted: its pinned bundle)."""
    teachers = [Teacher(t.name, model_ref(t, who, f"teacher {t.name}"),
                        labels=None if t.labels is None else tuple(t.labels),
                        widths=None if t.widths is None else tuple(t.widths), in_channels=t.in_channels, task=t.task)
                for t in p.teachers]
    options = p.model_dump(exclude={"method", "teachers", "cpus", "gpus"})
    for k in ("tasks", "student_widths", "candidates"):
        options[k] = None if options[k] is None else tuple(options[k])
    return AmalgamateTask(p.method, tuple(teachers), name=name, **options)


@job_kind("amalgamate", AmalgamateParams, check)
def run(ctx, p: AmalgamateParams) -> dict:
    task = _task(p, ctx, name=f"{p.method}-{ctx.job.id[:8]}")
    return amalgamate.run(task, ctx.artifacts, ctx.hooks, work=ctx.workdir)
