"""A name registry: methods register themselves by name, and a wrong name is a clear error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from erasure.core.errors import ErasureError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by name, filled by the :meth:`register` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make a class available under ``name`` (also set as ``cls.name``)."""

        def add(cls: T) -> T:
            cls.name = name
            self.entries[name] = cls
            return cls

        return add

    def get(self, name: str) -> T:
        """The class registered under ``name``, or an error listing the choices."""
        if name not in self.entries:
            raise ErasureError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self.entries))}.")
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(sorted(self.entries))
