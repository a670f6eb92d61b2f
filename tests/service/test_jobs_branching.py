"""The ``amalgamate`` job kind, method ``branching``, end to end: a real server and worker turn a
segmentation and a depth teacher (uploaded weights files, or hosted models) into one branched student bundle
and a predictions figure."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sdb_client import BadRequest, Client

from sdb_core.bundle import export_bundle, load_bundle
from sdb_core.data.scenes import make_scenes
from sdb_core.models.encdec import EncDec
from sdb_core.weights import save_weights

from .jobs_helpers import JobServer, key, prepare, run_jobs, upload

WIDTHS = [4, 8, 8]
# The teachers' weights, uploaded by the fixture: "file" is their id then.
TEACHERS = [{"name": "parser", "file": "seg.safetensors", "arch": "encdec", "task": "seg"},
            {"name": "ranger", "file": "depth.safetensors", "arch": "encdec", "task": "depth"}]
SHALLOW = {"file": "shallow.safetensors"}
# The same teachers hosted as plain bundles; each one's task comes from its bundle's.
HOSTED = [{"name": "parser", "model": "seg-teacher", "arch": "encdec"},
          {"name": "ranger", "model": "depth-teacher", "arch": "encdec"}]
TINY = {"method": "branching", "teachers": TEACHERS, "scene_size": 32, "scene_classes": 2, "transfer": 48,
        "eval_n": 8, "epochs": 2, "batch_size": 16, "candidates": ["dec2", "dec1"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    data = tmp_path_factory.mktemp("branching") / "data"
    files = data.parent / "uploads"  # the user's disk, not the server's
    # The plumbing is under test here, not the teachers (tests/core/test_branching.py trains them).
    torch.manual_seed(0)
    models = {}
    for t, h, net, task in zip(TEACHERS, HOSTED, (EncDec(3, 3, WIDTHS), EncDec(3, 1, WIDTHS)), ("segmentation", "depth")):
        save_weights(net, files / t["file"])
        models[h["model"]] = export_bundle(net.eval(), data / "bundles" / h["model"], name=h["model"],
                                           in_shape=(3, 32, 32), mean=(0.0,) * 3, std=(1.0,) * 3, task=task)
    save_weights(EncDec(3, 1, [4, 8]), files / SHALLOW["file"])
    settings = prepare(data, bundles, models)
    s = JobServer(data, bundles, SDB_WORKERS="1")
    token = key(settings, ["jobs"])
    for t in (*TEACHERS, SHALLOW):
        t["file"] = upload(s.url, token, files / t["file"])
    yield s, token
    s.stop()


def test_branching_job_ships_a_segmentation_depth_bundle(server, tmp_path):
    s, token = server
    with Client(s.url, token) as c:
        sub = c.jobs.submit("amalgamate", TINY)
        job = c.jobs.wait(sub["id"], timeout=120, poll_s=0.2)
        assert job["status"] == "succeeded", job
        result = job["result"]
        assert result["tasks"] == ["seg", "depth"] and set(result["branch_points"]) == {"seg", "depth"}
        assert set(result["branch_points"].values()) <= {"dec2", "dec1"}
        assert result["params"] < result["teacher_params"]
        names = {a["name"] for a in c.jobs.artifacts(sub["id"])}
        assert {"student.sdb", "student.safetensors", "predictions.png", "report.json", "curves.png"} <= names
        report = json.loads(c.jobs.download(sub["id"], "report.json", tmp_path).read_text())
        assert set(report["curves"]) == {"search", "finetune"}
        assert set(report["branching"]["search_losses"]["seg"]) == {"dec2", "dec1"}
        assert c.jobs.download(sub["id"], "predictions.png", tmp_path).read_bytes()[:4] == b"\x89PNG"
        bundle_path = c.jobs.download(sub["id"], "student.sdb", tmp_path)

    bundle = load_bundle(bundle_path)
    assert bundle.meta["task"] == "segmentation-depth" and bundle.meta["mode"] == "plain"
    assert bundle.meta["outputs"] == {"seg": [0, 3], "depth": [3, 4]}
    assert bundle.meta["branch_points"] == result["branch_points"]
    assert bundle.meta["labels"] == ["background", "circle", "square"]
    out = bundle.public_logits(make_scenes(2, size=32, num_classes=2, seed=5).images)
    assert out.shape == (2, 4, 32, 32) and np.isfinite(out).all()


def test_hosted_teachers_teach_like_their_weights(server):
    by_weights, hosted = run_jobs(*server, "amalgamate", [{**TINY, "teachers": t} for t in (TEACHERS, HOSTED)])
    assert [t["task"] for t in hosted["params"]["teachers"]] == ["seg", "depth"]  # read from the bundles
    assert hosted["result"]["tasks"] == ["seg", "depth"]
    # The rebuilt teachers are the same networks: the same scores on the same test scenes.
    for task, metrics in by_weights["metrics"]["teachers"].items():
        for name, value in metrics.items():
            if name != "params":
                assert hosted["metrics"]["teachers"][task][name] == pytest.approx(value, rel=1e-3, abs=1e-3)


def test_branching_params_are_checked_before_queueing(server):
    s, token = server
    with Client(s.url, token) as c:
        before = len(c.jobs.list())
        with pytest.raises(BadRequest, match="task"):  # a teacher without its task
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{**TEACHERS[0], "task": None}, TEACHERS[1]]})
        with pytest.raises(BadRequest, match="one teacher per task"):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [TEACHERS[0], {**TEACHERS[1], "task": "seg"}]})
        with pytest.raises(BadRequest, match="this one 3 to 3"):  # 3 seg channels means 2 classes
            c.jobs.submit("amalgamate", {**TINY, "scene_classes": 4})
        with pytest.raises(BadRequest, match="same number of encoder stages"):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [TEACHERS[0], {**TEACHERS[1], **SHALLOW}]})
        with pytest.raises(BadRequest, match="not stages to branch after"):
            c.jobs.submit("amalgamate", {**TINY, "candidates": ["head"]})
        with pytest.raises(BadRequest, match="encdec"):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{**TEACHERS[0], "arch": "multilabel"}, TEACHERS[1]]})
        with pytest.raises(BadRequest, match="branching does not read tasks"):  # was accepted and ignored
            c.jobs.submit("amalgamate", {**TINY, "tasks": [0, 1]})
        with pytest.raises(BadRequest, match="eval_n must be at least 1"):  # was scored on one scene anyway
            c.jobs.submit("amalgamate", {**TINY, "eval_n": 0})
        assert len(c.jobs.list()) == before
