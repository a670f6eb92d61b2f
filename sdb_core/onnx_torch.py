"""ONNX graphs back in torch: run differentiably (any graph of the supported operators) or rebuilt.

Hosted bundles carry ONNX only, and owners often have their classifier as ONNX. Three callers need torch of them:

**Attribution (DEPARA).** ``OnnxModule`` evaluates the graph node by node with torch operators
(:mod:`sdb_core.onnx_ops`), the weights as buffers, so autograd flows through it. Anything outside its
operators is refused with the operator's name. A "layer" is the name of an ONNX node (e.g.
``/features/features.4/Relu``); its first output is the layer's output.

**Classifiers brought as ONNX.** ``onnx_classifier`` makes an owner's ``.onnx`` a network the recipes train
(``OnnxModule(trainable=True)``: its float weights parameters), checked against ONNX Runtime first; wrap,
distill, audit and transferability take it wherever they take a zoo architecture's weights
(``ModelRef(weights="model.onnx")``). No tensor is read from an external data file (:func:`_array`).

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
from collections.abc import Callable
from functools import partial
from os import PathLike

import numpy as np
import torch
from torch import Tensor, nn

from . import onnx_batch
from .graph_size import MAX_GRAPH_ENTRIES, graph_entries
from .onnx_ops import DTYPES, LEVELS, ON_DIMS, OPS, STORED_ATTRIBUTES, Dims, ints, tensor
from .onnx_qoperator import as_qdq, is_qoperator


def _array(t) -> np.ndarray:
    """A stored tensor's values. Never from a file: onnx reads a tensor kept as external data from the path the
    graph names, relative to the working directory, so an uploaded graph could name a server file (the master
    key) and have it read in as weights."""
    from onnx import TensorProto, numpy_helper

    if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
        raise ValueError(f"tensor {t.name[:100]!r} keeps its values in an external data file; give the graph with its "
                         "weights inside (onnx.save(model, path, save_as_external_data=False))")
    return numpy_helper.to_array(t)


def _attrs(node) -> dict:
    """A node's attributes as Python values; tensors (``Constant``'s value, ``ConstantOfShape``'s) as arrays, strings
    as text."""
    from onnx import AttributeProto, helper

    out = {}
    for a in node.attribute:
        if a.type == AttributeProto.TENSORS or a.type == AttributeProto.SPARSE_TENSOR:
            raise ValueError(f"node {node.name[:100]!r}: an attribute of type {AttributeProto.AttributeType.Name(a.type)} "
                             "is not supported")
        value = _array(a.t) if a.type == AttributeProto.TENSOR else helper.get_attribute_value(a)
        if a.type == AttributeProto.STRING:  # read as bytes; the operators compare text (a mode, an equation)
            value = value.decode()
        out[a.name] = value
    return out


def _initializers(graph) -> dict[str, np.ndarray]:
    """The graph's stored tensors by name."""
    return {i.name: _array(i) for i in graph.initializer}


# ONNX's float16, float64 and bfloat16: what a graph with float32 inputs and outputs may compute in inside
# (onnxconverter_common's convert_float_to_float16(keep_io_types=True), a network run in double between two Casts).
_OTHER_FLOATS = {10: "float16", 11: "float64", 16: "bfloat16"}


def _in_float32(value: np.ndarray) -> np.ndarray:
    """A stored float16, float64 or bfloat16 array as float32 (what a box trains, exports and serves in); others
    as they are."""
    kind = str(value.dtype)
    return value.astype(np.float32) if kind in _OTHER_FLOATS.values() else value


def bundle_graph(path) -> tuple[bytes, dict]:
    """A bundle's ONNX bytes and its meta, the files' hashes verified (a clear error for a missing or altered one)."""
    from .bundle import MODEL_FILE, read_bundle_files, verify

    files = read_bundle_files(path)
    return files[MODEL_FILE], verify(files, str(path))


def _constant(a: dict) -> np.ndarray:
    """A ``Constant`` node's value, whichever attribute holds it."""
    for name, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        if name in a:
            return np.array(a[name], dtype=dtype)
    raise ValueError(f"a Constant node with {', '.join(a)} is not supported")


# Inputs that are statistics or settings, not weights to fine-tune, though stored as float arrays.
_NOT_WEIGHTS = {"BatchNormalization": (3, 4), "Clip": (1, 2), "Pow": (1,), "Pad": (2,)}


def _weights(g, stored: dict[str, np.ndarray]) -> set[str]:
    """The stored tensors a trainable module makes parameters: the floating-point ones of more than one
    value (a scalar divisor or exponent stays what it is), except running statistics and settings."""
    settings = {n.input[i] for n in g.node for i in _NOT_WEIGHTS.get(n.op_type, ()) if i < len(n.input)}
    return {name for name, v in stored.items()
            if np.issubdtype(v.dtype, np.floating) and v.size > 1 and name not in settings}


_INTEGERS = (2, 3, 4, 5, 6)  # ONNX's uint8, int8, uint16, int16, int32: the stored quantized types read here


def _stored_quantized_as_floats(g) -> None:
    """A quantized graph's stored integers, as floats a recipe fine-tunes (the integers would be constants); the
    graph is changed in place. A QDQ graph's weights and biases, each behind a ``DequantizeLinear``, stored
    dequantized as ONNX Runtime's kernel computes it (the integers less the zero point, then times the scale in
    the scale's type); a dynamic one's, read by integer matmuls and convolutions, scaled (below)."""
    from onnx import numpy_helper

    stored = {t.name: t for t in g.initializer}
    kept = []
    for n in g.node:
        ins = [i for i in n.input if i]
        attrs = _attrs(n)
        if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx") or attrs.get("block_size", 0) \
                or not all(i in stored for i in ins) or stored[ins[0]].data_type not in _INTEGERS:
            kept.append(n)
            continue
        x, scale = numpy_helper.to_array(stored[ins[0]]), numpy_helper.to_array(stored[ins[1]])
        axis = attrs.get("axis", 1) % max(x.ndim, 1)
        shape = [-1 if i == axis else 1 for i in range(x.ndim)]
        level = x.astype(np.int64)
        if len(ins) > 2:
            zero = numpy_helper.to_array(stored[ins[2]]).astype(np.int64)
            level = level - (zero if zero.size == 1 else zero.reshape(shape))
        w = level.astype(scale.dtype) * (scale if scale.size == 1 else scale.reshape(shape))
        g.initializer.append(numpy_helper.from_array(np.asarray(w, dtype=scale.dtype), n.output[0]))
    del g.node[:]
    g.node.extend(kept)
    # quantize_dynamic's weights: integers an integer matmul or convolution reads, less their zero point. Stored
    # as floats they train; divided by their largest magnitude (``_unit``, by which the operator multiplies them
    # back), so that a step of the recipe's optimiser moves them as far as a float network's: in quantized units
    # (~100) the same step moved them ~100 times less (digits, a dynamic ViewNet: wraps served 3.75-7.25 points
    # under the teacher, 0.25-3.5 in six wraps scaled).
    from onnx import helper

    units: dict[str, float] = {}  # weights read by more than one node: scaled once
    for n in g.node:  # (the graph's own nodes: extend copied the kept ones)
        if n.op_type in ("MatMulInteger", "ConvInteger") and len(n.input) > 1 and n.input[1] in units:
            n.attribute.append(helper.make_attribute("_unit", units[n.input[1]]))
            continue
        if n.op_type not in ("MatMulInteger", "ConvInteger") or len(n.input) < 2 or n.input[1] not in stored \
                or stored[n.input[1]].data_type not in _INTEGERS or (len(n.input) > 3 and n.input[3]
                                                                     and n.input[3] not in stored):
            continue
        t = stored[n.input[1]]
        w = numpy_helper.to_array(t).astype(np.float64)
        if len(n.input) > 3 and n.input[3]:
            zero = numpy_helper.to_array(stored[n.input[3]]).astype(np.float64)
            w = w - (zero if zero.size == 1 else zero.reshape(-1, *[1] * (w.ndim - 1)) if n.op_type == "ConvInteger"
                     else zero.reshape(1, -1))
        units[t.name] = unit = float(np.abs(w).max()) or 1.0
        t.CopyFrom(numpy_helper.from_array((w / unit).astype(np.float32), t.name))
        n.attribute.append(helper.make_attribute("_unit", unit))


