"""``/v1/files`` and ``POST /v1/models``: every purpose uploaded and checked, ownership between keys,
the limits, and the hostile files (a pickle that runs code, zip slip, a zip bomb, a link member, a
broken image or bundle) refused with a 422 that names the problem and leaves nothing behind.
In process through the ASGI transport, and once end to end through the SDK and uvicorn."""
from __future__ import annotations

import io
import json
import os
import pickle
import stat
import struct
import zipfile
from pathlib import Path

import anyio
import numpy as np
import pytest
from PIL import Image

from service.app import build_app
from service.auth import ApiKey, create_key
from service.errors import ApiError
from service.files import dataset_name, resolve_file
from service.store import normalise_url as normalise
from tests.client.conftest import ThreadServer

from .conftest import deploy, make_settings, sdb_bytes, start_service

pytestmark = pytest.mark.anyio


# ----------------------------------------------------------------------------- files to upload
def safetensors_bytes() -> bytes:
    from safetensors.numpy import save

    return save({"fc.weight": np.ones((3, 4), np.float32), "fc.bias": np.zeros(3, np.float32)})


def pt_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def pt_state(shapes: dict[str, tuple]) -> bytes:
    """``torch.save`` of a state dict wrapped as training scripts do (``{"state_dict": ...}``)."""
    import torch

    return pt_bytes({"state_dict": {k: torch.ones(s) for k, s in shapes.items()}})


