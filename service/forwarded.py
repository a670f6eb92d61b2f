"""Which client a request is from behind a reverse proxy: uvicorn's reading of ``X-Forwarded-For`` from the proxies
``SDB_FORWARDED_ALLOW_IPS`` trusts, except where it trusts every peer (``*``).

uvicorn walks the header from its end past the trusted proxies to the first address it does not trust. Trusting
every peer, it took the header's first entry, which is the one the client writes itself: behind a proxy that
appends (nginx's ``$proxy_add_x_forwarded_for``), each client named its own address, and so passed the per-address
rate limit and connection cap and chose its batch group. Here ``*`` reads as "the peer is a proxy": the client is
the entry the nearest proxy appended, the header's last. Proxies in a chain go in by address or network.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware


class ForwardedClient(ProxyHeadersMiddleware):
    """uvicorn's proxy headers middleware (``sdb serve`` runs it with ``proxy_headers=False`` in its place), its
    ``*`` read as one proxy hop."""

    def __init__(self, app: ASGIApp, trusted: str):
        super().__init__(app, trusted)
        self.one_hop = [e.strip() for e in trusted.split(",") if e.strip()] == ["*"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.one_hop and scope["type"] == "http":
            scope["headers"] = last_forwarded_for(scope["headers"])
        await super().__call__(scope, receive, send)


def last_forwarded_for(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``X-Forwarded-For`` (all of its lines as one list) cut to its last entry."""
    values = [v for k, v in headers if k == b"x-forwarded-for"]
    if not values:
        return headers
    last = b",".join(values).rsplit(b",", 1)[-1].strip()
    return [(k, v) for k, v in headers if k != b"x-forwarded-for"] + [(b"x-forwarded-for", last)]
