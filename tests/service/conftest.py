"""Real fixtures for the service: a bundle trained on ``digits`` once per session, and a
real app on a real SQLite file per test, driven in process or through uvicorn.

``db_url`` is the store matrix: a test (or a module, with ``pytest.mark.usefixtures("db_url")``)
that asks for it runs twice, on SQLite and on PostgreSQL, with ``SDB_DATABASE_URL`` set so that
the app, the CLI and every worker process it starts use that store."""
from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from service.app import build_app
from service.auth import create_key
from service.settings import Settings

from .pgcluster import Cluster, Databases, PostgresMissing

ROOT = Path(__file__).resolve().parents[2]
SDB = str(ROOT / ".venv" / "bin" / "sdb") if (ROOT / ".venv" / "bin" / "sdb").exists() else shutil.which("sdb")


@pytest.fixture(scope="session")
def pg_databases():
    """A throwaway PostgreSQL cluster for the session (or SDB_TEST_DATABASE_URL's server)."""
    external = os.environ.get("SDB_TEST_DATABASE_URL")
    if external:
        yield Databases(external)
        return
    try:
        cluster = Cluster().start()
    except PostgresMissing as e:
        pytest.fail(str(e), pytrace=False)  # fail, never skip: see pgcluster.py
    try:
        yield Databases(cluster.admin_url)
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path, monkeypatch) -> str:
    """The store URL of this test, exported as SDB_DATABASE_URL: a SQLite file, or a fresh database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
        monkeypatch.setenv("SDB_DATABASE_URL", url)
        yield url
        return
    databases = request.getfixturevalue("pg_databases")
    url = databases.create()
    monkeypatch.setenv("SDB_DATABASE_URL", url)
    try:
        yield url
    finally:
        databases.drop(url)


@dataclass
class Bundles:
    master_key_file: Path
    a: Path  # digits-a version 1
    a2: Path  # digits-a version 2 (another wrap: another network and key)
    b: Path  # digits-b (another teacher, another key)
    x: np.ndarray  # a few normalised test inputs, (N, 1, 8, 8)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> Bundles:
    import torch

    from sdb_core.bundle import export_bundle
    from sdb_core.data import load_dataset
    from sdb_core.models import create_model
    from sdb_core.protect import SDBConfig, train_box
    from sdb_core.protect.key import load_or_create_master_key
    from sdb_core.train import TrainConfig, seed_everything, train_classifier

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bundles")
    master_file = root / "master.key"
    master = load_or_create_master_key(master_file)
    data = load_dataset("digits")
    seed_everything(0)
    teacher = create_model("cnn", num_classes=data.num_classes, in_shape=data.in_shape)
    train_classifier(teacher, data.train, TrainConfig(epochs=2))
    # Three different networks with three different keys: a route that served the wrong model or
    # version, or blended another model's key, would answer differently and fail its test.
    box = train_box(teacher, data, SDBConfig(train=TrainConfig(epochs=1))).box
    box2 = train_box(teacher, data, SDBConfig(train=TrainConfig(epochs=1, seed=1))).box
    box2.keyed_scale = 1.25  # the served version's keyed scale, whatever the fit gave: keyed answers check it
    seed_everything(1)
    other = create_model("cnn", num_classes=data.num_classes, in_shape=data.in_shape)
    train_classifier(other, data.train, TrainConfig(epochs=2, seed=1))
    box_b = train_box(other, data, SDBConfig(train=TrainConfig(epochs=1, seed=2))).box
    common = {"in_shape": data.in_shape, "mean": data.mean, "std": data.std, "labels": data.labels,
              "master_key": master}
    a = export_bundle(box, root / "digits-a", name="digits-a", **common)
    a2 = export_bundle(box2, root / "digits-a-v2", name="digits-a", version="2", **common)
    b = export_bundle(box_b, root / "digits-b", name="digits-b", **common)
    x = data.test.tensors[0][:8].numpy().astype(np.float32)
    return Bundles(master_file, a, a2, b, x)


def make_settings(data_dir: Path, bundles: Bundles, **over) -> Settings:
    base = {"data_dir": data_dir, "master_key_file": bundles.master_key_file, "ort_intra_op_threads": 1,
            "ort_inter_op_threads": 1, "usage_flush_s": 0.05, "models_sync_s": 0.1, "auth_cache_s": 1.0}
    return Settings(**{**base, **over})


@dataclass
class Service:
    """A running app and what tests need around it."""

    app: object
    client: httpx.AsyncClient
    settings: Settings

    def key(self, scopes=("distill",), **kw) -> str:
        token, _ = create_key(self.app.state.store, self.settings.pepper, scopes=scopes, **kw)
        return token

    def auth(self, token: str) -> dict:
        return {"Authorization": f"Bearer {token}"}

    @property
    def admin(self) -> dict:
        if not hasattr(self, "_admin"):
            self._admin = self.auth(self.key(("admin",)))
        return self._admin


@pytest.fixture
def anyio_backend():
    return "asyncio"


def sdb_bytes(bundle: Path) -> bytes:
    """A bundle directory (or .sdb file) as the bytes of a .sdb zip, for ``POST /v1/models``."""
    if bundle.is_file():
        return bundle.read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(bundle.iterdir()):
            z.write(f, f.name)
    return buf.getvalue()


async def deploy(client: httpx.AsyncClient, bundle: Path, headers: dict) -> httpx.Response:
    """Upload a bundle to serve: what an admin (or a deploy key) does, no server path involved."""
    return await client.post("/v1/models", files={"file": (f"{bundle.name}.sdb", sdb_bytes(bundle))}, headers=headers)


async def start_service(settings: Settings, *bundle_paths: Path):
    app = build_app(settings)
    manager = LifespanManager(app, startup_timeout=60, shutdown_timeout=30)
    await manager.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://sdb.test")
    svc = Service(app, client, settings)
    for p in bundle_paths:
        r = await deploy(client, p, svc.admin)
        assert r.status_code == 201, r.text
    return svc, manager


@pytest.fixture
async def svc(tmp_path, bundles):
    """The app with digits-a (v1, v2) and digits-b served."""
    service, manager = await start_service(make_settings(tmp_path / "data", bundles), bundles.a, bundles.a2, bundles.b)
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


@pytest.fixture
async def bare_svc(tmp_path, bundles):
    """The app serving nothing yet (a test deploys what it needs)."""
    service, manager = await start_service(make_settings(tmp_path / "data", bundles))
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


async def served_with_grpc(tmp_path: Path, master_file: Path, bundle: Path):
    """The app serving ``bundle`` in this test's event loop, gRPC on a free port too (a fixture's body: yields it,
    then stops it)."""
    settings = Settings(data_dir=tmp_path / "data", master_key_file=master_file, ort_intra_op_threads=1,
                        ort_inter_op_threads=1, grpc_port=free_port(), grpc_host="127.0.0.1")
    service, manager = await start_service(settings, bundle)
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


@pytest.fixture
def own_settings(tmp_path, monkeypatch) -> Settings:
    """Settings of an app on its own SQLite data dir and secrets, whatever the environment names (a suite run
    against PostgreSQL sets SDB_DATABASE_URL): no demo, no workers."""
    for k in ("SDB_DATABASE_URL", "SDB_MASTER_KEY_FILE", "SDB_PEPPER_FILE", "SDB_SECRETS_DIR"):
        monkeypatch.delenv(k, raising=False)
    return Settings(data_dir=tmp_path / "data", register_demo=False, workers=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sdb_env(data_dir: Path, bundles: Bundles, port: int | None = None) -> dict:
    env = {**os.environ, "SDB_DATA_DIR": str(data_dir), "SDB_MASTER_KEY_FILE": str(bundles.master_key_file),
           "SDB_ORT_INTRA_OP_THREADS": "1", "SDB_ORT_INTER_OP_THREADS": "1", "SDB_WORKERS": "0"}
    if port is not None:
        env["SDB_PORT"] = str(port)
    return env


def run_sdb(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([SDB, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


class Server:
    """``sdb serve`` as a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, bundles: Bundles, env: dict[str, str] | None = None,
                 ready_timeout: float = 60.0, args: tuple[str, ...] = (), stdout: int = subprocess.DEVNULL):
        self.port = free_port()
        self.env = {**sdb_env(data_dir, bundles, self.port), **(env or {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([SDB, "serve", "--host", "127.0.0.1", *args], env=self.env,
                                     stdout=stdout, stderr=subprocess.PIPE, text=True)
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdb serve exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling a port that is not open yet: there is nothing to wait on
        # Say why: the server's own log is the only witness (a flaky start is otherwise a shrug).
        err = self.stop()
        raise TimeoutError(f"sdb serve did not become ready in {timeout:.0f} s; its stderr ends:\n{err[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def servers():
    """The servers a test starts (``Server``, ``JobServer``): each stopped at its end, failed or not."""
    started: list = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def server_factory(bundles):
    started: list[Server] = []

    def start(data_dir: Path) -> Server:
        s = Server(data_dir, bundles)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.stop()


