"""``instruct_pix2pix``: InstructPix2Pix (Brooks, Holynski, Efros, CVPR 2023) through diffusers'
``StableDiffusionInstructPix2PixPipeline``.

Defaults are the pipeline's own ``__call__`` defaults (diffusers 0.42,
``pipeline_stable_diffusion_instruct_pix2pix.py``: ``num_inference_steps=100``,
``guidance_scale=7.5``, ``image_guidance_scale=1.5``), which is what ZONE's baselines used
(ZONE, appendix C.1: "we uniformly adopt the implementation from the diffusers project for IP2P,
MagicBrush, ... and use their default parameters"), at 512 x 512 (ZONE, appendix "More evaluation
details": 512 x 512 inputs for every method). The scheduler is the checkpoint's own.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from harness.registry import METHODS

from ._diffusion_common import TINY_STEPS, DiffusionMethod, _check_number, auto_field


class InstructPix2PixBase(DiffusionMethod):
    """An instruction-following editor with the InstructPix2Pix pipeline (shared by MagicBrush)."""

    version = "1"
    requires = ("source", "instruction")
    tiny_kind = "ip2p"  # 8-input-channel UNet: noisy latent + image latent
    prompt_field = "instruction"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "timbrooks/instruct-pix2pix"  # the authors' diffusers checkpoint
        num_inference_steps: int | Literal["auto"] = auto_field(100, TINY_STEPS)  # diffusers IP2P pipeline default
        guidance_scale: float = 7.5  # text guidance s_T; diffusers IP2P pipeline default
        image_guidance_scale: float = 1.5  # image guidance s_I; diffusers IP2P pipeline default

        def __post_init__(self) -> None:
            super().__post_init__()
            _check_number("instruct_pix2pix", "image_guidance_scale", self.image_guidance_scale, 0.0)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        return StableDiffusionInstructPix2PixPipeline

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        p = self.params
        return pipe(
            prompt=prompt,
            image=image,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            image_guidance_scale=p.image_guidance_scale,
            generator=generator,
            output_type="np",
        )

    def extra_info(self) -> dict[str, Any]:
        return {"image_guidance_scale": float(self.params.image_guidance_scale)}


@METHODS.register("instruct_pix2pix")
class InstructPix2Pix(InstructPix2PixBase):
    """InstructPix2Pix with the authors' weights (``timbrooks/instruct-pix2pix``)."""
