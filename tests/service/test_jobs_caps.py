"""The runner's caps when a job does not cooperate: a job blind to its stop (a long step that never
looks at cancel) is failed by the heartbeat once it has ignored the stop for ``job_stale_s``, and
the process running it is ended (``hard_stop``; a worker process's is ``os._exit``, and the pool or
Ray starts another). Here in process, with a stand-in for the process's end."""
from __future__ import annotations

import threading
import time

from service.auth import create_key
from service.jobs.kinds import KINDS, JobParams, Kind
from service.jobs.queue import JobQueue
from service.jobs.runner import execute, job_dir
from service.settings import Settings
from service.store import Store


def test_a_job_blind_to_its_stop_is_failed_and_its_process_ended(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path / "data", max_job_seconds=1, job_heartbeat_s=0.1, job_stale_s=1.0)
    settings.data_dir.mkdir()
    store = Store(settings.db_url)
    try:
        _, api_key = create_key(store, settings.pepper, scopes=["jobs"])
        released = threading.Event()

        def stubborn(ctx, params) -> dict:
            (ctx.artifacts / "partial.bin").write_bytes(b"x" * 100)
            released.wait(60)  # never looks at ctx.should_cancel()
            return {"summary": "done"}

        monkeypatch.setitem(KINDS._items, "stubborn", Kind("stubborn", JobParams, stubborn))
        queue = JobQueue(store)
        job = queue.claim("w", job_id=queue.submit("stubborn", {}, api_key.id)[0].id)
        ended: list[float] = []

        def hard_stop() -> None:  # a worker process would end here: the job is already failed
            ended.append(time.monotonic())
            row = queue.get(job.id)
            assert row.status == "failed" and row.error == "ran past the 1 s limit on job run time", row.error
            released.set()

        t0 = time.monotonic()
        execute(settings, queue, job, "w", hard_stop=hard_stop)
        assert ended and 2.0 <= ended[0] - t0 < 20, ended  # the limit, then the grace of job_stale_s
        row = queue.get(job.id)
        assert row.status == "failed" and row.error == "ran past the 1 s limit on job run time"
        assert row.artifact_bytes == 100  # its partial artifacts are kept, as a cancel keeps them
        log = (job_dir(settings, job.id) / "log.txt").read_text()
        assert "stopping: ran past the 1 s limit" in log and "did not stop within 1 s" in log
    finally:
        store.close()
