"""``.npy`` bodies on the v1 keyed and public paths: the same answers as JSON, read strictly, and a bad
body changes nothing (no quota charged, no model time, never unpickled)."""
from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from service.auth import parse_token
from service.npy import NPY, encode

from .conftest import make_settings, start_service

pytestmark = pytest.mark.anyio

DISTILL, PREDICT = "/v1/models/digits-a/distill", "/v1/models/digits-a/predict"
NPY_IN = {"content-type": NPY}
NPY_BOTH = {"content-type": NPY, "accept": NPY}


def npy(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def header(shape: tuple, descr: str = "<f4", fortran: bool = False) -> bytes:
    """A .npy header alone, as np.save writes it (version 1.0, padded to 64 bytes)."""
    text = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode()
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


def load(r) -> np.ndarray:
    assert r.headers["content-type"] == NPY, (r.status_code, r.text[:300])
    return np.load(io.BytesIO(r.content), allow_pickle=False)


async def used(svc, token: str) -> int:
    return svc.app.state.store.get_key(parse_token(token)[0]).used


async def test_distill_npy_in_and_out_equals_json(svc, bundles):
    x = bundles.x
    token = svc.key(("distill",), quota=1000)
    h = svc.auth(token)
    want = np.asarray((await svc.client.post(DISTILL, json={"inputs": x.tolist()}, headers=h)).json()["logits"],
                      np.float32)
    r = await svc.client.post(DISTILL, content=npy(x), headers={**h, **NPY_BOTH})
    assert r.status_code == 200
    z = load(r)
    assert z.dtype == np.float32 and z.shape == (len(x), 10)
    np.testing.assert_allclose(z, want, rtol=0, atol=1e-6)
    assert (r.headers["sdb-model"], r.headers["sdb-model-version"]) == ("digits-a", "2")
    assert "sdb-temperature" not in r.headers
    assert await used(svc, token) == 2 * len(x)  # charged like JSON: per sample
    # one version asked for, a temperature echoed; float16/float64 inputs read as float32
    r = await svc.client.post(DISTILL + "?version=1&temperature=4", content=npy(x.astype(np.float64)),
                              headers={**h, **NPY_BOTH})
    assert r.headers["sdb-model-version"] == "1" and float(r.headers["sdb-temperature"]) == 4.0
    v1 = (await svc.client.post(DISTILL + "?version=1", json={"inputs": x.tolist()}, headers=h)).json()["logits"]
    np.testing.assert_allclose(load(r), v1, atol=1e-6)
    r = await svc.client.post(DISTILL, content=npy(x.astype(np.float16)), headers={**h, **NPY_BOTH})
    np.testing.assert_allclose(load(r), (await svc.client.post(DISTILL, json={
        "inputs": x.astype(np.float16).astype(np.float32).tolist()}, headers=h)).json()["logits"], atol=1e-6)


async def test_distill_encodings_mix_and_soft_targets(svc, bundles):
    x, h = bundles.x[:3], svc.auth(svc.key(("distill",)))
    # .npy in, JSON out (no Accept): soft targets at the query's temperature
    r = await svc.client.post(DISTILL + "?temperature=2", content=npy(x), headers={**h, **NPY_IN})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    z = np.asarray(body["logits"], np.float32)
    e = np.exp(z / 2 - (z / 2).max(1, keepdims=True))
    np.testing.assert_allclose(body["soft_targets"], e / e.sum(1, keepdims=True), atol=1e-6)
    assert body["temperature"] == 2.0
    # JSON in, .npy out; one [C, H, W] sample and [N, 64] rows are inputs too
    r = await svc.client.post(DISTILL, json={"inputs": x.tolist()}, headers={**h, "accept": NPY})
    np.testing.assert_allclose(load(r), z, atol=1e-6)
    one = await svc.client.post(DISTILL, content=npy(x[0]), headers={**h, **NPY_BOTH})
    rows = await svc.client.post(DISTILL, content=npy(x.reshape(3, 64)), headers={**h, **NPY_BOTH})
    np.testing.assert_allclose(load(one), z[:1], atol=1e-6)
    np.testing.assert_allclose(load(rows), z, atol=1e-6)


@pytest.mark.parametrize("accept,binary", [
    (None, False), ("*/*", False), ("application/json", False), (f"{NPY};q=0", False),
    (f"{NPY};q=0.5, */*", False), (f"{NPY}, application/json;q=0.9", True), (NPY, True),
    (f"application/json, {NPY}", True), (f"{NPY.upper()}", True)])
async def test_the_answer_follows_accept(svc, bundles, accept, binary):
    h = {**svc.auth(svc.key(("distill",))), **NPY_IN, **({"accept": accept} if accept else {})}
    r = await svc.client.post(DISTILL, content=npy(bundles.x[:1]), headers=h)
    assert r.status_code == 200
    assert r.headers["content-type"] == (NPY if binary else "application/json")


async def test_predict_takes_npy_and_answers_json_labels(svc, bundles):
    x = bundles.x
    want = (await svc.client.post(PREDICT, json={"inputs": x.tolist(), "top_k": 3})).json()
    r = await svc.client.post(PREDICT + "?top_k=3", content=npy(x), headers={**NPY_BOTH})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == want
    r = await svc.client.post(PREDICT, content=npy(x), headers=NPY_IN)  # top_k defaults to 5
    assert [len(p["labels"]) for p in r.json()["predictions"]] == [5] * len(x)
    r = await svc.client.post(PREDICT + "?top_k=0", content=npy(x), headers=NPY_IN)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


class _Boom:
    """Unpickling this touches a file: proof that an object array was never unpickled."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_bodies(x: np.ndarray, tmp: Path) -> list[tuple[str, bytes, int, str]]:
    good = npy(x)
    boom = _Boom()
    boom.marker = tmp / "unpickled"
    big_endian = header(x.shape, ">f4") + x.astype(">f4").tobytes()
    return [
        ("empty", b"", 400, "malformed_body"),
        ("not npy", b"\x00\x01 garbage", 400, "malformed_body"),
        ("json sent as npy", b'{"inputs": [[0.0]]}', 400, "malformed_body"),
        ("header cut short", good[:30], 400, "malformed_body"),
        ("data truncated", good[:-4], 400, "malformed_body"),
        ("trailing bytes", good + b"\x00" * 4, 400, "malformed_body"),
        ("format version 9", good[:6] + b"\x09\x00" + good[8:], 400, "malformed_body"),
        ("header not a dict", b"\x93NUMPY\x01\x00\x10\x00" + b"[1, 2, 3]      \n", 400, "malformed_body"),
        ("code in the header", b"\x93NUMPY\x01\x00\x20\x00" + b"__import__('os').getcwd()      \n", 400,
         "malformed_body"),
        # numpy re-tokenizes a header its literal reader refused: an unclosed bracket was a TokenError, a 500
        ("header an unclosed dict", b"\x93NUMPY\x01\x00\x10\x00" + b"{'descr': '<f4'\n", 400, "malformed_body"),
        ("header too long", b"\x93NUMPY\x02\x00" + (100_000).to_bytes(4, "little") + b" " * 64, 400,
         "malformed_body"),
        ("negative dimension", header((-1, 1, 8, 8)), 400, "malformed_body"),
        ("int32", npy(x.astype(np.int32)), 422, "invalid_dtype"),
        ("uint8", npy((x * 0).astype(np.uint8)), 422, "invalid_dtype"),
        ("complex", npy(x.astype(np.complex64)), 422, "invalid_dtype"),
        ("structured", npy(np.zeros(len(x), dtype=[("a", "<f4"), ("b", "<f4")])), 422, "invalid_dtype"),
        ("big-endian", big_endian, 422, "invalid_dtype"),
        ("pickled objects", npy(np.array([boom, boom], dtype=object), allow_pickle=True), 422, "invalid_dtype"),
        ("pickle, not npy", pickle.dumps(boom), 400, "malformed_body"),
        ("fortran order", npy(np.asfortranarray(x.reshape(len(x), 64))), 422, "invalid_layout"),
        ("wrong shape", npy(np.zeros((2, 3, 8, 8), np.float32)), 422, "invalid_shape"),
        ("no sample", npy(np.zeros((0, 1, 8, 8), np.float32)), 422, "invalid_shape"),
        ("a scalar", npy(np.float32(1.0)), 422, "invalid_shape"),
        # the header alone: the count is refused before any data is read (none was sent)
        ("too many samples", header((2000, 1, 8, 8)), 422, "too_many_samples"),
        ("NaN", npy(np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32)), 422,
         "non_finite"),
        ("beyond float32", npy(np.full(x.shape, 1e39)), 422, "non_finite"),
    ]


async def test_bad_npy_bodies_are_refused_and_cost_nothing(svc, bundles, tmp_path):
    token = svc.key(("distill",), quota=1000)
    h = {**svc.auth(token), **NPY_BOTH}
    served = svc.app.state.metrics.samples.labels("digits-a", "distill", parse_token(token)[0])
    for what, body, status, code in _bad_bodies(bundles.x[:2], tmp_path):
        for url in (DISTILL, PREDICT):
            r = await svc.client.post(url, content=body, headers=h)
            assert r.status_code == status, (what, url, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json" and r.json()["error"]["code"] == code, (what, r.text)
            assert " at 0x" not in r.text, (what, r.text)  # numpy's message showed a parsed node's address
    assert not (tmp_path / "unpickled").exists()
    assert await used(svc, token) == 0 and served._value.get() == 0  # no quota, no model call
    r = await svc.client.post(DISTILL, content=npy(bundles.x[:2]), headers=h)
    assert r.status_code == 200 and await used(svc, token) == 2


async def test_other_media_types_are_415(svc, bundles):
    h = svc.auth(svc.key(("distill",)))
    for ctype in ("application/octet-stream", "application/x-npz", "text/plain"):
        for url in (DISTILL, PREDICT):
            r = await svc.client.post(url, content=npy(bundles.x[:1]), headers={**h, "content-type": ctype})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (url, ctype)


async def test_json_and_image_bodies_may_come_compressed(svc, bundles):
    # as the v2 routes take them (service.bodies.read_bytes): the payload limit holds once inflated
    token = svc.key(("distill",), quota=1000)  # a quota is charged in the store at once
    h = svc.auth(token)
    body = orjson.dumps({"inputs": bundles.x[:2].tolist()})
    plain = await svc.client.post(DISTILL, content=body, headers={**h, "content-type": "application/json"})
    assert plain.status_code == 200
    for coding, content in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        r = await svc.client.post(DISTILL, content=content, headers={**h, "content-type": "application/json",
                                                                      "content-encoding": coding})
        assert r.status_code == 200 and r.json() == plain.json(), (coding, r.text)
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(png, "PNG")
    image = {"content-type": "image/png"}
    direct = await svc.client.post(PREDICT, content=png.getvalue(), headers=image)
    inflated = await svc.client.post(PREDICT, content=gzip.compress(png.getvalue()),
                                     headers={**image, "content-encoding": "gzip"})
    assert direct.status_code == inflated.status_code == 200 and direct.json() == inflated.json()
    assert await used(svc, token) == 6
    bomb = gzip.compress(b'{"inputs": [' + b" " * svc.settings.max_payload_bytes + b"[0]]}")
    refused = {"inflates past the limit": (bomb, "application/json", "gzip", 413, "payload_too_large"),
               "truncated": (gzip.compress(body)[:-9], "application/json", "gzip", 400, "malformed_body"),
               "another coding": (body, "application/json", "br", 415, "unsupported_media_type"),
               "a .npy body": (gzip.compress(npy(bundles.x[:1])), NPY, "gzip", 415, "unsupported_media_type")}
    for what, (content, ctype, coding, status, code) in refused.items():
        r = await svc.client.post(DISTILL, content=content, headers={**h, "content-type": ctype,
                                                                      "content-encoding": coding})
        assert r.status_code == status and r.json()["error"]["code"] == code, (what, r.status_code, r.text)
    assert await used(svc, token) == 6


async def test_keys_are_checked_before_the_body(svc, bundles):
    body = npy(bundles.x[:1])
    r = await svc.client.post(DISTILL, content=body, headers=NPY_BOTH)
    assert r.status_code == 401 and r.headers["content-type"] == "application/json"
    predict_only = svc.auth(svc.key(("predict",)))
    r = await svc.client.post(DISTILL, content=body, headers={**predict_only, **NPY_BOTH})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_scope"
    other = svc.auth(svc.key(("distill",), models=["digits-b"]))
    assert (await svc.client.post(DISTILL, content=body, headers={**other, **NPY_BOTH})).status_code == 403
    spent = svc.key(("distill",), quota=1)
    r = await svc.client.post(DISTILL, content=npy(bundles.x[:2]), headers={**svc.auth(spent), **NPY_BOTH})
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"


@pytest.fixture
async def small(tmp_path, bundles):
    """digits-a under a 4 KiB payload limit (16 float32 samples) and 8 samples a request."""
    service, manager = await start_service(make_settings(tmp_path / "data", bundles, max_payload_bytes=4096,
                                                         max_request_samples=8), bundles.a)
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


async def test_too_big_is_a_413_before_the_data_is_read(small, bundles):
    token = small.key(("distill",), quota=1000)
    h = {**small.auth(token), **NPY_BOTH}
    x = np.zeros((6, 1, 8, 8), np.float32)
    # a declared Content-Length over the limit: answered before the body is read (the middleware)
    r = await small.client.post(DISTILL, content=npy(np.zeros((20, 1, 8, 8), np.float32)), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # streamed, no Content-Length: a header announcing more than the limit is refused from the header alone
    pulled = []

    async def stream(arr):
        yield header(arr.shape, arr.dtype.str)
        pulled.append("data")
        yield arr.tobytes()

    r = await small.client.post(DISTILL, content=stream(np.zeros((8, 1, 8, 8), np.float64)), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    assert pulled == []  # the data was never asked for
    r = await small.client.post(DISTILL, content=stream(np.zeros((9, 1, 8, 8), np.float32)), headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_samples" and pulled == []
    assert await used(small, token) == 0
    r = await small.client.post(DISTILL, content=stream(x), headers=h)
    assert r.status_code == 200 and load(r).shape == (6, 10) and pulled == ["data"]
    assert await used(small, token) == 6


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


async def test_images_count_against_max_request_samples(small):
    files = [("file", (f"{i}.png", _png(i), "image/png")) for i in range(9)]
    r = await small.client.post(PREDICT, files=files[:8])
    assert r.status_code == 200 and len(r.json()["predictions"]) == 8  # every image, not the last of one name
    one = [(await small.client.post(PREDICT, files=[f])).json()["predictions"][0] for f in files[:8]]
    for got, alone in zip(r.json()["predictions"], one):  # in order; a batch of 8 may round scores differently
        assert got["indices"][0] == alone["indices"][0]
        np.testing.assert_allclose(got["scores"][0], alone["scores"][0], atol=1e-5)
    r = await small.client.post(PREDICT, files=files)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_samples", r.text


def test_encode_is_what_np_load_reads():
    for arr in (np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((2, 5), ">f4"), np.zeros((0, 10), np.float32)):
        back = np.load(io.BytesIO(encode(arr)), allow_pickle=False)
        assert back.dtype == np.dtype("<f4") and np.array_equal(back, arr)
