"""Side by side: a published table's numbers next to a run's, row by row.

``edit-harness compare RUN... --paper zone/table1`` reads the published table
(:mod:`harness.paper`), the run's scores (:func:`harness.aggregate.load_run`, summarised with
:func:`harness.aggregate.summarize`: mean and 95% bootstrap interval per method x params x metric x
region) and ONE declared mapping per table, ``results/paper/<paper>/<table>.compare.yaml``::

    table: zone/table1
    methods:                      # paper method -> harness method (+ parameter values to select)
      DiffEdit: {method: diffedit}
      Recolor 1.0: {method: recolor, params: {strength: 1.0}, setting: ""}   # setting (or a list): only those rows
      ZONE (Ours): {unmapped: "ZONE is not implemented in the harness"}
    metrics:                      # paper metric -> harness (metric, region) and the scale factor
      L1: {metric: l1, region: all, factor: 1}   # our value x factor = the paper's scale
      Ours Pref. (%): {unmapped: "user study"}
      Inference time: {metric: cost_infer_s}   # a runner cost column (seconds per edit), as the report's
    settings:                     # optional: what a paper setting (sub-column) selects in the run
      Pasting: {category: paste}          # only the scores of samples of that category (or a list)
      Jaw: {region: 17pt}                 # this setting's rows read that region of every metric
      17 points: {params: {point_subset: 17pt}, region: {Landmark MSE: 17pt}}
                                          # the parameter point the setting's rows read (with each
                                          # method's own params), a region for the named metrics only

Nothing is guessed: a paper method or metric the mapping does not name, or names as
``unmapped``, is listed as such, and its rows read "not in this run". One output row per published
number (paper method x metric, in the table's order): the value as printed, ours (mean and 95%
interval, times ``factor``), ``delta = ours - published``, ``in CI`` (the published value lies in
our interval), ``n``. A run scored under another protocol than the table's is refused
(:class:`CompareError`, exit 2) unless ``allow_protocol_mismatch``; the caption then says so.

Outputs (:func:`write_compare`): ``compare.md``, ``compare.tex``, ``compare.csv`` (plain numbers,
``pandas.read_csv`` reads it as is; caption in ``compare.caption.txt``) and ``compare.html``.
"""
from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from .aggregate import COST_METRICS, cost_rows, format_params, load_run, parse_params, summarize
from .paper import PaperTableError, load_meta, load_table, table_path
from .report import _md_caption, _write_text, fmt, md_escape, tex_escape, write_frame_csv

MAPPING_SUFFIX = ".compare.yaml"
#: Row statuses: compared; the run has no value for it (or nothing is mapped); several of the
#: run's parameter points / datasets match and the mapping does not say which.
STATUSES = ("compared", "not in this run", "ambiguous")
NOT_IN_RUN = "not in this run"
COLUMNS = ("setting", "paper_method", "paper_metric", "published", "method", "params", "dataset", "metric",
           "region", "factor", "ours_mean", "ours_ci_low", "ours_ci_high", "delta", "in_ci", "n", "status", "why")


class CompareError(Exception):
    """The comparison cannot be made at all (exit 2): a bad mapping, no run, a protocol mismatch."""


# ----------------------------------------------------------------------------------------------
# the mapping file
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MethodMap:
    method: str
    params: dict[str, Any]
    setting: tuple[str, ...] | None  # None: rows of every setting; else only these settings' rows


@dataclasses.dataclass(frozen=True)
class MetricMap:
    metric: str
    region: str
    factor: float


@dataclasses.dataclass(frozen=True)
class SettingMap:
    categories: tuple[str, ...] | None  # None: every sample
    region: str | None  # None: each metric's own region
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # parameter values its rows select
    metric_regions: dict[str, str] = dataclasses.field(default_factory=dict)  # paper metric -> region

    def region_of(self, paper_metric: str, default: str) -> str:
        """The region a row of this setting reads for ``paper_metric`` (the metric's own: ``default``)."""
        return self.metric_regions.get(paper_metric) or self.region or default


@dataclasses.dataclass
class TableMapping:
    """A parsed ``.compare.yaml``: mapped names, and the names declared unmapped with the reason."""

    path: Path
    methods: dict[str, MethodMap]
    metrics: dict[str, MetricMap]
    unmapped_methods: dict[str, str]
    unmapped_metrics: dict[str, str]
    settings: dict[str, SettingMap] = dataclasses.field(default_factory=dict)


def mapping_path(name: str, root: Path | None = None) -> Path:
    """``results/paper/<paper>/<table>.compare.yaml`` beside the table's CSV."""
    p = table_path(name, root)
    return p.with_name(p.stem + MAPPING_SUFFIX)