class RunsCode:
    """Unpickling this creates ``marker``: what a weights file must never be allowed to do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def png(size=(8, 8), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, "PNG")
    return buf.getvalue()


def zip_of(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return buf.getvalue()


def imagefolder_zip(prefix: str = "") -> bytes:
    return zip_of({f"{prefix}{c}/{i}.png": png() for c in ("cat", "dog") for i in range(3)})


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def digits_npz() -> bytes:
    rng = np.random.default_rng(0)
    return npz_bytes(x=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y=np.arange(20) % 4,
                     labels=np.array(["a", "b", "c", "d"]))


# ----------------------------------------------------------------------------- helpers
async def upload(svc, headers: dict, data: bytes, purpose: str, filename: str = "upload.bin", **fields):
    return await svc.client.post("/v1/files", headers=headers, data={"purpose": purpose, **fields},
                                 files={"file": (filename, data)})


def leftovers(svc) -> list[str]:
    """Anything stored for files: every file folder and every staging folder (an upload in flight)."""
    root = svc.settings.files_dir
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.iterdir() if p.name != ".staging") + \
        sorted(str(p.relative_to(root)) for p in (root / ".staging").glob("*"))


def api_key(svc, token: str) -> ApiKey:
    from service.auth import parse_token

    return ApiKey.from_row(svc.app.state.store.get_key(parse_token(token)[0]))


async def assert_refused(svc, headers, data, purpose, code, words, filename="upload.bin", status=422):
    r = await upload(svc, headers, data, purpose, filename)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and all(w in err["message"] for w in words), err
    assert str(svc.settings.data_dir) not in err["message"]  # no server path in a message
    assert leftovers(svc) == [] and svc.app.state.store.list_files() == []
    return err


# ----------------------------------------------------------------------------- each purpose
async def test_upload_each_purpose_list_get_delete(svc, bundles):
    h = svc.auth(svc.key(("jobs",)))
    cases = [("weights", "w.safetensors", safetensors_bytes(), "safetensors", {"tensors": 2, "parameters": 15}),
             ("weights", "w.pt", pt_state({"w": (2,)}), "pt", {"tensors": 1, "parameters": 2}),
             ("dataset", "pets.zip", imagefolder_zip(), "imagefolder", {"classes": ["cat", "dog"], "images": 6}),
             ("dataset", "wrapped.zip", imagefolder_zip("pets/"), "imagefolder", {"classes": ["cat", "dog"]}),
             ("dataset", "d.npz", digits_npz(), "npz", {"samples": 20, "shape": [1, 8, 8], "classes": 4}),
             ("image", "style.png", png((16, 12), "RGB"), "png", {"width": 16, "height": 12}),
             ("bundle", "a.sdb", sdb_bytes(bundles.a), "sdb", {"name": "digits-a", "mode": "sdb"})]
    ids = []
    for purpose, name, data, fmt, info in cases:
        r = await upload(svc, h, data, purpose, name)
        assert r.status_code == 201, (name, r.text)
        f = r.json()
        assert (f["purpose"], f["filename"], f["format"], f["bytes"]) == (purpose, name, fmt, len(data))
        assert {k: f["info"][k] for k in info} == info and f["id"].startswith("file-") and not f["shared"]
        assert "path" not in f and "owner" not in f  # a non-admin key sees no server path
        assert (await svc.client.get(f"/v1/files/{f['id']}", headers=h)).json() == f
        ids.append(f["id"])
    listed = (await svc.client.get("/v1/files", headers=h)).json()["files"]
    assert sorted(x["id"] for x in listed) == sorted(ids)
    for file_id in ids:
        r = await svc.client.delete(f"/v1/files/{file_id}", headers=h)
        assert r.status_code == 200 and r.json() == {"id": file_id, "deleted": True}
        assert (await svc.client.get(f"/v1/files/{file_id}", headers=h)).status_code == 404
    assert leftovers(svc) == [] and (await svc.client.get("/v1/files", headers=h)).json() == {"files": []}
    assert [a.action for a in svc.app.state.store.audit_log()].count("file.upload") == len(cases)


async def test_uploaded_datasets_load_through_the_resolver(svc):
    token = svc.key(("jobs",))
    h, key = svc.auth(token), api_key(svc, token)
    from sdb_core.data import load_dataset

    store = svc.app.state.store
    zipped = (await upload(svc, h, imagefolder_zip("pets/"), "dataset", "pets.zip")).json()["id"]
    name = dataset_name(store, svc.settings, key, zipped)
    assert name.startswith("imagefolder:") and name.endswith("pets")
    data = load_dataset(name, image_size=8)
    assert data.labels == ["cat", "dog"] and len(data.train) + len(data.test) == 6
    arrays = (await upload(svc, h, digits_npz(), "dataset", "d.npz")).json()["id"]
    data = load_dataset(dataset_name(store, svc.settings, key, arrays))
    assert data.labels == ["a", "b", "c", "d"] and (len(data.train), len(data.test)) == (16, 4)
    assert data.in_shape == (1, 8, 8)
    # a tabular set: feature vectors, any scale
    rng = np.random.default_rng(0)
    features = npz_bytes(x=rng.normal(100.0, 30.0, (20, 6)), y=np.arange(20) % 2)
    r = await upload(svc, h, features, "dataset", "t.npz")
    assert r.status_code == 201 and r.json()["info"]["shape"] == [6], r.text
    data = load_dataset(dataset_name(store, svc.settings, key, r.json()["id"]))
    assert data.in_shape == (6,) and abs(float(data.train.tensors[0].mean())) < 1e-4
    # split folders named in another case (Train/, Test/), or validation/: splits, not two classes named after them
    for splits in (("Train", "Test"), ("train", "validation")):
        r = await upload(svc, h, zip_of({f"{s}/{c}/{i}.png": png() for s in splits for c in ("cat", "dog")
                                         for i in range(3)}), "dataset", "s.zip")
        assert r.status_code == 201 and r.json()["info"]["classes"] == ["cat", "dog"], r.text
        assert r.json()["info"]["splits"] == "/".join(splits)
        data = load_dataset(dataset_name(store, svc.settings, key, r.json()["id"]), image_size=8)
        assert data.labels == ["cat", "dog"] and (len(data.train), len(data.test)) == (6, 6)
    # features of any scale, 1e200 too (their variance overflowed: "data.std is (inf, ...)" in every job)
    r = await upload(svc, h, npz_bytes(x=rng.normal(0.0, 1.0, (20, 3)) * 1e200, y=np.arange(20) % 2), "dataset")
    assert r.status_code == 201, r.text
    data = load_dataset(dataset_name(store, svc.settings, key, r.json()["id"]))
    assert np.isfinite(data.std).all() and abs(float(data.train.tensors[0].std()) - 1.0) < 0.1
    # multichannel signals, said so by the archive's layout
    signals = npz_bytes(x=rng.normal(0.0, 500.0, (20, 3, 16)), y=np.arange(20) % 2, layout=np.array("signals"))
    r = await upload(svc, h, signals, "dataset", "s.npz")
    assert r.status_code == 201 and r.json()["info"]["shape"] == [3, 16] and r.json()["info"]["layout"] == "signals"
    assert load_dataset(dataset_name(store, svc.settings, key, r.json()["id"])).in_shape == (3, 16)


def utf8_names_without_the_flag(members: dict[str, bytes]) -> bytes:
    """A zip as macOS's Archive Utility and ditto write it: UTF-8 member names, the UTF-8 flag (bit 11) unset.
    Written under ASCII stand-ins of the names' byte lengths, then the raw UTF-8 bytes patched in."""
    stand_ins = {}
    for name in members:
        for part in name.split("/"):
            if not part.isascii():
                stand_ins.setdefault(part, f"{len(stand_ins):0{len(part.encode())}d}")
    data = zip_of({"/".join(stand_ins.get(p, p) for p in n.split("/")): v for n, v in members.items()})
    for real, stand_in in stand_ins.items():
        data = data.replace(stand_in.encode(), real.encode())
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert not any(i.flag_bits & 0x800 for i in z.infolist()) and z.testzip() is None
    return data


