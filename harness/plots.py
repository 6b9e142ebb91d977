"""Plots for reports: metric vs swept parameter curves, and per-metric bar charts.

matplotlib is imported lazily inside the functions, and figures are drawn on an explicit
Agg canvas (no pyplot, no global backend switch), under matplotlib's default style so a
user's matplotlibrc cannot change the output. PNGs are written without the "Software"
metadata at a fixed size and dpi, so the same summary gives byte-identical files.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .aggregate import format_params, group_columns
from .fileio import save_bytes

DPI = 100


def direction(higher_is_better: bool) -> str:
    return "↑ higher is better" if higher_is_better else "↓ lower is better"


def safe_name(s: str) -> str:
    """A file-name-safe version of a metric, region or parameter name."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(s)).strip("-") or "x"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    save_bytes(out_path, buf.getvalue())
    return out_path


def _axes(labels: Sequence[str], plot_width: float = 4.6, height: float = 4.0):
    """A figure with fixed margins (no tight_layout: slow, and the same layout for every plot)
    and room on the right for a legend of these labels, so a legend never hides data."""
    n_entries = len(labels)
    left, right, bottom, top = 0.9, 0.2, 0.6, 0.45
    longest = max((len(x) for x in labels), default=0)
    legend = min(4.5, 0.55 + 0.056 * longest) * (1 if n_entries <= 40 else 2) if n_entries else 0.0
    height = max(height, 0.6 + 0.17 * min(n_entries, 40))
    width = left + plot_width + right + legend
    fig = _figure(width, height)
    ax = fig.add_axes((left / width, bottom / height, plot_width / width, (height - bottom - top) / height))
    return fig, ax


def _legend(ax, n_entries: int) -> None:
    if n_entries:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False,
                  ncols=1 if n_entries <= 40 else 2)


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


def _natural(v: Any) -> tuple:
    if _is_missing(v):
        return (2, 0.0, "")
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def _hib(d: pd.DataFrame) -> bool:
    return bool(d["higher_is_better"].iloc[0]) if len(d) else True


def plot_metric_vs_param(
    summary_with_params: pd.DataFrame, metric: str, region: str, param: str, out_path: str | Path
) -> Path | None:
    """Mean of (metric, region) against a numeric parameter, one line per method and setting
    of the other parameters, with the 95% CI as a band. ``param`` may carry the ``p.`` prefix.

    ``summary_with_params`` is ``expand_params(summarize(...))``. Returns the path written,
    or None when no row has a numeric value of ``param`` for this metric and region.
    """
    col = param if param.startswith("p.") else f"p.{param}"
    name = col[2:]
    s = summary_with_params
    if col not in s.columns:
        return None
    d = s[(s["metric"] == metric) & (s["region"] == region)].copy()
    d[col] = pd.to_numeric(d[col], errors="coerce")
    d = d[d[col].notna()]
    if len(d) == 0:
        return None
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
    lines = [t[:3] for t in lines]
    # colour by setting within a method, line style and marker by method: readable past 10 lines
    methods = sorted({m for m, _, _ in lines})
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    alpha = 0.2 if len(lines) <= 4 else 0.08
    with _style():
        fig, ax = _axes([lb for _, lb, _ in lines])
        hidden = 0
        xs_all: list[float] = []
        per_method: dict[str, int] = {}
        for method, label, g in lines:
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
            if not ok.any():
                continue
            ax.plot(x[ok], m[ok], marker=marker, ms=4, lw=1.5, ls=ls, color=color, label=label)
            band = ok & np.isfinite(lo) & np.isfinite(hi)
            if band.sum() >= 2:
                ax.fill_between(x[band], lo[band], hi[band], color=color, alpha=alpha, lw=0)
            elif band.any():
                ax.errorbar(x[band], m[band], yerr=[m[band] - lo[band], hi[band] - m[band]],
                            fmt="none", ecolor=color, capsize=3)
            xs_all.extend(x[ok].tolist())
        if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 100:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"{metric} [{region}]  ({direction(hib)})")
        ax.set_title(f"{metric} [{region}] vs {name}: mean, band = 95% bootstrap CI", fontsize=10)
        ax.grid(True, alpha=0.3)
        _legend(ax, len(lines))
        if hidden:
            ax.text(0.01, 0.01, f"{hidden} point(s) not finite (inf or n/a), not drawn",
                    transform=ax.transAxes, fontsize=7, va="bottom", ha="left", color="0.35")
        return _save(fig, out_path)


def plot_bars(summary: pd.DataFrame, metric: str, out_path: str | Path) -> Path | None:
    """Bar chart of one metric's mean per group (method x parameter point), regions side by
    side, 95% CI as error bars. Groups appear in the summary's row order."""
    d = summary[summary["metric"] == metric]
    if len(d) == 0:
        return None
    gcols = group_columns(summary)
    regions = sorted({str(r) for r in d["region"]})
    groups = d[gcols].drop_duplicates()
    label_keys = [c for c in gcols if c == "method" or groups[c].astype(str).nunique(dropna=False) > 1]
    recs = groups.to_dict("records")
    hib = _hib(d)
    lookup = {}
    for r in d.to_dict("records"):
        lookup[(tuple(str(r[c]) for c in gcols), str(r["region"]))] = r
    ng = len(recs)
    width = 0.8 / max(ng, 1)
    with _style():
        fig, ax = _axes([_label(r, label_keys) for r in recs], plot_width=min(9.0, max(3.4, 0.3 * ng * len(regions) + 0.6 * len(regions))))
        finite_vals = [r["mean"] for r in lookup.values() if np.isfinite(r["mean"])]
        ymax = max([abs(v) for v in finite_vals], default=1.0) or 1.0
        for i, rec in enumerate(recs):
            k = tuple(str(rec[c]) for c in gcols)
            xs, ms, lo_err, hi_err = [], [], [], []
            for j, reg in enumerate(regions):
                r = lookup.get((k, reg))
                x = j - 0.4 + width * (i + 0.5)
                if r is None:
                    continue
                m = r["mean"]
                if not np.isfinite(m):
                    ax.text(x, 0.02 * ymax, "inf" if m == math.inf else "-inf" if m == -math.inf else "n/a",
                            rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                xs.append(x)
                ms.append(m)
                lo, hi = r["ci_low"], r["ci_high"]
                lo_err.append(m - lo if np.isfinite(lo) else 0.0)
                hi_err.append(hi - m if np.isfinite(hi) else 0.0)
            ax.bar(xs, ms, width=width * 0.95, color=f"C{i % 10}", label=_label(rec, label_keys),
                   yerr=[lo_err, hi_err] if xs else None, capsize=2, error_kw={"lw": 0.8})
        ax.set_xticks(range(len(regions)))
        ax.set_xticklabels(regions)
        ax.set_xlabel("region")
        ax.set_ylabel(f"{metric}  ({direction(hib)})")
        ax.set_title(f"{metric}: mean per method, error bars = 95% bootstrap CI", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.axhline(0, color="0.3", lw=0.6)
        _legend(ax, ng)
        return _save(fig, out_path)
