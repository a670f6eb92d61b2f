"""Prometheus metrics, in registries of their own per app (tests build many apps).

Labels are bounded: the route template (never the raw path), the model name only when
that model is hosted, and the key *id* for samples served (never the secret). Series by key
id are shown to admin keys only; anyone else reads ``sdb_samples`` summed over keys.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (.0005, .001, .002, .004, .008, .016, .032, .064, .128, .256, .512, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sdb_requests", "HTTP requests", ["route", "method", "model", "status"], registry=r)
        self.latency = Histogram("sdb_request_seconds", "HTTP request latency", ["route", "model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("sdb_errors", "HTTP responses with status >= 400", ["route", "model", "status"],
                              registry=r)
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
        # Each series once looked up: as bounded as the labels themselves (templates, hosted models, key ids)
        self._request_series: dict[tuple, tuple] = {}
        self._sample_series: dict[tuple, Any] = {}

    def observe_request(self, route: str, method: str, model: str, status: int, seconds: float) -> None:
        series = self._request_series.get((route, method, model, status))
        if series is None:  # prometheus_client's labels() checks and locks: ~1 µs a call, 3 calls a request
            series = self._request_series[route, method, model, status] = (
                self.requests.labels(route, method, model, str(status)), self.latency.labels(route, model),
                self.errors.labels(route, model, str(status)) if status >= 400 else None)
        series[0].inc()
        series[1].observe(seconds)
        if series[2] is not None:
            series[2].inc()

    def count_samples(self, model: str, kind: str, key_id: str, samples: int) -> None:
        series = self._sample_series.get((model, kind, key_id))
        if series is None:
            series = self._sample_series[model, kind, key_id] = self.samples.labels(model, kind, key_id)
        series.inc(samples)

    def observe_batch(self, model: str, requests: int, samples: int) -> None:
        self.batch_requests.labels(model).observe(requests)
        self.batch_samples.labels(model).observe(samples)

    def render(self, per_key: bool = False) -> bytes:
        """The exposition; ``per_key`` (an admin key) adds the series by key id."""
        return generate_latest(self.registry) + generate_latest(self.by_key if per_key else self.by_model)


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
