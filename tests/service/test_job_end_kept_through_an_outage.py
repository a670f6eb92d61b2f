"""A job that fails while the store does not take writes (a full disk, an outage) keeps its own reason: the worker
holds the job's end, heartbeating, until the store takes it, however long that is.

Before the fix the worker gave the end up after SETTLE_S (60 s) and the reaper, once the store answered, recorded
"worker lost: ... sent no heartbeat for 108 s (killed or out of memory?)": the real cause (ENOSPC) was lost. The
outage is real (the SQLite file's folder away, as a volume unmounted) and outlasts a SETTLE_S shortened for the test.
"""
from __future__ import annotations

import threading
import time
from contextlib import closing

from service.jobs import runner
from service.jobs.queue import JobQueue
from service.settings import Settings
from service.store import Store


def test_a_job_that_failed_during_an_outage_longer_than_settle_s_ends_with_its_own_reason(tmp_path, monkeypatch,
                                                                                          caplog):
    for k in ("SDB_DATABASE_URL", "SDB_MASTER_KEY_FILE", "SDB_PEPPER_FILE", "SDB_SECRETS_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(runner, "SETTLE_S", 0.3)
    folder = tmp_path / "db"
    folder.mkdir()
    url = f"sqlite:///{folder / 'sdb.sqlite3'}"
    settings = Settings(data_dir=tmp_path / "data", database_url=url, register_demo=False, workers=0,
                        job_heartbeat_s=0.2, job_stale_s=1.0)
    with closing(Store(url)) as worker_store:
        queue = JobQueue(worker_store)
        job = queue.submit("retired-kind", {}, "owner")[0]  # fails at once: no such kind (StaleJob)
        job = queue.claim("w1", job_id=job.id)
        away = folder.with_name("db-away")
        folder.rename(away)  # the store takes no write from here on: the job's end cannot be stored
        worker_store.engine.dispose()
        ended: list[str] = []
        t = threading.Thread(target=lambda: ended.append(runner.execute(settings, queue, job, "w1")))
        t.start()
        time.sleep(1.5)  # five times SETTLE_S
        assert t.is_alive(), f"the worker gave the job's end up: {ended}"
        away.rename(folder)
        t.join(timeout=10)
        assert ended == ["failed"]
    # Its heartbeat failed every 0.2 s meanwhile: one traceback, then a line a beat (a traceback each flooded the log)
    beats = [r for r in caplog.records if r.name == runner.log.name and "heartbeat failed" in r.getMessage()]
    assert len(beats) >= 3 and sum(r.exc_info is not None for r in beats) == 1, [r.getMessage() for r in beats]
    with closing(Store(url)) as api:
        assert JobQueue(api).reap(settings.job_stale_s) == []
        with api.session() as s:
            row = s.get(type(job), job.id)
        assert row.status == "failed" and "no job kind 'retired-kind'" in row.error, row.error
