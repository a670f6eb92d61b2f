"""One request cannot make an answer of unbounded size, nor hold the event loop while a large one is built.

A model of many classes answers samples x classes values: an anonymous request to a 10,000-class model with
``classification: 10000`` built a 396 MB answer, and every other caller (``/healthz`` included) waited 8 s while the
event loop built it. Now the classes one sample's answer ranks are capped as v1's ``top_k`` (1,000), the values of
one answer are bounded (``SDB_MAX_ANSWER_VALUES``: a 413 that names the bound and how many samples fit, before any
model time, on every route and transport), and an answer past 16,384 values is built in a worker thread.
"""
from __future__ import annotations

import asyncio
import io
import time

import grpc
import numpy as np
import pytest
import torch
from tritonclient.grpc import service_pb2, service_pb2_grpc

from sdb_core.bundle import export_bundle
from sdb_core.protect.box import SafeDistillationBox
from sdb_core.protect.key import load_or_create_master_key
from service.schemas import MAX_TOP_K
from service.settings import Settings
from tests.service.conftest import served_with_grpc

pytestmark = pytest.mark.anyio

CLASSES, FEATURES = 5000, 64
BOUND = Settings().max_answer_values  # the default: what a server without the setting answers by
FIT = BOUND // CLASSES  # 838 samples of one path: under SDB_MAX_REQUEST_SAMPLES, so the answer bound decides


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory):
    """A keyed box of a 5,000-class linear classifier of 64 features, and its server's master key file."""
    root = tmp_path_factory.mktemp("many-classes")
    master_file = root / "master.key"
    torch.manual_seed(0)
    box = SafeDistillationBox(torch.nn.Linear(FEATURES, CLASSES).eval(), torch.randn(FEATURES), lam=0.3)
    bundle = export_bundle(box, root / "wide", name="wide", in_shape=(FEATURES,), mean=[0.0], std=[1.0],
                           master_key=load_or_create_master_key(master_file))
    return bundle, master_file


@pytest.fixture
async def wide(tmp_path, many_classes):
    """The app serving it, with gRPC on, in this test's event loop."""
    bundle, master_file = many_classes
    async for service in served_with_grpc(tmp_path, master_file, bundle):
        yield service


def _features(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, FEATURES)).astype(np.float32)


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _v2_json(x: np.ndarray, outputs: list[dict] | None = None) -> dict:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return body if outputs is None else {**body, "outputs": outputs}


def _v2_binary(x: np.ndarray, output: dict) -> dict:
    header = _v2_json(x, [output])
    header["inputs"][0] = {**header["inputs"][0], "parameters": {"binary_data_size": x.nbytes}}
    del header["inputs"][0]["data"]
    import orjson
    head = orjson.dumps(header)
    return {"content": head + x.tobytes(), "headers": {"Inference-Header-Content-Length": str(len(head))}}


def _grpc_request(x: np.ndarray, output: str = "probabilities", class_count: int = 0):
    request = service_pb2.ModelInferRequest(model_name="wide")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    out = request.outputs.add(name=output)
    if class_count:
        out.parameters["classification"].int64_param = class_count
    return request


async def _grpc_call(svc, request, metadata=()):
    # a large answer is larger than gRPC's default 4 MB: tritonclient takes any size, as here
    options = [("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.settings.grpc_port}", options=options) as channel:
        return await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata)


async def _served(svc) -> int:
    """Samples the model has answered, by every route (the statistics extension)."""
    r = await svc.client.get("/v2/models/wide/stats")
    return r.json()["model_stats"][0]["inference_count"]


async def _refusal(svc, route: str, n: int, distill: str) -> tuple[int, str]:
    """The status and message of a request of ``n`` samples on ``route``."""
    c, x, key = svc.client, _features(n), svc.auth(distill)
    if route == "grpc":
        try:
            await _grpc_call(svc, _grpc_request(x))
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            return 413, e.details()
        return 200, ""
    if route == "v1 predict":
        r = await c.post("/v1/models/wide/predict?top_k=3", content=_npy(x),
                         headers={"Content-Type": "application/x-npy"})
    elif route == "v1 distill":
        r = await c.post("/v1/models/wide/distill", json={"inputs": x.tolist()}, headers=key)
    elif route == "v2 json":
        r = await c.post("/v2/models/wide/infer", json=_v2_json(x))
    else:
        r = await c.post("/v2/models/wide/infer", **_v2_binary(x, {"name": "probabilities",
                                                                  "parameters": {"binary_data": True}}))
    if r.status_code != 413:
        return r.status_code, r.text[:300]
    error = r.json()["error"]
    if route.startswith("v1"):  # v1's rich body; v2's is the protocol's message alone
        assert error["code"] == "answer_too_large", error
        return 413, error["message"]
    assert isinstance(error, str), error
    return 413, error


