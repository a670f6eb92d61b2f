"""``sdb serve`` and ``sdb worker`` as a supervisor runs them: a stop signal (SIGTERM, SIGINT, SIGHUP) ends them with
status 0 after their teardown (the server's job workers stopped, their jobs back in the queue), readiness says 503
while the server drains, a client that trickles a body holds the shutdown no longer than SDB_SHUTDOWN_TIMEOUT_S;
the server's log lines carry their time, logger and level; a misspelled SDB_* name stops the start; the job workers
import the installed ``service``, not a folder of the working directory's. Real processes on a real store."""
from __future__ import annotations

import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from sdb_client import Client

from service.jobs.queue import JobQueue
from service.settings import OTHER_ENV, Settings, SettingsError, check_env_names
from service.store import Store

from .conftest import Server, run_sdb, sdb_env
from .jobs_helpers import (
    LONG,
    JobServer,
    alive,
    key,
    prepare,
    start_worker,
    stop_worker,
    wait_for,
    worker_pid,
)

ROOT = Path(__file__).resolve().parents[2]


def status_in_store(settings: Settings, job_id: str) -> str:
    """A job's status as the store holds it (the server may be gone)."""
    store = Store(settings.db_url)
    try:
        return JobQueue(store).get(job_id).status
    finally:
        store.close()


def training(c: Client, job_id: str) -> dict:
    return wait_for(lambda: (j := c.jobs.get(job_id))["step"].startswith("wrap epoch") and j, 120, "training")


def exit_status(server: Server, sig: int) -> tuple[int, str]:
    err = Server.stop(server, sig)  # JobServer.stop sends SIGINT
    return server.proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_ends_serve_after_its_workers_put_their_job_back(tmp_path, bundles, servers, sig):
    """uvicorn raised a caught SIGTERM again once it had shut down: serve died of it (143) before it stopped its
    workers, which under an init that forwards the signal to serve alone (tini) were killed with the init, their
    job lost; a SIGHUP killed serve at once (129)."""
    data = tmp_path / "data"
    settings = prepare(data, bundles)
    token = key(settings, ["jobs"])
    server = JobServer(data, bundles, SDB_WORKERS="1")
    servers.append(server)
    with Client(server.url, token) as c:
        job = c.jobs.submit("wrap", LONG)
        pid = worker_pid(settings, training(c, job["id"]))
    status, err = exit_status(server, sig)
    assert status == 0, err[-3000:]
    assert "Application shutdown complete" in err  # the lifespan's teardown ran (the usage write-behind flushed)
    assert not alive(pid)  # stopped, and waited for, before serve exited
    assert status_in_store(settings, job["id"]) == "queued"  # released by its worker, not left to the reaper


def test_readiness_is_503_while_serve_drains_and_every_other_route_answers(tmp_path, bundles, servers):
    drain_s = 6.0
    server = Server(tmp_path / "data", bundles, {"SDB_SHUTDOWN_DRAIN_S": str(drain_s)})
    servers.append(server)
    server.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_for(lambda: httpx.get(server.url + "/readyz", timeout=10).status_code == 503, 10, "/readyz 503")
    ready = httpx.get(server.url + "/v2/health/ready", timeout=10)
    assert ready.status_code == 503 and "stopping" in ready.json()["error"], ready.text
    assert "stopping" in httpx.get(server.url + "/readyz", timeout=10).json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200  # still serving
    assert time.monotonic() - sent < drain_s, "the checks outlasted the drain: the machine is too slow for this test"
    assert server.proc.wait(60) == 0
    assert time.monotonic() - sent >= drain_s


class Trickle(threading.Thread):
    """A client that sends a request's head, then its body a byte every half second, until stopped or cut off."""

    def __init__(self, url: str, path: str):
        super().__init__(daemon=True)
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: sdb\r\nContent-Type: application/json\r\n"
                          "Content-Length: 100000\r\n\r\n{".encode())
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            while not self.stopping.wait(0.5):
                self.sock.sendall(b" ")
        except OSError:
            pass  # the server closed it
        finally:
            self.sock.close()


def trickled_server(tmp_path, bundles, servers, env: dict) -> Server:
    """A server of digits-a with ``env``, and a predict in flight from a client trickling its body until the test
    ends."""
    prepare(tmp_path / "data", bundles, {"digits-a": bundles.a})
    server = Server(tmp_path / "data", bundles, env)
    servers.append(server)
    client = Trickle(server.url, "/v1/models/digits-a/predict")
    client.start()
    servers.append(client)  # stopped at the test's end as the servers are
    # the server's one loop answers this after it has read the head sent before: the request is in flight
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200
    return server


