"""Face landmark distance (DiffEditor's face-manipulation setting) with dlib's 68-point predictor.

Definition used here (DiffEditor reports the "MSE" of landmark coordinates without more detail):
detect 68 landmarks on the edit (dlib frontal face detector, upsample 1, largest face; the
68-point iBUG 300-W shape predictor), then

    value = mean over the points of the set of ((x_edit - x_target)**2 + (y_edit - y_target)**2)

in squared pixels of the sample's source grid (the edit is resized to the source size first,
bicubic). Point sets ("regions"): ``68pt`` = all points, ``17pt`` = the jaw line, indices 0-16.

Each item also gets the no-edit rows ``<name>_noedit``: the same quantity between the sample's
``source_points`` and ``target_points``, the distance an edit starts from (the paper's upper
bound). An identity edit whose source points were detected by the same predictor on the same
image scores exactly the no-edit value.

Predictor file, first found: ``predictor_path`` in the metric config, the environment variable
``EDIT_HARNESS_DLIB_PREDICTOR``, the ``face_recognition_models`` package's
``models/shape_predictor_68_face_landmarks.dat`` (located with importlib, never imported: it
fails on current setuptools), Debian's ``/usr/share/dlib/shape_predictor_68_face_landmarks.dat``.
"""
from __future__ import annotations

import importlib.util
import math
import os
import threading
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from ..registry import METRICS
from ..types import Sample, ScoreValue
from .base import Metric, MetricUnavailable, ScoringItem, resize_like

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
PREDICTOR_ENV = "EDIT_HARNESS_DLIB_PREDICTOR"
SYSTEM_PREDICTOR = Path("/usr/share/dlib") / PREDICTOR_FILE
LAYOUT = "dlib68"
POINT_SETS: dict[str, tuple[int, ...]] = {"68pt": tuple(range(68)), "17pt": tuple(range(17))}

_DETECTOR: Any = None
_PREDICTORS: dict[str, Any] = {}
_LOCK = threading.Lock()


def face_recognition_models_predictor() -> Path | None:
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models" / PREDICTOR_FILE


def resolve_predictor(predictor_path: str | None = None) -> Path | str:
    """The 68-point predictor file to use, or the reason none is usable."""
    if predictor_path:
        p = Path(os.path.expanduser(str(predictor_path)))
        return p if p.is_file() else f"landmark_mse: predictor_path '{p}' given in the metric config does not exist"
    env = os.environ.get(PREDICTOR_ENV)
    if env:
        p = Path(os.path.expanduser(env))
        return p if p.is_file() else f"landmark_mse: {PREDICTOR_ENV}='{env}' does not name an existing file"
    frm = face_recognition_models_predictor()
    if frm is not None and frm.is_file():
        return frm
    if SYSTEM_PREDICTOR.is_file():
        return SYSTEM_PREDICTOR
    return (
        f"landmark_mse: dlib's 68-point predictor {PREDICTOR_FILE} was not found. Provide one of: "
        f"predictor_path=<file> in the metric config; the environment variable {PREDICTOR_ENV}=<file>; "
        f"the face_recognition_models package (pip install face_recognition_models==0.3.0); "
        f"Debian's libdlib-data ({SYSTEM_PREDICTOR})"
    )


def _dlib_objects(predictor_path: Path):
    global _DETECTOR
    with _LOCK:
        import dlib

        if _DETECTOR is None:
            _DETECTOR = dlib.get_frontal_face_detector()
        key = str(predictor_path)
        if key not in _PREDICTORS:
            _PREDICTORS[key] = dlib.shape_predictor(key)
        return _DETECTOR, _PREDICTORS[key]


def detect_landmarks(image: np.ndarray, predictor_path: Path | str, upsample: int = 1) -> np.ndarray | None:
    """68 (x, y) landmarks (float64, 68 x 2) of the largest face in an RGB uint8 image, or None."""
    detector, predictor = _dlib_objects(Path(predictor_path))
    img = np.ascontiguousarray(image, dtype=np.uint8)
    faces = list(detector(img, int(upsample)))
    if not faces:
        return None
    face = max(faces, key=lambda r: r.width() * r.height())  # max keeps the first on ties
    shape = predictor(img, face)
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)], dtype=np.float64)


def point_distance(a: np.ndarray, b: np.ndarray, indices: Sequence[int]) -> float:
    """Mean over ``indices`` of the squared Euclidean distance between points of a and b."""
    idx = list(indices)
    d = np.asarray(a, dtype=np.float64)[idx] - np.asarray(b, dtype=np.float64)[idx]
    return float(np.mean(np.sum(d * d, axis=1)))


