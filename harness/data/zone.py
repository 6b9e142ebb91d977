"""ZONE's test set (Li et al., "ZONE: Zero-Shot Instruction-Guided Local Editing", CVPR 2024),
format ``zone``, and :func:`convert_zone`, its conversion into that format.

The set (paper sec. 5.1 and appendix C.2): 100 images (60 from the Internet, 40 generated with
Stable Diffusion 1.5), centre-cropped to 512 x 512 (the official ``data/preprocess_512.py``), each
annotated with an action (``add``: 32, ``change``: 54, ``remove``: 14), an input caption (BLIP), an
output caption, an instruction, a source object and a target object (``N/A`` where there is none:
an added object has no source object, a removed one no target). No mask, no ground-truth edit.
It is published only as a Google Drive file linked from the official README (lsl001006/ZONE,
section "Dataset"); the official code reads no dataset layout (``inference.py`` takes one
``--image_path`` and one ``--instruction``), so there is no official layout to mirror: the
download is converted once into a folder of the generic format (:mod:`harness.data.generic`),
which this format reads.

Converted folder (written by :func:`convert_zone`, ``python -m harness.data.zone``)::

    root/
      card.yaml          # name: zone, format: zone, extra_categories: [change], provenance
      manifest.jsonl     # one line per image, below
      images/<file>      # the download's image files, bytes unchanged

Manifest entry: ``id`` (the image's file stem), ``source`` (``images/<file>``), ``instruction``,
``source_caption`` (the input caption), ``target_caption`` (the output caption: CLIP-T's text under
``metrics=zone``), ``category`` (the action: ``add``, ``change`` or ``remove``) and ``meta`` with
``source_object`` and ``target_object`` (text, or null for ``N/A``; Text2LIVE edits toward the
target object) and ``zone_image`` (the file name in the download).

Categories: ``add`` and ``remove`` are harness categories (:data:`harness.types.CATEGORIES`);
ZONE's ``change`` covers both a new texture or colour of an object and its replacement by another
object, so it maps to none of the harness's ``change_*`` categories and is declared as an extra
category (``extra_categories: [change]``, which this format always adds). Methods that act on the
action (ZONE itself) read ``category``: ``change`` here, ``change_*`` on the embedded sample set.

The ``zone`` format is the generic loader with the set's own rules checked per sample before any
file is opened: the action is one of the three, the instruction and both captions are non-empty
text, ``meta`` names both objects (text or null), and no other field (mask, target, points) is
given; each failure names the sample and the field. Paths, ``max_pixels`` and the rest are the
generic loader's (relative, inside the folder, refused unread when too large).

Reading the download (:func:`read_annotations`): the Drive file could not be inspected from the
machine this was written on (no network), so the converter reads the annotation keys the paper
prints (appendix C.2, Table 4: ``action``, ``input caption``, ``output caption``, ``instruction``,
``source object``, ``target object``) plus the image's file name, from a JSON file (a list of
records, or an object keyed by image file name), a JSON-lines file or a CSV / TSV table. Keys are
matched ignoring case, spaces, ``_`` and ``-``, with the aliases in :data:`FIELD_ALIASES`; an
annotation file that names them otherwise is read with ``columns={"input_caption": "its key",
...}`` (``--column input_caption="its key"``). ``N/A``, ``none``, ``-`` and empty cells are null.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..registry import DATASET_FORMATS
from ..types import SampleError
from .generic import ID_RE, GenericDataset, inside

if __name__ == "__main__":
    # `python -m harness.data.zone`: importing the package harness.data has already imported (and
    # registered) this module as harness.data.zone; running the rest of this copy would register
    # the format a second time. Run the imported module's command instead.
    from harness.data.zone import main as _main

    sys.exit(_main())

#: ZONE's three actions (paper sec. 4), the categories of this format.
ACTIONS = ("add", "change", "remove")
#: The action that is not a harness category: declared with ``extra_categories``.
EXTRA_CATEGORIES = ("change",)
#: The official action classifier's label order (msk_from_attn.py; paper appendix, Table 3):
#: an annotation file that stores the action as a number is read with it.
ACTION_LABELS = {"0": "change", "1": "add", "2": "remove"}
#: Manifest keys an entry of this format may have (no mask, target or points: the set has none).
ZONE_KEYS = ("id", "source", "instruction", "source_caption", "target_caption", "category", "meta")
#: Text fields every entry needs.
REQUIRED_TEXT = ("instruction", "source_caption", "target_caption")
#: ``meta`` keys every entry has (text, or null for the paper's "N/A").
OBJECT_KEYS = ("source_object", "target_object")

#: Annotation fields the converter reads -> the keys it accepts for each, after normalisation
#: (lower case; runs of spaces, ``_`` and ``-`` as one ``_``). The first of each is the paper's
#: Table 4 key; ``image`` is the image's file name (relative to the images folder).
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_name", "image_path", "img", "img_name", "file", "file_name", "filename", "name",
              "path", "source", "input_image"),
    "action": ("action", "category", "edit_action", "edit_type", "type", "label"),
    "input_caption": ("input_caption", "source_caption", "caption", "blip_caption", "input_prompt"),
    "output_caption": ("output_caption", "target_caption", "output_prompt", "edited_caption"),
    "instruction": ("instruction", "edit_instruction", "prompt"),
    "source_object": ("source_object", "src_object", "source_obj"),
    "target_object": ("target_object", "tgt_object", "target_obj"),
}
REQUIRED_FIELDS = ("image", "action", "input_caption", "output_caption", "instruction")
#: Cells that mean "no such object" (the paper prints N/A).
NULL_TEXTS = {"", "n/a", "na", "none", "null", "-", "nan"}

ANNOTATION_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")


def _norm_key(key: Any) -> str:
    return re.sub(r"[\s_\-]+", "_", str(key).strip().lower())


# ----------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------
@DATASET_FORMATS.register("zone")
class ZoneDataset(GenericDataset):
    """Loader for ZONE's test set once converted (:func:`convert_zone`); see the module doc."""

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
        # the generic loader's parameters, named (the CLI lists a format's keys from its signature)
        root = Path(root)
        if not root.is_dir():  # the generic message, with what the folder should hold
            raise FileNotFoundError(f"dataset folder not found: {root} (expected ZONE's test set converted by "
                                    "`python -m harness.data.zone`: card.yaml, manifest.jsonl, images/)")
        card = self.read_card(root)
        declared = extra_categories if extra_categories is not None else card.get("extra_categories")
        if declared is not None and (not isinstance(declared, (list, tuple))
                                     or not all(isinstance(c, str) for c in declared)):
            raise ValueError(f"dataset '{name or card.get('name') or 'zone'}': extra_categories must be a list "
                             f"of names, got {declared!r}")
        # "change" is always known here, whatever the card says (it is this format's own action)
        extra = [*EXTRA_CATEGORIES, *(c for c in (declared or ()) if c not in EXTRA_CATEGORIES)]
        super().__init__(root, name=name or card.get("name") or "zone", manifest=manifest, version=version,
                         limit=limit, shard=shard, ids=ids, mask_rule=mask_rule, mask_threshold=mask_threshold,
                         max_pixels=max_pixels, extra_categories=extra, **card_extra)

    def _problem(self, sid: str, record: dict[str, Any]) -> SampleError | None:
        """The generic checks, then the set's own (before any file is opened)."""
        problem = super()._problem(sid, record)
        if problem is not None:
            return problem
        return zone_entry_problem(sid, record)


