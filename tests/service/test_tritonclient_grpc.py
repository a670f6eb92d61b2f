"""The unmodified ``tritonclient.grpc`` against ``sdb serve`` with ``SDB_GRPC_PORT``: the protocol's gRPC
service beside HTTP in one process, on one registry, keyring, quota and rate limit.

One server for the module (its start is most of the time): every test makes its own keys, so one
test's rate and quota never reach another's.
"""
from __future__ import annotations

import functools
import io
import json
import struct
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.auth import create_key
from service.settings import Settings
from service.store import Store

from .conftest import ROOT, Server, free_port, sdb_bytes

KEY_BURST = 25  # the server's per-key burst; a test's key makes fewer calls than this, but the rate test
N = 3


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory, bundles):
    data = tmp_path_factory.mktemp("grpc") / "data"
    port = free_port()
    server = Server(data, bundles, env={"SDB_GRPC_PORT": str(port), "SDB_RATE_LIMIT_KEY_PER_S": "1",
                                        "SDB_RATE_LIMIT_KEY_BURST": str(KEY_BURST)})
    server.grpc_port = port
    settings = Settings(data_dir=data, master_key_file=bundles.master_key_file)
    store = Store(settings.db_url)

    def key(*scopes: str, **kw) -> str:
        return create_key(store, settings.pepper, scopes=scopes, **kw)[0]

    admin = {"Authorization": f"Bearer {key('admin')}"}
    try:
        for bundle in (bundles.a, bundles.a2, bundles.b):
            r = httpx.post(server.url + "/v1/models", files={"file": (f"{bundle.name}.sdb", sdb_bytes(bundle))},
                           headers=admin, timeout=60)
            assert r.status_code == 201, r.text
        client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
        yield server, client, key, store
        client.close()
    finally:
        err = server.stop()
        store.close()
    assert "Traceback" not in err, err[-3000:]


def fp32_input(x: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    t = triton.InferInput("input", list(x.shape), datatype)
    t.set_data_from_numpy(x)
    return t


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}  # gRPC metadata keys are lower case


def refused(call, code: str) -> str:
    """The message of the error ``call()`` raises, after checking its gRPC status code."""
    with pytest.raises(InferenceServerException) as e:
        call()
    assert e.value.status() == f"StatusCode.{code}", (e.value.status(), e.value.message())
    assert "Traceback" not in e.value.message()
    return e.value.message()


def v2_json(server, x: np.ndarray, outputs: list[str], headers: dict | None = None, model: str = "digits-a") -> dict:
    r = httpx.post(f"{server.url}/v2/models/{model}/infer", headers=headers, timeout=30, json={
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        "outputs": [{"name": n} for n in outputs]})
    assert r.status_code == 200, r.text
    return {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}


def test_health_and_metadata(grpc_server):
    _, client, _, _ = grpc_server
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    # the binary tensor extension is HTTP's: gRPC carries raw tensors natively
    assert meta["name"] == "sdb" and "version" in meta and meta["extensions"] == ["classification", "model_configuration",
                                                                                "statistics"]
    assert client.is_model_ready("digits-a") and client.is_model_ready("digits-a", "2")
    assert not client.is_model_ready("no-such-model")
    m = client.get_model_metadata("digits-a", as_json=True)
    assert m["name"] == "digits-a" and m["versions"] == ["1", "2"] and m["platform"] == "onnxruntime_onnx"
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]  # int64 in JSON
    assert [o["name"] for o in m["outputs"]] == ["probabilities", "distill_logits"]
    assert client.get_model_metadata("digits-a", "1").versions == ["1", "2"]


def test_the_repository_index_is_https_in_tritons_messages(grpc_server):
    server, client, _, _ = grpc_server
    index = [(m.name, m.version, m.state, m.reason) for m in client.get_model_repository_index().models]
    assert index == [tuple(m.values()) for m in httpx.post(server.url + "/v2/repository/index").json()]
    assert {("digits-a", "1", "READY", ""), ("digits-a", "2", "READY", "")} <= set(index)


