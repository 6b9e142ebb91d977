"""ZONE's FFT edge smoother and layer composite (Sec. 4.4, Eqs. 7-8; code ``inference.py`` and
``utils/mask_utils.py``: ``dilate_mask``, ``subtract_fft_images``, the end of ``fused_ip2p``).

The fine mask ``M_f`` is dilated to ``M_d``; the canvas ``I_sty`` and the source ``I_G``, both
masked by ``M_d``, are compared after an ideal low-pass in the Fourier domain; the thresholded,
closed and filled difference is the final mask ``M_f*``. The composite takes the canvas inside
``M_f*`` and the source outside, and feathers the ring where ``M_f*`` and ``M_f`` disagree with
``alpha * canvas + (1 - alpha) * source`` (the code's ``--alpha 0.6``; not in the paper).

Where the code's arithmetic matters, it is reproduced and said so: the greyscale weights it ends
up using (``grey="code"``), the uint8 cast that wraps values above 255 (``wrap_uint8=True``), the
truncating float-to-uint8 assignment of the feathered ring. All image operations are NumPy's FFT
and OpenCV's morphology / contour functions.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["GREY_RULES", "cast_uint8", "composite", "dilate", "fft_edge_mask", "scaled_sizes"]

#: ``grey=`` values of :func:`fft_edge_mask`.
GREY_RULES = ("code", "bt601")


def _mask(name: str, m: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(m)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, the images {shape}")
    return a != 0


def _rgb(name: str, img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"{name} must be an RGB uint8 image (H, W, 3), got {a.dtype} {a.shape}")
    return a


def dilate(mask: np.ndarray, kernel: int = 3, iterations: int = 4) -> np.ndarray:
    """``M_d``: ``cv2.dilate`` with a ``kernel x kernel`` rectangle, ``iterations`` times (the code's
    ``dilate_mask`` with ``--dilate_strength 4``); bool in, bool out."""
    m = _mask("dilate: mask", mask)
    if kernel < 1 or iterations < 0:
        raise ValueError(f"dilate: kernel must be >= 1 and iterations >= 0, got {kernel}, {iterations}")
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (int(kernel), int(kernel)))
    return cv2.dilate(m.astype(np.uint8), k, iterations=int(iterations)) > 0


def scaled_sizes(shape: tuple[int, int], d0: float = 200.0, close_kernel: int = 21,
                 reference_size: int = 512) -> tuple[int, int]:
    """(low-pass radius, closing kernel side) for an image of ``shape = (H, W)``.

    The paper sets ``D0 = 200`` "for a 512 x 512 image"; the code uses 200 and a 21 x 21 closing on
    images whose longest side is at most 512 (``check_image_size``). Both are scaled by
    ``max(H, W) / reference_size`` (so a 512-px-long image gets exactly the code's values), the
    radius rounded to an int (``cv2.circle`` takes one), the kernel rounded and made odd (>= 1) so
    that it stays centred.
    """
    h, w = shape
    scale = max(h, w) / float(reference_size)
    radius = max(0, int(round(d0 * scale)))
    k = max(1, int(round(close_kernel * scale)))
    if k % 2 == 0:
        k += 1
    return radius, k


def cast_uint8(values: np.ndarray, wrap: bool = True) -> np.ndarray:
    """Non-negative floats to uint8 as the code's ``img.astype(np.uint8)``: truncation, and values
    of 256 or more wrap modulo 256 (what that cast does on x86; NumPy leaves it undefined, so the
    wrap is written out here). ``wrap=False`` saturates at 255 instead."""
    v = np.floor(np.asarray(values, dtype=np.float64))
    if wrap:
        return np.mod(v, 256.0).astype(np.uint8)
    return np.clip(v, 0, 255).astype(np.uint8)


def fft_edge_mask(
    edited: np.ndarray,
    source: np.ndarray,
    mask: np.ndarray,
    *,
    d0: float = 200.0,
    reference_size: int = 512,
    threshold: float = 30.0,
    close_kernel: int = 21,
    wrap_uint8: bool = True,
    grey: str = "code",
) -> np.ndarray:
    """``M_f*`` (bool ``(H, W)``): the code's ``subtract_fft_images(sty_edge, gt_edge, threshold)``.

    ``edited`` (the canvas ``I_sty``) and ``source`` (``I_G``) are RGB uint8; ``mask`` is applied
    as given: pass the dilated mask ``M_d`` (:func:`dilate`), as the code does. Steps:

    1. both images set to 0 outside ``mask``, converted to grey (``cv2.cvtColor``);
    2. ``numpy.fft.fft2`` + ``fftshift``; both spectra multiplied by an ideal low-pass disc of
       radius ``D0`` (Eq. 8; drawn with ``cv2.circle`` as the code; radius and kernel from
       :func:`scaled_sizes`); subtracted;
    3. ``ifftshift`` + ``ifft2``, absolute value, :func:`cast_uint8` (``wrap_uint8``);
    4. ``> threshold`` (the code's ``--threshold 30``; the function's own default is 35);
    5. ``cv2.morphologyEx(MORPH_CLOSE)`` with a square of ones;
    6. the external contours (``cv2.findContours(RETR_EXTERNAL)``) drawn filled: holes are filled.

    ``grey="code"``: the code converts with ``COLOR_RGB2GRAY`` images it had put in BGR order
    (``cv2.cvtColor(np.array(pil), COLOR_BGR2RGB)``), so red gets blue's weight 0.114 and blue
    red's 0.299; reproduced here on RGB input. ``grey="bt601"``: the usual 0.299 R + 0.587 G +
    0.114 B. The code centres the disc at ``(rows // 2, cols // 2)`` given as (x, y), which is
    transposed on non-square images; here it is at the spectrum's centre (the same on square ones).
    """
    e = _rgb("fft_edge_mask: edited", edited)
    s = _rgb("fft_edge_mask: source", source)
    if e.shape != s.shape:
        raise ValueError(f"fft_edge_mask: edited {e.shape} and source {s.shape} differ in shape")
    m = _mask("fft_edge_mask: mask", mask, e.shape[:2])
    if grey not in GREY_RULES:
        raise ValueError(f"fft_edge_mask: grey must be one of {', '.join(GREY_RULES)}, got {grey!r}")
    conv = cv2.COLOR_BGR2GRAY if grey == "code" else cv2.COLOR_RGB2GRAY
    h, w = m.shape
    radius, k = scaled_sizes((h, w), d0, close_kernel, reference_size)

    def spectrum(img: np.ndarray) -> np.ndarray:
        x = img.copy()
        x[~m] = 0
        return np.fft.fftshift(np.fft.fft2(cv2.cvtColor(x, conv)))

    disc = np.zeros((h, w), np.uint8)
    cv2.circle(disc, (w // 2, h // 2), radius, 1, -1)  # filled; centre as (x, y)
    diff = spectrum(e) * disc - spectrum(s) * disc
    mag = np.abs(np.fft.ifft2(np.fft.ifftshift(diff)))
    img = cast_uint8(mag, wrap=wrap_uint8)
    binary = np.where(img > threshold, 255, 0).astype(np.uint8)
    closed = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    contours = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[-2]
    filled = np.zeros((h, w), np.uint8)
    cv2.drawContours(filled, contours, -1, 255, cv2.FILLED)
    return filled > 0


def composite(
    source: np.ndarray,
    edited: np.ndarray,
    fine: np.ndarray,
    smoothed: np.ndarray,
    *,
    alpha: float = 0.6,
) -> np.ndarray:
    """The final image ``I_C`` (uint8 ``(H, W, 3)``), as the end of the code's ``fused_ip2p``.

    Start from ``source``; pixels of ``smoothed`` (``M_f*``) take ``edited``; pixels in the
    symmetric difference of ``smoothed`` and ``fine`` (the code's ``M_f* - M_f`` on 0/255 uint8
    masks, whose wrap makes ``0 - 255`` non-zero too) take ``edited * alpha + source * (1 - alpha)``
    computed in float64 in that order and truncated to uint8, as the code's assignment of a float
    array into a uint8 one. All-True masks give ``edited`` and all-False ``source``, bit for bit.
    """
    src = _rgb("composite: source", source)
    ed = _rgb("composite: edited", edited)
    if src.shape != ed.shape:
        raise ValueError(f"composite: source {src.shape} and edited {ed.shape} differ in shape")
    f = _mask("composite: fine mask", fine, src.shape[:2])
    sm = _mask("composite: smoothed mask", smoothed, src.shape[:2])
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"composite: alpha must be in [0, 1], got {alpha}")
    out = src.copy()
    out[sm] = ed[sm]
    ring = sm ^ f
    blended = ed[ring] * alpha + src[ring] * (1 - alpha)  # float64, the code's expression
    out[ring] = np.trunc(blended).astype(np.uint8)  # values lie in [0, 255]: truncation as the code
    return out
