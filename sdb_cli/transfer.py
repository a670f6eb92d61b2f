"""``sdb transfer rank``: which pre-trained model to transfer from (DEPARA attribution graphs)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from sdb_core.progress import Hooks
from sdb_core.tasks import ModelRef
from sdb_core.tasks.transfer import TARGET_TRAIN, WEAK_TARGET, RankedModel, TransferTask
from sdb_core.transfer.config import DEFAULT_PROBE, METHODS, DeparaConfig

from .console import progress_bar


def _ranked(spec: str, name: str | None = None) -> RankedModel:
    """``[NAME=]PATH`` of a bundle (dir or .sdb), or ``[NAME=]ARCH:NUM_CLASSES:WEIGHTS`` of a plain model."""
    given, ref = ModelRef.parse(spec)
    return RankedModel(name or given or Path(ref.bundle or ref.weights).stem, ref)


def cmd_transfer_rank(args) -> int:
    """Rank source models for a target (a model, or a labelled data set: a weak model is trained)."""
    from sdb_core.tasks import transfer

    target = None
    if args.target:
        target = replace(_ranked(args.target, "target"), layer=args.target_layer)
    task = TransferTask(sources=tuple(_ranked(s) for s in args.source), target=target,
                        target_data=None if args.target else args.target_data, probe_data=args.probe_data,
                        probe=args.probe, target_train=args.target_train,
                        target_training=replace(WEAK_TARGET, epochs=args.target_epochs),
                        depara=DeparaConfig(method=args.method, **({} if args.lam is None else {"lam": args.lam})),
                        threads=args.threads, seed=args.seed)
    outcome = transfer.run(task, args.out, Hooks(phase=lambda name: progress_bar("weak target") if name == "target"
                                                 else None))
    result = outcome.result
    out = Path(args.out)
    (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2))
    for i, name in enumerate(result.ranking.order, 1):
        print(f"{i:2d}. {name:24s} S={result.ranking.scores[name]:.4f}")
    print(f"report {out / 'report.json'}")
    return 0


def add_commands(sub) -> None:
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
    r.add_argument("--target-train", type=int, default=TARGET_TRAIN)
    r.add_argument("--target-epochs", type=int, default=WEAK_TARGET.epochs)
    r.add_argument("--method", choices=METHODS, default=DeparaConfig().method)
    r.add_argument("--lam", type=float, help="lambda of S = S_V + lambda S_E (default: DeparaConfig's)")
    r.add_argument("--out", default="transfer", help="directory for report.json and similarity.png")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    r.set_defaults(fn=cmd_transfer_rank)

