"""Report files a script reads: every CSV loads with a plain ``pandas.read_csv`` (its caption in the
``<stem>.caption.txt`` sidecar), ``table_by_category`` also in LaTeX, and edits.md shows the input
conversion notes of edits.parquet when the column is there (and works without it)."""

from __future__ import annotations


import pandas as pd
import pytest

from harness.aggregate import edit_summary, load_run
from harness.report import write_report

from .test_report import three_methods, write_job

CSVS = ("table.csv", "table_by_category.csv", "summary.csv", "summary_by_category.csv")


def test_every_csv_reads_with_plain_read_csv_and_has_a_caption_sidecar(tmp_path):
    run = tmp_path / "run"
    three_methods(run)
    files = write_report(run, tmp_path / "out", cost_columns=False)
    for name in CSVS:
        text = files[name].read_text()
        assert not any(line.startswith("#") for line in text.splitlines()), name
        cap = files[name.replace(".csv", ".caption.txt")]
        assert cap == files[name].with_name(name.replace(".csv", ".caption.txt")) and cap.is_file()
        assert "Protocol: default." in cap.read_text() and "95% CI" in cap.read_text()
    t = pd.read_csv(files["table.csv"])
    assert list(t["method"]) == ["a", "b", "c"] and list(t["n"]) == [4, 4, 3]
    assert pd.api.types.is_float_dtype(t["l1 [unedited] mean"])
    # hand-computed means: a l1 (0.10 + 0.12 + 0.11 + 0.09) / 4, b l1 over its 3 finite values, c psnr over 3
    assert t["l1 [unedited] mean"].tolist() == pytest.approx([0.105, 0.2, 0.31], rel=1e-12)
    assert t["psnr [unedited] mean"].tolist() == pytest.approx([21.5, 31.5, 41.0], rel=1e-12)
    assert t["l1 [unedited] n_nan"].tolist() == [0, 1, 0]
    s = pd.read_csv(files["summary.csv"])
    assert len(s) == 6 and set(s["metric"]) == {"l1", "psnr"}
    assert s.set_index(["method", "metric"]).loc[("b", "l1"), "n"] == 3
    c = pd.read_csv(files["table_by_category.csv"])
    assert c.set_index(["category", "method"]).loc[("remove", "a"), "l1 [unedited] mean"] == pytest.approx(0.10)
    sc = pd.read_csv(files["summary_by_category.csv"])
    assert set(sc["category"]) == {"add", "remove"} and len(sc) == 2 * 3 * 2
    assert files["table.caption.txt"].read_text().splitlines()[0] == \
        "Results: mean [95% bootstrap CI] per method and parameter point"
    assert files["table_by_category.caption.txt"].read_text().startswith("Results per edit category")


def test_empty_table_csv_still_reads(tmp_path):
    run = tmp_path / "run"
    write_job(run, "j", "a", {}, {("l1", "all"): [0.1]}, statuses=["skipped"])
    files = write_report(run, tmp_path / "out", cost_columns=False)
    t = pd.read_csv(files["table.csv"])
    assert list(t.columns) == ["method", "params", "n"] and len(t) == 0


def test_table_by_category_in_latex(tmp_path):
    run = tmp_path / "run"
    three_methods(run)
    out = tmp_path / "out"
    files = write_report(run, out, cost_columns=False)
    tex = files["table_by_category.tex"].read_text()
    assert files["table_by_category.tex"] == out / "table_by_category.tex"
    assert "\\label{tab:results_by_category}" in tex and "\\label{tab:results}" in files["table.tex"].read_text()
    assert "Category & Method & Params & $n$ & l1 [unedited] $\\downarrow$ & psnr [unedited] $\\uparrow$ \\\\" in tex
    rows = [ln for ln in tex.splitlines() if ln.startswith(("add &", "remove &"))]
    assert len(rows) == 6
    # add: l1 a 0.11 best, b 0.21 second, c 0.305; psnr c 40.5 best, b 30.5 second (all n 2)
    add = {ln.split(" & ")[1]: ln.split(" & ") for ln in rows if ln.startswith("add &")}
    assert add["a"][4].startswith("\\textbf{0.1100") and add["b"][4].startswith("\\underline{0.2100")
    assert add["c"][5].startswith("\\textbf{40.50") and add["b"][5].startswith("\\underline{30.50")
    assert "Results per edit category" in tex and "within each category" in tex
    # a later report without categories removes the stale per-category files
    files = write_report(run, out, per_category=False, cost_columns=False)
    for name in ("table_by_category.tex", "table_by_category.csv", "table_by_category.caption.txt",
                 "summary_by_category.csv", "summary_by_category.caption.txt", "table_by_category.md"):
        assert not (out / name).exists(), name
    assert (out / "table.caption.txt").is_file() and (out / "summary.caption.txt").is_file()


