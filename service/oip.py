"""The Open Inference Protocol's core (v2, as KServe and Triton speak it), whatever carries it.

The HTTP routes (:mod:`service.routes.v2`: JSON and the binary tensor extension) and the gRPC
server decode their requests into :class:`Tensor` objects and call the functions here; they encode
what comes back. Everything the protocol decides lives here once: the metadata, which outputs a
model serves, which input datatypes it takes and how they become the model's FP32 input, the output
policy, the keyed path's key check and quota charge (through :mod:`service.inference`, as every
route), and the protocol's errors (an :class:`~service.errors.ApiError`: its ``status`` and
``message`` are what a transport answers; gRPC maps the status to its code).

Public outputs follow the model version's output policy (the metadata lists them):

- ``probs``: ``probabilities`` FP32 [N, C], every class in label order;
- ``top_k``: ``probabilities`` FP32 [N, k], the k highest renormalised, in decreasing order, and
  ``classes`` INT64 [N, k], their class indices: the other classes are absent, not zero-filled;
- ``label``: ``classes`` INT64 [N, 1], the predicted class, and no probability at all.

``distill_logits`` is the keyed path (asked for by name, and only with a ``distill`` key for the
model), not subject to the policy.

The classification extension (an output's ``classification``, tritonclient's ``class_count``) ranks what an
output already lets out: ``probabilities`` (under ``top_k``, its k) or ``distill_logits``, each sample's k highest
as BYTES ``"value:index:label"``; ``classes`` holds no score to rank.

The API (a transport imports these; names are added, never renamed): :class:`Tensor`,
:class:`Caller`, :data:`INPUT_DATATYPES`, :data:`EXTENSIONS`, :func:`server_metadata`,
:func:`served_model`, :func:`model_metadata`, :func:`model_config`, :func:`max_batch_size`, :func:`model_statistics`,
:func:`repository_index`, :func:`output_names`,
:func:`requested_outputs`, :func:`check_output_count`, :func:`not_one_input`,
:func:`tensor_shape`, :func:`check_samples`, :func:`classification_counts`, :func:`unsupported_datatype`,
:func:`model_input`, :func:`infer`, :func:`answer_size`;
raw tensor bytes (gRPC's ``raw_input_contents``) decode with :func:`service.oip_binary.from_raw`.
# oip core: stable API
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from .auth import ApiKey, Keyring
from .disclosure import hide_paths
from .errors import ApiError, invalid, quoted
from .inference import (
    built,
    charge_keyed,
    check_answer_size,
    keyed_logits,
    listable,
    policy_outputs,
    public_logits,
    require_predict,
    require_task,
    rounded,
)
from .metrics import Metrics
from .registry import HostedModel, ModelHost, PairedPaths
from .schemas import MAX_TOP_K, OutputPolicy
from .settings import Settings
from .tensors import as_batch, finite_float32, images_to_inputs, softmax

PUBLIC_OUTPUT, CLASSES_OUTPUT, KEYED_OUTPUT = "probabilities", "classes", "distill_logits"
OUTPUT_NAMES = (PUBLIC_OUTPUT, CLASSES_OUTPUT, KEYED_OUTPUT)  # every output any model here serves
SERVER_NAME = "sdb"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics")  # GET /v2's (HTTP's)
# What an infer input may be sent as; the model takes FP32 (see model_input for the conversions).
INPUT_DATATYPES = ("FP32", "FP16", "FP64", "INT64", "BOOL", "BYTES")
_EXACT_INT = 1 << 24  # every integer up to 2**24 in magnitude is exact in float32


@dataclass(frozen=True, slots=True)
class Tensor:
    """One named tensor of a request or a response.

    ``data`` holds ``prod(shape)`` values, row-major: for BYTES an object array of ``bytes``, else a
    numeric array. Output tensors' arrays may be wider than their datatype (an FP32 output rounded
    to the policy's decimals comes as float64, so that JSON prints 0.123): an encoder casts to it.
    """

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


class Caller(Protocol):
    """Who calls and with what: :class:`service.deps.Serving` is one (the gRPC server builds its own)."""

    settings: Settings
    host: ModelHost
    keyring: Keyring
    metrics: Metrics
    key: ApiKey | None  # None: no key was sent (one that was sent has been authenticated)
    caller: str  # its key's id, or its address without one: an isolated model batches each caller apart


# --------------------------------------------------------------------------- metadata
def _server_version() -> str:
    try:
        return package_version("safe-distillation-box")  # pyproject.toml's name
    except PackageNotFoundError:
        return "0"


def server_metadata(extensions: tuple[str, ...] = EXTENSIONS) -> dict:
    """The server's name, version and protocol extensions (those of the transport asking: the binary
    tensor extension is HTTP's; gRPC carries raw tensors natively and passes none)."""
    return {"name": SERVER_NAME, "version": _server_version(), "extensions": list(extensions)}


