"""A deploy key's graph never computes one caller's answer from another caller's input.

Micro-batching merges concurrent requests to one model into one ONNX Runtime call. Before the fix it merged
every caller's: a tenant could deploy a graph whose answer to each sample carries the batch's other samples
(a mean over the batch axis, here), call its own model while others did, and read their inputs off its
answers. Now a model whose name a non-admin key owns batches each caller (its key, or its address without
one) apart; one caller's concurrent requests still share a call, and an admin's models batch across callers.
Against the real app in process, the batcher told to wait for company so that concurrent requests meet. Over
gRPC too, where callers without a key behind a trusted proxy are the clients its ``x-forwarded-for`` names.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.security.test_hand_made_bundles_are_refused_clearly import _edit, _sdb, _settings, plain  # noqa: F401
from tests.service.conftest import free_port, start_service

pytestmark = pytest.mark.anyio


def _batch_mean_graph() -> bytes:
    """input [N, 3, 8, 8] -> logits [N, 4] = mean over the batch of each sample's pixel sum, times [1, 2, 3, 4]:
    every sample's answer is the batch's."""
    from onnx import TensorProto, helper, numpy_helper

    const = lambda name, value, dtype: numpy_helper.from_array(np.array(value, dtype), name)
    nodes = [helper.make_node("ReduceSum", ["input", "axes"], ["sums"], keepdims=1),
             helper.make_node("Reshape", ["sums", "column"], ["per_sample"]),
             helper.make_node("ReduceMean", ["per_sample"], ["batch_mean"], axes=[0], keepdims=1),
             helper.make_node("Mul", ["per_sample", "zero"], ["zeros"]),
             helper.make_node("Add", ["zeros", "batch_mean"], ["everyone"]),
             helper.make_node("Mul", ["everyone", "row"], ["logits"])]
    graph = helper.make_graph(
        nodes, "mixer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[const("axes", [1, 2, 3], np.int64), const("column", [-1, 1], np.int64),
                     const("zero", 0, np.float32), const("row", [[1, 2, 3, 4]], np.float32)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_concurrent_callers_never_share_a_tenants_call(tmp_path, plain):  # noqa: F811
    settings = _settings(tmp_path).model_copy(update={"batch_max_wait_ms": 300.0})
    svc, manager = await start_service(settings)
    try:
        mixer = _sdb(_edit(plain, onnx=_batch_mean_graph()))
        tenant, admin = svc.auth(svc.key(("deploy",))), svc.auth(svc.key(("admin",)))
        for name, who in (("tenants", tenant), ("admins", admin)):
            r = await svc.client.post("/v1/models", files={"file": ("m.sdb", mixer)}, data={"name": name}, headers=who)
            assert r.status_code == 201, r.text
        alice, bob = svc.auth(svc.key(("predict",))), svc.auth(svc.key(("predict",)))
        # model inputs as sent: mine sum to 0 (equal logits), theirs to 1.92 (a batch of both: logits 0.96 · [1..4])
        mine = {"inputs": np.zeros((1, 3, 8, 8)).tolist()}
        theirs = {"inputs": np.full((1, 3, 8, 8), 0.01).tolist()}

        async def predict(model: str, body: dict, headers: dict) -> list[float]:
            r = await svc.client.post(f"/v1/models/{model}/predict", json=body, headers=headers)
            assert r.status_code == 200, r.text
            return r.json()["predictions"][0]["scores"]  # top classes first: all 0.25 when the logits are equal

        alone = await predict("tenants", mine, alice)
        assert alone == pytest.approx([0.25] * 4, abs=1e-6)  # logits all 0
        for model, mixed in (("tenants", False), ("admins", True)):
            first, _ = await asyncio.gather(predict(model, mine, alice), predict(model, theirs, bob))
            assert (first != pytest.approx(alone, abs=1e-3)) is mixed, (model, first)
        # one caller's own requests still share a call (the batch's mean moves its answer)
        first, _ = await asyncio.gather(predict("tenants", mine, alice), predict("tenants", theirs, alice))
        assert first != pytest.approx(alone, abs=1e-3), first
        # the Open Inference Protocol's route goes through the same batcher
        v2 = {"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32",
                          "data": np.zeros(192).tolist()}], "outputs": [{"name": "probabilities"}]}
        v2_other = {**v2, "inputs": [{**v2["inputs"][0], "data": np.full(192, 0.01).tolist()}]}
        answers = await asyncio.gather(svc.client.post("/v2/models/tenants/infer", json=v2, headers=alice),
                                       svc.client.post("/v2/models/tenants/infer", json=v2_other, headers=bob))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert answers[0].json()["outputs"][0]["data"] == pytest.approx(alone, abs=1e-3)
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_clients_a_trusted_proxy_forwards_over_grpc_never_share_a_tenants_call(tmp_path, plain):  # noqa: F811
    # every gRPC caller behind a trusted proxy (this test, on 127.0.0.1: the default SDB_FORWARDED_ALLOW_IPS) was
    # the proxy's address, one caller: one client's answer carried another's input, as it never did over HTTP
    from grpc import aio

    from service.grpc import grpc_predict_v2_pb2 as pb
    from service.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    port = free_port()
    settings = _settings(tmp_path).model_copy(update={"batch_max_wait_ms": 300.0, "grpc_port": port})
    svc, manager = await start_service(settings)
    try:
        r = await svc.client.post("/v1/models", files={"file": ("m.sdb", _sdb(_edit(plain, onnx=_batch_mean_graph())))},
                                  data={"name": "tenants"}, headers=svc.auth(svc.key(("deploy",))))
        assert r.status_code == 201, r.text
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def infer(pixel: float, client: str) -> list[float]:
                request = pb.ModelInferRequest(model_name="tenants")
                request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8])
                request.raw_input_contents.append(np.full((1, 3, 8, 8), pixel, np.float32).tobytes())
                request.outputs.add(name="probabilities")
                answer = await stub.ModelInfer(request, metadata=(("x-forwarded-for", client),), timeout=60)
                return np.frombuffer(answer.raw_output_contents[0], np.float32).tolist()

            alone = await infer(0.0, "203.0.113.1")
            assert alone == pytest.approx([0.25] * 4, abs=1e-6)
            first, _ = await asyncio.gather(infer(0.0, "203.0.113.1"), infer(0.01, "203.0.113.2"))
            assert first == pytest.approx(alone, abs=1e-3), first
            # one client's own calls still share one (so the two above would have met)
            first, _ = await asyncio.gather(infer(0.0, "203.0.113.1"), infer(0.01, "203.0.113.1"))
            assert first != pytest.approx(alone, abs=1e-3), first
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)
