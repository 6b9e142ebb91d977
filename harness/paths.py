"""Where the harness's own files are: the Hydra configs and the embedded sample set.

In a checkout (and an editable install) they are the repository's ``conf/`` and ``datasets/``.
An installed wheel (``pip install .``) carries the same two folders inside the package, as
``harness/_resources/conf`` and ``harness/_resources/datasets`` (pyproject.toml maps them there;
the source tree never holds a copy). Everything that looks a config or the sample set up goes
through this module, so that the rest of the harness does not care where they are installed.

Outside packages add config trees of their own (entry point group ``edit_harness.conf``, see
:mod:`harness.plugins`); :func:`config_dirs` lists them after the harness's own, in the order
Hydra searches them.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
#: Where a wheel install puts ``conf/`` and ``datasets/`` (absent in a checkout).
_INSTALLED = _PACKAGE / "_resources"


def _resource_root() -> Path:
    """``harness/_resources`` in a wheel install, else the repository (checkout, editable install)."""
    if (_INSTALLED / "conf" / "config.yaml").is_file():
        return _INSTALLED
    return _PACKAGE.parent


#: The folder holding ``conf/`` and ``datasets/``.
RESOURCE_ROOT = _resource_root()
#: The harness's own Hydra config tree (groups ``method``, ``dataset``, ``metrics``, ``experiment``).
CONF_DIR = RESOURCE_ROOT / "conf"
#: The embedded sample set.
SAMPLE_DIR = RESOURCE_ROOT / "datasets" / "sample"


def config_dirs() -> list[Path]:
    """Every config tree Hydra searches, the harness's own first, then the outside packages'
    (entry point group ``edit_harness.conf``, by entry point name). The first tree that holds a
    group option wins, in Hydra as in :func:`config_file`."""
    from .plugins import plugin_config_dirs

    return [CONF_DIR, *plugin_config_dirs()]


def group_options(group: str) -> list[str]:
    """The config names of a group (``method``, ``dataset``, ...) across :func:`config_dirs`."""
    return sorted({p.stem for d in config_dirs() for p in (d / group).glob("*.yaml")})


def config_file(group: str, name: str) -> Path | None:
    """The YAML file of one group option (the first config tree that has it), or None."""
    for d in config_dirs():
        p = d / group / f"{name}.yaml"
        if p.is_file():
            return p
    return None
