"""Pool DEPARA benchmark runs whose test zoos differ (for example the two folds of the zoo pair).

One run of ``benchmarks/depara.py`` measures model selection on one zoo's twelve targets, too few to
order DEPARA and RSA (the per-target gap has a standard deviation of about 0.25). Swapping the roles of
the validation and the test zoo (``--seed 1 --select-on-seed 0``) gives a second, independent test set
of targets with settings chosen on the other zoo; this script reads both runs' JSON and reports, per run
and pooled over every (zoo, target), each method's mean Spearman / top-1 / top-3 and DEPARA's paired
Spearman gap to each baseline with its standard error.

    python benchmarks/depara_pool.py benchmarks/results/depara.json benchmarks/results/depara_fold1.json \\
        --json benchmarks/results/depara_pooled.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from depara import SCORED  # benchmarks/depara.py: the scored methods, DEPARA first

METRICS = ("spearman", "top1", "top3")


def per_target(run: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{target: {method: {metric: value}}} over the run's counted targets."""
    targets = run["details"]["test_zoo"]["targets"]
    return {t: {m: {k: targets[t]["model_selection"][m][k] for k in METRICS} for m in SCORED}
            for t in run["counted_targets"]}


def summarise(rows: list[dict[str, dict[str, float]]]) -> dict:
    n = len(rows)
    means = {m: {k: sum(r[m][k] for r in rows) / n for k in METRICS} for m in SCORED}
    gaps = {}
    for base in SCORED[1:]:
        d = [r["depara"]["spearman"] - r[base]["spearman"] for r in rows]
        sd = statistics.stdev(d) if n > 1 else float("nan")
        gaps[base] = {"mean": statistics.fmean(d), "se": sd / n ** 0.5, "sd": sd,
                      "depara_wins": sum(x > 0 for x in d), "n": n}
    return {"n": n, "model_selection": means, "depara_gap": gaps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="depara.py JSON outputs (distinct test zoos)")
    ap.add_argument("--json", type=Path, help="write the pooled summary here")
    args = ap.parse_args(argv)

    out: dict = {"runs": {}}
    pooled: list = []
    for path in args.runs:
        run = json.loads(path.read_text())
        seed = run["details"]["seed"]
        if any(r["test_seed"] == seed for r in out["runs"].values()):
            ap.error(f"{path}: its test zoo (seed {seed}) is already in the pool")
        rows = list(per_target(run).values())
        pooled += rows
        out["runs"][str(path)] = {"test_seed": seed, "selected_on_seed": run.get("validation", {}).get("seed"),
                                  **summarise(rows)}
    out["pooled"] = summarise(pooled)

    print(f"{'':22}" + "".join(f"{m:>20}" for m in SCORED) + "   (Spearman / top-1 / top-3)")
    for name, s in [*((f"test seed {r['test_seed']} ({r['n']})", r) for r in out["runs"].values()),
                    (f"pooled ({out['pooled']['n']})", out["pooled"])]:
        cells = "".join(f"{'{:.3f} {:.2f} {:.2f}'.format(*(s['model_selection'][m][k] for k in METRICS)):>20}"
                        for m in SCORED)
        print(f"{name:22}{cells}")
    for base, g in out["pooled"]["depara_gap"].items():
        print(f"DEPARA - {base:9} pooled Spearman gap {g['mean']:+.3f} +- {g['se']:.3f} "
              f"(sd {g['sd']:.2f}; DEPARA ahead on {g['depara_wins']} of {g['n']})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
