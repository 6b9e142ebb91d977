"""Human-study answers -> the papers' tables (harness/study/results.py, harness/study/stats.py).

Every expected number is computed here by hand from the papers' formulas on small hand-built answer
frames (the columns of harness.study.db.answers_frame), never read back from the code under test.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.aggregate import bootstrap_ci
from harness.study.results import Options, StudyResultsError, main, study_tables
from harness.study.stats import binomial_interval, binomial_p_value, krippendorff_alpha, ratio_of_sums_ci

Z95 = 1.959963984540054  # the 97.5% standard-normal quantile


def write_study(d: Path, design: str, methods: list[str], questions: list[dict] | None = None, ours: str | None = None,
                paper: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    qs = questions if questions is not None else {
        "sr": [{"id": "success", "text": "Accept?", "kind": "binary"}],
        "upr": [{"id": "preference", "text": "Score 1-10", "kind": "scale", "min": 1, "max": 10}],
        "mos": [{"id": q, "text": q, "kind": "scale", "min": 1, "max": 6}
                for q in ("object_retention", "background_retention", "realism", "satisfaction")],
        "2afc": [{"id": "preference", "text": "Which is better?", "kind": "choice"}],
    }[design]
    (d / "study.json").write_text(json.dumps({
        "design": design, "methods": methods, "ours": ours, "questions": qs, "seed": 0, "raters": [],
        "runs": [], "created_at": 0, "db_url": None, "attention_checks": True, "paper": paper}))
    return d


def row(rater, item, sample, question, method, candidates, value, check=None, dup=None, t=0.0, **extra):
    return {"rater": rater, "item": item, "sample_id": sample, "question": question, "method": method,
            "candidates": "|".join(sorted(candidates)), "value": float(value), "attention_check": check is not None,
            "check_kind": check, "duplicate_of": dup, "answered_at": t, "position": 0, "presentation": None, **extra}


def sr_frame(accepts: dict[str, dict[str, list[int]]]) -> list[dict]:
    """rater -> method -> accept (1) / reject (0) per sample s0, s1, ...: items of two edits (a, b) per
    sample, as ZONE's tool shows several results per item (one row per rated edit)."""
    rows = []
    for r, per in accepts.items():
        samples = max(len(v) for v in per.values())
        for i in range(samples):
            shown = [m for m in per if i < len(per[m])]
            for m in shown:
                rows.append(row(r, f"{r}-i{i}", f"s{i}", "success", m, shown, per[m][i]))
    return rows


# ----------------------------------------------------------------------------------------------
# SR (ZONE Table 2, app. C.4)
# ----------------------------------------------------------------------------------------------
def test_sr_is_mean_and_std_over_raters_of_each_raters_accept_rate(tmp_path):
    d = write_study(tmp_path / "st", "sr", ["a", "b"])
    answers = pd.DataFrame(sr_frame({
        "r1": {"a": [1, 1, 1, 0], "b": [1, 0, 0, 0]},   # a 75 %, b 25 %
        "r2": {"a": [1, 1, 1, 1], "b": [1, 1, 0, 0]},   # a 100 %, b 50 %
        "r3": {"a": [1, 0, 1, 0], "b": [0, 0, 0, 0]},   # a 50 %, b 0 %
    }))
    t = study_tables(d, answers)
    sr = t["sr"].set_index("method")
    # a: mean(75, 100, 50) = 75, sample std sqrt((0 + 625 + 625) / 2) = 25; b: mean(25, 50, 0) = 25, std 25
    assert sr.loc["a", "sr"] == pytest.approx(75.0) and sr.loc["a", "std"] == pytest.approx(25.0)
    assert sr.loc["b", "sr"] == pytest.approx(25.0) and sr.loc["b", "std"] == pytest.approx(25.0)
    assert (sr["n_raters"] == 3).all() and (sr["n_items"] == 4).all() and (sr["n_answers"] == 12).all()
    by = t["sr_by_rater"].set_index(["method", "rater"])
    assert by.loc[("a", "r2"), "sr"] == 100.0 and by.loc[("b", "r1"), "accepted"] == 1
    # population std on request (ddof 0): sqrt(1250 / 3)
    t0 = study_tables(d, answers, options=Options(std_ddof=0))
    assert t0["sr"].set_index("method").loc["a", "std"] == pytest.approx(math.sqrt(1250 / 3))


