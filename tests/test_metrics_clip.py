"""CLIP metrics (harness/metrics/clip.py) on a tiny random-weight open_clip model; no network."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from harness.metrics import ScoringItem
from harness.metrics import _clip_models as cm
from harness.metrics import clip as clipm
from harness.types import Sample

from .conftest import OPENAI_MEAN, OPENAI_STD, REPO, disc_mask, register_open_clip_config, textured

TINY = "edit-harness-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    register_open_clip_config(tmp_path_factory.mktemp("clipcfg"), TINY, TINY_CFG)


@pytest.fixture(autouse=True)
def fresh_features(fresh_clip_features):
    yield


def tiny(cls, **kw):
    params = dict(model=TINY, pretrained=None, allow_random_weights=True, device="cpu", batch_size=3)
    params.update(kw)
    return cls(**params)


def sample(sid="s0", seed=0, h=48, w=64, **kw):
    base = dict(
        id=sid, dataset="synthetic", source=textured(h, w, seed),
        source_caption="a photo of a red car", target_caption="a photo of a blue car",
        instruction="make the car blue", mask=disc_mask(h, w, h / 2, w / 2, min(h, w) / 4),
    )
    base.update(kw)
    return Sample(**base)


def item(s, seed=100, edit=None):
    e = edit if edit is not None else textured(s.source.shape[0], s.source.shape[1], seed)
    return ScoringItem(s, e)


# -- independent re-computation with the same model ------------------------------------------
def ref_transform(img: np.ndarray, size: int) -> "torch.Tensor":
    """OpenAI CLIP's _transform, written out with torchvision: Resize bicubic, CenterCrop, Normalize."""
    from PIL import Image
    from torchvision import transforms as T

    t = T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])
    return t(Image.fromarray(img).convert("RGB"))


def img_emb(metric, img: np.ndarray) -> np.ndarray:
    m = metric.bundle.model
    with torch.no_grad():
        f = m.encode_image(ref_transform(img, 64).unsqueeze(0))[0].double().numpy()
    return f / np.linalg.norm(f)


def txt_emb(metric, text: str) -> np.ndarray:
    import open_clip

    m = metric.bundle.model
    with torch.no_grad():
        f = m.encode_text(open_clip.tokenize([text]))[0].double().numpy()
    return f / np.linalg.norm(f)


def values(rows):
    return [[v.value for v in r] for r in rows]


# -- a tiny model with known cosines ----------------------------------------------------------
# Every image-caption cosine of the random tiny model is about -0.1 to -0.3 (its image and text
# embeddings each cluster), so clamps and means would compare zeros with zeros. Here the image
# projection is solved so that edit i and caption i have the cosine DESIGNED_COS[i]: a positive
# mean (100 * 0.1417 = 14.17) with two negative images, so clamping each image (mean of the
# clamped values: 18.33) and clamping the mean (14.17) give different numbers.
DESIGNED_COS = (0.42, 0.31, -0.18, 0.25, -0.07, 0.12)
DESIGNED_CAPTIONS = tuple(f"a photo of thing number {i}" for i in range(len(DESIGNED_COS)))


def block_image(seed: int) -> np.ndarray:
    """A 48 x 64 image of 3 x 4 random colour blocks: the six images are far apart in feature
    space, so the projection solved below is well conditioned."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)


@pytest.fixture(scope="module")
def designed(tiny_config, tmp_path_factory):
    """(weights file, items): the tiny model with ``visual.proj`` replaced by the least-squares
    solution P of H P = E, H = the six edits' pooled features before the projection (6 x 64),
    E = unit embeddings at cosine DESIGNED_COS[i] from caption i's text embedding (6 x 32)."""
    import copy

    model = tiny(clipm.ClipT).bundle.model
    edits = [block_image(100 + i) for i in range(len(DESIGNED_COS))]
    unprojected = copy.deepcopy(model.visual)
    unprojected.proj = None
    with torch.no_grad():
        h = torch.cat([unprojected(ref_transform(e, 64)[None]) for e in edits]).double().numpy()
        t = model.encode_text(open_clip.tokenize(list(DESIGNED_CAPTIONS))).double().numpy()
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    e = []
    for c, ti in zip(DESIGNED_COS, t):
        r = rng.standard_normal(ti.shape)
        u = r - (r @ ti) * ti
        e.append(c * ti + math.sqrt(1 - c * c) * u / np.linalg.norm(u))
    proj = np.linalg.lstsq(h, np.stack(e), rcond=None)[0]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["visual.proj"] = torch.from_numpy(proj.astype(np.float32))
    path = tmp_path_factory.mktemp("designed_clip") / "designed.pt"
    torch.save(sd, path)
    items = [ScoringItem(sample(f"d{i}", seed=i, target_caption=cap), e_img)
             for i, (cap, e_img) in enumerate(zip(DESIGNED_CAPTIONS, edits))]
    return path, items


