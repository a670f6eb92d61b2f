"""What the console (and any client) reads beside the resource routes: who a key is, its usage over
time, the job kinds with their params schemas, and an image as a model's normalised inputs.

- ``GET /v1/keys/me``: the calling key's record and the quota it has used; never a secret.
- ``GET /v1/usage``: samples served on the metered paths per model, path and UTC day (admin: every
  key's; any other key: its own).
- ``GET /v1/job-kinds``: every job kind and the JSON schema of its params, made from the same pydantic
  model ``POST /v1/jobs`` validates with, so a form built from it and the API never disagree.
- ``POST /v1/models/{name}/inputs``: an image made into the model's normalised inputs, exactly as
  ``predict`` makes them, to send to ``/distill`` (which takes tensors only).
"""
from __future__ import annotations

import inspect
import time

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..auth import ApiKey, window_start
from ..bodies import IMAGE_TYPES, MULTIPART, read_body
from ..deps import (
    SERVING_DOC,
    ApiKeyDep,
    JobsKeyDep,
    ModelHostDep,
    ModelName,
    OptionalApiKeyDep,
    SettingsDep,
    StoreDep,
)
from ..errors import ApiError, invalid
from ..inference import require_predict
from ..jobs.kinds import KINDS, get_kind
from ..schemas import AUTH, NO_NUL, KeyPublic, json_response, ok, responses
from ..store import ApiKeyRow
from ..tensors import images_to_inputs

router = APIRouter(tags=["account"])

_KEY = {"id": "0a1b2c3d4e5f", "name": "teacher-of-lab-7", "scopes": ["distill"], "models": ["mnist-demo"],
        "quota": 100000, "quota_window_s": 86400, "created_at": 1767225600.0, "expires_at": None,
        "revoked_at": None}


# ------------------------------------------------------------------------------------------ who am I
class KeyMe(KeyPublic):
    quota_used: int = Field(description="keyed samples served in the current quota window (the key's whole "
                            "life without a window)")


def quota_used(row: ApiKeyRow, now: float) -> int:
    """The samples the quota counts now: a window that has rolled over since the last charge counts none."""
    if row.quota_window_s and row.window_start < window_start(row.quota_window_s, now):
        return 0
    return int(row.used)


@router.get("/v1/keys/me", response_model=KeyMe, summary="The calling key: scopes, allowlist, quota and its use",
            responses={**ok({**_KEY, "quota_used": 1200}), **responses(401, 422, 429)})
def me(key: ApiKeyDep, store: StoreDep) -> Response:
    row = store.get_key(key.id)
    if row is None:  # revoked and deleted between authentication and here
        raise ApiError(401, "invalid_key", "unknown API key", {"WWW-Authenticate": "Bearer"})
    return json_response({**ApiKey.from_row(row).public(), "quota_used": quota_used(row, time.time())})


# ------------------------------------------------------------------------------------------ usage
class UsageDay(BaseModel):
    day: str = Field(description="UTC day, YYYY-MM-DD")
    model: str
    kind: str = Field(description="the path served: predict (with a key) or distill")
    key_id: str
    requests: int
    samples: int


class KeyQuota(BaseModel):
    key_id: str
    quota: int | None
    quota_window_s: int | None
    quota_used: int


class UsageReport(BaseModel):
    usage: list[UsageDay] = Field(description="oldest day first; requests made without a key are not counted")
    keys: list[KeyQuota] = Field(description="the quota each key covered has used (admin: every key, or with model= "
                                 "the keys its rows name)")


_USAGE = {"usage": [{"day": "2026-01-01", "model": "mnist-demo", "kind": "distill", "key_id": "0a1b2c3d4e5f",
                     "requests": 12, "samples": 1200}],
          "keys": [{"key_id": "0a1b2c3d4e5f", "quota": 100000, "quota_window_s": 86400, "quota_used": 1200}]}


@router.get("/v1/usage", response_model=UsageReport, summary="Samples served per model, path and day",
            responses={**ok(_USAGE), **responses(*AUTH, why={
                403: "another key's usage asked for by a key that is not an admin"})})
def usage(key: ApiKeyDep, store: StoreDep,
          model: str | None = Query(None, max_length=200, pattern=NO_NUL, description="one model only"),
          key_id: str | None = Query(None, max_length=32, pattern=NO_NUL,
                                     description="one key only (admin; any other key: its own)"),
          days: int = Query(30, ge=1, le=3660, description="the last this many UTC days, today included")) -> Response:
    admin = key.grants("admin")
    if not admin and key_id not in (None, key.id):
        raise ApiError(403, "forbidden_scope", "only an admin key reads another key's usage")
    who = key_id if admin else key.id
    now = time.time()
    since = time.strftime("%Y-%m-%d", time.gmtime(now - (days - 1) * 86400))
    rows = store.usage(who, model=model, since=since)
    if admin and who is None:  # every key's quota (the keys page), or of those a model's answer names (its page)
        keys = store.list_keys() if model is None else store.get_keys(r.key_id for r in rows)
    else:
        row = store.get_key(who)
        keys = [] if row is None else [row]
    return json_response({
        "usage": [{"day": r.day, "model": r.model, "kind": r.kind, "key_id": r.key_id, "requests": int(r.requests),
                   "samples": int(r.samples)} for r in rows],
        "keys": [{"key_id": k.id, "quota": k.quota, "quota_window_s": k.quota_window_s,
                  "quota_used": quota_used(k, now)} for k in keys]})


