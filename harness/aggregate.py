"""Aggregate a run's tidy score and edit tables into summaries and wide tables.

Inputs are the tables the runner writes per job (``results/<run>/jobs/<job>/scores.parquet``
and ``edits.parquet``). Everything here is a pure function of those tables and is
deterministic: stable sorting, a fixed bootstrap seed, no clocks. Nothing here imports
torch, so reports stay fast.

Conventions:

- A score that is NaN (flagged: empty region, no mask, metric error ...) is excluded from
  the mean and counted in ``n_nan``.
- ``+inf`` (e.g. PSNR of an identical image) is a real value: a group holding one has mean
  ``+inf`` and CI ``(inf, inf)``; the same for ``-inf``; a group holding both has a NaN mean.
- CIs are percentile bootstrap intervals of the mean over samples.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

SCORE_REQUIRED = ("method", "params", "dataset", "sample_id", "metric", "region", "value", "higher_is_better")
EDIT_REQUIRED = ("method", "params", "dataset", "sample_id", "status")
SCORE_SORT = ("run", "method", "params", "dataset", "sample_id", "metric", "region", "seed", "edit_key")
EDIT_SORT = ("run", "method", "params", "dataset", "sample_id", "seed", "edit_key")
# Columns of a summary that are statistics/descriptions, not grouping keys.
STAT_COLUMNS = (
    "mean", "ci_low", "ci_high", "n", "n_nan", "n_inf", "flags",
    "higher_is_better", "protocol", "weights", "region_rule",
)
NO_CATEGORY = "(none)"
N_RESAMPLES = 1000
CI_LEVEL = 0.95
BOOTSTRAP_SEED = 0


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def _as_dirs(run_dirs: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    out: list[Path] = []
    seen: set[Path] = set()
    for d in run_dirs:
        p = Path(d)
        key = p.resolve()
        if key not in seen:  # the same run given twice must not double its rows
            seen.add(key)
            out.append(p)
    if not out:
        raise ValueError("no run directories given")
    return out


def find_jobs(run_dir: str | Path) -> list[Path]:
    """The job folders of a run dir (those holding a scores or edits table), sorted by name; the
    shards of a sharded job each have one (``<job>~shard<i>of<n>``, harness.merge)."""
    jobs = Path(run_dir) / "jobs"
    if not jobs.is_dir():
        return []
    return sorted(
        (p for p in jobs.iterdir() if p.is_dir() and ((p / "scores.parquet").is_file() or (p / "edits.parquet").is_file())),
        key=lambda p: p.name,
    )


def _read(path: Path, required: Sequence[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    df = pd.read_parquet(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; is this a table written by the runner?")
    return df


def _concat(frames: list[pd.DataFrame], sort: Sequence[str]) -> pd.DataFrame:
    columns: list[str] = []
    for f in frames:
        columns += [c for c in f.columns if c not in columns]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    df = pd.concat(frames, ignore_index=True)
    for c in df.columns:
        # A text column that is all null in one job's table reads back as object, as a string
        # column elsewhere: concatenated, the column would be object. Give it the string dtype,
        # so the shards of a job concatenate to the unsharded job's table.
        if df[c].dtype == object:
            kinds = [f[c].dtype for f in frames if c in f.columns and isinstance(f[c].dtype, pd.StringDtype)]
            if kinds and all(f[c].isna().all() for f in frames
                             if c in f.columns and not isinstance(f[c].dtype, pd.StringDtype)):
                df[c] = df[c].astype(kinds[0])
    keys = [c for c in sort if c in df.columns]
    return df.sort_values(keys, kind="mergesort", na_position="last").reset_index(drop=True)


def load_run(run_dirs: str | Path | Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate the scores and edits tables of every job in one or more run dirs.

    Returns ``(scores, edits)``, sorted by run, method, params, dataset, sample id (and, for
    scores, metric and region; then seed and edit key). Raises ``FileNotFoundError`` when a
    dir holds no jobs.
    """
    from .merge import check_no_doubles, merged_set_rows, sharded_jobs

    score_frames: list[pd.DataFrame] = []
    edit_frames: list[pd.DataFrame] = []
    for d in _as_dirs(run_dirs):
        jobs = find_jobs(d)
        if not jobs:
            raise FileNotFoundError(
                f"{d}: no jobs found (expected {d}/jobs/<job_id>/scores.parquet and edits.parquet); "
                "is this a run directory, and has a job finished in it?"
            )
        # A sharded job (folders jobs/<job>~shard<i>of<n>) counts only when all its shards are
        # there and finished (harness.merge raises ShardError naming what is missing).
        groups = sharded_jobs(d)
        run_edits: list[pd.DataFrame] = []
        for j in jobs:
            s = _read(j / "scores.parquet", SCORE_REQUIRED)
            if s is not None:
                score_frames.append(s)
            e = _read(j / "edits.parquet", EDIT_REQUIRED)
            if e is not None:
                run_edits.append(e)
        if groups:
            check_no_doubles(pd.concat(run_edits, ignore_index=True) if run_edits else None, groups)
            sets = merged_set_rows(groups)  # the set metrics (FID, KID) over all shards of each job
            if len(sets):
                score_frames.append(sets)
        edit_frames += run_edits
    scores = _concat(score_frames, SCORE_SORT)
    for c in SCORE_REQUIRED:
        if c not in scores.columns:
            scores[c] = pd.Series(dtype="object")
    scores["value"] = scores["value"].astype("float64")
    scores["higher_is_better"] = scores["higher_is_better"].astype(bool)
    edits = _concat(edit_frames, EDIT_SORT)
    return scores, edits


