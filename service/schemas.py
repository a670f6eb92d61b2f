"""Request and response bodies. Tensor fields are parsed by :mod:`service.tensors`, not by
pydantic (a per-element validator would cost more than the model); these classes validate
the small fields and document every body in the OpenAPI schema."""
from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

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


Tensor = list[Any]


class PredictRequest(BaseModel):
    inputs: Tensor = Field(description="normalised model inputs: [N, C, H, W], one [C, H, W] sample, "
                                       "or [N, C·H·W] rows")
    top_k: int = Field(5, ge=1, le=1000, description="labels per sample (capped at the number of classes)")


class PredictOptions(BaseModel):
    top_k: int = Field(5, ge=1, le=1000)


class Prediction(BaseModel):
    labels: list[str]
    indices: list[int]
    scores: list[float]


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]


class DistillRequest(BaseModel):
    inputs: Tensor = Field(description="normalised model inputs, as for predict; the server blends the key in")
    temperature: float | None = Field(None, gt=0, le=1000,
                                      description="also return softmax(logits / T) as soft_targets")


class DistillOptions(BaseModel):
    temperature: float | None = Field(None, gt=0, le=1000)


class DistillResponse(BaseModel):
    model: str
    version: str
    logits: list[list[float]]
    temperature: float | None = None
    soft_targets: list[list[float]] | None = None


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    version: str
    versions: list[str] = []
    mode: str
    distillable: bool
    labels: list[str]


class ModelList(BaseModel):
    models: list[ModelInfo]


class CreateKeyRequest(BaseModel):
    scopes: list[str] = Field(min_length=1, description="predict | distill | jobs | deploy | admin")
    models: list[str] | None = Field(None, description="allowlist; omitted: every model")
    quota: int | None = Field(None, ge=0, description="samples the key may be served (distill)")
    quota_window_s: int | None = Field(None, ge=1, description="the quota restarts every window; omitted: lifetime")
    expires_days: float | None = Field(None, gt=0)
    name: str = Field("", max_length=200)


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


class KeyList(BaseModel):
    keys: list[KeyPublic]


def json_body_doc(model: type[BaseModel], *extra_types: tuple[str, dict]) -> dict:
    """``openapi_extra`` for routes that read their body themselves."""
    content = {"application/json": {"schema": model.model_json_schema()}}
    content.update(dict(extra_types))
    return {"requestBody": {"required": True, "content": content}}
