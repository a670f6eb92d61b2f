"""``sdb serve``, ``worker``, ``keys``, ``models``: run the service and administer its data dir.

``keys`` and ``models`` work on the data dir's store directly, no running server needed; a running server picks up model
changes within ``models_sync_s`` and key changes within ``auth_cache_s``."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from sdb_core.protect.config import POLICIES, AuditConfig
from service.auth import ApiKey, create_key, validate_policy
from service.errors import ApiError
from service.settings import Settings, SettingsError, log_to_stderr
from service.store import Store, open_store, version_key

from .console import redact

log = logging.getLogger("sdb.service")


def _when(t: float | None) -> str:
    """A stored time as its UTC date, said to be UTC (a reader's own zone is another)."""
    if t is None:
        return "-"
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, ValueError, OSError):  # a time no calendar date holds (a key stored before expiries were bounded)
        return "never" if t > 0 else "-"


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


def _open_store(settings: Settings, *, make: bool = False) -> Store:
    """The data dir's store; a data dir or store that cannot be opened, or a secret lost from a store in use, is one
    line (exit 2), not a traceback. A data dir that does not exist is made only when ``make`` (``keys create``,
    ``models add``, which say so): a command that reads or changes what one holds, given a typo for it, made a new
    data dir with a fresh store and secrets, and listed nothing with exit 0. A store elsewhere
    (``SDB_DATABASE_URL``) is what it holds, data dir or none."""
    if not make and not settings.database_url and not settings.data_dir.exists():  # the store would be a new file
        raise _no_data_dir(settings.data_dir)
    settings.prepare_data_dir()
    settings.check_secrets()
    store = open_store(settings.db_url)
    try:
        settings.check_fingerprints(store)  # a store made just now records them
    except BaseException:
        store.close()
        raise
    return store


def _no_data_dir(path: Path) -> SettingsError:
    shown = str(path) if path.is_absolute() else f"{path}, that is {path.resolve()}"
    return SettingsError(f"SDB_DATA_DIR (--data-dir: {shown}) does not exist, so it holds no keys or models: point "
                         "--data-dir or SDB_DATA_DIR at the server's data dir (`sdb serve` prints it when it starts), "
                         "or make one with `sdb keys create` or `sdb models add`")


def _new_data_dir_note(settings: Settings) -> str:
    """What a command that makes a data dir says when it does: a typo in --data-dir or SDB_DATA_DIR makes a new one,
    whose keys and models no server of the real one knows."""
    return "" if settings.data_dir.exists() else f" in a new data dir, {settings.data_dir}"


def _preflight(settings: Settings, pepper: bool = True) -> None:
    """What ``sdb serve`` and ``sdb worker`` check before anything runs, each refusal one line naming the
    setting: the data dir (the store's other processes' own), the secrets (a worker reads no pepper), the store, the
    ONNX Runtime providers."""
    settings.prepare_data_dir()
    settings.check_secrets(pepper)  # SecretsError (exit 2, its message)
    store = open_store(settings.db_url)
    try:
        settings.check_fingerprints(store, pepper)  # a store made just now records them
        settings.check_data_dir(store)
    finally:
        store.close()
    asked = [p.strip() for p in settings.ort_providers.split(",") if p.strip()]
    if asked:  # a provider this onnxruntime lacks is skipped with a warning; a name none has is a typo
        import onnxruntime as ort

        unknown = [p for p in asked if p not in ort.get_all_providers()]
        if unknown:
            raise SettingsError(f"SDB_ORT_PROVIDERS names {', '.join(unknown)}, which no ONNX Runtime has: it takes "
                                "a comma-separated list of provider names, this onnxruntime's being "
                                + ", ".join(ort.get_available_providers()))


def _check_listen(host: str, port: int) -> None:
    """SettingsError when ``host:port`` cannot be listened on now (in use, not this machine's address)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(infos[0][4])
    except OSError as e:
        raise SettingsError(f"cannot listen on {host}:{port} (SDB_HOST / SDB_PORT, --host / --port): "
                            f"{e.strerror or e}; it takes a free port on an address of this machine") from None


class AccessLogPaths(logging.Filter):
    """uvicorn's access log lines with the path alone: a query string holds nothing an operator needs, and a client
    that put its key there (``?api_key=...``) would have it logged in the clear: the service refuses such a request
    (401 ``key_in_url``, :mod:`service.middleware`), but its line is logged all the same. What remains is redacted as
    every message of ``sdb`` is."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):  # (client, method, path, ...)
            record.args = (*args[:2], redact(args[2].split("?", 1)[0]), *args[3:])
        return True


