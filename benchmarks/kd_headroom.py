"""How much better than the plain teacher can any teacher-side knowledge be at the audit's N?

    python benchmarks/kd_headroom.py --json benchmarks/results/kd_headroom.json [--seeds 0 1 2]

The leak-audit issue asks for authorized KD from the keyed path *at least as good as* KD from
the plain teacher at N = 300. A keyed path that copies the teacher perfectly ties; to win on
average it has to carry better knowledge than the teacher's own outputs (the paper's
"knowledge augmentation"). This measures the candidates directly, with no box in between, as the
ceiling the keyed path would have to reach: the owner's teacher (as ``benchmarks/audit.py``
trains it) replaced by

- ``shift_ensemble``: the teacher's logits averaged over the nine ±1-pixel shifts of the input;
- ``peer_ensemble``: the teacher averaged with a second teacher of the same recipe (another seed);
- ``neighbour_smoothed``: half the teacher's tempered probabilities, half their mean over the
  image's 5 nearest training images in the teacher's penultimate feature space;
- ``mlp_reference``: 0.7·teacher + 0.3·an MLP trained on the owner's training set (logits): a
  student-shaped view of the data.

Each is distilled into each ``--students`` architecture with the authorized recipe of
``benchmarks/audit.py`` (true labels, T = 4, α = 0.9, the audit's steps) on the audit's
transfer set; the same student seed for every teacher, so the rows differ only in what was taught.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdb_core.data import load_dataset, transfer_split
from sdb_core.distill import DistillConfig
from sdb_core.models import create_model
from sdb_core.protect.audit import AuditConfig
from sdb_core.protect.measure import student_accuracy, train_teacher
from sdb_core.train import TrainConfig, device_of, predict_logits, seed_everything, train_classifier

T = 4.0


def anywhere(model: nn.Module):
    """The model as a function of inputs on any device: it runs where it lives, answers on the input's."""
    return lambda x: model(x.to(device_of(model))).to(x.device)


def shift_ensemble(teacher: nn.Module):
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    run = anywhere(teacher)
    return lambda x: torch.stack([run(torch.roll(x, s, dims=(2, 3))) for s in shifts]).mean(0)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the model's last linear layer (its feature space), for every row of ``x``."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    out: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, inp, _o: out.append(inp[0].detach().to(x.device)))
    try:
        predict_logits(model, x)
    finally:
        handle.remove()
    return torch.cat(out)


def neighbour_smoothed(teacher: nn.Module, x_train: torch.Tensor, k: int = 5, beta: float = 0.5):
    """A lookup over the training images (the transfer set is drawn from them)."""
    h = F.normalize(penultimate(teacher, x_train), dim=1)
    p = F.softmax(predict_logits(teacher, x_train) / T, 1)
    neighbours = (h @ h.T).topk(k + 1, dim=1).indices[:, 1:]  # column 0 is the image itself
    table = T * ((1 - beta) * p + beta * p[neighbours].mean(1)).clamp_min(1e-8).log()
    index = {row.numpy().tobytes(): i for i, row in enumerate(x_train)}
    return lambda x: table[torch.tensor([index[row.numpy().tobytes()] for row in x.cpu()])]


def teachers_of(data, seed: int, log) -> dict:
    teacher, _ = train_teacher(data, seed, cfg=TrainConfig(epochs=8), log=log)
    peer, _ = train_teacher(data, seed + 1000, cfg=TrainConfig(epochs=8), log=log)
    seed_everything(seed + 2000)
    reference = create_model("mlp", num_classes=data.num_classes, in_shape=data.in_shape)
    train_classifier(reference, data.train, TrainConfig(epochs=10, seed=seed + 2000))
    reference.eval()
    t, p, r = anywhere(teacher), anywhere(peer), anywhere(reference)
    return {
        "teacher": teacher,
        "shift_ensemble": shift_ensemble(teacher),
        "peer_ensemble": lambda x: (t(x) + p(x)) / 2,
        "neighbour_smoothed": neighbour_smoothed(teacher, data.train.tensors[0]),
        "mlp_reference": lambda x: 0.7 * t(x) + 0.3 * r(x),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist-5k")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--students", nargs="+", default=["mlp", "lenet"])
    p.add_argument("--json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)
    data = load_dataset(args.data)
    cfg = AuditConfig()
    t0 = time.perf_counter()
    accs: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        transfer = transfer_split(data, cfg.transfer_n, seed)
        dcfg = DistillConfig(temperature=T, alpha=0.9,
                             train=replace(cfg.train, epochs=cfg.epochs_for(len(transfer))))
        for name, fn in teachers_of(data, seed, log).items():  # distill() calls them under no_grad
            for student in args.students:
                acc = student_accuracy(student, data, transfer, fn, dcfg, seed)
                accs.setdefault(student, {}).setdefault(name, []).append(acc)
                log(f"seed {seed} {student:6s} {name:18s} {acc:.2f}")

    out = {"dataset": args.data, "n": cfg.transfer_n, "seeds": args.seeds, "seconds": time.perf_counter() - t0,
           "students": {}}
    print(f"\nKD at N={cfg.transfer_n}, test top-1 %, mean over seeds {args.seeds} (gain vs the plain teacher, "
          "per seed)")
    for student, by_name in accs.items():
        base = by_name["teacher"]
        out["students"][student] = {}
        print(f"student {student}")
        for name, a in by_name.items():
            gains = [x - b for x, b in zip(a, base, strict=True)]
            out["students"][student][name] = {"acc": statistics.fmean(a), "gain": statistics.fmean(gains),
                                              "accs": a, "gains": gains}
            print(f"  {name:18s} {statistics.fmean(a):6.2f}  {statistics.fmean(gains):+5.2f}  "
                  f"({' '.join(f'{g:+.1f}' for g in gains)})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
