"""Where a run writes, checked before any work: a path it cannot write is refused in a line before the training (it
crashed after it, a traceback, with minutes of work lost). A bundle's path: :func:`sdb_core.bundle.bundle_target`.
"""
from __future__ import annotations

import os
from pathlib import Path


def _given(out: str | os.PathLike, what: str) -> Path:
    if not str(out).strip():
        raise ValueError(f"{what} is empty: name a path")
    return Path(out)


def out_file(out: str | os.PathLike, what: str = "the output file") -> Path:
    """A file a run writes (replaced if it exists): not a folder."""
    p = _given(out, what)
    if p.is_dir():
        raise ValueError(f"{what} {p} is a folder: name a file in it")
    if p.parent.exists() and not p.parent.is_dir():
        raise ValueError(f"{what} {p}: {p.parent} is a file, not a folder")
    return p


def out_dir(out: str | os.PathLike, what: str = "the output folder") -> Path:
    """A folder a run writes its files into (made if missing; files of the same names replaced): not a file."""
    p = _given(out, what)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} is a file: name a folder")
    return p
