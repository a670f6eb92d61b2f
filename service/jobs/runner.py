"""Run one claimed job to its end, the same way on every backend (an embedded worker process
or a Ray task): heartbeat and progress to the store, log and artifacts under
``<data_dir>/jobs/<id>/``, ``report.json`` and the training curves, then the final status. A failure
is recorded in words (:func:`service.disclosure.failure_reason`); its traceback stays server-side.

A job runs on its key's authority: the key is read again when the job is claimed and on every
heartbeat, and a job whose key was revoked, expired or lost what the job reads (a scope, a model
on its allowlist) is cancelled, saying why.

A job runs under two caps, checked on every heartbeat: its run time (``max_job_seconds``: past it the
job ends ``failed``, its partial artifacts kept as a cancel keeps them) and its key's artifact storage
(``max_artifact_storage_per_key``: the job ends ``failed`` and keeps no artifact). A job asked to stop for
a cap that is still running ``job_stale_s`` later is failed by the heartbeat, which then ends the job's
process (``hard_stop``: the embedded pool and Ray start another one).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from sdb_core.progress import Cancelled
from sdb_core.reports import finite_json, report_json

from ..disclosure import failure_reason, hide_paths_in, one_line
from ..settings import Settings
from ..store import JobRow
from .context import JobContext
from .kinds import stored_params
from .plots import plot_curves
from .queue import JobQueue

log = logging.getLogger("sdb.jobs")


class Heartbeat(threading.Thread):
    """Writes the job's progress every ``interval`` seconds; sets ``ctx.cancel`` when asked to stop."""

    def __init__(self, ctx: JobContext, interval: float, hard_stop: Callable[[], None] | None = None):
        super().__init__(name=f"heartbeat-{ctx.job.id[:8]}", daemon=True)
        self.ctx, self.interval, self.hard_stop = ctx, interval, hard_stop
        limit = ctx.settings.max_job_seconds
        self.deadline = time.monotonic() + limit if limit > 0 else None
        self.done = threading.Event()
        self.lost = False

    def beat(self) -> None:
        s = self.ctx.snapshot()
        used = self.ctx.artifact_bytes()
        b = self.ctx.queue.heartbeat(self.ctx.job.id, self.ctx.worker, progress=s["progress"], step=s["step"],
                                     metrics=s["metrics"], training=s["training"], artifact_bytes=used)
        if not b.owned:
            self.lost = True
        if b.cancel or not b.owned:
            self.ctx.cancel.set()
        self.ctx.check_key()  # a key revoked meanwhile stops the job at its next step
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.ctx.halt(overtime(self.ctx.settings))
        over = artifacts_over_cap(self.ctx, used)
        if over is not None:
            self.ctx.halt(over, drop_artifacts=True)

    def run(self) -> None:
        failures = 0  # in a row: the first is logged with its traceback, the rest in a line each (an outage of
        # minutes logged a traceback every beat, and a job's end now waits for the store with its heartbeat going)
        while not self.done.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # the store briefly unreachable must not kill the job
                failures += 1
                if failures == 1:
                    log.warning("job %s: heartbeat failed", self.ctx.job.id, exc_info=True)
                    self.ctx.log("heartbeat failed: the store did not answer; trying again")
                else:
                    log.warning("job %s: heartbeat failed again (%d in a row): %s", self.ctx.job.id, failures,
                                one_line(e))
            else:
                if failures:
                    log.info("job %s: the heartbeat answered again after %d failure(s)", self.ctx.job.id, failures)
                    failures = 0
            if self.hard_stop is not None and self.ctx.stuck(self.ctx.settings.job_stale_s) and not self.done.is_set():
                grace = self.ctx.settings.job_stale_s
                log.error("job %s did not stop within %.0f s of being asked (%s); ending its process",
                          self.ctx.job.id, grace, self.ctx.failure)
                self.ctx.log(f"the job did not stop within {grace:.0f} s of being asked: its process is ended")
                end_halted(self.ctx)
                self.hard_stop()
                return


def overtime(settings: Settings) -> str:
    return f"ran past the {settings.max_job_seconds} s limit on job run time"


