"""The asyncio client: the methods of ``Client``, with ``async def``.

The batches of one ``predict``/``distill`` call go out concurrently (at most
``max_concurrency`` in flight) and come back in input order.
"""
from __future__ import annotations

import asyncio
import heapq
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from itertools import count
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from . import _base as b
from ._base import Distilled, Inputs, JobLogs
from ._exceptions import BadRequest

T = TypeVar("T")


# What an error that stops a call part-way carries: partial(error, answers before it, (start, answer) past it)
Partial = Callable[[b.exc.SDBError, list[Any], list[tuple[int, Any]]], Any]


class AsyncClient(b.BaseClient):
    """SDB over HTTP from asyncio; see ``Client`` for the arguments. Use ``async with`` or
    ``await client.aclose()``."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, max_retries: int | None = None,
                 batch_size: int | None = None, encoding: str | None = None,
                 max_concurrency: int = b.DEFAULT_MAX_CONCURRENCY, http_client: httpx.AsyncClient | None = None):
        super().__init__(url, api_key, timeout=timeout, max_retries=max_retries, batch_size=batch_size,
                         encoding=encoding)
        if max_concurrency < 1:
            raise b.exc.ConfigurationError(f"max_concurrency must be >= 1, got {max_concurrency}",
                                           code="invalid_option")
        self.max_concurrency = max_concurrency
        self._proxy = None if http_client is not None else b.env_proxy(self.base_url)
        self._http = http_client or self._new_http()
        self._owns_http = self._made_http = http_client is None
        self._pid, self._loop = os.getpid(), None  # the process and event loop self._http's connections belong to
        self.keys = AsyncKeys(self)
        self.jobs = AsyncJobs(self)
        self.files = AsyncFiles(self)

    def with_options(self, *, timeout: float | httpx.Timeout | None = None, max_retries: int | None = None,
                     batch_size: int | None = None, encoding: str | None = None) -> AsyncClient:
        """A client sharing this one's connections, with some options replaced."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.options = b.Options.make(timeout, max_retries, batch_size, base=self.options, encoding=encoding)
        other._owns_http = False
        other.keys, other.jobs, other.files = AsyncKeys(other), AsyncJobs(other), AsyncFiles(other)
        return other

    async def aclose(self) -> None:
        if self._owns_http and self._pid == os.getpid() and self._loop in (None, asyncio.get_running_loop()):
            await self._http.aclose()

    def _new_http(self) -> httpx.AsyncClient:
        return b.new_http(httpx.AsyncClient, httpx.AsyncHTTPTransport, self.options.timeout, self._proxy)

    def _client(self) -> httpx.AsyncClient:
        """This process's and event loop's ``httpx.AsyncClient``: its connections belong to the loop that opened them,
        so a second ``asyncio.run()`` (or a forked child, as ``Client._client``) gets a new one; the old one is left
        unclosed (its loop is gone, or its sockets are the parent's). A given ``http_client`` is kept as it is, and
        refused in a forked child (``Client._client``)."""
        loop = asyncio.get_running_loop()
        if self._pid != os.getpid() and not self._made_http:
            raise b.forked_http_client(self._pid)
        if self._made_http and (self._pid != os.getpid() or self._loop not in (None, loop)):
            if self._pid != os.getpid():
                b.FORKED.append(self._http)
            self._http, self._owns_http, self._pid = self._new_http(), True, os.getpid()
        self._loop = loop
        return self._http

    async def __aenter__(self) -> AsyncClient:  # noqa: PYI034
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ transport
    async def _request(self, method: str, path: str, *, content: bytes | None = None,
                       params: Mapping[str, Any] | None = None, files: Any = None, data: Any = None,
                       idempotent: bool = True, charged: bool = False, stream: bool = False,
                 extra_headers: Mapping[str, str] | None = None) -> httpx.Response:
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
                resp = await http.send(req, stream=stream)
            except httpx.TransportError as e:
                delay = b.retry_delay(attempt, self.options.max_retries, error=e, idempotent=idempotent)
                if delay is None:
                    raise b.connection_error(e, self.base_url, attempt + 1, self._proxy) from None
                b.log_retry(method, path, delay, attempt, self.options.max_retries, error=e)
                await asyncio.sleep(delay)
                waited += delay
                continue
            if resp.is_success:
                return resp
            if stream:
                await resp.aread()
                await resp.aclose()
            error = b.error_from_response(resp.status_code, resp.content, resp.headers)
            delay = b.retry_delay(attempt, self.options.max_retries, status=resp.status_code, headers=resp.headers,
                                  charged=charged, code=error.code, waited=waited)
            if delay is None:
                raise error
            b.log_retry(method, path, delay, attempt, self.options.max_retries, status=resp.status_code,
                        headers=resp.headers, body=resp.content)
            await asyncio.sleep(delay)
            waited += delay
        raise AssertionError("unreachable")

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        return b.answer_json(await self._request(method, path, **kw))

    async def _in_order(self, items: Sequence[Any], plan: b.Batches, send: Callable[[Any], Awaitable[T]],
                        partial: Partial | None = None) -> list[T]:
        """``send(items[start:end])`` for the requests ``plan`` cuts, at most ``max_concurrency`` at once; the answers
        in order. A request refused for its size (nothing charged) is sent again in halves, and the later ones are no
        larger. After any other error no request starts; the first error (in input order) is raised once those
        running have finished, carrying ``partial(error, answers of the requests before it, (start, answer) of those
        answered past it)`` when given: the ones in flight were answered, and charged, too."""
        todo: list[tuple[int, int]] = [(0, len(items))]  # samples not yet sent, as (start, stop), by start
        answers: dict[int, tuple[int, T]] = {}  # start: (end, answer)
        errors: dict[int, BaseException] = {}  # start: error

        async def worker() -> None:
            while todo and not errors:
                start, stop = heapq.heappop(todo)
                end = plan.end(start, stop)
                if end < stop:
                    heapq.heappush(todo, (end, stop))
                try:
                    answers[start] = (end, await send(items[start:end]))
                except BaseException as e:  # noqa: BLE001 - raised below, once the others have finished
                    if plan.smaller(e, start, end):
                        heapq.heappush(todo, (start, end))
                    else:
                        errors[start] = e

        await asyncio.gather(*(worker() for _ in range(self.max_concurrency)))
        done = sorted(answers.items())
        if not errors:
            return [answer for _, (_, answer) in done]
        first = min(errors)
        error = errors[first]
        if partial is not None and isinstance(error, b.exc.SDBError):
            before, after, row = [], [], 0
            for start, (end, answer) in done:
                if start == row and start < first:  # the requests from the first sample on, with no gap
                    before.append(answer)
                    row = end
                else:
                    after.append((start, answer))
            partial(error, before, after)
        raise error

    # ------------------------------------------------------------------ models
    async def models(self) -> list[dict]:
        return b.field(await self._json("GET", "/v1/models"), "models")

    async def model(self, name: str, *, version: str | int | None = None) -> dict:
        return await self._json("GET", b.model_path(name), params=b.version_params(version))

    async def _batches(self, name: str, x: np.ndarray, batch_size: int | None, pin: b.VersionPin,
                       encoding: str, *, cut: bool = False) -> tuple[np.ndarray, b.Batches]:
        """``Client._batches``: the description's version pinned before the concurrent requests go."""
        plan = self._tensor_batches(x, batch_size, encoding)
        if cut or b.needs_rank(x, plan.end(0)):
            info = await self.model(name, version=pin.version)
            pin.learn(info)
            x = b.with_batch_axis(x, info)
            plan = self._tensor_batches(x, batch_size, encoding)
        return x, plan

    async def _send_tensors(self, name: str, x: np.ndarray, batch_size: int | None, pin: b.VersionPin,
                            encoding: str, send: Callable[[np.ndarray], Awaitable[T]],
                            partial: Partial | None = None) -> tuple[np.ndarray, list[T]]:
        """``Client._send_tensors``, its requests sent concurrently (``_in_order``)."""
        x, plan = await self._batches(name, x, batch_size, pin, encoding)
        if plan.end(0) == len(x):  # one request: x may be one sample without its batch axis (the server tells)
            try:
                return x, [await send(x)]
            except b.exc.SDBError as e:
                if not b.refused_for_size(e):
                    raise
                x, plan = await self._batches(name, x, batch_size, pin, encoding, cut=True)
                if not plan.smaller(e, 0, len(x)):  # one sample: nothing to halve
                    raise
        return x, await self._in_order(x, plan, send, partial)

    async def predict(self, name: str, inputs: Inputs | None = None, *,
                      image_path: b.Images = None, top_k: int = 1, version: str | int | None = None,
                      batch_size: int | None = None, encoding: str | None = None) -> list[dict]:
        b.check_batch_size(batch_size)
        path, pin = b.model_path(name, "predict"), b.VersionPin(name, version)
        if (inputs is None) == (image_path is None):
            raise BadRequest("give either inputs or image_path", code="invalid_request")
        if image_path is not None:
            images = b.image_upload(image_path)
            parts = await self._in_order(images, self._image_batches(images, batch_size), lambda files: self._json(
                "POST", path, files=files, data={"top_k": str(top_k)}, params=pin.params()))
            return b.merge_predictions(parts)
        x, enc = b.as_array(inputs), self._encoding(encoding)
        try:
            _, parts = await self._send_tensors(name, x, batch_size, pin, enc, lambda xb: self._json(
                "POST", path, **b.with_params(b.predict_request(xb, top_k, enc), pin.params())))
        except b.exc.SDBError as e:
            if not self._npy_refused(e, encoding, enc):
                raise
            return await self.predict(name, inputs, top_k=top_k, version=version, batch_size=batch_size)
        return b.merge_predictions(parts)

    async def _distill_part(self, path: str, xb: np.ndarray, temperature: float | None, enc: str,
                            pin: b.VersionPin) -> dict:
        kw = b.with_params(b.distill_request(xb, temperature, enc), pin.params())
        part = b.parse_distilled(await self._request("POST", path, **kw))
        pin.answered(part)
        return part

    async def distill(self, name: str, inputs: Inputs, temperature: float | None = None, *,
                      version: str | int | None = None, batch_size: int | None = None,
                      encoding: str | None = None) -> Distilled:
        """``Client.distill``: one version for all the call's batches (the description's, asked before they go)."""
        return await self._distill(name, inputs, temperature, b.VersionPin(name, version), batch_size, encoding)

    async def _distill(self, name: str, inputs: Inputs, temperature: float | None, pin: b.VersionPin,
                       batch_size: int | None, encoding: str | None) -> Distilled:
        b.check_temperature(temperature, optional=True)
        b.check_batch_size(batch_size)
        x, enc = b.as_array(inputs), self._encoding(encoding)
        path = b.model_path(name, "distill")
        try:
            x, parts = await self._send_tensors(
                name, x, batch_size, pin, enc, lambda xb: self._distill_part(path, xb, temperature, enc, pin),
                partial=lambda e, before, after: b.with_partial(e, [p["logits"] for p in before],
                                                                [(i, p["logits"]) for i, p in after]))
        except b.exc.SDBError as e:
            if not self._npy_refused(e, encoding, enc):
                raise pin.gone(e) from None
            return await self._distill(name, inputs, temperature, pin, batch_size, None)
        return b.merge_distilled(parts, temperature, samples=len(x))

    async def distill_logits(self, name: str, inputs: Inputs, temperature: float = 1.0, *,
                             version: str | int | None = None, batch_size: int | None = None,
                             encoding: str | None = None) -> np.ndarray:
        b.check_temperature(temperature)
        try:
            distilled = await self.distill(name, inputs, version=version, batch_size=batch_size, encoding=encoding)
        except b.exc.SDBError as e:
            b.tempered(e, temperature)
            raise
        return b.temper(distilled.logits, temperature)

    async def remove_model(self, name: str, *, version: str | int | None = None) -> list[dict]:
        """Stop serving a model (an ``admin`` key, or the ``deploy`` key that owns its name): every version, or
        only ``version``."""
        return b.listed(await self._json("DELETE", b.model_path(name), params=b.version_params(version)), "removed")

    async def release_model_name(self, name: str, *, to: str | None = None) -> dict:
        """Release the claim on a model name that serves no version (an ``admin`` key): the next key to deploy
        under it claims it, or with ``to`` (a key id) it becomes that key's."""
        return await self._json("POST", b.model_path(name, "release"), content=b.encode_json({"to": to} if to else {}))

    async def deploy_model(self, bundle: str | os.PathLike, *, name: str | None = None, policy: str | None = None,
                           top_k: int | None = None, decimals: int | None = None) -> dict:
        fields = b.deploy_fields(name, policy, top_k, decimals)
        if isinstance(bundle, str) and b.FILE_ID_RE.fullmatch(bundle):
            body = {"file": bundle, **fields}
            return await self._json("POST", "/v1/models", content=b.encode_json(body), idempotent=False)
        with b.upload_part(bundle, "bundle") as part:
            return await self._json("POST", "/v1/models", files={"file": part},
                                    data={k: str(v) for k, v in fields.items()} or None, idempotent=False)


