"""DragonDiffusion / DiffEditor tasks: which edit a sample asks for and the masks the energies use.

Official code: ``MC-E/DragonDiffusion`` (f9b5bdf), ``src/utils/utils.py`` (``resize_numpy_image``,
``process_move``, ``process_drag``, ``process_drag_face``, ``process_appearance``,
``process_paste``) and ``src/demo/model.py`` (``run_move``, ``run_drag``, ``run_drag_face``,
``run_appearance``, ``run_paste``: the z_T initialisation). Our own code, written from reading it.

Geometry. The source is resized to the *working size* (area ``resolution**2``, sides multiples of
64, Lanczos: ``resize_numpy_image``; :func:`work_size`, :func:`resize_to_work`). The latent is
``work_hw // 8``. The energies compare estimator features on a *feature grid* of cells of
``feature_cell`` = 4 working pixels (code: ``scale = 8 * SIZES[max(up_ft_index)] / up_scale``
= 8 * 1 / 2; the features of up_blocks[1] and [2] are upsampled x2 to that grid). All energy
masks (``DragonTask.energy_masks``) live on that grid; ``m_edit`` / ``m_guid`` / ``base_mask`` /
``ref_mask`` at latent resolution. Downsampling masks is nearest-neighbour with the code's
thresholds (``F.interpolate`` default mode).

Per task (sample fields -> task; ``task`` parameter overrides):

* ``face`` (category ``face_drag`` or point_layout ``dlib68``): each source / target landmark is
  a 3x3 patch of feature cells (``process_drag_face``); prompt "a photo of a human face"; only
  the edit energy; ``m_edit`` = the whole latent (the code's SDE mask for landmarks is all ones).
* ``drag`` (source_points + target_points + mask): 3x3 cell patches at the handle (source) and
  the target of each point (``process_drag``); ``m_edit`` = the mask; the content region is
  outside it. :func:`init_latent` copies each handle's 3x3 latent patch to its target
  (``process_drag`` edits ``latent_in`` in place).
* face and drag take their points through ``point_subset`` (:func:`methods._common.handle_points`:
  ``all``, or ``17pt`` / ``68pt`` of a ``dlib68`` face: DiffEditor Table 1's 17- and 68-landmark
  settings); move always uses every pair.
* ``move`` (category ``move``, mask + drag points or params dx, dy): the object is shifted by
  the mean point offset (``run_move`` uses the first pair; the harness's ``move`` method uses the
  mean: identical for one pair). ``process_move`` masks; ``m_edit`` (regional SDE) = object
  place | target place, ``m_guid`` (where the edit gradient acts, ``Sampler.guidance_move``) =
  target place only. :func:`init_latent` copies the object's region of z_T to the target place.
* ``paste`` (category ``paste``, reference + reference_mask + mask): the reference object is
  placed into the sample's mask (see below); ``base_mask`` = ``ref_mask`` = the placed object
  (``process_paste`` with the object already at its place: dx = dy = 0, resize 1); ``m_edit`` =
  ``base_mask``; :func:`init_latent` takes the reference's z_T inside it.
* ``appearance`` (category ``appearance``, reference + reference_mask + mask): the reference
  and its mask are resized to the working size (``run_appearance``: PIL resize to the base size);
  ``base_mask`` = the sample's mask, ``ref_mask`` = the reference mask; ``m_edit`` = ``base_mask``.

Where the sample format and the code's interactive inputs differ (choices, each a parameter):

* ``move_mask``: the harness's edit ``mask`` is the region that should change; for a move that is
  the object *and* its moved copy (the embedded set's ``rocket_move_left``). ``"union"`` (default)
  recovers the object as the mask's pixels whose moved position is also in the mask (exact when
  the object is narrower than twice the shift along it); ``"object"`` takes the mask as the object
  only (the official demo's mask).
* ``move_init``: ``run_move`` rolls z_T by ``offset_in_input_pixels / 8`` latent cells although
  the latent is that of the *resized* image, while the energy masks use the offset in working
  pixels (``process_move`` multiplies by ``input_scale``): the two disagree unless the input is
  already at the working size. ``"code"`` (default, what produced the published results) keeps
  that; ``"consistent"`` rolls by the working-pixel offset / 8.
* paste placement: the code places a reference object drawn on the reference image with a
  slider offset and scale; the sample gives the target region instead, so the reference image is
  scaled (keeping its aspect ratio) and translated so that the reference mask's bounding box fits
  centred in the bounding box of ``mask`` (as the harness's ``paste`` method), uncovered pixels
  grey (the code pads with 0 in [-1, 1]); the placed object mask AND ``mask`` is the paste region.

Deviations from the code that only fix bugs (no parameter): point patches are clipped with each
axis's own size (``process_drag`` clips x with the height); feature grids are (H/4, W/4)
(``process_drag_face`` allocates (W/4, H/4), identical for the square faces of the benchmark);
the drag latent patch centre is clipped to [1, h-2] (the code's ``c//2 - 1`` slice is empty at
c = 1); a move whose shifted object would wrap round the image border (``torch.roll``) is an
error naming the sample instead of a silent wrap.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import cv2
import numpy as np

from harness.types import Sample, SampleError

from .._common import POINT_SUBSETS, handle_points

TASK_KINDS = ("drag", "face", "move", "paste", "appearance")
#: memory-bank mode of each task (src/unet/attention_processor.py via Sampler.edit's ``mode``)
MEMORY_BANK = {"drag": "concat", "face": "concat", "move": "replace", "paste": "mix", "appearance": "mix"}
#: run_drag_face's fixed prompt
FACE_PROMPT = "a photo of a human face"
#: working size (src/demo/demo.py: max_resolution 768; utils.resize_numpy_image: multiples of 64)
DEFAULT_RESOLUTION = 768
SIZE_MULTIPLE = 64
#: working pixels per feature cell (demo/model.py: scale = 8 * SIZES[2] / up_scale = 4)
DEFAULT_FEATURE_CELL = 4
#: factor of the latent to the working image (SD's VAE)
LATENT_FACTOR = 8
#: the 3x3 patch half-width of a point on the feature grid / in the latent (process_drag*)
PATCH_RADIUS = 1
#: grey of uncovered reference pixels (0 in the [-1, 1] image space the code pads with)
PAD_GREY = 128

MOVE_MASK_CHOICES = ("union", "object")
MOVE_INIT_CHOICES = ("code", "consistent")


@dataclasses.dataclass
class TaskParams:
    """The task-building parameters (read from the method's parameters; unknown keys ignored).

    task: ``"auto"`` (from the sample's fields) or one of :data:`TASK_KINDS`.
    feature_cell: working pixels per feature cell (code: 4).
    resize_scale: move only: object scale (demo ``resize_scale`` slider, default 1).
    move_mask / move_init: see the module docstring (defaults: ``"union"`` / ``"code"``).
    dx, dy: move offset in source pixels when the sample has no points (0: none).
    prompt: the text prompt (``None``: the sample's ``source_caption``, else ``""``); face tasks
        always use ``face_prompt`` (run_drag_face).
    point_subset: drag / face: the points that guide the edit (:func:`methods._common.handle_points`):
        ``"all"`` or a named set of :data:`harness.metrics.landmarks.POINT_SETS` of a ``dlib68``
        sample (``"17pt"``: the jaw line 0-16, DiffEditor Table 1's 17-point setting as the
        harness defines it; ``"68pt"``).
    """

    task: str = "auto"
    feature_cell: int = DEFAULT_FEATURE_CELL
    resize_scale: float = 1.0
    move_mask: str = "union"
    move_init: str = "code"
    dx: float = 0.0
    dy: float = 0.0
    prompt: str | None = None
    face_prompt: str = FACE_PROMPT
    point_subset: str = "all"

    @classmethod
    def from_params(cls, params: Any) -> "TaskParams":
        if isinstance(params, TaskParams):
            return params
        names = [f.name for f in dataclasses.fields(cls)]
        if params is None:
            values = {}
        elif isinstance(params, Mapping):
            values = {k: params[k] for k in names if k in params}
        else:  # a method's frozen Params dataclass
            values = {k: getattr(params, k) for k in names if hasattr(params, k)}
        out = cls(**values)
        out.check()
        return out

    def check(self) -> None:
        if self.task not in ("auto",) + TASK_KINDS:
            raise ValueError(f"dragon task: 'task' must be 'auto' or one of {list(TASK_KINDS)}, got {self.task!r}")
        if self.move_mask not in MOVE_MASK_CHOICES:
            raise ValueError(f"dragon task: 'move_mask' must be one of {list(MOVE_MASK_CHOICES)}, got {self.move_mask!r}")
        if self.move_init not in MOVE_INIT_CHOICES:
            raise ValueError(f"dragon task: 'move_init' must be one of {list(MOVE_INIT_CHOICES)}, got {self.move_init!r}")
        if isinstance(self.feature_cell, bool) or not isinstance(self.feature_cell, (int, np.integer)) or self.feature_cell < 1:
            raise ValueError(f"dragon task: 'feature_cell' must be an integer >= 1, got {self.feature_cell!r}")
        if self.point_subset not in POINT_SUBSETS:
            raise ValueError(f"dragon task: 'point_subset' must be one of {list(POINT_SUBSETS)}, got {self.point_subset!r}")
        if not (isinstance(self.resize_scale, (int, float)) and math.isfinite(self.resize_scale) and self.resize_scale > 0):
            raise ValueError(f"dragon task: 'resize_scale' must be a finite number > 0, got {self.resize_scale!r}")


@dataclasses.dataclass
class DragonTask:
    """One edit, ready for the sampler and the energies (see the module docstring).

    Latent-resolution masks are float {0, 1} tensors (1, 1, h, w) on the CPU; ``energy_masks``
    holds bool tensors (Hf, Wf) on the feature grid: move ``cur`` (target place), ``tar`` (object,
    resized by ``resize_scale``: its grid is (int(Hf*s), int(Wf*s))), ``other``, ``non_overlap``,
    ``inpaint_ref``; drag ``cur`` / ``tar`` (lists, one 3x3 patch per point: target / handle) and
    ``other``; face ``cur`` / ``tar`` (lists); paste / appearance ``base`` / ``ref``.
    """

    kind: str
    work_hw: tuple[int, int]
    latent_hw: tuple[int, int]
    m_edit: Any
    m_content: Any | None
    base_mask: Any | None
    ref_mask: Any | None
    reference: Any | None
    source_points: Any | None
    target_points: Any | None
    shift: tuple[float, float] | None
    prompt: str
    memory_bank: str
    # --- additions (keyword defaults; not in the first interface) ---
    sample_id: str = ""
    feature_cell: int = DEFAULT_FEATURE_CELL
    feat_hw: tuple[int, int] | None = None
    energy_masks: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: where the edit gradient acts when it differs from m_edit (move: the target place only)
    m_guid: Any | None = None
    resize_scale: float = 1.0
    #: paste / appearance masks at the working size (1, 1, H, W), for attention processors that
    #: resize them per layer as the code does (dict_mask['base'] / ['replace'])
    base_mask_work: Any | None = None
    ref_mask_work: Any | None = None
    #: the reference's prompt (run_paste / run_appearance: prompt_replace; samples have none)
    reference_prompt: str = ""
    #: move: the object mask at the working size (1, 1, H, W); init latent roll (dy, dx) in latent cells
    object_mask_work: Any | None = None
    init_roll: tuple[int, int] | None = None
    #: drag: (y_handle, x_handle, y_target, x_target) feature cells of each point (clipped)
    point_cells: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)

    @property
    def guidance_mask(self):
        """The mask of the regional gradient mix (``m_guid`` where set, else ``m_edit``)."""
        return self.m_edit if self.m_guid is None else self.m_guid


# --------------------------------------------------------------------------------------------
# Working size
# --------------------------------------------------------------------------------------------
def work_size(h: int, w: int, resolution: int = DEFAULT_RESOLUTION, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(H, W) of ``utils.resize_numpy_image``: scale to area ``resolution**2``, each side rounded
    (numpy's round-half-even) to a multiple of ``multiple`` (at least one multiple)."""
    if h < 1 or w < 1:
        raise ValueError(f"work_size: image size must be positive, got {h}x{w}")
    k = math.sqrt(resolution * resolution / (h * w))
    H = max(multiple, int(np.round(h * k / multiple)) * multiple)
    W = max(multiple, int(np.round(w * k / multiple)) * multiple)
    return H, W


def resize_to_work(image: np.ndarray, work_hw: tuple[int, int]) -> np.ndarray:
    """``image`` (uint8 HxWx3) resized to ``work_hw`` with Lanczos (cv2.INTER_LANCZOS4, as the code)."""
    H, W = work_hw
    return cv2.resize(np.ascontiguousarray(image), (W, H), interpolation=cv2.INTER_LANCZOS4)


# --------------------------------------------------------------------------------------------
# Task kind
# --------------------------------------------------------------------------------------------
def _has(sample: Sample, field: str) -> bool:
    return getattr(sample, field, None) is not None


def _require(sample: Sample, kind: str, fields: tuple[str, ...]) -> None:
    for f in fields:
        if not _has(sample, f):
            raise SampleError(sample.id, f, f"a '{kind}' edit (DragonDiffusion / DiffEditor) needs the field '{f}'")


REQUIRED = {
    "face": ("source_points", "target_points"),
    "drag": ("source_points", "target_points", "mask"),
    "move": ("mask",),
    "paste": ("reference", "reference_mask", "mask"),
    "appearance": ("reference", "reference_mask", "mask"),
}


def task_kind(sample: Sample, task: str | None = None) -> str:
    """The task of ``sample``: ``task`` when given (not ``None`` / ``"auto"``), else from its
    fields: category ``face_drag`` or point_layout ``dlib68`` -> face; category ``move`` /
    ``paste`` / ``appearance`` -> that; source and target points otherwise -> drag. The fields
    the task needs must be present (error naming the sample and the field)."""
    if task not in (None, "auto"):
        if task not in TASK_KINDS:
            raise ValueError(f"dragon task: 'task' must be 'auto' or one of {list(TASK_KINDS)}, got {task!r}")
        kind = task
    elif sample.category == "face_drag" or sample.point_layout == "dlib68":
        kind = "face"
    elif sample.category in ("move", "paste", "appearance"):
        kind = sample.category
    elif _has(sample, "source_points") or _has(sample, "target_points"):
        kind = "drag"
    else:
        raise SampleError(
            sample.id, "category",
            f"cannot tell the DragonDiffusion / DiffEditor task: category {sample.category!r} is none of "
            "face_drag, move, paste, appearance and the sample has no source_points / target_points",
        )
    _require(sample, kind, REQUIRED[kind])
    return kind


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _points(sample: Sample, field: str, value: Any = None) -> np.ndarray:
    """``value`` (default: the sample's ``field``) checked as (N, 2) finite points inside the source."""
    p = getattr(sample, field) if value is None else value
    try:
        a = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise SampleError(sample.id, field, f"expected an (N, 2) array of (x, y) points, got {type(p).__name__}") from None
    if a.ndim != 2 or a.shape[1] != 2 or len(a) == 0:
        raise SampleError(sample.id, field, f"expected an (N, 2) array of (x, y) points with N >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise SampleError(sample.id, field, "points must be finite")
    h, w = sample.source.shape[:2]
    bad = np.nonzero((a[:, 0] < 0) | (a[:, 0] >= w) | (a[:, 1] < 0) | (a[:, 1] >= h))[0]
    if bad.size:
        i = int(bad[0])
        raise SampleError(sample.id, field, f"point {i} ({a[i, 0]:g}, {a[i, 1]:g}) lies outside the {w}x{h} image "
                                            f"({bad.size} point(s) outside)")
    return a


def _point_pairs(sample: Sample, subset: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """The checked (source, target) points the edit uses: the ``subset`` of
    :func:`methods._common.handle_points` (``"all"``: every point)."""
    src, tgt = handle_points(sample, subset)
    sp = _points(sample, "source_points", src)
    tp = _points(sample, "target_points", tgt)
    if sp.shape != tp.shape:
        raise SampleError(sample.id, "target_points",
                          f"{len(tp)} target point(s) for {len(sp)} source point(s); the counts must match")
    return sp, tp


def _mask(sample: Sample, field: str, shape: tuple[int, int]) -> np.ndarray:
    m = getattr(sample, field)
    if not isinstance(m, np.ndarray) or m.ndim != 2:
        raise SampleError(sample.id, field, f"expected a bool HxW mask, got {type(m).__name__}")
    if m.shape != tuple(shape):
        raise SampleError(sample.id, field, f"mask shape {m.shape} does not match its image's shape {tuple(shape)}")
    m = m.astype(bool)
    if not m.any():
        raise SampleError(sample.id, field, "the mask is empty")
    return m


def _image(sample: Sample, field: str) -> np.ndarray:
    im = getattr(sample, field)
    if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3):
        raise SampleError(sample.id, field, "expected an RGB uint8 HxWx3 image")
    return im


# --------------------------------------------------------------------------------------------
# Mask helpers (torch)
# --------------------------------------------------------------------------------------------
def _mask_to_work(mask: np.ndarray, work_hw: tuple[int, int]):
    """A bool mask resized to the working size as the code does (cv2.resize, bilinear, of the
    0/255 mask, then > 0.5): float {0, 1} tensor (1, 1, H, W)."""
    import torch

    H, W = work_hw
    m = cv2.resize(mask.astype(np.uint8) * 255, (W, H), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy((m > 0.5).astype(np.float32))[None, None]


def _down(mask, hw: tuple[int, int], thresh: float = 0.5):
    """Nearest downsampling (``F.interpolate`` default) of a float (1, 1, H, W) mask, ``> thresh``
    (bool)."""
    import torch.nn.functional as F

    return F.interpolate(mask.float(), size=(int(hw[0]), int(hw[1]))) > thresh


def _cell_patch(feat_hw: tuple[int, int], cy: int, cx: int):
    import torch

    m = torch.zeros(feat_hw, dtype=torch.bool)
    m[cy - PATCH_RADIUS: cy + PATCH_RADIUS + 1, cx - PATCH_RADIUS: cx + PATCH_RADIUS + 1] = True
    return m


def _cells(points_work: np.ndarray, feat_hw: tuple[int, int], cell: int) -> list[tuple[int, int]]:
    """(cy, cx) feature cell of each working-pixel point: floor(p / cell), clipped to [1, n-2]
    (process_drag / process_drag_face)."""
    Hf, Wf = feat_hw
    out = []
    for x, y in points_work:
        cy = int(np.clip(math.floor(y / cell), 1, Hf - 2))
        cx = int(np.clip(math.floor(x / cell), 1, Wf - 2))
        out.append((cy, cx))
    return out


# --------------------------------------------------------------------------------------------
# build_task
# --------------------------------------------------------------------------------------------
def build_task(sample: Sample, source: Any, *, params: Any = None) -> DragonTask:
    """The :class:`DragonTask` of ``sample`` whose source, already resized to the working size,
    is ``source`` (PIL image or uint8 HxWx3 array); ``params``: see :class:`TaskParams`."""
    import torch

    p = TaskParams.from_params(params)
    src_arr = np.asarray(source)
    if src_arr.ndim != 3 or src_arr.shape[2] != 3:
        raise ValueError(f"build_task: the working source must be an RGB image, got shape {src_arr.shape}")
    H, W = int(src_arr.shape[0]), int(src_arr.shape[1])
    cell = int(p.feature_cell)
    if H % LATENT_FACTOR or W % LATENT_FACTOR or H % cell or W % cell:
        raise ValueError(f"build_task: working size {H}x{W} must be a multiple of {LATENT_FACTOR} and of the "
                         f"feature cell {cell}")
    orig = _image(sample, "source")
    h0, w0 = orig.shape[:2]
    sx, sy = W / w0, H / h0
    latent_hw = (H // LATENT_FACTOR, W // LATENT_FACTOR)
    feat_hw = (H // cell, W // cell)
    kind = task_kind(sample, p.task)
    if kind == "face":
        prompt = p.face_prompt
    elif p.prompt is not None:
        prompt = str(p.prompt)
    else:
        prompt = sample.source_caption or ""

    common = dict(kind=kind, work_hw=(H, W), latent_hw=latent_hw, prompt=prompt, memory_bank=MEMORY_BANK[kind],
                  sample_id=sample.id, feature_cell=cell, feat_hw=feat_hw)
    to_work = np.array([sx, sy])

    if kind in ("face", "drag"):
        sp, tp = _point_pairs(sample, p.point_subset)
        sp_w, tp_w = sp * to_work, tp * to_work
        handles = _cells(sp_w, feat_hw, cell)
        targets = _cells(tp_w, feat_hw, cell)
        # tar = the handle's patch (compared on the source's features), cur = the target's patch
        tar = [_cell_patch(feat_hw, cy, cx) for cy, cx in handles]
        cur = [_cell_patch(feat_hw, cy, cx) for cy, cx in targets]
        pts = dict(source_points=torch.tensor(sp_w, dtype=torch.float32),
                   target_points=torch.tensor(tp_w, dtype=torch.float32))
        if kind == "face":
            return DragonTask(**common, m_edit=torch.ones(1, 1, *latent_hw), m_content=None, base_mask=None,
                              ref_mask=None, reference=None, shift=None, **pts,
                              energy_masks={"cur": cur, "tar": tar})
        mask_work = _mask_to_work(_mask(sample, "mask", (h0, w0)), (H, W))
        other = _down(mask_work, feat_hw)[0, 0].logical_not()
        m_edit = _down(mask_work, latent_hw, 0.0).float()
        cells = [(hy, hx, ty, tx) for (hy, hx), (ty, tx) in zip(handles, targets)]
        return DragonTask(**common, m_edit=m_edit, m_content=None, base_mask=None, ref_mask=None, reference=None,
                          shift=None, **pts, energy_masks={"cur": cur, "tar": tar, "other": other},
                          point_cells=cells)

    if kind == "move":
        return _build_move(sample, p, common, (h0, w0), (sx, sy))
    return _build_reference_task(sample, kind, common, (h0, w0))


def _move_offset(sample: Sample, p: TaskParams) -> np.ndarray:
    if _has(sample, "source_points") or _has(sample, "target_points"):
        sp, tp = _point_pairs(sample)
        d = (tp - sp).mean(axis=0)
        field = "target_points"
    else:
        d = np.array([float(p.dx), float(p.dy)])
        field = "source_points"
    if not np.any(np.round(d)):
        raise SampleError(sample.id, field, f"the move offset {tuple(np.round(d, 2))} rounds to zero pixels: nothing to "
                                            "move (give source_points / target_points or the parameters dx, dy)")
    return d


def _object_from_union(union: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Pixels of ``union`` whose moved position (x + dx, y + dy) is in ``union`` too."""
    h, w = union.shape
    moved = np.zeros_like(union)
    ys0, ys1 = max(0, -dy), min(h, h - dy)
    xs0, xs1 = max(0, -dx), min(w, w - dx)
    if ys0 < ys1 and xs0 < xs1:
        moved[ys0:ys1, xs0:xs1] = union[ys0 + dy: ys1 + dy, xs0 + dx: xs1 + dx]
    return union & moved


def _roll_no_wrap(mask, shifts: tuple[int, int], sample_id: str, what: str):
    """``torch.roll`` of a bool mask (…, H, W) by (dy, dx), refusing a roll that wraps True pixels
    round the border (the object would leave the image)."""
    import torch

    dy, dx = shifts
    H, W = mask.shape[-2:]
    ys, xs = torch.nonzero(mask.reshape(H, W), as_tuple=True)
    if ys.numel() and (int(ys.min()) + dy < 0 or int(ys.max()) + dy >= H or int(xs.min()) + dx < 0
                       or int(xs.max()) + dx >= W):
        raise SampleError(sample_id, "target_points", f"the {what} moved by (dx, dy) = ({dx}, {dy}) cells leaves the "
                                                      f"{W}x{H} grid; move it less far")
    return torch.roll(mask, (dy, dx), (-2, -1))


def _center_fit(mask, hw: tuple[int, int], sample_id: str):
    """The code's resize_scale bookkeeping: a mask of another size cropped (larger) or zero-padded
    (smaller) about the centre to ``hw``; cropping True pixels away is an error."""
    import torch

    H, W = hw
    h, w = mask.shape[-2:]
    py, px = abs(h - H) // 2, abs(w - W) // 2
    if h >= H and w >= W:
        out = mask[..., py: py + H, px: px + W]
        if int(out.sum()) != int(mask.sum()):
            raise SampleError(sample_id, "mask", "the resized object leaves the image (resize_scale too large)")
        return out
    if h <= H and w <= W:
        out = torch.zeros(*mask.shape[:-2], H, W, dtype=mask.dtype)
        out[..., py: py + h, px: px + w] = mask
        return out
    raise ValueError(f"cannot fit a {h}x{w} grid into {H}x{W}")


def _build_move(sample: Sample, p: TaskParams, common: dict, src_hw: tuple[int, int], scale_xy: tuple[float, float]):
    H, W = common["work_hw"]
    Hf, Wf = common["feat_hw"]
    cell = common["feature_cell"]
    latent_hw = common["latent_hw"]
    sx, sy = scale_xy
    mask = _mask(sample, "mask", src_hw)
    d_src = _move_offset(sample, p)
    if p.move_mask == "union":
        obj = _object_from_union(mask, int(np.round(d_src[0])), int(np.round(d_src[1])))
        if not obj.any():
            raise SampleError(sample.id, "mask", "move_mask='union': no pixel of the mask has its moved position in the "
                                                 "mask; the mask must cover the object and its moved copy (or use "
                                                 "move_mask='object')")
    else:
        obj = mask
    rs = float(p.resize_scale)
    dx_w, dy_w = float(d_src[0] * sx), float(d_src[1] * sy)
    mask_x0 = _mask_to_work(obj, (H, W))
    org = _down(mask_x0, (Hf, Wf))
    tar = _down(mask_x0, (int(Hf * rs), int(Wf * rs)))
    # process_move: roll by (dy // scale * rs, dx // scale * rs) cells (floor division, then int)
    roll = (int(math.floor(dy_w / cell) * rs), int(math.floor(dx_w / cell) * rs))
    cur = _roll_no_wrap(tar, roll, sample.id, "object")
    cur = _center_fit(cur, (Hf, Wf), sample.id)
    other = (cur | org).logical_not()
    overlap = cur & org
    non_overlap = org & overlap.logical_not()
    # regional SDE mask (Sampler.edit, mode 'move'): object place | target place; the edit
    # gradient acts on the target place only (guidance_move: mask_edit1 = mask_cur)
    union = _down(mask_x0, (Hf, Wf)) | cur
    m_edit = _down(union.float(), latent_hw).float()
    m_guid = _down(cur.float(), latent_hw, 0.0).float()
    # run_move's z_T roll, in latent cells: dy / (H / h) * rs with dy in the *input* image's pixels
    if p.move_init == "code":
        dy_i, dx_i = float(d_src[1]), float(d_src[0])
    else:
        dy_i, dx_i = dy_w, dx_w
    init_roll = (int(dy_i / (H / latent_hw[0]) * rs), int(dx_i / (H / latent_hw[0]) * rs))
    return DragonTask(
        **common, m_edit=m_edit, m_content=None, base_mask=None, ref_mask=None, reference=None,
        source_points=None, target_points=None, shift=(dx_w, dy_w), m_guid=m_guid, resize_scale=rs,
        energy_masks={"cur": cur[0, 0], "tar": tar[0, 0], "other": other[0, 0], "non_overlap": non_overlap[0, 0],
                      "inpaint_ref": other[0, 0]},
        object_mask_work=mask_x0, init_roll=init_roll,
    )


def _place_reference(sample: Sample, ref: np.ndarray, ref_mask: np.ndarray, mask_work: np.ndarray,
                     work_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The reference scaled (aspect kept) and translated so that its mask's bounding box fits,
    centred, in the bounding box of ``mask_work``; (image uint8 HxWx3, placed mask bool HxW)."""
    H, W = work_hw
    ys, xs = np.nonzero(mask_work)
    my0, my1, mx0, mx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rys, rxs = np.nonzero(ref_mask)
    ry0, ry1, rx0, rx1 = rys.min(), rys.max() + 1, rxs.min(), rxs.max() + 1
    s = min((mx1 - mx0) / (rx1 - rx0), (my1 - my0) / (ry1 - ry0))
    rh, rw = ref.shape[:2]
    nh, nw = max(1, int(round(rh * s))), max(1, int(round(rw * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LANCZOS4
    img_s = cv2.resize(np.ascontiguousarray(ref), (nw, nh), interpolation=interp)
    msk_s = cv2.resize(ref_mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR) >= 0.5
    # offset so that the scaled object box is centred in the mask's box
    oy = int(round((my0 + my1) / 2 - (ry0 + ry1) / 2 * s))
    ox = int(round((mx0 + mx1) / 2 - (rx0 + rx1) / 2 * s))
    canvas = np.full((H, W, 3), PAD_GREY, np.uint8)
    placed = np.zeros((H, W), bool)
    y0, y1 = max(0, oy), min(H, oy + nh)
    x0, x1 = max(0, ox), min(W, ox + nw)
    if y0 < y1 and x0 < x1:
        canvas[y0:y1, x0:x1] = img_s[y0 - oy: y1 - oy, x0 - ox: x1 - ox]
        placed[y0:y1, x0:x1] = msk_s[y0 - oy: y1 - oy, x0 - ox: x1 - ox]
    return canvas, placed


def _build_reference_task(sample: Sample, kind: str, common: dict, src_hw: tuple[int, int]):
    import torch
    from PIL import Image

    H, W = common["work_hw"]
    Hf, Wf = common["feat_hw"]
    latent_hw = common["latent_hw"]
    ref = _image(sample, "reference")
    ref_mask = _mask(sample, "reference_mask", ref.shape[:2])
    mask = _mask(sample, "mask", src_hw)
    base_work = _mask_to_work(mask, (H, W))
    if kind == "paste":
        placed_img, placed = _place_reference(sample, ref, ref_mask, base_work[0, 0].numpy() > 0.5, (H, W))
        region = placed & (base_work[0, 0].numpy() > 0.5)
        if not region.any():
            raise SampleError(sample.id, "reference_mask", "the reference object placed into the mask covers no pixel of it")
        base_work = torch.from_numpy(region.astype(np.float32))[None, None]
        ref_work = base_work.clone()
        reference = Image.fromarray(placed_img)
    else:
        # run_appearance: the reference (PIL default resize filter: bicubic) and its mask
        # (cv2 bilinear, > 0.5) resized to the base's working size
        reference = Image.fromarray(ref).resize((W, H), Image.Resampling.BICUBIC)
        ref_work = _mask_to_work(ref_mask, (H, W))
    base_cur = _down(base_work, (Hf, Wf))
    ref_cur = _down(ref_work, (Hf, Wf))
    for name, field, m in (("base", "mask", base_cur), ("ref", "reference_mask", ref_cur)):
        if not m.any():
            raise SampleError(sample.id, field, f"the {name} mask covers no {common['feature_cell']}-px feature cell at "
                                                f"the working size {W}x{H}")
    m_edit = _down(base_cur.float(), latent_hw, 0.0).float()
    return DragonTask(
        **common, m_edit=m_edit, m_content=None, base_mask=m_edit.clone(),
        ref_mask=_down(ref_cur.float(), latent_hw, 0.0).float(), reference=reference,
        source_points=None, target_points=None, shift=None,
        energy_masks={"base": base_cur[0, 0], "ref": ref_cur[0, 0]},
        base_mask_work=base_work, ref_mask_work=ref_work,
    )


# --------------------------------------------------------------------------------------------
# z_T initialisation
# --------------------------------------------------------------------------------------------
def init_latent(task: DragonTask, z_T, z_T_ref=None):
    """The sampling start from the inverted source latent ``z_T`` (1, 4, h, w); a new tensor.

    move: ``run_move``: z_T (and the object mask) resized by ``resize_scale``, rolled by
    ``task.init_roll``, centre-cropped / padded back, and pasted over z_T inside the moved mask
    (the object's old place keeps its latent). drag: ``process_drag``: each handle's 3x3 latent
    patch copied to its target, point after point, in place. paste: ``run_paste``: z_T inside
    ``base_mask`` replaced by the reference's inverted latent ``z_T_ref`` (placed already: no
    roll). face, appearance: unchanged.
    """
    import torch
    import torch.nn.functional as F

    z = z_T.clone()
    if task.kind == "move":
        h, w = z.shape[-2:]
        rs = task.resize_scale
        size = (int(h * rs), int(w * rs))
        m = (F.interpolate(task.object_mask_work.to(z.device, torch.float32), size=size) > 0).to(z.dtype)
        zt = F.interpolate(z, size=size)
        m = torch.roll(m, task.init_roll, (-2, -1))
        zt = torch.roll(zt, task.init_roll, (-2, -1))
        if rs != 1:
            m = _center_fit(m > 0.5, (h, w), task.sample_id).to(z.dtype)
            zt = _center_fit_values(zt, (h, w))
        return z * (1 - m) + zt * m
    if task.kind == "drag":
        h, w = z.shape[-2:]
        up = max(1, LATENT_FACTOR // task.feature_cell)  # feature cells per latent cell (code: up_scale 2)
        for hy, hx, ty, tx in task.point_cells:
            sy_, sx_ = int(np.clip(hy // up, 1, h - 2)), int(np.clip(hx // up, 1, w - 2))
            ty_, tx_ = int(np.clip(ty // up, 1, h - 2)), int(np.clip(tx // up, 1, w - 2))
            z[:, :, ty_ - 1: ty_ + 2, tx_ - 1: tx_ + 2] = z[:, :, sy_ - 1: sy_ + 2, sx_ - 1: sx_ + 2]
        return z
    if task.kind == "paste":
        if z_T_ref is None:
            raise ValueError(f"sample '{task.sample_id}': a paste needs the reference's inverted latent (z_T_ref)")
        m = task.base_mask.to(z.device, z.dtype)
        return z * (1 - m) + z_T_ref.to(z.dtype) * m
    return z


def _center_fit_values(x, hw: tuple[int, int]):
    """As :func:`_center_fit` for a value tensor (cropping allowed; padding with zeros)."""
    import torch

    H, W = hw
    h, w = x.shape[-2:]
    py, px = abs(h - H) // 2, abs(w - W) // 2
    if h >= H:
        return x[..., py: py + H, px: px + W]
    out = torch.zeros(*x.shape[:-2], H, W, dtype=x.dtype, device=x.device)
    out[..., py: py + h, px: px + w] = x
    return out
