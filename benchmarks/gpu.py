"""CPU against GPU: the test suites on CUDA, and the wall time of every recipe on each device.

One run times each recipe on one device (``--device auto|cpu|cuda``) at small but representative
settings, and with ``--tests`` runs the core and the service/client test suites there first (their
pass/fail/error counts); ``--merge`` joins a CPU run and a GPU run into the results file and prints the
table. CPU times come from the reference machine, GPU times from the device run:

    python benchmarks/gpu.py --device cpu --json cpu.json                  # the CPU machine: timings
    python benchmarks/gpu.py --device cuda --tests core,service --json gpu.json   # the GPU machine
    python benchmarks/gpu.py --merge cpu.json gpu.json --json benchmarks/results/gpu.json

``--tiny`` runs every recipe at toy sizes (seconds on a CPU: tests/benchmarks/test_gpu_bench.py);
``--recipes`` picks some. Timed is the recipe alone (data, teachers and images are made first, untimed);
on CUDA each time ends after ``torch.cuda.synchronize()``. ``--device cpu`` hides CUDA from the whole
process, so that the ``auto`` device of every config the recipes build means the CPU.

One run's JSON: {"device", "device_name", "torch", "tiny", "tests": {SUITE: {"passed", "failed", "errors",
"seconds", "returncode"}}, "seconds": {RECIPE: s}, "status": {RECIPE: "ok" | "refused" | "error: ..."},
"gpu_mem_mb": {RECIPE: peak MiB}}. Merged: {"tests": {"core": {...}, "service": {...}}, "seconds":
{RECIPE: {"cpu", "gpu"}}, "speedup": {RECIPE: cpu/gpu}, "runs": {"cpu": ..., "gpu": ...}}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("wrap_cnn", "wrap_resnet20", "distill", "okdhp", "afk", "datafree", "branching",
           "style_gatys", "style_fast", "style_adain", "onnx_teacher")
SUITES = {"core": ["tests/core"], "service": ["tests/service", "tests/client"]}
COUNTS = ("passed", "failed", "errors", "skipped", "deselected")


@dataclass(frozen=True)
class Sizes:
    """How big each recipe's run is: ``FULL`` for the measurement, ``TINY`` to try the script."""

    mnist: str = "mnist-5k"          # the cnn wrap and the distill job's data
    textures: str = "mnist-textures"  # the 3x32x32 set of the resnet20 wrap
    teacher_epochs: int = 2
    wrap_epochs: int = 2
    check_epochs: int = 3            # the wrap's self-check students
    check_transfer: int = 1000
    distill_epochs: int = 3
    distill_transfer: int = 2000
    pose_train: int = 400
    pose_test: int = 100
    pose_size: int = 64
    composites: int = 1000
    multilabel_widths: tuple[int, ...] = (16, 32, 64)
    datafree_samples: int = 512
    scenes: int = 200
    style_size: int = 128
    style_steps: int = 20
    style_samples: int = 64
    onnx_steps: int = 50             # training steps through an owner's ONNX teacher
    onnx_batch: int = 64


FULL = Sizes()
TINY = Sizes(mnist="digits", textures="digits", teacher_epochs=1, wrap_epochs=1, check_epochs=1,
             check_transfer=100, distill_epochs=1, distill_transfer=200, pose_train=16, pose_test=8,
             pose_size=32, composites=64, multilabel_widths=(4, 8, 8), datafree_samples=16, scenes=16,
             style_size=32, style_steps=2, style_samples=4, onnx_steps=2, onnx_batch=4)


# --------------------------------------------------------------------------- the recipes
def ok(_result) -> str:
    return "ok"


