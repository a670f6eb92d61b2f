"""All settings in one place: environment variables with the prefix ``SDB_``.

Every value has a default that works on one machine, so ``sdb serve`` with no
settings at all works: data in ``./.sdb``, SQLite there, the master key and the pepper created
in ``./.sdb-secrets`` beside it (outside what jobs read; refused when others may read them).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sdb_core.protect.seal import MASTER_KEY_BYTES, load_or_create_master_key

log = logging.getLogger("sdb.service")


# In the data dir: its mark (Settings.data_dir_mark). The name is from when only Ray tasks checked it: a data dir
# keeps the mark it has.
DATA_DIR_MARK = ".ray-shared-mark"


def _holds(store, table) -> bool:
    """Whether ``store`` has a row of ``table``."""
    from sqlalchemy import func, select

    with store.session() as s:
        return bool(s.scalar(select(func.count()).select_from(table)))


class SecretsError(ValueError):
    """A server secret the server refuses to use: open to other users, or inside the data dir."""


class SettingsError(ValueError):
    """A setting the server cannot start with, in one line that names it and what it takes."""


def _private(path: Path, chmod: str) -> None:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise SecretsError(f"{path} holds server secrets but group or others have access to it (mode "
                           f"{mode & 0o777:o}); the server will not start until `chmod {chmod} {path}` "
                           "(owned by the user the server runs as)")



# The first segments of the service's own routes, which a root path may not begin with.
_ROUTE_ROOTS = frozenset({"v1", "v2", "docs", "console", "healthz", "readyz", "metrics", "openapi.json"})


def _entries(value: str) -> list[str]:
    """A comma-separated setting's entries, trimmed, empty ones left out."""
    return [e for e in (e.strip() for e in value.split(",")) if e]


def _proxy(entry: str) -> str:
    """A trusted proxy (SDB_FORWARDED_ALLOW_IPS) as uvicorn parses it: an address, or a network without host bits
    (192.168.1.10/24, as `ip addr` prints a host's, is 192.168.1.0/24)."""
    try:
        return str(ipaddress.ip_network(entry, strict=False) if "/" in entry else ipaddress.ip_address(entry))
    except ValueError:
        raise ValueError(f"{entry!r} is not an IP address or network: it takes addresses or networks (10.0.0.0/8), "
                         "comma-separated, \"*\" (any) or \"\" (none)") from None


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def _origin(entry: str) -> str:
    """An allowed origin (SDB_CORS_ORIGINS) as a browser's Origin header writes it: scheme and host in lower case,
    no default port (https://App.Example:443 is https://app.example)."""
    origin = entry.lower()
    default_port = _DEFAULT_PORTS.get(origin.partition(":")[0], "")
    return origin.removesuffix(default_port) if default_port else origin


