"""Remote authorized distillation: is KD through the SDK as good and as fast as the local keyed path?

    python benchmarks/remote_kd.py --data mnist-5k --transfer 1000 --repeats 5 \
        --json benchmarks/results/remote_kd_mnist-5k.json

Builds a demo bundle with ``sdb_core`` (small-CNN teacher wrapped by the SDB recipe), starts
``sdb serve`` on a free loopback port with that bundle and a ``distill`` key, then trains the same
MLP student with the same seed against (a) the bundle's keyed path loaded locally (ONNX Runtime with the
server's settings: ``--threads`` threads, no spinning) and (b)
``RemoteTeacher`` over HTTP, its tensors as ``.npy`` (the SDK's default) and as JSON. Two settings:

- ``distill``: ``sdb_core.distill.distill`` as ``sdb distill`` runs it (the teacher asked once per
  transfer sample up front, ``request_batch`` samples a request with the next one prefetched);
- ``per_batch``: a KD loop asking the teacher on every step (as with augmentation), remote through
  ``RemoteTeacher.iter_batches`` with and without prefetch of the next batch.

``samples_per_s`` counts student training samples (epochs × transfer size) per wall-clock second of
the whole run, teacher queries included; each setting runs ``--repeats`` times, interleaved, and the
best run counts (the median is kept too). ``fetch`` says where the time goes: the teacher's logits for
the whole transfer set once, locally and remotely, the client's encoding and decoding, and the
server's CPU seconds (from /proc). The machine's load average is recorded before and after.
Targets: remote accuracy within 0.5 points of local; remote ``.npy`` throughput at least 0.9× local.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
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
from sdb_client import _base as wire

from sdb_core.bundle import export_bundle, load_bundle, ort_options
from sdb_core.data import load_dataset, transfer_split
from sdb_core.distill import DistillConfig, distill, kd_loss
from sdb_core.models import create_model
from sdb_core.protect import SDBConfig, train_box
from sdb_core.protect.key import load_or_create_master_key
from sdb_core.train import TrainConfig, accuracy, seed_everything, train_classifier

SDB = str(Path(sys.executable).with_name("sdb"))
NAME = "kd-demo"
ENCODINGS = ("npy", "json")


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
        self.env = {**os.environ, "SDB_DATA_DIR": str(data_dir), "SDB_REGISTER_DEMO": "false", "SDB_WORKERS": "0",
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

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used so far; NaN where /proc is not."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def student_for(data, args):
    torch.manual_seed(args.seed)
    return create_model(args.student, num_classes=data.num_classes, in_shape=data.in_shape)


def timed(data, transfer, args, train) -> dict:
    """Train a fresh student with ``train(student)``; its test accuracy and the run's throughput."""
    s = student_for(data, args)
    t0 = time.perf_counter()
    train(s)
    secs = time.perf_counter() - t0
    return {"acc": round(accuracy(s, data.test), 2), "samples_per_s": round(args.epochs * len(transfer) / secs, 1),
            "seconds": round(secs, 3)}


def run_distill(data, transfer, teacher, args) -> dict:
    cfg = DistillConfig(temperature=args.temperature, alpha=args.alpha,
                        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed))
    return timed(data, transfer, args, lambda s: distill(s, transfer, teacher, cfg))


