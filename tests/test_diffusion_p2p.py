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
import torch
import yaml

import methods.prompt_to_prompt as p2p  # (registers prompt_to_prompt)
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from methods.diffusion import inversion as inv
from methods.diffusion.attention import (
    AttentionController,
    AttentionStore,
    BatchLayout,
    ControllerList,
    LocalBlend,
    RefineCrossAttentionController,
    attention_control,
)

from .conftest import (PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config, run_tiny_job,
                       textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
# 128 px: 16 x 16 latents (the tiny VAE downsamples by 8, as SD's), the attention-map sizes these
# invariants and tolerances were measured on (smaller latents leave 1 x 1 maps at the UNet's
# coarsest level, where rounding is no longer negligible)
FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 128}
CLS = METHODS.get("prompt_to_prompt")
# Batched (one UNet call for every branch and CFG half) vs one-prompt sampling, and two rows of one
# batched call: the same inputs, but the GEMM / convolution kernels may block the rows of a batch
# differently (bit-equal rows with AVX2 kernels, 3.5e-5 apart with AVX-512 ones). float32 rounding
# (~1e-7 relative) through 3 tiny-UNet calls, amplified ~16x by CFG 7.5 (eps_u + 7.5 (eps_c - eps_u)),
# on latents of magnitude ~5: ~1e-4 at most; a branch that is edited, or the wrong row, is >= 1e-2 away.
TOL = 5e-4
# Attention maps the controller rewrites: a copy is exact; the word-swap mapper's two-token average
# ((p_2 + p_3) / 4, through an einsum) may round differently from the test's sum by 1 ulp of a
# probability <= 1 (1.2e-7). Maps that were not replaced are >= 2e-2 from the mapped source (measured:
# 2e-2 .. 8e-2 on this tiny UNet); MAP_GAP asserts that margin so the equality check can fail.
MAP_TOL = 1e-6
MAP_GAP = 5e-3


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
    z0 = inv.encode_image(pipe, textured(128, 128, seed=3))
    return pipe, sched, z0


def _sample_edit(method, pipe, sched, z0, source, target, z_T=None, uncond_steps=None):
    """ddim_sample_batch of [source, target] under the method's controller; returns the latents
    and the LocalBlend (or None)."""
    lat, blend, _, _ = _edit_run(method, pipe, sched, z0, source, target, z_T, uncond_steps)
    return lat, blend


class _Recorder(AttentionController):
    """Records every attention layer's probabilities, as ``(rows, heads, N_q, N_k)`` clones, where it
    sits in a ControllerList: before the P2P controller (what the UNet computed) or after it (what
    the layer then uses). Rows of BatchLayout.cfg(2): 0 uncond source, 1 uncond edit, 2 cond
    source, 3 cond edit."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def needs_probs(self, ctx) -> bool:
        return True

    def on_probs(self, ctx):
        p = ctx.probs.detach()
        self.calls.append((ctx.step, ctx.name, ctx.kind, p.reshape(ctx.batch_size, ctx.heads, *p.shape[1:]).clone()))
        return None


def _edit_run(method, pipe, sched, z0, source, target, z_T=None, uncond_steps=None, record=False, edit_off=False):
    """(latents, LocalBlend or None, controller info, recorded calls): with ``record``, every
    attention call as ``(step, name, kind, probs before the controller, probs after it)``;
    ``edit_off`` replaces the method's controller by a no-op one (the maps the UNet makes alone)."""
    n = method.params.num_inference_steps
    conds = inv.encode_prompt(pipe, [source, target])
    uncond = inv.encode_prompt(pipe, "")
    if z_T is None:
        z_T = inv.ddim_invert(pipe.unet, sched, z0, conds[:1], n)[-1]
    layout = BatchLayout.cfg(2)
    ctrl, blend, info = method.build_controller(pipe.tokenizer, source, target, tuple(z0.shape[-2:]), layout)
    if edit_off:
        ctrl = AttentionController(layout=layout)
    before, after = _Recorder(), _Recorder()
    if record:
        ctrl = ControllerList([before, ctrl, after], layout=layout)
    with attention_control(pipe.unet, ctrl):
        lat = inv.ddim_sample_batch(pipe.unet, sched, z_T, conds, n, guidance_scale=7.5, uncond=uncond,
                                    uncond_per_step=uncond_steps, callback=blend)
    calls = [(st, name, kind, b, a) for (st, name, kind, b), (*_, a) in zip(before.calls, after.calls)]
    if record:  # one call a layer and step, seen by both recorders
        assert len(calls) == len(before.calls) == len(after.calls) == n * len(pipe.unet.attn_processors)
    return lat, blend, info, calls


