"""GET /v2/models/{name}/config (and gRPC's ModelConfig) says as ``max_batch_size`` how many samples one request
may hold, which Triton's clients and perf_analyzer batch by: it advertised SDB_MAX_REQUEST_SAMPLES (1024) for a
3x224x224 model, of which 13 fit the payload limit (14 were a 413, or gRPC's RESOURCE_EXHAUSTED). Now it is the
fewest of the request bound, the samples the payload limit holds in the binary layout and those whose answer fits
SDB_MAX_ANSWER_VALUES, and a request of that many samples is answered on both transports."""
from __future__ import annotations

import grpc
import numpy as np
import orjson
import pytest
import torch
from tritonclient.grpc import service_pb2, service_pb2_grpc

from sdb_core.bundle import export_bundle
from sdb_core.protect.key import load_or_create_master_key

from .conftest import served_with_grpc

pytestmark = pytest.mark.anyio

IN_SHAPE = (3, 224, 224)
SAMPLE_BYTES = 4 * int(np.prod(IN_SHAPE))  # FP32, as tritonclient sends it


@pytest.fixture
async def imagenet_sized(tmp_path):
    """A plain 10-class classifier of 3x224x224 images, served with gRPC on."""
    master_file = tmp_path / "master.key"
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10)).eval()
    bundle = export_bundle(net, tmp_path / "big-input", name="big-input", in_shape=IN_SHAPE, mean=[0.5], std=[0.25],
                           master_key=load_or_create_master_key(master_file))
    async for service in served_with_grpc(tmp_path, master_file, bundle):
        yield service


def _binary_infer(x: np.ndarray) -> dict:
    head = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]})
    return {"content": head + x.tobytes(), "headers": {"Inference-Header-Content-Length": str(len(head))}}


async def test_max_batch_size_is_what_one_request_may_hold(imagenet_sized):
    svc = imagenet_sized
    config = (await svc.client.get("/v2/models/big-input/config")).json()
    batch = config["max_batch_size"]
    assert 1 <= batch <= svc.settings.max_payload_bytes // SAMPLE_BYTES == 13, config

    x = np.random.default_rng(0).random((batch, *IN_SHAPE), dtype=np.float32)
    r = await svc.client.post("/v2/models/big-input/infer", **_binary_infer(x))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["outputs"][0]["shape"] == [batch, 10]

    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.settings.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        config = (await stub.ModelConfig(service_pb2.ModelConfigRequest(name="big-input"))).config
        assert config.max_batch_size == batch
        request = service_pb2.ModelInferRequest(model_name="big-input")
        request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(x.tobytes())
        response = await stub.ModelInfer(request)
        assert list(response.outputs[0].shape) == [batch, 10]
