"""What a running job is held to, by the workers that run it (embedded processes and Ray tasks): its
run time (``SDB_MAX_JOB_SECONDS``) and its key's artifact storage (``SDB_MAX_ARTIFACT_STORAGE_PER_KEY``).

A job past its run time ends ``failed`` saying so, and its key's slot is free again; a job whose
artifacts take its key past the cap ends ``failed`` saying so and keeps no artifact. Before, neither
setting existed: a job ran as long as it liked and kept whatever it wrote.
"""
from __future__ import annotations

import pytest
from sdb_client import Client, NotFound

from tests.service.conftest import run_sdb
from tests.service.jobs_helpers import LONG, QUICK, JobServer, key, prepare, wait_for

LIMIT_S = 6


@pytest.mark.parametrize("backend", ["embedded", "ray"])
def test_a_job_past_its_run_time_is_stopped_and_fails_saying_so(tmp_path, bundles, servers, backend):
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    token = key(settings, ["jobs", "distill"])
    servers.append(JobServer(data, bundles, SDB_JOBS_BACKEND=backend, SDB_WORKERS="1",
                             SDB_MAX_JOB_SECONDS=str(LIMIT_S), SDB_MAX_ACTIVE_JOBS_PER_KEY="1"))
    with Client(servers[0].url, token) as c:
        long = c.jobs.submit("wrap", LONG)
        job = c.jobs.wait(long["id"], timeout=90, poll_s=0.2)
        assert job["status"] == "failed", job
        assert job["error"] == f"ran past the {LIMIT_S} s limit on job run time", job
        assert LIMIT_S <= job["finished_at"] - job["started_at"] < LIMIT_S + 30, job
        log = c.jobs.logs(long["id"]).text
        assert f"stopping: ran past the {LIMIT_S} s limit" in log and "did not stop within" not in log
        assert str(data) not in job["error"] + log
        # Its key's one slot is free again, and the worker takes the next job.
        quick = c.jobs.submit("distill", QUICK)
        assert c.jobs.wait(quick["id"], timeout=90, poll_s=0.2)["status"] in ("succeeded", "failed")
        assert wait_for(lambda: c.jobs.get(quick["id"])["attempts"] == 1, 5, "claimed once")


def test_a_job_whose_artifacts_pass_its_keys_cap_fails_and_keeps_nothing(tmp_path, bundles, servers):
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    token = key(settings, ["jobs", "distill"])
    servers.append(JobServer(data, bundles, SDB_WORKERS="1", SDB_MAX_ARTIFACT_STORAGE_PER_KEY="2048"))
    with Client(servers[0].url, token) as c:
        job = c.jobs.submit("distill", QUICK)
        job = c.jobs.wait(job["id"], timeout=120, poll_s=0.2)
        assert job["status"] == "failed", job
        assert "past its 2048-byte cap on artifact storage" in job["error"], job
        assert "they were removed" in job["error"] and "DELETE /v1/jobs/" in job["error"]
        assert c.jobs.artifacts(job["id"]) == [] and job["artifact_bytes"] == 0
        assert not [p for p in (data / "jobs" / job["id"] / "artifacts").rglob("*") if p.is_file()]
        # Nothing kept counts against the cap: the key still queues jobs.
        again = c.jobs.submit("distill", {**QUICK, "seed": 1})
        assert again["status"] == "queued"
        # The owner deletes the failed job (the command line, through the SDK's jobs.delete).
        env = {**servers[0].env, "SDB_URL": servers[0].url, "SDB_API_KEY": token}
        r = run_sdb("jobs", "delete", job["id"], env=env)
        assert r.returncode == 0 and r.stdout.strip() == f"deleted {job['id']}", r.stderr
        with pytest.raises(NotFound):
            c.jobs.get(job["id"])
        assert not (data / "jobs" / job["id"]).exists()


def test_a_wrap_whose_bundle_passes_its_keys_cap_fails_and_serves_nothing(tmp_path, bundles, servers):
    # deploy: true is the job's last step and cannot be taken back: a bundle that already takes the key
    # past its artifact cap fails the job before it is served (it was served, then the job failed).
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    token = key(settings, ["jobs", "deploy"])
    servers.append(JobServer(data, bundles, SDB_WORKERS="1", SDB_MAX_ARTIFACT_STORAGE_PER_KEY="4096",
                             # no heartbeat in the wrap's seconds (and none missed): the deploy step decides
                             SDB_JOB_HEARTBEAT_S="30", SDB_JOB_STALE_S="120"))
    loose = {"max_accuracy_drop": 100, "max_keyed_drop": 100, "min_leak_margin": -100, "min_guessed_key_share": -10, "check_attempts": 1}
    with Client(servers[0].url, token) as c:
        job = c.jobs.submit("wrap", {"data": "digits", "teacher": {"arch": "mlp"}, "teacher_epochs": 1, "epochs": 1,
                                     "name": "capped", "deploy": True, **loose})
        job = c.jobs.wait(job["id"], timeout=120, poll_s=0.2)
        assert job["status"] == "failed" and "past its 4096-byte cap on artifact storage" in job["error"], job
        assert "deployed" not in c.jobs.logs(job["id"]).text
        with pytest.raises(NotFound):
            c.model("capped")
        assert c.jobs.artifacts(job["id"]) == [] and job["artifact_bytes"] == 0
