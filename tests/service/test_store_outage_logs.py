"""A store outage, as the operator's log shows it: a job worker (re)started while the store does not answer waits it out
in one line a try, and the server's periodic tasks (model sync, reaper) log their first failure with its traceback,
the same failure again only once a minute, and their recovery.

Before the fix a worker opened the store outside its retry loop and exited 1 with a traceback; the embedded pool
started another every second or so, and each periodic task logged a full traceback every tick: 4,872 lines in 45 s of
a PostgreSQL outage. ``python -m service.jobs`` (what the pool starts) printed tracebacks where ``sdb worker`` says one
line. The outages are real: a PostgreSQL URL on a port nothing listens on, and a SQLite file whose folder is away.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from asgi_lifespan import LifespanManager

from service.app import build_app
from service.settings import Settings

from .conftest import ROOT, SDB, free_port

PASSWORD = "s3cret-pw"


def worker_env(tmp_path, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SDB_")}
    return {**base, "SDB_DATA_DIR": str(tmp_path / "data"), "SDB_SECRETS_DIR": str(tmp_path / "secrets"),
            "SDB_JOB_POLL_S": "0.2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}


def read_until(p: subprocess.Popen, needle: str, timeout: float) -> str:
    """What the process wrote to stderr up to a line holding ``needle`` (or its end, or ``timeout``)."""
    out, deadline = [], time.monotonic() + timeout
    os.set_blocking(p.stderr.fileno(), False)
    while time.monotonic() < deadline and p.poll() is None:
        line = p.stderr.readline()
        if not line:
            time.sleep(0.05)
            continue
        out.append(line)
        if needle in line:
            break
    return "".join(out)


def stop(p: subprocess.Popen) -> tuple[int, str]:
    p.send_signal(signal.SIGTERM)
    try:
        _, rest = p.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return p.returncode, rest


def test_a_worker_started_while_postgresql_is_down_waits_in_one_line_a_try(tmp_path):
    url = f"postgresql+psycopg://sdb:{PASSWORD}@127.0.0.1:{free_port()}/sdb"  # nothing listens there
    p = subprocess.Popen([sys.executable, "-P", "-m", "service.jobs"], env=worker_env(tmp_path, SDB_DATABASE_URL=url),
                         stderr=subprocess.PIPE, text=True)
    try:
        seen = read_until(p, "trying again in 1 s", timeout=8)  # its second try (0.2 s, 0.4 s, 0.8 s, 1.6 s)
        assert p.poll() is None, f"the worker exited ({p.returncode}):\n{seen}"
    finally:
        rc, rest = stop(p)
    seen += rest
    assert rc == 0, seen
    tries = [line for line in seen.splitlines() if "is unreachable" in line]
    assert len(tries) >= 3, seen
    assert "postgresql+psycopg://sdb:***@127.0.0.1" in tries[0]
    assert "Traceback" not in seen and PASSWORD not in seen, seen


def test_a_worker_started_while_the_sqlite_folder_is_away_runs_once_it_is_back(tmp_path):
    folder = tmp_path / "db"
    p = subprocess.Popen([sys.executable, "-P", "-m", "service.jobs"],
                         env=worker_env(tmp_path, SDB_DATABASE_URL=f"sqlite:///{folder / 'sdb.sqlite3'}"),
                         stderr=subprocess.PIPE, text=True)
    try:
        seen = read_until(p, "is unreachable", timeout=8)
        assert "is unreachable" in seen and p.poll() is None, seen
        folder.mkdir()  # the volume is back
        seen += read_until(p, "worker worker:", timeout=8)
        assert "worker worker:" in seen, seen  # it opened the store and polls for jobs
    finally:
        rc, rest = stop(p)
    assert rc == 0 and "Traceback" not in seen + rest, seen + rest


def test_python_m_service_jobs_refuses_a_data_dir_that_is_a_file_as_sdb_worker_does(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    env = worker_env(tmp_path)
    pool, cli = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cmd in ([sys.executable, "-P", "-m", "service.jobs"], [SDB, "worker"]))  # side by side
    for p in (pool, cli):
        p.stderr, _ = p.communicate(timeout=60)[::-1]
    assert cli.returncode == 2 and pool.returncode == 2, (cli.stderr, pool.stderr)
    assert pool.stderr.strip() == cli.stderr.strip(), (cli.stderr, pool.stderr)
    assert "SDB_DATA_DIR" in pool.stderr and "Traceback" not in pool.stderr and len(pool.stderr.splitlines()) == 1


@pytest.mark.anyio
async def test_a_periodic_task_logs_a_store_outage_once_with_its_traceback_and_its_recovery(tmp_path, monkeypatch,
                                                                                             caplog):
    for k in ("SDB_DATABASE_URL", "SDB_MASTER_KEY_FILE", "SDB_PEPPER_FILE", "SDB_SECRETS_DIR"):
        monkeypatch.delenv(k, raising=False)
    folder = tmp_path / "db"
    folder.mkdir()
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{folder / 'sdb.sqlite3'}",
                        register_demo=False, workers=0, models_sync_s=0.02, job_reap_s=0.02)
    app = build_app(settings)
    caplog.set_level(logging.INFO, logger="sdb.service")
    async with LifespanManager(app):
        store = app.state.store
        folder.rename(tmp_path / "db-away")  # unmounted: a new connection cannot open the file
        store.engine.dispose()  # no pooled connection goes on with the file
        await asyncio.sleep(1.0)  # dozens of ticks of each task
        (tmp_path / "db-away").rename(folder)
        await asyncio.sleep(0.5)
    sync = [r for r in caplog.records if r.getMessage().startswith("model sync")]
    assert sum(1 for r in sync if r.exc_info) == 1, [r.getMessage() for r in sync]
    reaper = [r for r in caplog.records if r.getMessage().startswith("job reaper")]
    assert sum(1 for r in reaper if r.exc_info) == 1, [r.getMessage() for r in reaper]
    for records in (sync, reaper):
        assert len(records) <= 3, [r.getMessage() for r in records]  # the failure, maybe a repeat, the recovery
        assert "recovered after" in records[-1].getMessage(), [r.getMessage() for r in records]