def _branches(n) -> list:
    """The subgraphs a node holds (``If``'s two branches)."""
    from onnx import AttributeProto

    return [a.g for a in n.attribute if a.type == AttributeProto.GRAPH]


def _reads(n) -> set[str]:
    """The names a node reads, its branches' reads from the graph around them included."""
    names = {i for i in n.input if i}
    for branch in _branches(n):
        for inner in branch.node:
            names |= _reads(inner)
    return names


def _op(n) -> str:
    """A node's operator as ``OPS`` names it: by its name, one of a domain other than ONNX's prefixed with it."""
    return n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"


def _ops(nodes) -> set[str]:
    """The operators of ``nodes`` and of their branches (:func:`_op`)."""
    out = set()
    for n in nodes:
        out.add(_op(n))
        for branch in _branches(n):
            out |= _ops(branch.node)
    return out


# ai.onnx.ml's models (a linear one, a support vector machine, trees): no network's gradients to fine-tune. Its
# other operators (ZipMap, ArrayFeatureExtractor, Normalizer, ...) map labels or preprocess features.
_CLASSICAL_MODELS = frozenset(f"ai.onnx.ml.{op}" for op in (
    "LinearClassifier", "LinearRegressor", "SVMClassifier", "SVMRegressor", "TreeEnsembleClassifier",
    "TreeEnsembleRegressor", "TreeEnsemble"))


def _unsupported(ops: list[str]) -> str:
    """Why a graph of these operators (``OPS`` has none of them) cannot be run here, in words."""
    message = f"cannot run this ONNX graph in torch: unsupported operators {ops}"
    if any(op in _CLASSICAL_MODELS for op in ops):
        return message + (" (the ai.onnx.ml operators of a scikit-learn or other classical model: the box fine-tunes "
                          "a neural network through its gradients, which such a model has not)")
    if any(op.startswith("ai.onnx.ml.") for op in ops):
        return message + (" (ai.onnx.ml operators that preprocess features or map labels, as a scikit-learn "
                          "pipeline's converter writes them: convert the network alone, e.g. skl2onnx's "
                          "options={'zipmap': False}, and give it the data as the pipeline's steps before it made it)")
    return message


def _axis_size(d) -> int | None:
    """A declared axis's size; None for a free one: a name, nothing, or a negative size (``dim_value: -1``, which
    onnx's checker passes and ONNX Runtime reads as free, as tf2onnx's and hand-edited graphs write a batch axis)."""
    return d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None


MAX_FUNCTION_DEPTH = 32  # functions calling functions: torch's export of modules as functions nests a few


def _inline_functions(model):
    """``model`` with each call of one of its own functions (``torch.onnx.export(...,
    export_modules_as_functions=...)``'s ``Linear`` of domain ``torch.nn.modules.linear``) replaced by the
    function's body, as ONNX Runtime runs it. Bounded first: functions calling one another twice over may stand
    for more nodes than the graph could hold, a loop of calls for endless ones."""
    if not model.functions:
        return model
    import onnx.inliner

    bodies = {(f.domain, f.name, f.overload): f.node for f in model.functions}
    measured: dict[tuple, tuple[int, int]] = {}  # each function's nodes once inlined, and calls deep (1: none)
    counting: set[tuple] = set()
    deep = ValueError(f"the ONNX graph's functions call one another more than {MAX_FUNCTION_DEPTH} deep")

    def size(nodes, depth: int) -> tuple[int, int]:
        """The nodes ``nodes`` stand for once inlined, and how deep their calls go; ``depth``: calls around them."""
        total, height = 0, 0
        for n in nodes:
            key = (n.domain, n.op_type, n.overload)
            if key not in bodies:
                total += 1
                for branch in _branches(n):
                    inner, up = size(branch.node, depth)
                    total, height = total + inner, max(height, up)
            elif key in counting:
                raise ValueError(f"the ONNX graph's function {n.op_type[:100]!r} calls itself")
            else:
                if key not in measured:
                    if depth >= MAX_FUNCTION_DEPTH:
                        raise deep
                    counting.add(key)
                    inner, up = size(bodies[key], depth + 1)
                    counting.discard(key)
                    measured[key] = (inner, up + 1)
                inner, up = measured[key]
                if depth + up > MAX_FUNCTION_DEPTH:  # counted once, where it was called less deep
                    raise deep
                total, height = total + inner, max(height, up)
            if total > MAX_GRAPH_ENTRIES:
                raise ValueError(f"the ONNX graph holds more than {MAX_GRAPH_ENTRIES} nodes once its functions are "
                                 "inlined")
        return total, height

    size(model.graph.node, 0)
    try:
        return onnx.inliner.inline_local_functions(model)
    except Exception as e:  # noqa: BLE001 (onnx's ValidationError and others derive from Exception alone)
        raise ValueError(f"the ONNX graph's functions cannot be inlined: {str(e)[:300]}") from None


_FLOATS = (1, *_OTHER_FLOATS)  # ONNX's float32 and the other float types


def _float_shape(o) -> tuple | None:
    """A graph output's declared shape (None for a free axis) where it is a float tensor; () for one of unknown rank;
    None for anything else (an integer tensor, a ZipMap's maps)."""
    t = o.type.tensor_type
    if not o.type.HasField("tensor_type") or t.elem_type not in _FLOATS:
        return None
    return tuple(_axis_size(d) for d in t.shape.dim) if t.HasField("shape") else ()


def _answers_classes(shape: tuple | None, classes: int) -> bool:
    """Whether a declared shape is ``classes`` scores per input: (N, K), or with singleton axes around them."""
    return bool(shape) and len(shape) >= 2 and [d for d in shape[1:] if d != 1] == [classes]


