"""``sdb serve``'s HTTP protocol (service.http_protocol): each response leaves the server in one send, and what
HTTP/1.1 asks of a connection still holds (pipelined requests answered in order, ``Connection: close``, a
100 Continue sent while the server waits for the body, an answer of many segments, a client that goes away
mid-answer).

The real app on a real store under uvicorn in a thread, on asyncio's own loop so that the socket transport's
writes can be counted (uvloop's are C); ``sdb serve`` itself (uvloop) is driven by the end-to-end tests."""
from __future__ import annotations

import asyncio.selector_events
import socket
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


def serve(tmp_path, bundles, protocol) -> ThreadServer:
    app = build_app(make_settings(tmp_path / "data", bundles, register_demo=False))
    srv = ThreadServer(app, http=protocol, loop="asyncio")
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
