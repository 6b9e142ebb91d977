"""PartEdit-Bench (Cvejic, Eldesokey, Wonka, "PartEdit", SIGGRAPH 2025), format ``partedit_bench``.

The benchmark is published as a Hugging Face dataset (``Aleksandar/PartEdit-Bench``; the official
demo, ``app.py`` of Gorluxor/PartEdit, reads it with ``datasets.load_dataset(...,
revision="v1.1", split="synth")``), stored as parquet files with two splits: ``synth`` (60
images generated with SDXL) and ``real`` (13 photographs), 7 object parts. Columns (the dataset
viewer's schema; ``token_cls`` from v1.1 on): ``id``, ``original_image``, ``partedit`` (the
authors' own edit), ``subject``, ``edit``, ``part``, ``gt_mask``, ``class_name``,
``prompt_original``, ``prompt_changed``, ``p2p_prompt``, ``p2p_template``,
``instructp2p_edit1`` .. ``instructp2p_edit3``, ``seed``, ``token_cls``. Image columns are
parquet structs ``{"bytes": <encoded file>, "path": <file name or null>}``, as the ``datasets``
library writes its ``Image`` feature.

``root`` is a local copy, never downloaded by the harness: the folder ``huggingface-cli download
Aleksandar/PartEdit-Bench --repo-type dataset --revision v1.1 --local-dir DIR`` writes (the split's
files are found as ``data/<split>-*.parquet``, ``data/<split>/*.parquet``, ``<split>-*.parquet``,
``<split>/*.parquet`` or ``<split>.parquet``, in that order, the first pattern with a match
wins), or one ``.parquet`` file holding the split. ``data_files`` names the split's files
explicitly (a glob relative to ``root``).

Samples. One per row, id ``<split>_<id>`` (the split keeps the two splits' ids apart in one
results table; characters outside ``[A-Za-z0-9_.-]`` become ``_``). ``source`` = the original
image; ``mask`` = ``gt_mask`` (True = the part to edit), read with the harness's mask rules
(:data:`harness.images.MASK_RULES`; default ``threshold`` at 127, each conversion of a soft mask
noted on the sample: no official evaluation code was released, so the rule is ours, stated);
``source_caption`` = ``prompt_original``; ``target_caption`` = ``prompt_changed`` (the text
alphaCLIP_FG compares the edited part with under ``metrics=partedit``); ``instruction`` =
``instructp2p_edit1`` (the text given to InstructPix2Pix; ``_edit2`` and ``_edit3`` in ``meta``);
``part`` = ``part``; ``category`` = ``part`` (one category for the whole set: a part edit is none
of :data:`harness.types.CATEGORIES`, so this format always declares ``part`` as an extra category).
``meta``: ``split``, ``bench_id`` (the row's ``id``), ``seed`` (the generation seed of the
synthetic image and the authors' edit), ``subject``, ``edit`` (the official edit replaces
``subject`` by ``edit`` in the prompt), ``class_name``, ``token_cls`` (the part token's name,
v1.1), ``p2p_prompt``, ``p2p_template``, ``instructp2p_edit2``, ``instructp2p_edit3``.

The authors' results (column ``partedit``) are not a sample field: they are scored as a method,
``method=partedit_bench_results`` (:mod:`methods.partedit_bench_results`), which reads the same
files with :func:`read_split` and returns the authors' image for each sample id.

Input safety: the parquet files must lie inside ``root`` (links resolving outside are refused);
an image struct without bytes may name a file by a relative ``path`` inside ``root`` (refused
otherwise, before it is opened); each image's size is read from its header and refused above
``max_pixels`` before it is decoded. A missing column is a :class:`harness.types.DatasetError`
naming it; a bad cell fails its sample only, naming the sample and the column.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..images import (DECODE_DIFFERS, DEFAULT_MAX_PIXELS, MASK_CONVERSIONS, binarize_mask, check_mask_rule,
                      check_max_pixels, decode_options, mask_levels, rgb_from_image)
from ..registry import DATASET_FORMATS
from ..types import CATEGORIES, DatasetError, Sample, SampleError
from .generic import DatasetLoader, SampleRef, _fingerprint, inside, select_refs, subset_params

SPLITS = ("synth", "real")
#: The one category of the set, beyond harness.types.CATEGORIES (always declared by this format).
CATEGORY = "part"
EXTRA_CATEGORIES = (CATEGORY,)
#: Image columns (parquet structs {"bytes", "path"}).
IMAGE_COLUMNS = ("original_image", "gt_mask", "partedit")
#: Columns every file of the set must have (the loader's fields come from them).
REQUIRED_COLUMNS = ("id", "original_image", "gt_mask", "part", "prompt_original", "prompt_changed")
#: Text columns that are required per row.
REQUIRED_TEXT = ("part", "prompt_original", "prompt_changed")
#: Text columns read when present (null allowed); token_cls only from v1.1 on.
OPTIONAL_TEXT = ("subject", "edit", "class_name", "p2p_prompt", "p2p_template", "instructp2p_edit1",
                 "instructp2p_edit2", "instructp2p_edit3", "token_cls")
#: File patterns of a split inside the downloaded folder, tried in order.
SPLIT_PATTERNS = ("data/{split}-*.parquet", "data/{split}/*.parquet", "{split}-*.parquet", "{split}/*.parquet",
                  "data/{split}.parquet", "{split}.parquet")


def sample_id(split: str, bench_id: Any) -> str:
    """The harness id of a row: ``<split>_<id>``, characters outside ``[A-Za-z0-9_.-]`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{split}_{bench_id}")


def split_files(root: Path, split: str, data_files: str | None = None) -> list[Path]:
    """The parquet files of ``split`` under ``root`` (a folder or one ``.parquet`` file), sorted;
    each checked to resolve inside ``root``. FileNotFoundError says what was looked for."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() != ".parquet":
            raise FileNotFoundError(f"PartEdit-Bench file {root} is not a .parquet file")
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"PartEdit-Bench folder not found: {root} (expected the downloaded dataset folder "
                                f"with data/{split}-*.parquet, or one .parquet file)")
    patterns = [data_files] if data_files else [p.format(split=split) for p in SPLIT_PATTERNS]
    real_root = root.resolve()
    for pattern in patterns:
        if Path(pattern).is_absolute() or ".." in re.split(r"[\\/]", pattern):
            raise ValueError(f"data_files {pattern!r} must be a glob relative to the dataset folder, without '..'")
        found = sorted(Path(p) for p in glob.glob(str(root / pattern)) if Path(p).is_file())
        if found:
            for p in found:
                if not p.resolve().is_relative_to(real_root):
                    raise DatasetError(f"{p.relative_to(root)} resolves outside the dataset folder {root} "
                                       "(through a symbolic link); refused")
            return found
    raise FileNotFoundError(f"no parquet file of split '{split}' in {root} (looked for {', '.join(patterns)})")


def read_split(root: Path, split: str, data_files: str | None = None,
               columns: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The rows of a split as dicts (image columns as ``{"bytes", "path"}`` dicts), in file order.

    ``columns``: read only these (those present); the required columns must be in every file.
    Raises DatasetError for a file that is not parquet or lacks a required column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in split_files(root, split, data_files):
        shown = path.name if Path(root).is_file() else path.relative_to(root).as_posix()
        try:
            schema = pq.read_schema(path)
            names = set(schema.names)
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise DatasetError(f"{shown}: no column(s) {', '.join(missing)}; PartEdit-Bench files have "
                                   f"{', '.join(REQUIRED_COLUMNS)} (and {', '.join(OPTIONAL_TEXT)}, seed, partedit)")
            wanted = None if columns is None else [c for c in schema.names if c in columns]
            table = pq.read_table(path, columns=wanted)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{shown}: not readable as parquet: {e}") from None
        rows.extend(table.to_pylist())
    return rows


def image_struct_bytes(cell: Any, root: Path, sid: str, field: str, real_root: Path | None = None) -> tuple[bytes, str]:
    """The encoded bytes of an image cell and how to name it in messages. A cell is the
    ``datasets`` library's struct ``{"bytes", "path"}`` (bytes preferred; a relative ``path``
    inside ``root`` is read when there are no bytes), or raw bytes."""
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell), field
    if not isinstance(cell, Mapping):
        raise SampleError(sid, field, f"expected an image struct {{bytes, path}}, got {type(cell).__name__}")
    data, rel = cell.get("bytes"), cell.get("path")
    shown = f"{field} ({rel})" if isinstance(rel, str) and rel else field
    if isinstance(data, (bytes, bytearray)) and data:
        return bytes(data), shown
    if rel is None or rel == "":
        raise SampleError(sid, field, "image struct has neither bytes nor a path")
    base = Path(root) if Path(root).is_dir() else Path(root).parent
    path = inside(base, base, rel, sid, field, real_root)  # refuses absolute, '..' and links leading out
    if not path.is_file():
        raise SampleError(sid, field, f"image struct has no bytes and its path {rel!r} is not a file in the dataset folder")
    return path.read_bytes(), shown


def _open(data: bytes, sid: str, field: str, shown: str, max_pixels: int) -> Image.Image:
    """Pillow's header read with the size limit checked before anything is decoded (the bytes
    counterpart of :func:`harness.images.open_image`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SampleError(sid, field, f"{shown} is too large to decode safely ({e}); "
                                      f"the limit is dataset.max_pixels={max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(sid, field, f"{shown}: not a readable image: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise SampleError(sid, field, f"{shown} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                                      "(dataset.max_pixels); refused before decoding")
    return img


def decode_image(data: bytes, sid: str, field: str, shown: str, notes: list[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 exif_orientation: bool = True, alpha: str = "white",
                 differs: dict[str, list[str]] | None = None) -> np.ndarray:
    """Encoded image bytes as RGB uint8 HxWx3 with the harness's conversions and notes (as
    :func:`harness.images.load_image` does for files); SampleError names the sample and field."""
    img = _open(data, sid, field, shown, max_pixels)
    try:
        with img:
            img.load()
            arr = rgb_from_image(img, field, notes, exif_orientation=exif_orientation, alpha=alpha, differs=differs)
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(sid, field, f"unreadable or truncated image {shown}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SampleError(sid, field, f"image {shown} has unusable shape {arr.shape}")
    return np.ascontiguousarray(arr)


def decode_mask(data: bytes, sid: str, field: str, shown: str, shape: tuple[int, int], rule: str, threshold: int,
                notes: list[str], *, max_pixels: int = DEFAULT_MAX_PIXELS, exif_orientation: bool = True) -> np.ndarray:
    """Encoded mask bytes as bool HxW (True = the part): the levels are the alpha channel when it
    is not fully opaque, else the grey levels, read with the dataset's mask rule (as
    :func:`harness.images.load_mask` reads files)."""
    img = _open(data, sid, field, shown, max_pixels)
    try:
        with img:
            levels, top = mask_levels(img, field, notes, exif_orientation)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(sid, field, f"unreadable or truncated mask {shown}: {e}") from None
    if levels.shape != tuple(shape):
        raise SampleError(sid, field, f"mask is {levels.shape[1]}x{levels.shape[0]} (WxH) but original_image is "
                                      f"{shape[1]}x{shape[0]}")
    return binarize_mask(levels, top, sid, field, shown, rule, threshold, notes)


def _text_problem(v: Any, required: bool) -> str | None:
    if v is None:
        return "missing (null)" if required else None
    if not isinstance(v, str):
        return f"must be text, got {type(v).__name__} {v!r}"
    if required and not v.strip():
        return "empty text"
    return None


class ParquetRows:
    """What a loader of rows stored in parquet files shares (PartEdit-Bench, TEdBench): its
    ``_read()`` returns the refs and fills ``self._rows`` (id -> row); the images live inside the
    parquet, so their bytes are in each ref's fingerprint and no input file is named."""

    _rows: dict[str, Any] | None

    def refs(self) -> list[SampleRef]:
        """The rows after ids, shard and limit (no image decoded); bad rows carry ``error``."""
        return select_refs(self._read(), self.name, self.ids, self.shard, self.limit)

    def input_files(self, ref: SampleRef) -> dict[str, Path]:
        return {}

    def row(self, ref: SampleRef, where: str) -> Any:
        """The stored row of ``ref`` (read again if needed); its own error, or one naming the id."""
        if ref.error is not None:
            raise ref.error
        if self._rows is None or ref.id not in self._rows:
            self._read()
        row = self._rows.get(ref.id)
        if row is None:
            raise SampleError(ref.id, "id", f"no row with this id in {where}")
        return row


@DATASET_FORMATS.register("partedit_bench")
class PartEditBenchDataset(ParquetRows, DatasetLoader):
    """Loader for a local copy of PartEdit-Bench (one split per loader); see the module doc."""

    def __init__(
        self,
        root: str | Path,
        name: str | None = None,
        split: str = "synth",
        data_files: str | None = None,
        version: str | int | None = None,
        limit: int | None = None,
        shard: str | None = None,
        ids: list[str] | None = None,
        mask_rule: str | None = "threshold",
        mask_threshold: int | None = None,
        max_pixels: int | None = None,
        extra_categories: list[str] | None = None,
        **card_extra: Any,
    ):
        self.name = str(name or f"partedit_bench_{split}")
        owner = f"dataset '{self.name}'"
        if split not in SPLITS:
            raise ValueError(f"{owner}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if extra_categories is not None and (not isinstance(extra_categories, (list, tuple))
                                             or not all(isinstance(c, str) for c in extra_categories)):
            raise ValueError(f"{owner}: extra_categories must be a list of names, got {extra_categories!r}")
        # "part" is always known here, whatever the card says (it is this format's category)
        extra = [*EXTRA_CATEGORIES, *(c for c in (extra_categories or ()) if c not in EXTRA_CATEGORIES)]
        self.categories = (*CATEGORIES, *(c for c in extra if c not in CATEGORIES))
        self.split = split
        self.data_files = data_files
        self.mask_rule, self.mask_threshold = check_mask_rule(
            "threshold" if mask_rule is None else mask_rule, mask_threshold, owner)
        self.max_pixels = check_max_pixels(max_pixels, owner)
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"{owner}: PartEdit-Bench not found: {self.root} (expected the downloaded dataset "
                                    f"folder with data/{split}-*.parquet, or one .parquet file)")
        self.files = split_files(self.root, split, data_files)  # the split's files exist (or a clear error)
        self._real_root = (self.root if self.root.is_dir() else self.root.parent).resolve()
        self.version = str(version if version is not None else "1.1")
        self.limit, self.shard, self.ids = subset_params(self.name, limit, shard, ids)
        self._rows: dict[str, dict[str, Any]] | None = None

    # -- rows -----------------------------------------------------------------------------
    def _read(self) -> list[SampleRef]:
        cols = (*REQUIRED_COLUMNS, *OPTIONAL_TEXT, "seed", "original_image", "gt_mask")
        rows = read_split(self.root, self.split, self.data_files, columns=cols)
        self._rows = {}
        refs: list[SampleRef] = []
        seen: set[str] = set()
        for i, row in enumerate(rows):
            bench_id = row.get("id")
            sid = sample_id(self.split, bench_id if bench_id is not None else f"row{i}")
            if sid in seen:
                sid = f"{sid}.row{i}"  # kept apart, and failed below with the reason
                refs.append(SampleRef(sid, {}, sid, error=SampleError(sid, "id", f"id {bench_id!r} repeats an "
                                                                               "earlier row of this split")))
                continue
            seen.add(sid)
            self._rows[sid] = row
            refs.append(self._parse(sid, row))
        return refs

    def _parse(self, sid: str, row: dict[str, Any]) -> SampleRef:
        record: dict[str, Any] = {"split": self.split}
        for key in (*REQUIRED_TEXT, *OPTIONAL_TEXT, "seed", "id"):
            record[key] = row.get(key)
        problem = None
        if row.get("id") is None:
            problem = SampleError(sid, "id", "missing (null)")
        for key in REQUIRED_TEXT + OPTIONAL_TEXT:
            why = _text_problem(row.get(key), key in REQUIRED_TEXT)
            if problem is None and why:
                problem = SampleError(sid, key, why)
        seed = row.get("seed")
        if problem is None and seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            problem = SampleError(sid, "seed", f"must be an integer, got {type(seed).__name__} {seed!r}")
        # the image bytes are part of the fingerprint: a replaced file gives another cache key
        digest = hashlib.sha256()
        for col in ("original_image", "gt_mask"):
            cell = row.get(col)
            data = cell.get("bytes") if isinstance(cell, Mapping) else cell
            digest.update(data if isinstance(data, (bytes, bytearray)) else json.dumps(cell, default=str).encode())
            digest.update(b"\0")
        record["images_sha256"] = digest.hexdigest()
        if isinstance(record["id"], (bytes, bytearray)):
            record["id"] = record["id"].decode("utf-8", "replace")
        return SampleRef(sid, record, _fingerprint(json.loads(json.dumps(record, default=str))), CATEGORY, problem)

    # -- decoding -------------------------------------------------------------------------
    def load(self, ref: SampleRef, decode: Mapping[str, Any] | None = None) -> Sample:
        """Decode one row; raises SampleError naming the sample and the column at fault."""
        opts = decode_options(decode)
        row = self.row(ref, f"split '{self.split}'")
        sid, rec = ref.id, ref.record
        notes: list[str] = []
        differs: dict[str, list[str]] = {}
        data, shown = image_struct_bytes(row.get("original_image"), self.root, sid, "original_image", self._real_root)
        source = decode_image(data, sid, "original_image", shown, notes, max_pixels=self.max_pixels,
                              differs=differs, **opts)
        mask_notes: list[str] = []
        data, shown = image_struct_bytes(row.get("gt_mask"), self.root, sid, "gt_mask", self._real_root)
        mask = decode_mask(data, sid, "gt_mask", shown, source.shape[:2], self.mask_rule, self.mask_threshold,
                           mask_notes, max_pixels=self.max_pixels, exif_orientation=opts["exif_orientation"])
        if not mask.any():
            raise SampleError(sid, "gt_mask", "the part mask is empty (no pixel marks the part)")
        notes.extend(mask_notes)
        meta: dict[str, Any] = {
            "split": self.split,
            "bench_id": rec["id"],
            "seed": rec.get("seed"),
            **{k: rec.get(k) for k in ("subject", "edit", "class_name", "token_cls", "p2p_prompt", "p2p_template",
                                       "instructp2p_edit2", "instructp2p_edit3")},
        }
        if notes:
            meta["input_notes"] = notes
        if differs:
            meta[DECODE_DIFFERS] = differs
        if mask_notes:
            meta[MASK_CONVERSIONS] = {"mask": mask_notes}
        return Sample(
            id=sid,
            dataset=self.name,
            source=source,
            instruction=rec.get("instructp2p_edit1"),
            source_caption=rec["prompt_original"],
            target_caption=rec["prompt_changed"],
            mask=mask,
            category=CATEGORY,
            part=rec["part"],
            meta=meta,
        )
