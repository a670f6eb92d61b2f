"""ONNX operators in torch: what :class:`~sdb_core.onnx_torch.OnnxModule` runs a graph with.

Each operator is a function ``(inputs, attributes, opset) -> output or tuple of outputs`` in ``OPS`` (by its
name; one of a domain other than ONNX's by the domain and name, ``ai.onnx.ml.Scaler``); one not in it is refused
by name before anything runs. The set covers what torch, tf2onnx and Keras exports of
classifiers hold: convolutional, residual, MLP, attention and recurrent networks (1-, 2- and 3-d convolutions,
transposed ones and pools, depth to space and back, every normalisation ONNX has, the usual activations,
reshaping, slicing, reductions, the resizes torch's ``F.interpolate`` writes, the quantize/dequantize pairs of a
QDQ quantized graph, ONNX's LSTM, GRU and RNN).

Shapes stay free. ``Shape`` yields :class:`Dims`, the tensor's sizes as values (under ``torch.onnx.export``'s
tracer, traced sizes), and the integer ops a graph computes a shape with (``Gather``, ``Unsqueeze``,
``Concat``, ``Slice``, arithmetic) work on them as such: ``x.view(x.size(0), -1)``, exported as Shape →
Gather → Unsqueeze → Concat → Reshape, runs at any batch size here and exports again with a free batch axis.
A graph exported at one fixed batch size reshapes by a stored constant instead; ``Reshape`` reads which stored
size held the export's batch (``batch_readings``; :meth:`OnnxModule.calibrate` settles it where the likeliest
reading is wrong: attention folds the batch with the heads or the sequence), so it too runs at other batch sizes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from math import ceil

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class Dims(tuple):
    """Sizes computed from a tensor's shape (1-d, or 0-d when ``scalar``): Python ints or traced sizes."""

    scalar: bool = False

    @classmethod
    def of(cls, values, scalar: bool = False) -> Dims:
        out = cls(values)
        out.scalar = scalar
        return out


Value = Tensor | Dims | None

# ONNX TensorProto data types a classifier's graph casts to.
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def ints(v: Value) -> list:
    """A shape-like input as a list: a :class:`Dims` as it is, a (stored) tensor's values."""
    if isinstance(v, Dims):
        return list(v)
    return [int(i) for i in numbers(v)]


def numbers(v: Tensor) -> list:
    """A tensor's values: a stored one's as kept on the host (``host_values``, OnnxModule), not read back from a GPU."""
    host = getattr(v, "host_values", None)
    return list(host) if host is not None else v.reshape(-1).tolist()


def tensor(v: Value) -> Tensor:
    """A value as a tensor (a :class:`Dims` where a graph does arithmetic on sizes with tensors)."""
    if isinstance(v, Dims):
        t = torch.stack([torch.as_tensor(d, dtype=torch.int64) for d in v]) if len(v) else torch.zeros(0, dtype=torch.int64)
        return t.reshape(()) if v.scalar else t
    return v


def _axes(a: dict, v: list, opset: int, since: int, index: int = 1) -> list[int] | None:
    """Axes given as an attribute (before opset ``since``) or as input ``index`` (from it)."""
    if opset < since:
        return list(a["axes"]) if "axes" in a else None
    return ints(v[index]) if len(v) > index and v[index] is not None else None


# --------------------------------------------------------------------------- convolution and pooling
def _same_pads(a: dict, x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> list:
    mode = a.get("auto_pad", "NOTSET")
    nd = len(kernel)
    if mode in ("NOTSET", "VALID"):
        return list(a.get("pads", [0] * (2 * nd))) if mode == "NOTSET" else [0] * (2 * nd)
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max((ceil(int(size) / s) - 1) * s + (k - 1) * d + 1 - int(size), 0)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def _padded(x: Tensor, pads: list, value: float = 0.0) -> tuple[Tensor, tuple | int]:
    """Symmetric pads go to the op; asymmetric ones are applied first (ONNX lists all begins, then all ends)."""
    nd = len(pads) // 2
    begin, end = pads[:nd], pads[nd:]
    if begin == end:
        return x, tuple(begin)
    spec = []
    for b, e in zip(reversed(begin), reversed(end)):
        spec += [b, e]
    return F.pad(x, spec, value=value), 0


def _nd(x: Tensor, op: str) -> int:
    nd = x.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"{op} over {nd} spatial axes is not supported (1, 2 or 3)")
    return nd


def conv(v, a, opset):
    x, w = v[0], v[1]
    nd = _nd(x, "Conv")
    kernel = list(w.shape[2:])
    strides, dilations = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    x, pad = _padded(x, _same_pads(a, x, kernel, strides, dilations))
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(x, w, v[2] if len(v) > 2 else None, stride=strides, padding=pad, dilation=dilations,
              groups=a.get("group", 1))


def conv_transpose(v, a, opset):
    """A transposed convolution (an upsampling stage) with explicit pads; ``output_shape`` or an ``auto_pad`` is
    refused by name (what they leave to the runtime, torch's op does not take)."""
    x, w = v[0], v[1]
    nd = _nd(x, "ConvTranspose")
    if "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError("ConvTranspose with output_shape or a SAME auto_pad is not supported (explicit pads are)")
    strides, dilations = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    pads = _same_pads(a, x, list(w.shape[2:]), strides, dilations)  # (NOTSET or VALID: as given, or none)
    begin, end = pads[:nd], pads[nd:]
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = fn(x, w, v[2] if len(v) > 2 else None, stride=strides, padding=0, dilation=dilations,
           groups=a.get("group", 1), output_padding=list(a.get("output_padding", [0] * nd)))
    # the pads crop the full output, each side its own
    return y[(slice(None), slice(None), *(slice(b, y.shape[2 + i] - e) for i, (b, e) in enumerate(zip(begin, end))))]


