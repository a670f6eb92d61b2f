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


# As a Ctrl-C that lands while onnxruntime's C extension initialises: the SIGINT arrives in the extension's own
# import of numpy, which the extension reports as an ImportError of its own, the KeyboardInterrupt not chained to it
# (it prints it itself). ``main`` tells it from a real ImportError by the SIGINT it saw.
SIGINT_IN_ORT_INIT = """
import builtins, os, signal, sys
armed = False
class Arm:
    def find_spec(self, name, path=None, target=None):
        global armed
        armed = armed or name == "onnxruntime.capi.onnxruntime_pybind11_state"
sys.meta_path.insert(0, Arm())
real_import = builtins.__import__
def imp(name, *a, **k):
    global armed
    if armed and name.startswith("numpy"):
        armed = False
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *a, **k)
builtins.__import__ = imp
"""

# The other form: the package re-raises the KeyboardInterrupt as an ImportError chained to it.
CHAINED_IN_ORT_IMPORT = """
import sys
class Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime":
            raise ImportError("initialization failed") from KeyboardInterrupt()
sys.meta_path.insert(0, Broken())
"""

MODELS_ADD = "from sdb_cli.main import main\nsys.exit(main(['models', 'add', '--data-dir', {d!r}, 'nothere.sdb']))"


def test_sdb_interrupted_while_onnxruntime_initialises_says_interrupted(tmp_path):
    p = subprocess.run([sys.executable, "-c", SIGINT_IN_ORT_INIT + MODELS_ADD.format(d=str(tmp_path / "d"))],
                       check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    # what the extension prints of the KeyboardInterrupt itself comes first; then one line, not the ImportError
    assert p.returncode == 130 and p.stderr.endswith("\nsdb: interrupted\n"), p.stderr[-2000:]
    assert "ImportError" not in p.stderr, p.stderr[-2000:]


def test_sdb_interrupt_chained_to_an_import_error_says_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-c", CHAINED_IN_ORT_IMPORT + MODELS_ADD.format(d=str(tmp_path / "d"))],
                       check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr) == (130, "sdb: interrupted\n"), p.stderr[-2000:]
