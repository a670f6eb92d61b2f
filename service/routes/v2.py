"""The Open Inference Protocol (v2) over HTTP: JSON, and the binary tensor data extension.

This module decodes requests and encodes answers; what the protocol means (metadata, outputs under the
model's output policy, the keyed ``distill_logits``, input datatypes) is :mod:`service.oip`'s, which
the gRPC server shares. An infer body is JSON, or with ``Inference-Header-Content-Length`` a JSON
header followed by raw tensors (:mod:`service.oip_binary`); outputs asked with
``parameters.binary_data`` (or all of them with the request's ``binary_data_output``) come back the
same way, as ``application/octet-stream``. Errors are the protocol's ``{"error": "message"}`` with
its HTTP status (:mod:`service.errors` picks that form for every ``/v2`` path).

The request and response models below document the JSON bodies; the routes read and write them raw
(:func:`service.schemas.json_response`): a pydantic pass over a tensor would cost more than the model.
"""
from __future__ import annotations

import math

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from .. import oip, oip_binary
from ..bodies import read_bytes
from ..deps import (
    NAME_DOC,
    SERVING_DOC,
    VERSION_DOC,
    ModelName,
    ModelVersion,
    Serving,
    ServingDep,
    path_param,
    serving,
)
from ..direct import direct
from ..errors import ApiError, invalid
from ..inference import built, require_task
from ..oip import (
    CLASSES_OUTPUT,
    INPUT_DATATYPES,
    KEYED_OUTPUT,
    PUBLIC_OUTPUT,
    Tensor,
    public_outputs,  # noqa: F401 (re-exported: its home was here)
    tensor_shape,
    unsupported_datatype,
)
from ..oip_binary import HEADER_LENGTH, OCTET_STREAM
from ..registry import HostedModel
from ..schemas import AUTH, MAX_TOP_K, json_body_doc, json_response, ok, responses
from ..tensors import parse_json, to_array
from .health import not_ready

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])


class InferInputParameters(BaseModel):
    binary_data_size: int | None = Field(None, ge=0, description="binary tensor extension: the tensor's bytes "
                                         f"follow the JSON header ({oip_binary.HEADER_LENGTH}), in input order")


class InferInput(BaseModel):
    name: str = Field(description="the model's input name (its metadata says it)")
    shape: list[int] = Field(description="the tensor's shape: [N, C, H, W], one sample [C, H, W], or [N, C·H·W]; "
                             "BYTES: one image per element, [N] or [N, 1]")
    datatype: str = Field(description="FP32; FP16, INT64 (within ±2^24) or BOOL, converted exactly to the model's "
                          "FP32; FP64, rounded to it; BYTES: PNG or JPEG images (binary only)")
    data: list | None = Field(None, description="row-major values, flat or nested (absent with binary_data_size)")
    parameters: InferInputParameters | None = None


class InferOutputParameters(BaseModel):
    binary_data: bool | None = Field(None, description="answer this output as raw bytes after the JSON header")
    classification: int | None = Field(None, ge=0, le=MAX_TOP_K, description="the classification extension: answer "
                                       "the k highest scores of each sample instead, as BYTES \"value:index:label\", "
                                       f"decreasing ({PUBLIC_OUTPUT} or {KEYED_OUTPUT}; 0: none)")


class InferOutputRequest(BaseModel):
    name: str = Field(description=f"{PUBLIC_OUTPUT} or {CLASSES_OUTPUT} (as the model's output policy serves "
                      f"them: see its metadata), or {KEYED_OUTPUT} (needs a distill key)")
    parameters: InferOutputParameters | None = None


class InferRequestParameters(BaseModel):
    binary_data_output: bool | None = Field(None, description="every output in binary unless it says otherwise")


class InferRequest(BaseModel):
    id: str | None = Field(None, description="echoed in the response")
    inputs: list[InferInput] = Field(description="exactly one tensor")
    outputs: list[InferOutputRequest] | None = Field(None, description="default (absent or []): the public outputs")
    parameters: InferRequestParameters | None = None


class InferOutputBinary(BaseModel):
    binary_data_size: int = Field(description="this output's bytes after the JSON header, in output order")


