"""The jobs methods against DESIGN.md's contract, served by the scripted stub over real HTTP.

The same happy paths against the real routes and real workers are in test_jobs_service.
"""
from __future__ import annotations

import json

import pytest
from sdb_client import AsyncClient, Client, JobLogs

from .conftest import Reply

KEY = "sdb_0123456789ab_" + "d" * 64


def script(stub) -> None:
    stub.on("POST", "/v1/jobs", Reply(202, {"id": "j1", "kind": "distill", "status": "queued"}))
    stub.on("GET", "/v1/jobs", Reply(200, {"jobs": [{"id": "j1", "status": "queued"}]}))
    stub.on("GET", "/v1/jobs/j1", Reply(200, {"id": "j1", "status": "queued"}),
            Reply(200, {"id": "j1", "status": "running", "progress": 0.5}),
            Reply(200, {"id": "j1", "status": "succeeded", "metrics": {"acc": 90.0}}))
    stub.on("POST", "/v1/jobs/j1/cancel", Reply(200, {"id": "j1", "status": "cancelled"}))
    stub.on("DELETE", "/v1/jobs/j1", Reply(200, {"id": "j1", "deleted": True}))
    stub.on("GET", "/v1/jobs/j1/logs", Reply(200, {"text": "epoch 1\nepoch 2\n", "next_offset": 16}))
    stub.on("GET", "/v1/jobs/j1/artifacts", Reply(200, {"artifacts": [{"name": "student.safetensors", "size": 4}]}))
    stub.on("GET", "/v1/jobs/j1/artifacts/student.safetensors", Reply(200, b"\x00\x01\x02\x03"))


def test_jobs_contract_sync(stub, tmp_path):
    script(stub)
    with Client(stub.url, KEY) as c:
        job = c.jobs.submit("distill", {"student": "mlp", "data": "digits"})
        assert job["id"] == "j1"
        _, body = stub.seen[("POST", "/v1/jobs")][0]
        assert json.loads(body) == {"kind": "distill", "params": {"student": "mlp", "data": "digits"}}
        assert c.jobs.list(status="queued", kind=None) == [{"id": "j1", "status": "queued"}]
        done = c.jobs.wait("j1", poll_s=0.01, timeout=10)
        assert done["status"] == "succeeded" and stub.hits[("GET", "/v1/jobs/j1")] == 3
        assert c.jobs.get("j1")["status"] == "succeeded"
        assert c.jobs.cancel("j1")["status"] == "cancelled"
        assert c.jobs.delete("j1") == {"id": "j1", "deleted": True}
        assert c.jobs.logs("j1", offset=3) == JobLogs("epoch 1\nepoch 2\n", 16)
        headers, _ = stub.seen[("GET", "/v1/jobs/j1/logs")][0]
        assert headers[":query"] == "offset=3"
        assert c.jobs.artifacts("j1")[0]["name"] == "student.safetensors"
        path = c.jobs.download("j1", "student.safetensors", tmp_path)
        assert path == tmp_path / "student.safetensors" and path.read_bytes() == b"\x00\x01\x02\x03"


def test_jobs_wait_times_out(stub):
    stub.on("GET", "/v1/jobs/j1", Reply(200, {"id": "j1", "status": "running"}))
    with Client(stub.url, KEY) as c, pytest.raises(TimeoutError, match="running"):
        c.jobs.wait("j1", poll_s=0.01, timeout=0.1)


@pytest.mark.anyio
async def test_jobs_contract_async(stub, tmp_path):
    script(stub)
    stub.on("GET", "/v1/jobs/j1/logs", Reply(200, b"plain line\n", {"content-type": "text/plain",
                                                                      "x-next-offset": "11"}))
    async with AsyncClient(stub.url, KEY) as c:
        assert (await c.jobs.submit("audit"))["id"] == "j1"
        assert len(await c.jobs.list()) == 1
        assert (await c.jobs.wait("j1", poll_s=0.01))["status"] == "succeeded"
        assert (await c.jobs.get("j1"))["status"] == "succeeded"
        assert (await c.jobs.cancel("j1"))["status"] == "cancelled"
        assert (await c.jobs.delete("j1"))["deleted"] is True
        assert await c.jobs.logs("j1", offset=0) == JobLogs("plain line\n", 11)
        assert len(await c.jobs.artifacts("j1")) == 1
        out = await c.jobs.download("j1", "student.safetensors", tmp_path / "s.bin")
        assert out.read_bytes() == b"\x00\x01\x02\x03"
