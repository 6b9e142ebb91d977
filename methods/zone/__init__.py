"""ZONE: zero-shot instruction-guided local editing (Li et al., CVPR 2024; code lsl001006/ZONE).

A package because the method has several stages, each in a file named for it: ``sampler`` (the
fused InstructPix2Pix + MagicBrush denoising loop), ``action`` (the add/change/remove classifier),
``localise`` (the rough mask from IP2P's cross-attention), ``refine`` (SAM refinement), ``smoother``
(the FFT edge smoother and composite) and ``method`` (the harness adapter, registered as "zone").
Importing this package registers the method and imports no torch: ``method`` imports the
stage modules inside its functions.
"""
from . import method  # noqa: F401  (registers "zone")
