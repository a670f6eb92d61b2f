"""Where a registered version's bundle is found, and that it is the one registered: a data dir moved, restored or
put under a new store keeps every copy it has and serves its own, and a bundle changed on disk under a registered
version is refused, not served under the version it was pinned as."""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

from service.copies import ORPHAN_AGE_S, copy_new

from .conftest import make_settings, run_sdb, sdb_bytes, sdb_env, start_service

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]  # SQLite and PostgreSQL
GOOD = {"inputs": np.zeros((2, 1, 8, 8)).tolist()}


async def _stop(svc, manager) -> None:
    await svc.client.aclose()
    await manager.__aexit__(None, None, None)


def _age(paths) -> None:
    """Last written before the start-up sweep's age, as a deploy of yesterday (cp -a keeps such mtimes)."""
    old = time.time() - ORPHAN_AGE_S - 60
    for p in paths:
        os.utime(p, (old, old))


def _copies(data: Path) -> list[Path]:
    return sorted(p.relative_to(data) for p in data.rglob("*.sdb"))


async def _served_from(svc, names, where: Path) -> None:
    """Every model in ``names`` answers, from a bundle under ``where``."""
    for name in names:
        r = await svc.client.post(f"/v1/models/{name}/predict", json=GOOD)
        assert r.status_code == 200, r.text
        assert Path(svc.app.state.host.loaded(name).path).is_relative_to(where.resolve())


async def test_a_data_dir_copied_elsewhere_keeps_and_serves_its_own_copies(bundles, tmp_path):
    """The start-up sweep compared the store's absolute paths: a data dir copied to a new disk (cp -a) had every
    deployed copy deleted at its first start there, and until then it served the old directory's files. It keeps
    them, serves them, and goes on once the old directory is gone."""
    old, new = tmp_path / "old" / "data", tmp_path / "new" / "data"
    svc, manager = await start_service(make_settings(old, bundles), bundles.a, bundles.b)
    await _stop(svc, manager)
    _age(old.rglob("*.sdb"))
    shutil.copytree(old, new)  # copy2: the mtimes too, as cp -a
    shutil.copytree(old.with_name("data-secrets"), new.with_name("data-secrets"))
    settings = make_settings(new, bundles)
    svc, manager = await start_service(settings)
    try:
        assert _copies(new) == _copies(old) and len(_copies(new)) == 2
        await _served_from(svc, ("digits-a", "digits-b"), new)
    finally:
        await _stop(svc, manager)
    shutil.rmtree(old.parent)
    svc, manager = await start_service(settings)
    try:
        ready = await svc.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["models"] == 2 and not ready.json()["failed"], ready.text
        await _served_from(svc, ("digits-a", "digits-b"), new)
        # a job's hosted teacher or target is read from the same place (the store's path was the old one's)
        from service.jobs.kinds.base import served_model_path
        from service.jobs.queue import JobQueue

        path = served_model_path(settings, JobQueue(svc.app.state.store), "digits-a", "1")
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(new.resolve()), path
        listed = await anyio.to_thread.run_sync(lambda: run_sdb("models", "list", env=sdb_env(new, bundles)))
        assert listed.returncode == 0 and str(old) not in listed.stdout and str(new.resolve()) in listed.stdout
        # a removal deletes this data dir's copy, the one served
        assert (await svc.client.delete("/v1/models/digits-b", headers=svc.admin)).status_code == 200
        assert len(_copies(new)) == 1
    finally:
        await _stop(svc, manager)


