"""``wrap``: the SDB (or Nasty) recipe on a named data set, from teacher weights under the data
dir or from an architecture trained first; ``deploy: true`` serves the bundle as a new version.

Deploying writes the model row to the store, the way ``sdb models add`` does: every API
process picks it up on its next model sync (``models_sync_s``), with no call between processes.
"""
from __future__ import annotations

import json
import shutil
from typing import Literal

from pydantic import Field, field_validator

from sdb_core.protect.config import CheckConfig, SDBConfig, Thresholds
from sdb_core.tasks import wrap
from sdb_core.tasks.wrap import WrapTask

from ...errors import ApiError, invalid
from ...registry import version_key
from .base import NAME_PATTERN, JobParams, Submission, check_arch, data_name, job_kind, under


class WrapParams(JobParams):
    data: str = Field(description="data set name: digits, mnist-5k, imagefolder:PATH (under the data dir)")
    arch: str = Field(description="the teacher's architecture")
    teacher: str | None = Field(None, description="teacher weights, a path under the data dir; "
                                "absent: a teacher is trained first")
    teacher_epochs: int | None = Field(None, ge=1, le=1000, description="absent: the architecture's schedule")
    epochs: int = Field(SDBConfig().train.epochs, ge=1, le=1000)
    name: str | None = Field(None, pattern=NAME_PATTERN, description="model name (default DATA-ARCH)")
    deploy: bool = False
    mode: Literal["sdb", "nasty"] = "sdb"
    lam: float = Field(SDBConfig().lam, gt=0, lt=1, description="keyed input λ·x + (1 − λ)·k")
    lr: float = Field(SDBConfig().train.lr, gt=0, le=10)
    batch_size: int = Field(SDBConfig().train.batch_size, ge=1, le=4096)
    max_accuracy_drop: float = Field(Thresholds().max_accuracy_drop, ge=0, le=100, description=(
        "self-check: points of top-1 the public path may lose against the teacher, measured on a held-out "
        "part of the training split"))
    max_keyed_drop: float = Field(Thresholds().max_keyed_drop, ge=0, le=100,
                                  description="self-check: points of top-1 the keyed path may lose")
    min_leak_margin: float = Field(Thresholds().min_leak_margin, ge=-100, le=100, description=(
        "self-check: points a student distilled from the public outputs must stay below labels alone"))
    check_attempts: int = Field(CheckConfig().max_attempts, ge=1, le=10, description="self-check: settings tried")
    check_budget: float | None = Field(None, gt=0, le=86400,
                                       description="self-check: seconds after which no new attempt starts")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return check_arch(v)

    @property
    def model_name(self) -> str:
        return self.name or f"{self.data.split(':')[0]}-{self.arch}"


def check(p: WrapParams, sub: Submission) -> WrapParams:
    try:
        data = data_name(p.data, sub.settings)
        teacher = None
        if p.teacher is not None:
            path = under(sub.settings.data_dir, p.teacher, "teacher")
            if not path.is_file():
                raise ValueError(f"no teacher weights at {p.teacher!r} under the data directory")
            teacher = str(path)
    except ValueError as e:
        raise invalid(str(e), "invalid_params") from None
    if p.deploy and p.model_name in sub.models and not sub.key.grants("admin") \
            and not _deployed_by(sub, p.model_name):
        raise ApiError(403, "model_not_owned", f"model {p.model_name!r} is served and was not deployed by "
                       "this key's jobs: deploying a new version of it needs the admin scope")
    return p.model_copy(update={"data": data, "teacher": teacher})


def _deployed_by(sub: Submission, name: str) -> bool:
    return any(j.result and f'"model": "{name}"' in j.result
               for j in sub.queue.list(owner=sub.key.id, kind="wrap", status="succeeded", limit=1000))


def _next_version(store, name: str) -> str:
    numeric = [int(r.version) for r in store.list_models() if r.name == name and r.version.isdigit()]
    others = [r.version for r in store.list_models() if r.name == name and not r.version.isdigit()]
    if not numeric and others:
        return f"{max(others, key=version_key)}.1"
    return str(max(numeric, default=0) + 1)


@job_kind("wrap", WrapParams, check)
def run(ctx, p: WrapParams) -> dict:
    store = ctx.queue.store
    version = _next_version(store, p.model_name) if p.deploy else "1"
    out = ctx.artifacts / "bundle.sdb"
    from sdb_core.protect.check import WrapRefused  # here: importing a job kind must not import torch

    task = WrapTask.from_options(
        p.data, p.arch, teacher=p.teacher, name=p.model_name, version=version, teacher_epochs=p.teacher_epochs,
        mode=p.mode, lam=p.lam, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, seed=p.seed,
        max_accuracy_drop=p.max_accuracy_drop, max_keyed_drop=p.max_keyed_drop, min_leak_margin=p.min_leak_margin,
        check_attempts=p.check_attempts, check_budget=p.check_budget)
    try:
        outcome = wrap.run(task, out, ctx.hooks, master_key=ctx.settings.master_key)
    except WrapRefused as e:  # the job fails with the message; what was tried stays as an artifact
        (ctx.artifacts / "check.json").write_text(json.dumps(e.report, indent=2))
        raise
    ctx.log("metrics: " + ", ".join(f"{k} {v:.2f}%" for k, v in outcome.metrics.items()))
    result = {"model": outcome.name, "version": version, "bundle": "bundle.sdb", "deployed": False}
    if p.deploy:
        ctx.step("deploying")
        result.update(deploy(ctx, out, outcome.name, version))
    return {"summary": f"wrapped {outcome.name} version {version}" + (" (deployed)" if p.deploy else ""),
            "metrics": outcome.metrics, "result": result,
            "report": {k: v for k, v in outcome.report.items()}, "teacher_history": outcome.teacher_history}


def deploy(ctx, bundle, name: str, version: str) -> dict:
    """Copy the bundle beside the served ones, verify it, and register it in the store."""
    from sdb_core.bundle import load_bundle

    settings, store = ctx.settings, ctx.queue.store
    target = settings.bundles_dir / name / f"{version}.sdb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle, target)
    load_bundle(target, settings.master_key)  # refuse to register what the server would refuse to load
    row = store.add_model(name, version, str(target.resolve()))
    if row is None:
        raise RuntimeError(f"model {name!r} version {version!r} was registered meanwhile; not deployed")
    store.audit(f"job:{ctx.job.id}", "model.add", f"{name}@{version}", str(target))
    ctx.log(f"deployed {name} version {version}")
    return {"deployed": True}  # where the bundle lies is the server's business (the store and audit log have it)
