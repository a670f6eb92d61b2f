"""benchmarks/gpu.py on the CPU at toy sizes (--tiny): every recipe runs, a CPU run and a CUDA run merge
into the results file's shape, and the pytest counts are read from what pytest prints."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gpu import RECIPES, main, pytest_counts, run_suite  # benchmarks/ is on sys.path: see conftest.py

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu") / "cpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_recipe_runs_at_toy_sizes_on_the_cpu(cpu_run):
    assert cpu_run["device"] == "cpu" and cpu_run["tiny"] is True and cpu_run["tests"] == {}
    assert set(cpu_run["seconds"]) == set(RECIPES)
    # A toy wrap may be refused by its self-check; nothing may fail.
    assert {r: s for r, s in cpu_run["status"].items() if s not in ("ok", "refused")} == {}
    assert all(s > 0 for s in cpu_run["seconds"].values())


def test_a_cpu_run_and_a_cuda_run_merge_into_the_results_file(cpu_run, tmp_path, capsys):
    gpu = {**cpu_run, "device": "cuda:0", "device_name": "a GPU",
           "seconds": {r: s / 4 for r, s in cpu_run["seconds"].items()},
           "tests": {"core": {"passed": 300, "failed": 1, "errors": 0, "skipped": 2, "seconds": 90.0},
                     "service": {"passed": 200, "failed": 0, "errors": 2, "skipped": 0, "seconds": 60.0}}}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    (tmp_path / "cpu.json").write_text(json.dumps(cpu_run))
    merged = main(["--merge", str(tmp_path / "gpu.json"), str(tmp_path / "cpu.json"), "--json", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text()) == merged
    assert merged["tests"] == {"core": {"passed": 300, "failed": 1, "errors": 0},
                               "service": {"passed": 200, "failed": 0, "errors": 2}}
    assert list(merged["seconds"]) == list(RECIPES)
    for r, v in merged["seconds"].items():
        assert v == {"cpu": cpu_run["seconds"][r], "gpu": cpu_run["seconds"][r] / 4}
        assert merged["speedup"][r] == pytest.approx(4.0, abs=0.01)
    assert merged["runs"]["gpu"]["device_name"] == "a GPU" and merged["runs"]["cpu"]["device"] == "cpu"
    table = capsys.readouterr().out
    assert "tests core" in table and "speedup" in table and "wrap_resnet20" in table
    with pytest.raises(ValueError, match="one CPU run and one CUDA run"):
        main(["--merge", str(tmp_path / "cpu.json"), str(tmp_path / "cpu.json")])


def test_pytest_counts_from_its_summary_or_its_progress_marks():
    assert pytest_counts("..F.E\n== 3 passed, 1 failed, 1 error, 4 deselected in 2.00s ==\n") == {
        "passed": 3, "failed": 1, "errors": 1, "skipped": 0, "deselected": 4}
    assert pytest_counts("12 passed, 2 errors in 9.1s")["errors"] == 2
    # Stopped before the summary (the suite ran past --test-timeout): the marks so far.
    partial = pytest_counts("..F..s  [ 40%]\n.E.\n")
    assert (partial["passed"], partial["failed"], partial["errors"], partial["skipped"]) == (6, 1, 1, 1)


def test_a_suite_is_run_and_counted(tmp_path):
    suite = tmp_path / "test_sample.py"
    suite.write_text("import pytest\n\n@pytest.fixture\ndef broken():\n    raise RuntimeError\n\n"
                     "def test_a():\n    pass\n\ndef test_b():\n    assert False\n\ndef test_c(broken):\n    pass\n")
    got = run_suite([str(suite)], [], timeout=120, log_file=tmp_path / "log.txt")
    assert (got["passed"], got["failed"], got["errors"]) == (1, 1, 1) and got["returncode"] == 1
    assert "test_b" in (tmp_path / "log.txt").read_text()
