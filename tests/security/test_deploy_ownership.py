"""Hole 2: a model name belongs to the key that first deployed it (or an admin); no other key adds a
version to it, by ``POST /v1/models``, a ``wrap`` job or a ``style`` job, and a deployed model answers
at once from every API process.

Before the fix ``POST /v1/models`` let any deploy key serve the next version of any name, the ``style``
kind checked nothing, the ``wrap`` kind's check (at submission only) passed for a key that had once run
a non-deploying job of that name, and a job submitted before the owner took the name deployed anyway;
a second API process answered 404 for a just-deployed model until its next model sync. Now the deploy
checks the owner in the transaction that adds the version, never writes over a bundle file, and every
process loads a version the store has on its first request for it. Against the real server: two
``sdb serve`` processes on one SQLite store (model sync set to an hour, so only the on-demand load can
serve), ``sdb worker`` for the jobs.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import httpx
import pytest

from service.store import Store
from tests.service.conftest import Server, sdb_bytes
from tests.service.jobs_helpers import FAST, key, prepare, start_worker, stop_worker, wait_for

LOOSE = {"max_accuracy_drop": 100, "max_keyed_drop": 100, "min_leak_margin": -100, "min_guessed_key_share": -10, "check_attempts": 1}
WRAP = {"data": "digits", "teacher": {"arch": "cnn"}, "teacher_epochs": 1, "epochs": 1, "deploy": True, **LOOSE}
STYLE = {"method": "fast", "size": 32, "crop": 32, "epochs": 1, "samples": 4, "deploy": True}
ENV = {**FAST, "SDB_WORKERS": "0", "SDB_MODELS_SYNC_S": "3600"}  # no sync within a test: loads are on demand


@pytest.fixture(scope="module")
def servers(tmp_path_factory, bundles):
    """Two API processes on one data dir and store; ``legacy`` is a name registered by an admin."""
    data_dir = tmp_path_factory.mktemp("ownership-data")
    settings = prepare(data_dir, bundles, {"legacy": bundles.a})
    first = Server(data_dir, bundles, ENV)
    try:
        second = Server(data_dir, bundles, ENV)
    except BaseException:
        first.stop()
        raise
    first.settings = second.settings = settings
    yield first, second
    first.stop()
    second.stop()


def auth(settings, *scopes: str, **kw) -> dict:
    return bearer(key(settings, list(scopes), **kw))


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def key_id(headers: dict) -> str:
    return headers["Authorization"].split("_")[1]


def post_bundle(srv, bundle: Path, headers: dict, **fields: str) -> httpx.Response:
    return httpx.post(srv.url + "/v1/models", files={"file": ("m.sdb", sdb_bytes(bundle))}, data=fields,
                      headers=headers, timeout=60)


def bundle_files(data_dir: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under the served bundles' folder: sha256, inode and modification time."""
    root = data_dir / "bundles"
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino,
                                       p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def rows(settings, name: str) -> list:
    store = Store(settings.db_url)
    try:
        return [r for r in store.list_models() if r.name == name]
    finally:
        store.close()


def versions(settings, name: str) -> list[str]:
    return sorted(r.version for r in rows(settings, name))


