"""Hole 1 (model upload): ``POST /v1/models`` takes the bundle itself, never a path on the server.

Before the fix the route took ``{"path": ...}`` and opened whatever file the server could read: a
bundle anywhere on its disk was served, and for any other file the refusal echoed the path and told
whether it existed (a probe of the server's disk). Now a bundle is uploaded (multipart, or the id of
a ``bundle`` file the key uploaded), by an admin key or one with the new ``deploy`` scope; a path is
a 422 that reads nothing. Against the real server: ``sdb serve`` on a loopback port, SQLite store.
"""
from __future__ import annotations

import httpx
import pytest

from tests.service.conftest import Server, sdb_bytes
from tests.service.jobs_helpers import key, prepare


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    data_dir = tmp_path_factory.mktemp("upload-data")
    settings = prepare(data_dir, bundles)
    srv = Server(data_dir, bundles, {"SDB_REGISTER_DEMO": "false", "SDB_MODELS_SYNC_S": "0.2"})
    srv.settings = settings
    yield srv
    srv.stop()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def served(srv) -> list[tuple[str, str]]:
    return [(m["name"], m["version"]) for m in httpx.get(srv.url + "/v1/models").json()["models"]]


def test_a_server_path_is_refused_and_nothing_is_read(server, bundles):
    admin = auth(key(server.settings, ["admin"]))
    data_dir = server.settings.data_dir
    for path in (str(bundles.b), str(bundles.master_key_file), str(data_dir / "sdb.sqlite3"), "/etc/passwd",
                 "/nonexistent/x.sdb"):
        r = httpx.post(server.url + "/v1/models", json={"path": path}, headers=admin, timeout=60)
        assert r.status_code == 422, (path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "server_path_refused"
        assert path not in r.text  # neither echoed nor told apart: an existing file answers as a missing one
    assert served(server) == []


def test_a_deploy_key_serves_an_uploaded_bundle(server, bundles):
    deployer = auth(key(server.settings, ["deploy"]))
    r = httpx.post(server.url + "/v1/models", files={"file": ("b.sdb", sdb_bytes(bundles.b))}, headers=deployer,
                   timeout=60)
    assert r.status_code == 201, r.text
    assert (r.json()["name"], r.json()["version"]) == ("digits-b", "1")
    assert str(server.settings.data_dir) not in r.text
    predict = httpx.post(server.url + "/v1/models/digits-b/predict", json={"inputs": bundles.x[:2].tolist()})
    assert predict.status_code == 200
    # an uploaded bundle is named by id, and only by a key that may use that file
    other = auth(key(server.settings, ["jobs"]))
    f = httpx.post(server.url + "/v1/files", files={"file": ("a.sdb", sdb_bytes(bundles.a))},
                   data={"purpose": "bundle"}, headers=other, timeout=60).json()
    r = httpx.post(server.url + "/v1/models", json={"file": f["id"]}, headers=deployer, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    assert served(server) == [("digits-b", "1")]
    # a key with neither deploy nor admin cannot deploy at all
    r = httpx.post(server.url + "/v1/models", files={"file": ("a.sdb", sdb_bytes(bundles.a))}, headers=other,
                   timeout=60)
    assert r.status_code == 403