class Settings(BaseSettings):
    # No inf or nan: every number here is a size, a count or a period, and an infinite one never ends.
    model_config = SettingsConfigDict(env_prefix="SDB_", extra="ignore", allow_inf_nan=False)

    data_dir: Path = Path(".sdb")
    database_url: str | None = None  # default: SQLite in the data dir
    # The database password from a file (a compose or Kubernetes secret), so that it is in
    # neither the URL nor the environment; used when the URL itself has no password.
    database_password_file: Path | None = None
    # Secrets: the master key (seals the boxes' keys) and the pepper (keys API-key hashes), 32
    # random bytes each, created 0600 on first use in a 0700 directory outside the data dir.
    secrets_dir: Path | None = None  # default: <data_dir>-secrets, beside the data dir
    master_key_file: Path | None = None  # default: <secrets_dir>/master.key
    pepper_file: Path | None = None  # default: <secrets_dir>/pepper.key
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # The reverse proxies trusted to name the client (X-Forwarded-For, X-Forwarded-Proto): addresses or networks,
    # comma-separated; "*" any, "" none. Behind a proxy elsewhere, every caller without a key would otherwise be
    # the proxy's one address: one per-address rate for all, and one caller for a tenant's model's batches.
    forwarded_allow_ips: str = "127.0.0.1"
    # The path prefix a reverse proxy serves the service under, the proxy stripping it before it forwards
    # (https://host/sdb/v1/models reaches the server as /v1/models: root_path "/sdb"): the console's pages, the
    # OpenAPI document's server and every redirect keep it. "" (the default): served at the host's root.
    root_path: str = ""
    # Web pages of other origins that may call the API from a browser (CORS): origins such as https://app.example,
    # comma-separated; "*" any; "" (the default) none. Keys travel in the Authorization header, never in cookies,
    # so no credentials are allowed; a page sends the key its user gives it.
    cors_origins: str = ""
    # HTTP connections under `sdb serve`, so that no client holds the server's connections (files) for nothing: a
    # request's line and headers arrive within http_head_timeout_s of their first byte and its body never pauses
    # longer than http_body_timeout_s, or it is answered 408 and closed; a connection that sends nothing is closed
    # like an idle keep-alive one (5 s). One client address holds at most http_max_connections_per_address at once
    # (0: no cap); the proxies forwarded_allow_ips trusts are not capped: each carries many clients.
    http_head_timeout_s: float = Field(20.0, gt=0.0)
    http_body_timeout_s: float = Field(30.0, gt=0.0)
    http_max_connections_per_address: int = Field(256, ge=0)
    # The Open Inference Protocol over gRPC (docs/api.md), beside HTTP in the same process: off when
    # unset or 0. Needs the `grpc` extra. Its host defaults to `host`.
    grpc_port: int | None = Field(None, ge=0, le=65535)
    grpc_host: str | None = None
    max_payload_bytes: int = Field(8 << 20, ge=1024)
    jobs_backend: str = Field("embedded", pattern="^(embedded|ray)$")
    workers: int = Field(1, ge=0)  # job worker processes `sdb serve` starts (embedded backend)
    # GPU jobs the embedded pool runs at once: its first N workers get one CUDA device each
    # (CUDA_VISIBLE_DEVICES), the others none and run their jobs on the CPU. None: one per visible device.
    worker_gpus: int | None = Field(None, ge=0)
    ray_address: str | None = None  # jobs_backend=ray: a cluster address; unset starts a local Ray

    # Jobs: how often a worker polls the queue and heartbeats, and when a silent one counts as dead.
    job_poll_s: float = Field(1.0, gt=0.0)
    job_heartbeat_s: float = Field(2.0, gt=0.0)  # also how fast a cancel is seen (<= this + a batch)
    job_stale_s: float = Field(15.0, gt=0.0)  # no heartbeat for this long: the worker is dead
    job_reap_s: float = Field(5.0, gt=0.0)  # how often the server and workers look for dead ones
    job_torch_threads: int = Field(0, ge=0)  # torch threads per worker; 0 leaves torch's default

    # ONNX Runtime threads; 0 lets ORT choose (one per core). One intra-op thread is best for
    # small models (measured: +15% requests/s on the demo model); raise it for big ones.
    ort_intra_op_threads: int = Field(1, ge=0)
    ort_inter_op_threads: int = Field(0, ge=0)

    # ONNX Runtime execution providers, most preferred first, comma-separated (e.g.
    # "CUDAExecutionProvider,CPUExecutionProvider"); empty: CUDA when this onnxruntime has it, then the
    # CPU. One this onnxruntime lacks is skipped with a warning; the CPU provider ends the list if not named.
    # A name no ONNX Runtime build knows (a typo) stops `sdb serve` and `sdb worker` at start.
    ort_providers: str = ""
    # GPU memory one model's CUDA session may hold (its arena), in MiB; 0: ONNX Runtime's default (no bound).
    gpu_mem_limit_mb: int = Field(0, ge=0)
    # How ONNX Runtime's CUDA provider picks a convolution algorithm for each new input shape (cudnn_conv_algo_search):
    # its own default, EXHAUSTIVE, times every cuDNN algorithm on the first run of each shape. A server meets a new
    # shape with each batch size (1 to 256) and each image size a style model is sent, on a live request each time
    # (a style model's under its run timeout); HEURISTIC asks cuDNN's heuristics instead, at no such cost.
    ort_cudnn_conv_algo_search: str = Field("HEURISTIC", pattern="^(EXHAUSTIVE|HEURISTIC|DEFAULT)$")
    # On CUDA, bind each batch's input and output to host memory once (I/O binding); never on the CPU.
    ort_io_binding: bool = True

    # Micro-batching: concurrent requests to one model merge into one ORT call. The largest batch
    # (samples) defaults by the model's provider: BATCH_DEFAULTS in service/registry.py (CPU 64, CUDA 256).
    batching: bool = True
    batch_max_samples: int | None = Field(None, ge=1)
    batch_max_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)
    max_request_samples: int = Field(1024, ge=1)
    # The values one answer may hold: samples x the model's classes, for each output path asked; past it a 413
    # before any model time (an answer's memory and time grow with it, and one caller's must not hold the others').
    max_answer_values: int = Field(4_194_304, ge=1)
    # Model versions kept loaded in ONNX Runtime, in MiB of their bundle files (an ORT session takes ~3x its
    # bundle's size): past it the least recently used version is unloaded, and loaded again (verified) on its
    # next request; one always stays. Every version stays servable whatever the bound.
    model_cache_mb: float = Field(2048.0, gt=0.0)
    # The longest one ONNX Runtime call of a served model may run (a batch; a style image), in seconds; past it the
    # call is stopped and its requests get 503 model_timeout (0: no bound). A deploy key's graph must not hold a
    # thread of the pool every model shares for good.
    run_timeout_s: float = Field(30.0, ge=0.0)
    # The CPU memory the served models' ONNX Runtime calls may hold together, in MiB (one arena every session of
    # this process shares; weights are apart): a call that needs more is refused (503 model_out_of_memory) and
    # the server keeps serving. A deploy key's graph must not take the machine's memory (0: no bound).
    model_memory_mb: int = Field(4096, ge=0)

    public_predict: bool = True  # False: predict needs a key with the predict scope
    auth_cache_s: float = Field(1.0, ge=0.0)  # how stale a key row (revocation by another process) may be
    usage_flush_s: float = Field(0.5, gt=0.0)  # write-behind of usage statistics (quotas are charged at once)
    models_sync_s: float = Field(2.0, gt=0.0)  # picks up `sdb models add|remove` from the store
    register_demo: bool = True  # register <data_dir>/bundles/mnist-demo when no model ever was

    # Stopping `sdb serve` (SIGTERM, SIGINT, SIGHUP): its readiness answers 503 at once while it serves on for
    # shutdown_drain_s (a load balancer probing /readyz stops sending it requests first; 0: stop listening at once),
    # then requests in flight get shutdown_timeout_s to finish before they are cancelled (a client trickling a body
    # held the server up for as long as it trickled). docs/deploy.md#stopping-and-restarting.
    shutdown_drain_s: float = Field(0.0, ge=0.0)
    shutdown_timeout_s: float = Field(20.0, ge=0.0)
    # The lines of sdb's own loggers (sdb.service, sdb.jobs) that `sdb serve` and `sdb worker` write on stderr.
    log_level: str = Field("info", pattern="^(debug|info|warning|error|critical)$")

    # Uploaded files (POST /v1/files, POST /v1/models): the largest upload, and what an archive
    # (a dataset zip, an .npz, a bundle) may unpack to, in bytes and in members.
    max_file_bytes: int = Field(512 << 20, ge=1024)
    max_unpacked_bytes: int = Field(2 << 30, ge=1024)
    max_archive_members: int = Field(100_000, ge=1)

    # Limits per caller (0 turns a rate off): request rate per key and, for requests without a
    # key, per client address (token buckets, 429 with Retry-After before any model time); jobs a
    # key may have queued or running at once; bytes of uploaded files a key may keep; how long one
    # job may run (0: no limit; past it the job fails); bytes of job artifacts a key may keep (a
    # submission at the cap is refused, a job that passes it fails and keeps nothing). Admin keys
    # have no storage caps.
    rate_limit_key_per_s: float = Field(200.0, ge=0.0)
    rate_limit_key_burst: int = Field(400, ge=1)
    rate_limit_address_per_s: float = Field(500.0, ge=0.0)
    rate_limit_address_burst: int = Field(1000, ge=1)
    max_active_jobs_per_key: int = Field(16, ge=1)
    max_file_storage_per_key: int = Field(8 << 30, ge=1024)
    max_job_seconds: int = Field(6 * 3600, ge=0)
    max_artifact_storage_per_key: int = Field(16 << 30, ge=1024)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _named_data_dir(cls, value):
        # "" reads as Path("."): the working directory, its secrets in a folder beside it, not the default .sdb
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: name the data dir (unset, it is .sdb)")
        return value

    @field_validator("port", "grpc_port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value, info):
        # Kubernetes sets SDB_PORT=tcp://10.0.0.1:8000 in every pod of a namespace with a Service named sdb (and
        # SDB_GRPC_PORT for one named sdb-grpc): a link, never this setting, which it made unreadable (every
        # command exited 2, every job worker died at start). Ignored, the setting at its default.
        if isinstance(value, str) and value.strip().lower().startswith(("tcp://", "udp://", "sctp://")):
            logging.getLogger("sdb.service").warning(
                "SDB_%s=%s is a Kubernetes service link, not this setting: ignored (enableServiceLinks: false in "
                "the pod spec turns them off)", info.field_name.upper(), value.strip()[:100])
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: str) -> str:
        # written as uvicorn parses it (strictly, "*" only alone and exact): an entry it cannot parse it reads as a
        # name it never sees, so a typo, a host's address with its prefix (192.168.1.10/24), a trailing blank after
        # "*" or a "*" among other entries would trust no proxy, silently
        entries = _entries(value)
        if "*" in entries:
            if set(entries) != {"*"}:
                raise ValueError(f"{value.strip()!r} mixes \"*\" (every peer) with other entries, and uvicorn would "
                                 "ignore that \"*\": give \"*\" alone, or the proxies' addresses and networks "
                                 "without it")
            return "*"
        return ",".join(_proxy(entry) for entry in entries)

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)*", value):
            raise ValueError(f"{value!r} is not a path prefix: it takes one such as /sdb or /ml/sdb (a leading slash, "
                             "none at the end, letters, digits and . _ ~ -), or \"\" (served at the root)")
        first = value.split("/")[1] if value else ""
        if first in _ROUTE_ROOTS:  # /v1 as the prefix: a stripped /v1/models would be routed as /models
            raise ValueError(f"{value!r} begins as the service's own {first} routes do: name the prefix otherwise "
                             "(such as /sdb)")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        # an origin is scheme://host[:port], nothing after it: a browser's Origin header never matches a path
        # and is written as a browser writes it (lower case, no default port), which Starlette compares exactly
        origins = []
        for entry in _entries(value):
            if entry != "*" and not re.fullmatch(r"https?://[^/\s]+", entry, flags=re.IGNORECASE):
                raise ValueError(f"{entry!r} is not an origin: it takes origins such as https://app.example or "
                                 "http://localhost:3000 (scheme and host, no path), comma-separated, \"*\" (any) or "
                                 "\"\" (none)")
            origins.append(_origin(entry))
        return ",".join(origins)

    def cors_origin_list(self) -> list[str]:
        return _entries(self.cors_origins)

    @classmethod
    def load(cls, flags: dict[str, str] | None = None, **over: Any) -> Settings:
        """The settings from ``SDB_*`` env with ``over`` on top; a value they refuse is a SettingsError in one
        line naming the variable (and its flag, from ``flags``: field -> ``--flag``) and what it takes; so is an
        ``SDB_*`` variable that nothing reads (:func:`check_env_names`)."""
        check_env_names(os.environ)
        try:
            return cls(**over)
        except ValidationError as e:
            raise SettingsError(describe_error(e, flags or {})) from None

    def prepare_data_dir(self) -> None:
        """Create the data dir; SettingsError naming SDB_DATA_DIR when it cannot be one (a file, no access)."""
        path = self.data_dir
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SettingsError(f"SDB_DATA_DIR (--data-dir: {path}) cannot be made a directory: {e.strerror or e}; it "
                                "takes a directory this user can write") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise SettingsError(f"SDB_DATA_DIR (--data-dir: {path}) is not writable by this user; it takes a directory "
                                "this user can write")

    @property
    def db_url(self) -> str:
        if not self.database_url:
            return f"sqlite:///{(self.data_dir / 'sdb.sqlite3').resolve()}"
        if self.database_password_file is None:
            return self.database_url
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url)
        if url.password:
            return self.database_url
        try:
            password = self.database_password_file.read_text().strip()
        except OSError as e:
            raise SettingsError(f"SDB_DATABASE_PASSWORD_FILE ({self.database_password_file}) cannot be read: "
                                f"{e.strerror or e}; it takes a file holding the database password") from None
        return url.set(password=password).render_as_string(hide_password=False)

    @property
    def secrets_path(self) -> Path:
        if self.secrets_dir is not None:
            return self.secrets_dir
        data = self.data_dir.resolve()
        return data.parent / f"{data.name or 'sdb'}-secrets"

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or self._default_secret("master.key")

    @property
    def pepper_path(self) -> Path:
        return self.pepper_file or self._default_secret("pepper.key")

    @cached_property
    def master_key(self) -> bytes:
        return self._load_secret(self.master_key_path)

    @cached_property
    def pepper(self) -> bytes:
        return self._load_secret(self.pepper_path)

    def check_secrets(self, pepper: bool = True) -> None:
        """Load (or create) the secrets: SecretsError when others may read them, or when one is missing beside a
        store that holds what it locks (a new one was made without a word: every API key 401, every sealed model
        503). ``sdb serve`` and the admin commands call it before anything else; ``sdb worker`` with ``pepper``
        False (it never reads one: a job's key is checked by its row)."""
        from .store import ApiKeyRow, ModelRow

        wanted = [(self.master_key_path, "master key", ModelRow, "every sealed model (503)")]
        if pepper:
            wanted.append((self.pepper_path, "pepper", ApiKeyRow, "every API key (401 unknown API key)"))
        store = self._existing_store()
        try:
            for path, what, table, locks in wanted:
                if not path.exists() and store is not None and _holds(store, table):
                    raise SecretsError(f"the {what} {path} is missing, but the store already holds what was made "
                                       f"under it: a new one would lock out {locks}. Restore the file from its backup "
                                       "(or point SDB_SECRETS_DIR, SDB_MASTER_KEY_FILE or SDB_PEPPER_FILE at it)")
            _ = self.master_key
            if pepper or self.pepper_path.exists():  # a worker's host made none, but one there is checked all the same
                _ = self.pepper
            if store is not None:
                self.check_fingerprints(store, pepper)
        finally:
            if store is not None:
                store.close()

    def data_dir_mark(self) -> str:
        """The data dir's mark, a random id made on first use: the same wherever that filesystem is mounted."""
        path = self.data_dir / DATA_DIR_MARK
        try:
            with open(path, "x") as f:
                f.write(secrets.token_hex(16))
        except FileExistsError:
            pass
        return path.read_text().strip()

    def check_data_dir(self, store) -> None:
        """SettingsError when this data dir is not the one the store's other processes use (the first one on the store
        recorded its mark): a worker on a host with a data dir of its own ran jobs "succeeded" whose artifacts, logs
        and deployed bundles the server never saw. A server and its workers write where the others read."""
        mark = self.data_dir_mark()
        if store.secret_matches("data_dir", mark):
            return
        path = self.data_dir / DATA_DIR_MARK
        raise SettingsError(
            f"SDB_DATA_DIR {self.data_dir} is not the data dir this store's other processes use (its mark, {path}, "
            "is not the one the store recorded): every server and worker on one store shares one data dir, the same "
            "filesystem at the same path, or the jobs' artifacts and the deployed bundles are written where the "
            "others never read them. Mount the server's data dir here. If the one the store recorded is gone for "
            f"good and this one replaces it, write the store's mark, {store.recorded_secret('data_dir')}, into {path}")

    def check_fingerprints(self, store, pepper: bool = True) -> None:
        """SecretsError when the master key or the pepper here is not the one the store records (its first process
        recorded them): a replica or worker with a secrets dir of its own made its own, and every key it saw was
        unknown, every model sealed under the other one unservable, while it said it was ready."""
        import hashlib
        import hmac

        for name, path, what in (("master_key", self.master_key_path, "master key"),
                                 ("pepper", self.pepper_path, "pepper")):
            if name == "pepper" and (not pepper or not path.exists()):
                continue  # a worker, which never reads one
            secret = self.master_key if name == "master_key" else self.pepper
            fingerprint = hmac.new(secret, b"sdb secret fingerprint: " + name.encode(), hashlib.sha256).hexdigest()
            if store.recorded_secret(name) is None:  # the first process on the store (or on one made before these)
                self._check_unrecorded(store, name, path, what)
            if not store.secret_matches(name, fingerprint):
                raise SecretsError(f"the {what} {path} is not the one this store's other processes use (its "
                                   "fingerprint differs): every server and worker on one store needs the same master "
                                   "key and pepper; copy the files from the first one's SDB_SECRETS_DIR")

    def _check_unrecorded(self, store, name: str, path: Path, what: str) -> None:
        """Before a secret's fingerprint is first recorded on a store that holds what was made under one (a store from
        before fingerprints): the master key must open the sealed keys of the models it holds, or it would be recorded
        as the right one and the right one refused after. A pepper has nothing to be checked by: said in the log."""
        from .store import ApiKeyRow

        if name == "master_key":
            from sdb_core.bundle import opens_key

            from .copies import bundle_path

            for row in store.list_models()[:20]:  # the first that has a sealed key tells
                opened = opens_key(bundle_path(self, row.path), self.master_key)
                if opened is False:
                    raise SecretsError(f"the {what} {path} does not open the sealed key of model {row.name!r} version "
                                       f"{row.version!r}, which this store serves: it is not the one its models were "
                                       "sealed under; point SDB_SECRETS_DIR or SDB_MASTER_KEY_FILE at that one")
                if opened:
                    return
        elif _holds(store, ApiKeyRow):
            log.warning("recording the fingerprint of the pepper %s on a store that holds API keys made before "
                        "fingerprints: if they answer 401 unknown API key, it is not theirs", path)

    def _existing_store(self):
        """The store, when there is one to look into (a new data dir: None, and no store made here just to look;
        one that cannot be opened: None, as the start-up check says why)."""
        from sqlalchemy.exc import SQLAlchemyError

        from .store import Store

        if self.database_url is None and not (self.data_dir / "sdb.sqlite3").is_file():
            return None
        try:
            return Store(self.db_url)
        except (SQLAlchemyError, ImportError, ValueError, OSError):
            return None

    def _default_secret(self, name: str) -> Path:
        path, legacy = self.secrets_path / name, self.data_dir / name
        # A data dir from before the secrets dir: its secrets are read in place (with a warning),
        # not moved, because a secrets dir on a container's ephemeral layer would lose them.
        return legacy if not path.exists() and legacy.is_file() else path

    def _load_secret(self, path: Path) -> bytes:
        data, secrets = self.data_dir.resolve(), self.secrets_path.resolve()
        if secrets.is_relative_to(data):
            raise SecretsError(f"the secrets dir {secrets} is inside the data dir {data}, where jobs read files: "
                               "set SDB_SECRETS_DIR to a directory outside it")
        if path.absolute().parent.resolve() == secrets:
            try:
                secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise SecretsError(f"SDB_SECRETS_DIR ({secrets}) cannot be made a directory: {e.strerror or e}; it "
                                   "takes a directory outside the data dir, mode 0700") from None
            _private(secrets, "700")
        setting = _secret_setting(self, path)
        if path.exists():
            _private(path, "600")
        elif setting.endswith("_FILE"):  # named, so expected: a new one would orphan every sealed key or API key
            raise SecretsError(_missing_secret(setting, path))
        try:
            key = load_or_create_master_key(path)  # created 0600
        except (OSError, ValueError) as e:
            raise SecretsError(_bad_secret(setting, path, e)) from None
        if path.resolve().is_relative_to(data):
            log.warning("%s is inside the data dir %s, where jobs read files: move it to %s (mode 0700) "
                        "or point SDB_MASTER_KEY_FILE / SDB_PEPPER_FILE outside", path, data, secrets)
        return key

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"