def _wrap(data: str, arch: str, s: Sizes, device: str, work: Path) -> Callable[[], str]:
    from sdb_core.protect import WrapRefused
    from sdb_core.protect.key import new_master_key
    from sdb_core.tasks.wrap import WrapTask, run

    task = WrapTask.from_options(data, arch, epochs=s.wrap_epochs, check_attempts=1)
    task = replace(task, teacher_epochs=s.teacher_epochs,
                   check=replace(task.check, student_seeds=1, transfer_n=s.check_transfer,
                                 student_train=replace(task.check.student_train, epochs=s.check_epochs,
                                                       device=device)))
    task = task.with_training(device=device)
    key = new_master_key()

    def go() -> str:
        try:
            run(task, work / f"{arch}.sdb", master_key=key)
        except WrapRefused:  # the self-check said no at these small settings: the time is still the wrap's
            return "refused"
        return "ok"

    return go


def _distill(s: Sizes, device: str, work: Path) -> Callable[[], str]:
    from sdb_core.data import load_dataset
    from sdb_core.models import create_model
    from sdb_core.tasks.distill import DistillTask, run
    from sdb_core.tasks.refs import ModelRef
    from sdb_core.train import TrainConfig, train_classifier
    from sdb_core.weights import save_weights

    data = load_dataset(s.mnist)
    teacher = create_model("cnn", num_classes=data.num_classes, in_shape=data.in_shape)
    train_classifier(teacher, data.train, TrainConfig(epochs=s.teacher_epochs, device=device))
    weights = save_weights(teacher, work / "teacher.safetensors")
    teacher_ref = ModelRef(arch="cnn", weights=str(weights))
    task = DistillTask.from_options("cnn", s.mnist, epochs=s.distill_epochs, teacher=teacher_ref,
                                    transfer=min(s.distill_transfer, len(data.train)))
    task = replace(task, distill=replace(task.distill, train=replace(task.distill.train, device=device)))
    return lambda: ok(run(task, work / "student.safetensors", data=data))


def _okdhp(s: Sizes, device: str, work: Path) -> Callable[[], str]:
    from sdb_core.distill.okdhp import okdhp
    from sdb_core.tasks.pose import measured

    base = measured()
    cfg = replace(base, data=replace(base.data, root=str(work / "pose"), n_train=s.pose_train, n_test=s.pose_test,
                                     input_size=s.pose_size),
                  train=replace(base.train, epochs=1, device=device))
    data = cfg.data.load()
    return lambda: ok(okdhp(cfg, data))


def _teachers(s: Sizes, device: str):
    """Two multi-label teachers on digit composites (labels 0-4 and 5-9) and unlabelled transfer images."""
    import torch

    from sdb_core.amalgamate.afk import TeacherSpec
    from sdb_core.amalgamate.multilabel import MultiLabelNet, train_multilabel
    from sdb_core.data.composites import make_composites
    from sdb_core.train import TrainConfig

    x, y = make_composites(s.composites, seed=11)
    specs = []
    for i, (name, labels) in enumerate((("low", [0, 1, 2, 3, 4]), ("high", [5, 6, 7, 8, 9]))):
        torch.manual_seed(i)
        net = MultiLabelNet(1, len(labels), s.multilabel_widths)
        train_multilabel(net, x, y[:, labels], TrainConfig(epochs=s.teacher_epochs, optimizer="adam", lr=3e-3,
                                                           weight_decay=0.0, device=device))
        specs.append(TeacherSpec(name, net.eval(), labels))
    images = torch.from_numpy(make_composites(s.composites, seed=12)[0])
    return specs, images


def _afk(s: Sizes, device: str, work: Path) -> Callable[[], str]:
    from sdb_core.amalgamate.afk import AFKConfig, afk
    from sdb_core.train import TrainConfig

    specs, images = _teachers(s, device)
    cfg = AFKConfig(tasks=[1, 3, 6, 8], layer_epochs=1, finetune_epochs=1, eval_n=min(200, s.composites),
                    relevance_samples=min(256, s.composites),
                    train=TrainConfig(optimizer="adam", lr=3e-3, weight_decay=0.0, batch_size=64, device=device))
    return lambda: ok(afk(cfg, specs, images))


