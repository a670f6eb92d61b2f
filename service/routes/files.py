"""``/v1/files``: upload, list, get and delete files (scope ``jobs``, ``deploy`` or ``admin``).

A file belongs to the key that uploaded it; an admin key sees every file and may share one
with every key (``shared=true``). Another key's file is a 404, so ids are not probed.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from .. import files
from ..auth import ApiKey
from ..bodies import MULTIPART, media_type
from ..deps import ApiKeyDep, SettingsDep, StoreDep
from ..errors import ApiError
from ..filechecks import PURPOSES
from ..schemas import AUTH, NO_NUL, Before, Page, json_response, ok, page, page_limit, page_start, responses

router = APIRouter(prefix="/v1/files", tags=["files"])
FILE_SCOPES = ("jobs", "deploy")  # admin grants both


async def _files_key(key: ApiKeyDep) -> ApiKey:
    if not any(key.grants(s) for s in FILE_SCOPES):
        raise ApiError(403, "forbidden_scope", "this API key lacks the 'jobs' or 'deploy' scope")
    return key


FilesKeyDep = Annotated[ApiKey, Depends(_files_key)]


class FilePublic(BaseModel):
    id: str = Field(description="file- and 24 hex digits: what a job or a deploy names")
    object: str = "file"
    purpose: str = Field(description=" | ".join(PURPOSES))
    filename: str = Field(description="the uploaded name, without any path")
    bytes: int = Field(description="what it keeps on the server, which the storage cap counts: the upload's size, or an "
                       "image folder's unpacked")
    sha256: str
    format: str = Field(description="what the check found: safetensors, pt, imagefolder, npz, png, jpeg, sdb")
    info: dict = Field(description="what the check measured: tensors, classes and images, width and height, ...")
    shared: bool
    created_at: float
    owner: str | None = Field(None, description="the uploading key's id (admin keys only)")
    path: str | None = Field(None, description="where the server keeps it (admin keys only)")


class FileList(Page):
    files: list[FilePublic]


class FileDeleted(BaseModel):
    id: str
    deleted: bool


_UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": list(PURPOSES)},
        "shared": {"type": "boolean", "description": "every key may use it (admin keys only)"}}}}}}}
_FILE = {"id": "file-0123456789abcdef01234567", "object": "file", "purpose": "dataset", "filename": "digits.npz",
         "bytes": 183412, "sha256": "9f2c" + "0" * 60, "format": "npz", "info": {"images": 1797, "classes": 10},
         "shared": False, "created_at": 1767225600.0}
_SCOPE = {403: "the key has neither the jobs nor the deploy scope"}
_ERRORS = {**ok(_FILE, 201), **responses(400, *AUTH, 413, 415, 507, why={
    400: "a malformed multipart body", 403: "the key has neither the jobs nor the deploy scope, or shares "
    "a file without being an admin", 413: "over the upload limit (SDB_MAX_FILE_BYTES), or the key's storage cap",
    415: "not multipart/form-data", 422: "no file, an unknown purpose, or a file that failed its check"})}
_FILE_ID = Annotated[str, Path(description="file- and 24 hex digits", examples=["file-0123456789abcdef01234567"],
                               pattern=NO_NUL)]


@router.post("", status_code=201, response_model=FilePublic, openapi_extra=_UPLOAD_DOC, responses=_ERRORS,
             summary="Upload a file (multipart: file, purpose weights | dataset | image | bundle)")
async def upload(request: Request, key: FilesKeyDep, store: StoreDep, settings: SettingsDep) -> Response:
    media = media_type(request)
    if media != MULTIPART:
        raise ApiError(415, "unsupported_media_type", f"send multipart/form-data, not {media}")
    async with files.Staging(settings.files_dir) as stage:
        got = await files.receive(request, stage, settings.max_file_bytes)
        purpose = files.parse_purpose(got.fields.get("purpose"))
        shared = files.parse_flag(got.fields.get("shared"), "shared")
        if shared and not key.grants("admin"):
            raise ApiError(403, "forbidden_scope", "only an admin key may share a file")
        row = await run_in_threadpool(files.ingest, store, settings, key, stage, got, purpose, shared)
    return json_response(files.public(row, key, settings), status=201)


@router.get("", response_model=FileList,
            summary="This key's files and the shared ones (admin: every file), newest first, a page at a time",
            responses={**ok({"files": [_FILE]}),
                       **responses(*AUTH, why={**_SCOPE, 422: "a limit out of range, or a before that is no next"})})
def list_files(key: FilesKeyDep, store: StoreDep, settings: SettingsDep, before: Before = None,
               limit: int = page_limit(1000)) -> Response:
    rows = store.list_files(None if key.grants("admin") else key.id, shared=True, before=page_start(before),
                            limit=limit + 1)
    return json_response(page("files", rows, limit, lambda r: files.public(r, key, settings)))


@router.get("/{file_id}", response_model=FilePublic, summary="One file",
            responses={**ok(_FILE), **responses(*AUTH, 404, why={**_SCOPE, 404: "no such file for this key"})})
def get_file(file_id: _FILE_ID, key: FilesKeyDep, store: StoreDep, settings: SettingsDep) -> Response:
    return json_response(files.public(files.get_visible(store, key, file_id), key, settings))


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file (its owner, or admin)",
               responses={**ok({"id": _FILE["id"], "deleted": True}), **responses(*AUTH, 404, why={
                   403: "a scope missing, or a shared file this key does not own", 404: "no such file for this key"})})
def delete_file(file_id: _FILE_ID, key: FilesKeyDep, store: StoreDep, settings: SettingsDep) -> Response:
    row = files.delete(store, settings, key, file_id)
    return json_response({"id": row.id, "deleted": True})
