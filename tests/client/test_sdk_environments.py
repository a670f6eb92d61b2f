"""The SDK where it runs: a model redeployed during a call, proxies in the environment, forked processes.

Against the real service on a loopback port (``serve`` of conftest, a fresh server where a test deploys to it)."""
from __future__ import annotations

import asyncio
import http.server
import importlib.util
import os
import socket
import socketserver
import threading

import httpx
import numpy as np
import pytest
from sdb_client import (
    APIConnectionError,
    AsyncClient,
    Client,
    ConfigurationError,
    ModelChanged,
    NotFound,
    RemoteTeacher,
)
from sdb_client._base import merge_distilled

from tests.service.conftest import sdb_bytes

from .conftest import MODEL, serve

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def no_proxies(monkeypatch):
    """An environment with no proxy variable (a CI runner's own HTTP_PROXY would change what these tests see)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.fixture
def fresh(tmp_path_factory, bundles, no_proxies):
    """A server of its own serving digits-a version 1 alone: the tests deploy and remove versions."""
    srv, server = serve(tmp_path_factory, bundles, {MODEL: bundles.a})
    yield server
    srv.stop()


def redeploy(server, remove_first: bool = False) -> None:
    """Deploy digits-a version 2 (another network and key); with ``remove_first``, stop serving version 1 too."""
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, headers=admin, trust_env=False, timeout=60) as h:
        r = h.post("/v1/models", files={"file": ("a2.sdb", sdb_bytes(server.bundles.a2))})
        assert r.status_code == 201, r.text
        if remove_first:
            assert h.delete(f"/v1/models/{MODEL}", params={"version": "1"}).status_code == 200


class AfterFirstDistill(httpx.BaseTransport):
    """A real transport that calls ``then()`` once, right after the first distill batch was answered: a deploy
    between two batches of one call, every time."""

    def __init__(self, then):
        self.inner, self.then, self.done = httpx.HTTPTransport(), then, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/distill") and not self.done:
            response.read()
            self.done = True
            self.then()
        return response


class AsyncAfterFirstDistill(httpx.AsyncBaseTransport):
    def __init__(self, then):
        self.inner, self.then, self.done = httpx.AsyncHTTPTransport(), then, False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/distill") and not self.done:
            await response.aread()
            self.done = True
            await asyncio.to_thread(self.then)
        return response


def both_versions(server, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with Client(server.url, server.distill_key) as c:
        return c.distill_logits(MODEL, x, version="1"), c.distill_logits(MODEL, x, version="2")


# --------------------------------------------------------------------------- one call, one version
def test_a_deploy_between_batches_does_not_mix_versions(fresh):
    x = np.tile(fresh.bundles.x, (4, 1, 1, 1))[:40]
    with httpx.Client(transport=AfterFirstDistill(lambda: redeploy(fresh))) as http, \
            Client(fresh.url, fresh.distill_key, http_client=http, batch_size=8) as c:
        d = c.distill(MODEL, x)
    v1, v2 = both_versions(fresh, x)
    assert not np.allclose(v1, v2, atol=1e-4)  # two networks: a mixed answer would show
    assert d.version == "1"
    np.testing.assert_allclose(d.logits, v1, atol=1e-5)


@pytest.mark.anyio
async def test_async_a_deploy_between_batches_does_not_mix_versions(fresh):
    x = np.tile(fresh.bundles.x, (4, 1, 1, 1))[:40]
    http = httpx.AsyncClient(transport=AsyncAfterFirstDistill(lambda: redeploy(fresh)))
    async with AsyncClient(fresh.url, fresh.distill_key, http_client=http, batch_size=8, max_concurrency=1) as c:
        d = await c.distill(MODEL, x)
    await http.aclose()
    v1, _ = await asyncio.to_thread(both_versions, fresh, x)
    assert d.version == "1"
    np.testing.assert_allclose(d.logits, v1, atol=1e-5)


def test_the_pinned_version_gone_mid_call_is_a_clear_error_with_the_rows_answered(fresh):
    x = np.tile(fresh.bundles.x, (4, 1, 1, 1))[:40]
    with Client(fresh.url, fresh.distill_key) as plain:
        v1 = plain.distill_logits(MODEL, x)
    with httpx.Client(transport=AfterFirstDistill(lambda: redeploy(fresh, remove_first=True))) as http, \
            Client(fresh.url, fresh.distill_key, http_client=http, batch_size=8) as c, \
            pytest.raises(ModelChanged, match="changed") as caught:
        c.distill(MODEL, x)
    e = caught.value
    assert e.code == "model_changed" and "'1'" in e.message
    assert e.partial_rows == 8  # the first batch, version 1's, and none of version 2's
    np.testing.assert_allclose(e.partial, v1[:8], atol=1e-5)


def test_a_remote_teacher_keeps_the_version_of_its_first_answer(fresh):
    x = np.tile(fresh.bundles.x, (4, 1, 1, 1))[:16]
    with Client(fresh.url, fresh.distill_key) as c:
        teacher = RemoteTeacher(c, MODEL, batch_size=8, prefetch=0)
        assert teacher.version is None
        first = teacher(x[:8])
        assert teacher.version == "1" and "version='1'" in repr(teacher)
        redeploy(fresh)
        later = teacher(x)  # asked after version 2 was deployed
        v1, v2 = both_versions(fresh, x)
        np.testing.assert_allclose(first, v1[:8], atol=1e-5)
        np.testing.assert_allclose(later, v1, atol=1e-5)
        assert not np.allclose(later, v2, atol=1e-4)
        with RemoteTeacher(c, MODEL, batch_size=4, prefetch=2) as racing:  # pinned before two requests race
            got = np.concatenate([z for _, z in racing.iter_batches(x)])
            assert racing.version == "2"
            np.testing.assert_allclose(got, v2, atol=1e-5)
        with Client(fresh.url, fresh.admin_key) as admin:
            admin.remove_model(MODEL, version="1")
        with pytest.raises(ModelChanged, match="changed"):
            teacher(x)
        teacher.close()


def test_a_version_never_served_is_still_not_found(fresh):
    with Client(fresh.url, fresh.distill_key) as c, pytest.raises(NotFound) as caught:
        c.distill_logits(MODEL, fresh.bundles.x, version="999")
    assert not isinstance(caught.value, ModelChanged)


def test_answers_of_two_versions_are_never_merged():
    parts = [{"model": "m", "version": "1", "logits": [[1.0, 2.0]]}, {"model": "m", "version": "2", "logits": [[3.0, 4.0]]}]
    with pytest.raises(ModelChanged, match="'1'.*'2'|'2'.*'1'"):
        merge_distilled(parts)


# --------------------------------------------------------------------------- proxies
def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture(scope="module")
def proxy():
    """A forward proxy on a loopback port that answers every request itself, as a proxy that reached the server
    would (an empty model list), and keeps each request line and whether it carried a key."""
    seen: list[tuple[str, bool]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.requestline, self.headers.get("Authorization") is not None))
            body = b'{"models": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url, srv.seen = f"http://127.0.0.1:{srv.server_address[1]}", seen
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY", "http_proxy"])
def test_a_loopback_server_is_never_reached_through_a_proxy(sdb_server, no_proxies, proxy, variable):
    """A proxy set for the machine (HPC, CI, a corporate network) saw every request to a local server, key
    included; a dead one made the local server look down."""
    no_proxies.setenv(variable, f"http://127.0.0.1:{dead_port()}")
    port = sdb_server.url.rsplit(":", 1)[1]
    for url in (sdb_server.url, f"http://localhost:{port}"):
        with Client(url, sdb_server.distill_key, max_retries=0) as c:
            assert [m["name"] for m in c.models()] == [MODEL]
    no_proxies.setenv(variable, proxy.url)  # a live one: nothing reaches it
    with Client(sdb_server.url, sdb_server.distill_key, max_retries=0) as c:
        c.distill_logits(MODEL, sdb_server.bundles.x[:2])
    assert proxy.seen == []


@pytest.mark.anyio
async def test_async_a_loopback_server_is_never_reached_through_a_proxy(sdb_server, no_proxies):
    no_proxies.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead_port()}")
    async with AsyncClient(sdb_server.url, sdb_server.distill_key, max_retries=0) as c:
        assert [m["name"] for m in await c.models()] == [MODEL]


def test_other_hosts_go_through_the_proxy_unless_no_proxy_names_them(no_proxies, proxy):
    no_proxies.setenv("HTTP_PROXY", proxy.url)
    key = "sdb_0123456789ab_" + "e" * 64
    with Client("http://sdb.test:8000", key, max_retries=0) as c:
        assert c.models() == []
    assert proxy.seen[-1] == ("GET http://sdb.test:8000/v1/models HTTP/1.1", True)
    no_proxies.setenv("NO_PROXY", "example.org,sdb.test")
    with Client("http://sdb.test:8000", key, max_retries=0) as c, pytest.raises(APIConnectionError) as caught:
        c.models()  # direct: the name does not resolve
    assert "proxy" not in str(caught.value)
    assert len(proxy.seen) == 1


def test_a_connection_error_through_a_proxy_names_the_proxy_not_its_password(no_proxies):
    port = dead_port()
    no_proxies.setenv("HTTPS_PROXY", f"http://me:hunter2@127.0.0.1:{port}")
    with Client("https://sdb.test", max_retries=0) as c, pytest.raises(APIConnectionError) as caught:
        c.models()
    text = str(caught.value)
    assert f"proxy http://***@127.0.0.1:{port}" in text and "HTTPS_PROXY" in text and "NO_PROXY" in text
    assert "hunter2" not in text and "me:" not in text


@pytest.mark.parametrize("value", ["socks5://127.0.0.1:9", "socks://127.0.0.1:9"])
def test_a_socks_proxy_leaves_a_loopback_client_alone(sdb_server, no_proxies, value):
    """ALL_PROXY=socks5://... made Client() raise ImportError (socksio missing), socks://... ValueError."""
    no_proxies.setenv("ALL_PROXY", value)
    with Client(sdb_server.url, sdb_server.distill_key, max_retries=0) as c:
        assert [m["name"] for m in c.models()] == [MODEL]

    async def listed():
        async with AsyncClient(sdb_server.url, sdb_server.distill_key, max_retries=0) as ac:
            return await ac.models()

    assert [m["name"] for m in asyncio.run(listed())] == [MODEL]


