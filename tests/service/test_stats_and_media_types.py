"""One v2 infer is one request in the statistics, whatever outputs it asks; a JSON route says so of a body sent as
another media type.

An infer asking ``probabilities`` and ``distill_logits`` together was two items of the model's batcher: tritonclient's
4 samples counted inference_count +8 and success +2, where docs/api.md says samples and requests (+4, +1). Both paths
now ride as one item, over HTTP and gRPC alike (service/oip.py, service/registry.py's PairedPaths).

``POST /v1/jobs``, ``/v1/keys`` and ``/v1/models/{name}/release`` take a pydantic body, which FastAPI parses from JSON
alone: curl -d's default (form-urlencoded) or text/plain got a 422 "Input should be a valid dictionary" that said
nothing of the type. They answer the 415 predict answers, naming application/json, and change nothing; so does a
body that names no Content-Type (FastAPI's strict_content_type reads it as no JSON: it was the same 422). The 415, and
cancel's 413, are in their documented answers.
"""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .conftest import deploy, served_with_grpc

pytestmark = pytest.mark.anyio

BOTH = [{"name": "probabilities"}, {"name": "distill_logits"}]
JSON_ROUTES = ("/v1/jobs", "/v1/keys", "/v1/models/{name}/release")
NOT_JSON = ("text/plain", "application/x-www-form-urlencoded", None)  # curl -d's default is the second; None: none


@pytest.fixture
async def served(tmp_path, bundles):
    """digits-a served in this test's event loop, gRPC on too."""
    async for service in served_with_grpc(tmp_path, bundles.master_key_file, bundles.a):
        yield service


def _infer_body(x: np.ndarray, outputs: list[dict] | None = None) -> dict:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return body if outputs is None else {**body, "outputs": outputs}


def _outputs(r) -> dict[str, np.ndarray]:
    assert r.status_code == 200, r.text
    return {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}


async def _stats(svc) -> dict:
    r = await svc.client.get("/v2/models/digits-a/stats")
    assert r.status_code == 200, r.text
    [m] = r.json()["model_stats"]
    return m


def _grown(before: dict, after: dict) -> dict:
    counts = {k: after["inference_stats"][k]["count"] - before["inference_stats"][k]["count"]
              for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}
    return {"samples": after["inference_count"] - before["inference_count"],
            "calls": after["execution_count"] - before["execution_count"], **counts}


_ZERO = {"inference_count": 0, "execution_count": 0, "inference_stats": {
    k: {"count": 0, "ns": 0} for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}}
ONE_REQUEST = {"samples": 4, "calls": 1, "success": 1, "fail": 0, "queue": 1, "compute_input": 1, "compute_infer": 1,
               "compute_output": 1}


async def test_an_infer_asking_both_outputs_counts_one_request_of_its_samples(served, bundles):
    svc, x = served, bundles.x[:4]
    key = svc.auth(svc.key(("distill",)))
    url = "/v2/models/digits-a/infer"
    alone = {**_outputs(await svc.client.post(url, json=_infer_body(x))),
             **_outputs(await svc.client.post(url, json=_infer_body(x, BOTH[1:]), headers=key))}
    before = await _stats(svc)
    both = _outputs(await svc.client.post(url, json=_infer_body(x, BOTH), headers=key))
    assert _grown(before, await _stats(svc)) == ONE_REQUEST
    # each path's answer is its own, as asked alone
    for name in ("probabilities", "distill_logits"):
        np.testing.assert_allclose(both[name], alone[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(both["probabilities"], both["distill_logits"])

    # gRPC's ModelInfer shares the same path
    request = service_pb2.ModelInferRequest(model_name="digits-a")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    for o in BOTH:
        request.outputs.add(name=o["name"])
    before = await _stats(svc)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.settings.grpc_port}") as channel:
        answer = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=(("authorization", key["Authorization"]),))
    assert [o.name for o in answer.outputs] == ["probabilities", "distill_logits"]
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[1], np.float32).reshape(4, -1),
                               alone["distill_logits"], rtol=1e-5, atol=1e-6)
    assert _grown(before, await _stats(svc)) == ONE_REQUEST


