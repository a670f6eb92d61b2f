"""Every route's happy path, in process, and the parity of served outputs with the bundle."""
from __future__ import annotations

import io

import numpy as np
import orjson
import pytest
from PIL import Image

from sdb_core.bundle import load_bundle, public_form_table

from .conftest import deploy

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]  # SQLite and PostgreSQL


def v2_body(x: np.ndarray, *outputs: str) -> dict:
    body = {"id": "r1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}
    if outputs:
        body["outputs"] = [{"name": o} for o in outputs]
    return body


async def test_health_ready_metrics_docs(svc):
    c = svc.client
    assert (await c.get("/healthz")).json() == {"status": "ok"}
    ready = (await c.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["models"] == 3
    await c.post("/v1/models/digits-a/predict", json={"inputs": np.zeros((1, 1, 8, 8)).tolist()})
    text = (await c.get("/metrics")).text
    assert 'sdb_requests_total{method="POST",model="digits-a",route="/v1/models/{name}/predict",status="200"}' in text
    assert 'sdb_samples_total{kind="predict",model="digits-a"} 1.0' in text  # no key ids without admin
    by_key = (await c.get("/metrics", headers=svc.admin)).text
    assert 'sdb_samples_total{key_id="anonymous",kind="predict",model="digits-a"} 1.0' in by_key
    assert (await c.get("/docs")).status_code == 200
    paths = (await c.get("/openapi.json")).json()["paths"]
    assert {"/v1/models/{name}/predict", "/v1/models/{name}/distill", "/v2/models/{name}/infer", "/v1/keys"} <= set(paths)


async def test_models_list_and_get(svc):
    models = (await svc.client.get("/v1/models")).json()["models"]
    assert [(m["name"], m["version"]) for m in models] == [("digits-a", "1"), ("digits-a", "2"), ("digits-b", "1")]
    one = (await svc.client.get("/v1/models/digits-a")).json()
    assert one["version"] == "2" and one["versions"] == ["1", "2"] and one["distillable"]
    assert one["input"]["shape"] == [1, 8, 8] and len(one["labels"]) == 10
    assert one["protection"] is None  # an unchecked box (a test fixture) says so
    assert (await svc.client.get("/v1/models/digits-a", params={"version": "1"})).json()["version"] == "1"


async def test_predict_matches_bundle_public_path(svc, bundles):
    # digits-a is served in two versions (two networks): no version is the highest, version=1 the first
    ref = load_bundle(bundles.a2).predict(bundles.x)
    v1 = await svc.client.post("/v1/models/digits-a/predict?version=1", json={"inputs": bundles.x.tolist(), "top_k": 10})
    np.testing.assert_allclose([p["scores"] for p in v1.json()["predictions"]],
                               np.sort(load_bundle(bundles.a).predict(bundles.x), 1)[:, ::-1], rtol=1e-5, atol=1e-6)
    r = await svc.client.post("/v1/models/digits-a/predict", json={"inputs": bundles.x.tolist(), "top_k": 3})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert len(preds) == len(bundles.x)
    for p, row in zip(preds, ref):
        order = np.argsort(-row, kind="stable")[:3]  # ties (a class's partners) by index, as the server
        assert p["indices"] == order.tolist() and p["labels"] == [str(i) for i in order]
        np.testing.assert_allclose(p["scores"], row[order], rtol=1e-5, atol=1e-6)
    # one sample without batch axis, and flat rows, are the same request
    one = await svc.client.post("/v1/models/digits-a/predict", json={"inputs": bundles.x[0].tolist()})
    flat = await svc.client.post("/v1/models/digits-a/predict", json={"inputs": bundles.x[:1].reshape(1, -1).tolist()})
    assert one.json()["predictions"] == flat.json()["predictions"]
    assert len(one.json()["predictions"][0]["labels"]) == 5


async def test_distill_keyed_logits_differ_and_match_bundle(svc, bundles):
    token = svc.key(("distill",), models=["digits-a"])
    r = await svc.client.post("/v1/models/digits-a/distill", json={"inputs": bundles.x.tolist(), "temperature": 4},
                              headers=svc.auth(token))
    assert r.status_code == 200, r.text
    body = r.json()
    keyed = np.array(body["logits"], dtype=np.float32)
    ref = load_bundle(bundles.a2, svc.settings.master_key)  # the highest version, with its own key
    np.testing.assert_allclose(keyed, ref.distill_logits(bundles.x), rtol=1e-4, atol=1e-4)
    # the keyed path's scale (meta.json's keyed_scale) is the server's to apply
    assert ref.meta["keyed_scale"] == 1.25
    np.testing.assert_allclose(keyed, 1.25 * ref.network_logits(ref.keyed_input(bundles.x)), rtol=1e-4, atol=1e-4)
    other = load_bundle(bundles.a, svc.settings.master_key)  # version 1: another network, another key
    assert np.abs(keyed - other.distill_logits(bundles.x)).max() > 0.1
    public = ref.public_logits(bundles.x)
    assert np.abs(keyed - public).max() > 0.1
    form = public_form_table(ref.meta["public_form"])  # the public answer per top-1, never the keyed path's
    np.testing.assert_array_equal(public, form[public.argmax(1)])
    assert np.abs(keyed - form[keyed.argmax(1)]).max() > 0.1
    soft = np.array(body["soft_targets"])
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
    assert body["temperature"] == 4.0


async def test_predict_image_upload(svc, bundles):
    img = Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8), "L")
    png, jpg = io.BytesIO(), io.BytesIO()
    img.save(png, "PNG")
    img.convert("RGB").save(jpg, "JPEG")
    r = await svc.client.post("/v1/models/digits-b/predict", files={"file": ("d.png", png.getvalue(), "image/png")},
                              data={"top_k": "2"})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["labels"]) == 2
    # the same image preprocessed by hand with the bundle's normalisation gives the same answer
    meta = load_bundle(bundles.b).meta["normalize"]
    x = ((np.asarray(img, np.float32) / 255.0 - meta["mean"][0]) / meta["std"][0])[None, None]
    ref = load_bundle(bundles.b).predict(x)[0]
    np.testing.assert_allclose(r.json()["predictions"][0]["scores"], np.sort(ref)[::-1][:2], rtol=1e-4)
    raw = await svc.client.post("/v1/models/digits-b/predict?top_k=1", content=jpg.getvalue(),
                                headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200 and len(raw.json()["predictions"][0]["labels"]) == 1


async def test_v2_protocol(svc, bundles):
    c = svc.client
    assert (await c.get("/v2/health/live")).json() == {"live": True}
    assert (await c.get("/v2/health/ready")).json() == {"ready": True}
    assert (await c.get("/v2")).json()["name"] == "sdb"
    meta = (await c.get("/v2/models/digits-a")).json()
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "distill_logits"]
    assert (await c.get("/v2/models/digits-a/versions/1")).json()["name"] == "digits-a"
    assert (await c.get("/v2/models/digits-a/ready")).json()["ready"] is True
    assert (await c.get("/v2/models/digits-a/versions/2/ready")).json()["ready"] is True

    r = await c.post("/v2/models/digits-a/infer", json=v2_body(bundles.x))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "r1" and [o["name"] for o in out["outputs"]] == ["probabilities"]
    probs = np.array(out["outputs"][0]["data"]).reshape(out["outputs"][0]["shape"])
    np.testing.assert_allclose(probs, load_bundle(bundles.a2).predict(bundles.x), rtol=1e-5, atol=1e-6)

    token = svc.key(("distill",))
    r = await c.post("/v2/models/digits-a/versions/1/infer", json=v2_body(bundles.x, "probabilities", "distill_logits"),
                     headers=svc.auth(token))
    assert r.status_code == 200, r.text
    outs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    ref = load_bundle(bundles.a, svc.settings.master_key)
    np.testing.assert_allclose(outs["distill_logits"], ref.distill_logits(bundles.x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outs["probabilities"], ref.predict(bundles.x), rtol=1e-5, atol=1e-6)
    # the infer routes read their path parameters themselves: checked as every route's are, in the v2 form
    for path in ("/v2/models/digits%00a/infer", "/v2/models/digits-a/versions/1%00/infer"):
        r = await c.post(path, json=v2_body(bundles.x))
        assert r.status_code == 422 and "a NUL character is not allowed" in r.json()["error"], r.text
    r = await c.post("/v2/models/no-such/versions/1/infer", json=v2_body(bundles.x))
    assert r.status_code == 404 and isinstance(r.json()["error"], str), r.text
    for path in ("/v1/models/digits%00a/predict", "/v1/models/digits%00a/distill"):  # v1's read them the same way
        r = await c.post(path, json={"inputs": bundles.x.tolist()}, headers=svc.auth(token))
        assert r.status_code == 422 and r.json()["error"] == {
            "code": "invalid_request", "message": "path.name: a NUL character is not allowed"}, r.text


async def test_keys_create_list_revoke(svc):
    c = svc.client
    r = await c.post("/v1/keys", json={"scopes": ["distill"], "models": ["digits-a"], "quota": 10,
                                       "expires_days": 1, "name": "alice"}, headers=svc.admin)
    assert r.status_code == 201, r.text
    created = r.json()
    token = created["key"]
    assert token.startswith(f"sdb_{created['id']}_") and created["scopes"] == ["distill"]
    listed = (await c.get("/v1/keys", headers=svc.admin)).json()["keys"]
    assert created["id"] in {k["id"] for k in listed}
    assert token not in (await c.get("/v1/keys", headers=svc.admin)).text
    assert all("secret" not in k and "key" not in k for k in listed)
    x = {"inputs": np.zeros((1, 1, 8, 8)).tolist()}
    assert (await c.post("/v1/models/digits-a/distill", json=x, headers=svc.auth(token))).status_code == 200
    r = await c.delete(f"/v1/keys/{created['id']}", headers=svc.admin)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    r = await c.post("/v1/models/digits-a/distill", json=x, headers=svc.auth(token))
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"
    assert (await c.delete("/v1/keys/nope", headers=svc.admin)).status_code == 404


async def test_keys_create_refuses_a_policy_that_would_do_nothing(svc):
    """Accepted before: an allowlist of no model (a key no model answers), a quota on a key that is never served what
    it meters (it may not distill), and JSON's true read as the number 1 (a key expiring in a day)."""
    c = svc.client
    for body, needle in [
        ({"scopes": ["predict"], "models": []}, "models names no model"),
        ({"scopes": ["distill"], "models": [" "]}, "models names no model"),
        ({"scopes": ["predict"], "quota": 5}, "a quota meters the samples served on the keyed path (distill)"),
        ({"scopes": ["jobs", "deploy"], "quota": 5, "quota_window_s": 60}, "add the distill scope"),
        ({"scopes": ["distill"], "expires_days": True}, "expires_days takes a number, not true"),
        ({"scopes": ["distill"], "quota": True}, "quota takes a number, not true"),
        ({"scopes": ["distill"], "quota": 5, "quota_window_s": False}, "quota_window_s takes a number, not false"),
    ]:
        r = await c.post("/v1/keys", json=body, headers=svc.admin)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (body, r.text)
        assert needle in r.json()["error"]["message"], (body, r.text)
    assert len((await c.get("/v1/keys", headers=svc.admin)).json()["keys"]) == 1  # the admin's own alone
    for body in ({"scopes": ["admin"], "quota": 5}, {"scopes": ["distill"], "quota": 5, "expires_days": 1}):
        r = await c.post("/v1/keys", json=body, headers=svc.admin)  # admin may distill: its quota meters that
        assert r.status_code == 201 and r.json()["quota"] == 5, r.text


async def test_admin_add_and_remove_model(svc, bundles):
    c = svc.client
    r = await c.delete("/v1/models/digits-a", params={"version": "2"}, headers=svc.admin)
    assert r.json() == {"removed": [{"name": "digits-a", "version": "2"}]}
    assert (await c.get("/v1/models/digits-a")).json()["version"] == "1"
    assert (await c.delete("/v1/models/digits-b", headers=svc.admin)).status_code == 200
    assert (await c.get("/v1/models/digits-b")).status_code == 404
    # a version number is never given twice: version 1 of digits-b was another deploy
    r = await deploy(c, bundles.b, svc.admin)
    assert r.status_code == 201 and (r.json()["name"], r.json()["version"]) == ("digits-b", "2")
    r = await deploy(c, bundles.b, svc.admin)  # the same bundle again is the next version, never a clash
    assert r.status_code == 201 and r.json()["version"] == "3" and r.json()["versions"] == ["2", "3"]
    x = {"inputs": np.zeros((1, 1, 8, 8)).tolist()}
    assert (await c.post("/v1/models/digits-b/predict", json=x)).status_code == 200


def binary_body(header: dict, *tensors: np.ndarray) -> tuple[bytes, dict]:
    head = orjson.dumps(header)
    return head + b"".join(t.tobytes() for t in tensors), {"Inference-Header-Content-Length": str(len(head)),
                                                          "Content-Type": "application/octet-stream"}


def binary_outputs(r) -> dict[str, np.ndarray]:
    """A response's outputs by name, whether each came as JSON data or as bytes after the header."""
    n = int(r.headers.get("Inference-Header-Content-Length", len(r.content)))
    header, offset, out = orjson.loads(r.content[:n]), n, {}
    for o in header["outputs"]:
        dtype = {"FP32": "<f4", "INT64": "<i8"}[o["datatype"]]
        if "data" in o:
            out[o["name"]] = np.array(o["data"], dtype).reshape(o["shape"])
            continue
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(r.content[offset:offset + size], dtype).reshape(o["shape"])
        offset += size
    assert offset == len(r.content)
    return out


async def test_v2_binary_tensor_extension(svc, bundles):
    c, x = svc.client, bundles.x
    assert "binary_tensor_data" in (await c.get("/v2")).json()["extensions"]
    token = svc.key(("distill",))
    header = {"id": "b1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                      "parameters": {"binary_data_size": x.nbytes}}],
              "outputs": [{"name": "distill_logits", "parameters": {"binary_data": True}},
                          {"name": "probabilities", "parameters": {"binary_data": False}}]}
    content, headers = binary_body(header, x)
    r = await c.post("/v2/models/digits-a/versions/1/infer", content=content, headers={**headers, **svc.auth(token)})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    outs = binary_outputs(r)
    ref = load_bundle(bundles.a, svc.settings.master_key)
    np.testing.assert_allclose(outs["distill_logits"], ref.distill_logits(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outs["probabilities"], ref.predict(x), rtol=1e-5, atol=1e-6)
    # JSON inputs may ask for binary outputs (binary_data_output: every output unless it says otherwise)
    body = {**v2_body(x), "parameters": {"binary_data_output": True}}
    r = await c.post("/v2/models/digits-a/versions/1/infer", json=body)
    assert r.status_code == 200 and "Inference-Header-Content-Length" in r.headers
    np.testing.assert_array_equal(binary_outputs(r)["probabilities"], outs["probabilities"])
    # a keyed output asked in binary without a key: refused like JSON, nothing in the body
    r = await c.post("/v2/models/digits-a/infer", content=content, headers=headers)
    assert r.status_code == 401 and set(r.json()) == {"error"}
