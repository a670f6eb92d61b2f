"""``/v1/models``: list and describe, predict (anyone), distill (keyed path), remove (its owner or an admin),
release a name's claim (an admin) (deploying an uploaded bundle, ``POST /v1/models``, is
:mod:`service.routes.deploy`)."""
from __future__ import annotations

import time
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from .. import npy
from ..auth import check_scope
from ..bodies import IMAGE_TYPES, JSON, JSON_ONLY, MULTIPART, NOT_JSON, Body, read_body, wants_npy
from ..deploy import refused
from ..deps import (
    DISTILLING_DOC,
    NAME_DOC,
    SERVING_DOC,
    AdminKeyDep,
    ApiKeyDep,
    ModelHostDep,
    ModelName,
    OptionalApiKeyDep,
    Serving,
    SettingsDep,
    StoreDep,
    distilling,
    path_param,
    serving,
)
from ..direct import direct
from ..errors import ApiError, invalid, not_found, quoted
from ..inference import (
    PREDICT_TASKS,
    built,
    check_answer_size,
    class_predictions,
    keyed_logits,
    listable,
    multilabel_predictions,
    pose_predictions,
    public_logits,
    require_predict,
    require_task,
)
from ..registry import HostedModel
from ..schemas import (
    AUTH,
    MAX_TOP_K,
    MODEL_EXAMPLE,
    NO_NUL,
    DistillOptions,
    DistillRequest,
    DistillResponse,
    ModelInfo,
    ModelList,
    ModelRemoved,
    PredictOptions,
    PredictRequest,
    PredictResponse,
    given_options,
    json_body_doc,
    json_response,
    ok,
    responses,
)
from ..store import DeployRefused
from ..tensors import as_batch, batch_shape, images_to_inputs, softmax, to_array

router = APIRouter(prefix="/v1/models", tags=["models"])

VersionQuery = Query(None, description="a version of the model; default the highest", pattern=NO_NUL)
_INPUT_TYPES = (JSON, npy.NPY, MULTIPART, *IMAGE_TYPES)  # what predict takes: tensors as JSON or .npy, or images
# A media type has no description of its own in OpenAPI 3.1 (a validator refuses one): its schema says it.
_NPY_BODY_DOC = {"schema": {"type": "string", "format": "binary",
                            "description": "one .npy array (np.save) of the inputs: float32 (or float16, float64), "
                                           "little-endian, C order, [N, C, H, W], one [C, H, W] sample, or "
                                           "[N, C·H·W] rows; options in the query"}}
_UPLOAD_DOC = {npy.NPY: _NPY_BODY_DOC, "multipart/form-data": {"schema": {
    "type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                 "description": "PNG or JPEG images, one part each: several parts are several samples, answered "
                                "in order"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K}},
    "required": ["file"]}}, "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}


_NO_KEY = "a key that is not valid; or none, when predict needs one (public_predict off)"
_SERVING_ERRORS = {
    400: "a body that is not a JSON object or not a valid .npy array (a malformed header, truncated, or longer "
         "than its header says), or a model of another task (the message names its route)",
    401: _NO_KEY, 413: "over the payload limit (SDB_MAX_PAYLOAD_BYTES), images that together hold over 100 M pixels, or "
                      "an answer of more values than SDB_MAX_ANSWER_VALUES (samples x classes; the message says how "
                      "many samples fit)",
    415: "a media type the route does not take, or an image that is not a readable PNG or JPEG",
    422: "inputs of the wrong shape or type, NaN or Inf, too many samples, a bad option, or one given in the query "
         "and the body with different values (conflicting_options)",
    503: "this model version cannot be served (the message says why)"}
_SAMPLE = [[[0.0, 0.5], [1.0, 0.25]]]  # one [C, H, W] sample, for the examples: the demo model's is [1, 28, 28]


@router.get("", response_model=ModelList, responses={**ok({"models": [MODEL_EXAMPLE]}), **responses(*AUTH, why={
    401: _NO_KEY, 403: "public_predict is off and the key lacks the predict scope"})},
            summary="Models being served (with public_predict off: those this key may predict with)",
            openapi_extra=SERVING_DOC)
async def list_models(host: ModelHostDep, settings: SettingsDep, key: OptionalApiKeyDep) -> Response:
    shown = listable(key, settings.public_predict)  # metadata follows predict: the scope, then the key's allowlist
    return json_response({"models": [host.described(m) for m in host.all() if shown(m.name)]})


