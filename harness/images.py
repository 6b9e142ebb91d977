"""Image and mask I/O that turns odd inputs into RGB uint8 or a clear error.

Handled: EXIF orientation, 16-bit and 32-bit greyscale, 16-bit colour (via OpenCV), CMYK,
palette, greyscale and alpha images (alpha composited over white). Truncated and unreadable files
raise :class:`SampleError` naming the sample and the field. Every conversion is reported back
as a short note so that it can be recorded with the sample.

Size limit: an image whose header declares more than ``max_pixels`` pixels (default
:data:`DEFAULT_MAX_PIXELS`, Pillow's decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``; a
dataset parameter, ``dataset.max_pixels=N``) is refused from its header, before any pixel is
decoded.

Masks (:func:`load_mask`) are never thresholded silently: a mask must be binary (values 0 and
255, or 0 and 1, or 0 and 65535 for 16 bits) unless the dataset's ``mask_rule`` says how to
convert one that is not (:data:`MASK_RULES`); every conversion is noted.

Messages name a file by the path the dataset gives (``shown``, relative to the dataset folder),
never by an absolute machine path, so two machines write the same reasons.

Decoding options (a protocol's ``decode``, :func:`decode_options`): the default applies the
EXIF orientation and composites alpha over white, right for users' own data; a protocol that
reproduces an official script decodes as the script does: ``exif_orientation: false`` leaves the
pixels as stored (``Image.open`` alone never rotates), ``alpha: drop`` keeps the colour channels
and ignores alpha (``Image.open(p).convert("RGB")``, as MagicBrush's ``image_eval.py`` reads).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .fileio import atomic_write
from .types import SampleError


#: The harness's own decoding (what methods always get): EXIF orientation applied, alpha over white.
DEFAULT_DECODE: dict[str, Any] = {"exif_orientation": True, "alpha": "white"}
ALPHA_RULES = ("white", "drop")
#: ``Sample.meta`` key: field -> how a protocol's decoding changed that image from the default
#: (``exif_ignored``, ``alpha_dropped``); absent when nothing differs.
DECODE_DIFFERS = "decode_differs"
#: ``Sample.meta`` key: mask field -> the note of a conversion its dataset's ``mask_rule`` made
#: (``edit-harness validate`` reports each as a warning).
MASK_CONVERSIONS = "mask_conversions"

#: Pixels an image may declare before it is refused unread: Pillow's own decompression-bomb
#: limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5 million, e.g. 9459 x 9459), as at import.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

#: How a mask that is not binary is read (a dataset's ``mask_rule``):
#:   ``binary``: refused (the sample fails, naming the mask and how many pixels are soft);
#:   ``threshold``: a pixel is edited when its grey level (0-255 scale) is > ``mask_threshold``;
#:   ``nonzero``: every non-zero pixel is edited (anti-aliased edges count as edited).
MASK_RULES = ("binary", "threshold", "nonzero")
DEFAULT_MASK_THRESHOLD = 127


def check_max_pixels(value: Any, owner: str = "dataset") -> int:
    """A ``max_pixels`` setting checked (None = the default). A limit above Pillow's raises
    Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` to it, or Pillow would refuse such images
    at open before the harness's own check."""
    if value is None:
        return DEFAULT_MAX_PIXELS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: max_pixels must be a positive integer (pixels), got {value!r}")
    if Image.MAX_IMAGE_PIXELS is not None and value > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = value
    return value


def check_mask_rule(rule: Any, threshold: Any, owner: str = "dataset") -> tuple[str, int]:
    """A dataset's (``mask_rule``, ``mask_threshold``) checked, defaults filled in."""
    rule = "binary" if rule is None else rule
    if rule not in MASK_RULES:
        raise ValueError(f"{owner}: mask_rule must be one of {', '.join(MASK_RULES)}, got {rule!r}")
    threshold = DEFAULT_MASK_THRESHOLD if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold <= 254:
        raise ValueError(f"{owner}: mask_threshold must be an integer in 0..254 (grey level), got {threshold!r}")
    return rule, threshold


@contextlib.contextmanager
def open_image(path: Path, sample_id: str, field: str, shown: str, max_pixels: int | None = None,
               what: str = "image") -> Iterator[Image.Image]:
    """``Image.open`` (header only) with the size limit checked before anything is decoded.

    Pillow's own guard (a warning over its limit, an error at twice it) is replaced by this one,
    which names the sample and the field."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise SampleError(sample_id, field, f"{what} {shown} is too large to decode safely ({e}); "
                                            f"the limit is dataset.max_pixels={limit}") from None
    with img:
        w, h = img.size
        if w * h > limit:
            raise SampleError(sample_id, field, f"{what} {shown} is {w}x{h} = {w * h} pixels, over the limit of "
                                                f"{limit} (dataset.max_pixels); refused before decoding")
        yield img


def decode_options(decode: Any) -> dict[str, Any]:
    """A protocol's decoding options (``{exif_orientation: bool, alpha: white|drop}``) checked,
    with the defaults filled in; ValueError names the bad key."""
    opts = dict(DEFAULT_DECODE)
    if decode is None:
        return opts
    if not isinstance(decode, Mapping):
        raise ValueError(f"decode must be a mapping {{exif_orientation: true|false, alpha: white|drop}}, "
                         f"got {decode!r}")
    unknown = sorted(set(decode) - set(opts))
    if unknown:
        raise ValueError(f"decode has unknown key(s) {', '.join(map(str, unknown))}; "
                         f"known: exif_orientation (true|false), alpha ({'|'.join(ALPHA_RULES)})")
    opts.update(decode)
    if not isinstance(opts["exif_orientation"], bool):
        raise ValueError(f"decode.exif_orientation must be true or false, got {opts['exif_orientation']!r}")
    if opts["alpha"] not in ALPHA_RULES:
        raise ValueError(f"decode.alpha must be one of {', '.join(ALPHA_RULES)}, got {opts['alpha']!r}")
    return opts


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _to_rgb_uint8(img: Image.Image, notes: list[str], alpha: str = "white") -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            if not np.all(np.isfinite(arr)):
                raise ValueError("float image contains NaN or inf")
            lo, hi = 0.0, 1.0 if arr.max() <= 1.0 else 255.0
        else:
            lo, hi = 0.0, 65535.0 if arr.max() > 255 or mode.startswith("I;16") else 255.0
        arr = np.clip(np.round((arr - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        notes.append(f"{mode} greyscale scaled to 8 bits")
        return np.repeat(arr[..., None], 3, axis=2)
    if _has_alpha(img) and alpha == "drop":
        notes.append(f"{mode} alpha dropped (protocol decoding)")
        return np.asarray(img.convert("RGB"))
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"{mode} alpha composited over white")
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    return np.asarray(img.convert("RGB"))


def rgb_from_image(img: Image.Image, field: str, notes: list[str], *, exif_orientation: bool = True,
                   alpha: str = "white", differs: dict[str, list[str]] | None = None) -> np.ndarray:
    """A loaded 8-bit image as RGB uint8 with the harness's conversions (EXIF orientation, alpha,
    palette, CMYK ...), each noted under ``field``; ``differs`` as for :func:`load_image`."""
    orientation = _exif_orientation(img)
    turned = orientation not in (None, 1)
    if turned:
        notes.append(f"{field}: EXIF orientation {orientation} "
                     + ("applied" if exif_orientation else "not applied (protocol decoding)"))
    local: list[str] = []
    arr = _to_rgb_uint8(ImageOps.exif_transpose(img) if exif_orientation else img, local, alpha)
    notes.extend(f"{field}: {n}" for n in local)
    if differs is not None:
        how = []
        # Each difference is checked by decoding once more with that option at its
        # default: only an image where it changes the pixels is reported.
        if turned and not exif_orientation and not _same(arr, _to_rgb_uint8(ImageOps.exif_transpose(img), [], alpha)):
            how.append("exif_ignored")
        if alpha != "white" and _has_alpha(img):
            base = ImageOps.exif_transpose(img) if exif_orientation else img
            if not _same(arr, _to_rgb_uint8(base, [], "white")):
                how.append("alpha_dropped")
        if how:
            differs[field] = how
    return arr


def load_image(
    path: str | os.PathLike,
    sample_id: str,
    field: str,
    notes: list[str] | None = None,
    *,
    exif_orientation: bool = True,
    alpha: str = "white",
    differs: dict[str, list[str]] | None = None,
    shown: str | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Load an image file as RGB uint8 HxWx3, or raise SampleError naming sample and field.

    ``exif_orientation`` and ``alpha``: see the module docstring. ``differs``: filled with
    ``field -> [how]`` when these options give other pixels than the default decoding would.
    ``shown``: the file's name in messages (default: the path as given). ``max_pixels``: the
    size limit (default :data:`DEFAULT_MAX_PIXELS`), checked from the header.
    """
    notes = notes if notes is not None else []
    p = Path(path)
    shown = str(path) if shown is None else shown
    if not p.is_file():
        raise SampleError(sample_id, field, f"file not found: {shown}")
    try:
        with open_image(p, sample_id, field, shown, max_pixels) as img:
            img.load()  # forces a full decode: truncated files fail here
            if img.format == "PNG" and img.mode == "RGB" and _png_bit_depth(p) == 16:
                arr = _load_16bit_colour(p)
                notes.append(f"{field}: 16-bit colour scaled to 8 bits")
                return arr
            arr = rgb_from_image(img, field, notes, exif_orientation=exif_orientation, alpha=alpha, differs=differs)
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(sample_id, field, f"unreadable or truncated image {shown}: {_no_path(e, p, shown)}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SampleError(sample_id, field, f"image {shown} has unusable shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # broken EXIF blocks are ignored, the pixels are still usable
        return None


def _png_bit_depth(p: Path) -> int:
    with open(p, "rb") as f:
        head = f.read(33)
    # PNG signature (8) + IHDR length/type (8) + width, height (8) -> bit depth at byte 24.
    return head[24] if len(head) > 24 and head[:8] == b"\x89PNG\r\n\x1a\n" else 8


def _load_16bit_colour(p: Path) -> np.ndarray:
    import cv2  # Pillow truncates 16-bit colour PNGs; OpenCV reads them at full depth

    arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise OSError("OpenCV could not decode the 16-bit image")
    arr = arr[..., :3][..., ::-1]  # BGR(A) -> RGB
    return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)


def mask_levels(img: Image.Image, field: str, notes: list[str], exif_orientation: bool = True) -> tuple[np.ndarray, int]:
    """The levels a mask image carries and their scale's top (255, or 65535 for 16-bit): its
    alpha channel when that is not fully opaque, else its grey levels (an RGBA mask whose alpha
    is all 255 carries its mask in its colours: noted). Loads ``img``; ``exif_orientation``
    applies its EXIF rotation first."""
    img.load()
    if exif_orientation:
        img = ImageOps.exif_transpose(img)
    if _has_alpha(img):
        a = np.asarray(img.convert("RGBA").getchannel("A"))
        if a.min() < 255:
            return a, 255
        notes.append(f"{field}: alpha channel fully opaque, grey levels used as the mask")
    if img.mode.startswith("I;16") or img.mode == "I":
        levels = np.asarray(img).astype(np.int64)
        return levels, 65535 if levels.max(initial=0) > 255 or img.mode.startswith("I;16") else 255
    return np.asarray(img.convert("L")), 255


def load_mask(
    path: str | os.PathLike, sample_id: str, field: str, shape: tuple[int, int] | None,
    exif_orientation: bool = True,
    *,
    rule: str = "binary",
    threshold: int = DEFAULT_MASK_THRESHOLD,
    notes: list[str] | None = None,
    shown: str | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Load a mask as bool HxW (True = edited).

    The levels read are the alpha channel when the file has one that is not fully opaque, else
    the grey levels (an RGBA mask whose alpha is all 255 carries its mask in its colours: noted).
    A binary mask (levels 0 and 255, 0 and 1, or 0 and 65535) is read as is; any other follows
    ``rule`` (:data:`MASK_RULES`; ``threshold`` on the 0-255 scale), and the conversion is
    appended to ``notes``. ``exif_orientation``: as for its image (a protocol that leaves
    images as stored leaves their masks so too, or the two would not line up)."""
    p = Path(path)
    shown = str(path) if shown is None else shown
    notes = notes if notes is not None else []
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule must be one of {', '.join(MASK_RULES)}, got {rule!r}")
    if not p.is_file():
        raise SampleError(sample_id, field, f"file not found: {shown}")
    try:
        with open_image(p, sample_id, field, shown, max_pixels, what="mask") as img:
            levels, top = mask_levels(img, field, notes, exif_orientation)
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(sample_id, field, f"unreadable or truncated mask {shown}: {_no_path(e, p, shown)}") from None
    if shape is not None and levels.shape != tuple(shape):
        raise SampleError(
            sample_id,
            field,
            f"mask {shown} is {levels.shape[1]}x{levels.shape[0]} (WxH) but its image is {shape[1]}x{shape[0]}",
        )
    return binarize_mask(levels, top, sample_id, field, shown, rule, threshold, notes)


def binarize_mask(levels: np.ndarray, top: int, sample_id: str, field: str, shown: str, rule: str,
                  threshold: int, notes: list[str], edited_high: bool = True) -> np.ndarray:
    """Mask levels (0..``top``) as bool, True = edited: exactly when the mask is binary, else by
    ``rule`` with a note. ``edited_high``: False where low levels mark the edit (MagicBrush's
    transparent and black conventions)."""
    values = np.unique(levels)
    high = values[values > 0]
    # Binary: zero and one other level, the scale's maximum (255, 65535) or 1 (0/1 masks).
    binary = high.size == 0 or (high.size == 1 and int(high[0]) in (1, 255, top))
    if binary:
        if high.size and int(high[0]) == 1 and top != 1:
            notes.append(f"{field}: levels 0/1 read as a binary mask")
        on = levels > 0
        return on if edited_high else ~on
    low_values = values[(values > 0) & (values < top)]
    soft = int(np.isin(levels, low_values).sum())
    total = levels.size
    if rule == "binary":
        raise SampleError(
            sample_id, field,
            f"mask {shown} is not binary: {soft} of {total} pixels have levels strictly between 0 and {top} "
            "(soft or anti-aliased edges, or a grey or colour level); set dataset.mask_rule=threshold (with dataset.mask_threshold, "
            f"default {DEFAULT_MASK_THRESHOLD}) or dataset.mask_rule=nonzero to convert it",
        )
    # The rule reads levels where high = edited; where low levels mark the edit, mirrored first.
    lv = levels.astype(np.int64) if edited_high else top - levels.astype(np.int64)
    if rule == "threshold":
        on = lv * (255.0 / top) > threshold if top != 255 else lv > threshold
        how = f"thresholded at > {threshold} (0-255 scale)"
    else:
        on = lv > 0
        how = "every non-zero level taken as edited"
    if not edited_high:
        how += " on the inverted levels (low levels mark the edit)"
    notes.append(f"{field}: not binary ({soft} of {total} pixels soft), {how} (mask_rule={rule})")
    return on


def _no_path(err: BaseException, path: Path, shown: str) -> str:
    """An exception's message with the file's machine path replaced by the dataset's name for it."""
    msg = str(err)
    for form in {str(path), str(path.absolute()), str(path.resolve())}:
        msg = msg.replace(form, shown)
    return msg


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image or a bool mask.

    OpenCV's encoder with zlib level 1 and the RLE strategy is about twice as fast as Pillow's
    at its fastest setting on 512 px photos, for files about 10% larger; edits are written once
    and read a few times, so speed wins.
    """
    import cv2

    if arr.dtype == bool:
        data = arr.astype(np.uint8) * 255
    else:
        data = np.ascontiguousarray(arr[..., ::-1])  # RGB -> BGR for OpenCV
    ok, buf = cv2.imencode(".png", data, [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def save_png(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Atomically save an RGB uint8 image or a bool mask as PNG."""
    atomic_write(path, encode_png(arr))


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG the harness wrote itself (RGB or L)."""
    with Image.open(path) as img:
        arr = np.asarray(img)
    return arr > 127 if arr.ndim == 2 else arr
