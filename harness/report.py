"""Write a run's report: long summary, wide tables (Markdown, CSV, LaTeX), a compact terminal
table, edit status, plots.

``write_report`` is a pure, deterministic function of the jobs' tables: no timestamps,
a fixed bootstrap seed, stable ordering, PNGs without software metadata. Two calls on the
same inputs give byte-identical files.

Reading the CSV files: every CSV (``table.csv``, ``table_by_category.csv``, ``summary.csv``,
``summary_by_category.csv``) is a plain table, read with ``pandas.read_csv(path)``; its caption
(protocol, weights, region rule, CI, NaN counts, how best / second were marked) is the sidecar
text file of the same stem, ``<stem>.caption.txt`` (``table.caption.txt`` ...).

Best / second-best marks (:class:`Table`, rule stated in every caption): per column, among the
rows that compete. Not marked: the reference methods of :data:`REFERENCE_METHODS` (a no-edit
baseline is a bound, not a contestant), the reference metrics of
:data:`REFERENCE_METRIC_SUFFIXES` (quantities computed without the edit, the same for every
method), and a value whose n (samples in its mean) is below :data:`MIN_N_PERCENT` % of the
largest n of the competing rows of its column, within its dataset (and category).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .aggregate import (
    BOOTSTRAP_SEED,
    CI_LEVEL,
    COST_METRICS,
    N_RESAMPLES,
    SCORE_SORT,
    _concat,
    column_label,
    cost_rows,
    edit_summary,
    expand_params,
    format_params,
    load_run,
    metric_columns,
    params_sort_key,
    parse_params,
    summarize,
    swept_params,
)
from .fileio import save_bytes
from .plots import PlotResult, plot_bars, plot_clip_tradeoff, plot_metric_vs_param, safe_name

CSV_FLOAT = "%.12g"
CAPTION_SUFFIX = ".caption.txt"  # table.csv -> table.caption.txt: the CSV's caption, beside it

# ----------------------------------------------------------------------------------------------
# What competes for the best / second-best marks: the one place that says so.
# ----------------------------------------------------------------------------------------------
# Methods (as named in the tables' method column) that are references, not contestants. A
# method of another name that is a reference too (e.g. a `folder` of the unedited sources
# scored with `edit-harness score --name sources`) is passed to write_report(reference_methods=).
REFERENCE_METHODS: dict[str, str] = {
    "identity": "the source unchanged, a no-edit baseline",
}
# Metrics whose name ends with one of these are reference quantities computed without the edit
# (the same for every method on the same samples): their columns get no marks.
REFERENCE_METRIC_SUFFIXES: dict[str, str] = {
    "_noedit": "no-edit upper bound, source vs target",
}
# A value competes only when its n (values in its mean) is at least this percentage of the
# largest n among the competing rows of its column (within its dataset, and category): a mean
# over far fewer samples (a method that skipped or failed many) is not comparable.
MIN_N_PERCENT = 90
MAX_LISTED_EXCLUSIONS = 12  # the caption names this many left-out rows / cells, then counts the rest
# The terminal table: at most this many metric columns (the rest are in table.md / table.csv).
MAX_TERMINAL_COLUMNS = 8
TERMINAL_MARKS = {"best": "*", "second": "+"}


def is_reference_metric(metric: str) -> bool:
    return any(str(metric).endswith(suf) for suf in REFERENCE_METRIC_SUFFIXES)


def is_cost_metric(metric: str) -> bool:
    return str(metric) in {m for m, _, _ in COST_METRICS}


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; inf as "inf", NaN/None as "n/a"."""
    if v is None:
        return "n/a"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    s = f"{x:#.{digits}g}"
    if "e" in s:
        mant, exp = s.split("e")
        return f"{mant}e{int(exp)}"
    return s


def fmt_ci(mean: float, lo: float, hi: float) -> str:
    """``"0.1234 [0.1100, 0.1350]"``; non-finite means alone ("inf", "n/a")."""
    if mean is None or not np.isfinite(mean):
        return fmt(mean)
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt(mean)
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def fmt_bytes(b: float) -> str:
    if b is None or not np.isfinite(b):
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{fmt(b / scale)} {unit}"
    return f"{int(b)} B"


def arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


def md_escape(s: Any) -> str:
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_TEX = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "↑": r"$\uparrow$", "↓": r"$\downarrow$", "→": r"$\rightarrow$", "…": r"\ldots{}",
}


