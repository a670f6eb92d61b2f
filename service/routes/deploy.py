"""``POST /v1/models``: serve an uploaded ``.sdb`` bundle (scope ``deploy``, or ``admin``).

The bundle comes in the request (multipart field ``file``) or as an uploaded file of purpose
``bundle`` (``{"file": "file-…"}``); never as a server path. It is verified, placed beside the
served bundles under a new file name (never over one), and served as the next version of its
name (the bundle's own, or the ``name`` field). The audit log records which key deployed it.
"""
from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from .. import files
from ..auth import ApiKey, check_scope
from ..bodies import JSON, MULTIPART, media_type
from ..deps import ApiKeyDep, ModelHostDep, SettingsDep, StoreDep
from ..errors import ApiError, invalid
from ..filechecks import read_bundle
from ..jobs.kinds.base import NAME_PATTERN
from ..jobs.kinds.wrap import _next_version
from ..registry import HostedModel, ModelHost
from ..schemas import ModelInfo, json_response
from ..settings import Settings
from ..store import Store
from ..tensors import parse_json
from .models import _describe

router = APIRouter(prefix="/v1/models", tags=["models"])


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(pattern=r"^file-[0-9a-f]{24}$", description="an uploaded file of purpose bundle")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="serve it under this name; default the bundle's")


async def _deployer(key: ApiKeyDep) -> ApiKey:
    check_scope(key, "deploy")  # admin grants it
    return key


DeployKeyDep = Annotated[ApiKey, Depends(_deployer)]

_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "a .sdb bundle"},
        "name": {"type": "string", "pattern": NAME_PATTERN, "description": "default the bundle's name"}}}},
    "application/json": {"schema": DeployRequest.model_json_schema()}}}}
_ERRORS = {400: {"description": "the bundle failed verification"}, 404: {"description": "no such file"},
           409: {"description": "that version was registered meanwhile"},
           413: {"description": "over the size limit"}, 415: {"description": "neither multipart nor JSON"},
           422: {"description": "a bad field, a server path, or a file of another purpose"}}


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


def deploy_bundle(host: ModelHost, store: Store, settings: Settings, key: ApiKey, src: Path, shown: str,
                  name: str | None, *, move: bool) -> HostedModel:
    """Blocking: verify the bundle, place it beside the served ones and serve it as the next version of
    ``name`` (default the bundle's own). 400 when refused, and then nothing stays. ``shown`` stands for
    the bundle in messages: a server path is never in one."""
    try:
        meta = read_bundle(src, files.limits(settings), shown)
    except ApiError as e:
        store.audit(key.id, "model.refused", shown, e.message)
        raise ApiError(400, "bundle_refused", f"bundle refused: {e.message}") from None
    name = name or str(meta["name"])
    if not re.fullmatch(NAME_PATTERN, name):
        raise invalid(f"the bundle's name {name[:100]!r} cannot be served: give a name field", "invalid_request")
    folder = settings.bundles_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    version = _next_version(store, name)
    target = folder / f"{version}.sdb"
    if target.exists():  # never over a bundle file: a removed version's may still be read
        target = folder / f"{version}-{secrets.token_hex(4)}.sdb"
    (shutil.move if move else shutil.copyfile)(src, target)
    try:
        for attempt in range(5):
            try:
                return host.add(target, actor=key.id, name=name, version=version)
            except ApiError as e:
                if e.code != "model_exists" or attempt == 4:
                    raise
                version = _next_version(store, name)  # another deploy took this one meanwhile
    except ApiError as e:
        target.unlink(missing_ok=True)
        raise ApiError(e.status, e.code, e.message.replace(str(target.resolve()), shown)) from None
    raise AssertionError("unreachable")


@router.post("", status_code=201, response_model=ModelInfo, openapi_extra=_DOC, responses=_ERRORS,
             summary="Serve an uploaded .sdb bundle as the next version of its name (admin or deploy)")
async def deploy(request: Request, key: DeployKeyDep, host: ModelHostDep, store: StoreDep,
                 settings: SettingsDep) -> Response:
    media = media_type(request)
    if media == MULTIPART:
        async with files.Staging(settings.files_dir) as stage:
            got = await files.receive(request, stage, settings.max_file_bytes)
            name = got.fields.get("name") or None
            if name is not None and not re.fullmatch(NAME_PATTERN, name):
                raise invalid(f"name must match {NAME_PATTERN}", "invalid_request")
            model = await run_in_threadpool(deploy_bundle, host, store, settings, key, got.path, got.filename, name,
                                            move=True)
    elif media in (JSON, ""):
        body = await _request_body(request, settings.max_payload_bytes)
        path = await run_in_threadpool(files.resolve_file, store, settings, key, body.file, "bundle")
        model = await run_in_threadpool(deploy_bundle, host, store, settings, key, path, body.file, body.name,
                                        move=False)
    else:
        raise ApiError(415, "unsupported_media_type", f"send multipart/form-data or application/json, not {media}")
    return json_response(_describe(host, model), status=201)
