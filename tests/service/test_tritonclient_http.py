"""The unmodified ``tritonclient`` (HTTP) against the real server: ``sdb serve`` on a loopback port.

Its defaults (the binary tensor extension both ways) and JSON, every input datatype the server takes
(FP32; FP16, INT64 and BOOL converted exactly; FP64 rounded; BYTES of PNG images), the keyed output with and without
a key, and errors read back by the client as the server's messages. Bad binary bodies, sent by hand,
are each a 400 in the protocol's form that charges nothing.
"""
from __future__ import annotations

import gzip
import io
import struct
import time
import zlib

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

import sdb_core
from sdb_core.bundle import load_bundle
from service import oip, oip_binary
from service.store import Store
from service.tensors import image_to_input
from tests.service.conftest import Server, sdb_bytes
from tests.service.jobs_helpers import key, prepare

LIMIT = 64 << 10  # the server's payload limit here: a binary body over it is a 413 like a JSON one


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    data_dir = tmp_path_factory.mktemp("triton-data")
    settings = prepare(data_dir, bundles)
    srv = Server(data_dir, bundles, {"SDB_REGISTER_DEMO": "false", "SDB_MAX_PAYLOAD_BYTES": str(LIMIT)})
    srv.settings = settings
    admin = {"Authorization": f"Bearer {key(settings, ['admin'])}"}
    for name, fields in (("digits-a", {}), ("digits-label", {"policy": "label"})):
        r = httpx.post(srv.url + "/v1/models", files={"file": ("a.sdb", sdb_bytes(bundles.a))},
                       data={"name": name, **fields}, headers=admin, timeout=60)
        assert r.status_code == 201, r.text
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def ref(bundles, server):
    return load_bundle(bundles.a, server.settings.master_key)


def infer_input(x: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    t = triton.InferInput("input", list(x.shape), datatype)
    t.set_data_from_numpy(x, binary_data=binary)
    return t


def png(sample: np.ndarray, norm: dict) -> bytes:
    pixels = (sample[0] * norm["std"][0] + norm["mean"][0]) * 255.0
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def used(server, token: str) -> int:
    """The key's charged samples, as the store has them (the quota is charged there, synchronously)."""
    store = Store(server.settings.db_url)
    try:
        return store.get_key(token.split("_")[1]).used
    finally:
        store.close()


def test_server_and_model_metadata(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits-a")
    server = client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]
    assert server["version"] == sdb_core.__version__  # read from the installed distribution's metadata, by its name
    meta = client.get_model_metadata("digits-a")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "distill_logits"]


def test_model_configuration_is_the_metadata_in_tritons_form(client, server):
    # Triton's tools (perf_analyzer among them) read the model's configuration, as the extension advertises
    assert "model_configuration" in client.get_server_metadata()["extensions"]
    config = client.get_model_config("digits-a")
    # max_batch_size: the samples one request may hold, here fewer than SDB_MAX_REQUEST_SAMPLES under the payload
    # limit of 64 KiB (1x8x8 FP32 samples, 256 bytes each, beside the request's JSON header); they are answered
    fit = (LIMIT - oip.REQUEST_HEADER_ROOM) // 256
    assert fit < server.settings.max_request_samples
    assert config == {"name": "digits-a", "platform": "onnxruntime_onnx", "backend": "onnxruntime",
                      "max_batch_size": fit,
                      "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}],
                      "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]},
                                 {"name": "distill_logits", "data_type": "TYPE_FP32", "dims": [10]}]}
    assert client.get_model_config("digits-a", "1") == config
    assert client.get_model_config("digits-label")["output"] == [
        {"name": "classes", "data_type": "TYPE_INT64", "dims": [1]},
        {"name": "distill_logits", "data_type": "TYPE_FP32", "dims": [10]}]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("digits-a", "9")
    assert e.value.status() == "404" and "9" in e.value.message()
    x = np.zeros((fit, 1, 8, 8), np.float32)
    assert client.infer("digits-a", [infer_input(x, "FP32")]).as_numpy("probabilities").shape == (fit, 10)


