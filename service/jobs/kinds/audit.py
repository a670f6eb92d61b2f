"""``audit``: the leak audit against the public outputs of a hosted model (or local weights).

Public outputs are public, so the ``jobs`` scope suffices: the audit sees exactly what any
caller of ``/predict`` sees, under the chosen output policy. Artifacts: ``audit.json`` (the
audit's own report), ``table.txt``, ``advantages.png``, and the job's ``report.json``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdb_core.protect.config import FAMILIES, POLICIES, AuditConfig
from sdb_core.tasks import ModelRef, audit
from sdb_core.tasks.audit import AuditTask

from .base import (
    NAME_PATTERN,
    JobParams,
    Submission,
    check_arch,
    job_kind,
    local_inputs,
    served_model_path,
)


class AuditParams(JobParams):
    model: str | None = Field(None, pattern=NAME_PATTERN, description="a hosted model (its public path)")
    model_version: str | None = None
    teacher_weights: str | None = Field(None, description="or a plain model's weights under the data dir")
    teacher_arch: str = "cnn"
    data: str
    policy: Literal[POLICIES] = AuditConfig().policy  # type: ignore[valid-type]
    top_k: int = Field(AuditConfig().top_k, ge=1, le=100)
    transfer: int = Field(AuditConfig().transfer_n, ge=20, le=100_000, description="the attacker's transfer-set size")
    student: str = AuditConfig().student
    steps: int = Field(AuditConfig().steps, ge=10, le=100_000, description="optimisation steps per student")
    keys: int = Field(AuditConfig().keys, ge=0, le=100, description="random keys the attacker blends in")
    seeds: list[int] = Field(default_factory=lambda: list(AuditConfig().seeds), min_length=1, max_length=5)
    families: list[Literal[FAMILIES]] | None = Field(None, description="attack families; default all")  # type: ignore[valid-type]

    @field_validator("student", "teacher_arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return check_arch(v)

    @model_validator(mode="after")
    def _one_target(self):
        if (self.model is None) == (self.teacher_weights is None):
            raise ValueError("give exactly one of model (a hosted model) or teacher_weights (a local file)")
        if self.families is not None and "labels" not in self.families:
            raise ValueError("families must include 'labels': the advantage is measured against it")
        return self


def check(p: AuditParams, sub: Submission) -> AuditParams:
    update = local_inputs(sub.settings, data=p.data, teacher_weights=p.teacher_weights)
    if p.model is not None:
        update["model_version"] = sub.models.get(p.model, p.model_version).version  # 404 if unknown
    return p.model_copy(update=update)


@job_kind("audit", AuditParams, check)
def run(ctx, p: AuditParams) -> dict:
    if p.model is not None:
        bundle = served_model_path(ctx.queue, p.model, p.model_version)
        target = ModelRef(model=p.model).hosted_at(bundle, p.model_version)
    else:
        target = ModelRef(arch=p.teacher_arch, weights=p.teacher_weights)
    cfg = replace(AuditConfig(), transfer_n=p.transfer, student=p.student, policy=p.policy, top_k=p.top_k,
                  keys=p.keys, seeds=tuple(p.seeds), steps=p.steps, families=tuple(p.families or FAMILIES))
    outcome = audit.run(AuditTask(p.data, target, cfg), ctx.artifacts, ctx.hooks)
    report = outcome.report
    # The job runner writes its own report.json; the audit's goes beside it as audit.json.
    outcome.paths["report"].rename(ctx.artifacts / "audit.json")
    ctx.log(report.format_table())
    summary = report.to_dict()
    return {"summary": f"{report.verdict} (worst {summary.get('worst_attack')} {summary.get('max_advantage', 0):+.2f})",
            "metrics": {"max_advantage": summary.get("max_advantage")},
            "result": {"verdict": report.verdict, "target": target.describe(), "policy": p.policy,
                       "worst_attack": summary.get("worst_attack")},
            "audit": summary}
