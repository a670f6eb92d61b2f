"""A registry per kind of thing, created by name (models, datasets, job kinds).

A decorator registers a plain factory under its function name (or an explicit one);
an unknown name raises ``ValueError`` that lists the known names.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, fn: F | None = None, *, name: str | None = None):
        def add(f: F) -> F:
            key = name or f.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = f
            return f

        return add(fn) if fn is not None else add

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