def _by_version(stats: dict) -> dict:
    return {(m["name"], m["version"]): m for m in stats["model_stats"]}


def test_statistics_count_what_each_model_version_served(client, server, bundles):
    # tritonclient's get_inference_statistics, and perf_analyzer's server-side figures, read the extension
    assert "statistics" in client.get_server_metadata()["extensions"]
    before = _by_version(client.get_inference_statistics())
    assert {("digits-a", "1"), ("digits-label", "1")} <= set(before)
    t0 = time.time() * 1000
    x = bundles.x[:5]
    for _ in range(3):
        client.infer("digits-a", [infer_input(x, "FP32")])
    with pytest.raises(InferenceServerException):  # refused before the model: not a request it served
        client.infer("digits-a", [infer_input(x[:, :, :4], "FP32")])
    after = client.get_inference_statistics("digits-a")
    assert after == client.get_inference_statistics("digits-a", "1")  # one version: the model's are its
    [a], b = after["model_stats"], before["digits-a", "1"]
    assert (a["name"], a["version"]) == ("digits-a", "1")
    assert a["inference_count"] - b["inference_count"] == 15  # samples
    assert a["execution_count"] - b["execution_count"] == 3  # one request at a time: one call each
    grew = {k: (a["inference_stats"][k]["count"] - b["inference_stats"][k]["count"],
                a["inference_stats"][k]["ns"] - b["inference_stats"][k]["ns"]) for k in a["inference_stats"]}
    for k in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert grew[k][0] == 3 and grew[k][1] > 0, (k, grew[k])
    assert grew["fail"] == grew["cache_hit"] == grew["cache_miss"] == (0, 0)
    # a request's time at the model holds its wait and its call
    assert grew["success"][1] >= grew["queue"][1] + grew["compute_infer"][1]
    assert t0 - 1 <= a["last_inference"] <= time.time() * 1000 + 1
    fives = [s for s in a["batch_stats"] if s["batch_size"] == 5]
    assert fives and fives[0]["compute_infer"]["count"] >= 3
    assert sum(s["compute_infer"]["count"] for s in a["batch_stats"]) == a["execution_count"]
    # the other model served nothing meanwhile, and no figure names a caller
    assert _by_version(client.get_inference_statistics())["digits-label", "1"] == before["digits-label", "1"]
    assert "key" not in orjson.dumps(after).decode()
    for call, said in ((lambda: client.get_inference_statistics("no-such-model"), "no model named 'no-such-model'"),
                       (lambda: client.get_inference_statistics("digits-a", "9"), "model 'digits-a' has no version '9'")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "404" and e.value.message() == said


def test_the_repository_index_lists_what_the_caller_may_use(client, server, bundles):
    # the protocol's core lists no models: standard clients ask the repository extension's index
    index = client.get_model_repository_index()
    assert sorted((m["name"], m["version"], m["state"]) for m in index) == [
        ("digits-a", "1", "READY"), ("digits-label", "1", "READY")]
    assert client.get_model_repository_index() == index  # the same twice: nothing is loaded or changed by asking
    r = httpx.post(server.url + "/v2/repository/index", json={"ready": True})
    assert r.status_code == 200 and r.json() == index
    for body, status in ((b"[1]", 400), (b"{", 400), (b'{"ready": "yes"}', 422)):
        r = httpx.post(server.url + "/v2/repository/index", content=body)
        assert r.status_code == status and isinstance(r.json()["error"], str), (body, r.text)
    # a wrong key is refused, as on every route (who sees what with public_predict off: tests/security)
    with pytest.raises(InferenceServerException) as e:
        client.get_model_repository_index(headers={"Authorization": "Bearer sdb_nope"})
    assert e.value.status() == "401"


def test_extensions_not_served_are_said_to_be(client, server):
    # what tritonclient's other calls get: a 404 that says which extensions this server has not
    for call, said in ((lambda: client.load_model("digits-a"), "load and unload"),
                       (lambda: client.unload_model("digits-a"), "deploy through /v1/models"),
                       (client.get_system_shared_memory_status, "shared-memory")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "404" and said in e.value.message(), e.value.message()
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"] == {"code": "not_found",
                                                          "message": "no such route: GET /docs lists this server's routes"}


def test_defaults_are_binary_and_json_answers_the_same(client, server, bundles, ref):
    x = bundles.x
    default = client.infer("digits-a", [infer_input(x, "FP32")])  # binary both ways, every public output
    probs = default.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(x), 10)
    np.testing.assert_allclose(probs, ref.predict(x), rtol=1e-5, atol=1e-6)
    assert default.get_response()["outputs"][0]["parameters"]["binary_data_size"] == probs.nbytes
    as_json = client.infer("digits-a", [infer_input(x, "FP32", binary=False)],
                           outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    assert "data" in as_json.get_response()["outputs"][0]
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), probs, rtol=1e-6, atol=1e-7)
    # the raw body, as any other client sends it: the header length, then the tensor
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    r = httpx.post(server.url + "/v2/models/digits-a/versions/1/infer", content=header + x.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(header)),
                            "Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["Inference-Header-Content-Length"])
    assert orjson.loads(r.content[:n])["outputs"][0]["parameters"] == {"binary_data_size": probs.nbytes}
    np.testing.assert_array_equal(np.frombuffer(r.content[n:], "<f4").reshape(probs.shape), probs)


