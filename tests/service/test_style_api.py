"""``POST /v1/style/{name}`` on real style bundles, and the ``style`` job kind end to end."""
from __future__ import annotations

import base64
import io
import json
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from sdb_client import BadRequest, Client
from torch import nn

from sdb_core.bundle import export_bundle
from sdb_core.protect.key import load_or_create_master_key
from sdb_core.style import adain, fast
from sdb_core.style.export import export_style_bundle
from sdb_core.style.loss_net import LossNetConfig

from ..core.test_image_decoding import FAST_S, scan_bomb
from .conftest import make_settings, start_service
from .jobs_helpers import JobServer, key, prepare, upload, wait_for

TINY_NET = LossNetConfig(width=0.125)


@pytest.fixture(scope="module")
def style_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("style")
    load_or_create_master_key(root / "master.key")  # before any server or worker process could race for it
    f = fast.train(fast.FastConfig(size=32, crop=32, epochs=1, samples=8, channels=4, res_blocks=1,
                                   loss_net=TINY_NET))
    a = adain.train(adain.AdaINConfig(size=32, crop=32, epochs=1, samples=8, styles=("flower",), loss_net=TINY_NET))
    with torch.no_grad():  # two steps leave the decoder's output below 0, all black once clamped: centre it
        a.net.decoder.stages[-1][-1][-1].bias.fill_(0.5)
    for trained in (f, a):  # trained where the recipes run (CUDA when there is one); the references run on CPU
        trained.net.cpu()
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    return SimpleNamespace(
        master_key_file=root / "master.key", fast=f, adain=a,
        fast_path=export_style_bundle(f, root / "fast.sdb", name="mosaic", style_name="flower", size=32),
        adain_path=export_style_bundle(a, root / "adain.sdb", name="anystyle", size=32),
        classifier_path=export_bundle(classifier, root / "cls.sdb", name="tiny-cls", in_shape=(3, 2, 2),
                                      mean=(0, 0, 0), std=(1, 1, 1), labels=["a", "b", "c"]))


@pytest.fixture
async def svc(tmp_path, style_bundles):
    b = style_bundles
    service, manager = await start_service(make_settings(tmp_path / "data", b), b.fast_path, b.adain_path,
                                           b.classifier_path)
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


def _png(h: int, w: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), rng.integers(0, 256, (h, w))], -1)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue(), arr.astype(np.float32).transpose(2, 0, 1) / 255.0


