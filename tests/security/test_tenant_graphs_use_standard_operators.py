"""A deploy key's graph may use the standard ONNX operator sets only (ai.onnx, ai.onnx.ml), and so may every graph a
job runs: uploaded teacher weights too, where a graph in ONNX Runtime's quantized QOperator form is stored as the
standard graph it computes.

Before the fix a tenant could serve a graph of ONNX Runtime's own operators (com.microsoft: fused attention,
quantized kernels, ...) or of any domain a runtime registers, whose inputs the ONNX spec never checked, in
every server process. Now such a deploy is a 400 that names the domain, before any copy or model time; an
admin still serves it (an export optimised for ONNX Runtime is the admin's call). Against the real app.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sdb_core.graph_size import STANDARD_DOMAINS, node_domains
from tests.security.test_hand_made_bundles_are_refused_clearly import _disk, _edit, _sdb, _settings, plain  # noqa: F401
from tests.service.conftest import start_service

pytestmark = pytest.mark.anyio


def _graph(domain: str, inside_if: bool = False) -> bytes:
    """input [N, 3, 8, 8] -> logits [N, 4] = Gelu(Flatten(input) @ W), Gelu from ``domain`` (ONNX Runtime's
    com.microsoft one, or ai.onnx's own since opset 20); ``inside_if``: in a branch of an If."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((192, 4), 0.01, np.float32), "w")
    gelu = helper.make_node("Gelu", ["mm"], ["logits"], domain=domain)
    if inside_if:
        branch = helper.make_graph([gelu], "branch", [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                        ["batch", 4])])
        gelu = helper.make_node("If", ["yes"], ["logits"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["mm"]), gelu],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w, numpy_helper.from_array(np.array(True), "yes")])
    imports = [helper.make_opsetid("", 20)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 9
    return model.SerializeToString()


def test_the_domains_a_graph_names_are_read_off_its_bytes():
    assert node_domains(_graph("")) <= {"ai.onnx"}  # an empty domain is the default one
    assert node_domains(_graph("com.microsoft")) - STANDARD_DOMAINS == {"com.microsoft"}
    assert node_domains(_graph("com.microsoft", inside_if=True)) - STANDARD_DOMAINS == {"com.microsoft"}


async def test_a_deploy_keys_graph_of_runtime_operators_is_refused_and_an_admin_serves_it(tmp_path, plain):  # noqa: F811
    settings = _settings(tmp_path)
    svc, manager = await start_service(settings)
    try:
        tenant = svc.auth(svc.key(("deploy",)))
        r = await svc.client.post("/v1/models", files={"file": ("std.sdb", _sdb(_edit(plain, onnx=_graph(""))))},
                                  data={"name": "standard"}, headers=tenant)
        assert r.status_code == 201, r.text  # the standard Gelu: served
        served, disk = (await svc.client.get("/v1/models")).json()["models"], _disk(settings)
        for inside_if in (False, True):
            bundle = _sdb(_edit(plain, onnx=_graph("com.microsoft", inside_if)))
            r = await svc.client.post("/v1/models", files={"file": ("ms.sdb", bundle)}, data={"name": "fused"},
                                      headers=tenant)
            assert r.status_code == 400 and r.json()["error"]["code"] == "bundle_refused", r.text
            assert "com.microsoft" in r.json()["error"]["message"], r.text
            assert (await svc.client.get("/v1/models")).json()["models"] == served and _disk(settings) == disk
        r = await svc.client.post("/v1/models", files={"file": ("ms.sdb", bundle)}, data={"name": "fused"},
                                  headers=svc.admin)
        assert r.status_code == 201, r.text
        x = {"inputs": np.ones((1, 3, 8, 8)).tolist()}
        assert (await svc.client.post("/v1/models/fused/predict", json=x)).status_code == 200
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_uploaded_weights_of_runtime_operators_are_stored_as_standard_ones_or_refused(svc, tmp_path):
    """quantize_static's QOperator form names com.microsoft operators (QGemm): a jobs key's upload of it is stored as
    the QDQ graph of standard operators it computes, which answers as the upload did; any other operator of that
    domain is refused, and nothing of it is kept."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from sdb_core.onnx_torch import OnnxModule
    from tests.onnx_graphs import ViewNet, onnx_bytes

    torch.manual_seed(0)
    (tmp_path / "float.onnx").write_bytes(onnx_bytes(ViewNet(), (1, 8, 8)))
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)

    class Calibration(CalibrationDataReader):
        batches = iter([{"image": x}])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"), Calibration(),
                    quant_format=QuantFormat.QOperator, per_channel=True)
    uploaded = (tmp_path / "q.onnx").read_bytes()
    assert "com.microsoft" in node_domains(uploaded)
    tok = svc.key(("jobs",))
    r = await svc.client.post("/v1/files", files={"file": ("q.onnx", uploaded)}, data={"purpose": "weights"},
                              headers=svc.auth(tok))
    assert r.status_code == 201, r.text
    assert r.json()["info"]["quantized"] == "QOperator, stored as its QDQ form"
    stored = (svc.settings.files_dir / r.json()["id"] / "weights.onnx").read_bytes()
    assert r.json()["bytes"] == max(len(uploaded), len(stored))  # what the storage cap counts: sent or kept
    assert r.json()["sha256"] == hashlib.sha256(uploaded).hexdigest()  # the hash of what was sent
    assert node_domains(stored) <= STANDARD_DOMAINS and "com.microsoft" not in {
        o.domain for o in onnx.load_from_string(stored).opset_import}
    want = ort.InferenceSession(uploaded, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = ort.InferenceSession(stored, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(OnnxModule(stored, fold=True)(torch.from_numpy(x)).numpy(), want, rtol=1e-4,
                                   atol=1e-4)
    files = (await svc.client.get("/v1/files", headers=svc.auth(tok))).json()["files"]
    graph = onnx.load_from_string(uploaded)
    next(n for n in graph.graph.node if n.domain == "com.microsoft").op_type = "QAttention"
    r = await svc.client.post("/v1/files", files={"file": ("a.onnx", graph.SerializeToString())},
                              data={"purpose": "weights"}, headers=svc.auth(tok))
    assert r.status_code == 422 and "standard ONNX operators only" in r.text, r.text
    assert (await svc.client.get("/v1/files", headers=svc.auth(tok))).json()["files"] == files
