"""``RemoteTeacher``: a remote protected model's keyed path as a KD teacher.

Three ways to use it::

    teacher = RemoteTeacher(client, "mnist", temperature=4.0, batch_size=256)

    # 1. a callable, x -> logits, same type as x (numpy in, numpy out; torch in, torch out):
    #    the teacher of sdb_core.distill.distill, or any loop. A large x is split into
    #    batch_size requests with `prefetch` more in flight; results in input order.
    distill(student, transfer, teacher, DistillConfig().for_transfer(len(transfer)))

    # 2. a KD loop that trains on batch i while batch i+1's logits are on their way:
    for xb, yb, tb in teacher.iter_batches(x, y, batch_size=64, shuffle=True, seed=epoch):
        loss = kd_loss(student(xb), tb, yb, T, alpha); ...

    # 3. softmax(logits / T) for loops that want probabilities:
    p = teacher.soft_targets(xb)

torch is imported only when a torch tensor is given (the SDK itself depends on numpy and httpx only).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ._base import (
    VersionPin,
    answered_in,
    as_array,
    batch_slices,
    check_batch_size,
    check_temperature,
    redact,
    with_partial,
)
from ._exceptions import ConfigurationError, SDBError
from .client import Client


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _to_numpy(x: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """x as the Client takes inputs (``_base.as_array``), and the function that turns an answer back into x's kind."""
    arr = as_array(x)
    if _is_torch(x):
        import torch  # only now: the caller has torch

        device = x.device
        return arr, lambda z: torch.from_numpy(np.ascontiguousarray(z)).to(device)
    return arr, lambda z: z


