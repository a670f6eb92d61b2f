"""Does the box protect on every architecture and data set? Teachers x data sets, self-checking wrap; matrix + JSON.

    python benchmarks/protection_matrix.py --workers 8 --json benchmarks/results/protection_matrix.json
    python benchmarks/protection_matrix.py --quick      # cnn and resnet8 on digits, seed 0: the CPU subset
    python benchmarks/protection_matrix.py --via-onnx ...  # each teacher given as the .onnx an owner would bring

Per (teacher, data set, seed): train the teacher on its own schedule (``sdb_core.models.schedules``),
wrap it with the library's default, self-checking ``wrap`` (a refused wrap is measured all the same,
its best attempt, and the cell says so), then train each student architecture five ways on a
1,000-image transfer set as ``benchmarks/protection.py`` does. Each cell's JSON holds the fields of
``protection.py``'s JSON (``students`` is the first student's) plus ``students_by_arch``,
``wrap_seconds``, what the self-check chose per seed and each target per student. ``--audit`` also
runs the leak audit at N = 300 (``benchmarks/audit.py``'s protocol) on the BatchNorm, LayerNorm and
GroupNorm cells of the colour set. ``--workers`` runs (cell, seed) units in parallel processes.

``--audit-only teacher`` runs the audit's other half alone, on those cells: each seed's teacher, trained as above,
audited (no wrap, no students; minutes a seed on the CPU, where a wrap of these takes a quarter of an hour);
``--audit-only both`` wraps too and audits the box, still without the students.

With ``--json OUT`` each unit's result is also appended to ``OUT.units.jsonl`` as it finishes, so that a run
stopped early (a time limit on a lent GPU) keeps what it measured; ``--from-units OUT.units.jsonl --json OUT``
builds the matrix from those (a cell from the seeds it has; the JSON says which units ran).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sdb_core.data import load_dataset
from sdb_core.protect.audit import AuditConfig, audit
from sdb_core.protect.config import CheckConfig
from sdb_core.protect.measure import (
    MeasureConfig,
    measure_students,
    owner_teacher,
    summarize,
    targets,
    train_and_wrap,
)
from sdb_core.train import accuracy, pick_device

TEACHERS = ("cnn", "lenet", "mlp", "resnet8", "resnet20", "wrn16_2", "vit_tiny", "resnet8_gn")
DATASETS = ("mnist-5k", "digits", "mnist-textures")
STUDENTS = ("mlp", "lenet")
COLOUR = "mnist-textures"
AUDITED = {"resnet8": "BatchNorm", "vit_tiny": "LayerNorm", "resnet8_gn": "GroupNorm"}  # on COLOUR
QUICK = {"teachers": ["cnn", "resnet8"], "data": ["digits"], "seeds": [0]}
# The matrix's targets are protection.py's, less the step-time ratio (a property of one machine).
MATRIX_TARGETS = 6
AUDIT_WANTED = {"teacher": "leaks", "protected": "protected"}  # the audit's target verdicts (plain teacher, box)


def run_unit(arch: str, dataset: str, seed: int, students: list[str], threads: int, do_audit: bool,
             via_onnx: bool = False, audit_only: str | None = None, audit_student: str = AuditConfig().student) -> dict:
    """One (teacher, data set, seed): teacher, checked wrap (of its ONNX export, ``via_onnx``), students of every
    architecture, audit. ``audit_only``: the audit alone, of the teacher (``"teacher"``) or of both.
    ``audit_student``: the audit's attacker (default: the protocol's)."""
    torch.set_num_threads(threads)
    log = lambda s: print(f"[{arch} {dataset} {seed}] {s}", flush=True)
    data = load_dataset(dataset)
    t0 = time.perf_counter()
    cfg = replace(AuditConfig(), seeds=(seed,), student=audit_student)
    if audit_only == "teacher":  # the teacher train_and_wrap would wrap
        teacher, th = owner_teacher(data, seed, replace(CheckConfig(), seed=seed, teacher_apart=True), arch=arch,
                                    log=log)
        return {"seed": seed, "teacher_acc": accuracy(teacher, data.test), "teacher_step": th.step_seconds,
                "audit": {"teacher": audit(teacher, data, cfg, log=log).to_dict()},
                "seconds": time.perf_counter() - t0}
    teacher, th, result = train_and_wrap(data, seed, teacher_arch=arch, keep_refused=True, log=log, via_onnx=via_onnx)
    r = result.report
    out = {"seed": seed, "teacher_acc": r["teacher_acc"], "public_acc": r["public_acc"], "keyed_acc": r["keyed_acc"],
           "agreement": r["agreement"], "teacher_step": th.step_seconds, "wrap_step": r["step_seconds"],
           "wrap_total": r["seconds"], "check": _check_summary(r.get("check")), "students_by_arch": {}}
    for s in [] if audit_only else students:
        out["students_by_arch"][s] = measure_students(teacher, result.box, data, MeasureConfig(student=s), seed, log)
    if do_audit:
        out["audit"] = {"teacher": audit(teacher, data, cfg, log=log).to_dict(),
                        "protected": audit(result.box, data, cfg, log=log).to_dict()}
    out["seconds"] = time.perf_counter() - t0
    return out


def _check_summary(check: dict | None) -> dict | None:
    if check is None:
        return None
    return {"passed": check["passed"], "chosen": check["chosen"], "attempts": len(check["attempts"]),
            "figures": check["figures"], "seconds": check["seconds"]}


def cell_summary(arch: str, dataset: str, runs: list[dict], students: list[str]) -> dict:
    if not runs[0].get("students_by_arch"):  # --audit-only
        return audit_cell(arch, dataset, runs)
    by_arch, met = {}, {}
    for s in students:
        summary = summarize(dataset, [{**r, "students": r["students_by_arch"][s]} for r in runs])
        by_arch[s] = summary["students"]
        met[s] = {name: {"met": ok, "measured": fig} for name, ok, fig in targets(summary)[:MATRIX_TARGETS]}
    cell = {"teacher_arch": arch, **summary, "students": by_arch[students[0]], "students_by_arch": by_arch,
            "wrap_seconds": statistics.fmean(r["wrap_total"] for r in runs),
            "check": [{"seed": r["seed"], **(r["check"] or {})} for r in runs],
            "targets": met, "met": all(t["met"] for m in met.values() for t in m.values())}
    if all("audit" in r for r in runs):
        cell["audit"] = audit_summary(runs)
    return cell


def audit_summary(runs: list[dict]) -> dict:
    """The audits of a cell's seeds: one verdict per audited model over the seeds' means (``benchmarks/audit.py``),
    and whether the targets hold (the box ``protected``, the plain teacher ``leaks``) for those audited."""
    from audit import combine  # benchmarks/audit.py

    threshold = AuditConfig().threshold
    out = {who: combine([r["audit"][who] for r in runs], threshold) for who in ("teacher", "protected")
           if who in runs[0]["audit"]}
    out["met"] = all(out[who]["verdict"] == want for who, want in AUDIT_WANTED.items() if who in out)
    return out


def audit_cell(arch: str, dataset: str, runs: list[dict]) -> dict:
    """A cell of ``--audit-only``: the teacher's accuracy, the box's when wrapped, the audits."""
    cell = {"teacher_arch": arch, "dataset": dataset, "seeds": [r["seed"] for r in runs],
            "teacher_acc": statistics.fmean(r["teacher_acc"] for r in runs), "audit": audit_summary(runs),
            "seconds": statistics.fmean(r["seconds"] for r in runs)}
    if "public_acc" in runs[0]:
        cell.update(public_acc=statistics.fmean(r["public_acc"] for r in runs),
                    keyed_acc=statistics.fmean(r["keyed_acc"] for r in runs),
                    wrap_seconds=statistics.fmean(r["wrap_total"] for r in runs))
    cell["met"] = cell["audit"]["met"]
    return cell


def format_audits(cells: list[dict]) -> str:
    """The table of an ``--audit-only`` run: per cell, each audited model's verdict and largest mean advantage."""
    head = (f"{'teacher':10} {'data':15} {'teach':>6} {'seeds':7} {'audited':9} {'verdict':9} {'max adv':>7}  "
            f"{'worst attack':14} {'per seed':24}  target")
    lines = [head, "-" * len(head)]
    for c in cells:
        for who, a in c["audit"].items():
            if who == "met":
                continue
            seeds = ",".join(map(str, c["seeds"]))
            per_seed = " ".join(f"{v:+.1f}" for v in a["worst_per_seed"])
            lines.append(f"{c['teacher_arch']:10} {c['dataset']:15} {c['teacher_acc']:6.1f} {seeds:7} {who:9} "
                         f"{a['verdict']:9} {a['max_advantage']:+7.2f}  {a['worst_attack']:14} {per_seed:24}  "
                         + ("ok" if a["verdict"] == AUDIT_WANTED[who] else f"MISS (wanted {AUDIT_WANTED[who]})"))
    lines.append(f"\n{sum(c['met'] for c in cells)} of {len(cells)} cells meet the audit's targets "
                 f"(threshold {AuditConfig().threshold} points of advantage over the best labels-only student)")
    return "\n".join(lines)


