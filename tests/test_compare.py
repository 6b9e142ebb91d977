"""`edit-harness compare`: a published table side by side with a run (harness/compare.py)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from harness.aggregate import COST_METRICS, summarize, load_run
from harness.cli import main
from harness.compare import CompareError, compare, load_mapping, write_compare
from harness.paper import COLUMNS, PAPER_DIR, load_table, tables
from harness.registry import METHODS, METRICS
from harness.runner import EDIT_COLUMNS, SCORE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
N = 40
HIB = {"l1": False, "clip_t": True}


def write_job(run_dir: Path, method: str, values: dict[str, np.ndarray], params: dict | None = None,
              protocol: str = "zone") -> None:
    """jobs/<job>/scores.parquet and edits.parquet with the runner's columns (region ``all``)."""
    pj = json.dumps(params or {}, sort_keys=True)
    job = f"{method}-synth-{abs(hash(pj)) % 10**8}"
    base = [dict(run=run_dir.name, job=job, method=method, method_version="1", params=pj, dataset="synth",
                 sample_id=f"s{i:03d}", category="change", seed=0, edit_key=f"{job}-{i}") for i in range(N)]
    edits = [{**b, "status": "ok", "reason": None, "flags": "", "notes": "", "prep_seconds": 0.1,
              "infer_seconds": 0.2, "peak_memory_bytes": 1.0, "model_revision": None} for b in base]
    scores = [{**b, "metric": m, "region": "all", "value": float(v[i]), "flag": None, "protocol": protocol,
               "weights": "synthetic weights", "region_rule": "area", "higher_is_better": HIB[m],
               "mean_floor": math.nan}
              for m, v in values.items() for i, b in enumerate(base)]
    d = run_dir / "jobs" / job
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(scores, columns=SCORE_COLUMNS).to_parquet(d / "scores.parquet", index=False)
    pd.DataFrame(edits, columns=EDIT_COLUMNS).to_parquet(d / "edits.parquet", index=False)


RNG = np.random.default_rng(7)
# recolor strength 1.0: l1 around 0.05, clip_t around 0.30 (the paper prints clip_t x100)
_Z = RNG.standard_normal(N)
L1 = 0.05 + 0.01 * (_Z - _Z.mean())  # mean 0.05 (to rounding): the published 0.0500 lies mid-interval
CLIP_T = 0.30 + 0.02 * RNG.standard_normal(N)
IDENT_L1 = 0.02 + 0.005 * RNG.standard_normal(N)

PAPER_ROWS = [  # method, metric, value as printed, higher_is_better, protocol, scale
    ("Recolor", "L1", "0.0500", "false", "zone", "1"),      # ~ our mean: inside our interval
    ("Recolor", "CLIP-T", "20.00", "true", "zone", "100"),  # far below ours (~30): outside
    ("Recolor", "Study", "55.0", "false", "", "100"),       # metric declared unmapped
    ("Bold <b>Method</b>", "L1", "0.100", "false", "zone", "1"),
    ("MagicBrush", "L1", "0.0919", "false", "zone", "1"),   # mapped, but the run lacks magicbrush
    ("Text2LIVE", "L1", "0.0511", "false", "zone", "1"),    # declared unmapped
    ("Ghost", "L1", "0.0300", "false", "zone", "1"),        # not in the mapping at all
    ("Any recolor", "L1", "0.0400", "false", "zone", "1"),  # recolor without params: two points match
]
MAPPING = {
    "table": "synth/table1",
    "methods": {
        "Recolor": {"method": "recolor", "params": {"strength": 1.0}},
        "Bold <b>Method</b>": {"method": "identity"},
        "MagicBrush": {"method": "magicbrush"},
        "Text2LIVE": {"unmapped": "not implemented"},
        "Any recolor": {"method": "recolor"},
    },
    "metrics": {
        "L1": {"metric": "l1", "region": "all", "factor": 1},
        "CLIP-T": {"metric": "clip_t", "region": "all", "factor": 100},
        "Study": {"unmapped": "user study"},
    },
}


