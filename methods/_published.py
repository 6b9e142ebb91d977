"""What the adapters of a benchmark's published results share (``partedit_bench_results``,
``tedbench_results``): they return, for each sample, the image a paper's authors published in
the benchmark's own parquet copy, so that it is scored under the harness's metrics."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from harness.data import resolve_root
from harness.data.partedit_bench import decode_image, image_struct_bytes
from harness.images import DEFAULT_MAX_PIXELS
from harness.method import Method
from harness.types import Sample, SkipSample


class PublishedResults(Method):
    """Subclasses give ``Params`` (with ``path`` and ``label``), ``copy_name``, ``_files()`` (the
    copy's parquet files) and ``_index()`` (sample id -> the result cell)."""

    requires = ("source",)
    numeric_libraries = ()  # decoding only (numpy, pillow: the input libraries every key holds)
    location_params = ("path",)  # where the copy is on this machine; its content is the revision
    copy_name = "benchmark"

    def __init__(self, params=None):
        super().__init__(params)
        self.root = resolve_root(self.params.path)
        self._cells: dict[str, Any] | None = None

    def label(self) -> str:
        return self.params.label or self.name

    def _files(self) -> list[Path]:
        raise NotImplementedError

    def _index(self) -> dict[str, Any]:
        raise NotImplementedError

    def model_revision(self) -> str:
        h = hashlib.sha256()
        for p in self._files():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    def published_image(self, sample: Sample, column: str, notes: list[str]) -> np.ndarray:
        """The sample's published image from ``column``; a skip when the copy has none for it."""
        cells = self._index()
        if sample.id not in cells:
            # the copy's name, not its path: reasons read the same on every machine
            raise SkipSample(f"{self.copy_name} copy '{self.root.name}' has no row for sample '{sample.id}'")
        cell = cells[sample.id]
        if cell is None:
            raise SkipSample(f"{self.copy_name} row of sample '{sample.id}' has no '{column}' image")
        base = self.root if self.root.is_dir() else self.root.parent
        data, shown = image_struct_bytes(cell, self.root, sample.id, column, base.resolve())
        return decode_image(data, sample.id, column, shown, notes, max_pixels=DEFAULT_MAX_PIXELS)
