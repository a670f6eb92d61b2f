"""A classifier an owner brings as ONNX: run, fine-tuned and exported again in torch, wrapped like any other.

The graphs are what ``torch.onnx.export`` writes for networks in and outside the zoo (BatchNorm, LayerNorm,
GroupNorm, InstanceNorm, attention with a class token, 1-d convolutions, a final softmax, a reshape by the
batch size), with a free batch axis and at one fixed batch size, channels first and last."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdb_core.bundle import export_onnx, load_bundle
from sdb_core.models import create_model
from sdb_core.onnx_torch import ChannelsLast, onnx_classifier
from sdb_core.protect.config import CheckConfig, Thresholds
from sdb_core.protect.key import new_master_key
from sdb_core.tasks import ModelRef, wrap
from sdb_core.tasks.wrap import WrapTask
from sdb_core.train import TrainConfig, accuracy, device_of, predict_logits, seed_everything, train_classifier
from tests.onnx_graphs import Recurrent, ViewNet, onnx_bytes


class NormMLP(nn.Module):  # LayerNorm, GELU (Erf), BatchNorm1d
    def __init__(self):
        super().__init__()
        self.a, self.ln, self.bn, self.b = nn.Linear(64, 32), nn.LayerNorm(32), nn.BatchNorm1d(32), nn.Linear(32, 10)

    def forward(self, x):
        return self.b(self.bn(F.gelu(self.ln(self.a(x.flatten(1))))))


class GroupSoftmax(nn.Module):  # GroupNorm, InstanceNorm, SiLU, a final softmax
    def __init__(self):
        super().__init__()
        self.conv, self.gn = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.inorm, self.fc = nn.InstanceNorm2d(8, affine=True), nn.Linear(8, 10)

    def forward(self, x):
        return torch.softmax(self.fc(self.inorm(F.silu(self.gn(self.conv(x)))).mean((2, 3))), -1)


class Signals(nn.Module):  # 1-d convolutions, ReLU6, Hardswish, adaptive pooling
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv1d(1, 8, 5, padding=2), nn.Conv1d(8, 8, 3, stride=2), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool1d(F.relu6(self.b(F.hardswish(self.a(x)))), 1).squeeze(-1))


class Attention(nn.Module):  # a class token expanded to the batch, a transformer layer, patches by reshapes
    def __init__(self):
        super().__init__()
        self.patch, self.cls = nn.Linear(16, 32), nn.Parameter(torch.randn(1, 1, 32))
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        b = x.shape[0]
        t = self.patch(x.reshape(b, 1, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, 4, 16))
        return self.fc(self.layer(torch.cat([self.cls.expand(b, -1, -1), t], 1))[:, 0])


class Resizes(nn.Module):  # F.interpolate's exports (Resize): nearest by scale, bilinear by size; repeat (Tile)
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=(10, 10), mode="bilinear", align_corners=True)
        return self.fc(self.conv(x.repeat(1, 2, 1, 1)).mean((2, 3)))


class Gadgets(nn.Module):
    """LocalResponseNorm (the exporter writes an ``If`` on a free size in it), positions from ``arange`` (Range),
    comparisons and logic (>=, <=, &), sign and round, reductions torch exports as ReduceLogSumExp and ReduceL1."""

    def __init__(self):
        super().__init__()
        self.conv, self.lrn = nn.Conv2d(1, 6, 3, padding=1), nn.LocalResponseNorm(4)
        self.pos, self.fc = nn.Embedding(64, 6), nn.Linear(6 * 3, 10)

    def forward(self, x):
        x = torch.where((x >= -0.5) & (x <= 0.5), x.round() + x.sign(), x)
        h = self.lrn(F.relu(self.conv(x))).flatten(2).transpose(1, 2)  # (N, 64, 6)
        h = h + self.pos(torch.arange(h.shape[1], device=x.device))
        return self.fc(torch.cat([torch.logsumexp(h, 1), h.abs().sum(1) / 64, torch.norm(h, p=1, dim=1) / 64], 1))


class InPlace(nn.Module):  # slices assigned in place: ScatterND, as the TorchScript exporter writes them
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = self.a(x.flatten(1))
        mark = torch.zeros_like(h)
        mark[:, 0::2] = torch.sin(h[:, 0::2])
        mark[:, 1] = 1.0
        return self.b(h + mark)


class Upsamples(nn.Module):  # depth to space (PixelShuffle), a transposed convolution, space to depth
    def __init__(self):
        super().__init__()
        self.a, self.up = nn.Conv2d(1, 8, 3, padding=1), nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = self.up(F.pixel_shuffle(self.a(x), 2))  # (N, 2, 16, 16) -> (N, 4, 32, 32)
        return self.fc(F.adaptive_avg_pool2d(F.pixel_unshuffle(h, 4), 1).flatten(1))


class Transformed(nn.Module):  # a spatial transformer (GridSample), causal attention over rows (Trilu), a cumsum
    def __init__(self):
        super().__init__()
        self.loc, self.qkv, self.fc = nn.Linear(64, 6), nn.Linear(8, 24), nn.Linear(64, 10)
        nn.init.normal_(self.loc.weight, std=0.05)
        self.loc.bias.data = torch.tensor([1.0, 0.1, 0.0, -0.1, 1.0, 0.0])

    def forward(self, x):
        theta = self.loc(x.flatten(1)).view(-1, 2, 3)  # affine_grid by hand (it has no TorchScript export)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
        grid = (torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, 64, 3) @ theta.transpose(1, 2))
        rows = F.grid_sample(x, grid.reshape(-1, 8, 8, 2), align_corners=True).reshape(-1, 8, 8)
        q, k, v = self.qkv(rows).chunk(3, -1)
        return self.fc(torch.cumsum(F.scaled_dot_product_attention(q, k, v, is_causal=True), 1).flatten(1))


NETWORKS = {
    "view": (ViewNet, (1, 8, 8)), "norm_mlp": (NormMLP, (1, 8, 8)), "group_softmax": (GroupSoftmax, (1, 8, 8)),
    "signals": (Signals, (1, 32)), "attention": (Attention, (1, 8, 8)), "resizes": (Resizes, (1, 8, 8)),
    "gadgets": (Gadgets, (1, 8, 8)), "in_place": (InPlace, (1, 8, 8)), "upsamples": (Upsamples, (1, 8, 8)),
    "transformed": (Transformed, (1, 8, 8)), "recurrent": (Recurrent, (4, 12)),
    "resnet8": (lambda: create_model("resnet8", num_classes=10, in_shape=(1, 8, 8)), (1, 8, 8)),
    "vit_tiny": (lambda: create_model("vit_tiny", num_classes=10, in_shape=(1, 8, 8)), (1, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_a_graph_runs_trains_and_exports_again_as_the_network_it_was(name):
    torch.manual_seed(0)
    make, shape = NETWORKS[name]
    net = make().eval()
    with torch.no_grad():  # BatchNorm's statistics away from 0 and 1: folded or not, they must be read
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    graph = onnx_classifier(onnx_bytes(net, shape), shape)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        want = net(x)
        if name == "group_softmax":  # the graph's own logits: its final softmax is left out
            want = torch.log(want)
            assert "Softmax" in graph.why
        got = graph(x)
    if name == "group_softmax":
        got = torch.log_softmax(got, 1)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

    weights = list(graph.parameters())
    assert weights and all(p.requires_grad for p in weights)
    graph(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)

    again = ort.InferenceSession(export_onnx(graph, shape), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for n in (1, 3):
            out = again.run(None, {"input": x[:n].numpy()})[0]
            assert np.allclose(out, graph(x[:n]).numpy(), atol=1e-4)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_a_graph_runs_where_its_weights_are_and_reads_no_size_back_from_there(name):
    """On a GPU, a tensor the graph makes on the CPU and mixes with its weights raises, and each value read back from
    the device (a reshape's stored sizes, a slice's bounds, F.pad's pads, a resize's scales) makes the host wait
    for it at every forward. The meta device stands in (its values cannot be read: "Cannot copy out of meta"):
    stored sizes are kept on the host and what stored values alone compute is computed once."""
    from .test_devices import META

    torch.manual_seed(0)
    make, shape = NETWORKS[name]
    net = make().eval()
    want = net(torch.randn(3, *shape)).shape
    for free in (True, False) if name != "in_place" else (True,):  # (at a fixed batch it is refused, below)
        graph = onnx_classifier(onnx_bytes(net, shape, free_batch=free, batch=1), shape).to(META)
        with torch.no_grad():
            got = graph(torch.randn(3, *shape, device=META))
        assert got.device == META and got.shape == want


def _one_node(op: str, inputs: dict[str, np.ndarray], out_type: int = 1, opset: int = 18, **attrs) -> bytes:
    """A graph of one ``op`` node on a float input x (N, 8, 3, 3), its other inputs stored, at ``opset``."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(op, ["x", *inputs], ["y"], **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 3, 3])],
                              [helper.make_tensor_value_info("y", out_type, None)],
                              [numpy_helper.from_array(v, k) for k, v in inputs.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9).SerializeToString()


