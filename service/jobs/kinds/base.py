"""What a job kind is, and what every kind's params share.

A kind is a name, a pydantic params model, a run function and an optional submission check;
``@job_kind("name", Params)`` registers a run function, so adding a kind is one module in this
package that does that (and one import line in ``__init__``).

What the params of every kind name the same way:

- a model, by one :class:`ModelParam` (the job API's form of :class:`~sdb_core.tasks.ModelRef`):
  ``{"model": NAME, "version": V?}`` for a hosted model, ``{"file": "file-…", "arch": ARCH,
  "num_classes": N?}`` for uploaded weights of a zoo architecture, ``{"arch": ARCH}`` alone where a
  kind trains the network itself;
- a data set (:func:`data_set`): an embedded name (``digits``, ``mnist-5k``, ...) or an uploaded
  dataset's ``file-…`` id;
- any other file (:func:`input_file`): a ``file-…`` id of the right purpose.

A ``file-…`` id is resolved for the submitting key (its own file, a shared one, or any with an
admin key) both when the job is submitted and again when it runs; the job record keeps the id,
never a path. Only an admin key may name a path instead, relative to the data dir (the
operator's escape hatch). A hosted model is checked against the key's allowlist and scopes for
what the job reads of it (:class:`Access`), at submission, when a worker claims the job and on
every heartbeat (:func:`key_problem`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

from sdb_core.registry import Registry
from sdb_core.tasks.refs import ModelRef, is_onnx_file

from ...errors import ApiError, invalid

if TYPE_CHECKING:
    from ...auth import ApiKey
    from ...registry import ModelHost
    from ...settings import Settings
    from ..context import JobContext
    from ..queue import JobQueue

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# Loaders that read files: a job names an uploaded dataset's id instead (or, with an admin key, KIND:PATH).
PATH_SETS = ("imagefolder", "npz", "cifar10", "cifar100")

Use = Literal["keyed", "public", "graph"]


@dataclass(frozen=True)
class Access:
    """A hosted model a job reads, and how: its keyed path (``keyed``: the ``distill`` scope for it), its
    public outputs (``public``: as ``/predict`` gives them) or its network (``graph``: white-box, which a
    non-admin key gets of plain models only, and, like ``public``, only with the ``predict`` scope where
    ``public_predict`` is off). The model must be on the key's allowlist in every case."""

    model: str
    use: Use


class JobParams(BaseModel):
    """Fields every kind takes: the resources a Ray task asks for (the embedded backend ignores them)."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, gt=0, le=256, description="CPUs for a Ray task")
    gpus: float = Field(0.0, ge=0, le=16, description="GPUs for a Ray task")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _numbers_a_job_can_hold(self) -> JobParams:
        # A whole number past 64 bits validates as a Python int, but the job record could not be answered (JSON
        # encoders stop at 64 bits: the submission was stored, then every listing of the jobs failed) nor run; a
        # NaN or Inf validates as a float (a normalisation's mean), is stored as null, and fails the job later.
        why = _unfit_number(self.model_dump(), "params")
        if why is not None:
            raise ValueError(why)
        return self

    def reads(self) -> list[Access]:
        """The hosted models this job reads; its key is checked for each at submission, claim and heartbeat."""
        return []


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


def _unfit_number(value: Any, where: str) -> str | None:
    """What is wrong with the first number or string in ``value`` (dumped params) that no job can hold: an integer
    past a signed 64 bits, a float that is NaN or infinite, a string with a NUL; None if every one fits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if -2**63 <= value < 2**63 else f"{where} is a whole number past 64 bits; no setting of a job is that large"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} is {value}: a setting of a job is a finite number"
    if isinstance(value, str):  # a NUL, stored as \u0000: PostgreSQL's JSON operators refuse the whole record, and
        # the jobs list filtered by model answered 500 while one such job was stored
        return None if "\x00" not in value else f"{where} holds a NUL character; no setting of a job does"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    return next((w for k, v in items if (w := _unfit_number(v, f"{where}.{k}")) is not None), None)


def params_errors(e: ValidationError) -> str:
    """A params ValidationError in a line: where (``params.field``) and what, for the first five."""
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = err["msg"].removeprefix("Value error, ")  # a validator's own sentence, as it wrote it
        parts.append(f"params.{where}: {msg}" if where else msg if msg.startswith("params") else f"params: {msg}")
    return "; ".join(parts)


class StaleJob(ValueError):
    """A queued job this server cannot run as it was stored: its kind is gone, or its params no longer
    validate (the server changed since the job was queued). The job fails with this sentence."""