def _entry(section: str, key: Any, value: Any, path: Path, fields: Sequence[str]) -> dict[str, Any]:
    where = f"{path}: {section} {key!r}"
    if not isinstance(key, str):
        raise CompareError(f"{where}: the paper name must be text")
    if not isinstance(value, dict):
        raise CompareError(f"{where}: expected a mapping with {', '.join(fields)} or 'unmapped: <why>', got {value!r}")
    extra = sorted(set(value) - set(fields) - {"unmapped"})
    if extra:
        raise CompareError(f"{where}: unknown key(s) {', '.join(map(str, extra))}; allowed: {', '.join(fields)}, unmapped")
    return value


def load_mapping(name: str, root: Path | None = None) -> TableMapping:
    """Read and check the mapping file of table ``name``; every error names the file and the entry."""
    import yaml

    path = mapping_path(name, root)
    if not path.is_file():
        raise CompareError(f"no mapping for {name}: {path} does not exist (declare which harness method and "
                           "metric each paper name is; see harness/compare.py)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise CompareError(f"{path}: not a mapping")
    if raw.get("table") != name:
        raise CompareError(f"{path}: table {raw.get('table')!r} != {name!r}")
    extra = sorted(set(raw) - {"table", "methods", "metrics", "settings"})
    if extra:
        raise CompareError(f"{path}: unknown key(s) {', '.join(map(str, extra))}; "
                           "allowed: table, methods, metrics, settings")
    m = TableMapping(path, {}, {}, {}, {})
    for key, value in (raw.get("settings") or {}).items():
        where = f"{path}: setting {key!r}"
        if not isinstance(value, dict) or not value or set(value) - {"category", "region", "params"}:
            raise CompareError(f"{where}: expected a mapping with category, region and/or params, got {value!r}")
        cats = value.get("category")
        if cats is not None:
            cats = (cats,) if isinstance(cats, str) else tuple(cats) if isinstance(cats, list) else None
            if not cats or not all(isinstance(c, str) and c for c in cats):
                raise CompareError(f"{where}: category must be a category name or a list of them, got "
                                   f"{value.get('category')!r}")
        region = value.get("region")
        per_metric: dict[str, str] = {}
        if isinstance(region, dict):
            per_metric, region = region, None
            if not per_metric or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in per_metric.items()):
                raise CompareError(f"{where}: region must be a harness region name or a mapping paper metric -> "
                                   f"region name, got {value.get('region')!r}")
        elif region is not None and (not isinstance(region, str) or not region):
            raise CompareError(f"{where}: region must be a harness region name, got {region!r}")
        sparams = value.get("params") or {}
        if not isinstance(sparams, dict):
            raise CompareError(f"{where}: params must be a mapping, got {sparams!r}")
        m.settings[str(key)] = SettingMap(cats, region, parse_params_dict(sparams), dict(per_metric))
    for key, value in (raw.get("methods") or {}).items():
        v = _entry("method", key, value, path, ("method", "params", "setting"))
        if "unmapped" in v:
            m.unmapped_methods[key] = str(v["unmapped"])
            continue
        if not isinstance(v.get("method"), str) or not v["method"]:
            raise CompareError(f"{path}: method {key!r}: 'method' (a harness method name) is missing")
        params = v.get("params") or {}
        if not isinstance(params, dict):
            raise CompareError(f"{path}: method {key!r}: params must be a mapping, got {params!r}")
        setting = v.get("setting")
        if isinstance(setting, list):
            setting = tuple(str(x) for x in setting)
        elif setting is not None:
            setting = (str(setting),)
        m.methods[key] = MethodMap(v["method"], parse_params_dict(params), setting)
    for key, value in (raw.get("metrics") or {}).items():
        v = _entry("metric", key, value, path, ("metric", "region", "factor"))
        if "unmapped" in v:
            m.unmapped_metrics[key] = str(v["unmapped"])
            continue
        factor = v.get("factor", 1)
        if not isinstance(v.get("metric"), str) or not isinstance(v.get("region", "all"), str):
            raise CompareError(f"{path}: metric {key!r}: 'metric' and 'region' must be harness names")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (math.isfinite(factor) and factor > 0):
            raise CompareError(f"{path}: metric {key!r}: factor {factor!r} is not a positive number")
        m.metrics[key] = MetricMap(v["metric"], v.get("region", "all"), float(factor))
    for skey, sm in m.settings.items():
        stray = sorted(set(sm.metric_regions) - set(m.metrics))
        if stray:
            raise CompareError(f"{path}: setting {skey!r}: region names metric(s) {', '.join(map(repr, stray))} "
                               "that the mapping's metrics do not map")
        for mkey, mm in m.methods.items():
            clash = sorted(k for k in set(sm.params) & set(mm.params) if sm.params[k] != mm.params[k])
            if clash and (mm.setting is None or skey in mm.setting):
                raise CompareError(f"{path}: method {mkey!r} and setting {skey!r} select different values of "
                                   f"{', '.join(clash)}")
    return m


