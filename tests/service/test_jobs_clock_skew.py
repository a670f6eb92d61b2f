"""Hosts whose clocks differ on one store: a job's heartbeats and the reapers that judge them use the database's
clock, so no host's clock matters. Before, each heartbeat was stamped with the writing host's clock and each reaper
compared it with its own: with clocks more than ``SDB_JOB_STALE_S`` apart, a healthy job on a host whose clock was
behind ended "worker lost: ... sent no heartbeat for 32 s", reaped by any host whose clock was ahead (an idle worker,
the server). In process (the queue and the deploy's hold under a shifted ``time.time``) and end to end: two ``sdb
worker`` processes, one 30 s ahead and one 30 s behind, each running a job to success."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sdb_client import Client
from sqlalchemy import update

from service.jobs.queue import JobQueue
from service.store import JobRow, Store

from .conftest import sdb_env
from .jobs_helpers import FAST, QUICK, JobServer, key, prepare, stop_worker, wait_for, worker_pid

pytestmark = pytest.mark.usefixtures("db_url")  # on SQLite and on PostgreSQL

SKEW_S = 30.0  # twice the default SDB_JOB_STALE_S, ten times the tests' (FAST)
# Reaper passes every 0.1 s (FAST's 0.5 s): a job of a few seconds meets dozens, and the test need not train for long.
REAPING = {**FAST, "SDB_JOB_REAP_S": "0.1"}
REAL_TIME = time.time


def host_clock(monkeypatch, skew_s: float) -> None:
    """This process's ``time.time`` as a host whose clock is ``skew_s`` seconds off."""
    monkeypatch.setattr(time, "time", lambda: REAL_TIME() + skew_s)


@pytest.fixture
def queue(db_url):
    store = Store(db_url)
    try:
        yield JobQueue(store)
    finally:
        store.close()


def test_a_heartbeat_from_a_host_behind_is_fresh_to_a_reaper_ahead(queue, monkeypatch):
    job = queue.submit("wrap", {}, "owner")[0]
    host_clock(monkeypatch, -2 * SKEW_S)
    assert queue.claim("behind", job_id=job.id) is not None
    assert queue.heartbeat(job.id, "behind", progress=0.5, training=True).owned
    host_clock(monkeypatch, +2 * SKEW_S)
    assert queue.reap(3.0) == []
    row = queue.get(job.id)
    assert (row.status, row.worker) == ("running", "behind")
    for stamp in (row.started_at, row.heartbeat_at, row.training_at):  # what the owner reads: the store's time
        assert abs(stamp - REAL_TIME()) < 5, (stamp, REAL_TIME())
    assert queue.finish(job.id, "behind", "succeeded")
    assert abs(queue.get(job.id).finished_at - REAL_TIME()) < 5


def test_a_silent_worker_is_reaped_by_a_host_behind_saying_how_long_it_was_silent(queue, monkeypatch):
    job = queue.submit("wrap", {}, "owner")[0]
    assert queue.claim("silent", job_id=job.id) is not None
    queue.heartbeat(job.id, "silent", training=True)
    with queue.store.session.begin() as s:  # its last heartbeat, 100 s ago
        s.execute(update(JobRow).where(JobRow.id == job.id).values(heartbeat_at=REAL_TIME() - 100))
    host_clock(monkeypatch, -2 * SKEW_S)
    assert queue.reap(3.0) == [(job.id, "failed")]
    assert queue.get(job.id).error == "worker lost: worker silent sent no heartbeat for 100 s (killed or out of memory?)"


def test_a_deploy_from_a_host_behind_holds_its_job(queue, monkeypatch, tmp_path):
    """A job's deploy marks its row as one heartbeat (the reaper, waiting on the row, finds it fresh)."""
    job = queue.submit("wrap", {}, "owner")[0]
    assert queue.claim("behind", job_id=job.id) is not None
    with queue.store.session.begin() as s:  # its last heartbeat, a while ago: the deploy's hold is what counts
        s.execute(update(JobRow).where(JobRow.id == job.id).values(heartbeat_at=REAL_TIME() - 10))
    host_clock(monkeypatch, -2 * SKEW_S)
    queue.store.add_version("skewed", str(tmp_path / "skewed.sdb"), deployer=None, job=(job.id, "behind"))
    monkeypatch.setattr(time, "time", REAL_TIME)
    assert queue.reap(3.0) == []
    row = queue.get(job.id)
    assert row.status == "running" and abs(row.heartbeat_at - REAL_TIME()) < 5


# `sdb worker` on a host whose clock is SDB_TEST_CLOCK_SKEW_S seconds off (time.time only, as NTP would leave it)
SKEWED_WORKER = ("import os, sys, time; real = time.time; skew = float(os.environ['SDB_TEST_CLOCK_SKEW_S']); "
                 "time.time = lambda: real() + skew; from sdb_cli.main import main; sys.exit(main(['worker']))")


def start_skewed_worker(data: Path, bundles, skew_s: float, log: Path) -> subprocess.Popen:
    env = {**sdb_env(data, bundles), **REAPING, "SDB_TEST_CLOCK_SKEW_S": str(skew_s)}
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-c", SKEWED_WORKER], env=env, stdout=subprocess.DEVNULL, stderr=f)


def test_workers_whose_clocks_are_30_s_apart_each_run_a_job_to_success(tmp_path, bundles, servers):
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    token = key(settings, ["jobs", "distill"])
    logs = {skew: tmp_path / f"worker{skew:+.0f}.log" for skew in (SKEW_S, -SKEW_S)}
    workers = {skew: start_skewed_worker(data, bundles, skew, log) for skew, log in logs.items()}
    try:
        servers.append(JobServer(data, bundles, **{**REAPING, "SDB_WORKERS": "0"}))  # its reaper's clock is right
        wait_for(lambda: all("worker worker:" in log.read_text() for log in logs.values()), 90, "both workers up")
        with Client(servers[0].url, token) as c:
            # each job runs over many reaper passes (REAPING): a host 30 s off, past SDB_JOB_STALE_S (3 s), took its
            # heartbeats for a dead worker's at the first one
            ids = [c.jobs.submit("distill", {**QUICK, "epochs": 50, "transfer": 1000, "seed": i})["id"]
                   for i in range(2)]
            jobs = [c.jobs.wait(i, timeout=240, poll_s=0.2) for i in ids]
        for job in jobs:
            assert (job["status"], job["attempts"], job["error"]) == ("succeeded", 1, None), job
            assert job["finished_at"] - job["started_at"] > 4 * float(REAPING["SDB_JOB_REAP_S"]), job
        ran = {worker_pid(settings, j) for j in jobs}
        assert ran == {w.pid for w in workers.values()}, "each worker ran one job"
        for log in logs.values():
            assert "stopped heartbeating" not in log.read_text()
    finally:
        for w in workers.values():
            stop_worker(w)