def _datafree(s: Sizes, device: str, work: Path) -> Callable[[], str]:
    from sdb_core.amalgamate.datafree import DataFreeConfig, datafree

    specs, images = _teachers(s, device)
    cfg = DataFreeConfig(target=[1, 3, 6, 8], in_shape=tuple(images.shape[1:]),
                         student_widths=tuple(max(4, w // 2) for w in s.multilabel_widths),
                         gen_samples=s.datafree_samples, student_samples=s.datafree_samples, gen_epochs=1,
                         image_epochs=1, block_epochs=1, finetune_epochs=1, batch_size=min(64, s.datafree_samples),
                         device=device)
    return lambda: ok(datafree(cfg, specs))


def _branching(s: Sizes, device: str, work: Path) -> Callable[[], str]:
    from sdb_core.amalgamate.branching import branching
    from sdb_core.amalgamate.config import BranchingConfig

    size = 64 if s is FULL else 32
    cfg = BranchingConfig(size=size, n_train=s.scenes, n_test=max(8, s.scenes // 4), teacher_epochs=1, epochs=2,
                          scratch=False, device=device)
    return lambda: ok(branching(cfg, log=lambda m: None))


def _style(method: str, s: Sizes, device: str, work: Path) -> Callable[[], str]:
    from sdb_core.style import adain, fast, gatys
    from sdb_core.style.config import AdaINConfig, FastConfig, GatysConfig
    from sdb_core.style.loss_net import build_loss_net

    crop = 32 if s is TINY else 96
    if method == "gatys":
        cfg = GatysConfig(size=s.style_size, steps=s.style_steps, device=device)
        net = build_loss_net(cfg.loss_net)
        return lambda: ok(gatys.stylize(cfg, net=net))
    if method == "fast":
        cfg = FastConfig(size=s.style_size, crop=crop, epochs=1, samples=s.style_samples, device=device)
        net = build_loss_net(cfg.loss_net)
        return lambda: ok(fast.train(cfg, net=net))
    cfg = AdaINConfig(size=s.style_size, crop=crop, epochs=1, samples=s.style_samples, device=device)
    net = build_loss_net(cfg.loss_net)
    return lambda: ok(adain.train(cfg, net=net))


def _onnx_teacher(s: Sizes, device: str, work: Path) -> Callable[[], str]:
    """Training steps through an owner's ONNX classifier as a wrap takes one (``onnx_classifier``: a ViT exported at
    batch 1, ``torch.onnx.export``'s default, read at any). On CUDA no forward or backward may wait for the device
    (``torch.cuda.set_sync_debug_mode("error")``): the graph's stored sizes are numbers on the host."""
    import io

    import torch

    from sdb_core.models import create_model
    from sdb_core.onnx_torch import onnx_classifier

    shape = (3, 32, 32)
    buf = io.BytesIO()
    torch.onnx.export(create_model("vit_tiny", num_classes=10, in_shape=shape).eval(), (torch.randn(1, *shape),), buf,
                      input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False)
    net = onnx_classifier(buf.getvalue(), shape).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn(s.onnx_batch, *shape, device=device)
    cuda = device.startswith("cuda")

    def go() -> str:
        for _ in range(s.onnx_steps):
            opt.zero_grad()
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
            try:
                net(x).logsumexp(1).mean().backward()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
            opt.step()
        return "ok"

    return go


def prepare(recipe: str, s: Sizes, device: str, work: Path) -> Callable[[], str]:
    """Everything the recipe needs, made now (untimed); returns the call to time."""
    if recipe == "wrap_cnn":
        return _wrap(s.mnist, "cnn", s, device, work)
    if recipe == "wrap_resnet20":
        return _wrap(s.textures, "resnet20", s, device, work)
    if recipe.startswith("style_"):
        return _style(recipe.removeprefix("style_"), s, device, work)
    return {"distill": _distill, "okdhp": _okdhp, "afk": _afk, "datafree": _datafree,
            "branching": _branching, "onnx_teacher": _onnx_teacher}[recipe](s, device, work)


def warm_up(device: str) -> None:
    """What only the first recipe would pay otherwise: the CUDA context and libraries, the optimizers' import."""
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2)).to(device)
    opt = torch.optim.Adam(net.parameters())
    net(torch.zeros(2, 1, 8, 8, device=device)).sum().backward()
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_recipes(recipes: list[str], s: Sizes, device: str, log=print) -> tuple[dict, dict, dict]:
    import torch

    cuda = device.startswith("cuda")
    seconds, status, mem = {}, {}, {}
    warm_up(device)
    for recipe in recipes:
        with tempfile.TemporaryDirectory(prefix=f"sdb-gpu-{recipe}-") as tmp:
            try:
                call = prepare(recipe, s, device, Path(tmp))
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                status[recipe] = call()
                if cuda:
                    torch.cuda.synchronize()
                    mem[recipe] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                seconds[recipe] = round(time.perf_counter() - t0, 3)
            except Exception as e:  # noqa: BLE001 - one recipe's failure is its row, the others still run
                status[recipe] = f"error: {type(e).__name__}: {str(e)[:300]}"
        log(f"{recipe:16s} {seconds.get(recipe, float('nan')):9.2f} s  {status[recipe]}")
    return seconds, status, mem


def host_waits(device: str) -> dict:
    """On CUDA: how often a wrap's training waits for the device (CUDA's sync debug mode, counting its warnings)
    in a box of one epoch and of two on digits; the second epoch's extra waits over its steps are the loop's per
    step (sdb_core.train.fit reads back about once a second and at each epoch's end: ~0). Elsewhere: {}."""
    if not device.startswith("cuda"):
        return {}
    import warnings

    import torch

    from sdb_core.data import load_dataset
    from sdb_core.models import create_model
    from sdb_core.protect import SDBConfig, train_box
    from sdb_core.train import TrainConfig, train_classifier

    data = load_dataset("digits")
    teacher = create_model("cnn", num_classes=data.num_classes, in_shape=data.in_shape)
    train_classifier(teacher, data.train, TrainConfig(epochs=1, device=device))
    counts = {}
    for epochs in (1, 2):
        cfg = SDBConfig(train=TrainConfig(epochs=epochs, lr=0.01, batch_size=64, grad_clip=5.0, device=device))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_box(teacher, data, cfg)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[epochs] = sum("synchroniz" in str(w.message) for w in caught)
    steps = math.ceil(len(data.train) / 64)
    return {"steps_per_epoch": steps, "one_epoch": counts[1], "two_epochs": counts[2],
            "per_step": round((counts[2] - counts[1]) / steps, 3)}


# --------------------------------------------------------------------------- the test suites
SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected)")
PROGRESS = re.compile(r"^([.FEsxX]+)(?:\s*\[\s*\d+%\])?\s*$", re.MULTILINE)  # the last line may be cut


