"""The bundle: the deployable artifact the service hosts.

A directory (or a ``.sdb`` zip of it) with

- ``model.onnx``: the protected network alone (dynamic batch axis): the public graph;
- ``key.sealed``: the key, AES-GCM sealed under the server's master key (absent in Nasty mode);
- ``meta.json``: name, version, task, input shape/dtype, normalisation, labels, λ,
  temperature, metrics, the public form of an SDB classifier (``public_form``: each class's confusion
  partners and the gaps that make the public path's answer for each top-1 of the network,
  ``sdb_core.protect.sdb.public_form``), and the sha256 of every other file.

Loading verifies every hash, runs the graph once to check its output shape against
``meta.json``, and refuses an altered bundle. The sealed key's associated data (key binding 2,
``meta["key_binding"]``) is a digest of ``meta.json`` and of every other file's sha256, so the
key opens only beside the network it was sealed with and the metadata (λ, say) it was sealed
under. Bundles sealed under key binding 1 (``meta.json`` alone) are refused with the key:
docs/security.md#bundles says why and how to re-seal them.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .class_names import name_problem
from .graph_size import MAX_GRAPH_ENTRIES, graph_entries
from .outputs import file_above
from .protect.seal import SealError, seal, unseal

if TYPE_CHECKING:  # torch only where a bundle is made: loading one must stay light
    from torch import Tensor, nn

    from .protect.box import SafeDistillationBox

FORMAT = "sdb-bundle/1"  # what every release reads alike: hand-made plain bundles say it
# A bundle whose meta.json holds a field that changes what it answers says format 2: a release from before the field
# ignored it and served another answer under the same self-check report (the network's own probabilities instead of
# the public form; keyed logits 1/keyed_scale times too large). Those releases refuse a format they do not know. A
# field added later that changes answers takes the next number, here and in FORMATS.
FORMAT_2 = "sdb-bundle/2"
ANSWER_FIELDS = ("public_form", "keyed_scale")
FORMATS = (FORMAT, FORMAT_2)
MODEL_FILE, META_FILE, KEY_FILE = "model.onnx", "meta.json", "key.sealed"
BUNDLE_FILES = (MODEL_FILE, META_FILE, KEY_FILE)
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MODES = ("sdb", "nasty", "plain")  # keyed box, keyless box, any network with no key (pose, style, ...)
MAX_MEMBER_BYTES = 2 << 30  # a bundle member larger than this is not a bundle we wrote
# meta.json is read whole into every serving process: 21k labels and their public form fit in a few MiB
MAX_META_BYTES = 16 << 20
MAX_META_DEPTH = 32  # nesting of meta.json's values (ours: under 8); what responses carry stays serialisable
MAX_INPUT_ELEMENTS = 1 << 26  # one sample's input: loading runs the graph on zeros of this size
# Loading's check run on one input is stopped after this many seconds (ONNX Runtime's RunOptions.terminate): a
# network the service can serve answers one sample in far less, even on one CPU thread of a busy server.
MAX_CHECK_RUN_S = 60.0
EXPORT_OPSET = 17  # what a box's network is exported at (the TorchScript exporter; ONNX Runtime runs it everywhere)
# How a network that the service can serve is exported (the names and the batch axis it feeds).
EXPORT_HINT = (f'export it with torch.onnx.export(model.float().eval(), x, f, input_names=["{INPUT_NAME}"], '
               f'output_names=["{OUTPUT_NAME}"], dynamic_axes={{"{INPUT_NAME}": {{0: "batch"}}, '
               f'"{OUTPUT_NAME}": {{0: "batch"}}}}), or write the bundle with sdb_core.bundle.export_bundle')
# What a bare ONNX file is told where a bundle was expected (a user's first guess at one).
BARE_ONNX_HINT = ("a bare ONNX graph is not a bundle: a bundle holds model.onnx with meta.json (input shape, "
                  "normalisation, labels) and a protected model's sealed key; to protect an ONNX classifier, wrap "
                  "it: sdb wrap --teacher model.onnx, or upload it as weights and submit a wrap job naming its file; "
                  "sdb_core.bundle.export_bundle writes one of any nn.Module")
# What an owner of a network of token ids or other indices is told, wherever it shows (an integer input, a float one
# cast to integers, a forward that indexes by its input): a key blended into ids is no ids (docs/protection.md).
IDS_ADVICE = ("a key blended into ids (λx + (1−λ)k) is no ids: wrap the network after its embedding (an ONNX export of "
              "the part that runs on the embeddings, or that module in Python), with the embeddings as the data")
KEY_BINDING = 2  # meta["key_binding"]: what key.sealed's associated data covers (docs/security.md#bundles)
# Tasks whose output is one score per label: the service indexes ``labels`` with the output.
LABELLED_TASKS = ("classification", "multilabel")
# What a bundle's task may be: the tasks some route or job serves (predict: classification, multilabel, pose; style's
# route), or a task-branching student's dense tasks joined by "-" (segmentation-depth: an artifact its teachers' jobs
# read). Another name was deployed, then every call refused.
TASKS = (*LABELLED_TASKS, "pose", "style")
DENSE_TASKS = ("segmentation", "depth", "edges")


def known_task(task: str) -> bool:
    parts = task.split("-")
    return task in TASKS or (len(set(parts)) == len(parts) and all(t in DENSE_TASKS for t in parts))
# The logits' ONNX types the service reads (as float32: float16 and float64 scores are cast)
SCORE_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


class BundleError(ValueError):
    """The bundle is missing, malformed or was altered."""


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _legacy_aad(meta: dict) -> bytes:
    """Key binding 1: ``meta.json`` bar the file hashes, so ``model.onnx`` could be swapped with its hash."""
    return hashlib.sha256(_canonical({k: v for k, v in meta.items() if k != "files"})).digest()


def key_aad(meta: dict, files: dict[str, bytes]) -> bytes:
    """Key binding 2: ``meta.json`` (with ``key_binding`` itself) and the sha256 of every file's bytes
    but ``meta.json`` and ``key.sealed``, so the key opens only beside the network it was sealed with.

    The prefix keeps it apart from binding 1's bare digest: no meta makes one equal the other.
    """
    core = {k: v for k, v in meta.items() if k != "files"}
    hashes = {n: _sha256(b) for n, b in files.items() if n not in (META_FILE, KEY_FILE)}
    return b"sdb-key-binding/2\0" + hashlib.sha256(_canonical({"meta": core, "files": hashes})).digest()


def _opening_aad(meta: dict, files: dict[str, bytes], where: str) -> bytes:
    """The associated data ``key.sealed`` must open with, or why this bundle's key is not opened at all."""
    binding = meta.get("key_binding", 1)
    if type(binding) is int and binding == KEY_BINDING:
        return key_aad(meta, files)
    if type(binding) is int and binding == 1:
        raise BundleError(
            f"{where}: key.sealed was sealed under key binding 1, which binds the key to meta.json but not "
            f"to model.onnx, so it could be opened beside another network; re-wrap the model, or re-seal "
            f"this bundle with sdb_core.bundle.reseal_bundle if you trust its files (docs/security.md#bundles)")
    raise BundleError(f"{where}: unknown key binding {binding!r} (known: 1, {KEY_BINDING})")