def _secret_setting(settings: Settings, path: Path) -> str:
    """The setting that names ``path``: SDB_MASTER_KEY_FILE or SDB_PEPPER_FILE when set, else the secrets dir's."""
    for field, env in (("master_key_file", "SDB_MASTER_KEY_FILE"), ("pepper_file", "SDB_PEPPER_FILE")):
        if getattr(settings, field) == path:
            return env
    return "SDB_SECRETS_DIR"


_KEY_TEXT = re.compile(r"[0-9a-fA-F]{32,}")


def _missing_secret(setting: str, path: Path) -> str:
    if _KEY_TEXT.fullmatch(str(path)):  # the key itself where its file's path goes: never echo it
        return (f"{setting} holds what looks like a key, not the path of a file holding one: it takes the path "
                f"of a file with {MASTER_KEY_BYTES} random bytes as {2 * MASTER_KEY_BYTES} hex digits")
    return (f"{setting} names {path}, which does not exist: it takes an existing file with {MASTER_KEY_BYTES} "
            f"random bytes as {2 * MASTER_KEY_BYTES} hex digits (`make secrets` writes one), or leave it unset to "
            "have one created in the secrets dir")


def _bad_secret(setting: str, path: Path, e: Exception) -> str:
    """Why a secret file cannot be used, naming its setting and never its content."""
    if isinstance(e, OSError):
        why = f"cannot be read or created ({e.strerror or type(e).__name__})"
    else:
        try:
            size = len(path.read_text().strip())
        except (OSError, UnicodeDecodeError):
            size = None
        why = ("is empty" if size == 0 else "is not what it should hold"
               + (f" ({size} characters)" if size else ""))
    return (f"{setting}: {path} {why}; it takes a file with {MASTER_KEY_BYTES} random bytes as "
            f"{2 * MASTER_KEY_BYTES} hex digits, mode 0600 (`make secrets` writes one)")


