"""The Ray dispatcher against a stand-in for Ray (what it sends, cancels and sends again), on a real store:
no secret in a task's arguments, a job requeued after its task claimed it is sent again (the task that lost it
is ended), and a task that outlives its job's end is ended."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from service.jobs import ray_backend, worker
from service.jobs.queue import JobQueue
from service.jobs.ray_backend import RayDispatcher, node_settings, task_settings
from service.settings import Settings
from service.store import Store

from .jobs_helpers import QUICK, wait_for

PASSWORD = "pw-Zq81-never-in-args"


class FakeRef:
    def __init__(self, n: int):
        self.n = n

    def __repr__(self) -> str:
        return f"FakeRef({self.n})"


class FakeRay:
    """The few calls the dispatcher makes: tasks are sent and never end unless told (``ready``)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent: list[tuple[FakeRef, tuple, dict]] = []  # (ref, args, options)
        self.cancelled: list[tuple[FakeRef, bool]] = []
        self.ready: set = set()

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **kw):
                fake._options = kw
                return self

            def remote(self, *args):
                with fake.lock:
                    ref = FakeRef(len(fake.sent))
                    fake.sent.append((ref, args, fake._options))
                return ref

        return Task()

    def wait(self, refs, num_returns=1, timeout=None):
        with self.lock:
            return [r for r in refs if r in self.ready], [r for r in refs if r not in self.ready]

    def get(self, ref):
        return "done"

    def cancel(self, ref, force=False):
        with self.lock:
            self.cancelled.append((ref, force))

    def is_initialized(self):
        return False

    def sent_for(self, job_id: str) -> list[FakeRef]:
        with self.lock:
            return [ref for ref, args, _ in self.sent if args[1] == job_id]


@pytest.fixture
def fake_ray(monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    return fake


def _setup(tmp_path, bundles, **over):
    settings = Settings(data_dir=tmp_path / "data", master_key_file=bundles.master_key_file, job_poll_s=0.05,
                        job_heartbeat_s=0.1, job_stale_s=0.5, **over)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    return settings, store, JobQueue(store)


def _dispatcher(settings, queue):
    d = RayDispatcher(settings, queue)
    d.start()
    return d


def test_no_secret_is_in_a_ray_tasks_arguments(tmp_path, bundles, fake_ray):
    pw = tmp_path / "db_password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    settings, store, queue = _setup(tmp_path, bundles, database_url="postgresql+psycopg://sdb@db.invalid:5432/sdb",
                                    database_password_file=pw)
    assert PASSWORD in settings.db_url  # what the server itself connects with
    job, _ = queue.submit("distill", QUICK, "k1", backend="ray")
    d = _dispatcher(settings, queue)
    try:
        wait_for(lambda: fake_ray.sent_for(job.id), 10, "the job sent to Ray")
    finally:
        d.stop()
        store.close()
    (_, args, _), = fake_ray.sent
    shown = repr(args)
    secrets = [PASSWORD, settings.master_key.hex(), settings.pepper.hex()]
    assert not [s for s in secrets if s in shown], "a secret in the task's arguments (Ray's state API shows them)"
    # the task still reaches the store: it reads the password on its node, from the file the settings name
    assert PASSWORD in node_settings(args[0]).db_url


def test_a_url_with_its_password_inline_sends_it_not_and_the_node_supplies_it(tmp_path, bundles, monkeypatch):
    url = f"postgresql+psycopg://sdb:{PASSWORD}@db.invalid:5432/sdb"
    settings = Settings(data_dir=tmp_path, master_key_file=bundles.master_key_file, database_url=url)
    sent = task_settings(settings)
    assert PASSWORD not in repr(sent)
    monkeypatch.setenv("SDB_DATABASE_URL", url)  # the node's own settings (compose gives every node the same)
    assert node_settings(sent).db_url == url
    monkeypatch.setenv("SDB_DATABASE_URL", "postgresql+psycopg://sdb:other@elsewhere.invalid/sdb")
    assert PASSWORD not in node_settings(sent).db_url and "other" not in node_settings(sent).db_url


def test_a_job_requeued_after_its_task_claimed_it_is_sent_again(tmp_path, bundles, fake_ray):
    # The task claimed the job and hung (SIGSTOP, a stuck filesystem); the reaper requeued it. The job must be
    # sent again, and the hung task ended (it holds the cluster's CPUs and GPUs), not left queued behind it.
    settings, store, queue = _setup(tmp_path, bundles)
    job, _ = queue.submit("distill", QUICK, "k1", backend="ray")
    d = _dispatcher(settings, queue)
    try:
        first, = wait_for(lambda: fake_ray.sent_for(job.id), 10, "the job sent to Ray")
        assert queue.claim("ray:host:1", job_id=job.id) is not None  # the task claimed it ...
        time.sleep(0.6)  # ... and sent no heartbeat since
        assert queue.reap(settings.job_stale_s) == [(job.id, "queued")]
        second = wait_for(lambda: fake_ray.sent_for(job.id)[1:], 10, "the requeued job sent to Ray again")[0]
        assert (first, True) in fake_ray.cancelled  # the task that lost it is ended
        assert all(ref is not second for ref, _ in fake_ray.cancelled)
        time.sleep(0.3)
        assert len(fake_ray.sent_for(job.id)) == 2  # sent once per time it was queued
    finally:
        d.stop()
        store.close()


