"""``sdb serve``'s HTTP protocol (service.http_protocol): each response leaves the server in one send, and what
HTTP/1.1 asks of a connection still holds (pipelined requests answered in order, ``Connection: close``, a
100 Continue sent while the server waits for the body, an answer of many segments, a client that goes away
mid-answer), and what one client may hold of it is bounded (requests pipelined, time to send one, connections).

The real app on a real store under uvicorn in a thread, on asyncio's own loop so that the socket transport's
writes can be counted (uvloop's are C); ``sdb serve`` itself (uvloop) is driven by the end-to-end tests."""
from __future__ import annotations

import asyncio.selector_events
import socket
import threading
import time
from collections import Counter

import httpx
import orjson
import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.app import build_app
from service.auth import create_key
from service.http_protocol import HttpProtocol
from tests.client.conftest import ThreadServer

from .conftest import make_settings, sdb_bytes


@pytest.fixture
def sends(monkeypatch) -> Counter:
    """How many times each socket transport of this process wrote to its socket."""
    counted: Counter = Counter()
    write = asyncio.selector_events._SelectorSocketTransport.write

    def counting(self, data):
        counted[id(self)] += 1
        return write(self, data)

    monkeypatch.setattr(asyncio.selector_events._SelectorSocketTransport, "write", counting)
    return counted


def serve(tmp_path, bundles, protocol, uvicorn_config: dict | None = None, **settings) -> ThreadServer:
    """The app on ``protocol`` (sdb's with ``settings``' limits, as ``sdb serve`` runs it)."""
    settings = make_settings(tmp_path / "data", bundles, register_demo=False, **settings)
    app = build_app(settings)
    if protocol is HttpProtocol:
        protocol = HttpProtocol.configured(settings)
    srv = ThreadServer(app, http=protocol, loop="asyncio", **(uvicorn_config or {}))
    srv.app = app
    return srv


def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("protocol, per_response", [(HttpProtocol, 1), (HttpToolsProtocol, 2)],
                         ids=["sdb", "uvicorn"])
def test_a_response_leaves_in_one_send(tmp_path, bundles, sends, protocol, per_response):
    # uvicorn's own protocol writes the head and the body apart: the reason for sdb's
    srv = serve(tmp_path, bundles, protocol)
    try:
        sends.clear()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for _ in range(5):
                assert c.get("/healthz").status_code == 200
            r = c.post("/v2/models/nope/infer", content=b"{}")
            assert r.status_code == 404 and "error" in r.json()
        assert sorted(sends.values()) == [6 * per_response]  # one connection, six answers
    finally:
        srv.stop()


