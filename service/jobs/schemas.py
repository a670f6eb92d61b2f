"""Bodies of the ``/v1/jobs`` routes."""
from __future__ import annotations

import json
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field

from ..store import JobRow


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobSubmit(BaseModel):
    kind: str = Field(description="wrap, distill, ...", max_length=64)
    params: dict[str, Any] = Field(default_factory=dict, description="the kind's parameters")


class JobPublic(BaseModel):
    id: str
    kind: str
    status: JobStatus
    params: dict[str, Any]
    owner: str
    backend: str
    progress: float = Field(description="0..1 over the whole job")
    step: str
    message: str
    metrics: dict[str, Any] = Field(description="the latest metrics (final ones once succeeded)")
    result: dict[str, Any]
    error: str | None
    attempts: int
    worker: str | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    artifact_bytes: int = Field(0, description="bytes of its artifacts (its key's artifact storage cap counts them)")


class JobList(BaseModel):
    jobs: list[JobPublic]


class JobLogChunk(BaseModel):
    text: str
    offset: int = Field(description="the byte offset this chunk starts at")
    next_offset: int = Field(description="ask for this offset next")
    status: JobStatus
    done: bool = Field(description="the job has ended and the whole log was sent")


class JobDeleted(BaseModel):
    id: str
    deleted: bool


class Artifact(BaseModel):
    name: str
    size: int


class ArtifactList(BaseModel):
    artifacts: list[Artifact]


def job_public(row: JobRow) -> dict:
    return {"id": row.id, "kind": row.kind, "status": row.status, "params": json.loads(row.params),
            "owner": row.owner, "backend": row.backend, "progress": row.progress, "step": row.step,
            "message": row.message, "metrics": json.loads(row.metrics or "{}"),
            "result": json.loads(row.result or "{}"), "error": row.error, "attempts": row.attempts,
            "worker": row.worker, "cancel_requested": bool(row.cancel_requested), "created_at": row.created_at,
            "started_at": row.started_at, "finished_at": row.finished_at, "heartbeat_at": row.heartbeat_at,
            "artifact_bytes": row.artifact_bytes or 0}
