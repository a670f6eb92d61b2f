"""The ``sdb`` command line. Each command builds the same config dataclasses the jobs
and tests use and calls the same recipe functions; this file only parses and prints."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from sdb_core.transfer import DEFAULT_PROBE

from .pipelines import WrapSpec
from .settings import Settings


def _err(msg: str) -> None:
    print(f"sdb: error: {msg}", file=sys.stderr)


def _progress_bar(desc: str):
    """A tqdm bar on stderr fed by the training loop's progress callback."""
    from tqdm import tqdm

    bars: list = []  # one bar per fit: a self-checking wrap fits once per attempt

    def update(p) -> None:
        if not bars:
            bars.append(tqdm(total=1000, desc=desc, file=sys.stderr, leave=False, disable=None,
                             bar_format="{desc} {percentage:3.0f}%|{bar:24}| {elapsed}<{remaining} {postfix}"))
        bar = bars[0]
        attempt = f" attempt {p.metrics['attempt']}" if "attempt" in p.metrics else ""
        bar.set_description_str(f"{desc}{attempt} epoch {p.epoch}/{p.epochs}")
        bar.set_postfix_str(" ".join(f"{k}={v:.3f}" for k, v in list(p.metrics.items())[:3] if k != "attempt"))
        bar.n = int(p.fraction * 1000)
        bar.refresh()
        if p.fraction >= 1.0 or (p.epoch == p.epochs and p.step == p.steps):
            bars.pop().close()

    return update


def _settings(args) -> Settings:
    return Settings(**({"data_dir": Path(args.data_dir)} if getattr(args, "data_dir", None) else {}))


# --------------------------------------------------------------------------- wrap
def cmd_wrap(args) -> int:
    from sdb_core.protect import WrapRefused

    from .pipelines import WrapSpec, wrap_to_bundle

    spec = WrapSpec(data=args.data, arch=args.arch, out=args.out, name=args.name, teacher=args.teacher,
                    teacher_epochs=args.teacher_epochs, save_teacher=args.save_teacher, mode=args.mode,
                    lam=args.lam, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                    max_accuracy_drop=args.max_accuracy_drop, max_keyed_drop=args.max_keyed_drop,
                    min_leak_margin=args.min_leak_margin, check_attempts=args.check_attempts,
                    check_budget=args.check_budget)
    try:
        outcome = wrap_to_bundle(spec, _settings(args).master_key, phase=_progress_bar,
                                 log=lambda s: print(s, file=sys.stderr))
    except WrapRefused as e:
        _err(f"refused, no bundle written: {e}")
        return 3
    for k, v in outcome.metrics.items():
        print(f"{k:12s} {v:6.2f}%")
    print(f"wrapped in {outcome.report['seconds']:.1f}s; bundle written to {outcome.bundle}")
    return 0


# --------------------------------------------------------------------------- distill
def _remote_teacher(args):
    """The keyed path of a model on a remote SDB server, through the SDK's RemoteTeacher."""
    from sdb_client import Client, RemoteTeacher

    if not args.model:
        raise ValueError("--remote needs --model NAME (the served model to distill)")
    client = Client(args.remote, args.api_key)  # no --api-key: SDB_API_KEY
    if not client.has_key:
        raise ValueError("--remote needs an API key with the distill scope: --api-key or env SDB_API_KEY")
    info = client.model(args.model)  # fail before training on a wrong name or a Nasty-mode model
    if not info.get("distillable", True):
        raise ValueError(f"model {args.model!r} on {client.base_url} has no keyed path (Nasty mode)")
    return RemoteTeacher(client, args.model, temperature=args.temperature)


