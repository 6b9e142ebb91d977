"""Statistics of a human-evaluation study: binomial intervals, Krippendorff's alpha, rater-cluster
bootstrap of a ratio of sums. Pure functions of numbers; no study layout here (``results.py`` has it).

Libraries do the statistics: the binomial interval is SciPy's ``binomtest(...).proportion_ci``
(Wilson score by default, Clopper-Pearson "exact" on request), the agreement is the
``krippendorff`` package's ``alpha``, and the bootstrap reuses the harness's seeded resampling of
:mod:`harness.aggregate` (the same resample matrices, seed and percentile rule as every report's
95% intervals). Written here is only the glue: a long answers frame -> the raters x units matrix
``krippendorff.alpha`` takes, and a ratio of resampled sums (UPR's ``S_i / sum_j S_j``, a pooled
mean over raters) that ``bootstrap_ci`` (a plain mean) does not compute.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..aggregate import BOOTSTRAP_SEED, CI_LEVEL, N_RESAMPLES, _quantiles, _resample_weights

#: Binomial interval methods: SciPy's names (``scipy.stats.BinomTestResult.proportion_ci``).
BINOMIAL_METHODS = {"wilson": "Wilson score interval", "exact": "Clopper-Pearson (exact) interval",
                    "wilsoncc": "Wilson score interval with continuity correction"}
#: Krippendorff's alpha levels of measurement (the ``krippendorff`` package's names).
ALPHA_LEVELS = ("nominal", "ordinal", "interval", "ratio")


def binomial_interval(k: int, n: int, level: float = CI_LEVEL, method: str = "wilson") -> tuple[float, float]:
    """Two-sided ``level`` confidence interval of a proportion ``k / n`` (fractions, not percent).

    ``method``: ``wilson`` (Wilson score, the default: good coverage at small n and never outside
    [0, 1]), ``exact`` (Clopper-Pearson) or ``wilsoncc``; SciPy computes all three. n == 0 -> NaNs.
    """
    from scipy.stats import binomtest

    if method not in BINOMIAL_METHODS:
        raise ValueError(f"binomial interval method {method!r} is not one of {sorted(BINOMIAL_METHODS)}")
    if not (0 <= k <= n):
        raise ValueError(f"binomial interval: k={k} is not between 0 and n={n}")
    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method=method)
    return float(ci.low), float(ci.high)


def binomial_p_value(k: int, n: int, p: float = 0.5) -> float:
    """Two-sided exact binomial test of ``k`` successes in ``n`` against chance ``p`` (SciPy)."""
    from scipy.stats import binomtest

    if n == 0:
        return math.nan
    return float(binomtest(int(k), int(n), p, alternative="two-sided").pvalue)


def reliability_matrix(answers: pd.DataFrame, unit: Sequence[str], rater: str = "rater",
                       value: str = "value") -> tuple[np.ndarray, list[Any], list[Any], dict[Any, int] | None]:
    """A long frame (one row per rater x unit) as Krippendorff's raters x units matrix, NaN = missing.

    Non-numeric values (a chosen method's label) are coded 0, 1, ... in sorted order (the codes are
    returned, for nominal data only). Returns (matrix, raters, units, codes or None).
    """
    df = answers[[rater, *unit, value]].copy()
    codes: dict[Any, int] | None = None
    if not pd.api.types.is_numeric_dtype(df[value]):
        codes = {v: i for i, v in enumerate(sorted(df[value].astype(str).unique()))}
        df[value] = df[value].astype(str).map(codes).astype(float)
    df["_unit"] = list(zip(*(df[c] for c in unit))) if len(unit) > 1 else df[unit[0]]
    dup = df.duplicated([rater, "_unit"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        raise ValueError(f"rater {first[rater]!r} has several values for unit {first['_unit']!r}: one value per "
                         "rater and unit is needed for an agreement coefficient")
    wide = df.pivot(index=rater, columns="_unit", values=value)
    wide = wide.sort_index(axis=0).sort_index(axis=1)
    return wide.to_numpy(dtype=float), list(wide.index), list(wide.columns), codes


def krippendorff_alpha(answers: pd.DataFrame, unit: Sequence[str], level: str, rater: str = "rater",
                       value: str = "value") -> dict[str, Any]:
    """Krippendorff's alpha of a long answers frame (``krippendorff.alpha``), with its counts.

    Returns ``alpha`` (NaN when undefined, ``why`` says why: fewer than two raters on any unit, or a
    single value in the whole data, where alpha is 0/0), ``n_raters``, ``n_units`` (units rated by at
    least two raters: the pairable ones, the only ones alpha uses), ``n_values`` (values in them).
    """
    import krippendorff

    if level not in ALPHA_LEVELS:
        raise ValueError(f"Krippendorff level {level!r} is not one of {list(ALPHA_LEVELS)}")
    out: dict[str, Any] = {"alpha": math.nan, "level": level, "n_raters": 0, "n_units": 0, "n_values": 0, "why": ""}
    if answers.empty:
        out["why"] = "no answers"
        return out
    m, raters, _units, _codes = reliability_matrix(answers, unit, rater, value)
    per_unit = np.sum(~np.isnan(m), axis=0)
    pairable = per_unit >= 2
    out.update(n_raters=len(raters), n_units=int(pairable.sum()), n_values=int(per_unit[pairable].sum()))
    if not pairable.any():
        out["why"] = "no unit was rated by two raters"
        return out
    vals = m[:, pairable]
    if np.unique(vals[~np.isnan(vals)]).size < 2:
        out["why"] = "every rating is the same value (alpha is 0/0)"
        return out
    out["alpha"] = float(krippendorff.alpha(reliability_data=m, level_of_measurement=level))
    return out


def ratio_of_sums_ci(num: np.ndarray, den: np.ndarray, n_resamples: int = N_RESAMPLES, level: float = CI_LEVEL,
                     seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of ``num.sum(0) / den.sum(0)`` resampling the rows (clusters).

    ``num`` and ``den`` are (clusters, groups) arrays, e.g. per rater the sum of each method's scores
    and the sum of all methods' scores (UPR), or per rater the sum and the count of a method's
    ratings (a pooled mean with rater-cluster resampling). The resamples are the harness's
    (:func:`harness.aggregate._resample_weights`: a function of (clusters, n_resamples, seed) only),
    so the interval is reproducible. One cluster, or a constant ratio: the interval is the point.
    A resample whose denominator is 0 is left out of the quantiles.
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    if num.ndim == 1:
        num, den = num[:, None], den[:, None]
    if num.shape != den.shape:
        raise ValueError(f"numerator shape {num.shape} != denominator shape {den.shape}")
    n, g = num.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        point = num.sum(0) / den.sum(0)
    if n < 2:
        return point.copy(), point.copy()
    w = np.concatenate(_resample_weights(n, n_resamples, seed), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = (w @ num) / (w @ den)
    lo, hi = np.full(g, math.nan), np.full(g, math.nan)
    for j in range(g):
        r = ratios[:, j]
        r = r[np.isfinite(r)]
        if r.size:
            a, b = _quantiles(r, level)
            lo[j], hi[j] = float(a), float(b)
    return lo, hi