AXES = {"axes": np.array([1, 3], np.int64)}
SINGLE_NODES = {  # (ONNX Runtime refuses an even LRN size)
    "lrn3": ("LRN", {}, 1, {"size": 3, "alpha": 0.01, "beta": 0.6, "bias": 2.0}),
    "lrn5": ("LRN", {}, 1, {"size": 5}),
    "reduce_prod": ("ReduceProd", AXES, 1, {}), "reduce_sum_square": ("ReduceSumSquare", AXES, 1, {"keepdims": 0}),
    "reduce_l1": ("ReduceL1", AXES, 1, {}), "reduce_log_sum_exp": ("ReduceLogSumExp", AXES, 1, {"keepdims": 0}),
    "argmax_last": ("ArgMax", {}, 7, {"axis": 1, "keepdims": 0, "select_last_index": 1}),
    "argmin": ("ArgMin", {}, 7, {"axis": 2}), "sign": ("Sign", {}, 1, {}), "round": ("Round", {}, 1, {}),
    "celu": ("Celu", {}, 1, {"alpha": 0.7}), "thresholded_relu": ("ThresholdedRelu", {}, 1, {"alpha": 0.5}),
    "cast_like": ("CastLike", {"like": np.zeros(1, np.float64)}, 11, {}), "size": ("Size", {}, 7, {}),
    "scatter_nd": ("ScatterND", {"indices": np.array([[0, 1], [3, 5]], np.int64),
                                 "updates": np.arange(18, dtype=np.float32).reshape(2, 3, 3)}, 1, {}),
    "scatter_elements": ("ScatterElements", {"indices": np.array([[[[2]]], [[[-1]]]], np.int64),
                                             "updates": np.array([[[[7.0]]], [[[9.0]]]], np.float32)}, 1, {"axis": 1}),
    "gather_elements": ("GatherElements", {"indices": np.random.default_rng(1).integers(-6, 6, (4, 2, 3, 3))},
                        1, {"axis": 1}),
    "conv_transpose": ("ConvTranspose", {"w": np.random.default_rng(2).normal(size=(8, 2, 3, 3)).astype(np.float32),
                                         "b": np.arange(4, dtype=np.float32)}, 1,
                       {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0], "group": 2}),
    "conv_transpose_dilated": ("ConvTranspose", {"w": np.ones((8, 3, 2, 2), np.float32)}, 1, {"dilations": [2, 1]}),
    "depth_to_space_dcr": ("DepthToSpace", {}, 1, {"blocksize": 2, "mode": "DCR"}),
    "depth_to_space_crd": ("DepthToSpace", {}, 1, {"blocksize": 2, "mode": "CRD"}),
    "space_to_depth": ("SpaceToDepth", {}, 1, {"blocksize": 3}),
    # a QDQ graph's quantization (its levels carried as floats: compared by value), saturating past the range
    "quantize_per_tensor": ("QuantizeLinear", {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8)}, 2, {}),
    "quantize_per_axis": ("QuantizeLinear", {"s": np.linspace(0.01, 0.1, 8).astype(np.float32),
                                             "z": np.arange(-4, 4).astype(np.int8)}, 3, {"axis": 1}),
    # what the dynamo exporter (torch.onnx.export's default) writes for cumsum, a causal mask, a spatial
    # transformer, circular padding, bicubic upsampling, x[:, [0, 2, 1]], torch.atan, torch.nan_to_num
    "cumsum": ("CumSum", {"axis": np.array(1, np.int64)}, 1, {}),
    "cumsum_exclusive_reverse": ("CumSum", {"axis": np.array(-1, np.int64)}, 1, {"exclusive": 1, "reverse": 1}),
    "trilu_upper": ("Trilu", {"k": np.array(1, np.int64)}, 1, {}), "trilu_lower": ("Trilu", {}, 1, {"upper": 0}),
    "grid_sample_bilinear": ("GridSample", {"grid": np.random.default_rng(3).uniform(-1.2, 1.2, (4, 5, 4, 2)).astype(
        np.float32)}, 1, {"padding_mode": "border", "align_corners": 1}),
    "grid_sample_nearest": ("GridSample", {"grid": np.random.default_rng(4).uniform(-1.2, 1.2, (4, 2, 3, 2)).astype(
        np.float32)}, 1, {"mode": "nearest"}),
    "grid_sample_cubic": ("GridSample", {"grid": np.random.default_rng(5).uniform(-1, 1, (4, 3, 3, 2)).astype(
        np.float32)}, 1, {"mode": "cubic", "padding_mode": "reflection", "opset": 20}),
    "gather_nd": ("GatherND", {"i": np.array([[0, 1], [3, -2]], np.int64)}, 1, {}),
    "gather_nd_batch": ("GatherND", {"i": np.random.default_rng(6).integers(-3, 3, (4, 2, 1))}, 1, {"batch_dims": 1}),
    "pad_wrap": ("Pad", {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, 1, {"mode": "wrap", "opset": 19}),
    "resize_cubic": ("Resize", {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}, 1,
                     {"mode": "cubic"}),
    "resize_cubic_corners": ("Resize", {"roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32),
                                        "sizes": np.array([4, 8, 5, 7], np.int64)}, 1,
                             {"mode": "cubic", "coordinate_transformation_mode": "align_corners"}),
    "atan": ("Atan", {}, 1, {}), "asinh": ("Asinh", {}, 1, {}), "sinh": ("Sinh", {}, 1, {}), "tan": ("Tan", {}, 1, {}),
    "cosh": ("Cosh", {}, 1, {}),
    "isnan": ("IsNaN", {}, 9, {}), "isinf_negative": ("IsInf", {}, 9, {"detect_positive": 0}),
}


