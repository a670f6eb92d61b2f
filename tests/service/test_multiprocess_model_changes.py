"""Two ``sdb serve`` processes on one store and data dir (SQLite and PostgreSQL): what one process changes
reaches the other correctly, and the other never fails or serves the wrong thing meanwhile.

A deploy in A: B serves the new version at once when it is asked for by version, and as the default from its
next sync. A removal in A: B stops serving that version within ``models_sync_s``, a version B had unloaded from
its cache included (it is not loaded again from its file), and B's default goes back to the version before. A
key revoked in A: B refuses it within ``auth_cache_s``, and at once on the keyed path. B's listing,
``/readyz`` and ``/metrics`` answer throughout (they read the models while B's sync replaces them).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from sdb_core.bundle import load_bundle

from .conftest import Server, sdb_bytes
from .jobs_helpers import key, prepare

pytestmark = pytest.mark.usefixtures("db_url")  # SQLite and PostgreSQL
SYNC_S, AUTH_CACHE_S = 1.0, 1.0
SLACK_S = 5.0  # a sync's own loads, on a shared machine
ENV = {"SDB_MODELS_SYNC_S": str(SYNC_S), "SDB_AUTH_CACHE_S": str(AUTH_CACHE_S), "SDB_REGISTER_DEMO": "false",
       "SDB_RATE_LIMIT_KEY_PER_S": "0", "SDB_USAGE_FLUSH_S": "0.2"}


def _probs(answer: dict) -> np.ndarray:
    return np.array([[p["scores"][p["indices"].index(k)] for k in range(10)] for p in answer["predictions"]])


def _until(check, seconds: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"{what}: not within {seconds:.0f} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_deploys_removals_and_revocations_reach_the_other_process(tmp_path, bundles, servers):
    data = tmp_path / "data"
    settings = prepare(data, bundles)
    admin = {"Authorization": f"Bearer {key(settings, ['admin'])}"}
    one_bundle_mb = 1.2 * len(sdb_bytes(bundles.a)) / (1 << 20)
    a_srv = Server(data, bundles, ENV)
    servers.append(a_srv)
    b_srv = Server(data, bundles, {**ENV, "SDB_MODEL_CACHE_MB": str(one_bundle_mb)})  # room for about one
    servers.append(b_srv)
    x = bundles.x[:3]
    body = {"inputs": x.tolist(), "top_k": 10}
    want = {v: load_bundle(p).predict(x) for v, p in (("1", bundles.a), ("2", bundles.a2))}
    with httpx.Client(base_url=a_srv.url, timeout=60) as a, httpx.Client(base_url=b_srv.url, timeout=60) as b:
        def up(path):
            r = a.post("/v1/models", files={"file": ("m.sdb", sdb_bytes(path))}, headers=admin)
            assert r.status_code == 201, r.text
            return r.json()["version"]

        def b_predict(version: str | None = None, name: str = "digits-a") -> httpx.Response:
            return b.post(f"/v1/models/{name}/predict" + (f"?version={version}" if version else ""), json=body)

        # B's listing, readiness and metrics, read while its syncs replace the models: never a 500
        stop, statuses = threading.Event(), []

        def watch() -> None:
            with httpx.Client(base_url=b_srv.url, timeout=60) as w:
                while not stop.is_set():
                    statuses.extend(w.get(p).status_code for p in ("/v1/models", "/readyz", "/metrics"))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            assert up(bundles.a) == "1" and up(bundles.b) == "1"
            r = b_predict()
            assert r.status_code == 200 and r.json()["version"] == "1", r.text
            np.testing.assert_allclose(_probs(r.json()), want["1"], atol=1e-5)

            assert up(bundles.a2) == "2"
            r = b_predict("2")  # by version: at once, from the store
            assert r.status_code == 200 and r.json()["version"] == "2", r.text
            np.testing.assert_allclose(_probs(r.json()), want["2"], atol=1e-5)
            r = b_predict()  # the default: the highest version B serves
            assert r.json()["version"] == "2"
            np.testing.assert_allclose(_probs(r.json()), want["2"], atol=1e-5)
            for name in ("digits-b", "digits-a"):  # B's cache: version 2 unloaded for the others
                assert b_predict(name=name).status_code == 200
            r = b_predict("1")
            assert r.status_code == 200 and r.json()["version"] == "1"

            # a removal in A: B stops serving the version it had unloaded, and never loads it again
            assert a.delete("/v1/models/digits-a?version=2", headers=admin).status_code == 200
            _until(lambda: b_predict("2").status_code == 404, SYNC_S + SLACK_S, "B stops serving the removed version")
            for _ in range(5):
                r = b_predict("2")
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            r = b_predict()
            assert r.status_code == 200 and r.json()["version"] == "1"
            np.testing.assert_allclose(_probs(r.json()), want["1"], atol=1e-5)
            assert [m["version"] for m in b.get("/v1/models").json()["models"] if m["name"] == "digits-a"] == ["1"]

            # a deploy in A reaches B's default at B's next sync, unasked
            assert up(bundles.a2) == "3"
            _until(lambda: b_predict().json()["version"] == "3", SYNC_S + SLACK_S, "B's default becomes version 3")
            np.testing.assert_allclose(_probs(b_predict().json()), want["2"], atol=1e-5)
        finally:
            stop.set()
            watcher.join(60)
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        ready = b.get("/readyz").json()
        assert ready["models"] == 3 and ready["failed_models"] == 0, ready
        assert "sdb_models_loaded 3.0" in b.get("/metrics").text

        # a key revoked in A: refused by B within auth_cache_s, and at once on B's keyed path
        predict_token, distill_token = key(settings, ["predict"]), key(settings, ["distill"])
        p_auth, d_auth = ({"Authorization": f"Bearer {t}"} for t in (predict_token, distill_token))
        assert b.get("/v1/models", headers=p_auth).status_code == 200  # B caches the key
        r = b.post("/v1/models/digits-a/distill", json={"inputs": x.tolist()}, headers=d_auth)
        assert r.status_code == 200, r.text
        for token in (predict_token, distill_token):
            assert a.delete(f"/v1/keys/{token.split('_')[1]}", headers=admin).status_code == 200
        r = b.post("/v1/models/digits-a/distill", json={"inputs": x.tolist()}, headers=d_auth)
        assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked", r.text
        took = _until(lambda: b.get("/v1/models", headers=p_auth).status_code == 401, AUTH_CACHE_S + SLACK_S,
                      "B refuses the revoked key")
        assert took <= AUTH_CACHE_S + SLACK_S
        assert b.get("/v1/models", headers=p_auth).json()["error"]["code"] == "key_revoked"


def test_a_version_whose_file_went_is_one_load_per_interval_and_in_readyz(tmp_path, bundles, servers):
    """A version B had unloaded from its cache, whose file is gone: B answers 503 without loading it again for
    each request (a full verification each, on the threads every model's batches share: 9 loads for 8 requests),
    /readyz counts it among the failed versions (it said 0), and once the file is back B serves it again."""
    from service.store import Store

    data = tmp_path / "data"
    settings = prepare(data, bundles)
    admin = {"Authorization": f"Bearer {key(settings, ['admin'])}"}
    srv = Server(data, bundles, {**ENV, "SDB_MODEL_CACHE_MB": str(1.2 * len(sdb_bytes(bundles.a)) / (1 << 20))})
    servers.append(srv)
    body = {"inputs": bundles.x[:2].tolist()}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for path in (bundles.a, bundles.a2):  # version 2 served last: version 1 unloaded
            assert c.post("/v1/models", files={"file": ("m.sdb", sdb_bytes(path))}, headers=admin).status_code == 201
        store = Store(settings.db_url)
        try:
            gone = Path(store.get_model("digits-a", "1").path)
        finally:
            store.close()
        saved = gone.read_bytes()
        gone.unlink()
        threads, answers = [], []
        for _ in range(8):
            threads.append(threading.Thread(target=lambda: answers.append(
                c.post("/v1/models/digits-a/predict?version=1", json=body))))
            threads[-1].start()
        for t in threads:
            t.join(60)
        assert len(answers) == 8 and {r.status_code for r in answers} == {503}, [r.text for r in answers]
        assert all(r.json()["error"]["code"] == "model_unavailable" and str(data) not in r.text for r in answers)
        ready = c.get("/readyz").json()
        assert ready["failed_models"] == 1 and "digits-a@1" in ready["failed"] and str(data) not in str(ready), ready
        assert c.post("/v1/models/digits-a/predict?version=2", json=body).status_code == 200
        gone.write_bytes(saved)
        _until(lambda: c.post("/v1/models/digits-a/predict?version=1", json=body).status_code == 200,
               SYNC_S + SLACK_S, "served again once its file is back")
        assert c.get("/readyz").json()["failed_models"] == 0
    log = srv.stop()
    assert 1 <= log.count("cannot be loaded again") <= 2, log[-3000:]
