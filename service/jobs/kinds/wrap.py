"""``wrap``: the SDB (or Nasty) recipe on a named data set, from uploaded teacher weights
(``teacher: {file, arch}``) or from an architecture trained first (``teacher: {arch}``);
``deploy: true`` serves the bundle as a new version.

Deploying is :func:`service.deploy.deploy_bundle`, as for ``POST /v1/models``: only under a name on the
key's model allowlist, and only the name's owner (or an admin) adds a version, checked when the job is
submitted and again when it deploys (the owner in the deploy's transaction); every API process serves the
version as soon as the job reports it.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from sdb_core.protect.config import CheckConfig, SDBConfig, Thresholds
from sdb_core.reports import report_json
from sdb_core.tasks import wrap
from sdb_core.tasks.refs import ONNX_ARCH
from sdb_core.tasks.wrap import WrapTask

from ...schemas import OutputPolicy
from .base import NAME_PATTERN, JobParams, ModelParam, Submission, check_model, data_set, job_kind, model_ref


class WrapTeacher(ModelParam):
    """The model a wrap protects: uploaded weights of a zoo architecture, or the architecture alone (trained first)."""

    SOURCES = ("file", "arch")


class WrapParams(JobParams):
    data: str = Field(description="an embedded data set (digits, mnist-5k, ...) or an uploaded dataset's file id")
    teacher: WrapTeacher = Field(description="{arch}: a teacher of that architecture is trained first; "
                                 "{file, arch}: uploaded teacher weights")
    teacher_epochs: int | None = Field(None, ge=1, le=1000, description="absent: the architecture's schedule")
    epochs: int = Field(SDBConfig().train.epochs, ge=1, le=1000)
    name: str | None = Field(None, pattern=NAME_PATTERN, description="model name (default DATA-ARCH)")
    deploy: bool = False
    output_policy: OutputPolicy | None = Field(None, description="what the public routes return (default probs, "
                                               "unrounded): written to the bundle's meta.json, and served with "
                                               "on deploy; see docs/security.md#output-policy")
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
    min_guessed_key_share: float = Field(Thresholds().min_guessed_key_share, ge=-10, le=10, description=(
        "self-check (SDB): how little a random key may teach, as a share of the way from the key's soft labels "
        "to the confusion target's"))
    check_attempts: int = Field(CheckConfig().max_attempts, ge=1, le=10, description="self-check: settings tried")
    check_budget: float | None = Field(None, gt=0, le=86400,
                                       description="self-check: seconds after which no new attempt starts")

    @property
    def model_name(self) -> str:
        return self.name or f"{self.data.split(':')[0]}-{self.teacher.arch or ONNX_ARCH}"  # no arch: an ONNX file


def check(p: WrapParams, sub: Submission) -> WrapParams:
    data_set(p.data, sub)
    check_model(p.teacher, sub, "public", "teacher")  # a file: resolved for this key; no hosted model here
    if p.deploy:  # early (name, allowlist, owner); the deploy checks again, the owner in its transaction
        from ...deploy import check_deploy_rights

        check_deploy_rights(sub.queue.store, p.model_name, sub.key)
    return p


def _next_version(store, name: str) -> str:
    """The version the bundle is built as (its meta.json's); the deploy assigns the served one."""
    return store.next_version(name)


@job_kind("wrap", WrapParams, check)
def run(ctx, p: WrapParams) -> dict:
    store = ctx.queue.store
    version = _next_version(store, p.model_name) if p.deploy else "1"
    out = ctx.artifacts / "bundle.sdb"
    from sdb_core.protect.check import WrapRefused  # here: importing a job kind must not import torch

    teacher = model_ref(p.teacher, ctx, "teacher")
    task = WrapTask.from_options(
        data_set(p.data, ctx), teacher.arch, teacher=teacher.weights, teacher_mean=teacher.mean,
        teacher_std=teacher.std, data_label=p.data, name=p.model_name,
        version=version, teacher_epochs=p.teacher_epochs,
        mode=p.mode, lam=p.lam, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, seed=p.seed,
        max_accuracy_drop=p.max_accuracy_drop, max_keyed_drop=p.max_keyed_drop, min_leak_margin=p.min_leak_margin,
        min_guessed_key_share=p.min_guessed_key_share, check_attempts=p.check_attempts, check_budget=p.check_budget,
        output_policy=None if p.output_policy is None else p.output_policy.model_dump(exclude_none=True))
    try:
        outcome = wrap.run(task, out, ctx.hooks, master_key=ctx.settings.master_key)
    except WrapRefused as e:  # the job fails with the message; what was tried stays as an artifact
        (ctx.artifacts / "check.json").write_text(report_json(e.report))
        raise
    ctx.log("metrics: " + ", ".join(f"{k} {v:.2f}%" for k, v in outcome.metrics.items()))
    result = {"model": outcome.name, "version": version, "bundle": "bundle.sdb", "deployed": False}
    if p.deploy:
        ctx.step("deploying")
        result.update(deploy(ctx, out, outcome.name, p.output_policy))
    return {"summary": f"wrapped {outcome.name} version {version}" + (" (deployed)" if p.deploy else ""),
            "metrics": outcome.metrics, "result": result,
            "report": {k: v for k, v in outcome.report.items()}, "teacher_history": outcome.teacher_history}


def deploy(ctx, bundle, name: str, output_policy=None) -> dict:
    """Serve the bundle as the next version of ``name`` for the job's key: :func:`service.deploy.deploy_bundle`
    (a new file, verified, the name checked against the key's allowlist as the key stands now, and the owner in
    the transaction that adds the version: a job queued before either allowed it deploys nothing)."""
    from sdb_core.progress import Cancelled

    from ... import deploy as deploying
    from ..runner import artifacts_over_cap, settled

    # The last step that cannot be taken back, so it is taken only for a job that ends "succeeded": not
    # for one a cap or its key stopped while the recipe ran, nor for one whose artifacts already take its
    # key past its storage cap (the runner would fail it and drop the bundle, leaving a version served).
    # Its store calls wait out an outage as the job's end does (settled): the job failed "with an unexpected error".
    settled(ctx.check_key)
    over = settled(artifacts_over_cap, ctx, ctx.artifact_bytes())
    if over is not None:
        ctx.halt(over, drop_artifacts=True)
    if ctx.key_stop is not None or ctx.failure is not None or ctx.cancel.is_set():
        raise Cancelled(ctx.key_stop or ctx.failure or "cancelled before deploying")
    tried = False

    def deploy_bundle():  # the name settled() logs a retry under
        """A try of :func:`service.deploy.deploy_bundle`, or, after one that raised, the version it registered: a
        commit whose answer was lost (the connection cut during COMMIT) added it all the same, and a second try
        added another version (a second copy, held against the key's storage cap)."""
        nonlocal tried
        if tried:
            row = _deployed_by(ctx, name)
            if row is not None:
                return row
        tried = True
        # a try the store did not take leaves nothing (deploy_bundle discards its copy): the next one deploys anew
        return deploying.deploy_bundle(ctx.settings, ctx.queue.store, bundle, key=ctx.key, actor=f"job:{ctx.job.id}",
                                       name=name, policy=output_policy, shown="bundle.sdb",
                                       job=(ctx.job.id, ctx.worker),
                                       capped=not ctx.key.grants("admin"))  # check_key read it: no job without one

    row = settled(deploy_bundle)
    ctx.log(f"deployed {row.name} version {row.version}")
    # every API process serves it from now on (loaded on its first request); where the bundle lies is the
    # server's business (the store and audit log have it)
    return {"deployed": True, "version": row.version}


def _deployed_by(ctx, name: str):
    """The version of ``name`` the job's deploy registered, or None: the job's row says what it served, written in
    the transaction that added the version (:func:`service.store._hold_job_for_deploy`), while the job is still this
    worker's. Its ``model.add`` audit row, which the lost answer kept deploy_bundle from writing, is written here."""
    job = ctx.queue.get(ctx.job.id)
    if job is None or job.worker != ctx.worker or job.status != "running":
        return None
    served = json.loads(job.result or "{}")
    if not served.get("deployed") or served.get("model") != name:
        return None
    row = ctx.queue.store.get_model(name, str(served["version"]))
    if row is not None:
        ctx.queue.store.audit(f"job:{ctx.job.id}", "model.add", f"{row.name}@{row.version}", row.path)
        ctx.log(f"the store had taken the deploy whose answer was lost: version {row.version}")
    return row
