"""service.batching.MicroBatcher: what shares a call, and that every caller gets its own answer."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batching import GateTimeout, MicroBatcher

pytestmark = pytest.mark.anyio


class Recorder:
    """A model call that records each batch's payloads and answers each payload doubled; the first call waits
    until ``release`` so that the requests behind it queue up."""

    def __init__(self):
        self.batches: list[list[tuple[str, int]]] = []
        self.release = threading.Event()

    def __call__(self, payloads):
        self.release.wait(5)
        self.batches.append(list(payloads))
        return [(who, 2 * v) for who, v in payloads]


async def _run(requests: list[tuple[str, int, str | None]], max_samples: int = 64):
    fn = Recorder()
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(fn, pool, max_samples=max_samples)
        first = asyncio.create_task(batcher.submit(("warm", 0), 1, requests[0][2]))
        await asyncio.sleep(0.05)  # the first call runs (and waits): everything after it queues
        rest = [asyncio.create_task(batcher.submit((who, v), 1, group)) for who, v, group in requests]
        await asyncio.sleep(0.05)
        fn.release.set()
        answers = await asyncio.gather(first, *rest)
    return fn.batches[1:], answers[1:]


async def test_requests_without_a_group_share_calls_up_to_the_batch_size():
    batches, answers = await _run([(f"r{i}", i, None) for i in range(5)], max_samples=3)
    assert [len(b) for b in batches] == [3, 2]
    assert answers == [(f"r{i}", 2 * i) for i in range(5)]


async def test_each_group_gets_calls_of_its_own_and_the_others_keep_their_order():
    requests = [("a1", 1, "alice"), ("b1", 2, "bob"), ("a2", 3, "alice"), ("c1", 4, "carol"), ("b2", 5, "bob"),
                ("a3", 6, "alice")]
    batches, answers = await _run(requests, max_samples=2)
    assert answers == [(who, 2 * v) for who, v, _ in requests]  # each its own answer
    group = {who: g for who, _, g in requests}
    owners = [{group[who] for who, _ in batch} for batch in batches]
    assert all(len(o) == 1 for o in owners), batches  # never two callers in one call
    assert [[who for who, _ in b] for b in batches] == [["a1", "a2"], ["b1", "b2"], ["c1"], ["a3"]]


class Charges:
    """A gate's check that refuses the items named "no", and records each call's items."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, items):
        self.calls.append(list(items))
        return [ValueError(f"{who} refused") if who.startswith("no") else None for who in items]


async def test_a_gate_is_checked_once_per_call_and_a_refusal_fails_only_its_own_request():
    fn, charges = Recorder(), Charges()
    fn.release.set()
    with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as checks:
        batcher = MicroBatcher(fn, pool, max_samples=64, checks=checks)
        gated = [("a", 1, "ok-a"), ("b", 2, "no-b"), ("c", 3, None), ("d", 4, "ok-d")]
        answers = await asyncio.gather(*(batcher.submit((who, v), 1, None, None if g is None else (charges, g))
                                         for who, v, g in gated), return_exceptions=True)
    assert charges.calls == [["ok-a", "no-b", "ok-d"]]  # one check for the call's gated requests
    assert fn.batches == [[("a", 1), ("b", 2), ("c", 3), ("d", 4)]]  # checked beside the call: all ran...
    assert answers[0] == ("a", 2) and answers[2] == ("c", 6) and answers[3] == ("d", 8)
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "no-b refused"  # ...the refused one unanswered


async def test_a_check_that_does_not_answer_fails_its_requests_and_never_holds_the_model():
    fn, stuck = Recorder(), threading.Event()
    fn.release.set()

    def stalled(items):  # a store that does not answer
        stuck.wait(10)
        return [None] * len(items)

    with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as checks:
        batcher = MicroBatcher(fn, pool, max_samples=64, checks=checks, gate_timeout_s=0.2)
        try:
            answers = await asyncio.gather(batcher.submit(("keyed", 1), 1, None, (stalled, "k")),
                                           batcher.submit(("public", 2), 1), return_exceptions=True)
            assert isinstance(answers[0], GateTimeout) and answers[1] == ("public", 4)
            # the model's next calls are not held by the check still stuck on its thread
            assert await asyncio.wait_for(batcher.submit(("next", 3), 1), 5) == ("next", 6)
        finally:
            stuck.set()


async def test_a_failed_call_is_retried_alone_without_checking_its_gates_again():
    charges, runs = Charges(), []

    def fn(payloads):  # fails whenever "bad" is in the call
        runs.append([p for p, _ in payloads])
        if any(p == "bad" for p, _ in payloads):
            raise RuntimeError("bad input")
        return [(p, 2 * v) for p, v in payloads]

    with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as checks:
        for enabled in (True, False):
            charges.calls.clear()
            batcher = MicroBatcher(fn, pool, max_samples=64, enabled=enabled, checks=checks)
            answers = await asyncio.gather(batcher.submit(("good", 1), 1, None, (charges, "ok-1")),
                                           batcher.submit(("bad", 2), 1, None, (charges, "ok-2")),
                                           return_exceptions=True)
            assert answers[0] == ("good", 2) and isinstance(answers[1], RuntimeError)
            assert sorted(who for call in charges.calls for who in call) == ["ok-1", "ok-2"]  # each charged once, retries or not
    assert runs[:3] == [["good", "bad"], ["good"], ["bad"]]


async def test_an_item_the_call_answers_with_an_exception_fails_alone_in_one_call():
    """A request whose rows the model answered NaN (registry.HostedModel.run) fails with its own error; the call's
    other requests are answered from the same call, not run again."""
    runs = []

    def fn(payloads):
        runs.append(list(payloads))
        return [ValueError(f"{p} overflowed") if p == "huge" else (p, 2 * v) for p, v in payloads]

    with ThreadPoolExecutor(1) as pool:
        for enabled in (True, False):
            runs.clear()
            batcher = MicroBatcher(fn, pool, max_samples=64, enabled=enabled)
            answers = await asyncio.gather(batcher.submit(("good", 1), 1), batcher.submit(("huge", 2), 1),
                                           return_exceptions=True)
            assert answers[0] == ("good", 2) and str(answers[1]) == "huge overflowed"
            assert len(runs) == (1 if enabled else 2)  # batched: one call for both, and no retry


@pytest.mark.parametrize("batching", [True, False])
async def test_an_owners_slot_is_held_until_its_call_ends_even_when_its_caller_leaves(batching):
    """A caller cancelled mid-call (a gRPC deadline, a stream that ended) gave its owner's slot back while its call
    still held a pool thread: with batching off, one owner ran 4 calls at once against a bound of 3."""
    import time

    running = peak = 0
    lock = threading.Lock()

    def slow(items):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.3)
        with lock:
            running -= 1
        return [0 for _ in items]

    slots = asyncio.Semaphore(2)
    with ThreadPoolExecutor(4) as pool:
        b = MicroBatcher(slow, pool, max_samples=1, enabled=batching, slots=slots)
        tasks = []
        for _ in range(6):
            tasks.append(asyncio.ensure_future(b.submit("x", 1)))
            await asyncio.sleep(0.02)
            tasks[-1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(100):  # every call ended, its slot given back
            if running == 0 and not slots.locked() and slots._value == 2:
                break
            await asyncio.sleep(0.05)
    assert peak <= 2, peak
    assert slots._value == 2
