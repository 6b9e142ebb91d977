"""Golden tests of the protocol conventions of issue 10, each written from the official formula or
script line (never from the harness's own output):

- SSIM's border rule (torchmetrics <= 1.4.1 / scikit-image: the map's 5 px border excluded;
  >= 1.4.2: the whole map), by a NumPy SSIM written from Wang et al.'s formula;
- PIE-Bench's crop of non-square outputs (``evaluate.py``: bottom-right 512x512);
- CLIP in float16 (MagicBrush's ``clip.load`` on a GPU) as a protocol option;
- PIE-Bench's ``clip_similarity_source_image``;
- the protocol's image decoding, the library versions in the score keys, and the captions.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from harness.metrics import ScoringItem
from harness import versions
from harness.metrics import base as mbase
from harness.registry import METRICS
from harness.scoring import MetricSuite
from harness.types import Sample

from .conftest import OPENAI_MEAN, OPENAI_STD, disc_mask, register_open_clip_config, textured
from .test_protocols import load_protocol, run

TINY = "edit-harness-tiny-clip-golden"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP = {"model": TINY, "pretrained": None, "allow_random_weights": True, "device": "cpu"}

# float32 (torchmetrics, as the official scripts) vs this float64 formula: the local variance
# E[x^2] - mu^2 loses ~1e-7 to cancellation, divided by sigma^2 + c2 >= 9e-4 that is <= 1e-4 per
# map value; the means measured differ by < 1e-5. The border conventions differ by > 1e-3 here.
SSIM_TOL = 5e-5


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    register_open_clip_config(tmp_path_factory.mktemp("clipcfg"), TINY, TINY_CFG)
    return TINY


@pytest.fixture(autouse=True)
def _fresh_features(fresh_clip_features):
    yield


# --------------------------------------------------------------------------------------------
# SSIM, written from the formula (Wang et al. 2004, Gaussian window as torchmetrics / skimage)
# --------------------------------------------------------------------------------------------
def _gaussian(sigma: float) -> tuple[np.ndarray, int]:
    r = int(3.5 * sigma + 0.5)  # the window radius both torchmetrics and scikit-image (truncate 3.5) use
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum(), r


def _blur(a: np.ndarray, g: np.ndarray, r: int) -> np.ndarray:
    """Separable Gaussian filter of an HxWxC array, reflect-padded (edge not repeated) to keep its size."""
    a = np.pad(a, ((r, r), (r, r), (0, 0)), mode="reflect")
    h, w = a.shape[0] - 2 * r, a.shape[1] - 2 * r
    rows = sum(g[k] * a[k:k + h] for k in range(2 * r + 1))
    return sum(g[k] * rows[:, k:k + w] for k in range(2 * r + 1))


def ssim_map_formula(x: np.ndarray, y: np.ndarray, sigma: float = 1.5, data_range: float = 1.0) -> np.ndarray:
    g, r = _gaussian(sigma)
    mx, my = _blur(x, g, r), _blur(y, g, r)
    sxx = _blur(x * x, g, r) - mx * mx
    syy = _blur(y * y, g, r) - my * my
    sxy = _blur(x * y, g, r) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def f01(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) / 255


def ssim_values(sample: Sample, edit: np.ndarray, **params) -> dict[str, tuple[float, str | None]]:
    (rows,) = METRICS.get("ssim")(**params).score_batch([ScoringItem(sample, edit)])
    return {r.region: (r.value, r.flag) for r in rows}


def test_ssim_border_conventions_equal_the_formula():
    src, edit = textured(40, 56, 1), textured(40, 56, 2)
    mask = np.zeros((40, 56), bool)
    mask[2:30, 20:50] = True  # reaches into the 5 px border band
    sample = Sample(id="s", dataset="d", source=src, mask=mask)
    full = ssim_map_formula(f01(edit), f01(src))
    inner = np.zeros((40, 56), bool)
    inner[5:-5, 5:-5] = True

    keep = ssim_values(sample, edit, border="keep")
    excl = ssim_values(sample, edit, border="exclude")
    assert keep["all"][0] == pytest.approx(full.mean(), abs=SSIM_TOL)
    assert excl["all"][0] == pytest.approx(full[5:-5, 5:-5].mean(), abs=SSIM_TOL)
    assert abs(keep["all"][0] - excl["all"][0]) > 50 * SSIM_TOL  # the conventions really differ here
    # area regions: the map over the region's pixels, minus the border band under exclude
    assert keep["edited"][0] == pytest.approx(full[mask].mean(), abs=SSIM_TOL)
    assert excl["edited"][0] == pytest.approx(full[mask & inner].mean(), abs=SSIM_TOL)
    assert excl["unedited"][0] == pytest.approx(full[~mask & inner].mean(), abs=SSIM_TOL)

    # zero_fill (PIE-Bench): the map of both images times the mask, then the border rule
    w = (~mask)[..., None].astype(np.float64)
    zf = ssim_map_formula(f01(edit) * w, f01(src) * w)
    zk = ssim_values(sample, edit, border="keep", region_rule="zero_fill", regions=["unedited"])
    ze = ssim_values(sample, edit, border="exclude", region_rule="zero_fill", regions=["unedited"])
    assert zk["unedited"][0] == pytest.approx(zf.mean(), abs=SSIM_TOL)
    assert ze["unedited"][0] == pytest.approx(zf[5:-5, 5:-5].mean(), abs=SSIM_TOL)


def test_ssim_exclude_equals_scikit_image():
    """scikit-image's Gaussian SSIM (Wang et al.'s settings) also drops the 5 px border: the
    values inside never read the padding, so it equals torchmetrics <= 1.4.1 exactly."""
    from skimage.metrics import structural_similarity

    src, edit = textured(33, 47, 3), textured(33, 47, 4)
    sample = Sample(id="s", dataset="d", source=src)
    ref = structural_similarity(f01(edit), f01(src), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=1.0, channel_axis=2)
    assert ssim_values(sample, edit, border="exclude", regions=["all"])["all"][0] == pytest.approx(ref, abs=SSIM_TOL)


def test_ssim_does_not_depend_on_the_torchmetrics_scalar(monkeypatch):
    """The harness reduces the map itself: a torchmetrics whose scalar follows the other
    convention (as 1.4.1 and 1.4.2 do) gives the same numbers."""
    import torchmetrics.functional.image as tmi

    src, edit = textured(30, 30, 5), textured(30, 30, 6)
    sample = Sample(id="s", dataset="d", source=src)
    before = {b: ssim_values(sample, edit, border=b, regions=["all"])["all"][0] for b in ("keep", "exclude")}
    real = tmi.structural_similarity_index_measure

    def old_release(*args, **kw):  # torchmetrics <= 1.4.1: scalar = mean of the cropped map
        value, image = real(*args, **kw)
        return image[..., 5:-5, 5:-5].reshape(image.shape[0], -1).mean(-1) + 0.25, image

    monkeypatch.setattr(tmi, "structural_similarity_index_measure", old_release)
    after = {b: ssim_values(sample, edit, border=b, regions=["all"])["all"][0] for b in ("keep", "exclude")}
    assert after == before


def test_ssim_border_flags_and_parameters():
    src = textured(30, 30, 7)
    mask = np.zeros((30, 30), bool)
    mask[:3, :] = True  # only in the border band
    sample = Sample(id="s", dataset="d", source=src, mask=mask)
    got = ssim_values(sample, textured(30, 30, 8), border="exclude", regions=["edited"])
    assert math.isnan(got["edited"][0]) and got["edited"][1] == "region_in_border"
    # exclude needs more than twice the radius (10 px), keep more than the radius (reflect padding)
    small = Sample(id="t", dataset="d", source=textured(10, 10, 1))
    assert ssim_values(small, textured(10, 10, 2), border="exclude", regions=["all"])["all"][1] == "too_small"
    assert ssim_values(small, textured(10, 10, 2), border="keep", regions=["all"])["all"][1] is None
    with pytest.raises(ValueError, match="border"):
        METRICS.get("ssim")(border="crop")
    with pytest.raises(ValueError, match="sizes the Gaussian window from sigma"):
        METRICS.get("ssim")(kernel_size=7)
    assert METRICS.get("ssim")(kernel_size=11).kernel_size == 11


# --------------------------------------------------------------------------------------------
# PIE-Bench: crop of non-square outputs (evaluate.py)
# --------------------------------------------------------------------------------------------
def official_crop(tgt: np.ndarray) -> np.ndarray:
    """evaluate.py, as written: a non-square output is cropped to its bottom-right 512x512."""
    img = Image.fromarray(tgt)
    if img.size[0] != img.size[1]:
        img = img.crop((img.size[0] - 512, img.size[1] - 512, img.size[0], img.size[1]))
    return np.array(img)


def _official_background(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """matrics_calculator.py's PSNR / MSE calls on the unedited part (1 - mask), x10^4 for MSE."""
    import torch
    from torchmetrics.image import PeakSignalNoiseRatio
    from torchmetrics.regression import MeanSquaredError

    w = np.repeat((~mask).astype(np.float32)[..., None], 3, axis=2)
    p = torch.tensor(pred.astype(np.float32) / 255 * w).permute(2, 0, 1)
    g = torch.tensor(gt.astype(np.float32) / 255 * w).permute(2, 0, 1)
    return {"psnr": float(PeakSignalNoiseRatio(data_range=1.0)(p[None], g[None])),
            "mse": 1e4 * float(MeanSquaredError()(p.contiguous(), g.contiguous()))}


