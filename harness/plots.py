"""Plots for reports: metric vs swept parameter curves, and per-metric bar charts; and the
papers' figures (:func:`figures_for_run`): CLIP-I vs CLIP-T per edit category (ZONE's Figure 6),
ablation bar charts, and qualitative grids of sources and edits as PNG and PDF.

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

from .aggregate import format_params, group_columns, params_sort_key, reason_head
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


def _save(fig, out_path: str | Path, dpi: float = DPI) -> Path:
    out_path = Path(out_path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
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


def _grouped_bars(series: Sequence[tuple[str, Sequence[dict | None]]], slots: int, capsize: float):
    """Bars of several series side by side over ``slots`` positions (regions, categories), each
    with its 95% CI as error bars; a non-finite mean is written at the foot of its slot instead of
    a bar, and a missing cell (None) leaves a gap. Returns ``(fig, ax, plot_width)`` with the slots'
    ticks set (the width for :func:`_fit_width`, once the titles and legend are in)."""
    width = 0.8 / len(series)
    plot_width = min(9.0, max(3.4, 0.3 * len(series) * slots + 0.6 * slots))
    fig, ax = _axes([lb for lb, _ in series], plot_width=plot_width)
    for i, (label, cells) in enumerate(series):
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
               yerr=_yerr(m_, lo_, hi_) if xs else None, capsize=capsize, error_kw={"lw": 0.8})
    ax.set_xticks(range(slots))
    ax.set_xlim(-0.5, slots - 0.5)
    return fig, ax, plot_width


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


CI_STYLES = ("band", "bars")


def figure_metric_vs_param(
    summary_with_params: pd.DataFrame, metric: str, region: str, param: str, ci_style: str = "band"
) -> tuple[Any, list[str], str | None]:
    """The figure of :func:`plot_metric_vs_param`, laid out, not saved: ``(figure or None,
    skipped series, reason when None)``. ``ci_style``: the 95% CI as a shaded ``band`` (the
    report's default) or as error ``bars`` at each point (what papers usually print)."""
    with _style():
        return _figure_metric_vs_param(summary_with_params, metric, region, param, ci_style)


def _figure_metric_vs_param(
    summary_with_params: pd.DataFrame, metric: str, region: str, param: str, ci_style: str = "band"
) -> tuple[Any, list[str], str | None]:
    if ci_style not in CI_STYLES:
        raise ValueError(f"ci_style must be one of {', '.join(CI_STYLES)}, not {ci_style!r}")
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
        if band.sum() >= 2 and ci_style == "band":
            ax.fill_between(x[band], lo[band], hi[band], color=color, alpha=alpha, lw=0)
        elif band.any():
            ax.errorbar(x[band], m[band], yerr=_yerr(m[band], lo[band], hi[band]), fmt="none", ecolor=color,
                        capsize=3)
        xs_all.extend(x[ok].tolist())
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 100:
        ax.set_xscale("log")
    ax.set_xlabel(name)
    _titles(fig, ax, f"{metric} [{region}] vs {name}: mean, {'band' if ci_style == 'band' else 'error bars'} = 95% "
            "bootstrap CI",
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
    summary_with_params: pd.DataFrame, metric: str, region: str, param: str, out_path: str | Path,
    ci_style: str = "band",
) -> PlotResult:
    """Mean of (metric, region) against a numeric parameter, one line per method and setting
    of the other parameters, with the 95% CI as a band (``ci_style="bars"``: error bars). ``param``
    may carry the ``p.`` prefix; ``out_path`` ends in .png or .pdf.

    ``summary_with_params`` is ``expand_params(summarize(...))``. Writes ``out_path`` unless no
    series is left to draw (no row with a numeric value of ``param``, or every series skipped:
    see :func:`series_skip_reason`).
    """
    with _style():
        fig, skipped, reason = _figure_metric_vs_param(summary_with_params, metric, region, param, ci_style)
        if fig is None:
            return PlotResult(None, skipped, reason)
        return PlotResult(save_figure(fig, out_path), skipped)


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
    fig, ax, plot_width = _grouped_bars([(lb, cells) for _, lb, cells in drawn], len(regions), capsize=2)
    ax.set_xticklabels(regions)
    ax.set_xlabel("region")
    _titles(fig, ax, f"{metric}: mean per method, error bars = 95% bootstrap CI", f"{metric}  ({direction(hib)})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.axhline(0, color="0.3", lw=0.6)
    _legend(ax, len(drawn))
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


# ----------------------------------------------------------------------------------------------
# the papers' figures: CLIP-I vs CLIP-T per category, ablation bars, qualitative grids
# ----------------------------------------------------------------------------------------------
CATEGORY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def _save_pdf(figs: Sequence[Any], out_path: str | Path, dpi: float = DPI) -> Path:
    """One PDF page per figure (``dpi``: the resolution images are embedded at). The creation
    date is left out, so the same data gives the same bytes (matplotlib's PdfPages writes no
    other clock-dependent field)."""
    from matplotlib.backends.backend_pdf import PdfPages

    out_path = Path(out_path)
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"CreationDate": None}) as pdf:
        for fig in figs:
            pdf.savefig(fig, dpi=dpi)
    save_bytes(out_path, buf.getvalue())
    return out_path


