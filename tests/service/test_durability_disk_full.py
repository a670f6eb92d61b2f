"""A write that fails half-way: the server process may write no file past a size (``RLIMIT_FSIZE``, with
SIGXFSZ ignored, as a real full disk or quota answers ``write()`` with an error). A deploy whose copy of the
bundle cannot be written whole answers a clear error and leaves nothing: no half-written bundle beside the
served ones, no version registered; once the disk has room the same deploy serves version 1. The store is
PostgreSQL, whose writes are another process's, so the limit falls on the server's own files only."""
from __future__ import annotations

import builtins
import contextlib
import errno
import os
import resource
import signal
from pathlib import Path

import pytest

from .conftest import make_settings, sdb_bytes, start_service


@contextlib.contextmanager
def files_at_most(limit: int):
    old_soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG, nothing is killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (old_soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


@contextlib.asynccontextmanager
async def service_and_bundle(tmp_path, bundles):
    """The app on the test's store (SDB_DATABASE_URL when ``db_url`` set it, else SQLite) and a bundle's bytes."""
    settings = make_settings(tmp_path / "data", bundles)
    svc, manager = await start_service(settings)
    try:
        yield svc, settings, sdb_bytes(bundles.a)
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


@pytest.fixture
async def svc_pg(db_url, tmp_path, bundles):
    """On PostgreSQL: SQLite's own writes would meet the file-size limit too."""
    async with service_and_bundle(tmp_path, bundles) as service:
        yield service


@pytest.mark.anyio
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_deploy_whose_copy_fails_half_way_leaves_nothing(svc_pg):
    svc, settings, data = svc_pg
    tok = svc.key(("deploy",))
    r = await svc.client.post("/v1/files", files={"file": ("a.sdb", data)}, data={"purpose": "bundle"},
                              headers=svc.auth(tok))
    assert r.status_code == 201, r.text
    body = {"file": r.json()["id"], "name": "full"}
    with files_at_most(len(data) // 3):
        r = await svc.client.post("/v1/models", json=body, headers=svc.auth(tok))
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_storage" and str(settings.data_dir) not in err["message"]
    left = sorted(p.name for p in settings.bundles_dir.rglob("*"))
    assert left == [], f"a half-written bundle stays: {left}"
    assert svc.app.state.store.get_model("full") is None

    r = await svc.client.post("/v1/models", json=body, headers=svc.auth(tok))  # room again
    assert r.status_code == 201, r.text
    assert r.json()["version"] == "1"


@pytest.mark.anyio
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_an_upload_that_cannot_be_written_whole_leaves_nothing(svc_pg):
    from sqlalchemy import func, select

    from service.store import FileReservationRow

    svc, settings, data = svc_pg
    tok = svc.key(("jobs",))
    with files_at_most(len(data) // 3):
        r = await svc.client.post("/v1/files", files={"file": ("a.sdb", data)}, data={"purpose": "bundle"},
                                  headers=svc.auth(tok))
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_storage" and str(settings.data_dir) not in err["message"]
    store = svc.app.state.store
    assert store.list_files() == []
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(FileReservationRow)) == 0
    left = [p.name for p in settings.files_dir.rglob("*") if p.name != ".staging"]
    assert left == [], f"a half-written upload stays: {left}"
    r = await svc.client.post("/v1/files", files={"file": ("a.sdb", data)}, data={"purpose": "bundle"},
                              headers=svc.auth(tok))
    assert r.status_code == 201, r.text


def test_a_dataset_that_cannot_be_unpacked_for_want_of_room_is_the_servers_trouble(tmp_path):
    """Unpacking an uploaded dataset zip onto a disk with no room: a 507 that says so, not a 422 that blames the
    owner's file ("cannot be read as dataset"). Any store: only the unpacking writes."""
    import io
    import zipfile

    from service.errors import ApiError
    from service.filechecks import Limits, check_upload

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("cat/notes.txt", b"\0" * (1 << 20))  # 1 MiB that deflates to ~1 KiB
    src = tmp_path / "upload.zip"
    src.write_bytes(buf.getvalue())
    with files_at_most(1 << 16), pytest.raises(ApiError) as e:
        check_upload("dataset", src, tmp_path / "out", Limits(unpacked_bytes=1 << 30, members=100), "cats.zip")
    assert (e.value.status, e.value.code) == (507, "insufficient_storage"), e.value.message
    assert "cats.zip" in e.value.message and str(tmp_path) not in e.value.message


@contextlib.contextmanager
def no_new_folder_under(root: Path):
    """A new folder under ``root`` fails as on a full ext4 disk, where it takes a block (ENOSPC); tmpfs, which the
    tests' tmp may be, needs none. A folder that exists is no new one (``exist_ok``)."""
    real = Path.mkdir

    def mkdir(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        if self.is_relative_to(root) and not self.is_dir():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        real(self, mode, parents, exist_ok)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "mkdir", mkdir)
        yield


@pytest.fixture
async def svc_sqlite(tmp_path, bundles):
    async with service_and_bundle(tmp_path, bundles) as service:
        yield service


def _says_no_room(r, settings) -> None:
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_storage" and str(settings.data_dir) not in err["message"], err


@pytest.mark.anyio
async def test_an_upload_with_no_room_for_its_staging_folder_is_a_507(svc_sqlite):
    """A full ext4 disk refused the upload's staging folder: a 500 before (the mkdir was outside no_room)."""
    svc, settings, data = svc_sqlite
    tok = svc.key(("jobs", "deploy"))
    r = await svc.client.post("/v1/files", files={"file": ("a.sdb", data)}, data={"purpose": "bundle"},
                              headers=svc.auth(tok))
    assert r.status_code == 201, r.text  # files/.staging exists now, as on a server that took uploads before
    with no_new_folder_under(settings.files_dir):
        r = await svc.client.post("/v1/files", files={"file": ("a.sdb", data)}, data={"purpose": "bundle"},
                                  headers=svc.auth(tok))
        _says_no_room(r, settings)
        r = await svc.client.post("/v1/models", files={"file": ("a.sdb", data)}, headers=svc.auth(tok))
        _says_no_room(r, settings)
    assert len(svc.app.state.store.list_files()) == 1 and svc.app.state.store.list_models() == []


@pytest.mark.anyio
async def test_a_deploy_with_no_room_for_its_copy_is_a_507(svc_sqlite, monkeypatch):
    """A full ext4 disk refused the folder of a new model's copies, then the copy's file itself: each was a 500."""
    from service import copies

    svc, settings, data = svc_sqlite
    tok = svc.key(("jobs", "deploy"))
    r = await svc.client.post("/v1/files", files={"file": ("a.sdb", data)}, data={"purpose": "bundle"},
                              headers=svc.auth(tok))
    assert r.status_code == 201, r.text
    body = {"file": r.json()["id"], "name": "full"}
    with no_new_folder_under(settings.bundles_dir):
        _says_no_room(await svc.client.post("/v1/models", json=body, headers=svc.auth(tok)), settings)
    assert svc.app.state.store.get_model("full") is None

    r = await svc.client.post("/v1/models", json=body, headers=svc.auth(tok))
    assert r.status_code == 201 and r.json()["version"] == "1", r.text

    def no_new_file(file, mode="r", *args, **kwargs):
        if "x" in mode:  # an exclusive create: the copy's new file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(copies, "open", no_new_file, raising=False)
    _says_no_room(await svc.client.post("/v1/models", json=body, headers=svc.auth(tok)), settings)
    monkeypatch.undo()
    assert [m.version for m in svc.app.state.store.list_models()] == ["1"]
    assert len(list((settings.bundles_dir / "full").iterdir())) == 1  # version 1's copy alone
    r = await svc.client.post("/v1/models", json=body, headers=svc.auth(tok))
    assert r.status_code == 201 and r.json()["version"] == "2", r.text
