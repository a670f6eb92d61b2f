"""``sdb serve`` on a Ray cluster that does not answer: one line naming SDB_RAY_ADDRESS (never its credentials), exit 2,
and no "serving on" (nothing listens).

Before the fix the server printed "serving on ..." at once, then tried the cluster for 120 s from its lifespan (each of
Ray's own tries 30 s on a closed port) while nothing listened, and ended in uvicorn's 90-line "Application startup
failed" traceback, exit 3. The cluster is really unreachable: a port nothing listens on. The connect window (kept: a
Ray head started beside the server in compose needs it) is shortened for the test.
"""
from __future__ import annotations

import time

from sdb_cli.main import main
from service.jobs import ray_backend

from .conftest import free_port


def test_serve_on_an_unreachable_ray_cluster_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    for k in ("SDB_DATABASE_URL", "SDB_MASTER_KEY_FILE", "SDB_PEPPER_FILE"):
        monkeypatch.delenv(k, raising=False)
    address = f"ray://admin:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("SDB_JOBS_BACKEND", "ray")
    monkeypatch.setenv("SDB_RAY_ADDRESS", address)
    monkeypatch.setenv("SDB_SECRETS_DIR", str(tmp_path / "secrets"))
    monkeypatch.setattr(ray_backend, "RAY_CONNECT_S", 3.0)
    t0 = time.monotonic()
    rc = main(["serve", "--data-dir", str(tmp_path / "data"), "--port", str(free_port())])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert took < 8, f"{took:.1f} s"
    lines = [line for line in err.splitlines() if line.startswith("sdb:")]
    assert len(lines) == 1 and "SDB_RAY_ADDRESS" in lines[0], err
    assert "ray://***@127.0.0.1" in lines[0] and "hunter2" not in err, err
    assert "serving on" not in err and "Traceback" not in err, err
