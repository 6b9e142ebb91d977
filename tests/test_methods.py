"""Tests of the classical reference methods in methods/ (CPU, OpenCV / scikit-image)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import ndimage
from skimage import color as skcolor

import methods  # noqa: F401  (registers the methods)
from harness.method import ParamError
from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SkipSample

ROOT = Path(__file__).resolve().parents[1]
DISC_RGB = (200, 40, 40)


# -- synthetic samples ---------------------------------------------------------------------------
def background(h: int, w: int) -> np.ndarray:
    """Smooth colour gradient plus fixed-seed texture: inpainting has something to work with."""
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    rng = np.random.default_rng(1234)
    base = np.stack([60 + 100 * xx / w, 90 + 80 * yy / h, 150 - 60 * (xx + yy) / (w + h)], -1)
    base += 8 * np.sin(xx / 3.0)[..., None] + rng.normal(0, 4, (h, w, 1))
    return np.clip(np.rint(base), 0, 255).astype(np.uint8)


def disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def disc_image(h=80, w=96, cx=34.0, cy=38.0, r=12.0, rgb=DISC_RGB):
    img = background(h, w)
    m = disc(h, w, cx, cy, r)
    img[m] = rgb
    return img, m


def make_sample(sid="s0", h=80, w=96, cx=34.0, cy=38.0, r=12.0, grow=2, **kw) -> Sample:
    img, obj = disc_image(h, w, cx, cy, r)
    mask = disc(h, w, cx, cy, r + grow)  # annotation masks are a little larger than the object
    return Sample(id=sid, dataset="synthetic", source=img, mask=mask, **kw)


def colour_centroid(img: np.ndarray, rgb=DISC_RGB, tol=40) -> np.ndarray:
    close = np.abs(img.astype(int) - np.array(rgb)).max(-1) <= tol
    ys, xs = np.nonzero(close)
    assert xs.size > 20, "disc colour not found"
    return np.array([xs.mean(), ys.mean()])


def method(name: str, **params):
    return METHODS.get(name).from_config(params)


def run(name: str, sample: Sample, **params) -> MethodOutput:
    m = method(name, **params)
    assert m.cannot_handle(sample) is None
    out = m.edit(sample, seed=0)
    assert out.image.dtype == np.uint8 and out.image.shape == sample.source.shape
    if out.mask is not None:
        assert out.mask.dtype == bool and out.mask.shape == sample.source.shape[:2]
    return out


def outside_changed(out: MethodOutput, source: np.ndarray) -> int:
    return int((out.image != source).any(-1)[~out.mask].sum())


def hue_distance(h: np.ndarray, target: float) -> np.ndarray:
    d = np.abs(h - target) % 1.0
    return np.minimum(d, 1.0 - d)


# -- registry and parameters ---------------------------------------------------------------------
def test_registry_names():
    assert {"identity", "inpaint", "recolor", "paste", "move"} <= set(METHODS.names())
    for name in ["identity", "inpaint", "recolor", "paste", "move"]:
        cls = METHODS.get(name)
        assert cls.name == name and cls.version == "1"


METHOD_YAMLS = sorted((ROOT / "conf" / "method").glob("*.yaml"))


def test_every_method_has_a_yaml():
    names = {p.stem for p in METHOD_YAMLS}
    # Methods registered by the tests themselves (tests/_test_methods_registry.py) have no YAML.
    shipped = [n for n in METHODS.names() if METHODS.get(n).__module__.startswith("methods.")]
    missing = [n for n in shipped if n not in names]
    assert not missing, f"registered methods without conf/method/<name>.yaml: {missing}"


@pytest.mark.parametrize("path", METHOD_YAMLS, ids=[p.stem for p in METHOD_YAMLS])
def test_yaml_matches_params(path):
    cfg = yaml.safe_load(path.read_text()) or {}
    assert cfg.get("name") == path.stem, path
    assert path.stem in METHODS, f"conf/method/{path.name}: no method '{path.stem}' is registered by methods/"
    cls = METHODS.get(path.stem)
    # a tuple default (immutable, as a dataclass default must be) is a list in YAML
    fields = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
              for f in dataclasses.fields(cls.Params)}
    values = {k: v for k, v in cfg.items() if k != "name"}
    assert values == fields, f"{path.name}: {values} != Params {fields}"
    try:
        defaults = cls.Params()
    except ValueError:  # a required parameter (e.g. folder's path): the YAML must not hide it
        with pytest.raises(ParamError):
            cls.parse_params(values)
    else:
        assert cls.parse_params(values) == defaults  # the YAML values parse back to the defaults


def test_unknown_parameter_lists_real_ones():
    with pytest.raises(ParamError) as e:
        METHODS.get("inpaint").parse_params({"bogus": 1})
    msg = str(e.value)
    assert "bogus" in msg and "algorithm" in msg and "radius" in msg and "dilate" in msg
    with pytest.raises(ParamError, match="none"):
        METHODS.get("identity").parse_params({"bogus": 1})


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("recolor", {"strength": 2.0}, "strength"),
        ("recolor", {"strength": -0.1}, "strength"),
        ("recolor", {"space": "rgb"}, "space"),
        ("inpaint", {"algorithm": "x"}, "algorithm"),
        ("inpaint", {"radius": 0}, "radius"),
        ("inpaint", {"dilate": -1}, "dilate"),
        ("inpaint", {"radius": 2.5}, "radius"),
        ("paste", {"mode": "fancy"}, "mode"),
        ("move", {"blend": "x"}, "blend"),
        ("move", {"inpaint_radius": 0}, "inpaint_radius"),
        ("move", {"dx": "3"}, "dx"),
    ],
)
def test_bad_values_raise(name, params, match):
    with pytest.raises(ParamError, match=match):
        METHODS.get(name).parse_params(params)


def test_direct_construction_validates():
    with pytest.raises(ValueError, match=r"strength.*\[0, 1\]"):
        METHODS.get("recolor").Params(strength=2.0)
    with pytest.raises(ValueError, match="algorithm"):
        METHODS.get("inpaint").Params(algorithm="x")


def test_methods_do_not_import_torch():
    code = "import sys, methods; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -- identity ------------------------------------------------------------------------------------
def test_identity_returns_equal_copy():
    s = make_sample()
    out = run("identity", s)
    assert np.array_equal(out.image, s.source)
    assert out.image is not s.source and not np.shares_memory(out.image, s.source)


# -- inpaint -------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["telea", "ns"])
def test_inpaint_only_changes_inside_mask(algorithm):
    s = make_sample(category="remove")
    out = run("inpaint", s, algorithm=algorithm)
    assert np.array_equal(out.mask, s.mask)
    assert outside_changed(out, s.source) == 0
    # unedited L1 is exactly 0
    assert np.abs(out.image.astype(int) - s.source)[~out.mask].sum() == 0
    # the red disc is gone: the inside now looks like the background
    inside = out.image[s.mask].astype(int)
    assert (inside != s.source[s.mask]).any(-1).mean() > 0.9
    assert np.abs(inside - np.array(DISC_RGB)).max(-1).min() > 40


def test_inpaint_algorithms_differ_and_dilate():
    s = make_sample(category="remove")
    telea = run("inpaint", s, algorithm="telea").image
    ns = run("inpaint", s, algorithm="ns").image
    assert not np.array_equal(telea, ns)
    out = run("inpaint", s, dilate=3)
    assert out.mask.sum() > s.mask.sum() and (out.mask >= s.mask).all()
    assert outside_changed(out, s.source) == 0


def test_inpaint_empty_mask_skips():
    s = make_sample(sid="empty-1", category="remove")
    s.mask = np.zeros_like(s.mask)
    with pytest.raises(SkipSample, match="empty-1"):
        method("inpaint").edit(s, 0)


def test_category_and_requires_checks():
    s = make_sample(sid="mv-7", category="move")
    reason = method("inpaint").cannot_handle(s)
    assert reason and "mv-7" in reason and "move" in reason
    no_ref = make_sample(sid="pst-2", category="paste")
    reason = method("paste").cannot_handle(no_ref)
    assert reason and "pst-2" in reason and "reference" in reason
    no_mask = Sample(id="nm-1", dataset="synthetic", source=no_ref.source, category="remove")
    reason = method("inpaint").cannot_handle(no_mask)
    assert reason and "nm-1" in reason and "mask" in reason


# -- recolor -------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["lab", "hue"])
@pytest.mark.parametrize("word", ["blue", "green", "yellow", "purple"])
def test_recolor_moves_hue_toward_named_colour(space, word):
    from methods.recolor import COLOURS

    target_hue = skcolor.rgb2hsv(np.array(COLOURS[word], float).reshape(1, 1, 3) / 255)[0, 0, 0]
    s = make_sample(category="change_color", source_caption="a red ball", target_caption=f"a {word.upper()} ball")
    obj = disc(*s.source.shape[:2], 34.0, 38.0, 12.0)
    before = hue_distance(skcolor.rgb2hsv(s.source[obj][None])[0, :, 0], target_hue).mean()
    default = run("recolor", s, space=space)
    assert default.info["colour"] == word
    assert outside_changed(default, s.source) == 0
    after = hue_distance(skcolor.rgb2hsv(default.image[obj][None])[0, :, 0], target_hue).mean()
    assert after < 0.5 * before  # strength 0.8: most of the way
    full = run("recolor", s, space=space, strength=1.0)
    assert hue_distance(skcolor.rgb2hsv(full.image[obj][None])[0, :, 0], target_hue).mean() < 0.03
    assert outside_changed(full, s.source) == 0


@pytest.mark.parametrize("space", ["lab", "hue"])
def test_recolor_strength_zero_is_exact(space):
    s = make_sample(category="change_color", target_caption="a blue ball")
    out = run("recolor", s, space=space, strength=0.0)
    assert np.array_equal(out.image, s.source)
    # Through the blend itself (strength > 0 skips the shortcut): a change of 1e-9 * 255 levels
    # rounds away, and the conversion's round-trip error cancels (the change is applied relative
    # to the round-tripped source), so the source comes back exactly.
    assert np.array_equal(run("recolor", s, space=space, strength=1e-9).image, s.source)


def _expected_recolour(pixel, word: str, space: str, strength: float) -> np.ndarray:
    """The recolour of one RGB uint8 pixel before rounding, restated from methods/recolor.py's
    docstring: Lab moves a*, b* by ``strength`` and L* by ``strength / 2`` of the way to the
    target's; hue moves H (the short way round) and S by ``strength``, or, for an achromatic
    target, V by ``strength / 2`` and S by ``strength``. The change is added to the source pixel.
    Lab via scikit-image on the single pixel; HSV via the standard library's colorsys."""
    import colorsys

    from methods.recolor import COLOURS

    p = np.asarray(pixel, np.float64) / 255
    t = np.asarray(COLOURS[word], np.float64) / 255
    if space == "lab":
        lab = skcolor.rgb2lab(p.reshape(1, 1, 3))[0, 0]
        tl = skcolor.rgb2lab(t.reshape(1, 1, 3))[0, 0]
        new = lab + strength * np.array([0.5, 1.0, 1.0]) * (tl - lab)
        moved = skcolor.lab2rgb(new.reshape(1, 1, 3))[0, 0] - skcolor.lab2rgb(lab.reshape(1, 1, 3))[0, 0]
    else:
        h, sat, v = colorsys.rgb_to_hsv(*p)
        th, ts, tv = colorsys.rgb_to_hsv(*t)
        if word in ("white", "black", "grey", "gray", "silver"):
            v2, h2 = v + 0.5 * strength * (tv - v), h
        else:
            dh = (th - h + 0.5) % 1.0 - 0.5
            v2, h2 = v, (h + strength * dh) % 1.0
        moved = np.subtract(colorsys.hsv_to_rgb(h2, sat + strength * (ts - sat), v2), colorsys.hsv_to_rgb(h, sat, v))
    return np.asarray(pixel, np.float64) + 255 * moved


