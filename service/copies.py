"""The server's own copies of deployed bundles: ``bundles/<name>/<UTC time>-<12 hex>.sdb`` in the data dir.

A deploy copies the bundle it was given into a new file there (never over one) and serves the copy; removing
a version deletes its copy (and its name's folder once empty). A bundle an admin registered in place
(``sdb models add PATH``) is the admin's file: it is never deleted.
"""
from __future__ import annotations

import re
import secrets
import shutil
import time
from pathlib import Path

from .errors import no_room
from .settings import Settings

_COPY = re.compile(r"\d{8}T\d{6}-[0-9a-f]{12}\.sdb")


def copy_new(src: Path, folder: Path) -> Path:
    """``src`` copied to a new file in ``folder``: created exclusively, so no file is ever overwritten. A copy
    that fails half-way (a full disk) is removed: 507 when the disk had no room (:func:`errors.no_room`)."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(6)}.sdb"
        with open(src, "rb") as fin:
            try:
                fout = open(target, "xb")  # noqa: SIM115 - closed below
            except (FileExistsError, FileNotFoundError):  # taken, or the folder of a refused deploy just went
                continue
            try:
                with fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            except BaseException as e:
                discard(target)
                full = no_room(e, "the bundle")
                if full is not None:
                    raise full from None
                raise
        return target


def discard(target: Path) -> None:
    """Remove a copy (refused, or a removed version's), and its name's folder when nothing else is in it."""
    target.unlink(missing_ok=True)
    try:
        target.parent.rmdir()
    except OSError:  # other versions (or another deploy's copy) are in it
        pass


def discard_served(settings: Settings, path: str) -> None:
    """Delete a removed version's bundle when it is the server's copy (a file of :func:`copy_new`'s in
    ``bundles/<name>/``); anything else (a bundle registered in place) stays."""
    target = Path(path)
    try:
        inside = target.parent.parent.resolve() == settings.bundles_dir.resolve()
    except OSError:
        return
    if inside and _COPY.fullmatch(target.name) and target.is_file() and not target.is_symlink():
        discard(target)


# A copy older than this that no version names was left by a deploy that died between copying and registering it
# (a server killed mid-deploy): deploys take seconds, so one this old is no other process's deploy in flight.
ORPHAN_AGE_S = 3600.0


def sweep_orphans(settings: Settings, registered: set[str], now: float | None = None) -> list[Path]:
    """Blocking: delete the server's copies (:func:`copy_new`'s files) that no registered version's path names and
    that are older than :data:`ORPHAN_AGE_S`; the ones deleted. A server calls it when it starts."""
    root = settings.bundles_dir
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    named = {str(Path(p).resolve()) for p in registered}
    gone = []
    for target in root.glob("*/*.sdb"):
        try:
            if (_COPY.fullmatch(target.name) and target.is_file() and not target.is_symlink()
                    and str(target.resolve()) not in named and now - target.stat().st_mtime > ORPHAN_AGE_S):
                discard(target)
                gone.append(target)
        except OSError:  # gone meanwhile, or unreadable: another sweep's, or not ours to judge
            continue
    return gone