@pytest.mark.parametrize("name", sorted(SINGLE_NODES))
def test_each_operator_answers_as_onnx_runtime(name):
    from sdb_core.onnx_torch import OnnxModule

    op, inputs, out_type, attrs = SINGLE_NODES[name]
    graph = _one_node(op, inputs, out_type, **attrs)
    x = (np.random.default_rng(0).normal(size=(4, 8, 3, 3)) * 2).astype(np.float32)
    x[0, :, 0, 0] = 1.0  # ties: which index ArgMax and ArgMin pick among equal values
    want = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = OnnxModule(graph)(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-5), np.abs(got - want).max()


@pytest.mark.parametrize("name", sorted(SINGLE_NODES))
def test_each_operator_exports_again_as_a_box_is_exported(name):
    """A box holds its teacher's graph and is exported with torch's TorchScript exporter at opset 17
    (sdb_core.bundle): each operator, as run here, exports to what ONNX Runtime answers alike."""
    import io
    import warnings

    from sdb_core.onnx_torch import OnnxModule

    op, inputs, out_type, attrs = SINGLE_NODES[name]
    module = OnnxModule(_one_node(op, inputs, out_type, **attrs), fold=True).eval()
    x = (np.random.default_rng(0).normal(size=(4, 8, 3, 3)) * 2).astype(np.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(x),), buf, input_names=["x"], output_names=["y"], opset_version=17,
                          dynamo=False, dynamic_axes={"x": {0: "n"}})
        want = module(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-5), np.abs(got - want).max()


