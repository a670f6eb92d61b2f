"""``POST /v1/models``: serve an uploaded ``.sdb`` bundle (scope ``deploy``, or ``admin``).

The bundle comes in the request (multipart field ``file``) or as an uploaded file of purpose
``bundle`` (``{"file": "file-…"}``); never as a server path. :func:`service.deploy.serve_bundle`
does the rest, as for a job that deploys: a new file beside the served bundles (never over one),
verified, and served as the next version of its name (the bundle's own, or the ``name`` field)
with the output policy of the ``policy``, ``top_k`` and ``decimals`` fields (none given, a null one
being not given: the one the bundle was wrapped with, else every probability), in one transaction
that checks the name is this key's (or unclaimed, or the key is an admin's). A key with a model
allowlist deploys only under a name on it, checked once the name is known (the bundle's own when the
request gives none). The audit log records which key deployed it.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from sdb_core.protect.config import POLICIES

from .. import files
from ..auth import ApiKey, check_scope
from ..bodies import JSON, MULTIPART, is_json, media_type, unsupported
from ..deploy import serve_bundle
from ..deps import ApiKeyDep, ModelHostDep, SettingsDep, StoreDep
from ..errors import ApiError, invalid
from ..jobs.kinds.base import NAME_PATTERN
from ..schemas import AUTH, MODEL_EXAMPLE, ModelInfo, OutputPolicy, json_response, ok, responses
from ..tensors import parse_json

if TYPE_CHECKING:
    from ..registry import HostedModel

router = APIRouter(prefix="/v1/models", tags=["models"])


_POLICY = OutputPolicy.model_fields


class DeployRequest(OutputPolicy):
    """The bundle, its name, and the output policy its public routes apply (the fields of :class:`OutputPolicy`)."""

    file: str = Field(pattern=r"^file-[0-9a-f]{24}$", description="an uploaded file of purpose bundle")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="serve it under this name; default the bundle's")
    # null in the schema, not OutputPolicy's probs: a client generated from /openapi.json sends every default, and a
    # probs it never chose would serve every probability of a box wrapped to answer labels alone.
    policy: Literal[POLICIES] | None = Field(  # type: ignore[valid-type]
        None, description="probs, top_k or label. Null or omitted (top_k and decimals alike): not given; none of the "
        "three given: the bundle's own policy (its meta.json output_policy), else probs; decimals alone: probs")

    @model_validator(mode="after")
    def _k_with_top_k(self):  # OutputPolicy's, by name: with no policy, deploy.check_policy checks what was given
        return self if self.policy is None else super()._k_with_top_k()

    def given_policy(self) -> dict:
        """The policy fields the caller gave: a null one is not given (the bundle's own when none is)."""
        return self.model_dump(include=set(_POLICY), exclude_none=True)


async def _deployer(key: ApiKeyDep) -> ApiKey:
    check_scope(key, "deploy")  # admin grants it; the allowlist is checked once the name is known (deploy_bundle)
    return key


DeployKeyDep = Annotated[ApiKey, Depends(_deployer)]

_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "a .sdb bundle"},
        "name": {"type": "string", "pattern": NAME_PATTERN, "description": "default the bundle's name"},
        "policy": {"type": "string", "enum": list(POLICIES),
                   "description": DeployRequest.model_fields["policy"].description},
        "top_k": {"type": "integer", "description": _POLICY["top_k"].description},
        "decimals": {"type": "integer", "description": _POLICY["decimals"].description}}}},
    "application/json": {"schema": DeployRequest.model_json_schema(),
                         "example": {"file": "file-0123456789abcdef01234567", "name": "mnist-demo",
                                     "policy": "top_k", "top_k": 3}}}}}
_ERRORS = {**ok(MODEL_EXAMPLE, 201), **responses(400, *AUTH, 404, 409, 413, 415, 507, why={
    400: "the bundle failed verification, or a malformed body", 404: "no such file for this key",
    403: "the key lacks the deploy scope, the name is not on its model allowlist (model_not_allowed), or the name "
         "is another key's (model_not_owned)",
    409: "that version was registered meanwhile, or the version deployed was removed (DELETE /v1/models/{name}) "
         "before it could be served (model_removed: nothing of it is served)",
    413: "over the upload limit (SDB_MAX_FILE_BYTES), or past the key's storage cap (storage_exceeded: its files "
         "and deployed versions, SDB_MAX_FILE_STORAGE_PER_KEY)",
    415: "neither multipart nor JSON", 422: "a bad field, a server path, a file of another purpose, or a name no "
                                             "model can be served under (stats: the v2 statistics route's)"})}


async def _request_body(request: Request, limit: int) -> DeployRequest:
    """The JSON body, at most ``limit`` bytes (the route's body limit is the upload limit)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "payload_too_large", f"a JSON body is at most {limit} bytes")
    obj = parse_json(bytes(body))
    if "path" in obj:
        raise invalid("POST /v1/models takes no server path: upload the .sdb (multipart field 'file') "
                      "or name an uploaded one ({\"file\": \"file-…\"})", "server_path_refused")
    try:
        return DeployRequest.model_validate(obj)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise invalid(msg, "invalid_request") from None


@router.post("", status_code=201, response_model=ModelInfo, openapi_extra=_DOC, responses=_ERRORS,
             summary="Serve an uploaded .sdb bundle as the next version of its name (admin or deploy)")
async def deploy(request: Request, key: DeployKeyDep, host: ModelHostDep, store: StoreDep,
                 settings: SettingsDep) -> Response:
    media = media_type(request)

    def serve(path, shown: str, name: str | None, policy: dict) -> HostedModel:
        return serve_bundle(host, path, key=key, actor=key.id, name=name, policy=policy, shown=shown,
                            tenant=not key.grants("admin"), capped=not key.grants("admin"))

    if media == MULTIPART:
        async with files.Staging(settings.files_dir) as stage:
            got = await files.receive(request, stage, settings.max_file_bytes)
            name = got.fields.get("name") or None
            if name is not None and not re.fullmatch(NAME_PATTERN, name):
                raise invalid(f"name must match {NAME_PATTERN}", "invalid_request")
            policy = {k: got.fields[k] for k in _POLICY if got.fields.get(k)}
            model = await run_in_threadpool(serve, got.path, got.filename, name, policy)
    elif is_json(media):
        body = await _request_body(request, settings.max_payload_bytes)
        path = await run_in_threadpool(files.resolve_file, store, settings, key, body.file, "bundle")
        policy = body.given_policy()
        model = await run_in_threadpool(serve, path, body.file, body.name, policy)
    else:
        raise unsupported(media, (MULTIPART, JSON))
    # what was installed, not a lookup after it: a removal since would answer 404 for a version deployed
    return json_response(host.described(model), status=201)