async def test_dataset_zip_names_as_archivers_write_them(svc):
    """UTF-8 names without the zip's UTF-8 flag (macOS) were read as cp437: the classes, and so a served model's
    labels, became mojibake ('cafe╠ü'); macOS's decomposed names (NFD) did not match composed ones (NFC) of
    another split. A README beside the one folder that wraps the classes made that folder the one class."""
    token = svc.key(("jobs",))
    h, key = svc.auth(token), api_key(svc, token)
    from sdb_core.data import load_dataset

    nfd, nfc = "cafe\u0301", "caf\u00e9"
    mac = utf8_names_without_the_flag({f"pets/{s}/{c}/{i}.png": png() for s, form in (("train", nfd), ("test", nfc))
                                       for c in (form, "\u65e5\u672c") for i in range(3)})
    r = await upload(svc, h, mac, "dataset", "pets.zip")
    assert r.status_code == 201 and r.json()["info"]["classes"] == [nfc, "\u65e5\u672c"], r.text
    data = load_dataset(dataset_name(svc.app.state.store, svc.settings, key, r.json()["id"]), image_size=8)
    assert data.labels == [nfc, "\u65e5\u672c"] and (len(data.train), len(data.test)) == (6, 6)
    # cp437 names (an old Windows zip: 'é' is byte 0x82, not valid UTF-8) stay cp437
    old = zip_of({f"{c}/{i}.png": png() for c in ("caf_", "dog") for i in range(3)}).replace(b"caf_", b"caf\x82")
    r = await upload(svc, h, old, "dataset", "old.zip")
    assert r.status_code == 201 and r.json()["info"]["classes"] == [nfc, "dog"], r.text
    for loose in ({"README.md": b"pets"}, {"README.md": b"pets", ".DS_Store": b"", "labels.csv": b"cat\ndog"}):
        r = await upload(svc, h, zip_of({**loose, **{f"pets/{c}/{i}.png": png() for c in ("cat", "dog")
                                                     for i in range(3)}}), "dataset", "r.zip")
        assert r.status_code == 201 and r.json()["info"]["classes"] == ["cat", "dog"], r.text
        data = load_dataset(dataset_name(svc.app.state.store, svc.settings, key, r.json()["id"]), image_size=8)
        assert data.labels == ["cat", "dog"]


# ----------------------------------------------------------------------------- ownership
@pytest.mark.usefixtures("db_url")  # SQLite and PostgreSQL
async def test_files_belong_to_their_key(svc):
    c, store = svc.client, svc.app.state.store
    alice_token, bob_token = svc.key(("jobs",)), svc.key(("deploy",))
    alice, bob = svc.auth(alice_token), svc.auth(bob_token)
    f = (await upload(svc, alice, safetensors_bytes(), "weights", "w.safetensors")).json()
    # another key: 404 everywhere, as for an id that does not exist
    for r in (await c.get(f"/v1/files/{f['id']}", headers=bob), await c.delete(f"/v1/files/{f['id']}", headers=bob)):
        assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found", r.text
    assert (await c.get("/v1/files", headers=bob)).json() == {"files": []}
    with pytest.raises(ApiError) as e:
        resolve_file(store, svc.settings, api_key(svc, bob_token), f["id"], "weights")
    assert e.value.status == 404
    # the owner resolves it, for its purpose only
    path = resolve_file(store, svc.settings, api_key(svc, alice_token), f["id"], "weights")
    assert path.name == "weights.safetensors" and path.is_file()
    with pytest.raises(ApiError) as e:
        resolve_file(store, svc.settings, api_key(svc, alice_token), f["id"], "dataset")
    assert (e.value.status, e.value.code) == (422, "invalid_dataset")
    # keys without jobs or deploy: 403
    r = await c.get("/v1/files", headers=svc.auth(svc.key(("predict", "distill"))))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_scope"
    # an admin sees every file, with its owner and server path
    listed = (await c.get("/v1/files", headers=svc.admin)).json()["files"]
    assert [(x["id"], x["owner"], x["path"]) for x in listed] == [(f["id"], api_key(svc, alice_token).id, str(path))]
    # only an admin shares; a shared file is visible and usable by all, deletable by its owner or an admin
    r = await upload(svc, alice, png(), "image", "x.png", shared="true")
    assert r.status_code == 403 and leftovers(svc) == [f["id"]]
    shared = (await upload(svc, svc.admin, png(), "image", "x.png", shared="true")).json()
    assert shared["shared"] and [x["id"] for x in (await c.get("/v1/files", headers=bob)).json()["files"]] == [shared["id"]]
    assert resolve_file(store, svc.settings, api_key(svc, bob_token), shared["id"], "image").is_file()
    r = await c.delete(f"/v1/files/{shared['id']}", headers=bob)
    assert r.status_code == 403 and r.json()["error"]["code"] == "file_not_owned"
    assert (await c.delete(f"/v1/files/{shared['id']}", headers=svc.admin)).status_code == 200
    assert (await c.delete(f"/v1/files/{f['id']}", headers=alice)).status_code == 200
    assert leftovers(svc) == [] and store.list_files() == []


