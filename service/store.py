"""The SQL store: API keys, hosted models, usage, the audit log, jobs and uploaded files.

SQLAlchemy 2 with portable SQL only, so the same code runs on SQLite (the default, a file
in the data dir) and on PostgreSQL (``SDB_DATABASE_URL``). The tables and the migrations that
create them at start are in :mod:`service.store_schema`; this module is what reads and writes them.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

from .store_schema import (
    JOB_DONE,
    MIGRATIONS,
    ApiKeyRow,
    AuditRow,
    Base,
    FileReservationRow,
    FileRow,
    JobRow,
    ModelNameRow,
    ModelRow,
    SchemaTooNew,
    SchemaVersion,
    SecretCheckRow,
    UsageRow,
    migrate,
)

log = logging.getLogger("sdb.service")

__all__ = ["JOB_DONE", "MIGRATIONS", "MOVED", "READ_ONLY", "STORE_FULL", "ApiKeyRow", "AsJson", "AuditRow", "Base",
           "DeployRefused", "FileReservationRow", "FileRow", "JobRow", "ModelNameRow", "ModelRow", "SchemaVersion",
           "Store", "StoreFull", "StoreUnavailable", "UsageRow", "db_now", "is_full", "is_moved", "is_read_only",
           "may_deploy", "migrate", "newest_first", "normalise_url", "open_store", "version_key"]

# An upload's or a deploy's reservation is renewed every RESERVATION_RENEW_S while its process holds it
# (Store._renew_reservations): one not renewed for RESERVATION_TTL_S was left by a process that died mid-check. A
# fixed 6 h left a server killed mid-upload holding its key's bytes that long after a restart (413, with no file to
# delete). A check that never ends holds its bytes RESERVATION_MAX_S at most.
RESERVATION_TTL_S = 120.0
RESERVATION_RENEW_S = 20.0
RESERVATION_MAX_S = 6 * 3600.0



def lock_owner(s: Session, owner: str) -> None:
    """Hold ``owner``'s write lock for the rest of the transaction ``s`` (PostgreSQL: its key row ``FOR UPDATE``;
    SQLite: the database's write lock), so that what the owner has is read and added to by one process at a time:
    a cap checked this way is exact under concurrent requests, in any process."""
    if s.get_bind().dialect.name == "sqlite":
        s.connection().exec_driver_sql("BEGIN IMMEDIATE")
    else:
        s.execute(select(ApiKeyRow.id).where(ApiKeyRow.id == owner).with_for_update())


def _kept_by(owner: str):
    """The bytes ``owner`` keeps, as one SQL expression: its files' and the copies of the model versions it
    deployed (a deploy key filled the disk with versions while its files were capped)."""
    files = select(func.coalesce(func.sum(FileRow.size), 0)).where(FileRow.owner == owner).scalar_subquery()
    models = select(func.coalesce(func.sum(ModelRow.bytes), 0)).where(ModelRow.deployer == owner).scalar_subquery()
    return files + models


class _DbNow(FunctionElement):
    type = Float()
    inherit_cache = True


def db_now() -> _DbNow:
    """The database's clock, in seconds since the epoch, as a SQL expression: one clock for every host on the store
    (on SQLite, the one host's own). Times that other hosts judge (a job's heartbeat, an upload's
    reservation) are stamped and compared with it: hosts whose clocks differed took each other's live ones for
    dead ones'."""
    return _DbNow()


@compiles(_DbNow, "postgresql")
def _postgresql_now(element, compiler, **kw) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"  # not now(): the transaction's start


@compiles(_DbNow, "sqlite")
def _sqlite_now(element, compiler, **kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"  # the Julian day of 1970-01-01, in seconds (ms precision)


class AsJson(FunctionElement):
    """A text column of JSON read as JSON, so that ``AsJson(col)[("a", "b")].as_string()`` is its ``a.b`` in SQL
    on either store: PostgreSQL casts the text (to ``json``, not ``jsonb``: jsonb refuses a ``\\u0000`` a string
    may hold), SQLite's JSON functions read it as it is (a CAST to JSON there made a number of it)."""

    type = JSON()
    inherit_cache = True


@compiles(AsJson, "postgresql")
def _postgresql_json(element, compiler, **kw) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS JSON)"


@compiles(AsJson, "sqlite")
def _sqlite_json(element, compiler, **kw) -> str:
    return compiler.process(element.clauses, **kw)


def newest_first(q, row, before: tuple[float, str] | None, limit: int):
    """``q`` as one page of a list, newest first (``row``'s ``created_at``, ties by ``id``): its first ``limit``
    rows after ``before``, the (created_at, id) of the last row of the page before (None: from the newest). A page
    goes on from a row's place, not from a count: rows added or deleted meanwhile move no row into the next page
    twice, nor past it."""
    if before is not None:
        at, last = before
        q = q.where(or_(row.created_at < at, and_(row.created_at == at, row.id > last)))
    return q.order_by(row.created_at.desc(), row.id).limit(limit)


