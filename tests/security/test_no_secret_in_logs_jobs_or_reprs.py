"""No secret (API keys, the master key, the pepper) in any log record at DEBUG, job record, job log,
artifact, response or repr, through a session that exercises keys, the keyed path and jobs."""
from __future__ import annotations

import logging

import anyio
import httpx
import numpy as np
import pytest

from service.auth import parse_token
from service.jobs.worker import run_worker
from tests.service.conftest import Server, make_settings, run_sdb, start_service

pytestmark = pytest.mark.anyio

X = np.zeros((2, 1, 8, 8), np.float32)
LOOSE = {"max_accuracy_drop": 100, "max_keyed_drop": 100, "min_leak_margin": -100, "min_guessed_key_share": -10, "check_attempts": 1}


async def test_no_secret_in_logs_job_records_artifacts_or_reprs(tmp_path, bundles, caplog):
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path / "data", bundles)
    svc, manager = await start_service(settings, bundles.a)
    try:
        c = svc.client
        admin, user = svc.key(("admin",)), svc.key(("jobs", "distill", "predict"))
        seen: list[str | bytes] = []
        seen.append((await c.get("/v1/keys", headers=svc.auth(admin))).text)
        seen.append((await c.post("/v1/models/digits-a/distill", json={"inputs": X[:2].tolist()},
                                  headers=svc.auth(user))).text)
        seen.append((await c.get("/v1/keys", headers=svc.auth(f"sdb_{'1' * 12}_{'a' * 64}"))).text)
        jobs = []
        for kind, params in (("distill", {"teacher": {"model": "digits-a"}, "student": "mlp", "data": "digits", "epochs": 1,
                                          "transfer": 100}),
                             ("wrap", {"data": "digits", "teacher": {"arch": "cnn"}, "teacher_epochs": 1, "epochs": 1,
                                       **LOOSE, "min_leak_margin": 100})):  # the wrap is refused: a failed job
            r = await c.post("/v1/jobs", json={"kind": kind, "params": params}, headers=svc.auth(user))
            assert r.status_code == 202, r.text
            jobs.append(r.json()["id"])
        await anyio.to_thread.run_sync(lambda: run_worker(settings, once=True))
        statuses = []
        for job_id in jobs:
            for token in (user, admin):
                r = await c.get(f"/v1/jobs/{job_id}", headers=svc.auth(token))
                statuses.append(r.json()["status"])
                seen += [r.text, (await c.get(f"/v1/jobs/{job_id}/logs", headers=svc.auth(token))).text]
            listing = (await c.get(f"/v1/jobs/{job_id}/artifacts", headers=svc.auth(user))).json()["artifacts"]
            for a in listing:
                seen.append((await c.get(f"/v1/jobs/{job_id}/artifacts/{a['name']}", headers=svc.auth(user))).content)
        assert statuses == ["succeeded"] * 2 + ["failed"] * 2  # both kinds ran: a success and a failure
        # a box that missed its thresholds is the recipe's verdict: one line in the worker's log, no traceback
        refused = [r for r in caplog.records if "(wrap) failed" in r.getMessage()]
        assert refused and all(r.levelno == logging.WARNING and r.exc_info is None for r in refused), refused
        seen += [(await c.get("/metrics")).text, (await c.get("/readyz")).text, repr(settings), str(settings)]
        seen.append(caplog.text)
        # Files a job writes beside its artifacts (the log file, checkpoints) count as well.
        seen += [p.read_bytes() for p in (settings.data_dir / "jobs").rglob("*") if p.is_file()]
    finally:
        await c.aclose()
        await manager.__aexit__(None, None, None)

    secrets = {"user key": user, "user secret": parse_token(user)[1], "admin secret": parse_token(admin)[1],
               "master key": settings.master_key.hex(), "pepper": settings.pepper.hex()}
    raw = {"master key bytes": settings.master_key, "pepper bytes": settings.pepper}
    for blob in seen:
        text = blob.decode("latin-1") if isinstance(blob, bytes) else blob
        for what, s in secrets.items():
            assert s not in text and s.upper() not in text, f"the {what} leaked"
        if isinstance(blob, bytes):
            for what, b in raw.items():
                assert b not in blob, f"the {what} leaked"


def test_the_access_log_holds_no_query_string_and_no_key(tmp_path, bundles):
    # Keys go in the header alone; a client that put one in the URL is refused, but uvicorn's access log wrote the
    # whole URL, key and all. It now logs the path alone, redacted.
    out = tmp_path / "access.log"
    with out.open("w") as stdout:  # where uvicorn writes its access log
        server = Server(tmp_path / "data", bundles, args=("--access-log",), stdout=stdout.fileno())
    try:
        created = run_sdb("keys", "create", "--scopes", "predict", env=server.env)
        token = created.stdout.split()[-1] if created.returncode == 0 else ""
        assert parse_token(token), created.stdout + created.stderr
        assert httpx.get(f"{server.url}/v1/keys/me?api_key={token}&note=QUERYMARK").status_code == 401
        assert httpx.get(f"{server.url}/v1/models/{token}").status_code == 404  # in the path itself
    finally:
        log = server.stop() + out.read_text()
    assert '"GET /v1/keys/me HTTP/1.1" 401' in log, log[-2000:]
    secret = token.split("_")[-1]
    assert secret not in log and "QUERYMARK" not in log, log[-2000:]
