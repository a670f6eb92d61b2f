"""POST /v1/jobs/{id}/cancel answers the job as its cancel found it, not as the route first read it: a delete or
the job's end landing between the route's ownership check and its cancel is forced here at that exact point (the
app's real queue, its ``cancel`` wrapped to let the other caller go first), on SQLite and on PostgreSQL."""
from __future__ import annotations

import functools

import anyio
import pytest

from service.jobs.queue import JobQueue

from .conftest import make_settings, start_service

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]

DISTILL = {"teacher": {"model": "digits-a"}, "student": "mlp", "data": "digits", "epochs": 1}


@pytest.fixture
async def jsvc(tmp_path, bundles):
    service, manager = await start_service(make_settings(tmp_path / "data", bundles), bundles.a)
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


async def queued(svc, headers) -> str:
    r = await svc.client.post("/v1/jobs", json={"kind": "distill", "params": DISTILL}, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def first(monkeypatch, queue: JobQueue, other) -> None:
    """The queue's next cancel runs ``other(job_id)`` just before it: after the route's check, before its update."""
    def cancel(job_id: str):
        other(job_id)
        return JobQueue.cancel(queue, job_id)
    monkeypatch.setattr(queue, "cancel", cancel)


def cancels(svc, job_id: str) -> list:
    return [a for a in svc.app.state.store.audit_log(1000) if a.action == "job.cancel" and a.target == job_id]


async def test_a_cancel_that_a_delete_overtook_answers_404_and_audits_nothing(jsvc, monkeypatch):
    h = jsvc.auth(jsvc.key(("jobs", "distill")))
    job_id = await queued(jsvc, h)
    assert (await jsvc.client.post(f"/v1/jobs/{job_id}/cancel", headers=h)).json()["status"] == "cancelled"
    deleted = []

    def delete(job_id: str) -> None:  # the owner's DELETE of the cancelled job, through the route, in between
        deleted.append(anyio.from_thread.run(functools.partial(
            jsvc.client.delete, f"/v1/jobs/{job_id}", headers=h)).status_code)

    first(monkeypatch, jsvc.app.state.jobs, delete)
    r = await jsvc.client.post(f"/v1/jobs/{job_id}/cancel", headers=h)
    assert deleted == [200]
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", r.text  # was a 500
    assert len(cancels(jsvc, job_id)) == 1  # the first cancel's; none for a job that no longer exists


async def test_a_cancel_that_the_jobs_end_overtook_answers_409_job_finished(jsvc, monkeypatch):
    h = jsvc.auth(jsvc.key(("jobs", "distill")))
    job_id = await queued(jsvc, h)
    queue = jsvc.app.state.jobs
    assert queue.claim("w", job_id=job_id).status == "running"
    ended = []
    first(monkeypatch, queue, lambda job_id: ended.append(queue.finish(job_id, "w", "succeeded")))
    r = await jsvc.client.post(f"/v1/jobs/{job_id}/cancel", headers=h)
    assert ended == [True]
    # as a cancel of a finished job answers (it was a 200 showing "succeeded"), and the job was not touched
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished", r.text
    assert "succeeded" in r.json()["error"]["message"]
    row = queue.get(job_id)
    assert row.status == "succeeded" and not row.cancel_requested
    assert cancels(jsvc, job_id) == []


async def test_a_cancel_that_reached_a_running_job_answers_what_it_did(jsvc):
    h = jsvc.auth(jsvc.key(("jobs", "distill")))
    job_id = await queued(jsvc, h)
    assert jsvc.app.state.jobs.claim("w", job_id=job_id).status == "running"
    r = await jsvc.client.post(f"/v1/jobs/{job_id}/cancel", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    assert len(cancels(jsvc, job_id)) == 1
    assert jsvc.app.state.jobs.finish(job_id, "w", "cancelled")  # its worker ends it
    again = await jsvc.client.post(f"/v1/jobs/{job_id}/cancel", headers=h)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"  # cancelling a cancelled job: harmless