def designed_metric(cls, path, **kw):
    return tiny(cls, weights_path=str(path), allow_random_weights=False, **kw)


def designed_cosines(metric, items) -> np.ndarray:
    """The cosines recomputed independently (torchvision transform, open_clip's encode_*)."""
    cos = np.array([float(np.dot(img_emb(metric, it.edit), txt_emb(metric, it.sample.target_caption))) for it in items])
    # float32 forward of a float32 projection of norm ~2: the design holds to ~1e-7
    np.testing.assert_allclose(cos, DESIGNED_COS, atol=1e-5)
    return cos


# -- tests --------------------------------------------------------------------------------------
def test_preprocess_matches_openai_transform():
    m = tiny(clipm.ClipI)
    for shape in [(48, 64), (80, 50), (64, 64)]:
        img = textured(*shape, seed=3)
        from PIL import Image

        got = m.bundle.preprocess(Image.fromarray(img))
        assert torch.allclose(got, ref_transform(img, 64), atol=1e-6)


def test_clip_i_matches_recomputation_and_identity():
    m = tiny(clipm.ClipI)
    samples = [sample(f"s{i}", seed=i) for i in range(4)]
    items = [item(s, seed=50 + i) for i, s in enumerate(samples)]
    items.append(ScoringItem(samples[0], samples[0].source.copy()))  # identity edit
    rows = m.score_batch(items)
    assert len(rows) == 5 and all(len(r) == 1 and r[0].region == "all" and r[0].metric == "clip_i" for r in rows)
    for it, r in zip(items, rows):
        want = float(np.dot(img_emb(m, it.edit), img_emb(m, it.sample.source)))
        assert r[0].value == pytest.approx(want, abs=1e-5)
    assert rows[-1][0].value == pytest.approx(1.0, abs=1e-5)
    assert m.higher_is_better


def test_clip_i_reference_target_missing_flagged():
    m = tiny(clipm.ClipI, reference="target")
    s_no = sample("a")
    s_yes = sample("b", seed=1, target=textured(40, 40, 9))
    rows = m.score_batch([item(s_no), item(s_yes)])
    assert math.isnan(rows[0][0].value) and rows[0][0].flag == "missing:target"
    want = float(np.dot(img_emb(m, item(s_yes).edit), img_emb(m, s_yes.target)))
    assert rows[1][0].value == pytest.approx(want, abs=1e-5)