def _untouched_rows(calls):
    """The controller edits only the conditional edit row (P2P edits attn[h // 2:]): the other rows
    leave it as they came (a copy)."""
    for step, name, _, b, a in calls:
        for row in (0, 1, 2):
            assert torch.equal(a[row], b[row]), (step, name, row)


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
    lat, blend, info, calls = _edit_run(m, pipe, sched, z0, prompt, prompt, record=True)
    assert info["controller"] == kind and info["cross_replace_window"] == [0, 3]  # int(0.8 * (3 + 1))
    torch.testing.assert_close(lat[0], lat[1], atol=TOL, rtol=0)
    assert blend.last_mask is not None  # blending ran
    # during the run, the edit's cross-attention is the source's through the identity mapping (a copy;
    # this alone also holds without the controller where the two rows round alike: the different-prompt
    # tests below check the replacement itself)
    cross = [c for c in calls if c[2] == "cross"]
    assert len(cross) == 3 * 7  # 3 steps x the tiny UNet's 7 cross-attention layers
    for step, name, _, b, a in cross:
        assert torch.equal(a[3], b[2]), (step, name)
    _untouched_rows(calls)
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
    torch.testing.assert_close(lat[0], lat[1], atol=TOL, rtol=0)  # two rows of one batched call
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
    # bit for bit: the same inputs, shapes and kernels, and scaling by 1.0 is exact in float
    assert torch.equal(plain, ones)
    # the source branch is never edited: its row gets the same inputs and kernels in both runs
    # (a row of a batched call does not depend on the other rows' values)
    assert torch.equal(plain[0], twice[0])
    assert float((plain[1] - twice[1]).abs().max()) > 1e-2  # reweighting changed the edit


def test_edit_changes_only_the_target_branch(setup):
    pipe, sched, z0 = setup
    m = _method(num_inference_steps=3)
    lat, _ = _sample_edit(m, pipe, sched, z0, "a red cat", "a blue cat")
    src_only, _ = _sample_edit(m, pipe, sched, z0, "a red cat", "a red cat")
    # same inputs, shapes and kernels for the source row in both runs: bit for bit
    assert torch.equal(lat[0], src_only[0])
    assert float((lat[1] - lat[0]).abs().max()) > 1e-2


# -- invariant 2: the edit branch's maps are the source's through the mapper during the run ------
def _replace_mapped(s: "torch.Tensor") -> "torch.Tensor":
    """Source maps ``(..., 77)`` of "a red cat" in the token layout of "a blue cat", written here from
    P2P's ``seq_aligner.get_replacement_mapper_`` (tiny tokenizer: 'red' 2 tokens, 'blue' 4): bos and
    'a' in place; each of the 4 'blue' tokens gets (red_1 + red_2) / 4 (weights 1 / n_target); 'cat'
    (2 tokens) moves from positions 4-5 to 6-7; the end token and padding shift by 2 (the last two
    source positions fall off)."""
    red = ((s[..., 2] + s[..., 3]) / 4)[..., None]
    return torch.cat([s[..., :2], red.expand(*red.shape[:-1], 4), s[..., 4:6], s[..., 6:75]], dim=-1)


def test_replace_maps_follow_the_mapper_in_the_window(setup):
    """Word swap "a red cat" -> "a blue cat" with the cross window [0, 2) and the self window [0, 1)
    of 3 steps: inside them the edit row's conditional maps are the source's through the word-swap
    mapper (cross) or the source's (self, layers of <= (latent / 2)^2 tokens); outside, its own."""
    pipe, sched, z0 = setup
    enc = p2p._token_encoder(pipe.tokenizer)
    assert [len(enc(w)) for w in ("a", "red", "blue", "cat")] == [1, 2, 4, 2]  # _replace_mapped's layout
    m = _method(num_inference_steps=3, cross_replace_steps=0.5, self_replace_steps=0.5)
    lat, _, info, calls = _edit_run(m, pipe, sched, z0, "a red cat", "a blue cat", record=True)
    # P2P's windows: int(0.5 * (3 + 1)) cross steps, int(0.5 * 3) self steps
    windows = (info["cross_replace_window"], info["self_replace_window"])
    assert info["controller"] == "replace" and windows == ([0, 2], [0, 1])
    cross = [c for c in calls if c[2] == "cross"]
    assert len(cross) == 3 * 7
    for step, name, _, b, a in cross:
        expected = _replace_mapped(b[2])
        if step < 2:
            torch.testing.assert_close(a[3], expected, atol=MAP_TOL, rtol=0, msg=f"{step} {name}")
            # the edit's own maps are far from it: the equality above tests the replacement
            assert float((b[3] - expected).abs().max()) > MAP_GAP, (step, name)
        else:
            assert torch.equal(a[3], b[3]), (step, name)
    selfs = [c for c in calls if c[2] == "self"]
    # replaced: step 0, layers of <= 8 x 8 tokens (16 x 16 latent): down 8x8, mid 4x4, 2 x up 8x8
    replaced = {(st, name) for st, name, _, b, _ in selfs if st == 0 and b.shape[2] <= 8 * 8}
    assert len(selfs) == 3 * 7 and len(replaced) == 4
    for step, name, _, b, a in selfs:
        if (step, name) in replaced:
            assert torch.equal(a[3], b[2]), (step, name)  # a copy
            # at step 0 the branches differ only through cross-attention: own maps 1.5e-3 .. 7.5e-3
            # from the source's (measured), far above rounding (~1e-7)
            assert float((b[3] - b[2]).abs().max()) > 1e-4, (step, name)
        else:
            assert torch.equal(a[3], b[3]), (step, name)
    _untouched_rows(calls)
    # with the controller off, the edit's maps never follow the mapper, and the edit differs
    off, _, _, off_calls = _edit_run(m, pipe, sched, z0, "a red cat", "a blue cat", record=True, edit_off=True)
    for step, name, kind, _, a in off_calls:
        if kind == "cross":
            assert float((a[3] - _replace_mapped(a[2])).abs().max()) > MAP_GAP, (step, name)
    assert float((off[1] - lat[1]).abs().max()) > 1e-2
    torch.testing.assert_close(off[0], lat[0], atol=TOL, rtol=0)  # the source branch is not edited


