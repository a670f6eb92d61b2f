"""``/v1/models``: list and describe, predict (anyone), distill (keyed path), admin add/remove."""
from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import Response

from ..deps import DISTILLING_DOC, SERVING_DOC, AdminKeyDep, DistillingDep, RegistryDep, Serving, ServingDep
from ..errors import ApiError, invalid, not_found
from ..inference import (
    PREDICT_TASKS,
    keyed_logits,
    multilabel_predictions,
    pose_predictions,
    public_logits,
    require_predict,
    require_task,
)
from ..registry import HostedModel
from ..schemas import (
    AddModelRequest,
    DistillOptions,
    DistillRequest,
    DistillResponse,
    ModelInfo,
    ModelList,
    PredictOptions,
    PredictRequest,
    PredictResponse,
    json_body_doc,
    json_response,
    options,
)
from ..tensors import as_batch, image_to_input, parse_json, softmax, to_array, top_k

router = APIRouter(prefix="/v1/models", tags=["models"])

VersionQuery = Query(None, description="a version of the model; default the highest")
_IMAGE_TYPES = ("image/png", "image/jpeg")
_UPLOAD_DOC = {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"file": {"type": "string", "format": "binary"}, "top_k": {"type": "integer"}},
    "required": ["file"]}}, "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}


def _describe(registry, model: HostedModel) -> dict:
    return {**model.describe(), "versions": registry.versions(model.name)}


@router.get("", response_model=ModelList, summary="Models being served")
async def list_models(registry: RegistryDep) -> Response:
    return json_response({"models": [_describe(registry, m) for m in registry.all()]})


@router.get("/{name}", response_model=ModelInfo, summary="One model: input shape, labels, versions")
async def get_model(name: str, registry: RegistryDep, version: str | None = VersionQuery) -> Response:
    return json_response(_describe(registry, registry.get(name, version)))


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


async def _images(model: HostedModel, request: Request, media: str) -> tuple[np.ndarray, dict]:
    if media == "multipart/form-data":
        form = await request.form(max_files=64, max_fields=16)
        uploads = [v for v in form.values() if isinstance(v, UploadFile)]
        if not uploads:
            raise invalid("multipart body has no file: send the image as field 'file'", "invalid_request")
        blobs = [await u.read() for u in uploads]
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    else:
        blobs, fields = [await request.body()], {}
    shape, norm = model.in_shape, model.meta["normalize"]
    # Decoding is CPU work that grows with the image: keep it off the event loop.
    x = await run_in_threadpool(lambda: np.stack([image_to_input(b, shape, norm) for b in blobs]))
    return x, fields


# Query parameters of the inference routes, read from the request: declared as FastAPI
# parameters they cost a validation pass each on every request (documented here instead).
_VERSION_DOC = {"name": "version", "in": "query", "required": False, "schema": {"type": "string"},
                "description": "a version of the model; default the highest"}
_TOP_K_DOC = {"name": "top_k", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "maximum": 1000}, "description": "labels to return"}


@router.post("/{name}/predict", response_model=PredictResponse, summary="Top-k labels (public path)",
             openapi_extra={**json_body_doc(PredictRequest, *_UPLOAD_DOC.items()), **SERVING_DOC,
                            "parameters": [_VERSION_DOC, _TOP_K_DOC]})
async def predict(name: str, request: Request, s: ServingDep) -> Response:
    version, top_k_query = request.query_params.get("version"), request.query_params.get("top_k")
    require_predict(s.key, name, s.settings.public_predict)
    model = s.registry.get(name, version)
    task = require_task(model, PREDICT_TASKS)
    if task == "pose":  # keypoints instead of labels, same inputs
        return await _predict_pose(model, request, s)
    media = _media_type(request)
    if media == "multipart/form-data" or media in _IMAGE_TYPES:
        x, fields = await _images(model, request, media)
        opts = options(PredictOptions, {"top_k": fields.get("top_k", top_k_query or 5)})
    elif media in ("application/json", ""):
        obj = parse_json(await request.body())
        opts = options(PredictOptions, {**obj, **({"top_k": top_k_query} if top_k_query else {})})
        x = as_batch(to_array(obj.get("inputs")), model.in_shape, s.settings.max_request_samples)
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"send application/json, multipart/form-data, image/png or image/jpeg, not {media}")
    z = await public_logits(model, x, s.key, s.keyring, s.metrics)
    k = min(opts.top_k, len(model.labels))
    if task == "multilabel":
        return json_response({"model": model.name, "version": model.version, "task": task,
                              "predictions": multilabel_predictions(z, k, model.labels)})
    return json_response({"model": model.name, "version": model.version,
                          "predictions": top_k(softmax(z), k, model.labels)})


async def _predict_pose(model: HostedModel, request: Request, s: Serving) -> Response:
    """Keypoints (x, y in input pixels) with a score per joint; a pose model has no keyed path."""
    media = _media_type(request)
    if media == "multipart/form-data" or media in _IMAGE_TYPES:
        x, _ = await _images(model, request, media)
    elif media in ("application/json", ""):
        obj = parse_json(await request.body())
        x = as_batch(to_array(obj.get("inputs")), model.in_shape, s.settings.max_request_samples)
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"send application/json, multipart/form-data, image/png or image/jpeg, not {media}")
    heatmaps = await public_logits(model, x, s.key, s.keyring, s.metrics)
    return json_response({"model": model.name, "version": model.version, "task": "pose",
                          **pose_predictions(model.meta, heatmaps)})


@router.post("/{name}/distill", response_model=DistillResponse,
             summary="Augmented logits through the keyed path (distill scope for this model)",
             openapi_extra={**json_body_doc(DistillRequest), **DISTILLING_DOC, "parameters": [_VERSION_DOC]})
async def distill(name: str, request: Request, s: DistillingDep) -> Response:
    model = s.registry.get(name, request.query_params.get("version"))
    require_task(model)
    media = _media_type(request)
    if media not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", f"distill takes application/json, not {media}")
    obj = parse_json(await request.body())
    opts = options(DistillOptions, obj)
    x = as_batch(to_array(obj.get("inputs")), model.in_shape, s.settings.max_request_samples)
    z = await keyed_logits(model, x, s.key, s.keyring, s.metrics)
    body = {"model": model.name, "version": model.version, "logits": z}
    if opts.temperature is not None:
        body["temperature"] = opts.temperature
        body["soft_targets"] = softmax(z, opts.temperature)
    return json_response(body)


@router.post("", status_code=201, response_model=ModelInfo, summary="Serve a bundle from a path on the server (admin)")
def add_model(body: AddModelRequest, key: AdminKeyDep, registry: RegistryDep) -> Response:
    model = registry.add(body.path, actor=key.id)
    return json_response(_describe(registry, model), status=201)


@router.delete("/{name}", summary="Stop serving a model, or one version of it (admin)")
def remove_model(name: str, key: AdminKeyDep, registry: RegistryDep,
                 version: str | None = Query(None, description="only this version")) -> Response:
    removed = registry.remove(name, version, actor=key.id)
    if not removed:
        raise not_found(f"no model named {name!r}" + (f" with version {version!r}" if version else ""),
                        "model_not_found")
    return json_response({"removed": [{"name": n, "version": v} for n, v in removed]})