def export_onnx(model: nn.Module, in_shape: Sequence[int], *, dynamic_spatial: bool = False,
                extra_inputs: Sequence[tuple[str, Sequence[int]]] = (), samples=None) -> bytes:
    """The network as ONNX bytes, batch axis dynamic, input ``input``, output ``logits``.

    ``dynamic_spatial`` also frees the trailing H, W axes of input and output (fully
    convolutional networks, e.g. style transfer, that take any image size).
    ``extra_inputs`` are further ``(name, per-sample shape)`` inputs after ``input``, batched
    like it (a second image, a per-sample scalar with shape ``[]``); with ``dynamic_spatial``
    an image-shaped one (C, H, W) gets its own free H, W axes.
    The export is checked against the network (:func:`_check_export`), on ``samples`` (real
    inputs, a tensor (N, *in_shape)) when given, and on random ones at batch sizes 1 and 3.
    A ``torch.compile``'d module exports its original module; parametrized weights (``weight_norm``,
    ``spectral_norm``) export as the weights they compute in eval mode. What the exporter cannot
    express is a :class:`BundleError` that names it.
    """
    import torch

    from .train import evaluating

    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule: its graph does not trace
    model = inner if isinstance(inner, torch.nn.Module) else model
    with evaluating(model):  # the caller's module comes back in the modes it had, module by module
        return _export_eval(model, in_shape, dynamic_spatial, extra_inputs, samples)


