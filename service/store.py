"""The SQL store: API keys, hosted models, usage, the audit log, jobs and uploaded files.

SQLAlchemy 2 with portable SQL only, so the same code runs on SQLite (the default, a file
in the data dir) and on PostgreSQL (``SDB_DATABASE_URL``). The schema is created and
migrated at start by :func:`migrate`: an ordered list of steps and a version row.
"""
from __future__ import annotations

import re
import sqlite3
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
    and_,
    bindparam,
    case,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


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


class ModelNameRow(Base):
    """A model name and its owner: the key that first deployed it; NULL, an admin (``sdb models add``,
    and every name older than this table). The row outlives the name's versions, so a removed
    model's name stays its owner's and a version number is never given twice."""

    __tablename__ = "model_names"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)  # the highest numeric version ever added
    created_at: Mapped[float] = mapped_column(Float)


class DeployRefused(Exception):
    """A version the store will not add: ``code`` model_not_owned, key_invalid or model_exists."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def may_deploy(claimed: bool, owner: str | None, deployer: str | None, admin: bool) -> bool:
    """The ownership rule: an admin deploys under any name, anyone under an unclaimed one, a key
    under a name it owns. ``owner`` None is an admin's name; ``deployer`` None is the admin CLI."""
    return admin or deployer is None or not claimed or owner == deployer


