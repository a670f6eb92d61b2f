"""Prometheus metrics, in registries of their own per app (tests build many apps).

Labels are bounded: the route template (never the raw path), the model name only when
that model is hosted, the key *id* for samples served (never the secret), an error's code
(the service's own vocabulary) and a job's kind. Series by key id are shown to admin keys only;
anyone else reads ``sdb_samples`` summed over keys. Every series is listed in docs/deploy.md#metrics.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as WaitedTooLong
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select

from .store import JobRow, Store, db_now

log = logging.getLogger("sdb.service")

# Up to SDB_RUN_TIMEOUT_S (30 s by default) and past it: a request stopped at the timeout is in a bucket of its own.
LATENCY_BUCKETS = (.0005, .001, .002, .004, .008, .016, .032, .064, .128, .256, .512, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                   60.0)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before its answer: counted, never an error
BELOW_APP = "<below_app>"  # the route of a request service.http_protocol refused before the app saw it
ERROR_CODE = "sdb.error_code"  # the scope key whoever answers an error leaves its code under (sdb_errors_by_code)
# The scope key under which the HTTP protocol leaves (status, code) of a request whose body it refused and answered
# itself (a body that paused too long: 408); the app then reads a disconnect, and its answer is dropped.
REFUSED_BODY = "sdb.refused_body"
# The key of the lifespan state (shared with the server's connections) under which the app leaves its
# Metrics.observe_refusal: how the HTTP protocol counts a request it refused before the app saw it.
COUNT_REFUSAL = "sdb.count_refusal"
_ACTIVE_JOBS = ("queued", "running")
JOBS_WAIT_S = 2.0  # how long a scrape waits for the jobs' query: well within Prometheus' 10 s scrape timeout

# Each counter's _created series doubled the exposition and no alert reads it (the process's start time is
# process_start_time_seconds). prometheus_client's switch is process-wide: the service is its only user.
disable_created_metrics()


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sdb_requests", "HTTP requests", ["route", "method", "model", "status"], registry=r)
        self.latency = Histogram("sdb_request_seconds", "HTTP request latency", ["route", "model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("sdb_errors", "HTTP responses with status >= 400 (499, a client that left, is none)",
                              ["route", "model", "status"], registry=r)
        self.error_codes = Counter("sdb_errors_by_code", "HTTP error responses by the error's code "
                                   "(store_unavailable, model_timeout, ...)", ["route", "code"], registry=r)
        # Samples by key id in a registry of their own, rendered for admin keys only; everyone
        # else reads the same counter summed over keys.
        self.by_key = CollectorRegistry(auto_describe=True)
        self.samples = Counter("sdb_samples", "Samples served", ["model", "kind", "key_id"], registry=self.by_key)
        self.by_model = CollectorRegistry(auto_describe=True)
        self.by_model.register(_SummedOverKeys(self.samples))
        self.batch_requests = Histogram("sdb_batch_requests", "Requests merged into one ONNX Runtime call",
                                        ["model"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_samples = Histogram("sdb_batch_samples", "Samples in one ONNX Runtime call", ["model"],
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.models = Gauge("sdb_models_loaded", "Model versions being served", registry=r)
        # SDB_MODEL_CACHE_MB at work: the versions held in ONNX Runtime now, and how often one was loaded again
        self.bundles = Gauge("sdb_model_bundles_in_memory", "Model versions loaded in ONNX Runtime (the cache)",
                             registry=r)
        self.reloads = Gauge("sdb_model_reloads", "Versions loaded again after the cache unloaded them", registry=r)
        # What an operator alerts on and nobody else reads (the interpreter's version, memory, the job queue of
        # every tenant): rendered for admin keys only, as the series by key id are.
        self.operator = CollectorRegistry(auto_describe=True)
        self.jobs = _JobsInStore()
        self.operator.register(self.jobs)
        ProcessCollector(registry=self.operator)  # memory, CPU, open files against their limit, start time
        PlatformCollector(registry=self.operator)  # python_info: the interpreter's version
        # Each series once looked up: as bounded as the labels themselves (templates, hosted models, key ids, codes).
        # A model's go with its name (forget): else the series of every name ever deployed piled up, removed or not.
        self._request_series: dict[tuple, tuple] = {}
        self._code_series: dict[tuple, Any] = {}
        self._sample_series: dict[tuple, Any] = {}
        self._batch_series: dict[tuple, tuple] = {}
        self.hosted: Callable[[str], bool] = lambda model: True  # the app's ModelHost.__contains__, once it has one
        self._lock = threading.Lock()  # a model's series made (on first use) or forgotten, one at a time

    def observe_request(self, route: str, method: str, model: str, status: int, seconds: float,
                        code: str = "") -> None:
        """One request answered (``code``: its error's, when it was one)."""
        series = self._request_series.get((route, method, model, status))
        if series is None:  # prometheus_client's labels() checks and locks: ~1 µs a call, 3 calls a request
            series = self._first_use(self._request_series, (route, method, model, status), 2, self._request_labels)
        series[0].inc()
        series[1].observe(seconds)
        if series[2] is not None:
            series[2].inc()
            self._count_code(route, code)

    def observe_refusal(self, status: int, code: str) -> None:
        """A request the HTTP protocol answered itself (a slow client's 408, a 431, ...): counted under the route
        :data:`BELOW_APP`, with no method, model or latency (its head may not even have arrived)."""
        series = self._request_series.get((BELOW_APP, "", "", status))
        if series is None:
            series = self._first_use(self._request_series, (BELOW_APP, "", "", status), 2, self._refusal_labels)
        series[0].inc()
        series[2].inc()
        self._count_code(BELOW_APP, code)

    def _count_code(self, route: str, code: str) -> None:
        series = self._code_series.get((route, code))
        if series is None:
            series = self._code_series[route, code] = self.error_codes.labels(route, code)
        series.inc()

    def count_samples(self, model: str, kind: str, key_id: str, samples: int) -> None:
        series = self._sample_series.get((model, kind, key_id))
        if series is None:
            series = self._first_use(self._sample_series, (model, kind, key_id), 0, self.samples.labels)
        series.inc(samples)

    def observe_batch(self, model: str, requests: int, samples: int) -> None:
        series = self._batch_series.get((model,))
        if series is None:
            series = self._first_use(self._batch_series, (model,), 0, lambda m: (
                self.batch_requests.labels(m), self.batch_samples.labels(m)))
        series[0].observe(requests)
        series[1].observe(samples)

    def _first_use(self, cache: dict[tuple, Any], key: tuple, at: int, make: Callable[..., Any]) -> Any:
        """The series of ``key`` (its model label at ``at``), made and cached on its first use. A model no longer
        hosted is counted under the empty one, as the middleware labels it: a request answered as its name was
        removed (a batch in flight, its samples) would make the name's series again after :meth:`forget`, for good."""
        with self._lock:
            if key[at] and not self.hosted(key[at]):
                key = (*key[:at], "", *key[at + 1:])
            series = cache.get(key)
            if series is None:
                series = cache[key] = make(*key)
            return series

    def _request_labels(self, route: str, method: str, model: str, status: int) -> tuple:
        error = status >= 400 and status != CLIENT_CLOSED_REQUEST
        return (self.requests.labels(route, method, model, str(status)), self.latency.labels(route, model),
                self.errors.labels(route, model, str(status)) if error else None)

    def _refusal_labels(self, route: str, method: str, model: str, status: int) -> tuple:
        return (self.requests.labels(route, method, model, str(status)), None,
                self.errors.labels(route, model, str(status)))

    def forget(self, model: str) -> None:
        """``model``'s name is deployed no more (its last version removed): every series that names it goes, from
        every registry and from the caches, so that names deployed and removed do not pile up series (memory, scrape
        time) nor stay readable. Each series is removed once, by its labels: the older prometheus_client that
        pyproject allows raises KeyError for a series not there."""
        with self._lock:
            latency, errors = set(), set()
            for key in [k for k in self._request_series if k[2] == model]:
                route, method, _, status = key
                _, timed, counted = self._request_series.pop(key)
                self.requests.remove(route, method, model, str(status))
                if timed is not None:
                    latency.add(route)
                if counted is not None:
                    errors.add((route, str(status)))
            for route in latency:
                self.latency.remove(route, model)
            for route, status in errors:
                self.errors.remove(route, model, status)
            for key in [k for k in self._sample_series if k[0] == model]:
                del self._sample_series[key]
                self.samples.remove(*key)
            if self._batch_series.pop((model,), None) is not None:
                self.batch_requests.remove(model)
                self.batch_samples.remove(model)

    def render(self, per_key: bool = False) -> bytes:
        """The exposition; ``per_key`` (an admin key) adds the series by key id, the process's and the jobs'. Reads
        the store (the jobs, waited on for JOBS_WAIT_S at most): called off the event loop."""
        if per_key:
            return generate_latest(self.registry) + generate_latest(self.by_key) + generate_latest(self.operator)
        return generate_latest(self.registry) + generate_latest(self.by_model)


class _SummedOverKeys:
    """``sdb_samples`` without its ``key_id`` label: what a caller without an admin key reads."""

    def __init__(self, counter: Counter):
        self.counter = counter

    def describe(self) -> list:
        return [CounterMetricFamily("sdb_samples", "Samples served", labels=["model", "kind"])]

    def collect(self):
        sums: dict[tuple[str, str], float] = defaultdict(float)
        for family in self.counter.collect():
            for s in family.samples:
                if s.name == "sdb_samples_total":
                    sums[s.labels["model"], s.labels["kind"]] += s.value
        total = CounterMetricFamily("sdb_samples", "Samples served", labels=["model", "kind"])
        for (model, kind), value in sorted(sums.items()):
            total.add_metric([model, kind], value)
        yield total


class _JobsInStore:
    """The job queue as the store has it at scrape time: every server process on a store reads the same rows (take
    their ``max``, not their sum). Workers write nothing of their own but the heartbeats of the jobs they run, so
    an idle worker is not seen; a queue that waits (``sdb_jobs_oldest_queued_seconds``) says none takes jobs."""

    def __init__(self) -> None:
        self.store_of: Callable[[], Store | None] = lambda: None  # the app's store, once it has one (read_store)
        self._reading: Future | None = None  # the query in flight: one at a time, however many scrapes wait on it
        self._lock = threading.Lock()

    def read_store(self, store_of: Callable[[], Store | None]) -> None:
        self.store_of = store_of

    def describe(self) -> list:
        return list(_job_families())

    def collect(self):
        store = self.store_of()
        if store is None:  # not started yet: no series rather than zeros that are not true
            return
        try:
            groups, running, now = self._read(store).result(timeout=JOBS_WAIT_S)
        except WaitedTooLong:  # a stalled store held every scrape past Prometheus' timeout, the whole target down
            log.warning("metrics: the store did not answer the jobs' query in %g s: their series are left out",
                        JOBS_WAIT_S)
            return
        except Exception as e:  # noqa: BLE001 - a store that does not answer must not take the other series with it
            log.warning("metrics: the jobs could not be read from the store: %s", " ".join(str(e).split())[:300])
            return
        from .jobs.kinds import KINDS  # the registry of kinds (imported with the app's job routes already)

        count, oldest, silent, busy = _job_families()
        for kind in sorted(set(KINDS.names()) | {kind for kind, _ in groups}):  # every kind, 0 when it has none
            for status in _ACTIVE_JOBS:
                count.add_metric([kind, status], groups.get((kind, status), (0, None))[0])
        queued_since = min((first for (_, status), (_, first) in groups.items() if status == "queued"), default=None)
        oldest.add_metric([], max(0.0, time.time() - queued_since) if queued_since is not None else 0.0)
        workers, heartbeat = running
        silent.add_metric([], max(0.0, now - heartbeat) if heartbeat is not None else 0.0)
        busy.add_metric([], workers)
        yield from (count, oldest, silent, busy)


    def _read(self, store: Store) -> Future:
        """The jobs' query, on a daemon thread of its own (a process that exits never waits on a stalled store),
        started when none is in flight: scrapes that come while one waits share it, one thread at most."""
        with self._lock:
            if self._reading is None or self._reading.done():
                reading: Future = Future()

                def run() -> None:
                    try:
                        reading.set_result(_active_jobs(store))
                    except BaseException as e:  # noqa: BLE001 - handed to whoever waits on it
                        reading.set_exception(e)

                self._reading = reading
                threading.Thread(target=run, name="sdb-metrics-jobs", daemon=True).start()
            return self._reading


def _job_families() -> tuple[GaugeMetricFamily, ...]:
    return (GaugeMetricFamily("sdb_jobs", "Jobs queued or running, by kind", labels=["kind", "status"]),
            GaugeMetricFamily("sdb_jobs_oldest_queued_seconds",
                              "Age of the oldest queued job (0: none queued): how long the queue has waited"),
            GaugeMetricFamily("sdb_jobs_heartbeat_age_seconds", "Seconds since the least recent heartbeat of a "
                              "running job (0: none running); past SDB_JOB_STALE_S its job is reaped"),
            GaugeMetricFamily("sdb_job_workers_busy", "Workers running a job"))


def _active_jobs(store: Store) -> tuple[dict[tuple[str, str], tuple[int, float]], tuple[int, float | None], float]:
    """The queued and running jobs: (kind, status) → (how many, the oldest's submission time); the workers running
    one and the least recent heartbeat among them; the database's clock now (which stamps heartbeats)."""
    with store.session() as s:
        groups = {(kind, status): (n, first) for kind, status, n, first in s.execute(
            select(JobRow.kind, JobRow.status, func.count(), func.min(JobRow.created_at))
            .where(JobRow.status.in_(_ACTIVE_JOBS)).group_by(JobRow.kind, JobRow.status))}
        workers, heartbeat, now = s.execute(
            select(func.count(JobRow.worker.distinct()), func.min(JobRow.heartbeat_at), db_now())
            .where(JobRow.status == "running")).one()
    return groups, (workers, heartbeat), now
