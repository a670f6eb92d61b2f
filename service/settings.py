"""All settings in one place: environment variables with the prefix ``SDB_``.

Every value has a default that works on one machine, so ``sdb serve`` with no
settings at all works: data in ``./.sdb``, SQLite there, a master key created there.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sdb_core.protect.seal import load_or_create_master_key


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDB_", extra="ignore")

    data_dir: Path = Path(".sdb")
    database_url: str | None = None  # default: SQLite in the data dir
    # The database password from a file (a compose or Kubernetes secret), so that it is in
    # neither the URL nor the environment; used when the URL itself has no password.
    database_password_file: Path | None = None
    master_key_file: Path | None = None  # default: <data_dir>/master.key
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_payload_bytes: int = Field(8 << 20, ge=1024)
    jobs_backend: str = Field("embedded", pattern="^(embedded|ray)$")
    workers: int = Field(1, ge=0)  # job worker processes `sdb serve` starts (embedded backend)
    ray_address: str | None = None  # jobs_backend=ray: a cluster address; unset starts a local Ray

    # Jobs: how often a worker polls the queue and heartbeats, and when a silent one counts as dead.
    job_poll_s: float = Field(1.0, gt=0.0)
    job_heartbeat_s: float = Field(2.0, gt=0.0)  # also how fast a cancel is seen (<= this + a batch)
    job_stale_s: float = Field(15.0, gt=0.0)  # no heartbeat for this long: the worker is dead
    job_reap_s: float = Field(5.0, gt=0.0)  # how often the server and workers look for dead ones
    job_torch_threads: int = Field(0, ge=0)  # torch threads per worker; 0 leaves torch's default

    # Secrets beside the data: the pepper that keys API-key hashes (created 0600 on first use).
    pepper_file: Path | None = None  # default: <data_dir>/pepper.key

    # ONNX Runtime threads; 0 lets ORT choose (one per core). One intra-op thread is best for
    # small models (measured: +15% requests/s on the demo model); raise it for big ones.
    ort_intra_op_threads: int = Field(1, ge=0)
    ort_inter_op_threads: int = Field(0, ge=0)

    # Micro-batching: concurrent requests to one model merge into one ORT call.
    batching: bool = True
    batch_max_samples: int = Field(64, ge=1)
    batch_max_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)
    max_request_samples: int = Field(1024, ge=1)

    public_predict: bool = True  # False: predict needs a key with the predict scope
    auth_cache_s: float = Field(1.0, ge=0.0)  # how stale a key row (revocation by another process) may be
    usage_flush_s: float = Field(0.5, gt=0.0)  # write-behind of quota counters and usage
    models_sync_s: float = Field(2.0, gt=0.0)  # picks up `sdb models add|remove` from the store
    register_demo: bool = True  # register <data_dir>/bundles/mnist-demo when no model ever was

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
        password = self.database_password_file.read_text().strip()
        return url.set(password=password).render_as_string(hide_password=False)

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"

    @cached_property
    def master_key(self) -> bytes:
        return load_or_create_master_key(self.master_key_path)

    @property
    def pepper_path(self) -> Path:
        return self.pepper_file or self.data_dir / "pepper.key"

    @cached_property
    def pepper(self) -> bytes:
        # Same file format and creation rules as the master key: 32 random bytes, hex, mode 0600.
        return load_or_create_master_key(self.pepper_path)

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"
