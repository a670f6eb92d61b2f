"""``/v1/jobs``: submit, list, get, cancel, delete, logs and artifacts (scope ``jobs``).

A key sees its own jobs only (another key's job is a 404, so ids are not probed); an admin
key sees every job, as stored; what any other key reads of a job (record, log) names no server
path. Params are validated by the kind's pydantic model and its submission check before
anything is queued: a bad job is a 422 (or 403/404) and leaves no row. A key whose jobs keep their
cap of artifact bytes queues nothing more until it deletes finished jobs.
"""
from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import pathlib
import re
import shutil
from typing import Annotated

from fastapi import APIRouter, Body, Header, Path, Query
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, Response

from ..auth import ApiKey
from ..bodies import JSON_ONLY, NOT_JSON
from ..copies import bundle_path
from ..deps import JobQueueDep, JobsKeyDep, ModelHostDep, SettingsDep
from ..disclosure import hide_paths, hide_paths_in
from ..errors import ApiError, invalid, not_found
from ..jobs.kinds import KINDS, Submission, get_kind, params_errors
from ..jobs.queue import TooManyJobs
from ..jobs.runner import job_dir
from ..jobs.schemas import (
    ArtifactList,
    JobDeleted,
    JobList,
    JobLogChunk,
    JobPublic,
    JobStatus,
    JobSubmit,
    job_public,
)
from ..schemas import AUTH, NO_NUL, Before, Page, json_response, ok, page, page_limit, page_start, responses
from ..settings import Settings
from ..store import JOB_DONE, JobRow, ModelRow, Store

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ARTIFACT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
LOG_CHUNK_MAX = 1 << 20

_JOB = {"id": "job-0123456789abcdef01234567", "kind": "audit", "status": "queued",
        "params": {"target": {"model": "mnist-demo", "version": "1"}, "data": "mnist-5k"}, "owner": "0a1b2c3d4e5f",
        "backend": "embedded", "progress": 0.0, "step": "", "message": "", "metrics": {}, "result": {},
        "error": None, "attempts": 0, "worker": None, "cancel_requested": False, "created_at": 1767225600.0,
        "started_at": None, "finished_at": None, "heartbeat_at": None}
_SCOPE = {403: "the key lacks the jobs scope"}
_OWN = responses(*AUTH, 404, why={**_SCOPE, 404: "no such job for this key"})
JobId = Annotated[str, Path(description="the job's id", examples=["job-0123456789abcdef01234567"], pattern=NO_NUL)]
_SUBMIT_EXAMPLES = {"audit": {"summary": "a leak audit of a served model",
                              "value": {"kind": "audit", "params": {"target": {"model": "mnist-demo"},
                                                                    "data": "mnist-5k"}}}}


def _own(queue, job_id: str, key: ApiKey) -> JobRow:
    row = queue.get(job_id)
    if row is None or (row.owner != key.id and not key.grants("admin")):
        raise _no_job(job_id)
    return row


def _no_job(job_id: str) -> ApiError:
    return not_found(f"no job with id {job_id!r}", "job_not_found")


def _shown(row: JobRow, key: ApiKey, settings: Settings) -> dict:
    """The job as this key may read it: as stored for an admin, with server paths and worker hosts hidden otherwise."""
    job = job_public(row)
    if key.grants("admin"):
        return job
    return {**job, **hide_paths_in({f: job[f] for f in ("params", "result", "message", "error", "worker")},
                                   settings.data_dir)}


@router.post("", status_code=202, response_model=JobPublic, dependencies=[JSON_ONLY],
             summary="Queue a job; the same Idempotency-Key returns the same job",
             responses={**ok(_JOB, 202), **responses(400, *AUTH, 404, 409, 413, 415, why={
                 403: "the key lacks the jobs scope, or a model or file the params name is not this key's to use",
                 404: "a model or file the params name does not exist for this key",
                 409: "this Idempotency-Key was used for a different job",
                 413: "the body is over the payload limit, or the key's jobs keep their cap of artifact bytes",
                 415: NOT_JSON,
                 422: "an unknown kind, or params that fail the kind's checks (server paths from a non-admin key)",
                 429: "over the request rate, or the key has its most jobs queued or running"})})
