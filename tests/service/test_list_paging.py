"""The lists a team outgrows: ``GET /v1/files``, ``/v1/jobs`` and ``/v1/keys`` answer newest first a page at a time
and say where the next page starts (``next``, passed back as ``before``), so no row is out of everyone's reach; and a
version's leak audit is found by its target, however many audits are newer.

Before, files stopped at the newest 1,000 (the 1,001st-oldest vanished from every list while ``GET /v1/files/{id}``
found it), jobs older than the newest 1,000 could not be listed by anyone, keys came all at once (5,005 keys: 977 KB),
``sdb jobs list`` printed 100 without saying more existed, and the console told a version had no leak audit when
200 newer audits hid it. Rows are written straight to the store (a real one: SQLite, and PostgreSQL where a query
differs), as uploads and submissions leave them; the app and the CLI are the real ones."""
from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from asgi_lifespan import LifespanManager

from sdb_cli.main import main
from service.app import build_app
from service.auth import create_key
from service.settings import Settings
from service.store import FileRow, JobRow
from tests.client.conftest import ThreadServer

pytestmark = pytest.mark.anyio
NOW = time.time()


@pytest.fixture
async def app(tmp_path):
    """The service with no model, on the test's store (SDB_DATABASE_URL when ``db_url`` set it, else SQLite)."""
    settings = Settings(data_dir=tmp_path / "data", register_demo=False)
    application = build_app(settings)
    async with LifespanManager(application, startup_timeout=60) as manager:
        application.state.client = httpx.AsyncClient(transport=httpx.ASGITransport(manager.app),
                                                     base_url="http://sdb.test")
        yield application
        await application.state.client.aclose()


def new_key(app, *scopes: str) -> tuple[str, dict]:
    token, key = create_key(app.state.store, app.state.settings.pepper, scopes=list(scopes))
    return key.id, {"Authorization": f"Bearer {token}"}


def add_files(app, owner: str, n: int) -> list[str]:
    """``n`` file records of ``owner``, oldest first, one a millisecond apart (as uploads leave them)."""
    rows = [FileRow(id=f"file-{uuid.uuid4().hex[:24]}", owner=owner, purpose="image", filename=f"img{i:04d}.png",
                    size=67, sha256="0" * 64, format="png", stored="img.png", info="{}", shared=False,
                    created_at=NOW - 10 + i / 1000) for i in range(n)]
    with app.state.store.session.begin() as s:
        s.add_all(rows)
    return [r.id for r in rows]


def add_jobs(app, owner: str, n: int, kind: str = "audit", status: str = "cancelled", targets=None,
             start: float = NOW - 10) -> list[str]:
    """``n`` finished jobs of ``owner``, oldest first, one a millisecond apart; ``targets(i)``: the i-th job's
    params' target (default: model m<i> version 1)."""
    targets = targets or (lambda i: {"model": f"m{i:03d}", "version": "1"})
    rows = [JobRow(id=uuid.uuid4().hex, kind=kind, params=json.dumps({"data": "digits", "target": targets(i)},
                                                                        sort_keys=True),
                   owner=owner, backend="embedded", status=status, cancel_requested=False, progress=1.0, step="done",
                   message="", metrics="{}", result="{}", attempts=1, created_at=start + i / 1000)
            for i in range(n)]
    with app.state.store.session.begin() as s:
        s.add_all(rows)
    return [r.id for r in rows]


async def every_page(app, path: str, headers: dict, name: str, limit: int) -> list[list[dict]]:
    """The pages of a list, following ``next`` until the last."""
    pages, after = [], None
    while True:
        query = {"limit": limit, **({"before": after} if after else {})}
        r = await app.state.client.get(path, params=query, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body[name])
        after = body.get("next")  # none on the last page, as every answer was before pages
        if after is None:
            return pages
        assert len(pages) < 100, "the pages never end"