def test_store_files_table_migrates_and_round_trips(db_url):
    from sqlalchemy import create_engine, inspect

    from service.store import MIGRATIONS, FileRow, SchemaVersion, Store

    engine = create_engine(normalise(db_url))
    with engine.begin() as conn:  # a data dir as the release before files left it
        SchemaVersion.__table__.create(conn)
        for step in MIGRATIONS[:2]:
            step(conn)
        conn.execute(SchemaVersion.__table__.insert().values(id=1, version=2))
    engine.dispose()
    store = Store(db_url)
    try:
        assert "files" in inspect(store.engine).get_table_names()
        rows = [FileRow(id=f"file-{i:024x}", owner=owner, purpose="weights", filename="w.pt", size=10, sha256="0" * 64,
                        format="pt", stored="weights.pt", info="{}", shared=shared, created_at=float(i))
                for i, (owner, shared) in enumerate([("a", False), ("b", False), ("b", True)])]
        for r in rows:
            store.add_file(r)
        assert [r.id for r in store.list_files("a")] == [rows[0].id]
        assert [r.id for r in store.list_files("a", shared=True)] == [rows[2].id, rows[0].id]
        assert [r.id for r in store.list_files()] == [rows[2].id, rows[1].id, rows[0].id]
        assert store.get_file(rows[1].id).owner == "b" and store.get_file("file-" + "f" * 24) is None
        assert store.delete_file(rows[1].id).id == rows[1].id and store.delete_file(rows[1].id) is None
    finally:
        store.close()


# ----------------------------------------------------------------------------- hostile and broken files
async def test_a_pickle_that_runs_code_is_refused_without_running(svc, tmp_path):
    h = svc.auth(svc.key(("jobs",)))
    marker = tmp_path / "pwned"
    for name, data, why in (("evil.pt", pickle.dumps(RunsCode(marker)), "Unsupported operand"),  # a bare pickle
                            ("evil.pth", pt_bytes({"w": RunsCode(marker)}), "posix.mkdir")):  # in torch.save's zip
        err = await assert_refused(svc, h, data, "weights", "invalid_weights", [name, "weights_only", why], name)
        assert "weights_only` set to `False`" not in err["message"]  # not torch's advice to load it anyway
        assert not marker.exists()
    pickle.loads(pickle.dumps(RunsCode(marker)))  # the payload is live: unpickled, it does run
    assert marker.is_dir()


async def test_bad_weights(svc):
    h = svc.auth(svc.key(("jobs",)))
    await assert_refused(svc, h, b"\x00" * 64, "weights", "invalid_weights", ["junk.bin"], "junk.bin")
    await assert_refused(svc, h, safetensors_bytes()[:-5], "weights", "invalid_weights", ["safetensors"])
    await assert_refused(svc, h, pt_bytes({"n": 3}), "weights", "invalid_weights", ["state dict of tensors"])
    # a script where the weights go: in words, not torch's unpickler ("Unsupported operand 105")
    err = await assert_refused(svc, h, b"import torch\nmodel = torch.nn.Linear(2, 2)\n", "weights", "invalid_weights",
                               ["model.py", "neither a safetensors file nor a torch checkpoint"], "model.py")
    assert "operand" not in err["message"]


