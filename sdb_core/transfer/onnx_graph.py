"""A hosted model's ONNX graph run as a differentiable torch module, for attribution.

Hosted bundles carry ONNX only, and DEPARA needs gradients of a layer's output with respect to
the input. ``OnnxModule`` evaluates the graph node by node with torch operators, the weights as
buffers, so autograd flows through it. It covers the operators this project's classifiers
export to (conv nets, MLPs, residual nets): anything else is refused with the operator's name.
A "layer" is the name of an ONNX node (e.g. ``/features/features.4/Relu``); its first output is
the layer's output.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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

        model = onnx.load_from_string(model_bytes)
        g = model.graph
        unsupported = sorted({n.op_type for n in g.node} - set(SUPPORTED))
        if unsupported:
            raise ValueError(f"cannot run this ONNX graph for attribution: unsupported operators {unsupported}")
        self._consts: dict[str, str] = {}
        for i, init in enumerate(g.initializer):
            self.register_buffer(f"w{i}", torch.from_numpy(np.array(numpy_helper.to_array(init))))
            self._consts[init.name] = f"w{i}"
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
    from sdb_core.bundle import MODEL_FILE, read_bundle_files, verify

    files = read_bundle_files(path)
    meta = verify(files, str(path))
    return OnnxModule(files[MODEL_FILE]).eval(), meta
