"""Image decoding per protocol: a protocol that reproduces an official script decodes the images
its metrics see as the script does (``Image.open(p).convert("RGB")``: no EXIF rotation, alpha
dropped), flags every image where that differs from the harness default, and leaves the
method's input at the default."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import methods  # noqa: F401
from harness.data import open_dataset
from harness.images import DECODE_DIFFERS, decode_options, load_image
from harness.metrics.base import Metric
from harness.registry import METRICS
from harness.runner import run_job
from harness.types import ScoreValue

from . import _test_methods_registry  # noqa: F401  (registers the set metric test_set_mean)
from .conftest import job_config, textured
from .test_data_magicbrush import MagicBrushBuilder
from .test_data_pie_bench import PieBuilder

SCRIPT = {"exif_orientation": False, "alpha": "drop"}  # PIE-Bench's and MagicBrush's scripts
SEEN: dict[str, dict[str, np.ndarray | None]] = {}  # sample id -> the images the metric was given


@METRICS.register("test_decode_capture")
class Capture(Metric):
    """Records the source and target it is given; the value is the source's mean."""

    def score_batch(self, items):
        for it in items:
            SEEN[it.sample.id] = {"source": it.sample.source.copy(),
                                  "target": None if it.sample.target is None else it.sample.target.copy()}
        return [[ScoreValue(self.name, "all", float(it.sample.source.mean()))] for it in items]


# -- test images -----------------------------------------------------------------------------------
def exif_rotated_jpeg(path, h: int, w: int, orientation: int = 6, seed: int = 0) -> np.ndarray:
    """A JPEG stored h x w with an EXIF orientation tag; returns the pixels as stored."""
    img = Image.fromarray(textured(h, w, seed))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as im:
        assert im.getexif().get(0x0112) == orientation
        return np.asarray(im.convert("RGB"))


