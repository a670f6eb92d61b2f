"""ONNX Runtime's Linux wheels send usage telemetry unless told not to before they load: a device id and an event
queue under ``~/.cache/Microsoft`` (the executable, the graph's name and producer, batch timings, error messages) and
lookups of Microsoft's collector, from the server, its job workers and the CLI alike. Importing any of SDB's packages
turns it off first, whichever imports onnxruntime next; an owner's own ORT_DISABLE_TELEMETRY is kept."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.service.conftest import ROOT

RUN_A_BUNDLE = """
import sys
import {first}  # the package a process starts from: the server's modules, or the CLI's
import numpy as np
from sdb_core.bundle import load_bundle
bundle = load_bundle(sys.argv[1])
bundle.predict(np.zeros((1, 1, 8, 8), np.float32))
import os
print(os.environ.get("ORT_DISABLE_TELEMETRY"))
"""


@pytest.mark.parametrize("first", ["service.registry", "sdb_cli.main"])
def test_loading_and_running_a_bundle_leaves_nothing_under_home(first, bundles, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), SDB_MASTER_KEY_FILE=str(bundles.master_key_file))
    run = subprocess.run([sys.executable, "-c", RUN_A_BUNDLE.format(first=first), str(bundles.a)], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1"
    assert not (tmp_path / ".cache" / "Microsoft").exists(), sorted(str(p) for p in tmp_path.rglob("*"))


def test_an_owner_who_wants_the_telemetry_keeps_it(bundles, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "0"}
    run = subprocess.run([sys.executable, "-c", "import os, service; print(os.environ['ORT_DISABLE_TELEMETRY'])"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "0", run.stderr