async def served_model(ctx: Caller, name: str, version: str | None = None) -> HostedModel:
    """The model a metadata or readiness request names, after the caller's predict access was checked
    (before the lookup, so that a caller who may not predict cannot probe names)."""
    require_predict(ctx.key, name, ctx.settings.public_predict)
    return await ctx.host.aget(name, version)


def public_outputs(policy: OutputPolicy, classes: int) -> list[dict]:
    """The public output tensors a model serves under its policy: name, datatype, shape (-1: the batch)."""
    if policy.policy == "probs":
        return [{"name": PUBLIC_OUTPUT, "datatype": "FP32", "shape": [-1, classes]}]
    k = 1 if policy.policy == "label" else min(policy.top_k, classes)
    probabilities = [{"name": PUBLIC_OUTPUT, "datatype": "FP32", "shape": [-1, k]}] if policy.policy == "top_k" else []
    return probabilities + [{"name": CLASSES_OUTPUT, "datatype": "INT64", "shape": [-1, k]}]


def model_metadata(host: ModelHost, model: HostedModel) -> dict:
    """The model's input and the outputs ``infer`` serves: none for a model of a task it does not serve (multilabel,
    pose, style: /v1's), which standard clients read as servable and then every infer failed."""
    classes = len(model.labels)
    outputs = [] if model.task != "classification" else public_outputs(model.policy, classes) + (
        [{"name": KEYED_OUTPUT, "datatype": "FP32", "shape": [-1, classes]}] if model.distillable else [])
    return {"name": model.name, "versions": host.versions(model.name), "platform": "onnxruntime_onnx",
            "inputs": [{"name": model.meta["input"]["name"], "datatype": "FP32", "shape": [-1, *model.in_shape]}],
            "outputs": outputs}


# Bytes of a request besides its input tensor: the binary extension's JSON header, or the protobuf's other fields
# (tritonclient's take a few hundred).
REQUEST_HEADER_ROOM = 1024