def test_an_unusable_proxy_for_another_host_is_a_configuration_error(no_proxies):
    no_proxies.setenv("all_proxy", "socks://127.0.0.1:9")
    for make in (Client, AsyncClient):
        with pytest.raises(ConfigurationError, match="all_proxy.*socks5://.*NO_PROXY") as caught:
            make("http://sdb.test:8000")
        assert caught.value.code == "invalid_proxy"
    if importlib.util.find_spec("socksio") is None:
        no_proxies.setenv("all_proxy", "socks5://127.0.0.1:9")
        with pytest.raises(ConfigurationError, match="all_proxy.*socksio.*NO_PROXY"):
            Client("http://sdb.test:8000")
    no_proxies.setenv("no_proxy", "sdb.test")
    Client("http://sdb.test:8000").close()  # the server is not behind the proxy: nothing to refuse


def test_the_cli_says_an_unusable_proxy_in_one_line(no_proxies, capsys):
    from sdb_cli.main import main

    no_proxies.setenv("ALL_PROXY", "socks://127.0.0.1:9")
    assert main(["models", "list", "--url", "http://sdb.test:8000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ALL_PROXY" in err and "Traceback" not in err


# --------------------------------------------------------------------------- fork
def in_child(fn) -> int:
    """``fn()`` in a forked child; its exit code (the child never returns into pytest)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_given_http_client_is_refused_in_a_forked_child(sdb_server):
    """A Client given its own http_client and used after a fork read other processes' answers off the inherited
    keep-alive socket; the child is now told to make its own."""
    with Client(sdb_server.url, sdb_server.distill_key, http_client=httpx.Client(trust_env=False)) as c:
        c.models()  # the parent's connection is in the pool now

        def child() -> int:
            try:
                c.models()
            except ConfigurationError as e:
                return 0 if e.code == "forked_http_client" and "per process" in e.message else 3
            return 2

        assert in_child(child) == 0
        assert [m["name"] for m in c.models()] == [MODEL]  # the parent's own connections still serve it


def test_a_given_async_http_client_is_refused_in_a_forked_child(sdb_server):
    c = AsyncClient(sdb_server.url, sdb_server.distill_key, http_client=httpx.AsyncClient(trust_env=False))
    asyncio.run(c.models())

    def child() -> int:
        try:
            asyncio.run(c.models())
        except ConfigurationError as e:
            return 0 if e.code == "forked_http_client" else 3
        return 2

    assert in_child(child) == 0
