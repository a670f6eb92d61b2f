"""The application's own CPU per request, route by route: the app called in process, no HTTP server.

    python benchmarks/app_cpu.py --json OUT.json [--requests 8000] [--rounds 3]

What ``benchmarks/serve.py`` cannot separate from uvicorn and the load generator: the CPU time the app
(middleware, routing, auth, decoding, batching, the model, the answer) spends on one request. The demo-sized
bundle of serve.py is served from a fresh data dir; each route gets the request serve.py sends it (one mnist
sample: v1 predict and distill as JSON, v2 infer as JSON and as tritonclient's binary default), as 8 concurrent callers
on one event loop, after a warm-up. ``--rounds`` repeats the routes in turn (the machine drifts: compare
figures of one round, or paired runs of two trees). Pin ``OMP_NUM_THREADS=1`` and keep the machine quiet.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import prepare, raw_post, v2_requests  # benchmarks/ is on the path

CONCURRENCY = 8


def requests(x: np.ndarray, token: str) -> dict[str, bytes]:
    """Each route's raw HTTP/1.1 request, as serve.py sends it (distill with ``token``, a distill key)."""
    body = json.dumps({"inputs": np.round(x[:1], 4).tolist()}).encode()
    return {"v1_predict": raw_post("/v1/models/mnist-demo/predict", body),
            "v1_distill": raw_post("/v1/models/mnist-demo/distill", body, {"Authorization": f"Bearer {token}"}),
            **v2_requests(x)}


def scope_of(raw: bytes) -> tuple[dict, bytes]:
    """The ASGI scope of a raw request, and its body."""
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    method, path, _ = lines[0].split(b" ")
    headers = [(k.strip().lower(), v.strip()) for k, v in (line.split(b":", 1) for line in lines[1:])]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method.decode(),
            "scheme": "http", "path": path.decode(), "raw_path": path, "query_string": b"", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "root_path": ""}, body


async def call(app, scope: dict, body: bytes) -> None:
    sent, out = False, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a client that stays: the app never reads past the body

    async def send(message):
        out.append(message)

    await app(dict(scope), receive, send)
    if out[0]["status"] != 200:
        raise RuntimeError(f"{scope['path']} answered {out[0]['status']}: {out[-1].get('body', b'')[:300]!r}")


async def cpu_per_request(app, raw: bytes, n: int) -> float:
    """Microseconds of this process's CPU per request, ``n`` requests from CONCURRENCY callers."""
    scope, body = scope_of(raw)
    for _ in range(200):
        await call(app, scope, body)

    async def caller(k: int) -> None:
        for _ in range(k):
            await call(app, scope, body)

    t0 = time.process_time()
    await asyncio.gather(*(caller(n // CONCURRENCY) for _ in range(CONCURRENCY)))
    return (time.process_time() - t0) / (n // CONCURRENCY * CONCURRENCY) * 1e6


async def measure(args) -> dict:
    from asgi_lifespan import LifespanManager

    from service.app import build_app
    from service.auth import create_key
    from service.settings import Settings
    from service.store import Store

    data_dir = Path(tempfile.mkdtemp(prefix="sdb-app-cpu-")) / "data"
    (data_dir / "bundles").mkdir(parents=True)
    _, x = prepare(data_dir, args.bundle)
    settings = Settings(data_dir=data_dir, rate_limit_key_per_s=0, rate_limit_address_per_s=0)
    store = Store(settings.db_url)
    token, _ = create_key(store, settings.pepper, scopes=["distill"], name="bench")  # no quota, as serve.py's
    store.close()
    routes = requests(x, token)
    rounds: list[dict[str, float]] = []
    async with LifespanManager(build_app(settings)) as manager:
        for _ in range(args.rounds):
            rounds.append({name: round(await cpu_per_request(manager.app, raw, args.requests), 1)
                           for name, raw in routes.items()})
    return {"requests": args.requests, "concurrency": CONCURRENCY, "rounds": rounds,
            "best_us": {name: min(r[name] for r in rounds) for name in routes},
            "threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--requests", type=int, default=8000, help="per route and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bundle", help="a bundle dir whose parent's parent holds its master.key (serve.py's)")
    args = p.parse_args()
    result = asyncio.run(measure(args))
    print(f"{'CPU µs per request (app in process)':36}" + "".join(f"{n:>12}" for n in result["best_us"]))
    for i, r in enumerate(result["rounds"], 1):
        print(f"{'round ' + str(i):36}" + "".join(f"{v:12.1f}" for v in r.values()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
