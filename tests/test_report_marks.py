"""Best / second-best marks: never on a reference row (identity, a declared reference), never in a
reference column (``*_noedit``), never on a value whose n is far below its column's (n < 90% of
the largest competing n); the caption says how marks were given. Synthetic tables, hand-computed
expected marks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from harness.report import MIN_N_PERCENT, write_report

from .test_report import _md_row, write_job

NAN = float("nan")


def _marks(md: str, method: str, n_keys: int = 2) -> list[str | None]:
    """The marks of a Markdown row: "best" (bold), "second" (underlined) or None per metric column."""
    cells = _md_row(md, method)[n_keys + 1:]
    return ["best" if c.startswith("**") else "second" if c.startswith("<u>") else None for c in cells]


def _terminal_marks(text: str, method: str) -> list[str | None]:
    row = next(line for line in text.splitlines() if line.split()[:1] == [method])
    cells = row.split()[3:]  # method, params ("-"), n, then one value per column
    return ["best" if c.endswith("*") else "second" if c.endswith("+") else None for c in cells]


def _four(run_dir: Path, method: str, l1: list[float], psnr: list[float], **kw) -> None:
    write_job(run_dir, f"j_{method}", method, {}, {("l1", "all"): l1, ("psnr", "all"): psnr}, **kw)


def test_identity_is_a_reference_row_and_never_marked(tmp_path):
    run = tmp_path / "run"
    # identity is best by value in both columns (l1 0, PSNR inf) but is the no-edit baseline
    _four(run, "identity", [0.0] * 4, [math.inf] * 4)
    _four(run, "a", [0.10, 0.12, 0.11, 0.09], [20.0, 21.0, 22.0, 23.0])  # l1 0.105, psnr 21.5
    _four(run, "b", [0.20, 0.22, 0.21, 0.19], [30.0, 31.0, 32.0, 33.0])  # l1 0.205, psnr 31.5
    _four(run, "c", [0.30, 0.31, 0.32, 0.33], [40.0, 41.0, 42.0, 43.0])  # l1 0.315, psnr 41.5
    files = write_report(run, tmp_path / "out", per_category=False, cost_columns=False)
    md = files["table.md"].read_text()
    # l1 lower is better: a best, b second; psnr higher is better: c best, b second
    assert _marks(md, "a") == ["best", None]
    assert _marks(md, "b") == ["second", "second"]
    assert _marks(md, "c") == [None, "best"]
    assert _marks(md, "identity") == [None, None]
    assert "Left out of the marks here: identity (reference method)." in md
    assert "Not marked: reference rows (identity: the source unchanged, a no-edit baseline)" in md
    tex = files["table.tex"].read_text()
    ident = next(line for line in tex.splitlines() if line.startswith("identity &"))
    assert "\\textbf" not in ident and "\\underline" not in ident
    assert tex.count("\\textbf{") == 2 and tex.count("\\underline{") == 2
    term = files["terminal"].read_text()
    assert _terminal_marks(term, "identity") == [None, None]
    assert _terminal_marks(term, "a") == ["best", None] and _terminal_marks(term, "c") == [None, "best"]


def test_declared_reference_method(tmp_path):
    """A folder of the unedited sources scored under another name is declared a reference."""
    run = tmp_path / "run"
    _four(run, "sources", [0.0] * 4, [math.inf] * 4)
    _four(run, "a", [0.10] * 4, [20.0] * 4)
    _four(run, "b", [0.20] * 4, [30.0] * 4)
    _four(run, "c", [0.30] * 4, [40.0] * 4)
    md = write_report(run, tmp_path / "plain", per_category=False, cost_columns=False)["table.md"].read_text()
    assert _marks(md, "sources") == ["best", "best"]  # not a known reference: it competes
    md = write_report(run, tmp_path / "out", per_category=False, cost_columns=False,
                      reference_methods=["sources"])["table.md"].read_text()
    assert _marks(md, "sources") == [None, None]
    assert _marks(md, "a") == ["best", None] and _marks(md, "b") == ["second", "second"]
    assert _marks(md, "c") == [None, "best"]
    assert "sources: declared a reference for this report" in md and "sources (reference method)" in md


def test_noedit_reference_column_never_marked(tmp_path):
    run = tmp_path / "run"
    lmk = ("landmark_mse", "68pt")
    ref = ("landmark_mse_noedit", "68pt")
    for m, v, r in (("a", 2.0, 9.0), ("b", 3.0, 8.0), ("c", 4.0, 7.0)):
        write_job(run, f"j_{m}", m, {}, {lmk: [v] * 3, ref: [r] * 3})
    files = write_report(run, tmp_path / "out", per_category=False, cost_columns=False)
    md = files["table.md"].read_text()
    # columns: landmark_mse [68pt] (lower better: a best, b second), landmark_mse_noedit [68pt] (none)
    assert _marks(md, "a") == ["best", None]
    assert _marks(md, "b") == ["second", None]
    assert _marks(md, "c") == [None, None]
    assert "landmark_mse_noedit [68pt] (reference column)" in md
    assert "reference columns (*_noedit: no-edit upper bound, source vs target)" in md
    # the terminal table leaves the reference column out altogether
    head = files["terminal"].read_text().splitlines()[1]
    assert "landmark_mse [68pt] ↓" in head and "noedit" not in head


def test_value_over_far_fewer_samples_is_not_marked(tmp_path):
    """n >= 90% of the largest competing n competes (9 of 10: the boundary), 8 of 10 does not; the
    reference row's larger n does not count."""
    assert MIN_N_PERCENT == 90
    run = tmp_path / "run"
    ten = ["ok"] * 10
    write_job(run, "j_m8", "m8", {}, {("l1", "all"): [0.01] * 10}, statuses=["skipped"] * 2 + ["ok"] * 8)
    write_job(run, "j_m9", "m9", {}, {("l1", "all"): [NAN] + [0.02] * 9}, statuses=ten)  # one NaN: n 9
    write_job(run, "j_m10", "m10", {}, {("l1", "all"): [0.03] * 10}, statuses=ten)
    write_job(run, "j_m10b", "m10b", {}, {("l1", "all"): [0.04] * 10}, statuses=ten)
    write_job(run, "j_id", "identity", {}, {("l1", "all"): [0.0] * 20})  # n 20, a reference
    files = write_report(run, tmp_path / "out", per_category=False, cost_columns=False)
    md = files["table.md"].read_text()
    assert _marks(md, "m8") == [None]  # the smallest value, over 8 samples of 10
    assert _marks(md, "m9") == ["best"]
    assert _marks(md, "m10") == ["second"]
    assert _marks(md, "m10b") == [None]
    assert _marks(md, "identity") == [None]
    assert "m8 in l1 [all] (n 8 < 90% of 10)" in md and "m9 in l1" not in md
    assert "a value whose n is below 90% of the largest n of the competing rows of its column" in md
    cap = files["table.caption.txt"].read_text()
    assert "m8 in l1 [all] (n 8 < 90% of 10)" in cap


