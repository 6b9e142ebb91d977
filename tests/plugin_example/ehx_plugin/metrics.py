"""``ehx_max_abs``: the largest absolute difference between the edit and the reference, in [0, 1]."""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from harness.metrics.base import ImageMetric, ImagePair
from harness.registry import METRICS


# Registered by the decorator; the entry point (``ehx_max_abs = "ehx_plugin.metrics"``) names the module.
@METRICS.register("ehx_max_abs")
class MaxAbs(ImageMetric):
    higher_is_better: ClassVar[bool] = False
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow")

    def compute_pair(self, pair: ImagePair) -> dict[str, tuple[float, str | None]]:
        diff = np.abs(pair.edit_u8.astype(np.int32) - pair.ref_u8)
        out: dict[str, tuple[float, str | None]] = {}
        for region, mask in pair.masks.items():
            values = diff if mask is None else diff[mask]
            out[region] = (float(values.max()) / 255.0, None) if values.size else (float("nan"), "empty_region")
        return out