def save_figure(fig, out_path: str | Path) -> Path:
    """Write ``fig`` as PNG or PDF, chosen by the suffix of ``out_path``."""
    suffix = Path(out_path).suffix.lower()
    if suffix == ".pdf":
        return _save_pdf([fig], out_path)
    if suffix == ".png":
        return _save(fig, out_path)
    raise ValueError(f"{out_path}: a figure is written as .png or .pdf, not {suffix or 'no suffix'}")


def _line_groups(d: pd.DataFrame, gcols: Sequence[str]) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """(key record, rows) per group, methods and parameter points in table order (method name,
    then parameters in natural order), whatever the summary's row order."""
    out = []
    for key, g in d.groupby(list(gcols), sort=False, dropna=False):
        out.append((dict(zip(gcols, key if isinstance(key, tuple) else (key,))), g))

    def order(item: tuple[dict[str, Any], pd.DataFrame]) -> tuple:
        rec = item[0]
        return tuple(params_sort_key(rec[c]) if c == "params" and isinstance(rec[c], str) else _natural(rec[c])
                     for c in gcols)

    return sorted(out, key=order)


def figure_clip_tradeoff(
    summary_by_category: pd.DataFrame, x_metric: str = "clip_t", y_metric: str = "clip_i", region: str = "all",
    categories: Sequence[str] | None = None, intervals: bool = True,
) -> tuple[Any, list[str], str | None]:
    """ZONE's Figure 6 ("stability analysis"): for each method (and parameter point), its mean
    ``y_metric`` (CLIP-I) against its mean ``x_metric`` (CLIP-T) in every edit category, the
    categories of one method joined by one line of one colour, each category marked by its own
    marker. Upper right is better when both metrics are higher-is-better (the paper's reading: a
    short line = stable across edit types, near the upper-right corner = good quality).

    ``summary_by_category`` is ``summarize(scores, by, per_category=True)``. Categories are
    joined in the order of ``categories`` (default: sorted); with ``intervals`` each point
    carries its 95% CIs as horizontal and vertical error bars. A method with no category where
    both means are finite is left out (returned in the skipped list).
    Returns ``(figure or None, skipped series, reason when None)``.
    """
    with _style():
        return _figure_clip_tradeoff(summary_by_category, x_metric, y_metric, region, categories, intervals)


