"""uvicorn's HTTP/1.1 protocol (httptools) sending what a connection writes in one loop turn in one ``send``.

uvicorn writes a response's status line and headers when the app sends ``http.response.start``, and its body
when it sends ``http.response.body``: two system calls and two TCP segments for every response, where one
carries both (and the client reads once). Both messages are sent in the same loop turn (nothing between them
waits), so a transport that hands the turn's writes to the socket together at the turn's end sends one. On the
v2 binary infer at 8 callers that was ~10 µs of the server's ~175 µs of CPU per request and +8% throughput
(``benchmarks/serve.py``); every route gains alike. A streamed body still leaves chunk by chunk: each turn's
writes go out at that turn's end, in order, before anything a later turn writes.

``sdb serve`` runs uvicorn with :class:`HttpProtocol` (``http=``); a server that runs the app another way serves
it the same, with one more segment per response.
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a :class:`TurnWrites` transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(TurnWrites(transport, self.loop))
