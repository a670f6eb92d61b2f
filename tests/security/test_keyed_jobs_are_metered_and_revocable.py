"""Hole 4: the keyed path through jobs is metered and revocable, and a job reads no hosted model its key
may not read.

Before the fix a ``distill`` job read a hosted model's keyed path inside the worker with no charge to
the key's quota (a key with a quota of 100 samples drew the whole training split), a job ran on after
its key was revoked, the audit and transferability kinds checked no model allowlist, and any ``jobs``
key could rank a protected box, which reads its ONNX graph as a differentiable network (white-box).

Against the real server (``sdb serve`` and one worker, SQLite store): the quota is charged exactly
(the transfer set, up front, before the teacher is asked anything) and never exceeded; revoking the
key (or taking a model off its allowlist) stops its running job and cancels its queued one; a key
whose allowlist excludes a model cannot audit, rank, amalgamate or distill it; a ``jobs`` key cannot
rank a protected model's graph.
"""
from __future__ import annotations

import httpx
import pytest
from sqlalchemy import update

from sdb_core.amalgamate.multilabel import MultiLabelNet
from sdb_core.bundle import export_bundle
from sdb_core.models import create_model
from service.auth import parse_token
from service.store import ApiKeyRow, Store
from tests.service.conftest import sdb_bytes
from tests.service.jobs_helpers import JobServer, key, prepare, wait_for

DISTILL = {"teacher": {"model": "digits-a"}, "student": "mlp", "data": "digits", "epochs": 1}
LONG = {**DISTILL, "epochs": 1000}
DONE = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    root = tmp_path_factory.mktemp("keyed-jobs")
    plain = export_bundle(create_model("cnn", num_classes=10, in_shape=(1, 8, 8)).eval(), root / "plain-cnn",
                          name="plain-cnn", in_shape=(1, 8, 8), mean=(0.0,), std=(1.0,),
                          labels=[str(k) for k in range(10)])
    tagger = export_bundle(MultiLabelNet(1, 2, [8, 8]).eval(), root / "ml-plain", name="ml-plain",
                           in_shape=(1, 56, 56), mean=(0.0,), std=(1.0,), labels=["0", "1"], task="multilabel")
    settings = prepare(root / "data", bundles, {"digits-a": bundles.a, "plain-cnn": plain, "ml-plain": tagger})
    srv = JobServer(root / "data", bundles, SDB_WORKERS="1")
    srv.settings = settings
    srv.admin = key(settings, ["admin"])
    yield srv
    srv.stop()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def submit(srv, token: str, kind: str, params: dict) -> httpx.Response:
    return httpx.post(srv.url + "/v1/jobs", json={"kind": kind, "params": params}, headers=auth(token), timeout=60)


def job(srv, job_id: str) -> dict:
    """As an admin reads it (the owner's key may be revoked)."""
    return httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=auth(srv.admin), timeout=30).json()


def ended(srv, job_id: str, timeout: float) -> dict:
    return wait_for(lambda: (j := job(srv, job_id))["status"] in DONE and j, timeout, f"job {job_id} ends", every=0.2)


def used(srv, token: str) -> int:
    store = Store(srv.settings.db_url)
    try:
        return store.get_key(parse_token(token)[0]).used
    finally:
        store.close()


def test_a_distill_job_charges_its_keys_quota_exactly_and_never_past_it(server):
    quota = 100
    tok = key(server.settings, ["jobs", "distill"], quota=quota)
    # A transfer set the quota cannot hold: refused before anything is queued.
    r = submit(server, tok, "distill", {**DISTILL, "transfer": 2 * quota})
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded", r.text
    # The whole training split (its size is known when the job runs): the job fails, nothing is charged.
    r = submit(server, tok, "distill", DISTILL)
    assert r.status_code == 202, r.text
    failed = ended(server, r.json()["id"], 60)
    assert failed["status"] == "failed" and "quota" in failed["error"], failed
    assert "params.transfer" in failed["error"] and "smaller batches" not in failed["error"], failed  # a job's advice
    assert used(server, tok) == 0
    # A teacher that cannot take the data set's inputs (8x8 digits against 28x28 MNIST): failed before any
    # sample is drawn, nothing charged (it was charged, then failed on "operands could not be broadcast").
    r = submit(server, tok, "distill", {**DISTILL, "data": "mnist-5k", "transfer": 60})
    assert r.status_code == 202, r.text
    failed = ended(server, r.json()["id"], 60)
    assert failed["status"] == "failed" and "takes inputs [1, 8, 8]" in failed["error"], failed
    assert used(server, tok) == 0
    # One that fits is charged exactly its keyed samples, and the quota is then spent for the next.
    r = submit(server, tok, "distill", {**DISTILL, "transfer": 60})
    assert r.status_code == 202, r.text
    done = ended(server, r.json()["id"], 60)
    assert done["status"] == "succeeded", done
    assert used(server, tok) == 60
    r = submit(server, tok, "distill", {**DISTILL, "transfer": 60})
    assert r.status_code == 429, r.text
    assert used(server, tok) <= quota