def cmd_distill(args) -> int:
    from sdb_core.data import load_dataset
    from sdb_core.weights import save_weights

    from .pipelines import DistillSpec, bundle_teacher, distill_student, weights_teacher

    data = load_dataset(args.data)
    if args.remote:
        from sdb_client import SDBError

        try:
            teacher = _remote_teacher(args)
        except SDBError as e:  # malformed key or URL (a ValueError), unreachable, 401/403/404
            _err(f"remote teacher: {e}")
            return 2
        source = f"remote model {args.model} at {teacher.client.base_url} (keyed path)"
    elif args.bundle:
        teacher = bundle_teacher(args.bundle, _settings(args).master_key if args.authorized else None,
                                 args.authorized)
        source = f"bundle {args.bundle} ({'keyed path' if args.authorized else 'public outputs'})"
    elif args.teacher:
        teacher = weights_teacher(args.teacher, args.teacher_arch, data)
        source = f"teacher {args.teacher}"
    else:
        teacher, source = None, "labels only"
    spec = DistillSpec(student=args.student, data=args.data, transfer=args.transfer,
                       temperature=args.temperature, alpha=args.alpha, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, seed=args.seed)
    try:
        outcome = distill_student(spec, teacher, data=data, phase=_progress_bar)
    except Exception as e:
        if not args.remote or not type(e).__module__.startswith("sdb_client"):
            raise
        _err(f"remote teacher: {e}")  # e.g. the key's quota ran out mid-way
        return 2
    finally:
        if args.remote:
            teacher.close()
            teacher.client.close()
    save_weights(outcome.student, args.out)
    print(f"student {args.student} from {source} on {outcome.transfer_size} images: "
          f"test accuracy {outcome.accuracy:.2f}%")
    print(f"saved to {args.out}")
    return 0


# --------------------------------------------------------------------------- audit
def cmd_audit(args) -> int:
    """Attack the public outputs of a bundle or a plain model; print the table, write the report."""
    import torch

    from sdb_core.data import load_dataset
    from sdb_core.protect.audit import AuditConfig, audit

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    if args.bundle:
        from sdb_core.bundle import load_bundle

        options = None
        if args.threads:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
        # No master key: the public path is all an attacker has.
        target = load_bundle(args.bundle, session_options=options)
        if list(target.meta["input"]["shape"]) != list(data.in_shape):
            raise ValueError(f"bundle input shape {target.meta['input']['shape']} does not match "
                             f"{args.data}'s {list(data.in_shape)}")
    else:
        from sdb_core.models import create_model
        from sdb_core.weights import load_weights

        if not args.arch:
            raise ValueError("--teacher needs --arch (the architecture of the weights)")
        target = load_weights(create_model(args.arch, num_classes=data.num_classes, in_shape=data.in_shape),
                              args.teacher)
    base = AuditConfig()
    cfg = AuditConfig(transfer_n=args.transfer, student=args.student, policy=args.policy, top_k=args.top_k,
                      keys=args.keys, threshold=args.threshold, seeds=tuple(args.seeds), steps=args.steps,
                      train=replace(base.train, lr=args.lr))
    report = audit(target, data, cfg, progress=_progress_bar("audit: student"))
    print(report.format_table())
    paths = report.save(args.out)
    print(f"\nreport {paths['report']}\nchart  {paths['chart']}")
    return 1 if args.fail_on_leak and report.verdict == "leaks" else 0


def _add_audit_command(sub) -> None:
    from sdb_core.protect.audit import POLICIES, AuditConfig

    base = AuditConfig()
    a = sub.add_parser("audit", help="measure how much a model's public outputs teach a distiller")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", metavar="PATH", help="a bundle (its public path only; no master key is used)")
    src.add_argument("--teacher", metavar="WEIGHTS", help="a plain model's weights (with --arch)")
    a.add_argument("--arch", help="with --teacher: its architecture")
    a.add_argument("--data", required=True, help="dataset: the transfer images and the test split")
    a.add_argument("--policy", choices=POLICIES, default=base.policy, help="what the public API returns")
    a.add_argument("--top-k", type=int, default=base.top_k, help="k of the top_k policy")
    a.add_argument("--out", default="audit", help="directory for report.json, table.txt, advantages.png")
    a.add_argument("--transfer", type=int, default=base.transfer_n, help="attacker's transfer-set size N")
    a.add_argument("--student", default=base.student, help="attacker's student architecture")
    a.add_argument("--steps", type=int, default=base.steps, help="optimisation steps per student")
    a.add_argument("--lr", type=float, default=base.train.lr)
    a.add_argument("--keys", type=int, default=base.keys, help="random keys the attacker blends in (boxes)")
    a.add_argument("--threshold", type=float, default=base.threshold, help="advantage (points) that is a leak")
    a.add_argument("--seeds", type=int, nargs="+", default=list(base.seeds))
    a.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a.add_argument("--fail-on-leak", action="store_true", help="exit 1 when the verdict is `leaks`")
    a.set_defaults(fn=cmd_audit)


