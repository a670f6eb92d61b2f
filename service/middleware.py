"""One pure-ASGI middleware in front of the whole app: payload limit, the per-address rate, metrics, last-resort 500.

Pure ASGI (not BaseHTTPMiddleware) because it sits on every request's path. An
exception that escapes every handler is logged here (never the request's headers) and
answered with the generic error body, so the server keeps serving.

:class:`ServiceApp` calls it before FastAPI's and Starlette's own layers (the telemetry check, the error,
telemetry and body-limit middlewares), which it runs only for the routes that are not called directly
(:mod:`service.direct`): on an inference request those layers were ~13% of the event loop's CPU.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match, get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .bodies import is_json
from .direct import DirectRoutes
from .errors import INTERNAL, ApiError, error_response
from .metrics import CLIENT_CLOSED_REQUEST, COUNT_REFUSAL, ERROR_CODE, REFUSED_BODY
from .ratelimit import ANONYMOUS_CALLER, AUTHENTICATED, UNPROVEN, UNPROVEN_CALLER, RateLimiter, client_network
from .tensors import JSON_COUNTED_ABOVE, MAX_JSON_CONTAINERS, json_containers, too_many_containers

log = logging.getLogger("sdb.service")
# An orchestrator's liveness and readiness checks are never limited: ours, and the Open Inference
# Protocol's (KServe probes /v2/health/*).
_PROBES = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
# A method label outside these is "OTHER": a client's made-up methods would each be a series kept forever.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, *, max_payload_bytes: int, metrics, host_of,
                 upload_routes: dict[tuple[str, str], tuple[int, str]] | None = None, address_limiter=None,
                 direct: DirectRoutes | None = None, routes: list | None = None):
        self.app, self.limit, self.metrics, self.host_of = app, max_payload_bytes, metrics, host_of
        self.what = f"bodies up to {max_payload_bytes} bytes (SDB_MAX_PAYLOAD_BYTES)"
        # (method, path) → its own body limit and what it allows, in words: file uploads
        self.upload_routes = upload_routes or {}
        # Requests without a key, per client address (a keyed request is limited per key, in deps).
        self.address_limiter = address_limiter
        # Requests whose Authorization header authenticated nothing (a route that checks no key, and a bad key on one
        # that does), per address, at the same rate: charged once answered, since only then is it known (a junk
        # header passed every route that checks none unlimited).
        self.unproven = (RateLimiter(address_limiter.rate, address_limiter.burst) if address_limiter is not None
                         else None)
        self.direct = direct  # the inference routes, called from here (service.direct)
        self.routes = routes or []  # every route, one by one: the labels of requests no route ran

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, received = scope.get("method", ""), scope  # received: the server's own, which it may mark (HEAD)
        if method == "HEAD":
            # HEAD is GET's answer without its body (RFC 9110; uptime monitors send it): the routes see a GET, and the
            # server, whose own scope still says HEAD, writes the status and headers alone.
            scope = {**scope, "method": "GET"}
        start = time.perf_counter()
        status, started, left = 500, False, False

        async def send_tracked(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        def client_left() -> None:  # the request's body will not come: whatever is answered now reaches no one
            nonlocal left
            left = left or not started

        async def answer_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
            scope[ERROR_CODE] = code
            await error_response(status, code, message, headers)(scope, receive, send_tracked)

        try:
            declared = _content_length(scope)
            limit, what = self.upload_routes.get((scope.get("method", ""), get_route_path(scope)),
                                                 (self.limit, self.what))
            wait, who = self._address_wait(scope)
            limiter = self.address_limiter
            if wait and who == UNPROVEN_CALLER:
                try:
                    key = await self._valid_key(scope)
                except ApiError as e:  # the key store's 503
                    await answer_error(e.status, e.code, e.message, e.headers)
                    return
                if key is not None:  # a valid key from an address whose other headers proved nothing: its own rate
                    scope[_VALID_KEY] = key.id  # spent once answered, where a route that checks no key spends none
                    limiter = scope["app"].state.key_limiter
                    wait, who = limiter.wait(key.id), "this key"
            if wait:
                e = limiter.refusal(wait, who)
                await answer_error(e.status, e.code, e.message, e.headers)
            elif _key_in_url(scope):
                await answer_error(401, "key_in_url", KEY_IN_URL, {"WWW-Authenticate": "Bearer"})
            elif declared is not None and declared > limit:
                await answer_error(413, "payload_too_large", f"a body of {declared} bytes is over this route's limit: "
                                   f"{what}")
            elif self.direct is not None and (route := self.direct.match(scope)) is not None:
                limited = self._limited(receive, limit, what, _counted_json(scope, declared), client_left)
                await self.direct.serve(route, scope, limited, send_tracked)
            else:
                await self.app(scope, self._limited(receive, limit, what, _counted_json(scope, declared), client_left),
                               send_tracked)
        except Exception:
            log.exception("unhandled error on %s %s", method, scope.get("path"))
            if not started:
                await answer_error(*INTERNAL)
        finally:
            unproven = scope.get(UNPROVEN)
            if unproven is not None and not scope.get(AUTHENTICATED):  # no route checked the key it sent
                if scope.get(_VALID_KEY) is not None:
                    scope["app"].state.key_limiter.take(scope[_VALID_KEY])
                else:
                    self.unproven.take(unproven)
            route, params = scope.get("route"), scope.get("path_params")
            if route is None:  # refused before routing (rate, size, a key in the URL), or a route Starlette's own
                route, params = _route_of(scope, self.routes)
            template = getattr(route, "path", None) or "<unmatched>"
            name = (params or {}).get("name")
            host = self.host_of()
            model = name if name and host is not None and name in host else ""
            code, refused = scope.get(ERROR_CODE, ""), received.get(REFUSED_BODY)
            if refused is not None:  # the server answered the body's refusal itself (408): the app's answer was dropped
                status, code = refused
            elif left:  # the client hung up before its answer began: a 499, not the server's error
                status, code = CLIENT_CLOSED_REQUEST, ""
            self.metrics.observe_request(template, method if method in _METHODS else "OTHER", model, status,
                                         time.perf_counter() - start, code)

    def _address_wait(self, scope: Scope) -> tuple[float, str]:
        """Seconds until a request from this address may go on (0: now), and the caller in words; probes are free.
        One with a key is limited per key once authenticated (deps), and by its address's unproven headers."""
        if self.address_limiter is None or get_route_path(scope) in _PROBES:
            return 0.0, ""
        client = scope.get("client")
        address = client_network(client[0]) if client else ""
        if any(k == b"authorization" for k, _ in scope.get("headers", ())):
            scope[UNPROVEN] = address
            return self.unproven.wait(address), UNPROVEN_CALLER
        return self.address_limiter.take(address), ANONYMOUS_CALLER

    @staticmethod
    async def _valid_key(scope: Scope):
        """The key the request's ``Authorization`` names, when it is a valid one (else None); a key store that does
        not answer is its 503, not a refusal of the key."""
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        try:
            return await scope["app"].state.keyring.key_of(header.decode("latin-1"))
        except ApiError as e:
            if e.status != 401:
                raise
            return None
        except (KeyError, AttributeError):
            return None

    def _limited(self, receive: Receive, limit: int, what: str, json: bool,
                 on_disconnect: Callable[[], None]) -> Receive:
        """``receive`` with the body's bytes counted against ``limit`` and, for a ``json`` body, its arrays and
        objects against :data:`~service.tensors.MAX_JSON_CONTAINERS` (FastAPI parses a route's body model before
        any key is checked: 8 MB of empty lists held the loop ~0.4 s for an anonymous 401); ``on_disconnect`` is
        called when the server says the client is gone (or its request was refused, :data:`REFUSED_BODY`)."""
        seen = containers = 0

        async def counted() -> Message:
            nonlocal seen, containers
            message = await receive()
            if message["type"] == "http.disconnect":
                on_disconnect()
            elif message["type"] == "http.request":
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen > limit:
                    # FastAPI re-raises HTTPException from body reading as is; the handler maps it.
                    raise HTTPException(413, f"the body is over this route's limit: {what}")
                if json:
                    containers += json_containers(chunk)
                    if containers > MAX_JSON_CONTAINERS:
                        raise HTTPException(413, too_many_containers(containers))
            return message

        return counted


