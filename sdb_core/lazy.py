"""Lazy package exports (PEP 562): a package names what it exports, and a name's module is imported on first use.

Used where importing the package must stay cheap and torch-free (its configs are read by the
service and the CLI without torch): ``sdb_core.protect``, ``sdb_core.distill``, ``datafree``.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``name`` from ``package``'s submodule ``exports[name]``."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{exports[name]}", package), name)

    return __getattr__
