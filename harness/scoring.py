"""A metric suite: the metrics of one protocol (``conf/metrics/<protocol>.yaml``), built once.

Config shape::

    protocol: default          # written into every score row and table caption
    reference: source          # image the edit is compared with: source | target
    region_rule: area          # area | zero_fill
    regions: [all, edited, unedited]
    batch_size: 8
    items:                     # reported name -> {metric: <registered class>, ...params}
      l1: {}
      lpips_alex: {metric: lpips, net: alex}
      lpips_bg: {metric: lpips, net: squeeze, report_scale: 1000}   # reported x10^3

``allow_random_weights: true`` at the top level is a smoke-run switch: it is passed to every
item whose metric has that parameter (CLIP, DINO, Alpha-CLIP, FID/KID) and does not set it;
those metrics then run with random weights and say so in their weights column.

``report_scale`` (any item; default 1) multiplies the metric's values as the paper's table
prints them (PIE-Bench: structure distance and LPIPS x10^3, MSE x10^4, SSIM x10^2); it is
written into the region rule shown in every table, and the per-edit rows carry the scaled value.
Metrics with their own ``scale`` parameter (the CLIP family: ``scale: 100`` before a clamp) keep
it; ``report_scale`` is applied after everything the metric does.

Protocol-level conventions (top-level keys, each named in every table's caption):

- ``decode: {exif_orientation: true, alpha: white}`` (the defaults): how the runner decodes the
  sample images the metrics see. ``exif_orientation: false`` leaves pixels as stored (a bare
  ``Image.open`` never rotates); ``alpha: drop`` ignores alpha (``convert("RGB")``) instead of
  compositing over white. Read by the runner and loaders (:attr:`MetricSuite.decode`).
- ``edit_crop: none | bottom_right`` (``edit_crop_size``, default 512): ``bottom_right`` scores the
  bottom-right ``size`` x ``size`` crop of an edit that is not square, PIE-Bench's ``evaluate.py``
  rule (its methods save side-by-side panels, the edit last); square edits are left alone. Applied
  to every metric of the protocol (:meth:`MetricSuite.prepare`).
- ``precision: fp32 | fp16``: passed to every item whose metric has a ``precision`` parameter (the
  CLIP family) and does not set it, like ``allow_random_weights``.

Each item is hashed (protocol, class, params, the protocol's decoding and edit crop, and the
installed versions of the libraries whose numerics define the metric: ``Metric.numeric_libraries``);
that hash keys its cached scores, so changing one metric's configuration rescores only that
metric, and a library upgrade rescores what it can change instead of mixing two conventions.
"""
from __future__ import annotations

import dataclasses
import math
import traceback
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .cache import stable_hash
from .images import decode_options
from . import metrics as _metrics  # noqa: F401  (registers every metric)
from .metrics.base import Metric, ScoringItem, SetMetric
from .registry import METRICS
from .types import ScoreValue

COMMON_KEYS = ("protocol", "reference", "region_rule", "regions")

EDIT_CROPS = ("none", "bottom_right")


def parse_decode(value: Any, protocol: str = "?") -> dict[str, Any]:
    """A protocol's ``decode`` mapping checked (:func:`harness.images.decode_options`), the error
    naming the protocol."""
    try:
        return decode_options(value)
    except ValueError as err:
        raise ValueError(f"protocol '{protocol}': {err}") from None


def decode_text(decode: Mapping[str, Any]) -> str:
    exif = "EXIF orientation applied" if decode["exif_orientation"] else "EXIF orientation not applied"
    alpha = ("alpha composited over white" if decode["alpha"] == "white"
             else "alpha dropped (PIL convert('RGB'))")
    return f"images decoded: {exif}, {alpha}"


@dataclasses.dataclass(frozen=True)
class EditCrop:
    """Which part of a method's output is scored (module doc: ``edit_crop``)."""

    rule: str = "none"
    size: int = 512

    def text(self) -> str | None:
        if self.rule == "none":
            return None
        return (f"a non-square edit is scored on its bottom-right {self.size}x{self.size} crop "
                f"(PIE-Bench evaluate.py; outside the image: zeros, as PIL's crop)")

    def image(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        if self.rule == "none" or h == w:
            return img
        from PIL import Image

        # PIL's crop as the official script calls it: a box reaching outside the image is zero-filled.
        return np.asarray(Image.fromarray(np.ascontiguousarray(img)).crop((w - self.size, h - self.size, w, h)))

    def item(self, item: ScoringItem) -> ScoringItem:
        edit = np.asarray(item.edit)
        cropped = self.image(edit)
        if cropped is edit:
            return item
        mask = item.edit_mask
        if mask is not None and np.asarray(mask).shape[:2] == edit.shape[:2]:
            mask = self.image(np.asarray(mask).astype(np.uint8) * 255) > 127
        return dataclasses.replace(item, edit=cropped, edit_mask=mask)


def parse_edit_crop(cfg: Mapping[str, Any], protocol: str = "?") -> EditCrop:
    rule = str(cfg.get("edit_crop") or "none")
    if rule not in EDIT_CROPS:
        raise ValueError(f"protocol '{protocol}': edit_crop must be one of {', '.join(EDIT_CROPS)}, got {cfg.get('edit_crop')!r}")
    size = cfg.get("edit_crop_size", 512)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"protocol '{protocol}': edit_crop_size must be a positive integer, got {size!r}")
    return EditCrop(rule, int(size))


