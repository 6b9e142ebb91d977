"""Content-addressed store of edits and their scores.

An edit's key hashes (method, method version, resolved parameters, model revision, the installed
versions of the libraries that define the method's numerics, dataset, dataset version, sample
id, sample fingerprint = its manifest entry and the bytes of each of its input files, seed).
Each edit lives in its own folder ``<root>/<key[:2]>/<key>/``::

    edit.png      the edited image (status ok)
    mask.png      the mask the method used, if any
    edit.json     status, reason, timings, flags: written LAST, it marks the edit complete
    scores/<h>.json   one file per metric configuration (hash h), written atomically

All writes go to a temporary file and are renamed into place, so a run killed at any moment
leaves either a complete edit or none; a rerun recomputes only what is incomplete, and removes
the temporary files a killed writer left in the folders it writes again.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import remove_stale_temps, save_json
from .images import read_png, save_png
from .types import EditResult, EditStatus, ScoreValue


def stable_hash(obj: Any, n: int = 24) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def edit_key(
    *,
    method: str,
    method_version: str,
    params: dict[str, Any],
    model_revision: str | None,
    dataset: str,
    dataset_version: str,
    sample_id: str,
    sample_fingerprint: str,
    seed: int,
    libraries: dict[str, str | None],
    previous_edit: str | None = None,
) -> str:
    """The content key of one edit. ``libraries``: distribution -> installed version
    (:meth:`harness.method.Method.library_versions`). ``previous_edit``: the key of the edit
    this one was fed (multi-turn self-fed editing), so that another earlier edit gives another key."""
    parts: dict[str, Any] = {
        "method": method,
        "method_version": method_version,
        "params": params,
        "model_revision": model_revision,
        "libraries": libraries,
        "dataset": dataset,
        "dataset_version": dataset_version,
        "sample_id": sample_id,
        "sample": sample_fingerprint,
        "seed": seed,
    }
    if previous_edit is not None:  # keys of unchained edits stay as they were
        parts["previous_edit"] = previous_edit
    return stable_hash(parts)


class EditRecord:
    """A stored edit: metadata from edit.json, image and mask read on demand."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder = folder
        self.meta = meta

    @property
    def status(self) -> EditStatus:
        return EditStatus(self.meta["status"])

    def image(self) -> np.ndarray:
        return read_png(self.folder / "edit.png")

    def mask(self) -> np.ndarray | None:
        p = self.folder / "mask.png"
        return read_png(p) if p.is_file() else None


class EditStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> EditRecord | None:
        folder = self.folder(key)
        try:
            with open(folder / "edit.json") as f:
                meta = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if meta.get("status") == EditStatus.OK.value and not (folder / "edit.png").is_file():
            return None
        return EditRecord(folder, meta)

    def record_for(self, key: str, result: EditResult, extra: dict[str, Any]) -> EditRecord:
        """The record ``put`` will store, available before the files are written."""
        meta = {
            **extra,
            "key": key,
            "status": result.status.value,
            "reason": result.reason,
            "traceback": result.traceback,
            "prep_seconds": result.prep_seconds,
            "infer_seconds": result.infer_seconds,
            "peak_memory_bytes": result.peak_memory_bytes,
            "flags": list(result.flags),
            "info": result.info,
        }
        return EditRecord(self.folder(key), meta)

    def put(self, key: str, result: EditResult, extra: dict[str, Any]) -> EditRecord:
        rec = self.record_for(key, result, extra)
        rec.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(rec.folder)
        if result.status == EditStatus.OK:
            assert result.image is not None
            save_png(rec.folder / "edit.png", result.image)
            if result.mask is not None:
                save_png(rec.folder / "mask.png", np.asarray(result.mask, dtype=bool))
        save_json(rec.folder / "edit.json", rec.meta)  # last: marks the edit complete
        return rec

    # -- scores ---------------------------------------------------------------------------
    def get_scores(self, key: str, metric_hash: str) -> list[ScoreValue] | None:
        try:
            with open(self.folder(key) / "scores" / f"{metric_hash}.json") as f:
                rows = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return [ScoreValue(r["metric"], r["region"], _decode(r["value"]), r.get("flag")) for r in rows]

    def put_scores(self, key: str, metric_hash: str, values: list[ScoreValue]) -> None:
        rows = [{"metric": v.metric, "region": v.region, "value": _encode(v.value), "flag": v.flag} for v in values]
        folder = self.folder(key) / "scores"
        remove_stale_temps(folder)
        save_json(folder / f"{metric_hash}.json", rows)


    def get_set_scores(self, set_key: str) -> list[ScoreValue] | None:
        """Scores of a set metric over a set of edits (FID, KID), keyed by metric and edit set."""
        try:
            with open(self.root / "sets" / f"{set_key}.json") as f:
                rows = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return [ScoreValue(r["metric"], r["region"], _decode(r["value"]), r.get("flag")) for r in rows]

    def put_set_scores(self, set_key: str, values: list[ScoreValue]) -> None:
        rows = [{"metric": v.metric, "region": v.region, "value": _encode(v.value), "flag": v.flag} for v in values]
        remove_stale_temps(self.root / "sets")
        save_json(self.root / "sets" / f"{set_key}.json", rows)


def _encode(v: float) -> Any:
    # JSON has no NaN/inf: store them as strings.
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _decode(v: Any) -> float:
    return float(v)