# What each datatype becomes: the model's FP32 input, converted exactly.
DATATYPES = {"FP32": lambda x: x, "FP16": lambda x: x.astype(np.float16),
             "INT64": lambda x: np.round(x * 2).astype(np.int64), "BOOL": lambda x: x > 0,
             # numpy's default dtype, as a user's arrays come: rounded to FP32 (the model's precision)
             "FP64": lambda x: x.astype(np.float64) + 1e-9}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_every_numeric_datatype(client, bundles, ref, datatype, binary):
    sent = DATATYPES[datatype](bundles.x)
    out = client.infer("digits-a", [infer_input(sent, datatype, binary)],
                       outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)])
    np.testing.assert_allclose(out.as_numpy("probabilities"), ref.predict(sent.astype(np.float32)),
                               rtol=1e-5, atol=1e-6)


def test_bytes_are_images(client, bundles, ref):
    norm = ref.meta["normalize"]
    images = np.array([png(s, norm) for s in bundles.x[:4]], dtype=object)
    out = client.infer("digits-a", [infer_input(images, "BYTES")])
    decoded = np.stack([image_to_input(b, [1, 8, 8], norm) for b in images])
    np.testing.assert_allclose(out.as_numpy("probabilities"), ref.predict(decoded), rtol=1e-5, atol=1e-6)
    # JSON carries BYTES as text: not an image, and the server says so
    with pytest.raises(InferenceServerException, match="not a readable PNG or JPEG") as e:
        client.infer("digits-a", [infer_input(np.array([b"hello"], dtype=object), "BYTES", binary=False)])
    assert e.value.status() == "415"


def _ranked(rows: np.ndarray) -> list[list[tuple[float, int, str]]]:
    """A classification output's "value:index:label" rows, read back (bytes from binary, str from JSON)."""
    text = (e.decode() if isinstance(e, bytes) else e for row in rows for e in row)
    flat = [(float(v), int(i), label) for v, i, label in (t.split(":") for t in text)]
    return [flat[r * rows.shape[1]:(r + 1) * rows.shape[1]] for r in range(rows.shape[0])]