_VALID_KEY = "sdb.valid_key"  # the id of a key the middleware verified itself (its address's unproven bucket empty)

# A key sent in the URL (`?api_key=sdb_...`) was ignored: predict answered as anonymous (the key not counted), distill
# said no key was sent, and the URL, key and all, stays in every proxy's log and browser's history it passed. Refused,
# on every route: under the names clients send one by, and a key's own shape under any name. The value is never echoed.
_KEY_PARAMS = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token", "authorization"})
_KEY_SHAPE = re.compile(r"sdb_[0-9a-f]{12}_", re.IGNORECASE)
KEY_IN_URL = ("an API key goes in the Authorization header (Authorization: Bearer sdb_…), never in the URL, which "
              "proxies and servers log: send the request again without it in the query string (and have a key that "
              "was sent in a URL revoked)")


_KEY_HINTS = (b"key", b"token", b"auth", b"sdb_", b"%")  # a query string naming or holding a key (or encoded)


def _key_in_url(scope: Scope) -> bool:
    query = scope.get("query_string")
    if not query:  # nearly every request: nothing parsed
        return False
    lowered = query.lower()
    if not any(hint in lowered for hint in _KEY_HINTS):  # ?version=3 on every remote teacher's call: 1.3 us a parse
        return False
    return any(name.strip().lower() in _KEY_PARAMS or _KEY_SHAPE.search(value)
               for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True))


