"""Alpha-CLIP metrics (harness/metrics/alpha_clip.py) on a tiny random-weight open_clip ViT; no network."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import open_clip  # noqa: F401  (required: a broken install must fail here, not skip the file)
import pytest
import torch

from harness.metrics import ScoringItem
from harness.metrics import _clip_models as cm
from harness.metrics import alpha_clip as ac
from harness.types import Sample

from .conftest import OPENAI_MEAN, OPENAI_STD, REPO, disc_mask, register_open_clip_config, textured

TINY = "edit-harness-tiny-alpha-clip"
TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PATCH = 16


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    register_open_clip_config(tmp_path_factory.mktemp("alphaclipcfg"), TINY, TINY_CFG)


@pytest.fixture(autouse=True)
def fresh_features(fresh_clip_features):
    yield


TINY_PARAMS = dict(model=TINY, pretrained=None, allow_random_weights=True, device="cpu", batch_size=3)


def tiny(cls, **kw):
    return cls(**{**TINY_PARAMS, **kw})


def sample(sid="s0", seed=0, h=64, w=64, **kw):
    base = dict(
        id=sid, dataset="synthetic", source=textured(h, w, seed),
        source_caption="a photo of a red car", target_caption="a photo of a car with a blue hood",
        instruction="make the hood blue", mask=disc_mask(h, w, h / 2, w / 2, min(h, w) / 4),
    )
    base.update(kw)
    return Sample(**base)


def item(s, seed=100, edit=None):
    e = edit if edit is not None else textured(s.source.shape[0], s.source.shape[1], seed)
    return ScoringItem(s, e)


# -- an independent re-computation ----------------------------------------------------------
def ref_image(img: np.ndarray, size: int = 64) -> "torch.Tensor":
    """OpenAI CLIP's _transform written out with torchvision (Resize bicubic, CenterCrop, Normalize)."""
    from PIL import Image
    from torchvision import transforms as T

    t = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                   T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    return t(Image.fromarray(img).convert("RGB"))


def ref_alpha_square(mask: np.ndarray) -> "torch.Tensor":
    """Alpha-CLIP's alpha of a mask already at the model size: (m - 0.5) / 0.26, 1 x H x W."""
    return torch.from_numpy((mask.astype(np.float32) - 0.5) / 0.26)[None]


def ref_features(visual, x: "torch.Tensor", alpha: "torch.Tensor") -> "torch.Tensor":
    """Alpha-CLIP's ViT forward by hand: conv1(x) + conv1_alpha(alpha), tokens, transformer, head."""
    import torch.nn.functional as F

    with torch.no_grad():
        e = F.conv2d(x, visual.conv1.weight, stride=PATCH) + F.conv2d(alpha, visual.conv1_alpha.weight, stride=PATCH)
        e = e.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(e.shape[0], 1, -1)
        t = torch.cat([cls, e], dim=1) + visual.positional_embedding
        t = visual.ln_pre(t)
        t = visual.transformer(t)
        return visual.ln_post(t[:, 0]) @ visual.proj


def unit(v: "torch.Tensor") -> np.ndarray:
    v = v.double().numpy()
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def text_features(model, texts) -> np.ndarray:
    import open_clip

    with torch.no_grad():
        return unit(model.encode_text(open_clip.tokenize(list(texts))))


def fill_by_hand(img: np.ndarray, keep: np.ndarray, rgb) -> np.ndarray:
    out = img.copy()
    for c in range(3):
        ch = out[..., c]
        ch[~keep] = rgb[c]
    return out


# -- architecture -----------------------------------------------------------------------------
def test_zero_conv1_alpha_equals_plain_clip_and_alpha_matters():
    base = cm.load_clip(TINY, None, None, "cpu", allow_random=True)
    visual = ac.add_conv1_alpha(base.model.visual, init="zeros")
    assert "conv1_alpha.weight" in visual.state_dict() and not hasattr(base.model.visual, "conv1_alpha")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 64, 64, generator=g)
    a = torch.randn(3, 1, 64, 64, generator=g)
    with torch.no_grad():
        plain = base.model.encode_image(x)
        got = ac.encode_image_alpha(visual, x, a)
    assert torch.allclose(got, plain, atol=1e-6, rtol=0)
    # a nonzero conv1_alpha: an all-ones alpha and an all-zeros alpha give different features
    with torch.no_grad():
        visual.conv1_alpha.weight.normal_(0, 0.05, generator=g)
        ones = ac.encode_image_alpha(visual, x, torch.ones(3, 1, 64, 64))
        zeros = ac.encode_image_alpha(visual, x, torch.zeros(3, 1, 64, 64))
    assert (ones - zeros).abs().max() > 1e-3
    # the shared base tower is untouched and the copy refuses to run without an alpha
    with torch.no_grad():
        assert torch.equal(base.model.encode_image(x), plain)
        with pytest.raises(RuntimeError, match="alpha"):
            visual(x)


