"""What a caller without the admin scope sees of the server's internals: no server paths, no tracebacks.

Job records, job logs, ``report.json`` and ``/readyz`` pass through :func:`hide_paths` before
they leave the server; a failed job's error is :func:`failure_reason`, a sentence. The full text
stays where an operator reads it: the store (admin keys see the records as they are), the
worker's log and the job's ``traceback.txt``. See docs/security.md, "What callers see".
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import NO_ROOM

# An absolute POSIX path: a "/" that starts no URL ("://"), ratio ("3/10") or relative path
# ("a/b"), then path characters up to a space, a quote or a bracket.
_ABS_PATH = re.compile(r"(?<![\w.~/\\-])/(?![/\s])[^\s'\"`,;()\[\]{}<>|]+")
_OURS = ("sdb_core", "service")  # exceptions these packages raise say what went wrong for a user
# A job worker's id (service.jobs.worker.worker_id): "worker:" or "ray:", the host's name, the process id.
_WORKER_ID = re.compile(r"\b(worker|ray):[A-Za-z0-9._-]+:\d+\b")


def _roots(root: Path | None) -> list[str]:
    if root is None:
        return []
    return sorted({str(root.absolute()), str(root.resolve())}, key=len, reverse=True)


@lru_cache(maxsize=1)
def _top_level() -> frozenset[str]:
    """The names under this machine's ``/``: what a server path starts with. An ONNX node name
    (``/features/features.4/Relu``) looks like a path too, and a ranking reports it by name."""
    try:
        return frozenset(p.name for p in Path("/").iterdir())
    except OSError:
        return frozenset()


def hide_paths(text: str, root: Path | None = None) -> str:
    """``text`` with every absolute server path replaced: relative to ``root`` (the data dir) when
    under it, else by its last component (``…/name``). A path is server-side when its first
    component exists under this machine's ``/`` (or it is under ``root``). A job worker's id, which names
    a server's host and process, becomes its kind alone (``worker:…``, ``ray:…``)."""
    return _hidden(text, root, None)


def _hidden(text: str, root: Path | None, roots: list[str] | None) -> str:
    """:func:`hide_paths`, the roots of ``root`` given when known (resolving them is two system calls)."""
    if "/" not in text and ":" not in text:  # most strings of a record (its keys, names, figures): nothing to hide
        return text
    roots = _roots(root) if roots is None else roots
    text = _relative_to_roots(text, roots)
    top = _top_level()

    def short(m: re.Match) -> str:
        path = m.group(0)
        if path.split("/", 2)[1] not in top and not any(path.startswith(r + "/") for r in roots):
            return path
        for r in roots:
            if path.startswith(r + "/") and len(path) > len(r) + 1:
                return path[len(r) + 1:]
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return f"…/{name}" if name else "…"

    return _WORKER_ID.sub(r"\1:…", _ABS_PATH.sub(short, text))


def _relative_to_roots(text: str, roots: list[str]) -> str:
    """``text`` with the data dir's own paths made relative to it, before the pattern: a data dir holding a space
    ("/srv/sdb data", "/home/Alice Smith/sdb") ended the pattern's match there, and the rest of the path was shown."""
    for r in roots:  # the longest first: a resolved root under the other one's name is taken whole
        if r + "/" in text:
            text = re.sub(r"(?<![\w.~/\\-])" + re.escape(r) + "/(?=[^/\\s])", "", text)
    return text


def hide_paths_in(value: Any, root: Path | None = None) -> Any:
    """:func:`hide_paths` over every string of a JSON value (keys too); ``root``'s paths resolved once (a
    non-admin's list of 1,000 jobs resolved them for every string: 15x an admin's time)."""
    roots = _roots(root)

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return _hidden(v, root, roots)
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(value)


def failure_reason(e: BaseException, step: str, root: Path | None = None) -> str:
    """A failed job's error as its owner reads it: the message of an error the project raised on
    purpose (a bad parameter, a refused box, a removed model), without paths; for anything else
    (a parser, a driver, a bug) only the step it happened in, since such messages quote files."""
    if isinstance(e, OSError) and e.errno in NO_ROOM:  # a full disk, a quota, a file-size limit
        return (f"the server's disk is full (at step {step!r}): nothing of the job is lost but its run; submit it "
                "again once an administrator has made room")
    # FloatingPointError: the recipes' own word for a divergence (fit's "loss became nan at step ...", a wrap's
    # "lower the learning rate"), which has no module of ours to tell it by
    if type(e) in (ValueError, FloatingPointError) or type(e).__module__.split(".")[0] in _OURS:
        text = hide_paths(str(e), root).strip()
        if text:
            return text[:2000]
    return (f"the job failed at step {step!r} with an unexpected error; an administrator can read "
            "the details in the worker's log")


def one_line(e: BaseException) -> str:
    """An error in one line for an operator's log: its type and its message's first line (at most 200 characters)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
