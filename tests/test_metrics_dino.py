"""DINO metrics (harness/metrics/dino.py): ``dino`` (MagicBrush) and ``structure_distance`` (PIE-Bench).

Random-weight DINO ViTs (seeded, built by the metric) checked against independent re-computations
written here from the official scripts' steps; weights resolution and loading without network.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm  # noqa: F401  (required: a broken install must fail here, not skip the file)
import torch
import torch.nn.functional as F
from PIL import Image

from harness.metrics import ScoringItem
from harness.metrics import dino as dm
from harness.types import Sample

from .conftest import REPO, disc_mask, textured

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
RND = dict(allow_random_weights=True, device="cpu")


@pytest.fixture(autouse=True)
def fresh_features():
    dm.CLS_FEATURES.clear()
    dm.KEY_FEATURES.clear()
    yield
    dm.CLS_FEATURES.clear()
    dm.KEY_FEATURES.clear()


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """No DINO weights anywhere: empty torch hub and Hugging Face caches."""
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"), raising=False)
    return tmp_path


def sample(sid="s0", seed=0, h=64, w=64, **kw):
    base = dict(id=sid, dataset="synthetic", source=textured(h, w, seed), mask=disc_mask(h, w, h / 2, w / 2, min(h, w) / 4))
    base.update(kw)
    return Sample(**base)


def edit_of(s: Sample, seed: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    h, w = shape or s.source.shape[:2]
    return textured(h, w, seed)


# -- independent re-computations ------------------------------------------------------------------
def dino_layout(depth: int = 12) -> set[str]:
    """The parameter names of facebookresearch/dino's VisionTransformer with num_classes=0."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return keys