def test_alpha_transform_values_and_geometry():
    m = disc_mask(64, 64, 30, 34, 12)
    a = ac.alpha_transform(m, 64)
    assert a.shape == (1, 64, 64)
    assert torch.allclose(a, ref_alpha_square(m), atol=1e-6)
    assert math.isclose(float(a.max()), 0.5 / 0.26, rel_tol=1e-6) and math.isclose(float(a.min()), -0.5 / 0.26, rel_tol=1e-6)
    # a non-square mask follows the image's centre crop: crop the centre square, then resize (ImageNet-S eval order)
    from torchvision import transforms as T

    wide = disc_mask(128, 192, 64, 100, 40)
    crop = wide[:, 32:160]
    want = T.Normalize(0.5, 0.26)(T.Resize((64, 64))(T.ToTensor()(crop.astype(np.uint8) * 255)))
    assert torch.allclose(ac.alpha_transform(wide, 64), want, atol=1e-5)


def test_alpha_clip_matches_hand_recomputation():
    m = tiny(ac.AlphaClip)
    assert m.available() is None
    assert cm.RANDOM_WEIGHTS_TEXT in m.weights() and "conv1_alpha" in m.weights()
    samples = [sample(f"s{i}", seed=i, mask=disc_mask(64, 64, 20 + 8 * i, 30, 10 + 3 * i),
                      target_caption=f"a car with hood number {i}") for i in range(4)]
    items = [item(s, seed=40 + i) for i, s in enumerate(samples)]
    rows = m.score_batch(items)
    assert len(rows) == 4
    bundle = m.backend.bundle
    visual, model = bundle.visual, bundle.base.model
    for it, r in zip(items, rows):
        s = it.sample
        x_e = ref_image(it.edit)[None]
        x_s = ref_image(s.source)[None]
        fg_img = unit(ref_features(visual, x_e, ref_alpha_square(s.mask)[None]))
        fg = 100 * float(np.sum(fg_img * text_features(model, [s.target_caption])))
        u = ref_alpha_square(~s.mask)[None]
        bg = 100 * float(np.sum(unit(ref_features(visual, x_s, u)) * unit(ref_features(visual, x_e, u))))
        assert [v.metric for v in r] == ["alpha_clip_fg", "alpha_clip_bg", "alpha_clip_avg"]
        assert [v.region for v in r] == ["edited", "unedited", "all"]
        assert r[0].value == pytest.approx(fg, abs=1e-4)
        assert r[1].value == pytest.approx(bg, abs=1e-4)
        assert r[2].value == pytest.approx((r[0].value + r[1].value) / 2, abs=1e-9)
        assert all(v.flag is None for v in r)
    assert m.higher_is_better


