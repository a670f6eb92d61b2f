"""Puts benchmarks/ on sys.path, so that its tests import a harness module as the benchmark scripts do."""
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # appended: shadows no installed module
