"""The store under concurrency, on SQLite and on PostgreSQL: processes starting at once on a fresh
database, claims racing over many connections, and two ``sdb worker`` processes (as
``docker compose up --scale worker=2`` runs them) sharing one PostgreSQL job table. Then what
only PostgreSQL has: ``postgresql://`` URLs and the password from a file."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import anyio
import pytest
from sdb_client import Client
from sqlalchemy import inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from service.jobs.queue import JobQueue
from service.settings import Settings
from service.store import MIGRATIONS, JobRow, SchemaVersion, Store

from .conftest import SDB, sdb_env
from .jobs_helpers import FAST, QUICK, JobServer, key, prepare, stop_worker, together, wait_for, worker_pid


def test_processes_starting_at_once_migrate_a_fresh_store_once(db_url):
    stores = together(6, lambda _: Store(db_url))
    try:
        with stores[0].session() as s:
            assert s.scalars(select(SchemaVersion.version)).all() == [len(MIGRATIONS)]
        assert {"schema_version", "api_keys", "models", "usage", "audit_log", "jobs"} <= set(
            inspect(stores[0].engine).get_table_names())
    finally:
        for s in stores:
            s.close()


def test_a_store_a_newer_release_migrated_is_refused_not_written_back(db_url):
    """The older release wrote its schema version over the newer one's and ran without the newer one's checks (the
    secrets' fingerprints, the deploy cap): a rollback is refused in one line."""
    from sqlalchemy import create_engine, update

    from service.store import StoreUnavailable, normalise_url, open_store

    Store(db_url).close()
    store = Store(db_url)
    with store.session.begin() as s:
        s.execute(update(SchemaVersion).values(version=len(MIGRATIONS) + 1))
    store.close()
    with pytest.raises(StoreUnavailable, match=rf"schema {len(MIGRATIONS) + 1}, from a newer release"):
        open_store(db_url)
    engine = create_engine(normalise_url(db_url))  # nothing was written back
    with engine.connect() as conn:
        assert conn.execute(select(SchemaVersion.version)).scalar() == len(MIGRATIONS) + 1
    engine.dispose()


def test_versions_older_than_their_deployer_column_count_against_their_names_owner(db_url, tmp_path):
    """Versions deployed before a key's deploys counted against its storage cap: their name's owner's, at the size
    of their copy (an admin's name: no key's)."""
    from sqlalchemy import update

    from service.auth import create_key
    from service.store_schema import ModelRow

    with closing(Store(db_url)) as store:
        owner = create_key(store, b"p" * 32, scopes=["deploy"])[1].id
        copy = tmp_path / "v1.sdb"
        copy.write_bytes(b"x" * 1234)
        store.add_version("tenants", str(copy), deployer=owner)
        store.add_version("admins", str(copy), deployer=None)
        store.add_version("tenants", str(tmp_path / "gone.sdb"), deployer=owner)
        with store.session.begin() as s:  # as a store from before step 8 holds them
            s.execute(update(ModelRow).values(bytes=0))
            s.connection().exec_driver_sql("ALTER TABLE models DROP COLUMN deployer")
            s.execute(update(SchemaVersion).values(version=7))
    with closing(Store(db_url)) as store:
        with store.session() as s:
            got = {(r.name, r.version): (r.deployer, r.bytes) for r in s.scalars(select(ModelRow))}
        assert got == {("tenants", "1"): (owner, 1234), ("tenants", "2"): (owner, 0), ("admins", "1"): (None, 0)}
        assert store.file_bytes(owner) == 1234
        # An admin's version under the tenant's name, then a release from before SchemaTooNew writes its older
        # schema version (any command of it, `sdb models list` too): the steps run again, and the admin's version
        # became the tenant's, counted against its storage cap.
        store.add_version("tenants", str(copy), deployer=None)
        with store.session.begin() as s:
            s.execute(update(SchemaVersion).values(version=5))
    with closing(Store(db_url)) as store:
        with store.session() as s:
            assert s.get(ModelRow, ("tenants", "3")).deployer is None
        assert store.file_bytes(owner) == 1234


def test_versions_older_than_the_meta_digest_column_have_none_until_their_first_load(db_url, tmp_path):
    """Step 11 adds each version's meta.json digest: NULL for the versions already there (their first load records
    it, tests/service/test_bundle_paths.py), and a rerun of the steps (an older release wrote its schema version)
    changes nothing."""
    from sqlalchemy import update

    store = Store(db_url)
    try:
        store.add_version("m", str(tmp_path / "v1.sdb"), deployer=None, meta_sha256="ab" * 32)
        with store.session.begin() as s:  # as a store from before step 11 holds it
            s.connection().exec_driver_sql("ALTER TABLE models DROP COLUMN meta_sha256")
            s.execute(update(SchemaVersion).values(version=10))
    finally:
        store.close()
    store = Store(db_url)  # step 11 runs
    try:
        assert store.get_model("m").meta_sha256 is None
        with store.session.begin() as s:  # an older release's schema version: every step runs again
            s.execute(update(SchemaVersion).values(version=5))
    finally:
        store.close()
    store = Store(db_url)
    try:
        row = store.get_model("m")
        assert row.meta_sha256 is None and row.path == str(tmp_path / "v1.sdb")
    finally:
        store.close()


def test_racing_claims_take_every_job_exactly_once(db_url):
    setup = Store(db_url)
    ids = {JobQueue(setup).submit("wrap", {"i": i}, "owner")[0].id for i in range(40)}
    stores = [Store(db_url) for _ in range(6)]  # one engine (its own connections) per claimer

    def drain(i: int) -> list[str]:
        queue, mine = JobQueue(stores[i]), []
        while (job := queue.claim(f"w{i}")) is not None:
            mine.append(job.id)
        return mine

    try:
        claimed = together(6, drain)
        flat = [j for c in claimed for j in c]
        assert len(flat) == len(set(flat)) == 40 and set(flat) == ids
        with setup.session() as s:
            rows = list(s.scalars(select(JobRow)))
        by_worker = {r.id: r.worker for r in rows}
        for i, mine in enumerate(claimed):
            assert all(by_worker[j] == f"w{i}" for j in mine)
        assert {(r.status, r.attempts) for r in rows} == {("running", 1)}
    finally:
        for s in (setup, *stores):
            s.close()


def _start_worker(data: Path, bundles, log: Path) -> subprocess.Popen:
    """``sdb worker`` as the compose file's worker service runs it; its log goes to ``log``."""
    with log.open("w") as f:
        return subprocess.Popen([SDB, "worker"], env={**sdb_env(data, bundles), **FAST},
                                stdout=subprocess.DEVNULL, stderr=f)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_worker_processes_share_one_postgresql_job_table(db_url, tmp_path, bundles):
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    assert settings.db_url == db_url  # the whole test runs on the PostgreSQL database
    token = key(settings, ["jobs", "distill"])
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [_start_worker(data, bundles, log) for log in logs]  # starting while the API does
    server = None
    try:
        server = JobServer(data, bundles, SDB_WORKERS="0")  # the API alone, like `sdb serve --workers 0`
        # both polling before anything is queued, so that the two really compete
        wait_for(lambda: all("worker worker:" in log.read_text() for log in logs), 90, "both workers up")
        with Client(server.url, token) as c:
            ids = [c.jobs.submit("distill", {**QUICK, "seed": i})["id"] for i in range(4)]
            jobs = [c.jobs.wait(i, timeout=180, poll_s=0.2) for i in ids]
            assert [j["status"] for j in jobs] == ["succeeded"] * 4, jobs
            assert [j["attempts"] for j in jobs] == [1] * 4
            for i in ids:
                assert c.jobs.logs(i).text.count(" attempt ") == 1  # started once, by one worker
        pids = {w.pid for w in workers}
        ran = {worker_pid(settings, j) for j in jobs}  # from the store: an owner sees only "worker:…"
        assert ran == pids, (ran, pids)  # both took jobs, and nobody else did
        for log in logs:
            assert "Traceback" not in log.read_text()
    finally:
        for w in workers:
            stop_worker(w)
        if server is not None:
            server.stop()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_urls_and_the_password_file(db_url, tmp_path, monkeypatch):
    url = make_url(db_url)
    assert url.drivername == "postgresql+psycopg" and url.password
    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    store = Store(plain)  # what a user writes: postgresql://... means psycopg 3 here
    try:
        assert store.engine.dialect.driver == "psycopg"
        store.add_model("m", "1", "/p")
    finally:
        store.close()

    monkeypatch.delenv("SDB_DATABASE_URL")
    no_password = url._replace(password=None).render_as_string(hide_password=False)  # set() keeps it
    with pytest.raises(OperationalError, match="password"):
        Store(no_password)  # the test cluster asks for a password over TCP
    pw = tmp_path / "pg_password"
    pw.write_text(url.password + "\n")
    s = Settings(data_dir=tmp_path, database_url=no_password, database_password_file=pw)
    assert url.password not in repr(s)  # the settings never hold the password itself
    store = Store(s.db_url)
    try:
        assert [(m.name, m.version) for m in store.list_models()] == [("m", "1")]
    finally:
        store.close()


def test_a_killed_sessions_cluster_is_reaped_by_the_next():
    """A SIGKILLed pytest never stops its throwaway server; the next session's cluster does it."""
    from .pgcluster import OWNER, Cluster

    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tests.service.pgcluster import Cluster; "
            "c = Cluster().start(); print(c.base, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).resolve().parents[2])],
                            stdout=subprocess.PIPE, text=True)
    try:
        orphan = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    pid = int((orphan / "data" / "postmaster.pid").read_text().split()[0])
    assert (orphan / OWNER).exists() and os.path.exists(f"/proc/{pid}")  # left running by the kill

    fresh = Cluster().start()
    try:
        assert not orphan.exists()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}")
        assert fresh.base.exists()
    finally:
        fresh.stop()


