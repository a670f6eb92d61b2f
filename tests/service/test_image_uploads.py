"""Every route that decodes an uploaded image refuses one built to cost far more than its size before decoding it,
fast, with its usual error (sdb_core.pixels.image_layout): a progressive JPEG of one tiny scan repeated (a 373 KB
one took 8-12 s of CPU on predict), a PNG of hundreds of thousands of empty chunks, a JPEG of as many comments
(seconds of Python holding the GIL: every other caller waited). Real files are served as before; a transparent
canvas reads as shown on white."""
from __future__ import annotations

import io
import json
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from ..core.test_image_decoding import (
    FAST_S,
    _canvases,
    _real_files,
    jpeg_of_comments,
    png_of_chunks,
    scan_bomb,
)
from .test_files_api import assert_refused

pytestmark = pytest.mark.anyio

PREDICT = "/v1/models/digits-a/predict"
INPUTS = "/v1/models/digits-a/inputs"
V2_INFER = "/v2/models/digits-a/infer"
SCAN_BOMB = scan_bomb(4000, 1000)  # 37 KB, ~1.1 s of CPU to decode (10,000 scans: 8-12 s)
COSTLY = {"scans": (SCAN_BOMB, "image/jpeg", "more than 100 scans"),
          "chunks": (png_of_chunks(100_000), "image/png", "more than 4096 chunks"),
          "comments": (jpeg_of_comments(200_000), "image/jpeg", "more than 4096 markers")}


def _v2_bytes(image: bytes) -> dict:
    head = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4 + len(image)}}]}).encode()
    raw = len(image).to_bytes(4, "little") + image
    return {"content": head + raw, "headers": {"Inference-Header-Content-Length": str(len(head))}}


@pytest.mark.parametrize("kind", sorted(COSTLY))
async def test_a_costly_image_is_refused_fast_by_every_route_that_decodes_images(svc, kind):
    data, content_type, words = COSTLY[kind]
    c = svc.client
    for path, kwargs in ((PREDICT, {"content": data, "headers": {"content-type": content_type}}),
                         (PREDICT, {"files": {"file": ("x", data, content_type)}}),
                         (INPUTS, {"files": {"file": ("x", data, content_type)}}),
                         (V2_INFER, _v2_bytes(data))):
        start = time.perf_counter()
        r = await c.post(path, **kwargs)
        assert time.perf_counter() - start < FAST_S
        assert r.status_code == 415, r.text
        message = r.json()["error"] if path == V2_INFER else r.json()["error"]["message"]
        assert words in message and "save it again" in message, message
    assert (await c.post(PREDICT, files={"file": ("x.png", _real_files()["digits-3.png"], "image/png")})).status_code \
        == 200


async def test_uploaded_images_and_image_folders_refuse_a_costly_image(svc):
    h = svc.auth(svc.key(("jobs",)))
    start = time.perf_counter()
    await assert_refused(svc, h, SCAN_BOMB, "image", "invalid_image", ["x.jpg", "more than 100 scans"], "x.jpg")
    assert time.perf_counter() - start < FAST_S
    good = _real_files()["digits-3.png"]
    folder = io.BytesIO()
    with zipfile.ZipFile(folder, "w") as z:
        for n in range(3):
            z.writestr(f"cat/{n}.png", good)
            z.writestr(f"dog/{n}.png", good)
        z.writestr("dog/comments.jpg", jpeg_of_comments(200_000))
    await assert_refused(svc, h, folder.getvalue(), "dataset", "invalid_dataset",
                         ["d.zip: dog/comments.jpg", "more than 4096 markers"], "d.zip")


async def test_real_images_are_served(svc):
    for name, data in _real_files().items():
        r = await svc.client.post(PREDICT, files={"file": (name, data, "image/png")})
        assert r.status_code == 200, (name, r.text)


async def _inputs(svc, *images: bytes) -> np.ndarray:
    r = await svc.client.post(INPUTS, files=[("file", (f"{n}", im, "image/png")) for n, im in enumerate(images)])
    assert r.status_code == 200, r.text
    return np.array(r.json()["inputs"])


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


async def test_a_drawing_on_a_transparent_canvas_is_read_as_the_console_shows_it(svc):
    """<canvas>.toBlob() gives black ink on transparent pixels: its colour channels alone were black on black."""
    canvas = _canvases()["RGBA"]
    shown = Image.alpha_composite(Image.new("RGBA", canvas.size, "white"), canvas).convert("L")
    x = await _inputs(svc, _png(canvas), _png(shown))
    np.testing.assert_array_equal(x[0], x[1])
    assert np.unique(x[0]).size > 2  # not uniform


async def test_bytes_in_json_say_where_images_go(svc):
    body = {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["iVBORw0KGgo="]}]}
    r = await svc.client.post(V2_INFER, json=body)
    assert r.status_code == 415, r.text
    assert "not a readable PNG or JPEG" in r.json()["error"] and "binary tensor extension" in r.json()["error"]
