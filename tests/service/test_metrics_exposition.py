"""What an operator's Prometheus reads from ``/metrics``: every request counted once, under a bounded route, with a
status that says whose fault it was (a client that hung up is its 499, never the server's 500); the error's code;
requests the HTTP protocol refused itself; the job queue and the process; no ``_created`` series.

The real app on a real store under uvicorn with ``sdb serve``'s protocol, the exposition parsed as Prometheus
parses it."""
from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import build_app
from service.auth import create_key, parse_token
from service.http_protocol import MAX_HEAD_BYTES, HttpProtocol
from service.jobs.queue import JobQueue
from tests.client.conftest import ThreadServer

from .conftest import make_settings, sdb_bytes

PREDICT = "/v1/models/{name}/predict"
JOB = {"teacher": {"model": "digits-a"}, "student": "mlp", "data": "digits", "epochs": 1, "transfer": 200}


@pytest.fixture
def server(tmp_path, bundles):
    """``sdb serve``'s app and protocol with digits-a hosted and short client timeouts; ``.admin``: an admin key."""
    settings = make_settings(tmp_path / "data", bundles, register_demo=False, http_head_timeout_s=0.5,
                             http_body_timeout_s=0.5)
    app = build_app(settings)
    srv = ThreadServer(app, http=HttpProtocol.configured(settings), loop="asyncio")
    srv.app = app
    srv.admin, _ = create_key(app.state.store, settings.pepper, scopes=["admin"])
    r = httpx.post(srv.url + "/v1/models", files={"file": ("digits-a.sdb", sdb_bytes(bundles.a))},
                   headers={"Authorization": f"Bearer {srv.admin}"}, timeout=60)
    assert r.status_code == 201, r.text
    yield srv
    srv.stop()


