"""DEPARA's model selection scored against a fine-tuning ground truth (a reading, not the headline).

``benchmarks/depara.py`` ranks sources against Taskonomy's transfer function on frozen features (and a
linear probe). The DEPARA issue also names fine-tuning; this script measures it for the test zoo of a
finished run: each source's encoder, with a fresh classification head (the zoo's own: 4x4 pooling and a
linear layer), is trained end to end on the target's small training set (draw 0 of the run's truth: the
same 1,000 images) and scored on the same test set. Every method's scores are the run's stored ones (its
validation-chosen settings), so nothing is chosen again.

    OMP_NUM_THREADS=1 python benchmarks/depara_finetune.py benchmarks/results/depara.json \\
        --json benchmarks/results/depara_finetune.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from depara import SCORED, agreement  # benchmarks/depara.py: the same methods and Spearman / top-k
from depara_zoo import (  # benchmarks/depara_zoo.py
    TASKS,
    ProbeConfig,
    ZooConfig,
    build_zoo,
    evaluate,
    truth_split,
)

from sdb_core.train import TrainConfig, train_classifier
from sdb_core.transfer.task_models import ZooNet


def finetune_accuracy(source: ZooNet, width: int, target: str, train, test, cfg: TrainConfig) -> float:
    """Test accuracy (percent) of ``source``'s encoder with a fresh ``target`` head, all of it trained on ``train``."""
    torch.manual_seed(cfg.seed)  # the fresh head's initial weights
    net = ZooNet("cls", TASKS[target][2], 3, width)
    net.encoder.load_state_dict(source.encoder.state_dict())
    train_classifier(net, train, cfg)
    return evaluate(net, test)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a depara.py JSON output: its test zoo and stored method scores")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--json", type=Path, help="write the summary JSON here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    run = json.loads(args.run.read_text())
    seed, test_zoo = run["details"]["seed"], run["details"]["test_zoo"]
    zoo = build_zoo(ZooConfig(tasks=tuple(run["details"]["zoo_tasks"]), seed=seed))
    if zoo.config.key() != test_zoo["zoo_config_key"]:
        sys.exit(f"{args.run}: its zoo ({test_zoo['zoo_config_key']}) is not the default recipe's "
                 f"({zoo.config.key()}) for seed {seed}")
    probe = ProbeConfig(seed=seed)
    cfg = TrainConfig(epochs=args.epochs, batch_size=100, lr=1e-3, optimizer="adam", weight_decay=1e-4,
                      schedule="cosine", seed=0)
    t0 = time.perf_counter()
    per_target = {}
    for target in run["counted_targets"]:
        train, test = truth_split(target, probe, 0), truth_split(target, probe, None)  # the run's draw 0
        stored = test_zoo["targets"][target]
        truth = {s: finetune_accuracy(m, zoo.config.width, target, train, test, cfg)
                 for s, m in zoo.models.items() if s != target}
        per_target[target] = {
            "truth": truth,
            "agrees_with_frozen_truth": agreement(stored["truth"], truth)["spearman"],
            "model_selection": {m: agreement(stored["scores"][m], truth) for m in SCORED}}
        best = max(truth, key=truth.get)
        print(f"{target:9} best source {best:9} {truth[best]:5.1f}  "
              + "  ".join(f"{m} {per_target[target]['model_selection'][m]['spearman']:+.2f}" for m in SCORED)
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    means = {m: {k: float(np.mean([r["model_selection"][m][k] for r in per_target.values()]))
                 for k in ("spearman", "top1", "top3")} for m in SCORED}
    frozen_agreement = float(np.mean([r["agrees_with_frozen_truth"] for r in per_target.values()]))
    print(f"\nfine-tuning truth, test zoo seed {seed}, {len(per_target)} targets, {args.epochs} epochs "
          f"(agreement with the frozen-feature truth: Spearman {frozen_agreement:.2f})")
    print(f"{'method':10}{'spearman':>9}{'top1':>7}{'top3':>7}")
    for m, v in means.items():
        print(f"{m:10}{v['spearman']:9.3f}{v['top1']:7.2f}{v['top3']:7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "seed": seed, "epochs": args.epochs,
                                         "model_selection": means, "agrees_with_frozen_truth": frozen_agreement,
                                         "per_target": per_target, "seconds": time.perf_counter() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
