"""Knowledge amalgamation benchmark: AFK (part 1) and task branching (part 2); table + JSON.

    python benchmarks/amalgamation.py --json benchmarks/results/amalgamation.json [--seeds 0 1 2] [--part afk]

Part 1, AFK, per seed: two multi-label teachers (MultiLabelNet 16-32-64) trained with labels on
3,000 2x2 digit composites, one on digits 0-4 and one on 5-9. Then, from 3,000 *other* unlabeled
composites of the training digits and the teachers alone, AFK students for all ten tasks and for
a subset drawn from both teachers (default 1 3 5 7); and the full student's architecture trained
from scratch with the true labels of those same 3,000 images, for as many epochs as AFK runs in
all. Everything is scored on 1,000 test composites (test digits only): mAP in percent, per task
AP, and parameter counts. Figures are means over seeds.

Part 2 (task branching) is ``branching_part``.

JSON: {"afk": {"teachers": {NAME: {"map", "params"}}, "student": {"map", "params"},
"student_subset": {"map", "params"}, "scratch": {"map"}, ...}, "branching": {...}}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdb_core.amalgamate.afk import AFKConfig, FilteredStudent, TeacherSpec, afk
from sdb_core.amalgamate.multilabel import (
    MultiLabelNet,
    count_params,
    mean_average_precision,
    per_label_ap,
    predict_probs,
    train_multilabel,
)
from sdb_core.data.composites import make_composites
from sdb_core.train import TrainConfig

TEACHERS = {"digits0-4": [0, 1, 2, 3, 4], "digits5-9": [5, 6, 7, 8, 9]}
TEACHER_WIDTHS = (16, 32, 64)


def mean(xs) -> float:
    return float(statistics.fmean(xs))


# ---- part 1: AFK --------------------------------------------------------------------------------

def afk_seed(args, seed: int) -> dict:
    train = TrainConfig(optimizer="adam", lr=3e-3, weight_decay=0.0, batch_size=64, seed=seed)
    x, y = make_composites(args.n_train, split="train", seed=seed)
    # The students' unlabeled images are other composites of the training digits; the test set
    # is composites of the test digits, the same for every model of this seed.
    data_seed = seed + 1000
    xs, ys = make_composites(args.n_transfer, split="train", seed=data_seed)
    xt, yt = make_composites(args.n_test, split="test", seed=data_seed)
    xt_t = torch.from_numpy(xt)
    run: dict = {"seed": seed, "teachers": {}}
    teachers = []
    t0 = time.perf_counter()
    for name, labels in TEACHERS.items():
        torch.manual_seed(seed)
        net = MultiLabelNet(1, len(labels), TEACHER_WIDTHS)
        train_multilabel(net, x, y[:, labels], replace(train, epochs=args.teacher_epochs))
        s = predict_probs(net, xt_t).numpy()
        run["teachers"][name] = {"map": mean_average_precision(s, yt[:, labels]), "params": count_params(net),
                                 "ap": dict(zip(labels, per_label_ap(s, yt[:, labels]).tolist()))}
        teachers.append(TeacherSpec(name, net.eval(), labels))
    run["seconds_teachers"] = time.perf_counter() - t0

    def student(tasks: list[int]) -> dict:
        t1 = time.perf_counter()
        cfg = AFKConfig(tasks=tasks, data_seed=data_seed, layer_epochs=args.layer_epochs,
                        finetune_epochs=args.finetune_epochs, eval_n=args.n_test, train=train)
        res = afk(cfg, teachers, torch.from_numpy(xs))
        return {"tasks": tasks, "map": res.map, "params": res.params, "widths": list(res.student.widths),
                "ap": res.ap, "teacher_map": res.teacher_map, "teacher_ap": res.teacher_ap,
                "active_channels": res.active_channels, "seconds": time.perf_counter() - t1}

    full_tasks = sorted(k for labels in TEACHERS.values() for k in labels)
    run["student"] = student(full_tasks)
    run["student_subset"] = student(list(args.subset))
    # The full student's score on the subset's tasks, for the subset comparison.
    run["student"]["map_on_subset"] = float(np.mean([run["student"]["ap"][k] for k in args.subset]))

    if args.ablation:
        # What the layer-wise stage buys: the same student, the same epochs, end-to-end KD only.
        t1 = time.perf_counter()
        total = args.layer_epochs * len(TEACHER_WIDTHS) + args.finetune_epochs
        res = afk(AFKConfig(tasks=full_tasks, data_seed=data_seed, layer_epochs=0, finetune_epochs=total,
                            eval_n=args.n_test, train=train), teachers, torch.from_numpy(xs))
        run["kd_only"] = {"map": res.map, "params": res.params, "epochs": total,
                          "seconds": time.perf_counter() - t1}

    t1 = time.perf_counter()
    torch.manual_seed(seed)
    scratch = FilteredStudent(1, full_tasks, run["student"]["widths"])
    epochs = args.layer_epochs * len(TEACHER_WIDTHS) + args.finetune_epochs
    train_multilabel(scratch, xs, ys[:, full_tasks], replace(train, epochs=epochs))
    s = predict_probs(scratch, xt_t).numpy()
    run["scratch"] = {"map": mean_average_precision(s, yt[:, full_tasks]), "params": count_params(scratch),
                      "ap": dict(zip(full_tasks, per_label_ap(s, yt[:, full_tasks]).tolist())),
                      "epochs": epochs, "seconds": time.perf_counter() - t1}
    return run


def _mean_ap(runs: list[dict], key: str, field: str = "ap") -> dict[int, float]:
    tasks = runs[0][key][field].keys()
    return {k: mean(r[key][field][k] for r in runs) for k in tasks}


def afk_summary(args, runs: list[dict]) -> dict:
    teacher_params = {n: runs[0]["teachers"][n]["params"] for n in TEACHERS}
    out = {
        "teachers": {n: {"map": mean(r["teachers"][n]["map"] for r in runs), "params": teacher_params[n],
                         "tasks": TEACHERS[n]} for n in TEACHERS},
    }
    for key in ("student", "student_subset"):
        ap, tap = _mean_ap(runs, key), _mean_ap(runs, key, "teacher_ap")
        out[key] = {"map": mean(r[key]["map"] for r in runs), "params": runs[0][key]["params"],
                    "tasks": runs[0][key]["tasks"], "widths": runs[0][key]["widths"],
                    "teacher_map": mean(r[key]["teacher_map"] for r in runs),
                    "ap": {str(k): v for k, v in ap.items()}, "teacher_ap": {str(k): v for k, v in tap.items()},
                    "worst_task_gap": min(ap[k] - tap[k] for k in ap)}
    out["student"]["map_on_subset"] = mean(r["student"]["map_on_subset"] for r in runs)
    out["scratch"] = {"map": mean(r["scratch"]["map"] for r in runs), "params": runs[0]["scratch"]["params"],
                      "epochs": runs[0]["scratch"]["epochs"]}
    if "kd_only" in runs[0]:
        out["kd_only"] = {"map": mean(r["kd_only"]["map"] for r in runs), "epochs": runs[0]["kd_only"]["epochs"]}
    total = sum(teacher_params.values())
    st, sub = out["student"], out["student_subset"]
    out["targets"] = {
        "student_per_task_within_1": st["worst_task_gap"] >= -1.0,
        "student_fewer_params_than_teachers": st["params"] < total,
        "subset_per_task_within_1": sub["worst_task_gap"] >= -1.0,
        "subset_smaller_than_full": sub["params"] < st["params"],
        "subset_at_least_as_accurate_on_subset": sub["map"] >= st["map_on_subset"],
    }
    out["settings"] = {"n_train": args.n_train, "n_transfer": args.n_transfer, "n_test": args.n_test,
                       "teacher_epochs": args.teacher_epochs, "layer_epochs": args.layer_epochs,
                       "finetune_epochs": args.finetune_epochs, "teacher_widths": list(TEACHER_WIDTHS),
                       "subset": list(args.subset), "seeds": list(args.seeds)}
    out["runs"] = runs
    return out


def afk_part(args) -> dict:
    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        runs.append(afk_seed(args, seed))
        r = runs[-1]
        shown = ", ".join(f"{n} {v['map']:.2f}" for n, v in r["teachers"].items())
        print(f"[afk seed {seed}] teachers {shown}; "
              f"student {r['student']['map']:.2f} (teachers {r['student']['teacher_map']:.2f}); subset "
              f"{r['student_subset']['map']:.2f} (full on subset {r['student']['map_on_subset']:.2f}, teachers "
              f"{r['student_subset']['teacher_map']:.2f}); scratch {r['scratch']['map']:.2f}; "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return afk_summary(args, runs)


def afk_table(s: dict) -> str:
    total = sum(t["params"] for t in s["teachers"].values())
    rows = [("model", "tasks", "mAP", "teachers' mAP on its tasks", "params")]
    for n, t in s["teachers"].items():
        rows.append((f"teacher {n}", " ".join(map(str, t["tasks"])), f"{t['map']:.2f}", "", str(t["params"])))
    for key, label in (("student", "AFK student"), ("student_subset", "AFK student (subset)")):
        st = s[key]
        rows.append((label, " ".join(map(str, st["tasks"])), f"{st['map']:.2f}", f"{st['teacher_map']:.2f}",
                     str(st["params"])))
    rows.append(("AFK student, on the subset", " ".join(map(str, s["student_subset"]["tasks"])),
                 f"{s['student']['map_on_subset']:.2f}", f"{s['student_subset']['teacher_map']:.2f}",
                 str(s["student"]["params"])))
    if "kd_only" in s:
        rows.append(("ablation: end-to-end KD only", "0-9", f"{s['kd_only']['map']:.2f}",
                     f"{s['student']['teacher_map']:.2f}", str(s["student"]["params"])))
    rows.append(("scratch (labels)", "0-9", f"{s['scratch']['map']:.2f}", f"{s['student']['teacher_map']:.2f}",
                 str(s["scratch"]["params"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"teachers together: {total} params; worst per-task gap student - teacher: full "
                 f"{s['student']['worst_task_gap']:+.2f}, subset {s['student_subset']['worst_task_gap']:+.2f}")
    lines += [f"target {k}: {'met' if v else 'MISSED'}" for k, v in s["targets"].items()]
    return "\n".join(lines)


# ---- part 2: task branching ---------------------------------------------------------------------

def branching_seed(seed: int) -> dict:
    """One seed: scenes, the two teachers (labels), the branched student (teachers only), scratch (labels)."""
    from sdb_core.amalgamate.branching import BranchingConfig, branching

    cfg = BranchingConfig(seed=seed)
    r = branching(cfg, log=lambda m: None)
    return {"seg_teacher": r.teachers["seg"], "depth_teacher": r.teachers["depth"], "student": r.student,
            "scratch": r.scratch, "branch_points": r.branch_points, "search_losses": r.search_losses,
            "teacher_params": r.teacher_params, "seconds": r.seconds}


def branching_part(args) -> dict | None:
    """Task branching (Student Becoming the Master) on 64x64 synthetic scenes, means over seeds.

    Per seed: 600 labelled scenes train a segmentation and a depth teacher (EncDec 8-16-32, one
    conv per stage, 6 epochs); the student (same widths) learns from the same images and the
    teachers alone for 10 epochs, the first 5 sampling branch points (after enc3, dec2 or dec1)
    per task; the scratch baseline is the student's encoder-decoder with both heads, trained with
    the labels for 10 epochs. All are scored on 200 unseen scenes against their exact labels.
    """
    runs = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        r = runs[seed] = branching_seed(seed)
        print(f"[branching seed {seed}] seg teacher {r['seg_teacher']['miou']:.2f} mIoU, depth teacher "
              f"{r['depth_teacher']['rmse']:.4f} RMSE; student {r['student']['miou']:.2f} / "
              f"{r['student']['rmse']:.4f} (branch {r['branch_points']}); scratch {r['scratch']['miou']:.2f} / "
              f"{r['scratch']['rmse']:.4f}; {time.perf_counter() - t0:.0f} s", flush=True)

    def avg(who: str, key: str) -> float:
        return mean(r[who][key] for r in runs.values())

    first = next(iter(runs.values()))
    out = {
        "seg_teacher": {"miou": avg("seg_teacher", "miou"), "params": first["seg_teacher"]["params"]},
        "depth_teacher": {"rmse": avg("depth_teacher", "rmse"), "abs_rel": avg("depth_teacher", "abs_rel"),
                          "params": first["depth_teacher"]["params"]},
        "student": {"miou": avg("student", "miou"), "rmse": avg("student", "rmse"),
                    "abs_rel": avg("student", "abs_rel"), "params": mean(r["student"]["params"] for r in runs.values()),
                    "branch_points": {s: r["branch_points"] for s, r in runs.items()}},
        "scratch": {"miou": avg("scratch", "miou"), "rmse": avg("scratch", "rmse"),
                    "abs_rel": avg("scratch", "abs_rel"), "params": first["scratch"]["params"]},
        "teacher_params": first["teacher_params"],
        "seeds": list(args.seeds),
    }
    out["targets"] = {
        "student miou >= seg teacher - 1.0": out["student"]["miou"] >= out["seg_teacher"]["miou"] - 1.0,
        "student rmse <= depth teacher x 1.05": out["student"]["rmse"] <= 1.05 * out["depth_teacher"]["rmse"],
        "student params < teachers together": all(r["student"]["params"] < r["teacher_params"]
                                                  for r in runs.values()),
    }
    out["runs"] = runs
    return out


def branching_table(s: dict) -> str:
    rows = [("model", "mIoU %", "depth RMSE", "abs rel", "params")]
    rows.append(("seg teacher", f"{s['seg_teacher']['miou']:.2f}", "", "", str(s["seg_teacher"]["params"])))
    rows.append(("depth teacher", "", f"{s['depth_teacher']['rmse']:.4f}", f"{s['depth_teacher']['abs_rel']:.4f}",
                 str(s["depth_teacher"]["params"])))
    for key, label in (("student", "branched student (no labels)"), ("scratch", "multi-task, scratch (labels)")):
        m = s[key]
        rows.append((label, f"{m['miou']:.2f}", f"{m['rmse']:.4f}", f"{m['abs_rel']:.4f}", f"{m['params']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"teachers together: {s['teacher_params']} params; means over seeds {s['seeds']}")
    lines += [f"branch points, seed {seed}: " + ", ".join(f"{t} after {p}" for t, p in bp.items())
              for seed, bp in s["student"]["branch_points"].items()]
    lines += [f"target {k}: {'met' if v else 'MISSED'}" for k, v in s["targets"].items()]
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "afk", "branching"), default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-train", type=int, default=3000, help="AFK: labelled composites per teacher")
    p.add_argument("--n-transfer", type=int, default=3000, help="AFK: unlabeled composites for the students")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--layer-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=6)
    p.add_argument("--ablation", action="store_true",
                   help="AFK: also the full student trained by end-to-end KD only, same epochs (no layer-wise stage)")
    p.add_argument("--subset", type=int, nargs="+", default=[1, 3, 5, 7], help="AFK: the customised task subset")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # Each part is stored with its own timing, and --json merges into an existing file: the
    # parts can be run (and re-run) separately without losing the other's figures.
    out: dict = {}
    if args.json and Path(args.json).is_file():
        out = json.loads(Path(args.json).read_text())
    parts = {"afk": (afk_part, afk_table), "branching": (branching_part, branching_table)}
    for name, (run, table) in parts.items():
        if args.part not in ("all", name):
            continue
        load, t0 = list(os.getloadavg()), time.perf_counter()
        result = run(args)
        if result is None:
            continue
        result["timing"] = {"seconds": time.perf_counter() - t0, "threads": args.threads,
                            "load_average_start": load, "load_average_end": list(os.getloadavg())}
        out[name] = result
        print(table(result))
        print(f"{name}: {result['timing']['seconds']:.0f} s, load average {load} -> {result['timing']['load_average_end']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
