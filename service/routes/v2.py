"""The Open Inference Protocol (v2, as KServe and Triton speak it), FP32 tensors as JSON.

Public outputs follow the model version's output policy (the metadata lists them):

- ``probs``: ``probabilities`` FP32 [N, C], every class in label order;
- ``top_k``: ``probabilities`` FP32 [N, k], the k highest renormalised, in decreasing order, and
  ``classes`` INT64 [N, k], their class indices: the other classes are absent, not zero-filled;
- ``label``: ``classes`` INT64 [N, 1], the predicted class, and no probability at all.

``distill_logits`` is the keyed path (asked for by name, and only with a ``distill`` key for the
model), not subject to the policy. Errors are the protocol's ``{"error": "message"}`` with its HTTP
status (:mod:`service.errors` picks that form for every ``/v2`` path).

The request and response models below document the bodies; the routes read and write them raw
(:func:`service.bodies.read_json`, :func:`service.schemas.json_response`): a pydantic pass over a
tensor would cost more than the model.
"""
from __future__ import annotations

import asyncio
import math
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from ..bodies import read_json
from ..deps import (
    SERVING_DOC,
    ModelHostDep,
    ModelName,
    ModelVersion,
    OptionalApiKeyDep,
    Serving,
    ServingDep,
    SettingsDep,
)
from ..errors import ApiError, invalid
from ..inference import (
    charge_keyed,
    keyed_logits,
    policy_outputs,
    public_logits,
    require_predict,
    require_task,
    rounded,
)
from ..registry import HostedModel, ModelHost
from ..schemas import AUTH, OutputPolicy, json_body_doc, json_response, ok, responses
from ..tensors import as_batch, softmax, to_array

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

PUBLIC_OUTPUT, CLASSES_OUTPUT, KEYED_OUTPUT = "probabilities", "classes", "distill_logits"


def public_outputs(policy: OutputPolicy, classes: int) -> list[dict]:
    """The public output tensors a model serves under its policy: name, datatype, shape (-1: the batch)."""
    if policy.policy == "probs":
        return [{"name": PUBLIC_OUTPUT, "datatype": "FP32", "shape": [-1, classes]}]
    k = 1 if policy.policy == "label" else min(policy.top_k, classes)
    probabilities = [{"name": PUBLIC_OUTPUT, "datatype": "FP32", "shape": [-1, k]}] if policy.policy == "top_k" else []
    return probabilities + [{"name": CLASSES_OUTPUT, "datatype": "INT64", "shape": [-1, k]}]


def _public_values(probs, policy: OutputPolicy) -> dict:
    if policy.policy == "probs":
        return {PUBLIC_OUTPUT: rounded(probs, policy.decimals)}
    idx, values = policy_outputs(probs, policy)
    return {CLASSES_OUTPUT: idx.astype("int64"), **({} if values is None else {PUBLIC_OUTPUT: values})}


class InferInput(BaseModel):
    name: str = Field(description="the model's input name (its metadata says it)")
    shape: list[int] = Field(description="the tensor's shape: [N, C, H, W], one sample [C, H, W], or [N, C·H·W]")
    datatype: str = Field(description="FP32 only")
    data: list = Field(description="row-major values, flat or nested")


class InferOutputRequest(BaseModel):
    name: str = Field(description=f"{PUBLIC_OUTPUT} or {CLASSES_OUTPUT} (as the model's output policy serves "
                      f"them: see its metadata), or {KEYED_OUTPUT} (needs a distill key)")


class InferRequest(BaseModel):
    id: str | None = Field(None, description="echoed in the response")
    inputs: list[InferInput] = Field(description="exactly one tensor")
    outputs: list[InferOutputRequest] | None = Field(None, description="default: the public outputs")


class InferOutput(BaseModel):
    name: str
    datatype: str = Field(description=f"FP32, or INT64 for {CLASSES_OUTPUT}")
    shape: list[int]
    data: list[float] = Field(description="row-major, flat")


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


def _server_version() -> str:
    try:
        return package_version("sdb")
    except PackageNotFoundError:
        return "0"


