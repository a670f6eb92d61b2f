"""What a running job sees: its log, its artifacts directory, progress by phase, cancel, and the key
it runs for.

The training loop calls the phase callbacks and ``should_cancel`` from the job's thread; a
heartbeat thread (:mod:`.runner`) reads :meth:`JobContext.snapshot` and writes it to the
store, and sets ``cancel`` when the store says the job was cancelled (or is no longer ours) or
when the job's key no longer allows it (:meth:`JobContext.check_key`: revoked, expired, a scope or
model it lost). A job runs on its key's authority: its files are resolved for that key, and the
keyed samples it draws are charged to that key's quota (:meth:`JobContext.charge`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sdb_core.progress import Cancelled, Hooks, Progress

from ..auth import ApiKey, Keyring
from ..settings import Settings
from ..store import JobRow
from .kinds.base import Access, key_problem
from .queue import JobQueue

log = logging.getLogger("sdb.jobs")


class JobContext:
    def __init__(self, settings: Settings, queue: JobQueue, job: JobRow, worker: str, workdir: Path,
                 stop: threading.Event | None = None, artifacts: Path | None = None):
        self.settings, self.queue, self.job, self.worker = settings, queue, job, worker
        self.workdir = workdir
        self.artifacts = artifacts or workdir / "artifacts"  # this attempt's own (the runner's attempt_artifacts)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.cancel = threading.Event()  # set by the heartbeat: cancel asked, or the job was taken from us
        self.stop = stop or threading.Event()  # set by the worker: it is shutting down
        self._log = open(workdir / "log.txt", "a", encoding="utf-8")  # noqa: SIM115  (open for the whole job)
        self._lock = threading.Lock()
        self._spans: dict[str, tuple[float, float]] = {}
        self._state: dict = {"progress": 0.0, "step": "starting", "metrics": {}, "training": False}
        self.curves: dict[str, list[dict]] = {}  # phase → points of the training curves
        self.key: ApiKey | None = None  # the submitting key, as the store has it now (check_key)
        self.reads: list[Access] = []  # the hosted models the job reads, and how (its params')
        self.key_stop: str | None = None  # why the job may no longer run on its key's authority
        self.failure: str | None = None  # why the worker stops the job as failed: a cap it passed (halt)
        self.drop_artifacts = False  # with failure: the job keeps no artifact
        self.halted_at: float | None = None  # when it was asked to stop for failure (monotonic clock)

    # ------------------------------------------------------------ the caps it runs under
    def halt(self, reason: str, *, drop_artifacts: bool = False) -> None:
        """Stop the job at its next step, to end ``failed`` with ``reason`` (the first reason given wins)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure, self.drop_artifacts, self.halted_at = reason, drop_artifacts, time.monotonic()
        self.log(f"stopping: {reason}")
        self.cancel.set()

    def stuck(self, grace_s: float) -> bool:
        """Asked to stop for a failure more than ``grace_s`` ago, and still running."""
        return self.halted_at is not None and time.monotonic() - self.halted_at > grace_s

    def artifact_bytes(self) -> int:
        """The bytes under ``artifacts/`` now (what the key's artifact storage cap counts)."""
        total = 0
        for root, _, names in os.walk(self.artifacts):
            for n in names:
                try:
                    total += os.lstat(os.path.join(root, n)).st_size
                except FileNotFoundError:  # removed while we counted
                    continue
        return total

    # ------------------------------------------------------------ the key it runs for
    def check_key(self) -> str | None:
        """Read the job's key from the store and say why it no longer allows this job (None: it does);
        a reason also asks the job to stop."""
        row = self.queue.store.get_key(self.job.owner)
        self.key = None if row is None else ApiKey.from_row(row)
        problem = key_problem(self.key, self.reads, self.settings)
        if problem is not None and self.key_stop is None:
            self.key_stop = problem
            self.cancel.set()
        return problem

    def charge(self, model: str, samples: int) -> None:
        """Count ``samples`` keyed samples of ``model`` against the job's key quota before they are drawn: the
        store's exact charge, once per job (an attempt after a requeue charges nothing again), in one transaction
        with the job's row (nothing counted and ApiError when they do not fit or the key died; Cancelled when the
        job is no longer this worker's), and the key's usage statistics. A charged job is never requeued by the
        reaper (it fails it)."""
        keyring = Keyring(self.queue.store, b"")  # charging and usage read no secret: no pepper
        outcome = keyring.charge_job(self.key, samples, self.job.id, self.worker)
        if outcome == "lost":
            self.cancel.set()
            raise Cancelled("the job was taken from this worker before it charged its keyed samples")
        if outcome == "already":
            self.log(f"{samples} keyed samples of model {model} were charged by an earlier attempt of this job")
            return
        keyring.record(self.key.id, model, "distill", samples)
        keyring.flush()
        self.log(f"charged {samples} keyed samples of model {model} to the job's key")

    # ------------------------------------------------------------ log
    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%SZ", time.gmtime())  # UTC, as every other time SDB gives: never the host's zone
        with self._lock:
            try:
                for line in str(message).splitlines() or [""]:
                    self._log.write(f"{stamp} {line}\n")
                self._log.flush()
            except OSError as e:  # a full disk: the job goes on (or fails for it, saying so), and so does the worker
                log.warning("job %s: its log could not be written (%s): %s", self.job.id, e.strerror or e,
                            str(message)[:200])

    def close(self) -> None:
        try:
            self._log.close()
        except OSError:  # its last lines could not be flushed (a full disk): said in log() already
            pass

    # ------------------------------------------------------------ progress
    def plan(self, **weights: float) -> None:
        """Split the fraction 0..1 over phases in order, e.g. ``plan(teacher=8, wrap=15)`` by epochs."""
        total = sum(weights.values()) or 1.0
        start = 0.0
        for name, w in weights.items():
            self._spans[name] = (start, start + w / total)
            start += w / total

    def step(self, step: str, progress: float | None = None) -> None:
        with self._lock:
            self._state["step"] = step
            if progress is not None:
                self._state["progress"] = progress
        self.log(step)

    def phase(self, name: str) -> Callable[[Progress], None]:
        lo, hi = self._spans.get(name, (0.0, 1.0))
        points = self.curves.setdefault(name, [])
        self.step(f"{name}: started", lo)

        def report(p: Progress) -> None:
            point = {"epoch": p.epoch, "step": p.step, "steps": p.steps,
                     "x": (p.epoch - 1) + p.step / max(p.steps, 1), **p.metrics}
            points.append(point)
            with self._lock:
                self._state.update(progress=lo + (hi - lo) * p.fraction, metrics=dict(p.metrics), training=True,
                                   step=f"{name} epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps}")
            shown = " ".join(f"{k}={v:.4f}" for k, v in p.metrics.items())
            self.log(f"{name} epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps} {shown}")

        return report

    def snapshot(self) -> dict:
        with self._lock:
            return {**self._state, "metrics": dict(self._state["metrics"])}

    def should_cancel(self) -> bool:
        return self.cancel.is_set() or self.stop.is_set()

    @property
    def hooks(self) -> Hooks:
        """This job as a task's watcher: its plan, phases, log and cancel (sdb_core.progress's one protocol)."""
        return Hooks(plan=self.plan, phase=self.phase, log=self.log, should_cancel=self.should_cancel)
