"""Request and response bodies. Tensor fields are parsed by :mod:`service.tensors`, not by
pydantic (a per-element validator would cost more than the model); these classes validate
the small fields and document every body in the OpenAPI schema."""
from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import orjson
from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.responses import Response

from sdb_core.protect.config import POLICIES, AuditConfig

from .auth import MAX_COUNT, MAX_EXPIRY_DAYS
from .errors import invalid


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def options(cls: type[BaseModel], obj: dict) -> Any:
    """Validate the non-tensor fields of a parsed body as ``cls``; 422 on failure."""
    try:
        return cls.model_validate({k: v for k, v in obj.items() if k in cls.model_fields})
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise invalid(msg, "invalid_request") from None


def given_options(cls: type[BaseModel], sent: dict, query: dict[str, str], where: str) -> Any:
    """A route's options (``cls``) from the body's fields (``sent``, in the ``where``) and the query's. An option
    given in both with different values is a 422 naming both: one of them silently won before (the query over a
    JSON body, a form field over the query), and the caller could not tell which was served."""
    sent = {k: v for k, v in sent.items() if v is not None and v != ""}  # null or empty: not given (as the query's)
    for name in cls.model_fields.keys() & sent.keys() & query.keys():
        in_body, in_query = (getattr(options(cls, {name: given[name]}), name) for given in (sent, query))
        if in_body != in_query:
            raise invalid(f"{name} is {in_body} in the {where} but {in_query} in the query: give it once, or the "
                          "same in both", "conflicting_options")
    return options(cls, {**sent, **query})


Tensor = list[Any]

# PostgreSQL text holds no NUL byte: a name, id or filter with one is a 422 at the boundary, never a
# store lookup (on PostgreSQL that lookup was a 500).
NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, Field(pattern=NO_NUL)]


# The most classes one sample's answer ranks: v1's top_k and v2's classification (class_count) alike; an answer's
# whole size is bounded apart (SDB_MAX_ANSWER_VALUES).
MAX_TOP_K = 1000


# Labels per sample when neither the body nor the query says.
DEFAULT_TOP_K = 5


class PredictRequest(BaseModel):
    inputs: Tensor = Field(description="normalised model inputs: [N, C, H, W], one [C, H, W] sample, "
                                       "or [N, C·H·W] rows")
    # null in the schema, not DEFAULT_TOP_K: a client generated from /openapi.json sends every default, and a body's
    # top_k beside the query's is a conflict when they differ (PredictOptions holds the effective default).
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K, description="labels per sample (capped at the number of "
                              f"classes); null or omitted: the query's top_k, else {DEFAULT_TOP_K}")


class PredictOptions(BaseModel):
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)


class OutputPolicy(BaseModel):
    """What the public routes return of a model version, set when it is deployed (docs/security.md#output-policy).

    The policies are the leak audit's (``sdb_core.protect.config.POLICIES``, applied by
    ``attacks.apply_policy``): ``probs`` every probability, ``top_k`` the ``top_k`` highest,
    renormalised to sum to one, ``label`` the predicted label alone. ``decimals`` rounds every
    probability served; None serves them unrounded."""

    model_config = ConfigDict(extra="forbid")
    policy: Literal[POLICIES] = "probs"
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K, description=f"k of the top_k policy (default {AuditConfig().top_k}); "
                              "only with top_k")
    decimals: int | None = Field(None, ge=1, le=8, description="round served probabilities to this many decimals")

    @model_validator(mode="after")
    def _k_with_top_k(self):
        if self.policy == "top_k" and self.top_k is None:
            self.top_k = AuditConfig().top_k
        elif self.policy != "top_k" and self.top_k is not None:
            raise ValueError(f"top_k is the k of the top_k policy; this policy is {self.policy!r}")
        if self.policy == "label" and self.decimals is not None:
            raise ValueError("the label policy serves no probabilities to round: decimals is for probs and top_k")
        return self


class Prediction(BaseModel):
    """One sample's answer from a classifier or a multilabel model."""

    labels: list[str]
    indices: list[int]
    scores: list[float] | None = Field(None, description="absent under the label output policy")
    present: list[str] | None = Field(None, description="multilabel: every label at or over 0.5 (absent under "
                                      "the label policy, where labels are those present)")


class PosePrediction(BaseModel):
    """One sample's answer from a pose model: a point and a peak value per joint, in the order of ``joints``."""

    keypoints: list[list[float]] = Field(description="(x, y) of each joint, in input pixels")
    scores: list[float] = Field(description="each joint's heatmap peak")
    image_keypoints: list[list[float]] | None = Field(None, description="for an image sent as a file: the same "
                                                      "points in that image's own pixels")


class PredictResponse(BaseModel):
    # Every task's items in one list (a pose item is told apart by its keypoints): the classifier's answer is the
    # one it always was, with no task field to tell them apart by.
    model: str
    version: str
    task: Literal["multilabel", "pose"] | None = Field(None, description="absent for a classifier")
    joints: list[str] | None = Field(None, description="pose: the joints' names, in the keypoints' order")
    predictions: list[Prediction | PosePrediction]


