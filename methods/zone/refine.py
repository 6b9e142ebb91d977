"""ZONE's mask refinement: SAM's automatic segments picked by region IoU (Sec. 4.3, Eq. 6).

The code (``utils/mask_utils.get_finemask_everything``) runs ``SamAutomaticMaskGenerator`` with the
library's default settings on the edited canvas ``I_sty`` (on the source image for "remove"),
passes the rough mask through ``filter_small_regions`` (64 px), takes the segment with the largest
IoU against it (``find_most_overlapping_segmentation``), filters that again and binarises it.

Region IoU. The paper's rIoU (Eq. 6) is ``area(S^j & M_b) / area(S^j | M_b)``, which is the plain
IoU the code computes: the two agree, so :func:`region_iou` has one definition (``score="iou"``).
Its point is the *choice* among all of SAM's segments at every level by IoU with the rough mask,
rather than by a point or box prompt or by the largest overlap.

``filter_small_regions`` quirk. The code measures a component's area as
``ndimage.sum(labels[box], labels[box], index=k)``, i.e. label number ``k`` times its pixel count,
and removes a small component by zeroing its whole bounding box (pixels of other components
inside it included). ``quirk=True`` (default) reproduces this; ``quirk=False`` is the plain
connected-component area filter.

SAM weights come from a local file (``sam_vit_h_4b8939.pth`` ...); ``tiny=True`` builds a seeded
random-weight SAM of the real architecture classes for tests and smoke runs. SAM's forward calls
are counted (:mod:`methods.diffusion.counting`) as ``sam`` (image encoder runs: one per image and
crop) and ``sam_decoder`` (mask decoder batches). No torch import at module import time.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..diffusion import counting
from ..diffusion.loading import MissingWeights
from ..diffusion.tiny import RANDOM_WEIGHTS_LABEL

__all__ = [
    "LoadedSam",
    "SAM_CHECKPOINTS",
    "SAM_DOWNLOAD_URL",
    "SCORES",
    "TINY_SAM_SETTINGS",
    "filter_small_regions",
    "load_sam_generator",
    "pick_segment",
    "refine_mask",
    "region_iou",
    "sam_segments",
]

#: The official checkpoint file of each SAM variant (segment-anything README, "Model Checkpoints").
SAM_CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
SAM_DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
#: Segment scores of :func:`pick_segment` (the paper's rIoU and the code's IoU are the same).
SCORES = ("iou",)
#: Generator settings of the tiny SAM: 4 x 4 prompt points in one batch, and no quality filters
#: (a random-weight SAM's predicted IoU and stability are meaningless; with the library's 0.88 /
#: 0.95 cuts it would return no segment at all).
TINY_SAM_SETTINGS: dict[str, Any] = {
    "points_per_side": 4,
    "points_per_batch": 16,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
}
TINY_SAM_SEED = 0
TINY_SAM_IMG_SIZE = 64  # SAM's input side (the real one: 1024); images are resized to it by SAM

_CACHE: dict[tuple, "LoadedSam"] = {}
_LOCK = threading.Lock()


@dataclasses.dataclass
class LoadedSam:
    """A SAM automatic mask generator with where its weights came from."""

    generator: Any  # segment_anything.SamAutomaticMaskGenerator
    model: Any  # segment_anything.modeling.Sam
    variant: str
    checkpoint: str | None
    weights_label: str  # the checkpoint file, or RANDOM_WEIGHTS_LABEL for the tiny SAM
    settings: dict[str, Any]

    def info(self) -> dict[str, Any]:
        """JSON-ready description for an edit's ``info``."""
        return {"sam_variant": self.variant, "sam_checkpoint": self.checkpoint,
                "sam_weights": self.weights_label, "sam_settings": dict(self.settings)}


def _generator_parameters() -> list[str]:
    from segment_anything import SamAutomaticMaskGenerator

    return [n for n in inspect.signature(SamAutomaticMaskGenerator.__init__).parameters if n not in ("self", "model")]


def _check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    allowed = _generator_parameters()
    bad = sorted(set(settings) - set(allowed))
    if bad:
        raise ValueError(f"unknown SAM generator setting(s) {', '.join(bad)}; known: {', '.join(allowed)}")
    if settings.get("output_mode", "binary_mask") != "binary_mask":
        raise ValueError("SAM generator setting output_mode must be 'binary_mask' (ZONE needs the masks as arrays)")
    return dict(settings)