def _pie_sample(seed: int = 11) -> Sample:
    src = textured(512, 512, seed)
    mask = disc_mask(512, 512, 256, 256, 120)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True  # the decoder's forced border
    return Sample(id="pie", dataset="pie_bench", source=src, mask=mask,
                  source_caption="a cat sitting on a wooden table", target_caption="a dog sitting on a wooden table")


@pytest.mark.parametrize("layout", ["wide", "tall"])
def test_pie_bench_scores_the_bottom_right_crop_of_a_panel(layout):
    sample = _pie_sample()
    src = sample.source
    edit = src.copy()
    edit[200:320, 200:320] = textured(120, 120, 12)
    edit[420:450, 30:90] //= 3  # background damage: the unedited metrics see it
    others = [textured(512, 512, 20 + k) for k in range(3)]  # [source | reconstruction | ... | edit] panels
    panel = np.concatenate(others + [edit], axis=1 if layout == "wide" else 0)
    assert np.array_equal(official_crop(panel), edit)

    cfg = load_protocol("pie_bench")
    cfg["items"] = {k: cfg["items"][k] for k in ("psnr", "mse", "ssim")}
    ours = run(MetricSuite(cfg), sample, panel)
    official = _official_background(official_crop(panel), src, sample.mask)
    assert ours[("psnr", "unedited")][0] == pytest.approx(official["psnr"], rel=1e-5)
    assert ours[("mse", "unedited")][0] == pytest.approx(official["mse"], rel=1e-5)
    w = (~sample.mask)[..., None].astype(np.float64)
    zf = ssim_map_formula(f01(official_crop(panel)) * w, f01(src) * w)
    assert ours[("ssim", "unedited")][0] == pytest.approx(100 * zf[5:-5, 5:-5].mean(), abs=100 * SSIM_TOL)

    # without the crop rule the whole panel would be squashed to 512x512: other numbers
    squashed = run(MetricSuite({**cfg, "edit_crop": "none"}), sample, panel)
    assert abs(squashed[("mse", "unedited")][0] - official["mse"]) > 0.1 * official["mse"]


