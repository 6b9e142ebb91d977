"""Run one job: one method with one parameter point on one dataset, edits cached, then scored.

What is cached is what is a function of the inputs: finished edits (status ok) and the
method's own skips. Failures (an exception, an unusable sample file, weights missing at
``prepare``) are recorded in the job's tables with their reason and traceback but retried on
the next run, because they depend on the machine as much as on the inputs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
import threading
import tracemalloc
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .cache import EditRecord, EditStore, edit_key, stable_hash
from .data import SampleRef, open_dataset
from .fileio import save_bytes, save_json
from .images import DECODE_DIFFERS, decode_options
from .method import Method
from .registry import METHODS
from .metrics.base import SET_SAMPLE_ID
from .types import EditResult, EditStatus, MethodOutput, Sample, SampleError, ScoreValue, SkipSample

log = logging.getLogger("edit_harness")

EDIT_COLUMNS = [
    "run", "job", "method", "method_version", "params", "dataset", "sample_id", "category", "seed",
    "edit_key", "status", "reason", "flags", "prep_seconds", "infer_seconds", "peak_memory_bytes",
    "model_revision",
]
SCORE_COLUMNS = [
    "run", "job", "method", "method_version", "params", "dataset", "sample_id", "category", "seed",
    "edit_key", "metric", "region", "value", "flag", "protocol", "weights", "region_rule", "higher_is_better",
    "mean_floor",
]


@dataclasses.dataclass
class JobConfig:
    """The plain-Python view of a job's resolved Hydra config."""

    method: dict[str, Any]
    dataset: dict[str, Any]
    metrics: dict[str, Any]
    run_name: str
    results_dir: str = "results"
    cache_dir: str | None = None
    seed: int = 0
    progress: bool = True
    retry_failed: bool = True
    memory: str = "auto"  # auto | tracemalloc | rss | cuda | off (see _MemoryProbe)
    writers: int = 2  # threads writing edit files (0: write synchronously)
    score: bool = True

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "JobConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in known})


@dataclasses.dataclass
class JobOutcome:
    job_dir: Path
    counts: dict[str, int]
    computed: int
    cached: int
    scored: int


def canonical_params(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True)


def build_method(cfg: Mapping[str, Any]) -> Method:
    import methods  # noqa: F401  (registers every method; needed in fresh launcher processes)

    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name is None:
        raise ValueError(f"method config has no 'name'; available methods: {', '.join(METHODS.names())}")
    return METHODS.get(name).from_config(cfg)


def _rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux); 0 where /proc is absent."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
RSS_INTERVAL_S = 0.005  # sampling period of the rss probe


class _MemoryProbe:
    """Peak memory of one edit, by the kind that can see the method's memory:

    - ``cuda``: the CUDA allocator's peak, when torch is loaded and CUDA available;
    - ``rss``: for methods that run torch on the CPU (``Method.uses_torch``), the peak resident
      set size of the process during the edit, sampled every 5 ms from /proc by a thread. Like
      the CUDA peak it includes the loaded weights (and here the interpreter); a difference from
      the size at the start would read ~0 after the first edit, as freed tensors stay resident in
      the allocator. (torch's CPU tensors bypass Python's allocator, so tracemalloc does not see
      them; neither torch nor the standard library reports a CPU peak.)
    - ``tracemalloc``: Python and NumPy allocations (the classical methods).
    ``auto`` picks in that order; the kind used is recorded in each edit's info (``memory_probe``).
    """

    def __init__(self, mode: str, uses_torch: bool = False):
        if mode not in ("auto", "tracemalloc", "rss", "cuda", "off"):
            raise ValueError(f"memory must be auto, tracemalloc, rss, cuda or off; got {mode!r}")
        self.mode = mode
        self.uses_torch = uses_torch

    def _cuda(self) -> bool:
        torch = sys.modules.get("torch")
        return self.mode in ("auto", "cuda") and torch is not None and torch.cuda.is_available()

    def _pick(self) -> str:
        if self._cuda():
            return "cuda"
        rss_ok = _rss_bytes() > 0
        if self.mode == "rss" or (self.mode == "auto" and self.uses_torch):
            return "rss" if rss_ok else "tracemalloc"
        return "tracemalloc" if self.mode in ("auto", "tracemalloc") else "off"

    def _sample_rss(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self._rss_peak = max(self._rss_peak, _rss_bytes())

    def __enter__(self):
        self.kind = self._pick()
        if self.kind == "cuda":
            torch = sys.modules["torch"]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.kind == "rss":
            self._rss_peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample_rss, name="rss-probe", daemon=True)
            self._thread.start()
        elif self.kind == "tracemalloc":
            self._started = not tracemalloc.is_tracing()
            if self._started:
                tracemalloc.start()
            tracemalloc.reset_peak()
        self.peak: int | None = None
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda":
            torch = sys.modules["torch"]
            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
        elif self.kind == "rss":
            self._stop.set()
            self._thread.join()
            self.peak = max(self._rss_peak, _rss_bytes())
        elif self.kind == "tracemalloc":
            self.peak = int(tracemalloc.get_traced_memory()[1])
            if self._started:
                tracemalloc.stop()
        return False