def format_matrix(cells: list[dict]) -> str:
    if cells and "students_by_arch" not in cells[0]:
        return format_audits(cells)
    head = (f"{'teacher':10} {'data':15} {'teach':>6} {'public':>6} {'keyed':>6} {'student':7} {'labels':>6} "
            f"{'kd_pub':>6} {'kd_wk':>6} {'kd_tea':>6} {'kd_key':>6} {'check':>9} {'wrap s':>7}  targets")
    lines = [head, "-" * len(head)]
    for c in cells:
        checks = "".join("y" if k.get("passed") else "n" for k in c["check"])
        for i, (s, st) in enumerate(c["students_by_arch"].items()):
            m = {k: v["mean"] for k, v in st.items()}
            missed = [n for n, t in c["targets"][s].items() if not t["met"]]
            row = (f"{c['teacher_arch']:10} {c['dataset']:15} {c['teacher']['acc']:6.1f} "
                   f"{c['protected']['public_acc']:6.1f} {c['protected']['keyed_acc']:6.1f}" if i == 0
                   else f"{'':10} {'':15} {'':6} {'':6} {'':6}")
            row += (f" {s:7} {m['labels_only']:6.1f} {m['kd_public']:6.1f} {m['kd_wrong_key']:6.1f} "
                    f"{m['kd_teacher']:6.1f} {m['kd_keyed']:6.1f} "
                    + (f"{checks:>9} {c['wrap_seconds']:7.0f}" if i == 0 else f"{'':9} {'':7}")
                    + "  " + ("ok" if not missed else "MISS " + "; ".join(missed)))
            lines.append(row)
        if "audit" in c:
            a = c["audit"]
            lines.append(f"{'':10} leak audit N=300: teacher {a['teacher']['verdict']} "
                         f"({a['teacher']['max_advantage']:+.2f}), box {a['protected']['verdict']} "
                         f"({a['protected']['max_advantage']:+.2f})")
    met = sum(c["met"] and c.get("audit", {}).get("met", True) for c in cells)
    lines.append(f"\n{met} of {len(cells)} cells meet every target")
    return "\n".join(lines)


