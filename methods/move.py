"""``move``: cut the masked object, inpaint the hole, and place the object at an offset.

Offset = mean(target_points - source_points) for a sample with drag points
(``point_layout == "drag"``), else the parameters ``dx``, ``dy``. The hole is filled with
``cv2.inpaint``; the object is placed with ``cv2.seamlessClone`` (or a plain pixel copy),
clipped to the image bounds.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from harness.method import Method
from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SampleError, SkipSample

from . import _common as C


@METHODS.register("move")
class Move(Method):
    version = "1"
    requires = ("source", "mask")
    categories = ("move",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        dx: int = 0  # x offset in px, used only when the sample has no drag points
        dy: int = 0  # y offset in px, used only when the sample has no drag points
        inpaint_algorithm: Literal["telea", "ns"] = "telea"  # hole filling: cv2.INPAINT_TELEA / cv2.INPAINT_NS
        inpaint_radius: int = 5  # inpainting neighbourhood radius in px
        blend: Literal["seamless", "copy"] = "seamless"  # object placement: cv2.seamlessClone or plain copy

        def __post_init__(self):
            C.check_int("move", "dx", self.dx, -(2**31))
            C.check_int("move", "dy", self.dy, -(2**31))
            C.check_choice("move", "inpaint_algorithm", self.inpaint_algorithm, ("telea", "ns"))
            C.check_int("move", "inpaint_radius", self.inpaint_radius, 1)
            C.check_choice("move", "blend", self.blend, ("seamless", "copy"))

    def offset(self, sample: Sample) -> tuple[int, int, str]:
        """(dx, dy, where it came from)."""
        if sample.point_layout == "drag" and sample.source_points is not None and sample.target_points is not None:
            sp = np.asarray(sample.source_points, np.float64)
            tp = np.asarray(sample.target_points, np.float64)
            if sp.ndim != 2 or sp.shape[1] != 2 or sp.shape != tp.shape or len(sp) == 0:
                raise SampleError(
                    sample.id, "target_points",
                    f"drag points must be two (N, 2) arrays of equal N >= 1, got {sp.shape} and {tp.shape}",
                )
            d = (tp - sp).mean(axis=0)
            return int(round(float(d[0]))), int(round(float(d[1]))), "drag_points"
        return int(self.params.dx), int(self.params.dy), "params"

    def check(self, sample: Sample) -> str | None:
        try:
            dx, dy, origin = self.offset(sample)
        except SampleError as e:
            return str(e)
        if dx == 0 and dy == 0:
            if origin == "params":
                return (
                    f"method '{self.name}': sample '{sample.id}' has no drag points and params dx, dy are "
                    "both 0; nothing to move"
                )
            return f"method '{self.name}': sample '{sample.id}' drag points give a zero mean offset; nothing to move"
        return None

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        p = self.params
        src = C.source_of(sample)
        hole = C.mask_of(sample)
        reason = self.check(sample)
        if reason:
            raise SkipSample(reason)
        C.require_nonempty(sample, hole, self.name)
        dx, dy, origin = self.offset(sample)

        background = C.inpaint(src, hole, p.inpaint_algorithm, p.inpaint_radius)
        dest = C.shift(hole, dx, dy, fill=False)
        moved = C.shift(src, dx, dy)
        if p.blend == "copy":
            out = background.copy()
            out[dest] = moved[dest]
        else:
            canvas = background.copy()
            canvas[dest] = moved[dest]
            out = C.seamless_clone_in_place(canvas, background, dest, "normal")
        return MethodOutput(
            image=out,
            mask=hole | dest,
            info={
                "dx": dx,
                "dy": dy,
                "offset_from": origin,
                "blend": p.blend,
                "moved_pixels": int(dest.sum()),
                "clipped_pixels": int(hole.sum() - dest.sum()),
            },
        )