@pytest.mark.parametrize("space", ["lab", "hue"])
@pytest.mark.parametrize("word", ["blue", "white"])
@pytest.mark.parametrize("strength", [0.02, 0.5])
def test_recolor_equals_its_formula_on_pixels(space, word, strength):
    s = make_sample(category="change_color", target_caption=f"a {word} ball")
    out = run("recolor", s, space=space, strength=strength).image
    ys, xs = np.nonzero(s.mask)
    checked = 0
    for y, x in zip(ys[::7], xs[::7]):  # every 7th masked pixel: disc and background ring
        want = _expected_recolour(s.source[y, x], word, space, strength)
        # Only pixels whose exact value is clear of a rounding boundary and of the clip: there
        # the float error of another evaluation order (~1e-12 levels) cannot change the result.
        if np.abs(want % 1.0 - 0.5).min() < 0.01 or want.min() < 0 or want.max() > 255:
            continue
        assert np.array_equal(out[y, x], np.rint(want).astype(np.uint8)), (y, x, out[y, x], want)
        checked += 1
    assert checked >= 0.9 * len(ys[::7]) and checked > 50, checked


@pytest.mark.parametrize("space", ["lab", "hue"])
@pytest.mark.parametrize("word", ["blue", "white", "yellow"])
def test_recolor_small_strength_is_a_proportionally_small_change(space, word):
    """A tiny strength runs the real blend (not the strength-0 shortcut) and changes the region
    in proportion: the change at 2s is twice the change at s, and bounded by s."""
    s = make_sample(category="change_color", target_caption=f"a {word} ball")
    delta = {st: run("recolor", s, space=space, strength=st).image.astype(int) - s.source for st in (0.01, 0.02)}
    for st, d in delta.items():
        assert not d[~s.mask].any()
        assert (d[s.mask] != 0).any(-1).mean() > 0.95  # nearly every masked pixel moved
        # |d rgb / d strength| <= 4 (in [0, 1] units) here. Hue: H moves by at most s / 2 of a
        # turn, which moves RGB by at most 6 x that x chroma <= 3 s, and S moves it by at most s;
        # Lab: measured < 1 on these colours. Plus half a level for rounding.
        assert np.abs(d).max() <= 4 * 255 * st + 0.5, (st, np.abs(d).max())
    # Linear in strength at small strength: rounding each result to a level allows 1.5, the
    # curvature of the conversion (HSV's sectors) half a level more at s = 0.02.
    assert np.abs(delta[0.02] - 2 * delta[0.01])[s.mask].max() <= 2