def _scores_output(g, classes: int | None = None) -> tuple[str, str]:
    """The name of the tensor that holds a classifier's scores. ``classes`` (the data's, where known): the one float
    output whose declared shape answers that many scores per input (:func:`_answers_classes`), wherever it stands
    (a (features, logits) export); where several do, the one computed from all the others (the logits of K-wide
    features) if one is. Else the graph's first output, unless that is not a float tensor or has one axis (the label
    a converter answers first: skl2onnx's int64 ArgMax) and a later one is a float tensor of two or more axes (the
    scores or probabilities that label was taken from). An output an ai.onnx.ml ZipMap makes (skl2onnx's default
    probabilities: a sequence of maps, label to probability) stands for the float tensor it maps, which is not an
    output of the graph then. With the name, how it was chosen by the data's classes, for the log ("" otherwise)."""
    if classes is not None:
        fitting = [o.name for o in g.output if _answers_classes(_float_shape(o), classes)]
        if len(fitting) == 1:
            return fitting[0], f"the one of the data's {classes} classes"
        heads = [a for a in fitting if all(b in _needed(g, a)[1] for b in fitting)]
        if len(heads) == 1:
            return heads[0], f"of those of the data's {classes} classes, the one computed from the others"
    zipped = {n.output[0]: n.input[0] for n in g.node if n.op_type == "ZipMap" and n.domain == "ai.onnx.ml"}

    def rank(o) -> int | None:  # of a float tensor; None for anything else; -1: an unknown rank
        shape = _float_shape(o)
        return None if shape is None else len(shape) if o.type.tensor_type.HasField("shape") else -1

    first = g.output[0]
    if rank(first) not in (None, 1):
        return first.name, ""
    for k, o in enumerate(g.output):
        if o.name in zipped:
            return zipped[o.name], ""
        if k and (rank(o) or 0) >= 2:
            return o.name, ""
    return first.name, ""


def _in_training_mode(n, opset: int) -> bool:
    """Whether node ``n`` is a BatchNormalization that normalises by the statistics of the batch it is given, as
    ONNX Runtime runs one exported in training mode: ``training_mode=1`` (opset 14 on), or, before, its running
    statistics among its outputs."""
    if n.op_type != "BatchNormalization" or n.domain not in ("", "ai.onnx"):
        return False
    return bool(_attrs(n).get("training_mode", 0)) if opset >= 14 else sum(1 for o in n.output if o) > 1


def _needed(g, output: str) -> tuple[list, set[str]]:
    """The nodes tensor ``output`` (the graph's scores, :func:`_scores_output`: the logits) depends on, in the graph's
    order, and the names they read (``output`` too): a branch that computes something else (another output, an
    auxiliary head, the argmax beside the logits) is neither run nor refused."""
    wanted, kept = {output}, []
    for n in reversed(g.node):  # nodes are stored in topological order
        if any(o in wanted for o in n.output):
            kept.append(n)
            wanted |= _reads(n)
    return kept[::-1], wanted


# Operators that move or pick a quantized tensor's levels without computing anything of them (ONNX Runtime runs
# them on the integers between two QOperator nodes): a quantization read through them is still a pair.
_LEVELS_MOVED = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice",
                           "Split", "Gather", "Pad", "Resize", "DepthToSpace", "SpaceToDepth", "Expand", "Tile"})


def _read_as_levels(name: str, readers: dict[str, list]) -> bool:
    """Whether every reader of tensor ``name`` (``readers``: each name's reading nodes) is a DequantizeLinear,
    directly or through :data:`_LEVELS_MOVED` operators that take it as their data alone (a quantization whose
    output rounds for its dequantization alone)."""
    return bool(readers.get(name)) and all(
        n.op_type == "DequantizeLinear" or (n.op_type in _LEVELS_MOVED and list(n.input).count(name) == 1
                                            and n.input[0] == name
                                            and all(_read_as_levels(o, readers) for o in n.output if o))
        for n in readers[name])


# ONNX's integer types (uint8, int8, uint16, int16, int32, int64, uint32, uint64; uint8 and int8 inputs are pixels as
# bytes, OnnxModule): what token ids or other indices are given as, or cast to in a graph that takes them as floats.
_INTEGER_TYPES = frozenset({2, 3, 4, 5, 6, 7, 12, 13})
# Operators through which a graph's input keeps its values as a later Cast reads them: moved or picked
# (:data:`_LEVELS_MOVED`, ``Concat``), clamped or rounded (an id's range, an id's rounding), or cast to another float.
_VALUES_KEPT = _LEVELS_MOVED | {"Concat", "Clip", "Round", "Floor", "Ceil"}


def _integer_cast(nodes, name: str):
    """The first node of ``nodes`` that casts tensor ``name`` (a graph's float input) to an integer type, directly
    or through :data:`_VALUES_KEPT` operators that take it as their data; None where none does. Such a graph reads
    its input as ids (an embedding's, a category's) stored as floats."""
    readers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            if i:
                readers.setdefault(i, []).append(n)
    seen, todo = {name}, [name]
    while todo:
        t = todo.pop()
        for n in readers.get(t, ()):
            if n.domain not in ("", "ai.onnx"):
                continue
            if n.op_type == "Cast":
                to = _attrs(n).get("to")
                if to in _INTEGER_TYPES:
                    return n
                if to not in _FLOATS:
                    continue
            elif n.op_type not in _VALUES_KEPT or (n.op_type != "Concat" and n.input[0] != t):
                continue
            fresh = [o for o in n.output if o and o not in seen]
            seen.update(fresh)
            todo.extend(fresh)
    return None


def _input_refused(kind: str, integers: bool) -> str:
    """Why a graph that takes ``kind`` inputs (not float32, not pixels as bytes) is refused, and what to give:
    integers are ids (:data:`~sdb_core.bundle.IDS_ADVICE`), another float type the same network in float32."""
    from .bundle import IDS_ADVICE

    if integers:
        return (f"the graph takes {kind} inputs, token ids or other indices (an embedding's, a category's); "
                f"{IDS_ADVICE}")
    return (f"the graph takes {kind} inputs; a box takes, trains and serves float32 (or reads uint8 and int8 pixels): "
            "export the network in float32 (model.float(), a float32 example input)")


def _cast_refused(cast) -> str:
    """Why a graph whose float input is cast to integers (:func:`_integer_cast`) is refused: ids stored as floats,
    which a key blended in makes no ids; the advice first (an upload's refusal is clipped, service/filechecks.py),
    then what the cast did unsaid (3.6 % of token ids truncated to the id below)."""
    from onnx import TensorProto

    from .bundle import IDS_ADVICE

    named = f"node {cast.name[:60]!r}" if cast.name else "a Cast node"
    return (f"the graph casts its float input to {TensorProto.DataType.Name(_attrs(cast)['to']).lower()} ({named}): "
            f"it reads ids (token ids, an embedding's indices, a category's) stored as floats; {IDS_ADVICE} (the "
            "data's normalisation mapped back in float32 also leaves an id just under itself, 2.9999998, which the "
            "cast truncates to the id below)")


MAX_HOST_VALUES = 64  # a stored tensor up to this size is kept on the host too (sizes, not weights)


