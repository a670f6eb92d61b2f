"""Remote authorized distillation: is KD through the SDK as good and fast as the local keyed path?

    python benchmarks/remote_kd.py --json OUT.json [--data digits|mnist-5k]

Builds a demo bundle with ``sdb_core`` (small-CNN teacher wrapped by the SDB recipe),
starts ``sdb serve`` on a free loopback port with that bundle and a ``distill`` key, then
trains the same MLP student with the same seed against (a) the bundle's keyed path loaded
locally and (b) ``RemoteTeacher`` over HTTP. Two settings:

- ``distill``: ``sdb_core.distill.distill`` as ``sdb distill`` runs it (the teacher asked
  once per transfer sample up front); this is the ``local``/``remote`` pair of the JSON;
- ``per_batch``: a KD loop asking the teacher on every step (as with augmentation), remote
  through ``RemoteTeacher.iter_batches`` with and without prefetch of the next batch.

``samples_per_s`` counts student training samples (epochs × transfer size) per wall-clock
second of the whole run, teacher queries included. Targets: remote accuracy within 0.5
points of local; remote throughput at least 0.5× local.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdb_client import Client, RemoteTeacher, SDBError

from sdb_core.bundle import export_bundle, load_bundle
from sdb_core.data import load_dataset, transfer_split
from sdb_core.distill import DistillConfig, distill, kd_loss
from sdb_core.models import create_model
from sdb_core.protect import SDBConfig, train_box
from sdb_core.protect.key import load_or_create_master_key
from sdb_core.train import TrainConfig, accuracy, seed_everything, train_classifier

SDB = str(Path(sys.executable).with_name("sdb"))
NAME = "kd-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bundle(data, root: Path, args) -> tuple[Path, bytes]:
    master = load_or_create_master_key(root / "master.key")
    seed_everything(args.seed)
    teacher = create_model("cnn", num_classes=data.num_classes, in_shape=data.in_shape)
    train_classifier(teacher, data.train, TrainConfig(epochs=args.teacher_epochs, seed=args.seed))
    box = train_box(teacher, data, SDBConfig(train=replace(SDBConfig().train, epochs=args.wrap_epochs))).box
    path = export_bundle(box, root / "bundles" / NAME, name=NAME, in_shape=data.in_shape, mean=data.mean,
                         std=data.std, labels=data.labels, master_key=master)
    return path, master


class Server:
    """``sdb serve`` in its own process, as a deployment runs it."""

    def __init__(self, data_dir: Path, bundle: Path, threads: int):
        self.env = {**os.environ, "SDB_DATA_DIR": str(data_dir), "SDB_REGISTER_DEMO": "false",
                    "SDB_RATE_LIMIT_KEY_PER_S": "0",  # throughput is measured: no per-key rate limit
                    "SDB_ORT_INTRA_OP_THREADS": str(threads), "SDB_ORT_INTER_OP_THREADS": "1"}
        subprocess.run([SDB, "models", "add", str(bundle)], env=self.env, check=True, capture_output=True)
        out = subprocess.run([SDB, "keys", "create", "--scopes", "distill", "--models", NAME], env=self.env,
                             check=True, capture_output=True, text=True).stdout
        self.key = out.strip().splitlines()[-1]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([SDB, "serve", "--host", "127.0.0.1", "--port", str(port)], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with Client(self.url, max_retries=0, timeout=1) as c:
                    if c._request("GET", "/readyz").status_code == 200:
                        return
            except SDBError:  # not listening yet, or not ready
                time.sleep(0.1)
        raise RuntimeError("sdb serve did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def student_for(data, args):
    torch.manual_seed(args.seed)
    return create_model(args.student, num_classes=data.num_classes, in_shape=data.in_shape)


def run_distill(data, transfer, teacher, args) -> dict:
    s = student_for(data, args)
    cfg = DistillConfig(temperature=args.temperature, alpha=args.alpha,
                        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed))
    t0 = time.perf_counter()
    distill(s, transfer, teacher, cfg)
    secs = time.perf_counter() - t0
    return {"acc": round(accuracy(s, data.test), 2), "samples_per_s": round(args.epochs * len(transfer) / secs, 1),
            "seconds": round(secs, 2)}


def run_per_batch(data, transfer, batches_of, args) -> dict:
    """A KD loop with a teacher query on every step; ``batches_of(epoch)`` yields (xb, yb, logits)."""
    s = student_for(data, args)
    opt = torch.optim.SGD(s.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        s.train()
        for xb, yb, tb in batches_of(epoch):
            loss = kd_loss(s(xb), torch.as_tensor(tb), yb, args.temperature, args.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    secs = time.perf_counter() - t0
    s.eval()
    return {"acc": round(accuracy(s, data.test), 2), "samples_per_s": round(args.epochs * len(transfer) / secs, 1),
            "seconds": round(secs, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="digits or mnist-5k")
    p.add_argument("--transfer", type=int, default=0, help="transfer-set size from the train split (0: all)")
    p.add_argument("--student", default="mlp")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--request-batch", type=int, default=256, help="RemoteTeacher samples per request")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--wrap-epochs", type=int, default=SDBConfig().train.epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and server ORT threads (1: steady on a shared box)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset(args.data)
    transfer = transfer_split(data, args.transfer, args.seed) if args.transfer else data.train
    x, y = transfer.tensors[0], transfer.tensors[1]
    with tempfile.TemporaryDirectory(prefix="sdb-remote-kd-") as tmp:
        root = Path(tmp)
        print(f"building the {args.data} bundle (teacher {args.teacher_epochs} epochs, wrap {args.wrap_epochs})...",
              flush=True)
        bundle_path, master = build_bundle(data, root, args)
        bundle = load_bundle(bundle_path, master)
        server = Server(root, bundle_path, args.threads)
        try:
            client = Client(server.url, server.key, batch_size=args.request_batch)
            local = lambda xb: torch.from_numpy(bundle.distill_logits(xb.numpy()))
            z_local, z_remote = bundle.distill_logits(x.numpy()), client.distill_logits(NAME, x.numpy())
            max_diff = float(np.abs(z_local - z_remote).max())
            results = {}
            print("distill (teacher asked once per sample), local keyed path...", flush=True)
            results["local"] = run_distill(data, transfer, local, args)
            print("distill, RemoteTeacher over HTTP...", flush=True)
            with RemoteTeacher(client, NAME, args.temperature, args.request_batch) as teacher:
                results["remote"] = run_distill(data, transfer, teacher, args)

            def orders(epoch):
                return np.random.default_rng(args.seed + epoch).permutation(len(x))

            def local_batches(epoch):
                idx = orders(epoch)
                for i in range(0, len(idx), args.batch_size):
                    j = idx[i:i + args.batch_size]
                    yield x[j], y[j], torch.from_numpy(bundle.distill_logits(x[j].numpy()))

            per = {}
            print("per-batch KD loop: local, remote with prefetch, remote without...", flush=True)
            per["local"] = run_per_batch(data, transfer, local_batches, args)
            for label, prefetch in (("remote", 1), ("remote_no_prefetch", 0)):
                with RemoteTeacher(client, NAME, args.temperature, args.batch_size, prefetch=prefetch) as t:
                    def remote_batches(epoch, t=t):
                        # the same order as local_batches: iter_batches shuffles with the same generator
                        yield from t.iter_batches(x, y, batch_size=args.batch_size, shuffle=True,
                                                  seed=args.seed + epoch)
                    per[label] = run_per_batch(data, transfer, remote_batches, args)
            results["per_batch"] = per
            client.close()
        finally:
            server.stop()

    loc, rem = results["local"], results["remote"]
    results["targets"] = {
        "acc_gap": round(rem["acc"] - loc["acc"], 2), "acc_within_0.5": abs(rem["acc"] - loc["acc"]) <= 0.5,
        "throughput_ratio": round(rem["samples_per_s"] / loc["samples_per_s"], 3),
        "throughput_at_least_0.5x": rem["samples_per_s"] >= 0.5 * loc["samples_per_s"],
        "per_batch_throughput_ratio": round(per["remote"]["samples_per_s"] / per["local"]["samples_per_s"], 3)}
    results["setup"] = {"data": args.data, "transfer": len(transfer), "student": args.student, "epochs": args.epochs,
                        "batch_size": args.batch_size, "request_batch": args.request_batch, "seed": args.seed,
                        "threads": args.threads, "max_abs_logit_diff_local_vs_remote": max_diff,
                        "cpus": os.cpu_count()}

    print(f"\n{args.data}: {args.student} student, {len(transfer)} transfer images, {args.epochs} epochs, "
          f"seed {args.seed}; max |local - remote logits| = {max_diff:.2e}")
    print(f"{'setting':44} {'test acc %':>10} {'samples/s':>10} {'seconds':>8}")
    rows = [("distill(): local keyed path", loc), ("distill(): RemoteTeacher over HTTP", rem),
            ("per-batch loop: local keyed path", per["local"]),
            ("per-batch loop: remote, prefetch next batch", per["remote"]),
            ("per-batch loop: remote, no prefetch", per["remote_no_prefetch"])]
    for label, r in rows:
        print(f"{label:44} {r['acc']:10.2f} {r['samples_per_s']:10.1f} {r['seconds']:8.2f}")
    t = results["targets"]
    print(f"\nremote - local accuracy {t['acc_gap']:+.2f} (target within 0.5: {'met' if t['acc_within_0.5'] else 'MISSED'}); "
          f"throughput {t['throughput_ratio']:.2f}x local (target >= 0.5x: "
          f"{'met' if t['throughput_at_least_0.5x'] else 'MISSED'}); per-batch loop {t['per_batch_throughput_ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
