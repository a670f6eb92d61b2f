"""The job queue on the SQL store: submit, claim, heartbeat, finish, cancel and reap.

Every state change is one conditional UPDATE (``WHERE status = ... AND worker = ...``) whose
row count tells whether it won, so concurrent workers, the API and the reaper can race freely:

- claim: the oldest queued job is picked with ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL;
  SQLAlchemy leaves the clause out on SQLite, where writers are serialised anyway) and taken
  with ``UPDATE ... WHERE id = :id AND status = 'queued'``; a lost race tries the next one.
- a worker's heartbeat, progress and finish only apply while the job is still its own and
  ``running``: a job the reaper has failed or requeued cannot be overwritten by a late worker.
- the reaper fails (or requeues once, if training had not started) a running job whose
  heartbeat is older than ``stale_s``; until the store has answered this process for ``stale_s``
  since it last failed to reach it (an outage silenced every worker's heartbeat), only one silent
  for ``stale_s`` plus the longest outage it has seen.

The times of a job's run (claimed, heartbeat, training, finished) are the database's clock (:func:`db_now`), never
the writing host's: a reaper compared another host's heartbeat with its own clock, and hosts whose clocks differed
by more than ``stale_s`` reaped each other's healthy jobs ("worker lost").
"""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from ..store import JOB_DONE, AsJson, JobRow, Store, db_now, lock_owner, newest_first

log = logging.getLogger("sdb.jobs")

MAX_ATTEMPTS = 2  # a job that died before training started is requeued once


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learnt: the job is still ours, and whether a cancel was asked."""

    owned: bool
    cancel: bool


class TooManyJobs(Exception):
    """A submission past its owner's cap of active jobs (``active``: those it has)."""

    def __init__(self, active: int):
        super().__init__(f"{active} jobs queued or running")
        self.active = active


