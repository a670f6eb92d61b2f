"""One tenant's models, kept busy within the key's limits, never make another tenant's models wait.

Every model's ONNX Runtime calls run on one pool of threads (``service.registry.POOL_THREADS``), and each version
has its own micro-batcher. Before the fix nothing counted whose models held the threads: a deploy key deployed four
versions of a legal graph that takes seconds a call, kept each busy with one request at a time, and every other
model's calls waited behind them (a 2.7 ms call took 0.3-3.6 s; with a graph that runs until SDB_RUN_TIMEOUT_S,
30 s). Now one owner's models hold at most ``OWNER_POOL_THREADS`` threads at once, all its names and versions
together; its other calls wait for one on the event loop, holding no thread, and are served in turn. Against the
real app in process.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.registry import OWNER_POOL_THREADS, POOL_THREADS
from tests.security.test_hand_made_bundles_are_refused_clearly import _edit, _sdb, _settings, plain  # noqa: F401
from tests.security.test_hostile_graphs_are_stopped import _looping_graph
from tests.service.conftest import start_service

pytestmark = pytest.mark.anyio

# Loop trips per unit of the input's largest value: an input of 1s runs ~3 s alone on this repository's CI CPU
# (4M trips), zeros none (the check run's, and the victim's).
TRIPS_PER_UNIT = 4_000_000


def _infer(values: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(values.shape), "datatype": "FP32",
                        "data": values.ravel().tolist()}]}


async def test_a_tenants_busy_versions_leave_a_thread_to_another_tenants_model(tmp_path, plain):  # noqa: F811
    assert OWNER_POOL_THREADS < POOL_THREADS
    svc, manager = await start_service(_settings(tmp_path))
    try:
        victim, mallory = svc.auth(svc.key(("deploy",))), svc.auth(svc.key(("deploy",)))
        r = await svc.client.post("/v1/models", files={"file": ("mine.sdb", _sdb(plain))}, headers=victim)
        assert r.status_code == 201, r.text
        slow = _sdb(_edit(plain, onnx=_looping_graph(TRIPS_PER_UNIT, per_input=True)))
        versions = []
        for _ in range(POOL_THREADS):  # one name, as many versions as the pool has threads: a batcher each
            r = await svc.client.post("/v1/models", files={"file": ("slow.sdb", slow)}, data={"name": "slow"},
                                      headers=mallory)
            assert r.status_code == 201, r.text
            versions.append(r.json()["version"])
        zeros = {"inputs": np.zeros((1, 3, 8, 8)).tolist()}
        assert (await svc.client.post("/v1/models/mine/predict", json=zeros)).status_code == 200  # loaded, warm

        ones = _infer(np.ones((1, 3, 8, 8), np.float32))
        t0 = time.monotonic()
        busy = [asyncio.create_task(svc.client.post(f"/v2/models/slow/versions/{v}/infer", json=ones, headers=mallory))
                for v in versions]
        await asyncio.sleep(0.5)  # every slow call started (or waits for its owner's slot)
        t1 = time.monotonic()
        r = await svc.client.post("/v1/models/mine/predict", json=zeros)
        waited = time.monotonic() - t1
        assert r.status_code == 200, r.text
        slow_answers = await asyncio.gather(*busy)
        took = time.monotonic() - t0
        # before: behind the four slow calls (~6 s of them on two cores); now a thread was free for it
        assert waited < 1.5, (waited, took)
        assert took > 2 * waited, (waited, took)  # the slow calls were slow: the bound above means something
        for a in slow_answers:  # the tenant's calls are all served, one of them after a slot was given back
            assert a.status_code == 200, a.text
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)