async def test_the_1001st_oldest_file_is_on_the_second_page(app):
    owner, headers = new_key(app, "jobs")
    ids = add_files(app, owner, 1001)
    c = app.state.client
    first = (await c.get("/v1/files", headers=headers)).json()
    assert len(first["files"]) == 1000 and ids[0] not in {f["id"] for f in first["files"]}
    assert [f["id"] for f in first["files"]] == ids[:0:-1]  # newest first, as before
    assert first["next"] is not None
    second = (await c.get("/v1/files", params={"before": first["next"]}, headers=headers)).json()
    assert [f["id"] for f in second["files"]] == [ids[0]] and "next" not in second
    small = await every_page(app, "/v1/files", headers, "files", 400)
    assert [len(p) for p in small] == [400, 400, 201]
    assert [f["id"] for p in small for f in p] == ids[::-1]


async def test_rows_of_one_instant_are_each_listed_once_across_pages(app):
    """Rows made in the same instant (created_at ties) are told apart by id: a page boundary among them neither
    repeats nor skips one."""
    owner, headers = new_key(app, "jobs")
    ids = add_files(app, owner, 7)
    with app.state.store.session.begin() as s:
        for f in s.query(FileRow).filter(FileRow.id.in_(ids)):
            f.created_at = NOW
    pages = await every_page(app, "/v1/files", headers, "files", 2)
    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert sorted(f["id"] for p in pages for f in p) == sorted(ids)


@pytest.mark.usefixtures("db_url")  # SQLite and PostgreSQL
async def test_jobs_older_than_the_newest_1000_are_listed_by_paging(app):
    owner, headers = new_key(app, "jobs")
    ids = add_jobs(app, owner, 1050)
    add_jobs(app, new_key(app, "jobs")[0], 5)  # another key's: never in this key's pages
    pages = await every_page(app, "/v1/jobs", headers, "jobs", 1000)
    assert [len(p) for p in pages] == [1000, 50]
    assert [j["id"] for p in pages for j in p] == ids[::-1]
    _, admin = new_key(app, "admin")
    assert sum(map(len, await every_page(app, "/v1/jobs", admin, "jobs", 1000))) == 1055
    r = await app.state.client.get("/v1/jobs", headers=headers)  # the default page: 100, and where the rest start
    assert len(r.json()["jobs"]) == 100 and r.json()["next"] is not None


async def test_keys_are_listed_a_page_at_a_time_newest_first(app):
    _, admin = new_key(app, "admin")
    made = [new_key(app, "predict")[0] for _ in range(5)]
    pages = await every_page(app, "/v1/keys", admin, "keys", 2)
    assert [len(p) for p in pages] == [2, 2, 2]
    listed = [k["id"] for p in pages for k in p]
    assert listed[:5] == made[::-1] and len(set(listed)) == 6
    assert all("key" not in k and "secret_hash" not in k for p in pages for k in p)


async def test_a_page_start_that_is_no_next_is_a_422_that_says_so(app):
    _, admin = new_key(app, "admin")
    c = app.state.client
    for path in ("/v1/files", "/v1/jobs", "/v1/keys"):
        for before in ("nonsense", "WzEsMl0", "eyJhIjogMX0", "W251bGwsImpvYiJd"):  # [1,2]; {"a": 1}; [null,"job"]
            r = await c.get(path, params={"before": before}, headers=admin)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_cursor", (path, before, r.text)
            assert "next" in r.json()["error"]["message"]
        for limit in (0, 1001):
            assert (await c.get(path, params={"limit": limit}, headers=admin)).status_code == 422