def submit(body: Annotated[JobSubmit, Body(openapi_examples=_SUBMIT_EXAMPLES)], key: JobsKeyDep, queue: JobQueueDep,
           host: ModelHostDep, settings: SettingsDep,
           idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200)) -> Response:
    if body.kind not in KINDS:
        raise invalid(f"unknown job kind {body.kind!r}; known: {', '.join(KINDS.names())}", "unknown_kind")
    kind = get_kind(body.kind)
    try:
        params = kind.params.model_validate(body.params)
    except ValidationError as e:
        raise invalid(params_errors(e), "invalid_params") from None
    digest = request_sha256(body.kind, params.model_dump(mode="json"))
    if idempotency_key is not None:  # a retry is answered from the job it made, not checked again
        existing = queue.by_idempotency_key(key.id, idempotency_key)
        if existing is not None and existing.request_sha256 is not None:
            return _retried(existing, body.kind, digest, None, key, settings)
    if kind.check is not None:
        params = kind.check(params, Submission(key, host, settings, queue))
    _under_job_cap(queue, key, settings, idempotency_key)
    _under_artifact_cap(queue, key, settings, idempotency_key)
    stored = params.model_dump(mode="json")
    try:
        row, created = queue.submit(body.kind, stored, key.id, backend=settings.jobs_backend,
                                    idempotency_key=idempotency_key, request_sha256=digest,
                                    max_active=settings.max_active_jobs_per_key)
    except TooManyJobs as e:  # submissions racing past the check above: counted again, exactly, as the job is added
        raise too_many_jobs(e.active) from None
    if not created:
        return _retried(row, body.kind, digest, stored, key, settings)
    queue.store.audit(key.id, "job.submit", row.id, body.kind)
    return json_response(_shown(row, key, settings), status=202)


def request_sha256(kind: str, params: dict) -> str:
    """The digest of a submission as sent: its kind and its params as validated, before the kind's check
    resolved them (pinned a hosted model's version, say), so a retry made after a new version was deployed or
    a named file deleted is still the same request."""
    return hashlib.sha256(json.dumps([kind, params], sort_keys=True).encode()).hexdigest()


def _retried(row: JobRow, kind: str, digest: str, stored: dict | None, key: ApiKey, settings: Settings) -> Response:
    """The answer to a submission whose Idempotency-Key ``row`` already has: that job when it is the same request
    (its digest; a job older than digests: the same kind and checked params ``stored``), else a 409."""
    same = row.request_sha256 == digest if row.request_sha256 is not None else (
        row.kind == kind and json.loads(row.params) == stored)
    if not same:
        raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was used for a different job; use a new key")
    return json_response(_shown(row, key, settings), status=202)


def _under_job_cap(queue, key, settings, idempotency_key: str | None) -> None:
    """A key may have ``max_active_jobs_per_key`` jobs queued or running; a retry of one of them is not a new job."""
    if idempotency_key is not None and queue.by_idempotency_key(key.id, idempotency_key) is not None:
        return
    cap = settings.max_active_jobs_per_key
    active = sum(len(queue.list(owner=key.id, status=s, limit=cap)) for s in ("queued", "running"))
    if active >= cap:
        raise too_many_jobs(active)


def too_many_jobs(active: int) -> ApiError:
    return ApiError(429, "too_many_jobs", f"this key has {active} jobs queued or running, the most it may have; "
                    "wait for one to end or cancel one", headers={"Retry-After": "10"})


