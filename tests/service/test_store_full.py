"""The store's disk full: SQLite's SQLITE_FULL (PostgreSQL's disk_full alike) answered as what it is.

Before the fix a key create, a distill or a job submit on a full disk answered 503 ``store_unavailable`` "unavailable
for a moment: retry" (Retry-After 1: clients retried every second, for as long as the disk stayed full) while
``/readyz`` said ready. Now it is 507 ``insufficient_storage`` saying the server's disk is full, as an upload on a full
disk is, and readiness is 503 until a write passes again: its own probe writes a page, so that a replica that gets no
traffic while it is not ready comes back once space is freed. The disk is filled for real: SQLite's own page limit
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


@pytest.fixture
async def full_app(own_settings):
    """The app on a SQLite store whose disk is full (its page limit reached), and an admin key's secret."""
    settings = own_settings
    app = build_app(settings)
    async with LifespanManager(app):
        store = app.state.store
        admin, _ = create_key(store, settings.pepper, scopes=("admin",))
        with store.engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
        cap_pages(store, pages + 2)
        fill(store, settings.pepper)
        yield app, admin


@pytest.mark.anyio
async def test_a_full_store_is_a_507_that_says_so_and_not_ready_until_space_is_freed(full_app):
    app, admin = full_app
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"Authorization": f"Bearer {admin}"}) as c:
        r = await c.post("/v1/keys", json={"scopes": ["predict"]})
        assert r.status_code == 507, r.text
        assert r.json()["error"] == {"code": "insufficient_storage", "message": STORE_FULL}
        assert "disk is full" in STORE_FULL and "retry-after" not in r.headers
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_full", r.text

        cap_pages(app.state.store, 1 << 30)  # an administrator freed space
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.post("/v1/keys", json={"scopes": ["predict"]})).status_code == 201


@pytest.mark.anyio
async def test_a_replica_that_gets_only_readiness_probes_is_ready_again_once_space_is_freed(full_app):
    """Readiness told whether a write had passed since the disk filled, and nothing else: a replica out of rotation
    gets no write, so once space was freed it stayed 503 store_full for ever. The probe now makes a write that needs
    a page itself: it fails while the disk is full, and passes once there is room, leaving nothing behind."""
    from sqlalchemy import func, select

    from service.store import AuditRow

    app, _ = full_app
    store = app.state.store
    with store.session() as s:
        audit_rows = s.scalar(select(func.count()).select_from(AuditRow))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for _ in range(3):  # the probe's write meets the full disk as any write does
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_full", r.text
        cap_pages(store, 1 << 30)  # an administrator freed space; no request comes but the probes
        for _ in range(2):
            r = await c.get("/readyz")
            assert r.status_code == 200, r.text
    with store.session() as s:  # the probe's row was added and deleted in one transaction
        assert s.scalar(select(func.count()).select_from(AuditRow)) == audit_rows