async def test_a_key_with_a_quota_is_charged_once_for_both_outputs(served, bundles):
    svc, x = served, bundles.x[:4]
    key = svc.auth(svc.key(("distill",), quota=8))
    for status in (200, 200, 429):  # 4 samples each: the third is over the quota, refused before the model
        r = await svc.client.post("/v2/models/digits-a/infer", json=_infer_body(x, BOTH), headers=key)
        assert r.status_code == status, r.text
    assert _grown(_ZERO, await _stats(svc)) == {**ONE_REQUEST, "samples": 8, "calls": 2, "success": 2, "queue": 2,
                                                "compute_input": 2, "compute_infer": 2, "compute_output": 2}


async def test_a_pair_that_fails_fails_both_paths_as_one_request(served, bundles):
    # the model removed while the request held it (its batcher closed): one failed request, a 404, and no half left
    # waiting for the other
    svc, x = served, bundles.x[:4]
    key = svc.auth(svc.key(("distill",)))
    before = await _stats(svc)
    svc.app.state.host.loaded("digits-a").batcher.close()
    r = await asyncio.wait_for(svc.client.post("/v2/models/digits-a/infer", json=_infer_body(x, BOTH), headers=key), 10)
    assert r.status_code == 404 and "removed" in r.json()["error"], r.text
    assert _grown(before, await _stats(svc)) == {**{k: 0 for k in ONE_REQUEST}, "fail": 1}


async def _owned_and_removed(svc, bundles) -> tuple[str, dict]:
    """digits-b deployed by a deploy key and removed: its name still that key's, to release."""
    token = svc.key(("deploy",))
    deployer = svc.auth(token)
    assert (await deploy(svc.client, bundles.b, deployer)).status_code == 201
    assert (await svc.client.delete("/v1/models/digits-b", headers=deployer)).status_code == 200
    return token.split("_")[1], deployer


@pytest.mark.parametrize("media", NOT_JSON)
async def test_a_json_route_answers_415_to_another_media_type_and_changes_nothing(served, bundles, media):
    svc, store = served, served.app.state.store
    owner, _ = await _owned_and_removed(svc, bundles)
    jobs = svc.auth(svc.key(("jobs",)))
    sent = {"/v1/jobs": (b'{"kind": "audit", "params": {"target": {"model": "digits-a"}, "data": "digits"}}', jobs),
            "/v1/keys": (b'{"scopes": ["predict"], "name": "by-curl"}', svc.admin),
            "/v1/models/digits-b/release": (b"{}", svc.admin)}
    keys = len((await svc.client.get("/v1/keys", headers=svc.admin)).json()["keys"])
    for url, (body, auth) in sent.items():
        r = await svc.client.post(url, content=body, headers={**auth, **({"Content-Type": media} if media else {})})
        assert r.status_code == 415, (url, r.text)
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"], (url, error)
        assert (media or "named none") in error["message"], (url, error)
    assert (await svc.client.get("/v1/jobs", headers=jobs)).json()["jobs"] == []
    assert len((await svc.client.get("/v1/keys", headers=svc.admin)).json()["keys"]) == keys
    assert store.model_owner("digits-b") == owner
    # the same bodies as JSON are served
    r = await svc.client.post("/v1/keys", content=sent["/v1/keys"][0],
                              headers={**svc.admin, "Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    r = await svc.client.post("/v1/models/digits-b/release", content=b"{}",
                              headers={**svc.admin, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["previous_owner"] == owner, r.text
    assert store.model_owner("digits-b") is None


async def test_the_415s_and_cancels_413_are_documented_and_answered(served):
    svc = served
    paths = svc.app.openapi()["paths"]
    for path in JSON_ROUTES:
        assert "415" in paths[path]["post"]["responses"], path
    # every operation that takes a body documents the 415 of a media type it does not take
    for path, ops in paths.items():
        for method, op in ops.items():
            if "requestBody" in op:
                assert "415" in op["responses"], (method, path)
    assert "413" in paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    jobs = svc.auth(svc.key(("jobs",)))
    r = await svc.client.post("/v1/jobs/job-0123456789abcdef01234567/cancel", headers=jobs,
                              content=b"x" * (svc.settings.max_payload_bytes + 1))
    assert r.status_code == 413, r.text