def depth_to_space(v, a, opset):
    x, bs = v[0], a["blocksize"]
    n, c, h, w = x.shape
    if a.get("mode", "DCR") == "DCR":  # channels read block row, block column, then depth
        y = x.reshape(n, bs, bs, c // bs**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:  # CRD: depth first (torch's pixel_shuffle)
        y = x.reshape(n, c // bs**2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // bs**2, h * bs, w * bs)


def space_to_depth(v, a, opset):
    x, bs = v[0], a["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * bs**2, h // bs, w // bs)


def pool(kind: str):
    def run(v, a, opset):
        x = v[0]
        nd = _nd(x, kind)
        kernel = list(a["kernel_shape"])
        strides, dilations = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
        pads = _same_pads(a, x, kernel, strides, dilations)
        ceil_mode = bool(a.get("ceil_mode", 0))
        if kind == "MaxPool":
            x, pad = _padded(x, pads, value=float("-inf"))
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
            return fn(x, kernel, strides, pad, dilation=dilations, ceil_mode=ceil_mode)
        x, pad = _padded(x, pads)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        return fn(x, kernel, strides, pad, ceil_mode=ceil_mode, count_include_pad=bool(a.get("count_include_pad", 0)))
    return run


# --------------------------------------------------------------------------- normalisation
def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def batch_norm(v, a, opset):
    x = v[0]
    scale, bias, mean, var = (_channel_view(t, x) for t in v[1:5])
    return (x - mean) / torch.sqrt(var + a.get("epsilon", 1e-5)) * scale + bias


def instance_norm(v, a, opset):
    x, scale, bias = v
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + a.get("epsilon", 1e-5)) * _channel_view(scale, x) + _channel_view(bias, x)


def layer_norm(v, a, opset):
    x = v[0]
    axis = a.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, correction=0)
    y = (x - mean) / torch.sqrt(var + a.get("epsilon", 1e-5)) * v[1]
    return y + v[2] if len(v) > 2 and v[2] is not None else y


def _root_mean_square(x: Tensor, a: dict) -> tuple[Tensor, Tensor]:
    """x in ``stash_type`` (float32 unless the node names another float), and its root mean square plus epsilon,
    sqrt(mean(x²) + epsilon), over the axes from ``axis`` on: the first stage of ONNX's RMSNormalization."""
    h = x.to(DTYPES.get(int(a.get("stash_type", 1)), torch.float32))
    dims = tuple(range(a.get("axis", -1) % x.dim(), x.dim()))
    return h, torch.sqrt((h * h).mean(dim=dims, keepdim=True) + a.get("epsilon", 1e-5))


def rms_norm(v, a, opset):
    """ONNX's RMSNormalization (opset 23): x divided by its root mean square, cast back to x's type, times the scale.
    Plain ops, not torch's rms_norm: a box exports the graph again at opset 17, which has none."""
    h, rms = _root_mean_square(v[0], a)
    return (h / rms).to(v[0].dtype) * v[1]


def simplified_layer_norm(v, a, opset):
    """ONNX Runtime's SimplifiedLayerNormalization (an ONNX-domain operator of its own, what its transformer optimizer
    fuses an RMSNorm into): :func:`rms_norm`'s Y, and its optional second output inv_std_var, 1 / rms."""
    h, rms = _root_mean_square(v[0], a)
    return (h / rms).to(v[0].dtype) * v[1], 1 / rms


def group_norm(v, a, opset):
    x, scale, bias = v
    groups = int(a["num_groups"])
    if scale.numel() != x.shape[1]:  # opset 18's per-group scale: what opset 21 replaced
        raise ValueError("GroupNormalization with a scale per group (opset 18) is not supported; export at opset 21 "
                         "or 17 (torch's default, which writes InstanceNormalization)")
    return F.group_norm(x, groups, scale, bias, a.get("epsilon", 1e-5))


# --------------------------------------------------------------------------- element-wise
def _binary(fn: Callable):
    def run(v, a, opset):
        x, y = v[0], v[1]
        if isinstance(x, Dims) or isinstance(y, Dims):
            return _on_dims(fn, x, y)
        return fn(x, y)
    return run


def _on_dims(fn: Callable, x: Value, y: Value) -> Dims:
    """Arithmetic on sizes (a graph computing a flattened width, H·W, from a shape), element by element."""
    xs, ys = ints(x), ints(y)
    if len(xs) == 1 and len(ys) > 1:
        xs = xs * len(ys)
    if len(ys) == 1 and len(xs) > 1:
        ys = ys * len(xs)
    scalar = all(getattr(t, "scalar", isinstance(t, Tensor) and t.dim() == 0) for t in (x, y))
    return Dims.of([fn(p, q) for p, q in zip(xs, ys)], scalar=scalar)


def _div(x, y):
    """ONNX's Div: true division of floats, truncating division of integers (sizes included, which torch's
    tracer hands over as integer tensors)."""
    if any(isinstance(t, float) or isinstance(t, Tensor) and t.is_floating_point() for t in (x, y)):
        return x / y
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return torch.div(torch.as_tensor(x), y, rounding_mode="trunc")
    return int(x / y)


def _variadic(fn: Callable):
    def run(v, a, opset):
        out = v[0]
        for t in v[1:]:
            out = fn(out, t)
        return out
    return run


def clip(v, a, opset):
    lo = a.get("min") if opset < 11 else (v[1] if len(v) > 1 and v[1] is not None else None)
    hi = a.get("max") if opset < 11 else (v[2] if len(v) > 2 and v[2] is not None else None)
    return torch.clamp(v[0], min=lo, max=hi)


def _softmax(fn: Callable):
    def run(v, a, opset):
        x = v[0]
        if opset >= 13:
            return fn(x, dim=a.get("axis", -1))
        # Before opset 13: over the input coerced to 2-d at ``axis`` (default 1).
        axis = a.get("axis", 1) % x.dim()
        return fn(x.flatten(axis) if axis else x.reshape(1, -1), dim=-1).reshape(x.shape)
    return run


def gelu(v, a, opset):
    return F.gelu(v[0], approximate=a.get("approximate", "none"))


def gemm(v, a, opset):
    x = v[0].T if a.get("transA", 0) else v[0]
    w = v[1].T if a.get("transB", 0) else v[1]
    y = a.get("alpha", 1.0) * (x @ w)
    return y + a.get("beta", 1.0) * v[2] if len(v) > 2 and v[2] is not None else y


# --------------------------------------------------------------------------- shapes
def shape(v, a, opset):
    x = v[0]
    if isinstance(x, Dims):
        return Dims.of(((0,) if x.scalar else (len(x),))[a.get("start", 0):a.get("end", None)])
    return Dims.of(tuple(x.shape)[a.get("start", 0):a.get("end", None)])


def reshape(v, a, opset):
    x, target = v[0], ints(v[1])
    if isinstance(x, Dims):  # sizes stay sizes: 1-d, or a scalar for the shape []
        return Dims.of(x, scalar=not target)
    if not a.get("allowzero", 0):
        target = [x.shape[i] if isinstance(s, int) and s == 0 else s for i, s in enumerate(target)]
    # A graph exported at one batch size stores it in its reshapes: run at another batch (``_batch``, the graph
    # input's), which stored size held the export's batch is a reading (``batch_readings``), picked by ``_choose``:
    # the one :meth:`OnnxModule.calibrate` found, else the likeliest.
    batch = _run_batch(v, a)
    if batch is not None and target and x.dim() > 0 and isinstance(target[0], int):
        options = batch_readings(x, target, a["_fixed_batch"], batch)
        reading = a["_choose"](options, (tuple(target), tuple(x.shape))) if "_choose" in a else options[0]
        target = _read(target, reading, a["_fixed_batch"], batch)
    return x.reshape(target)


def batch_readings(x: Tensor, target: list[int], fixed_batch: int, batch) -> list[int | None]:
    """Where a stored reshape target of a graph exported at ``fixed_batch`` may hold that batch, run at ``batch``:
    None (nowhere: as stored, an inferred -1 axis taking the batch) or the axis whose stored size is a multiple of
    it (the batch alone, or folded with another axis: attention's (N·heads, T, d), sequence-first (T·N, E)). Only
    those that fit the tensor, likeliest first: the leading axis where it is the export's batch and an inferred
    axis follows (windows of an image back to (N, -1, C)) or the stored shape does not fit, else as stored."""
    axes = [j for j, s in enumerate(target) if isinstance(s, int) and s > 0 and s % fixed_batch == 0]
    lead = bool(axes) and axes[0] == 0 and (target[0] == fixed_batch and -1 in target[1:] or not _fits(x, target))
    order = [0, None, *axes[1:]] if lead else [None, *axes]
    return [r for r in order if _fits(x, _read(target, r, fixed_batch, batch))] or [None]


def _read(target: list[int], axis: int | None, fixed_batch: int, batch) -> list:
    """``target`` with the export's batch in ``axis`` made ``batch`` (None: as stored)."""
    if axis is None:
        return target
    return [s // fixed_batch * batch if j == axis else s for j, s in enumerate(target)]


def _run_batch(v: list, a: dict) -> int | None:
    """The batch a graph exported at one batch size (``_fixed_batch``) runs at (``_batch``) where the node's sizes
    (``v[1]``) are stored ones, which may hold the export's; else None. Also at the export's own batch, where each
    reading gives the stored sizes: traced there (a box's export), they become sizes computed from the batch."""
    fixed_batch, batch = a.get("_fixed_batch"), a.get("_batch")
    if fixed_batch is None or batch is None or isinstance(v[1], Dims):
        return None
    return batch


def _fits(x: Tensor, target: list) -> bool:
    known = int(np.prod([d for d in target if d != -1]))
    return x.numel() == known if -1 not in target else known > 0 and x.numel() % known == 0


def flatten(v, a, opset):
    x = v[0]
    axis = a.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    if axis == 0:
        return x.reshape(1, -1)
    return x.flatten(0, axis - 1).flatten(1) if axis < x.dim() else x.flatten(0, axis - 1).unsqueeze(1)


def unsqueeze(v, a, opset):
    x, axes = v[0], _axes(a, v, opset, 13)
    if isinstance(x, Dims):
        if not x.scalar or axes not in ([0], [-1]):
            raise ValueError("Unsqueeze of a shape along another axis than 0 is not supported")
        return Dims.of(x)
    rank = x.dim() + len(axes)
    for ax in sorted(d % rank for d in axes):
        x = x.unsqueeze(ax)
    return x


def squeeze(v, a, opset):
    x, axes = v[0], _axes(a, v, opset, 13)
    if isinstance(x, Dims):
        return Dims.of(x, scalar=True) if len(x) == 1 else x
    if axes is None:
        return x.squeeze()
    for ax in sorted((d % x.dim() for d in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def concat(v, a, opset):
    if any(isinstance(t, Dims) for t in v):
        return Dims.of([d for t in v for d in ints(t)])
    return torch.cat(v, dim=a["axis"])


def _from_start(index: Tensor, size: int) -> Tensor:
    """Indices as counted from the start of an axis of ``size`` (ONNX's negative ones count from its end)."""
    return torch.where(index < 0, index + size, index)


def gather(v, a, opset):
    x, index = v[0], v[1]
    axis = a.get("axis", 0)
    if isinstance(x, Dims):
        picked = [x[i] for i in ints(index)]
        return Dims.of(picked, scalar=index.dim() == 0)
    if isinstance(index, Tensor) and index.dim() == 0:
        return x.select(axis, ints(index)[0])
    index = _from_start(tensor(index).to(x.device), x.shape[axis])  # sizes picked from a shape: made on the CPU
    out = torch.index_select(x, axis % x.dim(), index.reshape(-1))
    axis = axis % x.dim()
    return out.reshape(tuple(x.shape[:axis]) + tuple(index.shape) + tuple(x.shape[axis + 1:]))


def slice_(v, a, opset):
    x = v[0]
    if opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = ints(v[1]), ints(v[2])
        axes = ints(v[3]) if len(v) > 3 and v[3] is not None else None
        steps = ints(v[4]) if len(v) > 4 and v[4] is not None else None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)
    # Python's slices read ONNX's bounds as ONNX does: negative from the end, past the end clamped.
    if isinstance(x, Dims):
        return Dims.of(list(x)[starts[0]:ends[0]:steps[0]])
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st > 0:
            x = x[(slice(None),) * (ax % x.dim()) + (slice(s, e, st),)]
        else:  # torch slices forwards only: the indices Python's slice picks, backwards (torch's F.pad exports one)
            x = x.index_select(ax, torch.tensor(list(range(int(x.shape[ax])))[s:e:st], dtype=torch.int64,
                                                device=x.device))
    return x


def split(v, a, opset):
    x, axis = v[0], a.get("axis", 0)
    sizes = a.get("split") if opset < 13 else (ints(v[1]) if len(v) > 1 and v[1] is not None else None)
    if sizes is None:  # equal parts, the last one smaller where the axis does not divide
        n = a.get("num_outputs", a["_outputs"])
        return torch.split(x, ceil(x.shape[axis] / n), dim=axis)
    return torch.split(x, list(sizes), dim=axis)


def transpose(v, a, opset):
    x = v[0]
    perm = a.get("perm", list(range(x.dim()))[::-1])
    return x.permute(*perm)


def expand(v, a, opset):
    x, target = v[0], ints(v[1])
    batch = _run_batch(v, a)
    if batch is not None and len(target) == x.dim() and target and target[0] == a["_fixed_batch"] and x.shape[0] == 1:
        # a stored batch size, one row made the batch's (a class token), likelier than a size that equals it
        like = ("expand", tuple(target), tuple(x.shape))
        if (a["_choose"]([0, None], like) if "_choose" in a else 0) == 0:
            target = [batch, *target[1:]]
    rank = max(x.dim(), len(target))
    target = [1] * (rank - len(target)) + target
    have = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(have).expand([h if isinstance(t, int) and t == 1 else t for h, t in zip(have, target)])


def constant_of_shape(v, a, opset):
    fill = torch.from_numpy(np.array(a["value"])) if "value" in a else torch.zeros(1)
    shape = ints(v[0])
    if isinstance(v[0], Dims) and len(shape) == 1 and not fill.is_floating_point():  # integers made to be sizes
        return Dims.of([int(fill.reshape(-1)[0])] * shape[0])  # (as ``expand(n, -1, -1)``'s export computes them)
    return torch.full(shape, fill.reshape(-1)[0].item(), dtype=fill.dtype)


def cast(v, a, opset):
    x, to = v[0], a["to"]
    if to not in DTYPES:
        raise ValueError(f"Cast to ONNX data type {to} is not supported")
    if isinstance(x, Dims) and not DTYPES[to].is_floating_point:
        return x  # sizes stay sizes; as floats (an attention scale, 1/sqrt(head width)) they are a tensor
    return tensor(x).to(DTYPES[to])


# The integer types a QDQ graph quantizes to (what its zero points are stored as; ONNX's default, without one, is
# uint8), and a graph's byte inputs (OnnxModule): the values each holds.
LEVELS = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767),
              torch.uint16: (0, 65535), torch.int32: (-(1 << 31), (1 << 31) - 1)}
# QuantizeLinear's output_dtype: ONNX's uint8, int8, int16 as a cast reads them, and uint16 (no cast's)
_QUANTIZED_IDS = {**{i: DTYPES[i] for i in (2, 3, 5)}, 4: torch.uint16}


def _per_axis(v: Tensor, x: Tensor, axis: int) -> Tensor:
    """A scale or zero point as ``x`` broadcasts it: one value per tensor, or one per slice along ``axis``."""
    if v.numel() == 1:
        return v.reshape(())
    axis %= x.dim()
    return v.reshape([-1 if i == axis else 1 for i in range(x.dim())])


def _quantization(v, a, name: str) -> tuple[Tensor, Tensor | None]:
    if a.get("block_size", 0):
        raise ValueError(f"{name} with block_size (blocked quantization) is not supported")
    zero = v[2] if len(v) > 2 and v[2] is not None else None
    if zero is not None and zero.dtype not in LEVELS:
        raise ValueError(f"{name} to {str(zero.dtype).removeprefix('torch.')} is not supported (integer "
                         "quantization only)")
    return v[1], zero


def quantize_linear(v, a, opset):
    """Fake quantization: ``round(x / scale) + zero point`` saturated to the quantized type, carried as float (a QDQ
    graph's DequantizeLinear reads it back). The gradient passes straight through inside the range, so a quantized
    classifier fine-tunes as its float network does, aware of the rounding."""
    scale, zero = _quantization(v, a, "QuantizeLinear")
    x, axis = tensor(v[0]), a.get("axis", 1)
    kind = zero.dtype if zero is not None else _QUANTIZED_IDS.get(a.get("output_dtype", 2))
    if kind is None:
        raise ValueError(f"QuantizeLinear to ONNX data type {a['output_dtype']} is not supported")
    lo, hi = LEVELS[kind]
    level = x / _per_axis(scale, x, axis) + (0 if zero is None else _per_axis(zero.to(x.dtype), x, axis))
    inside = (level >= lo) & (level <= hi)
    levels = torch.round(level) if a.get("_round", True) else level  # (OnnxModule: released, a float network)
    return torch.clamp(levels, lo, hi).detach() + (level - level.detach()) * inside


def dequantize_linear(v, a, opset):
    """``(x - zero point) * scale``, per tensor or per axis; ``x`` stored integers or QuantizeLinear's levels."""
    scale, zero = _quantization(v, a, "DequantizeLinear")
    x, axis = tensor(v[0]), a.get("axis", 1)
    if zero is not None:  # integers subtract exactly, before the float (an int32 bias is past float32's exact range)
        z = _per_axis(zero, x, axis)
        x = x - z.to(x.dtype) if x.is_floating_point() else x.to(torch.int64) - z.to(torch.int64)
    return x.to(scale.dtype) * _per_axis(scale, x, axis)


def dynamic_quantize_linear(v, a, opset):
    """uint8 levels of ``x`` over its own range (the whole tensor's, batch included, as ONNX Runtime computes it),
    with that scale and zero point: quantize_dynamic's activations, as floats with a straight-through gradient.
    Released (OnnxModule.quantized off): ``x`` itself, scale 1, zero point 0, so that what follows computes in
    float and no sample's answer depends on the others of its batch."""
    x = tensor(v[0])
    if not a.get("_round", True):
        return x, x.new_ones(()), x.new_zeros(())
    with torch.no_grad():  # the range is data, not a weight: no gradient through it
        lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    level = x / scale + zero
    return torch.clamp(torch.round(level), 0, 255).detach() + (level - level.detach()), scale, zero


def _less_zero(x: Tensor, zero, per: Callable[[Tensor], Tensor] = lambda z: z) -> Tensor:
    x = x if x.is_floating_point() else x.to(torch.float32)
    return x if zero is None else x - per(zero.to(x.dtype))


def _integer_weights(v, a, per: Callable[[Tensor], Tensor]) -> Tensor:
    """An integer matmul's or convolution's weights less their zero point; stored as float weights in units of
    ``_unit`` (OnnxModule, so that they train), multiplied back."""
    if "_unit" in a:
        return tensor(v[1]) * a["_unit"]
    return _less_zero(tensor(v[1]), v[3] if len(v) > 3 else None, per)


def matmul_integer(v, a, opset):
    """``(A - a's zero point) @ (B - b's)``, in float (ONNX's int32: exact while the sums stay under 2^24)."""
    return _less_zero(tensor(v[0]), v[2] if len(v) > 2 else None) @ _integer_weights(v, a, lambda z: z)


def conv_integer(v, a, opset):
    """A convolution of ``x - x's zero point`` by ``w - w's`` (one per output channel, or one), in float."""
    dims = tensor(v[1]).dim()
    per_channel = lambda z: z.reshape(-1, *[1] * (dims - 1)) if z.numel() > 1 else z.reshape(())
    return conv([_less_zero(tensor(v[0]), v[2] if len(v) > 2 else None), _integer_weights(v, a, per_channel)],
                a, opset)


def pad(v, a, opset):
    x = v[0]
    mode = a.get("mode", "constant")
    if opset < 11:
        pads, value = list(a["pads"]), a.get("value", 0.0)
    else:
        pads = ints(v[1])
        value = float(v[2].reshape(-1)[0]) if len(v) > 2 and v[2] is not None and v[2].numel() else 0.0
    if len(v) > 3 and v[3] is not None:
        raise ValueError("Pad with axes is not supported")
    nd = len(pads) // 2
    spec = []
    for b, e in zip(reversed(pads[:nd]), reversed(pads[nd:])):
        spec += [b, e]
    while len(spec) >= 2 and spec[-2:] == [0, 0]:  # torch's reflect/replicate pad only the last axes
        spec = spec[:-2]
    return F.pad(x, spec, mode={"edge": "replicate", "wrap": "circular"}.get(mode, mode),
                 value=value if mode == "constant" else None)


def reduce(fn: Callable, axes_input_since: int):
    def run(v, a, opset):
        x = v[0]
        axes = _axes(a, v, opset, axes_input_since)
        keep = bool(a.get("keepdims", 1))
        if axes is None or not axes:
            if axes is not None and a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [d % x.dim() for d in axes], keep)
    return run