def test_sr_rater_who_answered_only_part_counts_over_what_they_answered(tmp_path):
    d = write_study(tmp_path / "st", "sr", ["a", "b"])
    answers = pd.DataFrame(sr_frame({
        "r1": {"a": [1, 1, 0, 0], "b": [1, 1, 1, 1]},   # a 50, b 100
        "r2": {"a": [1, 0], "b": [0, 0]},               # stopped after two samples: a 50, b 0
    }))
    sr = study_tables(d, answers)["sr"].set_index("method")
    assert sr.loc["a", "sr"] == pytest.approx(50.0) and sr.loc["a", "std"] == pytest.approx(0.0)
    assert sr.loc["b", "sr"] == pytest.approx(50.0)          # mean(100, 0)
    assert sr.loc["b", "std"] == pytest.approx(math.sqrt(((100 - 50) ** 2 + (0 - 50) ** 2) / 1))
    assert sr.loc["a", "n_answers"] == 6 and sr.loc["a", "n_items"] == 4 and sr.loc["a", "n_raters"] == 2


# ----------------------------------------------------------------------------------------------
# UPR (ZONE eq. 9)
# ----------------------------------------------------------------------------------------------
def test_upr_scores_follow_eq9_and_incomplete_sets_are_left_out(tmp_path):
    d = write_study(tmp_path / "st", "upr", ["a", "b", "c"])
    ms = ["a", "b", "c"]
    scores = {("r1", "s0"): (9, 5, 2), ("r1", "s1"): (8, 6, 1), ("r2", "s0"): (7, 7, 3), ("r2", "s1"): (10, 4, 4)}
    rows = [row(r, f"{r}-{s}", s, "preference", m, ms, v) for (r, s), vals in scores.items() for m, v in zip(ms, vals)]
    # r2 scored only two of the three edits of a third set: not a complete set, left out
    rows += [row("r2", "r2-s2", "s2", "preference", "a", ms, 10), row("r2", "r2-s2", "s2", "preference", "b", ms, 10)]
    t = study_tables(d, pd.DataFrame(rows))
    upr = t["upr"].set_index("method")
    s_a, s_b, s_c = 9 + 8 + 7 + 10, 5 + 6 + 7 + 4, 2 + 1 + 3 + 4      # 34, 22, 10
    total = s_a + s_b + s_c
    for m, s in zip(ms, (s_a, s_b, s_c)):
        assert upr.loc[m, "S"] == s and upr.loc[m, "upr"] == pytest.approx(100 * s / total)
        assert upr.loc[m, "ci_low"] <= upr.loc[m, "upr"] <= upr.loc[m, "ci_high"]
    assert upr["upr"].sum() == pytest.approx(100.0)
    assert (upr["n_raters"] == 2).all() and (upr["n_items"] == 2).all() and (upr["S_is"] == "sum of scores").all()
    assert any("incompletely scored" in n for n in t["notes"]["note"])
    # counted anyway when asked: S_a and S_b grow by 10 each
    t2 = study_tables(d, pd.DataFrame(rows), options=Options(upr_complete_sets_only=False))
    u2 = t2["upr"].set_index("method")
    assert u2.loc["a", "upr"] == pytest.approx(100 * (s_a + 10) / (total + 20))


def test_upr_choice_variant_counts_picks(tmp_path):
    d = write_study(tmp_path / "st", "upr", ["a", "b", "c"],
                    questions=[{"id": "best", "text": "Pick the best", "kind": "choice"}])
    picks = {"r1": ["a", "a", "b"], "r2": ["a", "c", "a"]}
    rows = [row(r, f"{r}-{i}", f"s{i}", "best", m, ["a", "b", "c"], 1) for r, ps in picks.items()
            for i, m in enumerate(ps)]
    upr = study_tables(d, pd.DataFrame(rows))["upr"].set_index("method")
    assert upr.loc["a", "upr"] == pytest.approx(100 * 4 / 6) and upr.loc["b", "upr"] == pytest.approx(100 / 6)
    assert upr.loc["c", "S"] == 1 and (upr["S_is"] == "times chosen").all()


# ----------------------------------------------------------------------------------------------
# MOS (CPAM Table 3)
# ----------------------------------------------------------------------------------------------
def mos_rows(scores: dict[str, dict[str, list[int]]], question: str = "realism") -> list[dict]:
    return [row(r, f"{r}-{m}-{i}", f"s{i}", question, m, [m], v)
            for r, per in scores.items() for m, vals in per.items() for i, v in enumerate(vals)]


