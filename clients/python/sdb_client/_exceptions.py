"""The errors the SDK raises, one tree::

    SDBError                     anything below; .status, .code, .message
    ├── ConfigurationError       bad arguments at construction (malformed key or URL); no request made
    ├── APIConnectionError       no HTTP answer after the retries (refused, reset, DNS)
    │   └── APITimeoutError      the answer did not come within the timeout
    ├── BadRequest               400, 415, 422: the request is wrong; resending it will not help
    ├── AuthError                401: no key, a malformed, unknown, revoked or expired key
    ├── PermissionDenied         403: the key lacks the scope, or the model is not on its allowlist
    ├── NotFound                 404: no such model, key, job or artifact (or route)
    ├── PayloadTooLarge          413: one sample is over the server's body limit (a batch is resent in halves)
    ├── QuotaError               429: the key's sample quota is spent; .retry_after when it refills
    ├── ServerError              5xx: the server failed or is not ready
    └── ModelChanged             the version a distill call or RemoteTeacher is pinned to went away mid-run

A 4xx that no other class claims (405, 409, ...) is an ``SDBError`` itself. Messages come
from the server's ``{"error": {"code", "message"}}`` body; an API key is never part of one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class SDBError(Exception):
    """Base class. ``status`` is the HTTP status (None when no answer came), ``code`` the
    service's machine-readable error code, ``message`` its human-readable text. An error that stops a distill
    call part-way carries what was answered (and charged): ``partial``, the logits of the first ``partial_rows``
    inputs (None and 0 when none were), and ``answered_after``, batches past those that were answered too (an
    ``AsyncClient``'s, or a ``RemoteTeacher``'s with ``prefetch`` > 1, in flight when one failed) as
    ``(first row, logits)`` pairs: resume with the rows in neither."""

    partial = None
    partial_rows = 0
    answered_after: Sequence[tuple[int, Any]] = ()

    def __init__(self, message: str, *, status: int | None = None, code: str = "error",
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.retry_after = message, status, code, retry_after

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class ConfigurationError(SDBError, ValueError):
    """An argument or environment variable is unusable (checked before any request)."""


class APIConnectionError(SDBError):
    """The server could not be reached, or the connection broke, after every retry."""


class APITimeoutError(APIConnectionError):
    """No answer within the timeout, after every retry."""


class BadRequest(SDBError):
    """400, 415 or 422: malformed body, wrong input shape or type, invalid option."""


class AuthError(SDBError):
    """401: the request carried no usable API key."""


class PermissionDenied(SDBError):
    """403: the key is valid but not allowed to do this (scope or model allowlist)."""


class NotFound(SDBError):
    """404: the model, key, job or artifact does not exist (or the server lacks the route)."""


class PayloadTooLarge(SDBError):
    """413: the request body is over the server's payload limit. The SDK sends a batch refused so again in halves:
    raised for a request of one sample (or image) only."""


class QuotaError(SDBError):
    """429: the key's sample quota is spent. ``retry_after`` (seconds) when the server says
    when it refills; None for a lifetime quota."""


class ServerError(SDBError):
    """5xx: the server failed (500) or cannot serve now (503, after the retries)."""


class ModelChanged(SDBError):
    """The model version a ``distill`` call or a ``RemoteTeacher`` is pinned to (the caller's, else the one its first
    answer came from) is no longer served, or another one answered: the model changed mid-run. No rows of two
    versions are merged; what was answered before comes with it (``partial``)."""


__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AuthError",
    "BadRequest",
    "ConfigurationError",
    "ModelChanged",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "QuotaError",
    "SDBError",
    "ServerError",
]
