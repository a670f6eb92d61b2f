"""``sdb transfer rank``: which pre-trained model to transfer from (DEPARA attribution graphs)."""
from __future__ import annotations

import json
from pathlib import Path

from sdb_core.transfer import DEFAULT_PROBE

from .console import progress_bar


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
    from sdb_core.transfer.task_models import FEATURE_LAYER, train_task_model

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
                                  kind="cls", outputs=data.num_classes, progress=progress_bar("weak target"))
        target_layer = FEATURE_LAYER
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
    r.add_argument("--target-train", type=int, default=500)
    r.add_argument("--target-epochs", type=int, default=3)
    r.add_argument("--method", choices=["depara", "depara_v", "depara_e", "rsa", "random"], default="depara")
    r.add_argument("--lam", type=float, help="lambda of S = S_V + lambda S_E (default: DeparaConfig's)")
    r.add_argument("--out", default="transfer", help="directory for report.json and similarity.png")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    r.set_defaults(fn=cmd_transfer_rank)