def version_key(v: str) -> tuple:
    """Natural order: "10" after "9", "1.10" after "1.9"."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_]", v))


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


# Append a step to change the schema; never edit a released one.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4]


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
        for step in MIGRATIONS[current:]:
            step(conn)
        if row is None:
            conn.execute(SchemaVersion.__table__.insert().values(id=1, version=len(MIGRATIONS)))
        elif current != len(MIGRATIONS):
            conn.execute(update(SchemaVersion).where(SchemaVersion.id == 1).values(version=len(MIGRATIONS)))
    return len(MIGRATIONS)


class Store:
    """The engine and a session factory; every method opens and closes its own session."""

    def __init__(self, url: str):
        url = normalise_url(url)
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {},
                                    pool_pre_ping=not sqlite)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.session: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    # ---------------------------------------------------------------- audit
    def audit(self, actor: str, action: str, target: str = "", detail: str = "") -> None:
        # Clipped to the columns: PostgreSQL refuses an over-long value (SQLite kept it), and a
        # long bundle path must not turn an audit line into a failed request.
        with self.session.begin() as s:
            s.add(AuditRow(at=time.time(), actor=actor[:64], action=action[:64], target=target[:300],
                           detail=detail))

    def audit_log(self, limit: int = 100) -> list[AuditRow]:
        with self.session() as s:
            return list(s.scalars(select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)))

    def has_audit(self, action: str) -> bool:
        with self.session() as s:
            return s.scalar(select(AuditRow.id).where(AuditRow.action == action).limit(1)) is not None

    # ---------------------------------------------------------------- models
    def list_models(self) -> list[ModelRow]:
        with self.session() as s:
            return list(s.scalars(select(ModelRow).order_by(ModelRow.name, ModelRow.version)))

    def get_model(self, name: str, version: str | None = None) -> ModelRow | None:
        """One registered version; ``version`` None: the name's highest (natural order)."""
        with self.session() as s:
            if version is not None:
                return s.get(ModelRow, (name, version))
            rows = list(s.scalars(select(ModelRow).where(ModelRow.name == name)))
            return max(rows, key=lambda r: version_key(r.version), default=None)

    def add_model(self, name: str, version: str, path: str, **policy) -> ModelRow | None:
        """An admin's registration of ``name`` at ``version``; None when that version is registered."""
        try:
            return self.add_version(name, path, deployer=None, version=version, **policy)
        except DeployRefused:
            return None

    def add_version(self, name: str, path: str, *, deployer: str | None, version: str | None = None,
                    policy: str = "probs", top_k: int | None = None, decimals: int | None = None) -> ModelRow:
        """Register ``path`` as a version of ``name``, in one transaction that also checks the deployer.

        ``deployer`` is the deploying key's id, read here with the name: an admin key deploys under any
        name, another key under a name it owns or no one has claimed (it becomes the owner); None is the
        admin CLI. ``version`` None assigns the next one (above every version the name ever had), so two
        deploys never get the same one. The name's row is the lock (PostgreSQL: ``FOR UPDATE``; SQLite:
        the write lock); a first deploy racing another one's retries and then meets its owner.
        Raises :class:`DeployRefused` (``model_not_owned``, ``key_invalid``, ``model_exists``).
        """
        for attempt in range(3):
            try:
                with self.session.begin() as s:
                    return self._add_version(s, name, path, deployer, version, policy, top_k, decimals)
            except IntegrityError:
                if attempt == 2:
                    break
        raise DeployRefused("model_exists", f"model {name!r} version {version!r} is already registered")

    def deploy_refusal(self, name: str, deployer: str | None) -> DeployRefused | None:
        """Why ``deployer`` may not deploy a version of ``name`` now, or None: :meth:`add_version`'s check,
        read outside its transaction (a submission's early answer; the deploy checks again)."""
        with self.session() as s:
            return _refusal(s, name, deployer, time.time())[1]

    def next_version(self, name: str) -> str:
        """The version a deploy of ``name`` would be given now (another deploy may take it first)."""
        with self.session() as s:
            claim = s.get(ModelNameRow, name)
            taken = list(s.scalars(select(ModelRow.version).where(ModelRow.name == name)))
            return _next_version(taken, 0 if claim is None else claim.last_version)

    def _add_version(self, s: Session, name: str, path: str, deployer: str | None, version: str | None,
                     policy: str, top_k: int | None, decimals: int | None) -> ModelRow:
        now = time.time()
        if s.get_bind().dialect.name == "sqlite":
            s.connection().exec_driver_sql("BEGIN IMMEDIATE")  # the write lock before the first read
        claim, refusal = _refusal(s, name, deployer, now, lock=True)
        if refusal is not None:
            raise refusal
        if claim is None:
            claim = ModelNameRow(name=name, owner=deployer, last_version=0, created_at=now)
            s.add(claim)
            s.flush()  # a concurrent first deploy of the name fails here, and the caller retries
        taken = list(s.scalars(select(ModelRow.version).where(ModelRow.name == name)))
        if version is None:
            version = _next_version(taken, claim.last_version)
        elif version in taken:
            raise DeployRefused("model_exists", f"model {name!r} version {version!r} is already registered")
        if version.isdigit():
            claim.last_version = max(claim.last_version, int(version))
        row = ModelRow(name=name, version=version, path=path, added_at=now, policy=policy, top_k=top_k,
                       decimals=decimals)
        s.add(row)
        return row

    def remove_model(self, name: str, version: str | None = None) -> list[ModelRow]:
        with self.session.begin() as s:
            q = select(ModelRow).where(ModelRow.name == name)
            if version is not None:
                q = q.where(ModelRow.version == version)
            rows = list(s.scalars(q))
            for r in rows:
                s.delete(r)
            return rows

    # ---------------------------------------------------------------- keys
    def add_key(self, row: ApiKeyRow) -> None:
        with self.session.begin() as s:
            s.add(row)

    def get_key(self, key_id: str) -> ApiKeyRow | None:
        with self.session() as s:
            return s.get(ApiKeyRow, key_id)

    def list_keys(self) -> list[ApiKeyRow]:
        with self.session() as s:
            return list(s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))

    def revoke_key(self, key_id: str) -> ApiKeyRow | None:
        with self.session.begin() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is not None and row.revoked_at is None:
                row.revoked_at = time.time()
            return row

    def charge(self, key_id: str, samples: int, now: float) -> tuple[int, int] | None:
        """Count ``samples`` against a key's quota, or nothing: one conditional UPDATE.

        The row is the counter every request and server process shares, so the check and the
        increment are one statement: the quota condition, the window rollover (a row whose window
        began before the current one restarts at ``samples``; a lagging clock never restarts a
        newer one), revocation and expiry. Returns (used, window start) after the charge, or None
        when refused: an unknown, revoked or expired key, or samples that do not fit the quota.
        """
        with self.engine.begin() as conn:
            params = {"key_id": key_id, "samples": samples, "now": now, "now_s": int(now)}
            row = conn.execute(_CHARGE, params).first()
        return None if row is None else (row.used, row.window_start)

    def record_usage(self, key_id: str, model: str, kind: str, day: str, requests: int, samples: int) -> None:
        pk = {"key_id": key_id, "model": model, "kind": kind, "day": day}
        for _ in range(2):  # a concurrent first insert by another process: retry as an update
            try:
                with self.session.begin() as s:
                    row = s.get(UsageRow, pk, with_for_update=True)
                    if row is None:
                        s.add(UsageRow(**pk, requests=requests, samples=samples))
                    else:
                        row.requests += requests
                        row.samples += samples
                return
            except IntegrityError:
                continue

    def usage(self, key_id: str | None = None) -> list[UsageRow]:
        with self.session() as s:
            q = select(UsageRow)
            if key_id is not None:
                q = q.where(UsageRow.key_id == key_id)
            return list(s.scalars(q))

    # ---------------------------------------------------------------- files
    def add_file(self, row: FileRow) -> None:
        with self.session.begin() as s:
            s.add(row)

    def file_bytes(self, owner: str) -> int:
        """The bytes of every file ``owner`` keeps (its storage cap counts them)."""
        with self.session() as s:
            return int(s.scalar(select(func.coalesce(func.sum(FileRow.size), 0)).where(FileRow.owner == owner)))

    def get_file(self, file_id: str) -> FileRow | None:
        with self.session() as s:
            return s.get(FileRow, file_id)

    def list_files(self, owner: str | None = None, *, shared: bool = False, limit: int = 1000) -> list[FileRow]:
        """Newest first: ``owner``'s files (with ``shared``, and every shared file), or all when owner is None."""
        with self.session() as s:
            q = select(FileRow)
            if owner is not None:
                q = q.where((FileRow.owner == owner) | FileRow.shared) if shared else q.where(FileRow.owner == owner)
            return list(s.scalars(q.order_by(FileRow.created_at.desc(), FileRow.id).limit(limit)))

    def delete_file(self, file_id: str) -> FileRow | None:
        """The row removed, or None when there was none."""
        with self.session.begin() as s:
            row = s.get(FileRow, file_id)
            if row is not None:
                s.delete(row)
            return row


