"""A served classifier of 1-D signals and one of feature vectors: uploaded, described, answered on v1 and v2
like an image classifier; an image sent to them is a clear 422, never a crash."""
from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdb_core.bundle import export_bundle, load_bundle
from sdb_core.protect import SDBConfig, train_box
from sdb_core.protect.key import load_or_create_master_key

from ..signals import trained
from .conftest import make_settings, start_service

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def non_image_bundles(tmp_path_factory, bundles):
    """The signals and features boxes, sealed under the service tests' master key."""
    torch.set_num_threads(1)
    master = load_or_create_master_key(bundles.master_key_file)
    out = {}
    for kind in ("signals", "features"):
        data, teacher = trained(kind, epochs=4)
        box = train_box(teacher, data, SDBConfig(train=replace(SDBConfig().train, epochs=2))).box
        path = export_bundle(box, tmp_path_factory.mktemp(kind) / kind, name=kind, in_shape=data.in_shape,
                             mean=data.mean, std=data.std, labels=data.labels, master_key=master)
        out[kind] = (path, data.test.tensors[0][:5].numpy())
    return out


@pytest.fixture
async def svc(tmp_path, bundles, non_image_bundles):
    service, manager = await start_service(make_settings(tmp_path / "data", bundles),
                                           *(p for p, _ in non_image_bundles.values()))
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["signals", "features"])
async def test_a_non_image_model_is_served_on_v1_and_v2(svc, non_image_bundles, kind):
    c = svc.client
    path, x = non_image_bundles[kind]
    ref = load_bundle(path, svc.settings.master_key)
    shape = list(x.shape[1:])
    assert (await c.get(f"/v1/models/{kind}")).json()["input"]["shape"] == shape

    r = await c.post(f"/v1/models/{kind}/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    assert [p["indices"][0] for p in r.json()["predictions"]] == ref.predict(x).argmax(1).tolist()

    token = svc.key(("distill",))
    r = await c.post(f"/v1/models/{kind}/distill", json={"inputs": x.tolist()}, headers=svc.auth(token))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["logits"]), ref.distill_logits(x), rtol=1e-4, atol=1e-4)

    meta = (await c.get(f"/v2/models/{kind}")).json()
    assert meta["inputs"][0]["shape"] == [-1, *shape]
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = await c.post(f"/v2/models/{kind}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), ref.predict(x), rtol=1e-5, atol=1e-6)

    # An image for a model that takes none: a 422 that says so, on every route that reads images.
    r = await c.post(f"/v1/models/{kind}/predict", files={"file": ("x.png", _png(), "image/png")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_shape", r.text
    assert "not images" in r.json()["error"]["message"]
    png = list(_png())
    body = {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [png]}]}
    r = await c.post(f"/v2/models/{kind}/infer", json=body)
    assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
    # The model still serves afterwards.
    assert (await c.post(f"/v1/models/{kind}/predict", json={"inputs": x[:1].tolist()})).status_code == 200


@pytest.mark.parametrize("kind", ["signals", "features"])
async def test_without_the_distill_key_only_the_top1_of_a_non_image_model_leaves(svc, non_image_bundles, kind):
    """tests/security's top-1 rule, on inputs that are not images: the public answer is one fixed
    distribution per top-1, for plain inputs and inputs an attacker blended with keys of their own."""
    from sdb_core.protect.key import blend, random_keys

    from ..security.test_public_path_reveals_only_the_top1 import same_top1_same_answer
    from ..signals import KINDS

    path, _ = non_image_bundles[kind]
    ref = load_bundle(path, svc.settings.master_key)
    data = KINDS[kind][0]()
    x = data.test.tensors[0][:60]
    keys = random_keys(2, data.in_shape, data.mean, data.std, generator=torch.Generator().manual_seed(5))
    x = torch.cat([x, *(blend(x, k, 0.3) for k in keys)]).numpy().astype(np.float32)
    classes = len(ref.meta["labels"])
    for headers in ({}, svc.auth(svc.key(("predict",)))):
        r = await svc.client.post(f"/v1/models/{kind}/predict", json={"inputs": x.tolist(), "top_k": classes},
                                  headers=headers)
        assert r.status_code == 200, r.text
        scores = np.zeros((len(x), classes))
        for i, p in enumerate(r.json()["predictions"]):
            scores[i, p["indices"]] = p["scores"]
        same_top1_same_answer(scores)
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
                "outputs": [{"name": "distill_logits"}]}
        refused = await svc.client.post(f"/v2/models/{kind}/infer", json=body, headers=headers)
        assert refused.status_code in (401, 403), refused.text
    logits = ref.distill_logits(x)  # what the distill key gets: it varies within a class
    assert any(len(np.unique(logits[logits.argmax(1) == c], axis=0)) > 1 for c in set(logits.argmax(1).tolist()))
