"""A tiny name -> builder registry (one per kind: datasets, partitioners, methods)."""

from collections.abc import Callable
from typing import Generic, TypeVar

from fedcil.errors import choices_error

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builders; an unknown name raises a one-line error listing the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds ``fn`` under ``name``."""

        def add(fn: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = fn
            return fn

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a method a test or a plug-in registered for a while)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """Return the builder registered as ``name``."""
        if name not in self._items:
            raise choices_error(self.kind, name, list(self._items))
        return self._items[name]

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)