def test_only_the_owner_or_an_admin_deploys_a_version_and_no_file_is_overwritten(servers, bundles):
    p1, _ = servers
    s = p1.settings
    owner, other, admin = auth(s, "deploy"), auth(s, "deploy"), auth(s, "admin")
    r = post_bundle(p1, bundles.b, owner, name="owned")
    assert r.status_code == 201 and r.json()["version"] == "1", r.text
    before = bundle_files(s.data_dir)
    # another deploy key: refused, uploaded in the request or named by a file id of its own
    r = post_bundle(p1, bundles.b, other, name="owned")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_owned", r.text
    f = httpx.post(p1.url + "/v1/files", files={"file": ("b.sdb", sdb_bytes(bundles.b))}, data={"purpose": "bundle"},
                   headers=other, timeout=60).json()["id"]
    r = httpx.post(p1.url + "/v1/models", json={"file": f, "name": "owned"}, headers=other, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_owned", r.text
    r = post_bundle(p1, bundles.a, other)  # a bundle's own name is a name too: digits-a is unclaimed, so its
    assert r.status_code == 201, r.text  # first deployer owns it...
    r = post_bundle(p1, bundles.a, owner)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_owned", r.text  # ...and no one else
    # a name an admin registered (`sdb models add`, or any name older than ownership) is an admin's
    r = post_bundle(p1, bundles.b, owner, name="legacy")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_owned", r.text
    assert versions(s, "owned") == ["1"] and versions(s, "legacy") == ["1"]
    after = bundle_files(s.data_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing written over
    assert [k.split("/")[0] for k in after if k not in before] == ["digits-a"]
    # the owner and an admin add versions; every version is a new file, the old ones untouched
    assert post_bundle(p1, bundles.b, owner, name="owned").json()["version"] == "2"
    assert post_bundle(p1, bundles.b, admin, name="owned").json()["version"] == "3"
    assert post_bundle(p1, bundles.b, admin, name="legacy").json()["version"] == "2"
    final = bundle_files(s.data_dir)
    assert {k: v for k, v in final.items() if k in after} == after
    assert len([k for k in final if k.startswith("owned/")]) == 3


def test_only_the_owner_or_an_admin_removes_a_version_and_the_name_stays_the_owners(servers, bundles):
    """Before, removing was an admin's only: an owner could not take back what it served. Now the owner's deploy key
    removes versions of its names; any other key is refused and nothing changes."""
    p1, _ = servers
    s = p1.settings
    owner, other, distiller, admin = auth(s, "deploy"), auth(s, "deploy"), auth(s, "distill"), auth(s, "admin")
    for _ in range(3):
        assert post_bundle(p1, bundles.b, owner, name="taken-back").status_code == 201
    assert versions(s, "taken-back") == ["1", "2", "3"]

    def remove(headers, name="taken-back", **params):
        return httpx.delete(f"{p1.url}/v1/models/{name}", params=params, headers=headers, timeout=60)

    for headers, code in ((other, "model_not_owned"), (distiller, "forbidden_scope")):
        r = remove(headers, version="1")
        assert r.status_code == 403 and r.json()["error"]["code"] == code, r.text
    r = remove(owner, name="legacy")  # an admin's name
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_owned", r.text
    assert versions(s, "taken-back") == ["1", "2", "3"] and versions(s, "legacy") != []

    copies = {v: r.path for v in ("1", "2", "3") for r in rows(s, "taken-back") if r.version == v}
    r = remove(owner, version="1")
    assert r.status_code == 200 and r.json()["removed"] == [{"name": "taken-back", "version": "1"}], r.text
    # the server's copy of a removed version is deleted (it filled the disk before); the others stay
    assert not Path(copies["1"]).exists() and Path(copies["2"]).is_file() and Path(copies["3"]).is_file()
    assert httpx.get(f"{p1.url}/v1/models/taken-back", params={"version": "1"}, timeout=60).status_code == 404
    assert remove(admin, version="2").status_code == 200
    assert versions(s, "taken-back") == ["3"]
    assert post_bundle(p1, bundles.b, other, name="taken-back").status_code == 403  # still the owner's name
    assert remove(owner).json()["removed"] == [{"name": "taken-back", "version": "3"}]
    assert not (s.data_dir / "bundles" / "taken-back").exists()  # the name's folder too, once empty
    assert post_bundle(p1, bundles.b, owner, name="taken-back").json()["version"] == "4"  # never given again


def test_a_deployed_model_answers_at_once_from_another_api_process(servers, bundles):
    p1, p2 = servers
    owner = auth(p1.settings, "deploy")
    x = {"inputs": bundles.x[:2].tolist()}
    r = post_bundle(p1, bundles.b, owner, name="fresh")
    assert r.status_code == 201, r.text
    # p2 never synced (its sync is an hour away): the store has the model, so p2 loads it on this request
    r = httpx.post(p2.url + "/v1/models/fresh/predict", json=x)
    assert r.status_code == 200 and r.json()["version"] == "1", r.text
    assert post_bundle(p1, bundles.b, owner, name="fresh").json()["version"] == "2"
    r = httpx.post(p2.url + "/v1/models/fresh/predict?version=2", json=x)
    assert r.status_code == 200 and r.json()["version"] == "2", r.text
    assert post_bundle(p1, bundles.a, owner, name="fresh-v2").status_code == 201
    body = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                        "data": bundles.x[:2].ravel().tolist()}]}
    assert httpx.post(p2.url + "/v2/models/fresh-v2/infer", json=body).status_code == 200
    assert httpx.get(p2.url + "/v1/models/nothing-here").status_code == 404  # and an unknown name stays a 404