class AsyncKeys:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def create(self, scopes: str | Sequence[str], *, models: Sequence[str] | None = None,
                     quota: int | None = None, quota_window_s: int | None = None,
                     expires_days: float | None = None, name: str = "") -> dict:
        body = b.key_create_body(scopes, models, quota, quota_window_s, expires_days, name)
        return await self._c._json("POST", "/v1/keys", content=body, idempotent=False)

    async def list(self, *, limit: int | None = None, before: str | None = None, all: bool = False) -> b.Page:
        if all:
            return await b.every_async(lambda after: self.list(limit=limit or b.PAGE_MOST, before=after))
        return b.paged(await self._c._json("GET", "/v1/keys", params=b.page_params({}, limit, before)), "keys")

    async def revoke(self, key_id: str) -> dict:
        return await self._c._json("DELETE", b.key_path(key_id))


class AsyncFiles:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def upload(self, path: str | os.PathLike, purpose: str, *, shared: bool = False,
                     timeout: float | httpx.Timeout | None = None) -> dict:
        c = self._c.with_options(timeout=b.upload_timeout(self._c.options.timeout) if timeout is None else timeout)
        with b.upload_part(path, purpose) as part:
            return await c._json("POST", "/v1/files", files={"file": part},
                                 data=b.file_fields(purpose, shared), idempotent=False)

    async def list(self, *, limit: int | None = None, before: str | None = None, all: bool = False) -> b.Page:
        if all:
            return await b.every_async(lambda after: self.list(limit=limit or b.PAGE_MOST, before=after))
        return b.paged(await self._c._json("GET", "/v1/files", params=b.page_params({}, limit, before)), "files")

    async def get(self, file_id: str) -> dict:
        return await self._c._json("GET", b.file_path(file_id))

    async def delete(self, file_id: str) -> dict:
        return await self._c._json("DELETE", b.file_path(file_id))


