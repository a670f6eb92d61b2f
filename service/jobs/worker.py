"""Embedded workers: ``sdb worker`` is one process that claims jobs from the store and runs them;
``sdb serve`` starts ``--workers N`` of them (:class:`WorkerPool`) and restarts one that dies.

A worker also reaps: any running job whose worker stopped heartbeating is failed or requeued
(:meth:`JobQueue.reap`), so a killed worker's job is cleaned up by its peers or the server.
SIGTERM, SIGINT or SIGHUP stop the worker; a job it was running goes back to the queue. A job that does not stop
when it passes a cap (:mod:`.runner`) is failed and the process ends itself (:func:`end_process`); the pool
starts another, as a compose worker's restart policy does.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from sdb_core.bundle import cuda_visible

from ..disclosure import one_line
from ..settings import Settings, log_to_stderr
from ..store import Store, shown_url, unreachable_reason
from .queue import JobQueue
from .runner import execute, prepare_process

log = logging.getLogger("sdb.jobs")


def worker_id(prefix: str = "worker") -> str:
    return f"{prefix}:{socket.gethostname()}:{os.getpid()}"


EXIT_STUCK_JOB = 75  # the exit status of a worker that ended itself: its job did not stop at a cap
# What stops `sdb serve` and `sdb worker` cleanly: a supervisor's SIGTERM, a Ctrl-C, and a hangup (a closed terminal
# or SSH session; a supervisor that reloads with it), which by default killed them with no teardown at all.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts: it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_process() -> None:
    """A worker process's hard stop, for a job that did not stop when asked (its job is already failed)."""
    logging.shutdown()
    os._exit(EXIT_STUCK_JOB)


def run_worker(settings: Settings, *, stop: threading.Event | None = None, once: bool = False,
               hard_stop: Callable[[], None] | None = None) -> int:
    """Claim and run embedded jobs until ``stop`` is set (or, with ``once``, until the queue is empty);
    ``hard_stop`` (a dedicated process's :func:`end_process`) for a job that does not stop at a cap."""
    prepare_process(settings)
    stop = stop or threading.Event()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _ = settings.master_key  # created on first use, as the server does
    store = open_when_up(settings, stop, once)
    if store is None:  # stopped while the store was unreachable
        return 0
    try:  # what it writes (artifacts, logs, deployed bundles) is read by the others where they read it
        settings.check_data_dir(store)
    except BaseException:
        store.close()
        raise
    queue = JobQueue(store)
    me = worker_id()
    # A worker without a GPU in a pool with some leaves a new job to them for a few polls: an idle GPU worker
    # takes it first, and this one only what they leave (else either took it, as often as not on the CPU).
    defer = GPU_FIRST_POLLS * settings.job_poll_s if os.environ.get(DEFER_ENV) == "1" else 0.0
    log.info("worker %s on %s%s", me, settings.data_dir.resolve(),
             f" (no GPU: jobs queued {defer:g} s before, GPU workers first)" if defer else "")
    last_reap = 0.0
    outage = 0.0  # seconds waited since the store (or the disk) last answered
    try:
        while not stop.is_set():
            try:
                if time.monotonic() - last_reap >= settings.job_reap_s:
                    last_reap = time.monotonic()
                    for job_id, status in queue.reap(settings.job_stale_s):
                        log.warning("job %s: its worker stopped heartbeating; now %s", job_id, status)
                job = queue.claim(me, queued_before=time.time() - defer if defer else None)
                outage = 0.0
                if job is None:
                    if once:
                        break
                    stop.wait(settings.job_poll_s)
                    continue
                log.info("job %s (%s): started", job.id, job.kind)
                status = execute(settings, queue, job, me, stop, hard_stop)
                log.info("job %s: %s", job.id, status)
            except (SQLAlchemyError, OSError) as e:
                # The store gone a moment, or a full disk: this worker waits it out (it exited, and a standalone
                # `sdb worker` stayed dead); a job's end is stored once the store takes it (runner.settled).
                outage = backoff(outage, settings)
                log.warning("the job store or disk failed (%s); trying again in %.0f s", one_line(e), outage)
                if once:
                    raise
                stop.wait(outage)
    finally:
        store.close()
    return 0


OUTAGE_WAIT_MOST_S = 30.0  # the longest wait between two tries of a store that does not answer


def backoff(wait: float, settings: Settings) -> float:
    """The next wait for a store that still does not answer: doubled from ``job_poll_s``, at most 30 s."""
    return min(max(wait * 2, settings.job_poll_s), OUTAGE_WAIT_MOST_S)