def test_clip_t_matches_recomputation_scale_and_clamp(designed):
    path, items = designed
    base = designed_metric(clipm.ClipT, path)
    cos = designed_cosines(base, items)
    assert (cos > 0).sum() == 4 and (cos < 0).sum() == 2
    got = [r[0].value for r in base.score_batch(items)]
    np.testing.assert_allclose(got, cos, atol=1e-5)
    x100 = [r[0].value for r in designed_metric(clipm.ClipT, path, scale=100.0).score_batch(items)]
    np.testing.assert_allclose(x100, 100 * cos, atol=1e-3)
    # per image: the two negative images are clamped to exactly 0, the four others untouched
    per = np.array([r[0].value for r in designed_metric(clipm.ClipT, path, scale=100.0, clamp="per_image").score_batch(items)])
    assert (per == 0.0).sum() == 2 and np.array_equal(per == 0.0, cos < 0)
    np.testing.assert_allclose(per[cos > 0], 100 * cos[cos > 0], atol=1e-3)
    assert per.mean() == pytest.approx(100 * np.mean(np.maximum(DESIGNED_COS, 0)), abs=1e-3)  # 18.33
    # clamp on the mean: rows stay unclamped (negative ones included), the aggregate clamps
    mean_m = designed_metric(clipm.ClipT, path, scale=100.0, clamp="mean")
    unclamped = np.array([r[0].value for r in mean_m.score_batch(items)])
    np.testing.assert_allclose(unclamped, 100 * cos, atol=1e-3)
    assert (unclamped < 0).sum() == 2
    assert mean_m.mean_clamp_min == 0.0 and "max(mean, 0)" in mean_m.region_rule()
    assert clipm.clamped_mean(unclamped) == pytest.approx(100 * np.mean(DESIGNED_COS), abs=1e-3)  # 14.17
    assert clipm.clamped_mean(unclamped) < per.mean() - 4  # the two rules really differ here
    negative = unclamped[cos < 0]
    assert negative.mean() < -5 and clipm.clamped_mean(negative) == 0.0  # the clamp binds
    assert clipm.clamped_mean(list(unclamped) + [float("nan")]) == pytest.approx(clipm.clamped_mean(unclamped))
    assert math.isnan(clipm.clamped_mean([float("nan")]))
    # instruction as the text
    ins = [r[0].value for r in designed_metric(clipm.ClipT, path, text_field="instruction").score_batch(items[:2])]
    want = [float(np.dot(img_emb(base, it.edit), txt_emb(base, it.sample.instruction))) for it in items[:2]]
    assert want[0] != pytest.approx(cos[0], abs=1e-2)
    np.testing.assert_allclose(ins, want, atol=1e-5)


def test_clamp_rules_on_values():
    assert clipm.apply_scale_clamp(-0.2, 100, "per_image") == 0.0
    assert clipm.apply_scale_clamp(-0.2, 100, "mean") == pytest.approx(-20.0)
    assert clipm.apply_scale_clamp(-0.2, 1, "none") == pytest.approx(-0.2)
    assert clipm.apply_scale_clamp(0.3, 100, "per_image") == pytest.approx(30.0)
    with pytest.raises(ValueError):
        tiny(clipm.ClipT, clamp="sometimes")


def test_clip_t_edited_region_zero_fill_and_flags():
    m = tiny(clipm.ClipT, image_region=["all", "edited"])
    s = sample("a")
    it = item(s, seed=7)
    rows = m.score_batch([it, item(sample("nomask", mask=None)), item(sample("empty", mask=np.zeros((48, 64), bool))),
                          item(sample("nocap", target_caption=None))])
    assert [v.region for v in rows[0]] == ["all", "edited"]
    zero_filled = (it.edit * s.mask[..., None]).astype(np.uint8)
    t = txt_emb(m, s.target_caption)
    assert rows[0][0].value == pytest.approx(float(np.dot(img_emb(m, it.edit), t)), abs=1e-5)
    assert rows[0][1].value == pytest.approx(float(np.dot(img_emb(m, zero_filled), t)), abs=1e-5)
    assert rows[0][0].value != pytest.approx(rows[0][1].value, abs=1e-6)
    assert rows[1][1].flag == "no_mask" and math.isnan(rows[1][1].value) and not math.isnan(rows[1][0].value)
    assert rows[2][1].flag == "empty_region" and math.isnan(rows[2][1].value)
    assert len(rows[3]) == 2 and all(math.isnan(v.value) and v.flag == "missing:target_caption" for v in rows[3])
    # a mask on another grid is resized (nearest) to the edit's grid
    s2 = sample("b")
    big = np.asarray(item(s2, seed=8).edit)
    from PIL import Image

    big = np.asarray(Image.fromarray(big).resize((128, 96), Image.BICUBIC))
    r = tiny(clipm.ClipT, image_region="edited").score_batch([ScoringItem(s2, big)])[0]
    m2 = np.asarray(Image.fromarray(s2.mask.astype(np.uint8) * 255).resize((128, 96), Image.NEAREST)) > 127
    assert r[0].region == "edited"
    assert r[0].value == pytest.approx(float(np.dot(img_emb(m, (big * m2[..., None]).astype(np.uint8)), t)), abs=1e-5)