def test_rows_identity_and_flags():
    m = tiny(ac.AlphaClip, scale=1.0)
    s = sample("a")
    full = np.ones((64, 64), bool)
    empty = np.zeros((64, 64), bool)
    items = [
        ScoringItem(s, s.source.copy()),  # identity edit: bg = 1 * cos(x, x)
        item(sample("nomask", mask=None)),
        item(sample("empty", mask=empty)),
        item(sample("full", mask=full)),
        item(sample("nocap", target_caption=None)),
        item(sample("resized", h=64, w=64), edit=textured(96, 80, 5)),
    ]
    rows = m.score_batch(items)
    ident, nomask, emp, ful, nocap, resized = rows
    assert ident[1].value == pytest.approx(1.0, abs=1e-6)
    assert len(nomask) == 3 and all(math.isnan(v.value) and v.flag == "no_mask" for v in nomask)
    assert emp[0].flag == "empty_region" and math.isnan(emp[0].value)
    assert emp[1].flag is None and not math.isnan(emp[1].value)
    assert emp[2].flag == "empty_region" and math.isnan(emp[2].value)
    assert ful[0].flag is None and ful[1].flag == "empty_region" and ful[2].flag == "empty_region"
    assert nocap[0].flag == "missing:target_caption" and math.isnan(nocap[0].value)
    assert not math.isnan(nocap[1].value) and nocap[2].flag == "missing:target_caption" and math.isnan(nocap[2].value)
    # an edit of another size is embedded at its own size, the mask resized (nearest) to its grid
    from PIL import Image
    from torchvision import transforms as T

    r_s, r_e = items[5].sample, items[5].edit
    m_e = np.asarray(Image.fromarray(r_s.mask.astype(np.uint8) * 255).resize((80, 96), Image.NEAREST)) > 127

    def alpha_of(mask):  # the image's geometry (Resize shortest side + CenterCrop), then (m - 0.5) / 0.26
        t = T.CenterCrop(64)(T.Resize(64)(T.ToTensor()(mask.astype(np.uint8) * 255)))
        return T.Normalize(0.5, 0.26)(t)[None]

    visual, model = m.backend.bundle.visual, m.backend.bundle.base.model
    x_e, x_s = ref_image(r_e)[None], ref_image(r_s.source)[None]
    fg = float(np.sum(unit(ref_features(visual, x_e, alpha_of(m_e))) * text_features(model, [r_s.target_caption])))
    bg = float(np.sum(unit(ref_features(visual, x_s, ref_alpha_square(~r_s.mask)[None]))
                      * unit(ref_features(visual, x_e, alpha_of(~m_e)))))
    assert [v.flag for v in resized] == [None, None, None]
    assert resized[0].value == pytest.approx(fg, abs=1e-6) and resized[1].value == pytest.approx(bg, abs=1e-6)
    assert resized[2].value == pytest.approx((fg + bg) / 2, abs=1e-6)
    # scale 100 (the default, PartEdit's x100): identity bg = 100
    m100 = tiny(ac.AlphaClip)
    assert m100.score_batch([items[0]])[0][1].value == pytest.approx(100.0, abs=1e-4)
    # a list of text fields is tried in order; a later one is flagged
    fb = tiny(ac.AlphaClip, text_field=["target_caption", "instruction"])
    r = fb.score_batch([items[4]])[0]
    assert r[0].flag == "text:instruction" and not math.isnan(r[0].value) and r[2].flag == "text:instruction"
    want = m.score_batch([item(sample("nocap", target_caption="make the hood blue"))])[0][0].value
    assert r[0].value / 100 == pytest.approx(want, abs=1e-6)
    # the suite's common keys are accepted and ignored
    m2 = tiny(ac.AlphaClip, regions=("unedited",), reference="source", region_rule="area", protocol="partedit")
    assert m2.regions() == ("edited", "unedited", "all")


def test_sources_and_prompts_encoded_once(monkeypatch):
    calls = []
    real = ac.encode_image_alpha

    def counting(visual, x, a):
        calls.append(int(x.shape[0]))
        return real(visual, x, a)

    monkeypatch.setattr(ac, "encode_image_alpha", counting)
    m = tiny(ac.AlphaClip)
    s = sample("shared")
    items = [item(s, seed=1), item(s, seed=2)]
    first = m.score_batch(items)
    assert sum(calls) == 5  # 2 edits with alpha = mask, 1 source with 1 - mask, 2 edits with 1 - mask
    calls.clear()
    again = m.score_batch(items)
    assert sum(calls) == 0
    assert [[v.value for v in r] for r in first] == [[v.value for v in r] for r in again]


