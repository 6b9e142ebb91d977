"""The generic on-disk dataset format: a JSONL manifest plus image and mask files.

Layout (paths in the manifest are relative to the manifest's folder)::

    my_set/
      card.yaml          # optional: name, version, format: generic, manifest, licence ...
      manifest.jsonl     # one JSON object per sample
      images/*.png
      masks/*.png

Manifest keys: ``id`` (required, unique, ``[A-Za-z0-9_.-]+``), ``source`` (required image
path), and optionally ``target``, ``instruction``, ``source_caption``, ``target_caption``,
``mask``, ``category``, ``part``, ``turn``, ``session``, ``source_points``, ``target_points``
(lists of [x, y]), ``point_layout``, ``reference``, ``reference_mask``, ``meta`` (dict).

Reading the manifest is cheap (no image is decoded); :meth:`GenericDataset.load` decodes one
sample and checks it, raising :class:`SampleError` that names the sample and the field.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import yaml

from ..images import DECODE_DIFFERS, decode_options, load_image, load_mask
from ..registry import DATASET_FORMATS
from ..types import Sample, SampleError

ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
IMAGE_KEYS = ("source", "target", "reference")
MASK_KEYS = {"mask": "source", "reference_mask": "reference"}
TEXT_KEYS = ("instruction", "source_caption", "target_caption", "category", "part", "session", "point_layout")
POINT_KEYS = ("source_points", "target_points")
KNOWN_KEYS = ("id", *IMAGE_KEYS, *MASK_KEYS, *TEXT_KEYS, "turn", *POINT_KEYS, "meta")


@dataclasses.dataclass(frozen=True)
class SampleRef:
    """A manifest entry, parsed but not decoded. ``error`` is set for an unusable entry."""

    id: str
    record: dict[str, Any]
    fingerprint: str
    category: str | None = None
    error: SampleError | None = None


def _fingerprint(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


# -- input file contents ------------------------------------------------------------------------
# sha256 of each input file, once per process: keyed by what changes when a file is rewritten or
# replaced (device, inode, size, mtime, ctime). Like git's index ("racy git"), a file modified
# less than RACY_SECONDS ago is not trusted to the cache, since a rewrite within one tick of the
# file system's clock keeps its mtime; such a file is hashed again each time it is asked for.
RACY_SECONDS = 2.0
_clock = time.time
_DIGESTS: dict[tuple, str] = {}
_DIGESTS_LOCK = threading.Lock()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes; ``missing`` or ``unreadable:<errno>`` when it cannot be read
    (the sample then fails to load with the reason, and is not cached)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable:{errno.errorcode.get(e.errno, e.errno)}"
    stamp = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _DIGESTS_LOCK:
        hit = _DIGESTS.get(stamp)
    if hit is not None:
        return hit
    try:
        digest = _sha256_file(p)
    except IsADirectoryError:
        return "not_a_file"
    except OSError as e:
        return f"unreadable:{errno.errorcode.get(e.errno, e.errno)}"
    if _clock() - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > RACY_SECONDS:
        with _DIGESTS_LOCK:
            _DIGESTS[stamp] = digest
    return digest


def content_fingerprint(manifest_fingerprint: str, files: Mapping[str, Path]) -> str:
    """A sample's cache fingerprint: its manifest entry's and the bytes of each of its input
    files (by field, not path: a dataset folder that moves keeps its keys)."""
    if not files:
        return manifest_fingerprint
    parts = {"manifest": manifest_fingerprint, "files": {k: file_digest(p) for k, p in sorted(files.items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class DatasetLoader:
    """What every format loader shares: iteration over ``refs()`` and the checks that its
    folder and files exist (errors name the dataset and say what was expected)."""

    name: str

    def refs(self) -> list[SampleRef]:
        raise NotImplementedError

    def input_files(self, ref: SampleRef) -> dict[str, Path]:
        """The files a sample is decoded from, by field (images, masks): their bytes are part of
        its cache fingerprint. Paths that are not usable strings are left out (the sample fails
        to load anyway)."""
        raise NotImplementedError

    def fingerprint(self, ref: SampleRef) -> str:
        """What an edit's cache key holds of its sample: the manifest entry and the content of
        every input file, so that a file replaced in place gives another key."""
        return content_fingerprint(ref.fingerprint, self.input_files(ref))

    def __iter__(self) -> Iterator[SampleRef]:
        return iter(self.refs())

    def require_dir(self, folder: Path, expected: str = "") -> Path:
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset '{self.name}': folder not found: {folder}"
                                    + (f" (expected {expected})" if expected else ""))
        return folder

    def require_file(self, path: Path, what: str) -> Path:
        if not path.is_file():
            raise FileNotFoundError(f"dataset '{self.name}': {what} not found: {path}")
        return path


@DATASET_FORMATS.register("generic")
class GenericDataset(DatasetLoader):
    """Loader for the generic manifest format."""

    def __init__(
        self,
        root: str | Path,
        name: str | None = None,
        manifest: str = "manifest.jsonl",
        version: str | int | None = None,
        limit: int | None = None,
        shard: str | None = None,
        ids: list[str] | None = None,
        **card_extra: Any,
    ):
        self.root = Path(root)
        if not self.root.is_dir():  # before the card, which names the dataset
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        card = self.read_card(self.root)
        self.name = str(name or card.get("name") or self.root.name)
        self.version = str(version if version is not None else card.get("version", "0"))
        self.manifest_path = self.root / (manifest or card.get("manifest", "manifest.jsonl"))
        self.require_file(self.manifest_path, "manifest")
        self.limit, self.shard, self.ids = subset_params(self.name, limit, shard, ids)

    @staticmethod
    def read_card(root: Path) -> dict[str, Any]:
        card = root / "card.yaml"
        if not card.is_file():
            return {}
        with open(card) as f:
            return yaml.safe_load(f) or {}

    # -- manifest -------------------------------------------------------------------------
    def refs(self) -> list[SampleRef]:
        """All entries after id filter, shard and limit; bad entries come back with ``error`` set."""
        refs: list[SampleRef] = []
        seen: set[str] = set()
        with open(self.manifest_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                refs.append(self._parse_line(line, lineno, seen))
        return select_refs(refs, self.name, self.ids, self.shard, self.limit)

    def _parse_line(self, line: str, lineno: int, seen: set[str]) -> SampleRef:
        where = f"line{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return SampleRef(where, {}, where, error=SampleError(where, "manifest", f"invalid JSON: {e}"))
        if not isinstance(record, dict):
            return SampleRef(where, {}, where, error=SampleError(where, "manifest", "entry is not a JSON object"))
        sid = record.get("id")
        if not isinstance(sid, str) or not ID_RE.match(sid):
            err = SampleError(where, "id", f"missing or invalid id {sid!r} (use letters, digits, _ . -)")
            return SampleRef(where, record, _fingerprint(record), error=err)
        fp = _fingerprint(record)
        if sid in seen:
            dup = f"{sid}@line{lineno}"
            return SampleRef(dup, record, fp, error=SampleError(dup, "id", f"duplicate id '{sid}' (again on line {lineno})"))
        seen.add(sid)
        error = None
        unknown = sorted(set(record) - set(KNOWN_KEYS))
        if unknown:
            error = SampleError(sid, unknown[0], f"unknown manifest key(s) {unknown}; known: {', '.join(KNOWN_KEYS)}")
        elif "source" not in record:
            error = SampleError(sid, "source", "missing (every sample needs a source image)")
        category = record.get("category")
        return SampleRef(sid, record, fp, category if isinstance(category, str) else None, error)

    def input_files(self, ref: SampleRef) -> dict[str, Path]:
        rec = ref.record if isinstance(ref.record, dict) else {}
        return {k: self.root / rec[k] for k in (*IMAGE_KEYS, *MASK_KEYS) if isinstance(rec.get(k), str) and rec[k]}

    # -- decoding -------------------------------------------------------------------------
    def load(self, ref: SampleRef, decode: Mapping[str, Any] | None = None) -> Sample:
        """Decode one sample; raises SampleError naming the sample and the field at fault.

        ``decode``: a protocol's image decoding (:func:`harness.images.decode_options`) for
        scoring; None = the harness default, which methods get.
        """
        if ref.error is not None:
            raise ref.error
        opts = decode_options(decode)
        rec, sid = ref.record, ref.id
        notes: list[str] = []
        differs: dict[str, list[str]] = {}
        images: dict[str, np.ndarray | None] = {}
        for key in IMAGE_KEYS:
            if rec.get(key) is None:
                images[key] = None
                continue
            images[key] = load_image(self._path(rec, sid, key), sid, key, notes, differs=differs, **opts)
        masks: dict[str, np.ndarray | None] = {}
        for key, owner in MASK_KEYS.items():
            if rec.get(key) is None:
                masks[key] = None
                continue
            if images[owner] is None:
                raise SampleError(sid, key, f"given without '{owner}'")
            masks[key] = load_mask(self._path(rec, sid, key), sid, key, images[owner].shape[:2],
                                   exif_orientation=opts["exif_orientation"])
        texts = {}
        for key in TEXT_KEYS:
            v = rec.get(key)
            if v is not None and not isinstance(v, str):
                raise SampleError(sid, key, f"must be a string, got {type(v).__name__}")
            texts[key] = v
        turn = rec.get("turn")
        if turn is not None and (isinstance(turn, bool) or not isinstance(turn, int) or turn < 0):
            raise SampleError(sid, "turn", f"must be a non-negative integer, got {turn!r}")
        points = {k: _points(rec, sid, k) for k in POINT_KEYS}
        if (points["source_points"] is None) != (points["target_points"] is None):
            raise SampleError(sid, "target_points", "source_points and target_points must be given together")
        if points["source_points"] is not None and points["source_points"].shape != points["target_points"].shape:
            raise SampleError(
                sid,
                "target_points",
                f"{len(points['target_points'])} target points for {len(points['source_points'])} source points",
            )
        if points["source_points"] is not None and texts["point_layout"] is None:
            raise SampleError(sid, "point_layout", "required with points ('dlib68' landmarks or 'drag')")
        meta = rec.get("meta", {})
        if not isinstance(meta, dict):
            raise SampleError(sid, "meta", "must be an object")
        meta = dict(meta)
        if notes:
            meta["input_notes"] = notes
        if differs:
            meta[DECODE_DIFFERS] = differs
        return Sample(
            id=sid,
            dataset=self.name,
            source=images["source"],
            target=images["target"],
            mask=masks["mask"],
            reference=images["reference"],
            reference_mask=masks["reference_mask"],
            turn=turn,
            meta=meta,
            **texts,
            **points,
        )

    def _path(self, rec: dict[str, Any], sid: str, key: str) -> Path:
        v = rec[key]
        if not isinstance(v, str) or not v:
            raise SampleError(sid, key, f"must be a relative file path, got {v!r}")
        return self.root / v

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> list[SampleError]:
        """Decode every sample; return all problems found (empty list = valid)."""
        problems = []
        for ref in self.refs():
            try:
                self.load(ref)
            except SampleError as e:
                problems.append(e)
        return problems


def _points(rec: dict[str, Any], sid: str, key: str) -> np.ndarray | None:
    v = rec.get(key)
    if v is None:
        return None
    try:
        arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise SampleError(sid, key, "must be a list of [x, y] pairs") from None
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
        raise SampleError(sid, key, f"must be a non-empty list of [x, y] pairs, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise SampleError(sid, key, "contains NaN or inf")
    return arr


def subset_params(name: str, limit: int | None, shard: str | None,
                  ids: list[str] | None) -> tuple[int | None, tuple[int, int] | None, list[str] | None]:
    """The checked subset parameters every loader takes: (limit, (i, n) shard, ids)."""
    if limit is not None and limit < 1:
        raise ValueError(f"dataset '{name}': limit must be >= 1, got {limit}")
    return limit, _parse_shard(shard, name), (list(ids) if ids else None)


def select_refs(units: list, name: str, ids: list[str] | None, shard: tuple[int, int] | None,
                limit: int | None) -> list:
    """The subset every loader offers: ``ids`` (each must exist), then every n-th from i
    (``shard``), then the first ``limit``. ``units`` are refs, or (with ``ids=None``) groups of
    refs that must stay together, such as a multi-turn session."""
    if ids is not None:
        wanted = set(ids)
        missing = wanted - {r.id for r in units}
        if missing:
            raise KeyError(f"dataset '{name}' has no sample(s) {sorted(missing)}")
        units = [r for r in units if r.id in wanted]
    if shard is not None:
        i, n = shard
        units = units[i::n]
    if limit is not None:
        units = units[:limit]
    return units


def _parse_shard(shard: str | None, name: str) -> tuple[int, int] | None:
    if shard in (None, ""):
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", str(shard))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"dataset '{name}': shard must look like 'i/n' with 0 <= i < n, got {shard!r}")
    return int(m.group(1)), int(m.group(2))