def test_pie_bench_crop_of_small_and_square_outputs():
    sample = _pie_sample(13)
    cfg = load_protocol("pie_bench")
    cfg["items"] = {"mse": cfg["items"]["mse"]}
    suite = MetricSuite(cfg)
    # narrower than 512: PIL's crop box reaches outside the image and is zero-filled
    narrow = textured(512, 300, 14)
    got = run(suite, sample, narrow)[("mse", "unedited")][0]
    assert official_crop(narrow)[:, :212].max() == 0
    assert got == pytest.approx(_official_background(official_crop(narrow), sample.source, sample.mask)["mse"], rel=1e-5)
    # square outputs are not cropped (a 256x256 edit is resized to the source's size, as without the rule)
    square = textured(256, 256, 15)
    plain = MetricSuite({**cfg, "edit_crop": "none"})
    assert run(suite, sample, square) == run(plain, sample, square)
    for bad in ({"edit_crop": "center"}, {"edit_crop": "bottom_right", "edit_crop_size": 0}):
        with pytest.raises(ValueError, match="edit_crop"):
            MetricSuite({**cfg, **bad})


def test_pie_bench_crop_reaches_model_metrics(tiny_clip):
    """CLIP scores the crop too (evaluate.py crops before every metric): equal to CLIPScore's
    max(100 cos, 0) of the cropped edit, recomputed with the same model."""
    sample = _pie_sample(16)
    edit = textured(512, 512, 17)
    panel = np.concatenate([textured(512, 512, 18), edit], axis=1)
    cfg = load_protocol("pie_bench")
    cfg["items"] = {"clip_similarity": {**cfg["items"]["clip_similarity"], **TINY_CLIP, "image_region": "all"}}
    suite = MetricSuite(cfg)
    got = run(suite, sample, panel)[("clip_similarity", "all")][0]
    metric = suite.entries[0].metric
    assert got == pytest.approx(max(100 * _cos(_img_emb(metric, edit), _txt_emb(metric, sample.target_caption)), 0),
                                abs=1e-4)  # float32 network, two forward implementations: ~1e-6 on cos


