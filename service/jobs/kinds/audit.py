"""``audit``: the leak audit against the public outputs of a hosted model (or uploaded weights).

Public outputs are public, so the ``jobs`` scope suffices (and ``predict`` where the server's
``public_predict`` is off), for a model on the key's allowlist: the audit sees exactly what any
caller of ``/predict`` sees, under the chosen output policy. Artifacts: ``audit.json`` (the
audit's own report), ``table.txt``, ``advantages.png``, and the job's ``report.json``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from sdb_core.protect.config import FAMILIES, POLICIES, AuditConfig, no_attack
from sdb_core.reports import report_json
from sdb_core.tasks import audit
from sdb_core.tasks.audit import AuditTask

from ...disclosure import hide_paths, hide_paths_in
from ...errors import invalid
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


class AuditParams(JobParams):
    target: ModelParam = Field(description="a hosted model (its public outputs) or a plain model's uploaded "
                               "weights ({file, arch})")
    data: str = Field(description="an embedded data set (digits, mnist-5k, ...) or an uploaded dataset's file id")
    # null in the schema, not AuditConfig's probs and 3: a client generated from /openapi.json (or the console's
    # form) sends every default, and a probs it never chose was a 422 for a model served under another policy.
    policy: Literal[POLICIES] | None = Field(  # type: ignore[valid-type]
        None, description="probs, top_k or label. Null or omitted: the policy a hosted target is served with "
        f"(uploaded weights: {AuditConfig().policy}); another one than the served needs an admin key")
    top_k: int | None = Field(None, ge=1, le=100, description="k of the top_k policy. Null or omitted: the served "
                              f"one's (else {AuditConfig().top_k}); another one than the served needs an admin key")
    transfer: int = Field(AuditConfig().transfer_n, ge=20, le=100_000, description="the attacker's transfer-set size")
    student: str = AuditConfig().student
    steps: int = Field(AuditConfig().steps, ge=10, le=100_000, description="optimisation steps per student")
    keys: int = Field(AuditConfig().keys, ge=0, le=100, description="random keys the attacker blends in")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: list(AuditConfig().seeds), min_length=1,
                                                      max_length=5)
    families: list[Literal[FAMILIES]] | None = Field(None, description="attack families; default all")  # type: ignore[valid-type]

    @field_validator("student")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return check_arch(v)

    @model_validator(mode="after")
    def _families(self):
        if self.families is not None and "labels" not in self.families:
            raise ValueError("families must include 'labels': the advantage is measured against it")
        why = no_attack(self.families or FAMILIES, self.keys)  # the target's keyed path: in check()
        if why is not None:
            raise ValueError(why)
        return self

    def reads(self) -> list[Access]:
        return self.target.reads("public")


def check(p: AuditParams, sub: Submission) -> AuditParams:
    data_set(p.data, sub)
    p = p.model_copy(update={"target": check_model(p.target, sub, "public", "target")})
    _attacks_the_target(p, sub)
    return _under_the_served_policy(p, sub)


def _attacks_the_target(p: AuditParams, sub: Submission) -> None:
    """A 422 for families that attack nothing on this target: 'keys' alone on a model with no keyed path (a hosted
    plain or Nasty model; uploaded weights are a plain network). Its audit would fail at start; no job runs for it."""
    keyed = p.target.model is not None and sub.models.get(p.target.model, p.target.version).distillable
    why = no_attack(p.families or FAMILIES, p.keys, keyed)
    if why is not None:
        raise invalid(f"{p.target.describe()}: {why}", "invalid_params")


def _under_the_served_policy(p: AuditParams, sub: Submission) -> AuditParams:
    """A hosted model is audited under the output policy it is served with: what its callers get is all
    an attacker gets. Only an admin key may audit it under another policy (what would a change leak?).
    A null policy or top_k is not given: the served one's (uploaded weights: the audit's defaults)."""
    if p.target.model is None:
        return _given_else(p, AuditConfig().policy, AuditConfig().top_k)
    served = sub.models.get(p.target.model, p.target.version).policy
    audited = _given_else(p, served.policy, served.top_k or AuditConfig().top_k)
    other = audited.policy != served.policy or (served.policy == "top_k" and audited.top_k != served.top_k)
    if other and not sub.key.grants("admin"):
        raise invalid(f"model {p.target.model!r} is served under the {served.policy!r} policy"
                      + (f" (top {served.top_k})" if served.policy == "top_k" else "")
                      + "; its audit runs under that policy (another one needs an admin key)", "invalid_params")
    return audited


def _given_else(p: AuditParams, policy: str, top_k: int) -> AuditParams:
    """``p`` with the policy and top_k it gives, and ``policy`` and ``top_k`` for those it leaves null."""
    return p.model_copy(update={"policy": p.policy or policy, "top_k": p.top_k or top_k})


@job_kind("audit", AuditParams, check)
def run(ctx, p: AuditParams) -> dict:
    target = model_ref(p.target, ctx, "target")
    cfg = replace(AuditConfig(), transfer_n=p.transfer, student=p.student, policy=p.policy, top_k=p.top_k,
                  keys=p.keys, seeds=tuple(p.seeds), steps=p.steps, families=tuple(p.families or FAMILIES))
    outcome = audit.run(AuditTask(data_set(p.data, ctx), target, cfg), ctx.artifacts, ctx.hooks)
    report = outcome.report
    # The job runner writes its own report.json; the audit's goes beside it as audit.json. Both it and
    # table.txt name an uploaded data set by its place under the data dir, as report.json does.
    root = ctx.settings.data_dir
    audit_json = outcome.paths["report"].rename(ctx.artifacts / "audit.json")
    audit_json.write_text(report_json(hide_paths_in(json.loads(audit_json.read_text()), root)))
    outcome.paths["table"].write_text(hide_paths(outcome.paths["table"].read_text(), root))
    ctx.log(report.format_table())
    summary = report.to_dict()
    return {"summary": f"{report.verdict} (worst {summary.get('worst_attack')} {summary.get('max_advantage', 0):+.2f})",
            "metrics": {"max_advantage": summary.get("max_advantage")},
            "result": {"verdict": report.verdict, "target": p.target.describe(), "policy": p.policy,
                       "worst_attack": summary.get("worst_attack")},
            "audit": summary}