class InferOutput(BaseModel):
    name: str
    datatype: str = Field(description=f"FP32, INT64 for {CLASSES_OUTPUT}, or BYTES for an output asked with the "
                          "classification parameter")
    shape: list[int]
    data: list[float] | list[str] | None = Field(None, description="row-major, flat (absent for an output sent in "
                                                 "binary): numbers, or BYTES' strings \"value:index:label\"")
    parameters: InferOutputBinary | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it sent one")
    outputs: list[InferOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size (the batch)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor] = Field(description=f"the public outputs under the output policy, and "
                                          f"{KEYED_OUTPUT} when the model is distillable")


class ConfigTensor(BaseModel):
    name: str
    data_type: str = Field(description="TYPE_FP32, or TYPE_INT64 for classes")
    dims: list[int] = Field(description="without the batch")


class ModelConfig(BaseModel):
    name: str
    platform: str
    backend: str
    max_batch_size: int = Field(description="the most samples one request may hold: SDB_MAX_REQUEST_SAMPLES, fewer "
                                "where fewer FP32 samples fit SDB_MAX_PAYLOAD_BYTES or their answer (every output) "
                                "SDB_MAX_ANSWER_VALUES")
    input: list[ConfigTensor]
    output: list[ConfigTensor] = Field(description="as the metadata's outputs")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    version: str | None = Field(None, description="on the version route")
    ready: bool


_MODEL_ERRORS = responses(*AUTH, 404, 503, v2=True, why={
    401: "a key that is malformed, unknown, revoked or expired; or none, when predict needs one (public_predict off)",
    404: "no such model or version"})
_METADATA_EXAMPLE = {"name": "mnist-demo", "versions": ["1"], "platform": "onnxruntime_onnx",
                     "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                     "outputs": [{"name": PUBLIC_OUTPUT, "datatype": "FP32", "shape": [-1, 10]},
                                 {"name": KEYED_OUTPUT, "datatype": "FP32", "shape": [-1, 10]}]}
_INFER_EXAMPLE = {"id": "r1", "inputs": [{"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32",
                                          "data": [0.0, 0.5, 1.0, 0.25]}],
                  "outputs": [{"name": PUBLIC_OUTPUT}]}


_EXTENSIONS_EXAMPLE = {"name": "sdb", "version": "0.1.0", "extensions": list(oip.EXTENSIONS)}


@router.get("", summary="Server metadata", response_model=ServerMetadata,
            responses={**ok(_EXTENSIONS_EXAMPLE), **responses(429, v2=True)})
async def server_metadata() -> Response:
    return json_response(oip.server_metadata())


@router.get("/health/live", summary="Server live", response_model=ServerLive,
            responses={**ok({"live": True}), **responses(429, v2=True)})
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Server ready (503 while starting or stopping)", response_model=ServerReady,
            responses={**ok({"ready": True}), **responses(429, 503, v2=True)})
async def ready(request: Request) -> Response:
    if not getattr(request.app.state, "ready", False):
        raise not_ready(request.app.state)
    return json_response({"ready": True})


class StatisticDuration(BaseModel):
    count: int
    ns: int = Field(description="cumulative nanoseconds")


class InferStatistics(BaseModel):
    success: StatisticDuration = Field(description="requests answered, from their entry into the model's queue")
    fail: StatisticDuration = Field(description="requests that failed at the model (its call, a key's quota)")
    queue: StatisticDuration = Field(description="waits in the model's queue until the call started")
    compute_input: StatisticDuration = Field(description="preparing a call's input, once per request it served")
    compute_infer: StatisticDuration = Field(description="ONNX Runtime's run, once per request it served")
    compute_output: StatisticDuration = Field(description="cutting a call's answers, once per request it served")
    cache_hit: StatisticDuration = Field(description="always zero: no response cache")
    cache_miss: StatisticDuration = Field(description="always zero: no response cache")


class BatchStatistics(BaseModel):
    batch_size: int = Field(description="samples in one ONNX Runtime call")
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


class ModelVersionStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="ms since the epoch of the last answer; 0: none yet")
    inference_count: int = Field(description="samples answered")
    execution_count: int = Field(description="ONNX Runtime calls")
    inference_stats: InferStatistics
    batch_stats: list[BatchStatistics]
    memory_usage: list[dict] = Field(description="not reported: empty")


class ModelStatisticsList(BaseModel):
    model_stats: list[ModelVersionStatistics]


