"""ZONE's mask stages (issue 13): localisation (methods.zone.localise), SAM refinement
(methods.zone.refine) and the FFT edge smoother / composite (methods.zone.smoother).

Hand-computed values on constructed attention maps, masks and images; the attention capture on
the tiny random-weight InstructPix2Pix UNet (methods.diffusion.tiny); a random-weight SAM of the
real architecture. No network, CPU only.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from methods.diffusion.loading import MissingWeights
from methods.zone.localise import ZoneCapture, code_grid, instruction_positions, localise, rough_mask
from methods.zone.refine import (SAM_CHECKPOINTS, TINY_SAM_SETTINGS, filter_small_regions, load_sam_generator,
                                 pick_segment, refine_mask, region_iou, sam_segments)
from methods.zone.smoother import cast_uint8, composite, dilate, fft_edge_mask, scaled_sizes
from tests.conftest import textured

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------------------------------------
# rough_mask: constructed maps, both rules
# ---------------------------------------------------------------------------------------------
# 2 x 3 maps whose maxima are 1.0, so the 0-255 scaling is 255 * x (float32).
FIRST = np.array([[1.0, 0.5, 0.25],
                  [0.4, 54.9 / 255, 0.2]])
LAST = np.array([[0.0, 0.3, 1.0],
                 [0.1, 0.0, 0.1]])
# code rule, by hand: uint8(255 x) truncates:
#   first -> [[255, 127, 63], [102, 54, 51]]   last -> [[0, 76, 255], [25, 0, 25]]
#   saturating difference -> [[255, 51, 0], [77, 54, 26]]   (0: last > first saturates)
#   doubled, saturated    -> [[255, 102, 0], [154, 108, 52]]  (255: 2 * 255 saturates)
#   <= 108                -> [[F, T, T], [F, T, T]]   (108 itself is kept: the code cuts "> 108")
CODE_EXPECTED = np.array([[False, True, True], [False, True, True]])
# paper rule (Eq. 4), by hand: 255 * (first - last) = [[255, 51, -191.25], [76.5, 54.9, 25.5]] < 128
PAPER_EXPECTED = np.array([[False, True, True], [True, True, True]])


def test_rough_mask_code_rule_hand_values_with_saturation_and_truncation():
    got = rough_mask(FIRST, LAST, size=(2, 3), rule="code")
    assert got.dtype == bool and got.shape == (2, 3)
    np.testing.assert_array_equal(got, CODE_EXPECTED)
    # the (1, 1) pixel: 255 * 54.9 / 255 = 54.9 truncates to 54 -> 108 -> kept; rounding would give
    # 55 -> 110 -> dropped
    assert got[1, 1]
    # thresholds move the cut on the doubled value: 107 drops the 108 pixel, 154 keeps the 154 one
    np.testing.assert_array_equal(rough_mask(FIRST, LAST, (2, 3), "code", threshold=107),
                                  [[False, True, True], [False, False, True]])
    np.testing.assert_array_equal(rough_mask(FIRST, LAST, (2, 3), "code", threshold=154),
                                  [[False, True, True], [True, True, True]])
    # 255 never passes below 255: the saturated pixel (0, 0) stays out
    assert not rough_mask(FIRST, LAST, (2, 3), "code", threshold=254)[0, 0]


def test_rough_mask_paper_rule_hand_values_strict_threshold():
    got = rough_mask(FIRST, LAST, size=(2, 3), rule="paper")
    np.testing.assert_array_equal(got, PAPER_EXPECTED)
    # the rules differ where the difference lies in (54, 128): pixel (1, 0), 76.5
    assert got[1, 0] and not rough_mask(FIRST, LAST, (2, 3), "code")[1, 0]
    # strict "<": differences 127.5 and -127.5 (exact in float); a threshold of 127.5 drops the first
    first, last = np.array([[1.0, 0.5]]), np.array([[0.5, 1.0]])
    np.testing.assert_array_equal(rough_mask(first, last, (1, 2), "paper"), [[True, True]])
    np.testing.assert_array_equal(rough_mask(first, last, (1, 2), "paper", threshold=127.5), [[False, True]])


def test_rough_mask_scale_of_each_map_is_irrelevant():
    # each map is divided by its own maximum: powers of two keep the float arithmetic exact
    for rule in ("code", "paper"):
        np.testing.assert_array_equal(rough_mask(FIRST * 4, LAST * 0.5, (2, 3), rule),
                                      rough_mask(FIRST, LAST, (2, 3), rule))


def test_rough_mask_code_resize_equals_the_codes_three_channel_pil_path():
    rng = np.random.default_rng(3)
    first, last = rng.random((4, 4)), rng.random((4, 4))
    got = rough_mask(first, last, size=(24, 40), rule="code")
    assert got.shape == (24, 40)
    # the official path: 3-channel uint8 maps, cv2.subtract, PIL resize with its default filter,
    # convertScaleAbs x2, > 108 -> 255, bitwise_not
    import cv2

    def u8(m):
        x = m.astype(np.float32)
        return np.repeat(((np.float32(255) * x) / x.max()).astype(np.uint8)[..., None], 3, axis=2)

    diff = cv2.subtract(u8(first), u8(last))
    diff = np.array(Image.fromarray(diff).resize((40, 24)))  # Pillow's default resample for RGB
    img = cv2.convertScaleAbs(diff, alpha=2, beta=0)
    img[img <= 108] = 0
    img[img > 108] = 255
    expected = cv2.bitwise_not(img)[..., 0] == 255
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.sum() < got.size  # both sides present: the comparison is not vacuous


def test_rough_mask_constant_maps_resize_exactly():
    first = np.full((2, 2), 0.5)
    first[0, 0] = 1.0  # max 1 -> 255 at (0,0), 127 elsewhere
    last = np.ones((2, 2))
    # difference: (0,0) 0 ; others 0 (saturated): every pixel of a 5 x 7 image is edited
    assert rough_mask(first, last, (5, 7), "code").all()
    assert rough_mask(first, last, (5, 7), "paper").all()


def test_rough_mask_refuses_bad_maps():
    with pytest.raises(ValueError, match="first map"):
        rough_mask(np.zeros((2, 2)), LAST[:, :2], (2, 2))
    with pytest.raises(ValueError, match="last map has non-finite"):
        rough_mask(FIRST, np.full((2, 3), np.nan), (2, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        rough_mask(FIRST, LAST[:, :2], (2, 3))
    with pytest.raises(ValueError, match="rule must be one of code, paper"):
        rough_mask(FIRST, LAST, (2, 3), rule="otsu")


def test_code_grid_is_ceil_of_a_32nd():
    assert code_grid(512, 512) == (16, 16)
    assert code_grid(512, 384) == (16, 12)
    assert code_grid(500, 64) == (16, 2)


# ---------------------------------------------------------------------------------------------
# ZoneCapture on the tiny InstructPix2Pix UNet
# ---------------------------------------------------------------------------------------------
HEADS = 8  # the tiny UNet's heads (attention_head_dim=8, read by diffusers as the head count)
L_DOWN1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
L_UP1 = ["up_blocks.1.attentions.%d.transformer_blocks.0.attn2" % i for i in (0, 1)]
L_UP2 = ["up_blocks.2.attentions.%d.transformer_blocks.0.attn2" % i for i in (0, 1)]
L_DOWN0 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def captured():
    """Two 'denoising steps' of the tiny IP2P UNet on a 3-row batch (64 px: 8 x 8 latents), with
    several ZoneCaptures and a full reference capture (every row, every step) in one run."""
    import torch

    from methods.diffusion.attention import AttentionStore, CaptureController, ControllerList, install
    from methods.diffusion.tiny import tiny_components

    torch.set_num_threads(1)
    unet = tiny_components("ip2p")["unet"]
    caps = {
        "default": ZoneCapture(),
        "image_size": ZoneCapture(image_size=(64, 64)),
        "g4": ZoneCapture(grid=4),
        "g8": ZoneCapture(grid=8),
        "paper": ZoneCapture(layers="paper", grid=4),
        "row0": ZoneCapture(rows=(0,), grid=4),
    }
    full = AttentionStore(kinds=("cross",), max_tokens=None, keep_steps=True)
    ctrl = ControllerList([*caps.values(), CaptureController(full, rows="all")])
    restore = install(unet, ctrl)
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for step in range(2):
                lat = torch.randn(3, 8, 8, 8, generator=g)  # noisy latent + image latent
                enc = torch.randn(3, 77, 32, generator=g)  # a different text state per row
                unet(lat, 900 - 400 * step, encoder_hidden_states=enc)
    finally:
        restore()
    return unet, caps, full


def _rows(full, name, rows, step=None):
    import torch

    m = full.sums[name] if step is None else full.steps[step][name]
    return m.reshape(3, HEADS, *m.shape[1:])[list(rows)].reshape(-1, *m.shape[1:]).to(torch.float64)


def test_capture_keeps_exactly_the_requested_rows_summed_over_steps(captured):
    _, caps, full = captured
    z = caps["g4"]
    assert z.num_steps == 2 and full.num_steps == 2
    # stored: the code's candidate layers (down / up cross-attention, <= 32 x 32), never the middle block
    assert list(z.store.sums) == [L_DOWN0, L_DOWN1, *L_UP1, *L_UP2]
    for name, m in z.store.sums.items():
        assert m.shape[0] == 2 * HEADS  # rows 1 and 2 only
        ref = full.sums[name].reshape(3, HEADS, *m.shape[1:])
        assert np.array_equal(m.numpy(), ref[[1, 2]].reshape(m.shape).numpy())  # same probs, same sums
        # summed over the two steps
        steps = [full.steps[s][name].reshape(3, HEADS, *m.shape[1:])[[1, 2]].reshape(m.shape) for s in (0, 1)]
        assert np.array_equal(m.numpy(), (steps[0] + steps[1]).numpy())


def test_token_maps_code_layers_values_and_fallback_grid(captured):
    import torch

    _, caps, full = captured
    z = caps["g4"]
    maps = z.token_maps()
    assert maps.shape == (77, 4, 4) and maps.dtype == np.float64
    assert z.used_grid == (4, 4) and z.grid_note is None
    assert z.used_layers == [L_DOWN1, *L_UP1]  # the 4 x 4 down / up layers (the middle block is 2 x 2)
    manual = torch.cat([_rows(full, n, (1, 2)).reshape(-1, 4, 4, 77) for n in z.used_layers]).mean(0)
    np.testing.assert_allclose(maps, manual.permute(2, 0, 1).numpy(), rtol=0, atol=0)
    # probabilities sum to 1 over the tokens at every query, per step: 2 steps -> 2 everywhere
    # (float32 softmax rounding in each summed map: 1e-6)
    np.testing.assert_allclose(maps.sum(0), 2.0, atol=1e-6)

    # grid=None and image_size=(64, 64) ask for the code's 2 x 2 (ceil(64 / 32)), which no down /
    # up layer of the tiny UNet has: the nearest finer grid (4 x 4) is read, and said so
    for key in ("default", "image_size"):
        c = caps[key]
        np.testing.assert_array_equal(c.token_maps(), maps)
        assert c.used_grid == (4, 4) and c.used_layers == z.used_layers
        assert "2x2" in c.grid_note and "4x4" in c.grid_note
        info = c.info()
        assert info["attention_grid"] == [4, 4] and info["attention_rows"] == [1, 2]
        assert info["attention_steps"] == 2 and info["attention_grid_note"] == c.grid_note

    g8 = caps["g8"]
    m8 = g8.token_maps()
    assert m8.shape == (77, 8, 8) and g8.used_layers == [L_DOWN0, *L_UP2]
    manual8 = torch.cat([_rows(full, n, (1, 2)).reshape(-1, 8, 8, 77) for n in g8.used_layers]).mean(0)
    np.testing.assert_allclose(m8, manual8.permute(2, 0, 1).numpy(), rtol=0, atol=0)


def test_token_maps_other_rows_give_other_maps(captured):
    _, caps, _ = captured
    null_rows = caps["g4"].token_maps()
    text_row = caps["row0"].token_maps()
    assert caps["row0"].store.sums[L_DOWN1].shape[0] == HEADS
    assert np.abs(null_rows - text_row).max() > 1e-3  # row 0 has other encoder states


def test_token_maps_paper_layers_resized_to_grid(captured):
    import torch
    import torch.nn.functional as F

    _, caps, full = captured
    z = caps["paper"]
    maps = z.token_maps()
    # supplement B: 2nd-4th down blocks, first three up blocks -> down_blocks.1 (4 x 4), up_blocks.1
    # (4 x 4, 2 layers), up_blocks.2 (8 x 8, 2 layers); down_blocks.0 and the middle block excluded
    assert z.used_layers == [L_DOWN1, *L_UP1, *L_UP2]
    assert set(z.store.sums) == {L_DOWN1, *L_UP1, *L_UP2}
    parts = [_rows(full, n, (1, 2)).reshape(-1, 4, 4, 77) for n in [L_DOWN1, *L_UP1]]
    for n in L_UP2:  # 8 x 8 -> 4 x 4 by 2 x 2 means
        x = _rows(full, n, (1, 2)).reshape(-1, 8, 8, 77).permute(0, 3, 1, 2)
        parts.append(F.avg_pool2d(x, 2).permute(0, 2, 3, 1))
    manual = torch.cat(parts).mean(0).permute(2, 0, 1).numpy()
    np.testing.assert_allclose(maps, manual, rtol=1e-12, atol=1e-15)  # area == avg pool up to rounding
    np.testing.assert_allclose(maps.sum(0), 2.0, atol=1e-6)
    assert "4x4" in z.grid_note


def test_capture_errors_are_clear():
    import torch

    from methods.diffusion.attention import install
    from methods.diffusion.tiny import tiny_components

    with pytest.raises(ValueError, match="no cross-attention maps were captured"):
        ZoneCapture(grid=4).token_maps()
    with pytest.raises(ValueError, match="layers must be one of code, paper"):
        ZoneCapture(layers="all")
    with pytest.raises(ValueError, match="distinct non-negative"):
        ZoneCapture(rows=(1, 1))
    unet = tiny_components("ip2p")["unet"]
    g = torch.Generator().manual_seed(1)
    z = ZoneCapture()
    restore = install(unet, z)
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=r"keeps batch rows \(1, 2\).*2 rows"):
            unet(torch.randn(2, 8, 8, 8, generator=g), 10, encoder_hidden_states=torch.randn(2, 77, 32, generator=g))
    finally:
        restore()
    # a non-square latent (8 x 16) with grid=None cannot be guessed; an explicit grid works
    for grid, expect in ((None, None), ((2, 4), (4, 8))):
        z = ZoneCapture(grid=grid)
        restore = install(unet, z)
        try:
            with torch.no_grad():
                enc = torch.randn(3, 77, 32, generator=g)
                unet(torch.randn(3, 8, 8, 16, generator=g), 10, encoder_hidden_states=enc)
        finally:
            restore()
        if expect is None:
            with pytest.raises(ValueError, match="not a square"):
                z.token_maps()
        else:
            assert z.token_maps().shape == (77, 4, 8) and z.used_grid == expect


def test_localise_reads_bos_and_eos_maps(captured):
    from methods.diffusion.tiny import tiny_tokenizer

    _, caps, _ = captured
    tok = tiny_tokenizer()
    z = caps["g4"]
    maps = z.token_maps()
    n = len(tok.encode("make it red"))
    for rule in ("code", "paper"):
        mask, info = localise(z, tok, "make it red", (64, 48), rule=rule)
        np.testing.assert_array_equal(mask, rough_mask(maps[0], maps[n - 1], (64, 48), rule=rule))
        assert info["token_positions"] == [0, n - 1] and info["mask_rule"] == rule
        assert info["mask_threshold"] == {"code": 108.0, "paper": 128.0}[rule]
        assert info["attention_grid"] == [4, 4] and info["attention_steps"] == 2
    assert localise(z, tok, "make it red", (64, 48), threshold=20)[1]["mask_threshold"] == 20.0


def test_instruction_positions_with_the_tiny_tokenizer():
    from methods.diffusion.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    for text in ("make it red", "give him glasses", ""):
        ids = tok.encode(text)
        first, last = instruction_positions(tok, text)
        assert (first, last) == (0, len(ids) - 1)
        padded = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert padded[first] == tok.bos_token_id
        assert padded[last] == tok.eos_token_id and tok.eos_token_id not in padded[1:last]  # first EOS
    assert instruction_positions(tok, "") == (0, 1)
    long = "make the cat wear a very very very tall hat " * 10  # > 77 tokens
    assert len(tok.encode(long)) > 77
    assert instruction_positions(tok, long) == (0, 76)
    assert tok(long, padding="max_length", max_length=77, truncation=True).input_ids[76] == tok.eos_token_id


# ---------------------------------------------------------------------------------------------
# refine: filter_small_regions, region_iou, pick_segment, refine_mask, SAM
# ---------------------------------------------------------------------------------------------
def test_filter_small_regions_quirk_weights_area_by_label():
    m = np.zeros((12, 20), bool)
    m[0:4, 0:5] = True  # label 1, 20 px: quirk area 20
    m[0:4, 8:13] = True  # label 2, 20 px: quirk area 40
    m[8:11, 0:4] = True  # label 3, 12 px: quirk area 36
    m[8:11, 15:20] = True  # label 4, 15 px: quirk area 60
    before = m.copy()
    q = filter_small_regions(m, min_area=30, quirk=True)
    expected = m.copy()
    expected[0:4, 0:5] = False  # only label 1 is "small" (20 < 30)
    np.testing.assert_array_equal(q, expected)
    assert not filter_small_regions(m, min_area=30, quirk=False).any()  # every true area < 30
    np.testing.assert_array_equal(m, before)  # input untouched
    # plain areas: 20, 20, 12, 15 -> min_area 15 keeps labels 1, 2 and 4
    plain = filter_small_regions(m, min_area=15, quirk=False)
    assert plain.sum() == 20 + 20 + 15 and not plain[8:11, 0:4].any()


def test_filter_small_regions_quirk_clears_the_whole_bounding_box():
    m = np.zeros((12, 12), bool)
    m[0, :] = True  # an L: label 1, 23 px, bounding box = the whole image
    m[:, 0] = True
    m[3:10, 3:10] = True  # label 2, 49 px, inside the L's box, not connected to it
    # quirk: label 1 (23 < 40) clears its box, taking label 2 (area 2 * 49 = 98 >= 40) with it
    assert not filter_small_regions(m, min_area=40, quirk=True).any()
    plain = filter_small_regions(m, min_area=40, quirk=False)
    expected = np.zeros_like(m)
    expected[3:10, 3:10] = True
    np.testing.assert_array_equal(plain, expected)
    # 4-connectivity (scipy's default, as the code): diagonal neighbours are separate components
    d = np.zeros((4, 4), bool)
    d[0, 0] = d[1, 1] = True
    assert not filter_small_regions(d, min_area=2, quirk=False).any()


def test_region_iou_hand_values():
    s = np.zeros((4, 4), bool)
    s[0, 0:4] = True  # 4 px
    r = np.zeros((4, 4), bool)
    r[0, 2:4] = True
    r[1, 0:4] = True  # 6 px, 2 shared
    assert region_iou(s, r) == pytest.approx(2 / 8, abs=0)  # 2 / (4 + 6 - 2)
    assert region_iou(s, s) == 1.0
    assert region_iou(s, np.zeros_like(s)) == 0.0
    assert region_iou(np.zeros_like(s), np.zeros_like(s)) == 0.0
    assert region_iou(s.astype(np.uint8) * 255, r) == 0.25  # 0/255 masks read as bool
    with pytest.raises(ValueError, match="differ in shape"):
        region_iou(s, r[:3])


def test_pick_segment_picks_highest_region_iou_not_largest_overlap():
    rough = np.zeros((32, 32), bool)
    rough[8:20, 8:20] = True  # 144 px
    whole = np.ones((32, 32), bool)  # overlap 144, IoU 144 / 1024
    inner = np.zeros((32, 32), bool)
    inner[10:20, 10:20] = True  # overlap 100, IoU 100 / 144
    away = np.zeros((32, 32), bool)
    away[24:30, 24:30] = True  # IoU 0
    seg, idx, score = pick_segment([whole, inner, away], rough)
    assert idx == 1 and score == pytest.approx(100 / 144, abs=1e-15)
    np.testing.assert_array_equal(seg, inner)
    # ties: the first wins (the code's strict ">")
    assert pick_segment([away, inner, inner.copy()], rough)[1] == 1
    # nothing overlaps
    assert pick_segment([away], rough) == (None, None, 0.0)
    assert pick_segment([], rough) == (None, None, 0.0)
    with pytest.raises(ValueError, match="same IoU"):
        pick_segment([inner], rough, score="paper")


class FixedSegments:
    """A generator test double with SAM's output format (list of dicts with "segmentation")."""

    def __init__(self, masks):
        self.masks = masks
        self.calls = 0

    def generate(self, image):
        self.calls += 1
        assert image.dtype == np.uint8 and image.shape[2] == 3
        return [{"segmentation": m.copy(), "area": int(m.sum())} for m in self.masks]


