"""A tenant's graph runs its check run once, at its deploy: not at every server start, not at every load again.

Loading a bundle runs its graph once on zeros (``sdb_core.bundle.check_output_shape``), bounded at
``MAX_CHECK_RUN_S`` (60 s), not SDB_RUN_TIMEOUT_S. Before the fix every load did: a version the cache had
evicted (SDB_MODEL_CACHE_MB) ran it again inside the pool thread its request's batch took (14.6 s with
SDB_RUN_TIMEOUT_S=5; four at once held another tenant's model 55 s), and every server start ran it for every
registered version, one after another, before it listened (a key's four versions of a 13.5 s check run: 54 s
during which every request was refused). A registered version's meta.json digest is recorded at its deploy, and
that meta.json hashes every file: a bundle with it is the graph that ran, so it loads now with its hashes and key
checked and without the run. Against the real app in process, twice on one data dir for the restart.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from tests.security.graphs import const, counting_loop_body
from tests.security.test_hand_made_bundles_are_refused_clearly import _edit, _sdb, _settings, plain  # noqa: F401
from tests.service.conftest import start_service

pytestmark = pytest.mark.anyio

# Loop trips on the check run's zeros: ~2 s on this repository's CI CPU (none on an input of 1s, as served here).
CHECK_RUN_TRIPS = 3_000_000


def _slow_on_zeros_graph(trips: float) -> bytes:
    """input [N, 3, 8, 8] -> logits [N, 4] = Loop(max(0, trips · (1 - max(input)))){acc + 1}, plus 0 · the input:
    ``trips`` trips on the check run's zeros, none on an input of 1s (a legal graph that answers at once)."""
    from onnx import TensorProto, helper

    body = counting_loop_body()
    nodes = [helper.make_node("ReduceMax", ["input"], ["top"], keepdims=0),
             helper.make_node("Sub", ["onef", "top"], ["left"]),
             helper.make_node("Mul", ["left", "trips_per_unit"], ["trips_f"]),
             helper.make_node("Max", ["trips_f", "zerof"], ["positive"]),
             helper.make_node("Cast", ["positive"], ["trips"], to=TensorProto.INT64),
             helper.make_node("Loop", ["trips", "true", "zeros"], ["scores"], body=body),
             helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=1),
             helper.make_node("Reshape", ["total", "column"], ["per_sample"]),
             helper.make_node("Mul", ["per_sample", "zerof"], ["nothing"]),
             helper.make_node("Add", ["nothing", "scores"], ["logits"])]
    graph = helper.make_graph(
        nodes, "slow_check", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[const("onef", 1.0, np.float32), const("trips_per_unit", trips, np.float32),
                     const("zerof", 0.0, np.float32), const("true", True, np.bool_),
                     const("zeros", np.zeros(4), np.float32), const("axes", [1, 2, 3], np.int64),
                     const("column", [-1, 1], np.int64)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


ONES = {"inputs": np.ones((1, 3, 8, 8)).tolist()}


async def _deploy(svc, files: dict, name: str, headers: dict) -> str:
    t0 = time.monotonic()
    r = await svc.client.post("/v1/models", files={"file": ("m.sdb", _sdb(files))}, data={"name": name},
                              headers=headers)
    assert r.status_code == 201, r.text
    return time.monotonic() - t0


async def test_a_version_the_cache_evicted_loads_again_without_its_check_run(tmp_path, plain):  # noqa: F811
    settings = _settings(tmp_path).model_copy(update={"model_cache_mb": 0.001})  # one bundle stays loaded
    svc, manager = await start_service(settings)
    try:
        tenant, other = svc.auth(svc.key(("deploy",))), svc.auth(svc.key(("deploy",)))
        deployed = await _deploy(svc, _edit(plain, onnx=_slow_on_zeros_graph(CHECK_RUN_TRIPS)), "slow-check", tenant)
        await _deploy(svc, plain, "mine", other)
        host = svc.app.state.host
        slow = host.loaded("slow-check")
        assert slow not in host.bundles  # evicted by the other model's load
        loads = host.bundles.loads
        t0 = time.monotonic()
        r = await svc.client.post("/v1/models/slow-check/predict", json=ONES)
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert host.bundles.loads == loads + 1 and slow in host.bundles  # it was loaded again, verified
        # before: its check run again (as long as its deploy's); now the hashes and the key alone
        assert took < max(0.5, deployed / 3), (took, deployed)
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_a_server_starts_without_running_its_tenants_graphs(tmp_path, plain):  # noqa: F811
    settings = _settings(tmp_path)
    svc, manager = await start_service(settings)
    try:
        tenant = svc.auth(svc.key(("deploy",)))
        slow = _edit(plain, onnx=_slow_on_zeros_graph(CHECK_RUN_TRIPS))
        deployed = [await _deploy(svc, slow, "slow-check", tenant) for _ in range(3)]  # three versions
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)

    t0 = time.monotonic()
    svc, manager = await start_service(settings)
    started = time.monotonic() - t0
    try:
        r = await svc.client.get("/readyz")
        assert r.status_code == 200 and r.json()["models"] == 3 and r.json()["failed_models"] == 0, r.text
        # before: every version's check run, one after another (~the three deploys); now none
        assert started < max(2.0, sum(deployed) / 3), (started, deployed)
        for v in ("1", "2", "3"):
            r = await svc.client.post(f"/v1/models/slow-check/predict?version={v}", json=ONES)
            assert r.status_code == 200, r.text
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)
