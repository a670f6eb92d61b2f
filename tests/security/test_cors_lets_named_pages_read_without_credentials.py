"""Browser pages of other origins (CORS, ``SDB_CORS_ORIGINS``): none by default; an allowed origin's preflight is
answered and every answer it gets carries the headers, the inference routes called directly and their errors
included; another origin gets none, and no answer allows credentials. In process, the real app and store."""
from __future__ import annotations

import numpy as np
import pytest

from service.settings import Settings, SettingsError
from tests.service.conftest import make_settings, start_service

pytestmark = pytest.mark.anyio

PAGE, OTHER = "https://app.example", "https://evil.example"
X = np.zeros((1, 1, 8, 8), np.float32).tolist()
INFER = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": np.zeros(64).tolist()}]}


def preflight(origin: str, method: str = "POST", headers: str = "authorization, content-type") -> dict:
    return {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers}


@pytest.fixture
async def served(tmp_path, bundles, request):
    settings = make_settings(tmp_path / "data", bundles, cors_origins=request.param)
    svc, manager = await start_service(settings, bundles.a)
    yield svc
    await svc.client.aclose()
    await manager.__aexit__(None, None, None)


@pytest.mark.parametrize("served", [""], indirect=True)
async def test_no_origin_is_allowed_by_default(served):
    c = served.client
    r = await c.options("/v2/models/digits-a/infer", headers=preflight(PAGE))
    assert "access-control-allow-origin" not in r.headers
    r = await c.post("/v1/models/digits-a/predict", json={"inputs": X}, headers={"Origin": PAGE})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("served", [f"{PAGE}, http://localhost:3000"], indirect=True)
async def test_an_allowed_origin_may_call_and_read_every_answer(served):
    c = served.client
    for path in ("/v2/models/digits-a/infer", "/v1/models/digits-a/distill", "/v1/models"):
        r = await c.options(path, headers=preflight(PAGE))
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE, (path, r.headers)
        assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                      r.headers["access-control-allow-headers"].split(",")}
        assert "access-control-allow-credentials" not in r.headers
    page = {"Origin": PAGE}
    answers = [await c.post("/v2/models/digits-a/infer", json=INFER, headers=page),  # called directly
               await c.post("/v1/models/digits-a/predict", json={"inputs": X}, headers=page),
               await c.get("/v1/models", headers=page),
               await c.post("/v1/models/digits-a/distill", json={"inputs": X}, headers=page),  # 401: no key
               await c.post("/v2/models/digits-a/infer", content=b"{", headers=page)]  # 400
    assert [r.status_code for r in answers] == [200, 200, 200, 401, 400]
    for r in answers:
        assert r.headers["access-control-allow-origin"] == PAGE, (r.status_code, r.headers)
        assert "retry-after" in r.headers["access-control-expose-headers"].lower()
        assert "access-control-allow-credentials" not in r.headers
    # another origin: its preflight is refused and its answers carry nothing a browser would let it read
    r = await c.options("/v2/models/digits-a/infer", headers=preflight(OTHER))
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = await c.post("/v1/models/digits-a/predict", json={"inputs": X}, headers={"Origin": OTHER})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # a method the API has no route for is not offered
    r = await c.options("/v1/models", headers=preflight(PAGE, method="PUT"))
    assert r.status_code == 400


@pytest.mark.parametrize("served", ["https://App.Example, HTTP://Localhost:80",
                                    "https://app.example:443, http://localhost:80"], indirect=True)
async def test_an_origin_is_allowed_as_a_browser_writes_it(served):
    # a browser's Origin header is in lower case and leaves out its scheme's default port, and is compared exactly:
    # an origin named otherwise was never allowed (its preflights were 400s)
    for page in (PAGE, "http://localhost"):
        r = await served.client.options("/v1/models", headers=preflight(page, method="GET"))
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page, (page, r.status_code)
    r = await served.client.options("/v1/models", headers=preflight("http://localhost:3000", method="GET"))
    assert r.status_code == 400  # another port is another origin


@pytest.mark.parametrize("origins", ["app.example", "https://app.example/", "https://app.example/page", "ftp://x"])
def test_an_origin_that_is_not_one_is_refused_naming_the_setting(origins, tmp_path, monkeypatch):
    monkeypatch.setenv("SDB_CORS_ORIGINS", origins)
    with pytest.raises(SettingsError) as e:
        Settings.load(data_dir=tmp_path)
    assert "SDB_CORS_ORIGINS" in str(e.value) and "not an origin" in str(e.value), str(e.value)
    monkeypatch.setenv("SDB_CORS_ORIGINS", "*")
    assert Settings.load(data_dir=tmp_path).cors_origin_list() == ["*"]


@pytest.mark.parametrize("served", [PAGE], indirect=True)
async def test_a_page_may_send_and_read_every_header_the_contract_documents(served):
    """What a generated client sends and reads is what the OpenAPI document names: a header parameter a preflight
    refuses is a "Failed to fetch" in the page (a job's Idempotency-Key was), and an answer's header not exposed reads
    as null (a .npy distill's SDB-Model was). Every GET route answers HEAD, with a key too."""
    c = served.client
    doc = (await c.get("/openapi.json")).json()
    sent, read = set(), set()
    for path in doc["paths"].values():
        for op in path.values():
            sent |= {p["name"].lower() for p in op.get("parameters", []) if p["in"] == "header"}
            for answer in op.get("responses", {}).values():
                read |= {h.lower() for h in answer.get("headers", {})}
    assert {"idempotency-key", "inference-header-content-length"} <= sent
    assert {"sdb-model", "retry-after"} <= read
    r = await c.options("/v1/jobs", headers=preflight(PAGE, headers=", ".join(sorted(sent | {"authorization"}))))
    assert r.status_code == 200, r.text
    r = await c.options("/v1/models", headers=preflight(PAGE, method="HEAD", headers="authorization"))
    assert r.status_code == 200, r.text
    npy = await c.post("/v1/models/digits-a/distill", json={"inputs": X},
                       headers={"Origin": PAGE, "Accept": "application/x-npy", **served.auth(served.key())})
    assert npy.status_code == 200 and "sdb-model" in npy.headers
    exposed = {h.strip().lower() for h in npy.headers["access-control-expose-headers"].split(",")}
    assert read <= exposed, read - exposed