class AsyncJobs:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def submit(self, kind: str, params: Mapping[str, Any] | None = None, *,
                     idempotency_key: str | None = None) -> dict:
        return await self._c._json("POST", "/v1/jobs", content=b.job_submit_body(kind, params),
                                   **b.idempotency(idempotency_key))

    async def get(self, job_id: str) -> dict:
        return b.record(await self._c._json("GET", b.job_path(job_id)), "job")

    async def list(self, *, limit: int | None = None, before: str | None = None, all: bool = False,
                   **filters: Any) -> b.Page:
        if all:
            return await b.every_async(lambda after: self.list(limit=limit or b.PAGE_MOST, before=after, **filters))
        return b.paged(await self._c._json("GET", "/v1/jobs", params=b.page_params(filters, limit, before)), "jobs")

    async def cancel(self, job_id: str) -> dict:
        return await self._c._json("POST", b.job_path(job_id, "cancel"))

    async def delete(self, job_id: str) -> dict:
        """Delete a finished job: its record, log and artifacts, which no longer count against the key's
        artifact storage cap. A queued or running job is refused (409): cancel it first."""
        return await self._c._json("DELETE", b.job_path(job_id))

    async def logs(self, job_id: str, offset: int = 0) -> JobLogs:
        resp = await self._c._request("GET", b.job_path(job_id, "logs"), params={"offset": offset})
        return b.parse_logs(resp, offset)

    async def artifacts(self, job_id: str) -> list[dict]:
        return b.listed(await self._c._json("GET", b.job_path(job_id, "artifacts")), "artifacts")

    async def download(self, job_id: str, name: str, dest: str | os.PathLike | None = None) -> Path:
        target = b.download_target(name, dest)
        tmp = target.with_name(target.name + ".part")
        resp = await self._c._request("GET", b.job_path(job_id, "artifacts", name), stream=True)
        try:
            with open(tmp, "wb") as f:  # noqa: ASYNC230  (local writes are short; the network is awaited)
                async for chunk in resp.aiter_bytes():
                    f.write(chunk)
            os.replace(tmp, target)  # a folder of that name: refused here, the .part removed below
        except httpx.TransportError as e:  # the body cut short or stalled: the SDK's error, as for any request
            tmp.unlink(missing_ok=True)
            raise b.connection_error(e, self._c.base_url, proxy=self._c._proxy) from None
        except BaseException:
            tmp.unlink(missing_ok=True)  # no half-written .part left behind
            raise
        finally:
            await resp.aclose()
        return target

    async def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = b.DEFAULT_POLL_S) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job.get("status") in b.JOB_DONE:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.get('status')!r} after {timeout} s")
            await asyncio.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))


__all__ = ["AsyncClient", "AsyncFiles", "AsyncJobs", "AsyncKeys"]
