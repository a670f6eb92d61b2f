"""What the console reads beside the resource routes (service/routes/account.py), and how the console
itself is served (service/routes/console.py): in process, on a real store.

Run as a module (``python -m tests.service.test_console_api``) it writes the console's sample images,
the test images :func:`expected_samples` describes; the test below checks the committed ones against it.
"""
from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
from PIL import Image

from service.jobs.kinds import KINDS, get_kind
from service.routes.console import CONSOLE_DIR, STATIC_DIR

pytestmark = pytest.mark.anyio
SAMPLES = STATIC_DIR / "samples"
SAMPLE_SETS = ("digits", "mnist-5k")


def png(x: np.ndarray) -> bytes:
    """A (1, H, W) image in [0, 1] as a grayscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(x[0] * 255), 0, 255).astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ who am I
@pytest.mark.usefixtures("db_url")
async def test_me_is_the_key_and_its_quota_use_never_its_secret(svc, bundles):
    token = svc.key(("distill",), models=["digits-a"], quota=100, name="lab-7")
    r = await svc.client.post("/v1/models/digits-a/distill", json={"inputs": bundles.x[:3].tolist()},
                              headers=svc.auth(token))
    assert r.status_code == 200, r.text
    r = await svc.client.get("/v1/keys/me", headers=svc.auth(token))
    assert r.status_code == 200, r.text
    me = r.json()
    key_id, secret = token.split("_")[1:]
    assert (me["id"], me["name"], me["scopes"], me["models"]) == (key_id, "lab-7", ["distill"], ["digits-a"])
    assert me["quota"] == 100 and me["quota_used"] == 3 and me["revoked_at"] is None
    assert secret not in r.text and "hash" not in r.text
    # a window that rolled over counts nothing; the lifetime quota above counts every sample
    windowed = svc.key(("distill",), quota=50, quota_window_s=1)
    await svc.client.post("/v1/models/digits-a/distill", json={"inputs": bundles.x[:2].tolist()},
                          headers=svc.auth(windowed))
    assert (await svc.client.get("/v1/keys/me", headers=svc.auth(windowed))).json()["quota_used"] in (0, 2)
    await anyio.sleep(1.05)
    assert (await svc.client.get("/v1/keys/me", headers=svc.auth(windowed))).json()["quota_used"] == 0

    assert (await svc.client.get("/v1/keys/me")).status_code == 401
    assert (await svc.client.delete(f"/v1/keys/{key_id}", headers=svc.admin)).status_code == 200
    r = await svc.client.get("/v1/keys/me", headers=svc.auth(token))
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"


# ------------------------------------------------------------------------------------------ usage
@pytest.mark.usefixtures("db_url")
async def test_usage_per_day_admin_sees_every_key_others_their_own(svc, bundles):
    one, two = svc.key(("distill",), quota=1000), svc.key(("distill",))
    for token, n, model in ((one, 3, "digits-a"), (one, 2, "digits-b"), (two, 4, "digits-a")):
        r = await svc.client.post(f"/v1/models/{model}/distill", json={"inputs": bundles.x[:n].tolist()},
                                  headers=svc.auth(token))
        assert r.status_code == 200, r.text
    r = await svc.client.post("/v1/models/digits-a/predict", json={"inputs": bundles.x[:5].tolist()},
                              headers=svc.auth(one))
    assert r.status_code == 200
    svc.app.state.keyring.flush()  # the usage statistics are written behind
    today = time.strftime("%Y-%m-%d", time.gmtime())
    id_one, id_two = one.split("_")[1], two.split("_")[1]

    mine = (await svc.client.get("/v1/usage", headers=svc.auth(one))).json()
    assert {(u["model"], u["kind"], u["samples"], u["requests"], u["key_id"], u["day"]) for u in mine["usage"]} == {
        ("digits-a", "distill", 3, 1, id_one, today), ("digits-b", "distill", 2, 1, id_one, today),
        ("digits-a", "predict", 5, 1, id_one, today)}
    assert mine["keys"] == [{"key_id": id_one, "quota": 1000, "quota_window_s": None, "quota_used": 5}]
    only_a = (await svc.client.get("/v1/usage", params={"model": "digits-b"}, headers=svc.auth(one))).json()
    assert [(u["model"], u["samples"]) for u in only_a["usage"]] == [("digits-b", 2)]
    r = await svc.client.get("/v1/usage", params={"key_id": id_two}, headers=svc.auth(one))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_scope"

    every = (await svc.client.get("/v1/usage", params={"model": "digits-a"}, headers=svc.admin)).json()
    assert sorted((u["key_id"], u["kind"], u["samples"]) for u in every["usage"]) == sorted(
        [(id_one, "distill", 3), (id_one, "predict", 5), (id_two, "distill", 4)])
    assert {k["key_id"] for k in every["keys"]} == {id_one, id_two}  # the keys it names: not every key's quota
    assert {k["key_id"] for k in (await svc.client.get("/v1/usage", headers=svc.admin)).json()["keys"]} > {
        id_one, id_two}  # every key's, the admin's own among them (the keys page reads their quotas)
    old_day = (await svc.client.get("/v1/usage", params={"days": 1}, headers=svc.auth(one))).json()
    assert len(old_day["usage"]) == 3  # today's: the day filter is the database's now
    theirs = (await svc.client.get("/v1/usage", params={"key_id": id_two}, headers=svc.admin)).json()
    assert [u["samples"] for u in theirs["usage"]] == [4] and [k["key_id"] for k in theirs["keys"]] == [id_two]
    assert (await svc.client.get("/v1/usage", params={"days": 0}, headers=svc.admin)).status_code == 422
    assert (await svc.client.get("/v1/usage")).status_code == 401


# ------------------------------------------------------------------------------------------ job kinds
async def test_job_kinds_are_the_schemas_the_jobs_api_validates_with(svc):
    jobs = svc.key(("jobs",))
    r = await svc.client.get("/v1/job-kinds", headers=svc.auth(jobs))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [k["name"] for k in body["kinds"]] == sorted(KINDS.names())
    for k in body["kinds"]:  # the pydantic model itself, not a copy of it
        assert k["params_schema"] == get_kind(k["name"]).params.model_json_schema()
        assert k["description"] and "``" not in k["description"]
    assert "digits" in body["datasets"] and "npz" not in body["datasets"] and "cnn" in body["architectures"]
    wrap = next(k["params_schema"] for k in body["kinds"] if k["name"] == "wrap")
    assert set(wrap["required"]) == {"data", "teacher"}
    # what the schema requires is what the API asks for, and what it allows the API takes (queued, not run)
    r = await svc.client.post("/v1/jobs", json={"kind": "wrap", "params": {}}, headers=svc.auth(jobs))
    assert r.status_code == 422 and all(f"params.{f}: Field required" in r.json()["error"]["message"]
                                        for f in wrap["required"])
    r = await svc.client.post("/v1/jobs", json={"kind": "wrap", "params": {"data": "digits", "teacher": {"arch": "cnn"}}},
                              headers=svc.auth(jobs))
    assert r.status_code == 202, r.text
    r = await svc.client.get("/v1/job-kinds", headers=svc.auth(svc.key(("predict",))))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_scope"


async def test_a_model_field_lists_only_the_sources_its_kind_takes(svc):
    """A wrap's teacher listed ``model`` and ``version`` (a hosted model), which it always refuses: the console drew
    them in its form and a generated client offered them. A kind that takes hosted models keeps them."""
    r = await svc.client.get("/v1/job-kinds", headers=svc.auth(svc.key(("jobs",))))
    schemas = {k["name"]: k["params_schema"] for k in r.json()["kinds"]}
    teacher = schemas["wrap"]["$defs"]["WrapTeacher"]["properties"]
    assert "model" not in teacher and "version" not in teacher and {"file", "arch"} <= teacher.keys()
    assert {"model", "version", "file"} <= schemas["distill"]["$defs"]["ModelParam"]["properties"].keys()


# ------------------------------------------------------------------------------------------ image → inputs
async def test_image_inputs_are_what_predict_makes_of_the_image(svc, bundles):
    x = bundles.x[:1] * 0.3081 + 0.1307  # any picture in [0, 1]: the exact pixels do not matter
    image = png(np.clip(x[0], 0, 1))
    r = await svc.client.post("/v1/models/digits-a/inputs?version=1", files={"file": ("d.png", image, "image/png")})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["model"] == "digits-a" and got["version"] == "1" and got["shape"] == [1, 1, 8, 8]
    by_json = await svc.client.post("/v1/models/digits-a/predict?version=1", json={"inputs": got["inputs"], "top_k": 10})
    by_image = await svc.client.post("/v1/models/digits-a/predict?version=1", files={"file": ("d.png", image, "image/png")},
                                     data={"top_k": "10"})
    assert by_json.json() == by_image.json()
    raw = await svc.client.post("/v1/models/digits-a/inputs", content=image, headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["version"] == "2"
    # several images, as predict takes them (the last alone came back)
    other = png(np.clip(bundles.x[1, 0] * 0.3081 + 0.1307, 0, 1))
    two = await svc.client.post("/v1/models/digits-a/inputs", files=[("file", ("a.png", image, "image/png")),
                                                                      ("file", ("b.png", other, "image/png"))])
    assert two.status_code == 200 and two.json()["shape"] == [2, 1, 8, 8], two.text
    assert two.json()["inputs"][0] == raw.json()["inputs"][0] and two.json()["inputs"][1] != raw.json()["inputs"][0]
    many = [("file", (f"{i}.png", image, "image/png")) for i in range(svc.settings.max_request_samples + 1)]
    r = await svc.client.post("/v1/models/digits-a/inputs", files=many)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_samples", r.text

    bad = await svc.client.post("/v1/models/digits-a/inputs", files={"file": ("x.png", b"not an image", "image/png")})
    assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_image"
    assert (await svc.client.post("/v1/models/digits-a/inputs", json={"inputs": []})).status_code == 415
    r = await svc.client.post("/v1/models/digits-a/inputs", files={"note": (None, "no image here")})  # multipart, no file
    assert r.status_code == 422 and "no image" in r.json()["error"]["message"]
    r = await svc.client.post("/v1/models/nope/inputs", files={"file": ("d.png", image, "image/png")})
    assert r.status_code == 404


async def test_image_inputs_follow_predict_when_predict_needs_a_key(tmp_path, bundles):
    from .conftest import make_settings, start_service

    service, manager = await start_service(make_settings(tmp_path / "data", bundles, public_predict=False), bundles.a)
    try:
        image = png(np.zeros((1, 8, 8)))
        r = await service.client.post("/v1/models/digits-a/inputs", files={"file": ("d.png", image, "image/png")})
        assert r.status_code == 401
        other = service.key(("predict",), models=["digits-b"])
        r = await service.client.post("/v1/models/digits-a/inputs", files={"file": ("d.png", image, "image/png")},
                                      headers=service.auth(other))
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    finally:
        await service.client.aclose()
        await manager.__aexit__(None, None, None)


# ------------------------------------------------------------------------------------------ the console
async def test_console_is_served_with_a_strict_policy_and_no_inline_code(svc):
    pages = [await svc.client.get(p) for p in ("/", "/console")]
    for r in pages:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe" not in csp and r.headers["x-content-type-options"] == "nosniff"
    html = pages[0].text
    assert pages[1].text == html
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.DOTALL)
    assert scripts and all(body.strip() == "" for body in scripts)  # no inline script
    assert not re.search(r"\son[a-z]+\s*=|\sstyle\s*=|javascript:", html, re.IGNORECASE)  # no handlers or styles inline
    refs = re.findall(r"""(?:src|href)="([^"#]+)\"""", html)
    assert refs and all(ref.startswith("/console/static/") for ref in refs), refs  # nothing from elsewhere

    total = len(pages[0].content)
    assets = sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())
    for p in assets:
        rel = p.relative_to(STATIC_DIR).as_posix()
        r = await svc.client.get(f"/console/static/{rel}")
        assert r.status_code == 200 and r.content == p.read_bytes(), rel
        assert "default-src 'self'" in r.headers["content-security-policy"]
        if p.suffix == ".js":
            assert r.headers["content-type"].startswith("text/javascript")
            src = p.read_text()
            # everything the API returns goes in as text: no HTML parsing of data, no code from strings
            assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function", src), rel
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", src), rel  # no URL elsewhere
            assert "localStorage" not in src and "document.cookie" not in src, rel
        if "samples/" not in rel:
            total += len(r.content)
    assert total < 300_000, total  # the first load (the samples load when a model's "try it" shows)
    etag = pages[0].headers["etag"]  # revalidated on each load; an unchanged file is a 304 without a body
    again = await svc.client.get("/", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and "frame-ancestors 'none'" in again.headers["content-security-policy"]
    for bad in ("/console/static/nope.js", "/console/static/../routes/console.py", "/console/static/%2e%2e/index.html",
                "/console/static/"):
        assert (await svc.client.get(bad)).status_code == 404, bad
    assert (CONSOLE_DIR / "index.html").is_file()


async def test_the_page_is_a_304_for_its_etag_made_weak_by_a_compressing_proxy(svc):
    """Behind nginx's gzip the ETag reaches the browser weak (W/"..."), which it sends back: compared exactly, the
    console page was sent whole on every load. If-None-Match compares weakly, and takes a list or "*"."""
    page = await svc.client.get("/")
    etag = page.headers["etag"]
    for held in (f"W/{etag}", f'"0123", W/{etag}', f'{etag},"other"', "*"):
        r = await svc.client.get("/", headers={"If-None-Match": held})
        assert r.status_code == 304 and r.content == b"", held
    for other in ('W/"0123"', '"0123", W/"4567"', etag.strip('"')):  # another version's, or a tag without its quotes
        assert (await svc.client.get("/", headers={"If-None-Match": other})).status_code == 200, other
    js = await svc.client.get("/console/static/lib.js")
    assert (await svc.client.get("/console/static/lib.js", headers={"If-None-Match": "W/" + js.headers["etag"]})
            ).status_code == 304


def expected_samples() -> dict:
    """The console's test images: the first test-split image of each class of each embedded set, as PNG."""
    from sdb_core.data import load_dataset

    sets = []
    for name in SAMPLE_SETS:
        d = load_dataset(name)
        x, y = (t.numpy() for t in d.test.tensors)
        mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (d.mean, d.std))
        pixels = x * std + mean  # the loader's [0, 1] pixels
        samples = []
        for c, label in enumerate(d.labels):
            i = int(np.flatnonzero(y == c)[0])
            samples.append({"file": f"{name}-{label}.png", "label": label, "index": i, "pixels": pixels[i]})
        sets.append({"name": name, "shape": list(d.in_shape), "samples": samples})
    return {"sets": sets}


def test_sample_images_are_test_images_of_the_embedded_sets():
    index = json.loads((SAMPLES / "index.json").read_text())
    want = expected_samples()
    strip = [{**st, "samples": [{k: v for k, v in s.items() if k != "pixels"} for s in st["samples"]]}
             for st in want["sets"]]
    assert index["sets"] == strip
    for st in want["sets"]:
        for s in st["samples"]:
            got = np.asarray(Image.open(SAMPLES / s["file"]), np.float32) / 255.0
            np.testing.assert_allclose(got, s["pixels"][0], atol=0.5 / 255 + 1e-6)


def write_samples(out: Path = SAMPLES) -> None:
    want = expected_samples()
    out.mkdir(parents=True, exist_ok=True)
    for st in want["sets"]:
        for s in st["samples"]:
            (out / s["file"]).write_bytes(png(s.pop("pixels")))
    (out / "index.json").write_text(json.dumps(want, indent=1) + "\n")


if __name__ == "__main__":
    write_samples()