def open_when_up(settings: Settings, stop: threading.Event, once: bool = False) -> Store | None:
    """The job store, waited for while it does not answer (a PostgreSQL down, a SQLite folder unmounted): a worker
    the pool (re)started during an outage exited with a traceback every few seconds. Each wait is one warning naming
    the store (never its password); None if ``stop`` is set meanwhile. A store that answers but cannot be used (a
    newer schema, a corrupt file) raises, as with ``once``: waiting does not mend it."""
    wait = 0.0
    while True:
        try:
            return Store(settings.db_url)
        except (SQLAlchemyError, OSError) as e:
            if once:
                raise
            wait = backoff(wait, settings)
            log.warning("the job store %s is unreachable (%s); trying again in %.0f s", shown_url(settings.db_url),
                        unreachable_reason(e), wait)
            if stop.wait(wait):
                return None


PARENT_ENV = "SDB_WORKER_PARENT_PID"  # set by WorkerPool: the worker stops when that server is gone
DEFER_ENV = "SDB_WORKER_DEFERS_TO_GPU"  # set by WorkerPool on its workers without a GPU when others have one
_OWN_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this service package: its workers import it


def _site_dirs() -> set[str]:
    import site

    return {str(Path(p).resolve()) for p in (*site.getsitepackages(), site.getusersitepackages())}
GPU_FIRST_POLLS = 3


def _watch_parent(pid: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        if os.getppid() != pid:
            log.warning("server pid %d is gone; stopping", pid)
            stop.set()


def first_to_go() -> None:
    """Make this process the one the kernel kills first when the machine runs out of memory (Linux; elsewhere a
    no-op). A job's memory has no bound but the machine's (a large network, an uploaded ONNX teacher that builds
    huge tensors): out of memory, the kernel's choice, by size, could fall on the API server or the store beside
    it. This way it falls on the job's worker: the reaper ends the job (``worker lost``) and the pool starts
    another worker. Raising one's own score needs no privilege."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def main_worker(settings: Settings) -> int:
    """The ``sdb worker`` process: a stop signal (SIGTERM, Ctrl-C, SIGHUP) stops it after releasing its job."""
    first_to_go()
    log_to_stderr(settings.log_level)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(sig: int, _frame) -> None:
        received.append(sig)  # logged once stopped: a handler that wrote could interrupt a write to stderr
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    parent = os.environ.get(PARENT_ENV)
    if parent:
        threading.Thread(target=_watch_parent, args=(int(parent), stop), daemon=True).start()
    status = run_worker(settings, stop=stop, hard_stop=end_process)
    if received:
        log.info("worker %s stopped on %s", worker_id(), signal.Signals(received[0]).name)
    return status


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """The CUDA devices this machine lets a process use, as CUDA_VISIBLE_DEVICES names them: that
    variable when it is set, else what ``nvidia-smi -L`` lists, else none. (No torch import here: the
    API process that starts the pool need not load it.)"""
    named = cuda_visible(env)
    if named is not None:
        return named
    try:
        out = subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


def gpu_slots(workers: int, gpus: int | None, devices: list[str]) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each of ``workers`` workers: one device each for the first ``gpus``
    (None: one per device; never more than there are devices), "" (no CUDA: the CPU) for the rest.
    So at most that many GPU jobs run at once, each alone on its device."""
    n = min(len(devices) if gpus is None else gpus, len(devices), workers)
    return [devices[i] for i in range(n)] + [""] * (workers - n)


class WorkerPool:
    """``n`` ``sdb worker`` processes on the server's settings; one that exits is started again, on the
    same device. ``devices`` (one CUDA_VISIBLE_DEVICES value per worker, :func:`gpu_slots`) pins each
    worker to its GPU or to none; None leaves the environment's."""

    def __init__(self, n: int, env: dict[str, str] | None = None, restart_delay_s: float = 1.0,
                 devices: list[str] | None = None):
        self.n, self.env, self.restart_delay_s = n, env, restart_delay_s
        if devices is not None and len(devices) != n:
            raise ValueError(f"one device slot per worker: {n} workers, {len(devices)} slots")
        self.devices = devices
        self.procs: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sdb-worker-pool", daemon=True)

    def _spawn(self, i: int) -> subprocess.Popen:
        env = {**(self.env if self.env is not None else os.environ), PARENT_ENV: str(os.getpid())}
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices[i]
            if not self.devices[i] and any(self.devices):
                env[DEFER_ENV] = "1"
        # -P: not the working directory first on sys.path, where a folder of its own named service/ was imported
        # instead (or none had service.jobs: the worker died at start, again and again, and every job stayed queued);
        # and the folder of the server's own service package first, so that a server run from a source tree that
        # is not installed (python -m sdb_cli) has workers of the same code.
        if _OWN_ROOT not in _site_dirs():  # an installed package is found as ever: no site dir before the stdlib
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_OWN_ROOT, env.get("PYTHONPATH")) if p)
        return subprocess.Popen([sys.executable, "-P", "-m", "service.jobs"], env=env)

    def start(self) -> WorkerPool:
        self.procs = [self._spawn(i) for i in range(self.n)]
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.restart_delay_s):
            for i, p in enumerate(self.procs):
                if p.poll() is not None and not self._stop.is_set():
                    log.warning("job worker pid %d exited with %s; starting another", p.pid, p.returncode)
                    self.procs[i] = self._spawn(i)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
