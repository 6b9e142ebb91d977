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

Each item is hashed (protocol, class, params); that hash keys its cached scores, so changing
one metric's configuration rescores only that metric.
"""
from __future__ import annotations

import dataclasses
import math
import traceback
from typing import Any, Iterable, Mapping, Sequence

from .cache import stable_hash
from . import metrics as _metrics  # noqa: F401  (registers every metric)
from .metrics.base import Metric, ScoringItem, SetMetric
from .registry import METRICS
from .types import ScoreValue

COMMON_KEYS = ("protocol", "reference", "region_rule", "regions")


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
            if smoke and "allow_random_weights" in (getattr(cls, "param_defaults", None) or {}):
                kwargs.setdefault("allow_random_weights", True)
            try:
                metric = cls(name=name, **kwargs)
            except TypeError as e:
                raise ValueError(f"metric '{name}' ({cls_name}) in protocol '{self.protocol}': {e}") from None
            key = {"class": cls_name, "version": getattr(cls, "version", "1"), "params": kwargs, "name": name}
            if report_scale != 1.0:  # keeps the hashes (and cached scores) of unscaled items unchanged
                key["report_scale"] = report_scale
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

    def score_set(self, entry: SuiteEntry, batches: Iterable[Sequence[ScoringItem]]) -> list[ScoreValue]:
        """Stream batches through a set metric; failures give NaN rows flagged, never a crash."""
        self._load(entry, "(set)")
        if entry.unavailable:
            return self.unavailable_rows(entry)
        try:
            entry.metric.reset()
            for batch in batches:
                entry.metric.update(batch)
            return self._scaled(entry, list(entry.metric.compute_set()))
        except Exception as e:
            entry.errors.append({"sample_id": "(set)", "error": str(e), "traceback": traceback.format_exc()})
            return self.flagged_rows(entry, f"error:{type(e).__name__}")

    def describe(self) -> dict[str, Any]:
        return {
            e.name: {
                "weights": e.metric.weights(),
                "region_rule": self.region_rule(e),
                "higher_is_better": e.metric.higher_is_better,
                # The protocol clamps the MEAN at this floor (torchmetrics CLIPScore); NaN: no clamp.
                "mean_floor": _mean_floor(e.metric),
                "unavailable": e.unavailable,
                "hash": e.hash,
            }
            for e in self.entries
        }

    @staticmethod
    def region_rule(entry: SuiteEntry) -> str:
        rule = entry.metric.region_rule()
        return rule if entry.report_scale == 1.0 else f"{rule}; reported x{entry.report_scale:g}"

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
