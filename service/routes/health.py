"""Liveness, readiness and Prometheus metrics.

None of them shows a server path or a key id to a caller without an admin key; with
``public_predict`` off they name no model to a caller without a key (docs/security.md).
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..auth import STORE_WAIT_S, check_scope
from ..deps import SERVING_DOC, MetricsDep, ModelHostDep, OptionalApiKeyDep, SettingsDep, StoreDep
from ..disclosure import hide_paths
from ..errors import ApiError
from ..schemas import AUTH, json_response, ok, responses
from ..store import READ_ONLY, STORE_FULL, is_full, is_read_only

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    models: int = Field(description="model versions being served")
    failed_models: int = Field(description="registered versions that do not load")
    failed: dict[str, str] | None = Field(None, description="name@version: why (when model names are public)")


def not_ready(state) -> ApiError:
    """The 503 of a server that is not ready: starting, or stopping (``sdb serve`` sets ``state.stopping`` on a stop
    signal, then answers on for SDB_SHUTDOWN_DRAIN_S while a load balancer takes it out)."""
    if getattr(state, "stopping", False):
        return ApiError(503, "not_ready", "the server is stopping: send requests to another")
    return ApiError(503, "not_ready", "the server is still starting")


@router.get("/healthz", summary="The process is up", response_model=Health,
            responses={**ok({"status": "ok"}), **responses()})  # responses(): the 401 of a key in the URL
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Models loaded and the store reachable", response_model=Readiness,
            responses={**ok({"status": "ready", "models": 1, "failed_models": 0, "failed": {}}),
                       **responses(503, why={503: "starting or stopping (not_ready), or the store does not answer "
                                                   "(store_unreachable) or cannot be written (store_read_only; "
                                                   "store_full, its disk)"})})
async def readyz(request: Request, store: StoreDep, host: ModelHostDep, settings: SettingsDep) -> Response:
    if not getattr(request.app.state, "ready", False):
        raise not_ready(request.app.state)
    failure = await _store_failure(request.app.state, store)
    if failure is not None and is_read_only(failure):
        raise ApiError(503, "store_read_only", READ_ONLY)
    if failure is not None and is_full(failure):
        raise ApiError(503, "store_full", STORE_FULL)
    if failure is not None:
        raise ApiError(503, "store_unreachable", "the store does not answer")
    failed = host.failures()  # a copy: a sync changing it while this iterated was a 500
    body = {"status": "ready", "models": len(host.all()), "failed_models": len(failed)}
    if settings.public_predict:  # model names are public: which versions failed, and why (the log has the paths)
        body["failed"] = {f"{n}@{v}": hide_paths(why, settings.data_dir) for (n, v), why in failed.items()}
    return json_response(body)


async def _store_failure(state, store) -> BaseException | None:
    """Why the store does not answer a ping within STORE_WAIT_S (:meth:`Store.ping`), or None. A stalled database
    (frozen, partitioned) held the probe as long as it stalled, and each probe a worker thread: the probes share one
    ping until it returns."""
    ping = getattr(state, "store_ping", None)
    if ping is None or ping.done():
        ping = state.store_ping = asyncio.ensure_future(run_in_threadpool(store.ping))
        ping.add_done_callback(lambda t: t.cancelled() or t.exception())  # read: a failure no probe awaited
    try:
        await asyncio.wait_for(asyncio.shield(ping), STORE_WAIT_S)
    except Exception as e:  # noqa: BLE001 - a timeout or any driver error means not ready
        return e
    return None


_METRICS_EXAMPLE = ('# TYPE sdb_requests_total counter\nsdb_requests_total{method="POST",model="mnist-demo",'
                    'route="/v1/models/{name}/predict",status="200"} 1.0\n')


@router.get("/metrics", summary="Prometheus metrics (series by key id with an admin key)",
            response_class=Response, openapi_extra=SERVING_DOC,  # a media type here would be the errors' too
            responses={**ok(_METRICS_EXAMPLE, media="text/plain", schema={"type": "string"}),
                       **responses(*AUTH, why={401: "public_predict is off and no admin key was sent",
                                               403: "public_predict is off and the key is not an admin's"})})
async def metrics(m: MetricsDep, settings: SettingsDep, key: OptionalApiKeyDep) -> Response:
    admin = key is not None and key.grants("admin")
    if not settings.public_predict and not admin:  # the series are labelled with model names
        if key is None:
            raise ApiError(401, "missing_key", "this server's metrics need an admin key",
                           {"WWW-Authenticate": "Bearer"})
        check_scope(key, "admin")
    # off the event loop: rendering hundreds of models' series held every request for a few hundred ms a scrape
    return Response(await run_in_threadpool(m.render, admin), media_type=m.content_type)