def _refusal(s: Session, name: str, deployer: str | None, now: float,
             lock: bool = False) -> tuple[ModelNameRow | None, DeployRefused | None]:
    """The name's row (locked with ``lock``) and why ``deployer`` may not add a version to it, if it may not:
    the deployer's key as the store has it now (revoked, expired, admin or not), and :func:`may_deploy`."""
    admin = deployer is None
    if deployer is not None:
        key = s.get(ApiKeyRow, deployer)
        if key is None or key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
            return None, DeployRefused("key_invalid", "the deploying API key is revoked, expired or unknown")
        admin = "admin" in key.scopes.split(",")
    q = select(ModelNameRow).where(ModelNameRow.name == name)
    claim = s.scalars(q.with_for_update() if lock else q).first()
    if not may_deploy(claim is not None, None if claim is None else claim.owner, deployer, admin):
        return claim, DeployRefused("model_not_owned", f"model {name!r} belongs to another key: only its owner "
                                    "or an admin deploys versions of it")
    return claim, None


def _next_version(taken: list[str], last: int) -> str:
    """The version after every one a name has (``taken``) or had (``last``, the highest number)."""
    numeric = [int(v) for v in taken if v.isdigit()]
    others = [v for v in taken if not v.isdigit()]
    if not numeric and not last and others:
        return f"{max(others, key=version_key)}.1"
    return str(max([*numeric, last]) + 1)


def _charge_statement():
    """:meth:`Store.charge`'s UPDATE, built once (building it per request cost more than running it)."""
    k = ApiKeyRow.__table__.c
    now, now_s = bindparam("now", type_=Float), bindparam("now_s", type_=BigInteger)  # now_s: int(now)
    samples = bindparam("samples", type_=BigInteger)
    current = now_s - now_s % k.quota_window_s  # the current window's start; NULL for a lifetime quota
    rolled = and_(k.quota_window_s.is_not(None), k.window_start < current)
    used = case((rolled, samples), else_=k.used + samples)
    return (update(ApiKeyRow.__table__)
            .where(k.id == bindparam("key_id"), k.revoked_at.is_(None),
                   or_(k.expires_at.is_(None), k.expires_at > now), or_(k.quota.is_(None), used <= k.quota))
            .values(used=used, window_start=case((rolled, current), else_=k.window_start))
            .returning(k.used, k.window_start))


_CHARGE = _charge_statement()


def normalise_url(url: str) -> str:
    """``postgresql://`` (and ``postgres://``) mean psycopg 3, the driver the project pins;
    SQLAlchemy alone would pick psycopg2, which is not installed."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
        return u.render_as_string(hide_password=False)
    return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    # WAL lets readers run beside the one writer (the CLI beside a running server). Turning a
    # fresh file to WAL needs it to itself, and SQLite answers "locked" at once rather than
    # waiting in its busy handler: six processes starting together on a new data dir hit that.
    deadline = time.monotonic() + 30.0
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
