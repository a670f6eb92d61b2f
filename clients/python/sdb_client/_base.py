"""Everything the two clients share that does no I/O: configuration, URLs, headers, the
retry policy, error mapping, request bodies and batching.

``Client`` and ``AsyncClient`` only send what this module builds and parse what it
returns, so the two cannot drift apart.
"""
from __future__ import annotations

import contextlib
import email.utils
import functools
import importlib.util
import io
import ipaddress
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
import numpy as np
from numpy.lib import format as npformat

from . import _exceptions as exc

__version__ = "0.1.0"

# --------------------------------------------------------------------------- configuration
ENV_URL = "SDB_URL"
ENV_KEY = "SDB_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"  # `sdb serve` with no settings

# Timeouts and retries. Each is overridable per client (constructor) and per call
# (`client.with_options(timeout=..., max_retries=...)`).
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # seconds: read/write/pool 60, connect 5
# An upload (Files.upload) is answered once the server has checked the whole file: a dataset zip of 100,000 images
# takes minutes. Its read phase waits this long at least, whatever the client's timeout: a client that gave up first
# left the server keeping the file, and its resend kept a duplicate (docs/sdk.md#batches-timeouts-retries).
UPLOAD_READ_TIMEOUT_S = 1800.0
DEFAULT_MAX_RETRIES = 3  # resends after the first attempt
BACKOFF_INITIAL_S = 0.25  # first wait; doubles per attempt, with jitter
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 60.0  # a Retry-After longer than this is not waited for: the error is raised
RETRY_STATUSES = frozenset({429, 503})
# A 429 rate_limited (requests/s, not the quota) is waited out within this many seconds in all, whatever
# max_retries says: clients sharing a key contend, and each wait is a few ms (docs/sdk.md#batches-timeouts-retries).
RATE_LIMIT_WAIT_MAX_S = RETRY_AFTER_MAX_S
# 503 codes the server gives before it charges a key or runs the model: a distill batch (not idempotent) is resent
# only after these; model_timeout, model_out_of_memory and model_unavailable come after the quota's charge (a server
# from 2026-12-07 gives it back, but one whose store could not, or an older one, keeps it: not resent).
NOTHING_CHARGED_503 = frozenset({"not_ready", "key_store_unavailable"})

DEFAULT_BATCH_SIZE = 256  # samples per request at most: below the server's default 1,024 (SDB_MAX_REQUEST_SAMPLES)
# Bytes a request body may carry: the server's default SDB_MAX_PAYLOAD_BYTES (8 MiB), less room for the .npy header,
# JSON's brackets and a form's part headers. A batch is cut to fit by the bytes its samples take (VALUE_BYTES a value,
# an image file its own size and FORM_PART_BYTES); a server set lower says so with a 413, and later batches are smaller.
MAX_BODY_BYTES = (8 << 20) - (64 << 10)
VALUE_BYTES = {"npy": 4, "json": 24}  # a float32 in a body: .npy's 4 bytes; JSON's text, at most ~24 characters
FORM_PART_BYTES = 512  # a multipart part's boundary and headers, besides the image file itself
# Tensors travel as .npy (application/x-npy) by default: about a fifth of JSON's bytes, and no float
# formatting or parsing on either side; "json" for servers before binary bodies (docs/sdk.md).
ENCODINGS = ("npy", "json")
DEFAULT_ENCODING = "npy"
JSON_TYPE, NPY_TYPE = "application/json", "application/x-npy"
DEFAULT_MAX_CONCURRENCY = 4  # AsyncClient: batches of one call in flight at once
DEFAULT_POLL_S = 1.0  # jobs.wait
JOB_DONE = frozenset({"succeeded", "failed", "cancelled"})

# Every retry wait is logged here at INFO ("waiting 10.0 s before retry 1 of 3: 429 too_many_jobs ..."), so that a
# call that waits out a Retry-After is not silent to whoever shows this logger (the `sdb` command does, on stderr).
logger = logging.getLogger("sdb_client")

KEY_RE = re.compile(r"sdb_[0-9a-f]{12}_[0-9a-f]{64}")
# for scrubbing any text we show; in any case: the server refuses an upper-cased key, but its lower-cased form is
# the key
_KEY_LIKE = re.compile(r"(sdb_[0-9a-f]{12}_)[0-9a-f]{4,}", re.IGNORECASE)

Inputs = np.ndarray | Sequence[Any]
# http clients a forked child inherited from its parent: kept, never closed (closing could end the parent's connections)
FORKED: list[Any] = []
Images = Any  # an image file's path, a PNG/JPEG file's bytes or a PIL image, or a list of them


def forked_http_client(pid: int) -> exc.ConfigurationError:
    """The error for a client given its own ``http_client`` in process ``pid`` and used in a child forked from it: the
    pool's keep-alive sockets are the parent's, and two processes on one socket read each other's answers."""
    return exc.ConfigurationError(
        f"this client was given its own http_client in process {pid}, and this process ({os.getpid()}) was forked "
        "from it: that http client's pooled connections are the parent's, and a child using them reads other "
        "processes' answers. Make the client (and its http_client) per process, after the fork, or give no "
        "http_client (a client that makes its own opens new connections in each process)", code="forked_http_client")


def resolve_url(url: str | None) -> str:
    """The base URL from the argument, else ``SDB_URL``, else the local default; no trailing slash."""
    raw = url if url is not None else os.environ.get(ENV_URL) or DEFAULT_URL
    source = "url" if url is not None else ENV_URL

    def refused(why: str = "") -> exc.ConfigurationError:
        hint = " (that is an API key: give it as api_key)" if KEY_RE.fullmatch(raw.strip()) else ""
        return exc.ConfigurationError(f"{source} must be an http(s) URL like http://127.0.0.1:8000{why}, "
                                      f"got {redact(repr(url_shown(raw)))}{hint}", code="invalid_url")

    try:
        parts = urlsplit(raw.strip())
        port = parts.port  # a port that is not a number, or past 65535: ValueError
    except ValueError:
        raise refused() from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refused()
    if port == 0:
        raise refused(" (a port from 1 to 65535)")
    if "@" in parts.netloc:  # httpx would send it as Basic auth in place of the key, and messages would show it
        raise refused(" (no user:password in the URL: the key goes in SDB_API_KEY or api_key)")
    if parts.query or parts.fragment or "?" in raw or "#" in raw:  # the routes' paths would follow them
        raise refused(" (no query or fragment: the client adds each route's path)")
    return raw.strip().rstrip("/")


def url_shown(url: str) -> str:
    """``url`` as a message may show it: a user:password and a query (``?token=...``) masked, as secrets may be."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # not one that splits ("http://[::1"): what a password or a query could be, masked
        return re.sub(r"[?#].*", "?***", re.sub(r"(//)?[^/]*@", r"\1***@", url.strip(), count=1))
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "***" if parts.query else ""
    fragment = "***" if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


# --------------------------------------------------------------------------- proxies
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")  # what httpx takes


@dataclass(frozen=True)
class EnvProxy:
    """The proxy the environment names for a client's server, and the variable that named it."""

    url: str
    variable: str

    def __str__(self) -> str:  # never its user:password
        return f"the proxy {url_shown(self.url)} (from {self.variable})"