def _export_eval(model: nn.Module, in_shape: Sequence[int], dynamic_spatial: bool,
                 extra_inputs: Sequence[tuple[str, Sequence[int]]], samples) -> bytes:
    """:func:`export_onnx` of ``model``, in eval mode."""
    import copy

    import torch
    from torch.nn.utils import parametrize

    from .train import device_of

    device = device_of(model)
    traced = model
    if any(parametrize.is_parametrized(m) for m in model.modules()):  # spectral_norm's power step has no ONNX op
        traced = copy.deepcopy(model).eval()
        for m in [m for m in traced.modules() if parametrize.is_parametrized(m)]:
            # A copy shares its Parametrized* class with the original, and removing a parametrization deletes the
            # class's property: the copy gets a class of its own, or the owner's network would lose its weight.
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__,
                               {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    names, args, axes = [], [], {}
    for name, shape in [(INPUT_NAME, in_shape), *extra_inputs]:
        a: dict[int, str] = {0: "batch"}
        if dynamic_spatial and len(shape) == len(in_shape) >= 2:
            prefix = "" if name == INPUT_NAME else f"{name}_"
            a.update({len(shape) - 1: f"{prefix}height", len(shape): f"{prefix}width"})
        names.append(name)
        args.append(torch.zeros(2, *shape, device=device, dtype=torch.float32))
        axes[name] = a
    if not isinstance(traced, torch.jit.ScriptModule) and any(
            isinstance(m, torch.jit.ScriptModule) for m in traced.modules()):
        # A TorchScript submodule (scripted or traced by the owner) stops the exporter's own trace ("not part of the
        # active trace"); a trace of the whole network (already in eval mode) exports, its submodules inlined.
        with torch.no_grad():
            traced = torch.jit.trace(traced, tuple(args), check_trace=False)
    out_axes: dict[int, str] = {0: "batch"}
    if dynamic_spatial:
        out_axes.update({2: "out_height", 3: "out_width"})

    class Positional(torch.nn.Module):
        """The network called with its inputs alone: the exporter makes every argument of the forward it traces a
        graph input, keyword defaults too (``temperature=1.0``: an input ``onnx::Cast_1`` that no caller feeds)."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, *inputs):
            return self.net(*inputs)

    # Only a forward that takes more than its inputs is wrapped: the wrapper's attribute would prefix every node's
    # name ("/net/..."), and node names are what a transferability job names a hosted model's layers by.
    if not isinstance(traced, torch.jit.ScriptModule) and _takes_more_than(traced, len(args)):
        traced = Positional(traced).eval()  # the exporter sets it back to its mode, and with it the network
    buf = io.BytesIO()
    with warnings.catch_warnings(), _quiet_stdout(), _rms_norm_exported():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: fast, no onnxscript needed, and exact for these graphs.
        try:
            torch.onnx.export(traced, tuple(args), buf,
                              input_names=names, output_names=[OUTPUT_NAME],
                              dynamic_axes={**axes, OUTPUT_NAME: out_axes},
                              opset_version=EXPORT_OPSET, dynamo=False)
        except Exception as e:  # noqa: BLE001 - the exporter raises its own hierarchy; a user sees one clear error
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise BundleError(
                f"the network does not export to ONNX (opset {EXPORT_OPSET}, TorchScript exporter): "
                f"{type(e).__name__}: {first}. "
                "An operation the exporter cannot express (e.g. adaptive pooling of a size computed from the "
                "input's shape, a torch.compile'd submodule): write it with fixed sizes or plain tensor ops, and "
                "try torch.onnx.export(model, x, dynamo=False) on the network itself") from None
    onnx_bytes = buf.getvalue()
    _check_export(model, onnx_bytes, [(INPUT_NAME, in_shape), *extra_inputs], samples)
    return onnx_bytes


# The TorchScript exporter has no aten::rms_norm (nn.RMSNorm, F.rms_norm) at EXPORT_OPSET; ONNX's RMSNormalization
# is opset 23. Ours (_rms_norm_symbolic) is registered while a box exports and taken away after, so an owner's own
# torch.onnx.export in the same process still meets torch's own table. Counted: exports on several threads share it.
RMS_NORM_OP = "aten::rms_norm"
_rms_norm_lock = threading.Lock()
_rms_norm_exports = 0
_rms_norm_ours = False


@contextmanager
def _rms_norm_exported():
    """aten::rms_norm exportable for the block, as :func:`_rms_norm_symbolic`, unless torch or the owner already
    registered a symbolic for it (theirs is used, and left in place)."""
    import torch

    global _rms_norm_exports, _rms_norm_ours
    with _rms_norm_lock:
        if _rms_norm_exports == 0:
            _rms_norm_ours = not _rms_norm_registered()
            if _rms_norm_ours:
                torch.onnx.register_custom_op_symbolic(RMS_NORM_OP, _rms_norm_symbolic, EXPORT_OPSET)
        _rms_norm_exports += 1
    try:
        yield
    finally:
        with _rms_norm_lock:
            _rms_norm_exports -= 1
            if _rms_norm_exports == 0 and _rms_norm_ours:
                torch.onnx.unregister_custom_op_symbolic(RMS_NORM_OP, EXPORT_OPSET)
                _rms_norm_ours = False


def _rms_norm_registered() -> bool:
    """Whether the TorchScript exporter already has a symbolic for aten::rms_norm at EXPORT_OPSET."""
    try:  # torch keeps no public query of its table
        from torch.onnx._internal.torchscript_exporter.registration import registry
    except ImportError:  # a torch that moved it: ours is registered (and _check_export tells if it answers otherwise)
        return False
    return registry.is_registered_op(RMS_NORM_OP, EXPORT_OPSET)


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm(input, normalized_shape, weight?, eps?) in ONNX ops, as torch computes it: over the last
    len(normalized_shape) axes, x / sqrt(mean(x^2) + eps) * weight, in float32 for a float16/bfloat16 input (or
    float64), cast back to the input's type; eps None is the machine epsilon of that computation type."""
    import torch
    from torch.onnx import symbolic_helper

    axes = list(range(-len(symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")), 0))
    eps = None if symbolic_helper._is_none(eps) else symbolic_helper._get_const(eps, "f", "eps")
    kind = getattr(x.type(), "scalarType", lambda: None)()  # "Float", "Half", ...; None where the trace lost it
    compute = torch.float64 if kind == "Double" else torch.float32
    onnx_type = {torch.float32: 1, torch.float64: 11}[compute]  # TensorProto's FLOAT, DOUBLE
    if eps is None:
        eps = torch.finfo(compute).eps
    upcast = kind not in ("Float", "Double")
    h = g.op("Cast", x, to_i=onnx_type) if upcast else x
    mean_square = g.op("ReduceMean", g.op("Mul", h, h), axes_i=axes, keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean_square, g.op("Constant", value_t=torch.tensor(eps, dtype=compute))))
    y = g.op("Div", h, rms)
    if not symbolic_helper._is_none(weight):
        y = g.op("Mul", y, g.op("Cast", weight, to_i=onnx_type) if upcast else weight)
    return g.op("CastLike", y, x) if upcast else y


def _takes_more_than(model: nn.Module, n: int) -> bool:
    """Whether ``model``'s forward has parameters beyond its first ``n`` (keyword defaults, ``*args``, ``**kwargs``),
    which the exporter would make graph inputs; a signature it cannot read is taken to."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return True
    return len(params) != n or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


@contextmanager
def _quiet_stdout():
    """File descriptor 1 on /dev/null for the block: the TorchScript exporter prints its whole IR graph there (from
    C++) before some refusals (``instance_norm training for unknown batch size``); the refusal says what matters."""
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no fd 1 (a daemon), or a stdout without one: left as is
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _check_export(model: nn.Module, onnx_bytes: bytes, inputs: Sequence[tuple[str, Sequence[int]]],
                  samples=None) -> None:
    """Raise :class:`BundleError` unless ONNX Runtime computes what ``model`` does.

    Tracing records one run of the forward on a batch of two zeros: a forward that branches on input
    values, or bakes in a batch size or a value (``len(x)``, ``.item()``, ``float(tensor)``, numpy),
    exports a graph that answers something else, and the served box would be silently wrong (or fail
    on another batch size). Compared on the CPU, so the tolerance is ONNX Runtime's, not a GPU's TF32.
    """
    import copy

    import onnxruntime as ort
    import torch

    from .train import device_of

    cpu = model if device_of(model).type == "cpu" else copy.deepcopy(model).cpu()
    g = torch.Generator().manual_seed(0)
    f32 = torch.float32  # the bundle's inputs, whatever torch's default dtype
    batches = [[torch.randn(n, *shape, generator=g, dtype=f32) for _, shape in inputs] for n in (1, 3)]
    if samples is not None and len(samples):
        samples = torch.as_tensor(samples)[:8].detach().float().cpu()
        batches.append([samples, *(torch.randn(len(samples), *shape, generator=g, dtype=f32) for _, shape in inputs[1:])])
    try:
        session = ort.InferenceSession(onnx_bytes, ort_options(1), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own hierarchy (InvalidGraph, Fail, ...)
        first = (str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__).rstrip(".")
        raise BundleError(
            f"the ONNX export does not load in ONNX Runtime: {first}. One cause: a forward that computes in half precision "
            "(torch.autocast, .half() or .bfloat16() inside it) exports operations ONNX Runtime has no kernel for "
            "at that precision: compute in float32") from None
    extra = [i.name for i in session.get_inputs() if i.name not in {name for name, _ in inputs}]
    if extra:  # a caller feeds the inputs a bundle declares, and ONNX Runtime refuses a call without the others
        raise BundleError(
            f"the ONNX export takes inputs beyond {[name for name, _ in inputs]}: {extra}; the exporter makes every "
            "argument of the forward an input (a keyword default such as temperature=1.0 among them): export a "
            "module whose forward takes the input alone")
    unread = [name for name, _ in inputs if name not in {i.name for i in session.get_inputs()}]
    if unread:  # the trace lost the input: its answer was computed from the trace's own zeros
        raise BundleError(
            f"the ONNX export does not read its input {', '.join(map(repr, unread))}: tracing records one run, and a "
            "forward that takes its input through numpy or Python values (x.numpy(), .tolist(), .item()) exports "
            "the answer to the trace's zeros: write it with tensor ops")
    for batch in batches:
        want = _probed(cpu, batch)
        got = session.run(None, {name: b.numpy() for (name, _), b in zip(inputs, batch, strict=True)})[0]
        scale = float(np.abs(want).max()) if want.size else 0.0
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-4 * (1.0 + scale)):
            if got.shape != want.shape:
                what = f"ONNX answers shape {list(got.shape)}, PyTorch {list(want.shape)}"
            else:
                at = np.unravel_index(int(np.argmax(np.abs(got - want))), got.shape)
                what = (f"largest difference {float(abs(got[at] - want[at])):.3g} at output scale {scale:.3g}: ONNX "
                        f"{float(got[at]):.4g}, PyTorch {float(want[at]):.4g} at {list(map(int, at))}")
            raise BundleError(
                f"the ONNX export does not compute what the network does (a batch of {len(batch[0])}: {what}). "
                "Tracing records one run, so a forward that branches on input values or bakes in a batch size or a "
                "value (len(x), .item(), float(tensor), numpy) exports that run: write those with tensor ops "
                "(torch.where, x.shape[0], x.flatten(1)). Or an operator computes otherwise in ONNX Runtime than "
                "in torch where float32 runs out of precision (a saturated sigmoid or exp read back through a log, "
                "as log(p / (1 - p)) of p near 0 or 1): clamp its input, or answer the logits themselves")


def _probed(model: nn.Module, batch: Sequence[Tensor]) -> np.ndarray:
    """``model``'s answer to an export check's batch (copies: a forward may write into them), or a
    :class:`BundleError` naming its error: the random probes are values the data's inputs take once a key is blended
    into them, and a forward that indexes by its input's values (token ids as floats into an ``nn.Embedding``) fails
    on them (a negative id) with torch's bare ``IndexError``."""
    import torch

    try:
        with torch.no_grad():
            return model(*(b.clone() for b in batch)).float().numpy()
    except Exception as e:  # noqa: BLE001 - any error of the owner's forward, said in the owner's terms
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        indexed = isinstance(e, IndexError) or "index" in first.lower()
        raise BundleError(
            f"the network fails on inputs of the data's kind, as the export check probes it (random values of its "
            f"shape, as a key blended into the data makes them): {type(e).__name__}: {first}"
            + (". The network indexes by its input's values, as by token ids into an embedding (x.long()): "
               f"{IDS_ADVICE}" if indexed else
               ". A served network must answer any values of its input's shape (a box's keyed path gives it the "
               "data blended with a key)")) from None


def per_sample_fault(model: nn.Module, batch: Sequence[Tensor], what: str = "network") -> str | None:
    """Why ``model`` in eval mode is not a function of each input alone, or None when it is.

    ``batch``: its inputs, each a batch of at least two. The service answers a request's inputs in one ONNX
    Runtime call with other callers' (the micro-batcher), a batch of one when it is alone: a forward that draws
    random numbers (``F.dropout``'s default ``training=True``) or computes a statistic over the batch axis (a
    BatchNorm with ``track_running_stats=False``, attention over the batch axis) would answer each input by
    chance or by its neighbours, and tell one caller of another's inputs. ONNX export traces one run and
    checks it on batches it chose, which such a forward passes. The tolerance is loose (1% of the output's
    scale): a GPU's TF32 differs between batch sizes by far less, these faults by the output's own size.
    Runs without gradients; every module is left in the mode it was in.
    """
    import torch

    from .train import evaluating, logits_of

    def answer(*args) -> Tensor:  # on copies: a forward that writes into its input would change the next call's
        return logits_of(model(*(a.clone() for a in args)))

    with torch.no_grad(), evaluating(model):
        together, again = answer(*batch), answer(*batch)
        if not isinstance(together, torch.Tensor) or not together.is_floating_point():
            return None  # not a tensor of scores: the caller's own checks say what it is
        scale = float(together.abs().max()) if together.numel() else 0.0

        def differ(a: Tensor, b: Tensor) -> float | None:
            if a.shape == b.shape and torch.allclose(a, b, rtol=1e-2, atol=1e-2 * (1.0 + scale)):
                return None
            return float((a - b).abs().max()) if a.shape == b.shape else float("nan")

        gap = differ(together, again)
        if gap is not None:
            return (f"the {what}'s answer to the same inputs changes from one run to the next in eval mode (largest "
                    f"difference {gap:.3g} at output scale {scale:.3g}): a dropout called with training=True "
                    "(F.dropout's default: pass training=self.training) or other randomness in its forward; a "
                    "served network must answer an input the same way every time")
        cure = ("give it running statistics (BatchNorm with track_running_stats=True) or a per-sample "
                "normalisation (LayerNorm, GroupNorm, InstanceNorm), and attention over each sample's own tokens "
                "(batch_first=True for (N, L, E) inputs)")
        squeezed = ("or it drops the batch axis for a single input (x.squeeze() without a dim, view(-1)): use "
                    "squeeze(1) or flatten(1)")
        try:
            alone = torch.cat([answer(*(t[i:i + 1] for t in batch)) for i in range(len(batch[0]))])
        except Exception as e:  # noqa: BLE001 - any error here is the same fault, said in the user's terms
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            return (f"the {what} cannot answer one input alone in eval mode ({type(e).__name__}: {first}): it "
                    "computes a statistic over the batch axis (a BatchNorm with track_running_stats=False?), and a "
                    f"request of one input is answered alone; {cure}; {squeezed}")
        gap = differ(together, alone)
        if gap is not None:
            return (f"the {what}'s answer to an input depends on the other inputs of its batch in eval mode (largest "
                    f"difference {gap:.3g} at output scale {scale:.3g}, {len(batch[0])} inputs together vs each "
                    "alone): it computes a statistic over the batch axis (a BatchNorm with track_running_stats=False, "
                    "attention across the batch); the service answers different callers' inputs in one call, so one "
                    f"caller's answer would change with, and tell of, another's; {cure}"
                    + (f"; {squeezed}" if together.shape != alone.shape else ""))
    return None


def _require_per_sample(model: nn.Module, in_shape: Sequence[int],
                        extra_inputs: Sequence[tuple[str, Sequence[int]]] = ()) -> None:
    """:func:`per_sample_fault` on three random inputs, as a :class:`BundleError`: before the export traces it."""
    import torch

    from .train import device_of

    g = torch.Generator().manual_seed(0)
    shapes = [in_shape, *(s for _, s in extra_inputs)]
    batch = [torch.randn(3, *shape, generator=g, dtype=torch.float32).to(device_of(model)) for shape in shapes]
    why = per_sample_fault(model, batch)
    if why is not None:
        raise BundleError(why)


def _output_shape(model: nn.Module, in_shape: Sequence[int],
                  extra_inputs: Sequence[tuple[str, Sequence[int]]] = ()) -> list[int]:
    """The per-sample output shape of ``model`` on a zero input (a plain module's ``output.shape``)."""
    import torch

    from .train import device_of, evaluating

    device = device_of(model)
    shapes = [in_shape, *(s for _, s in extra_inputs)]
    args = [torch.zeros(1, *shape, device=device, dtype=torch.float32) for shape in shapes]
    with torch.no_grad(), evaluating(model):
        return list(model(*args).shape[1:])


def export_bundle(
    box: SafeDistillationBox | nn.Module,
    out: str | os.PathLike,
    *,
    name: str,
    in_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    labels: Sequence[str] | None = (),
    master_key: bytes | None = None,
    version: str = "1",
    task: str = "classification",
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    dynamic_spatial: bool = False,
    extra_inputs: Sequence[tuple[str, Sequence[int]]] = (),
    samples=None,
) -> Path:
    """Write ``box`` as a bundle directory, or a zip when ``out`` ends in ``.sdb``.

    ``box`` is a :class:`SafeDistillationBox` (modes ``sdb`` and ``nasty``) or a plain
    ``nn.Module``: mode ``plain``, no key, any output shape (pose heatmaps, images, ...)
    and any ``task``; what a plain model's outputs mean is the task's business.
    ``extra_inputs`` (plain modules only) are further named inputs, listed in ``meta["inputs"]``.
    ``samples`` (a few real inputs, (N, *in_shape)) check the export where the network is used
    (:func:`export_onnx`); a keyed box is also checked on them blended with its key. ``labels``: the class names in
    output order; none (``()`` or ``None``) leaves the classes numbered.
    """
    from .protect.box import SafeDistillationBox

    labels = () if labels is None else labels
    if isinstance(labels, str):
        raise BundleError(f"labels must be a list of the class names in output order, got the string {labels!r}")
    check_class_names({"labels": list(labels)}, name)  # before any export: the deploy would refuse the bundle

    _require_per_sample(box.model if isinstance(box, SafeDistillationBox) else box, in_shape, extra_inputs)
    if isinstance(box, SafeDistillationBox):
        model, mode, has_key = box.model, box.mode, box.has_key
        lam, temperature = (box.lam if box.has_key else None), box.temperature
        form, scale = box.public_form, (box.keyed_scale if box.has_key else 1.0)
        out_shape = _output_shape(model, in_shape)
        if extra_inputs:
            raise BundleError("a protection box has one input; extra_inputs are for plain modules")
    else:
        model, mode, has_key, lam, temperature, form, scale = box, "plain", False, None, None, None, 1.0
        out_shape = _output_shape(model, in_shape, extra_inputs)
    if has_key and master_key is None:
        raise BundleError("a keyed box needs the master key to seal its key")
    if samples is not None and has_key:  # the keyed path's inputs: the same network, another region
        import torch

        from .protect.key import blend

        x = torch.as_tensor(samples)[:4].detach().float().cpu()
        samples = torch.cat([x, blend(x, box.reveal_key().cpu(), box.lam)])
    files = {MODEL_FILE: export_onnx(model, in_shape, dynamic_spatial=dynamic_spatial, extra_inputs=extra_inputs,
                                     samples=samples)}
    meta: dict[str, Any] = {
        "format": FORMAT, "name": name, "version": str(version), "task": task, "mode": mode,
        "input": {"name": INPUT_NAME, "shape": list(in_shape), "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": out_shape},
        # (value / scale - mean) / std is the network's input: an image's pixels over 0..255, other inputs (feature
        # vectors, signals) standardised as they come, in their own units (255 made a tabular user's inputs garbage)
        "normalize": {"mean": list(map(float, mean)), "std": list(map(float, std)),
                      "scale": 255.0 if len(in_shape) == 3 else 1.0},
        "labels": list(labels), "lam": lam, "temperature": temperature,
        "metrics": metrics or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    if form is not None:  # only then: bundles without one keep their meta.json exactly as before
        meta["public_form"] = form
    if scale != 1.0:  # likewise: the keyed path's factor (protect.sdb.keyed_scale), where one was fitted
        meta["keyed_scale"] = scale
    if any(field in meta for field in ANSWER_FIELDS):
        meta["format"] = FORMAT_2
    if dynamic_spatial:
        meta["input"]["dynamic_spatial"] = True
    if extra_inputs:  # only then: single-input bundles keep their meta.json exactly as before
        meta["inputs"] = [dict(meta["input"])] + [
            {"name": n, "shape": list(s), "dtype": "float32",
             **({"dynamic_spatial": True} if dynamic_spatial and len(s) == len(in_shape) >= 2 else {})}
            for n, s in extra_inputs]
    output_shape(meta, f"bundle {name!r}")  # a network that disagrees with its labels is refused here, not on load
    if has_key:
        meta["key_binding"] = KEY_BINDING
        files[KEY_FILE] = seal(box.reveal_key(), master_key, aad=key_aad(meta, files))
    meta["files"] = {n: _sha256(b) for n, b in files.items()}
    files[META_FILE] = json.dumps(meta, indent=2).encode()
    return _write(files, Path(out))


def bundle_target(out: str | os.PathLike) -> Path:
    """Where a bundle may go: ``FILE.sdb`` (replaced if it exists), or a folder that is new, empty or a bundle's
    (which the new bundle replaces); BundleError otherwise. Checked before any work (``sdb wrap``), and again when
    the bundle is written: a folder holding anything else was removed whole, and an empty path meant the working
    directory."""
    if not str(out).strip():
        raise BundleError("the bundle's path is empty: name a new folder (or FILE.sdb)")
    p = Path(out)
    blocker = file_above(p)
    if blocker is not None:  # found when written, after the training
        raise BundleError(f"{p}: {blocker} is a file, not a folder")
    if p.suffix == ".sdb":
        if p.is_dir():
            raise BundleError(f"{p} is a folder: a .sdb bundle is a file")
        return p
    if p.exists() and not p.is_dir():
        raise BundleError(f"{p} is a file: a bundle is a folder (or FILE.sdb)")
    here = Path.cwd().resolve()
    if p.resolve() == here or p.resolve() in here.parents:  # replaced, it would take the working directory with it
        raise BundleError(f"{str(p)!r} is the working directory or holds it: name a new folder for the bundle")
    if p.is_dir():
        others = sorted(e.name for e in p.iterdir() if e.name not in BUNDLE_FILES)
        if others:
            raise BundleError(f"{p} holds other files than a bundle's ({', '.join(others[:5])}"
                              f"{', ...' if len(others) > 5 else ''}): name a new folder, or an existing bundle's to "
                              "replace it")
    return p


def _write(files: dict[str, bytes], out: Path) -> Path:
    target = bundle_target(out).absolute()  # its real parent ("x/.." is not "."), for the copy written beside it
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, then swapped in, so a reader never sees half a bundle; a copy that fails to be written or
    # swapped in is removed (it holds the sealed key).
    if target.suffix == ".sdb":
        tmp = target.with_name(target.name + ".tmp")
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for n, b in files.items():
                    z.writestr(n, b)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for n, b in files.items():
            (tmp / n).write_bytes(b)
        if target.exists():  # a bundle's folder (bundle_target): its files alone
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_bundle_files(path: str | os.PathLike, names: Sequence[str] = BUNDLE_FILES) -> dict[str, bytes]:
    """A bundle's files (``names`` of them: all by default), from its directory or ``.sdb`` zip; not verified."""
    p = Path(path)
    if not p.exists():
        raise BundleError(f"no bundle at {p}")
    if p.is_dir():
        for n in names:
            if (p / n).is_file() and (p / n).stat().st_size > _member_limit(n):
                raise BundleError(f"{p}: {n} is too large to be a bundle member ({_limit_text(n)})")
        return {n: (p / n).read_bytes() for n in names if (p / n).is_file()}
    try:
        with zipfile.ZipFile(p) as z:
            out = {}
            for info in z.infolist():
                if info.filename not in BUNDLE_FILES:
                    # nothing in a bundle that its meta.json cannot list (a name like ../x is never unpacked, but
                    # a stored copy would keep it)
                    raise BundleError(f"{p}: the archive holds {info.filename[:200]!r}, which is not a bundle file; "
                                      f"a .sdb holds {MODEL_FILE}, {META_FILE} and {KEY_FILE} at its top level, "
                                      "nothing else")
                if info.filename in names:
                    if info.filename in out:  # which copy counts would be up to the reader: none does
                        raise BundleError(f"{p}: {info.filename} is in the archive twice")
                    if info.file_size > _member_limit(info.filename):
                        raise BundleError(f"{p}: {info.filename} is too large to be a bundle member "
                                          f"({_limit_text(info.filename)})")
                    try:
                        out[info.filename] = z.read(info)
                    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError):
                        # corrupt data, a size that lies, encryption, an unknown compression method
                        raise BundleError(f"{p}: {info.filename} cannot be unpacked (corrupt, encrypted or "
                                          "compressed by an unknown method): zip the bundle again, deflated or "
                                          "stored, without a password") from None
            return out
    except zipfile.BadZipFile:
        raise BundleError(f"{p} is neither a bundle directory nor a .sdb zip"
                          + (f": {BARE_ONNX_HINT}" if p.suffix.lower() == ".onnx" else "")) from None


def _member_limit(name: str) -> int:
    return MAX_META_BYTES if name == META_FILE else MAX_MEMBER_BYTES


def _limit_text(name: str) -> str:
    return f"at most {_member_limit(name) >> 20} MiB"


def verify(files: dict[str, bytes], where: str = "bundle") -> dict:
    """Parse ``meta.json`` and check every listed file's sha256; return the meta."""
    if META_FILE not in files:
        raise BundleError(f"{where}: {META_FILE} is missing")
    if len(files[META_FILE]) > MAX_META_BYTES:
        raise BundleError(f"{where}: {META_FILE} is too large to be a bundle member ({_limit_text(META_FILE)})")
    try:
        meta = json.loads(files[META_FILE])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{where}: {META_FILE} is not valid JSON ({e})") from None
    except RecursionError:
        meta = None
    if meta is None or _depth(meta) > MAX_META_DEPTH:
        raise BundleError(f"{where}: {META_FILE} nests its values more than {MAX_META_DEPTH} levels deep")
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("sdb-bundle/"):
        raise BundleError(f"{where}: not an {FORMAT} bundle")
    if meta["format"] not in FORMATS:  # a later release's: its fields would be served as if they were not there
        raise BundleError(f"{where}: its format {meta['format'][:40]!r} is newer than this release reads "
                          f"({', '.join(FORMATS)}): serve it with the release that wrote it, or a later one")
    listed = meta.get("files")
    if not isinstance(listed, dict) or MODEL_FILE not in listed:
        raise BundleError(f"{where}: {META_FILE} lists no file hashes")
    for n, digest in listed.items():
        if n not in BUNDLE_FILES:  # model.onnx.data, a graph's external data: never read, so it read as "missing"
            raise BundleError(f"{where}: {META_FILE} lists {n[:200]!r}, which is not a bundle file (a bundle holds "
                              f"{MODEL_FILE}, {META_FILE} and {KEY_FILE} only; a graph's weights in external data, "
                              "as for models over ONNX's 2 GiB protobuf limit, are not supported)")
        if n not in files:
            raise BundleError(f"{where}: {n} is missing")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise BundleError(f"{where}: {META_FILE}'s files[{n!r}] must be its sha256 as 64 hex characters")
        if _sha256(files[n]) != digest.lower():  # as sha256sum prints it, or in capitals as certutil does
            raise BundleError(f"{where}: {n} was altered (sha256 mismatch)")
    unlisted = sorted(files.keys() - listed.keys() - {META_FILE})
    if unlisted:  # a key.sealed nobody hashed is not opened on trust
        raise BundleError(f"{where}: {', '.join(unlisted)} is not listed in {META_FILE}")
    if graph_entries(files[MODEL_FILE]) > MAX_GRAPH_ENTRIES:
        raise BundleError(f"{where}: {MODEL_FILE} holds more than {MAX_GRAPH_ENTRIES} nodes, initializers and value "
                          "infos (subgraphs included); ONNX Runtime would take minutes to load it, and a served "
                          "network has far fewer (the zoo's hold under 400)")
    for key in ("name", "version", "input", "labels", "normalize", "mode"):
        if key not in meta:
            raise BundleError(f"{where}: {META_FILE} has no {key!r}")
    if not isinstance(meta["input"], dict) or not isinstance(meta["labels"], list):
        raise BundleError(f"{where}: {META_FILE}'s input must be an object and its labels a list")
    _dims(meta["input"].get("shape"), "input", where)
    _check_fields(meta, where)
    if meta["mode"] not in MODES:
        raise BundleError(f"{where}: unknown mode {meta['mode']!r}")
    if meta["mode"] == "sdb" and KEY_FILE not in listed:
        raise BundleError(f"{where}: an sdb-mode bundle must carry {KEY_FILE}")
    if meta.get("public_form") is not None:
        if meta["mode"] != "sdb" or meta.get("task", "classification") != "classification":
            raise BundleError(f"{where}: only an sdb-mode classifier has a public form")
        try:
            PublicForm(meta["public_form"], output_shape(meta, where)[0])
        except (ValueError, OverflowError) as e:  # OverflowError: an integer no float holds
            raise BundleError(f"{where}: {META_FILE}'s public_form: {e}") from None
    return meta


def _depth(obj: Any) -> int:
    """How deep ``obj`` (parsed JSON) nests lists and objects, without recursing."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            if level <= MAX_META_DEPTH:
                stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _number(v: Any) -> bool:
    """A JSON number a float32 holds (JSON integers have no bound)."""
    return (type(v) is int and abs(v) < 1 << 63) or (type(v) is float and math.isfinite(v))


def _check_fields(meta: dict, where: str) -> None:
    """The fields the service reads to serve a bundle, each of the type it reads (a bundle written by hand
    is refused here, saying what to fix, rather than failing requests once it is served)."""
    def bad(what: str) -> BundleError:
        return BundleError(f"{where}: {META_FILE}'s {what}")

    task = meta.get("task", "classification")
    if not isinstance(task, str):
        raise bad(f"task must be a string such as \"classification\", got {task!r}")
    if not known_task(task):
        raise bad(f"task {task[:60]!r} is not one this service serves ({', '.join(TASKS)}, or dense tasks "
                  f"{'-'.join(DENSE_TASKS)} joined by '-'): a classifier's is \"classification\"")
    if "output" in meta and not isinstance(meta["output"], dict):
        raise bad(f'output must be an object ({{"name": "{OUTPUT_NAME}", "shape": [classes]}}), got {meta["output"]!r}')
    specs = meta.get("inputs") or [meta["input"]]
    for spec in specs if isinstance(specs, list) else []:
        if isinstance(spec, dict) and spec.get("dtype", "float32") != "float32":
            raise bad(f"input {spec.get('name')!r} has dtype {spec.get('dtype')!r}: the service feeds float32 "
                      "inputs, so the network must take float32 (export it from model.float()) and meta.json say "
                      '"dtype": "float32"')
    primary = meta["input"]
    if primary.get("name") != INPUT_NAME or "dtype" not in primary:
        raise bad(f'input must be {{"name": "{INPUT_NAME}", "shape": [...], "dtype": "float32"}}, the input the '
                  f"service feeds (got {primary!r:.200}); {EXPORT_HINT}")
    size = math.prod(primary["shape"])
    if size > MAX_INPUT_ELEMENTS:
        raise bad(f"input shape {primary['shape']} holds {size} values per sample; at most {MAX_INPUT_ELEMENTS}")
    labels = meta["labels"]
    if not all(isinstance(v, str) or type(v) is int for v in labels):
        raise bad('labels must be the class names, strings, in output order (e.g. ["cat", "dog"])')
    norm, shape = meta["normalize"], primary["shape"]
    channels = shape[0] if len(shape) == 3 and shape[0] in (1, 3) else None  # what an image upload is made into
    fix = (f'normalize must be {{"mean": [...], "std": [...], "scale": 255.0}}: numbers, one per input channel '
           f"({channels or 'or one for all'}), std not 0, which make an image (pixel/scale - mean)/std")
    if not isinstance(norm, dict) or not all(isinstance(norm.get(k), list) and norm[k] and all(map(_number, norm[k]))
                                             for k in ("mean", "std")):
        raise bad(f"{fix}; got {norm!r:.200}")
    if not all(norm["std"]) or not _number(norm.get("scale", 255.0)) or not norm.get("scale", 255.0) > 0:
        raise bad(f"{fix}; got {norm!r:.200}")
    if channels is not None and {len(norm["mean"]), len(norm["std"])} - {1, channels}:
        raise bad(f"{fix}; got {len(norm['mean'])} means and {len(norm['std'])} stds for {channels} channels")
    for key in ("lam", "temperature"):
        if meta.get(key) is not None and not _number(meta[key]):
            raise bad(f"{key} must be a number or null, got {meta[key]!r:.100}")
    if "keyed_scale" in meta and not (_number(meta["keyed_scale"]) and meta["keyed_scale"] > 0):
        raise bad(f"keyed_scale must be a positive number, got {meta['keyed_scale']!r:.100}")
    if not isinstance(meta.get("metrics", {}), dict):
        raise bad(f"metrics must be an object of figures, got {meta['metrics']!r:.100}")
    check = meta.get("check")
    if check is not None and not (isinstance(check, dict) and type(check.get("passed")) is bool
                                  and isinstance(check.get("thresholds"), dict)
                                  and isinstance(check.get("figures"), dict) and type(check.get("val_size")) is int):
        raise bad("check is the self-check report a wrap writes (passed, thresholds, figures, val_size); "
                  "a bundle made by hand has none: remove it")
    try:  # what the service answers about a model is read from here: a value JSON cannot write was a 500 to every list
        orjson.dumps(meta)
    except TypeError as e:  # orjson: text UTF-8 cannot write (a lone surrogate), an integer past 64 bits, deep nesting
        raise BundleError(f"{where}: {META_FILE} holds a value JSON cannot write back ({e}): plain text, numbers within "
                          "64 bits") from None


def check_class_names(meta: dict, where: str) -> None:
    """A new bundle's labels follow the rule data sets' class names do (:mod:`sdb_core.class_names`): checked where
    one is exported, deployed or registered, not where a registered one is loaded, so that a version served before
    the rule keeps serving after an upgrade (its labels are bound to its sealed key: no edit could mend them)."""
    if (problem := name_problem(meta["labels"])) is not None:
        raise BundleError(f"{where}: {META_FILE}'s labels: {problem}")


def reseal_bundle(path: str | os.PathLike, master_key: bytes) -> Path:
    """Re-seal a key-binding-1 bundle's key under key binding 2, in place; only for files you trust.

    Binding 1 let anyone who could write the bundle pair its key with another network, so
    re-sealing vouches for the ``model.onnx`` it finds: re-wrap instead if the bundle may have
    been written by someone else since it was exported.
    """
    files = read_bundle_files(path)
    meta = verify(files, str(path))
    if KEY_FILE not in files:
        raise BundleError(f"{path}: no {KEY_FILE} to re-seal")
    if meta.get("key_binding", 1) != 1:
        raise BundleError(f"{path}: already sealed under key binding {meta['key_binding']!r}")
    key = unseal(files[KEY_FILE], master_key, aad=_legacy_aad(meta))
    del meta["files"]
    meta["key_binding"] = KEY_BINDING
    body = {n: b for n, b in files.items() if n not in (META_FILE, KEY_FILE)}
    body[KEY_FILE] = seal(key, master_key, aad=key_aad(meta, body))
    meta["files"] = {n: _sha256(b) for n, b in body.items()}
    return _write({**body, META_FILE: json.dumps(meta, indent=2).encode()}, Path(path))


def _dims(value: Any, what: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise BundleError(f"{where}: {META_FILE}'s {what} shape must be a list of sizes, got {value!r}")
    return value


def output_shape(meta: dict, where: str = "bundle") -> list[int]:
    """The per-sample output shape ``meta.json`` promises, checked against its labels.

    Classifiers and multi-label models give one score per label, a pose model one heatmap
    per joint; other tasks' outputs are the task's business (``meta["outputs"]`` and the like).
    """
    task, labels = meta.get("task", "classification"), meta.get("labels")
    declared = meta.get("output", {}).get("shape") if isinstance(meta.get("output"), dict) else None
    if declared is None:
        if task not in LABELLED_TASKS or not labels:
            raise BundleError(f"{where}: {META_FILE} declares no output shape")
        declared = [len(labels)]  # a classifier's output is its labels
    shape = _dims(declared, "output", where)
    if labels and task in LABELLED_TASKS and shape != [len(labels)]:
        raise BundleError(f"{where}: a {task} model's output must be one score per label, "
                          f"[{len(labels)}] for {len(labels)} labels; {META_FILE} declares {shape}")
    if labels and task == "pose" and shape[:1] != [len(labels)]:
        raise BundleError(f"{where}: a pose model's output must be one heatmap per joint "
                          f"({len(labels)} joints); {META_FILE} declares {shape}")
    return shape


class PublicForm:
    """A public form, checked: row y of its table is the public answer when the network's top-1 is y: 0 at y,
    ``-gap`` at y's partners, ``-floor`` elsewhere. ``form`` is ``{"partners": [[...] per class], "gap",
    "floor"}`` (``sdb_core.protect.sdb.public_form``); ValueError, saying what is wrong, for anything else: so
    the public top-1 is the network's, each row's class is strictly on top. Rows are built per answer from the
    partners, so a head of 21k classes holds no K × K table."""

    def __init__(self, form: Any, classes: int | None = None) -> None:
        if not isinstance(form, dict) or set(form) != {"partners", "gap", "floor"}:
            raise ValueError('a public form is {"partners", "gap", "floor"}')
        partners, gap, floor = form["partners"], form["gap"], form["floor"]
        if not all(type(v) in (int, float) and np.isfinite(v) for v in (gap, floor)) or not 0 < gap < floor:
            raise ValueError(f"a public form needs finite 0 < gap < floor, got gap={gap!r}, floor={floor!r}")
        n = len(partners) if isinstance(partners, list) else 0
        if n < 2 or (classes is not None and n != classes):
            raise ValueError(f"a public form lists partners for each class ({classes or 'at least 2'}), got {n}")
        for y, ps in enumerate(partners):
            if not isinstance(ps, list) or not all(type(c) is int and 0 <= c < n and c != y for c in ps) \
                    or len(set(ps)) != len(ps):
                raise ValueError(f"public form partners of class {y} must be distinct other classes, got {ps!r}")
        # (K, widest) partner indices; a class with fewer partners pads with itself, which its 0 then overwrites
        width = max(len(ps) for ps in partners)
        self._partners = np.array([ps + [y] * (width - len(ps)) for y, ps in enumerate(partners)], dtype=np.int64)
        self.classes, self.gap, self.floor = n, float(gap), float(floor)

    def rows(self, top1: np.ndarray) -> np.ndarray:
        """The public answers, (len(top1), K) float32, for the network's top-1 classes ``top1``."""
        top1 = np.asarray(top1, dtype=np.int64)
        out = np.full((len(top1), self.classes), -self.floor, dtype=np.float32)
        at = np.arange(len(top1))
        out[at[:, None], self._partners[top1]] = -self.gap
        out[at, top1] = 0.0
        return out


def public_form_table(form: Any, classes: int | None = None) -> np.ndarray:
    """A public form's whole table, (K, K): row y answers top-1 y (:class:`PublicForm`; for small K)."""
    checked = PublicForm(form, classes)
    return checked.rows(np.arange(checked.classes))


def check_output_shape(session: Any, meta: dict, where: str = "bundle", run: bool = True) -> None:
    """Refuse a graph whose ``logits`` output disagrees with ``meta.json``: by the graph's declared
    dims, then by running it once on zeros of the input shape (a graph may declare one shape and
    compute another). ``run`` False: the declared dims only (a graph that passed its run already)."""
    want = output_shape(meta, where)
    specs = meta.get("inputs") or [meta["input"]]
    declared = [i.get("name") for i in specs if isinstance(i, dict)]
    graph_inputs = {i.name: i for i in session.get_inputs()}
    if sorted(graph_inputs) != sorted(map(str, declared)):
        raise BundleError(f"{where}: model.onnx's inputs are {sorted(graph_inputs)} but {META_FILE} declares "
                          f"{declared}: the service feeds {INPUT_NAME!r}; {EXPORT_HINT}")
    for i in graph_inputs.values():
        if i.type != "tensor(float)":
            raise BundleError(f"{where}: model.onnx's input {i.name!r} is a {i.type}, but the service feeds "
                              f"float32: {EXPORT_HINT}")
        if i.shape and isinstance(i.shape[0], int):
            raise BundleError(f"{where}: model.onnx's input {i.name!r} has a fixed batch size of {i.shape[0]}; a "
                              f"bundle's batch axis is dynamic: {EXPORT_HINT}")
    outputs = {o.name: o.shape for o in session.get_outputs()}
    kind = next((o.type for o in session.get_outputs() if o.name == OUTPUT_NAME), None)
    if kind is not None and kind not in SCORE_TYPES:
        raise BundleError(f"{where}: model.onnx's output {OUTPUT_NAME!r} is a {kind}: the service reads float scores "
                          "(an integer output, as a fully quantized graph ends, was served as all-zero probabilities); "
                          f"dequantize it, or export float logits: {EXPORT_HINT}")
    if OUTPUT_NAME not in outputs:
        raise BundleError(f"{where}: model.onnx has no output {OUTPUT_NAME!r} (it has {sorted(outputs)[:10]}): "
                          f"the service reads the one named {OUTPUT_NAME!r}, the scores before any softmax; "
                          f"{EXPORT_HINT}")
    graph = list(outputs[OUTPUT_NAME])
    shown = ["batch" if not isinstance(graph[0], int) else graph[0], *graph[1:]] if graph else []
    mismatch = (f"{where}: model.onnx outputs {shown} but {META_FILE} declares [batch, "
                f"{', '.join(map(str, want))}] (task {meta.get('task', 'classification')!r}, "
                f"{len(meta.get('labels') or [])} labels)")
    if len(graph) != 1 + len(want) or any(isinstance(g, int) and g != w for g, w in zip(graph[1:], want)):
        raise BundleError(mismatch)
    if isinstance(graph[0], int):
        raise BundleError(f"{where}: model.onnx has a fixed batch size of {graph[0]}; a bundle's batch axis is "
                          f"dynamic: {EXPORT_HINT}")
    try:
        feeds = {str(i["name"]): np.zeros((1, *_dims(i["shape"], "input", where)), np.float32) for i in specs}
    except (KeyError, TypeError):
        raise BundleError(f"{where}: {META_FILE}'s inputs must each have a name and a shape") from None
    if not run:
        return
    got = _check_run(session, feeds, where).shape
    if list(got) != [1, *want]:
        raise BundleError(f"{where}: model.onnx computes {list(got)} for one input but {META_FILE} "
                          f"declares [1, {', '.join(map(str, want))}]")


def _check_run(session: Any, feeds: dict[str, np.ndarray], where: str) -> np.ndarray:
    """The check run's ``logits``, stopped after :data:`MAX_CHECK_RUN_S` seconds: a graph that computes for
    ever on one input (a ``Loop`` of 10^15 trips) would otherwise hold a thread and a core of every process
    that loads it, for good, and its deploy would never answer."""
    import threading

    import onnxruntime as ort

    options, stopped = ort.RunOptions(), threading.Event()

    def stop() -> None:
        stopped.set()
        options.terminate = True

    timer = threading.Timer(MAX_CHECK_RUN_S, stop)
    timer.daemon = True
    timer.start()
    try:
        return session.run([OUTPUT_NAME], feeds, options)[0]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own hierarchy; a user sees one clear error
        if stopped.is_set():
            raise BundleError(f"{where}: model.onnx ran for more than {MAX_CHECK_RUN_S:g} s on one input of "
                              f"{META_FILE}'s shape, and was stopped; a served network answers one input in "
                              "far less (a Loop or Scan with a huge trip count?)") from None
        if ort_out_of_memory(e):
            raise BundleError(f"{where}: model.onnx needs more memory for one input of {META_FILE}'s shape than "
                              "this process lets a model use (a server's SDB_MODEL_MEMORY_MB)") from None
        raise BundleError(f"{where}: model.onnx does not run on {META_FILE}'s input shape ({e})") from None
    finally:
        timer.cancel()


def ort_out_of_memory(e: BaseException) -> bool:
    """Whether ONNX Runtime failed a call for memory: a bounded arena's refusal, or the process's."""
    text = str(e)
    return "Available memory of" in text or "Failed to allocate memory" in text


# A hostile graph's constants are built at load by ONNX Runtime's constant folding, outside every arena (it folds
# each node up to 1 GB and holds them all: four ConstantOfShape nodes of 800 MB took 3.9 GB while the session
# was made). Not folded, they are built by the
# check run and each call, from the arena a server bounds; an exported network has nothing left to fold (the
# exporter folds), and its calls cost the same (measured: cnn, resnet20, vit_tiny at batch 1 and 64).
UNFOLDED = ["ConstantFolding"]


# The providers this process chose for every session opened without explicit ones (use_providers): a job worker's,
# from its settings (SDB_ORT_PROVIDERS, SDB_GPU_MEM_LIMIT_MB), so that a job's teacher or audited bundle runs
# where the operator said, within the GPU memory the operator allowed. None: onnx_providers()'s own choice.
_process_providers: list | None = None


def use_providers(providers: list | None) -> None:
    """Make ``providers`` (names, or (name, options) pairs) this process's default for :func:`load_bundle`; None
    goes back to :func:`onnx_providers`'s own choice."""
    global _process_providers
    _process_providers = None if providers is None else list(providers)


def onnx_providers() -> list:
    """The providers this process chose (:func:`use_providers`), else CUDA when onnxruntime-gpu sees a device,
    then CPU."""
    if _process_providers is not None:
        return list(_process_providers)
    available = available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def cuda_visible(env=None) -> list[str] | None:
    """The devices ``CUDA_VISIBLE_DEVICES`` lets this process use (an empty list: none, as the service gives the job
    workers beyond its GPUs), or None when it is not set."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [d.strip() for d in value.split(",") if d.strip() and d.strip() != "-1"]


def ort_options(intra_threads: int = 0, inter_threads: int = 0):
    """ONNX Runtime options for a session that shares its process with other work: its thread pools sleep between
    runs. ONNX Runtime's default spins them after each run, which took the core the work beside it needed (a
    distill's torch steps between its teacher's calls: 1.4x the CPU on a quiet machine, 1.7x the time beside a busy
    one). 0 threads: ONNX Runtime's default count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads
    options.inter_op_num_threads = inter_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def available_providers() -> list[str]:
    """This onnxruntime's execution providers, less the GPU ones where ``CUDA_VISIBLE_DEVICES`` hides every device:
    onnxruntime-gpu lists them whatever the environment, and a session asking for one would log an error and fall
    back to the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if cuda_visible() == []:
        return [p for p in available if p not in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    return available


@dataclass
class Bundle:
    """A verified bundle in ONNX Runtime: public path for all, keyed path if the key opened."""

    meta: dict
    session: Any
    _key: np.ndarray | None
    meta_sha256: str | None = None  # of the meta.json bytes verified: names the bundle whole (it hashes every file)

    def __post_init__(self) -> None:
        form = self.meta.get("public_form")
        self._form = None if form is None else PublicForm(form)
        self._scale = float(self.meta.get("keyed_scale", 1.0))

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def network_logits(self, x: np.ndarray, options: Any = None) -> np.ndarray:
        """The network's own logits for ``x``: what the keyed path answers on a keyed input (``options``: ONNX
        Runtime's RunOptions, for a run that may be stopped)."""
        z = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}, options)[0]
        return z if z.dtype == np.float32 else z.astype(np.float32)  # a float16 or float64 graph's scores

    def public_answer(self, z: np.ndarray) -> np.ndarray:
        """The public path's answer for the network's logits ``z`` of plain inputs: ``z`` itself, or with a
        public form (``meta["public_form"]``, an SDB wrap's) the form's row of each top-1."""
        return z if self._form is None else self._form.rows(z.argmax(axis=1))

    @property
    def name(self) -> str:
        return self.meta["name"]

    def public_logits(self, x: np.ndarray) -> np.ndarray:
        return self.public_answer(self.network_logits(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = self.public_logits(x)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def keyed_input(self, x: np.ndarray) -> np.ndarray:
        if self._key is None:
            raise PermissionError(f"bundle {self.name!r} has no opened key: no distillable path")
        lam = float(self.meta["lam"])
        return (lam * np.asarray(x, dtype=np.float32) + (1.0 - lam) * self._key).astype(np.float32)

    def keyed_answer(self, z: np.ndarray) -> np.ndarray:
        """The keyed path's answer for the network's logits ``z`` of keyed inputs: ``z`` times the keyed scale
        (``meta["keyed_scale"]``, fitted to the teacher's soft labels by the wrap; 1 when absent)."""
        return z if self._scale == 1.0 else (z * np.float32(self._scale)).astype(np.float32)

    def distill_logits(self, x: np.ndarray) -> np.ndarray:
        return self.keyed_answer(self.network_logits(self.keyed_input(x)))

    def __repr__(self) -> str:
        return f"Bundle(name={self.name!r}, version={self.meta['version']!r}, key={'<hidden>' if self._key is not None else None})"


def opens_key(path: str | os.PathLike, master_key: bytes) -> bool | None:
    """Whether ``master_key`` opens the bundle's sealed key (None: it has none, or the bundle cannot be read):
    what tells a master key from another without loading the network."""
    try:
        files = read_bundle_files(path)
        meta = verify(files, str(path))
    except (BundleError, OSError, ValueError):
        return None
    if KEY_FILE not in files:
        return None
    try:
        unseal(files[KEY_FILE], master_key, aad=_opening_aad(meta, files, str(path)))
    except SealError:
        return False
    except (BundleError, ValueError):
        return None
    return True


def meta_digest(path: str | os.PathLike) -> str:
    """The sha256 of the bundle's meta.json, as :class:`Bundle`'s ``meta_sha256`` is, without loading it."""
    return _sha256(read_bundle_files(path, (META_FILE,)).get(META_FILE, b""))


def load_bundle(path: str | os.PathLike, master_key: bytes | None = None, *,
                session_options: Any = None, providers: list | None = None, verified: str | None = None) -> Bundle:
    """Verify and load a bundle; the key is opened only when ``master_key`` is given.

    ``verified``: the meta.json sha256 of a bundle that passed this whole check before (a served version's, as the
    store recorded it). A bundle with that meta.json (which hashes every file, checked here as always) holds the
    graph that ran then: its check run is not repeated, which took up to :data:`MAX_CHECK_RUN_S` of a tenant's
    graph at every server start and every load again after a cache eviction."""
    import onnxruntime as ort

    files = read_bundle_files(path)
    meta = verify(files, str(path))
    key = None
    if master_key is not None and KEY_FILE in files:
        k = unseal(files[KEY_FILE], master_key, aad=_opening_aad(meta, files, str(path)))
        if list(k.shape) != list(meta["input"]["shape"]):
            raise BundleError(f"{path}: key shape {list(k.shape)} does not match the input shape")
        key = k.astype(np.float32)
    try:
        session = ort.InferenceSession(files[MODEL_FILE], sess_options=ort_options() if session_options is None else session_options,
                                       providers=providers or onnx_providers(), disabled_optimizers=UNFOLDED)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own hierarchy; a user sees one clear error
        if "external data" in str(e).lower():  # ORT refuses to read files beside a graph given as bytes; its
            # message quotes the path the graph names, resolved on the server: not shown
            raise BundleError(f"{path}: model.onnx keeps weights in external data files, which a bundle does not "
                              "hold: its graph holds its weights itself, so models over ONNX's 2 GiB protobuf limit "
                              "are not supported (a smaller one: save it without external data)") from None
        raise BundleError(f"{path}: model.onnx does not load in ONNX Runtime ({e})") from None
    digest = _sha256(files[META_FILE])
    check_output_shape(session, meta, str(path), run=verified is None or digest != verified)
    return Bundle(meta, session, key, digest)