@METRICS.register("landmark_mse")
class LandmarkMSE(Metric):
    """Mean squared landmark distance (pixels^2) between the edit's face and the target points.

    Lower is better. Parameters: ``predictor_path`` (optional file), ``upsample`` (dlib detector
    upsampling, default 1), ``regions`` (point sets among 68pt, 17pt; image-region names from a
    suite's common config are ignored). ``reference`` and ``region_rule`` from the suite's common
    config are accepted and ignored (the reference is always the target points).
    """

    higher_is_better: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("target_points", "point_layout")
    param_defaults: ClassVar[dict[str, Any]] = {"predictor_path": None, "upsample": 1}
    # dlib's detector and shape predictor find the landmarks; Pillow decodes and resizes.
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow", "dlib")

    def applies(self, sample: Sample) -> bool:
        """Only face samples with 68-point landmarks; drag points of a move are not landmarks."""
        return sample.point_layout == LAYOUT

    def __init__(
        self,
        *,
        protocol: str = "default",
        name: str | None = None,
        regions: Sequence[str] | None = None,
        reference: str | None = None,
        region_rule: str | None = None,
        **params: Any,
    ):
        super().__init__(protocol=protocol, name=name, **params)
        if isinstance(regions, str):
            regions = (regions,)
        sets = tuple(r for r in (regions or ()) if r in POINT_SETS)
        self._regions = sets or tuple(POINT_SETS)
        self.predictor_path = self.params["predictor_path"]
        self.upsample = int(self.params["upsample"])
        self._predictor: Path | None = None

    @property
    def noedit_name(self) -> str:
        return f"{self.name}_noedit"

    def regions(self) -> tuple[str, ...]:
        return self._regions

    def output_rows(self) -> list[tuple[str, str]]:
        return [(n, r) for n in (self.name, self.noedit_name) for r in self._regions]

    def region_rule(self) -> str:
        return "mean over the point set (68pt: all 68, 17pt: jaw 0-16) of squared pixel distance"

    def weights(self) -> str:
        r = resolve_predictor(self.predictor_path)
        where = r if isinstance(r, Path) else "unavailable"
        return f"dlib frontal face detector (HOG) + 68-point shape predictor {where}"

    def available(self) -> str | None:
        if importlib.util.find_spec("dlib") is None:
            return "landmark_mse needs dlib: pip install dlib-bin (prebuilt) or dlib"
        r = resolve_predictor(self.predictor_path)
        return r if isinstance(r, str) else None

    def load(self) -> None:
        if self._predictor is not None:
            return
        r = resolve_predictor(self.predictor_path)
        if isinstance(r, str):
            raise MetricUnavailable(r)
        self._predictor = r
        _dlib_objects(r)

    # -- scoring --------------------------------------------------------------------------
    def _point_rows(self, metric: str, a: np.ndarray | None, b: np.ndarray | None, flag: str | None) -> list[ScoreValue]:
        if flag is not None:
            return [ScoreValue(metric, r, math.nan, flag) for r in self._regions]
        return [ScoreValue(metric, r, point_distance(a, b, POINT_SETS[r])) for r in self._regions]

    @staticmethod
    def _points_flag(points: np.ndarray | None, field: str) -> str | None:
        if points is None:
            return f"missing:{field}"
        if np.asarray(points).shape != (68, 2):
            return f"points:{field}:shape{tuple(np.asarray(points).shape)}"
        return None

    def score_item(self, item: ScoringItem) -> list[ScoreValue]:
        s: Sample = item.sample
        flag = self.missing_flag(s)
        if flag is None and s.point_layout != LAYOUT:
            flag = f"layout:{s.point_layout}"
        if flag is None:
            flag = self._points_flag(s.target_points, "target_points")
        if flag is not None:
            return self._point_rows(self.name, None, None, flag) + self._point_rows(self.noedit_name, None, None, flag)
        target = np.asarray(s.target_points, dtype=np.float64)
        src_flag = self._points_flag(s.source_points, "source_points")
        noedit = self._point_rows(self.noedit_name, s.source_points, target, src_flag)
        self.load()
        edit = resize_like(np.asarray(item.edit), s.source.shape[:2])
        pts = detect_landmarks(edit, self._predictor, self.upsample)
        if pts is None:
            return self._point_rows(self.name, None, None, "no_face") + noedit
        if pts.shape != (68, 2):
            return self._point_rows(self.name, None, None, f"points:detected:shape{pts.shape}") + noedit
        return self._point_rows(self.name, pts, target, None) + noedit

    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        return [self.score_item(it) for it in items]
