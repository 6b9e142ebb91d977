"""PartEdit's part mask and part tokens (issue 14): methods.partedit.mask, methods.partedit.tokens.

Otsu against scikit-image on random and constructed maps; the adaptive binarisation on hand-made
maps; the aggregation against an independent per-pixel computation; the layer sets on SDXL's real
architecture (random weights on the meta device: no memory, no weights) and on the tiny SDXL UNet,
each checked against the processors' actual call order; token files round trips and refusals.
No network, CPU only.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from methods.diffusion.loading import MissingWeights
from methods.partedit.mask import (CODE_LAYERS, LAYER_SETS, aggregate, binarize, call_order, code_map_grids,
                                   cross_attention_layers, layer_indices, otsu_threshold, part_mask,
                                   select_layers, time_aggregate)
from methods.partedit.tokens import (PART_TOKENS, TOKEN_DATASET, TOKEN_PARAM, find_part_token, load_part_token,
                                     random_part_token, save_part_token, tokens_status)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _close(t: torch.Tensor, want, atol: float = 1e-7) -> bool:
    """Elementwise ``t == want`` within ``atol`` (float32 values vs decimal literals)."""
    return bool(np.allclose(t.double().numpy(), np.asarray(want, dtype=np.float64), rtol=0, atol=atol))


# ---------------------------------------------------------------------------------------------
# Otsu == scikit-image
# ---------------------------------------------------------------------------------------------
def _maps(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for i in range(count):
        n = int(rng.integers(2, 90))
        kind = i % 5
        if kind == 0:  # uniform
            a = rng.random((n, n))
        elif kind == 1:  # bimodal
            half = n * n // 2
            a = np.concatenate([rng.normal(0.2, 0.05, half), rng.normal(0.7, 0.1, n * n - half)]).reshape(n, n)
        elif kind == 2:  # tiny range: 1e-4 wide, 256 bins of ~4e-7 (ULP at 0.3 is 3e-8)
            a = rng.random((n, n)) * 1e-4 + 0.3
        elif kind == 3:  # few levels: values on bin edges and exact variance ties
            a = np.round(rng.random((n, n)) * 7) / 7
        else:  # attention-like: a bright blob on a noisy floor, min-max normalised
            yy, xx = np.mgrid[:n, :n]
            a = np.exp(-((yy - n / 3) ** 2 + (xx - n / 2) ** 2) / (2 * (n / 6 + 1) ** 2)) + 0.05 * rng.random((n, n))
            a = (a - a.min()) / (a.max() - a.min())
        out.append(a.astype(np.float32))
    return out


def test_otsu_equals_skimage_bit_for_bit_on_many_maps():
    # Same computation (NumPy's histogram binning and scikit-image's float32 accumulation), so
    # equality is exact, not within a tolerance; 500 maps of five kinds incl. near-uniform ones
    # where a different accumulation order would move the argmax by a bin.
    maps = _maps(0, 500)
    mismatches = [(i, float(otsu_threshold(torch.from_numpy(a))), float(threshold_otsu(a)))
                  for i, a in enumerate(maps) if float(otsu_threshold(torch.from_numpy(a))) != float(threshold_otsu(a))]
    assert mismatches == []


def test_otsu_constructed_maps():
    # Two values 0 and 1, 30 % ones: every threshold between the modes has the same variance;
    # the first (bin 0's center, 1/512) wins, as in scikit-image.
    a = np.zeros((10, 10), np.float32)
    a.flat[:30] = 1
    assert float(otsu_threshold(torch.from_numpy(a))) == pytest.approx(1 / 512, abs=0) == float(threshold_otsu(a))
    # Constant map: its value (scikit-image's rule), also for a 1-pixel map.
    assert float(otsu_threshold(torch.full((4, 5), 0.37))) == pytest.approx(0.37, rel=1e-7)
    assert float(otsu_threshold(torch.tensor([[2.5]]))) == 2.5
    # float64 stays float64 and matches.
    b = np.random.default_rng(3).random((33, 17))
    t = otsu_threshold(torch.from_numpy(b))
    assert t.dtype == torch.float64 and float(t) == float(threshold_otsu(b))
    # Half input is thresholded as its float32 copy.
    h = torch.rand(20, 20, generator=torch.Generator().manual_seed(0)).half()
    assert float(otsu_threshold(h)) == float(threshold_otsu(h.float().numpy()))
    # nbins is honoured.
    assert float(otsu_threshold(torch.from_numpy(b.astype(np.float32)), nbins=16)) == float(
        threshold_otsu(b.astype(np.float32), nbins=16))


def test_otsu_batched_matches_per_map():
    maps = _maps(7, 10)
    stack = torch.stack([torch.from_numpy(m[:2, :2].copy()) for m in maps] + [torch.full((2, 2), 0.5)])
    got = otsu_threshold(stack, batched=True)
    assert got.shape == (11,)
    want = [float(threshold_otsu(m[:2, :2])) for m in maps] + [0.5]
    assert got.tolist() == want


def test_otsu_refuses_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        otsu_threshold(torch.tensor([[0.0, float("nan")], [1.0, 0.5]]))
    with pytest.raises(ValueError, match="empty"):
        otsu_threshold(torch.zeros(0, 3))
    # A range below float32 resolution: NumPy refuses it, so do we.
    tight = np.float32(0.3) + np.arange(4, dtype=np.float32) * np.spacing(np.float32(0.3))
    with pytest.raises(ValueError):
        threshold_otsu(tight.reshape(2, 2))
    with pytest.raises(ValueError, match="Too many bins"):
        otsu_threshold(torch.from_numpy(tight.reshape(2, 2)))


# ---------------------------------------------------------------------------------------------
# binarize (Eq. 5) on hand-made maps
# ---------------------------------------------------------------------------------------------
# Values 0, 0.1 x 3, 0.45, 1.0. Between-class variance w1 * w2 * (m1 - m2)^2 of the splits:
#   {0, .1 x3} | {.45, 1}: 4 * 2 * 0.65^2 = 3.38;  {0, .1 x3, .45} | {1}: 5 * 1 * 0.85^2 = 3.6125 (max);
#   {0} | rest: 1 * 5 * 0.35^2 = 0.6125. So k is the first bin center of the best split: the center of
#   0.45's bin, floor(0.45 * 256) = 115 -> k = 115.5 / 256 = 0.451171875 (0.5k = 0.2256, 1.5k = 0.6768).
HAND = torch.tensor([[0.0, 0.1, 0.1], [0.1, 0.45, 1.0]])


def test_binarize_partedit_rule_by_hand():
    k = float(otsu_threshold(HAND))
    assert k == float(threshold_otsu(HAND.numpy()))
    assert k == 115.5 / 256
    out, kk = binarize(HAND, return_threshold=True)
    assert float(kk) == k
    # below 0.5k -> 0 (0.0, 0.1 x 3); between -> kept (0.45); >= 1.5k -> 1 (1.0)
    assert _close(out, [[0.0, 0.0, 0.0], [0.0, 0.45, 1.0]])
    # the input is not modified
    assert HAND[0, 1] == pytest.approx(0.1)


def test_binarize_omega_is_a_parameter():
    m = torch.tensor([[0.0, 0.2, 0.3, 0.5, 0.6, 0.8, 1.0]])
    k = 0.4
    # omega 1.5: upper 0.6 -> 0.6, 0.8, 1.0 become 1; lower 0.2 -> 0.0 becomes 0; 0.2..0.5 kept.
    assert _close(binarize(m, threshold=k), [[0.0, 0.2, 0.3, 0.5, 1.0, 1.0, 1.0]])
    # omega 1.0: upper 0.4 -> 0.5 becomes 1 too.
    assert _close(binarize(m, threshold=k, omega=1.0), [[0.0, 0.2, 0.3, 1.0, 1.0, 1.0, 1.0]])
    # omega 2.5: upper 1.0 -> only 1.0 is "one", 0.6 and 0.8 kept.
    assert _close(binarize(m, threshold=k, omega=2.5), [[0.0, 0.2, 0.3, 0.5, 0.6, 0.8, 1.0]])
    # the lower cut is exactly 0.5k: 0.2 == 0.5 * 0.4 stays (m < lower is zeroed, not <=)
    assert binarize(torch.tensor([0.19, 0.2]), threshold=0.4).tolist() == pytest.approx([0.0, 0.2])
    with pytest.raises(ValueError, match="omega"):
        binarize(m, omega=0.0)


def test_binarize_other_rules():
    m = torch.tensor([[0.0, 0.2, 0.3, 0.5, 0.6, 0.8, 1.0]])
    assert binarize(m, rule="otsu", threshold=0.4).tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]]
    assert binarize(m, rule="binary_0.5").tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]]
    out, k = binarize(m, rule="none", return_threshold=True)
    assert torch.equal(out, m) and bool(torch.isnan(k))
    # rule "otsu" without an explicit threshold uses scikit-image's Otsu value
    k = threshold_otsu(m.numpy())
    assert binarize(m, rule="otsu").tolist() == [[float(v >= k) for v in m[0].tolist()]]
    with pytest.raises(ValueError, match="unknown binarisation rule"):
        binarize(m, rule="disabled")


# ---------------------------------------------------------------------------------------------
# aggregate: upsample + mean + min-max against an independent computation
# ---------------------------------------------------------------------------------------------
def _bilinear_half_pixel(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Independent bilinear resize with half-pixel centers (align_corners=False, edge clamp)."""
    sh, sw = m.shape
    ys = np.clip((np.arange(h) + 0.5) * sh / h - 0.5, 0, None)
    xs = np.clip((np.arange(w) + 0.5) * sw / w - 0.5, 0, None)
    y0 = np.minimum(np.floor(ys).astype(int), sh - 1)
    x0 = np.minimum(np.floor(xs).astype(int), sw - 1)
    y1, x1 = np.minimum(y0 + 1, sh - 1), np.minimum(x0 + 1, sw - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = m[y0][:, x0] * (1 - wx) + m[y0][:, x1] * wx
    bot = m[y1][:, x0] * (1 - wx) + m[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def test_aggregate_against_independent_computation():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(4, 4, generator=g), torch.rand(8, 8, generator=g), torch.rand(16, 16, generator=g)]
    got = aggregate(maps, 16)
    ref = np.mean([_bilinear_half_pixel(m.double().numpy(), 16, 16) for m in maps], axis=0)
    ref = (ref - ref.min()) / (ref.max() - ref.min() + 1e-6)
    assert got.shape == (16, 16) and got.dtype == torch.float32
    # float32 accumulation vs a float64 reference of the same formula: agreement to 1e-5.
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    assert float(got.min()) == 0.0 and float(got.max()) == pytest.approx(1.0, abs=1e-5)


def test_aggregate_hand_values_and_shapes():
    # Two 1x1 maps (constant after upsampling) and one 2x2 map at size 2: no resize of the 2x2.
    a, b = torch.tensor([[1.0]]), torch.tensor([[3.0]])
    c = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    raw = aggregate([a, b, c], (2, 2), normalize=False)
    # mean per pixel: (1 + 3 + c) / 3
    assert _close(raw, [[4 / 3, 2.0], [8 / 3, 10 / 3]])
    norm = aggregate([a, b, c], 2)
    assert _close(norm, [[0.0, 1 / 3 * 6 / (6 + 3e-6)], [2 / 3 * 6 / (6 + 3e-6), 6 / (6 + 3e-6)]], atol=1e-6)
    # (1, 1, h, w) maps are accepted; non-square sizes too
    assert aggregate([c[None, None]], (3, 5)).shape == (3, 5)
    with pytest.raises(ValueError, match="no attention maps"):
        aggregate([], 8)
    with pytest.raises(ValueError, match="map 1 must be"):
        aggregate([a, torch.zeros(2, 2, 2)], 4)


def test_part_mask_is_aggregate_then_binarize():
    g = torch.Generator().manual_seed(1)
    maps = [torch.rand(8, 8, generator=g) for _ in range(3)]
    agg = aggregate(maps, 32)
    assert torch.equal(part_mask(maps, size=32, omega=1.2), binarize(agg, omega=1.2))
    m, k = part_mask(maps, size=32, rule="otsu", return_threshold=True)
    assert float(k) == float(threshold_otsu(agg.numpy()))
    assert set(m.unique().tolist()) == {0.0, 1.0}


def test_time_aggregate_reports_the_code_layers():
    grids = code_map_grids(16)  # 40 layers at 16 px latents: 36 at 4x4 and 4 at 8x8
    assert len(grids) == 40 and grids.count((4, 4)) == 36 and grids.count((8, 8)) == 4
    assert code_map_grids()[:1] == [(32, 32)] and code_map_grids()[-1] == (64, 64)
    r = time_aggregate(grids, 64, repeats=2)
    assert r["layers"] == 40 and r["size"] == 64 and r["seconds"] > 0


# ---------------------------------------------------------------------------------------------
# layer sets: call order on the real SDXL architecture and on the tiny UNet
# ---------------------------------------------------------------------------------------------
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


class _Recorder:
    """Attention processor that records its layer's name and returns its input (a counting
    forward: the call order without computing attention)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        self.log.append(self.name)
        return hidden_states


def _forward_cross_order(unet, device: str, cross_dim: int, text_dim: int, latent: int) -> list[str]:
    log: list[str] = []
    unet.set_attn_processor({k: _Recorder(k[: -len(".processor")], log) for k in unet.attn_processors})
    with torch.device(device), torch.no_grad():
        unet(torch.zeros(1, 4, latent, latent), torch.tensor(10), encoder_hidden_states=torch.zeros(1, 7, cross_dim),
             added_cond_kwargs={"text_embeds": torch.zeros(1, text_dim), "time_ids": torch.zeros(1, 6)})
    return [n for n in log if n.endswith("attn2")]


@pytest.fixture(scope="module")
def sdxl_meta_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the real architecture, no memory, no weights
        return UNet2DConditionModel(**SDXL_UNET)


def test_sdxl_call_order_and_code_layers(sdxl_meta_unet):
    unet = sdxl_meta_unet
    called = _forward_cross_order(unet, "meta", 2048, 1280, 16)
    assert len(called) == 70
    assert cross_attention_layers(unet) == called  # our static order == the forward's call order
    registered = [k[: -len(".processor")] for k in unet.attn_processors if k.endswith("attn2.processor")]
    assert registered != called  # attn_processors lists up_blocks before mid_block
    sel = select_layers(unet, "code")
    assert not sel.fallback and sel.indices == CODE_LAYERS and len(sel.names) == 40
    names = list(sel.names)
    # call-order 24..33 = the middle block, 34..59 = the first 26 of up_blocks.0, 0..3 = down_blocks.1
    assert names[:10] == [f"mid_block.attentions.0.transformer_blocks.{i}.attn2" for i in range(10)]
    assert names[10] == "up_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert names[35] == "up_blocks.0.attentions.2.transformer_blocks.5.attn2"
    assert names[36:] == [f"down_blocks.1.attentions.{a}.transformer_blocks.{b}.attn2" for a in (0, 1) for b in (0, 1)]
    assert sum(n.startswith("up_blocks.1") for n in names) == 0
    # The same numbers in registration order: all 36 up-block layers + down_blocks.1's 4.
    alt = select_layers(unet, "code_name_order")
    assert len(alt.indices) == 40 and sum(n.startswith("up_blocks") for n in alt.names) == 36
    assert sum(n.startswith("down_blocks.1") for n in alt.names) == 4 and not any("mid" in n for n in alt.names)
    paper = select_layers(unet, "paper")
    assert paper.names == tuple(f"up_blocks.0.attentions.0.transformer_blocks.{i}.attn2" for i in range(8))
    assert paper.indices == tuple(range(34, 42))
    assert layer_indices(unet, "all") == list(range(70))


def test_tiny_sdxl_layers_and_fallbacks():
    from methods.diffusion.tiny import tiny_components

    unet = tiny_components("sdxl")["unet"]
    called = _forward_cross_order(unet, "cpu", 64, 32, 8)
    assert len(called) == 8  # down_blocks.1: 2, mid: 2, up_blocks.0: 2 attentions x 2
    assert cross_attention_layers(unet) == called
    code = select_layers(unet, "code")
    assert code.fallback and code.used == "all" and code.indices == tuple(range(8))
    assert "8" in code.note and "70" in code.note
    assert layer_indices(unet) == list(range(8))
    paper = select_layers(unet, "paper")
    assert paper.fallback and paper.used == "decoder" and paper.indices == (4, 5, 6, 7)
    assert all(n.startswith("up_blocks.0") for n in paper.names)
    with pytest.raises(ValueError, match="unknown layer set"):
        select_layers(unet, "decoder")
    assert set(LAYER_SETS) == {"code", "code_name_order", "paper", "all"}


def test_call_order_of_names():
    names = ["up_blocks.1.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn1",
             "down_blocks.2.attentions.1.transformer_blocks.10.attn2",
             "down_blocks.2.attentions.1.transformer_blocks.2.attn2",
             "mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert call_order(names) == [names[3], names[2], names[1], names[4], names[0]]


def test_mask_tokens_train_do_not_import_torch():
    code = ("import sys, methods.partedit.mask, methods.partedit.tokens, methods.partedit.train; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# part tokens
# ---------------------------------------------------------------------------------------------
def test_released_token_names():
    assert list(PART_TOKENS) == [
        "torso_custom", "chair_custom", "carhood_custom", "partimage_biped_head", "partimage_carbody",
        "partimage_human_hair", "partimage_human_head", "partimage_human_torso", "partimage_quadruped_head"]
    assert "seat" in PART_TOKENS["chair_custom"] and "hood" in PART_TOKENS["carhood_custom"]


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_token_round_trip(tmp_path, ext):
    tok = random_part_token(2048, seed=3)
    assert tok.shape == (2, 2048) and tok.dtype == torch.float32
    assert torch.equal(tok, random_part_token(2048, seed=3)) and not torch.equal(tok, random_part_token(2048, seed=4))
    p = save_part_token(tok, tmp_path / "sub" / f"tok{ext}")
    back = load_part_token(p, dim=2048)
    assert torch.equal(back, tok)


def test_token_formats_the_code_writes(tmp_path):
    from safetensors.torch import save_file

    tok = random_part_token(64, seed=0)
    torch.save(tok[None].half(), tmp_path / "batched_half.pt")  # (1, 2, D) half: accepted, as float32
    assert torch.equal(load_part_token(tmp_path / "batched_half.pt"), tok.half().float())
    torch.save({"embedding": tok}, tmp_path / "dict.pt")
    assert torch.equal(load_part_token(tmp_path / "dict.pt"), tok)
    save_file({"embedding": tok}, str(tmp_path / "t.safetensors"))
    assert torch.equal(load_part_token(tmp_path / "t.safetensors"), tok)


def test_token_refusals_name_the_file(tmp_path):
    from safetensors.torch import save_file

    cases = {
        "shape.pt": (lambda p: torch.save(torch.zeros(3, 64), p), "expected shape \\(2, D\\)"),
        "key.pt": (lambda p: torch.save({"emb": torch.zeros(2, 64)}, p), "without the key 'embedding'"),
        "int.pt": (lambda p: torch.save(torch.zeros(2, 64, dtype=torch.int64), p), "floating-point"),
        "nan.pt": (lambda p: torch.save(torch.full((2, 64), float("nan")), p), "non-finite"),
        "list.pt": (lambda p: torch.save([1, 2], p), "expected a tensor"),
        "key.safetensors": (lambda p: save_file({"weights": torch.zeros(2, 64)}, str(p)), "no key 'embedding'"),
        "junk.safetensors": (lambda p: Path(p).write_bytes(b"not a file"), "not a readable safetensors"),
        "junk.pt": (lambda p: Path(p).write_bytes(b"garbage"), "torch.load"),
        "tok.bin": (lambda p: torch.save(torch.zeros(2, 64), p), "unknown extension"),
    }
    for name, (write, msg) in cases.items():
        p = tmp_path / name
        write(p)
        with pytest.raises(ValueError, match=msg) as err:
            load_part_token(p)
        assert str(p) in str(err.value), name
    torch.save(torch.zeros(2, 64), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="width 64 does not match the text width 2048"):
        load_part_token(tmp_path / "w.pt", dim=2048)
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_part_token(tmp_path / "nothere.pt")


def test_token_pickle_with_objects_is_refused(tmp_path):
    # weights_only=True: a pickled arbitrary object is not unpickled.
    p = tmp_path / "evil.pt"
    torch.save({"embedding": torch.zeros(2, 4), "obj": Path("/etc")}, p)
    with pytest.raises(ValueError, match="evil.pt"):
        load_part_token(p)


def test_find_part_token_layouts_and_missing(tmp_path):
    tok = random_part_token(16, seed=0)
    save_part_token(tok, tmp_path / "pt" / "partimage_human_head.pt")
    save_part_token(tok, tmp_path / "chair_custom.safetensors")
    assert find_part_token("partimage_human_head", tmp_path) == tmp_path / "pt" / "partimage_human_head.pt"
    assert find_part_token("chair_custom", tmp_path) == tmp_path / "chair_custom.safetensors"
    direct = tmp_path / "pt" / "partimage_human_head.pt"
    assert find_part_token(str(direct)) == direct
    with pytest.raises(MissingWeights) as err:
        find_part_token("partimage_human_hair", tmp_path)
    msg = str(err.value)
    for piece in ("partimage_human_hair", str(tmp_path / "pt" / "partimage_human_hair.pt"), TOKEN_DATASET, TOKEN_PARAM):
        assert piece in msg
    with pytest.raises(MissingWeights, match="no token folder is set"):
        find_part_token("torso_custom", None)
    with pytest.raises(MissingWeights, match="not one of the released tokens"):
        find_part_token("elbow", tmp_path)
    with pytest.raises(MissingWeights, match="missing.pt does not exist"):
        find_part_token(tmp_path / "missing.pt")


def test_tokens_status(tmp_path):
    save_part_token(random_part_token(8, seed=0), tmp_path / "pt" / "torso_custom.pt")
    status = tokens_status(tmp_path)
    assert len(status) == 9
    present = [label for label, how in status if how is None]
    assert len(present) == 1 and present[0].startswith("part token torso_custom") and "torso_custom.pt" in present[0]
    missing = [how for _, how in status if how is not None]
    assert len(missing) == 8 and all(TOKEN_DATASET in how and TOKEN_PARAM in how for how in missing)
    assert all(how is not None for _, how in tokens_status(None))


def test_official_demo_keys_resolve_to_the_files_the_demo_loads(tmp_path):
    """PartEdit-Bench's token_cls and the demo use model.py's keys; each resolves to the file the
    released code loads for it (the two head tokens swapped, as released)."""
    import torch

    from methods.partedit.tokens import OFFICIAL_KEYS, PART_TOKENS, find_part_token, save_part_token

    assert set(OFFICIAL_KEYS.values()) == set(PART_TOKENS)
    (tmp_path / "pt").mkdir()
    for name in PART_TOKENS:
        save_part_token(torch.zeros(2, 8), tmp_path / "pt" / f"{name}.pt")
    assert find_part_token("human_hair", tmp_path) == tmp_path / "pt" / "partimage_human_hair.pt"
    assert find_part_token("human_torso_custom", tmp_path) == tmp_path / "pt" / "torso_custom.pt"
    assert find_part_token("quadruped_head", tmp_path) == tmp_path / "pt" / "partimage_biped_head.pt"
    assert find_part_token("partimage_quadruped_head", tmp_path) == tmp_path / "pt" / "partimage_quadruped_head.pt"
