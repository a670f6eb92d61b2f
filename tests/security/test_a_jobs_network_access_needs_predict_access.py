"""With ``public_predict`` off, a job reads a hosted model's network (transferability, amalgamation) only for a
key that may predict with it: white-box access is more than the public outputs, never less guarded.

Before the fix a job's ``graph`` access asked for the allowlist alone, while its ``public`` access (an audit)
asked for the ``predict`` scope too: a ``jobs`` key without ``predict``, refused every prediction and every
model's metadata, queued a transferability job that reads a plain model's whole ONNX graph, and its
submission told it which names exist (404 against 403) and which are protected and in what mode
(``model_protected``). In process, the real app and store; the jobs stay queued (no worker runs here).
"""
from __future__ import annotations

import pytest

from sdb_core.bundle import export_bundle
from sdb_core.models import create_model
from tests.service.conftest import make_settings, start_service

pytestmark = pytest.mark.anyio

RANK = {"target_data": "digits", "probe": 10, "target_train": 50, "target_epochs": 1}


@pytest.fixture
async def private(tmp_path, bundles):
    plain = export_bundle(create_model("cnn", num_classes=10, in_shape=(1, 8, 8)).eval(), tmp_path / "plain-cnn",
                          name="plain-cnn", in_shape=(1, 8, 8), mean=(0.0,), std=(1.0,),
                          labels=[str(k) for k in range(10)])
    svc, manager = await start_service(make_settings(tmp_path / "data", bundles, public_predict=False),
                                       bundles.a, plain)
    yield svc
    await svc.client.aclose()
    await manager.__aexit__(None, None, None)


async def test_a_jobs_key_that_may_not_predict_reads_no_network(private):
    c = private.client
    jobs_only = private.auth(private.key(("jobs",)))
    assert (await c.post("/v1/models/plain-cnn/predict", json={"inputs": [[[[0.0] * 8] * 8]]},
                         headers=jobs_only)).status_code == 403  # it may not even predict
    for model in ("plain-cnn", "digits-a", "no-such-model"):
        r = await c.post("/v1/jobs", json={"kind": "transferability", "params": {**RANK, "sources": [{"model": model}]}},
                         headers=jobs_only)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_scope", (model, r.status_code, r.text)
        assert "protected" not in r.text, r.text
    assert (await c.get("/v1/jobs", headers=jobs_only)).json()["jobs"] == []

    # A key that may predict with the plain model may rank its graph, as before.
    r = await c.post("/v1/jobs", json={"kind": "transferability", "params": {**RANK, "sources": [{"model": "plain-cnn"}]}},
                     headers=private.auth(private.key(("jobs", "predict"))))
    assert r.status_code == 202, r.text