# --------------------------------------------------------------------------------------------
# PIE-Bench: clip_similarity_source_image
# --------------------------------------------------------------------------------------------
def _img_emb(metric, img: np.ndarray) -> np.ndarray:
    """OpenAI CLIP's _transform written out (bicubic resize, centre crop, normalise) + encode_image."""
    import torch
    from torchvision import transforms as T

    size = TINY_CFG["vision_cfg"]["image_size"]
    t = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                   T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    with torch.no_grad():
        return metric.bundle.model.encode_image(t(Image.fromarray(img).convert("RGB"))[None])[0].double().numpy()


def _txt_emb(metric, text: str) -> np.ndarray:
    import open_clip
    import torch

    with torch.no_grad():
        return metric.bundle.model.encode_text(open_clip.tokenize([text]))[0].double().numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_pie_bench_source_image_clip_similarity(tiny_clip):
    cfg = load_protocol("pie_bench")
    item = cfg["items"]["clip_similarity_source"]
    # evaluate.py: calculate_clip_similarity(src_image, original_prompt) (brackets removed), whole image
    assert (item["metric"], item["image_field"], item["text_field"], item["clamp"], item["scale"], item["model"]) == (
        "clipscore", "source", "source_caption", "per_image", 100, "ViT-L-14")
    cfg["items"] = {"clip_similarity_source": {**item, **TINY_CLIP}}
    suite = MetricSuite(cfg)
    sample = _pie_sample(21)
    a = run(suite, sample, textured(512, 512, 22))
    b = run(suite, sample, textured(512, 512, 23))
    assert a == b  # the edit plays no part
    metric = suite.entries[0].metric
    expected = max(100 * _cos(_img_emb(metric, sample.source), _txt_emb(metric, sample.source_caption)), 0.0)
    assert a[("clip_similarity_source", "all")][0] == pytest.approx(expected, abs=1e-4)  # ~1e-6 on cos, x100
    no_caption = Sample(id="n", dataset="pie_bench", source=sample.source)
    assert run(suite, no_caption, sample.source)[("clip_similarity_source", "all")][1] == "missing:source_caption"
    tgt = MetricSuite({"protocol": "t", "items": {"c": {"metric": "clip_t", "image_field": "target", **TINY_CLIP}}})
    assert run(tgt, sample, sample.source)[("c", "all")][1] == "missing:target"
    with pytest.raises(ValueError, match="image_field"):
        MetricSuite({"protocol": "t", "items": {"c": {"metric": "clip_t", "image_field": "mask", **TINY_CLIP}}})