def is_loopback(host: str) -> bool:
    """``localhost`` (and names under ``.localhost``, RFC 6761), 127.0.0.0/8 and ::1 (IPv4-mapped too)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def env_proxy(base_url: str) -> EnvProxy | None:
    """The proxy a client made by the SDK goes through to ``base_url``: ``HTTP_PROXY``, ``HTTPS_PROXY`` or
    ``ALL_PROXY`` (either case) as httpx reads them, none for a host ``NO_PROXY`` names, and none for a loopback host
    (a proxy set for the machine saw every request to a local server, its key included, and a dead one made the
    server look down). One httpx cannot use is a ``ConfigurationError`` naming its variable (docs/sdk.md#proxies).
    """
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if is_loopback(host):
        return None
    found = urllib.request.getproxies()  # the variables, else the system's settings (macOS, Windows), as httpx reads
    key = parts.scheme if found.get(parts.scheme) else "all"
    raw = found.get(key)
    if not raw or urllib.request.proxy_bypass(host):
        return None
    proxy = EnvProxy(raw if "://" in raw else f"http://{raw}", _proxy_variable(key, raw))
    scheme = urlsplit(proxy.url).scheme.lower()
    if scheme not in PROXY_SCHEMES:
        raise exc.ConfigurationError(
            f"{proxy.variable} names {url_shown(proxy.url)!r}, a proxy the SDK (httpx) cannot use: give an http://, "
            f"https:// or socks5:// proxy URL, or add {host} to NO_PROXY to reach the server directly",
            code="invalid_proxy")
    if scheme.startswith("socks") and importlib.util.find_spec("socksio") is None:
        raise exc.ConfigurationError(
            f"{proxy.variable} names a SOCKS proxy ({url_shown(proxy.url)}), which needs the socksio package: "
            f"pip install 'httpx[socks]'; or add {host} to NO_PROXY to reach the server directly",
            code="invalid_proxy")
    return proxy


def _proxy_variable(key: str, value: str) -> str:
    """The variable that set proxy ``key`` (http, https, all) to ``value``: the lower-case one first, as urllib."""
    names = sorted((n for n in os.environ if n.lower() == f"{key}_proxy"), key=lambda n: n != n.lower())
    return next((n for n in names if os.environ[n] == value), "the system's proxy settings")


def new_http(client_cls: type, transport_cls: type, timeout: httpx.Timeout, proxy: EnvProxy | None) -> Any:
    """An httpx client (``client_cls``, with a ``transport_cls``) for a client's one server, through ``proxy`` or
    direct. Its transport is given, so httpx reads no proxy from the environment itself (``env_proxy`` decided);
    ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` still apply."""
    try:
        return client_cls(timeout=timeout, transport=transport_cls(proxy=None if proxy is None else proxy.url))
    except (ImportError, ValueError) as e:  # a proxy this httpx version cannot use (env_proxy checked the others)
        raise exc.ConfigurationError(f"{proxy}: {e}", code="invalid_proxy") from None


def resolve_key(api_key: str | None) -> str | None:
    """The API key from the argument, else ``SDB_API_KEY``, else None (public predict only).

    A key that is not ``sdb_<12 hex>_<64 hex>`` is refused here, before any request; the
    message never repeats the key."""
    source = "api_key"
    if api_key is None:
        api_key, source = os.environ.get(ENV_KEY) or None, ENV_KEY
    if api_key is None:
        return None
    key = api_key.strip()
    if not KEY_RE.fullmatch(key):
        raise exc.ConfigurationError(
            f"{source} is not an SDB API key: expected sdb_<12 hex digits>_<64 hex digits> "
            f"({len(key)} characters given; keys are 81)", code="invalid_key_format")
    return key


def redact(text: str) -> str:
    """Replace the secret part of anything that looks like an API key."""
    return _KEY_LIKE.sub(r"\1***", text)


def version_params(version: str | int | None) -> dict[str, str] | None:
    """The ``?version=`` of a model route: that version pinned, or None for the highest (the default)."""
    if version is None:
        return None
    v = str(version).strip()
    if not v:
        raise exc.BadRequest("version is empty: give a version (e.g. '2') or None for the highest", code="invalid_request")
    return {"version": v}


class VersionPin:
    """The version of model ``name`` that one call (``distill``, ``predict``) or one ``RemoteTeacher`` asks for: the
    caller's, else the first the server answered from (the model's description, or a batch's answer), sent with every
    later request. A deploy during a call then changes nothing: one call's logits come from one network, never rows of
    two (docs/sdk.md, "Versions")."""

    def __init__(self, name: str, version: str | int | None):
        pinned = version_params(version)
        self.name, self.version = name, None if pinned is None else pinned["version"]
        self.served = False  # the server answered from self.version: a 404 for it now means it went away
        self._lock = threading.Lock()  # a RemoteTeacher's threads answer at once

    def params(self) -> dict[str, str] | None:
        """The ``?version=`` of a request."""
        return version_params(self.version)

    def learn(self, description: Any) -> None:
        """The model's description (``GET /v1/models/{name}``) came: its version is pinned if none was."""
        version = description.get("version") if isinstance(description, dict) else None
        if isinstance(version, str) and version:
            with self._lock:
                self.version = self.version or version
                self.served = self.served or version == self.version

    def answered(self, part: Any) -> None:
        """A batch's answer came: pinned to its version if none was; one from another version is refused."""
        version = part.get("version") if isinstance(part, dict) else None
        if not isinstance(version, str) or not version:  # a server that does not say: merge_distilled checks the form
            return
        with self._lock:
            if self.version is not None and version != self.version:
                raise exc.ModelChanged(f"model {self.name!r} answered from version {version!r} where this call is "
                                       f"pinned to {self.version!r}: the model changed mid-run, and rows of two "
                                       "versions are not merged", code="model_changed")
            self.version, self.served = version, True

    def gone(self, e: BaseException) -> BaseException:
        """``e``; or, when it says the version the server answered from before is no longer served, a
        ``ModelChanged`` carrying what ``e`` carried (the rows answered before it)."""
        if not (self.served and isinstance(e, exc.NotFound) and e.code == "model_not_found"):
            return e
        changed = exc.ModelChanged(
            f"model {self.name!r} version {self.version!r}, which this call or teacher is pinned to (its answers came "
            f"from it), is no longer served: the model changed mid-run ({e.message}). No rows of another version "
            "were merged; start again for the version served now, or pin one with version=...",
            status=e.status, code="model_changed")
        changed.partial, changed.partial_rows, changed.answered_after = e.partial, e.partial_rows, e.answered_after
        return changed

    def __getstate__(self) -> dict:  # a RemoteTeacher pickles for spawned workers; its lock does not
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def with_params(kw: dict[str, Any], params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``_request`` keywords ``kw`` with ``params`` added to their query parameters."""
    if not params:
        return kw
    return {**kw, "params": {**(kw.get("params") or {}), **params}}


def segment(value: object, what: str) -> str:
    """``value`` as one segment of a URL's path. "", "." and ".." are refused: HTTP clients resolve the last two
    away (``jobs status .`` listed every job, ``files get ..`` reached another route), and "" names the listing."""
    text = str(value)
    if text in ("", ".", ".."):
        raise exc.BadRequest(f"{text!r} is not a {what}", code="invalid_request")
    return quote(text, safe="")


def model_path(name: str, *rest: str) -> str:
    return "/".join(["/v1/models", segment(name, "model name"), *rest])


def key_path(key_id: str) -> str:
    return "/v1/keys/" + segment(key_id, "key id")


def job_path(job_id: str, *rest: str) -> str:
    return "/".join(["/v1/jobs", segment(job_id, "job id"), *(segment(r, "job artifact name") for r in rest)])


def file_path(file_id: str) -> str:
    return "/v1/files/" + segment(file_id, "file id")


@dataclass(frozen=True)
class Options:
    """Per-client settings; ``with_options`` makes a copy with some replaced."""

    timeout: httpx.Timeout
    max_retries: int
    batch_size: int
    encoding: str = DEFAULT_ENCODING  # how tensors travel: "npy" or "json"
    encoding_chosen: bool = False  # the client's caller named it (kept), or it is the default (JSON after a 415)

    @staticmethod
    def make(timeout: float | httpx.Timeout | None, max_retries: int | None,
             batch_size: int | None, base: Options | None = None, encoding: str | None = None) -> Options:
        if timeout is None:
            t = base.timeout if base else DEFAULT_TIMEOUT
        elif isinstance(timeout, httpx.Timeout):
            t = timeout
        else:
            try:
                seconds = float(timeout)
            except (TypeError, ValueError):
                seconds = math.nan
            if not 0 < seconds < math.inf:  # 0 or less: no request could finish (the socket refuses a negative one)
                raise exc.ConfigurationError(f"timeout must be a number of seconds > 0, got {timeout!r}",
                                             code="invalid_option")
            t = httpx.Timeout(seconds)
        r = max_retries if max_retries is not None else (base.max_retries if base else DEFAULT_MAX_RETRIES)
        b = batch_size if batch_size is not None else (base.batch_size if base else DEFAULT_BATCH_SIZE)
        e = check_encoding(encoding) if encoding is not None else (base.encoding if base else DEFAULT_ENCODING)
        chosen = encoding is not None or (base is not None and base.encoding_chosen)
        if r < 0:
            raise exc.ConfigurationError(f"max_retries must be >= 0, got {r}", code="invalid_option")
        if b < 1:
            raise exc.ConfigurationError(f"batch_size must be >= 1, got {b}", code="invalid_option")
        return Options(t, int(r), int(b), e, chosen)


def check_encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise exc.ConfigurationError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}",
                                     code="invalid_option")
    return encoding


class BaseClient:
    """Configuration and request preparation shared by ``Client`` and ``AsyncClient``."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, max_retries: int | None = None,
                 batch_size: int | None = None, encoding: str | None = None):
        self.base_url = resolve_url(url)
        self._api_key = resolve_key(api_key)
        self.options = Options.make(timeout, max_retries, batch_size, encoding=encoding)
        self._limits = RequestLimits()  # the server's, as learnt: shared with with_options copies (one server)

    @property
    def has_key(self) -> bool:
        return self._api_key is not None

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    def _encoding(self, encoding: str | None) -> str:
        """A call's tensor encoding: its own, else the client's (JSON once the server refused .npy bodies)."""
        if encoding is None:
            return "json" if self._limits.json_only and not self.options.encoding_chosen else self.options.encoding
        return check_encoding(encoding)

    def _npy_refused(self, e: BaseException, encoding: str | None, enc: str) -> bool:
        """Whether a call sent as .npy because that is the default (neither the call, ``encoding``, nor the client
        named it; ``enc``: what was sent) met a server from before .npy bodies (a 415, before any charge): it is then sent again as JSON, as is
        every later one of this client."""
        if encoding is not None or self.options.encoding_chosen or enc != "npy" or not isinstance(e, exc.SDBError):
            return False
        if e.status != 415 or e.code != "unsupported_media_type":
            return False
        self._limits.json_only = True
        return True

    def _tensor_batches(self, x: np.ndarray, batch_size: int | None, encoding: str) -> Batches:
        """How ``x`` (a batch) is cut into requests: ``batch_size`` (else the client's) samples at most, within the
        body the server takes."""
        return Batches(np.full(len(x), sample_bytes(x, encoding)), batch_size or self.batch_size, self._limits)

    def _image_batches(self, parts: Sequence[tuple[str, tuple[str, bytes, str]]], batch_size: int | None) -> Batches:
        """How image uploads (``image_upload``'s parts) are cut into requests, as ``_tensor_batches`` cuts tensors."""
        sizes = [len(data) + FORM_PART_BYTES for _, (_, data, _) in parts]
        return Batches(sizes, batch_size or self.batch_size, self._limits)

    def _headers(self) -> dict[str, str]:
        h = {"Accept": JSON_TYPE, "User-Agent": f"sdb-client/{__version__}"}
        if self._api_key is not None:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    def _url(self, path: str) -> str:
        return self.base_url + path

    def __repr__(self) -> str:  # never the key
        key = "set" if self._api_key is not None else None
        return (f"{type(self).__name__}(url={redact(repr(self.base_url))}, api_key={key!r}, "
                f"max_retries={self.options.max_retries})")


# --------------------------------------------------------------------------- retries
# Errors raised before the request could reach the server: resending is always safe.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter for attempt 0, 1, 2, ..."""
    return min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** attempt) * (0.5 + random.random() / 2)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, secs) if math.isfinite(secs) else None


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from an answer's headers: ``Retry-After-Ms`` when the server gave it (a rate limit's wait is
    often a few ms, which ``Retry-After``'s whole seconds round up to 1 s), else ``Retry-After``."""
    headers = headers or {}
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value)
    return parse_retry_after(headers.get("retry-after"))


def retry_delay(attempt: int, max_retries: int, *, status: int | None = None,
                headers: Mapping[str, str] | None = None, error: BaseException | None = None,
                idempotent: bool = True, code: str | None = None, waited: float = 0.0,
                charged: bool = False) -> float | None:
    """The one place that decides: seconds to wait before resending, or None to give up.

    - transport errors: retried if the request never left (connect), or if resending it is
      harmless (``idempotent``; not for key creation or job submission);
    - 503: retried, after Retry-After if the server gave one, else with backoff; a request the server
      ``charged`` a quota for before it ran the model (a distill batch) only when its ``code`` says nothing was
      charged (``NOTHING_CHARGED_503``);
    - 429: retried only after the Retry-After the server gave (a quota window refills);
      without one the quota is a lifetime quota and waiting will not help; a ``rate_limited`` one, while
      ``waited`` (seconds already waited by this request) stays within ``RATE_LIMIT_WAIT_MAX_S``, with jitter,
      past ``max_retries`` (unless it is 0);
    - a Retry-After over ``RETRY_AFTER_MAX_S`` is not waited for;
    - anything else (every other 4xx, 500, 502, 504) is not retried.
    """
    if status == 429 and code == "rate_limited" and max_retries > 0:
        after = retry_after(headers)
        if after is None or after > RETRY_AFTER_MAX_S:
            return None
        # callers sharing the key got the same wait: jitter spreads them, and the wait grows with each try
        delay = after + random.random() * min(BACKOFF_MAX_S, max(after, 0.01) * 2 ** min(attempt, 10))
        return delay if waited + delay <= RATE_LIMIT_WAIT_MAX_S else None
    if attempt >= max_retries:
        return None
    if error is not None:
        if isinstance(error, _NOT_SENT) or (idempotent and isinstance(error, httpx.TransportError)):
            return backoff(attempt)
        return None
    if status not in RETRY_STATUSES:
        return None
    if status == 503 and charged and code not in NOTHING_CHARGED_503:
        return None
    after = retry_after(headers)
    if after is None:
        return None if status == 429 else backoff(attempt)
    return after if after <= RETRY_AFTER_MAX_S else None


# --------------------------------------------------------------------------- errors
_STATUS_ERRORS: dict[int, type[exc.SDBError]] = {
    400: exc.BadRequest, 401: exc.AuthError, 403: exc.PermissionDenied, 404: exc.NotFound,
    413: exc.PayloadTooLarge, 415: exc.BadRequest, 422: exc.BadRequest, 429: exc.QuotaError,
}


_HTML = re.compile(r"<(?:!doctype|html|head|body|title)\b", re.IGNORECASE)
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")


def error_from_response(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> exc.SDBError:
    """The typed error for a non-2xx answer, from the service's ``{"error": {"code", "message"}}``."""
    code, message = None, None
    try:
        obj = json.loads(body)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict):
            code, message = err.get("code"), err.get("message")
        elif isinstance(obj, dict) and isinstance(obj.get("detail"), str):  # a plain FastAPI/Starlette body
            message = obj["detail"]
        elif isinstance(err, str):  # the v2 routes' {"error": "message"}
            message = err
    except (ValueError, UnicodeDecodeError):
        pass
    if message is None:
        text = body[:2000].decode("utf-8", "replace")
        if _HTML.search(text):  # a proxy's or load balancer's error page: its title, else its text, not its markup
            title = _HTML_TITLE.search(text)
            text = _HTML_TAG.sub(" ", title.group(1) if title else text)
        text = " ".join(text.split())[:300]
        message = text or httpx.codes.get_reason_phrase(status) or "error"
    code = str(code) if code else (httpx.codes.get_reason_phrase(status) or "error").lower().replace(" ", "_")
    cls = _STATUS_ERRORS.get(status) or (exc.ServerError if status >= 500 else exc.SDBError)
    return cls(redact(str(message)), status=status, code=code,
               retry_after=retry_after(headers))


def connection_error(e: httpx.TransportError, base_url: str | None = None, attempts: int = 1,
                     proxy: EnvProxy | None = None) -> exc.APIConnectionError:
    """The error for a request that got no answer: which server (and ``proxy``, the one it went through), what the
    transport said, and what to check."""
    cls = exc.APITimeoutError if isinstance(e, httpx.TimeoutException) else exc.APIConnectionError
    code = "timeout" if cls is exc.APITimeoutError else "connection_error"
    cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    if base_url is None:
        return cls(redact(cause), code=code)
    if proxy is not None:  # the proxy, not the server, may be what failed
        tries = f" through {proxy}{tries}"
    if cls is exc.APIConnectionError and proxy is not None:
        text = (f"cannot reach {base_url}{tries} ({cause}): is that proxy up, and does it reach the server? "
                f"(add {urlsplit(base_url).hostname} to NO_PROXY to connect directly)")
    elif cls is exc.APITimeoutError and _is_upload(e):
        text = (f"no answer from {base_url}{tries} ({cause}) while it checked the upload: it may still keep the "
                "file; look for it with files.list() before uploading again, or give the upload a longer timeout "
                "(timeout=...)")
    elif cls is exc.APITimeoutError:
        text = (f"no answer from {base_url}{tries} ({cause}): the server is busy or the request is large; "
                "raise the timeout (timeout=...) or send smaller batches (batch_size=...)")
    else:
        text = (f"cannot reach {base_url}{tries} ({cause}): is the SDB server running there? "
                f"(the URL comes from url or {ENV_URL})")
    return cls(redact(text), code=code)


def _is_upload(e: httpx.TransportError) -> bool:
    """Whether the request that got no answer sent a file (a multipart form: an upload or a deploy), which no
    smaller batch would help."""
    try:
        return e.request.headers.get("content-type", "").startswith("multipart/form-data")
    except RuntimeError:  # an error raised without its request
        return False


def log_retry(method: str, path: str, delay: float, attempt: int, max_retries: int, *,
              status: int | None = None, headers: Mapping[str, str] | None = None, body: bytes = b"",
              error: BaseException | None = None) -> None:
    """Say, on the ``sdb_client`` logger, why and how long a call waits before it resends."""
    if not logger.isEnabledFor(logging.INFO):
        return
    if error is not None:
        why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    else:
        why = str(error_from_response(status or 0, body, headers))
    of = f" of {max_retries}" if attempt < max_retries else f" (rate limited: up to {RATE_LIMIT_WAIT_MAX_S:g} s)"
    logger.info(redact(f"{method} {path}: waiting {delay:.1f} s before retry {attempt + 1}{of} ({why})"))


def answer_json(resp: httpx.Response) -> Any:
    """A 2xx answer's JSON; an answer that is not JSON (an HTML page from a proxy, a captive portal or another
    server on that port) is an ``SDBError`` with code ``malformed_answer``, not a decoding error."""
    try:
        return json.loads(resp.content)
    except (ValueError, UnicodeDecodeError):
        media = resp.headers.get("content-type", "").split(";")[0].strip() or "no content type"
        raise exc.SDBError(f"the answer to {resp.request.method} {resp.request.url.path} is not JSON ({media}, "
                           f"{len(resp.content)} bytes): is {resp.request.url.scheme}://{resp.request.url.netloc.decode()} "
                           "an SDB server?", status=resp.status_code, code="malformed_answer") from None


def parses_answer(what: str):
    """Decorate a parser of the server's answers: an answer of another form (another server, a proxy's, a newer
    API's) is an ``SDBError`` with code ``malformed_answer`` saying ``what`` it was, never a ValueError, TypeError
    or AttributeError from inside the SDK."""
    def wrap(fn):
        @functools.wraps(fn)
        def parse(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except exc.SDBError:
                raise
            except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
                raise exc.SDBError(f"the server's {what} is not what an SDB server answers ({type(e).__name__}: "
                                   f"{str(e)[:200]}): is this URL an SDB server?", code="malformed_answer") from None
        return parse
    return wrap


def record(obj: Any, what: str) -> dict:
    """A JSON answer that must be one object (a job, a file): that object, else ``malformed_answer``."""
    if not isinstance(obj, dict):
        raise exc.SDBError(f"the server's answer is not a {what} record: is this URL an SDB server?",
                           code="malformed_answer")
    return obj


def field(obj: Any, name: str) -> Any:
    """``obj[name]`` of a JSON answer; an answer of another form (another server, another API version) is an
    ``SDBError`` with code ``malformed_answer``, not a KeyError or TypeError from inside the SDK."""
    if isinstance(obj, dict) and name in obj:
        return obj[name]
    form = f"fields {sorted(obj)[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise exc.SDBError(f"the server's answer has no {name!r} field ({form}): is this URL an SDB server?",
                       code="malformed_answer")


# --------------------------------------------------------------------------- bodies and batching
def encode_json(obj: Any) -> bytes:
    """Compact JSON; NaN and Inf are refused here (they are not JSON) as the server would."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise exc.BadRequest("inputs have NaN or Inf values", code="non_finite") from None


def as_array(inputs: Inputs) -> np.ndarray:
    """Inputs (a float ndarray of any dtype and layout, nested lists, or a torch tensor) as float32 with a
    leading batch axis (a 1-D vector is one sample); an integer or boolean array is refused (``check_float``)."""
    if inputs is None:
        raise exc.BadRequest("inputs are required", code="invalid_input")
    if isinstance(inputs, (str, os.PathLike, bytes, bytearray)):
        raise exc.BadRequest(f"inputs are normalised float arrays, not a {type(inputs).__name__}: load a .npy file "
                             "first (numpy.load(path)), or send an image file as image_path", code="invalid_input")
    if isinstance(inputs, np.ma.MaskedArray):  # np.asarray would send the values under the mask as they are
        if np.ma.is_masked(inputs):
            raise exc.BadRequest("inputs are a masked array with masked entries: the values under the mask would be "
                                 "sent as they are; fill them first (inputs.filled(value))", code="invalid_input")
        inputs = inputs.data
    if hasattr(inputs, "detach") and hasattr(inputs, "cpu"):  # a torch tensor, without importing torch
        t = inputs.detach().cpu()
        try:
            inputs = t.numpy()
        except TypeError:  # a dtype numpy lacks (bfloat16)
            inputs = t.float().numpy()
    try:
        if isinstance(inputs, (list, tuple)):
            check_leaves(inputs)
        else:
            check_float(np.asarray(inputs))
        with np.errstate(over="ignore"):  # beyond float32 becomes Inf, which the server refuses (422 non_finite)
            arr = np.asarray(inputs, dtype=np.float32)
    except (TypeError, ValueError):
        raise exc.BadRequest("inputs must be a rectangular array of numbers", code="invalid_input") from None
    if arr.ndim == 0 or arr.size == 0:
        raise exc.BadRequest(f"inputs must be a non-empty batch, got shape {list(arr.shape)}", code="invalid_shape")
    # One vector is one sample (a model takes no batch of scalars): sent whole, never split into batches of its values.
    return arr[None] if arr.ndim == 1 else arr


def check_float(arr: np.ndarray) -> None:
    """Refuse an integer, boolean or complex array: the tensor routes take normalised float inputs, so pixel values
    (uint8 from an image) sent as they are would be answered, wrongly, rather than refused, and a complex one would
    lose its imaginary part in float32."""
    if arr.dtype.kind in "biu":
        raise_dtype(str(arr.dtype))
    if arr.dtype.kind == "c":
        raise exc.BadRequest(f"inputs are {arr.dtype} values: models take real float inputs; send the part the "
                             "model was trained on (x.real, or abs(x))", code="invalid_dtype")


def raise_dtype(dtype: str) -> None:
    raise exc.BadRequest(
        f"inputs are {dtype} values, not floats: models take normalised float inputs, "
        "(value / scale - mean) / std with the model's normalize (client.model(name)['normalize']); "
        "convert them (predict also takes image files as they are: predict(name, image_path=...))",
        code="invalid_dtype")


def check_leaves(items: Sequence[Any]) -> None:
    """``check_float`` for each array, tensor or image inside nested lists (a list of uint8 frames, of PIL images):
    numpy would turn them into floats of their 0-255 values. Plain Python numbers are taken as they are."""
    for item in items:
        if isinstance(item, (list, tuple)):
            check_leaves(item)
        elif isinstance(item, (float, int)):
            continue
        elif hasattr(item, "is_floating_point"):  # a torch tensor, without importing torch
            if not item.is_floating_point():
                raise_dtype(str(item.dtype).removeprefix("torch."))
        elif isinstance(item, (np.ndarray, np.generic)) or type(item).__module__.startswith("PIL."):
            check_float(np.asarray(item))


def check_temperature(temperature: Any, *, optional: bool = False) -> None:
    """A temperature is a finite number > 0 (None where ``optional``): refused before any request."""
    if temperature is None and optional:
        return
    numeric = isinstance(temperature, (int, float, np.number)) and not isinstance(temperature, bool)
    t = float(temperature) if numeric else math.nan
    if not 0 < t < math.inf:
        raise exc.ConfigurationError(f"temperature must be a finite number > 0, got {temperature!r}",
                                     code="invalid_option")


def check_batch_size(batch_size: Any) -> None:
    """A call's ``batch_size`` is None (the client's) or an integer >= 1: refused before any request."""
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise exc.ConfigurationError(f"batch_size must be an integer >= 1, got {batch_size!r}", code="invalid_option")


def with_partial(e: exc.SDBError, logits: Sequence[np.ndarray],
                 after: Sequence[tuple[int, np.ndarray]] = ()) -> exc.SDBError:
    """``e`` carrying the rows answered (and charged) before it: ``e.partial``, the logits of the first
    ``e.partial_rows`` inputs, None when no batch was answered; and ``e.answered_after``, the batches answered past
    those (concurrent ones, in flight when one failed) as (first row, logits), in input order."""
    rows = [np.asarray(z, dtype=np.float32) for z in logits]
    e.partial = np.concatenate(rows) if rows else None
    e.partial_rows = 0 if e.partial is None else len(e.partial)
    e.answered_after = sorted(((int(i), np.asarray(z, dtype=np.float32)) for i, z in after), key=lambda p: p[0])
    return e


def answered_in(e: BaseException) -> list[np.ndarray]:
    """The logits a failed distill call answered before its error (``e.partial``), as a list of none or one."""
    partial = getattr(e, "partial", None)
    return [] if partial is None else [partial]


def tempered(e: exc.SDBError, temperature: float) -> exc.SDBError:
    """``e`` with the logits it carries divided by ``temperature``, as ``distill_logits`` returns them."""
    if e.partial is not None:
        e.partial = temper(e.partial, temperature)
    e.answered_after = [(i, temper(z, temperature)) for i, z in e.answered_after]
    return e


def batch_slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def sample_bytes(x: np.ndarray, encoding: str) -> int:
    """The bytes one sample of the batch ``x`` adds to a request body in ``encoding``."""
    return max(1, math.prod(x.shape[1:])) * VALUE_BYTES[encoding]


@dataclass
class RequestLimits:
    """The most one request may carry, as far as a client knows its server: the server's default body size, until
    a batch refused for its size says less. Such a refusal (413 payload_too_large; 422 too_many_samples) comes before
    the body is read, so before any quota is charged, and the batch is sent again in halves."""

    body_bytes: int = MAX_BODY_BYTES
    samples: int | None = None  # unknown until a 422 too_many_samples
    json_only: bool = False  # a server from before .npy bodies (a 415 to one): tensors go as JSON

    def lower(self, e: BaseException, samples: int, body_bytes: int) -> bool:
        """After ``e`` answered a batch of ``samples`` (``body_bytes``): whether to send it again smaller, the limits
        now half of what was refused."""
        if samples < 2 or not refused_for_size(e):
            return False
        if e.status == 413:
            self.body_bytes = min(self.body_bytes, body_bytes // 2)
        else:
            self.samples = min(self.samples or samples, samples // 2)
        return True


def refused_for_size(e: BaseException) -> bool:
    """A request the server refused for its size, before reading its body (so before any charge): 413
    payload_too_large, 422 too_many_samples."""
    return isinstance(e, exc.SDBError) and (e.status == 413 or (e.status == 422 and e.code == "too_many_samples"))


class Batches:
    """How one call's samples are cut into requests: at most ``batch_size`` a request, and, by ``sizes`` (the bytes
    each sample adds to a body), no more than ``limits`` allow (one sample at least). Cut as they are sent, so that a
    refusal for size (``smaller``) makes the rest of the call's batches smaller too."""

    def __init__(self, sizes: Sequence[int], batch_size: int, limits: RequestLimits):
        self._ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
        self.batch_size, self.limits = batch_size, limits

    def __len__(self) -> int:
        return len(self._ends)

    def _bytes(self, start: int, end: int) -> int:
        return int(self._ends[end - 1] - (self._ends[start - 1] if start else 0))

    def end(self, start: int, stop: int | None = None) -> int:
        """Where the request that begins at sample ``start`` ends (exclusive; ``stop`` at most, default the last)."""
        stop = len(self) if stop is None else stop
        n = min(stop - start, self.batch_size, self.limits.samples or self.batch_size)
        before = self._ends[start - 1] if start else 0
        fit = int(np.searchsorted(self._ends[start:start + n] - before, self.limits.body_bytes, side="right"))
        return start + max(1, fit)

    def slices(self) -> list[slice]:
        """Every request's samples, cut now."""
        cuts, start = [], 0
        while start < len(self):
            end = self.end(start)
            cuts.append(slice(start, end))
            start = end
        return cuts

    def smaller(self, e: BaseException, start: int, end: int) -> bool:
        """Whether samples ``start:end``, refused as ``e``, are to be sent again in smaller requests (the limits
        lowered: ``RequestLimits.lower``)."""
        return self.limits.lower(e, end - start, self._bytes(start, end))


def needs_rank(arr: np.ndarray, batch_size: int) -> bool:
    """Whether splitting ``arr`` into batches needs the model's input rank first: its first axis would be cut,
    and it may be one sample without a batch axis (a (300, 4) sequence, a (3, 32, 32) image at batch_size 2)
    rather than a batch. Smaller arrays travel whole, and the server tells the two apart."""
    return arr.ndim >= 2 and len(arr) > batch_size


def with_batch_axis(arr: np.ndarray, model: dict) -> np.ndarray:
    """``arr`` with a leading batch axis when it is one sample of ``model`` (``GET /v1/models/{name}``'s answer):
    its shape is the model's input shape, as the server tells one sample from a batch (rows of flattened samples,
    (N, C·H·W), are a batch)."""
    shape = model.get("input", {}).get("shape") if isinstance(model, dict) else None
    return arr[None] if isinstance(shape, list) and list(arr.shape) == shape else arr


def encode_npy(x: np.ndarray) -> bytes:
    """``x`` as one ``.npy`` (float32, little-endian, C order): what ``np.save`` writes and the server reads."""
    x = np.ascontiguousarray(x, dtype="<f4")
    fp = io.BytesIO()
    npformat.write_array_header_1_0(fp, npformat.header_data_from_array_1_0(x))
    fp.write(x.data)
    return fp.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` answer as float32 (N, C), read with ``allow_pickle=False``: never unpickled."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise exc.SDBError(f"the server's .npy answer is unreadable: {e}", code="malformed_answer") from None
    if arr.dtype.kind != "f" or arr.ndim != 2:
        raise exc.SDBError(f"the server's .npy answer is {arr.dtype} {list(arr.shape)}, not float (N, C)",
                           code="malformed_answer")
    return arr.astype(np.float32, copy=False)


def predict_body(x: np.ndarray, top_k: int) -> bytes:
    return encode_json({"inputs": x.tolist(), "top_k": int(top_k)})


def predict_request(x: np.ndarray, top_k: int, encoding: str) -> dict[str, Any]:
    """``_request`` keywords for one predict batch: a ``.npy`` body (``top_k`` in the query) or JSON.
    The answer is JSON either way (labels are strings)."""
    if encoding == "npy":
        return {"content": encode_npy(x), "params": {"top_k": int(top_k)}, "extra_headers": {"Content-Type": NPY_TYPE}}
    return {"content": predict_body(x, top_k)}


def temper(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Logits / T, checked: softmax of the result is the soft target at temperature T."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits if temperature == 1.0 else (logits / np.float32(temperature)).astype(np.float32)


def distill_body(x: np.ndarray, temperature: float | None) -> bytes:
    body: dict[str, Any] = {"inputs": x.tolist()}
    if temperature is not None:
        body["temperature"] = float(temperature)
    return encode_json(body)


def distill_request(x: np.ndarray, temperature: float | None, encoding: str) -> dict[str, Any]:
    """``_request`` keywords for one distill batch: ``.npy`` in and out (the temperature in the query, for the
    server to check; the soft targets are computed here), or JSON in and out."""
    # Not resent after it may have reached the server (a read timeout, a dropped connection): the keyed path charges
    # the key's quota before the model runs, and a resend would charge it again for one answer. Nor after a 503 the
    # model gave once charged (``charged``: model_timeout, model_out_of_memory; retry_delay).
    if encoding == "npy":
        params = None if temperature is None else {"temperature": float(temperature)}
        return {"content": encode_npy(x), "params": params, "idempotent": False, "charged": True,
                "extra_headers": {"Content-Type": NPY_TYPE, "Accept": f"{NPY_TYPE}, {JSON_TYPE};q=0.5"}}
    return {"content": distill_body(x, temperature), "idempotent": False, "charged": True}


@parses_answer("distill answer")
def parse_distilled(resp: httpx.Response) -> dict[str, Any]:
    """One distill answer as ``{"model", "version", "logits", ...}``, whichever encoding the server answered in."""
    media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != NPY_TYPE:
        return answer_json(resp)
    t = resp.headers.get("sdb-temperature")
    return {"model": unquote(resp.headers.get("sdb-model", "")),
            "version": unquote(resp.headers.get("sdb-model-version", "")),
            "logits": decode_npy(resp.content), "temperature": float(t) if t else None}


def _is_image(obj: Any) -> bool:
    """One image rather than a list of them: a path, a PNG/JPEG file's bytes, or a PIL image."""
    return isinstance(obj, (str, os.PathLike, bytes, bytearray, memoryview)) or type(obj).__module__.startswith("PIL.")


def _image_part(image: Any, i: int) -> tuple[str, tuple[str, bytes, str]]:
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise exc.BadRequest(f"image_path: no image file at {p}", code="invalid_request")
        data, name = p.read_bytes(), p.name
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data, name = bytes(image), f"image-{i}"
    elif type(image).__module__.startswith("PIL."):  # without importing PIL: the SDK does not depend on it
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, name = buf.getvalue(), f"image-{i}.png"
    else:
        raise exc.BadRequest(f"image_path takes image file paths, a PNG/JPEG file's bytes or PIL images, "
                             f"not {type(image).__name__}", code="invalid_input")
    return ("file", (name, data, "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"))


def image_upload(image_path: Any) -> list:
    """multipart ``files`` for one image or several: paths, PNG/JPEG bytes or PIL images (read now, so a
    retry can resend them)."""
    images = [image_path] if _is_image(image_path) or not isinstance(image_path, Iterable) else list(image_path)
    if not images:
        raise exc.BadRequest("image_path is empty", code="invalid_input")
    return [_image_part(im, i) for i, im in enumerate(images)]


@dataclass(frozen=True)
class Distilled:
    """What ``/distill`` answers: the keyed path's logits (N, C), and ``softmax(logits / T)``
    when a temperature was asked for."""

    model: str
    version: str
    logits: np.ndarray
    temperature: float | None = None
    soft_targets: np.ndarray | None = None


def soft_targets(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / T)`` in float32, as the server computes it for a JSON answer."""
    # the top logit off first, as the server does: at a tiny T, logits / T would overflow (Inf - Inf: NaN)
    with np.errstate(over="ignore"):  # to -Inf, whose exp is the 0 it should be; T in float64, where it is not 0
        e = np.exp((logits - logits.max(axis=1, keepdims=True)) / np.float64(temperature))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)


@parses_answer("distill answer")
def merge_distilled(parts: Sequence[dict], temperature: float | None = None,
                    samples: int | None = None) -> Distilled:
    """The batches' answers as one; the soft targets at ``temperature`` computed here when the answers
    (``.npy``: logits alone) do not carry them. ``samples``: how many were sent (one row of logits each). Answers
    from two versions of the model are refused, never merged (``VersionPin`` keeps one call on one)."""
    first = parts[0]
    each = [np.asarray(field(p, "logits"), dtype=np.float32) for p in parts]
    versions = sorted({str(field(p, "version")) for p in parts})
    if len(versions) > 1:
        raise exc.ModelChanged(f"the batches of one call came from versions {versions} of model "
                               f"{field(first, 'model')!r}: the model changed mid-run, and they are not merged",
                               code="model_changed")
    if any(z.ndim != 2 or z.shape[1] != each[0].shape[1] for z in each):
        raise ValueError(f"logits of shapes {[list(z.shape) for z in each][:4]}, not (N, C) rows of one width")
    logits = np.concatenate(each)
    if samples is not None and len(logits) != samples:
        raise ValueError(f"{len(logits)} rows of logits for {samples} samples")
    soft = None
    if all(p.get("soft_targets") is not None for p in parts):
        soft = np.concatenate([np.asarray(p["soft_targets"], dtype=np.float32) for p in parts])
    t = first.get("temperature")
    t = temperature if t is None else t
    if soft is None and t is not None:
        soft = soft_targets(logits, t)
    return Distilled(field(first, "model"), field(first, "version"), logits, t, soft)


@parses_answer("predict answer")
def merge_predictions(parts: Sequence[dict]) -> list[dict]:
    return [pred for p in parts for pred in listed(field(p, "predictions"), "predictions")]


def key_create_body(scopes: str | Sequence[str], models: Sequence[str] | None, quota: int | None,
                    quota_window_s: int | None, expires_days: float | None, name: str) -> bytes:
    scope_list = [s.strip() for s in scopes.split(",")] if isinstance(scopes, str) else list(scopes)
    body: dict[str, Any] = {"scopes": scope_list, "name": name}
    for k, v in (("models", None if models is None else list(models)), ("quota", quota),
                 ("quota_window_s", quota_window_s), ("expires_days", expires_days)):
        if v is not None:
            body[k] = v
    return encode_json(body)


def job_submit_body(kind: str, params: Mapping[str, Any] | None) -> bytes:
    return encode_json({"kind": kind, "params": dict(params or {})})


def idempotency(key: str | None) -> dict[str, Any]:
    """Request options for a job submission: with an Idempotency-Key a resend is harmless."""
    if key is None:
        return {"idempotent": False}
    return {"idempotent": True, "extra_headers": {"Idempotency-Key": key}}


# --------------------------------------------------------------------------- files
FILE_PURPOSES = ("weights", "dataset", "image", "bundle")
FILE_ID_RE = re.compile(r"file-[0-9a-f]{24}")


def deploy_fields(name: str | None, policy: str | None, top_k: int | None, decimals: int | None) -> dict:
    """The ``POST /v1/models`` fields given (the server's defaults stand for the others)."""
    given = {"name": name, "policy": policy, "top_k": top_k, "decimals": decimals}
    return {k: v for k, v in given.items() if v is not None}


# A bundle's own files, the only ones a bundle folder's upload sends (a NOTES.txt, .DS_Store or .git/ beside them is
# left out, as `sdb models add DIR` leaves it): sdb_core.bundle.BUNDLE_FILES, which the SDK cannot import
# (tests/client/test_uploads.py keeps the two alike).
BUNDLE_FILES = ("model.onnx", "meta.json", "key.sealed")


def upload_timeout(timeout: httpx.Timeout) -> httpx.Timeout:
    """The client's ``timeout`` for an upload: its read phase (the server checking the file) at least
    :data:`UPLOAD_READ_TIMEOUT_S`."""
    read = None if timeout.read is None else max(timeout.read, UPLOAD_READ_TIMEOUT_S)
    return httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)


def folder_files(root: Path) -> list[Path]:
    """The files under ``root``, sorted, through symbolic links to folders at any depth (a class folder linked in, a
    linked folder inside a class), as the local ImageFolder loader reads them (``sdb_core.data.imagefolder``: one
    rule for both); a link back to a folder it is in is refused, not followed for ever."""
    found: list[Path] = []
    for d, dirs, files in os.walk(root, followlinks=True):
        here = Path(d)
        real = os.path.realpath(here)
        for parent in (here, *here.parents):
            if parent != here and os.path.realpath(parent) == real:
                raise exc.BadRequest(f"{here} links back to the folder {parent} it is in: cannot upload a loop",
                                     code="invalid_request")
            if parent == root:
                break
        dirs.sort()
        found.extend(here / f for f in files if (here / f).is_file())
    return sorted(found)


@contextlib.contextmanager
def upload_part(path: str | os.PathLike, purpose: str) -> Iterator[tuple[str, Any, str]]:
    """The multipart ``file`` part for ``path``, streamed from disk: a file as it is; a folder zipped
    first (a dataset's ImageFolder tree, or a bundle directory's own files, :data:`BUNDLE_FILES`, as a ``.sdb``)
    into a temporary file."""
    if purpose not in FILE_PURPOSES:
        raise exc.BadRequest(f"purpose must be one of {', '.join(FILE_PURPOSES)}, got {purpose!r}",
                             code="invalid_request")
    p = Path(path)
    if p.is_dir():
        if purpose not in ("dataset", "bundle"):
            raise exc.BadRequest(f"{p} is a folder; a {purpose} is one file", code="invalid_request")
        files = [p / n for n in BUNDLE_FILES if (p / n).is_file()] if purpose == "bundle" else folder_files(p)
        with tempfile.TemporaryFile() as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for f in files:
                    z.write(f, f.relative_to(p).as_posix())
            tmp.seek(0)
            yield (p.name + (".sdb" if purpose == "bundle" else ".zip"), tmp, "application/zip")
        return
    if not p.is_file():
        raise exc.BadRequest(f"no file at {p}", code="invalid_request")
    with open(p, "rb") as f:
        yield (p.name, f, "application/octet-stream")


def rewind(files: Any) -> None:
    """Seek every file object of a multipart ``files`` argument back to its start, for a resend."""
    parts = files.values() if isinstance(files, Mapping) else (files or [])
    for part in parts:
        value = part[1] if isinstance(part, tuple) and len(part) == 2 else part
        obj = value[1] if isinstance(value, tuple) else value
        if hasattr(obj, "seek"):
            obj.seek(0)


def file_fields(purpose: str, shared: bool) -> dict[str, str]:
    return {"purpose": purpose, **({"shared": "true"} if shared else {})}


def listed(obj: Any, name: str) -> list:
    """``[...]`` or ``{"<name>": [...]}``: the list either way."""
    if isinstance(obj, dict):
        obj = field(obj, name)
    if not isinstance(obj, list):
        raise exc.SDBError(f"the server's answer is not a list of {name}: is this URL an SDB server?",
                           code="malformed_answer")
    return list(obj)


# --------------------------------------------------------------------------- lists, a page at a time
class Page(list):
    """One page of a list (files, jobs, keys), newest first: a list of its rows, and ``next``, the ``before`` of the
    page after it (None: this page is the last)."""

    def __init__(self, rows: Iterable[dict] = (), next: str | None = None):
        super().__init__(rows)
        self.next = next


PAGE_MOST = 1000  # the rows a page holds at most (the server's cap)


def paged(obj: Any, name: str) -> Page:
    after = obj.get("next") if isinstance(obj, dict) else None
    return Page(listed(obj, name), after if isinstance(after, str) else None)


def page_params(filters: Mapping[str, Any], limit: int | None, before: str | None) -> dict[str, Any] | None:
    """The query of a list's page: its filters, ``limit`` and ``before``, those given."""
    params = {k: v for k, v in {**filters, "limit": limit, "before": before}.items() if v is not None}
    return params or None


def every(page: Callable[[str | None], Page]) -> Page:
    """Every row of a list, page after page: ``page(before)`` reads the page after ``before`` (None: the first)."""
    rows, before, seen = Page(), None, set()
    while True:
        got = page(before)
        rows.extend(got)
        if got.next is None:
            return rows
        before = _onward(got, seen)


async def every_async(page: Callable[[str | None], Awaitable[Page]]) -> Page:
    """:func:`every` with ``page`` a coroutine function."""
    rows, before, seen = Page(), None, set()
    while True:
        got = await page(before)
        rows.extend(got)
        if got.next is None:
            return rows
        before = _onward(got, seen)


def _onward(got: Page, seen: set[str]) -> str:
    """The page after ``got``: its ``next``, unless a list would go round for ever (a ``next`` given before, or a
    page of no rows that says more follow: a proxy or cache that answers every page alike)."""
    if got.next in seen or not got:
        why = "again" if got else "with no rows"
        raise exc.SDBError(f"the server's list does not move on (page start {got.next!r} {why}): a proxy or cache "
                           "in between may answer every page alike", code="malformed_answer")
    seen.add(got.next)
    return got.next


@dataclass(frozen=True)
class JobLogs:
    """A piece of a job's log and the offset to ask for next (``jobs.logs(id, offset=...)``)."""

    text: str
    offset: int


@parses_answer("job log")
def parse_logs(resp: httpx.Response, offset: int) -> JobLogs:
    """The log route may answer JSON (``text`` or ``lines`` with ``next_offset``/``offset``) or plain text."""
    if resp.headers.get("content-type", "").startswith("application/json"):
        obj = record(answer_json(resp), "job log")
        text = obj.get("text")
        if text is None:
            text = "".join(line if line.endswith("\n") else line + "\n" for line in obj.get("lines") or [])
        if not isinstance(text, str):
            raise TypeError(f"text is a {type(text).__name__}")
        nxt = obj.get("next_offset", obj.get("offset_next", None))
        if nxt is None:
            nxt = offset + len(text.encode())
        return JobLogs(text, int(nxt))
    nxt = resp.headers.get("x-next-offset")
    return JobLogs(resp.text, int(nxt) if nxt else offset + len(resp.content))


def download_target(name: str, dest: str | os.PathLike | None) -> Path:
    """Where an artifact lands: ``dest`` itself, or ``dest/<name>`` if it is a directory (default: cwd)."""
    base = Path(name).name
    if not base or base in (".", ".."):
        raise exc.BadRequest(f"not an artifact name: {name!r}", code="invalid_request")
    if dest is None:
        return Path.cwd() / base
    d = Path(dest)
    if str(dest).endswith(("/", os.sep)) and not d.is_dir():  # "out/": a folder, made here, not a file named out
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise exc.BadRequest(f"cannot make the folder {d} for {base}: {e.strerror or e}",
                                 code="invalid_request") from None
    if d.is_dir():
        return d / base
    if not d.parent.is_dir():
        raise exc.BadRequest(f"cannot save {base} as {d}: no folder {d.parent}", code="invalid_request")
    return d
