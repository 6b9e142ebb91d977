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

The mask-given plumbing (:class:`MaskedInpaintMethod`: non-empty mask check, the mask at the
working size, paste-back, the mask returned with the edit) is shared with ``sdxl_inpaint``; the
helpers :func:`mask_to_pil` and :func:`paste_source_back` also serve ``paint_by_example``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import TINY_STEPS, DiffusionMethod, auto_field, check_unit


def mask_to_pil(mask: np.ndarray, size_hw: tuple[int, int]) -> Any:
    """bool HxW mask -> PIL ``L`` image of ``size_hw`` (255 = repaint; nearest resize)."""
    from PIL import Image

    pil = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L")
    h, w = size_hw
    if pil.size != (w, h):
        pil = pil.resize((w, h), Image.NEAREST)
    return pil


def paste_source_back(image: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The edit inside ``mask``, the source's pixels outside it (all on the source grid)."""
    mask = np.asarray(mask, dtype=bool)
    return np.ascontiguousarray(np.where(mask[..., None], image, np.asarray(source)).astype(np.uint8))


def masked_output(sample: Sample, image: np.ndarray, info: dict, paste_back: bool) -> MethodOutput:
    """A mask-given method's output: the edit (with the source pasted back outside the sample's
    mask when ``paste_back``) and that mask, returned as the method's mask."""
    mask = np.asarray(sample.mask, dtype=bool)
    if paste_back:
        image = paste_source_back(image, sample.source, mask)
    return MethodOutput(image=np.ascontiguousarray(image), mask=mask.copy(), info=info)


def empty_mask_reason(method: str, sample: Sample) -> str | None:
    """The skip reason for a sample whose mask is given but selects no pixel, else None."""
    if sample.mask is not None and not np.asarray(sample.mask).any():
        return f"method '{method}' needs a non-empty mask; sample '{sample.id}' has an empty one"
    return None


def check_strength(owner: str, strength: Any) -> None:
    """``strength`` must be a number in (0, 1]."""
    check_unit(owner, "strength", strength, low_open=True)


def check_paste_back(owner: str, paste_back: Any) -> None:
    if not isinstance(paste_back, bool):
        raise ValueError(f"{owner}: 'paste_back' must be true or false, got {paste_back!r}")


class MaskedInpaintMethod(DiffusionMethod):
    """Base of the text-conditioned, mask-given inpainting adapters (SD and SDXL inpainting).

    Subclasses name the pipeline class and the tiny kind, and give ``Params`` the fields
    ``strength`` (in (0, 1]) and ``paste_back`` (bool). The pipeline is called with the target
    caption, the source and the mask at the working size, ``strength``, the steps and the guidance
    scale; the returned edit carries the sample's mask.
    """

    requires = ("source", "mask", "target_caption")
    prompt_field = "target_caption"

    def __init__(self, params: "DiffusionMethod.Params | None" = None):
        super().__init__(params)
        self._sample: Sample | None = None

    def check(self, sample: Sample) -> str | None:
        reason = super().check(sample)
        return reason if reason is not None else empty_mask_reason(self.name, sample)

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
        return masked_output(sample, out.image, out.info, self.params.paste_back)

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {
            "strength": float(p.strength),
            # diffusers' get_timesteps: min(int(steps * strength), steps) steps are run
            "denoising_steps": min(int(p.num_inference_steps * p.strength), int(p.num_inference_steps)),
            "paste_back": bool(p.paste_back),
        }


@METHODS.register("sd_inpaint")
class SDInpaint(MaskedInpaintMethod):
    """Repaint the sample's mask toward the target caption."""

    version = "1"
    requires = ("source", "mask", "target_caption")
    tiny_kind = "inpaint"  # 9-input-channel UNet: noisy latent + mask + masked-image latent
    prompt_field = "target_caption"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-inpainting"  # diffusers inpaint docstring example
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # diffusers inpaint default
        guidance_scale: float = 7.5  # diffusers inpaint default
        strength: float = 1.0  # diffusers inpaint default; 1 = the masked area starts from pure noise
        paste_back: bool = True  # copy the source back outside the mask (exact unedited region)

        def __post_init__(self) -> None:
            super().__post_init__()
            check_strength("sd_inpaint", self.strength)
            check_paste_back("sd_inpaint", self.paste_back)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionInpaintPipeline

        return StableDiffusionInpaintPipeline
