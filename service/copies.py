"""The server's own copies of deployed bundles: ``bundles/<name>/<UTC time>-<12 hex>.sdb`` in the data dir.

A deploy copies the bundle it was given into a new file there (never over one) and serves the copy; removing
a version deletes its copy (and its name's folder once empty). A bundle an admin registered in place
(``sdb models add PATH``) is the admin's file: it is never deleted.

A copy is known by its name under ``bundles/`` (``<name>/<file>``: the file's name is unique), not by the absolute
path the store recorded: a data dir moved or restored elsewhere, or mounted at another path on another host of the
same store, serves its own copies (:func:`bundle_path`), and the start-up sweep (:func:`sweep_orphans`) never takes
a copy such a path change explains for a dead deploy's.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import no_room, room_for
from .settings import Settings

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("sdb.service")

_COPY = re.compile(r"\d{8}T\d{6}-[0-9a-f]{12}\.sdb")
ORPHANED = ".orphaned"  # bundles/.orphaned/<name>/<file>: the copies a sweep set aside (no model name starts with ".")


def copy_new(src: Path, folder: Path) -> Path:
    """``src`` copied to a new file in ``folder``: created exclusively, so no file is ever overwritten. A copy
    that fails half-way (a full disk) is removed: 507 when the disk had no room (:func:`errors.no_room`)."""
    while True:
        with room_for("the bundle"):
            folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(6)}.sdb"
        with open(src, "rb") as fin:
            try:
                with room_for("the bundle"):
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


def _tail(stored: Path) -> tuple[str, ...]:
    """A stored path's place under a ``bundles/`` folder: ``(name, file)`` for ``…/bundles/<name>/<file>``, ``(name,)``
    for ``…/bundles/<name>``, else ()."""
    parts = stored.parts
    if len(parts) >= 3 and parts[-3] == "bundles":
        return parts[-2:]
    if len(parts) >= 2 and parts[-2] == "bundles":
        return parts[-1:]
    return ()


def bundle_path(settings: Settings, stored: str) -> Path:
    """Where this process finds the bundle of a version the store records at ``stored`` (a ``ModelRow.path``,
    absolute): the one place a row's path is read through.

    A server copy (``…/bundles/<name>/<file>`` with :func:`copy_new`'s file name, which no other copy has) is this
    data dir's own when it has it, wherever the store recorded it: a data dir moved, restored or mounted elsewhere
    serves its own copies, not the old place's while that lasts, and goes on once it is gone. Another path of that
    shape, or ``…/bundles/<name>`` (the demo's folder), that no longer exists is looked for in this data dir's
    ``bundles/``. Anything else (a bundle an admin registered in place outside the data dir) is the path as
    recorded. Whatever is found is checked against the bundle registered (its meta.json's digest:
    :meth:`service.registry.ModelHost.load_registered`)."""
    path = Path(stored)
    tail = _tail(path)
    if not tail:
        return path
    ours = settings.bundles_dir.resolve().joinpath(*tail)
    if len(tail) == 2 and _COPY.fullmatch(tail[1]):
        return ours if ours.is_file() else path
    return ours if not path.exists() and ours.exists() else path


def copy_name(settings: Settings, path: Path) -> str | None:
    """``<name>/<file>`` when ``path`` is one of the server's copies (a :func:`copy_new` file in a model's folder of
    this data dir's ``bundles/``), else None."""
    try:
        inside = path.parent.parent.resolve() == settings.bundles_dir.resolve()
    except OSError:
        return None
    if not (inside and _COPY.fullmatch(path.name) and path.parent.name != ORPHANED):
        return None
    return f"{path.parent.name}/{path.name}"


def discard_served(settings: Settings, path: str) -> None:
    """Delete a removed version's bundle (``path`` as the store records it) when it is the server's copy (a file of
    :func:`copy_new`'s in ``bundles/<name>/``); anything else (a bundle registered in place) stays."""
    target = bundle_path(settings, path)
    if copy_name(settings, target) is not None and target.is_file() and not target.is_symlink():
        discard(target)


# A copy older than this that no version names was left by a deploy that died between copying and registering it
# (a server killed mid-deploy): deploys take seconds, so one this old is no other process's deploy in flight.
ORPHAN_AGE_S = 3600.0


@dataclass(frozen=True)
class Leftovers:
    """What a start-up sweep sets aside, in the words its log uses."""

    what: str  # "bundle copies"
    row: str  # what names one in the store: "model version"
    left_by: str  # who leaves one: "a deploy that died midway"
    keep: str  # what an operator does with those left in place
    moved: str  # what an operator does with those set aside


BUNDLES = Leftovers("bundle copies", "model version", "a deploy that died midway",
                    "register the ones to serve with sdb models add PATH",
                    "delete them, or register one again with sdb models add PATH")
FILES = Leftovers("uploaded file folders", "file", "an upload or a file delete that died midway",
                  "move back into files/ what the store should name", "delete them: no file id names them")
JOBS = Leftovers("job folders", "job", "a job delete that died midway",
                 "move back into jobs/ what the store should name", "delete them: no job names them")
JOB_ID = re.compile(r"[0-9a-f]{32}")  # service.jobs.queue's uuid4().hex


def sweep_orphans(settings: Settings, registered: list[str], now: float | None = None) -> list[Path]:
    """Blocking: set aside the server's copies (:func:`copy_new`'s files) that no registered version (``registered``:
    every ``ModelRow.path``) names and that are older than :data:`ORPHAN_AGE_S`, into ``bundles/.orphaned/<name>/``
    (served by nothing, listed nowhere; an operator deletes them, or registers one again with ``sdb models add``);
    the paths they have now. A server calls it when it starts, so that the copies of deploys that died midway do
    not pile up unseen; the log says what went where.

    A copy is named by its ``<name>/<file>`` under ``bundles/``, whatever folder the store recorded it in. Nothing
    is set aside when the store may not be this data dir's: it holds no version (a new store over existing
    bundles), or a version's bundle is missing here (yesterday's store, another host's data dir)."""
    root = settings.bundles_dir
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    named = {"/".join(_tail(Path(p))) for p in registered}
    unnamed = [p for p in _old_copies(settings, now) if copy_name(settings, p) not in named]
    if not unnamed:
        return []
    missing = [p for p in registered if not bundle_path(settings, p).exists()]
    return _set_aside_all(root, unnamed, bool(registered), missing, BUNDLES)


def sweep_folders(root: Path, pattern: re.Pattern, named: set[str], expected: set[str], kind: Leftovers,
                  now: float | None = None) -> list[Path]:
    """Blocking: :func:`sweep_orphans`' rule for the folders of ``root`` named by a store row's id (``pattern``):
    those no row names (``named``) and older than :data:`ORPHAN_AGE_S` are set aside into ``root/.orphaned/`` and
    logged; the paths they have now. Such a folder was left by a process killed between moving it into place and
    recording its row (an upload), or between removing the row and the folder (a file's or a job's delete).
    ``expected``: the ids whose folder this data dir must have: nothing is set aside when one is missing, or when
    the store names none (it may not be this data dir's)."""
    if not root.is_dir():
        return []
    cutoff = (time.time() if now is None else now) - ORPHAN_AGE_S
    unnamed = []
    for d in root.iterdir():
        try:
            if (pattern.fullmatch(d.name) and d.name not in named and d.is_dir() and not d.is_symlink()
                    and d.stat().st_mtime < cutoff):
                unnamed.append(d)
        except OSError:  # gone meanwhile: another process's sweep
            continue
    if not unnamed:
        return []
    missing = sorted(i for i in expected if not (root / i).is_dir())
    return _set_aside_all(root, unnamed, bool(named), missing, kind)


def sweep_leftovers(settings: Settings, store: Store) -> None:
    """Blocking, when a server starts: set aside (logged, never deleted) what processes killed midway left in the
    data dir: bundle copies no version names (:func:`sweep_orphans`), upload folders no file names, and job folders
    no job names (:func:`sweep_folders`; a job's folder is sure to be here once it succeeded)."""
    from .files import FILE_ID_RE

    sweep_orphans(settings, [m.path for m in store.list_models()])
    files = store.file_ids()
    sweep_folders(settings.files_dir, FILE_ID_RE, files, files, FILES)
    jobs = store.job_statuses()
    sweep_folders(settings.jobs_dir, JOB_ID, set(jobs), {j for j, status in jobs.items() if status == "succeeded"},
                  JOBS)


def _set_aside_all(root: Path, unnamed: list[Path], stored_any: bool, missing: list[str],
                   kind: Leftovers) -> list[Path]:
    """Set ``unnamed`` aside (:func:`_set_aside`) and log it, unless the store may not be this data dir's: it names
    none (``stored_any``), or what it names is ``missing`` here."""
    if not stored_any or missing:
        why = (f"the store's {kind.row} {missing[0]} is missing here ({len(missing)} missing)" if missing
               else f"the store holds no {kind.row}")
        log.warning("%d %s in %s are named by no %s, and were left where they are: %s, so the store may not be this "
                    "data dir's; %s", len(unnamed), kind.what, root, kind.row, why, kind.keep)
        return []
    moved = [m for m in (_set_aside(root, p) for p in unnamed) if m is not None]
    if moved:
        log.warning("moved %d %s that no %s names (left by %s) to %s: %s; %s", len(moved), kind.what, kind.row,
                    kind.left_by, root / ORPHANED, ", ".join(str(p.relative_to(root / ORPHANED)) for p in moved[:5]),
                    kind.moved)
    return moved


def _old_copies(settings: Settings, now: float) -> list[Path]:
    """The server's copies (not symlinks, not the set-aside ones) last written over :data:`ORPHAN_AGE_S` ago."""
    old = []
    for target in settings.bundles_dir.glob("*/*.sdb"):
        try:
            if (copy_name(settings, target) is not None and target.is_file() and not target.is_symlink()
                    and now - target.stat().st_mtime > ORPHAN_AGE_S):
                old.append(target)
        except OSError:  # gone meanwhile, or unreadable: another sweep's, or not ours to judge
            continue
    return old


def _set_aside(root: Path, leftover: Path) -> Path | None:
    """Move ``leftover`` (a copy ``<name>/<file>``, or a folder) to the same place under ``root/.orphaned/`` (a copy's
    name folder goes once empty); None when another process's sweep took it first."""
    target = root / ORPHANED / leftover.relative_to(root)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(leftover, target)
    except FileNotFoundError:
        return None
    if leftover.parent != root:
        try:
            leftover.parent.rmdir()
        except OSError:  # other versions are in it
            pass
    return target
