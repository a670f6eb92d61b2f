"""sdb_core.graph_size counts a graph's entries off the wire as onnx's parser would, subgraphs and functions in."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdb_core.graph_size import graph_entries, node_domains


def _parsed_count(model: onnx.ModelProto) -> int:
    def graph(g: onnx.GraphProto) -> int:
        n = (len(g.node) + len(g.initializer) + len(g.input) + len(g.output) + len(g.value_info)
             + len(g.sparse_initializer))
        return n + sum(graph(a.g) * a.HasField("g") + sum(graph(s) for s in a.graphs)
                       for node in g.node for a in node.attribute)
    return graph(model.graph) + sum(len(f.node) for f in model.functions)


def _nested(depth: int) -> onnx.ModelProto:
    """An If in an If … ``depth`` deep, a function beside, value infos: every kind of entry the count reads."""
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    body = helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "leaf", [], [out],
                             initializer=[numpy_helper.from_array(np.ones(1, np.float32), "c")])
    for i in range(depth):
        node = helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)
        body = helper.make_graph([node], f"level{i}", [], [out])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)
    graph = helper.make_graph([node, helper.make_node("Twice", ["y"], ["z"], domain="local")], "top",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
                              value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    twice = helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                 [helper.make_opsetid("", 17)])
    return helper.make_model(graph, functions=[twice], opset_imports=[helper.make_opsetid("", 17),
                                                                      helper.make_opsetid("local", 1)])


@pytest.mark.parametrize("depth", [0, 1, 5])
def test_the_count_is_what_onnx_parses(depth):
    model = _nested(depth)
    assert graph_entries(model.SerializeToString()) == _parsed_count(model) > 0


def test_exported_networks_count_as_parsed_and_the_count_stops_past_its_bound():
    import torch

    from sdb_core.bundle import export_onnx
    from sdb_core.models import create_model

    torch.manual_seed(0)
    raw = export_onnx(create_model("resnet8", num_classes=10, in_shape=(3, 32, 32)).eval(), (3, 32, 32))
    n = graph_entries(raw)
    assert n == _parsed_count(onnx.load_from_string(raw)) > 50
    assert graph_entries(raw, stop_after=10) == 11


def test_bytes_that_are_not_a_model_count_what_was_read():
    model = _nested(2).SerializeToString()
    for garbage in (b"", b"\xff" * 64, b"not a model", model[: len(model) // 2]):
        assert 0 <= graph_entries(garbage) <= _parsed_count(_nested(2))


def test_node_domains_reach_subgraphs_and_function_bodies_and_skip_calls_to_local_functions():
    branch = helper.make_graph([helper.make_node("Foo", ["x"], ["y"], domain="in.branch")], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    nodes = [helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Gelu", ["b"], ["c"], domain="com.microsoft"),
             helper.make_node("If", ["cond"], ["d"], then_branch=branch, else_branch=branch),
             helper.make_node("MyFn", ["c"], ["e"], domain="local")]
    fn = helper.make_function("local", "MyFn", ["x"], ["y"], [helper.make_node("Neg", ["x"], ["y"]),
                                                              helper.make_node("Bar", ["x"], ["z"], domain="in.fn")],
                              [helper.make_opsetid("", 17)])
    model = helper.make_model(helper.make_graph(nodes, "g", [], []), functions=[fn])
    assert node_domains(model.SerializeToString()) == {"com.microsoft", "in.branch", "in.fn"}
    assert node_domains(b"\xff\xff not a model") == set()
