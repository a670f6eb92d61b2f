"""The scale-out path of docker-compose.yml, without Docker: a Ray head started with the compose
file's own command line and Ray settings (ports and the temp dir swapped for free ones here),
the store on PostgreSQL, and ``sdb serve`` with deploy/scale.env's backend and Ray address
(the host swapped for 127.0.0.1). A job submitted through the service runs on that cluster and
reaches ``succeeded`` with its artifacts."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from sdb_client import Client

from .conftest import ROOT, free_port
from .jobs_helpers import QUICK, JobServer, key, prepare


def student_accuracy(weights: Path) -> float:
    """Test accuracy of an ``mlp`` student on digits, as the distill task scores it."""
    from sdb_core.data import load_dataset
    from sdb_core.models import create_model
    from sdb_core.train import accuracy
    from sdb_core.weights import load_weights

    data = load_dataset("digits")
    net = create_model("mlp", num_classes=data.num_classes, in_shape=data.in_shape)
    return accuracy(load_weights(net, weights).eval(), data.test)

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SCALE_ENV = dict(line.split("=", 1) for line in (ROOT / "deploy/scale.env").read_text().splitlines()
                 if line and not line.startswith("#"))
# Ray binds to the machine's outward address unless it believes it is on a laptop; this keeps
# every Ray socket of the test on the loopback interface.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def head_command(ports: dict[str, int], temp_dir: Path) -> list[str]:
    """The ray-head service's entrypoint + command with each ``--*port=N`` given a free port."""
    svc = COMPOSE["services"]["ray-head"]
    out = []
    for arg in [*svc["entrypoint"], *svc["command"]]:
        m = re.fullmatch(r"(--[a-z-]*port)=(\d+)", arg)
        if m:
            ports[m.group(1)] = free_port()
            arg = f"{m.group(1)}={ports[m.group(1)]}"
        out.append(arg)
    out[0] = str(ROOT / ".venv" / "bin" / out[0])
    # Not in the compose file: per-container defaults that would collide on one shared machine.
    return [*out, f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}"]


def ray_env(service: str, token_file: Path) -> dict[str, str]:
    """The service's RAY_* settings from the compose file, the token path pointing at ``token_file``."""
    env = {k: str(v) for k, v in COMPOSE["services"][service]["environment"].items() if k.startswith("RAY_")}
    assert env["RAY_AUTH_TOKEN_PATH"].startswith("/run/secrets/")
    return {**env, "RAY_AUTH_TOKEN_PATH": str(token_file), **LOOPBACK}


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_job_runs_on_a_ray_head_started_as_compose_starts_it(db_url, tmp_path, bundles):
    temp = Path(tempfile.mkdtemp(prefix="sdb-ray-"))  # short: Ray puts Unix sockets under it
    token = temp / "ray_token"
    token.write_text(secrets.token_hex(32) + "\n")
    ports: dict[str, int] = {}
    cmd = head_command(ports, temp / "ray")
    log = tmp_path / "ray-head.log"
    with log.open("w") as f:
        head = subprocess.Popen(cmd, env={**os.environ, **ray_env("ray-head", token)}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = None
    try:
        data = tmp_path / "data"
        settings = prepare(data, bundles, {"digits-a": bundles.a})
        assert settings.db_url == db_url
        address = urlsplit(SCALE_ENV["SDB_RAY_ADDRESS"])  # ray://ray-head:10001
        assert address.port == int(re.search(r"--ray-client-server-port=(\d+)",
                                             " ".join(COMPOSE["services"]["ray-head"]["command"])).group(1))
        local = f"{address.scheme}://127.0.0.1:{ports['--ray-client-server-port']}"
        api = COMPOSE["services"]["api"]
        assert api["command"][api["command"].index("--workers") + 1] == "0"
        # Started beside the head, not after it is up: as compose does (the API waits for Ray).
        server = JobServer(data, bundles, SDB_WORKERS="0", SDB_JOBS_BACKEND=SCALE_ENV["SDB_JOBS_BACKEND"],
                           SDB_RAY_ADDRESS=local, **ray_env("api", token))
        assert head.poll() is None and "Ray runtime started" in log.read_text()
        with Client(server.url, key(settings, ["jobs", "distill"])) as c:
            job = c.jobs.submit("distill", QUICK)
            assert job["backend"] == "ray"
            job = c.jobs.wait(job["id"], timeout=180, poll_s=0.2)
            assert job["status"] == "succeeded", job
            assert job["worker"].startswith("ray:") and job["attempts"] == 1
            assert {a["name"] for a in c.jobs.artifacts(job["id"])} == {"student.safetensors", "report.json",
                                                                        "curves.png"}
            # The accuracy the job reports is the one its shipped student has on the test split.
            student = c.jobs.download(job["id"], "student.safetensors", tmp_path)
            assert job["metrics"]["student_acc"] == pytest.approx(student_accuracy(student), abs=0.01)
            assert "student test accuracy" in c.jobs.logs(job["id"]).text
        # the task ran in the head's worker processes, which log under its temp dir
        assert any((temp / "ray").glob("session_*/logs/worker-*"))
    except BaseException:
        # Ray's own logs explain most failures; keep them beside the test's files.
        shutil.copytree(temp / "ray", tmp_path / "ray-logs", ignore=shutil.ignore_patterns("sockets"),
                        dirs_exist_ok=True, symlinks=True)
        raise
    finally:
        if server is not None:
            server.stop()
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM ``ray start --block``: it stops the processes it started. Then make sure of it,
    within the session this test created for it (never `ray stop`: it ends every Ray here)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait()