@dataclasses.dataclass
class SuiteEntry:
    name: str
    metric: Metric
    hash: str
    unavailable: str | None = None
    report_scale: float = 1.0
    loaded: bool = False
    errors: list[dict[str, str]] = dataclasses.field(default_factory=list)  # metric exceptions, with tracebacks


def _mean_floor(metric: Metric) -> float:
    floor = getattr(metric, "mean_clamp_min", None)
    return math.nan if floor is None else float(floor)


class MetricSuite:
    def __init__(self, cfg: Mapping[str, Any]):
        cfg = dict(cfg)
        self.protocol = str(cfg.get("protocol", "default"))
        self.batch_size = int(cfg.get("batch_size", 8))
        if self.batch_size < 1:
            raise ValueError(f"metrics.batch_size must be >= 1, got {self.batch_size}")
        common = {k: cfg[k] for k in COMMON_KEYS if k in cfg}
        common["protocol"] = self.protocol
        if "regions" in common:
            common["regions"] = tuple(common["regions"])
        smoke = bool(cfg.get("allow_random_weights", False))
        precision = cfg.get("precision")
        #: How the runner decodes the images the metrics see (module doc).
        self.decode = parse_decode(cfg.get("decode"), self.protocol)
        self.edit_crop = parse_edit_crop(cfg, self.protocol)
        items = cfg.get("items") or {}
        if not items:
            raise ValueError(f"metrics protocol '{self.protocol}' lists no items")
        self.entries: list[SuiteEntry] = []
        for name, item in items.items():
            item = dict(item or {})
            cls_name = item.pop("metric", name)
            cls = METRICS.get(cls_name)
            report_scale = item.pop("report_scale", 1.0)
            try:
                report_scale = float(report_scale)
            except (TypeError, ValueError):
                report_scale = math.nan
            if not (math.isfinite(report_scale) and report_scale > 0):
                raise ValueError(f"metric '{name}' in protocol '{self.protocol}': report_scale must be a positive number, "
                                 f"got {item.get('report_scale', report_scale)!r}")
            kwargs = {**common, **item}
            known = getattr(cls, "param_defaults", None) or {}
            if smoke and "allow_random_weights" in known:
                kwargs.setdefault("allow_random_weights", True)
            if precision is not None and "precision" in known:
                kwargs.setdefault("precision", precision)
            try:
                metric = cls(name=name, **kwargs)
            except TypeError as e:
                raise ValueError(f"metric '{name}' ({cls_name}) in protocol '{self.protocol}': {e}") from None
            key = {"class": cls_name, "version": getattr(cls, "version", "1"), "params": kwargs, "name": name,
                   "libraries": metric.library_versions(), "decode": self.decode}
            if report_scale != 1.0:
                key["report_scale"] = report_scale
            if self.edit_crop.rule != "none":
                key["edit_crop"] = dataclasses.asdict(self.edit_crop)
            h = stable_hash(key, 16)
            self.entries.append(SuiteEntry(name, metric, h, metric.available(), report_scale))

    @property
    def edit_entries(self) -> list[SuiteEntry]:
        """Metrics scored per edit."""
        return [e for e in self.entries if not isinstance(e.metric, SetMetric)]

    @property
    def set_entries(self) -> list[SuiteEntry]:
        """Metrics of the whole set of a job's edits (FID, KID)."""
        return [e for e in self.entries if isinstance(e.metric, SetMetric)]

    def prepare(self, items: Sequence[ScoringItem]) -> list[ScoringItem]:
        """The items as the protocol's metrics see them (the edit crop applied)."""
        return [self.edit_crop.item(it) for it in items]

    def _prepared_batches(self, batches: Iterable[Sequence[ScoringItem]]) -> Iterator[list[ScoringItem]]:
        for batch in batches:
            yield self.prepare(batch)

    def score_set(self, entry: SuiteEntry, batches: Iterable[Sequence[ScoringItem]]) -> list[ScoreValue]:
        """Stream batches through a set metric; failures give NaN rows flagged, never a crash."""
        self._load(entry, "(set)")
        if entry.unavailable:
            return self.unavailable_rows(entry)
        try:
            entry.metric.reset()
            for batch in self._prepared_batches(batches):
                entry.metric.update(batch)
            return self._scaled(entry, list(entry.metric.compute_set()))
        except Exception as e:
            entry.errors.append({"sample_id": "(set)", "error": str(e), "traceback": traceback.format_exc()})
            return self.flagged_rows(entry, f"error:{type(e).__name__}")

    def describe(self) -> dict[str, Any]:
        """Per metric: what every score row and table caption carries. ``weights`` names the
        weights and the network's precision; ``region_rule`` the region rule followed by every
        convention that defines the numbers (reference, SSIM border, edit crop, decoding, scale)."""
        return {
            e.name: {
                "weights": self.weights(e),
                "region_rule": self.region_rule(e),
                "higher_is_better": e.metric.higher_is_better,
                # The protocol clamps the MEAN at this floor (torchmetrics CLIPScore); NaN: no clamp.
                "mean_floor": _mean_floor(e.metric),
                "unavailable": e.unavailable,
                "hash": e.hash,
                "precision": e.metric.precision(),
                "decode": dict(self.decode),
                "edit_crop": self.edit_crop.text(),
                "libraries": e.metric.library_versions(),
            }
            for e in self.entries
        }

    @staticmethod
    def weights(entry: SuiteEntry) -> str:
        w, precision = entry.metric.weights(), entry.metric.precision()
        return w if precision is None else f"{w}; {precision}"

    def region_rule(self, entry: SuiteEntry) -> str:
        parts = [entry.metric.region_rule(), *entry.metric.conventions(), self.edit_crop.text(), decode_text(self.decode)]
        if entry.report_scale != 1.0:
            parts.append(f"reported x{entry.report_scale:g}")
        return "; ".join(p for p in parts if p)

    @staticmethod
    def _scaled(entry: SuiteEntry, rows: list[ScoreValue]) -> list[ScoreValue]:
        if entry.report_scale == 1.0:
            return rows
        return [dataclasses.replace(v, value=v.value * entry.report_scale) for v in rows]

    @staticmethod
    def flagged_rows(entry: SuiteEntry, flag: str) -> list[ScoreValue]:
        """NaN rows under every (metric, region) the metric would have written, all flagged."""
        return [ScoreValue(m, r, math.nan, flag) for m, r in entry.metric.output_rows()]

    def unavailable_rows(self, entry: SuiteEntry) -> list[ScoreValue]:
        return self.flagged_rows(entry, "unavailable")

    def _load(self, entry: SuiteEntry, sample_id: str) -> None:
        """Load the metric's models once. A metric that turns out unavailable only now (say a
        corrupt checkpoint) is marked so, with the reason: a sweep never stops on it."""
        if entry.loaded or entry.unavailable:
            return
        try:
            entry.metric.load()
            entry.loaded = True
        except Exception as e:
            entry.unavailable = f"{entry.name}: loading failed: {type(e).__name__}: {e}"
            entry.errors.append({"sample_id": sample_id, "error": entry.unavailable, "traceback": traceback.format_exc()})

    @staticmethod
    def applies(entry: SuiteEntry, item: ScoringItem) -> bool:
        """Whether a metric applies to a sample at all (a landmark metric to a face sample, say).

        A metric that does not apply gives no rows; NaN rows are kept for what should have
        been measurable (an empty region, no face found), so those are counted in tables.
        """
        if item.sample.missing(entry.metric.requires):
            return False
        return bool(entry.metric.applies(item.sample))

    def score(self, entry: SuiteEntry, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        """Score a batch with one metric; a metric that raises gives NaN rows flagged, never a crash.

        Items the metric does not apply to get an empty list.
        """
        items = self.prepare(items)
        idx = [i for i, it in enumerate(items) if self.applies(entry, it)]
        out: list[list[ScoreValue]] = [[] for _ in items]
        if idx:
            for i, rows in zip(idx, self._score(entry, [items[i] for i in idx])):
                out[i] = rows
        return out

    def _score(self, entry: SuiteEntry, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        self._load(entry, items[0].sample.id)
        if entry.unavailable:
            return [self.unavailable_rows(entry) for _ in items]
        try:
            out = entry.metric.score_batch(items)
            if len(out) != len(items):
                raise RuntimeError(f"metric returned {len(out)} results for {len(items)} items")
            return [self._scaled(entry, rows) for rows in out]
        except Exception as e:  # one bad item must not stop the sweep: retry one by one
            if len(items) > 1:
                return [r for it in items for r in self._score(entry, [it])]
            flag = f"error:{type(e).__name__}"
            item = items[0]
            entry.errors.append({"sample_id": item.sample.id, "error": str(e), "traceback": traceback.format_exc()})
            return [self.flagged_rows(entry, flag)]