def _eager(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` outside any ``torch.compile`` graph: the answer comes over HTTP, through numpy, which Dynamo
    cannot trace (a compiled training step that asks the teacher breaks its graph there instead)."""
    global _run_eagerly
    if _run_eagerly is None:  # made once: torch.compiler.disable costs ~0.3 ms a call, its wrapper ~1 µs
        import torch  # only for torch inputs: the caller has torch

        _run_eagerly = torch.compiler.disable(_run)
    return _run_eagerly(fn, *args)


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


_run_eagerly: Callable[..., Any] | None = None


class _NotSent(Exception):
    """A batch queued behind one that failed: never sent."""


def _take(x: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of a numpy array or torch tensor, in its own kind."""
    if _is_torch(x):
        import torch

        return x[torch.from_numpy(idx).to(x.device)]
    return np.asarray(x)[idx]


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = z / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class RemoteTeacher:
    """A remote model's keyed path (``POST /v1/models/{model}/distill``) as a teacher callable.

    ``client`` must carry a key with the ``distill`` scope for ``model`` (else the first call
    raises ``PermissionDenied`` or ``AuthError``). ``temperature`` is used by ``soft_targets``
    (``__call__`` returns logits: the distiller applies its own temperature). At most ``batch_size``
    samples go in one request (default: the client's; fewer where they would be over the server's body
    limit); ``prefetch`` more requests are kept in flight in background threads while the caller works. ``encoding`` is how the tensors
    travel (default: the client's, ``.npy``; ``"json"`` on request). ``version`` pins a version of the
    model; without it the teacher pins the version its first answer came from (``teacher.version``), so a deploy
    during training does not change the teacher under the student, and that version removed is a ``ModelChanged``.
    """

    def __init__(self, client: Client, model: str, temperature: float | None = None,
                 batch_size: int | None = None, *, prefetch: int = 1, encoding: str | None = None,
                 version: str | int | None = None):
        if not isinstance(client, Client):
            raise ConfigurationError("RemoteTeacher needs a (synchronous) sdb_client.Client", code="invalid_option")
        check_temperature(temperature, optional=True)
        check_batch_size(batch_size)
        if prefetch < 0:
            raise ConfigurationError(f"prefetch must be >= 0, got {prefetch}", code="invalid_option")
        self.client, self.model, self.temperature = client, model, temperature
        self.batch_size = batch_size or client.batch_size
        if self.batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {self.batch_size}", code="invalid_option")
        self.prefetch = prefetch
        self._pin = VersionPin(model, version)
        client._encoding(encoding)  # checked now; None stays the client's, which turns JSON for an older server
        self._asked = encoding
        self._new_pool()
        self.requests = 0  # requests issued (queued or sent), for the curious and the tests

    def __repr__(self) -> str:
        pin = "" if self.version is None else f", version={self.version!r}"
        return (f"RemoteTeacher(model={self.model!r}{pin}, url={redact(repr(self.client.base_url))}, "
                f"batch_size={self.batch_size}, "
                f"temperature={self.temperature}, prefetch={self.prefetch}, encoding={self.encoding!r})")

    def _new_pool(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.prefetch), thread_name_prefix="sdb-teacher")
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        """Everything but the thread pool (a spawned worker's copy makes its own; the client pickles itself)."""
        return {k: v for k, v in self.__dict__.items() if k != "_pool"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._new_pool()

    @property
    def version(self) -> str | None:
        """The version every request asks for: the one given, else the one the first answer came from (None before
        it)."""
        return self._pin.version

    @property
    def encoding(self) -> str:
        """How the tensors travel now: the one asked for, else the client's (JSON once its server refused .npy)."""
        return self.client._encoding(self._asked)

    # ------------------------------------------------------------------ fetching
    def _fetch(self, x: np.ndarray) -> np.ndarray:
        self.requests += 1
        return self._ask(x)

    def _ask(self, x: np.ndarray) -> np.ndarray:
        return self.client._distill(self.model, x, None, self._pin, len(x), self._asked).logits

    def _submit(self, x: np.ndarray, stop: threading.Event) -> Future:
        """Ask for ``x``'s logits in the pool, unless ``stop`` is set by the time a thread takes it: set when one of
        the call's batches fails, so that none queued behind it is sent (and charged)."""
        self.requests += 1
        if self._pid != os.getpid():  # a forked child (a DataLoader worker): the parent's pool came without its threads
            self._new_pool()
        if self.prefetch > 1 and self._pin.version is None:  # the version pinned before answers race in from two
            self._pin.learn(self.client.model(self.model))

        def ask() -> np.ndarray:
            if stop.is_set():
                raise _NotSent
            try:
                return self._ask(x)
            except BaseException:
                stop.set()
                raise

        return self._pool.submit(ask)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 array of any length, requests pipelined, in input order."""
        try:
            x, plan = self.client._batches(self.model, x, self.batch_size, self._pin, self.encoding)
        except SDBError as e:  # the pinned version gone since the last call
            raise self._pin.gone(e) from None
        parts = plan.slices()
        out: list[np.ndarray] = []
        if len(parts) == 1 or self.prefetch == 0:
            for s in parts:
                try:
                    out.append(self._fetch(x[s]))
                except SDBError as e:  # the batches answered (and charged) go with the error; no later one is sent
                    raise with_partial(e, [*out, *answered_in(e)]) from None
            return np.concatenate(out)
        stop = threading.Event()
        pending: deque[tuple[int, Future]] = deque()  # (first row, its request)
        try:
            for s in parts:
                pending.append((s.start, self._submit(x[s], stop)))
                if len(pending) > self.prefetch:
                    out.append(pending.popleft()[1].result())
            while pending:
                out.append(pending.popleft()[1].result())
        except SDBError as e:  # as above; the batches in flight beside it were answered (and charged) too
            stop.set()
            raise with_partial(e, [*out, *answered_in(e)], _answered(pending)) from None
        return np.concatenate(out)

    def __call__(self, x: Any) -> Any:
        """Logits (N, C) for inputs (N, ...), as numpy or torch like ``x``."""
        return _eager(self._call, x) if _is_torch(x) else self._call(x)

    def _call(self, x: Any) -> Any:
        arr, back = _to_numpy(x)
        return back(self.logits(arr))

    def soft_targets(self, x: Any, temperature: float | None = None) -> Any:
        """``softmax(logits / T)`` with ``T`` = ``temperature`` or the teacher's."""
        return _eager(self._soft_targets, x, temperature) if _is_torch(x) else self._soft_targets(x, temperature)

    def _soft_targets(self, x: Any, temperature: float | None) -> Any:
        check_temperature(temperature, optional=True)
        t = temperature if temperature is not None else self.temperature
        if t is None:
            raise ConfigurationError("soft_targets needs a temperature (give one here or to RemoteTeacher)",
                                     code="invalid_option")
        arr, back = _to_numpy(x)
        return back(softmax(self.logits(arr), t).astype(np.float32))

    def iter_batches(self, x: Any, y: Any = None, *, batch_size: int | None = None, shuffle: bool = False,
                     seed: int | None = None, drop_last: bool = False) -> Iterator[tuple]:
        """Yield ``(xb, logits)`` (or ``(xb, yb, logits)`` with ``y``) over ``x`` in batches,
        with the next ``prefetch`` batches' requests already in flight while the caller trains
        on this one (``prefetch=0``: none). Batches are numpy or torch like ``x``; ``shuffle``
        uses ``seed``."""
        check_batch_size(batch_size)
        bs = batch_size or self.batch_size
        arr, back = _to_numpy(x)
        n = len(arr)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        parts = [order[s] for s in batch_slices(n, bs)]
        if drop_last and parts and len(parts[-1]) < bs:
            parts.pop()
        pending: deque[Future] = deque()
        ahead = self.prefetch  # 0: each batch is fetched when the caller asks for it
        stop = threading.Event()
        for idx in parts[:ahead]:
            pending.append(self._submit(arr[idx], stop))
        for i, idx in enumerate(parts):
            try:
                logits = pending.popleft().result() if ahead else self._fetch(arr[idx])
            except BaseException:  # the requests prefetched after a failed one are not sent
                stop.set()
                for f in pending:
                    f.cancel()
                raise
            if ahead and i + ahead < len(parts):  # the next request leaves before the caller gets this batch
                pending.append(self._submit(arr[parts[i + ahead]], stop))
            xb = _take(x, idx)
            yield (xb, logits_like(back, logits)) if y is None else (xb, _take(y, idx), logits_like(back, logits))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RemoteTeacher:  # noqa: PYI034
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def logits_like(back: Callable[[np.ndarray], Any], z: np.ndarray) -> Any:
    return back(z)


def _answered(pending: deque[tuple[int, Future]]) -> list[tuple[int, np.ndarray]]:
    """(first row, logits) of the requests in ``pending`` that were answered: those queued are cancelled (or find
    the call stopped), those already sent are waited for."""
    out = []
    for start, f in pending:
        if f.cancel():
            continue
        try:
            out.append((start, f.result()))
        except _NotSent:
            pass
        except SDBError as e:  # failed too, part-way: what it had answered before
            out.extend((start, z) for z in answered_in(e))
    return out


__all__ = ["RemoteTeacher", "softmax"]
