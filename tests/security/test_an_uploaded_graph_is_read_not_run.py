"""An uploaded ONNX graph is read by the API server, never run there.

Reading a graph to run it computes once what its stored values alone compute (``OnnxModule``'s folding): for
an upload that would be arithmetic the uploader chose, in the API server, at upload time (a stored shape of
4096 x 4096 made a 64 MiB tensor per upload before the check read graphs without folding). The check reports
what the graph stores, nothing it would compute. Against the real app in process.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]

SIDE = 4096


def _graph() -> bytes:
    """input [N, 4] -> logits [N, 4] = input + sum(ConstantOfShape([SIDE, SIDE])) * 0: a classifier's shape,
    and a SIDE x SIDE tensor computed from stored values alone."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ConstantOfShape", ["side"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Mul", ["total", "zero"], ["nothing"]),
             helper.make_node("Add", ["input", "nothing"], ["logits"])]
    graph = helper.make_graph(nodes, "computes_on_upload", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(np.array([SIDE, SIDE], np.int64), "side"),
                               numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


async def test_an_uploaded_graph_is_read_not_run(svc):
    tok = svc.key(("jobs",))
    r = await svc.client.post("/v1/files", files={"file": ("g.onnx", _graph())}, data={"purpose": "weights"},
                              headers=svc.auth(tok))
    assert r.status_code == 201, r.text
    info = r.json()["info"]
    assert info["input_shape"] == ["N", 4] and info["nodes"] == 4
    assert info["parameters"] == 3  # what it stores (a shape of two, a zero); nothing it would compute