@pytest.mark.parametrize("name", sorted(SINGLE_NODES))
def test_each_operator_runs_where_its_input_is_and_reads_no_stored_value_back(name):
    from sdb_core.onnx_torch import OnnxModule

    from .test_devices import META

    op, inputs, out_type, attrs = SINGLE_NODES[name]
    graph = OnnxModule(_one_node(op, inputs, out_type, **attrs)).to(META)
    with torch.no_grad():
        assert graph(torch.randn(4, 8, 3, 3, device=META)).device == META


def test_only_what_the_logits_need_is_run():
    """Outputs beside the logits (an argmax, the top 3) are neither run nor refused, whatever their operators."""

    class WithExtras(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            z = self.fc(x.flatten(1))
            return z, z.topk(3).values, z.argmax(1)

    torch.manual_seed(0)
    net = WithExtras().eval()
    graph = onnx_classifier(onnx_bytes(net, (1, 8, 8)), (1, 8, 8))
    assert not any(op in ("TopK", "ArgMax") for _, op, *_ in graph.nodes)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(graph(x), net(x)[0], atol=1e-5)


class Windows(nn.Module):
    """Windows of an image as a batch of their own ((N·4, 16, C), as Swin partitions one), and back to (N, -1, C):
    exported at one batch size, the way back stores that size where the tensor's leading axis is N·4."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.fc = nn.Conv2d(1, 6, 1), nn.Linear(6, 6), nn.Linear(6, 10)

    def forward(self, x):
        h = self.embed(x)
        n, c = h.shape[:2]
        w = h.view(n, c, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(-1, 16, c)
        return self.fc(F.relu(self.mix(w)).reshape(n, -1, c).mean(1))


class SequenceFirst(nn.Module):
    """torch's attention as most transformer classifiers hold it (nn.TransformerEncoder, sequence first): exported at
    one batch size, its reshapes store (T, N·heads, d) and (T·N, E), which at N = 1 read as well the other way."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Linear(8, 16), nn.Linear(16, 10)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0), 2,
                                             enable_nested_tensor=False)

    def forward(self, x):
        return self.fc(self.encoder(self.embed(x.flatten(1, 2)).transpose(0, 1)).mean(0))


