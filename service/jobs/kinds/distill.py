"""``distill``: a student from a hosted model's keyed path or from uploaded teacher weights.

The keyed path is the product a ``distill`` key pays for, so a job reads it on the same terms as
``POST /v1/models/{name}/distill``: the key needs ``distill`` for that model (checked at submission,
when a worker claims the job and on every heartbeat; a revoked key stops the job), and the keyed
samples the job draws are charged to the key's quota with the store's exact charge, all at once
before the teacher is asked anything (the distiller asks it once per transfer sample). A transfer
set larger than the quota is refused at submission. Artifacts: ``student.safetensors``,
``report.json``, ``curves.png``.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from sdb_core.distill.config import DistillConfig
from sdb_core.tasks import distill
from sdb_core.tasks.distill import DistillTask

from ...errors import ApiError
from .base import (
    Access,
    JobParams,
    ModelParam,
    Submission,
    check_arch,
    check_model,
    data_set,
    job_kind,
    model_ref,
)


class DistillParams(JobParams):
    teacher: ModelParam = Field(description="a hosted model (its keyed path: needs the distill scope for it, and "
                                "is charged to the key's quota) or uploaded weights ({file, arch})")
    student: str
    data: str = Field(description="an embedded data set (digits, mnist-5k, ...) or an uploaded dataset's file id")
    epochs: int | None = Field(None, ge=1, le=1000, description=f"epochs over the transfer set; default "
                               f"{DistillConfig().train.epochs}, or on a smaller set enough for "
                               f"{DistillConfig().min_steps:,} optimiser steps at batch_size (the result's epochs "
                               "says how many it trained)")
    transfer: int = Field(0, ge=0, description="transfer-set size from the train split; 0: all")
    temperature: float = Field(DistillConfig().temperature, gt=0, le=100)
    alpha: float = Field(DistillConfig().alpha, ge=0, le=1)
    lr: float = Field(DistillConfig().train.lr, gt=0, le=10)
    batch_size: int = Field(DistillConfig().train.batch_size, ge=1, le=4096)

    @field_validator("student")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return check_arch(v)

    def reads(self) -> list[Access]:
        return self.teacher.reads("keyed")


def _fits_quota(sub: Submission, samples: int) -> None:
    """A transfer set that can never fit the key's quota is a 429 now, not a failed job later. (With a quota
    window the window may roll over before the job runs: only the quota itself bounds it then.) ``samples`` 0 is the
    whole train split, whose size only the job learns (the API process does not load data sets): it draws one
    sample at least, and a larger set than the quota fails the job before it draws any."""
    quota = sub.key.quota
    if quota is None:
        return
    row = sub.queue.store.get_key(sub.key.id)
    used = row.used if row is not None and not row.quota_window_s else 0
    if used + max(samples, 1) > quota:
        drawn = f"{samples} keyed samples" if samples else "its whole train split (transfer 0)"
        raise ApiError(429, "quota_exceeded", f"the job draws {drawn}; this key's quota has "
                       f"{max(0, quota - used)} of {quota} left")


def check(p: DistillParams, sub: Submission) -> DistillParams:
    data_set(p.data, sub)
    teacher = check_model(p.teacher, sub, "keyed", "teacher")
    if teacher.model is not None:
        _fits_quota(sub, p.transfer)
    return p.model_copy(update={"teacher": teacher})


@job_kind("distill", DistillParams, check)
def run(ctx, p: DistillParams) -> dict:
    keyed = p.teacher.model is not None
    teacher = model_ref(p.teacher, ctx, "teacher")
    source = p.teacher.describe() + (" (keyed path)" if keyed else "")
    ctx.log(f"distilling a {p.student} from {source} on {p.data}")
    task = DistillTask.from_options(p.student, data_set(p.data, ctx), teacher=teacher, keyed=keyed,
                                    transfer=p.transfer, temperature=p.temperature, alpha=p.alpha, epochs=p.epochs,
                                    lr=p.lr, batch_size=p.batch_size, seed=p.seed)
    charge = (lambda n: ctx.charge(p.teacher.model, n)) if keyed else None
    outcome = distill.run(task, ctx.artifacts / "student.safetensors", ctx.hooks,
                          master_key=ctx.settings.master_key, charge=charge)
    ctx.log(f"student test accuracy {outcome.accuracy:.2f}% on {outcome.transfer_size} transfer images, "
            f"{len(outcome.history)} epochs")
    return {"summary": f"student {p.student}: test accuracy {outcome.accuracy:.2f}%",
            "metrics": {"student_acc": outcome.accuracy},
            "result": {"weights": "student.safetensors", "student": p.student, "source": source,
                       "transfer_size": outcome.transfer_size, "epochs": len(outcome.history)},
            "history": outcome.history, "seconds": outcome.seconds}
