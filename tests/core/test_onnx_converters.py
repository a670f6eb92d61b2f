"""Classifiers brought as ONNX as converters other than torch's default write them, and exports made with options
that change the graph: each read by onnx_classifier as ONNX Runtime runs the original, or refused saying what to
do. tf2onnx's free batch axis written as a size of -1 and its Flatten stored for one input, torch's modules
exported as functions, in training mode or for an input it was not told the name of, skl2onnx's probabilities as
a ZipMap's maps and its StandardScaler, Keras' channels-last sequences."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sdb_core.onnx_torch import ChannelsLast, OnnxModule, onnx_classifier
from tests.onnx_graphs import ViewNet, keras_style, onnx_bytes, sklearn_mlp


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _agrees(got: torch.Tensor, want: np.ndarray) -> None:
    """The torch network's logits are ONNX Runtime's, and so their top-1 (the tolerance of test_onnx_teachers)."""
    assert got.shape == want.shape and np.allclose(got.numpy(), want, atol=1e-4), np.abs(got.numpy() - want).max()
    assert (got.argmax(1).numpy() == want.argmax(1)).all()


def test_a_batch_axis_written_as_minus_one_is_free_as_onnx_runtime_reads_it():
    """``dim_value: -1`` (onnx's checker passes it): read as a size of -1, the graph was taken for one exported at
    batch -1, and every wrap failed inside on 'torch.cat(): expected a non-empty list of Tensors'."""
    model = keras_style(batch=-1)
    assert OnnxModule(model).input_shape == (None, 8, 8, 1)
    graph = onnx_classifier(model, (1, 8, 8))
    assert isinstance(graph, ChannelsLast) and graph.net.fixed_batch is None
    x = torch.randn(5, 1, 8, 8)
    want = _session(model).run(None, {"input_1:0": x.permute(0, 2, 3, 1).numpy()})[0]
    with torch.no_grad():
        _agrees(graph(x), want)
        _agrees(graph(x[:1]), want[:1])


def test_a_graph_of_model_local_functions_runs_as_their_bodies():
    """torch's export of modules as functions: a node ``Linear`` of domain torch.nn.modules.linear, whose body is
    a Gemm. It was refused: "unsupported operators ['torch.nn.modules.linear.Linear']"."""
    import tempfile
    from pathlib import Path

    import onnx

    from service.filechecks import Limits, check_weights

    torch.manual_seed(0)
    net = ViewNet().eval()
    model = onnx_bytes(net, (1, 8, 8), export_modules_as_functions={nn.Linear})
    assert any(n.domain == "torch.nn.modules.linear" for n in onnx.load_from_string(model).graph.node)
    graph = onnx_classifier(model, (1, 8, 8))
    assert "Gemm" in {op for _, op, *_ in graph.nodes}
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        _agrees(graph(x), _session(model).run(None, {"image": x.numpy()})[0])
        assert torch.allclose(graph(x), net(x), atol=1e-4)
    with tempfile.TemporaryDirectory() as tmp:  # and an upload of it is accepted (its check reads it so too)
        src, out = Path(tmp) / "upload", Path(tmp) / "out"
        src.write_bytes(model)
        out.mkdir()
        checked = check_weights(src, out, Limits(unpacked_bytes=1 << 20, members=10), "g.onnx")
    assert checked.format == "onnx" and checked.info["input_shape"] == ["N", 1, 8, 8]


def _calling(levels: int, loop: bool = False) -> bytes:
    """A graph of one call to function F``levels``, each function calling the one below twice (F0: a Relu): 2 **
    ``levels`` nodes once inlined; ``loop``: F0 calls F``levels`` back."""
    from onnx import TensorProto, helper

    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    functions = [helper.make_function("local", "F0", ["a"], ["b"], [
        helper.make_node(f"F{levels}", ["a"], ["b"], domain="local") if loop else helper.make_node("Relu", ["a"], ["b"])],
        opsets)]
    for k in range(1, levels + 1):
        functions.append(helper.make_function("local", f"F{k}", ["a"], ["b"], [
            helper.make_node(f"F{k - 1}", ["a"], ["h"], domain="local"),
            helper.make_node(f"F{k - 1}", ["h"], ["b"], domain="local")], opsets))
    graph = helper.make_graph([helper.make_node(f"F{levels}", ["x"], ["y"], domain="local")], "calls",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=9).SerializeToString()


def test_functions_are_inlined_only_where_their_bodies_are_bounded():
    """Inlined in an upload's check too, in the API server: functions that call one another twice over stand for
    2 ** levels nodes (inlining them would not end), a function that calls itself for endless ones."""
    assert len(OnnxModule(_calling(3)).nodes) == 8
    with pytest.raises(ValueError, match="more than 50000 nodes once its functions are inlined"):
        OnnxModule(_calling(20))
    with pytest.raises(ValueError, match="functions call one another more than 32 deep"):
        OnnxModule(_calling(40))
    with pytest.raises(ValueError, match="calls itself"):
        OnnxModule(_calling(2, loop=True))
    # the bound holds whatever order the graph calls them in: a function counted once, less deep, was taken as is
    with pytest.raises(ValueError, match="functions call one another more than 32 deep"):
        OnnxModule(_chain(40))
    assert len(OnnxModule(_chain(31)).nodes) == 32  # 32 deep at most: one Relu a call, once inlined


def _chain(levels: int) -> bytes:
    """A graph calling F0, F1, ..., F``levels`` in turn, each function calling the one below once (F0: a Relu): the
    last is ``levels`` + 1 calls deep, each function first met where it is called alone."""
    from onnx import TensorProto, helper

    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    functions = [helper.make_function("local", "F0", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], opsets)]
    functions += [helper.make_function("local", f"F{k}", ["a"], ["b"],
                                       [helper.make_node(f"F{k - 1}", ["a"], ["b"], domain="local")], opsets)
                  for k in range(1, levels + 1)]
    names = ["x", *(f"t{k}" for k in range(levels)), "y"]
    nodes = [helper.make_node(f"F{k}", [names[k]], [names[k + 1]], domain="local") for k in range(levels + 1)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=9).SerializeToString()


def _logits_too(model: bytes) -> ort.InferenceSession:
    """ONNX Runtime on an skl2onnx graph whose logits (its Softmax's input) are made a third output."""
    import onnx

    exposed = onnx.load_from_string(model)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info("add_result1", onnx.TensorProto.FLOAT, None))
    return _session(exposed.SerializeToString())


def _probabilities(maps: list[dict]) -> np.ndarray:
    """A ZipMap's answers (a map of label to probability per input) as an array, a column per label."""
    return np.array([[m[k] for k in sorted(m)] for m in maps], np.float32)


def test_skl2onnx_probabilities_as_a_zipmaps_maps_are_read_as_the_tensor_it_maps():
    """skl2onnx's default (zipmap=True): an int64 label, then a sequence of maps. The label was read, through
    ArrayFeatureExtractor: refused as 'a classical model'."""
    model = sklearn_mlp(zipmap=True)
    graph = onnx_classifier(model, (64,))
    assert "ZipMap" in graph.why and "ends in a Softmax" in graph.why
    assert not any(op.startswith("ai.onnx.ml") for _, op, *_ in graph.nodes)
    x = torch.randn(7, 64)
    label, maps, want = _logits_too(model).run(None, {"float_input": x.numpy()})
    with torch.no_grad():
        logits = graph(x)
    _agrees(logits, want)
    assert (logits.argmax(1).numpy() == label).all()
    assert np.allclose(torch.softmax(logits, 1).numpy(), _probabilities(maps), atol=1e-5)
    no_zipmap = sklearn_mlp(zipmap=False)  # the same network: its logits are the graph's own
    with torch.no_grad():
        assert torch.allclose(onnx_classifier(no_zipmap, (64,))(x), logits, atol=1e-5)


def test_a_pipelines_standard_scaler_is_run_as_the_affine_map_it_is():
    """make_pipeline(StandardScaler(), MLPClassifier()): ai.onnx.ml's Scaler, (x - offset) * scale, before the
    network. It was refused as 'a classical model'."""
    model = sklearn_mlp(zipmap=False, scaler=True)
    graph = onnx_classifier(model, (64,))
    x = torch.randn(7, 64) * 3
    with torch.no_grad():
        logits = graph(x)
    label, _, want = _logits_too(model).run(None, {"float_input": x.numpy()})
    _agrees(logits, want)
    assert (logits.argmax(1).numpy() == label).all()
    assert not any(p.shape == (64,) for p in graph.parameters())  # the scaler's statistics are not weights


@pytest.mark.parametrize("shape,values", [((64,), 64), ((8, 3, 3), 8), ((8, 3, 3), 1)],
                         ids=["per_feature", "per_channel_of_an_image", "one_for_all"])
def test_a_scaler_answers_as_onnx_runtime_and_lives_where_its_input_is(shape, values):
    """ONNX Runtime scales the i-th value by the (i mod features)-th offset and scale, features on axis 1."""
    from onnx import TensorProto, helper

    from .test_devices import META

    rng = np.random.default_rng(0)
    node = helper.make_node("Scaler", ["x"], ["y"], domain="ai.onnx.ml", offset=rng.normal(size=values).tolist(),
                            scale=rng.uniform(0.5, 2, size=values).tolist())
    model = helper.make_model(helper.make_graph(
        [node], "scaler", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", *shape])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8).SerializeToString()
    x = rng.normal(size=(4, *shape)).astype(np.float32)
    module = OnnxModule(model)
    with torch.no_grad():
        assert np.allclose(module(torch.from_numpy(x)).numpy(), _session(model).run(None, {"x": x})[0], atol=1e-6)
        assert module.to(META)(torch.randn(4, *shape, device=META)).device == META  # its statistics moved with it


def test_ai_onnx_ml_operators_that_are_no_model_are_not_called_one():
    from onnx import TensorProto, helper

    normalizer = helper.make_model(helper.make_graph(
        [helper.make_node("Normalizer", ["x"], ["u"], domain="ai.onnx.ml", norm="L2"),
         helper.make_node("MatMul", ["u", "w"], ["y"])], "normalized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.5] * 12)]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    with pytest.raises(ValueError, match=r"ai\.onnx\.ml\.Normalizer.*preprocess features.*convert the network alone") as e:
        onnx_classifier(normalizer.SerializeToString(), (4,))
    assert "classical model" not in str(e.value)


def _unnamed_input(net: nn.Module, batch: int, name: str = "input.1") -> bytes:
    """torch.onnx.export with ``dynamic_axes`` naming an input it was not given the name of (``name``, the one it
    makes): the axis is declared free, but the trace stored ``batch`` (in ViewNet's ``x.view(x.size(0), -1)``)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(batch, 1, 8, 8),), buf, dynamic_axes={name: {0: "n"}},
                          opset_version=17, dynamo=False)
    return buf.getvalue()


def _at(session: ort.InferenceSession, x: np.ndarray, batch: int) -> np.ndarray:
    """ONNX Runtime's answers to ``x``, ``batch`` rows at a time (the last chunk filled with its first row)."""
    name, out = session.get_inputs()[0].name, []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        out.append(session.run(None, {name: np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), 0)])})[0]
                   [:len(chunk)])
    return np.concatenate(out)


@pytest.mark.parametrize("graph", ["tf2onnx_at_1", "torch_unnamed_at_2"])
def test_a_graph_declaring_a_free_batch_it_does_not_run_at_is_read_at_the_batch_it_stores(graph):
    """The batch axis is declared free, a reshape stores a batch all the same: ONNX Runtime runs it at that batch
    only, and the check at batch 3 failed with ONNX Runtime's error, cut. Read as exported at that batch, it runs
    at any, sample by sample."""
    torch.manual_seed(0)
    model, batch = (keras_style(stored_batch=1), 1) if graph == "tf2onnx_at_1" else (_unnamed_input(ViewNet(), 2), 2)
    net = onnx_classifier(model, (1, 8, 8))
    assert f"declares a free batch axis but ONNX Runtime runs it at batch {batch} only" in net.why
    x = torch.randn(5, 1, 8, 8)
    want = _at(_session(model), x.permute(0, 2, 3, 1).numpy() if graph == "tf2onnx_at_1" else x.numpy(), batch)
    with torch.no_grad():
        for n in (5, 1, 4):
            _agrees(net(x[:n]), want[:n])


def test_a_graph_declaring_a_free_batch_it_runs_at_alone_is_refused_in_words():
    class InPlace(nn.Module):  # its reshape stores the export's batch, and so do its slices assigned in place
        def __init__(self):  # (ScatterND's indices): at no other batch does it answer each input as alone
            super().__init__()
            self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

        def forward(self, x):
            h = self.a(x.view(x.size(0), -1))
            mark = torch.zeros_like(h)
            mark[:, 1] = 1.0
            return self.b(h + mark)

    with pytest.raises(ValueError, match="declares a free batch axis but runs at batch 2 only, and .* at others"):
        onnx_classifier(_unnamed_input(InPlace(), 2, "onnx::Reshape_0"), (1, 8, 8))
    # past the batch sizes tried (it is not one a model is exported at): ONNX Runtime's error, its end kept
    with pytest.raises(ValueError, match=r"ONNX Runtime cannot run the graph \(at batch 3, nor at 1\): .*"
                                         r"requested shape:\{100,64\}"):
        onnx_classifier(keras_style(stored_batch=100), (1, 8, 8))


def _batch_norm_in_training_mode(opset: int) -> bytes:
    """One BatchNormalization in training mode as ``opset`` says it: ``training_mode=1`` (14 on), or its running
    statistics among its outputs (9 to 13)."""
    from onnx import TensorProto, helper, numpy_helper

    outputs, attrs = (["y", "mean", "var"], {"training_mode": 1}) if opset >= 14 else (["y", "mean", "var", "m", "v"], {})
    stored = [numpy_helper.from_array(np.full(3, v, np.float32), k) for k, v in
              (("scale", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))]
    graph = helper.make_graph([helper.make_node("BatchNormalization", ["x", *(t.name for t in stored)], outputs,
                                                name="bn", **attrs)], "bn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], stored)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8).SerializeToString()


def test_a_training_mode_export_is_refused_naming_its_batch_norm():
    """ONNX Runtime normalises such a graph by each batch's statistics; it was refused as not computing what ONNX
    Runtime computes (largest difference 0.77), nothing said of why."""
    x = np.array([[5.0, 1.0, 0.0], [7.0, 2.0, 1.0]], np.float32)
    for opset in (13, 17):  # ONNX Runtime's answers are the batch's, not the running statistics'
        model = _batch_norm_in_training_mode(opset)
        assert not np.allclose(_session(model).run(None, {"x": x})[0], x, atol=1e-3)
        with pytest.raises(ValueError, match=r"node 'bn' \(BatchNormalization\) normalises by the statistics of each "
                                             r"batch.*exported in training mode.*model\.eval\(\)"):
            onnx_classifier(model, (3,))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"node '/bn/BatchNormalization' \(BatchNormalization\).*model\.eval\(\)"):
        onnx_classifier(onnx_bytes(ViewNet(), (1, 8, 8), training=torch.onnx.TrainingMode.TRAINING,
                                   do_constant_folding=False), (1, 8, 8))


class SequencesLast(nn.Module):
    """A sequence classifier taking (N, T, C), as Keras' 1-d convolutions and recurrent layers do."""

    def __init__(self):
        super().__init__()
        self.conv, self.lstm, self.fc = nn.Conv1d(4, 6, 3), nn.LSTM(6, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.fc(self.lstm(h)[0][:, -1])


def test_a_channels_last_sequence_classifier_gets_signals_channels_last():
    """Signals are (C, L) = (4, 12); the graph takes (N, 12, 4): refused as 'takes inputs of shape (N, 12, 4), the
    data's are (N, 4, 12)', where channels last was read for images alone."""
    torch.manual_seed(0)
    net = SequencesLast().eval()
    model = onnx_bytes(net, (12, 4))
    graph = onnx_classifier(model, (4, 12))
    assert isinstance(graph, ChannelsLast) and "channels last" in graph.why
    x = torch.randn(5, 4, 12)
    with torch.no_grad():
        _agrees(graph(x), _session(model).run(None, {"image": x.transpose(1, 2).numpy()})[0])
    with pytest.raises(ValueError, match=r"takes inputs of shape \(N, 12, 4\), the data's are \(N, 4, 10\)"):
        onnx_classifier(model, (4, 10))
