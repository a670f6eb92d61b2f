"""An option of /predict or /distill given both in the query and in the body: the same value is that value, two
different ones are a 422 naming both places. One of them silently won before (the query over a JSON body, a form
field over the query), and the caller could not tell which answer it got."""
from __future__ import annotations

import io

import pytest
from PIL import Image

pytestmark = pytest.mark.anyio


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "PNG")
    return buf.getvalue()


def _conflict(r, name: str, where: str) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "conflicting_options", error
    assert name in error["message"] and where in error["message"] and "query" in error["message"], error


async def test_top_k_in_the_query_and_a_json_body(svc, bundles):
    c, x = svc.client, bundles.x[:1].tolist()
    _conflict(await c.post("/v1/models/digits-a/predict?top_k=1", json={"inputs": x, "top_k": 2}), "top_k",
              "JSON body")
    same = await c.post("/v1/models/digits-a/predict?top_k=2", json={"inputs": x, "top_k": 2})
    assert same.status_code == 200 and len(same.json()["predictions"][0]["labels"]) == 2, same.text
    for url, body in (("/v1/models/digits-a/predict?top_k=3", {"inputs": x}),
                      ("/v1/models/digits-a/predict", {"inputs": x, "top_k": 3})):  # either place alone
        r = await c.post(url, json=body)
        assert r.status_code == 200 and len(r.json()["predictions"][0]["labels"]) == 3, r.text


async def test_top_k_in_the_query_and_a_form(svc):
    c = svc.client
    _conflict(await c.post("/v1/models/digits-a/predict?top_k=1", files={"file": ("d.png", _png())},
                           data={"top_k": "2"}), "top_k", "form")
    same = await c.post("/v1/models/digits-a/predict?top_k=2", files={"file": ("d.png", _png())}, data={"top_k": "2"})
    assert same.status_code == 200 and len(same.json()["predictions"][0]["labels"]) == 2, same.text
    r = await c.post("/v1/models/digits-a/predict?top_k=3", files={"file": ("d.png", _png())})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["labels"]) == 3, r.text


async def test_temperature_in_the_query_and_a_json_body(svc, bundles):
    c, x = svc.client, bundles.x[:1].tolist()
    distiller = svc.auth(svc.key(("distill",)))
    _conflict(await c.post("/v1/models/digits-a/distill?temperature=3", json={"inputs": x, "temperature": 2},
                           headers=distiller), "temperature", "JSON body")
    same = await c.post("/v1/models/digits-a/distill?temperature=2.0", json={"inputs": x, "temperature": 2},
                        headers=distiller)
    assert same.status_code == 200 and same.json()["temperature"] == 2.0, same.text
    r = await c.post("/v1/models/digits-a/distill?temperature=4", json={"inputs": x}, headers=distiller)
    assert r.status_code == 200 and r.json()["temperature"] == 4.0, r.text
    # null is the schema's "not given": the query's value is the one, as it was before the conflict rule
    r = await c.post("/v1/models/digits-a/distill?temperature=4", json={"inputs": x, "temperature": None},
                     headers=distiller)
    assert r.status_code == 200 and r.json()["temperature"] == 4.0, r.text