def _takes(field: str) -> str:
    """What a setting takes, in words, from its type and bounds."""
    info = Settings.model_fields[field]
    ann = info.annotation
    kinds = {bool: "true or false", int: "an integer", float: "a finite number", Path: "a path", str: "text"}
    kind = next((k for t, k in kinds.items() if ann is t or t in getattr(ann, "__args__", ())), "a value")
    bounds = []
    for m in info.metadata:
        for attr, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{word} {getattr(m, attr)}")
        pattern = getattr(m, "pattern", None)
        if pattern and (choices := re.fullmatch(r"\^\(([\w|]+)\)\$", pattern)):
            return "one of " + ", ".join(choices.group(1).split("|"))
    return kind + (" " + " and ".join(bounds) if bounds else "")


def describe_error(e: ValidationError, flags: dict[str, str]) -> str:
    """A Settings ValidationError in one line: each refused setting by its variable, its value and what it takes."""
    parts = []
    for err in e.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        if field not in Settings.model_fields:
            parts.append(err["msg"])
            continue
        name = f"SDB_{field.upper()}" + (f" (--{flags[field]})" if field in flags else "")
        shown = "" if field == "database_url" else f" is {err.get('input')!r}:"  # a URL may carry a password
        if err["type"] == "value_error":  # a validator's own words
            parts.append(f"{name}{shown} {err['ctx']['error']}")
        else:
            parts.append(f"{name}{shown} it takes {_takes(field)}")
    return "; ".join(parts)