class JobQueue:
    def __init__(self, store: Store):
        self.store = store
        self._failure_seen: float | None = None  # the store's last failure (Store.failed_at) the reaper knows of
        self._answering_since = -math.inf  # when (monotonic) the reaper first found the store answering after it
        self._last_answer = time.monotonic()  # the reaper's last look at a store that answered (none yet: from now)
        self._longest_outage = 0.0  # seconds: the longest the reaper has gone without an answer over a failure

    # ------------------------------------------------------------ API side
    def submit(self, kind: str, params: dict, owner: str, *, backend: str = "embedded",
               idempotency_key: str | None = None, request_sha256: str | None = None,
               max_active: int | None = None) -> tuple[JobRow, bool]:
        """(job, created); with an idempotency key already used by ``owner``, that key's job (``request_sha256``,
        the request's digest, is kept with a new one: what a retry is compared with). ``max_active``: the jobs
        ``owner`` may have queued or running, counted in the transaction that adds this one under the owner's lock
        (:class:`TooManyJobs`), so that concurrent submissions, in any process, never pass it together."""
        if idempotency_key is not None:
            existing = self.by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return existing, False
        row = JobRow(id=uuid.uuid4().hex, kind=kind, params=json.dumps(params, sort_keys=True), owner=owner,
                     idempotency_key=idempotency_key, request_sha256=request_sha256, backend=backend,
                     status="queued", cancel_requested=False, progress=0.0, step="queued", message="", metrics="{}",
                     result="{}", attempts=0, created_at=time.time())
        try:
            with self.store.session.begin() as s:
                if max_active is not None:
                    lock_owner(s, owner)
                    active = s.scalar(select(func.count()).select_from(JobRow).where(
                        JobRow.owner == owner, JobRow.status.in_(("queued", "running"))))
                    if active >= max_active:
                        raise TooManyJobs(active)
                s.add(row)
        except IntegrityError:  # the same key raced us: theirs wins
            existing = self.by_idempotency_key(owner, idempotency_key or "")
            if existing is None:
                raise
            return existing, False
        return row, True

    def by_idempotency_key(self, owner: str, key: str) -> JobRow | None:
        with self.store.session() as s:
            return s.scalar(select(JobRow).where(JobRow.owner == owner, JobRow.idempotency_key == key))

    def get(self, job_id: str) -> JobRow | None:
        with self.store.session() as s:
            return s.get(JobRow, job_id)

    def list(self, *, owner: str | None = None, status: str | None = None, kind: str | None = None,
             backend: str | None = None, model: str | None = None, version: str | None = None,
             before: tuple[float, str] | None = None, limit: int = 100, oldest_first: bool = False) -> list[JobRow]:
        """Jobs newest first, a page at a time after ``before`` (:func:`~service.store.newest_first`), as
        ``GET /v1/jobs`` lists them; ``oldest_first``: the first ``limit`` in the order they were queued. ``owner``'s
        (None: every key's), of a ``status``, ``kind`` and ``backend``; ``model`` (and ``version``): those whose
        params' ``target`` names that hosted model (an audit's; a hosted target's version is pinned at submission)."""
        q = select(JobRow)
        for column, value in ((JobRow.backend, backend), (JobRow.owner, owner), (JobRow.status, status),
                              (JobRow.kind, kind)):
            if value is not None:
                q = q.where(column == value)
        target = AsJson(JobRow.params)
        if model is not None:
            q = q.where(target[("target", "model")].as_string() == model)
        if version is not None:
            q = q.where(target[("target", "version")].as_string() == version)
        if oldest_first:
            q = q.order_by(JobRow.created_at, JobRow.id).limit(limit)
        else:
            q = newest_first(q, JobRow, before, limit)
        with self.store.session() as s:
            return list(s.scalars(q))

    def cancel(self, job_id: str) -> JobRow | None:
        """A queued job is cancelled at once; a running one is asked to stop (its worker ends it). The row as the
        cancel left it, read in its transaction (None: no such job): a job that had ended (its worker finished it,
        or a delete removed it) since the caller looked is answered as it is, not as a later read finds it."""
        with self.store.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                      .values(status="cancelled", cancel_requested=True, finished_at=db_now(), step="cancelled",
                              message="cancelled before it started"))
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "running")
                      .values(cancel_requested=True, message="cancel requested"))
            return s.get(JobRow, job_id)

    def delete(self, job_id: str) -> JobRow | None:
        """Remove a finished job's row (its folder is the caller's to remove); None if it is not finished."""
        with self.store.session.begin() as s:
            row = s.get(JobRow, job_id)
            if row is None or row.status not in JOB_DONE:
                return None
            gone = s.execute(delete(JobRow).where(JobRow.id == job_id, JobRow.status.in_(JOB_DONE))).rowcount
            return row if gone == 1 else None

    def artifact_bytes(self, owner: str, *, except_job: str | None = None) -> int:
        """The bytes of artifacts ``owner``'s jobs keep, as their runners last measured them (the key's cap)."""
        q = select(func.coalesce(func.sum(JobRow.artifact_bytes), 0)).where(JobRow.owner == owner)
        if except_job is not None:
            q = q.where(JobRow.id != except_job)
        with self.store.session() as s:
            return int(s.scalar(q))

    def fail_queued(self, job_id: str, error: str) -> bool:
        """End a queued job as failed without running it (it can no longer run: :class:`~.kinds.StaleJob`)."""
        with self.store.session.begin() as s:
            return s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                             .values(status="failed", finished_at=db_now(), step="failed", error=error,
                                     message="failed")).rowcount == 1

    # ------------------------------------------------------------ worker side
    def claim(self, worker: str, *, backend: str = "embedded", job_id: str | None = None,
              queued_before: float | None = None) -> JobRow | None:
        """Take the oldest queued job of ``backend`` (or exactly ``job_id``) for ``worker``, one submitted before
        ``queued_before`` (a time) if given; None if none."""
        for _ in range(5):
            with self.store.session.begin() as s:
                q = select(JobRow.id).where(JobRow.status == "queued")
                q = q.where(JobRow.id == job_id) if job_id is not None else q.where(JobRow.backend == backend)
                if queued_before is not None:
                    q = q.where(JobRow.created_at < queued_before)
                candidate = s.scalar(q.order_by(JobRow.created_at, JobRow.id).limit(1)
                                     .with_for_update(skip_locked=True))
                if candidate is None:
                    return None
                won = s.execute(update(JobRow).where(JobRow.id == candidate, JobRow.status == "queued")
                                .values(status="running", worker=worker, heartbeat_at=db_now(), started_at=db_now(),
                                        training_at=None, attempts=JobRow.attempts + 1, step="starting",
                                        message=f"claimed by {worker}", artifact_bytes=0)).rowcount
            if won == 1:
                return self.get(candidate)
            if job_id is not None:
                return None
        return None

    def heartbeat(self, job_id: str, worker: str, *, progress: float | None = None, step: str | None = None,
                  message: str | None = None, metrics: dict | None = None, training: bool = False,
                  artifact_bytes: int | None = None) -> Beat:
        values: dict = {"heartbeat_at": db_now()}
        if artifact_bytes is not None:
            values["artifact_bytes"] = artifact_bytes
        if progress is not None:
            values["progress"] = max(0.0, min(1.0, float(progress)))
        if step is not None:
            values["step"] = step[:200]
        if message is not None:
            values["message"] = message
        if metrics is not None:
            values["metrics"] = json.dumps(metrics)
        with self.store.session.begin() as s:
            owned = s.execute(update(JobRow).where(*self._mine(job_id, worker)).values(**values)).rowcount == 1
            if owned and training:
                s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.training_at.is_(None))
                          .values(training_at=values["heartbeat_at"]))
            cancel = bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))
        return Beat(owned, cancel)

    def finish(self, job_id: str, worker: str, status: str, *, error: str | None = None, message: str = "",
               result: dict | None = None, metrics: dict | None = None, artifact_bytes: int | None = None) -> bool:
        assert status in JOB_DONE, status
        values: dict = {"status": status, "finished_at": db_now(), "error": error, "message": message,
                        "step": status}
        if artifact_bytes is not None:
            values["artifact_bytes"] = artifact_bytes
        if status == "succeeded":
            values["progress"] = 1.0
        if result is not None:
            values["result"] = json.dumps(result)
        if metrics is not None:
            values["metrics"] = json.dumps(metrics)
        with self.store.session.begin() as s:
            return s.execute(update(JobRow).where(*self._mine(job_id, worker)).values(**values)).rowcount == 1

    def release(self, job_id: str, worker: str, reason: str) -> bool:
        """Put a running job back in the queue (its worker is shutting down); the attempt is not counted."""
        with self.store.session.begin() as s:
            return s.execute(update(JobRow).where(*self._mine(job_id, worker))
                             .values(status="queued", worker=None, heartbeat_at=None, step="queued",
                                     progress=0.0, training_at=None, attempts=JobRow.attempts - 1,
                                     message=reason)).rowcount == 1

    @staticmethod
    def _mine(job_id: str, worker: str):
        return JobRow.id == job_id, JobRow.worker == worker, JobRow.status == "running"

    # ------------------------------------------------------------ reaper
    def reap(self, stale_s: float) -> list[tuple[str, str]]:
        """End or requeue running jobs whose worker stopped heartbeating; returns (id, new status). Heartbeats are
        judged by the database's clock, which stamped them (:func:`db_now`), whatever this host's says.

        Until the store has answered for ``stale_s`` since a store call of this process last failed to reach it
        (:attr:`Store.failed_at`), a job is reaped only once silent for ``stale_s`` plus the longest outage seen
        (:meth:`_silence_to_reap`): while the store did not answer, no worker could heartbeat either, and an outage
        longer than ``stale_s`` failed every running job "worker lost"; a wait without that bound kept a dead
        worker's job running for ever where failures came more often than every ``stale_s``."""
        with self.store.session() as s:
            now = s.scalar(select(db_now()))
            cutoff = now - self._silence_to_reap(stale_s)
            stale = list(s.scalars(select(JobRow).where(
                JobRow.status == "running", or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < cutoff))))
        done = []
        for job in stale:
            silent = f"worker {job.worker} sent no heartbeat for {now - (job.heartbeat_at or now):.0f} s"
            if job.cancel_requested:
                values = {"status": "cancelled", "finished_at": now, "step": "cancelled",
                          "message": f"cancelled; {silent}"}
            elif job.training_at is None and job.attempts < MAX_ATTEMPTS:
                values = {"status": "queued", "worker": None, "heartbeat_at": None, "step": "queued",
                          "progress": 0.0, "message": f"requeued: {silent} before training started"}
            else:
                values = {"status": "failed", "finished_at": now, "step": "failed",
                          "error": f"worker lost: {silent} (killed or out of memory?)",
                          "message": "worker lost"}
            with self.store.session.begin() as s:
                won = s.execute(update(JobRow).where(
                    JobRow.id == job.id, JobRow.status == "running", JobRow.worker == job.worker,
                    or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < cutoff)).values(**values)).rowcount
            if won:
                done.append((job.id, values["status"]))
        return done

    def _silence_to_reap(self, stale_s: float) -> float:
        """The seconds a job's heartbeat may be silent before it is reaped: ``stale_s`` once the store has answered
        for ``stale_s`` (monotonic) since it last failed to reach it, until then ``stale_s`` plus the longest outage
        seen. An outage is the store's own run of failures in this process (:attr:`Store.failing_since` to
        :attr:`Store.failed_at`: a read-only file fails every write while the reaper's reads pass), ``stale_s`` before
        it (a reaper that only reads fails first when it writes, once jobs look stale: ``stale_s`` into the outage)
        and the time to this look after it (at most ``stale_s``: a worker reaps only between jobs): no shorter than
        the outage, so a job silent only for it is not reaped. Called as the store answers."""
        at = time.monotonic()
        failed, since = self.store.failed_at, self.store.failing_since
        if failed != self._failure_seen:  # it failed since the last look, and answers now: the wait starts
            run = failed - since if failed is not None and since is not None else 0.0
            self._longest_outage = max(self._longest_outage, stale_s + run + min(at - self._last_answer, stale_s))
            self._failure_seen, self._answering_since = failed, at
            log.info("the store answers again: jobs whose workers stopped heartbeating are reaped from %.0f s on "
                     "(their heartbeats failed while it did not answer), those silent for %.0f s at once",
                     stale_s, stale_s + self._longest_outage)
        self._last_answer = at
        if at - self._answering_since >= stale_s:
            return stale_s
        return stale_s + self._longest_outage
