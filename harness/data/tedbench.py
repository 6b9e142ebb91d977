"""TEdBench (Kawar et al., "Imagic", CVPR 2023), format ``tedbench``.

TEdBench ("Textual Editing Benchmark") is 100 real images, each with one target text describing a
complex non-rigid edit ("A photo of a sitting dog"), plus Imagic's own result for each. It is
published as the Hugging Face dataset ``bahjat-kawar/tedbench``: one split, ``val``, one parquet
file ``data/val-00000-of-00001.parquet``. CPAM's IMBA benchmark (:mod:`harness.data.imba`) was
built on it (CPAM sec. 5.2) but is not public; TEdBench is what can be run here.

Columns. The dataset card does not list them and its viewer was not reachable from here; the
names below are those that public code reading the dataset uses (``ds['val']['original_image']``,
``ds['val']['caption']``, and ``edited_image`` for Imagic's result). They are therefore loader
parameters (``image_column``, ``text_column``, ``result_column``), so a copy with other names
needs no code change. Image columns are parquet structs ``{"bytes", "path"}`` as the ``datasets``
library writes its ``Image`` feature (the decoding, size limits and path checks are
:mod:`harness.data.partedit_bench`'s, reused).

``root`` is a local copy, never downloaded by the harness: the folder ``huggingface-cli download
bahjat-kawar/tedbench --repo-type dataset --local-dir DIR`` writes (files found as
``data/val-*.parquet``, ``data/val/*.parquet``, ``val-*.parquet``, ``val/*.parquet``,
``data/val.parquet`` or ``val.parquet``, the first pattern with a match wins), or one ``.parquet``
file. ``data_files`` names the files explicitly (a glob relative to ``root``).

Samples. One per row, in file order, id ``tedbench_<row:03d>`` (the set has no id column: the row
index in the ``val`` split is its identity, as the published results are indexed). ``source`` =
the image; ``target_caption`` = the target text; ``mask`` = none (TEdBench has no masks: metrics
on the edited / unedited region, such as CPAM's background LPIPS, are NaN rows flagged
``no_mask``); ``category`` = none (TEdBench does not label its edits; each method whose fields
the sample has edits it, and ``validate`` does not warn, the format carrying no categories).

Source caption. TEdBench has none, and neither Imagic nor CPAM (whose method needs none) defines
one. ``source_caption_rule`` says what the loader gives methods that need one (DiffEdit,
Pix2Pix-Zero, Prompt-to-Prompt): ``none`` (default) leaves it unset, so those methods skip every
sample with the reason naming the missing field; ``empty`` gives the empty string (the
unconditional prompt: inversion and the source branch use the null text, which is what a
caption-free comparison means; a rule of ours, stated in each sample's ``meta``).

Imagic's results (``result_column``) are not a sample field: they are scored as a method,
``method=tedbench_results`` (:mod:`methods.tedbench_results`), which reads the same files.

Input safety: the parquet files must lie inside ``root``; an image struct without bytes may name
a file by a relative ``path`` inside ``root`` only; each image's size is read from its header and
refused above ``max_pixels`` before decoding. A missing column is a
:class:`harness.types.DatasetError` naming it; a bad cell fails its sample only, naming the sample
and the column.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from ..images import DECODE_DIFFERS, check_max_pixels, decode_options
from ..registry import DATASET_FORMATS
from ..types import DatasetError, Sample, SampleError
from .generic import DatasetLoader, SampleRef, _fingerprint, subset_params
from .partedit_bench import ParquetRows, decode_image, image_struct_bytes, split_files

#: TEdBench's one split.
SPLIT = "val"
#: Default column names (see the module doc: taken from public code reading the dataset).
IMAGE_COLUMN = "original_image"
TEXT_COLUMN = "caption"
RESULT_COLUMN = "edited_image"
#: What the loader gives as source_caption (TEdBench has none).
SOURCE_CAPTION_RULES = ("none", "empty")


def sample_id(row: int) -> str:
    """The harness id of the ``row``-th row of the split: ``tedbench_<row:03d>``."""
    return f"tedbench_{row:03d}"


def find_files(root: Path, data_files: str | None = None) -> list[Path]:
    """The parquet files of the copy (``root``: a folder or one ``.parquet`` file), sorted; each
    inside ``root``. FileNotFoundError says what was looked for."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() != ".parquet":
        raise FileNotFoundError(f"TEdBench file {root} is not a .parquet file")
    if not root.exists():
        raise FileNotFoundError(f"TEdBench not found: {root} (expected the downloaded dataset folder with "
                                f"data/{SPLIT}-*.parquet, or one .parquet file)")
    return split_files(root, SPLIT, data_files)