def test_refine_mask_filters_picks_and_filters_again():
    img = textured(32, 32)
    rough = np.zeros((32, 32), bool)
    rough[8:20, 8:20] = True
    rough[28, 28] = True  # a speck: label 2, quirk area 2 < 64 -> removed before picking
    seg_a = np.zeros((32, 32), bool)
    seg_a[6:20, 6:20] = True  # with the speck below: IoU 144 / 197 with the filtered rough mask
    seg_a[0, 31] = True  # a speck inside the segment: removed after picking (label 1: area 1)
    seg_b = np.zeros((32, 32), bool)
    seg_b[8:20, 8:14] = True  # IoU 72 / 144
    gen = FixedSegments([seg_b, seg_a])
    fine, info = refine_mask(gen, img, rough)
    expected = np.zeros((32, 32), bool)
    expected[6:20, 6:20] = True
    np.testing.assert_array_equal(fine, expected)
    assert gen.calls == 1
    assert info == {"n_segments": 2, "picked": 1, "score": pytest.approx(144 / 197, abs=1e-15), "rough_area": 145,
                    "rough_filtered_area": 144, "fine_area": 196, "fallback": None}
    # min_area=0: no filtering, the speck stays in the picked segment
    fine0, info0 = refine_mask(gen, img, rough, min_area=0)
    np.testing.assert_array_equal(fine0, seg_a)
    assert info0["rough_filtered_area"] == 145


