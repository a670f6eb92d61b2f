"""Hand-made and hostile bundles: each one the service cannot serve is refused at deploy with a 4xx that says
what to fix (no traceback, no server path), leaves nothing registered and nothing on disk, and the other
models keep serving, through a restart too.

Before the fix a plain bundle built by hand passed verification with a ``meta.json`` the routes could not
read (an input not named ``input``, no ``dtype``, a ``normalize`` of the wrong length or type, a ``task`` that
is a list, an ``output`` or ``check`` of the wrong type, values nested deeper than responses serialise) and
then answered 500s, some on ``GET /v1/models`` for every model; a deeply nested ``meta.json``, a corrupt,
encrypted or unknown-method zip member were 500s; a 50 MB ``meta.json`` and duplicate members (the last
copy counting) were served; a refused deploy left an empty folder named after the bundle; ``sdb models add``
registered names and versions no route can name (``a/b``, ``1\\x00``) or crashed on a 40-digit version.
Against the real app (lifespan, SQLite store, ONNX Runtime) in process.
"""
from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sdb_core.bundle import _sha256, export_bundle
from sdb_core.protect.key import load_or_create_master_key
from service.settings import Settings
from tests.service.conftest import start_service

pytestmark = pytest.mark.anyio

HINT = 'dynamic_axes={"input": {0: "batch"}'


def _net(classes: int = 4):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 8 * 8, classes))


