"""The regression gate: compare a run with a baseline run, cell by cell, and say what regressed.

A **cell** is one dataset x method x parameter point x metric x region, as in the report's
tables. For each cell both runs scored, the gate estimates the change ``run - baseline`` of the
mean with a 95% percentile bootstrap interval and classifies it:

- **paired** when both runs scored exactly the same samples (the same set of sample ids with a
  non-NaN value, one value per sample id on each side): the resamples draw sample ids, and each
  resample's change is its run mean minus its baseline mean over the same ids, i.e. a bootstrap
  of the paired mean difference. This is :func:`harness.aggregate.bootstrap_ci` applied to the
  per-sample differences (same resampling matrices, same seed; a test checks it), and far
  tighter than the unpaired interval when the two runs' per-sample scores are correlated.
- **unpaired** otherwise (other samples, a sample scored on one side only, several rows per
  sample id): the two runs are resampled independently (the same as ``scipy.stats.bootstrap``
  with two samples, ``paired=False``, ``method='percentile'``; a test checks it) and the change
  is the difference of the two resampled means.

A metric whose protocol clamps the **mean** (``mean_floor``, torchmetrics CLIPScore) is compared
as the tables show it: each (resampled) mean is clamped before the difference is taken.

The rule. Let ``s`` be +1 for a higher-is-better metric and -1 otherwise, ``[lo, hi]`` the 95%
interval of ``s * (run - baseline)`` (the change in the good direction) and ``t >= 0`` the
cell's tolerance (``abs:T`` gives ``t = T``; ``rel:R`` gives ``t = R * |baseline mean|``):

- **regressed** when ``hi < -t``: the whole interval lies strictly beyond the tolerance on the
  bad side;
- **improved** when ``lo > t``: the whole interval lies strictly beyond it on the good side;
- **unchanged** otherwise (a change within the tolerance, or one the interval does not support).

The default tolerance is ``abs:0``: any change the interval supports counts. A set metric (FID,
KID: one value per job) has no per-sample spread, so its interval is the single difference.
Infinite values follow :mod:`harness.aggregate` (``+inf`` is a real value: the PSNR of an
unchanged image): a sample infinite on both sides with the same sign contributes a zero
difference; an infinite change is beyond any tolerance.

A cell **could not be compared** (status ``error``) when the two sides differ in protocol,
weights, region rule or direction, when the baseline scored a metric the run did not, or when a
side has no scored value. Cells only the run has are ``new``; methods (or parameter points)
only the baseline has are ``absent`` (gating a subset of a baseline's methods is normal in CI).

Exit codes (:attr:`GateResult.exit_code`): 1 when any cell regressed (a regression is reported
even when other cells could not be compared), else 2 when any cell could not be compared, else
0. A gate that cannot start (baseline not a run, no common method, a tolerance or ``--metrics``
naming a metric neither run has) raises :class:`GateError` (exit 2).

**A published table as the baseline** (``--baseline paper/zone/table1``, :func:`gate_paper`). The
paper printed one number per method and metric, no per-sample values: each of the run's cells
that the table's declared mapping (``results/paper/<paper>/<table>.compare.yaml``, read by
:mod:`harness.compare`) names is compared with that number, converted to the paper's scale by the
mapping's factor. The change is ``ours - published`` and its interval is the run's 95% bootstrap
interval of its mean minus the published value (a one-sample comparison: the published number is
taken as exact, since the papers print no spread for these tables); the same rule classifies
it, the direction is the table's ``higher_is_better``, and an ``abs`` tolerance is in the metric's
units (our scale: it is converted with the factor too). A run scored under another protocol
than the table's cannot be compared (exit 2); published weights are whatever the paper used, so
the weights column is not checked (the comparison's note names ours). Paper methods the run
lacks are ``absent``; a mapped metric the run lacks for a method it has is an error; a paper
method or metric with no mapping is ``absent`` with the mapping's reason.
"""

from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

# The bootstrap machinery of the report (one resample-count matrix per sample size, a fixed
# seed; checked against scipy.stats.bootstrap in tests/test_aggregate_bootstrap.py), reused
# so that the gate's intervals are those of the tables.
from .aggregate import (
    BOOTSTRAP_SEED,
    CI_LEVEL,
    N_RESAMPLES,
    _quantiles,
    _resample_weights,
    _special,
    format_params,
    load_run,
    params_sort_key,
    reason_head,
)