@router.get("", summary="Server metadata", response_model=ServerMetadata,
            responses={**ok({"name": "sdb", "version": "0.1.0", "extensions": []}), **responses(429, v2=True)})
async def server_metadata() -> Response:
    return json_response({"name": "sdb", "version": _server_version(), "extensions": []})


@router.get("/health/live", summary="Server live", response_model=ServerLive,
            responses={**ok({"live": True}), **responses(429, v2=True)})
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Server ready (503 while starting)", response_model=ServerReady,
            responses={**ok({"ready": True}), **responses(429, 503, v2=True)})
async def ready(request: Request) -> Response:
    if not getattr(request.app.state, "ready", False):
        raise ApiError(503, "not_ready", "the server is still starting")
    return json_response({"ready": True})


def _metadata(host: ModelHost, m: HostedModel) -> dict:
    classes = len(m.labels)
    return {"name": m.name, "versions": host.versions(m.name), "platform": "onnxruntime_onnx",
            "inputs": [{"name": m.meta["input"]["name"], "datatype": "FP32", "shape": [-1, *m.in_shape]}],
            "outputs": public_outputs(m.policy, classes)
            + ([{"name": KEYED_OUTPUT, "datatype": "FP32", "shape": [-1, classes]}] if m.distillable else [])}


# Model metadata follows predict (``public_predict``): checked before the lookup, so no name is probed.
@router.get("/models/{name}", summary="Model metadata", response_model=ModelMetadata,
            responses={**ok(_METADATA_EXAMPLE), **_MODEL_ERRORS}, openapi_extra=SERVING_DOC)
async def model_metadata(name: ModelName, host: ModelHostDep, settings: SettingsDep, key: OptionalApiKeyDep) -> Response:
    require_predict(key, name, settings.public_predict)
    return json_response(_metadata(host, await host.aget(name)))


@router.get("/models/{name}/versions/{version}", summary="Model version metadata", response_model=ModelMetadata,
            responses={**ok(_METADATA_EXAMPLE), **_MODEL_ERRORS}, openapi_extra=SERVING_DOC)
async def model_version_metadata(name: ModelName, version: ModelVersion, host: ModelHostDep, settings: SettingsDep,
                                 key: OptionalApiKeyDep) -> Response:
    require_predict(key, name, settings.public_predict)
    return json_response(_metadata(host, await host.aget(name, version)))


@router.get("/models/{name}/ready", summary="Model ready", response_model=ModelReady,
            responses={**ok({"name": "mnist-demo", "ready": True}), **_MODEL_ERRORS}, openapi_extra=SERVING_DOC)