def test_mos_mean_per_question_with_the_harness_bootstrap(tmp_path):
    d = write_study(tmp_path / "st", "mos", ["a", "b"])
    scores = {"r1": {"a": [6, 5, 4], "b": [2, 1, 3]}, "r2": {"a": [5, 5, 6], "b": [1, 1, 2]}}
    rows = mos_rows(scores) + mos_rows({"r1": {"a": [3, 3, 3]}}, "satisfaction")
    t = study_tables(d, pd.DataFrame(rows))
    mos = t["mos"].set_index(["question", "method"])
    a = [6, 5, 4, 5, 5, 6]
    assert mos.loc[("realism", "a"), "mos"] == pytest.approx(31 / 6)
    assert mos.loc[("realism", "b"), "mos"] == pytest.approx(10 / 6)
    assert mos.loc[("realism", "a"), "std"] == pytest.approx(np.std(a, ddof=1))
    lo, hi = bootstrap_ci(np.array(a, dtype=float))  # the harness's seeded bootstrap over the answers
    assert (mos.loc[("realism", "a"), "ci_low"], mos.loc[("realism", "a"), "ci_high"]) == (lo, hi)
    assert lo < 31 / 6 < hi
    # a constant question: interval = the point; a method with no answer: NaN and 0 raters
    assert mos.loc[("satisfaction", "a"), "ci_low"] == mos.loc[("satisfaction", "a"), "ci_high"] == 3.0
    assert math.isnan(mos.loc[("satisfaction", "b"), "mos"]) and mos.loc[("satisfaction", "b"), "n_raters"] == 0
    assert mos.loc[("realism", "a"), "n_raters"] == 2 and mos.loc[("realism", "a"), "n_items"] == 3
    # reproducible (seeded), and another seed gives another interval
    again = study_tables(d, pd.DataFrame(rows))["mos"]
    pd.testing.assert_frame_equal(t["mos"], again)
    other = study_tables(d, pd.DataFrame(rows), options=Options(seed=7))["mos"].set_index(["question", "method"])
    assert (other.loc[("realism", "a"), "ci_low"], other.loc[("realism", "a"), "ci_high"]) != (lo, hi)


def test_rater_cluster_bootstrap_keeps_a_raters_answers_together():
    # two raters with constant means 2 and 4 (three answers each): every resample of raters gives a
    # pooled mean of 2, 3 or 4, so the interval's ends are among them; one rater: the point
    num, den = np.array([6.0, 12.0]), np.array([3.0, 3.0])
    lo, hi = ratio_of_sums_ci(num, den)
    assert lo[0] in (2.0, 3.0) and hi[0] in (3.0, 4.0) and lo[0] < hi[0]
    assert ratio_of_sums_ci(num, den) == (lo, hi) or np.array_equal(ratio_of_sums_ci(num, den)[0], lo)
    one = ratio_of_sums_ci(np.array([6.0]), np.array([3.0]))
    assert one[0][0] == one[1][0] == 2.0


def test_mos_rater_bootstrap_option(tmp_path):
    d = write_study(tmp_path / "st", "mos", ["a"])
    rows = mos_rows({"r1": {"a": [2, 2, 2]}, "r2": {"a": [4, 4, 4]}})
    m = study_tables(d, pd.DataFrame(rows), options=Options(mos_bootstrap="raters"))["mos"]
    m = m[m["question"] == "realism"].iloc[0]
    assert m["mos"] == 3.0 and m["ci_low"] in (2.0, 3.0) and m["ci_high"] in (3.0, 4.0)