# Cost columns: the runner's per-edit timings and peak memory, aggregated like any metric.
COST_METRICS = (
    ("cost_prep_s", "prep_seconds", 1.0),
    ("cost_infer_s", "infer_seconds", 1.0),
    ("cost_peak_mem_mib", "peak_memory_bytes", 1.0 / 2**20),
    # machine-independent: denoiser evaluations (UNet batch rows) and forward calls per edit
    # (methods/diffusion/counting.py); NaN, so no row, where a method does not count its networks
    ("cost_unet_evals", "unet_rows", 1.0),
    ("cost_unet_calls", "unet_calls", 1.0),
)


def cost_rows(edits: pd.DataFrame) -> pd.DataFrame:
    """Score-table rows (protocol ``runner``) for the preparation time, inference time and peak
    memory of every ok edit, so that tables aggregate them with means and CIs like metrics."""
    ok = edits[edits["status"] == "ok"] if len(edits) else edits
    frames = []
    keep = [c for c in ("run", "job", "method", "method_version", "params", "dataset", "sample_id", "category",
                        "seed", "edit_key") if c in ok.columns]
    for metric, column, factor in COST_METRICS:
        if column not in ok.columns or not len(ok):
            continue
        f = ok[keep].copy()
        f["metric"] = metric
        f["region"] = "all"
        f["value"] = ok[column].astype("float64") * factor
        f["flag"] = np.where(f["value"].isna(), "not_measured", None)
        f["protocol"] = "runner"
        f["weights"] = "none"
        f["region_rule"] = "per edit"
        f["higher_is_better"] = False
        frames.append(f)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*keep, "metric", "region", "value"])


# ----------------------------------------------------------------------------------------------
# bootstrap
# ----------------------------------------------------------------------------------------------
# Why not scipy.stats.bootstrap: a report has one group per method x parameter point x
# metric x region (x category), often thousands, and scipy resamples each group on its own
# (plus its BCa default needs a jackknife). Here the resampling of n values depends only on
# n, so the resample counts are drawn once per n (a fixed-seed numpy Generator) and applied
# to every group of that size as one matrix product: the whole report costs a few
# milliseconds and each group's CI is exactly what `bootstrap_ci` alone would return.
_CHUNK = 4_000_000  # resample-count matrix entries per block (memory bound for large n)


@lru_cache(maxsize=32)
def _resample_weights(n: int, n_resamples: int, seed: int) -> tuple[np.ndarray, ...]:
    """Blocks of a (n_resamples, n) matrix W, each row the counts of an n-of-n resample / n.

    ``W @ x`` are the bootstrap means of x. Row r is drawn from the same Generator stream
    whatever the block size, so the result is a function of (n, n_resamples, seed) only.
    """
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _CHUNK // max(n, 1))
    blocks = []
    for start in range(0, n_resamples, rows_per_block):
        r = min(rows_per_block, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n))
        flat = (idx + (np.arange(r) * n)[:, None]).ravel()
        counts = np.bincount(flat, minlength=r * n).reshape(r, n)
        w = counts / float(n)
        w.setflags(write=False)
        blocks.append(w)
    return tuple(blocks)


