"""``diffedit``: DiffEdit (Couairon, Verbeek, Schwenk, Cord, ICLR 2023) through diffusers'
``StableDiffusionDiffEditPipeline``.

Three calls per edit, as in diffusers' DiffEdit guide (``using-diffusers/diffedit``):

1. ``generate_mask(image, source_prompt=source_caption, target_prompt=target_caption)``: the
   mask is where the noise estimates conditioned on the two captions differ;
2. ``invert(prompt=source_caption, image)``: DDIM-inverted latents of the source (up to
   ``inpaint_strength`` of the schedule);
3. ``__call__(prompt=target_caption, mask_image=mask, image_latents=latents,
   negative_prompt=source_caption)``: denoising toward the target caption, outside the mask kept
   on the inverted trajectory.

The scheduler pair is DDIM / DDIM-inverse built from the checkpoint's scheduler config, as the
pipeline's own docstring example sets them (a checkpoint has no ``inverse_scheduler``).

Defaults: the pipeline's defaults (diffusers 0.42: ``mask_encode_strength=0.5``,
``num_maps_per_mask=10``, ``mask_thresholding_ratio=3.0``, ``inpaint_strength=0.8``,
``num_inference_steps=50``, ``guidance_scale=7.5``; ZONE, appendix C.1: diffusers' implementation
with its default parameters) on Stable Diffusion 1.5 (ZONE, appendix C.1: "we employ Stable
Diffusion 1.5 as the base model" for every baseline; diffusers' example uses
``stabilityai/stable-diffusion-2-1``: set ``model`` for that). Working resolution 768 x 768
(ZONE, "More evaluation details": "DiffEdit requires image inputs with a resolution of 768 x 768
... we first resize the test images to 768 x 768 ... and resize the outputs back"); the edit is
resized back to the source size (bicubic) and the generated mask (latent grid) to the source grid
(nearest) and returned as the method's mask.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import (TINY_RESOLUTION, TINY_STEPS, DiffusionMethod, _check_number, auto_field, check_unit,
                                use_ddim_pair)


def mask_to_grid(mask: Any, size_hw: tuple[int, int]) -> np.ndarray:
    """A pipeline mask (array of any leading shape ending in HxW, values in [0, 1]) -> bool mask of
    ``size_hw`` (nearest-neighbour resize, threshold 0.5)."""
    from PIL import Image

    arr = np.asarray(mask, dtype=np.float32)
    arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 else arr
    u8 = (arr >= 0.5).astype(np.uint8) * 255
    h, w = size_hw
    if u8.shape != (h, w):
        u8 = np.asarray(Image.fromarray(u8, mode="L").resize((w, h), Image.NEAREST))
    return np.ascontiguousarray(u8 >= 128)


@METHODS.register("diffedit")
class DiffEdit(DiffusionMethod):
    """Mask from caption contrast, DDIM inversion, masked denoising toward the target caption."""

    version = "1"
    requires = ("source", "source_caption", "target_caption")
    tiny_kind = "sd15"
    prompt_field = "target_caption"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # ZONE C.1: SD 1.5 for every baseline
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # diffusers DiffEdit default (mask, inversion and editing)
        guidance_scale: float = 7.5  # diffusers DiffEdit default (mask, editing; invert() keeps its own, also 7.5)
        resolution: int | Literal["auto"] | None = auto_field(768, TINY_RESOLUTION)  # ZONE, evaluation details: DiffEdit run at 768 x 768, resized back
        mask_encode_strength: float = 0.5  # diffusers generate_mask default
        num_maps_per_mask: int = 10  # diffusers generate_mask default
        mask_thresholding_ratio: float = 3.0  # diffusers generate_mask default
        inpaint_strength: float = 0.8  # diffusers invert / __call__ default

        def __post_init__(self) -> None:
            super().__post_init__()
            check_unit("diffedit", "mask_encode_strength", self.mask_encode_strength, low_open=True)
            check_unit("diffedit", "inpaint_strength", self.inpaint_strength, low_open=True)
            _check_number("diffedit", "num_maps_per_mask", self.num_maps_per_mask, 1, integer=True)
            _check_number("diffedit", "mask_thresholding_ratio", self.mask_thresholding_ratio, 0.0, inclusive=False)

    def __init__(self, params: "DiffEdit.Params | None" = None):
        super().__init__(params)
        self._sample: Sample | None = None
        self._mask: Any = None

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionDiffEditPipeline

        return StableDiffusionDiffEditPipeline

    text_fields = ("source_caption", "target_caption")

    def prepare(self) -> None:
        super().prepare()
        use_ddim_pair(self._loaded.pipeline)  # as in the pipeline's docstring example

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        p = self.params
        assert self._sample is not None
        source_prompt = str(self._sample.source_caption)
        mask = pipe.generate_mask(
            image=image,
            source_prompt=source_prompt,
            target_prompt=prompt,
            num_maps_per_mask=p.num_maps_per_mask,
            mask_encode_strength=p.mask_encode_strength,
            mask_thresholding_ratio=p.mask_thresholding_ratio,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            generator=generator,
            output_type="np",
        )
        latents = pipe.invert(
            prompt=source_prompt,
            image=image,
            num_inference_steps=p.num_inference_steps,
            inpaint_strength=p.inpaint_strength,
            generator=generator,
        ).latents
        self._mask = mask
        return pipe(
            prompt=prompt,
            mask_image=mask,
            image_latents=latents,
            negative_prompt=source_prompt,
            inpaint_strength=p.inpaint_strength,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            generator=generator,
            output_type="np",
        )

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        self._sample, self._mask = sample, None
        try:
            out = super().edit(sample, seed)
            mask = self._mask
        finally:
            self._sample, self._mask = None, None
        h, w = np.asarray(sample.source).shape[:2]
        grid = mask_to_grid(mask, (h, w))
        out.info["source_caption"] = str(sample.source_caption)
        out.info["mask_grid_hw"] = [int(s) for s in np.asarray(mask).shape[-2:]]
        out.info["mask_fraction"] = float(grid.mean())
        return MethodOutput(image=out.image, mask=grid, info=out.info)

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {
            "mask_encode_strength": float(p.mask_encode_strength),
            "num_maps_per_mask": int(p.num_maps_per_mask),
            "mask_thresholding_ratio": float(p.mask_thresholding_ratio),
            "inpaint_strength": float(p.inpaint_strength),
            "scheduler": "DDIMScheduler + DDIMInverseScheduler",
        }
