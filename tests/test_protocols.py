"""Protocol configs (conf/metrics/*.yaml): each builds, pins what its paper pins, and reproduces the
official scripts' formulas on the same inputs (golden tests).

The official formulas are re-run here as their scripts call them (torchmetrics classes, torch.nn
losses, PIL resizes), on the same images; where a model is needed and no real weights exist
offline, the same random weights are given to both sides.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from harness.metrics import ScoringItem
from harness.scoring import MetricSuite
from harness.types import Sample

from .conftest import textured

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = sorted(p.stem for p in (REPO / "conf" / "metrics").glob("*.yaml"))
PAPER_PROTOCOLS = ("magicbrush", "pie_bench", "zone", "partedit", "cpam", "diffeditor")


def load_protocol(name: str, **overrides) -> dict:
    cfg = yaml.safe_load((REPO / "conf" / "metrics" / f"{name}.yaml").read_text())
    for item, params in overrides.items():
        cfg["items"][item] = {**cfg["items"][item], **params}
    return cfg


def suite_of(name: str, keep: tuple[str, ...] | None = None, **overrides) -> MetricSuite:
    cfg = load_protocol(name, **overrides)
    if keep is not None:
        cfg["items"] = {k: v for k, v in cfg["items"].items() if k in keep}
    return MetricSuite(cfg)


def run(suite: MetricSuite, sample: Sample, edit: np.ndarray) -> dict[tuple[str, str], tuple[float, str | None]]:
    item = ScoringItem(sample, edit)
    out = {}
    for e in suite.edit_entries:
        (rows,) = suite.score(e, [item])
        out.update({(r.metric, r.region): (r.value, r.flag) for r in rows})
    return out


def test_every_paper_protocol_exists_and_builds():
    assert set(PAPER_PROTOCOLS) | {"default"} <= set(PROTOCOLS)
    for name in PROTOCOLS:
        suite = MetricSuite(load_protocol(name))
        assert suite.protocol == name
        for e in suite.entries:
            # every metric names its weights and region rule, available or not
            d = suite.describe()[e.name]
            assert d["weights"] and d["region_rule"], (name, e.name)


def test_protocols_pin_their_papers_conventions():
    mb = load_protocol("magicbrush")
    assert mb["reference"] == "target" and mb["regions"] == ["all"]
    assert {"l1", "l2", "clip_i", "clip_t", "dino"} <= set(mb["items"])
    assert mb["items"]["clip_i"]["model"] == "ViT-B-32" and mb["items"]["clip_i"]["clamp"] == "none"
    assert mb["items"]["dino"]["model"] == "dino_vits16"
    # image_eval.py: Image.open(p).convert('RGB'), no exif_transpose; CLIP precision offered, fp32 by default
    assert mb["decode"] == {"exif_orientation": False, "alpha": "drop"} and mb["precision"] == "fp32"

    pie = load_protocol("pie_bench")
    assert pie["region_rule"] == "zero_fill" and pie["regions"] == ["unedited"]
    assert pie["items"]["lpips"]["net"] == "squeeze"
    assert {k: pie["items"][k].get("report_scale", 1) for k in ("structure_distance", "lpips", "mse", "ssim", "psnr")} == {
        "structure_distance": 1000, "lpips": 1000, "mse": 10000, "ssim": 100, "psnr": 1}
    clip = pie["items"]["clip_similarity"]
    assert (clip["model"], clip["scale"], clip["clamp"], clip["image_region"]) == ("ViT-L-14", 100, "per_image", ["all", "edited"])
    # evaluate.py's default list also has clip_similarity_source_image; torchmetrics <= 1.4.1's SSIM
    # border; bare Image.open; the bottom-right 512x512 crop of non-square outputs
    assert pie["items"]["clip_similarity_source"]["image_field"] == "source"
    assert pie["items"]["ssim"]["border"] == "exclude"
    assert pie["decode"] == {"exif_orientation": False, "alpha": "drop"}
    assert (pie["edit_crop"], pie["edit_crop_size"]) == ("bottom_right", 512)
    assert load_protocol("default")["items"]["ssim"]["border"] == "keep"

    zone = load_protocol("zone")
    assert zone["reference"] == "source" and zone["items"]["lpips"]["net"] and zone["items"]["clip_i"]["model"]

    pe = load_protocol("partedit")
    assert pe["items"]["alpha_clip"]["scale"] == 100 and pe["regions"] == ["unedited"]

    cpam = load_protocol("cpam")
    assert cpam["items"]["clipscore"]["clamp"] == "mean" and cpam["items"]["clipscore"]["scale"] == 100
    assert cpam["regions"] == ["unedited"]

    de = load_protocol("diffeditor")
    assert {"landmark_mse", "fid", "clip_t"} <= set(de["items"])


# --------------------------------------------------------------------------------------------
# report_scale
# --------------------------------------------------------------------------------------------
def test_report_scale_multiplies_values_names_itself_and_keys_the_cache():
    src, edit = textured(16, 16, 1), textured(16, 16, 2)
    sample = Sample(id="s", dataset="d", source=src)
    plain = MetricSuite({"protocol": "p", "regions": ["all"], "items": {"l2": {}}})
    scaled = MetricSuite({"protocol": "p", "regions": ["all"], "items": {"l2": {"report_scale": 10000}}})
    v1 = run(plain, sample, edit)[("l2", "all")][0]
    v2 = run(scaled, sample, edit)[("l2", "all")][0]
    assert v2 == pytest.approx(v1 * 10000, rel=1e-12)
    assert scaled.describe()["l2"]["region_rule"].endswith("; reported x10000")
    assert "reported" not in plain.describe()["l2"]["region_rule"]
    assert plain.entries[0].hash != scaled.entries[0].hash
    for bad in (0, -1, "x", None):
        with pytest.raises(ValueError, match="report_scale"):
            MetricSuite({"protocol": "p", "items": {"l2": {"report_scale": bad}}})


# --------------------------------------------------------------------------------------------
# PIE-Bench: zero-fill formulas as matrics_calculator.py calls torchmetrics
# --------------------------------------------------------------------------------------------
def _pie_bench_tensors(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None):
    """matrics_calculator.py: float32 /255, both images times the 3-channel region mask."""
    import torch

    p = pred.astype(np.float32) / 255
    g = gt.astype(np.float32) / 255
    if region is not None:
        w = np.repeat(region.astype(np.float32)[..., None], 3, axis=2)
        p, g = p * w, g * w
    return torch.tensor(p).permute(2, 0, 1), torch.tensor(g).permute(2, 0, 1)


def test_pie_bench_background_metrics_equal_the_official_calls():
    from skimage.metrics import structural_similarity
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.regression import MeanSquaredError

    from harness.data.pie_bench import decode_rle_mask

    h = w = 512
    src = textured(h, w, 3)
    edit = src.copy()
    edit[100:300, 150:400] = textured(200, 250, 4)   # inside the mask
    edit[400:420, 20:60] //= 2                        # a little background damage
    edit[:, :8] = np.clip(edit[:, :8].astype(int) + 25, 0, 255)  # and some at the border (SSIM conventions differ)
    # an official RLE: [start, length, ...] over the flattened image, border forced to 1 by the decoder
    rle = []
    for r in range(90, 310):
        rle += [r * w + 140, 270]
    mask = decode_rle_mask(rle, (h, w))
    assert mask[0].all() and mask[:, -1].all() and mask[200, 200] and not mask[450, 100]
    sample = Sample(id="pie", dataset="pie_bench", source=src, mask=mask)
    suite = suite_of("pie_bench", keep=("psnr", "mse", "ssim"))
    ours = run(suite, sample, edit)

    p, g = _pie_bench_tensors(edit, src, ~mask)  # 1 - mask
    psnr = float(PeakSignalNoiseRatio(data_range=1.0)(p[None], g[None]))
    mse = float(MeanSquaredError()(p.contiguous(), g.contiguous()))
    # StructuralSimilarityIndexMeasure(data_range=1.0) as the torchmetrics of PIE-Bench's time (<= 1.4.1)
    # computed it: the mean of the SSIM map without its 5 px border, which is scikit-image's Gaussian
    # SSIM (values inside the border never read the padding). Installed torchmetrics (>= 1.4.2)
    # averages the whole map: another number, the one PIE-Bench did not report.
    ssim = structural_similarity(p.permute(1, 2, 0).double().numpy(), g.permute(1, 2, 0).double().numpy(),
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                 channel_axis=2)
    ssim_now = float(StructuralSimilarityIndexMeasure(data_range=1.0)(p[None], g[None]))
    assert ours[("psnr", "unedited")][0] == pytest.approx(psnr, rel=1e-5)
    assert ours[("mse", "unedited")][0] == pytest.approx(mse * 1e4, rel=1e-5)
    # float32 (torchmetrics) vs float64 (scikit-image): < 1e-5 on the mean (test_protocol_golden.py)
    assert ours[("ssim", "unedited")][0] == pytest.approx(ssim * 1e2, abs=5e-4)
    assert abs(ssim_now * 1e2 - ours[("ssim", "unedited")][0]) > 0.05
    # the zero-fill denominator is the full image: MSE = region sum / (3*H*W), not / region area
    diff = (edit.astype(np.float64) - src) / 255
    full_area = float(np.sum((diff**2)[~mask]) / (3 * h * w))
    assert ours[("mse", "unedited")][0] == pytest.approx(full_area * 1e4, rel=1e-5)
    assert full_area < float(np.mean((diff**2)[~mask]))

    # an empty unedited region is NaN (the official "nan"), flagged, and skipped in means
    all_mask = np.ones((h, w), bool)
    empty = run(suite, Sample(id="e", dataset="pie_bench", source=src, mask=all_mask), edit)
    assert all(math.isnan(v) and f == "empty_region" for v, f in empty.values())


# --------------------------------------------------------------------------------------------
# MagicBrush: L1/L2 against the ground truth, the edit resized to the GT size first
# --------------------------------------------------------------------------------------------
def test_magicbrush_distances_equal_image_eval_py():
    import torch
    from torchvision.transforms import ToTensor

    src, gt = textured(60, 80, 5), textured(60, 80, 6)
    gen = textured(96, 128, 7)  # another size: resized to the GT's size before comparing
    sample = Sample(id="mb", dataset="magicbrush", source=src, target=gt)
    suite = suite_of("magicbrush", keep=("l1", "l2"))
    ours = run(suite, sample, gen)

    gen_img = Image.fromarray(gen).convert("RGB").resize(Image.fromarray(gt).size)  # PIL default filter
    a, b = ToTensor()(gen_img), ToTensor()(Image.fromarray(gt))
    assert ours[("l1", "all")][0] == pytest.approx(float(torch.nn.L1Loss()(a, b)), rel=1e-6)
    assert ours[("l2", "all")][0] == pytest.approx(float(torch.nn.MSELoss()(a, b)), rel=1e-6)
    # no ground truth: NaN flagged missing:target, never a comparison with the source
    no_gt = run(suite, Sample(id="x", dataset="magicbrush", source=src), gen)
    assert all(math.isnan(v) and f == "missing:target" for v, f in no_gt.values())


def test_zone_compares_with_the_source():
    src = textured(32, 32, 8)
    sample = Sample(id="z", dataset="d", source=src, target=textured(32, 32, 9))
    ours = run(suite_of("zone", keep=("l1", "l2")), sample, src.copy())
    assert ours[("l1", "all")] == (0.0, None) and ours[("l2", "all")] == (0.0, None)


def test_cli_lists_and_checks_every_protocol():
    from harness.cli import _group_options

    assert set(PAPER_PROTOCOLS) <= set(_group_options("metrics"))


def test_paper_protocol_smoke_run_through_the_cli_labels_random_weights(tmp_path):
    """`metrics=zone metrics.allow_random_weights=true`: CLIP runs with random weights, and the
    report's tables say so; without the switch CLIP is unavailable (NaN, flagged), never faked."""
    import pandas as pd

    from harness.cli import main

    base = ["run", "method=recolor", "metrics=zone", "dataset.limit=2", "progress=false",
            f"results_dir={tmp_path}", "metrics.items.lpips.net=alex"]
    assert main(base + ["run_name=strict"]) == 0
    (job,) = (tmp_path / "strict" / "jobs").iterdir()
    s = pd.read_parquet(job / "scores.parquet")
    clip = s[s.metric.isin(["clip_i", "clip_t"])]
    assert len(clip) and clip.value.isna().all() and (clip.flag == "unavailable").all()

    assert main(base + ["run_name=smoke", "metrics.allow_random_weights=true"]) == 0
    (job,) = (tmp_path / "smoke" / "jobs").iterdir()
    s = pd.read_parquet(job / "scores.parquet")
    clip = s[s.metric.isin(["clip_i", "clip_t"])]
    n_ok = int((pd.read_parquet(job / "edits.parquet").status == "ok").sum())
    assert n_ok >= 1 and len(clip) == 2 * n_ok and clip.value.notna().all()
    assert clip.weights.str.contains("RANDOM WEIGHTS").all() and (s.protocol == "zone").all()
    table = (tmp_path / "smoke" / "report" / "table.md").read_text()
    assert "RANDOM WEIGHTS" in table and "zone" in table
