"""Methods, metrics, dataset formats and Hydra configs from outside packages (entry points).

An outside package plugs into the harness without editing it by declaring Python entry points
in its ``pyproject.toml`` (``[project.entry-points."<group>"]``):

======================  =====================  ==================================================
group                   entry point name       value
======================  =====================  ==================================================
edit_harness.methods    the method's name      its ``harness.method.Method`` subclass
                                               (``pkg.module:Class``), or a module whose import
                                               registers that name (``@METHODS.register``)
edit_harness.metrics    the metric's name      its ``Metric`` subclass, or such a module
edit_harness.datasets   the format's name      its dataset loader class, or such a module
edit_harness.conf       any (sorts the trees)  a package (``pkg.conf``) whose folder holds config
                                               groups ``method/``, ``dataset/``, ``metrics/``,
                                               ``experiment/``; or ``pkg.module:ATTR``, a path
======================  =====================  ==================================================

The registries (:mod:`harness.registry`) load their group lazily, once per process, on the
first lookup or listing, after the harness's own entries; the config trees are added to
Hydra's search path by the SearchPathPlugin in ``hydra_plugins/edit_harness_searchpath`` and
listed by :func:`harness.paths.config_dirs` (the CLI's pre-check and ``list`` read them there).

An entry point that fails to load (an import error, a name the harness or another plugin has
already taken, a value of the wrong kind, a missing config folder) becomes a
:class:`PluginError` naming the entry point and its distribution: it is logged once as a
warning, and raised only when its name is looked up, so a broken plugin does not stop the
commands that do not use it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("edit_harness")

METHODS_GROUP = "edit_harness.methods"
METRICS_GROUP = "edit_harness.metrics"
DATASETS_GROUP = "edit_harness.datasets"
CONF_GROUP = "edit_harness.conf"
#: The config groups a plugin's config tree may hold (at least one of them).
CONFIG_GROUPS = ("method", "dataset", "metrics", "experiment")


@dataclasses.dataclass(frozen=True)
class PluginError:
    """One entry point that failed to load, and why."""

    group: str
    name: str
    value: str
    distribution: str
    error: str

    def __str__(self) -> str:
        return (f"entry point '{self.name} = {self.value}' in group '{self.group}' "
                f"(distribution {self.distribution}) failed to load: {self.error}")


def entry_points(group: str) -> list[metadata.EntryPoint]:
    """The group's entry points from every installed distribution, sorted by (name, distribution)
    so that the load order (and which of two same-named entry points wins) is reproducible."""
    return sorted(metadata.entry_points(group=group), key=lambda ep: (ep.name, _distribution(ep)))


def _distribution(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?"
    return f"{dist.metadata['Name']} {dist.version}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _error(ep: metadata.EntryPoint, exc: BaseException) -> PluginError:
    err = PluginError(ep.group, ep.name, ep.value, _distribution(ep), _describe(exc))
    log.warning("%s", err)
    # The traceback, for the plugin's author, without burying the one-line warning.
    log.debug("entry point '%s' traceback", ep.name, exc_info=exc)
    return err


def load_group(group: str, accept: Callable[[str, Any], None]) -> list[PluginError]:
    """Load every entry point of ``group`` and hand ``(name, loaded object)`` to ``accept``.

    ``accept`` registers the object (and raises when it cannot). Whatever an entry point raises
    on import or registration (SystemExit included: a plugin must not end the process) becomes
    a :class:`PluginError`, logged once; the others still load.
    """
    errors: list[PluginError] = []
    for ep in entry_points(group):
        try:
            accept(ep.name, ep.load())
        except (Exception, SystemExit) as e:
            errors.append(_error(ep, e))
    return errors


def _config_dirs_of(ep: metadata.EntryPoint) -> list[Path]:
    """The config folder(s) an ``edit_harness.conf`` entry point names (see the module doc)."""
    if ep.attr:
        folders = [Path(ep.load())]  # a str or Path attribute; anything else is a TypeError
    else:
        # A package's folder(s), found without importing the package itself (only its parents).
        spec = importlib.util.find_spec(ep.module)
        if spec is None:
            raise ModuleNotFoundError(f"no package named '{ep.module}'")
        if not spec.submodule_search_locations:
            raise ValueError(f"'{ep.module}' is a module, not a package (a folder of config groups)")
        folders = [Path(p) for p in spec.submodule_search_locations]
    out = []
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"config folder not found: {folder}")
        if not any((folder / g).is_dir() for g in CONFIG_GROUPS):
            raise ValueError(f"config folder {folder} holds none of the config groups {', '.join(CONFIG_GROUPS)}")
        out.append(folder.resolve())
    return out


def load_config_trees(group: str = CONF_GROUP) -> tuple[list[Path], list[PluginError]]:
    """Every config folder the group's entry points name (in entry point order), and the errors."""
    dirs: list[Path] = []
    errors: list[PluginError] = []
    for ep in entry_points(group):
        try:
            found = _config_dirs_of(ep)
        except (Exception, SystemExit) as e:
            errors.append(_error(ep, e))
            continue
        dirs.extend(d for d in found if d not in dirs)
    return dirs, errors


@functools.lru_cache(maxsize=None)
def _config_trees() -> tuple[tuple[Path, ...], tuple[PluginError, ...]]:
    dirs, errors = load_config_trees()
    return tuple(dirs), tuple(errors)


def plugin_config_dirs() -> list[Path]:
    """The outside packages' config trees (entry point group ``edit_harness.conf``), loaded once."""
    return list(_config_trees()[0])


def load_errors() -> list[PluginError]:
    """Every entry point that failed to load, across the four groups (loading them all now)."""
    from .registry import DATASET_FORMATS, METHODS, METRICS

    return [*METHODS.load_errors(), *METRICS.load_errors(), *DATASET_FORMATS.load_errors(), *_config_trees()[1]]