def dino_forward_by_hand(sd: dict, x: "torch.Tensor", patch: int, heads: int,
                         qkv_block: int | None = None) -> "torch.Tensor":
    """DINO's forward in plain functional torch (vision_transformer.py): prepare_tokens with its
    interpolate_pos_encoding, 12 pre-norm blocks, final norm, CLS; or block ``qkv_block``'s qkv output."""
    b, _, hh, ww = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    pos = sd["pos_embed"]
    n_trained, gh, gw = pos.shape[1] - 1, hh // patch, ww // patch
    if not (gh * gw == n_trained and hh == ww):
        side = math.sqrt(n_trained)
        grid = pos[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], 1)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1) + pos
    n, d = t.shape[1], t.shape[2]
    ln = lambda z, p: F.layer_norm(z, (d,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    lin = lambda z, p: F.linear(z, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    for i in range(12):
        p = f"blocks.{i}."
        qkv = lin(ln(t, p + "norm1"), p + "attn.qkv")
        if i == qkv_block:
            return qkv
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        t = t + lin((a @ v).transpose(1, 2).reshape(b, n, d), p + "attn.proj")
        t = t + lin(F.gelu(lin(ln(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    return ln(t, "norm")[:, 0]


def keys_from_qkv(qkv: "torch.Tensor", heads: int) -> np.ndarray:
    """PIE-Bench's get_keys_from_qkv + heads concatenation: (T, 3*D) -> (T, heads*head_dim)."""
    n, d3 = qkv.shape
    k = qkv.reshape(n, 3, heads, d3 // 3 // heads).permute(1, 2, 0, 3)[1]  # heads x tokens x head_dim
    return k.transpose(0, 1).reshape(n, -1).double().numpy()


def magicbrush_input(img: np.ndarray) -> "torch.Tensor":
    """Resize(256) bicubic on the shorter side (PIL), centre crop 224 (torchvision's rounding), /255, normalize."""
    pil = Image.fromarray(img)
    w, h = pil.size
    if w <= h:
        size = (256, int(256 * h / w))
    else:
        size = (int(256 * w / h), 256)
    a = np.asarray(pil.resize(size, Image.BICUBIC)).astype(np.float64) / 255.0
    top, left = int(round((a.shape[0] - 224) / 2.0)), int(round((a.shape[1] - 224) / 2.0))
    a = (a[top:top + 224, left:left + 224] - MEAN) / STD
    return torch.from_numpy(a.transpose(2, 0, 1).copy()).float()[None]


def dino_cls(net, img: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(magicbrush_input(img))[0].double().numpy()  # timm's own forward = model(x) in MagicBrush


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def pie_keys(net, img: np.ndarray, heads: int, patch: int, pixel_max: float = 255.0, mask: np.ndarray | None = None,
             resize: int = 224) -> np.ndarray:
    """PIE-Bench: float image (0-255 unless pixel_max), x mask, Resize(resize, max_size=480) bilinear without
    antialias, ImageNet normalize; block 11's qkv output, keys of all tokens, heads concatenated."""
    x = img.astype(np.float32)
    if pixel_max != 255.0:
        x = x / np.float32(255.0 / pixel_max)
    if mask is not None:
        x = x * mask[..., None].astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    h, w = img.shape[:2]
    short, long = min(h, w), max(h, w)
    new_short, new_long = resize, int(resize * long / short)
    if new_long > 480:
        new_short, new_long = int(480 * new_short / new_long), 480
    size = (new_short, new_long) if h <= w else (new_long, new_short)
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=False)
    t = (t - torch.tensor(MEAN, dtype=torch.float32)[:, None, None]) / torch.tensor(STD, dtype=torch.float32)[:, None, None]
    with torch.no_grad():
        qkv = dino_forward_by_hand(net.state_dict(), t, patch, heads, qkv_block=11)[0]
    return keys_from_qkv(qkv, heads)


def self_sim(k: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(k, axis=1, keepdims=True)
    return (k @ k.T) / np.maximum(n @ n.T, 1e-8)


def structure_distance_by_hand(net, src: np.ndarray, edit: np.ndarray, heads: int = 6, patch: int = 16, **kw) -> float:
    a, b = self_sim(pie_keys(net, src, heads, patch, **kw)), self_sim(pie_keys(net, edit, heads, patch, **kw))
    return float(np.mean((a - b) ** 2))


# -- architecture -------------------------------------------------------------------------------
def test_arch_table_matches_timm_pretrained_cfgs():
    from timm.models import get_pretrained_cfg

    for arch in dm.ARCHS.values():
        cfg = get_pretrained_cfg(f"{arch.timm_name}.dino")
        assert cfg.hf_hub_id == arch.hf_repo and cfg.url == arch.url, arch.name
        assert os.path.basename(cfg.url) == arch.file and cfg.num_classes == 0


def test_network_is_dinos_architecture_and_forward():
    bundle = dm.Dino(**RND).bundle
    net = bundle.net
    sd = net.state_dict()
    assert set(sd) == dino_layout()  # DINO's checkpoint keys, nothing more (no head)
    assert sd["pos_embed"].shape == (1, 197, 384) and sd["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert sd["blocks.0.attn.qkv.bias"].shape == (1152,) and sd["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 25 and all(m.eps == 1e-6 for m in norms)
    assert all(m.approximate == "none" for m in net.modules() if isinstance(m, torch.nn.GELU))
    x = magicbrush_input(textured(64, 64, 1))
    by_hand = dino_forward_by_hand(sd, x, 16, 6)
    with torch.no_grad():
        ours = bundle.cls(x)
        timm_forward = net(x)
    torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(timm_forward, by_hand, atol=1e-5, rtol=1e-5)
    assert bundle.random and dm.RANDOM_WEIGHTS_TEXT in dm.Dino(**RND).weights()


def test_pos_embed_interpolation_for_non_square_inputs():
    pos = torch.randn(1, 197, 8)
    assert dm.dino_pos_embed(pos, 224, 224, 16) is pos  # trained grid: unchanged
    out = dm.dino_pos_embed(pos, 224, 298, 16)  # 14 x 18 patches
    assert out.shape == (1, 1 + 14 * 18, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0])


# -- dino (MagicBrush) ---------------------------------------------------------------------------
def test_dino_matches_recomputation_and_identity():
    m = dm.Dino(batch_size=2, **RND)
    net = m.bundle.net
    samples = [sample("a", seed=0), sample("b", seed=1)]
    items = [ScoringItem(samples[0], edit_of(samples[0], 10, (48, 80))),  # the edit at its own size (MagicBrush)
             ScoringItem(samples[1], edit_of(samples[1], 11, (90, 60))),
             ScoringItem(samples[0], samples[0].source.copy())]  # identity edit
    rows = m.score_batch(items)
    assert len(rows) == 3
    assert all(len(r) == 1 and r[0].metric == "dino" and r[0].region == "all" and r[0].flag is None for r in rows)
    feats = {}
    for it, r in zip(items[:2], rows):
        feats[id(it)] = e = dino_cls(net, it.edit)
        assert r[0].value == pytest.approx(cosine(e, dino_cls(net, it.sample.source)), abs=1e-5)
    assert rows[-1][0].value == pytest.approx(1.0, abs=1e-6)
    assert rows[0][0].value != pytest.approx(rows[1][0].value, abs=1e-6)
    assert m.higher_is_better and m.regions() == ("all",)
    # the transform is MagicBrush's (torchvision on PIL) = the numpy re-computation
    img = items[0].edit
    torch.testing.assert_close(dm.magicbrush_transform()(Image.fromarray(img))[None], magicbrush_input(img), atol=1e-5, rtol=0)
    # the network as benchmarks/bench_scoring.py calls it, MagicBrush's way
    model, transform = dm.reference_model_and_transform(m)
    with torch.no_grad():
        f = model(transform(Image.fromarray(img))[None])[0].double().numpy()
    np.testing.assert_allclose(f, feats[id(items[0])], atol=1e-5)
    # scale multiplies, nothing else (embeddings come from the cache)
    x10 = dm.Dino(scale=10.0, **RND).score_batch(items[:1])[0][0].value
    assert x10 == pytest.approx(10 * rows[0][0].value, abs=1e-9)


def test_dino_reference_target_and_missing_target():
    m = dm.Dino(reference="target", regions=["all", "edited"], region_rule="zero_fill", **RND)
    s_no = sample("a")
    s_yes = sample("b", seed=1, target=textured(64, 64, 9))
    e = edit_of(s_yes, 5)
    rows = m.score_batch([ScoringItem(s_no, edit_of(s_no, 3)), ScoringItem(s_yes, e)])
    assert len(rows[0]) == 1 and math.isnan(rows[0][0].value) and rows[0][0].flag == "missing:target"
    # the same number as comparing with a sample whose SOURCE is that target
    as_source = dm.Dino(**RND).score_batch([ScoringItem(sample("c", source=s_yes.target), e)])
    assert rows[1][0].value == as_source[0][0].value and not math.isnan(rows[1][0].value)
    assert "edit vs target" in m.region_rule() and "no clamp" in m.region_rule()


def test_dino_reference_embeddings_cached_across_methods(monkeypatch):
    m = dm.Dino(**RND)
    bundle = m.bundle
    seen = []
    real = bundle.cls
    monkeypatch.setattr(bundle, "cls", lambda x: (seen.append(x.shape[0]), real(x))[1])
    s = sample("a")
    m.score_batch([ScoringItem(s, edit_of(s, 1))])
    assert sum(seen) == 2
    m2 = dm.Dino(name="dino_again", **RND)  # another method's run, same process
    assert m2.bundle is bundle
    m2.score_batch([ScoringItem(s, edit_of(s, 2))])
    assert sum(seen) == 3  # only the new edit went through the network
    s2 = sample("b", seed=7)
    m.score_batch([ScoringItem(s2, edit_of(s2, k)) for k in (3, 4)])
    assert sum(seen) == 3 + 3  # a source shared by a batch is embedded once


# -- structure_distance (PIE-Bench) ---------------------------------------------------------------
TINY = dict(model="dino_vits16", resize=32, **RND)  # 2x2 patches + CLS: the same code path, fast


def test_structure_distance_matches_recomputation_and_identity():
    # dino_vits16 at the protocol's 224 for speed (197 tokens); dino_vitb8 is checked below.
    m = dm.StructureDistance(model="dino_vits16", batch_size=2, **RND)
    net = m.bundle.net
    samples = [sample("a", seed=0), sample("b", seed=1, h=48, w=64)]
    items = [ScoringItem(samples[0], edit_of(samples[0], 20)),
             ScoringItem(samples[1], edit_of(samples[1], 21, (60, 80))),  # resized to the source first
             ScoringItem(samples[0], samples[0].source.copy())]
    rows = m.score_batch(items)
    assert len(rows) == 3 and all(len(r) == 1 and r[0].region == "all" and r[0].flag is None for r in rows)
    from harness.metrics.base import resize_like

    for it, r in list(zip(items, rows))[:2]:  # 48x64 -> 224x298: 14x18 patches, interpolated positions
        edit = resize_like(it.edit, it.sample.source.shape[:2])
        want = structure_distance_by_hand(net, it.sample.source, edit)
        assert want > 0 and r[0].value == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert rows[2][0].value == 0.0
    assert not m.higher_is_better


def test_structure_distance_scale_and_pixel_range():
    s = sample("a", seed=2)
    it = ScoringItem(s, edit_of(s, 22))
    base = dm.StructureDistance(**TINY)
    v = base.score_batch([it])[0][0].value
    assert v == pytest.approx(structure_distance_by_hand(base.bundle.net, s.source, it.edit, resize=32), rel=1e-4)
    # the x10^3 of PIE-Bench's table is a parameter (the edit's keys are recomputed in another batch
    # shape: float32 noise, amplified by the tiny MSE of random weights on 5 tokens)
    assert dm.StructureDistance(scale=1000.0, **TINY).score_batch([it])[0][0].value == pytest.approx(1000 * v, rel=1e-4)
    # [0, 1] inputs (the Splice/DINO convention) give another number, also reproduced
    unit = dm.StructureDistance(pixel_max=1.0, **TINY).score_batch([it])[0][0].value
    want = structure_distance_by_hand(base.bundle.net, s.source, it.edit, resize=32, pixel_max=1.0)
    assert unit == pytest.approx(want, rel=1e-4) and unit != pytest.approx(v, rel=1e-3)
    assert "input [0, 255] floats" in base.region_rule() and "without antialias" in base.region_rule()


def test_structure_distance_default_is_vitb8_block11_keys():
    m = dm.StructureDistance(**RND)
    assert m.arch.name == "dino_vitb8" and m.layer == 11 and m.params["resize"] == 224
    net = m.bundle.net
    got = []
    handle = net.blocks[11].attn.qkv.register_forward_hook(lambda mod, i, o: got.append(o.detach()))
    try:
        s = sample("a", seed=3)
        rows = m.score_batch([ScoringItem(s, s.source.copy())])  # identity: one forward, keys cached
    finally:
        handle.remove()
    assert rows[0][0].value == 0.0 and rows[0][0].region == "all"
    (cached,) = list(dm.KEY_FEATURES._mem.values())
    assert cached.shape == (785, 768)  # 28 x 28 patches + CLS; 12 heads x 64, concatenated
    (qkv,) = got
    np.testing.assert_array_equal(cached, keys_from_qkv(qkv[0], 12).astype(np.float32))


def test_structure_distance_regions_and_flags():
    m = dm.StructureDistance(image_region=["all", "edited", "unedited"], regions=["unedited"],
                             region_rule="zero_fill", **TINY)  # suite keys ignored
    assert m.regions() == ("all", "edited", "unedited")
    assert dm.StructureDistance(regions=["unedited"], **TINY).regions() == ("all",)
    net = m.bundle.net
    s = sample("a")
    e = edit_of(s, 30)
    no_mask = sample("n", mask=None)
    full = sample("f", mask=np.ones((64, 64), bool))
    rows = m.score_batch([ScoringItem(s, e), ScoringItem(no_mask, edit_of(no_mask, 1)), ScoringItem(full, edit_of(full, 2))])
    assert [v.region for v in rows[0]] == ["all", "edited", "unedited"]
    for v, mask in zip(rows[0], (None, s.mask, ~s.mask)):
        want = structure_distance_by_hand(net, s.source, e, mask=mask, resize=32)
        assert v.flag is None and v.value == pytest.approx(want, rel=1e-4)
    assert len({round(v.value, 8) for v in rows[0]}) == 3
    assert not math.isnan(rows[1][0].value) and [v.flag for v in rows[1][1:]] == ["no_mask", "no_mask"]
    assert rows[2][1].flag is None and rows[2][2].flag == "empty_region" and math.isnan(rows[2][2].value)
    missing = dm.StructureDistance(reference="target", **TINY).score_batch([ScoringItem(s, e)])
    assert math.isnan(missing[0][0].value) and missing[0][0].flag == "missing:target"


def test_structure_distance_source_keys_cached(monkeypatch):
    m = dm.StructureDistance(**TINY)
    bundle = m.bundle
    seen = []
    real = bundle.keys
    monkeypatch.setattr(bundle, "keys", lambda x, layer: (seen.append(x.shape[0]), real(x, layer))[1])
    s = sample("a")
    v1 = m.score_batch([ScoringItem(s, edit_of(s, 1))])[0][0].value
    assert sum(seen) == 2 and len(dm.KEY_FEATURES) == 1  # the source's keys only, not the edit's
    v2 = m.score_batch([ScoringItem(s, edit_of(s, 1)), ScoringItem(s, edit_of(s, 2))])
    assert sum(seen) == 4  # two edits, the source from the cache
    assert v2[0][0].value == pytest.approx(v1, rel=1e-4)  # float32 noise of another batch shape
    # the budget bounds the cache: once full it keeps its first entries (a sweep rescans in order)
    small = dm.FeatureCache(max_bytes=100)
    assert [small.put(("k", k), np.zeros(10, np.float32)) for k in (1, 2, 3)] == [True, True, False]
    assert small.get(("k", 1)) is not None and small.get(("k", 3)) is None and small.nbytes == 80


# -- weights ---------------------------------------------------------------------------------
def test_state_dict_file_loads_with_dino_layout(tmp_path, no_weights):
    rnd = dm.Dino(**RND)
    sd = {k: v.clone() for k, v in rnd.bundle.net.state_dict().items()}
    assert set(sd) == dino_layout()
    f = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(sd, f)
    loaded = dm.Dino(weights_path=str(f), device="cpu")
    assert loaded.available() is None
    assert "weights_path file" in loaded.weights() and str(f) in loaded.weights() and "RANDOM" not in loaded.weights()
    assert not loaded.bundle.random and loaded.bundle.key != rnd.bundle.key
    img = textured(64, 64, 40)
    np.testing.assert_array_equal(loaded.embed([img]), rnd.embed([img]))
    s = sample("a")
    it = ScoringItem(s, edit_of(s, 1))
    sd_file = dm.StructureDistance(model="dino_vits16", resize=32, weights_path=str(f), device="cpu")
    assert sd_file.score_batch([it])[0][0].value == dm.StructureDistance(**TINY).score_batch([it])[0][0].value
    # a folder holding the official file name resolves too
    assert dm.resolve_weights("dino_vits16", str(tmp_path)).path == str(f)
    # a file that is not this architecture's state dict: unavailable, naming what is wrong
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.11.")}, bad)
    with pytest.raises(dm.MetricUnavailable, match="blocks.11"):
        dm.Dino(weights_path=str(bad), device="cpu").load()
    with pytest.raises(dm.MetricUnavailable, match="does not fit ViT-S/8"):
        dm.Dino(model="dino_vits8", weights_path=str(f), device="cpu").load()  # pos_embed 197 vs 785 tokens


def test_training_checkpoint_layout_is_unwrapped():
    t = {"module.backbone.cls_token": 1, "module.backbone.blocks.0.norm1.weight": 2, "module.head.mlp.0.weight": 3,
         "module.head.last_layer.weight_g": 4}
    assert dm.dino_state_dict({"teacher": t, "epoch": 100}) == {"cls_token": 1, "blocks.0.norm1.weight": 2}
    assert dm.dino_state_dict({"state_dict": {"pos_embed": 5}}) == {"pos_embed": 5}
    assert dm.dino_state_dict({"pos_embed": 5, "head.weight": 6}) == {"pos_embed": 5}


def test_resolution_order_without_loading(tmp_path, no_weights):
    arch = dm.ARCHS["dino_vitb8"]
    assert "does not exist" in dm.resolve_weights("dino_vitb8", str(tmp_path / "nope.pth"))
    # Hugging Face hub cache of timm's copy
    repo = tmp_path / "hf_home" / "hub" / "models--timm--vit_base_patch8_224.dino"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"x")
    r = dm.resolve_weights("dino_vitb8")
    assert r.origin == "hf_cache" and r.path.endswith("model.safetensors")
    # torch hub's cache comes before it
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / arch.file).write_bytes(b"x")
    r = dm.resolve_weights("dino_vitb8", allow_random=True)
    assert r.origin == "torch_hub" and r.path == str(hub / arch.file)
    # and weights_path before both
    own = tmp_path / "mine.pth"
    own.write_bytes(b"x")
    assert dm.resolve_weights("dino_vitb8", str(own)).path == str(own)
    assert dm.StructureDistance(weights_path=str(own)).weights().endswith(f"weights_path file {own}")


def test_missing_weights_unavailable_and_suite_rows(no_weights):
    from harness.scoring import MetricSuite

    for cls, arch in ((dm.Dino, dm.ARCHS["dino_vits16"]), (dm.StructureDistance, dm.ARCHS["dino_vitb8"])):
        m = cls()
        reason = m.available()
        assert reason and arch.name in reason and arch.file in reason and arch.url in reason
        assert "weights_path" in reason and str(no_weights / "torch_home" / "hub" / "checkpoints" / arch.file) in reason
        assert arch.hf_repo in reason and str(no_weights / "hf_home" / "hub") in reason
        assert "allow_random_weights" in reason
        assert "weights unavailable" in m.weights() and "RANDOM" not in m.weights()
        with pytest.raises(dm.MetricUnavailable):
            m.load()
    suite = MetricSuite({"protocol": "t", "reference": "source", "regions": ["all", "unedited"], "region_rule": "zero_fill",
                         "items": {"dino": {}, "structure_distance": {"report_scale": 1000}}})
    s = sample("a")
    for e in suite.entries:
        assert e.unavailable
        rows = suite.score(e, [ScoringItem(s, edit_of(s, 1))])[0]
        assert [v.region for v in rows] == ["all"]
        assert all(math.isnan(v.value) and v.flag == "unavailable" for v in rows)
    desc = suite.describe()
    assert "weights unavailable" in desc["dino"]["weights"] and desc["structure_distance"]["region_rule"].endswith("reported x1000")
    assert desc["dino"]["higher_is_better"] and not desc["structure_distance"]["higher_is_better"]


def test_params_validated():
    with pytest.raises(TypeError):
        dm.Dino(modle="dino_vits16")
    with pytest.raises(ValueError):
        dm.Dino(model="dino_vitl14")
    with pytest.raises(ValueError):
        dm.StructureDistance(image_region="background")
    with pytest.raises(ValueError):
        dm.StructureDistance(layer=12)
    with pytest.raises(ValueError):
        dm.Dino(reference="ground_truth")


def test_import_and_resolution_stay_torch_free(tmp_path):
    code = (
        "import sys\n"
        "import harness.metrics, harness.metrics.dino as d\n"
        "for m in (d.Dino(), d.StructureDistance(), d.Dino(allow_random_weights=True)):\n"
        "    m.available(); m.weights(); m.region_rule()\n"
        "heavy = sorted(k for k in ('torch', 'timm', 'torchvision') if k in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_HOME=str(tmp_path / "t"), HF_HOME=str(tmp_path / "h"))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cls_with_class_token_only_last_block_equals_full_forward():
    bundle = dm.load_dino("dino_vits16", device="cpu", allow_random=True)
    assert dm._plain_timm_block(bundle.net.blocks[-1])
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(bundle.cls(x), bundle.cls_full(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bundle.cls_full(x), bundle.net.norm(bundle.net.blocks(bundle.tokens(x)))[:, 0])
