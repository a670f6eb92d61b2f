"""How far can the v2 binary extension beat v2 JSON? The per-request floors, and the bound they set.

    python benchmarks/v2_bound.py --serve-json benchmarks/results/serve_v2.json --json benchmarks/results/v2_bound.json

Serving throughput at c=8 is bounded by CPU per request (two cores, shared with the load
generator). A request costs the HTTP server (uvicorn + httptools), decoding the body, the model,
and everything else the application does (routing, auth, limits, batching, the answer). Only
decoding differs between the two encodings, so binary/JSON throughput is at most

    (echo_json + decode_json + model + app) / (echo_binary + decode_binary + model + app)

and largest at app = 0. Measured here, each with the real code on serve.py's one-sample mnist
request (784 floats):
- echo: a bare ASGI app under uvicorn (sdb serve's HTTP protocol) that reads the body and answers 40 bytes, driven by wrk at
  c=8: the server's CPU per request (from /proc, every thread);
- decode: ``service.routes.v2``'s own body reader (header split, size checks, tensor from JSON or
  raw bytes), CPU per call;
- model: the bundle's public logits at a micro-batch of 8 under the server's ONNX Runtime session
  options (``ModelHost.session_options``), CPU per sample;
and, from ``--serve-json`` (``benchmarks/serve.py``'s output), the real server's CPU per request,
from which the application's own share follows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import free_port, point, prepare, v2_requests  # benchmarks/ is on the path

TARGET = 1.3  # issue 25: v2 binary at c=8 >= 1.3x v2 JSON


async def echo_app(scope, receive, send) -> None:
    """The least an HTTP/1.1 server on uvicorn can do with a request: read its body, answer."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"outputs": [0.1, 0.2, 0.3, 0.4]}' + b" " * 6})


def cpu_per_call(fn, seconds: float) -> float:
    """Microseconds of this process's CPU per call of ``fn`` (after a warm-up)."""
    for _ in range(50):
        fn()
    n, c0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.process_time() - c0) / n * 1e6


def echo_cpu(requests: dict[str, bytes], seconds: float) -> dict[str, float]:
    port = free_port()
    # under sdb serve's HTTP protocol (service.http_protocol: one send per answer)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "v2_bound:echo_app", "--port", str(port),
                             "--http", "service.http_protocol:HttpProtocol", "--log-level", "warning",
                             "--no-access-log"], cwd=Path(__file__).parent,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        import httpx

        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1.0)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        return {name: point(port, raw, 8, seconds, pid=proc.pid, loadgen="wrk")["server_cpu_ms"] * 1000
                for name, raw in requests.items()}
    finally:
        proc.terminate()
        proc.wait()


def decode_cpu(requests: dict[str, bytes], seconds: float) -> dict[str, float]:
    from service import oip_binary
    from service.routes.v2 import _inputs
    from service.settings import Settings

    max_samples = Settings().max_request_samples  # what the route decodes with

    out = {}
    for name, raw in requests.items():
        head, body = raw.split(b"\r\n\r\n", 1)
        length = next((line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"inference-header-content-length")), None)

        def decode(body=body, length=length):
            header, binary = oip_binary.split(body, length)
            return _inputs(header, oip_binary.input_chunks(header["inputs"], binary, length is not None), max_samples)

        out[name] = cpu_per_call(decode, seconds)
    return out


def model_cpu(data_dir: Path, bundle: Path, x: np.ndarray, seconds: float) -> float:
    from service.registry import ModelHost
    from service.settings import Settings
    from service.store import Store

    settings = Settings(data_dir=data_dir)
    store = Store(settings.db_url)
    host = ModelHost(settings, store)
    try:
        b = host.load(bundle)
        batch = np.concatenate([x] * 8)[:8]
        return cpu_per_call(lambda: b.public_logits(batch), seconds) / len(batch)
    finally:
        host.close()
        store.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0, help="per measured figure")
    p.add_argument("--serve-json", help="benchmarks/serve.py's output, for the real server's CPU per request")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sdb-bound-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        bundle, x = prepare(data_dir, None)
        requests = {k: v for k, v in v2_requests(x).items() if k in ("v2_json", "v2_binary")}
        model = model_cpu(data_dir, bundle, x[:1], args.seconds)
    decode = decode_cpu(requests, args.seconds)
    echo = echo_cpu(requests, args.seconds)
    floor = {k: echo[k] + decode[k] + model for k in requests}
    bound = floor["v2_json"] / floor["v2_binary"]
    # The application's own CPU per request (the same for both encodings) at which the bound falls to TARGET.
    app_for_target = max(0.0, (floor["v2_json"] - TARGET * floor["v2_binary"]) / (TARGET - 1))
    rows = [("HTTP server (bare uvicorn echo, c=8)", echo), ("decode the body (service.routes.v2)", decode),
            ("model, per sample at batch 8", {k: model for k in requests}), ("floor: their sum", floor)]
    out: dict = {"us_per_request": {name: {k: round(v, 1) for k, v in r.items()} for name, r in rows},
                 "bound_binary_over_json": round(bound, 3), "target": TARGET,
                 "app_us_allowed_for_target": round(app_for_target, 1)}
    if args.serve_json:
        served = json.loads(Path(args.serve_json).read_text())["http"]
        real = {k: served[k]["8"]["server_cpu_ms"] * 1000 for k in requests}
        out["server_us_per_request"] = {k: round(v, 1) for k, v in real.items()}
        out["app_us_per_request"] = {k: round(real[k] - floor[k], 1) for k in requests}
        out["measured_binary_over_json"] = round(served["v2_binary"]["8"]["rps"] / served["v2_json"]["8"]["rps"], 3)
        rows.append(("the real server (serve.py, c=8)", real))
    print(f"{'CPU µs per request':40} {'v2 JSON':>9} {'v2 binary':>9}")
    for name, r in rows:
        print(f"{name:40} {r['v2_json']:9.1f} {r['v2_binary']:9.1f}")
    print(f"\nbinary/JSON throughput is at most {bound:.2f}x with no application cost at all; "
          f"{TARGET}x needs the application's own CPU per request <= {app_for_target:.0f} µs")
    if "app_us_per_request" in out:
        print(f"the server's application share now: {out['app_us_per_request']['v2_binary']:.0f} µs (binary); "
              f"measured ratio {out['measured_binary_over_json']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
