"""DEPARA: deep attribution graphs for choosing the pre-trained model and the layer to transfer
from (Song et al., CVPR 2020, arXiv 2003.07496).

A model's *attribution graph* at one layer, on a probe set of N unlabelled images:

- node i: the attribution map of image i, gradient x input of the layer's output (summed over
  the layer's units), absolute value, averaged over the input channels, flattened;
- edge (i, j): the cosine similarity of images i and j's features at that layer. With
  ``centre=True`` the features are first centred over the probe set (their mean over the N images
  subtracted), as the authors' code does for its model-selection experiment (``spearman_edge.py``
  in zju-vipa/DEPARA; its layer-selection code does not). ``DeparaConfig``'s defaults (centred
  edges, lambda 1) are what ``benchmarks/depara.py`` chose on a validation zoo (see README); the
  functions below default to the issue's plain cosine. RSA's dissimilarities read the same (centred
  or not) features.

Two graphs built on the same probe set are compared by S = S_V + lambda * S_E: S_V is the mean
cosine similarity between corresponding nodes, S_E the Spearman correlation of the two edge
vectors (the upper triangles). Nothing in a graph depends on how the layer orders or sizes its
channels, so models of different architectures compare directly.

Baselines by the same code: ``depara_v`` (S_V alone), ``depara_e`` (S_E alone), ``rsa``
(representational similarity analysis: Spearman correlation of the two representational
dissimilarity matrices, 1 - Pearson correlation between the images' centred features, which
uses no attribution at all) and ``random``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..train import device_of, evaluating, refuse_inference_tensors
from .config import ATTRIBUTIONS, METHODS, DeparaConfig


# --------------------------------------------------------------------------- graphs
@dataclass
class AttributionGraph:
    nodes: Tensor  # (N, H*W) attribution maps, float64
    edges: Tensor  # (N, N) cosine similarity of the images' features at the layer
    rdm: Tensor  # (N, N) 1 - Pearson correlation of the features (for the RSA baseline)
    layer: str
    map_shape: tuple[int, int]

    def edge_vector(self) -> Tensor:
        i, j = torch.triu_indices(len(self.edges), len(self.edges), offset=1)
        return self.edges[i, j]

    def rdm_vector(self) -> Tensor:
        i, j = torch.triu_indices(len(self.rdm), len(self.rdm), offset=1)
        return self.rdm[i, j]


def _module(model: nn.Module, layer: str | None) -> nn.Module:
    if layer is None or layer == "":
        return model
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"model has no layer {layer!r}; layers: {', '.join(names[:40])}") from None


def layer_names(model: nn.Module) -> list[str]:
    """The names ``layer`` accepts, in order: submodule names, or a graph module's own layer names."""
    if hasattr(model, "layer_names"):
        return list(model.layer_names())
    return [n for n, _ in model.named_modules() if n]


def _layer_output(model: nn.Module, layer: str | None, x: Tensor) -> Tensor:
    """The output of ``layer`` (the model's own output for None) on ``x``; the rest of the forward
    pass after that layer is cut short so that it costs nothing and cannot fail."""
    if layer is None or layer == "":
        return model(x)
    if hasattr(model, "layer_output"):  # a module that names its own layers (an ONNX graph)
        return model.layer_output(x, layer)
    mod = _module(model, layer)
    seen: list[Tensor] = []

    class _Stop(Exception):
        pass

    def hook(_m, _inp, out):
        seen.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise _Stop

    h = mod.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not seen:
        raise ValueError(f"layer {layer!r} was not called in the forward pass")
    return seen[0]


def layer_features(model: nn.Module, layer: str | None, x: Tensor, batch_size: int = 200) -> Tensor:
    """Flattened features of ``layer`` on ``x`` (no gradients, eval mode: the model's modes are restored after),
    float32 on CPU."""
    device = device_of(model)
    outs = []
    with torch.no_grad(), evaluating(model):
        for i in range(0, len(x), batch_size):
            outs.append(_layer_output(model, layer, x[i:i + batch_size].to(device)).flatten(1).float().cpu())
    return torch.cat(outs)


@torch.inference_mode(False)  # gradients, under a caller's no_grad or inference_mode too
@torch.enable_grad()
def attribution_maps(model: nn.Module, layer: str | None, x: Tensor, batch_size: int = 50,
                     attribution: str = "sum") -> Tensor:
    """|x * d(sum of the layer's output)/dx|, averaged over the input channels: (N, H, W); with
    ``attribution="norm"`` the L2 norm of each image's layer output is differentiated instead of its sum.

    Each image's layer output depends on that image alone (eval mode; the model's modes are restored after), so
    the gradient of the batch's sum (of norms) is every image's own gradient. Gradients are on whatever mode the
    caller is in; a network made under ``torch.inference_mode()`` (inference tensors) is a ``ValueError``.
    """
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"attribution must be one of {', '.join(ATTRIBUTIONS)}, got {attribution!r}")
    refuse_inference_tensors(model, does="differentiates networks")
    device = device_of(model)
    maps = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).detach()
        xb = (xb.clone() if xb.is_inference() else xb).requires_grad_(True)  # a probe made under inference_mode
        with evaluating(model):  # the model's modes come back as they were
            out = _layer_output(model, layer, xb)
        value = out.sum() if attribution == "sum" else out.flatten(1).norm(dim=1).sum()
        (grad,) = torch.autograd.grad(value, xb)
        maps.append((xb.detach() * grad).abs().mean(1).cpu())
    return torch.cat(maps)


