"""Serving benchmark: ``sdb serve`` on loopback, driven by concurrent keep-alive clients.

Measures in-process ONNX Runtime throughput, HTTP ``predict`` and ``distill`` at several
concurrencies against a naive FastAPI endpoint running the same ONNX session, the Open Inference
Protocol's ``infer`` as JSON and with the binary tensor extension (tritonclient's default) on the
same one-sample input (784 floats for the mnist bundle), a soak (errors and resident memory growth),
and the cold start of ``sdb serve`` to ``/readyz``.

    python benchmarks/serve.py --json OUT.json [--seconds 15] [--quick] [--bundle PATH] [--rows ...]

Without ``--bundle`` it uses ``.sdb/bundles/mnist-demo`` (``sdb demo``) when its master
key is at hand, else builds a small CNN bundle on mnist-5k in a few seconds.

The load generator shares the machine's two cores with the server. It is ``wrk`` (C,
one thread; ``apt-get install wrk``) when on PATH, else a minimal HTTP/1.1 client on
asyncio streams (``--loadgen python``). The Python client tops out near 1,400 requests/s
here, which is where a plain FastAPI endpoint already is: with it every server looks
alike and the measure is of the client. ``wrk`` costs a few microseconds a request, so
the servers' own costs decide. Every point also records the server's CPU milliseconds
per request (from /proc), a figure that other load on the machine barely moves.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = """targets: predict@8 >= 1.25x naive@8; predict@32 >= 0.95x predict@8 and p99 < 5x p50;
soak 0 errors, RSS growth < 10%; distill p50 within 10% of predict p50 @1;
HTTP p50 - in-process batch-1 < 2 ms @1; cold start < 5 s; v2 binary@8 >= 1.3x v2 JSON@8"""
ROWS = ("predict", "naive", "distill", "v2_json", "v2_binary", "grpc")  # what --rows picks from; gRPC: see grpc_rows


# --------------------------------------------------------------------------- the naive baseline
def naive_app(bundle_path: str):
    """The plain way: parse JSON, run the session, return JSON. Twenty lines."""
    from sdb_core.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    app = FastAPI()

    @app.get("/readyz")
    async def ready():
        return {"status": "ready"}

    @app.post("/predict")
    async def predict(request: Request):
        body = await request.json()
        x = np.asarray(body["inputs"], dtype=np.float32)
        probs = bundle.predict(x)
        top = probs.argmax(1)
        return {"predictions": [{"label": bundle.meta["labels"][i], "score": float(p[i])}
                                for i, p in zip(top, probs)]}

    return app


# --------------------------------------------------------------------------- load generator
class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def raw_post(path: str, body: bytes, headers: dict[str, str] | None = None,
             content_type: str = "application/json") -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def v2_requests(x: np.ndarray) -> dict[str, bytes]:
    """One sample to ``/v2/.../infer``: as JSON, and as tritonclient sends it by default (binary both ways)."""
    sample = np.ascontiguousarray(x[:1], dtype=np.float32)
    tensor = {"name": "input", "shape": list(sample.shape), "datatype": "FP32"}
    # The same values both ways, as tritonclient sends them: JSON needs every digit of each float32.
    as_json = json.dumps({"inputs": [{**tensor, "data": sample.ravel().tolist()}]}).encode()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": sample.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    path = "/v2/models/mnist-demo/infer"
    return {"v2_json": raw_post(path, as_json),
            "v2_binary": raw_post(path, header + sample.tobytes(), {"Inference-Header-Content-Length": str(len(header))},
                                  "application/octet-stream")}


def grpc_rows(args, port: int, x: np.ndarray, pid: int) -> dict | None:
    """The gRPC server's row (service/grpc/, ``SDB_GRPC_PORT``): ModelInfer on the same sample, raw as
    tritonclient sends it, at each of ``args.concurrency``, as ``{str(c): point}`` with the keys :func:`point`
    gives (rps, p50_ms, p99_ms, errors, server_cpu_ms); main() records it as ``results["grpc"]``.

    The load generator is grpc.aio (gRPC's C core) on one channel, the request serialized once and the
    answer left as bytes: no wrk for HTTP/2 here, so rps and latency include a Python client's cost on
    the shared cores; server CPU per request does not."""
    if "grpc" not in args.rows:
        return None
    from tritonclient.grpc import service_pb2

    sample = np.ascontiguousarray(x[:1], dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="mnist-demo")
    request.inputs.add(name="input", datatype="FP32", shape=list(sample.shape))
    request.raw_input_contents.append(sample.tobytes())
    raw = request.SerializeToString()
    out = {}
    for c in args.concurrency:
        asyncio.run(grpc_drive(port, raw, c, min(1.0, args.seconds / 3)))  # warm-up
        c0 = cpu_seconds(pid)
        r = asyncio.run(grpc_drive(port, raw, c, args.seconds))
        r["server_cpu_ms"] = round((cpu_seconds(pid) - c0) * 1000 / max(r.pop("requests"), 1), 4)
        out[str(c)] = r
        print(f"{'grpc':9s} c={c:<3d}", r, file=sys.stderr)
    return out


async def grpc_drive(port: int, raw: bytes, concurrency: int, seconds: float) -> dict:
    """``concurrency`` calls in flight on one channel (HTTP/2 streams, as a tritonclient) for ``seconds``."""
    import grpc

    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        await infer(raw)
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    await infer(raw)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"rps": round(len(latencies) / elapsed, 1), "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3), "errors": errors, "requests": len(latencies) + errors}


async def drive(port: int, raw: bytes, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        conn = Conn("127.0.0.1", port)
        try:
            await conn.open()
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    status = await conn.request(raw)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    conn.close()
                    await conn.open()
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"rps": round(len(latencies) / elapsed, 1), "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3), "errors": errors}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * _UNITS[unit]


def wrk(port: int, raw: bytes, concurrency: int, seconds: float) -> dict:
    """The same request driven by wrk: one thread, ``concurrency`` keep-alive connections."""
    head, body = raw.split(b"\r\n\r\n", 1)
    request_line, *header_lines = head.decode().split("\r\n")
    method, path, _ = request_line.split(" ")
    headers = [h.split(": ", 1) for h in header_lines if not h.lower().startswith(("host:", "content-length:"))]
    lua = [f'wrk.method = "{method}"', f"wrk.body = {lua_string(body)}"]
    lua += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(lua) + "\n")
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency",
                              "-s", f.name, f"http://127.0.0.1:{port}{path}"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    done = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": round(_ms(pct["50"]), 3),
            "p99_ms": round(_ms(pct["99"]), 3), "errors": errors, "requests": done}


def lua_string(data: bytes) -> str:
    """``data`` as a Lua string literal: printable ASCII as is, every other byte as a decimal escape
    (a long string would turn the CRs of a binary body into LFs)."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in data) + '"'


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def point(port: int, raw: bytes, concurrency: int, seconds: float, *, pid: int, loadgen: str) -> dict:
    if loadgen == "wrk":
        wrk(port, raw, concurrency, 1.0)  # warm-up
        c0 = cpu_seconds(pid)
        r = wrk(port, raw, concurrency, seconds)
        requests = r.pop("requests")
    else:
        asyncio.run(drive(port, raw, concurrency, min(1.0, seconds / 3)))  # warm-up
        c0 = cpu_seconds(pid)
        r = asyncio.run(drive(port, raw, concurrency, seconds))
        requests = r["rps"] * seconds
    r["server_cpu_ms"] = round((cpu_seconds(pid) - c0) * 1000 / max(requests, 1), 4)
    return r


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- the bundle
def prepare(data_dir: Path, bundle: str | None) -> tuple[Path, np.ndarray]:
    """A demo-sized bundle at <data_dir>/bundles/mnist-demo sealed under data_dir's master key."""
    from sdb_core.bundle import export_bundle, load_bundle
    from sdb_core.data import load_dataset
    from sdb_core.protect.key import load_or_create_master_key

    target = data_dir / "bundles" / "mnist-demo"
    default = ROOT / ".sdb" / "bundles" / "mnist-demo"
    src = Path(bundle) if bundle else (default if default.exists() else None)
    if src is not None and (src.parent.parent / "master.key").exists():
        shutil.copy(src.parent.parent / "master.key", data_dir / "master.key")
        shutil.copytree(src, target)
        meta = load_bundle(target).meta
        data = load_dataset("mnist-5k" if meta["input"]["shape"] == [1, 28, 28] else meta.get("data", "digits"))
        return target, data.test.tensors[0][:64].numpy()
    import torch

    from sdb_core.models import create_model
    from sdb_core.protect import SDBConfig, train_box
    from sdb_core.train import TrainConfig, train_classifier

    print("building a small CNN bundle on mnist-5k …", file=sys.stderr)
    torch.manual_seed(0)
    data = load_dataset("mnist-5k")
    teacher = create_model("cnn", num_classes=data.num_classes, in_shape=data.in_shape)
    train_classifier(teacher, data.train, TrainConfig(epochs=1))
    box = train_box(teacher, data, SDBConfig(train=TrainConfig(epochs=1))).box
    export_bundle(box, target, name="mnist-demo", in_shape=data.in_shape, mean=data.mean, std=data.std,
                  labels=data.labels, master_key=load_or_create_master_key(data_dir / "master.key"))
    return target, data.test.tensors[0][:64].numpy()


def inprocess(bundle: Path, x: np.ndarray, seconds: float) -> dict:
    from sdb_core.bundle import load_bundle

    b = load_bundle(bundle)
    one, batch = x[:1], np.concatenate([x] * 1)[:32]
    for _ in range(50):
        b.public_logits(one)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        b.public_logits(one)
        n += 1
    t1 = (time.perf_counter() - t0) / n
    m, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        b.public_logits(batch)
        m += 1
    return {"batch1_ms": round(t1 * 1000, 4), "batch1_per_s": round(1 / t1, 1),
            "batch32_per_s": round(32 * m / (time.perf_counter() - t0), 1)}


# --------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seconds", type=float, default=15.0, help="per measured point")
    p.add_argument("--soak", type=float, default=60.0, help="soak seconds at concurrency 32")
    p.add_argument("--quick", action="store_true", help="3 s points, 10 s soak")
    p.add_argument("--bundle", help="a bundle dir whose parent's parent holds its master.key")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which servers and routes to measure")
    p.add_argument("--loadgen", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python",
                   help="load generator (default wrk when installed)")
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_server:
        import uvicorn

        uvicorn.run(naive_app(args.bundle), host="127.0.0.1", port=args.port, log_level="warning",
                    access_log=False)
        return 0
    if args.quick:
        args.seconds, args.soak = 3.0, 10.0

    tmp = Path(tempfile.mkdtemp(prefix="sdb-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        data_dir = tmp / "data"
        data_dir.mkdir()
        bundle, x = prepare(data_dir, args.bundle)
        body = json.dumps({"inputs": np.round(x[:1], 4).tolist()}).encode()
        results: dict = {"inprocess": inprocess(bundle, x, min(args.seconds, 4.0)), "loadgen": args.loadgen,
                         "load_average": os.getloadavg()[0]}
        print("in-process:", results["inprocess"], file=sys.stderr)

        from service.auth import create_key
        from service.settings import Settings
        from service.store import Store

        settings = Settings(data_dir=data_dir)
        settings.data_dir.mkdir(exist_ok=True)
        store = Store(settings.db_url)
        token, _ = create_key(store, settings.pepper, scopes=["distill"], name="bench")
        store.close()

        port, grpc_port = free_port(), free_port()
        # Throughput is what is measured: the per-caller rate limits (429s) are off for this server.
        env = {**os.environ, "SDB_DATA_DIR": str(data_dir), "SDB_PORT": str(port), "SDB_RATE_LIMIT_KEY_PER_S": "0",
               "SDB_RATE_LIMIT_ADDRESS_PER_S": "0", "SDB_GRPC_PORT": str(grpc_port if "grpc" in args.rows else 0)}
        sdb = str(Path(sys.executable).parent / "sdb")
        t0 = time.perf_counter()
        server = subprocess.Popen([sdb, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(server)
        wait_ready(f"http://127.0.0.1:{port}", server)
        results["cold_start_s"] = round(time.perf_counter() - t0, 2)
        print("cold start:", results["cold_start_s"], "s", file=sys.stderr)

        naive_port = free_port()
        naive = None if "naive" not in args.rows else subprocess.Popen([sys.executable, __file__, "--naive-server", "--port", str(naive_port),
                                  "--bundle", str(bundle)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if naive is not None:
            procs.append(naive)
            wait_ready(f"http://127.0.0.1:{naive_port}", naive)

        predict = raw_post("/v1/models/mnist-demo/predict", body)
        distill = raw_post("/v1/models/mnist-demo/distill", body, {"Authorization": f"Bearer {token}"})
        naive_req = raw_post("/predict", body)
        v2 = v2_requests(x)
        results["http"] = {"predict": {}, "distill": {}, "v2_json": {}, "v2_binary": {}}
        results["naive"] = {}
        rows = [("predict", server, port, predict, results["http"]["predict"]),
                ("naive", naive, naive_port, naive_req, results["naive"]),
                ("distill", server, port, distill, results["http"]["distill"]),
                ("v2_json", server, port, v2["v2_json"], results["http"]["v2_json"]),
                ("v2_binary", server, port, v2["v2_binary"], results["http"]["v2_binary"])]
        # Interleaved per concurrency, so every server and route sees the same machine state.
        for c in args.concurrency:
            for name, proc, port_, raw, slot in rows:
                if name in args.rows:
                    slot[str(c)] = point(port_, raw, c, args.seconds, pid=proc.pid, loadgen=args.loadgen)
                    print(f"{name:9s} c={c:<3d}", slot[str(c)], file=sys.stderr)
        grpc = grpc_rows(args, grpc_port, x, server.pid)
        if grpc is not None:
            results["grpc"] = grpc
        if naive is not None:
            stop(naive)

        before = rss_kb(server.pid)
        soak = (wrk(port, predict, 32, args.soak) if args.loadgen == "wrk"
                else asyncio.run(drive(port, predict, 32, args.soak)))
        after = rss_kb(server.pid)
        results["soak"] = {"seconds": args.soak, "errors": soak["errors"], "rps": soak["rps"],
                           "rss_growth": round((after - before) / before, 4), "rss_mb": round(after / 1024, 1)}
        print("soak:", results["soak"], file=sys.stderr)
        results["load_average_end"] = os.getloadavg()[0]
        results["targets"] = check(results)
        print(json.dumps(results, indent=2))
        print(TARGETS, file=sys.stderr)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        for pr in procs:
            if pr.poll() is None:
                stop(pr)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def check(r: dict) -> dict:
    pr, nv, ds = r["http"]["predict"], r["naive"], r["http"]["distill"]
    vj, vb = r["http"]["v2_json"], r["http"]["v2_binary"]
    out = {}
    if "8" in vj and "8" in vb:
        out["v2_binary8_vs_json8"] = round(vb["8"]["rps"] / vj["8"]["rps"], 3)
        out["v2_json8_cpu_over_binary8_cpu"] = round(vj["8"]["server_cpu_ms"] / vb["8"]["server_cpu_ms"], 3)
    if "grpc" in r and "8" in r["grpc"] and "8" in vb:
        out["grpc8_vs_v2_binary8"] = round(r["grpc"]["8"]["rps"] / vb["8"]["rps"], 3)
    if "8" in pr and "8" in nv:
        out["predict8_vs_naive8"] = round(pr["8"]["rps"] / nv["8"]["rps"], 3)
        out["naive8_cpu_over_predict8_cpu"] = round(nv["8"]["server_cpu_ms"] / pr["8"]["server_cpu_ms"], 3)
    if "8" in pr and "32" in pr:
        out["predict32_vs_predict8"] = round(pr["32"]["rps"] / pr["8"]["rps"], 3)
        out["predict32_p99_over_p50"] = round(pr["32"]["p99_ms"] / pr["32"]["p50_ms"], 2)
    if "1" in pr and "1" in ds:
        out["distill1_p50_over_predict1_p50"] = round(ds["1"]["p50_ms"] / pr["1"]["p50_ms"], 3)
        out["http1_p50_minus_inprocess_ms"] = round(pr["1"]["p50_ms"] - r["inprocess"]["batch1_ms"], 3)
    out["soak_ok"] = r["soak"]["errors"] == 0 and r["soak"]["rss_growth"] < 0.10
    out["cold_start_ok"] = r["cold_start_s"] < 5.0
    return out


if __name__ == "__main__":
    sys.exit(main())
