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

And it keeps one client from holding what every client needs (each connection is an open file; one client held
them all, and every other was reset). A request's head must arrive within ``head_timeout_s`` of its first byte, and
its body never pause longer than ``body_timeout_s`` (408, then the close); a connection that sends nothing is
closed like an idle keep-alive one; at most :data:`MAX_PIPELINED` requests wait behind the one being answered; one
client address keeps at most ``max_connections_per_address`` connections open (503). A reverse proxy in front is
still what an internet-facing server wants (docs/deploy.md).

``sdb serve`` runs uvicorn with :meth:`HttpProtocol.configured` (``http=``); a server that runs the app another way
serves it the same, with one more segment per response and without these checks.

A request refused here is in the app's metrics all the same: one whose head was refused (or its connection) under
the route ``<below_app>``, one whose body was under its own route (:data:`~service.metrics.REFUSED_BODY`).
"""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from uvicorn.middleware.proxy_headers import _TrustedHosts  # forwarded_allow_ips, as uvicorn reads it
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .errors import error_body
from .metrics import COUNT_REFUSAL, REFUSED_BODY
from .ratelimit import client_network
from .settings import Settings

# The request line and headers together (nginx's large_client_header_buffers allow 4 × 8 KiB; Node's 16 KiB):
# an API key, a proxy's forwarding headers and tracing headers fit many times over.
MAX_HEAD_BYTES = 64 * 1024
LINGER_S = 2.0  # how long a refused request's connection reads on (and drops) what its client still sends
# Requests a connection may have queued behind the one being answered (pipelined): clients that pipeline (few do)
# send a few at once; past it the connection takes no more (HttpProtocol._stop_taking_requests).
MAX_PIPELINED = 32


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


@dataclass
class _Server:
    """What the connections of one uvicorn server share: the open connections per client address, and the
    addresses of the proxies it trusts (uvicorn's ``forwarded_allow_ips``: each of their connections carries many
    clients, so none is capped)."""

    trusted: _TrustedHosts
    open: Counter = field(default_factory=Counter)


_SERVERS: WeakKeyDictionary[ServerState, _Server] = WeakKeyDictionary()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a :class:`TurnWrites` transport, with HTTP's limits on a request's head, on
    the requests pipelined ahead, on the time a client takes to send a request, and on a client's connections.

    The limits are ``Settings``' ``http_*`` (their defaults here); :meth:`configured` makes the class of a
    server's own."""

    head_timeout_s: float = Settings.model_fields["http_head_timeout_s"].default
    body_timeout_s: float = Settings.model_fields["http_body_timeout_s"].default
    max_connections_per_address: int = Settings.model_fields["http_max_connections_per_address"].default

    _head_bytes = 0  # bytes received since the current request began, while its head is not complete
    _in_head = True
    _refusal: tuple[int, str, str] | None = None
    _taking_requests = True  # False once a refusal was answered or the pipeline is full: what comes is dropped
    _address: str | None = None  # the client address this connection is counted against
    # The one timer of a connection (armed by a read, then by itself), and the time the client's current debt is
    # measured from: the first byte of a head, the latest read of a body; None while no request is being read.
    _watch: asyncio.TimerHandle | None = None
    _since: float | None = None
    _was_held = False  # the latest check found the client waiting on the server (100 Continue, paused reading)

    @classmethod
    def configured(cls, settings: Settings) -> type[HttpProtocol]:
        """This protocol with ``settings``' limits: what ``sdb serve`` passes to uvicorn as ``http``."""
        return type(cls.__name__, (cls,), {"head_timeout_s": settings.http_head_timeout_s,
                                           "body_timeout_s": settings.http_body_timeout_s,
                                           "max_connections_per_address": settings.http_max_connections_per_address})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(TurnWrites(transport, self.loop))
        if not self._count_connection():
            return
        # a new connection that sends nothing is closed like an idle keep-alive one (uvicorn arms this timer only
        # after a response, and stops it at the first read)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._watch is not None:
            self._watch.cancel()
        if self._address is not None:
            opened = _SERVERS[self.server_state].open
            opened[self._address] -= 1
            if not opened[self._address]:
                del opened[self._address]
            self._address = None

    # No route of the service is a WebSocket: an upgrade request is answered as the plain request it also is. Handed
    # to uvicorn's WebSocket protocol, the connection left this one without its connection_lost, and its address's
    # count of open connections never came down (256 such requests, and the address was refused for good).
    def _should_upgrade_to_ws(self) -> bool:
        return False

    def _unsupported_upgrade_warning(self) -> None:
        pass  # uvicorn's says to install a WebSocket library, per request: none is wanted

    def data_received(self, data: bytes) -> None:
        if not self._taking_requests:
            return  # answered, or no more requests are taken; the connection is closing
        if self._in_head:
            self._head_bytes += len(data)
        if self._watch is None:
            self._watch = self.loop.call_later(min(self.head_timeout_s, self.body_timeout_s), self._check_client)
        super().data_received(data)
        if not self._in_head:
            self._since = self.loop.time()  # a body being read: it made progress
        # Counted by the read, checked once the parser had it: a read that ends the head (and brings a body)
        # is not a head over the limit. At most one read past the limit is parsed.
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and self._taking_requests:
            self._refuse(431, "headers_too_large", _TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._since = self.loop.time()

    def on_headers_complete(self) -> None:
        if len(self.pipeline) >= MAX_PIPELINED:
            self._stop_taking_requests()
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
        self._in_head, self._head_bytes, self._since = True, 0, None

    def send_400_response(self, msg: str) -> None:
        """What uvicorn answers a request httptools cannot parse (and the refusals above), as JSON."""
        if self._refusal is None and not self._taking_requests:
            return  # parsing stopped on purpose (_stop_taking_requests): the requests queued are answered
        status, code, message = self._refusal or (400, "bad_request", "the request is not valid HTTP/1.1")
        self._refuse(status, code, message)

    def _stop(self, status: int, code: str, message: str) -> None:
        self._refusal = (status, code, message)
        raise _Refused(message)

    def _stop_taking_requests(self) -> None:
        """Stop parsing a connection with :data:`MAX_PIPELINED` requests queued: they are answered in order, the
        last with ``Connection: close``, then it closes (a client that pipelines sends the rest again, RFC 9112
        §9.3.2). httptools parses every request of a read at once, and each queued one held ~2 KiB: one
        connection writing pipelined requests without reading the answers took gigabytes."""
        self._taking_requests = False
        self.pipeline[0][0].keep_alive = False  # the one queued last
        raise _Refused("too many pipelined requests")

    def _count_connection(self) -> bool:
        """Count this connection against its client address's cap; False when it is past the cap: then it is
        answered 503 and closed. Refused connections count until they are closed (a refusal lingers, reading what
        its client sends so that the answer reaches it): past twice the cap one is closed with no answer."""
        cap = self.max_connections_per_address
        if not cap or self.client is None:  # no cap; a Unix socket
            return True
        server = _SERVERS.get(self.server_state)
        if server is None:
            server = _SERVERS[self.server_state] = _Server(_TrustedHosts(self.config.forwarded_allow_ips))
        if self.client[0] in server.trusted:  # a proxy: uncounted (every host of its /64 shared its count)
            return True
        address = client_network(self.client[0])  # an IPv6 client's /64: it may connect from any address in it
        opened = server.open[address] + 1
        server.open[address], self._address = opened, address
        if opened <= cap:
            return True
        self._taking_requests = False
        if opened > 2 * cap:
            self.transport.close()
        else:
            self._count_refusal(503, "too_many_connections")
            self._answer_and_close(self._error_answer(
                503, "too_many_connections", f"this client address has {cap} connections open to the server, its "
                "limit: send more requests on each (keep-alive), or close some", v2=False))
        return False

    def _check_client(self) -> None:
        """The connection's timer: what the client owes it, the rest of a request's head (within
        ``head_timeout_s`` of its first byte) or the next bytes of its body (within ``body_timeout_s`` of the
        last), is there in time, or the request is answered 408 and the connection closed. The clock stops while
        the client waits on the server (for a 100 Continue; while the server reads no more)."""
        self._watch = None
        if not self._taking_requests or self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closing, or handed to another protocol (an upgrade)
        if self._since is None:  # no request is being read: the app has one, or the keep-alive timer watches
            if self.timeout_keep_alive_task is None and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()  # it sent blank lines alone (they begin no request; they stopped that timer)
            return
        now, cycle = self.loop.time(), self.cycle
        held = self.flow.read_paused or (not self._in_head and cycle is not None and cycle.waiting_for_100_continue)
        if held or self._was_held:  # waiting on the server (or was, until lately): the client's clock starts again
            self._since = now
        self._was_held = held
        due = self._since + (self.head_timeout_s if self._in_head else self.body_timeout_s)
        if now < due:
            self._watch = self.loop.call_at(due, self._check_client)
        elif self._in_head:
            self._refuse(408, "request_timeout", f"the request line and headers did not arrive within "
                         f"{self.head_timeout_s:g} s of their first byte: send a request's head at once")
        else:
            self._refuse(408, "request_timeout", f"the request body paused for over {self.body_timeout_s:g} s: "
                         "send it without pauses (the connection is closed; send the request again)")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the JSON error body and close; close alone when an earlier request's answer is
        still due on this connection (pipelined), or the refused request's own has begun."""
        self._refusal, self._taking_requests = (status, code, message), False
        if self.transport.is_closing():
            return
        cycle = self.cycle  # the request whose body is being read; while a head is, the one before it
        if self._in_head:
            answerable = cycle is None or cycle.response_complete
        else:  # this request's own answer, unless it began (or an earlier one is still due)
            answerable = cycle is not None and not cycle.response_started and not self.pipeline
        if not answerable:
            self.transport.close()
            return
        if self._in_head:
            self._count_refusal(status, code)
        else:
            cycle.scope[REFUSED_BODY] = status, code  # counted by the app's metrics, on its route
            cycle.disconnected = True  # its body was refused: answered here; what its app reads or sends is dropped
            cycle.message_event.set()
        path = self.url.split(b"?", 1)[0]
        self._answer_and_close(self._error_answer(status, code, message, v2=path == b"/v2" or path.startswith(b"/v2/")))

    def _count_refusal(self, status: int, code: str) -> None:
        """A request answered here, before the app saw it, in the app's metrics (``route="<below_app>"``)."""
        # the app's, left in the server's lifespan state (uvicorn's app_state): none without a lifespan
        count = getattr(self, "app_state", {}).get(COUNT_REFUSAL)
        if count is not None:
            count(status, code)

    def _answer_and_close(self, answer: bytes) -> None:
        self.transport.write(answer)
        if self.transport.can_write_eof():
            # A lingering close: the client may still be sending what was refused; closing with its bytes
            # unread would reset the connection, and the answer with it. What comes meanwhile is dropped.
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
            return
        self.transport.close()

    def _error_answer(self, status: int, code: str, message: str, *, v2: bool) -> bytes:
        """A whole ``Connection: close`` answer with the JSON error body of the route's protocol."""
        body = error_body(code, message, v2=v2)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                    % len(body))
        return b"".join(head) + body


_TOO_LARGE = f"the request line and headers are over {MAX_HEAD_BYTES} bytes"
