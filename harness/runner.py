"""Run one job: one method with one parameter point on one dataset, edits cached, then scored.

What is cached is what is a function of the inputs: finished edits (status ok) and the
method's own skips. Failures (an exception, an unusable sample file) are stored too, with their
reason and traceback, and retried on the next run (``retry_failed: true``, the default), because
they depend on the machine as much as on the inputs; ``retry_failed: false`` keeps them as they
are. A method that cannot be prepared (weights missing) gives skipped rows that are never stored.

Nothing one sample holds ends a job: a sample that cannot be decoded, a method whose ``check``
or ``edit`` raises, and an input file that disappears before scoring each become a failed row
(or NaN score rows flagged ``error:...``) naming the sample and the field.

Shards: a job with ``dataset.shard=i/n`` edits the samples whose id hashes to shard i; its tables
carry the unsharded job's id and go to ``jobs/<job id>~shard<i>of<n>/``, and set metrics store
their features there instead of a value; :mod:`harness.merge` checks a run's shards are complete
and combines them when the run's tables are read.

Progress: on a terminal, tqdm bars (edits; scores, advancing per edit and metric and naming the
metric being computed); elsewhere (a log file, CI) a few plain lines on stderr instead.
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
from .data.generic import shard_of_config, shard_folder_name
from .fileio import save_bytes, save_json
from .images import DECODE_DIFFERS, decode_options
from .method import Method
from .registry import METHODS
from .metrics.base import SET_SAMPLE_ID
from .types import DatasetError, EditResult, EditStatus, MethodOutput, Sample, SampleError, ScoreValue, SkipSample

log = logging.getLogger("edit_harness")

EDIT_COLUMNS = [
    "run", "job", "method", "method_version", "params", "dataset", "sample_id", "category", "seed",
    "edit_key", "status", "reason", "flags", "notes", "prep_seconds", "infer_seconds", "peak_memory_bytes",
    "model_revision", "unet_calls", "unet_rows",
]
#: ``notes`` (edits table): how the sample's inputs were converted (EXIF rotation, 16 bits, CMYK,
#: alpha, mask conversions under the dataset's ``mask_rule``), '; '-joined; '' when none.
NOTES_SEP = "; "
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
        if not (root / ".git").exists():
            # an installed wheel: site-packages may sit inside some other checkout, whose revision
            # says nothing about this code
            return None
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


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class _Progress:
    """A tqdm bar on a terminal; elsewhere (stderr a file or a pipe: logs, CI) a few plain
    lines instead of a bar redrawn with carriage returns: one at the start, one per stage (the
    metric being computed) and one at the end. ``enabled=False``: silent."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.tty = enabled and total > 0 and _stderr_is_terminal()
        self.plain = enabled and total > 0 and not self.tty
        self.t0 = time.perf_counter()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
        elif self.plain:
            self._line(f"{total} {unit}s")

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=sys.stderr, flush=True)

    def stage(self, name: str) -> None:
        """Name what is being computed now (a metric)."""
        if self.bar is not None:
            self.bar.set_description_str(f"{self.desc} [{name}]")
        elif self.plain:
            self._line(f"{name} ({self.n}/{self.total} {self.unit}s done)")

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self, summary: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.plain:
            self._line(f"done, {self.n} {self.unit}s in {time.perf_counter() - self.t0:.1f} s"
                       + (f" ({summary})" if summary else ""))