_ZERO = {"count": 0, "ns": 0}
_STATS_EXAMPLE = {"model_stats": [{
    "name": "mnist-demo", "version": "1", "last_inference": 1764000000000, "inference_count": 96, "execution_count": 3,
    "inference_stats": {"success": {"count": 4, "ns": 2_400_000}, "fail": _ZERO, "queue": {"count": 4, "ns": 80_000},
                        "compute_input": {"count": 4, "ns": 40_000}, "compute_infer": {"count": 4, "ns": 1_800_000},
                        "compute_output": {"count": 4, "ns": 60_000}, "cache_hit": _ZERO, "cache_miss": _ZERO},
    "batch_stats": [{"batch_size": 32, "compute_input": {"count": 3, "ns": 30_000},
                     "compute_infer": {"count": 3, "ns": 1_350_000}, "compute_output": {"count": 3, "ns": 45_000}}],
    "memory_usage": []}]}


# The statistics extension (tritonclient's get_inference_statistics, perf_analyzer's server-side figures), before
# GET /models/{name}: /models/stats is every model's (so no model is served as "stats": service.deploy.RESERVED_NAMES).
@router.get("/models/stats", summary="Inference statistics of every model", response_model=ModelStatisticsList,
            responses={**ok(_STATS_EXAMPLE), **responses(*AUTH, v2=True, why={
                401: "a key that is malformed, unknown, revoked or expired; or none, when predict needs one",
                403: "public_predict is off and the key lacks the predict scope"})},
            openapi_extra=SERVING_DOC)
async def all_statistics(s: ServingDep) -> Response:
    return json_response(await oip.model_statistics(s))


@router.get("/models/{name}/stats", summary="Inference statistics of a model's loaded versions",
            response_model=ModelStatisticsList, responses={**ok(_STATS_EXAMPLE), **_MODEL_ERRORS},
            openapi_extra=SERVING_DOC)
async def model_statistics(name: ModelName, s: ServingDep) -> Response:
    return json_response(await oip.model_statistics(s, name))


@router.get("/models/{name}/versions/{version}/stats", summary="Inference statistics of a model version",
            response_model=ModelStatisticsList, responses={**ok(_STATS_EXAMPLE), **_MODEL_ERRORS},
            openapi_extra=SERVING_DOC)
async def model_version_statistics(name: ModelName, version: ModelVersion, s: ServingDep) -> Response:
    return json_response(await oip.model_statistics(s, name, version))


class RepositoryIndexRequest(BaseModel):
    ready: bool | None = Field(None, description="true: only the versions ready to serve")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, or UNAVAILABLE: a version whose bundle could not be loaded")
    reason: str = Field(description="why it is UNAVAILABLE (empty when READY)")


_INDEX_EXAMPLE = [{"name": "mnist-demo", "version": "1", "state": "READY", "reason": ""},
                  {"name": "mnist-demo", "version": "2", "state": "READY", "reason": ""}]
_INDEX_DOC = {**json_body_doc(RepositoryIndexRequest, example={"ready": True}, required=False), **SERVING_DOC}


# Triton's model repository extension, the index alone: models are deployed through /v1 (not advertised in
# GET /v2's extensions, which would promise load and unload).
@router.post("/repository/index", summary="Models served (the repository extension's index)",
             response_model=list[RepositoryModel], openapi_extra=_INDEX_DOC,
             responses={**ok(_INDEX_EXAMPLE), **responses(400, *AUTH, 413, 415, v2=True, why={
                 400: "a body that is not a JSON object",
                 401: "a key that is malformed, unknown, revoked or expired; or none, when predict needs one",
                 403: "public_predict is off and the key lacks the predict scope",
                 422: "ready that is not true or false"})})
async def repository_index(request: Request, s: ServingDep) -> Response:
    raw = await read_bytes(request, s.settings.max_payload_bytes)
    ready = parse_json(raw).get("ready", False) if raw.strip() else False  # tritonclient sends no body
    if not isinstance(ready, bool):
        raise invalid("ready must be true or false", "invalid_request")
    return json_response(oip.repository_index(s, ready))


# Model metadata follows predict (``public_predict``): checked before the lookup, so no name is probed.
@router.get("/models/{name}", summary="Model metadata", response_model=ModelMetadata,
            responses={**ok(_METADATA_EXAMPLE), **_MODEL_ERRORS}, openapi_extra=SERVING_DOC)
async def model_metadata(name: ModelName, s: ServingDep) -> Response:
    return json_response(oip.model_metadata(s.host, await oip.served_model(s, name)))


@router.get("/models/{name}/versions/{version}", summary="Model version metadata", response_model=ModelMetadata,
            responses={**ok(_METADATA_EXAMPLE), **_MODEL_ERRORS}, openapi_extra=SERVING_DOC)
