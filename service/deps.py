"""Shared dependencies as ``Annotated`` aliases: a route declares what it needs.

Authentication lives here and only here: no route reads a header itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .auth import ApiKey, Keyring, check_scope
from .errors import ApiError
from .jobs.queue import JobQueue
from .metrics import Metrics
from .ratelimit import AUTHENTICATED, client_network
from .registry import ModelHost
from .schemas import NO_NUL
from .settings import Settings
from .store import Store


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _store(request: Request) -> Store:
    return request.app.state.store


async def _host(request: Request) -> ModelHost:
    return request.app.state.host


async def _keyring(request: Request) -> Keyring:
    return request.app.state.keyring


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _jobs_queue(request: Request) -> JobQueue:
    return request.app.state.jobs


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[Store, Depends(_store)]
ModelHostDep = Annotated[ModelHost, Depends(_host)]
KeyringDep = Annotated[Keyring, Depends(_keyring)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
JobQueueDep = Annotated[JobQueue, Depends(_jobs_queue)]

# Path parameters as the schema documents them; their examples are the demo model's (`sdb demo`).
ModelName = Annotated[str, Path(description="a served model's name", examples=["mnist-demo"], pattern=NO_NUL)]
ModelVersion = Annotated[str, Path(description="one of the model's versions", examples=["1"], pattern=NO_NUL)]

# The inference routes (v1 predict and distill, v2 infer) read their path parameters and caller themselves
# (:func:`path_param`, :func:`serving`, :func:`distilling`): FastAPI's dependency solving was ~17 µs of each
# request's CPU. Their OpenAPI documents declare the parameters with these.
NAME_DOC = {"name": "name", "in": "path", "required": True, "description": "a served model's name",
            "schema": {"type": "string", "pattern": NO_NUL, "examples": ["mnist-demo"]}}
VERSION_DOC = {"name": "version", "in": "path", "required": True, "description": "one of the model's versions",
               "schema": {"type": "string", "pattern": NO_NUL, "examples": ["1"]}}


def path_param(request: Request, name: str) -> str:
    """A path parameter, checked as :data:`ModelName` checks it (422, the message FastAPI's check gives)."""
    value = request.path_params[name]
    if "\x00" in value:
        raise ApiError(422, "invalid_request", f"path.{name}: a NUL character is not allowed")
    return value

# Declared for the OpenAPI "Authorize" button; the header itself is checked below, so a
# wrong scheme and a malformed key get the same precise 401 as a missing one.
_bearer = HTTPBearer(auto_error=False, description="an API key: sdb_<id>_<secret>")
_BearerDoc = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def authenticate(state, authorization: str | None, address: str, scope: dict | None = None) -> ApiKey:
    """The key an ``Authorization`` value names, verified, for any transport (HTTP here, gRPC's metadata):
    ``state`` is the app's (keyring, limiters), ``address`` the caller's. A malformed, wrong or dead key
    counts against its address (guessing is rate-limited too); a valid one spends its own rate only."""
    keyring: Keyring = state.keyring
    try:
        key = await keyring.key_of(authorization)
    except ApiError:
        state.address_limiter.check(address, "this address")
        raise
    if scope is not None:  # a valid key, even one over its own rate: not charged to its address's unproven bucket
        scope[AUTHENTICATED] = True
    state.key_limiter.check(key.id, "this key")
    return key


def _address(request: Request) -> str:
    return client_network(request.client.host) if request.client else ""


async def _authenticate(request: Request) -> ApiKey:
    # the scope is marked once the key is valid: the middleware charges a header that authenticated nothing to its
    # address
    return await authenticate(request.app.state, request.headers.get("authorization"), _address(request),
                              request.scope)


async def api_key(request: Request, _: _BearerDoc) -> ApiKey:
    return await _authenticate(request)


async def optional_api_key(request: Request, _: _BearerDoc) -> ApiKey | None:
    """None without a header; a header that is present must be a valid key."""
    if "authorization" not in request.headers:
        return None
    return await _authenticate(request)


ApiKeyDep = Annotated[ApiKey, Depends(api_key)]
OptionalApiKeyDep = Annotated[ApiKey | None, Depends(optional_api_key)]


async def _admin(key: ApiKeyDep) -> ApiKey:
    check_scope(key, "admin")
    return key


async def _distiller(name: str, key: ApiKeyDep) -> ApiKey:
    check_scope(key, "distill", name)
    return key


async def _jobs(key: ApiKeyDep) -> ApiKey:
    check_scope(key, "jobs")
    return key


AdminKeyDep = Annotated[ApiKey, Depends(_admin)]
JobsKeyDep = Annotated[ApiKey, Depends(_jobs)]
DistillKeyDep = Annotated[ApiKey, Depends(_distiller)]  # for the model in the path's {name}


# ---------------------------------------------------------------- the inference hot path
@dataclass(frozen=True, slots=True)
class Serving:
    """What an inference route needs, resolved by one dependency.

    FastAPI solves every declared dependency on every request; the seven a predict route
    used to declare cost about a fifth of its CPU time, at thousands of requests a second.
    """

    settings: Settings
    host: ModelHost
    keyring: Keyring
    metrics: Metrics
    key: ApiKey | None  # None: no Authorization header (a header that is present was valid)
    caller: str  # :func:`caller_of`


def caller_of(key: ApiKey | None, address: str) -> str:
    """Whom a request is for, as a model's batches tell callers apart: its key, or its address without one."""
    return key.id if key is not None else f"address {address}"


async def serving(request: Request) -> Serving:
    """The caller of an inference route (its key checked when it sent one): :data:`ServingDep`, or called by a
    route that reads its own parameters (service/routes/v2.py's infer)."""
    state = request.app.state
    key = None if "authorization" not in request.headers else await _authenticate(request)
    return Serving(state.settings, state.host, state.keyring, state.metrics, key, caller_of(key, _address(request)))


async def distilling(request: Request) -> Serving:
    """The caller of ``distill``: a key with the distill scope for the path's model."""
    state = request.app.state
    key = await _authenticate(request)
    check_scope(key, "distill", request.path_params["name"])  # the route's {name}
    return Serving(state.settings, state.host, state.keyring, state.metrics, key, key.id)


# The routes that use these declare the bearer scheme in their OpenAPI (SERVING_DOC): as a
# sub-dependency it would be one more solve on every request. The routes that take an
# OptionalApiKeyDep declare it too: the dependency alone documents the key as required.
SERVING_DOC = {"security": [{"HTTPBearer": []}, {}]}  # a key is optional; when sent it must be valid
DISTILLING_DOC = {"security": [{"HTTPBearer": []}]}
ServingDep = Annotated[Serving, Depends(serving)]
