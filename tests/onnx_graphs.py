"""An ``.onnx`` of a torch network, written as owners export theirs (``torch.onnx.export``, the TorchScript exporter
at opset 17), with a free batch axis or at one fixed batch size; and graphs as other converters write them
(tf2onnx's of a Keras model, skl2onnx's of a scikit-learn network), built with onnx.helper."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdb_core.train import device_of


class ViewNet(nn.Module):
    """A classifier of 8x8 images outside the zoo: BatchNorm, and ``x.view(x.size(0), -1)``, which exports as
    Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.view(x.size(0), -1))


def onnx_bytes(net: nn.Module, shape, free_batch: bool = True, batch: int = 2, dtype=torch.float32,
               free_spatial: bool = False, **export) -> bytes:
    """``free_spatial``: the last two axes free too (a fully convolutional export). ``export``: more of
    ``torch.onnx.export``'s arguments (``export_modules_as_functions``, ``training``)."""
    buf = io.BytesIO()
    free = {0: "n"} if free_batch else {}
    free |= {len(shape) - 1: "h", len(shape): "w"} if free_spatial else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = torch.randn(batch, *shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(
            batch, *shape, dtype=dtype)
        example = example.to(device_of(net))  # a net trained on a GPU exports there (the graph is the same)
        torch.onnx.export(net.eval(), (example,), buf, input_names=["image"],
                          dynamic_axes={"image": free} if free else None, opset_version=17, dynamo=False, **export)
    return buf.getvalue()


def keras_style(batch: int | str = "unk__123", stored_batch: int = -1) -> bytes:
    """A classifier of 8x8 images as tf2onnx writes a Keras model: input ``input_1:0`` (``batch``, 8, 8, 1),
    channels last (``batch``: the axis tf2onnx names ``unk__123``, or a size: -1 as some converters write a free
    one); a convolution, ReLU, max pooling, Flatten as a reshape to a stored (``stored_batch``, 64) (-1: any batch;
    a model built for one input stores 1) and a dense layer, its logits the output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    stored = {"conv/kernel": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
              "conv/bias": rng.normal(size=4).astype(np.float32),
              "flatten/shape": np.array([stored_batch, 64], np.int64),
              "dense/kernel:0": rng.normal(size=(64, 10)).astype(np.float32) / 8,
              "dense/bias:0": rng.normal(size=10).astype(np.float32)}
    nodes = [helper.make_node("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "conv/kernel", "conv/bias"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["pool", "flatten/shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "dense/kernel:0"], ["dense"]),
             helper.make_node("Add", ["dense", "dense/bias:0"], ["logits"])]
    graph = helper.make_graph(nodes, "keras", [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT,
                                                                             [batch, 8, 8, 1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
                              [numpy_helper.from_array(v, k) for k, v in stored.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString()


def sklearn_mlp(zipmap: bool = True, scaler: bool = False) -> bytes:
    """A scikit-learn MLPClassifier of 64 features and 10 classes as skl2onnx writes it: MatMul, Add, Relu, MatMul,
    Add, Softmax; its outputs the label (ArgMax, its class by ArrayFeatureExtractor, int64) and the probabilities,
    as a ZipMap's maps of label to probability (skl2onnx's default) or, ``zipmap=False``, as a tensor. ``scaler``:
    behind a StandardScaler in a pipeline (ai.onnx.ml's Scaler)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    stored = {"coefficient": rng.normal(size=(64, 32)).astype(np.float32) / 8,
              "intercepts": rng.normal(size=(1, 32)).astype(np.float32),
              "coefficient1": rng.normal(size=(32, 10)).astype(np.float32) / 4,
              "intercepts1": rng.normal(size=(1, 10)).astype(np.float32),
              "classes": np.arange(10, dtype=np.int64), "shape_tensor": np.array([-1], np.int64)}
    nodes = [helper.make_node("Scaler", ["float_input"], ["variable"], domain="ai.onnx.ml",
                              offset=rng.normal(size=64).tolist(), scale=rng.uniform(0.5, 2, size=64).tolist())
             ] if scaler else []
    nodes += [helper.make_node("Cast", ["variable" if scaler else "float_input"], ["cast_input"], to=TensorProto.FLOAT),
              helper.make_node("MatMul", ["cast_input", "coefficient"], ["mul_result"]),
              helper.make_node("Add", ["mul_result", "intercepts"], ["add_result"]),
              helper.make_node("Relu", ["add_result"], ["next_activations"]),
              helper.make_node("MatMul", ["next_activations", "coefficient1"], ["mul_result1"]),
              helper.make_node("Add", ["mul_result1", "intercepts1"], ["add_result1"]),
              helper.make_node("Softmax", ["add_result1"], ["out_activations_result"]),
              helper.make_node("ArgMax", ["out_activations_result"], ["argmax_output"], axis=1),
              helper.make_node("ArrayFeatureExtractor", ["classes", "argmax_output"], ["array_feature_extractor_result"],
                               domain="ai.onnx.ml"),
              helper.make_node("Reshape", ["array_feature_extractor_result", "shape_tensor"], ["reshaped_result"]),
              helper.make_node("Cast", ["reshaped_result"], ["label"], to=TensorProto.INT64)]
    if zipmap:
        nodes += [helper.make_node("Cast", ["label"], ["output_label"], to=TensorProto.INT64),
                  helper.make_node("ZipMap", ["out_activations_result"], ["output_probability"], domain="ai.onnx.ml",
                                   classlabels_int64s=list(range(10)))]
        probabilities = helper.make_value_info("output_probability", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))
        outputs = [helper.make_tensor_value_info("output_label", TensorProto.INT64, [None]), probabilities]
    else:
        nodes.append(helper.make_node("Identity", ["out_activations_result"], ["probabilities"]))
        outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                   helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("float_input", TensorProto.FLOAT, [None, 64])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in stored.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)],
                             ir_version=8).SerializeToString()


class Recurrent(nn.Module):
    """A sequence classifier over (N, 4, 12) signals, channels first: a bidirectional two-layer LSTM (batch
    first), a GRU (sequence first) and a ReLU RNN, the last step's state classified; torch exports each as ONNX's
    LSTM, GRU and RNN."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 5)
        self.rnn = nn.RNN(5, 7, nonlinearity="relu", bidirectional=True)
        self.fc = nn.Linear(14, 3)

    def forward(self, x):
        y, _ = self.lstm(x.transpose(1, 2))  # (N, T, 12)
        y, _ = self.gru(y.transpose(0, 1))  # (T, N, 5)
        y, h = self.rnn(y)  # h (2, N, 7)
        return self.fc(torch.cat([h[0], h[1]], dim=1))
