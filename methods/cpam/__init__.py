"""CPAM: context-preserving adaptive manipulation for zero-shot real image editing
(Vo et al., 2025; no official code).

One file per stage, as methods/zone/ and methods/partedit/:

- ``masks.py``      target-mask strategies per edit type, refinement schedule, SAM source masks
- ``attention.py``  the Preservation Adaptation (self-attention) and Localized Extraction
                    (cross-attention) controllers
- ``sampler.py``    inversion of the real image and the two-branch (source, target) sampling loop
- ``method.py``     the harness adapter, registered as ``cpam``

Importing this package registers the method and imports no torch: the stage modules import it
inside their functions or are imported lazily by ``method``.
"""
from __future__ import annotations

from . import method  # noqa: F401  (registers "cpam")
