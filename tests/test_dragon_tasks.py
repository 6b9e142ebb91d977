"""DragonDiffusion / DiffEditor tasks (methods/dragon/tasks.py): task kinds from sample fields,
the code's masks on the feature grid and in the latent, the z_T initialisations, bad input."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.types import Sample, SampleError
from methods.dragon import tasks as T
from tests.conftest import REPO, disc_mask, textured

EMBEDDED = {"rocket_move_left": "move", "astronaut_paste_dahlia": "paste", "astronaut_smile": "face",
            "grace_hopper_shift_right": "face", "rocket_drag_taller": "drag", "astronaut_suit_navy": "appearance"}


@pytest.fixture(scope="module")
def embedded():
    from harness.data import GenericDataset

    ds = GenericDataset(REPO / "datasets" / "sample")
    refs = {r.id: r for r in ds.refs()}
    return {sid: ds.load(refs[sid]) for sid in EMBEDDED if sid in refs}


def _work(sample: Sample, resolution: int = 256):
    hw = T.work_size(*sample.source.shape[:2], resolution=resolution)
    return T.resize_to_work(sample.source, hw)


def _sample(**kw) -> Sample:
    base = dict(id="s1", dataset="synthetic", source=textured(128, 128))
    base.update(kw)
    return Sample(**base)


# ------------------------------------------------------------------------------------------
# working size
# ------------------------------------------------------------------------------------------
def test_work_size_is_the_codes_rule():
    # resize_numpy_image: k = sqrt(768^2 / (h w)), sides round(h k / 64) * 64
    assert T.work_size(512, 512) == (768, 768)
    assert T.work_size(1024, 1024) == (768, 768)
    h, w = 400, 600
    k = math.sqrt(768 * 768 / (h * w))
    assert T.work_size(h, w) == (int(np.round(h * k / 64)) * 64, int(np.round(w * k / 64)) * 64) == (640, 960)
    assert T.work_size(512, 512, resolution=64) == (64, 64)
    img = textured(50, 70)
    out = T.resize_to_work(img, (64, 128))
    assert out.shape == (64, 128, 3) and out.dtype == np.uint8


# ------------------------------------------------------------------------------------------
# task kinds
# ------------------------------------------------------------------------------------------
def test_task_kind_of_the_embedded_samples(embedded):
    assert {"rocket_move_left", "astronaut_paste_dahlia", "astronaut_smile"} <= set(embedded)
    for sid, s in embedded.items():
        assert T.task_kind(s) == EMBEDDED[sid], sid


def test_task_kind_rules_and_override():
    pts = np.array([[10.0, 10.0]])
    m = disc_mask(128, 128, 64, 64, 20)
    assert T.task_kind(_sample(source_points=pts, target_points=pts + 5, mask=m)) == "drag"
    assert T.task_kind(_sample(source_points=pts, target_points=pts, point_layout="dlib68")) == "face"
    assert T.task_kind(_sample(source_points=pts, target_points=pts, category="face_drag")) == "face"
    assert T.task_kind(_sample(category="move", mask=m)) == "move"
    ref = textured(64, 64, 1)
    rm = disc_mask(64, 64, 32, 32, 10)
    assert T.task_kind(_sample(category="paste", mask=m, reference=ref, reference_mask=rm)) == "paste"
    assert T.task_kind(_sample(category="appearance", mask=m, reference=ref, reference_mask=rm)) == "appearance"
    # the explicit task wins: a paste sample read as an appearance replacement
    assert T.task_kind(_sample(category="paste", mask=m, reference=ref, reference_mask=rm), "appearance") == "appearance"
    with pytest.raises(ValueError, match="'task' must be"):
        T.task_kind(_sample(category="move", mask=m), "rotate")


@pytest.mark.parametrize("kw, field", [
    (dict(category="remove"), "category"),
    (dict(category="move"), "mask"),
    (dict(source_points=np.array([[1.0, 1.0]]), target_points=np.array([[2.0, 2.0]])), "mask"),
    (dict(source_points=np.array([[1.0, 1.0]]), category="face_drag"), "target_points"),
    (dict(category="paste", mask=np.ones((128, 128), bool)), "reference"),
    (dict(category="appearance", mask=np.ones((128, 128), bool), reference=textured(8, 8)), "reference_mask"),
])
def test_task_kind_errors_name_sample_and_field(kw, field):
    with pytest.raises(SampleError) as e:
        T.task_kind(_sample(**kw))
    assert e.value.sample_id == "s1" and e.value.field == field


@pytest.mark.parametrize("kw, field, match", [
    (dict(source_points=np.array([[10.0, 10.0], [20, 20]]), target_points=np.array([[12.0, 10.0]])),
     "target_points", "counts must match"),
    (dict(source_points=np.array([[130.0, 10.0]]), target_points=np.array([[12.0, 10.0]])),
     "source_points", "outside"),
    (dict(source_points=np.array([[10.0, 10.0]]), target_points=np.array([[12.0, -1.0]])),
     "target_points", "outside"),
    (dict(source_points=np.array([[10.0, np.nan]]), target_points=np.array([[12.0, 1.0]])),
     "source_points", "finite"),
    (dict(source_points=np.zeros((0, 2)), target_points=np.zeros((0, 2))), "source_points", "N >= 1"),
])
def test_bad_points(kw, field, match):
    s = _sample(mask=disc_mask(128, 128, 64, 64, 20), **kw)
    with pytest.raises(SampleError, match=match) as e:
        T.build_task(s, T.resize_to_work(s.source, (64, 64)))
    assert e.value.sample_id == "s1" and e.value.field == field


def test_empty_masks_and_bad_shapes():
    pts = np.array([[10.0, 10.0]])
    src = T.resize_to_work(textured(128, 128), (64, 64))
    with pytest.raises(SampleError, match="empty") as e:
        T.build_task(_sample(source_points=pts, target_points=pts + 8, mask=np.zeros((128, 128), bool)), src)
    assert e.value.field == "mask"
    ref, rm = textured(64, 64, 1), np.zeros((64, 64), bool)
    with pytest.raises(SampleError, match="empty") as e:
        T.build_task(_sample(category="paste", mask=disc_mask(128, 128, 64, 64, 20), reference=ref, reference_mask=rm), src)
    assert e.value.field == "reference_mask"
    with pytest.raises(SampleError, match="does not match") as e:
        T.build_task(_sample(category="appearance", mask=disc_mask(128, 128, 64, 64, 20), reference=ref,
                             reference_mask=np.ones((10, 10), bool)), src)
    assert e.value.field == "reference_mask"
    with pytest.raises(SampleError, match="RGB") as e:
        T.build_task(_sample(category="paste", mask=disc_mask(128, 128, 64, 64, 20), reference=np.zeros((8, 8)),
                             reference_mask=np.ones((8, 8), bool)), src)
    assert e.value.field == "reference"


# ------------------------------------------------------------------------------------------
# drag / face
# ------------------------------------------------------------------------------------------
def _patch(hw, cy, cx):
    m = torch.zeros(hw, dtype=torch.bool)
    m[cy - 1: cy + 2, cx - 1: cx + 2] = True
    return m


def test_drag_task_masks_and_init():
    # 128x128 source, working 64x128 (non-square: each axis scales on its own)
    h0, w0 = 128, 128
    mask = np.zeros((h0, w0), bool)
    mask[20:100, 30:90] = True
    sp = np.array([[40.0, 50.0], [127.0, 0.0]])
    tp = np.array([[60.0, 30.0], [100.0, 127.0]])
    s = _sample(source_points=sp, target_points=tp, mask=mask, source_caption="a box")
    src = T.resize_to_work(s.source, (64, 128))
    task = T.build_task(s, src, params={"unrelated": 1})
    assert task.kind == "drag" and task.memory_bank == "concat" and task.prompt == "a box"
    assert task.work_hw == (64, 128) and task.latent_hw == (8, 16) and task.feat_hw == (16, 32)
    to_work = np.array([128 / 128, 64 / 128])
    np.testing.assert_allclose(task.source_points.numpy(), sp * to_work)
    np.testing.assert_allclose(task.target_points.numpy(), tp * to_work)
    # point 0: handle (40, 25) px -> cell (y 6, x 10); target (60, 15) -> (3, 15)
    assert torch.equal(task.energy_masks["tar"][0], _patch((16, 32), 6, 10))
    assert torch.equal(task.energy_masks["cur"][0], _patch((16, 32), 3, 15))
    # point 1 is clipped into [1, n-2]: handle (127, 0) -> (y 1 (0 clipped), x 30 (31 clipped))
    assert torch.equal(task.energy_masks["tar"][1], _patch((16, 32), 1, 30))
    assert task.energy_masks["tar"][1].sum() == 9
    # m_edit: the mask at latent resolution; content region: outside the mask on the grid
    mw = T._mask_to_work(mask, (64, 128))[0, 0]  # cv2 bilinear resize of the 0/255 mask, > 0.5
    assert torch.equal(mw, torch.from_numpy(mask[::2, :].astype(np.float32)))  # rows halved, for this box
    np.testing.assert_array_equal(task.m_edit[0, 0].numpy(), F.interpolate(mw[None, None], (8, 16))[0, 0].numpy() > 0)
    assert torch.equal(task.energy_masks["other"], ~(F.interpolate(mw[None, None], (16, 32))[0, 0] > 0.5))
    # init: each handle's 3x3 latent patch copied to its target (cells // 2), nothing else
    z = torch.randn(1, 4, 8, 16)
    z0 = z.clone()
    out = T.init_latent(task, z)
    assert torch.equal(z, z0)  # not modified in place
    exp = z.clone()
    for hy, hx, ty, tx in task.point_cells:
        sy, sx = min(max(hy // 2, 1), 6), min(max(hx // 2, 1), 14)
        ty2, tx2 = min(max(ty // 2, 1), 6), min(max(tx // 2, 1), 14)
        exp[:, :, ty2 - 1: ty2 + 2, tx2 - 1: tx2 + 2] = exp[:, :, sy - 1: sy + 2, sx - 1: sx + 2]
    assert torch.equal(out, exp)
    changed = (out != z).any(1)[0]
    assert changed[0:3, 6:9].all() and changed.sum() <= 18


def test_face_task_from_embedded_sample(embedded):
    s = embedded["astronaut_smile"]
    task = T.build_task(s, _work(s))
    assert task.kind == "face" and task.prompt == T.FACE_PROMPT and task.memory_bank == "concat"
    assert len(task.energy_masks["cur"]) == len(task.energy_masks["tar"]) == 68
    assert torch.equal(task.m_edit, torch.ones(1, 1, 32, 32))
    # landmark i: 3x3 cells at floor(p * 256/512 / 4), clipped
    for i in (0, 48, 54):
        x, y = s.target_points[i] * 0.5
        assert torch.equal(task.energy_masks["cur"][i], _patch((64, 64), int(y // 4), int(x // 4)))
    # init is the identity for faces
    z = torch.randn(1, 4, 32, 32)
    assert torch.equal(T.init_latent(task, z), z)


def test_face_point_subset(embedded):
    s = embedded["astronaut_smile"]
    full = T.build_task(s, _work(s))
    jaw = T.build_task(s, _work(s), params={"point_subset": "17pt"})
    assert len(jaw.energy_masks["cur"]) == 17 and torch.equal(jaw.target_points, full.target_points[:17])
    assert all(torch.equal(a, b) for a, b in zip(jaw.energy_masks["tar"], full.energy_masks["tar"][:17]))
    few = dataclasses.replace(s, source_points=s.source_points[:10], target_points=s.target_points[:10])
    with pytest.raises(SampleError, match="needs point 16") as e:
        T.build_task(few, _work(s), params={"point_subset": "17pt"})
    assert e.value.field == "source_points"
    with pytest.raises(ValueError, match="point_subset"):
        T.TaskParams.from_params({"point_subset": "jaw"})


def test_drag_from_embedded_sample(embedded):
    if "rocket_drag_taller" not in embedded:
        pytest.skip("the embedded set has no drag sample yet")
    s = embedded["rocket_drag_taller"]
    task = T.build_task(s, _work(s))
    assert task.kind == "drag" and task.m_edit.sum() > 0 and len(task.point_cells) == 1


# ------------------------------------------------------------------------------------------
# move
# ------------------------------------------------------------------------------------------
def _move_sample(union: bool, dx=-32, dy=16):
    obj = np.zeros((128, 128), bool)
    obj[40:72, 56:80] = True
    m = obj.copy()
    if union:
        m[40 + dy: 72 + dy, 56 + dx: 80 + dx] = True
    return obj, _sample(category="move", mask=m, source_points=np.array([[60.0, 50.0]]),
                        target_points=np.array([[60.0 + dx, 50.0 + dy]]), source_caption="a block")


@pytest.mark.parametrize("move_mask", ["union", "object"])
def test_move_masks(move_mask):
    obj, s = _move_sample(union=move_mask == "union")
    task = T.build_task(s, T.resize_to_work(s.source, (128, 128)), params={"move_mask": move_mask})
    assert task.kind == "move" and task.memory_bank == "replace" and task.shift == (-32.0, 16.0)
    o = torch.zeros(32, 32, dtype=torch.bool)
    o[10:18, 14:20] = True  # the object on the 4-px grid
    cur = torch.roll(o, (4, -8), (0, 1))
    M = task.energy_masks
    assert torch.equal(M["tar"], o) and torch.equal(M["cur"], cur)
    assert torch.equal(M["other"], ~(o | cur))
    assert torch.equal(M["non_overlap"], o & ~cur)
    # regional SDE region = object | target place; edit gradient on the target place only
    lat = lambda m: F.interpolate(m.float()[None, None], (16, 16))[0, 0] > 0.5
    assert torch.equal(task.m_edit[0, 0] > 0, lat(o | cur))
    assert torch.equal(task.m_guid[0, 0] > 0, lat(cur))
    assert torch.equal(task.guidance_mask, task.m_guid)


def test_move_union_recovers_the_object_exactly():
    obj, s = _move_sample(union=True)
    got = T._object_from_union(s.mask, -32, 16)
    np.testing.assert_array_equal(got, obj)


@pytest.mark.parametrize("move_init", ["code", "consistent"])
def test_move_init_moves_exactly_the_masked_region(move_init):
    obj, s = _move_sample(union=False, dx=-32, dy=16)
    # source 128 px, working 64 px: input_scale 0.5, latent 8x8
    task = T.build_task(s, T.resize_to_work(s.source, (64, 64)), params={"move_mask": "object", "move_init": move_init})
    # the code rolls by offset_in_input_px / 8 (-4, 2); consistent: working px / 8 (-2, 1)
    assert task.init_roll == ((2, -4) if move_init == "code" else (1, -2))
    z = torch.randn(1, 4, 8, 8)
    out = T.init_latent(task, z)
    m = F.interpolate(task.object_mask_work, (8, 8))[0, 0] > 0
    dy, dx = task.init_roll
    moved = torch.roll(m, (dy, dx), (0, 1))
    # inside the moved mask: z from the object's place; outside: untouched
    assert torch.equal(out[:, :, ~moved], z[:, :, ~moved])
    assert torch.equal(out[:, :, moved], torch.roll(z, (dy, dx), (-2, -1))[:, :, moved])
    assert moved.any() and (out != z).any()


def test_move_resize_scale_and_errors():
    obj, s = _move_sample(union=False)
    task = T.build_task(s, T.resize_to_work(s.source, (128, 128)), params={"move_mask": "object", "resize_scale": 0.5})
    assert task.energy_masks["tar"].shape == (16, 16) and task.energy_masks["cur"].shape == (32, 32)
    assert task.energy_masks["cur"].sum() == task.energy_masks["tar"].sum()
    z = torch.randn(1, 4, 16, 16)
    assert T.init_latent(task, z).shape == z.shape
    # object pushed out of the image: an error, not torch.roll's wrap-around
    far = dataclasses.replace(s, target_points=np.array([[0.0, 50.0]]))  # dx = -60: wraps on the grid
    with pytest.raises(SampleError, match="leaves") as e:
        T.build_task(far, T.resize_to_work(s.source, (128, 128)), params={"move_mask": "object"})
    assert e.value.field == "target_points"
    # no offset at all
    still = dataclasses.replace(s, source_points=None, target_points=None)
    with pytest.raises(SampleError, match="nothing to move"):
        T.build_task(still, T.resize_to_work(s.source, (128, 128)))
    # the params' offset when the sample has no points
    t2 = T.build_task(still, T.resize_to_work(s.source, (128, 128)), params={"move_mask": "object", "dx": -32, "dy": 16})
    assert t2.shift == (-32.0, 16.0)
    # a union mask without a moved copy
    with pytest.raises(SampleError, match="moved copy") as e:
        T.build_task(dataclasses.replace(s, target_points=np.array([[60.0 - 40, 50.0 + 40]])),
                     T.resize_to_work(s.source, (128, 128)), params={"move_mask": "union"})
    assert e.value.field == "mask"


def test_move_from_embedded_sample(embedded):
    s = embedded["rocket_move_left"]
    task = T.build_task(s, _work(s))
    assert task.kind == "move" and task.shift == (-40.0, 0.0)  # -80 source px at 256/512
    M = task.energy_masks
    assert M["cur"].sum() == M["tar"].sum() > 0
    # the recovered object is the mask's right part: the union minus its left copy
    assert M["non_overlap"].any() and not (M["cur"] & M["non_overlap"]).any()


# ------------------------------------------------------------------------------------------
# paste / appearance
# ------------------------------------------------------------------------------------------
def test_paste_task_and_init(embedded):
    s = embedded["astronaut_paste_dahlia"]
    task = T.build_task(s, _work(s))
    assert task.kind == "paste" and task.memory_bank == "mix"
    assert task.reference.size == (256, 256)
    M = task.energy_masks
    assert torch.equal(M["base"], M["ref"]) and M["base"].any()
    # the paste region lies inside the sample's mask (at the working size)
    mw = T._mask_to_work(s.mask, (256, 256))
    assert not (task.base_mask_work.bool() & ~mw.bool()).any()
    assert torch.equal(task.m_edit, task.base_mask) and torch.equal(task.base_mask, task.ref_mask)
    # the reference object's pixels are where the placed mask is: its colour (an orange-red
    # dahlia) dominates the placed region of the reference image, grey elsewhere at the corners
    ref = np.asarray(task.reference)
    assert (ref[0, 0] == T.PAD_GREY).all()
    # init: z_T_ref inside base_mask, z_T outside
    z, zr = torch.randn(1, 4, 32, 32), torch.randn(1, 4, 32, 32)
    out = T.init_latent(task, z, zr)
    m = task.base_mask[0, 0] > 0
    assert torch.equal(out[:, :, m], zr[:, :, m]) and torch.equal(out[:, :, ~m], z[:, :, ~m])
    with pytest.raises(ValueError, match="z_T_ref"):
        T.init_latent(task, z)


def test_paste_placement_fits_the_reference_box():
    ref = np.zeros((64, 64, 3), np.uint8)
    ref[..., 0] = 200
    rm = np.zeros((64, 64), bool)
    rm[16:48, 8:40] = True  # 32x32 object
    mask = np.zeros((128, 128), bool)
    mask[64:80, 32:48] = True  # 16x16 target box
    s = _sample(category="paste", mask=mask, reference=ref, reference_mask=rm)
    task = T.build_task(s, T.resize_to_work(s.source, (128, 128)))
    placed = task.base_mask_work[0, 0].bool()
    np.testing.assert_array_equal(placed.numpy(), mask)  # scale 1/2, centred: exactly the box
    img = np.asarray(task.reference)
    assert (img[placed.numpy()][:, 0] == 200).all()


def test_appearance_task():
    ref = textured(96, 64, 3)
    rm = np.zeros((96, 64), bool)
    rm[10:50, 10:30] = True
    mask = disc_mask(128, 128, 64, 64, 30)
    s = _sample(category="appearance", mask=mask, reference=ref, reference_mask=rm, source_caption="x")
    task = T.build_task(s, T.resize_to_work(s.source, (64, 64)))
    assert task.kind == "appearance" and task.memory_bank == "mix" and task.reference.size == (64, 64)
    M = task.energy_masks
    assert M["base"].shape == M["ref"].shape == (16, 16)
    assert M["base"].sum() != M["ref"].sum()  # independent masks (means are compared, not cells)
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(T.init_latent(task, z), z)


def test_appearance_from_embedded_sample(embedded):
    if "astronaut_suit_navy" not in embedded:
        pytest.skip("the embedded set has no appearance sample yet")
    s = embedded["astronaut_suit_navy"]
    task = T.build_task(s, _work(s))
    assert task.kind == "appearance" and task.energy_masks["ref"].any() and task.energy_masks["base"].any()


def test_params_checks():
    with pytest.raises(ValueError, match="move_mask"):
        T.TaskParams.from_params({"move_mask": "box"})
    with pytest.raises(ValueError, match="resize_scale"):
        T.TaskParams.from_params({"resize_scale": 0})
    with pytest.raises(ValueError, match="multiple"):
        T.build_task(_sample(category="move", mask=disc_mask(128, 128, 64, 64, 9)), textured(60, 64))

    @dataclasses.dataclass(frozen=True)
    class P:
        task: str = "auto"
        move_mask: str = "object"
        other: int = 3

    assert T.TaskParams.from_params(P()).move_mask == "object"
