"""Liveness, readiness and Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..deps import MetricsDep, ModelHostDep, StoreDep
from ..errors import ApiError
from ..schemas import json_response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Models loaded and the store reachable")
async def readyz(request: Request, store: StoreDep, host: ModelHostDep) -> Response:
    if not getattr(request.app.state, "ready", False):
        raise ApiError(503, "not_ready", "the server is still starting")
    try:
        await run_in_threadpool(store.ping)
    except Exception:  # noqa: BLE001 - any driver error means not ready
        raise ApiError(503, "store_unreachable", "the store does not answer") from None
    failed = {f"{n}@{v}": why for (n, v), why in host.failed.items()}
    return json_response({"status": "ready", "models": len(host.all()), "failed": failed})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type=m.content_type)
