"""``sd_inpaint``: Stable Diffusion inpainting (Rombach et al., CVPR 2022; the 9-input-channel
SD 1.5 inpainting checkpoint) through diffusers' ``StableDiffusionInpaintPipeline``: the sample's
mask is repainted, conditioned on the target caption.

Defaults: the pipeline's ``__call__`` defaults (diffusers 0.42,
``pipeline_stable_diffusion_inpaint.py``: ``strength=1.0``, ``num_inference_steps=50``,
``guidance_scale=7.5``) with the checkpoint of its docstring example,
``stable-diffusion-v1-5/stable-diffusion-inpainting`` (the maintained mirror of runwayml's), at
SD 1.5's native 512 x 512. The source and the mask are resized to the working size (bicubic /
nearest) and the result back to the source size (bicubic).

``paste_back`` (default true): the pipeline decodes the whole image through the VAE, so even the
pixels outside the mask change (VAE round trip, resizing). With ``paste_back`` the source pixels
outside the sample's mask (on the source grid) are copied back into the result, as mask-given
inpainting is usually evaluated (the unedited region is then exactly the source); false keeps the
pipeline's full decoded image.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import DiffusionMethod, _check_number


def mask_to_pil(mask: np.ndarray, size_hw: tuple[int, int]) -> Any:
    """bool HxW mask -> PIL ``L`` image of ``size_hw`` (255 = repaint; nearest resize)."""
    from PIL import Image

    pil = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L")
    h, w = size_hw
    if pil.size != (w, h):
        pil = pil.resize((w, h), Image.NEAREST)
    return pil


@METHODS.register("sd_inpaint")
class SDInpaint(DiffusionMethod):
    """Repaint the sample's mask toward the target caption."""

    version = "1"
    requires = ("source", "mask", "target_caption")
    tiny_kind = "inpaint"  # 9-input-channel UNet: noisy latent + mask + masked-image latent
    prompt_field = "target_caption"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-inpainting"  # diffusers inpaint docstring example
        num_inference_steps: int = 50  # diffusers inpaint default
        guidance_scale: float = 7.5  # diffusers inpaint default
        strength: float = 1.0  # diffusers inpaint default; 1 = the masked area starts from pure noise
        paste_back: bool = True  # copy the source back outside the mask (exact unedited region)

        def __post_init__(self) -> None:
            super().__post_init__()
            _check_number("sd_inpaint", "strength", self.strength, 0.0, inclusive=False)
            if self.strength > 1.0:
                raise ValueError(f"sd_inpaint: 'strength' must be in (0, 1], got {self.strength!r}")
            if not isinstance(self.paste_back, bool):
                raise ValueError(f"sd_inpaint: 'paste_back' must be true or false, got {self.paste_back!r}")

    def __init__(self, params: "SDInpaint.Params | None" = None):
        super().__init__(params)
        self._sample: Sample | None = None

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionInpaintPipeline

        return StableDiffusionInpaintPipeline

    def check(self, sample: Sample) -> str | None:
        reason = super().check(sample)
        if reason is None and sample.mask is not None and not np.asarray(sample.mask).any():
            return f"method '{self.name}' needs a non-empty mask; sample '{sample.id}' has an empty one"
        return reason

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        p = self.params
        assert self._sample is not None
        w, h = image.size
        return pipe(
            prompt=prompt,
            image=image,
            mask_image=mask_to_pil(self._sample.mask, (h, w)),
            height=h,
            width=w,
            strength=p.strength,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            generator=generator,
            output_type="np",
        )

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        self._sample = sample
        try:
            out = super().edit(sample, seed)
        finally:
            self._sample = None
        mask = np.asarray(sample.mask, dtype=bool)
        image = out.image
        if self.params.paste_back:
            image = np.where(mask[..., None], image, np.asarray(sample.source)).astype(np.uint8)
        return MethodOutput(image=np.ascontiguousarray(image), mask=mask.copy(), info=out.info)

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {
            "strength": float(p.strength),
            "denoising_steps": int(p.num_inference_steps * p.strength),
            "paste_back": bool(p.paste_back),
        }