def check_output(out: Any, sample: Sample) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Validate a method's output; raises ValueError with a clear message, returns flags."""
    if not isinstance(out, MethodOutput):
        raise TypeError(f"method returned {type(out).__name__}, expected MethodOutput")
    img = out.image
    if not isinstance(img, np.ndarray):
        raise TypeError(f"output image is {type(img).__name__}, expected a numpy array")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"output image has shape {img.shape}, expected HxWx3")
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and not np.all(np.isfinite(img)):
            raise ValueError("output image contains NaN or inf")
        raise ValueError(f"output image has dtype {img.dtype}, expected uint8")
    flags = []
    if img.shape[:2] != sample.source.shape[:2]:
        flags.append("size_differs")
    if not img.any():
        flags.append("all_black")
    mask = out.mask
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != img.shape[:2]:
            raise ValueError(f"output mask has shape {mask.shape}, image is {img.shape[:2]}")
        mask = mask.astype(bool)
    return np.ascontiguousarray(img), mask, flags


def _versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for pkg in ("edit-harness", "torch", "torchvision", "numpy", "pillow", "opencv-python-headless",
                "scikit-image", "torchmetrics", "lpips", "hydra-core", "pandas", "dlib-bin", "diffusers", "open_clip_torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _host() -> dict[str, Any]:
    info: dict[str, Any] = {"node": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Job:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.method = build_method(cfg.method)
        self.dataset = open_dataset(cfg.dataset)
        from .scoring import MetricSuite  # imports the metric registry (no torch at import)

        self.suite = MetricSuite(cfg.metrics) if cfg.score else None
        # How the protocol decodes the sample images its metrics see (the official scripts'
        # way, for a protocol that reproduces one); methods always get the harness default.
        self.decode = decode_options(getattr(self.suite, "decode", None) if self.suite else None)
        self.libraries = self.method.library_versions()
        self.params = self.method.resolved_params()
        self.params_json = canonical_params(self.params)
        self.run_dir = Path(cfg.results_dir) / cfg.run_name
        self.store = EditStore(cfg.cache_dir or (self.run_dir / "edits"))
        job_hash = stable_hash(
            {
                "params": self.params,
                "version": self.method.version,
                "seed": cfg.seed,
                "dataset": cfg.dataset,
                "protocol": self.suite.protocol if self.suite else None,
            },
            8,
        )
        safe = lambda x: re.sub(r"[^A-Za-z0-9_.-]+", "_", x)  # noqa: E731  (a folder name)
        self.job_id = f"{safe(self.method.label())}-{safe(self.dataset.name)}-{job_hash}"
        self.job_dir = self.run_dir / "jobs" / self.job_id
        self._prepared = False
        self._prepare_error: str | None = None
        self.load_seconds = 0.0
        self._probe = _MemoryProbe(cfg.memory, uses_torch=getattr(self.method, "uses_torch", False))

    # -- edits ----------------------------------------------------------------------------
    def key_for(self, ref: SampleRef, previous_key: str | None = None) -> str:
        return edit_key(
            previous_edit=previous_key,
            method=self.method.name,
            method_version=self.method.version,
            params=self.params,
            model_revision=self.method.model_revision(),
            libraries=self.libraries,
            dataset=self.dataset.name,
            dataset_version=self.dataset.version,
            sample_id=ref.id,
            sample_fingerprint=self.dataset.fingerprint(ref),
            seed=self.cfg.seed,
        )

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        t0 = time.perf_counter()
        try:
            self.method.prepare()
        except Exception as e:
            self._prepare_error = f"method '{self.method.name}' could not be prepared: {type(e).__name__}: {e}"
            log.error(self._prepare_error)
        self.load_seconds = time.perf_counter() - t0

    def compute(self, ref: SampleRef, previous: "_Chained | None" = None) -> tuple[EditResult, bool]:
        """Make one edit. Returns the result and whether it may be cached.

        ``previous``: for a self-fed turn (multi-turn editing), this job's edit of the turn
        before, which replaces the sample's source (``dataset.feed_previous``).
        """
        try:
            sample = self.dataset.load(ref)
            prev_id = _previous_sample(ref)
            if prev_id is not None:
                if previous is None:
                    return EditResult(EditStatus.SKIPPED, reason=(
                        f"sample '{ref.id}': its previous turn '{prev_id}' is not in this job "
                        "(multi-turn editing needs a session's turns in order, in one job)")), False
                if previous.record.status != EditStatus.OK:
                    return EditResult(EditStatus.SKIPPED, reason=(
                        f"sample '{ref.id}': the previous turn '{prev_id}' has no edit "
                        f"({previous.record.status.value}: {previous.record.meta.get('reason')})")), False
                sample = self.dataset.feed_previous(sample, previous.image())
        except SampleError as e:
            return EditResult(EditStatus.FAILED, reason=str(e)), False
        reason = self.method.cannot_handle(sample)
        if reason:
            return EditResult(EditStatus.SKIPPED, reason=reason), True
        self._prepare()
        if self._prepare_error:
            return EditResult(EditStatus.SKIPPED, reason=self._prepare_error), False
        try:
            with self._probe as probe:
                t0 = time.perf_counter()
                out = self.method.edit(sample, self.cfg.seed)
                total = time.perf_counter() - t0
            image, mask, flags = check_output(out, sample)
        except SkipSample as e:
            return EditResult(EditStatus.SKIPPED, reason=f"sample '{sample.id}': {e}"), True
        except Exception as e:
            return (
                EditResult(
                    EditStatus.FAILED,
                    reason=f"sample '{sample.id}': {type(e).__name__}: {e}",
                    traceback=traceback.format_exc(),
                ),
                False,
            )
        prep = float(out.info.pop("prep_seconds", 0.0) or 0.0)
        info = dict(out.info)
        info["memory_probe"] = probe.kind
        if sample.meta.get("input_notes"):
            info["input_notes"] = sample.meta["input_notes"]
        return (
            EditResult(
                EditStatus.OK,
                image=image,
                mask=mask,
                prep_seconds=prep,
                infer_seconds=max(total - prep, 0.0),
                peak_memory_bytes=probe.peak,
                flags=flags,
                info=info,
            ),
            True,
        )

    def edit_all(self, refs: list[SampleRef]) -> tuple[list[tuple[SampleRef, str, EditRecord]], int, int]:
        """Make or find every edit. Files are written by a small thread pool (PNG encoding
        releases the GIL) while the next edit is computed; all writes finish before return."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        records = []
        computed = cached = 0
        writers = max(int(self.cfg.writers), 0)
        pool = ThreadPoolExecutor(writers) if writers else None
        pending: deque = deque()
        bar = tqdm(refs, desc=f"edit {self.method.label()}", unit="edit", disable=not self.cfg.progress, leave=False)
        # Multi-turn (self-fed) editing: a ref whose record names a ``previous_sample`` is edited
        # from this job's edit of that sample, and its key includes that edit's key.
        chained: dict[str, _Chained] = {}
        try:
            for ref in bar:
                prev_id = _previous_sample(ref)
                previous = chained.get(prev_id) if prev_id is not None else None
                key = self.key_for(ref, previous.key if previous is not None else None)
                rec = self.store.get(key)
                result = None
                if rec is not None and not (self.cfg.retry_failed and rec.status == EditStatus.FAILED):
                    cached += 1
                else:
                    result, cacheable = self.compute(ref, previous)
                    extra = {"sample_id": ref.id, "method": self.method.name, "params": self.params,
                             "dataset": self.dataset.name, "seed": self.cfg.seed,
                             "model_revision": self.method.model_revision(), "libraries": self.libraries}
                    rec = self.store.record_for(key, result, extra)
                    if cacheable and pool is not None:
                        pending.append(pool.submit(self.store.put, key, result, extra))
                        while len(pending) > 2 * writers:  # bounded memory: wait for the oldest
                            pending.popleft().result()
                    elif cacheable:
                        self.store.put(key, result, extra)
                    computed += 1
                chained[ref.id] = _Chained(key, rec, result.image if result is not None else None)
                records.append((ref, key, rec))
            while pending:
                pending.popleft().result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        return records, computed, cached

    # -- scores ---------------------------------------------------------------------------
    def load_for_scoring(self, ref: SampleRef) -> Sample:
        """The sample as the protocol's metrics see it (decoded with the protocol's options)."""
        return self.dataset.load(ref, decode=self.decode)

    def score_all(self, records: list[tuple[SampleRef, str, EditRecord]]) -> tuple[dict[str, list[ScoreValue]], int]:
        """Scores per edit key (all metrics), computing only what is not cached."""
        from tqdm.auto import tqdm

        from .metrics.base import ScoringItem

        assert self.suite is not None
        ok = [(ref, key, rec) for ref, key, rec in records if rec.status == EditStatus.OK and _scored(ref)]
        scores: dict[str, list[ScoreValue]] = {key: [] for _, key, _ in ok}
        cached_parts: dict[tuple[str, str], list[ScoreValue]] = {}
        todo: list[tuple[SampleRef, str, EditRecord, list]] = []
        for ref, key, rec in ok:
            missing = []
            for entry in self.suite.edit_entries:
                got = self.store.get_scores(key, entry.hash)
                if got is None:
                    missing.append(entry)
                else:
                    cached_parts[(key, entry.name)] = got
            if missing:
                todo.append((ref, key, rec, missing))
        computed: dict[tuple[str, str], list[ScoreValue]] = {}
        bs = self.suite.batch_size
        bar = tqdm(total=len(todo), desc=f"score {self.method.name}", unit="edit", disable=not self.cfg.progress or not todo, leave=False)
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            items = []
            for ref, key, rec, _ in chunk:
                sample = self.load_for_scoring(ref)
                items.append(ScoringItem(sample=sample, edit=rec.image(), edit_mask=rec.mask()))
            for entry in self.suite.edit_entries:
                idx = [i for i, c in enumerate(chunk) if entry in c[3]]
                if not idx:
                    continue
                results = self.suite.score(entry, [items[i] for i in idx])
                for i, values in zip(idx, results):
                    key = chunk[i][1]
                    values = _with_decode_flag(values, _join_tokens([_decode_tokens(items[i].sample)]))
                    computed[(key, entry.name)] = values
                    if not any(v.flag and (v.flag == "unavailable" or v.flag.startswith("error:")) for v in values):
                        self.store.put_scores(key, entry.hash, values)
            bar.update(len(chunk))
        bar.close()
        for _, key, _ in ok:
            for entry in self.suite.edit_entries:
                scores[key].extend(computed.get((key, entry.name)) or cached_parts.get((key, entry.name)) or [])
        return scores, len(todo)

    def score_sets(self, records: list[tuple[SampleRef, str, EditRecord]]) -> list[tuple[str, ScoreValue]]:
        """Set metrics (FID, KID) over the job's ok edits, cached under a key of the metric
        configuration and the set of edit keys. Returns (set key, value) pairs."""
        from .metrics.base import ScoringItem

        assert self.suite is not None
        ok = [(ref, key, rec) for ref, key, rec in records if rec.status == EditStatus.OK and _scored(ref)]
        out: list[tuple[str, ScoreValue]] = []
        for entry in self.suite.set_entries:
            set_key = stable_hash({"metric": entry.hash, "edits": sorted(k for _, k, _ in ok)})
            values = self.store.get_set_scores(set_key)
            if values is None:
                bs = self.suite.batch_size
                differs: set[str] = set()  # the set's decode flags (not its images: a set may be large)

                def batches():
                    for start in range(0, len(ok), bs):
                        batch = [ScoringItem(sample=self.load_for_scoring(ref), edit=rec.image(), edit_mask=rec.mask())
                                 for ref, _, rec in ok[start : start + bs]]
                        differs.update(_decode_tokens(it.sample) for it in batch)
                        yield batch

                values = _with_decode_flag(self.suite.score_set(entry, batches()), _join_tokens(differs))
                if not any(v.flag and (v.flag == "unavailable" or v.flag.startswith("error:")) for v in values):
                    self.store.put_set_scores(set_key, values)
            out.extend((set_key, v) for v in values)
        return out

    # -- tables ---------------------------------------------------------------------------
    def _base_row(self, ref: SampleRef, key: str) -> dict[str, Any]:
        return {
            "run": self.cfg.run_name,
            "job": self.job_id,
            "method": self.method.label(),
            "method_version": self.method.version,
            "params": self.params_json,
            "dataset": self.dataset.name,
            "sample_id": ref.id,
            "category": ref.category,
            "seed": self.cfg.seed,
            "edit_key": key,
        }

    def write_tables(self, records, scores: dict[str, list[ScoreValue]] | None,
                     set_scores: list[tuple[str, ScoreValue]] | None = None) -> None:
        import pandas as pd

        edit_rows = []
        for ref, key, rec in records:
            m = rec.meta
            peak = m.get("peak_memory_bytes")
            edit_rows.append({
                **self._base_row(ref, key),
                "status": m["status"],
                "reason": m.get("reason"),
                "flags": ",".join(m.get("flags") or []),
                "prep_seconds": float(m.get("prep_seconds") or 0.0),
                "infer_seconds": float(m.get("infer_seconds") or 0.0),
                "peak_memory_bytes": float(peak) if peak is not None else math.nan,
                "model_revision": m.get("model_revision"),
            })
        edits = pd.DataFrame(edit_rows, columns=EDIT_COLUMNS)
        score_rows = []
        if scores is not None and self.suite is not None:
            desc = self.suite.describe()
            for ref, key, rec in records:
                for v in scores.get(key, []):
                    d = desc[v.metric] if v.metric in desc else desc[_base_metric(v.metric, desc)]
                    score_rows.append({
                        **self._base_row(ref, key),
                        "metric": v.metric,
                        "region": v.region,
                        "value": v.value,
                        "flag": v.flag,
                        "protocol": self.suite.protocol,
                        "weights": d["weights"],
                        "region_rule": d["region_rule"],
                        "higher_is_better": bool(d["higher_is_better"]),
                        "mean_floor": d["mean_floor"],
                    })
        if set_scores and self.suite is not None:
            desc = self.suite.describe()
            for set_key, v in set_scores:
                d = desc[v.metric] if v.metric in desc else desc[_base_metric(v.metric, desc)]
                row = self._base_row(SampleRef(SET_SAMPLE_ID, {}, ""), set_key)
                score_rows.append({**row, "metric": v.metric, "region": v.region, "value": v.value, "flag": v.flag,
                                   "protocol": self.suite.protocol, "weights": d["weights"],
                                   "region_rule": d["region_rule"], "higher_is_better": bool(d["higher_is_better"]),
                                   "mean_floor": d["mean_floor"]})
        table = pd.DataFrame(score_rows, columns=SCORE_COLUMNS)
        table["value"] = table["value"].astype("float64")
        table["higher_is_better"] = table["higher_is_better"].astype(bool)
        table["mean_floor"] = table["mean_floor"].astype("float64")
        self.job_dir.mkdir(parents=True, exist_ok=True)
        save_bytes(self.job_dir / "edits.parquet", _parquet_bytes(edits))
        save_bytes(self.job_dir / "scores.parquet", _parquet_bytes(table))
        failures = [
            {"sample_id": ref.id, "status": rec.meta["status"], "reason": rec.meta.get("reason"),
             "traceback": rec.meta.get("traceback")}
            for ref, key, rec in records if rec.meta["status"] != EditStatus.OK.value
        ]
        save_json(self.job_dir / "failures.json", failures)

    def write_manifest(self, resolved: Mapping[str, Any] | None, outcome: dict[str, Any]) -> None:
        save_json(
            self.job_dir / "manifest.json",
            {
                "job": self.job_id,
                "run": self.cfg.run_name,
                "config": resolved,
                "method": {"name": self.method.name, "version": self.method.version, "params": self.params,
                           "model_revision": self.method.model_revision(), "libraries": self.libraries,
                           "load_seconds": self.load_seconds},
                "dataset": {"name": self.dataset.name, "version": self.dataset.version},
                "metrics": self.suite.describe() if self.suite else None,
                "protocol": self.suite.protocol if self.suite else None,
                "decode": self.decode if self.suite else None,
                "seed": self.cfg.seed,
                "versions": _versions(),
                "git_revision": _git_revision(),
                "host": _host(),
                "argv": sys.argv,
                "outcome": outcome,
                "metric_errors": {e.name: e.errors for e in (self.suite.entries if self.suite else []) if e.errors},
            },
        )

    def run(self, resolved: Mapping[str, Any] | None = None) -> JobOutcome:
        refs = self.dataset.refs()
        records, computed, cached = self.edit_all(refs)
        scores, scored = self.score_all(records) if self.suite else (None, 0)
        set_scores = self.score_sets(records) if self.suite and self.suite.set_entries else None
        self.write_tables(records, scores, set_scores)
        counts = {s.value: 0 for s in EditStatus}
        for _, _, rec in records:
            counts[rec.meta["status"]] += 1
        outcome = {"counts": counts, "computed": computed, "cached": cached, "scored": scored}
        self.write_manifest(resolved, outcome)
        log.info("job %s: %s (computed %d, cached %d, scored %d)", self.job_id, counts, computed, cached, scored)
        return JobOutcome(self.job_dir, counts, computed, cached, scored)


@dataclasses.dataclass
class _Chained:
    """An edit of this job that a later turn may be fed (the image kept in memory until written)."""

    key: str
    record: EditRecord
    _image: np.ndarray | None = None

    def image(self) -> np.ndarray:
        return self._image if self._image is not None else self.record.image()


def _previous_sample(ref: SampleRef) -> str | None:
    """The sample a self-fed turn is edited from (``record['previous_sample']``), if any."""
    rec = ref.record if isinstance(ref.record, Mapping) else {}
    prev = rec.get("previous_sample")
    return str(prev) if prev else None


def _decode_tokens(sample: Sample) -> str:
    """Where the protocol's decoding gave this sample other pixels than the harness default:
    ``decode:<how>:<field>`` for each (``exif_ignored``, ``alpha_dropped``), comma-joined."""
    return ",".join(sorted(f"decode:{how}:{field}" for field, hows in (sample.meta.get(DECODE_DIFFERS) or {}).items()
                           for how in hows))


def _join_tokens(parts: Iterable[str]) -> str | None:
    """One score flag from several samples' decode tokens; None when no image differed."""
    return ",".join(sorted({t for p in parts for t in p.split(",") if t})) or None


def _with_decode_flag(values: list[ScoreValue], flag: str | None) -> list[ScoreValue]:
    """``values`` with ``flag`` added to every measured value (a NaN keeps its own reason)."""
    if not flag:
        return values
    return [v if math.isnan(v.value) else dataclasses.replace(v, flag=f"{v.flag}; {flag}" if v.flag else flag)
            for v in values]


def _scored(ref: SampleRef) -> bool:
    """Whether the protocol scores this sample (multi-turn: only each session's final turn)."""
    rec = ref.record if isinstance(ref.record, Mapping) else {}
    return rec.get("scored", True) is not False


def _base_metric(name: str, desc: Mapping[str, Any]) -> str:
    # Metrics may emit companion rows (e.g. landmark_mse_noedit for landmark_mse).
    for base in sorted(desc, key=len, reverse=True):
        if name.startswith(base):
            return base
    raise KeyError(f"score row for metric '{name}' matches no configured metric")


def _parquet_bytes(df) -> bytes:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def run_job(cfg: Mapping[str, Any], resolved: Mapping[str, Any] | None = None) -> JobOutcome:
    return Job(JobConfig.from_mapping(cfg)).run(resolved)


def job_dirs(run_dirs: Iterable[str | Path]) -> list[Path]:
    out = []
    for d in run_dirs:
        out.extend(sorted((Path(d) / "jobs").glob("*/scores.parquet")))
    return [p.parent for p in out]
