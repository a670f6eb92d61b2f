"""Limits per caller: request rate per key and per address (429 with Retry-After, before any work),
jobs a key may have at once, bytes of files and of job artifacts a key may keep. The real app in
process, SQLite store. (What the workers enforce while a job runs, its run time and its artifacts, is in
test_job_caps_are_enforced_by_the_workers.py; uploads racing the file cap in
test_file_storage_cap_is_exact_under_concurrency.py.)"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import make_settings, start_service

pytestmark = pytest.mark.anyio

PREDICT = "/v1/models/digits-a/predict"
ONE = {"inputs": [[[[0.0] * 8] * 8]]}


def png(seed: int) -> bytes:
    """A 64x64 noise image: about 4 KB, the same size for every seed (noise does not compress)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def upload_image(client, headers: dict, seed: int):
    """POST one ``png(seed)`` to /v1/files as an image."""
    return await client.post("/v1/files", headers=headers, data={"purpose": "image"},
                             files={"file": (f"{seed}.png", png(seed), "image/png")})


RATES = {"rate_limit_key_per_s": 0.2, "rate_limit_key_burst": 3, "rate_limit_address_per_s": 0.2,
         "rate_limit_address_burst": 3}
ARTIFACT_CAP = 4096
CAPS = {"max_active_jobs_per_key": 2, "max_file_storage_per_key": 2 * len(png(0)) + 200,
        "max_artifact_storage_per_key": ARTIFACT_CAP}
WRAP = {"kind": "wrap", "params": {"data": "digits", "teacher": {"arch": "cnn"}, "epochs": 1}}


async def _service(tmp_path, bundles, **limits):
    svc, manager = await start_service(make_settings(tmp_path / "data", bundles, workers=0, **limits), bundles.a)
    try:
        yield svc
    finally:
        await svc.client.aclose()
        await manager.__aexit__(None, None, None)


@pytest.fixture
async def limited(tmp_path, bundles):
    async for svc in _service(tmp_path, bundles, **RATES):
        yield svc


@pytest.fixture
async def capped(tmp_path, bundles):
    async for svc in _service(tmp_path, bundles, **CAPS):
        yield svc


