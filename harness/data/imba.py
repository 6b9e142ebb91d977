"""IMBA-format datasets (CPAM's "Image Manipulation BenchmArk", Vo et al. sec. 5.2), format ``imba``.

IMBA itself (104 samples built on TEdBench: images, alteration masks, object prompts, edit type
and preference labels) is not public. This format is for users who hold it or build their own
set the same way, e.g. by drawing masks for TEdBench's images (:mod:`harness.data.tedbench`).

Layout: the generic format (:mod:`harness.data.generic`: ``manifest.jsonl`` + image and mask
files, optional ``card.yaml``), with these entries required per sample::

    {"id": "dog_sit", "source": "images/dog.png", "mask": "masks/dog_sit.png",
     "target_caption": "a photo of a sitting dog", "category": "pose_view",
     "meta": {"object_prompt": "dog", "retain_object": true}}

- ``category``: the edit type, one of IMBA's five (CPAM sec. 4.4), translated to the harness's
  category so that methods declaring categories and per-category tables read it as any other
  set: ``replace`` -> ``change_object``, ``pose_view`` -> ``change_pose``, ``background`` ->
  ``change_background``, ``remove`` -> ``remove``, ``add`` -> ``add``. The harness names are
  accepted as well. ``meta.edit_type`` holds IMBA's name of the type (whichever was written),
  which ``method=cpam`` reads to pick its mask strategy.
- ``mask``: the source mask M_s, True where the image should change, as every harness mask:
  the object to replace, re-pose or remove; the region where the item is added; for
  ``background``, the background itself (CPAM: "when M_s is the mask of the background"). Read
  with the dataset's mask rule (default ``threshold`` at 127: hand-drawn and SAM masks are often
  anti-aliased; each conversion is noted on the sample). An empty mask fails the sample.
- ``target_caption``: the target prompt P_t.
- ``meta.object_prompt``: the object's name (the words that select M_t's cross-attention maps).
- ``meta.retain_object`` (optional bool): IMBA's "object retention" preference label.
- ``source_caption`` and ``instruction`` are optional, as in the generic format.

Anything else is the generic format's: paths relative and inside the folder, ``validate``
warnings and errors, subsets (``limit``, ``shard``, ``ids``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from ..registry import DATASET_FORMATS
from ..types import Sample, SampleError
from .generic import GenericDataset, SampleRef

#: IMBA's edit types (CPAM sec. 4.4) -> harness categories (harness.types.CATEGORIES).
EDIT_TYPES = {
    "replace": "change_object",
    "pose_view": "change_pose",
    "background": "change_background",
    "remove": "remove",
    "add": "add",
}
#: The harness categories an IMBA sample may carry.
IMBA_CATEGORIES = tuple(EDIT_TYPES.values())
#: Harness category -> IMBA edit type (meta.edit_type holds IMBA's name, whichever was written).
CATEGORY_EDIT_TYPES = {v: k for k, v in EDIT_TYPES.items()}


@DATASET_FORMATS.register("imba")
class IMBADataset(GenericDataset):
    """Loader for an IMBA-format folder; see the module doc."""

    def __init__(self, root: str | Path, name: str | None = None, mask_rule: str | None = None, **kw: Any):
        # a mask rule from the card wins over this format's default, as in the generic format
        card_rule = self.read_card(Path(root)).get("mask_rule") if Path(root).is_dir() else None
        super().__init__(root, name=name, mask_rule=mask_rule or card_rule or "threshold", **kw)

    def _parse_line(self, line: str, lineno: int, seen: set[str]) -> SampleRef:
        # the ref's category is the harness name of the edit type (problems come from _problem)
        ref = super()._parse_line(line, lineno, seen)
        written = ref.record.get("category") if isinstance(ref.record, dict) else None
        return dataclasses.replace(ref, category=EDIT_TYPES.get(written, written) if isinstance(written, str) else None)

    def _problem(self, sid: str, record: dict[str, Any]) -> SampleError | None:
        """The edit type first (an unknown one is named with IMBA's names, not the harness's whole
        list), then the generic checks (keys, paths), then IMBA's required fields."""
        written = record.get("category")
        category = EDIT_TYPES.get(written, written) if isinstance(written, str) else None
        if category not in IMBA_CATEGORIES:
            return SampleError(sid, "category", f"{'missing' if written is None else repr(written)}: an IMBA sample's "
                                                f"edit type is one of {', '.join(EDIT_TYPES)} (or the harness names "
                                                f"{', '.join(IMBA_CATEGORIES)})")
        return super()._problem(sid, {**record, "category": category}) or self._imba_problem(sid, record)

    @staticmethod
    def _imba_problem(sid: str, rec: dict[str, Any]) -> SampleError | None:
        """What the IMBA layout adds to the generic one (checked without reading a file)."""
        if not isinstance(rec.get("mask"), str) or not rec["mask"]:
            return SampleError(sid, "mask", "missing: an IMBA sample needs its source mask")
        text = rec.get("target_caption")
        if not isinstance(text, str) or not text.strip():
            return SampleError(sid, "target_caption", "missing or empty: an IMBA sample needs its target prompt")
        meta = rec.get("meta")
        if not isinstance(meta, dict):
            return SampleError(sid, "meta", "missing: an IMBA sample needs meta.object_prompt")
        obj = meta.get("object_prompt")
        if not isinstance(obj, str) or not obj.strip():
            return SampleError(sid, "meta.object_prompt", "missing or empty: the name of the object to edit")
        retain = meta.get("retain_object")
        if retain is not None and not isinstance(retain, bool):
            return SampleError(sid, "meta.retain_object", f"must be true or false, got {retain!r}")
        return None

    def load(self, ref: SampleRef, decode: Mapping[str, Any] | None = None) -> Sample:
        """Decode one sample as the generic format does, with the harness category and IMBA's
        ``meta.edit_type``; an empty mask fails the sample."""
        sample = super().load(ref, decode)
        if sample.mask is not None and not sample.mask.any():
            raise SampleError(sample.id, "mask", f"{ref.record['mask']} is empty (no pixel marks the region to edit)")
        meta = {**sample.meta, "edit_type": CATEGORY_EDIT_TYPES[ref.category]}
        return dataclasses.replace(sample, category=ref.category, meta=meta)
