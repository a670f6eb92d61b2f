"""One exception type, mapped once to the error body of the route's protocol.

``/v1`` (and every route outside ``/v2``) answers ``{"error": {"code", "message"}}``; ``/v2`` answers
the Open Inference Protocol's ``{"error": "message"}`` (tritonclient shows ``body["error"]`` as a
string), with the same status. :class:`ErrorResponse` picks the form when it is sent, from the
request's path, so the exception handlers here and the middleware's own answers (413, 429, 500)
agree. Validation errors, unknown routes and methods, and any unexpected exception get the same
body; an unexpected one is logged by the middleware and answers a 500 that says nothing internal.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import reprlib
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import get_route_path
from starlette.types import Receive, Scope, Send

from .store import MOVED, READ_ONLY, STORE_FULL, is_full, is_moved, is_read_only

log = logging.getLogger("sdb.service")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


QUOTED_CHARS = 100  # of a caller's string that a message quotes: enough to tell which, never the whole of a huge one
_QUOTE = reprlib.Repr()  # bounded in depth and length, whatever the value
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxdict = 2, 3, 3
_QUOTE.maxstring = _QUOTE.maxother = QUOTED_CHARS


def quoted(value: Any) -> str:
    """A value the caller sent, as a message quotes it: its repr, a string cut at :data:`QUOTED_CHARS` characters
    (then "…"), anything else bounded in depth and length. A 20,000-character name was echoed whole: a gRPC status
    past the metadata limit (RESOURCE_EXHAUSTED instead of the error), an error body as large as the request."""
    if isinstance(value, str):
        return repr(value[:QUOTED_CHARS]) + ("…" if len(value) > QUOTED_CHARS else "")
    return _QUOTE.repr(value)


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def invalid(message: str, code: str = "invalid_input") -> ApiError:
    return ApiError(422, code, message)


def not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(404, code, message)


NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


def no_room(e: BaseException, what: str) -> ApiError | None:
    """507 ``insufficient_storage`` for an error that says the disk had no room to store ``what``, else None
    (the caller's error stands). The message names no server path."""
    if isinstance(e, OSError) and e.errno in NO_ROOM:
        return ApiError(507, "insufficient_storage", f"the server has no room to store {what} "
                        f"({os.strerror(e.errno).lower()}): try again later")
    return None


@contextlib.contextmanager
def room_for(what: str) -> Iterator[None]:
    """Around writes to the server's disk (a new folder or file takes a block on ext4, none on tmpfs): an error that
    says the disk had no room becomes :func:`no_room`'s 507; any other stands."""
    try:
        yield
    except OSError as e:
        full = no_room(e, what)
        if full is not None:
            raise full from None
        raise


def is_v2(scope: Scope) -> bool:
    """Whether a request is on the Open Inference Protocol's routes (``/v2``, under any root path)."""
    path = get_route_path(scope) if "path" in scope else ""
    return path == "/v2" or path.startswith("/v2/")


def error_body(code: str, message: str, v2: bool = False) -> bytes:
    """The JSON error body: ``/v2``'s the protocol's (the code has no place in it; the message says it)."""
    return orjson.dumps({"error": message} if v2 else {"error": {"code": code, "message": message}})


class ErrorResponse(Response):
    """An error in the form of the route it answers: rich for ``/v1``, a string message for ``/v2``."""

    media_type = "application/json"

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.code, self.message, self._extra_headers = code, message, headers
        super().__init__(error_body(code, message), status_code=status, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_v2(scope):
            self.body = error_body(self.code, self.message, v2=True)
            self.init_headers(self._extra_headers)
        await super().__call__(scope, receive, send)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return ErrorResponse(status, code, message, headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
               415: "unsupported_media_type", 400: "bad_request"}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msg = e.get("msg", "invalid")
        if e.get("type") == "string_pattern_mismatch" and "\x00" in str(e.get("input", "")):
            msg = "a NUL character is not allowed"  # the pattern itself (schemas.NO_NUL) says little
        parts.append(f"{where}: {msg}" if where else str(msg))
    return "; ".join(parts) or "invalid request"


def response_for(exc: Exception) -> Response:
    """The error answer to one of the :data:`HANDLED` exceptions, in its route's form."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, STORE_DOWN):
        # the database went away or stopped answering (a restart, a failover): an outage to wait out, not a bug
        # (each was a 500 and a traceback); its reason is the driver's, which may name hosts: logged, not answered
        log.warning("the store is unavailable: %s", " ".join(str(getattr(exc, "orig", exc)).split())[:300])
        if is_full(exc):  # its disk full: as an upload's is (no_room), not an outage of a moment
            return error_response(507, "insufficient_storage", STORE_FULL)
        # a read-only SQLite file, or one deleted under the server, waits for an operator, not a moment: the message
        # says what to fix
        message = (READ_ONLY if is_read_only(exc) else MOVED if is_moved(exc)
                   else "the server's store is unavailable for a moment: retry")
        return error_response(503, "store_unavailable", message, {"Retry-After": "1"})
    if isinstance(exc, RequestValidationError):
        return error_response(422, "invalid_request", _validation_message(exc))
    code = _HTTP_CODES.get(exc.status_code, "error" if exc.status_code < 500 else "internal_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None))


# The store's connection failing (its server down or unreachable): OperationalError and InterfaceError are the
# DB-API's errors of the connection, not of the statement (an IntegrityError stays a bug, or is the caller's).
STORE_DOWN = (OperationalError, InterfaceError)
HANDLED = (ApiError, RequestValidationError, StarletteHTTPException, *STORE_DOWN)
INTERNAL = (500, "internal_error", "internal server error")


# What a path no route matches is told (the router's own 404 says "Not Found" alone): where the routes are listed.
NO_ROUTE = "no such route: GET /docs lists this server's routes"
NO_V2_ROUTE = ("no such route: this server serves the Open Inference Protocol's health, metadata, readiness, model "
               "configuration, statistics and infer routes (GET /v2 lists its extensions) and the repository index; "
               "the repository's load and unload (deploy through /v1/models), shared-memory, trace and logging "
               "extensions are not served")


def allowed_methods(routes: Iterable, scope: Scope) -> str:
    """The methods the path of a request is served with, as a 405's ``Allow`` lists them (RFC 9110 §15.5.6): every
    route's of that path (Starlette names the first one's alone), and HEAD beside GET (the middleware answers it)."""
    methods: set[str] = set()
    for route in routes:
        if getattr(route, "methods", None) and route.path_regex.match(get_route_path(scope)):
            methods |= route.methods
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def install(app: FastAPI, routes: Iterable = ()) -> None:
    """The exception handlers of ``app``; ``routes``: those a 405's ``Allow`` is read from."""
    routes = list(routes)

    async def handler(request: Request, exc: Exception) -> Response:
        if isinstance(exc, StarletteHTTPException) and exc.status_code == 404 and request.scope.get("route") is None:
            return error_response(404, "not_found", NO_V2_ROUTE if is_v2(request.scope) else NO_ROUTE)
        if isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
            allow = allowed_methods(routes, request.scope)
            return error_response(405, "method_not_allowed", f"this path serves {allow}, not {request.method}",
                                  {"Allow": allow})
        return response_for(exc)

    async def unexpected(_: Request, exc: Exception) -> Response:
        # Starlette's outermost layer answers with this, then re-raises to the service middleware, which logs
        # it (service.middleware.ServiceApp puts that middleware in front of Starlette's own)
        return error_response(*INTERNAL)

    for kind in HANDLED:
        app.add_exception_handler(kind, handler)
    app.add_exception_handler(Exception, unexpected)