def _amax(x, dims, keep):
    return x.amax(dim=dims, keepdim=keep)


def _amin(x, dims, keep):
    return x.amin(dim=dims, keepdim=keep)


def resize(v, a, opset):
    """What torch's ``F.interpolate`` exports: nearest (asymmetric, floor), (bi/tri)linear and bicubic (half-pixel,
    or align corners), by output sizes or scales; other sampling rules are refused by name."""
    x = v[0]
    mode, where_, nearest = (a.get(k, d) for k, d in (("mode", "nearest"), (
        "coordinate_transformation_mode", "half_pixel"), ("nearest_mode", "round_prefer_floor")))
    sizes = ints(v[3]) if len(v) > 3 and v[3] is not None and tensor(v[3]).numel() else None
    scales = [float(f) for f in numbers(tensor(v[2]))] if len(v) > 2 and v[2] is not None and tensor(v[2]).numel() else None
    if opset < 11 or (sizes is None and scales is None) or a.get("antialias", 0):
        raise ValueError("Resize before opset 11, without sizes or scales, or with antialias is not supported")
    # sizes name the batch too: stored as the batch size a fixed-batch graph was exported at, it means "the batch"
    batch_ok = sizes is not None and sizes[0] in (x.shape[0], a.get("_fixed_batch"))
    if sizes is not None and (not batch_ok or sizes[1] != x.shape[1]) or scales is not None and scales[:2] != [1.0, 1.0]:
        raise ValueError("Resize of the batch or channel axis is not supported")
    spatial = {"size": [int(s) for s in sizes[2:]]} if sizes is not None else {"scale_factor": scales[2:]}
    if mode == "nearest" and where_ == "asymmetric" and nearest == "floor":
        return F.interpolate(x, mode="nearest", **spatial)
    if mode == "linear" and where_ in ("half_pixel", "pytorch_half_pixel", "align_corners") and 3 <= x.dim() <= 5:
        kind = ("linear", "bilinear", "trilinear")[x.dim() - 3]
        return F.interpolate(x, mode=kind, align_corners=where_ == "align_corners", **spatial)
    if (mode == "cubic" and where_ in ("half_pixel", "pytorch_half_pixel", "align_corners") and x.dim() == 4
            and a.get("cubic_coeff_a", -0.75) == -0.75 and not a.get("exclude_outside", 0)):  # torch's bicubic
        return F.interpolate(x, mode="bicubic", align_corners=where_ == "align_corners", **spatial)
    raise ValueError(f"Resize with mode {mode}, coordinate_transformation_mode {where_}, nearest_mode {nearest} is "
                     "not supported (torch's nearest, linear and bicubic ones are)")


