"""The Ray backend (``SDB_JOBS_BACKEND=ray``): the same kinds run as Ray tasks.

The store stays the truth. The API server's :class:`RayDispatcher` sends every queued Ray job
to the cluster as a task asking for the job's ``cpus``/``gpus``; the task claims that job by id
(so a job sent twice, or cancelled while waiting for resources, runs at most once) and runs it
with the same runner as an embedded worker: heartbeat, progress, cancel, log and artifacts
through the same store and data dir. The cluster's workers therefore need the data dir on a
shared filesystem and the store reachable (PostgreSQL, or SQLite for a one-machine cluster); a task on
a node whose data dir is another (no mount: a local folder at that path) fails its job saying so
(``Settings.data_dir_mark``) rather than leave its artifacts, or a deployed bundle, where the server never sees them.
A task whose process dies stops heartbeating, and the reaper ends its job like any other. Jobs are sent
oldest first; one whose params no longer validate (queued before the server changed) fails there, saying
so, and the jobs after it are sent as usual.

A task that outlives its hold on its job (it hung while the reaper requeued or ended the job, or it waits for
resources for a job cancelled meanwhile) is ended (``ray.cancel(force=True)``): it would otherwise keep its
CPUs and GPUs from every job after it, and a job it lost is sent again at once. When the server stops, the
tasks of its local Ray instance (which ends with it) are ended and their jobs go back to the queue, as an
embedded worker that shuts down releases its job; a cluster's tasks (``ray_address``) run on, and the next
server finds their jobs running.

No secret travels in a task's arguments (Ray keeps them where its state API and logs may show them): the
settings sent (:func:`task_settings`) name the master key's and the pepper's files, and the store's URL
without its password, which the task reads on its node (``SDB_DATABASE_PASSWORD_FILE``, or the node's own
``SDB_DATABASE_URL``); a job's params and its key stay in the store, the task gets the job's id.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import make_url

from ..disclosure import one_line
from ..settings import DATA_DIR_MARK, Settings
from ..store import JOB_DONE, JobRow, Store
from .kinds import StaleJob, stored_params
from .queue import JobQueue
from .worker import pid_alive

log = logging.getLogger("sdb.jobs")


def portable_settings(settings: Settings) -> dict:
    """Settings a process elsewhere can rebuild: every path absolute, the store URL explicit."""
    over = {"data_dir": str(settings.data_dir.resolve()), "database_url": settings.db_url,
            "master_key_file": str(settings.master_key_path.resolve()),
            "pepper_file": str(settings.pepper_path.resolve())}
    return {**settings.model_dump(mode="json"), **over}


def _without_password(url: str) -> str:
    return make_url(url)._replace(password=None).render_as_string(hide_password=False)  # .set(password=None) keeps it


def task_settings(settings: Settings) -> dict:
    """What a Ray task is sent: :func:`portable_settings` with no secret in it. The store's URL goes without its
    password: the task reads it on its node, from the password file (its path, absolute) or, for a URL that
    carries its password, from the node's own ``SDB_DATABASE_URL`` (:func:`node_settings`)."""
    out = portable_settings(settings)
    inline = bool(settings.database_url) and make_url(settings.database_url).password is not None
    file = settings.database_password_file
    out["database_url"] = _without_password(settings.database_url) if settings.database_url else settings.db_url
    out["database_password_file"] = None if inline or file is None else str(file.resolve())
    return out


def node_settings(sent: dict) -> Settings:
    """The settings a task runs on: those sent (:func:`task_settings`), the store's password from this node."""
    url, own = sent.get("database_url"), os.environ.get("SDB_DATABASE_URL")
    if url and own and not sent.get("database_password_file") and make_url(own).password is not None \
            and _without_password(own) == url:
        sent = {**sent, "database_url": own}
    return Settings(**sent)


NOT_SHARED = ("it ran on a Ray node that does not share the server's data dir (the same filesystem at the same "
              "path), where its artifacts would be lost: an admin must mount it there on every Ray node")


def run_task(settings_dict: dict, job_id: str, mark: str | None = None) -> str:
    """The Ray task: claim ``job_id`` and run it; ``skipped`` when it is no longer queued. On a node whose data dir
    is not the server's (``mark``, ``Settings.data_dir_mark``) the job fails, saying so, and nothing is written there."""
    from .runner import execute, prepare_process
    from .worker import end_process, first_to_go, worker_id

    first_to_go()  # a Ray worker process runs jobs as ours do: out of memory, it goes first
    settings = node_settings(settings_dict)
    prepare_process(settings)
    store = Store(settings.db_url)
    try:
        queue = JobQueue(store)
        me = worker_id("ray")
        job = queue.claim(me, job_id=job_id)
        if job is None:
            return "skipped"
        if mark is not None:
            try:
                here = (settings.data_dir / DATA_DIR_MARK).read_text().strip()
            except OSError:
                here = None
            if here != mark:
                log.error("job %s: the data dir %s on this Ray node is not the server's", job_id, settings.data_dir)
                queue.finish(job.id, me, "failed", error=NOT_SHARED, message="failed")
                return "failed"
        return execute(settings, queue, job, me, hard_stop=end_process)  # Ray starts another process
    finally:
        store.close()