def max_batch_size(settings: Settings, model: HostedModel, outputs: int) -> int:
    """The most samples of ``model`` one request may hold and be answered (at least 1): ``max_request_samples``,
    fewer where the payload limit holds fewer in the binary layout (FP32 tensors, as tritonclient and gRPC send
    them) or the answer bound fewer answers of ``outputs`` paths. A client that batches by it is never refused."""
    sample_bytes = 4 * math.prod(model.in_shape)
    fit = [settings.max_request_samples, (settings.max_payload_bytes - REQUEST_HEADER_ROOM) // sample_bytes]
    if outputs:
        fit.append(settings.max_answer_values // max(model.num_classes * outputs, 1))
    return max(min(fit), 1)


def model_config(host: ModelHost, model: HostedModel, max_samples: int | None = None) -> dict:
    """Triton's model configuration extension, read only: the metadata's tensors as a ``config.pbtxt`` in JSON
    (``TYPE_`` datatypes, dims without the batch, which ``max_batch_size`` bounds: :func:`max_batch_size` under the
    host's settings, and at most ``max_samples`` when given). Triton's own tools ask for it (perf_analyzer,
    tritonclient's ``get_model_config``) and batch by it; it says nothing else the metadata does not."""
    meta = model_metadata(host, model)
    paths = {PUBLIC_OUTPUT if t["name"] == CLASSES_OUTPUT else t["name"] for t in meta["outputs"]}
    batch = max_batch_size(host.settings, model, len(paths))

    def tensors(specs: list[dict]) -> list[dict]:
        return [{"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"][1:]} for t in specs]

    return {"name": model.name, "platform": meta["platform"], "backend": "onnxruntime",
            "max_batch_size": batch if max_samples is None else min(batch, max_samples),
            "input": tensors(meta["inputs"]), "output": tensors(meta["outputs"])}


async def model_statistics(ctx: Caller, name: str = "", version: str = "") -> dict:
    """The statistics extension's answer, ``{"model_stats": [...]}`` (:mod:`service.statistics`): one version's
    (``version``), every loaded version of one model (``name``), or with neither every loaded version of every
    model the caller may predict with. A named model is behind the metadata's access check; the whole list needs
    what predict needs (a key with the predict scope when ``public_predict`` is off) and leaves out the models
    the caller's key is not allowed."""
    if name:
        model = await served_model(ctx, name, version or None)
        models = [model] if version else [m for m in ctx.host.all() if m.name == model.name]
    else:
        if version:
            raise invalid("a version needs a model name", "invalid_request")
        shown = listable(ctx.key, ctx.settings.public_predict)  # as GET /v1/models
        models = [m for m in ctx.host.all() if shown(m.name)]
    return {"model_stats": [m.stats.to_dict(m.name, m.version) for m in models]}


def repository_index(ctx: Caller, ready: bool = False) -> list[dict]:
    """Triton's model repository extension, its index alone (read only: models are deployed through /v1): every
    version served that the caller may predict with, ``READY``; unless ``ready``, also those that could not be
    loaded, ``UNAVAILABLE`` with why (server paths hidden, as /readyz says it). Standard clients list models
    this way (tritonclient's ``get_model_repository_index``): the protocol's core has no listing."""
    shown = listable(ctx.key, ctx.settings.public_predict)
    index = [{"name": m.name, "version": m.version, "state": "READY", "reason": ""}
             for m in ctx.host.all() if shown(m.name)]
    if not ready:
        index += [{"name": n, "version": v, "state": "UNAVAILABLE", "reason": hide_paths(why, ctx.settings.data_dir)}
                  for (n, v), why in sorted(ctx.host.failures().items()) if shown(n)]
    return index


def output_names(model: HostedModel) -> list[str]:
    """The public outputs a model serves, in order: what an infer request that names none gets."""
    return [o["name"] for o in public_outputs(model.policy, model.num_classes)]


def requested_outputs(model: HostedModel, names: Sequence[str] | None) -> list[str]:
    """The outputs to answer, deduplicated in the order asked; None: the public ones. 422 for any other name."""
    public = output_names(model)
    if names is None:
        return public
    unknown = [n for n in names if n not in (*public, KEYED_OUTPUT)]
    if unknown:
        raise invalid(f"unknown output(s) [{', '.join(map(quoted, unknown))}]; this model serves "
                      f"{', '.join([*public, KEYED_OUTPUT])} (output policy {model.policy.policy})", "invalid_request")
    return list(dict.fromkeys(names))


def check_output_count(count: int) -> None:
    """422 for a request that asks more outputs than any model serves, from their count: a transport checks it
    before it reads any of them (100,000 names were each read, then all quoted in the error)."""
    if count > len(OUTPUT_NAMES):
        raise invalid(f"{count} outputs asked for; a model serves at most {len(OUTPUT_NAMES)} "
                      f"({', '.join(OUTPUT_NAMES)}): name each once", "invalid_request")


# --------------------------------------------------------------------------- inputs
MAX_TENSOR_ELEMENTS = 1 << 40


def tensor_shape(value: Any) -> list[int]:
    """A tensor's shape as the protocol writes it: a list of at most 8 non-negative integers, each an int64 as
    the protocol's gRPC form has them (JSON's parser takes integers up to 2**64 - 1); 422 otherwise."""
    if value == []:
        raise invalid("shape [] is a scalar, which no model here takes: send [N, ...] (its metadata gives the rest)",
                      "invalid_shape")
    if (not isinstance(value, list) or not value or len(value) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 63 for d in value)):
        raise invalid("shape must be a list of non-negative integers (int64)", "invalid_shape")
    # An empty tensor's other dimensions are bounded too: numpy refuses to shape even zero elements as [0, 2**62]
    # (its byte count, zeros aside, must fit an address), and that was a 500.
    if math.prod(d for d in value if d) > MAX_TENSOR_ELEMENTS:
        raise invalid(f"shape {value} spans more than {MAX_TENSOR_ELEMENTS} elements (its dimensions other than 0, "
                      "multiplied): no request carries such a tensor", "invalid_shape")
    return value