def _under_artifact_cap(queue, key, settings, idempotency_key: str | None) -> None:
    """A key at its ``max_artifact_storage_per_key`` bytes of job artifacts queues nothing more (admin: no cap)."""
    if key.grants("admin") or (idempotency_key is not None and queue.by_idempotency_key(key.id, idempotency_key)):
        return
    cap, used = settings.max_artifact_storage_per_key, queue.artifact_bytes(key.id)
    if used >= cap:
        raise ApiError(413, "artifact_storage_exceeded", f"this key's jobs keep {used} bytes of artifacts and it may "
                       f"keep {cap}: delete jobs' artifacts (DELETE /v1/jobs/{{id}} of finished jobs) to make room")


class JobPage(JobList, Page):
    """A page of jobs, and where the next one starts."""


@router.get("", response_model=JobPage, summary="Jobs, newest first, a page at a time: your own, or all with admin",
            responses={**ok({"jobs": [_JOB]}), **responses(*AUTH, why={
                **_SCOPE, 422: "a limit out of range, a before that is no next, or a version without its model"})})
def list_jobs(key: JobsKeyDep, queue: JobQueueDep, settings: SettingsDep, status: JobStatus | None = None,
              kind: str | None = Query(None, max_length=64, pattern=NO_NUL),
              model: str | None = Query(None, max_length=200, pattern=NO_NUL, description=(
                  "jobs whose params' target is this hosted model (leak audits)")),
              version: str | None = Query(None, max_length=100, pattern=NO_NUL, description=(
                  "with model: of this version of it (a target's version is pinned at submission)")),
              before: Before = None, limit: int = page_limit(100)) -> Response:
    if version is not None and model is None:
        raise invalid("version filters by a version of a model: give model too", "invalid_request")
    rows = queue.list(owner=None if key.grants("admin") else key.id, status=status.value if status else None,
                      kind=kind, model=model, version=version, before=page_start(before), limit=limit + 1)
    return json_response(page("jobs", rows, limit, lambda r: _shown(r, key, settings)))


@router.get("/{job_id}", response_model=JobPublic, summary="Status, progress, metrics, error",
            responses={**ok(_JOB), **_OWN})
def get_job(job_id: JobId, key: JobsKeyDep, queue: JobQueueDep, settings: SettingsDep) -> Response:
    return json_response(_shown(_own(queue, job_id, key), key, settings))


@router.post("/{job_id}/cancel", response_model=JobPublic,
             summary="Cancel: a queued job at once, a running one within seconds",
             responses={**ok({**_JOB, "status": "cancelled", "cancel_requested": True}),
                        **responses(*AUTH, 404, 409, 413, why={**_SCOPE, 404: "no such job for this key",
                                                               409: "the job already succeeded or failed"})})
def cancel(job_id: JobId, key: JobsKeyDep, queue: JobQueueDep, settings: SettingsDep) -> Response:
    _own(queue, job_id, key)  # another key's job: a 404, and nothing is asked of it
    # Answered by the row as the cancel found it, not as first read: a delete or the job's end may come between.
    row = queue.cancel(job_id)
    if row is None:
        raise _no_job(job_id)
    if row.status in ("succeeded", "failed"):
        raise ApiError(409, "job_finished", f"job {job_id} already {row.status}")
    queue.store.audit(key.id, "job.cancel", job_id)
    return json_response(_shown(row, key, settings))


@router.delete("/{job_id}", response_model=JobDeleted,
               summary="Delete a finished job: its record, log and artifacts (frees its artifact storage)",
               responses={**ok({"id": _JOB["id"], "deleted": True}),
                          **responses(*AUTH, 404, 409, why={**_SCOPE, 404: "no such job for this key",
                                                            409: "the job is queued or running: cancel it first; or a "
                                                                 "registered model version is served from its "
                                                                 "artifacts: remove it first"})})
