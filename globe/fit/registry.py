"""Registries by name, filled by the modules of one folder: a new objective or warm start is one module that
decorates its class with the folder's `register`; `Registry.get` imports every module of the folder first."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from globe.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> class, for the modules of package `package` (e.g. "globe.fit.warm_starts")."""

    def __init__(self, package: str, what: str) -> None:
        self.package, self.what, self.entries = package, what, {}
        self._found = False

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: the class's `name` makes it available."""
        self.entries[cls.name] = cls
        return cls

    def all(self) -> dict[str, type[T]]:
        """Every registered class, after importing each module of the package once."""
        if not self._found:
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{info.name}")
            self._found = True
        return self.entries

    def get(self, name: str) -> type[T]:
        entries = self.all()
        if name not in entries:
            raise ConfigError(f"unknown {self.what} {name!r}: one of {', '.join(sorted(entries))}")
        return entries[name]