@pytest.mark.parametrize("route", ["v1 predict", "v1 distill", "v2 json", "v2 binary", "grpc"])
async def test_an_answer_over_the_bound_is_a_413_that_says_how_many_samples_fit(wide, route):
    distill = wide.key(("distill",))
    status, message = await _refusal(wide, route, FIT + 1, distill)
    assert status == 413, message
    assert "SDB_MAX_ANSWER_VALUES" in message and f"{BOUND:,}" in message, message
    assert f"at most {FIT} samples" in message, message
    assert await _served(wide) == 0  # refused before any model time
    assert (await _refusal(wide, route, FIT, distill))[0] == 200  # the samples it says fit are answered


async def test_both_paths_at_once_count_twice_and_the_config_says_so(wide):
    # GET /v2/models/{m}/config's max_batch_size is what a Triton client batches by: every output the model serves
    # (this one, distillable: both paths) answered for that many samples fits the bound
    config = (await wide.client.get("/v2/models/wide/config")).json()
    assert config["max_batch_size"] == FIT // 2, config
    x = _features(FIT // 2 + 1)
    key = wide.auth(wide.key(("predict", "distill")))
    outputs = [{"name": "probabilities"}, {"name": "distill_logits"}]
    r = await wide.client.post("/v2/models/wide/infer", json=_v2_json(x, outputs), headers=key)
    assert r.status_code == 413 and f"at most {FIT // 2} samples" in r.json()["error"], r.text[:300]
    r = await wide.client.post("/v2/models/wide/infer", json=_v2_json(x[:-1], outputs), headers=key)
    assert r.status_code == 200, r.text[:300]


async def test_classification_ranks_at_most_what_top_k_may(wide):
    x = _features(1)
    asked = {"name": "probabilities", "parameters": {"classification": MAX_TOP_K + 1}}
    r = await wide.client.post("/v2/models/wide/infer", json=_v2_json(x, [asked]))
    assert r.status_code == 422 and f"at most {MAX_TOP_K}" in r.json()["error"], r.text
    r = await wide.client.post("/v1/models/wide/predict", json={"inputs": x.tolist(), "top_k": MAX_TOP_K + 1})
    assert r.status_code == 422, r.text
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _grpc_call(wide, _grpc_request(x, class_count=MAX_TOP_K + 1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_TOP_K}" in e.value.details()
    asked["parameters"]["classification"] = MAX_TOP_K
    r = await wide.client.post("/v2/models/wide/infer", json=_v2_json(x, [asked]))
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, MAX_TOP_K], r.text[:300]


async def _while_answered(svc, call) -> tuple[float, float]:
    """How long ``call()`` took, and the longest that ``/healthz``, asked again and again meanwhile, went without
    answering (in this process, a loop held by the call holds the probe too: the gap between answers shows it)."""
    done, gaps = asyncio.Event(), [0.0]

    async def probe():
        last = time.perf_counter()
        while not done.is_set():
            assert (await svc.client.get("/healthz")).status_code == 200
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            await asyncio.sleep(0.005)
        gaps.append(time.perf_counter() - last)  # to the call's end: a loop held until then held the probe

    prober = asyncio.ensure_future(probe())
    start = time.perf_counter()
    try:
        await call()
    finally:
        took = time.perf_counter() - start
        done.set()
        await prober
    return took, max(gaps)


@pytest.mark.parametrize("route", ["v1 predict", "v2 classification", "grpc classification"])
async def test_a_large_answer_is_built_while_others_are_served(wide, route):
    x = _features(FIT)  # the largest answer the bound allows, each sample ranked 1,000 deep

    async def call():
        if route == "grpc classification":
            response = await _grpc_call(wide, _grpc_request(x, class_count=MAX_TOP_K))
            assert list(response.outputs[0].shape) == [FIT, MAX_TOP_K]
            return
        if route == "v1 predict":
            r = await wide.client.post(f"/v1/models/wide/predict?top_k={MAX_TOP_K}", content=_npy(x),
                                       headers={"Content-Type": "application/x-npy"})
        else:
            asked = {"name": "probabilities", "parameters": {"classification": MAX_TOP_K}}
            r = await wide.client.post("/v2/models/wide/infer", json=_v2_json(x, [asked]))
        assert r.status_code == 200, r.text[:300]

    took, longest_gap = await _while_answered(wide, call)
    # Built on the event loop, the health probe waited for nearly all of it (the model's call is the least of it);
    # off the loop it answers within a small part, however slow the machine.
    assert longest_gap < took / 3, (route, took, longest_gap)
