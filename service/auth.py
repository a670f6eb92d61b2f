"""API keys: ``sdb_<id>_<secret>``, 256 random bits, stored only as HMAC-SHA256 with a pepper.

The pepper is a server secret in the data dir (not in the database), so a leaked
database alone cannot be used to test guesses. Keys carry scopes, a model allowlist,
an expiry, a revocation time and a sample quota (lifetime, or per window).

The :class:`Keyring` caches key rows for ``auth_cache_s`` (a revocation through this server
drops the cache at once; one made by another process takes effect within that time, and at
once on the keyed path, whose charge reads the row). The quota is charged in the store, one
conditional UPDATE per keyed request, so it is exact across requests and server processes;
the per-model usage statistics are kept in memory and written behind every ``usage_flush_s``.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from .errors import ApiError
from .store import ApiKeyRow, Store

SCOPES = ("predict", "distill", "jobs", "deploy", "admin")  # deploy: upload bundles to serve
# A scope also grants the ones listed here: a distiller may call predict too.
IMPLIED = {"admin": set(SCOPES), "distill": {"predict"}}
KEY_RE = re.compile(r"sdb_([0-9a-f]{12})_([0-9a-f]{64})")
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class ApiKey:
    """What a request authenticated as: the row's policy, never its secret or hash."""

    id: str
    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None
    quota: int | None
    quota_window_s: int | None
    expires_at: float | None
    revoked_at: float | None
    created_at: float

    @classmethod
    def from_row(cls, row: ApiKeyRow) -> ApiKey:
        return cls(id=row.id, name=row.name, scopes=frozenset(filter(None, row.scopes.split(","))),
                   models=None if row.models is None else frozenset(filter(None, row.models.split(","))),
                   quota=row.quota, quota_window_s=row.quota_window_s, expires_at=row.expires_at,
                   revoked_at=row.revoked_at, created_at=row.created_at)

    def grants(self, scope: str) -> bool:
        return scope in self.scopes or any(scope in IMPLIED.get(s, ()) for s in self.scopes)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict:
        return {"id": self.id, "name": self.name, "scopes": sorted(self.scopes),
                "models": None if self.models is None else sorted(self.models), "quota": self.quota,
                "quota_window_s": self.quota_window_s, "created_at": self.created_at,
                "expires_at": self.expires_at, "revoked_at": self.revoked_at}


def hash_secret(pepper: bytes, key_id: str, secret: str) -> str:
    return hmac.new(pepper, f"{key_id}:{secret}".encode(), hashlib.sha256).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    m = KEY_RE.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, {"WWW-Authenticate": "Bearer"})


def check_scope(key: ApiKey, scope: str, model: str | None = None) -> None:
    if not key.grants(scope):
        raise ApiError(403, "forbidden_scope", f"this API key lacks the {scope!r} scope")
    if model is not None:
        check_allowed(key, model)


def check_allowed(key: ApiKey, model: str, why: str = "") -> None:
    """403 ``model_not_allowed`` unless ``model`` is on ``key``'s model allowlist (``why``: said after it)."""
    if not key.allows_model(model):
        raise ApiError(403, "model_not_allowed", f"this API key is not allowed to use model {model!r}{why}")


# The store keeps counts in signed 64-bit integers (SQLite's and PostgreSQL's BIGINT); an expiry past a century is a
# key that never expires (omit it), and past year 9999 no date can show it.
MAX_COUNT = 2**63 - 1
MAX_EXPIRY_DAYS = 36525


# JSON's true and false are numbers to pydantic's lax mode and to Python (True == 1): `"expires_days": true` made a
# key that expired in a day. The API checks its body as sent with this (routes/keys.py), a Python caller here.
POLICY_NUMBERS = ("quota", "quota_window_s", "expires_days")


def refuse_booleans(policy: Mapping[str, object]) -> None:
    """ValueError (as every refusal of a policy) when one of its numbers (:data:`POLICY_NUMBERS`) is true or false."""
    for field in POLICY_NUMBERS:
        if isinstance(policy.get(field), bool):
            raise ValueError(f"{field} takes a number, not {str(policy[field]).lower()}")  # noqa: TRY004


def _model_list(models: Iterable[str]) -> list[str]:
    return sorted({m.strip() for m in models if m.strip()})