# The SDB_* variables this project reads that are not settings. With the settings' own names, every SDB_* name a
# process of it reads: any other is a typo (check_env_names), so a name read anywhere new is added here.
OTHER_ENV = frozenset({
    "SDB_URL", "SDB_API_KEY",  # the SDK's and the client commands': the server and the key (clients/python)
    "SDB_WORKER_PARENT_PID", "SDB_WORKER_DEFERS_TO_GPU",  # set by `sdb serve` on its job workers (service/jobs)
    "SDB_TEST_DATABASE_URL", "SDB_TEST_CLOCK_SKEW_S", "SDB_CONTRACT_EXAMPLES",  # the tests' (tests/service)
    "SDB_CONSOLE_SCREENSHOTS",  # the browser tests' (tests/browser)
    "SDB_CACHE_DIR",  # the benchmarks' cache (benchmarks/depara_zoo.py)
})


# What Kubernetes adds to every pod for each Service of its namespace, beside <SERVICE>_SERVICE_HOST (a Service named
# sdb: SDB_SERVICE_PORT, SDB_PORT=tcp://..., SDB_PORT_8000_TCP_ADDR, ...): never a setting misspelled, never refused.
_SERVICE_LINK = re.compile(r"(SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_[A-Z]+)?)?)")


def _service_link(name: str, environ) -> bool:
    """Whether ``name`` is one of a Kubernetes Service's links: its own ``<S>_SERVICE_HOST``, or a port link of an
    ``S`` whose host link is there too (else ``SDB_GRCP_PORT`` would pass as one, a typo of SDB_GRPC_PORT)."""
    if name.endswith("_SERVICE_HOST"):
        return True
    hosts = {n.upper().removesuffix("_SERVICE_HOST") for n in environ if n.upper().endswith("_SERVICE_HOST")}
    return any(name.startswith(host + "_") and _SERVICE_LINK.fullmatch(name[len(host) + 1:]) for host in hosts)