def _with_notes(run, notes: list) -> None:
    write_job(run, "j_a", "a", {}, {("l1", "all"): [0.1] * len(notes)})
    p = run / "jobs" / "j_a" / "edits.parquet"
    e = pd.read_parquet(p)
    e["notes"] = pd.Series(notes, dtype=object)
    e.to_parquet(p, index=False)
    write_job(run, "j_b", "b", {}, {("l1", "all"): [0.2] * len(notes)})  # an old job: no notes column


def test_edits_md_shows_input_notes(tmp_path):
    run = tmp_path / "run"
    _with_notes(run, ["source: EXIF rotation applied (orientation 6); source: 16-bit reduced to 8 bits", None,
                      "source: EXIF rotation applied (orientation 6)", ""])
    _, edits = load_run(run)
    es = edit_summary(edits).set_index("method")
    assert es.loc["a", "n_noted"] == 2 and es.loc["b", "n_noted"] == 0
    assert es.loc["a", "notes"] == ("source: 16-bit reduced to 8 bits (x1: s00); "
                                    "source: EXIF rotation applied (orientation 6) (x2: s00, s02)")
    assert es.loc["b", "notes"] == ""
    md = write_report(run, tmp_path / "out", cost_columns=False)["edits.md"].read_text()
    assert "| Method | Params | n | ok | skipped | failed | prep s | infer s | peak memory | edit flags | input notes |" in md
    assert "| a | — | 4 | 4 | 0 | 0 | 0.5000 | 2.500 | 4.000 MiB | resized: 1 | 2 |" in md
    assert "| b | — | 4 | 4 | 0 | 0 | 0.5000 | 2.500 | 4.000 MiB | resized: 1 | — |" in md
    section = md.split("## Input conversion notes", 1)[1]
    assert section.strip().splitlines() == [
        "- a / —: source: 16-bit reduced to 8 bits (x1: s00); source: EXIF rotation applied (orientation 6) (x2: s00, s02)"]


def test_edits_md_notes_name_at_most_five_samples(tmp_path):
    run = tmp_path / "run"
    _with_notes(run, ["mask: soft values thresholded at 0.5"] * 7)
    md = write_report(run, tmp_path / "out", cost_columns=False)["edits.md"].read_text()
    assert "- a / —: mask: soft values thresholded at 0.5 (x7: s00, s01, s02, s03, s04, +2 more)" in md


def test_edits_md_without_notes_column(tmp_path):
    run = tmp_path / "run"
    three_methods(run)
    _, edits = load_run(run)
    assert "notes" not in edits.columns
    md = write_report(run, tmp_path / "out", cost_columns=False)["edits.md"].read_text()
    assert "input notes" not in md and "Input conversion notes" not in md
    assert "| c | — | 4 | 3 | 1 | 0 | 0.5000 | 2.000 | 4.000 MiB | resized: 1 |" in md
    es = edit_summary(edits)
    assert (es["n_noted"] == 0).all() and (es["notes"] == "").all()


def test_notes_separator_is_the_runners():
    """edits.parquet's notes are joined by the runner; the report splits them the same way."""
    from harness import aggregate, runner

    assert aggregate.NOTES_SEP == runner.NOTES_SEP
