"""A worker that hangs (no heartbeat: stopped, swapped out, cut off from the store) while the reaper
requeues or fails its job, and then comes back: whatever it does late changes nothing. In process, with
the real runner, the real deploy (the job kinds' ``deploy`` helper, as ``wrap`` and ``style`` call it),
the real queue and store, and a stand-in kind that deploys a real bundle; the hang is an Event and the
reaper is called directly, so nothing here depends on timing.

Exactly one version is served per job, whatever the attempts; a job the reaper failed serves none; and
the job's record and report.json say what happened (the attempt that succeeded)."""
from __future__ import annotations

import json
import threading

import pytest

from sdb_core.progress import Cancelled
from service.auth import create_key
from service.jobs.kinds import KINDS, JobParams, Kind
from service.jobs.queue import JobQueue
from service.jobs.runner import execute, job_dir
from service.settings import Settings
from service.store import Store

from .conftest import sdb_bytes

pytestmark = pytest.mark.usefixtures("db_url")  # on SQLite and on PostgreSQL


@pytest.fixture
def rig(tmp_path, bundles, monkeypatch):
    """Settings whose heartbeat never beats during a test (the hang is the test's), a key, and a kind that
    deploys digits-a under the name ``stale`` once its worker is let go (``w1`` waits for ``resume``)."""
    settings = Settings(data_dir=tmp_path / "data", master_key_file=bundles.master_key_file, job_heartbeat_s=300,
                        job_stale_s=600)
    settings.data_dir.mkdir()
    store = Store(settings.db_url)
    _, api_key = create_key(store, settings.pepper, scopes=["jobs", "deploy"])
    hung, resume = threading.Event(), threading.Event()
    training = {"on": False, "hang_after_deploy": False, "deploy": True}
    outcomes: dict[str, object] = {}

    def deployer(ctx, params) -> dict:
        from service.jobs.kinds.wrap import deploy

        bundle = tmp_path / f"{ctx.worker}.sdb"  # outside artifacts/: each attempt's own bundle
        bundle.write_bytes(sdb_bytes(bundles.a))
        if ctx.worker == "w1" and training["hang_after_deploy"]:  # deployed, then silent before it finished
            result = deploy(ctx, bundle, "stale")
            hung.set()
            resume.wait(120)
            return {"summary": "deployed by w1", "result": result}
        if ctx.worker == "w1":
            if training["on"]:  # what its heartbeat wrote before it hung: training had started
                ctx.queue.heartbeat(ctx.job.id, ctx.worker, training=True)
            hung.set()
            resume.wait(120)
        (ctx.artifacts / "made-by.txt").write_text(ctx.worker)
        if not training["deploy"]:
            (ctx.artifacts / f"{ctx.worker}.bin").write_bytes(b"x" * 1000)
            return {"summary": f"made by {ctx.worker}", "result": {"by": ctx.worker}}
        return {"summary": f"deployed by {ctx.worker}", "result": deploy(ctx, bundle, "stale")}

    monkeypatch.setitem(KINDS._items, "deployer", Kind("deployer", JobParams, deployer))
    queue = JobQueue(store)

    class Rig:
        pass

    r = Rig()
    r.settings, r.store, r.queue, r.key, r.hung, r.resume, r.training, r.outcomes = (
        settings, store, queue, api_key, hung, resume, training, outcomes)

    def first_attempt(job_id: str) -> threading.Thread:
        job = queue.claim("w1", job_id=job_id)
        t = threading.Thread(target=lambda: outcomes.__setitem__("w1", execute(settings, queue, job, "w1")))
        t.start()
        assert hung.wait(60)
        return t

    r.first_attempt = first_attempt
    try:
        yield r
    finally:
        resume.set()
        store.close()


def versions(store: Store, name: str) -> list[str]:
    return sorted(m.version for m in store.list_models() if m.name == name)


