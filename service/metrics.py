"""Prometheus metrics, in a registry of their own per app (tests build many apps).

Labels are bounded: the route template (never the raw path), the model name only when
that model is hosted, and the key *id* for samples served (never the secret).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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
        self.samples = Counter("sdb_samples", "Samples served", ["model", "kind", "key_id"], registry=r)
        self.batch_requests = Histogram("sdb_batch_requests", "Requests merged into one ONNX Runtime call",
                                        ["model"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_samples = Histogram("sdb_batch_samples", "Samples in one ONNX Runtime call", ["model"],
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.models = Gauge("sdb_models_loaded", "Model versions being served", registry=r)

    def observe_request(self, route: str, method: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, model, str(status)).inc()
        self.latency.labels(route, model).observe(seconds)
        if status >= 400:
            self.errors.labels(route, model, str(status)).inc()

    def observe_batch(self, model: str, requests: int, samples: int) -> None:
        self.batch_requests.labels(model).observe(requests)
        self.batch_samples.labels(model).observe(samples)

    def render(self) -> bytes:
        return generate_latest(self.registry)