def _figure_clip_tradeoff(s: pd.DataFrame, x_metric: str, y_metric: str, region: str,
                          categories: Sequence[str] | None, intervals: bool) -> tuple[Any, list[str], str | None]:
    if "category" not in s.columns:
        return None, [], "the summary has no category column (summarize(..., per_category=True))"
    d = s[s["metric"].isin([x_metric, y_metric]) & (s["region"] == region)]
    have = set(d["metric"])
    lacking = [m for m in (x_metric, y_metric) if m not in have]
    if lacking:
        return None, [], f"no {' or '.join(lacking)} rows in region {region}"
    gcols = [c for c in group_columns(s) if c != "category"]
    cats_present = sorted({str(c) for c in d["category"]})
    if categories is None:
        cats = cats_present
    else:
        unknown = [c for c in categories if c not in cats_present]
        if unknown:
            raise ValueError(f"categories {unknown} have no {x_metric}/{y_metric} rows; "
                             f"the summary's categories: {', '.join(cats_present)}")
        cats = list(categories)
    groups = _line_groups(d, gcols)
    label_keys = [c for c in gcols if c == "method" or d[c].astype(str).nunique(dropna=False) > 1]
    skipped: list[str] = []
    drawn = []
    for rec, g in groups:
        cells = {(str(r["category"]), r["metric"]): r for r in g.to_dict("records")}
        pts = []  # (category, x row, y row) of the categories where both means are finite
        for c in cats:
            xr, yr = cells.get((c, x_metric)), cells.get((c, y_metric))
            if xr is not None and yr is not None and np.isfinite(xr["mean"]) and np.isfinite(yr["mean"]):
                pts.append((c, xr, yr))
        label = _label(rec, label_keys)
        if not pts:
            skipped.append(f"{label}: no category with finite {x_metric} and {y_metric}")
            continue
        ns = [min(int(xr["n"]), int(yr["n"])) for _, xr, yr in pts]
        drawn.append((_legend_label(label, ns), pts))
    if not drawn:
        return None, skipped, "no series left to draw (" + "; ".join(skipped) + ")"
    cat_labels = [f"category: {c}" for c in cats]
    plot_width = 4.6
    fig, ax = _axes([lb for lb, _ in drawn] + cat_labels, plot_width=plot_width, height=4.6)
    for i, (label, pts) in enumerate(drawn):
        color = f"C{i % 10}"
        x = np.array([xr["mean"] for _, xr, _ in pts], dtype=np.float64)
        y = np.array([yr["mean"] for _, _, yr in pts], dtype=np.float64)
        ax.plot(x, y, ls="-", lw=1.5, color=color, label=label, zorder=2)
        for c, xr, yr in pts:
            marker = CATEGORY_MARKERS[cats.index(c) % len(CATEGORY_MARKERS)]
            ax.plot([xr["mean"]], [yr["mean"]], ls="none", marker=marker, ms=6, color=color, zorder=3)
        if intervals:
            xlo = np.array([xr["ci_low"] for _, xr, _ in pts], dtype=np.float64)
            xhi = np.array([xr["ci_high"] for _, xr, _ in pts], dtype=np.float64)
            ylo = np.array([yr["ci_low"] for _, _, yr in pts], dtype=np.float64)
            yhi = np.array([yr["ci_high"] for _, _, yr in pts], dtype=np.float64)
            ok = np.isfinite(xlo) & np.isfinite(xhi) & np.isfinite(ylo) & np.isfinite(yhi)
            if ok.any():
                ax.errorbar(x[ok], y[ok], xerr=_yerr(x[ok], xlo[ok], xhi[ok]), yerr=_yerr(y[ok], ylo[ok], yhi[ok]),
                            fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.6, zorder=1)
    # the category markers' key: black markers, no line (a proxy artist per category)
    for c in cats:
        ax.plot([], [], ls="none", marker=CATEGORY_MARKERS[cats.index(c) % len(CATEGORY_MARKERS)], color="0.2",
                label=f"category: {c}")
    hib = {m: _hib(d[d["metric"] == m]) for m in (x_metric, y_metric)}
    ax.set_xlabel(f"{x_metric} [{region}]  ({direction(hib[x_metric])})")
    corner = ("upper" if hib[y_metric] else "lower") + " " + ("right" if hib[x_metric] else "left")
    _titles(fig, ax, f"{y_metric} vs {x_metric} per edit category: one line per method joining its categories; "
            f"{corner} is better" + (", error bars = 95% bootstrap CI" if intervals else ""),
            f"{y_metric} [{region}]  ({direction(hib[y_metric])})")
    ax.grid(True, alpha=0.3)
    _legend(ax, len(drawn) + len(cats))
    _fit_width(fig, ax, plot_width)
    return fig, skipped, None


