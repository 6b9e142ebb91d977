"""Installed versions of the libraries whose numerics define an edit or a score.

Both cache keys use them (issue 10): a method's edit key (:meth:`harness.method.Method.library_versions`)
and a metric suite's entry hash (:meth:`harness.metrics.base.Metric.library_versions`), so an upgrade
recomputes instead of mixing two numerical conventions in one table.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import metadata

#: Names standing for any of several distributions of one library (the first installed counts).
LIBRARY_ALIASES: dict[str, tuple[str, ...]] = {
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
               "opencv-contrib-python"),
    "dlib": ("dlib", "dlib-bin"),
}


@functools.lru_cache(maxsize=None)  # read once per process (importlib.metadata, no import)
def installed_version(name: str) -> str | None:
    """The installed version of a distribution (or of an alias in :data:`LIBRARY_ALIASES`); None
    when it is not installed."""
    for dist in LIBRARY_ALIASES.get(name, (name,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    """``{library: installed version or None}`` for the given names, sorted by name."""
    return {n: installed_version(n) for n in sorted(set(names))}
