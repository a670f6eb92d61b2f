"""Jobs queued before the server changed under them (a parameter schema, a kind removed) fail when they
are claimed, saying why in words, on both backends; every other job still runs.

Before the fix the embedded worker failed such a job with "an unexpected error", and the Ray dispatcher
raised on it each time it looked at the queue, so every queued job it would have reached next stayed
queued for ever.
"""
from __future__ import annotations

import pytest
from sdb_client import Client

from service.auth import parse_token
from service.jobs.queue import JobQueue
from service.store import Store

from .jobs_helpers import JobServer, key, prepare

# What a job's params look like once stored (the version pinned at submission).
GOOD = {"teacher": {"model": "digits-a", "version": "1"}, "student": "mlp", "data": "digits", "epochs": 1,
        "transfer": 200}


@pytest.mark.parametrize("backend", ["embedded", "ray"])
def test_jobs_whose_params_no_longer_validate_fail_and_the_rest_run(tmp_path, bundles, backend):
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    token = key(settings, ["jobs", "distill"])
    owner = parse_token(token)[0]
    store = Store(settings.db_url)
    try:  # queued by an older server: the good one first, so the dispatcher (newest first) meets the others first
        queue = JobQueue(store)
        good = queue.submit("distill", GOOD, owner, backend=backend)[0].id
        renamed = queue.submit("distill", {**GOOD, "old_field": 3}, owner, backend=backend)[0].id
        gone = queue.submit("no-such-kind", {}, owner, backend=backend)[0].id
    finally:
        store.close()
    server = JobServer(data, bundles, SDB_JOBS_BACKEND=backend, SDB_WORKERS="1")
    try:
        with Client(server.url, token) as c:
            job = c.jobs.wait(renamed, timeout=60, poll_s=0.2)
            assert job["status"] == "failed", job
            assert "no longer fit the distill job" in job["error"] and "params.old_field" in job["error"], job
            assert "submit it again" in job["error"]
            job = c.jobs.wait(gone, timeout=60, poll_s=0.2)
            assert job["status"] == "failed" and "no job kind 'no-such-kind'" in job["error"], job
            job = c.jobs.wait(good, timeout=120, poll_s=0.2)
            assert job["status"] == "succeeded", job
            fresh = c.jobs.submit("distill", {**GOOD, "seed": 1})  # the dispatcher carries on
            assert c.jobs.wait(fresh["id"], timeout=120, poll_s=0.2)["status"] == "succeeded"
    finally:
        server.stop()
