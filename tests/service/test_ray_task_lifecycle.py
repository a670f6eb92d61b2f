"""Ray tasks that outlive their hold on a job, on the local Ray instance ``sdb serve`` starts: a task that hangs
after its job was reaped gives the cluster's resources back, and a server that stops puts the jobs its Ray tasks
ran back in the queue (as an embedded worker that shuts down does), charged once."""
from __future__ import annotations

import os
import signal

from sdb_client import Client

from service.jobs.queue import JobQueue
from service.store import Store

from .jobs_helpers import QUICK, JobServer, alive, key, prepare, wait_for, worker_pid

TRAINING = {**QUICK, "epochs": 1000}  # a distill that keeps training until stopped; it charges keyed samples


def _training(c: Client, job_id: str, attempts: int = 1) -> dict:
    def ready():
        job = c.jobs.get(job_id)
        return job if job["step"].startswith("distill epoch") and job["attempts"] == attempts else None

    return wait_for(ready, 120, "training on Ray", every=0.2)


def _stored(settings, job_id: str):
    store = Store(settings.db_url)
    try:
        return JobQueue(store).get(job_id)
    finally:
        store.close()


def _end(pid: int | None) -> None:
    """End a Ray worker process this test froze, if it is still there."""
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_a_hung_task_whose_job_was_reaped_gives_its_cpu_back(tmp_path, bundles):
    # One CPU on the local instance. The task hangs (frozen: no heartbeat) and the reaper fails its job; the
    # frozen task must not keep the only CPU, or every job after it waits forever.
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    token = key(settings, ["jobs", "distill"])
    server = JobServer(data, bundles, SDB_JOBS_BACKEND="ray", SDB_WORKERS="1")
    pid = None
    try:
        with Client(server.url, token) as c:
            hung = c.jobs.submit("distill", TRAINING)
            pid = worker_pid(settings, _training(c, hung["id"]))
            os.kill(pid, signal.SIGSTOP)
            reaped = c.jobs.wait(hung["id"], timeout=60, poll_s=0.2)
            assert reaped["status"] == "failed" and "worker lost" in reaped["error"], reaped
            after = c.jobs.submit("distill", QUICK)
            job = c.jobs.wait(after["id"], timeout=120, poll_s=0.2)
            assert job["status"] == "succeeded", job
            wait_for(lambda: not alive(pid), 30, "the frozen task ended")
    finally:
        _end(pid)
        server.stop()


def test_a_server_that_stops_puts_its_ray_jobs_back_in_the_queue(tmp_path, bundles):
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    token = key(settings, ["jobs", "distill"])
    server = JobServer(data, bundles, SDB_JOBS_BACKEND="ray", SDB_WORKERS="1")
    try:
        with Client(server.url, token) as c:
            job = c.jobs.submit("distill", TRAINING)
            pid = worker_pid(settings, _training(c, job["id"]))
    finally:
        server.stop()
    assert not alive(pid)
    row = _stored(settings, job["id"])
    assert (row.status, row.attempts, row.worker) == ("queued", 0, None), (row.status, row.message)
    assert "server stopped" in row.message
    charged = row.charged_samples
    assert charged > 0

    server = JobServer(data, bundles, SDB_JOBS_BACKEND="ray", SDB_WORKERS="1")
    try:
        with Client(server.url, token) as c:
            _training(c, job["id"], attempts=1)  # sent again by the next server, and claimed once
            assert "charged by an earlier attempt" in c.jobs.logs(job["id"]).text
            c.jobs.cancel(job["id"])
            assert c.jobs.wait(job["id"], timeout=30, poll_s=0.2)["status"] == "cancelled"
    finally:
        server.stop()
    assert _stored(settings, job["id"]).charged_samples == charged