def scrape(srv, admin: bool = True) -> dict:
    """The exposition, parsed: family name → family (``admin``: read with the admin key, else with none)."""
    r = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {srv.admin}"} if admin else {}, timeout=30)
    assert r.status_code == 200, r.text
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(families: dict, name: str, **labels: str) -> list:
    return [s for f in families.values() for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(families: dict, name: str, **labels: str) -> float:
    found = samples(families, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def hang_up_mid_body(port: int, path: str) -> None:
    """A client that sends a request's head and part of its body, then goes away (a client timeout, a cancelled
    upload)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 100000\r\n\r\n{{\"inputs\": [".encode())
        time.sleep(0.2)


def test_a_client_that_hangs_up_mid_body_is_its_499_and_no_server_error(server):
    # a direct route (predict) and a FastAPI one (a key's creation): both were counted as the server's 500 or 400
    for path in ("/v1/models/digits-a/predict", "/v1/keys"):
        hang_up_mid_body(server.port, path)
    time.sleep(0.5)
    m = scrape(server)
    for route in (PREDICT, "/v1/keys"):
        assert value(m, "sdb_requests_total", route=route, status="499") == 1
        assert not [s for s in samples(m, "sdb_requests_total", route=route) if s.labels["status"] != "499"]
        assert not samples(m, "sdb_errors_total", route=route)
    assert not samples(m, "sdb_requests_total", status="500") and not samples(m, "sdb_errors_total", status="500")


def test_a_body_refused_for_its_pauses_is_a_408_on_its_route(server):
    # the protocol answers 408 and the app reads a disconnect: the request is the server's 408, not the client's 499
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/models/digits-a/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
        assert s.recv(1 << 10).startswith(b"HTTP/1.1 408 ")
    time.sleep(0.3)
    m = scrape(server)
    assert value(m, "sdb_requests_total", route=PREDICT, status="408") == 1
    assert value(m, "sdb_errors_by_code_total", route=PREDICT, code="request_timeout") == 1
    assert not samples(m, "sdb_requests_total", status="499")


def test_the_exposition_after_mixed_traffic_and_jobs(server, bundles):
    app, x = server.app, bundles.x[:2].tolist()
    jobs_key, _ = create_key(app.state.store, app.state.settings.pepper, scopes=["jobs", "distill"])
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/v1/models/digits-a/predict", json={"inputs": x}).status_code == 200
        assert c.post("/v1/models/nope/predict", json={"inputs": x}).status_code == 404
        assert c.post("/v2/models/nope/infer", json={"inputs": []}).status_code == 404
        assert c.get("/v1/keys").status_code == 401  # a FastAPI route's error
        for i in range(3):  # made-up paths and methods: never a series of their own
            assert c.get(f"/random/{i}").status_code == 404
            assert c.request(("PROPFIND", "MKCOL", "LOCK")[i], "/v1/models").status_code == 405
        assert c.request("FOO", "/v1/models").status_code == 400  # no HTTP method: refused by the protocol
        for _ in range(2):
            r = c.post("/v1/jobs", json={"kind": "distill", "params": JOB},
                       headers={"Authorization": f"Bearer {jobs_key}"})
            assert r.status_code == 202, r.text
    # a worker takes one (no worker runs here: the other stays queued)
    running = JobQueue(app.state.store).claim("worker:test")
    assert running is not None and running.owner == parse_token(jobs_key)[0]
    # refused by the protocol before the app: a head that takes too long, a head too large
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n")
        assert s.recv(1 << 10).startswith(b"HTTP/1.1 408 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Long: " + b"x" * (2 * MAX_HEAD_BYTES) + b"\r\n\r\n")
        assert s.recv(1 << 10).startswith(b"HTTP/1.1 431 ")

    m = scrape(server)
    types = {name: f.type for name, f in m.items()}
    for name, kind in {"sdb_requests": "counter", "sdb_errors": "counter", "sdb_errors_by_code": "counter",
                       "sdb_request_seconds": "histogram", "sdb_jobs": "gauge",
                       "sdb_jobs_oldest_queued_seconds": "gauge",
                       "sdb_jobs_heartbeat_age_seconds": "gauge", "sdb_job_workers_busy": "gauge",
                       "process_resident_memory_bytes": "gauge", "process_cpu_seconds": "counter",
                       "process_open_fds": "gauge", "python_info": "gauge"}.items():
        assert types.get(name) == kind, (name, types.get(name))

    # the queue, as the store has it: by kind and status, every kind listed (0 when it has none)
    assert value(m, "sdb_jobs", kind="distill", status="queued") == 1
    assert value(m, "sdb_jobs", kind="distill", status="running") == 1
    assert value(m, "sdb_jobs", kind="wrap", status="queued") == 0
    assert {s.labels["status"] for s in samples(m, "sdb_jobs")} == {"queued", "running"}
    assert 0 <= value(m, "sdb_jobs_oldest_queued_seconds") < 60
    assert 0 <= value(m, "sdb_jobs_heartbeat_age_seconds") < 60
    assert value(m, "sdb_job_workers_busy") == 1

    # errors by code: the direct routes', a FastAPI route's, the protocol's own
    assert value(m, "sdb_errors_by_code_total", route=PREDICT, code="model_not_found") == 1
    assert value(m, "sdb_errors_by_code_total", route="/v2/models/{name}/infer", code="model_not_found") == 1
    assert value(m, "sdb_errors_by_code_total", route="/v1/models", code="method_not_allowed") == 3
    assert value(m, "sdb_errors_by_code_total", route="<unmatched>", code="not_found") == 3
    assert value(m, "sdb_errors_by_code_total", route="/v1/keys", code="missing_key") == 1
    assert value(m, "sdb_errors_by_code_total", route="<below_app>", code="request_timeout") == 1
    assert value(m, "sdb_errors_by_code_total", route="<below_app>", code="headers_too_large") == 1
    assert value(m, "sdb_requests_total", route="<below_app>", method="", model="", status="408") == 1
    assert value(m, "sdb_requests_total", route="<below_app>", method="", model="", status="431") == 1
    assert value(m, "sdb_errors_total", route="<below_app>", model="", status="431") == 1
    assert value(m, "sdb_requests_total", route=PREDICT, model="digits-a", status="200") == 1

    # latency buckets reach past SDB_RUN_TIMEOUT_S (30 s)
    bounds = {s.labels["le"] for s in samples(m, "sdb_request_seconds_bucket", route=PREDICT, model="digits-a")}
    assert {"30.0", "60.0", "+Inf"} <= bounds

    # no _created series; labels bounded: templates, known methods, hosted models, the service's own codes
    assert not [s for f in m.values() for s in f.samples if s.name.endswith("_created")]
    templates = set(httpx.get(server.url + "/openapi.json").json()["paths"]) | {"<unmatched>", "<below_app>"}
    for name in ("sdb_requests_total", "sdb_errors_total", "sdb_errors_by_code_total"):
        for s in samples(m, name):
            assert s.labels["route"] in templates, s
            assert s.labels.get("method", "") in {"", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                                                  "OTHER"}, s
            assert s.labels.get("model", "") in {"", "digits-a"}, s
            assert re.fullmatch(r"[a-z_]*", s.labels.get("code", "")), s
    assert value(m, "sdb_requests_total", route="<unmatched>", method="GET", model="", status="404") == 3
    assert value(m, "sdb_requests_total", route="/v1/models", method="OTHER", model="", status="405") == 3
    assert value(m, "sdb_errors_by_code_total", route="<below_app>", code="bad_request") == 1


def test_a_store_that_does_not_answer_is_its_own_code_and_the_scrape_goes_on(server, tmp_path):
    # a store error and a model's timeout were one series, sdb_errors_total{status="503"}
    store, data = server.app.state.store, server.app.state.settings.data_dir
    token, _ = create_key(store, server.app.state.settings.pepper, scopes=["admin"])
    data.rename(tmp_path / "away")  # the SQLite file out of reach: each connection opened now fails
    store.engine.dispose()
    try:
        r = httpx.get(server.url + "/v1/keys", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 503, r.text
        code = r.json()["error"]["code"]
        assert code in {"store_unavailable", "key_store_unavailable"}, r.text
        m = scrape(server, admin=False)  # the admin key cannot be checked: the operator's series are not shown
        assert "sdb_jobs" not in m and "sdb_requests" in m and "process_cpu_seconds" not in m
    finally:
        (tmp_path / "away").rename(data)
        store.engine.dispose()
    assert value(m, "sdb_errors_by_code_total", route="/v1/keys", code=code) == 1
    assert value(scrape(server), "sdb_jobs", kind="distill", status="queued") == 0  # back with the store


def test_a_stalled_store_holds_no_scrape_past_its_wait_and_one_thread_at_most():
    """A frozen database held every scrape (past Prometheus' 10 s timeout: the whole target down) and a thread each."""
    from service.metrics import JOBS_WAIT_S, _JobsInStore

    gate = threading.Event()

    class Frozen:  # a store whose every query waits until the test ends: what a stopped PostgreSQL does
        def session(self):
            gate.wait()
            raise RuntimeError("the store came back too late")

    jobs = _JobsInStore()
    jobs.read_store(lambda: Frozen())
    try:
        for _ in range(3):
            start = time.monotonic()
            assert list(jobs.collect()) == []  # left out, the rest of the exposition goes on
            assert time.monotonic() - start < JOBS_WAIT_S + 2
        assert sum(t.name == "sdb-metrics-jobs" for t in threading.enumerate()) == 1
    finally:
        gate.set()


def test_a_request_refused_before_routing_is_counted_under_its_route_and_model(server):
    """A throttled or oversized predict was ``<unmatched>`` with no model (the route was never reached), so an operator
    could not see which route or model was refused; ``/openapi.json``, a route that leaves no trace in the request,
    was ``<unmatched>`` at 200."""
    limit = server.app.state.settings.max_payload_bytes
    r = httpx.post(server.url + "/v1/models/digits-a/predict", content=b"x" * (limit + 1),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text
    r = httpx.post(server.url + "/v1/models/digits-a/predict?api_key=sdb_x", json={"inputs": []}, timeout=30)
    assert r.status_code == 401, r.text
    assert httpx.get(server.url + "/openapi.json", timeout=30).status_code == 200
    assert httpx.delete(server.url + "/nowhere", timeout=30).status_code == 404
    m = scrape(server)
    assert value(m, "sdb_errors_by_code_total", route=PREDICT, code="payload_too_large") == 1
    assert value(m, "sdb_errors_by_code_total", route=PREDICT, code="key_in_url") == 1
    assert value(m, "sdb_requests_total", route=PREDICT, method="POST", model="digits-a", status="413") == 1
    assert value(m, "sdb_requests_total", route="/openapi.json", method="GET", model="", status="200") == 1
    assert value(m, "sdb_requests_total", route="<unmatched>", method="DELETE", model="", status="404") == 1
