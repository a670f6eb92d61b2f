"""A micro-batcher: concurrent requests to one model become one ONNX Runtime call.

Requests queue on the event loop; one drain task per model takes everything queued
(up to ``max_samples``), runs it in a worker thread, and hands each caller its rows.
While one call runs, the next batch fills by itself, so at low load a request waits for
nobody (``max_wait_s = 0`` is the default: the only extra wait is one loop turn), and
at high load batches grow with the load. A positive ``max_wait_s`` bounds how long the
first request of a batch may wait for company.

A request may carry a ``group`` (its caller): requests of different groups never share a call.
The registry gives one to the requests of models whose graph a tenant wrote, which could compute
one sample's answer from another's input (:attr:`service.registry.HostedModel.isolated`). And a
``gate`` (the keyed path's charge to the key): a check the call's thread starts beside the call, one
for all the requests of a call, whose refusal fails its own request alone; a check that does not
answer in ``gate_timeout_s`` fails its requests with :class:`GateTimeout`, never the model's calls.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")
# (check, item): ``check(items)`` answers each item's refusal or None (MicroBatcher.submit)
Gate = tuple[Callable[[list[Any]], list[Exception | None]], Any]


class BatcherClosed(RuntimeError):
    """The model was removed while this request waited."""


class GateTimeout(RuntimeError):
    """A gate's check did not answer in time: its requests fail; the call's others are answered."""


class MicroBatcher(Generic[P, R]):
    """``fn`` answers a batch of payloads with one result each, in order; an Exception in its place is that
    payload's own failure (its request fails with it, the others are answered)."""

    def __init__(self, fn: Callable[[Sequence[P]], list[R | Exception]], executor: Executor | None, *,
                 max_samples: int = 64,
                 max_wait_s: float = 0.0, enabled: bool = True,
                 on_batch: Callable[[int, int], None] | None = None, checks: Executor | None = None,
                 gate_timeout_s: float = 5.0, on_wait: Callable[[list[int]], None] | None = None,
                 slots: asyncio.Semaphore | None = None):
        self.fn, self.executor = fn, executor
        self.slots = slots  # the owner's share of the executor's threads (None: no bound)
        # where gates' checks run, beside the call (a stalled check holds one of these threads, not the model's)
        self.checks, self.gate_timeout_s = checks, gate_timeout_s
        self.max_samples, self.max_wait_s, self.enabled = max_samples, max_wait_s, enabled
        self.on_batch = on_batch  # (requests, samples) per ORT call, for metrics
        self.on_wait = on_wait  # each request's wait (ns), from submit to its call's start, for statistics
        # (payload, samples, future, group, gate, submitted at: perf_counter_ns)
        self._queue: deque[tuple[P, int, asyncio.Future, str | None, Gate | None, int]] = deque()
        self._queued_samples = 0
        self._drainer: asyncio.Task | None = None
        self._filled: asyncio.Event | None = None
        self._closed = False

    async def submit(self, payload: P, samples: int, group: str | None = None, gate: Gate | None = None) -> R:
        """``payload``'s result; it shares its ONNX Runtime call only with requests of the same ``group``.

        ``gate`` (check, item): ``check`` runs on ``checks``, started by the call's thread just before the call
        and awaited by it after, once for the items of all the requests of that call that carry it; it answers
        each item's refusal (an exception) or None. A refused request fails with its refusal (its rows are
        dropped); a check that does not answer in ``gate_timeout_s`` fails its requests with GateTimeout. (The
        keyed path's charge: a thread hop of its own per request, on the loop's side, cost ~60 µs of CPU,
        ~190 µs of latency at one caller, and split the batches; run before the call in its thread, a stalled
        store would have held the model's calls.)"""
        if self._closed:
            raise BatcherClosed("model removed")
        if gate is not None and self.checks is None:
            raise TypeError("a gate's check runs on the batcher's checks executor: none was given")
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter_ns()
        if not self.enabled:
            self._count(1, samples)
            if self.slots is None:
                (refusal,), results = await loop.run_in_executor(self.executor, self._gated, [(payload, gate)],
                                                                 [submitted])
            else:
                (refusal,), results = await self._in_slot(loop, [(payload, gate)], [submitted])
            if refusal is not None:
                raise refusal
            if isinstance(results, Exception):
                raise results
            if isinstance(results[0], Exception):  # that item's own failure (the call served the others)
                raise results[0]
            return results[0]
        fut: asyncio.Future = loop.create_future()
        self._queue.append((payload, samples, fut, group, gate, submitted))
        self._queued_samples += samples
        if self._filled is not None and self._queued_samples >= self.max_samples:
            self._filled.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await fut

    def close(self) -> None:
        """Refuse new work; what is queued is still served."""
        self._closed = True

    def _count(self, requests: int, samples: int) -> None:
        if self.on_batch is not None:
            self.on_batch(requests, samples)

    def _take(self) -> list[tuple[P, int, asyncio.Future, str | None, Gate | None, int]]:
        """The next batch: the oldest request, and after it, in order, the requests of its group that fit."""
        first = self._queue.popleft()
        batch, total, group = [first], first[1], first[3]
        if group is None:
            while self._queue and self._queue[0][3] is None and total + self._queue[0][1] <= self.max_samples:
                item = self._queue.popleft()
                total += item[1]
                batch.append(item)
        else:  # other callers' requests stay queued, in their order
            others: deque = deque()
            while self._queue and total < self.max_samples:
                item = self._queue.popleft()
                if item[3] == group and total + item[1] <= self.max_samples:
                    total += item[1]
                    batch.append(item)
                else:
                    others.append(item)
            others.extend(self._queue)
            self._queue = others
        self._queued_samples -= total
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)  # one loop turn: requests parsed in this turn join the first batch
        while self._queue:
            if self.max_wait_s > 0 and self._queued_samples < self.max_samples:
                self._filled = asyncio.Event()
                try:
                    await asyncio.wait_for(self._filled.wait(), self.max_wait_s)
                except TimeoutError:
                    pass
                self._filled = None
            slots = self.slots
            if slots is not None:
                await slots.acquire()  # before the batch is taken: what arrives meanwhile joins it
            try:
                batch = [b for b in self._take() if not b[2].cancelled()]
                if batch:
                    await self._serve(loop, batch)
            finally:
                if slots is not None:
                    slots.release()

    async def _in_slot(self, loop: asyncio.AbstractEventLoop, items, submitted):
        """:meth:`_gated` in the executor once the owner has a free slot, the slot given back when the thread is
        done, not when its caller stops waiting: a caller cancelled mid-call (a gRPC deadline, a stream that ended)
        gave it back while its call still held the thread, and one owner held the whole pool."""
        slots = self.slots
        await slots.acquire()
        try:
            call = self.executor.submit(self._gated, items, submitted)
        except BaseException:
            slots.release()
            raise

        def give_back(_) -> None:
            try:
                loop.call_soon_threadsafe(slots.release)
            except RuntimeError:  # the loop is closed: nobody is left to wait for the slot
                pass

        call.add_done_callback(give_back)
        return await asyncio.wrap_future(call, loop=loop)

    async def _serve(self, loop: asyncio.AbstractEventLoop,
                     batch: list[tuple[P, int, asyncio.Future, str | None, Gate | None, int]]) -> None:
        """One call for ``batch`` (its pool slot held), and each request's answer."""
        self._count(len(batch), sum(b[1] for b in batch))
        refusals, results = await loop.run_in_executor(self.executor, self._gated, [(b[0], b[4]) for b in batch],
                                                       [b[5] for b in batch])
        for b, refusal in zip(batch, refusals):
            if refusal is not None and not b[2].done():
                b[2].set_exception(refusal)
        admitted = [i for i, refusal in enumerate(refusals) if refusal is None]
        batch = [batch[i] for i in admitted]
        if isinstance(results, Exception):
            # One bad request must not fail its neighbours: run them one by one (unless the error says that
            # each would fail as long: a call stopped at its deadline). Their gates passed: not run again.
            if getattr(results, "retry_alone", True):
                results = [await self._alone(loop, b[0]) for b in batch]
            else:
                results = [_Failed(results) for _ in batch]
        else:
            results = [results[i] for i in admitted]
        for b, res in zip(batch, results):
            fut = b[2]
            if fut.done():
                continue
            if isinstance(res, _Failed):
                fut.set_exception(res.exc)
            elif isinstance(res, Exception):  # one item's own failure, answered by the call beside the others'
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def _gated(self, items: list[tuple[P, Gate | None]],
               submitted: Sequence[int]) -> tuple[list[Exception | None], list[R] | Exception]:
        """Blocking: one call for every payload, the items' gates checked beside it: (each item's refusal or None,
        the call's results, one per item, or the exception it raised). ``submitted``: when each item was."""
        if self.on_wait is not None:
            now = time.perf_counter_ns()
            self.on_wait([now - t for t in submitted])
        by_check: dict[Callable, list[int]] = {}
        for i, (_, gate) in enumerate(items):
            if gate is not None:
                by_check.setdefault(gate[0], []).append(i)
        pending = [(indices, self.checks.submit(check, [items[i][1][1] for i in indices]))
                   for check, indices in by_check.items()]
        try:
            results: list[R] | Exception = self.fn([payload for payload, _ in items])
        except Exception as e:  # noqa: BLE001 - retried one by one on the loop's side
            results = e
        refusals: list[Exception | None] = [None] * len(items)
        deadline = time.monotonic() + self.gate_timeout_s
        for indices, checked in pending:
            try:
                answers = checked.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                answers = [GateTimeout(f"no answer in {self.gate_timeout_s:g} s")] * len(indices)
            except Exception as e:  # noqa: BLE001 - a check that fails refuses its own requests
                answers = [e] * len(indices)
            for i, answer in zip(indices, answers, strict=True):
                refusals[i] = answer
        return refusals, results

    async def _alone(self, loop: asyncio.AbstractEventLoop, payload: P) -> Any:
        try:
            return (await loop.run_in_executor(self.executor, self.fn, [payload]))[0]
        except Exception as e:  # noqa: BLE001 - handed to that one caller
            return _Failed(e)


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: Exception):
        self.exc = exc

