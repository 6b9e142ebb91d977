"""CPAM's mask-guidance strategies (paper sec. 4.4): the source mask M_s (user mask or SAM from
points / a box) and the target mask M_t per edit type, plus the mask-refinement schedule.

Per edit type (:data:`EDIT_TYPES`), with ``M_s`` given by :func:`source_mask_for`:

* ``replace`` / ``pose_view``: M_t from aggregated cross-attention maps of the target-prompt
  tokens (``strategy="attention"``, :func:`attention_target_mask`), or the expanded convex hull
  of M_s (``"convex_hull"``), or M_s dilated (``"dilate"``, the thesis code's presets), or M_s
  itself (``"source"``).
* ``background``: M_s is the background (``1 - object mask``) and M_t = M_s.
* ``remove``: M_t = 0 (PA only adapts the original background, Eq. 3).
* ``add``: M_t = M_s, or M_s slightly dilated (``add_dilate_scale``).

Mask refinement: M_s is used for the first T_m steps, then the refined M_t (:func:`refine_schedule`,
:class:`AttentionMaskRefiner`).

Parameters the paper does not specify (each one a parameter here):

* dilation: the first author's thesis code (``OIIctrl_utils.expand_mask``) dilates with a square
  ``k x k`` kernel, ``k = int(sqrt(mask area) * scale)`` (no change when ``k == 0``); we dilate
  with OpenCV (``cv2.dilate``, anchor at the kernel centre; an even ``k`` extends one pixel more
  up/left than down/right). Thesis presets: ``add``/``pose_view``/``replace`` (dynamic) 0.1,
  ``replace`` (fixed) 0.07 (defaults below: 0.1).
* convex hull: ``skimage.morphology.convex_hull_image`` of M_s, then the same dilation with
  ``hull_scale`` (default 0.1, the thesis' dilation scale; the paper gives none).
* attention threshold 0.25 and the rule of :func:`attention_target_mask` (thesis
  ``aggregate_cross_attn_map``: mean of the collected maps, each divided by its max, min-max
  normalised, ``>= threshold``); maps resized with nearest neighbour (the thesis' 64 x 64).
* T_m: not given by the paper; the thesis config uses ``STEP_CHANGE_MASK = 1`` (its class
  default 5): :data:`DEFAULT_T_M` = 1.

No torch import at module import time (SAM imports it when used).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import cv2
import numpy as np

from ..diffusion.loading import MissingWeights

__all__ = [
    "DEFAULT_T_M",
    "EDIT_TYPES",
    "STRATEGIES",
    "AttentionMaskRefiner",
    "attention_target_mask",
    "convex_hull_mask",
    "expand_mask",
    "load_sam_predictor",
    "refine_schedule",
    "source_mask_for",
    "source_mask_from_sam",
    "target_mask",
]

EDIT_TYPES = ("replace", "pose_view", "background", "remove", "add")
#: M_t strategies for ``replace`` / ``pose_view``.
STRATEGIES = ("attention", "convex_hull", "dilate", "source")
#: Steps that use M_s before switching to the refined M_t (thesis config ``STEP_CHANGE_MASK``).
DEFAULT_T_M = 1
DEFAULT_THRESHOLD = 0.25


def _bool_mask(name: str, m: Any) -> np.ndarray:
    a = np.asarray(m)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite values")
        a = a > 0.5
    return a


def _check_type(edit_type: str) -> None:
    if edit_type not in EDIT_TYPES:
        raise ValueError(f"unknown CPAM edit type {edit_type!r}; known: {', '.join(EDIT_TYPES)}")


def expand_mask(mask: Any, scale: float) -> np.ndarray:
    """Dilate ``mask`` with a square ``k x k`` kernel, ``k = int(sqrt(area) * scale)`` (thesis
    ``expand_mask``); ``k == 0`` (or an empty mask) returns the mask unchanged."""
    m = _bool_mask("mask", mask)
    if scale < 0:
        raise ValueError(f"dilation scale must be >= 0, got {scale}")
    k = int(math.sqrt(float(m.sum())) * scale)
    if k == 0:
        return m.copy()
    return cv2.dilate(m.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)


def convex_hull_mask(mask: Any, scale: float = 0.1) -> np.ndarray:
    """The convex hull of ``mask`` (``skimage.morphology.convex_hull_image``) dilated by
    :func:`expand_mask` with ``scale``. An empty mask stays empty."""
    from skimage.morphology import convex_hull_image

    m = _bool_mask("mask", mask)
    if not m.any():
        return m.copy()
    return expand_mask(convex_hull_image(m), scale)


def _resize_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if a.shape == tuple(size):
        return a
    # cv2 takes (width, height)
    return cv2.resize(a.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def attention_target_mask(
    maps: Any,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Binary M_t from cross-attention maps of the target-prompt tokens (thesis
    ``aggregate_cross_attn_map``): every map (``(h, w)``, heads and tokens already averaged) is
    resized to ``size`` (nearest; default: the first map's size) and divided by its max, the maps
    are averaged (the running mean over steps and layers), min-max normalised to [0, 1], and
    ``>= threshold`` is the mask. ``maps``: a sequence of 2-D maps or a ``(n, h, w)`` array."""
    if getattr(maps, "ndim", None) == 2:  # one map (array or tensor)
        maps = [maps]
    arr = [np.asarray(m, dtype=np.float64) for m in maps]
    if not arr:
        raise ValueError("attention_target_mask needs at least one attention map")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    size = tuple(size) if size is not None else arr[0].shape
    acc = np.zeros(size, dtype=np.float64)
    for i, m in enumerate(arr):
        if m.ndim != 2:
            raise ValueError(f"attention map {i} must be 2-D (h, w), got shape {m.shape}")
        if not np.isfinite(m).all():
            raise ValueError(f"attention map {i} has non-finite values")
        m = _resize_nearest(m, size).astype(np.float64)
        peak = m.max()
        acc += m / peak if peak > 0 else m
    acc /= len(arr)
    lo, hi = acc.min(), acc.max()
    if hi <= lo:  # a flat map carries no location: no pixel stands out
        return np.zeros(size, dtype=bool)
    return (acc - lo) / (hi - lo) >= threshold


