"""The contract every metric implements, and the region rules they share.

A metric is one class registered with ``@METRICS.register("<name>")``. Like a torchmetrics
``Metric`` it has ``higher_is_better`` and ``update``/``compute``; per-edit metrics implement
:meth:`Metric.score_batch`, which returns one list of :class:`ScoreValue` per item.

Models are loaded once per process in :meth:`Metric.load` (called lazily by the suite), and
torch is imported inside metric modules' functions, never at module import, so that a rerun
whose scores are all cached never pays for importing torch.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np

from .. import versions
from ..types import Sample, ScoreValue

REGIONS = ("all", "edited", "unedited")

# How a metric is restricted to a region:
#   area:      the metric is averaged over the region's pixels only (mean over the region area);
#   zero_fill: both images are multiplied by the region mask (zeros outside) and the metric is
#              computed on the whole tensor, so the denominator is the full image (PIE-Bench).
REGION_RULES = ("area", "zero_fill")

REGION_RULE_TEXT = {
    "area": "mean over the region's pixels",
    "zero_fill": "both images zero-filled outside the region, mean over the whole image (PIE-Bench)",
}


# Libraries whose numerics define a metric's values (issue 10): their installed versions go into
# every cached score's key (the suite's entry hash), so that an upgrade (say torchmetrics 1.4.2,
# which changed how SSIM averages its map) rescores instead of mixing two conventions in one
# table. Names are distributions; "opencv" / "dlib" stand for whichever of their wheels is installed.
NUMERIC_LIBRARIES = ("numpy", "pillow", "opencv", "torch", "torchvision", "torchmetrics", "open_clip_torch",
                     "timm", "lpips", "scikit-image")


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (weights or a package missing); the message says how to fix it."""


@dataclasses.dataclass
class ScoringItem:
    """An edit to score: the sample, the edited image (RGB uint8) and the mask the method used."""

    sample: Sample
    edit: np.ndarray
    edit_mask: np.ndarray | None = None


