"""A client generated from ``/openapi.json`` (openapi-python-client, ...) sends every field's schema default, so a
body's schema default must mean what leaving the field out means.

It did not: ``POST /v1/models`` documented ``policy`` with the default ``probs`` while an omitted policy is the
bundle's own, so a box wrapped to answer labels alone was served with every probability; ``predict`` documented
``top_k`` 5, so such a client's ``?top_k=2`` was a 422 ``conflicting_options``. The bodies here are built from the
app's own schema, so the test follows it."""
from __future__ import annotations

import numpy as np
import pytest

from tests.service.conftest import start_service

pytestmark = pytest.mark.anyio

IN_SHAPE = (1, 8, 8)


@pytest.fixture
async def svc(own_settings):
    service, manager = await start_service(own_settings)
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


def json_body(app, path: str) -> dict:
    """The properties of ``path``'s JSON request body, as /openapi.json states them."""
    return app.openapi()["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def schema_defaults(app, path: str) -> dict:
    """Every field of ``path``'s JSON body that the schema gives a default, with that default."""
    return {k: p["default"] for k, p in json_body(app, path).items() if "default" in p}


def labels_only_bundle(out) -> bytes:
    """A plain classifier wrapped with ``--policy label``: its meta.json says to serve the predicted label alone."""
    import torch

    from sdb_core.bundle import export_bundle

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(IN_SHAPE)), 10))
    return export_bundle(net, out / "labels.sdb", name="labels-only", in_shape=IN_SHAPE, mean=(0.0,), std=(1.0,),
                         extra={"output_policy": {"policy": "label"}}).read_bytes()


async def deployed(svc, tmp_path, name: str, **fields) -> dict:
    """Upload the labels-only bundle and deploy it as ``name`` with a JSON body of ``fields`` (a deploy key's)."""
    c, deployer = svc.client, svc.auth(svc.key(("deploy",)))
    f = await c.post("/v1/files", headers=deployer, data={"purpose": "bundle"},
                     files={"file": ("labels.sdb", labels_only_bundle(tmp_path))})
    assert f.status_code == 201, f.text
    r = await c.post("/v1/models", json={**fields, "file": f.json()["id"], "name": name}, headers=deployer)
    assert r.status_code == 201, r.text
    return r.json()


async def public_answer(svc, name: str) -> dict:
    x = np.zeros((2, *IN_SHAPE), np.float32).tolist()
    r = await svc.client.post(f"/v1/models/{name}/predict", json={"inputs": x})  # anonymous
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_deploy_with_every_schema_default_serves_the_bundles_own_policy(svc, tmp_path):
    defaults = schema_defaults(svc.app, "/v1/models")
    policy_fields = {"policy", "top_k", "decimals"}
    assert policy_fields <= json_body(svc.app, "/v1/models").keys()
    # what such a client sends: the schema's defaults, or null for a field the schema gives none (nullable ones)
    for name, body in (("sent-defaults", defaults), ("sent-nulls", {**dict.fromkeys(policy_fields), **defaults})):
        served = await deployed(svc, tmp_path, name, **body)
        assert served["output_policy"] == {"policy": "label", "top_k": None, "decimals": None}, (body, served)
        for p in (await public_answer(svc, name))["predictions"]:
            assert len(p["labels"]) == 1 and p.get("scores") is None, p  # the label, no probability
    # a policy the caller chose still overrides the bundle's
    served = await deployed(svc, tmp_path, "chose-probs", **{**defaults, "policy": "probs"})
    assert served["output_policy"]["policy"] == "probs"
    assert all(len(p["scores"]) == 5 for p in (await public_answer(svc, "chose-probs"))["predictions"])


async def test_predict_with_the_schema_default_top_k_and_one_in_the_query(svc, tmp_path):
    await deployed(svc, tmp_path, "probs-model", policy="probs")
    x = np.zeros((1, *IN_SHAPE), np.float32).tolist()
    body = {**schema_defaults(svc.app, "/v1/models/{name}/predict"), "inputs": x}
    for sent in (body, {"top_k": None, **body}):  # the default, or null where the schema gives none
        r = await svc.client.post("/v1/models/probs-model/predict?top_k=2", json=sent)
        assert r.status_code == 200, r.text
        assert [len(p["labels"]) for p in r.json()["predictions"]] == [2], r.text
    # neither place: the route's default; a body's top_k that differs from the query's is still a conflict
    r = await svc.client.post("/v1/models/probs-model/predict", json=body)
    assert [len(p["labels"]) for p in r.json()["predictions"]] == [5], r.text
    r = await svc.client.post("/v1/models/probs-model/predict?top_k=2", json={**body, "top_k": 3})
    assert r.status_code == 422 and r.json()["error"]["code"] == "conflicting_options", r.text
