"""harness/aggregate.py's hand-written percentile bootstrap (see the note there: one resample
matrix per group size, for speed) against ``scipy.stats.bootstrap(method='percentile')`` and
against bootstrap distributions known exactly. No torch."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from harness.aggregate import bootstrap_ci, summarize

B = 50_000  # resamples on both sides: Monte-Carlo error of a 2.5% quantile ~0.012 SE of the mean
Q = 0.025  # the tails of a 95% interval


def scipy_percentile_ci(x, n_resamples=B, level=0.95, seed=0) -> tuple[float, float]:
    r = scipy.stats.bootstrap((np.asarray(x, dtype=np.float64),), np.mean, confidence_level=level,
                              n_resamples=n_resamples, method="percentile", random_state=seed)
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def mc_tolerance(x, n_resamples=B, z=6.0) -> float:
    """z standard errors of the difference of two independent Monte-Carlo estimates of a 2.5%
    bootstrap quantile: SE = sqrt(q (1 - q) / B) / f(x_q), with f the density of the bootstrap
    mean at its quantile, taken as normal with sd = population sd / sqrt(n) (the bootstrap SE).
    z = 6 leaves room for the skewed data set, whose density at the tail is not normal."""
    se_mean = float(np.std(x)) / math.sqrt(len(x))
    density = scipy.stats.norm.pdf(scipy.stats.norm.ppf(Q)) / se_mean
    return z * math.sqrt(2.0) * math.sqrt(Q * (1 - Q) / n_resamples) / density


@pytest.mark.parametrize("n, ones", [(10, 5), (20, 6)])
def test_percentile_ci_equals_the_exact_bootstrap_distribution(n, ones):
    """0/1 data: the mean of an n-of-n resample is K / n with K ~ Binomial(n, ones / n), so the
    percentile interval is known exactly: (ppf(0.025), ppf(0.975)) / n. Each quantile sits inside
    a jump of the CDF wider than 5 Monte-Carlo SEs on each side, so both implementations must
    land on that atom (not merely near it)."""
    x = np.array([1.0] * ones + [0.0] * (n - ones))
    p = ones / n
    se_cdf = math.sqrt(Q * (1 - Q) / B)
    exact = []
    for q in (Q, 1 - Q):
        k = int(scipy.stats.binom.ppf(q, n, p))
        below, at = scipy.stats.binom.cdf(k - 1, n, p), scipy.stats.binom.cdf(k, n, p)
        assert q - below > 5 * se_cdf and at - q > 5 * se_cdf  # the data set is chosen for this
        exact.append(k / n)
    assert exact[0] < p < exact[1]
    assert bootstrap_ci(x, n_resamples=B) == pytest.approx(tuple(exact), abs=1e-12)
    assert scipy_percentile_ci(x) == pytest.approx(tuple(exact), abs=1e-12)


@pytest.mark.parametrize("kind", ["normal", "skewed"])
def test_percentile_ci_matches_scipy_within_monte_carlo_error(kind):
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 0.5, 40) if kind == "normal" else rng.exponential(2.0, 25)
    ours = bootstrap_ci(x, n_resamples=B)
    theirs = scipy_percentile_ci(x)
    tol = mc_tolerance(x)
    se_mean = float(np.std(x)) / math.sqrt(len(x))
    # the tolerance separates the right quantile from a wrong one: the 5% quantile (a 90% interval)
    # is ~0.3 SE inside the 2.5% one
    assert tol < 0.2 * se_mean
    assert ours[0] == pytest.approx(theirs[0], abs=tol) and ours[1] == pytest.approx(theirs[1], abs=tol)
    assert ours[0] < x.mean() < ours[1]
    # another level too (99%: 0.5% tails; the tolerance computed for 2.5% tails is looser there
    # by the density ratio, ~1.9x, hence the factor)
    ours99, theirs99 = bootstrap_ci(x, n_resamples=B, level=0.99), scipy_percentile_ci(x, level=0.99)
    assert ours99 == pytest.approx(theirs99, abs=2 * tol)
    assert ours99[0] < ours[0] and ours99[1] > ours[1]
    # and the default (1000 resamples): the same interval, up to its larger Monte-Carlo error
    assert bootstrap_ci(x) == pytest.approx(theirs, abs=mc_tolerance(x, n_resamples=1000, z=4.0))


def test_degenerate_cases_match_scipy_or_the_definition():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about degenerate resamples
        const = [0.375] * 5  # dyadic: every partial sum is exact, whatever the summation order
        # constant data: every resample mean is the value; scipy gives exactly that too
        assert bootstrap_ci(const) == scipy_percentile_ci(const, n_resamples=1000) == (0.375, 0.375)
        # one value: scipy refuses (it needs two); the only resample is the value itself
        with pytest.raises(ValueError):
            scipy_percentile_ci([0.25])
        assert bootstrap_ci([0.25]) == (0.25, 0.25)
        # NaN: scipy propagates it; we exclude NaN (counted in n_nan by summarize), so the interval
        # is scipy's on the data without the NaN
        rng = np.random.default_rng(4)
        x = rng.normal(0.0, 1.0, 30)
        with_nan = np.insert(x, [3, 17], np.nan)
        assert all(math.isnan(v) for v in scipy_percentile_ci(with_nan, n_resamples=1000))
        got = bootstrap_ci(with_nan, n_resamples=B)
        assert got == bootstrap_ci(x, n_resamples=B)  # the same 30 values, the same computation
        assert got == pytest.approx(scipy_percentile_ci(x), abs=mc_tolerance(x))
        nan2 = bootstrap_ci([np.nan, np.nan])
        assert len(nan2) == 2 and math.isnan(nan2[0]) and math.isnan(nan2[1])


def test_summarize_intervals_match_scipy():
    """summarize resamples every group of one size with one matrix product: each group's interval is
    still its own percentile bootstrap (checked against scipy group by group)."""
    rng = np.random.default_rng(6)
    groups = {"a": rng.normal(0.2, 0.1, 12), "b": rng.normal(5.0, 2.0, 12), "c": rng.exponential(1.0, 7)}
    rows = []
    for method, vals in groups.items():
        for i, v in enumerate(vals):
            rows.append(dict(method=method, params="{}", sample_id=f"s{i}", metric="l1", region="all",
                             value=float(v), higher_is_better=False))
    s = summarize(pd.DataFrame(rows), n_resamples=B).set_index("method")
    assert list(s.index) == ["a", "b", "c"] and list(s["n"]) == [12, 12, 7]
    for method, vals in groups.items():
        lo, hi = scipy_percentile_ci(vals)
        tol = mc_tolerance(vals)
        assert s.loc[method, "mean"] == pytest.approx(vals.mean(), rel=1e-12)
        assert s.loc[method, "ci_low"] == pytest.approx(lo, abs=tol) and s.loc[method, "ci_high"] == pytest.approx(hi, abs=tol)