def write_paper(root: Path, mapping: dict = MAPPING) -> Path:
    d = root / "synth"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "table1.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for m, metric, v, hib, proto, scale in PAPER_ROWS:
            w.writerow(["synth", "table1", "", m, metric, v, "", hib, proto, scale, ""])
    (d / "table1.yaml").write_text(yaml.safe_dump({"source": "Synth et al. Table 1", "dataset": "Synth-100"}))
    (d / "table1.compare.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    return root


@pytest.fixture
def setup(tmp_path):
    run = tmp_path / "run"
    write_job(run, "recolor", {"l1": L1, "clip_t": CLIP_T}, {"strength": 1.0})
    write_job(run, "recolor", {"l1": L1 + 0.01, "clip_t": CLIP_T}, {"strength": 0.5})
    write_job(run, "identity", {"l1": IDENT_L1})
    return run, write_paper(tmp_path / "paper")


def rows(result) -> dict[tuple[str, str], dict]:
    return {(r["paper_method"], r["paper_metric"]): r for r in result.frame.to_dict("records")}


def expected(run: Path, method: str, params: str, metric: str) -> pd.Series:
    s = summarize(load_run(run)[0], by=("method", "params"))
    return s[(s.method == method) & (s.params == params) & (s.metric == metric)].iloc[0]


def test_deltas_scale_and_ci_flags(setup):
    run, root = setup
    res = compare(run, "synth/table1", root=root)
    r = rows(res)
    assert len(res.frame) == len(PAPER_ROWS)
    e = expected(run, "recolor", '{"strength": 1.0}', "l1")
    got = r[("Recolor", "L1")]
    assert got["status"] == "compared" and got["n"] == N and got["params"] == "strength=1.0"
    # the same summarize() computation: equal up to float reassociation in x1 - published
    assert got["ours_mean"] == pytest.approx(float(np.mean(L1)), rel=1e-12)
    assert got["delta"] == pytest.approx(float(np.mean(L1)) - 0.05, abs=1e-15)
    assert (got["ours_ci_low"], got["ours_ci_high"]) == (e.ci_low, e.ci_high)
    assert e.ci_low <= 0.05 <= e.ci_high and got["in_ci"] == "yes"
    # x100: ours is converted to the paper's scale before the delta
    c = r[("Recolor", "CLIP-T")]
    ec = expected(run, "recolor", '{"strength": 1.0}', "clip_t")
    assert c["factor"] == 100
    assert c["ours_mean"] == pytest.approx(100 * float(np.mean(CLIP_T)), rel=1e-12)
    assert c["ours_ci_low"] == pytest.approx(100 * ec.ci_low, rel=1e-12)
    assert c["ours_ci_high"] == pytest.approx(100 * ec.ci_high, rel=1e-12)
    assert c["delta"] == pytest.approx(100 * float(np.mean(CLIP_T)) - 20.0, rel=1e-12)
    assert 9.0 < c["delta"] < 11.0 and c["in_ci"] == "no"
    b = r[("Bold <b>Method</b>", "L1")]
    assert b["delta"] == pytest.approx(float(np.mean(IDENT_L1)) - 0.1, abs=1e-15) and b["in_ci"] == "no"


def test_not_in_run_unmapped_and_ambiguous_rows(setup):
    run, root = setup
    res = compare(run, "synth/table1", root=root)
    r = rows(res)
    assert r[("MagicBrush", "L1")]["status"] == "not in this run"
    assert "no l1/all of magicbrush" in r[("MagicBrush", "L1")]["why"]
    assert r[("Text2LIVE", "L1")]["status"] == "not in this run" and r[("Text2LIVE", "L1")]["why"] == "not implemented"
    assert r[("Ghost", "L1")]["why"] == "method not mapped"
    assert r[("Recolor", "Study")]["status"] == "not in this run" and r[("Recolor", "Study")]["why"] == "user study"
    amb = r[("Any recolor", "L1")]
    assert amb["status"] == "ambiguous" and "2 datasets / parameter points" in amb["why"]
    assert [k for k, v in r.items() if v["status"] == "compared"] == [
        ("Recolor", "L1"), ("Recolor", "CLIP-T"), ("Bold <b>Method</b>", "L1")]
    assert res.unmapped_methods == ["Text2LIVE", "Ghost"]
    assert res.unmapped_metrics == ["Study"]
    cap = "\n".join(res.caption)
    assert "Paper methods with no harness method: Text2LIVE, Ghost" in cap
    assert "Paper metrics with no harness metric: Study" in cap
    assert "Compared: 3 of 8 published numbers" in cap
    assert "Synth-100" in cap and "synthetic weights" in cap and "dataset: synth" in cap
    assert "Mapping: results/paper/synth/table1.compare.yaml" in cap and str(root) not in cap  # no machine path


def test_outputs_csv_md_html_tex(setup, tmp_path):
    run, root = setup
    res = compare(run, "synth/table1", root=root)
    files = write_compare(res, tmp_path / "out")
    df = pd.read_csv(files["csv"])
    assert len(df) == len(PAPER_ROWS)
    rec = df[(df.paper_method == "Recolor") & (df.paper_metric == "CLIP-T")].iloc[0]
    assert rec.published == 20.0 and rec.in_ci == "no" and rec.n == N
    # %.12g in the CSV: 12 significant digits
    assert rec.delta == pytest.approx(100 * float(np.mean(CLIP_T)) - 20.0, rel=1e-11)
    assert (df.status == "not in this run").sum() == 4
    assert files["caption"].name == "compare.caption.txt"
    assert files["caption"].read_text().splitlines() == res.caption
    page = files["html"].read_text()
    assert "Bold &lt;b&gt;Method&lt;/b&gt;" in page and "<b>" not in page
    md = files["md"].read_text()
    # the published value as printed (4 decimals), ours at one more
    assert f"| Recolor | L1 | 0.0500 | {np.mean(L1):.5f} [" in md
    assert "Bold <b>Method</b>" in md and "not in this run (not implemented)" in md
    tex = files["tex"].read_text().splitlines()
    body = [ln for ln in tex if ln.endswith(" \\\\") and not ln.startswith("%")]
    assert len(body) == 1 + len(PAPER_ROWS) and all(ln.count(" & ") == 8 for ln in body)
    assert "\\label{tab:compare-synth-table1}" in tex


def test_protocol_mismatch_refused_unless_allowed(tmp_path):
    root = write_paper(tmp_path / "paper")
    run = tmp_path / "run"
    write_job(run, "recolor", {"l1": L1, "clip_t": CLIP_T}, {"strength": 1.0}, protocol="cpam")
    with pytest.raises(CompareError, match="protocol mismatch: synth/table1 was measured under protocol zone, the run "
                                           "under cpam"):
        compare(run, "synth/table1", root=root)
    res = compare(run, "synth/table1", root=root, allow_protocol_mismatch=True)
    assert res.protocol_mismatch
    assert any(ln.startswith("PROTOCOL MISMATCH (allowed by --allow-protocol-mismatch)") for ln in res.caption)
    assert rows(res)[("Recolor", "L1")]["status"] == "compared"


def test_cli_exit_codes_and_default_out(tmp_path, capsys):
    """The CLI against the shipped zone/table1 mapping: exit 2 on a protocol mismatch; with the
    flag (or the right protocol) the tables land in RUN/report/compare-zone-table1/."""
    bad = tmp_path / "bad"
    write_job(bad, "diffedit", {"l1": L1}, protocol="cpam")
    assert main(["compare", str(bad), "--paper", "zone/table1"]) == 2
    assert "protocol mismatch" in capsys.readouterr().err
    assert not (bad / "report").exists()
    assert main(["compare", str(bad), "--paper", "zone/table1", "--allow-protocol-mismatch"]) == 0
    good = tmp_path / "good"
    write_job(good, "diffedit", {"l1": L1})
    assert main(["compare", str(good), "--paper", "zone/table1"]) == 0
    out = good / "report" / "compare-zone-table1"
    df = pd.read_csv(out / "compare.csv")
    row = df[(df.paper_method == "DiffEdit") & (df.paper_metric == "L1")].iloc[0]
    assert row.status == "compared" and row.delta == pytest.approx(float(np.mean(L1)) - 0.0426, rel=1e-10)
    assert (df.status == "compared").sum() == 1 and len(df) == 30
    assert main(["compare", str(good), "--paper", "zone/nope"]) == 2


def test_bad_mapping_is_refused(setup):
    run, root = setup
    bad = {**MAPPING, "methods": {**MAPPING["methods"], "Nobody": {"method": "identity"}}}
    write_paper(root, bad)
    with pytest.raises(CompareError, match="'Nobody' are not in synth/table1"):
        compare(run, "synth/table1", root=root)
    write_paper(root, {**MAPPING, "metrics": {"L1": {"metric": "l1", "factor": 0}}})
    with pytest.raises(CompareError, match="metric 'L1': factor 0 is not a positive number"):
        compare(run, "synth/table1", root=root)
    (root / "synth" / "table1.compare.yaml").unlink()
    with pytest.raises(CompareError, match="no mapping for synth/table1"):
        compare(run, "synth/table1", root=root)


def _protocol_rows(protocol: str) -> set[tuple[str, str]]:
    """(metric, region) rows the protocol's metric suite (conf/metrics/<protocol>.yaml) writes."""
    cfg = yaml.safe_load((ROOT / "conf" / "metrics" / f"{protocol}.yaml").read_text())
    out: set[tuple[str, str]] = set()
    for key, item in cfg["items"].items():
        item = dict(item or {})
        cls = METRICS.get(item.pop("metric", key))
        out |= set(cls(protocol=protocol, name=key, regions=cfg["regions"], **item).output_rows())
    return out


SHIPPED = sorted(p for p in PAPER_DIR.glob("*/*.compare.yaml"))


def test_shipped_mappings_exist_for_the_main_tables():
    names = {f"{p.parent.name}/{p.name[:-len('.compare.yaml')]}" for p in SHIPPED}
    assert {"zone/table1", "partedit/table1", "cpam/table2"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_mapping_names_exist(path):
    name = f"{path.parent.name}/{path.name[:-len('.compare.yaml')]}"
    assert name in tables()
    m = load_mapping(name)
    paper = load_table(name)
    assert set(m.methods) | set(m.unmapped_methods) <= set(paper["method"])
    assert set(m.metrics) | set(m.unmapped_metrics) <= set(paper["metric"])
    for mm in m.methods.values():
        assert mm.method in METHODS.names()
    protocols = {p for p in paper.loc[paper["metric"].isin(list(m.metrics)), "protocol"] if p}
    assert len(protocols) == 1
    # a protocol's metric rows, and the runner's cost columns every report has
    rows_ = _protocol_rows(protocols.pop()) | {(c[0], "all") for c in COST_METRICS}
    for paper_metric, km in m.metrics.items():
        assert (km.metric, km.region) in rows_, paper_metric
    for setting, sm in m.settings.items():
        assert setting in set(paper["setting"]) and (sm.categories or sm.region or sm.params or sm.metric_regions)
        for paper_metric, region in sm.metric_regions.items():
            assert (m.metrics[paper_metric].metric, region) in rows_, (setting, paper_metric)


def test_setting_restricts_a_method_mapping(setup):
    run, root = setup
    mapping = {**MAPPING, "methods": {**MAPPING["methods"], "Recolor": {"method": "recolor", "params": {"strength": 1.0},
                                                                       "setting": "Other"}}}
    write_paper(root, mapping)
    r = rows(compare(run, "synth/table1", root=root))
    assert r[("Recolor", "L1")]["status"] == "not in this run"
    assert r[("Recolor", "L1")]["why"] == "method mapped for setting 'Other' only"
    assert r[("Bold <b>Method</b>", "L1")]["status"] == "compared"


def test_a_cell_with_no_value_on_any_sample_is_not_compared(tmp_path):
    """A metric scored as NaN on every sample (background LPIPS without masks) is a row the run
    cannot compare, not a comparison with n = 0."""
    run = tmp_path / "run"
    write_job(run, "recolor", {"l1": np.full(N, np.nan), "clip_t": CLIP_T}, {"strength": 1.0})
    write_job(run, "identity", {"l1": IDENT_L1})
    res = compare(run, "synth/table1", root=write_paper(tmp_path / "paper"))
    r = rows(res)
    got = r[("Recolor", "L1")]
    assert got["status"] == "not in this run" and got["n"] == 0
    assert got["why"] == f"the run's l1/all of recolor has no value on any sample ({N} NaN)"
    assert r[("Recolor", "CLIP-T")]["status"] == "compared"


def _set_categories(run: Path, method: str, categories: list[str]) -> None:
    """Give the samples of ``method``'s job the categories ``categories`` (cycled), in both tables."""
    for d in (run / "jobs").iterdir():
        if d.name.startswith(f"{method}-"):
            for name in ("scores.parquet", "edits.parquet"):
                f = pd.read_parquet(d / name)
                idx = f["sample_id"].str[1:].astype(int)
                f["category"] = [categories[i % len(categories)] for i in idx]
                f.to_parquet(d / name, index=False)


def test_settings_select_categories_regions_and_cost_columns(tmp_path):
    """A ``settings:`` section: a setting's rows read only its category's samples (DiffEditor Table
    2's tasks) or another region; a method may be mapped for a list of settings; a runner cost
    column (cost_infer_s) maps like a metric."""
    run = tmp_path / "run"
    write_job(run, "recolor", {"l1": L1, "clip_t": CLIP_T})
    _set_categories(run, "recolor", ["move", "paste"])
    d = tmp_path / "paper" / "synth"
    d.mkdir(parents=True)
    with open(d / "table1.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for setting, metric, v in (("Moving", "CLIP", "0.300"), ("Pasting", "CLIP", "0.300"),
                                   ("All", "CLIP", "0.300"), ("Jaw", "CLIP", "0.300"), ("", "Time", "1.00")):
            w.writerow(["synth", "table1", setting, "Recolor", metric, v, "", "true", "zone", "1", ""])
    (d / "table1.yaml").write_text(yaml.safe_dump({"source": "Synth", "dataset": "Synth"}))
    mapping = {"table": "synth/table1",
               "methods": {"Recolor": {"method": "recolor", "setting": ["Moving", "Pasting", "Jaw", ""]}},
               "metrics": {"CLIP": {"metric": "clip_t", "region": "all"}, "Time": {"metric": "cost_infer_s"}},
               "settings": {"Moving": {"category": "move"}, "Pasting": {"category": ["paste"]},
                            "Jaw": {"region": "17pt"}}}
    (d / "table1.compare.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    r = {(x["setting"], x["paper_metric"]): x for x in compare(run, "synth/table1", root=tmp_path / "paper").frame.to_dict("records")}
    even, odd = CLIP_T[0::2], CLIP_T[1::2]  # sample i has category move (i even) / paste (i odd)
    assert r[("Moving", "CLIP")]["n"] == len(even) and r[("Moving", "CLIP")]["ours_mean"] == pytest.approx(even.mean(), rel=1e-12)
    assert r[("Pasting", "CLIP")]["n"] == len(odd) and r[("Pasting", "CLIP")]["ours_mean"] == pytest.approx(odd.mean(), rel=1e-12)
    assert r[("All", "CLIP")]["why"] == "method mapped for setting 'Moving' / 'Pasting' / 'Jaw' / '' only"
    assert r[("Jaw", "CLIP")]["status"] == "not in this run" and r[("Jaw", "CLIP")]["region"] == "17pt"
    assert r[("Jaw", "CLIP")]["why"] == "the run has no clip_t/17pt of recolor"
    # write_job's edits take 0.2 s of inference each
    assert r[("", "Time")]["status"] == "compared" and r[("", "Time")]["ours_mean"] == pytest.approx(0.2)
    mapping["settings"]["Nowhere"] = {"category": "move"}
    (d / "table1.compare.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    with pytest.raises(CompareError, match="setting\\(s\\) 'Nowhere' are not in synth/table1"):
        compare(run, "synth/table1", root=tmp_path / "paper")
    mapping["settings"] = {"Moving": {"category": 3}}
    (d / "table1.compare.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    with pytest.raises(CompareError, match="setting 'Moving': category must be"):
        compare(run, "synth/table1", root=tmp_path / "paper")
    # a setting's parameter values and a region for named metrics only: their clashes and strays refused
    mapping["settings"] = {"Jaw": {"region": {"Nope": "17pt"}}}
    (d / "table1.compare.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    with pytest.raises(CompareError, match="setting 'Jaw': region names metric\\(s\\) 'Nope'"):
        compare(run, "synth/table1", root=tmp_path / "paper")
    mapping["settings"] = {"Jaw": {"params": {"strength": 0.5}}}
    mapping["methods"]["Recolor"]["params"] = {"strength": 1.0}
    (d / "table1.compare.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    with pytest.raises(CompareError, match="method 'Recolor' and setting 'Jaw' select different values of strength"):
        compare(run, "synth/table1", root=tmp_path / "paper")
    mapping["methods"]["Recolor"]["params"] = {}
    mapping["settings"] = {"Jaw": {"params": {"strength": 0.5}, "region": {"CLIP": "all"}}}
    (d / "table1.compare.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    r = {(x["setting"], x["paper_metric"]): x for x in compare(run, "synth/table1", root=tmp_path / "paper").frame.to_dict("records")}
    assert r[("Jaw", "CLIP")]["region"] == "all" and r[("Jaw", "CLIP")]["params"] == "strength=0.5"
    assert r[("Jaw", "CLIP")]["why"] == "the run has no clip_t/all of recolor with strength=0.5"