def lrn(v, a, opset):
    """Local response normalisation across channels (AlexNet's, GoogLeNet's): each value over the sum of squares
    of the ``size`` channels around it, ONNX's window (floor((size-1)/2) before, the rest after)."""
    x, size = v[0], a["size"]
    alpha, beta, bias = a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    before = (size - 1) // 2
    squares = F.pad((x * x).reshape(x.shape[0], 1, x.shape[1], -1), (0, 0, before, size - 1 - before))
    window_sums = F.avg_pool2d(squares, (size, 1), stride=1) * size
    return x / (bias + alpha / size * window_sums.reshape(x.shape)) ** beta


def range_(v, a, opset):
    """``Range``: a graph's positions counted from a size (a sequence's length)."""
    bounds = [tensor(t) for t in v[:3]]
    if torch.jit.is_tracing():  # the bounds as tensors: traced (the box's export), a count from the batch stays free
        start, limit, delta = (t.reshape(()) for t in bounds)
        return torch.arange(start, limit, delta, dtype=start.dtype, device=start.device)
    # else as numbers (sizes and stored bounds are on the host): a GPU's would be read back (OnnxModule moves it)
    return torch.arange(*(numbers(t)[0] for t in bounds), dtype=bounds[0].dtype)


def arg(fn: Callable):
    def run(v, a, opset):
        x, axis, keep = v[0], a.get("axis", 0), bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):  # the last of equal values: the first of the reversed axis
            n = x.shape[axis]
            return n - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        return fn(x, dim=axis, keepdim=keep)
    return run


