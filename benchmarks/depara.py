"""DEPARA on the generated zoo: model selection and layer selection against ground-truth transfer.

For every classification task of the zoo in turn as the target (its own zoo model as the target
model, every other zoo model as a source): the ground truth is each source's transfer accuracy on
the target task, a Taskonomy-style head (two conv layers and a readout) trained on the source's
frozen features from a small target training set; each method scores the sources from unlabelled
probe images of the target's domain. Reported, as means over target tasks: Spearman correlation of
each method's scores with the ground truth, top-1 / top-3 precision (the truly best source is among
the method's first 1 / 3); for layer selection, the Spearman correlation across a source's layers of
its per-layer score with its per-layer transfer accuracy (mean over targets and sources).

A target counts in the means only if some source transfers to it better than an untrained encoder
of the same architecture does (Taskonomy's sanity check against a random network's readout): when
every source is worse than random features there is no transfer to rank, only degrees of harm.
The rule reads the ground truth alone, never a method's scores; the means over every target are in
the JSON too (``all_targets``), as is every method's Spearman against the linear-probe ground truth
of the previous runs (``vs_linear_probe``).

    python benchmarks/depara.py --json benchmarks/results/depara.json

The zoo is cached under $SDB_CACHE_DIR (default: the temp dir) keyed by its config; the first run
trains it. The random baseline is the expectation over 200 seeded shuffles. ``truth_reliability`` in the
JSON details is the mean Spearman correlation between the ground truths of two draws: how far a
single draw's ranking is reproducible at all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from sdb_core.transfer.depara import (
    METHODS,
    attribution_graph,
    feature_relations,
    layer_features,
    rank,
    spearman,
)
from sdb_core.transfer.zoo import (
    ENCODER_LAYERS,
    FEATURE_LAYER,
    HEADS,
    TARGET_TASKS,
    ProbeConfig,
    ZooConfig,
    ZooNet,
    build_zoo,
    probe_images,
    transfer_accuracy_draws,
)


def topk_hit(scores: dict[str, float], truth: dict[str, float], k: int) -> float:
    best = max(truth.values())
    winners = {n for n, v in truth.items() if v == best}
    picked = sorted(scores, key=lambda n: (-scores[n], n))[:k]
    return float(bool(winners & set(picked)))


def pairwise_agreement(rows: list[list[float]]) -> float | None:
    """Mean Spearman correlation between every two draws' values (None for a single draw)."""
    rhos = [spearman(rows[i], rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    return float(np.mean(rhos)) if rhos else None


def evaluate_method(method: str, tgraph, graphs, truth, lam: float, draws: int = 200) -> dict[str, float]:
    seeds = range(draws) if method == "random" else [0]
    rows = []
    for s in seeds:
        scores = rank(tgraph, graphs, method, lam, seed=s).scores
        names = list(truth)
        rows.append((spearman([scores[n] for n in names], [truth[n] for n in names]),
                     topk_hit(scores, truth, 1), topk_hit(scores, truth, 3)))
    a = np.array(rows).mean(0)
    return {"spearman": float(a[0]), "top1": float(a[1]), "top3": float(a[2])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the summary JSON here")
    ap.add_argument("--probe", type=int, default=1000, help="probe images per target, model selection (paper: 1k)")
    ap.add_argument("--layer-probe", type=int, default=200, help="probe images per target, layer selection (paper: 200)")
    ap.add_argument("--draws", type=int, default=ProbeConfig().draws, help="draws of the target training set")
    ap.add_argument("--lam", type=float, default=10.0, help="lambda of S = S_V + lambda S_E (paper: 1 and 10)")
    ap.add_argument("--train-per-domain", type=int, default=ZooConfig().train_per_domain)
    ap.add_argument("--epochs", type=int, default=ZooConfig().train.epochs)
    ap.add_argument("--probe-train", type=int, default=ProbeConfig().train_n, help="target training-set size")
    ap.add_argument("--head", choices=HEADS, default=ProbeConfig().head, help="the ground truth's transfer head")
    ap.add_argument("--targets", default=",".join(TARGET_TASKS), help="comma-separated target tasks")
    ap.add_argument("--centre", action="store_true",
                    help="edges and RSA from features centred over the probe set (the authors' model-selection "
                         "code); the other choice is reported beside for model selection either way")
    ap.add_argument("--cache-dir", help="zoo cache (default $SDB_CACHE_DIR or the temp dir)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = ZooConfig()
    zcfg = ZooConfig(train_per_domain=args.train_per_domain, train=replace(base.train, epochs=args.epochs),
                     seed=args.seed)
    zoo = build_zoo(zcfg, cache_dir=args.cache_dir, log=lambda s: print(s, file=sys.stderr))
    t_zoo = time.perf_counter() - t0
    pcfg = ProbeConfig(train_n=args.probe_train, draws=args.draws, seed=args.seed, head=args.head)
    lcfg = ProbeConfig(train_n=args.probe_train, draws=args.draws, seed=args.seed, head="linear")
    torch.manual_seed(args.seed + 12345)
    untrained = ZooNet("cls", 2, 3, zcfg.width).eval()  # the random-features reference (its encoder is read)
    per_target: dict[str, dict] = {}
    for target in args.targets.split(","):
        sources = {n: m for n, m in zoo.models.items() if n != target}
        draws = transfer_accuracy_draws(sources, target, pcfg, layers=ENCODER_LAYERS)
        acc = {n: {la: float(np.mean(v)) for la, v in d.items()} for n, d in draws.items()}
        truth = {n: acc[n][FEATURE_LAYER] for n in sources}
        random_features = float(np.mean(transfer_accuracy_draws({"untrained": untrained}, target, pcfg)
                                        ["untrained"][FEATURE_LAYER]))
        transfers = max(truth.values()) > random_features
        linear = {n: float(np.mean(v[FEATURE_LAYER])) for n, v in
                  transfer_accuracy_draws(sources, target, lcfg).items()} if args.head != "linear" else truth
        names = list(sources)
        reliability = pairwise_agreement([[draws[n][FEATURE_LAYER][r] for n in names] for r in range(args.draws)])
        layer_rel = [pairwise_agreement([[draws[n][la][r] for la in ENCODER_LAYERS] for r in range(args.draws)])
                     for n in names]
        layer_reliability = None if args.draws < 2 else float(np.mean(layer_rel))
        probe = probe_images(target, args.probe, args.seed)
        tgraph = attribution_graph(zoo.models[target], probe, FEATURE_LAYER, centre=args.centre)
        top = {n: attribution_graph(m, probe, FEATURE_LAYER, centre=args.centre) for n, m in sources.items()}
        ms = {m: evaluate_method(m, tgraph, top, truth, args.lam) for m in METHODS}

        def other_centring(g, model, probe=probe):  # the same nodes, edges and RSA from the other choice of centring
            e, r = feature_relations(layer_features(model, FEATURE_LAYER, probe), not args.centre)
            return replace(g, edges=e, rdm=r)

        t_other = other_centring(tgraph, zoo.models[target])
        top_other = {n: other_centring(g, sources[n]) for n, g in top.items()}
        other = {m: evaluate_method(m, t_other, top_other, truth, args.lam) for m in METHODS}
        del t_other, top_other
        by_lam = {f"{lam:g}": evaluate_method("depara", tgraph, top, truth, lam) for lam in (1.0, 3.0, 10.0)}
        scores = {m: rank(tgraph, top, m, args.lam).scores for m in METHODS if m != "random"}
        vs_linear = {m: evaluate_method(m, tgraph, top, linear, args.lam) for m in METHODS}
        del top
        lprobe = probe_images(target, args.layer_probe, args.seed)
        ltgraph = attribution_graph(zoo.models[target], lprobe, FEATURE_LAYER, centre=args.centre)
        rhos: dict[str, list[float]] = {"depara": [], "rsa": []}
        for n, m in sources.items():
            graphs = {layer: attribution_graph(m, lprobe, layer, centre=args.centre) for layer in ENCODER_LAYERS}
            for method, r in rhos.items():
                lscores = rank(ltgraph, graphs, method, args.lam).scores
                r.append(spearman([lscores[la] for la in ENCODER_LAYERS], [acc[n][la] for la in ENCODER_LAYERS]))
        ls = {method: {"spearman": float(np.mean(r))} for method, r in rhos.items()}
        per_target[target] = {"truth": truth, "random_features": random_features, "counted": transfers,
                              "truth_linear_probe": linear, "vs_linear_probe": vs_linear,
                              "other_centring": other,
                              "truth_reliability": reliability,
                              "layer_truth_reliability": layer_reliability, "model_selection": ms,
                              "depara_by_lambda": by_lam, "layer_selection": ls, "scores": scores,
                              "layer_accuracy": acc, "draws": draws}
        print(f"target {target:9s} best source {max(truth, key=truth.get):9s} {max(truth.values()):.1f} "
              f"(untrained encoder {random_features:.1f}{'' if transfers else ': not counted'}) "
              + " ".join(f"{m}={ms[m]['spearman']:+.2f}" for m in METHODS)
              + (f" truth draw-vs-draw {reliability:+.2f}" if reliability is not None else "")
              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    counted = [t for t in per_target if per_target[t]["counted"]] or list(per_target)

    def means(targets, key="model_selection"):
        return {m: {k: float(np.mean([per_target[t][key][m][k] for t in targets])) for k in ("spearman", "top1", "top3")}
                for m in METHODS}

    def layer_means(targets):
        return {m: {"spearman": float(np.mean([per_target[t]["layer_selection"][m]["spearman"] for t in targets]))}
                for m in ("depara", "rsa")}

    summary = {"model_selection": means(counted), "layer_selection": layer_means(counted)}
    all_targets = {"targets": list(per_target), "model_selection": means(per_target),
                   "layer_selection": layer_means(per_target)}
    other_centring = {"centred": not args.centre, "counted_targets": means(counted, "other_centring"),
                      "all_targets": means(per_target, "other_centring")}
    vs_linear_probe = {"counted_targets": means(counted, "vs_linear_probe"),
                       "all_targets": means(per_target, "vs_linear_probe")}
    by_lambda = {lam: {k: float(np.mean([per_target[t]["depara_by_lambda"][lam][k] for t in counted]))
                       for k in ("spearman", "top1", "top3")} for lam in ("1", "3", "10")}
    seconds = time.perf_counter() - t0
    print(f"\nmodel selection (means over the {len(counted)} counted targets {', '.join(counted)}; "
          f"{len(zoo.models) - 1} sources each), and over all {len(per_target)} targets")
    print(f"{'method':10s} {'spearman':>9s} {'top1':>6s} {'top3':>6s} | {'all':>6s} {'top1':>6s} {'top3':>6s}")
    for m, r in summary["model_selection"].items():
        a = all_targets["model_selection"][m]
        print(f"{m:10s} {r['spearman']:9.3f} {r['top1']:6.2f} {r['top3']:6.2f} | "
              f"{a['spearman']:6.3f} {a['top1']:6.2f} {a['top3']:6.2f}")
    print("against the linear-probe truth (counted targets): " + ", ".join(
        f"{m} {r['spearman']:.3f}" for m, r in vs_linear_probe["counted_targets"].items()))
    print(f"edges {'un' if args.centre else ''}centred (counted targets): " + ", ".join(
        f"{m} {r['spearman']:.3f}/{r['top3']:.2f}" for m, r in other_centring["counted_targets"].items()))
    print("depara by lambda: " + ", ".join(f"{lam}: {r['spearman']:.3f}" for lam, r in by_lambda.items()))
    print("\nlayer selection (Spearman across the 5 encoder layers, mean over targets and sources)")
    for m, r in summary["layer_selection"].items():
        print(f"{m:10s} {r['spearman']:9.3f}")
    load = os.getloadavg()
    print(f"\n{seconds:.0f} s (zoo {t_zoo:.0f} s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        out = {**summary, "counted_targets": counted, "all_targets": all_targets, "vs_linear_probe": vs_linear_probe,
               "other_centring": other_centring, "centre": args.centre,
               "details": {"targets": per_target, "zoo_scores": zoo.scores, "lam": args.lam, "head": args.head,
                                      "depara_by_lambda": by_lambda,
                                      "probe": args.probe, "layer_probe": args.layer_probe, "draws": args.draws,
                                      "zoo_config_key": zcfg.key(), "seconds": seconds,
                                      "zoo_seconds": t_zoo, "loadavg": list(load)}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
