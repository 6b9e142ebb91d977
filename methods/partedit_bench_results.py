"""PartEdit's published edits on PartEdit-Bench, scored as a method (``partedit_bench_results``).

PartEdit-Bench's parquet files (:mod:`harness.data.partedit_bench`) carry the authors' own edit
of every row in the column ``partedit``. Like ``method=folder`` (edits made elsewhere), this
method makes no edit: for each sample it returns the authors' image of the same row, so their
published outputs go through the harness's cache, metrics and reports next to the methods run
here (``dataset=partedit_bench method=partedit_bench_results``).

``path`` is the PartEdit-Bench copy (the downloaded folder or one ``.parquet`` file; by default
the dataset's root). Both splits are read and indexed by the loader's sample ids
(``<split>_<id>``), so one setting serves either split. The files' listing (names, sizes and
modification times) is the model revision: replacing a file invalidates the cached scores. A
sample with no row, or a row whose ``partedit`` cell is empty, is skipped naming it; an image
whose size differs from the sample's source fails naming the sample (the authors' edits are at
the benchmark image's size).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from harness.data.partedit_bench import SPLITS, read_split, sample_id, split_files
from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SampleError

from ._published import PublishedResults

#: The parquet column holding the authors' edit.
RESULT_COLUMN = "partedit"


@METHODS.register("partedit_bench_results")
class PartEditBenchResults(PublishedResults):
    version = "1"
    copy_name = "PartEdit-Bench"

    @dataclasses.dataclass(frozen=True)
    class Params:
        path: str = ""
        label: str = "PartEdit (published)"

        def __post_init__(self):
            if not self.path:
                raise ValueError("parameter 'path' (the PartEdit-Bench copy: its folder or a .parquet file) is required")

    def _files(self) -> list[Path]:
        """The parquet files of both splits (a split with no file is left out: a one-split copy
        serves that split); FileNotFoundError when there is none at all."""
        if self.root.is_file():
            return split_files(self.root, SPLITS[0])
        files: list[Path] = []
        for split in SPLITS:
            try:
                files += split_files(self.root, split)
            except FileNotFoundError:
                continue
        if not files:
            raise FileNotFoundError(f"PartEdit-Bench copy not found or empty: {self.root} (expected "
                                    "data/synth-*.parquet and data/real-*.parquet, or one .parquet file)")
        return files

    def _index(self) -> dict[str, Any]:
        """Sample id -> the row's ``partedit`` cell, over both splits (only the id and the result
        column are read)."""
        if self._cells is None:
            cells: dict[str, Any] = {}
            if self.root.is_file():
                splits = [(None, self.root)]
            else:
                splits = [(s, self.root) for s in SPLITS]
            for split, root in splits:
                try:
                    rows = read_split(root, split or SPLITS[0], columns=("id", RESULT_COLUMN))
                except FileNotFoundError:
                    if self.root.is_file():
                        raise
                    continue
                for row in rows:
                    # one .parquet file: its split is unknown, so rows are indexed under both ids
                    for s in ([split] if split else SPLITS):
                        cells.setdefault(sample_id(s, row.get("id")), row.get(RESULT_COLUMN))
            if not cells:
                self._files()  # raises naming what was expected
            self._cells = cells
        return self._cells

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        notes: list[str] = []
        image = self.published_image(sample, RESULT_COLUMN, notes)
        if image.shape[:2] != sample.source.shape[:2]:
            raise SampleError(sample.id, RESULT_COLUMN,
                              f"the authors' edit is {image.shape[1]}x{image.shape[0]} (WxH) but the source is "
                              f"{sample.source.shape[1]}x{sample.source.shape[0]}")
        return MethodOutput(image=image, info={"column": RESULT_COLUMN, **({"input_notes": notes} if notes else {})})
