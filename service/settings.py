"""All settings in one place: environment variables with the prefix ``SDB_``.

Every value has a default that works on one machine, so ``sdb serve`` with no
settings at all works: data in ``./.sdb``, SQLite there, a master key created there.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sdb_core.protect.key import load_or_create_master_key


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDB_", extra="ignore")

    data_dir: Path = Path(".sdb")
    database_url: str | None = None  # default: SQLite in the data dir
    master_key_file: Path | None = None  # default: <data_dir>/master.key
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_payload_bytes: int = Field(8 << 20, ge=1024)
    jobs_backend: str = Field("embedded", pattern="^(embedded|ray)$")
    workers: int = Field(1, ge=0)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'sdb.sqlite3').resolve()}"

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"

    @cached_property
    def master_key(self) -> bytes:
        return load_or_create_master_key(self.master_key_path)

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"