CELL_KEYS = ("dataset", "method", "params", "metric", "region")
GROUP_KEYS = ("dataset", "method", "params")
#: Columns that must agree between the two runs for a cell to be comparable.
CONVENTION_COLUMNS = ("protocol", "weights", "region_rule")
STATUSES = ("regressed", "error", "improved", "unchanged", "new", "absent")
PAPER_PREFIX = "paper/"
DEFAULT_TOLERANCE_KEY = "default"


class GateError(Exception):
    """The gate cannot compare the two runs at all (exit 2); the message says why."""


# ----------------------------------------------------------------------------------------------
# tolerances
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How large a change a cell may show before it counts: ``abs`` in the metric's units, or
    ``rel`` as a fraction of the baseline mean's magnitude."""

    kind: str = "abs"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("abs", "rel"):
            raise ValueError(f"tolerance kind must be 'abs' or 'rel', not {self.kind!r}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"tolerance value must be a finite number >= 0, not {self.value!r}")

    def threshold(self, baseline_mean: float) -> float:
        """The tolerance in the metric's units for a cell whose baseline mean is given (a relative
        tolerance of an infinite or undefined baseline mean is 0)."""
        if self.kind == "abs":
            return float(self.value)
        if not math.isfinite(baseline_mean):
            return 0.0
        return float(self.value) * abs(baseline_mean)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def parse_tolerance(text: str) -> tuple[str, Tolerance]:
    """``"l1=abs:0.01"`` -> ``("l1", Tolerance("abs", 0.01))``. The key is a metric, a
    ``metric/region`` cell, or ``default`` (every other metric)."""
    key, sep, spec = str(text).partition("=")
    kind, sep2, value = spec.partition(":")
    key, kind = key.strip(), kind.strip()
    if not sep or not sep2 or not key:
        raise ValueError(f"tolerance '{text}': write METRIC=abs:VALUE or METRIC=rel:FRACTION "
                         "(METRIC may be metric/region, or 'default')")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"tolerance '{text}': '{value}' is not a number") from None
    try:
        return key, Tolerance(kind, v)
    except ValueError as e:
        raise ValueError(f"tolerance '{text}': {e}") from None


def _selects(selector: str, metric: str, region: str) -> bool:
    return selector == metric or selector == f"{metric}/{region}"


def tolerance_for(tolerances: Mapping[str, Tolerance], metric: str, region: str) -> Tolerance:
    """The most specific tolerance of a cell: ``metric/region``, then ``metric``, then
    ``default``, then ``abs:0``."""
    for key in (f"{metric}/{region}", metric, DEFAULT_TOLERANCE_KEY):
        if key in tolerances:
            return tolerances[key]
    return Tolerance()


# ----------------------------------------------------------------------------------------------
# the two bootstraps
# ----------------------------------------------------------------------------------------------
def _clamp(means: np.ndarray | float, floor: float) -> Any:
    return means if math.isnan(floor) else np.maximum(means, floor)


def _resampled_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    return np.concatenate([w @ x for w in _resample_weights(x.size, n_resamples, seed)], axis=0)