def _tiny_sam() -> Any:
    """A seeded random-weight SAM built from the real classes (``segment_anything.modeling``) with
    small dimensions: 64 px input, 8 px patches (an 8 x 8 embedding), 2 encoder blocks of width 32
    (one windowed, one global, relative positions as the real ones), a 32-wide two-way transformer
    decoder with 3 multimask outputs and an IoU head."""
    import functools

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, patch, size = 32, 8, TINY_SAM_IMG_SIZE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SAM_SEED)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=size, patch_size=patch, embed_dim=dim, depth=2, num_heads=2, mlp_ratio=2.0,
                out_chans=dim, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                input_image_size=(size, size), mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
                transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
            ),
            # SAM's real normalisation constants (ImageNet mean / std in 0-255)
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return sam.eval().requires_grad_(False)


def _missing(variant: str, checkpoint: str | None, param: str) -> MissingWeights:
    fname = SAM_CHECKPOINTS[variant]
    where = "no checkpoint was given" if checkpoint is None else f"the file {checkpoint} does not exist"
    return MissingWeights(
        f"SAM {variant} weights are missing: {where}. Download {fname} from {SAM_DOWNLOAD_URL}{fname} "
        f"(segment-anything's published checkpoints) and set {param}=/path/to/{fname}"
    )


def load_sam_generator(
    variant: str = "vit_h",
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    settings: Mapping[str, Any] | None = None,
    tiny: bool = False,
    param: str = "method.sam_checkpoint",
) -> LoadedSam:
    """SAM's automatic mask generator (``sam_model_registry[variant](checkpoint=...)`` +
    ``SamAutomaticMaskGenerator(sam, **settings)``), cached per process per
    (variant, checkpoint, device, settings, tiny).

    ``settings`` empty = the library's defaults, as the code. A missing checkpoint (``None`` or a
    path that is not a file) raises :class:`MissingWeights` naming the variant, the expected file,
    where it is published and ``param`` (the parameter to set). ``tiny=True`` ignores
    ``variant`` / ``checkpoint`` and builds the random-weight SAM (:func:`_tiny_sam`) with
    :data:`TINY_SAM_SETTINGS` under ``settings``; its label is ``RANDOM_WEIGHTS_LABEL``.
    The SAM's image encoder and mask decoder are registered with :func:`counting.watch_module`.
    """
    if variant not in SAM_CHECKPOINTS:
        raise ValueError(f"unknown SAM variant {variant!r}; known: {', '.join(SAM_CHECKPOINTS)}")
    merged = _check_settings({**(TINY_SAM_SETTINGS if tiny else {}), **dict(settings or {})})
    ckpt = None if tiny or checkpoint is None else os.path.abspath(os.path.expanduser(os.fspath(checkpoint)))
    if not tiny and (ckpt is None or not os.path.isfile(ckpt)):
        raise _missing(variant, ckpt, param)
    stamp = None
    if ckpt is not None:
        st = os.stat(ckpt)
        stamp = (st.st_size, st.st_mtime_ns)  # a file replaced in place is loaded again
    key = (variant, ckpt, stamp, str(device), tuple(sorted((k, repr(v)) for k, v in merged.items())), bool(tiny))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

        if tiny:
            model = _tiny_sam()
            label = RANDOM_WEIGHTS_LABEL
            used_variant = "tiny"
        else:
            model = sam_model_registry[variant](checkpoint=ckpt).eval()
            label = os.path.basename(ckpt)
            used_variant = variant
        model = model.to(device)
        counting.watch_module("sam", model.image_encoder)
        counting.watch_module("sam_decoder", model.mask_decoder)
        gen = SamAutomaticMaskGenerator(model, **merged)
        loaded = LoadedSam(gen, model, used_variant, ckpt, label, merged)
        _CACHE[key] = loaded
        return loaded


def sam_segments(generator: Any, image: np.ndarray) -> list[np.ndarray]:
    """SAM's automatic segments of ``image`` (RGB uint8 ``(H, W, 3)``) as bool ``(H, W)`` masks, in
    the generator's order. ``generator``: a :class:`LoadedSam` or anything with SAM's
    ``generate(image) -> [{"segmentation": mask, ...}]``."""
    gen = generator.generator if isinstance(generator, LoadedSam) else generator
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"sam_segments: the image must be RGB uint8 (H, W, 3), got {img.dtype} {img.shape}")
    out = []
    for k, rec in enumerate(gen.generate(np.ascontiguousarray(img))):
        m = np.asarray(rec["segmentation"]).astype(bool)
        if m.shape != img.shape[:2]:
            raise ValueError(f"sam_segments: segment {k} has shape {m.shape}, the image {img.shape[:2]}")
        out.append(m)
    return out


def _as_mask(name: str, m: Any) -> np.ndarray:
    a = np.asarray(m)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {a.shape}")
    return a != 0


