"""Bad input of every kind: the right status and error body, and the next request is served."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service import tensors
from service.routes import v2

pytestmark = pytest.mark.anyio

GOOD = {"inputs": np.zeros((1, 1, 8, 8)).tolist()}
PREDICT = "/v1/models/digits-a/predict"


def gif() -> bytes:
    b = io.BytesIO()
    Image.new("L", (8, 8)).save(b, "GIF")
    return b.getvalue()


def thin_png() -> bytes:
    """A PNG within the pixel bound but longer a side than MAX_IMAGE_SIDE: resizing costs memory with the side."""
    b = io.BytesIO()
    Image.new("L", (65_537, 1)).save(b, "PNG")
    return b.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` pixels, and holding none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def blank_png(side: int = 4000) -> bytes:
    """16 MP of zeros in ~16 KB: within every per-image bound, ~0.1 s of CPU to decode."""
    b = io.BytesIO()
    Image.new("L", (side, side)).save(b, "PNG")
    return b.getvalue()


BLANK = blank_png()
TINY = blank_png(2)
SEVEN = [("file", (f"{i}.png", BLANK, "image/png")) for i in range(7)]  # 112 M pixels: over MAX_REQUEST_PIXELS


def v2_binary(datatype: str, shape: list[int], raw: bytes) -> dict:
    """A v2 infer request of the binary tensor extension: one input of ``raw`` bytes after the JSON header."""
    head = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": datatype,
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return {"content": head + raw, "headers": {"Inference-Header-Content-Length": str(len(head))}}


def bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


JSON = {"content-type": "application/json"}
V2_INFER = "/v2/models/digits-a/infer"
# (what, method, path, kwargs, status, error code; on /v2, a part of the message: the protocol's body has no code)
BAD = [
    ("not json", "post", PREDICT, {"content": b"{nope", "headers": JSON}, 400, "malformed_body"),
    ("empty body", "post", PREDICT, {"content": b"", "headers": JSON}, 400, "malformed_body"),
    ("json array", "post", PREDICT, {"json": [1, 2]}, 400, "malformed_body"),
    ("NaN literal", "post", PREDICT, {"content": b'{"inputs": [NaN]}', "headers": JSON}, 400, "malformed_body"),
    ("no inputs", "post", PREDICT, {"json": {"top_k": 1}}, 422, "invalid_input"),
    ("inputs a string", "post", PREDICT, {"json": {"inputs": "0.5"}}, 422, "invalid_input"),
    ("ragged", "post", PREDICT, {"json": {"inputs": [[0.0] * 64, [0.0] * 63]}}, 422, "invalid_shape"),
    ("strings", "post", PREDICT, {"json": {"inputs": [["a"] * 64]}}, 422, "invalid_dtype"),
    ("nulls", "post", PREDICT, {"json": {"inputs": [[None] * 64]}}, 422, "invalid_dtype"),
    ("booleans", "post", PREDICT, {"json": {"inputs": [[True] * 64]}}, 422, "invalid_dtype"),
    ("objects", "post", PREDICT, {"json": {"inputs": [{"a": 1}]}}, 422, "invalid_dtype"),
    ("empty", "post", PREDICT, {"json": {"inputs": []}}, 422, "invalid_shape"),
    ("wrong shape", "post", PREDICT, {"json": {"inputs": np.zeros((1, 3, 8, 8)).tolist()}}, 422, "invalid_shape"),
    ("beyond float32", "post", PREDICT, {"json": {"inputs": [[1e39] * 64]}}, 422, "non_finite"),
    ("too many samples", "post", PREDICT, {"json": {"inputs": np.zeros((1025, 64)).tolist()}}, 422,
     "too_many_samples"),
    # more files than the form parser takes (max_request_samples + 1): Starlette's 400 "Too many files", which no
    # client could act on (the SDK halves a batch on too_many_samples)
    *[(f"{n} images", "post", path, {"files": [("file", (f"{i}.png", TINY, "image/png")) for i in range(n)]}, 422,
       "too_many_samples") for n in (1025, 1100) for path in (PREDICT, "/v1/models/digits-a/inputs")],
    ("top_k zero", "post", PREDICT, {"json": {**GOOD, "top_k": 0}}, 422, "invalid_request"),
    ("top_k text", "post", PREDICT, {"json": {**GOOD, "top_k": "x"}}, 422, "invalid_request"),
    ("deep nesting", "post", PREDICT, {"content": b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                       "headers": JSON}, 400, "malformed_body"),
    ("unknown model", "post", "/v1/models/nope/predict", {"json": GOOD}, 404, "model_not_found"),
    ("unknown version", "get", "/v1/models/digits-a?version=9", {}, 404, "model_not_found"),
    ("unknown route", "get", "/v1/nothing", {}, 404, "not_found"),
    ("wrong method", "get", PREDICT, {}, 405, "method_not_allowed"),
    ("text body", "post", PREDICT, {"content": b"0.5", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_media_type"),
    ("garbage image", "post", PREDICT, {"files": {"file": ("x.png", b"\x89PNG garbage", "image/png")}}, 415,
     "unsupported_image"),
    ("gif image", "post", PREDICT, {"files": {"file": ("x.gif", gif(), "image/gif")}}, 415, "unsupported_image"),
    ("raw garbage jpeg", "post", PREDICT, {"content": b"\xff\xd8\xff junk", "headers": {"content-type": "image/jpeg"}},
     415, "unsupported_image"),
    # a part under another name is no sample: an image named "image" was taken for one, a text part beside the file
    # was decoded as an image (415, naming no part)
    ("an image under another field", "post", PREDICT, {"files": {"image": ("x.png", BLANK, "image/png")}}, 422,
     "invalid_request"),
    ("multipart without file", "post", PREDICT,
     {"content": b'--b\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n1\r\n--b--\r\n',
      "headers": {"content-type": "multipart/form-data; boundary=b"}}, 422, "invalid_request"),
    ("form fields alone (urlencoded)", "post", PREDICT, {"data": {"top_k": "1"}}, 415, "unsupported_media_type"),
    ("v2 int32", "post", "/v2/models/digits-a/infer",
     {"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT32", "data": [0] * 64}]}},
     422, "datatype 'INT32' is not supported"),
    ("v2 size mismatch", "post", "/v2/models/digits-a/infer",
     {"json": {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}},
     422, "data has 64 values"),
    ("v2 wrong input name", "post", "/v2/models/digits-a/infer",
     {"json": {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}},
     422, "unknown input 'x'"),
    ("v2 unknown output", "post", "/v2/models/digits-a/infer",
     {"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
               "outputs": [{"name": "secrets"}]}}, 422, "unknown output(s) ['secrets']"),
    ("v2 bad shape", "post", "/v2/models/digits-a/infer",
     {"json": {"inputs": [{"name": "input", "shape": [-1, "a"], "datatype": "FP32", "data": [0.0] * 64}]}},
     422, "shape must be a list of non-negative integers"),
    # a field missing or of the wrong type is named (the messages said None; a numeric id was dropped silently)
    ("v2 no input name", "post", V2_INFER,
     {"json": {"inputs": [{"shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}},
     422, "an input needs a name: this model's is 'input'"),
    ("v2 no datatype", "post", V2_INFER, {"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8],
                                                                "data": [0.0] * 64}]}}, 422, "an input needs a datatype"),
    ("v2 scalar shape", "post", V2_INFER,
     {"json": {"inputs": [{"name": "input", "shape": [], "datatype": "FP32", "data": [0.0]}]}}, 422,
     "shape [] is a scalar"),
    ("v2 numeric id", "post", V2_INFER,
     {"json": {"id": 5, "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}},
     422, "id must be a string"),
    ("v2 unknown model", "get", "/v2/models/nope/ready", {}, 404, "no model named 'nope'"),
    ("v2 not json", "post", "/v2/models/digits-a/infer", {"content": b"{nope", "headers": JSON}, 400,
     "body is not valid JSON"),
    ("v2 unknown route", "get", "/v2/nothing", {}, 404, ""),
    # Python's int() refuses a string of over 4300 digits (a ValueError, once a 500): past the body, unconverted
    ("v2 header length of 5000 digits", "post", V2_INFER,
     {"content": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "9" * 5000}}, 400,
     "is past the body"),
    # BYTES elements are counted against the shape as they are read: refused at the first one too many, not
    # after reading millions of empty ones to the body's end (here: a cut-off length after the second)
    ("v2 BYTES more elements than the shape", "post", V2_INFER,
     v2_binary("BYTES", [1], bytes_elements(b"", b"") + b"\x01\x00"), 400,
     "more BYTES elements than the 1 its shape needs"),
    # one image per sample: a BYTES shape over max_request_samples is refused before any element is read
    # a dimension no int64 holds (JSON takes up to 2**64 - 1 as an integer): refused as a shape, as gRPC's would be
    ("v2 dimension past int64", "post", V2_INFER, v2_binary("BYTES", [2**63], b""), 422,
     "shape must be a list of non-negative integers (int64)"),
    # zero elements, but dimensions numpy cannot shape (a 500: "array is too big")
    *[(f"v2 {dt} of shape [0, 2**62]", "post", V2_INFER, v2_binary(dt, [0, 2**62], b""), 422, "spans more than")
      for dt in ("FP32", "BOOL", "BYTES")],
    ("v2 BYTES count over max_request_samples", "post", V2_INFER,
     v2_binary("BYTES", [2000], bytes_elements(b"")), 422, "2000 samples in one request; at most 1024"),
    ("v2 JSON BYTES count over max_request_samples", "post", V2_INFER,
     {"json": {"inputs": [{"name": "input", "shape": [2000], "datatype": "BYTES", "data": ["a"]}]}}, 422,
     "2000 samples in one request; at most 1024"),
    ("image longer a side than MAX_IMAGE_SIDE", "post", PREDICT,
     {"content": thin_png(), "headers": {"content-type": "image/png"}}, 415, "unsupported_image"),
    ("v2 BYTES image longer a side than MAX_IMAGE_SIDE", "post", V2_INFER,
     v2_binary("BYTES", [1], bytes_elements(thin_png())), 415, "65537×1 pixels is too large"),
    # 10^10 pixels declared: Pillow refuses to open it at all (a decompression bomb), which read as "not an image"
    ("image declaring 10^10 pixels", "post", PREDICT,
     {"content": declared_png(100_000, 100_000), "headers": {"content-type": "image/png"}}, 415, "unsupported_image"),
    ("v2 BYTES image declaring 10^10 pixels", "post", V2_INFER,
     v2_binary("BYTES", [1], bytes_elements(declared_png(100_000, 100_000))), 415, "the image is too large"),
    # finite inputs far out of the network's scale: its NaN was served (JSON nulls, a NaN class 0 as the top-1)
    ("inputs that overflow the network", "post", PREDICT, {"json": {"inputs": [[[[3e38] * 8] * 8]]}}, 422,
     "non_finite_output"),
    ("v2 inputs that overflow the network", "post", V2_INFER,
     {"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [3e38] * 64}]}},
     422, "answers NaN or Inf on 1 of 1 input(s)"),
    # FP16 holds ±65504: a larger value in JSON was taken as FP32
    ("v2 JSON FP16 beyond its range", "post", V2_INFER,
     {"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP16", "data": [1e10] + [0.0] * 63}]}},
     422, "beyond FP16's range"),
    # each image within its bounds, together past MAX_REQUEST_PIXELS: refused from their headers, none decoded
    # (530 such images fit in an 8 MB body: 55 s of CPU)
    ("images over MAX_REQUEST_PIXELS together", "post", PREDICT, {"files": SEVEN}, 413, "images_too_large"),
    ("v2 BYTES images over MAX_REQUEST_PIXELS together", "post", V2_INFER,
     v2_binary("BYTES", [7], bytes_elements(*[BLANK] * 7)), 413, "hold 112000000 pixels; at most 100000000"),
]


@pytest.mark.parametrize("what,method,path,kwargs,status,code", BAD, ids=[b[0] for b in BAD])
async def test_bad_input_then_good_request(svc, what, method, path, kwargs, status, code):
    r = await getattr(svc.client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    if path.startswith("/v2"):  # the Open Inference Protocol's body: the message alone
        assert isinstance(body["error"], str) and code in body["error"], body
    else:
        assert isinstance(body["error"]["message"], str)
        if code:
            assert body["error"]["code"] == code
    assert (await svc.client.post(PREDICT, json=GOOD)).status_code == 200


async def test_a_tiny_temperature_sharpens_to_the_top_label_not_to_nan(svc):
    """softmax(logits / T) at T = 1e-40 overflowed to Inf - Inf: NaN soft targets, answered with a 200 and charged."""
    h = svc.auth(svc.key(("distill",)))
    for ask in ({"json": {**GOOD, "temperature": 1e-40}}, {"json": GOOD, "params": {"temperature": "1e-300"}}):
        r = await svc.client.post("/v1/models/digits-a/distill", headers=h, **ask)
        assert r.status_code == 200, r.text
        soft, logits = np.array(r.json()["soft_targets"]), np.array(r.json()["logits"])
        assert np.isfinite(soft).all() and soft.sum() == pytest.approx(1.0)
        assert soft[0, logits[0].argmax()] >= 0.5 and set(np.unique(soft)) <= {0.0, 0.5, 1.0}
    r = await svc.client.post("/v1/models/digits-a/distill", json=GOOD, params={"temperature": "nan"}, headers=h)
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"], r.text


async def test_bad_distill_input_costs_no_quota(svc):
    h = svc.auth(svc.key(("distill",), quota=1))
    r = await svc.client.post("/v1/models/digits-a/distill", json={"inputs": [[1e300] * 64]}, headers=h)
    assert r.status_code == 422
    r = await svc.client.post("/v1/models/digits-a/distill", json={"inputs": "x", "temperature": -1}, headers=h)
    assert r.status_code == 422
    r = await svc.client.post("/v1/models/digits-a/distill", content=b"0", headers={**h, "content-type": "text/csv"})
    assert r.status_code == 415
    assert (await svc.client.post("/v1/models/digits-a/distill", json=GOOD, headers=h)).status_code == 200


async def test_payload_limit_413(svc):
    big = b'{"inputs": [' + b"0.0," * (2 << 20) + b"0.0]}"
    assert len(big) > svc.settings.max_payload_bytes
    r = await svc.client.post(PREDICT, content=big, headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    async def chunks():  # no Content-Length: the limit is counted on the stream
        for _ in range(10):
            yield b" " * (1 << 20)

    r = await svc.client.post(PREDICT, content=chunks(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert (await svc.client.post(PREDICT, json=GOOD)).status_code == 200


@pytest.mark.parametrize("rows", [b"[0]", b"[]", b"{}"], ids=["one-value rows", "empty lists", "objects"])
async def test_a_json_body_of_many_arrays_is_refused_unparsed_and_charges_nothing(svc, rows):
    """8 MB of one-value rows or empty lists held the event loop ~0.8 s a request (a JSON parser's and numpy's cost
    is in arrays, not bytes): a body of more than MAX_JSON_CONTAINERS arrays and objects is a 413 before parsing."""
    h = svc.auth(svc.key(("distill",), quota=1))
    body = b'{"inputs": [' + b",".join([rows] * (tensors.MAX_JSON_CONTAINERS + 1)) + b"]}"
    for path in (PREDICT, "/v1/models/digits-a/distill"):
        r = await svc.client.post(path, content=body, headers={**h, **JSON})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text[:300]
        assert "flat row" in r.json()["error"]["message"]
    r = await svc.client.post(V2_INFER, content=b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], '
                              b'"datatype": "FP32", "data": ' + body[11:-1] + b"}]}", headers=JSON)
    assert r.status_code == 413 and set(r.json()) == {"error"}  # the protocol's error body
    # the same values as flat rows of 64, and a real batch nested row by row (1,024 x 8 lists), are served
    flat = {"inputs": np.zeros((16, 64)).tolist()}
    assert (await svc.client.post(PREDICT, json=flat)).status_code == 200
    nested = np.zeros((svc.settings.max_request_samples, 1, 8, 8)).tolist()
    assert (await svc.client.post("/v1/models/digits-a/distill", json={"inputs": nested}, headers=h)
            ).status_code == 429  # read and charged: over the quota of 1, which the refusals above left whole
    assert (await svc.client.post("/v1/models/digits-a/distill", json=GOOD, headers=h)).status_code == 200


async def test_a_json_body_of_many_arrays_is_refused_on_every_route_before_a_key_is_checked(svc):
    """FastAPI parses a route's body model before its key is checked: 8 MB of empty lists to POST /v1/jobs held
    the event loop ~0.4 s for an anonymous 401. The arrays are counted as the body streams in."""
    body = b'{"kind": "wrap", "params": {"x": [' + b",".join([b"[]"] * (tensors.MAX_JSON_CONTAINERS + 1)) + b"]}}"

    async def streamed():  # no Content-Length: counted chunk by chunk
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]

    for content, headers in ((body, JSON), (streamed(), JSON), (body, {})):  # no Content-Type: read as JSON too
        for path in ("/v1/jobs", "/v1/keys"):
            r = await svc.client.post(path, content=content if isinstance(content, bytes) else streamed(),
                                      headers=headers)
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text[:300]
            assert "arrays and objects" in r.json()["error"]["message"]
    r = await svc.client.post("/v1/jobs", content=body, headers={"content-type": "application/octet-stream"})
    assert r.status_code != 413  # not JSON as sent: FastAPI does not parse it (nor is it counted)
    assert (await svc.client.post("/v1/jobs", json={"kind": "wrap", "params": {}})).status_code == 401


async def test_bad_admin_bodies(svc):
    c = svc.client
    r = await c.post("/v1/keys", json={"scopes": ["root"]}, headers=svc.admin)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = await c.post("/v1/keys", json={"scopes": []}, headers=svc.admin)
    assert r.status_code == 422
    # counts past the store's 64-bit integers, and an expiry past any date (were a 500, and a key no listing shows)
    for bad in ({"quota": 2**63}, {"quota_window_s": 2**63}, {"expires_days": 1e300}):
        r = await c.post("/v1/keys", json={"scopes": ["distill"], **bad}, headers=svc.admin)
        assert r.status_code == 422 and next(iter(bad)) in r.json()["error"]["message"], r.text
    assert len((await c.get("/v1/keys", headers=svc.admin)).json()["keys"]) == 1  # the admin's own alone
    r = await c.post("/v1/keys", content=b"{", headers={**svc.admin, **JSON})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text  # malformed JSON
    r = await c.post("/v1/models", json={"path": "/does/not/exist"}, headers=svc.admin)
    assert r.status_code == 422 and r.json()["error"]["code"] == "server_path_refused"
    r = await c.post("/v1/models", files={"file": ("x.sdb", b"not a zip")}, headers=svc.admin)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bundle_refused"
    # a bare ONNX file, a user's first guess at a bundle, is told what a bundle is and how to write one
    r = await c.post("/v1/models", files={"file": ("model.onnx", b"\x08\x07onnx graph")}, headers=svc.admin)
    assert r.status_code == 400 and "bare ONNX graph is not a bundle" in r.json()["error"]["message"], r.text


async def test_a_phone_cameras_jpeg_is_read_as_its_first_picture(svc):
    """Phone cameras write JPEGs with a second picture inside (depth map, preview), which Pillow names MPO: the
    photo is the first; it was a 415 "image format MPO is not PNG or JPEG"."""
    photo, depth = Image.new("L", (32, 32), 40), Image.new("L", (32, 32), 250)
    for x in range(32):
        photo.putpixel((x, x), 255)
    mpo, jpeg = io.BytesIO(), io.BytesIO()
    photo.save(mpo, "MPO", save_all=True, append_images=[depth])
    photo.save(jpeg, "JPEG")
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    assert await _same_answers(svc, [mpo.getvalue(), jpeg.getvalue()], "image/jpeg")


async def test_a_sixteen_bit_image_is_read_over_its_depth(svc):
    """A 16-bit PNG was clipped at 255 by Pillow's convert (every pixel above 255 white); it is read over its depth,
    as a data set's images are (sdb_core.pixels), so its model input is the 8-bit image's up to rounding."""
    from service.tensors import image_to_input

    ramp = np.linspace(0, 65535, 64).reshape(8, 8)
    sixteen, eight = io.BytesIO(), io.BytesIO()
    Image.fromarray(ramp.astype(np.uint16)).save(sixteen, "PNG")
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(eight, "PNG")
    norm = {"mean": [0.5], "std": [0.25]}
    got, want = (image_to_input(b.getvalue(), [1, 8, 8], norm) for b in (sixteen, eight))
    assert np.abs(got - want).max() < 1 / 255 / 0.25
    assert await _same_answers(svc, [sixteen.getvalue(), eight.getvalue()], "image/png")


async def test_a_photo_is_read_as_shown_not_as_stored(svc):
    """A phone stores a portrait photo sideways with an EXIF orientation that browsers honour; predict and style
    transfer read it turned as shown (sdb_core.pixels.upright), as training data is."""
    from service.routes.style import decode

    shown = np.zeros((8, 8), np.uint8)
    shown[:3] = 255  # a bar across the top: on its side, it would be a bar down one side
    exif = Image.Exif()
    exif[0x0112] = 6  # to be shown turned a quarter clockwise
    turned, plain = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(turned, "PNG", exif=exif.tobytes())
    Image.fromarray(shown).save(plain, "PNG")
    assert await _same_answers(svc, [turned.getvalue(), plain.getvalue()], "image/png")
    big = np.kron(shown, np.ones((8, 8), np.uint8))  # style transfer takes at least 16 pixels a side
    turned, plain = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(big, 1))).save(turned, "PNG", exif=exif.tobytes())
    Image.fromarray(big).save(plain, "PNG")
    np.testing.assert_array_equal(decode(turned.getvalue(), "content"), decode(plain.getvalue(), "content"))


async def _same_answers(svc, images: list[bytes], content_type: str) -> bool:
    """Whether predict answers each image as the first (every answer a 200)."""
    answers = []
    for body in images:
        r = await svc.client.post(PREDICT, content=body, headers={"content-type": content_type})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return all(a == answers[0] for a in answers)


async def test_an_empty_outputs_list_and_an_empty_content_encoding_name_nothing(svc):
    """"outputs": [] was a 422 over HTTP but the default outputs over gRPC (whose protobuf cannot tell [] from
    none); "Content-Encoding: " (empty) was a 415 where it names no coding."""
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    default = await svc.client.post(V2_INFER, json=body)
    empty = await svc.client.post(V2_INFER, json={**body, "outputs": []})
    assert default.status_code == empty.status_code == 200, empty.text
    assert empty.json()["outputs"] == default.json()["outputs"]
    r = await svc.client.post(V2_INFER, content=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json", "Content-Encoding": ""})
    assert r.status_code == 200 and r.json()["outputs"] == default.json()["outputs"], r.text


async def test_a_key_for_a_model_no_name_can_be_is_refused(svc):
    """An allowlist entry no model can ever be named ("<b>x</b>") made a key that answers for no model."""
    r = await svc.client.post("/v1/keys", json={"scopes": ["predict"], "models": ["digits-a", "<b>x</b>"]},
                              headers=svc.admin)
    assert r.status_code == 422 and "'<b>x</b>' is not a model name" in r.json()["error"]["message"], r.text


def _v2_many_inputs(n: int, binary: bool) -> dict:
    """A v2 infer request of ``n`` one-value input tensors, in JSON or in the binary extension."""
    tensor = {"name": "i", "shape": [1], "datatype": "FP32"}
    if not binary:
        return {"json": {"inputs": [{**tensor, "data": [0.0]}] * n}}
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 4}}] * n}, separators=(",", ":"))
    return {"content": head.encode() + b"\0" * 4 * n, "headers": {"Inference-Header-Content-Length": str(len(head))}}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_a_request_of_many_tensors_is_refused_from_their_count(svc, monkeypatch, binary):
    """Every model takes one input, and serves at most three outputs: a request of 100,000 tiny tensors was decoded
    entry by entry (seconds of the event loop under load, every client frozen) before the count refused it, and
    100,000 unknown output names were all quoted back (a 2 MB error body). Now the count refuses them unread."""
    shapes_read = []
    read_shape = v2.tensor_shape  # what reads each entry first: counted, still the server's own
    monkeypatch.setattr(v2, "tensor_shape", lambda shape: shapes_read.append(shape) or read_shape(shape))
    r = await svc.client.post(V2_INFER, **_v2_many_inputs(80_000, binary))  # 3 containers each: under their bound
    assert (r.status_code, r.json()) == (422, {"error": "inputs must be a list of exactly one tensor object"})
    assert shapes_read == []
    one = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
    r = await svc.client.post(V2_INFER, json={"inputs": [one], "outputs": [{"name": "nope" * 5}] * 100_000})
    assert r.status_code == 422 and len(r.content) < 300, r.content[:300]
    assert r.json()["error"].startswith("100000 outputs asked for; a model serves at most 3")
    assert (await svc.client.post(V2_INFER, json={"inputs": [one], "outputs": [{"name": "probabilities"}] * 2})
            ).status_code == 200  # a name asked twice is still answered once
    assert (await svc.client.post(PREDICT, json=GOOD)).status_code == 200


async def test_errors_quote_a_callers_long_values_cut_short(svc):
    """A message names what the caller sent, its first 100 characters: a name of 1 MB was echoed whole."""
    for path in (f"/v2/models/{'y' * 20_000}", f"/v2/models/digits-a/versions/{'9' * 20_000}"):
        r = await svc.client.get(path)
        assert r.status_code == 404 and len(r.content) < 500, r.content[:500]
    long = "x" * 1_000_000
    one = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
    for body, message in [
        ({"inputs": [{**one, "name": long}]}, f"unknown input {'x' * 100!r}…; this model's input is 'input'"),
        ({"inputs": [{**one, "datatype": long}]}, f"datatype {'x' * 100!r}… is not supported"),
        ({"inputs": [one], "outputs": [{"name": long}]}, f"unknown output(s) [{'x' * 100!r}…]; this model serves"),
        ({"inputs": [one], "outputs": [{"name": "probabilities", "parameters": {"classification": long}}]},
         "must be a non-negative integer, got"),
    ]:
        r = await svc.client.post(V2_INFER, json=body)
        assert r.status_code == 422 and len(r.content) < 500, r.content[:500]
        assert message in r.json()["error"], r.json()
    r = await svc.client.post(V2_INFER, **v2_binary(long, [1], b"\0"))
    assert r.status_code == 400 and len(r.content) < 500 and f"datatype {'x' * 100!r}… is not one" in r.text