def source_mask_for(edit_type: str, object_mask: Any) -> np.ndarray:
    """M_s for an edit type: the object mask, or the background ``1 - object mask`` for
    ``background`` (the paper: "M_s is the mask of the background")."""
    _check_type(edit_type)
    m = _bool_mask("object_mask", object_mask)
    return ~m if edit_type == "background" else m.copy()


def target_mask(
    edit_type: str,
    source_mask: Any,
    *,
    strategy: str = "convex_hull",
    attention_map: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    hull_scale: float = 0.1,
    dilate_scale: float = 0.1,
    add_dilate_scale: float = 0.1,
) -> np.ndarray:
    """M_t (bool ``(H, W)``) for ``edit_type`` from ``source_mask`` (M_s as returned by
    :func:`source_mask_for`: for ``background`` it is already the background).

    ``strategy`` (``replace`` / ``pose_view`` only): ``"attention"`` thresholds ``attention_map``
    (one ``(h, w)`` map or a sequence of maps, :func:`attention_target_mask`; resized to M_s's
    size), ``"convex_hull"`` the hull of M_s dilated by ``hull_scale``, ``"dilate"`` M_s dilated
    by ``dilate_scale``, ``"source"`` M_s. ``add``: M_s dilated by ``add_dilate_scale`` (0 = M_s).
    """
    _check_type(edit_type)
    m_s = _bool_mask("source_mask", source_mask)
    if edit_type == "remove":
        return np.zeros_like(m_s)
    if edit_type == "background":
        return m_s.copy()
    if edit_type == "add":
        return expand_mask(m_s, add_dilate_scale)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown target-mask strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if strategy == "attention":
        if attention_map is None:
            raise ValueError(f"strategy 'attention' for edit type {edit_type!r} needs attention_map")
        return attention_target_mask(attention_map, threshold, size=m_s.shape)
    if strategy == "convex_hull":
        return convex_hull_mask(m_s, hull_scale)
    if strategy == "dilate":
        return expand_mask(m_s, dilate_scale)
    return m_s.copy()


def refine_schedule(step: int, t_m: int = DEFAULT_T_M) -> bool:
    """Whether the refined M_t is in use at 0-based ``step``: False for the first ``t_m`` steps
    (M_s is used), True from step ``t_m`` on."""
    if t_m < 0:
        raise ValueError(f"t_m must be >= 0, got {t_m}")
    return step >= t_m