def pytest_counts(output: str) -> dict[str, int]:
    """passed/failed/errors/... from pytest's summary line; from its progress marks (``-q``'s dots) when a
    run stopped before printing one."""
    found = dict.fromkeys(COUNTS, 0)
    lines = [ln for ln in output.splitlines() if SUMMARY.search(ln)]
    if lines:
        for n, what in SUMMARY.findall(lines[-1]):
            found["errors" if what.startswith("error") else what] = int(n)
        return found
    marks = "".join(PROGRESS.findall(output))
    found.update(passed=marks.count("."), failed=marks.count("F"), errors=marks.count("E"),
                 skipped=marks.count("s"))
    return found


def run_suite(paths: list[str], extra: list[str], timeout: float, log_file: Path | None) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths, *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        timed_out = True
    if log_file is not None:
        log_file.write_text(out)
    result = {**pytest_counts(out), "seconds": round(time.perf_counter() - t0, 1), "returncode": proc.returncode,
              "command": shlex.join(cmd[1:])}
    if timed_out:
        result["timed_out"] = True
    return result


# --------------------------------------------------------------------------- merge and table
def merge(a: dict, b: dict) -> dict:
    """A CPU run and a GPU run (either order) as the results file's shape."""
    runs = {("gpu" if r["device"].startswith("cuda") else "cpu"): r for r in (a, b)}
    if set(runs) != {"cpu", "gpu"}:
        raise ValueError(f"--merge needs one CPU run and one CUDA run, got {a['device']!r} and {b['device']!r}")
    cpu, gpu = runs["cpu"], runs["gpu"]
    names = [r for r in RECIPES if r in cpu["seconds"] and r in gpu["seconds"]]
    return {
        "tests": {k: {c: v[c] for c in ("passed", "failed", "errors")}
                  for k, v in (gpu.get("tests") or cpu.get("tests") or {}).items()},
        "seconds": {r: {"cpu": cpu["seconds"][r], "gpu": gpu["seconds"][r]} for r in names},
        "speedup": {r: round(cpu["seconds"][r] / gpu["seconds"][r], 2) for r in names if gpu["seconds"][r] > 0},
        "runs": {k: {m: v for m, v in r.items() if m not in ("seconds", "tests")} for k, r in runs.items()},
    }


