"""Sharded jobs: the ``dataset.shards=N`` sweep axis, each shard's part of a set metric, and the
merge that checks a run's shards are complete before its tables are read.

A job sharded with ``dataset.shard=i/n`` (or the sweep ``dataset.shards=n``, which makes the
``n`` jobs ``dataset.shard=0/n ... n-1/n``) edits the samples whose id hashes to shard ``i``
(:func:`harness.data.generic.shard_index`). Every shard carries the unsharded job's id in its
tables; its folder is ``jobs/<job id>~shard<i>of<n>/`` (tables, ``manifest.json`` written last,
and ``sets/<metric>.npz`` with its part of each set metric). Reading a run
(:func:`harness.aggregate.load_run`) first checks, per job id, that its shards are complete:

- every shard ``0..n-1`` present, with its manifest (a task killed before the end has none);
- one shard count per job, and not both an unsharded folder and shards of the same job;
- no sample in two shards;

otherwise :class:`ShardError` names each job (method, dataset), what is missing or doubled,
and how to finish it (re-submit the same command: finished edits are cached and not recomputed).
The shard tables concatenated and sorted as the report sorts them are then exactly the
unsharded job's tables (same job id, keys, values).

Set metrics (FID, KID): a shard stores the features its edits gave, with their sample ids and
the content hash of each reference image (:meth:`harness.metrics.fid.InceptionSetMetric.begin_log`);
the merge sorts every shard's rows by sample id, the order an unsharded job streams its set in,
and replays them in the protocol's batches (:meth:`~harness.metrics.fid.InceptionSetMetric.replay`):
the same float64 sums as the unsharded job, hence the same value. The merged value is stored in
the edit cache under the unsharded set key (``sets/<key>.json``), so the next report reads it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .data.generic import SHARD_FOLDER_RE

SHARDS_KEY = "dataset.shards"
SHARD_KEY = "dataset.shard"


class ShardError(ValueError):
    """A run whose sharded jobs are incomplete or doubled (message names each problem)."""


# ----------------------------------------------------------------------------------------------
# the sweep axis
# ----------------------------------------------------------------------------------------------
def _key_of(text: str) -> str:
    return text.split("=", 1)[0].lstrip("+~")


def expand_shards(overrides: Sequence[str]) -> list[str]:
    """``dataset.shards=N`` (also ``+``/``++``) -> ``dataset.shard=0/N,1/N,...,N-1/N``, a sweep
    of one job per shard; every other override unchanged. ``N`` must be a whole number >= 1;
    ``dataset.shards`` with ``dataset.shard`` is refused (ValueError naming both)."""
    out: list[str] = []
    given = [o for o in overrides if _key_of(o) == SHARDS_KEY]
    if not given:
        return list(overrides)
    if len(given) > 1:
        raise ValueError(f"{SHARDS_KEY} is given {len(given)} times ({', '.join(given)}): give it once")
    if any(_key_of(o) == SHARD_KEY for o in overrides):
        raise ValueError(f"'{given[0]}' and {SHARD_KEY}=... both choose shards: give dataset.shards=N (a sweep "
                         "of all N shards) or dataset.shard=i/N (one shard)")
    for o in overrides:
        if _key_of(o) != SHARDS_KEY:
            out.append(o)
            continue
        value = o.split("=", 1)[1].strip() if "=" in o else ""
        if not re.fullmatch(r"\d+", value) or int(value) < 1:
            raise ValueError(f"{SHARDS_KEY} must be a whole number >= 1 (the number of shards), got '{o}'")
        n = int(value)
        out.append(f"{SHARD_KEY}=" + ",".join(f"{i}/{n}" for i in range(n)))
    return out


# ----------------------------------------------------------------------------------------------
# a shard's part of each set metric
# ----------------------------------------------------------------------------------------------
def _set_items(job, records) -> list:
    from .runner import EditStatus, _scored

    return sorted(((ref, key, rec) for ref, key, rec in records if rec.status == EditStatus.OK and _scored(ref)),
                  key=lambda t: t[0].id)


def write_set_parts(job, records) -> list[Path]:
    """For each set metric of a shard's job (:class:`harness.runner.Job`), ``sets/<name>.npz`` in
    its folder: the features of its ok edits (sample-id order) and of their reference images,
    with the row fields of the metric. Kept when a file for the same edits and metric exists."""
    from .cache import stable_hash
    from .metrics.base import SET_SAMPLE_ID, ScoringItem
    from .fileio import atomic_write
    from .runner import _decode_tokens, _join_tokens
    from .types import SampleError
    from .data import SampleRef
    import traceback

    suite = job.suite
    ok = _set_items(job, records)
    desc = suite.describe()
    written = []
    for entry in suite.set_entries:
        path = job.job_dir / "sets" / f"{entry.name}.npz"
        part_key = stable_hash({"metric": entry.hash, "edits": [[r.id, k] for r, k, _ in ok]})
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    if json.loads(str(z["meta"]))["part_key"] == part_key:
                        written.append(path)
                        continue
            except (OSError, ValueError, KeyError):
                pass
        d = desc[entry.name]
        meta: dict[str, Any] = {
            "part_key": part_key, "metric": entry.name, "metric_hash": entry.hash,
            "row": {**job._base_row(SampleRef(SET_SAMPLE_ID, {}, ""), ""), "protocol": suite.protocol,
                    "weights": d["weights"], "region_rule": d["region_rule"],
                    "higher_is_better": bool(d["higher_is_better"]), "mean_floor": d["mean_floor"]},
            "flag": None, "unreadable": [], "decode": None,
        }
        ids: list[str] = []
        keys: list[str] = []
        logged = {"edit": np.zeros((0, 0), np.float32), "ref_hash": [], "ref_rows": {}}
        suite._load(entry, "(set)")
        if entry.unavailable:
            meta["flag"] = "unavailable"
        elif not hasattr(entry.metric, "begin_log"):
            meta["flag"] = "error:not_combinable_over_shards"
        else:
            differs: set[str] = set()
            try:
                entry.metric.reset()
                entry.metric.begin_log()
                bs = suite.batch_size
                for start in range(0, len(ok), bs):
                    batch, batch_ids = [], []
                    for ref, key, rec in ok[start : start + bs]:
                        try:
                            batch.append(ScoringItem(sample=job.load_for_scoring(ref), edit=rec.image(),
                                                     edit_mask=rec.mask()))
                            batch_ids.append((ref.id, key))
                        except Exception as e:
                            field = e.field if isinstance(e, SampleError) else "edit"
                            meta["unreadable"].append(f"error:{type(e).__name__}:{field}")
                            entry.errors.append({"sample_id": ref.id, "error": str(e),
                                                 "traceback": traceback.format_exc()})
                    differs.update(_decode_tokens(it.sample) for it in batch)
                    if batch:
                        entry.metric.update(suite.prepare(batch))
                        ids += [i for i, _ in batch_ids]
                        keys += [k for _, k in batch_ids]
                logged = entry.metric.take_log()
                meta["decode"] = _join_tokens(differs)
            except Exception as e:
                entry.errors.append({"sample_id": "(set)", "error": str(e), "traceback": traceback.format_exc()})
                meta["flag"] = f"error:{type(e).__name__}"
                ids, keys = [], []
        hashes = sorted(logged["ref_rows"])
        ref_rows = (np.stack([logged["ref_rows"][h] for h in hashes]) if hashes
                    else np.zeros((0, 0), np.float32))
        arrays = {"meta": np.array(json.dumps(meta, default=str)), "sample_ids": np.array(ids, dtype=str),
                  "keys": np.array(keys, dtype=str), "edit_rows": np.asarray(logged["edit"]),
                  "ref_hash": np.array(logged["ref_hash"], dtype=str), "ref_row_hashes": np.array(hashes, dtype=str),
                  "ref_rows": ref_rows}
        atomic_write(path, lambda f: np.savez(f, **arrays))
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# completeness and merge
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShardedJob:
    """The shard folders of one job id in one run folder."""

    run_dir: Path
    job: str
    count: int
    folders: dict[int, Path]

    def describe(self) -> str:
        man = _manifest(next(iter(self.folders.values())))
        what = ""
        if man:
            m, d = man.get("method") or {}, man.get("dataset") or {}
            what = f" (method {m.get('name', '?')}, dataset {d.get('name', '?')})"
        return f"job {self.job}{what} in {self.run_dir}"


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sharded_jobs(run_dir: str | Path, check: bool = True) -> list[ShardedJob]:
    """The sharded jobs of a run folder; with ``check``, :class:`ShardError` unless each is complete
    (every shard present and finished, one shard count, no unsharded folder of the same job)."""
    run_dir = Path(run_dir)
    jobs_dir = run_dir / "jobs"
    if not jobs_dir.is_dir():
        return []
    plain: set[str] = set()
    found: dict[str, dict[int, dict[int, Path]]] = {}
    for p in sorted(jobs_dir.iterdir()):
        if not p.is_dir():
            continue
        m = SHARD_FOLDER_RE.fullmatch(p.name)
        if m is None:
            plain.add(p.name)
            continue
        found.setdefault(m["job"], {}).setdefault(int(m["n"]), {})[int(m["i"])] = p
    out: list[ShardedJob] = []
    problems: list[str] = []
    for job, by_count in sorted(found.items()):
        groups = [ShardedJob(run_dir, job, n, dict(sorted(f.items()))) for n, f in sorted(by_count.items())]
        if len(groups) > 1:
            problems.append(f"{groups[0].describe()}: shards of {' and of '.join(str(g.count) for g in groups)} "
                            "(two shardings of the same job double its samples): remove the folders of one, "
                            + ", ".join(f"jobs/{job}~shard*of{g.count}" for g in groups[1:]))
        if job in plain:
            problems.append(f"{groups[0].describe()}: both an unsharded folder jobs/{job} and shards "
                            f"(its samples would count twice): remove one")
        for g in groups:
            missing = [i for i in range(g.count) if i not in g.folders]
            unfinished = [i for i, f in g.folders.items() if not (f / "manifest.json").is_file()]
            if missing or unfinished:
                parts = []
                if missing:
                    parts.append(f"shard(s) {', '.join(f'{i}/{g.count}' for i in missing)} missing")
                if unfinished:
                    parts.append(f"shard(s) {', '.join(f'{i}/{g.count}' for i in unfinished)} not finished "
                                 "(no manifest.json)")
                problems.append(f"{g.describe()}: {'; '.join(parts)}; re-submit the same command (finished edits "
                                f"are cached), or run one with dataset.shard=i/{g.count}")
            out.append(g)
    if check and problems:
        raise ShardError("the run's shards are incomplete, so its tables would be wrong:\n  " + "\n  ".join(problems))
    return out


def check_no_doubles(edits, groups: Sequence[ShardedJob]) -> None:
    """ShardError when a sample of a sharded job is in two of its shards (the dataset changed
    between the tasks, say)."""
    if not groups or edits is None or not len(edits):
        return
    jobs = {g.job for g in groups}
    sub = edits[edits["job"].isin(jobs)] if "job" in edits.columns else edits.iloc[0:0]
    dup = sub[sub.duplicated(["run", "job", "sample_id", "seed"], keep=False)] if len(sub) else sub
    if len(dup):
        first = dup.iloc[0]
        raise ShardError(f"job {first['job']}: sample(s) {', '.join(sorted(set(map(str, dup['sample_id'])))[:10])} "
                         "are in more than one shard: the shards were made from different datasets; "
                         "remove the job's shard folders and run it again")


def merged_set_rows(groups: Sequence[ShardedJob]):
    """The set-metric score rows (FID, KID) of each complete sharded job, from its shards' parts:
    equal to the rows the unsharded job writes. Cached in the job's edit store."""
    import pandas as pd

    from .runner import SCORE_COLUMNS

    rows: list[dict[str, Any]] = []
    for g in groups:
        names = sorted({p.stem for f in g.folders.values() for p in (f / "sets").glob("*.npz")})
        for name in names:
            rows.extend(_merge_one(g, name))
    table = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    table["value"] = table["value"].astype("float64")
    table["higher_is_better"] = table["higher_is_better"].astype(bool)
    table["mean_floor"] = table["mean_floor"].astype("float64")
    return table


