"""Plots for reports: metric vs swept parameter curves, and per-metric bar charts.

matplotlib is imported lazily inside the functions, and figures are drawn on an explicit
Agg canvas (no pyplot, no global backend switch), under matplotlib's default style so a
user's matplotlibrc cannot change the output. PNGs are written without the "Software"
metadata at a fixed size and dpi, so the same summary gives byte-identical files.

What a plot shows, so that it cannot mislead:

- every legend entry ends with the number of samples behind its points (``n=4``; ``n=3–5``
  when the points of one series rest on different numbers of samples);
- a series is left out when it cannot be read as a curve or a bar: no finite value, all values
  exactly 0 (nothing visible to draw), or, on a curve against a parameter, a single point. Each
  left-out series is returned in :class:`PlotResult` (``skipped``) and listed in the report; a
  plot with nothing left to draw (or, for a bar chart, a single bar) is not written and its
  reason is returned instead;
- layout is matplotlib's constrained layout, with the figure widened until the axes keep their
  planned width, so titles, axis labels, tick labels and the legend lie inside the figure, and
  annotations ("n/a", "inf", the count of points not drawn) inside the axes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .aggregate import format_params, group_columns
from .fileio import save_bytes

DPI = 100
LEGEND_FONT = 7
TITLE_FONT = 10
LABEL_WRAP = 44  # characters per legend line: long parameter lists wrap instead of widening the figure
MAX_LEGEND_ROWS = 40  # legend entries per column (a second column beyond that)


@dataclasses.dataclass
class PlotResult:
    """What a plot function did: the file written (None when nothing was drawn), the series left
    out (``"<label>: <why>"``) and, when no file was written, why."""

    path: Path | None
    skipped: list[str] = dataclasses.field(default_factory=list)
    reason: str | None = None


def direction(higher_is_better: bool) -> str:
    return "↑ higher is better" if higher_is_better else "↓ lower is better"


def safe_name(s: str) -> str:
    """A file-name-safe version of a metric, region or parameter name."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(s)).strip("-") or "x"


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width=max(width, 10), break_long_words=True, break_on_hyphens=False)) or text


def _chars_per_line(width_in: float, fontsize: float) -> int:
    # An average DejaVu Sans glyph is ~0.6 em wide; the 0.65 keeps a margin for wide glyphs.
    return int(width_in * 72.0 / (fontsize * 0.65))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fit_width(fig, ax, plot_width: float) -> None:
    """Widen the figure until constrained layout leaves the axes ``plot_width`` inches wide (a
    wide legend or long tick labels otherwise squeeze the data area). Two passes suffice: the
    decorations' sizes do not depend on the figure's width."""
    for _ in range(2):
        fig.draw_without_rendering()
        got = ax.get_position().width * fig.get_figwidth()
        if got >= 0.95 * plot_width:
            return
        fig.set_figwidth(fig.get_figwidth() + (plot_width - got))
    fig.draw_without_rendering()


