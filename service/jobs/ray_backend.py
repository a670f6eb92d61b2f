"""The Ray backend (``SDB_JOBS_BACKEND=ray``): the same kinds run as Ray tasks.

The store stays the truth. The API server's :class:`RayDispatcher` sends every queued Ray job
to the cluster as a task asking for the job's ``cpus``/``gpus``; the task claims that job by id
(so a job sent twice, or cancelled while waiting for resources, runs at most once) and runs it
with the same runner as an embedded worker: heartbeat, progress, cancel, log and artifacts
through the same store and data dir. The cluster's workers therefore need the data dir on a
shared filesystem and the store reachable (PostgreSQL, or SQLite for a one-machine cluster).
A task whose process dies stops heartbeating, and the reaper ends its job like any other. Jobs are sent
oldest first; one whose params no longer validate (queued before the server changed) fails there, saying
so, and the jobs after it are sent as usual.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from ..settings import Settings
from ..store import JobRow, Store
from .kinds import StaleJob, stored_params
from .queue import JobQueue

log = logging.getLogger("sdb.jobs")


def portable_settings(settings: Settings) -> dict:
    """Settings a process elsewhere can rebuild: every path absolute, the store URL explicit."""
    over = {"data_dir": str(settings.data_dir.resolve()), "database_url": settings.db_url,
            "master_key_file": str(settings.master_key_path.resolve()),
            "pepper_file": str(settings.pepper_path.resolve())}
    return {**settings.model_dump(mode="json"), **over}


def run_task(settings_dict: dict, job_id: str) -> str:
    """The Ray task: claim ``job_id`` and run it; ``skipped`` when it is no longer queued."""
    from .runner import execute
    from .worker import end_process, worker_id

    settings = Settings(**settings_dict)
    if settings.job_torch_threads:
        import torch

        torch.set_num_threads(settings.job_torch_threads)
    store = Store(settings.db_url)
    try:
        queue = JobQueue(store)
        me = worker_id("ray")
        job = queue.claim(me, job_id=job_id)
        if job is None:
            return "skipped"
        return execute(settings, queue, job, me, hard_stop=end_process)  # Ray starts another process
    finally:
        store.close()


# How long the API keeps trying a Ray cluster that does not answer yet: compose starts the API
# beside the Ray head (depends_on waits for the container, not for Ray inside it).
RAY_CONNECT_S = 120.0


def start_ray(settings: Settings) -> None:
    if not settings.ray_address:
        # A local instance serves this host only: Ray reads this switch (at import) to put every
        # address of a single-node instance on 127.0.0.1 instead of the machine's interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if settings.ray_address:
        deadline = time.monotonic() + RAY_CONNECT_S
        while True:
            try:
                ray.init(address=settings.ray_address, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError, TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("Ray at %s not ready (%s: %s); retrying", settings.ray_address, type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                ray.shutdown()
                time.sleep(2.0)
    else:  # a local instance with one CPU per configured worker, on loopback: it serves this host only
        ray.init(num_cpus=max(settings.workers, 1), include_dashboard=False, log_to_driver=False)
    log.info("jobs run on Ray: %s", ray.get_runtime_context().gcs_address)


class RayDispatcher(threading.Thread):
    def __init__(self, settings: Settings, queue: JobQueue):
        super().__init__(name="sdb-ray-dispatcher", daemon=True)
        self.settings, self.queue = settings, queue
        self.stopped = threading.Event()
        self.inflight: dict[str, object] = {}  # job id → ObjectRef

    def run(self) -> None:
        import ray

        task = ray.remote(run_task)
        portable = portable_settings(self.settings)
        while not self.stopped.wait(self.settings.job_poll_s):
            try:
                for job in self.queue.list(status="queued", limit=1000, oldest_first=True):
                    if job.backend == "ray" and job.id not in self.inflight:
                        self._send(task, portable, job)
                if self.inflight:
                    ready, _ = ray.wait(list(self.inflight.values()), num_returns=len(self.inflight), timeout=0)
                    for job_id, ref in list(self.inflight.items()):
                        if ref in ready:
                            del self.inflight[job_id]
                            try:
                                log.info("job %s: Ray task ended %s", job_id, ray.get(ref))
                            except Exception as e:  # noqa: BLE001  (a crashed task: the reaper ends its job)
                                log.warning("job %s: Ray task failed: %s", job_id, e)
            except Exception:
                log.exception("Ray dispatcher; will retry")

    def _send(self, task, portable: dict, job: JobRow) -> None:
        """Send one queued job to Ray; one that can no longer run fails here, and one that cannot be sent
        now is logged: neither stops the jobs after it."""
        try:
            _, p = stored_params(job.kind, job.params)
        except StaleJob as e:
            if self.queue.fail_queued(job.id, str(e)):
                log.warning("job %s failed before it was sent to Ray: %s", job.id, e)
            return
        try:
            self.inflight[job.id] = task.options(num_cpus=p.cpus, num_gpus=p.gpus,
                                                 max_retries=0).remote(portable, job.id)
        except Exception:
            log.exception("job %s: could not be sent to Ray; will retry", job.id)
            return
        log.info("job %s sent to Ray (cpus %s, gpus %s)", job.id, p.cpus, p.gpus)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)