# --------------------------------------------------------------------------- transfer
def _transfer_model(spec: str, in_shape):
    """``PATH`` of a bundle (dir or .sdb), or ``ARCH:NUM_CLASSES:WEIGHTS`` of a plain model."""
    from sdb_core.bundle import read_bundle_files

    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = Path(spec).stem, spec
    parts = rest.split(":", 2)
    if len(parts) == 3 and parts[1].isdigit():
        from sdb_core.models import create_model
        from sdb_core.weights import load_weights

        return name, load_weights(create_model(parts[0], num_classes=int(parts[1]), in_shape=tuple(in_shape)), parts[2])
    from sdb_core.transfer.onnx_graph import bundle_module

    read_bundle_files(rest)  # a clear error for a missing path
    module, meta = bundle_module(rest)
    if list(meta["input"]["shape"]) != list(in_shape):
        raise ValueError(f"{rest} takes {meta['input']['shape']}, the probe images are {list(in_shape)}")
    return name, module


def cmd_transfer_rank(args) -> int:
    """Rank source models for a target (a model, or a labelled data set: a weak model is trained)."""
    import torch

    from sdb_core.data import load_dataset, transfer_split
    from sdb_core.train import TrainConfig
    from sdb_core.transfer.depara import DeparaConfig, rank_transferability
    from sdb_core.transfer.plots import plot_similarity
    from sdb_core.transfer.zoo import train_task_model

    if args.threads:
        torch.set_num_threads(args.threads)
    probe_set = load_dataset(args.probe_data or args.target_data)
    x = probe_set.test.tensors[0]
    probe = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:args.probe]]
    sources = dict(_transfer_model(s, probe_set.in_shape) for s in args.source)
    if args.target:
        _, target = _transfer_model(args.target, probe_set.in_shape)
        target_layer = args.target_layer
    else:
        data = load_dataset(args.target_data)
        train = transfer_split(data, min(args.target_train, len(data.train)), args.seed)
        target = train_task_model("target", train, TrainConfig(epochs=args.target_epochs, lr=2e-3, optimizer="adam",
                                                               weight_decay=0.0, seed=args.seed),
                                  kind="cls", outputs=data.num_classes, progress=_progress_bar("weak target"))
        target_layer = "encoder.4"
    cfg = DeparaConfig(method=args.method, seed=args.seed, **({} if args.lam is None else {"lam": args.lam}))
    result = rank_transferability(cfg, target, sources, probe, target_layer=target_layer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2))
    plot_similarity(result.names, result.matrix, out / "similarity.png")
    for i, name in enumerate(result.ranking.order, 1):
        print(f"{i:2d}. {name:24s} S={result.ranking.scores[name]:.4f}")
    print(f"report {out / 'report.json'}")
    return 0