def scatter_nd(v, a, opset):
    """``ScatterND``: ``updates`` written into a copy of the data at ``indices`` (in-place slice assignment,
    ``x[:, 0] = y``, as the TorchScript exporter writes it); accumulating reductions are refused."""
    if a.get("reduction", "none") != "none":
        raise ValueError(f"ScatterND with reduction {a['reduction']} is not supported")
    x, indices, updates = v
    out = x.clone()
    out[tuple(indices.to(x.device).long().unbind(-1))] = updates
    return out


def scatter_elements(v, a, opset):
    if a.get("reduction", "none") != "none":
        raise ValueError(f"ScatterElements with reduction {a['reduction']} is not supported")
    x, updates, axis = v[0], v[2], a.get("axis", 0)
    return torch.scatter(x, axis, _from_start(tensor(v[1]).to(x.device).long(), x.shape[axis]), updates)


def gather_elements(v, a, opset):
    x, axis = v[0], a.get("axis", 0)
    return torch.gather(x, axis, _from_start(tensor(v[1]).to(x.device).long(), x.shape[axis]))


def _reduce_prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


def cumsum(v, a, opset):
    """Running sums along an axis; ``exclusive`` starts each from 0, ``reverse`` runs from the axis's end."""
    x, axis = v[0], ints(v[1])[0] % v[0].dim()
    reverse = a.get("reverse", 0)
    if reverse:
        x = x.flip(axis)
    out = torch.cumsum(x, axis)
    if a.get("exclusive", 0):  # shifted by one, as ONNX Runtime sums (a subtraction would round otherwise)
        out = torch.cat([torch.zeros_like(out.narrow(axis, 0, 1)), out.narrow(axis, 0, out.shape[axis] - 1)], axis)
    return out.flip(axis) if reverse else out