def test_clip_directional_matches_recomputation_and_flags():
    m = tiny(clipm.ClipDirectional)
    samples = [sample(f"s{i}", seed=i, target_caption=f"a photo of a blue car {i}") for i in range(3)]
    items = [item(s, seed=30 + i) for i, s in enumerate(samples)]
    same_cap = sample("same", target_caption="a photo of a red car ")
    no_cap = sample("nocap", source_caption=None)
    identity = ScoringItem(samples[0], samples[0].source.copy())
    rows = m.score_batch(items + [item(same_cap), item(no_cap), identity])
    for it, r in zip(items, rows):
        s = it.sample
        di = img_emb(m, it.edit) - img_emb(m, s.source)
        dt = txt_emb(m, s.target_caption) - txt_emb(m, s.source_caption)
        want = float(np.dot(di, dt) / (np.linalg.norm(di) * np.linalg.norm(dt)))
        assert r[0].value == pytest.approx(want, abs=1e-5)
        assert r[0].region == "all"
    assert rows[3][0].flag == "zero_text_direction" and math.isnan(rows[3][0].value)
    assert rows[4][0].flag == "missing:source_caption" and math.isnan(rows[4][0].value)
    assert rows[5][0].flag == "zero_image_direction" and math.isnan(rows[5][0].value)


