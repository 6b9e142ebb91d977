"""The regression gate (harness/gate.py, ``edit-harness gate``): verdicts, exit codes, pairing,
directions, tolerances, JUnit XML, on synthetic score tables written as the runner writes them,
and on real tiny runs (classical methods, metrics=pixel). No torch."""

from __future__ import annotations

import hashlib
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from harness.aggregate import bootstrap_ci
from harness.cli import main
from harness.gate import (
    GateError,
    Tolerance,
    classify,
    gate,
    junit_xml,
    paired_difference,
    parse_tolerance,
    unpaired_difference,
)
from harness.runner import EDIT_COLUMNS, SCORE_COLUMNS

N = 30
PIXEL_RULE = "mean over the region's pixels"
HIGHER_IS_BETTER = {"psnr": True, "l1": False, "clipscore": True}


def write_job(run_dir: Path, method: str, values: dict[str, np.ndarray], *, params: dict | None = None,
              ids: list[str] | None = None, protocol: str = "default", weights: str = "none",
              region_rule: str = PIXEL_RULE, floor: float = math.nan, dataset: str = "synth") -> None:
    """jobs/<method>-<dataset>/scores.parquet and edits.parquet with the runner's columns:
    ``values`` maps a metric (region ``all``) to its per-sample values."""
    pj = json.dumps(params or {}, sort_keys=True)
    n = len(next(iter(values.values())))
    ids = ids or [f"s{i:03d}" for i in range(n)]
    job = f"{method}-{dataset}-{hashlib.sha256(pj.encode()).hexdigest()[:8]}"
    base = [dict(run=run_dir.name, job=job, method=method, method_version="1", params=pj, dataset=dataset,
                 sample_id=sid, category="change", seed=0, edit_key=f"{job}-{sid}") for sid in ids]
    edits = [{**b, "status": "ok", "reason": None, "flags": "", "notes": "", "prep_seconds": 0.1,
              "infer_seconds": 0.2, "peak_memory_bytes": 1.0, "model_revision": None} for b in base]
    scores = [{**b, "metric": m, "region": "all", "value": float(v[i]), "flag": None, "protocol": protocol,
               "weights": weights, "region_rule": region_rule, "higher_is_better": HIGHER_IS_BETTER[m],
               "mean_floor": floor}
              for m, v in values.items() for i, b in enumerate(base)]
    d = run_dir / "jobs" / job
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(scores, columns=SCORE_COLUMNS).to_parquet(d / "scores.parquet", index=False)
    pd.DataFrame(edits, columns=EDIT_COLUMNS).to_parquet(d / "edits.parquet", index=False)