def stored_params(kind: str, params_json: str) -> tuple[Kind, JobParams]:
    """A stored job's kind and its params, validated again as this server defines them; :class:`StaleJob`
    when they no longer are a job this server runs."""
    if kind not in KINDS:
        raise StaleJob(f"this server has no job kind {kind!r} any more (it changed since the job was queued)")
    k = get_kind(kind)
    try:
        return k, k.params.model_validate_json(params_json)
    except ValidationError as e:
        raise StaleJob(f"its params no longer fit the {kind} job on this server (it changed since the job was "
                       f"queued): {params_errors(e)}; submit it again") from None


def check_arch(value: str) -> str:
    from sdb_core.models import list_models

    if value not in list_models():
        raise ValueError(f"unknown architecture {value!r}; known: {', '.join(list_models())}")
    return value


# ---------------------------------------------------------------------------------------- access
def access_error(key: ApiKey, a: Access, settings: Settings) -> ApiError | None:
    """Why ``key`` may not read model ``a.model`` the way ``a.use`` says (a 403), or None."""
    if not key.allows_model(a.model):
        return ApiError(403, "model_not_allowed", f"this API key is not allowed to use model {a.model!r}")
    # The network tells all the public outputs do and more: reading it needs what predicting needs.
    predicting = None if settings.public_predict else "predict"
    scope = {"keyed": "distill", "public": predicting, "graph": predicting}[a.use]
    if scope is not None and not key.grants(scope):
        return ApiError(403, "forbidden_scope", f"this API key lacks the {scope!r} scope for model {a.model!r}")
    return None


def key_problem(key: ApiKey | None, reads: list[Access], settings: Settings) -> str | None:
    """Why a job may no longer run on its key's authority (revoked, expired, a scope or model it lost),
    in words; None while the key still allows what the job reads."""
    if key is None:
        return "its API key no longer exists"
    if key.revoked_at is not None:
        return "its API key was revoked"
    if key.expires_at is not None and key.expires_at <= time.time():
        return "its API key expired"
    if not key.grants("jobs"):
        return "its API key lacks the 'jobs' scope"
    for a in reads:
        denied = access_error(key, a, settings)
        if denied is not None:
            return denied.message.replace("this API key", "its API key")
    return None


# ---------------------------------------------------------------------------------------- files
class InputGone(ValueError):
    """A file a job named at submission is gone when it runs: the job fails with this sentence."""


def _submitting(who: Submission | JobContext) -> bool:
    return isinstance(who, Submission)


def under(root: Path, relative: str, what: str) -> Path:
    """``root/relative`` if it stays inside ``root``; ValueError otherwise (no absolute paths, no ..)."""
    p = Path(relative)
    if not relative or p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{what} must be a path relative to the data directory, got {relative!r}")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise ValueError(f"{what} leaves the data directory: {relative!r}")
    return full


def server_path(value: str, who: Submission | JobContext, what: str) -> Path:
    """An admin key's path under the data dir (the operator's escape hatch); for any other key a 422."""
    if not who.key.grants("admin"):
        raise invalid(f"{what} must name an uploaded file by its id (file-…, from POST /v1/files): "
                      "server paths are for admin keys", "server_path_refused")
    try:
        return under(who.settings.data_dir, value, what)
    except ValueError as e:
        raise invalid(str(e), "invalid_params") from None


def _uploaded(who: Submission | JobContext, value: str, what: str, resolve: Callable[[], Any]) -> Any:
    """``resolve()`` of an uploaded file; a file deleted since submission fails the job saying so."""
    try:
        return resolve()
    except ApiError as e:
        if _submitting(who):
            raise
        if e.status == 404:
            raise InputGone(f"{what}: file {value} was deleted after the job was submitted") from None
        raise ValueError(f"{what}: {e.message}") from None


def input_file(value: str, purpose: str, who: Submission | JobContext, what: str) -> Path:
    """The file (or unpacked dataset folder) a job names: a ``file-…`` id of ``purpose`` the key may use,
    or an admin key's path under the data dir. 404/422 at submission; :class:`InputGone` at run time."""
    from ...files import FILE_ID_RE, resolve_file

    if FILE_ID_RE.fullmatch(value):
        return _uploaded(who, value, what, lambda: resolve_file(who.queue.store, who.settings, who.key, value,
                                                                 purpose))
    path = server_path(value, who, what)
    if not (path.exists() if purpose == "dataset" else path.is_file()):
        message = f"{what}: nothing at {value!r} under the data directory"
        raise invalid(message, "invalid_params") if _submitting(who) else InputGone(message)
    return path