@pytest.mark.anyio
async def test_a_store_that_goes_away_is_a_503_to_retry_and_serving_resumes_by_itself(tmp_path, bundles, caplog):
    """A PostgreSQL restart (a crash, a failover) made every request that reads the store a 500 with a traceback in
    the log (keyed predict, distill, the job routes): an outage to wait out, as the key store's own 503 says."""
    from .conftest import make_settings, start_service
    from .pgcluster import Cluster, Databases

    cluster = Cluster().start()
    try:
        url = Databases(cluster.admin_url).create()
        settings = make_settings(tmp_path / "data", bundles, database_url=url, auth_cache_s=0.0)
        svc, manager = await start_service(settings, bundles.a)
        try:
            h = svc.auth(svc.key(("predict", "jobs")))
            one = {"inputs": bundles.x[:1].tolist()}
            assert (await svc.client.post("/v1/models/digits-a/predict", json=one, headers=h)).status_code == 200
            cluster.pause()
            for r in (await svc.client.post("/v1/models/digits-a/predict", json=one, headers=h),
                      await svc.client.get("/v1/jobs", headers=h)):
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                assert r.json()["error"]["code"] == "store_unavailable"
            answered = [r for r in caplog.records if r.name == "sdb.service" and "unhandled" in r.getMessage()]
            assert not answered and "the store is unavailable" in caplog.text, caplog.text[-3000:]
            cluster.resume()
            deadline = time.monotonic() + 30
            while (r := await svc.client.post("/v1/models/digits-a/predict", json=one, headers=h)).status_code != 200:
                assert time.monotonic() < deadline, r.text  # the pool reconnects: no restart
                await anyio.sleep(0.2)
        finally:
            if not (cluster.data / "postmaster.pid").exists():
                cluster.resume()  # the app's shutdown writes its last usage there
            await svc.client.aclose()
            await manager.__aexit__(None, None, None)
    finally:
        cluster.stop()


