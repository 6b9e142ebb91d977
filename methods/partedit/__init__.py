"""PartEdit (Cvejic et al., 2025): fine-grained part editing with learned part tokens.

One file per stage, as methods/zone/:

- ``mask.py``        part-mask aggregation and binarisation
- ``tokens.py``      the learned part tokens: names, loading, status
- ``train.py``       token optimisation
- ``controller.py``  the three-branch attention controller (query sharing, token capture,
                     Prompt-to-Prompt replacement, feature blending)
- ``sampler.py``     the three-path SDXL sampling loop (source, edit, localisation)
- ``method.py``      the harness adapter, registered as ``partedit``

Importing this package registers the method and imports no torch.
"""
from __future__ import annotations

from . import method  # noqa: F401  (registers "partedit"; the stage modules import torch lazily)
