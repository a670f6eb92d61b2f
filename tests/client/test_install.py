"""The SDK installs and imports where torch is not: a fresh venv (no system site-packages),
the SDK installed from a wheel of clients/python with --no-deps, and only its declared
dependencies (httpx, numpy and theirs) made visible, linked from this environment."""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import MODEL

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "clients" / "python"


def _requirements(dist: str) -> list[str]:
    """Names of a distribution's requirements, extras skipped. Environment markers are not
    evaluated: a requirement that is not installed here is skipped by the caller, and one
    linked needlessly does no harm (torch is checked to be absent either way)."""
    out = []
    for req in md.requires(dist) or []:
        name, _, marker = req.partition(";")
        if "extra ==" not in marker:
            out.append(re.split(r"[\s<>=!~\[(]", name.strip(), maxsplit=1)[0])
    return out


def _closure(names: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        try:
            key = md.distribution(n).metadata["Name"].lower()
        except md.PackageNotFoundError:  # a requirement whose marker is false here
            continue
        if key in seen:
            continue
        seen.add(key)
        todo.extend(_requirements(n))
    return seen


def _link_distribution(name: str, target: Path) -> None:
    """Symlink every top-level entry (package dirs, modules, .libs, dist-info) of ``name``."""
    dist = md.distribution(name)
    site = Path(dist.locate_file(""))
    tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        src = site / top
        if src.exists() and not (target / top).exists():
            (target / top).symlink_to(src)


def test_sdk_installs_and_imports_without_torch(tmp_path, sdb_server):
    sdk_requires = _requirements("safe-distillation-box-client")
    assert sorted(sdk_requires) == ["httpx", "numpy"]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    # Build a wheel of a copy of the SDK (the source tree stays clean), then install it with --no-deps.
    src = tmp_path / "src"
    shutil.copytree(SDK, src, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)],
                   check=True, timeout=120)
    (wheel,) = wheels.glob("safe_distillation_box_client-*.whl")
    subprocess.run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=120)

    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = _closure(sdk_requires)
    assert "torch" not in deps
    for name in deps:
        _link_distribution(name, site)

    check = f"""
import importlib.util, importlib.metadata, sys
import numpy as np
import sdb_client
from sdb_client import Client, RemoteTeacher
assert importlib.util.find_spec("torch") is None, "torch is importable"
assert "torch" not in sys.modules
assert sorted(r.split(">")[0].split("<")[0] for r in importlib.metadata.requires("safe-distillation-box-client")) == ["httpx", "numpy"]
with Client() as c, RemoteTeacher(c, {MODEL!r}, batch_size=4) as t:
    z = t(np.zeros((6, 1, 8, 8), np.float32))
    assert isinstance(z, np.ndarray) and z.shape == (6, 10)
assert "torch" not in sys.modules
print("ok", sdb_client.__version__, sdb_client.__file__)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(SDB_URL=sdb_server.url, SDB_API_KEY=sdb_server.distill_key)
    out = subprocess.run([str(py), "-I", "-c", check], check=False, capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok 0.1.0") and str(venv) in out.stdout