class Metric(abc.ABC):
    name: ClassVar[str] = "?"
    higher_is_better: ClassVar[bool] = False
    # Sample fields needed; an item lacking one gets a NaN row flagged 'missing:<field>'.
    requires: ClassVar[tuple[str, ...]] = ()

    # Metric-specific parameters and their defaults; None means "accept any keyword" (the
    # original contract). Subclasses that set it get unknown keywords rejected with a TypeError
    # naming the known ones (the suite turns that into a config error).
    param_defaults: ClassVar[dict[str, Any] | None] = None

    # The libraries whose versions key this metric's cached scores (see NUMERIC_LIBRARIES); a
    # metric that does not say gets them all (an upgrade of any of them rescores it).
    numeric_libraries: ClassVar[tuple[str, ...]] = NUMERIC_LIBRARIES

    def __init__(self, *, protocol: str = "default", name: str | None = None, **params: Any):
        self.protocol = protocol
        if name is not None:
            # The reported metric name (the suite's config key, e.g. ``lpips_vgg`` for class ``lpips``).
            self.name = str(name)  # type: ignore[misc]
        if self.param_defaults is not None:
            unknown = sorted(set(params) - set(self.param_defaults))
            if unknown:
                known = ", ".join(f"{k} (default {v!r})" for k, v in self.param_defaults.items()) or "(none)"
                raise TypeError(f"metric '{self.name}' has no parameter(s) {', '.join(unknown)}; its parameters: {known}")
            params = {**self.param_defaults, **params}
        self.params = params
        self._rows: list[list[ScoreValue]] = []

    # -- description ----------------------------------------------------------------------
    def weights(self) -> str:
        """Names the weights this metric uses (``none`` for formula metrics)."""
        return "none"

    def available(self) -> str | None:
        """None when the metric can run here, else the reason it cannot and how to fix it."""
        return None

    def load(self) -> None:
        """Load models once. Called by the suite before the first batch."""

    def regions(self) -> tuple[str, ...]:
        """The region names this metric produces values for."""
        return ("all",)

    def region_rule(self) -> str:
        """Human-readable description of how regions are applied, written into tables."""
        return "-"

    def conventions(self) -> list[str]:
        """Further conventions that define the numbers (reference image, SSIM border ...), short
        phrases the suite writes after :meth:`region_rule` into every table's caption."""
        return []

    def precision(self) -> str | None:
        """The floating-point precision of the metric's network (``fp32``, ``fp16 ...``), named in
        every table's weights column; None for formula metrics."""
        return None

    def library_versions(self) -> dict[str, str | None]:
        """The installed versions of :attr:`numeric_libraries` (keys of the cached scores)."""
        return versions.library_versions(self.numeric_libraries)

    def output_rows(self) -> list[tuple[str, str]]:
        """The (metric name, region) rows one item gets; also the rows of NaN results the suite
        writes itself (metric unavailable or raising). Metrics with companion rows override it."""
        return [(self.name, r) for r in self.regions()]

    def applies(self, sample: Sample) -> bool:
        """Whether this metric applies to the sample at all (beyond ``requires``); default yes."""
        return True

    def missing_flag(self, sample: Sample, fields: Sequence[str] | None = None) -> str | None:
        """``missing:<field>`` for the first of ``fields`` (default ``requires``) the sample lacks."""
        missing = sample.missing(tuple(self.requires if fields is None else fields))
        return f"missing:{missing[0]}" if missing else None

    def nan_rows(self, flag: str, metric: str | None = None) -> list[ScoreValue]:
        """One NaN row per region, all carrying ``flag``."""
        return [ScoreValue(metric or self.name, r, float("nan"), flag) for r in self.regions()]

    def read_model_params(self) -> None:
        """The parameters every network-backed metric shares (CLIP, DINO, Alpha-CLIP):
        ``weights_path``, ``allow_random_weights``, ``device``, ``batch_size`` (>= 1), ``scale``."""
        p = self.params
        self.weights_path = p["weights_path"]
        self.allow_random = bool(p["allow_random_weights"])
        self.device_param = str(p["device"])
        self.batch_size = int(p["batch_size"])
        if self.batch_size < 1:
            raise ValueError(f"metric '{self.name}': batch_size must be >= 1, got {self.batch_size}")
        self.scale = float(p["scale"])

    # -- scoring --------------------------------------------------------------------------
    @abc.abstractmethod
    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        """One list of ScoreValue per item, in order."""

    def update(self, items: Sequence[ScoringItem]) -> None:
        self._rows.extend(self.score_batch(items))

    def compute(self) -> list[list[ScoreValue]]:
        return list(self._rows)

    def reset(self) -> None:
        self._rows = []


# --------------------------------------------------------------------------------------------
# Shared helpers for image metrics
# --------------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """A metric's ``device`` parameter: ``auto`` means CUDA when available, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        raise TypeError(f"expected uint8 image, got {img.dtype}")
    return img


def to_float01(img: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> float64 HxWx3 in [0, 1]."""
    return _check_uint8(img).astype(np.float64) / 255.0


def region_masks(sample: Sample, regions: Iterable[str]) -> dict[str, np.ndarray | None]:
    """Map each requested region to a bool HxW mask (None means the whole image).

    ``edited`` is the sample's edit mask, ``unedited`` its complement. A sample without a mask
    has no ``edited``/``unedited`` regions: those map to the string-free sentinel ``False``
    (see :func:`region_flag`).
    """
    out: dict[str, Any] = {}
    for r in regions:
        if r == "all":
            out[r] = None
        elif r in ("edited", "unedited"):
            if sample.mask is None:
                out[r] = False
            else:
                out[r] = sample.mask if r == "edited" else ~sample.mask
        else:
            raise ValueError(f"unknown region '{r}'; known: {', '.join(REGIONS)}")
    return out


def region_flag(mask: Any) -> str | None:
    """Why a region yields NaN: no mask in the sample, or an empty region; None if usable."""
    if mask is False:
        return "no_mask"
    if mask is not None and not bool(np.any(mask)):
        return "empty_region"
    return None


def resize_like(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 image to (H, W) with bicubic filtering (MagicBrush's rule); no-op if equal."""
    if img.shape[:2] == tuple(shape):
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((shape[1], shape[0]), Image.BICUBIC))