def _load_part(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        return {"meta": json.loads(str(z["meta"])), **{k: z[k] for k in z.files if k != "meta"}}


def _merge_one(g: ShardedJob, name: str) -> list[dict[str, Any]]:
    from .cache import EditStore, stable_hash
    from .scoring import MetricSuite
    from .types import ScoreValue

    parts = []
    for i, folder in g.folders.items():
        path = folder / "sets" / f"{name}.npz"
        if not path.is_file():
            raise ShardError(f"{g.describe()}: shard {i}/{g.count} has no part of set metric '{name}' "
                             f"({path} missing): re-run that shard")
        parts.append(_load_part(path))
    meta = parts[0]["meta"]
    row = dict(meta["row"])
    keys = [str(k) for p in parts for k in p["keys"]]
    set_key = stable_hash({"metric": meta["metric_hash"], "edits": sorted(keys)})
    row["edit_key"] = set_key
    man = _manifest(g.folders[min(g.folders)]) or {}
    cfg = man.get("config") or {}
    store = EditStore(cfg.get("cache_dir")) if cfg.get("cache_dir") and Path(cfg["cache_dir"]).is_dir() else None
    flags = [p["meta"]["flag"] for p in parts if p["meta"]["flag"]]
    values = store.get_set_scores(set_key) if store is not None and not flags else None
    unreadable = sorted({u for p in parts for u in p["meta"]["unreadable"]})
    if values is None:
        suite = MetricSuite(cfg.get("metrics") or {})
        entry = next((e for e in suite.set_entries if e.name == name), None)
        if flags or entry is None:
            flag = flags[0] if flags else f"error:metric '{name}' not in the job's protocol"
            metric_rows = entry.metric.output_rows() if entry is not None else [(name, "all")]
            values = [ScoreValue(m, r, math.nan, flag) for m, r in metric_rows]
        else:
            order = sorted(((str(sid), pi, j) for pi, p in enumerate(parts) for j, sid in enumerate(p["sample_ids"])))
            dims = [p["edit_rows"].shape[1] for p in parts if p["edit_rows"].size]
            dim = dims[0] if dims else 0
            edit_rows = np.stack([parts[pi]["edit_rows"][j] for _, pi, j in order]) if order \
                else np.zeros((0, dim), np.float32)
            ref_hash = [str(parts[pi]["ref_hash"][j]) for _, pi, j in order]
            ref_rows: dict[str, np.ndarray] = {}
            for p in parts:
                for h, r in zip(p["ref_row_hashes"], p["ref_rows"]):
                    ref_rows.setdefault(str(h), r)
            values = suite._scaled(entry, list(entry.metric.replay(edit_rows, ref_hash, ref_rows, suite.batch_size)))
            if unreadable:
                flag = ",".join(unreadable)
                values = [dataclasses.replace(v, flag=f"{flag}; {v.flag}" if v.flag else flag) for v in values]
            from .runner import _with_decode_flag, _join_tokens

            values = _with_decode_flag(values, _join_tokens(p["meta"]["decode"] or "" for p in parts))
            if store is not None and not any(v.flag and (v.flag == "unavailable" or v.flag.startswith("error:"))
                                             for v in values):
                store.put_set_scores(set_key, values)
    return [{**row, "metric": v.metric, "region": v.region, "value": v.value, "flag": v.flag} for v in values]
