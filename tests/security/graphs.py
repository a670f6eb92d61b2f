"""Pieces of the hostile and slow ONNX graphs the security tests build by hand."""
from __future__ import annotations

import numpy as np


def const(name: str, value, dtype):
    """An initializer ``name`` holding ``value``."""
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(value, dtype), name)


def counting_loop_body():
    """A Loop's body that adds one to each of 4 scores per trip, for as many trips as the Loop is given: a graph's
    run time set by a number, without memory."""
    from onnx import TensorProto, helper

    return helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["acc", "one"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4])],
        initializer=[const("one", np.ones(4), np.float32)])