@router.get("/{name}", response_model=ModelInfo, summary="One model: input shape, labels, versions",
            openapi_extra=SERVING_DOC,
            responses={**ok(MODEL_EXAMPLE), **responses(*AUTH, 404, 503, why=_SERVING_ERRORS)})
async def get_model(name: ModelName, host: ModelHostDep, settings: SettingsDep, key: OptionalApiKeyDep,
                    version: str | None = VersionQuery) -> Response:
    require_predict(key, name, settings.public_predict)  # before the lookup: no probing names
    return json_response(host.described(await host.aget(name, version)))


async def _body(request: Request, model: HostedModel, s: Serving, accept: tuple[str, ...],
                what: str | None = None) -> Body:
    """The request's body; a ``.npy`` one read as the model's input batch, its shape and size checked from its
    header (``max_request_samples``, ``max_payload_bytes``) before its data; a form of at most one file more
    than ``max_request_samples`` (one more: so that the count is refused by :func:`_inputs`, as for tensors)."""
    max_samples = s.settings.max_request_samples
    return await read_body(request, accept, what=what, max_files=max_samples + 1, samples=max_samples,
                           batch=lambda shape: batch_shape(shape, model.in_shape, max_samples),
                           max_bytes=s.settings.max_payload_bytes)


async def _inputs(model: HostedModel, body: Body, max_samples: int,
                  sizes: list[tuple[int, int]] | None = None) -> np.ndarray:
    """The model's input batch: the JSON body's ``inputs``, the ``.npy`` array, or the uploaded images decoded
    (each one's size as shown appended to ``sizes``)."""
    if body.tensor is not None:
        return body.tensor
    if body.json is not None:
        return as_batch(to_array(body.json.get("inputs")), model.in_shape, max_samples)
    if not body.uploads:
        others = sorted(set(body.names))
        raise invalid("multipart body has no file: send the image as field 'file'"
                      + (f" (it has {', '.join(map(repr, others[:5]))})" if others else ""), "invalid_request")
    if len(body.uploads) > max_samples:  # counted as samples before any image is decoded
        raise invalid(f"{len(body.uploads)} images in one request; at most {max_samples}", "too_many_samples")
    shape, norm = model.in_shape, model.meta["normalize"]
    # Decoding is CPU work that grows with the image: keep it off the event loop.
    return await run_in_threadpool(lambda: images_to_inputs(body.uploads, shape, norm, sizes))


# Query parameters of the inference routes, read from the request: declared as FastAPI
# parameters they cost a validation pass each on every request (documented here instead).
_VERSION_DOC = {"name": "version", "in": "query", "required": False, "schema": {"type": "string", "pattern": NO_NUL},
                "description": "a version of the model; default the highest"}


def _version(request: Request) -> str | None:
    """The ``version`` query parameter, checked as FastAPI would check the documented one."""
    version = request.query_params.get("version")
    if version is not None and "\x00" in version:
        raise invalid("version: a version holds no NUL character", "invalid_request")
    return version


def _query_options(request: Request, *names: str) -> dict[str, str]:
    """The options among ``names`` that the query gives (an empty one, ``?top_k=``, gives none)."""
    return {n: v for n in names if (v := request.query_params.get(n))}


_TOP_K_DOC = {"name": "top_k", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K},
              "description": "labels to return (at most the output policy's k; one under the label policy); also "
                             "in the body, it must be the same (another value is a 422 conflicting_options)"}
_TEMPERATURE_DOC = {"name": "temperature", "in": "query", "required": False,
                    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                    "description": "also return softmax(logits / T) as soft_targets (JSON answers; a .npy answer "
                                   "holds the logits alone and says T in SDB-Temperature); also in the body, it "
                                   "must be the same (another value is a 422 conflicting_options)"}
_NPY_ANSWER_HEADERS = {
    "SDB-Model": {"description": "the model's name (URL-quoted)", "schema": {"type": "string"}},
    "SDB-Model-Version": {"description": "the version that answered (URL-quoted)", "schema": {"type": "string"}},
    "SDB-Temperature": {"description": "the temperature asked for, if one was", "schema": {"type": "number"}}}


@router.post("/{name}/predict", response_model=PredictResponse,
             summary="Top-k labels (public path), under the model's output policy",
             responses={**ok({"model": "mnist-demo", "version": "1", "predictions": [
                 {"labels": ["2", "7"], "indices": [2, 7], "scores": [0.91, 0.04]}]}),
                 **responses(400, *AUTH, 404, 413, 415, 503, why=_SERVING_ERRORS)},
             openapi_extra={**json_body_doc(PredictRequest, *_UPLOAD_DOC.items(),
                                            example={"inputs": _SAMPLE, "top_k": 2}), **SERVING_DOC,
                            "parameters": [NAME_DOC, _VERSION_DOC, _TOP_K_DOC]})