def test_a_hung_worker_back_after_its_job_was_requeued_and_done_deploys_nothing(rig):
    job_id = rig.queue.submit("deployer", {}, rig.key.id)[0].id
    t = rig.first_attempt(job_id)
    assert rig.queue.reap(0.0) == [(job_id, "queued")]  # w1 is silent before training: requeued
    second = rig.queue.claim("w2")
    assert second is not None and second.id == job_id
    assert execute(rig.settings, rig.queue, second, "w2") == "succeeded"
    assert versions(rig.store, "stale") == ["1"]

    rig.resume.set()  # w1 comes back, not knowing, and goes on to deploy
    t.join(120)
    assert not t.is_alive()

    assert versions(rig.store, "stale") == ["1"], "the job was deployed twice"
    row = rig.queue.get(job_id)
    assert row.status == "succeeded" and row.worker == "w2" and json.loads(row.result)["version"] == "1"
    report = json.loads((job_dir(rig.settings, job_id) / "artifacts" / "report.json").read_text())
    assert report["job"]["worker"] == "w2" and report["result"]["version"] == "1"
    assert (job_dir(rig.settings, job_id) / "artifacts" / "made-by.txt").read_text() == "w2"
    assert rig.outcomes["w1"] in ("lost", "cancelled")
    log = (job_dir(rig.settings, job_id) / "log.txt").read_text()
    assert "deployed stale version 2" not in log


def test_a_hung_worker_back_after_its_job_was_failed_deploys_nothing(rig):
    rig.training["on"] = True
    job_id = rig.queue.submit("deployer", {}, rig.key.id)[0].id
    t = rig.first_attempt(job_id)
    assert rig.queue.reap(0.0) == [(job_id, "failed")]  # silent during training: the job failed
    rig.resume.set()
    t.join(120)
    assert not t.is_alive()

    assert versions(rig.store, "stale") == [], "a failed job served a model version"
    row = rig.queue.get(job_id)
    assert row.status == "failed" and "worker lost" in row.error
    assert not rig.store.has_audit("model.add")


def test_a_job_that_deployed_and_then_went_silent_is_not_run_again(rig):
    """A kind that reports no training progress deploys and then its worker hangs: the job is not requeued (a
    second attempt would serve a second version); it fails, and its record says what it served."""
    rig.training["hang_after_deploy"] = True
    job_id = rig.queue.submit("deployer", {}, rig.key.id)[0].id
    t = rig.first_attempt(job_id)
    assert versions(rig.store, "stale") == ["1"]
    assert rig.queue.reap(0.0) == [(job_id, "failed")]
    assert rig.queue.claim("w2") is None
    rig.resume.set()
    t.join(120)
    assert not t.is_alive()
    assert versions(rig.store, "stale") == ["1"]
    row = rig.queue.get(job_id)
    assert row.status == "failed" and "worker lost" in row.error
    assert json.loads(row.result) == {"model": "stale", "version": "1", "deployed": True}
    assert rig.outcomes["w1"] == "lost"


def test_a_hung_worker_back_late_leaves_the_artifacts_of_the_attempt_that_took_over(rig):
    """No deploy: w1 comes back after w2 ran the requeued job to its end and writes its files. What the job
    serves (artifacts/, report.json) and counts (artifact_bytes) stays w2's."""
    rig.training["deploy"] = False
    job_id = rig.queue.submit("deployer", {}, rig.key.id)[0].id
    t = rig.first_attempt(job_id)
    assert rig.queue.reap(0.0) == [(job_id, "queued")]
    second = rig.queue.claim("w2")
    assert execute(rig.settings, rig.queue, second, "w2") == "succeeded"
    rig.resume.set()
    t.join(120)
    assert not t.is_alive()

    served = job_dir(rig.settings, job_id) / "artifacts"
    assert sorted(p.name for p in served.iterdir()) == ["made-by.txt", "report.json", "w2.bin"]
    assert (served / "made-by.txt").read_text() == "w2"
    assert json.loads((served / "report.json").read_text())["job"]["worker"] == "w2"
    row = rig.queue.get(job_id)
    assert row.status == "succeeded" and json.loads(row.result) == {"by": "w2"}
    assert row.artifact_bytes == sum(p.stat().st_size for p in served.iterdir())
    assert rig.outcomes["w1"] in ("lost", "cancelled")


