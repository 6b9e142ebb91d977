"""SSIM via ``torchmetrics.functional.image.structural_similarity_index_measure``.

torchmetrics defaults: Gaussian kernel 11x11, sigma 1.5, k1 0.01, k2 0.03; ``data_range`` 1.0
because images are [0, 1]. torchmetrics (1.x) reflect-pads the input by (kernel - 1) / 2 and
convolves without padding, so its ``return_full_image`` map is N x C x H x W, aligned with the
input pixels, and the scalar it returns is exactly the mean of that map (checked in tests).

- ``all``: torchmetrics' scalar (computed on float32 tensors, as the papers' scripts do);
- ``area`` regions: the SSIM map averaged over the region's pixels (and the 3 channels);
- ``zero_fill`` regions: torchmetrics' scalar on both images multiplied by the mask (PIE-Bench).

Images whose sides are not larger than the padding (5 px by default) cannot be reflect-padded:
NaN flagged ``too_small``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..registry import METRICS
from .base import ImageMetric, ImagePair, region_mean


@METRICS.register("ssim")
class SSIM(ImageMetric):
    """Structural similarity (torchmetrics). Higher is better."""

    higher_is_better: ClassVar[bool] = True
    param_defaults: ClassVar[dict[str, Any]] = {"data_range": 1.0, "kernel_size": 11, "sigma": 1.5}

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.data_range = float(self.params["data_range"])
        self.kernel_size = int(self.params["kernel_size"])
        self.sigma = float(self.params["sigma"])
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"metric '{self.name}': kernel_size must be odd and positive, got {self.kernel_size}")

    def ssim(self, edit: np.ndarray, ref: np.ndarray, full: bool = False):
        """torchmetrics SSIM of two HxWx3 [0, 1] images: the scalar, and with ``full`` the HxWxC map."""
        import torch
        from torchmetrics.functional.image import structural_similarity_index_measure

        # float32 like the papers' scripts (uint8 / 255 in float32: ImagePair.float32); float64
        # convs are ~10x slower. HWC arrays viewed as NCHW (channels-last strides, no copy): the
        # CPU convolution is then about twice as fast as on a contiguous NCHW copy, same values.
        p = torch.from_numpy(np.asarray(edit, dtype=np.float32)).permute(2, 0, 1)[None]
        t = torch.from_numpy(np.asarray(ref, dtype=np.float32)).permute(2, 0, 1)[None]
        res = structural_similarity_index_measure(
            p, t, gaussian_kernel=True, sigma=self.sigma, kernel_size=self.kernel_size,
            data_range=self.data_range, return_full_image=full,
        )
        if not full:
            return float(res)
        value, image = res
        image = image[0].double().numpy().transpose(1, 2, 0)
        if image.shape != edit.shape:  # other torchmetrics versions crop the padding away
            raise RuntimeError(f"torchmetrics SSIM map has shape {image.shape}, expected {edit.shape}")
        return float(value), image

    def compute_pair(self, pair: ImagePair) -> dict[str, tuple[float, str | None]]:
        pad = (self.kernel_size - 1) // 2
        if min(pair.shape) <= pad:
            return {r: (float("nan"), "too_small") for r in pair.masks}
        out: dict[str, tuple[float, str | None]] = {}
        whole = None
        need_map = self.rule == "area" and any(m is not None for m in pair.masks.values())
        if need_map:
            whole = self.ssim(*pair.float32, full=True)  # (torchmetrics' scalar, HxWxC map)
        elif "all" in pair.masks:
            whole = (self.ssim(*pair.float32), None)  # the scalar alone: no map to build
        for region, mask in pair.masks.items():
            if mask is None:
                out[region] = (whole[0], None)
            elif self.rule == "zero_fill":
                out[region] = (self.ssim(*pair.zero_filled(region, "float32")), None)
            else:
                out[region] = (region_mean(whole[1], mask), None)
        return out