@pytest.mark.usefixtures("db_url")  # SQLite and PostgreSQL: the target is read from the params' JSON
async def test_the_leak_audit_of_a_version_is_found_behind_200_newer_audits(app):
    """The console's model page asks for a version's newest succeeded audit by its target (models.js leakAudit): the
    201st-newest is found, another version's or another key's is not."""
    owner, headers = new_key(app, "jobs")
    ids = add_jobs(app, owner, 201, status="succeeded")  # m000's first, the oldest
    newer_v2 = add_jobs(app, owner, 1, status="succeeded", targets=lambda i: {"model": "m000", "version": "2"},
                        start=NOW)[0]
    add_jobs(app, new_key(app, "jobs")[0], 1, status="succeeded", targets=lambda i: {"model": "m000", "version": "1"},
             start=NOW + 1)  # another key's, newer still
    add_jobs(app, owner, 1, kind="distill", status="succeeded", start=NOW + 2)  # another kind naming m000
    c = app.state.client
    query = {"kind": "audit", "status": "succeeded", "model": "m000", "version": "1", "limit": 1}
    found = (await c.get("/v1/jobs", params=query, headers=headers)).json()
    assert [j["id"] for j in found["jobs"]] == [ids[0]] and "next" not in found
    assert found["jobs"][0]["params"]["target"] == {"model": "m000", "version": "1"}
    any_version = (await c.get("/v1/jobs", params={"kind": "audit", "model": "m000", "limit": 10},
                               headers=headers)).json()
    assert [j["id"] for j in any_version["jobs"]] == [newer_v2, ids[0]]
    none = await c.get("/v1/jobs", params={**query, "model": "m999"}, headers=headers)
    assert none.status_code == 200 and none.json()["jobs"] == []
    r = await c.get("/v1/jobs", params={"version": "1"}, headers=headers)
    assert r.status_code == 422 and "model" in r.json()["error"]["message"]


@pytest.fixture
def server(tmp_path):
    """The service under uvicorn on a free port, for the CLI (which speaks HTTP through the SDK)."""
    settings = Settings(data_dir=tmp_path / "data", register_demo=False)
    application = build_app(settings)
    srv = ThreadServer(application)
    yield srv, application
    srv.stop()


def test_sdb_jobs_list_all_lists_every_job_and_a_page_says_more_follow(server, capsys, monkeypatch):
    srv, application = server
    token, key = create_key(application.state.store, application.state.settings.pepper, scopes=["jobs"])
    ids = add_jobs(application, key.id, 1050)
    monkeypatch.setenv("SDB_API_KEY", token)
    assert main(["jobs", "list", "--all", "--json", "--url", srv.url]) == 0
    out = capsys.readouterr()
    assert [j["id"] for j in json.loads(out.out)] == ids[::-1] and "more jobs" not in out.err
    assert main(["jobs", "list", "--url", srv.url]) == 0  # the server's page: 100 lines, and a notice on stderr
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 100 and out.out.split()[0] == ids[-1]
    assert "more jobs than these 100" in out.err and "--all" in out.err
    assert main(["jobs", "list", "--limit", "7", "--json", "--url", srv.url]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == ids[:-8:-1]


def test_sdb_files_list_all_and_the_sdk_iterate_every_file(server, capsys, monkeypatch):
    from sdb_client import Client

    srv, application = server
    token, key = create_key(application.state.store, application.state.settings.pepper, scopes=["jobs"])
    ids = add_files(application, key.id, 1003)
    monkeypatch.setenv("SDB_API_KEY", token)
    assert main(["files", "list", "--all", "--json", "--url", srv.url]) == 0
    assert [f["id"] for f in json.loads(capsys.readouterr().out)] == ids[::-1]
    assert main(["files", "list", "--json", "--url", srv.url]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)) == 1000 and "more files than these 1000" in out.err
    with Client(srv.url, token) as c:
        page = c.files.list(limit=3)
        assert [f["id"] for f in page] == ids[:-4:-1] and page.next is not None
        last = c.files.list(limit=2, before=page.next)
        assert [f["id"] for f in last] == ids[-4:-6:-1] and last.next is not None
        assert [f["id"] for f in c.files.list(all=True, limit=400)] == ids[::-1]
        assert c.jobs.list() == [] and c.jobs.list(all=True, kind="audit") == [] and c.jobs.list().next is None