def _cosine_matrix(f: Tensor) -> Tensor:
    f = f.double()
    n = f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = f / n
    return g @ g.T


def _corr_matrix(f: Tensor) -> Tensor:
    f = f.double()
    return _cosine_matrix(f - f.mean(1, keepdim=True))


def feature_relations(feats: Tensor, centre: bool = False) -> tuple[Tensor, Tensor]:
    """(edges, rdm) of features (N, D): cosine similarities and 1 - Pearson correlations between the
    images, of the features centred over the N images first when ``centre``."""
    f = feats.double()
    if centre:
        f = f - f.mean(0, keepdim=True)
    return _cosine_matrix(f), 1.0 - _corr_matrix(f)


def attribution_graph(model: nn.Module, probe: Tensor, layer: str | None = None,
                      batch_size: int = 50, centre: bool = False, attribution: str = "sum") -> AttributionGraph:
    """The attribution graph of ``model`` at ``layer`` (a submodule name; None = the output)."""
    if probe.dim() != 4 or len(probe) < 3:
        raise ValueError(f"probe must be (N, C, H, W) with N >= 3, got {tuple(probe.shape)}")
    maps = attribution_maps(model, layer, probe, batch_size, attribution)
    edges, rdm = feature_relations(layer_features(model, layer, probe, batch_size), centre)
    return AttributionGraph(nodes=maps.flatten(1).double(), edges=edges, rdm=rdm,
                            layer=layer or "output", map_shape=tuple(maps.shape[1:]))