def test_marks_per_category_use_each_categorys_n(tmp_path):
    run = tmp_path / "run"
    cats = ["add", "add", "remove", "remove"]
    write_job(run, "j_a", "a", {}, {("l1", "all"): [0.10, 0.10, 0.30, 0.30]}, categories=cats)
    write_job(run, "j_b", "b", {}, {("l1", "all"): [0.20, 0.20, 0.05, 0.05]}, categories=cats,
              statuses=["ok", "ok", "ok", "skipped"])
    write_job(run, "j_c", "c", {}, {("l1", "all"): [0.30, 0.30, 0.40, 0.40]}, categories=cats)
    files = write_report(run, tmp_path / "out", cost_columns=False)
    md = files["table_by_category.md"].read_text()

    def row_marks(cat: str, method: str) -> str | None:
        for line in md.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[:2] == [cat, method]:
                c = cells[4]
                return "best" if c.startswith("**") else "second" if c.startswith("<u>") else None
        raise AssertionError((cat, method))

    # add: a 0.1, b 0.2, c 0.3, all n 2. remove: b's 0.05 rests on 1 sample of 2 and is out, so a (0.3)
    # is best and c (0.4) unmarked: a second best needs three competitors
    assert [row_marks("add", m) for m in "abc"] == ["best", "second", None]
    assert [row_marks("remove", m) for m in "abc"] == ["best", None, None]
    assert "best per column within each category" in md
    assert "remove / b in l1 [all] (n 1 < 90% of 2)" in md
    # the whole-table marks: b (n 3 of 4) is out there too
    top = files["table.md"].read_text()
    assert _marks(top, "a") == ["best"] and _marks(top, "b") == [None] and _marks(top, "c") == [None]


@pytest.mark.parametrize("n_runs", [1, 2])
def test_marks_caption_in_every_table_format(tmp_path, n_runs):
    for k in range(n_runs):
        _four(tmp_path / f"r{k}", "a", [0.1] * 4, [20.0] * 4, run=f"r{k}")
        _four(tmp_path / f"r{k}", "b", [0.2] * 4, [30.0] * 4, run=f"r{k}")
    files = write_report([tmp_path / f"r{k}" for k in range(n_runs)], tmp_path / "out")
    md = files["table.md"].read_text()
    # a wins l1 (lower), b wins psnr (higher), in each run's rows alike (one partition: the dataset)
    assert md.count("**0.1000") == n_runs and md.count("**30.00") == n_runs
    for name in ("table.md", "table.caption.txt", "table.tex", "table_by_category.md",
                 "table_by_category.caption.txt", "table_by_category.tex"):
        assert "best needs two competing values, second best three" in files[name].read_text(), name
    assert "Marks: best per column within each category in bold" in files["table_by_category.md"].read_text()