def filter_small_regions(mask: np.ndarray, min_area: int = 64, *, quirk: bool = True) -> np.ndarray:
    """Remove connected components (4-connectivity, ``scipy.ndimage.label``'s default as in the
    code) smaller than ``min_area`` pixels; returns a new bool mask.

    ``quirk=True`` is the code's ``filter_small_regions``: a component's area is
    ``ndimage.sum_labels(labels[box], labels[box], index=k)`` = label number ``k`` (1-based, in
    raster order) times its pixel count, and a small component is removed by clearing its whole
    bounding box ``box``. ``quirk=False``: true pixel counts, only the component's own pixels.
    """
    m = _as_mask("filter_small_regions: mask", mask)
    labels, n = ndimage.label(m)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    if quirk:
        # The code's ndimage.sum(labels[box], labels[box], index=k) adds the label value k over the
        # component's pixels, all of which lie in its box: k * count, computed for all k at once.
        # Only labels k < min_area can fall below the cut, so the box loop stays short.
        weighted = np.arange(n + 1) * counts
        small = [k for k in range(1, n + 1) if weighted[k] < min_area]
        out = m.copy()
        boxes = ndimage.find_objects(labels, max_label=max(small)) if small else []
        for k in small:
            out[boxes[k - 1]] = False  # the whole bounding box, as the code's mask[region] = 0
        return out
    keep = counts >= min_area
    keep[0] = False  # background
    return keep[labels]


def region_iou(segment: np.ndarray, rough: np.ndarray) -> float:
    """rIoU (Eq. 6): ``area(S & M_b) / area(S | M_b)``; 0.0 when both are empty (the code's 0/0 is
    NaN, which never wins its strict ``>`` comparison either)."""
    s = _as_mask("region_iou: segment", segment)
    r = _as_mask("region_iou: rough mask", rough)
    if s.shape != r.shape:
        raise ValueError(f"region_iou: segment {s.shape} and rough mask {r.shape} differ in shape")
    union = int(np.count_nonzero(s | r))
    return 0.0 if union == 0 else int(np.count_nonzero(s & r)) / union


def pick_segment(
    segments: Sequence[np.ndarray], rough: np.ndarray, score: str = "iou"
) -> tuple[np.ndarray | None, int | None, float]:
    """The segment of highest rIoU with ``rough``: ``(mask, index, score)``.

    As ``find_most_overlapping_segmentation``: a segment must score above 0 and beat the best so
    far strictly, so the first of equal scores wins; ``(None, None, 0.0)`` when no segment
    overlaps the rough mask (the code crashes there; :func:`refine_mask` falls back).
    """
    if score not in SCORES:
        raise ValueError(
            f"unknown segment score {score!r}; known: {', '.join(SCORES)} (the paper's rIoU, Eq. 6, "
            "and the code's find_most_overlapping_segmentation are the same IoU)"
        )
    best, best_i, best_s = None, None, 0.0
    for i, seg in enumerate(segments):
        s = region_iou(seg, rough)
        if s > best_s:
            best, best_i, best_s = _as_mask("pick_segment: segment", seg), i, s
    return best, best_i, float(best_s)


def refine_mask(
    generator: Any,
    image: np.ndarray,
    rough: np.ndarray,
    *,
    min_area: int = 64,
    score: str = "iou",
    quirk: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """ZONE's fine mask ``M_f`` (bool ``(H, W)``) and what happened (``info``).

    ``rough`` -> :func:`filter_small_regions` -> SAM segments of ``image`` (the canvas; the caller
    passes the source for "remove", as the code) -> :func:`pick_segment` -> filtered again.
    ``min_area=0`` skips both filters. When no segment overlaps the (filtered) rough mask, the
    filtered rough mask is returned and ``info["fallback"]`` says so.

    ``info``: ``n_segments``, ``picked`` (index or None), ``score``, ``rough_area``,
    ``rough_filtered_area``, ``fine_area`` (pixels), ``fallback`` (None or the reason).
    """
    r = _as_mask("refine_mask: rough mask", rough)
    img = np.asarray(image)
    if img.shape[:2] != r.shape:
        raise ValueError(f"refine_mask: rough mask {r.shape} does not match the image {img.shape[:2]}")
    rf = filter_small_regions(r, min_area, quirk=quirk) if min_area > 0 else r.copy()
    segments = sam_segments(generator, img)
    seg, idx, s = pick_segment(segments, rf, score)
    fallback = None
    if seg is None:
        fine = rf
        fallback = (f"no SAM segment overlaps the rough mask ({len(segments)} segments, "
                    f"{int(rf.sum())} rough pixels): used the filtered rough mask")
    else:
        fine = filter_small_regions(seg, min_area, quirk=quirk) if min_area > 0 else seg.copy()
    info = {
        "n_segments": len(segments),
        "picked": idx,
        "score": s,
        "rough_area": int(r.sum()),
        "rough_filtered_area": int(rf.sum()),
        "fine_area": int(fine.sum()),
        "fallback": fallback,
    }
    return fine, info