# ----------------------------------------------------------------------------------------------
# 2AFC (PartEdit Table 1)
# ----------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_2afc_preference_per_opponent_with_wilson_interval(tmp_path):
    d = write_study(tmp_path / "st", "2afc", ["ours", "x", "y"], ours="ours")
    rows = []
    # vs x: ours chosen 7 of 10 (two raters); vs y: 3 of 4
    for i, win in enumerate([1, 1, 1, 1, 0, 1, 1, 0, 1, 0]):
        rows.append(row(f"r{i % 2}", f"x{i}", f"s{i // 2}", "preference", "ours" if win else "x", ["ours", "x"], 1))
    for i, win in enumerate([1, 1, 0, 1]):
        rows.append(row("r0", f"y{i}", f"s{i}", "preference", "ours" if win else "y", ["ours", "y"], 1))
    t = study_tables(d, pd.DataFrame(rows))
    afc = t["2afc"].set_index("opponent")
    assert afc.loc["x", "pref"] == pytest.approx(70.0) and (afc.loc["x", "k"], afc.loc["x", "n"]) == (7, 10)
    lo, hi = wilson(7, 10)
    assert afc.loc["x", "ci_low"] == pytest.approx(100 * lo, abs=1e-9)
    assert afc.loc["x", "ci_high"] == pytest.approx(100 * hi, abs=1e-9)
    # two-sided exact binomial test of 7/10 against 1/2: 2 * P(X >= 7) = 2 * 176 / 1024
    assert afc.loc["x", "p_value"] == pytest.approx(2 * 176 / 1024)
    assert afc.loc["y", "pref"] == pytest.approx(75.0) and afc.loc["y", "n_raters"] == 1
    assert afc.loc["x", "n_raters"] == 2 and afc.loc["x", "n_items"] == 5
    exact = study_tables(d, pd.DataFrame(rows), options=Options(binomial="exact"))["2afc"].set_index("opponent")
    assert exact.loc["x", "ci_low"] < afc.loc["x", "ci_low"]   # Clopper-Pearson is the wider one here


def test_binomial_intervals_match_newcombe_1998():
    # Newcombe, Stat. Med. 17:857 (1998), Table I: 81/263 and 15/148, Wilson score and Clopper-Pearson
    assert binomial_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert binomial_interval(81, 263, method="exact") == pytest.approx((0.2527, 0.3676), abs=5e-5)
    assert binomial_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    assert binomial_interval(15, 148, method="exact") == pytest.approx((0.0578, 0.1617), abs=5e-5)
    assert binomial_interval(81, 263) == pytest.approx(wilson(81, 263), abs=1e-12)
    assert all(math.isnan(v) for v in binomial_interval(0, 0)) and math.isnan(binomial_p_value(0, 0))
    with pytest.raises(ValueError, match="not one of"):
        binomial_interval(1, 2, method="wald")