def test_checkpoint_in_alpha_clip_layout_loads(tmp_path):
    base = cm.load_clip(TINY, None, None, "cpu", allow_random=True)
    src = ac.add_conv1_alpha(base.model.visual, init="random")
    with torch.no_grad():  # make every tensor differ from the base tower
        g = torch.Generator().manual_seed(3)
        for p in src.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    state = OrderedDict()
    for k, v in src.state_dict().items():  # Alpha-CLIP's names: its qkv projection is an nn.Linear
        k = k.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias")
        state[k] = v.clone()
    assert "transformer.resblocks.0.attn.in_proj.weight" in state and "conv1_alpha.weight" in state
    ckpt = tmp_path / "alpha_tiny.pth"
    torch.save(state, ckpt)

    m = tiny(ac.AlphaClip, alpha_weights_path=str(ckpt))
    assert m.available() is None
    assert str(ckpt) in m.weights() and "STAND-IN" not in m.weights()
    m.load()
    loaded = m.backend.bundle.visual.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k
    s = sample("ck")
    rows = m.score_batch([item(s, seed=9)])[0]
    x_s, x_e = ref_image(s.source)[None], ref_image(item(s, seed=9).edit)[None]
    u = ref_alpha_square(~s.mask)[None]
    with torch.no_grad():
        bg = 100 * float(np.sum(unit(ac.encode_image_alpha(src, x_s, u)) * unit(ac.encode_image_alpha(src, x_e, u))))
    assert rows[1].value == pytest.approx(bg, abs=1e-4)

    # broken checkpoints are refused with the reason
    bad = OrderedDict((k, v) for k, v in state.items() if k != "conv1_alpha.weight")
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing keys: conv1_alpha.weight"):
        tiny(ac.AlphaClip, alpha_weights_path=str(tmp_path / "missing.pth")).load()
    lora = OrderedDict(state, **{"transformer.resblocks.0.attn.in_proj.lora_A": torch.zeros(2, 64)})
    torch.save(lora, tmp_path / "lora.pth")
    with pytest.raises(ValueError, match="LoRA"):
        tiny(ac.AlphaClip, alpha_weights_path=str(tmp_path / "lora.pth")).load()


def test_missing_alpha_weights_unavailable_and_fallback(tmp_path):
    from harness.scoring import MetricSuite

    m = ac.AlphaClip()  # ViT-L-14 without alpha_weights_path
    reason = m.available()
    assert reason and "alpha_weights_path" in reason and "model-zoo.md" in reason
    assert "clip_l14_grit20m_fultune_2xe.pth" in reason and "fallback: masked_clip" in reason
    with pytest.raises(ac.MetricUnavailable):
        m.load()
    assert "does not exist" in ac.AlphaClip(alpha_weights_path=str(tmp_path / "nope.pth")).available()
    wrong = tmp_path / "clip_b16_grit1m_fultune_8xe.pth"
    wrong.write_bytes(b"x")
    assert "set model: ViT-B-16" in ac.AlphaClip(alpha_weights_path=str(wrong)).available()
    assert "holds none" in ac.AlphaClip(alpha_weights_path=str(tmp_path)).available()
    # a folder holding a released checkpoint name for the model resolves to that file
    assert ac.resolve_alpha_weights("ViT-B-16", str(tmp_path)).path == str(wrong)

    no_random = {k: v for k, v in TINY_PARAMS.items() if k != "allow_random_weights"}
    cfg = {"protocol": "partedit", "reference": "source", "region_rule": "area", "regions": ["unedited"]}
    suite = MetricSuite({**cfg, "items": {"alpha_clip": {"scale": 100, **no_random}}})
    (e,) = suite.entries
    assert e.unavailable and "alpha_weights_path" in e.unavailable
    rows = suite.score(e, [item(sample("u"))])[0]
    assert len(rows) == 3 and all(math.isnan(v.value) and v.flag == "unavailable" for v in rows)

    suite = MetricSuite({**cfg, "items": {"alpha_clip": {"scale": 100, "fallback": "masked_clip", **TINY_PARAMS}}})
    (e,) = suite.entries
    assert not e.unavailable
    rows = suite.score(e, [item(sample("f"))])[0]
    assert [v.metric for v in rows] == ["alpha_clip_fg", "alpha_clip_bg", "alpha_clip_avg"]
    assert all(not math.isnan(v.value) for v in rows)
    w = suite.describe()["alpha_clip"]["weights"]
    assert w.startswith("STAND-IN for Alpha-CLIP") and "alpha_weights_path is not set" in w
    assert "STAND-IN" in suite.describe()["alpha_clip"]["region_rule"]
    # the stand-in's numbers are masked_clip's
    want = tiny(ac.MaskedClip).score_batch([item(sample("f"))])[0]
    assert [v.value for v in rows] == pytest.approx([v.value for v in want], abs=1e-9)