class ShiftedWindows(nn.Module):
    """Swin's block in small: tokens rolled, partitioned into windows that attend within themselves (the batch
    folded with the windows, (N·4, 4, C)), and put back."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.fc = nn.Conv2d(1, 16, 2, stride=2), nn.LayerNorm(16), nn.Linear(16, 10)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        h = torch.roll(self.embed(x), shifts=(1, 1), dims=(2, 3))  # (N, C, 4, 4)
        n, c = h.shape[:2]
        w = self.norm(h.view(n, c, 2, 2, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(-1, 4, c))
        w = w + self.attn(w, w, w)[0]
        return self.fc(w.reshape(n, 2, 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, 4, 4).mean((2, 3)))


FIXED_BATCH = {"view": ViewNet, "windows": Windows, "attention": Attention, "sequence_first": SequenceFirst,
               "shifted_windows": ShiftedWindows,
               "vit_tiny": lambda: create_model("vit_tiny", num_classes=10, in_shape=(1, 8, 8))}


@pytest.mark.parametrize("export_batch", [1, 2])
@pytest.mark.parametrize("name", sorted(FIXED_BATCH))
def test_a_graph_exported_at_one_batch_size_runs_and_exports_again_at_any(name, export_batch):
    """Reshapes that store the export's batch (windows of an image, heads folded with the batch, sequence-first
    attention) read at every batch size, sample by sample; the box's export of it has a free batch axis (a graph
    exported at batch 2 was traced at 2, and its bundle ran at 2 only)."""
    torch.manual_seed(0)
    net = FIXED_BATCH[name]().eval()
    graph = onnx_classifier(onnx_bytes(net, (1, 8, 8), free_batch=False, batch=export_batch), (1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    again = ort.InferenceSession(export_onnx(graph, (1, 8, 8)), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for n in (export_batch, 1, 4):
            assert torch.allclose(graph(x[:n]), net(x[:n]), atol=1e-4)
            assert np.allclose(again.run(None, {"input": x[:n].numpy()})[0], net(x[:n]).numpy(), atol=1e-4)


def _folded_token(batch: int) -> bytes:
    """Tokens (N, 8, 16) after a class token stored expanded to the export's batch, as the dynamo exporter (torch's
    default) folds ``cls.expand(N, -1, -1)``: a stored (batch, 1, 16) tensor of repeated rows, concatenated."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    stored = {"shape": np.array([batch, 8, 8], np.int64), "w": rng.normal(size=(8, 16)).astype(np.float32),
              "token": np.repeat(rng.normal(size=(1, 1, 16)).astype(np.float32), batch, 0),
              "head": rng.normal(size=(16, 10)).astype(np.float32)}
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["rows"]), helper.make_node("MatMul", ["rows", "w"], ["t"]),
             helper.make_node("Concat", ["token", "t"], ["all"], axis=1),
             helper.make_node("ReduceMean", ["all"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "head"], ["y"])]
    graph = helper.make_graph(nodes, "folded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
                              [numpy_helper.from_array(v, k) for k, v in stored.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


@pytest.mark.parametrize("export_batch", [1, 2])
def test_a_stored_tensor_expanded_to_the_export_batch_is_read_as_the_batch(export_batch):
    model = _folded_token(export_batch)
    graph = onnx_classifier(model, (1, 8, 8))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(5, 1, 8, 8)).astype(np.float32)
    alone = np.concatenate([session.run(None, {"x": np.repeat(x[i:i + 1], export_batch, 0)})[0][:1] for i in range(5)])
    again = ort.InferenceSession(export_onnx(graph, (1, 8, 8)), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for n in (export_batch, 1, 4):
            assert np.allclose(graph(torch.from_numpy(x[:n])).numpy(), alone[:n], atol=1e-4)
            assert np.allclose(again.run(None, {"input": x[:n]})[0], alone[:n], atol=1e-4)


def _expanded_row() -> bytes:
    """At batch 1: features h (1, 6), plus h projected on a stored row expanded to the stored size (1, 6), which
    equals the export's batch without being it: y = h + h @ expand(r, [1, 6])^T."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    stored = {"w": rng.normal(size=(4, 6)).astype(np.float32), "r": rng.normal(size=(1, 6)).astype(np.float32),
              "size": np.array([1, 6], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Expand", ["r", "size"], ["row"]),
             helper.make_node("Transpose", ["row"], ["column"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "column"], ["along"]), helper.make_node("Add", ["h", "along"], ["y"])]
    graph = helper.make_graph(nodes, "row", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
                              [numpy_helper.from_array(v, k) for k, v in stored.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_an_expand_to_a_size_equal_to_the_export_batch_is_read_as_that_size_where_the_batch_is_wrong():
    model = _expanded_row()
    graph = onnx_classifier(model, (4,))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    alone = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(5)])
    with torch.no_grad():
        assert np.allclose(graph(torch.from_numpy(x)).numpy(), alone, atol=1e-4)


def test_a_graph_whose_stored_sizes_hold_the_export_batch_otherwise_is_refused_in_words():
    # slices assigned in place store their indices for the export's batch (ScatterND): no reading of the
    # reshapes makes it answer other batch sizes sample by sample
    for batch in (1, 2):
        with pytest.raises(ValueError, match=f"exported for batches of {batch} only.*free batch axis"):
            onnx_classifier(onnx_bytes(InPlace(), (1, 8, 8), free_batch=False, batch=batch), (1, 8, 8))


def test_a_channels_last_graph_gets_its_images_channels_last():
    class Keras(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

        def forward(self, x):  # (N, H, W, C), as Keras takes images
            return self.fc(self.conv(x.permute(0, 3, 1, 2)).mean((2, 3)))

    torch.manual_seed(0)
    net = Keras().eval()
    for free in (True, False):  # (Keras models are often exported at batch 1)
        graph = onnx_classifier(onnx_bytes(net, (8, 8, 3), free_batch=free, batch=1), (3, 8, 8))
        assert isinstance(graph, ChannelsLast)
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert torch.allclose(graph(x), net(x.permute(0, 2, 3, 1)), atol=1e-5)
            conv = next(n for n in graph.layer_names() if "Conv" in n)  # its layers, by the graph's names (DEPARA)
            assert torch.allclose(graph.layer_output(x, conv), net.conv(x), atol=1e-5)


class ConvHead(nn.Module):
    """Scores from a 1x1 convolution, never flattened: (N, 10, 1, 1), as the ONNX model zoo's SqueezeNet answers
    (``last``: channels last, (N, 1, 1, 10)), a softmax after it or not."""

    def __init__(self, last: bool, softmax: bool):
        super().__init__()
        self.body, self.head, self.last, self.softmax = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 10, 1), last, softmax

    def forward(self, x):
        z = self.head(F.adaptive_avg_pool2d(F.relu(self.body(x)), 1))
        z = F.softmax(z, 1) if self.softmax else z
        return z.permute(0, 2, 3, 1) if self.last else z


@pytest.mark.parametrize("softmax", [False, True], ids=["logits", "softmax"])
@pytest.mark.parametrize("last", [False, True], ids=["channels_first", "channels_last"])
def test_scores_with_singleton_axes_around_them_are_read_as_the_logits(last, softmax):
    torch.manual_seed(0)
    net = ConvHead(last, softmax).eval()
    graph = onnx_classifier(onnx_bytes(net, (1, 8, 8)), (1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = net.head(F.adaptive_avg_pool2d(F.relu(net.body(x)), 1)).flatten(1)  # the logits, before any softmax
        assert torch.allclose(graph(x), want, atol=1e-5)
    assert "read as (10,)" in graph.why and ("Softmax" in graph.why) is softmax
    again = ort.InferenceSession(export_onnx(graph, (1, 8, 8)), providers=["CPUExecutionProvider"])
    assert again.run(None, {"input": x.numpy()})[0].shape == (5, 10)


class Scores(nn.Module):
    """ViewNet's logits, times ``scale`` (saturating sigmoids: past -20, where ONNX Runtime's Sigmoid answers 0),
    through ``head``: a sigmoid per class, a binary classifier's one squeezed score, or (label, probabilities) as
    a converter writes its outputs."""

    def __init__(self, head: str):
        super().__init__()
        self.net, self.head = ViewNet(1 if head == "binary" else 10), head

    def logits(self, x):
        return 30 * self.net(x).squeeze(1) if self.head == "binary" else 30 * self.net(x)

    def forward(self, x):
        z = self.logits(x)
        return (z.argmax(1), torch.softmax(z, 1)) if self.head == "label_first" else torch.sigmoid(z)


@pytest.mark.parametrize("head", ["per_class", "binary"])
def test_a_final_sigmoid_is_left_out_and_its_input_read_as_the_logits(head):
    """Its probabilities inverted, log(p / (1 - p)), were what the box learned, and ONNX Runtime's Sigmoid answers 0
    below about -20 where torch's does not: the box's export check refused every such wrap, at its end."""
    torch.manual_seed(0)
    net = Scores(head).eval()
    graph = onnx_classifier(onnx_bytes(net, (1, 8, 8)), (1, 8, 8))
    assert "ends in a Sigmoid" in graph.why
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        z = net.logits(x)
        assert z.min() < -20  # where ONNX Runtime's sigmoid is 0
        assert torch.allclose(graph(x), z, rtol=1e-4, atol=1e-4)
    again = ort.InferenceSession(export_onnx(graph, (1, 8, 8), samples=x), providers=["CPUExecutionProvider"])
    assert np.allclose(again.run(None, {"input": x.numpy()})[0], z.numpy(), rtol=1e-4, atol=1e-3)


def test_the_probabilities_after_a_label_output_are_read_for_the_logits():
    """skl2onnx's order: output 0 the int64 label (ArgMax), output 1 the probabilities. The label was read as the
    scores: every wrap failed on 'the teacher answers shape (2,) for 2 inputs'."""
    torch.manual_seed(0)
    net = Scores("label_first").eval()
    graph = onnx_classifier(onnx_bytes(net, (1, 8, 8)), (1, 8, 8))
    assert "first output" in graph.why and "is read" in graph.why and "ends in a Softmax" in graph.why
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(graph(x), net.logits(x), rtol=1e-4, atol=1e-4)


class Inside(nn.Module):
    """A float32 network computing in ``dtype`` between a Cast in and a Cast out, as onnxconverter_common's
    ``convert_float_to_float16(keep_io_types=True)`` writes one."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net.to(dtype), dtype

    def forward(self, x):
        return self.net(x.to(self.dtype)).float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["float16", "float64"])