class ClientErrorWarnings(logging.Filter):
    """uvicorn's warnings about what a client sent (a request it cannot parse, or that ``sdb serve``'s protocol
    refuses: a head over its limit, a transfer coding it does not take, a pipeline past its cap; an upgrade), at
    most one a kind per ``interval_s``: each is one line a client can make the server write again and again (a loop
    of bad requests wrote a line per request, to a log an operator pays to keep). The line that follows a quiet
    spell says how many were left out; the client's own answer (a 4xx) is unchanged."""

    def __init__(self, interval_s: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.interval_s, self.clock = interval_s, clock
        self.last: dict[str, float] = {}  # message → when it was last let through
        self.left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or record.msg not in _CLIENT_WARNINGS:
            return True
        now, msg = self.clock(), record.msg
        last = self.last.get(msg)
        if last is not None and now - last < self.interval_s:
            self.left_out[msg] = self.left_out.get(msg, 0) + 1
            return False
        self.last[msg] = now
        if left_out := self.left_out.pop(msg, 0):
            record.msg = f"{msg} ({left_out} more in the {now - last:.0f} s before this not logged)"
        return True


# uvicorn's (httptools_impl) warnings about what a client sent, word for word.
_CLIENT_WARNINGS = frozenset({"Invalid HTTP request received.", "Unsupported upgrade request."})


class StoppingServer(uvicorn.Server):
    """uvicorn's server, stopped as a supervisor stops a process (docs/deploy.md#stopping-and-restarting). A stop
    signal (SIGTERM, SIGINT, SIGHUP) turns readiness to 503 at once (``state.ready``: /readyz, /v2/health/ready) and
    the server answers every other route for ``drain_s`` more, so that a load balancer's probe takes it out first;
    then uvicorn's shutdown, its wait for requests in flight bounded by its ``timeout_graceful_shutdown``. A second
    signal ends the drain; a second Ctrl-C, as in uvicorn, the wait.

    Unlike uvicorn's own, it returns once stopped where uvicorn raises the signal again: the process died of its
    SIGTERM inside ``uvicorn.run`` (exit 143), before ``serve`` stopped its job workers, and a SIGHUP, which uvicorn
    leaves alone, killed it at once (no lifespan teardown: the usage write-behind lost)."""

    def __init__(self, config: uvicorn.Config, state, drain_s: float, on_listening=None):
        super().__init__(config)
        self.state, self.drain_s, self.on_listening = state, drain_s, on_listening
        self.drain_until: float | None = None
        self.stop_signal: int | None = None  # logged by the loop: a handler that wrote could interrupt a write

    @contextlib.contextmanager
    def capture_signals(self):
        from service.jobs.worker import STOP_SIGNALS

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread alone
            yield
            return
        before = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)  # the lifespan's start, then the listening sockets
        if self.started and self.on_listening is not None:
            self.on_listening()

    def handle_exit(self, sig: int, frame) -> None:
        self.state.ready, self.state.stopping = False, True
        if self.drain_s > 0 and self.drain_until is None and not self.should_exit:
            self.stop_signal, self.drain_until = sig, time.monotonic() + self.drain_s  # on_tick ends it
            return
        if sig == signal.SIGINT and self.drain_until is not None and not self.should_exit:
            # a second Ctrl-C in the drain: no wait for requests in flight either (cancelled at once), but the
            # lifespan's teardown still runs (uvicorn's force_exit skipped it: the usage write-behind was lost)
            self.config.timeout_graceful_shutdown = 0
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and not self.should_exit:
            self.state.ready = False  # a signal during the start: the lifespan set it after
            if self.stop_signal is not None:
                log.info("%s: /readyz answers 503; stopping in %g s (SDB_SHUTDOWN_DRAIN_S)",
                         signal.Signals(self.stop_signal).name, self.drain_s)
                self.stop_signal = None
            if time.monotonic() >= self.drain_until:
                self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: Settings, *, access_log: bool = False) -> int:
    from service.app import build_app
    from service.forwarded import ForwardedClient
    from service.http_protocol import HttpProtocol

    log_to_stderr(settings.log_level)
    _preflight(settings)  # before anything listens
    _check_listen(settings.host, settings.port)
    if settings.grpc_port:
        try:  # the grpc extra and the port, before anything listens
            from service.grpc import server as grpc_service
        except ImportError as e:
            raise ValueError(str(e)) from None
        grpc_service.check_address(settings.grpc_host or settings.host, settings.grpc_port)
    if settings.jobs_backend == "ray":  # the cluster before anything listens: one that does not answer is one line
        from service.jobs.ray_backend import start_ray

        start_ray(settings)  # RayUnavailable (exit 2) past its window; the lifespan finds it started

    def listening() -> None:  # said once it listens (it said so before the lifespan, which can take minutes, or fail)
        print(f"sdb: serving on http://{settings.host}:{settings.port} (data {settings.data_dir.resolve()}, "
              f"docs at {settings.root_path}/docs)", file=sys.stderr, flush=True)
        if settings.grpc_port:
            address = grpc_service.listen_address(settings.grpc_host or settings.host, settings.grpc_port)
            print(f"sdb: gRPC (Open Inference Protocol) on {address}", file=sys.stderr, flush=True)

    try:  # each connection is an open file: the soft limit (often 1024) up to the hard one, which needs no privilege
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass  # not on this platform, or a hard limit past what the kernel allows: the soft one stands
    pool = None
    if settings.jobs_backend == "embedded" and settings.workers > 0:
        from service.jobs.ray_backend import portable_settings
        from service.jobs.worker import WorkerPool, gpu_slots, visible_gpus

        env = {**os.environ, **{f"SDB_{k.upper()}": str(v) for k, v in portable_settings(settings).items()
                                if v is not None and k in _WORKER_ENV}}
        slots = gpu_slots(settings.workers, settings.worker_gpus, visible_gpus(env))
        pool = WorkerPool(settings.workers, env, devices=slots).start()
        on_gpu = [s for s in slots if s]
        print(f"sdb: {settings.workers} job worker(s): pids {pool.pids}"
              + (f"; GPU jobs at most {len(on_gpu)} at once (devices {','.join(on_gpu)})" if on_gpu else ""),
              file=sys.stderr, flush=True)
    logging.getLogger("uvicorn.access").addFilter(AccessLogPaths())  # kept by uvicorn's logging configuration
    logging.getLogger("uvicorn.error").addFilter(ClientErrorWarnings())
    try:
        app = build_app(settings)
        config = uvicorn.Config(ForwardedClient(app, settings.forwarded_allow_ips), host=settings.host,
                                port=settings.port, log_level="info", http=HttpProtocol.configured(settings),
                                access_log=access_log, server_header=False, proxy_headers=False,  # ForwardedClient
                                forwarded_allow_ips=settings.forwarded_allow_ips,  # reads them
                                timeout_graceful_shutdown=settings.shutdown_timeout_s)
        server = StoppingServer(config, app.state, settings.shutdown_drain_s, listening)
        server.run()  # returns once stopped, by a signal too
    finally:
        if pool is not None:
            pool.stop()  # its workers put their jobs back in the queue
    return 0 if server.started else STARTUP_FAILURE  # as uvicorn.run exits