def test_concurrent_deploys_on_two_processes_get_distinct_versions(servers, bundles):
    p1, p2 = servers
    owner = auth(p1.settings, "deploy")
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda srv=srv: results.append(post_bundle(srv, bundles.b, owner, name="conc")))
               for srv in (p1, p2) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 201 for r in results), [r.text for r in results]
    assert sorted(int(r.json()["version"]) for r in results) == [1, 2, 3, 4, 5, 6]
    assert len([k for k in bundle_files(p1.settings.data_dir) if k.startswith("conc/")]) == 6


def submit(srv, headers: dict, kind: str, params: dict) -> httpx.Response:
    return httpx.post(srv.url + "/v1/jobs", json={"kind": kind, "params": params}, headers=headers, timeout=60)


def test_jobs_check_the_owner_at_submission_and_again_at_deploy(servers, bundles):
    p1, p2 = servers
    s = p1.settings
    owner, other = auth(s, "jobs", "deploy"), auth(s, "jobs")
    assert post_bundle(p1, bundles.b, owner, name="job-owned").status_code == 201
    # at submission: a wrap or a style job deploying under another key's name is refused, never queued
    for kind, params in (("style", {**STYLE, "name": "job-owned"}), ("wrap", {**WRAP, "name": "job-owned"})):
        r = submit(p1, other, kind, params)
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_owned", (kind, r.text)
    # at deploy: jobs submitted while their names were free, then the names taken by the owner
    early = {kind: submit(p1, other, kind, {**params, "name": f"race-{kind}"}).json()["id"]
             for kind, params in (("wrap", WRAP), ("style", STYLE))}
    for kind in early:
        assert post_bundle(p1, bundles.b, owner, name=f"race-{kind}").status_code == 201
    taken = bundle_files(s.data_dir)
    # and one the owner submits, with an output policy: it deploys, and the other process serves the
    # version at once, under that policy
    bad = submit(p1, owner, "wrap", {**WRAP, "name": "race-wrap", "output_policy": {"policy": "label", "top_k": 2}})
    assert bad.status_code == 422 and "top_k" in bad.text, bad.text
    mine = submit(p1, owner, "wrap", {**WRAP, "name": "race-wrap",
                                      "output_policy": {"policy": "top_k", "top_k": 2}}).json()["id"]
    worker = start_worker(s.data_dir, bundles)
    try:
        def finished(job_id: str, headers: dict):
            j = httpx.get(f"{p1.url}/v1/jobs/{job_id}", headers=headers).json()
            return j if j["status"] in ("succeeded", "failed", "cancelled") else None

        jobs = {kind: wait_for(lambda i=i: finished(i, other), 300, f"the {kind} job", every=0.2)
                for kind, i in early.items()}
        job = wait_for(lambda: finished(mine, owner), 300, "the owner's wrap job", every=0.1)
    finally:
        stop_worker(worker)
    for j in jobs.values():
        assert j["status"] == "failed" and "belongs to another key" in j["error"], j
    assert job["status"] == "succeeded" and job["result"]["deployed"] and job["result"]["version"] == "2", job
    assert versions(s, "race-style") == ["1"] and versions(s, "race-wrap") == ["1", "2"]  # the owner's two
    r = httpx.post(p2.url + "/v1/models/race-wrap/predict", json={"inputs": bundles.x[:2].tolist(), "top_k": 5})
    assert r.status_code == 200 and r.json()["version"] == "2", r.text
    assert [len(p["scores"]) for p in r.json()["predictions"]] == [2, 2]
    now = bundle_files(s.data_dir)
    assert {k: v for k, v in now.items() if k in taken} == taken  # the refused jobs left no file, overwrote none
    assert [k.split("/")[0] for k in now if k not in taken] == ["race-wrap"]