def check_samples(datatype: Any, shape: Sequence[int], max_samples: int) -> None:
    """BYTES holds one image per sample: 422 for more elements than ``max_samples``, from the shape alone, before
    a transport reads any element (millions of empty ones fit in a body). Numbers need no such check: they are
    read without a copy, and :func:`model_input` counts their samples before any model time is spent."""
    if datatype == "BYTES" and math.prod(shape) > max_samples:
        raise invalid(f"{math.prod(shape)} samples in one request; at most {max_samples}", "too_many_samples")


def not_one_input() -> ApiError:
    """Every model here takes one input tensor: a transport refuses any other count from the request's length,
    before it decodes a tensor (380,000 tiny ones were each decoded first: seconds of the event loop)."""
    return invalid("inputs must be a list of exactly one tensor object", "invalid_request")


def unsupported_datatype(datatype: Any) -> ApiError:
    if datatype is None:
        return invalid("an input needs a datatype, e.g. \"datatype\": \"FP32\"", "invalid_dtype")
    return invalid(f"datatype {quoted(datatype)} is not supported; send FP32 (or FP16, FP64, INT64 or BOOL values "
                   f"that convert to it, or BYTES of PNG/JPEG images)", "invalid_dtype")


def _as_float32(t: Tensor) -> np.ndarray:
    data = t.data
    if t.datatype in ("FP32", "FP16", "FP64"):  # FP64 (numpy's default) rounded to the model's FP32, as v1's .npy
        return finite_float32(data, "data")
    if t.datatype == "INT64":
        if data.size and (int(data.min()) < -_EXACT_INT or int(data.max()) > _EXACT_INT):
            raise invalid(f"INT64 values beyond ±{_EXACT_INT} do not convert exactly to the model's FP32 input; "
                          "send FP32", "invalid_dtype")
        return data.astype(np.float32)
    return data.astype(np.float32)  # BOOL: 0 and 1


def _images(t: Tensor, model: HostedModel, max_samples: int) -> np.ndarray:
    """BYTES: one PNG/JPEG per element, decoded and normalised as the model's training data."""
    images = t.data.ravel()
    if not images.size:
        raise invalid("BYTES input has no element: send one PNG or JPEG image per sample", "invalid_shape")
    check_samples("BYTES", images.shape, max_samples)  # the transports checked the shape already; here for any
    if len(model.in_shape) != 3:
        raise invalid(f"this model takes inputs of shape {model.in_shape}, not images: send FP32", "invalid_dtype")
    shape, norm = model.in_shape, model.meta["normalize"]
    return images_to_inputs([bytes(b) for b in images], shape, norm)


