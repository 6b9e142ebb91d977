"""Edits made elsewhere: reads ``<path>/<sample_id>.<ext>`` for each sample.

Used by ``edit-harness score EDITS_DIR`` so that outside edits go through the same cache,
scoring and reports as the harness's own methods. The folder's listing (names, sizes and
modification times) is the model revision, so replacing a file invalidates its cached scores.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from harness.images import load_image
from harness.method import Method
from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SampleError, SkipSample

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@METHODS.register("folder")
class FolderEdits(Method):
    version = "1"
    requires = ("source",)

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
            self._files = {}
            for p in sorted(self.root.iterdir()):
                if p.suffix.lower() in EXTENSIONS and p.is_file():
                    self._files.setdefault(p.stem, p)
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
            raise SkipSample(f"no edit named '{sample.id}.<png|jpg|...>' in {self.root}")
        notes: list[str] = []
        try:
            image = load_image(p, sample.id, "edit", notes)
        except SampleError as e:
            raise ValueError(str(e)) from None
        return MethodOutput(image=image, info={"file": p.name, **({"input_notes": notes} if notes else {})})