class StoreUnavailable(ValueError):
    """The store cannot be opened: a bad URL, a host that does not answer, a file that is not a database."""


READ_ONLY = ("the server's store is read-only: this process cannot write its SQLite file (or the -wal and -shm files "
             "beside it); fix their owner and mode (or the mount), and writes resume without a restart")


def is_read_only(e: BaseException) -> bool:
    """Whether a store error (SQLAlchemy's or the driver's) is SQLite's SQLITE_READONLY: a file this process cannot
    write. Not its DBMOVED variant, a file deleted or replaced under the process (:meth:`Store.ping` says so)."""
    cause = getattr(e, "orig", None) or e
    if not isinstance(cause, sqlite3.OperationalError):
        return False
    code = getattr(cause, "sqlite_errorcode", 0)  # one SQLite raised (ours, _FileMoved, has no code)
    return code & 0xFF == sqlite3.SQLITE_READONLY and code != sqlite3.SQLITE_READONLY_DBMOVED


_PROBE_CHARS = 16384  # more than a page of either store (SQLite's 4 KiB by default, PostgreSQL's 8 KiB)
STORE_FULL = ("the server's disk is full: its store could not write what this request changes (nothing of it was "
              "kept); try again once an administrator has freed space on the store's disk")
_DISK_FULL_SQLSTATE = "53100"  # PostgreSQL's disk_full