async def model_input(model: HostedModel, inputs: Sequence[Tensor], max_samples: int) -> np.ndarray:
    """The model's FP32 input batch (N, *in_shape) from the request's one input tensor.

    FP32 as sent; FP16 widened; FP64 rounded (beyond FP32's range: 422); INT64 within ±2**24 and BOOL
    (0, 1) converted exactly; BYTES: one
    PNG/JPEG image per element, decoded like the v1 image upload. Any other datatype, a lossy INT64,
    NaN or Inf: 422.
    """
    expected = model.meta["input"]["name"]
    if len(inputs) != 1:
        raise not_one_input()
    t = inputs[0]
    if t.name is None:
        raise invalid(f"an input needs a name: this model's is {expected!r}", "invalid_request")
    if t.name != expected:
        raise invalid(f"unknown input {quoted(t.name)}; this model's input is {expected!r}", "invalid_request")
    if t.datatype not in INPUT_DATATYPES:
        raise unsupported_datatype(t.datatype)
    if t.datatype == "BYTES":  # decoding is CPU work that grows with the image: off the event loop
        return await run_in_threadpool(_images, t, model, max_samples)
    x = _as_float32(t)
    if x.size == 0:
        raise invalid("data is empty", "invalid_shape")
    return as_batch(x.reshape(t.shape), model.in_shape, max_samples)


# --------------------------------------------------------------------------- infer
def _public_values(probs: np.ndarray, policy: OutputPolicy) -> dict[str, np.ndarray]:
    if policy.policy == "probs":
        return {PUBLIC_OUTPUT: rounded(probs, policy.decimals)}
    idx, values = policy_outputs(probs, policy)
    return {CLASSES_OUTPUT: idx.astype("int64"), **({} if values is None else {PUBLIC_OUTPUT: values})}


def classification_counts(model: HostedModel, wanted: Sequence[str], asked: Mapping[str, Any]) -> dict[str, int]:
    """The classification extension's ``class_count`` of each output that asks one (0: none, as Triton reads it),
    checked before any model time is spent: an integer from 0 to :data:`~service.schemas.MAX_TOP_K` (v1's bound
    on top_k), on an output that holds scores (``probabilities``, ``distill_logits``); 422 otherwise."""
    counts = {}
    for name, k in asked.items():
        if name not in wanted or k is None:
            continue
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_K:
            raise invalid(f"output {name!r}: classification (class_count) must be a non-negative integer, got "
                          f"{quoted(k)}: it ranks at most {MAX_TOP_K} classes per sample, as /v1's top_k",
                          "invalid_request")
        if k and name == CLASSES_OUTPUT:
            scored = [n for n in output_names(model) if n == PUBLIC_OUTPUT] + [KEYED_OUTPUT]
            raise invalid(f"output {CLASSES_OUTPUT!r} holds class indices, not scores; classification ranks "
                          f"{' or '.join(map(repr, scored))} (output policy {model.policy.policy})", "invalid_request")
        if k:
            counts[name] = k
    return counts