def delete_job(job_id: JobId, key: JobsKeyDep, queue: JobQueueDep, settings: SettingsDep) -> Response:
    row = _own(queue, job_id, key)
    if row.status not in JOB_DONE:
        raise ApiError(409, "job_not_finished", f"job {job_id} is {row.status}: cancel it "
                       f"(POST /v1/jobs/{job_id}/cancel) and delete it once it has ended")
    served = _served_from(settings, queue.store, job_id)
    if served:
        raise ApiError(409, "job_artifacts_served", f"job {job_id}'s artifacts hold the bundle of "
                       f"{', '.join(f'{m.name} version {m.version}' for m in served)}, registered in place: "
                       "deleting the job would stop serving it. Remove those versions first (DELETE "
                       "/v1/models/NAME?version=V, or `sdb models remove NAME --version V`), then delete the job")
    if queue.delete(job_id) is None:
        raise _no_job(job_id)
    shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)  # the row first: no reader finds half a job
    queue.store.audit(key.id, "job.delete", job_id, f"{row.kind} {row.artifact_bytes or 0} artifact bytes")
    return json_response({"id": job_id, "deleted": True})


def _served_from(settings: Settings, store: Store, job_id: str) -> list[ModelRow]:
    """The registered versions whose bundle lies in the job's folder (``sdb models add`` of a job's artifact
    registers it in place, as docs/pose.md shows): deleting the job would take their bundle away. A version's path
    is read as the registry reads it, and also as one naming ``jobs/<job_id>/`` (a data dir moved, or a path stored
    relative to it)."""
    folder = job_dir(settings, job_id).resolve()
    return [m for m in store.list_models()
            if bundle_path(settings, m.path).resolve().is_relative_to(folder)
            or ("jobs", job_id) in zip(pathlib.Path(m.path).parts, pathlib.Path(m.path).parts[1:])]


@router.get("/{job_id}/logs", response_model=JobLogChunk, summary="The log from a byte offset",
            responses={**ok({"text": "epoch 1/3 loss 0.412\n", "offset": 0, "next_offset": 21, "status": "running",
                             "done": False}), **_OWN})
async def logs(job_id: JobId, key: JobsKeyDep, queue: JobQueueDep, settings: SettingsDep,
               offset: int = Query(0, ge=0), limit: int = Query(LOG_CHUNK_MAX, ge=1, le=LOG_CHUNK_MAX)) -> Response:
    row = await run_in_threadpool(_own, queue, job_id, key)
    path = job_dir(settings, job_id) / "log.txt"
    admin = key.grants("admin")
    # A non-admin reads whole lines only, from a line's start to a line's end: server paths and the worker's id are
    # hidden line by line, and a chunk that began inside one (offset = where a path starts, + 4) showed its rest.
    start, chunk, size, end = await run_in_threadpool(_read_log, path, offset, limit, not admin)
    finished = row.status in JOB_DONE
    if not admin and not (finished and end >= size) and end == start + len(chunk):
        # a line still being written (or past the limit) comes next time, whole
        chunk = chunk[:chunk.rindex(b"\n") + 1] if b"\n" in chunk else b""
        end = start + len(chunk)
    text, used = _decode_whole(chunk)
    if not admin:
        text = hide_paths(text, settings.data_dir)
    if end == start + len(chunk):
        end = start + used  # a character cut at the chunk's end is read whole next time
    return json_response({"text": text, "offset": start, "next_offset": end, "status": row.status,
                          "done": finished and end >= size})


