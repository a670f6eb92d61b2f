"""The SQLite store deleted or replaced under a running server, and a store that cannot be opened.

Before the fix the server's open connections went on writing the deleted file's inode: `/readyz` said
ready while `sdb keys create` wrote keys into a new file the server never read, and a revocation there
found no key. Now readiness answers 503 ``store_unreachable``. ``open_store`` (what the CLI and
`sdb serve` open the store with) turns every failure into one line naming the URL, never its password.
"""
from __future__ import annotations

import io
import shutil

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from service.app import build_app
from service.auth import create_key
from service.store import MOVED, Store, StoreUnavailable, open_store


def test_ping_fails_once_the_sqlite_file_is_deleted_or_replaced(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = Store(f"sqlite:///{path}")
    try:
        store.ping()
        shutil.copy(path, tmp_path / "copy.sqlite3")
        for p in tmp_path.glob("s.sqlite3*"):
            p.unlink()
        with pytest.raises(StoreUnavailable, match="deleted or replaced"):
            store.ping()
        shutil.copy(tmp_path / "copy.sqlite3", path)  # a restored copy is another file: still not this one
        with pytest.raises(StoreUnavailable, match="deleted or replaced"):
            store.ping()
    finally:
        store.close()


@pytest.mark.anyio
async def test_readyz_is_503_when_the_store_file_is_deleted(tmp_path, own_settings):
    settings = own_settings
    app = build_app(settings)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/readyz")).status_code == 200
            for p in settings.data_dir.glob("sdb.sqlite3*"):
                p.unlink()
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unreachable"


@pytest.mark.anyio
async def test_writes_are_refused_once_the_store_file_is_deleted(tmp_path, own_settings):
    """With the file deleted, readiness said 503 while a key was created (201, its secret shown) and a file uploaded
    into the deleted file's inode: both unknown after a restart. Each commit now checks the file first: 503, nothing
    kept, no secret shown."""
    settings = own_settings
    app = build_app(settings)
    async with LifespanManager(app):
        admin, _ = create_key(app.state.store, settings.pepper, scopes=("admin",))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     headers={"Authorization": f"Bearer {admin}"}) as c:
            assert (await c.get("/v1/keys")).status_code == 200  # the admin key read and cached
            for p in settings.data_dir.glob("sdb.sqlite3*"):
                p.unlink()
            r = await c.post("/v1/keys", json={"scopes": ["predict"]})
            assert r.status_code == 503 and r.json()["error"] == {"code": "store_unavailable", "message": MOVED}, r.text
            assert "sdb_" not in r.text and str(tmp_path) not in r.text
            data = io.BytesIO()
            np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))
            r = await c.post("/v1/files", files={"file": ("d.npz", data.getvalue())}, data={"purpose": "dataset"})
            assert r.status_code == 503, r.text
    assert list((settings.files_dir).glob("file-*")) == []  # the upload left nothing behind


@pytest.mark.parametrize(("url", "needle"), [
    ("notaurl", "not a database URL"),
    ("sqlite:////nonexistent/dir/x.db", "unable to open database file"),
    ("postgresql://sdb:hunter2@127.0.0.1:1/db", "postgresql://sdb:***@127.0.0.1:1/db"),
])
def test_open_store_refuses_in_one_line_without_the_password(url, needle):
    with pytest.raises(StoreUnavailable) as e:
        open_store(url)
    assert needle in str(e.value) and "\n" not in str(e.value) and "hunter2" not in str(e.value)
