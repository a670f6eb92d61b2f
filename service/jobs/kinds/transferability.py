"""``transferability``: rank hosted or uploaded models by how well they should transfer to a target
(DEPARA, :mod:`sdb_core.transfer.depara`).

The target is a model (hosted, or weights under the data dir) or a small labelled data set, on
which a weak target model is trained first. Hosted models are read from their public ONNX graph,
run differentiably in torch. Artifacts: the job's ``report.json`` (scores and ranking of every
method), ``similarity.png`` (the S matrix over the target and the sources) and
``attribution.png`` (attribution maps of a few probe images, per model).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdb_core.tasks import ModelRef, transfer
from sdb_core.tasks.transfer import TARGET_TRAIN, WEAK_TARGET, RankedModel, TransferTask
from sdb_core.transfer.config import DEFAULT_PROBE, METHODS, DeparaConfig

from ...errors import invalid
from .base import (
    NAME_PATTERN,
    JobParams,
    Submission,
    check_arch,
    data_name,
    job_kind,
    served_model_path,
    weights_file,
)


class ModelSpec(BaseModel):
    """One model: hosted (``model``) or plain weights under the data dir (``weights`` + ``arch``)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="its name in the report")
    model: str | None = Field(None, pattern=NAME_PATTERN, description="a hosted model")
    model_version: str | None = None
    weights: str | None = Field(None, description="or a plain model's weights under the data dir")
    arch: str = "cnn"
    num_classes: int = Field(10, ge=1, le=100_000)
    layer: str | None = Field(None, max_length=300, description="the layer to compare at (default: the output)")
    candidate_layers: list[str] = Field(default_factory=list, max_length=64,
                                        description="layer selection: score each of these layers against the target")

    @model_validator(mode="after")
    def _one(self):
        if (self.model is None) == (self.weights is None):
            raise ValueError("give exactly one of model (a hosted model) or weights (a local file)")
        check_arch(self.arch)
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.model:
            return self.model
        return self.weights.rsplit("/", 1)[-1].rsplit(".", 1)[0]


class TransferParams(JobParams):
    sources: list[ModelSpec] = Field(min_length=1, max_length=32)
    target: ModelSpec | None = Field(None, description="the target as a model trained (even weakly) on its task")
    target_data: str | None = Field(None, description="or a labelled data set: a weak target model is trained")
    probe_data: str | None = Field(None, description="images of the probe set (default: target_data)")
    probe: int = Field(DEFAULT_PROBE, ge=3, le=2000, description="probe images")
    target_train: int = Field(TARGET_TRAIN, ge=10, le=100_000, description="images the weak target model learns from")
    target_epochs: int = Field(WEAK_TARGET.epochs, ge=1, le=100)
    method: Literal[METHODS] = DeparaConfig().method  # type: ignore[valid-type]
    lam: float | None = Field(None, ge=0, le=1000,
                              description="lambda of S = S_V + lambda S_E (default: DeparaConfig's)")
    maps: int = Field(4, ge=1, le=12, description="probe images shown in attribution.png")

    @model_validator(mode="after")
    def _target(self):
        if (self.target is None) == (self.target_data is None):
            raise ValueError("give exactly one of target (a model) or target_data (a labelled data set)")
        if self.probe_data is None and self.target_data is None:
            raise ValueError("with a target model, probe_data names the probe images")
        labels = [s.label for s in self.sources] + ["target"]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model names must be distinct (and not 'target'): {labels}")
        return self


def _resolve(spec: ModelSpec, sub: Submission) -> ModelSpec:
    if spec.weights is not None:
        return spec.model_copy(update={"weights": weights_file(spec.weights, sub.settings)})
    return spec.model_copy(update={"model_version": sub.models.get(spec.model, spec.model_version).version})


def check(p: TransferParams, sub: Submission) -> TransferParams:
    try:
        update = {"sources": [_resolve(s, sub) for s in p.sources]}
        if p.target is not None:
            update["target"] = _resolve(p.target, sub)
        for f in ("target_data", "probe_data"):
            if getattr(p, f) is not None:
                update[f] = data_name(getattr(p, f), sub.settings)
    except ValueError as e:
        raise invalid(str(e), "invalid_params") from None
    return p.model_copy(update=update)  # a hosted model that is not served raised NotFound (404) above


def _ranked(spec: ModelSpec, queue, name: str | None = None) -> RankedModel:
    """The task's form of a model: a hosted one resolved to its served bundle, or plain weights."""
    if spec.model is not None:
        ref = ModelRef(model=spec.model).hosted_at(served_model_path(queue, spec.model, spec.model_version),
                                                   spec.model_version)
    else:
        ref = ModelRef(arch=spec.arch, weights=spec.weights, num_classes=spec.num_classes)
    return RankedModel(name or spec.label, ref, layer=spec.layer, candidate_layers=tuple(spec.candidate_layers))


@job_kind("transferability", TransferParams, check)
def run(ctx, p: TransferParams) -> dict:
    task = TransferTask(
        sources=tuple(_ranked(s, ctx.queue) for s in p.sources),
        target=None if p.target is None else _ranked(p.target, ctx.queue, name=p.target.label),
        target_data=p.target_data, probe_data=p.probe_data, probe=p.probe, target_train=p.target_train,
        target_training=replace(WEAK_TARGET, epochs=p.target_epochs),
        depara=DeparaConfig(method=p.method, **({} if p.lam is None else {"lam": p.lam})), maps=p.maps, seed=p.seed)
    outcome = transfer.run(task, ctx.artifacts, ctx.hooks)
    result, what = outcome.result, outcome.target
    for i, name in enumerate(result.ranking.order, 1):
        ctx.log(f"{i}. {name}  S={result.ranking.scores[name]:.4f}")
    best = result.ranking.order[0]
    for name, r in result.layers.items():
        ctx.log(f"layer selection for {name}: best layer {r.order[0]}")
    return {"summary": f"best source for {what}: {best}",
            "metrics": {"best_score": result.ranking.scores[best]},
            "result": {"ranking": result.ranking.order, "scores": result.ranking.scores, "method": p.method,
                       "target": what, "best_layers": {n: r.order[0] for n, r in result.layers.items()}},
            "transferability": result.to_dict()}
