"""Shared helpers for the classical (CPU, OpenCV / scikit-image) reference methods, and the drag
methods' handle-point selection (:func:`handle_points`, the ``point_subset`` parameter of
``diffeditor``, ``dragondiffusion``, ``dragdiffusion``, ``draggan`` and ``usercontrollablelt``).

Nothing here imports torch. All helpers are deterministic.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage
from skimage.morphology import disk

from harness.metrics.landmarks import LAYOUT as LANDMARK_LAYOUT
from harness.metrics.landmarks import POINT_SETS
from harness.types import Sample, SampleError, SkipSample

INPAINT_FLAGS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}
CLONE_FLAGS = {"normal": cv2.NORMAL_CLONE, "mixed": cv2.MIXED_CLONE}

# Margin added around the image before cv2.seamlessClone (see ``seamless_clone_in_place``).
_CLONE_PAD = 2


def check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: '{name}' must be one of {list(choices)}, got {value!r}")


def check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{owner}: '{name}' must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: '{name}' must be >= {minimum}, got {value!r}")


#: The values of the drag methods' ``point_subset`` parameter: ``all`` (every point of the sample,
#: whatever its layout: the behaviour without the parameter) or a named point set of the 68-point dlib
#: layout (harness/metrics/landmarks.py POINT_SETS: ``68pt`` = points 0-67, ``17pt`` = the jaw line
#: 0-16, the landmark_mse regions). DiffEditor Table 1 (sec. 4.2) drags faces with 17 or 68
#: landmarks; which 17 it does not say: the jaw line is the harness's choice.
POINT_SUBSETS: tuple[str, ...] = ("all", *POINT_SETS)


def check_point_subset(owner: str, value) -> None:
    """A method's ``point_subset`` parameter check (``owner`` names the method in the error)."""
    check_choice(owner, "point_subset", value, POINT_SUBSETS)


def handle_points(sample: Sample, subset: str = "all") -> tuple:
    """The ``(source_points, target_points)`` a drag method drags for ``sample`` under
    ``point_subset = subset``.

    ``"all"`` returns the sample's two fields as they are (each method checks them as it always
    did). A named set (:data:`POINT_SUBSETS`) needs a sample of the ``dlib68`` point layout with at
    least as many points in both fields as the set's largest index + 1, and returns those rows
    (float64 (n, 2) arrays, in the set's order). Anything else raises :class:`SampleError` naming
    the sample and the field (``point_layout``, ``source_points`` or ``target_points``); an unknown
    ``subset`` is a ``ValueError``. The metric is unaffected: landmark_mse still scores against the
    sample's full target points (region ``17pt`` = the points dragged by ``17pt``).
    """
    if subset == "all":
        return sample.source_points, sample.target_points
    if subset not in POINT_SETS:
        raise ValueError(f"point_subset must be one of {list(POINT_SUBSETS)}, got {subset!r}")
    if sample.point_layout != LANDMARK_LAYOUT:
        raise SampleError(sample.id, "point_layout",
                          f"point_subset '{subset}' selects landmarks of the '{LANDMARK_LAYOUT}' layout (68 dlib face "
                          f"points); the sample's point layout is {sample.point_layout!r} (use point_subset 'all')")
    idx = list(POINT_SETS[subset])
    need = max(idx) + 1
    out = []
    for field in ("source_points", "target_points"):
        value = getattr(sample, field)
        if value is None:
            raise SampleError(sample.id, field, f"point_subset '{subset}' needs the sample's {field}; it has none")
        try:
            a = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise SampleError(sample.id, field, f"expected an (N, 2) array of (x, y) points, got "
                                                f"{type(value).__name__}") from None
        if a.ndim != 2 or a.shape[1] != 2:
            raise SampleError(sample.id, field, f"expected an (N, 2) array of (x, y) points, got shape {a.shape}")
        if len(a) < need:
            raise SampleError(sample.id, field, f"point_subset '{subset}' needs point {need - 1} (indices "
                                                f"{idx[0]}-{idx[-1]} of the {LANDMARK_LAYOUT} layout); the sample "
                                                f"has {len(a)} points")
        out.append(a[idx])
    return out[0], out[1]


def source_of(sample: Sample) -> np.ndarray:
    src = sample.source
    if not (isinstance(src, np.ndarray) and src.dtype == np.uint8 and src.ndim == 3 and src.shape[2] == 3):
        raise SampleError(sample.id, "source", f"expected RGB uint8 HxWx3, got {_describe(src)}")
    return np.ascontiguousarray(src)


