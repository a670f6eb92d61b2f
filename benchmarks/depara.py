"""DEPARA on the generated zoo: model selection and layer selection against ground-truth transfer.

For every classification task of the zoo in turn as the target (its own zoo model as the target
model, every other zoo model as a source): the ground truth is each source's transfer accuracy on
the target task, a Taskonomy-style head (two conv layers and a readout) trained on the source's
frozen features from a small target training set; each method scores the sources from unlabelled
probe images of the target's domain. Reported, as means over target tasks: Spearman correlation of
each method's scores with the ground truth, top-1 / top-3 precision (the truly best source is among
the method's first 1 / 3); for layer selection, the Spearman correlation across a source's layers of
its per-layer score with its per-layer transfer accuracy (mean over targets and sources). The zoo has
15 tasks, 12 of them image-level targets (14 sources each); layer selection is measured on the pairs of
the first ten tasks (``--layer-tasks``: 7 targets x 9 sources), the zoo before it grew, whose per-layer
truth was fitted then.

Settings are chosen on a validation zoo, never on the figures reported. Each method's free settings
(DEPARA's lambda, centring the features before the edges / RSA, the probe-set size, which layer of the
target model is compared, what the attribution maps differentiate) are chosen on the same zoo recipe
trained with another seed (``--select-on-seed``, default 1: other images, other initial weights, other
target training sets and probe images), by the mean over that zoo's counted targets of Spearman + top-3
precision; then the chosen settings are run once on the test zoo (``--seed``, default 0) and reported.
``--no-select`` runs the library's defaults (``DeparaConfig()``, probe 1,000, encoder output) instead.
The test zoo's figures of every DEPARA setting are in the JSON too (``details.grid_on_test``), for
reading, not for choosing.

A target counts in the means only if some source transfers to it better than an untrained encoder
of the same architecture does (Taskonomy's sanity check against a random network's readout): when
every source is worse than random features there is no transfer to rank, only degrees of harm.
The rule reads the ground truth alone, never a method's scores; the means over every target are in
the JSON too (``all_targets``), as is every method's Spearman against a linear-probe ground truth
(``vs_linear_probe``).

    OMP_NUM_THREADS=1 python benchmarks/depara.py --json benchmarks/results/depara.json
    # the ten-task zoo of depara_10tasks.json: --zoo-tasks digit,parity,big,rotation,where,nearest,count,seg,depth,edges

The zoos are cached under $SDB_CACHE_DIR (default: the temp dir) keyed by their config bar the task list
(one file per task model), and so is their ground truth (every source x layer x draw accuracy, one file per
(target, source) pair, keyed by the probe config), so a grown zoo trains and fits only what is new. The
ten-task zoo's first run took about 1.5 h on two contended cores; growing it by five tasks (ten new
models, 105 new pairs' truth on each zoo, every method) 3,162 s at load 1.3-2.2. The validation
zoo's layer-selection truth uses ``--select-layer-draws`` draws (default 1). The random baseline is the
expectation over 200 seeded shuffles. ``truth_reliability`` in the JSON details is the mean Spearman
correlation between the ground truths of two draws: how far a single draw's ranking is reproducible at all.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from depara_zoo import (  # benchmarks/depara_zoo.py: the zoo and its ground truth
    HEADS,
    TARGET_TASKS,
    TASKS,
    ProbeConfig,
    ZooConfig,
    build_zoo,
    probe_images,
    transfer_accuracy_draws,
)

from sdb_core.transfer.depara import (
    ATTRIBUTIONS,
    METHODS,
    AttributionGraph,
    DeparaConfig,
    attribution_maps,
    edge_similarity,
    feature_relations,
    layer_features,
    node_similarity,
    rsa_similarity,
    spearman,
)
from sdb_core.transfer.task_models import ENCODER_LAYERS, FEATURE_LAYER, ZooNet

LAMBDAS = (10.0, 1.0, 3.0)
PROBES = (1000, 250)
TARGET_LAYERS = (FEATURE_LAYER, "output")  # the target's encoder output (the sources' depth) or its logits
SCORED = ("depara", "depara_v", "depara_e", "rsa")
# The zoo's first ten tasks: layer selection is measured on their pairs (``--layer-tasks``), whose per-layer ground
# truth was fitted before the zoo grew (each new pair's would cost 4 more fits per draw on each zoo).
FIRST_TASKS = tuple(TASKS)[:10]


@dataclass(frozen=True)
class Setting:
    """One choice of every free setting; the defaults are the issue's plain definition (lambda 10 as before)."""
    lam: float = LAMBDAS[0]
    centre: bool = False
    probe: int = PROBES[0]
    target_layer: str = FEATURE_LAYER
    attribution: str = "sum"

    def name(self) -> str:
        return (f"lam={self.lam:g},centre={int(self.centre)},probe={self.probe},target={self.target_layer},"
                f"attr={self.attribution}")