def _classified(scores: np.ndarray, classes: np.ndarray | None, k: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification of (N, C) ``scores``: each row's ``k`` highest (or all, when fewer), decreasing, as
    ``b"value:index:label"`` ((N, k) BYTES; ``value`` as C's ``%f``, no label when the bundle has none).
    ``classes``: the class index of each score when ``scores`` are a policy's top k already in order."""
    if classes is None:
        classes = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(scores, classes, axis=1)
    scores, classes = scores[:, :k], classes[:, :k]
    named = (lambda c: f":{labels[c]}") if labels else (lambda c: "")
    rows = [[f"{v:f}:{c}{named(c)}".encode() for v, c in zip(row, cls, strict=True)]
            for row, cls in zip(scores.tolist(), classes.tolist(), strict=True)]
    return np.array(rows, dtype=object).reshape(scores.shape)


async def infer(ctx: Caller, model: HostedModel, inputs: Sequence[Tensor], outputs: Sequence[str] | None = None,
                classification: Mapping[str, Any] | None = None) -> list[Tensor]:
    """The output tensors, in the order asked (``outputs`` None: the public ones), for decoded ``inputs``.

    In order: the model's task (a classifier), the outputs' names and their ``classification`` (the extension's
    class_count, by output name), a key for ``distill_logits`` (401) and predict access for the public ones, the
    input and the answer's size (413 past ``max_answer_values``), then the keyed path's scope and quota charge
    (before any model time is spent). Both paths, asked together, are one item of the model's batcher
    (:class:`~service.registry.PairedPaths`): one ONNX Runtime call, one request of N samples in its statistics.
    An output with a class_count answers BYTES (N, k) instead. A large answer is built in a worker thread.
    """
    require_task(model)
    wanted = requested_outputs(model, outputs)
    counts = classification_counts(model, wanted, classification or {})
    served_public = [n for n in wanted if n != KEYED_OUTPUT]
    keyed = KEYED_OUTPUT in wanted
    if keyed and ctx.key is None:
        raise ApiError(401, "missing_key", f"output {KEYED_OUTPUT!r} needs an API key with the distill scope",
                       {"WWW-Authenticate": "Bearer"})
    if served_public:
        require_predict(ctx.key, model.name, ctx.settings.public_predict)
    x = await model_input(model, inputs, ctx.settings.max_request_samples)
    classes, paths = model.num_classes, bool(served_public) + keyed
    check_answer_size(classes, len(x), paths, ctx.settings.max_answer_values)
    jobs = {}
    source = PairedPaths(model) if keyed and served_public else model  # both: one batcher item, one request
    if keyed:  # the scope and a quota before anything runs (a key without one: beside the model's call)
        charge = await charge_keyed(model, len(x), ctx.key, ctx.keyring)
        jobs[KEYED_OUTPUT] = keyed_logits(source, x, ctx.key, ctx.keyring, ctx.metrics, charge=charge)
    if served_public:
        jobs["public"] = public_logits(source, x, ctx.key, ctx.keyring, ctx.metrics, ctx.caller)
    if len(jobs) == 1:  # one path (nearly every request): awaited as it is, without gather's task around it
        (name, job), = jobs.items()
        results = {name: await job}
    else:  # both finish before an error leaves: the keyed one gives its charge back first (inference.keyed_logits)
        done = await asyncio.gather(*jobs.values(), return_exceptions=True)
        failed = next((r for r in done if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        results = dict(zip(jobs, done))
    return await built(len(x) * classes * paths, _answer, model, wanted, counts, results)


def _answer(model: HostedModel, wanted: Sequence[str], counts: Mapping[str, int],
            results: Mapping[str, np.ndarray]) -> list[Tensor]:
    """The output tensors of the paths' logits (``results``: ``"public"``, :data:`KEYED_OUTPUT`), in the order
    asked: work in proportion to samples x classes, which :func:`infer` moves off the event loop when large."""
    values = _public_values(softmax(results["public"]), model.policy) if "public" in results else {}
    if KEYED_OUTPUT in results:
        values[KEYED_OUTPUT] = results[KEYED_OUTPUT]
    answer = []
    for name in wanted:
        if name in counts:  # the top_k policy's scores come ranked already, with their classes beside them
            ranked = values.get(CLASSES_OUTPUT) if name == PUBLIC_OUTPUT else None
            data = _classified(values[name], ranked, counts[name], model.meta["labels"])
            answer.append(Tensor(name, "BYTES", list(data.shape), data))
        else:
            answer.append(Tensor(name, "INT64" if name == CLASSES_OUTPUT else "FP32", list(values[name].shape),
                                 values[name]))
    return answer


def answer_size(outputs: Sequence[Tensor]) -> int:
    """The values an answer's tensors hold: a transport encodes a large answer in a worker thread
    (:func:`service.inference.built`)."""
    return sum(t.data.size for t in outputs)