def zone_entry_problem(sid: str, record: Mapping[str, Any]) -> SampleError | None:
    """The first way a manifest entry breaks the ``zone`` format's rules, or None."""
    extra = sorted(set(record) - set(ZONE_KEYS))
    if extra:
        return SampleError(sid, extra[0], f"ZONE's test set has no {', '.join(extra)} (keys of this format: "
                                          f"{', '.join(ZONE_KEYS)}; use format generic for a set that has them)")
    category = record.get("category")
    if category not in ACTIONS:
        got = "missing" if category is None else f"{category!r}"
        return SampleError(sid, "category", f"{got}; a ZONE action is one of {', '.join(ACTIONS)}")
    for key in REQUIRED_TEXT:
        v = record.get(key)
        if not isinstance(v, str) or not v.strip():
            return SampleError(sid, key, f"missing or not a non-empty string: {v!r}")
    meta = record.get("meta")
    if not isinstance(meta, dict):
        return SampleError(sid, "meta", f"must be an object with {' and '.join(OBJECT_KEYS)}, got {meta!r}")
    for key in OBJECT_KEYS:
        if key not in meta:
            return SampleError(sid, f"meta.{key}", "missing (text, or null where the paper prints N/A)")
        v = meta[key]
        if v is not None and (not isinstance(v, str) or not v.strip()):
            return SampleError(sid, f"meta.{key}", f"must be non-empty text or null, got {v!r}")
    return None