def _torch_reference(fn, x: np.ndarray, multiple: int, *more) -> np.ndarray:
    """What PyTorch gives on the same padded input, cropped back and rounded to 8 bits."""
    h, w = x.shape[-2:]

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a[None], ((0, 0), (0, 0), (0, -a.shape[-2] % multiple), (0, -a.shape[-1] % multiple)),
                      mode="reflect")

    with torch.no_grad():
        y = fn(torch.from_numpy(pad(x)), *(torch.from_numpy(pad(m)) for m in more))[0, :, :h, :w].numpy()
    return (np.clip(y, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def _decode(content: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(content))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


@pytest.mark.anyio
async def test_fast_bundle_returns_a_png_of_the_input_size_matching_pytorch(svc, style_bundles):
    for h, w in ((40, 52), (37, 50)):  # a multiple of 4, and a size the service pads and crops back
        data, x = _png(h, w)
        r = await svc.client.post("/v1/style/mosaic", files={"file": ("c.png", data, "image/png")})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        out = _decode(r.content)
        assert out.shape == (h, w, 3)
        ref = _torch_reference(style_bundles.fast.net.eval(), x, 4)
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    r = await svc.client.post("/v1/style/mosaic", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200 and _decode(r.content).shape == (37, 50, 3)


@pytest.mark.anyio
async def test_adain_bundle_takes_a_style_image_and_alpha(svc, style_bundles):
    content, x = _png(48, 40, 1)
    style, s = _png(32, 56, 2)
    net = style_bundles.adain.net.eval()
    body = {"image": base64.b64encode(content).decode(), "style": base64.b64encode(style).decode(), "alpha": 0.5}
    r = await svc.client.post("/v1/style/anystyle", json=body)
    assert r.status_code == 200, r.text
    out = _decode(r.content)
    assert out.shape == (48, 40, 3)
    ref = _torch_reference(lambda c, st: net(c, st, torch.tensor([0.5])), x, style_bundles.adain.multiple, s)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    # alpha changes the result; multipart with alpha as a field works the same way
    r0 = await svc.client.post("/v1/style/anystyle", data={"alpha": "0"},
                               files={"file": ("c.png", content, "image/png"), "style": ("s.png", style, "image/png")})
    assert r0.status_code == 200, r0.text
    assert np.abs(_decode(r0.content).astype(int) - out.astype(int)).max() > 0
    assert len(np.unique(out)) > 10  # a real image, not a constant one


@pytest.mark.anyio
async def test_bad_requests_get_clear_errors(svc):
    content, _ = _png(32, 32)
    style, _ = _png(32, 32, 3)
    c = svc.client

    async def err(path, **kw):
        r = await c.post(path, **kw)
        return r.status_code, r.json()["error"]["code"], r.json()["error"]["message"]

    status, code, msg = await err("/v1/style/anystyle", files={"file": ("c.png", content, "image/png")})
    assert (status, code) == (422, "missing_style") and "style image" in msg
    status, code, _ = await err("/v1/style/mosaic", files={"file": ("c.png", content, "image/png"),
                                                           "style": ("s.png", style, "image/png")})
    assert (status, code) == (422, "unexpected_style")
    big, _ = _png(20, 1100)
    status, code, msg = await err("/v1/style/mosaic", files={"file": ("c.png", big, "image/png")})
    assert (status, code) == (413, "image_too_large") and "1024" in msg
    tiny, _ = _png(8, 40)
    assert (await err("/v1/style/mosaic", files={"file": ("c.png", tiny, "image/png")}))[:2] == (422, "image_too_small")
    assert (await err("/v1/style/mosaic", files={"file": ("c.png", b"not an image", "image/png")}))[:2] == \
        (415, "unsupported_image")
    assert (await err("/v1/style/anystyle", json={"image": "%%%", "style": "AAAA"}))[:2] == (422, "invalid_request")
    assert (await err("/v1/style/anystyle", json={"image": base64.b64encode(content).decode(),
                                                  "style": base64.b64encode(style).decode(), "alpha": 2}))[0] == 422
    assert (await err("/v1/style/no-such", files={"file": ("c.png", content, "image/png")}))[0] == 404
    # one content image a request: the last of two was styled without a word
    status, code, msg = await err("/v1/style/mosaic", files=[("file", ("a.png", content, "image/png")),
                                                             ("file", ("b.png", content, "image/png"))])
    assert (status, code) == (422, "invalid_request") and "'file' is sent 2 times" in msg
    status, code, msg = await err("/v1/style/tiny-cls", files={"file": ("c.png", content, "image/png")})
    assert (status, code) == (400, "wrong_task") and "not a style model" in msg
    # and the classification paths refuse a style bundle, naming the route that serves it
    status, code, msg = await err("/v1/models/mosaic/predict", json={"inputs": [[0.0]]})
    assert (status, code) == (400, "wrong_task") and "POST /v1/style/mosaic" in msg
    r = await c.post("/v2/models/mosaic/infer", json={"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                                                                 "data": [0.0]}]})
    assert r.status_code == 400 and r.json() == {"error": "model 'mosaic' is a style model: POST /v1/style/mosaic"}
    r = await c.get("/v1/models/anystyle")
    assert r.status_code == 200 and r.json()["task"] == "style"


def test_style_jobs_write_their_artifacts_and_a_deployed_bundle_is_served(tmp_path, style_bundles):
    data = tmp_path / "data"
    settings = prepare(data, style_bundles)
    s = JobServer(data, style_bundles, SDB_WORKERS="1")
    try:
        token = key(settings, ["jobs"])
        (tmp_path / "style.png").write_bytes(_png(40, 40, 7)[0])
        style = upload(s.url, token, tmp_path / "style.png", "image")  # an uploaded style image, by its id
        with Client(s.url, token) as c:
            g = c.jobs.submit("style", {"method": "gatys", "size": 32, "steps": 3, "style": style})
            f = c.jobs.submit("style", {"method": "fast", "size": 32, "crop": 32, "epochs": 1, "samples": 4,
                                        "name": "job-mosaic", "deploy": True})
            with pytest.raises(BadRequest, match="server paths are for admin keys"):  # 422 before queueing
                c.jobs.submit("style", {"method": "gatys", "style": "../secret.png"})
            with pytest.raises(BadRequest, match="uploaded as image"):  # an image is not the loss net's weights
                c.jobs.submit("style", {"method": "gatys", "weights": style})
            with pytest.raises(BadRequest):
                c.jobs.submit("style", {"method": "gatys", "deploy": True})
            job = c.jobs.wait(g["id"], timeout=120, poll_s=0.2)
            assert job["status"] == "succeeded", job
            names = {a["name"] for a in c.jobs.artifacts(g["id"])}
            assert {"stylized.png", "sheet.png", "report.json"} <= names and "bundle.sdb" not in names
            report = json.loads(c.jobs.download(g["id"], "report.json", tmp_path).read_text())
            assert report["loss_network"]["kind"] == "random-vgg19"
            assert {"content_loss", "style_loss", "style_loss_cut"} <= set(report["losses"])
            assert report["timings"]["total_seconds"] > 0
            job = c.jobs.wait(f["id"], timeout=120, poll_s=0.2)
            assert job["status"] == "succeeded", job
            assert job["result"]["deployed"] and job["result"]["model"] == "job-mosaic"
            assert "bundle.sdb" in {a["name"] for a in c.jobs.artifacts(f["id"])}
        data_png, _ = _png(24, 36)

        def served():  # the API process picks the deployed row up on its next model sync
            r = httpx.post(f"{s.url}/v1/style/job-mosaic", files={"file": ("c.png", data_png, "image/png")})
            return r if r.status_code != 404 else None

        r = wait_for(served, 30, "the deployed style model is served", every=0.2)
        assert r.status_code == 200, r.text
        assert _decode(r.content).shape == (24, 36, 3)
    finally:
        s.stop()


async def _styled_alike(svc, a: bytes, b: bytes) -> None:
    """Two PNGs styled by /v1/style/mosaic come out the same, within a level of rounding."""
    outs = []
    for data in (a, b):
        r = await svc.client.post("/v1/style/mosaic", files={"file": ("i.png", data, "image/png")})
        assert r.status_code == 200, r.text
        outs.append(_decode(r.content).astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1


@pytest.mark.anyio
async def test_images_are_read_as_predict_and_the_style_jobs_read_them(svc):
    """A 16-bit PNG was read through 8 bits (white past 255/65535) where predict and the style jobs read it over its
    depth; a drawing on a transparent canvas by its colour channels alone (black on black); a progressive JPEG of
    one tiny scan repeated took seconds of CPU before it was refused or served."""
    grey = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (32, 1))
    deep, eight = io.BytesIO(), io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(deep, "PNG")
    Image.fromarray(grey).save(eight, "PNG")
    await _styled_alike(svc, deep.getvalue(), eight.getvalue())

    ink = np.zeros((32, 32, 4), np.uint8)
    ink[8:24, 14:18] = (0, 0, 0, 255)
    canvas, shown = io.BytesIO(), io.BytesIO()
    Image.fromarray(ink, "RGBA").save(canvas, "PNG")
    Image.alpha_composite(Image.new("RGBA", (32, 32), "white"), Image.fromarray(ink, "RGBA")).save(shown, "PNG")
    await _styled_alike(svc, canvas.getvalue(), shown.getvalue())

    start = time.perf_counter()
    r = await svc.client.post("/v1/style/mosaic", files={"file": ("b.jpg", scan_bomb(1024, 1000), "image/jpeg")})
    assert time.perf_counter() - start < FAST_S
    assert r.status_code == 415 and "more than 100 scans" in r.json()["error"]["message"], r.text
