"""Lists a page at a time (``GET /v1/files``, ``/v1/jobs``, ``/v1/keys``): a key without admin pages through its own
rows alone, whatever page start it sends (a ``next`` is a position, not a grant: one made from another key's row
positions within this key's rows), and the jobs list's model filter narrows a key's own jobs, never another's. The
keys list stays admin-only, paged or not."""
from __future__ import annotations

import base64
import json

import pytest

from tests.service.test_list_paging import NOW, add_files, add_jobs, app, every_page, new_key  # noqa: F401 - fixture

pytestmark = pytest.mark.anyio


def cursor_at(created_at: float, row_id: str) -> str:
    """A page start naming any row, as a caller could forge it (the server's own form)."""
    return base64.urlsafe_b64encode(json.dumps([created_at, row_id]).encode()).rstrip(b"=").decode()


async def test_a_key_pages_its_own_files_and_jobs_alone_whatever_start_it_sends(app):  # noqa: F811
    mine, mine_h = new_key(app, "jobs")
    theirs, _ = new_key(app, "jobs")
    my_files, their_files = add_files(app, mine, 5), add_files(app, theirs, 5)
    my_jobs = add_jobs(app, mine, 5)
    their_jobs = add_jobs(app, theirs, 5, targets=lambda i: {"model": "theirs-model", "version": "1"})
    for path, name, own, other in (("/v1/files", "files", my_files, their_files),
                                   ("/v1/jobs", "jobs", my_jobs, their_jobs)):
        seen = [r["id"] for page in await every_page(app, path, mine_h, name, 2) for r in page]
        assert sorted(seen) == sorted(own), path
        for forged in (cursor_at(NOW + 100, "0"), cursor_at(NOW - 10 + 0.0045, other[-1])):
            r = await app.state.client.get(path, params={"before": forged, "limit": 100}, headers=mine_h)
            assert r.status_code == 200 and not {x["id"] for x in r.json()[name]} & set(other), (path, r.text)
    r = await app.state.client.get("/v1/jobs", params={"model": "theirs-model"}, headers=mine_h)
    assert r.status_code == 200 and r.json()["jobs"] == []
    r = await app.state.client.get("/v1/keys", params={"limit": 1}, headers=mine_h)
    assert r.status_code == 403