def test_a_ray_job_behind_a_thousand_jobs_of_another_backend_is_sent(tmp_path, bundles, fake_ray):
    # The dispatcher read the oldest 1,000 queued jobs and kept Ray's: 1,000 embedded jobs queued first (left from
    # before the server was switched to Ray) hid every Ray job behind them.
    settings, store, queue = _setup(tmp_path, bundles)
    for _ in range(1000):
        queue.submit("distill", QUICK, "k1", backend="embedded")
    job, _ = queue.submit("distill", QUICK, "k1", backend="ray")
    d = _dispatcher(settings, queue)
    try:
        wait_for(lambda: fake_ray.sent_for(job.id), 10, "the Ray job sent")
        assert len(fake_ray.sent) == 1  # and nothing of the other backend
    finally:
        d.stop()
        store.close()


def test_a_task_that_outlives_its_jobs_end_is_ended(tmp_path, bundles, fake_ray):
    # A task still waiting for resources (or hung) for a job that was cancelled or reaped: ended after a grace.
    settings, store, queue = _setup(tmp_path, bundles)
    waiting, _ = queue.submit("distill", {**QUICK, "gpus": 1}, "k1", backend="ray")
    hung, _ = queue.submit("distill", QUICK, "k1", backend="ray")
    d = _dispatcher(settings, queue)
    try:
        (w,), (h,) = (wait_for(lambda i=i: fake_ray.sent_for(i), 10, "sent") for i in (waiting.id, hung.id))
        queue.cancel(waiting.id)  # cancelled while its task waits for a GPU
        assert queue.claim("ray:host:1", job_id=hung.id) is not None
        queue.heartbeat(hung.id, "ray:host:1", training=True)
        time.sleep(0.6)
        assert queue.reap(settings.job_stale_s) == [(hung.id, "failed")]
        wait_for(lambda: {(w, True), (h, True)} <= set(fake_ray.cancelled), 10, "both tasks ended")
        assert len(fake_ray.sent) == 2  # ended jobs are not sent again
    finally:
        d.stop()
        store.close()


def test_a_running_task_is_left_alone(tmp_path, bundles, fake_ray):
    settings, store, queue = _setup(tmp_path, bundles)
    job, _ = queue.submit("distill", QUICK, "k1", backend="ray")
    d = _dispatcher(settings, queue)
    try:
        ref, = wait_for(lambda: fake_ray.sent_for(job.id), 10, "sent")
        assert queue.claim("ray:host:1", job_id=job.id) is not None
        for _ in range(10):
            queue.heartbeat(job.id, "ray:host:1")
            time.sleep(0.1)
        assert fake_ray.cancelled == [] and len(fake_ray.sent) == 1
        queue.finish(job.id, "ray:host:1", "succeeded")
        with fake_ray.lock:
            fake_ray.ready.add(ref)  # it returns at once
        wait_for(lambda: job.id not in d.inflight, 10, "the task collected")
        assert fake_ray.cancelled == []
    finally:
        d.stop()
        store.close()


def test_a_task_on_a_node_without_the_shared_data_dir_fails_its_job_and_writes_nothing(tmp_path, bundles, fake_ray,
                                                                                      monkeypatch):
    # A Ray node where the data dir is not mounted (an empty folder at that path, say) would run the job and keep
    # its artifacts, or a deployed bundle, where the server never sees them: the job fails there, saying why.
    settings = Settings(data_dir=tmp_path / "data", master_key_file=bundles.master_key_file, job_poll_s=0.05)
    settings.data_dir.mkdir()
    store = Store(settings.db_url)
    queue = JobQueue(store)
    job, _ = queue.submit("distill", QUICK, "k1", backend="ray")
    d = _dispatcher(settings, queue)
    try:
        (_, args, _), = wait_for(lambda: fake_ray.sent, 10, "sent")
    finally:
        d.stop()
    mark = settings.data_dir_mark()
    assert args[2] == mark and len(mark) == 32
    # the same task on a node whose folder at that path is another one; run here, in the tests' process, which
    # must not become the first the kernel kills (servers started after it would inherit that, and the tests
    # that check a server is not the first would fail)
    monkeypatch.setattr(worker, "first_to_go", lambda: None)
    assert ray_backend.run_task(args[0], job.id, "f" * 32) == "failed"
    row = queue.get(job.id)
    assert row.status == "failed" and "does not share the server's data dir" in row.error
    assert str(settings.data_dir) not in row.error  # the owner reads it: no server path
    assert not (settings.data_dir / "jobs" / job.id).exists()
    store.close()
