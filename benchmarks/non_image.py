"""Classifiers that do not take images: does the default, self-checking wrap protect them? Table + JSON.

    python benchmarks/non_image.py --seeds 0 1 2 --json benchmarks/results/non_image.json

Two owners' networks from outside the zoo (``tests/signals.py``): a 1-D CNN (Conv1d, BatchNorm1d,
dropout) on noisy tones (2 × 64, 4 classes) and a LayerNorm MLP on Gaussian clusters (32 features,
4 classes), 1,200 training and 400 test inputs each. Per seed: the teacher trains on the training split
less the check's held-out part (so the check measures it fairly), ``wrap()`` runs with its defaults,
and the box it ships (or, when it refuses, the closest attempt's) is measured on the test split with
``protection.py``'s five MLP students. Targets: issue 21's, per cell.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdb_core.protect import CheckConfig, WrapRefused, wrap
from sdb_core.protect.check import teacher_data
from sdb_core.protect.measure import MeasureConfig, measure_students
from sdb_core.protect.sdb import public_report
from sdb_core.train import TrainConfig, seed_everything, train_classifier
from tests.signals import KINDS

FIELDS = ("teacher", "public", "keyed", "labels_only", "kd_teacher", "kd_public", "kd_keyed", "kd_wrong_key")


def one(kind: str, seed: int) -> dict:
    make, net = KINDS[kind]
    data = make()
    seed_everything(seed)
    teacher = net()
    train_classifier(teacher, teacher_data(data, CheckConfig(seed=seed)).train, TrainConfig(epochs=10, lr=0.05, seed=seed))
    teacher.eval()
    t0 = time.perf_counter()
    try:
        result, passed = wrap(teacher, data, check=CheckConfig(seed=seed)), True
    except WrapRefused as e:
        result, passed = e.best, False
    seconds = time.perf_counter() - t0
    check = result.report["check"]
    test = public_report(teacher, result.box, data.test)
    students = measure_students(teacher, result.box, data, MeasureConfig(), seed)
    return {"seed": seed, "teacher": test["teacher_acc"], "public": test["public_acc"], "keyed": test["keyed_acc"],
            **students, "passed": passed, "attempts": len(check["attempts"]), "chosen": check["chosen"],
            "check_figures": check["figures"], "wrap_seconds": round(seconds, 1)}


def targets(m: dict) -> dict:
    """Issue 21's targets on one cell's means."""
    return {"public_acc >= teacher - 1.0": m["public"] >= m["teacher"] - 1.0,
            "keyed_acc >= teacher - 1.5": m["keyed"] >= m["teacher"] - 1.5,
            "kd_public <= labels_only - 2.0": m["kd_public"] <= m["labels_only"] - 2.0,
            "kd_wrong_key <= labels_only": m["kd_wrong_key"] <= m["labels_only"],
            "kd_keyed >= kd_teacher - 0.5": m["kd_keyed"] >= m["kd_teacher"] - 0.5,
            "kd_keyed >= labels_only + 0.5": m["kd_keyed"] >= m["labels_only"] + 0.5}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", default=sorted(KINDS), choices=sorted(KINDS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"seeds": args.seeds, "threads": args.threads, "cells": {}}
    print(f"{'cell':<10}" + "".join(f"{f:>13}" for f in FIELDS) + "  checks passed")
    for kind in args.kinds:
        runs = [one(kind, s) for s in args.seeds]
        mean = {f: statistics.fmean(r[f] for r in runs) for f in FIELDS}
        cell = {"mean": mean, "runs": runs, "targets": targets(mean)}
        out["cells"][kind] = cell
        print(f"{kind:<10}" + "".join(f"{mean[f]:>13.1f}" for f in FIELDS)
              + f"  {sum(r['passed'] for r in runs)}/{len(runs)}")
        for t, ok in cell["targets"].items():
            print(f"  {'met ' if ok else 'MISS'} {t}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
