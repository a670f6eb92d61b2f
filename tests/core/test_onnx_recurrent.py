"""ONNX's recurrent operators (RNN, GRU, LSTM) as an owner's graph may hold them, against ONNX Runtime.

torch's exporters write ``nn.LSTM`` and ``nn.GRU`` as these operators (and ``nn.RNN`` too, with the TorchScript
exporter), tf2onnx Keras' layers; the network test (``recurrent`` in test_onnx_teachers.NETWORKS) covers what
torch writes. Here each attribute and optional input the specification gives: directions, batch-first layout,
sequence lengths, initial states, peepholes, clip, coupled gates, GRU's reset before the product, activations
with parameters; each answers as ONNX Runtime does, for every output, runs where its input is without reading a
value back (torch's meta device), and exports again as a box is exported.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sdb_core.onnx_torch import OnnxModule

from .test_devices import META

N, T, I, H = 4, 8, 9, 5  # batch, steps, inputs per step, hidden size
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
LENS = np.array([8, 3, 5, 1], np.int32)


def _graph(op: str, output: int, layout: int = 0, direction: str = "forward", lens: bool = False,
           states: bool = False, peepholes: bool = False, **attrs) -> bytes:
    """x (N, 8, 3, 3) read as N sequences of 8 steps of 9 values, through one ``op`` node; its ``output``-th
    output (Y, Y_h, Y_c) is the graph's."""
    rng = np.random.default_rng(0)
    dirs, g = (2 if direction == "bidirectional" else 1), GATES[op]
    stored = {"w": rng.normal(0, 0.5, (dirs, g * H, I)), "r": rng.normal(0, 0.5, (dirs, g * H, H)),
              "b": rng.normal(0, 0.3, (dirs, 2 * g * H))}
    shape = (N, dirs, H) if layout else (dirs, N, H)
    if states:
        stored["h0"] = rng.normal(0, 0.5, shape)
        if op == "LSTM":
            stored["c0"] = rng.normal(0, 0.5, shape)
    if peepholes:
        stored["p"] = rng.normal(0, 0.5, (dirs, 3 * H))
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stored.items()]
    inits.append(numpy_helper.from_array(np.array([N, T, I], np.int64), "shape"))
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["seq_bf"])]
    seq = "seq_bf"
    if not layout:
        nodes.append(helper.make_node("Transpose", ["seq_bf"], ["seq"], perm=[1, 0, 2]))
        seq = "seq"
    if lens:
        inits.append(numpy_helper.from_array(LENS, "lens"))
    ins = [seq, "w", "r", "b", "lens" if lens else "", "h0" if states else "",
           "c0" if states and op == "LSTM" else "", "p" if peepholes else ""][:8 if op == "LSTM" else 6]
    while ins[-1] == "":
        ins.pop()
    outs = ["y", "y_h", "y_c"][:3 if op == "LSTM" else 2]
    nodes.append(helper.make_node(op, ins, outs, hidden_size=H, direction=direction, layout=layout, **attrs))
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, 8, 3, 3])],
                              [helper.make_tensor_value_info(outs[output], TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8).SerializeToString()


CASES = {
    "lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn": ("RNN", {}),
    "lstm_bidirectional_states": ("LSTM", {"direction": "bidirectional", "states": True}),
    "lstm_reverse_lengths": ("LSTM", {"direction": "reverse", "lens": True, "states": True}),
    "lstm_bidirectional_lengths": ("LSTM", {"direction": "bidirectional", "lens": True}),
    "lstm_peepholes_clip": ("LSTM", {"peepholes": True, "clip": 0.7, "states": True}),
    "lstm_coupled_gates": ("LSTM", {"input_forget": 1}),
    "lstm_activations": ("LSTM", {"activations": ["HardSigmoid", "LeakyRelu", "Softsign"],
                                  "activation_alpha": [0.3, 0.2], "activation_beta": [0.4]}),
    "gru_reset_before": ("GRU", {"linear_before_reset": 0, "direction": "bidirectional", "states": True}),
    "gru_reset_after_lengths": ("GRU", {"linear_before_reset": 1, "lens": True}),
    "rnn_relu_reverse": ("RNN", {"activations": ["Relu"], "direction": "reverse", "states": True}),
    "rnn_lengths_bidirectional": ("RNN", {"direction": "bidirectional", "lens": True}),
}
OUTPUTS = [(name, k) for name, (op, _) in CASES.items() for k in range(3 if op == "LSTM" else 2)]


def _x() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(N, 8, 3, 3)).astype(np.float32)


@pytest.mark.parametrize(("name", "output"), OUTPUTS)
def test_each_recurrent_operator_answers_as_onnx_runtime(name, output):
    op, attrs = CASES[name]
    graph = _graph(op, output, **attrs)
    want = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"x": _x()})[0]
    with torch.no_grad():
        got = OnnxModule(graph)(torch.from_numpy(_x())).numpy()
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-5), np.abs(got - want).max()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_recurrent_operator_trains_runs_on_its_inputs_device_and_exports_again(name):
    op, attrs = CASES[name]
    graph = _graph(op, 0, **attrs)
    module = OnnxModule(graph, trainable=True)
    weights = [p for p in module.parameters() if p.dim() >= 2]  # W and R at least
    assert len(weights) >= 2 and all(p.requires_grad for p in weights)
    module(torch.from_numpy(_x())).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    with torch.no_grad():
        assert OnnxModule(graph).to(META)(torch.randn(N, 8, 3, 3, device=META)).device == META
    module = OnnxModule(graph, fold=True).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(_x()),), buf, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
        want = module(torch.from_numpy(_x())).numpy()
    got = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": _x()})[0]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5), np.abs(got - want).max()


@pytest.mark.parametrize("name", ["lstm_bidirectional_lengths", "gru_reset_after_lengths", "rnn_lengths_bidirectional"])
def test_batch_first_layout_is_sequence_first_transposed(name):
    # ONNX Runtime runs layout 0 only (a layout 1 graph does not load there); the specification's layout 1 puts
    # the batch first in X, Y, the states, and is otherwise the same computation
    op, attrs = CASES[name]
    for output in range(3 if op == "LSTM" else 2):
        with torch.no_grad():
            seq_first = OnnxModule(_graph(op, output, **attrs))(torch.from_numpy(_x()))
            batch_first = OnnxModule(_graph(op, output, layout=1, **attrs))(torch.from_numpy(_x()))
        want = seq_first.permute(2, 0, 1, 3) if output == 0 else seq_first.transpose(0, 1)
        assert torch.allclose(batch_first, want, atol=1e-6), (output, (batch_first - want).abs().max())


def test_an_activation_outside_the_specification_is_refused_by_name():
    with pytest.raises(ValueError, match="recurrent activation 'Gelu' is not supported"):
        OnnxModule(_graph("RNN", 0, activations=["Gelu"]))(torch.from_numpy(_x()))
