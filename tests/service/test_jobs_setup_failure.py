"""A job whose folder cannot be made (a full disk, inodes included; a jobs folder the worker may not write) fails
at once, saying why, after one attempt; the worker goes on with the next job. Before, the claimed job stayed
``running`` with no heartbeat (the folder, its artifacts and its log were made before the runner's error handling),
was requeued by the reaper and then ended "worker lost ... (killed or out of memory?)", and so did every job queued
meanwhile, while the worker was alive and had logged the real error. In process: the real worker loop, queue and
store, a stand-in kind, and the OS error raised where the job's folder is made."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from service.auth import create_key
from service.jobs.kinds import KINDS, JobParams, Kind
from service.jobs.queue import JobQueue
from service.jobs.worker import run_worker
from service.settings import Settings
from service.store import Store

pytestmark = pytest.mark.usefixtures("db_url")  # on SQLite and on PostgreSQL


@pytest.fixture
def rig(tmp_path, monkeypatch):
    """Settings, a queue, a key that may run jobs, and a kind ``noop`` that writes one artifact."""
    settings = Settings(data_dir=tmp_path / "data", job_heartbeat_s=300, job_stale_s=600)
    settings.data_dir.mkdir()
    store = Store(settings.db_url)
    _, api_key = create_key(store, settings.pepper, scopes=["jobs"])

    def noop(ctx, params) -> dict:
        (ctx.artifacts / "done.txt").write_text("done")
        return {"summary": "done"}

    monkeypatch.setitem(KINDS._items, "noop", Kind("noop", JobParams, noop))
    try:
        yield settings, JobQueue(store), api_key.id
    finally:
        store.close()


def refuse_folder_of(monkeypatch, folder: Path, code: int) -> None:
    """``mkdir`` of ``folder`` (or anything under it) fails with ``code``, as the OS answers it."""
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == folder or folder in self.parents:
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize(("code", "says"), [
    (errno.ENOSPC, "the server's disk is full (at step 'starting'): nothing of the job is lost but its run"),
    (errno.EACCES, "the server could not create the job's folder (permission denied): nothing of the job ran"),
], ids=["disk-full", "not-writable"])
def test_a_job_whose_folder_cannot_be_made_fails_saying_why_and_the_worker_goes_on(rig, monkeypatch, code, says):
    settings, queue, owner = rig
    blocked = queue.submit("noop", {}, owner)[0]
    after = queue.submit("noop", {}, owner)[0]
    refuse_folder_of(monkeypatch, settings.jobs_dir / blocked.id, code)

    assert run_worker(settings, once=True) == 0  # both jobs taken in turn; the queue is empty

    job = queue.get(blocked.id)
    assert (job.status, job.attempts, job.message) == ("failed", 1, "failed"), job.error
    assert job.error.startswith(says), job.error
    assert "worker lost" not in job.error and str(settings.data_dir) not in job.error
    nxt = queue.get(after.id)
    assert nxt.status == "succeeded", nxt.error
    assert (settings.jobs_dir / after.id / "artifacts" / "done.txt").read_text() == "done"


def test_every_job_fails_at_once_while_the_jobs_folder_cannot_hold_folders(rig):
    """A real filesystem's refusal: ``jobs`` is a file (a mount gone wrong), so no job's folder can be made."""
    settings, queue, owner = rig
    settings.jobs_dir.write_text("not a folder")
    ids = [queue.submit("noop", {}, owner)[0].id for _ in range(3)]

    assert run_worker(settings, once=True) == 0

    for job in map(queue.get, ids):
        assert (job.status, job.attempts) == ("failed", 1), job.error
        assert job.error.startswith("the job failed at step 'starting' with an unexpected error"), job.error


def test_a_quota_or_file_size_limit_reads_as_a_full_disk_and_a_gpu_that_fails_to_answer_is_said_in_the_log(
        monkeypatch):
    import errno

    import torch

    from service.disclosure import failure_reason
    from service.jobs.runner import device_words

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # what the API answers 507 for, a job says in words
        assert failure_reason(OSError(code, os.strerror(code)), "starting").startswith("the server's disk is full")

    def busy() -> int:
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", busy)  # its first line went up through the worker, ending it
    assert device_words() == "its GPU did not answer (CUDA error: all CUDA-capable devices are busy or unavailable)"
