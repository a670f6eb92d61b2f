"""An uploaded ONNX model never has a server file read into its weights.

ONNX keeps a large tensor's values in an "external data" file the graph names by path; ``onnx``'s
``numpy_helper.to_array`` reads that path relative to the working directory. A graph uploaded as weights is
read back into torch (the upload check, the jobs), so before the fix a graph naming ``master.key`` (or any file
in the server's working directory) had it read in as a weight: a wrap or distill of it would then have taught
its bytes to a student the caller downloads. Now any tensor kept as external data, an initializer or a
constant, is refused before anything is read.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdb_core.onnx_torch import OnnxModule, onnx_classifier

SECRET = b"\x01\x02\x03\x04" * 4  # 4 float32 values


def _external(name: str, location: str):
    t = numpy_helper.from_array(np.zeros(4, np.float32), name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(SECRET)))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


def _graph(as_constant: bool) -> bytes:
    w = _external("w", "secret.bin")
    nodes = [helper.make_node("Constant", [], ["w"], value=w)] if as_constant else []
    g = helper.make_graph(nodes + [helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [] if as_constant else [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("as_constant", [False, True], ids=["initializer", "constant"])
def test_a_tensor_kept_in_an_external_file_is_refused_before_it_is_read(tmp_path, monkeypatch, as_constant):
    (tmp_path / "secret.bin").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)  # where onnx would look for it
    for read in (lambda b: OnnxModule(b, trainable=True), lambda b: onnx_classifier(b, (4,))):
        with pytest.raises(ValueError, match="keeps its values in an external data file"):
            read(_graph(as_constant))


@pytest.mark.anyio
async def test_such_a_graph_uploaded_as_weights_is_refused_and_not_kept(svc, tmp_path, monkeypatch):
    (tmp_path / "secret.bin").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    tok = svc.key(("jobs",))
    r = await svc.client.post("/v1/files", files={"file": ("model.onnx", _graph(False))}, data={"purpose": "weights"},
                              headers=svc.auth(tok))
    assert r.status_code == 422 and "keeps its values in an external data file" in r.json()["error"]["message"]
    assert (await svc.client.get("/v1/files", headers=svc.auth(tok))).json()["files"] == []
