"""The ``amalgamate`` job kind, method ``datafree``, end to end: a real server and worker amalgamate two
teachers' uploaded weights files, with no data set, into a student bundle for the requested labels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sdb_client import BadRequest, Client

from sdb_core.amalgamate.multilabel import MultiLabelNet, mean_average_precision
from sdb_core.bundle import load_bundle
from sdb_core.data.composites import make_composites
from sdb_core.weights import save_weights

from .jobs_helpers import JobServer, key, prepare, upload

WIDTHS = [8, 8]
# The teachers' weights, uploaded by the fixture: "file" is their id then.
TEACHERS = [{"name": "low", "file": "low.safetensors", "labels": [0, 1, 2, 3, 4], "widths": WIDTHS},
            {"name": "high", "file": "high.safetensors", "labels": [5, 6, 7, 8, 9], "widths": WIDTHS}]
TINY = {"method": "datafree", "teachers": TEACHERS, "tasks": [7, 2], "samples": 32, "gen_epochs": 1,
        "layer_epochs": 1, "finetune_epochs": 1, "batch_size": 16, "eval_n": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    data = tmp_path_factory.mktemp("datafree") / "data"
    files = data.parent / "uploads"  # the user's disk, not the server's
    settings = prepare(data, bundles)
    for i, t in enumerate(TEACHERS):
        # The plumbing is under test here, not the student's quality (tests/core/test_datafree.py).
        torch.manual_seed(i)
        save_weights(MultiLabelNet(1, len(t["labels"]), WIDTHS), files / t["file"])
    s = JobServer(data, bundles, SDB_WORKERS="1")
    token = key(settings, ["jobs"])
    for t in TEACHERS:
        t["file"] = upload(s.url, token, files / t["file"])
    yield s, token
    s.stop()


def test_datafree_job_ships_a_student_bundle_grids_and_curves(server, tmp_path):
    s, token = server
    with Client(s.url, token) as c:
        sub = c.jobs.submit("amalgamate", TINY)
        job = c.jobs.wait(sub["id"], timeout=180, poll_s=0.2)
        assert job["status"] == "succeeded", job
        assert job["result"]["tasks"] == [7, 2] and job["result"]["bundle"] == "student.sdb"
        names = {a["name"] for a in c.jobs.artifacts(sub["id"])}
        grids = {"grid_generator_stage1.png", "grid_generator_stage2.png", "grid_final.png"}
        assert {"student.sdb", "student.safetensors", "report.json", "curves.png"} | grids <= names
        assert set(job["result"]["grids"]) == grids
        report = json.loads(c.jobs.download(sub["id"], "report.json", tmp_path).read_text())
        assert set(report["curves"]) == {"generator_stage1", "generator_stage2", "student_block1", "student_block2",
                                         "student_finetune"}
        for name in ("curves.png", "grid_final.png"):
            assert c.jobs.download(sub["id"], name, tmp_path).read_bytes()[:4] == b"\x89PNG"
        bundle_path = c.jobs.download(sub["id"], "student.sdb", tmp_path)

    bundle = load_bundle(bundle_path)
    assert bundle.meta["task"] == "multilabel" and bundle.meta["mode"] == "plain"
    assert bundle.meta["labels"] == ["7", "2"] and bundle.meta["input"]["shape"] == [1, 56, 56]
    x, _ = make_composites(4, split="test", seed=0)
    logits = bundle.public_logits(x)
    assert logits.shape == (4, 2) and np.isfinite(logits).all()
    # The mAP the job reports is the shipped student's on the test composites it names (eval_n, seed 0).
    xt, yt = make_composites(TINY["eval_n"], split="test", seed=0)
    scores = 1.0 / (1.0 + np.exp(-bundle.public_logits(xt)))
    assert job["metrics"]["student_map"] == pytest.approx(mean_average_precision(scores, yt[:, TINY["tasks"]]),
                                                          abs=0.05)


def test_datafree_params_are_checked_before_queueing(server):
    s, token = server
    with Client(s.url, token) as c:
        before = len(c.jobs.list())
        with pytest.raises(BadRequest, match="not taught"):
            c.jobs.submit("amalgamate", {**TINY, "tasks": [2, 11]})
        with pytest.raises(BadRequest, match="same number of blocks"):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [TEACHERS[0], {**TEACHERS[1], "widths": [8, 8, 8]}]})
        with pytest.raises(BadRequest, match="student_widths"):
            c.jobs.submit("amalgamate", {**TINY, "student_widths": [4, 4, 4]})
        # no student stage: it was queued and "succeeded" with an untrained student, no curves.png; the generator's
        # epochs train no student
        with pytest.raises(BadRequest, match="layer_epochs 0, finetune_epochs 0"):
            c.jobs.submit("amalgamate", {**TINY, "gen_epochs": 0, "image_epochs": 0, "layer_epochs": 0,
                                         "finetune_epochs": 0})
        with pytest.raises(BadRequest, match="datafree would train no student"):
            c.jobs.submit("amalgamate", {**TINY, "gen_epochs": 3, "image_epochs": 3, "layer_epochs": 0,
                                         "finetune_epochs": 0})
        assert len(c.jobs.list()) == before
