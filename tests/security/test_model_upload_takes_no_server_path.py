"""Hole 1 (model upload): ``POST /v1/models`` takes the bundle itself, never a path on the server.

Before the fix the route took ``{"path": ...}`` and opened whatever file the server could read: a
bundle anywhere on its disk was served, and for any other file the refusal echoed the path and told
whether it existed (a probe of the server's disk). Now a bundle is uploaded (multipart, or the id of
a ``bundle`` file the key uploaded), by an admin key or one with the new ``deploy`` scope; a path is
a 422 that reads nothing. Against the real server: ``sdb serve`` on a loopback port, SQLite store.
"""
from __future__ import annotations

import httpx
import pytest

from tests.service.conftest import Server, sdb_bytes
from tests.service.jobs_helpers import key, prepare


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    data_dir = tmp_path_factory.mktemp("upload-data")
    settings = prepare(data_dir, bundles)
    srv = Server(data_dir, bundles, {"SDB_REGISTER_DEMO": "false", "SDB_MODELS_SYNC_S": "0.2"})
    srv.settings = settings
    yield srv
    srv.stop()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def served(srv) -> list[tuple[str, str]]:
    return [(m["name"], m["version"]) for m in httpx.get(srv.url + "/v1/models").json()["models"]]


def test_a_server_path_is_refused_and_nothing_is_read(server, bundles):
    admin = auth(key(server.settings, ["admin"]))
    data_dir = server.settings.data_dir
    for path in (str(bundles.b), str(bundles.master_key_file), str(data_dir / "sdb.sqlite3"), "/etc/passwd",
                 "/nonexistent/x.sdb"):
        r = httpx.post(server.url + "/v1/models", json={"path": path}, headers=admin, timeout=60)
        assert r.status_code == 422, (path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "server_path_refused"
        assert path not in r.text  # neither echoed nor told apart: an existing file answers as a missing one
    assert served(server) == []


def test_a_deploy_key_serves_an_uploaded_bundle(server, bundles):
    deployer = auth(key(server.settings, ["deploy"]))
    r = httpx.post(server.url + "/v1/models", files={"file": ("b.sdb", sdb_bytes(bundles.b))}, headers=deployer,
                   timeout=60)
    assert r.status_code == 201, r.text
    assert (r.json()["name"], r.json()["version"]) == ("digits-b", "1")
    assert str(server.settings.data_dir) not in r.text
    predict = httpx.post(server.url + "/v1/models/digits-b/predict", json={"inputs": bundles.x[:2].tolist()})
    assert predict.status_code == 200
    # an uploaded bundle is named by id, and only by a key that may use that file
    other = auth(key(server.settings, ["jobs"]))
    f = httpx.post(server.url + "/v1/files", files={"file": ("a.sdb", sdb_bytes(bundles.a))},
                   data={"purpose": "bundle"}, headers=other, timeout=60).json()
    r = httpx.post(server.url + "/v1/models", json={"file": f["id"]}, headers=deployer, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    assert served(server) == [("digits-b", "1")]
    # a key with neither deploy nor admin cannot deploy at all
    r = httpx.post(server.url + "/v1/models", files={"file": ("a.sdb", sdb_bytes(bundles.a))}, headers=other,
                   timeout=60)
    assert r.status_code == 403


def _external_data_bundle(tmp_path, location: str) -> bytes:
    """A plain bundle, hashes and all, whose graph keeps its one weight in "external data" at ``location``: a
    file ONNX Runtime would read from the server's disk into the model (and predictions would carry it out)."""
    import json

    import numpy as np
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from sdb_core.bundle import _sha256, export_bundle

    out = export_bundle(torch.nn.Linear(4, 4), tmp_path / location.replace("/", "_"), name="ext", in_shape=(4,),
                        mean=(0.0,), std=(1.0,), labels=[f"c{i}" for i in range(4)])
    w = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    graph = helper.make_graph([helper.make_node("Add", ["input", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [w])
    onnx_bytes = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    (out / "model.onnx").write_bytes(onnx_bytes)
    meta = json.loads((out / "meta.json").read_text())
    meta["files"]["model.onnx"] = _sha256(onnx_bytes)
    (out / "meta.json").write_text(json.dumps(meta))
    return sdb_bytes(out)


def test_a_graph_that_reads_external_data_is_refused(server, tmp_path):
    """ONNX keeps big weights in files beside the graph ("external data"); a bundle's graph naming a server file
    (the master key, by absolute or relative path) is refused at deploy, and nothing of the file is served."""
    admin = auth(key(server.settings, ["admin"]))
    secret = server.settings.master_key_file
    before = served(server)
    for location in (str(secret), f"../../../../../../../..{secret}", secret.name, "model.onnx"):
        r = httpx.post(server.url + "/v1/models", files={"file": ("ext.sdb", _external_data_bundle(tmp_path, location))},
                       headers=admin, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bundle_refused", (location, r.text)
        assert str(secret) not in r.text and secret.read_bytes().hex()[:16] not in r.text
    assert served(server) == before