def _counted_json(scope: Scope, declared: int | None) -> bool:
    """Whether a request's body is JSON as sent (no Content-Encoding; a type :func:`~.bodies.is_json` reads as
    JSON), and may be large enough that its arrays and objects are counted (its length unknown or over
    JSON_COUNTED_ABOVE): a v2 JSON infer's few kilobytes are not."""
    if declared is not None and declared <= JSON_COUNTED_ABOVE:
        return False
    kind = encoding = b""
    for k, v in scope.get("headers", ()):
        if k == b"content-type":
            kind = v.split(b";", 1)[0].strip().lower()
        elif k == b"content-encoding":
            encoding = v.strip().lower()
    return is_json(kind.decode("latin-1")) and encoding in (b"", b"identity")


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


# What a page of an allowed origin may send and read (CORS): the API's methods (HEAD, which every GET route answers);
# the key, the body's type and coding, the binary tensor extension's header length, a job's Idempotency-Key; and back,
# every header an answer documents: the limits' waits, that length, the model that answered a .npy distill or a style
# (SDB-*, X-Model-Version), a download's file name, a 405's methods and a 401's scheme. A page's fetch reads only what
# is exposed.
CORS_METHODS = ["GET", "HEAD", "POST", "DELETE"]
CORS_HEADERS = ["Authorization", "Content-Type", "Content-Encoding", "Inference-Header-Content-Length",
                "Idempotency-Key"]
CORS_EXPOSED = ["Retry-After", "Retry-After-Ms", "Inference-Header-Content-Length", "SDB-Model", "SDB-Model-Version",
                "SDB-Temperature", "X-Model-Version", "Content-Disposition", "Allow", "WWW-Authenticate"]


def _route_of(scope: Scope, routes: list) -> tuple[object | None, dict | None]:
    """The route a request was for, and its path parameters, without running it: the label of a request refused
    before routing (a throttled predict counted under its template and model, not ``<unmatched>``), and of routes
    that leave no ``route`` in the scope (``/openapi.json``). Only such requests pay for the walk."""
    partial = None, None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            return route, child.get("path_params")
        if match is Match.PARTIAL and partial[0] is None:  # the path's route, another method: its 405
            partial = route, child.get("path_params")
    return partial


class ServiceApp(FastAPI):
    """FastAPI with :class:`ServiceMiddleware` in front of it (:meth:`put_in_front`): HTTP requests meet it first,
    the direct routes are answered from it, and every other request goes on through FastAPI's whole stack. An
    OpenTelemetry tracer configured for FastAPI sees those other routes only."""

    front: ServiceMiddleware | None = None
    _entry: ASGIApp | None = None  # the front, behind CORS when origins are allowed

    def put_in_front(self, *, cors_origins: list[str] | None = None, **options) -> None:
        """``options``: :class:`ServiceMiddleware`'s. ``cors_origins``: the web origins that may call from a browser
        (``SDB_CORS_ORIGINS``); CORS then answers preflights and marks every answer, the direct routes' and errors
        included, so it goes in front of the front."""
        self.front = self._entry = ServiceMiddleware(self._behind, **options)
        self.front.metrics.jobs.read_store(lambda: getattr(self.state, "store", None))  # set once started
        if cors_origins:
            self._entry = CORSMiddleware(self.front, allow_origins=cors_origins, allow_methods=CORS_METHODS,
                                         allow_headers=CORS_HEADERS, expose_headers=CORS_EXPOSED, max_age=600)

    def add_exception_handler(self, exc_class_or_status_code: int | type[Exception], handler) -> None:
        """Starlette's, the answer's error code also left in the request's scope for the metrics
        (``sdb_errors_by_code_total``), as the direct routes and the middleware leave theirs. Handlers are async."""

        async def noting_code(request: Request, exc: Exception) -> Response:
            response = await handler(request, exc)
            request.scope[ERROR_CODE] = getattr(response, "code", "")
            return response

        super().add_exception_handler(exc_class_or_status_code, noting_code)

    async def _behind(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.front is not None and "state" in scope:
            # shared with the server's connections: what service.http_protocol refuses itself is counted too
            scope["state"][COUNT_REFUSAL] = self.front.metrics.observe_refusal
        if self.front is None or scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        scope["app"] = self  # what Starlette sets for Request.app (a direct route reads its state)
        if self.root_path:
            # SDB_ROOT_PATH: routed alike whether the proxy strips the prefix or keeps it (get_route_path), and the
            # prefix alone (https://host/sdb) is its console, as https://host/sdb/ is
            scope["root_path"] = self.root_path
            if scope["path"] == self.root_path:
                scope["path"] = self.root_path + "/"
        await self._entry(scope, receive, send)