@pytest.mark.parametrize("members,links,words", [
    ({"../x.png": png(), "a/0.png": png()}, None, ["'../x.png'", ".."]),
    ({"cat/../../x.png": png()}, None, [".."]),
    ({"/tmp/abs.png": png()}, None, ["absolute"]),
    ({"cat/0.png": png(), "dog/0.png": png()}, {"dog/passwd.png": "/etc/passwd"}, ["symbolic link"]),
    ({"cat/0.png": png(), "dog/0.png": b"not a png"}, None, ["dog/0.png", "not a readable image"]),
    ({"cat/0.png": png(), "cat/1.png": png()}, None, ["one class folder"]),
    ({"cat/0.png": png(), "dog/readme.txt": b"hi"}, None, ["dog holds no images"]),
    ({"cat/0.png": png((4100, 4100), "1"), "dog/0.png": png()}, None, ["4100×4100", "over the limit"]),
    # passed as a header alone, then failed every job: cut short ("image file is truncated"), or of a format its
    # extension does not name (an EPS as x.png: Pillow handed it to Ghostscript)
    ({"cat/0.png": png(), "dog/0.png": png((64, 64))[:-40]}, None, ["dog/0.png", "not a readable image"]),
    ({"cat/0.png": png(), "dog/0.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"}, None,
     ["dog/0.png", "not a readable image"]),
], ids=["slip", "slip-nested", "absolute", "symlink", "bad-image", "one-class", "no-images", "pixel-bomb",
        "truncated-png", "eps-named-png"])
async def test_dataset_zip_refused(svc, members, links, words):
    h = svc.auth(svc.key(("jobs",)))
    await assert_refused(svc, h, zip_of(members, links=links), "dataset", "invalid_dataset", words, "d.zip")
    assert not (svc.settings.files_dir.parent / "x.png").exists() and not Path("/tmp/abs.png").exists()


def _damaged(data: bytes, how: str) -> bytes:
    """A zip as a corrupt, encrypted or exotic archive has it: its first member's compressed bytes flipped (a bad
    CRC or deflate stream), or its headers' flags (encrypted) or method (9, deflate64) patched."""
    out = bytearray(data)
    if how == "corrupt":
        name_len, extra_len = struct.unpack_from("<HH", out, 26)
        at = 30 + name_len + extra_len + 60  # inside the first member's data, past the .npy header
        out[at:at + 16] = bytes(b ^ 0x5A for b in out[at:at + 16])
        return bytes(out)
    field, value = {"encrypted": ((6, 8), 1), "method 9": ((8, 10), 9)}[how]
    for header, offset in ((b"PK\x03\x04", field[0]), (b"PK\x01\x02", field[1])):
        i = 0
        while (i := out.find(header, i)) >= 0:
            struct.pack_into("<H", out, i + offset, value)
            i += 4
    return bytes(out)


@pytest.mark.parametrize("how", ["corrupt", "encrypted", "method 9"])
async def test_a_damaged_archive_is_a_422_not_a_500(svc, how):
    """zipfile's BadZipFile (a bad CRC), zlib.error, RuntimeError (encrypted) and NotImplementedError (an unknown
    method) escaped the upload check: 500s, for an .npz and an image folder alike."""
    h = svc.auth(svc.key(("jobs",)))
    rng = np.random.default_rng(0)
    arrays = io.BytesIO()
    np.savez_compressed(arrays, x=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y=np.arange(40) % 4)
    folder = zip_of({f"{c}/{i}.png": png((16, 16)) for c in ("cat", "dog") for i in range(3)})
    for data, name in ((arrays.getvalue(), "d.npz"), (folder, "d.zip")):
        await assert_refused(svc, h, _damaged(data, how), "dataset", "invalid_dataset", [name], name)


async def test_bad_npz(svc):
    h = svc.auth(svc.key(("jobs",)))
    x, y = np.zeros((10, 8, 8), np.uint8), np.arange(10) % 2
    # a header declaring (5, 2**32, 2**32) over no data: numpy's int64 product of its shape wraps to 0, and it passed
    huge = io.BytesIO()
    with zipfile.ZipFile(huge, "w") as z:
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False,
                                                    "shape": (5, 2**32, 2**32)})
        z.writestr("x.npy", head.getvalue())  # the magic and the header, then none of its 8e19 bytes
        y_buf = io.BytesIO()
        np.save(y_buf, np.arange(5) % 2)
        z.writestr("y.npy", y_buf.getvalue())
    cases = [(huge.getvalue(), ["'x'", "not the size its header says"]),
             (npz_bytes(x=x), ["no array 'y'"]),
             (npz_bytes(x=x, y=y[:5]), ["one label per image"]),
             (npz_bytes(x=np.zeros((10, 5, 8, 8)), y=y), ["C 1 or 3"]),
             (npz_bytes(x=x, y=np.array([object()] * 10)), ["Python objects", "pickle"]),
             (npz_bytes(x=x, y=-y), ["labels must be >= 0"]),
             # wider than 16 bits: divided by 255, not refused
             (npz_bytes(x=x.astype(np.uint32), y=y), ["uint32 pixels", "uint16", "x.astype(np.uint16)"]),
             (npz_bytes(x=x, y=y, labels=np.array(["cat", "cat"])), ["two classes are named 'cat'"]),
             (npz_bytes(x=x, y=y, labels=np.array(["cat", ""])), ["class 1 has a blank name"]),
             (npz_bytes(x=x, y=y, labels=np.array(["cat", "lone\ud800"])), ["lone surrogate"]),
             # class folders name the classes too: an escape in one was printed by every terminal listing them
             (zip_of({f"{c}/{i}.png": png() for c in ("cat", "\x1b[2Jdog") for i in range(3)}),
              ["class folders name the classes", "U+001B"])]
    for data, words in cases:
        await assert_refused(svc, h, data, "dataset", "invalid_dataset", words, "d.npz")