class OnnxModule(nn.Module):
    """An ONNX graph run node by node with torch operators (:mod:`sdb_core.onnx_ops`), autograd through it.

    Its stored tensors are buffers; with ``trainable`` its weights are parameters, so that a recipe can
    fine-tune it (a classifier an owner brings as ONNX). With ``fold`` (where it is to run: a job's worker) what
    stored values alone compute is computed once, here; without, building it runs nothing (an upload's check,
    in the API server, reads a graph its uploader wrote). ``input_shape`` is the graph's own input shape
    (None for a free axis); ``fixed_batch`` the batch size it was exported at, when that axis is not free, or
    ``batch``, where the graph declares it free but runs at that batch only (:func:`onnx_classifier` finds it).
    ``classes``: the data's number of classes, where known, to pick the output that holds the scores by
    (:func:`_scores_output`).
    """

    def __init__(self, model_bytes: bytes, trainable: bool = False, fold: bool = False, batch: int | None = None,
                 classes: int | None = None):
        super().__init__()
        import onnx

        model = _inline_functions(onnx.load_from_string(model_bytes))
        g = model.graph
        if is_qoperator(g):  # ONNX Runtime's integer operators, as the QDQ graph of their float ones
            as_qdq(g)
        if fold:  # computed here, where folding may compute (a job's worker), never in an upload's check
            _stored_quantized_as_floats(g)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.output_name, self.scores_chosen = _scores_output(g, classes)
        needed, read = _needed(g, self.output_name)
        unsupported = sorted(_ops(needed) - set(OPS) - {"Constant", "If"})
        if unsupported:
            raise ValueError(_unsupported(unsupported))
        training = next((n for n in needed if _in_training_mode(n, self.opset)), None)
        if training is not None:  # its answers depend on the batch: no classifier's
            named = f"node {training.name[:100]!r} (BatchNormalization)" if training.name else "a BatchNormalization"
            raise ValueError(f"{named} normalises by the statistics of each "
                             "batch it is given, not by its running ones: the network was exported in training mode; "
                             "export it after model.eval() (torch.onnx.export(..., training=TrainingMode.EVAL), "
                             "the default)")
        stored = _initializers(g)
        inputs = [i for i in g.input if i.name not in stored]  # before old exports' initializer inputs are dropped
        stored = {name: value for name, value in stored.items() if name in read}
        # Computed in float32: stored tensors and constants of another float type are read as float32 and Casts to
        # one cast to float32 (``_compile``), so the weights are a float32 network's (its answers within float16's
        # precision of ONNX Runtime's). ``other_floats``: the types the graph computed in, for the log.
        self.other_floats = sorted({str(v.dtype) for v in stored.values() if str(v.dtype) in _OTHER_FLOATS.values()}
                                   | {_OTHER_FLOATS[a.i] for n in needed for a in n.attribute
                                      if a.name in ("to", "dtype") and a.i in _OTHER_FLOATS})
        stored = {name: _in_float32(value) for name, value in stored.items()}
        if len(inputs) != 1:
            raise ValueError(f"the graph takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             "a classifier takes one")
        self.input_name = inputs[0].name
        elem = inputs[0].type.tensor_type.elem_type
        # Pixels as bytes (a graph with its preprocessing inside, a converted TFLite model): given float32 as every
        # network here is, rounded and clipped to the type's levels as the bytes would be.
        self.input_dtype = DTYPES[elem] if elem in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) else None
        self.input_levels = LEVELS.get(self.input_dtype)
        if elem != onnx.TensorProto.FLOAT and self.input_dtype is None:  # what the recipes train on, bundles take
            # and the service sends
            raise ValueError(_input_refused(onnx.TensorProto.DataType.Name(elem).lower(), elem in _INTEGER_TYPES))
        cast = _integer_cast(needed, self.input_name) if elem == onnx.TensorProto.FLOAT else None
        if cast is not None:
            raise ValueError(_cast_refused(cast))
        dims = inputs[0].type.tensor_type.shape.dim
        self.input_shape = tuple(_axis_size(d) for d in dims)
        self.input_axes = tuple(d.dim_param or None for d in dims)  # a free axis's name in the graph, if it has one
        self.fixed_batch = self.input_shape[0] if self.input_shape and self.input_shape[0] else batch
        self.graph_outputs = [o.name for o in g.output]
        self.flat_output = False  # a classifier's scores with singleton axes around them, as (N, K) (onnx_classifier)
        self.first_output = g.output[0].name  # (where it is not the scores, onnx_classifier's log says so)
        # the float tensors it answers by their declared shapes, for the log and refusals to name
        self.float_outputs = {o.name: shape for o in g.output if (shape := _float_shape(o)) is not None}
        weights = _weights(g, stored) if trainable else set()
        self._consts: dict[str, str] = {}
        # Small stored tensors (shapes, axes, slice bounds, scales) as Python values too: read from a GPU, each
        # would wait for the device at every forward (onnx_ops.numbers reads them here).
        self._host: dict[str, list] = {}
        for i, (name, value) in enumerate(stored.items()):
            try:
                t = torch.from_numpy(np.array(value))
            except TypeError:  # a type torch has no tensor of (8-bit floats as numpy reads them)
                raise ValueError(f"the graph stores {name!r} as {value.dtype}, a type not supported here") from None
            if name in weights:  # (its values change as it trains: none kept)
                self.register_parameter(f"w{i}", nn.Parameter(t))
            else:
                self._keep_host(name, t)
                self.register_buffer(f"w{i}", t)
            self._consts[name] = f"w{i}"
        self.nodes = self._compile(needed, "")
        # A QDQ graph's activation quantizations: each QuantizeLinear read by DequantizeLinears alone, directly or
        # through operators that move its levels (a pair that rounds and saturates). Run while ``quantized``; once
        # a recipe releases them (float_activations), the pair saturates alone: the quantizer folds a ReLU or a clip
        # into its range, so the range is the network's.
        readers: dict[str, list] = {}
        for n in needed:
            for i in _reads(n):
                readers.setdefault(i, []).append(n)
        self._quantizations = {n.output[0] for n in needed if n.op_type == "QuantizeLinear"
                               and n.output[0] != self.output_name and _read_as_levels(n.output[0], readers)}
        self._quantizations |= {n.output[0] for n in needed if n.op_type == "DynamicQuantizeLinear"}
        self.quantized = True
        # Where the export's batch is stored (a fixed-batch graph): a reshape's sizes, or a stored tensor the
        # exporter made by expanding a weight to the batch (the dynamo exporter folds a ViT's class token so):
        # those with an axis of the export's batch size along which they repeat, which a run may broadcast.
        self._repeated = {} if self.fixed_batch is None else {
            name: axes for name, b in self._consts.items() if (axes := _repeats(getattr(self, b), self.fixed_batch))}
        # which reading of each (``onnx_batch``), where the likeliest is not it
        self._readings: dict[str, int | None] = {}
        self._chooser = self._watch = None  # while calibrating: how reshapes read, what sees each node's outputs
        if fold:
            self._fold()

    def _fold(self) -> None:
        """Run once the nodes that read stored values alone and keep their outputs as stored ones: the shape
        arithmetic the TorchScript exporter writes for ``F.pad``'s pads or ``expand``'s sizes then neither runs
        at each forward nor, on a GPU, reads sizes back from the device. Weights (they train) and tensors that
        repeat along the export's batch (a reading, ``_repeated``) are not folded."""
        fixed = {k for k, b in self._consts.items()
                 if not isinstance(getattr(self, b), nn.Parameter) and k not in self._repeated}
        values: dict[str, Tensor | Dims] = {k: getattr(self, self._consts[k]) for k in fixed}
        kept = []
        for node in self.nodes:
            _, op, ins, outs, a = node
            if op == "If" or not any(ins) or not all(i in fixed for i in ins if i):
                kept.append(node)
                continue
            try:
                got = OPS[op]([values[i] if i else None for i in ins], a, self.opset)
            except Exception:  # noqa: BLE001 - left to run (and to say why) at a forward
                kept.append(node)
                continue
            for out, value in zip(outs, got if isinstance(got, (tuple, list)) and not isinstance(got, Dims) else (got,)):
                if out:
                    values[out] = value
                    t = tensor(value).detach().clone() if isinstance(value, Dims) else value.detach().clone()
                    self._keep_host(out, t)
                    buffer = f"f{len(self._consts)}"
                    self.register_buffer(buffer, t, persistent=False)  # the graph's, not a state to save
                    self._consts[out] = buffer
                    fixed.add(out)
        self.nodes = kept

    def _keep_host(self, name: str, t: Tensor) -> None:
        if t.numel() <= MAX_HOST_VALUES and not t.is_complex():
            self._host[name] = t.reshape(-1).tolist()

    def _choose(self, node: str, options: list[int | None], like: tuple) -> int | None:
        if self._chooser is not None:
            return self._chooser(node, options, like)
        reading = self._readings.get(node, options[0])
        return reading if reading in options else options[0]

    def calibrate(self, x: Tensor) -> bool:
        """For a graph exported at one batch size: settle which stored size of each reshape held that batch, on a
        few rows of ``x`` (:func:`sdb_core.onnx_batch.calibrate`). False where no reading answers each sample as
        alone (the likeliest readings stay, and :func:`onnx_classifier` refuses the graph at other batch sizes)."""
        if self.fixed_batch is None:
            return True

        def run(rows: Tensor, chooser, watch) -> Tensor:
            self._chooser, self._watch = chooser, watch
            try:
                return self(rows)
            finally:
                self._chooser, self._watch = None, None

        self._readings = {}
        found = onnx_batch.calibrate(x, self.fixed_batch, run, self.nodes, self.output_name, list(self._repeated))
        self._readings = found or {}
        return found is not None

    def _compile(self, nodes, tag: str) -> list[tuple]:
        """(name, operator, inputs, outputs, attributes) per node; constants made buffers; an ``If``'s branches
        compiled in its attributes (``_branches``: the branch's nodes and outputs, by the condition)."""
        out = []
        for k, n in enumerate(nodes):
            a = _attrs(n)
            for key in ("to", "dtype"):  # computed in float32 (__init__): a Cast to float16 or float64 casts to it
                if a.get(key) in _OTHER_FLOATS:
                    a[key] = 1
            if isinstance(a.get("value"), np.ndarray):  # a Constant's, a ConstantOfShape's fill
                a["value"] = _in_float32(a["value"])
            if n.op_type == "Constant":
                self.register_buffer(f"c{tag}{k}", torch.from_numpy(np.array(_in_float32(_constant(a)))))
                self._keep_host(n.output[0], getattr(self, f"c{tag}{k}"))
                self._consts[n.output[0]] = f"c{tag}{k}"
                continue
            if n.op_type == "If":
                a = {"_branches": {cond: (self._compile(a[key].node, f"{tag}{k}{key[0]}"), [o.name for o in a[key].output])
                                   for cond, key in ((True, "then_branch"), (False, "else_branch"))}}
            a["_outputs"] = len(n.output)  # what Split divides into, when no sizes are given
            if n.op_type in ("Reshape", "Resize", "Expand"):  # a size equal to it may mean "the batch"
                a["_fixed_batch"] = self.fixed_batch
            ins = list(n.input)
            for key in STORED_ATTRIBUTES.get(_op(n), ()):  # (onnx_ops: float lists as stored inputs)
                self.register_buffer(f"a{tag}{k}{key}", torch.tensor(a.pop(key, []), dtype=torch.float32))
                self._consts[f"{n.output[0]}/{key}"] = f"a{tag}{k}{key}"
                ins.append(f"{n.output[0]}/{key}")
            out.append((n.name or f"{n.op_type}_{tag}{k}", _op(n), ins, list(n.output), a))
        return out

    def layer_names(self) -> list[str]:
        return [name for name, *_ in self.nodes]

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_output(x, None)

    def layer_output(self, x: Tensor, layer: str | None) -> Tensor:
        if layer is not None and layer not in {n for n, *_ in self.nodes}:
            raise ValueError(f"model has no layer {layer!r}; layers: {', '.join(self.layer_names()[:40])}")
        if self.input_levels is not None:  # (a float tensor of whole values: the graph's Cast reads it as its type)
            x = torch.clamp(torch.round(x), *self.input_levels)
        env: dict[str, Tensor | Dims] = {self.input_name: x}
        for k, b in self._consts.items():
            env[k] = getattr(self, b)
            if k in self._host:
                env[k].host_values = self._host[k]  # (the buffer object: a move makes another, tagged here again)
        for k, axes in self._repeated.items():  # each as stored, or its first slice along an axis, for the batch
            t = env[k]
            axis = self._choose(k, [None, *axes], ("stored", tuple(t.shape)))
            if axis is not None:
                env[k] = t.narrow(axis, 0, 1).expand(*[x.shape[0] if j == axis else -1 for j in range(t.dim())])
        found = self._run(self.nodes, env, x, layer)
        if found is not None:
            return found
        out = tensor(env[self.output_name])
        return out.flatten(1) if self.flat_output else out

    def _run(self, nodes: list[tuple], env: dict, x: Tensor, layer: str | None) -> Tensor | None:
        """Evaluate ``nodes`` into ``env``; the output of node ``layer`` when it is one of them."""
        for name, op, ins, outs, a in nodes:
            args = [env[i] if i else None for i in ins]
            if op == "If":  # a condition on sizes, as the TorchScript exporter writes squeeze(dim) of a free size
                if not isinstance(args[0], Dims):  # the box's export would keep the branch one input took
                    raise ValueError(f"node {name} (If): a condition on the input's values is not supported, "
                                     "only one on its sizes")
                branch, results = a["_branches"][bool(ints(args[0])[0])]
                self._run(branch, env, x, None)
                for out, result in zip(outs, results):
                    env[out] = env[result]
                continue
            if op not in ON_DIMS:
                # sizes made a tensor where the data is: an operator mixing them with it would fail on a GPU
                args = [tensor(t).to(x.device) if isinstance(t, Dims) else t for t in args]
            if op in ("Reshape", "Expand") and self.fixed_batch is not None:  # the batch it runs at (onnx_ops)
                a = {**a, "_batch": x.shape[0], "_choose": partial(self._choose, name)}
            if not self.quantized and outs and outs[0] in self._quantizations:  # (quantizations' outputs alone)
                a = {**a, "_round": False}  # released: the range kept (a ReLU folded into it), the rounding not
            try:
                got = OPS[op](args, a, self.opset)
            except (RuntimeError, ValueError, IndexError, TypeError, AttributeError) as e:
                refused = ValueError(f"node {name} ({op}): {e}")
                refused.node = name  # type: ignore[attr-defined]  # what a calibration blames
                raise refused from None
            for out, value in zip(outs, got if isinstance(got, (tuple, list)) and not isinstance(got, Dims) else (got,)):
                if isinstance(value, Tensor) and value.device != x.device:  # made from sizes (ConstantOfShape, a
                    value = value.to(x.device)  # Cast of a shape): where the graph's data is, on a GPU too
                if out:
                    env[out] = value
            if self._watch is not None:
                self._watch(outs, env)
            if name == layer:
                return env[outs[0]]
        return None