def _notes_of(sample: Sample | None) -> dict[str, Any]:
    """What an edit's info keeps of its sample's input conversions (``input_notes``)."""
    notes = sample.meta.get("input_notes") if sample is not None else None
    return {"input_notes": list(notes)} if notes else {}


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
        # the tables' params column: what the method computes, not where its inputs are
        self.params_json = canonical_params({k: v for k, v in self.params.items()
                                             if k not in self.method.location_params})
        self.run_dir = Path(cfg.results_dir) / cfg.run_name
        self.store = EditStore(cfg.cache_dir or (self.run_dir / "edits"))
        #: (i, n) for shard i of n (``dataset.shard``), else None
        self.shard = shard_of_config(cfg.dataset)
        # where the dataset lives is not part of the job: the same job run from another copy of
        # the dataset (another machine) gets the same id and identical tables; nor is the shard:
        # every shard of a job carries the id of the unsharded job (whose config has shard: null),
        # so that the merged shard tables equal the unsharded job's (harness.merge)
        dataset_id = {k: v for k, v in dict(cfg.dataset).items() if k != "root"}
        if dataset_id.get("shard") is not None:
            dataset_id["shard"] = None
        job_hash = stable_hash(
            {
                "params": self.params,
                "version": self.method.version,
                "seed": cfg.seed,
                "dataset": dataset_id,
                "protocol": self.suite.protocol if self.suite else None,
            },
            8,
        )
        safe = lambda x: re.sub(r"[^A-Za-z0-9_.-]+", "_", x)  # noqa: E731  (a folder name)
        self.job_id = f"{safe(self.method.label())}-{safe(self.dataset.name)}-{job_hash}"
        # a shard's tables go to a folder of their own: <job id>~shard<i>of<n>
        self.job_dir = self.run_dir / "jobs" / (self.job_id if self.shard is None
                                                 else shard_folder_name(self.job_id, *self.shard))
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
        """Make one edit. Returns the result and whether it may be stored (failures are stored,
        and retried by ``retry_failed``; skips that depend on the machine or on another edit
        of this job are not).

        ``previous``: for a self-fed turn (multi-turn editing), this job's edit of the turn
        before, which replaces the sample's source (``dataset.feed_previous``).
        """
        sample: Sample | None = None
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
            return EditResult(EditStatus.FAILED, reason=str(e), info=_notes_of(sample)), True
        except Exception as e:  # a loader that trips on an odd file must not end the sweep
            return EditResult(EditStatus.FAILED, reason=f"sample '{ref.id}': loading failed: {type(e).__name__}: {e}",
                              traceback=traceback.format_exc(), info=_notes_of(sample)), True
        notes = _notes_of(sample)
        try:
            reason = self.method.cannot_handle(sample)
        except Exception as e:  # a method's own check that raises fails this sample only
            return EditResult(EditStatus.FAILED, reason=(
                f"sample '{ref.id}': method '{self.method.name}' check raised {type(e).__name__}: {e}"),
                traceback=traceback.format_exc(), info=notes), True
        if reason:
            return EditResult(EditStatus.SKIPPED, reason=reason, info=notes), True
        self._prepare()
        if self._prepare_error:
            return EditResult(EditStatus.SKIPPED, reason=self._prepare_error, info=notes), False
        try:
            with self._probe as probe:
                t0 = time.perf_counter()
                out = self.method.edit(sample, self.cfg.seed)
                total = time.perf_counter() - t0
            image, mask, flags = check_output(out, sample)
        except SkipSample as e:
            return EditResult(EditStatus.SKIPPED, reason=f"sample '{sample.id}': {e}", info=notes), True
        except Exception as e:
            return (
                EditResult(
                    EditStatus.FAILED,
                    reason=f"sample '{sample.id}': {type(e).__name__}: {e}",
                    traceback=traceback.format_exc(),
                    info=notes,
                ),
                True,
            )
        prep = float(out.info.pop("prep_seconds", 0.0) or 0.0)
        info = dict(out.info)
        info["memory_probe"] = probe.kind
        # the sample's conversions first, then any the method made of its own inputs (an edit file)
        own = info.get("input_notes") if isinstance(info.get("input_notes"), list) else []
        if notes or own:
            info["input_notes"] = [*notes.get("input_notes", []), *(n for n in own if isinstance(n, str))]
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

        records = []
        computed = cached = 0
        writers = max(int(self.cfg.writers), 0)
        pool = ThreadPoolExecutor(writers) if writers else None
        pending: deque = deque()
        bar = _Progress(len(refs), f"edit {self.method.label()}", "edit", self.cfg.progress)
        # Multi-turn (self-fed) editing: a ref whose record names a ``previous_sample`` is edited
        # from this job's edit of that sample, and its key includes that edit's key.
        chained: dict[str, _Chained] = {}
        try:
            for ref in refs:
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
                bar.update()
            while pending:
                pending.popleft().result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            bar.close(f"computed {computed}, cached {cached}")
        return records, computed, cached

    # -- scores ---------------------------------------------------------------------------
    def load_for_scoring(self, ref: SampleRef) -> Sample:
        """The sample as the protocol's metrics see it (decoded with the protocol's options)."""
        return self.dataset.load(ref, decode=self.decode)

    def score_all(self, records: list[tuple[SampleRef, str, EditRecord]]) -> tuple[dict[str, list[ScoreValue]], int]:
        """Scores per edit key (all metrics), computing only what is not cached.

        An edit whose sample (or edit file) cannot be read now, say an input file removed since
        the edit was made, gets NaN rows flagged ``error:<Exception>:<field>`` for each metric
        (the message in the job manifest's ``metric_errors``); they are not cached, so the next
        run scores it again."""
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
        # One step per (edit, metric): the bar moves as each metric finishes a batch of edits.
        bar = _Progress(sum(len(t[3]) for t in todo), f"score {self.method.label()}", "score", self.cfg.progress)
        try:
            for start in range(0, len(todo), bs):
                chunk = todo[start : start + bs]
                items: list[ScoringItem | None] = []
                for ref, key, rec, missing in chunk:
                    try:
                        items.append(ScoringItem(sample=self.load_for_scoring(ref), edit=rec.image(),
                                                 edit_mask=rec.mask()))
                    except Exception as e:  # an input gone or broken since the edit was made
                        items.append(None)
                        field = e.field if isinstance(e, SampleError) else "edit"
                        message = str(e) if isinstance(e, SampleError) else (
                            f"sample '{ref.id}', field 'edit': the stored edit cannot be read: {type(e).__name__}: {e}")
                        for entry in missing:
                            computed[(key, entry.name)] = self.suite.flagged_rows(entry, f"error:{type(e).__name__}:{field}")
                            entry.errors.append({"sample_id": ref.id, "error": message,
                                                 "traceback": traceback.format_exc()})
                        log.warning("scoring %s: %s", ref.id, message)
                        bar.update(len(missing))
                for entry in self.suite.edit_entries:
                    idx = [i for i, c in enumerate(chunk) if entry in c[3] and items[i] is not None]
                    if not idx:
                        continue
                    bar.stage(entry.name)
                    results = self.suite.score(entry, [items[i] for i in idx])
                    for i, values in zip(idx, results):
                        key = chunk[i][1]
                        values = _with_decode_flag(values, _join_tokens([_decode_tokens(items[i].sample)]))
                        computed[(key, entry.name)] = values
                        if not any(v.flag and (v.flag == "unavailable" or v.flag.startswith("error:")) for v in values):
                            self.store.put_scores(key, entry.hash, values)
                    bar.update(len(idx))
        finally:
            bar.close(f"{len(todo)} edit{'' if len(todo) == 1 else 's'}")
        for _, key, _ in ok:
            for entry in self.suite.edit_entries:
                scores[key].extend(computed.get((key, entry.name)) or cached_parts.get((key, entry.name)) or [])
        return scores, len(todo)

    def score_sets(self, records: list[tuple[SampleRef, str, EditRecord]]) -> list[tuple[str, ScoreValue]]:
        """Set metrics (FID, KID) over the job's ok edits, cached under a key of the metric
        configuration and the set of edit keys. Returns (set key, value) pairs."""
        from .metrics.base import ScoringItem

        assert self.suite is not None
        # in sample-id order: a set's value then does not depend on the dataset's listing order,
        # and the shards of a job replay their features in this same order (harness.merge)
        ok = sorted(((ref, key, rec) for ref, key, rec in records if rec.status == EditStatus.OK and _scored(ref)),
                    key=lambda t: t[0].id)
        out: list[tuple[str, ScoreValue]] = []
        for entry in self.suite.set_entries:
            set_key = stable_hash({"metric": entry.hash, "edits": sorted(k for _, k, _ in ok)})
            values = self.store.get_set_scores(set_key)
            if values is None:
                bs = self.suite.batch_size
                differs: set[str] = set()  # the set's decode flags (not its images: a set may be large)

                unreadable: list[str] = []  # error flags of edits left out (an input gone since editing)

                def batches():
                    for start in range(0, len(ok), bs):
                        batch = []
                        for ref, _, rec in ok[start : start + bs]:
                            try:
                                batch.append(ScoringItem(sample=self.load_for_scoring(ref), edit=rec.image(),
                                                         edit_mask=rec.mask()))
                            except Exception as e:
                                field = e.field if isinstance(e, SampleError) else "edit"
                                unreadable.append(f"error:{type(e).__name__}:{field}")
                                entry.errors.append({"sample_id": ref.id, "error": str(e),
                                                     "traceback": traceback.format_exc()})
                        differs.update(_decode_tokens(it.sample) for it in batch)
                        if batch:
                            yield batch

                values = self.suite.score_set(entry, batches())
                if unreadable:  # measured on fewer edits than the job has: flagged (first), not cached
                    flag = ",".join(sorted(set(unreadable)))
                    values = [dataclasses.replace(v, flag=f"{flag}; {v.flag}" if v.flag else flag) for v in values]
                values = _with_decode_flag(values, _join_tokens(differs))
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
                "notes": NOTES_SEP.join((m.get("info") or {}).get("input_notes") or []),
                "prep_seconds": float(m.get("prep_seconds") or 0.0),
                "infer_seconds": float(m.get("infer_seconds") or 0.0),
                "peak_memory_bytes": float(peak) if peak is not None else math.nan,
                "model_revision": m.get("model_revision"),
                **_unet_counts(m.get("info") or {}),
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
                "shard": None if self.shard is None else {"index": self.shard[0], "count": self.shard[1],
                                                          "job": self.job_id},
                "versions": _versions(),
                "git_revision": _git_revision(),
                "host": _host(),
                "argv": sys.argv,
                "outcome": outcome,
                "metric_errors": {e.name: e.errors for e in (self.suite.entries if self.suite else []) if e.errors},
            },
        )

    def run(self, resolved: Mapping[str, Any] | None = None) -> JobOutcome:
        try:
            refs = self.dataset.refs()
        except (ValueError, KeyError) as e:  # per-sample problems are failed rows; this is the whole set
            raise DatasetError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
        records, computed, cached = self.edit_all(refs)
        scores, scored = self.score_all(records) if self.suite else (None, 0)
        set_scores = None
        if self.suite and self.suite.set_entries:
            if self.shard is None:
                set_scores = self.score_sets(records)
            else:  # a shard stores its part of each set (features); the merge computes the value
                from .merge import write_set_parts

                write_set_parts(self, records)
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