def test_classification_ranks_the_scores_the_caller_may_see(client, server, bundles, ref):
    # tritonclient's class_count (the classification extension), as image clients use it: binary and JSON alike
    x = bundles.x[:6]
    probs, labels = ref.predict(x), ref.meta["labels"]
    for binary in (True, False):
        out = client.infer("digits-a", [infer_input(x, "FP32")], outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)])
        got = out.as_numpy("probabilities")
        assert got.shape == (6, 3) and out.get_output("probabilities")["datatype"] == "BYTES"
        for row, p in zip(_ranked(got), probs, strict=True):
            order = np.argsort(-p, kind="stable")[:3].tolist()
            assert [i for _, i, _ in row] == order and [lab for _, _, lab in row] == [labels[i] for i in order]
            np.testing.assert_allclose([v for v, _, _ in row], p[order], atol=1e-6)
    # more than the classes: all of them; 0: no classification, as Triton reads it
    every = client.infer("digits-a", [infer_input(x, "FP32")],
                         outputs=[triton.InferRequestedOutput("probabilities", class_count=50)])
    assert every.as_numpy("probabilities").shape == (6, 10)
    # the keyed output ranks the keyed logits, for its key alone
    token = key(server.settings, ["distill"], models=["digits-a"], quota=1000)
    keyed = client.infer("digits-a", [infer_input(x, "FP32")], headers={"Authorization": f"Bearer {token}"},
                         outputs=[triton.InferRequestedOutput("distill_logits", class_count=2)])
    logits = ref.distill_logits(x)
    for row, z in zip(_ranked(keyed.as_numpy("distill_logits")), logits, strict=True):
        assert [i for _, i, _ in row] == np.argsort(-z, kind="stable")[:2].tolist()
        np.testing.assert_allclose([v for v, _, _ in row], np.sort(z)[::-1][:2], atol=1e-4)
    assert used(server, token) == len(x)
    with pytest.raises(InferenceServerException, match="needs an API key") as e:
        client.infer("digits-a", [infer_input(x, "FP32")],
                     outputs=[triton.InferRequestedOutput("distill_logits", class_count=2)])
    assert e.value.status() == "401"
    # a label-policy model serves no score to rank: class indices are not scores
    with pytest.raises(InferenceServerException, match="holds class indices, not scores") as e:
        client.infer("digits-label", [infer_input(x, "FP32")],
                     outputs=[triton.InferRequestedOutput("classes", class_count=1)])
    assert e.value.status() == "422"
    r = httpx.post(server.url + "/v2/models/digits-a/infer", json={
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": -1}}]})
    assert r.status_code == 422 and "non-negative integer" in r.json()["error"]


def test_the_keyed_output_needs_its_key(client, server, bundles, ref):
    token = key(server.settings, ["distill"], models=["digits-a"], quota=1000)  # charged in the store at once
    asked = [triton.InferRequestedOutput("distill_logits"), triton.InferRequestedOutput("probabilities")]
    out = client.infer("digits-a", [infer_input(bundles.x, "FP32")], outputs=asked,
                       headers={"Authorization": f"Bearer {token}"})
    np.testing.assert_allclose(out.as_numpy("distill_logits"), ref.distill_logits(bundles.x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.as_numpy("probabilities"), ref.predict(bundles.x), rtol=1e-5, atol=1e-6)
    assert used(server, token) == len(bundles.x)
    with pytest.raises(InferenceServerException, match="needs an API key with the distill scope") as e:
        client.infer("digits-a", [infer_input(bundles.x, "FP32")], outputs=asked)
    assert e.value.status() == "401"
    predict_only = {"Authorization": f"Bearer {key(server.settings, ['predict'])}"}
    with pytest.raises(InferenceServerException, match="lacks the 'distill' scope") as e:
        client.infer("digits-a", [infer_input(bundles.x, "FP32")], outputs=asked, headers=predict_only)
    assert e.value.status() == "403"
    small = key(server.settings, ["distill"], quota=1)  # the quota, as on every keyed path
    with pytest.raises(InferenceServerException, match="quota") as e:
        client.infer("digits-a", [infer_input(bundles.x, "FP32")], outputs=asked,
                     headers={"Authorization": f"Bearer {small}"})
    assert e.value.status() == "429" and used(server, small) == 0
    # the label policy lets no probability out, in any encoding
    with pytest.raises(InferenceServerException, match=r"unknown output\(s\) \['probabilities'\]"):
        client.infer("digits-label", [infer_input(bundles.x, "FP32")],
                     outputs=[triton.InferRequestedOutput("probabilities")])
    label = client.infer("digits-label", [infer_input(bundles.x, "FP32")])
    assert label.as_numpy("probabilities") is None
    assert label.as_numpy("classes").ravel().tolist() == ref.predict(bundles.x).argmax(1).tolist()


def test_errors_are_the_servers_messages(client, bundles):
    with pytest.raises(InferenceServerException, match="no model named 'nope'") as e:
        client.infer("nope", [infer_input(bundles.x, "FP32")])
    assert e.value.status() == "404"
    for lossy in (1 << 40, np.iinfo(np.int64).min):
        with pytest.raises(InferenceServerException, match="do not convert exactly") as e:
            client.infer("digits-a", [infer_input(np.full((1, 1, 8, 8), lossy, np.int64), "INT64")])
        assert e.value.status() == "422"
    with pytest.raises(InferenceServerException, match="beyond float32 range") as e:  # FP64 that FP32 cannot hold
        client.infer("digits-a", [infer_input(np.full((1, 1, 8, 8), 1e300), "FP64")])
    assert e.value.status() == "422"
    with pytest.raises(InferenceServerException, match="datatype 'INT32' is not supported"):
        client.infer("digits-a", [infer_input(np.zeros((1, 1, 8, 8), np.int32), "INT32")])
    big = np.zeros((300, 1, 8, 8), np.float32)  # 76,800 bytes of tensor: the whole body is over the limit
    with pytest.raises(InferenceServerException, match="limit") as e:
        client.infer("digits-a", [infer_input(big, "FP32")])
    assert e.value.status() == "413"


def test_raw_tensors_are_the_clients_bytes():
    """The codec and tritonclient's own serializers agree, both ways (gRPC's raw contents are the same bytes)."""
    words = np.array([b"", b"a", bytes(range(256))], dtype=object)
    raw = serialize_byte_tensor(words).item()
    assert oip_binary.to_raw("BYTES", words) == raw
    assert oip_binary.from_raw("BYTES", [3], memoryview(raw)).tolist() == words.tolist()
    assert deserialize_bytes_tensor(oip_binary.to_raw("BYTES", words)).tolist() == words.tolist()
    for datatype, x in (("FP16", np.arange(6, dtype=np.float16)), ("INT64", np.arange(-3, 3)),
                        ("BOOL", np.array([True, False, True])), ("FP32", np.linspace(0, 1, 6, dtype=np.float32))):
        assert oip_binary.to_raw(datatype, x) == x.astype(triton_to_np_dtype(datatype)).tobytes()
        np.testing.assert_array_equal(oip_binary.from_raw(datatype, list(x.shape), memoryview(x.tobytes())), x)


def _body(header: dict, *chunks: bytes) -> tuple[bytes, dict]:
    head = orjson.dumps(header)
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def _header(size: int, datatype: str = "FP32", shape=(2, 1, 8, 8)) -> dict:
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": datatype,
                        "parameters": {"binary_data_size": size}}],
            "outputs": [{"name": "distill_logits"}, {"name": "probabilities"}]}


