"""``sdxl_inpaint``: SDXL inpainting (the SD-XL Inpainting 0.1 checkpoint,
``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``: SDXL base 1.0 fine-tuned with a
9-input-channel UNet) through diffusers' ``StableDiffusionXLInpaintPipeline``: the sample's mask is
repainted, conditioned on the target caption. PartEdit (Table 1, "Mask-Based Editing", sec. 4)
compares with "SDXL Inpainting" run on the ground-truth part masks; this adapter is that baseline
(the sample's mask is the given mask).

Defaults: PartEdit does not state the sampler settings of its SDXL Inpainting baseline, so the
values of the checkpoint's model card ("How to use" in the README of
huggingface.co/diffusers/stable-diffusion-xl-1.0-inpainting-0.1) are used:
``guidance_scale=8.0``, ``num_inference_steps=20`` ("steps between 15 and 30 work well for us"),
``strength=0.99`` ("make sure to use `strength` below 1.0"), on images resized to 1024 x 1024
(the model was trained at 1024 x 1024). For reference, the pipeline's own ``__call__`` defaults
(diffusers 0.42, ``pipeline_stable_diffusion_xl_inpaint.py``) are ``strength=0.9999``,
``num_inference_steps=50``, ``guidance_scale=7.5``; sweep them with ``method.<name>=...``.
With strength s, min(int(steps * s), steps) denoising steps run (19 of 20 by default).

``paste_back`` (default false): PartEdit reports a finite PSNR (34.2) and SSIM 0.96 on the
unedited region for SDXL Inpainting, i.e. it scored the pipeline's full decoded image (VAE round
trip outside the mask), so the pipeline output is kept as is by default; ``paste_back=true`` copies
the source pixels outside the sample's mask (on the source grid) back into the result, making the
unedited region exactly the source, as ``sd_inpaint`` does by default.

The source and the mask are resized to the working size (bicubic / nearest) and the result back to
the source size (bicubic). The diffusers pipeline applies SDXL's invisible watermark only when the
``invisible-watermark`` package is installed (diffusers' ``add_watermarker=None`` rule).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from harness.registry import METHODS

from ._diffusion_common import TINY_RESOLUTION, TINY_STEPS, DiffusionMethod, auto_field
from .sd_inpaint import MaskedInpaintMethod, check_paste_back, check_strength


@METHODS.register("sdxl_inpaint")
class SDXLInpaint(MaskedInpaintMethod):
    """Repaint the sample's mask toward the target caption with SDXL inpainting."""

    version = "1"
    requires = ("source", "mask", "target_caption")
    tiny_kind = "sdxl_inpaint"  # SDXL-like UNet with 9 input channels, two text encoders
    prompt_field = "target_caption"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"  # SD-XL Inpainting 0.1 (model card)
        num_inference_steps: int | Literal["auto"] = auto_field(20, TINY_STEPS)  # model card example ("steps between 15 and 30 work well"); diffusers default 50
        guidance_scale: float = 8.0  # model card example; diffusers default 7.5
        strength: float = 0.99  # model card example ("use strength below 1.0"); diffusers default 0.9999
        paste_back: bool = False  # false = pipeline output as is (PartEdit's finite unedited-region PSNR)
        resolution: int | Literal["auto"] | None = auto_field(1024, TINY_RESOLUTION)  # the checkpoint's training size (model card)

        def __post_init__(self) -> None:
            super().__post_init__()
            check_strength("sdxl_inpaint", self.strength)
            check_paste_back("sdxl_inpaint", self.paste_back)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionXLInpaintPipeline

        return StableDiffusionXLInpaintPipeline