async def test_archive_limits_refuse_a_zip_bomb(tmp_path, bundles):
    svc, manager = await start_service(make_settings(tmp_path / "data", bundles, max_unpacked_bytes=1 << 20,
                                                     max_archive_members=50))
    try:
        h = svc.auth(svc.key(("jobs", "deploy")))
        bomb = zip_of({"cat/0.png": png(), "dog/zeros.png": b"\0" * (8 << 20)})  # 8 MiB of zeros: ~8 KiB zipped
        assert len(bomb) < 64 << 10
        await assert_refused(svc, h, bomb, "dataset", "invalid_dataset", ["unpacks to", "over the limit of 1048576"])
        many = zip_of({f"cat/{i}.png": b"" for i in range(51)})
        await assert_refused(svc, h, many, "dataset", "invalid_dataset", ["51 archive members", "limit of 50"])
        await assert_refused(svc, h, npz_bytes(x=np.zeros((300, 32, 32), np.float32), y=np.zeros(300, np.int64)),
                             "dataset", "invalid_dataset", ["over the limit"])
        await assert_refused(svc, h, zip_of({"meta.json": b"{}", "model.onnx": b"\0" * (2 << 20)}), "bundle",
                             "invalid_bundle", ["unpacks to"])
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_bad_images_and_bundles(svc, bundles, tmp_path):
    h = svc.auth(svc.key(("jobs",)))
    await assert_refused(svc, h, b"not an image", "image", "invalid_image", ["x.png", "not a readable"], "x.png")
    await assert_refused(svc, h, png()[:40], "image", "invalid_image", ["not a readable"])
    gif = io.BytesIO()
    Image.new("L", (4, 4)).save(gif, "GIF")
    await assert_refused(svc, h, gif.getvalue(), "image", "invalid_image", ["GIF"])
    await assert_refused(svc, h, png((4100, 4100), "1"), "image", "invalid_image", ["over the limit"])
    await assert_refused(svc, h, b"PK junk", "bundle", "invalid_bundle", ["not a zip"])
    await assert_refused(svc, h, zip_of({"model.onnx": b"x"}), "bundle", "invalid_bundle", ["meta.json is missing"])
    members = {p.name: p.read_bytes() for p in bundles.b.iterdir()}
    members["model.onnx"] = members["model.onnx"][:-1] + b"!"
    await assert_refused(svc, h, zip_of(members), "bundle", "invalid_bundle", ["model.onnx was altered"], "b.sdb")
    # A name or version JSON cannot write (a lone surrogate, an integer past 64 bits) was stored, and every listing
    # of the uploader's files, and of every admin's, was a 500 that never showed the id to delete it by.
    for field, value in (("name", "x\ud800"), ("version", 2 ** 70)):
        members = {p.name: p.read_bytes() for p in bundles.b.iterdir()}
        meta = json.loads(members["meta.json"])
        meta[field] = value
        members["meta.json"] = json.dumps(meta).encode()
        await assert_refused(svc, h, zip_of(members), "bundle", "invalid_bundle", ["JSON cannot write"], "b.sdb")
    assert (await svc.client.get("/v1/files", headers=h)).status_code == 200


