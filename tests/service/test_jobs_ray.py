"""The same distill job through the Ray backend (a local Ray instance the server starts):
same routes, same store, same final state and artifacts as on an embedded worker."""
from __future__ import annotations

import os
import subprocess
import sys

from sdb_client import Client

from .jobs_helpers import QUICK, JobServer, key, prepare, wait_for


def test_distill_on_ray_reaches_the_same_state_and_artifacts(tmp_path, bundles):
    data = tmp_path / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    token = key(settings, ["jobs", "distill"])
    server = JobServer(data, bundles, SDB_JOBS_BACKEND="ray", SDB_WORKERS="1")
    try:
        with Client(server.url, token) as c:
            job = c.jobs.submit("distill", QUICK)
            assert job["backend"] == "ray"
            job = c.jobs.wait(job["id"], timeout=120, poll_s=0.2)
            assert job["status"] == "succeeded", job
            assert job["worker"].startswith("ray:") and job["attempts"] == 1 and job["progress"] == 1.0
            assert "student_acc" in job["metrics"]
            assert {a["name"] for a in c.jobs.artifacts(job["id"])} == {"student.safetensors", "report.json",
                                                                        "curves.png"}
            assert c.jobs.download(job["id"], "student.safetensors", tmp_path).stat().st_size > 0
            assert "student test accuracy" in c.jobs.logs(job["id"]).text
            # cancel through the same route: a queued-then-running Ray job ends cancelled
            long = c.jobs.submit("distill", {**QUICK, "epochs": 1000, "transfer": 0})
            wait_for(lambda: c.jobs.get(long["id"])["step"].startswith("distill epoch"), 60, "training on Ray")
            c.jobs.cancel(long["id"])
            assert c.jobs.wait(long["id"], timeout=10, poll_s=0.2)["status"] == "cancelled"
    finally:
        server.stop()


def test_the_local_ray_instance_listens_on_loopback_only(tmp_path):
    # The embedded Ray instance serves this host: its addresses must not be the machine's interface.
    # As in sdb serve: ray is first imported by start_ray. With no SDB_RAY_ADDRESS it is a new instance of
    # its own, whatever cluster Ray would find by itself (RAY_ADDRESS here; a `ray start` head on the host).
    code = ("from service.jobs.ray_backend import start_ray\nfrom service.settings import Settings\n"
            f"start_ray(Settings(data_dir={str(tmp_path)!r}, workers=1))\nimport ray\n"
            "print(ray.get_runtime_context().gcs_address, ray.nodes()[0]['NodeManagerAddress'])\nray.shutdown()\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_ADDRESS": "127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    gcs, node = out.stdout.split()
    assert gcs.startswith("127.0.0.1:") and node == "127.0.0.1"