def run_per_batch(data, transfer, batches_of, args) -> dict:
    """A KD loop with a teacher query on every step; ``batches_of(epoch)`` yields (xb, yb, logits)."""
    def train(s):
        opt = torch.optim.SGD(s.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for epoch in range(args.epochs):
            s.train()
            for xb, yb, tb in batches_of(epoch):
                loss = kd_loss(s(xb), torch.as_tensor(tb), yb, args.temperature, args.alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        s.eval()
    return timed(data, transfer, args, train)


def best_of(runs: list[dict]) -> dict:
    """The fastest run (the one least disturbed on a shared machine), with the median beside it."""
    best = max(runs, key=lambda r: r["samples_per_s"])
    return {**best, "median_samples_per_s": round(statistics.median(r["samples_per_s"] for r in runs), 1),
            "runs": len(runs)}


def clock(fn, repeats: int = 5) -> float:
    """The best of ``repeats`` wall-clock seconds of ``fn()``."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def where_the_time_goes(client: Client, server: Server, bundle, x: np.ndarray, args) -> dict:
    """The teacher's logits for the whole transfer set once: locally; remotely per encoding, with the
    server's CPU seconds; and what the client spends encoding a request and decoding its answer."""
    out = {"samples": len(x), "local_s": round(clock(lambda: bundle.distill_logits(x)), 4)}
    req = x[:args.request_batch]
    z = bundle.distill_logits(req)
    for enc in ENCODINGS:
        with RemoteTeacher(client, NAME, batch_size=args.request_batch, encoding=enc) as t:
            t.logits(x)  # warm: connections open
            cpu0 = server.cpu_s()
            secs = clock(lambda t=t: t.logits(x))
            out[f"remote_{enc}_s"] = round(secs, 4)
            out[f"server_cpu_{enc}_s"] = round((server.cpu_s() - cpu0) / 5, 4)
        body = wire.distill_request(req, None, enc)["content"]
        answer = wire.encode_npy(z) if enc == "npy" else json.dumps({"logits": z.tolist()}).encode()
        out[f"request_bytes_{enc}"] = len(body)
        out[f"client_encode_{enc}_ms"] = round(1e3 * clock(lambda enc=enc: wire.distill_request(req, None, enc), 20), 3)
        decode = (lambda a=answer: wire.decode_npy(a)) if enc == "npy" else (
            lambda a=answer: np.asarray(json.loads(a)["logits"], np.float32))
        out[f"client_decode_{enc}_ms"] = round(1e3 * clock(decode, 20), 3)
    return out


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
    p.add_argument("--threads", type=int, default=1,
                   help="torch, local and server ORT threads (1: steady on a shared box)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting, interleaved; the best counts")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    data = load_dataset(args.data)
    transfer = transfer_split(data, args.transfer, args.seed) if args.transfer else data.train
    x, y = transfer.tensors[0], transfer.tensors[1]
    xn = x.numpy()
    with tempfile.TemporaryDirectory(prefix="sdb-remote-kd-") as tmp:
        root = Path(tmp)
        print(f"building the {args.data} bundle (teacher {args.teacher_epochs} epochs, wrap {args.wrap_epochs})...",
              flush=True)
        bundle_path, master = build_bundle(data, root, args)
        bundle = load_bundle(bundle_path, master, session_options=ort_options(args.threads, 1))  # the server's threads
        server = Server(root, bundle_path, args.threads)
        try:
            client = Client(server.url, server.key, batch_size=args.request_batch)
            z_local = bundle.distill_logits(xn)
            max_diff = {enc: float(np.abs(z_local - client.distill_logits(NAME, xn, encoding=enc)).max())
                        for enc in ENCODINGS}
            load_start = os.getloadavg()
            local = lambda xb: torch.from_numpy(bundle.distill_logits(xb.numpy()))

            def orders(epoch):
                return np.random.default_rng(args.seed + epoch).permutation(len(x))

            def local_batches(epoch):
                idx = orders(epoch)
                for i in range(0, len(idx), args.batch_size):
                    j = idx[i:i + args.batch_size]
                    yield x[j], y[j], torch.from_numpy(bundle.distill_logits(x[j].numpy()))

            def remote_per_batch(enc: str, prefetch: int) -> dict:
                with RemoteTeacher(client, NAME, args.temperature, args.batch_size, prefetch=prefetch,
                                   encoding=enc) as t:
                    def batches(epoch):  # the order of local_batches: iter_batches shuffles with the same generator
                        yield from t.iter_batches(x, y, batch_size=args.batch_size, shuffle=True,
                                                  seed=args.seed + epoch)
                    return run_per_batch(data, transfer, batches, args)

            def remote_distill(enc: str) -> dict:
                with RemoteTeacher(client, NAME, args.temperature, args.request_batch, encoding=enc) as t:
                    return run_distill(data, transfer, t, args)

            settings = {
                ("distill", "local"): lambda: run_distill(data, transfer, local, args),
                **{("distill", f"remote_{e}"): (lambda e=e: remote_distill(e)) for e in ENCODINGS},
                ("per_batch", "local"): lambda: run_per_batch(data, transfer, local_batches, args),
                **{("per_batch", f"remote_{e}{'' if pf else '_no_prefetch'}"): (lambda e=e, pf=pf: remote_per_batch(e, pf))
                   for e in ENCODINGS for pf in (1, 0)}}
            runs: dict[tuple[str, str], list[dict]] = {k: [] for k in settings}
            for r in range(args.repeats):
                print(f"round {r + 1}/{args.repeats}: distill() and the per-batch loop, local and remote "
                      f"(.npy, JSON)...", flush=True)
                for k, run in settings.items():
                    runs[k].append(run())
            results: dict = {"distill": {}, "per_batch": {}}
            for (setting, label), rs in runs.items():
                results[setting][label] = best_of(rs)
            print("where the time goes: the teacher's logits for the transfer set once...", flush=True)
            results["fetch"] = where_the_time_goes(client, server, bundle, xn, args)
            client.close()
        finally:
            server.stop()
    load_after = os.getloadavg()

    d, pb = results["distill"], results["per_batch"]
    ratio = lambda a, b: round(a["samples_per_s"] / b["samples_per_s"], 3)
    results["targets"] = {
        "acc_gap": round(d["remote_npy"]["acc"] - d["local"]["acc"], 2),
        "acc_within_0.5": all(abs(d[f"remote_{e}"]["acc"] - d["local"]["acc"]) <= 0.5 for e in ENCODINGS),
        "throughput_ratio": ratio(d["remote_npy"], d["local"]),
        "throughput_at_least_0.9x": d["remote_npy"]["samples_per_s"] >= 0.9 * d["local"]["samples_per_s"],
        "throughput_ratio_json": ratio(d["remote_json"], d["local"]),
        "per_batch_throughput_ratio": ratio(pb["remote_npy"], pb["local"]),
        "per_batch_throughput_ratio_no_prefetch": ratio(pb["remote_npy_no_prefetch"], pb["local"]),
        "per_batch_throughput_ratio_json": ratio(pb["remote_json"], pb["local"])}
    results["setup"] = {"data": args.data, "transfer": len(transfer), "student": args.student, "epochs": args.epochs,
                        "batch_size": args.batch_size, "request_batch": args.request_batch, "seed": args.seed,
                        "threads": args.threads, "repeats": args.repeats,
                        "max_abs_logit_diff_local_vs_remote": max_diff, "cpus": os.cpu_count(),
                        "load_avg_1_5_15": {"before": [round(v, 2) for v in load_before],
                                            "measuring": [round(v, 2) for v in load_start],
                                            "after": [round(v, 2) for v in load_after]}}

    print(f"\n{args.data}: {args.student} student, {len(transfer)} transfer images, {args.epochs} epochs, "
          f"seed {args.seed}, {args.threads} thread(s), best of {args.repeats}; max |local - remote logits| = "
          + ", ".join(f"{v:.1e} ({e})" for e, v in max_diff.items()))
    print(f"{'setting':46} {'test acc %':>10} {'samples/s':>10} {'median':>10} {'× local':>8}")
    names = {"local": "local keyed path", "remote_npy": "remote, .npy", "remote_json": "remote, JSON",
             "remote_npy_no_prefetch": "remote, .npy, no prefetch",
             "remote_json_no_prefetch": "remote, JSON, no prefetch"}
    for setting, title in (("distill", "distill()"), ("per_batch", "per-batch loop")):
        for label, r in results[setting].items():
            print(f"{title + ': ' + names[label]:46} {r['acc']:10.2f} {r['samples_per_s']:10.1f} "
                  f"{r['median_samples_per_s']:10.1f} {ratio(r, results[setting]['local']):8.2f}")
    f = results["fetch"]
    print(f"\nteacher logits for {f['samples']} samples once: local {f['local_s'] * 1e3:.1f} ms; remote .npy "
          f"{f['remote_npy_s'] * 1e3:.1f} ms (server CPU {f['server_cpu_npy_s'] * 1e3:.1f} ms), JSON "
          f"{f['remote_json_s'] * 1e3:.1f} ms (server CPU {f['server_cpu_json_s'] * 1e3:.1f} ms)")
    print(f"one {args.request_batch}-sample request: .npy {f['request_bytes_npy']:,} bytes, encode "
          f"{f['client_encode_npy_ms']:.2f} ms, decode {f['client_decode_npy_ms']:.3f} ms; JSON "
          f"{f['request_bytes_json']:,} bytes, encode {f['client_encode_json_ms']:.2f} ms, "
          f"decode {f['client_decode_json_ms']:.3f} ms")
    t = results["targets"]
    print(f"\nremote - local accuracy {t['acc_gap']:+.2f} (target within 0.5: {'met' if t['acc_within_0.5'] else 'MISSED'}); "
          f"distill() throughput {t['throughput_ratio']:.2f}x local with .npy (target >= 0.9x: "
          f"{'met' if t['throughput_at_least_0.9x'] else 'MISSED'}), {t['throughput_ratio_json']:.2f}x with JSON; "
          f"per-batch loop {t['per_batch_throughput_ratio']:.2f}x (.npy), {t['per_batch_throughput_ratio_json']:.2f}x "
          f"(JSON)")
    print("load average (1, 5, 15 min): before " + ", ".join(map(str, results["setup"]["load_avg_1_5_15"]["before"]))
          + "; after " + ", ".join(map(str, results["setup"]["load_avg_1_5_15"]["after"])))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
