"""The report puts the published tables a run names (config ``paper_tables``) side by side with
it, and draws CLIP-I against CLIP-T per category when both are scored (harness/report.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.aggregate import load_run, summarize
from harness.paper import load_table
from harness.report import run_paper_tables, write_report
from harness.runner import EDIT_COLUMNS, SCORE_COLUMNS

N = 12
CATS = ("add", "change", "remove")
HIB = {"l1": False, "l2": False, "clip_i": True, "clip_t": True}


def write_job(run_dir: Path, method: str, paper_tables, seed: int) -> None:
    """A job scored under protocol zone (l1, l2, clip_i, clip_t; three categories) whose
    manifest's resolved config names ``paper_tables``."""
    rng = np.random.default_rng(seed)
    job = f"{method}-synth"
    base = [dict(run=run_dir.name, job=job, method=method, method_version="1", params="{}", dataset="zone",
                 sample_id=f"s{i:02d}", category=CATS[i % 3], seed=0, edit_key=f"{job}-{i}") for i in range(N)]
    edits = [{**b, "status": "ok", "reason": None, "flags": "", "notes": "", "prep_seconds": 0.1,
              "infer_seconds": 0.2, "peak_memory_bytes": 1.0, "model_revision": None} for b in base]
    centre = {"l1": 0.09, "l2": 0.03, "clip_i": 0.9, "clip_t": 0.29}
    scores = [{**b, "metric": m, "region": "all", "value": float(c + 0.01 * rng.standard_normal()), "flag": None,
               "protocol": "zone", "weights": "synthetic", "region_rule": "area", "higher_is_better": HIB[m],
               "mean_floor": math.nan}
              for m, c in centre.items() for b in base]
    d = run_dir / "jobs" / job
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(scores, columns=SCORE_COLUMNS).to_parquet(d / "scores.parquet", index=False)
    pd.DataFrame(edits, columns=EDIT_COLUMNS).to_parquet(d / "edits.parquet", index=False)
    (d / "manifest.json").write_text(json.dumps({"job": job, "config": {"paper_tables": paper_tables}}))


def test_report_compares_the_named_paper_tables(tmp_path):
    run = tmp_path / "zone_run"
    write_job(run, "instruct_pix2pix", ["zone/table1", "nopaper/table9"], 0)
    write_job(run, "magicbrush", ["zone/table1"], 1)
    assert run_paper_tables(run) == ["zone/table1", "nopaper/table9"]
    out = tmp_path / "report"
    files = write_report(run, out)
    got = pd.read_csv(out / "compare-zone-table1" / "compare.csv")
    paper = load_table("zone/table1")
    assert len(got) == len(paper)
    # every InstructPix2Pix and MagicBrush number of the paper is compared (L1, L2, LPIPS is not
    # scored here, CLIP-I, CLIP-T), with the same mean the run's summary gives
    s = summarize(load_run(run)[0], by=("method", "params"))
    done = got[got["status"] == "compared"]
    assert sorted(zip(done["paper_method"], done["paper_metric"])) == sorted(
        (m, k) for m in ("InstructPix2Pix", "MagicBrush") for k in ("CLIP-I", "CLIP-T", "L1", "L2"))
    for r in done.itertuples():
        ours = s[(s.method == r.method) & (s.metric == r.metric)].iloc[0]
        # compare.csv prints 12 significant digits
        assert r.ours_mean == pytest.approx(ours["mean"], rel=1e-10)
        assert r.delta == pytest.approx(ours["mean"] - r.published, rel=1e-9)
    lpips = got[(got["paper_method"] == "InstructPix2Pix") & (got["paper_metric"] == "LPIPS")].iloc[0]
    assert lpips["status"] == "not in this run" and "no lpips/all of instruct_pix2pix" in lpips["why"]
    table_md = (out / "table.md").read_text()
    assert "## Published tables side by side" in table_md
    assert f"- zone/table1: 8 of {len(paper)} published numbers compared" in table_md
    assert "- nopaper/table9: not compared:" in table_md
    assert "compare-zone-table1/compare.md" in files
    html = (out / "index.html").read_text()
    assert 'data-file="compare-zone-table1/compare.md"' in html and "compare-zone-table1/compare.html" in html
    # both CLIP metrics and three categories: the ZONE Figure 6 trade-off plot is drawn and listed
    assert (out / "plot_clip_i_vs_clip_t.png").is_file() and "plot_clip_i_vs_clip_t.png" in html
    assert "- plot_clip_i_vs_clip_t.png" in table_md
    # explicit tables override the jobs' list; an empty list compares nothing
    out2 = tmp_path / "report2"
    write_report(run, out2, paper_tables=[])
    assert not (out2 / "compare-zone-table1").exists() and "Published tables" not in (out2 / "table.md").read_text()


def test_report_without_paper_tables_or_manifest(tmp_path):
    run = tmp_path / "r"
    write_job(run, "instruct_pix2pix", [], 0)
    (run / "jobs" / "instruct_pix2pix-synth" / "manifest.json").unlink()
    assert run_paper_tables(run) == []
    out = tmp_path / "out"
    write_report(run, out, per_category=False)
    assert not list(out.glob("compare-*")) and not (out / "plot_clip_i_vs_clip_t.png").exists()