def plot_clip_tradeoff(
    summary_by_category: pd.DataFrame, out_path: str | Path, x_metric: str = "clip_t", y_metric: str = "clip_i",
    region: str = "all", categories: Sequence[str] | None = None, intervals: bool = True,
) -> PlotResult:
    """:func:`figure_clip_tradeoff` written to ``out_path`` (.png or .pdf); arguments as there."""
    with _style():
        fig, skipped, reason = _figure_clip_tradeoff(summary_by_category, x_metric, y_metric, region, categories,
                                                     intervals)
        if fig is None:
            return PlotResult(None, skipped, reason)
        return PlotResult(save_figure(fig, out_path), skipped)


def figure_ablation(
    summary: pd.DataFrame, metric: str, region: str = "all", by_category: bool = False,
    groups: Sequence[str] | None = None, categories: Sequence[str] | None = None,
) -> tuple[Any, list[str], str | None]:
    """An ablation bar chart: one metric in one region, one bar per method and parameter point
    (its legend label, with n), the 95% CI as error bars. With ``by_category`` (a summary from
    ``summarize(..., per_category=True)``) the bars are grouped by edit category along x.

    ``groups`` picks and orders the bars by legend label (without the ``[n=..]`` suffix, e.g.
    ``"recolor (strength=0.5)"``); default: every group in table order. A group whose values
    are all 0 or none finite is left out as in :func:`series_skip_reason`.
    Returns ``(figure or None, skipped series, reason when None)``.
    """
    with _style():
        return _figure_ablation(summary, metric, region, by_category, groups, categories)


