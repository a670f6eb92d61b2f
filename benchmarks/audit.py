"""Leak audit of the unprotected teacher and of the protected box; table + JSON.

    python benchmarks/audit.py --json benchmarks/results/audit.json [--seeds 0 1 2] [--policy probs]
    python benchmarks/audit.py --policy top_k label --json benchmarks/results/audit_{policy}.json

Per seed: train the small-CNN teacher and wrap it with the default SDB recipe (the same
``train_and_wrap`` as ``benchmarks/protection.py``), audit the teacher's plain probabilities
and the box's public outputs under ``--policy`` with the default ``AuditConfig``, and
train the authorized students at the audit's transfer-set size: KD from the keyed path
and KD from the plain teacher (true labels, T = 4, α = 0.9, same steps as the audit), one pair
per student seed (``--authorized-students``, default 8), reported with the paired gap's standard error.
Advantages are means over seeds; a verdict is taken on those means. Several ``--policy``
values audit the same box (one teacher and one wrap per seed) under each policy and write one
JSON per policy (``{policy}`` in the ``--json`` path); teacher and authorized figures are shared.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdb_core.bundle import export_bundle
from sdb_core.data import load_dataset, transfer_split
from sdb_core.distill import DistillConfig
from sdb_core.protect.audit import AuditConfig, audit, score, verdict_of
from sdb_core.protect.config import POLICIES, SDBConfig
from sdb_core.protect.key import new_master_key
from sdb_core.protect.measure import student_accuracy, train_and_wrap
from sdb_core.train import TrainConfig


def authorized(teacher, box, data, cfg: AuditConfig, seed: int, students: int) -> dict:
    """The key holder's view at the audit's N: KD from the keyed path vs from the plain teacher.

    Each of ``students`` student seeds (the first is ``seed`` itself) trains one student from each,
    so the pairs differ only in the teacher. One pair alone is too noisy to compare the two: over
    24 pairs of the λ = 0.5 recipe the paired difference had a standard deviation of 0.48 points,
    more than the difference itself.
    """
    transfer = transfer_split(data, cfg.transfer_n, seed)
    dcfg = DistillConfig(temperature=4.0, alpha=0.9, train=replace(cfg.train, epochs=cfg.epochs_for(len(transfer))))
    seeds = [seed + 1000 * i for i in range(students)]
    keyed = [student_accuracy(cfg.student, data, transfer, box.distill_logits, dcfg, s) for s in seeds]
    plain = [student_accuracy(cfg.student, data, transfer, teacher, dcfg, s) for s in seeds]
    return {"kd_keyed": statistics.fmean(keyed), "kd_teacher": statistics.fmean(plain),
            "keyed": keyed, "teacher": plain, "student_seeds": seeds}


def combine(reports: list[dict], threshold: float) -> dict:
    """Advantages over all seeds (each seed against its own labels-only reference), verdict on the means."""
    families = {n: a["family"] for n, a in reports[0]["attacks"].items()}
    accs = {n: [acc for r in reports for acc in r["attacks"][n]["accs"]] for n in families}
    attacks = score(accs, families, reports[0].get("policy", "probs"))
    reference, worst, max_adv = verdict_of(attacks)
    return {"verdict": "protected" if max_adv <= threshold else "leaks", "worst_attack": worst,
            "max_advantage": max_adv, "worst_per_seed": attacks[worst]["advantages"], "reference": reference,
            "advantages": {n: a["advantage"] for n, a in attacks.items() if not a["label_only"]},
            "accuracies": {n: a["acc"] for n, a in attacks.items()},
            "public_acc": statistics.fmean(r["public_acc"] for r in reports)}


def authorized_summary(n: int, per_seed: list[dict]) -> dict:
    """Means over every (seed, student seed) pair, and the standard error of their paired gap."""
    gaps = [k - t for a in per_seed for k, t in zip(a.get("keyed", [a["kd_keyed"]]),
                                                    a.get("teacher", [a["kd_teacher"]]), strict=True)]
    return {"n": n, "kd_keyed": statistics.fmean(a["kd_keyed"] for a in per_seed),
            "kd_teacher": statistics.fmean(a["kd_teacher"] for a in per_seed), "pairs": len(gaps),
            "gap": statistics.fmean(gaps),
            "gap_se": statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else None}


def summarize(args, runs: list[dict], threshold: float, n: int, policy: str) -> dict:
    return {
        "dataset": args.data, "seeds": [r["seed"] for r in runs], "lam": args.lam,
        "teacher": combine([r["teacher"] for r in runs], threshold),
        "protected": {**combine([r["protected"] for r in runs], threshold), "policy": policy},
        "authorized": authorized_summary(n, [r["authorized"] for r in runs]),
        "settings": {k: v for k, v in runs[0]["teacher"]["config"].items() if k != "seeds"},
        "runs": runs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist-5k")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--policy", choices=POLICIES, nargs="+", default=["probs"],
                   help="output policy (or policies) of the protected box")
    p.add_argument("--json", help="write the summary here ('{policy}' in the path: one file per policy)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lam", type=float, default=SDBConfig().lam, help="the box's keyed input λ·x + (1 − λ)·k")
    p.add_argument("--authorized-students", type=int, default=8, metavar="K",
                   help="student seeds per seed for the authorized comparison (default 8)")
    p.add_argument("--rescore", metavar="JSON", help="re-score the runs of a saved summary (no training)")
    p.add_argument("--save-bundles", metavar="DIR",
                   help="also export each seed's box as DIR/seedN (public path only: its key is sealed under "
                        "a throwaway master key), e.g. to audit it again with `sdb audit --bundle --policy`")
    args = p.parse_args()
    args.policy = list(dict.fromkeys(args.policy))
    if len(args.policy) > 1 and (args.rescore or (args.json and "{policy}" not in args.json)):
        p.error("several policies need '{policy}' in the --json path, and --rescore takes one summary")
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)

    data = load_dataset(args.data)
    base = AuditConfig()
    t0 = time.perf_counter()
    by_policy: dict[str, list[dict]] = {pol: [] for pol in args.policy}
    if args.rescore:  # the scoring changed, the students did not: re-score a saved run
        old = json.loads(Path(args.rescore).read_text())
        args.seeds, args.policy, args.lam = old["seeds"], [old["protected"]["policy"]], old.get("lam", args.lam)
        by_policy = {args.policy[0]: old["runs"]}
        for run in by_policy[args.policy[0]]:
            for who in ("teacher", "protected"):
                rep = run[who]
                attacks = score({n: a["accs"] for n, a in rep["attacks"].items()},
                                {n: a["family"] for n, a in rep["attacks"].items()}, rep.get("policy", "probs"))
                for n, a in attacks.items():
                    a["detail"] = rep["attacks"][n].get("detail", [])
                rep["attacks"] = attacks
                rep["reference"], rep["worst_attack"], rep["max_advantage"] = verdict_of(attacks)
                rep["verdict"] = "protected" if rep["max_advantage"] <= base.threshold else "leaks"
    for seed in [] if args.rescore else args.seeds:
        teacher, _, result = train_and_wrap(data, seed, teacher_cfg=TrainConfig(epochs=8), sdb_cfg=SDBConfig(lam=args.lam),
                                            log=log)
        if args.save_bundles:
            export_bundle(result.box, Path(args.save_bundles) / f"seed{seed}", name=f"{args.data}-seed{seed}",
                          in_shape=data.in_shape, mean=data.mean, std=data.std, labels=data.labels,
                          master_key=new_master_key(), extra={"arch": "cnn", "data": args.data})
        cfg = replace(base, seeds=(seed,))
        rt = audit(teacher, data, cfg, log=log)
        log(rt.format_table())
        reports = {}
        for pol in args.policy:
            reports[pol] = audit(result.box, data, replace(cfg, policy=pol), log=log)
            log(reports[pol].format_table())
        auth = authorized(teacher, result.box, data, cfg, seed, args.authorized_students)
        log(f"seed {seed}: authorized KD at N={cfg.transfer_n}, mean of {args.authorized_students} students: "
            f"keyed {auth['kd_keyed']:.2f} teacher {auth['kd_teacher']:.2f}")
        for pol, rp in reports.items():
            by_policy[pol].append({"seed": seed, "teacher": rt.to_dict(), "protected": rp.to_dict(),
                                   "authorized": auth,
                                   "wrap": {k: result.report[k] for k in ("teacher_acc", "public_acc", "keyed_acc")}})

    for pol, runs in by_policy.items():
        report(args, pol, runs, base, old["seconds"] if args.rescore else time.perf_counter() - t0)
    return 0


def report(args, policy: str, runs: list[dict], base: AuditConfig, seconds: float) -> None:
    """Print the summary table of one policy's runs and write its JSON."""
    summary = summarize(args, runs, base.threshold, base.transfer_n, policy)
    summary["seconds"] = seconds
    print()
    width = max(len(n) for n in summary["teacher"]["advantages"])
    print(f"{'attack':{width}}  {'teacher':>8}  {'protected':>9}   (mean advantage, points, seeds {args.seeds}, "
          f"policy {policy})")
    for n, v in summary["teacher"]["advantages"].items():
        pv = summary["protected"]["advantages"].get(n)
        print(f"{n:{width}}  {v:+8.2f}  {'' if pv is None else f'{pv:+9.2f}'}")
    for n in summary["protected"]["advantages"]:
        if n not in summary["teacher"]["advantages"]:
            print(f"{n:{width}}  {'':8}  {summary['protected']['advantages'][n]:+9.2f}")
    for who in ("teacher", "protected"):
        s = summary[who]
        print(f"{who}: {s['verdict']} (worst {s['worst_attack']} {s['max_advantage']:+.2f}; public top-1 "
              f"{s['public_acc']:.1f}%)")
    a = summary["authorized"]
    se = "" if a["gap_se"] is None else f" ± {a['gap_se']:.2f} (standard error)"
    print(f"authorized KD at N={a['n']}, {a['pairs']} student pairs: keyed {a['kd_keyed']:.2f} vs plain teacher "
          f"{a['kd_teacher']:.2f}; gap {a['gap']:+.2f}{se}")
    if args.json:
        out = Path(args.json.replace("{policy}", policy))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