# ----------------------------------------------------------------------------------------------
# agreement
# ----------------------------------------------------------------------------------------------
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", sec. C: 4 observers x 12 units,
# alpha nominal 0.743, ordinal 0.815, interval 0.849 (None = not coded).
KRIPP = {"A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
         "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
         "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
         "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]}


def kripp_long() -> pd.DataFrame:
    return pd.DataFrame([{"rater": r, "sample_id": f"u{u:02d}", "value": float(v)}
                         for r, vals in KRIPP.items() for u, v in enumerate(vals) if v is not None])


@pytest.mark.parametrize("level,expected", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_reproduces_krippendorffs_worked_example(level, expected):
    a = krippendorff_alpha(kripp_long(), ["sample_id"], level)
    assert a["alpha"] == pytest.approx(expected, abs=5e-4)
    # unit 12 has one value: not pairable; 11 units, 4 raters
    assert a["n_units"] == 11 and a["n_raters"] == 4 and a["n_values"] == 40


def test_agreement_table_of_a_mos_study_is_that_alpha(tmp_path):
    # the worked example as MOS answers (values 1-5 on a 1-6 scale; one method, units = samples)
    d = write_study(tmp_path / "st", "mos", ["a"], questions=[{"id": "realism", "text": "r", "kind": "scale",
                                                               "min": 1, "max": 6}])
    long = kripp_long()
    rows = [row(r["rater"], f"{r['rater']}-{r['sample_id']}", r["sample_id"], "realism", "a", ["a"], r["value"])
            for r in long.to_dict("records")]
    ag = study_tables(d, pd.DataFrame(rows))["agreement"].iloc[0]
    assert ag["level"] == "ordinal" and ag["alpha"] == pytest.approx(0.815, abs=5e-4) and ag["n_units"] == 11
    iv = study_tables(d, pd.DataFrame(rows), options=Options(mos_alpha_level="interval"))["agreement"].iloc[0]
    assert iv["alpha"] == pytest.approx(0.849, abs=5e-4)


def test_agreement_of_choices_is_nominal_on_the_chosen_method_and_undefined_cases_say_why(tmp_path):
    d = write_study(tmp_path / "st", "2afc", ["o", "x"], ours="o")
    # two raters agree on every one of three items: alpha 1
    rows = [row(r, f"{r}{i}", f"s{i}", "preference", m, ["o", "x"], 1)
            for r in ("r1", "r2") for i, m in enumerate(["o", "x", "o"])]
    ag = study_tables(d, pd.DataFrame(rows))["agreement"].iloc[0]
    assert ag["level"] == "nominal" and ag["alpha"] == pytest.approx(1.0) and ag["n_units"] == 3
    # everyone always chose "o": alpha is 0/0
    same = [row(r, f"{r}{i}", f"s{i}", "preference", "o", ["o", "x"], 1) for r in ("r1", "r2") for i in range(3)]
    ag = study_tables(d, pd.DataFrame(same))["agreement"].iloc[0]
    assert math.isnan(ag["alpha"]) and "same value" in ag["why"]
    one = [row("r1", f"i{i}", f"s{i}", "preference", "o", ["o", "x"], 1) for i in range(3)]
    ag = study_tables(d, pd.DataFrame(one))["agreement"].iloc[0]
    assert math.isnan(ag["alpha"]) and "two raters" in ag["why"]


# ----------------------------------------------------------------------------------------------
# attention checks
# ----------------------------------------------------------------------------------------------
def test_attention_checks_pass_rates_exclusion_and_check_items_never_count(tmp_path):
    d = write_study(tmp_path / "st", "sr", ["a"])
    rows = []
    for r, (dup_v, broken_v) in {"good": (1, 0), "careless": (1, 1), "flip": (0, 0)}.items():
        rows += [row(r, f"{r}-0", "s0", "success", "a", ["a"], 1), row(r, f"{r}-1", "s1", "success", "a", ["a"], 0)]
        # a duplicate of item 0 (accepted there), and a broken edit (pixels permuted), one edit each
        rows.append(row(r, f"{r}-dup", "s0", "success", "a", ["a"], dup_v, check="duplicate", dup=f"{r}-0"))
        rows.append(row(r, f"{r}-brk", "s1", "success", "a", ["a"], broken_v, check="broken"))
    t = study_tables(d, pd.DataFrame(rows))
    ch = t["checks"].set_index("rater")
    assert ch.loc["good", "pass_rate"] == 1.0 and not ch.loc["good", "failed"]
    assert ch.loc["careless", "broken_passed"] == "0/1" and ch.loc["careless", "duplicate_passed"] == "1/1"
    assert ch.loc["flip", "duplicate_passed"] == "0/1" and ch.loc["flip", "pass_rate"] == 0.5
    assert ch["failed"].tolist() == [True, True, False] and not ch["excluded"].any()  # sorted: careless, flip, good
    # the check answers (accepts of the careless rater's broken edit ...) are not in SR: 1 of 2 for everyone
    sr = t["sr"].iloc[0]
    assert sr["sr"] == pytest.approx(50.0) and sr["n_answers"] == 6 and sr["n_raters"] == 3
    t2 = study_tables(d, pd.DataFrame(rows), exclude_failed_checks=True)
    assert t2["checks"].set_index("rater")["excluded"].to_dict() == {"careless": True, "flip": True, "good": False}
    assert t2["sr"].iloc[0]["n_raters"] == 1 and any("careless, flip" in n for n in t2["notes"]["note"])
    # a laxer threshold keeps a rater who passed half
    t3 = study_tables(d, pd.DataFrame(rows), options=Options(exclude_failed_checks=True, min_check_pass_rate=0.5))
    assert t3["sr"].iloc[0]["n_raters"] == 3


def test_checks_of_choice_and_scale_designs(tmp_path):
    # 2afc: the broken image known from the presentation ("broken:<method>"), passed when not chosen
    d = write_study(tmp_path / "afc", "2afc", ["o", "x"], ours="o")
    pres = json.dumps(["broken:x", "o"])
    rows = [row("r1", "i0", "s0", "preference", "o", ["o", "x"], 1),
            row("r1", "b", "s1", "preference", "o", ["o", "x"], 1, check="broken", presentation=pres),
            row("r2", "i0", "s0", "preference", "o", ["o", "x"], 1),
            row("r2", "b", "s1", "preference", "x", ["o", "x"], 1, check="broken", presentation=pres)]
    ch = study_tables(d, pd.DataFrame(rows))["checks"].set_index("rater")
    assert ch.loc["r1", "pass_rate"] == 1.0 and ch.loc["r2", "pass_rate"] == 0.0
    # the same through W's `broken` column (the chosen image is the broken one)
    rows_w = [dict(r, presentation=None, broken=(r["rater"] == "r2" and r["item"] == "b")) for r in rows]
    ch = study_tables(d, pd.DataFrame(rows_w))["checks"].set_index("rater")
    assert ch.loc["r1", "pass_rate"] == 1.0 and ch.loc["r2", "pass_rate"] == 0.0
    # mos: a duplicate within the tolerance (1 point) passes, 2 points off fails; a broken edit must be
    # scored in the lowest third of 1-6 ((v - 1) / 5 <= 1/3: 1 or 2)
    d = write_study(tmp_path / "mos", "mos", ["a"], questions=[{"id": "realism", "text": "r", "kind": "scale",
                                                                "min": 1, "max": 6}])
    rows = []
    for r, (dup_v, brk_v) in {"near": (4, 2), "far": (3, 3)}.items():
        rows += [row(r, f"{r}-0", "s0", "realism", "a", ["a"], 5),
                 row(r, f"{r}-d", "s0", "realism", "a", ["a"], dup_v, check="duplicate", dup=f"{r}-0"),
                 row(r, f"{r}-b", "s1", "realism", "a", ["a"], brk_v, check="broken", broken=True)]
    ch = study_tables(d, pd.DataFrame(rows))["checks"].set_index("rater")
    assert ch.loc["near", "passed"] == 2 and ch.loc["far", "passed"] == 0
    strict = study_tables(d, pd.DataFrame(rows), options=Options(duplicate_tolerance=0))["checks"]
    assert strict.set_index("rater").loc["near", "duplicate_passed"] == "0/1"


def test_a_check_that_cannot_be_scored_is_counted_as_such(tmp_path):
    d = write_study(tmp_path / "st", "sr", ["a", "b"])
    rows = [row("r1", "i0", "s0", "success", "a", ["a", "b"], 1), row("r1", "i0", "s0", "success", "b", ["a", "b"], 0),
            # a two-edit broken item with nothing saying which edit is broken; a duplicate of an unanswered item
            row("r1", "bk", "s1", "success", "a", ["a", "b"], 0, check="broken"),
            row("r1", "bk", "s1", "success", "b", ["a", "b"], 0, check="broken"),
            row("r1", "dp", "s0", "success", "a", ["a"], 1, check="duplicate", dup="missing")]
    ch = study_tables(d, pd.DataFrame(rows))["checks"].iloc[0]
    assert ch["n_checks"] == 0 and ch["not_scorable"] == 2 and not ch["failed"] and math.isnan(ch["pass_rate"])


# ----------------------------------------------------------------------------------------------
# published side by side
# ----------------------------------------------------------------------------------------------
ZONE6 = ["diffedit", "text2live", "pix2pix_zero", "instruct_pix2pix", "magicbrush", "zone"]


def test_published_side_by_side_zone_table2(tmp_path):
    d = write_study(tmp_path / "st", "sr", ZONE6, paper="zone")
    acc = {"r1": {"zone": [1, 1, 1, 0], "diffedit": [0, 0, 1, 0]}, "r2": {"zone": [1, 1, 0, 0], "diffedit": [0, 0, 0, 0]}}
    t = study_tables(d, pd.DataFrame(sr_frame(acc)))
    pub = t["published"]
    assert len(pub) == 12 and set(pub["table"]) == {"zone/table2"}   # six methods x (SR, UPR)
    z = pub[(pub["paper_method"] == "ZONE (Ours)") & (pub["paper_metric"] == "SR (%)")].iloc[0]
    # ours: mean(75, 50) = 62.5, std sqrt(2 * 12.5^2) = 17.68; published 69.4 +- 3.5
    assert z["status"] == "compared" and z["ours"] == pytest.approx(62.5) and z["published"] == 69.4
    assert z["published_spread"] == 3.5 and z["delta"] == pytest.approx(62.5 - 69.4)
    assert z["ours_low"] == pytest.approx(62.5 - 12.5 * math.sqrt(2)) and z["in_interval"] == "yes"
    assert (z["n_raters"], z["n_items"]) == (2, 4)
    upr = pub[pub["paper_metric"] == "UPR (%)"]
    assert (upr["status"] == "not in this study").all() and upr["why"].str.contains("this study is sr").all()
    # methods the study has no answers for say so
    mb = pub[(pub["paper_method"] == "MagicBrush") & (pub["paper_metric"] == "SR (%)")].iloc[0]
    assert mb["status"] == "not in this study" and "no answers" in mb["why"]


def test_published_zone_upr_is_compared_only_as_the_same_quantity(tmp_path):
    # scores 1-10 per edit of sets of all six methods: the paper's UPR; S = (1 + 2) * rank over two raters
    rows = [row(r, f"{r}-s0", "s0", "preference", m, ZONE6, v) for r, off in (("r1", 0), ("r2", 1))
            for m, v in zip(ZONE6, range(1 + off, 7 + off))]
    t = study_tables(write_study(tmp_path / "a", "upr", ZONE6, paper="zone"), pd.DataFrame(rows))
    pub = t["published"].set_index(["paper_method", "paper_metric"])
    z = pub.loc[("ZONE (Ours)", "UPR (%)")]
    total = sum(range(1, 7)) + sum(range(2, 8))        # 21 + 27
    assert z["status"] == "compared" and z["ours"] == pytest.approx(100 * (6 + 7) / total) and z["published"] == 26.6
    assert pub.loc[("ZONE (Ours)", "SR (%)"), "status"] == "not in this study"
    # four of the six methods: another total
    four = [r for r in rows if r["method"] in ZONE6[2:]]
    four = [dict(r, candidates="|".join(sorted(ZONE6[2:]))) for r in four]
    t = study_tables(write_study(tmp_path / "b", "upr", ZONE6[2:], paper="zone"), pd.DataFrame(four))
    z = t["published"].set_index(["paper_method", "paper_metric"]).loc[("ZONE (Ours)", "UPR (%)")]
    assert z["status"] == "not comparable" and "4 methods" in z["why"] and math.isfinite(z["ours"])
    # picks instead of scores: another quantity
    picks = [row(r, f"{r}-s0", "s0", "best", "zone", ZONE6, 1) for r in ("r1", "r2")]
    d = write_study(tmp_path / "c", "upr", ZONE6, paper="zone", questions=[{"id": "best", "text": "b", "kind": "choice"}])
    z = study_tables(d, pd.DataFrame(picks))["published"].set_index(["paper_method", "paper_metric"])
    assert z.loc[("ZONE (Ours)", "UPR (%)"), "status"] == "not comparable"
    assert "counts picks" in z.loc[("ZONE (Ours)", "UPR (%)"), "why"]


def test_published_side_by_side_cpam_table3_maps_questions(tmp_path):
    d = write_study(tmp_path / "st", "mos", ["cpam", "sdedit"], paper="cpam")
    rows = mos_rows({"r1": {"cpam": [5, 4], "sdedit": [2, 3]}, "r2": {"cpam": [6, 5]}}, "background_retention")
    pub = study_tables(d, pd.DataFrame(rows))["published"]
    assert len(pub) == 36 and set(pub["table"]) == {"cpam/table3"}
    c = pub[(pub["paper_method"] == "CPAM (Ours)") & (pub["paper_metric"] == "Background Retention")].iloc[0]
    assert c["status"] == "compared" and c["ours"] == pytest.approx(20 / 4) and c["published"] == 5.09
    assert c["question"] == "background_retention" and c["delta"] == pytest.approx(5.0 - 5.09)
    s = pub[(pub["paper_method"] == "SDEdit") & (pub["paper_metric"] == "Background Retention")].iloc[0]
    assert s["ours"] == pytest.approx(2.5) and (s["n_raters"], s["n_items"]) == (1, 2)
    other = pub[(pub["paper_method"] == "CPAM (Ours)") & (pub["paper_metric"] == "Realistic")].iloc[0]
    assert other["status"] == "not in this study"          # no realism answers


def test_published_side_by_side_partedit_table1_2afc_rows_only(tmp_path):
    d = write_study(tmp_path / "st", "2afc", ["partedit", "prompt_to_prompt", "ledits_pp"], ours="partedit",
                    paper="partedit")
    rows = [row("r1", f"p{i}", f"s{i}", "preference", "partedit" if i < 3 else "prompt_to_prompt",
                ["partedit", "prompt_to_prompt"], 1) for i in range(4)]
    pub = study_tables(d, pd.DataFrame(rows))["published"]
    # only the human-study column (Ours Pref. (%)): 8 opponents, no alphaClip / PSNR / SSIM rows
    assert len(pub) == 8 and set(pub["paper_metric"]) == {"Ours Pref. (%)"}
    p2p = pub[pub["paper_method"] == "P2P"].iloc[0]
    assert p2p["status"] == "compared" and p2p["ours"] == pytest.approx(75.0) and p2p["published"] == 88.6
    lo, hi = wilson(3, 4)
    assert (p2p["ours_low"], p2p["ours_high"]) == pytest.approx((100 * lo, 100 * hi)) and p2p["in_interval"] == "yes"
    led = pub[pub["paper_method"] == "Ledits++"].iloc[0]
    assert led["status"] == "not in this study" and "no answers" in led["why"]


# ----------------------------------------------------------------------------------------------
# errors, main, files
# ----------------------------------------------------------------------------------------------
def test_clear_errors_on_an_empty_or_bad_study(tmp_path, capsys):
    with pytest.raises(StudyResultsError, match="no study here"):
        study_tables(tmp_path / "nothing", pd.DataFrame())
    d = write_study(tmp_path / "st", "mos", ["a"])
    with pytest.raises(StudyResultsError, match="no answers yet"):
        study_tables(d, pd.DataFrame(columns=["rater"]))
    assert main(d, answers=pd.DataFrame(columns=["rater"])) == 2
    assert "no answers yet" in capsys.readouterr().err
    with pytest.raises(StudyResultsError, match=r"rater 'r1', item 'i', question 'realism'.*outside 1-6"):
        study_tables(d, pd.DataFrame([row("r1", "i", "s0", "realism", "a", ["a"], 7)]))
    with pytest.raises(StudyResultsError, match="lack column"):
        study_tables(d, pd.DataFrame([{"rater": "r1"}]))
    with pytest.raises(StudyResultsError, match="question 'colour', which study.json does not list"):
        study_tables(d, pd.DataFrame([row("r1", "i", "s0", "colour", "a", ["a"], 3)]))
    only_checks = [row("r1", "i", "s0", "realism", "a", ["a"], 1, check="broken")]
    with pytest.raises(StudyResultsError, match="only attention-check items"):
        study_tables(d, pd.DataFrame(only_checks))
    (d / "study.json").write_text(json.dumps({"design": "poll"}))
    with pytest.raises(StudyResultsError, match="design 'poll'"):
        study_tables(d, pd.DataFrame())
    a = write_study(tmp_path / "afc", "2afc", ["o", "x", "y"], ours="o")
    with pytest.raises(StudyResultsError, match="not a pair of ours"):
        study_tables(a, pd.DataFrame([row("r1", "i", "s0", "preference", "x", ["x", "y"], 1)]))


def test_a_later_answer_replaces_an_earlier_one(tmp_path):
    d = write_study(tmp_path / "st", "sr", ["a"])
    rows = [row("r1", "i0", "s0", "success", "a", ["a"], 1, t=2.0), row("r1", "i0", "s0", "success", "a", ["a"], 0, t=1.0)]
    t = study_tables(d, pd.DataFrame(rows))
    assert t["sr"].iloc[0]["sr"] == 100.0 and t["sr"].iloc[0]["n_answers"] == 1
    assert any("replaced" in n for n in t["notes"]["note"])


def test_main_prints_the_tables_and_writes_csv_and_markdown(tmp_path, capsys):
    d = write_study(tmp_path / "st", "2afc", ["partedit", "prompt_to_prompt"], ours="partedit", paper="partedit")
    rows = [row(r, f"{r}{i}", f"s{i}", "preference", "partedit" if (i + len(r)) % 3 else "prompt_to_prompt",
                ["partedit", "prompt_to_prompt"], 1) for r in ("r1", "r22") for i in range(6)]
    assert main(d, answers=pd.DataFrame(rows)) == 0
    out = capsys.readouterr().out
    assert "Ours Pref. (%) [95% CI]" in out and "Krippendorff" in out and "design 2afc, 2 raters" in out
    assert "P2P" in out and "88.6" in out
    res = d / "results"
    for name in ("2afc", "agreement", "checks", "published"):
        df = pd.read_csv(res / f"{name}.csv")
        assert len(df) and (res / f"{name}.caption.txt").read_text().startswith(("2AFC", "Inter", "Attention",
                                                                                  "Published"))
    assert pd.read_csv(res / "2afc.csv").loc[0, "n"] == 12
    st = pd.read_csv(res / "study.csv").iloc[0]
    assert (st["design"], st["n_raters"], st["n_items"], st["n_answers"], st["ours"]) == ("2afc", 2, 6, 12, "partedit")
    md = (res / "results.md").read_text()
    assert "| Ours | Opponent |" in md.replace("| Question | Ours", "| Ours") and "Wilson" in md
    # the same inputs, the same files (seeded, no clocks)
    first = {p.name: p.read_bytes() for p in res.iterdir()}
    assert main(d, tmp_path / "again", answers=pd.DataFrame(rows)) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()} == first
