"""The SDK's jobs methods against the real routes and a real ``sdb worker`` process on the
served data dir: submit, wait, logs, artifacts and download, sync and async, and an
idempotent resubmission."""
from __future__ import annotations

import pytest
from sdb_client import AsyncClient, Client

from sdb_cli.main import main
from tests.service.jobs_helpers import start_worker, stop_worker

from .conftest import MODEL

PARAMS = {"teacher": {"model": MODEL}, "student": "mlp", "data": "digits", "epochs": 1, "transfer": 200}


@pytest.fixture(scope="module")
def worker(sdb_server):
    data_dir = sdb_server.app.state.settings.data_dir
    p = start_worker(data_dir, sdb_server.bundles)
    yield p
    stop_worker(p)


def test_jobs_happy_path_sync(sdb_server, worker, tmp_path, capsys):
    token = sdb_server.key(("jobs", "distill"), models=[MODEL])
    with Client(sdb_server.url, token) as c:
        job = c.jobs.submit("distill", PARAMS, idempotency_key="sdk-1")
        assert job["status"] == "queued" and job["kind"] == "distill"
        assert c.jobs.submit("distill", PARAMS, idempotency_key="sdk-1")["id"] == job["id"]
        done = c.jobs.wait(job["id"], timeout=90, poll_s=0.2)
        assert done["status"] == "succeeded", done
        assert [j["id"] for j in c.jobs.list(kind="distill")] == [job["id"]]
        logs = c.jobs.logs(job["id"])
        # the offset counts the log's own bytes; an owner's text is shorter where it hides the worker's host
        assert "student test accuracy" in logs.text and logs.offset >= len(logs.text.encode())
        assert "worker:…" in logs.text
        assert c.jobs.logs(job["id"], offset=logs.offset).text == ""
        names = sorted(a["name"] for a in c.jobs.artifacts(job["id"]))
        assert names == ["curves.png", "report.json", "student.safetensors"]
        for n in names:
            assert c.jobs.download(job["id"], n, tmp_path).stat().st_size > 0
    # the same from the command line: a remote user without admin had no way to fetch a student but the API
    cli = ["--url", sdb_server.url, "--api-key", token]
    assert main(["jobs", "artifacts", job["id"], *cli]) == 0
    listed = capsys.readouterr().out.split()
    assert listed[0::2] == names and all(int(size) > 0 for size in listed[1::2])
    out = tmp_path / "cli"
    assert main(["jobs", "download", job["id"], *cli, "--out", f"{out}/"]) == 0
    assert sorted(p.name for p in out.iterdir()) == names
    assert (out / "report.json").read_bytes() == (tmp_path / "report.json").read_bytes()
    assert main(["jobs", "download", job["id"], "student.safetensors", *cli, "--out", str(tmp_path / "s.st")]) == 0
    assert (tmp_path / "s.st").read_bytes() == (tmp_path / "student.safetensors").read_bytes()
    assert token not in capsys.readouterr().out


@pytest.mark.anyio
async def test_jobs_happy_path_async(sdb_server, worker, tmp_path):
    token = sdb_server.key(("jobs", "distill"), models=[MODEL])
    async with AsyncClient(sdb_server.url, token) as c:
        job = await c.jobs.submit("distill", PARAMS)
        done = await c.jobs.wait(job["id"], timeout=90, poll_s=0.2)
        assert done["status"] == "succeeded", done
        assert "student test accuracy" in (await c.jobs.logs(job["id"])).text
        out = await c.jobs.download(job["id"], "student.safetensors", tmp_path / "s.safetensors")
        assert out.stat().st_size > 0
