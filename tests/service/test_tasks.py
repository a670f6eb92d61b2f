"""Plain bundles of other tasks on the classification routes: a multi-label model is answered
with a sigmoid per label (not a softmax across them), and a task predict cannot serve gets a 400
on every inference route, never numbers that mean something else."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdb_core.bundle import export_bundle

from .conftest import make_settings, start_service

pytestmark = pytest.mark.anyio


@pytest.fixture
async def svc(tmp_path, bundles):
    torch.manual_seed(0)
    tagger = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    multilabel = export_bundle(tagger, tmp_path / "tags.sdb", name="tags", in_shape=(1, 4, 4), mean=(0.0,),
                               std=(1.0,), labels=["cat", "dog", "owl"], task="multilabel")
    segmenter = torch.nn.Conv2d(1, 2, 1)
    dense = export_bundle(segmenter, tmp_path / "seg.sdb", name="seg", in_shape=(1, 4, 4), mean=(0.0,),
                          std=(1.0,), task="segmentation-depth")
    service, manager = await start_service(make_settings(tmp_path / "data", bundles), multilabel, dense)
    service.tagger = tagger
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


async def test_multilabel_predict_gives_each_label_its_own_probability(svc):
    x = np.random.default_rng(0).normal(size=(2, 1, 4, 4)).astype(np.float32) * 3
    r = await svc.client.post("/v1/models/tags/predict", json={"inputs": x.tolist(), "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "multilabel"
    with torch.no_grad():
        want = torch.sigmoid(svc.tagger(torch.from_numpy(x))).numpy()
    for p, row in zip(body["predictions"], want):
        got = dict(zip(p["labels"], p["scores"]))
        assert np.allclose([got[k] for k in ("cat", "dog", "owl")], row, atol=1e-5)
        assert p["present"] == [k for k, v in zip(("cat", "dog", "owl"), row) if v >= 0.5]
    # independent probabilities: they need not sum to one, and here they do not
    assert not np.allclose(want.sum(1), 1.0, atol=1e-3)


async def test_routes_refuse_a_task_they_cannot_serve(svc):
    one = {"inputs": np.zeros((1, 1, 4, 4)).tolist()}
    for path, body in (("/v1/models/seg/predict", one),
                       ("/v2/models/seg/infer", {"inputs": [{"name": "input", "shape": [1, 1, 4, 4],
                                                             "datatype": "FP32", "data": [0.0] * 16}]}),
                       ("/v2/models/tags/infer", {"inputs": [{"name": "input", "shape": [1, 1, 4, 4],
                                                              "datatype": "FP32", "data": [0.0] * 16}]})):
        r = await svc.client.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task", (path, r.text)
    r = await svc.client.post("/v1/models/seg/predict", json=one)
    assert "segmentation-depth model" in r.json()["error"]["message"]
    # and the server still serves the next good request
    assert (await svc.client.post("/v1/models/tags/predict", json=one)).status_code == 200
