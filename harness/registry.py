"""Typed registries with explicit registration.

Each method, metric and dataset format registers itself with a decorator in its own module;
the package ``__init__`` of ``methods``, ``harness.metrics`` and ``harness.data`` imports those
modules explicitly, so the set of names is visible in code, not discovered by getattr.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown method, metric or dataset format; the message lists what exists."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown {self.kind} '{self.name}'; available: {', '.join(self.available) or '(none)'}"


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            try:
                obj.name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# Populated by the modules under methods/, harness/metrics/ and harness/data/.
METHODS: Registry = Registry("method")
METRICS: Registry = Registry("metric")
DATASET_FORMATS: Registry = Registry("dataset format")
