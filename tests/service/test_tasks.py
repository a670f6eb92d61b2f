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
        error = r.json()["error"]
        if path == "/v2/models/tags/infer":  # the route that serves it is named
            assert r.status_code == 400 and "is a multilabel model: POST /v1/models/tags/predict" in error, r.text
        elif path.startswith("/v2"):  # the protocol's body: the message alone
            assert r.status_code == 400 and "model; this route serves classification models" in error, r.text
        else:
            assert r.status_code == 400 and error["code"] == "wrong_task", (path, r.text)
    r = await svc.client.post("/v1/models/seg/predict", json=one)
    assert "segmentation-depth model" in r.json()["error"]["message"]
    # nor does v2's metadata advertise outputs its infer refuses (standard clients read them as servable)
    for name in ("seg", "tags"):
        meta, config = [(await svc.client.get(f"/v2/models/{name}{tail}")).json() for tail in ("", "/config")]
        assert meta["outputs"] == [] and config["output"] == [] and meta["inputs"], (meta, config)
    # and the server still serves the next good request
    assert (await svc.client.post("/v1/models/tags/predict", json=one)).status_code == 200


async def test_a_checked_box_shows_its_measured_protection_report(tmp_path, bundles):
    """The self-check's verdict and figures travel in meta.json and GET /v1/models shows them."""
    from sdb_core.data import load_dataset
    from sdb_core.protect import CheckConfig, SDBConfig, Thresholds, wrap
    from sdb_core.protect.key import load_or_create_master_key
    from sdb_core.train import TrainConfig

    digits = load_dataset("digits")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    check = CheckConfig(thresholds=Thresholds(100, 100, -100, -10), max_attempts=1, student_seeds=1, transfer_n=200,
                        student_train=TrainConfig(epochs=1))
    result = wrap(net, digits, SDBConfig(train=TrainConfig(epochs=1)), check=check)
    path = export_bundle(result.box, tmp_path / "checked.sdb", name="checked", in_shape=digits.in_shape,
                         mean=digits.mean, std=digits.std, labels=digits.labels,
                         master_key=load_or_create_master_key(bundles.master_key_file),
                         extra={"check": result.report["check"]})
    service, manager = await start_service(make_settings(tmp_path / "data", bundles), path)
    try:
        info = (await service.client.get("/v1/models/checked")).json()
        report = info["protection"]
        assert report["passed"] and report["thresholds"]["max_accuracy_drop"] == 100
        assert report["figures"] == result.report["check"]["figures"] and report["held_out"] > 0
        assert "attempts" not in report and "chosen" not in report
        listed = (await service.client.get("/v1/models")).json()["models"]
        assert [m["protection"] for m in listed if m["name"] == "checked"] == [report]
    finally:
        await service.client.aclose()
        await manager.__aexit__(None, None, None)