def _quantiles(means: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1.0 - level) / 2.0
    q = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return q[0], q[1]


def _special(x: np.ndarray) -> tuple[float, float, float] | None:
    """(mean, low, high) for groups that need no resampling: empty, non-finite, constant, n == 1."""
    if x.size == 0:
        return math.nan, math.nan, math.nan
    pos = bool(np.any(x == np.inf))
    neg = bool(np.any(x == -np.inf))
    if pos and neg:
        return math.nan, math.nan, math.nan
    if pos:
        return math.inf, math.inf, math.inf
    if neg:
        return -math.inf, -math.inf, -math.inf
    m = float(np.mean(x))
    if x.size == 1 or bool(np.all(x == x[0])):
        return m, m, m
    return None


def _boot_matrix(X: np.ndarray, n_resamples: int, level: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CI bounds for each column of X (n, G): all groups of one size at once."""
    n = X.shape[0]
    means = np.concatenate([w @ X for w in _resample_weights(n, n_resamples, seed)], axis=0)
    return _quantiles(means, level)


def bootstrap_ci(
    values: Any, n_resamples: int = N_RESAMPLES, level: float = CI_LEVEL, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (NaN excluded), deterministic.

    All-NaN or empty -> ``(nan, nan)``; one value (or all equal) -> ``(v, v)``; ``+inf``
    present -> ``(inf, inf)`` (``-inf`` likewise; both -> ``(nan, nan)``), without warnings.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    sp = _special(x)
    if sp is not None:
        return sp[1], sp[2]
    lo, hi = _boot_matrix(x[:, None], n_resamples, level, seed)
    return float(lo[0]), float(hi[0])


# ----------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------
def summarize(
    scores: pd.DataFrame,
    by: Sequence[str] = ("method", "params"),
    per_category: bool = False,
    n_resamples: int = N_RESAMPLES,
    level: float = CI_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """Long summary: one row per group x (metric, region) [x category].

    Columns: the ``by`` keys, ``category`` (when per_category; missing categories read
    ``"(none)"``), metric, region, mean, ci_low, ci_high, n (values used), n_nan (NaN values,
    excluded from the mean and counted), n_inf (infinite values), flags (``flag: count`` of the
    flagged rows), higher_is_better, protocol, weights, region_rule (several distinct strings
    in one group are joined with ``"; "``).
    """
    keys = list(by) + (["category"] if per_category else []) + ["metric", "region"]
    out_cols = keys + list(STAT_COLUMNS)
    if scores is None or len(scores) == 0:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in out_cols})
    missing = [c for c in keys if c not in scores.columns]
    if missing:
        raise KeyError(f"summarize: scores have no column(s) {', '.join(missing)}")
    df = scores
    if per_category:
        df = df.copy()
        cat = df["category"].astype(object)
        df["category"] = cat.where(cat.notna() & (cat != ""), NO_CATEGORY).astype(str)
    for c in ("flag", "protocol", "weights", "region_rule"):
        if c not in df.columns:
            df = df.assign(**{c: None})
    if "mean_floor" not in df.columns:  # tables written before the column existed
        df = df.assign(mean_floor=math.nan)

    # One pass: group ids, then per group only numpy slices (pandas per-group objects are slow
    # when a per-category sweep report has thousands of groups).
    gb = df.groupby(keys, sort=True, dropna=False)
    gid = gb.ngroup().to_numpy()
    sizes = gb.size()
    order = np.argsort(gid, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(gid, minlength=len(sizes)))])
    values = df["value"].to_numpy(dtype=np.float64)[order]
    hib = df["higher_is_better"].to_numpy(dtype=bool)[order]
    floors = pd.to_numeric(df["mean_floor"], errors="coerce").to_numpy(dtype=np.float64)[order]
    coded = {}
    for c in ("flag", "protocol", "weights", "region_rule"):
        codes, uniques = pd.factorize(df[c].astype(object), use_na_sentinel=True)
        coded[c] = (codes[order], [str(u) for u in uniques])
    key_rows = list(sizes.index) if len(keys) > 1 else [(k,) for k in sizes.index]

    def joined(c: str, a: int, b: int) -> str:
        codes, uniques = coded[c]
        u = np.unique(codes[a:b])
        vals = sorted({uniques[i] for i in u if i >= 0} - {""})
        return "; ".join(vals) if vals else "unknown"

    def flag_counts(a: int, b: int) -> str:
        codes, uniques = coded["flag"]
        u, cnt = np.unique(codes[a:b], return_counts=True)
        pairs = sorted((uniques[i], int(k)) for i, k in zip(u, cnt) if i >= 0 and uniques[i] != "")
        return ", ".join(f"{f}: {k}" for f, k in pairs)

    rows: list[dict[str, Any]] = []
    floor_of: dict[int, float] = {}  # row index -> the protocol's floor on the mean
    pending: dict[int, list[tuple[int, np.ndarray]]] = {}  # n -> [(row index, finite values)]
    for g, key in enumerate(key_rows):
        a, b = int(bounds[g]), int(bounds[g + 1])
        vals = values[a:b]
        nan = np.isnan(vals)
        x = vals[~nan]
        row = dict(zip(keys, key))
        row.update(
            n=int(x.size), n_nan=int(nan.sum()), n_inf=int(np.isinf(x).sum()),
            flags=flag_counts(a, b), higher_is_better=bool(hib[a]),
            protocol=joined("protocol", a, b), weights=joined("weights", a, b),
            region_rule=joined("region_rule", a, b),
        )
        sp = _special(x)
        if sp is None:
            row.update(mean=float(np.mean(x)), ci_low=math.nan, ci_high=math.nan)
            pending.setdefault(x.size, []).append((len(rows), x))
        else:
            row.update(mean=sp[0], ci_low=sp[1], ci_high=sp[2])
        f = floors[a:b]
        f = f[~np.isnan(f)]
        if f.size:
            floor_of[len(rows)] = float(f.max())
        rows.append(row)
    for n in sorted(pending):
        items = pending[n]
        lo, hi = _boot_matrix(np.stack([x for _, x in items], axis=1), n_resamples, level, seed)
        for j, (i, _) in enumerate(items):
            rows[i]["ci_low"] = float(lo[j])
            rows[i]["ci_high"] = float(hi[j])
    # Protocols that clamp the MEAN (torchmetrics CLIPScore: max(mean, 0)) keep per-edit rows
    # unclamped; the clamp is applied here, to the mean and its interval (a monotone map, so
    # clamping the bootstrap bounds equals bootstrapping the clamped mean).
    for i, floor in floor_of.items():
        for c in ("mean", "ci_low", "ci_high"):
            v = rows[i][c]
            if not math.isnan(v) and v < floor:
                rows[i][c] = floor
                if c == "mean":
                    rows[i]["flags"] = ", ".join(x for x in (rows[i]["flags"], f"mean_clamped_at: {floor:g}") if x)
    out = pd.DataFrame(rows, columns=out_cols)
    for c in ("mean", "ci_low", "ci_high"):
        out[c] = out[c].astype("float64")
    for c in ("n", "n_nan", "n_inf"):
        out[c] = out[c].astype("int64")
    out["higher_is_better"] = out["higher_is_better"].astype(bool)
    return out


def reason_head(r: Any, width: int = 240) -> str:
    """A skip/fail reason for a table: its first line, whitespace collapsed, cut at ``width``.
    (Multi-line reasons, such as a missing-weights message, name the problem on the first line
    and how to fix it on the next ones; edits.parquet keeps them whole.)"""
    if r is None or (isinstance(r, float) and math.isnan(r)):
        return ""
    lines = [ln for ln in str(r).strip().splitlines() if ln.strip()]
    head = " ".join(lines[0].split()) if lines else ""
    return head if len(head) <= width else head[: width - 1] + "…"


def _reason_counts(g: pd.DataFrame, width: int = 240) -> str:
    parts = []
    bad = g[g["status"] != "ok"]
    if len(bad) == 0:
        return ""
    reasons = bad["reason"] if "reason" in bad.columns else pd.Series([None] * len(bad), index=bad.index)
    counts: dict[tuple[str, str], int] = {}
    for st, r in zip(bad["status"], reasons):
        r = reason_head(r, width)
        counts[(str(st), r or "no reason given")] = counts.get((str(st), r or "no reason given"), 0) + 1
    for (st, r), c in sorted(counts.items()):
        parts.append(f"{st}: {r} (x{c})")
    return "; ".join(parts)


def _edit_flag_counts(flags: pd.Series) -> str:
    counts: dict[str, int] = {}
    for f in flags:
        if f is None or (isinstance(f, float) and math.isnan(f)):
            continue
        for part in str(f).split(","):
            part = part.strip()
            if part:
                counts[part] = counts.get(part, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


MAX_NOTE_SAMPLES = 5  # sample ids named per conversion note in a summary (then "+k more")
NOTES_SEP = "; "  # how the runner joins an edit's notes (harness.runner.NOTES_SEP; reports do not import the engine)


def _note_counts(g: pd.DataFrame) -> tuple[int, str]:
    """(edits with a note, ``"note (x2: s00, s03); other (x1: s01)"``) from the ``notes`` column
    (input conversion notes, ``"; "``-joined per edit); (0, "") when the column is absent (runs
    written before it existed) or empty."""
    if "notes" not in g.columns:
        return 0, ""
    per_note: dict[str, list[str]] = {}
    noted = 0
    ids = g["sample_id"].astype(str) if "sample_id" in g.columns else pd.Series([""] * len(g), index=g.index)
    for sid, v in zip(ids, g["notes"]):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        parts = [p.strip() for p in str(v).split(NOTES_SEP) if p.strip()]
        noted += bool(parts)
        for p in dict.fromkeys(parts):
            per_note.setdefault(p, []).append(sid)
    out = []
    for note, sids in sorted(per_note.items()):
        us = sorted(set(sids))
        more = len(us) - MAX_NOTE_SAMPLES
        shown = ", ".join(us[:MAX_NOTE_SAMPLES]) + (f", +{more} more" if more > 0 else "")
        out.append(f"{note} (x{len(sids)}: {shown})")
    return noted, "; ".join(out)


def edit_summary(edits: pd.DataFrame, by: Sequence[str] = ("method", "params")) -> pd.DataFrame:
    """Per group: n, ok, skipped, failed; mean prep/infer seconds over ok edits; max peak memory.

    Also ``reasons`` (skipped/failed reasons with counts, compact), ``flags`` (edit flags
    with counts), ``n_noted`` (edits with input conversion notes) and ``notes`` (each note with
    its count and sample ids; empty when the edits table has no ``notes`` column).
    """
    cols = list(by) + ["n", "ok", "skipped", "failed", "prep_seconds_mean", "infer_seconds_mean",
                       "peak_memory_bytes_max", "reasons", "flags", "n_noted", "notes"]
    if edits is None or len(edits) == 0:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
    rows = []
    for key, g in edits.groupby(list(by), sort=True, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        st = g["status"].astype(str)
        ok = g[st == "ok"]

        def _mean(col: str) -> float:
            if col not in ok.columns or len(ok) == 0:
                return math.nan
            v = ok[col].to_numpy(dtype=np.float64)
            v = v[~np.isnan(v)]
            return float(v.mean()) if v.size else math.nan

        peak = g["peak_memory_bytes"].to_numpy(dtype=np.float64) if "peak_memory_bytes" in g.columns else np.array([])
        peak = peak[~np.isnan(peak)]
        row.update(
            n=len(g), ok=int((st == "ok").sum()), skipped=int((st == "skipped").sum()),
            failed=int((st == "failed").sum()),
            prep_seconds_mean=_mean("prep_seconds"), infer_seconds_mean=_mean("infer_seconds"),
            peak_memory_bytes_max=float(peak.max()) if peak.size else math.nan,
            reasons=_reason_counts(g), flags=_edit_flag_counts(g["flags"]) if "flags" in g.columns else "",
        )
        row["n_noted"], row["notes"] = _note_counts(g)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------------------------
# wide tables and parameters
# ----------------------------------------------------------------------------------------------
def column_label(metric: str, region: str) -> str:
    return f"{metric} [{region}]"


def group_columns(summary: pd.DataFrame) -> list[str]:
    """The grouping keys of a summary (everything but metric, region and the statistics)."""
    return [c for c in summary.columns if c not in STAT_COLUMNS and c not in ("metric", "region")]


def metric_columns(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """The (metric, region) pairs of a summary, sorted."""
    pairs = summary[["metric", "region"]].drop_duplicates()
    return sorted((str(m), str(r)) for m, r in zip(pairs["metric"], pairs["region"]))


def wide_table(summary: pd.DataFrame, value: str | Sequence[str] = "mean", with_n: bool = True) -> pd.DataFrame:
    """Pivot a long summary to one row per group and one column per (metric, region).

    Column labels read ``"l1 [unedited]"``; with several ``value`` statistics,
    ``"l1 [unedited] mean"``, ``"l1 [unedited] ci_low"`` ... With ``with_n`` a column ``n``
    gives the number of scored samples per group (the largest n + n_nan over its columns).
    Rows keep the summary's group order.
    """
    values = [value] if isinstance(value, str) else list(value)
    gcols = group_columns(summary)
    pairs = metric_columns(summary)
    groups = summary[gcols].drop_duplicates().reset_index(drop=True)
    out = groups.copy()
    lookup = {}
    for rec in summary.to_dict("records"):
        lookup[(tuple(rec[c] for c in gcols), rec["metric"], rec["region"])] = rec
    gkeys = [tuple(r) for r in groups.itertuples(index=False, name=None)]
    for m, r in pairs:
        for v in values:
            label = column_label(m, r) if len(values) == 1 else f"{column_label(m, r)} {v}"
            out[label] = [lookup.get((k, m, r), {}).get(v, math.nan) for k in gkeys]
    if with_n:
        ns = []
        for k in gkeys:
            tot = [lookup[(k, m, r)]["n"] + lookup[(k, m, r)]["n_nan"] for m, r in pairs if (k, m, r) in lookup]
            ns.append(int(max(tot)) if tot else 0)
        out["n"] = ns
    return out


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k in sorted(obj):
            _flatten(f"{prefix}.{k}" if prefix else str(k), obj[k], out)
    elif isinstance(obj, list):
        out[prefix] = json.dumps(obj, sort_keys=True)
    else:
        out[prefix] = obj


def parse_params(params: str | None) -> dict[str, Any]:
    """A params JSON string as a flat dict (nested keys joined with '.', lists kept as JSON)."""
    if params is None or (isinstance(params, float) and math.isnan(params)) or params == "":
        return {}
    obj = json.loads(params)
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        _flatten("", obj, out)
    else:
        out["value"] = obj
    return out


def expand_params(df: pd.DataFrame, column: str = "params") -> pd.DataFrame:
    """A copy of ``df`` with one column ``p.<name>`` per parameter found in its params JSON.

    Nested parameters become ``p.a.b``; a parameter a row lacks is missing (None/NaN) there.
    Columns are sorted by name.
    """
    out = df.copy()
    parsed = {p: parse_params(p) for p in pd.unique(df[column])} if len(df) else {}
    names = sorted({k for d in parsed.values() for k in d})
    for name in names:
        out[f"p.{name}"] = [parsed[p].get(name) for p in df[column]]
        col = out[f"p.{name}"]
        if all(_is_number(v) or v is None for v in col) and any(v is not None for v in col):
            out[f"p.{name}"] = pd.to_numeric(col.astype(object).where(col.notna(), np.nan), errors="coerce")
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def swept_params(summary_with_params: pd.DataFrame, within: Sequence[str] = ("method",)) -> list[str]:
    """Numeric parameters (``p.`` columns) taking >= 2 distinct values within one group of ``within``."""
    out = []
    pcols = [c for c in summary_with_params.columns if c.startswith("p.")]
    for c in sorted(pcols):
        col = summary_with_params[c]
        if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            continue
        n = summary_with_params.groupby(list(within), dropna=False)[c].nunique(dropna=True)
        if (n >= 2).any():
            out.append(c[2:])
    return out


def params_sort_key(params: str) -> tuple:
    """Order parameter points naturally: numbers by value, then strings, key by key."""
    try:
        d = parse_params(params)
    except (ValueError, TypeError):
        return ((str(params), (2, 0.0, str(params))),)
    key = []
    for k in sorted(d):
        v = d[k]
        if _is_number(v):
            key.append((k, (0, float(v), "")))
        elif v is None:
            key.append((k, (1, 0.0, "")))
        else:
            key.append((k, (2, 0.0, str(v))))
    return tuple(key)


def format_params(params: str, empty: str = "-") -> str:
    """``'{"a": 1, "b": "x"}'`` -> ``'a=1, b=x'``; no parameters -> ``empty``."""
    try:
        d = parse_params(params)
    except (ValueError, TypeError):
        return str(params)
    if not d:
        return empty
    return ", ".join(f"{k}={_fmt_param_value(d[k])}" for k in sorted(d))


def _fmt_param_value(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)
