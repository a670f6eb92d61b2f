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


def file_above(p: Path) -> Path | None:
    """The file in the way of ``p``'s folders, if the nearest of them that exists is one (``afile/sub/x``): the
    missing folders could never be made, which a run found only when it wrote, after the work."""
    for above in p.absolute().parents:
        if above.exists():
            return None if above.is_dir() else above
    return None


def _check_folders_above(p: Path, what: str) -> None:
    blocker = file_above(p)
    if blocker is not None:
        raise ValueError(f"{what} {p}: {blocker} is a file, not a folder")


def out_file(out: str | os.PathLike, what: str = "the output file") -> Path:
    """A file a run writes (replaced if it exists): not a folder, nor below a file."""
    p = _given(out, what)
    if p.is_dir():
        raise ValueError(f"{what} {p} is a folder: name a file in it")
    _check_folders_above(p, what)
    return p


def out_dir(out: str | os.PathLike, what: str = "the output folder") -> Path:
    """A folder a run writes its files into (made if missing; files of the same names replaced): not a file, nor
    below one."""
    p = _given(out, what)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} is a file: name a folder")
    _check_folders_above(p, what)
    return p