@pytest.mark.anyio
async def test_a_key_store_that_stalls_is_a_503_in_seconds_not_a_wait_as_long_as_it(tmp_path, bundles, pg_databases):
    """A stalled database (a lock held, a partition) held every keyed request for as long as it stalled: reading a
    key that is not cached now waits STORE_WAIT_S, then answers 503 key_store_unavailable."""
    import psycopg

    from service.auth import STORE_WAIT_S

    from .conftest import make_settings, start_service

    url = pg_databases.create()
    try:
        settings = make_settings(tmp_path / "data", bundles, database_url=url, auth_cache_s=0.0)
        svc, manager = await start_service(settings, bundles.a)
        try:
            h = svc.auth(svc.key(("predict",)))
            one = {"inputs": bundles.x[:1].tolist()}
            raw = make_url(url).set(drivername="postgresql")
            with psycopg.connect(raw.render_as_string(hide_password=False)) as locker:
                locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")  # held until the block ends
                start = time.monotonic()
                r = await svc.client.post("/v1/models/digits-a/predict", json=one, headers=h)
                waited = time.monotonic() - start
                assert r.status_code == 503 and r.json()["error"]["code"] == "key_store_unavailable", r.text
                assert STORE_WAIT_S <= waited < STORE_WAIT_S + 5, waited
                locker.rollback()
            assert (await svc.client.post("/v1/models/digits-a/predict", json=one, headers=h)).status_code == 200
        finally:
            await svc.client.aclose()
            await manager.__aexit__(None, None, None)
    finally:
        pg_databases.drop(url)


def _threads_in(function) -> int:
    """How many threads are running ``function`` now."""
    def running(frame) -> bool:
        while frame is not None:
            if frame.f_code is function.__code__:
                return True
            frame = frame.f_back
        return False

    return sum(running(f) for f in sys._current_frames().values())