def trilu(v, a, opset):
    """The upper (or lower) triangle of the last two axes from diagonal ``k``: a causal attention mask."""
    k = ints(v[1])[0] if len(v) > 1 and v[1] is not None else 0
    return torch.triu(v[0], k) if a.get("upper", 1) else torch.tril(v[0], k)


def grid_sample(v, a, opset):
    """Sampling at a grid of points (a spatial transformer): bilinear, nearest or bicubic, as ``F.grid_sample``."""
    mode = a.get("mode", "bilinear" if opset < 20 else "linear")
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode)
    return F.grid_sample(v[0], v[1].to(v[0].dtype), mode=mode, padding_mode=a.get("padding_mode", "zeros"),
                         align_corners=bool(a.get("align_corners", 0)))


def gather_nd(v, a, opset):
    """``x`` at the index tuples of the last axis of ``indices``, after ``batch_dims`` leading axes both share
    (what the dynamo exporter writes for ``x[:, :, [0, 2, 1]]``)."""
    x, index, b = v[0], tensor(v[1]).to(v[0].device).long(), a.get("batch_dims", 0)
    parts = [torch.where(i < 0, i + n, i) for i, n in zip(index.unbind(-1), x.shape[b:])]
    if b == 0:
        return x[tuple(parts)]
    lead = x.shape[:b]
    flat, parts = x.reshape(-1, *x.shape[b:]), [p.reshape(-1, *p.shape[b:]) for p in parts]
    rows = torch.arange(flat.shape[0], device=x.device).reshape(-1, *[1] * (parts[0].dim() - 1))
    out = flat[(rows.expand(parts[0].shape), *parts)]
    return out.reshape(*lead, *out.shape[1:])


def is_inf(v, a, opset):
    x = v[0]  # (isinf and a sign: torch.isposinf has no ONNX export, and a box exports the graph again)
    inf = torch.isinf(x)
    if not a.get("detect_positive", 1):
        inf = inf & (x < 0)
    if not a.get("detect_negative", 1):
        inf = inf & (x > 0)
    return inf


def _hyperbolic(fn: Callable, exported: Callable):
    """``fn``, or where a box's export traces it (torch has no ONNX export of the hyperbolic functions) the same
    function in exponentials and logarithms."""
    return lambda v, a, o: exported(v[0]) if torch.jit.is_tracing() else fn(v[0])


def where(v, a, opset):
    if any(isinstance(t, Dims) for t in v):  # a shape chosen size by size (exports of expand(-1, ...))
        n = max(len(ints(t)) for t in v)
        cond, x, y = ([*ints(t)] * (n if len(ints(t)) == 1 else 1) for t in v)
        return Dims.of([p if c else q for c, p, q in zip(cond, x, y)])
    return torch.where(v[0], v[1], v[2])


def dropout(v, a, opset):
    return v[0]


def scaler(v, a, opset):
    """ai.onnx.ml's Scaler, (x - offset) * scale in float (skl2onnx's StandardScaler in a pipeline before a network),
    its attributes given as stored inputs (``OnnxModule``): one offset and scale for every value, or one per
    feature, the i-th value by the (i mod features)-th as ONNX Runtime reads them (features: axis 1, or axis 0 of a
    vector)."""
    x, offset, scale = v[0].float(), v[1], v[2]
    features = x.shape[0] if x.dim() == 1 else x.shape[1] if x.dim() else 0
    if len(offset) != len(scale) or len(scale) not in (1, features):
        raise ValueError(f"a Scaler of {len(offset)} offsets and {len(scale)} scales for {features} features")
    if len(scale) > 1 and x.dim() > 2:  # (the (i mod features)-th: rows of that many)
        return ((x.reshape(-1, features) - offset) * scale).reshape(x.shape)
    return (x - offset) * scale


# Float lists an operator computes with, kept in its attributes: given to it as stored inputs (OnnxModule), moved
# with the module as its weights are (one made at each forward would be copied to a GPU, waiting for it, each time).
STORED_ATTRIBUTES = {"ai.onnx.ml.Scaler": ("offset", "scale")}


def identity(v, a, opset):
    return v[0]


def einsum(v, a, opset):
    return torch.einsum(a["equation"], *v)


def _unary(fn: Callable):
    return lambda v, a, opset: fn(v[0])


# The operators that take sizes (:class:`Dims`) as they are; any other is given them as a tensor.
ON_DIMS = frozenset({"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Reshape", "Expand",
                     "ConstantOfShape", "Add", "Sub", "Mul", "Div", "Mod", "Equal", "Greater", "Less", "GreaterOrEqual",
                     "LessOrEqual", "And", "Or", "Where", "Identity", "Resize", "Tile", "Range"})

