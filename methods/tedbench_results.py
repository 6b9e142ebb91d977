"""Imagic's published results on TEdBench, scored as a method (``tedbench_results``).

TEdBench's parquet file (:mod:`harness.data.tedbench`) carries Imagic's own edit of every row
(Kawar et al. published them "to allow for comparisons"), in the column ``result_column``
(default ``edited_image``; see the loader's doc for where the column names come from). Like
``method=folder`` (edits made elsewhere) and ``partedit_bench_results``, this method makes no
edit: for each sample it returns Imagic's image of the same row, so the published outputs go
through the harness's cache, metrics and reports next to the methods run here
(``dataset=tedbench method=tedbench_results``). These are Imagic's results with Imagen as the
backbone, as the dataset ships them: ``method=imagic`` (the fine-tuning method on SD 1.5) is
what CPAM's Table 2 ran.

``path`` is the TEdBench copy (the downloaded folder or one ``.parquet`` file; by default the
dataset's root). Rows are indexed as the loader indexes them (``tedbench_<row:03d>``). The files'
listing (names, sizes and modification times) is the model revision: replacing a file
invalidates the cached scores. A sample with no row, or a row whose result cell is empty, is
skipped naming it. Imagic's results are not at the input's size in general (the dataset does not
say; Imagen works at its own resolution), so ``resize`` (default true) resizes a result of
another size to the source's with Pillow's Lanczos filter and notes it in the edit's info;
``resize=false`` fails such a sample naming the two sizes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.data.tedbench import RESULT_COLUMN, find_files, read_rows, sample_id
from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SampleError

from ._published import PublishedResults


@METHODS.register("tedbench_results")
class TEdBenchResults(PublishedResults):
    version = "1"
    copy_name = "TEdBench"

    @dataclasses.dataclass(frozen=True)
    class Params:
        path: str = ""
        result_column: str = RESULT_COLUMN
        resize: bool = True
        label: str = "Imagic (published, Imagen)"

        def __post_init__(self):
            if not self.path:
                raise ValueError("parameter 'path' (the TEdBench copy: its folder or a .parquet file) is required")
            if not self.result_column:
                raise ValueError("parameter 'result_column' (the column holding Imagic's results) is required")

    def _index(self) -> dict[str, Any]:
        """Sample id -> the row's result cell (only that column is read)."""
        if self._cells is None:
            rows = read_rows(self.root, (self.params.result_column,))
            self._cells = {sample_id(i): row.get(self.params.result_column) for i, row in enumerate(rows)}
        return self._cells

    def _files(self) -> list[Path]:
        return find_files(self.root)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        col = self.params.result_column
        notes: list[str] = []
        image = self.published_image(sample, col, notes)
        info: dict[str, Any] = {"column": col}
        h, w = sample.source.shape[:2]
        if image.shape[:2] != (h, w):
            if not self.params.resize:
                raise SampleError(sample.id, col, f"Imagic's result is {image.shape[1]}x{image.shape[0]} (WxH) but the "
                                                  f"source is {w}x{h} (method.resize=true resizes it)")
            info["resized_from"] = [int(image.shape[1]), int(image.shape[0])]
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS))
        if notes:
            info["input_notes"] = notes
        return MethodOutput(image=image, info=info)