def run_units(units: list[tuple], workers: int, log_to: Path | None) -> list[dict]:
    """Each unit's result, in the units' order; each also appended to ``log_to`` (JSON lines) as it finishes."""
    if log_to is not None:
        log_to.parent.mkdir(parents=True, exist_ok=True)
        log_to.write_text("")

    def keep(unit: tuple, result: dict) -> dict:
        if log_to is not None:
            with log_to.open("a") as f:
                f.write(json.dumps({"unit": list(unit[:3]), "result": result}) + "\n")
        return result

    if workers <= 1:
        return [keep(u, run_unit(*u)) for u in units]
    import multiprocessing as mp

    results: dict[int, dict] = {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_unit, *u): i for i, u in enumerate(units)}
        for f in as_completed(futures):
            i = futures[f]
            results[i] = keep(units[i], f.result())
    return [results[i] for i in range(len(units))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS))
    p.add_argument("--data", nargs="+", default=list(DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--students", nargs="+", default=list(STUDENTS))
    p.add_argument("--quick", action="store_true", help="cnn and resnet8 on digits, seed 0 (< 10 min on 2 CPU cores)")
    p.add_argument("--audit", action="store_true", help=f"leak audit on the {'/'.join(AUDITED.values())} cells "
                   f"of {COLOUR}")
    p.add_argument("--audit-only", choices=("teacher", "both"), help="the audit alone, on the cells --audit audits: "
                   "of each seed's plain teacher (no wrap), or of it and its box (no students)")
    p.add_argument("--audit-student", default=AuditConfig().student,
                   help="the audit's attacker architecture (default: the protocol's, %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="(cell, seed) units run in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--via-onnx", action="store_true", help="wrap each teacher as an owner with an .onnx of it would: "
                   "its graph run and fine-tuned in torch (sdb_core.onnx_torch)")
    p.add_argument("--json", help="write the matrix here (and each unit, as it finishes, to JSON.units.jsonl)")
    p.add_argument("--from-units", help="build the matrix from a run's units file instead of running")
    args = p.parse_args()
    if args.quick:
        args.teachers, args.data, args.seeds = QUICK["teachers"], QUICK["data"], QUICK["seeds"]
    t0 = time.perf_counter()
    if args.from_units:
        done = [json.loads(line) for line in Path(args.from_units).read_text().splitlines() if line.strip()]
        units = [tuple(d["unit"]) for d in done]
        results = [d["result"] for d in done]
        args.teachers = list(dict.fromkeys(u[0] for u in units))
        args.data = list(dict.fromkeys(u[1] for u in units))
        args.seeds = sorted({u[2] for u in units})
        args.students = list(done[0]["result"].get("students_by_arch") or args.students) if done else args.students
    else:
        if args.audit_only:  # only the audited cells
            args.audit, args.teachers, args.data = True, [a for a in args.teachers if a in AUDITED], [COLOUR]
        units = [(a, d, s, args.students, args.threads, args.audit and d == COLOUR and a in AUDITED, args.via_onnx,
                  args.audit_only, args.audit_student) for a in args.teachers for d in args.data for s in args.seeds]
        results = run_units(units, args.workers, Path(f"{args.json}.units.jsonl") if args.json else None)
    cells = []
    for a in args.teachers:
        for d in args.data:
            runs = [r for u, r in zip(units, results, strict=True) if u[0] == a and u[1] == d]
            if runs:
                cells.append(cell_summary(a, d, runs, args.students))
    seconds = time.perf_counter() - t0
    print()
    print(format_matrix(cells))
    print(f"{seconds:.0f} s, {args.workers} worker(s) x {args.threads} thread(s), "
          f"device {pick_device('auto')}")
    if args.json:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        out = {"cells": cells, "seeds": args.seeds, "students": args.students, "seconds": seconds,
               "device": device, "workers": args.workers, "threads": args.threads, "quick": args.quick,
               "via_onnx": args.via_onnx, "audit_student": args.audit_student, "units": [list(u[:3]) for u in units],
               "runs": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