# ----------------------------------------------------------------------------------------------
# the conversion
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Conversion:
    """What :func:`convert_zone` wrote: the manifest entries, and the annotations it refused."""

    out: Path
    records: list[dict[str, Any]]
    problems: list[SampleError]

    def counts(self) -> dict[str, int]:
        """Entries per action."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r["category"]] = out.get(r["category"], 0) + 1
        return dict(sorted(out.items()))


def read_annotations(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The annotation file's records as ``(where, record)``, ``where`` naming the record for
    error messages (``row 3``, ``'21.png'``). JSON: a list of objects, an object keyed by image
    file name (the name becomes the ``image`` key unless the record has one), or an object with one
    list of records under any key; JSON lines; CSV / TSV (every cell read as text, with pandas).
    Raises :class:`harness.types.DatasetError` when the file as a whole cannot be read."""
    import pandas as pd

    from ..types import DatasetError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ZONE annotation file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in ANNOTATION_SUFFIXES:
        raise DatasetError(f"{path.name}: unsupported annotation file type {suffix or '(none)'}; "
                           f"read: {', '.join(ANNOTATION_SUFFIXES)}")
    try:
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                                encoding="utf-8")
            return [(f"row {i + 2}", dict(r)) for i, r in enumerate(frame.to_dict("records"))]  # row 1: header
        text = path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            out = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    out.append((f"line {lineno}", json.loads(line)))
            return out
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, pd.errors.ParserError) as e:
        raise DatasetError(f"{path.name}: not readable as {suffix[1:].upper()} (UTF-8): {e}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and len(lists) == 1:
            data = lists[0]  # {"data": [...]}
        else:
            return [(repr(k), {"image": k, **v} if isinstance(v, dict) and not _has_field(v, "image") else v)
                    for k, v in data.items()]
    if not isinstance(data, list):
        raise DatasetError(f"{path.name}: expected a list of annotation records or an object keyed by image file "
                           f"name, got {type(data).__name__}")
    return [(f"record {i}", r) for i, r in enumerate(data)]


def _has_field(record: Mapping[str, Any], field: str) -> bool:
    keys = {_norm_key(k) for k in record}
    return any(a in keys for a in FIELD_ALIASES[field])


def _pick(record: Mapping[str, Any], field: str, columns: Mapping[str, str]) -> tuple[str | None, Any]:
    """(the record's key for ``field``, its value), or (None, None) when the record has none."""
    if field in columns:
        key = columns[field]
        return (key, record[key]) if key in record else (None, None)
    by_norm = {_norm_key(k): k for k in record}
    for alias in FIELD_ALIASES[field]:
        if alias in by_norm:
            return by_norm[alias], record[by_norm[alias]]
    return None, None


def _text(v: Any) -> str | None:
    """A cell as stripped text; None for the paper's N/A and empty cells."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise TypeError(f"expected text, got {type(v).__name__} {v!r}")
    s = str(v).strip()
    return None if s.lower() in NULL_TEXTS else s


def _sample_id(image: str) -> str:
    """The harness id of an image: its file stem, characters outside ``[A-Za-z0-9_.-]`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(image.replace("\\", "/")).stem) or "_"


def convert_record(where: str, record: Any, columns: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One annotation record as a manifest entry of the ``zone`` format (``source`` still the
    download's image name; :func:`convert_zone` places the file). Raises SampleError naming the
    record (``where``, or its image's id once known) and the annotation field at fault."""
    columns = dict(columns or {})
    if not isinstance(record, dict):
        raise SampleError(where, "record", f"not an object: {record!r}")
    values: dict[str, Any] = {}
    for field in FIELD_ALIASES:
        key, raw = _pick(record, field, columns)
        try:
            values[field] = _text(raw)
        except TypeError as e:
            raise SampleError(where, key or field, str(e)) from None
    image = values["image"]
    if image is None:
        keys = ", ".join(map(str, record)) or "none"
        raise SampleError(where, "image", f"no image file name (accepted keys: {', '.join(FIELD_ALIASES['image'])}; "
                                          f"the record has: {keys}; name it with --column image=KEY)")
    sid = _sample_id(image)
    if not ID_RE.match(sid):
        raise SampleError(where, "image", f"cannot make a sample id from {image!r}")
    for field in REQUIRED_FIELDS[1:]:
        if values[field] is None:
            key, _ = _pick(record, field, columns)
            raise SampleError(sid, key or field, f"missing or empty (accepted keys: {', '.join(FIELD_ALIASES[field])}"
                                                 f"; name it with --column {field}=KEY)")
    action = values["action"].lower()
    action = ACTION_LABELS.get(action, action)
    if action not in ACTIONS:
        key, _ = _pick(record, "action", columns)
        raise SampleError(sid, key or "action", f"unknown action {values['action']!r}; ZONE's actions: "
                                                f"{', '.join(ACTIONS)} (or the classifier's labels 0, 1, 2)")
    return {
        "id": sid,
        "source": image,
        "instruction": values["instruction"],
        "source_caption": values["input_caption"],
        "target_caption": values["output_caption"],
        "category": action,
        "meta": {"source_object": values["source_object"], "target_object": values["target_object"],
                 "zone_image": image},
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_zone(annotations: str | Path, images: str | Path, out: str | Path,
                 columns: Mapping[str, str] | None = None, name: str = "zone") -> Conversion:
    """Convert ZONE's downloaded test set into a ``zone`` folder at ``out`` (see the module doc).

    ``annotations``: the annotation file (:func:`read_annotations`); ``images``: the folder its
    image names are relative to; ``columns``: ``{field: the file's key}`` for keys the aliases do
    not cover (fields: :data:`FIELD_ALIASES`). Each image is copied, bytes unchanged, to
    ``out/images/`` (kept where it is when it already lies inside ``out``); ``out/manifest.jsonl``
    and ``out/card.yaml`` are written. An image name that is absolute, has a ``..`` component or
    resolves outside ``images`` is refused unopened. A record that cannot be converted (a missing
    field, an unknown action, a duplicate id, a missing image) is left out and returned in
    ``problems``, naming the record and the field; the others are written. Nothing is written when
    no record converts."""
    from ..fileio import save_bytes

    annotations, images, out = Path(annotations), Path(images), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"ZONE images folder not found: {images}")
    unknown = sorted(set(columns or {}) - set(FIELD_ALIASES))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} in columns; fields: {', '.join(FIELD_ALIASES)}")
    entries = read_annotations(annotations)
    real_images, real_out = images.resolve(), out.resolve()
    records: list[dict[str, Any]] = []
    problems: list[SampleError] = []
    seen: dict[str, str] = {}
    copies: list[tuple[Path, Path]] = []
    for where, raw in entries:
        try:
            rec = convert_record(where, raw, columns)
            sid, image = rec["id"], rec["source"]
            if sid in seen:
                raise SampleError(sid, "image", f"{image!r} gives the same id as {seen[sid]!r} ({where})")
            src = inside(images, images, image, sid, "image", real_images)  # nothing opened yet
            if not src.is_file():
                raise SampleError(sid, "image", f"file not found in the images folder: {image}")
        except SampleError as e:
            problems.append(e)
            continue
        seen[sid] = image
        real_src = src.resolve()
        if real_src.is_relative_to(real_out):
            rec["source"] = real_src.relative_to(real_out).as_posix()  # already inside: referenced in place
        else:
            rec["source"] = f"images/{Path(image.replace(chr(92), '/')).as_posix()}"
            copies.append((src, out / rec["source"]))
        records.append(rec)
    if not records:
        raise ValueError(f"no annotation of {annotations.name} could be converted; first problem: "
                         + (str(problems[0]) if problems else "the file holds no records"))
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    conv = Conversion(out, records, problems)
    card = {
        "name": name,
        "format": "zone",
        "manifest": "manifest.jsonl",
        "version": 1,
        "extra_categories": list(EXTRA_CATEGORIES),
        "description": "ZONE's test set (Li et al., CVPR 2024, appendix C.2), converted by harness.data.zone",
        "source": "https://github.com/lsl001006/ZONE (README, section Dataset: Google Drive file "
                  "1lAwpENoDcO1QyFuwz3iKJJ7DmDTFMvIU)",
        "converted_from": {"annotations": annotations.name, "sha256": _sha256(annotations),
                           "records": len(entries), "converted": len(records), "refused": len(problems)},
        "categories": conv.counts(),
    }
    manifest = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    save_bytes(out / "manifest.jsonl", manifest.encode("utf-8"))
    save_bytes(out / "card.yaml", yaml.safe_dump(card, sort_keys=False, allow_unicode=True).encode("utf-8"))
    return conv


def _column(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=KEY, got {text!r}")
    field, key = text.split("=", 1)
    return field.strip(), key


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.data.zone ANNOTATIONS --images DIR --out DIR [--column FIELD=KEY ...]``:
    exit 0 when every record converted, 1 when some were refused (each printed, naming the record
    and the field; the others are written), 2 when nothing could be converted."""
    ap = argparse.ArgumentParser(prog="python -m harness.data.zone",
                                 description="Convert ZONE's downloaded test set into the harness's 'zone' format.")
    ap.add_argument("annotations", help="the annotation file (.json, .jsonl, .csv, .tsv)")
    ap.add_argument("--images", required=True, help="folder the annotation's image names are relative to")
    ap.add_argument("--out", required=True, help="the dataset folder to write (dataset.root)")
    ap.add_argument("--column", action="append", type=_column, default=[], metavar="FIELD=KEY",
                    help=f"the annotation key of a field the aliases miss; fields: {', '.join(FIELD_ALIASES)}")
    ap.add_argument("--name", default="zone", help="the dataset's name in tables (default: zone)")
    a = ap.parse_args(argv)
    try:
        conv = convert_zone(a.annotations, a.images, a.out, dict(a.column), a.name)
    except (FileNotFoundError, ValueError) as e:
        print(f"zone conversion: {e}", file=sys.stderr)
        return 2
    for p in conv.problems:
        print(f"REFUSED {p}", file=sys.stderr)
    counts = ", ".join(f"{k}={v}" for k, v in conv.counts().items())
    print(f"wrote {len(conv.records)} sample(s) ({counts}) to {conv.out}; {len(conv.problems)} refused")
    return 1 if conv.problems else 0
