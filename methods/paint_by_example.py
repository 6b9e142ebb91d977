"""``paint_by_example``: Paint by Example (Yang et al., "Paint by Example: Exemplar-based Image
Editing with Diffusion Models", CVPR 2023) through diffusers' ``PaintByExamplePipeline`` with the
authors' checkpoint ``Fantasy-Studio/Paint-by-Example``: the sample's mask is repainted with the
object of the sample's ``reference`` image (an exemplar, no text). DiffEditor (sec. 4, Fig. 8 and
Table 2, "object pasting") compares with Paint-by-Example.

Inputs: ``source``, ``mask`` (the region to paint; white = repaint, as for the other inpainting
adapters: the pipeline inverts it internally) and ``reference`` (the exemplar). A sample without a
reference image is skipped naming the field. When the sample also has a ``reference_mask`` and
``crop_reference`` is true (default), the exemplar is the reference cropped to the bounding box of
that mask: Paint by Example is trained with the object's bounding-box patch as the exemplar (paper
sec. 3), and the authors' examples pass such object crops.

Defaults: the pipeline's ``__call__`` defaults (diffusers 0.42,
``pipelines/deprecated/paint_by_example/pipeline_paint_by_example.py``: ``num_inference_steps=50``,
``guidance_scale=5.0``), which are also the authors' settings (``scripts/inference.py``:
``--ddim_steps 50``, README / ``test.sh``: ``--scale 5``), at 512 x 512 (``--H 512 --W 512``; the
diffusers docstring example resizes to 512). The checkpoint's scheduler (from its
``scheduler_config.json``) is used as shipped. ``reference_fit``: ``stretch`` (default) resizes the
exemplar to the image encoder's input size without keeping its aspect ratio, as the authors'
``scripts/inference.py`` does (``.resize((224, 224))``); ``center_crop`` hands it unchanged to the
pipeline's ``CLIPImageProcessor`` (shortest-edge resize + center crop). Both are then CLIP-normalised
by the processor.

``paste_back`` (default false): the pipeline decodes the whole image, as the authors' code does, so
the output is kept as is; true copies the source pixels outside the sample's mask (on the source
grid) back into the result (the unedited region is then exactly the source).

The pipeline is deprecated in diffusers (kept under ``pipelines/deprecated``, no further fixes
after 0.33.1) but still ships and runs in 0.42.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import (TINY_RESOLUTION, TINY_STEPS, DiffusionMethod, auto_field, from_pipeline_output,
                                to_pil)
from .sd_inpaint import check_paste_back, empty_mask_reason, mask_to_pil, paste_source_back

REFERENCE_FITS = ("stretch", "center_crop")


def exemplar(sample: Sample, crop_reference: bool) -> tuple[np.ndarray, list[int] | None]:
    """The sample's reference image, cropped to its ``reference_mask``'s bounding box when asked
    and present; with the crop box ``[top, left, bottom, right]`` (exclusive ends) or None."""
    ref = np.asarray(sample.reference)
    if not crop_reference or sample.reference_mask is None:
        return ref, None
    m = np.asarray(sample.reference_mask, dtype=bool)
    if not m.any():
        return ref, None
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    box = [int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1]
    return np.ascontiguousarray(ref[box[0]:box[2], box[1]:box[3]]), box


def _encoder_input_hw(pipe: Any) -> tuple[int, int]:
    """The (height, width) the pipeline's image processor crops the exemplar to."""
    crop = getattr(pipe.feature_extractor, "crop_size", None) or {}
    if isinstance(crop, dict) and "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    size = int(pipe.image_encoder.config.image_size)
    return size, size


@METHODS.register("paint_by_example")
class PaintByExample(DiffusionMethod):
    """Paint the reference image's object into the sample's mask."""

    version = "1"
    requires = ("source", "mask", "reference")
    tiny_kind = "paint_by_example"  # PaintByExampleImageEncoder + 9-channel UNet + CLIPImageProcessor
    prompt_field = "target_caption"  # not used: the condition is the reference image

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "Fantasy-Studio/Paint-by-Example"  # the authors' checkpoint (diffusers docstring)
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # diffusers PaintByExample default; authors' --ddim_steps 50
        guidance_scale: float = 5.0  # diffusers PaintByExample default; authors' --scale 5
        resolution: int | Literal["auto"] | None = auto_field(512, TINY_RESOLUTION)  # authors' --H 512 --W 512
        reference_fit: Literal["stretch", "center_crop"] = "stretch"  # stretch = authors' resize to 224 x 224
        crop_reference: bool = True  # crop the reference to its reference_mask's bounding box (when given)
        paste_back: bool = False  # false = pipeline output as is (the authors' code does not composite)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.reference_fit not in REFERENCE_FITS:
                raise ValueError(f"paint_by_example: 'reference_fit' must be one of {list(REFERENCE_FITS)}, "
                                 f"got {self.reference_fit!r}")
            if not isinstance(self.crop_reference, bool):
                raise ValueError(f"paint_by_example: 'crop_reference' must be true or false, "
                                 f"got {self.crop_reference!r}")
            check_paste_back("paint_by_example", self.paste_back)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import PaintByExamplePipeline

        return PaintByExamplePipeline

    def check(self, sample: Sample) -> str | None:
        # No text condition: only the mask needs a further check (``requires`` covers the rest).
        return empty_mask_reason(self.name, sample)

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        raise NotImplementedError("paint_by_example runs its own edit(): its condition is an image")

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch
        from PIL import Image

        start = self.begin_edit(sample, seed)
        pipe = start.loaded.pipeline
        p = self.params
        mask = np.asarray(sample.mask, dtype=bool)
        mask_image = mask_to_pil(mask, start.size)
        ref, box = exemplar(sample, p.crop_reference)
        example = to_pil(ref, ref.shape[:2])
        if p.reference_fit == "stretch":
            eh, ew = _encoder_input_hw(pipe)
            example = example.resize((ew, eh), Image.BICUBIC)
        prep = time.perf_counter() - start.t0
        with torch.inference_mode():
            out = pipe(
                example_image=example,
                image=start.image,
                mask_image=mask_image,
                num_inference_steps=p.num_inference_steps,
                guidance_scale=p.guidance_scale,
                generator=start.generator,
                output_type="np",
            )
        edited = from_pipeline_output(out.images, start.source_hw)
        if p.paste_back:
            edited = paste_source_back(edited, start.source, mask)
        info = self.edit_info(
            start, seed, prep, condition="reference", reference_size_hw=[int(ref.shape[0]), int(ref.shape[1])],
            reference_crop_box=box, reference_fit=p.reference_fit, paste_back=bool(p.paste_back),
        )
        return MethodOutput(image=np.ascontiguousarray(edited), mask=mask.copy(), info=info)