def test_a_key_deploys_and_removes_only_under_the_names_on_its_allowlist(servers, bundles):
    """A key's model allowlist bounds what it deploys and removes, as it bounds what it predicts with. Before, a
    deploy key made for one model served any name (a given one, or its bundle's own), which then was its for good,
    and removed what it served there."""
    p1, _ = servers
    s = p1.settings
    limited, free = auth(s, "deploy", models=["only-this"]), auth(s, "deploy")
    before = bundle_files(s.data_dir)
    for fields in ({"name": "not-on-allowlist"}, {}):  # a name given, and the bundle's own (digits-b)
        r = post_bundle(p1, bundles.b, limited, **fields)
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed", r.text
        assert "only-this" in r.json()["error"]["message"], r.text  # it says which names it may use
    assert bundle_files(s.data_dir) == before  # nothing copied...
    assert rows(s, "not-on-allowlist") == [] and rows(s, "digits-b") == []
    assert post_bundle(p1, bundles.b, free, name="not-on-allowlist").status_code == 201  # ...and nothing claimed
    assert post_bundle(p1, bundles.b, limited, name="only-this").status_code == 201

    def remove(headers, name: str) -> httpx.Response:
        return httpx.delete(f"{p1.url}/v1/models/{name}", headers=headers, timeout=60)

    r = remove(limited, "not-on-allowlist")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed", r.text
    assert versions(s, "not-on-allowlist") == ["1"]
    assert remove(limited, "only-this").status_code == 200
    # a key without an allowlist, as before: any free name, and back
    assert remove(free, "not-on-allowlist").status_code == 200 and versions(s, "not-on-allowlist") == []


def test_a_job_deploys_only_under_a_name_on_its_keys_allowlist(servers):
    """Before, a ``jobs`` key limited to one model ran a wrap job with ``deploy: true`` under any name and claimed
    it; now the submission is refused, for a name given and for the kind's default one (wrap: DATA-ARCH)."""
    p1, _ = servers
    limited = auth(p1.settings, "jobs", models=["only-this"])
    for kind, params in (("wrap", {**WRAP, "name": "squatted-name"}), ("style", {**STYLE, "name": "squatted-name"}),
                         ("wrap", WRAP)):
        r = submit(p1, limited, kind, params)
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed", (kind, r.text)
    assert httpx.get(p1.url + "/v1/jobs", headers=limited).json()["jobs"] == []  # none queued


def test_a_queued_job_is_checked_against_its_keys_allowlist_again_when_it_deploys(servers, bundles):
    """A job queued while its key's allowlist was not checked (a server before this check) deploys nothing: the
    worker asks the key as it stands when it deploys. The store's row is edited to stand for that job."""
    from service.store import ApiKeyRow

    p1, _ = servers
    s = p1.settings
    headers = auth(s, "jobs", models=["late-check"])
    r = submit(p1, headers, "wrap", {**WRAP, "name": "late-check"})
    assert r.status_code == 202, r.text
    store = Store(s.db_url)
    try:
        with store.session.begin() as session:
            session.get(ApiKeyRow, key_id(headers)).models = "another-model"
    finally:
        store.close()
    worker = start_worker(s.data_dir, bundles)
    try:
        job = wait_for(lambda: (j := httpx.get(f"{p1.url}/v1/jobs/{r.json()['id']}", headers=headers).json())["status"]
                       in ("succeeded", "failed", "cancelled") and j, 300, "the wrap job", every=0.2)
    finally:
        stop_worker(worker)
    assert job["status"] == "failed" and "not allowed to use model 'late-check'" in job["error"], job
    assert rows(s, "late-check") == [] and not (s.data_dir / "bundles" / "late-check").exists()
    assert post_bundle(p1, bundles.b, auth(s, "deploy"), name="late-check").status_code == 201  # never claimed