class AttentionMaskRefiner:
    """The thesis' running-mean refinement: cross-attention maps of the target-prompt tokens are
    collected from step ``t_m`` on (:meth:`add`); :meth:`mask` returns M_s before that (or while no
    map was collected) and afterwards :func:`attention_target_mask` of all maps so far at M_s's
    size."""

    def __init__(self, source_mask: Any, *, t_m: int = DEFAULT_T_M, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.source = _bool_mask("source_mask", source_mask)
        self.t_m = int(t_m)
        self.threshold = float(threshold)
        refine_schedule(0, self.t_m)  # validates t_m
        self.maps: list[np.ndarray] = []

    def add(self, step: int, attention_map: Any) -> None:
        """Collect one ``(h, w)`` map at ``step`` (ignored before ``t_m``, as the thesis)."""
        if refine_schedule(step, self.t_m):
            self.maps.append(np.asarray(attention_map, dtype=np.float64))

    def mask(self, step: int) -> np.ndarray:
        if not refine_schedule(step, self.t_m) or not self.maps:
            return self.source.copy()
        return attention_target_mask(self.maps, self.threshold, size=self.source.shape)


# ---------------------------------------------------------------------------
# SAM source masks
# ---------------------------------------------------------------------------


def load_sam_predictor(
    variant: str = "vit_h",
    checkpoint: Any = None,
    *,
    device: str = "cpu",
    tiny: bool = False,
    param: str = "method.sam_checkpoint",
) -> Any:
    """A ``segment_anything.SamPredictor`` on the SAM that ZONE's loader
    (:func:`methods.zone.refine.load_sam_generator`, cached, counted) builds; a missing
    checkpoint raises :class:`MissingWeights` naming ``param``."""
    from segment_anything import SamPredictor

    from ..zone.refine import load_sam_generator

    return SamPredictor(load_sam_generator(variant, checkpoint, device=device, tiny=tiny, param=param).model)


def source_mask_from_sam(
    generator_or_predictor: Any,
    image: np.ndarray,
    points: Sequence[Sequence[float]] | None = None,
    box: Sequence[float] | None = None,
    *,
    point_labels: Sequence[int] | None = None,
) -> np.ndarray:
    """M_s from SAM prompted with ``points`` (``(n, 2)`` x, y pixel coordinates; labels default
    to 1 = foreground) and/or a ``box`` (x0, y0, x1, y1): the multimask output with the highest
    predicted IoU, bool ``(H, W)``. ``generator_or_predictor``: a ``SamPredictor``, a SAM model, or
    ZONE's :class:`~methods.zone.refine.LoadedSam`; ``None`` raises :class:`MissingWeights`."""
    if generator_or_predictor is None:
        raise MissingWeights("source_mask_from_sam: no SAM was given; load one with load_sam_predictor(checkpoint=...)")
    if points is None and box is None:
        raise ValueError("source_mask_from_sam needs points or a box")
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    coords = labels = None
    if points is not None:
        coords = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if coords.shape[0] == 0:
            raise ValueError("points is empty")
        if (coords[:, 0] < 0).any() or (coords[:, 0] >= w).any() or (coords[:, 1] < 0).any() or (coords[:, 1] >= h).any():
            raise ValueError(f"points {coords.tolist()} lie outside the {w}x{h} image")
        labels = np.ones(len(coords), dtype=np.int64) if point_labels is None else np.asarray(point_labels, dtype=np.int64)
        if labels.shape != (len(coords),):
            raise ValueError(f"point_labels must have one label per point ({len(coords)}), got {labels.shape}")
    bx = None
    if box is not None:
        bx = np.asarray(box, dtype=np.float64).reshape(4)
        if not (bx[0] < bx[2] and bx[1] < bx[3]):
            raise ValueError(f"box {bx.tolist()} must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1")
    predictor = generator_or_predictor
    if not hasattr(predictor, "predict"):
        from segment_anything import SamPredictor

        model = getattr(predictor, "model", predictor)  # LoadedSam -> its Sam
        predictor = SamPredictor(model)
    predictor.set_image(img)
    masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, box=bx, multimask_output=True)
    return np.asarray(masks[int(np.argmax(scores))], dtype=bool)