def paired_difference(
    run: Any, baseline: Any, floor: float = math.nan, n_resamples: int = N_RESAMPLES,
    level: float = CI_LEVEL, seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """``(change, ci_low, ci_high)`` of ``mean(run) - mean(baseline)`` for values paired by
    position (the same samples in the same order; NaN must be removed by the caller).

    Each resample draws sample positions once and applies them to both sides (the rows of
    :func:`harness.aggregate._resample_weights`), so without a floor this is the bootstrap of
    the mean of the differences, as :func:`harness.aggregate.bootstrap_ci` computes it.
    """
    x = np.asarray(run, dtype=np.float64).ravel()
    y = np.asarray(baseline, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"paired values need the same length ({x.size} vs {y.size})")
    if x.size == 0:
        return math.nan, math.nan, math.nan
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        # a sample infinite on both sides with the same sign did not change
        with np.errstate(invalid="ignore"):
            d = np.where(x == y, 0.0, x - y)
        sp = _special(d)
        if sp is not None:
            return sp
        # the infinities cancelled: bootstrap the finite differences (no protocol clamps a metric
        # that can be infinite, so there is no floor to apply)
        x, y, floor = d, np.zeros_like(d), math.nan
    if not math.isnan(floor):
        mx, my = _resampled_means(x, n_resamples, seed), _resampled_means(y, n_resamples, seed)
        diffs = _clamp(mx, floor) - _clamp(my, floor)
        change = float(_clamp(np.mean(x), floor) - _clamp(np.mean(y), floor))
    else:
        d = x - y
        sp = _special(d)  # constant differences (one sample, identical runs): no resampling needed
        if sp is not None:
            return sp
        diffs = _resampled_means(d, n_resamples, seed)
        change = float(np.mean(d))
    lo, hi = _quantiles(diffs, level)
    return change, float(lo), float(hi)


def _mean_with_infinities(x: np.ndarray) -> float:
    sp = _special(x)
    return float(np.mean(x)) if sp is None else sp[0]


def unpaired_difference(
    run: Any, baseline: Any, floor: float = math.nan, n_resamples: int = N_RESAMPLES,
    level: float = CI_LEVEL, seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """``(change, ci_low, ci_high)`` of ``mean(run) - mean(baseline)`` for independent samples
    (NaN removed by the caller): each side resampled on its own, the difference of the two
    resampled means taken resample by resample (percentile interval), as
    ``scipy.stats.bootstrap((run, baseline), mean difference, paired=False)`` does.

    The baseline is resampled with ``seed + 1``: with one seed, two sides of the same size would
    draw the same positions and their resamples would not be independent.
    """
    x = np.asarray(run, dtype=np.float64).ravel()
    y = np.asarray(baseline, dtype=np.float64).ravel()
    if x.size == 0 or y.size == 0:
        return math.nan, math.nan, math.nan
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        mx, my = _mean_with_infinities(x), _mean_with_infinities(y)
        if mx == my:  # the same infinity on both sides
            return 0.0, 0.0, 0.0
        d = float(_clamp(mx, floor) - _clamp(my, floor))
        return d, d, d
    mx, my = _resampled_means(x, n_resamples, seed), _resampled_means(y, n_resamples, seed + 1)
    diffs = _clamp(mx, floor) - _clamp(my, floor)
    change = float(_clamp(np.mean(x), floor) - _clamp(np.mean(y), floor))
    if x.size + y.size == 2 or (np.all(x == x[0]) and np.all(y == y[0])):
        return change, change, change  # nothing to resample
    lo, hi = _quantiles(diffs, level)
    return change, float(lo), float(hi)


def classify(change_lo: float, change_hi: float, higher_is_better: bool, tolerance: float) -> str:
    """``regressed`` / ``improved`` / ``unchanged`` from the interval of ``run - baseline`` (see the
    module docstring for the rule)."""
    s = 1.0 if higher_is_better else -1.0
    lo, hi = sorted((s * change_lo, s * change_hi))  # the interval of the change in the good direction
    if hi < -tolerance:
        return "regressed"
    if lo > tolerance:
        return "improved"
    return "unchanged"


# ----------------------------------------------------------------------------------------------
# the gate
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Comparison:
    """One cell's verdict."""

    dataset: str
    method: str
    params: str
    metric: str
    region: str
    status: str
    higher_is_better: bool | None = None
    baseline_mean: float = math.nan
    run_mean: float = math.nan
    change: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    tolerance: str = ""
    tolerance_value: float = math.nan
    pairing: str = ""  # "paired", "unpaired", "published" (a paper's number) or "" (not compared)
    n_run: int = 0
    n_baseline: int = 0
    reason: str = ""

    @property
    def testcase(self) -> tuple[str, str]:
        """(classname, name) of its JUnit test case: dataset.method[params], metric [region]."""
        params = format_params(self.params, empty="")
        return f"{self.dataset}.{self.method}" + (f"[{params}]" if params else ""), f"{self.metric} [{self.region}]"


@dataclasses.dataclass
class GateResult:
    run: str
    baseline: str
    comparisons: list[Comparison]

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.comparisons)

    @property
    def exit_code(self) -> int:
        if self.count("regressed"):
            return 1
        if self.count("error"):
            return 2
        return 0

    def frame(self) -> pd.DataFrame:
        cols = [f.name for f in dataclasses.fields(Comparison)]
        return pd.DataFrame([dataclasses.asdict(c) for c in self.comparisons], columns=cols)

    def summary_line(self) -> str:
        compared = sum(self.count(s) for s in ("regressed", "improved", "unchanged"))
        parts = [f"{compared} cells compared: {self.count('regressed')} regressed, {self.count('improved')} improved, "
                 f"{self.count('unchanged')} unchanged"]
        if self.count("error"):
            parts.append(f"{self.count('error')} could not be compared")
        if self.count("new"):
            parts.append(f"{self.count('new')} new (no baseline)")
        if self.count("absent"):
            parts.append(f"{self.count('absent')} absent from the run")
        verdict = {0: "PASS", 1: "FAIL: regression", 2: "FAIL: could not compare"}[self.exit_code]
        return f"gate {verdict} (exit {self.exit_code}): " + "; ".join(parts)

    def table(self) -> str:
        """The plain-text table the CLI prints: one line per cell, then the summary line."""
        from .report import arrow, fmt, fmt_ci

        several = len({c.dataset for c in self.comparisons}) > 1
        head = ["status", *(["dataset"] if several else []), "method", "params", "metric", "baseline", "run",
                "change [95% CI]", "tolerance", "test", "note"]
        rows = []
        for c in self.comparisons:
            metric = f"{c.metric} [{c.region}]" + (f" {arrow(c.higher_is_better)}" if c.higher_is_better is not None
                                                    else "")
            test = f"{c.pairing} n={c.n_run}" if c.pairing in ("paired", "published") else (
                f"{c.pairing} n={c.n_run}/{c.n_baseline}" if c.pairing else "")
            note = c.reason if c.status in ("error", "new", "absent") or c.pairing in ("unpaired", "published") else ""
            rows.append([c.status.upper(), *([c.dataset] if several else []), c.method,
                         format_params(c.params), metric, fmt(c.baseline_mean), fmt(c.run_mean),
                         fmt_ci(c.change, c.ci_low, c.ci_high) if c.pairing else "", c.tolerance, test, note])
        lines = [f"regression gate: run {self.run} vs baseline {self.baseline}"]
        if rows:
            numbers = {"baseline", "run", "change [95% CI]", "tolerance"}
            lines += _columns(head, rows, right=[h in numbers for h in head])
        lines.append(self.summary_line())
        return "\n".join(lines)


def _columns(head: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """Fixed-width text columns, those flagged in ``right`` right-aligned. (Written here:
    pandas' to_string justifies every header the same way, whatever its column holds.)"""
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    return ["  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()
            for cells in [head, *rows]]


def _joined(values: pd.Series) -> str:
    vals = sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))} - {""})
    return "; ".join(vals) if vals else "unknown"