async def model_ready(name: ModelName, host: ModelHostDep, settings: SettingsDep, key: OptionalApiKeyDep) -> Response:
    require_predict(key, name, settings.public_predict)
    return json_response({"name": (await host.aget(name)).name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready", response_model=ModelReady,
            responses={**ok({"name": "mnist-demo", "version": "1", "ready": True}), **_MODEL_ERRORS},
            openapi_extra=SERVING_DOC)
async def model_version_ready(name: ModelName, version: ModelVersion, host: ModelHostDep, settings: SettingsDep,
                              key: OptionalApiKeyDep) -> Response:
    require_predict(key, name, settings.public_predict)
    m = await host.aget(name, version)
    return json_response({"name": m.name, "version": m.version, "ready": True})


def _input_tensor(obj: dict, model: HostedModel, max_samples: int):
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise invalid("inputs must be a list of exactly one tensor object", "invalid_request")
    t = inputs[0]
    if t.get("name") != model.meta["input"]["name"]:
        raise invalid(f"unknown input {t.get('name')!r}; this model's input is "
                      f"{model.meta['input']['name']!r}", "invalid_request")
    if t.get("datatype") != "FP32":
        raise invalid(f"datatype {t.get('datatype')!r} is not supported; send FP32", "invalid_dtype")
    shape = t.get("shape")
    if (not isinstance(shape, list) or not shape or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise invalid("shape must be a list of non-negative integers", "invalid_shape")
    data = to_array(t.get("data"), "data")
    if data.size != math.prod(shape):
        raise invalid(f"data has {data.size} values; shape {shape} needs {math.prod(shape)}", "invalid_shape")
    return as_batch(data.reshape(shape), model.in_shape, max_samples)


def _wanted(obj: dict, model: HostedModel) -> list[str]:
    public = [o["name"] for o in public_outputs(model.policy, len(model.labels))]
    outputs = obj.get("outputs")
    if outputs is None:
        return public
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise invalid("outputs must be a non-empty list of {\"name\": ...}", "invalid_request")
    names = [o.get("name") for o in outputs]
    unknown = [n for n in names if n not in (*public, KEYED_OUTPUT)]
    if unknown:
        raise invalid(f"unknown output(s) {unknown}; this model serves {', '.join([*public, KEYED_OUTPUT])} "
                      f"(output policy {model.policy.policy})", "invalid_request")
    return list(dict.fromkeys(names))


async def _infer(model: HostedModel, request: Request, s: Serving) -> Response:
    key, keyring, metrics, settings = s.key, s.keyring, s.metrics, s.settings
    require_task(model)
    obj = await read_json(request)
    wanted = _wanted(obj, model)
    served_public = [n for n in wanted if n != KEYED_OUTPUT]
    if KEYED_OUTPUT in wanted and key is None:
        raise ApiError(401, "missing_key", f"output {KEYED_OUTPUT!r} needs an API key with the distill scope",
                       {"WWW-Authenticate": "Bearer"})
    if served_public:
        require_predict(key, model.name, settings.public_predict)
    x = _input_tensor(obj, model, settings.max_request_samples)
    jobs = {}
    if KEYED_OUTPUT in wanted:  # checks scope and charges quota before anything runs
        await charge_keyed(model, len(x), key, keyring)
        jobs[KEYED_OUTPUT] = keyed_logits(model, x, key, keyring, metrics, charged=True)
    if served_public:
        jobs["public"] = public_logits(model, x, key, keyring, metrics)
    # Awaited together, both paths ride in the same ONNX Runtime call.
    results = dict(zip(jobs, await asyncio.gather(*jobs.values())))
    values = _public_values(softmax(results["public"]), model.policy) if served_public else {}
    if KEYED_OUTPUT in wanted:
        values[KEYED_OUTPUT] = results[KEYED_OUTPUT]
    outputs = []
    for name in wanted:
        value = values[name]
        outputs.append({"name": name, "datatype": "INT64" if name == CLASSES_OUTPUT else "FP32",
                        "shape": list(value.shape), "data": value.ravel()})
    body = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if isinstance(obj.get("id"), str):
        body["id"] = obj["id"]
    return json_response(body)


_INFER_DOC = {**json_body_doc(InferRequest, example=_INFER_EXAMPLE), **SERVING_DOC}
_INFER_RESPONSES = {**ok({"model_name": "mnist-demo", "model_version": "1", "id": "r1", "outputs": [
    {"name": PUBLIC_OUTPUT, "datatype": "FP32", "shape": [1, 10], "data": [0.02, 0.01, 0.9, 0.01, 0.01, 0.01, 0.01,
                                                                         0.01, 0.01, 0.01]}]}),
    **responses(400, *AUTH, 404, 413, 503, v2=True, why={
        400: "a body that is not a JSON object, or a model that is not a classifier",
        401: f"{KEYED_OUTPUT} asked without a key; a key that is not valid; or none, when predict needs one",
        403: f"{KEYED_OUTPUT} asked by a key without the distill scope for this model",
        422: "not exactly one FP32 input named as the model's, a shape that does not match the data, "
             "or an output this model does not serve",
        429: f"over the request rate, or the key's sample quota ({KEYED_OUTPUT})"})}


@router.post("/models/{name}/infer", summary="Inference", openapi_extra=_INFER_DOC, response_model=InferResponse,
             responses=_INFER_RESPONSES)
async def infer(name: ModelName, request: Request, s: ServingDep) -> Response:
    return await _infer(await s.host.aget(name), request, s)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version", openapi_extra=_INFER_DOC,
             response_model=InferResponse, responses=_INFER_RESPONSES)
async def infer_version(name: ModelName, version: ModelVersion, request: Request, s: ServingDep) -> Response:
    return await _infer(await s.host.aget(name, version), request, s)
