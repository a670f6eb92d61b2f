"""Request and response bodies. Tensor fields are parsed by :mod:`service.tensors`, not by
pydantic (a per-element validator would cost more than the model); these classes validate
the small fields and document every body in the OpenAPI schema."""
from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.responses import Response

from sdb_core.protect.config import POLICIES, AuditConfig

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


class OutputPolicy(BaseModel):
    """What the public routes return of a model version, set when it is deployed (docs/security.md#output-policy).

    The policies are the leak audit's (``sdb_core.protect.config.POLICIES``, applied by
    ``attacks.apply_policy``): ``probs`` every probability, ``top_k`` the ``top_k`` highest,
    renormalised to sum to one, ``label`` the predicted label alone. ``decimals`` rounds every
    probability served; None serves them unrounded."""

    model_config = ConfigDict(extra="forbid")
    policy: Literal[POLICIES] = "probs"
    top_k: int | None = Field(None, ge=1, le=1000, description=f"k of the top_k policy (default {AuditConfig().top_k}); "
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
    labels: list[str]
    indices: list[int]
    scores: list[float] | None = Field(None, description="absent under the label output policy")


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
    output_policy: OutputPolicy


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
