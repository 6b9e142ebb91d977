"""The classical methods on the embedded real photographs, scored with the default protocol."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.color import rgb2hsv

import methods  # noqa: F401
from harness.cache import EditStore
from harness.runner import run_job

from .conftest import REPO, job_config

SAMPLE = {"name": "sample", "format": "generic", "root": str(REPO / "datasets" / "sample")}


def _default_protocol():
    import yaml

    return yaml.safe_load((REPO / "conf" / "metrics" / "default.yaml").read_text())


@pytest.fixture(scope="module")
def identity_scores(tmp_path_factory):
    ids = ["astronaut_smile", "grace_hopper_shift_right", "coffee_remove_spoon", "rocket_move_left"]
    cfg = job_config({**SAMPLE, "ids": ids}, tmp_path_factory.mktemp("id"), metrics=_default_protocol())
    out = run_job(cfg)
    assert out.counts["ok"] == len(ids)
    return pd.read_parquet(out.job_dir / "scores.parquet")


def test_identity_is_perfect_on_every_image_metric(identity_scores):
    s = identity_scores
    for metric in ("l1", "l2"):  # differences of equal uint8 images: exactly 0
        vals = s[s.metric == metric]
        assert len(vals) == 4 * 3 and (vals.value == 0).all(), metric
    for metric in ("lpips_alex", "lpips_vgg"):
        vals = s[s.metric == metric]
        # Equal images through the same network: 0, up to float32 accumulation order where the
        # reference's features come from another batch (the in-process feature cache, a GPU
        # batch): relative feature error ~1e-6, squared in LPIPS, i.e. ~1e-12; 1e-9 bounds it.
        assert len(vals) == 4 * 3 and vals.value.notna().all() and (vals.value.abs() <= 1e-9).all(), metric
    psnr = s[s.metric == "psnr"]
    assert len(psnr) == 4 * 3 and np.isposinf(psnr.value).all() and (psnr.flag == "identical").all()
    # SSIM runs in float32 (10x faster than float64): identical images give 1 to ~1e-6.
    ssim = s[s.metric == "ssim"].value
    assert len(ssim) == 4 * 3 and np.allclose(ssim, 1.0, atol=1e-5)
    assert s.weights[s.metric == "lpips_vgg"].iloc[0].startswith("LPIPS v0.1 vgg")


def test_identity_landmark_mse_equals_the_no_edit_distance(identity_scores):
    s = identity_scores
    lm = s[s.metric == "landmark_mse"].set_index(["sample_id", "region"]).value
    ref = s[s.metric == "landmark_mse_noedit"].set_index(["sample_id", "region"]).value
    assert set(lm.index.get_level_values(0)) == {"astronaut_smile", "grace_hopper_shift_right"}
    assert len(lm) == 2 * 2 and lm.notna().all()  # two faces x the 68- and 17-point settings
    pd.testing.assert_series_equal(lm, ref)
    assert ref[("grace_hopper_shift_right", "68pt")] == pytest.approx(144.0)  # a 12 px shift
    assert ref[("astronaut_smile", "17pt")] == 0  # the smile leaves the jaw alone


def test_inpainting_keeps_unedited_region_byte_identical(tmp_path):
    cfg = job_config({**SAMPLE, "ids": ["coffee_remove_spoon", "grace_hopper_remove_glasses"]}, tmp_path,
                     method={"name": "inpaint"})
    out = run_job(cfg)
    s = pd.read_parquet(out.job_dir / "scores.parquet").set_index(["sample_id", "metric", "region"]).value
    for sid in ("coffee_remove_spoon", "grace_hopper_remove_glasses"):
        assert s[(sid, "l1", "unedited")] == 0.0
        assert s[(sid, "l1", "edited")] > 0.02


def test_recolour_moves_hue_inside_the_mask_only(tmp_path):
    from harness.data import GenericDataset

    sid = "coffee_cup_blue"
    out = run_job(job_config({**SAMPLE, "ids": [sid]}, tmp_path, method={"name": "recolor", "strength": 1.0}))
    e = pd.read_parquet(out.job_dir / "edits.parquet")
    edit = EditStore(tmp_path / "test" / "edits").get(e.edit_key[0]).image()
    ds = GenericDataset(REPO / "datasets" / "sample")
    sample = ds.load(next(r for r in ds.refs() if r.id == sid))
    m = sample.mask
    assert np.array_equal(edit[~m], sample.source[~m])
    hue = rgb2hsv(edit)[..., 0][m]
    blue = 2 / 3
    dist = lambda h: np.minimum(np.abs(h - blue), 1 - np.abs(h - blue))  # noqa: E731
    src_hue = rgb2hsv(sample.source)[..., 0][m]
    assert np.median(dist(hue)) < 0.08 < np.median(dist(src_hue))