def test_a_trickling_client_holds_the_shutdown_no_longer_than_its_timeout(tmp_path, bundles, servers):
    """uvicorn waits for every connection to close: a client sending its body a byte at a time kept serve up after
    its SIGTERM for as long as it went on."""
    timeout_s = 2.0
    server = trickled_server(tmp_path, bundles, servers, {"SDB_SHUTDOWN_TIMEOUT_S": str(timeout_s)})
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout_s + 20) == 0


def test_a_second_ctrl_c_in_the_drain_stops_at_once(tmp_path, bundles, servers):
    """The docs' "a second Ctrl-C cuts the wait for requests too": in a drain it only ended the drain, and serve
    waited out SDB_SHUTDOWN_TIMEOUT_S for a trickling client before exiting."""
    server = trickled_server(tmp_path, bundles, servers, {"SDB_SHUTDOWN_DRAIN_S": "60", "SDB_SHUTDOWN_TIMEOUT_S": "60"})
    server.proc.send_signal(signal.SIGINT)
    wait_for(lambda: httpx.get(server.url + "/readyz", timeout=10).status_code == 503, 10, "/readyz 503")
    start = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(30) == 0  # not the drain's 60 s, nor the wait's 60 s
    assert time.monotonic() - start < 30
    err = server.proc.stderr.read()
    assert "Application shutdown complete" in err, err[-3000:]  # the teardown ran: the usage write-behind flushed


def test_serve_writes_its_log_lines_formatted_with_no_secret(tmp_path, bundles, servers):
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    token = key(settings, ["distill"])
    server = Server(data, bundles, {"SDB_LOG_LEVEL": "DEBUG"})
    servers.append(server)
    inputs = bundles.x[:2].tolist()
    for headers in ({"Authorization": f"Bearer {token}"}, {"Authorization": f"Bearer {token[:-1]}0"}):
        httpx.post(server.url + "/v1/models/digits-a/distill", json={"inputs": inputs}, headers=headers, timeout=30)
    httpx.get(server.url + f"/v1/models?api_key={token}", timeout=30)
    _, err = exit_status(server, signal.SIGINT)
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert re.search(stamp + r"sdb\.service INFO ready: 1 model\(s\) on ", err, re.MULTILINE), err[-3000:]
    secrets = [token.rsplit("_", 1)[1], bundles.master_key_file.read_text().strip(),
               settings.pepper_path.read_text().strip()]
    assert not [s for s in secrets if s in err]


@pytest.mark.parametrize("command", [("serve",), ("worker",), ("keys", "list")], ids=lambda c: " ".join(c))
def test_a_misspelled_setting_stops_the_command_naming_the_setting(tmp_path, bundles, command):
    """SDB_PUBLIC_PREDCIT=false was ignored without a word: the server started serving predictions to anyone."""
    prepare(tmp_path / "data", bundles)
    p = run_sdb(*command, env={**sdb_env(tmp_path / "data", bundles), "SDB_PUBLIC_PREDCIT": "false"})
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.count("\n") == 1 and "SDB_PUBLIC_PREDCIT (did you mean SDB_PUBLIC_PREDICT?)" in p.stderr


def test_only_a_near_miss_of_a_setting_is_refused(caplog):
    """Kubernetes adds SDB_SERVICE_HOST, SDB_PORT_8000_TCP_ADDR, ... to every pod of a namespace with a Service named
    sdb, and other tools have SDB_* names of their own: refusing them crash-looped a deployment."""
    links = {"SDB_SERVICE_HOST": "10.0.0.1", "SDB_SERVICE_PORT": "8000", "SDB_SERVICE_PORT_HTTP": "8000",
             "SDB_PORT": "tcp://10.0.0.1:8000", "SDB_PORT_8000_TCP": "tcp://10.0.0.1:8000",
             "SDB_PORT_8000_TCP_ADDR": "10.0.0.1", "SDB_PORT_8000_TCP_PORT": "8000", "SDB_PORT_8000_TCP_PROTO": "tcp",
             "SDB_POSTGRES_SERVICE_HOST": "10.0.0.2"}
    with caplog.at_level("WARNING", logger="sdb.service"):
        check_env_names({**links, "SDB_COLORIZE": "1", "SDB_NOTIFY_HOST": "x"})  # another tool's: a warning
    assert "SDB_COLORIZE, SDB_NOTIFY_HOST: not a setting, ignored" in caplog.text
    assert "SERVICE" not in caplog.text and "TCP" not in caplog.text  # service links: not even a warning
    for typo, meant in (("SDB_WROKERS", "SDB_WORKERS"), ("SDB_MASTER_KEY", "SDB_MASTER_KEY_FILE"),
                        ("sdb_log_levle", "SDB_LOG_LEVEL"), ("SDB_GRCP_PORT", "SDB_GRPC_PORT")):  # no host link
        with pytest.raises(SettingsError, match=f"did you mean {meant}"):
            check_env_names({typo: "x"})


