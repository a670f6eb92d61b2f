"""Which client a request is from behind a reverse proxy: uvicorn's reading of ``X-Forwarded-For`` from the proxies
``SDB_FORWARDED_ALLOW_IPS`` trusts, except where it trusts every peer (``*``).

uvicorn walks the header from its end past the trusted proxies to the first address it does not trust. Trusting
every peer, it took the header's first entry, which is the one the client writes itself: behind a proxy that
appends (nginx's ``$proxy_add_x_forwarded_for``), each client named its own address, and so passed the per-address
rate limit and connection cap and chose its batch group. Here ``*`` reads as "the peer is a proxy": the client is
the entry the nearest proxy appended, the header's last. Proxies in a chain go in by address or network.

HTTP reads it in :class:`ForwardedClient`; gRPC (``service/grpc/server.py``), whose calls carry the header as
``x-forwarded-for`` metadata (nginx's ``grpc_set_header``), in :func:`forwarded_client`: the same trust, the same walk.
"""
from __future__ import annotations

from starlette.types import Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware, _TrustedHosts

TrustedProxies = _TrustedHosts  # SDB_FORWARDED_ALLOW_IPS as uvicorn reads it: `peer in proxies`


class ForwardedClient(ProxyHeadersMiddleware):
    """uvicorn's proxy headers middleware (``sdb serve`` runs it with ``proxy_headers=False`` in its place), its
    ``*`` read as one proxy hop."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.trusted_hosts.always_trust and scope["type"] == "http":
            scope["headers"] = last_forwarded_for(scope["headers"])
        await super().__call__(scope, receive, send)


def forwarded_client(proxies: TrustedProxies, peer: str, forwarded_for: list[str]) -> str:
    """The client a connection from ``peer`` is for, given the values of its ``X-Forwarded-For`` lines, as
    :class:`ForwardedClient` names it: ``peer`` itself unless ``proxies`` trust it and it forwarded a client."""
    if peer not in proxies or not forwarded_for:
        return peer
    joined = ", ".join(forwarded_for)
    if proxies.always_trust:
        joined = _last_entry(joined)
    host, _ = proxies.get_trusted_client_address(joined)
    return host or peer  # an empty header names no one (uvicorn keeps the peer too)


def last_forwarded_for(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``X-Forwarded-For`` (all of its lines as one list) cut to its last entry."""
    values = [v for k, v in headers if k == b"x-forwarded-for"]
    if not values:
        return headers
    last = _last_entry(b",".join(values).decode("latin1")).encode("latin1")
    return [(k, v) for k, v in headers if k != b"x-forwarded-for"] + [(b"x-forwarded-for", last)]


def _last_entry(forwarded_for: str) -> str:
    """An ``X-Forwarded-For`` list's last entry: the address the nearest proxy appended."""
    return forwarded_for.rsplit(",", 1)[-1].strip()
