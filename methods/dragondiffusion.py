"""``dragondiffusion``: DragonDiffusion (Mou, Wang, Xie, Wu, Zhang, Shan, ICLR 2024; official code
``MC-E/DragonDiffusion``, alg ``'D'`` of ``src/models/Sampler.py``).

Energy-guided editing on SD 1.5 with a feature estimator (a second UNet), the memory bank
("visual cross-attention": decoder self-attention keys / values from the DDIM inversion) and
deterministic DDIM sampling: guidance on every step i < 30, no image prompt, no regional SDE, no
time travel. The edit and content gradients are summed over the whole latent (the DragonDiffusion
paper's energy; ``regional_guidance: false``); the released code's ``'D'`` mode shares
``Sampler.guidance_*`` with DiffEditor and so mixes them by the edit mask (Eq. 8 of DiffEditor):
``regional_guidance: true`` is that variant.

The official code builds the classifier-free-guidance context only when image tokens are passed,
so its DragonDiffusion mode needs DiffEditor's image prompt (at scale 0) to run; ours does not
load or need any image prompt. Shared code: ``methods/dragon/``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from harness.registry import METHODS

from .dragon.method import DragonMethod

_OFF = ("image_prompt", "regional_sde", "time_travel")


@METHODS.register("dragondiffusion")
class DragonDiffusion(DragonMethod):
    """DragonDiffusion (see the module docstring)."""

    algorithm: ClassVar[str] = "dragondiffusion"

    @dataclasses.dataclass(frozen=True)
    class Params(DragonMethod.Params):
        regional_guidance: bool = False  # the paper's summed gradient; true = the released code's 'D' mode
        regional_sde: bool = False
        time_travel: bool = False
        image_prompt: bool = False

        def __post_init__(self) -> None:
            super().__post_init__()
            on = [name for name in _OFF if getattr(self, name)]
            if on:
                raise ValueError(f"dragondiffusion: {', '.join(on)} belong to DiffEditor (method 'diffeditor'); "
                                 f"dragondiffusion runs with them off")