# How long the API keeps trying a Ray cluster that does not answer yet: compose starts the API
# beside the Ray head (depends_on waits for the container, not for Ray inside it).
RAY_CONNECT_S = 120.0
RAY_RETRY_S = 2.0  # between two tries of a cluster that does not answer


class RayUnavailable(ValueError):
    """The Ray cluster of SDB_RAY_ADDRESS did not answer within the connect window: one line for the operator."""


def shown_address(address: str) -> str:
    """SDB_RAY_ADDRESS as a message may show it: a user and password in it (``ray://user:pw@host:port``) hidden."""
    scheme, sep, rest = address.rpartition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"


def _port_refused(address: str) -> str | None:
    """Why ``address``'s host:port takes no connection now (refused, no such host), or None when it does or the
    address names none (``auto``). Probed before ``ray.init``, whose own tries take 30 s even on a closed port."""
    host, _, port = address.rpartition("://")[2].rpartition("@")[2].partition("/")[0].rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_RETRY_S).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def start_ray(settings: Settings, connect_s: float | None = None) -> None:
    """Join the Ray cluster of SDB_RAY_ADDRESS, or start a local instance without one. A cluster is tried for
    ``connect_s`` (default :data:`RAY_CONNECT_S`), then :class:`RayUnavailable` names the address (never its
    credentials): an unreachable one ended the server's start in a 90-line traceback."""
    if not settings.ray_address:
        # A local instance serves this host only: Ray reads this switch (at import) to put every
        # address of a single-node instance on 127.0.0.1 instead of the machine's interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if settings.ray_address:
        _join(ray, settings.ray_address, RAY_CONNECT_S if connect_s is None else connect_s)
    else:  # a local instance with one CPU per configured worker, on loopback: it serves this host only
        # "local": a new instance of its own. With no address Ray joins what it finds by itself (RAY_ADDRESS, the
        # last `ray start` head on this host), which is not this server's, and fails there on num_cpus.
        ray.init(address="local", num_cpus=max(settings.workers, 1), include_dashboard=False, log_to_driver=False)
    log.info("jobs run on Ray: %s", ray.get_runtime_context().gcs_address)


def _join(ray, address: str, connect_s: float) -> None:
    shown, deadline = shown_address(address), time.monotonic() + connect_s
    while True:
        why = _port_refused(address)
        if why is None:
            try:
                ray.init(address=address, log_to_driver=False)
                return
            except (ConnectionError, RuntimeError, TimeoutError) as e:
                ray.shutdown()
                why = one_line(e).replace(address, shown)
        if time.monotonic() + RAY_RETRY_S > deadline:
            raise RayUnavailable(f"the Ray cluster at {shown} (SDB_RAY_ADDRESS) did not answer within {connect_s:.0f} s "
                                 f"({why}): start it, or fix SDB_RAY_ADDRESS (unset: a local Ray instance)")
        log.warning("Ray at %s not ready (%s); retrying", shown, why)
        time.sleep(RAY_RETRY_S)


@dataclass
class Sent:
    """A task the dispatcher sent for a job."""

    ref: object  # its ObjectRef
    started_at: float | None  # the job's started_at when it was sent: a later one means a task claimed the job
    ended_at: float | None = None  # when the dispatcher first saw the job ended while this task still ran


def deployed(job: JobRow) -> bool:
    """Whether the job served a model version (:func:`service.store._hold_job_for_deploy` records it)."""
    try:
        return json.loads(job.result or "{}").get("deployed") is True
    except (ValueError, AttributeError):
        return False