def float_activations(module: nn.Module) -> bool:
    """Release the activation quantizations of every quantized ONNX graph in ``module`` (a QDQ classifier's
    QuantizeLinear/DequantizeLinear pairs): each keeps its range (where the quantizer folded a ReLU or a clip) and
    rounds no more, so the network computes in float. What a wrap does to the box's trainable copy of such a
    teacher: the box serves in float, and learns through no rounding (digits, a QDQ ViewNet, eight wraps: served
    accuracy 0.75-4.75 points under the teacher's; four with the rounding kept: 2.0-6.75). The teacher's own copy keeps
    them: its answers are ONNX Runtime's. Whether there were any to release."""
    found = False
    for m in module.modules():
        if isinstance(m, OnnxModule) and m._quantizations:
            m.quantized, found = False, True
    return found


def _repeats(t: Tensor, batch: int) -> list[int]:
    """The axes of size ``batch`` along which float tensor ``t`` holds the same slice (any of size 1)."""
    if not t.is_floating_point():
        return []
    return [k for k, size in enumerate(t.shape)
            if size == batch and torch.equal(t, t.narrow(k, 0, 1).expand_as(t))]


class ChannelsLast(nn.Module):
    """A network that takes its inputs channels last, given the project's channels first: images (N, H, W, C), as
    Keras' and TensorFlow's exports take them, for (N, C, H, W); sequences (N, L, C), as Keras' 1-d convolutions
    and recurrent layers take them, for signals (N, C, L)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self._last(x))

    def layer_names(self) -> list[str]:  # the graph's own (DEPARA ranks by them)
        return self.net.layer_names()

    def layer_output(self, x: Tensor, layer: str | None) -> Tensor:
        return self.net.layer_output(self._last(x), layer)

    @staticmethod
    def _last(x: Tensor) -> Tensor:
        return x.permute(0, *range(2, x.dim()), 1)


def _taking(model_bytes: bytes, given: tuple[int, ...], batch: int | None = None,
            classes: int | None = None) -> OnnxModule | ChannelsLast:
    """The graph as a trainable module (eval mode) taking inputs of shape ``given`` batched: channels last where its
    input takes them so and not as they are (:func:`_layouts`). ``batch``, ``classes``: :class:`OnnxModule`'s."""
    from google.protobuf.message import DecodeError

    try:
        net = OnnxModule(model_bytes, trainable=True, fold=True, batch=batch, classes=classes).eval()
    except (DecodeError, KeyError, TypeError, RuntimeError) as e:  # not an ONNX model, or not a whole one
        raise ValueError(f"not a readable ONNX model ({type(e).__name__})") from None
    layouts = _layouts(net.input_shape, given)
    if not layouts:
        raise ValueError(f"the ONNX model takes inputs of shape {_shown(net.input_shape)}, the data's are "
                         f"(N, {', '.join(map(str, given))})")
    return ChannelsLast(net) if layouts[0] else net