def _read_log(path: pathlib.Path, offset: int, limit: int, by_line: bool) -> tuple[int, bytes, int, int]:
    """Blocking: (where the chunk starts, up to ``limit`` bytes from there, the log's size, where the next chunk
    starts). ``offset`` past the end reads nothing from the end; ``by_line``: the start is moved back to its line's
    (forward to the next line's when the line is longer than a chunk), and a line longer than ``limit`` is read
    whole (up to a chunk's most; past it, cut, the next chunk at the next line): moved back to its start each time,
    a long line was read again and again and the log never went past it."""
    if not path.is_file():
        return 0, b"", 0, 0
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = min(offset, size)  # seek takes no offset past 2**63, and past the end there is nothing to read
        if by_line and start > 0:
            back = max(0, start - LOG_CHUNK_MAX)
            f.seek(back)
            line = f.read(start - back).rfind(b"\n")
            if line >= 0 or back == 0:
                start = back + line + 1
            else:
                f.seek(start)
                rest = f.read(LOG_CHUNK_MAX)
                start = start + rest.index(b"\n") + 1 if b"\n" in rest else size
        f.seek(start)
        chunk = f.read(limit)
        end = start + len(chunk)
        if by_line and chunk and b"\n" not in chunk and end < size:
            rest = f.read(max(0, LOG_CHUNK_MAX - len(chunk)))
            if b"\n" in rest:
                chunk += rest[:rest.index(b"\n") + 1]
                end = start + len(chunk)
            else:  # a line of over a chunk: this much of it; the next chunk starts at the next line
                end += len(rest)
                while block := f.read(1 << 20):
                    if b"\n" in block:
                        end += block.index(b"\n") + 1
                        break
                    end += len(block)
        return start, chunk, size, end


def _decode_whole(chunk: bytes) -> tuple[str, int]:
    """Decode, leaving a UTF-8 character cut at the end of the chunk for the next call."""
    for cut in range(4):
        try:
            return chunk[:len(chunk) - cut].decode("utf-8"), len(chunk) - cut
        except UnicodeDecodeError:
            continue
    return chunk.decode("utf-8", "replace"), len(chunk)


@router.get("/{job_id}/artifacts", response_model=ArtifactList, summary="The files a job produced",
            responses={**ok({"artifacts": [{"name": "report.json", "size": 2048},
                                           {"name": "leak.png", "size": 30512}]}),
                       **_OWN})
def artifacts(job_id: JobId, key: JobsKeyDep, queue: JobQueueDep, settings: SettingsDep) -> Response:
    _own(queue, job_id, key)
    d = job_dir(settings, job_id) / "artifacts"
    files = sorted(p for p in d.iterdir() if p.is_file() and ARTIFACT_RE.fullmatch(p.name)) if d.is_dir() else []
    return json_response({"artifacts": [{"name": p.name, "size": p.stat().st_size} for p in files]})


# FileResponse names the type by the file's suffix: JSON reports, PNG plots, text, else octet-stream (bundles,
# weights). Octet-stream first: a generated client reads the first type as every answer's (JSON first, it decoded
# every PNG and safetensors file as JSON, and failed); hence also response_class=Response below, whose lack of a
# media type keeps FastAPI from putting application/json before them.
_ARTIFACT_TYPES = {**{t: {"schema": {"type": "string", "format": "binary"}}
                      for t in ("application/octet-stream", "image/png", "text/plain")},
                   "application/json": {"schema": {"type": "object"}, "example": {"kind": "audit", "leak": 0.03}}}


@router.get("/{job_id}/artifacts/{name}", summary="Download one artifact", response_class=Response,
            responses={200: {"description": "the file", "content": _ARTIFACT_TYPES},
                       **responses(*AUTH, 404, why={**_SCOPE, 404: "no such job for this key, or no such artifact",
                                                    422: "not an artifact name"})})
def artifact(job_id: JobId, name: Annotated[str, Path(description="an artifact's file name", examples=["report.json"],
                                                      pattern=NO_NUL)],
             key: JobsKeyDep, queue: JobQueueDep, settings: SettingsDep) -> Response:
    _own(queue, job_id, key)
    if not ARTIFACT_RE.fullmatch(name) or ".." in name:
        raise invalid(f"not an artifact name: {name!r}", "invalid_artifact_name")
    d = (job_dir(settings, job_id) / "artifacts").resolve()
    p = (d / name).resolve()
    if p.parent != d or not p.is_file():
        raise not_found(f"job {job_id} has no artifact {name!r}", "artifact_not_found")
    return FileResponse(p, filename=name, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")
