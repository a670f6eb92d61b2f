"""Served under a reverse proxy's path prefix (SDB_ROOT_PATH): routed alike whether the proxy strips the prefix or
keeps it, with the limits of each route as at the root, and no redirect that leaves the prefix."""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import make_settings, start_service

pytestmark = pytest.mark.anyio

ONE = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}


@pytest.fixture
async def prefixed(tmp_path, bundles):
    settings = make_settings(tmp_path / "data", bundles, root_path="/sdb", rate_limit_address_per_s=0.001,
                             rate_limit_address_burst=2)
    service, manager = await start_service(settings, bundles.a)
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


async def test_a_prefix_stripped_or_kept_routes_alike_and_the_docs_name_it(prefixed):
    c = prefixed.client
    for path in ("/v2/models/digits-a/infer", "/sdb/v2/models/digits-a/infer"):  # stripped, kept
        r = await c.post(path, json=ONE, headers=prefixed.admin)  # a key: its own rate, not the address's
        assert r.status_code == 200 and np.array(r.json()["outputs"][0]["data"]).size == 10, r.text
    r = await c.post("/sdb/v2/models/nope/infer", json=ONE, headers=prefixed.admin)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)  # the protocol's error form
    assert (await c.get("/sdb/openapi.json")).json()["servers"] == [{"url": "/sdb"}]


async def test_under_a_prefix_probes_stay_free_and_uploads_keep_their_own_limit(prefixed):
    c = prefixed.client
    for path in ("/sdb/healthz", "/sdb/readyz", "/sdb/v2/health/live") * 3:  # a burst of 2 an address
        assert (await c.get(path)).status_code == 200, path
    big = b"x" * (prefixed.settings.max_payload_bytes + 1)  # over the payload limit, far within the file limit
    r = await c.post("/sdb/v1/files", files={"file": ("big.npz", big)})
    assert r.status_code != 413, r.text  # read as an upload (then refused for having no key)


@pytest.mark.parametrize("root", ["", "/sdb"])
async def test_a_trailing_slash_is_a_404_not_a_redirect_out_of_the_prefix(tmp_path, bundles, root):
    # Starlette redirected /v1/models/ to http://<Host>/v1/models: out of a proxy's prefix (or to the upstream's own
    # address), and clients that follow a 307 send the key and the body there
    service, manager = await start_service(make_settings(tmp_path / "data", bundles, root_path=root), bundles.a)
    try:
        h = service.auth(service.key(("distill",)))
        for method, path in (("GET", "/v1/models/"), ("POST", "/v1/models/digits-a/distill/"),
                             ("GET", "/v2/models/digits-a/")):
            r = await service.client.request(method, root + path, headers=h, json={"inputs": [[0.0] * 64]})
            assert r.status_code == 404 and "location" not in r.headers, (path, r.status_code, r.headers)
    finally:
        await service.client.aclose()
        await manager.__aexit__(None, None, None)


def test_a_prefix_that_begins_as_a_route_does_is_refused():
    """SDB_ROOT_PATH=/v1 behind a stripping proxy routed /v1/models as /models: every route a 404."""
    from service.settings import Settings

    for prefix in ("/v1", "/v2/x", "/docs", "/console", "/metrics"):
        with pytest.raises(ValueError, match="begins as the service's own"):
            Settings(root_path=prefix)
    assert Settings(root_path="/sdb/v1").root_path == "/sdb/v1"