def base_values(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per method, per metric: N per-sample values with a realistic spread."""
    rng = np.random.default_rng(seed)
    return {m: {"l1": 0.10 + 0.03 * rng.random(N), "psnr": 28.0 + 3.0 * rng.standard_normal(N)} for m in ("a", "b")}


def write_run(run_dir: Path, values: dict[str, dict[str, np.ndarray]], **kw) -> Path:
    for method, v in values.items():
        write_job(run_dir, method, v, **kw)
    return run_dir


def shifted(values, method: str, metric: str, delta: float, noise: float = 0.0, seed: int = 1):
    """A copy of ``values`` with ``method``'s ``metric`` moved by ``delta`` (plus per-sample noise)."""
    rng = np.random.default_rng(seed)
    out = {m: {k: v.copy() for k, v in d.items()} for m, d in values.items()}
    out[method][metric] = out[method][metric] + delta + noise * rng.standard_normal(N)
    return out


def statuses(result) -> dict[tuple[str, str], str]:
    return {(c.method, c.metric): c.status for c in result.comparisons}


def junit_cases(path: Path) -> dict[tuple[str, str], str]:
    """(classname, name) -> 'failure' / 'error' / 'skipped' / 'passed'."""
    root = ET.parse(path).getroot()
    out = {}
    for tc in root.iter("testcase"):
        kinds = [child.tag for child in tc if child.tag in ("failure", "error", "skipped")]
        assert len(kinds) <= 1
        out[(tc.get("classname"), tc.get("name"))] = kinds[0] if kinds else "passed"
    return out


# -- verdicts and exit codes --------------------------------------------------------------------
def test_planted_regression_exits_1_and_junit_fails_exactly_that_cell(tmp_path, capsys):
    base = base_values()
    baseline = write_run(tmp_path / "base", base)
    run = write_run(tmp_path / "run", shifted(base, "b", "l1", +0.02, noise=0.002))
    junit = tmp_path / "ci" / "gate.xml"
    rc = main(["gate", str(run), "--baseline", str(baseline), "--junit", str(junit)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "REGRESSED" in out and "gate FAIL: regression (exit 1)" in out
    assert "4 cells compared: 1 regressed, 0 improved, 3 unchanged" in out
    cases = junit_cases(junit)
    assert cases == {("synth.a", "l1 [all]"): "passed", ("synth.a", "psnr [all]"): "passed",
                     ("synth.b", "l1 [all]"): "failure", ("synth.b", "psnr [all]"): "passed"}
    root = ET.parse(junit).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("4", "1", "0", "0")
    failure = root.find(".//testcase[@classname='synth.b'][@name='l1 [all]']/failure")
    assert failure.get("type") == "regression" and "lower is better" in failure.text
    assert failure.get("message").startswith("l1 [all] of b on synth: regressed, change 0.0")
    # the numbers behind the verdict: the paired mean difference, its interval around it
    c = next(c for c in gate(run, baseline).comparisons if (c.method, c.metric) == ("b", "l1"))
    diff = shifted(base, "b", "l1", +0.02, noise=0.002)["b"]["l1"] - base["b"]["l1"]
    assert c.pairing == "paired" and c.n_run == c.n_baseline == N
    assert c.change == pytest.approx(diff.mean(), abs=1e-12)  # the same sum in another order
    assert c.ci_low < c.change < c.ci_high and c.ci_low > 0.0
    assert c.run_mean - c.baseline_mean == pytest.approx(c.change, abs=1e-12)


def test_improvement_exits_0_and_is_reported_as_improved(tmp_path, capsys):
    base = base_values()
    baseline = write_run(tmp_path / "base", base)
    run = write_run(tmp_path / "run", shifted(base, "a", "psnr", +1.5, noise=0.1))
    junit = tmp_path / "gate.xml"
    rc = main(["gate", str(run), "--baseline", str(baseline), "--junit", str(junit)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "gate PASS (exit 0)" in out and "1 improved" in out
    assert [line.split()[0] for line in out.splitlines() if " psnr [all]" in line and " a " in line] == ["IMPROVED"]
    assert statuses(gate(run, baseline)) == {("a", "l1"): "unchanged", ("a", "psnr"): "improved",
                                             ("b", "l1"): "unchanged", ("b", "psnr"): "unchanged"}
    assert set(junit_cases(junit).values()) == {"passed"}


def test_a_change_within_the_tolerance_is_unchanged(tmp_path, capsys):
    base = base_values()
    baseline = write_run(tmp_path / "base", base)
    run = write_run(tmp_path / "run", shifted(base, "b", "l1", +0.005, noise=0.0005))
    # without a tolerance the interval supports the (small) regression ...
    assert main(["gate", str(run), "--baseline", str(baseline)]) == 1
    capsys.readouterr()
    # ... which abs:0.01 allows
    assert main(["gate", str(run), "--baseline", str(baseline), "--tolerance", "l1=abs:0.01"]) == 0
    assert "0 regressed, 0 improved, 4 unchanged" in capsys.readouterr().out
    # flags after RUN, several tolerances in one flag or repeated
    assert main(["gate", "--tolerance", "psnr=rel:0.05,l1=abs:0.01", str(run), "--baseline", str(baseline)]) == 0
    assert main(["gate", "--tolerance", "psnr=rel:0.05", "--tolerance", "l1=abs:0.001", str(run),
                 "--baseline", str(baseline)]) == 1
    capsys.readouterr()
    # a relative tolerance: psnr -0.5 on a mean near 28 is 1.8% of it
    run2 = write_run(tmp_path / "run2", shifted(base, "a", "psnr", -0.5, noise=0.01))
    r = gate(run2, baseline, {"psnr": Tolerance("rel", 0.05)})
    c = next(c for c in r.comparisons if (c.method, c.metric) == ("a", "psnr"))
    assert c.status == "unchanged" and c.tolerance == "rel:0.05"
    assert c.tolerance_value == pytest.approx(0.05 * abs(base["a"]["psnr"].mean()), rel=1e-12)
    assert statuses(gate(run2, baseline, {"psnr": Tolerance("rel", 0.01)}))[("a", "psnr")] == "regressed"
    # the most specific key wins: metric/region over metric over default
    r = gate(run2, baseline, {"default": Tolerance("abs", 5.0), "psnr/all": Tolerance("abs", 0.1)})
    assert statuses(r)[("a", "psnr")] == "regressed"
    assert {c.tolerance for c in r.comparisons if c.metric == "l1"} == {"abs:5"}


@pytest.mark.parametrize("metric, delta, expected", [
    ("l1", +0.02, "regressed"), ("l1", -0.02, "improved"),      # lower is better
    ("psnr", -1.5, "regressed"), ("psnr", +1.5, "improved"),    # higher is better
])
def test_direction_follows_higher_is_better(tmp_path, metric, delta, expected):
    base = base_values()
    baseline = write_run(tmp_path / "base", base)
    run = write_run(tmp_path / "run", shifted(base, "a", metric, delta, noise=delta / 20))
    r = gate(run, baseline)
    assert statuses(r)[("a", metric)] == expected
    assert r.exit_code == (1 if expected == "regressed" else 0)
    c = next(c for c in r.comparisons if (c.method, c.metric) == ("a", metric))
    assert c.higher_is_better is HIGHER_IS_BETTER[metric]
    assert np.sign(c.change) == np.sign(delta)


def test_classify_rule_at_its_edges():
    # lower is better: an increase is bad. Strictly beyond the tolerance, whole interval.
    assert classify(0.02, 0.03, higher_is_better=False, tolerance=0.01) == "regressed"
    assert classify(0.01, 0.03, higher_is_better=False, tolerance=0.01) == "unchanged"  # touches it
    assert classify(-0.001, 0.03, higher_is_better=False, tolerance=0.0) == "unchanged"  # straddles 0
    assert classify(-0.03, -0.02, higher_is_better=False, tolerance=0.01) == "improved"
    # the same interval for a higher-is-better metric means the opposite
    assert classify(0.02, 0.03, higher_is_better=True, tolerance=0.01) == "improved"
    assert classify(-0.03, -0.02, higher_is_better=True, tolerance=0.01) == "regressed"
    assert classify(0.0, 0.0, higher_is_better=True, tolerance=0.0) == "unchanged"
    assert classify(-math.inf, -math.inf, higher_is_better=True, tolerance=1e9) == "regressed"


# -- could not compare (exit 2) ------------------------------------------------------------------
def test_protocol_mismatch_exits_2_with_the_reason(tmp_path, capsys):
    base = base_values()
    baseline = write_run(tmp_path / "base", base, protocol="default")
    run = write_run(tmp_path / "run", shifted(base, "b", "l1", +0.02), protocol="pixel")
    junit = tmp_path / "gate.xml"
    rc = main(["gate", str(run), "--baseline", str(baseline), "--junit", str(junit)])
    out = capsys.readouterr().out
    assert rc == 2
    assert "different protocol: run 'pixel' vs baseline 'default'" in out
    assert "0 cells compared" in out and "4 could not be compared" in out and "could not compare (exit 2)" in out
    assert set(junit_cases(junit).values()) == {"error"}  # the planted regression is not compared
    err = ET.parse(junit).getroot().find(".//testcase[@classname='synth.b'][@name='l1 [all]']/error")
    assert err.get("type") == "could_not_compare" and "protocol" in err.get("message")


def test_weights_mismatch_exits_2(tmp_path):
    base = base_values()
    baseline = write_run(tmp_path / "base", base, weights="LPIPS v0.1 alex")
    run = write_run(tmp_path / "run", base, weights="RANDOM WEIGHTS (smoke run)")
    r = gate(run, baseline)
    assert r.exit_code == 2 and {c.status for c in r.comparisons} == {"error"}
    assert all(c.reason == "different weights: run 'RANDOM WEIGHTS (smoke run)' vs baseline 'LPIPS v0.1 alex'"
               for c in r.comparisons)


def test_a_metric_missing_from_the_run_exits_2(tmp_path, capsys):
    base = base_values()
    baseline = write_run(tmp_path / "base", base)
    run = tmp_path / "run"
    write_job(run, "a", {"l1": base["a"]["l1"]})  # psnr not scored
    write_job(run, "b", base["b"])
    r = gate(run, baseline)
    assert statuses(r) == {("a", "l1"): "unchanged", ("a", "psnr"): "error",
                           ("b", "l1"): "unchanged", ("b", "psnr"): "unchanged"}
    c = next(c for c in r.comparisons if c.status == "error")
    assert c.reason == "missing metric: scored in the baseline, not in the run (run edits: ok 30)"
    assert r.exit_code == 2
    # --metrics names the cells to gate; each must be scored on both sides
    assert main(["gate", str(run), "--baseline", str(baseline), "--metrics", "l1"]) == 0
    assert "2 cells compared: 0 regressed, 0 improved, 2 unchanged" in capsys.readouterr().out
    assert main(["gate", str(run), "--baseline", str(baseline), "--metrics", "l1,lpips"]) == 2
    assert "could not compare: missing metric: 'lpips' is not scored in the baseline" in capsys.readouterr().err


def test_a_regression_outranks_cells_that_could_not_be_compared(tmp_path):
    base = base_values()
    baseline = write_run(tmp_path / "base", base)
    run = tmp_path / "run"
    write_job(run, "a", {"l1": base["a"]["l1"]})
    write_job(run, "b", shifted(base, "b", "psnr", -2.0, noise=0.1)["b"])
    r = gate(run, baseline)
    assert r.count("regressed") == 1 and r.count("error") == 1 and r.exit_code == 1


def test_no_common_methods_and_bad_baselines_exit_2(tmp_path, capsys):
    base = base_values()
    baseline = write_run(tmp_path / "base", base)
    other = tmp_path / "other"
    write_job(other, "a", base["a"], params={"strength": 0.5})  # another parameter point
    junit = tmp_path / "gate.xml"
    assert main(["gate", str(other), "--baseline", str(baseline), "--junit", str(junit)]) == 2
    err = capsys.readouterr().err
    assert "could not compare: no common methods: the baseline has a on synth, b on synth; the run has " \
           "a[strength=0.5] on synth" in err
    root = ET.parse(junit).getroot()
    assert root.get("errors") == "1" and root.find(".//testcase[@name='gate']/error") is not None
    assert main(["gate", str(other), "--baseline", str(tmp_path / "nowhere")]) == 2
    assert "baseline '" in capsys.readouterr().err
    # a tolerance or tolerance syntax naming nothing is refused rather than silently ignored
    assert main(["gate", str(baseline), "--baseline", str(baseline), "--tolerance", "lpisp=abs:0.1"]) == 2
    assert "--tolerance lpisp: no such metric in either run" in capsys.readouterr().err
    assert main(["gate", str(baseline), "--baseline", str(baseline), "--tolerance", "l1=0.1"]) == 2
    assert "write METRIC=abs:VALUE or METRIC=rel:FRACTION" in capsys.readouterr().err


def _paper(root: Path, rows: list[tuple[str, str, str, str]], mapping: dict) -> Path:
    """A synthetic published table synth/table1 (+ its declared mapping) under ``root``."""
    import csv

    import yaml

    from harness.paper import COLUMNS

    d = root / "synth"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "table1.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for method, metric, value, hib in rows:
            w.writerow(["synth", "table1", "", method, metric, value, "", hib, "pie_bench", "1", ""])
    (d / "table1.yaml").write_text(yaml.safe_dump({"source": "Synth et al. Table 1", "dataset": "synth"}))
    (d / "table1.compare.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    return root


PAPER_MAPPING = {"table": "synth/table1",
                 "methods": {"A": {"method": "a"}, "B": {"method": "b"}, "Z": {"method": "z"},
                             "Theirs": {"unmapped": "not implemented"}},
                 "metrics": {"L1": {"metric": "l1", "region": "all", "factor": 1},
                             "PSNR x10": {"metric": "psnr", "region": "all", "factor": 10},
                             "Study": {"unmapped": "user study"}}}


def test_gate_against_a_published_table(tmp_path):
    """The run's interval of each mapped cell against the printed number: a planted regression
    (a's L1 far above the paper's), an improvement (b's L1 far below), an unchanged cell (the
    paper's value inside our interval), the x10 scale, absent and unmapped rows."""
    from harness.gate import gate_paper

    vals = base_values()
    run = write_run(tmp_path / "run", vals, protocol="pie_bench")
    a_l1, b_l1 = float(np.mean(vals["a"]["l1"])), float(np.mean(vals["b"]["l1"]))
    b_psnr = float(np.mean(vals["b"]["psnr"]))
    rows = [("A", "L1", f"{a_l1 - 0.05:.4f}", "false"),   # ours 0.05 worse (lower is better): regressed
            ("B", "L1", f"{b_l1 + 0.05:.4f}", "false"),   # ours 0.05 better: improved
            ("B", "PSNR x10", f"{10 * b_psnr:.3f}", "true"),  # ours x10 equals it to 3 decimals: unchanged
            ("Z", "L1", "0.1", "false"),                  # mapped, not in the run: absent
            ("Theirs", "L1", "0.2", "false"),              # declared unmapped: absent with the reason
            ("A", "Study", "50", "true")]                  # metric unmapped
    root = _paper(tmp_path / "paper", rows, PAPER_MAPPING)
    r = gate_paper(run, "synth/table1", root=root)
    got = {(c.method, c.metric): c for c in r.comparisons}
    assert {k: c.status for k, c in got.items()} == {
        ("a", "l1"): "regressed", ("b", "l1"): "improved", ("b", "psnr"): "unchanged", ("z", "l1"): "absent",
        ("Theirs", "L1"): "absent", ("A", "Study"): "absent"}  # unmapped rows keep the paper's names
    assert r.exit_code == 1 and r.baseline == "paper/synth/table1"
    c = got[("a", "l1")]
    s = summarize_one(run, "a", "l1")
    # the change is ours - published; its interval is the run's own interval shifted by the printed value
    assert c.change == pytest.approx(a_l1 - round(a_l1 - 0.05, 4), rel=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx((s.ci_low - round(a_l1 - 0.05, 4),
                                                   s.ci_high - round(a_l1 - 0.05, 4)), rel=1e-12)
    assert c.pairing == "published" and c.n_run == N and c.n_baseline == 0
    p = got[("b", "psnr")]
    assert p.run_mean == pytest.approx(10 * b_psnr, rel=1e-12) and p.baseline_mean == round(10 * b_psnr, 3)
    assert "ours x10" in p.reason
    assert "not implemented" in got[("Theirs", "L1")].reason and "user study" in got[("A", "Study")].reason
    # a tolerance wide enough (in our units: 0.06 > the 0.05 planted) passes the gate
    r2 = gate_paper(run, "synth/table1", {"l1": Tolerance("abs", 0.06)}, root=root)
    assert r2.exit_code == 0 and {c.status for c in r2.comparisons if c.metric == "l1" and c.method in "ab"} == {
        "unchanged"}
    # abs tolerances convert with the factor: 0.5 dB of PSNR is 5 on the paper's x10 scale
    r3 = gate_paper(run, "synth/table1", {"psnr": Tolerance("abs", 0.5)}, root=root)
    assert next(c for c in r3.comparisons if c.metric == "psnr").tolerance_value == pytest.approx(5.0)
    # --metrics selects harness metrics
    assert {c.metric for c in gate_paper(run, "synth/table1", metrics=["psnr"], root=root).comparisons} == {"psnr"}
    assert "PASS" in gate_paper(run, "synth/table1", metrics=["psnr"], root=root).summary_line()


def summarize_one(run: Path, method: str, metric: str):
    from harness.aggregate import load_run, summarize

    s = summarize(load_run(run)[0], by=("method", "params"))
    return s[(s.method == method) & (s.metric == metric)].iloc[0]


def test_gate_against_a_published_table_exit_2(tmp_path):
    """Protocol mismatch, a metric the mapping lacks, no common method, an unknown table: exit 2."""
    from harness.gate import gate_paper

    run = write_run(tmp_path / "run", base_values(), protocol="pie_bench")
    root = _paper(tmp_path / "paper", [("A", "L1", "0.1", "false"), ("B", "PSNR x10", "280", "true"),
                                       ("Z", "L1", "0.1", "false"), ("Theirs", "L1", "0.2", "false"),
                                       ("A", "Study", "50", "true")], PAPER_MAPPING)
    other = write_run(tmp_path / "other", base_values(), protocol="zone")
    with pytest.raises(GateError, match="protocol mismatch"):
        gate_paper(other, "synth/table1", root=root)
    with pytest.raises(GateError, match="missing metric: 'lpips' is not mapped by paper/synth/table1"):
        gate_paper(run, "synth/table1", metrics=["lpips"], root=root)
    with pytest.raises(GateError, match="--tolerance lpips: paper/synth/table1 maps no such metric"):
        gate_paper(run, "synth/table1", {"lpips": Tolerance()}, root=root)
    lone = tmp_path / "lone"
    write_job(lone, "c", base_values()["a"], protocol="pie_bench")
    with pytest.raises(GateError, match="no common methods: none of paper/synth/table1's methods is in the run"):
        gate_paper(lone, "synth/table1", root=root)
    with pytest.raises(GateError, match="baseline paper/synth/nope"):
        gate_paper(run, "synth/nope", root=root)


def test_gate_cli_with_a_published_table(tmp_path, capsys):
    """The CLI resolves paper/<paper>/<table> against the shipped results/paper/: zone/table1's
    protocol is zone, so a run scored under 'default' is refused (exit 2) with the reason, in
    JUnit too; a folder that is neither a run nor a table name is not a run."""
    from harness.gate import paper_table_name

    assert paper_table_name("paper/zone/table1") == "zone/table1"
    assert paper_table_name("results/paper/zone/table1.csv") == "zone/table1"
    assert paper_table_name(tmp_path / "results" / "run") is None
    run = write_run(tmp_path / "run", base_values())
    junit = tmp_path / "gate.xml"
    assert main(["gate", str(run), "--baseline", "paper/zone/table1", "--junit", str(junit)]) == 2
    err = capsys.readouterr().err
    assert "could not compare: baseline paper/zone/table1: protocol mismatch" in err
    assert "protocol mismatch" in ET.parse(junit).getroot().find(".//testcase[@name='gate']/error").get("message")
    (tmp_path / "results" / "paper" / "zone").mkdir(parents=True)
    assert main(["gate", str(run), "--baseline", str(tmp_path / "results" / "paper" / "zone")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_new_and_absent_methods_are_listed_not_failed(tmp_path):
    base = base_values()
    baseline = write_run(tmp_path / "base", base)
    run = tmp_path / "run"
    write_job(run, "a", base["a"])
    write_job(run, "c", base["b"])  # a new method; b was not run
    r = gate(run, baseline)
    assert statuses(r) == {("a", "l1"): "unchanged", ("a", "psnr"): "unchanged", ("b", "l1"): "absent",
                           ("b", "psnr"): "absent", ("c", "l1"): "new", ("c", "psnr"): "new"}
    assert r.exit_code == 0
    cases = ET.fromstring(junit_xml(r))
    assert cases.get("skipped") == "4" and cases.get("tests") == "6"


def test_gate_has_help_and_is_listed(capsys):
    with pytest.raises(SystemExit) as e:
        main(["gate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: edit-harness gate") and "--baseline BASELINE_RUN" in out and "--junit" in out
    assert main(["--help"]) == 0
    assert "edit-harness gate RUN --baseline BASE" in capsys.readouterr().out


# -- pairing --------------------------------------------------------------------------------------
def test_same_sample_ids_are_paired_disjoint_ones_unpaired(tmp_path):
    rng = np.random.default_rng(5)
    truth = rng.random(N)  # per-sample difficulty shared by both runs: strongly correlated scores
    x_base, x_run = truth + 0.01 * rng.standard_normal(N), truth + 0.02 + 0.01 * rng.standard_normal(N)
    baseline = tmp_path / "base"
    write_job(baseline, "a", {"l1": x_base})
    same = tmp_path / "same"
    write_job(same, "a", {"l1": x_run})
    disjoint = tmp_path / "disjoint"
    write_job(disjoint, "a", {"l1": x_run}, ids=[f"t{i:03d}" for i in range(N)])

    paired = gate(same, baseline).comparisons[0]
    assert paired.pairing == "paired" and paired.status == "regressed"
    # the paired interval is bootstrap_ci of the per-sample differences (the report's bootstrap,
    # checked against scipy): the same resampling matrix on the same differences, as a
    # matrix-vector product here and a one-column matrix product there (BLAS rounding only)
    lo, hi = bootstrap_ci(x_run - x_base)
    assert (paired.ci_low, paired.ci_high) == pytest.approx((lo, hi), abs=1e-12)

    unpaired = gate(disjoint, baseline).comparisons[0]
    assert unpaired.pairing == "unpaired"
    assert unpaired.reason == f"unpaired: {N} sample(s) scored only in the run, {N} only in the baseline"
    assert unpaired.change == pytest.approx(paired.change, abs=1e-12)
    # the shared difficulty spreads the unpaired interval: the +0.02 shift is not supported there
    assert unpaired.status == "unchanged" and unpaired.ci_low < 0 < unpaired.ci_high
    assert (unpaired.ci_high - unpaired.ci_low) > 5 * (paired.ci_high - paired.ci_low)

    # the same ids but a sample NaN on one side: not the same scored samples, so unpaired
    nan_run = tmp_path / "nan"
    write_job(nan_run, "a", {"l1": np.where(np.arange(N) == 3, np.nan, x_run)})
    c = gate(nan_run, baseline).comparisons[0]
    assert c.pairing == "unpaired" and c.n_run == N - 1 and c.n_baseline == N
    assert c.reason == "unpaired: 0 sample(s) scored only in the run, 1 only in the baseline"


def test_unpaired_interval_matches_scipy_two_sample_bootstrap():
    """Percentile bootstrap of the difference of means, samples resampled independently: scipy's
    two-sample bootstrap computes the same interval, up to Monte-Carlo error."""
    rng = np.random.default_rng(11)
    x, y = rng.normal(1.0, 0.5, 40), rng.exponential(1.0, 25)
    B = 40_000
    ours = unpaired_difference(x, y, n_resamples=B)
    r = scipy.stats.bootstrap((x, y), lambda a, b, axis=-1: np.mean(a, axis=axis) - np.mean(b, axis=axis),
                              n_resamples=B, method="percentile", paired=False, random_state=0, vectorized=True)
    se = math.sqrt(x.var() / x.size + y.var() / y.size)  # the bootstrap SE of the difference
    # Monte-Carlo SE of a 2.5% quantile estimate ~ sqrt(q(1-q)/B) / density at it (normal
    # approximation): 0.013 SE at B = 40000; two independent estimates, 6 of their SEs. That
    # still tells the right quantile from a wrong one: the 5% quantile is 0.3 SE inside the 2.5%.
    tol = 6 * math.sqrt(2) * math.sqrt(0.025 * 0.975 / B) / scipy.stats.norm.pdf(1.96) * se
    assert tol < 0.12 * se
    assert ours[0] == pytest.approx(x.mean() - y.mean(), abs=1e-12)
    assert ours[1] == pytest.approx(r.confidence_interval.low, abs=tol)
    assert ours[2] == pytest.approx(r.confidence_interval.high, abs=tol)
    # about the normal interval, mean difference -/+ 1.96 SE
    assert ours[2] - ours[1] == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_infinite_values_and_clamped_means():
    inf = math.inf
    # PSNR of an unchanged image is +inf on both sides: no change
    assert paired_difference([inf, inf, 30.0], [inf, inf, 30.0]) == (0.0, 0.0, 0.0)
    assert unpaired_difference([inf, inf], [inf]) == (0.0, 0.0, 0.0)
    # from identical to not: an infinite loss, beyond any tolerance
    d = paired_difference([inf, 30.0], [inf, inf])
    assert d == (-inf, -inf, -inf) and classify(d[1], d[2], True, 1e9) == "regressed"
    # +inf on one sample, -inf on another: undefined
    assert all(math.isnan(v) for v in paired_difference([inf, 1.0], [1.0, inf]))
    # a protocol that clamps the mean at 0 (CLIPScore): two negative means both read 0, no change
    assert paired_difference([-0.3, -0.1, -0.2], [-0.05, -0.02, -0.04], floor=0.0) == (0.0, 0.0, 0.0)
    change, lo, hi = paired_difference([0.3, 0.1, 0.2, 0.25], [-0.05, -0.02, -0.04, -0.01], floor=0.0)
    assert change == pytest.approx(0.2125, abs=1e-12) and 0 < lo <= change <= hi


def test_clamped_means_in_a_run(tmp_path):
    baseline, run = tmp_path / "base", tmp_path / "run"
    write_job(baseline, "a", {"clipscore": np.linspace(-0.2, -0.1, N)}, floor=0.0)
    write_job(run, "a", {"clipscore": np.linspace(-0.5, -0.3, N)}, floor=0.0)
    c = gate(run, baseline).comparisons[0]
    assert (c.baseline_mean, c.run_mean, c.change, c.status) == (0.0, 0.0, 0.0, "unchanged")


def test_set_metrics_compare_their_single_values(tmp_path):
    """FID-like set metrics have one row per job (sample id ``__set__``): paired, n = 1, the
    interval is the single difference."""
    baseline, run = tmp_path / "base", tmp_path / "run"
    write_job(baseline, "a", {"l1": np.array([0.20])}, ids=["__set__"])
    write_job(run, "a", {"l1": np.array([0.25])}, ids=["__set__"])
    c = gate(run, baseline).comparisons[0]
    assert (c.pairing, c.n_run, c.status) == ("paired", 1, "regressed")
    assert c.change == c.ci_low == c.ci_high == pytest.approx(0.05, abs=1e-15)
    assert gate(run, baseline, {"l1": Tolerance("abs", 0.06)}).comparisons[0].status == "unchanged"


def test_the_gate_is_deterministic(tmp_path, capsys):
    base = base_values()
    baseline = write_run(tmp_path / "base", base)
    run = write_run(tmp_path / "run", shifted(base, "a", "psnr", -0.3, noise=1.0))
    outputs = []
    for i in range(2):
        assert main(["gate", str(run), "--baseline", str(baseline), "--junit", str(tmp_path / f"{i}.xml")]) in (0, 1)
        outputs.append((capsys.readouterr().out.replace(f"{i}.xml", ""), (tmp_path / f"{i}.xml").read_bytes()))
    assert outputs[0] == outputs[1]


def test_parse_tolerance():
    assert parse_tolerance("l1=abs:0.01") == ("l1", Tolerance("abs", 0.01))
    assert parse_tolerance("psnr/unedited=rel:0.05") == ("psnr/unedited", Tolerance("rel", 0.05))
    for bad, msg in (("l1", "write METRIC"), ("l1=pct:1", "kind must be"), ("l1=abs:x", "'x' is not a number"),
                     ("l1=abs:-1", ">= 0"), ("l1=rel:nan", ">= 0")):
        with pytest.raises(ValueError, match=msg):
            parse_tolerance(bad)
    assert Tolerance("rel", 0.1).threshold(-20.0) == pytest.approx(2.0)
    assert Tolerance("rel", 0.1).threshold(math.inf) == 0.0


# -- real runs ------------------------------------------------------------------------------------
FAST = ["metrics=pixel", "progress=false", "report=false"]


def test_gate_on_real_runs(tmp_path, capsys):
    """Real tiny jobs (identity and recolor on the embedded sample set): a run against itself,
    against a baseline on fewer samples, and against one scored under another region rule."""
    def run(name: str, *extra: str) -> Path:
        assert main(["run", "-m", "method=identity,recolor", f"results_dir={tmp_path}", f"run_name={name}",
                     *FAST, *extra]) == 0
        return tmp_path / name

    base = run("base", "dataset.limit=4")
    capsys.readouterr()
    assert main(["gate", str(base), "--baseline", str(base), "--junit", str(tmp_path / "self.xml")]) == 0
    out = capsys.readouterr().out
    scores = pd.concat([pd.read_parquet(p) for p in sorted(base.glob("jobs/*/scores.parquet"))])
    cells = scores[["method", "metric", "region"]].drop_duplicates()
    assert len(cells) == 2 * 2 * 3  # two methods, l1 and l2, three regions
    assert f"{len(cells)} cells compared: 0 regressed, 0 improved, {len(cells)} unchanged" in out
    assert len(junit_cases(tmp_path / "self.xml")) == len(cells)

    fewer = run("fewer", "dataset.limit=2")
    r = gate(fewer, base)
    compared = [c for c in r.comparisons if c.pairing]
    assert compared and {c.pairing for c in compared} == {"unpaired"}
    assert all(c.n_run < c.n_baseline for c in compared)

    rule = run("rule", "dataset.limit=4", "metrics.region_rule=zero_fill")
    capsys.readouterr()
    assert main(["gate", str(rule), "--baseline", str(base)]) == 2
    out = capsys.readouterr().out
    assert "different region_rule" in out and f"{len(cells)} could not be compared" in out
