"""A ``distill`` job's epochs: left out, the task's default sized by optimiser steps (a small transfer set used to get
20 epochs, 80 steps at 200 images, whatever it needed); given, exactly that many. The result says how many."""
from __future__ import annotations

import anyio
import pytest

from sdb_core.distill.config import DistillConfig
from service.jobs.worker import run_worker

DISTILL = {"teacher": {"model": "digits-a"}, "student": "mlp", "data": "digits", "transfer": 200}


async def run_job(svc, token: str, params: dict) -> dict:
    r = await svc.client.post("/v1/jobs", json={"kind": "distill", "params": params}, headers=svc.auth(token))
    assert r.status_code == 202, r.text
    await anyio.to_thread.run_sync(lambda: run_worker(svc.settings, once=True))
    job = (await svc.client.get(f"/v1/jobs/{r.json()['id']}", headers=svc.auth(token))).json()
    assert job["status"] == "succeeded", job
    return job


@pytest.mark.anyio
async def test_a_distill_job_without_epochs_trains_its_small_transfer_set_by_steps(svc):
    token = svc.key(("jobs", "distill"))
    job = await run_job(svc, token, DISTILL)
    assert job["params"]["epochs"] is None  # the record keeps what was given: nothing
    steps = DistillConfig().min_steps
    assert job["result"]["epochs"] == steps // 4  # 200 images at batch 64: 4 steps an epoch
    log = (await svc.client.get(f"/v1/jobs/{job['id']}/logs", headers=svc.auth(token))).json()["text"]
    assert f"distill epoch {steps // 4}/{steps // 4}" in log and f"{steps // 4} epochs" in log
    given = await run_job(svc, token, {**DISTILL, "epochs": 2})
    assert given["result"]["epochs"] == 2  # an epoch count given is kept, however small the set


@pytest.mark.anyio
async def test_the_job_form_says_what_a_blank_epochs_means(svc):
    kinds = (await svc.client.get("/v1/job-kinds", headers=svc.auth(svc.key(("jobs",))))).json()["kinds"]
    epochs = next(k for k in kinds if k["name"] == "distill")["params_schema"]["properties"]["epochs"]
    assert epochs["default"] is None  # the console's form leaves it blank, the hint says the rule
    assert "default 20" in epochs["description"] and "2,000 optimiser steps" in epochs["description"]