def tex_escape(s: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def rank_marks(values: Sequence[float], higher_is_better: bool) -> list[str | None]:
    """"best" / "second" / None per value, ignoring NaN; ties share a mark.

    Best is marked when at least two values are present, second when at least three.
    """
    vals = [float(v) if v is not None else math.nan for v in values]
    present = [v for v in vals if not math.isnan(v)]
    out: list[str | None] = [None] * len(vals)
    if len(present) < 2:
        return out
    distinct = sorted(set(present), reverse=higher_is_better)
    best = distinct[0]
    second = distinct[1] if len(distinct) > 1 and len(present) >= 3 else None
    for i, v in enumerate(vals):
        if math.isnan(v):
            continue
        if v == best:
            out[i] = "best"
        elif second is not None and v == second:
            out[i] = "second"
    return out


# ----------------------------------------------------------------------------------------------
# ordering and table model
# ----------------------------------------------------------------------------------------------
def _group_keys(scores: pd.DataFrame, edits: pd.DataFrame) -> list[str]:
    """method and params, preceded by run / dataset when the inputs hold several."""
    return [c for c in ("run", "dataset") if len(_distinct(scores, edits, c)) > 1] + ["method", "params"]


def _sort_value(col: str, v: Any) -> tuple:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return (1, ())
    if col == "params":
        return (0, params_sort_key(v))
    return (0, str(v))


def _order(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Rows sorted by keys, params in natural order (numbers by value); stable."""
    if len(df) == 0:
        return df.reset_index(drop=True)
    recs = df[list(keys)].to_dict("records")
    idx = sorted(range(len(df)), key=lambda i: tuple(_sort_value(k, recs[i][k]) for k in keys))
    return df.iloc[idx].reset_index(drop=True)


class Table:
    """A wide table model: rows = groups, columns = (metric, region) pairs, cells = stats.

    ``marks[(row index, column)]`` is "best", "second" or None, given per column within each
    partition (e.g. dataset) among the competing values only (see the module docstring):
    ``left_out`` records, for the caption, every row, column or cell left out of a contest that
    had competitors, and why.
    """

    def __init__(self, summary: pd.DataFrame, row_keys: Sequence[str], partition: Sequence[str],
                 reference_methods: Sequence[str] = tuple(REFERENCE_METHODS)):
        self.row_keys = list(row_keys)
        self.partition = list(partition)
        self.summary = summary
        self.reference_methods = set(reference_methods)
        self.columns = metric_columns(summary) if len(summary) else []
        self.rows = summary[self.row_keys].drop_duplicates().to_dict("records") if len(summary) else []
        self.cells: dict[tuple, dict[str, Any]] = {}
        for r in summary.to_dict("records"):
            self.cells[(self._rk(r), r["metric"], r["region"])] = r
        self.hib = {}
        for (m, reg) in self.columns:
            d = summary[(summary["metric"] == m) & (summary["region"] == reg)]
            self.hib[(m, reg)] = bool(d["higher_is_better"].iloc[0])
        self.marks: dict[tuple, str | None] = {}
        self.reference_rows = [i for i, row in enumerate(self.rows) if self.is_reference_row(row)]
        self.reference_columns = [c for c in self.columns if is_reference_metric(c[0])]
        # (row index, column, n, largest competing n) of the values left out for a small n
        self.low_n: list[tuple[int, tuple[str, str], int, int]] = []
        parts: dict[tuple, list[int]] = {}
        for i, row in enumerate(self.rows):
            parts.setdefault(tuple(str(row[p]) for p in self.partition), []).append(i)
        for col in self.columns:
            for members in parts.values():
                for i, mk in self._contest(col, members).items():
                    self.marks[(i, col)] = mk

    def is_reference_row(self, row: dict[str, Any]) -> bool:
        return str(row.get("method")) in self.reference_methods

    def _contest(self, col: tuple[str, str], members: list[int]) -> dict[int, str | None]:
        """Marks of one column within one partition: reference rows and columns and values over
        far fewer samples do not compete; rank_marks ranks the rest."""
        out: dict[int, str | None] = {i: None for i in members}
        if col in self.reference_columns:
            return out
        cand = [i for i in members if i not in self.reference_rows and self.cell(self.rows[i], col)]
        ns = {i: int(self.cell(self.rows[i], col).get("n", 0)) for i in cand}
        top = max(ns.values(), default=0)
        # integer form of n >= MIN_N_PERCENT / 100 * top: exact, no rounding at the threshold
        eligible = [i for i in cand if 100 * ns[i] >= MIN_N_PERCENT * top]
        for i in cand:
            if i not in eligible and ns[i] > 0:
                self.low_n.append((i, col, ns[i], top))
        vals = [self.cell(self.rows[i], col).get("mean", math.nan) for i in eligible]
        for i, mk in zip(eligible, rank_marks(vals, self.hib[col])):
            out[i] = mk
        return out

    def _rk(self, r: dict[str, Any]) -> tuple:
        return tuple(str(r[k]) for k in self.row_keys)

    def cell(self, row: dict[str, Any], col: tuple[str, str]) -> dict[str, Any]:
        return self.cells.get((self._rk(row), col[0], col[1]), {})

    def n(self, row: dict[str, Any], columns: Sequence[tuple[str, str]] | None = None) -> int:
        cols = self.columns if columns is None else columns
        tot = [c["n"] + c["n_nan"] for col in cols if (c := self.cell(row, col))]
        return int(max(tot)) if tot else 0

    def header(self, col: tuple[str, str]) -> str:
        return f"{column_label(*col)} {arrow(self.hib[col])}"

    def row_name(self, i: int) -> str:
        row = self.rows[i]
        return " / ".join(format_params(row[k], empty="—") if k == "params" else str(row[k])
                          for k in self.row_keys if k != "params" or format_params(row[k], empty=""))

    def marks_caption(self) -> list[str]:
        """Caption lines saying how the marks were given, and what was left out of them here."""
        scope = {(): "", ("dataset",): " within each dataset", ("category",): " within each category",
                 ("dataset", "category"): " within each dataset and category"}.get(
            tuple(self.partition), " within each " + " and ".join(self.partition))
        refs = "; ".join(f"{m}: {REFERENCE_METHODS.get(m, 'declared a reference for this report')}"
                         for m in sorted(self.reference_methods))
        ref_cols = "; ".join(f"*{k}: {v}" for k, v in REFERENCE_METRIC_SUFFIXES.items())
        lines = [f"Marks: best per column{scope} in bold, second best underlined, by each metric's direction "
                 f"(↑ higher is better, ↓ lower is better); NaN ignored; best needs two competing values, "
                 f"second best three. Not marked: reference rows ({refs}), reference columns ({ref_cols}), "
                 f"and a value whose n is below {MIN_N_PERCENT}% of the largest n of the competing rows of its "
                 f"column{scope} (a mean over far fewer samples is not comparable)."]
        items = [f"{m} (reference method)" for m in sorted({str(self.rows[i]["method"]) for i in self.reference_rows})]
        items += [f"{column_label(*c)} (reference column)" for c in self.reference_columns]
        items += [f"{self.row_name(i)} in {column_label(*c)} (n {n} < {MIN_N_PERCENT}% of {top})"
                  for i, c, n, top in self.low_n]
        if items:
            shown = items[:MAX_LISTED_EXCLUSIONS]
            more = len(items) - len(shown)
            lines.append("Left out of the marks here: " + "; ".join(shown)
                         + (f"; and {more} more" if more else "") + ".")
        return lines


def _key_title(k: str) -> str:
    return {"run": "Run", "dataset": "Dataset", "method": "Method", "params": "Params", "category": "Category"}.get(k, k)


# ----------------------------------------------------------------------------------------------
# caption
# ----------------------------------------------------------------------------------------------
def _parts(text: str) -> list[str]:
    """The "; "-separated phrases of a weights or region-rule text, in order, without repeats."""
    return list(dict.fromkeys(p.strip() for p in str(text).split("; ") if p.strip()))


def _metric_info(summary: pd.DataFrame) -> dict[str, dict[str, str]]:
    info: dict[str, dict[str, str]] = {}
    for m in sorted({str(x) for x in summary["metric"]}) if len(summary) else []:
        d = summary[summary["metric"] == m]

        def join(col: str) -> str:
            # in the order the metric states them (its own order reads best), each phrase once
            return "; ".join(dict.fromkeys(p for v in d[col] for p in _parts(v)))

        info[m] = {"weights": join("weights"), "region_rule": join("region_rule"), "protocol": join("protocol"),
                   "direction": arrow(bool(d["higher_is_better"].iloc[0]))}
    return info


def _nan_totals(summary: pd.DataFrame) -> list[str]:
    """Per column: total NaN values excluded, with their flags."""
    out = []
    if not len(summary):
        return out
    for (m, r) in metric_columns(summary):
        d = summary[(summary["metric"] == m) & (summary["region"] == r)]
        nn = int(d["n_nan"].sum())
        if nn:
            flags: dict[str, int] = {}
            for f in d["flags"]:
                for part in filter(None, str(f).split(", ")):
                    k, _, c = part.rpartition(": ")
                    flags[k] = flags.get(k, 0) + int(c)
            fl = ", ".join(f"{k}: {v}" for k, v in sorted(flags.items()))
            out.append(f"{column_label(m, r)}: {nn} NaN" + (f" (flags {fl})" if fl else ""))
    return out


def _distinct(scores: pd.DataFrame, edits: pd.DataFrame, col: str) -> list[str]:
    vals: set[str] = set()
    for df in (scores, edits):
        if col in df.columns and len(df):
            vals |= {str(v) for v in df[col].dropna().unique()}
    return sorted(vals)


def _convention_lines(info: dict[str, dict[str, str]]) -> list[str]:
    """The region rule and the conventions that define each metric's numbers (reference image,
    SSIM border, edit crop, image decoding, scaling: the suite writes them after the region rule);
    the phrases every scored metric shares are stated once."""
    rules = sorted({i["region_rule"] for i in info.values()})
    if len(rules) == 1:
        return [f"Region rule: {rules[0]}."]
    if not rules:
        return []
    parts = {m: _parts(i["region_rule"]) for m, i in info.items()}
    measured = [m for m, i in info.items() if i["protocol"] != "runner"]  # not the cost columns
    common = [p for p in parts[measured[0]] if all(p in parts[m] for m in measured)] if len(measured) > 1 else []
    out = []
    if common:
        out.append(f"Conventions of every metric: {'; '.join(common)}.")
    out.append("Region rule and conventions per metric:")
    for m in info:
        own = [p for p in parts[m] if m not in measured or p not in common]
        out.append(f"  {m} -> {'; '.join(own) or 'as above'}")
    return out


def caption_lines(scores: pd.DataFrame, edits: pd.DataFrame, summary: pd.DataFrame, title: str,
                  marks: Sequence[str] = ()) -> list[str]:
    """The header block every table carries, as plain-text lines (first line = title); ``marks``
    (:meth:`Table.marks_caption`) closes it."""
    lines = [title]
    runs = _distinct(scores, edits, "run")
    datasets = _distinct(scores, edits, "dataset")
    lines.append(f"Run(s): {', '.join(runs) or 'n/a'}. Dataset(s): {', '.join(datasets) or 'n/a'}.")
    info = _metric_info(summary)
    protocols = sorted({p for i in info.values() for p in i["protocol"].split("; ")})
    if len(protocols) <= 1:
        lines.append(f"Protocol: {protocols[0] if protocols else 'n/a'}.")
    else:
        lines.append("Protocols: " + "; ".join(f"{m} -> {i['protocol']}" for m, i in info.items()) + ".")
    src = scores if len(scores) else edits
    if len(src):
        n_samples = len(src[["dataset", "sample_id"]].drop_duplicates())
        seeds = sorted({int(s) for s in src["seed"].dropna()}) if "seed" in src.columns else []
        per_ds = ", ".join(f"{ds}: {int(n)}" for ds, n in
                           src.drop_duplicates(["dataset", "sample_id"]).groupby("dataset").size().items())
        lines.append(f"Samples: {n_samples} scored ({per_ds})"
                     + (f"; seed(s) {', '.join(map(str, seeds))}" if seeds else "") + ".")
    if len(edits):
        st = edits["status"].astype(str)
        lines.append(f"Edits: {len(edits)} ({int((st == 'ok').sum())} ok, {int((st == 'skipped').sum())} skipped, "
                     f"{int((st == 'failed').sum())} failed; skipped and failed edits are not scored, see edits.md).")
    if "method_version" in scores.columns and len(scores):
        mv = scores[["method", "method_version"]].drop_duplicates().astype(str)
        mv = sorted(f"{m} {v}" for m, v in zip(mv["method"], mv["method_version"]))
        lines.append(f"Method versions: {', '.join(mv)}.")
    lines.append(f"Values: mean [{int(CI_LEVEL * 100)}% CI] over samples; CI = percentile bootstrap of the mean "
                 f"({N_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}). n = samples scored per row.")
    lines += _convention_lines(info)
    if info:
        lines.append("Weights (and network precision) per metric:")
        lines += [f"  {m} -> {i['weights']}" for m, i in info.items()]
    totals = _nan_totals(summary)
    if totals:
        lines.append("NaN values (flagged) are excluded from means and counted: " + "; ".join(totals)
                     + ". Per row: the n_nan columns of the CSV table and the excluded-values table in the Markdown table.")
    else:
        lines.append("NaN values (flagged) are excluded from means and counted: none here.")
    if len(summary) and int(summary["n_inf"].sum()):
        lines.append("inf values (e.g. PSNR of identical images) are kept: a mean holding one is inf.")
    lines += list(marks)
    return lines


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------
def _row_cells(t: Table, row: dict[str, Any], empty_params: str) -> list[str]:
    out = []
    for k in t.row_keys:
        out.append(format_params(row[k], empty=empty_params) if k == "params" else str(row[k]))
    return out


def _body_rows(t: Table, escape, empty_params: str, cell, best: str, second: str) -> list[list[str]]:
    """Table body cells, "mean [ci]" per column, best and second marked with the given formats."""
    rows = []
    for i, row in enumerate(t.rows):
        cells = [escape(c) for c in _row_cells(t, row, empty_params)] + [str(t.n(row))]
        for col in t.columns:
            c = t.cell(row, col)
            s = cell(fmt_ci(c.get("mean", math.nan), c.get("ci_low", math.nan), c.get("ci_high", math.nan)))
            mk = t.marks.get((i, col))
            cells.append(best.format(s) if mk == "best" else second.format(s) if mk == "second" else s)
        rows.append(cells)
    return rows


def markdown_table(t: Table) -> list[str]:
    if not t.rows:
        return ["_No scores in these runs (no metric configured, or every edit skipped or failed)._"]
    head = [_key_title(k) for k in t.row_keys] + ["n"] + [t.header(c) for c in t.columns]
    align = ["---"] * len(t.row_keys) + ["---:"] * (1 + len(t.columns))
    lines = ["| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "|".join(align) + "|"]
    for cells in _body_rows(t, md_escape, "—", lambda s: s, "**{}**", "<u>{}</u>"):
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def excluded_table(t: Table) -> list[str]:
    """Markdown list of the cells holding NaN (excluded) or inf values, with their flags."""
    rows = []
    for row in t.rows:
        for col in t.columns:
            c = t.cell(row, col)
            if c and (c["n_nan"] or c["n_inf"]):
                rows.append([md_escape(x) for x in _row_cells(t, row, "—")]
                            + [md_escape(column_label(*col)), str(c["n"]), str(c["n_nan"]), str(c["n_inf"]),
                               md_escape(c["flags"] or "—")])
    if not rows:
        return []
    head = [_key_title(k) for k in t.row_keys] + ["column", "n used", "NaN excluded", "inf", "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(t.row_keys) + ["---", "---:", "---:", "---:", "---"]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _md_caption(lines: list[str]) -> list[str]:
    out = [f"# {lines[0]}", ""]
    for ln in lines[1:]:
        if ln.startswith("  "):
            out.append(f"  - {ln.strip()}")
        else:
            out.append(f"- {ln}")
    return out


def write_markdown(path: Path, caption: list[str], t: Table, extra: Sequence[str] = ()) -> Path:
    lines = _md_caption(caption) + [""] + markdown_table(t)
    ex = excluded_table(t)
    if ex:
        lines += ["", "## Excluded (NaN) and infinite values per row", "", *ex]
    if extra:
        lines += ["", *extra]
    _write_text(path, "\n".join(lines) + "\n")
    return path


def table_frame(t: Table) -> pd.DataFrame:
    """The plain-number CSV view: keys, p.* columns, n, then mean/ci_low/ci_high/n/n_nan per column."""
    recs = []
    keys = pd.DataFrame([{k: r[k] for k in t.row_keys} for r in t.rows])
    if "params" in t.row_keys and len(keys):
        keys = expand_params(keys)
    for row, kr in zip(t.rows, keys.to_dict("records")):
        r: dict[str, Any] = dict(kr)
        r["n"] = t.n(row)
        for col in t.columns:
            c = t.cell(row, col)
            lab = column_label(*col)
            for s in ("mean", "ci_low", "ci_high"):
                r[f"{lab} {s}"] = c.get(s, math.nan)
            r[f"{lab} n"] = c.get("n", 0)
            r[f"{lab} n_nan"] = c.get("n_nan", 0)
        recs.append(r)
    return pd.DataFrame(recs) if recs else pd.DataFrame(columns=[*t.row_keys, "n"])


def caption_path(csv_path: Path) -> Path:
    """The caption sidecar of a CSV file: ``table.csv`` -> ``table.caption.txt``."""
    return Path(csv_path).with_suffix(CAPTION_SUFFIX)


def write_caption(path: Path, caption: Sequence[str]) -> Path:
    _write_text(path, "".join(f"{ln.rstrip()}\n" for ln in caption))
    return path


def write_frame_csv(path: Path, df: pd.DataFrame, caption: Sequence[str]) -> tuple[Path, Path]:
    """A CSV that ``pandas.read_csv(path)`` reads as is (no comment lines) and its caption in
    the sidecar ``<stem>.caption.txt``. Returns (csv path, caption path)."""
    body = df.to_csv(index=False, float_format=CSV_FLOAT, lineterminator="\n") if len(df.columns) else ""
    _write_text(path, body)
    return Path(path), write_caption(caption_path(path), caption)


def write_csv(path: Path, caption: list[str], t: Table) -> tuple[Path, Path]:
    return write_frame_csv(path, table_frame(t), caption)


def write_latex(path: Path, caption: list[str], t: Table, label: str = "tab:results") -> Path:
    lines = [f"% {ln}" for ln in caption]
    lines.append("% requires \\usepackage{booktabs} and \\usepackage{graphicx}")
    parts: list[str] = []
    for ln in caption[1:]:  # indented lines are the items of the line before them
        if ln.startswith("  ") and parts:
            item = ln.strip().replace(" -> ", ": ")
            parts[-1] += (" " if parts[-1].endswith(":") else "; ") + item
        else:
            if parts and parts[-1][-1] not in ".:":
                parts[-1] += "."
            parts.append(ln.strip())
    if parts and parts[-1][-1] not in ".:":
        parts[-1] += "."
    cap = " ".join(tex_escape(p) for p in parts)
    if not t.rows:
        lines.append("% No scores in these runs.")
        _write_text(path, "\n".join(lines) + "\n")
        return path
    lines += [
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{tex_escape(caption[0])}. {cap}}}",
        f"\\label{{{label}}}",
        "\\resizebox{\\linewidth}{!}{%",
        f"\\begin{{tabular}}{{{'l' * len(t.row_keys)}{'r' * (1 + len(t.columns))}}}",
        "\\toprule",
        " & ".join([tex_escape(_key_title(k)) for k in t.row_keys] + ["$n$"] + [tex_escape(t.header(c)) for c in t.columns])
        + " \\\\",
        "\\midrule",
    ]
    tex_cell = lambda s: tex_escape(s).replace("inf", "$\\infty$")  # noqa: E731
    for cells in _body_rows(t, tex_escape, "--", tex_cell, "\\textbf{{{}}}", "\\underline{{{}}}"):
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{table}"]
    _write_text(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# the terminal table
# ----------------------------------------------------------------------------------------------
def terminal_columns(t: Table) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(shown, not shown) columns of the terminal table: each measured metric once, on the whole
    image (region ``all``) where it is scored there, else on each of its regions (protocols that
    score only a part, e.g. PartEdit's unedited region); no cost columns, no reference columns;
    at most MAX_TERMINAL_COLUMNS."""
    measured = [c for c in t.columns if not is_cost_metric(c[0]) and not is_reference_metric(c[0])]
    with_all = {m for m, r in measured if r == "all"}
    main = [(m, r) for m, r in measured if r == "all" or m not in with_all]
    shown = main[:MAX_TERMINAL_COLUMNS]
    return shown, [c for c in t.columns if c not in shown]


def _aligned(head: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> list[str]:
    """Fixed-width text columns, the first ``left`` left-aligned (names), the rest right-aligned
    (numbers), headers aligned like their column. (Written here: pandas' to_string justifies
    every header the same way, whatever its column holds.)"""
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    out = []
    for cells in [head, *rows]:
        out.append("  ".join(c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
                   .rstrip())
    return out


def distinguishing_params(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per row, its parameters that differ between the rows of the same method (``a=1, b=x``),
    ``-`` for a method with one parameter point: what tells a method's rows apart, without the
    dozens of fixed parameters a method such as ZONE carries (those stay in table.md)."""
    parsed: list[dict[str, Any]] = []
    for r in rows:
        try:
            parsed.append(parse_params(r.get("params", "{}")))
        except (ValueError, TypeError):
            parsed.append({"params": str(r.get("params"))})
    varying: dict[str, set[str]] = {}
    by_method: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_method.setdefault(str(r.get("method")), []).append(i)
    for method, idx in by_method.items():
        keys = set().union(*(parsed[i].keys() for i in idx))
        varying[method] = {k for k in keys
                           if len({repr(parsed[i].get(k, "<unset>")) for i in idx}) > 1}
    out = []
    for i, r in enumerate(rows):
        keys = sorted(varying[str(r.get("method"))])
        d = {k: parsed[i].get(k) for k in keys}
        out.append(format_params(json.dumps(d, sort_keys=True, default=str), empty="-"))
    return out


def terminal_table(t: Table, context: str, unscored: Sequence[str] = (), per_category: bool = True) -> str:
    """A compact plain-text table for the terminal: means only, marks as * (best) and + (second),
    the main columns of :func:`terminal_columns`; every other number is in table.md / table.csv.
    ``context`` (runs, datasets, protocol) goes in the title line."""
    lines = [f"Results: mean per method and parameter point ({context})"]
    if not t.rows:
        lines.append("No scores in these runs (no metric configured, or every edit skipped or failed).")
    else:
        shown, rest = terminal_columns(t)
        head = [_key_title(k) for k in t.row_keys] + ["n"] + [t.header(c) for c in shown]
        short = distinguishing_params(t.rows)
        rows = []
        for i, row in enumerate(t.rows):
            cells = [short[i] if k == "params" else str(row[k]) for k in t.row_keys]
            cells.append(str(t.n(row, shown or t.columns)))
            for col in shown:
                mk = t.marks.get((i, col))
                # a mark or a space, so that the digits of every row stay aligned
                cells.append(fmt(t.cell(row, col).get("mean", math.nan)) + (TERMINAL_MARKS[mk] if mk else " "))
            rows.append(cells)
        lines += _aligned(head, rows, left=len(t.row_keys))
        lines.append(f"{TERMINAL_MARKS['best']} best, {TERMINAL_MARKS['second']} second best per column, among "
                     f"competing rows (reference methods such as identity, and a value whose n is below "
                     f"{MIN_N_PERCENT}% of its column's largest, are not marked). n = samples scored.")
        if "params" in t.row_keys:
            lines.append("Params: only those that differ between a method's rows (- : one parameter point); every "
                         "parameter is in table.md.")
        # a number from a stand-in or random-weight model is never shown unlabelled
        info = _metric_info(t.summary)
        flagged = {m: i["weights"] for m, i in info.items()
                   if m in {c[0] for c in shown} and ("STAND-IN" in i["weights"] or "RANDOM WEIGHTS" in i["weights"])}
        for m, w in flagged.items():
            lines.append(f"Weights of {m}: {w}")
        other = f"; {len(rest)} more column(s) (other regions, costs, reference columns)" if rest else ""
        lines.append(f"95% CIs{other}" + (", per-category tables" if per_category else "")
                     + ": table.md, table.csv" + (", table_by_category.md." if per_category else "."))
    if unscored:
        lines.append("Not scored (every edit skipped or failed, reasons in table.md): " + ", ".join(unscored) + ".")
    return "\n".join(lines) + "\n"


def write_edits_md(path: Path, edits: pd.DataFrame, by: Sequence[str]) -> Path:
    """Edit status per group; with the edits' ``notes`` column (input conversion notes: EXIF
    rotation, 16-bit, mask conversions ...), the number of noted edits per group and each note
    with its samples (runs written before the column existed show neither)."""
    es = _order(edit_summary(edits, by), by) if len(edits) else edit_summary(edits, by)
    runs = sorted({str(r) for r in edits["run"].dropna()}) if "run" in edits.columns and len(edits) else []
    has_notes = "notes" in edits.columns
    lines = [
        "# Edits: status, timings and memory",
        "",
        f"- Run(s): {', '.join(runs) or 'n/a'}.",
        "- prep s / infer s: mean seconds per ok edit (preparation vs inference; cached edits keep the "
        "timings recorded when they were computed). peak memory: max over edits (n/a: not measured).",
        "- Skipped and failed edits are not scored; their reasons are listed below the table.",
    ]
    if has_notes:
        lines.append("- input notes: edits whose inputs were converted when read (EXIF rotation, 16-bit, CMYK, "
                     "alpha, mask conversions ...); each note and its samples are listed below the table.")
    lines.append("")
    if not len(es):
        lines.append("_No edits in these runs._")
        _write_text(path, "\n".join(lines) + "\n")
        return path
    head = [_key_title(k) for k in by] + ["n", "ok", "skipped", "failed", "prep s", "infer s", "peak memory", "edit flags"]
    head += ["input notes"] if has_notes else []
    lines += ["| " + " | ".join(head) + " |",
              "|" + "|".join(["---"] * len(by) + ["---:"] * 7 + ["---"] + (["---:"] if has_notes else [])) + "|"]
    reasons, notes = [], []
    for r in es.to_dict("records"):
        keys = [format_params(r[k], empty="—") if k == "params" else str(r[k]) for k in by]
        cells = keys + [str(r["n"]), str(r["ok"]), str(r["skipped"]), str(r["failed"]), fmt(r["prep_seconds_mean"]),
                        fmt(r["infer_seconds_mean"]), fmt_bytes(r["peak_memory_bytes_max"]), r["flags"] or "—"]
        cells += [str(r["n_noted"]) if r["n_noted"] else "—"] if has_notes else []
        lines.append("| " + " | ".join(md_escape(x) for x in cells) + " |")
        if r["reasons"]:
            reasons.append(f"- {' / '.join(keys)}: {r['reasons']}")
        if r["notes"]:
            notes.append(f"- {' / '.join(keys)}: {r['notes']}")
    if reasons:
        lines += ["", "## Skipped and failed", "", *reasons]
    if notes:
        lines += ["", "## Input conversion notes", "", *notes]
    _write_text(path, "\n".join(lines) + "\n")
    return path


def _unscored_groups(edits: pd.DataFrame, by: Sequence[str]) -> list[dict[str, Any]]:
    """edit_summary records of the groups with no ok edit, in table order."""
    if not len(edits):
        return []
    es = _order(edit_summary(edits, by), by)
    return es[es["ok"] == 0].to_dict("records")


def unscored_section(edits: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """Markdown lines listing the method / parameter points with no ok edit (every edit skipped
    or failed: missing weights, missing sample fields ...), with their reasons, so that a method
    that could not run still has a row in the results table's report."""
    recs = _unscored_groups(edits, by)
    if not recs:
        return []
    lines = ["## Not scored: every edit skipped or failed", "",
             "| " + " | ".join([_key_title(k) for k in by] + ["n", "skipped", "failed", "reason"]) + " |",
             "|" + "|".join(["---"] * len(by) + ["---:"] * 3 + ["---"]) + "|"]
    for r in recs:
        keys = [format_params(r[k], empty="—") if k == "params" else str(r[k]) for k in by]
        lines.append("| " + " | ".join(md_escape(x) for x in keys + [
            str(r["n"]), str(r["skipped"]), str(r["failed"]), r["reasons"] or "—"]) + " |")
    lines += ["", "Full reasons (for missing weights: every way to provide them) are in each job's edits.parquet; "
              "`edit-harness weights experiment=NAME` lists what is missing before a run."]
    return lines


def _write_text(path: Path, text: str) -> None:
    save_bytes(Path(path), text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def write_plots(summary: pd.DataFrame, by: Sequence[str], out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Sweep curves for every numeric parameter swept within a method, for every
    (metric, region); without a sweep, one bar chart per metric. Returns (name -> path of the
    plots written, Markdown lines saying which plots were not drawn and which series were left
    out of a plot, and why)."""
    files: dict[str, Path] = {}
    not_drawn: list[str] = []
    left_out: list[str] = []
    if not len(summary):
        return files, []
    sp = expand_params(summary)
    within = [c for c in ("run", "dataset", "method") if c in by]
    swept = swept_params(sp, within=within)
    pairs = metric_columns(summary)
    jobs: list[tuple[str, str, Any]] = []
    if swept:
        for param in swept:
            for m, r in pairs:
                jobs.append((f"plot_{safe_name(m)}_{safe_name(r)}_vs_{safe_name(param)}.png",
                             f"{column_label(m, r)} vs {param}",
                             lambda path, m=m, r=r, param=param: plot_metric_vs_param(sp, m, r, param, path)))
    else:
        for m in sorted({m for m, _ in pairs}):
            jobs.append((f"plot_bars_{safe_name(m)}.png", m, lambda path, m=m: plot_bars(summary, m, path)))
    for name, what, draw in jobs:
        res: PlotResult = draw(out_dir / name)
        if res.path is not None:
            files[name] = res.path
            left_out += [f"- {name}: {md_escape(x)}" for x in res.skipped]
        else:
            not_drawn.append(f"- {md_escape(what)}: {md_escape(res.reason)}")
    notes: list[str] = []
    if not_drawn:
        notes += ["", "Not drawn (nothing a plot would show that the table does not):", "", *not_drawn]
    if left_out:
        notes += ["", "Series left out of a plot (all values 0, a single point, or no finite value):", "", *left_out]
    return files, notes


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
_OWNED = re.compile(r"^(plot_.*\.png|table_by_category\.(md|csv|tex|caption\.txt)"
                    r"|summary_by_category\.(csv|caption\.txt))$")
TERMINAL_FILE = "table_terminal.txt"


def run_paper_tables(run_dirs: str | Path | Sequence[str | Path]) -> list[str]:
    """The published tables the runs' jobs name (their resolved config's ``paper_tables``), in
    first-seen order. A job whose manifest is missing or unreadable names none."""
    import json

    from .aggregate import _as_dirs, find_jobs

    out: dict[str, None] = {}
    for d in _as_dirs(run_dirs):
        for j in find_jobs(d):
            try:
                cfg = json.loads((j / "manifest.json").read_text(encoding="utf-8")).get("config") or {}
            except (OSError, ValueError):
                continue
            names = cfg.get("paper_tables") or []
            for name in ([names] if isinstance(names, str) else names):
                out.setdefault(str(name), None)
    return list(out)


def write_paper_comparisons(run_dirs: str | Path | Sequence[str | Path], out_dir: Path,
                            tables: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """Each published table side by side with the runs (:mod:`harness.compare`), written to
    ``out_dir/compare-<paper>-<table>/``. Returns (files keyed ``compare-<paper>-<table>/<name>``,
    Markdown lines for table.md: one per table, with what was compared or why it was not)."""
    from .compare import CompareError, compare, write_compare

    files: dict[str, Path] = {}
    lines: list[str] = []
    for table in tables:
        sub = f"compare-{table.replace('/', '-')}"
        try:
            result = compare(run_dirs, table)
        except CompareError as e:
            lines.append(f"- {md_escape(table)}: not compared: {md_escape(e)}")
            continue
        for p in write_compare(result, out_dir / sub).values():
            files[f"{sub}/{p.name}"] = p
        fr = result.frame
        done = int((fr["status"] == "compared").sum())
        inside = int((fr["in_ci"] == "yes").sum())
        lines.append(f"- {md_escape(table)}: {done} of {len(fr)} published numbers compared, {inside} inside our "
                     f"95% interval: {sub}/compare.md (also .csv, .tex, .html)")
    return files, lines


def write_report(
    run_dirs: str | Path | Sequence[str | Path], out_dir: str | Path, per_category: bool = True,
    cost_columns: bool = True, reference_methods: Sequence[str] = (), paper_tables: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write the report of one or more run dirs into ``out_dir``; returns file name -> path.

    Files: summary.csv (long summary), table.md / table.csv / table.tex (wide table: mean
    [95% CI] per method x parameter point x metric/region), with per_category also
    summary_by_category.csv and table_by_category.md / .csv / .tex, a ``.caption.txt`` sidecar
    beside every CSV, edits.md, plots (plot_<metric>_<region>_vs_<param>.png for sweeps, else
    plot_bars_<metric>.png), and table_terminal.txt, the compact table for the terminal
    (returned under the key ``"terminal"``), and index.html, the self-contained HTML view of all
    of it with a qualitative grid of the edits (:mod:`harness.html_report`).
    Stale plot and per-category files of an earlier report in ``out_dir`` are removed.
    With ``cost_columns`` the runner's preparation time, inference time and peak memory per
    edit are aggregated as metrics of protocol ``runner`` (``cost_*`` columns).
    ``reference_methods`` names methods that are references in this report, besides
    :data:`REFERENCE_METHODS`: they get no best / second marks.
    ``paper_tables`` (default: those the jobs' configs name, :func:`run_paper_tables`): each
    published table side by side with the runs, in ``compare-<paper>-<table>/``, listed in
    table.md and shown in index.html.
    With both CLIP-I and CLIP-T scored and more than one edit category, the per-category
    trade-off (ZONE's Figure 6, :func:`harness.plots.plot_clip_tradeoff`) is plot_clip_i_vs_clip_t.png.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, edits = load_run(run_dirs)
    if cost_columns and len(edits):
        costs = cost_rows(edits)
        if len(costs):
            scores = _concat([scores, costs], SCORE_SORT)
    by = _group_keys(scores, edits)
    partition = ["dataset"] if "dataset" in by else []
    refs = [*REFERENCE_METHODS, *(m for m in reference_methods if m not in REFERENCE_METHODS)]
    summary = _order(summarize(scores, by), by)
    files: dict[str, Path] = {}

    plots, plot_notes = write_plots(summary, by, out_dir)
    t = Table(summary, by, partition, refs)
    cap = caption_lines(scores, edits, summary, "Results: mean [95% bootstrap CI] per method and parameter point",
                        t.marks_caption())
    scap = caption_lines(scores, edits, summary, "Long summary: one row per method, parameter point, metric and "
                         "region (mean, 95% bootstrap CI, n, NaN and inf counts, flags)")
    files["summary.csv"], files["summary.caption.txt"] = write_frame_csv(out_dir / "summary.csv", summary, scap)
    extra = unscored_section(edits, by)
    by_cat = summarize(scores, by, per_category=True) if per_category else None
    if by_cat is not None and len(by_cat):
        if {"clip_i", "clip_t"} <= set(by_cat["metric"]) and by_cat["category"].nunique() > 1:
            res = plot_clip_tradeoff(by_cat, out_dir / "plot_clip_i_vs_clip_t.png")
            if res.path is not None:
                plots["plot_clip_i_vs_clip_t.png"] = res.path
                plot_notes += [f"- plot_clip_i_vs_clip_t.png: {md_escape(x)}" for x in res.skipped]
            else:
                plot_notes += ["", f"Not drawn: CLIP-I vs CLIP-T per category: {md_escape(res.reason)}"]
    tables_named = run_paper_tables(run_dirs) if paper_tables is None else list(paper_tables)
    if tables_named:
        cmp_files, cmp_lines = write_paper_comparisons(run_dirs, out_dir, tables_named)
        files.update(cmp_files)
        extra = [*extra, *([""] if extra else []), "## Published tables side by side", "", *cmp_lines]
    if plots or plot_notes:
        extra = [*extra, *([""] if extra else []), "## Plots", "", *[f"- {n}" for n in plots], *plot_notes]
    files["table.md"] = write_markdown(out_dir / "table.md", cap, t, extra)
    files["table.csv"], files["table.caption.txt"] = write_csv(out_dir / "table.csv", cap, t)
    files["table.tex"] = write_latex(out_dir / "table.tex", cap, t)
    if per_category:
        keys = partition + ["category"] + [k for k in by if k not in partition]
        cs = _order(by_cat, keys)
        tc = Table(cs, keys, partition + ["category"], refs)
        ccap = caption_lines(scores, edits, cs, "Results per edit category: mean [95% bootstrap CI]",
                             tc.marks_caption())
        cscap = caption_lines(scores, edits, cs, "Long summary per edit category: one row per category, method, "
                              "parameter point, metric and region")
        files["summary_by_category.csv"], files["summary_by_category.caption.txt"] = write_frame_csv(
            out_dir / "summary_by_category.csv", cs, cscap)
        files["table_by_category.md"] = write_markdown(out_dir / "table_by_category.md", ccap, tc)
        files["table_by_category.csv"], files["table_by_category.caption.txt"] = write_csv(
            out_dir / "table_by_category.csv", ccap, tc)
        files["table_by_category.tex"] = write_latex(out_dir / "table_by_category.tex", ccap, tc,
                                                     label="tab:results_by_category")
    files["edits.md"] = write_edits_md(out_dir / "edits.md", edits, by)
    protocols = sorted({p for v in summary["protocol"] for p in _parts(v) if p != "runner"}) if len(summary) else []
    # the terminal names unscored methods only (their parameters are in table.md): a sweep's
    # parameter points are counted, not spelled out
    points: dict[str, int] = {}
    for r in _unscored_groups(edits, by):
        name = " / ".join(str(r[k]) for k in by if k != "params")
        points[name] = points.get(name, 0) + 1
    unscored = [f"{name} ({n} parameter points)" if n > 1 else name for name, n in points.items()]
    terminal = out_dir / TERMINAL_FILE
    runs, datasets = _distinct(scores, edits, "run"), _distinct(scores, edits, "dataset")
    context = (f"run {', '.join(runs) or 'n/a'}; dataset {', '.join(datasets) or 'n/a'}; "
               f"protocol {', '.join(protocols) or 'n/a'}")
    _write_text(terminal, terminal_table(t, context, unscored, per_category))
    files["terminal"] = terminal
    files.update(plots)
    # last: index.html renders the files written above (tables, edits.md, plots) with the grid
    from .html_report import HTML_FILE, write_html_report

    files[HTML_FILE] = write_html_report(run_dirs, out_dir, files)
    written = {p.name for p in files.values()}
    for p in sorted(out_dir.iterdir()):
        if p.is_file() and _OWNED.match(p.name) and p.name not in written:
            p.unlink()
    return files