def test_http_1_1_holds_on_one_send_per_turn(tmp_path, bundles):
    srv = serve(tmp_path, bundles, HttpProtocol)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            spec = c.get("/openapi.json")
        assert spec.status_code == 200 and len(spec.content) > 1 << 16  # many TCP segments
        assert spec.json()["paths"]

        # two requests in one segment, the second asking to close: both answered, in order, then EOF
        raw = exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                                 b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        first, second = raw.split(b"HTTP/1.1 ", 2)[1:]
        assert first.startswith(b"200 ") and second.startswith(b"200 ")
        assert second.endswith(b'{"live":true}')

        # HEAD (uptime monitors send it) is GET's status and headers alone, on the same connection as a GET after it
        raw = exchange(srv.port, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                                 b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        head, get = raw.split(b"HTTP/1.1 ", 2)[1:]
        assert head.startswith(b"200 ") and head.endswith(b"\r\n\r\n"), head  # no body
        assert get.startswith(b"200 ") and get.endswith(b'{"status":"ok"}'), get
        length = [line for line in get.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        assert length and length[0].lower() in head.lower(), (head, get)  # the GET's length, announced
        raw = exchange(srv.port, b"HEAD /v1/models/x/predict HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 405 ") and b"\r\nallow: post\r\n" in raw.lower(), raw  # a POST route

        # a large answer read in full over a closing connection
        raw = exchange(srv.port, b"GET /openapi.json HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert raw.split(b"\r\n\r\n", 1)[1] == spec.content

        # a client that waits for "100 Continue" before its body gets it while the server waits for the body
        admin, _ = create_key(srv.app.state.store, srv.app.state.settings.pepper, scopes=["admin"])
        r = httpx.post(srv.url + "/v1/models", files={"file": ("digits-a.sdb", sdb_bytes(bundles.a))},
                       headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        assert r.status_code == 201, r.text
        body = orjson.dumps({"inputs": bundles.x[:1].tolist()})
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /v1/models/digits-a/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
            assert s.recv(1 << 10).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            s.sendall(body)
            answer = b""
            while chunk := s.recv(1 << 16):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"predictions"' in answer, answer

        # a client that leaves before reading its answer costs the server nothing it needs
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200
            assert c.get("/openapi.json").content == spec.content
    finally:
        srv.stop()


def test_a_head_past_the_limit_or_not_http_is_a_json_error_and_a_body_is_not_a_head(tmp_path, bundles):
    # httptools keeps no limit on a head, and joins a header across reads at a cost that grows with its square:
    # one caller's 100 MiB header held the loop 10 s. Each refusal is the route's JSON error, then the close.
    from service.http_protocol import MAX_HEAD_BYTES

    srv = serve(tmp_path, bundles, HttpProtocol)
    try:
        def answer(raw: bytes) -> tuple[int, bytes]:
            out = exchange(srv.port, raw)
            head, _, body = out.partition(b"\r\n\r\n")
            assert head, raw[:200]
            assert b"connection: close" in head.lower() or not head.startswith(b"HTTP/1.1 4"), head
            return int(head.split(b" ", 2)[1]), body

        long = b"x" * (4 << 20)  # sent in many reads: refused after the first past the limit, never parsed whole
        status, body = answer(b"GET /v2 HTTP/1.1\r\nHost: t\r\nX-Long: " + long + b"\r\n\r\n")
        assert status == 431 and orjson.loads(body) == {
            "error": f"the request line and headers are over {MAX_HEAD_BYTES} bytes"}
        status, body = answer(b"GET /healthz?" + long + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status == 431 and orjson.loads(body)["error"]["code"] == "headers_too_large"
        # a head just under the limit, and the body after it, whatever the reads
        ok = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Pad: " + b"p" * (MAX_HEAD_BYTES - 200)
        assert answer(ok + b"\r\n\r\n")[0] == 200
        with httpx.Client(base_url=srv.url, timeout=30) as c:  # 4 MiB of body: not a head
            r = c.post("/v2/models/nope/infer", content=b"{" + b" " * (4 << 20) + b"}",
                       headers={"Content-Type": "application/json"})
            assert r.status_code == 404 and r.json() == {"error": r.json()["error"]}

        status, body = answer(b"POST /v2/models/x/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n"
                              b"\r\n0\r\n\r\n")
        assert status == 501 and "Transfer-Encoding" in orjson.loads(body)["error"]
        status, body = answer(b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status == 400 and "Host" in orjson.loads(body)["error"]["message"]
        status, body = answer(b"POST /v1/models/x/predict HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"zz\r\n")  # not a chunk size
        assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_request"
        # HTTP/1.0 needs no Host; the server still serves after every refusal
        assert exchange(srv.port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    finally:
        srv.stop()


def read_until_closed(s: socket.socket, within: float) -> tuple[bytes, float]:
    """What the server sends on ``s`` until it closes it (a reset after its answer counts), and how long that took;
    fails when it is still open ``within`` seconds on."""
    start, chunks = time.monotonic(), []
    s.settimeout(within)
    try:
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    except TimeoutError:
        pytest.fail(f"the server kept the connection open over {within} s; it sent {b''.join(chunks)[:200]!r}")
    except ConnectionResetError:
        pass
    return b"".join(chunks), time.monotonic() - start


def test_pipelined_requests_wait_within_a_bound_and_are_answered_in_order(tmp_path, bundles):
    # httptools parses every request of a read (up to 256 KiB) at once, and uvicorn queued each (~2 KiB): one
    # connection writing 20 MB of pipelined requests and reading no answer took 1.3 GB. Past MAX_PIPELINED
    # waiting, the connection takes no more: those are answered in order, the last with Connection: close.
    from service.http_protocol import MAX_PIPELINED

    srv = serve(tmp_path, bundles, HttpProtocol)
    deepest, sending = [0], threading.Event()

    def watch_queues():
        while sending.is_set():
            try:
                deepest[0] = max([deepest[0]] + [len(p.pipeline) for p in list(srv.server.server_state.connections)])
            except RuntimeError:  # the set changed size: look again
                pass
            time.sleep(0.001)

    try:
        # the order, on a few: each answer is its own request's
        raw = exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n"
                                 b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert [a.split(b"\r\n\r\n", 1)[1] for a in raw.split(b"HTTP/1.1 ")[1:]] == [
            b'{"status":"ok"}', b'{"ready":true}', b'{"live":true}'], raw

        one = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        blob = memoryview(one * (2_000_000 // len(one)))  # 54,054 requests
        sending.set()
        threading.Thread(target=watch_queues, daemon=True).start()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it reads no answer while it writes
            s.connect(("127.0.0.1", srv.port))
            s.settimeout(0.5)
            sent, start = 0, time.monotonic()
            while sent < len(blob) and time.monotonic() - start < 10:
                try:
                    sent += s.send(blob[sent:sent + (1 << 16)])
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):  # closed by the server
                    break
            time.sleep(0.2)
            sending.clear()
            assert deepest[0] <= MAX_PIPELINED, f"{deepest[0]} requests waited on one connection"
            raw, _ = read_until_closed(s, within=10)
        answers = raw.split(b"HTTP/1.1 ")[1:]
        assert answers and all(a.startswith(b"200 ") and a.endswith(b'{"status":"ok"}') for a in answers), raw[:500]
        assert len(answers) < len(blob) // len(one) and b"connection: close" in answers[-1].lower(), answers[-1]
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200
    finally:
        sending.clear()
        srv.stop()


def test_a_client_that_stalls_a_request_or_sends_none_is_answered_408_and_closed(tmp_path, bundles):
    # A connection was closed only by the keep-alive timer, which starts after a response: one that sent nothing,
    # a head a byte at a time or a body that stopped was held for good (one client took every open file).
    srv = serve(tmp_path, bundles, HttpProtocol, {"timeout_keep_alive": 1},
                http_head_timeout_s=0.5, http_body_timeout_s=1.0)

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", srv.port), timeout=10)

    def timed_out(raw: bytes) -> str:
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), raw[:300]
        return orjson.loads(body)["error"]["message"]

    try:
        with connect() as s:  # nothing sent: closed as an idle keep-alive connection, with no answer
            assert read_until_closed(s, within=5)[0] == b""
        with connect() as s:  # blank lines begin no request, and stop the keep-alive timer
            s.sendall(b"\r\n")
            assert read_until_closed(s, within=5)[0] == b""

        with connect() as s:  # half a head
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            raw, took = read_until_closed(s, within=5)
            assert "headers did not arrive within 0.5 s" in timed_out(raw) and took < 3
        with connect() as s:  # a head a byte at a time: the deadline counts from its first byte, not the last
            head, answer, start = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"s" * 200, b"", time.monotonic()
            s.settimeout(0.05)
            for byte in head:
                try:
                    s.sendall(bytes([byte]))
                    answer = s.recv(1 << 16)
                    break
                except TimeoutError:
                    continue
            assert answer.startswith(b"HTTP/1.1 408 ") and time.monotonic() - start < 3, answer

        # a body that stops: the route is reading it
        admin, _ = create_key(srv.app.state.store, srv.app.state.settings.pepper, scopes=["admin"])
        r = httpx.post(srv.url + "/v1/models", files={"file": ("digits-a.sdb", sdb_bytes(bundles.a))},
                       headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        assert r.status_code == 201, r.text
        predict = b"POST /v1/models/digits-a/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        with connect() as s:
            s.sendall(predict + b"Content-Length: 100000\r\n\r\n" + b'{"inputs": [' + b" " * 50_000)
            raw, took = read_until_closed(s, within=5)
            assert "body paused for over 1 s" in timed_out(raw) and took < 4
        with connect() as s:  # a 100 Continue answered, and no body: the same
            s.sendall(predict + b"Expect: 100-continue\r\nContent-Length: 8000000\r\n\r\n")
            raw, took = read_until_closed(s, within=5)
            assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), raw[:300]
            assert "body paused" in timed_out(raw.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")) and took < 4

        # a client that keeps pace is served, whatever the timeouts: each part of the body within them
        body = orjson.dumps({"inputs": bundles.x[:1].tolist()})
        with connect() as s:
            s.sendall(predict + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
            for part in range(0, len(body), len(body) // 4 + 1):
                time.sleep(0.3)
                s.sendall(body[part:part + len(body) // 4 + 1])
            raw, _ = read_until_closed(s, within=10)
            assert raw.startswith(b"HTTP/1.1 200 ") and b'"predictions"' in raw, raw[:300]
        with httpx.Client(base_url=srv.url, timeout=30) as c:  # and on a keep-alive connection, at leisure
            assert c.get("/healthz").status_code == 200
            time.sleep(0.7)
            assert c.get("/healthz").status_code == 200
    finally:
        srv.stop()


def test_one_address_holds_at_most_its_cap_of_connections(tmp_path, bundles):
    # One client opening ~4,070 connections that sent nothing took every open file: every other client was
    # reset. Past the cap a connection is answered 503 and closed; other addresses are served, and a proxy the
    # server trusts (forwarded_allow_ips, 127.0.0.1 here) is not capped: it carries many clients.
    srv = serve(tmp_path, bundles, HttpProtocol, http_max_connections_per_address=3)

    def connect(source: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", srv.port), timeout=10, source_address=(source, 0))

    def healthz(s: socket.socket) -> bytes:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        return s.recv(1 << 16)

    try:
        held = [connect("127.0.0.2") for _ in range(3)]
        try:
            assert healthz(held[0]).startswith(b"HTTP/1.1 200 ")  # counted, and served
            with connect("127.0.0.2") as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                raw, _ = read_until_closed(s, within=5)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head.lower(), raw
            assert orjson.loads(body)["error"]["code"] == "too_many_connections"
            with connect("127.0.0.3") as s:  # another address
                assert healthz(s).startswith(b"HTTP/1.1 200 ")
            proxied = [connect("127.0.0.1") for _ in range(5)]  # a trusted proxy's
            assert all(healthz(s).startswith(b"HTTP/1.1 200 ") for s in proxied)
            for s in proxied:
                s.close()
            held.pop().close()  # one closed: room for one more
            time.sleep(0.2)
            with connect("127.0.0.2") as s:
                assert healthz(s).startswith(b"HTTP/1.1 200 ")
        finally:
            for s in held:
                s.close()
        # WebSocket upgrades, answered as the plain requests they are: handed to uvicorn's WebSocket protocol, each
        # connection left its slot taken for good, and the address was refused once the cap was reached
        upgrade = (b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        for _ in range(6):
            with connect("127.0.0.4") as s:
                s.sendall(upgrade)
                assert s.recv(1 << 16).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.2)
        with connect("127.0.0.4") as s:
            assert healthz(s).startswith(b"HTTP/1.1 200 ")
    finally:
        srv.stop()


def test_a_trusted_proxy_is_not_counted_against_its_neighbours_in_its_ipv6_64():
    """An IPv6 client is its /64 in the connection cap; a trusted proxy is never capped, and was still counted in
    its /64, so a neighbour of the proxy (a pod on its node, a host on its LAN) was refused from its first
    connection once the proxy held the cap."""
    import types

    state = type("ServerState", (), {})()  # the server the connections share (weakly referenced)
    refused = []

    def connect(ip: str) -> bool:
        p = HttpProtocol.__new__(HttpProtocol)
        p.max_connections_per_address, p.server_state, p.client = 3, state, (ip, 5000)
        p.config = types.SimpleNamespace(forwarded_allow_ips="fd00::10")
        p.transport = types.SimpleNamespace(close=lambda: None)
        p._answer_and_close, p._error_answer = (lambda body: refused.append(ip)), (lambda *a, **k: b"")
        return p._count_connection()

    assert all(connect("fd00::10") for _ in range(5))  # the proxy: uncapped
    assert [connect("fd00::20") for _ in range(4)] == [True, True, True, False]  # its neighbour: its own cap
    assert not connect("fd00::21") and refused == ["fd00::20", "fd00::21"]  # one /64: one client