def read_rows(root: Path, columns: tuple[str, ...], data_files: str | None = None) -> list[dict[str, Any]]:
    """The rows of the copy as dicts holding ``columns`` (image cells as ``{"bytes", "path"}``), in
    file order. DatasetError for a file that is not parquet or lacks one of ``columns``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in find_files(root, data_files):
        shown = path.name if Path(root).is_file() else path.relative_to(root).as_posix()
        try:
            names = pq.read_schema(path).names
            missing = [c for c in columns if c not in names]
            if missing:
                raise DatasetError(f"{shown}: no column(s) {', '.join(missing)} (the file has {', '.join(names)}); "
                                   "set dataset.image_column / dataset.text_column (method.result_column for "
                                   "tedbench_results) to this copy's names")
            table = pq.read_table(path, columns=list(columns))
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{shown}: not readable as parquet: {e}") from None
        rows.extend(table.to_pylist())
    return rows


@DATASET_FORMATS.register("tedbench")
class TEdBenchDataset(ParquetRows, DatasetLoader):
    """Loader for a local copy of TEdBench; see the module doc."""

    has_categories = False  # TEdBench labels no edit type: an uncategorised sample is no warning

    def __init__(
        self,
        root: str | Path,
        name: str | None = None,
        data_files: str | None = None,
        image_column: str = IMAGE_COLUMN,
        text_column: str = TEXT_COLUMN,
        source_caption_rule: str = "none",
        version: str | int | None = None,
        limit: int | None = None,
        shard: str | None = None,
        ids: list[str] | None = None,
        max_pixels: int | None = None,
        **card_extra: Any,
    ):
        self.name = str(name or "tedbench")
        owner = f"dataset '{self.name}'"
        for key, value in (("image_column", image_column), ("text_column", text_column)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{owner}: {key} must be a column name, got {value!r}")
        if source_caption_rule not in SOURCE_CAPTION_RULES:
            raise ValueError(f"{owner}: source_caption_rule must be one of {', '.join(SOURCE_CAPTION_RULES)}, "
                             f"got {source_caption_rule!r}")
        self.image_column, self.text_column = image_column, text_column
        self.source_caption_rule = source_caption_rule
        self.data_files = data_files
        self.max_pixels = check_max_pixels(max_pixels, owner)
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"{owner}: TEdBench not found: {self.root} (expected the downloaded dataset "
                                    f"folder with data/{SPLIT}-*.parquet, or one .parquet file)")
        self.files = find_files(self.root, data_files)
        self._real_root = (self.root if self.root.is_dir() else self.root.parent).resolve()
        self.version = str(version if version is not None else "1")
        self.limit, self.shard, self.ids = subset_params(self.name, limit, shard, ids)
        self._rows: dict[str, dict[str, Any]] | None = None

    def _read(self) -> list[SampleRef]:
        rows = read_rows(self.root, (self.image_column, self.text_column), self.data_files)
        self._rows = {}
        refs: list[SampleRef] = []
        for i, row in enumerate(rows):
            sid = sample_id(i)
            self._rows[sid] = row
            text = row.get(self.text_column)
            problem = None
            if text is None:
                problem = SampleError(sid, self.text_column, "missing (null)")
            elif not isinstance(text, str):
                problem = SampleError(sid, self.text_column, f"must be text, got {type(text).__name__} {text!r}")
            elif not text.strip():
                problem = SampleError(sid, self.text_column, "empty text")
            cell = row.get(self.image_column)
            data = cell.get("bytes") if isinstance(cell, Mapping) else cell
            digest = hashlib.sha256(data if isinstance(data, (bytes, bytearray))
                                    else json.dumps(cell, default=str).encode()).hexdigest()
            # the image bytes are in the fingerprint: a replaced image gives another cache key
            record = {"row": i, "target_text": text if isinstance(text, str) else None, "image_sha256": digest,
                      "source_caption_rule": self.source_caption_rule}
            refs.append(SampleRef(sid, record, _fingerprint(record), None, problem))
        return refs

    def load(self, ref: SampleRef, decode: Mapping[str, Any] | None = None) -> Sample:
        """Decode one row; raises SampleError naming the sample and the column at fault."""
        opts = decode_options(decode)
        row = self.row(ref, "the copy")
        notes: list[str] = []
        differs: dict[str, list[str]] = {}
        data, shown = image_struct_bytes(row.get(self.image_column), self.root, ref.id, self.image_column,
                                         self._real_root)
        source = decode_image(data, ref.id, self.image_column, shown, notes, max_pixels=self.max_pixels,
                              differs=differs, **opts)
        meta: dict[str, Any] = {"row": ref.record["row"], "source_caption_rule": self.source_caption_rule}
        if notes:
            meta["input_notes"] = notes
        if differs:
            meta[DECODE_DIFFERS] = differs
        return Sample(
            id=ref.id,
            dataset=self.name,
            source=source,
            source_caption="" if self.source_caption_rule == "empty" else None,
            target_caption=ref.record["target_text"],
            meta=meta,
        )