def data_set(value: str, who: Submission | JobContext, what: str = "data") -> str:
    """What ``sdb_core.data.load_dataset`` takes for a job's data set: an embedded name as given, an uploaded
    dataset's ``file-…`` id as ``imagefolder:PATH`` or ``npz:PATH``, or an admin key's ``KIND:PATH`` with
    PATH under the data dir. A 422 naming the problem otherwise."""
    from sdb_core.data import list_datasets

    from ...files import FILE_ID_RE, dataset_name

    if FILE_ID_RE.fullmatch(value):
        return _uploaded(who, value, what, lambda: dataset_name(who.queue.store, who.settings, who.key, value))
    kind, sep, path = value.partition(":")
    name = kind.strip().lower()
    if name not in list_datasets():
        raise invalid(f"unknown data set {kind[:100]!r} for {what}; known: {', '.join(list_datasets())}, or an "
                      "uploaded dataset's file id", "invalid_params")
    if sep:
        return f"{name}:{server_path(path, who, what)}"
    if name in PATH_SETS:
        raise invalid(f"{what}: {kind} reads files: upload the set (POST /v1/files, purpose dataset) and give its "
                      "file id", "invalid_params")
    return value


# ---------------------------------------------------------------------------------------- models
class ModelParam(BaseModel):
    """One model a job reads, the job API's :class:`~sdb_core.tasks.ModelRef`: a hosted model
    (``model``, ``version``), uploaded weights of a zoo architecture (``file``, ``arch``, ``num_classes``) or an
    uploaded ONNX model (``file`` alone), or, where a kind trains the network itself, an architecture alone
    (``arch``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda schema, cls: cls._accepted_only(schema))
    SOURCES: ClassVar[tuple[str, ...]] = ("hosted", "file")  # what this kind's field accepts
    HOSTED_ARCH: ClassVar[bool] = False  # arch means something for a hosted model (a family to rebuild into)
    ONNX: ClassVar[bool] = True  # an uploaded ONNX model may be the file (its own network: no arch)

    model: str | None = Field(None, pattern=NAME_PATTERN, description="a hosted model, by name")
    version: str | None = Field(None, max_length=100,
                                description="the hosted model's version; default the latest, pinned at submission")
    file: str | None = Field(None, max_length=500, description="uploaded weights: the id (file-…) of a weights "
                             "file this key may use (admin keys: or a path under the data dir); weights of a zoo "
                             "architecture (with arch), or an ONNX model (alone)")
    arch: str | None = Field(None, description="the architecture of the weights, or of the network the job trains")
    num_classes: int | None = Field(None, ge=1, le=100_000,
                                    description="the weights' outputs (default: the data set's classes)")
    mean: list[float] | None = Field(None, min_length=1, max_length=4096, description=(
        "with file: the mean the model's inputs were normalised with when it was trained (on pixels in [0, 1]; one "
        "value, or one per channel); default: the data set's own, which every network the service trains takes"))
    std: list[PositiveFloat] | None = Field(None, min_length=1, max_length=4096,
                                    description="with file: the std its inputs were divided by (with mean)")

    @property
    def source(self) -> str:
        return "hosted" if self.model is not None else "file" if self.file is not None else "arch"

    @classmethod
    def _accepted_only(cls, schema: dict) -> None:
        """The schema lists only the fields of the sources this kind accepts: a wrap's teacher showed ``model`` and
        ``version`` (the console drew them in its form, a generated client offered them), always refused."""
        if "hosted" not in cls.SOURCES:
            for name in ("model", "version"):
                schema["properties"].pop(name, None)

    def _check_arch(self, arch: str) -> None:
        check_arch(arch)

    @model_validator(mode="after")
    def _one_source(self):
        wanted = {"hosted": "model (a hosted model)", "file": "file (uploaded weights with their arch, or an ONNX model)",
                  "arch": "arch alone (a network the job trains)"}
        if self.model is not None and self.file is not None:
            raise ValueError("a model reference names one source: model (hosted) or file (uploaded weights)")
        if self.source not in self.SOURCES or (self.source == "arch" and self.arch is None):
            raise ValueError(f"give {' or '.join(wanted[s] for s in self.SOURCES)}")
        if self.version is not None and self.model is None:
            raise ValueError("version is a hosted model's: give it with model")
        if self.source == "hosted" and not self.HOSTED_ARCH and (self.arch, self.num_classes) != (None, None):
            raise ValueError("a hosted model brings its own network: give no arch or num_classes with model")
        if (self.mean is None) != (self.std is None) or (self.mean is not None and self.source != "file"):
            raise ValueError("mean and std go together, with file (the normalisation an uploaded model was trained with)")
        if self.arch is not None:
            self._check_arch(self.arch)
        return self

    def reads(self, use: Use) -> list[Access]:
        return [] if self.model is None else [Access(self.model, use)]

    def describe(self) -> str:
        """For logs and reports: no server path (an admin's path shows as given, relative to the data dir)."""
        if self.model is not None:
            return f"model {self.model}" + (f" version {self.version}" if self.version else "")
        if self.file is not None:
            return f"{self.arch} weights {self.file}" if self.arch else f"model {self.file}"
        return f"untrained {self.arch}"


def owns_network(sub: Submission, model: str) -> bool:
    """Whether the submitting key may be given a protected model's network: an admin's, or the key
    that owns the model's name (it deployed the box; the network is its own)."""
    return sub.key.grants("admin") or sub.queue.store.model_owner(model) == sub.key.id


def check_model(p: ModelParam, sub: Submission, use: Use, what: str) -> ModelParam:
    """Check a model reference at submission: a hosted model against the key (403) and the host (404), its
    version pinned (a later deploy does not change the job); a file resolved for the key (404, 422)."""
    if p.model is not None:
        denied = access_error(sub.key, Access(p.model, use), sub.settings)
        if denied is not None:
            raise denied
        model = sub.models.get(p.model, p.version)  # 404 for an unknown model or version
        if use == "keyed" and not model.distillable:
            raise invalid(f"model {p.model!r} has no keyed path ({model.meta['mode']} mode): it cannot be distilled",
                          "not_distillable")
        if use == "graph" and model.meta["mode"] != "plain" and not owns_network(sub, p.model):
            raise ApiError(403, "model_protected", f"model {p.model!r} is protected ({model.meta['mode']} mode): "
                           "a job is given its network only for its owner's key or an admin's")
        return p.model_copy(update={"version": model.version})
    if p.file is not None:
        onnx = is_onnx_file(input_file(p.file, "weights", sub, f"{what}.file"))
        if onnx and not p.ONNX:
            raise invalid(f"{what}.file is an ONNX model; {what} must be weights of its architecture family",
                          "invalid_params")
        if onnx and p.arch is not None:
            raise invalid(f"{what}.file is an ONNX model, which brings its own network: give no {what}.arch",
                          "invalid_params")
        if not onnx and p.arch is None:
            raise invalid(f"{what}.file holds weights: give their architecture ({what}.arch); only an ONNX model "
                          "brings its own network", "invalid_params")
    return p


def model_ref(p: ModelParam, ctx: JobContext, what: str) -> ModelRef:
    """The task's :class:`ModelRef` when the job runs: a hosted model at its pinned version's bundle, or the
    weights file resolved again for the job's key (a file deleted meanwhile fails the job, saying so)."""
    if p.model is not None:
        path = served_model_path(ctx.settings, ctx.queue, p.model, p.version)
        return ModelRef(model=p.model, arch=p.arch).hosted_at(path, p.version)
    weights = None if p.file is None else str(input_file(p.file, "weights", ctx, f"{what}.file"))
    return ModelRef(arch=p.arch, weights=weights, num_classes=p.num_classes,
                    mean=None if p.mean is None else tuple(p.mean), std=None if p.std is None else tuple(p.std))


def served_model_path(settings: Settings, queue: JobQueue, name: str, version: str) -> str:
    """The bundle path of a model version pinned at submission, as this process finds it
    (:func:`service.copies.bundle_path`: a data dir moved or mounted elsewhere is its own); ValueError if it was
    removed since, or if the bundle there is not the one registered (its meta.json's digest: a job's teacher or
    target is the version the server serves, as :meth:`service.registry.ModelHost.load_registered` checks it)."""
    from sdb_core.bundle import meta_digest

    from ...copies import bundle_path

    row = next((r for r in queue.store.list_models() if r.name == name and r.version == version), None)
    if row is None:
        raise ValueError(f"model {name!r} version {version!r} is no longer served")
    path = bundle_path(settings, row.path)
    if row.meta_sha256 is not None and meta_digest(path) != row.meta_sha256:
        raise ValueError(f"model {name!r} version {version!r}: its bundle changed since it was registered (the "
                         "server refuses to serve it too): an admin puts the registered bundle back")
    return str(path)
