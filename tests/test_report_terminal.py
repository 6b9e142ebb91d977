"""The compact terminal table (report/table_terminal.txt, ``files["terminal"]``): the protocol's
metrics on the whole image, no cost or reference columns, means with * / + marks; the rest stays
in the files."""

from __future__ import annotations

import re

from harness.report import MAX_TERMINAL_COLUMNS, write_report

from .test_report import write_job


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _default_like(run, method: str, base: float, n: int = 3, **kw) -> None:
    vals = {("l1", "all"): [base] * n, ("l1", "edited"): [2 * base] * n, ("l1", "unedited"): [base / 2] * n,
            ("psnr", "all"): [40 - 100 * base] * n, ("psnr", "edited"): [30.0] * n, ("psnr", "unedited"): [35.0] * n,
            ("landmark_mse", "68pt"): [10 * base] * n, ("landmark_mse", "17pt"): [20 * base] * n,
            ("landmark_mse_noedit", "68pt"): [9.0] * n, ("landmark_mse_noedit", "17pt"): [9.0] * n}
    write_job(run, f"j_{method}", method, {}, vals, **kw)


def test_terminal_table_main_columns_and_marks(tmp_path):
    run = tmp_path / "run"
    _default_like(run, "identity", 0.0)
    _default_like(run, "a", 0.1)
    _default_like(run, "b", 0.2)
    _default_like(run, "c", 0.3)
    files = write_report(run, tmp_path / "out")  # cost columns on: they stay out of the terminal table
    term = files["terminal"]
    assert term == tmp_path / "out" / "table_terminal.txt"
    lines = term.read_text().splitlines()
    assert lines[0] == "Results: mean per method and parameter point (run r1; dataset synth; protocol default)"
    # l1 and psnr on the whole image; landmark_mse has no whole-image region: both of its own
    assert _cells(lines[1]) == ["Method", "Params", "n", "l1 [all] ↓", "landmark_mse [17pt] ↓",
                                "landmark_mse [68pt] ↓", "psnr [all] ↑"]
    body = {(_cells(ln)[0]): _cells(ln) for ln in lines[2:6]}
    # hand-computed: l1 = base, landmark 20 base / 10 base (lower better), psnr 40 - 100 base (higher better);
    # identity is a reference (no mark); a best everywhere, b second
    assert body["identity"] == ["identity", "-", "3", "0", "0", "0", "40.00"]
    assert body["a"] == ["a", "-", "3", "0.1000*", "2.000*", "1.000*", "30.00*"]
    assert body["b"] == ["b", "-", "3", "0.2000+", "4.000+", "2.000+", "20.00+"]
    assert body["c"] == ["c", "-", "3", "0.3000", "6.000", "3.000", "10.00"]
    text = "\n".join(lines)
    assert "cost_" not in text and "noedit" not in text and "[edited]" not in text and "[0." not in text
    # every column left out is counted: 4 other regions + 2 noedit + 3 costs
    assert "95% CIs; 9 more column(s) (other regions, costs, reference columns), per-category tables: " \
           "table.md, table.csv, table_by_category.md." in text
    # the Markdown table still holds everything
    md = files["table.md"].read_text()
    assert "l1 [edited] ↓" in md and "cost_infer_s [all] ↓" in md and "landmark_mse_noedit [68pt] ↓" in md


def test_terminal_table_protocol_without_whole_image(tmp_path):
    """PartEdit-like protocols score only the unedited region: that region is shown."""
    run = tmp_path / "run"
    for m, v in (("a", 25.0), ("b", 20.0)):
        write_job(run, f"j_{m}", m, {"strength": 1}, {("psnr", "unedited"): [v] * 2, ("ssim", "unedited"): [0.9] * 2},
                  protocol="partedit")
    files = write_report(run, tmp_path / "out", per_category=False, cost_columns=False)
    lines = files["terminal"].read_text().splitlines()
    assert "protocol partedit" in lines[0]
    assert _cells(lines[1]) == ["Method", "Params", "n", "psnr [unedited] ↑", "ssim [unedited] ↓"]
    # one parameter point per method: the Params column says so (its parameters are in table.md)
    assert _cells(lines[2]) == ["a", "-", "2", "25.00*", "0.9000*"]
    assert _cells(lines[3]) == ["b", "-", "2", "20.00", "0.9000*"]
    assert "strength=1" in files["table.md"].read_text()
    assert lines[-1] == "95% CIs: table.md, table.csv."


def test_terminal_table_caps_columns_and_lists_unscored(tmp_path):
    run = tmp_path / "run"
    metrics = [f"m{k:02d}" for k in range(MAX_TERMINAL_COLUMNS + 3)]
    write_job(run, "j_a", "a", {}, {(m, "all"): [0.5, 0.6] for m in metrics})
    write_job(run, "j_s", "sdedit", {"model": "x/y", "steps": 50}, {("m00", "all"): [0.1, 0.1]},
              statuses=["skipped", "skipped"])
    for strength in (0.5, 0.8):  # a swept method: its points are counted, not spelled out
        write_job(run, f"j_p{strength}", "pnp", {"strength": strength}, {("m00", "all"): [0.1]}, statuses=["failed"])
    files = write_report(run, tmp_path / "out", per_category=False, cost_columns=False)
    lines = files["terminal"].read_text().splitlines()
    assert _cells(lines[1])[3:] == [f"{m} [all] ↓" for m in metrics[:MAX_TERMINAL_COLUMNS]]
    assert "95% CIs; 3 more column(s)" in lines[-2]
    assert lines[-1] == "Not scored (every edit skipped or failed, reasons in table.md): pnp (2 parameter points), sdedit."


def test_terminal_table_without_scores(tmp_path):
    run = tmp_path / "run"
    write_job(run, "j", "a", {}, {("l1", "all"): [0.1]}, statuses=["failed"])
    files = write_report(run, tmp_path / "out")
    assert files["terminal"].read_text().splitlines()[1:] == [
        "No scores in these runs (no metric configured, or every edit skipped or failed).",
        "Not scored (every edit skipped or failed, reasons in table.md): a."]


def test_terminal_params_show_what_tells_a_methods_rows_apart():
    """ZONE carries ~45 parameters: the terminal shows only those that differ between a method's
    rows (a sweep's axis), '-' for a method with one point."""
    from harness.report import distinguishing_params

    rows = [{"method": "zone", "params": '{"beta": 0.0, "d0": 200, "use_sam": true}'},
            {"method": "zone", "params": '{"beta": 0.2, "d0": 200, "use_sam": true}'},
            {"method": "zone", "params": '{"beta": 0.2, "d0": 200, "use_sam": false}'},
            {"method": "sdedit", "params": '{"strength": 0.8, "steps": 50}'},
            {"method": "recolor", "params": '{"strength": 0.5}'},
            {"method": "recolor", "params": '{}'}]
    assert distinguishing_params(rows) == ["beta=0.0, use_sam=true", "beta=0.2, use_sam=true",
                                           "beta=0.2, use_sam=false", "-", "strength=0.5", "strength=null"]