def test_a_pod_with_kubernetes_service_links_starts(tmp_path, bundles, servers):
    """A Service named sdb sets SDB_PORT=tcp://... in every pod of its namespace: SDB_PORT is a setting, and its value
    made every command exit 2 and every job worker die at start."""
    links = {"SDB_SERVICE_HOST": "10.0.0.1", "SDB_SERVICE_PORT": "8000", "SDB_PORT": "tcp://10.0.0.1:8000",
             "SDB_PORT_8000_TCP": "tcp://10.0.0.1:8000", "SDB_PORT_8000_TCP_ADDR": "10.0.0.1",
             "SDB_PORT_8000_TCP_PORT": "8000", "SDB_PORT_8000_TCP_PROTO": "tcp"}
    data = tmp_path / "data"
    settings = prepare(data, bundles)
    listed = run_sdb("keys", "list", env={**sdb_env(data, bundles), **links})
    assert listed.returncode == 0 and "Kubernetes service link" in listed.stderr, listed.stderr
    token = key(settings, ["jobs"])
    servers.append(JobServer(data, bundles, SDB_WORKERS="0"))
    worker = start_worker(data, bundles, **links)  # a job worker reads every setting: it died at start
    try:
        with Client(servers[0].url, token) as c:
            job = c.jobs.submit("wrap", LONG)
            wait_for(lambda: c.jobs.get(job["id"])["status"] == "running", 90, "claimed by a worker")
    finally:
        stop_worker(worker)


def test_every_sdb_variable_the_project_reads_is_a_setting_or_a_known_other():
    """The list of other names (service.settings.OTHER_ENV) is what keeps a real name from being refused as a typo."""
    known = {f"SDB_{f.upper()}" for f in Settings.model_fields} | OTHER_ENV
    quoted = re.compile(r"""["'](SDB_[A-Z][A-Z0-9_]*[A-Z0-9])["']""")
    assigned = re.compile(r"""\b(SDB_[A-Z][A-Z0-9_]*[A-Z0-9])(?:=|:\s)""")
    read: dict[str, str] = {}
    for folder in ("service", "sdb_cli", "sdb_core", "clients", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path != Path(__file__):  # this file's typo
                read.update(dict.fromkeys(quoted.findall(path.read_text()), str(path)))
    for path in (ROOT / "Dockerfile", *ROOT.glob("docker-compose*.yml"), *(ROOT / "deploy").glob("*.env")):
        read.update(dict.fromkeys(assigned.findall(path.read_text()), str(path)))
    assert "SDB_WORKER_PARENT_PID" in read and "SDB_DATA_DIR" in read  # the scan sees both kinds
    assert {name: where for name, where in read.items() if name not in known} == {}


def test_job_workers_import_the_installed_service_not_the_working_directorys(tmp_path, bundles, servers,
                                                                             monkeypatch):
    """``python -m`` puts the working directory first on sys.path: started from a folder with a service/ package of
    its own, every worker ran that one, or died at start again and again while every job stayed queued."""
    shadow = tmp_path / "project"
    (shadow / "service").mkdir(parents=True)
    (shadow / "service" / "__init__.py").write_text("raise SystemExit('the working directory\\'s service/ ran')\n")
    monkeypatch.chdir(shadow)  # the server and its workers start here
    data = tmp_path / "data"
    settings = prepare(data, bundles)
    token = key(settings, ["jobs"])
    servers.append(JobServer(data, bundles, SDB_WORKERS="1"))
    with Client(servers[0].url, token) as c:
        job = c.jobs.submit("wrap", LONG)
        wait_for(lambda: c.jobs.get(job["id"])["status"] == "running", 90, "claimed by a worker")


def test_a_server_run_from_a_source_tree_has_workers_of_the_same_code(tmp_path, bundles):
    """``python -m sdb_cli serve`` from a source tree that is not the installed one: its workers, started with ``-P``
    (no working directory on their path), imported the installed service instead, or none at all (every job queued)."""
    import shutil
    import subprocess
    import sys

    from .conftest import free_port

    src = tmp_path / "src"
    for package in ("service", "sdb_core", "sdb_cli"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    marker = tmp_path / "worker-ran-this-tree"
    main = src / "service" / "jobs" / "__main__.py"  # this tree's worker says so, then works as ever
    main.write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n" + main.read_text())
    env = {**sdb_env(tmp_path / "data", bundles, free_port()), "SDB_WORKERS": "1", "SDB_REGISTER_DEMO": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "sdb_cli", "serve"], cwd=src, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 90, "a worker of this tree")
        assert marker.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "no marker"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
