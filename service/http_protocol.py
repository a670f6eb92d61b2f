"""uvicorn's HTTP/1.1 protocol (httptools) sending what a connection writes in one loop turn in one ``send``.

uvicorn writes a response's status line and headers when the app sends ``http.response.start``, and its body
when it sends ``http.response.body``: two system calls and two TCP segments for every response, where one
carries both (and the client reads once). Both messages are sent in the same loop turn (nothing between them
waits), so a transport that hands the turn's writes to the socket together at the turn's end sends one. On the
v2 binary infer at 8 callers that was ~10 µs of the server's ~175 µs of CPU per request and +8% throughput
(``benchmarks/serve.py``); every route gains alike. A streamed body still leaves chunk by chunk: each turn's
writes go out at that turn's end, in order, before anything a later turn writes.

It also holds what HTTP/1.1 asks of a server and httptools leaves to it. A request line and headers over
:data:`MAX_HEAD_BYTES` are a 431 (httptools keeps no limit, and joins a header value across reads at a cost
that grows with its square: one caller's 100 MiB header held the event loop, HTTP and gRPC alike, for 10 s);
a transfer coding other than chunked is a 501 (httptools read ``gzip, chunked`` as chunked, the gzip bytes as
the body); an HTTP/1.1 request without ``Host`` a 400; and every request httptools refuses gets the JSON error
body of its route's protocol (:func:`service.errors.error_body`) instead of plain text.

``sdb serve`` runs uvicorn with :class:`HttpProtocol` (``http=``); a server that runs the app another way serves
it the same, with one more segment per response and without these checks.
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import error_body

# The request line and headers together (nginx's large_client_header_buffers allow 4 × 8 KiB; Node's 16 KiB):
# an API key, a proxy's forwarding headers and tracing headers fit many times over.
MAX_HEAD_BYTES = 64 * 1024
LINGER_S = 2.0  # how long a refused request's connection reads on (and drops) what its client still sends


class TurnWrites(asyncio.Transport):
    """A transport whose writes are joined until the end of the loop turn they were made in, then sent at once.

    Everything else is the socket transport's own; closing sends what is pending first (``abort`` drops it, as
    it drops the transport's own buffer)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        # a connection closed meanwhile (the client went away; the protocol drops its answer likewise)
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class _Refused(Exception):
    """Raised from a parser callback: httptools stops parsing, and uvicorn answers through send_400_response."""


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a :class:`TurnWrites` transport, with HTTP's limits on a request's head."""

    _head_bytes = 0  # bytes received since the current request began, while its head is not complete
    _in_head = True
    _refusal: tuple[int, str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(TurnWrites(transport, self.loop))

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # answered; the connection is closing
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Counted by the read, checked once the parser had it: a read that ends the head (and brings a body)
        # is not a head over the limit. At most one read past the limit is parsed.
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and self._refusal is None:
            self._refuse(431, "headers_too_large", _TOO_LARGE)

    def on_headers_complete(self) -> None:
        size, host = len(self.url), False  # one pass over the headers: this runs on every request
        for k, v in self.headers:
            size += len(k) + len(v) + 4
            if k == b"host":
                host = True
            elif k == b"transfer-encoding" and any(c.strip().lower() not in (b"chunked", b"") for c in v.split(b",")):
                self._stop(501, "not_implemented", "a Transfer-Encoding other than chunked is not implemented: send "
                           "the body chunked or with Content-Length (compress it with Content-Encoding: gzip or "
                           "deflate)")
        if size > MAX_HEAD_BYTES:
            self._stop(431, "headers_too_large", _TOO_LARGE)
        if not host and self.parser.get_http_version() == "1.1":
            self._stop(400, "bad_request", "an HTTP/1.1 request needs a Host header")
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0

    def send_400_response(self, msg: str) -> None:
        """What uvicorn answers a request httptools cannot parse (and the refusals above), as JSON."""
        status, code, message = self._refusal or (400, "bad_request", "the request is not valid HTTP/1.1")
        self._refuse(status, code, message)

    def _stop(self, status: int, code: str, message: str) -> None:
        self._refusal = (status, code, message)
        raise _Refused(message)

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the JSON error body and close; close alone when an earlier request's answer is
        still due on this connection (pipelined), or this request's has begun."""
        self._refusal = (status, code, message)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self._in_head or cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True  # its body was refused: answered here; what its app reads or sends is dropped
            cycle.message_event.set()
        path = self.url.split(b"?", 1)[0]
        body = error_body(code, message, v2=path == b"/v2" or path.startswith(b"/v2/"))
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                    % len(body))
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            # A lingering close: the client may still be sending what was refused; closing with its bytes
            # unread would reset the connection, and the answer with it. What comes meanwhile is dropped.
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
            return
        self.transport.close()


_TOO_LARGE = f"the request line and headers are over {MAX_HEAD_BYTES} bytes"
