"""``diffeditor``: DiffEditor (Mou, Wang, Song, Shan, Zhang, CVPR 2024; ``shared/papers/diffeditor.md``;
official code ``MC-E/DragonDiffusion``, alg ``'D+'`` of ``src/models/Sampler.py``).

DragonDiffusion's energy-guided editing on SD 1.5 (drag, face landmarks, move, paste, appearance;
the task from the sample's fields) plus the paper's three additions, each a switch for the
ablation (``experiment=diffeditor_ablation``):

- ``image_prompt``: the image-prompt encoder (sec. 3.3; OpenCLIP ViT-H/14 + resampler, decoupled
  cross-attention added with gamma = ``ip_scale``), on steps 10 <= i < 20 (code); needs the released
  ``ip_sd15_64.bin`` as a local file (``ip_weights``) and the ``h94/IP-Adapter`` image encoder;
- ``regional_sde``: stochastic DDIM steps inside the edit region on 10 < i < 20 (sec. 3.4, Eq. 7);
- ``time_travel``: guided steps 22, 24, 26, 28 repeated U = 3 times, rolled back by one
  deterministic DDIM inversion step (sec. 3.5, Alg. 1);
- regional gradient guidance (Eq. 8, ``regional_guidance``) and the sparser guidance schedule
  (every step for i < 10, even steps to i < 30).

Where paper and code differ (both offered; defaults and reasons in ``conf/method/diffeditor.yaml``):
CFG 5 (paper sec. 4.1, default) vs the demo's per-task 4/5 (``cfg_variant: demo``); SDE noise
outside the edit region 0 (code, default) vs 0.2 (paper Eq. 7, ``variant: paper``); guidance on
every step for i < 10 (code, default) vs even steps only (paper Alg. 1, ``guidance_rule: paper``).
The shared code lives in ``methods/dragon/`` (its ``method.py`` holds the adapter).
"""
from __future__ import annotations

from typing import ClassVar

from harness.registry import METHODS

from .dragon.method import DragonMethod


@METHODS.register("diffeditor")
class DiffEditor(DragonMethod):
    """DiffEditor (see the module docstring)."""

    algorithm: ClassVar[str] = "diffeditor"