class RayDispatcher(threading.Thread):
    def __init__(self, settings: Settings, queue: JobQueue):
        super().__init__(name="sdb-ray-dispatcher", daemon=True)
        self.settings, self.queue = settings, queue
        self.stopped = threading.Event()
        self.inflight: dict[str, Sent] = {}  # job id → the task sent for it
        # A task whose job ended is given this long to return before it is ended.
        self.grace_s = max(settings.job_stale_s, 2 * settings.job_heartbeat_s)
        self.mark: str | None = None  # the data dir's (Settings.data_dir_mark), sent with every task

    def run(self) -> None:
        import ray

        task = ray.remote(run_task)
        sent = task_settings(self.settings)
        self.mark = self.settings.data_dir_mark()
        while not self.stopped.wait(self.settings.job_poll_s):
            try:
                self.poll(ray, task, sent)
            except Exception:
                log.exception("Ray dispatcher; will retry")

    def poll(self, ray, task, sent: dict) -> None:
        """One round: collect the tasks that ended, end those that outlived their job, send the queued jobs."""
        self._collect(ray)
        self._end_stale(ray)
        # Ray's own jobs only, in the store: a thousand others queued first (an embedded backend's, left from
        # before a switch to Ray) filled the page and no Ray job was ever sent.
        for job in self.queue.list(status="queued", backend="ray", limit=1000, oldest_first=True):
            if job.id not in self.inflight:
                self._send(task, sent, job)

    def _collect(self, ray) -> None:
        if not self.inflight:
            return
        refs = [t.ref for t in self.inflight.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for job_id, t in list(self.inflight.items()):
            if t.ref in ready:
                del self.inflight[job_id]
                try:
                    log.info("job %s: Ray task ended %s", job_id, ray.get(t.ref))
                except Exception as e:  # noqa: BLE001  (a crashed task: the reaper ends its job)
                    log.warning("job %s: Ray task failed: %s", job_id, e)

    def _rows(self, ids: list[str]) -> dict[str, JobRow]:
        rows: dict[str, JobRow] = {}
        with self.queue.store.session() as s:
            for i in range(0, len(ids), 500):
                rows.update((r.id, r) for r in s.scalars(select(JobRow).where(JobRow.id.in_(ids[i:i + 500]))))
        return rows

    def _end_stale(self, ray) -> None:
        """End the tasks that no longer hold their job and never will: its job was claimed and is queued again
        (the task hung while the reaper requeued it), or ended (reaped, cancelled, failed) ``grace_s`` ago, or
        deleted. They would keep their resources from the jobs after them, and a requeued job is sent again."""
        if not self.inflight:
            return
        rows = self._rows(list(self.inflight))
        now = time.monotonic()
        for job_id, t in list(self.inflight.items()):
            job = rows.get(job_id)
            if job is None:
                why = "the job is gone"
            elif job.status == "queued" and job.started_at != t.started_at:
                why = "the job was requeued after this task claimed it"
            elif job.status in JOB_DONE:
                t.ended_at = t.ended_at or now
                if now - t.ended_at <= self.grace_s:
                    continue
                why = f"the job ended ({job.status}) {now - t.ended_at:.0f} s ago"
            else:
                continue
            del self.inflight[job_id]
            try:
                ray.cancel(t.ref, force=True)
            except Exception:  # it ended meanwhile
                log.debug("job %s: cancelling its Ray task", job_id, exc_info=True)
            log.warning("job %s: its Ray task is ended: %s", job_id, why)

    def _send(self, task, sent: dict, job: JobRow) -> None:
        """Send one queued job to Ray; one that can no longer run fails here, and one that cannot be sent
        now is logged: neither stops the jobs after it."""
        try:
            _, p = stored_params(job.kind, job.params)
        except StaleJob as e:
            if self.queue.fail_queued(job.id, str(e)):
                log.warning("job %s failed before it was sent to Ray: %s", job.id, e)
            return
        try:
            ref = task.options(num_cpus=p.cpus, num_gpus=p.gpus, max_retries=0).remote(sent, job.id, self.mark)
        except Exception:
            log.exception("job %s: could not be sent to Ray; will retry", job.id)
            return
        self.inflight[job.id] = Sent(ref, job.started_at)
        log.info("job %s sent to Ray (cpus %s, gpus %s)", job.id, p.cpus, p.gpus)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sending. A local Ray instance ends with this process: its tasks are ended first and the jobs they
        ran go back to the queue (as an embedded worker releases its job when it shuts down); a cluster's run on."""
        self.stopped.set()
        self.join(timeout=10)
        if not self.settings.ray_address and self.inflight:
            try:
                self._release_local(timeout)
            except Exception:
                log.exception("Ray dispatcher: releasing the jobs of the local Ray instance")

    def _release_local(self, timeout: float) -> None:
        import ray

        if not ray.is_initialized():
            return
        sent = dict(self.inflight)
        for t in sent.values():
            try:
                ray.cancel(t.ref, force=True)
            except Exception:  # it ended meanwhile
                log.debug("cancelling a Ray task", exc_info=True)
        ray.wait([t.ref for t in sent.values()], num_returns=len(sent), timeout=timeout)
        here = f"ray:{socket.gethostname()}:"
        # A force-cancelled task's process ends, and its raylet reaps it, a moment after ray.wait returns: until then
        # it reads as alive and its job was left running for the reaper (seen once in a full run of the tests).
        settle = time.monotonic() + min(timeout, 5.0)
        for job_id, job in self._rows(list(sent)).items():
            if job.status != "running" or not (job.worker or "").startswith(here):
                continue
            pid = int(job.worker.rsplit(":", 1)[1])
            while pid_alive(pid) and time.monotonic() < settle:
                time.sleep(0.05)
            if pid_alive(pid):  # not ended, or another instance's: the reaper
                continue
            if deployed(job):  # never requeued: another attempt would deploy again (the reaper ends it)
                continue
            if self.queue.release(job_id, job.worker, "requeued: the server stopped, and the Ray task with it"):
                log.info("job %s: back in the queue (the server stops, and its local Ray instance)", job_id)
        self.inflight.clear()
