"""Token buckets per caller (a key, or a client address without one): over the rate is a 429 before any model time."""
from __future__ import annotations

import functools
import ipaddress
import math
import threading
import time

from .errors import ApiError

ANONYMOUS_CALLER = "this address, without a key,"  # how a 429 names a caller that sent no key
UNPROVEN_CALLER = "this address, with Authorization headers that authenticated nothing,"
UNPROVEN = "sdb.unproven_address"  # set in a scope whose request sent a key: its address (service.middleware)
AUTHENTICATED = "sdb.authenticated"  # set by service.deps once a request's key is verified


def client_network(address: str) -> str:
    """The caller a client address stands for in per-address limits (rates, connections, batches): an IPv6
    address's /64, since one host is given a whole /64 and may send from any address in it (six addresses of one
    /64 each had the rate of a client); an IPv4-mapped IPv6 address its IPv4. Anything else as it is."""
    return address if ":" not in address else _ipv6_network(address)


@functools.lru_cache(maxsize=65_536)
def _ipv6_network(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # not an address (a name a proxy wrote): as it is
        return address
    if ip.version == 4:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


class RateLimiter:
    """``rate`` requests per second per caller, in bursts of up to ``burst``; a rate of 0 turns it off.

    Memory is bounded: past ``max_callers`` buckets, the ones that have refilled completely (they
    hold no state a fresh bucket would not) are dropped first.
    """

    def __init__(self, rate: float, burst: int, max_callers: int = 100_000) -> None:
        self.rate, self.burst, self.max_callers = rate, max(1, burst), max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, caller: str, now: float | None = None) -> float:
        """0.0 when the request may go on (it takes a token); otherwise the seconds until it may."""
        return self._bucket(caller, now, take=True)

    def wait(self, caller: str, now: float | None = None) -> float:
        """What :meth:`take` would answer, without taking: 0.0 while the caller has a request left."""
        return self._bucket(caller, now, take=False)

    def _bucket(self, caller: str, now: float | None, take: bool) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(caller, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1.0:
                if take:
                    self._buckets[caller] = (tokens, now)
                return (1.0 - tokens) / self.rate
            if take:
                self._buckets[caller] = (tokens - 1.0, now)
                if len(self._buckets) > self.max_callers:
                    self._prune(now)
            return 0.0

    def _prune(self, now: float) -> None:
        full = [c for c, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for c in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[c]

    def check(self, caller: str, what: str) -> None:
        """Raise the 429 (with ``Retry-After``) for a caller over its rate."""
        wait = self.take(caller)
        if wait > 0:
            raise self.refusal(wait, what)

    def refusal(self, wait: float, what: str) -> ApiError:
        """The 429 for ``what`` (the caller, in words), which may go on in ``wait`` seconds."""
        ms = max(1, math.ceil(wait * 1000))
        when = f"{ms} ms" if ms < 1000 else f"{wait:.1f} s"
        # Retry-After takes whole seconds (RFC 9110): a wait of 5 ms read as 1 s stalled a client 200 times too
        # long, so Retry-After-Ms says it exactly too (as other APIs do; the SDK reads it first).
        return ApiError(429, "rate_limited", f"{what} is over {self.rate:g} requests/s; retry in {when}",
                        headers={"Retry-After": str(max(1, math.ceil(wait))), "Retry-After-Ms": str(ms)})
