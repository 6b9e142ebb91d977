"""DiffEditor Table 1's "17 points" setting: the drag methods' ``point_subset`` parameter
(methods/_common.py ``handle_points``) in diffeditor, dragondiffusion, dragdiffusion, draggan and
usercontrollablelt. What reaches each method's drag step is checked with a spy on that step (not
through the edited image); ``all`` is checked bit-identical to a run without the parameter and to
``68pt`` (the same 68 points in the same order through the subset code path). Tiny random-weight
backbones, 64 x 64 synthetic faces.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import methods.diffeditor  # noqa: F401  (registers; the lead adds these to methods/__init__.py)
import methods.dragdiffusion  # noqa: F401
import methods.draggan  # noqa: F401
import methods.dragondiffusion  # noqa: F401
import methods.usercontrollablelt  # noqa: F401
from harness.metrics.landmarks import POINT_SETS
from harness.registry import METHODS
from harness.types import Sample, SampleError
from methods._common import POINT_SUBSETS, check_point_subset, handle_points

from .conftest import textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
NAMES = ["diffeditor", "dragondiffusion", "dragdiffusion", "draggan", "usercontrollablelt"]


def _face(n: int = 68, **kw) -> Sample:
    """A 64 x 64 'face' with n dlib68-layout points; every target is its source moved by (+2, +1)
    except that jaw points 0-16 move by (-3, +2) (so the two sets differ)."""
    rng = np.random.default_rng(7)
    src = rng.uniform(12, 50, size=(n, 2)).round(1)
    tgt = src + np.array([2.0, 1.0])
    tgt[:17] = src[:17] + np.array([-3.0, 2.0])
    rec = dict(id="face", dataset="synthetic", source=textured(64, 64, seed=5), category="face_drag",
               point_layout="dlib68", source_points=src, target_points=tgt, source_caption="a face")
    rec.update(kw)
    return Sample(**rec)


def _make(name: str, **params):
    cls = METHODS.get(name)
    return cls(cls.parse_params({"backbone": "tiny", **FAST[name], **params}))


# the smallest settings each tiny method runs with (a few steps; the drag step still runs)
FAST = {
    "diffeditor": {"num_inference_steps": 4},
    "dragondiffusion": {"num_inference_steps": 4},
    "dragdiffusion": {"num_inference_steps": 4, "resolution": 64, "lora_steps": 1, "n_pix_step": 1},
    "draggan": {"inversion_steps": 2, "tune_steps": 0, "max_steps": 1},
    "usercontrollablelt": {"inversion_steps": 2, "multi_point": "joint"},
}


# -- the helper ------------------------------------------------------------------------------------
def test_all_returns_the_samples_own_points():
    s = _face()
    src, tgt = handle_points(s, "all")
    assert src is s.source_points and tgt is s.target_points
    # "all" does not look at the layout or the count: every method's own checks apply as before
    odd = _face(n=3, point_layout="drag")
    assert handle_points(odd)[0] is odd.source_points


def test_named_subsets_select_the_landmark_rows():
    s = _face()
    src, tgt = handle_points(s, "17pt")
    assert POINT_SETS["17pt"] == tuple(range(17))  # the jaw line: the harness's 17 (the paper names none)
    assert src.shape == tgt.shape == (17, 2) and src.dtype == np.float64
    np.testing.assert_array_equal(src, s.source_points[:17])
    np.testing.assert_array_equal(tgt, s.target_points[:17])
    src68, tgt68 = handle_points(s, "68pt")
    np.testing.assert_array_equal(src68, s.source_points)
    np.testing.assert_array_equal(tgt68, s.target_points)
    # lists are accepted like arrays
    listed = dataclasses.replace(s, source_points=s.source_points.tolist(), target_points=s.target_points.tolist())
    np.testing.assert_array_equal(handle_points(listed, "17pt")[1], s.target_points[:17])
    assert POINT_SUBSETS == ("all", "68pt", "17pt")


@pytest.mark.parametrize("change, field, message", [
    ({"point_layout": "drag"}, "point_layout", "selects landmarks of the 'dlib68' layout"),
    ({"point_layout": None}, "point_layout", "the sample's point layout is None"),
    ({"source_points": np.zeros((10, 2))}, "source_points", re.escape("needs point 16 (indices 0-16 of the dlib68 "
                                                                     "layout); the sample has 10 points")),
    ({"target_points": np.zeros((16, 2))}, "target_points", "needs point 16"),
    ({"target_points": None}, "target_points", "it has none"),
    ({"source_points": np.zeros((17,))}, "source_points", "expected an \\(N, 2\\) array"),
])
def test_a_sample_without_the_subset_names_the_sample_and_the_field(change, field, message):
    s = dataclasses.replace(_face(), id="bad_face", **change)
    with pytest.raises(SampleError, match=message) as e:
        handle_points(s, "17pt")
    assert e.value.sample_id == "bad_face" and e.value.field == field
    # 17 points are enough for 17pt, not for 68pt
    few = _face(n=17)
    assert handle_points(few, "17pt")[0].shape == (17, 2)
    with pytest.raises(SampleError, match="needs point 67"):
        handle_points(few, "68pt")


def test_unknown_subsets_are_refused():
    with pytest.raises(ValueError, match="point_subset"):
        handle_points(_face(), "jaw")
    with pytest.raises(ValueError, match="'point_subset' must be one of \\['all', '68pt', '17pt'\\]"):
        check_point_subset("m", "jaw")


# -- the parameter in every method -------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_parameter_default_yaml_and_refusal(name):
    cls = METHODS.get(name)
    assert cls.Params().point_subset == "all"
    text = (REPO / "conf" / "method" / f"{name}.yaml").read_text()
    assert yaml.safe_load(text)["point_subset"] == "all"
    assert "17pt" in text and "68-landmark" in text and "jaw" in text
    assert cls.parse_params({"backbone": "tiny", "point_subset": "17pt"}).point_subset == "17pt"
    with pytest.raises(ValueError, match="point_subset"):
        cls.parse_params({"backbone": "tiny", "point_subset": "jaw"})


@pytest.mark.parametrize("name", NAMES)
def test_a_sample_without_the_subset_is_a_skip_reason(name):
    m = _make(name, point_subset="17pt")
    mask = np.zeros((64, 64), bool)
    mask[8:56, 8:56] = True
    drag = dataclasses.replace(_face(n=2, point_layout="drag", category="drag", mask=mask), id="rocket")
    reason = m.cannot_handle(drag)
    assert reason and "sample 'rocket', field 'point_layout'" in reason and name in reason
    few = dataclasses.replace(_face(n=10), id="few")
    assert "sample 'few', field 'source_points'" in m.cannot_handle(few)
    assert m.cannot_handle(_face()) is None
    # with "all" the same drag sample is an ordinary drag
    assert _make(name).cannot_handle(drag) is None


# -- what reaches the drag step ----------------------------------------------------------------------
def _spy_dragon(monkeypatch):
    """Record the task each guidance object is built with (the energies drag its point patches)."""
    from methods.dragon import energy

    seen = []

    class Spy(energy.EnergyGuidance):
        def __init__(self, estimator, task, **kw):
            seen.append(task)
            super().__init__(estimator, task, **kw)

    monkeypatch.setattr(energy, "EnergyGuidance", Spy)
    return seen


def _spy_dragdiffusion(monkeypatch):
    from methods.dragdiffusion import drag

    seen = []
    real = drag.drag_update

    def spy(unet, tap, z, t, emb, handles, targets, *a, **kw):
        seen.append((handles.clone(), targets.clone()))
        return real(unet, tap, z, t, emb, handles, targets, *a, **kw)

    monkeypatch.setattr(drag, "drag_update", spy)
    return seen


def _spy_draggan(monkeypatch):
    seen = []
    real = methods.draggan.drag

    def spy(G, w0, handles, targets, **kw):
        seen.append((np.array(handles), np.array(targets)))
        return real(G, w0, handles, targets, **kw)

    monkeypatch.setattr(methods.draggan, "drag", spy)
    return seen


def _spy_ucl(monkeypatch):
    seen = []
    real = methods.usercontrollablelt.drag_tokens

    def spy(feat, starts, vectors, stops):
        seen.append((np.array(starts), np.array(vectors), np.array(stops)))
        return real(feat, starts, vectors, stops)

    monkeypatch.setattr(methods.usercontrollablelt, "drag_tokens", spy)
    return seen


SPIES = {"diffeditor": _spy_dragon, "dragondiffusion": _spy_dragon, "dragdiffusion": _spy_dragdiffusion,
         "draggan": _spy_draggan, "usercontrollablelt": _spy_ucl}


def _dragged(name: str, seen: list, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(handles, targets) that reached the drag step, in source pixels (x, y)."""
    (got,) = seen
    if name in ("diffeditor", "dragondiffusion"):
        task = got
        scale = np.array([task.work_hw[1] / 64, task.work_hw[0] / 64])
        assert len(task.energy_masks["cur"]) == len(task.energy_masks["tar"]) == len(task.source_points)
        return task.source_points.numpy() / scale, task.target_points.numpy() / scale
    if name == "dragdiffusion":
        handles, targets = got  # (row, col) on the 32 x 32 supervision grid, rounded as run_drag
        return handles.numpy()[:, ::-1] * 2, targets.numpy()[:, ::-1] * 2
    if name == "draggan":
        handles, targets = got  # (x, y) generator pixels (32 px tiny generator)
        return handles * 2, targets * 2
    starts, vectors, stops = got  # joint: one token per moving point, then the stop points (256 grid)
    return np.concatenate([starts, stops]) / 4, vectors / 4


