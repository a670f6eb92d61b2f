"""The `gpu` extra installs versions that exist, and the Docker `gpu` target installs the same.

``pip install --dry-run --report`` of each pinned GPU package, for the image's platform (CPython 3.11,
manylinux x86_64), asks the package registry (CI reaches it; this test fails without it, it never
skips): the pin must resolve to exactly itself, its own requirements must be met by the lock the
image installs beside it, and the CUDA it was built for must be the CUDA image's.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
GPU = PYPROJECT["project"]["optional-dependencies"]["gpu"]
PLATFORM = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
            "--only-binary=:all:"]


def lock() -> dict[str, str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pins = [ln for ln in lines if ln and not ln.startswith("#")]
    return {Requirement(ln).name.lower(): ln.split("==", 1)[1] for ln in pins}


def docker_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    return value


def test_the_dockerfile_gpu_target_installs_the_gpu_extra():
    (pin,) = [r for r in GPU if Requirement(r).name == "onnxruntime-gpu"]
    assert pin == f"onnxruntime-gpu=={docker_arg('ORT_GPU_VERSION')}"
    gpu_build = DOCKERFILE.split("AS gpu-build", 1)[1].split("\nFROM ", 1)[0]
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in gpu_build
    assert "grep -v '^onnxruntime=='" in gpu_build  # the CPU wheel is swapped out, never installed beside it
    assert all("==" in r for r in GPU), GPU  # pinned, like the lock


@pytest.mark.parametrize("pin", GPU)
def test_each_pinned_gpu_package_exists_for_the_image_and_fits_its_lock(pin, tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
         "--disable-pip-version-check", "--target", str(tmp_path / "t"), "--report", str(report),
         *PLATFORM, pin],
        check=False, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{pin} has no CPython 3.11 manylinux x86_64 wheel:\n{done.stderr[-3000:]}"
    (item,) = json.loads(report.read_text())["install"]
    want = Requirement(pin)
    meta = item["metadata"]
    assert meta["name"].lower() == want.name and want.specifier.contains(meta["version"])
    needs = meta.get("requires_dist", [])
    # What it needs beside it (no extra) is in the lock the image installs, at versions it accepts.
    pins = lock()
    for dep in map(Requirement, needs):
        if dep.marker is not None and "extra" in str(dep.marker):
            continue
        assert dep.name.lower() in pins, f"{pin} needs {dep}, which requirements.lock does not pin"
        assert dep.specifier.contains(pins[dep.name.lower()], prereleases=True), (dep, pins[dep.name.lower()])
    # The CUDA it was built for (its `cuda` extra names the runtime wheel) is the CUDA image's major version.
    runtime = [Requirement(r) for r in needs if r.startswith("nvidia-cuda-runtime")]
    if runtime:
        major = re.search(r"(\d+)\.", str(runtime[0].specifier)).group(1)
        image = docker_arg("CUDA_IMAGE")
        assert re.match(rf"nvidia/cuda:{major}\.\d+\.\d+-cudnn-runtime-", image), (image, str(runtime[0]))