# What a worker process must share with its server (the rest comes from the same environment).
_WORKER_ENV = ("data_dir", "database_url", "master_key_file", "pepper_file")


def worker(settings: Settings) -> int:
    from service.jobs.worker import main_worker

    log_to_stderr(settings.log_level)
    if settings.jobs_backend != "embedded":
        raise ValueError(f"sdb worker runs embedded jobs; this data dir's backend is {settings.jobs_backend!r} "
                         "(Ray jobs run on the cluster's workers)")
    _preflight(settings, pepper=False)
    return main_worker(settings)


def keys_create(settings: Settings, *, scopes: str, models: str | None, quota: int | None,
                quota_window: int | None, expires: float | None, name: str) -> int:
    # refused before a data dir is made for it
    validate_policy(_split(scopes) or [], quota, quota_window, expires, _split(models))
    where = _new_data_dir_note(settings)
    store = _open_store(settings, make=True)
    try:
        token, key = create_key(store, settings.pepper, scopes=_split(scopes) or [], models=_split(models),
                                quota=quota, quota_window_s=quota_window, expires_days=expires, name=name)
    finally:
        store.close()
    print(f"created key {key.id}{where}: scopes {','.join(sorted(key.scopes))}; "
          f"models {'all' if key.models is None else ','.join(sorted(key.models))}; "
          f"quota {'unlimited' if key.quota is None else key.quota}; expires {_when(key.expires_at)}", file=sys.stderr)
    print("the key below is shown this once; store it now:", file=sys.stderr)
    try:
        print(token, flush=True)  # alone on stdout: KEY=$(sdb keys create ...)
    except OSError:  # stdout full or gone: a key no one holds would stay active, unrevocable by its holder
        _revoke_unheld(settings, key.id)
        raise
    return 0


