"""Pixel metrics: L1, L2 (MagicBrush's ``image_eval.py`` formulas) and PSNR (torchmetrics).

Images are float [0, 1] RGB. ``area`` rule: the per-pixel quantity averaged over the region's
pixels and the 3 channels; ``zero_fill`` rule: both images multiplied by the region mask and the
quantity averaged over the whole C*H*W tensor (PIE-Bench: the denominator is the full area).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from ..registry import METRICS
from .base import ImageMetric, ImagePair, region_mean


class PixelErrorMetric(ImageMetric):
    """A metric that is the mean of a per-pixel error (L1, L2) of the [0, 1] images.

    Computed on the uint8 images' integer differences and divided once by ``unit`` (255 for L1,
    255**2 for L2): the same value as on ToTensor's floats, without converting either image.
    """

    unit: ClassVar[float] = 1.0
    # Integer arithmetic in numpy; Pillow resizes an edit of another size.
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow")

    def pixel_error(self, diff: np.ndarray) -> np.ndarray:
        """The per-pixel error of an int32 difference of uint8 images, in uint8 units."""
        raise NotImplementedError

    def _error(self, edit: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return self.pixel_error(edit.astype(np.int32) - ref)

    def compute_pair(self, pair: ImagePair) -> dict[str, tuple[float, str | None]]:
        out: dict[str, tuple[float, str | None]] = {}
        err = None
        for region, mask in pair.masks.items():
            if self.rule == "zero_fill" and mask is not None:
                value = float(np.mean(self._error(*pair.zero_filled(region, 'uint8'))))
            else:
                if err is None:
                    err = self._error(pair.edit_u8, pair.ref_u8)
                value = region_mean(err, mask)
            out[region] = (value / self.unit, None)
        return out


@METRICS.register("l1")
class L1(PixelErrorMetric):
    """Mean absolute difference on [0, 1] images (MagicBrush L1). Lower is better."""

    higher_is_better: ClassVar[bool] = False
    unit: ClassVar[float] = 255.0

    def pixel_error(self, diff: np.ndarray) -> np.ndarray:
        return np.abs(diff)


@METRICS.register("l2")
class L2(PixelErrorMetric):
    """Mean squared difference on [0, 1] images (MagicBrush L2, i.e. an MSE). Lower is better."""

    higher_is_better: ClassVar[bool] = False
    unit: ClassVar[float] = 255.0 ** 2

    def pixel_error(self, diff: np.ndarray) -> np.ndarray:
        return diff * diff


@METRICS.register("psnr")
class PSNR(ImageMetric):
    """Peak signal-to-noise ratio in dB. Higher is better.

    Parameter ``data_range`` (default 1.0) is passed as given to torchmetrics' formula; images
    are in [0, 1], so 1.0 is the right value (another value reproduces scripts that mismatch it).

    - ``all`` and every ``zero_fill`` region: ``torchmetrics.functional.peak_signal_noise_ratio``
      on the (zero-filled) images, one image at a time;
    - ``area`` regions: ``10 * log10(data_range**2 / MSE)`` with the MSE averaged over the region's
      pixels only. torchmetrics has no masked PSNR, so this one line is the harness's own.

    Identical images (MSE = 0) give ``+inf`` flagged ``identical`` (not NaN).
    """

    higher_is_better: ClassVar[bool] = True
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow", "torch", "torchmetrics")
    param_defaults: ClassVar[dict[str, Any]] = {"data_range": 1.0}

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.data_range = float(self.params["data_range"])
        if not self.data_range > 0:
            raise ValueError(f"metric '{self.name}': data_range must be > 0, got {self.data_range}")

    def _torchmetrics_psnr(self, edit: np.ndarray, ref: np.ndarray) -> tuple[float, str | None]:
        import torch
        from torchmetrics.functional.image import peak_signal_noise_ratio

        if np.array_equal(edit, ref):
            return math.inf, "identical"
        # HWC memory viewed as NCHW, as PIE-Bench's torch.tensor(img).permute(2, 0, 1): the same
        # float32 reduction order, so the same last bits.
        p = torch.from_numpy(np.ascontiguousarray(edit)).permute(2, 0, 1)[None]
        t = torch.from_numpy(np.ascontiguousarray(ref)).permute(2, 0, 1)[None]
        return float(peak_signal_noise_ratio(p, t, data_range=self.data_range)), None

    def _formula(self, mse: float) -> tuple[float, str | None]:
        if mse == 0.0:
            return math.inf, "identical"
        return 10.0 * math.log10(self.data_range**2 / mse), None

    def compute_pair(self, pair: ImagePair) -> dict[str, tuple[float, str | None]]:
        out: dict[str, tuple[float, str | None]] = {}
        for region, mask in pair.masks.items():
            if mask is None or self.rule == "zero_fill":
                out[region] = self._torchmetrics_psnr(*pair.zero_filled(region, "float32"))
            else:
                diff = pair.edit_u8.astype(np.int32) - pair.ref_u8
                out[region] = self._formula(region_mean(diff * diff, mask) / 255.0**2)
        return out
