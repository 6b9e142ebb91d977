"""Prompt-to-Prompt with null-text inversion (methods/prompt_to_prompt.py) and the pieces it adds to
methods/diffusion: RefineCrossAttentionController, the equalizer of ReplaceCrossAttentionController,
LocalBlend and ddim_sample_batch.

Everything runs on ``backbone=tiny`` (random-weight tiny SD 1.5 pipeline, 2-3 steps, 32 x 32), no
network.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import methods.prompt_to_prompt as p2p  # noqa: E402  (registers prompt_to_prompt)
from harness.method import ParamError  # noqa: E402
from harness.registry import METHODS  # noqa: E402
from harness.runner import run_job  # noqa: E402
from methods.diffusion import inversion as inv  # noqa: E402
from methods.diffusion.attention import (  # noqa: E402
    AttentionStore,
    BatchLayout,
    LocalBlend,
    RefineCrossAttentionController,
    attention_control,
)

from .conftest import (PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config,  # noqa: E402
                       run_tiny_job, textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 32}
CLS = METHODS.get("prompt_to_prompt")
TOL = 5e-4  # batched (one UNet call for every branch and CFG half) vs one-prompt sampling


def _method(**kw):
    return CLS(CLS.parse_params({**FAST, **kw}))


@pytest.fixture(scope="module")
def setup():
    """The tiny pipeline, a 3-step schedule and a source latent with its DDIM inversion."""
    m = _method(num_inference_steps=3)
    m.prepare()
    pipe = m._loaded.pipeline
    pipe.unet.requires_grad_(False)
    sched = inv.make_schedule(pipe.scheduler, 3)
    z0 = inv.encode_image(pipe, textured(32, 32, seed=3))
    return pipe, sched, z0


def _sample_edit(method, pipe, sched, z0, source, target, z_T=None, uncond_steps=None):
    """ddim_sample_batch of [source, target] under the method's controller; returns the latents
    and the LocalBlend (or None)."""
    n = method.params.num_inference_steps
    conds = inv.encode_prompt(pipe, [source, target])
    uncond = inv.encode_prompt(pipe, "")
    if z_T is None:
        z_T = inv.ddim_invert(pipe.unet, sched, z0, conds[:1], n)[-1]
    ctrl, blend, _ = method.build_controller(pipe.tokenizer, source, target, tuple(z0.shape[-2:]), BatchLayout.cfg(2))
    with attention_control(pipe.unet, ctrl):
        lat = inv.ddim_sample_batch(pipe.unet, sched, z_T, conds, n, guidance_scale=7.5, uncond=uncond,
                                    uncond_per_step=uncond_steps, callback=blend)
    return lat, blend


# -- parameters ----------------------------------------------------------------------------------
def test_params_defaults_and_validation():
    d = CLS.Params()
    assert d.model == "CompVis/stable-diffusion-v1-4"
    assert (d.num_inference_steps, d.guidance_scale, d.resolution) == (50, 7.5, 512)
    assert (d.inversion, d.num_inner_steps, d.early_stop_epsilon, d.null_text_lr) == ("null_text", 10, 1e-5, 1e-2)
    assert (d.edit_kind, d.cross_replace_steps, d.self_replace_steps) == ("auto", 0.8, 0.5)
    assert (d.local_blend, d.blend_threshold, d.blend_start) == (False, 0.3, 0.2)
    for bad, match in [
        ({"inversion": "ddpm"}, "inversion"),
        ({"edit_kind": "swap"}, "edit_kind"),
        ({"cross_replace_steps": 1.5}, "cross_replace_steps"),
        ({"self_replace_steps": -0.1}, "self_replace_steps"),
        ({"num_inner_steps": 0}, "num_inner_steps"),
        ({"early_stop_epsilon": -1.0}, "early_stop_epsilon"),
        ({"reweight_words": ["cat"], "reweight_values": []}, "reweight_values"),
        ({"reweight_words": ["cat"], "reweight_values": [-2.0]}, "reweight_values"),
        ({"edit_kind": "reweight"}, "reweight_words"),
        ({"blend_words": ["cat"]}, "local_blend"),
        ({"local_blend": True, "blend_threshold": 1.0}, "blend_threshold"),
        ({"resolution": 30}, "resolution"),
    ]:
        with pytest.raises(ParamError, match=match):
            CLS.parse_params(bad)


def test_yaml_mirrors_every_param():
    conf = yaml.safe_load((REPO / "conf/method/prompt_to_prompt.yaml").read_text())
    assert conf.pop("name") == "prompt_to_prompt"
    fields = {f.name: f.default for f in dataclasses.fields(CLS.Params)}
    assert set(conf) == set(fields)
    assert conf == fields
    assert CLS.parse_params(conf) == CLS.Params()  # the YAML parses back to the defaults


# -- token bookkeeping (invariant 4: alignment on hand examples) ---------------------------------
def test_refine_alignment_hand_example():
    # [bos, a, cat, sitting, eos] -> [bos, a, silver, cat, sitting, eos]
    x, y = [0, 10, 11, 12, 1], [0, 10, 20, 11, 12, 1]
    assert p2p.align_tokens(x, y) == [0, 1, -1, 2, 3, 4]
    mapper, alphas = p2p.refinement_mapper(x, y, max_len=9)
    assert mapper[:6].tolist() == [0, 1, 0, 2, 3, 4] and alphas[:6].tolist() == [1, 1, 0, 1, 1, 1]
    assert mapper[6:].tolist() == [5, 6, 7] and alphas[6:].tolist() == [1, 1, 1]  # padding in order
    # a swapped token is not aligned with the token it replaces (mismatch -1 < two gaps 0)
    assert p2p.align_tokens([0, 10, 11, 1], [0, 10, 30, 1]) == [0, 1, -1, 3]
    # removal: every target token has its source token
    assert p2p.align_tokens([0, 10, 20, 11, 1], [0, 10, 11, 1]) == [0, 1, 3, 4]


def test_replacement_mapper_hand_example():
    lengths = {"a": 1, "cat": 1, "tiger": 2, "sat": 1}
    encode = lambda w: [0] * lengths[w]  # noqa: E731
    m = p2p.replacement_mapper(encode, "a cat sat", "a tiger sat", max_len=8)
    # positions: source [bos a cat sat eos ...], target [bos a ti ger sat eos ...]
    assert m[0, 0] == 1 and m[1, 1] == 1
    assert m[2, 2] == m[2, 3] == 0.5  # one source token spread over the two target tokens
    assert m[3, 4] == 1 and m[4, 5] == 1 and m[5, 6] == 1 and m[6, 7] == 1
    # each source token's attention is passed on whole (split evenly over a longer target word)
    assert np.allclose(m.sum(1)[:7], 1.0) and m[7].sum() == 0  # the last source padding falls off
    np.testing.assert_array_equal(p2p.replacement_mapper(encode, "a cat sat", "a cat sat", max_len=8), np.eye(8))
    with pytest.raises(ValueError, match="same number of words"):
        p2p.replacement_mapper(encode, "a cat", "a tiger sat", max_len=8)


def test_word_spans_match_the_tokenizer(setup):
    pipe = setup[0]
    text = "A photo of the Cat, sitting."
    spans = p2p.word_token_spans(p2p._token_encoder(pipe.tokenizer), text)
    ids = pipe.tokenizer(text).input_ids
    assert [p for s in spans for p in s] == list(range(1, len(ids) - 1))  # contiguous, start token excluded
    pos, missing = p2p.word_positions(p2p._token_encoder(pipe.tokenizer), text, ["cat", "dog"])
    assert pos == spans[4] and missing == ["dog"]
    assert p2p.differing_words("a red cat", "a blue cat") == (["red"], ["blue"])
    assert p2p.differing_words("a cat", "a big cat") == ([], ["big"])
    assert p2p.resolve_kind("auto", "a cat", "a dog") == "replace"
    assert p2p.resolve_kind("reweight", "a cat", "a big dog") == "refine"


def test_refine_controller_mapping():
    src = torch.rand(2, 3, 4)
    edit = torch.rand(2, 3, 4)
    ctrl = RefineCrossAttentionController(np.array([0, 2, 0, 3]), np.array([1, 1, 0, 1]), num_steps=1)
    out = ctrl.map_cross(src, edit, 0)
    torch.testing.assert_close(out[..., 0], src[..., 0])
    torch.testing.assert_close(out[..., 1], src[..., 2])
    torch.testing.assert_close(out[..., 2], edit[..., 2])  # a new token keeps its own map
    torch.testing.assert_close(out[..., 3], src[..., 3])


# -- invariant 1: identical prompts reproduce the source ------------------------------------------
@pytest.mark.parametrize("kind", ["replace", "refine"])
def test_identical_prompts_target_equals_source_and_plain_ddim(setup, kind):
    pipe, sched, z0 = setup
    m = _method(num_inference_steps=3, edit_kind=kind, local_blend=True)
    prompt = "a red cat sitting"
    lat, blend = _sample_edit(m, pipe, sched, z0, prompt, prompt)
    assert torch.equal(lat[0], lat[1])
    assert blend.last_mask is not None  # blending ran
    cond = inv.encode_prompt(pipe, prompt)
    z_T = inv.ddim_invert(pipe.unet, sched, z0, cond, 3)[-1]
    plain = inv.ddim_sample(pipe.unet, sched, z_T, cond, 3, guidance_scale=7.5, uncond=inv.encode_prompt(pipe, ""))
    # equal up to the float rounding of batching (~7e-5 on latents of magnitude ~5 here, x7.5 by CFG)
    torch.testing.assert_close(lat[1:], plain, atol=TOL, rtol=0)


def test_identical_prompts_with_null_text(setup):
    pipe, sched, z0 = setup
    prompt = "a red cat"
    cond, uncond = inv.encode_prompt(pipe, prompt), inv.encode_prompt(pipe, "")
    z_T, steps, _ = inv.null_text_invert(pipe.unet, sched, z0, cond, uncond, 3, inner_steps=2)
    lat, _ = _sample_edit(_method(num_inference_steps=3), pipe, sched, z0, prompt, prompt, z_T=z_T, uncond_steps=steps)
    assert torch.equal(lat[0], lat[1])
    plain = inv.ddim_sample(pipe.unet, sched, z_T, cond, 3, guidance_scale=7.5, uncond_per_step=steps)
    torch.testing.assert_close(lat[1:], plain, atol=TOL, rtol=0)


# -- invariant 4: reweight with scale 1 is no reweight ---------------------------------------------
def test_reweight_with_unit_scales_equals_no_reweight(setup):
    pipe, sched, z0 = setup
    src, tgt = "a red cat", "a blue cat"
    plain, _ = _sample_edit(_method(num_inference_steps=3), pipe, sched, z0, src, tgt)
    ones, _ = _sample_edit(_method(num_inference_steps=3, reweight_words=["blue", "cat"], reweight_values=[1.0, 1.0]),
                           pipe, sched, z0, src, tgt)
    twice, _ = _sample_edit(_method(num_inference_steps=3, edit_kind="reweight", reweight_words=["blue"],
                                    reweight_values=[2.0]), pipe, sched, z0, src, tgt)
    assert torch.equal(plain, ones)
    assert torch.equal(plain[0], twice[0])  # the source branch is never edited
    assert not torch.allclose(plain[1], twice[1])


def test_edit_changes_only_the_target_branch(setup):
    pipe, sched, z0 = setup
    m = _method(num_inference_steps=3)
    lat, _ = _sample_edit(m, pipe, sched, z0, "a red cat", "a blue cat")
    src_only, _ = _sample_edit(m, pipe, sched, z0, "a red cat", "a red cat")
    assert torch.equal(lat[0], src_only[0]) and not torch.allclose(lat[1], lat[0])


# -- invariant 3: LocalBlend ----------------------------------------------------------------------
def test_local_blend_forced_masks():
    lat = torch.randn(2, 4, 8, 8)
    zero = LocalBlend.apply(lat, torch.zeros(2, 1, 8, 8))
    assert torch.equal(zero[1], lat[0]) and torch.equal(zero[0], lat[0])
    one = LocalBlend.apply(lat, torch.ones(2, 1, 8, 8))
    assert torch.equal(one, lat)


def test_local_blend_mask_from_attention_maps():
    """Target word attends to one corner cell of a 4x4 grid: 3x3 max-pool -> a 2x2 corner,
    nearest upsampling to the 8x8 latent -> the 4x4 top-left block; the source row (no words)
    has an empty mask, so the target mask is the union = the block."""
    k = 5
    probs = torch.full((2, 16, k), 1.0 / k)
    probs[1, :, 2] = 0.0
    probs[1, 0, 2] = 1.0
    store = AttentionStore(kinds=("cross",), places=("down", "up"), max_tokens=None)
    store.add("down_blocks.1.attentions.0.transformer_blocks.0.attn2", "down", "cross", 1, probs)
    store.end_step()
    alpha = np.zeros((2, k), dtype=np.float32)
    alpha[1, 2] = 1.0
    blend = LocalBlend(store, alpha, threshold=0.3, start_step=1)
    mask = blend.compute_mask((8, 8))
    assert blend.used_grid == (4, 4)
    assert mask.shape == (2, 1, 8, 8) and mask[0].sum() == 0
    expected = torch.zeros(8, 8)
    expected[:4, :4] = 1
    assert torch.equal(mask[1, 0], expected)
    lat = torch.randn(2, 4, 8, 8)
    assert blend(lat, 0) is lat  # before start_step
    out = blend(lat, 1)
    assert torch.equal(out[1, :, 4:, :], lat[0, :, 4:, :]) and torch.equal(out[1, :, :4, :4], lat[1, :, :4, :4])


# -- invariant 5: the whole harness --------------------------------------------------------------
def test_tiny_edit_cached_scored_and_labelled(builder, tmp_path):
    # "a red thing" -> "a blue thing": replace; -> "a big blue thing": refine
    add_two_samples(builder, b={"target_caption": "a big blue thing"})
    method = {"name": "prompt_to_prompt", **FAST, "num_inner_steps": 2, "local_blend": True}
    run = run_tiny_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1), "sd15")
    for sid, kind in [("a", "replace"), ("b", "refine")]:
        info = run.info(sid)
        assert info["inversion"] == "null_text" and info["num_inner_steps"] == 2
        assert info["controller"] == kind and info["source_caption"] == "a red thing"
        assert info["blend_grid_hw"] == [8, 8]
        assert info["blend_words_target"] == (["blue"] if kind == "replace" else ["big", "blue"])


def test_replace_with_different_word_counts_is_skipped(builder, tmp_path):
    builder.add_simple("same", seed=1)
    builder.add_simple("longer", seed=2, target_caption="a big blue thing")
    builder.add_simple("blank", seed=3, source_caption="  ")
    method = {"name": "prompt_to_prompt", **FAST, "inversion": "ddim", "edit_kind": "replace"}
    out = run_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1))
    assert_skipped(out, {"longer": "same number of words", "blank": "source_caption"})


# -- invariant 6: missing weights ------------------------------------------------------------------
def test_uncached_real_model_skips_every_sample(builder, tmp_path, empty_hub):
    builder.add_simple("a", seed=1)
    builder.add_simple("b", seed=2)
    model = CLS.Params().model
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "prompt_to_prompt", "num_inference_steps": 2},
                     metrics=PIXEL_L1)
    assert_missing_weights(run_job(cfg), model)


# -- SDXL ------------------------------------------------------------------------------------------
def test_pooled_text_unet_packs_and_unpacks():
    calls = {}

    class Fake:
        def __call__(self, x, t, encoder_hidden_states, added_cond_kwargs):
            calls.update(text=encoder_hidden_states, **added_cond_kwargs)
            return "out"

    emb, pooled = torch.randn(2, 5, 3), torch.randn(2, 7)  # pooled wider than a token: 3 extra tokens
    packed = inv.PooledTextUNet.pack(emb, pooled)
    assert packed.shape == (2, 8, 3)
    wrapped = inv.PooledTextUNet(Fake(), torch.tensor([[32.0, 32, 0, 0, 32, 32]]), seq_len=5, pooled_dim=7)
    assert wrapped(torch.zeros(2, 4, 2, 2), 1, encoder_hidden_states=packed) == "out"
    assert torch.equal(calls["text"], emb) and torch.equal(calls["text_embeds"], pooled)
    assert calls["time_ids"].shape == (2, 6)


def test_sdxl_identical_prompts_reproduce_source_and_param_check():
    m = _method(architecture="sdxl", num_inference_steps=2)
    assert m.tiny_kind == "sdxl" and m.model_revision() == "tiny-random-sdxl"
    m.prepare()
    pipe = m._loaded.pipeline
    sched = inv.make_schedule(pipe.scheduler, 2)
    z0 = inv.encode_image(pipe, textured(32, 32, seed=4))
    emb, pooled, u_emb, u_pooled = inv.encode_prompt_sdxl(pipe, ["a red cat", "a red cat"])
    assert torch.count_nonzero(u_emb) == 0  # SDXL base: zero unconditional embedding
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=z0.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    unet = inv.PooledTextUNet(pipe.unet, time_ids, emb.shape[1], pooled.shape[-1])
    # one row twice: the batched SDXL text encoders round identical prompts differently (~1e-7)
    conds, uncond = unet.pack(emb[:1], pooled[:1]).repeat(2, 1, 1), unet.pack(u_emb, u_pooled)
    # the wrapper is the SDXL UNet call with added_cond_kwargs, bit for bit
    direct = pipe.unet(z0, 1, encoder_hidden_states=emb[:1],
                       added_cond_kwargs={"text_embeds": pooled[:1], "time_ids": time_ids}).sample
    assert torch.equal(unet(z0, 1, encoder_hidden_states=conds[:1]).sample, direct)
    z_T, steps, _ = inv.null_text_invert(unet, sched, z0, conds[:1], uncond, 2, inner_steps=2)
    ctrl, blend, _ = m.build_controller(pipe.tokenizer, "a red cat", "a red cat", tuple(z0.shape[-2:]),
                                        BatchLayout.cfg(2))
    with attention_control(pipe.unet, ctrl):
        lat = inv.ddim_sample_batch(unet, sched, z_T, conds, 2, guidance_scale=7.5, uncond_per_step=steps)
    assert torch.equal(lat[0], lat[1])
    plain = inv.ddim_sample(unet, sched, z_T, conds[:1], 2, guidance_scale=7.5, uncond_per_step=steps)
    torch.testing.assert_close(lat[1:], plain, atol=TOL, rtol=0)
    with pytest.raises(ParamError, match="architecture"):
        CLS.parse_params({"architecture": "sdxl"})  # the default model is SD 1.4
    CLS.parse_params({"architecture": "sdxl", "model": p2p.SDXL_MODEL})


def test_sdxl_through_the_harness(builder, tmp_path):
    builder.add_simple("a", h=48, w=64, seed=1)
    method = {"name": "prompt_to_prompt", **FAST, "architecture": "sdxl", "num_inner_steps": 2, "local_blend": True}
    run = run_tiny_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1), "sdxl",
                       sizes={"a": (48, 64)})
    assert run.info("a")["controller"] == "replace"