@pytest.mark.parametrize("name", NAMES)
def test_17pt_drags_the_17_jaw_handles(name, monkeypatch):
    s = _face()
    seen = SPIES[name](monkeypatch)
    out = _make(name, point_subset="17pt").edit(s, 0)
    handles, targets = _dragged(name, seen, s)
    assert len(handles) == 17
    if name == "usercontrollablelt":
        # every jaw point moves here (by (-3, 2) source px = (-12, 8) grid px): 17 tokens, no stop point
        assert len(targets) == 17 and np.allclose(targets, [-3.0, 2.0])
        np.testing.assert_allclose(handles, s.source_points[:17], atol=0.5 / 4 + 1e-9)  # rint on the grid
    elif name == "dragdiffusion":
        np.testing.assert_allclose(handles, s.source_points[:17], atol=1.0 + 1e-9)  # rounded to 2-px cells
        np.testing.assert_allclose(targets, s.target_points[:17], atol=1.0 + 1e-9)
    else:  # exact (float32 working-size coordinates: rounding ~1e-6)
        np.testing.assert_allclose(handles, s.source_points[:17], rtol=0, atol=1e-4)
        np.testing.assert_allclose(targets, s.target_points[:17], rtol=0, atol=1e-4)
    assert out.info["point_subset"] == "17pt" and out.info["dragged_points"] == 17


@pytest.mark.parametrize("name", NAMES)
def test_all_is_the_behaviour_without_the_parameter(name, monkeypatch):
    """``all`` drags every point and gives the bit-identical edit of a run without the parameter;
    ``68pt`` selects the same 68 points in the same order, so it gives the same edit through the
    subset path (same kernels, same shapes: bit equality)."""
    import torch

    s = _face()
    seen = SPIES[name](monkeypatch)
    cls = METHODS.get(name)

    states = iter(range(3))

    def edit(m):
        # a different global torch state before each edit: an edit depends on its seed only
        # (DragDiffusion's LoRA initialisation, which peft draws from the global generator, included)
        torch.manual_seed(next(states))
        return m.edit(s, 0)

    base = edit(cls(cls.parse_params({"backbone": "tiny", **FAST[name]})))
    handles, _ = _dragged(name, seen, s)
    assert len(handles) == 68
    seen.clear()
    explicit = edit(_make(name, point_subset="all"))
    assert len(_dragged(name, seen, s)[0]) == 68
    seen.clear()
    full = edit(_make(name, point_subset="68pt"))
    np.testing.assert_array_equal(explicit.image, base.image)
    np.testing.assert_array_equal(full.image, base.image)
