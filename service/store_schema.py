"""The store's tables and their migrations: what :mod:`service.store` reads and writes.

Portable SQL only (SQLite and PostgreSQL). The schema is created and migrated at start by
:func:`migrate`: an ordered list of steps and a version row.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))  # HMAC-SHA256(pepper, id:secret), hex
    name: Mapped[str] = mapped_column(String(200), default="")
    scopes: Mapped[str] = mapped_column(String(200))  # comma-separated
    models: Mapped[str | None] = mapped_column(Text, nullable=True)  # comma-separated; NULL: every model
    quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # samples; NULL: unlimited
    quota_window_s: Mapped[int | None] = mapped_column(Integer, nullable=True)  # NULL: lifetime quota
    window_start: Mapped[int] = mapped_column(BigInteger, default=0)
    used: Mapped[int] = mapped_column(BigInteger, default=0)  # samples in the current window
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ModelRow(Base):
    """One served version of a model, with the output policy its public routes apply."""

    __tablename__ = "models"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[str] = mapped_column(String(100), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    added_at: Mapped[float] = mapped_column(Float)
    policy: Mapped[str] = mapped_column(String(16), default="probs", server_default="probs")  # probs|top_k|label
    top_k: Mapped[int | None] = mapped_column(Integer, nullable=True)  # k of the top_k policy
    decimals: Mapped[int | None] = mapped_column(Integer, nullable=True)  # rounding of served probabilities
    # the key that deployed this version (NULL: the admin CLI, or a version older than this column) and the bytes
    # of its copy: a key's storage cap counts them with its files
    deployer: Mapped[str | None] = mapped_column(String(32), nullable=True)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # sha256 of the bundle's meta.json when it was registered (it lists every file's sha256, so it names the bundle
    # whole): a load of another bundle at the path is refused. NULL for versions older than the column: recorded at
    # their first load, then checked.
    meta_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ModelNameRow(Base):
    """A model name and its owner: the key that first deployed it; NULL, an admin (``sdb models add``,
    and every name older than this table). The row outlives the name's versions, so a removed
    model's name stays its owner's and a version number is never given twice."""

    __tablename__ = "model_names"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)  # the highest numeric version ever added
    created_at: Mapped[float] = mapped_column(Float)



class UsageRow(Base):
    """Samples served, summed per key, model, path and UTC day."""

    __tablename__ = "usage"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), primary_key=True)  # predict | distill
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    samples: Mapped[int] = mapped_column(BigInteger, default=0)


class AuditRow(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(64))  # a key id, or "cli" / "server"
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(300), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class JobRow(Base):
    """One offline job: the table is the truth for every backend (embedded workers, Ray)."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    params: Mapped[str] = mapped_column(Text)  # JSON, as validated at submission
    owner: Mapped[str] = mapped_column(String(32), index=True)  # the submitting key's id
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # sha256 of the request as sent (kind and validated params, before the submission check resolved them): a
    # retry with the idempotency key is the same job when it is the same request. NULL for jobs older than it.
    request_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Keyed samples this job has charged to its key (any attempt): a later attempt (a requeue after a worker
    # shut down) charges nothing again. NULL: none.
    charged_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    backend: Mapped[str] = mapped_column(String(16), default="embedded")
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued|running|succeeded|failed|cancelled
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[str] = mapped_column(String(200), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[str] = mapped_column(Text, default="{}")  # JSON: the latest metrics
    result: Mapped[str] = mapped_column(Text, default="{}")  # JSON: what the kind returned
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    training_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # first progress of training
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Bytes under the job's artifacts/, as its runner last measured them: the key's artifact storage cap counts them.
    artifact_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


JOB_DONE = ("succeeded", "failed", "cancelled")


class FileRow(Base):
    """An uploaded file (``service/files.py``): checked on upload, stored under ``<data_dir>/files/<id>/``."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # file- + 24 hex
    owner: Mapped[str] = mapped_column(String(32), index=True)  # the uploading key's id
    purpose: Mapped[str] = mapped_column(String(16))  # weights | dataset | image | bundle
    filename: Mapped[str] = mapped_column(String(255))  # the client's name, cleaned: no path
    size: Mapped[int] = mapped_column(BigInteger)  # bytes, as uploaded
    sha256: Mapped[str] = mapped_column(String(64))  # of the upload
    format: Mapped[str] = mapped_column(String(32))  # what the check found: safetensors, pt, imagefolder, npz, ...
    stored: Mapped[str] = mapped_column(String(300))  # the checked file or folder, relative to the file's folder
    info: Mapped[str] = mapped_column(Text, default="{}")  # JSON: what the check measured (tensors, classes, ...)
    shared: Mapped[bool] = mapped_column(Boolean, default=False)  # an admin's file every key may use
    created_at: Mapped[float] = mapped_column(Float, index=True)


class FileReservationRow(Base):
    """Bytes an upload being checked holds against its key's file storage cap (:meth:`Store.reserve_file_bytes`),
    until it becomes a file row or is given back; one older than ``RESERVATION_TTL_S`` belongs to a process that
    died mid-check (its staging folder is swept as old)."""

    __tablename__ = "file_reservations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(32), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


def _v1(conn: Connection) -> None:
    # The tables of the first release, named: later tables come from their own steps (and later
    # columns of these from theirs, which add only what is missing).
    v1 = ("api_keys", "models", "usage", "audit_log")
    Base.metadata.create_all(conn, tables=[Base.metadata.tables[n] for n in v1])


def _v2(conn: Connection) -> None:
    JobRow.__table__.create(conn, checkfirst=True)


def _v3(conn: Connection) -> None:
    FileRow.__table__.create(conn, checkfirst=True)


def _v4(conn: Connection) -> None:
    """Model names with an owner, and each version's output policy. A database that ran ``_v1``
    before the policy columns existed gets them here (``_v1`` builds ``models`` from the class);
    every name already served becomes an admin's, its numeric versions counted."""
    have = {c["name"] for c in inspect(conn).get_columns("models")}
    for col in ("policy", "top_k", "decimals"):
        if col not in have:
            column = ModelRow.__table__.c[col]
            kind = column.type.compile(dialect=conn.dialect)
            default = " NOT NULL DEFAULT 'probs'" if col == "policy" else ""
            conn.exec_driver_sql(f"ALTER TABLE models ADD COLUMN {col} {kind}{default}")
    ModelNameRow.__table__.create(conn, checkfirst=True)
    last: dict[str, int] = {}
    for name, version in conn.execute(select(ModelRow.name, ModelRow.version)):
        last[name] = max(last.get(name, 0), int(version) if version.isdigit() else 0)
    known = set(conn.execute(select(ModelNameRow.name)).scalars())
    now = time.time()
    rows = [{"name": n, "owner": None, "last_version": v, "created_at": now} for n, v in last.items() if n not in known]
    if rows:
        conn.execute(ModelNameRow.__table__.insert(), rows)


def _v5(conn: Connection) -> None:
    """Storage caps: each job's artifact bytes (0 for jobs older than this step) and upload reservations."""
    if "artifact_bytes" not in {c["name"] for c in inspect(conn).get_columns("jobs")}:
        conn.exec_driver_sql("ALTER TABLE jobs ADD COLUMN artifact_bytes BIGINT NOT NULL DEFAULT 0")
    FileReservationRow.__table__.create(conn, checkfirst=True)


def _v6(conn: Connection) -> None:
    """Each job's request digest (what an idempotent retry is compared with); NULL for older jobs."""
    if "request_sha256" not in {c["name"] for c in inspect(conn).get_columns("jobs")}:
        conn.exec_driver_sql("ALTER TABLE jobs ADD COLUMN request_sha256 VARCHAR(64)")


def _v7(conn: Connection) -> None:
    """Keyed samples each job charged (a requeued attempt charges them once); NULL for older jobs."""
    if "charged_samples" not in {c["name"] for c in inspect(conn).get_columns("jobs")}:
        conn.exec_driver_sql("ALTER TABLE jobs ADD COLUMN charged_samples INTEGER")


class SecretCheckRow(Base):
    """What every process on the store must share: a fingerprint of each secret its rows are made under (an HMAC of a
    fixed label under the secret: it tells nothing of the secret), and the data dir's mark ("data_dir", a random id
    kept in the data dir: Settings.check_data_dir). A process whose master key, pepper or data dir is another's
    refuses to start (two replicas on one store, each with its own secrets dir, each made its own)."""

    __tablename__ = "secret_checks"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)  # "master_key", "pepper"
    fingerprint: Mapped[str] = mapped_column(String(64))


def _v9(conn: Connection) -> None:
    """The secrets' fingerprints: recorded by the first process that starts on the store after this step."""
    SecretCheckRow.__table__.create(conn, checkfirst=True)


def _v8(conn: Connection) -> None:
    """Each version's deployer and bytes. A version older than this step is its name's owner's (a key's name: its
    deploys; an admin's: NULL, counted against no key), its bytes those of its copy on disk (0 when it is gone)."""
    have = {c["name"] for c in inspect(conn).get_columns("models")}
    if "bytes" not in have:
        conn.exec_driver_sql("ALTER TABLE models ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0")
    if "deployer" in have:  # run again (a release from before SchemaTooNew wrote its older schema version over ours):
        return  # the versions an admin deployed since under a key's name (deployer NULL) would become that key's
    conn.exec_driver_sql("ALTER TABLE models ADD COLUMN deployer VARCHAR(32)")
    owners = dict(conn.execute(select(ModelNameRow.name, ModelNameRow.owner)).all())
    for name, version, path in conn.execute(select(ModelRow.name, ModelRow.version, ModelRow.path)).all():
        if owners.get(name) is None:
            continue
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        conn.execute(update(ModelRow).where(ModelRow.name == name, ModelRow.version == version)
                     .values(deployer=owners[name], bytes=size))


def _v10(conn: Connection) -> None:
    """Nothing to change: a name's owner may now be "" (an admin released it: Store.release_name). A release before
    this step read "" as a key's id (every tenant's deploy under the name refused, its graph a tenant's): from the
    releases that refuse a newer schema on, they refuse this store instead."""


def _v11(conn: Connection) -> None:
    """Each version's meta.json digest (a bundle changed under a registered version is refused); NULL for older
    versions, recorded at their first load."""
    if "meta_sha256" not in {c["name"] for c in inspect(conn).get_columns("models")}:
        conn.exec_driver_sql("ALTER TABLE models ADD COLUMN meta_sha256 VARCHAR(64)")


# Append a step to change the schema; never edit a released one (_v8's rerun guard excepted: the same first run).
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9, _v10, _v11]