class DistillRequest(BaseModel):
    inputs: Tensor = Field(description="normalised model inputs, as for predict; the server blends the key in")
    temperature: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False,
                                      description="also return softmax(logits / T) as soft_targets")


class DistillOptions(BaseModel):
    temperature: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False)


class DistillResponse(BaseModel):
    model: str
    version: str
    logits: list[list[float]]
    temperature: float | None = None
    soft_targets: list[list[float]] | None = None


class ModelInput(BaseModel):
    name: str
    shape: list[int] = Field(description="one sample's shape, without the batch: [C, H, W], or [features]")
    dtype: str


class Normalize(BaseModel):
    mean: list[float] = Field(description="per input channel (or one for all)")
    std: list[float]
    scale: float = Field(255.0, description="the network takes (value / scale - mean) / std; absent: 255")


class ProtectionReport(BaseModel):
    passed: bool
    thresholds: dict[str, float] = Field(description="the owner's, in accuracy points")
    figures: dict[str, float] = Field(description="what the wrap's self-check measured")
    held_out: int = Field(description="the held-out training inputs the figures were measured on")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    version: str
    versions: list[str] = []
    task: str = Field(description="classification, multilabel, pose, style, ... (the routes each serves: "
                                  "docs/api.md)")
    mode: str = Field(description="sdb, nasty or plain")
    distillable: bool
    input: ModelInput
    normalize: Normalize
    labels: list[str]
    temperature: float | None
    metrics: dict[str, Any] = Field(description="what the bundle's training measured")
    protection: ProtectionReport | None = Field(description="the wrap's self-check; null for an unchecked bundle")
    output_policy: OutputPolicy
    added_at: float = Field(description="when this version was deployed (Unix seconds)")


class ModelList(BaseModel):
    models: list[ModelInfo]


class ModelVersionRef(BaseModel):
    name: str
    version: str


class ModelRemoved(BaseModel):
    removed: list[ModelVersionRef]


MODEL_EXAMPLE = {"name": "mnist-demo", "version": "1", "versions": ["1"], "task": "classification", "mode": "sdb",
                 "distillable": True, "input": {"name": "input", "shape": [1, 28, 28], "dtype": "float32"},
                 "normalize": {"mean": [0.1307], "std": [0.3081], "scale": 255.0},
                 "labels": [str(i) for i in range(10)], "temperature": 4.0, "metrics": {}, "protection": None,
                 "output_policy": {"policy": "probs", "top_k": None, "decimals": None}, "added_at": 1767225600.0}


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"scopes": ["distill"], "models": ["mnist-demo"], "quota": 100000, "quota_window_s": 86400,
         "expires_days": 90, "name": "teacher-of-lab-7"}]})
    scopes: list[str] = Field(min_length=1, description="predict | distill | jobs | deploy | admin")
    models: list[Text] | None = Field(None, description="allowlist; omitted: every model")
    quota: int | None = Field(None, ge=0, le=MAX_COUNT, description="samples the key may be served (distill)")
    quota_window_s: int | None = Field(None, ge=1, le=MAX_COUNT,
                                       description="the quota restarts in fixed windows of this many seconds "
                                                   "aligned to the Unix epoch (86400: at 00:00 UTC); omitted: "
                                                   "lifetime")
    expires_days: float | None = Field(None, gt=0, le=MAX_EXPIRY_DAYS, description="omitted: never")
    name: str = Field("", max_length=200, pattern=NO_NUL)


class KeyPublic(BaseModel):
    id: str
    name: str
    scopes: list[str]
    models: list[str] | None
    quota: int | None
    quota_window_s: int | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class KeyCreated(KeyPublic):
    key: str = Field(description="the API key; shown this once, never stored or shown again")


# ------------------------------------------------------------------ lists, a page at a time
# GET /v1/files, /v1/jobs and /v1/keys list newest first, `limit` rows at most, and say where the next page starts
# (`next`, passed back as `before`): a list that stopped at a fixed count hid every older row from everyone.
LIST_MOST = 1000
NEXT_DOC = "more rows follow: pass this as `before` for the page after this one (opaque; absent on the last page)"
Before = Annotated[str | None, Query(max_length=200, pattern=NO_NUL, description="the `next` of the page before: "
                                     "this page starts after its last row (omitted: from the newest)")]


def page_limit(default: int) -> Any:
    """The ``limit`` query parameter of a list (its default: what the list answered before it had pages)."""
    return Query(default, ge=1, le=LIST_MOST, description=f"rows in this page, 1 to {LIST_MOST}; `next` says when "
                 "more follow")


class Page(BaseModel):
    next: str | None = Field(None, description=NEXT_DOC)