def test_recolor_white_and_black():
    s = make_sample(category="change_color", target_caption="a white ball")
    obj = disc(*s.source.shape[:2], 34.0, 38.0, 12.0)
    white = run("recolor", s, strength=1.0).image[obj].astype(int)
    s.target_caption = "a black ball"
    black = run("recolor", s, strength=1.0).image[obj].astype(int)
    assert white.mean() > s.source[obj].mean() + 40 and black.mean() < s.source[obj].mean() - 20
    assert np.ptp(white.mean(0)) < 25  # nearly grey: chroma removed


def test_recolor_caption_without_colour_skipped():
    s = make_sample(sid="cc-42", category="change_color", target_caption="a redwood forest, shredded")
    m = method("recolor")
    reason = m.cannot_handle(s)
    assert reason and "cc-42" in reason and "redwood forest" in reason
    with pytest.raises(SkipSample, match="cc-42"):
        m.edit(s, 0)


def test_recolor_prefers_colour_new_to_target():
    s = make_sample(category="change_color", source_caption="a red ball on a green lawn",
                    target_caption="a green lawn with a purple ball")
    assert run("recolor", s).info["colour"] == "purple"


def test_recolor_material_needs_colour_word():
    ok = make_sample(category="change_material", target_caption="a Golden statue")
    assert run("recolor", ok).info["colour"] == "golden"
    bad = make_sample(sid="mat-3", category="change_material", target_caption="a wooden statue")
    assert "mat-3" in method("recolor").cannot_handle(bad)
    other = make_sample(category="remove", target_caption="a blue ball")
    assert "remove" in method("recolor").cannot_handle(other)