def table(result: dict) -> str:
    rows = []
    for suite, c in result.get("tests", {}).items():
        rows.append(f"tests {suite:10s} {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
                    f"{c.get('errors', 0)} errors")
    sec = result.get("seconds", {})
    if sec and isinstance(next(iter(sec.values())), dict):
        rows.append(f"{'recipe':16s} {'cpu s':>9s} {'gpu s':>9s} {'speedup':>8s}")
        for r, v in sec.items():
            rows.append(f"{r:16s} {v['cpu']:9.2f} {v['gpu']:9.2f} {result['speedup'].get(r, float('nan')):8.1f}x")
    else:
        rows.append(f"{'recipe':16s} {'seconds':>9s}  ({result.get('device')}: {result.get('device_name')})")
        for r, v in sec.items():
            rows.append(f"{r:16s} {v:9.2f}  {result.get('status', {}).get(r, '')}")
    return "\n".join(rows)


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when there is one)")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES, metavar="RECIPE",
                    help=f"of {', '.join(RECIPES)} (default all; none: tests only)")
    ap.add_argument("--tests", default="", help="comma-separated suites to run first: core, service")
    ap.add_argument("--pytest-args", default="-k 'not postgresql'",
                    help="added to every suite's pytest command (default leaves out the PostgreSQL runs)")
    ap.add_argument("--test-timeout", type=float, default=300.0, help="seconds per suite before it is stopped")
    ap.add_argument("--workers", type=int, default=0, help="pytest-xdist processes per suite (0: none)")
    ap.add_argument("--logs", type=Path, help="write each suite's pytest output here")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: the whole run in seconds, to try the script")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--merge", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"), help="join a CPU and a CUDA run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    if args.merge:
        result = merge(*(json.loads(p.read_text()) for p in args.merge))
    else:
        if args.device == "cpu" and "torch" not in sys.modules:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: every `auto` in the recipes means the CPU too
        import torch

        from sdb_core.train import pick_device

        device = pick_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        result = {"device": str(device), "torch": torch.__version__, "tiny": args.tiny,
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "threads": torch.get_num_threads(), "tests": {}}
        for suite in [t.strip() for t in args.tests.split(",") if t.strip()]:
            if suite not in SUITES:
                ap.error(f"--tests takes {', '.join(SUITES)}, got {suite!r}")
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
            print(f"pytest {suite} on {device} ...", flush=True)
            extra = shlex.split(args.pytest_args) + (["-n", str(args.workers)] if args.workers else [])
            result["tests"][suite] = run_suite(SUITES[suite], extra, args.test_timeout,
                                               args.logs / f"tests_{suite}.txt" if args.logs else None)
            print(f"  {result['tests'][suite]}", flush=True)
        seconds, status, mem = time_recipes(list(args.recipes), TINY if args.tiny else FULL, str(device))
        result.update(seconds=seconds, status=status, gpu_mem_mb=mem)
        try:
            result["host_waits"] = host_waits(str(device))
        except Exception as e:  # noqa: BLE001 - a figure of its own: the timings above stand without it
            result["host_waits"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if result["host_waits"]:
            print(f"host waits for the device in a wrap's training: {result['host_waits']}", flush=True)
    print()
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
