"""Hole 1 (jobs): no job parameter takes a server path from a non-admin key.

The issue's reproduction: a key with only the ``jobs`` scope submitted a distill job whose teacher
weights were ``master.key``; the worker opened the server's master key as weights and the job's
error carried its first hex digit. Before the fix every file a job named (teacher weights, data sets
as ``imagefolder:PATH``, style images and loss-network weights, amalgamation and transferability
weights, OKDHP data) was a path under the data directory: the store, the served bundles, another
tenant's artifacts and uploads were all a job away. Now a job names uploaded files by id, resolved
for the submitting key (its own, a shared one), and a path is an admin key's escape hatch only.

Against the real server (``sdb serve`` and a worker, SQLite store) with a ``jobs`` key, every path
below is refused with a 4xx before anything is queued, in the params' current spelling and in the
spelling the API had before (fields that took a path), and no response or job carries file contents.
"""
from __future__ import annotations

import shutil

import httpx
import pytest

from sdb_core.models import create_model
from sdb_core.weights import save_weights
from tests.service.jobs_helpers import JobServer, key, prepare, upload, wait_for

SECRET = "5f" * 32  # what a leaked master key would look like, in a file named like one
SQLITE_MAGIC = "SQLite format 3"
OTHER_JOB = "0" * 32  # another tenant's finished job, its artifacts in the data dir
NO_LOSS = {"max_accuracy_drop": 100, "max_keyed_drop": 100, "min_leak_margin": -100, "min_guessed_key_share": -10, "check_attempts": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    root = tmp_path_factory.mktemp("no-paths")
    data = root / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    # What an old layout, another tenant and the operator leave in the data dir.
    (data / "master.key").write_text(SECRET)
    artifacts = data / "jobs" / OTHER_JOB / "artifacts"
    save_weights(create_model("cnn", num_classes=10, in_shape=(1, 8, 8)), artifacts / "student.safetensors")
    (data / "uploads").mkdir()
    shutil.copy(artifacts / "student.safetensors", data / "uploads" / "teacher.safetensors")
    srv = JobServer(data, bundles, SDB_WORKERS="1")
    srv.settings = settings
    srv.attacker = key(settings, ["jobs", "distill"])
    srv.tenant = key(settings, ["jobs"])
    srv.admin = key(settings, ["admin"])
    srv.tenant_file = upload(srv.url, srv.tenant, artifacts / "student.safetensors")
    yield srv
    srv.stop()


def attacks(srv) -> list[tuple[str, str, dict]]:
    """(what, kind, params): each names a file on the server (or another key's file) for the attacker's job."""
    theirs = f"jobs/{OTHER_JOB}/artifacts/student.safetensors"
    their_upload = f"files/{srv.tenant_file}/weights.safetensors"
    distill = {"student": "mlp", "data": "digits", "epochs": 1, "transfer": 100}
    wrap = {"data": "digits", "epochs": 1, **NO_LOSS}
    audit = {"data": "digits", "transfer": 60, "steps": 30, "keys": 0, "families": ["labels", "kd"], "seeds": [0]}
    transfer = {"target_data": "digits", "probe": 10, "target_train": 50, "target_epochs": 1}
    amalgamate = {"method": "afk", "transfer": 16, "layer_epochs": 1, "finetune_epochs": 1}

    def weights(path: str, arch: str = "cnn") -> dict:
        return {"file": path, "arch": arch}

    return [
        # the reproduction, as it was sent, and in today's spelling
        ("master.key as teacher_weights", "distill", {**distill, "teacher_weights": "master.key"}),
        ("master.key as teacher file", "distill", {**distill, "teacher": weights("master.key")}),
        ("../ out of the data dir", "distill", {**distill, "teacher": weights("../data/master.key")}),
        ("../ as teacher_weights", "distill", {**distill, "teacher_weights": "../data/master.key"}),
        ("an absolute path", "wrap", {**wrap, "teacher": weights("/etc/passwd")}),
        ("the store as a data set", "distill", {**distill, "teacher": {"model": "digits-a"}, "data": "npz:sdb.sqlite3"}),
        ("imagefolder:bundles", "distill", {**distill, "teacher": {"model": "digits-a"}, "data": "imagefolder:bundles"}),
        ("imagefolder:bundles to wrap", "wrap", {**wrap, "arch": "cnn", "data": "imagefolder:bundles"}),
        ("imagefolder:bundles, today", "wrap", {**wrap, "teacher": {"arch": "cnn"}, "data": "imagefolder:bundles"}),
        ("another tenant's artifacts", "distill", {**distill, "teacher": weights(theirs)}),
        ("another tenant's artifacts, then", "distill", {**distill, "teacher_weights": theirs}),
        ("another tenant's artifacts to wrap", "wrap", {**wrap, "arch": "cnn", "teacher": theirs}),
        ("another tenant's artifacts to audit", "audit", {**audit, "teacher_weights": theirs}),
        ("another tenant's artifacts to audit, today", "audit", {**audit, "target": weights(theirs)}),
        ("another tenant's upload by path", "distill", {**distill, "teacher_weights": their_upload}),
        ("another tenant's upload by path, today", "distill", {**distill, "teacher": weights(their_upload)}),
        ("another key's file id", "distill", {**distill, "teacher": weights(srv.tenant_file)}),
        ("another key's file id to wrap", "wrap", {**wrap, "teacher": weights(srv.tenant_file)}),
        ("another key's file id as data", "distill", {**distill, "teacher": {"model": "digits-a"},
                                                     "data": srv.tenant_file}),
        ("an operator's file to rank", "transferability", {**transfer, "sources": [{"weights": "uploads/teacher.safetensors"}]}),
        ("an operator's file to rank, today", "transferability",
         {**transfer, "sources": [weights("uploads/teacher.safetensors")]}),
        ("another tenant's artifacts to amalgamate", "amalgamate",
         {**amalgamate, "teachers": [{"name": "t", "weights": theirs, "labels": [0]}]}),
        ("another tenant's artifacts to amalgamate, today", "amalgamate",
         {**amalgamate, "teachers": [{"name": "t", "file": theirs, "labels": [0]}]}),
        ("the master key as a style image", "style", {"method": "gatys", "size": 32, "steps": 1, "style": "master.key"}),
        ("the store as loss-net weights", "style", {"method": "gatys", "size": 32, "steps": 1, "weights": "sdb.sqlite3"}),
        ("a server folder as style crops", "style", {"method": "fast", "train_content": "imagefolder:jobs"}),
        ("a server folder as pose data", "okdhp", {"data": "coco-keypoints:jobs", "epochs": 1}),
    ]


def leaks(text: str) -> list[str]:
    return [what for what, s in (("the planted master key", SECRET), ("the store's bytes", SQLITE_MAGIC),
                                 ("the planted master key's first digit", "Unsupported operand 53"))
            if s in text or s.upper() in text]


def test_no_job_param_takes_a_server_path_from_a_non_admin_key(server):
    h = {"Authorization": f"Bearer {server.attacker}"}
    problems = []
    for what, kind, params in attacks(server):
        r = httpx.post(server.url + "/v1/jobs", json={"kind": kind, "params": params}, headers=h, timeout=60)
        if not 400 <= r.status_code < 500:
            problems.append(f"{what}: {r.status_code}, not refused")
        problems += [f"{what}: the answer carries {leak}" for leak in leaks(r.text)]
    # Nothing was queued for the attacker; whatever was (before the fix), its record carries no contents.
    jobs = httpx.get(server.url + "/v1/jobs", headers=h, timeout=30).json()["jobs"]
    if jobs:
        problems.append(f"{len(jobs)} jobs were queued: {sorted({j['kind'] for j in jobs})}")

        def ended():
            now = httpx.get(server.url + "/v1/jobs", headers=h, timeout=30).json()["jobs"]
            return all(j["status"] in ("succeeded", "failed", "cancelled") for j in now) and now

        try:
            jobs = wait_for(ended, 120, "the attacker's jobs end", every=0.5)
        except TimeoutError:
            pass
        for j in jobs:
            log = httpx.get(f"{server.url}/v1/jobs/{j['id']}/logs", headers=h, timeout=30).text
            problems += [f"job {j['kind']} ({j['status']}): carries {leak}" for leak in leaks(str(j) + log)]
            if j["status"] == "succeeded":
                problems.append(f"job {j['kind']} succeeded on a server file: {j['params']}")
    assert not problems, "\n".join(problems)


def test_the_admin_escape_hatch_and_the_tenants_own_files(server):
    """What is refused to the attacker stays possible where it should: the owner names its own upload,
    and an admin key names a path under the data dir (the operator's escape hatch)."""
    params = {"teacher": {"file": server.tenant_file, "arch": "cnn"}, "student": "mlp", "data": "digits",
              "epochs": 1, "transfer": 50}
    for token in (server.tenant, server.admin):
        r = httpx.post(server.url + "/v1/jobs", json={"kind": "distill", "params": params},
                       headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 202, r.text
    admin = {"Authorization": f"Bearer {server.admin}"}
    by_path = {**params, "teacher": {"file": "uploads/teacher.safetensors", "arch": "cnn"}}
    r = httpx.post(server.url + "/v1/jobs", json={"kind": "distill", "params": by_path}, headers=admin, timeout=60)
    assert r.status_code == 202, r.text
    job = wait_for(lambda: (j := httpx.get(f"{server.url}/v1/jobs/{r.json()['id']}", headers=admin,
                                           timeout=30).json())["status"] in ("succeeded", "failed") and j,
                   120, "the admin's job ends")
    assert job["status"] == "succeeded", job
    assert job["params"]["teacher"]["file"] == "uploads/teacher.safetensors"  # the record keeps what was given
