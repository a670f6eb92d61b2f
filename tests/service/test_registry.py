"""Hot add and remove under load, refused bundles, and models changed by the CLI."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest

from service import errors
from service.metrics import Metrics
from service.middleware import ServiceApp

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


async def test_a_version_registered_before_the_class_name_rule_keeps_serving(bundles, tmp_path):
    """An upgrade to the release that checks class names (sdb_core/class_names.py) made every version whose labels
    break it a 503 model_unavailable, with nothing its owner could edit (the labels are bound to the sealed key). A
    new registration is refused; one recorded by an older release loads and serves."""
    from sdb_core.bundle import _sha256

    odd = tmp_path / "odd"  # a plain bundle, labels alike in NFC, as an older release let register
    shutil.copytree(bundles.b, odd)
    (odd / "key.sealed").unlink()
    meta = json.loads((odd / "meta.json").read_text())
    meta.update(name="odd", mode="plain", labels=["caf\u00e9", "cafe\u0301", *meta["labels"][2:]],
                files={"model.onnx": _sha256((odd / "model.onnx").read_bytes())})
    meta.pop("public_form", None)
    meta.pop("keyed_scale", None)
    (odd / "meta.json").write_text(json.dumps(meta))
    settings = make_settings(tmp_path / "data", bundles)
    svc, manager = await start_service(settings, bundles.a)
    try:
        with pytest.raises(errors.ApiError, match="two classes are named"):
            svc.app.state.host.add(odd, actor="cli")
        svc.app.state.store.add_model("odd", "1", str(odd))  # what the older release recorded
        r = await svc.client.post("/v1/models/odd/predict", json=GOOD)
        assert r.status_code == 200 and r.json()["predictions"][0]["labels"], r.text
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_cli_models_add_remove_reach_running_server(svc, bundles, tmp_path):
    env = sdb_env(svc.settings.data_dir, bundles)
    c = svc.client
    (copy,) = [Path(m.path) for m in svc.app.state.store.list_models() if m.name == "digits-b"]  # the deploy's
    assert copy.is_file() and svc.settings.bundles_dir in copy.parents
    r = await anyio.to_thread.run_sync(lambda: run_sdb("models", "remove", "digits-b", env=env))
    assert r.returncode == 0, r.stderr
    await _until(lambda: c.get("/v1/models/digits-b"), 404)
    assert not copy.exists()  # a removed version's copy is deleted, as the API's removal deletes it
    r = await anyio.to_thread.run_sync(lambda: run_sdb("models", "add", str(bundles.b), env=env))
    # its own version 1 was given once already (and removed): never again, the next one instead
    assert r.returncode == 0 and "registered digits-b version 2" in r.stdout, r.stderr
    assert "its bundle says version 1" in r.stderr
    await _until(lambda: c.get("/v1/models/digits-b"), 200)
    bad = tampered_copies(bundles, tmp_path)[0]
    r = await anyio.to_thread.run_sync(lambda: run_sdb("models", "add", str(bad), env=env))
    assert r.returncode == 2 and "refused" in r.stderr
    assert [(m.name, m.version) for m in svc.app.state.store.list_models()] == [
        ("digits-a", "1"), ("digits-a", "2"), ("digits-b", "2")]
    # a bundle registered in place is the admin's own: removing its version leaves it where it is
    r = await anyio.to_thread.run_sync(lambda: run_sdb("models", "remove", "digits-b", env=env))
    assert r.returncode == 0, r.stderr
    assert (bundles.b / "model.onnx").is_file() and (bundles.b / "meta.json").is_file()


async def _until(call, status: int, seconds: float = 10.0) -> None:
    """The server syncs the store every models_sync_s (0.1 s here): poll its answer."""
    with anyio.fail_after(seconds):
        while (await call()).status_code != status:
            await anyio.sleep(0.05)


async def test_unexpected_exception_is_a_bare_500_and_serving_goes_on(caplog):
    # The same stack as build_app: the service middleware in front, then FastAPI's with the error handlers, routes.
    app = ServiceApp()
    errors.install(app)
    app.put_in_front(max_payload_bytes=1024, metrics=Metrics(), host_of=lambda: None)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals /etc/passwd")

    @app.get("/fine")
    async def fine():
        return {"ok": True}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        with caplog.at_level(logging.ERROR, logger="sdb.service"):
            r = await c.get("/boom")
        assert r.status_code == 500 and r.json() == {"error": {"code": "internal_error",
                                                               "message": "internal server error"}}
        logged = [rec for rec in caplog.records if rec.name == "sdb.service"]
        assert len(logged) == 1 and "unhandled error on GET /boom" in logged[0].getMessage()  # once, with its trace
        assert logged[0].exc_info is not None
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
        metrics = (await svc.client.get("/metrics")).text
        assert "sdb_model_bundles_in_memory 1.0" in metrics and "sdb_models_loaded 3.0" in metrics
        assert f"sdb_model_reloads {float(host.bundles.loads)}" in metrics

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


# ---------------------------------------------------------------- the cache and the host under concurrency
def _host(tmp_path, bundles, cache_bundles: float | None = None, **over):
    """A ModelHost on its own store (the test's SDB_DATABASE_URL): one server process, driven directly.
    ``cache_bundles``: room in its BundleCache for about that many of the test bundles."""
    from service.registry import ModelHost
    from service.store import Store

    if cache_bundles is not None:
        over["model_cache_mb"] = cache_bundles * len(sdb_bytes(bundles.a)) / (1 << 20)
    settings = make_settings(tmp_path / "data", bundles, **over)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    return ModelHost(settings, store), store


def _sdb_files(bundles, tmp_path) -> dict[str, Path]:
    """The test bundles as .sdb files (what deploys serve), registered in place by ``add``."""
    out = {}
    for key, path in (("a", bundles.a), ("a2", bundles.a2), ("b", bundles.b)):
        out[key] = tmp_path / f"{key}.sdb"
        out[key].write_bytes(sdb_bytes(path))
    return out


def test_a_version_removed_while_the_cache_loads_it_again_is_not_kept(bundles, tmp_path):
    """A request holding version 1 (unloaded by the cache) loads it again; version 1 is removed meanwhile. The
    load finished by putting the removed version back in the cache, where it pushed out version 2, which is
    served; and a request queued on the removed version read its file again and served it after the removal."""
    from service.batching import BatcherClosed

    host, store = _host(tmp_path, bundles, cache_bundles=1.2)
    try:
        files = _sdb_files(bundles, tmp_path)
        host.add(files["a"], "t")
        host.add(files["a2"], "t")
        v1, v2 = host.loaded("digits-a", "1"), host.loaded("digits-a", "2")
        assert v1 not in host.bundles and v2 in host.bundles
        load, started, go, got = host.bundles._load, threading.Event(), threading.Event(), {}

        def slow_load(path):
            started.set()
            assert go.wait(10)
            return load(path)

        def request() -> None:
            try:
                got["bundle"] = v1.bundle
            except BatcherClosed as e:
                got["closed"] = e

        host.bundles._load = slow_load
        t = threading.Thread(target=request)
        t.start()
        assert started.wait(10)
        assert host.remove("digits-a", "1", "t") == [("digits-a", "1")]
        go.set()
        t.join(10)
        assert "closed" in got  # the batch's callers: 404 "was removed" (inference._served)
        assert v1 not in host.bundles and v2 in host.bundles and len(host.bundles) == 1
        loads = host.bundles.loads
        host.bundles._load = load
        with pytest.raises(BatcherClosed):  # queued after the removal: its file is not read again
            _ = v1.bundle
        assert host.bundles.loads == loads and v1 not in host.bundles
    finally:
        host.close()
        store.close()


def test_a_version_another_process_removed_is_not_found_when_the_cache_would_load_it_again(bundles, tmp_path):
    """Another process removes version 1 (and deletes its copy) while this one has it unloaded: a request here
    before this process's sync is a 404 "was removed", not a 503 for a missing file, and the version is no
    longer served here; a version whose file is gone while it is still registered stays a 503 (test above)."""
    from service.errors import ApiError

    host, store = _host(tmp_path, bundles, cache_bundles=1.2)
    try:
        files = _sdb_files(bundles, tmp_path)
        host.add(files["a"], "t")
        host.add(files["a2"], "t")
        v1 = host.loaded("digits-a", "1")
        assert v1 not in host.bundles
        assert [(r.name, r.version) for r in store.remove_model("digits-a", "1")] == [("digits-a", "1")]
        Path(v1.path).unlink()  # what the other process's removal does to a deploy's copy
        with pytest.raises(ApiError) as e:
            _ = v1.bundle
        assert (e.value.status, e.value.code) == (404, "model_not_found") and "was removed" in e.value.message
        assert ("digits-a", "1") not in host.failed  # not a broken version: a removed one, no longer served
        assert host.loaded("digits-a", "1") is None and host.loaded("digits-a").version == "2"
    finally:
        host.close()
        store.close()


def test_the_cache_bound_counts_every_file_of_a_bundle_directory(bundles, tmp_path):
    """``sdb models add`` registers a bundle directory in place: the cache weighed it as the directory entry
    (4 KiB), so with room for about one bundle every version stayed loaded, without bound."""
    host, store = _host(tmp_path, bundles, cache_bundles=1.2)
    try:
        for path in (bundles.a, bundles.a2, bundles.b):
            host.add(path, "t")
        assert len(host.bundles) == 1 and len(host.all()) == 3
    finally:
        host.close()
        store.close()


def test_a_version_loaded_on_demand_while_a_sync_serves_it_is_not_closed(bundles, tmp_path):
    """Another process deploys version 2. A request for it loads it on demand while this process's sync loads
    and serves it too; requests take the sync's model. The on-demand load then served its own copy in its
    place and closed the sync's batcher: those requests answered 404 "was removed" for a served version.
    (A deploy through this process that a sync served first, between the store and ``serve``, did the same.)"""
    host, store = _host(tmp_path, bundles)
    try:
        host.add(bundles.a, "t")
        store.add_model("digits-a", "2", str(bundles.a2))  # another process's deploy
        load, started, go, got = host.load, threading.Event(), threading.Event(), {}
        on_demand = []

        def load_gated(path):
            if threading.current_thread() in on_demand:
                started.set()
                assert go.wait(10)
            return load(path)

        host.load = load_gated
        host.bundles._load = load_gated
        t = threading.Thread(target=lambda: got.setdefault("model", host.get("digits-a", "2")))
        on_demand.append(t)
        t.start()
        assert started.wait(10)
        host.sync()
        served = host.loaded("digits-a", "2")
        assert served is not None
        go.set()
        t.join(10)
        assert got["model"] is served and host.loaded("digits-a", "2") is served
        x = bundles.x[:2]

        async def predict():
            return await served.logits(x)

        np.testing.assert_allclose(anyio.run(predict), load(bundles.a2).public_logits(x), atol=1e-5)
    finally:
        host.close()
        store.close()


def test_a_version_removed_while_a_sync_loads_it_is_not_served(bundles, tmp_path):
    """A sync loads every version it has not served yet; one removed (in another process) during that load
    was served until the next sync, a load and a models_sync_s after its removal."""
    host, store = _host(tmp_path, bundles)
    try:
        host.add(bundles.a, "t")
        store.add_model("digits-a", "2", str(bundles.a2))
        load = host.load

        def load_then_removed(path):
            bundle = load(path)
            if str(path) == str(bundles.a2):
                store.remove_model("digits-a", "2")
            return bundle

        host.load = load_then_removed
        host.sync()
        assert host.loaded("digits-a", "2") is None and host.versions("digits-a") == ["1"]
        host.load = load
        assert store.add_model("digits-a", "2", str(bundles.a2)).version == "3"  # a removed number is not given again
        host.sync()
        assert host.versions("digits-a") == ["1", "3"]
    finally:
        host.close()
        store.close()


def test_listing_while_a_sync_removes_a_name_does_not_fail(bundles, tmp_path):
    """``all()`` (GET /v1/models, /readyz, the sdb_models_loaded gauge of /metrics) read the models twice: a
    name a sync removed in between was a KeyError, a 500. The swap is made at the exact point it hurt."""
    host, store = _host(tmp_path, bundles)
    try:
        host.add(bundles.a, "t")
        host.add(bundles.b, "t")

        class RemovedWhileListed(dict):
            def __iter__(self):
                names = list(super().__iter__())
                host._uninstall("digits-b", "1")  # the sync thread, between the two reads
                return iter(names)

        host._models = RemovedWhileListed(host._models)
        assert [(m.name, m.version) for m in host.all()] == [("digits-a", "1"), ("digits-b", "1")]
        assert [(m.name, m.version) for m in host.all()] == [("digits-a", "1")]
    finally:
        host.close()
        store.close()


async def test_readyz_while_a_sync_changes_the_failed_versions(bundles, tmp_path):
    """/readyz iterated ``host.failed`` while a sync (another thread) may add or drop entries: a 500. (The app's own
    sync is held off: a tick between the test's entry and the request dropped it, a version the store never had.)"""
    svc, manager = await start_service(make_settings(tmp_path / "data", bundles, models_sync_s=3600.0), bundles.a)
    try:
        host = svc.app.state.host

        class ChangedWhileRead(dict):
            def items(self):
                for item in super().items():  # a dict's own iteration, as the old route's
                    self[("gone", str(len(self)))] = "its file is gone"  # the sync thread, mid-iteration
                    yield item

        host.failed = ChangedWhileRead({("digits-b", "1"): "model.onnx was altered"})
        r = await svc.client.get("/readyz")
        assert r.status_code == 200 and r.json()["failed_models"] == 1, r.text
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_a_version_that_no_longer_loads_is_tried_once_per_interval_and_shown_in_readyz(bundles, tmp_path):
    """An unloaded version whose file is gone: every request (each of a batch's, one by one after the batch
    failed) verified the bundle again, a full load each, on the threads every model's batches share; and
    /readyz said 0 failed versions while it answered 503. Now one load per models_sync_s, the same 503 between,
    the version in /readyz's failures (no path), and served again once its file is back."""
    settings = make_settings(tmp_path / "data", bundles, models_sync_s=1.0,
                             model_cache_mb=1.2 * len(sdb_bytes(bundles.a)) / (1 << 20))
    svc, manager = await start_service(settings, bundles.a, bundles.a2)
    try:
        host, c = svc.app.state.host, svc.client
        v1 = host.loaded("digits-a", "1")
        assert v1 not in host.bundles
        path, load, calls = Path(v1.path), host.bundles._load, []
        host.bundles._load = lambda p: calls.append(p) or load(p)
        saved = path.read_bytes()
        path.unlink()
        answers = await asyncio.gather(*(c.post("/v1/models/digits-a/predict?version=1", json=GOOD)
                                         for _ in range(8)))
        assert {r.status_code for r in answers} == {503}, [r.text for r in answers]
        assert all(r.json()["error"]["code"] == "model_unavailable" for r in answers)
        assert len(calls) == 1
        ready = (await c.get("/readyz")).json()
        assert ready["failed_models"] == 1 and "digits-a@1" in ready["failed"], ready
        assert str(settings.data_dir) not in json.dumps(ready)
        assert (await c.post("/v1/models/digits-a/predict?version=2", json=GOOD)).status_code == 200
        path.write_bytes(saved)
        await _until(lambda: c.post("/v1/models/digits-a/predict?version=1", json=GOOD), 200)
        assert (await c.get("/readyz")).json()["failed_models"] == 0
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_many_versions_through_a_tiny_cache_while_versions_are_removed(bundles, tmp_path):
    """Concurrent requests for eight versions, through a cache with room for about one, while versions are
    removed (and registered again) under them: every answer is the asked version's own, or 404 for one removed,
    or 503 never; the cache ends within its bound and holds only served versions."""
    files = _sdb_files(bundles, tmp_path)
    settings = make_settings(tmp_path / "data", bundles, model_cache_mb=1.2 * len(sdb_bytes(bundles.a)) / (1 << 20))
    svc, manager = await start_service(settings)
    try:
        host, c, store = svc.app.state.host, svc.client, svc.app.state.store
        source = {str(v): (files["a"] if v % 2 else files["a2"]) for v in range(1, 9)}
        for v, path in source.items():
            store.add_model("digits-a", v, str(path))
        await anyio.to_thread.run_sync(host.sync)
        x = np.asarray(GOOD["inputs"], np.float32)
        from sdb_core.bundle import load_bundle

        want = {p: load_bundle(p, settings.master_key).public_logits(x) for p in (files["a"], files["a2"])}
        seen: dict[int, int] = {}
        stop = asyncio.Event()

        async def ask(v: str) -> None:
            while not stop.is_set():
                r = await c.post(f"/v1/models/digits-a/predict?version={v}&top_k=10", json=GOOD)
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                assert r.status_code in (200, 404), r.text
                if r.status_code == 200:
                    assert r.json()["version"] == v
                    got = np.array([[p["scores"][p["indices"].index(k)] for k in range(10)]
                                    for p in r.json()["predictions"]])
                    e = np.exp(want[source[v]] - want[source[v]].max(1, keepdims=True))
                    np.testing.assert_allclose(got, e / e.sum(1, keepdims=True), atol=1e-4)
                await asyncio.sleep(0)

        async def churn() -> None:
            for v in ("2", "5", "8", "2"):
                await anyio.to_thread.run_sync(lambda v=v: host.remove("digits-a", v, "t"))
                await anyio.sleep(0.2)
                store.add_model("digits-a", v, str(source[v]))
                await anyio.sleep(0.2)  # the sync serves it again
            stop.set()

        await asyncio.gather(churn(), *(ask(v) for v in source for _ in range(2)))
        assert seen.get(200, 0) > 50, seen
        assert len(host.bundles) <= 2
        served = {host.bundles.key(m) for m in host.all()}
        assert set(host.bundles._lru) <= served
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_statistics_count_every_sample_of_a_call_that_merged_requests(bundles, tmp_path):
    # requests queued in one loop turn ride in one ONNX Runtime call: its samples are all of theirs
    host, store = _host(tmp_path, bundles)
    try:
        files = _sdb_files(bundles, tmp_path)
        model = await anyio.to_thread.run_sync(lambda: host.add(files["a"], "test"))
        sizes = [1, 2, 3, 4]
        await asyncio.gather(*(model.logits(bundles.x[:n]) for n in sizes))
        stats = model.stats.to_dict(model.name, model.version)
        assert stats["inference_count"] == sum(sizes)
        assert stats["execution_count"] < len(sizes)  # they merged
        assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in stats["batch_stats"]) == sum(sizes)
        per_request = stats["inference_stats"]
        assert per_request["success"]["count"] == per_request["queue"]["count"] == len(sizes)
        assert per_request["compute_infer"]["count"] == len(sizes)  # each request counts its call, as Triton does
    finally:
        host.close()
        store.close()


def test_the_highest_version_is_read_as_people_number_them():
    """The default version is the highest: "v10" lost to "v2" (compared as strings), a pre-release ranked above its
    release, and so a request without a version was served by an older network."""
    from service.store import version_key

    ordered = ["v2", "v9", "v10", "1", "1.0.0-rc1", "1.0.0-rc2", "1.0.0", "1.0.0.1", "1.9", "1.10", "2", "10",
               "2024-01-01", "2024-02-01"]
    shuffled = ordered[::-1][1::2] + ordered[::-1][::2]
    assert sorted(shuffled, key=version_key) == ordered


def test_a_models_class_count_is_its_labels_count_without_building_them():
    """HostedModel.num_classes, what the inference routes count classes by on every request (they copied a
    50,000-class model's labels for it), is len(labels) for a bundle with labels and one without."""
    from service.registry import HostedModel

    def hosted(meta: dict) -> HostedModel:
        return HostedModel("m", "1", "/nowhere", 0.0, meta, True, bundles=None, batcher=None)

    named = hosted({"labels": ["cat", "dog", "eel"], "output": {"shape": [3]}})
    numbered = hosted({"labels": [], "output": {"shape": [7]}})
    pose = hosted({"labels": [], "task": "pose", "output": {"shape": [17, 16, 16]}})
    for m in (named, numbered, pose):
        assert m.num_classes == len(m.labels), m.meta
    assert (named.num_classes, numbered.num_classes) == (3, 7)