def _save(fig, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    save_bytes(out_path, buf.getvalue())
    return out_path


def _axes(labels: Sequence[str], plot_width: float = 4.6, height: float = 4.0):
    """A figure with room on the right for a legend of these labels (so a legend never hides
    data); constrained layout then places every decoration inside the figure."""
    n_entries = len(labels)
    longest = max((len(line) for x in labels for line in x.splitlines()), default=0)
    lines = sum(len(x.splitlines()) for x in labels)
    cols = 1 if n_entries <= MAX_LEGEND_ROWS else 2
    legend = (0.5 + longest * LEGEND_FONT * 0.65 / 72.0) * cols if n_entries else 0.0
    height = max(height, 1.2 + 0.15 * math.ceil(lines / cols))
    fig = _figure(1.3 + plot_width + legend, height)
    ax = fig.add_subplot()
    return fig, ax


def _legend(ax, n_entries: int) -> None:
    if n_entries:
        ax.legend(fontsize=LEGEND_FONT, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  frameon=False, ncols=1 if n_entries <= MAX_LEGEND_ROWS else 2)


def _titles(fig, ax, title: str, ylabel: str) -> None:
    """Title and y label wrapped to the figure's width and height (constrained layout makes room
    for them but does not wrap them)."""
    ax.set_title(_wrap(title, _chars_per_line(fig.get_figwidth() - 0.4, TITLE_FONT)), fontsize=TITLE_FONT)
    ax.set_ylabel(_wrap(ylabel, _chars_per_line(fig.get_figheight() - 1.0, 10)))


def _style():
    import matplotlib.style

    return matplotlib.style.context("default")


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _label(rec: dict[str, Any], keys: Sequence[str]) -> str:
    """Legend label: method first, then the other keys as k=v (params JSON made compact)."""
    parts = []
    for k in keys:
        v = rec.get(k)
        if _is_missing(v):
            continue
        if k == "method":
            continue
        if k == "params":
            fp = format_params(v, empty="")
            if fp:
                parts.append(fp)
        else:
            name = k[2:] if k.startswith("p.") else k
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            parts.append(f"{name}={v}")
    head = str(rec.get("method", "")) if "method" in keys else ""
    if head and parts:
        return f"{head} ({', '.join(parts)})"
    return head or ", ".join(parts) or "all"


def n_text(ns: Sequence[int]) -> str:
    """``n=4``, or ``n=3–5`` when the points rest on different sample counts."""
    ns = [int(n) for n in ns]
    if not ns:
        return "n=0"
    lo, hi = min(ns), max(ns)
    return f"n={lo}" if lo == hi else f"n={lo}–{hi}"


def _legend_label(label: str, ns: Sequence[int]) -> str:
    return _wrap(f"{label} [{n_text(ns)}]", LABEL_WRAP)


def series_skip_reason(means: Sequence[float], min_points: int = 1) -> str | None:
    """Why a series is not drawn, or None: no finite value, all values exactly 0 (an invisible
    bar or a line on the axis says nothing the table does not), fewer than ``min_points`` finite
    points (a curve needs two)."""
    m = np.asarray(means, dtype=np.float64)
    m = m[np.isfinite(m)]
    if m.size == 0:
        return "no finite value (inf or n/a)"
    if bool(np.all(m == 0.0)):
        return "all values 0"
    if m.size < min_points:
        return "a single point" if m.size == 1 else f"{m.size} points"
    return None


def _natural(v: Any) -> tuple:
    if _is_missing(v):
        return (2, 0.0, "")
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def _hib(d: pd.DataFrame) -> bool:
    return bool(d["higher_is_better"].iloc[0]) if len(d) else True


def figure_metric_vs_param(
    summary_with_params: pd.DataFrame, metric: str, region: str, param: str
) -> tuple[Any, list[str], str | None]:
    """The figure of :func:`plot_metric_vs_param`, laid out, not saved: ``(figure or None,
    skipped series, reason when None)``."""
    with _style():
        return _figure_metric_vs_param(summary_with_params, metric, region, param)


def _figure_metric_vs_param(
    summary_with_params: pd.DataFrame, metric: str, region: str, param: str
) -> tuple[Any, list[str], str | None]:
    col = param if param.startswith("p.") else f"p.{param}"
    name = col[2:]
    s = summary_with_params
    if col not in s.columns:
        return None, [], f"no parameter {name}"
    d = s[(s["metric"] == metric) & (s["region"] == region)].copy()
    d[col] = pd.to_numeric(d[col], errors="coerce")
    d = d[d[col].notna()]
    if len(d) == 0:
        return None, [], f"no row has a numeric {name}"
    line_keys = [c for c in group_columns(s) if c not in ("params", col)]
    # A key that is constant over the plotted rows says nothing in a legend.
    label_keys = [c for c in line_keys if c == "method" or d[c].astype(str).nunique(dropna=False) > 1]
    hib = _hib(d)
    lines = []
    for key, g in d.groupby(line_keys, sort=False, dropna=False):
        rec = dict(zip(line_keys, key if isinstance(key, tuple) else (key,)))
        lines.append((str(rec.get("method", "")), _label(rec, label_keys), g.sort_values(col, kind="mergesort"),
                      tuple(_natural(rec[k]) for k in label_keys)))
    lines.sort(key=lambda t: (t[0], t[3], t[1]))
    skipped: list[str] = []
    drawn = []
    for method, label, g, _ in lines:
        why = series_skip_reason(g["mean"].to_numpy(dtype=np.float64), min_points=2)
        if why is None:
            ok = np.isfinite(g["mean"].to_numpy(dtype=np.float64))
            drawn.append((method, _legend_label(label, g["n"].to_numpy()[ok]), g))
        else:
            skipped.append(f"{label}: {why}")
    if not drawn:
        return None, skipped, "no series left to draw (" + "; ".join(skipped) + ")"
    # colour by setting within a method, line style and marker by method: readable past 10 lines
    methods = sorted({m for m, _, _ in drawn})
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    alpha = 0.2 if len(drawn) <= 4 else 0.08
    plot_width = 4.6
    fig, ax = _axes([lb for _, lb, _ in drawn], plot_width=plot_width)
    hidden = 0
    xs_all: list[float] = []
    per_method: dict[str, int] = {}
    for method, label, g in drawn:
        k = per_method.get(method, 0)
        per_method[method] = k + 1
        ls, marker = styles[methods.index(method) % len(styles)]
        color = f"C{k % 10}"
        x = g[col].to_numpy(dtype=np.float64)
        m = g["mean"].to_numpy(dtype=np.float64)
        lo = g["ci_low"].to_numpy(dtype=np.float64)
        hi = g["ci_high"].to_numpy(dtype=np.float64)
        ok = np.isfinite(m)
        hidden += int((~ok).sum())
        ax.plot(x[ok], m[ok], marker=marker, ms=4, lw=1.5, ls=ls, color=color, label=label)
        band = ok & np.isfinite(lo) & np.isfinite(hi)
        if band.sum() >= 2:
            ax.fill_between(x[band], lo[band], hi[band], color=color, alpha=alpha, lw=0)
        elif band.any():
            ax.errorbar(x[band], m[band], yerr=_yerr(m[band], lo[band], hi[band]), fmt="none", ecolor=color,
                        capsize=3)
        xs_all.extend(x[ok].tolist())
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 100:
        ax.set_xscale("log")
    ax.set_xlabel(name)
    _titles(fig, ax, f"{metric} [{region}] vs {name}: mean, band = 95% bootstrap CI",
            f"{metric} [{region}]  ({direction(hib)})")
    ax.grid(True, alpha=0.3)
    _legend(ax, len(drawn))
    if hidden:
        ax.text(0.01, 0.01, f"{hidden} point(s) not finite (inf or n/a), not drawn",
                transform=ax.transAxes, fontsize=7, va="bottom", ha="left", color="0.35")
    _fit_width(fig, ax, plot_width)
    return fig, skipped, None


def _yerr(m: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    # A percentile interval need not contain the mean to the last bit; matplotlib refuses
    # negative error lengths, so they are clipped at 0.
    return [np.clip(m - lo, 0.0, None), np.clip(hi - m, 0.0, None)]


def plot_metric_vs_param(
    summary_with_params: pd.DataFrame, metric: str, region: str, param: str, out_path: str | Path
) -> PlotResult:
    """Mean of (metric, region) against a numeric parameter, one line per method and setting
    of the other parameters, with the 95% CI as a band. ``param`` may carry the ``p.`` prefix.

    ``summary_with_params`` is ``expand_params(summarize(...))``. Writes ``out_path`` unless no
    series is left to draw (no row with a numeric value of ``param``, or every series skipped:
    see :func:`series_skip_reason`).
    """
    with _style():
        fig, skipped, reason = _figure_metric_vs_param(summary_with_params, metric, region, param)
        if fig is None:
            return PlotResult(None, skipped, reason)
        return PlotResult(_save(fig, out_path), skipped)


def figure_bars(summary: pd.DataFrame, metric: str) -> tuple[Any, list[str], str | None]:
    """The figure of :func:`plot_bars`, laid out, not saved: ``(figure or None, skipped series,
    reason when None)``."""
    with _style():
        return _figure_bars(summary, metric)


def _figure_bars(summary: pd.DataFrame, metric: str) -> tuple[Any, list[str], str | None]:
    d = summary[summary["metric"] == metric]
    if len(d) == 0:
        return None, [], f"no rows for {metric}"
    gcols = group_columns(summary)
    regions = sorted({str(r) for r in d["region"]})
    groups = d[gcols].drop_duplicates()
    label_keys = [c for c in gcols if c == "method" or groups[c].astype(str).nunique(dropna=False) > 1]
    lookup = {}
    for r in d.to_dict("records"):
        lookup[(tuple(str(r[c]) for c in gcols), str(r["region"]))] = r
    hib = _hib(d)
    skipped: list[str] = []
    drawn: list[tuple[dict[str, Any], str, list[dict[str, Any] | None]]] = []
    for rec in groups.to_dict("records"):
        k = tuple(str(rec[c]) for c in gcols)
        cells = [lookup.get((k, reg)) for reg in regions]
        present = [c for c in cells if c is not None]
        label = _label(rec, label_keys)
        why = series_skip_reason([c["mean"] for c in present])
        if why is not None:
            skipped.append(f"{label}: {why}")
            continue
        ns = [int(c["n"]) for c in present if np.isfinite(c["mean"])]
        drawn.append((rec, _legend_label(label, ns), cells))
    n_bars = sum(1 for _, _, cells in drawn for c in cells if c is not None and np.isfinite(c["mean"]))
    if n_bars < 2:
        why = "a single value (see the table)" if n_bars == 1 else "no series left to draw"
        return None, skipped, why + (f" ({'; '.join(skipped)})" if skipped else "")
    ng = len(drawn)
    width = 0.8 / ng
    plot_width = min(9.0, max(3.4, 0.3 * ng * len(regions) + 0.6 * len(regions)))
    fig, ax = _axes([lb for _, lb, _ in drawn], plot_width=plot_width)
    for i, (rec, label, cells) in enumerate(drawn):
        xs, ms, los, his = [], [], [], []
        for j, c in enumerate(cells):
            x = j - 0.4 + width * (i + 0.5)
            if c is None:
                continue
            m = c["mean"]
            if not np.isfinite(m):
                # at 2% of the axes' height whatever the data range: always inside the axes
                ax.text(x, 0.02, "inf" if m == math.inf else "-inf" if m == -math.inf else "n/a",
                        transform=ax.get_xaxis_transform(), rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            xs.append(x)
            ms.append(m)
            los.append(c["ci_low"] if np.isfinite(c["ci_low"]) else m)
            his.append(c["ci_high"] if np.isfinite(c["ci_high"]) else m)
        m_, lo_, hi_ = (np.asarray(v, dtype=np.float64) for v in (ms, los, his))
        ax.bar(xs, ms, width=width * 0.95, color=f"C{i % 10}", label=label,
               yerr=_yerr(m_, lo_, hi_) if xs else None, capsize=2, error_kw={"lw": 0.8})
    ax.set_xticks(range(len(regions)))
    ax.set_xticklabels(regions)
    ax.set_xlim(-0.5, len(regions) - 0.5)
    ax.set_xlabel("region")
    _titles(fig, ax, f"{metric}: mean per method, error bars = 95% bootstrap CI", f"{metric}  ({direction(hib)})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.axhline(0, color="0.3", lw=0.6)
    _legend(ax, ng)
    _fit_width(fig, ax, plot_width)
    return fig, skipped, None


def plot_bars(summary: pd.DataFrame, metric: str, out_path: str | Path) -> PlotResult:
    """Bar chart of one metric's mean per group (method x parameter point), regions side by
    side, 95% CI as error bars. Groups appear in the summary's row order. Not written when fewer
    than two bars are left to draw (see :func:`series_skip_reason`)."""
    with _style():
        fig, skipped, reason = _figure_bars(summary, metric)
        if fig is None:
            return PlotResult(None, skipped, reason)
        return PlotResult(_save(fig, out_path), skipped)
