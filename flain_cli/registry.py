"""Registries by name, filled by a small decorator (the CLI's choices come from them).

A registry is declared with its names and the module that fills it (:mod:`flain_cli.catalog`),
so the names can be listed without importing that module (and torch): ``flain --help`` and
usage errors need the names, not the implementations. The module is imported on the first
:meth:`Registry.get`; registering a name that was not declared fails at once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of entries, e.g. model builders or trigger factories."""

    def __init__(self, kind: str, names: tuple[str, ...], module: str) -> None:
        self.kind = kind
        self._names = names
        self._module = module
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if name not in self._names:
            raise ValueError(f"{self.kind} {name!r} is not declared: add it to flain_cli/catalog.py")

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def check(self, name: str) -> None:
        """Refuse a name that is not declared (without importing the implementations)."""
        if name not in self._names:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._names)}")

    def get(self, name: str) -> T:
        self.check(name)
        if name not in self._entries:
            importlib.import_module(self._module)
        if name not in self._entries:
            raise ValueError(f"{self.kind} {name!r} is declared but {self._module} does not register it")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)
