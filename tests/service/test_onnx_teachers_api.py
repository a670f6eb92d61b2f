"""An owner wraps a classifier it uploaded as ONNX: the upload is checked as a network the jobs can run, a wrap
job names it by file id alone (no architecture), and the deployed box answers as the teacher did."""
from __future__ import annotations

import anyio
import numpy as np
import pytest
from torch import nn

from sdb_core.train import predict_logits
from tests.onnx_graphs import ViewNet, onnx_bytes

from .jobs_helpers import upload_asgi

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]


def export(net: nn.Module, path, shape=(1, 8, 8)) -> None:
    path.write_bytes(onnx_bytes(net, shape))


@pytest.fixture(scope="module")
def teacher():
    from sdb_core.data import load_dataset
    from sdb_core.train import TrainConfig, seed_everything, train_classifier

    data = load_dataset("digits")
    seed_everything(0)
    net = ViewNet()
    train_classifier(net, data.train, TrainConfig(epochs=4, lr=0.02, seed=0))
    return net.eval(), data


async def test_an_uploaded_onnx_teacher_is_wrapped_by_file_id_and_served(svc, tmp_path, teacher):
    from service.jobs.worker import run_worker

    net, data = teacher
    export(net, tmp_path / "teacher.onnx")
    tok = svc.key(("jobs", "deploy"))
    r = await svc.client.post("/v1/files", files={"file": ("teacher.onnx", (tmp_path / "teacher.onnx").read_bytes())},
                              data={"purpose": "weights"}, headers=svc.auth(tok))
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "onnx" and r.json()["info"]["input_shape"] == ["N", 1, 8, 8]
    mislabelled = await svc.client.post("/v1/jobs", headers=svc.auth(tok), json={"kind": "wrap", "params": {
        "data": "digits", "teacher": {"file": r.json()["id"], "arch": "cnn"}}})  # was ignored in silence
    assert mislabelled.status_code == 422 and "brings its own network" in mislabelled.text, mislabelled.text
    job = await svc.client.post("/v1/jobs", headers=svc.auth(tok), json={"kind": "wrap", "params": {
        "data": "digits", "teacher": {"file": r.json()["id"], "mean": list(data.mean), "std": list(data.std)},
        "deploy": True}})  # the default self-check: the box it ships keeps the teacher's answers
    assert job.status_code == 202, job.text
    await anyio.to_thread.run_sync(lambda: run_worker(svc.settings, once=True))
    done = (await svc.client.get(f"/v1/jobs/{job.json()['id']}", headers=svc.auth(tok))).json()
    assert done["status"] == "succeeded", done
    assert done["result"]["model"] == "digits-onnx" and done["result"]["deployed"]
    log = await svc.client.get(f"/v1/jobs/{done['id']}/logs", headers=svc.auth(tok))
    assert "the network takes inputs normalised by mean" in log.text  # the teacher's normalisation reached it

    x, _ = data.test.tensors
    async def served():
        r = await svc.client.post("/v1/models/digits-onnx/predict", json={"inputs": x[:200].tolist()})
        return r
    r = None
    for _ in range(50):  # the API process picks the new version up within its sync interval
        r = await served()
        if r.status_code == 200:
            break
        await anyio.sleep(0.1)
    assert r.status_code == 200, r.text
    labels = [p["labels"][0] for p in r.json()["predictions"]]
    want = [data.labels[i] for i in predict_logits(net, x[:200]).argmax(1).tolist()]
    assert np.mean([a == b for a, b in zip(labels, want)]) > 0.8  # measured 0.90-0.92 (its bundle, 2 runs)


async def test_what_a_job_cannot_run_is_refused_at_upload_or_submission(svc, tmp_path):
    from sdb_core.models import create_model
    from sdb_core.weights import save_weights

    tok = svc.key(("jobs",))

    class TopK(nn.Module):
        def forward(self, x):
            return x.flatten(1).topk(10).values

    export(TopK(), tmp_path / "topk.onnx")
    r = await svc.client.post("/v1/files", files={"file": ("topk.onnx", (tmp_path / "topk.onnx").read_bytes())},
                              data={"purpose": "weights"}, headers=svc.auth(tok))
    assert r.status_code == 422 and "topk.onnx: cannot run this ONNX graph in torch: unsupported operators ['TopK']" \
        in r.json()["error"]["message"], r.text
    assert (await svc.client.get("/v1/files", headers=svc.auth(tok))).json()["files"] == []

    save_weights(create_model("cnn", num_classes=10, in_shape=(1, 8, 8)), tmp_path / "t.safetensors")
    weights = await upload_asgi(svc, tok, tmp_path / "t.safetensors")
    r = await svc.client.post("/v1/jobs", headers=svc.auth(tok), json={"kind": "wrap", "params": {
        "data": "digits", "teacher": {"file": weights}}})
    assert r.status_code == 422 and "give their architecture (teacher.arch)" in r.text, r.text
    r = await svc.client.post("/v1/jobs", headers=svc.auth(tok), json={"kind": "wrap", "params": {
        "data": "digits", "teacher": {"arch": "cnn", "mean": [0.5], "std": [0.25]}}})
    assert r.status_code == 422 and "mean and std go together, with file" in r.text, r.text
    assert (await svc.client.get("/v1/jobs", headers=svc.auth(tok))).json()["jobs"] == []

