"""Dataset format loaders. Importing this package registers every format."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..registry import DATASET_FORMATS
from . import generic  # noqa: F401  (registers "generic")
from .generic import GenericDataset, SampleRef

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_root(root: str | Path) -> Path:
    """A dataset root as given, else relative to the working directory, else to the repository."""
    p = Path(root).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def open_dataset(cfg: Mapping[str, Any]):
    """Build a dataset loader from a ``conf/dataset/*.yaml`` mapping (keys: format, root, ...)."""
    cfg = dict(cfg)
    fmt = cfg.pop("format", "generic")
    loader = DATASET_FORMATS.get(fmt)
    if "root" not in cfg:
        raise ValueError(f"dataset config '{cfg.get('name', '?')}' has no 'root'")
    cfg["root"] = resolve_root(cfg["root"])
    for key in ("license", "description", "source", "how_to_obtain"):
        cfg.pop(key, None)
    return loader(**cfg)


__all__ = ["GenericDataset", "SampleRef", "open_dataset", "resolve_root", "DATASET_FORMATS"]
