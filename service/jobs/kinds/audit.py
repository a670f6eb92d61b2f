"""``audit``: the leak audit against the public outputs of a hosted model (or local weights).

Public outputs are public, so the ``jobs`` scope suffices: the audit sees exactly what any
caller of ``/predict`` sees, under the chosen output policy. Artifacts: ``audit.json`` (the
audit's own report), ``table.txt``, ``advantages.png``, and the job's ``report.json``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdb_core.protect.audit_names import FAMILIES, POLICIES

from ...errors import invalid
from .base import (
    NAME_PATTERN,
    JobParams,
    Submission,
    check_arch,
    data_name,
    job_kind,
    served_model_path,
    weights_file,
)


class AuditParams(JobParams):
    model: str | None = Field(None, pattern=NAME_PATTERN, description="a hosted model (its public path)")
    model_version: str | None = None
    teacher_weights: str | None = Field(None, description="or a plain model's weights under the data dir")
    teacher_arch: str = "cnn"
    data: str
    policy: Literal[POLICIES] = "probs"  # type: ignore[valid-type]
    top_k: int = Field(3, ge=1, le=100)
    transfer: int = Field(300, ge=20, le=100_000, description="the attacker's transfer-set size")
    student: str = "mlp"
    steps: int = Field(1000, ge=10, le=100_000, description="optimisation steps per student")
    keys: int = Field(10, ge=0, le=100, description="random keys the attacker blends in")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=5)
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
    try:
        update = {"data": data_name(p.data, sub.settings)}
        if p.teacher_weights is not None:
            update["teacher_weights"] = weights_file(p.teacher_weights, sub.settings)
    except ValueError as e:
        raise invalid(str(e), "invalid_params") from None
    if p.model is not None:
        update["model_version"] = sub.models.get(p.model, p.model_version).version  # 404 if unknown
    return p.model_copy(update=update)


@job_kind("audit", AuditParams, check)
def run(ctx, p: AuditParams) -> dict:
    from dataclasses import replace

    from sdb_core.bundle import load_bundle
    from sdb_core.data import load_dataset
    from sdb_core.protect.audit import AuditConfig, audit

    data = load_dataset(p.data)
    if p.model is not None:
        bundle_path = served_model_path(ctx.queue, p.model, p.model_version)
        target = load_bundle(bundle_path)  # no master key: the public path is all an attacker has
        if list(target.meta["input"]["shape"]) != list(data.in_shape):
            raise ValueError(f"model input shape {target.meta['input']['shape']} does not match "
                             f"{p.data}'s {list(data.in_shape)}")
        what = f"model {p.model} version {p.model_version}"
    else:
        from sdb_core.models import create_model
        from sdb_core.weights import load_weights

        target = load_weights(create_model(p.teacher_arch, num_classes=data.num_classes, in_shape=data.in_shape),
                              p.teacher_weights)
        what = f"teacher weights {p.teacher_weights}"
    base = AuditConfig()
    cfg = replace(base, transfer_n=p.transfer, student=p.student, policy=p.policy, top_k=p.top_k, keys=p.keys,
                  seeds=tuple(p.seeds), steps=p.steps, families=tuple(p.families or FAMILIES))
    ctx.log(f"auditing {what} on {p.data} under policy {p.policy}: N={p.transfer}, {p.student} students")
    report = audit(target, data, cfg, progress=ctx.phase("audit"), should_cancel=ctx.should_cancel, log=ctx.log)
    paths = report.save(ctx.artifacts)
    # The job runner writes its own report.json; the audit's goes beside it as audit.json.
    paths["report"].rename(ctx.artifacts / "audit.json")
    ctx.log(report.format_table())
    summary = report.to_dict()
    return {"summary": f"{report.verdict} (worst {summary.get('worst_attack')} {summary.get('max_advantage', 0):+.2f})",
            "metrics": {"max_advantage": summary.get("max_advantage")},
            "result": {"verdict": report.verdict, "target": what, "policy": p.policy,
                       "worst_attack": summary.get("worst_attack")},
            "audit": summary}
