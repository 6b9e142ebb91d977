"""Dataset format loaders. Importing this package registers every format."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

from ..registry import DATASET_FORMATS

# `python -m harness.data.zone` (ZONE's converter) runs a module this package has already imported
# (below, to register its format); runpy warns about that, and the module's __main__ block runs
# the imported copy instead (harness/data/zone.py). Only that exact message is silenced.
warnings.filterwarnings("ignore", message=r"'harness\.data\.zone' found in sys\.modules after import of package",
                        category=RuntimeWarning)

from . import generic  # noqa: E402,F401  (registers "generic")
from . import pie_bench, magicbrush  # noqa: E402,F401  (register "pie_bench", "magicbrush")
from . import zone  # noqa: E402,F401  (registers "zone": ZONE's test set, converted)
from . import partedit_bench  # noqa: E402,F401  (registers "partedit_bench": PartEdit-Bench's parquet files)
from . import tedbench, imba  # noqa: E402,F401  (register "tedbench" (TEdBench's parquet) and "imba" (IMBA-format folders))
from .generic import GenericDataset, SampleRef

from ..paths import RESOURCE_ROOT


def resolve_root(root: str | Path) -> Path:
    """A dataset root as given, else relative to the working directory, else to the harness's
    resources (``datasets/sample`` is the embedded sample set wherever the harness is installed)."""
    p = Path(root).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = RESOURCE_ROOT / p
    return alt if alt.exists() else p


def open_dataset(cfg: Mapping[str, Any]):
    """Build a dataset loader from a ``conf/dataset/*.yaml`` mapping (keys: format, root, ...)."""
    cfg = dict(cfg)
    if any(isinstance(v, str) and "${" in v for v in cfg.values()):
        # A card read as plain YAML (``edit-harness validate``) still holds Hydra interpolations
        # such as ``name: magicbrush_${.setting}``: resolve them as Hydra would.
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    fmt = cfg.pop("format", "generic")
    loader = DATASET_FORMATS.get(fmt)
    if "root" not in cfg:
        raise ValueError(f"dataset config '{cfg.get('name', '?')}' has no 'root'")
    cfg["root"] = resolve_root(cfg["root"])
    how_to_obtain = cfg.get("how_to_obtain")
    for key in ("license", "description", "source", "how_to_obtain"):
        cfg.pop(key, None)
    try:
        return loader(**cfg)
    except FileNotFoundError as e:
        # The harness never downloads: a missing dataset is answered with its card's instructions,
        # on the same line (a run's check prints one line per problem).
        if not how_to_obtain:
            raise
        how = " ".join(str(how_to_obtain).split())
        raise FileNotFoundError(
            f"{e}; how to obtain dataset '{cfg.get('name') or fmt}' (set dataset.root=PATH to point at it): {how}"
        ) from None


__all__ = ["GenericDataset", "SampleRef", "open_dataset", "resolve_root", "DATASET_FORMATS"]