def test_an_admin_releases_or_gives_away_the_name_of_a_key_that_left(servers, bundles):
    """A name stays the key's that first deployed it, revoked or not (a newcomer must not step into a name
    clients trust). Before, nothing let it go: a revoked tenant's names were refused to every other tenant for
    ever. Now an admin releases it (the next deploy claims it) or gives it to a key, once it serves nothing."""
    p1, _ = servers
    s = p1.settings
    departed, newcomer, other = (auth(s, "deploy") for _ in range(3))
    admin = auth(s, "admin")
    assert post_bundle(p1, bundles.b, departed, name="left-behind").status_code == 201
    assert httpx.delete(f"{p1.url}/v1/keys/{key_id(departed)}", headers=admin).status_code == 200
    r = post_bundle(p1, bundles.b, newcomer, name="left-behind")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_owned", r.text

    def release(headers: dict, name: str = "left-behind", **body) -> httpx.Response:
        return httpx.post(f"{p1.url}/v1/models/{name}/release", json=body, headers=headers, timeout=60)

    def refused(r: httpx.Response, status: int, code: str) -> bool:
        return r.status_code == status and r.json()["error"]["code"] == code

    assert refused(release(newcomer), 403, "forbidden_scope")
    assert refused(release(admin), 409, "model_in_use") and versions(s, "left-behind") == ["1"]  # it serves
    assert httpx.delete(f"{p1.url}/v1/models/left-behind", headers=admin).status_code == 200
    assert refused(release(admin, "never-deployed"), 404, "model_not_found")
    assert refused(release(admin, to="0" * 12), 404, "key_not_found")
    assert refused(release(admin, to=key_id(departed)), 422, "key_invalid")  # a revoked key takes nothing
    r = release(admin)
    assert r.status_code == 200 and r.json() == {"name": "left-behind", "owner": None,
                                                 "previous_owner": key_id(departed)}, r.text
    # the next deploy claims it, its version numbers going on; then it is that key's as any name is
    assert post_bundle(p1, bundles.b, newcomer, name="left-behind").json()["version"] == "2"
    assert refused(post_bundle(p1, bundles.b, other, name="left-behind"), 403, "model_not_owned")
    # given to a key: that key's from then on, no one else's
    assert httpx.delete(f"{p1.url}/v1/models/left-behind", headers=newcomer).status_code == 200
    r = release(admin, to=key_id(other))
    assert r.status_code == 200 and r.json()["owner"] == key_id(other), r.text
    assert r.json()["previous_owner"] == key_id(newcomer)
    assert refused(post_bundle(p1, bundles.b, newcomer, name="left-behind"), 403, "model_not_owned")
    assert post_bundle(p1, bundles.b, other, name="left-behind").json()["version"] == "3"


def test_sdb_models_release_asks_the_server_as_an_admin(servers, capsys):
    """``sdb models release NAME [--to KEY_ID]``, against the server."""
    from sdb_cli.main import main

    p1, _ = servers
    s = p1.settings
    owner, admin_token = auth(s, "deploy"), key(s, ["admin"])
    store = Store(s.db_url)
    try:
        store.add_version("cli-released", "/nowhere", deployer=key_id(owner))  # claimed, then removed
        store.remove_model("cli-released")
    finally:
        store.close()
    assert main(["models", "release", "cli-released", "--url", p1.url, "--api-key", admin_token]) == 0
    assert capsys.readouterr().out.strip() == (f"released cli-released (it was key {key_id(owner)}'s): the next key "
                                               "to deploy under it claims it")
    deployer = key(s, ["deploy"])
    assert main(["models", "release", "cli-released", "--url", p1.url, "--api-key", deployer]) == 2
    assert "admin" in capsys.readouterr().err  # not an admin: the server's 403, said


@pytest.mark.usefixtures("db_url")
def test_a_released_name_goes_to_its_next_deployer_and_keeps_its_numbers(db_url):
    """The store alone, SQLite and PostgreSQL: a release needs a name that serves nothing, and a name released or
    given away goes on with its version numbers (a pinned ``?version=`` never names two bundles)."""
    from service.auth import create_key
    from service.store import DeployRefused

    store = Store(db_url)
    try:
        first, second, third = (create_key(store, b"p" * 32, scopes=["deploy"])[1].id for _ in range(3))
        store.add_version("handed-on", "/bundles/1", deployer=first)
        with pytest.raises(DeployRefused) as refused:
            store.release_name("handed-on")
        assert refused.value.code == "model_in_use"
        with pytest.raises(KeyError):
            store.release_name("never-deployed")
        store.remove_model("handed-on")
        assert store.release_name("handed-on") == first
        assert store.model_owner("handed-on") is None and store.deploy_refusal("handed-on", second) is None
        assert store.add_version("handed-on", "/bundles/2", deployer=second).version == "2"
        assert store.model_owner("handed-on") == second
        assert store.deploy_refusal("handed-on", first).code == "model_not_owned"
        store.remove_model("handed-on")
        assert store.release_name("handed-on", to=third) == second
        assert store.deploy_refusal("handed-on", second).code == "model_not_owned"
        assert store.add_version("handed-on", "/bundles/3", deployer=third).version == "3"
    finally:
        store.close()