def torchmetrics_clipscore(bundle, items) -> float:
    """torchmetrics' own CLIPScore update/compute on the same model through an HF-style adapter."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = bundle.model
            self.config = None  # torchmetrics reads config.text_config when present

        def get_image_features(self, pixel_values):
            return self.inner.encode_image(pixel_values)

        def get_text_features(self, input_ids, attention_mask=None):
            return self.inner.encode_text(input_ids)

    def processor(images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            px = [ref_transform(np.asarray(i.permute(1, 2, 0).numpy(), dtype=np.uint8), 64) for i in images]
            return {"pixel_values": torch.stack(px)}
        ids = bundle.tokenizer(text)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    tm = CLIPScore(model_name_or_path=lambda: (Model(), processor))
    with torch.no_grad():
        for it in items:
            tm.update(torch.from_numpy(np.ascontiguousarray(it.edit.transpose(2, 0, 1))), it.sample.target_caption)
        return float(tm.compute())


def test_clipscore_defaults_and_torchmetrics_formula(designed):
    d = clipm.ClipScore()
    assert (d.model_name, d.pretrained, d.scale, d.clamp) == ("ViT-L-14", "openai", 100.0, "mean")
    path, items = designed
    m = designed_metric(clipm.ClipScore, path)
    cos = designed_cosines(m, items)
    rows = m.score_batch(items)
    assert len(rows) == 6 and all(len(r) == 1 for r in rows)
    np.testing.assert_allclose([r[0].value for r in rows], 100 * cos, atol=1e-3)  # rows unclamped
    ours = clipm.clamped_mean([r[0].value for r in rows])
    want = torchmetrics_clipscore(m.bundle, items)
    # torchmetrics averages float32 scores; 1e-3 on values ~14 covers float32 accumulation
    assert want == pytest.approx(100 * np.mean(DESIGNED_COS), abs=1e-3)  # 14.17: not clamped
    assert ours == pytest.approx(want, abs=1e-3)
    # a per-image clamp (PIE-Bench's rule) would give 18.33: torchmetrics does not do that
    assert abs(want - 100 * np.mean(np.maximum(cos, 0))) > 4
    # where the mean is negative both clamp it to exactly 0 (the two negative images alone)
    neg = [it for it, c in zip(items, cos) if c < 0]
    assert len(neg) == 2 and np.mean([r[0].value for r, c in zip(rows, cos) if c < 0]) < -5
    assert torchmetrics_clipscore(m.bundle, neg) == 0.0
    assert clipm.clamped_mean([r[0].value for r in m.score_batch(neg)]) == 0.0


def test_random_weights_named_and_unavailable_without(monkeypatch, tmp_path):
    m = tiny(clipm.ClipT)
    assert m.available() is None
    assert "RANDOM WEIGHTS (smoke run)" in m.weights()
    # No weights anywhere, no random, no downloads: unavailable with a reason naming the fixes.
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"), raising=False)
    monkeypatch.delenv(cm.ALLOW_DOWNLOADS_ENV, raising=False)
    for cls in (clipm.ClipI, clipm.ClipT, clipm.ClipDirectional, clipm.ClipScore):
        u = cls(model="ViT-B-32", pretrained="openai")
        reason = u.available()
        assert reason and "ViT-B-32" in reason and "openai" in reason
        assert "weights_path" in reason and cm.ALLOW_DOWNLOADS_ENV in reason and "allow_random_weights" in reason
        assert "RANDOM" not in u.weights()
        with pytest.raises(clipm.MetricUnavailable):
            u.load()
    # with downloads allowed the tag resolves to an open_clip download (not performed here)
    monkeypatch.setenv(cm.ALLOW_DOWNLOADS_ENV, "1")
    r = cm.resolve_weights("ViT-B-32", "openai")
    assert r.origin == "download" and r.quick_gelu
    # a missing weights_path is reported as such
    assert "does not exist" in clipm.ClipI(weights_path=str(tmp_path / "nope.pt")).available()


def test_suite_unavailable_gives_no_numbers(monkeypatch, tmp_path):
    import huggingface_hub.constants as hfc

    from harness.scoring import MetricSuite

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"), raising=False)
    monkeypatch.delenv(cm.ALLOW_DOWNLOADS_ENV, raising=False)
    suite = MetricSuite({
        "protocol": "t", "reference": "source", "region_rule": "area", "regions": ["all", "edited", "unedited"],
        "items": {"clip_t": {}, "clip_i": {}, "clip_dir": {"metric": "clip_directional"}, "cs": {"metric": "clipscore"}},
    })
    it = item(sample("a"))
    for e in suite.entries:
        assert e.unavailable
        rows = suite.score(e, [it])[0]
        assert len(rows) == 1 and math.isnan(rows[0].value) and rows[0].flag == "unavailable"
    desc = suite.describe()
    assert "weights unavailable" in desc["clip_t"]["weights"]


def test_suite_runs_with_random_weights():
    from harness.scoring import MetricSuite

    p = dict(model=TINY, pretrained=None, allow_random_weights=True, device="cpu")
    suite = MetricSuite({
        "protocol": "t", "reference": "source", "region_rule": "zero_fill", "regions": ["all", "edited", "unedited"],
        "items": {"clip_t": dict(p), "clip_i": dict(p), "clip_dir": {"metric": "clip_directional", **p},
                  "cs_edit": {"metric": "clipscore", "image_region": "edited", **p}},
    })
    it = item(sample("a"))
    out = {e.name: suite.score(e, [it])[0] for e in suite.entries}
    assert len(suite.entries) == 4 and all(not e.unavailable for e in suite.entries)
    assert [v.region for v in out["cs_edit"]] == ["edited"]
    assert all(len(r) == 1 for r in out.values())
    # the suite's numbers are the metrics' own
    alone = {"clip_t": tiny(clipm.ClipT), "clip_i": tiny(clipm.ClipI), "clip_dir": tiny(clipm.ClipDirectional),
             "cs_edit": tiny(clipm.ClipScore, image_region="edited")}
    for name, m in alone.items():
        want = m.score_batch([it])[0][0].value
        assert not math.isnan(want) and out[name][0].value == pytest.approx(want, abs=1e-6), name
    assert "RANDOM WEIGHTS (smoke run)" in suite.describe()["clip_i"]["weights"]


def test_unknown_params_rejected():
    with pytest.raises(TypeError):
        clipm.ClipI(modle="ViT-B-32")
    with pytest.raises(ValueError):
        clipm.ClipT(text_field="caption")
    with pytest.raises(ValueError):
        clipm.ClipT(image_region="unedited")


def test_source_and_caption_encoded_once(monkeypatch):
    m = tiny(clipm.ClipDirectional)
    calls = {"image": 0, "text": 0}
    enc_i, enc_t = cm.encode_image_cls, cm.encode_text_trimmed

    def ci(model, x):
        calls["image"] += x.shape[0]
        return enc_i(model, x)

    def ct(model, x):
        calls["text"] += x.shape[0]
        return enc_t(model, x)

    monkeypatch.setattr(cm, "encode_image_cls", ci)
    monkeypatch.setattr(cm, "encode_text_trimmed", ct)
    s = sample("a")
    r1 = m.score_batch([item(s, seed=1)])
    assert calls == {"image": 2, "text": 2}
    r2 = m.score_batch([item(s, seed=2)])  # another method's edit of the same sample
    assert calls == {"image": 3, "text": 2}  # only the new edit was encoded
    # another CLIP metric on the same model reuses the edit and source embeddings
    ci_m = tiny(clipm.ClipI)
    assert ci_m.bundle is m.bundle
    ci_m.score_batch([item(s, seed=2)])
    assert calls == {"image": 3, "text": 2}
    assert not math.isnan(r1[0][0].value) and not math.isnan(r2[0][0].value)
    # several edits of one batch sharing a source: the source is encoded once
    s2 = sample("b", seed=5)
    m.score_batch([item(s2, seed=10), item(s2, seed=11), item(s2, seed=12)])
    assert calls["image"] == 3 + 4


def test_feature_cache_dir(tmp_path, monkeypatch):
    # random weights are never persisted
    m = tiny(clipm.ClipI, feature_cache_dir=str(tmp_path / "fc"))
    m.score_batch([item(sample("a"))])
    assert not (tmp_path / "fc").exists()
    # with a weights file, source embeddings are written and read back in a fresh process state
    ckpt = tmp_path / "tiny.pt"
    torch.save(m.bundle.model.state_dict(), ckpt)
    mf = tiny(clipm.ClipI, weights_path=str(ckpt), allow_random_weights=False, feature_cache_dir=str(tmp_path / "fc"))
    assert mf.available() is None and "weights_path file" in mf.weights() and "RANDOM" not in mf.weights()
    s = sample("a")
    v1 = mf.score_batch([item(s)])[0][0].value
    files = list((tmp_path / "fc").rglob("*.npy"))
    assert len(files) == 1 and files[0].name.startswith("image_")  # the source only, not the edit
    cm.FEATURES.clear()
    calls = []
    enc = cm.encode_image_cls
    monkeypatch.setattr(cm, "encode_image_cls", lambda model, x: (calls.append(x.shape[0]), enc(model, x))[1])
    v2 = mf.score_batch([item(s)])[0][0].value
    assert calls == [1] and v2 == pytest.approx(v1, abs=1e-6)
    # loaded weights equal the random model's: same values
    assert v1 == pytest.approx(m.score_batch([item(s)])[0][0].value, abs=1e-5)


def test_resolution_from_hf_cache_folder(tmp_path):
    # A hub cache layout for the ViT-B-32 'openai' tag's repo, given as weights_path.
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    r = cm.resolve_weights("ViT-B-32", "openai", str(tmp_path))
    assert not isinstance(r, str), r
    assert r.origin == "file" and r.path.endswith("open_clip_model.safetensors")
    assert r.quick_gelu and dict(r.preprocess)["mean"] == OPENAI_MEAN
    assert dict(r.preprocess)["interpolation"] == "bicubic" and dict(r.preprocess)["resize_mode"] == "shortest"
    # a folder with the tag's URL file name
    d = tmp_path / "plain"
    d.mkdir()
    (d / "ViT-B-32.pt").write_bytes(b"x")
    r2 = cm.resolve_weights("ViT-B-32", "openai", str(d))
    assert r2.origin == "file" and r2.path.endswith("ViT-B-32.pt")


def test_import_and_resolution_stay_torch_free():
    code = (
        "import sys\n"
        "import harness.metrics, harness.metrics.clip as c\n"
        "m = c.ClipT(model='ViT-B-32', pretrained='openai')\n"
        "m.available(); m.weights(); m.region_rule()\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, sorted(k for k in sys.modules if 'torch' in k)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_real_architecture_vit_b_32_constructs():
    import open_clip

    t = time.time()
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    with torch.no_grad():
        f = model.encode_image(torch.zeros(1, 3, 224, 224))
        g = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(["a cat"]))
    assert f.shape == (1, 512) and g.shape == (1, 512)
    assert time.time() - t < 60


@pytest.mark.slow
def test_real_architecture_vit_l_14_constructs():
    import open_clip

    model = open_clip.create_model("ViT-L-14", pretrained=None)
    with torch.no_grad():
        f = model.encode_image(torch.zeros(1, 3, 224, 224))
    assert f.shape == (1, 768)


def test_weights_from_local_dir_and_tag_quick_gelu(tmp_path, monkeypatch):
    import open_clip

    m = tiny(clipm.ClipI)
    s = sample("a")
    v_random = m.score_batch([item(s)])[0][0].value
    # an HF-style snapshot folder: open_clip_config.json + weights -> open_clip's local-dir:
    d = tmp_path / "snap"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    r = cm.resolve_weights(TINY, None, str(d))
    assert isinstance(r, str) and "no .safetensors" in r  # config only: refused, never random
    torch.save(m.bundle.model.state_dict(), d / "open_clip_pytorch_model.bin")
    ml = clipm.ClipI(model=TINY, pretrained=None, weights_path=str(d), device="cpu")
    assert ml.available() is None and "local-dir" in ml.weights()
    assert ml.score_batch([item(s)])[0][0].value == pytest.approx(v_random, abs=1e-5)
    # a tag whose config says quick_gelu gets QuickGELU (open_clip 3.x only warns otherwise)
    real = cm.tag_config
    fake = {"quick_gelu": True, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
            "resize_mode": "shortest", "url": "https://example.invalid/tiny.pt"}
    monkeypatch.setattr(cm, "tag_config", lambda model, tag: dict(fake) if tag == "faketag" else real(model, tag))
    ckpt = tmp_path / "tiny.pt"
    torch.save(m.bundle.model.state_dict(), ckpt)
    mq = clipm.ClipI(model=TINY, pretrained="faketag", weights_path=str(ckpt), device="cpu")
    assert "QuickGELU" in mq.weights()
    acts = {type(x).__name__ for x in mq.bundle.model.modules()}
    assert "QuickGELU" in acts and "GELU" not in acts
    assert "GELU" in {type(x).__name__ for x in m.bundle.model.modules()}


# -- the shortened forward passes equal open_clip's own ------------------------------------------
def test_class_token_only_last_block_equals_encode_image():
    model = tiny(clipm.ClipI).bundle.model
    assert cm._cls_only_layout(model)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.encode_image(x)
        got = cm.encode_image_cls(model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a layout it does not know (average pooling reads every token) runs open_clip's forward
    model.visual.pool_type = "avg"
    try:
        assert not cm._cls_only_layout(model)
        with torch.no_grad():
            assert torch.equal(cm.encode_image_cls(model, x), model.encode_image(x))
    finally:
        model.visual.pool_type = "tok"


def test_text_trimmed_at_last_end_token_equals_encode_text(monkeypatch):
    bundle = tiny(clipm.ClipT).bundle
    model = bundle.model
    texts = ["a cat", "a photo of a blue car parked in front of a red brick house", ""]
    tok = bundle.tokenizer(texts)
    assert tok.shape[1] == 77
    lengths = []
    forward = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward",
                        lambda x, attn_mask=None: (lengths.append(x.shape[1]), forward(x, attn_mask=attn_mask))[1])
    with torch.no_grad():
        got = cm.encode_text_trimmed(model, tok)
        eot = int(tok.argmax(dim=-1).max())
        assert lengths == [eot + 1] and eot + 1 < 20  # the longest caption's end token, not 77
        want = model.encode_text(tok)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a non-causal text tower must see the padding: the full forward is used. attn_mask is a
    # buffer of the shared tiny model: set and restored by hand (monkeypatch's undo would delete
    # it, since it is not in the instance __dict__, and break every later test of the module)
    causal = model.attn_mask
    model.attn_mask = torch.zeros(77, 77)
    try:
        lengths.clear()
        with torch.no_grad():
            cm.encode_text_trimmed(model, tok)
        assert lengths == [77]
    finally:
        model.attn_mask = causal
    assert torch.equal(model.attn_mask, causal)
