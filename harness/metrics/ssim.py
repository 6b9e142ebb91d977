"""SSIM: torchmetrics' SSIM map, averaged by the harness under an explicit border convention.

The map comes from ``torchmetrics.functional.image.structural_similarity_index_measure``
(``return_full_image=True``): Gaussian window of sigma 1.5 (torchmetrics sizes it from sigma,
``2 * int(3.5 * sigma + 0.5) + 1`` = 11 px; a ``kernel_size`` is only accepted when it equals
that), k1 0.01, k2 0.03, ``data_range`` 1.0 because images are [0, 1], computed on float32
tensors as the papers' scripts do. torchmetrics reflect-pads the input by the window radius
(5 px) and convolves without padding, so the map is N x C x H x W, aligned with the pixels; every
torchmetrics release since 1.0 returns that same map.

What the releases disagree on is the SCALAR, so the harness averages the map itself (parameter
``border``) and its numbers do not depend on the installed torchmetrics:

- ``keep``: the whole map, as torchmetrics >= 1.4.2 returns (PR #2721, "Corrected the padding
  related calculation errors in SSIM"); the harness's own protocols;
- ``exclude``: the map without its outer band of window-radius pixels (5 px) on every side, as
  torchmetrics <= 1.4.1 returned (``ssim_idx_full_image[..., pad:-pad, pad:-pad]``) and as
  scikit-image's ``structural_similarity`` does. PIE-Bench's numbers (2023) came from such a
  release; on its edits the whole-map mean was found up to ~0.9 points (x100) higher.

(torchmetrics >= 1.3.2 also clamps the local variances at 0 against float rounding, PR #2378: a
residue of ~1e-8 against c2 = 9e-4, ~1e-5 relative on the few pixels concerned; not undone here.)

- ``all``: the mean of the map (border rule applied);
- ``area`` regions: the map averaged over the region's pixels (and the 3 channels), minus the
  border band under ``exclude`` (a region that lies entirely in the band: NaN ``region_in_border``);
- ``zero_fill`` regions: the map of both images multiplied by the mask, averaged (PIE-Bench).

Images whose sides are not larger than the window radius (``keep``; reflect padding needs that)
or than twice the radius (``exclude``: nothing would remain) give NaN flagged ``too_small``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..registry import METRICS
from .base import ImageMetric, ImagePair

BORDERS = ("keep", "exclude")
BORDER_TEXT = {
    "keep": "SSIM map averaged whole (torchmetrics >= 1.4.2)",
    "exclude": "SSIM map border of {pad} px excluded from every mean (torchmetrics <= 1.4.1, scikit-image)",
}


def gaussian_radius(sigma: float) -> int:
    """torchmetrics' (and scikit-image's, truncate 3.5) Gaussian window radius for ``sigma``."""
    return int(3.5 * sigma + 0.5)


@METRICS.register("ssim")
class SSIM(ImageMetric):
    """Structural similarity (torchmetrics' map, explicit border rule). Higher is better."""

    higher_is_better: ClassVar[bool] = True
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow", "torch", "torchmetrics")
    param_defaults: ClassVar[dict[str, Any]] = {"data_range": 1.0, "kernel_size": None, "sigma": 1.5, "border": "keep"}

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.data_range = float(self.params["data_range"])
        self.sigma = float(self.params["sigma"])
        if not self.sigma > 0:
            raise ValueError(f"metric '{self.name}': sigma must be > 0, got {self.sigma}")
        self.pad = gaussian_radius(self.sigma)
        ks = self.params["kernel_size"]
        if ks is not None and int(ks) != 2 * self.pad + 1:
            # torchmetrics ignores kernel_size for Gaussian windows: accepting another value would
            # name a window that is not the one used.
            raise ValueError(f"metric '{self.name}': kernel_size {ks} does not match sigma {self.sigma:g}: torchmetrics "
                             f"sizes the Gaussian window from sigma ({2 * self.pad + 1} px); set sigma instead")
        self.kernel_size = 2 * self.pad + 1
        self.border = str(self.params["border"])
        if self.border not in BORDERS:
            raise ValueError(f"metric '{self.name}': border must be one of {', '.join(BORDERS)}, got {self.border!r}")

    def conventions(self) -> list[str]:
        return super().conventions() + [BORDER_TEXT[self.border].format(pad=self.pad)]

    def ssim_map(self, edit: np.ndarray, ref: np.ndarray):
        """torchmetrics' SSIM map of two HxWx3 [0, 1] images: a float32 1 x C x H x W tensor."""
        import torch
        from torchmetrics.functional.image import structural_similarity_index_measure

        # float32 like the papers' scripts (uint8 / 255 in float32: ImagePair.float32); float64
        # convs are ~10x slower. HWC arrays viewed as NCHW (channels-last strides, no copy): the
        # CPU convolution is then about twice as fast as on a contiguous NCHW copy, same values.
        p = torch.from_numpy(np.asarray(edit, dtype=np.float32)).permute(2, 0, 1)[None]
        t = torch.from_numpy(np.asarray(ref, dtype=np.float32)).permute(2, 0, 1)[None]
        _, image = structural_similarity_index_measure(
            p, t, gaussian_kernel=True, sigma=self.sigma, kernel_size=self.kernel_size,
            data_range=self.data_range, return_full_image=True,
        )
        if tuple(image.shape[-2:]) != tuple(edit.shape[:2]):
            raise RuntimeError(f"torchmetrics SSIM map has shape {tuple(image.shape)}, expected the image's {edit.shape[:2]}")
        return image

    def _kept(self, image):
        """The map under the border rule (a view)."""
        if self.border == "exclude":
            return image[..., self.pad:-self.pad, self.pad:-self.pad]
        return image

    def ssim(self, edit: np.ndarray, ref: np.ndarray) -> float:
        """The scalar: the mean of the map under the border rule, reduced as torchmetrics reduces
        (float32 ``reshape(N, -1).mean(-1)``: bit-equal to the scalar of the release whose rule it is)."""
        kept = self._kept(self.ssim_map(edit, ref))
        return float(kept.reshape(kept.shape[0], -1).mean(-1)[0])

    def compute_pair(self, pair: ImagePair) -> dict[str, tuple[float, str | None]]:
        limit = self.pad if self.border == "keep" else 2 * self.pad
        if min(pair.shape) <= limit:
            return {r: (float("nan"), "too_small") for r in pair.masks}
        out: dict[str, tuple[float, str | None]] = {}
        area_regions = self.rule == "area" and any(m is not None for m in pair.masks.values())
        image = self.ssim_map(*pair.float32) if area_regions or "all" in pair.masks else None
        hwc = image[0].double().numpy().transpose(1, 2, 0) if area_regions else None
        for region, mask in pair.masks.items():
            if mask is None:
                kept = self._kept(image)
                out[region] = (float(kept.reshape(1, -1).mean(-1)[0]), None)
            elif self.rule == "zero_fill":
                out[region] = (self.ssim(*pair.zero_filled(region, "float32")), None)
            else:
                m = np.asarray(mask, bool)
                if self.border == "exclude":
                    inner = np.zeros_like(m)
                    inner[self.pad:-self.pad, self.pad:-self.pad] = True
                    m = m & inner
                    if not m.any():
                        out[region] = (float("nan"), "region_in_border")
                        continue
                out[region] = (float(np.mean(hwc[m])), None)
        return out
