"""Hydra SearchPathPlugin: the config trees of outside packages (entry point group
``edit_harness.conf``, see :mod:`harness.plugins`) join edit-harness's search path.

Hydra finds this module by scanning the ``hydra_plugins`` namespace package, in every Hydra
application of the environment; it changes the search path only of an application whose
search path holds edit-harness's own config tree (``harness.paths.CONF_DIR``): the ``run``
command and the compose calls of the CLI. The trees come after the harness's own, in the order
of :func:`harness.paths.config_dirs`, so the pre-check and ``list`` see what Hydra composes.
"""
from __future__ import annotations

import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

_FILE = "file://"


def _folder(path: str) -> str | None:
    """A search path element's folder (None for ``pkg://`` and other providers' schemes)."""
    if path.startswith(_FILE):
        path = path[len(_FILE):]
    elif "://" in path:
        return None
    return os.path.realpath(path)


class EditHarnessSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Imported here, not at Hydra's plugin scan: other Hydra applications do not pay for it.
        from harness import paths

        own = os.path.realpath(paths.CONF_DIR)
        present = {_folder(e.path) for e in search_path.get_path()}
        if own not in present:
            return  # not edit-harness
        for folder in paths.config_dirs()[1:]:
            if str(folder) not in present:
                search_path.append(provider="edit-harness-plugin", path=f"{_FILE}{folder}")