def test_keyed_samples_charged_then_silent_are_charged_once(tmp_path, monkeypatch):
    """A job charges its key for the keyed samples it will draw (all at once, before training), then its
    worker goes silent: the job is not run again (a second attempt would charge the key a second time for
    one job's samples); it fails, and the key was charged once."""
    settings = Settings(data_dir=tmp_path / "data", job_heartbeat_s=300, job_stale_s=600)
    settings.data_dir.mkdir()
    store = Store(settings.db_url)
    try:
        _, api_key = create_key(store, settings.pepper, scopes=["jobs", "distill"], quota=1000)
        hung, resume = threading.Event(), threading.Event()

        def drawer(ctx, params) -> dict:
            ctx.charge("digits-a", 300)
            if ctx.worker == "w1":
                hung.set()
                resume.wait(120)
            return {"summary": "drew"}

        monkeypatch.setitem(KINDS._items, "drawer", Kind("drawer", JobParams, drawer))
        queue = JobQueue(store)
        job_id = queue.submit("drawer", {}, api_key.id)[0].id
        job = queue.claim("w1", job_id=job_id)
        t = threading.Thread(target=execute, args=(settings, queue, job, "w1"))
        t.start()
        try:
            assert hung.wait(60)
            assert queue.reap(0.0) == [(job_id, "failed")]
            again = queue.claim("w2")
            if again is not None:  # what the old code did: a second attempt, charged again
                execute(settings, queue, again, "w2")
        finally:
            resume.set()
            t.join(120)
        assert store.get_key(api_key.id).used == 300
        assert queue.get(job_id).status == "failed"
    finally:
        store.close()


def test_a_job_released_by_a_shutdown_after_it_charged_is_not_charged_again(tmp_path, monkeypatch):
    """A rolling restart: the worker shuts down (its job goes back to the queue) after the job charged its keyed
    samples; the next attempt, on another worker, draws them without charging the key a second time."""
    settings = Settings(data_dir=tmp_path / "data", job_heartbeat_s=300, job_stale_s=600)
    settings.data_dir.mkdir()
    store = Store(settings.db_url)
    try:
        _, api_key = create_key(store, settings.pepper, scopes=["jobs", "distill"], quota=1000)
        stop = threading.Event()

        def drawer(ctx, params) -> dict:
            ctx.charge("digits-a", 300)
            if ctx.worker == "w1":
                stop.set()  # SIGTERM while it trains
                raise Cancelled("the worker is shutting down")
            return {"summary": "drew"}

        monkeypatch.setitem(KINDS._items, "drawer", Kind("drawer", JobParams, drawer))
        queue = JobQueue(store)
        job_id = queue.submit("drawer", {}, api_key.id)[0].id
        assert execute(settings, queue, queue.claim("w1", job_id=job_id), "w1", stop) == "queued"
        assert store.get_key(api_key.id).used == 300
        assert execute(settings, queue, queue.claim("w2", job_id=job_id), "w2") == "succeeded"
        assert store.get_key(api_key.id).used == 300, "the second attempt charged the key again"
        log = (job_dir(settings, job_id) / "log.txt").read_text()
        assert "were charged by an earlier attempt of this job" in log
    finally:
        store.close()


def test_a_worker_that_lost_its_job_charges_nothing(tmp_path, monkeypatch):
    """The charge and the job's row are one transaction: a worker whose job was reaped meanwhile draws nothing
    and charges nothing."""
    settings = Settings(data_dir=tmp_path / "data", job_heartbeat_s=300, job_stale_s=600)
    settings.data_dir.mkdir()
    store = Store(settings.db_url)
    try:
        _, api_key = create_key(store, settings.pepper, scopes=["jobs", "distill"], quota=1000)
        queue = JobQueue(store)

        def drawer(ctx, params) -> dict:
            assert queue.reap(0.0) == [(ctx.job.id, "queued")]  # silent before training: requeued
            ctx.charge("digits-a", 300)
            return {"summary": "drew"}

        monkeypatch.setitem(KINDS._items, "drawer", Kind("drawer", JobParams, drawer))
        job_id = queue.submit("drawer", {}, api_key.id)[0].id
        assert execute(settings, queue, queue.claim("w1", job_id=job_id), "w1") == "lost"
        assert store.get_key(api_key.id).used == 0
        assert queue.get(job_id).status == "queued"
    finally:
        store.close()
