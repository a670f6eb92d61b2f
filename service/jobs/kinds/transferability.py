"""``transferability``: rank hosted or uploaded models by how well they should transfer to a target
(DEPARA, :mod:`sdb_core.transfer.depara`).

The target is a model (hosted, or uploaded weights) or a small labelled data set, on which a weak
target model is trained first. Hosted models are read from their ONNX graph, run differentiably in
torch: white-box access to the network, which a non-admin key gets of plain models on its allowlist
only (a protected model, SDB or Nasty, is a 403). Artifacts: the job's ``report.json`` (scores and
ranking of every method), ``similarity.png`` (the S matrix over the target and the sources) and
``attribution.png`` (attribution maps of a few probe images, per model).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, model_validator

from sdb_core.tasks import transfer
from sdb_core.tasks.transfer import TARGET_TRAIN, WEAK_TARGET, RankedModel, TransferTask
from sdb_core.transfer.config import DEFAULT_PROBE, METHODS, DeparaConfig

from ...errors import invalid
from .base import (
    NAME_PATTERN,
    Access,
    JobParams,
    ModelParam,
    Submission,
    check_model,
    data_set,
    job_kind,
    model_ref,
    owns_network,
)

DEFAULT_CLASSES = 10  # the outputs of uploaded weights that do not say (num_classes)


class RankedParam(ModelParam):
    """A model of the ranking: hosted (``model``) or uploaded weights (``file``, ``arch``), and where it is compared."""

    name: str | None = Field(None, pattern=NAME_PATTERN, description="its name in the report")
    layer: str | None = Field(None, max_length=300, description="the layer to compare at (default: the output)")
    candidate_layers: list[str] = Field(default_factory=list, max_length=64,
                                        description="layer selection: score each of these layers against the target")

    @property
    def label(self) -> str:
        return self.name or self.model or self.file.rsplit("/", 1)[-1].rsplit(".", 1)[0]


class TransferParams(JobParams):
    sources: list[RankedParam] = Field(min_length=1, max_length=32)
    target: RankedParam | None = Field(None, description="the target as a model trained (even weakly) on its task")
    target_data: str | None = Field(None, description="or a labelled data set (embedded, or an uploaded dataset's "
                                    "file id): a weak target model is trained")
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

    def models(self) -> list[tuple[str, RankedParam]]:
        return [(f"sources[{i}]", s) for i, s in enumerate(self.sources)] + \
            ([("target", self.target)] if self.target is not None else [])

    def reads(self) -> list[Access]:
        return [a for _, m in self.models() for a in m.reads("graph")]


def check(p: TransferParams, sub: Submission) -> TransferParams:
    checked = {what: check_model(m, sub, "graph", what) for what, m in p.models()}  # 403, 404, 422 here
    for f in ("target_data", "probe_data"):
        if getattr(p, f) is not None:
            data_set(getattr(p, f), sub, f)
    from sdb_core.data.embedded import TEST_IMAGES

    f = "probe_data" if p.probe_data is not None else "target_data"  # the probe images' set
    name = getattr(p, f).strip().lower()
    have = TEST_IMAGES.get(name)  # an embedded set (an uploaded one is counted when the job loads it)
    if have is not None and p.probe > have:
        raise invalid(f"probe {p.probe} is more than the {have} test images of {f} {name!r}, where the probe is "
                      f"drawn: give probe <= {have}", "invalid_params")
    return p.model_copy(update={"sources": [checked[f"sources[{i}]"] for i in range(len(p.sources))],
                                "target": checked.get("target")})


def _ranked(spec: RankedParam, ctx, what: str) -> RankedModel:
    """The task's form of a model: a hosted one at its pinned bundle (refused again if protected and the key
    is neither its owner's nor an admin's, as at submission), or the uploaded weights resolved again for the
    job's key."""
    ref = model_ref(spec, ctx, what)
    if spec.model is not None and not owns_network(ctx, spec.model):
        from sdb_core.bundle import read_bundle_files, verify

        mode = verify(read_bundle_files(ref.bundle), spec.model)["mode"]
        if mode != "plain":
            raise ValueError(f"{what}: model {spec.model!r} is protected ({mode} mode): a job is not given its network")
    if ref.kind == "weights" and ref.num_classes is None:
        ref = replace(ref, num_classes=DEFAULT_CLASSES)
    return RankedModel(spec.label, ref, layer=spec.layer, candidate_layers=tuple(spec.candidate_layers))


@job_kind("transferability", TransferParams, check)
def run(ctx, p: TransferParams) -> dict:
    data = {f: None if getattr(p, f) is None else data_set(getattr(p, f), ctx, f)
            for f in ("target_data", "probe_data")}
    task = TransferTask(
        sources=tuple(_ranked(s, ctx, f"sources[{i}]") for i, s in enumerate(p.sources)),
        target=None if p.target is None else _ranked(p.target, ctx, "target"),
        probe=p.probe, target_train=p.target_train, target_training=replace(WEAK_TARGET, epochs=p.target_epochs),
        depara=DeparaConfig(method=p.method, **({} if p.lam is None else {"lam": p.lam})), maps=p.maps, seed=p.seed,
        **data)
    outcome = transfer.run(task, ctx.artifacts, ctx.hooks)
    result = outcome.result
    what = outcome.target if p.target_data is None else f"a weak model trained on {p.target_data}"  # the id, no path
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
