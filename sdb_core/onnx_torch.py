"""Bundles' ONNX graphs back in torch: run differentiably (any graph of the supported operators) or rebuilt.

Hosted bundles carry ONNX only. Two callers need torch of them:

**Attribution (DEPARA).** ``OnnxModule`` evaluates the graph node by node with torch operators,
the weights as buffers, so autograd flows through it. It covers the operators this project's
classifiers export to (conv nets, MLPs, residual nets): anything else is refused with the
operator's name. A "layer" is the name of an ONNX node (e.g. ``/features/features.4/Relu``); its
first output is the layer's output.

**Amalgamation teachers.** The recipes work stage by stage through a teacher (AFK imitates block
``l`` and projects through the rest; the group stack judges with the last ``j`` blocks; task
branching runs the rest of a teacher's decoder), so a teacher must be the torch network, not a
black box. For this project's two teacher families (``MultiLabelNet``, ``EncDec``: chains of 3x3
convs with nothing but ReLU, pooling and upsampling between them) the graph determines the network:
the exporter folded each BatchNorm into its conv, so ``teacher_from_bundle`` rebuilds the network
with biased convs where it had conv + BN, and takes the convs' weights in graph order. The bundle's
input normalisation becomes the first stage's first step, so the teacher takes [0, 1] images like
the recipes' data. The rebuilt network is checked against ONNX Runtime on random input; any graph
that is not one of the two families is refused with the reason. What does not survive the export:
BatchNorm running statistics (folded away), so the data-free recipe's BN-statistics prior has
nothing to match on a hosted teacher.
"""
from __future__ import annotations

import re
from os import PathLike

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _initializers(graph) -> dict[str, np.ndarray]:
    """The graph's stored tensors by name."""
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def bundle_graph(path) -> tuple[bytes, dict]:
    """A bundle's ONNX bytes and its meta, the files' hashes verified (a clear error for a missing or altered one)."""
    from .bundle import MODEL_FILE, read_bundle_files, verify

    files = read_bundle_files(path)
    return files[MODEL_FILE], verify(files, str(path))


def _pads(a: dict, nd: int = 2) -> list[int]:
    p = list(a.get("pads", [0] * (2 * nd)))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ValueError(f"auto_pad {a['auto_pad']!r} is not supported")
    return p


def _pad_input(x: Tensor, pads: list[int], value: float = 0.0) -> tuple[Tensor, int | tuple]:
    """Symmetric pads go to the op; asymmetric ones are applied first (ONNX: begins then ends)."""
    nd = len(pads) // 2
    begin, end = pads[:nd], pads[nd:]
    if begin == end:
        return x, tuple(begin)
    spec = []
    for b, e in zip(reversed(begin), reversed(end)):
        spec += [b, e]
    return F.pad(x, spec, value=value), 0


SUPPORTED = ("Conv", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "MaxPool", "AveragePool", "GlobalAveragePool",
             "Flatten", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Identity", "BatchNormalization", "Reshape",
             "Constant", "Softmax", "Dropout")


