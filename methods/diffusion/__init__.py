"""Shared diffusion plumbing for method adapters (model loading, tiny test backbones, attention).

Nothing here imports torch or diffusers at import time; the heavy imports happen inside the
functions that need them, so ``import methods`` stays cheap.

- :mod:`.loading`: :class:`ModelSpec`, :func:`load_pipeline` (offline-first, once per process),
  :class:`MissingWeights`, :class:`UnsupportedSetting`.
- :mod:`.tiny`: random-weight tiny SD 1.5 / InstructPix2Pix / SDXL components of the real classes
  for tests and ``backbone=tiny`` smoke runs, labelled :data:`RANDOM_WEIGHTS_LABEL`.
- :mod:`.counting`: forward calls and batch rows of each network per edit (``info["network_calls"]``,
  ``info["network_rows"]``), a cost figure that does not depend on the machine.
"""
from __future__ import annotations

from .loading import (
    LoadedPipeline,
    MissingWeights,
    ModelSpec,
    UnsupportedSetting,
    load_pipeline,
    resolve_revision,
)
from .tiny import RANDOM_WEIGHTS_LABEL, tiny_pipeline

__all__ = [
    "LoadedPipeline",
    "MissingWeights",
    "ModelSpec",
    "RANDOM_WEIGHTS_LABEL",
    "UnsupportedSetting",
    "load_pipeline",
    "resolve_revision",
    "tiny_pipeline",
]