class SchemaTooNew(ValueError):
    """The store was migrated by a newer release than this one."""


# Any constant: the PostgreSQL advisory lock that serialises migrations across processes and hosts.
_MIGRATE_LOCK = 0x5DB0_0001


def migrate(engine: Engine) -> int:
    """Bring the schema to the latest version; returns it.

    One transaction, serialised across processes: the API and every worker start at once on
    a fresh database, and without a lock two of them both found no table and raced to create
    it. PostgreSQL (DDL is transactional) takes an advisory lock, SQLite its write lock.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
        elif conn.dialect.name == "sqlite":
            # The write lock now: the sqlite3 driver opens no transaction for DDL, so two
            # processes on a fresh data dir (server and workers) both created the tables.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        SchemaVersion.__table__.create(conn, checkfirst=True)
        row = conn.execute(select(SchemaVersion.version).where(SchemaVersion.id == 1)).scalar()
        current = row or 0
        if current > len(MIGRATIONS):
            # a newer release migrated it: this one would write its older version over the newer one's and run
            # without the newer one's checks (a rollback took the store's secrets fingerprints and caps with it)
            raise SchemaTooNew(f"the store is at schema {current}, from a newer release of SDB; this one knows "
                               f"{len(MIGRATIONS)}: run that release (or a newer one) on it")
        for step in MIGRATIONS[current:]:
            step(conn)
        if row is None:
            conn.execute(SchemaVersion.__table__.insert().values(id=1, version=len(MIGRATIONS)))
        elif current != len(MIGRATIONS):
            conn.execute(update(SchemaVersion).where(SchemaVersion.id == 1).values(version=len(MIGRATIONS)))
    return len(MIGRATIONS)