def _revoke_unheld(settings: Settings, key_id: str) -> None:
    store = _open_store(settings)
    try:
        store.revoke_key(key_id)
        store.audit("cli", "key.revoke", key_id)
    finally:
        store.close()
    print(f"sdb: the key could not be printed, so key {key_id} is revoked: run keys create again", file=sys.stderr)


def keys_list(settings: Settings, *, as_json: bool = False) -> int:
    """Every key, oldest first, with the fields ``GET /v1/keys`` gives it (which pages newest first), and the quota it
    has used as ``/v1/keys/me`` and the console count it (a window that has rolled over counts none); never a secret."""
    from service.routes.account import quota_used

    store = _open_store(settings)
    try:
        rows = store.list_keys()
    finally:
        store.close()
    now = time.time()
    keys = [(ApiKey.from_row(r), quota_used(r, now)) for r in rows]
    if as_json:
        print(json.dumps([{**k.public(), "quota_used": used} for k, used in keys], indent=2))
        return 0
    quotas = [f"{used}/{'-' if k.quota is None else k.quota}" + (f" per {k.quota_window_s} s" if k.quota_window_s
                                                                 else "") for k, used in keys]
    width = max([len(q) for q in quotas] + [10])
    print(f"{'id':12}  {'scopes':24}  {'models':20}  {'used/quota':>{width}}  {'expires':20}  {'status':7}  name")
    for (k, _), quota in zip(keys, quotas, strict=True):
        status = ("revoked" if k.revoked_at else "expired" if k.expires_at and k.expires_at <= now else "active")
        models = "all" if k.models is None else ",".join(sorted(k.models))
        name = k.name if k.name.isprintable() else ascii(k.name)  # a name sent over the API may hold a newline
        print(f"{k.id:12}  {','.join(sorted(k.scopes)):24}  {models:20}  {quota:>{width}}  "
              f"{_when(k.expires_at):20}  {status:7}  {name}")
    return 0


def keys_revoke(settings: Settings, key_id: str) -> int:
    store = _open_store(settings)
    try:
        row = store.revoke_key(key_id)
        if row is None:
            raise ValueError(f"no API key with id {key_id!r}")
        store.audit("cli", "key.revoke", key_id)
    finally:
        store.close()
    print(f"revoked {key_id}")
    return 0


def models_list(settings: Settings, *, as_json: bool = False) -> int:
    from service.copies import bundle_path

    store = _open_store(settings)
    try:
        rows = sorted(store.list_models(), key=lambda r: (r.name, version_key(r.version)))  # 2 before 10, as the API
    finally:
        store.close()
    paths = [bundle_path(settings, r.path) for r in rows]  # where this data dir has each (a moved one: its own)
    if as_json:
        print(json.dumps([{"name": r.name, "version": r.version, "added_at": r.added_at, "path": str(p),
                           "output_policy": {"policy": r.policy, "top_k": r.top_k, "decimals": r.decimals}}
                          for r, p in zip(rows, paths)], indent=2))
        return 0
    print(f"{'name':24}  {'version':10}  {'added':20}  {'policy':12}  path")
    for r, p in zip(rows, paths):
        print(f"{r.name:24}  {r.version:10}  {_when(r.added_at):20}  {policy_text(r):12}  {p}")
    return 0