def rgba_png(path, h: int, w: int, under_transparent=None, seed: int = 0) -> np.ndarray:
    """An RGBA PNG: left third transparent (alpha 0), middle half-transparent (128), right
    opaque; the colour under the transparent part is the texture, or ``under_transparent``."""
    rgb = textured(h, w, seed)
    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, : w // 3] = 0
    alpha[:, w // 3 : 2 * w // 3] = 128
    if under_transparent is not None:
        rgb[alpha < 255] = under_transparent
        alpha[:, w // 3 : 2 * w // 3] = 0  # fully transparent there too: over white = white
    rgba = np.dstack([rgb, alpha])
    Image.fromarray(rgba, mode="RGBA").save(path)
    return rgba


def over_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha compositing over white, from the formula: c * a + 255 * (1 - a)."""
    a = rgba[..., 3:].astype(np.float64) / 255.0
    return rgba[..., :3] * a + 255.0 * (1.0 - a)


def pil_convert(path) -> np.ndarray:
    """What the official scripts read: ``Image.open(p).convert("RGB")``."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# -- load_image ---------------------------------------------------------------------------------------
def test_script_decoding_is_plain_pil_convert_and_default_is_oriented_and_composited(tmp_path):
    jpg, png = tmp_path / "rot.jpg", tmp_path / "rgba.png"
    stored = exif_rotated_jpeg(jpg, 40, 56)
    rgba = rgba_png(png, 30, 36)

    differs: dict = {}
    notes: list = []
    got = load_image(jpg, "s", "source", notes, differs=differs, **SCRIPT)
    # the same Pillow decoder and conversion as the script: the same bytes
    np.testing.assert_array_equal(got, pil_convert(jpg))
    assert got.shape == (40, 56, 3) and differs == {"source": ["exif_ignored"]}
    assert any("not applied" in n for n in notes)
    default = load_image(jpg, "s", "source")
    # orientation 6 = displayed rotated 90 degrees clockwise (EXIF 2.32, tag 0x0112)
    np.testing.assert_array_equal(default, np.rot90(stored, k=-1))

    differs = {}
    got = load_image(png, "s", "target", differs=differs, **SCRIPT)
    np.testing.assert_array_equal(got, pil_convert(png))
    np.testing.assert_array_equal(got, rgba[..., :3])  # alpha ignored, colour kept
    assert differs == {"target": ["alpha_dropped"]}
    default = load_image(png, "s", "target")
    # Pillow blends in integers: within one grey level of the real-valued formula
    assert np.abs(default.astype(np.float64) - over_white(rgba)).max() <= 1.0
    opaque = rgba[..., 3] == 255
    np.testing.assert_array_equal(default[opaque], rgba[..., :3][opaque])
    np.testing.assert_array_equal(default[rgba[..., 3] == 0], 255)


def test_only_images_whose_pixels_change_are_flagged(tmp_path):
    plain, white = tmp_path / "plain.png", tmp_path / "white.png"
    Image.fromarray(textured(20, 24, 3)).save(plain)
    rgba_png(white, 20, 24, under_transparent=255)  # transparent pixels are white already
    upright = tmp_path / "upright.jpg"
    exif_rotated_jpeg(upright, 20, 24, orientation=1)
    for p in (plain, white, upright):
        differs: dict = {}
        got = load_image(p, "s", "source", differs=differs, **SCRIPT)
        assert differs == {}, p.name
        np.testing.assert_array_equal(got, load_image(p, "s", "source"))


def test_decode_options_are_checked():
    assert decode_options(None) == {"exif_orientation": True, "alpha": "white"}
    assert decode_options({"alpha": "drop"}) == {"exif_orientation": True, "alpha": "drop"}
    with pytest.raises(ValueError, match="unknown key"):
        decode_options({"gamma": 2.2})
    with pytest.raises(ValueError, match="alpha must be one of white, drop"):
        decode_options({"alpha": "black"})
    with pytest.raises(ValueError, match="true or false"):
        decode_options({"exif_orientation": "no"})
    with pytest.raises(ValueError, match="must be a mapping"):
        decode_options("drop")


# -- the loaders ---------------------------------------------------------------------------------------
def test_pie_bench_and_magicbrush_loaders_decode_as_asked(tmp_path):
    pb = PieBuilder(tmp_path / "pie" / "data")
    entry = pb.add("000000000001")
    jpg = pb.root / "annotation_images" / entry["image_path"]
    stored = exif_rotated_jpeg(jpg, 512, 512, seed=5)  # 512 x 512: PIE-Bench's size either way
    ds = open_dataset(pb.config())
    (ref,) = ds.refs()
    script = ds.load(ref, decode=SCRIPT)
    np.testing.assert_array_equal(script.source, pil_convert(jpg))
    assert script.meta[DECODE_DIFFERS] == {"source": ["exif_ignored"]}
    default = ds.load(ref)
    np.testing.assert_array_equal(default.source, np.rot90(stored, k=-1))
    assert DECODE_DIFFERS not in default.meta

    mbb = MagicBrushBuilder(tmp_path / "mb" / "test")
    mbb.session("101", 1, mask_style="white")
    out = mbb.root / "images" / "101" / "101-output1.png"
    rgba = rgba_png(out, 40, 56, seed=7)
    ds = open_dataset(mbb.config())
    (ref,) = ds.refs()
    script = ds.load(ref, decode=SCRIPT)
    np.testing.assert_array_equal(script.target, pil_convert(out))
    assert script.meta[DECODE_DIFFERS] == {"target": ["alpha_dropped"]}
    default = ds.load(ref)
    assert np.abs(default.target.astype(np.float64) - over_white(rgba)).max() <= 1.0  # Pillow's integer blend
    np.testing.assert_array_equal(script.source, default.source)  # an RGB PNG: the same either way


# -- through the runner --------------------------------------------------------------------------------
@pytest.fixture
def oriented_set(builder):
    src = builder.root / "images" / "rot.jpg"
    exif_rotated_jpeg(src, 32, 32, seed=1)  # square: the same shape either way
    tgt = builder.root / "images" / "rgba.png"
    rgba_png(tgt, 32, 32, seed=2)
    builder.add(id="odd", source="images/rot.jpg", target="images/rgba.png")
    builder.add(id="plain", source=builder.image("images/plain.png", textured(32, 32, 3)),
                target=builder.image("images/plain_t.png", textured(32, 32, 4)))
    return builder


def _protocol(decode=None) -> dict:
    p = {"protocol": "capture", "regions": ["all"],
         "items": {"cap": {"metric": "test_decode_capture"}, "setmean": {"metric": "test_set_mean"}}}
    if decode is not None:
        p["decode"] = decode
    return p


def test_the_metrics_see_the_protocols_decoding_the_method_the_default(oriented_set, tmp_path):
    from harness.cache import EditStore

    b = oriented_set
    root = b.root / "images"
    shared = str(tmp_path / "cache")
    SEEN.clear()
    default = run_job(job_config(b.config(), tmp_path / "res", metrics=_protocol(), run_name="default",
                                 cache_dir=shared))
    np.testing.assert_array_equal(SEEN["odd"]["source"], np.rot90(pil_convert(root / "rot.jpg"), k=-1))
    assert np.abs(SEEN["odd"]["target"] - over_white(np.asarray(Image.open(root / "rgba.png")))).max() <= 1.0
    scores = pd.read_parquet(default.job_dir / "scores.parquet").set_index("sample_id")
    assert scores.flag.isna().all() and len(scores.loc["__set__"]) == 2

    SEEN.clear()
    script = run_job(job_config(b.config(), tmp_path / "res", metrics=_protocol(SCRIPT), run_name="script",
                                cache_dir=shared))
    assert script.computed == 0  # the same edits: the method's input does not depend on the protocol
    assert script.scored == 2  # other pixels, other scores: not taken from the default's cache
    np.testing.assert_array_equal(SEEN["odd"]["source"], pil_convert(root / "rot.jpg"))
    np.testing.assert_array_equal(SEEN["odd"]["target"], pil_convert(root / "rgba.png"))
    np.testing.assert_array_equal(SEEN["plain"]["source"], pil_convert(root / "plain.png"))
    scores = pd.read_parquet(script.job_dir / "scores.parquet").set_index("sample_id")
    assert scores.loc["odd", "flag"] == "decode:alpha_dropped:target,decode:exif_ignored:source"
    assert pd.isna(scores.loc["plain", "flag"])
    # a set metric over both: the set's rows carry what differed in any of its images
    assert (scores.loc["__set__", "flag"] == "decode:alpha_dropped:target,decode:exif_ignored:source").all()
    assert scores.loc["odd", "value"] == pytest.approx(pil_convert(root / "rot.jpg").mean())

    # the edit (identity) was made from the default decoding: EXIF orientation applied
    edits = pd.read_parquet(script.job_dir / "edits.parquet").set_index("sample_id")
    rec = EditStore(shared).get(edits.loc["odd", "edit_key"])
    np.testing.assert_array_equal(rec.image(), np.rot90(pil_convert(root / "rot.jpg"), k=-1))

    # a rerun takes the flagged scores from the cache, flags included
    SEEN.clear()
    again = run_job(job_config(b.config(), tmp_path / "res", metrics=_protocol(SCRIPT), run_name="script",
                               cache_dir=shared))
    assert again.scored == 0 and SEEN == {}
    assert (pd.read_parquet(again.job_dir / "scores.parquet").set_index("sample_id").loc["odd", "flag"]
            == "decode:alpha_dropped:target,decode:exif_ignored:source")


def test_a_mask_follows_its_images_orientation(builder):
    """Masks are read with the same EXIF rule as their image, so the two still line up."""
    from .conftest import disc_mask

    exif_rotated_jpeg(builder.root / "images" / "tall.jpg", 24, 40, seed=3)  # stored 24 x 40
    stored_mask = disc_mask(24, 40, 8, 30, 5)  # off-centre: a rotation moves it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored_mask.astype(np.uint8) * 255).save(builder.root / "masks" / "tall.png", exif=exif)
    builder.add(id="tall", source="images/tall.jpg", mask="masks/tall.png")
    ds = open_dataset(builder.config())
    (ref,) = ds.refs()
    script, default = ds.load(ref, decode=SCRIPT), ds.load(ref)
    np.testing.assert_array_equal(script.mask, stored_mask)
    np.testing.assert_array_equal(default.mask, np.rot90(stored_mask, k=-1))
    assert script.source.shape[:2] == script.mask.shape and default.source.shape[:2] == default.mask.shape