def test_revoking_the_key_stops_its_running_job_and_cancels_its_queued_one(server):
    tok = key(server.settings, ["jobs", "distill"])
    running = submit(server, tok, "distill", LONG).json()["id"]
    queued = submit(server, tok, "distill", {**DISTILL, "transfer": 50}).json()["id"]  # behind it: one worker
    try:
        wait_for(lambda: job(server, running)["step"].startswith("distill epoch"), 60, "training")
        r = httpx.delete(f"{server.url}/v1/keys/{parse_token(tok)[0]}", headers=auth(server.admin), timeout=30)
        assert r.status_code == 200, r.text
        stopped = ended(server, running, 15)
        assert stopped["status"] == "cancelled" and "revoked" in stopped["message"], stopped
        never = ended(server, queued, 15)
        assert never["status"] == "cancelled" and "revoked" in never["message"], never
        log = httpx.get(f"{server.url}/v1/jobs/{queued}/logs", headers=auth(server.admin), timeout=30).json()["text"]
        assert "distilling" not in log  # claimed, checked, and cancelled before anything ran
    finally:
        for j in (running, queued):
            httpx.post(f"{server.url}/v1/jobs/{j}/cancel", headers=auth(server.admin), timeout=30)


def test_a_model_taken_off_the_allowlist_stops_the_job_that_reads_it(server):
    tok = key(server.settings, ["jobs", "distill"], models=["digits-a"])
    running = submit(server, tok, "distill", LONG).json()["id"]
    try:
        wait_for(lambda: job(server, running)["step"].startswith("distill epoch"), 60, "training")
        store = Store(server.settings.db_url)  # the key changed in the store, as another process would
        try:
            with store.session.begin() as s:
                s.execute(update(ApiKeyRow).where(ApiKeyRow.id == parse_token(tok)[0]).values(models="digits-b"))
        finally:
            store.close()
        stopped = ended(server, running, 15)
        assert stopped["status"] == "cancelled" and "not allowed to use model 'digits-a'" in stopped["message"], stopped
    finally:
        httpx.post(f"{server.url}/v1/jobs/{running}/cancel", headers=auth(server.admin), timeout=30)


def test_a_key_cannot_audit_rank_amalgamate_or_distill_a_model_off_its_allowlist(server):
    tok = key(server.settings, ["jobs", "predict", "distill"], models=["digits-b"])
    attempts = {
        "audit": {"target": {"model": "plain-cnn"}, "data": "digits", "transfer": 60, "steps": 30},
        "transferability": {"sources": [{"model": "plain-cnn"}], "target_data": "digits", "probe": 10},
        "amalgamate": {"method": "afk", "teachers": [{"name": "t", "model": "ml-plain"}], "transfer": 16},
        "distill": DISTILL,
    }
    for kind, params in attempts.items():
        r = submit(server, tok, kind, params)
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed", (kind, r.status_code, r.text)
    assert httpx.get(server.url + "/v1/jobs", headers=auth(tok), timeout=30).json()["jobs"] == []


def test_a_jobs_key_cannot_rank_a_protected_models_graph(server):
    tok = key(server.settings, ["jobs"])
    rank = {"target_data": "digits", "probe": 10, "target_train": 50, "target_epochs": 1}
    for params in ({**rank, "sources": [{"model": "digits-a"}]},
                   {"sources": [{"model": "plain-cnn"}], "target": {"model": "digits-a"}, "probe_data": "digits"}):
        r = submit(server, tok, "transferability", params)
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_protected", r.text
    assert httpx.get(server.url + "/v1/jobs", headers=auth(tok), timeout=30).json()["jobs"] == []
    # A plain model's graph is the jobs key's to rank; a protected one's is the operator's (admin).
    for token, model in ((tok, "plain-cnn"), (server.admin, "digits-a")):
        r = submit(server, token, "transferability", {**rank, "sources": [{"model": model}]})
        assert r.status_code == 202, r.text
        httpx.post(f"{server.url}/v1/jobs/{r.json()['id']}/cancel", headers=auth(server.admin), timeout=30)


def test_the_owner_of_a_protected_model_may_rank_its_graph_and_no_other_key(server, bundles):
    """The key that deployed a box owns its name: its network is its own to rank; another jobs key's is not."""
    owner = key(server.settings, ["jobs", "deploy"])
    r = httpx.post(server.url + "/v1/models", files={"file": ("b.sdb", sdb_bytes(bundles.b))},
                   data={"name": "owned-box"}, headers=auth(owner), timeout=60)
    assert r.status_code == 201 and r.json()["mode"] == "sdb", r.text
    rank = {"target_data": "digits", "probe": 10, "target_train": 50, "target_epochs": 1,
            "sources": [{"model": "owned-box"}]}
    other = submit(server, key(server.settings, ["jobs", "deploy"]), "transferability", rank)
    assert other.status_code == 403 and other.json()["error"]["code"] == "model_protected", other.text
    mine = submit(server, owner, "transferability", rank)
    assert mine.status_code == 202, mine.text
    # and the worker gives it the network: it refused every non-admin key once, so the owner's job failed late
    done = ended(server, mine.json()["id"], 300)
    assert done["status"] == "succeeded", done
