"""Hot add and remove under load, refused bundles, and models changed by the CLI."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from service import errors
from service.metrics import Metrics
from service.middleware import ServiceMiddleware

from .conftest import deploy, make_settings, run_sdb, sdb_bytes, sdb_env, start_service

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]  # SQLite and PostgreSQL
GOOD = {"inputs": np.zeros((2, 1, 8, 8)).tolist()}


async def test_hot_add_remove_under_concurrent_requests(svc, bundles):
    c = svc.client
    statuses: dict[str, list[int]] = {"digits-a": [], "digits-b": []}
    stop = asyncio.Event()

    async def hammer(name: str) -> None:
        while not stop.is_set():
            r = await c.post(f"/v1/models/{name}/predict", json=GOOD)
            statuses[name].append(r.status_code)
            if r.status_code != 200:
                assert r.json()["error"]["code"] == "model_not_found"
            await asyncio.sleep(0)  # in process a 404 never suspends: let the others run

    async def churn() -> None:
        for _ in range(4):
            assert (await c.delete("/v1/models/digits-b", headers=svc.admin)).status_code == 200
            await asyncio.sleep(0)
            r = await deploy(c, bundles.b, svc.admin)
            assert r.status_code == 201, r.text
        stop.set()

    await asyncio.gather(churn(), *(hammer(n) for n in ("digits-a", "digits-b") for _ in range(4)))
    assert statuses["digits-a"] and set(statuses["digits-a"]) == {200}
    assert set(statuses["digits-b"]) <= {200, 404} and 200 in statuses["digits-b"]
    assert (await c.post("/v1/models/digits-b/predict", json=GOOD)).status_code == 200


def tampered_copies(bundles, tmp_path):
    onnx = tmp_path / "onnx"
    shutil.copytree(bundles.b, onnx)
    data = bytearray((onnx / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (onnx / "model.onnx").write_bytes(bytes(data))
    meta = tmp_path / "meta"
    shutil.copytree(bundles.b, meta)
    m = json.loads((meta / "meta.json").read_text())
    m["lam"] = 0.9  # files still hash fine: the sealed key's associated data catches it
    (meta / "meta.json").write_text(json.dumps(m))
    key = tmp_path / "key"
    shutil.copytree(bundles.b, key)
    (key / "key.sealed").unlink()
    return [onnx, meta, key]


async def test_tampered_bundle_refused_others_keep_serving(svc, bundles, tmp_path):
    c = svc.client
    for bad in tampered_copies(bundles, tmp_path):
        r = await deploy(c, bad, svc.admin)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bundle_refused", r.text
        assert (await c.post("/v1/models/digits-b/predict", json=GOOD)).status_code == 200
    assert len((await c.get("/v1/models")).json()["models"]) == 3
    audit = [a.action for a in svc.app.state.store.audit_log()]
    assert audit.count("model.refused") == 3


async def test_bundle_tampered_on_disk_is_refused_at_start(bundles, tmp_path):
    good = tmp_path / "b"
    shutil.copytree(bundles.b, good)
    settings = make_settings(tmp_path / "data", bundles)
    svc, manager = await start_service(settings, bundles.a)
    svc.app.state.host.add(good, actor="cli")  # registered in place, as `sdb models add` does
    await svc.client.aclose()
    await manager.__aexit__(None, None, None)
    (good / "model.onnx").write_bytes((good / "model.onnx").read_bytes() + b"\0")
    svc, manager = await start_service(settings)
    try:
        ready = (await svc.client.get("/readyz")).json()
        assert ready["models"] == 1 and "digits-b@1" in ready["failed"]
        assert (await svc.client.post("/v1/models/digits-a/predict", json=GOOD)).status_code == 200
        # the store has it, the bundle fails: a 503 that says why (no server path), tried once, never a crash
        for _ in range(2):
            r = await svc.client.post("/v1/models/digits-b/predict", json=GOOD)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
            assert "model.onnx was altered" in r.text and str(tmp_path) not in r.text
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_cli_models_add_remove_reach_running_server(svc, bundles, tmp_path):
    env = sdb_env(svc.settings.data_dir, bundles)
    c = svc.client
    r = await anyio.to_thread.run_sync(lambda: run_sdb("models", "remove", "digits-b", env=env))
    assert r.returncode == 0, r.stderr
    await _until(lambda: c.get("/v1/models/digits-b"), 404)
    r = await anyio.to_thread.run_sync(lambda: run_sdb("models", "add", str(bundles.b), env=env))
    assert r.returncode == 0 and "registered digits-b" in r.stdout, r.stderr
    await _until(lambda: c.get("/v1/models/digits-b"), 200)
    bad = tampered_copies(bundles, tmp_path)[0]
    r = await anyio.to_thread.run_sync(lambda: run_sdb("models", "add", str(bad), env=env))
    assert r.returncode == 2 and "refused" in r.stderr
    assert [(m.name, m.version) for m in svc.app.state.store.list_models()] == [
        ("digits-a", "1"), ("digits-a", "2"), ("digits-b", "1")]


async def _until(call, status: int, seconds: float = 10.0) -> None:
    """The server syncs the store every models_sync_s (0.1 s here): poll its answer."""
    with anyio.fail_after(seconds):
        while (await call()).status_code != status:
            await anyio.sleep(0.05)


async def test_unexpected_exception_is_a_bare_500_and_serving_goes_on():
    # The same stack as build_app: error handlers, then the service middleware, then routes.
    app = FastAPI()
    errors.install(app)
    app.add_middleware(ServiceMiddleware, max_payload_bytes=1024, metrics=Metrics(), host_of=lambda: None)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals /etc/passwd")

    @app.get("/fine")
    async def fine():
        return {"ok": True}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/boom")
        assert r.status_code == 500 and r.json() == {"error": {"code": "internal_error",
                                                               "message": "internal server error"}}
        assert (await c.get("/fine")).json() == {"ok": True}


async def test_versions_past_the_model_cache_are_unloaded_and_served_again(bundles, tmp_path):
    """Every version deployed used to stay loaded for good (a model re-wrapped nightly grew the server without
    end). With room for about one bundle, three versions are all served, listed and answered as their own
    bundle answers, from at most one loaded session; a dropped version whose file is gone is a 503 that names
    no server path, and the others go on."""
    from sdb_core.bundle import load_bundle

    one = len(sdb_bytes(bundles.a)) / (1 << 20)
    settings = make_settings(tmp_path / "data", bundles, model_cache_mb=1.2 * one)
    svc, manager = await start_service(settings, bundles.a, bundles.a2, bundles.b)
    try:
        host, x = svc.app.state.host, np.asarray(GOOD["inputs"], np.float32)
        want = {(name, v): load_bundle(path, settings.master_key).public_logits(x)
                for name, v, path in (("digits-a", "1", bundles.a), ("digits-a", "2", bundles.a2),
                                      ("digits-b", "1", bundles.b))}
        listed = (await svc.client.get("/v1/models")).json()["models"]
        assert sorted((m["name"], m["version"]) for m in listed) == sorted(want)
        for _ in range(2):
            for (name, v), logits in want.items():
                r = await svc.client.post(f"/v1/models/{name}/predict?version={v}&top_k=10", json=GOOD)
                assert r.status_code == 200, r.text
                got = np.array([[p["scores"][p["indices"].index(k)] for k in range(10)] for p in r.json()["predictions"]])
                e = np.exp(logits - logits.max(1, keepdims=True))
                np.testing.assert_allclose(got, e / e.sum(1, keepdims=True), atol=1e-4, err_msg=f"{name} v{v}")
                assert len(host.bundles) == 1
        assert host.bundles.loads >= 5  # each version loaded again after the others

        gone = host.loaded("digits-a", "1")
        assert gone not in host.bundles
        Path(gone.path).unlink()
        r = await svc.client.post("/v1/models/digits-a/predict?version=1", json=GOOD)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
        assert str(settings.data_dir) not in r.text and "cannot be served" in r.text
        assert (await svc.client.post("/v1/models/digits-b/predict", json=GOOD)).status_code == 200
        assert (await svc.client.post("/v1/models/digits-a/predict", json=GOOD)).status_code == 200  # version 2
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)