# -- paste ---------------------------------------------------------------------------------------
def reference_disc(rgb=(30, 60, 220)):
    ref = np.full((40, 60, 3), 230, np.uint8)
    ref_mask = disc(40, 60, 30.0, 20.0, 15.0)
    yy, xx = np.mgrid[:40, :60]
    ref[ref_mask] = rgb
    ref[ref_mask & (xx % 6 < 3)] = (60, 90, 250)  # stripes: gradients to clone
    return ref, ref_mask


@pytest.mark.parametrize("mode", ["normal", "mixed"])
def test_paste_changes_only_inside_mask(mode):
    ref, ref_mask = reference_disc()
    s = make_sample(category="paste", reference=ref, reference_mask=ref_mask)
    out = run("paste", s, mode=mode)
    assert out.mask.any() and (out.mask <= s.mask).all()
    assert outside_changed(out, s.source) == 0
    changed = (out.image != s.source).any(-1)
    assert changed[out.mask].mean() > 0.5
    # Poisson cloning carries the reference's gradients (its stripes), not its flat colour:
    # the flat red disc is now striped along x.
    inner = disc(*s.source.shape[:2], 34.0, 38.0, 8.0)
    gx_out = np.abs(np.diff(out.image.astype(int), axis=1)).sum(-1)[inner[:, 1:]].mean()
    gx_src = np.abs(np.diff(s.source.astype(int), axis=1)).sum(-1)[inner[:, 1:]].mean()
    assert gx_out > gx_src + 30


