"""With ``public_predict`` off, v2 ``infer`` (HTTP and gRPC) tells a caller who may not predict with a
model nothing about it: not that it exists, nor its input, task, output policy or keyed path.

Before the fix both ``infer`` routes and gRPC ``ModelInfer`` looked the model up (loading it on demand)
before any access check, and checked access only after the body: an anonymous caller, or a key whose
allowlist names another tenant's models only, told an existing name from an unknown one (401/403 against
404), and read a model's input name and shape (422), its output policy and whether it has a keyed path
(the 422 for an unknown output lists them) and its task (400). The metadata routes check first; infer now
does too. In process, the real app and store.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from service.grpc import grpc_predict_v2_pb2 as pb
from service.grpc.server import InferenceServicer
from tests.service.conftest import make_settings, start_service

pytestmark = pytest.mark.anyio

X = np.zeros((1, 1, 8, 8), np.float32)
# Bodies that, once the model is found, draw a different answer each: a wrong input name (its name and
# shape), an unknown output (the outputs it serves and its policy), and a valid one.
BODIES = {
    "wrong input": {"inputs": [{"name": "probe", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}]},
    "unknown output": {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32",
                                   "data": X.ravel().tolist()}], "outputs": [{"name": "probe"}]},
    "valid": {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]},
}


@pytest.fixture
async def private(tmp_path, bundles):
    svc, manager = await start_service(make_settings(tmp_path / "data", bundles, public_predict=False),
                                       bundles.a, bundles.b)
    yield svc
    await svc.client.aclose()
    await manager.__aexit__(None, None, None)


async def test_http_infer_names_no_model_to_a_caller_who_may_not_predict_with_it(private):
    c = private.client
    only_b = private.auth(private.key(("predict", "distill", "jobs"), models=["digits-b"]))  # another tenant
    for who, headers, status in (("anonymous", {}, 401), ("another tenant's key", only_b, 403)):
        for name in ("digits-a", "no-such-model"):
            for path in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/1/infer"):
                for what, body in BODIES.items():
                    r = await c.post(path, json=body, headers=headers)
                    assert r.status_code == status, (who, path, what, r.status_code, r.text)
                    text = r.text
                    for secret in ("probabilities", "distill_logits", "[1, 8, 8]", "input'", "output policy"):
                        assert secret not in text, (who, path, what, text)
    # The allowed model still answers that key; a key that may predict with digits-a gets the protocol's errors.
    assert (await c.post("/v2/models/digits-b/infer", json=BODIES["valid"], headers=only_b)).status_code == 200
    every = private.auth(private.key(("predict",)))
    r = await c.post("/v2/models/digits-a/infer", json=BODIES["unknown output"], headers=every)
    assert r.status_code == 422 and "probabilities" in r.text, r.text
    assert (await c.post("/v2/models/no-such-model/infer", json=BODIES["valid"], headers=every)).status_code == 404


async def test_the_repository_index_lists_only_what_the_caller_may_predict_with(private):
    c = private.client
    only_b = private.auth(private.key(("predict",), models=["digits-b"]))
    assert (await c.post("/v2/repository/index")).status_code == 401
    assert (await c.post("/v2/repository/index", headers=private.auth(private.key(("jobs",))))).status_code == 403
    r = await c.post("/v2/repository/index", headers=only_b)
    assert r.status_code == 200 and [m["name"] for m in r.json()] == ["digits-b"], r.text
    r = await c.post("/v2/repository/index", headers=private.auth(private.key(("predict",))))
    assert sorted(m["name"] for m in r.json()) == ["digits-a", "digits-b"]


class Aborted(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class Context:
    """What ModelInfer reads of a gRPC call: its metadata and peer; abort raises, as grpc.aio's does."""

    def __init__(self, token: str | None = None):
        self.metadata = () if token is None else (("authorization", f"Bearer {token}"),)

    def invocation_metadata(self):
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    async def abort(self, code, message, trailing=()):
        raise Aborted(code, message)


def infer_request(name: str, output: str | None = None, input_name: str = "input") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name)
    t = req.inputs.add(name=input_name, datatype="FP32", shape=list(X.shape))
    t.contents.fp32_contents.extend(X.ravel().tolist())
    if output is not None:
        req.outputs.add(name=output)
    return req


async def test_grpc_model_infer_names_no_model_to_a_caller_who_may_not_predict_with_it(private):
    servicer = InferenceServicer(private.app.state)
    only_b = private.key(("predict", "distill", "jobs"), models=["digits-b"])
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (only_b, grpc.StatusCode.PERMISSION_DENIED)):
        for name in ("digits-a", "no-such-model"):
            for req in (infer_request(name), infer_request(name, output="probe"),
                        infer_request(name, input_name="probe")):
                with pytest.raises(Aborted) as e:
                    await servicer.ModelInfer(req, Context(token))
                assert e.value.code == code, (token is not None, name, e.value.code, e.value.message)
                for secret in ("probabilities", "distill_logits", "8, 8", "input'", "output policy"):
                    assert secret not in e.value.message, e.value.message
    answer = await servicer.ModelInfer(infer_request("digits-b"), Context(only_b))
    assert answer.model_name == "digits-b" and [o.name for o in answer.outputs] == ["probabilities"]
