"""What the command-line tests share."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """A fresh data dir in SDB_DATA_DIR, no other SDB_* setting, the working directory ``tmp_path``."""
    for k in list(os.environ):
        if k.startswith("SDB_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "data"
