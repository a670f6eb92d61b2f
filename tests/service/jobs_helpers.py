"""Helpers for the jobs tests that run real processes: ``sdb serve`` with its workers, ``sdb worker``,
keys and models written to the data dir's store before the server starts, and files uploaded through
the API (a job names a file by its id, never by a path on the server)."""
from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

from service.auth import create_key
from service.jobs.queue import JobQueue
from service.jobs.worker import pid_alive
from service.settings import Settings
from service.store import Store

from .conftest import SDB, Bundles, Server, sdb_env

# Short intervals so that the tests see cancel, death and reaping in seconds.
# The two jobs most tests need: a quick distill from the hosted digits-a, and a wrap that runs until stopped.
QUICK = {"teacher": {"model": "digits-a"}, "student": "mlp", "data": "digits", "epochs": 1, "transfer": 200}
LONG = {"data": "digits", "teacher": {"arch": "mlp"}, "teacher_epochs": 1, "epochs": 1000, "name": "long"}
FAST = {"SDB_JOB_POLL_S": "0.2", "SDB_JOB_HEARTBEAT_S": "0.4", "SDB_JOB_STALE_S": "3", "SDB_JOB_REAP_S": "0.5",
        "SDB_JOB_TORCH_THREADS": "1", "SDB_MODELS_SYNC_S": "0.2", "SDB_REGISTER_DEMO": "false"}


def prepare(data_dir: Path, bundles: Bundles, models: dict[str, Path] | None = None) -> Settings:
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_dir=data_dir, master_key_file=bundles.master_key_file)
    store = Store(settings.db_url)
    for name, path in (models or {}).items():
        store.add_model(name, "1", str(path))
    store.close()
    return settings


def key(settings: Settings, scopes, **kw) -> str:
    store = Store(settings.db_url)
    try:
        token, _ = create_key(store, settings.pepper, scopes=scopes, **kw)
    finally:
        store.close()
    return token


class JobServer(Server):
    """``sdb serve`` with its job workers, as a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, bundles: Bundles, **env: str):
        # Starting the worker pool too takes longer than a bare server.
        super().__init__(data_dir, bundles, {**FAST, **env}, ready_timeout=90.0)

    def stop(self) -> str:
        return super().stop(signal.SIGINT)  # SIGINT: workers put their jobs back and exit


def start_worker(data_dir: Path, bundles: Bundles, **env: str) -> subprocess.Popen:
    return subprocess.Popen([SDB, "worker"], env={**sdb_env(data_dir, bundles), **FAST, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_worker(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for(fn, timeout: float, what: str, every: float = 0.1):
    """Poll ``fn`` until it returns something truthy (a job's state lives in another process)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)


def worker_pid(settings: Settings, job: dict) -> int:
    """The pid of the worker that holds (or held) ``job``, as an operator reads it in the store (a job's owner
    sees only the worker's kind: its host and pid are the server's)."""
    store = Store(settings.db_url)
    try:
        worker = JobQueue(store).get(job["id"]).worker
    finally:
        store.close()
    return int(worker.rsplit(":", 1)[1])


alive = pid_alive  # the worker module's (tests import it by this name)


def run_jobs(server: Server, token: str, kind: str, params: list[dict], timeout: float = 120.0) -> list[dict]:
    """Submit every job at once (the workers take them in turn), wait for each, assert they succeeded."""
    from sdb_client import Client

    with Client(server.url, token) as c:
        ids = [c.jobs.submit(kind, p)["id"] for p in params]
        jobs = [c.jobs.wait(i, timeout=timeout, poll_s=0.2) for i in ids]
    for job in jobs:
        assert job["status"] == "succeeded", job
    return jobs


def upload(url: str, token: str, path: Path, purpose: str = "weights") -> str:
    """Upload ``path`` through ``POST /v1/files`` as ``token``'s file; its ``file-…`` id."""
    from sdb_client import Client

    with Client(url, token) as c:
        return c.files.upload(path, purpose)["id"]


async def upload_asgi(svc, token: str, path: Path, purpose: str = "weights") -> str:
    """The same through an in-process app (``tests.service.conftest.Service``)."""
    r = await svc.client.post("/v1/files", files={"file": (path.name, path.read_bytes())}, data={"purpose": purpose},
                              headers=svc.auth(token))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def together(n: int, fn) -> list:
    """Run ``fn(i)`` in ``n`` threads released at the same instant; their results, or raise the first error."""
    barrier = threading.Barrier(n)
    out: list = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001  (re-raised below in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return out