class OnnxModule(nn.Module):
    def __init__(self, model_bytes: bytes):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        g = onnx.load_from_string(model_bytes).graph
        unsupported = sorted({n.op_type for n in g.node} - set(SUPPORTED))
        if unsupported:
            raise ValueError(f"cannot run this ONNX graph for attribution: unsupported operators {unsupported}")
        self._consts: dict[str, str] = {}
        for i, (name, value) in enumerate(_initializers(g).items()):
            self.register_buffer(f"w{i}", torch.from_numpy(np.array(value)))
            self._consts[name] = f"w{i}"
        init_names = set(self._consts)
        self.input_name = next(i.name for i in g.input if i.name not in init_names)
        self.output_name = g.output[0].name
        self.nodes = [(n.name or f"{n.op_type}_{k}", n.op_type, list(n.input), list(n.output), _attrs(n))
                      for k, n in enumerate(g.node)]
        for name, op, _, outs, a in self.nodes:
            if op == "Constant":
                self.register_buffer(f"c{len(self._consts)}", torch.from_numpy(np.array(numpy_helper.to_array(a["value"]))))
                self._consts[outs[0]] = f"c{len(self._consts)}"

    def layer_names(self) -> list[str]:
        return [name for name, op, *_ in self.nodes if op != "Constant"]

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_output(x, None)

    def layer_output(self, x: Tensor, layer: str | None) -> Tensor:
        if layer is not None and layer not in {n for n, *_ in self.nodes}:
            raise ValueError(f"model has no layer {layer!r}; layers: {', '.join(self.layer_names()[:40])}")
        env: dict[str, Tensor] = {self.input_name: x}
        for k, b in self._consts.items():
            env[k] = getattr(self, b)
        for name, op, ins, outs, a in self.nodes:
            if op == "Constant":
                continue
            args = [env[i] if i else None for i in ins]
            env[outs[0]] = self._run(op, args, a)
            if name == layer:
                return env[outs[0]]
        return env[self.output_name]

    @staticmethod
    def _run(op: str, v: list, a: dict) -> Tensor:
        x = v[0]
        if op == "Conv":
            if len(v[1].shape) != 4:
                raise ValueError(f"only 2-d convolutions are supported, got a weight of shape {tuple(v[1].shape)}")
            x, pad = _pad_input(x, _pads(a))
            return F.conv2d(x, v[1], v[2] if len(v) > 2 else None, stride=tuple(a.get("strides", [1, 1])),
                            padding=pad, dilation=tuple(a.get("dilations", [1, 1])), groups=a.get("group", 1))
        if op == "Relu":
            return F.relu(x)
        if op == "LeakyRelu":
            return F.leaky_relu(x, a.get("alpha", 0.01))
        if op == "Sigmoid":
            return torch.sigmoid(x)
        if op == "Tanh":
            return torch.tanh(x)
        if op in ("MaxPool", "AveragePool"):
            k = tuple(a["kernel_shape"])
            if op == "MaxPool":
                x, pad = _pad_input(x, _pads(a), value=float("-inf"))
                return F.max_pool2d(x, k, tuple(a.get("strides", k)), pad, ceil_mode=bool(a.get("ceil_mode", 0)))
            x, pad = _pad_input(x, _pads(a))
            return F.avg_pool2d(x, k, tuple(a.get("strides", k)), pad, ceil_mode=bool(a.get("ceil_mode", 0)),
                                count_include_pad=bool(a.get("count_include_pad", 0)))
        if op == "GlobalAveragePool":
            return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
        if op == "Flatten":
            axis = a.get("axis", 1)
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        if op == "Gemm":
            w = v[1].T if a.get("transB", 0) else v[1]
            x = x.T if a.get("transA", 0) else x
            y = a.get("alpha", 1.0) * (x @ w)
            return y + a.get("beta", 1.0) * v[2] if len(v) > 2 and v[2] is not None else y
        if op == "MatMul":
            return x @ v[1]
        if op == "Add":
            return x + v[1]
        if op == "Sub":
            return x - v[1]
        if op == "Mul":
            return x * v[1]
        if op == "Div":
            return x / v[1]
        if op in ("Identity", "Dropout"):
            return x
        if op == "BatchNormalization":
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale, bias, mean, var = (t.view(shape) for t in v[1:5])
            return (x - mean) / torch.sqrt(var + a.get("epsilon", 1e-5)) * scale + bias
        if op == "Reshape":
            shape = [int(s) for s in v[1].tolist()]
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return x.reshape(shape)
        if op == "Softmax":
            return torch.softmax(x, dim=a.get("axis", -1))
        raise ValueError(f"unsupported operator {op}")


def bundle_module(path) -> tuple[OnnxModule, dict]:
    """A bundle's public network as a differentiable module, and its meta (hashes verified)."""
    model_bytes, meta = bundle_graph(path)
    return OnnxModule(model_bytes).eval(), meta


