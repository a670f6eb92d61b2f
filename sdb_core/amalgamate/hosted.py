"""Hosted models as amalgamation teachers: a bundle's ONNX graph read back into the network it came from.

The recipes work stage by stage through a teacher (AFK imitates block ``l`` and projects through
the rest; the group stack judges with the last ``j`` blocks; task branching runs the rest of a
teacher's decoder), so a teacher must be the torch network, not a black box. A hosted bundle
carries only ONNX; for this project's two teacher families (``MultiLabelNet``, ``EncDec``: chains
of 3x3 convs with nothing but ReLU, pooling and upsampling between them) the graph determines the
network: the exporter folded each BatchNorm into its conv, so the network is rebuilt with biased
convs where it had conv + BN, and the convs' weights are taken in graph order. The bundle's input
normalisation becomes the first stage's first step, so the teacher takes [0, 1] images like the
recipes' data. The rebuilt network is checked against ONNX Runtime on random input; any graph
that is not one of the two families is refused with the reason.

What does not survive the export: BatchNorm running statistics (folded away), so the data-free
recipe's BN-statistics prior has nothing to match on a hosted teacher.
"""
from __future__ import annotations

import re
from os import PathLike

import numpy as np
import torch
from torch import Tensor, nn

from sdb_core.amalgamate.config import FAMILIES
from sdb_core.amalgamate.multilabel import MultiLabelNet
from sdb_core.models.encdec import EncDec


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
        from onnx import numpy_helper

        self.model = onnx.load_from_string(model_bytes)
        g = self.model.graph
        values = {i.name: numpy_helper.to_array(i) for i in g.initializer}
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
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                self.convs.append((n.name, w, b, attrs))

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


def _multilabel(g: _Graph, meta: dict) -> MultiLabelNet:
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


def _encdec(g: _Graph, meta: dict) -> EncDec:
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

    from sdb_core.bundle import INPUT_NAME, MODEL_FILE, read_bundle_files, verify

    if family not in FAMILIES:
        raise ValueError(f"unknown teacher family {family!r}; hosted teachers are {', '.join(FAMILIES)} networks")
    files = read_bundle_files(path)
    meta = verify(files, str(path))
    if meta["mode"] != "plain":
        raise ValueError(f"{meta['name']} is a protected model: its public outputs are built to teach nothing; "
                         "amalgamate from the owner's weights instead")
    g = _Graph(files[MODEL_FILE])
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
    session = ort.InferenceSession(files[MODEL_FILE], providers=["CPUExecutionProvider"])
    want = session.run(None, {INPUT_NAME: ((x.numpy() - np.array(mean, np.float32).reshape(1, -1, 1, 1))
                                           / np.array(std, np.float32).reshape(1, -1, 1, 1))})[0]
    with torch.no_grad():
        got = net(x).numpy()
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-3 * (1 + np.abs(want).max())):
        raise ValueError(f"{meta['name']} is not a {family} network of this project: rebuilt from its graph, it "
                         f"computes something else (ops in the graph: {', '.join(g.ops)})")
    return net, meta