def test_a_graph_computing_in_another_float_type_inside_is_run_in_float32(digits, dtype):
    """Its weights were float16 (float64) parameters, and every wrap failed: 'pass teacher.float()'."""
    import copy

    from sdb_core.protect.teacher import check_teacher

    torch.manual_seed(0)  # (ONNX Runtime has no float64 Conv on the CPU)
    net = (ViewNet() if dtype == torch.float16 else nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                                                  nn.Linear(32, 10))).eval()
    graph = onnx_classifier(onnx_bytes(Inside(copy.deepcopy(net), dtype).eval(), (1, 8, 8)), (1, 8, 8))
    assert {p.dtype for p in graph.parameters()} == {torch.float32}
    assert f"computes in {str(dtype).removeprefix('torch.')} inside" in graph.why
    assert check_teacher(graph, digits.checked()) is graph
    x = digits.test.tensors[0][:16]
    with torch.no_grad():
        assert torch.allclose(graph(x), net(x), rtol=1e-2, atol=1e-2)
    export_onnx(graph, (1, 8, 8), samples=x)


def test_an_uploads_free_axes_are_shown_by_their_names():
    """Every free axis was shown as N: ['N', 1, 'N', 'N'] for a graph of free height and width."""
    import tempfile
    from pathlib import Path

    import onnx

    from service.filechecks import Limits, check_weights

    model = onnx.load_from_string(onnx_bytes(ViewNet(), (1, 8, 8), free_spatial=True))
    model.graph.input[0].type.tensor_type.shape.dim[3].ClearField("dim_param")  # a free axis with no name
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "upload", Path(tmp) / "out"
        src.write_bytes(model.SerializeToString())
        out.mkdir()
        checked = check_weights(src, out, Limits(unpacked_bytes=1 << 20, members=10), "g.onnx")
    assert checked.format == "onnx" and checked.info["input_shape"] == ["N", 1, "h", "?"]