def parse_params_dict(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested params as the flat ``a.b`` keys :func:`harness.aggregate.parse_params` gives a run's."""
    import json

    return parse_params(json.dumps(dict(params), sort_keys=True))


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompareResult:
    table: str
    frame: pd.DataFrame  # COLUMNS, one row per published number
    caption: list[str]
    mapping: TableMapping
    unmapped_methods: list[str]  # paper method names with no harness method (declared or not)
    unmapped_metrics: list[str]
    protocol_mismatch: bool


def _params_match(run_params: str, wanted: Mapping[str, Any]) -> bool:
    got = parse_params(run_params)
    return all(k in got and got[k] == v for k, v in wanted.items())


def _distinct(values: Iterable[Any]) -> list[str]:
    return sorted({str(v) for v in values if v is not None and str(v) not in ("", "nan")})


def compare(run_dirs: str | Path | Sequence[str | Path], table: str, root: Path | None = None,
            allow_protocol_mismatch: bool = False, **summarize_kw: Any) -> CompareResult:
    """The published table ``table`` side by side with the runs' scores (see module doc)."""
    try:
        paper = load_table(table, root)
        meta = load_meta(table, root)
    except PaperTableError as e:
        raise CompareError(str(e)) from None
    mapping = load_mapping(table, root)
    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    try:
        scores, edits = load_run(dirs)
    except FileNotFoundError as e:
        raise CompareError(str(e)) from None
    if scores.empty:
        raise CompareError(f"{', '.join(map(str, dirs))}: no scores")

    # Names the table has that the mapping neither maps nor declares unmapped are listed too.
    unmapped_methods = [m for m in dict.fromkeys(paper["method"]) if m not in mapping.methods]
    unmapped_metrics = [m for m in dict.fromkeys(paper["metric"]) if m not in mapping.metrics]
    for kind, names, known in (("method", mapping.methods, set(paper["method"])),
                               ("metric", mapping.metrics, set(paper["metric"])),
                               ("setting", mapping.settings, set(paper["setting"]))):
        stray = sorted(set(names) - known)
        if stray:
            raise CompareError(f"{mapping.path}: {kind}(s) {', '.join(map(repr, stray))} are not in {table}")

    table_protocols = _distinct(paper.loc[paper["metric"].isin(list(mapping.metrics)), "protocol"])
    run_protocols = _distinct(scores["protocol"])
    mismatch = bool(table_protocols) and run_protocols != table_protocols
    if mismatch and not allow_protocol_mismatch:
        raise CompareError(
            f"protocol mismatch: {table} was measured under protocol {', '.join(table_protocols)}, the run under "
            f"{', '.join(run_protocols) or 'none'}; run with metrics={table_protocols[0]}, or pass "
            "--allow-protocol-mismatch to compare anyway (the caption then says so)")

    if any(km.metric in {c[0] for c in COST_METRICS} for km in mapping.metrics.values()):
        # a runner cost column (cost_prep_s, cost_infer_s, ...) mapped like a metric: its rows as
        # the report makes them (harness/aggregate.py cost_rows), after the protocol check
        scores = pd.concat([scores, cost_rows(edits)], ignore_index=True)
    summaries: dict[tuple[str, ...] | None, pd.DataFrame] = {}

    def summary_of(categories: tuple[str, ...] | None) -> pd.DataFrame:
        # one summary per category selection (a setting's samples), made when a row needs it
        if categories not in summaries:
            part = scores if categories is None else scores[scores["category"].astype(str).isin(categories)]
            summaries[categories] = summarize(part, by=("dataset", "method", "params"), **summarize_kw)
        return summaries[categories]

    rows: list[dict[str, Any]] = []
    for r in paper.itertuples(index=False):
        row: dict[str, Any] = {c: None for c in COLUMNS}
        row.update(setting=r.setting, paper_method=r.method, paper_metric=r.metric, published=float(r.value),
                   status=NOT_IN_RUN, in_ci="", n=0)
        row["_decimals"] = int(r.decimals)
        mm = mapping.methods.get(r.method)
        km = mapping.metrics.get(r.metric)
        if mm is not None and mm.setting is not None and r.setting not in mm.setting:
            row["why"] = f"method mapped for setting {' / '.join(map(repr, mm.setting))} only"
        elif mm is None:
            row["why"] = mapping.unmapped_methods.get(r.method, "method not mapped")
        elif km is None:
            row["why"] = mapping.unmapped_metrics.get(r.metric, "metric not mapped")
        else:
            sm = mapping.settings.get(r.setting, SettingMap(None, None))
            region = sm.region_of(r.metric, km.region)
            wanted = {**mm.params, **sm.params}  # no clash: load_mapping refuses one
            row.update(method=mm.method, params=format_params(_json(wanted), empty=""), metric=km.metric,
                       region=region, factor=km.factor)
            summary = summary_of(sm.categories)
            hit = summary[(summary["method"] == mm.method) & (summary["metric"] == km.metric)
                          & (summary["region"] == region)]
            hit = hit[[_params_match(p, wanted) for p in hit["params"]]]
            if hit.empty:
                row["why"] = f"the run has no {km.metric}/{region} of {mm.method}" + (
                    f" with {format_params(_json(wanted))}" if wanted else "") + (
                    f" on samples of category {', '.join(sm.categories)}" if sm.categories else "")
            elif len(hit) > 1:
                row["status"] = "ambiguous"
                pts = "; ".join(f"{d} {format_params(p)}" for d, p in zip(hit["dataset"], hit["params"]))
                row["why"] = f"{len(hit)} datasets / parameter points match ({pts}): give params in {mapping.path.name}"
            elif int(hit.iloc[0]["n"]) == 0:
                # scored, but no sample has a value (e.g. background LPIPS on a set without masks)
                s = hit.iloc[0]
                row.update(dataset=s["dataset"], params=format_params(s["params"], empty=""))
                row["why"] = (f"the run's {km.metric}/{region} of {mm.method} has no value on any sample "
                              f"({int(s.get('n_nan', 0) or 0)} NaN)")
            else:
                s = hit.iloc[0]
                f = km.factor
                ours, lo, hi = s["mean"] * f, s["ci_low"] * f, s["ci_high"] * f
                row.update(dataset=s["dataset"], params=format_params(s["params"], empty=""),
                           ours_mean=ours, ours_ci_low=lo, ours_ci_high=hi, delta=ours - float(r.value),
                           n=int(s["n"]), status="compared", why="",
                           in_ci=("n/a" if not (math.isfinite(lo) and math.isfinite(hi))
                                  else "yes" if lo <= float(r.value) <= hi else "no"))
                row["_protocol"], row["_weights"] = s["protocol"], s["weights"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    caption = _caption(table, meta, paper, frame, mapping, dirs, unmapped_methods, unmapped_metrics,
                       table_protocols, run_protocols, mismatch)
    return CompareResult(table, frame, caption, mapping, unmapped_methods, unmapped_metrics, mismatch)


def _json(params: Mapping[str, Any]) -> str:
    import json

    return json.dumps(dict(params), sort_keys=True)


def _caption(table: str, meta: Mapping[str, Any], paper: pd.DataFrame, frame: pd.DataFrame, mapping: TableMapping,
             dirs: Sequence[Path], unmapped_methods: list[str], unmapped_metrics: list[str],
             table_protocols: list[str], run_protocols: list[str], mismatch: bool) -> list[str]:
    done = frame[frame["status"] == "compared"]
    col = lambda c: _distinct(done[c]) if c in done.columns else []  # noqa: E731
    ns = sorted(set(int(n) for n in done["n"])) if len(done) else []
    lines = [
        f"{table} (published) side by side with {', '.join(d.name for d in dirs)}",
        f"Paper: {meta.get('source', table)}; protocol {', '.join(table_protocols) or 'none'}; "
        f"dataset: {meta.get('dataset', 'not stated')}",
        f"Ours: protocol {', '.join(col('_protocol')) or ', '.join(run_protocols) or 'none'}; "
        f"weights: {', '.join(col('_weights')) or 'n/a'}; dataset: {', '.join(col('dataset')) or 'n/a'}; "
        f"samples per value (n): {', '.join(map(str, ns)) or 'n/a'}",
        # the file's name under the published tables' folder: no machine path in a caption
        f"Mapping: results/paper/{mapping.path.parent.name}/{mapping.path.name}",
        "Ours = mean [95% bootstrap interval] x the mapping's factor (the paper's scale); delta = ours - published; "
        "in CI: the published value lies inside our interval",
        f"Compared: {len(done)} of {len(frame)} published numbers",
    ]
    if mismatch:
        lines.append(f"PROTOCOL MISMATCH (allowed by --allow-protocol-mismatch): the table's protocol is "
                     f"{', '.join(table_protocols)}, the run's {', '.join(run_protocols) or 'none'}")
    if unmapped_methods:
        lines.append(f"Paper methods with no harness method: {', '.join(unmapped_methods)}")
    if unmapped_metrics:
        lines.append(f"Paper metrics with no harness metric: {', '.join(unmapped_metrics)}")
    return lines


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
HEAD = ("Setting", "Paper method", "Metric", "Published", "Ours (95% CI)", "Delta", "In CI", "n", "Harness")


def _cells(row: Mapping[str, Any]) -> list[str]:
    """One display row: the published value with its printed decimals, ours at one more decimal."""
    d = int(row["_decimals"])
    published = f"{row['published']:.{d}f}"
    if row["status"] != "compared":
        ours = row["status"] + (f" ({row['why']})" if row["why"] else "")
        return [row["setting"], row["paper_method"], row["paper_metric"], published, ours, "", "", str(row["n"]), ""]
    num = lambda v: fmt(v) if not math.isfinite(v) else f"{v:.{d + 1}f}"  # noqa: E731
    ours = f"{num(row['ours_mean'])} [{num(row['ours_ci_low'])}, {num(row['ours_ci_high'])}]"
    harness = f"{row['method']} {row['params']} {row['metric']}/{row['region']}".replace("  ", " ")
    if row["factor"] != 1:
        harness += f" x{row['factor']:g}"
    return [row["setting"], row["paper_method"], row["paper_metric"], published, ours, f"{row['delta']:+.{d + 1}f}",
            row["in_ci"], str(row["n"]), harness]


def csv_frame(result: CompareResult) -> pd.DataFrame:
    """The plain-number view (the columns of :data:`COLUMNS`)."""
    return result.frame[list(COLUMNS)].copy()


def write_compare(result: CompareResult, out_dir: Path) -> dict[str, Path]:
    """compare.md / .tex / .csv (+ .caption.txt) / .html under ``out_dir``; returns the paths by format."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = result.frame.to_dict("records")
    body = [_cells(r) for r in recs]
    files: dict[str, Path] = {}

    md = _md_caption(result.caption) + ["", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    md += ["| " + " | ".join(md_escape(c) for c in cells) + " |" for cells in body]
    files["md"] = out_dir / "compare.md"
    _write_text(files["md"], "\n".join(md) + "\n")

    tex = [f"% {ln}" for ln in result.caption] + ["% requires \\usepackage{booktabs}", "\\begin{table}[t]",
                                                   "\\centering",
                                                   f"\\caption{{{tex_escape('. '.join(result.caption))}.}}",
                                                   f"\\label{{tab:compare-{result.table.replace('/', '-')}}}",
                                                   "\\resizebox{\\linewidth}{!}{%",
                                                   f"\\begin{{tabular}}{{lll{'r' * 5}l}}", "\\toprule",
                                                   " & ".join(tex_escape(h) for h in HEAD) + " \\\\", "\\midrule"]
    tex += [" & ".join(tex_escape(c) for c in cells) + " \\\\" for cells in body]
    tex += ["\\bottomrule", "\\end{tabular}}", "\\end{table}"]
    files["tex"] = out_dir / "compare.tex"
    _write_text(files["tex"], "\n".join(tex) + "\n")

    files["csv"], files["caption"] = write_frame_csv(out_dir / "compare.csv", csv_frame(result), result.caption)

    e = html.escape
    page = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{e(result.caption[0])}</title>",
            "</head><body>", f"<h1>{e(result.caption[0])}</h1>", "<ul>"]
    page += [f"<li>{e(ln.strip())}</li>" for ln in result.caption[1:]]
    page += ["</ul>", "<table border=\"1\">", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in HEAD) + "</tr>"]
    page += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>" for cells in body]
    page += ["</table>", "</body></html>"]
    files["html"] = out_dir / "compare.html"
    _write_text(files["html"], "\n".join(page) + "\n")
    return files


def terminal(result: CompareResult) -> str:
    """A plain-text view for the console: caption, then one line per row."""
    body = [_cells(r) for r in result.frame.to_dict("records")]
    widths = [max(len(str(x)) for x in col) for col in zip(HEAD, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([*result.caption, "", line(HEAD), *(line(c) for c in body)])
