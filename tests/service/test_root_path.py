"""The service under a reverse proxy's path prefix (``SDB_ROOT_PATH``, ``sdb serve --root-path``): the console's
page names its assets under the prefix, whether the proxy strips it or keeps it; in process, on a real store.
The page in a browser under a prefix: tests/browser/test_console_root_path.py.
"""
from __future__ import annotations

import re

import httpx
import pytest

from service.routes.console import STATIC_DIR

from .conftest import make_settings, run_sdb, sdb_env, start_service

pytestmark = pytest.mark.anyio
PAGES = ("/", "/console", "/console/")


def refs(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)="([^"#]+)\"""", html)


def root_meta(html: str) -> str:
    return re.search(r'<meta name="sdb-root" content="([^"]*)">', html).group(1)


@pytest.fixture
async def prefixed(tmp_path, bundles):
    """The app with SDB_ROOT_PATH=/sdb (no model: the console's routes alone)."""
    service, manager = await start_service(make_settings(tmp_path / "data", bundles, root_path="/sdb"))
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


async def test_the_console_page_names_its_assets_under_the_prefix(prefixed):
    client = prefixed.client
    kept = ["/sdb", *(f"/sdb{p}" for p in PAGES)]  # a proxy that keeps the prefix; the prefix alone too
    for path in (*kept, *PAGES):  # and one that strips it
        r = await client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (path, r.status_code)
        assert root_meta(r.text) == "/sdb", path
        found = refs(r.text)
        assert len(found) == 3 and all(ref.startswith("/sdb/console/static/") for ref in found), (path, found)
        assert "unsafe" not in r.headers["content-security-policy"]
    for ref in found:  # each asset answers at the URL the browser asks for, and where a stripping proxy sends it
        for asked in (ref, ref.removeprefix("/sdb")):
            r = await client.get(asked)
            assert r.status_code == 200 and r.content == (STATIC_DIR / ref.rsplit("/static/", 1)[1]).read_bytes(), asked


async def test_each_root_path_has_its_own_page_and_etag(svc):
    """One process, two root paths (SDB_ROOT_PATH unset: the ASGI server's): each page names its own assets, and a
    browser's ETag of one is not the other's (a 304 would keep the other prefix's page)."""
    plain = await svc.client.get("/")
    assert root_meta(plain.text) == "" and all(ref.startswith("/console/static/") for ref in refs(plain.text))
    nested = httpx.AsyncClient(transport=httpx.ASGITransport(svc.app, root_path="/ml/sdb"), base_url="http://sdb.test")
    async with nested:
        r = await nested.get("/ml/sdb/console")
        assert r.status_code == 200 and root_meta(r.text) == "/ml/sdb"
        assert all(ref.startswith("/ml/sdb/console/static/") for ref in refs(r.text)), refs(r.text)
        assert r.headers["etag"] != plain.headers["etag"]
        assert (await nested.get("/ml/sdb/", headers={"If-None-Match": plain.headers["etag"]})).status_code == 200
        assert (await nested.get("/ml/sdb/", headers={"If-None-Match": r.headers["etag"]})).status_code == 304
    assert (await svc.client.get("/", headers={"If-None-Match": plain.headers["etag"]})).status_code == 304


async def test_a_root_path_is_put_in_the_page_as_text_never_markup(svc):
    """SDB_ROOT_PATH is validated; an ASGI server's own root path is not, and must not break out of the attribute."""
    odd = '/a"><script>x</script>'
    client = httpx.AsyncClient(transport=httpx.ASGITransport(svc.app, root_path=odd), base_url="http://sdb.test")
    async with client:
        html = (await client.get("/")).text
    assert "<script>x" not in html and root_meta(html) == "/a&quot;&gt;&lt;script&gt;x&lt;/script&gt;"
    assert len(re.findall(r"<script\b", html)) == 1


def test_sdb_serve_takes_the_prefix_as_an_option_and_refuses_a_bad_one(tmp_path, bundles):
    env = sdb_env(tmp_path / "data", bundles, 1)
    p = run_sdb("serve", "--root-path", "sdb/", env=env)
    assert p.returncode != 0 and "SDB_ROOT_PATH" in p.stderr and "--root-path" in p.stderr and "/sdb" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