def is_full(e: BaseException) -> bool:
    """Whether a store error (SQLAlchemy's or the driver's) says the store's disk is full: SQLite's SQLITE_FULL (the
    disk, or the database's page limit), PostgreSQL's disk_full."""
    cause = getattr(e, "orig", None) or e
    if isinstance(cause, StoreFull):  # ping()'s report of it
        return True
    if isinstance(cause, sqlite3.OperationalError):  # one SQLite raised (ours, _FileMoved, has no code)
        return getattr(cause, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL
    return getattr(cause, "sqlstate", None) == _DISK_FULL_SQLSTATE


# A read-only file (a restore with the wrong owner, a read-only mount) fails every heartbeat while reads pass:
# an outage for the workers, as a file that does not open is
_SQLITE_UNREACHABLE = (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY)
# PostgreSQL's SQLSTATEs of a server that takes no statement now: its connection (class 08), its resources (53: disk,
# memory, connections), its system (58: I/O) and a shutdown or a start (57P01-57P03). Not a deadlock or a
# serialization failure (40), a lock or statement timeout (55P03, 57014), nor any other SQL error: those are one
# statement's, among others that pass.
_PG_UNREACHABLE_CLASSES = ("08", "53", "58")
_PG_UNREACHABLE = ("57P01", "57P02", "57P03", "25006")  # 25006: a write sent to a replica a failover demoted


OUTAGE_GAP_S = 30.0  # failures further apart than this, with no write between, are two outages


def _unreachable(context) -> bool:
    """Whether a store error (SQLAlchemy's ``handle_error`` context) says this process could not reach the store, or
    write to it at all: a connection lost (``is_disconnect``) or not made (no ``connection``), SQLite's
    CANTOPEN, IOERR, FULL or READONLY, PostgreSQL's :data:`_PG_UNREACHABLE`. Not "database is locked", a failing statement,
    a deadlock or a timeout: the store answers then, and a worker's heartbeat passes (counted, contention more often
    than every SDB_JOB_STALE_S held the reaping of a dead worker's job for ever)."""
    if context.is_disconnect or context.connection is None:
        return True
    cause = context.original_exception
    if isinstance(cause, sqlite3.Error):
        return getattr(cause, "sqlite_errorcode", 0) & 0xFF in _SQLITE_UNREACHABLE
    sqlstate = getattr(cause, "sqlstate", None) or ""
    return sqlstate[:2] in _PG_UNREACHABLE_CLASSES or sqlstate in _PG_UNREACHABLE


MOVED = ("the server's store file was deleted or replaced while the server ran: nothing of this request was kept; an "
         "administrator must restart the server (or move the file, or its data dir, back where it was)")


class _FileMoved(sqlite3.OperationalError):
    """The SQLite file a process opened is no longer at its path (deleted, replaced, its folder renamed)."""


def is_moved(e: BaseException) -> bool:
    """Whether a store error is a write refused because the SQLite file was deleted or replaced under the process."""
    return isinstance(getattr(e, "orig", None) or e, _FileMoved)


def open_store(url: str) -> Store:
    """:class:`Store` for a command or a server about to start: any failure to open it is a
    :class:`StoreUnavailable` in one line naming the URL (never its password) and the driver's reason."""
    try:
        make_url(url)
    except SQLAlchemyError:
        raise StoreUnavailable("SDB_DATABASE_URL is not a database URL: it takes sqlite:///PATH or "
                               "postgresql://USER@HOST:PORT/DB") from None
    try:
        store = Store(url)
    except SchemaTooNew as e:
        raise StoreUnavailable(f"the store {shown_url(url)}: {e}") from None
    except (SQLAlchemyError, ImportError) as e:
        raise StoreUnavailable(f"cannot open the store {shown_url(url)} (SDB_DATABASE_URL; unset: SQLite in "
                               f"SDB_DATA_DIR): {unreachable_reason(e)}") from None
    # A SQLite file corrupt past its header opened, then failed the server's start with a traceback: its pages are
    # checked first (quick_check reads each once: milliseconds for a store of keys, models and jobs)
    problem = None
    try:
        if store.session.kw["bind"].dialect.name == "sqlite":
            with store.session() as s:
                problem = s.connection().exec_driver_sql("PRAGMA quick_check(1)").scalar()
    except SQLAlchemyError as e:
        problem = unreachable_reason(e)
    if problem not in (None, "ok"):
        store.close()
        raise StoreUnavailable(f"the store {shown_url(url)} is corrupt ({' '.join(str(problem).split())[:200]}): "
                               "restore it from a "
                               "backup, or recover what it holds with sqlite3 FILE '.recover'")
    return store


def shown_url(url: str) -> str:
    """The store's URL as logs and errors show it: its password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def unreachable_reason(e: BaseException) -> str:
    """Why the store did not answer, in one line (the driver's first line, or the driver missing)."""
    cause = e.orig if isinstance(e, DBAPIError) and e.orig is not None else e
    if isinstance(cause, ImportError):
        return f"no driver for it is installed ({cause.name or cause}); SDB supports SQLite and PostgreSQL"
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(cause).__name__


class StoreFull(StoreUnavailable):
    """The store's disk was full at its last write (:func:`is_full`), and no write has passed since."""


class DeployRefused(Exception):
    """A version the store will not add (``code`` model_not_owned, key_invalid or model_exists), or a name whose
    claim it will not release (model_in_use)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# The owner of a name an admin released (Store.release_name): nobody, and the next key to deploy it claims it. Its
# row stays, so that a version number is never given twice under the name. No key id is empty.
RELEASED = ""


def may_deploy(claimed: bool, owner: str | None, deployer: str | None, admin: bool) -> bool:
    """The ownership rule: an admin deploys under any name, anyone under an unclaimed one, a key
    under a name it owns. ``owner`` None is an admin's name; ``deployer`` None is the admin CLI."""
    return admin or deployer is None or not claimed or owner == deployer


def version_key(v: str) -> tuple:
    """Natural order: "10" after "9", "1.10" after "1.9", "v10" after "v2" (runs of digits are numbers wherever they
    are), and a release after its pre-releases ("1.0.0" after "1.0.0-rc1": a version's end ranks above more letters
    and below more numbers)."""
    runs = [r for part in re.split(r"[.\-_]", v) for r in re.split(r"(\d+)", part) if r]
    return (*((2, int(r), "") if r.isdigit() else (0, 0, r) for r in runs), _END)


_END = (1, 0, "")  # between a letter run (0) and a number (2)


class Store:
    """The engine and a session factory; every method opens and closes its own session."""

    def __init__(self, url: str):
        url = normalise_url(url)
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {},
                                    pool_pre_ping=not sqlite)
        self._generation = 0  # of the connections: one more each time they are all reopened (_reopen_when_read_only)
        self._writes_unproven = sqlite  # ping() tries a write until one passes, and again after a read-only error
        self._sqlite_file: tuple[str, tuple[int, int] | None] | None = None  # set once migrated, below
        self._full = False  # a write met a full disk, and none has passed since: ping() (readiness) says so
        self.failed_at: float | None = None  # when (monotonic) a store call of this process last failed to reach it
        # when (monotonic) the run of failures that failed_at ends began: a write commits between two runs, or
        # OUTAGE_GAP_S pass without a failure (a process that writes seldom)
        self.failing_since: float | None = None
        event.listen(self.engine, "handle_error", self._note_failure)
        event.listen(self.engine, "commit", self._before_commit)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "connect", self._stamp_generation)
            event.listen(self.engine, "checkin", self._close_if_older)
            event.listen(self.engine, "handle_error", self._reopen_when_read_only)
        self.session: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        migrate(self.engine)
        # A SQLite file deleted or replaced under a running server: its open connections go on with the old inode,
        # which no `sdb keys|models` command sees any more. Every commit (_before_commit) and ping() check it.
        database = self.engine.url.database if sqlite else None
        self._sqlite_file = (database, _file_id(database)) if database and database != ":memory:" else None
        self._held: dict[str, float] = {}  # this process's reservations: id -> when made (monotonic)
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._closed = threading.Event()

    def _reopen_when_read_only(self, context) -> None:
        """A SQLite file this process could not write when it opened it (a restore with the wrong owner or mode, a
        read-only mount): each connection opened then stays read-only, and shares with every other one of the
        process a read-only map of the -shm file, until the last of them closes; fixing the file changed nothing
        until a restart (every write a 503). On the first read-only error every connection is closed, the idle
        ones now and those in use when given back, so that the next write opens the file afresh."""
        if is_read_only(context.original_exception):
            self._generation += 1
            self._writes_unproven = True
            self.engine.dispose()

    def _note_failure(self, context) -> None:
        """Every store error of this process: the time of one that says the store could not be reached
        (:func:`_unreachable`: what the job reaper waits out, :meth:`service.jobs.queue.JobQueue.reap`), and a full
        disk (readiness)."""
        if _unreachable(context):
            now = time.monotonic()
            if self.failing_since is None or self.failed_at is None or now - self.failed_at > OUTAGE_GAP_S:
                self.failing_since = now
            self.failed_at = now
        if is_full(context.original_exception):
            self._full = True

    def _before_commit(self, conn) -> None:
        """Before each commit: a SQLite file deleted or replaced under this process refuses it (its rows went into a
        file no other process reads: a key created answered 201, and was unknown after a restart), and a write
        committed (SQLite's driver opens a transaction for writes only; every PostgreSQL commit counts) ends a full
        disk's report (a commit that fails for it reports it again)."""
        moved = self._moved()
        if moved is not None:
            raise OperationalError("COMMIT", None, _FileMoved(moved))
        if getattr(conn.connection.dbapi_connection, "in_transaction", True):  # a write: a run of failures is over
            self._full, self.failing_since = False, None

    def _moved(self) -> str | None:
        """Why this process's SQLite file is no longer the one it opened (one stat), or None."""
        if self._sqlite_file is None:
            return None
        path, opened = self._sqlite_file
        if _file_id(path) == opened:
            return None
        return f"the SQLite file {path} was deleted or replaced while this process had it open: restart it"

    def _stamp_generation(self, _dbapi_conn, record) -> None:
        record.info["generation"] = self._generation

    def _close_if_older(self, _dbapi_conn, record) -> None:
        if record.info.get("generation") != self._generation:
            record.invalidate()  # closed; reopened if its pool lends it again

    def close(self) -> None:
        self._closed.set()
        self.engine.dispose()

    def ping(self) -> None:
        """Raises when the store does not answer, or (SQLite) cannot be written (:func:`is_read_only`) or is no
        longer the file this process opened, or when its disk was full at the last write (:class:`StoreFull`, until
        a write passes: while it is, each ping tries one, :meth:`_write_needing_room`)."""
        with self.engine.connect() as conn:
            conn.execute(select(1))
            if self._writes_unproven:  # a write rolled back: a read-only file reads well, and failed every write
                conn.execute(update(SchemaVersion.__table__).values(version=SchemaVersion.version))
                conn.rollback()
                self._writes_unproven = False
        moved = self._moved()
        if moved is not None:
            raise StoreUnavailable(moved)
        if self._full:  # only a write ends the report, and a replica out of rotation gets none but this one
            self._write_needing_room()
        if self._full:  # another write met the full disk meanwhile
            raise StoreFull(STORE_FULL)

    def _write_needing_room(self) -> None:
        """Commit a write that needs room on the store's disk, changing nothing: an audit row larger than a page
        (:data:`_PROBE_CHARS`), added and deleted in one transaction. Its pages are allocated (SQLite grows the
        file or takes its free pages; PostgreSQL its table's) and written at the commit, so it fails as any write
        does while the disk is full (:func:`is_full`), and its commit ends the report (:meth:`_before_commit`).
        A no-op UPDATE would not do: it rewrites a page the file has, and passed on a full disk. No reader sees
        the row (on PostgreSQL it takes a number of the audit log's sequence: ids have gaps there anyway)."""
        with self.session.begin() as s:
            # random: PostgreSQL would compress a repeated character to a few bytes
            probe = AuditRow(at=time.time(), actor="server", action="store.room_probe",
                             detail=secrets.token_hex(_PROBE_CHARS // 2))
            s.add(probe)
            s.flush()
            s.delete(probe)

    # ---------------------------------------------------------------- audit
    def audit(self, actor: str, action: str, target: str = "", detail: str = "") -> None:
        """Record an action already done. Never raises: the action is committed before it (a job queued, a key
        made), and a 500 for the audit row (a full disk, a store gone for a moment) told the caller it had failed:
        a retry made a second job, a created key's secret was never shown. A row not written is logged instead."""
        # Clipped to the columns: PostgreSQL refuses an over-long value (SQLite kept it), and a
        # long bundle path must not turn an audit line into a failed request.
        try:
            with self.session.begin() as s:
                s.add(AuditRow(at=time.time(), actor=actor[:64], action=action[:64], target=target[:300],
                               detail=detail))
        except (SQLAlchemyError, OSError) as e:
            log.error("audit row not written (%s): %s %s %s %s", type(e).__name__, actor[:64], action[:64],
                      target[:300], detail[:300])

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

    def names_path(self, path: str) -> bool:
        """Whether a version is served from ``path`` (absolute, as :meth:`add_version` took it)."""
        with self.session() as s:
            return s.scalar(select(ModelRow.name).where(ModelRow.path == path).limit(1)) is not None

    def add_model(self, name: str, version: str, path: str, meta_sha256: str | None = None,
                  **policy) -> ModelRow | None:
        """An admin's registration of ``name`` at ``version``; None when that version is registered."""
        try:
            return self.add_version(name, path, deployer=None, version=version, meta_sha256=meta_sha256, **policy)
        except DeployRefused:
            return None

    def add_version(self, name: str, path: str, *, deployer: str | None, version: str | None = None,
                    policy: str = "probs", top_k: int | None = None, decimals: int | None = None,
                    job: tuple[str, str] | None = None, size: int = 0, reservation: str | None = None,
                    meta_sha256: str | None = None) -> ModelRow:
        """Register ``path`` (absolute) as a version of ``name``, in one transaction that also checks the deployer.

        ``deployer`` is the deploying key's id, read here with the name: an admin key deploys under any
        name, another key under a name it owns or no one has claimed (it becomes the owner); None is the
        admin CLI. ``version`` None assigns the next one (above every version the name ever had), so two
        deploys never get the same one; so does a number at or below the highest the name had (one given before,
        then removed, is never given again). The name's row is the lock (PostgreSQL: ``FOR UPDATE``; SQLite:
        the write lock); a first deploy racing another one's retries and then meets its owner.

        ``job`` (job id, worker): a job's deploy, which counts only while that worker still holds the job
        (running, not asked to cancel), read and marked in the same transaction: a worker that hung while the
        reaper requeued or failed its job deploys nothing when it comes back, and a job that deployed is never
        requeued (its record keeps what it served, whatever the worker does next).
        Raises :class:`DeployRefused` (``model_not_owned``, ``key_invalid``, ``model_exists``, ``job_lost``,
        ``job_cancelled``).

        ``size``: the copy's bytes, counted against ``deployer``'s storage cap from now on; ``reservation``: the
        bytes it held while the copy was made and checked (:meth:`reserve_file_bytes`), which become the version's.
        ``meta_sha256``: the digest of the bundle's meta.json, which every later load of the version must match.
        """
        for attempt in range(3):
            try:
                with self.session.begin() as s:
                    row = self._add_version(s, name, path, deployer, version, policy, top_k, decimals, job, size,
                                            meta_sha256)
                    if reservation is not None:
                        s.execute(delete(FileReservationRow).where(FileReservationRow.id == reservation))
                    return row
            except IntegrityError:
                if attempt == 2:
                    break
        raise DeployRefused("model_exists", f"model {name!r} version {version!r} is already registered")

    def deploy_refusal(self, name: str, deployer: str | None) -> DeployRefused | None:
        """Why ``deployer`` may not deploy a version of ``name`` now, or None: :meth:`add_version`'s check,
        read outside its transaction (a submission's early answer; the deploy checks again)."""
        with self.session() as s:
            return _refusal(s, name, deployer, time.time())[1]

    def model_owner(self, name: str) -> str | None:
        """The id of the key that owns the model name ``name`` (first deployed it), or None: unclaimed,
        or an admin's."""
        with self.session() as s:
            claim = s.get(ModelNameRow, name)
            return None if claim is None or claim.owner == RELEASED else claim.owner

    def release_name(self, name: str, to: str | None = None) -> str | None:
        """An admin's release of the claim on ``name``: with ``to`` (a key id) the name becomes that key's;
        without, the next key to deploy it claims it. Returns the owner it had (None: an admin's or released);
        KeyError when no one ever deployed ``name``; :class:`DeployRefused` ``model_in_use`` while a version of it
        is registered (a key's versions served under another key's name, or an admin's, would change hands with it:
        they are removed first). One transaction with the name's row locked, as a deploy holds it."""
        with self.session.begin() as s:
            if s.get_bind().dialect.name == "sqlite":
                s.connection().exec_driver_sql("BEGIN IMMEDIATE")
            claim = s.scalars(select(ModelNameRow).where(ModelNameRow.name == name).with_for_update()).first()
            if claim is None:
                raise KeyError(name)
            served = sorted(s.scalars(select(ModelRow.version).where(ModelRow.name == name)), key=version_key)
            if served:
                raise DeployRefused("model_in_use", f"model {name!r} still serves version(s) {', '.join(served[:10])}: "
                                    f"remove them first (DELETE /v1/models/{name}, or sdb models remove {name})")
            previous = None if claim.owner == RELEASED else claim.owner
            claim.owner = RELEASED if to is None else to
            return previous

    def tenant_owned(self, name: str) -> bool:
        """Whether the model name ``name`` belongs to a key that is not an admin's (a tenant's graph)."""
        with self.session() as s:
            claim = s.get(ModelNameRow, name)
            if claim is None or claim.owner is None:
                return False
            key = s.get(ApiKeyRow, claim.owner)
            return key is None or "admin" not in key.scopes.split(",")

    def next_version(self, name: str) -> str:
        """The version a deploy of ``name`` would be given now (another deploy may take it first)."""
        with self.session() as s:
            claim = s.get(ModelNameRow, name)
            taken = list(s.scalars(select(ModelRow.version).where(ModelRow.name == name)))
            return _next_version(taken, 0 if claim is None else claim.last_version)

    def _add_version(self, s: Session, name: str, path: str, deployer: str | None, version: str | None,
                     policy: str, top_k: int | None, decimals: int | None,
                     job: tuple[str, str] | None = None, size: int = 0,
                     meta_sha256: str | None = None) -> ModelRow:
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
        elif claim.owner == RELEASED:  # an admin released it: this deploy claims it, its version numbers going on
            claim.owner = deployer
        taken = list(s.scalars(select(ModelRow.version).where(ModelRow.name == name)))
        if version is None:
            version = _next_version(taken, claim.last_version)
        elif version in taken:
            raise DeployRefused("model_exists", f"model {name!r} version {version!r} is already registered")
        elif version.isdigit() and int(version) <= claim.last_version:
            # a removed version's number is never given again (a client or a job pinned to it would read another
            # network under it): the bundle is registered under the next one, as a deploy is
            version = _next_version(taken, claim.last_version)
        if job is not None:
            _hold_job_for_deploy(s, *job, name, version)
        if version.isdigit():
            claim.last_version = max(claim.last_version, int(version))
        row = ModelRow(name=name, version=version, path=path, added_at=now, policy=policy, top_k=top_k,
                       decimals=decimals, deployer=deployer, bytes=size, meta_sha256=meta_sha256)
        s.add(row)
        return row

    def record_meta_sha256(self, name: str, version: str, added_at: float, digest: str) -> str | None:
        """The meta.json digest of a version registered before digests were (NULL): ``digest`` recorded, the first
        load's; returns the one the version has now (another process's, when it recorded one first), or None when
        the version as added at ``added_at`` is gone."""
        with self.session.begin() as s:
            s.execute(update(ModelRow).where(ModelRow.name == name, ModelRow.version == version,
                                             ModelRow.added_at == added_at, ModelRow.meta_sha256.is_(None))
                      .values(meta_sha256=digest))
            return s.scalar(select(ModelRow.meta_sha256).where(ModelRow.name == name, ModelRow.version == version,
                                                               ModelRow.added_at == added_at))

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
        """Every key, oldest first (the admin CLI, every key's quota); ``GET /v1/keys`` pages them
        (:meth:`page_of_keys`)."""
        with self.session() as s:
            return list(s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))

    def page_of_keys(self, *, before: tuple[float, str] | None = None, limit: int = 1000) -> list[ApiKeyRow]:
        """Keys newest first, a page at a time (:func:`newest_first`)."""
        with self.session() as s:
            return list(s.scalars(newest_first(select(ApiKeyRow), ApiKeyRow, before, limit)))

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

    def refund(self, key_id: str, samples: int, window_start: int) -> bool:
        """Give back ``samples`` a :meth:`charge` counted in the window starting ``window_start`` (its answer), for a
        call that failed after it; nothing once that window has rolled over (its count is gone). One statement."""
        with self.engine.begin() as conn:
            done = conn.execute(update(ApiKeyRow.__table__).where(
                _KEYS.id == key_id, _KEYS.window_start == window_start, _KEYS.used >= samples)
                .values(used=_KEYS.used - samples))
        return done.rowcount == 1

    def key_stands(self, key_id: str, now: float) -> bool:
        """Whether a key is known, not revoked and not expired at ``now``: one read (no write lock)."""
        with self.engine.connect() as conn:
            return conn.execute(_STANDS, {"key_id": key_id, "now": now}).first() is not None

    def add_used(self, counts: dict[str, int]) -> None:
        """Add keyed samples to keys' ``used`` (keys without a quota: :meth:`Keyring.charge` counts them behind)."""
        if not counts:
            return
        with self.engine.begin() as conn:
            for key_id, n in counts.items():
                conn.execute(update(ApiKeyRow.__table__).where(_KEYS.id == key_id).values(used=_KEYS.used + n))

    def charge_job(self, key_id: str, samples: int, now: float, job_id: str, worker: str) -> str | None:
        """A job's charge of ``samples`` keyed samples, once per job, in one transaction with the job's row:
        ``"charged"``; ``"already"`` when an earlier attempt of the job charged them (a requeue after its worker
        shut down: nothing counted again); ``"lost"`` when the job is not ``worker``'s running one (nothing
        counted); None when refused as :meth:`charge` refuses. A charged job is marked as training, so the
        reaper fails rather than requeues it when its worker is lost."""
        with self.session.begin() as s:
            if s.get_bind().dialect.name == "sqlite":
                s.connection().exec_driver_sql("BEGIN IMMEDIATE")  # the write lock before the first read
            job = s.execute(select(JobRow.charged_samples).where(
                JobRow.id == job_id, JobRow.worker == worker, JobRow.status == "running").with_for_update()).first()
            if job is None:
                return "lost"
            if (job.charged_samples or 0) >= samples:
                return "already"
            params = {"key_id": key_id, "samples": samples - (job.charged_samples or 0), "now": now,
                      "now_s": int(now)}
            if s.execute(_CHARGE, params).first() is None:
                return None
            s.execute(update(JobRow).where(JobRow.id == job_id).values(
                charged_samples=samples, training_at=func.coalesce(JobRow.training_at, db_now())))
            return "charged"

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

    def usage(self, key_id: str | None = None, *, model: str | None = None, since: str | None = None) -> list:
        """Usage rows (day, model, kind, key_id, requests, samples), in that order: of one key, one model, and from
        the UTC day ``since`` on, where given. Filtered and ordered by the database, and read as plain rows: the
        whole table read as objects and filtered here took seconds at 360,000 rows, and held the event loop's GIL."""
        u = UsageRow
        q = select(u.day, u.model, u.kind, u.key_id, u.requests, u.samples)
        if key_id is not None:
            q = q.where(u.key_id == key_id)
        if model is not None:
            q = q.where(u.model == model)
        if since is not None:
            q = q.where(u.day >= since)
        with self.session() as s:
            return list(s.execute(q.order_by(u.day, u.model, u.kind, u.key_id)))

    def get_keys(self, key_ids) -> list[ApiKeyRow]:
        """The keys of ``key_ids`` that exist, oldest first."""
        ids = sorted(set(key_ids))
        found: list[ApiKeyRow] = []
        with self.session() as s:
            for i in range(0, len(ids), 500):  # a bound on a statement's parameters
                found += s.scalars(select(ApiKeyRow).where(ApiKeyRow.id.in_(ids[i:i + 500])))
        return sorted(found, key=lambda k: k.created_at)

    # ---------------------------------------------------------------- secrets
    def recorded_secret(self, name: str) -> str | None:
        """The fingerprint recorded for the secret ``name``, or the data dir's mark for "data_dir" (None: none yet)."""
        with self.session() as s:
            row = s.get(SecretCheckRow, name)
            return None if row is None else row.fingerprint

    def secret_matches(self, name: str, fingerprint: str) -> bool:
        """Whether ``fingerprint`` is the one the store recorded for ``name`` (a secret, or "data_dir": its mark); the
        first one given is recorded (two processes starting at once: one records, the other compares with it)."""
        for _ in range(2):
            with self.session() as s:
                row = s.get(SecretCheckRow, name)
                if row is not None:
                    return hmac.compare_digest(row.fingerprint, fingerprint)
            try:
                with self.session.begin() as s:
                    s.add(SecretCheckRow(name=name, fingerprint=fingerprint))
                return True
            except IntegrityError:
                continue
        return False

    # ---------------------------------------------------------------- files
    def add_file(self, row: FileRow, *reservations: str) -> None:
        """Record an uploaded file; the bytes it had reserved (:meth:`reserve_file_bytes`) become the file's."""
        with self.session.begin() as s:
            s.add(row)
            if reservations:
                s.execute(delete(FileReservationRow).where(FileReservationRow.id.in_(reservations)))

    def file_bytes(self, owner: str) -> int:
        """The bytes of every file ``owner`` keeps and of every model version it deployed (its storage cap counts
        them)."""
        with self.session() as s:
            return int(s.scalar(select(_kept_by(owner))))

    def reserve_file_bytes(self, owner: str, size: int, cap: int) -> tuple[str | None, int, int]:
        """Hold ``size`` bytes of ``owner``'s file storage for an upload being checked: (reservation id, bytes the
        owner keeps, bytes its other reservations hold), the id None when they would take ``owner`` past ``cap``.
        The reservation is renewed while this process lives (:meth:`_renew_reservations`), on the database's clock
        (:func:`db_now`): a host whose clock ran ahead took another's live one for a dead one's.

        One transaction holding the owner's write lock (PostgreSQL: its key row ``FOR UPDATE``; SQLite: the
        database's write lock) reads what the owner keeps and holds, and adds the reservation: concurrent
        uploads of one key, in any process, are counted one after another and never pass the cap together.
        """
        with self.session.begin() as s:
            lock_owner(s, owner)
            r = FileReservationRow
            s.execute(delete(r).where(r.owner == owner, r.created_at < db_now() - RESERVATION_TTL_S))
            held = select(func.coalesce(func.sum(r.bytes), 0)).where(r.owner == owner).scalar_subquery()
            kept, held = s.execute(select(_kept_by(owner), held)).one()  # one statement: a file (or version) and
            # the reservation it was, never both
            kept, held = int(kept), int(held)
            if kept + held + size > cap:
                return None, kept, held
            row = r(id=secrets.token_hex(12), owner=owner, bytes=size, created_at=db_now())
            s.add(row)
        self._keep_renewed(row.id)
        return row.id, kept, held

    def _keep_renewed(self, reservation: str) -> None:
        with self._held_lock:
            self._held[reservation] = time.monotonic()
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_reservations, name="sdb-reservations",
                                                 daemon=True)
                self._renewer.start()

    def _renew_reservations(self) -> None:
        """A thread while this process holds reservations: every RESERVATION_RENEW_S they are stamped anew, so that
        no process takes them for a dead one's; those no longer in the store (a file or a version now, or given
        back) are forgotten, and the thread ends with the last."""
        while not self._closed.wait(RESERVATION_RENEW_S):
            with self._held_lock:
                too_old = time.monotonic() - RESERVATION_MAX_S
                for rid in [rid for rid, made in self._held.items() if made < too_old]:
                    del self._held[rid]  # a check that never ends: its bytes go as a dead process's
                ids = list(self._held)
                if not ids:
                    self._renewer = None
                    return
            r = FileReservationRow
            try:
                with self.session.begin() as s:
                    s.execute(update(r).where(r.id.in_(ids)).values(created_at=db_now()))
                    kept = set(s.scalars(select(r.id).where(r.id.in_(ids))))
            except Exception as e:  # noqa: BLE001 - the store away a moment: the next round renews them (a thread
                # that ended here left the reservations of every later check to lapse)
                log.warning("upload reservations not renewed (%s): %s", type(e).__name__, unreachable_reason(e))
                continue
            with self._held_lock:
                for rid in ids:
                    if rid not in kept:
                        self._held.pop(rid, None)

    def release_file_bytes(self, reservation: str) -> None:
        """Give back the bytes of an upload that failed."""
        with self._held_lock:  # renewed no more: if the store does not take the delete, they lapse (RESERVATION_TTL_S)
            self._held.pop(reservation, None)
        with self.session.begin() as s:
            s.execute(delete(FileReservationRow).where(FileReservationRow.id == reservation))

    def get_file(self, file_id: str) -> FileRow | None:
        with self.session() as s:
            return s.get(FileRow, file_id)

    def list_files(self, owner: str | None = None, *, shared: bool = False, before: tuple[float, str] | None = None,
                   limit: int = 1000) -> list[FileRow]:
        """Newest first: ``owner``'s files (with ``shared``, and every shared file), or all when owner is None; a
        page at a time (:func:`newest_first`)."""
        with self.session() as s:
            q = select(FileRow)
            if owner is not None:
                q = q.where((FileRow.owner == owner) | FileRow.shared) if shared else q.where(FileRow.owner == owner)
            return list(s.scalars(newest_first(q, FileRow, before, limit)))

    def file_ids(self) -> set[str]:
        """The id of every file (the start-up sweep: :func:`service.copies.sweep_leftovers`)."""
        with self.session() as s:
            return set(s.scalars(select(FileRow.id)))

    def job_statuses(self) -> dict[str, str]:
        """Every job's status, by id (the start-up sweep: :func:`service.copies.sweep_leftovers`)."""
        with self.session() as s:
            return {row.id: row.status for row in s.execute(select(JobRow.id, JobRow.status))}

    def delete_file(self, file_id: str) -> FileRow | None:
        """The row removed, or None when there was none."""
        with self.session.begin() as s:
            row = s.get(FileRow, file_id)
            if row is not None:
                s.delete(row)
            return row

    # ---------------------------------------------------------------- jobs


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
    claimed = claim is not None and claim.owner != RELEASED
    if not may_deploy(claimed, None if claim is None else claim.owner, deployer, admin):
        return claim, DeployRefused("model_not_owned", f"model {name!r} belongs to another key: only its owner "
                                    "or an admin deploys versions of it")
    return claim, None