X = np.zeros((2, 1, 8, 8), np.float32).tobytes()  # 512 bytes
BAD = {
    "extra bytes after the tensors": _body(_header(512), X, b"\0" * 8),
    "header length past the body": (_body(_header(512), X)[0], {"Inference-Header-Content-Length": "100000"}),
    "header length not a number": (_body(_header(512), X)[0], {"Inference-Header-Content-Length": "12a"}),
    "header length zero": (_body(_header(512), X)[0], {"Inference-Header-Content-Length": "0"}),
    "datatype and size disagree": _body(_header(512, "FP16"), X),
    "size and shape disagree": _body(_header(256), X[:256]),
    "truncated tensor": _body(_header(512), X[:300]),
    "negative size": _body(_header(-4), X),
    "binary size without the header": (orjson.dumps(_header(512)), {}),
    "header not JSON": (b"{nope" + X, {"Inference-Header-Content-Length": "5"}),
    "BYTES element past its tensor": _body(_header(8, "BYTES", (1,)), struct.pack("<I", 99) + b"abcd"),
    "BYTES count and shape disagree": _body(_header(10, "BYTES", (2,)), struct.pack("<I", 6) + b"abcdef"),
    "BYTES length cut off": _body(_header(6, "BYTES", (2,)), struct.pack("<I", 0) + b"ab"),
    "unknown datatype": _body(_header(512, "FP8"), X),
}