@dataclasses.dataclass
class _Side:
    values: pd.DataFrame  # sample_id, value
    conventions: dict[str, str]
    higher_is_better: bool
    floor: float
    n_nan: int

    @classmethod
    def of(cls, g: pd.DataFrame) -> "_Side":
        v = g["value"].to_numpy(dtype=np.float64)
        floors = (pd.to_numeric(g["mean_floor"], errors="coerce").dropna() if "mean_floor" in g.columns
                  else pd.Series([], dtype="float64"))
        return cls(
            values=g.loc[~np.isnan(v), ["sample_id", "value"]].reset_index(drop=True),
            conventions={c: _joined(g[c]) if c in g.columns else "unknown" for c in CONVENTION_COLUMNS},
            higher_is_better=bool(g["higher_is_better"].iloc[0]),
            floor=float(floors.max()) if len(floors) else math.nan,
            n_nan=int(np.isnan(v).sum()),
        )


def paper_table_name(baseline: str | Path) -> str | None:
    """``paper/zone/table1`` (or ``results/paper/zone/table1[.csv]``) -> ``zone/table1``; None for
    anything that is a run folder or does not name a published table that way."""
    text = Path(str(baseline)).as_posix()
    if (Path(baseline) / "jobs").is_dir():
        return None
    parts = Path(text).parts
    if "paper" not in parts:
        return None
    rest = parts[len(parts) - 1 - parts[::-1].index("paper") + 1:]
    if len(rest) != 2:
        return None
    name = f"{rest[0]}/{rest[1]}"
    return name[:-4] if name.endswith(".csv") else name