async def test_a_key_over_its_rate_gets_429_before_its_request_is_even_read(limited):
    h = limited.auth(limited.key(("predict",)))
    for _ in range(3):
        assert (await limited.client.post(PREDICT, json=ONE, headers=h)).status_code == 200
    # Over the rate, even a body the route would refuse as malformed is never read: 429, not 422.
    r = await limited.client.post(PREDICT, content=b"{not json", headers={**h, "content-type": "application/json"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
    assert int(r.headers["retry-after"]) >= 1
    assert int(r.headers["retry-after"]) == -(-int(r.headers["retry-after-ms"]) // 1000)  # the same wait, exactly
    # Another key has a bucket of its own.
    other = limited.auth(limited.key(("predict",)))
    assert (await limited.client.post(PREDICT, json=ONE, headers=other)).status_code == 200


async def test_callers_without_a_key_are_limited_per_address_and_probes_never(limited):
    c = limited.client
    for _ in range(3):
        assert (await c.post(PREDICT, json=ONE)).status_code == 200
    r = await c.post(PREDICT, json=ONE)
    assert r.status_code == 429 and "retry-after" in r.headers, r.text
    assert (await c.get("/v1/models")).status_code == 429
    for probe in ("/healthz", "/v2/health/live", "/v2/health/ready"):  # ours and the protocol's (KServe's)
        for _ in range(5):
            assert (await c.get(probe)).status_code == 200, probe


async def test_guessing_key_secrets_is_rate_limited_per_address(limited):
    bad = {"Authorization": f"Bearer sdb_{'1' * 12}_{'a' * 64}"}
    codes = [(await limited.client.get("/v1/keys", headers=bad)).status_code for _ in range(5)]
    assert codes[:3] == [401] * 3 and codes[3:] == [429, 429]


async def test_a_key_over_its_own_rate_spends_nothing_of_its_address(limited):
    # a valid key's 429s were charged to its address's bucket for headers that authenticate nothing: once it ran dry,
    # every keyed request from that address (a NAT's) paid a second key lookup, and a junk header was refused early
    c, h = limited.client, limited.auth(limited.key(("predict",)))
    codes = [(await c.post(PREDICT, json=ONE, headers=h)).status_code for _ in range(6)]
    assert codes == [200] * 3 + [429] * 3, codes
    junk = {"Authorization": "x"}
    assert [(await c.get("/v2", headers=junk)).status_code for _ in range(3)] == [200] * 3  # its bucket is whole


async def test_a_header_that_authenticates_nothing_is_limited_per_address_and_a_key_is_not(limited):
    # A junk Authorization passed every route that checks no key unlimited (the address's bucket was skipped for
    # any header): such requests are charged to their address once answered, and refused past its rate.
    c, junk = limited.client, {"Authorization": "x"}
    codes = [(await c.get(path, headers=junk)).status_code for path in ("/v2", "/openapi.json", "/no/such/route")]
    assert codes == [200, 200, 404]  # the address's burst: 3
    r = await c.get("/v2", headers=junk)
    assert r.status_code == 429 and "authenticated nothing" in r.json()["error"], r.text
    assert (await c.get("/v1/models", headers=junk)).status_code == 429  # bad keys on checked routes count too
    # a valid key from the same address spends its own rate alone, however many it sends (its bucket: 3), on a route
    # that checks no key too (it went unlimited there: nothing checked it, nothing charged it)
    h = limited.auth(limited.key(("predict",)))
    assert [(await c.post(PREDICT, json=ONE, headers=h)).status_code for _ in range(2)] == [200] * 2
    codes = [(await c.get("/v2", headers=h)).status_code for _ in range(3)]
    assert codes == [200, 429, 429], codes


async def test_a_key_may_have_only_so_many_jobs_at_once(capped):
    h = capped.auth(capped.key(("jobs",)))
    c = capped.client
    params = {"kind": "wrap", "params": {"data": "digits", "teacher": {"arch": "cnn"}, "epochs": 1}}
    first = await c.post("/v1/jobs", json=params, headers={**h, "Idempotency-Key": "one"})
    assert first.status_code == 202
    assert (await c.post("/v1/jobs", json=params, headers=h)).status_code == 202
    r = await c.post("/v1/jobs", json=params, headers=h)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs", r.text
    # A retry of a job it has is not a new job; after a cancel there is room again.
    again = await c.post("/v1/jobs", json=params, headers={**h, "Idempotency-Key": "one"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert (await c.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=h)).status_code == 200
    assert (await c.post("/v1/jobs", json=params, headers=h)).status_code == 202


async def test_a_key_may_keep_only_so_many_bytes_of_files(capped):
    h = capped.auth(capped.key(("jobs",)))
    c = capped.client

    ids = []
    for seed in (1, 2):
        r = await upload_image(c, h, seed)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = await upload_image(c, h, 3)
    assert r.status_code == 413 and r.json()["error"]["code"] == "storage_exceeded", r.text
    assert len((await c.get("/v1/files", headers=h)).json()["files"]) == 2  # the refused one left nothing
    assert (await c.delete(f"/v1/files/{ids[0]}", headers=h)).status_code == 200
    assert (await upload_image(c, h, 3)).status_code == 201


async def test_a_file_kept_unpacked_counts_what_it_keeps(capped):
    """An image folder's zip is kept unpacked: a 300 KB zip of zeros held 300 MB against 300 KB of the cap."""
    import zipfile

    h = capped.auth(capped.key(("jobs",)))
    cap = CAPS["max_file_storage_per_key"]

    def tiny(shade: int) -> bytes:
        b = io.BytesIO()
        Image.new("L", (8, 8), shade).save(b, "PNG")
        return b.getvalue()

    images = {f"{c}/{i}.png": tiny(40 * i + k) for k, c in enumerate(("cat", "dog")) for i in range(3)}

    def folder(extra: int) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in images.items():
                z.writestr(name, data)
            if extra:
                z.writestr("cat/notes.bin", b"\0" * extra)  # not an image, kept all the same
        return buf.getvalue()

    big = folder(4 * cap)
    assert len(big) < cap  # sent, it fits
    r = await capped.client.post("/v1/files", headers=h, data={"purpose": "dataset"}, files={"file": ("d.zip", big)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "storage_exceeded", r.text
    assert "unpacked to" in r.json()["error"]["message"]
    assert (await capped.client.get("/v1/files", headers=h)).json()["files"] == []  # nothing kept, nothing held
    small = folder(0)
    r = await capped.client.post("/v1/files", headers=h, data={"purpose": "dataset"}, files={"file": ("d.zip", small)})
    assert r.status_code == 201, r.text
    assert r.json()["bytes"] == max(len(small), sum(map(len, images.values())))  # the larger of sent and kept


def _ran(svc, job_id: str, artifact_bytes: int) -> None:
    """What a worker leaves of a job that succeeded under a larger cap (the operator lowered it since)."""
    from service.jobs.runner import job_dir

    queue = svc.app.state.jobs
    assert queue.claim("test-worker", job_id=job_id) is not None
    artifacts = job_dir(svc.settings, job_id) / "artifacts"
    artifacts.mkdir(parents=True)
    (artifacts / "student.safetensors").write_bytes(b"\0" * artifact_bytes)
    assert queue.finish(job_id, "test-worker", "succeeded", artifact_bytes=artifact_bytes)


async def test_a_key_at_its_artifact_cap_queues_nothing_until_it_deletes_finished_jobs(capped):
    c = capped.client
    h, other = capped.auth(capped.key(("jobs",))), capped.auth(capped.key(("jobs",)))
    # A job is deleted once it has ended, by its own key only.
    queued = (await c.post("/v1/jobs", json=WRAP, headers=h)).json()["id"]
    r = await c.delete(f"/v1/jobs/{queued}", headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished", r.text
    assert (await c.post(f"/v1/jobs/{queued}/cancel", headers=h)).status_code == 200
    assert (await c.delete(f"/v1/jobs/{queued}", headers=other)).status_code == 404
    assert (await c.delete(f"/v1/jobs/{queued}", headers=h)).json() == {"id": queued, "deleted": True}
    assert (await c.get(f"/v1/jobs/{queued}", headers=h)).status_code == 404

    done = (await c.post("/v1/jobs", json=WRAP, headers=h)).json()["id"]
    _ran(capped, done, ARTIFACT_CAP)
    assert (await c.get(f"/v1/jobs/{done}", headers=h)).json()["artifact_bytes"] == ARTIFACT_CAP
    r = await c.post("/v1/jobs", json=WRAP, headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "artifact_storage_exceeded", r.text
    message = r.json()["error"]["message"]
    assert f"keep {ARTIFACT_CAP} bytes of artifacts and it may keep {ARTIFACT_CAP}" in message, message
    assert "delete jobs' artifacts" in message and "DELETE /v1/jobs/" in message
    assert str(capped.settings.data_dir) not in message
    assert [j["id"] for j in (await c.get("/v1/jobs", headers=h)).json()["jobs"]] == [done]  # nothing queued
    assert (await c.post("/v1/jobs", json=WRAP, headers=other)).status_code == 202  # another key has its own cap
    admin = capped.admin  # no storage caps for an admin key
    assert (await c.post("/v1/jobs", json=WRAP, headers=admin)).status_code == 202

    # Deleting the finished job frees its artifacts, on disk and against the cap.
    assert (await c.delete(f"/v1/jobs/{done}", headers=h)).status_code == 200
    assert not (capped.settings.jobs_dir / done).exists()
    assert (await c.get(f"/v1/jobs/{done}/artifacts", headers=h)).status_code == 404
    assert (await c.post("/v1/jobs", json=WRAP, headers=h)).status_code == 202


def test_a_wait_under_a_second_is_said_in_milliseconds():
    """At 200 requests/s the wait is a few ms: Retry-After's whole seconds say 1 (a client that honours it stalled
    200 times too long, and the message said "retry in 0.0 s"); Retry-After-Ms and the message say it exactly."""
    from service.ratelimit import RateLimiter

    e = RateLimiter(200.0, 400).refusal(0.0042, "this key")
    assert e.message == "this key is over 200 requests/s; retry in 5 ms"
    assert e.headers == {"Retry-After": "1", "Retry-After-Ms": "5"}
    assert RateLimiter(0.2, 3).refusal(4.2, "this key").headers == {"Retry-After": "5", "Retry-After-Ms": "4200"}


async def test_the_versions_a_key_deploys_count_with_its_files(tmp_path, bundles):
    """Every deploy is a copy in the data dir: a deploy key under a file cap of 4 KB filled the disk with versions
    (20 of them, and upload → deploy → delete the upload, with no end). They count with its files now."""
    from tests.service.conftest import sdb_bytes

    body = sdb_bytes(bundles.a)
    async for svc in _service(tmp_path, bundles, max_file_storage_per_key=len(body) + len(png(0)) + 100):
        c, h = svc.client, svc.auth(svc.key(("deploy", "jobs")))

        def deploy(name: str, headers: dict, c=c):
            return c.post("/v1/models", headers=headers, files={"file": ("b.sdb", body)}, data={"name": name})

        assert (await deploy("mine-1", h)).status_code == 201
        r = await deploy("mine-2", h)
        assert r.status_code == 413 and r.json()["error"]["code"] == "storage_exceeded", r.text
        assert "deployed models" in r.json()["error"]["message"]
        assert (await c.get("/v1/models/mine-2", headers=h)).status_code == 404  # nothing served, nothing kept
        assert not (tmp_path / "data" / "bundles" / "mine-2").exists()
        assert (await upload_image(c, h, 1)).status_code == 201  # the files' share still fits beside the version
        assert (await upload_image(c, h, 2)).status_code == 413
        assert (await c.delete("/v1/models/mine-1", headers=h)).status_code == 200  # removing it frees its bytes
        assert (await deploy("mine-2", h)).status_code == 201
        # an admin key has no cap, as for files
        admin = svc.auth(svc.key(("admin",)))
        assert [(await deploy(f"admins-{i}", admin)).status_code for i in range(3)] == [201] * 3


def test_jobs_submitted_together_pass_the_cap_of_active_jobs_in_no_process(db_url):
    """The cap was read, then the job added in another transaction: 40 submissions at once queued 20 against a cap of
    16 (more over two API processes). The count and the insert are one transaction under the key's lock now, on
    SQLite and PostgreSQL, and in any process (each thread here has its own connection)."""
    import threading

    from service.auth import create_key
    from service.jobs.queue import JobQueue, TooManyJobs
    from service.store import Store

    store = Store(db_url)
    try:
        owner = create_key(store, b"p" * 32, scopes=["jobs"])[1].id
        queue, outcomes = JobQueue(store), []

        def submit(i: int) -> None:
            try:
                outcomes.append(queue.submit("wrap", {"i": i}, owner, max_active=3)[1])
            except TooManyJobs as e:
                outcomes.append(e.active)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes, key=str) == [3] * 9 + [True] * 3, outcomes
        assert len(queue.list(owner=owner, status="queued")) == 3
    finally:
        store.close()