def test_bad_binary_bodies_are_400s_that_charge_nothing(server):
    token = key(server.settings, ["distill"], quota=100)
    auth = {"Authorization": f"Bearer {token}"}
    url = server.url + "/v2/models/digits-a/infer"
    with httpx.Client(timeout=30) as http:
        for what, (content, headers) in BAD.items():
            r = http.post(url, content=content, headers={**headers, **auth})
            assert r.status_code == 400, (what, r.status_code, r.text)
            error = r.json()
            assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"], (what, r.text)
        assert used(server, token) == 0
        content, headers = _body(_header(512), X)  # the same request, well formed: charged its 2 samples
        r = http.post(url, content=content, headers={**headers, **auth})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"  # no output asked in binary
        assert [o["shape"] for o in r.json()["outputs"]] == [[2, 10], [2, 10]]
    assert used(server, token) == 2


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_answer_as_plain_ones(client, bundles, ref, algorithm, binary):
    # tritonclient compresses the whole body; its header length is the inflated header's
    x = bundles.x
    out = client.infer("digits-a", [infer_input(x, "FP32", binary)],
                       outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)],
                       request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
    np.testing.assert_allclose(out.as_numpy("probabilities"), ref.predict(x), rtol=1e-5, atol=1e-6)


def _gzip_members(*parts: bytes) -> bytes:
    return b"".join(gzip.compress(p) for p in parts)


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


def test_compressed_bodies_are_inflated_whole_and_within_the_limit(server):
    token = key(server.settings, ["distill"], quota=100)
    auth = {"Authorization": f"Bearer {token}"}
    url = server.url + "/v2/models/digits-a/infer"
    body, binary = _body(_header(512), X)
    # larger than the payload limit once inflated (64 KiB here), a few hundred bytes as sent
    bomb = orjson.dumps({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                     "data": [0.0] * 128}], "id": "x" * (2 * LIMIT)})
    refused = {
        "inflates past the limit": (gzip.compress(bomb), "gzip", 413),
        "truncated": (gzip.compress(body)[:-12], "gzip", 400),
        "not gzip": (body, "gzip", 400),
        "bytes after the zlib stream": (zlib.compress(body) + b"tail", "deflate", 400),
        "seventeen gzip members": (_gzip_members(*[body[i * 8:(i + 1) * 8] for i in range(16)], body[128:]),
                                   "gzip", 400),
        "another coding": (body, "br", 415),
        "two codings": (gzip.compress(gzip.compress(body)), "gzip, gzip", 415),
    }
    with httpx.Client(timeout=30) as http:
        for what, (content, coding, status) in refused.items():
            r = http.post(url, content=content, headers={**binary, **auth, "Content-Encoding": coding})
            assert r.status_code == status, (what, r.status_code, r.text)
            assert set(r.json()) == {"error"} and r.json()["error"], (what, r.text)
        assert used(server, token) == 0
        # what clients send: gzip (in two members too), deflate as zlib or raw, x-gzip; each charged its 2 samples
        for coding, content in (("gzip", gzip.compress(body)), ("gzip", _gzip_members(body[:100], body[100:])),
                                ("deflate", zlib.compress(body)), ("deflate", _raw_deflate(body)),
                                ("x-gzip", gzip.compress(body)), ("identity", body)):
            r = http.post(url, content=content, headers={**binary, **auth, "Content-Encoding": coding})
            assert r.status_code == 200, (coding, r.text)
            assert [o["shape"] for o in r.json()["outputs"]] == [[2, 10], [2, 10]]
    assert used(server, token) == 12