def test_refine_maps_follow_the_alignment_in_the_window(setup):
    """Refinement "a red cat" -> "a big red cat" (cross window [0, 2) of 3 steps): inside the window the
    edit row's aligned tokens take the source token's maps and the 3 new 'big' tokens keep their own."""
    pipe, sched, z0 = setup
    enc = p2p._token_encoder(pipe.tokenizer)
    assert [len(enc(w)) for w in ("a", "red", "big", "cat")] == [1, 2, 3, 2]
    assert not set(enc("big")) & set(enc("a red cat"))  # no 'big' token can align with the source
    # target [bos a b b b r r c c eos pad..] -> source [bos a r r c c eos pad..]: positions 0-1 in
    # place, 5.. from 3 earlier (red, cat, end token and padding), 2-4 new
    src_of = {0: 0, 1: 1, **{j: j - 3 for j in range(5, 77)}}
    new = [2, 3, 4]
    m = _method(num_inference_steps=3, cross_replace_steps=0.5, self_replace_steps=0.0)
    _, _, info, calls = _edit_run(m, pipe, sched, z0, "a red cat", "a big red cat", record=True)
    assert (info["controller"], info["refine_new_tokens"], info["cross_replace_window"]) == ("refine", 3, [0, 2])
    tgt, src = list(src_of), list(src_of.values())
    cross = [c for c in calls if c[2] == "cross"]
    assert len(cross) == 3 * 7
    for step, name, _, b, a in cross:
        if step < 2:
            # source * 1 + edit * 0 and source * 0 + edit * 1 are exact in float: a copy
            assert torch.equal(a[3][..., tgt], b[2][..., src]), (step, name)
            assert torch.equal(a[3][..., new], b[3][..., new]), (step, name)
            assert float((b[3][..., tgt] - b[2][..., src]).abs().max()) > MAP_GAP, (step, name)
        else:
            assert torch.equal(a[3], b[3]), (step, name)
    for step, name, kind, b, a in calls:
        if kind == "self":  # self window empty: no self-attention replaced
            assert torch.equal(a[3], b[3]), (step, name)
    _untouched_rows(calls)


# -- invariant 3: LocalBlend ----------------------------------------------------------------------
def test_local_blend_forced_masks():
    lat = torch.randn(2, 4, 8, 8)
    # bit for bit: with a 0/1 mask the blend is x * 1 + y * 0, exact in float
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
    z0 = inv.encode_image(pipe, textured(128, 128, seed=4))
    emb, pooled, u_emb, u_pooled = inv.encode_prompt_sdxl(pipe, ["a red cat", "a red cat"])
    assert torch.count_nonzero(u_emb) == 0  # SDXL base: zero unconditional embedding
    time_ids = pipe._get_add_time_ids((128, 128), (0, 0), (128, 128), dtype=z0.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    unet = inv.PooledTextUNet(pipe.unet, time_ids, emb.shape[1], pooled.shape[-1])
    # one row twice: the batched SDXL text encoders round identical prompts differently (~1e-7)
    conds, uncond = unet.pack(emb[:1], pooled[:1]).repeat(2, 1, 1), unet.pack(u_emb, u_pooled)
    # the wrapper is the SDXL UNet call with added_cond_kwargs, bit for bit
    direct = pipe.unet(z0, 1, encoder_hidden_states=emb[:1],
                       added_cond_kwargs={"text_embeds": pooled[:1], "time_ids": time_ids}).sample
    # (the same inputs, shapes and kernels as the direct call)
    assert torch.equal(unet(z0, 1, encoder_hidden_states=conds[:1]).sample, direct)
    z_T, steps, _ = inv.null_text_invert(unet, sched, z0, conds[:1], uncond, 2, inner_steps=2)
    ctrl, blend, _ = m.build_controller(pipe.tokenizer, "a red cat", "a red cat", tuple(z0.shape[-2:]),
                                        BatchLayout.cfg(2))
    with attention_control(pipe.unet, ctrl):
        lat = inv.ddim_sample_batch(unet, sched, z_T, conds, 2, guidance_scale=7.5, uncond_per_step=steps)
    torch.testing.assert_close(lat[0], lat[1], atol=TOL, rtol=0)  # two rows of one batched call
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