def test_paste_places_object_at_mask_centre():
    ref, ref_mask = reference_disc()
    s = make_sample(cx=60.0, cy=45.0, category="paste", reference=ref, reference_mask=ref_mask)
    out = run("paste", s)
    ys, xs = np.nonzero(out.mask)
    assert abs(xs.mean() - 60) <= 1.5 and abs(ys.mean() - 45) <= 1.5
    assert out.info["placed_box_xywh"][2] == out.info["placed_box_xywh"][3]  # aspect kept (a disc)


def test_paste_whole_reference_and_border_mask():
    ref, _ = reference_disc()
    s = make_sample(cx=3.0, cy=2.0, r=14.0, category="paste", reference=ref)  # mask touches the corner
    out = run("paste", s)
    assert out.mask.any() and outside_changed(out, s.source) == 0


def test_paste_empty_reference_mask_skips():
    ref, ref_mask = reference_disc()
    s = make_sample(sid="p-0", category="paste", reference=ref, reference_mask=np.zeros_like(ref_mask))
    with pytest.raises(SkipSample, match="p-0"):
        method("paste").edit(s, 0)


# -- move ----------------------------------------------------------------------------------------
def checker_sample(**kw) -> Sample:
    """A disc with a red/white checkerboard: Poisson cloning keeps its gradients, so it stays visible."""
    s = make_sample(category="move", **kw)
    h, w = s.source.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    obj = disc(h, w, 34.0, 38.0, 12.0)
    s.source[obj & ((xx // 3 + yy // 3) % 2 == 0)] = (240, 240, 240)
    return s


def texture_centroid(img: np.ndarray) -> np.ndarray:
    """Centroid of the strongly textured pixels (local grey std over 5x5 > 40)."""
    g = img.astype(np.float64).mean(-1)
    var = ndimage.uniform_filter(g * g, 5) - ndimage.uniform_filter(g, 5) ** 2
    ys, xs = np.nonzero(var > 40.0**2)
    assert xs.size > 20, "textured object not found"
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("blend", ["seamless", "copy"])
def test_move_with_drag_points_shifts_centroid(blend):
    s = checker_sample(point_layout="drag",
                       source_points=np.array([[34.0, 38.0], [30.0, 40.0]]),
                       target_points=np.array([[64.0, 48.0], [60.0, 50.0]]))
    before = texture_centroid(s.source)
    out = run("move", s, blend=blend)
    assert (out.info["dx"], out.info["dy"]) == (30, 10)
    after = texture_centroid(out.image)
    assert np.allclose(after - before, [30, 10], atol=2.0), after - before
    dest = disc(*s.source.shape[:2], 64.0, 48.0, 14.0)
    assert np.array_equal(out.mask, s.mask | dest)
    assert outside_changed(out, s.source) == 0
    # the hole left behind no longer shows the disc
    hole_only = s.mask & ~dest
    assert np.abs(out.image[hole_only].astype(int) - np.array(DISC_RGB)).max(-1).min() > 40
    if blend == "copy":
        assert np.array_equal(out.image[dest], s.source[s.mask])
        assert np.allclose(colour_centroid(out.image) - colour_centroid(s.source), [30, 10], atol=1.0)


def test_move_params_offset_and_clipping():
    s = checker_sample()
    out = run("move", s, dx=-30, dy=0)  # object partly leaves the image on the left
    assert out.info["offset_from"] == "params" and out.info["clipped_pixels"] > 0
    assert texture_centroid(out.image)[0] < 10


def test_move_zero_offset_skipped():
    s = make_sample(sid="mv-0", category="move")
    reason = method("move").cannot_handle(s)
    assert reason and "mv-0" in reason and "dx" in reason
    with pytest.raises(SkipSample, match="mv-0"):
        method("move").edit(s, 0)


# -- all methods ---------------------------------------------------------------------------------
def full_sample(h: int, w: int, category: str, sid="odd") -> Sample:
    ref, ref_mask = reference_disc()
    return make_sample(
        sid=sid, h=h, w=w, cx=w / 2.0, cy=h / 2.0, r=min(h, w) / 5.0, category=category,
        source_caption="a red ball", target_caption="a blue ball", reference=ref, reference_mask=ref_mask,
        point_layout="drag", source_points=np.array([[w / 2.0, h / 2.0]]),
        target_points=np.array([[w / 2.0 + 7, h / 2.0 - 5]]),
    )


CATEGORY_FOR = {"identity": "add", "inpaint": "remove", "recolor": "change_color", "paste": "paste", "move": "move"}


@pytest.mark.parametrize("name", sorted(CATEGORY_FOR))
@pytest.mark.parametrize("h, w", [(63, 101), (101, 63), (17, 23)])
def test_odd_sizes_and_determinism(name, h, w):
    s = full_sample(h, w, CATEGORY_FOR[name])
    out = run(name, s)
    again = run(name, s)
    assert np.array_equal(out.image, again.image)  # the same computation on the same input
    if name == "identity":
        assert out.mask is None and np.array_equal(out.image, s.source)
    else:
        assert outside_changed(out, s.source) == 0
        # a real change over the region the method reports, not a stray pixel: most of its
        # pixels changed (Poisson paste on the smallest size changes ~79%, by ~1 level on average)
        diff = np.abs(out.image.astype(int) - s.source)[out.mask]
        assert out.mask.sum() >= 50 and (diff > 0).any(-1).mean() > 0.6 and diff.mean() > 0.5
    import json
    json.dumps(out.info)  # info is JSON-able