@direct
async def predict(request: Request) -> Response:
    name = path_param(request, "name")
    s = await serving(request)
    version, query = _version(request), _query_options(request, "top_k")
    require_predict(s.key, name, s.settings.public_predict)
    model = await s.host.aget(name, version)
    task = require_task(model, PREDICT_TASKS)
    body = await _body(request, model, s, _INPUT_TYPES)
    max_samples = s.settings.max_request_samples
    labels, max_values = model.labels, s.settings.max_answer_values
    if task == "pose":  # keypoints instead of labels, same inputs
        sizes: list[tuple[int, int]] = []  # of images sent as files: their own pixels too, a user draws on them
        x = await _inputs(model, body, max_samples, sizes)
        check_answer_size(len(labels), len(x), 1, max_values)
        heatmaps = await public_logits(model, x, s.key, s.keyring, s.metrics, s.caller)
        return await built(heatmaps.size, _pose_answer, model, heatmaps, sizes)
    if body.json is not None:  # the options are checked before the tensor, the images after decoding
        opts = given_options(PredictOptions, body.json, query, "JSON body")
        x = await _inputs(model, body, max_samples)
    else:  # a .npy body (top_k in the query) or images (top_k a form field or in the query)
        x = await _inputs(model, body, max_samples)
        opts = given_options(PredictOptions, body.fields, query, "form")
    check_answer_size(len(labels), len(x), 1, max_values)
    z = await public_logits(model, x, s.key, s.keyring, s.metrics, s.caller)
    return await built(z.size, _predict_answer, model, task, z, min(opts.top_k, len(labels)), labels)


def _pose_answer(model: HostedModel, heatmaps: np.ndarray, sizes: list[tuple[int, int]]) -> Response:
    return json_response({"model": model.name, "version": model.version, "task": "pose",
                          **pose_predictions(model.meta, heatmaps, model.in_shape, sizes or None)})


def _predict_answer(model: HostedModel, task: str, z: np.ndarray, k: int, labels: list[str]) -> Response:
    """A classifier's or a multilabel model's answer to its logits ``z``: work in proportion to samples x classes,
    which :func:`predict` moves off the event loop when large."""
    if task == "multilabel":
        return json_response({"model": model.name, "version": model.version, "task": task,
                              "predictions": multilabel_predictions(z, k, labels, model.policy)})
    return json_response({"model": model.name, "version": model.version,
                          "predictions": class_predictions(softmax(z), k, labels, model.policy)})


@router.post("/{name}/distill", response_model=DistillResponse,
             summary="Augmented logits through the keyed path (distill scope for this model)",
             responses={200: {"description": "the keyed logits: JSON, or with Accept: application/x-npy one .npy "
                              "float32 [N, C] array (the model and version in headers)",
                              "headers": _NPY_ANSWER_HEADERS,
                              "content": {"application/json": {"example": {
                                  "model": "mnist-demo", "version": "1",
                                  "logits": [[1.5, -0.2, 7.9, 0.3, -1.1, 0.0, -0.4, 2.2, 0.8, -0.6]]}},
                                  npy.NPY: {"schema": {"type": "string", "format": "binary"}}}},
                        **responses(400, *AUTH, 404, 413, 415, 503, why={
                            **_SERVING_ERRORS, 401: "no key, or one that is not valid",
                            403: "the key lacks the distill scope for this model",
                            429: "over the request rate or the key's sample quota",
                            503: "this model version cannot be served (the message says why), or the key store did "
                                 "not answer in time (key_store_unavailable: try again)"})},
             openapi_extra={**json_body_doc(DistillRequest, (npy.NPY, _NPY_BODY_DOC), example={"inputs": _SAMPLE}),
                            **DISTILLING_DOC, "parameters": [NAME_DOC, _VERSION_DOC, _TEMPERATURE_DOC]})
@direct
async def distill(request: Request) -> Response:
    name = path_param(request, "name")
    s = await distilling(request)
    query = _query_options(request, "temperature")
    model = await s.host.aget(name, _version(request))
    require_task(model)
    body = await _body(request, model, s, (JSON, npy.NPY), what="distill")
    opts = given_options(DistillOptions, body.json or {}, query, "JSON body")
    x = await _inputs(model, body, s.settings.max_request_samples)
    as_npy = wants_npy(request)
    outputs = 1 if as_npy or opts.temperature is None else 2  # the logits, and in JSON their soft targets
    check_answer_size(model.num_classes, len(x), outputs, s.settings.max_answer_values)
    z = await keyed_logits(model, x, s.key, s.keyring, s.metrics)  # every check passed: only now the quota
    return await built(z.size * outputs, _distill_answer, model, z, opts.temperature, as_npy)


