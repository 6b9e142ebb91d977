"""The MagicBrush test set (Zhang et al., NeurIPS 2023), format ``magicbrush``.

Layout of the unpacked test zip (OSU-NLP-Group/MagicBrush README "Dataset Access"; the file and
key names are those the official ``edit_cli_single_multi_turn.py`` and
``evaluation/image_eval.py`` read); ``root`` is the ``test`` folder::

    root/
      edit_sessions.json           # {img_id: [turn, turn, ...]}, each turn {"input", "mask", "output", "instruction"}
      global_descriptions.json     # {img_id: {"<img_id>-input.png": caption, "<img_id>-output1.png": caption, ...}}
      local_descriptions.json      # {img_id: {"<img_id>-output1.png": caption, ...}}
      images/<img_id>/<img_id>-input.png, <img_id>-output<t>.png, <img_id>-mask<t>.png

A turn's ``input`` is ``<img_id>-input.png`` for turn 1 and the ground-truth output of the turn
before for later turns; ``output`` is that turn's ground truth; ``mask`` marks the region the
annotator edited on the turn's input.

Samples. One sample per turn, id ``<img_id>_<t>`` with ``t`` the 1-based turn (the official
outputs are named ``<img_id>_1.png``, ``<img_id>_inde_<t>.png``, ``<img_id>_iter_<t>.png``);
``session`` = img_id, ``turn`` = t, ``target`` = the turn's ground-truth output,
``instruction`` = the turn's instruction, ``target_caption`` = the turn's local description
(``local_descriptions[img_id][output]``: the caption ``image_eval.py`` gives CLIP-T),
``source_caption`` = the global description of the turn's input image, ``mask`` = the turn's mask,
``category`` = None (MagicBrush has no edit categories). ``meta`` holds ``setting``, ``turns``
(the session's length), ``final_turn``, the three file names, ``target_global_caption`` and
``mask_convention`` (how the mask file was read, below).

Settings (loader parameter ``setting``), as ``edit_cli_single_multi_turn.py`` makes the edits and
``image_eval.py`` pairs them with the ground truth:

* ``single_turn`` ("independent editing", the paper's "all turn" numbers): every turn is edited
  from its ground-truth input (turn 1: the input image; turn t: the ground-truth output of turn
  t-1) and compared with its ground-truth output; the score is the mean over all turns.
* ``multi_turn`` ("iterative editing", the paper's "final turn" numbers): turn 1 is edited from
  the input image and turn t > 1 from **the method's own edit of turn t-1**; only the last turn of
  each session is compared with its last ground-truth output. Samples are the same turns, with
  ``meta["self_fed"]`` True and ``meta["previous_sample"]`` = ``<img_id>_<t-1>`` for t > 1, and
  ``meta["final_turn"]`` marking the turn that counts. The loader cannot know the method's
  edits, so ``source`` of a self-fed turn is the ground-truth output of turn t-1 as a stand-in;
  the harness runner chains turns: it (1) edits the turns of a session in order, (2) replaces the
  source with its own edit of ``previous_sample`` (:meth:`MagicBrushDataset.feed_previous`),
  skipping the turn when that edit failed or was skipped, (3) folds the previous edit's cache key
  into this turn's key (the input differs per method and parameter point), and (4) scores only
  the records marked ``scored`` (the final turn of each session) for the official number; the
  other turns are edited and listed in the edits table, not scored.
  In this setting ``limit`` and ``shard`` count sessions and ``ids`` pulls in the earlier turns
  of a session, so that a session's turns stay together, in order, in one job.

Masks. ``image_eval.py`` never reads the masks; MagicBrush's annotators drew them in DALL-E 2's
editor, whose convention is that fully transparent pixels (alpha 0) mark the region to edit, and
the Hugging Face dataset card (osunlp/MagicBrush) describes ``mask_img`` as a "free-form mask
image (white region)" marking the region to edit: hence ``auto``'s ``white`` fallback.
``mask_convention``: ``transparent`` (alpha < 128 = edited; the file must have alpha),
``white`` (grey level > 127 = edited, alpha ignored), ``black`` (grey level <= 127 = edited), or
``auto`` (default): ``transparent`` when the file has an alpha channel that is not fully opaque,
else ``white``. The convention applied is recorded in ``meta["mask_convention"]``.
A mask whose levels are not binary (anti-aliased edges) is read by ``mask_rule``
(:data:`harness.images.MASK_RULES`); here the default is ``threshold`` at ``mask_threshold`` 127
(alpha < 128, grey > 127 or <= 127 by the convention), the rule these conventions have always been
documented with, since ``image_eval.py`` never reads the masks and refusing them would stop the
official protocol. Each such conversion is noted on the sample (``input_notes``, the edits table's
``notes``) and reported by ``validate``; ``mask_rule=binary`` refuses soft masks instead.

Paths: the sessions file's ``input``, ``output`` and ``mask`` must be plain relative names that
stay inside the dataset folder (an absolute path, ``..`` or a link leading out fails the turn,
naming the field, before any file is opened). ``max_pixels`` is the size limit of
:func:`harness.images.load_image`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..images import (DECODE_DIFFERS, MASK_CONVERSIONS, binarize_mask, check_mask_rule, check_max_pixels,
                      decode_options, load_image, open_image)
from ..registry import DATASET_FORMATS
from ..types import Sample, SampleError
from .generic import ID_RE, DatasetLoader, SampleRef, _fingerprint, inside, select_refs, subset_params

log = logging.getLogger("edit_harness")

SETTINGS = ("single_turn", "multi_turn")
MASK_CONVENTIONS = ("auto", "transparent", "white", "black")
TURN_KEYS = ("input", "output", "mask", "instruction")


def sample_id(img_id: str, turn: int) -> str:
    """The harness id of turn ``turn`` (1-based) of session ``img_id``."""
    return f"{img_id}_{turn}"


def read_magicbrush_mask(
    path: Path, sid: str, shape: tuple[int, int] | None, convention: str = "auto", exif_orientation: bool = True,
    *, rule: str = "threshold", threshold: int = 127, notes: list[str] | None = None, shown: str | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, str]:
    """Read a MagicBrush mask file as bool HxW (True = edited) and the convention applied.

    ``exif_orientation``: as for the turn's images (see :func:`harness.images.load_mask`).
    ``rule``/``threshold``: how levels that are not binary are read (noted in ``notes``)."""
    if convention not in MASK_CONVENTIONS:
        raise ValueError(f"mask_convention must be one of {', '.join(MASK_CONVENTIONS)}, got {convention!r}")
    shown = path.name if shown is None else shown
    notes = notes if notes is not None else []
    if not path.is_file():
        raise SampleError(sid, "mask", f"file not found: {shown}")
    try:
        with open_image(path, sid, "mask", shown, max_pixels, what="mask") as img:
            img.load()
            if exif_orientation:
                img = ImageOps.exif_transpose(img)
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            alpha = np.asarray(img.convert("RGBA").getchannel("A")) if has_alpha else None
            grey = np.asarray(img.convert("RGB").convert("L"))
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(sid, "mask", f"unreadable or truncated mask {shown}: {e}".replace(str(path), shown)) from None
    applied = convention
    if convention == "auto":
        applied = "transparent" if alpha is not None and alpha.min() < 255 else "white"
    if applied == "transparent" and alpha is None:
        raise SampleError(sid, "mask", f"mask {shown} has no alpha channel (mask_convention=transparent)")
    levels = alpha if applied == "transparent" else grey
    if shape is not None and levels.shape != tuple(shape):
        raise SampleError(
            sid,
            "mask",
            f"mask {shown} is {levels.shape[1]}x{levels.shape[0]} (WxH) but its image is {shape[1]}x{shape[0]}",
        )
    # transparent: low alpha marks the edit; black: low grey; white: high grey
    mask = binarize_mask(levels, 255, sid, "mask", shown, rule, threshold, notes, edited_high=applied == "white")
    return mask, applied


@DATASET_FORMATS.register("magicbrush")
class MagicBrushDataset(DatasetLoader):
    """Loader for the MagicBrush test set; see the module docstring for the two settings."""

    has_categories = False  # MagicBrush has no edit categories: no warning for their absence

    def __init__(
        self,
        root: str | Path,
        name: str | None = None,
        setting: str = "single_turn",
        sessions_file: str = "edit_sessions.json",
        local_captions: str | None = "local_descriptions.json",
        global_captions: str | None = "global_descriptions.json",
        images_dir: str = "images",
        mask_convention: str = "auto",
        version: str | int | None = None,
        limit: int | None = None,
        shard: str | None = None,
        ids: list[str] | None = None,
        mask_rule: str | None = "threshold",
        mask_threshold: int | None = None,
        max_pixels: int | None = None,
        **card_extra: Any,
    ):
        self.name = str(name or "magicbrush")
        if setting not in SETTINGS:
            raise ValueError(f"dataset '{self.name}': setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
        if mask_convention not in MASK_CONVENTIONS:
            raise ValueError(
                f"dataset '{self.name}': mask_convention must be one of {', '.join(MASK_CONVENTIONS)}, "
                f"got {mask_convention!r}"
            )
        self.setting = setting
        self.mask_convention = mask_convention
        owner = f"dataset '{self.name}'"
        self.mask_rule, self.mask_threshold = check_mask_rule(
            "threshold" if mask_rule is None else mask_rule, mask_threshold, owner)
        self.max_pixels = check_max_pixels(max_pixels, owner)
        self.root = self.require_dir(Path(root), f"MagicBrush's test folder with {sessions_file} and {images_dir}/")
        self.sessions_path = self.require_file(self.root / sessions_file, "edit sessions file")
        self.caption_paths: dict[str, Path | None] = {}
        for kind, fname in (("local", local_captions), ("global", global_captions)):
            path = self.root / fname if fname else None
            if path is not None and not path.is_file():
                raise FileNotFoundError(
                    f"dataset '{self.name}': {kind} caption file not found: {path} "
                    f"(set dataset.{kind}_captions=null to load without it)"
                )
            self.caption_paths[kind] = path
        self.images_dir = images_dir
        self.images_root = self.root / images_dir
        self._real_root = self.root.resolve()
        self._real_dirs: dict[str, str] = {}  # folders resolved while reading the manifest (inside())
        self.version = str(version if version is not None else "1")
        self.limit, self.shard, self.ids = subset_params(self.name, limit, shard, ids)
        self._sessions: list[tuple[str, list[SampleRef]]] | None = None

    # -- annotations ----------------------------------------------------------------------
    def _json(self, path: Path) -> Any:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a whole-file problem: no sample is usable
            raise ValueError(f"dataset '{self.name}': {path.name} is not valid UTF-8 JSON: {e}") from None

    def _read_sessions(self) -> list[tuple[str, list[SampleRef]]]:
        """Every session in file order, each with its turns' refs in turn order (unfiltered)."""
        if self._sessions is not None:
            return self._sessions
        data = self._json(self.sessions_path)
        if not isinstance(data, dict):
            raise ValueError(
                f"dataset '{self.name}': {self.sessions_path} must hold a JSON object {{img_id: [turns]}}, "
                f"got {type(data).__name__}"
            )
        captions = {}
        for kind, path in self.caption_paths.items():
            captions[kind] = self._json(path) if path is not None else None
            if captions[kind] is not None and not isinstance(captions[kind], dict):
                raise ValueError(f"dataset '{self.name}': {path} must hold a JSON object keyed by img_id")
        sessions = []
        for img_id, turns in data.items():
            img_id = str(img_id)
            if not isinstance(turns, list) or not turns:
                sid = sample_id(img_id, 1)
                err = SampleError(sid, "session", f"session '{img_id}' must be a non-empty list of turns")
                sessions.append((img_id, [SampleRef(sid, {"session": img_id, "turn": 1}, sid, error=err)]))
                continue
            refs = [self._turn_ref(img_id, t, entry, len(turns), captions) for t, entry in enumerate(turns, 1)]
            sessions.append((img_id, refs))
        self._sessions = sessions
        return sessions

    def _turn_ref(self, img_id: str, t: int, entry: Any, n_turns: int, captions: dict[str, Any]) -> SampleRef:
        sid = sample_id(img_id, t)
        record: dict[str, Any] = {"setting": self.setting, "session": img_id, "turn": t, "turns": n_turns}
        if not ID_RE.match(img_id) or img_id in (".", ".."):
            err = SampleError(sid, "session", f"img_id {img_id!r} must use letters, digits, _ . - (and not be . or ..)")
            return SampleRef(sid, record, sid, error=err)
        if not isinstance(entry, dict):
            return SampleRef(sid, record, sid, error=SampleError(sid, "turn", "entry is not a JSON object"))
        for key in TURN_KEYS:
            v = entry.get(key)
            if not isinstance(v, str) or not v:
                err = SampleError(sid, key, f"turn {t} of session '{img_id}': missing or not a non-empty string: {v!r}")
                return SampleRef(sid, {**record, **entry}, sid, error=err)
            record[key] = v
        for key in ("input", "output", "mask"):  # before anything opens (or hashes) a file
            try:
                inside(self.root, self.images_root / img_id, record[key], sid, key, self._real_root, self._real_dirs)
            except SampleError as e:
                return SampleRef(sid, record, sid, error=e)
        record["target_caption"] = _caption(captions["local"], img_id, record["output"])
        record["source_caption"] = _caption(captions["global"], img_id, record["input"])
        record["target_global_caption"] = _caption(captions["global"], img_id, record["output"])
        if self.setting == "multi_turn":
            # The runner edits a record naming a previous_sample from its own edit of that sample
            # (harness.runner: chained turns) and scores only records not marked scored=False.
            if t > 1:
                record["previous_sample"] = sample_id(img_id, t - 1)
            record["scored"] = t == n_turns
        return SampleRef(sid, record, _fingerprint(record))

    def refs(self) -> list[SampleRef]:
        """All turns after ids, shard and limit; no image is decoded. Bad turns carry ``error``.

        single_turn: ``ids`` (sample or session ids), ``shard`` and ``limit`` select turns.
        multi_turn: they select sessions; a sample id keeps its session's turns up to it.
        """
        sessions = self._read_sessions()
        if self.ids is not None:
            wanted = set(self.ids)
            known = {r.id for _, refs in sessions for r in refs} | {s for s, _ in sessions}
            missing = wanted - known
            if missing:
                raise KeyError(f"dataset '{self.name}' has no sample(s) or session(s) {sorted(missing)}")
            picked = []
            for img_id, refs in sessions:
                if img_id in wanted:
                    picked.append((img_id, refs))
                    continue
                hits = [i for i, r in enumerate(refs) if r.id in wanted]
                if hits and self.setting == "multi_turn":
                    picked.append((img_id, refs[: max(hits) + 1]))
                elif hits:
                    picked.append((img_id, [refs[i] for i in hits]))
            sessions = picked
        if self.setting == "multi_turn":
            units: list[list[SampleRef]] = [refs for _, refs in sessions]
        else:
            units = [[r] for _, refs in sessions for r in refs]
        units = select_refs(units, self.name, None, self.shard, self.limit)
        return [r for unit in units for r in unit]

    def input_files(self, ref: SampleRef) -> dict[str, Path]:
        rec = ref.record if isinstance(ref.record, dict) else {}
        session = rec.get("session")
        if not isinstance(session, str) or ref.error is not None:  # unsafe paths are never hashed
            return {}
        return {field: self.images_root / session / rec[key]
                for field, key in (("source", "input"), ("target", "output"), ("mask", "mask"))
                if isinstance(rec.get(key), str) and rec[key]}

    # -- decoding -------------------------------------------------------------------------
    def load(self, ref: SampleRef, decode: Mapping[str, Any] | None = None) -> Sample:
        """Decode one turn; raises SampleError naming the sample and the field at fault.

        ``decode``: a protocol's image decoding for scoring (see :meth:`GenericDataset.load`).
        """
        if ref.error is not None:
            raise ref.error
        opts = decode_options(decode)
        rec, sid = ref.record, ref.id
        folder = self.images_root / rec["session"]
        notes: list[str] = []
        differs: dict[str, list[str]] = {}
        path = {k: inside(self.root, folder, rec[k], sid, k, self._real_root) for k in ("input", "output", "mask")}
        shown = {k: f"{self.images_dir}/{rec['session']}/{rec[k]}" for k in path}
        kw = dict(differs=differs, max_pixels=self.max_pixels, **opts)
        source = load_image(path["input"], sid, "source", notes, shown=shown["input"], **kw)
        target = load_image(path["output"], sid, "target", notes, shown=shown["output"], **kw)
        mask_notes: list[str] = []
        mask, applied = read_magicbrush_mask(path["mask"], sid, source.shape[:2], self.mask_convention,
                                             exif_orientation=opts["exif_orientation"], rule=self.mask_rule,
                                             threshold=self.mask_threshold, notes=mask_notes, shown=shown["mask"],
                                             max_pixels=self.max_pixels)
        notes.extend(mask_notes)
        for field, kind, image in (("target_caption", "local", "output"), ("source_caption", "global", "input")):
            path = self.caption_paths[kind]
            if path is not None and rec.get(field) is None:
                notes.append(f"{field}: {path.name} has no caption for {rec[image]}")
        self_fed = "previous_sample" in rec
        meta: dict[str, Any] = {
            "setting": self.setting,
            "turns": rec["turns"],
            "final_turn": rec["turn"] == rec["turns"],
            "input_file": rec["input"],
            "output_file": rec["output"],
            "mask_file": rec["mask"],
            "target_global_caption": rec.get("target_global_caption"),
            "mask_convention": applied,
            "self_fed": self_fed,
        }
        if self_fed:
            meta["previous_sample"] = rec["previous_sample"]
            meta["source_from"] = "ground_truth_stand_in"
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
            target=target,
            instruction=rec["instruction"],
            source_caption=rec.get("source_caption"),
            target_caption=rec.get("target_caption"),
            mask=mask,
            turn=rec["turn"],
            session=rec["session"],
            meta=meta,
        )

    def feed_previous(self, sample: Sample, previous_edit: np.ndarray) -> Sample:
        """The multi-turn sample with its source replaced by the method's edit of the turn before.

        The mask was drawn on the ground-truth input; when the edit's size differs it is resized
        to the edit (nearest neighbour) and the resize is noted in ``meta["input_notes"]``.
        """
        if not sample.meta.get("self_fed"):
            raise ValueError(f"sample '{sample.id}' is not a self-fed turn (setting {self.setting})")
        edit = np.asarray(previous_edit)
        if edit.ndim != 3 or edit.shape[2] != 3 or edit.dtype != np.uint8:
            raise SampleError(
                sample.id, "source", f"previous edit must be RGB uint8 HxWx3, got {edit.dtype} {edit.shape}"
            )
        meta = dict(sample.meta, source_from="previous_edit")
        mask = sample.mask
        if mask is not None and mask.shape != edit.shape[:2]:
            resized = Image.fromarray(mask).resize((edit.shape[1], edit.shape[0]), Image.NEAREST)
            mask = np.asarray(resized).astype(bool)
            meta["input_notes"] = [
                *meta.get("input_notes", []),
                f"mask: resized (nearest) from {sample.mask.shape[1]}x{sample.mask.shape[0]} to the previous edit's "
                f"{edit.shape[1]}x{edit.shape[0]}",
            ]
        return dataclasses.replace(sample, source=np.ascontiguousarray(edit), mask=mask, meta=meta)


def _caption(table: dict[str, Any] | None, img_id: str, filename: str) -> str | None:
    if table is None:
        return None
    per_image = table.get(img_id)
    if not isinstance(per_image, dict):
        return None
    v = per_image.get(filename)
    return v if isinstance(v, str) else None