def artifacts_over_cap(ctx: JobContext, used: int) -> str | None:
    """Why the job's ``used`` bytes of artifacts take its key past its artifact storage cap, or None (admin
    keys have no cap)."""
    if ctx.key is None or ctx.key.grants("admin"):
        return None
    cap = ctx.settings.max_artifact_storage_per_key
    others = ctx.queue.artifact_bytes(ctx.job.owner, except_job=ctx.job.id)
    if others + used <= cap:
        return None
    return (f"its artifacts ({used} bytes) took its key past its {cap}-byte cap on artifact storage (its other "
            f"jobs keep {others} bytes), so they were removed: delete jobs' artifacts (DELETE /v1/jobs/{{id}}) "
            "to make room")


def _verdict(e: BaseException) -> bool:
    """Whether a job's error is its recipe's verdict on the owner's inputs, which the worker's log says in one line (a
    traceback each time a box missed its thresholds read as a fault)."""
    from sdb_core.protect.check import WrapRefused

    return isinstance(e, WrapRefused)


def end_halted(ctx: JobContext) -> bool:
    """End a job the worker stopped for a cap (:meth:`JobContext.halt`): ``failed``, with the reason, and no
    artifact when the cap was its key's storage."""
    if ctx.drop_artifacts:
        shutil.rmtree(ctx.artifacts, ignore_errors=True)
    ended = ctx.queue.finish(ctx.job.id, ctx.worker, "failed", error=ctx.failure, message="failed",
                             artifact_bytes=ctx.artifact_bytes())
    ctx.log(f"failed: {ctx.failure}")
    return ended


def still_ours(ctx: JobContext) -> bool:
    """Whether the store still has the job running on this worker (one heartbeat; a store that does not
    answer is taken as yes: the job's own finish is conditional anyway)."""
    try:
        owned = ctx.queue.heartbeat(ctx.job.id, ctx.worker).owned
    except Exception:  # the store briefly unreachable: the finish decides
        log.warning("job %s: the store did not answer whether the job is still ours", ctx.job.id, exc_info=True)
        return True
    return owned


ATTEMPT_PREFIX = "artifacts."


def attempt_artifacts(workdir: Path, attempt: int) -> Path:
    """A new, empty artifacts folder for this attempt, and ``<workdir>/artifacts`` (what the routes serve)
    made to point at it in one step (a link replaced atomically); every other attempt's folder is removed.
    A requeued job starts clean, and a worker that hung and comes back after its job was requeued writes only
    into its own folder, which is served no more: it never mixes its files into the attempt that took over."""
    own = workdir / f"{ATTEMPT_PREFIX}{attempt}-{secrets.token_hex(4)}"
    own.mkdir()
    served = workdir / "artifacts"
    if served.is_dir() and not served.is_symlink():  # a folder of a job run before attempts had their own
        shutil.rmtree(served)
    link = workdir / f".link-{secrets.token_hex(4)}"
    os.symlink(own.name, link)
    os.replace(link, served)
    for old in workdir.glob(f"{ATTEMPT_PREFIX}*"):
        if old != own:
            shutil.rmtree(old, ignore_errors=True)
    return own


def prepare_process(settings: Settings) -> None:
    """What a process that runs jobs takes from its settings once, before its first job: torch's threads
    (``SDB_JOB_TORCH_THREADS``) and the ONNX Runtime providers of every session a job opens (a distillation's
    teacher bundle, an audited one), as the server's own sessions take them (``SDB_ORT_PROVIDERS``,
    ``SDB_GPU_MEM_LIMIT_MB``: :func:`service.registry.ort_providers`)."""
    from sdb_core.bundle import use_providers

    from ..registry import ort_providers

    if settings.job_torch_threads:
        import torch

        torch.set_num_threads(settings.job_torch_threads)
    use_providers(ort_providers(settings))


def job_dir(settings: Settings, job_id: str):
    return settings.jobs_dir / job_id


# How long a job's end (or its deploy) waits for the store to answer (an outage, a full disk): then the reaper
# settles it. A worker's own end of a job waits longer (settled's ``until``).
SETTLE_S = 60.0