def validate_policy(scopes: Iterable[str], quota: int | None, quota_window_s: int | None,
                    expires_days: float | None, models: Iterable[str] | None = None) -> list[str]:
    """The key policy's scopes, sorted; ValueError for a policy no store or date holds, or one that would do nothing
    (an allowlist of no model, a quota on a key that is served nothing it meters). The CLI and the API both ask here,
    the CLI before it makes a data dir for the key."""
    from .jobs.kinds.base import NAME_PATTERN  # here: the jobs package imports this module

    refuse_booleans({"quota": quota, "quota_window_s": quota_window_s, "expires_days": expires_days})
    scopes = sorted({s.strip() for s in scopes if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {unknown or 'none'}")
    if quota is not None and not 0 <= quota <= MAX_COUNT:
        raise ValueError(f"quota must be in [0, {MAX_COUNT}] samples, got {quota}")
    if quota_window_s is not None and not 1 <= quota_window_s <= MAX_COUNT:
        raise ValueError(f"quota window must be in [1, {MAX_COUNT}] seconds, got {quota_window_s}")
    if quota_window_s is not None and quota is None:  # it would restart a quota there is not
        raise ValueError("a quota window needs a quota (the samples it restarts)")
    if quota is not None and not any(s == "distill" or "distill" in IMPLIED.get(s, ()) for s in scopes):
        raise ValueError(f"a quota meters the samples served on the keyed path (distill), which a key with the "
                         f"scopes {','.join(scopes)} is never served: add the distill scope, or leave the quota (and "
                         "its window) out")
    if expires_days is not None and not 0 < expires_days <= MAX_EXPIRY_DAYS:  # NaN fails too
        raise ValueError(f"expiry must be in (0, {MAX_EXPIRY_DAYS}] days, got {expires_days} (omit it: never)")
    if models is not None:
        model_list = _model_list(models)
        if not model_list:  # a key no model answers
            raise ValueError("models names no model: give one model name at least, or leave it out for every model")
        unnamable = [m for m in model_list if not re.fullmatch(NAME_PATTERN, m)]
        if unnamable:  # no model can ever have it: a key made for it would answer for none
            raise ValueError(f"models: {unnamable[0][:100]!r} is not a model name (letters, digits, '.', '_' and '-', "
                             "at most 100 characters)")
    return scopes


def create_key(store: Store, pepper: bytes, *, scopes: Iterable[str], models: Iterable[str] | None = None,
               quota: int | None = None, quota_window_s: int | None = None, expires_days: float | None = None,
               name: str = "", actor: str = "cli") -> tuple[str, ApiKey]:
    """A new key: returns the token (shown once) and its public record."""
    models = None if models is None else list(models)  # read twice: checked, then stored
    scope_list = validate_policy(scopes, quota, quota_window_s, expires_days, models)
    model_list = None if models is None else _model_list(models)
    key_id, secret = secrets.token_hex(6), secrets.token_hex(32)
    now = time.time()
    row = ApiKeyRow(id=key_id, secret_hash=hash_secret(pepper, key_id, secret), name=name,
                    scopes=",".join(scope_list), models=None if model_list is None else ",".join(model_list),
                    quota=quota, quota_window_s=quota_window_s, window_start=0, used=0, created_at=now,
                    expires_at=None if expires_days is None else now + expires_days * 86400.0, revoked_at=None)
    store.add_key(row)
    store.audit(actor, "key.create", key_id, f"scopes={row.scopes} models={row.models} quota={quota}")
    return f"sdb_{key_id}_{secret}", ApiKey.from_row(row)


def window_start(window_s: int | None, now: float) -> int:
    return 0 if not window_s else int(now - now % window_s)


STORE_WAIT_S = 5.0  # how long a request waits for the key store before it is told to retry


def key_store_unavailable() -> ApiError:
    return ApiError(503, "key_store_unavailable", "the key store did not answer in time: try again",
                    {"Retry-After": "1"})


class Keyring:
    def __init__(self, store: Store, pepper: bytes, cache_s: float = 1.0):
        self.store, self._pepper, self.cache_s = store, pepper, cache_s
        self._lock = threading.Lock()
        # One flush at a time: a flush that returns has stored everything recorded before it, even
        # what a flush already under way had taken (the write-behind loop and a caller's flush).
        self._flushing = threading.Lock()
        self._rows: dict[str, tuple[float, ApiKeyRow]] = {}
        self._generation: dict[str, int] = {}  # bumped on invalidation: a slow fetch then is not cached
        self._usage: dict[tuple[str, str, str, str], list[int]] = {}  # (key, model, kind, day) → [req, samples]
        self._used: dict[str, int] = {}  # keyed samples of keys without a quota, for their `used` (write-behind)

    # ------------------------------------------------------------ authentication
    def cached_row(self, key_id: str) -> ApiKeyRow | None:
        hit = self._rows.get(key_id)
        if hit is not None and time.monotonic() - hit[0] <= self.cache_s:
            return hit[1]
        return None

    def fetch_row(self, key_id: str) -> ApiKeyRow | None:
        """Blocking: read the row from the store (call off the event loop)."""
        gen = self._generation.get(key_id, 0)
        row = self.store.get_key(key_id)
        with self._lock:
            if row is not None and self._generation.get(key_id, 0) == gen:
                self._rows[key_id] = (time.monotonic(), row)
        return row

    def invalidate(self, key_id: str) -> None:
        with self._lock:
            self._rows.pop(key_id, None)
            self._generation[key_id] = self._generation.get(key_id, 0) + 1

    async def key_of(self, authorization: str | None) -> ApiKey:
        """The key an ``Authorization`` value names, verified (401 otherwise); no rate is spent here. A store that
        does not answer in :data:`STORE_WAIT_S` is a 503 ``key_store_unavailable`` (a stalled database held every
        keyed request as long as it stalled)."""
        token, key_id = self.token_from_header(authorization)
        row = self.cached_row(key_id)
        if row is None:
            try:
                row = await asyncio.wait_for(run_in_threadpool(self.fetch_row, key_id), STORE_WAIT_S)
            except TimeoutError:
                raise key_store_unavailable() from None
        return self.verify(token, row)

    def verify(self, token: str, row: ApiKeyRow | None) -> ApiKey:
        parsed = parse_token(token)
        expected = row.secret_hash if row is not None else "0" * 64
        given = hash_secret(self._pepper, *parsed) if parsed else "1" * 64
        if not hmac.compare_digest(expected, given) or row is None:
            raise _unauthorized("invalid_key", "unknown API key")
        key = ApiKey.from_row(row)
        if key.revoked_at is not None:
            raise _unauthorized("key_revoked", "this API key was revoked")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise _unauthorized("key_expired", "this API key has expired")
        return key

    @staticmethod
    def token_from_header(authorization: str | None) -> tuple[str, str]:
        """(token, key id) from an Authorization header, or a 401."""
        if not authorization:
            raise _unauthorized("missing_key", "an API key is required: Authorization: Bearer sdb_…")
        scheme, _, token = authorization.strip().partition(" ")
        parsed = parse_token(token.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            raise _unauthorized("invalid_key", "malformed API key: expected Authorization: Bearer sdb_<id>_<secret>")
        return token.strip(), parsed[0]

    # ------------------------------------------------------------ quota and usage
    def charge(self, key: ApiKey, samples: int) -> int | None:
        """Blocking (call off the event loop): count ``samples`` against the key's quota in the
        store, or count nothing and raise: 429 when they do not fit, 401 when the key was revoked
        or expired since this request authenticated (in another process, say). Returns the window they were
        counted in, for :meth:`refund` (None: a key without a quota, whose count joins the write-behind)."""
        if key.quota is None:
            refusal = self.charge_each([(key, samples)])[0]
            if refusal is not None:
                raise refusal
            return None
        now = time.time()
        charged = self.store.charge(key.id, samples, now)
        if charged is None:
            self._refused(key, samples, now)
        return charged[1]

    def refund(self, key: ApiKey, samples: int, window_start: int) -> None:
        """Blocking: give back what :meth:`charge` counted (its window) for a call that failed after the charge (the
        model timed out, ran out of memory, answered NaN): the samples were never served, and a client that sent the
        call again, as every SDK before 2026-12-06 did after a 503, paid for them twice or more."""
        self.store.refund(key.id, samples, window_start)

    def charge_each(self, items: Sequence[tuple[ApiKey, int]]) -> list[Exception | None]:
        """Blocking: :meth:`charge` for each (key, samples), in order; each item's refusal, or None. A key
        without a quota is read once for all its items (they were asked together: one read says it stands)."""
        now, standing, out = time.time(), {}, []
        for key, samples in items:
            try:
                if key.quota is None:
                    # Nothing to keep exact: one read says the key still stands (revoked or expired by another
                    # process: refused at once, as the keyed path promises) and the count joins the write-behind.
                    # The UPDATE a quota needs took SQLite's write lock on every request: distill at 8 callers
                    # served 1,470 requests/s with a p99 of 120 ms (WAL checkpoints), against predict's 3,640.
                    if key.id not in standing:
                        standing[key.id] = self.store.key_stands(key.id, now)
                    if standing[key.id]:
                        with self._lock:
                            self._used[key.id] = self._used.get(key.id, 0) + samples
                        out.append(None)
                        continue
                elif self.store.charge(key.id, samples, now) is not None:
                    out.append(None)
                    continue
                self._refused(key, samples, now)
            except Exception as e:  # noqa: BLE001 - each caller gets its own refusal; none is charged twice
                out.append(e)
        return out

    def charge_job(self, key: ApiKey, samples: int, job_id: str, worker: str) -> str:
        """Blocking: a job's charge, once per job (:meth:`Store.charge_job`): ``"charged"``, ``"already"`` (an
        earlier attempt charged them) or ``"lost"`` (not this worker's job: nothing counted); refused as
        :meth:`charge`."""
        now = time.time()
        outcome = self.store.charge_job(key.id, samples, now, job_id, worker)
        if outcome is None:
            self._refused(key, samples, now, fewer="give the job at most {quota} transfer samples (params.transfer)")
        return outcome

    def _refused(self, key: ApiKey, samples: int, now: float,
                 fewer: str = "send at most {quota} at a time (smaller batches)") -> None:
        """Raise why the store refused a charge of ``samples`` (``fewer``: how to ask less, for a request larger
        than the whole quota)."""
        row = self.store.get_key(key.id)  # refused: say why
        if row is None:
            raise _unauthorized("invalid_key", "unknown API key")
        if row.revoked_at is not None:
            self.invalidate(key.id)
            raise _unauthorized("key_revoked", "this API key was revoked")
        if row.expires_at is not None and row.expires_at <= now:
            raise _unauthorized("key_expired", "this API key has expired")
        if row.quota == 0:  # "send at most 0 at a time" said nothing: nothing is served to it, at any size
            raise ApiError(429, "quota_exceeded", "this key's quota is 0 samples: it is served nothing on the keyed "
                           "path (an admin sets another quota on a new key)")
        if row.quota is not None and samples > row.quota:  # no wait helps: the request is larger than the quota
            per = f" per {row.quota_window_s} s" if row.quota_window_s else ""
            raise ApiError(429, "quota_exceeded", f"{samples} samples asked, more than this key's whole quota of "
                           f"{row.quota}{per}: " + fewer.format(quota=row.quota))
        ws = window_start(row.quota_window_s, now)
        used = row.used if row.window_start >= ws else 0
        headers = None
        if row.quota_window_s:
            headers = {"Retry-After": str(max(1, int(ws + row.quota_window_s - now + 0.999)))}
        raise ApiError(429, "quota_exceeded", f"sample quota spent: {used} of {row.quota} used, {samples} asked",
                       headers)

    def record(self, key_id: str, model: str, kind: str, samples: int) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        with self._lock:
            acc = self._usage.setdefault((key_id, model, kind, day), [0, 0])
            acc[0] += 1
            acc[1] += samples

    def flush(self) -> None:
        """Blocking: write the usage gathered since the last flush to the store (the write-behind).

        Flushes run one at a time, so when one returns, every usage recorded before the call is
        stored (a second caller waits for the write under way instead of finding nothing left to
        write and returning early); what a failed write left is kept for the next one.
        """
        with self._flushing:
            with self._lock:
                usage, self._usage = self._usage, {}
                used, self._used = self._used, {}
            try:
                self.store.add_used(used)
            except Exception:
                with self._lock:
                    for key_id, n in used.items():
                        self._used[key_id] = self._used.get(key_id, 0) + n
                raise
            items = list(usage.items())
            for i, ((key_id, model, kind, day), (req, n)) in enumerate(items):
                try:
                    self.store.record_usage(key_id, model, kind, day, req, n)
                except Exception:
                    with self._lock:
                        for k, (req_left, n_left) in items[i:]:
                            acc = self._usage.setdefault(k, [0, 0])
                            acc[0] += req_left
                            acc[1] += n_left
                    raise