def test_model_configuration_is_https_in_tritons_messages(grpc_server):
    # perf_analyzer -i grpc and tritonclient's get_model_config call the ModelConfig RPC before anything else
    server, client, _, _ = grpc_server
    for version in ("", "1"):
        config = client.get_model_config("digits-a", version).config
        http = httpx.get(f"{server.url}/v2/models/digits-a/config").json()
        assert (config.name, config.platform, config.backend, config.max_batch_size) == (
            http["name"], http["platform"], http["backend"], http["max_batch_size"]) == (
            "digits-a", "onnxruntime_onnx", "onnxruntime", Settings.model_fields["max_request_samples"].default)
        got = [[(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in ts]
               for ts in (config.input, config.output)]
        assert got == [[(t["name"], t["data_type"], t["dims"]) for t in http[k]] for k in ("input", "output")]
        assert got == [[("input", "TYPE_FP32", [1, 8, 8])],
                       [("probabilities", "TYPE_FP32", [10]), ("distill_logits", "TYPE_FP32", [10])]]
    assert client.get_model_config("digits-a", as_json=True)["config"]["input"][0]["data_type"] == "TYPE_FP32"
    assert refused(lambda: client.get_model_config("digits-a", "9"), "NOT_FOUND") == "model 'digits-a' has no version '9'"
    refused(lambda: client.get_model_config("no-such-model"), "NOT_FOUND")
    refused(lambda: client.get_model_config("digits-a", headers=bearer("sdb_nope_nope")), "UNAUTHENTICATED")


def test_statistics_are_https_in_tritons_messages_and_count_both_transports(grpc_server, bundles):
    server, client, _, _ = grpc_server
    before = client.get_inference_statistics("digits-a", "2", as_json=True)["model_stats"][0]
    x = bundles.x[:3]
    client.infer("digits-a", [fp32_input(x)])  # the newest version, over gRPC
    v2_json(server, x, ["probabilities"])  # and over HTTP: one model, one count
    after = client.get_inference_statistics("digits-a", "2", as_json=True)["model_stats"][0]
    # protobuf's JSON writes uint64 as strings, and leaves zeros out
    count = lambda m, *path: int(functools.reduce(lambda d, k: d.get(k, {}), path, m) or 0)
    assert count(after, "inference_count") - count(before, "inference_count") == 6
    assert count(after, "execution_count") - count(before, "execution_count") == 2
    assert count(after, "inference_stats", "success", "count") - count(before, "inference_stats", "success", "count") == 2
    assert (after["name"], after["version"]) == ("digits-a", "2")
    http = httpx.get(f"{server.url}/v2/models/digits-a/versions/2/stats").json()["model_stats"][0]
    message = client.get_inference_statistics("digits-a", "2").model_stats[0]
    assert message.inference_count == http["inference_count"] and message.execution_count == http["execution_count"]
    assert message.inference_stats.compute_infer.ns == http["inference_stats"]["compute_infer"]["ns"]
    assert [b.batch_size for b in message.batch_stats] == [b["batch_size"] for b in http["batch_stats"]]
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {(m["name"], m["version"]) for m in every} >= {("digits-a", "1"), ("digits-a", "2"), ("digits-b", "1")}
    assert len(client.get_inference_statistics("digits-a").model_stats) == 2  # every loaded version
    refused(lambda: client.get_inference_statistics("no-such-model"), "NOT_FOUND")
    refused(lambda: client.get_inference_statistics("digits-a", headers=bearer("sdb_nope_nope")), "UNAUTHENTICATED")


def test_classification_is_https_over_grpc(grpc_server, bundles):
    # class_count travels as an int64 parameter; the answer, BYTES "value:index:label", is HTTP's to the byte
    server, client, _, _ = grpc_server
    x = bundles.x[:N]
    out = client.infer("digits-a", [fp32_input(x)], outputs=[triton.InferRequestedOutput("probabilities", class_count=4)])
    got = out.as_numpy("probabilities")
    r = httpx.post(f"{server.url}/v2/models/digits-a/infer", timeout=30, json={
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 4}}]})
    http = r.json()["outputs"][0]
    assert http["datatype"] == "BYTES" and http["shape"] == [N, 4] == list(got.shape)
    assert [e.decode() for e in got.ravel()] == http["data"]
    probs = v2_json(server, x, ["probabilities"])["probabilities"]
    assert [int(e.split(":")[1]) for e in http["data"][::4]] == probs.argmax(1).tolist()