def _distill_answer(model: HostedModel, z: np.ndarray, temperature: float | None, as_npy: bool) -> Response:
    if as_npy:  # the logits alone; soft targets are softmax(logits / T), for the caller to take
        headers = {"SDB-Model": quote(model.name, safe=""), "SDB-Model-Version": quote(model.version, safe="")}
        if temperature is not None:
            headers["SDB-Temperature"] = repr(temperature)
        return Response(npy.encode(np.asarray(z, np.float32)), media_type=npy.NPY, headers=headers)
    answer = {"model": model.name, "version": model.version, "logits": z}
    if temperature is not None:
        answer["temperature"] = temperature
        answer["soft_targets"] = softmax(z, temperature)
    return json_response(answer)


@router.delete("/{name}", summary="Stop serving a model, or one version of it (its owner or an admin)",
               response_model=ModelRemoved, responses={**ok({"removed": [{"name": "mnist-demo", "version": "1"}]}),
                                                       **responses(*AUTH, 404, why={
                   403: "a key without the deploy scope, one whose model allowlist lacks the name (model_not_allowed), "
                        "or a deploy key that does not own the model's name",
                   404: "no such model or version"})})
def remove_model(name: ModelName, key: ApiKeyDep, host: ModelHostDep, store: StoreDep,
                 version: str | None = Query(None, description="only this version", pattern=NO_NUL)) -> Response:
    # The name's owner (the deploy key that first deployed it) takes back what it served, as it deploys it: within
    # its allowlist (a key made for some models removes no other, an admin key given one included); the name stays
    # its own. Every other name is an admin's to remove.
    check_scope(key, "deploy", name)  # admin grants the scope
    if not key.grants("admin") and store.model_owner(name) != key.id:
        raise ApiError(403, "model_not_owned", f"this key owns no model named {name!r}: only the key that "
                       "first deployed a model, or an admin, removes it")
    removed = host.remove(name, version, actor=key.id)
    if not removed:
        raise not_found(f"no model named {name!r}" + (f" with version {quoted(version)}" if version else ""),
                        "model_not_found")
    return json_response({"removed": [{"name": n, "version": v} for n, v in removed]})


class ReleaseRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{}, {"to": "0a1b2c3d4e5f"}]})
    to: str | None = Field(None, pattern=r"^[0-9a-f]{12}$", description="give the name to this key (its id); "
                           "omitted: the next key to deploy under the name claims it")


class NameReleased(BaseModel):
    name: str
    owner: str | None = Field(description="the key the name now belongs to; null: nobody (the next deploy claims it)")
    previous_owner: str | None = Field(description="the key it belonged to; null: an admin's, or nobody's")


@router.post("/{name}/release", response_model=NameReleased, dependencies=[JSON_ONLY],
             summary="Release a model name's claim, or give it to another key (admin)",
             responses={**ok({"name": "mnist-demo", "owner": None, "previous_owner": "0a1b2c3d4e5f"}),
                        **responses(400, *AUTH, 404, 409, 413, 415, why={
                            403: "not an admin key", 404: "no model was ever deployed under the name, or no such key",
                            409: "the name still serves versions (model_in_use): remove them first", 415: NOT_JSON,
                            422: "a bad field, or a key that is revoked or expired"})})
def release_name(name: ModelName, body: ReleaseRequest, admin: AdminKeyDep, store: StoreDep) -> Response:
    # A name stays the key's that first deployed it, even once that key is revoked (a new tenant must not step into
    # a name clients still trust): the operator decides, for names that serve nothing any more.
    if body.to is not None:
        if store.get_key(body.to) is None:
            raise not_found(f"no API key with id {body.to!r}", "key_not_found")
        if not store.key_stands(body.to, time.time()):
            raise invalid(f"API key {body.to!r} is revoked or expired: give the name to a key in use, or omit "
                          "'to' to let the next deploy claim it", "key_invalid")
    try:
        previous = store.release_name(name, body.to)
    except KeyError:
        raise not_found(f"no model was ever deployed under the name {name!r}", "model_not_found") from None
    except DeployRefused as e:
        raise refused(e) from None
    store.audit(admin.id, "model.release", name, f"from={previous or 'no key'} to={body.to or 'the next deployer'}")
    return json_response({"name": name, "owner": body.to, "previous_owner": previous})