def page_start(before: str | None) -> tuple[float, str] | None:
    """The (created_at, id) a page starts after, from the ``before`` a client sent: a ``next`` this server gave."""
    if before is None:
        return None
    try:
        at, row_id = orjson.loads(base64.urlsafe_b64decode(before + "=" * (-len(before) % 4)))
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) or not (
                isinstance(row_id, str) and 0 < len(row_id) <= 64 and "\x00" not in row_id):
            raise ValueError(before)
    except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError):
        raise invalid("before is not a page's start: pass the `next` of the page before as it came",
                      "invalid_cursor") from None
    return float(at), row_id


def page(name: str, rows: list, limit: int, show: Callable[[Any], dict]) -> dict:
    """A list's answer: under ``name``, the first ``limit`` of ``rows`` as ``show`` shows them (``rows`` were read
    ``limit + 1``: an extra one says more follow), and then only ``next``, the ``before`` of the page after (an answer
    without it is the last page, as every answer was before lists had pages)."""
    body = {name: [show(r) for r in rows[:limit]]}
    if len(rows) > limit:
        last = rows[limit - 1]
        body["next"] = base64.urlsafe_b64encode(orjson.dumps([last.created_at, last.id])).rstrip(b"=").decode()
    return body


class KeyList(Page):
    keys: list[KeyPublic]


def _inline_defs(schema: dict) -> dict:
    """A model's JSON schema with its ``$defs`` written in place: a ``#/$defs/…`` reference means
    nothing inside an OpenAPI document, so the body must stand alone (the models are not recursive)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


def json_body_doc(model: type[BaseModel], *extra_types: tuple[str, dict], example: Any = None,
                  required: bool = True) -> dict:
    """``openapi_extra`` for routes that read their body themselves: ``model`` as the JSON body."""
    json_doc = {"schema": _inline_defs(model.model_json_schema())}
    if example is not None:
        json_doc["example"] = example
    content = {"application/json": json_doc}
    content.update(dict(extra_types))
    return {"requestBody": {"required": required, "content": content}}


# ---------------------------------------------------------------- errors, as the schema documents them
class ErrorDetail(BaseModel):
    code: str = Field(description="stable and machine-readable: model_not_found, missing_key, quota_exceeded, ...")
    message: str = Field(description="what went wrong, for people")


class ErrorBody(BaseModel):
    """Every error outside ``/v2``."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"code": "model_not_found", "message": "no model named 'nope'"}}]})
    error: ErrorDetail


class V2Error(BaseModel):
    """Every error on ``/v2``: the Open Inference Protocol's body, a message alone."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"error": "no model named 'nope'"}]})
    error: str


_WHY = {
    400: "a body that cannot be parsed (not JSON, not a JSON object, not UTF-8), or a model of another task",
    401: "no API key, or a malformed, unknown, revoked or expired one, or one sent in the URL (key_in_url)",
    403: "the key lacks the scope, or the model is not on its allowlist",
    404: "no such model or version",
    409: "a conflicting state",
    413: "the body is over the payload limit (SDB_MAX_PAYLOAD_BYTES)",
    415: "a media type the route does not take, or an unreadable image",
    422: "a parameter, field or tensor that fails validation",
    429: "over the request rate (per key, or per address without one), or the key's sample quota",
    503: "the server is starting, the model version cannot be served, or its call ran past the server's time or "
         "memory bound (SDB_RUN_TIMEOUT_S, SDB_MODEL_MEMORY_MB)",
    507: "the server's disk has no room for the file (nothing was kept): retry later",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait (when known), whole", "schema": {"type": "integer"}},
          "Retry-After-Ms": {"description": "over the request rate: the same wait in milliseconds (a few ms at the "
                                            "default rates, which Retry-After rounds up to 1 s)",
                             "schema": {"type": "integer"}}},
}


_KEY_IN_URL_WHY = "an API key sent in the URL's query (key_in_url): keys go in the Authorization header"


def responses(*statuses: int, v2: bool = False, why: dict[int, str] | None = None) -> dict[int, dict]:
    """The documented error answers of a route: each status with its body model and why it happens.

    ``v2`` routes answer the protocol's :class:`V2Error`, every other route :class:`ErrorBody`;
    ``why`` says it better for this route than the generic sentence. Every route answers a 401 (the middleware
    refuses a key in the URL on any route, health probes included): a route that reads no key has that one."""
    why = {401: _WHY[401] if 401 in statuses else _KEY_IN_URL_WHY, **(why or {})}
    return {s: {"model": V2Error if v2 else ErrorBody, "description": why.get(s, _WHY[s]),
                **({"headers": _HEADERS[s]} if s in _HEADERS else {})} for s in sorted({*statuses, 401})}


def ok(example: Any, status: int = 200, media: str = "application/json",
       schema: dict | None = None) -> dict[int, dict]:
    """The example of a route's success body, beside the schema its ``response_model`` gives (or ``schema``)."""
    return {status: {"content": {media: {"example": example, **({"schema": schema} if schema else {})}}}}


AUTH = (401, 403, 422, 429)  # what any route that checks a key can answer
