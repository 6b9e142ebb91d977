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

File paths must be relative and stay inside the dataset folder: an absolute path, a ``..``
component or a symbolic link that resolves outside makes the sample fail, naming the field,
before any file is opened (not even to hash it for the cache key). A manifest line that is not
valid UTF-8 or JSON fails as sample ``line<N>``; the other lines are used.

Dataset parameters (the dataset config, ``dataset.<key>=...``, or else the card):
``mask_rule`` (``binary`` (default): a mask with soft levels fails; ``threshold``: levels >
``mask_threshold`` (default 127) are edited; ``nonzero``: every non-zero level is edited; each
conversion is noted on the sample and reported by ``validate``), ``max_pixels`` (images and masks
declaring more pixels are refused unread; default Pillow's limit, about 89.5 million) and
``extra_categories`` (categories this dataset adds to :data:`harness.types.CATEGORIES`; any other
category is an error naming the known ones).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import ntpath
import os
import re
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import yaml

from ..images import (DECODE_DIFFERS, MASK_CONVERSIONS, check_mask_rule, check_max_pixels, decode_options,
                      load_image, load_mask)
from ..registry import DATASET_FORMATS
from ..types import CATEGORIES, Sample, SampleError

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


_SEP = re.compile(r"[\\/]")


def path_problem(rel: Any) -> str | None:
    """Why a dataset's file field ``rel`` is not a safe relative path, or None: it must be a
    non-empty string, not absolute (POSIX or Windows form), with no ``..`` component."""
    if not isinstance(rel, str) or not rel:
        return f"must be a relative file path, got {rel!r}"
    if "\x00" in rel:
        return "contains a NUL character"
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ntpath.splitdrive(rel)[0]:
        return f"path {rel!r} is absolute; dataset paths must be relative to the dataset folder"
    if ".." in _SEP.split(rel):
        return f"path {rel!r} has a '..' component; dataset paths must stay inside the dataset folder"
    return None


def inside(root: Path, base: Path, rel: Any, sample_id: str, field: str, real_root: Path | None = None,
           dirs: dict[str, str] | None = None) -> Path:
    """``base / rel`` checked to be a file path inside the dataset folder ``root``, without
    opening anything (only the links on the way are read): ``rel`` must pass
    :func:`path_problem`, and the path with its symbolic links resolved must lie under ``root``'s.
    Raises SampleError naming the sample and the field (and only the relative path).

    ``dirs``: a cache of resolved folders for one pass over a manifest (samples share a few
    folders): the file itself is then checked with one ``lstat`` (resolved in full only when it
    is a link) instead of resolving every component again. The check repeated just before a
    file is opened passes no cache."""
    problem = path_problem(rel)
    if problem:
        raise SampleError(sample_id, field, problem)
    path = base / rel
    try:
        real_root = real_root or root.resolve()
        if dirs is None or path.is_symlink():
            real = path.resolve()
        else:
            # os.path on strings: this runs for every file of every manifest line
            folder, name = os.path.split(os.path.join(base, rel))
            real_dir = dirs.get(folder)
            if real_dir is None:
                real_dir = dirs[folder] = os.path.realpath(folder)
            real = Path(real_dir, name)
    except (OSError, RuntimeError) as e:  # a symbolic link loop
        raise SampleError(sample_id, field, f"path {rel!r} cannot be resolved: {type(e).__name__}") from None
    if not real.is_relative_to(real_root):
        raise SampleError(sample_id, field, f"path {rel!r} resolves outside the dataset folder "
                                            "(through a symbolic link); refused")
    return path


class DatasetLoader:
    """What every format loader shares: iteration over ``refs()``, the checks that its
    folder and files exist (errors name the dataset and say what was expected), and
    :meth:`validate`."""

    name: str
    #: Whether the format carries edit categories (a sample without one is then a warning).
    has_categories: bool = True

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

    def load(self, ref: SampleRef, decode: Mapping[str, Any] | None = None) -> Sample:
        raise NotImplementedError

    def validate(self) -> list[SampleError]:
        """Decode every sample and return every problem found, errors and warnings
        (``SampleError.level``); an empty list means valid. Nothing a sample holds stops the
        check: an unexpected exception becomes an error naming the sample.

        Warnings: each mask conversion the dataset's ``mask_rule`` made (field ``mask``), and
        samples without a category (one warning listing them all) where the format has them."""
        problems: list[SampleError] = []
        no_category: list[str] = []
        for ref in self.refs():
            try:
                sample = self.load(ref)
            except SampleError as e:
                problems.append(e)
                continue
            except Exception as e:  # a loader bug or an odd file must not end validation
                last = traceback.extract_tb(e.__traceback__)[-1:]
                where = f" (at {last[0].name})" if last else ""
                problems.append(SampleError(ref.id, "?", f"{type(e).__name__}: {e}{where}"))
                continue
            for field, notes in (sample.meta.get(MASK_CONVERSIONS) or {}).items():
                problems.append(SampleError(ref.id, field, "; ".join(notes), level="warning"))
            if self.has_categories and sample.category is None:
                no_category.append(ref.id)
        if no_category:
            shown = ", ".join(no_category[:10]) + (f", ... ({len(no_category) - 10} more)" if len(no_category) > 10 else "")
            problems.append(SampleError(
                no_category[0], "category",
                f"{len(no_category)} sample(s) have no category ({shown}): every method whose required "
                "fields they have edits them, and per-category tables group them under '-'",
                level="warning"))
        return problems

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
        mask_rule: str | None = None,
        mask_threshold: int | None = None,
        max_pixels: int | None = None,
        extra_categories: list[str] | None = None,
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
        owner = f"dataset '{self.name}'"
        self.mask_rule, self.mask_threshold = check_mask_rule(
            mask_rule if mask_rule is not None else card.get("mask_rule"),
            mask_threshold if mask_threshold is not None else card.get("mask_threshold"), owner)
        self.max_pixels = check_max_pixels(max_pixels if max_pixels is not None else card.get("max_pixels"), owner)
        extra = extra_categories if extra_categories is not None else card.get("extra_categories")
        if extra is not None and (not isinstance(extra, (list, tuple)) or not all(isinstance(c, str) for c in extra)):
            raise ValueError(f"{owner}: extra_categories must be a list of names, got {extra!r}")
        self.categories = (*CATEGORIES, *(c for c in (extra or ()) if c not in CATEGORIES))
        self._real_root = self.root.resolve()
        self._real_dirs: dict[str, str] = {}  # folders resolved while reading the manifest (inside())

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
        with open(self.manifest_path, "rb") as f:  # bytes: one line that is not UTF-8 fails alone
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    where = f"line{lineno}"
                    refs.append(SampleRef(where, {}, where, error=SampleError(
                        where, "manifest", f"line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})")))
                    continue
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
        category = record.get("category")
        return SampleRef(sid, record, fp, category if isinstance(category, str) else None, self._problem(sid, record))

    def _problem(self, sid: str, record: dict[str, Any]) -> SampleError | None:
        """The first problem of an entry that can be found without reading a file, or None."""
        unknown = sorted(set(record) - set(KNOWN_KEYS))
        if unknown:
            return SampleError(sid, unknown[0], f"unknown manifest key(s) {unknown}; known: {', '.join(KNOWN_KEYS)}")
        if "source" not in record:
            return SampleError(sid, "source", "missing (every sample needs a source image)")
        for key in (*IMAGE_KEYS, *MASK_KEYS):  # before anything opens (or hashes) a file
            if record.get(key) is not None:
                try:
                    inside(self.root, self.root, record[key], sid, key, self._real_root, self._real_dirs)
                except SampleError as e:
                    return e
        category = record.get("category")
        if category is not None and category not in self.categories:
            return SampleError(sid, "category", f"unknown category {category!r}; known: {', '.join(self.categories)} "
                                                "(a dataset may add its own: extra_categories: [...] in its card)")
        return None

    def input_files(self, ref: SampleRef) -> dict[str, Path]:
        rec = ref.record if isinstance(ref.record, dict) else {}
        if ref.error is not None:  # an unsafe path is never opened, not even to be hashed
            return {}
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
            images[key] = load_image(self._path(rec, sid, key), sid, key, notes, differs=differs,
                                     shown=rec[key], max_pixels=self.max_pixels, **opts)
        masks: dict[str, np.ndarray | None] = {}
        conversions: dict[str, list[str]] = {}
        for key, owner in MASK_KEYS.items():
            if rec.get(key) is None:
                masks[key] = None
                continue
            if images[owner] is None:
                raise SampleError(sid, key, f"given without '{owner}'")
            mask_notes: list[str] = []
            masks[key] = load_mask(self._path(rec, sid, key), sid, key, images[owner].shape[:2],
                                   exif_orientation=opts["exif_orientation"], rule=self.mask_rule,
                                   threshold=self.mask_threshold, notes=mask_notes, shown=rec[key],
                                   max_pixels=self.max_pixels)
            if mask_notes:
                conversions[key] = mask_notes
                notes.extend(mask_notes)
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
        if conversions:
            meta[MASK_CONVERSIONS] = conversions
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
        # checked again right before the file is opened (the ref may be older than a new link)
        return inside(self.root, self.root, rec[key], sid, key, self._real_root)


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


def shard_index(key: str, n: int) -> int:
    """The shard (0..n-1) of a sample or session id: sha1 of the UTF-8 id, as an integer, mod n.

    A function of the id alone (not of Python's per-process ``hash``, nor of the dataset's
    order), so a sample lands in the same shard in every run, on every machine, whatever order
    the dataset lists it in, and the shards of a run partition its samples."""
    return int.from_bytes(hashlib.sha1(str(key).encode("utf-8")).digest(), "big") % int(n)


def unit_key(unit: Any) -> str:
    """The id a selection unit is sharded by: a ref's id; for a group of refs that stay together
    (a multi-turn session) its ``session`` (the records' common ``session`` field), else its
    first ref's id."""
    if isinstance(unit, (list, tuple)):
        if not unit:
            return ""
        rec = unit[0].record if isinstance(unit[0].record, Mapping) else {}
        session = rec.get("session")
        return str(session) if isinstance(session, str) and session else unit[0].id
    return unit.id


def select_refs(units: list, name: str, ids: list[str] | None, shard: tuple[int, int] | None,
                limit: int | None) -> list:
    """The subset every loader offers: ``ids`` (each must exist), then the first ``limit``, then
    the units of shard ``i`` of ``n`` (``shard``: :func:`shard_index` of the unit's id, see
    :func:`unit_key`). ``units`` are refs, or (with ``ids=None``) groups of refs that must stay
    together, such as a multi-turn session, which are sharded whole.

    The limit comes before the shard so that the ``n`` shards of a job partition exactly the
    samples the unsharded job has (``dataset.limit=100 dataset.shards=4``: the same 100)."""
    if ids is not None:
        wanted = set(ids)
        missing = wanted - {r.id for r in units}
        if missing:
            raise KeyError(f"dataset '{name}' has no sample(s) {sorted(missing)}")
        units = [r for r in units if r.id in wanted]
    if limit is not None:
        units = units[:limit]
    if shard is not None:
        i, n = shard
        units = [u for u in units if shard_index(unit_key(u), n) == i]
    return units


#: A shard's job folder: ``<job id>~shard<i>of<n>`` (harness.runner, harness.merge)
SHARD_FOLDER_RE = re.compile(r"(?P<job>.+)~shard(?P<i>\d+)of(?P<n>\d+)")


def shard_folder_name(job_id: str, i: int, n: int) -> str:
    return f"{job_id}~shard{i:0{len(str(n - 1))}d}of{n}"


def shard_of_config(dataset: Mapping[str, Any]) -> tuple[int, int] | None:
    """(i, n) of a dataset config's ``shard`` ("i/n"), None when it has none."""
    return _parse_shard(dict(dataset).get("shard"), str(dict(dataset).get("name", "?")))


def _parse_shard(shard: str | None, name: str) -> tuple[int, int] | None:
    if shard in (None, ""):
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", str(shard))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"dataset '{name}': shard must look like 'i/n' with 0 <= i < n, got {shard!r}")
    return int(m.group(1)), int(m.group(2))
