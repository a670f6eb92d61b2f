"""End to end through ``sdb serve`` (uvicorn) on a free loopback port, and a restart."""
from __future__ import annotations

import httpx
import numpy as np

from sdb_core.bundle import load_bundle

from .conftest import run_sdb, sdb_env

KEY_PREFIX = "sdb_"


def test_serve_keys_cli_and_restart(tmp_path, bundles, server_factory):
    data = tmp_path / "data"
    env = sdb_env(data, bundles)
    created = run_sdb("keys", "create", "--scopes", "distill", "--models", "digits-a", "--quota", "10",
                      "--expires", "30", env=env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith(KEY_PREFIX) and len(token.split("_")) == 3 and " " not in token
    assert token not in created.stderr
    added = run_sdb("models", "add", str(bundles.a), env=env)
    assert added.returncode == 0, added.stderr
    x = bundles.x[:3]
    auth = {"Authorization": f"Bearer {token}"}

    server = server_factory(data)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/models/digits-a/predict", json={"inputs": x.tolist(), "top_k": 10})
        assert r.status_code == 200, r.text
        ref = load_bundle(bundles.a).predict(x)
        got = np.array([[p["scores"][p["indices"].index(i)] for i in range(10)] for p in r.json()["predictions"]])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        r = c.post("/v1/models/digits-a/distill", json={"inputs": x.tolist()}, headers=auth)
        assert r.status_code == 200, r.text
        assert np.abs(np.array(r.json()["logits"]) - load_bundle(bundles.a).public_logits(x)).max() > 0.1
        assert c.post("/v1/models/digits-a/distill", json={"inputs": x.tolist()}, headers={}).status_code == 401
        v2 = c.post("/v2/models/digits-a/infer", json={"inputs": [
            {"name": "input", "shape": [3, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert v2.status_code == 200 and v2.json()["outputs"][0]["shape"] == [3, 10]
        assert c.post("/v1/models/digits-a/predict", content=b"\x00" * 10,
                      headers={"content-type": "application/json"}).status_code == 400
        assert c.get("/readyz").status_code == 200
    err = server.stop()
    assert token not in err and token.split("_")[2] not in err

    # Same data dir: the key, its spent quota and the model are all back.
    server = server_factory(data)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["digits-a"]
        r = c.post("/v1/models/digits-a/distill", json={"inputs": bundles.x[:7].tolist()}, headers=auth)
        assert r.status_code == 200, r.text  # 3 + 7 = the quota of 10
        r = c.post("/v1/models/digits-a/distill", json={"inputs": x[:1].tolist()}, headers=auth)
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    server.stop()
    listed = run_sdb("keys", "list", env=env)
    assert "10/10" in listed.stdout and token.split("_")[2] not in listed.stdout