async def test_request_errors(svc):
    c, h = svc.client, svc.auth(svc.key(("jobs",)))
    r = await c.post("/v1/files", headers=h, json={"purpose": "weights"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = await c.post("/v1/files", headers=h, files={"file": ("w", safetensors_bytes())})
    assert r.status_code == 422 and "purpose is required" in r.json()["error"]["message"]
    r = await upload(svc, h, safetensors_bytes(), "model")
    assert r.status_code == 422 and "weights, dataset, image, bundle" in r.json()["error"]["message"]
    r = await upload(svc, h, b"", "weights")
    assert r.status_code == 422 and r.json()["error"]["code"] == "empty_file"
    multipart = {"content-type": "multipart/form-data; boundary=b", **h}
    r = await c.post("/v1/files", headers=multipart,
                     content=b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nweights\r\n--b--\r\n')
    assert r.status_code == 422 and "no file" in r.json()["error"]["message"]
    r = await c.post("/v1/files", headers=multipart, content=b"--b\r\nnot a header\r\n\r\n")
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_body"
    assert (await c.get("/v1/files/../../etc/passwd", headers=h)).status_code == 404
    assert (await c.get("/v1/files/nonsense", headers=h)).status_code == 404
    assert leftovers(svc) == []


async def test_size_limit_413_leaves_nothing(tmp_path, bundles):
    svc, manager = await start_service(make_settings(tmp_path / "data", bundles, max_file_bytes=4096))
    try:
        h = svc.auth(svc.key(("jobs",)))
        r = await upload(svc, h, b"\0" * 4097, "weights")
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large", r.text
        assert "4096-byte limit (SDB_MAX_FILE_BYTES)" in r.json()["error"]["message"]
        r = await upload(svc, h, b"\0" * (200 << 10), "weights")  # over the route's body limit too: not even read
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
        # the limit the operator set, by its name (the body limit adds the form's framing to it)
        assert "a file up to 4096 bytes (SDB_MAX_FILE_BYTES)" in r.json()["error"]["message"]
        assert leftovers(svc) == [] and svc.app.state.store.list_files() == []
        assert (await upload(svc, h, safetensors_bytes(), "weights")).status_code == 201
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


# ----------------------------------------------------------------------------- POST /v1/models
async def test_deploy_an_uploaded_bundle(svc, bundles):
    c = svc.client
    deployer = svc.auth(svc.key(("deploy",)))
    first = sorted((svc.settings.bundles_dir / "digits-b").iterdir())
    r = await deploy(c, bundles.b, svc.admin)  # multipart: the next version of the bundle's name
    assert r.status_code == 201 and (r.json()["name"], r.json()["version"]) == ("digits-b", "2"), r.text
    f = (await upload(svc, deployer, sdb_bytes(bundles.b), "bundle", "b.sdb")).json()
    r = await c.post("/v1/models", json={"file": f["id"], "name": "digits-c"}, headers=deployer)
    assert r.status_code == 201 and (r.json()["name"], r.json()["version"]) == ("digits-c", "1"), r.text
    x = {"inputs": bundles.x[:2].tolist()}
    assert (await c.post("/v1/models/digits-c/predict", json=x)).status_code == 200
    assert (await c.get("/v1/files/" + f["id"], headers=deployer)).status_code == 200  # the file stays
    adds = [a for a in svc.app.state.store.audit_log() if a.action == "model.add"]
    assert [(a.target, a.actor) for a in adds[:2]] == [("digits-c@1", api_key(svc, deployer["Authorization"][7:]).id),
                                                       ("digits-b@2", api_key(svc, svc.admin["Authorization"][7:]).id)]
    served = sorted((svc.settings.bundles_dir / "digits-b").iterdir())
    assert len(served) == 2 and set(first) < set(served)  # a new file: never over a served bundle


async def test_deploy_refusals(svc, bundles, tmp_path):
    c = svc.client
    deployer = svc.auth(svc.key(("deploy",)))
    before = (await c.get("/v1/models")).json()
    files_before = sorted((svc.settings.bundles_dir / "digits-b").iterdir())
    r = await c.post("/v1/models", json={"path": str(bundles.b)}, headers=deployer)
    assert r.status_code == 422 and r.json()["error"]["code"] == "server_path_refused"
    r = await c.post("/v1/models", json={"file": "file-" + "0" * 24}, headers=deployer)
    assert r.status_code == 404
    other = (await upload(svc, svc.auth(svc.key(("jobs",))), sdb_bytes(bundles.b), "bundle")).json()["id"]
    assert (await c.post("/v1/models", json={"file": other}, headers=deployer)).status_code == 404
    weights = (await upload(svc, deployer, safetensors_bytes(), "weights")).json()["id"]
    r = await c.post("/v1/models", json={"file": weights}, headers=deployer)
    assert r.status_code == 422 and "uploaded as weights" in r.json()["error"]["message"]
    r = await c.post("/v1/models", files={"file": ("b.sdb", sdb_bytes(bundles.b))}, data={"name": "../x"},
                     headers=deployer)
    assert r.status_code == 422
    members = {p.name: p.read_bytes() for p in bundles.b.iterdir()}
    meta = json.loads(members["meta.json"])
    meta["lam"] = 0.9  # the file hashes still verify; the sealed key refuses to open
    r = await c.post("/v1/models", files={"file": ("t.sdb", zip_of({**members, "meta.json": json.dumps(meta).encode()}))},
                     data={"name": "digits-t"}, headers=deployer)  # a name of its own: refused for the bundle alone
    assert r.status_code == 400 and r.json()["error"]["code"] == "bundle_refused"
    assert list((svc.settings.bundles_dir / "digits-t").glob("*")) == []  # the copy that failed is gone
    assert str(svc.settings.data_dir) not in r.text
    r = await c.post("/v1/models", files={"file": ("b.sdb", sdb_bytes(bundles.b))}, headers=svc.auth(svc.key(("jobs",))))
    assert r.status_code == 403
    r = await c.post("/v1/models", content=b"x", headers={**deployer, "content-type": "text/plain"})
    assert r.status_code == 415
    assert (await c.get("/v1/models")).json() == before
    assert sorted((svc.settings.bundles_dir / "digits-b").iterdir()) == files_before


# ----------------------------------------------------------------------------- the SDK, over real HTTP
def test_sdk_and_cli_end_to_end(tmp_path, bundles):
    from sdb_client import AsyncClient, Client, NotFound

    from .conftest import run_sdb

    settings = make_settings(tmp_path / "data", bundles, register_demo=False)
    app = build_app(settings)
    srv = ThreadServer(app)
    try:
        store = app.state.store
        token, _ = create_key(store, settings.pepper, scopes=["jobs", "deploy"])
        weights = tmp_path / "teacher.safetensors"
        weights.write_bytes(safetensors_bytes())
        tree = tmp_path / "pets"
        for c in ("cat", "dog"):
            (tree / c).mkdir(parents=True)
            for i in range(3):
                (tree / c / f"{i}.png").write_bytes(png())
        with Client(srv.url, token) as client:
            w = client.files.upload(weights, "weights")
            d = client.files.upload(tree, "dataset")  # a folder is zipped on the way
            assert (w["format"], d["format"], d["info"]["classes"]) == ("safetensors", "imagefolder", ["cat", "dog"])
            assert {f["id"] for f in client.files.list()} == {w["id"], d["id"]}
            assert client.files.get(w["id"])["sha256"] == w["sha256"]
            served = client.deploy_model(bundles.a)  # a bundle folder, zipped as a .sdb
            assert (served["name"], served["version"]) == ("digits-a", "1")
            b = client.files.upload(sdb_bytes_file(tmp_path, bundles.b), "bundle")
            z = client.deploy_model(b["id"], name="digits-z", policy="top_k", top_k=3, decimals=2)
            assert z["name"] == "digits-z" and z["output_policy"] == {"policy": "top_k", "top_k": 3, "decimals": 2}
            client.files.delete(w["id"])
            with pytest.raises(NotFound):
                client.files.get(w["id"])

        async def async_side() -> None:
            async with AsyncClient(srv.url, token) as ac:
                f = await ac.files.upload(weights, "weights")
                assert [x["id"] for x in await ac.files.list() if x["purpose"] == "weights"] == [f["id"]]
                served = await ac.deploy_model(bundles.a, policy="label")
                assert served["version"] == "2" and served["output_policy"]["policy"] == "label"
                assert (await ac.files.delete(f["id"]))["deleted"]

        anyio.run(async_side)
        env = {**os.environ, "SDB_URL": srv.url, "SDB_API_KEY": token}
        up = run_sdb("files", "upload", str(weights), "--purpose", "weights", env=env)
        assert up.returncode == 0, up.stderr
        file_id = up.stdout.strip()
        listed = run_sdb("files", "list", env=env)
        assert file_id in listed.stdout and "safetensors" in listed.stdout
        assert run_sdb("files", "delete", file_id, env=env).returncode == 0
        gone = run_sdb("files", "get", file_id, env=env)
        assert gone.returncode == 2 and "file_not_found" in gone.stderr
    finally:
        srv.stop()


def sdb_bytes_file(tmp_path: Path, bundle: Path) -> Path:
    out = tmp_path / f"{bundle.name}.sdb"
    out.write_bytes(sdb_bytes(bundle))
    return out


def test_sync_and_async_clients_have_the_same_files_methods():
    from sdb_client import AsyncClient, Client

    c, a = Client("http://127.0.0.1:1"), AsyncClient("http://127.0.0.1:1")
    public = lambda o: {n for n in dir(o) if not n.startswith("_")}
    assert public(c.files) == public(a.files) == {"upload", "list", "get", "delete"}
    assert hasattr(c, "deploy_model") and hasattr(a, "deploy_model")
    c.close()
