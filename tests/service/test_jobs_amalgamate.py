"""The ``amalgamate`` job kind, method ``afk``, end to end: a real server and worker amalgamate two
teachers' weights files into a student bundle that answers exactly the requested tasks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sdb_client import BadRequest, Client

from sdb_core.amalgamate.afk import FilteredStudent
from sdb_core.amalgamate.multilabel import MultiLabelNet
from sdb_core.bundle import load_bundle
from sdb_core.data.composites import make_composites
from sdb_core.weights import load_weights, save_weights

from .jobs_helpers import JobServer, key, prepare

WIDTHS = [8, 8, 8]
TEACHERS = [{"name": "low", "weights": "teachers/low.safetensors", "labels": [0, 1, 2, 3, 4], "widths": WIDTHS},
            {"name": "high", "weights": "teachers/high.safetensors", "labels": [5, 6, 7, 8, 9], "widths": WIDTHS}]
TINY = {"method": "afk", "teachers": TEACHERS, "tasks": [2, 7, 9], "transfer": 64, "layer_epochs": 1,
        "finetune_epochs": 1, "batch_size": 32, "eval_n": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    # One server for the module: starting one with its workers is most of these tests' time.
    data = tmp_path_factory.mktemp("amalgamate") / "data"
    settings = prepare(data, bundles)
    for i, t in enumerate(TEACHERS):
        # The plumbing is under test here, not the teachers' quality (tests/core/test_afk.py).
        torch.manual_seed(i)
        save_weights(MultiLabelNet(1, len(t["labels"]), WIDTHS), data / t["weights"])
    s = JobServer(data, bundles, SDB_WORKERS="1")
    yield s, key(settings, ["jobs"])
    s.stop()


def test_afk_job_ships_a_student_bundle_for_exactly_the_requested_tasks(server, tmp_path):
    s, token = server
    with Client(s.url, token) as c:
        sub = c.jobs.submit("amalgamate", TINY)
        job = c.jobs.wait(sub["id"], timeout=120, poll_s=0.2)
        assert job["status"] == "succeeded", job
        assert job["result"]["tasks"] == [2, 7, 9] and job["result"]["bundle"] == "student.sdb"
        assert job["result"]["params"] < sum(job["result"]["teacher_params"].values())
        names = {a["name"] for a in c.jobs.artifacts(sub["id"])}
        assert {"student.sdb", "student.safetensors", "report.json", "curves.png"} <= names
        report = json.loads(c.jobs.download(sub["id"], "report.json", tmp_path).read_text())
        assert set(report["curves"]) == {"block0", "block1", "block2", "finetune"}
        assert 0.0 <= report["afk"]["map"] <= 100.0
        assert c.jobs.download(sub["id"], "curves.png", tmp_path).read_bytes()[:4] == b"\x89PNG"
        bundle_path = c.jobs.download(sub["id"], "student.sdb", tmp_path)
        weights = c.jobs.download(sub["id"], "student.safetensors", tmp_path)

    bundle = load_bundle(bundle_path)
    assert bundle.meta["task"] == "multilabel" and bundle.meta["mode"] == "plain"
    assert bundle.meta["labels"] == ["2", "7", "9"] and bundle.meta["input"]["shape"] == [1, 56, 56]
    x, _ = make_composites(5, split="test", seed=0)
    logits = bundle.public_logits(x)
    assert logits.shape == (5, 3)
    # The bundle is the trained student: same outputs as its weights in torch.
    student = load_weights(FilteredStudent(1, [2, 7, 9], job["result"]["widths"]), weights).eval()
    with torch.no_grad():
        np.testing.assert_allclose(logits, student(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_amalgamate_params_are_checked_before_queueing(server):
    s, token = server
    with Client(s.url, token) as c:
        before = len(c.jobs.list())
        with pytest.raises(BadRequest, match="not taught"):
            c.jobs.submit("amalgamate", {**TINY, "tasks": [2, 11]})
        with pytest.raises(BadRequest):  # weights outside the data directory
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{**TEACHERS[0], "weights": "../x.safetensors"},
                                                               TEACHERS[1]]})
        with pytest.raises(BadRequest, match="no teacher weights"):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{**TEACHERS[0], "weights": "teachers/none.safetensors"},
                                                               TEACHERS[1]]})
        with pytest.raises(BadRequest, match="labels"):  # AFK needs each output's label id
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{k: v for k, v in TEACHERS[0].items() if k != "labels"},
                                                               TEACHERS[1]]})
        with pytest.raises(BadRequest):
            c.jobs.submit("amalgamate", {**TINY, "method": "no-such-method"})
        assert len(c.jobs.list()) == before  # nothing was queued