def test_refine_mask_without_overlap_falls_back_to_the_filtered_rough_mask():
    img = textured(32, 32)
    rough = np.zeros((32, 32), bool)
    rough[8:20, 8:20] = True
    away = np.zeros((32, 32), bool)
    away[24:30, 24:30] = True
    fine, info = refine_mask(FixedSegments([away]), img, rough)
    np.testing.assert_array_equal(fine, rough)
    assert info["picked"] is None and info["score"] == 0.0 and info["n_segments"] == 1
    assert "no SAM segment overlaps" in info["fallback"]
    with pytest.raises(ValueError, match="does not match the image"):
        refine_mask(FixedSegments([away]), img, rough[:30])


def test_tiny_sam_generator_runs_counts_and_is_deterministic():
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, Sam

    from methods.diffusion import counting
    from methods.diffusion.tiny import RANDOM_WEIGHTS_LABEL

    sam = load_sam_generator(tiny=True)
    assert load_sam_generator(tiny=True) is sam  # cached per process
    assert isinstance(sam.generator, SamAutomaticMaskGenerator) and isinstance(sam.model, Sam)
    assert isinstance(sam.model.image_encoder, ImageEncoderViT) and isinstance(sam.model.mask_decoder, MaskDecoder)
    assert sam.model.image_encoder.img_size == 64
    assert sam.weights_label == RANDOM_WEIGHTS_LABEL and sam.info()["sam_weights"] == RANDOM_WEIGHTS_LABEL
    assert sam.settings == TINY_SAM_SETTINGS
    img = textured(64, 64, seed=2)
    with counting.counting() as tally:
        segs = sam_segments(sam, img)
    # one image-encoder run per image (no crops), one decoder batch for 4 x 4 = 16 points
    assert tally.calls["sam"] == 1 and tally.calls["sam_decoder"] == 1
    assert len(segs) >= 1
    for s in segs:
        assert s.dtype == bool and s.shape == (64, 64)
    again = sam_segments(sam, img)
    assert len(again) == len(segs) and all(np.array_equal(a, b) for a, b in zip(segs, again))
    # a fresh load (other settings) has the same seeded weights
    other = load_sam_generator(tiny=True, settings={"points_per_batch": 4})
    assert other is not sam
    import torch

    for (n, p), (_, q) in zip(sam.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(p, q), n
    with counting.counting() as tally:
        wide = sam_segments(other, textured(48, 80, seed=3))
    assert tally.calls["sam"] == 1 and tally.calls["sam_decoder"] == 4  # 16 points in batches of 4
    assert all(s.shape == (48, 80) and s.dtype == bool for s in wide)
    # end to end through refine_mask
    rough = np.zeros((64, 64), bool)
    rough[16:48, 16:48] = True
    fine, info = refine_mask(sam, img, rough)
    assert fine.shape == (64, 64) and info["n_segments"] == len(segs)
    if info["picked"] is not None:
        assert info["score"] == pytest.approx(region_iou(segs[info["picked"]], rough), abs=1e-15)
    with pytest.raises(ValueError, match="RGB uint8"):
        sam_segments(sam, img[..., 0])


def test_sam_settings_are_checked():
    with pytest.raises(ValueError, match="unknown SAM generator setting.*points_per_sid"):
        load_sam_generator(tiny=True, settings={"points_per_sid": 4})
    with pytest.raises(ValueError, match="binary_mask"):
        load_sam_generator(tiny=True, settings={"output_mode": "coco_rle"})
    with pytest.raises(ValueError, match="unknown SAM variant 'vit_x'.*vit_h, vit_l, vit_b"):
        load_sam_generator("vit_x", "whatever.pth")


def test_missing_sam_checkpoint_names_the_file_where_and_the_parameter(tmp_path):
    with pytest.raises(MissingWeights) as e:
        load_sam_generator()
    msg = str(e.value)
    assert "vit_h" in msg and "sam_vit_h_4b8939.pth" in msg and "no checkpoint was given" in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in msg
    assert "method.sam_checkpoint=" in msg
    missing = tmp_path / "nope.pth"
    with pytest.raises(MissingWeights) as e:
        load_sam_generator("vit_b", missing, param="sam_ckpt")
    msg = str(e.value)
    assert str(missing) in msg and SAM_CHECKPOINTS["vit_b"] == "sam_vit_b_01ec64.pth"
    assert "sam_vit_b_01ec64.pth" in msg and "sam_ckpt=" in msg and not missing.exists()


def test_sam_checkpoint_path_is_loaded_cached_and_reloaded_when_replaced(tmp_path, monkeypatch):
    """The checkpoint branch (file check, registry call, cache key with the file's size and time),
    with the registry's vit_b builder replaced by one that builds the tiny SAM and loads the given
    state dict: the real ViT-B weights are 375 MB and not on this machine."""
    import os

    import segment_anything
    import torch

    from methods.zone.refine import _tiny_sam

    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    state = _tiny_sam().state_dict()
    torch.save(state, ckpt)
    calls = []

    def build(checkpoint=None):
        calls.append(checkpoint)
        sam = _tiny_sam()
        with open(checkpoint, "rb") as f:
            sam.load_state_dict(torch.load(f))
        return sam

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", build)
    a = load_sam_generator("vit_b", ckpt, settings=TINY_SAM_SETTINGS)
    assert calls == [str(ckpt)] and a.weights_label == "sam_vit_b_01ec64.pth" and a.variant == "vit_b"
    assert a.info()["sam_checkpoint"] == str(ckpt)
    assert load_sam_generator("vit_b", str(ckpt), settings=TINY_SAM_SETTINGS) is a and len(calls) == 1
    segs = sam_segments(a, textured(64, 64, seed=2))
    assert segs and all(s.shape == (64, 64) for s in segs)
    # the file replaced in place (new size / time): loaded again
    torch.save({k: v + 1 for k, v in state.items()}, ckpt)
    os.utime(ckpt, ns=(10**18, 10**18))
    b = load_sam_generator("vit_b", ckpt, settings=TINY_SAM_SETTINGS)
    assert b is not a and len(calls) == 2


# ---------------------------------------------------------------------------------------------
# smoother: dilate, fft_edge_mask, composite
# ---------------------------------------------------------------------------------------------
def test_dilate_rect_kernel_iterations():
    m = np.zeros((32, 32), bool)
    m[10, 10] = True
    expected = np.zeros_like(m)
    expected[6:15, 6:15] = True  # 3 x 3 rectangle, 4 times: +-4
    np.testing.assert_array_equal(dilate(m), expected)
    m2 = np.zeros((8, 8), bool)
    m2[0, 0] = True
    assert dilate(m2, kernel=3, iterations=2).sum() == 9  # clipped at the border: 3 x 3


def test_scaled_sizes():
    assert scaled_sizes((512, 512)) == (200, 21)  # the code's values
    assert scaled_sizes((512, 384)) == (200, 21)  # longest side 512, as the code's inputs
    assert scaled_sizes((64, 64)) == (25, 3)  # 200 / 8; 21 / 8 = 2.6 -> 3
    assert scaled_sizes((128, 256)) == (100, 11)  # 10.5 -> 10 (round half even) -> odd 11


def test_cast_uint8_wraps_like_the_code_or_saturates():
    v = np.array([0.5, 29.99, 255.9, 256.0, 300.7, 600.2])
    np.testing.assert_array_equal(cast_uint8(v, wrap=True), [0, 29, 255, 0, 44, 88])
    np.testing.assert_array_equal(cast_uint8(v, wrap=False), [0, 29, 255, 255, 255, 255])


def _square_scene(size=128):
    src = textured(size, size, seed=5)
    edited = src.copy()
    sq = np.zeros((size, size), bool)
    sq[40:80, 40:80] = True
    edited[sq] = (10, 10, 10)  # a dark square on a mid-grey gradient: grey difference >= 60
    return src, edited, sq


def test_fft_edge_mask_keeps_a_changed_square_and_drops_the_unchanged_texture():
    src, edited, sq = _square_scene()
    mask = np.zeros(sq.shape, bool)
    mask[16:112, 16:112] = True  # the (dilated) region: the square plus a wide textured margin
    out = fft_edge_mask(edited, src, mask)
    assert out.dtype == bool and out.shape == sq.shape
    assert out[sq].all()  # the changed square is kept whole (holes filled)
    near = dilate(sq, 3, 6)  # ringing of the ideal low-pass + closing reach a few pixels out
    assert not out[mask & ~near].any()  # the unchanged textured background is dropped
    assert out[mask & ~sq].sum() < 0.1 * sq.sum()
    # identical images: nothing changed, nothing kept
    assert not fft_edge_mask(src, src, mask).any()
    # pixels outside the mask are ignored: a change there is invisible
    far = src.copy()
    far[0:10, 0:10] = 0
    assert not fft_edge_mask(far, src, mask).any()


def test_fft_edge_mask_grey_weights_of_the_code():
    src = np.zeros((64, 64, 3), np.uint8)
    red = src.copy()
    red[16:48, 16:48] = (255, 0, 0)
    mask = np.ones((64, 64), bool)
    # a disc larger than the spectrum: no filtering, the difference is the grey difference itself.
    # The code's grey gives red the weight 0.114: 29 <= 30, so a pure red change is dropped; the
    # usual BT.601 grey gives 76 and keeps it.
    assert not fft_edge_mask(red, src, mask, d0=4096).any()
    kept = fft_edge_mask(red, src, mask, d0=4096, grey="bt601")
    exp = np.zeros((64, 64), bool)
    exp[16:48, 16:48] = True
    np.testing.assert_array_equal(kept, exp)
    blue = src.copy()
    blue[16:48, 16:48] = (0, 0, 255)  # weight 0.299 under the code's grey: 76 -> kept
    np.testing.assert_array_equal(fft_edge_mask(blue, src, mask, d0=4096), exp)
    with pytest.raises(ValueError, match="grey must be one of"):
        fft_edge_mask(red, src, mask, grey="avg")
    with pytest.raises(ValueError, match="mask has shape"):
        fft_edge_mask(red, src, mask[:10])


def test_composite_exact_for_full_and_empty_masks():
    src, edited, _ = _square_scene(48)
    ones = np.ones((48, 48), bool)
    zeros = np.zeros((48, 48), bool)
    out1 = composite(src, edited, ones, ones)
    assert out1.dtype == np.uint8 and np.array_equal(out1, edited)
    assert np.array_equal(composite(src, edited, zeros, zeros), src)
    # with a full smoothed mask and an empty fine one every pixel is in the ring
    np.testing.assert_array_equal(composite(src, edited, zeros, ones, alpha=1.0), edited)
    np.testing.assert_array_equal(composite(src, edited, zeros, ones, alpha=0.0), src)


def test_composite_ring_gets_alpha_blending_truncated():
    src = np.zeros((4, 4, 3), np.uint8)
    ed = np.zeros((4, 4, 3), np.uint8)
    src[...] = (100, 0, 101)
    ed[...] = (200, 101, 0)
    fine = np.zeros((4, 4), bool)
    fine[0:2, 0:3] = True
    smoothed = np.zeros((4, 4), bool)
    smoothed[0:3, 0:2] = True
    out = composite(src, ed, fine, smoothed)
    # 0.6 * edited + 0.4 * source, truncated: (200, 100) -> 160 ; (101, 0) -> 60.6 -> 60 ;
    # (0, 101) -> 40.4 -> 40
    blend = (160, 60, 40)
    for y in range(4):
        for x in range(4):
            in_f, in_s = fine[y, x], smoothed[y, x]
            want = ed[y, x] if (in_f and in_s) else blend if (in_f != in_s) else src[y, x]
            assert tuple(out[y, x]) == tuple(want), (y, x)
    assert (fine ^ smoothed).sum() == 4  # (0, 2), (1, 2) fine only; (2, 0), (2, 1) smoothed only


def test_import_does_not_import_torch():
    pre = subprocess.run([sys.executable, "-c", "import sys, methods.zone; sys.exit('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True)
    if pre.returncode != 0:
        pytest.skip("the methods.zone package itself imports torch")
    code = ("import sys; import methods.zone.localise, methods.zone.refine, methods.zone.smoother; "
            "bad = [m for m in ('torch', 'diffusers', 'segment_anything') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