def policy_text(row) -> str:
    """A row's output policy (or an OutputPolicy: the same fields) in a few characters: top_k=3/4dp."""
    shown = row.policy + (f"={row.top_k}" if row.top_k is not None else "")
    return shown + (f"/{row.decimals}dp" if row.decimals is not None else "")


def models_add(settings: Settings, path: str, *, policy: str | None = None, top_k: int | None = None,
               decimals: int | None = None) -> int:
    """Register a bundle in place, as an admin (a name someone's key owns included), with its output policy."""
    from pydantic import ValidationError

    from service.registry import ModelHost
    from service.schemas import OutputPolicy

    given = {k: v for k, v in {"policy": policy, "top_k": top_k, "decimals": decimals}.items() if v is not None}
    try:
        output_policy = OutputPolicy(**given) if given else None  # None: the bundle's own, else probs
    except ValidationError as e:
        raise ValueError("; ".join("".join(f"--{str(loc).replace('_', '-')}: " for loc in err["loc"]) + err["msg"]
                                   for err in e.errors())) from None
    where = _new_data_dir_note(settings)
    store = _open_store(settings, make=True)
    host = ModelHost(settings, store)
    try:
        model = host.add(path, actor="cli", policy=output_policy)  # verified first: a refused one changes nothing
    except ApiError as e:
        raise ValueError(e.message) from None
    finally:
        host.close()
        store.close()
    print(f"registered {model.name} version {model.version} from {model.path} (output policy {policy_text(model.policy)})")
    if where:
        print(f"sdb: registered{where}: a server of another data dir does not serve it", file=sys.stderr)
    own = str(model.meta.get("version"))
    if own != model.version:
        print(f"sdb: its bundle says version {own}, a number {model.name} had before: a version number is never given "
              "again, so it has the next one", file=sys.stderr)
    return 0


def models_remove(settings: Settings, name: str, version: str | None) -> int:
    from service.registry import ModelHost

    store = _open_store(settings)
    host = ModelHost(settings, store)
    try:
        removed = host.remove(name, version, actor="cli")  # as the API removes: audited, a deploy's copy deleted
    finally:
        host.close()
        store.close()
    if not removed:
        raise ValueError(f"no model named {name!r}" + (f" with version {version!r}" if version else ""))
    for n, v in removed:
        print(f"removed {n} version {v}")
    return 0


def _service_settings(args) -> Settings:
    """Settings from SDB_* env, with the options given on the command line on top."""
    over = {k: v for k, v in (("data_dir", getattr(args, "data_dir", None)), ("host", getattr(args, "host", None)),
                              ("port", getattr(args, "port", None)), ("workers", getattr(args, "workers", None)),
                              ("grpc_port", getattr(args, "grpc_port", None)),
                              ("root_path", getattr(args, "root_path", None)))
            if v is not None}
    return Settings.load({k: k.replace("_", "-") for k in over}, **over)


def cmd_serve(args) -> int:
    return serve(_service_settings(args), access_log=args.access_log)


def cmd_worker(args) -> int:
    return worker(_service_settings(args))


def cmd_keys(args) -> int:
    s = _service_settings(args)
    if args.keys_command == "create":
        return keys_create(s, scopes=args.scopes, models=args.models, quota=args.quota,
                                    quota_window=args.quota_window, expires=args.expires, name=args.name)
    if args.keys_command == "list":
        return keys_list(s, as_json=args.json)
    return keys_revoke(s, args.key_id)


def cmd_models(args) -> int:
    from .models_remote import cmd_remote_models, remote

    if remote(args):
        return cmd_remote_models(args)
    s = _service_settings(args)
    if args.models_command == "list":
        return models_list(s, as_json=args.json)
    if args.models_command == "add":
        return models_add(s, args.path, policy=args.policy, top_k=args.top_k, decimals=args.decimals)
    return models_remove(s, args.name, args.version)


