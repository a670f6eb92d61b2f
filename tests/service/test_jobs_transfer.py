"""The ``transferability`` job kind end to end: a real server and worker rank hosted and uploaded models.

Ranking reads a hosted model's network (white-box): digits-a is a protected box, so the ranking that
reads it runs with an admin key; a ``jobs`` key may rank plain hosted models only."""
from __future__ import annotations

import json

import pytest
import torch
from sdb_client import BadRequest, Client, NotFound, PermissionDenied

from sdb_core.bundle import export_bundle
from sdb_core.models import create_model
from sdb_core.transfer.depara import DeparaConfig
from sdb_core.weights import save_weights

from .jobs_helpers import JobServer, key, prepare, upload


@pytest.fixture(scope="module")  # one server for the module: starting one costs seconds
def server(tmp_path_factory, bundles):
    data = tmp_path_factory.mktemp("transfer") / "data"
    torch.manual_seed(0)
    # A hosted plain model (no key, no protection): a jobs key may read its network.
    plain = export_bundle(create_model("cnn", num_classes=10, in_shape=(1, 8, 8)).eval(), data.parent / "plain",
                          name="plain-cnn", in_shape=(1, 8, 8), mean=(0.0,), std=(1.0,),
                          labels=[str(k) for k in range(10)])
    settings = prepare(data, bundles, {"digits-a": bundles.a, "plain-cnn": plain})
    # An uploaded source that never learnt anything: a randomly initialised net.
    random = save_weights(create_model("cnn", num_classes=10, in_shape=(1, 8, 8)), data.parent / "random.safetensors")
    s = JobServer(data, bundles, SDB_WORKERS="1")
    admin, token = key(settings, ["admin"]), key(settings, ["jobs"])
    JOB["sources"][1]["file"] = upload(s.url, admin, random)
    yield s, admin, token
    s.stop()


LAYERS = ["/features/features.1/Relu", "/features/features.4/Relu"]  # node names in the hosted ONNX graph
# The random source's "file" becomes its upload's id in the fixture.
JOB = {"sources": [{"model": "digits-a", "candidate_layers": LAYERS},
                   {"file": "random.safetensors", "arch": "cnn", "name": "random"}],
       "target_data": "digits", "probe": 40, "target_train": 400, "target_epochs": 4, "maps": 3}


def test_ranks_a_hosted_model_trained_on_the_task_above_a_random_upload(server, tmp_path):
    s, admin, _ = server
    with Client(s.url, admin) as c:
        sub = c.jobs.submit("transferability", JOB)
        job = c.jobs.wait(sub["id"], timeout=120, poll_s=0.2)
        assert job["status"] == "succeeded", (job.get("error"), job.get("message"))
        assert job["result"]["ranking"] == ["digits-a", "random"], job["result"]
        names = {a["name"] for a in c.jobs.artifacts(sub["id"])}
        assert {"report.json", "similarity.png", "attribution.png"} <= names
        report = json.loads(c.jobs.download(sub["id"], "report.json", tmp_path).read_text())["transferability"]
        assert set(report["baselines"]) == {"depara", "depara_v", "depara_e", "rsa", "random"}
        assert report["similarity"]["names"] == ["target", "digits-a", "random"]
        assert set(report["layer_selection"]["digits-a"]["scores"]) == set(LAYERS)
        assert job["result"]["best_layers"]["digits-a"] in LAYERS
        m = report["similarity"]["matrix"]
        assert m[0][0] == pytest.approx(1.0 + JOB.get("lam", DeparaConfig().lam)) and m[0][1] == pytest.approx(m[1][0])
        for art in ("similarity.png", "attribution.png"):
            assert c.jobs.download(sub["id"], art, tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_transfer_params_are_checked_before_queueing(server):
    s, _, token = server
    plain = {**JOB, "sources": [{"model": "plain-cnn"}]}
    with Client(s.url, token) as c:
        before = len(c.jobs.list())
        with pytest.raises(BadRequest):  # both a target model and a target data set
            c.jobs.submit("transferability", {**plain, "target": {"model": "plain-cnn"}})
        with pytest.raises(BadRequest, match="server paths are for admin keys"):  # a path, not a file id
            c.jobs.submit("transferability", {**plain, "sources": [{"file": "../x.safetensors", "arch": "cnn"}]})
        with pytest.raises(NotFound):  # another key's upload (the admin's) is no file to this key
            c.jobs.submit("transferability", {**plain, "sources": [JOB["sources"][1]]})
        with pytest.raises(NotFound):
            c.jobs.submit("transferability", {**plain, "sources": [{"model": "no-such-model"}]})
        with pytest.raises(PermissionDenied, match="protected"):  # a box's network is not given to a jobs key
            c.jobs.submit("transferability", {**plain, "sources": [{"model": "digits-a"}]})
        # more probe images than the embedded set's test split (digits: 400): was queued, then failed at run time
        with pytest.raises(BadRequest, match="probe 401 is more than the 400 test images of target_data 'digits'"):
            c.jobs.submit("transferability", {**plain, "probe": 401})
        with pytest.raises(BadRequest, match="probe 1001 is more than the 1000 test images of probe_data 'mnist-5k'"):
            c.jobs.submit("transferability", {**plain, "probe_data": "mnist-5k", "probe": 1001})
        assert len(c.jobs.list()) == before  # nothing was queued
        job = c.jobs.submit("transferability", plain)  # a plain hosted model's network: a jobs key may read it
        assert job["params"]["sources"][0]["version"] == "1"
        c.jobs.cancel(job["id"])


def test_the_service_knows_every_method():
    from typing import get_args

    from sdb_core.transfer import METHODS
    from service.jobs.kinds.transferability import TransferParams

    assert get_args(TransferParams.model_fields["method"].annotation) == METHODS
    for method in METHODS:  # every method the job accepts, the library runs
        DeparaConfig(method=method)