def _layouts(shape: tuple, given: tuple[int, ...]) -> list[bool]:
    """How a graph whose input is ``shape`` may take the data's inputs of shape ``given``: as they are (False), and,
    for images (C, H, W) and sequences (C, L), channels last (True), in that order. Both where the graph leaves the
    axes free (a Keras export's (b, h, w, c)): :func:`onnx_classifier` sees which it runs on."""
    want = tuple(shape[1:])
    fits = lambda target: len(want) == len(target) and all(d is None or d == t for d, t in zip(want, target))
    return [last for last, target in ((False, given), (True, given[1:] + given[:1]))
            if fits(target) and (not last or len(given) in (2, 3))]


def _shown(shape: tuple) -> str:
    """A graph's input shape in words, its free axes N."""
    return f"({', '.join('N' if d is None else str(d) for d in shape)})"


MAX_STORED_BATCH = 64  # the largest batch a graph declaring a free one is tried at (the usual export batches)


def _stored_batches(net: OnnxModule) -> list[int]:
    """The batch sizes a graph that declares a free batch axis may run at alone: 1, and the leading sizes its
    reshapes store (the TorchScript exporter given ``dynamic_axes`` for an input it was not told the name of
    stores the traced batch in ``x.view(x.size(0), -1)``; tf2onnx writes a Keras model's Flatten as a reshape to
    (1, 64) where the model was built for one input)."""
    leads = [net._host[ins[1]][0] for _, op, ins, *_ in net.nodes
             if op == "Reshape" and len(ins) > 1 and net._host.get(ins[1])]
    return [b for b in dict.fromkeys([1, *leads]) if isinstance(b, int) and 0 < b <= MAX_STORED_BATCH][:4]


def _batch_it_runs_at(net: OnnxModule, given: tuple[int, ...], answers: Callable[[Tensor], np.ndarray],
                      failed_at: int, failed: str) -> int:
    """The batch size a graph ONNX Runtime cannot run at batch ``failed_at`` (``failed``: its error) runs at, where
    its input declares a free batch axis and a reshape stores a batch all the same (:func:`_stored_batches`): a
    graph exported at that batch, in effect. ``answers``: ONNX Runtime's to inputs of shape ``given``. ValueError
    with ONNX Runtime's error where it runs at none."""
    tried = [] if net.fixed_batch else [b for b in _stored_batches(net) if b != failed_at]
    for b in tried:
        if _one_answer_each(answers, _check_inputs(net, (b, *given), 0)):
            return b
    at = f"at batch {failed_at}" + (f", nor at {' or '.join(map(str, tried))}" if tried else "")
    raise ValueError(f"ONNX Runtime cannot run the graph ({at}): {failed}")


def _one_answer_each(answers: Callable[[Tensor], np.ndarray], rows: Tensor) -> bool:
    """Whether ONNX Runtime runs the graph on ``rows`` and answers each (a stored batch may broadcast over the
    input's: two answers to one input)."""
    try:
        out = answers(rows)
    except Exception:  # noqa: BLE001 (onnxruntime's errors derive from Exception alone)
        return False
    return out.ndim > 0 and len(out) == len(rows)


