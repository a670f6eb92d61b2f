"""The inference routes are called straight from the service middleware (service.direct): they answer
as FastAPI's routing did, under a root path, with the limits, errors and metrics of every other route."""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from fastapi import Depends, Request

from service.direct import direct
from tests.service.conftest import make_settings, start_service

pytestmark = pytest.mark.anyio

INFERENCE = {"/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer",
             "/v1/models/{name}/predict", "/v1/models/{name}/distill"}


def _infer_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def _direct_paths(app) -> set[str]:
    return {r.path for r in app.front.direct.routes}


async def test_the_inference_routes_and_only_they_are_called_directly(svc):
    assert _direct_paths(svc.app) == INFERENCE
    # and a direct route answers what FastAPI's route answered: its metrics carry the route's template
    r = await svc.client.post("/v2/models/digits-a/versions/2/infer", json=_infer_body(np.zeros((1, 1, 8, 8))))
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "2"
    metrics = (await svc.client.get("/metrics", headers=svc.admin)).text
    assert 'route="/v2/models/{name}/versions/{version}/infer"' in metrics


def test_a_direct_endpoint_takes_the_request_alone():
    async def with_dependency(request: Request, other: int = Depends(lambda: 1)):
        return None

    def not_async(request: Request):
        return None

    for endpoint in (with_dependency, not_async):
        with pytest.raises(TypeError, match="takes the request alone"):
            direct(endpoint)


async def test_other_methods_fall_through_to_fastapi(svc):
    for path, body in (("/v2/models/digits-a/infer", {"error": "this path serves POST, not GET"}),
                       ("/v1/models/digits-a/predict", None)):
        r = await svc.client.get(path)
        assert r.status_code == 405, r.text
        assert r.headers["allow"] == "POST"
        if body is not None:  # the protocol's form on /v2
            assert r.json() == body
        else:
            assert r.json()["error"]["code"] == "method_not_allowed"
    # Allow names every method of the path (RFC 9110), not the first route's alone; HEAD beside GET
    for path, allow in (("/v1/models", "GET, HEAD, POST"), ("/v1/models/digits-a", "DELETE, GET, HEAD"),
                        ("/v1/keys", "GET, HEAD, POST")):
        r = await svc.client.put(path)
        assert (r.status_code, r.headers["allow"]) == (405, allow), (path, r.headers, r.text)


async def test_errors_keep_each_protocols_form(svc):
    r = await svc.client.post("/v2/models/nope/infer", json=_infer_body(np.zeros((1, 1, 8, 8))))
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = await svc.client.post("/v1/models/nope/predict", json={"inputs": np.zeros((1, 1, 8, 8)).tolist()})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await svc.client.post("/v1/models/digits-a/distill", json={"inputs": np.zeros((1, 1, 8, 8)).tolist()})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_key"


async def test_a_streamed_body_over_the_limit_is_refused_in_the_protocols_form(tmp_path, bundles):
    service, manager = await start_service(make_settings(tmp_path / "data", bundles, max_payload_bytes=4096),
                                           bundles.a)
    try:
        async def chunks():  # no Content-Length: the limit is counted while the body is read
            for _ in range(8):
                yield b" " * 1024

        r = await service.client.post("/v2/models/digits-a/infer", content=chunks())
        assert r.status_code == 413 and "over this route's limit" in r.json()["error"]
        r = await service.client.post("/v1/models/digits-a/predict", content=chunks())
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        # and it served on
        r = await service.client.post("/v2/models/digits-a/infer", json=_infer_body(bundles.x[:1]))
        assert r.status_code == 200, r.text
    finally:
        await service.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_served_under_a_root_path(svc):
    client = httpx.AsyncClient(transport=httpx.ASGITransport(svc.app, root_path="/sdb"),
                               base_url="http://sdb.test")
    async with client:
        r = await client.post("/sdb/v2/models/digits-a/infer", json=_infer_body(np.zeros((1, 1, 8, 8))))
        assert r.status_code == 200, r.text
        r = await client.post("/sdb/v2/models/nope/infer", json=_infer_body(np.zeros((1, 1, 8, 8))))
        assert r.status_code == 404 and isinstance(r.json()["error"], str)


async def test_metrics_count_every_request_and_bound_the_method_label(svc):
    for _ in range(3):  # each series looked up once, then counted from memory: every request still counts
        await svc.client.post("/v2/models/digits-a/infer", json=_infer_body(np.zeros((2, 1, 8, 8))))
        await svc.client.post("/v2/models/nope/infer", json=_infer_body(np.zeros((1, 1, 8, 8))))
    for method in ("FOO", "BAR"):
        await svc.client.request(method, "/v2/models/digits-a/infer")
    text = (await svc.client.get("/metrics", headers=svc.admin)).text
    assert 'sdb_requests_total{method="POST",model="digits-a",route="/v2/models/{name}/infer",status="200"} 3.0' in text
    assert 'sdb_errors_total{model="",route="/v2/models/{name}/infer",status="404"} 3.0' in text
    assert 'sdb_samples_total{key_id="anonymous",kind="predict",model="digits-a"} 6.0' in text
    assert 'method="FOO"' not in text and 'method="BAR"' not in text
    assert 'sdb_requests_total{method="OTHER",model="digits-a",route="/v2/models/{name}/infer",status="405"} 2.0' in text


async def test_a_metrics_scrape_does_not_hold_other_requests(svc, monkeypatch):
    """The exposition was rendered on the event loop: with 500 models' series each scrape held every request for
    0.15-0.5 s. A rendering that takes a second (time.sleep: the loop's own thread would be held) holds no one."""
    render = svc.app.state.metrics.render
    monkeypatch.setattr(svc.app.state.metrics, "render", lambda per_key=False: time.sleep(1.0) or render(per_key))
    t0 = time.perf_counter()
    scrape = asyncio.ensure_future(svc.client.get("/metrics"))  # first: it reaches its rendering in a few awaits
    infer = asyncio.ensure_future(svc.client.post("/v2/models/digits-a/infer",
                                                  json=_infer_body(np.zeros((1, 1, 8, 8)))))
    assert (await infer).status_code == 200
    assert time.perf_counter() - t0 < 0.5
    assert (await scrape).status_code == 200 and time.perf_counter() - t0 >= 1.0
