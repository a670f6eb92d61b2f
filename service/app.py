"""The FastAPI application: ``build_app(settings)`` wires store, keys, models and routes.

The lifespan opens the store (creating or migrating the schema), creates the master key
and pepper on first start, loads every registered model, registers the demo bundle on
a fresh data dir, and runs two background loops: the write-behind of quota and usage,
and the model sync that picks up ``sdb models add|remove``. With ``SDB_GRPC_PORT`` it serves the
Open Inference Protocol over gRPC too, on the same loop and state (:mod:`service.grpc.server`).
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from . import errors
from .auth import Keyring
from .copies import sweep_leftovers
from .direct import DirectRoutes
from .disclosure import one_line
from .jobs.queue import JobQueue
from .metrics import Metrics
from .middleware import ServiceApp
from .ratelimit import RateLimiter
from .registry import ModelHost
from .routes import account, api_docs, console, deploy, files, health, jobs, keys, models, v2
from .routes import style as style_routes
from .settings import Settings
from .store import Store

log = logging.getLogger("sdb.service")

DEMO_NAME = "mnist-demo"
UPLOAD_OVERHEAD = 64 << 10  # multipart framing and form fields around an uploaded file
UPLOAD_ROUTES = (("POST", "/v1/files"), ("POST", "/v1/models"))  # bodies up to SDB_MAX_FILE_BYTES, not the payload limit


def register_demo(settings: Settings, store: Store, host: ModelHost) -> None:
    """On a data dir that never had a model, serve the demo bundle if ``sdb demo`` wrote one."""
    path = settings.bundles_dir / DEMO_NAME
    if not settings.register_demo or not path.is_dir() or store.list_models() or store.has_audit("model.demo"):
        return
    try:
        host.add(path, actor="server")
    except errors.ApiError as e:
        log.warning("demo bundle at %s not served: %s", path, e.message)
        return
    store.audit("server", "model.demo", DEMO_NAME, str(path))


REPEAT_LOG_S = 60.0  # a background task that keeps failing the same way says so once a minute


async def _every(seconds: float, fn: Callable[[], None], what: str) -> None:
    """Call ``fn`` every ``seconds``. A failure is logged with its traceback the first time; the same failure again
    (a store down for minutes: a traceback every tick flooded the log) once a minute in one line, and the recovery
    when ``fn`` passes again."""
    failing: str | None = None  # the failure logged with its traceback; None while fn passes
    since = last_said = 0.0
    count = 0
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(fn)
        except Exception as e:
            now, said = time.monotonic(), one_line(e)
            if said != failing:
                log.exception("%s failed; will retry every %g s", what, seconds)
                failing, since, last_said, count = said, now, now, 1
                continue
            count += 1
            if now - last_said >= REPEAT_LOG_S:
                log.warning("%s still failing (%d times in %.0f s): %s", what, count, now - since, said)
                last_said = now
            continue
        if failing is not None:
            log.info("%s recovered after %d failure(s) in %.0f s", what, count, time.monotonic() - since)
            failing = None


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def start() -> tuple[Store, Keyring, ModelHost]:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            _ = settings.master_key, settings.pepper  # created 0600 on first start
            store = Store(settings.db_url)
            try:  # a new store records them; another process's secrets or data dir are refused
                settings.check_fingerprints(store)
                settings.check_data_dir(store)
            except BaseException:
                store.close()
                raise
            host = ModelHost(settings, store, on_batch=metrics.observe_batch, on_forget=metrics.forget)
            host.sync()
            register_demo(settings, store, host)
            sweep_leftovers(settings, store)  # what killed processes left (bundles, uploads, jobs): set aside, logged
            return store, Keyring(store, settings.pepper, settings.auth_cache_s), host

        store, keyring, host = await run_in_threadpool(start)
        app.state.store, app.state.keyring, app.state.host = store, keyring, host
        app.state.jobs = queue = JobQueue(store)
        grpc_server = None
        if settings.grpc_port:  # the protocol over gRPC, on this loop and this state (service/grpc/server.py)
            from .grpc import server as grpc_service

            try:
                grpc_server = await grpc_service.start(app.state)
            except BaseException:
                host.close()
                store.close()
                raise
        metrics.hosted = host.__contains__  # a series names a model only while it is hosted (Metrics.forget)
        metrics.models.set_function(lambda: len(host.all()))
        metrics.bundles.set_function(lambda: len(host.bundles))
        metrics.reloads.set_function(lambda: host.bundles.loads)
        loops = [asyncio.create_task(_every(settings.usage_flush_s, keyring.flush, "usage flush")),
                 asyncio.create_task(_every(settings.models_sync_s, host.sync, "model sync")),
                 asyncio.create_task(_every(settings.job_reap_s, lambda: queue.reap(settings.job_stale_s),
                                            "job reaper"))]
        dispatcher = None
        if settings.jobs_backend == "ray":
            from .jobs.ray_backend import RayDispatcher, start_ray

            start_ray(settings)  # blocking (a local instance takes seconds), before ready
            dispatcher = RayDispatcher(settings, queue)
            dispatcher.start()
        # torch and ORT leave ~10⁶ long-lived objects; a full collection walking them stalled
        # requests for 100+ ms (the p99 at concurrency 32). Frozen, the collector skips them.
        gc.collect()
        gc.freeze()
        app.state.ready = True
        log.info("ready: %d model(s) on %s", len(host.all()), settings.data_dir)
        try:
            yield
        finally:
            app.state.ready = False
            if grpc_server is not None:
                await grpc_server.stop(grpc_service.STOP_GRACE_S)
            if dispatcher is not None:
                await run_in_threadpool(dispatcher.stop)
            for t in loops:
                t.cancel()
            for t in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            try:
                await run_in_threadpool(keyring.flush)
            finally:
                host.close()
                store.close()

    # The documentation pages are service.routes.api_docs': FastAPI's own fetch their scripts from a CDN.
    app = ServiceApp(title="SDB", summary="Safe Distillation Box: predictions for everyone, "
                     "distillable logits only for authorized keys", version="1", lifespan=lifespan,
                     docs_url=None, redoc_url=None,
                     # a path with a slash too many is a 404 like any unknown one: Starlette's redirect built its
                     # Location from Host, without a proxy's prefix, and clients that follow a 307 send the key along
                     redirect_slashes=False)
    app.root_path = settings.root_path  # SDB_ROOT_PATH: a proxy's prefix (ServiceApp puts it in every scope)
    app.state.settings, app.state.metrics, app.state.ready = settings, metrics, False
    app.state.host = None
    app.state.key_limiter = RateLimiter(settings.rate_limit_key_per_s, settings.rate_limit_key_burst)
    app.state.address_limiter = address_limiter = RateLimiter(settings.rate_limit_address_per_s,
                                                               settings.rate_limit_address_burst)
    # FastAPI tries routers in order, scanning every route of each: the model routes first (the inference routes
    # themselves are called directly: service.direct). Account before keys and jobs: its /v1/keys/me is not a key id.
    routers = (v2.router, models.router, account.router, health.router, deploy.router, keys.router, jobs.router,
               files.router, console.router, style_routes.router, api_docs.router)
    for r in routers:
        app.include_router(r)  # no prefix: a route's path is its router's (what service.direct matches)
    errors.install(app, (route for r in routers for route in r.routes))
    upload = settings.max_file_bytes + UPLOAD_OVERHEAD  # the file part is counted on its own, to the byte
    allowed = f"a file up to {settings.max_file_bytes} bytes (SDB_MAX_FILE_BYTES) and its form fields"
    app.put_in_front(cors_origins=settings.cors_origin_list(), max_payload_bytes=settings.max_payload_bytes,
                     metrics=metrics, host_of=lambda: app.state.host,
                     upload_routes=dict.fromkeys(UPLOAD_ROUTES, (upload, allowed)), address_limiter=address_limiter,
                     direct=DirectRoutes(route for r in routers for route in r.routes),
                     # app.routes holds the routers whole: their own routes, for a label, and FastAPI's /openapi.json
                     routes=[*(r for r in app.routes if hasattr(r, "path")), *(route for r in routers for route in r.routes)])
    return app