def _figure_ablation(
    s: pd.DataFrame, metric: str, region: str, by_category: bool, groups: Sequence[str] | None,
    categories: Sequence[str] | None,
) -> tuple[Any, list[str], str | None]:
    if by_category and "category" not in s.columns:
        return None, [], "by_category needs a summary with a category column (summarize(..., per_category=True))"
    d = s[(s["metric"] == metric) & (s["region"] == region)]
    if len(d) == 0:
        return None, [], f"no rows for {metric} [{region}]"
    gcols = [c for c in group_columns(s) if c != "category"]
    cats = sorted({str(c) for c in d["category"]}) if by_category else [""]
    if by_category and categories is not None:
        unknown = [c for c in categories if c not in cats]
        if unknown:
            raise ValueError(f"categories {unknown} have no {metric} [{region}] rows; known: {', '.join(cats)}")
        cats = list(categories)
    label_keys = [c for c in gcols if c == "method" or d[c].astype(str).nunique(dropna=False) > 1]
    found = [(_label(rec, label_keys), g) for rec, g in _line_groups(d, gcols)]
    if groups is not None:
        by_label = dict(found)
        unknown = [g for g in groups if g not in by_label]
        if unknown:
            raise ValueError(f"groups {unknown} not in the {metric} [{region}] rows; known: "
                             + ", ".join(lb for lb, _ in found))
        found = [(g, by_label[g]) for g in groups]
    skipped: list[str] = []
    drawn = []
    for label, g in found:
        cells = {str(r["category"]) if by_category else "": r for r in g.to_dict("records")}
        row = [cells.get(c) for c in cats]
        present = [r for r in row if r is not None]
        why = series_skip_reason([r["mean"] for r in present])
        if why is not None:
            skipped.append(f"{label}: {why}")
            continue
        ns = [int(r["n"]) for r in present if np.isfinite(r["mean"])]
        drawn.append((_legend_label(label, ns), row))
    n_bars = sum(1 for _, row in drawn for r in row if r is not None and np.isfinite(r["mean"]))
    if n_bars < 2:
        why = "a single value (see the table)" if n_bars == 1 else "no series left to draw"
        return None, skipped, why + (f" ({'; '.join(skipped)})" if skipped else "")
    fig, ax, plot_width = _grouped_bars(drawn, len(cats), capsize=3)
    ax.set_xticklabels(cats if by_category else [f"{metric} [{region}]"])
    if by_category:
        ax.set_xlabel("edit category")
    hib = _hib(d)
    _titles(fig, ax, f"{metric} [{region}]: mean per method" + (" and category" if by_category else "")
            + ", error bars = 95% bootstrap CI", f"{metric} [{region}]  ({direction(hib)})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.axhline(0, color="0.3", lw=0.6)
    _legend(ax, len(drawn))
    _fit_width(fig, ax, plot_width)
    return fig, skipped, None


def plot_ablation(
    summary: pd.DataFrame, metric: str, out_path: str | Path, region: str = "all", by_category: bool = False,
    groups: Sequence[str] | None = None, categories: Sequence[str] | None = None,
) -> PlotResult:
    """:func:`figure_ablation` written to ``out_path`` (.png or .pdf); arguments as there."""
    with _style():
        fig, skipped, reason = _figure_ablation(summary, metric, region, by_category, groups, categories)
        if fig is None:
            return PlotResult(None, skipped, reason)
        return PlotResult(save_figure(fig, out_path), skipped)


GRID_CELL_PX = 256  # the longest side of an image in a grid cell, in pixels
GRID_CELL_IN = 1.6  # a grid cell's side in inches (files at max_side / GRID_CELL_IN dpi keep every thumbnail pixel)
GRID_ROWS_PER_PAGE = 8


def downscale(img: np.ndarray, max_side: int = GRID_CELL_PX) -> np.ndarray:
    """An RGB uint8 image scaled so its longest side is at most ``max_side`` (aspect kept, each
    side rounded, at least 1 px; Pillow's Lanczos filter); never enlarged. Grids embed these
    thumbnails, so a PDF of many samples stays small."""
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


@dataclasses.dataclass
class GridCell:
    """One cell of a qualitative grid: an image, or the reason there is none (shown as text)."""

    image: np.ndarray | None = None
    note: str | None = None


@dataclasses.dataclass
class Grid:
    """A qualitative grid's content: ``cells[r][c]`` for row labels ``rows`` and column titles
    ``columns``."""

    rows: list[str]
    columns: list[str]
    cells: list[list[GridCell]]


def figure_grid(grid: Grid, max_side: int = GRID_CELL_PX, cell_in: float = GRID_CELL_IN,
                title: str | None = None):
    """One figure of ``grid``: rows = samples, columns = source, each method's edit (and the
    target), column titles on top, the row label on the left, no ticks; an empty cell shows its
    note. Every image is downscaled with :func:`downscale`."""
    with _style():
        return _figure_grid(grid, max_side, cell_in, title)


def _figure_grid(grid: Grid, max_side: int, cell_in: float, title: str | None):
    nr, nc = len(grid.rows), len(grid.columns)
    if nr == 0 or nc == 0:
        raise ValueError("a grid needs at least one row and one column")
    fig = _figure(0.6 + nc * cell_in, 0.4 + nr * cell_in + (0.3 if title else 0.0))
    axes = fig.subplots(nr, nc, squeeze=False)
    chars = _chars_per_line(cell_in - 0.1, 8)
    for r in range(nr):
        for c in range(nc):
            ax = axes[r][c]
            cell = grid.cells[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if cell.image is not None:
                ax.imshow(downscale(cell.image, max_side), interpolation="antialiased")
            else:
                for sp in ax.spines.values():
                    sp.set_color("0.8")
                ax.text(0.5, 0.5, _wrap(cell.note or "n/a", chars), transform=ax.transAxes, ha="center",
                        va="center", fontsize=7, color="0.35")
            if r == 0:
                ax.set_title(_wrap(grid.columns[c], chars), fontsize=8)
            if c == 0:
                ax.set_ylabel(_wrap(grid.rows[r], _chars_per_line(cell_in, 8)), fontsize=8)
    if title:
        fig.suptitle(_wrap(title, _chars_per_line(fig.get_figwidth() - 0.4, TITLE_FONT)), fontsize=TITLE_FONT)
    return fig


def write_grid(grid: Grid, out_png: str | Path | None, out_pdf: str | Path | None,
               rows_per_page: int = GRID_ROWS_PER_PAGE, max_side: int = GRID_CELL_PX,
               title: str | None = None) -> list[Path]:
    """Write ``grid`` as PNG (one file per page of ``rows_per_page`` rows: ``name.png``, then
    ``name_p2.png`` ...) and as one PDF with a page per ``rows_per_page`` rows. Both at
    ``max_side / GRID_CELL_IN`` dpi, so a cell is ``max_side`` pixels wide and the thumbnails are
    not resampled again. Returns the files written."""
    if rows_per_page < 1:
        raise ValueError(f"rows_per_page must be >= 1, not {rows_per_page}")
    pages = [Grid(grid.rows[i:i + rows_per_page], grid.columns, grid.cells[i:i + rows_per_page])
             for i in range(0, len(grid.rows), rows_per_page)]
    written: list[Path] = []
    dpi = max_side / GRID_CELL_IN
    with _style():
        figs = [_figure_grid(p, max_side, GRID_CELL_IN, title) for p in pages]
        if out_png is not None:
            out_png = Path(out_png)
            for k, fig in enumerate(figs):
                name = out_png if k == 0 else out_png.with_name(f"{out_png.stem}_p{k + 1}{out_png.suffix}")
                written.append(_save(fig, name, dpi))
        if out_pdf is not None:
            written.append(_save_pdf(figs, out_pdf, dpi))
    return written


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _job_manifests(run_dir: Path) -> dict[str, dict[str, Any]]:
    import json

    out: dict[str, dict[str, Any]] = {}
    for j in sorted((run_dir / "jobs").glob("*/manifest.json")):
        try:
            m = json.loads(j.read_text())
        except (OSError, ValueError):
            continue  # a job without a readable manifest: its samples' sources are reported missing
        # by folder, and by the job id the tables carry: the shards of a sharded job (folders
        # <job>~shard<i>of<n>) share it, and any one of them names the dataset
        out[j.parent.name] = m
        out.setdefault(str(m.get("job") or j.parent.name), m)
    return out


def _edit_folders(run_dir: Path, manifests: dict[str, dict[str, Any]], cache_dir: str | Path | None) -> list[Path]:
    """Where a run's edits may be: ``cache_dir`` when given, the run's own ``edits/``, then the
    ``cache_dir`` each job recorded (a shared cache; relative paths from the working directory)."""
    roots: list[Path] = []
    if cache_dir is not None:
        roots.append(Path(cache_dir))
    roots.append(run_dir / "edits")
    for m in manifests.values():
        c = (m.get("config") or {}).get("cache_dir")
        if c:
            roots.append(Path(c))
    seen: list[Path] = []
    for r in roots:
        if r not in seen:
            seen.append(r)
    return seen


_EDIT_KEY = re.compile(r"[0-9a-f]{8,64}")


def _column_label(method: str, params: str, several: bool) -> str:
    if not several:
        return method
    fp = format_params(params, empty="")
    return f"{method} ({fp})" if fp else method


def qualitative_grid(
    run_dir: str | Path, methods: Sequence[str] | None = None, sample_ids: Sequence[str] | None = None,
    n_samples: int = 6, target: bool | None = None, cache_dir: str | Path | None = None,
    dataset: str | None = None,
) -> Grid:
    """The content of a run's qualitative grid: rows = samples, columns = the source, each
    method's edit (one column per method and parameter point), and the target when asked for.

    ``methods``: method names in the order wanted (each expands to its parameter points in
    natural order); default: every method in table order (by name). ``sample_ids``: the rows in
    the order wanted; default: the first ``n_samples`` sample ids, sorted. ``target``: add a
    ground-truth column (None: when any chosen sample has one). ``dataset``: which dataset, when
    the run holds several. Edits come from the edit cache (``edits.parquet``'s ``edit_key``);
    sources from the dataset each job's manifest records. A cell with no image (a skipped or
    failed edit, a missing file, an unreadable source) says why.
    """
    import difflib

    from .aggregate import load_run
    from .data import open_dataset

    run_dir = Path(run_dir)
    _, edits = load_run(run_dir)
    if len(edits) == 0:
        raise ValueError(f"{run_dir}: no edits to show (the jobs' edits.parquet tables are empty)")
    datasets = sorted({str(x) for x in edits["dataset"]})
    if dataset is not None:
        if dataset not in datasets:
            raise ValueError(f"{run_dir}: no dataset {dataset!r}; the run's datasets: {', '.join(datasets)}")
        edits = edits[edits["dataset"] == dataset]
    elif len(datasets) > 1:
        raise ValueError(f"{run_dir}: the run holds several datasets ({', '.join(datasets)}); pick one with dataset=")
    known_methods = sorted({str(m) for m in edits["method"]})
    if methods is None:
        methods = known_methods
    unknown = [m for m in methods if m not in known_methods]
    if unknown:
        raise ValueError(f"{run_dir}: no method(s) {', '.join(unknown)}; the run's methods: {', '.join(known_methods)}")
    known_ids = sorted({str(x) for x in edits["sample_id"]})
    if sample_ids is None:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, not {n_samples}")
        sample_ids = known_ids[:n_samples]
    for sid in sample_ids:
        if sid not in known_ids:
            close = difflib.get_close_matches(sid, known_ids, n=3, cutoff=0.3)
            raise ValueError(f"{run_dir}: no sample {sid!r} in the run's edits"
                             + (f" (closest: {', '.join(close)})" if close else ""))
    cols: list[tuple[str, str]] = []
    for m in methods:
        points = sorted({str(p) for p in edits.loc[edits["method"] == m, "params"]}, key=params_sort_key)
        cols += [(m, p) for p in points]
    several = {m: sum(1 for mm, _ in cols if mm == m) > 1 for m in methods}
    manifests = _job_manifests(run_dir)
    roots = _edit_folders(run_dir, manifests, cache_dir)
    opened: dict[str, tuple[Any, dict[str, Any]]] = {}  # dataset config -> (loader, id -> ref)

    def source_sample(sid: str):
        """The sample ``sid`` loaded from the dataset of the first job (by name) that edited it."""
        import json

        # tables without a job column (written by hand): any job's manifest may name the dataset
        jobs = (sorted({str(j) for j in edits.loc[edits["sample_id"] == sid, "job"]}) if "job" in edits.columns
                else sorted(manifests))
        cfg = next(((manifests[j].get("config") or {}).get("dataset") for j in jobs if j in manifests), None)
        if not cfg:
            return None, "no job manifest records the dataset"
        cfg = {**cfg, "shard": None}  # a shard's manifest: the sample may be in any shard of the dataset
        key = json.dumps(cfg, sort_keys=True, default=str)
        try:
            if key not in opened:
                ds = open_dataset(cfg)
                opened[key] = (ds, {r.id: r for r in ds.refs()})
            ds, refs = opened[key]
            ref = refs.get(sid)
            if ref is None:
                return None, f"sample {sid} is no longer in dataset {cfg.get('name', '?')}"
            return ds.load(ref), None
        except (OSError, ValueError, KeyError) as e:
            return None, f"source unavailable: {e}"

    def edit_cell(sid: str, method: str, params: str) -> GridCell:
        rows = edits[(edits["sample_id"] == sid) & (edits["method"] == method) & (edits["params"] == params)]
        if len(rows) == 0:
            return GridCell(note="not edited")
        rec = rows.iloc[0]  # the first seed (the tables' order)
        if rec["status"] != "ok":
            return GridCell(note=f"{rec['status']}: {reason_head(rec['reason'], 160)}")
        key = str(rec["edit_key"])
        if not _EDIT_KEY.fullmatch(key):  # the key names a cache folder: nothing else may be opened
            return GridCell(note=f"edit_key {key!r} of sample {sid} is not a cache key")
        for root in roots:
            p = root / key[:2] / key / "edit.png"
            if p.is_file():
                return GridCell(image=_read_rgb(p))
        return GridCell(note=f"edit {key} not in the cache")

    samples = {sid: source_sample(sid) for sid in sample_ids}
    if target is None:
        target = any(s is not None and s.target is not None for s, _ in samples.values())
    columns = ["source", *[_column_label(m, p, several[m]) for m, p in cols]] + (["target"] if target else [])
    cells: list[list[GridCell]] = []
    for sid in sample_ids:
        sample, why = samples[sid]
        row = [GridCell(image=sample.source) if sample is not None else GridCell(note=why)]
        row += [edit_cell(sid, m, p) for m, p in cols]
        if target:
            if sample is None:
                row.append(GridCell(note=why))
            elif sample.target is None:
                row.append(GridCell(note="no target"))
            else:
                row.append(GridCell(image=sample.target))
        cells.append(row)
    return Grid(list(sample_ids), columns, cells)


@dataclasses.dataclass
class RunFigures:
    """What :func:`figures_for_run` wrote (file name -> path) and, per figure not drawn or
    series left out, a line saying why."""

    files: dict[str, Path]
    notes: list[str]


def figures_for_run(
    run_dir: str | Path, out_dir: str | Path, *, formats: Sequence[str] = ("png", "pdf"),
    x_metric: str = "clip_t", y_metric: str = "clip_i", region: str = "all",
    ablation_metrics: Sequence[str] | None = None, grid: bool = True, methods: Sequence[str] | None = None,
    sample_ids: Sequence[str] | None = None, n_samples: int = 6, target: bool | None = None,
    rows_per_page: int = GRID_ROWS_PER_PAGE, cache_dir: str | Path | None = None,
) -> RunFigures:
    """The paper figures a run's data supports, written into ``out_dir`` in each of ``formats``:

    - ``fig_<y>_vs_<x>``: ZONE's Figure 6 (:func:`figure_clip_tradeoff`), when the run has both
      metrics in ``region``;
    - ``fig_<metric>_vs_<param>``: each metric in ``region`` against each parameter swept within
      a method, the 95% CI as error bars;
    - ``fig_ablation_<metric>``: each metric in ``region`` (default: every metric scored; or
      ``ablation_metrics``) as bars per method and parameter point, grouped by category when the
      run has more than one;
    - ``fig_grid`` (PNG per page, one PDF): the qualitative grid of :func:`qualitative_grid`
      (``fig_grid_<dataset>`` per dataset when the run holds several); ``methods``,
      ``sample_ids``, ``n_samples``, ``target``, ``cache_dir`` as there.

    Returns the files written and, for what was not drawn, the reasons.
    """
    from .aggregate import expand_params, load_run, summarize, swept_params

    bad = [f for f in formats if f not in ("png", "pdf")]
    if bad or not formats:
        raise ValueError(f"formats must be among png, pdf; got {list(formats)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, edits = load_run(run_dir)
    by = [c for c in ("dataset",) if c in scores.columns and scores["dataset"].nunique() > 1] + ["method", "params"]
    files: dict[str, Path] = {}
    notes: list[str] = []

    def draw(stem: str, what: str, make) -> None:
        with _style():
            fig, skipped, reason = make()
            if fig is None:
                notes.append(f"{what}: {reason}")
                return
            for f in formats:
                files[f"{stem}.{f}"] = save_figure(fig, out_dir / f"{stem}.{f}")
        notes.extend(f"{stem}: {x}" for x in skipped)

    if len(scores):
        summary = summarize(scores, by)
        by_cat = summarize(scores, by, per_category=True)
        draw(f"fig_{safe_name(y_metric)}_vs_{safe_name(x_metric)}", f"{y_metric} vs {x_metric}",
             lambda: _figure_clip_tradeoff(by_cat, x_metric, y_metric, region, None, True))
        metrics = sorted({str(m) for m in summary.loc[summary["region"] == region, "metric"]})
        sp = expand_params(summary)
        for param in swept_params(sp, within=[c for c in by if c != "params"]):
            for m in metrics:
                draw(f"fig_{safe_name(m)}_vs_{safe_name(param)}", f"{m} [{region}] vs {param}",
                     lambda m=m, param=param: _figure_metric_vs_param(sp, m, region, param, "bars"))
        n_cats = by_cat["category"].nunique()
        for m in (metrics if ablation_metrics is None else list(ablation_metrics)):
            draw(f"fig_ablation_{safe_name(m)}", f"ablation {m} [{region}]",
                 lambda m=m: _figure_ablation(by_cat if n_cats > 1 else summary, m, region, n_cats > 1, None, None))
    else:
        notes.append("no scores: no metric figure")
    if grid and len(edits):
        datasets = sorted({str(x) for x in edits["dataset"]})
        for ds in datasets:  # one grid per dataset: sample ids are only unique within one
            stem = "fig_grid" if len(datasets) == 1 else f"fig_grid_{safe_name(ds)}"
            g = qualitative_grid(run_dir, methods=methods, sample_ids=sample_ids, n_samples=n_samples, target=target,
                                 cache_dir=cache_dir, dataset=ds)
            for p in write_grid(g, out_dir / f"{stem}.png" if "png" in formats else None,
                                out_dir / f"{stem}.pdf" if "pdf" in formats else None, rows_per_page=rows_per_page,
                                title=None if len(datasets) == 1 else f"dataset {ds}"):
                files[p.name] = p
    return RunFigures(files, notes)
