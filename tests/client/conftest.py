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
import orjson
import pytest
import uvicorn

from service.app import build_app
from service.auth import create_key
from tests.service.conftest import Bundles, bundles, make_settings, sdb_bytes  # noqa: F401  (bundles: the session fixture)

MODEL = "digits-a"
PAYLOAD_LIMIT = 256 << 10  # small, so a 413 is cheap to provoke; 64 digits samples fit easily


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


@pytest.fixture(scope="session")
def sdb_server(tmp_path_factory, bundles) -> SDBServer:  # noqa: F811
    settings = make_settings(tmp_path_factory.mktemp("client-data"), bundles, max_payload_bytes=PAYLOAD_LIMIT,
                             register_demo=False)
    app = build_app(settings)
    srv = ThreadServer(app)
    store, pepper = app.state.store, settings.pepper
    admin, _ = create_key(store, pepper, scopes=["admin"])
    r = httpx.post(srv.url + "/v1/models", files={"file": ("digits-a.sdb", sdb_bytes(bundles.a))},
                   headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    assert r.status_code == 201, r.text
    distill, _ = create_key(store, pepper, scopes=["distill"], models=[MODEL])
    predict, _ = create_key(store, pepper, scopes=["predict"])
    yield SDBServer(srv.url, app, bundles, admin, distill, predict)
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
