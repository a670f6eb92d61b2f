"""A Ctrl-C at any moment ends ``sdb`` and its job workers with one line and status 130, not a traceback,
including while they still import (a second or more of numpy and torch): a terminal's Ctrl-C reaches the
server and its workers together, often before either is up."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs ``code`` after making the first import of numpy raise KeyboardInterrupt, as a Ctrl-C arriving there.
INTERRUPT_AT_NUMPY = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", INTERRUPT_AT_NUMPY + code], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_sdb_interrupted_while_importing_says_one_line():
    p = run("from sdb_cli.main import main\nsys.exit(main(['models', '--help']))")
    assert (p.returncode, p.stderr) == (130, "sdb: interrupted\n"), p.stderr[-2000:]


def test_a_job_worker_interrupted_while_importing_says_one_line():
    p = run("import runpy\nrunpy.run_module('service.jobs', run_name='__main__')")
    assert (p.returncode, p.stderr) == (130, "sdb worker: interrupted\n"), p.stderr[-2000:]
