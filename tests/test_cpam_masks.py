"""CPAM mask strategies (methods/cpam/masks.py) on synthetic masks with hand-made expected outputs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import methods.cpam.masks as cm
from methods.diffusion.loading import MissingWeights


def square(size: int, y0: int, x0: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def test_edit_types_are_the_papers_five():
    assert cm.EDIT_TYPES == ("replace", "pose_view", "background", "remove", "add")


def test_expand_mask_kernel_from_sqrt_area():
    m = square(40, 15, 15, 10)  # area 100 -> sqrt 10
    # scale 0.3 -> k = 3: a centred 3x3 dilation grows the square by one pixel on every side
    assert np.array_equal(cm.expand_mask(m, 0.3), square(40, 14, 14, 12))
    # scale 0.5 -> k = 5: two pixels on every side
    assert np.array_equal(cm.expand_mask(m, 0.5), square(40, 13, 13, 14))
    # scale 0.09 -> k = int(0.9) = 0: unchanged (the thesis returns the mask as is)
    assert np.array_equal(cm.expand_mask(m, 0.09), m)
    # even k = 4 (scale 0.4): 4 - 1 = 3 extra rows and columns in all
    assert int(cm.expand_mask(m, 0.4).sum()) == 13 * 13


def test_convex_hull_fills_a_ring_and_an_l_shape():
    ring = square(20, 4, 4, 10) & ~square(20, 6, 6, 6)  # hollow 10x10 square
    assert np.array_equal(cm.convex_hull_mask(ring, 0.0), square(20, 4, 4, 10))
    # L-shape: the hull adds the triangle between the arms
    ell = np.zeros((10, 10), dtype=bool)
    ell[2:8, 2] = True
    ell[7, 2:8] = True
    hull = cm.convex_hull_mask(ell, 0.0)
    expected = np.zeros((10, 10), dtype=bool)
    for y in range(2, 8):
        expected[y, 2:2 + (y - 2) + 1] = True  # lower-left triangle with the two arms as legs
    assert np.array_equal(hull, expected)
    # with a scale the hull is dilated, the kernel from the HULL's area (100, not the ring's 64):
    # k = int(10 * 0.3) = 3, one pixel on each side (from the ring's area it would be int(2.4) = 2)
    assert np.array_equal(cm.convex_hull_mask(ring, 0.3), square(20, 3, 3, 12))


def test_target_mask_per_edit_type():
    obj = square(16, 4, 4, 6)
    m_s = cm.source_mask_for("replace", obj)
    assert np.array_equal(m_s, obj)
    # remove: empty
    assert not cm.target_mask("remove", m_s).any()
    assert cm.target_mask("remove", m_s).shape == (16, 16)
    # background: M_s is the background and M_t = M_s
    bg = cm.source_mask_for("background", obj)
    assert np.array_equal(bg, ~obj) and int(bg.sum()) == 256 - 36
    assert np.array_equal(cm.target_mask("background", bg), ~obj)
    # add: M_s dilated (area 36 -> sqrt 6; 0.5 -> k = 3) or M_s itself with scale 0
    assert np.array_equal(cm.target_mask("add", m_s, add_dilate_scale=0.5), square(16, 3, 3, 8))
    assert np.array_equal(cm.target_mask("add", m_s, add_dilate_scale=0.0), obj)
    # replace / pose_view strategies
    assert np.array_equal(cm.target_mask("pose_view", m_s, strategy="source"), obj)
    assert np.array_equal(cm.target_mask("replace", m_s, strategy="dilate", dilate_scale=0.5), square(16, 3, 3, 8))
    assert np.array_equal(cm.target_mask("replace", m_s, strategy="convex_hull", hull_scale=0.5), square(16, 3, 3, 8))


def test_target_mask_attention_strategy_thresholds_the_normalised_map():
    obj = square(8, 0, 0, 4)
    amap = np.zeros((4, 4))
    amap[1, 1], amap[1, 2], amap[2, 2] = 1.0, 0.3, 0.2  # min-max -> 1, 0.3, 0.2 against threshold 0.25
    got = cm.target_mask("replace", obj, strategy="attention", attention_map=amap, threshold=0.25)
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:4, 2:4] = True  # (1, 1) at 8x8, nearest
    expected[2:4, 4:6] = True  # (1, 2)
    assert np.array_equal(got, expected)
    with pytest.raises(ValueError, match="needs attention_map"):
        cm.target_mask("pose_view", obj, strategy="attention")


def test_attention_target_mask_normalises_each_map_then_averages():
    a = np.zeros((2, 2))
    a[0, 0] = 10.0  # peak 10 -> normalised 1
    b = np.zeros((2, 2))
    b[1, 1] = 0.1  # peak 0.1 -> normalised 1: both maps weigh the same
    mask = cm.attention_target_mask([a, b], 0.25)
    assert np.array_equal(mask, np.array([[True, False], [False, True]]))
    # without the per-map max, b would be lost; the threshold is inclusive (thesis: >=)
    c = np.array([[0.0, 0.25], [1.0, 0.2]])
    assert np.array_equal(cm.attention_target_mask(c, 0.25), np.array([[False, True], [True, False]]))
    # a flat map has no location
    assert not cm.attention_target_mask(np.ones((3, 3))).any()
    with pytest.raises(ValueError, match="at least one"):
        cm.attention_target_mask([])
    with pytest.raises(ValueError, match="attention map 1 has non-finite"):
        cm.attention_target_mask([a, np.full((2, 2), np.nan)])


def test_refine_schedule_and_refiner():
    assert [cm.refine_schedule(s, 3) for s in range(5)] == [False, False, False, True, True]
    assert cm.DEFAULT_T_M == 1 and cm.refine_schedule(0) is False and cm.refine_schedule(1) is True
    obj = square(4, 0, 0, 2)
    ref = cm.AttentionMaskRefiner(obj, t_m=2)
    amap = np.zeros((4, 4))
    amap[3, 3] = 1.0
    ref.add(0, amap)  # before T_m: ignored
    ref.add(1, amap)
    assert ref.maps == [] and np.array_equal(ref.mask(2), obj)  # no map collected yet -> M_s
    ref.add(2, amap)
    assert np.array_equal(ref.mask(1), obj)  # still in the first T_m steps
    expected = np.zeros((4, 4), dtype=bool)
    expected[3, 3] = True
    assert np.array_equal(ref.mask(2), expected)
    with pytest.raises(ValueError, match="t_m"):
        cm.refine_schedule(0, -1)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown CPAM edit type 'recolor'"):
        cm.target_mask("recolor", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="unknown target-mask strategy 'magic'"):
        cm.target_mask("replace", np.zeros((4, 4)), strategy="magic")
    with pytest.raises(ValueError, match="source_mask must be a 2-D"):
        cm.target_mask("replace", np.zeros((2, 4, 4)))


def test_sam_missing_weights_and_bad_prompts(tmp_path):
    with pytest.raises(MissingWeights, match="method.sam_checkpoint"):
        cm.load_sam_predictor("vit_b", tmp_path / "nope.pth")
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(MissingWeights):
        cm.source_mask_from_sam(None, img, points=[[3, 3]])
    with pytest.raises(ValueError, match="points or a box"):
        cm.source_mask_from_sam(object(), img)
    with pytest.raises(ValueError, match="outside the 32x32 image"):
        cm.source_mask_from_sam(object(), img, points=[[40, 3]])
    with pytest.raises(ValueError, match="box"):
        cm.source_mask_from_sam(object(), img, box=[10, 10, 5, 20])


def test_sam_source_mask_is_the_best_scored_prompted_mask():
    pytest.importorskip("segment_anything")
    predictor = cm.load_sam_predictor(tiny=True)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(48, 40, 3), dtype=np.uint8)
    got = cm.source_mask_from_sam(predictor, img, points=[[10, 20]], box=[2, 4, 30, 40])
    # independent: the predictor's three masks for the same prompts, best predicted IoU
    predictor.set_image(img)
    masks, scores, _ = predictor.predict(point_coords=np.array([[10.0, 20.0]]), point_labels=np.array([1]),
                                         box=np.array([2.0, 4.0, 30.0, 40.0]), multimask_output=True)
    assert masks.shape == (3, 48, 40)
    assert got.dtype == bool and got.shape == (48, 40)
    assert np.array_equal(got, masks[int(np.argmax(scores))])
    # the LoadedSam that ZONE's loader returns is accepted as well
    from methods.zone.refine import load_sam_generator

    again = cm.source_mask_from_sam(load_sam_generator(tiny=True), img, points=[[10, 20]], box=[2, 4, 30, 40])
    assert np.array_equal(again, got)


def test_import_does_not_import_torch():
    # exit 3 = torch was imported; any other failure (an import error) fails the test
    pre = subprocess.run([sys.executable, "-c", "import sys, methods.cpam; sys.exit(3 * ('torch' in sys.modules))"])
    if pre.returncode == 3:
        pytest.skip("the methods.cpam package itself imports torch")
    assert pre.returncode == 0
    code = "import sys; import methods.cpam.masks, methods.cpam.attention; sys.exit(3 * ('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
