"""The public path of an SDB box lets out its top-1 and nothing else of the input.

A caller without the distill key (none at all, or a predict-only key) gets, on v1 ``predict`` and on v2
``infer``, the box's public form: one fixed distribution per top-1 class. So two inputs with the same
top-1 get the same probabilities to the last bit, whatever else differs between them, inputs the
attacker blended with a key of their own included. Only the distill key gets the network's logits.
Before the public form the public path answered the network's own outputs, which differ per input.
In process, the real app and store (SQLite and PostgreSQL).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdb_core.bundle import load_bundle
from sdb_core.data import load_dataset
from sdb_core.protect.key import blend, random_keys

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]


def probes() -> np.ndarray:
    """Test images, and the same images blended with keys an attacker drew from the key's own distribution."""
    data = load_dataset("digits")
    x = data.test.tensors[0][:24]
    keys = random_keys(3, data.in_shape, data.mean, data.std, generator=torch.Generator().manual_seed(5))
    return torch.cat([x, *(blend(x, k, 0.3) for k in keys)]).numpy().astype(np.float32)


def same_top1_same_answer(probs: np.ndarray) -> None:
    top1 = probs.argmax(1)
    assert len(set(top1.tolist())) >= 3  # the probes reach several classes
    for c in set(top1.tolist()):
        rows = probs[top1 == c]
        assert (rows == rows[0]).all(), f"class {c}: the public answer varies with the input"


async def test_without_the_distill_key_only_the_top1_leaves(svc, bundles):
    x = probes()
    predict_only = svc.auth(svc.key(("predict",)))
    for headers in ({}, predict_only):
        r = await svc.client.post("/v1/models/digits-a/predict", json={"inputs": x.tolist(), "top_k": 10},
                                  headers=headers)
        assert r.status_code == 200, r.text
        scores = np.zeros((len(x), 10))
        for i, p in enumerate(r.json()["predictions"]):
            scores[i, p["indices"]] = p["scores"]
        same_top1_same_answer(scores)

        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = await svc.client.post("/v2/models/digits-a/infer", json=body, headers=headers)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        same_top1_same_answer(np.array(out["data"]).reshape(out["shape"]))
        body["outputs"] = [{"name": "distill_logits"}]
        refused = await svc.client.post("/v2/models/digits-a/infer", json=body, headers=headers)
        assert refused.status_code in (401, 403), refused.text

    # The distill key gets the network's own logits: they vary within a class.
    r = await svc.client.post("/v1/models/digits-a/distill", json={"inputs": x.tolist()},
                              headers=svc.auth(svc.key(("distill",), models=["digits-a"])))
    assert r.status_code == 200, r.text
    logits = np.array(r.json()["logits"])
    np.testing.assert_allclose(logits, load_bundle(bundles.a2, svc.settings.master_key).distill_logits(x),
                               rtol=1e-4, atol=1e-4)
    top1 = logits.argmax(1)
    assert any(len(np.unique(logits[top1 == c], axis=0)) > 1 for c in set(top1.tolist()))