def _with_output(model_bytes: bytes, name: str, outputs: list[str]) -> bytes:
    """The graph with float tensor ``name`` among its ``outputs``, for ONNX Runtime to answer it (the tensor a
    ZipMap maps: :func:`_scores_output`)."""
    if name in outputs:
        return model_bytes
    import onnx

    model = onnx.load_from_string(model_bytes)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _clipped(text: str, size: int = 300) -> str:
    """``text`` in at most about ``size`` characters: its start and its end (ONNX Runtime says what failed last, after
    the source file and function it failed in)."""
    return text if len(text) <= size else f"{text[:size // 2]} ... {text[-size // 2:]}"


def onnx_classifier(source: str | PathLike | bytes, in_shape, classes: int | None = None) -> nn.Module:
    """A classifier an owner brings as ONNX, as a torch network whose weights train (eval mode), taking inputs of
    ``in_shape`` (C, H, W), (C, L) or (D,) batched; a channels-last graph ((N, H, W, C), (N, L, C)) gets them
    permuted. It is run beside ONNX Runtime on random inputs and must agree; a graph exported at one batch size
    (or that declares a free batch axis but runs at one alone) must also run at others. ``classes``: the data's
    number of classes, where known: of a graph's several outputs, the one that answers that many scores is read
    (:func:`_scores_output`), and one of several outputs none of which does is refused naming them. ValueError,
    saying why, otherwise: an unsupported operator, another input shape, a graph too large."""
    import onnxruntime as ort

    from .bundle import ort_options

    model_bytes = source if isinstance(source, bytes) else open(source, "rb").read()  # noqa: SIM115
    if graph_entries(model_bytes) > MAX_GRAPH_ENTRIES:
        raise ValueError(f"the ONNX graph holds more than {MAX_GRAPH_ENTRIES} nodes, initializers and value infos")
    given = tuple(int(d) for d in in_shape)
    net = _taking(model_bytes, given, classes=classes)
    inner = net.net if isinstance(net, ChannelsLast) else net
    why: list[str] = []  # how the graph is read, for the task's log
    if isinstance(net, ChannelsLast):
        why.append(f"the ONNX model takes its inputs channels last, {_shown(inner.input_shape)}: given them so")
    try:
        session = ort.InferenceSession(_with_output(model_bytes, inner.output_name, inner.graph_outputs),
                                       ort_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 (onnxruntime's Fail, InvalidGraph, ... derive from Exception alone)
        raise ValueError(f"ONNX Runtime cannot run the graph: {_clipped(str(e))}") from None

    def answers(rows: Tensor) -> np.ndarray:  # ONNX Runtime's, to inputs of the data's shape
        feed = ChannelsLast._last(rows) if isinstance(net, ChannelsLast) else rows
        typed = feed if inner.input_dtype is None else feed.to(inner.input_dtype)
        return session.run([inner.output_name], {inner.input_name: typed.numpy()})[0]

    batch = inner.fixed_batch or 3
    x = _check_inputs(inner, (batch + 2, *given), 0)
    try:
        want_out, failed = answers(x[:batch]), None
    except Exception as e:  # noqa: BLE001 (as above)
        failed = _clipped(str(e))
    if failed is not None and _layouts(inner.input_shape, given) == [False, True]:
        # Its axes all free, it was given the inputs as they are: a Keras export's (b, h, w, c) takes them last
        net = ChannelsLast(inner)  # (what ``answers`` feeds)
        try:
            want_out, failed = answers(x[:batch]), None
        except Exception as e:  # noqa: BLE001 (as above)
            net, failed = inner, failed + _layout_unknown(inner, given, _clipped(str(e)))
        else:
            why.append(f"the ONNX model's input, {_shown(inner.input_shape)}, leaves its axes free and ONNX Runtime "
                       "runs it on the inputs channels last, not as they are: given them so")
    if failed is not None:
        stored = _batch_it_runs_at(inner, given, answers, batch, failed)
        net = _taking(model_bytes, given, batch=stored, classes=classes)
        inner = net.net if isinstance(net, ChannelsLast) else net
        why.append(f"the ONNX model declares a free batch axis but ONNX Runtime runs it at batch {stored} only (a "
                   f"batch its reshapes store): read as exported at batch {stored}")
        batch = stored
        x = _check_inputs(inner, (batch + 2, *given), 0)
        want_out = answers(x[:batch])
    feed = ChannelsLast._last(x) if isinstance(net, ChannelsLast) else x
    exported = (f"declares a free batch axis but runs at batch {batch} only, and" if inner.input_shape[0] is None
                else f"was exported for batches of {batch} only and")
    # A graph that computes in float16 or bfloat16 inside is run in float32 (OnnxModule): its answers are ONNX
    # Runtime's to that type's precision (a ViT in float16: 1e-3 of the output's scale), not float32's.
    low = 1e-1 if "bfloat16" in inner.other_floats else 2e-2 if "float16" in inner.other_floats else 0.0
    with torch.no_grad():
        got = net(x[:batch]).numpy()
        if got.shape != want_out.shape or not (onnx_batch.close(torch.from_numpy(got), torch.from_numpy(want_out))
                                               or low and np.allclose(got, want_out, rtol=low,
                                                                      atol=low * (1 + np.abs(want_out).max()))):
            raise ValueError("run in torch, the ONNX graph does not compute what ONNX Runtime computes "
                             f"(largest difference {np.abs(got - want_out).max() if got.shape == want_out.shape else 'in shape'}"
                             + (f"; the graph computes in {' and '.join(inner.other_floats)} inside, run here in float32"
                                if inner.other_floats else "") + ")")
        if inner.fixed_batch:  # served in batches of any size: the graph must run at others too, sample by sample
            inner.calibrate(feed)
            more = _check_inputs(inner, (2 * batch + 3, *given), 1)
            for rows in (x, more):
                try:
                    other = net(rows)
                except ValueError as e:
                    raise ValueError(f"the ONNX graph {exported} does not run at others ({e}): export it with a free "
                                     'batch axis, e.g. torch.onnx.export(..., input_names=["input"], '
                                     'dynamic_axes={"input": {0: "batch"}})') from None
                if not onnx_batch.close(other, onnx_batch.at_batch(net, rows, batch)):
                    raise ValueError(f"the ONNX graph {exported} answers otherwise at others: export it with a free "
                                     "batch axis")
    if inner.output_name not in inner.graph_outputs:
        why.append(f"the ONNX model's probabilities are a ZipMap's maps of labels to them: the tensor it maps, "
                   f"{inner.output_name[:60]!r}, is read")
    elif len(inner.float_outputs) > 1:
        why.append(_outputs_read(inner))
    elif inner.output_name != inner.first_output:
        why.append(f"the ONNX model's first output, {inner.first_output[:60]!r}, is not a float tensor of scores: its "
                   f"output {inner.output_name[:60]!r} is read")
    if inner.other_floats:
        why.append(f"the ONNX model computes in {' and '.join(inner.other_floats)} inside: it is run, trained and "
                   "served in float32")
    # A fully convolutional head answers (N, K, 1, 1) (the ONNX model zoo's SqueezeNet), a channels-last one
    # (N, 1, 1, K): the scores, with singleton axes around them, read as (N, K).
    scores = next((k for k in range(1, got.ndim) if got.shape[k] > 1), 1)
    if got.ndim > 2 and all(d == 1 for k, d in enumerate(got.shape) if k not in (0, scores)):
        inner.flat_output = True
        why.append(f"the ONNX model answers {got.shape[1:]} per input: its scores, read as ({got.shape[scores]},)")
    if classes is not None:
        _refuse_other_scores(inner, got.shape[scores:scores + 1] if inner.flat_output else got.shape[1:], classes)
    # Probabilities teach a student nothing read as logits (distillation tempers logits): where the output is a
    # softmax's or a sigmoid's (one per class, or a binary classifier's one score; through layout alone: a squeeze,
    # a transpose), its input, the graph's own logits, is what a task gets, once checked to be what that softmax or
    # sigmoid turned into the output. (A sigmoid's probabilities inverted again, log(p / (1 - p)), would not do:
    # ONNX Runtime's Sigmoid answers 0 below about -20 and loses a logit's digits from about ±9, where torch's does
    # not, so the box's export would not compute what it trained.)
    producer = {out: node for node in inner.nodes for out in node[3]}
    last = producer.get(inner.output_name)
    while last is not None and last[1] in ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"):
        last = producer.get(last[2][0])
    if last is not None and last[1] in ("Softmax", "LogSoftmax", "Sigmoid"):
        kept = inner.output_name, inner.flat_output
        inner.output_name, inner.flat_output = last[2][0], False
        with torch.no_grad():
            logits = net(x[:batch])
            if logits.dim() > 1:  # (a binary classifier's scores, (N,), stay as they are)
                inner.flat_output = True
                logits = logits.flatten(1)
            probs = (torch.sigmoid(logits) if last[1] == "Sigmoid" else torch.softmax(logits, 1)
                     if last[1] == "Softmax" else torch.log_softmax(logits, 1)).numpy()
        answered = got.reshape(len(got), -1) if logits.dim() == 2 else got
        if (logits.dim() == 2 or last[1] == "Sigmoid" and logits.shape == got.shape) \
                and probs.shape == answered.shape and np.allclose(probs, answered, rtol=1e-3, atol=1e-5):
            why.append(f"the ONNX model ends in a {last[1]}: its input, the logits, is what the box learns and serves")
        else:
            inner.output_name, inner.flat_output = kept
    if inner.input_levels is not None:
        why.append(f"the ONNX model takes {str(inner.input_dtype).removeprefix('torch.')} inputs: its values are "
                   f"rounded to {inner.input_levels[0]}..{inner.input_levels[1]}")
    if why:
        net.why = "; ".join(why)
    return net


def _declared(shape: tuple | None) -> str:
    """An output's declared shape in words: its free batch axis N, another free one ?."""
    if not shape:
        return "(shape not declared)"
    return f"({', '.join('N' if k == 0 and d is None else '?' if d is None else str(d) for k, d in enumerate(shape))})"


def _outputs_listed(net: OnnxModule) -> str:
    """A graph's float outputs and their declared shapes, in words."""
    return ", ".join(f"{name[:60]!r} {_declared(shape)}" for name, shape in list(net.float_outputs.items())[:6])


def _how_read(net: OnnxModule) -> str:
    """Why a graph's output read as the scores is (:func:`_scores_output`), in words."""
    return net.scores_chosen or ("its first" if net.output_name == net.first_output
                                 else "its first float tensor of two or more axes")


def _outputs_read(net: OnnxModule) -> str:
    """Which of a graph's several float outputs is read as the scores, and why, for the log."""
    return (f"the ONNX model answers {len(net.float_outputs)} float tensors, {_outputs_listed(net)}: "
            f"{net.output_name[:60]!r} is read as the scores ({_how_read(net)})")


def _refuse_other_scores(net: OnnxModule, answered: tuple, classes: int) -> None:
    """Refuse, naming its outputs, a graph of several float outputs whose output read as the scores answers other
    than the data's ``classes`` scores per input (a (features, logits) export whose logits' width is not declared):
    the teacher's own check would say its shape alone, not which output was read nor what the others are. A graph of
    one output is left to that check."""
    if len(net.float_outputs) < 2 or tuple(answered) == (classes,) or classes == 2 and tuple(answered) in ((), (1,)):
        return
    fitting = [name for name, shape in net.float_outputs.items() if _answers_classes(shape, classes)]
    which = (f"{', '.join(repr(n[:60]) for n in fitting)} each declare (N, {classes}) and none is computed from the "
             "others" if fitting else f"none declares (N, {classes})")
    raise ValueError(f"the ONNX model's output {net.output_name[:60]!r}, read as its scores ({_how_read(net)}), "
                     f"answers {tuple(answered)} per input, and the data has {classes} classes: of its outputs, "
                     f"{_outputs_listed(net)}, {which}. Export the classifier with its (N, {classes}) logits as its "
                     "first output, or its only one")


def _layout_unknown(net: OnnxModule, given: tuple[int, ...], failed_last: str) -> str:
    """What an error says where a graph whose input leaves its axes free runs on the data's inputs neither as they
    are nor channels last (``failed_last``: ONNX Runtime's error then)."""
    last = given[1:] + given[:1]
    return (f" (the graph's input, {_shown(net.input_shape)}, leaves its axes free, so the layout is the likely cause: "
            f"it was given the inputs as they are, (N, {', '.join(map(str, given))}); given them channels last, "
            f"(N, {', '.join(map(str, last))}), it fails too: {failed_last})")


def _check_inputs(net: OnnxModule, shape: tuple, seed: int) -> Tensor:
    """Random inputs the graph is checked on beside ONNX Runtime: normal floats, or whole values of its levels."""
    gen = torch.Generator().manual_seed(seed)
    if net.input_levels is None:
        return torch.randn(*shape, generator=gen)
    return torch.randint(net.input_levels[0], net.input_levels[1] + 1, shape, generator=gen).float()


def pixel_levels(net: nn.Module) -> tuple[int, int] | None:
    """The levels of an ONNX network's integer input ((0, 255): uint8 pixels), None for a float one."""
    inner = getattr(net, "net", net)
    return getattr(inner, "input_levels", None)


def bundle_module(path) -> tuple[OnnxModule, dict]:
    """A bundle's public network as a differentiable module, and its meta (hashes verified)."""
    model_bytes, meta = bundle_graph(path)
    return OnnxModule(model_bytes, fold=True).eval(), meta


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

        from .bundle import ort_options

        sub = Extractor(onnx.shape_inference.infer_shapes(self.model)).extract_model([start], [self.output])
        session = ort.InferenceSession(sub.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])
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
    from .bundle import INPUT_NAME, ort_options

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
    session = ort.InferenceSession(model_bytes, ort_options(), providers=["CPUExecutionProvider"])
    want = session.run(None, {INPUT_NAME: ((x.numpy() - np.array(mean, np.float32).reshape(1, -1, 1, 1))
                                           / np.array(std, np.float32).reshape(1, -1, 1, 1))})[0]
    with torch.no_grad():
        got = net(x).numpy()
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-3 * (1 + np.abs(want).max())):
        raise ValueError(f"{meta['name']} is not a {family} network of this project: rebuilt from its graph, it "
                         f"computes something else (ops in the graph: {', '.join(g.ops)})")
    return net, meta
