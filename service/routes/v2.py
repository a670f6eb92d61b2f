"""The Open Inference Protocol (v2, as KServe and Triton speak it), FP32 tensors as JSON.

Public outputs follow the model version's output policy (the metadata lists them):

- ``probs``: ``probabilities`` FP32 [N, C], every class in label order;
- ``top_k``: ``probabilities`` FP32 [N, k], the k highest renormalised, in decreasing order, and
  ``classes`` INT64 [N, k], their class indices: the other classes are absent, not zero-filled;
- ``label``: ``classes`` INT64 [N, 1], the predicted class, and no probability at all.

``distill_logits`` is the keyed path (asked for by name, and only with a ``distill`` key for the
model), not subject to the policy. Errors keep this service's ``{"error": {"code", "message"}}``
body with the protocol's statuses.
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
from ..deps import SERVING_DOC, ModelHostDep, OptionalApiKeyDep, Serving, ServingDep, SettingsDep
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
from ..schemas import OutputPolicy, json_body_doc, json_response
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
    name: str
    shape: list[int]
    datatype: str = Field(description="FP32 only")
    data: list = Field(description="row-major values, flat or nested")


class InferOutputRequest(BaseModel):
    name: str = Field(description=f"{PUBLIC_OUTPUT} or {CLASSES_OUTPUT} (as the model's output policy serves "
                      f"them: see its metadata), or {KEYED_OUTPUT} (needs a distill key)")


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput]
    outputs: list[InferOutputRequest] | None = None


def _server_version() -> str:
    try:
        return package_version("sdb")
    except PackageNotFoundError:
        return "0"


@router.get("", summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "sdb", "version": _server_version(), "extensions": []})


@router.get("/health/live", summary="Server live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Server ready")
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
@router.get("/models/{name}", summary="Model metadata")
async def model_metadata(name: str, host: ModelHostDep, settings: SettingsDep, key: OptionalApiKeyDep) -> Response:
    require_predict(key, name, settings.public_predict)
    return json_response(_metadata(host, await host.aget(name)))


@router.get("/models/{name}/versions/{version}", summary="Model version metadata")
async def model_version_metadata(name: str, version: str, host: ModelHostDep, settings: SettingsDep,
                                 key: OptionalApiKeyDep) -> Response:
    require_predict(key, name, settings.public_predict)
    return json_response(_metadata(host, await host.aget(name, version)))


@router.get("/models/{name}/ready", summary="Model ready")
async def model_ready(name: str, host: ModelHostDep, settings: SettingsDep, key: OptionalApiKeyDep) -> Response:
    require_predict(key, name, settings.public_predict)
    return json_response({"name": (await host.aget(name)).name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready")
async def model_version_ready(name: str, version: str, host: ModelHostDep, settings: SettingsDep,
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


_INFER_DOC = {**json_body_doc(InferRequest), **SERVING_DOC}


@router.post("/models/{name}/infer", summary="Inference", openapi_extra=_INFER_DOC)
async def infer(name: str, request: Request, s: ServingDep) -> Response:
    return await _infer(await s.host.aget(name), request, s)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version", openapi_extra=_INFER_DOC)
async def infer_version(name: str, version: str, request: Request, s: ServingDep) -> Response:
    return await _infer(await s.host.aget(name, version), request, s)