@pytest.mark.anyio
async def test_readiness_on_a_frozen_store_is_a_503_in_seconds_and_its_probes_share_one_ping(tmp_path, bundles):
    """/readyz waited on a frozen database (a host stopped, a partition) as long as it stayed frozen, and every probe
    held a worker thread meanwhile: an orchestrator's probes timed out with no answer, and piled up."""
    from service.auth import STORE_WAIT_S

    from .conftest import make_settings, start_service
    from .pgcluster import Cluster, Databases

    cluster = Cluster().start()
    try:
        url = Databases(cluster.admin_url).create()
        svc, manager = await start_service(make_settings(tmp_path / "data", bundles, database_url=url), bundles.a)
        try:
            assert (await svc.client.get("/readyz")).status_code == 200
            cluster.freeze()
            try:
                start = time.monotonic()
                answers = await asyncio.wait_for(asyncio.gather(*(svc.client.get("/readyz") for _ in range(5))),
                                                 STORE_WAIT_S + 10)  # without a bound: as long as it stays frozen
                waited = time.monotonic() - start
                for r in answers:
                    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unreachable", r.text
                assert STORE_WAIT_S <= waited < STORE_WAIT_S + 5, waited
                assert _threads_in(Store.ping) == 1  # the probes' one ping, still waiting
            finally:
                cluster.freeze(thaw=True)
            deadline = time.monotonic() + 30
            while (r := await svc.client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, r.text
                await anyio.sleep(0.2)
        finally:
            await svc.client.aclose()
            await manager.__aexit__(None, None, None)
    finally:
        cluster.stop()


def test_a_store_from_before_fingerprints_records_a_master_key_only_if_it_opens_its_models(db_url, tmp_path, bundles):
    """The first start after the upgrade recorded whatever secrets it had: with another secrets dir by mistake, its
    master key became the store's, every sealed model unservable, and the right one refused from then on. One that
    does not open a served model's sealed key is refused before anything is recorded."""
    from sdb_core.protect.seal import load_or_create_master_key
    from service.settings import SecretsError

    from .conftest import make_settings

    data = tmp_path / "data"
    store = Store(db_url)
    store.add_model("digits-a", "1", str(bundles.a))  # sealed under bundles.master_key_file
    store.close()
    wrong = tmp_path / "elsewhere" / "master.key"
    load_or_create_master_key(wrong)
    with pytest.raises(SecretsError, match="does not open the sealed key of model 'digits-a' version '1'"):
        make_settings(data, bundles, database_url=db_url, master_key_file=wrong).check_secrets()
    store = Store(db_url)
    try:
        assert store.recorded_secret("master_key") is None  # nothing recorded for the wrong one
        make_settings(data, bundles, database_url=db_url).check_secrets()  # the right one: recorded
        assert store.recorded_secret("master_key") is not None
    finally:
        store.close()


def test_a_store_outage_longer_than_stale_s_does_not_reap_the_jobs_it_kept_from_heartbeating():
    """A PostgreSQL outage longer than SDB_JOB_STALE_S failed every running job "worker lost" as the store came back:
    no worker could heartbeat while it did not answer, and the reaper counted that time as their silence. The reaper
    now reaps once the store has answered it for stale_s; a worker that stays silent after that is still reaped."""
    from .pgcluster import Cluster, Databases

    stale = 2.0
    cluster = Cluster().start()
    try:
        url = Databases(cluster.admin_url).create()
        with closing(Store(url)) as api, closing(Store(url)) as worker_store:
            reaper, worker = JobQueue(api), JobQueue(worker_store)
            job = reaper.submit("wrap", {}, "owner")[0]
            assert worker.claim("w1").id == job.id
            assert worker.heartbeat(job.id, "w1", training=True).owned
            cluster.pause()
            with pytest.raises(OperationalError):
                reaper.reap(stale)  # the reaper's own look fails while the store is away
            time.sleep(stale + 1)  # longer than stale_s: the worker's last heartbeat is older than that
            cluster.resume()
            assert reaper.reap(stale) == []
            assert worker.heartbeat(job.id, "w1").owned  # its first heartbeat since
            lost = reaper.submit("wrap", {}, "owner")[0]
            assert worker.claim("w2").id == lost.id
            assert worker.heartbeat(lost.id, "w2", training=True).owned  # then w2 dies
            time.sleep(stale + 0.5)
            assert worker.heartbeat(job.id, "w1").owned
            assert reaper.reap(stale) == [(lost.id, "failed")]
            assert worker.finish(job.id, "w1", "succeeded")
            assert reaper.get(job.id).status == "succeeded"
    finally:
        cluster.stop()
