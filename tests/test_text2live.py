"""The text2live method (methods/text2live/): its compositing and each loss term against an
independent re-computation, its CLIP tower against open_clip's own forward, the generator's shape
rules, that the optimisation lowers the loss, seeding, network counts, its texts and skips, missing
weights, and a tiny run through the harness (edit cached, scored).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import methods.text2live  # noqa: F401  (registers text2live)
from harness.cache import EditStore
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample, SkipSample
from methods.text2live import TINY_REVISION, Text2LIVE, texts_for

from .conftest import REPO, PIXEL_L1, add_two_samples, job_config, read_edits, read_scores, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

NAME = "text2live"
TINY = {"name": NAME, "backbone": "tiny"}
LOSS_WEIGHTS = dict(lambda_structure=2.0, lambda_screen=1.0, lambda_sparsity=6.0, lambda_alpha_l0=0.01,
                    lambda_alpha_l1=0.01, lambda_composition=1.0)


def _sample(sid: str = "s", h: int = 40, w: int = 48, seed: int = 1, **kw) -> Sample:
    fields = dict(source_caption="a red thing", target_caption="a blue thing", meta={"target_object": "blue thing"})
    fields.update(kw)
    return Sample(id=sid, dataset="synthetic", source=textured(h, w, seed), **fields)


def _image(h: int = 32, w: int = 32, seed: int = 3):
    import torch

    return torch.from_numpy(textured(h, w, seed).astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def _extractor(n_aug: int = 4):
    from methods.text2live.clip import ClipExtractor, tiny_clip

    model, tokenizer = tiny_clip()
    return ClipExtractor(model, tokenizer, n_aug, 1.0, "cpu")


# -- parameters ---------------------------------------------------------------------------------
def test_defaults_are_the_official_image_config():
    p = Text2LIVE.Params()
    # omerbt/Text2LIVE configs/image_config.yaml, models/networks.py define_G, models/clip_extractor.py
    official = dict(n_epochs=1000, lr=0.0025, optimizer="madgrad", scheduler_policy="exponential", gamma=0.99,
                    min_lr=1e-5, resize_input=512, source_image_every=75, crops_min_cover=0.85, flip_p=0.5,
                    jitter_p=0.1, scale_min=0.8, scale_max=1.2, text_criterion="spherical", lambda_structure=2.0,
                    lambda_screen=1.0, lambda_sparsity=6.0, lambda_alpha_l0=0.01, lambda_alpha_l1=0.01,
                    lambda_composition=1.0, bootstrap_epoch=-1, lambda_bootstrap=10.0, lambda_bootstrap_min=0.0,
                    bootstrap_scheduler="linear", bootstrapping_min_cover=1.0, relevancy_num_layers=10,
                    n_aug=16, clip_affine_transform_fill=1.0,
                    skip_n33d=128, skip_n33u=128, skip_n11=4, num_scales=7, clip_model="ViT-B-32",
                    clip_pretrained="openai")
    assert {k: getattr(p, k) for k in official} == official
    tiny = Text2LIVE.parse_params({"backbone": "tiny"})
    assert tiny.auto_resolved == dict(n_epochs=4, resize_input=32, n_aug=4, skip_n33d=8, skip_n33u=8, num_scales=3,
                                      relevancy_num_layers=0)
    assert not p.bootstrapping and Text2LIVE.parse_params({"bootstrap_epoch": 1000}).bootstrapping
    assert not Text2LIVE.parse_params({"bootstrap_epoch": 1000, "lambda_bootstrap": 0.0}).bootstrapping
    # an explicit value wins over "auto"
    assert Text2LIVE.parse_params({"backbone": "tiny", "n_epochs": 7}).n_epochs == 7


@pytest.mark.parametrize("bad, match", [
    ({"bootstrap_epoch": -2}, "bootstrap_epoch"),
    ({"bootstrap_scheduler": "cosine"}, "bootstrap_scheduler"),
    ({"bootstrapping_min_cover": 0.0}, "bootstrapping_min_cover"),
    ({"relevancy_num_layers": -2}, "relevancy_num_layers"),
    ({"gamma": 0.0}, "gamma"),
    ({"gamma": 1.5}, "gamma"),
    ({"lr": 0.0}, "lr"),
    ({"scale_min": 1.3}, "scale_max"),
    ({"crops_min_cover": 0.0}, "crops_min_cover"),
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"text_criterion": "l2"}, "text_criterion"),
    ({"n_aug": 0}, "n_aug"),
    ({"num_scales": 2.5}, "num_scales"),
    ({"mask_threshold": 1.5}, "mask_threshold"),
    ({"lambda_structure": 0.0, "lambda_screen": 0.0, "lambda_sparsity": 0.0, "lambda_composition": 0.0},
     "nothing to optimise"),
    ({"clip_model": " "}, "clip_model"),
])
def test_bad_parameters_are_refused(bad, match):
    with pytest.raises(ParamError, match=match):
        Text2LIVE.parse_params(bad)


# -- compositing --------------------------------------------------------------------------------
def test_compositing_against_a_hand_computation():
    import torch

    from methods.text2live.losses import render

    bg = _image(6, 5, seed=4)
    edit = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    for a in (0.0, 1.0, 0.25):
        out = render(torch.cat([edit, torch.full((1, 1, 6, 5), a)], dim=1), bg)
        assert torch.equal(out["edit"], edit) and out["alpha"].shape == (1, 3, 6, 5)
        if a == 0.0:  # opacity 0: the input, exactly; the green screen, exactly
            assert torch.equal(out["composite"], bg)
            green = torch.tensor([0.0, 177 / 255, 64 / 255]).view(1, 3, 1, 1).expand(1, 3, 6, 5)
            assert torch.equal(out["edit_on_greenscreen"], green)
        elif a == 1.0:  # opacity 1: the edit colour, exactly, over anything
            assert torch.equal(out["composite"], edit) and torch.equal(out["edit_on_greenscreen"], edit)
        else:
            e, b = edit.numpy().astype(np.float64), bg.numpy().astype(np.float64)
            # float32 against float64: a few ulps of values in [0, 1]
            np.testing.assert_allclose(out["composite"].numpy(), 0.25 * e + 0.75 * b, atol=1e-6)
            g = np.array([0.0, 177 / 255, 64 / 255]).reshape(1, 3, 1, 1)
            np.testing.assert_allclose(out["edit_on_greenscreen"].numpy(), 0.25 * e + 0.75 * g, atol=1e-6)


# -- loss terms ---------------------------------------------------------------------------------
def test_sparsity_loss_against_its_formula():
    import torch

    from methods.text2live.losses import sparsity_loss

    zeros, ones = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    half = torch.cat([torch.zeros(3, 2, 4), torch.full((3, 2, 4), 0.6)], dim=1)  # mean 0.3
    total, l0, l1 = sparsity_loss([zeros], 0.01, 0.01)
    assert float(total) == 0.0 and float(l0) == 0.0 and float(l1) == 0.0
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    l0_ones = 2 * (sig(5.0) - 0.5)
    l0_half = (0.0 + 2 * (sig(3.0) - 0.5)) / 2
    total, l0, l1 = sparsity_loss([ones, half], 0.02, 0.03)
    exp_l1, exp_l0 = (1.0 + 0.3) / 2, (l0_ones + l0_half) / 2
    # float32 sums of a few values near 1: within 1e-6
    assert float(l1) == pytest.approx(exp_l1, abs=1e-6) and float(l0) == pytest.approx(exp_l0, abs=1e-6)
    assert float(total) == pytest.approx(0.03 * exp_l1 + 0.02 * exp_l0, abs=1e-6)


@pytest.mark.parametrize("theta", [0.3, 1.0, 2.5])
def test_text_criteria_against_the_angle(theta):
    """For vectors at angle theta the spherical distance loss is 2 (theta / 2)^2 (|x - y| =
    2 sin(theta / 2) between unit vectors), whatever their norms; the cosine loss 1.2 (1 - cos theta)."""
    import torch

    from methods.text2live.losses import cosine_loss, spherical_dist_loss

    x = torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.5 * math.cos(theta), 0.5 * math.sin(theta), 0.0]], dtype=torch.float64)
    assert float(spherical_dist_loss(x, y)) == pytest.approx(2 * (theta / 2) ** 2, rel=1e-9)
    assert float(cosine_loss(x, y)) == pytest.approx(1.2 * (1 - math.cos(theta)), rel=1e-9)


def test_token_self_similarity_against_pairwise_cosines():
    import torch

    from methods.text2live.clip import attn_cosine_sim

    t = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sim = attn_cosine_sim(t).numpy()
    a = t.numpy()
    unit = a / np.linalg.norm(a, axis=2, keepdims=True)
    np.testing.assert_allclose(sim, unit @ unit.transpose(0, 2, 1), rtol=1e-12, atol=1e-12)
    assert sim.shape == (2, 5, 5)
    np.testing.assert_allclose(np.diagonal(sim, axis1=1, axis2=2), 1.0, atol=1e-12)


def test_image_tower_is_open_clips_forward():
    """At the model's input size the tower gives open_clip's encode_image, and its tokens are the
    output of the next-to-last block (captured with a hook on open_clip's own forward)."""
    import torch

    from methods.text2live.clip import ClipImageTower, tiny_clip

    model, _ = tiny_clip()
    tower = ClipImageTower(model.visual)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    handle = model.visual.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            ref = model.encode_image(x)
    finally:
        handle.remove()
    with torch.no_grad():
        # the same operations in the same order: float32 rounding only
        torch.testing.assert_close(tower(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tower(x, mode="tokens"), seen[0], rtol=1e-5, atol=1e-6)
        # a non-square view: the patch grid is 4 x 6, the positional embedding resized to it
        wide = tower(torch.randn(1, 3, 32, 48), mode="tokens")
    assert wide.shape == (1, 1 + 4 * 6, 32)


def test_structure_loss_against_a_recomputation():
    """MSE of the self-similarities of the structure tokens, recomputed with open_clip's own
    forward (hooked next-to-last block) and numpy; zero for an output equal to its input."""
    import torch
    import torch.nn.functional as F
    import torchvision.transforms as T

    from methods.text2live.clip import OPENAI_MEAN, OPENAI_STD
    from methods.text2live.losses import Text2LIVELoss

    ex = _extractor()
    loss = Text2LIVELoss(ex, {"screen": "x", "comp": "a y", "src": "a z"}, LOSS_WEIGHTS, "spherical",
                         np.random.default_rng(0))
    x, y = _image(48, 48, seed=5), _image(48, 48, seed=6)
    with torch.no_grad():
        assert float(loss.structure_loss([x], [x])) == 0.0
        got = float(loss.structure_loss([x, y], [y, y]))

    model = ex.image.visual
    seen = []
    handle = model.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: seen.append(o))

    def sims(img):
        seen.clear()
        small = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
        with torch.no_grad():
            model(T.Normalize(OPENAI_MEAN, OPENAI_STD)(small))
        tok = seen[0][0].numpy().astype(np.float64)
        unit = tok / np.linalg.norm(tok, axis=1, keepdims=True)
        return unit @ unit.T

    try:
        expected = (np.mean((sims(y) - sims(x)) ** 2) + 0.0) / 2
    finally:
        handle.remove()
    # float32 network against float64 similarities: relative 1e-4
    assert got == pytest.approx(expected, rel=1e-4) and expected > 0


class _FixedEmbeddings:
    """An extractor whose image embeddings are fixed per image (looked up by identity) and whose
    text embedding is one row per text, the same for every template: isolates the loss formulas
    from CLIP, the augmentations and the random draw of templates."""

    def __init__(self, images: dict[int, np.ndarray], texts: dict[str, np.ndarray]):
        self.images, self.texts = images, texts

    def image_embedding(self, x):
        import torch

        return torch.from_numpy(self.images[id(x)])

    def text_embeddings(self, prompts):
        import torch

        row = next(v for k, v in self.texts.items() if k in prompts[0])
        return torch.from_numpy(np.tile(row, (len(prompts), 1)))


def test_clip_and_direction_losses_against_their_formulas():
    """With every template of a text embedded alike, the random draw of templates cannot change
    the value: CLIP loss = mean spherical distance of the views to the text; direction loss =
    1 - mean over views of cos(E(out) - E(in), T(comp) - T(src))."""
    import torch

    from methods.text2live.losses import Text2LIVELoss

    rng = np.random.default_rng(0)
    x_in, x_out = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    e_in, e_out = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    t_comp, t_src = rng.normal(size=6), rng.normal(size=6)

    ex = _FixedEmbeddings({id(x_in): e_in, id(x_out): e_out}, {"red": t_src, "blue": t_comp})
    loss = Text2LIVELoss(ex, {"screen": "blue", "comp": "a blue thing", "src": "a red thing"}, LOSS_WEIGHTS,
                         "spherical", np.random.default_rng(1))
    u = e_out / np.linalg.norm(e_out, axis=1, keepdims=True)
    v = t_comp / np.linalg.norm(t_comp)
    expected_clip = np.mean(2 * np.arcsin(np.linalg.norm(u - v, axis=1) / 2) ** 2)
    assert float(loss.clip_loss([x_out], loss.comp_e)) == pytest.approx(expected_clip, rel=1e-12)
    d, dt = e_out - e_in, t_comp - t_src
    cos = d @ dt / (np.linalg.norm(d, axis=1) * np.linalg.norm(dt))
    assert float(loss.direction_loss([x_in], [x_out], loss.comp_e)) == pytest.approx(1 - cos.mean(), rel=1e-12)
    # one embedding per template: 14 augmentation templates, 2 screen templates
    assert loss.comp_e.shape == (14, 6) and loss.screen_e.shape == (2, 6) and loss.src_e.shape == (14, 6)


def test_total_loss_is_the_weighted_sum_of_its_terms():
    import torch

    from methods.text2live.losses import Text2LIVELoss, render

    ex = _extractor()
    weights = dict(LOSS_WEIGHTS, lambda_structure=3.0, lambda_screen=0.5)
    loss = Text2LIVELoss(ex, {"screen": "x", "comp": "a y", "src": "a z"}, weights, "spherical",
                         np.random.default_rng(0))
    x = _image()
    out = torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        terms = loss([render(out, x)], [x])
    expected = (3.0 * terms["loss_structure"] + terms["loss_comp_clip"] + terms["loss_comp_dir"]
                + 6.0 * terms["loss_sparsity"] + 0.5 * terms["loss_screen"])
    assert float(terms["loss"]) == pytest.approx(float(expected), rel=1e-6)
    # a zero weight drops its term (not computed, as in the official code)
    loss.weights["lambda_screen"] = 0.0
    with torch.no_grad():
        assert "loss_screen" not in loss([render(out, x)], [x])


def test_block_with_probs_is_the_block_and_its_attention():
    """The written-out block gives open_clip's block output and nn.MultiheadAttention's own
    per-head probabilities (need_weights=True, average_attn_weights=False)."""
    import torch

    from methods.text2live.clip import block_with_probs, tiny_clip

    model, _ = tiny_clip()
    blk = model.visual.transformer.resblocks[0]
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, probs = block_with_probs(blk, x)
        y = blk.ln_1(x)
        _, ref_probs = blk.attn(y, y, y, need_weights=True, average_attn_weights=False)
        # float32, different kernels (fused attention vs written out): 1e-5
        torch.testing.assert_close(out, blk(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)
    assert probs.shape == (2, 2, 17, 17)


def test_relevance_map_against_the_chain_rule():
    """Chefer et al.'s rule with only the last block counted (start_layer 0 of 2 blocks):
    R = I + cam, and the class token's row over the patches is cam[0, 1:] with
    cam = mean over heads of max(0, A * dl/dA). In the last block only the class token's query
    reaches the embedding, so dl/dA[h, 0, j] = (dl/do_h) . v_h[j] (o_h: head h's attention output
    of the class token): recomputed here from a hook on open_clip's own forward, the attention
    weights of nn.MultiheadAttention, and autograd on o only."""
    import torch
    import torch.nn.functional as F

    ex = _extractor()
    model = ex.image.visual
    x01 = _image(32, 32, seed=7)
    text_e = ex.text_embeddings(["a blue thing"])
    got = ex.relevance(x01, text_e, start_layer=0)

    seen = []
    handle = model.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(ex.normalize(x01))  # 32 px: the tiny model's input size, no resize
    finally:
        handle.remove()
    blk = model.transformer.resblocks[-1]
    x_in = seen[0][0].double()  # [T, C]
    heads, c = blk.attn.num_heads, x_in.shape[1]
    d = c // heads
    with torch.no_grad():
        y = blk.ln_1(seen[0])
        _, attn = blk.attn(y, y, y, need_weights=True, average_attn_weights=False)
    a0 = attn[0, :, 0].double()  # [heads, T]: the class token's attention
    w_v = blk.attn.in_proj_weight[2 * c:].double()
    b_v = blk.attn.in_proj_bias[2 * c:].double()
    v = (y[0].double() @ w_v.T + b_v).reshape(-1, heads, d).transpose(0, 1)  # [heads, T, d]
    o = torch.einsum("ht,htd->hd", a0, v).reshape(c).requires_grad_(True)
    dbl = lambda m: m.double()  # noqa: E731
    h = x_in[0] + F.linear(o, dbl(blk.attn.out_proj.weight), dbl(blk.attn.out_proj.bias))
    ln2 = F.layer_norm(h, (c,), dbl(blk.ln_2.weight), dbl(blk.ln_2.bias), blk.ln_2.eps)
    fc = F.linear(ln2, dbl(blk.mlp.c_fc.weight), dbl(blk.mlp.c_fc.bias))
    h = h + F.linear(fc * torch.sigmoid(1.702 * fc), dbl(blk.mlp.c_proj.weight), dbl(blk.mlp.c_proj.bias))
    emb = F.layer_norm(h, (c,), dbl(model.ln_post.weight), dbl(model.ln_post.bias), model.ln_post.eps) @ dbl(model.proj)
    logit = ex.logit_scale.double() * F.cosine_similarity(emb[None], text_e.double()).sum()
    (g_o,) = torch.autograd.grad(logit, o)
    grad_a0 = torch.einsum("hd,htd->ht", g_o.reshape(heads, d), v)  # dl/dA[h, 0, j]
    cam0 = (a0 * grad_a0).clamp(min=0).mean(dim=0)[1:].reshape(1, 1, 4, 4)
    up = F.interpolate(cam0, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    expected = (up - up.min()) / (up.max() - up.min())
    assert got.shape == (32, 32) and float(got.min()) == 0.0 and float(got.max()) == pytest.approx(1.0)
    # float32 map against a float64 recomputation, both min-max normalised: 1e-4
    np.testing.assert_allclose(got.numpy(), expected.detach().numpy(), atol=1e-4)
    # no block counted: R = I, a constant (zero) map, not 0 / 0
    assert float(ex.relevance(x01, text_e, start_layer=5).abs().max()) == 0.0


@pytest.mark.parametrize("scheduler, expected", [
    ("linear", [10 * (1 - 1 / 4), 10 * (1 - 2 / 4), 10 * (1 - 3 / 4), 1.0]),  # floor 1.0 at the end
    ("exponential", [10 * 0.99, 10 * 0.99 ** 2, 10 * 0.99 ** 3, 10 * 0.99 ** 4]),
    ("none", [10.0] * 4),
])
def test_bootstrap_weight_schedules(scheduler, expected):
    from methods.text2live.losses import Bootstrap

    b = Bootstrap("horse", 4, 10.0, 1.0, scheduler, 1.0, 0)
    assert [b.weight_at(k) for k in range(4)] == pytest.approx(expected, rel=1e-12)


def test_bootstrap_loss_is_the_mse_to_the_relevancy_map():
    """Official value: the last image's MSE between opacity and relevancy map, over the count."""
    import torch

    from methods.text2live.losses import Bootstrap, Text2LIVELoss

    ex = _extractor()
    boot = Bootstrap("thing", 10, 10.0, 0.0, "linear", 1.0, 0)
    loss = Text2LIVELoss(ex, {"screen": "x", "comp": "a y", "src": "a z"}, LOSS_WEIGHTS, "spherical",
                         np.random.default_rng(0), boot)
    x1, x2 = _image(32, 32, seed=8), _image(32, 32, seed=9)
    a1, a2 = torch.full((1, 3, 32, 32), 0.2), torch.full((1, 3, 32, 32), 0.7)
    got = float(loss.bootstrap_loss([a1, a2], [x1, x2]))
    rel = ex.relevance(x2, ex.text_embeddings(["thing"]), 0).numpy()
    assert got == pytest.approx(np.mean((0.7 - rel) ** 2) / 2, rel=1e-5)


# -- generator ------------------------------------------------------------------------------------
def test_generator_keeps_the_size_and_outputs_rgba_in_the_unit_interval():
    import torch

    from methods.text2live.generator import SkipGenerator, min_input_side

    torch.manual_seed(0)
    gen = SkipGenerator(3, 8, 8, 4)
    for h, w in ((9, 9), (37, 50), (32, 33)):
        with torch.no_grad():
            y = gen(torch.rand(1, 3, h, w))
        assert y.shape == (1, 4, h, w) and float(y.min()) > 0 and float(y.max()) < 1
    assert min_input_side(3) == 9 and min_input_side(7) == 129
    with pytest.raises(ValueError, match="at least 9 px"):
        gen(torch.rand(1, 3, 8, 20))
    # the official widths: 7 levels of 128 down / 128 up / 4 skip channels, 4 output channels
    big = SkipGenerator(7, 128, 128, 4)
    convs = [m for m in big.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7 * 5 + 1 and convs[-1].out_channels == 4


# -- the optimisation -------------------------------------------------------------------------
def test_optimisation_lowers_the_total_loss():
    """Ten steps of the official optimiser lower the total loss, evaluated on the same random
    draws (augmentations, template choices) before and after, on four seeds."""
    import torch

    from methods.text2live.generator import SkipGenerator
    from methods.text2live.optimise import CropSettings, build

    ex, img = _extractor(), _image()
    crops = CropSettings(0.5, 0.1, 0.8, 1.2, 0.85, 75)
    texts = {"screen": "blue thing", "comp": "a blue thing", "src": "a red thing"}
    for seed in range(4):
        torch.manual_seed(seed)
        run = build(lambda: SkipGenerator(3, 8, 8, 4), ex, img, texts, LOSS_WEIGHTS, "spherical", "madgrad",
                    0.0025, 1e-5, 0.99, "exponential", crops, np.random.default_rng(seed))

        def evaluate() -> float:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(123)
                run.loss.rng = np.random.default_rng(123)
                with torch.no_grad():
                    return float(run.losses([img])["loss"])

        before = evaluate()
        for _ in range(10):
            run.step()
        after = evaluate()
        assert after < before, (seed, before, after)
        # exponential schedule: lr_k = 0.0025 * 0.99 ** k
        assert [r["lr"] for r in run.history] == pytest.approx([0.0025 * 0.99 ** k for k in range(10)], rel=1e-6)


def test_missing_madgrad_is_a_clear_error(monkeypatch):
    from methods.text2live.optimise import MissingDependency, make_optimizer

    monkeypatch.setitem(sys.modules, "madgrad", None)  # import madgrad -> ImportError
    with pytest.raises(MissingDependency, match="pip install madgrad"):
        make_optimizer("madgrad", [], 0.1)
    with pytest.raises(MissingDependency, match="pip install madgrad"):
        Text2LIVE.from_config({"backbone": "tiny"}).prepare()


# -- the method -----------------------------------------------------------------------------------
def test_same_seed_same_edit_and_network_counts():
    m = Text2LIVE.from_config({"backbone": "tiny", "source_image_every": 2})
    s = _sample()
    a, b, c = m.edit(s, 0), m.edit(s, 0), m.edit(s, 1)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.info["loss_history"] == b.info["loss_history"]
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (40, 48, 3) and a.image.dtype == np.uint8 and a.mask.shape == (40, 48)
    # 4 steps, the whole image joins the crop at steps 0 and 2: 6 training images
    images = 4 + 2
    assert a.info["network_calls"] == {"clip_image": 6 * images, "clip_text": 3, "generator": images + 1}
    # views: 4 image-tower calls per training image of n_aug = 4 rows; structure: 2 of one row;
    # text: 14 + 14 + 2 templates
    assert a.info["network_rows"] == {"clip_image": (4 * 4 + 2) * images, "clip_text": 30, "generator": images + 1}
    assert a.info["steps"] == 4 and len(a.info["loss_history"]) == 4
    # working size: short side 32 (resize_input), 40 x 48 -> 32 x 38
    assert a.info["working_size_hw"] == [32, 38]
    assert a.info["mask_fraction"] == pytest.approx(float(a.mask.mean()))


def test_bootstrap_term_runs_in_the_edit_for_its_steps():
    m = Text2LIVE.from_config({"backbone": "tiny", "bootstrap_epoch": 2, "source_image_every": 2})
    s = _sample(meta={"source_object": "red thing"})
    out = m.edit(s, 0)
    hist = out.info["losses_first"], out.info["losses_last"]
    assert "loss_bootstrap" in hist[0] and "loss_bootstrap" not in hist[1]  # steps 0-1 only
    assert hist[0]["lambda_bootstrap"] == pytest.approx(10 * (1 - 1 / 2))
    assert out.info["bootstrap"] == {"text": "red thing", "text_field": "meta.source_object", "epochs": 2}
    # one relevancy pass per training image of the first two steps (2 + 1 images), one more text call
    images = 4 + 2
    assert out.info["network_calls"]["clip_image"] == 6 * images + 3
    assert out.info["network_calls"]["clip_text"] == 4
    # without meta.source_object the sample is skipped, naming the field
    assert "meta.source_object" in m.cannot_handle(_sample(sid="q"))


def test_mask_is_the_thresholded_opacity():
    s = _sample(h=32, w=32)  # the working size: no resizing of the opacity
    lo = Text2LIVE.from_config({"backbone": "tiny", "mask_threshold": 0.0}).edit(s, 0)
    hi = Text2LIVE.from_config({"backbone": "tiny", "mask_threshold": 1.0}).edit(s, 0)
    mid = Text2LIVE.from_config({"backbone": "tiny"}).edit(s, 0)
    assert lo.mask.all() and not hi.mask.any()  # a sigmoid's output lies strictly in (0, 1)
    assert np.array_equal(lo.image, mid.image)  # the threshold changes the mask only
    assert 0.0 < mid.info["alpha_mean"] < 1.0


def test_texts_from_the_sample_and_their_fallbacks():
    t = texts_for(_sample())
    assert (t.screen, t.comp, t.src) == ("blue thing", "a blue thing", "a red thing")
    assert (t.screen_from, t.comp_from, t.src_from) == ("meta.target_object", "target_caption", "source_caption")
    t = texts_for(_sample(meta={"source_object": "cake"}, source_caption=None))
    assert (t.screen, t.src) == ("a blue thing", "cake")
    assert (t.screen_from, t.src_from) == ("target_caption", "meta.source_object")
    for kw, needle in [
        (dict(source_caption=None, meta={}), "no non-empty source_caption and no meta.source_object"),
        (dict(source_caption=" ", meta={}), "no non-empty source_caption and no meta.source_object"),
        (dict(target_caption=""), "non-empty target_caption"),
        (dict(meta={"target_object": 3}), "meta.target_object"),
    ]:
        with pytest.raises(SkipSample, match=needle) as e:
            texts_for(_sample(sid="odd", **kw))
        assert "'odd'" in str(e.value)


def test_too_small_a_source_is_skipped_naming_the_field():
    m = Text2LIVE.from_config({"backbone": "tiny", "resize_input": None})
    with pytest.raises(SkipSample, match="sample 'tiny' field 'source'"):
        m.edit(_sample(sid="tiny", h=10, w=12), 0)


# -- through the harness ------------------------------------------------------------------------
def test_tiny_run_through_the_harness_cached_and_scored(builder, tmp_path):
    add_two_samples(builder, a={"meta": {"target_object": "blue thing", "source_object": "red thing"}},
                    b={"source_caption": None, "meta": {"source_object": "red thing"}})
    builder.add_simple("c", category="change_color", source_caption=None)  # no source text at all
    cfg = job_config(builder.config(), tmp_path / "res", method=dict(TINY), metrics=PIXEL_L1)
    first = run_job(cfg)
    edits = read_edits(first).set_index("sample_id")
    assert first.counts == {"ok": 2, "skipped": 1, "failed": 0}, edits.reason.tolist()
    assert "'c'" in edits.loc["c", "reason"] and "meta.source_object" in edits.loc["c", "reason"]
    ok = edits.loc[["a", "b"]]
    assert (ok.model_revision == TINY_REVISION).all() and all("[RANDOM WEIGHTS]" in m for m in ok.method)
    store = EditStore(Path(cfg["results_dir"]) / cfg["run_name"] / "edits")
    fields = {"a": ("meta.target_object", "source_caption"), "b": ("target_caption", "meta.source_object")}
    for sid, (h, w) in {"a": (48, 64), "b": (40, 36)}.items():
        rec = store.get(edits.loc[sid, "edit_key"])
        assert rec is not None and rec.image().shape == (h, w, 3) and rec.mask().shape == (h, w)
        info = json.loads((rec.folder / "edit.json").read_text())["info"]
        assert info["random_weights"] is True and info["steps"] == 4 and info["seed"] == 0
        assert (info["text_fields"]["screen_text"], info["text_fields"]["src_text"]) == fields[sid]
        assert info["network_calls"]["generator"] == 4 + 1 + 1  # 4 crops, the whole image once, the render
        # the stored mask is the thresholded opacity the edit reported
        assert rec.mask().mean() == pytest.approx(info["mask_fraction"], abs=1e-12)
    scores = read_scores(first)
    l1 = scores.query("region == 'all'").set_index("sample_id").value
    assert sorted(l1.index) == ["a", "b"] and np.isfinite(l1).all() and (l1 > 0).all()
    again = run_job(cfg)
    # every row from the cache, the skipped one (a sample-level skip) included
    assert again.computed == 0 and again.cached == 3 and again.scored == 0


def test_missing_clip_weights_skip_every_sample_naming_what_to_provide(builder, tmp_path, empty_hub, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache/clip either
    add_two_samples(builder)
    m = Text2LIVE.from_config({})
    assert m.model_revision() == "missing:ViT-B-32/openai"
    [(what, problem)] = m.weights_status()
    assert "ViT-B-32" in what and "clip_weights_path" in problem
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": NAME}, metrics=PIXEL_L1))
    assert out.counts == {"ok": 0, "skipped": 2, "failed": 0}
    edits = read_edits(out)
    for reason in edits.reason:
        assert "could not be prepared" in reason and "ViT-B-32" in reason, reason
        assert "method.clip_weights_path" in reason and "EDIT_HARNESS_ALLOW_DOWNLOADS=1" in reason, reason
        assert "method.backbone=tiny" in reason, reason
        # where it looked (the hub cache entry of OpenAI's ViT-B/32), and no CLIP-metric advice
        assert "timm/vit_base_patch32_clip_224.openai" in reason and "metric param" not in reason, reason
    assert len(read_scores(out)) == 0
    # a clip_weights_path that does not exist: said so, under the method's parameter name
    bad = Text2LIVE.from_config({"clip_weights_path": str(tmp_path / "nope.pt")})
    assert bad.model_revision() == "missing:ViT-B-32/openai"
    assert "given as method.clip_weights_path does not exist" in bad.weights_status()[0][1]


def test_registered_and_listed():
    assert METHODS.get(NAME) is Text2LIVE
    assert Text2LIVE.from_config({"backbone": "tiny"}).label() == "text2live [RANDOM WEIGHTS]"
    assert Text2LIVE.from_config({}).label() == "text2live"


def test_import_and_weights_lookup_stay_torch_free(empty_hub):
    """Listing the method, its revision and its weights (``edit-harness weights``) loads no torch."""
    code = (
        "import sys\n"
        "import methods.text2live as t\n"
        "m = t.Text2LIVE.from_config({})\n"
        "print(m.model_revision(), m.weights_status()[0][1] is not None)\n"
        "loaded = sorted(k for k in sys.modules if 'torch' in k or 'open_clip' in k)\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, loaded\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(empty_hub))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "missing:ViT-B-32/openai True" in out.stdout, out.stderr


def test_a_diverging_optimisation_is_a_failed_row_naming_the_sample(monkeypatch):
    import torch

    from methods.text2live import optimise

    real_render = optimise.render

    def nan_render(net_output, background):  # an edit layer gone non-finite, as after divergence
        return real_render(net_output * torch.nan, background)

    monkeypatch.setattr(optimise, "render", nan_render)
    with pytest.raises(ValueError, match="sample 'z'.*diverged"):
        Text2LIVE.from_config({"backbone": "tiny", "n_epochs": 1}).edit(_sample(sid="z"), 0)
