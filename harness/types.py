"""Core records that flow through the harness: samples, edits and scores.

Nothing here imports torch: the cached-rerun path must stay fast.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import numpy as np

# Sample fields a method or metric may declare in ``requires``.
SAMPLE_FIELDS = (
    "source",
    "target",
    "instruction",
    "source_caption",
    "target_caption",
    "mask",
    "category",
    "part",
    "turn",
    "session",
    "source_points",
    "target_points",
    "point_layout",
    "reference",
    "reference_mask",
)

# Edit categories known to the harness. A dataset's sample with another category is an error
# (``edit-harness validate`` lists these); a generic dataset may declare more in its card
# (``extra_categories: [...]``). The last four are PIE-Bench's editing types (harness.data.pie_bench).
CATEGORIES = (
    "add",
    "remove",
    "change_object",
    "change_color",
    "change_material",
    "change_background",
    "move",
    "paste",
    "face_drag",
    "random",
    "change_content",
    "change_pose",
    "change_style",
)

#: Severities of a :class:`SampleError`: an ``error`` makes the sample unusable (a failed row in a
#: run, and ``validate`` exits 1); a ``warning`` is reported by ``validate`` but the sample is used.
LEVELS = ("error", "warning")


class DatasetError(ValueError):
    """The dataset as a whole cannot be read (an annotation file that is not UTF-8 JSON, a missing
    key): no sample is usable, so the job stops with this one-line message."""


class SampleError(ValueError):
    """A sample cannot be used (``level="error"``), or can but with a caveat ``validate`` reports
    (``level="warning"``): names the sample and the field at fault."""

    def __init__(self, sample_id: str, field: str, message: str, level: str = "error"):
        if level not in LEVELS:
            raise ValueError(f"SampleError level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.sample_id = sample_id
        self.field = field
        self.message = message
        self.level = level
        super().__init__(f"sample '{sample_id}', field '{field}': {message}")

    def __reduce__(self):  # picklable (joblib / submitit launchers) with its level
        return (type(self), (self.sample_id, self.field, self.message, self.level))


@dataclasses.dataclass
class Sample:
    """One editing task. Images are RGB uint8 HxWx3; masks are bool HxW (True = should change).

    Points are float arrays of shape (N, 2) in (x, y) pixel coordinates of the source image.
    """

    id: str
    dataset: str
    source: np.ndarray
    target: np.ndarray | None = None
    instruction: str | None = None
    source_caption: str | None = None
    target_caption: str | None = None
    mask: np.ndarray | None = None
    category: str | None = None
    part: str | None = None
    turn: int | None = None
    session: str | None = None
    source_points: np.ndarray | None = None
    target_points: np.ndarray | None = None
    point_layout: str | None = None
    reference: np.ndarray | None = None
    reference_mask: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def missing(self, fields: tuple[str, ...] | list[str]) -> list[str]:
        """The fields among ``fields`` that this sample does not have."""
        unknown = [f for f in fields if f not in SAMPLE_FIELDS]
        if unknown:
            raise ValueError(f"unknown sample field(s) {unknown}; known: {', '.join(SAMPLE_FIELDS)}")
        return [f for f in fields if getattr(self, f) is None]


class EditStatus(str, enum.Enum):
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclasses.dataclass
class MethodOutput:
    """What a method's ``edit`` returns."""

    image: np.ndarray
    mask: np.ndarray | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class SkipSample(Exception):
    """Raised by a method for a sample it cannot handle; becomes a skipped row with the reason."""


@dataclasses.dataclass
class EditResult:
    """One cached edit: the image (when ok), the mask the method used, status and costs."""

    status: EditStatus
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    reason: str | None = None
    traceback: str | None = None
    prep_seconds: float = 0.0
    infer_seconds: float = 0.0
    peak_memory_bytes: int | None = None
    flags: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ScoreValue:
    """One number from one metric on one edit.

    ``region`` is ``all``, ``edited`` (mask) or ``unedited`` (1 - mask) for image metrics, or a
    metric-specific name (``68pt``, ``17pt``). ``flag`` says why a value is NaN or special.
    """

    metric: str
    region: str
    value: float
    flag: str | None = None

    def __post_init__(self):
        v = float(self.value)
        object.__setattr__(self, "value", v)
        if math.isnan(v) and not self.flag:
            raise ValueError(f"metric {self.metric}/{self.region}: a NaN score must carry a flag")