# --------------------------------------------------------------------------- recurrent layers
def _rnn_activation(name: str, alphas: list, betas: list) -> Callable[[Tensor], Tensor]:
    """One of ONNX's recurrent activations by name; one with parameters takes the next of ``activation_alpha`` /
    ``activation_beta`` (or ONNX's default), as ONNX Runtime reads them."""
    def take(values: list, default: float | None) -> float:
        if values:
            return values.pop(0)
        if default is None:
            raise ValueError(f"recurrent activation {name} needs activation_alpha and activation_beta")
        return default

    n = name.lower()
    simple = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "softsign": F.softsign,
              "softplus": F.softplus}
    if n in simple:
        return simple[n]
    if n == "leakyrelu":
        alpha = take(alphas, 0.01)
        return lambda x: F.leaky_relu(x, alpha)
    if n == "thresholdedrelu":
        alpha = take(alphas, 1.0)
        return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))
    if n == "elu":
        alpha = take(alphas, 1.0)
        return lambda x: F.elu(x, alpha)
    if n == "hardsigmoid":
        alpha, beta = take(alphas, 0.2), take(betas, 0.5)
        return lambda x: torch.clamp(alpha * x + beta, 0, 1)
    if n == "affine":
        alpha, beta = take(alphas, None), take(betas, None)
        return lambda x: alpha * x + beta
    if n == "scaledtanh":
        alpha, beta = take(alphas, None), take(betas, None)
        return lambda x: alpha * torch.tanh(beta * x)
    raise ValueError(f"recurrent activation {name!r} is not supported")


def recurrent(kind: str) -> Callable:
    """ONNX's ``RNN``, ``GRU`` and ``LSTM`` (what torch's and tf2onnx's exporters write for ``nn.RNN``, ``nn.GRU``,
    ``nn.LSTM`` and Keras' layers), unrolled over the sequence with torch operators: gates in ONNX's order (GRU
    z r h, LSTM i o f c), one or both directions, ``layout`` 0 (sequence first) or 1 (batch first), initial
    states, ``clip``, LSTM peepholes and ``input_forget``, GRU's ``linear_before_reset``, and ``sequence_lens``:
    a shorter sequence's state stops at its last step, its outputs past it are zero, and the reverse direction
    starts at its last step. Outputs Y, Y_h (and LSTM's Y_c)."""
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    defaults = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}[kind]

    def run(v, a, opset):
        x, w, r = v[0], v[1], v[2]
        b, lens = (v[3] if len(v) > 3 else None), (v[4] if len(v) > 4 else None)
        h0, c0 = (v[5] if len(v) > 5 else None), (v[6] if len(v) > 6 else None)
        peep = v[7] if len(v) > 7 else None
        batch_first = a.get("layout", 0) == 1
        if batch_first:
            x = x.transpose(0, 1)
            h0 = None if h0 is None else h0.transpose(0, 1)
            c0 = None if c0 is None else c0.transpose(0, 1)
        steps, n = x.shape[0], x.shape[1]
        hidden = a.get("hidden_size", r.shape[-1])
        direction = a.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("forward", "reverse", "bidirectional"):
            raise ValueError(f"{kind} direction {direction!r} is not one ONNX defines")
        dirs = 2 if direction == "bidirectional" else 1
        names = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", defaults * dirs)]
        alphas, betas = list(a.get("activation_alpha", [])), list(a.get("activation_beta", []))
        per_dir = len(defaults)
        acts = [[_rnn_activation(names[d * per_dir + i], alphas, betas) for i in range(per_dir)] for d in range(dirs)]
        clip = a.get("clip")
        clipped = (lambda t: t.clamp(-clip, clip)) if clip is not None else (lambda t: t)
        if lens is not None:  # (N,) steps per sequence: a mask per step, never read back
            lens = lens.to(x.device, torch.int64)
            t_index = torch.arange(steps, device=x.device)[:, None]
            live = (t_index < lens[None, :]).to(x.dtype)[..., None]  # (T, N, 1)
        ys, last_h, last_c = [], [], []
        for d in range(dirs):
            reverse = direction == "reverse" or d == 1
            f, g, h_act = (acts[d] + [None, None])[:3]
            wd, rd = w[d], r[d]
            wb = b[d, :gates * hidden] if b is not None else None
            rb = b[d, gates * hidden:] if b is not None else None
            h = h0[d] if h0 is not None else x.new_zeros(n, hidden)
            c = (c0[d] if c0 is not None else x.new_zeros(n, hidden)) if kind == "LSTM" else None
            seq = x
            if reverse:  # each sequence backwards from its own last step (the rest, past it, stays masked)
                if lens is None:
                    seq = x.flip(0)
                else:
                    order = torch.where(t_index < lens[None, :], lens[None, :] - 1 - t_index, t_index)  # (T, N)
                    seq = x.gather(0, order[..., None].expand(-1, -1, x.shape[2]))
            projected = seq @ wd.T + (wb if wb is not None else 0)  # every step's input term at once
            outs = []
            for t in range(steps):
                xt = projected[t]
                hr = h @ rd.T
                if kind == "RNN":
                    new_h = f(clipped(xt + hr + (rb if rb is not None else 0)))
                    new_c = None
                elif kind == "GRU":
                    xz, xr, xh = xt.split(hidden, dim=1)
                    rbz, rbr, rbh = rb.split(hidden) if rb is not None else (0, 0, 0)
                    rz, rr, rh = rd.split(hidden, dim=0)
                    z = f(clipped(xz + h @ rz.T + rbz))
                    rt = f(clipped(xr + h @ rr.T + rbr))
                    if a.get("linear_before_reset", 0):
                        candidate = g(clipped(xh + rt * (h @ rh.T + rbh)))
                    else:
                        candidate = g(clipped(xh + (rt * h) @ rh.T + rbh))
                    new_h, new_c = (1 - z) * candidate + z * h, None
                else:
                    pre = xt + hr + (rb if rb is not None else 0)
                    pi, po, pf, pc = pre.split(hidden, dim=1)
                    if peep is not None:
                        p_i, p_o, p_f = peep[d].split(hidden)
                        pi, pf = pi + p_i * c, pf + p_f * c
                    i_gate = f(clipped(pi))
                    f_gate = 1 - i_gate if a.get("input_forget", 0) else f(clipped(pf))
                    new_c = f_gate * c + i_gate * g(clipped(pc))
                    if peep is not None:
                        po = po + p_o * new_c
                    new_h = f(clipped(po)) * h_act(new_c)
                if lens is not None:  # past a sequence's end its state stays, its output is zero
                    m = live[t]
                    new_h = m * new_h + (1 - m) * h
                    new_c = None if new_c is None else m * new_c + (1 - m) * c
                    outs.append(m * new_h)
                else:
                    outs.append(new_h)
                h, c = new_h, new_c
            y = torch.stack(outs)  # (T, N, H), in the order processed
            if reverse:
                y = y.flip(0) if lens is None else y.gather(0, order[..., None].expand(-1, -1, hidden))
            ys.append(y)
            last_h.append(h)
            last_c.append(c)
        y, y_h = torch.stack(ys, dim=1), torch.stack(last_h)  # (T, D, N, H), (D, N, H)
        y_c = torch.stack(last_c) if kind == "LSTM" else None
        if batch_first:
            y, y_h = y.permute(2, 0, 1, 3), y_h.transpose(0, 1)
            y_c = None if y_c is None else y_c.transpose(0, 1)
        return (y, y_h, y_c) if kind == "LSTM" else (y, y_h)

    return run


