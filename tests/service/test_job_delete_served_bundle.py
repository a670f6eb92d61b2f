"""A job whose artifact bundle is served in place (docs/pose.md: ``sdb models add <data_dir>/jobs/ID/artifacts/
bundle.sdb``) is not deleted under it: DELETE /v1/jobs/{id} removed the folder, and every process that loaded the
version next answered 503 "no bundle at jobs/<id>/…". Refused (409, naming the versions) until they are removed."""
from __future__ import annotations

import os

import pytest

from sdb_cli.admin import models_add
from service.auth import create_key
from service.jobs.queue import JobQueue
from service.jobs.runner import attempt_artifacts, job_dir

from .conftest import sdb_bytes


@pytest.fixture
def svc(bare_svc):
    return bare_svc


def finished_job_with_a_bundle(svc, bundle) -> tuple[str, str, os.PathLike]:
    """(the owner's jobs key, the job's id, its bundle.sdb): a job run to its end through the real queue, its
    artifacts folder (``artifacts.N-xxxx``, as the runner makes it) holding a bundle as an okdhp job leaves it."""
    token, key = create_key(svc.app.state.store, svc.settings.pepper, scopes=["jobs"])
    queue = JobQueue(svc.app.state.store)
    job = queue.submit("okdhp", {"epochs": 1, "name": "digits-a"}, key.id)[0]
    job = queue.claim("w", job_id=job.id)
    workdir = job_dir(svc.settings, job.id)
    workdir.mkdir(parents=True, exist_ok=True)
    sdb = attempt_artifacts(workdir, job.attempts) / "bundle.sdb"
    sdb.write_bytes(sdb_bytes(bundle))
    assert queue.finish(job.id, "w", "succeeded", artifact_bytes=sdb.stat().st_size)
    return token, job.id, sdb


@pytest.mark.anyio
async def test_a_job_whose_bundle_is_served_is_not_deleted_until_the_version_is_removed(svc, bundles):
    token, job_id, _ = finished_job_with_a_bundle(svc, bundles.a)
    models_add(svc.settings, str(job_dir(svc.settings, job_id) / "artifacts" / "bundle.sdb"))  # as the docs say
    r = await svc.client.delete(f"/v1/jobs/{job_id}", headers=svc.auth(token))
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "job_artifacts_served", r.text
    assert "digits-a version 1" in r.text and "sdb models remove" in r.text and "/jobs/" not in r.text
    assert (job_dir(svc.settings, job_id) / "artifacts" / "bundle.sdb").is_file()  # nothing removed
    assert (await svc.client.get(f"/v1/jobs/{job_id}", headers=svc.auth(token))).status_code == 200

    r = await svc.client.delete("/v1/models/digits-a?version=1", headers=svc.admin)
    assert r.status_code == 200, r.text
    r = await svc.client.delete(f"/v1/jobs/{job_id}", headers=svc.auth(token))
    assert r.status_code == 200, r.text
    assert not job_dir(svc.settings, job_id).exists()


@pytest.mark.anyio
async def test_a_version_stored_with_a_relative_path_into_the_job_is_found_too(svc, bundles, monkeypatch):
    token, job_id, sdb = finished_job_with_a_bundle(svc, bundles.a)
    monkeypatch.chdir(svc.settings.data_dir)
    svc.app.state.store.add_model("digits-a", "1", os.path.relpath(sdb))  # jobs/<id>/artifacts.1-xxxx/bundle.sdb
    r = await svc.client.delete(f"/v1/jobs/{job_id}", headers=svc.auth(token))
    assert r.status_code == 409 and "digits-a version 1" in r.text, r.text
    assert sdb.is_file()
