"""ruff over every package of the project, as ``make lint`` runs it: nothing else gated it, and ``make lint`` left
the SDK (clients/python) out. ruff comes with the dev extra (pyproject.toml), which ``make install`` installs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdb_core", "service", "sdb_cli", "tests", "benchmarks", "clients/python")


def test_the_projects_packages_are_lint_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise", *PACKAGES],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"ruff check {' '.join(PACKAGES)} (make lint) found:\n{r.stdout[-8000:]}{r.stderr[-2000:]}"


def test_make_lint_checks_the_same_packages():
    lint = (ROOT / "Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert f"ruff check {' '.join(PACKAGES)}" in lint, lint