def check_env_names(environ) -> None:
    """SettingsError naming each ``SDB_*`` variable of ``environ`` that nothing reads and that is one letter or two
    from a setting (``SDB_PUBLIC_PREDCIT=false`` was ignored without a word, and served predictions to anyone); any
    other unknown ``SDB_*`` name is a warning, since another tool's or Kubernetes' service links may own it."""
    import difflib

    known = {f"SDB_{field.upper()}" for field in Settings.model_fields} | OTHER_ENV
    unknown = sorted(n for n in environ if n.upper().startswith("SDB_") and n.upper() not in known
                     and not _service_link(n.upper(), environ))
    typos, others = [], []
    for name in unknown:
        near = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.85) or sorted(
            k for k in known if k.startswith(name.upper() + "_"))[:1]  # SDB_MASTER_KEY for SDB_MASTER_KEY_FILE
        if near:
            typos.append(f"{name} (did you mean {near[0]}?)")
        else:
            others.append(name)
    if others:
        logging.getLogger("sdb.service").warning("%s: not a setting, ignored (every setting is in "
                                                 "docs/api.md#settings)", ", ".join(others))
    if typos:
        one = len(typos) == 1
        raise SettingsError(f"{', '.join(typos)} {'is not a setting' if one else 'are not settings'}: rename or "
                            f"unset {'it' if one else 'them'} (every setting is in docs/api.md#settings)")


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def log_to_stderr(level: str) -> None:
    """The log of ``sdb serve`` and ``sdb worker`` on stderr, each line with its time, logger and level: sdb's own
    loggers at ``level`` (SDB_LOG_LEVEL), other libraries' warnings and errors. Their info and debug lines stay off
    whatever the level: an HTTP library's debug lines carry request headers, an API key among them."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("sdb").setLevel(level.upper())