def _add_transfer_command(sub) -> None:
    t = sub.add_parser("transfer", help="transferability: which pre-trained model to transfer from (DEPARA)")
    ts = t.add_subparsers(dest="transfer_command", required=True, metavar="ACTION")
    r = ts.add_parser("rank", help="rank source models for a target by attribution-graph similarity")
    r.add_argument("--source", action="append", required=True, metavar="[NAME=]MODEL",
                   help="a bundle path, or ARCH:NUM_CLASSES:WEIGHTS (repeat for each source)")
    tg = r.add_mutually_exclusive_group(required=True)
    tg.add_argument("--target", metavar="MODEL", help="the target model (same forms as --source)")
    tg.add_argument("--target-data", help="a labelled data set: a weak target model is trained on it first")
    r.add_argument("--target-layer", help="with --target: the layer to compare at (default: the output)")
    r.add_argument("--probe-data", help="probe images (default: --target-data)")
    r.add_argument("--probe", type=int, default=DEFAULT_PROBE, help="probe images (default: %(default)s)")
    r.add_argument("--target-train", type=int, default=500)
    r.add_argument("--target-epochs", type=int, default=3)
    r.add_argument("--method", choices=["depara", "depara_v", "depara_e", "rsa", "random"], default="depara")
    r.add_argument("--lam", type=float, help="lambda of S = S_V + lambda S_E (default: DeparaConfig's)")
    r.add_argument("--out", default="transfer", help="directory for report.json and similarity.png")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    r.set_defaults(fn=cmd_transfer_rank)


