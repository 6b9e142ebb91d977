"""Metrics. Importing this package registers every metric of the harness (explicit imports below;
``harness.registry.METRICS`` imports it on its first lookup); outside packages add metrics through
the entry point group ``edit_harness.metrics`` (:mod:`harness.plugins`).

No module here imports torch, torchmetrics, lpips or dlib at import time.
"""
from .base import (  # noqa: F401
    REGION_RULE_TEXT,
    REGION_RULES,
    REGIONS,
    ImageMetric,
    ImagePair,
    Metric,
    MetricUnavailable,
    ScoringItem,
    region_flag,
    region_masks,
    region_mean,
    resize_like,
    resize_mask_like,
    to_float01,
)
from . import pixel  # noqa: F401  (l1, l2, psnr)
from . import ssim  # noqa: F401  (ssim)
from . import perceptual  # noqa: F401  (lpips)
from . import landmarks  # noqa: F401  (landmark_mse)
from . import fid  # noqa: F401  (fid, kid: set metrics)
from . import clip  # noqa: F401  (clip_i, clip_t, clip_directional, clipscore)
from . import dino  # noqa: F401  (dino, structure_distance)
from . import alpha_clip  # noqa: F401  (alpha_clip, masked_clip: PartEdit fg/bg/avg)

__all__ = [
    "REGION_RULE_TEXT", "REGION_RULES", "REGIONS", "ImageMetric", "ImagePair", "Metric", "MetricUnavailable",
    "ScoringItem", "region_flag", "region_masks", "region_mean", "resize_like", "resize_mask_like", "to_float01",
]
