"""Typed registries with explicit registration, and plugins from outside packages.

Each method, metric and dataset format registers itself with a decorator in its own module;
the package ``__init__`` of ``methods``, ``harness.metrics`` and ``harness.data`` imports those
modules explicitly, so the set of the harness's own names is visible in code, not discovered by
getattr. Outside packages add theirs through entry points (:mod:`harness.plugins`): on the first
lookup or listing a registry imports its package of own entries, then loads its entry point
group, once per process. A plugin that fails to load is logged and raised only when its name is
looked up.
"""
from __future__ import annotations

import importlib
import threading
import types
from typing import Callable, Generic, Iterator, TypeVar

from .plugins import DATASETS_GROUP, METHODS_GROUP, METRICS_GROUP, PluginError, load_group

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown method, metric or dataset format; the message lists what exists (and the
    plugins that failed to load, which may be where the name was meant to come from)."""

    def __init__(self, kind: str, name: str, available: list[str], broken: list[str] | None = None):
        self.kind, self.name, self.available = kind, name, available
        self.broken = list(broken or [])
        super().__init__(name)

    def __str__(self) -> str:
        text = f"unknown {self.kind} '{self.name}'; available: {', '.join(self.available) or '(none)'}"
        if self.broken:
            text += "; plugins that failed to load: " + "; ".join(self.broken)
        return text


class PluginLoadError(UnknownNameError):
    """A name whose plugin (entry point) failed to load; the message names the entry point."""

    def __init__(self, kind: str, name: str, available: list[str], error: PluginError):
        super().__init__(kind, name, available)
        self.error = error

    def __str__(self) -> str:
        return f"{self.kind} '{self.name}' is not available: {self.error}"


class Registry(Generic[T]):
    """Names -> objects of one kind.

    ``builtin``: the module whose import registers the harness's own entries (imported on first
    use, so that they always take their names before any plugin); ``entry_point_group``: the
    entry point group outside packages fill (:mod:`harness.plugins`).
    """

    def __init__(self, kind: str, builtin: str | None = None, entry_point_group: str | None = None):
        self.kind = kind
        self.builtin = builtin
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._errors: dict[str, PluginError] = {}
        # "new" -> "loading" -> "done". Re-entrant: a plugin's import that looks a name up while
        # its group loads sees the entries so far instead of recursing; other threads wait.
        self._state = "new"
        self._lock = threading.RLock()

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

    # -- plugins ----------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._state == "done":
            return
        with self._lock:
            if self._state != "new":
                return  # done meanwhile, or this thread is loading (a lookup from a plugin's import)
            self._state = "loading"
            try:
                if self.builtin:
                    importlib.import_module(self.builtin)
            except BaseException:
                self._state = "new"  # a broken harness is not a plugin problem: raise, retry next time
                raise
            try:
                if self.entry_point_group:
                    for err in load_group(self.entry_point_group, self._accept_entry_point):
                        self._errors.setdefault(err.name, err)
            finally:
                self._state = "done"

    def _accept_entry_point(self, name: str, obj: object) -> None:
        """Register what an entry point loaded: an object under the entry point's name, or a
        module whose import has registered that name itself."""
        if isinstance(obj, types.ModuleType):
            if name not in self._items:
                raise ValueError(f"importing module '{obj.__name__}' registered no {self.kind} named '{name}' "
                                 f"(the entry point's name must be the registered name)")
            return
        own = [n for n, o in self._items.items() if o is obj]
        if own and name not in own:
            raise ValueError(f"{obj!r} is registered as {self.kind} '{own[0]}', but the entry point names it '{name}'")
        if name in self._items and self._items[name] is not obj:
            taken = self._items[name]
            where = getattr(taken, "__module__", "?") + "." + getattr(taken, "__qualname__", repr(taken))
            raise ValueError(f"{self.kind} '{name}' is already registered (by {where})")
        self.register(name)(obj)  # type: ignore[arg-type]

    def load_errors(self) -> list[PluginError]:
        """The entry points of this registry's group that failed to load."""
        self._ensure_loaded()
        return list(self._errors.values())

    # -- lookups ----------------------------------------------------------------------------
    def get(self, name: str) -> T:
        self._ensure_loaded()
        try:
            return self._items[name]
        except KeyError:
            pass
        if name in self._errors:
            raise PluginLoadError(self.kind, name, self.names(), self._errors[name])
        raise UnknownNameError(self.kind, name, self.names(), [str(e) for e in self._errors.values()])

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# The harness's own entries are registered by the modules under methods/, harness/metrics/ and
# harness/data/ (imported on first use); outside packages add theirs through entry points.
METHODS: Registry = Registry("method", builtin="methods", entry_point_group=METHODS_GROUP)
METRICS: Registry = Registry("metric", builtin="harness.metrics", entry_point_group=METRICS_GROUP)
DATASET_FORMATS: Registry = Registry("dataset format", builtin="harness.data", entry_point_group=DATASETS_GROUP)