# --------------------------------------------------------------------------- amalgamation teachers
class Normalize(nn.Module):
    """The bundle's ``(x - mean) / std``, on images in [0, 1] (its ``scale`` undone by the caller)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _fold_batchnorm(module: nn.Module) -> None:
    """In place: every conv followed by a BatchNorm in a Sequential becomes a biased conv, the BN an Identity."""
    for child in module.children():
        _fold_batchnorm(child)
    if not isinstance(module, nn.Sequential):
        return
    for i in range(len(module) - 1):
        conv, bn = module[i], module[i + 1]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module[i] = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  conv.dilation, conv.groups, bias=True)
            module[i + 1] = nn.Identity()


class _Graph:
    """What the rebuild needs of an ONNX graph: its convs (weights resolved) and the node order."""

    def __init__(self, model_bytes: bytes):
        import onnx

        self.model = onnx.load_from_string(model_bytes)
        g = self.model.graph
        values = _initializers(g)
        # The exporter routes shared constants through Identity nodes; follow them.
        for n in g.node:
            if n.op_type == "Identity" and n.input[0] in values:
                values[n.output[0]] = values[n.input[0]]
        self.nodes, self.output = list(g.node), g.output[0].name
        self.ops = sorted({n.op_type for n in g.node})
        self.convs = []
        for n in g.node:
            if n.op_type == "Conv":
                w = values.get(n.input[1])
                b = values.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
                if w is None:
                    raise ValueError(f"node {n.name}: its weights are computed, not stored")
                self.convs.append((n.name, w, b, _attrs(n)))

    def convs_under(self, prefix: str) -> list:
        return [c for c in self.convs if c[0].startswith(prefix)]

    def affine_tail(self, start: str, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` of the graph from tensor ``start`` (N, width) to its output, read off by ONNX
        Runtime on the zero vector and the unit vectors: however the exporter spelled a linear head
        (Gemm, or a gated MatMul + Add as an AFK student's), this is the map it computes. That it is
        affine at all is checked with the whole network afterwards."""
        import onnx
        import onnxruntime as ort
        from onnx.utils import Extractor

        sub = Extractor(onnx.shape_inference.infer_shapes(self.model)).extract_model([start], [self.output])
        session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
        basis = np.concatenate([np.zeros((1, width)), np.eye(width)]).astype(np.float32)
        out = session.run(None, {start: basis})[0]
        return (out[1:] - out[0]).T, out[0]


def _load_convs(net: nn.Module, convs: list) -> None:
    layers = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if len(layers) != len(convs):
        raise ValueError(f"the graph has {len(convs)} convolutions, the rebuilt network {len(layers)}")
    for layer, (name, w, b, attrs) in zip(layers, convs):
        if tuple(layer.weight.shape) != w.shape:
            raise ValueError(f"node {name}: weight {w.shape}, expected {tuple(layer.weight.shape)}")
        if list(attrs.get("strides", [1, 1])) != list(layer.stride) or attrs.get("group", 1) != layer.groups:
            raise ValueError(f"node {name}: strides {attrs.get('strides')} / group {attrs.get('group', 1)} differ "
                             f"from the family's")
        layer.weight.data.copy_(torch.from_numpy(np.array(w)))
        if layer.bias is not None:
            layer.bias.data.copy_(torch.from_numpy(np.array(b)) if b is not None else torch.zeros_like(layer.bias))