def settled(call, *args, until: threading.Event | None = None, **kwargs):
    """``call`` (a queue write that ends a job, or a store call of its deploy) once the store takes it: retried
    through a store outage or a full disk for up to :data:`SETTLE_S` (it raised out of the worker, which exited, and
    the job ended "worker lost"; a deploy's failed the job "with an unexpected error"). Given ``until`` (the worker's
    stop), retried until that is set instead: the job's heartbeat goes on meanwhile, so the reaper leaves the job
    alone once the store answers, and the end stored is the job's own (after 60 s the reaper recorded a job that
    failed on a full disk as "worker lost ... (killed or out of memory?)")."""
    wait, deadline = 0.5, time.monotonic() + SETTLE_S
    while True:
        try:
            return call(*args, **kwargs)
        except (SQLAlchemyError, OSError) as e:
            if until.is_set() if until is not None else time.monotonic() + wait > deadline:
                raise
            log.warning("the store did not take the job's %s (%s): again in %.1f s",
                        getattr(call, "__name__", "write").replace("_", " "), type(e).__name__, wait)
            if until is not None:
                until.wait(wait)
            else:
                time.sleep(wait)
            wait = min(wait * 2, 8.0)


def open_job(settings: Settings, queue: JobQueue, job: JobRow, worker: str, workdir: Path,
             stop: threading.Event | None) -> JobContext:
    """The job's folder, this attempt's artifacts folder and its open log: what a job needs before it runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    return JobContext(settings, queue, job, worker, workdir, stop, attempt_artifacts(workdir, job.attempts))


def device_words() -> str:
    """Where this process trains, in words for a job's log: the GPU a job's device "auto" picks, or the CPU. A job
    on a GPU server that trained on the CPU (a worker without a device: CUDA_VISIBLE_DEVICES, SDB_WORKER_GPUS) said
    nothing of it but its time."""
    import torch

    try:
        if torch.cuda.is_available():
            i = torch.cuda.current_device()
            return f"training on cuda:{i} ({torch.cuda.get_device_name(i)})"
    except RuntimeError as e:  # a busy or exclusive GPU, a driver mismatch: the job's own run meets it and says so
        return f"its GPU did not answer ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
    threads = torch.get_num_threads()
    return f"training on the CPU ({threads} thread{'' if threads == 1 else 's'})"


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def setup_failure(e: OSError, settings: Settings) -> str:
    """Why a job whose folder could not be made (:func:`open_job`) failed, as its owner reads it."""
    if e.errno in NOT_WRITABLE:
        return (f"the server could not create the job's folder ({os.strerror(e.errno).lower()}): nothing of the job "
                "ran; submit it again once an administrator has let the job workers write the server's data dir")
    return failure_reason(e, "starting", settings.data_dir)  # a full disk (inodes too) says so


def fail_setup(settings: Settings, queue: JobQueue, job: JobRow, worker: str, e: OSError) -> str:
    """End a job that could not start (:func:`open_job` raised): failed, saying why, this attempt its only one.
    Left running it had no heartbeat, and the reaper requeued it, then failed it as "worker lost"."""
    reason = setup_failure(e, settings)
    log.error("job %s (%s): its folder could not be made: %s", job.id, job.kind, e)
    ended = settled(queue.finish, job.id, worker, "failed", error=reason, message="failed")
    return "failed" if ended else "lost"


def execute(settings: Settings, queue: JobQueue, job: JobRow, worker: str, stop: threading.Event | None = None,
            hard_stop: Callable[[], None] | None = None) -> str:
    """Run a job this worker has claimed; returns the status it ended in (or ``queued`` if released).
    ``hard_stop`` ends the process, for a job that does not stop when a cap is passed (a worker process's own)."""
    workdir = job_dir(settings, job.id)
    try:
        ctx = open_job(settings, queue, job, worker, workdir, stop)
    except OSError as e:  # a full disk, a jobs folder another user made: the worker goes on with the next job
        return fail_setup(settings, queue, job, worker, e)
    ctx.log(f"job {job.id} ({job.kind}) attempt {job.attempts} on worker {worker}, {device_words()}")
    hb = Heartbeat(ctx, settings.job_heartbeat_s, hard_stop)
    hb.start()
    t0 = time.time()
    try:
        kind, params = stored_params(job.kind, job.params)  # StaleJob: queued before the server changed
        ctx.reads = params.reads()
        if ctx.check_key() is not None:  # claimed for a key that no longer allows it: nothing runs
            raise Cancelled(ctx.key_stop)
        report = kind.run(ctx, params)
        if ctx.key_stop is not None or ctx.failure is not None:  # stopped in a stretch blind to cancel: not done
            raise Cancelled(ctx.key_stop or ctx.failure)
        if not still_ours(ctx):  # reaped while it ran (a hang): the artifacts are another attempt's now
            raise Cancelled("the job was reaped while this worker ran it")
        ctx.step("writing report", None)
        plot_curves(ctx.curves, ctx.artifacts / "curves.png", title=f"{job.kind} {job.id[:8]}")
        full = {"job": {"id": job.id, "kind": job.kind, "params": json.loads(job.params),
                        "attempt": job.attempts, "worker": worker, "seconds": time.time() - t0},
                **report, "curves": ctx.curves}
        full = hide_paths_in(json.loads(json.dumps(full, default=str)), settings.data_dir)  # the owner downloads it
        (ctx.artifacts / "report.json").write_text(report_json(full))
        used = ctx.artifact_bytes()
        over = artifacts_over_cap(ctx, used)
        if over is not None:
            ctx.halt(over, drop_artifacts=True)
            raise Cancelled(over)
        try:
            ok = settled(queue.finish, job.id, worker, "succeeded", message=report.get("summary", "done"),
                         result=finite_json(report.get("result", {})), metrics=finite_json(report.get("metrics", {})),
                         artifact_bytes=used, until=ctx.stop)
        except (SQLAlchemyError, OSError):  # not the recipe's failure: the reaper settles the job, its artifacts kept
            log.exception("job %s succeeded, but the store did not take its end", job.id)
            ctx.log("succeeded, but the store did not take it: the reaper will settle the job")
            return "lost"
        ctx.log("succeeded" if ok else "finished, but the job was no longer ours (reaped?)")
        return "succeeded" if ok else "lost"
    except Cancelled as e:
        if hb.lost or not still_ours(ctx):
            ctx.log(f"stopped: the job was taken from this worker ({e})")
            return "lost"
        if ctx.key_stop is not None:
            settled(queue.finish, job.id, worker, "cancelled", message=f"cancelled: {ctx.key_stop}",
                    artifact_bytes=ctx.artifact_bytes(), until=ctx.stop)
            ctx.log(f"cancelled: {ctx.key_stop}")
            return "cancelled"
        if ctx.failure is not None:
            end_halted(ctx)
            return "failed"
        if ctx.stop.is_set() and not ctx.cancel.is_set():
            settled(queue.release, job.id, worker, f"requeued: worker {worker} shut down")
            ctx.log("released: the worker is shutting down; the job goes back to the queue")
            return "queued"
        settled(queue.finish, job.id, worker, "cancelled", message=str(e), artifact_bytes=ctx.artifact_bytes(),
                until=ctx.stop)
        ctx.log(f"cancelled: {e}")
        return "cancelled"
    except Exception as e:  # any error of a recipe fails the job
        if ctx.failure is not None:  # a cap stopped it, and the recipe turned the stop into another error
            end_halted(ctx)
            return "failed"
        if hb.lost or not still_ours(ctx):  # reaped while it hung; the record is the reaper's or another attempt's
            log.warning("job %s: an error after the job was taken from this worker", job.id, exc_info=True)
            ctx.log("stopped: the job was taken from this worker")
            return "lost"
        # The owner reads the cause in words (error, log.txt); the traceback, which quotes paths
        # and file contents, goes to the worker's log and traceback.txt beside log.txt, never served.
        reason = failure_reason(e, ctx.snapshot()["step"], settings.data_dir)
        try:
            (workdir / "traceback.txt").write_text(traceback.format_exc())
        except OSError:  # a full disk (maybe the failure itself): the worker's log below has it all the same
            pass
        if _verdict(e):  # the recipe's answer (a box that missed the owner's thresholds), not a fault of the worker
            log.warning("job %s (%s) failed: %s", job.id, job.kind, reason)
        else:
            log.exception("job %s (%s) failed", job.id, job.kind)
        ctx.log(f"failed: {reason}")
        settled(queue.finish, job.id, worker, "failed", error=reason, message="failed",
                artifact_bytes=ctx.artifact_bytes(), until=ctx.stop)
        return "failed"
    finally:
        hb.done.set()
        hb.join(timeout=5)
        ctx.close()