def grid(method: str, probes=PROBES, layer_selection: bool = False) -> list[Setting]:
    """Every setting that changes ``method``'s scores (the plain definition first: ties keep it)."""
    lams = LAMBDAS if method == "depara" else (LAMBDAS[0],)
    centres = (False, True) if method != "depara_v" else (False,)
    attrs = ATTRIBUTIONS if method in ("depara", "depara_v") else (ATTRIBUTIONS[0],)
    probes = probes if not layer_selection else (probes[0],)
    return [Setting(lam, c, n, tl, a) for lam, c, n, tl, a in itertools.product(lams, centres, probes, TARGET_LAYERS,
                                                                                  attrs)]


def topk_hit(scores: dict[str, float], truth: dict[str, float], k: int) -> float:
    best = max(truth.values())
    winners = {n for n, v in truth.items() if v == best}
    picked = sorted(scores, key=lambda n: (-scores[n], n))[:k]
    return float(bool(winners & set(picked)))


def pairwise_agreement(rows: list[list[float]]) -> float | None:
    """Mean Spearman correlation between every two draws' values (None for a single draw)."""
    rhos = [spearman(rows[i], rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    return float(np.mean(rhos)) if rhos else None


def agreement(scores: dict[str, float], truth: dict[str, float]) -> dict[str, float]:
    names = list(truth)
    return {"spearman": spearman([scores[n] for n in names], [truth[n] for n in names]),
            "top1": topk_hit(scores, truth, 1), "top3": topk_hit(scores, truth, 3)}


def random_baseline(truth: dict[str, float], draws: int = 200) -> dict[str, float]:
    rows = []
    for s in range(draws):
        rng = np.random.default_rng(s)
        rows.append(agreement(dict(zip(truth, rng.random(len(truth)).tolist())), truth))
    return {k: float(np.mean([r[k] for r in rows])) for k in ("spearman", "top1", "top3")}


# --------------------------------------------------------------------------- reading the models
@dataclass
class Reading:
    """One model at one layer on the probe set: attribution maps (per variant) and features."""
    maps: dict[str, torch.Tensor]  # attribution → (N, H*W)
    feats: torch.Tensor  # (N, D)
    layer: str

    def graph(self, n: int, centre: bool, attribution: str, relations=None) -> AttributionGraph:
        edges, rdm = relations if relations is not None else feature_relations(self.feats[:n], centre)
        return AttributionGraph(nodes=self.maps[attribution][:n].double(), edges=edges, rdm=rdm, layer=self.layer,
                                map_shape=(0, 0))


def read(model, layer: str | None, probe: torch.Tensor) -> Reading:
    return Reading({a: attribution_maps(model, layer, probe, attribution=a).flatten(1) for a in ATTRIBUTIONS},
                   layer_features(model, layer, probe), layer or "output")


def pair_terms(target: dict[str, Reading], sources: dict[str, Reading], probes, centres=(False, True)) -> dict:
    """(probe, centre, target layer, attribution) → source → {"v", "e", "rsa"}: every term any setting combines,
    by the library's similarity functions (graphs built on the first ``probe`` images)."""
    out: dict = {}
    for n, centre in itertools.product(probes, centres):
        rel = {name: feature_relations(r.feats[:n], centre) for name, r in sources.items()}
        for tl, tr in target.items():
            trel = feature_relations(tr.feats[:n], centre)
            t0 = tr.graph(n, centre, ATTRIBUTIONS[0], trel)
            e = {name: (edge_similarity(sources[name].graph(n, centre, ATTRIBUTIONS[0], rel[name]), t0),
                        rsa_similarity(sources[name].graph(n, centre, ATTRIBUTIONS[0], rel[name]), t0))
                 for name in sources}
            for a in ATTRIBUTIONS:
                ta = tr.graph(n, centre, a, trel)
                out[(n, centre, tl, a)] = {
                    name: {"v": node_similarity(sources[name].graph(n, centre, a, rel[name]), ta),
                           "e": e[name][0], "rsa": e[name][1]} for name in sources}
        del rel
    return out


def method_scores(terms: dict, method: str, s: Setting) -> dict[str, float]:
    t = terms[(s.probe, s.centre, s.target_layer, s.attribution)]
    if method == "depara":
        return {n: v["v"] + s.lam * v["e"] for n, v in t.items()}
    return {n: v[{"depara_v": "v", "depara_e": "e", "rsa": "rsa"}[method]] for n, v in t.items()}


# --------------------------------------------------------------------------- one zoo
def untrained_encoder(seed: int, width: int) -> ZooNet:
    torch.manual_seed(seed + 12345)
    return ZooNet("cls", 2, 3, width).eval()  # the random-features reference (its encoder is read)


def measure_zoo(seed: int, args, targets: list[str], *, layer_draws: int, with_linear: bool, log) -> dict:
    """Ground truth and every method's terms for every setting on the zoo of ``seed``."""
    base = ZooConfig()
    zcfg = ZooConfig(tasks=tuple(args.zoo_tasks.split(",")), train_per_domain=args.train_per_domain, train=replace(base.train, epochs=args.epochs),
                     seed=seed)
    t0 = time.perf_counter()
    zoo = build_zoo(zcfg, cache_dir=args.cache_dir, log=log)
    cache = zoo.truth_dir()
    t_zoo = time.perf_counter() - t0
    pcfg = ProbeConfig(train_n=args.probe_train, draws=args.draws, seed=seed, head=args.head)
    lcfg = replace(pcfg, draws=layer_draws)
    untrained = untrained_encoder(seed, zcfg.width)
    layer_tasks = set(args.layer_tasks.split(","))
    per_target: dict[str, dict] = {}
    for target in targets:
        sources = {n: m for n, m in zoo.models.items() if n != target}
        draws = transfer_accuracy_draws(sources, target, pcfg, cache_dir=cache)
        truth = {n: float(np.mean(draws[n][FEATURE_LAYER])) for n in sources}
        # layer selection on the pairs of --layer-tasks only (none if the target is not one of them)
        layer_sources = {n: m for n, m in sources.items() if n in layer_tasks} if target in layer_tasks else {}
        layer_draws_ = transfer_accuracy_draws(layer_sources, target, lcfg, layers=ENCODER_LAYERS, cache_dir=cache)
        acc = {n: {la: float(np.mean(v)) for la, v in d.items()} for n, d in layer_draws_.items()}
        random_features = float(np.mean(transfer_accuracy_draws({"untrained-encoder": untrained}, target, pcfg,
                                                                cache_dir=cache)["untrained-encoder"][FEATURE_LAYER]))
        names = list(sources)
        row = {"truth": truth, "random_features": random_features, "counted": max(truth.values()) > random_features,
               "truth_reliability": pairwise_agreement([[draws[n][FEATURE_LAYER][r] for n in names]
                                                        for r in range(pcfg.draws)]),
               "layer_accuracy": acc, "random": random_baseline(truth)}
        if layer_draws > 1 and layer_sources:
            row["layer_truth_reliability"] = float(np.mean([
                pairwise_agreement([[layer_draws_[n][la][r] for la in ENCODER_LAYERS] for r in range(layer_draws)])
                for n in layer_sources]))
        if with_linear:
            linear = transfer_accuracy_draws(sources, target, replace(pcfg, head="linear", train=None),
                                             cache_dir=cache)
            row["truth_linear_probe"] = {n: float(np.mean(v[FEATURE_LAYER])) for n, v in linear.items()}
        # model selection: every source and the target read once on the largest probe set
        probe = probe_images(target, max(PROBES), seed)
        treads = {tl: read(zoo.models[target], None if tl == "output" else tl, probe) for tl in TARGET_LAYERS}
        sreads = {n: read(m, FEATURE_LAYER, probe) for n, m in sources.items()}
        row["terms"] = pair_terms(treads, sreads, PROBES)
        del sreads, treads
        # layer selection: each source at each encoder layer on the smaller probe set
        lprobe = probe[:args.layer_probe]
        treads = {tl: read(zoo.models[target], None if tl == "output" else tl, lprobe) for tl in TARGET_LAYERS}
        row["layer_terms"] = {n: {la: pair_terms(treads, {"s": read(m, la, lprobe)}, (len(lprobe),))
                                  for la in ENCODER_LAYERS} for n, m in layer_sources.items()}
        per_target[target] = row
        log(f"zoo seed {seed}: target {target:9s} best source {max(truth, key=truth.get):9s} "
            f"{max(truth.values()):.1f} (untrained encoder {random_features:.1f}"
            f"{'' if row['counted'] else ': not counted'}) ({time.perf_counter() - t0:.0f} s)")
    return {"targets": per_target, "zoo_scores": zoo.scores, "zoo_config_key": zcfg.key(), "zoo_seconds": t_zoo,
            "probe_config_key": pcfg.key()}


def model_selection(row: dict, method: str, s: Setting, truth_key: str = "truth") -> dict[str, float]:
    if method == "random":
        return row["random"] if truth_key == "truth" else random_baseline(row[truth_key])
    return agreement(method_scores(row["terms"], method, s), row[truth_key])


def layer_selection(row: dict, method: str, s: Setting, layer_probe: int) -> float:
    s = replace(s, probe=layer_probe)
    rhos = []
    for n, per_layer in row["layer_terms"].items():
        scores = [method_scores(per_layer[la], method, s)["s"] for la in ENCODER_LAYERS]
        rhos.append(spearman(scores, [row["layer_accuracy"][n][la] for la in ENCODER_LAYERS]))
    return float(np.mean(rhos))


def mean_over(targets: list[str], per_target: dict, f) -> dict[str, float]:
    rows = [f(per_target[t]) for t in targets]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def counted(per_target: dict) -> list[str]:
    return [t for t in per_target if per_target[t]["counted"]] or list(per_target)


def with_layers(targets: list[str], per_target: dict) -> list[str]:
    """The targets whose layer selection was measured (see ``--layer-tasks``)."""
    return [t for t in targets if per_target[t]["layer_terms"]]


def choose(per_target: dict, layer_probe: int) -> tuple[dict[str, Setting], dict[str, Setting], dict]:
    """Each method's setting with the best mean (Spearman + top-3) over the counted targets, for model selection,
    and the best mean Spearman for layer selection; with every setting's figures."""
    ts = counted(per_target)
    figures: dict = {"model_selection": {}, "layer_selection": {}}
    chosen, chosen_layer = {}, {}
    for m in SCORED:
        table = {s: mean_over(ts, per_target, lambda r, m=m, s=s: model_selection(r, m, s)) for s in grid(m)}
        figures["model_selection"][m] = {s.name(): v for s, v in table.items()}
        chosen[m] = max(table, key=lambda s: table[s]["spearman"] + table[s]["top3"])  # first of equals: the default
    for m in ("depara", "rsa"):
        table = {s: float(np.mean([layer_selection(per_target[t], m, s, layer_probe)
                                   for t in with_layers(ts, per_target)]))
                 for s in grid(m, layer_selection=True)}
        figures["layer_selection"][m] = {s.name(): v for s, v in table.items()}
        chosen_layer[m] = max(table, key=table.get)
    return chosen, chosen_layer, figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the summary JSON here")
    ap.add_argument("--layer-probe", type=int, default=200, help="probe images per target, layer selection (paper: 200)")
    ap.add_argument("--draws", type=int, default=ProbeConfig().draws, help="draws of the target training set")
    ap.add_argument("--train-per-domain", type=int, default=ZooConfig().train_per_domain)
    ap.add_argument("--epochs", type=int, default=ZooConfig().train.epochs)
    ap.add_argument("--probe-train", type=int, default=ProbeConfig().train_n, help="target training-set size")
    ap.add_argument("--head", choices=HEADS, default=ProbeConfig().head, help="the ground truth's transfer head")
    ap.add_argument("--zoo-tasks", default=",".join(TASKS), help="comma-separated tasks of the zoo (default: all)")
    ap.add_argument("--targets", help="comma-separated target tasks (default: the zoo's target tasks)")
    ap.add_argument("--layer-tasks", default=",".join(FIRST_TASKS),
                    help="layer selection is measured on the pairs of these tasks only (default: the first ten)")
    ap.add_argument("--no-linear-probe", action="store_true",
                    help="skip the linear-probe ground truth of the test zoo (vs_linear_probe; 3 fits per pair)")
    ap.add_argument("--select-on-seed", type=int, default=1, help="the validation zoo's seed (settings chosen there)")
    ap.add_argument("--select-layer-draws", type=int, default=1,
                    help="draws of the validation zoo's layer-selection truth (each draw: 5 fits per source)")
    ap.add_argument("--no-select", action="store_true", help="run the library's defaults, no validation zoo")
    ap.add_argument("--cache-dir", help="zoo and ground-truth cache (default $SDB_CACHE_DIR or the temp dir)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="the test zoo's seed")
    args = ap.parse_args(argv)
    if not args.no_select and args.select_on_seed == args.seed:
        ap.error("--select-on-seed must differ from --seed (choosing on the test zoo is what it is there to avoid)")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    zoo_tasks = args.zoo_tasks.split(",")
    targets = args.targets.split(",") if args.targets else [t for t in TARGET_TASKS if t in zoo_tasks]
    if any(t not in TASKS for t in zoo_tasks) or any(t not in zoo_tasks for t in targets):
        ap.error(f"--zoo-tasks must be tasks of {', '.join(TASKS)} and --targets some of them")

    def log(s):
        print(s, file=sys.stderr, flush=True)

    validation = None
    if args.no_select:
        lib = DeparaConfig()
        chosen = {m: Setting(lam=lib.lam, centre=lib.centre, attribution=lib.attribution) for m in SCORED}
        chosen_layer = {m: chosen[m] for m in ("depara", "rsa")}
    else:
        validation = measure_zoo(args.select_on_seed, args, targets, layer_draws=args.select_layer_draws,
                                 with_linear=False, log=log)
        chosen, chosen_layer, val_figures = choose(validation["targets"], args.layer_probe)
        for m in SCORED:
            log(f"chosen on the validation zoo (seed {args.select_on_seed}) for {m}: {chosen[m].name()} "
                f"{val_figures['model_selection'][m][chosen[m].name()]}")
    t_val = time.perf_counter() - t0
    test = measure_zoo(args.seed, args, targets, layer_draws=args.draws, with_linear=not args.no_linear_probe, log=log)
    per_target = test["targets"]
    ts = counted(per_target)

    def figures(targets_, truth_key="truth"):
        return {m: mean_over(targets_, per_target,
                             lambda r, m=m: model_selection(r, m, chosen.get(m, Setting()), truth_key)) for m in METHODS}

    def layer_figures(targets_):
        return {m: {"spearman": float(np.mean([layer_selection(per_target[t], m, chosen_layer[m], args.layer_probe)
                                               for t in with_layers(targets_, per_target)]))}
                for m in ("depara", "rsa")}

    summary = {"model_selection": figures(ts), "layer_selection": layer_figures(ts)}
    all_targets = {"targets": list(per_target), "model_selection": figures(list(per_target)),
                   "layer_selection": layer_figures(list(per_target))}
    vs_linear = None if args.no_linear_probe else {"counted_targets": figures(ts, "truth_linear_probe"),
                                                   "all_targets": figures(list(per_target), "truth_linear_probe")}
    plain = {m: mean_over(ts, per_target, lambda r, m=m: model_selection(r, m, Setting())) for m in SCORED}
    lib = DeparaConfig()
    library = Setting(lam=lib.lam, centre=lib.centre, attribution=lib.attribution)
    library_figures = {m: mean_over(ts, per_target, lambda r, m=m: model_selection(r, m, library)) for m in SCORED}
    # layer selection with the setting model selection chose (what the library does: one config for both)
    shared_layer = {m: float(np.mean([layer_selection(per_target[t], m, chosen[m], args.layer_probe)
                                      for t in with_layers(ts, per_target)])) for m in ("depara", "rsa")}
    grid_on_test = {s.name(): mean_over(ts, per_target, lambda r, s=s: model_selection(r, "depara", s))
                    for s in grid("depara")}
    seconds = time.perf_counter() - t0
    print(f"\nmodel selection on the test zoo (seed {args.seed}), means over the {len(ts)} counted targets "
          f"{', '.join(ts)} ({len(per_target[targets[0]]['truth'])} sources each), and over all {len(per_target)}")
    print(f"{'method':10s} {'spearman':>9s} {'top1':>6s} {'top3':>6s} | {'all':>6s} {'top1':>6s} {'top3':>6s}  setting")
    for m, r in summary["model_selection"].items():
        a = all_targets["model_selection"][m]
        print(f"{m:10s} {r['spearman']:9.3f} {r['top1']:6.2f} {r['top3']:6.2f} | "
              f"{a['spearman']:6.3f} {a['top1']:6.2f} {a['top3']:6.2f}  {chosen[m].name() if m in chosen else ''}")
    if vs_linear is not None:
        print("against the linear-probe truth (counted targets): " + ", ".join(
            f"{m} {r['spearman']:.3f}" for m, r in vs_linear["counted_targets"].items()))
    for what, figs in (("the plain definition (lambda 10, no centring)", plain),
                       (f"the library's defaults ({library.name()})", library_figures)):
        print(f"{what}, counted targets, Spearman/top-3: " + ", ".join(
            f"{m} {r['spearman']:.3f}/{r['top3']:.2f}" for m, r in figs.items()))
    print(f"\nlayer selection (Spearman across the 5 encoder layers, mean over the counted targets and the sources "
          f"among {args.layer_tasks}: {', '.join(with_layers(ts, per_target))})")
    for m, r in summary["layer_selection"].items():
        print(f"{m:10s} {r['spearman']:9.3f}  {chosen_layer[m].name()}; with model selection's setting "
              f"{shared_layer[m]:.3f}")
    load = os.getloadavg()
    print(f"\n{seconds:.0f} s (validation zoo {t_val:.0f} s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        def strip(zoo_figs):  # the terms are inputs to the figures, not results: the scores of the chosen settings stay
            out = {}
            for t, r in zoo_figs["targets"].items():
                out[t] = {k: v for k, v in r.items() if k not in ("terms", "layer_terms")}
            return {**zoo_figs, "targets": out}

        for r in per_target.values():
            r["scores"] = {m: method_scores(r["terms"], m, chosen[m]) for m in SCORED}
            r["model_selection"] = {m: model_selection(r, m, chosen.get(m, Setting())) for m in METHODS}
            if r["layer_terms"]:
                r["layer_selection"] = {m: layer_selection(r, m, chosen_layer[m], args.layer_probe)
                                        for m in ("depara", "rsa")}
        out = {**summary, "counted_targets": ts, "all_targets": all_targets, "vs_linear_probe": vs_linear,
               "chosen": {m: asdict(s) for m, s in chosen.items()},
               "chosen_layer_selection": {m: asdict(s) for m, s in chosen_layer.items()},
               "plain_definition_on_test": plain, "library_defaults_on_test": library_figures,
               "layer_selection_with_model_selection_setting": {m: {"spearman": v} for m, v in shared_layer.items()},
               "details": {"test_zoo": strip(test), "seed": args.seed, "zoo_tasks": zoo_tasks,
                           "layer_tasks": args.layer_tasks.split(","), "layer_selection_targets": with_layers(ts, per_target), "head": args.head, "draws": args.draws,
                           "layer_probe": args.layer_probe, "grid_on_test": grid_on_test,
                           "seconds": seconds, "validation_seconds": t_val, "loadavg": list(load)}}
        if validation is not None:
            out["validation"] = {"seed": args.select_on_seed, "layer_draws": args.select_layer_draws,
                                 "counted_targets": counted(validation["targets"]), "figures": val_figures,
                                 "zoo": strip(validation)}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