def add_commands(sub) -> None:
    sv = sub.add_parser("serve", help="serve the registered models over HTTP (uvicorn)")
    sv.add_argument("--host", help="env SDB_HOST (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="env SDB_PORT (default 8000)")
    sv.add_argument("--grpc-port", type=int, help="also serve the Open Inference Protocol over gRPC on this port "
                    "(env SDB_GRPC_PORT; default off; needs the grpc extra)")
    sv.add_argument("--data-dir", help="env SDB_DATA_DIR (default ./.sdb)")
    sv.add_argument("--root-path", help="the path prefix a reverse proxy serves it under, such as /sdb "
                    "(env SDB_ROOT_PATH; default none: the host's root)")
    sv.add_argument("--workers", type=int, help="job workers for the jobs queue (env SDB_WORKERS, default 1)")
    sv.add_argument("--access-log", action="store_true", help="log every request (off: it costs throughput)")
    sv.set_defaults(fn=cmd_serve)

    wk = sub.add_parser("worker", help="run one more job worker on the data dir (beside `sdb serve`)")
    wk.add_argument("--data-dir", help="env SDB_DATA_DIR (default ./.sdb)")
    wk.set_defaults(fn=cmd_worker)

    k = sub.add_parser("keys", help="create, list and revoke API keys (on the data dir; no server needed)")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ks.add_parser("create", help="create a key; prints it alone on the last line")
    kc.add_argument("--scopes", required=True, help="comma-separated: predict,distill,jobs,deploy,admin")
    kc.add_argument("--models", help="comma-separated model allowlist (default: every model)")
    kc.add_argument("--quota", type=int, help="samples the key may be served on the keyed path (a key with the "
                    "distill or admin scope)")
    kc.add_argument("--quota-window", type=int, metavar="SECONDS", help="restart the quota in fixed windows of "
                    "SECONDS aligned to the Unix epoch, not to the key's creation (86400: at 00:00 UTC); across a "
                    "window's end the key may be served twice the quota within seconds")
    kc.add_argument("--expires", type=float, metavar="DAYS", help="expire after DAYS days")
    kc.add_argument("--name", default="", help="a note to tell keys apart")
    kl = ks.add_parser("list", help="list keys (never their secrets), with the quota used in the current window")
    kl.add_argument("--json", action="store_true", help="print the keys as a JSON list (for scripts)")
    kr = ks.add_parser("revoke", help="revoke a key by id")
    kr.add_argument("key_id")
    for sp in (kc, *[ks.choices[n] for n in ("list", "revoke")]):
        sp.add_argument("--data-dir", help="env SDB_DATA_DIR (default ./.sdb)")
    k.set_defaults(fn=cmd_keys)

    from .models_remote import add_release_command, add_remote_flags

    m = sub.add_parser("models", help="list, add and remove served models (on the data dir), or deploy and "
                       "remove them on a server (as a key)")
    ms = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ml = ms.add_parser("list", help="registered models")
    ml.add_argument("--json", action="store_true", help="print the models as a JSON list (for scripts)")
    ma = ms.add_parser("add", help="verify a bundle and register it; a running server serves it shortly")
    ma.add_argument("path", help="bundle directory or .sdb file")
    md = ms.add_parser("deploy", help="upload a bundle to a server and serve it as the next version of its name, "
                       "as the key (deploy scope): the name becomes the key's")
    md.add_argument("path", help="bundle directory or .sdb file, or a file-… id of an uploaded bundle")
    md.add_argument("--name", help="serve it under this name (default the bundle's)")
    for sp in (ma, md):
        sp.add_argument("--policy", choices=POLICIES, help="what the public routes return: probs, the top_k classes "
                        "renormalised, or the label alone (default: the bundle's own, as sdb wrap --policy set it, "
                        "else probs)")
        sp.add_argument("--top-k", type=int, help=f"k of the top_k policy (default {AuditConfig().top_k})")
        sp.add_argument("--decimals", type=int, help="round served probabilities to this many decimals "
                        "(default: unrounded)")
    mr = ms.add_parser("remove", help="stop serving a model (every version, or --version)")
    mr.add_argument("name")
    mr.add_argument("--version")
    for sp in (ml, ma, mr):
        sp.add_argument("--data-dir", help="env SDB_DATA_DIR (default ./.sdb)")
    for sp in (ml, md, mr):
        add_remote_flags(sp)
    add_release_command(ms)
    m.set_defaults(fn=cmd_models)