# --------------------------------------------------------------------------------------------
# CLIP precision (MagicBrush image_eval.py: clip.load on CUDA = float16)
# --------------------------------------------------------------------------------------------
def test_fp16_builds_openais_mixed_precision_and_reaches_the_forward(tiny_clip):
    """load_clip(precision='fp16') builds what OpenAI's convert_weights makes (conv / linear /
    attention weights and both projections in float16, LayerNorm in float32 computing in float32)
    and feeds it float16 images: the embeddings come out of a float16 projection."""
    import torch

    from harness.metrics import _clip_models as cm
    from open_clip.transformer import LayerNormFp32

    b16 = cm.load_clip(TINY, None, device="cpu", allow_random=True, precision="fp16")
    b32 = cm.load_clip(TINY, None, device="cpu", allow_random=True, precision="fp32")
    m = b16.model
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            assert mod.weight.dtype == torch.float16, mod
        if isinstance(mod, torch.nn.MultiheadAttention):
            assert mod.in_proj_weight.dtype == torch.float16
        if isinstance(mod, torch.nn.LayerNorm):
            assert isinstance(mod, LayerNormFp32) and mod.weight.dtype == torch.float32
    assert m.visual.proj.dtype == torch.float16 and m.text_projection.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in b32.model.parameters())

    imgs = [textured(48, 64, s) for s in range(3)]
    e16, e32 = b16.embed_images(imgs), b32.embed_images(imgs)
    t16, t32 = b16.embed_texts(["a photo of a cat"]), b32.embed_texts(["a photo of a cat"])
    fp16_exact = lambda a: np.array_equal(a.astype(np.float16).astype(np.float64), a)  # noqa: E731
    assert fp16_exact(e16) and fp16_exact(t16)
    assert not fp16_exact(e32) and not fp16_exact(t32)
    # the same numbers as open_clip's own fp16 forward (the harness computes the last block for the
    # class token only: the same operations, float16 rounding in another order: 1 - cos ~ 1e-7)
    x = torch.stack([b16.preprocess(Image.fromarray(i)) for i in imgs]).half()
    with torch.no_grad():
        ref = m.encode_image(x).double().numpy()
    for a, r in zip(e16, ref):
        assert _cos(a, r) == pytest.approx(1.0, abs=1e-5)
    assert b16.key != b32.key  # embeddings of the two precisions never share a cache entry
    with pytest.raises(ValueError, match="precision"):
        cm.load_clip(TINY, None, device="cpu", allow_random=True, precision="bf16")