def mask_of(sample: Sample, field: str = "mask", shape: tuple[int, int] | None = None) -> np.ndarray:
    """The sample's bool mask ``field``, checked against ``shape`` (default: the source's HxW)."""
    m = getattr(sample, field)
    shape = tuple(sample.source.shape[:2]) if shape is None else tuple(shape)
    if not isinstance(m, np.ndarray) or m.ndim != 2:
        raise SampleError(sample.id, field, f"expected a bool HxW mask, got {_describe(m)}")
    if m.shape != shape:
        raise SampleError(sample.id, field, f"mask shape {m.shape} does not match image shape {shape}")
    return m.astype(bool)


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"array of shape {a.shape} and dtype {a.dtype}"
    return type(a).__name__


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, width, height) of the True pixels, or None when there are none."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of ``radius`` pixels (scipy + skimage structuring element)."""
    if radius <= 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=disk(radius).astype(bool))


def require_nonempty(sample: Sample, mask: np.ndarray, method: str, what: str = "mask") -> None:
    if not mask.any():
        raise SkipSample(f"method '{method}': sample '{sample.id}' has an empty {what}; nothing to edit")
    if mask.all():
        raise SkipSample(
            f"method '{method}': sample '{sample.id}' has a {what} covering the whole image; "
            "no surrounding pixels to work from"
        )


def inpaint(image: np.ndarray, mask: np.ndarray, algorithm: str, radius: int) -> np.ndarray:
    """cv2.inpaint inside ``mask``; every pixel outside ``mask`` is byte-identical to ``image``.

    cv2.inpaint treats the three channels alike, so RGB order needs no conversion.
    """
    filled = cv2.inpaint(image, mask.astype(np.uint8) * 255, float(radius), INPAINT_FLAGS[algorithm])
    out = image.copy()
    out[mask] = filled[mask]
    return out


def seamless_clone_in_place(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Poisson-clone the pixels of ``src`` under ``mask`` into ``dst`` at the same coordinates.

    ``src`` and ``dst`` are same-size RGB uint8 images; ``mask`` is bool HxW. Uses
    ``cv2.seamlessClone``, with two adjustments written here because OpenCV does not do them:

    * Border: seamlessClone zeroes the outermost 1-px ring of its mask and asserts that the
      clone rectangle lies inside the destination, so a mask touching the image border fails
      or loses its edge. Both images are padded by ``_CLONE_PAD`` px (reflect-101) and the
      mask by zeros, then the result is cropped back.
    * Placement: OpenCV puts the mask's bounding box at ``center - size // 2``; the centre is
      computed so that this is exactly the mask's own bounding box (no shift).

    OpenCV also erodes the mask internally (3 x 3 kernel, 3 iterations) and keeps the
    destination's gradients in that ~3 px rim inside the mask, so a thin object loses its rim and
    a sharp destination edge inside the rim survives; that is the library's behaviour, kept as is.
    OpenCV solves the Poisson equation over the whole bounding rectangle, so pixels within a few
    px outside the mask move by a few grey levels (measured: <= 4 levels, none beyond 5 px).
    The result is composited with ``mask``: pixels outside ``mask`` are byte-identical to ``dst``.
    """
    box = bbox(mask)
    if box is None:
        return dst.copy()
    p = _CLONE_PAD
    dstp = cv2.copyMakeBorder(dst, p, p, p, p, cv2.BORDER_REFLECT_101)
    srcp = cv2.copyMakeBorder(src, p, p, p, p, cv2.BORDER_REFLECT_101)
    maskp = np.pad(mask, p).astype(np.uint8) * 255
    x0, y0, w, h = box
    center = (x0 + p + w // 2, y0 + p + h // 2)
    blended = cv2.seamlessClone(srcp, dstp, maskp, center, CLONE_FLAGS[mode])[p:-p, p:-p]
    out = dst.copy()
    out[mask] = blended[mask]
    return out


def shift(image: np.ndarray, dx: int, dy: int, fill=0) -> np.ndarray:
    """``image`` translated by (dx, dy) pixels, clipped to its bounds; vacated pixels = ``fill``."""
    h, w = image.shape[:2]
    out = np.full_like(image, fill)
    xs0, xs1 = max(0, -dx), min(w, w - dx)
    ys0, ys1 = max(0, -dy), min(h, h - dy)
    if xs0 < xs1 and ys0 < ys1:
        out[ys0 + dy : ys1 + dy, xs0 + dx : xs1 + dx] = image[ys0:ys1, xs0:xs1]
    return out
