"""The ``amalgamate`` job kind, method ``afk``, end to end: a real server and worker amalgamate two
teachers (uploaded weights files, or the same networks as hosted models) into a student bundle that
answers exactly the requested tasks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sdb_client import BadRequest, Client, NotFound, PermissionDenied

from sdb_core.amalgamate.afk import FilteredStudent
from sdb_core.amalgamate.multilabel import MultiLabelNet, mean_average_precision, predict_probs
from sdb_core.bundle import export_bundle, load_bundle
from sdb_core.data.composites import make_composites
from sdb_core.models import create_model
from sdb_core.weights import load_weights, save_weights

from .jobs_helpers import JobServer, key, prepare, run_jobs, upload

WIDTHS = [8, 8, 8]
# The teachers' weights, uploaded by the fixture: "file" is their id then.
TEACHERS = [{"name": "low", "file": "low.safetensors", "labels": [0, 1, 2, 3, 4], "widths": WIDTHS},
            {"name": "high", "file": "high.safetensors", "labels": [5, 6, 7, 8, 9], "widths": WIDTHS}]
TINY = {"method": "afk", "teachers": TEACHERS, "tasks": [2, 7, 9], "transfer": 64, "layer_epochs": 1,
        "finetune_epochs": 1, "batch_size": 32, "eval_n": 64}
NO_FILE = "file-" + "0" * 24
# The same two teachers, hosted: exported as plain multilabel bundles whose labels are the label ids.
HOSTED = [{"name": "low", "model": "ml-low"}, {"name": "high", "model": "ml-high"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    # One server for the module: starting one with its workers is most of these tests' time.
    data = tmp_path_factory.mktemp("amalgamate") / "data"
    files = data.parent / "uploads"  # the user's disk, not the server's
    models = {"digits-a": bundles.a}
    for i, (t, h) in enumerate(zip(TEACHERS, HOSTED)):
        # The plumbing is under test here, not the teachers' quality (tests/core/test_afk.py).
        torch.manual_seed(i)
        net = MultiLabelNet(1, len(t["labels"]), WIDTHS)
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_var.uniform_(0.5, 2.0)  # statistics the export must fold, not the identity
        save_weights(net, files / t["file"])
        models[h["model"]] = export_bundle(net.eval(), data / "bundles" / h["model"], name=h["model"],
                                           in_shape=(1, 56, 56), mean=(0.0,), std=(1.0,),
                                           labels=[str(k) for k in t["labels"]], task="multilabel")
    models["plain-cnn"] = export_bundle(create_model("cnn", num_classes=10, in_shape=(1, 56, 56)).eval(),
                                        data / "bundles" / "plain-cnn", name="plain-cnn", in_shape=(1, 56, 56),
                                        mean=(0.0,), std=(1.0,), labels=[str(k) for k in range(10)])
    settings = prepare(data, bundles, models)
    s = JobServer(data, bundles, SDB_WORKERS="1")
    token = key(settings, ["jobs"])
    for t in TEACHERS:
        t["file"] = upload(s.url, token, files / t["file"])
    yield s, token
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
    # The mAP the job reports is this student's on the test composites it names (eval_n, seed 0).
    xt, yt = make_composites(TINY["eval_n"], split="test", grid=2, seed=0)
    scores = predict_probs(student, torch.from_numpy(xt)).numpy()
    assert report["afk"]["map"] == pytest.approx(mean_average_precision(scores, yt[:, TINY["tasks"]]), abs=1e-6)
    assert job["metrics"]["student_map"] == report["afk"]["map"]


def test_amalgamate_params_are_checked_before_queueing(server):
    s, token = server
    with Client(s.url, token) as c:
        before = len(c.jobs.list())
        with pytest.raises(BadRequest, match="not taught"):
            c.jobs.submit("amalgamate", {**TINY, "tasks": [2, 11]})
        with pytest.raises(BadRequest, match="server paths are for admin keys"):  # a path, not a file id
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{**TEACHERS[0], "file": "../x.safetensors"},
                                                               TEACHERS[1]]})
        with pytest.raises(NotFound, match="no file"):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{**TEACHERS[0], "file": NO_FILE}, TEACHERS[1]]})
        with pytest.raises(BadRequest, match="labels"):  # AFK needs each output's label id
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{k: v for k, v in TEACHERS[0].items() if k != "labels"},
                                                               TEACHERS[1]]})
        with pytest.raises(BadRequest):
            c.jobs.submit("amalgamate", {**TINY, "method": "no-such-method"})
        # every student stage at 0 epochs: it was queued and "succeeded" with an untrained student, no curves.png
        with pytest.raises(BadRequest, match="layer_epochs 0, finetune_epochs 0"):
            c.jobs.submit("amalgamate", {**TINY, "layer_epochs": 0, "finetune_epochs": 0})
        assert len(c.jobs.list()) == before  # nothing was queued


def test_hosted_models_teach_like_their_weights(server):
    by_weights, hosted = run_jobs(*server, "amalgamate", [{**TINY, "teachers": t} for t in (TEACHERS, HOSTED)])
    # Labels, widths and channels came from the hosted bundles; the rebuilt teachers are the same
    # networks, so they score the same on the same test composites.
    assert hosted["params"]["teachers"][0]["labels"] == [0, 1, 2, 3, 4]
    assert hosted["params"]["teachers"][1]["version"] == "1"
    assert hosted["result"]["tasks"] == [2, 7, 9]
    assert hosted["result"]["teacher_params"] == pytest.approx(by_weights["result"]["teacher_params"], rel=0.05)
    assert hosted["metrics"]["teacher_map"] == pytest.approx(by_weights["metrics"]["teacher_map"], abs=0.5)


def test_hosted_teachers_of_the_wrong_kind_are_refused_before_queueing(server):
    s, token = server
    with Client(s.url, token) as c:
        before = len(c.jobs.list())
        with pytest.raises(PermissionDenied, match="protected"):  # a box's network is not given to a job
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{"name": "box", "model": "digits-a"}, HOSTED[1]]})
        with pytest.raises(BadRequest, match="not a multilabel network"):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{"name": "cnn", "model": "plain-cnn",
                                                               "labels": list(range(10))}, HOSTED[1]]})
        with pytest.raises(BadRequest, match="names one source"):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{**HOSTED[0], **TEACHERS[0]}, HOSTED[1]]})
        with pytest.raises(BadRequest, match="3 labels given"):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{**HOSTED[0], "labels": [0, 1, 2]}, HOSTED[1]]})
        with pytest.raises(NotFound):
            c.jobs.submit("amalgamate", {**TINY, "teachers": [{"name": "x", "model": "no-such-model"}, HOSTED[1]]})
        assert len(c.jobs.list()) == before  # nothing was queued


def test_hosted_teachers_serve_the_data_free_method_too(server):
    s, token = server
    tiny = {"method": "datafree", "teachers": HOSTED, "tasks": [7, 2], "samples": 32, "gen_epochs": 1,
            "layer_epochs": 1, "finetune_epochs": 1, "batch_size": 16, "eval_n": 64}
    with Client(s.url, token) as c:
        sub = c.jobs.submit("amalgamate", tiny)
        job = c.jobs.wait(sub["id"], timeout=120, poll_s=0.2)
        log = c.jobs.logs(sub["id"]).text
    assert job["status"] == "succeeded", job
    assert job["result"]["tasks"] == [7, 2] and job["result"]["bundle"] == "student.sdb"
    # The export folded the teachers' BatchNorm statistics away: the job says its BN prior is idle.
    assert "no BatchNorm statistics" in log