@pytest.mark.usefixtures("db_url")
def test_racing_first_deploys_of_a_name_have_one_owner(db_url, tmp_path):
    """The store's transaction alone, SQLite and PostgreSQL: keys racing to claim a fresh name."""
    from service.auth import create_key
    from service.store import DeployRefused

    store = Store(db_url)
    try:
        pepper = b"p" * 32
        ids = [create_key(store, pepper, scopes=["deploy"])[1].id for _ in range(4)]
        outcomes: list[tuple[str, str]] = []

        def deploy(key_id: str, n: int) -> None:
            for i in range(n):
                try:
                    row = store.add_version("contested", f"/bundles/{key_id}-{i}", deployer=key_id)
                    outcomes.append((key_id, row.version))
                except DeployRefused as e:
                    outcomes.append((key_id, e.code))

        threads = [threading.Thread(target=deploy, args=(k, 3)) for k in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = {k for k, v in outcomes if v != "model_not_owned"}
        assert len(won) == 1, outcomes  # one owner; everyone else refused
        assert sorted(v for k, v in outcomes if k in won) == ["1", "2", "3"]
        assert store.deploy_refusal("contested", ids[0] if ids[0] not in won else ids[1]).code == "model_not_owned"
        assert store.deploy_refusal("contested", None) is None  # the admin CLI
    finally:
        store.close()


@pytest.mark.usefixtures("db_url")
def test_a_removed_version_number_is_never_registered_again(db_url):
    """``sdb models add`` registers a bundle under its own version: after a removal it gave the number out again,
    and a client or job pinned to it read another network under it. Such a bundle gets the next number now."""
    store = Store(db_url)
    try:
        assert store.add_version("pinned", "/bundles/a", deployer=None, version="2").version == "2"
        store.remove_model("pinned", "2")
        assert store.add_version("pinned", "/bundles/b", deployer=None, version="2").version == "3"
        assert store.add_version("pinned", "/bundles/c", deployer=None, version="1").version == "4"  # below, too
        assert store.add_version("pinned", "/bundles/d", deployer=None, version="9").version == "9"  # above: its own
        assert store.add_version("pinned", "/bundles/e", deployer=None).version == "10"
        assert store.add_version("pinned", "/bundles/f", deployer=None, version="v2-named").version == "v2-named"
    finally:
        store.close()


@pytest.mark.usefixtures("db_url")
def test_names_served_before_ownership_become_an_admins(db_url):
    """A store at schema 3 (before owners and policies), SQLite and PostgreSQL: its names become an
    admin's, its versions are counted, its versions serve ``probs``."""
    from sqlalchemy import create_engine

    from service import store as schema
    from service.auth import create_key

    engine = create_engine(schema.normalise_url(db_url))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE models (name VARCHAR(200) NOT NULL, version VARCHAR(100) NOT NULL, "
                             "path TEXT NOT NULL, added_at FLOAT NOT NULL, PRIMARY KEY (name, version))")
        conn.exec_driver_sql("INSERT INTO models VALUES ('old', '1', '/a', 0), ('old', '7', '/b', 0)")
        for step in schema.MIGRATIONS[:3]:
            step(conn)
        schema.SchemaVersion.__table__.create(conn)
        conn.execute(schema.SchemaVersion.__table__.insert().values(id=1, version=3))
    engine.dispose()
    store = Store(db_url)
    try:
        key_id = create_key(store, b"p" * 32, scopes=["deploy"])[1].id
        assert store.deploy_refusal("old", key_id).code == "model_not_owned"
        assert {(r.policy, r.top_k, r.decimals) for r in store.list_models()} == {("probs", None, None)}
        assert store.add_version("old", "/c", deployer=None).version == "8"
    finally:
        store.close()
