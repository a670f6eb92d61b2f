"""The layers of DESIGN.md point one way: sdb_cli -> service, sdb_client, sdb_core; service -> sdb_core only.

Checked on the source (every import statement, top-level or inside a function), so that a lazy
import in a rarely-run branch cannot break the layering unseen; and at run time for the one
property the source cannot show: importing and building the server app leaves torch unimported.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sdb_core": ROOT / "sdb_core", "service": ROOT / "service", "sdb_cli": ROOT / "sdb_cli",
            "sdb_client": ROOT / "clients/python/sdb_client"}
# What each package may not import (absolute imports; relative ones stay inside the package).
FORBIDDEN = {
    "sdb_core": {"service", "sdb_client", "sdb_cli"},
    "service": {"sdb_client", "sdb_cli"},
    # torch only when the caller passes torch tensors: tests/client/test_install.py runs it without torch
    "sdb_client": {"sdb_core", "service", "sdb_cli"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Every absolutely imported top-level package in ``path``, with the line it is imported on."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(a.name.split(".")[0], node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_the_layers_below(package):
    files = sorted(PACKAGES[package].rglob("*.py"))
    assert files, f"no source found for {package}"
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in files
           for name, line in sorted(imported_packages(p)) if name in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from service.app import build_app\n    import sdb_cli.main\n")
    assert {n for n, _ in imported_packages(src)} == {"service", "sdb_cli"}


def test_building_the_server_app_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from service.app import build_app\n"
        "from service.settings import Settings\n"
        f"build_app(Settings(data_dir={str(tmp_path)!r}, workers=0))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