OPS: dict[str, Callable] = {
    "Conv": conv, "ConvTranspose": conv_transpose, "DepthToSpace": depth_to_space, "SpaceToDepth": space_to_depth,
    "MaxPool": pool("MaxPool"), "AveragePool": pool("AveragePool"),
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "BatchNormalization": batch_norm, "InstanceNormalization": instance_norm, "LayerNormalization": layer_norm,
    "GroupNormalization": group_norm, "RMSNormalization": rms_norm, "SimplifiedLayerNormalization": simplified_layer_norm,
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "LeakyRelu": lambda v, a, o: F.leaky_relu(v[0], a.get("alpha", 0.01)),
    "Elu": lambda v, a, o: F.elu(v[0], a.get("alpha", 1.0)),
    "Selu": lambda v, a, o: a.get("gamma", 1.0507009873554805) * torch.where(
        v[0] > 0, v[0], a.get("alpha", 1.6732632423543772) * torch.expm1(v[0])),
    "PRelu": lambda v, a, o: torch.where(v[0] >= 0, v[0], v[0] * v[1]),
    "Softplus": _unary(F.softplus), "Softsign": _unary(F.softsign),
    "HardSigmoid": lambda v, a, o: torch.clamp(a.get("alpha", 0.2) * v[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": _unary(F.hardswish), "Mish": _unary(F.mish), "Gelu": gelu, "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt), "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos), "Tan": _unary(torch.tan),
    "Asin": _unary(torch.asin), "Acos": _unary(torch.acos), "Atan": _unary(torch.atan), "Sinh": _hyperbolic(torch.sinh, lambda x: (x.exp() - (-x).exp()) / 2),
    "Cosh": _hyperbolic(torch.cosh, lambda x: (x.exp() + (-x).exp()) / 2),
    "Asinh": _hyperbolic(torch.asinh, lambda x: x.sign() * (x.abs() + (x * x + 1).sqrt()).log()),
    "Acosh": _hyperbolic(torch.acosh, lambda x: (x + (x * x - 1).sqrt()).log()),
    "Atanh": _hyperbolic(torch.atanh, lambda x: ((1 + x) / (1 - x)).log() / 2), "IsNaN": _unary(torch.isnan), "IsInf": is_inf, "Clip": clip,
    "CumSum": cumsum, "Trilu": trilu, "GridSample": grid_sample, "GatherND": gather_nd,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Add": _binary(lambda x, y: x + y), "Sub": _binary(lambda x, y: x - y), "Mul": _binary(lambda x, y: x * y),
    "Div": _binary(_div), "Mod": _binary(lambda x, y: x % y), "Pow": _binary(lambda x, y: x ** y),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Mean": lambda v, a, o: _variadic(torch.add)(v, a, o) / len(v),
    "Greater": _binary(lambda x, y: x > y), "Less": _binary(lambda x, y: x < y),
    "Equal": _binary(lambda x, y: x == y), "Where": where,
    "GreaterOrEqual": _binary(lambda x, y: x >= y), "LessOrEqual": _binary(lambda x, y: x <= y),
    "Not": _unary(torch.logical_not), "And": _binary(lambda x, y: x & y), "Or": _binary(lambda x, y: x | y),
    "Xor": _binary(lambda x, y: x ^ y), "Sign": _unary(torch.sign), "Round": _unary(torch.round),
    "LRN": lrn, "Range": range_, "ArgMax": arg(torch.argmax), "ArgMin": arg(torch.argmin),
    "Celu": lambda v, a, o: F.celu(v[0], a.get("alpha", 1.0)),
    "ThresholdedRelu": lambda v, a, o: torch.where(v[0] > a.get("alpha", 1.0), v[0], torch.zeros_like(v[0])),
    "CastLike": lambda v, a, o: v[0].to(v[1].dtype), "ScatterND": scatter_nd, "ScatterElements": scatter_elements,
    "GatherElements": gather_elements,
    "Size": lambda v, a, o: torch.tensor(v[0].numel(), dtype=torch.int64),
    "Gemm": gemm, "MatMul": _binary(torch.matmul), "Einsum": einsum,
    "ReduceMean": reduce(lambda x, d, k: x.mean(dim=d, keepdim=k), 18),
    "ReduceSum": reduce(lambda x, d, k: x.sum(dim=d, keepdim=k), 13),
    "ReduceMax": reduce(_amax, 18), "ReduceMin": reduce(_amin, 18),
    "ReduceL2": reduce(lambda x, d, k: x.square().sum(dim=d, keepdim=k).sqrt(), 18),
    "ReduceL1": reduce(lambda x, d, k: x.abs().sum(dim=d, keepdim=k), 18),
    "ReduceSumSquare": reduce(lambda x, d, k: x.square().sum(dim=d, keepdim=k), 18),
    "ReduceLogSumExp": reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k), 18),
    "ReduceProd": reduce(_reduce_prod, 18),
    "Shape": shape, "Reshape": reshape, "Flatten": flatten, "Unsqueeze": unsqueeze, "Squeeze": squeeze,
    "Concat": concat, "Gather": gather, "Slice": slice_, "Split": split, "Transpose": transpose, "Expand": expand,
    "ConstantOfShape": constant_of_shape, "QuantizeLinear": quantize_linear, "DequantizeLinear": dequantize_linear,
    "DynamicQuantizeLinear": dynamic_quantize_linear, "MatMulInteger": matmul_integer, "ConvInteger": conv_integer,
    "Cast": cast, "Pad": pad, "Identity": identity, "Dropout": dropout, "ai.onnx.ml.Scaler": scaler,
    "Resize": resize, "Tile": lambda v, a, o: v[0].repeat(*ints(v[1])),
    "RNN": recurrent("RNN"), "GRU": recurrent("GRU"), "LSTM": recurrent("LSTM"),
}