def _unet_counts(info: Mapping[str, Any]) -> dict[str, float]:
    """The edit's denoiser cost, machine-independent: UNet forward calls and the batch rows they
    evaluated (``info["network_calls"]`` / ``["network_rows"]``, counted by
    ``methods.diffusion.counting`` for every diffusion method; 0 when that method's UNet never
    ran). Every denoiser counts: ``unet`` and any ``unet_<name>`` (ZONE's MagicBrush UNet runs in
    lock-step with IP2P's as ``unet_magicbrush``); auxiliary networks (SAM, CLIP, a VAE) do not.
    NaN for an edit whose method does not count its networks (the classical methods, edits
    made elsewhere, edits cached before the counts existed): not measured, never zero."""
    calls, rows = info.get("network_calls"), info.get("network_rows")
    if not isinstance(calls, Mapping) or not isinstance(rows, Mapping):
        return {"unet_calls": math.nan, "unet_rows": math.nan}

    def denoisers(d: Mapping[str, Any]) -> float:
        return float(sum(v for k, v in d.items() if k == "unet" or str(k).startswith("unet_")))

    return {"unet_calls": denoisers(calls), "unet_rows": denoisers(rows)}


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
    """Job folders holding a scores table (a shard's folder among them), sorted by path."""
    out = []
    for d in run_dirs:
        out.extend(sorted((Path(d) / "jobs").glob("*/scores.parquet")))
    return [p.parent for p in out]
