"""A submit retried with its Idempotency-Key after the server restarted (a new app over the same store
and data dir), and after the world the first submission was checked against changed: a new version of
the hosted model it reads (the first pinned the then latest), the uploaded file it names deleted. The
retry is the same request: it gets the same job (202), never a 409 "used for a different job" nor a 404,
and queues nothing. A different request under the same key is still a 409. Real app, on SQLite and on
PostgreSQL."""
from __future__ import annotations

import pytest

from .conftest import deploy, make_settings, start_service
from .test_files_api import digits_npz

pytestmark = [pytest.mark.usefixtures("db_url"), pytest.mark.anyio]

DISTILL = {"teacher": {"model": "digits-a"}, "student": "mlp", "data": "digits", "epochs": 1}


async def submit(svc, token, params, idem):
    return await svc.client.post("/v1/jobs", json={"kind": "distill", "params": params},
                                 headers={**svc.auth(token), "Idempotency-Key": idem})


async def test_a_retried_submit_after_a_restart_and_changes_is_the_same_job(tmp_path, bundles):
    settings = make_settings(tmp_path / "data", bundles)
    svc, manager = await start_service(settings, bundles.a)
    try:
        tok = svc.key(("jobs", "distill"))
        r = await svc.client.post("/v1/files", files={"file": ("digits.npz", digits_npz())},
                                  data={"purpose": "dataset"}, headers=svc.auth(tok))
        assert r.status_code == 201, r.text
        file_id = r.json()["id"]
        pinned = await submit(svc, tok, DISTILL, "pinned")
        assert pinned.status_code == 202, pinned.text
        assert pinned.json()["params"]["teacher"]["version"] == "1"
        on_file = {**DISTILL, "data": file_id}
        uses_file = await submit(svc, tok, on_file, "uses-file")
        assert uses_file.status_code == 202, uses_file.text
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)

    svc, manager = await start_service(settings)  # the restart: a new app over the same store and data dir
    try:
        assert (await deploy(svc.client, bundles.a2, svc.admin)).status_code == 201  # digits-a now at version 2
        assert (await svc.client.delete(f"/v1/files/{file_id}", headers=svc.auth(tok))).status_code == 200

        again = await submit(svc, tok, DISTILL, "pinned")
        assert again.status_code == 202, again.text
        assert again.json()["id"] == pinned.json()["id"]
        assert again.json()["params"]["teacher"]["version"] == "1"  # the job as queued, not resolved again
        again = await submit(svc, tok, on_file, "uses-file")
        assert again.status_code == 202, again.text
        assert again.json()["id"] == uses_file.json()["id"]

        other = await submit(svc, tok, {**DISTILL, "epochs": 2}, "pinned")
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
        jobs = (await svc.client.get("/v1/jobs", headers=svc.auth(tok))).json()["jobs"]
        assert len(jobs) == 2
        fresh = await submit(svc, tok, DISTILL, "new")  # a new key: checked as today, pinned to version 2
        assert fresh.status_code == 202 and fresh.json()["params"]["teacher"]["version"] == "2"
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)