def test_infer_fp32_defaults_equal_http_v2(grpc_server, bundles):
    server, client, _, _ = grpc_server
    x = bundles.x[:N]
    result = client.infer("digits-a", [fp32_input(x)], request_id="r1")
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (N, 10)
    np.testing.assert_allclose(probs, v2_json(server, x, ["probabilities"])["probabilities"], rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.model_name == "digits-a" and response.model_version == "2" and response.id == "r1"
    assert result.as_numpy("distill_logits") is None  # the keyed output only when asked, with a key
    # Each version is its own network: the version asked is the version served.
    v1 = client.infer("digits-a", [fp32_input(x)], model_version="1")
    assert v1.get_response().model_version == "1"
    assert np.abs(v1.as_numpy("probabilities") - probs).max() > 1e-4
    one = client.infer("digits-a", [fp32_input(x[0])])  # one sample, [C, H, W]
    np.testing.assert_allclose(one.as_numpy("probabilities")[0], probs[0], rtol=1e-5, atol=1e-6)


def _png(sample: np.ndarray) -> bytes:
    img = Image.fromarray((np.clip(sample[0], 0, 1) * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_every_input_datatype_the_server_takes(grpc_server, bundles):
    """FP32 and each other datatype oip takes, as tritonclient sends them (raw), answer what the same
    values sent as FP32 answer."""
    from service.tensors import image_to_input

    _, client, _, _ = grpc_server
    x = bundles.x[:N]

    def probs(t: triton.InferInput) -> np.ndarray:
        return client.infer("digits-b", [t]).as_numpy("probabilities")

    def same(got: np.ndarray, values: np.ndarray) -> None:
        np.testing.assert_allclose(got, probs(fp32_input(values.astype(np.float32))), rtol=1e-5, atol=1e-6)

    same(probs(fp32_input(x.astype(np.float16), "FP16")), x.astype(np.float16))
    same(probs(fp32_input(x.astype(np.float64), "FP64")), x)  # numpy's default dtype: rounded to FP32
    ints = np.round(x * 3).astype(np.int64)
    same(probs(fp32_input(ints, "INT64")), ints)
    flags = x > 0.5
    same(probs(fp32_input(flags, "BOOL")), flags)
    images = np.array([_png(s) for s in x], dtype=np.object_)
    meta = json.loads((bundles.b / "meta.json").read_text())
    decoded = np.stack([image_to_input(png, (1, 8, 8), meta["normalize"]) for png in images])
    same(probs(fp32_input(images, "BYTES")), decoded)
    # A datatype it does not take is refused with the HTTP route's words.
    message = refused(lambda: probs(fp32_input(ints.astype(np.int32), "INT32")), "INVALID_ARGUMENT")
    assert "datatype 'INT32' is not supported" in message


def test_typed_contents_equal_raw(grpc_server, bundles):
    """The protocol's typed ``contents`` (no client of ours sends them; tritonclient's own stub does)."""
    server, client, _, _ = grpc_server
    x = bundles.x[:N]
    raw = client.infer("digits-a", [fp32_input(x)]).as_numpy("probabilities")
    with grpc.insecure_channel(f"127.0.0.1:{server.env['SDB_GRPC_PORT']}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="digits-a")
        t = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        t.contents.fp32_contents.extend(x.ravel().tolist())
        response = stub.ModelInfer(request)
        got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(N, 10)
        np.testing.assert_allclose(got, raw, rtol=1e-5, atol=1e-6)
        ints = service_pb2.ModelInferRequest(model_name="digits-a")
        t = ints.inputs.add(name="input", datatype="INT64", shape=list(x.shape))
        t.contents.int64_contents.extend(np.round(x * 3).astype(np.int64).ravel().tolist())
        assert stub.ModelInfer(ints).outputs[0].name == "probabilities"
        short = service_pb2.ModelInferRequest(model_name="digits-a")
        short.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8]).contents.fp32_contents.extend([0.5])
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(short)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "inputs[0].contents has 1 FP32 values; shape [1, 1, 8, 8] needs 64"


def test_keyed_output_needs_a_distill_key_equals_http_and_charges_the_same_quota(grpc_server, bundles):
    server, client, key, store = grpc_server
    x = bundles.x[:N]
    keyed = [triton.InferRequestedOutput("distill_logits")]
    message = refused(lambda: client.infer("digits-a", [fp32_input(x)], outputs=keyed), "UNAUTHENTICATED")
    assert message == "output 'distill_logits' needs an API key with the distill scope"
    predict_only = key("predict")
    message = refused(lambda: client.infer("digits-a", [fp32_input(x)], outputs=keyed, headers=bearer(predict_only)),
                      "PERMISSION_DENIED")
    assert message == "this API key lacks the 'distill' scope"
    refused(lambda: client.infer("digits-a", [fp32_input(x)], headers=bearer("sdb_0_0")), "UNAUTHENTICATED")

    token = key("distill", models=["digits-a"], quota=3 * N + 1)
    key_id = token.split("_")[1]
    both = [triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("distill_logits")]
    result = client.infer("digits-a", [fp32_input(x)], outputs=both, headers=bearer(token))
    assert store.get_key(key_id).used == N  # charged when served, no write-behind
    http = v2_json(server, x, ["probabilities", "distill_logits"], {"Authorization": f"Bearer {token}"})
    assert store.get_key(key_id).used == 2 * N  # the same charge for the same samples on either transport
    for name in ("probabilities", "distill_logits"):
        np.testing.assert_allclose(result.as_numpy(name), http[name], rtol=1e-5, atol=1e-5)
    # The keyed path is another function of the input than the public one.
    assert np.abs(result.as_numpy("distill_logits") - np.log(result.as_numpy("probabilities"))).max() > 0.1

    client.infer("digits-a", [fp32_input(x)], outputs=keyed, headers=bearer(token))
    message = refused(lambda: client.infer("digits-a", [fp32_input(x)], outputs=keyed, headers=bearer(token)),
                      "RESOURCE_EXHAUSTED")
    assert message == f"sample quota spent: {3 * N} of {3 * N + 1} used, {N} asked"
    assert store.get_key(key_id).used == 3 * N
    # Its allowlist holds on gRPC too.
    message = refused(lambda: client.infer("digits-b", [fp32_input(x)], outputs=keyed, headers=bearer(token)),
                      "PERMISSION_DENIED")
    assert message == "this API key is not allowed to use model 'digits-b'"


def test_rate_limit_is_the_keys_across_transports(grpc_server, bundles):
    server, client, key, _ = grpc_server
    token = key("predict")
    headers = bearer(token)
    for _ in range(KEY_BURST // 2):  # half the burst over HTTP, the rest over gRPC: one bucket
        r = httpx.get(f"{server.url}/v2/models/digits-a", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as e:
        for _ in range(2 * KEY_BURST):
            client.get_model_metadata("digits-a", headers=headers)
    assert time.monotonic() - start < KEY_BURST / 2  # refused in the burst, not after the rate refilled it
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert e.value.message().startswith("this key is over 1 requests/s; retry in")
    with grpc.insecure_channel(f"127.0.0.1:{server.env['SDB_GRPC_PORT']}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raw:
            stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="digits-a"), metadata=tuple(headers.items()))
    assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(raw.value.trailing_metadata())["retry-after"] == "1"  # HTTP's Retry-After
    assert client.is_server_live(headers=headers)  # health is never limited


def test_errors_are_status_codes_with_the_http_messages(grpc_server, bundles):
    server, client, _, _ = grpc_server
    x = bundles.x[:N]
    message = refused(lambda: client.infer("no-such-model", [fp32_input(x)]), "NOT_FOUND")
    assert message == "no model named 'no-such-model'"
    refused(lambda: client.get_model_metadata("no-such-model"), "NOT_FOUND")
    message = refused(lambda: client.get_model_metadata("digits-a", "9"), "NOT_FOUND")
    assert message == "model 'digits-a' has no version '9'"
    wrong = triton.InferInput("pixels", list(x.shape), "FP32")
    wrong.set_data_from_numpy(x)
    message = refused(lambda: client.infer("digits-a", [wrong]), "INVALID_ARGUMENT")
    assert message == "unknown input 'pixels'; this model's input is 'input'"
    message = refused(lambda: client.infer("digits-a", [fp32_input(x[:, :, :4])]), "INVALID_ARGUMENT")
    assert "this model takes [N, 1, 8, 8]" in message
    message = refused(lambda: client.infer("digits-a", [fp32_input(x)],
                                           outputs=[triton.InferRequestedOutput("logits")]), "INVALID_ARGUMENT")
    assert message.startswith("unknown output(s) ['logits']")
    message = refused(lambda: client.infer("digits-a", [fp32_input(x)],
                                           outputs=[triton.InferRequestedOutput("classes", class_count=3)]),
                      "INVALID_ARGUMENT")
    assert message.startswith("unknown output(s) ['classes']")  # this model's policy serves probabilities
    # SDB_MAX_PAYLOAD_BYTES (8 MiB) is the largest message the server reads.
    big = np.zeros((9 << 20) // 4, np.float32)
    refused(lambda: client.infer("digits-a", [fp32_input(big)]), "RESOURCE_EXHAUSTED")
    assert client.is_server_ready()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'route="/inference.GRPCInferenceService/ModelInfer"' in metrics and 'method="GRPC"' in metrics
    # by code, as HTTP's errors are (a gRPC one was counted under code="")
    assert 'sdb_errors_by_code_total{code="model_not_found",route="/inference.GRPCInferenceService/ModelInfer"}' \
        in metrics, [ln for ln in metrics.splitlines() if ln.startswith("sdb_errors_by_code")]


def test_the_grpc_extra_is_imported_only_when_the_port_is_on(tmp_path):
    code = (
        "import sys\n"
        "from service.app import build_app\n"
        "from service.settings import Settings\n"
        f"build_app(Settings(data_dir={str(tmp_path)!r}))\n"
        "assert 'grpc' not in sys.modules, 'grpc was imported'\n"
        "sys.modules['grpc'] = None\n"  # as if the extra were not installed
        "try:\n"
        "    import service.grpc.server\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SDB_GRPC_PORT needs the grpc extra" in out.stdout and "pip install -e '.[grpc]'" in out.stdout


@pytest.mark.anyio
async def test_an_unexpected_error_is_internal_and_says_nothing_of_it(caplog):
    """What the server did not expect is logged there and answered INTERNAL with the generic message."""
    from service.grpc import grpc_predict_v2_pb2 as pb
    from service.grpc.server import InferenceServicer
    from service.metrics import Metrics

    class Host:
        def __contains__(self, name):
            return False

        async def aget(self, name, version=None):
            raise RuntimeError("secret internals")

    class Context:
        def peer(self):
            return "ipv4:127.0.0.1:5000"

        def invocation_metadata(self):
            return ()

        async def abort(self, code, details, trailing_metadata=()):
            self.aborted = (code, details)
            raise grpc.aio.AbortError()

    state = type("State", (), {"settings": Settings(), "host": Host(), "keyring": None, "metrics": Metrics(),
                               "address_limiter": type("L", (), {"take": lambda self, a: 0.0})()})()
    context = Context()
    with pytest.raises(grpc.aio.AbortError):
        await InferenceServicer(state).ModelInfer(pb.ModelInferRequest(model_name="m"), context)
    assert context.aborted == (grpc.StatusCode.INTERNAL, "internal server error")
    assert "secret internals" in caplog.text  # in the server's log, not in the answer


def test_a_bytes_count_over_max_request_samples_is_refused_from_the_shape(grpc_server, bundles):
    """BYTES holds one image per sample: a shape over ``max_request_samples`` is refused before any element is
    read (once, millions of empty elements were all decoded first: seconds on the event loop, hundreds of MB),
    and elements past the shape's count are refused at the first one too many. Raw protobuf requests: the
    standard client checks sizes before it sends."""
    server, client, _, _ = grpc_server
    n = Settings().max_request_samples + 1
    tensor = service_pb2.ModelInferRequest.InferInputTensor
    empty = struct.pack("<I", 0)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        for request, message in [
            (service_pb2.ModelInferRequest(model_name="digits-a", inputs=[tensor(name="input", datatype="BYTES",
                                           shape=[n])], raw_input_contents=[empty]), f"{n} samples in one request"),
            (service_pb2.ModelInferRequest(model_name="digits-a", inputs=[tensor(
                name="input", datatype="BYTES", shape=[n], contents=service_pb2.InferTensorContents(
                    bytes_contents=[b""]))]), f"{n} samples in one request"),
            (service_pb2.ModelInferRequest(model_name="digits-a", inputs=[tensor(name="input", datatype="BYTES",
                                           shape=[1])], raw_input_contents=[empty * 2 + b"\x01\x00"]),
             "more BYTES elements than the 1 its shape needs"),
            # no element, but dimensions numpy cannot shape even zero elements as (was INTERNAL, a traceback)
            *[(service_pb2.ModelInferRequest(model_name="digits-a", inputs=[tensor(name="input", datatype=dt,
                                             shape=[0, 2**62])], raw_input_contents=[b""]), "spans more than")
              for dt in ("FP32", "BOOL", "BYTES")],
            (service_pb2.ModelInferRequest(model_name="digits-a", inputs=[tensor(
                name="input", datatype="FP32", shape=[0, 2**62], contents=service_pb2.InferTensorContents())]),
             "spans more than"),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details(), e.value
    assert client.is_server_ready()


def test_bytes_that_are_not_the_rpcs_message_are_invalid_argument(grpc_server):
    """A client with another .proto, or a proxy that mangled the body: the server says the request is not the
    RPC's message (INVALID_ARGUMENT), as HTTP's 400 malformed_body, not grpcio's UNKNOWN for a failed decode."""
    server, client, _, _ = grpc_server
    garbage = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"  # field 1, a length past the message
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        for rpc, message in (("ModelInfer", "ModelInferRequest"), ("ServerLive", "ServerLiveRequest")):
            call = ch.unary_unary(f"/inference.GRPCInferenceService/{rpc}")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as e:
                call(garbage, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
            assert e.value.details() == f"the request is not a {message} protobuf message"
        assert service_pb2.ServerLiveResponse.FromString(
            ch.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=30)).live
    assert client.is_server_ready()


def test_compressed_messages_are_inflated_within_the_payload_limit(grpc_server, bundles):
    """tritonclient's ``compression_algorithm``: gRPC's own message compression, which grpcio inflates; a message
    over SDB_MAX_PAYLOAD_BYTES once inflated (8 MiB here) is refused as one sent plain would be."""
    server, client, _, _ = grpc_server
    x = bundles.x[:N]
    plain = client.infer("digits-a", [fp32_input(x)]).as_numpy("probabilities")
    for algorithm in ("gzip", "deflate"):
        got = client.infer("digits-a", [fp32_input(x)], compression_algorithm=algorithm).as_numpy("probabilities")
        np.testing.assert_array_equal(got, plain)
    request = service_pb2.ModelInferRequest(model_name="digits-a")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(bytes(9 << 20))  # ~9 KB gzipped
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=30, compression=grpc.Compression.Gzip)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    assert client.is_server_ready()
    np.testing.assert_array_equal(client.infer("digits-a", [fp32_input(x)]).as_numpy("probabilities"), plain)


def _stream(client, requests: list[dict], headers: dict | None = None) -> list[tuple]:
    """Each request sent on one stream (tritonclient's start_stream / async_stream_infer): (result, error) each."""
    answers, done = [], threading.Event()

    def callback(result, error):
        answers.append((result, error))
        if len(answers) == len(requests):
            done.set()

    client.start_stream(callback, headers=headers)
    try:
        for r in requests:
            client.async_stream_infer(**r)
        assert done.wait(60), f"{len(answers)} of {len(requests)} answers"
    finally:
        client.stop_stream()
    return answers


def test_a_stream_answers_each_request_as_infer_does_in_order_and_goes_on_past_a_refusal(grpc_server, bundles):
    server, client, _, _ = grpc_server
    x = bundles.x[:8]
    assert len(x) == 8
    unary = client.infer("digits-a", [fp32_input(x)]).as_numpy("probabilities")
    requests = [{"model_name": "digits-a", "inputs": [fp32_input(x[i % 8:i % 8 + 1])], "request_id": f"r{i}"}
                for i in range(12)]
    requests[4] = {"model_name": "no-such-model", "inputs": [fp32_input(x[4:5])], "request_id": "r4"}
    requests[7] = {**requests[7], "outputs": [triton.InferRequestedOutput(name="distill_logits")]}  # no key
    answers = _stream(client, requests)
    assert [r.get_response().id if r else None for r, _ in answers] == [
        f"r{i}" if i not in (4, 7) else None for i in range(12)]
    assert str(answers[4][1]) == "no model named 'no-such-model'"
    assert "distill" in str(answers[7][1]) and answers[7][0] is None
    for i, (result, error) in enumerate(answers):
        if i not in (4, 7):
            assert error is None
            np.testing.assert_allclose(result.as_numpy("probabilities")[0], unary[i % 8], rtol=1e-5, atol=1e-6)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'route="/inference.GRPCInferenceService/ModelStreamInfer"' in metrics


def test_a_streams_key_is_checked_and_charged_per_request(grpc_server, bundles):
    _, client, key, store = grpc_server
    x = bundles.x[:N]
    token = key("distill", models=["digits-a"], quota=100)
    want = client.infer("digits-a", [fp32_input(x)], outputs=[triton.InferRequestedOutput("distill_logits")],
                        headers=bearer(token)).as_numpy("distill_logits")
    keyed = [{"model_name": "digits-a", "inputs": [fp32_input(x)],
              "outputs": [triton.InferRequestedOutput("distill_logits")]}] * 3
    answers = _stream(client, keyed, headers=bearer(token))
    for result, error in answers:
        assert error is None
        np.testing.assert_allclose(result.as_numpy("distill_logits"), want, rtol=1e-5, atol=1e-6)
    key_id = token.split("_")[1]
    assert store.get_key(key_id).used == 4 * N  # the unary call and three streamed ones, N samples each
    answers = _stream(client, keyed[:2], headers=bearer("sdb_nope_nope"))
    assert all(r is None and "key" in str(e).lower() for r, e in answers), answers


def test_a_stream_past_its_window_stays_in_order_and_a_message_that_is_not_one_is_refused_alone(grpc_server, bundles):
    from service.grpc.server import STREAM_WINDOW

    server, client, _, _ = grpc_server
    x = np.ascontiguousarray(bundles.x[:1], np.float32)
    request = service_pb2.ModelInferRequest(model_name="digits-a")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    sent = []
    for i in range(3 * STREAM_WINDOW):
        request.id = f"r{i}"
        sent.append(b"\xff\xff not a message" if i == 5 else request.SerializeToString())
    with grpc.insecure_channel(f"127.0.0.1:{server.env['SDB_GRPC_PORT']}") as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       request_serializer=lambda b: b,
                                       response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        answers = list(stream(iter(sent), timeout=60))
        assert [a.infer_response.id for a in answers] == [f"r{i}" if i != 5 else "" for i in range(len(sent))]
        assert answers[5].error_message == "the request is not a ModelInferRequest protobuf message"
        assert not any(a.error_message for i, a in enumerate(answers) if i != 5)
        # A client that goes away mid-stream takes nothing with it.
        call = stream(iter(sent * 4), timeout=60)
        next(call)
        call.cancel()
    assert client.is_server_ready() and client.infer("digits-a", [fp32_input(x)]).as_numpy("probabilities") is not None


@pytest.mark.anyio
async def test_metadata_that_authenticates_nothing_spends_the_address_rate():
    """ServerMetadata needs no key: a call with junk ``authorization`` metadata skipped the address's rate (one
    without any spent it), so a junk header made it unlimited. A valid key spends its own rate alone."""
    from service.errors import ApiError
    from service.grpc import grpc_predict_v2_pb2 as pb
    from service.grpc.server import InferenceServicer
    from service.metrics import Metrics
    from service.ratelimit import RateLimiter

    class Keyring:
        async def key_of(self, authorization):
            if authorization != "Bearer good":
                raise ApiError(401, "invalid_key", "invalid API key")
            return type("Key", (), {"id": "k1"})()

    class Context:
        def __init__(self, authorization):
            self.authorization = authorization

        def peer(self):
            return "ipv4:127.0.0.1:5000"

        def invocation_metadata(self):
            return (("authorization", self.authorization),)

        async def abort(self, code, details, trailing_metadata=()):
            self.aborted = (code, details)
            raise grpc.aio.AbortError()

    state = type("State", (), {"settings": Settings(), "host": None, "keyring": Keyring(), "metrics": Metrics(),
                               "address_limiter": RateLimiter(0.01, 2), "key_limiter": RateLimiter(0.01, 3)})()
    servicer = InferenceServicer(state)
    for _ in range(3):  # a valid key: its own rate, not the address's
        await servicer.ServerMetadata(pb.ServerMetadataRequest(), Context("Bearer good"))
    good = Context("Bearer good")
    with pytest.raises(grpc.aio.AbortError):  # past its burst (it went unlimited)
        await servicer.ServerMetadata(pb.ServerMetadataRequest(), good)
    assert good.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for _ in range(2):
        await servicer.ServerMetadata(pb.ServerMetadataRequest(), Context("x"))
    context = Context("x")
    with pytest.raises(grpc.aio.AbortError):
        await servicer.ServerMetadata(pb.ServerMetadataRequest(), context)
    assert context.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, context.aborted


def test_a_request_of_many_tensors_is_refused_from_their_count(grpc_server, bundles):
    """Every model takes one input, and serves at most three outputs: 300,000 tiny input tensors (6 MB) were each
    decoded (~20 µs: 6 s of the event loop, every HTTP and gRPC client frozen) before their count was refused.
    Raw protobuf requests: the standard client sends what it is given."""
    server, client, _, _ = grpc_server
    x = np.ascontiguousarray(bundles.x[:1], np.float32)
    many = service_pb2.ModelInferRequest(model_name="digits-a", raw_input_contents=[b"\0" * 4] * 300_000)
    many.inputs.extend([service_pb2.ModelInferRequest.InferInputTensor(name="i", datatype="FP32", shape=[1])]
                       * 300_000)
    one = service_pb2.ModelInferRequest(model_name="digits-a", raw_input_contents=[x.tobytes()])
    one.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    asking = service_pb2.ModelInferRequest()
    asking.CopyFrom(one)
    asking.outputs.extend([service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="nope")] * 300_000)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        for request, message in ((many, "inputs must be a list of exactly one tensor object"),
                                 (asking, "300000 outputs asked for; a model serves at most 3")):
            data = request.SerializeToString()
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in: the encoding untimed
            start = time.perf_counter()
            with pytest.raises(grpc.RpcError) as e:
                infer(data, timeout=60)
            assert time.perf_counter() - start < 1.0  # the message's parse alone; the entries took 6 s and more
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(message)
        assert [o.name for o in stub.ModelInfer(one, timeout=30).outputs] == ["probabilities"]
    assert client.is_server_ready()


def test_errors_quote_a_callers_long_values_cut_short(grpc_server, bundles):
    """A status's message travels in the trailers, which a client refuses past 8-16 KB: a 20,000-character model
    name (or input, output or datatype) echoed whole was RESOURCE_EXHAUSTED ("received metadata size exceeds hard
    limit") instead of the error. Messages quote 100 characters of a caller's value; any status is cut at 2 KB."""
    server, client, _, _ = grpc_server
    x = bundles.x[:1]
    long = "x" * 20_000
    message = refused(lambda: client.infer(long, [fp32_input(x)]), "NOT_FOUND")
    assert message.startswith("no model named 'xxx") and len(message) < 2100
    refused(lambda: client.get_model_metadata(long), "NOT_FOUND")
    wrong = triton.InferInput(long, list(x.shape), "FP32")
    wrong.set_data_from_numpy(x)
    message = refused(lambda: client.infer("digits-a", [wrong]), "INVALID_ARGUMENT")
    assert message == f"unknown input {'x' * 100!r}…; this model's input is 'input'"
    message = refused(lambda: client.infer("digits-a", [fp32_input(x)], outputs=[triton.InferRequestedOutput(long)]),
                      "INVALID_ARGUMENT")
    assert message.startswith(f"unknown output(s) [{'x' * 100!r}…]; this model serves")
    typed = service_pb2.ModelInferRequest(model_name="digits-a", raw_input_contents=[b"\0" * 4])
    typed.inputs.add(name="input", datatype=long, shape=[1])
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch, pytest.raises(grpc.RpcError) as e:
        service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(typed, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"datatype {'x' * 100!r}… is not supported")
