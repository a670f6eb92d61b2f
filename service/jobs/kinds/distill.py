"""``distill``: a student from a hosted model's keyed path (the submitting key needs ``distill``
for that model, checked at submission) or from local teacher weights under the data dir.
Artifacts: ``student.safetensors``, ``report.json``, ``curves.png``.
"""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from sdb_core.distill.config import DistillConfig
from sdb_core.tasks import ModelRef, distill
from sdb_core.tasks.distill import DistillTask

from ...auth import check_scope
from ...errors import invalid
from .base import (
    NAME_PATTERN,
    JobParams,
    Submission,
    check_arch,
    job_kind,
    local_inputs,
    served_model_path,
)


class DistillParams(JobParams):
    teacher: str | None = Field(None, pattern=NAME_PATTERN, description="a hosted model (its keyed path)")
    teacher_version: str | None = Field(None, description="a version of it; default the highest at submission")
    teacher_weights: str | None = Field(None, description="or local teacher weights under the data dir")
    teacher_arch: str = "cnn"
    student: str
    data: str
    epochs: int = Field(DistillConfig().train.epochs, ge=1, le=1000)
    transfer: int = Field(0, ge=0, description="transfer-set size from the train split; 0: all")
    temperature: float = Field(DistillConfig().temperature, gt=0, le=100)
    alpha: float = Field(DistillConfig().alpha, ge=0, le=1)
    lr: float = Field(DistillConfig().train.lr, gt=0, le=10)
    batch_size: int = Field(DistillConfig().train.batch_size, ge=1, le=4096)

    @field_validator("student", "teacher_arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return check_arch(v)

    @model_validator(mode="after")
    def _one_teacher(self):
        if (self.teacher is None) == (self.teacher_weights is None):
            raise ValueError("give exactly one of teacher (a hosted model) or teacher_weights (a local file)")
        return self


def check(p: DistillParams, sub: Submission) -> DistillParams:
    update = local_inputs(sub.settings, data=p.data, teacher_weights=p.teacher_weights)
    if p.teacher is not None:
        check_scope(sub.key, "distill", p.teacher)  # 403 before anything is queued
        model = sub.models.get(p.teacher, p.teacher_version)  # 404 for an unknown model or version
        if not model.distillable:
            raise invalid(f"model {p.teacher!r} has no keyed path (Nasty mode): it cannot be distilled",
                          "not_distillable")
        update["teacher_version"] = model.version  # pinned: a later deploy does not change this job
    return p.model_copy(update=update)


@job_kind("distill", DistillParams, check)
def run(ctx, p: DistillParams) -> dict:
    if p.teacher is not None:
        bundle_path = served_model_path(ctx.queue, p.teacher, p.teacher_version)
        teacher = ModelRef(model=p.teacher).hosted_at(bundle_path, p.teacher_version)
        source = f"model {p.teacher} version {p.teacher_version} (keyed path)"
    else:
        teacher = ModelRef(arch=p.teacher_arch, weights=p.teacher_weights)
        source = f"teacher weights {p.teacher_weights}"
    ctx.log(f"distilling a {p.student} from {source} on {p.data}")
    task = DistillTask.from_options(p.student, p.data, teacher=teacher, keyed=p.teacher is not None,
                                    transfer=p.transfer, temperature=p.temperature, alpha=p.alpha, epochs=p.epochs,
                                    lr=p.lr, batch_size=p.batch_size, seed=p.seed)
    outcome = distill.run(task, ctx.artifacts / "student.safetensors", ctx.hooks,
                          master_key=ctx.settings.master_key)
    ctx.log(f"student test accuracy {outcome.accuracy:.2f}% on {outcome.transfer_size} transfer images")
    return {"summary": f"student {p.student}: test accuracy {outcome.accuracy:.2f}%",
            "metrics": {"student_acc": outcome.accuracy},
            "result": {"weights": "student.safetensors", "student": p.student, "source": source,
                       "transfer_size": outcome.transfer_size},
            "history": outcome.history, "seconds": outcome.seconds}