async def test_a_new_store_over_a_data_dir_deletes_no_copy_and_registers_one_again(bundles, tmp_path):
    """docs/deploy.md's switch to PostgreSQL (a new, empty store over the same data dir, then `sdb models add` of
    the bundles): its first start deleted every deployed copy, so there was nothing left to add."""
    data = tmp_path / "data"
    before = make_settings(data, bundles, database_url=f"sqlite:///{tmp_path / 'before.sqlite3'}")
    svc, manager = await start_service(before, bundles.a)
    await _stop(svc, manager)
    (copy,) = data.rglob("*.sdb")
    _age([copy])
    svc, manager = await start_service(make_settings(data, bundles))  # the test's store: empty
    try:
        assert _copies(data) == [copy.relative_to(data)]
        r = await anyio.to_thread.run_sync(lambda: run_sdb("models", "add", str(copy), env=sdb_env(data, bundles)))
        assert r.returncode == 0 and "registered digits-a version 1" in r.stdout, r.stderr
        await svc.app.state.host.aget("digits-a")
        await _served_from(svc, ("digits-a",), data)
    finally:
        await _stop(svc, manager)


async def test_a_copy_no_version_names_is_set_aside_at_start_not_served_not_deleted(bundles, tmp_path):
    """A copy a deploy that died midway left (no version names it; every version's bundle is there) is moved to
    bundles/.orphaned/ at the next start: never served, never listed, and kept for an operator to look at."""
    settings = make_settings(tmp_path / "data", bundles)
    svc, manager = await start_service(settings, bundles.a)
    await _stop(svc, manager)
    src = tmp_path / "b.sdb"
    src.write_bytes(sdb_bytes(bundles.b))
    orphan = copy_new(src, settings.bundles_dir / "digits-b")
    _age(settings.data_dir.rglob("*.sdb"))
    svc, manager = await start_service(settings)
    try:
        aside = settings.bundles_dir / ".orphaned" / "digits-b" / orphan.name
        assert aside.read_bytes() == src.read_bytes() and not orphan.exists()
        assert [m.name for m in svc.app.state.store.list_models()] == ["digits-a"]
        assert [m["name"] for m in (await svc.client.get("/v1/models")).json()["models"]] == ["digits-a"]
        assert (await svc.client.post("/v1/models/digits-b/predict", json=GOOD)).status_code == 404
        await _served_from(svc, ("digits-a",), settings.data_dir)
    finally:
        await _stop(svc, manager)


async def test_a_bundle_changed_on_disk_under_its_registered_version_is_refused(bundles, tmp_path):
    """A bundle registered in place, replaced by another wrap (its hashes fine), served the other network under the
    version it was pinned as after a restart. The store records its meta.json's digest at registration (a version
    from before the digest: at its first load) and a load of another bundle there is a 503 that says so."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(bundles.a, a)
    shutil.copytree(bundles.b, b)
    settings = make_settings(tmp_path / "data", bundles)
    svc, manager = await start_service(settings)
    try:
        store = svc.app.state.store
        svc.app.state.host.add(a, actor="cli")  # `sdb models add`: its digest recorded
        store.add_model("digits-b", "1", str(b))  # as a release before the digest registered it: none
        assert store.get_model("digits-b").meta_sha256 is None
        await svc.app.state.host.aget("digits-b")  # its first load records it
        for name, where in (("digits-a", a), ("digits-b", b)):
            assert store.get_model(name).meta_sha256 == hashlib.sha256((where / "meta.json").read_bytes()).hexdigest()
    finally:
        await _stop(svc, manager)
    for where, other in ((a, bundles.a2), (b, bundles.a)):
        shutil.rmtree(where)
        shutil.copytree(other, where)
    svc, manager = await start_service(settings)
    try:
        assert sorted((await svc.client.get("/readyz")).json()["failed"]) == ["digits-a@1", "digits-b@1"]
        for name in ("digits-a", "digits-b"):
            r = await svc.client.post(f"/v1/models/{name}/predict?version=1", json=GOOD)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
            assert "changed since it was registered" in r.text and str(tmp_path) not in r.text
        # nor does a job take it for its teacher or target: the version it names is the one the server serves
        from service.jobs.kinds.base import served_model_path
        from service.jobs.queue import JobQueue

        with pytest.raises(ValueError, match="its bundle changed since it was registered"):
            served_model_path(settings, JobQueue(svc.app.state.store), "digits-a", "1")
    finally:
        await _stop(svc, manager)
