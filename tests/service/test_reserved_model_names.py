"""A model cannot be served as ``stats``: ``GET /v2/models/stats`` is the statistics of every model (the Open
Inference Protocol's statistics extension, declared before a model's metadata), so a model of that name had no
v2 metadata. Before, ``POST /v1/models`` served it; now a deploy under the name, given or the bundle's own, and a
job that would deploy under it, are a 422 that says why, and nothing is served."""
from __future__ import annotations

import pytest

from tests.service.conftest import sdb_bytes

pytestmark = pytest.mark.anyio


async def test_a_model_is_never_served_as_stats(svc, bundles):
    c = svc.client
    r = await c.post("/v1/models", files={"file": ("m.sdb", sdb_bytes(bundles.b))}, data={"name": "stats"},
                     headers=svc.admin)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    assert "statistics" in r.json()["error"]["message"], r.text
    assert (await c.get("/v1/models/stats")).status_code == 404
    assert "stats" not in {m["name"] for m in (await c.post("/v2/repository/index", json={})).json()}
    jobs = svc.auth(svc.key(("jobs",)))
    r = await c.post("/v1/jobs", json={"kind": "wrap", "params": {"data": "digits", "teacher": {"arch": "cnn"},
                                                                  "name": "stats", "deploy": True}}, headers=jobs)
    assert r.status_code == 422 and "statistics" in r.json()["error"]["message"], r.text
    # a name that only begins so is any other name
    r = await c.post("/v1/models", files={"file": ("m.sdb", sdb_bytes(bundles.b))}, data={"name": "stats-board"},
                     headers=svc.admin)
    assert r.status_code == 201, r.text
    assert (await c.get("/v2/models/stats-board")).json()["name"] == "stats-board"
