"""The ``transfer`` task: rank source models for a target model or data set by attribution-graph similarity (DEPARA)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..progress import Hooks
from ..train_config import TrainConfig
from ..transfer.config import DEFAULT_PROBE, DeparaConfig
from .refs import ModelRef, image_size_for

# The weak target's training: a few Adam epochs are enough to give it the task's features.
WEAK_TARGET = TrainConfig(epochs=3, lr=2e-3, optimizer="adam", weight_decay=0.0)
TARGET_TRAIN = 500  # images the weak target learns from


@dataclass(frozen=True)
class RankedModel:
    """A source (or the target) model of a ranking, and the layers it is compared at."""

    name: str
    model: ModelRef  # arch + weights (+ num_classes), or a bundle (its public graph, read as a torch module)
    layer: str | None = None  # None: its output
    candidate_layers: tuple[str, ...] = ()  # layer selection: each scored against the target

    def __post_init__(self) -> None:
        if self.model.kind not in ("weights", "bundle"):
            raise ValueError(f"{self.name}: a ranked model needs weights or a bundle, got {self.model.describe()}")


@dataclass(frozen=True)
class TransferTask:
    sources: tuple[RankedModel, ...]
    target: RankedModel | None = None  # the target as a model trained (even weakly) on its task, or
    target_data: str | None = None  # a labelled data set: a weak target model is trained on it first
    probe_data: str | None = None  # the probe images' data set (default: target_data); its test split is drawn
    probe: int = DEFAULT_PROBE
    target_train: int = TARGET_TRAIN
    target_training: TrainConfig = field(default_factory=lambda: WEAK_TARGET)
    depara: DeparaConfig = field(default_factory=DeparaConfig)
    maps: int = 0  # probe images shown in attribution.png (0: no figure)
    threads: int = 0  # torch threads (0: torch's default)
    seed: int = 0  # the probe draw, the weak target, the random baseline

    def __post_init__(self) -> None:
        if (self.target is None) == (self.target_data is None):
            raise ValueError("give exactly one of a target model or target data (a labelled data set)")
        if self.probe_data is None and self.target_data is None:
            raise ValueError("with a target model, the probe images' data set must be named")
        if not self.sources:
            raise ValueError("no source models to rank")
        if self.probe < 1:  # a negative one drew all but that many (x[:-5])
            raise ValueError(f"probe must be >= 1 image, got {self.probe}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        names = [s.name for s in self.sources] + ["target"]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be distinct (and not 'target'): {names}")


@dataclass
class TransferOutcome:
    result: object  # sdb_core.transfer.depara.TransferResult
    target: str  # what the target was, for a report
    target_layer: str | None
    figures: dict[str, Path]


def load_ranked(m: RankedModel, in_shape, data_norm=None):
    """The model as a torch module DEPARA can differentiate through; its input must be the probe images' (normalised
    as ``data_norm`` says)."""
    if m.model.kind == "weights":
        return m.model.network(None, in_shape, data_norm)
    from ..bundle import read_bundle_files
    from ..onnx_torch import bundle_module

    read_bundle_files(m.model.bundle)  # a clear error for a missing or altered bundle
    module, meta = bundle_module(m.model.bundle)
    if list(meta["input"]["shape"]) != list(in_shape):
        raise ValueError(f"{m.name} takes {meta['input']['shape']}, the probe images are {list(in_shape)}")
    return module


def run(cfg: TransferTask, out: str | os.PathLike, hooks: Hooks | None = None) -> TransferOutcome:
    """Draw the probe, get the target (given, or trained weakly on ``target_data``), rank the sources;
    ``similarity.png`` (and ``attribution.png`` with ``maps``) go to ``out``."""
    from dataclasses import replace

    import torch

    from ..data import load_dataset, transfer_split
    from ..outputs import out_dir
    from ..train import pick_device
    from ..transfer.depara import attribution_maps, rank_transferability
    from ..transfer.plots import plot_attributions, plot_similarity
    from ..transfer.task_models import FEATURE_LAYER, train_task_model

    out_dir(out)  # before any work: a path it cannot write is refused now
    hooks = hooks or Hooks()
    hooks.plan(target=cfg.target_training.epochs if cfg.target is None else 0.1, graphs=1 + len(cfg.sources))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # An ImageFolder set is read at the side its models take where they fix one (a bundle's, an ONNX graph's), as
    # wrap, distill and audit read theirs: at its default, 32, a model made for 16 or 64 could not take the probe.
    models = [s.model for s in cfg.sources] + [cfg.target.model if cfg.target is not None else None]
    probe_data = cfg.probe_data or cfg.target_data
    probe_set = load_dataset(probe_data, image_size=image_size_for(probe_data, *models))
    x = probe_set.test.tensors[0]
    if len(x) < cfg.probe:
        raise ValueError(f"{probe_set.name} has {len(x)} test images, fewer than probe={cfg.probe}")
    device = pick_device(cfg.target_training.device)
    probe = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.probe]]
    if cfg.target is None:
        data = load_dataset(cfg.target_data, image_size=image_size_for(cfg.target_data, *models))
        if list(data.in_shape) != list(probe_set.in_shape):
            raise ValueError(f"target data {list(data.in_shape)} and probe images {list(probe_set.in_shape)} differ")
        train = transfer_split(data, min(cfg.target_train, len(data.train)), cfg.seed)
        hooks.log(f"training a weak target model on {len(train)} images of {cfg.target_data}")
        target = train_task_model("target", train, replace(cfg.target_training, seed=cfg.seed), kind="cls",
                                  outputs=data.num_classes, progress=hooks.phase("target"),
                                  should_cancel=hooks.should_cancel)
        target_layer, what = FEATURE_LAYER, f"a weak model trained on {cfg.target_data}"
    else:
        target = load_ranked(cfg.target, probe_set.in_shape, (probe_set.mean, probe_set.std)).to(device)
        target_layer, what = cfg.target.layer, cfg.target.name
    # Every network on the run's device: DEPARA differentiates each where it lives (a trained target is there already).
    sources = {s.name: load_ranked(s, probe_set.in_shape, (probe_set.mean, probe_set.std)).to(device)
               for s in cfg.sources}
    hooks.phase("graphs")  # a watcher sees the phase start; the graphs report no steps of their own
    depara = replace(cfg.depara, seed=cfg.seed)
    result = rank_transferability(depara, target, sources, probe, target_layer=target_layer,
                                  source_layers={s.name: s.layer for s in cfg.sources},
                                  layer_candidates={s.name: list(s.candidate_layers) for s in cfg.sources
                                                    if s.candidate_layers},
                                  log=hooks.log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    method = "depara" if depara.method == "random" else depara.method
    figures = {"similarity": plot_similarity(result.names, result.matrix, out / "similarity.png",
                                             title=f"S ({method}, lambda={depara.lam:g})")}
    if cfg.maps:
        shown = probe[:cfg.maps]
        layers = {"target": target_layer, **{s.name: s.layer for s in cfg.sources}}
        models = {"target": target, **sources}
        maps = {n: attribution_maps(m, layers[n], shown) for n, m in models.items()}
        figures["attribution"] = plot_attributions(shown, maps, out / "attribution.png")
    return TransferOutcome(result, what, target_layer, figures)
