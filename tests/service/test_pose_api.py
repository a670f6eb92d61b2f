"""A pose bundle exported from an OKDHP run, served by ``sdb serve``: predict returns keypoints with scores
that match PyTorch on the same inputs; there is no keyed path."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch

from sdb_core.data.pose import KEYPOINTS
from sdb_core.distill.okdhp import OKDHPConfig, PoseDataConfig, export_pose_bundle, okdhp, pose_train_config
from sdb_core.distill.pose_metrics import decode_heatmaps, evaluate_heatmaps
from sdb_core.tasks.pose import PoseTask
from sdb_core.train import predict_logits

from .jobs_helpers import key, prepare


@pytest.fixture(scope="module")
def pose_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose")
    cfg = OKDHPConfig(data=PoseDataConfig(root=str(root), n_train=32, n_test=8, input_size=32), width=8,
                      branch_stacks=(1, 1), train=pose_train_config(epochs=1, batch_size=16, lr=2e-3))
    res = okdhp(cfg)
    path = export_pose_bundle(res.target, res.data, root / "pose.sdb", name="pose-tiny", metrics=res.metrics)
    x = res.data.test.images[:4].clone()
    heatmaps = predict_logits(res.target, x)  # on x's device, wherever okdhp trained
    return path, x.numpy(), heatmaps.numpy()


def test_pose_bundle_served_over_http_returns_keypoints_matching_pytorch(tmp_path, bundles, server_factory,
                                                                         pose_bundle):
    path, x, heatmaps = pose_bundle
    settings = prepare(tmp_path / "data", bundles, {"pose-tiny": path})
    distiller = key(settings, ["distill"])
    srv = server_factory(tmp_path / "data")
    info = httpx.get(f"{srv.url}/v1/models/pose-tiny", timeout=30).json()
    assert info["task"] == "pose" and info["mode"] == "plain" and info["distillable"] is False
    assert info["labels"] == KEYPOINTS

    r = httpx.post(f"{srv.url}/v1/models/pose-tiny/predict", json={"inputs": x.tolist()}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "pose" and body["joints"] == KEYPOINTS and len(body["predictions"]) == len(x)
    want_pts, want_scores = decode_heatmaps(heatmaps, stride=4)
    got_pts = np.array([p["keypoints"] for p in body["predictions"]])
    got_scores = np.array([p["scores"] for p in body["predictions"]])
    assert got_pts.shape == (len(x), 17, 2)
    np.testing.assert_allclose(got_pts, want_pts, atol=1e-2)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-4)
    assert (got_pts >= -0.5).all() and (got_pts <= 31.5).all()  # input pixels of the 32x32 crop

    # An image upload works too: resized to the input, one prediction of 17 joints.
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    r = httpx.post(f"{srv.url}/v1/models/pose-tiny/predict", content=buf.getvalue(),
                   headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1 and len(r.json()["predictions"][0]["keypoints"]) == 17
    assert "image_keypoints" not in body["predictions"][0]  # tensors sent: input pixels are theirs

    # An image's keypoints come in its own pixels too: it was stretched to the 32x32 input, pixel centre on centre.
    # A photo stored sideways with an EXIF turn is read as shown: the same answer as the upright pixels.
    upright = (np.random.default_rng(1).random((48, 40, 3)) * 255).astype(np.uint8)  # H 48, W 40
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # what a phone writes; EXIF 6 turns it back
    exif = stored.getexif()
    exif[0x0112] = 6
    answers = []
    for image, extra in ((Image.fromarray(upright), {}), (stored, {"exif": exif.tobytes()})):
        buf = io.BytesIO()
        image.save(buf, "PNG", **extra)
        files = [("file", ("a.png", buf.getvalue(), "image/png"))] * 2  # a form of two images: one answer each
        r = httpx.post(f"{srv.url}/v1/models/pose-tiny/predict", files=files, timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r.json()["predictions"])
    for p in answers[0] + answers[1]:
        kp, at = np.array(p["keypoints"]), np.array(p["image_keypoints"])
        np.testing.assert_allclose(at, (kp + 0.5) * [40 / 32, 48 / 32] - 0.5, atol=2e-3)
        assert (at >= -0.5).all() and (at[:, 0] <= 39.5).all() and (at[:, 1] <= 47.5).all()
    assert answers[0] == answers[1]

    # No keyed path: /distill on a pose model is a clear 400, even for a key allowed to distill.
    r = httpx.post(f"{srv.url}/v1/models/pose-tiny/distill", json={"inputs": x.tolist()},
                   headers={"Authorization": f"Bearer {distiller}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert "pose" in r.json()["error"]["message"]
    # A wrong input shape is refused, naming the shape the model takes.
    r = httpx.post(f"{srv.url}/v1/models/pose-tiny/predict", json={"inputs": x[:, :, :16].tolist()}, timeout=60)
    assert r.status_code == 422 and "3, 32, 32" in r.json()["error"]["message"]


def test_okdhp_job_writes_bundle_predictions_and_report(tmp_path, bundles):
    import json

    from sdb_client import BadRequest, Client

    from sdb_core.bundle import load_bundle

    from .jobs_helpers import JobServer

    data = tmp_path / "data"
    settings = prepare(data, bundles)
    s = JobServer(data, bundles, SDB_WORKERS="1")
    try:
        with Client(s.url, key(settings, ["jobs"])) as c:
            with pytest.raises(BadRequest):  # the target must be one of the branches
                c.jobs.submit("okdhp", {"branch_stacks": [1, 1], "target_branch": 2})
            with pytest.raises(BadRequest, match="server paths are for admin keys"):  # a path on the server
                c.jobs.submit("okdhp", {"data": "coco-keypoints:annotations"})
            params = {"n_train": 32, "n_test": 8, "input_size": 32, "width": 8, "branch_stacks": [1, 1], "epochs": 1}
            sub = c.jobs.submit("okdhp", {**params, "name": "pose-job"})
            job = c.jobs.wait(sub["id"], timeout=240, poll_s=0.3)
            assert job["status"] == "succeeded", job
            assert "ensemble_pck" in job["metrics"]
            names = {a["name"] for a in c.jobs.artifacts(sub["id"])}
            assert {"bundle.sdb", "predictions.png", "report.json", "curves.png"} <= names
            assert c.jobs.download(sub["id"], "predictions.png", tmp_path).read_bytes()[:4] == b"\x89PNG"
            report = json.loads(c.jobs.download(sub["id"], "report.json", tmp_path).read_text())
            assert report["curves"]["okdhp"] and "kd" in report["curves"]["okdhp"][-1]
            bundle = load_bundle(c.jobs.download(sub["id"], "bundle.sdb", tmp_path))
            assert bundle.meta["task"] == "pose" and bundle.meta["mode"] == "plain" and not bundle.has_key
            assert bundle.meta["output"]["shape"] == [17, 8, 8] and bundle.meta["pose"]["stride"] == 4
            # The PCK the job reports is the shipped bundle's on the job's test people. ONNX and torch
            # differ by float rounding, which can move the peak of a nearly flat heatmap: one joint in
            # each of the 8 people is ~0.7 points of PCK each.
            test = PoseTask.from_options(**params).okdhp.data.load().test
            heatmaps = torch.from_numpy(bundle.public_logits(test.images.numpy()))
            assert job["metrics"]["pck"] == pytest.approx(evaluate_heatmaps(heatmaps, test)["pck"], abs=1.5)
    finally:
        s.stop()