def test_what_cannot_be_run_is_refused_by_name():
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        onnx_classifier(b"not a graph", (1, 8, 8))
    with pytest.raises(ValueError, match=r"takes inputs of shape \(N, 1, 8, 8\), the data's are \(N, 3, 8, 8\)"):
        onnx_classifier(onnx_bytes(ViewNet(), (1, 8, 8)), (3, 8, 8))
    with pytest.raises(ValueError, match="the graph takes double inputs; a box takes, trains and serves float32"):
        onnx_classifier(onnx_bytes(ViewNet().double(), (1, 8, 8), dtype=torch.float64), (1, 8, 8))

    class TopK(nn.Module):
        def forward(self, x):
            return x.flatten(1).topk(3).values

    with pytest.raises(ValueError, match=r"unsupported operators \['TopK'\]"):
        onnx_classifier(onnx_bytes(TopK(), (1, 8, 8)), (1, 8, 8))

    # a scikit-learn classifier's graph (skl2onnx writes ai.onnx.ml operators)
    from onnx import TensorProto, helper

    linear = helper.make_node("LinearClassifier", ["x"], ["label", "probs"], domain="ai.onnx.ml",
                              coefficients=[1.0] * 8, intercepts=[0.0, 0.0], classlabels_ints=[0, 1])
    sklearn = helper.make_model(helper.make_graph(
        [linear], "sklearn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["n"]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 2])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    with pytest.raises(ValueError, match=r"ai\.onnx\.ml\.LinearClassifier.*a scikit-learn or other classical model"):
        onnx_classifier(sklearn.SerializeToString(), (4,))

    class OnItsValues(nn.Module):  # scripted: an If on the input's values, which the box's export could not keep
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            z = self.fc(x.flatten(1))
            if bool(x.mean() > 0):
                z = z * 2
            return z

    with pytest.raises(ValueError, match=r"\(If\): a condition on the input's values is not supported"):
        onnx_classifier(onnx_bytes(torch.jit.script(OnItsValues()), (1, 8, 8)), (1, 8, 8))


def test_a_model_reference_to_an_onnx_file_needs_no_architecture():
    assert ModelRef.parse("t=model.ONNX") == ("t", ModelRef(weights="model.ONNX"))
    ref = ModelRef(weights="teacher.onnx")
    assert ref.kind == "weights" and ref.is_onnx and "ONNX model" in ref.describe()
    with pytest.raises(ValueError, match="need their architecture"):
        ModelRef(weights="teacher.safetensors")


@pytest.fixture(scope="module")
def onnx_teacher(tmp_path_factory, digits):
    """A network from outside the zoo trained on digits and exported with a final softmax, as owners ship them."""
    seed_everything(0)
    net = ViewNet()
    train_classifier(net, digits.train, TrainConfig(epochs=6, lr=0.02, seed=0))
    path = tmp_path_factory.mktemp("onnx") / "teacher.onnx"
    path.write_bytes(onnx_bytes(nn.Sequential(net, nn.Softmax(dim=1)), digits.in_shape))
    return net.eval(), path


# What these wraps test is how an ONNX teacher is read and given its inputs, not the recipe's self-check (the
# protection benchmarks measure it): the key is drawn at random each wrap, and CI runs' boxes missed the default
# limits after every attempt, keyed by 0.88 points once, public by 0.43 once (on 210 held-out inputs, 0.48 points
# each). The self-check's limits are the benchmarks'; these tests assert what the served box answers instead.
PLUMBING = replace(CheckConfig(), thresholds=replace(Thresholds(), max_accuracy_drop=5.0, max_keyed_drop=100.0))


def test_an_onnx_teacher_wraps_into_a_box_that_keeps_its_answers(tmp_path, digits, onnx_teacher):
    net, path = onnx_teacher
    before = digits.train.tensors[0].clone()
    logs: list[str] = []
    from sdb_core.progress import Hooks

    out = wrap.run(WrapTask(data="digits", teacher=ModelRef(weights=str(path)), check=PLUMBING), tmp_path / "box",
                   Hooks(log=logs.append), master_key=new_master_key())
    assert out.name == "digits-onnx"
    assert any("ends in a Softmax" in line for line in logs)
    bundle = load_bundle(out.bundle)
    assert bundle.meta["arch"] == "onnx" and bundle.meta["mode"] == "sdb"
    x, y = digits.test.tensors
    with torch.no_grad():
        teacher_top1 = predict_logits(net, x).argmax(1).numpy()
    served = bundle.public_logits(x.numpy()).argmax(1)
    # measured, eighteen wraps of this teacher (each its own key; the check passes a box 5 points under on the
    # 210 held-out digits): agreement 0.885-0.955, served accuracy 0.5 above to 6.0 points under the teacher
    # (the earlier limit of 4 points failed one CI-like run in five)
    assert (served == teacher_top1).mean() > 0.84
    assert accuracy(net, digits.test) - 100 * (served == y.numpy()).mean() < 8.0
    assert torch.equal(digits.train.tensors[0], before)


def test_a_teacher_at_chance_on_the_data_is_refused_with_its_inputs_convention(tmp_path, digits):
    torch.manual_seed(0)
    untrained = ViewNet()
    path = tmp_path / "untrained.onnx"
    path.write_bytes(onnx_bytes(untrained, digits.in_shape))
    with pytest.raises(ValueError, match=r"scores .*% on the data's training inputs \(chance 10.0%\).*normalised per "
                                         r"channel"):
        wrap.run(WrapTask(data="digits", teacher=ModelRef(weights=str(path))), tmp_path / "box",
                 master_key=new_master_key())
    assert not (tmp_path / "box").exists()


def test_a_teacher_trained_on_its_own_normalisation_is_given_its_inputs_that_way(tmp_path, digits):
    """A network trained on pixels in [0, 1] (no normalisation: mean 0, std 1), as many are outside this project:
    told so, it gets the data's inputs mapped to those, answers as it did on them, and its box keeps its answers."""
    from sdb_core.progress import Hooks

    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (digits.mean, digits.std))
    x, y = digits.train.tensors
    seed_everything(0)
    net = ViewNet()
    train_classifier(net, torch.utils.data.TensorDataset(x * std + mean, y), TrainConfig(epochs=6, lr=0.02, seed=0))
    net.eval().cpu()  # compared with its graph to 1e-4, where the graph runs: a GPU's TF32 convolutions are coarser
    path = tmp_path / "pixels.onnx"
    path.write_bytes(onnx_bytes(net, digits.in_shape))

    ref = ModelRef(weights=str(path), mean=(0.0,), std=(1.0,))
    xt = digits.test.tensors[0]
    with torch.no_grad():
        own = predict_logits(net, xt * std + mean)
        assert torch.allclose(ref.network(None, digits.in_shape, (digits.mean, digits.std))(xt), own, atol=1e-4)
    with pytest.raises(ValueError, match="the data's are not known"):
        ref.network(None, digits.in_shape)
    with pytest.raises(ValueError, match="normalisation has 2 values; the inputs have 1 channels"):
        ModelRef(weights=str(path), mean=(0.0, 0.0), std=(1.0, 1.0)).network(None, digits.in_shape,
                                                                             (digits.mean, digits.std))
    with pytest.raises(ValueError, match="needs both mean and std"):
        ModelRef(weights=str(path), mean=(0.0,))

    logs: list[str] = []
    out = wrap.run(WrapTask(data="digits", teacher=ref, check=PLUMBING), tmp_path / "box", Hooks(log=logs.append),
                   master_key=new_master_key())
    assert any("normalised by mean (0), std (1)" in line for line in logs), logs
    served = load_bundle(out.bundle).public_logits(xt.numpy()).argmax(1)
    assert (served == own.argmax(1).numpy()).mean() > 0.84  # as the test above


def test_a_teacher_that_takes_bytes_is_given_its_pixels_as_bytes(tmp_path, digits):
    """A graph whose input is uint8 pixels, 0-255, with its preprocessing inside (a Cast, a scale): read with no
    word from the owner, its inputs are the data's pixels in 0-255, rounded as bytes; its box keeps its answers."""
    from sdb_core.progress import Hooks

    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (digits.mean, digits.std))
    x, y = digits.train.tensors
    seed_everything(0)
    net = ViewNet()
    train_classifier(net, torch.utils.data.TensorDataset(x * std + mean, y), TrainConfig(epochs=6, lr=0.02, seed=0))

    class Bytes(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net.eval()

        def forward(self, pixels):
            return self.net(pixels.float() / 255.0)

    path = tmp_path / "bytes.onnx"
    path.write_bytes(onnx_bytes(Bytes(), digits.in_shape, dtype=torch.uint8))
    xt = digits.test.tensors[0]
    pixels = torch.round(((xt * std + mean) * 255).clamp(0, 255))
    with torch.no_grad():
        own = predict_logits(net, pixels / 255.0)
        got = ModelRef(weights=str(path)).network(None, digits.in_shape, (digits.mean, digits.std))(xt)
    # (a pixel at a half level may round the other way: float arithmetic of the mapping)
    assert (got - own).abs().max() < 0.1 and (got.argmax(1) == own.argmax(1)).float().mean() > 0.99
    logs: list[str] = []
    out = wrap.run(WrapTask(data="digits", teacher=ModelRef(weights=str(path)), check=PLUMBING), tmp_path / "box",
                   Hooks(log=logs.append), master_key=new_master_key())
    assert any("takes uint8 inputs" in line and "std (0.003922)" in line for line in logs), logs
    served = load_bundle(out.bundle).public_logits(xt.numpy()).argmax(1)
    assert (served == own.argmax(1).numpy()).mean() > 0.84  # as the tests above
    # int8 inputs are read at their levels too; other types are refused in words
    signed = onnx_classifier(onnx_bytes(Bytes(), digits.in_shape, dtype=torch.int8), digits.in_shape)
    assert "takes int8 inputs" in signed.why
    with pytest.raises(ValueError, match="the graph takes float16 inputs; a box takes, trains and serves float32"):
        onnx_classifier(onnx_bytes(Bytes(), digits.in_shape, dtype=torch.float16), digits.in_shape)


def test_an_image_folder_is_read_at_the_size_the_model_takes(tmp_path):
    """An owner's folder of photos (any size) was read at 32x32 whatever the network takes: an ONNX classifier made
    for 12x12 (or a box wrapped at it) was refused, and the CLI and jobs have no image size to give."""
    from PIL import Image

    from sdb_core.tasks import distill
    from sdb_core.tasks.distill import DistillTask
    from sdb_core.tasks.refs import image_size_for

    for c, name in enumerate(("apples", "pears")):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40, 30), (200 * c, 60, 30 * i)).save(tmp_path / "photos" / name / f"{i}.png")
    photos = f"imagefolder:{tmp_path / 'photos'}"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    first, last, free = (tmp_path / f"{n}.onnx" for n in ("first", "last", "free"))
    first.write_bytes(onnx_bytes(Net().eval(), (3, 12, 12)))
    last.write_bytes(onnx_bytes(TakesChannelsLast(Net().eval()), (12, 12, 3)))
    free.write_bytes(onnx_bytes(Net().eval(), (3, 12, 12), free_spatial=True))
    assert [image_size_for(photos, ModelRef(weights=str(p))) for p in (first, last, free)] == [12, 12, None]
    box = tmp_path / "box"  # a bundle wrapped at 12x12: its meta says so
    box.mkdir()
    (box / "meta.json").write_text('{"input": {"name": "input", "shape": [3, 12, 12]}}')
    assert image_size_for(photos, ModelRef(bundle=str(box))) == 12
    assert image_size_for("digits", ModelRef(weights=str(first))) is None  # other sets keep their own size
    assert image_size_for(photos, ModelRef(weights=str(tmp_path / "missing.onnx"))) is None  # its loading says why

    outcome = distill.run(DistillTask.from_options("cnn", photos, teacher=ModelRef(weights=str(first)), epochs=1),
                          tmp_path / "student.safetensors")
    assert outcome.student(torch.zeros(1, 3, 12, 12, device=device_of(outcome.student))).shape == (1, 2)


class TakesChannelsLast(nn.Module):
    """A network taking (N, H, W, C), as Keras' exports do."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))
