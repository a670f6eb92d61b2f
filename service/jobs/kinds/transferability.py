"""``transferability``: rank hosted or uploaded models by how well they should transfer to a target
(DEPARA, :mod:`sdb_core.transfer.depara`).

The target is a model (hosted, or weights under the data dir) or a small labelled data set, on
which a weak target model is trained first. Hosted models are read from their public ONNX graph,
run differentiably in torch. Artifacts: the job's ``report.json`` (scores and ranking of every
method), ``similarity.png`` (the S matrix over the target and the sources) and
``attribution.png`` (attribution maps of a few probe images, per model).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdb_core.transfer import DEFAULT_PROBE, METHODS

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
    target_train: int = Field(500, ge=10, le=100_000, description="images the weak target model learns from")
    target_epochs: int = Field(3, ge=1, le=100)
    method: Literal[METHODS] = "depara"  # type: ignore[valid-type]
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


def _load(spec: ModelSpec, in_shape, ctx):
    if spec.model is not None:
        from sdb_core.transfer.onnx_graph import bundle_module

        module, meta = bundle_module(served_model_path(ctx.queue, spec.model, spec.model_version))
        if list(meta["input"]["shape"]) != list(in_shape):
            raise ValueError(f"model {spec.model} takes {meta['input']['shape']}, the probe images are {list(in_shape)}")
        return module
    from sdb_core.models import create_model
    from sdb_core.weights import load_weights

    return load_weights(create_model(spec.arch, num_classes=spec.num_classes, in_shape=tuple(in_shape)), spec.weights).eval()


@job_kind("transferability", TransferParams, check)
def run(ctx, p: TransferParams) -> dict:
    import torch

    from sdb_core.data import load_dataset, transfer_split
    from sdb_core.train import TrainConfig
    from sdb_core.transfer.depara import DeparaConfig, attribution_maps, rank_transferability
    from sdb_core.transfer.plots import plot_attributions, plot_similarity
    from sdb_core.transfer.task_models import FEATURE_LAYER, train_task_model

    probe_set = load_dataset(p.probe_data or p.target_data)
    x = probe_set.test.tensors[0]
    if len(x) < p.probe:
        raise ValueError(f"{probe_set.name} has {len(x)} test images, fewer than probe={p.probe}")
    gen = torch.Generator().manual_seed(p.seed)
    probe = x[torch.randperm(len(x), generator=gen)[:p.probe]]
    ctx.plan(target=p.target_epochs if p.target is None else 0.1, graphs=1 + len(p.sources))
    if p.target is None:
        data = load_dataset(p.target_data)
        if list(data.in_shape) != list(probe_set.in_shape):
            raise ValueError(f"target data {list(data.in_shape)} and probe images {list(probe_set.in_shape)} differ")
        train = transfer_split(data, min(p.target_train, len(data.train)), p.seed)
        ctx.log(f"training a weak target model on {len(train)} images of {p.target_data}")
        target = train_task_model("target", train, TrainConfig(epochs=p.target_epochs, lr=2e-3, optimizer="adam",
                                                               weight_decay=0.0, seed=p.seed),
                                  kind="cls", outputs=data.num_classes, progress=ctx.phase("target"),
                                  should_cancel=ctx.should_cancel)
        target_layer, what = FEATURE_LAYER, f"a weak model trained on {p.target_data}"
    else:
        target, target_layer, what = _load(p.target, probe_set.in_shape, ctx), p.target.layer, p.target.label
    sources = {s.label: _load(s, probe_set.in_shape, ctx) for s in p.sources}
    ctx.step("graphs: attribution graphs of the target and the sources", None)
    cfg = DeparaConfig(method=p.method, seed=p.seed, **({} if p.lam is None else {"lam": p.lam}))
    result = rank_transferability(cfg, target, sources, probe, target_layer=target_layer,
                                  source_layers={s.label: s.layer for s in p.sources},
                                  layer_candidates={s.label: s.candidate_layers for s in p.sources if s.candidate_layers},
                                  log=ctx.log)
    plot_similarity(result.names, result.matrix, ctx.artifacts / "similarity.png",
                    title=f"S ({'depara' if p.method == 'random' else p.method}, lambda={cfg.lam:g})")
    shown = probe[:p.maps]
    layers = {"target": target_layer, **{s.label: s.layer for s in p.sources}}
    models = {"target": target, **sources}
    maps = {n: attribution_maps(m, layers[n], shown) for n, m in models.items()}
    plot_attributions(shown, maps, ctx.artifacts / "attribution.png")
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
