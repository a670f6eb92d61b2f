"""Run one claimed job to its end, the same way on every backend (an embedded worker process
or a Ray task): heartbeat and progress to the store, log and artifacts under
``<data_dir>/jobs/<id>/``, ``report.json`` and the training curves, then the final status. A failure
is recorded in words (:func:`service.disclosure.failure_reason`); its traceback stays server-side.

A job runs on its key's authority: the key is read again when the job is claimed and on every
heartbeat, and a job whose key was revoked, expired or lost what the job reads (a scope, a model
on its allowlist) is cancelled, saying why.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import traceback

from sdb_core.progress import Cancelled

from ..disclosure import failure_reason, hide_paths_in
from ..settings import Settings
from ..store import JobRow
from .context import JobContext
from .kinds import get_kind
from .plots import plot_curves
from .queue import JobQueue

log = logging.getLogger("sdb.jobs")


class Heartbeat(threading.Thread):
    """Writes the job's progress every ``interval`` seconds; sets ``ctx.cancel`` when asked to stop."""

    def __init__(self, ctx: JobContext, interval: float):
        super().__init__(name=f"heartbeat-{ctx.job.id[:8]}", daemon=True)
        self.ctx, self.interval = ctx, interval
        self.done = threading.Event()
        self.lost = False

    def beat(self) -> None:
        s = self.ctx.snapshot()
        b = self.ctx.queue.heartbeat(self.ctx.job.id, self.ctx.worker, progress=s["progress"], step=s["step"],
                                     metrics=s["metrics"], training=s["training"])
        if not b.owned:
            self.lost = True
        if b.cancel or not b.owned:
            self.ctx.cancel.set()
        self.ctx.check_key()  # a key revoked meanwhile stops the job at its next step

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.beat()
            except Exception:  # the store briefly unreachable must not kill the job
                log.warning("job %s: heartbeat failed", self.ctx.job.id, exc_info=True)
                self.ctx.log("heartbeat failed: the store did not answer; trying again")


def job_dir(settings: Settings, job_id: str):
    return settings.jobs_dir / job_id


def execute(settings: Settings, queue: JobQueue, job: JobRow, worker: str,
            stop: threading.Event | None = None) -> str:
    """Run a job this worker has claimed; returns the status it ended in (or ``queued`` if released)."""
    workdir = job_dir(settings, job.id)
    if (workdir / "artifacts").exists():  # a requeued job starts clean
        shutil.rmtree(workdir / "artifacts")
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(settings, queue, job, worker, workdir, stop)
    ctx.log(f"job {job.id} ({job.kind}) attempt {job.attempts} on worker {worker}")
    hb = Heartbeat(ctx, settings.job_heartbeat_s)
    hb.start()
    t0 = time.time()
    try:
        kind = get_kind(job.kind)
        params = kind.params.model_validate_json(job.params)
        ctx.reads = params.reads()
        if ctx.check_key() is not None:  # claimed for a key that no longer allows it: nothing runs
            raise Cancelled(ctx.key_stop)
        report = kind.run(ctx, params)
        if ctx.key_stop is not None:  # stopped in a stretch that does not look at cancel: still not done
            raise Cancelled(ctx.key_stop)
        ctx.step("writing report", None)
        plot_curves(ctx.curves, ctx.artifacts / "curves.png", title=f"{job.kind} {job.id[:8]}")
        full = {"job": {"id": job.id, "kind": job.kind, "params": json.loads(job.params),
                        "attempt": job.attempts, "worker": worker, "seconds": time.time() - t0},
                **report, "curves": ctx.curves}
        full = hide_paths_in(json.loads(json.dumps(full, default=str)), settings.data_dir)  # the owner downloads it
        (ctx.artifacts / "report.json").write_text(json.dumps(full, indent=2))
        ok = queue.finish(job.id, worker, "succeeded", message=report.get("summary", "done"),
                          result=report.get("result", {}), metrics=report.get("metrics", {}))
        ctx.log("succeeded" if ok else "finished, but the job was no longer ours (reaped?)")
        return "succeeded"
    except Cancelled as e:
        if hb.lost:
            ctx.log(f"stopped: the job was taken from this worker ({e})")
            return "lost"
        if ctx.key_stop is not None:
            queue.finish(job.id, worker, "cancelled", message=f"cancelled: {ctx.key_stop}")
            ctx.log(f"cancelled: {ctx.key_stop}")
            return "cancelled"
        if ctx.stop.is_set() and not ctx.cancel.is_set():
            queue.release(job.id, worker, f"requeued: worker {worker} shut down")
            ctx.log("released: the worker is shutting down; the job goes back to the queue")
            return "queued"
        queue.finish(job.id, worker, "cancelled", message=str(e))
        ctx.log(f"cancelled: {e}")
        return "cancelled"
    except Exception as e:  # any error of a recipe fails the job
        # The owner reads the cause in words (error, log.txt); the traceback, which quotes paths
        # and file contents, goes to the worker's log and traceback.txt beside log.txt, never served.
        reason = failure_reason(e, ctx.snapshot()["step"], settings.data_dir)
        (workdir / "traceback.txt").write_text(traceback.format_exc())
        log.exception("job %s (%s) failed", job.id, job.kind)
        ctx.log(f"failed: {reason}")
        queue.finish(job.id, worker, "failed", error=reason, message="failed")
        return "failed"
    finally:
        hb.done.set()
        hb.join(timeout=5)
        ctx.close()