# --------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    """Wrap the demo model on the embedded MNIST digits and print the protection table."""
    from sdb_core.bundle import export_bundle
    from sdb_core.data import load_dataset
    from sdb_core.protect import SDBConfig, WrapRefused
    from sdb_core.protect.measure import MeasureConfig, format_table, run_protection, summarize
    from sdb_core.train import TrainConfig

    log = lambda s: print(s, file=sys.stderr, flush=True)
    data = load_dataset(args.data)
    log(f"demo: {args.data}, {len(data.train)} training / {len(data.test)} test images; "
        "teacher small CNN, students MLP on 1,000 transfer images")
    try:
        run = run_protection(data, args.seed, teacher_cfg=TrainConfig(epochs=args.teacher_epochs),
                             sdb_cfg=SDBConfig(train=replace(SDBConfig().train, epochs=args.epochs)),
                             measure_cfg=MeasureConfig(train=TrainConfig(epochs=args.student_epochs)), log=log)
    except WrapRefused as e:
        _err(f"refused, no demo bundle written: {e}")
        return 3
    summary = summarize(args.data, [run])
    print(format_table(summary))
    settings = _settings(args)
    out = export_bundle(run["box"], settings.bundles_dir / "mnist-demo", name="mnist-demo",
                        in_shape=data.in_shape, mean=data.mean, std=data.std, labels=data.labels,
                        master_key=settings.master_key,
                        metrics={k: run[k] for k in ("teacher_acc", "public_acc", "keyed_acc", "agreement")},
                        extra={"arch": "cnn", "data": args.data, "check": run["check"]})
    print(f"\ndemo bundle written to {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


# --------------------------------------------------------------------------- serve, keys, models
def _service_settings(args) -> Settings:
    """Settings from SDB_* env, with the options given on the command line on top."""
    over = {k: v for k, v in (("data_dir", getattr(args, "data_dir", None)), ("host", getattr(args, "host", None)),
                              ("port", getattr(args, "port", None)), ("workers", getattr(args, "workers", None)))
            if v is not None}
    return Settings(**over)


def cmd_serve(args) -> int:
    from . import commands

    return commands.serve(_service_settings(args), access_log=args.access_log)


def cmd_worker(args) -> int:
    from . import commands

    return commands.worker(_service_settings(args))


def cmd_jobs(args) -> int:
    from .jobs import cli

    return cli.run(args)


def cmd_keys(args) -> int:
    from . import commands

    s = _service_settings(args)
    if args.keys_command == "create":
        return commands.keys_create(s, scopes=args.scopes, models=args.models, quota=args.quota,
                                    quota_window=args.quota_window, expires=args.expires, name=args.name)
    if args.keys_command == "list":
        return commands.keys_list(s)
    return commands.keys_revoke(s, args.key_id)


def cmd_models(args) -> int:
    from . import commands

    s = _service_settings(args)
    if args.models_command == "list":
        return commands.models_list(s)
    if args.models_command == "add":
        return commands.models_add(s, args.path)
    return commands.models_remove(s, args.name, args.version)


def _add_service_commands(sub) -> None:
    sv = sub.add_parser("serve", help="serve the registered models over HTTP (uvicorn)")
    sv.add_argument("--host", help="env SDB_HOST (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="env SDB_PORT (default 8000)")
    sv.add_argument("--data-dir", help="env SDB_DATA_DIR (default ./.sdb)")
    sv.add_argument("--workers", type=int, help="job workers for the jobs queue (env SDB_WORKERS, default 1)")
    sv.add_argument("--access-log", action="store_true", help="log every request (off: it costs throughput)")
    sv.set_defaults(fn=cmd_serve)

    wk = sub.add_parser("worker", help="run one more job worker on the data dir (beside `sdb serve`)")
    wk.add_argument("--data-dir", help="env SDB_DATA_DIR (default ./.sdb)")
    wk.set_defaults(fn=cmd_worker)

    j = sub.add_parser("jobs", help="submit and follow offline jobs on a running server (over HTTP)")
    js = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    jsub = js.add_parser("submit", help="queue a job; prints its id")
    jsub.add_argument("kind", help="wrap, distill, ...")
    jsub.add_argument("--params", default="{}", help="the params: a JSON object, or a JSON file")
    jsub.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    jsub.add_argument("--wait", action="store_true", help="follow the log until the job ends")
    jst = js.add_parser("status", help="a job's status, progress and metrics (JSON)")
    jst.add_argument("job_id")
    jl = js.add_parser("logs", help="print a job's log")
    jl.add_argument("job_id")
    jl.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    jc = js.add_parser("cancel", help="cancel a queued or running job")
    jc.add_argument("job_id")
    jls = js.add_parser("list", help="your jobs (all jobs with an admin key)")
    jls.add_argument("--status")
    jls.add_argument("--kind")
    for sp in js.choices.values():
        sp.add_argument("--url", help="the server (env SDB_URL, default http://127.0.0.1:8000)")
        sp.add_argument("--api-key", help="a key with the jobs scope (env SDB_API_KEY)")
    j.set_defaults(fn=cmd_jobs)

    k = sub.add_parser("keys", help="create, list and revoke API keys (on the data dir; no server needed)")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ks.add_parser("create", help="create a key; prints it alone on the last line")
    kc.add_argument("--scopes", required=True, help="comma-separated: predict,distill,jobs,admin")
    kc.add_argument("--models", help="comma-separated model allowlist (default: every model)")
    kc.add_argument("--quota", type=int, help="samples the key may be served on the keyed path")
    kc.add_argument("--quota-window", type=int, metavar="SECONDS", help="restart the quota every SECONDS")
    kc.add_argument("--expires", type=float, metavar="DAYS", help="expire after DAYS days")
    kc.add_argument("--name", default="", help="a note to tell keys apart")
    ks.add_parser("list", help="list keys (never their secrets)")
    kr = ks.add_parser("revoke", help="revoke a key by id")
    kr.add_argument("key_id")
    for sp in (kc, *[ks.choices[n] for n in ("list", "revoke")]):
        sp.add_argument("--data-dir", help="env SDB_DATA_DIR (default ./.sdb)")
    k.set_defaults(fn=cmd_keys)

    m = sub.add_parser("models", help="list, add and remove served models (on the data dir)")
    ms = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ms.add_parser("list", help="registered models")
    ma = ms.add_parser("add", help="verify a bundle and register it; a running server serves it shortly")
    ma.add_argument("path", help="bundle directory or .sdb file")
    mr = ms.add_parser("remove", help="stop serving a model (every version, or --version)")
    mr.add_argument("name")
    mr.add_argument("--version")
    for sp in ms.choices.values():
        sp.add_argument("--data-dir", help="env SDB_DATA_DIR (default ./.sdb)")
    m.set_defaults(fn=cmd_models)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdb", description="Safe Distillation Box: protect, serve and distill models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, epochs: int, lr: float = 0.01, batch: int = 64) -> None:
        sp.add_argument("--epochs", type=int, default=epochs)
        sp.add_argument("--lr", type=float, default=lr)
        sp.add_argument("--batch-size", type=int, default=batch)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--data-dir", help="data directory (master key, bundles); env SDB_DATA_DIR")

    w = sub.add_parser("wrap", help="wrap a classifier in a Safe Distillation Box and write a bundle")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", metavar="WEIGHTS", help="the pre-trained model's weights (.safetensors or .pt)")
    src.add_argument("--train-teacher", action="store_true", help="train the teacher first on --data")
    w.add_argument("--arch", required=True, help="architecture of the teacher (see the model zoo)")
    w.add_argument("--data", required=True, help="dataset name: mnist-5k, digits, imagefolder:PATH, cifar10:PATH")
    w.add_argument("--out", required=True, help="bundle directory (or FILE.sdb for a zip)")
    w.add_argument("--mode", choices=["sdb", "nasty"], default="sdb")
    w.add_argument("--lam", type=float, default=WrapSpec.lam, help="keyed input λ·x + (1−λ)·k (default: %(default)s)")
    w.add_argument("--teacher-epochs", type=int,
                   help="with --train-teacher (default: the architecture's teacher schedule)")
    w.add_argument("--save-teacher", metavar="FILE", help="with --train-teacher: keep the plain teacher's weights")
    w.add_argument("--name", help="model name in the bundle (default DATA-ARCH)")
    chk = w.add_argument_group("self-check", "measured on a held-out part of the training split; a box that "
                               "misses a threshold is not written (exit 3)")
    chk.add_argument("--max-accuracy-drop", type=float, default=WrapSpec.max_accuracy_drop,
                     help="points of top-1 the public path may lose against the teacher (default: %(default)s)")
    chk.add_argument("--max-keyed-drop", type=float, default=WrapSpec.max_keyed_drop,
                     help="points of top-1 the keyed path may lose (default: %(default)s)")
    chk.add_argument("--min-leak-margin", type=float, default=WrapSpec.min_leak_margin,
                     help="points a student distilled from the public outputs must stay below one trained "
                          "on labels alone (default: %(default)s)")
    chk.add_argument("--check-attempts", type=int, default=WrapSpec.check_attempts,
                     help="settings tried at most (default: %(default)s)")
    chk.add_argument("--check-budget", type=float, metavar="SECONDS",
                     help="no new attempt starts past this (default: none)")
    common(w, epochs=15)
    w.set_defaults(fn=cmd_wrap)

    d = sub.add_parser("distill", help="train a student from a teacher, a bundle, or labels alone")
    d.add_argument("--student", required=True, help="student architecture")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True, help="where to save the student (.safetensors)")
    t = d.add_mutually_exclusive_group()
    t.add_argument("--teacher", metavar="WEIGHTS", help="a local teacher's weights (with --teacher-arch)")
    t.add_argument("--bundle", metavar="PATH", help="a protected bundle")
    t.add_argument("--remote", metavar="URL", help="an SDB server: distill from its keyed path over HTTP (with --model)")
    d.add_argument("--model", metavar="NAME", help="with --remote: the served model's name")
    d.add_argument("--api-key", help="with --remote: a key with the distill scope (default: env SDB_API_KEY)")
    d.add_argument("--teacher-arch", default="cnn")
    d.add_argument("--authorized", action="store_true", help="with --bundle: use the keyed path (needs the master key)")
    d.add_argument("--transfer", type=int, default=0, help="transfer-set size drawn from the train split (0: all)")
    d.add_argument("--temperature", type=float, default=4.0)
    d.add_argument("--alpha", type=float, default=0.9)
    common(d, epochs=20)
    d.set_defaults(fn=cmd_distill)

    m = sub.add_parser("demo", help="wrap the demo model on embedded MNIST and print the protection table")
    m.add_argument("--data", default="mnist-5k")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--teacher-epochs", type=int, default=8)
    m.add_argument("--epochs", type=int, default=15, help="wrap epochs")
    m.add_argument("--student-epochs", type=int, default=30)
    m.add_argument("--json", help="also write the summary JSON here")
    m.add_argument("--data-dir")
    m.set_defaults(fn=cmd_demo)
    _add_service_commands(sub)
    _add_audit_command(sub)
    _add_transfer_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, PermissionError, FileNotFoundError) as e:
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
