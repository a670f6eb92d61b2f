"""A job's memory has no bound but the machine's: a `jobs` key can submit a wrap of a large network, or upload an
ONNX teacher whose graph builds huge tensors. Out of memory, Linux kills the process its score picks, by size; that
could be the API server (every tenant's models) or the store beside it. Every job worker marks itself first to go
(``oom_score_adj`` 1000; ``service.jobs.worker.first_to_go``), so the kernel takes the worker: the reaper ends its
job as ``worker lost`` and the pool starts another. Before the fix, workers had the server's score (0)."""
from __future__ import annotations

import time
from pathlib import Path

from tests.service.conftest import Server
from tests.service.jobs_helpers import prepare, start_worker, stop_worker


def _score(pid: int) -> str:
    return Path(f"/proc/{pid}/oom_score_adj").read_text().strip()


def test_a_worker_is_the_first_process_killed_out_of_memory_and_the_server_is_not(tmp_path, bundles):
    data = tmp_path / "data"
    prepare(data, bundles)
    server = Server(data, bundles, {"SDB_WORKERS": "0", "SDB_REGISTER_DEMO": "false"})
    worker = start_worker(data, bundles)
    try:
        deadline = time.monotonic() + 60  # the worker sets it first thing, once its imports are done
        while _score(worker.pid) != "1000" and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
        assert _score(worker.pid) == "1000"
        # the API process keeps the score it was started with (this one's; 0 on most machines)
        assert _score(server.proc.pid) == Path("/proc/self/oom_score_adj").read_text().strip() != "1000"
    finally:
        stop_worker(worker)
        server.stop()
