"""PIE-Bench (Ju et al., "PnP Inversion" / "Direct Inversion", ICLR 2024), format ``pie_bench``.

Layout, as the official repository (cure-lab/PnPInversion, README "Benchmark Download") describes
it; ``root`` is the unpacked ``data`` folder::

    root/
      mapping_file.json            # {image id: annotation}, 700 entries
      annotation_images/
        0_random_140/000000000000.jpg
        1_change_object_80/1_artificial/1_animal/111000000000.jpg
        ...

Each annotation has ``image_path`` (relative to ``annotation_images/``), ``original_prompt``,
``editing_prompt``, ``editing_instruction``, ``editing_type_id`` (a string "0".."9"),
``blended_word`` (source and target word separated by a space, or "") and ``mask`` (a
run-length encoding, see :func:`decode_rle_mask`).

Protocol facts reproduced here, all from ``evaluation/evaluate.py`` (the same code is in
``run_editing_p2p.py``):

* ``mask_decode``: the RLE is a flat list ``[start, length, start, length, ...]`` over the
  row-major flattened 512x512 image; starts are 0-based; a run is clipped at the end of the image
  (``min(length, H*W - start)``); after decoding, the first and last row and column are set to 1
  "to avoid annotation errors in boundary". 1 = the part to be edited, so ``Sample.mask`` (True =
  should change) is the decoded mask and the evaluation's unedited region ``1 - mask`` never
  contains the border.
* Prompts: the evaluation removes the square brackets that mark the edited words,
  ``prompt.replace("[", "").replace("]", "")``, and nothing else (no whitespace clean-up):
  :func:`clean_prompt`. ``source_caption`` / ``target_caption`` are the cleaned
  ``original_prompt`` / ``editing_prompt``; the raw bracketed prompts stay in ``meta`` for methods
  (Prompt-to-Prompt and kin) that use the marked words.
* The source image is read as is (the evaluation opens it with PIL and never resizes); the masks
  are defined on 512x512, so an image of any other size is an error.
* ``editing_type_id`` selects categories in the evaluation (``--edit_category_list``); the names
  come from the README's table. The harness category for each id is in :data:`EDITING_TYPES`
  and the official id and name are kept in ``meta`` (``editing_type_id``, ``editing_type``).

PIE-Bench has no ground-truth edited image: ``Sample.target`` is None.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..images import DECODE_DIFFERS, check_max_pixels, decode_options, load_image
from ..registry import DATASET_FORMATS
from ..types import Sample, SampleError
from .generic import ID_RE, DatasetLoader, SampleRef, _fingerprint, inside, select_refs, subset_params

#: The benchmark's mask resolution: every RLE is over a flattened 512x512 image.
PIE_SHAPE = (512, 512)

#: editing_type_id -> (harness category, official editing type). Names and order follow the README
#: table of cure-lab/PnPInversion (folders 0_random_140 ... 9_change_style_80; 700 images).
EDITING_TYPES: dict[str, tuple[str, str]] = {
    "0": ("random", "random editing"),
    "1": ("change_object", "change object"),
    "2": ("add", "add object"),
    "3": ("remove", "delete object"),
    "4": ("change_content", "change attribute content"),
    "5": ("change_pose", "change attribute pose"),
    "6": ("change_color", "change attribute color"),
    "7": ("change_material", "change attribute material"),
    "8": ("change_background", "change background"),
    "9": ("change_style", "change style"),
}

REQUIRED_TEXT = ("image_path", "original_prompt", "editing_prompt")
OPTIONAL_TEXT = ("editing_instruction", "blended_word")


def clean_prompt(prompt: str) -> str:
    """The official prompt cleaning: drop every '[' and ']' (the marks around edited words)."""
    return prompt.replace("[", "").replace("]", "")


def rle_problem(rle: Any, shape: tuple[int, int] = PIE_SHAPE) -> str | None:
    """Why ``rle`` is not a usable PIE-Bench RLE for an image of ``shape``, or None if it is."""
    if not isinstance(rle, (list, tuple, np.ndarray)):
        return f"must be a list of [start, length, ...] integers, got {type(rle).__name__}"
    if isinstance(rle, np.ndarray):
        values = rle
    else:
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in rle):
            bad = next(v for v in rle if isinstance(v, bool) or not isinstance(v, (int, np.integer)))
            return f"run-length values must be integers, found {bad!r}"
        try:
            values = np.asarray(rle, dtype=np.int64)
        except OverflowError:
            return "run-length value too large"
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        return "must be a flat list of integers"
    if len(values) % 2:
        return f"has odd length {len(values)}: expected [start, length] pairs"
    n = shape[0] * shape[1]
    starts, lengths = values[0::2], values[1::2]
    if starts.size and starts.min() < 0:
        i = int(np.argmax(starts < 0))
        return f"run {i} starts at {int(starts[i])} (negative)"
    if starts.size and starts.max() >= n:
        i = int(np.argmax(starts >= n))
        return f"run {i} starts at {int(starts[i])}, outside the {shape[0]}x{shape[1]} image ({n} pixels)"
    if lengths.size and lengths.min() < 0:
        i = int(np.argmax(lengths < 0))
        return f"run {i} has negative length {int(lengths[i])}"
    return None


def decode_rle_mask(rle: Sequence[int], shape: tuple[int, int] = PIE_SHAPE, border: bool = True) -> np.ndarray:
    """Decode a PIE-Bench mask: bool HxW, True = edited.

    ``rle`` is ``[start, length, start, length, ...]`` over the row-major flattened image, starts
    0-based; a run reaching past the last pixel is clipped there, as the official ``mask_decode``
    does. With ``border`` (the official rule) the first and last row and column are set to True.
    Raises ValueError on a malformed encoding (odd length, non-integers, negative or out-of-range
    starts, negative lengths).

    Hand-written because no library reads this format: it is PIE-Bench's own (it is neither COCO's
    column-major alternating-counts RLE that pycocotools reads, nor any image format).
    """
    h, w = int(shape[0]), int(shape[1])
    problem = rle_problem(rle, (h, w))
    if problem:
        raise ValueError(f"RLE mask {problem}")
    n = h * w
    values = np.asarray(rle, dtype=np.int64)
    starts, lengths = values[0::2], values[1::2]
    ends = starts + np.minimum(lengths, n - starts)  # the official clip: min(length, n - start)
    # Mark run boundaries and integrate: a pixel is set when it lies inside at least one run.
    delta = np.zeros(n + 1, dtype=np.int64)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    mask = (np.cumsum(delta[:-1]) > 0).reshape(h, w)
    if border:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


@DATASET_FORMATS.register("pie_bench")
class PieBenchDataset(DatasetLoader):
    """Loader for PIE-Bench's ``mapping_file.json`` + ``annotation_images/``.

    ``editing_types`` keeps only the given ``editing_type_id`` values (like the evaluation's
    ``--edit_category_list``); ``ids``, ``limit`` and ``shard`` ("i/n", by id hash) then apply in that order,
    as in the generic format. Samples come in the mapping file's order.
    """

    def __init__(
        self,
        root: str | Path,
        name: str | None = None,
        mapping_file: str = "mapping_file.json",
        images_dir: str = "annotation_images",
        version: str | int | None = None,
        limit: int | None = None,
        shard: str | None = None,
        ids: list[str] | None = None,
        editing_types: list[str | int] | None = None,
        max_pixels: int | None = None,
        **card_extra: Any,
    ):
        self.name = str(name or "pie_bench")
        self.root = self.require_dir(Path(root), f"PIE-Bench's data folder with {mapping_file} and {images_dir}/")
        self.mapping_path = self.require_file(self.root / mapping_file, "mapping file")
        self.images_dir = images_dir
        self.images_root = self.root / images_dir
        self._real_root = self.root.resolve()
        self._real_dirs: dict[str, str] = {}  # folders resolved while reading the manifest (inside())
        self.max_pixels = check_max_pixels(max_pixels, f"dataset '{self.name}'")
        self.version = str(version if version is not None else "1")
        self.limit, self.shard, self.ids = subset_params(self.name, limit, shard, ids)
        self.editing_types = None
        if editing_types:
            wanted = {str(t) for t in editing_types}
            unknown = sorted(wanted - set(EDITING_TYPES))
            if unknown:
                raise ValueError(
                    f"dataset '{self.name}': unknown editing type id(s) {unknown}; known: {', '.join(EDITING_TYPES)}"
                )
            self.editing_types = wanted
        self._mapping: dict[str, Any] | None = None

    # -- annotations ----------------------------------------------------------------------
    def _read_mapping(self) -> dict[str, Any]:
        if self._mapping is None:
            try:
                with open(self.mapping_path, encoding="utf-8") as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a whole-file problem: no sample is usable
                raise ValueError(f"dataset '{self.name}': {self.mapping_path.name} is not valid UTF-8 JSON: {e}") from None
            if not isinstance(data, dict):
                raise ValueError(
                    f"dataset '{self.name}': {self.mapping_path} must hold a JSON object keyed by image id, "
                    f"got {type(data).__name__}"
                )
            self._mapping = data
        return self._mapping

    def refs(self) -> list[SampleRef]:
        """All entries after editing-type filter, ids, limit and shard; no image is decoded.

        Bad entries (missing fields, unknown editing type, malformed RLE) come back with ``error``.
        """
        refs = [self._parse(str(key), item) for key, item in self._read_mapping().items()]
        if self.editing_types is not None:
            refs = [r for r in refs if r.record.get("editing_type_id") in self.editing_types]
        return select_refs(refs, self.name, self.ids, self.shard, self.limit)

    def _parse(self, key: str, item: Any) -> SampleRef:
        if not isinstance(item, dict):
            return SampleRef(key, {}, key, error=SampleError(key, "annotation", "entry is not a JSON object"))
        record = dict(item)
        type_id = record.get("editing_type_id")
        if isinstance(type_id, int) and not isinstance(type_id, bool):
            type_id = record["editing_type_id"] = str(type_id)
        fp = _fingerprint(record)
        category = EDITING_TYPES[type_id][0] if isinstance(type_id, str) and type_id in EDITING_TYPES else None
        return SampleRef(key, record, fp, category, self._problem(key, record))

    def _problem(self, key: str, rec: dict[str, Any]) -> SampleError | None:
        if not ID_RE.match(key):
            return SampleError(key, "id", "image id must use letters, digits, _ . - only")
        for field in REQUIRED_TEXT:
            v = rec.get(field)
            if not isinstance(v, str) or not v:
                return SampleError(key, field, f"missing or not a non-empty string: {v!r}")
        for field in OPTIONAL_TEXT:
            v = rec.get(field)
            if v is not None and not isinstance(v, str):
                return SampleError(key, field, f"must be a string, got {type(v).__name__}")
        type_id = rec.get("editing_type_id")
        if type_id not in EDITING_TYPES:
            return SampleError(
                key, "editing_type_id", f"unknown editing type {type_id!r}; known: {', '.join(EDITING_TYPES)}"
            )
        try:  # before anything opens (or hashes) the image
            inside(self.root, self.images_root, rec["image_path"], key, "image_path", self._real_root, self._real_dirs)
        except SampleError as e:
            return e
        if "mask" not in rec:
            return SampleError(key, "mask", "missing (PIE-Bench annotations carry an RLE mask)")
        problem = rle_problem(rec["mask"], PIE_SHAPE)
        if problem:
            return SampleError(key, "mask", f"RLE {problem}")
        return None

    def input_files(self, ref: SampleRef) -> dict[str, Path]:
        # the mask is an RLE inside the annotation, part of the manifest fingerprint
        path = ref.record.get("image_path") if isinstance(ref.record, dict) else None
        if ref.error is not None:  # an unsafe path is never opened, not even to be hashed
            return {}
        return {"source": self.images_root / path} if isinstance(path, str) and path else {}

    # -- decoding -------------------------------------------------------------------------
    def load(self, ref: SampleRef, decode: Mapping[str, Any] | None = None) -> Sample:
        """Decode one sample; raises SampleError naming the sample and the field at fault.

        ``decode``: a protocol's image decoding for scoring (see :meth:`GenericDataset.load`).
        """
        if ref.error is not None:
            raise ref.error
        opts = decode_options(decode)
        rec, sid = ref.record, ref.id
        notes: list[str] = []
        differs: dict[str, list[str]] = {}
        path = inside(self.root, self.images_root, rec["image_path"], sid, "image_path", self._real_root)
        source = load_image(path, sid, "source", notes, differs=differs, shown=f"{self.images_dir}/{rec['image_path']}",
                            max_pixels=self.max_pixels, **opts)
        if source.shape[:2] != PIE_SHAPE:
            raise SampleError(
                sid,
                "source",
                f"image is {source.shape[1]}x{source.shape[0]} (WxH); PIE-Bench images and their RLE masks are 512x512",
            )
        mask = decode_rle_mask(rec["mask"], PIE_SHAPE, border=True)
        type_id = rec["editing_type_id"]
        meta: dict[str, Any] = {
            "editing_type_id": type_id,
            "editing_type": EDITING_TYPES[type_id][1],
            "blended_word": rec.get("blended_word"),
            "image_path": rec["image_path"],
            "original_prompt": rec["original_prompt"],
            "editing_prompt": rec["editing_prompt"],
        }
        if notes:
            meta["input_notes"] = notes
        if differs:
            meta[DECODE_DIFFERS] = differs
        return Sample(
            id=sid,
            dataset=self.name,
            source=source,
            instruction=rec.get("editing_instruction"),
            source_caption=clean_prompt(rec["original_prompt"]),
            target_caption=clean_prompt(rec["editing_prompt"]),
            mask=mask,
            category=EDITING_TYPES[type_id][0],
            meta=meta,
        )