def test_fp16_is_refused_off_cuda_with_the_reason(tiny_clip, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cpu", "auto"):
        m = METRICS.get("clip_i")(precision="fp16", device=device, **{k: v for k, v in TINY_CLIP.items() if k != "device"})
        reason = m.available()
        assert reason and "fp16" in reason and "CUDA" in reason and "precision: fp32" in reason
        with pytest.raises(mbase.MetricUnavailable, match="fp16"):
            m.load()
    with pytest.raises(ValueError, match="precision"):
        METRICS.get("clip_t")(precision="half", **TINY_CLIP)

    # the protocol switch: `metrics.precision=fp16` reaches every CLIP item (not DINO), is named
    # in the weights column, keys the scores, and off CUDA gives NaN rows flagged, never fp32 numbers
    def mb(precision):
        cfg = load_protocol("magicbrush", clip_i=TINY_CLIP, clip_t=TINY_CLIP)
        cfg["items"] = {k: cfg["items"][k] for k in ("clip_i", "clip_t", "l1")}
        return MetricSuite({**cfg, "precision": precision})

    s16, s32 = mb("fp16"), mb("fp32")
    assert load_protocol("magicbrush")["precision"] == "fp32"
    assert {e.name: getattr(e.metric, "precision_param", None) for e in s16.entries} == {
        "clip_i": "fp16", "clip_t": "fp16", "l1": None}
    d16, d32 = s16.describe(), s32.describe()
    assert "fp16 (OpenAI clip.load on CUDA" in d16["clip_i"]["weights"] and d32["clip_i"]["weights"].endswith("; fp32")
    assert d16["clip_t"]["hash"] != d32["clip_t"]["hash"] and d16["l1"]["hash"] == d32["l1"]["hash"]
    assert "fp16" in d16["clip_i"]["unavailable"]
    sample = Sample(id="m", dataset="magicbrush", source=textured(32, 32, 1), target=textured(32, 32, 2),
                    target_caption="a dog")
    rows = run(s16, sample, textured(32, 32, 3))
    assert math.isnan(rows[("clip_i", "all")][0]) and rows[("clip_i", "all")][1] == "unavailable"
    assert math.isfinite(run(s32, sample, textured(32, 32, 3))[("clip_i", "all")][0])


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="fp16 CLIP runs on CUDA only")
def test_fp16_runs_on_cuda(tiny_clip):
    import torch

    m = METRICS.get("clip_i")(precision="fp16", **{**TINY_CLIP, "device": "cuda"})
    assert m.available() is None
    sample = Sample(id="c", dataset="d", source=textured(48, 64, 1))
    (rows,) = m.score_batch([ScoringItem(sample, textured(48, 64, 2))])
    ref32 = METRICS.get("clip_i")(**TINY_CLIP)
    (rows32,) = ref32.score_batch([ScoringItem(sample, textured(48, 64, 2))])
    assert m.bundle.model.visual.conv1.weight.dtype == torch.float16 and m.bundle.device.startswith("cuda")
    assert rows[0].value == pytest.approx(rows32[0].value, abs=1e-2)  # float16 vs float32 network: ~1e-3 on cos


# --------------------------------------------------------------------------------------------
# decoding, library versions, captions
# --------------------------------------------------------------------------------------------
def test_decode_rules_parsed_validated_described_and_keyed():
    plain = MetricSuite({"protocol": "p", "items": {"l1": {}}})
    assert plain.decode == {"exif_orientation": True, "alpha": "white"}
    for name in ("pie_bench", "magicbrush"):  # both official scripts: Image.open(...)[.convert('RGB')]
        assert MetricSuite(load_protocol(name)).decode == {"exif_orientation": False, "alpha": "drop"}
    official = MetricSuite({"protocol": "p", "decode": {"exif_orientation": False, "alpha": "drop"}, "items": {"l1": {}}})
    d = official.describe()["l1"]
    assert d["decode"] == {"exif_orientation": False, "alpha": "drop"}
    assert "EXIF orientation not applied, alpha dropped (PIL convert('RGB'))" in d["region_rule"]
    assert "EXIF orientation applied, alpha composited over white" in plain.describe()["l1"]["region_rule"]
    assert d["hash"] != plain.describe()["l1"]["hash"]  # another decoding, other pixels: other scores
    for bad, match in (({"alpha": "black"}, "decode.alpha"), ({"exif_orientation": "no"}, "exif_orientation"),
                       ({"gamma": 2}, "unknown key"), ("drop", "mapping")):
        with pytest.raises(ValueError, match=match):
            MetricSuite({"protocol": "p", "decode": bad, "items": {"l1": {}}})


