"""The ``transferability`` job kind end to end: a real server and worker rank hosted and uploaded models."""
from __future__ import annotations

import json

import pytest
import torch
from sdb_client import BadRequest, Client, NotFound

from sdb_core.models import create_model
from sdb_core.transfer.depara import DeparaConfig
from sdb_core.weights import save_weights

from .jobs_helpers import JobServer, key, prepare


@pytest.fixture(scope="module")  # one server for the module: starting one costs seconds
def server(tmp_path_factory, bundles):
    data = tmp_path_factory.mktemp("transfer") / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    torch.manual_seed(0)
    # An uploaded source that never learnt anything: a randomly initialised net.
    save_weights(create_model("cnn", num_classes=10, in_shape=(1, 8, 8)), data / "uploads" / "random.safetensors")
    s = JobServer(data, bundles, SDB_WORKERS="1")
    yield s, key(settings, ["jobs"])
    s.stop()


LAYERS = ["/features/features.1/Relu", "/features/features.4/Relu"]  # node names in the hosted ONNX graph
JOB = {"sources": [{"model": "digits-a", "candidate_layers": LAYERS}, {"weights": "uploads/random.safetensors", "arch": "cnn", "name": "random"}],
       "target_data": "digits", "probe": 40, "target_train": 400, "target_epochs": 4, "maps": 3}


def test_ranks_a_hosted_model_trained_on_the_task_above_a_random_upload(server, tmp_path):
    s, token = server
    with Client(s.url, token) as c:
        sub = c.jobs.submit("transferability", JOB)
        job = c.jobs.wait(sub["id"], timeout=120, poll_s=0.2)
        assert job["status"] == "succeeded", job
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
    s, token = server
    with Client(s.url, token) as c:
        before = len(c.jobs.list())
        with pytest.raises(BadRequest):  # both a target model and a target data set
            c.jobs.submit("transferability", {**JOB, "target": {"model": "digits-a"}})
        with pytest.raises(BadRequest):  # weights outside the data directory
            c.jobs.submit("transferability", {**JOB, "sources": [{"weights": "../x.safetensors"}]})
        with pytest.raises(BadRequest):  # weights that are not there
            c.jobs.submit("transferability", {**JOB, "sources": [{"weights": "uploads/none.safetensors"}]})
        with pytest.raises(NotFound):
            c.jobs.submit("transferability", {**JOB, "sources": [{"model": "no-such-model"}]})
        assert len(c.jobs.list()) == before  # nothing was queued


def test_the_service_knows_every_method():
    from typing import get_args

    from sdb_core.transfer import METHODS
    from service.jobs.kinds.transferability import TransferParams

    assert get_args(TransferParams.model_fields["method"].annotation) == METHODS
    for method in METHODS:  # every method the job accepts, the library runs
        DeparaConfig(method=method)
