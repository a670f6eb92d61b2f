"""Valid but hostile ONNX graphs from a deploy key: what a served model's calls allocate is bounded.

Before the fix, nothing bounded a graph's memory but the machine. A ``ConstantOfShape`` of 10^9 floats passed
every static check: its deploy's check run allocated 4 GB in the server's process (ONNX Runtime's arena kept
it), one whose size followed the input's values took it on a request instead, and constant folding built such
constants at load, outside any arena (four nodes of 800 MB: 3.9 GB while the session was made). A few of
them, and the operating system killed the server and every tenant's models with it. Now every served session
allocates from one CPU arena bounded by ``SDB_MODEL_MEMORY_MB`` and nothing is folded at load: the deploy is a
400 that says why, the request a 503 ``model_out_of_memory``, and the server serves on. ``sdb serve`` end to end
(the bound is one per process), with a bound of 64 MiB so that the refusals cost no real memory.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.security.test_hand_made_bundles_are_refused_clearly import _edit, _sdb, plain  # noqa: F401
from tests.service.conftest import Server, run_sdb, sdb_env

BOUND_MB = 64
FLOATS = 40 << 20  # 160 MiB of float32: over the bound, and far under ONNX Runtime's 1 GB folding limit


def _graph(sizes: int, per_input: bool = False) -> bytes:
    """input [N, 3, 8, 8] -> logits [N, 4] = ReduceSum(input) + 0 · ReduceSum(Sum of ``sizes`` ConstantOfShape of
    FLOATS each): every constant alive at once. ``per_input``: one constant of max(input) · FLOATS floats: none on
    the check run's zeros, 160 MiB on an input of 1s."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype), name)

    ones = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    if per_input:
        nodes = [helper.make_node("ReduceMax", ["input"], ["top"], keepdims=0),
                 helper.make_node("Mul", ["top", "per_unit"], ["count_f"]),
                 helper.make_node("Cast", ["count_f"], ["count"], to=TensorProto.INT64),
                 helper.make_node("Reshape", ["count", "one_dim"], ["dims"]),
                 helper.make_node("ConstantOfShape", ["dims"], ["big"], value=ones),
                 helper.make_node("ReduceSum", ["big"], ["held"], keepdims=0)]
    else:
        nodes = [helper.make_node("ConstantOfShape", ["shape"], [f"big{i}"], value=ones) for i in range(sizes)]
        nodes += [helper.make_node("Sum", [f"big{i}" for i in range(sizes)], ["all"]),
                  helper.make_node("ReduceSum", ["all"], ["held"], keepdims=0)]
    nodes += [helper.make_node("Mul", ["held", "zero"], ["nothing"]),
              helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=1),
              helper.make_node("Reshape", ["total", "column"], ["per_sample"]),
              helper.make_node("Add", ["per_sample", "nothing"], ["one_column"]),
              helper.make_node("Mul", ["one_column", "row"], ["logits"])]
    graph = helper.make_graph(
        nodes, "hungry", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[const("shape", [FLOATS], np.int64), const("per_unit", FLOATS, np.float32),
                     const("one_dim", [1], np.int64), const("zero", 0, np.float32),
                     const("axes", [1, 2, 3], np.int64), const("column", [-1, 1], np.int64),
                     const("row", [[1, 2, 3, 4]], np.float32)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def hungry_server(tmp_path, bundles, servers):
    env = {**sdb_env(tmp_path / "data", bundles), "SDB_MODEL_MEMORY_MB": str(BOUND_MB), "SDB_REGISTER_DEMO": "false"}
    made = run_sdb("keys", "create", "--scopes", "deploy", env=env)
    assert made.returncode == 0, made.stderr
    servers.append(Server(tmp_path / "data", bundles, env=env))
    return servers[-1], {"Authorization": f"Bearer {made.stdout.strip().splitlines()[-1]}"}


def test_a_graph_that_builds_big_constants_is_refused_at_deploy(hungry_server, plain):  # noqa: F811
    import httpx

    server, auth = hungry_server
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/models", files={"file": ("mine.sdb", _sdb(plain))}, headers=auth).status_code == 201
        for sizes in (1, 4):  # one constant over the bound; four that ONNX Runtime folded at load before
            r = c.post("/v1/models", files={"file": ("h.sdb", _sdb(_edit(plain, onnx=_graph(sizes))))},
                       data={"name": f"hungry-{sizes}"}, headers=auth)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "bundle_refused" and "needs more memory" in error["message"], error
            assert "SDB_MODEL_MEMORY_MB" in error["message"] and "onnxruntime_src" not in error["message"]
        assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["mine"]
        x = {"inputs": np.zeros((2, 3, 8, 8)).tolist()}
        assert c.post("/v1/models/mine/predict", json=x).status_code == 200
    assert server.proc.poll() is None


def test_a_request_whose_graph_asks_for_too_much_memory_is_refused_and_the_server_serves_on(hungry_server,
                                                                                            plain):  # noqa: F811
    import httpx

    server, auth = hungry_server
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/models", files={"file": ("mine.sdb", _sdb(plain))}, headers=auth).status_code == 201
        r = c.post("/v1/models", files={"file": ("h.sdb", _sdb(_edit(plain, onnx=_graph(1, per_input=True))))},
                   data={"name": "hungry"}, headers=auth)
        assert r.status_code == 201, r.text  # zeros: nothing to build
        zeros, ones = {"inputs": np.zeros((1, 3, 8, 8)).tolist()}, {"inputs": np.ones((1, 3, 8, 8)).tolist()}
        assert c.post("/v1/models/hungry/predict", json=zeros).status_code == 200
        for route in ("/v1/models/hungry/predict", "/v2/models/hungry/infer"):
            body = ones if route.startswith("/v1") else {
                "inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": ones["inputs"]}]}
            r = c.post(route, json=body)
            assert r.status_code == 503, r.text
            message = r.json()["error"] if route.startswith("/v2") else r.json()["error"]["message"]
            assert "SDB_MODEL_MEMORY_MB" in message and "onnxruntime" not in message.lower(), message
        assert c.post("/v1/models/mine/predict", json=zeros).status_code == 200
        assert c.post("/v1/models/hungry/predict", json=zeros).status_code == 200  # its arena was given back
    assert server.proc.poll() is None
    assert "Traceback" not in server.stop()