def _load(run_dir: str | Path, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    text = str(run_dir)
    is_run = (Path(run_dir) / "jobs").is_dir()
    if not is_run:
        raise GateError(f"{what} '{text}' is not a run folder (it has no jobs/ folder)")
    try:
        return load_run(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise GateError(f"{what}: {e}") from None


def _groups(scores: pd.DataFrame, edits: pd.DataFrame) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for df in (scores, edits):
        if len(df):
            out |= {tuple(map(str, k)) for k in df[list(GROUP_KEYS)].drop_duplicates().itertuples(index=False)}
    return out


def _cells(scores: pd.DataFrame) -> dict[tuple[str, ...], pd.DataFrame]:
    if not len(scores):
        return {}
    return {tuple(map(str, k)): g for k, g in scores.groupby(list(CELL_KEYS), sort=False, dropna=False)}


def _unscored_reason(edits: pd.DataFrame, group: tuple[str, str, str]) -> str:
    """Why a group of the run has no scores: its edits' statuses and first reason."""
    if not len(edits):
        return ""
    e = edits[(edits["dataset"].astype(str) == group[0]) & (edits["method"].astype(str) == group[1])
              & (edits["params"].astype(str) == group[2])]
    if not len(e):
        return ""
    counts = e["status"].astype(str).value_counts().sort_index()
    bad = e[e["status"].astype(str) != "ok"]
    first = reason_head(bad["reason"].iloc[0], 160) if len(bad) and "reason" in bad.columns else ""
    return " (run edits: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + (f"; {first}" if first else "") + ")"


def _compare_cell(key: tuple[str, ...], run: _Side, base: _Side, tol: Tolerance, n_resamples: int,
                  level: float, seed: int) -> Comparison:
    c = Comparison(*key, status="error", higher_is_better=base.higher_is_better, tolerance=str(tol),
                   n_run=len(run.values), n_baseline=len(base.values))
    differ = [f"{col}: run '{run.conventions[col]}' vs baseline '{base.conventions[col]}'"
              for col in CONVENTION_COLUMNS if run.conventions[col] != base.conventions[col]]
    if run.higher_is_better != base.higher_is_better:
        differ.append(f"direction: run {'higher' if run.higher_is_better else 'lower'} is better, baseline "
                      f"{'higher' if base.higher_is_better else 'lower'}")
    if differ:
        c.reason = "different " + "; ".join(differ)
        return c
    for side, name in ((run, "run"), (base, "baseline")):
        if not len(side.values):
            c.reason = f"no scored value in the {name} ({side.n_nan} NaN)"
            return c
    c.run_mean = float(_clamp(_mean_with_infinities(run.values["value"].to_numpy()), run.floor))
    c.baseline_mean = float(_clamp(_mean_with_infinities(base.values["value"].to_numpy()), base.floor))
    r_ids, b_ids = run.values["sample_id"].astype(str), base.values["sample_id"].astype(str)
    dup = r_ids.duplicated().any() or b_ids.duplicated().any()
    if not dup and set(r_ids) == set(b_ids):
        c.pairing = "paired"
        b = base.values.assign(sample_id=b_ids).set_index("sample_id")["value"]
        r = run.values.assign(sample_id=r_ids).set_index("sample_id")["value"]
        order = sorted(r.index)
        c.change, c.ci_low, c.ci_high = paired_difference(r[order].to_numpy(), b[order].to_numpy(), run.floor,
                                                          n_resamples, level, seed)
    else:
        c.pairing = "unpaired"
        if dup:
            c.reason = "unpaired: several values per sample id"
        else:
            only_r, only_b = len(set(r_ids) - set(b_ids)), len(set(b_ids) - set(r_ids))
            c.reason = (f"unpaired: {only_r} sample(s) scored only in the run, {only_b} only in the baseline")
        c.change, c.ci_low, c.ci_high = unpaired_difference(run.values["value"].to_numpy(),
                                                            base.values["value"].to_numpy(), run.floor,
                                                            n_resamples, level, seed)
    if math.isnan(c.change):
        c.pairing = ""
        c.reason = "the change is undefined (+inf and -inf among the values)"
        return c
    c.tolerance_value = tol.threshold(c.baseline_mean)
    c.status = classify(c.ci_low, c.ci_high, base.higher_is_better, c.tolerance_value)
    return c


def gate(
    run_dir: str | Path, baseline_dir: str | Path, tolerances: Mapping[str, Tolerance] | None = None,
    metrics: Sequence[str] | None = None, n_resamples: int = N_RESAMPLES, level: float = CI_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> GateResult:
    """Compare every cell of ``run_dir`` with ``baseline_dir`` (both ``results/<run>`` folders).

    ``tolerances`` maps ``metric``, ``metric/region`` or ``default`` to a :class:`Tolerance`;
    ``metrics`` (names or ``metric/region``) restricts the gate to those cells, each of which
    both runs must have. Raises :class:`GateError` when nothing can be compared.
    """
    tolerances = dict(tolerances or {})
    run_scores, run_edits = _load(run_dir, "run")
    base_scores, _ = _load(baseline_dir, "baseline")
    run_cells, base_cells = _cells(run_scores), _cells(base_scores)
    if not base_cells:
        raise GateError(f"baseline '{baseline_dir}' has no scores")

    def names(cells: Mapping[tuple[str, ...], Any]) -> list[str]:
        return sorted({k[3] for k in cells} | {f"{k[3]}/{k[4]}" for k in cells})

    for sel in metrics or ():
        for cells, what in ((base_cells, f"baseline '{baseline_dir}'"), (run_cells, f"run '{run_dir}'")):
            if not any(_selects(sel, k[3], k[4]) for k in cells):
                raise GateError(f"missing metric: '{sel}' is not scored in the {what} "
                                f"(it has: {', '.join(sorted({k[3] for k in cells})) or 'none'})")
    for key in tolerances:
        if key != DEFAULT_TOLERANCE_KEY and key not in names(base_cells) and key not in names(run_cells):
            raise GateError(f"--tolerance {key}: no such metric in either run "
                            f"(metrics: {', '.join(sorted({k[3] for k in base_cells}))}; or metric/region, or "
                            f"'{DEFAULT_TOLERANCE_KEY}')")

    def wanted(k: tuple[str, ...]) -> bool:
        return not metrics or any(_selects(s, k[3], k[4]) for s in metrics)

    run_groups = _groups(run_scores, run_edits)
    base_groups = {k[:3] for k in base_cells}
    common = run_groups & base_groups
    if not common:
        def listing(groups: set) -> str:
            return ", ".join(f"{m}[{format_params(p, empty='')}] on {d}".replace("[]", "")
                             for d, m, p in sorted(groups)) or "none"
        raise GateError(f"no common methods: the baseline has {listing(base_groups)}; the run has "
                        f"{listing(run_groups)} (a method compares with the same method, parameter point and "
                        "dataset)")

    out: list[Comparison] = []
    for key in sorted(set(base_cells) | set(run_cells)):
        if not wanted(key):
            continue
        group = key[:3]
        if key in base_cells and group not in run_groups:
            side = _Side.of(base_cells[key])
            out.append(Comparison(*key, status="absent", higher_is_better=side.higher_is_better,
                                  baseline_mean=_mean_with_infinities(side.values["value"].to_numpy()),
                                  n_baseline=len(side.values), reason="method / parameter point not in the run"))
        elif key not in base_cells:
            side = _Side.of(run_cells[key])
            out.append(Comparison(*key, status="new", higher_is_better=side.higher_is_better,
                                  run_mean=_mean_with_infinities(side.values["value"].to_numpy()),
                                  n_run=len(side.values), reason="no baseline for this cell"))
        elif key not in run_cells:
            side = _Side.of(base_cells[key])
            out.append(Comparison(*key, status="error", higher_is_better=side.higher_is_better,
                                  baseline_mean=_mean_with_infinities(side.values["value"].to_numpy()),
                                  n_baseline=len(side.values),
                                  reason="missing metric: scored in the baseline, not in the run"
                                         + _unscored_reason(run_edits, group)))
        else:
            out.append(_compare_cell(key, _Side.of(run_cells[key]), _Side.of(base_cells[key]),
                                     tolerance_for(tolerances, key[3], key[4]), n_resamples, level, seed))
    out.sort(key=lambda c: (c.dataset, c.method, params_sort_key(c.params), c.metric, c.region))
    return GateResult(str(run_dir), str(baseline_dir), out)


def gate_paper(
    run_dir: str | Path, table: str, tolerances: Mapping[str, Tolerance] | None = None,
    metrics: Sequence[str] | None = None, root: Path | None = None,
) -> GateResult:
    """Compare ``run_dir`` with the published table ``table`` (``zone/table1``) through the
    table's declared mapping (see the module docstring). Raises :class:`GateError` when the
    comparison cannot be made at all (no such table or mapping, no run, a protocol mismatch, no
    mapped method in the run, a ``--metrics`` / tolerance name the mapping does not give)."""
    from .compare import CompareError, compare
    from .paper import PaperTableError, load_table

    tolerances = dict(tolerances or {})
    _load(run_dir, "run")  # a clear error when RUN is not a run folder
    try:
        result = compare([run_dir], table, root=root)
        paper = load_table(table, root)
    except (CompareError, PaperTableError) as e:
        raise GateError(f"baseline paper/{table}: {e}") from None
    frame = result.frame.reset_index(drop=True)
    hib = [bool(v) for v in paper["higher_is_better"]]
    mapped = frame[frame["metric"].notna()]
    names = sorted({str(m) for m in mapped["metric"]} | {f"{m}/{r}" for m, r in zip(mapped["metric"], mapped["region"])})
    for sel in metrics or ():
        if sel not in names:
            raise GateError(f"missing metric: '{sel}' is not mapped by paper/{table} "
                            f"(its metrics: {', '.join(sorted({str(m) for m in mapped['metric']})) or 'none'})")
    for key in tolerances:
        if key != DEFAULT_TOLERANCE_KEY and key not in names:
            raise GateError(f"--tolerance {key}: paper/{table} maps no such metric "
                            f"(metrics: {', '.join(sorted({str(m) for m in mapped['metric']}))}; or metric/region, "
                            f"or '{DEFAULT_TOLERANCE_KEY}')")
    if not (frame["status"] == "compared").any():
        why = "; ".join(sorted({f"{r.paper_method}: {r.why}" for r in frame.itertuples() if r.why}))
        raise GateError(f"no common methods: none of paper/{table}'s methods is in the run ({why})")
    run_scores, _ = _load(run_dir, "run")
    run_methods = {str(m) for m in run_scores["method"]}

    out: list[Comparison] = []
    for i, r in frame.iterrows():
        metric = str(r["metric"]) if isinstance(r["metric"], str) else str(r["paper_metric"])
        region = str(r["region"]) if isinstance(r["region"], str) else ""
        if metrics and not any(_selects(s, metric, region) for s in metrics):
            continue
        where = f"{r['paper_method']} / {r['paper_metric']}" + (f" ({r['setting']})" if r["setting"] else "")
        method = str(r["method"]) if isinstance(r["method"], str) else str(r["paper_method"])
        c = Comparison(str(r["dataset"] or ""), method, str(r["params"] or ""), metric, region, status="absent",
                       higher_is_better=hib[i], baseline_mean=float(r["published"]), n_baseline=0)
        if r["status"] != "compared":
            in_run = isinstance(r["method"], str) and r["method"] in run_methods
            c.status = "error" if in_run and isinstance(r["metric"], str) else "absent"
            c.reason = f"{where}: {r['why']}"
            if c.status == "error" and r["status"] != "ambiguous":
                c.reason = f"missing metric: {c.reason}"
            out.append(c)
            continue
        factor = float(r["factor"])
        tol = tolerance_for(tolerances, metric, region)
        c.run_mean, c.n_run = float(r["ours_mean"]), int(r["n"])
        c.change = c.run_mean - c.baseline_mean
        c.ci_low, c.ci_high = float(r["ours_ci_low"]) - c.baseline_mean, float(r["ours_ci_high"]) - c.baseline_mean
        c.tolerance = str(tol)
        # abs tolerances are in our metric's units; the comparison is on the paper's scale
        c.tolerance_value = tol.threshold(c.baseline_mean) if tol.kind == "rel" else tol.threshold(0.0) * abs(factor)
        c.pairing = "published"
        c.reason = f"{where}" + (f", ours x{factor:g}" if factor != 1 else "")
        if not (math.isfinite(c.ci_low) and math.isfinite(c.ci_high)):
            c.status, c.reason = "error", f"{where}: the run's interval is not finite"
        else:
            c.status = classify(c.ci_low, c.ci_high, c.higher_is_better, c.tolerance_value)
        out.append(c)
    if result.protocol_mismatch:  # pragma: no cover - compare() refuses it without allow_protocol_mismatch
        raise GateError(f"protocol mismatch with paper/{table}")
    return GateResult(str(run_dir), f"paper/{table}", out)


# ----------------------------------------------------------------------------------------------
# JUnit XML
# ----------------------------------------------------------------------------------------------
def _detail(c: Comparison) -> str:
    from .report import fmt, fmt_ci

    direction = "" if c.higher_is_better is None else ("higher is better" if c.higher_is_better else "lower is better")
    params = format_params(c.params, empty="")
    lines = [f"{c.metric} [{c.region}] of {c.method}" + (f" ({params})" if params else "") + f" on {c.dataset}: "
             f"{c.status}" + (f", change {fmt_ci(c.change, c.ci_low, c.ci_high)} beyond the tolerance {c.tolerance}"
                              if c.status in ("regressed", "improved") else ""),
             f"baseline mean {fmt(c.baseline_mean)} (n={c.n_baseline}), run mean {fmt(c.run_mean)} (n={c.n_run})"
             + (f", {direction}" if direction else "")]
    if c.pairing:
        how = ("the run's 95% bootstrap interval minus the published value" if c.pairing == "published"
               else f"95% {c.pairing} bootstrap")
        lines.append(f"change run - baseline {fmt_ci(c.change, c.ci_low, c.ci_high)} ({how}), "
                     f"tolerance {c.tolerance} = {fmt(c.tolerance_value)}")
    if c.reason:
        lines.append(c.reason)
    return "\n".join(lines)


def junit_xml(result: GateResult | None, error: str | None = None, name: str = "edit-harness gate") -> bytes:
    """JUnit XML: one test case per cell; a regression is a ``<failure>``, a cell that could not be
    compared an ``<error>``, new and absent cells ``<skipped>``. With ``error`` (the gate could not
    start), a single test case ``gate`` holding that ``<error>``."""
    cases: list[ET.Element] = []
    counts = {"failures": 0, "errors": 0, "skipped": 0}
    if error is not None:
        tc = ET.Element("testcase", classname="edit-harness", name="gate", time="0")
        ET.SubElement(tc, "error", message=error, type="could_not_compare").text = error
        cases.append(tc)
        counts["errors"] = 1
    for c in result.comparisons if result is not None else ():
        classname, case = c.testcase
        tc = ET.Element("testcase", classname=classname, name=case, time="0")
        detail = _detail(c)
        if c.status == "regressed":
            ET.SubElement(tc, "failure", message=detail.splitlines()[0], type="regression").text = detail
            counts["failures"] += 1
        elif c.status == "error":
            ET.SubElement(tc, "error", message=c.reason, type="could_not_compare").text = detail
            counts["errors"] += 1
        elif c.status in ("new", "absent"):
            ET.SubElement(tc, "skipped", message=f"{c.status}: {c.reason}")
            counts["skipped"] += 1
        else:
            ET.SubElement(tc, "system-out").text = detail
        cases.append(tc)
    attrs = {"name": name, "tests": str(len(cases)), **{k: str(v) for k, v in counts.items()}}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", {**attrs, "time": "0"})
    if result is not None:
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="run", value=result.run)
        ET.SubElement(props, "property", name="baseline", value=result.baseline)
    suite.extend(cases)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: str | Path, result: GateResult | None, error: str | None = None) -> Path:
    """Write :func:`junit_xml` to ``path`` atomically (parent folders created)."""
    from .fileio import save_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bytes(path, junit_xml(result, error))
    return path
