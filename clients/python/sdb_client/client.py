"""The synchronous client. ``AsyncClient`` (``async_client.py``) has the same methods."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import count
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from . import _base as b
from ._base import Distilled, Inputs, JobLogs
from ._exceptions import BadRequest

T = TypeVar("T")


class Client(b.BaseClient):
    """SDB over HTTP.

    ``url`` defaults to ``SDB_URL`` (else http://127.0.0.1:8000), ``api_key`` to
    ``SDB_API_KEY`` (none: public predict only). ``timeout`` (seconds or an
    ``httpx.Timeout``), ``max_retries``, ``batch_size`` (samples per request) and ``encoding``
    (how tensors travel: ``"npy"``, the default, or ``"json"``) override the defaults in ``_base``;
    ``with_options`` overrides them for some calls only. A loopback server is reached directly, any other through
    the proxy ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` name unless ``NO_PROXY`` does (docs/sdk.md#proxies); a
    given ``http_client`` is used as it is, in the process that made it only.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, max_retries: int | None = None,
                 batch_size: int | None = None, encoding: str | None = None,
                 http_client: httpx.Client | None = None):
        super().__init__(url, api_key, timeout=timeout, max_retries=max_retries, batch_size=batch_size,
                         encoding=encoding)
        self._proxy = None if http_client is not None else b.env_proxy(self.base_url)
        self._http = http_client or self._new_http()
        self._owns_http = self._made_http = http_client is None
        self._pid = os.getpid()
        self.keys = Keys(self)
        self.jobs = Jobs(self)
        self.files = Files(self)

    def with_options(self, *, timeout: float | httpx.Timeout | None = None, max_retries: int | None = None,
                     batch_size: int | None = None, encoding: str | None = None) -> Client:
        """A client sharing this one's connections, with some options replaced:
        ``client.with_options(max_retries=0).models()``."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.options = b.Options.make(timeout, max_retries, batch_size, base=self.options, encoding=encoding)
        other._owns_http = False
        other.keys, other.jobs, other.files = Keys(other), Jobs(other), Files(other)
        return other

    def close(self) -> None:
        if self._owns_http and self._pid == os.getpid():
            self._http.close()

    def _new_http(self) -> httpx.Client:
        return b.new_http(httpx.Client, httpx.HTTPTransport, self.options.timeout, self._proxy)

    def _client(self) -> httpx.Client:
        """This process's ``httpx.Client``. In a child forked after a request (a multiprocessing or DataLoader worker),
        the pool's keep-alive sockets are the parent's: two processes on one socket read each other's answers. The child
        leaves them to the parent, unclosed (b.FORKED keeps them), and makes its own; a given ``http_client`` is
        refused there, as the SDK cannot make one like it."""
        if self._pid != os.getpid():
            if not self._made_http:
                raise b.forked_http_client(self._pid)
            b.FORKED.append(self._http)
            self._http, self._owns_http, self._pid = self._new_http(), True, os.getpid()
        return self._http

    def __getstate__(self) -> dict:
        """URL, key and options (a spawned worker's copy); the connections are not pickled, the copy makes its own."""
        return {"url": self.base_url, "api_key": self._api_key, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        o = state["options"]
        self.__init__(state["url"], state["api_key"], timeout=o.timeout, max_retries=o.max_retries,
                      batch_size=o.batch_size, encoding=o.encoding)
        self._api_key = state["api_key"]  # None stays None, not SDB_API_KEY of the process that unpickles

    def __enter__(self) -> Client:  # noqa: PYI034  (typing.Self needs 3.11)
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, *, content: bytes | None = None,
                 params: Mapping[str, Any] | None = None, files: Any = None, data: Any = None,
                 idempotent: bool = True, charged: bool = False, stream: bool = False,
                 extra_headers: Mapping[str, str] | None = None) -> httpx.Response:
        """Send with the retry policy of ``_base.retry_delay``; a non-2xx answer raises its typed error.
        With ``stream`` the caller reads and closes the response; ``charged``: the server charges a quota for it
        before the model runs (a 503 is then resent only when nothing was charged)."""
        headers = {**self._headers(), **(extra_headers or {})}
        if content is not None:
            headers.setdefault("Content-Type", b.JSON_TYPE)
        http, waited = self._client(), 0.0
        for attempt in count():
            b.rewind(files)
            try:
                req = http.build_request(method, self._url(path), content=content, params=params,
                                         files=files, data=data, headers=headers,
                                         timeout=self.options.timeout)
                resp = http.send(req, stream=stream)
            except httpx.TransportError as e:
                delay = b.retry_delay(attempt, self.options.max_retries, error=e, idempotent=idempotent)
                if delay is None:
                    raise b.connection_error(e, self.base_url, attempt + 1, self._proxy) from None
                b.log_retry(method, path, delay, attempt, self.options.max_retries, error=e)
                time.sleep(delay)
                waited += delay
                continue
            if resp.is_success:
                return resp
            if stream:
                resp.read()
                resp.close()
            error = b.error_from_response(resp.status_code, resp.content, resp.headers)
            delay = b.retry_delay(attempt, self.options.max_retries, status=resp.status_code, headers=resp.headers,
                                  charged=charged, code=error.code, waited=waited)
            if delay is None:
                raise error
            b.log_retry(method, path, delay, attempt, self.options.max_retries, status=resp.status_code,
                        headers=resp.headers, body=resp.content)
            time.sleep(delay)
            waited += delay
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return b.answer_json(self._request(method, path, **kw))

    # ------------------------------------------------------------------ models
    def models(self) -> list[dict]:
        """The models being served (name, version, versions, mode, distillable, labels, input...)."""
        return b.field(self._json("GET", "/v1/models"), "models")

    def model(self, name: str, *, version: str | int | None = None) -> dict:
        """One model's description (input shape, normalisation, labels, versions, output policy); of ``version``
        when given, else of its highest version."""
        return self._json("GET", b.model_path(name), params=b.version_params(version))

    def _batches(self, name: str, x: np.ndarray, batch_size: int | None, pin: b.VersionPin, encoding: str,
                 *, cut: bool = False) -> tuple[np.ndarray, b.Batches]:
        """``x`` with its batch axis, asked of the model where it is cut into requests (or about to be: ``cut``),
        and how it is cut. The description's version is ``pin``'s from then on: the requests to come ask for it."""
        plan = self._tensor_batches(x, batch_size, encoding)
        if cut or b.needs_rank(x, plan.end(0)):
            info = self.model(name, version=pin.version)
            pin.learn(info)
            x = b.with_batch_axis(x, info)
            plan = self._tensor_batches(x, batch_size, encoding)
        return x, plan

    def _send_tensors(self, name: str, x: np.ndarray, batch_size: int | None, pin: b.VersionPin,
                      encoding: str, send: Callable[[np.ndarray], T],
                      answered: Callable[[b.exc.SDBError, list[T]], b.exc.SDBError] | None = None,
                      ) -> tuple[np.ndarray, list[T]]:
        """``send(batch)`` for each request of ``x``, in order (``_one_by_one``); ``x`` with its batch axis, and the
        answers."""
        x, plan = self._batches(name, x, batch_size, pin, encoding)
        if plan.end(0) == len(x):  # one request: x may be one sample without its batch axis (the server tells)
            try:
                return x, [send(x)]
            except b.exc.SDBError as e:
                if not b.refused_for_size(e):
                    raise
                x, plan = self._batches(name, x, batch_size, pin, encoding, cut=True)  # a batch, to halve?
                if not plan.smaller(e, 0, len(x)):  # one sample: nothing to halve
                    raise
        return x, self._one_by_one(x, plan, send, answered)

    @staticmethod
    def _one_by_one(items: Sequence[Any], plan: b.Batches, send: Callable[[Any], T],
                    answered: Callable[[b.exc.SDBError, list[T]], b.exc.SDBError] | None = None) -> list[T]:
        """``send(items[start:end])`` for the requests ``plan`` cuts, one after the other; the answers in order. A
        request refused for its size (nothing charged) is sent again in halves, and the later ones are no larger;
        any other error stops the call, carrying ``answered(error, answers before it)`` when given."""
        parts: list[T] = []
        start = 0
        while start < len(items):
            end = plan.end(start)
            try:
                parts.append(send(items[start:end]))
            except b.exc.SDBError as e:
                if plan.smaller(e, start, end):
                    continue
                raise (e if answered is None else answered(e, parts)) from None
            start = end
        return parts

    def predict(self, name: str, inputs: Inputs | None = None, *,
                image_path: b.Images = None, top_k: int = 1, version: str | int | None = None,
                batch_size: int | None = None, encoding: str | None = None) -> list[dict]:
        """Top-k labels through the public path, one ``{"labels", "indices", "scores"}`` per sample,
        in input order. Give normalised float ``inputs`` (any batch size: sent in batches, as ``.npy`` or
        with ``encoding="json"`` as JSON; one sample without its batch axis is one sample) or images as
        ``image_path``: file paths, a PNG/JPEG file's bytes or PIL images, one or a list (sent in batches too).
        ``version`` pins a version of the model (default: its highest, which a new deploy changes)."""
        b.check_batch_size(batch_size)
        path, pin = b.model_path(name, "predict"), b.VersionPin(name, version)
        if (inputs is None) == (image_path is None):
            raise BadRequest("give either inputs or image_path", code="invalid_request")
        if image_path is not None:
            images = b.image_upload(image_path)
            parts = self._one_by_one(images, self._image_batches(images, batch_size), lambda files: self._json(
                "POST", path, files=files, data={"top_k": str(top_k)}, params=pin.params()))
            return b.merge_predictions(parts)
        x, enc = b.as_array(inputs), self._encoding(encoding)
        try:
            _, parts = self._send_tensors(name, x, batch_size, pin, enc, lambda xb: self._json(
                "POST", path, **b.with_params(b.predict_request(xb, top_k, enc), pin.params())))
        except b.exc.SDBError as e:
            if not self._npy_refused(e, encoding, enc):
                raise
            return self.predict(name, inputs, top_k=top_k, version=version, batch_size=batch_size)
        return b.merge_predictions(parts)

    def distill(self, name: str, inputs: Inputs, temperature: float | None = None, *,
                version: str | int | None = None, batch_size: int | None = None,
                encoding: str | None = None) -> Distilled:
        """The keyed path (a key with the ``distill`` scope for ``name``): logits, and with
        ``temperature`` also ``softmax(logits / T)``. Batched, in input order; the tensors travel
        as ``.npy`` (the default) or with ``encoding="json"`` as JSON, with the same answer. ``version``
        pins a version of the model (default: its highest when the call starts, kept for all its batches: a deploy
        during the call changes nothing, and that version removed during it is a ``ModelChanged``). An error
        part-way carries the logits answered before it as ``partial`` (``partial_rows``)."""
        return self._distill(name, inputs, temperature, b.VersionPin(name, version), batch_size, encoding)

    def _distill(self, name: str, inputs: Inputs, temperature: float | None, pin: b.VersionPin,
                 batch_size: int | None, encoding: str | None) -> Distilled:
        """``distill`` on ``pin``'s version (a ``RemoteTeacher`` keeps one pin for all its calls)."""
        b.check_temperature(temperature, optional=True)
        b.check_batch_size(batch_size)
        x, enc = b.as_array(inputs), self._encoding(encoding)
        path = b.model_path(name, "distill")
        try:
            x, parts = self._send_tensors(
                name, x, batch_size, pin, enc, lambda xb: self._distill_part(path, xb, temperature, enc, pin),
                answered=lambda e, done: b.with_partial(e, [p["logits"] for p in done]))
        except b.exc.SDBError as e:
            if not self._npy_refused(e, encoding, enc):
                raise pin.gone(e) from None
            return self._distill(name, inputs, temperature, pin, batch_size, None)
        return b.merge_distilled(parts, temperature, samples=len(x))

    def _distill_part(self, path: str, xb: np.ndarray, temperature: float | None, enc: str,
                      pin: b.VersionPin) -> dict:
        kw = b.with_params(b.distill_request(xb, temperature, enc), pin.params())
        part = b.parse_distilled(self._request("POST", path, **kw))
        pin.answered(part)
        return part

    def distill_logits(self, name: str, inputs: Inputs, temperature: float = 1.0, *,
                       version: str | int | None = None, batch_size: int | None = None,
                       encoding: str | None = None) -> np.ndarray:
        """The keyed path's logits divided by ``temperature``, (N, C) float32, in input order:
        their softmax is the soft target at that temperature (1.0: the raw logits)."""
        b.check_temperature(temperature)
        try:
            d = self.distill(name, inputs, version=version, batch_size=batch_size, encoding=encoding)
        except b.exc.SDBError as e:
            b.tempered(e, temperature)
            raise
        return b.temper(d.logits, temperature)

    def remove_model(self, name: str, *, version: str | int | None = None) -> list[dict]:
        """Stop serving a model (an ``admin`` key, or the ``deploy`` key that owns its name): every version, or
        only ``version``. Returns the ``{"name", "version"}`` removed."""
        return b.listed(self._json("DELETE", b.model_path(name), params=b.version_params(version)), "removed")

    def release_model_name(self, name: str, *, to: str | None = None) -> dict:
        """Release the claim on a model name that serves no version (an ``admin`` key): the next key to deploy
        under it claims it, or with ``to`` (a key id) it becomes that key's. Returns ``{"name", "owner",
        "previous_owner"}``."""
        return self._json("POST", b.model_path(name, "release"), content=b.encode_json({"to": to} if to else {}))

    def deploy_model(self, bundle: str | os.PathLike, *, name: str | None = None, policy: str | None = None,
                     top_k: int | None = None, decimals: int | None = None) -> dict:
        """Serve a bundle (a key with the ``deploy`` scope, or admin) as the next version of its name
        (or ``name``): a ``.sdb`` file or bundle folder, uploaded; or a ``file-…`` id of purpose bundle.
        ``policy`` (``probs``, ``top_k`` or ``label``), ``top_k`` and ``decimals`` set what its public
        routes return; the server's defaults stand for those not given."""
        fields = b.deploy_fields(name, policy, top_k, decimals)
        if isinstance(bundle, str) and b.FILE_ID_RE.fullmatch(bundle):
            return self._json("POST", "/v1/models", content=b.encode_json({"file": bundle, **fields}), idempotent=False)
        with b.upload_part(bundle, "bundle") as part:
            return self._json("POST", "/v1/models", files={"file": part},
                              data={k: str(v) for k, v in fields.items()} or None, idempotent=False)


class Keys:
    """``/v1/keys``: needs a key with the ``admin`` scope."""

    def __init__(self, client: Client):
        self._c = client

    def create(self, scopes: str | Sequence[str], *, models: Sequence[str] | None = None,
               quota: int | None = None, quota_window_s: int | None = None,
               expires_days: float | None = None, name: str = "") -> dict:
        """A new key; the answer's ``"key"`` is its secret, shown this once."""
        body = b.key_create_body(scopes, models, quota, quota_window_s, expires_days, name)
        return self._c._json("POST", "/v1/keys", content=body, idempotent=False)

    def list(self, *, limit: int | None = None, before: str | None = None, all: bool = False) -> b.Page:
        """Keys newest first: one page (the server's 1000; ``limit`` 1 to 1000), whose ``next`` is the ``before`` of
        the page after it (None: the last); ``all``: every key, read ``limit`` (default 1000) at a time."""
        if all:
            return b.every(lambda after: self.list(limit=limit or b.PAGE_MOST, before=after))
        return b.paged(self._c._json("GET", "/v1/keys", params=b.page_params({}, limit, before)), "keys")

    def revoke(self, key_id: str) -> dict:
        return self._c._json("DELETE", b.key_path(key_id))


class Files:
    """``/v1/files``: needs a key with the ``jobs`` or ``deploy`` scope. A file belongs to the key that
    uploaded it; jobs and deploys name it by its ``id``."""

    def __init__(self, client: Client):
        self._c = client

    def upload(self, path: str | os.PathLike, purpose: str, *, shared: bool = False,
               timeout: float | httpx.Timeout | None = None) -> dict:
        """Upload ``path`` as ``weights``, ``dataset`` (a zip or folder of an ImageFolder tree, or an
        ``.npz``), ``image`` or ``bundle``; the server checks it first. ``shared`` (admin keys): every
        key may use it. ``timeout``: by default the client's, waiting for the server's check at least
        ``UPLOAD_READ_TIMEOUT_S`` (30 minutes: a large dataset's check takes minutes)."""
        c = self._c.with_options(timeout=b.upload_timeout(self._c.options.timeout) if timeout is None else timeout)
        with b.upload_part(path, purpose) as part:
            return c._json("POST", "/v1/files", files={"file": part}, data=b.file_fields(purpose, shared),
                           idempotent=False)

    def list(self, *, limit: int | None = None, before: str | None = None, all: bool = False) -> b.Page:
        """This key's files and the shared ones (every file with an admin key), newest first: one page (the server's
        1000; ``limit`` 1 to 1000), whose ``next`` is the ``before`` of the page after it (None: the last);
        ``all``: every file, read ``limit`` (default 1000) at a time."""
        if all:
            return b.every(lambda after: self.list(limit=limit or b.PAGE_MOST, before=after))
        return b.paged(self._c._json("GET", "/v1/files", params=b.page_params({}, limit, before)), "files")

    def get(self, file_id: str) -> dict:
        return self._c._json("GET", b.file_path(file_id))

    def delete(self, file_id: str) -> dict:
        return self._c._json("DELETE", b.file_path(file_id))


class Jobs:
    """``/v1/jobs``: needs a key with the ``jobs`` scope."""

    def __init__(self, client: Client):
        self._c = client

    def submit(self, kind: str, params: Mapping[str, Any] | None = None, *,
               idempotency_key: str | None = None) -> dict:
        """Queue a job (``wrap``, ``distill``, ``audit``, ...); the answer carries its ``id``.
        With ``idempotency_key`` a resend returns the same job, so it is retried like a read."""
        return self._c._json("POST", "/v1/jobs", content=b.job_submit_body(kind, params),
                             **b.idempotency(idempotency_key))

    def get(self, job_id: str) -> dict:
        return b.record(self._c._json("GET", b.job_path(job_id)), "job")

    def list(self, *, limit: int | None = None, before: str | None = None, all: bool = False,
             **filters: Any) -> b.Page:
        """Jobs newest first: one page (the server's 100; ``limit`` 1 to 1000), whose ``next`` is the ``before`` of
        the page after it (None: the last); ``all``: every job, read ``limit`` (default 1000) at a time. ``filters``
        become query parameters (``status="running"``, ``kind="audit"``; ``model="mnist"``, with ``version="2"``:
        the jobs whose target is that model)."""
        if all:
            return b.every(lambda after: self.list(limit=limit or b.PAGE_MOST, before=after, **filters))
        return b.paged(self._c._json("GET", "/v1/jobs", params=b.page_params(filters, limit, before)), "jobs")

    def cancel(self, job_id: str) -> dict:
        return self._c._json("POST", b.job_path(job_id, "cancel"))

    def delete(self, job_id: str) -> dict:
        """Delete a finished job: its record, log and artifacts, which no longer count against the key's
        artifact storage cap. A queued or running job is refused (409): cancel it first."""
        return self._c._json("DELETE", b.job_path(job_id))

    def logs(self, job_id: str, offset: int = 0) -> JobLogs:
        """The log from byte ``offset``; pass the answer's ``offset`` to get only what is new."""
        return b.parse_logs(self._c._request("GET", b.job_path(job_id, "logs"), params={"offset": offset}), offset)

    def artifacts(self, job_id: str) -> list[dict]:
        return b.listed(self._c._json("GET", b.job_path(job_id, "artifacts")), "artifacts")

    def download(self, job_id: str, name: str, dest: str | os.PathLike | None = None) -> Path:
        """Stream artifact ``name`` to ``dest`` (a file, or a directory; default the current one)."""
        target = b.download_target(name, dest)
        tmp = target.with_name(target.name + ".part")
        resp = self._c._request("GET", b.job_path(job_id, "artifacts", name), stream=True)
        try:
            with open(tmp, "wb") as f:
                f.writelines(resp.iter_bytes())
            os.replace(tmp, target)  # a folder of that name: refused here, the .part removed below
        except httpx.TransportError as e:  # the body cut short or stalled: the SDK's error, as for any request
            tmp.unlink(missing_ok=True)
            raise b.connection_error(e, self._c.base_url, proxy=self._c._proxy) from None
        except BaseException:
            tmp.unlink(missing_ok=True)  # no half-written .part left behind
            raise
        finally:
            resp.close()
        return target

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = b.DEFAULT_POLL_S) -> dict:
        """Poll until the job is succeeded, failed or cancelled, and return it; ``TimeoutError``
        after ``timeout`` seconds. A failed job is returned, not raised: check ``status``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.get("status") in b.JOB_DONE:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.get('status')!r} after {timeout} s")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))


__all__ = ["Client", "Files", "Jobs", "Keys"]
