"""Edits made elsewhere: reads ``<path>/<sample_id>.<ext>`` for each sample.

Used by ``edit-harness score EDITS_DIR`` so that outside edits go through the same cache,
scoring and reports as the harness's own methods. The folder's listing (names, sizes and
modification times) is the model revision, so replacing a file invalidates its cached scores.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
from pathlib import Path
from typing import Iterable

from harness.images import load_image
from harness.method import Method
from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SampleError, SkipSample

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def index_edits(root: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """The edit files of a folder by sample id (the file name without its extension), and the
    ids that have several files (their names, the one used first). Of several files for one
    id the first in name order is used, so that the choice does not depend on the file system."""
    files: dict[str, Path] = {}
    several: dict[str, list[str]] = {}
    for p in sorted(Path(root).iterdir()):
        if p.suffix.lower() in EXTENSIONS and p.is_file():
            if p.stem in files:
                several.setdefault(p.stem, [files[p.stem].name]).append(p.name)
            else:
                files[p.stem] = p
    return files, several


@dataclasses.dataclass
class EditsMatch:
    """How a folder's edit files match a dataset's sample ids."""

    #: the selected sample ids that have an edit file
    matched: list[str]
    #: each file named after no sample id of the dataset -> the closest ids (difflib)
    unmatched: dict[str, list[str]]
    #: each sample id with several files -> their names, the one used first
    several: dict[str, list[str]]


def match_edits(root: Path, ids: Iterable[str], selected: Iterable[str] | None = None) -> EditsMatch:
    """Match the edit files in ``root`` against a dataset's sample ``ids`` (all of them: a file
    for a sample outside the selection is not a stray file) and the ``selected`` ids a job
    scores (default: all)."""
    ids = list(ids)
    known = set(ids)
    files, several = index_edits(root)
    unmatched = {
        p.name: difflib.get_close_matches(stem, ids, n=3, cutoff=0.6)
        for stem, p in files.items() if stem not in known
    }
    for stem, names in several.items():
        if stem not in known:  # every file of a stray id is stray
            for name in names[1:]:
                unmatched[name] = unmatched[files[stem].name]
    matched = [i for i in (ids if selected is None else selected) if i in files]
    return EditsMatch(matched=matched, unmatched=unmatched, several={k: v for k, v in several.items() if k in known})


@METHODS.register("folder")
class FolderEdits(Method):
    version = "1"
    requires = ("source",)
    location_params = ("path",)  # the folder's location on this machine; its content is the revision

    @dataclasses.dataclass(frozen=True)
    class Params:
        path: str = ""
        label: str = ""

        def __post_init__(self):
            if not self.path:
                raise ValueError("parameter 'path' (the folder of edits) is required")

    def __init__(self, params=None):
        super().__init__(params)
        self.root = Path(self.params.path)
        self._files: dict[str, Path] | None = None

    def _index(self) -> dict[str, Path]:
        if self._files is None:
            if not self.root.is_dir():
                raise FileNotFoundError(f"edits folder not found: {self.root}")
            self._files = index_edits(self.root)[0]
        return self._files

    def label(self) -> str:
        return self.params.label or self.name

    def model_revision(self) -> str:
        h = hashlib.sha256()
        for stem, p in sorted(self._index().items()):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        p = self._index().get(sample.id)
        if p is None:
            # the folder's name, not its path: reasons read the same on every machine
            raise SkipSample(f"no edit named '{sample.id}.<png|jpg|...>' in the edits folder '{self.root.name}'")
        notes: list[str] = []
        try:
            image = load_image(p, sample.id, "edit", notes, shown=p.name)
        except SampleError as e:
            raise ValueError(str(e)) from None
        return MethodOutput(image=image, info={"file": p.name, **({"input_notes": notes} if notes else {})})