def _multilabel(g: _Graph, meta: dict) -> nn.Module:
    from .amalgamate.multilabel import MultiLabelNet

    blocks = sorted({int(m.group(1)) for c in g.convs if (m := re.match(r"/blocks\.(\d+)/", c[0]))})
    if not blocks or blocks != list(range(len(blocks))) or len(g.convs) != len(blocks) or any(
            len(g.convs_under(f"/blocks.{i}/")) != 1 for i in blocks):
        raise ValueError("not a multilabel network of this project: expected one conv per /blocks.i/ stage")
    widths = [int(g.convs_under(f"/blocks.{i}/")[0][1].shape[0]) for i in blocks]
    last = [n.output[0] for n in g.nodes if n.name.startswith(f"/blocks.{blocks[-1]}/")][-1]
    pools = [n for n in g.nodes if last in n.input and n.op_type == "ReduceMax"]
    if len(pools) != 1:
        raise ValueError("not a multilabel network of this project: its head does not max-pool the last block")
    first = g.convs[0]
    net = MultiLabelNet(int(first[1].shape[1]), 1, widths, stem_stride=int(first[3].get("strides", [1, 1])[0]))
    w, b = g.affine_tail(pools[0].output[0], widths[-1])
    net.head = type(net.head)(widths[-1], len(b))
    net.num_labels = len(b)
    _fold_batchnorm(net)
    _load_convs(net, g.convs)
    net.head.fc.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    net.head.fc.bias.data.copy_(torch.from_numpy(np.ascontiguousarray(b)))
    return net


def _encdec(g: _Graph, meta: dict) -> nn.Module:
    from .models.encdec import EncDec

    levels = sorted({int(m.group(1)) for c in g.convs if (m := re.match(r"/enc(\d+)/", c[0]))})
    if len(levels) < 2 or levels != list(range(1, len(levels) + 1)):
        raise ValueError("not an encoder-decoder of this project: expected convs under /enc1/, /enc2/, ...")
    if not set(g.ops) <= {"Conv", "Relu", "MaxPool", "Resize", "Constant", "Identity"}:
        raise ValueError(f"not an encoder-decoder of this project: it has {', '.join(g.ops)} operators")
    convs = len(g.convs_under("/enc1/"))
    widths = [int(g.convs_under(f"/enc{i}/")[-1][1].shape[0]) for i in levels]
    in_channels, out_channels = int(g.convs[0][1].shape[1]), int(g.convs[-1][1].shape[0])
    net = EncDec(in_channels, out_channels, widths, convs)
    _fold_batchnorm(net)
    _load_convs(net, g.convs)
    return net


def teacher_from_bundle(path: str | PathLike, family: str) -> tuple[nn.Module, dict]:
    """The network a hosted bundle was exported from (``family``: multilabel or encdec), and its meta.

    ValueError, saying why, for a protected bundle or a graph of another family.
    """
    import onnxruntime as ort

    from .amalgamate.config import FAMILIES
    from .bundle import INPUT_NAME

    if family not in FAMILIES:
        raise ValueError(f"unknown teacher family {family!r}; hosted teachers are {', '.join(FAMILIES)} networks")
    model_bytes, meta = bundle_graph(path)
    if meta["mode"] != "plain":
        raise ValueError(f"{meta['name']} is a protected model: its public outputs are built to teach nothing; "
                         "amalgamate from the owner's weights instead")
    g = _Graph(model_bytes)
    net = (_multilabel if family == "multilabel" else _encdec)(g, meta)
    mean, std = meta["normalize"]["mean"], meta["normalize"]["std"]
    shape = [int(s) for s in meta["input"]["shape"]]
    if len(mean) != shape[0] or len(std) != shape[0]:
        raise ValueError(f"{meta['name']}: normalisation for {len(mean)} channels, input has {shape[0]}")
    if any(m != 0.0 for m in mean) or any(s != 1.0 for s in std):
        first = net.blocks[0] if family == "multilabel" else net.stages["enc1"]
        first.insert(0, Normalize(mean, std))
    net.eval()

    # The rebuild must compute what the hosted graph computes; random [0, 1] images, both ways.
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    want = session.run(None, {INPUT_NAME: ((x.numpy() - np.array(mean, np.float32).reshape(1, -1, 1, 1))
                                           / np.array(std, np.float32).reshape(1, -1, 1, 1))})[0]
    with torch.no_grad():
        got = net(x).numpy()
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-3 * (1 + np.abs(want).max())):
        raise ValueError(f"{meta['name']} is not a {family} network of this project: rebuilt from its graph, it "
                         f"computes something else (ops in the graph: {', '.join(g.ops)})")
    return net, meta