# ------------------------------------------------------------------------------------------ job kinds
class JobKindInfo(BaseModel):
    name: str
    description: str = Field(description="what the kind does, from its module")
    params_schema: dict = Field(description="the JSON schema of the kind's params: what POST /v1/jobs validates")


class JobKinds(BaseModel):
    kinds: list[JobKindInfo]
    datasets: list[str] = Field(description="embedded data sets a data field takes by name (or an uploaded "
                                "dataset's file id)")
    architectures: list[str] = Field(description="zoo architectures an arch field takes")


def _description(kind) -> str:
    doc = inspect.getdoc(inspect.getmodule(kind.run)) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "")


_KINDS_EXAMPLE = {"kinds": [{"name": "audit", "description": "audit: the leak audit against the public outputs of "
                             "a hosted model (or uploaded weights).",
                             "params_schema": {"type": "object", "properties": {"data": {"type": "string"}},
                                               "required": ["data"]}}],
                  "datasets": ["digits", "mnist-5k", "mnist-textures"], "architectures": ["cnn", "mlp", "resnet8"]}


@router.get("/v1/job-kinds", response_model=JobKinds, summary="Job kinds and their params' JSON schemas",
            responses={**ok(_KINDS_EXAMPLE), **responses(*AUTH, why={403: "the key lacks the jobs scope"})})
def job_kinds(_: JobsKeyDep) -> Response:
    from sdb_core.data import list_datasets  # here: importing the app must not import torch
    from sdb_core.models import list_models

    from ..jobs.kinds.base import PATH_SETS

    kinds = [get_kind(n) for n in sorted(KINDS.names())]
    return json_response({
        "kinds": [{"name": k.name, "description": _description(k), "params_schema": k.params.model_json_schema()}
                  for k in kinds],
        "datasets": [d for d in list_datasets() if d not in PATH_SETS],
        "architectures": list(list_models())})


# ------------------------------------------------------------------------------------------ image → inputs
class ModelInputs(BaseModel):
    model: str
    version: str
    shape: list[int] = Field(description="[N, C, H, W]")
    inputs: list = Field(description="the normalised inputs, [N, C, H, W]: a predict or distill body's inputs")


_IMAGE_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
        "type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
        "description": "PNG or JPEG images, one part each: several parts are several samples, answered in order"}},
        "required": ["file"]}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/v1/models/{name}/inputs", response_model=ModelInputs, openapi_extra={**_IMAGE_DOC, **SERVING_DOC},
             summary="Images as the model's normalised inputs, as predict makes them",
             responses={**ok({"model": "mnist-demo", "version": "1", "shape": [1, 1, 2, 2],
                              "inputs": [[[[-0.42, 2.8], [0.1, -0.42]]]]}),
                        **responses(400, *AUTH, 404, 413, 415, 503, why={
                            400: "a malformed multipart body", 401: "a key that is not valid (or none, when "
                            "predict needs one)", 413: "over the payload limit, or images that together hold over 100 M pixels",
                            415: "not an image, or one that is not a readable PNG or JPEG",
                            422: "no file, or a model whose inputs are not images",
                            503: "this model version cannot be served (the message says why)"})})
async def image_inputs(name: ModelName, request: Request, key: OptionalApiKeyDep, host: ModelHostDep,
                       settings: SettingsDep,
                       version: str | None = Query(None, max_length=100, pattern=NO_NUL)) -> Response:
    require_predict(key, name, settings.public_predict)
    model = await host.aget(name, version)
    shape = model.in_shape
    if len(shape) != 3:
        raise invalid(f"model {name!r} takes inputs of shape {shape}, not images", "invalid_shape")
    max_samples = settings.max_request_samples
    body = await read_body(request, (MULTIPART, *IMAGE_TYPES), max_files=max_samples + 1, samples=max_samples)
    if not body.uploads:
        raise invalid("no image: send it as the multipart field 'file'", "invalid_request")
    if len(body.uploads) > max_samples:  # as predict counts them: before any image is decoded
        raise invalid(f"{len(body.uploads)} images in one request; at most {max_samples}", "too_many_samples")
    norm = model.meta["normalize"]
    # every image sent, as predict takes them (one per field name kept only the last of several 'file' fields)
    x = await run_in_threadpool(lambda: images_to_inputs(body.uploads, shape, norm).tolist())
    return json_response({"model": model.name, "version": model.version, "shape": [len(x), *shape], "inputs": x})
