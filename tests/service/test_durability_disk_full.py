"""A write that fails half-way: the server process may write no file past a size (``RLIMIT_FSIZE``, with
SIGXFSZ ignored, as a real full disk or quota answers ``write()`` with an error). A deploy whose copy of the
bundle cannot be written whole answers a clear error and leaves nothing: no half-written bundle beside the
served ones, no version registered; once the disk has room the same deploy serves version 1. The store is
PostgreSQL, whose writes are another process's, so the limit falls on the server's own files only."""
from __future__ import annotations

import contextlib
import resource
import signal

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


@pytest.fixture
async def svc_pg(db_url, tmp_path, bundles):
    """The app on PostgreSQL (SQLite's own writes would meet the file-size limit too) and a bundle's bytes."""
    settings = make_settings(tmp_path / "data", bundles)
    svc, manager = await start_service(settings)
    try:
        yield svc, settings, sdb_bytes(bundles.a)
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


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