async def model_version_metadata(name: ModelName, version: ModelVersion, s: ServingDep) -> Response:
    return json_response(oip.model_metadata(s.host, await oip.served_model(s, name, version)))


@router.get("/models/{name}/ready", summary="Model ready", response_model=ModelReady,
            responses={**ok({"name": "mnist-demo", "ready": True}), **_MODEL_ERRORS}, openapi_extra=SERVING_DOC)
async def model_ready(name: ModelName, s: ServingDep) -> Response:
    return json_response({"name": (await oip.served_model(s, name)).name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready", response_model=ModelReady,
            responses={**ok({"name": "mnist-demo", "version": "1", "ready": True}), **_MODEL_ERRORS},
            openapi_extra=SERVING_DOC)
async def model_version_ready(name: ModelName, version: ModelVersion, s: ServingDep) -> Response:
    m = await oip.served_model(s, name, version)
    return json_response({"name": m.name, "version": m.version, "ready": True})


_CONFIG_EXAMPLE = {"name": "mnist-demo", "platform": "onnxruntime_onnx", "backend": "onnxruntime", "max_batch_size": 1024,
                   "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}],
                   "output": [{"name": PUBLIC_OUTPUT, "data_type": "TYPE_FP32", "dims": [10]},
                              {"name": KEYED_OUTPUT, "data_type": "TYPE_FP32", "dims": [10]}]}


# Triton's model configuration extension (read only), which its tools ask for: what the metadata says, in its form.
@router.get("/models/{name}/config", summary="Model configuration", response_model=ModelConfig,
            responses={**ok(_CONFIG_EXAMPLE), **_MODEL_ERRORS}, openapi_extra=SERVING_DOC)
async def model_config(name: ModelName, s: ServingDep) -> Response:
    return json_response(oip.model_config(s.host, await oip.served_model(s, name), s.settings.max_request_samples))


@router.get("/models/{name}/versions/{version}/config", summary="Model version configuration",
            response_model=ModelConfig, responses={**ok(_CONFIG_EXAMPLE), **_MODEL_ERRORS}, openapi_extra=SERVING_DOC)
async def model_version_config(name: ModelName, version: ModelVersion, s: ServingDep) -> Response:
    model = await oip.served_model(s, name, version)
    return json_response(oip.model_config(s.host, model, s.settings.max_request_samples))


FP16_MAX = float(np.finfo(np.float16).max)


def _json_data(datatype: str, shape: list[int], data, what: str) -> np.ndarray:
    """A tensor's JSON ``data`` (flat or nested, row-major) as an array of ``datatype``; 422 if it is not one, 415
    for BYTES (images, which JSON's text cannot carry)."""
    if datatype not in INPUT_DATATYPES:
        raise unsupported_datatype(datatype)
    if datatype in ("FP32", "FP16", "FP64"):
        arr = to_array(data, "data")
        if datatype == "FP16":  # the values the datatype holds, as the same tensor in binary would carry them
            big = np.abs(arr) > FP16_MAX
            if big.any():
                raise invalid(f"{what} data has values beyond FP16's range (±{FP16_MAX:g}, e.g. "
                              f"{float(arr[big].flat[0]):g}): send them as FP32", "invalid_dtype")
            arr = arr.astype(np.float16)
    else:
        if not isinstance(data, list):
            raise invalid(f"{what} data must be an array", "invalid_input")
        kind = {"INT64": "iu", "BOOL": "b", "BYTES": "U"}[datatype]
        try:
            arr = np.array(data)
        except (ValueError, TypeError, OverflowError):
            arr = None
        if arr is None or arr.dtype.kind not in kind or (datatype == "INT64" and arr.dtype == np.uint64):
            words = {"INT64": "integers within int64", "BOOL": "true or false", "BYTES": "strings"}[datatype]
            raise invalid(f"{what} data must be a rectangular array of {words} for datatype {datatype}",
                          "invalid_dtype")
    if arr.size != math.prod(shape):
        raise invalid(f"data has {arr.size} values; shape {shape} needs {math.prod(shape)}", "invalid_shape")
    if datatype == "BYTES":  # an input's BYTES are images, and JSON carries text: never a PNG's or JPEG's bytes
        raise ApiError(415, "unsupported_image", f"{what}: BYTES in JSON are text, not a readable PNG or JPEG "
                       "image: send images in the binary tensor extension (the input's parameters.binary_data_size, "
                       "its bytes after the JSON header; tritonclient: binary_data=True) or over gRPC")
    return arr.reshape(shape)


def _inputs(header: dict, binary: memoryview, has_header: bool, max_samples: int) -> list[Tensor]:
    """The request's input tensors: their count first (one), then every size (400), and a BYTES tensor's element
    count against ``max_samples`` (422), before any data is read."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise oip.not_one_input()
    chunks = oip_binary.input_chunks(inputs, binary, has_header)
    shapes = [tensor_shape(t.get("shape")) for t in inputs]
    for t, shape in zip(inputs, shapes):
        oip.check_samples(t.get("datatype"), shape, max_samples)
    for i, (t, shape, raw) in enumerate(zip(inputs, shapes, chunks)):
        if raw is not None:
            oip_binary.check(t.get("datatype"), shape, raw, f"inputs[{i}]")
    return [Tensor(t.get("name"), t.get("datatype"), shape,
                   _json_data(t.get("datatype"), shape, t.get("data"), f"inputs[{i}]") if raw is None
                   else oip_binary.from_raw(t["datatype"], shape, raw, f"inputs[{i}]"))
            for i, (t, shape, raw) in enumerate(zip(inputs, shapes, chunks))]


def _flag(params: dict | None, name: str, where: str) -> bool | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise invalid(f"{where}parameters must be an object", "invalid_request")
    value = params.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"{where}parameters.{name} must be true or false", "invalid_request")
    return value


def _outputs(header: dict) -> tuple[list[str] | None, dict[str, bool], bool, dict[str, object]]:
    """The outputs asked for (None: the model's public ones), which of them in binary, the default, and the
    classification extension's class_count of those that ask one (checked by :func:`oip.classification_counts`)."""
    default = bool(_flag(header.get("parameters"), "binary_data_output", ""))
    outputs = header.get("outputs")
    if outputs is None or outputs == []:  # [] as gRPC's empty list reads (protobuf cannot tell it from none)
        return None, {}, default, {}
    if isinstance(outputs, list):  # counted before any is read
        oip.check_output_count(len(outputs))
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise invalid("outputs must be a list of {\"name\": ...}", "invalid_request")
    binary, classification = {}, {}
    for i, o in enumerate(outputs):
        flag = _flag(o.get("parameters"), "binary_data", f"outputs[{i}].")
        if isinstance(o.get("name"), str):
            if flag is not None:
                binary[o["name"]] = flag
            if isinstance(o.get("parameters"), dict) and "classification" in o["parameters"]:
                classification[o["name"]] = o["parameters"]["classification"]
    return [o.get("name") for o in outputs], binary, default, classification


async def _infer(model: HostedModel, request: Request, s: Serving) -> Response:
    require_task(model)  # before the body: a model of another task is told so whatever was sent
    header_length = request.headers.get(HEADER_LENGTH)  # of the JSON header once the body is inflated
    header, binary = oip_binary.split(await read_bytes(request, s.settings.max_payload_bytes), header_length)
    if not isinstance(header.get("id", ""), str | None):
        raise invalid("id must be a string (it is echoed in the answer)", "invalid_request")
    tensors = _inputs(header, binary, header_length is not None, s.settings.max_request_samples)
    names, binary_outputs, binary_default, classification = _outputs(header)
    outputs = await oip.infer(s, model, tensors, names, classification)
    body: dict = {"model_name": model.name, "model_version": model.version}
    if header.get("id") is not None:
        body["id"] = header["id"]
    return await built(oip.answer_size(outputs), _encoded, body, outputs, binary_outputs, binary_default)


def _encoded(body: dict, outputs: list[Tensor], binary_outputs: dict[str, bool], binary_default: bool) -> Response:
    """The answer: ``body`` with the outputs, JSON or (any asked in binary) the binary extension's layout."""
    described, raws = [], []
    for t in outputs:
        if binary_outputs.get(t.name, binary_default):
            raws.append(oip_binary.to_raw(t.datatype, t.data))
            described.append({"name": t.name, "datatype": t.datatype, "shape": t.shape,
                              "parameters": {"binary_data_size": len(raws[-1])}})
        else:
            data = [b.decode() for b in t.data.ravel()] if t.datatype == "BYTES" else t.data.ravel()
            described.append({"name": t.name, "datatype": t.datatype, "shape": t.shape, "data": data})
    body["outputs"] = described
    if not raws:
        return json_response(body)
    content, length = oip_binary.encode(body, raws)
    return Response(content, media_type=OCTET_STREAM, headers={HEADER_LENGTH: str(length)})


_BINARY = {"schema": {"type": "string", "format": "binary", "description": (
    f"binary tensor extension: the JSON header (its length in {HEADER_LENGTH}), then the tensors sent in binary, "
    "concatenated in order: row-major, little-endian; BOOL one byte; BYTES elements each a 4-byte little-endian "
    "length and the bytes")}}
_HEADER_DOC = {"name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 1},
               "description": "binary tensor extension: the JSON header's length in bytes; the raw tensors follow it "
                              "(absent: the body is JSON alone). With Content-Encoding, the length once inflated"}
_ENCODING_DOC = {"name": "Content-Encoding", "in": "header", "required": False,
                 "schema": {"type": "string", "enum": ["gzip", "deflate", "identity"]},
                 "description": "the body compressed whole (tritonclient's request_compression_algorithm); answers are "
                                "not compressed"}
_INFER_DOC = {**json_body_doc(InferRequest, (OCTET_STREAM, _BINARY), example=_INFER_EXAMPLE), **SERVING_DOC,
              "parameters": [NAME_DOC, _HEADER_DOC, _ENCODING_DOC]}
_INFER_VERSION_DOC = {**_INFER_DOC, "parameters": [NAME_DOC, VERSION_DOC, _HEADER_DOC, _ENCODING_DOC]}
_INFER_OK = ok({"model_name": "mnist-demo", "model_version": "1", "id": "r1", "outputs": [
    {"name": PUBLIC_OUTPUT, "datatype": "FP32", "shape": [1, 10], "data": [0.02, 0.01, 0.9, 0.01, 0.01, 0.01, 0.01,
                                                                         0.01, 0.01, 0.01]}]})
_INFER_OK[200]["content"][OCTET_STREAM] = _BINARY  # when an output is asked in binary
_INFER_OK[200]["headers"] = {HEADER_LENGTH: {"schema": {"type": "integer"}, "description":
                                             "with an octet-stream answer: the JSON header's length"}}
_INFER_RESPONSES = {**_INFER_OK, **responses(400, *AUTH, 404, 413, 415, 503, v2=True, why={
    400: "a body that is not a JSON object; a binary body whose sizes do not add up, whose header length is past "
         "it, whose tensor bytes do not match their datatype and shape, or that is truncated; a compressed body "
         "that does not inflate whole; or a model that is not a classifier",
    401: f"{KEYED_OUTPUT} asked without a key; a key that is not valid; or none, when predict needs one",
    403: f"{KEYED_OUTPUT} asked by a key without the distill scope for this model; with public_predict off, a key "
         "that may not predict with it (checked before the model is looked up)",
    413: "a body (JSON header and tensors together) over the payload limit (SDB_MAX_PAYLOAD_BYTES), as sent or once "
         "inflated (Content-Encoding gzip or deflate), BYTES images that together hold over 100 M pixels, or an "
         "answer of more values than SDB_MAX_ANSWER_VALUES (samples x classes for each of the public and keyed "
         "outputs: the message says how many samples fit)",
    415: "a Content-Encoding other than gzip, deflate or identity, or BYTES that are not a readable PNG or JPEG "
         "image",
    422: "not exactly one input named as the model's, a datatype it does not take or that does not convert "
         "exactly, a shape that does not match the data, an output this model does not serve, more outputs than "
         f"any model serves ({len(oip.OUTPUT_NAMES)}), or a classification over {MAX_TOP_K}",
    429: f"over the request rate, or the key's sample quota ({KEYED_OUTPUT})"})}


@router.post("/models/{name}/infer", summary="Inference", openapi_extra=_INFER_DOC, response_model=InferResponse,
             responses=_INFER_RESPONSES)
@direct
async def infer(request: Request) -> Response:
    # predict access before the lookup, as the metadata routes: no name, input shape or policy is probed
    name = path_param(request, "name")
    s = await serving(request)
    return await _infer(await oip.served_model(s, name), request, s)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version",
             openapi_extra=_INFER_VERSION_DOC, response_model=InferResponse, responses=_INFER_RESPONSES)
@direct
async def infer_version(request: Request) -> Response:
    name, version = path_param(request, "name"), path_param(request, "version")
    s = await serving(request)
    return await _infer(await oip.served_model(s, name, version), request, s)
