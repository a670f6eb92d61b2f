"""The job reaper waits out an outage of the store (no worker could heartbeat), and nothing else.

Before the fix, any OperationalError of the reaper's process (SQLite's "database is locked", a failing statement,
PostgreSQL's timeouts and deadlocks) counted as an outage and postponed reaping by ``stale_s``: contention more often
than that kept a dead worker's job running for ever. Now only a store this process could not reach counts (a
connection lost or not made, SQLite's CANTOPEN, IOERR or FULL, PostgreSQL's connection and resource errors), and even
an outage that comes back again and again holds the reaping only until the store has answered for ``stale_s``; a
read-only store (writes fail, reads pass) is one outage from its first failure to its last.
The outages are real: the SQLite file's folder moved away, so that a new connection cannot open it (CANTOPEN), as
when a volume is unmounted. PostgreSQL's restart is in test_store_postgres.py.
"""
from __future__ import annotations

import contextlib
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from service.jobs.queue import JobQueue
from service.store import Store

STALE = 1.0


def dead_workers_job(reaper: JobQueue, worker: JobQueue, worker_id: str = "w1") -> str:
    """A job a worker claimed and trained, then died with (no heartbeat from now on)."""
    job = reaper.submit("wrap", {}, "owner")[0]
    assert worker.claim(worker_id, job_id=job.id).id == job.id
    assert worker.heartbeat(job.id, worker_id, training=True).owned
    return job.id


@contextlib.contextmanager
def folder_away(store: Store, folder: Path):
    """The store's folder gone a moment (a volume unmounted): a new connection cannot open its file (CANTOPEN)."""
    store.engine.dispose()  # no pooled connection goes on with the file
    away = folder.with_name(folder.name + "-away")
    folder.rename(away)
    try:
        yield
    finally:
        away.rename(folder)


def fail_to_reach(store: Store, folder: Path) -> None:
    with folder_away(store, folder), pytest.raises(OperationalError, match="unable to open"), store.session() as s:
        s.scalar(select(1))


@pytest.fixture
def sqlite_stores(tmp_path):
    """The reaper's store and a worker's (another process's, as far as the store can tell), on one SQLite file."""
    folder = tmp_path / "db"
    folder.mkdir()
    url = f"sqlite:///{folder / 'sdb.sqlite3'}"
    with closing(Store(url)) as api, closing(Store(url)) as worker_store:
        yield api, worker_store, folder


def test_a_locked_store_does_not_hold_the_reaping_of_a_dead_workers_job(sqlite_stores):
    api, worker_store, folder = sqlite_stores
    reaper, worker = JobQueue(api), JobQueue(worker_store)
    event.listen(api.engine, "connect", lambda conn, _record: conn.execute("PRAGMA busy_timeout=100"))
    api.engine.dispose()  # its writers give up after 0.1 s, not 30 s: the same error, sooner
    job = dead_workers_job(reaper, worker)
    time.sleep(STALE + 0.2)
    other = sqlite3.connect(folder / "sdb.sqlite3", timeout=30)  # another process's long write holds the lock
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError, match="database is locked"):
            reaper.submit("wrap", {}, "owner2")  # a request of the reaper's process meanwhile
        other.rollback()
    finally:
        other.close()
    assert reaper.reap(STALE) == [(job, "failed")]


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_a_failing_statement_or_a_timeout_does_not_hold_the_reaping_of_a_dead_workers_job(db_url):
    with closing(Store(db_url)) as api, closing(Store(db_url)) as worker_store:
        reaper, worker = JobQueue(api), JobQueue(worker_store)
        job = dead_workers_job(reaper, worker)
        time.sleep(STALE + 0.2)
        with api.session() as s, pytest.raises(DBAPIError, match="no_such_table"):
            s.execute(text("SELECT * FROM no_such_table"))  # SQLite: an OperationalError
        if api.engine.dialect.name == "postgresql":
            with api.session() as s, pytest.raises(OperationalError, match="statement timeout"):
                s.execute(text("SET LOCAL statement_timeout = 10"))
                s.execute(text("SELECT pg_sleep(1)"))  # 57014
        assert reaper.reap(STALE) == [(job, "failed")]


def test_an_outage_longer_than_stale_s_still_holds_the_reaping_of_jobs_it_silenced(sqlite_stores):
    api, worker_store, folder = sqlite_stores
    reaper, worker = JobQueue(api), JobQueue(worker_store)
    job = dead_workers_job(reaper, worker)
    with folder_away(api, folder):
        with pytest.raises(OperationalError, match="unable to open"):
            reaper.reap(STALE)  # the reaper's own look fails while the store is away
        time.sleep(STALE + 0.5)  # no worker could heartbeat meanwhile
    assert reaper.reap(STALE) == []
    assert worker.heartbeat(job, "w1").owned  # its first heartbeat since: the job lives on


def test_outages_again_and_again_hold_the_reaping_of_a_dead_workers_job_until_the_store_answers_for_stale_s(
        sqlite_stores):
    """A store that fails this process again and again (a flapping mount, a failover loop) holds the reaping of a
    dead worker's job while it fails (its workers' beats failed too, and a failure that ends only on a write is one
    outage), and no longer: once it has answered for stale_s the dead job is reaped; a job whose worker heartbeats
    through it all never is."""
    api, worker_store, folder = sqlite_stores
    reaper, worker = JobQueue(api), JobQueue(worker_store)
    dead = dead_workers_job(reaper, worker)
    alive = dead_workers_job(reaper, worker, "w2")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2 * STALE:
        assert worker.heartbeat(alive, "w2").owned
        assert reaper.reap(STALE) == []
        fail_to_reach(api, folder)
        time.sleep(0.1)
    reaped, t1 = [], time.monotonic()
    while not reaped and time.monotonic() - t1 < 3 * STALE:
        assert worker.heartbeat(alive, "w2").owned
        reaped = reaper.reap(STALE)
        time.sleep(0.1)
    assert reaped == [(dead, "failed")], f"not reaped {time.monotonic() - t1:.1f} s after the store came back"


def test_a_read_only_spell_longer_than_stale_s_does_not_reap_the_jobs_it_kept_from_heartbeating(sqlite_stores):
    """A read-only store (a restore with the wrong owner, a read-only mount: SQLITE_READONLY) fails every heartbeat
    while the reaper's reads pass. It did not count as an outage, and an outage was measured by the reaper's own
    reads: once writes resumed, the first reap failed live jobs "worker lost" before their workers' next beat."""
    api, worker_store, _ = sqlite_stores
    read_only = False

    def guard(conn, _record):
        if read_only:
            conn.execute("PRAGMA query_only=ON")  # writes fail as on a read-only file: SQLITE_READONLY

    for store in (api, worker_store):
        event.listen(store.engine, "connect", guard)
    reaper, worker = JobQueue(api), JobQueue(worker_store)
    job = dead_workers_job(reaper, worker)
    read_only = True
    api.engine.dispose(), worker_store.engine.dispose()
    t0 = time.monotonic()
    while time.monotonic() - t0 < STALE + 0.5:  # the worker lives, and each of its beats fails; the reaper looks
        with pytest.raises(OperationalError, match="readonly"):
            worker.heartbeat(job, "w1")
        with contextlib.suppress(OperationalError):  # its reads pass; a write of a stale job's end fails
            reaper.reap(STALE)
        time.sleep(0.2)
    read_only = False
    api.engine.dispose(), worker_store.engine.dispose()
    assert reaper.reap(STALE) == []
    assert worker.heartbeat(job, "w1").owned
