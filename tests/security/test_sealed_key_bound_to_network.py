"""Hole 5 of issue 23: a sealed key opens only beside the network it was sealed with, and a bundle
whose graph disagrees with its ``meta.json`` is refused on load while the server serves on.

The attacker here is the strongest one short of the master key: they can write every file of a
bundle (upload one, or reach a served one's directory) and recompute ``meta.json``'s hashes.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch

from sdb_core.bundle import BundleError, export_bundle, export_onnx, load_bundle
from sdb_core.protect import SealError
from sdb_core.protect.key import load_or_create_master_key
from service.errors import ApiError
from tests.service.conftest import make_settings, start_service

PIXELS = 10  # the owner's classifier has 10 labels: the stand-in network keeps that output shape


def pixel_reader(in_shape) -> torch.nn.Module:
    """The attacker's network: output j is input pixel j, so the keyed path hands back (1 − λ)·key."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(in_shape)), PIXELS, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(PIXELS, int(np.prod(in_shape))))
    return net.eval()


def swap_network(bundle: Path, out: Path, onnx: bytes) -> Path:
    """``bundle`` with ``model.onnx`` replaced and its hash in ``meta.json`` made to match; all else kept."""
    shutil.copytree(bundle, out)
    (out / "model.onnx").write_bytes(onnx)
    meta = json.loads((out / "meta.json").read_text())
    meta["files"]["model.onnx"] = hashlib.sha256(onnx).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def test_a_sealed_key_does_not_open_beside_another_network(bundles, tmp_path):
    master = load_or_create_master_key(bundles.master_key_file)
    owner = load_bundle(bundles.a, master)
    stolen = swap_network(bundles.a, tmp_path / "stolen", export_onnx(pixel_reader(owner.meta["input"]["shape"]),
                                                                      owner.meta["input"]["shape"]))
    try:
        b = load_bundle(stolen, master)
    except (SealError, BundleError) as e:
        assert "could not be opened" in str(e), e
        return
    zeros = np.zeros((1, *owner.meta["input"]["shape"]), np.float32)
    leaked = b.distill_logits(zeros)[0] / (1.0 - float(b.meta["lam"]))
    key = owner.keyed_input(zeros)[0] / (1.0 - float(owner.meta["lam"]))
    pytest.fail(f"the owner's key opened beside the attacker's network; its keyed path read out key pixels "
                f"{np.round(leaked[:3], 3).tolist()}... (the key's: {np.round(key.ravel()[:3], 3).tolist()}...)")


async def serve(svc, path: Path):
    """Register a bundle with the running app: what POST /v1/models, ``sdb models add`` and a deploying
    job all call (ModelHost.add), so this test does not depend on how a route names the bundle."""
    return await anyio.to_thread.run_sync(svc.app.state.host.add, path, "admin")


async def refused(svc, path: Path) -> str:
    with pytest.raises(ApiError) as e:
        await serve(svc, path)
    assert (e.value.status, e.value.code) == (400, "bundle_refused"), e.value.message
    return e.value.message


@pytest.mark.anyio
async def test_the_server_refuses_a_bundle_whose_network_was_swapped(bundles, tmp_path):
    in_shape = json.loads((bundles.a / "meta.json").read_text())["input"]["shape"]
    stolen = swap_network(bundles.a, tmp_path / "stolen", export_onnx(pixel_reader(in_shape), in_shape))
    svc, manager = await start_service(make_settings(tmp_path / "data", bundles))
    try:
        c = svc.client
        await serve(svc, bundles.b)
        try:
            await serve(svc, stolen)
        except ApiError as e:
            assert (e.status, e.code) == (400, "bundle_refused") and "could not be opened" in e.message, e.message
        else:
            z = (await c.post("/v1/models/digits-a/distill", json={"inputs": np.zeros((1, *in_shape)).tolist()},
                              headers=svc.admin)).json()
            pytest.fail(f"the swapped bundle was served with the owner's key; its keyed path answered {z}")
        assert (await c.get("/v1/models/digits-a")).status_code == 404
        assert (await c.post("/v1/models/digits-b/predict", json={"inputs": np.zeros((2, *in_shape)).tolist()})
                ).status_code == 200
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


def plain_classifier(classes: int) -> torch.nn.Module:
    torch.manual_seed(classes)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, classes)).eval()


@pytest.mark.anyio
async def test_a_bundle_whose_output_disagrees_with_its_meta_is_refused_and_the_server_serves_on(
        bundles, tmp_path):
    labels = [str(i) for i in range(10)]
    good = export_bundle(plain_classifier(10), tmp_path / "plain", name="plain", in_shape=(1, 8, 8),
                         mean=(0.0,), std=(1.0,), labels=labels)
    # A keyless bundle, so nothing but the shape check stands between its files and the server:
    # the network gives 5 scores where meta.json promises one per label (10).
    wrong = swap_network(good, tmp_path / "wrong", export_onnx(plain_classifier(5), (1, 8, 8)))
    with pytest.raises(BundleError, match=r"outputs \['batch', 5\] but meta.json declares \[batch, 10\]"):
        load_bundle(wrong)

    settings = make_settings(tmp_path / "data", bundles)
    x = {"inputs": np.zeros((2, 1, 8, 8)).tolist()}
    svc, manager = await start_service(settings)
    try:
        c = svc.client
        await serve(svc, bundles.a)
        assert "meta.json declares [batch, 10]" in await refused(svc, wrong)
        await serve(svc, good)
        # Consistent with its meta, but not what its task's route reads: a "style" model's output is an image.
        not_an_image = export_bundle(plain_classifier(10), tmp_path / "style", name="style", in_shape=(1, 8, 8),
                                     mean=(0.0,), std=(1.0,), task="style")
        assert "an RGB image, [3, H, W]" in await refused(svc, not_an_image)
        assert (await c.post("/v1/models/plain/predict", json=x)).status_code == 200
        assert [m["name"] for m in (await c.get("/v1/models")).json()["models"]] == ["digits-a", "plain"]
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)

    # The same bundle already registered, its files replaced on disk: the restarted server refuses it
    # at load, says why, and serves the rest.
    shutil.rmtree(good)
    shutil.copytree(wrong, good)
    svc, manager = await start_service(settings)
    try:
        c = svc.client
        host = svc.app.state.host
        assert "declares [batch, 10]" in host.failed.get(("plain", "1"), ""), host.failed
        assert (await c.get("/readyz")).json()["models"] == 1
        assert (await c.post("/v1/models/digits-a/predict", json=x)).status_code == 200
        r = await c.post("/v1/models/plain/predict", json=x)  # registered, refused: a 503 that says why
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
        assert "declares [batch, 10]" in r.text
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)
