"""The store's disk full: SQLite's SQLITE_FULL (PostgreSQL's disk_full alike) answered as what it is.

Before the fix a key create, a distill or a job submit on a full disk answered 503 ``store_unavailable`` "unavailable
for a moment: retry" (Retry-After 1: clients retried every second, for as long as the disk stayed full) while
``/readyz`` said ready. Now it is 507 ``insufficient_storage`` saying the server's disk is full, as an upload on a full
disk is, and readiness is 503 until a write passes again. The disk is filled for real: SQLite's own page limit
(``PRAGMA max_page_count``) makes it answer SQLITE_FULL exactly as a full disk does.
"""
from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from service.app import build_app
from service.auth import create_key
from service.settings import Settings
from service.store import STORE_FULL, Store


def cap_pages(store: Store, pages: int) -> None:
    """Let the store's SQLite file grow to ``pages`` pages at most, on every connection from now on."""
    def limit(dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count={pages}")

    event.listen(store.engine, "connect", limit)
    store.engine.dispose()  # the connections open now were made without it


def fill(store: Store, pepper: bytes) -> None:
    """Write keys until the store says it is full (a few pages' worth)."""
    for _ in range(1000):
        try:
            create_key(store, pepper, scopes=("predict",))
        except OperationalError as e:
            assert "full" in str(e)
            return
    raise AssertionError("the store never filled")


@pytest.mark.anyio
async def test_a_full_store_is_a_507_that_says_so_and_not_ready_until_a_write_passes(tmp_path, monkeypatch):
    for k in ("SDB_DATABASE_URL", "SDB_MASTER_KEY_FILE", "SDB_PEPPER_FILE", "SDB_SECRETS_DIR"):
        monkeypatch.delenv(k, raising=False)
    settings = Settings(data_dir=tmp_path / "data", register_demo=False, workers=0)
    app = build_app(settings)
    async with LifespanManager(app):
        store = app.state.store
        admin, _ = create_key(store, settings.pepper, scopes=("admin",))
        with store.engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
        cap_pages(store, pages + 2)
        fill(store, settings.pepper)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     headers={"Authorization": f"Bearer {admin}"}) as c:
            r = await c.post("/v1/keys", json={"scopes": ["predict"]})
            assert r.status_code == 507, r.text
            assert r.json()["error"] == {"code": "insufficient_storage", "message": STORE_FULL}
            assert "disk is full" in STORE_FULL and "retry-after" not in r.headers
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_full", r.text

            cap_pages(store, 1 << 30)  # an administrator freed space
            assert (await c.get("/readyz")).status_code == 503  # still: no write has passed yet
            assert (await c.post("/v1/keys", json={"scopes": ["predict"]})).status_code == 201
            assert (await c.get("/readyz")).status_code == 200
