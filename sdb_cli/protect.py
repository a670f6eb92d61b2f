"""``sdb wrap``, ``sdb demo`` and ``sdb audit``: protect a classifier and measure what its public outputs teach."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from sdb_core.progress import Hooks
from sdb_core.protect.config import POLICIES, AuditConfig, CheckConfig, SDBConfig, Thresholds
from sdb_core.tasks.wrap import WrapTask

from .console import add_training_flags, data_settings, err, progress_bar
from .teacher_norm import add_teacher_norm_flags, teacher_norm


def output_policy(args) -> dict | None:
    """The --policy, --top-k and --decimals given, checked as a deploy will check them (ValueError: exit 2)."""
    given = {k: v for k, v in (("policy", args.policy), ("top_k", args.top_k), ("decimals", args.decimals))
             if v is not None}
    if not given:
        return None
    from pydantic import ValidationError

    from service.schemas import OutputPolicy

    try:
        return OutputPolicy.model_validate(given).model_dump(exclude_none=True)
    except ValidationError as e:
        raise ValueError("output policy: " + "; ".join(str(x["msg"]) for x in e.errors())) from None


def cmd_wrap(args) -> int:
    from sdb_core.protect import WrapRefused
    from sdb_core.tasks import wrap

    task = WrapTask.from_options(
        args.data, args.arch, teacher=args.teacher, teacher_mean=args.teacher_mean, teacher_std=args.teacher_std,
        name=args.name, version=args.version, teacher_epochs=args.teacher_epochs,
        save_teacher=args.save_teacher, mode=args.mode, lam=args.lam, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, max_accuracy_drop=args.max_accuracy_drop,
        max_keyed_drop=args.max_keyed_drop, min_leak_margin=args.min_leak_margin,
        min_guessed_key_share=args.min_guessed_key_share,
        check_attempts=args.check_attempts, check_budget=args.check_budget, output_policy=output_policy(args))
    hooks = Hooks(phase=progress_bar, log=lambda s: print(s, file=sys.stderr))
    try:
        outcome = wrap.run(task, args.out, hooks, master_key=data_settings(args).master_key)
    except WrapRefused as e:
        err(f"refused, no bundle written: {e}")
        return 3
    for k, v in outcome.metrics.items():
        print(f"{k:12s} {v:6.2f}%")
    check = outcome.report.get("check")
    if check:  # the drops the check passed on, with their standard errors: how near the line they are
        f = check["figures"]
        print(f"self-check on {check['val_size']} held-out inputs: " + ", ".join(
            f"{path} drop {f[path + '_drop']:.2f} ± {f[path + '_drop_se']:.2f}" for path in ("public", "keyed")
            if path + "_drop_se" in f) + " points (± one standard error)")
    # the whole wrap: the check's every attempt and measure (the report's own seconds are its chosen attempt's training)
    seconds = check["seconds"] if check else outcome.report["seconds"]
    print(f"wrapped in {seconds:.1f}s; bundle written to {outcome.bundle}")
    return 0


def cmd_demo(args) -> int:
    """Wrap the demo model on the embedded MNIST digits and print the protection table."""
    from sdb_core.bundle import export_bundle
    from sdb_core.data import load_dataset
    from sdb_core.outputs import out_file
    from sdb_core.protect import SDBConfig, WrapRefused
    from sdb_core.protect.measure import MeasureConfig, format_table, run_protection, summarize
    from sdb_core.train import TrainConfig

    if args.json:
        out_file(args.json, "--json")  # before any work: a path it cannot write is refused now, not after the demo
    log = lambda s: print(s, file=sys.stderr, flush=True)
    data = load_dataset(args.data)
    log(f"demo: {args.data}, {len(data.train)} training / {len(data.test)} test images; "
        "teacher small CNN, students MLP on 1,000 transfer images")
    try:
        run = run_protection(data, args.seed, teacher_cfg=TrainConfig(epochs=args.teacher_epochs),
                             sdb_cfg=SDBConfig(train=replace(SDBConfig().train, epochs=args.epochs)),
                             measure_cfg=MeasureConfig(train=TrainConfig(epochs=args.student_epochs)), log=log)
    except WrapRefused as e:
        err(f"refused, no demo bundle written: {e}")
        return 3
    summary = summarize(args.data, [run])
    print(format_table(summary))
    settings = data_settings(args)
    out = export_bundle(run["box"], settings.bundles_dir / "mnist-demo", name="mnist-demo",
                        in_shape=data.in_shape, mean=data.mean, std=data.std, labels=data.labels,
                        master_key=settings.master_key,
                        metrics={k: run[k] for k in ("teacher_acc", "public_acc", "keyed_acc", "agreement")},
                        extra={"arch": "cnn", "data": args.data, "check": run["check"]})
    print(f"\ndemo bundle written to {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0



def cmd_audit(args) -> int:
    """Attack the public outputs of a bundle or a plain model; print the table, write the report."""
    from sdb_core.tasks import ModelRef, audit
    from sdb_core.tasks.audit import AuditTask

    target = (ModelRef(bundle=args.bundle) if args.bundle
              else ModelRef(arch=args.arch, weights=args.teacher, **teacher_norm(args)))
    base = AuditConfig()
    cfg = AuditConfig(transfer_n=args.transfer, student=args.student, policy=args.policy, top_k=args.top_k,
                      keys=args.keys, threshold=args.threshold, seeds=tuple(args.seeds), steps=args.steps,
                      train=replace(base.train, lr=args.lr))
    outcome = audit.run(AuditTask(args.data, target, cfg, threads=args.threads), args.out,
                        Hooks(phase=lambda name: progress_bar("audit: student")))
    print(outcome.report.format_table())
    print(f"\nreport {outcome.paths['report']}\nchart  {outcome.paths['chart']}")
    return 1 if args.fail_on_leak and outcome.report.verdict == "leaks" else 0


# sdb_core.data.list_datasets() without importing torch for --help (tests/cli keep the two in step)
DATA_HELP = ("dataset: mnist-5k, digits, mnist-textures (built in), or imagefolder:PATH, cifar10:PATH, "
             "cifar100:PATH, npz:PATH")


def add_commands(sub) -> None:
    w = sub.add_parser("wrap", help="wrap a classifier in a Safe Distillation Box and write a bundle")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", metavar="MODEL", help="the pre-trained model: its weights (.safetensors or .pt, "
                     "with --arch), or the network itself as ONNX (.onnx, any architecture)")
    src.add_argument("--train-teacher", action="store_true", help="train the teacher first on --data")
    w.add_argument("--arch", help="architecture of the teacher (see the model zoo); not with an .onnx teacher")
    add_teacher_norm_flags(w)
    w.add_argument("--data", required=True, help=DATA_HELP)
    w.add_argument("--out", required=True, help="bundle directory (or FILE.sdb for a zip)")
    w.add_argument("--mode", choices=["sdb", "nasty"], default="sdb",
                   help="sdb (keyed) or nasty (Nasty Teacher: no key); both check themselves (default: %(default)s)")
    w.add_argument("--lam", type=float, default=SDBConfig().lam, help="keyed input λ·x + (1−λ)·k (default: %(default)s)")
    w.add_argument("--teacher-epochs", type=int,
                   help="with --train-teacher (default: the architecture's teacher schedule)")
    w.add_argument("--save-teacher", metavar="FILE", help="with --train-teacher: keep the plain teacher's weights (written "
                   "as safetensors whatever the name)")
    w.add_argument("--name", help="model name in the bundle (default DATA-ARCH)")
    w.add_argument("--version", default="1", help="the bundle's version (default 1): a new one of a model already "
                   "served is added beside its others by `sdb models add`")
    chk = w.add_argument_group("self-check", "every wrap, SDB or Nasty, is measured on a held-out part of the "
                               "training split; a box that misses a threshold is not written (exit 3)")
    chk.add_argument("--max-accuracy-drop", type=float, default=Thresholds().max_accuracy_drop,
                     help="points of top-1 the public path may lose against the teacher (default: %(default)s)")
    chk.add_argument("--max-keyed-drop", type=float, default=Thresholds().max_keyed_drop,
                     help="points of top-1 the keyed path may lose; SDB only, a Nasty box has none "
                          "(default: %(default)s)")
    chk.add_argument("--min-leak-margin", type=float, default=Thresholds().min_leak_margin,
                     help="points a student distilled from the public outputs must stay below one trained "
                          "on labels alone (default: %(default)s)")
    chk.add_argument("--min-guessed-key-share", type=float, default=Thresholds().min_guessed_key_share,
                     help="how little a random key may teach: its soft labels this share of the way from the key's to "
                          "the confusion target's; SDB only (default: %(default)s)")
    chk.add_argument("--check-attempts", type=int, default=CheckConfig().max_attempts,
                     help="settings tried at most (default: %(default)s)")
    chk.add_argument("--check-budget", type=float, metavar="SECONDS",
                     help="no new attempt starts past this (default: none)")
    pol = w.add_argument_group("output policy", "what the public routes return of the box once it is deployed "
                               "(meta.json's output_policy; a deploy may override it)")
    pol.add_argument("--policy", choices=POLICIES, help="probs (default), top_k or label")
    pol.add_argument("--top-k", type=int, help=f"k of the top_k policy (default {AuditConfig().top_k})")
    pol.add_argument("--decimals", type=int, help="round served probabilities to this many decimals")
    train = SDBConfig().train
    add_training_flags(w, epochs=train.epochs, lr=train.lr, batch=train.batch_size)
    w.set_defaults(fn=cmd_wrap)

    m = sub.add_parser("demo", help="wrap the demo model on embedded MNIST and print the protection table")
    m.add_argument("--data", default="mnist-5k")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--teacher-epochs", type=int, default=8)
    m.add_argument("--epochs", type=int, default=15, help="wrap epochs")
    m.add_argument("--student-epochs", type=int, default=30)
    m.add_argument("--json", help="also write the summary JSON here")
    m.add_argument("--data-dir")
    m.set_defaults(fn=cmd_demo)

    base = AuditConfig()
    a = sub.add_parser("audit", help="measure how much a model's public outputs teach a distiller")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", metavar="PATH", help="a bundle (its public path only; no master key is used)")
    src.add_argument("--teacher", metavar="MODEL", help="a plain model: its weights (with --arch), or an ONNX model "
                     "(.onnx)")
    a.add_argument("--arch", help="with --teacher: its architecture")
    add_teacher_norm_flags(a)
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