def _hold_job_for_deploy(s: Session, job_id: str, worker: str, name: str, version: str) -> None:
    """In a deploy's transaction: the job must still be ``worker``'s, running and not asked to cancel
    (:class:`DeployRefused` ``job_lost`` / ``job_cancelled`` otherwise). Its row is marked as one heartbeat
    (the reaper, waiting on the row, finds it fresh), as past training (never requeued: a second attempt
    would deploy again) and with what it served (the record says so if the worker dies before it finishes).
    The heartbeat is the database's clock, as every heartbeat (:func:`db_now`)."""
    served = json.dumps({"model": name, "version": version, "deployed": True})
    held = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.worker == worker, JobRow.status == "running",
                                          JobRow.cancel_requested.is_(False))
                     .values(heartbeat_at=db_now(), training_at=func.coalesce(JobRow.training_at, db_now()),
                             result=served, message=f"deployed {name} version {version}")).rowcount
    if held == 1:
        return
    row = s.get(JobRow, job_id)
    if row is not None and row.status == "running" and row.worker == worker:
        raise DeployRefused("job_cancelled", "cancelled before deploying: a cancel was requested")
    raise DeployRefused("job_lost", f"job {job_id} is no longer this worker's ({worker}): it was reaped, requeued "
                        "or ended meanwhile, so this attempt deploys nothing")


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
_KEYS = ApiKeyRow.__table__.c
_STANDS = select(_KEYS.id).where(_KEYS.id == bindparam("key_id"), _KEYS.revoked_at.is_(None),  # Store.key_stands
                                 or_(_KEYS.expires_at.is_(None), _KEYS.expires_at > bindparam("now", type_=Float)))


def normalise_url(url: str) -> str:
    """``postgresql://`` (and ``postgres://``) mean psycopg 3, the driver the project pins;
    SQLAlchemy alone would pick psycopg2, which is not installed."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
        return u.render_as_string(hide_password=False)
    return url


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