# --------------------------------------------------------------------------- similarities
def rankdata(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as Spearman's rho wants). Vectorised: edge vectors of
    1,000 probe images have half a million entries."""
    v = np.asarray(v, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    sv = v[order]
    starts = np.r_[True, sv[1:] != sv[:-1]] if len(v) else np.zeros(0, dtype=bool)
    first = np.flatnonzero(starts)  # sorted position where each run of equal values begins
    counts = np.diff(np.r_[first, len(v)])
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = (first + (counts - 1) / 2.0 + 1.0)[np.cumsum(starts) - 1]
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation; 0 when either side is constant (no ranking to agree with)."""
    a = np.asarray(a.detach().cpu().numpy() if isinstance(a, Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu().numpy() if isinstance(b, Tensor) else b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"spearman needs two vectors of one length >= 2, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def _check_pair(a: AttributionGraph, b: AttributionGraph) -> None:
    if a.nodes.shape != b.nodes.shape:
        raise ValueError(f"graphs were built on different probe sets: nodes {tuple(a.nodes.shape)} "
                         f"vs {tuple(b.nodes.shape)}")


def node_similarity(a: AttributionGraph, b: AttributionGraph) -> float:
    """S_V: mean cosine similarity between corresponding attribution maps."""
    _check_pair(a, b)
    na = a.nodes / a.nodes.norm(dim=1, keepdim=True).clamp_min(1e-12)
    nb = b.nodes / b.nodes.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((na * nb).sum(1).mean())


def edge_similarity(a: AttributionGraph, b: AttributionGraph) -> float:
    """S_E: Spearman correlation of the two edge vectors."""
    _check_pair(a, b)
    return spearman(a.edge_vector(), b.edge_vector())


def rsa_similarity(a: AttributionGraph, b: AttributionGraph) -> float:
    """RSA: Spearman correlation of the two representational dissimilarity matrices."""
    _check_pair(a, b)
    return spearman(a.rdm_vector(), b.rdm_vector())


def graph_similarity(a: AttributionGraph, b: AttributionGraph, method: str = "depara", lam: float = 10.0) -> float:
    """S for ``method``: depara S_V + lam*S_E, depara_v S_V, depara_e S_E, rsa."""
    if method == "depara":
        return node_similarity(a, b) + lam * edge_similarity(a, b)
    if method == "depara_v":
        return node_similarity(a, b)
    if method == "depara_e":
        return edge_similarity(a, b)
    if method == "rsa":
        return rsa_similarity(a, b)
    raise ValueError(f"method must be one of {', '.join(m for m in METHODS if m != 'random')}, got {method!r}")


# --------------------------------------------------------------------------- selection
@dataclass
class Ranking:
    method: str
    scores: dict[str, float]  # candidate → score (higher: transfers better)
    order: list[str]  # candidates, best first

    def to_dict(self) -> dict:
        return {"method": self.method, "scores": self.scores, "order": self.order}


def rank(target: AttributionGraph, candidates: Mapping[str, AttributionGraph], method: str = "depara",
         lam: float = 1.0, seed: int = 0) -> Ranking:
    """Rank candidate graphs by their similarity to the target's (``random``: a seeded shuffle)."""
    if not candidates:
        raise ValueError("no candidates to rank")
    if method == "random":
        rng = np.random.default_rng(seed)
        scores = dict(zip(candidates, rng.random(len(candidates)).tolist()))
    else:
        scores = {name: graph_similarity(g, target, method, lam) for name, g in candidates.items()}
    order = sorted(scores, key=lambda k: (-scores[k], k))
    return Ranking(method, scores, order)


def _graph(cfg: DeparaConfig, model: nn.Module, probe: Tensor, layer: str | None) -> AttributionGraph:
    """``attribution_graph`` with ``cfg``'s batch size, centring and attribution."""
    return attribution_graph(model, probe, layer, cfg.batch_size, cfg.centre, cfg.attribution)


def select_model(target: nn.Module, sources: Mapping[str, nn.Module], probe: Tensor, cfg: DeparaConfig,
                 *, target_layer: str | None = None, source_layers: Mapping[str, str | None] | None = None) -> Ranking:
    """Pre-trained model selection: rank ``sources`` by how well they should transfer to ``target``."""
    t = _graph(cfg, target, probe, target_layer)
    layers = source_layers or {}
    graphs = {n: _graph(cfg, m, probe, layers.get(n)) for n, m in sources.items()}
    return rank(t, graphs, cfg.method, cfg.lam, cfg.seed)


def select_layer(source: nn.Module, layers: Sequence[str], target: AttributionGraph, probe: Tensor,
                 cfg: DeparaConfig) -> Ranking:
    """Layer selection: score each of ``source``'s ``layers`` against the target's graph."""
    graphs = {layer: _graph(cfg, source, probe, layer) for layer in layers}
    return rank(target, graphs, cfg.method, cfg.lam, cfg.seed)


# --------------------------------------------------------------------------- the recipe
@dataclass
class TransferResult:
    target: str
    method: str
    lam: float
    ranking: Ranking  # the chosen method's
    baselines: dict[str, Ranking]  # every method, the chosen one included
    matrix: list[list[float]]  # S between every pair of models (targets first, then sources)
    names: list[str]  # row/column names of ``matrix``
    layers: dict[str, Ranking] = field(default_factory=dict)  # layer selection, per source asked for
    probe_size: int = 0

    def to_dict(self) -> dict:
        return {"target": self.target, "method": self.method, "lam": self.lam, "probe_size": self.probe_size,
                "scores": self.ranking.scores, "ranking": self.ranking.order,
                "baselines": {k: r.to_dict() for k, r in self.baselines.items()},
                "similarity": {"names": self.names, "matrix": self.matrix},
                "layer_selection": {k: r.to_dict() for k, r in self.layers.items()}}


def rank_transferability(cfg: DeparaConfig, target: nn.Module, sources: Mapping[str, nn.Module], probe: Tensor,
                         *, target_name: str = "target", target_layer: str | None = None,
                         source_layers: Mapping[str, str | None] | None = None,
                         layer_candidates: Mapping[str, Sequence[str]] | None = None,
                         log: Callable[[str], None] | None = None) -> TransferResult:
    """Rank ``sources`` for ``target`` by every method; optionally score candidate layers of some sources."""
    if not sources:
        raise ValueError("no source models to rank")
    if target_name in sources:
        raise ValueError(f"a source is named like the target: {target_name!r}")
    layers = source_layers or {}
    t = _graph(cfg, target, probe, target_layer)
    graphs: dict[str, AttributionGraph] = {}
    for name, m in sources.items():
        graphs[name] = _graph(cfg, m, probe, layers.get(name))
        if log:
            log(f"attribution graph of {name} at {graphs[name].layer}")
    baselines = {m: rank(t, graphs, m, cfg.lam, cfg.seed) for m in METHODS}
    method_for_matrix = cfg.method if cfg.method != "random" else "depara"
    everything = {target_name: t, **graphs}
    names = list(everything)
    matrix = [[graph_similarity(everything[a], everything[b], method_for_matrix, cfg.lam) for b in names]
              for a in names]
    per_layer = {n: select_layer(sources[n], ls, t, probe, cfg) for n, ls in (layer_candidates or {}).items()}
    return TransferResult(target=target_name, method=cfg.method, lam=cfg.lam, ranking=baselines[cfg.method],
                          baselines=baselines, matrix=matrix, names=names, layers=per_layer, probe_size=len(probe))
