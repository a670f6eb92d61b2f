"""What a job kind is: a name, a pydantic params model, a run function and an optional
submission check. ``@job_kind("name", Params)`` registers a run function; adding a kind
is one module in this package that does that (and one import line in ``__init__``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from sdb_core.registry import Registry

if TYPE_CHECKING:
    from ...auth import ApiKey
    from ...registry import ModelHost
    from ...settings import Settings
    from ..context import JobContext
    from ..queue import JobQueue

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class JobParams(BaseModel):
    """Fields every kind takes: the resources a Ray task asks for (the embedded backend ignores them)."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, gt=0, le=256, description="CPUs for a Ray task")
    gpus: float = Field(0.0, ge=0, le=16, description="GPUs for a Ray task")
    seed: int = Field(0, ge=0)


@dataclass
class Submission:
    """What a submission check may look at: who submits, what is hosted, where the data lives."""

    key: ApiKey
    models: ModelHost
    settings: Settings
    queue: JobQueue


@dataclass(frozen=True)
class Kind:
    name: str
    params: type[JobParams]
    run: Callable[[JobContext, Any], dict]
    check: Callable[[Any, Submission], Any] | None = None  # raises ApiError; may return resolved params


KINDS: Registry = Registry("job kind")


def job_kind(name: str, params: type[JobParams], check: Callable[[Any, Submission], Any] | None = None):
    """Register ``run(ctx, params) -> report dict`` as the job kind ``name``."""

    def add(run: Callable[[JobContext, Any], dict]) -> Callable[[JobContext, Any], dict]:
        KINDS.register(Kind(name, params, run, check), name=name)
        return run

    return add


def get_kind(name: str) -> Kind:
    return KINDS.get(name)


def under(root: Path, relative: str, what: str) -> Path:
    """``root/relative`` if it stays inside ``root``; ValueError otherwise (no absolute paths, no ..)."""
    p = Path(relative)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{what} must be a path relative to the data directory, got {relative!r}")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise ValueError(f"{what} leaves the data directory: {relative!r}")
    return full


def weights_file(relative: str, settings: Settings) -> str:
    """A weights file named relative to the data dir; it must exist there (ValueError otherwise)."""
    path = under(settings.data_dir, relative, "teacher_weights")
    if not path.is_file():
        raise ValueError(f"no teacher weights at {relative!r} under the data directory")
    return str(path)


def local_inputs(settings: Settings, *, data: str | None = None, teacher_weights: str | None = None) -> dict:
    """A check's update for the data set and the weights file a job names, resolved under the data dir;
    a 422 naming the problem otherwise."""
    from ...errors import invalid

    try:
        update = {} if data is None else {"data": data_name(data, settings)}
        if teacher_weights is not None:
            update["teacher_weights"] = weights_file(teacher_weights, settings)
    except ValueError as e:
        raise invalid(str(e), "invalid_params") from None
    return update


def served_model_path(queue: JobQueue, name: str, version: str) -> str:
    """The bundle path of a model version pinned at submission; ValueError if it was removed since."""
    row = next((r for r in queue.store.list_models() if r.name == name and r.version == version), None)
    if row is None:
        raise ValueError(f"model {name!r} version {version!r} is no longer served")
    return row.path


def data_name(value: str, settings: Settings) -> str:
    """A data set name; one with a path (``imagefolder:PATH``) must point inside the data dir."""
    from sdb_core.data import list_datasets

    kind, sep, path = value.partition(":")
    if kind.strip().lower() not in list_datasets():
        raise ValueError(f"unknown data set {kind!r}; known: {', '.join(list_datasets())}")
    if sep and path:
        return f"{kind}:{under(settings.data_dir, path, 'data')}"
    return value


def check_arch(value: str) -> str:
    from sdb_core.models import list_models

    if value not in list_models():
        raise ValueError(f"unknown architecture {value!r}; known: {', '.join(list_models())}")
    return value