def test_library_versions_key_the_scores(monkeypatch):
    import importlib.metadata

    cfg = {"protocol": "p", "items": {"l1": {}, "ssim": {}, "psnr": {}}}
    before = {k: v["hash"] for k, v in MetricSuite(cfg).describe().items()}
    libs = MetricSuite(cfg).describe()["ssim"]["libraries"]
    assert libs["torchmetrics"] == importlib.metadata.version("torchmetrics") and "timm" not in libs
    real = versions.installed_version

    def bumped(lib):
        return lambda name: "999.0" if name == lib else real(name)

    monkeypatch.setattr(versions, "installed_version", bumped("torchmetrics"))
    after = {k: v["hash"] for k, v in MetricSuite(cfg).describe().items()}
    assert after["ssim"] != before["ssim"] and after["psnr"] != before["psnr"]
    assert after["l1"] == before["l1"]  # L1 is numpy arithmetic: a torchmetrics upgrade cannot change it
    monkeypatch.setattr(versions, "installed_version", bumped("pillow"))  # resizes every edit of another size
    assert all(h != before[k] for k, h in ((k, v["hash"]) for k, v in MetricSuite(cfg).describe().items()))
    monkeypatch.setattr(versions, "installed_version", bumped("timm"))
    assert {k: v["hash"] for k, v in MetricSuite(cfg).describe().items()} == before


def test_every_protocol_names_its_conventions_weights_and_precision():
    for name in ("default", "pie_bench", "magicbrush", "zone", "partedit", "cpam", "diffeditor", "pixel"):
        suite = MetricSuite(load_protocol(name))
        for entry_name, d in suite.describe().items():
            rule = d["region_rule"]
            assert "images decoded:" in rule, (name, entry_name)
            if d["precision"]:
                assert d["weights"].endswith(d["precision"]), (name, entry_name)
        if "ssim" in suite.describe():
            assert "SSIM map" in suite.describe()["ssim"]["region_rule"]
    pie = MetricSuite(load_protocol("pie_bench")).describe()
    assert "bottom-right 512x512 crop" in pie["psnr"]["region_rule"]
    assert "border of 5 px excluded" in pie["ssim"]["region_rule"] and pie["ssim"]["region_rule"].endswith("reported x100")
    assert "averaged whole" in MetricSuite(load_protocol("default")).describe()["ssim"]["region_rule"]
    assert pie["clip_similarity"]["precision"] == "fp32" and pie["structure_distance"]["precision"] == "fp32"


def test_run_table_caption_names_the_conventions(tmp_path, tiny_clip):
    """A real run (CLI, runner, report) under pie_bench and magicbrush: the table's caption says
    how the numbers were made."""
    from harness.cli import main

    base = ["run", "method=recolor", "dataset.limit=2", "progress=false", f"results_dir={tmp_path}"]
    clip = [f"++metrics.items.clip_similarity.{k}={'null' if v is None else v}" for k, v in TINY_CLIP.items()]
    assert main(base + ["run_name=pie", "metrics=pie_bench", "~metrics.items.structure_distance",
                        "~metrics.items.lpips", "~metrics.items.clip_similarity_source", *clip]) == 0
    md = (tmp_path / "pie" / "report" / "table.md").read_text()
    assert "ssim -> pie_bench" in md  # the Protocols line (the runner's cost columns are protocol "runner")
    common = next(line for line in md.splitlines() if "Conventions of every metric:" in line)
    assert "EXIF orientation not applied, alpha dropped (PIL convert('RGB'))" in common
    assert "bottom-right 512x512 crop" in common
    assert "SSIM map border of 5 px excluded from every mean (torchmetrics <= 1.4.1" in md
    assert "edit vs source image" in md and "reported x100" in md and "reported x10000" in md
    assert "RANDOM WEIGHTS (smoke run); fp32" in md

    clip_mb = [f"++metrics.items.clip_t.{k}={'null' if v is None else v}" for k, v in TINY_CLIP.items()]
    assert main(base + ["run_name=mb", "metrics=magicbrush", "metrics.precision=fp16", "~metrics.items.dino",
                        "~metrics.items.clip_i", *clip_mb]) == 0
    md = (tmp_path / "mb" / "report" / "table.md").read_text()
    assert "clip_t -> magicbrush" in md and "EXIF orientation not applied" in md
    assert "fp16 (OpenAI clip.load on CUDA: fp16 weights and activations, LayerNorm in fp32)" in md
    assert "edit vs target image" in md
