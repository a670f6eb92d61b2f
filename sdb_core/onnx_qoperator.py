"""A quantized graph in ONNX Runtime's QOperator form, rewritten into the QDQ form :mod:`sdb_core.onnx_torch` reads.

``quantize_static(..., quant_format=QuantFormat.QOperator)`` writes integer operators (``QLinearConv``,
``QLinearMatMul``, and ONNX Runtime's ``com.microsoft`` ``QGemm``, ``QLinearAdd``, ``QLinearMul``,
``QLinearConcat``, ``QLinearGlobalAveragePool``, ``QLinearAveragePool``, ``QLinearLeakyRelu``,
``QLinearSigmoid``, ``QLinearSoftmax``) between a ``QuantizeLinear`` of the input and a ``DequantizeLinear`` of
the logits. Each computes its float operator on its dequantized inputs and quantizes the result, so each is
rewritten as exactly that: a ``DequantizeLinear`` per quantized input, the float operator, a ``QuantizeLinear``
of its output. The graph is then the QDQ graph ``quantize_static`` writes by default, and everything that reads
one applies: integer weights stored as floats that train (``fold``), activations rounded with a straight-through
gradient, released in the box's copy (:func:`sdb_core.onnx_torch.float_activations`).

The rewrite reads the graph and multiplies stored scales (a bias's scale is its input's times its weight's);
nothing of the graph runs. The operators between two quantized ones (``MaxPool``, ``Flatten``, ``Reshape``, …)
run on the integer levels as ONNX Runtime runs them.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

MS = "com.microsoft"
# (operator, domain) → the float operator it computes; the layout of its inputs is the rewrite's (below).
FLOAT_OF = {("QLinearConv", ""): "Conv", ("QLinearMatMul", ""): "MatMul", ("QGemm", MS): "Gemm",
            ("QLinearAdd", MS): "Add", ("QLinearMul", MS): "Mul", ("QLinearConcat", MS): "Concat",
            ("QLinearGlobalAveragePool", MS): "GlobalAveragePool", ("QLinearAveragePool", MS): "AveragePool",
            ("QLinearLeakyRelu", MS): "LeakyRelu", ("QLinearSigmoid", MS): "Sigmoid",
            ("QLinearSoftmax", MS): "Softmax"}


def is_qoperator(g) -> bool:
    return any((n.op_type, n.domain if n.domain != "ai.onnx" else "") in FLOAT_OF for n in g.node)


def as_qdq(g) -> None:
    """Rewrite ``g``'s QOperator nodes (:data:`FLOAT_OF`) in place, each into DequantizeLinear → its float operator
    → QuantizeLinear; ValueError, in words, for a form of one that is not read (channels last, a scale computed in
    the graph where a bias needs it stored)."""
    from onnx import helper, numpy_helper

    stored = {t.name: t for t in g.initializer}
    fresh = itertools.count()
    nodes: list = []

    def new(base: str) -> str:
        return f"{base}/qdq{next(fresh)}"

    def dq(x: str, scale: str, zero: str = "", axis: int | None = None) -> str:
        out = new(x)
        nodes.append(helper.make_node("DequantizeLinear", [x, scale, *([zero] if zero else [])], [out],
                                      **({} if axis is None else {"axis": axis})))
        return out

    def value(name: str, what: str, where: str) -> np.ndarray:
        if name not in stored:
            raise ValueError(f"node {where}: {what} is computed in the graph; a quantized bias needs it stored")
        return numpy_helper.to_array(stored[name])

    def bias(b: str, scales: list[str], where: str, factor: float = 1.0) -> str:
        """An int32 bias, quantized at the product of its operator's input scales (zero point 0), as float."""
        product = np.float32(factor)
        for s in scales:
            product = product * value(s, f"scale {s!r}", where).astype(np.float32)
        name = new(f"{b}_scale")
        g.initializer.append(numpy_helper.from_array(np.asarray(product, np.float32), name))
        stored[name] = g.initializer[-1]
        return dq(b, name, axis=0 if product.size > 1 else None)

    def weight_axis(w: str, scale: str, axis: int) -> int | None:
        """The axis a per-channel weight's scales run along (None: one scale; a DequantizeLinear before opset 13
        has no axis)."""
        if scale in stored and int(np.prod(stored[scale].dims)) <= 1:
            return None
        return axis % len(stored[w].dims) if w in stored and stored[w].dims else axis

    def rewrite(n, attrs: dict, add: Callable[..., str]) -> None:
        ins = list(n.input) + [""] * 9
        op = n.op_type
        if attrs.pop("channels_last", 0):
            raise ValueError(f"node {n.name or op} ({op}): channels-last {op} is not supported; quantize the "
                             "channels-first graph")
        if op == "QLinearConv":
            x, xs, xz, w, ws, wz, ys, yz, b = ins[:9]
            operands = [dq(x, xs, xz), dq(w, ws, wz, weight_axis(w, ws, 0))] + ([bias(b, [xs, ws], n.name or op)] if b else [])
            out = add("Conv", operands, attrs)
        elif op == "QLinearMatMul":
            a, a_s, az, w, ws, wz, ys, yz = ins[:8]
            out = add("MatMul", [dq(a, a_s, az), dq(w, ws, wz, weight_axis(w, ws, -1))], {})
        elif op == "QGemm":  # Y = alpha·A'B' + C, C stored at alpha·a_scale·b_scale; without y_scale, float out
            a, a_s, az, w, ws, wz, c, ys, yz = ins[:9]
            alpha = float(attrs.get("alpha", 1.0))
            operands = [dq(a, a_s, az), dq(w, ws, wz, weight_axis(w, ws, 0 if attrs.get("transB", 0) else 1))]
            if c:
                operands.append(bias(c, [a_s, ws], n.name or op, alpha))
            out = add("Gemm", operands, {**attrs, "beta": 1.0})
        elif op == "QLinearConcat":  # Y_scale, Y_zero_point, then each input's (X, scale, zero point)
            ys, yz = ins[0], ins[1]
            triples = list(n.input[2:])
            out = add("Concat", [dq(*triples[i:i + 3]) for i in range(0, len(triples), 3)], attrs)
        elif op in ("QLinearAdd", "QLinearMul"):
            a, a_s, az, b, bs, bz, ys, yz = ins[:8]
            out = add(FLOAT_OF[op, MS], [dq(a, a_s, az), dq(b, bs, bz)], {})
        else:  # one quantized input: X, X_scale, X_zero_point, Y_scale, Y_zero_point
            x, xs, xz, ys, yz = ins[:5]
            if op == "QLinearSoftmax" and attrs.pop("opset", 13) < 13 and attrs.get("axis", -1) != -1:
                raise ValueError(f"node {n.name or op} (QLinearSoftmax): a softmax over the axes from "
                                 f"{attrs['axis']} on (opset < 13) is not supported")
            out = add(FLOAT_OF[op, MS], [dq(x, xs, xz)], attrs)
        if ys:
            nodes.append(helper.make_node("QuantizeLinear", [out, ys, *([yz] if yz else [])], [n.output[0]]))
        else:
            nodes.append(helper.make_node("Identity", [out], [n.output[0]]))

    for n in list(g.node):
        domain = n.domain if n.domain != "ai.onnx" else ""
        if (n.op_type, domain) not in FLOAT_OF:
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}

        def add(op: str, operands: list[str], attributes: dict, n=n) -> str:
            out = new(n.output[0])
            nodes.append(helper.make_node(op, operands, [out], name=n.name, **attributes))
            return out

        rewrite(n, attrs, add)
    del g.node[:]
    g.node.extend(nodes)


def standard_form(model: bytes) -> bytes | None:
    """A QOperator model (:func:`is_qoperator`) as the QDQ graph of standard ONNX operators it computes, serialised;
    None when ``model`` is not one, or holds other operators of ONNX Runtime's domain. What the service stores of
    an uploaded quantized teacher, so that its jobs run standard operators only (ONNX Runtime fuses the pairs
    back into its integer kernels). ValueError, in words, for a form not read (:func:`as_qdq`), and for a graph
    below opset 13, whose DequantizeLinear has no per-channel axis."""
    import onnx

    m = onnx.load_from_string(model)
    if not is_qoperator(m.graph):
        return None
    as_qdq(m.graph)
    if any(n.domain not in ("", "ai.onnx") for n in m.graph.node):
        return None
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < 13 and any(a.name == "axis" for n in m.graph.node if n.op_type == "DequantizeLinear"
                          for a in n.attribute):
        raise ValueError(f"a per-channel quantization at opset {opset}: its standard form needs opset 13 or later "
                         "(quantize the float model exported at opset 13+)")
    kept = [o for o in m.opset_import if o.domain != MS]
    del m.opset_import[:]
    m.opset_import.extend(kept)
    return m.SerializeToString()