def _onnx(*, input_name: str = "input", batch_axis: bool = True) -> bytes:
    """What a user exports themselves: ``torch.onnx.export`` with their own names and batch axis."""
    import torch

    buf = io.BytesIO()
    axes = {input_name: {0: "batch"}, "logits": {0: "batch"}} if batch_axis else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_net().eval(), (torch.zeros(1, 3, 8, 8),), buf, input_names=[input_name],
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, bytes]:
    """A correct plain bundle's files (4 classes, 3×8×8 images)."""
    out = export_bundle(_net(), tmp_path_factory.mktemp("plain") / "mine", name="mine", in_shape=(3, 8, 8),
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), labels=["a", "b", "c", "d"])
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _integer_logits() -> bytes:
    """A graph whose ``logits`` are uint8, as a fully quantized export ends (they were served as all-zero scores)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load_from_string(_onnx())
    out = m.graph.output[0]
    for node in m.graph.node:
        node.output[:] = ["scores" if o == out.name else o for o in node.output]
    m.graph.node.append(helper.make_node("Cast", ["scores"], [out.name], to=TensorProto.UINT8))
    out.type.tensor_type.elem_type = TensorProto.UINT8
    return m.SerializeToString()


def _edit(files: dict[str, bytes], edit=None, *, onnx: bytes | None = None, raw_meta: bytes | None = None) -> dict:
    """``files`` with ``meta.json`` edited (or replaced) and every hash made right again, as a user would."""
    files = {**files, **({"model.onnx": onnx} if onnx is not None else {})}
    meta = json.loads(files["meta.json"])
    if edit is not None:
        edit(meta)
    meta["files"] = {n: _sha256(b) for n, b in files.items() if n != "meta.json"}
    if raw_meta is not None:
        meta_bytes = raw_meta.replace(b"FILES", json.dumps(meta["files"]).encode())
    else:
        meta_bytes = json.dumps(meta).encode()
    return {**files, "meta.json": meta_bytes}


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in members:
                z.writestr(name, data)
    return buf.getvalue()


def _sdb(files: dict[str, bytes]) -> bytes:
    return _zip(sorted(files.items()))


def _patched(data: bytes, header: bytes, field: int, value: int) -> bytes:
    """``data`` with a 16-bit field of each zip header ``header`` (local b"PK\\3\\4", central b"PK\\1\\2") set."""
    out, i = bytearray(data), 0
    while (i := out.find(header, i)) >= 0:
        struct.pack_into("<H", out, i + field, value)
        i += 4
    return bytes(out)


def _set(path: str, value):
    def edit(meta: dict) -> None:
        *parents, last = path.split(".")
        target = meta
        for p in parents:
            target = target[p]
        if value is _DROP:
            target.pop(last)
        else:
            target[last] = value
    return edit


_DROP = object()


def _cases(plain: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    """Each refused bundle, as .sdb bytes, and a piece of what its refusal must say."""
    deflated = _sdb(plain)
    at = deflated.find(b"model.onnx") + len(b"model.onnx") + 40  # inside the first member's deflate stream
    corrupt = deflated[:at] + bytes(b ^ 0x55 for b in deflated[at:at + 64]) + deflated[at + 64:]
    deep = json.dumps(json.loads(plain["meta.json"]))[:-1].encode() + b', "metrics": {"a": ' + b"[" * 300 \
        + b"]" * 300 + b"}}"
    return {
        "input named x": (_sdb(_edit(plain, _set("input.name", "x"), onnx=_onnx(input_name="x"))), HINT),
        "graph input input.1": (_sdb(_edit(plain, onnx=_onnx(input_name="input.1"))), HINT),
        "fixed batch of 1": (_sdb(_edit(plain, onnx=_onnx(batch_axis=False))), HINT),
        "fp16 input": (_sdb(_edit(plain, _set("input.dtype", "float16"))), "float32"),
        "no input dtype": (_sdb(_edit(plain, _set("input.dtype", _DROP))), '"dtype": "float32"'),
        "normalize of 2 for 3 channels": (_sdb(_edit(plain, _set("normalize.mean", [0.5, 0.5]))), "one per input channel"),
        "normalize a string": (_sdb(_edit(plain, _set("normalize", "imagenet"))), '"mean": [...]'),
        "normalize std 0": (_sdb(_edit(plain, _set("normalize.std", [0, 0, 0]))), "std not 0"),
        "normalize scale of 400 digits": (_sdb(_edit(plain, _set("normalize.scale", 10 ** 400))), "std not 0"),
        "task a list": (_sdb(_edit(plain, _set("task", ["classification"]))), "task must be a string"),
        # deployed, then every call refused as another task's: Hugging Face's name for a classifier
        "task image-classification": (_sdb(_edit(plain, _set("task", "image-classification"))),
                                      "is not one this service serves"),
        "uint8 logits": (_sdb(_edit(plain, onnx=_integer_logits())), "is a tensor(uint8)"),
        "output a string": (_sdb(_edit(plain, _set("output", "logits"))), "output must be an object"),
        "check by hand": (_sdb(_edit(plain, _set("check", {"passed": True}))), "remove it"),
        "labels of objects": (_sdb(_edit(plain, _set("labels", [{"n": i} for i in range(4)]))), "class names"),
        # JSON reads them, orjson cannot write them: GET /v1/models was a 500 for everyone once one was deployed
        "a label of no UTF-8": (_sdb(_edit(plain, _set("labels", ["a", "b", "c", "lone\ud800"]))), "surrogates not allowed"),
        "a label past 64 bits": (_sdb(_edit(plain, _set("labels", [0, 1, 2, 2 ** 70]))), "cannot write"),
        "a metric past 64 bits": (_sdb(_edit(plain, _set("metrics", {"acc": 2 ** 70}))), "cannot write"),
        "a version past 64 bits": (_sdb(_edit(plain, _set("version", 2 ** 70))), "cannot write"),
        # the rule a data set's class names follow: shown to other people, and read back by predictions
        "a label with a terminal escape": (_sdb(_edit(plain, _set("labels", ["a", "b", "c", "\x1b[31md"]))),
                                           "control character U+001B"),
        "two labels alike": (_sdb(_edit(plain, _set("labels", ["a", "b", "c", "a"]))), "two classes are named 'a'"),
        "a blank label": (_sdb(_edit(plain, _set("labels", ["a", "b", " ", "d"]))), "class 2 has a blank name"),
        "input of 30 G values": (_sdb(_edit(plain, _set("input.shape", [3, 100000, 100000]))), "values per sample"),
        "metrics nested 300 deep": (_sdb(_edit(plain, raw_meta=deep[:-1] + b', "files": FILES}')), "levels deep"),
        "meta.json nested 100000 deep": (_sdb(_edit(plain, raw_meta=b"[" * 100000 + b"]" * 100000)), "levels deep"),
        "meta.json of 17 MB": (_sdb(_edit(plain, _set("pad", "x" * (17 << 20)))), "at most 16 MiB"),
        "model.onnx twice": (_zip([("model.onnx", _onnx(batch_axis=False)), *sorted(plain.items())]), "twice"),
        # never unpacked, but a stored copy kept it: a bundle holds what its meta.json can list, nothing else
        "a member named ../../x": (_zip([*sorted(plain.items()), ("../../x", b"x")]), "'../../x', which is not"),
        "a folder of the bundle": (_zip([(f"mine/{n}", b) for n, b in sorted(plain.items())]), "at its top level"),
        "corrupt deflate": (corrupt, "zip the bundle again"),
        "encrypted": (_patched(_patched(deflated, b"PK\x03\x04", 6, 1), b"PK\x01\x02", 8, 1), "without a password"),
        "unknown compression": (_patched(_patched(deflated, b"PK\x03\x04", 8, 99), b"PK\x01\x02", 10, 99),
                                "unknown method"),
    }


def _settings(tmp_path: Path) -> Settings:
    key_file = tmp_path / "master.key"
    load_or_create_master_key(key_file)
    return Settings(data_dir=tmp_path / "data", master_key_file=key_file, ort_intra_op_threads=1,
                    ort_inter_op_threads=1, usage_flush_s=0.05, models_sync_s=0.1, register_demo=False)


def _disk(settings: Settings) -> list[str]:
    root = settings.bundles_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


async def test_hand_made_bundles_the_routes_cannot_serve_are_refused_saying_what_to_fix(tmp_path, plain):
    settings = _settings(tmp_path)
    svc, manager = await start_service(settings)
    try:
        r = await svc.client.post("/v1/models", files={"file": ("mine.sdb", _sdb(plain))}, headers=svc.admin)
        assert r.status_code == 201, r.text
        served, disk = (await svc.client.get("/v1/models")).json()["models"], _disk(settings)
        for case, (data, says) in _cases(plain).items():
            r = await svc.client.post("/v1/models", files={"file": ("hand.sdb", data)},
                                      data={"name": "hand-made"}, headers=svc.admin)
            assert r.status_code == 400, (case, r.status_code, r.text[:500])
            error = r.json()["error"]
            assert error["code"] == "bundle_refused" and says in error["message"], (case, error)
            assert str(tmp_path) not in r.text and "Traceback" not in r.text, (case, r.text[:500])
            assert (await svc.client.get("/v1/models")).json()["models"] == served, case
            assert _disk(settings) == disk, case  # no copy, and no empty folder named after the bundle
        x = np.zeros((2, 3, 8, 8), np.float32).tolist()
        assert (await svc.client.post("/v1/models/mine/predict", json={"inputs": x})).status_code == 200
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)
    svc, manager = await start_service(settings)  # a restart serves what was served
    try:
        assert [m["name"] for m in (await svc.client.get("/v1/models")).json()["models"]] == ["mine"]
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_a_file_hash_in_capitals_is_the_same_sha256(tmp_path, plain):
    """Written as certutil and Get-FileHash print it, the hash was reported as the file being altered."""
    def upper(meta: dict) -> None:
        meta["files"] = {n: h.upper() for n, h in meta["files"].items()}

    files = _edit(plain)
    meta = json.loads(files["meta.json"])
    upper(meta)
    settings = _settings(tmp_path)
    svc, manager = await start_service(settings)
    try:
        r = await svc.client.post("/v1/models", files={"file": ("m.sdb", _sdb({**files, "meta.json": json.dumps(
            meta).encode()}))}, headers=svc.admin)
        assert r.status_code == 201, r.text
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_models_add_refuses_a_name_or_version_no_route_can_name(tmp_path, plain):
    from sdb_cli.admin import models_add

    settings = _settings(tmp_path)
    for i, (field, value) in enumerate([("name", "a/b"), ("name", ".."), ("name", "модель"), ("version", "1\x00"),
                                        ("version", "9" * 40), ("version", "")]):
        folder = tmp_path / f"bundle-{i}"
        folder.mkdir()
        for n, b in _edit(plain, _set(field, value)).items():
            (folder / n).write_bytes(b)
        with pytest.raises(ValueError, match=f"bundle's {field} .* cannot be served"):
            models_add(settings, str(folder))
    svc, manager = await start_service(settings)
    try:
        r = await svc.client.get("/v1/models")
        assert r.status_code == 200 and r.json()["models"] == []
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)
