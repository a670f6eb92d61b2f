"""The embedded pool's GPU slots (SDB_WORKER_GPUS): at most that many GPU jobs at once, each worker
alone on its device, the others on the CPU (no CUDA device visible to them).

Checked on CPU machines by the environment each worker process is given: a worker's
CUDA_VISIBLE_DEVICES is what its torch sees, and "" means no CUDA at all.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from service.jobs.worker import DEFER_ENV, gpu_slots, visible_gpus

from .jobs_helpers import JobServer, prepare, wait_for


@pytest.mark.parametrize(("workers", "gpus", "devices", "slots"), [
    (3, None, ["0", "1"], ["0", "1", ""]),  # default: one GPU job per device
    (3, 1, ["0", "1"], ["0", "", ""]),
    (2, 4, ["0", "1", "2"], ["0", "1"]),  # never more GPU workers than workers
    (2, 3, ["7"], ["7", ""]),  # nor than devices
    (2, None, [], ["", ""]),  # a CPU machine
    (2, 0, ["0"], ["", ""]),  # GPUs there, none for jobs
])
def test_slots_give_at_most_n_workers_one_device_each(workers, gpus, devices, slots):
    assert gpu_slots(workers, gpus, devices) == slots


def test_visible_devices_follow_cuda_visible_devices_when_set():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_gpus({"PATH": "/nonexistent"}) == []  # no nvidia-smi: no GPU


def _children_devices(pid: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each child process of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid:
                continue
            env = dict(v.split("=", 1) for v in (stat.parent / "environ").read_bytes().decode().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue
        out.append(env.get("CUDA_VISIBLE_DEVICES", "<unset>") + ("+defers" if env.get(DEFER_ENV) == "1" else ""))
    return sorted(out)


# A worker without a GPU beside GPU workers leaves a new job to them for a few polls ("+defers"): it took one as
# often as they did, and ran it on the CPU while a GPU sat idle.
@pytest.mark.parametrize(("gpus", "expected"), [(None, ["+defers", "3", "5"]), ("1", ["+defers", "+defers", "3"]),
                                                ("0", ["", "", ""])])
def test_sdb_serve_pins_its_workers_to_their_devices(tmp_path, bundles, gpus, expected):
    data = tmp_path / "data"
    prepare(data, bundles)
    env = {"SDB_WORKERS": "3", "CUDA_VISIBLE_DEVICES": "3,5", **({"SDB_WORKER_GPUS": gpus} if gpus else {})}
    server = JobServer(data, bundles, **env)
    try:
        assert wait_for(lambda: len(_children_devices(server.proc.pid)) == 3, 30, "three workers")
        assert _children_devices(server.proc.pid) == expected
    finally:
        log = server.stop()
    on_gpu = [d for d in expected if d and d != "+defers"]
    if on_gpu:
        assert f"GPU jobs at most {len(on_gpu)} at once (devices {','.join(on_gpu)})" in log
