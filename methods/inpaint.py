"""``inpaint``: object removal by OpenCV inpainting (Telea fast marching or Navier-Stokes)
inside the sample's mask, optionally dilated first."""
from __future__ import annotations

import dataclasses
from typing import Literal

from harness.method import Method
from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from . import _common as C


@METHODS.register("inpaint")
class Inpaint(Method):
    version = "1"
    requires = ("source", "mask")
    categories = ("remove",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        algorithm: Literal["telea", "ns"] = "telea"  # cv2.INPAINT_TELEA / cv2.INPAINT_NS
        radius: int = 3  # inpainting neighbourhood radius in px
        dilate: int = 0  # dilation of the mask (disk radius, px) before inpainting

        def __post_init__(self):
            C.check_choice("inpaint", "algorithm", self.algorithm, ("telea", "ns"))
            C.check_int("inpaint", "radius", self.radius, 1)
            C.check_int("inpaint", "dilate", self.dilate, 0)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        p = self.params
        src = C.source_of(sample)
        mask = C.dilate(C.mask_of(sample), p.dilate)
        C.require_nonempty(sample, mask, self.name, "mask" if p.dilate == 0 else f"mask (dilated by {p.dilate} px)")
        out = C.inpaint(src, mask, p.algorithm, p.radius)
        return MethodOutput(
            image=out,
            mask=mask,
            info={"algorithm": p.algorithm, "inpainted_pixels": int(mask.sum())},
        )