def resize_mask_like(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a bool HxW mask to (H, W) with nearest-neighbour sampling; no-op if equal."""
    mask = np.asarray(mask).astype(bool)
    if mask.shape == tuple(shape):
        return mask
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((shape[1], shape[0]), Image.NEAREST)) > 127


REFERENCES = ("source", "target")


@dataclasses.dataclass
class ImagePair:
    """An edit and its reference, ready for an image metric.

    ``edit_u8`` and ``ref_u8`` are the RGB uint8 HxWx3 images on the reference's pixel grid (the
    edit resized bicubic when its size differs); ``edit`` and ``ref`` are the same as float64 in
    [0, 1], converted on first use (metrics that can work on the integers never pay for it).
    ``masks`` holds the usable regions (None = whole image, else a non-empty bool HxW mask);
    ``flags`` the regions that are NaN and why.
    """

    item: ScoringItem
    edit_u8: np.ndarray
    ref_u8: np.ndarray
    masks: dict[str, np.ndarray | None]
    flags: dict[str, str]
    resized: bool = False

    @functools.cached_property
    def edit(self) -> np.ndarray:
        return to_float01(self.edit_u8)

    @functools.cached_property
    def ref(self) -> np.ndarray:
        return to_float01(self.ref_u8)

    @functools.cached_property
    def float32(self) -> tuple[np.ndarray, np.ndarray]:
        """(edit, ref) as float32 in [0, 1], bit for bit as PIE-Bench's ``MetricsCalculator`` makes
        them for PSNR, SSIM, LPIPS and MSE (``np.array(img).astype(np.float32) / 255``). torchvision's
        ``ToTensor`` divides in torch and can differ in the last bit (~1e-7 on a PSNR)."""
        return self.edit_u8.astype(np.float32) / 255, self.ref_u8.astype(np.float32) / 255

    @property
    def shape(self) -> tuple[int, int]:
        return self.ref_u8.shape[:2]

    def images(self, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
        """(edit, ref) as ``float64`` or ``float32`` in [0, 1], or as the ``uint8`` images."""
        if dtype == "uint8":
            return self.edit_u8, self.ref_u8
        if dtype == "float32":
            return self.float32
        if dtype == "float64":
            return self.edit, self.ref
        raise ValueError(f"dtype must be uint8, float32 or float64, got {dtype!r}")

    def zero_filled(self, region: str, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
        """Both images (see :meth:`images`) multiplied by the region mask (zeros outside), as PIE-Bench does."""
        e, r = self.images(dtype)
        m = self.masks[region]
        if m is None:
            return e, r
        w = m[..., None].astype(e.dtype)
        return e * w, r * w


class ImageMetric(Metric):
    """Base of metrics that compare the edit with a reference image, per region.

    Constructor keywords shared by all image metrics (from the metric-suite config):

    - ``reference``: ``source`` (compare with the source image) or ``target`` (the ground-truth
      target; a sample without one gives NaN rows flagged ``missing:target``);
    - ``regions``: subset of ``all``, ``edited`` (the sample's edit mask), ``unedited`` (its
      complement); a sample without mask gives NaN flagged ``no_mask`` for the last two, an
      empty region NaN flagged ``empty_region``;
    - ``region_rule``: ``area`` (the per-pixel quantity averaged over the region's pixels) or
      ``zero_fill`` (both images multiplied by the mask, metric on the whole tensor; PIE-Bench).

    The edit is resized to the reference's size (bicubic, MagicBrush's rule) when they differ.
    The sample's mask lives on the source grid; with ``reference=target`` of another size it is
    resized (nearest) to the target's grid.

    Subclasses implement :meth:`compute_pair` (one pair -> region -> (value, flag)), or override
    :meth:`compute_pairs` to batch a model over pairs.
    """

    requires: ClassVar[tuple[str, ...]] = ("source",)
    param_defaults: ClassVar[dict[str, Any] | None] = {}

    def __init__(
        self,
        *,
        protocol: str = "default",
        name: str | None = None,
        reference: str = "source",
        regions: Sequence[str] = REGIONS,
        region_rule: str = "area",
        **params: Any,
    ):
        super().__init__(protocol=protocol, name=name, **params)
        if reference not in REFERENCES:
            raise ValueError(f"metric '{self.name}': reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
        if isinstance(regions, str):
            regions = (regions,)
        regions = tuple(regions)
        bad = [r for r in regions if r not in REGIONS]
        if bad or not regions:
            raise ValueError(f"metric '{self.name}': regions must be a non-empty subset of {', '.join(REGIONS)}, got {list(regions)}")
        if region_rule not in REGION_RULES:
            raise ValueError(f"metric '{self.name}': region_rule must be one of {', '.join(REGION_RULES)}, got {region_rule!r}")
        self.reference = reference
        self._regions = tuple(dict.fromkeys(regions))
        self.rule = region_rule

    # -- description ----------------------------------------------------------------------
    def regions(self) -> tuple[str, ...]:
        return self._regions

    def region_rule(self) -> str:
        return REGION_RULE_TEXT[self.rule]

    def conventions(self) -> list[str]:
        return [f"edit vs {self.reference} image (resized bicubic to its size if they differ)"]

    # -- preparation ----------------------------------------------------------------------
    def reference_image(self, sample: Sample) -> np.ndarray | None:
        return sample.target if self.reference == "target" else sample.source

    def prepare(self, item: ScoringItem) -> ImagePair | str:
        """The pair to compare, or the flag for all regions when there is none."""
        sample = item.sample
        ref = self.reference_image(sample)
        if ref is None:
            return f"missing:{self.reference}"
        ref_shape = ref.shape[:2]
        edit = resize_like(np.asarray(item.edit), ref_shape)
        masks: dict[str, np.ndarray | None] = {}
        flags: dict[str, str] = {}
        for region, m in region_masks(sample, self._regions).items():
            if m is not None and m is not False:
                m = resize_mask_like(m, ref_shape)
            flag = region_flag(m)
            if flag:
                flags[region] = flag
            else:
                masks[region] = m
        return ImagePair(item, _check_uint8(edit), _check_uint8(np.asarray(ref)), masks, flags,
                         resized=edit.shape[:2] != np.asarray(item.edit).shape[:2])

    # -- scoring --------------------------------------------------------------------------
    def compute_pair(self, pair: ImagePair) -> dict[str, tuple[float, str | None]]:
        """region -> (value, flag) for every region in ``pair.masks``."""
        raise NotImplementedError

    def compute_pairs(self, pairs: Sequence[ImagePair]) -> list[dict[str, tuple[float, str | None]]]:
        return [self.compute_pair(p) for p in pairs]

    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        prepared = [self.prepare(it) for it in items]
        pairs = [p for p in prepared if isinstance(p, ImagePair) and p.masks]
        computed = iter(self.compute_pairs(pairs))
        out: list[list[ScoreValue]] = []
        for p in prepared:
            if isinstance(p, str):
                out.append(self.nan_rows(p))
                continue
            values = next(computed) if p.masks else {}
            rows = []
            for region in self._regions:
                if region in p.flags:
                    rows.append(ScoreValue(self.name, region, float("nan"), p.flags[region]))
                else:
                    value, flag = values[region]
                    rows.append(ScoreValue(self.name, region, value, flag))
            out.append(rows)
        return out


def region_mean(values: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean of a per-pixel array (HxW or HxWxC) over the region's pixels (all channels)."""
    if mask is None:
        return float(np.mean(values))
    return float(np.mean(values[mask]))


class SetMetric(Metric):
    """A metric of a whole set of edits (FID, KID): one value per job, not per edit.

    The runner feeds every ok edit of a job through :meth:`update` in batches (constant memory:
    accumulate statistics, never the images), then calls :meth:`compute_set`, which returns
    the job's ScoreValues (region ``all`` unless the metric says otherwise). Rows are written
    with ``sample_id`` ``SET_SAMPLE_ID``.
    """

    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        raise TypeError(f"metric '{self.name}' scores sets, not single edits")

    @abc.abstractmethod
    def update(self, items: Sequence[ScoringItem]) -> None:
        """Accumulate statistics of a batch of edits."""

    @abc.abstractmethod
    def compute_set(self) -> list[ScoreValue]:
        """The values for everything passed to :meth:`update` since the last :meth:`reset`."""

    def reset(self) -> None:
        super().reset()


SET_SAMPLE_ID = "__set__"
