"""A key's file storage cap is exact under concurrency: many uploads by one key at once keep at most
the cap between them, on SQLite and on PostgreSQL.

Before the fix each upload read the bytes its key kept, checked its own against the cap and only
then (after checking the file) recorded it: uploads sent together all read the same total, all
passed, and together kept several times the cap. Now an upload reserves its bytes in the store,
in one transaction that checks the cap, before anything else, and gives them back if it fails.
"""
from __future__ import annotations

import asyncio

import pytest

from tests.security.test_rate_limits_and_caps import png, upload_image
from tests.service.conftest import make_settings, start_service

pytestmark = pytest.mark.anyio

UPLOADS = 8
SIZE = len(png(0))  # every png() is this size
CAP = 2 * SIZE + 200  # two files fit, a third does not


@pytest.fixture
async def capped(tmp_path, bundles, db_url):  # db_url: the store matrix, SQLite and PostgreSQL
    settings = make_settings(tmp_path / "data", bundles, workers=0, max_file_storage_per_key=CAP,
                             rate_limit_key_per_s=0)
    svc, manager = await start_service(settings)
    try:
        yield svc
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


async def test_uploads_sent_together_keep_at_most_the_cap(capped):
    h = capped.auth(capped.key(("jobs",)))
    c = capped.client

    answers = await asyncio.gather(*(upload_image(c, h, seed) for seed in range(UPLOADS)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 2 + [413] * (UPLOADS - 2), [r.text for r in answers]
    for r in answers:
        if r.status_code == 413:
            assert r.json()["error"]["code"] == "storage_exceeded", r.text
    kept = (await c.get("/v1/files", headers=h)).json()["files"]
    assert len(kept) == 2 and sum(f["bytes"] for f in kept) <= CAP
    folders = [p for p in capped.settings.files_dir.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in folders) == sorted(f["id"] for f in kept)  # the refused ones left nothing

    # Refused and failed uploads gave their reservations back: after a delete there is room for one again.
    broken = await c.post("/v1/files", headers=h, data={"purpose": "image"},
                          files={"file": ("x.png", b"not a png" * 100, "image/png")})
    assert broken.status_code == 413  # at the cap: refused before the file is even checked
    assert (await c.delete(f"/v1/files/{kept[0]['id']}", headers=h)).status_code == 200
    broken = await c.post("/v1/files", headers=h, data={"purpose": "image"},
                          files={"file": ("x.png", b"not a png" * 100, "image/png")})
    assert broken.status_code == 422, broken.text  # checked, refused, and its bytes given back
    again = await asyncio.gather(*(upload_image(c, h, seed) for seed in range(10, 10 + UPLOADS)))
    assert sorted(r.status_code for r in again) == [201] + [413] * (UPLOADS - 1), [r.text for r in again]
