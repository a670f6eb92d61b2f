"""gRPC's model configuration, statistics and streams let a caller reach what the HTTP routes let it reach, and
nothing more.

``ModelConfig`` describes a model as ``GET /v2/models/{name}/config`` does, so with ``SDB_PUBLIC_PREDICT`` off an
anonymous caller learns nothing of any name (UNAUTHENTICATED, as HTTP's 401) and a key limited to other models
is refused (PERMISSION_DENIED, HTTP's 403). A ``ModelStreamInfer`` stream is checked request by request: each
answer a caller may not have is refused in its ``error_message`` and carries no outputs, whatever came before it
on the stream. Against ``sdb serve`` with its gRPC port on.
"""
from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.auth import create_key
from service.settings import Settings
from service.store import Store
from tests.service.conftest import Server, free_port, sdb_bytes


@pytest.fixture(scope="module")
def private(tmp_path_factory, bundles):
    """A server with predict for keys only, serving digits-a and digits-b, and a way to make keys."""
    data = tmp_path_factory.mktemp("grpc-private") / "data"
    port = free_port()
    server = Server(data, bundles, env={"SDB_GRPC_PORT": str(port), "SDB_PUBLIC_PREDICT": "false",
                                        "SDB_RATE_LIMIT_KEY_PER_S": "0", "SDB_RATE_LIMIT_ADDRESS_PER_S": "0"})
    settings = Settings(data_dir=data, master_key_file=bundles.master_key_file)
    store = Store(settings.db_url)

    def key(*scopes: str, **kw) -> str:
        return create_key(store, settings.pepper, scopes=scopes, **kw)[0]

    try:
        admin = {"Authorization": f"Bearer {key('admin')}"}
        for bundle in (bundles.a, bundles.b):
            r = httpx.post(server.url + "/v1/models", files={"file": (f"{bundle.name}.sdb", sdb_bytes(bundle))},
                           headers=admin, timeout=60)
            assert r.status_code == 201, r.text
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield service_pb2_grpc.GRPCInferenceServiceStub(channel), key, server.url
    finally:
        err = server.stop()
        store.close()
    assert "Traceback" not in err, err[-3000:]


def _metadata(token: str | None) -> tuple:
    return () if token is None else (("authorization", f"Bearer {token}"),)


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def test_a_models_configuration_is_described_to_whom_its_metadata_is(private):
    stub, key, _ = private
    for name in ("digits-a", "no-such-model"):
        e = _refused(lambda name=name: stub.ModelConfig(service_pb2.ModelConfigRequest(name=name)))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "digits" not in e.details(), (name, e.details())
    only_b = key("predict", models=["digits-b"])
    e = _refused(lambda: stub.ModelConfig(service_pb2.ModelConfigRequest(name="digits-a"), metadata=_metadata(only_b)))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    config = stub.ModelConfig(service_pb2.ModelConfigRequest(name="digits-b"), metadata=_metadata(only_b)).config
    assert config.name == "digits-b" and [o.name for o in config.output] == ["probabilities", "distill_logits"]


def _request(model: str, x: np.ndarray, request_id: str, keyed: bool = False) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    if keyed:
        request.outputs.add(name="distill_logits")
    return request


def test_each_request_of_a_stream_is_checked_on_its_own(private, bundles):
    stub, key, _ = private
    x = bundles.x[:2]
    only_b = key("predict", models=["digits-b"])
    cases = [  # (the stream's key, its requests, which of them are answered)
        (None, [_request("digits-b", x, "anon")], []),
        (only_b, [_request("digits-b", x, "b"), _request("digits-a", x, "a"), _request("no-such-model", x, "n"),
                  _request("digits-b", x, "b-keyed", keyed=True), _request("digits-b", x, "b-again")], ["b", "b-again"]),
        ("sdb_nope_nope", [_request("digits-b", x, "bad-key")], []),
    ]
    for token, requests, answered in cases:
        answers = list(stub.ModelStreamInfer(iter(requests), metadata=_metadata(token), timeout=60))
        assert [a.infer_response.id for a in answers] == [r.id for r in requests]
        for request, answer in zip(requests, answers):
            if request.id in answered:
                assert not answer.error_message and answer.infer_response.raw_output_contents
            else:
                assert answer.error_message and not answer.infer_response.outputs
                assert not answer.infer_response.raw_output_contents
                assert "Traceback" not in answer.error_message
    distill = key("distill", models=["digits-b"], quota=100)
    keyed = list(stub.ModelStreamInfer(iter([_request("digits-b", x, "k", keyed=True),
                                             _request("digits-a", x, "other", keyed=True)]),
                                       metadata=_metadata(distill), timeout=60))
    assert keyed[0].infer_response.outputs[0].name == "distill_logits" and keyed[1].error_message


def test_statistics_are_shown_to_whom_predict_is(private, bundles):
    # with predict for keys only: no figure of any model without a key, and a key limited to some models sees theirs
    stub, key, url = private
    only_b, jobs = key("predict", models=["digits-b"]), key("jobs")
    stats = lambda name="", token=None, version="": stub.ModelStatistics(
        service_pb2.ModelStatisticsRequest(name=name, version=version), metadata=_metadata(token))
    for name in ("", "digits-a", "no-such-model"):
        e = _refused(lambda name=name: stats(name))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "digits" not in e.details(), (name, e.details())
        r = httpx.get(f"{url}/v2/models/{name + '/' if name else ''}stats")
        assert r.status_code == 401 and "digits" not in r.text, r.text
    assert _refused(lambda: stats("digits-a", only_b)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert _refused(lambda: stats("digits-a", only_b, "1")).code() == grpc.StatusCode.PERMISSION_DENIED
    assert _refused(lambda: stats("", jobs)).code() == grpc.StatusCode.PERMISSION_DENIED  # no predict scope
    headers = {"Authorization": f"Bearer {only_b}"}
    assert httpx.get(f"{url}/v2/models/digits-a/stats", headers=headers).status_code == 403
    assert httpx.get(f"{url}/v2/models/stats", headers={"Authorization": f"Bearer {jobs}"}).status_code == 403
    assert [m.name for m in stats("", only_b).model_stats] == ["digits-b"]
    assert [m["name"] for m in httpx.get(f"{url}/v2/models/stats", headers=headers).json()["model_stats"]] == [
        "digits-b"]
    assert [m.name for m in stats("digits-b", only_b).model_stats] == ["digits-b"]


def test_the_repository_index_lists_to_whom_predict_is(private):
    stub, key, _ = private
    index = lambda token=None: stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), metadata=_metadata(token))
    assert _refused(index).code() == grpc.StatusCode.UNAUTHENTICATED
    assert _refused(lambda: index(key("jobs"))).code() == grpc.StatusCode.PERMISSION_DENIED
    assert [m.name for m in index(key("predict", models=["digits-b"])).models] == ["digits-b"]
    assert sorted(m.name for m in index(key("predict")).models) == ["digits-a", "digits-b"]
