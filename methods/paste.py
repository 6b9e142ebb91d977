"""``paste``: paste the reference object into the sample's mask with Poisson seamless cloning.

The reference object (``reference_mask``, else the whole reference image) is cropped to its
bounding box, resized keeping its aspect ratio to fit the bounding box of ``sample.mask``,
centred there, and cloned with ``cv2.seamlessClone`` under
(resized object mask) AND (sample.mask).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import cv2
import numpy as np

from harness.method import Method
from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SampleError, SkipSample

from . import _common as C


@METHODS.register("paste")
class Paste(Method):
    version = "1"
    requires = ("source", "mask", "reference")
    categories = None

    @dataclasses.dataclass(frozen=True)
    class Params:
        mode: Literal["normal", "mixed"] = "normal"  # cv2.NORMAL_CLONE / cv2.MIXED_CLONE

        def __post_init__(self):
            C.check_choice("paste", "mode", self.mode, ("normal", "mixed"))

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        src = C.source_of(sample)
        mask = C.mask_of(sample)
        ref = sample.reference
        if not (isinstance(ref, np.ndarray) and ref.dtype == np.uint8 and ref.ndim == 3 and ref.shape[2] == 3):
            raise SampleError(sample.id, "reference", "expected RGB uint8 HxWx3")
        if sample.reference_mask is not None:
            ref_mask = C.mask_of(sample, "reference_mask", shape=ref.shape[:2])
        else:
            ref_mask = np.ones(ref.shape[:2], bool)
        dst_box = C.bbox(mask)
        ref_box = C.bbox(ref_mask)
        if dst_box is None:
            raise SkipSample(f"method '{self.name}': sample '{sample.id}' has an empty mask; nowhere to paste")
        if ref_box is None:
            raise SkipSample(f"method '{self.name}': sample '{sample.id}' has an empty reference_mask; nothing to paste")

        rx, ry, rw, rh = ref_box
        obj = ref[ry : ry + rh, rx : rx + rw]
        obj_mask = ref_mask[ry : ry + rh, rx : rx + rw]
        mx, my, mw, mh = dst_box
        scale = min(mw / rw, mh / rh)
        nw = min(mw, max(1, round(rw * scale)))
        nh = min(mh, max(1, round(rh * scale)))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        obj_r = cv2.resize(obj, (nw, nh), interpolation=interp)
        obj_mask_r = cv2.resize(obj_mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR) >= 0.5
        ox, oy = mx + (mw - nw) // 2, my + (mh - nh) // 2

        canvas = src.copy()
        canvas[oy : oy + nh, ox : ox + nw] = obj_r
        placed = np.zeros_like(mask)
        placed[oy : oy + nh, ox : ox + nw] = obj_mask_r
        clone_mask = placed & mask
        if not clone_mask.any():
            raise SkipSample(
                f"method '{self.name}': sample '{sample.id}': the resized reference object does not "
                "overlap the mask; nothing to paste"
            )
        out = C.seamless_clone_in_place(canvas, src, clone_mask, self.params.mode)
        return MethodOutput(
            image=out,
            mask=clone_mask,
            info={
                "mode": self.params.mode,
                "scale": float(scale),
                "placed_box_xywh": [int(ox), int(oy), int(nw), int(nh)],
                "cloned_pixels": int(clone_mask.sum()),
            },
        )
