"""``recolor``: recolour the masked region toward the colour named in the target caption.

Lab mode moves CIELAB a*, b* toward the target colour's by ``strength`` and L* by
``strength / 2`` (so white, black and grey are reachable while shading is kept). Hue mode moves
the HSV hue (circularly) and saturation toward the target's; for an achromatic target (white,
black, grey, silver) the hue is left alone and V moves by ``strength / 2`` instead.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Literal

import numpy as np
from skimage import color as skcolor

from harness.method import Method
from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SkipSample

from . import _common as C

# Colour words -> sRGB. Hand-written table (no library maps caption words to colours).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30),
    "crimson": (220, 20, 60),
    "maroon": (128, 0, 0),
    "orange": (255, 140, 0),
    "yellow": (250, 215, 0),
    "golden": (212, 175, 55),
    "gold": (212, 175, 55),
    "green": (40, 160, 50),
    "lime": (50, 205, 50),
    "olive": (128, 128, 0),
    "teal": (0, 128, 128),
    "cyan": (0, 200, 210),
    "turquoise": (64, 224, 208),
    "blue": (30, 80, 220),
    "navy": (0, 0, 128),
    "indigo": (75, 0, 130),
    "purple": (128, 30, 150),
    "violet": (138, 43, 226),
    "magenta": (220, 0, 220),
    "pink": (255, 140, 180),
    "brown": (139, 69, 19),
    "beige": (225, 210, 170),
    "tan": (210, 180, 140),
    "bronze": (205, 127, 50),
    "copper": (184, 115, 51),
    "grey": (128, 128, 128),
    "gray": (128, 128, 128),
    "silver": (192, 192, 192),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
_WORD = re.compile(r"\b(" + "|".join(sorted(COLOURS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
# Below this HSV saturation a target colour counts as achromatic (hue undefined).
_ACHROMATIC_SAT = 0.08


def colour_words(text: str | None) -> list[str]:
    """Colour words of COLOURS in ``text`` (whole words, case-insensitive), in order of appearance."""
    return [m.group(1).lower() for m in _WORD.finditer(text or "")]


def target_colour(target_caption: str | None, source_caption: str | None) -> str | None:
    """The colour the edit asks for: the first colour word of the target caption that the source
    caption lacks; else the first colour word of the target caption; None when there is none."""
    found = colour_words(target_caption)
    if not found:
        return None
    before = set(colour_words(source_caption))
    fresh = [w for w in found if w not in before]
    return (fresh or found)[0]


@METHODS.register("recolor")
class Recolor(Method):
    version = "1"
    requires = ("source", "mask", "target_caption")
    categories = ("change_color", "change_material")

    @dataclasses.dataclass(frozen=True)
    class Params:
        space: Literal["lab", "hue"] = "lab"  # colour space of the shift: CIELAB a*b*(+L*) or HSV hue+saturation
        strength: float = 0.8  # 0 = no change, 1 = full target chroma (and half-way lightness)

        def __post_init__(self):
            C.check_choice("recolor", "space", self.space, ("lab", "hue"))
            s = self.strength
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= float(s) <= 1.0):
                raise ValueError(f"recolor: 'strength' must be a number in [0, 1], got {s!r}")

    def check(self, sample: Sample) -> str | None:
        if target_colour(sample.target_caption, sample.source_caption) is None:
            return (
                f"method '{self.name}': sample '{sample.id}' target caption {sample.target_caption!r} "
                f"names no colour (known: {', '.join(sorted(COLOURS))})"
            )
        return None

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        p = self.params
        src = C.source_of(sample)
        mask = C.mask_of(sample)
        word = target_colour(sample.target_caption, sample.source_caption)
        if word is None:
            raise SkipSample(self.check(sample))
        if not mask.any():
            raise SkipSample(f"method '{self.name}': sample '{sample.id}' has an empty mask; nothing to recolour")
        out = src.copy()
        if p.strength > 0:
            pix = src[mask].astype(np.float64)[:, None, :] / 255.0  # (N, 1, 3)
            target = np.asarray(COLOURS[word], np.float64).reshape(1, 1, 3) / 255.0
            convert = self._lab if p.space == "lab" else self._hue
            new, roundtrip = convert(pix, target, float(p.strength))
            # Apply the change relative to the round-tripped original, so conversion error cancels
            # (and strength -> 0 gives back the source exactly).
            moved = src[mask].astype(np.float64) + (new - roundtrip)[:, 0, :] * 255.0
            out[mask] = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
        return MethodOutput(
            image=out,
            mask=mask,
            info={"colour": word, "target_rgb": list(COLOURS[word]), "space": p.space},
        )

    @staticmethod
    def _lab(pix: np.ndarray, target: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
        lab = skcolor.rgb2lab(pix)
        t = skcolor.rgb2lab(target)[0, 0]
        new = lab.copy()
        new[..., 0] += 0.5 * s * (t[0] - lab[..., 0])
        new[..., 1] += s * (t[1] - lab[..., 1])
        new[..., 2] += s * (t[2] - lab[..., 2])
        with warnings.catch_warnings():  # out-of-gamut Lab values are clipped by lab2rgb
            warnings.simplefilter("ignore")
            return skcolor.lab2rgb(new), skcolor.lab2rgb(lab)

    @staticmethod
    def _hue(pix: np.ndarray, target: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
        hsv = skcolor.rgb2hsv(pix)
        th, ts, tv = skcolor.rgb2hsv(target)[0, 0]
        new = hsv.copy()
        if ts < _ACHROMATIC_SAT:
            new[..., 2] += 0.5 * s * (tv - hsv[..., 2])
        else:
            dh = (th - hsv[..., 0] + 0.5) % 1.0 - 0.5  # shortest signed way round the hue circle
            new[..., 0] = (hsv[..., 0] + s * dh) % 1.0
        new[..., 1] += s * (ts - hsv[..., 1])
        return skcolor.hsv2rgb(new), skcolor.hsv2rgb(hsv)
