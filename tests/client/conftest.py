"""Servers for the SDK tests, all on free 127.0.0.1 ports and spoken to over real HTTP:

- ``sdb_server``: the real service app (real SQLite store, the ``digits-a`` bundle of the
  service tests) under uvicorn in a thread, with an admin, a distill and a predict-only key;
- ``stub``: a small real ASGI app under uvicorn that answers whatever a test scripts
  (statuses, Retry-After) and counts the requests it received, for the retry policy.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import uvicorn

from service.app import build_app
from service.auth import create_key, parse_token
from tests.service.conftest import Bundles, bundles, make_settings, sdb_bytes  # noqa: F401  (bundles: the session fixture)

MODEL = "digits-a"
PAYLOAD_LIMIT = 256 << 10  # small, so a 413 is cheap to provoke; 64 digits samples fit easily
SMALL_REQUEST = 100  # small_server's samples per request at most (below the SDK's default batch of 256)


class ThreadServer:
    """uvicorn serving ``app`` in a daemon thread on a socket bound to a free loopback port (``config``: more of
    uvicorn.Config's options)."""

    def __init__(self, app, timeout: float = 60.0, **config):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False,
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:  # uvicorn sets it after the lifespan startup completed
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass
class SDBServer:
    url: str
    app: object
    bundles: Bundles
    admin_key: str
    distill_key: str
    predict_key: str

    def key(self, scopes=("distill",), **kw) -> str:
        token, _ = create_key(self.app.state.store, self.app.state.settings.pepper, scopes=scopes, **kw)
        return token

    def used(self, token: str) -> int:
        """The samples charged to a key so far, from the store."""
        return self.app.state.store.get_key(parse_token(token)[0]).used


def serve(tmp_path_factory, made: Bundles, hosted: dict[str, Path], **settings) -> tuple[ThreadServer, SDBServer]:
    """A real server on a free port with ``settings``, serving ``hosted`` (name: bundle), with an admin key, a distill
    key for every hosted model and a predict key."""
    settings = make_settings(tmp_path_factory.mktemp("client-data"), made, register_demo=False, **settings)
    app = build_app(settings)
    srv = ThreadServer(app)
    store, pepper = app.state.store, settings.pepper
    admin, _ = create_key(store, pepper, scopes=["admin"])
    for name, bundle in hosted.items():
        r = httpx.post(srv.url + "/v1/models", files={"file": (f"{name}.sdb", sdb_bytes(bundle))},
                       headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        assert r.status_code == 201, r.text
    distill, _ = create_key(store, pepper, scopes=["distill"], models=list(hosted))
    predict, _ = create_key(store, pepper, scopes=["predict"])
    return srv, SDBServer(srv.url, app, made, admin, distill, predict)


@pytest.fixture(scope="session")
def sdb_server(tmp_path_factory, bundles) -> SDBServer:  # noqa: F811
    srv, server = serve(tmp_path_factory, bundles, {MODEL: bundles.a}, max_payload_bytes=PAYLOAD_LIMIT)
    yield server
    srv.stop()


@dataclass
class Colours:
    """A 3-class model of 3x8x8 inputs whose classes have names (its dominant channel: red, green, blue), and data
    sets for it as ``.npz`` files: its own, the same with its classes listed in another order, and others."""

    bundle: Path
    data: Path  # its classes: red, green, blue
    reordered: Path  # the same images and classes, listed blue, green, red
    other_names: Path  # the same images, the classes called cyan, magenta, yellow
    digits_shaped: Path  # 3 classes of 1x8x8 inputs (the shape of digits-a, which answers 10)


def _colour_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.random((n, 3, 8, 8)).astype(np.float32) * 0.5
    x[np.arange(n), y] += 0.4  # the dominant channel is the class
    return (np.clip(x, 0, 1) * 255).astype(np.uint8), y


@pytest.fixture(scope="session")
def colours(tmp_path_factory, bundles) -> Colours:  # noqa: F811
    import torch

    from sdb_core.bundle import export_bundle
    from sdb_core.data import load_dataset
    from sdb_core.models import create_model
    from sdb_core.protect import SDBConfig, train_box
    from sdb_core.protect.key import load_or_create_master_key
    from sdb_core.train import TrainConfig, seed_everything, train_classifier

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("colours")
    x, y = _colour_set(600, seed=0)
    sets = Colours(root / "colour", root / "colour.npz", root / "reordered.npz", root / "other.npz", root / "d3.npz")
    np.savez(sets.data, x=x, y=y, labels=np.array(["red", "green", "blue"]))
    np.savez(sets.reordered, x=x, y=2 - y, labels=np.array(["blue", "green", "red"]))
    np.savez(sets.other_names, x=x, y=y, labels=np.array(["cyan", "magenta", "yellow"]))
    np.savez(sets.digits_shaped, x=x[:, :1], y=y, labels=np.array(["red", "green", "blue"]))
    data = load_dataset(f"npz:{sets.data}")
    seed_everything(0)
    teacher = create_model("mlp", num_classes=3, in_shape=data.in_shape)
    train_classifier(teacher, data.train, TrainConfig(epochs=3))
    box = train_box(teacher, data, SDBConfig(train=TrainConfig(epochs=1))).box
    export_bundle(box, sets.bundle, name="colour", in_shape=data.in_shape, mean=data.mean, std=data.std,
                  labels=data.labels, master_key=load_or_create_master_key(bundles.master_key_file))
    return sets


@pytest.fixture(scope="session")
def small_server(tmp_path_factory, bundles, colours) -> SDBServer:  # noqa: F811
    """A server that takes at most 100 samples a request (SDB_MAX_REQUEST_SAMPLES), serving digits-a and the
    colour model."""
    srv, server = serve(tmp_path_factory, bundles, {MODEL: bundles.a, "colour": colours.bundle},
                        max_request_samples=SMALL_REQUEST)
    yield server
    srv.stop()


@pytest.fixture(scope="session")
def master_key(bundles) -> bytes:  # noqa: F811
    from sdb_core.protect.key import load_or_create_master_key

    return load_or_create_master_key(bundles.master_key_file)


# --------------------------------------------------------------------------- the scripted stub
@dataclass
class Reply:
    status: int = 200
    body: object = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0  # before answering (a client's read timeout)


class StubApp:
    """A real ASGI app: ``on(method, path, *replies)`` scripts the answers (the last one
    repeats); ``hits[(method, path)]`` counts requests; ``seen`` keeps their headers (and
    the query string as ``":query"``, the client's port as ``":client"``) and bodies."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.routes: dict[tuple[str, str], list[Reply]] = {}
        self.hits: Counter = Counter()
        self.seen: dict[tuple[str, str], list[tuple[dict, bytes]]] = defaultdict(list)

    def on(self, method: str, path: str, *replies: Reply) -> None:
        self.routes[(method, path)] = list(replies)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                kind = msg["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        key = (scope["method"], scope["path"])
        self.hits[key] += 1
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        headers[":query"] = scope.get("query_string", b"").decode()
        headers[":client"] = str((scope.get("client") or ("", 0))[1])  # the connection's port: which socket sent it
        self.seen[key].append((headers, body))
        replies = self.routes.get(key) or [Reply(404, {"error": {"code": "not_found", "message": "no route"}})]
        reply = replies[min(self.hits[key], len(replies)) - 1]
        if isinstance(reply.body, bytes):
            payload, ctype = reply.body, reply.headers.get("content-type", "application/octet-stream")
        else:
            payload, ctype = orjson.dumps(reply.body), "application/json"
        headers = [(b"content-type", ctype.encode())] + [(k.encode(), str(v).encode()) for k, v in
                                                         reply.headers.items() if k != "content-type"]
        await asyncio.sleep(reply.delay_s)
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="session")
def _stub_server():
    app = StubApp()
    srv = ThreadServer(app)
    yield app, srv.url
    srv.stop()


@pytest.fixture
def stub(_stub_server) -> StubApp:
    app, url = _stub_server
    app.reset()
    app.url = url
    return app


@pytest.fixture
def anyio_backend():
    return "asyncio"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def write_png(path: Path, x) -> Path:
    """A grayscale PNG of one normalised digits input, in the 0-255 range the server expects."""
    import numpy as np
    from PIL import Image

    img = np.clip(x.reshape(8, 8) * 4.0 + 8.0, 0, 16) * 255.0 / 16.0
    Image.fromarray(img.astype(np.uint8), mode="L").save(path)
    return path