def test_masked_clip_matches_hand_recomputation():
    m = tiny(ac.MaskedClip)
    assert m.weights().startswith("STAND-IN for Alpha-CLIP: masked CLIP")
    model = m.backend.base.bundle().model
    mean_rgb = tuple(int(255 * c) for c in OPENAI_MEAN)
    assert mean_rgb == (122, 116, 104)

    def emb(img):
        with torch.no_grad():
            return unit(model.encode_image(ref_image(img)[None]))

    samples = [sample(f"m{i}", seed=i, h=48, w=64, mask=disc_mask(48, 64, 24, 20 + 10 * i, 12)) for i in range(3)]
    items = [item(s, seed=70 + i) for i, s in enumerate(samples)]
    for it, r in zip(items, m.score_batch(items)):
        s = it.sample
        fg = 100 * float(np.sum(emb(fill_by_hand(it.edit, s.mask, mean_rgb)) * text_features(model, [s.target_caption])))
        bg = 100 * float(np.sum(emb(fill_by_hand(s.source, ~s.mask, mean_rgb)) * emb(fill_by_hand(it.edit, ~s.mask, mean_rgb))))
        assert [v.metric for v in r] == ["masked_clip_fg", "masked_clip_bg", "masked_clip_avg"]
        assert r[0].value == pytest.approx(fg, abs=1e-4) and r[1].value == pytest.approx(bg, abs=1e-4)
        assert r[2].value == pytest.approx((fg + bg) / 2, abs=1e-4)
    # black fill, cropped to the region's bounding box padded to a square
    mb = tiny(ac.MaskedClip, fill="black", crop="bbox")
    s = sample("bb", h=48, w=64, mask=np.pad(np.ones((10, 20), bool), ((5, 33), (30, 14))))
    it = item(s, seed=3)
    crop = fill_by_hand(it.edit, s.mask, (0, 0, 0))[5:15, 30:50]
    sq = np.zeros((20, 20, 3), np.uint8)
    sq[5:15] = crop
    fg = 100 * float(np.sum(emb(sq) * text_features(model, [s.target_caption])))
    assert mb.score_batch([it])[0][0].value == pytest.approx(fg, abs=1e-4)
    assert "black" in mb.weights() and "bounding box" in mb.weights()


def test_parameters_validated():
    with pytest.raises(TypeError):
        ac.MaskedClip(alpha_weights_path="x.pth")
    with pytest.raises(TypeError):
        ac.AlphaClip(modle="ViT-L-14")
    for bad in (dict(fallback="clip"), dict(text_field="caption"), dict(fill="red"), dict(fill=[1, 2]),
                dict(fill=[0, 0, 256]), dict(crop="tight"), dict(batch_size=0)):
        with pytest.raises(ValueError):
            ac.AlphaClip(**bad)
    assert ac.AlphaClip(fill=[10, 20, 30]).fill == (10, 20, 30)


def test_import_stays_torch_free():
    code = (
        "import sys\n"
        "import harness.metrics.alpha_clip as a\n"
        "for m in (a.AlphaClip(), a.AlphaClip(fallback='masked_clip'), a.MaskedClip()):\n"
        "    m.available(); m.weights(); m.region_rule()\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, sorted(k for k in sys.modules if 'torch' in k)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_real_checkpoint_needs_quick_gelu_base(tmp_path):
    ckpt = tmp_path / "alpha.pth"
    ckpt.write_bytes(b"x")  # resolution only: nothing is loaded
    plain = tmp_path / "plain.pt"
    plain.write_bytes(b"x")
    m = ac.AlphaClip(model=TINY, pretrained=None, weights_path=str(plain), alpha_weights_path=str(ckpt))
    assert "QuickGELU" in m.available()
    d = tmp_path / "openai_dir"
    d.mkdir()
    (d / "open_clip_model.safetensors").write_bytes(b"x")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**TINY_CFG, "quick_gelu": True}}))
    ok = ac.AlphaClip(model=TINY, pretrained=None, weights_path=str(d), alpha_weights_path=str(ckpt))
    assert ok.available() is None
    assert ac.AlphaClip(model="ViT-L-14-quickgelu", pretrained=None, weights_path=str(plain),
                        alpha_weights_path=str(ckpt)).available() is None
