"""InfEdit (methods/infedit.py): the DDCM step, the unified attention control, the blend, the
adapter through the harness. Everything runs on the tiny random-weight SD backbone (an
LCMScheduler built from its SD 1.5 scheduler config): no network, no real weights.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import methods  # noqa: F401  (registers the shipped methods)
import methods.infedit as infedit  # the lead adds this module to methods/__init__.py at integration
from harness.cli import main
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample, SkipSample
from methods.infedit import (InfEdit, TokenMaps, UnifiedAttentionController, align_source_positions, blend_latents,
                             ddcm_step, token_maps)

from .conftest import PIXEL_L1, job_config, read_edits, read_scores, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4  # the tiny default; with the demo's windows: self control at step 0, cross control at steps 0-1


def tiny(**params) -> InfEdit:
    m = InfEdit(InfEdit.parse_params({"backbone": "tiny", **params}))
    m.name = "infedit"
    return m


@pytest.fixture(scope="module")
def pipe():
    m = tiny()
    m.prepare()
    return m._loaded.pipeline


def latents0(pipe, seed: int = 1):
    from methods.diffusion.inversion import encode_image

    return encode_image(pipe, textured(64, 64, seed))


# -- parameters ----------------------------------------------------------------------------------
def test_defaults_are_the_demos_and_the_yaml_matches():
    p = InfEdit.Params()
    assert (p.model, p.num_inference_steps, p.original_inference_steps, p.guidance_scale,
            p.source_guidance_scale) == ("SimianLuo/LCM_Dreamshaper_v7", 15, 50, 2.0, 1.0)
    assert (p.cross_replace_steps, p.self_replace_steps, p.local_threshold, p.mutual_threshold, p.eta,
            p.denoise, p.strength, p.resolution) == (0.7, 0.3, 0.6, 0.6, 1.0, False, 0.7, 512)
    assert (p.local_blend, p.mutual_blend, p.temperature) == (None, "", 0.15)
    t = InfEdit.parse_params({"backbone": "tiny"})
    assert (t.num_inference_steps, t.resolution) == (4, 64)
    assert METHODS.get("infedit") is InfEdit
    cfg = yaml.safe_load((ROOT / "conf" / "method" / "infedit.yaml").read_text())
    assert cfg.pop("name") == "infedit"
    assert cfg == {f.name: f.default for f in dataclasses.fields(InfEdit.Params)}
    assert InfEdit.parse_params(cfg) == p


@pytest.mark.parametrize("params, match", [
    ({"eta": 1.5}, "'eta' must be in"),
    ({"num_inference_steps": 60}, "must not exceed 'original_inference_steps'"),
    ({"strength": 0.0}, "'strength' must be > 0"),
    ({"cross_replace_steps": -0.1}, "'cross_replace_steps'"),
])
def test_bad_parameters_are_refused(params, match):
    with pytest.raises((ParamError, ValueError), match=match):
        InfEdit.parse_params({"backbone": "tiny", **params})


# -- the DDCM step -------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_ddcm_step_is_ddim_with_the_calibrated_noise(eta):
    """Paper sec. 3 written another way: e_c makes the source predict x_0; the target moves like DDIM
    with the noise (e_t - e_s) + e_c and variance eta * (1 - a_prev)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x_s, x_t, e_s, e_t, x_0, z = (torch.randn(1, 4, 3, 5, generator=g, dtype=torch.float64) for _ in range(6))
    a_t, a_prev = 0.3, 0.8
    prev_xs, prev_xt, pred = ddcm_step(a_t, a_prev, x_s, x_t, e_s, e_t, x_0, z, eta)
    e_cal = e_t - e_s + (x_s - np.sqrt(a_t) * x_0) / np.sqrt(1 - a_t)
    want_pred = (x_t - np.sqrt(1 - a_t) * e_cal) / np.sqrt(a_t)  # DDIM's x_0 prediction
    sigma2 = eta * (1 - a_prev)
    want_xt = np.sqrt(a_prev) * want_pred + np.sqrt(1 - a_prev - sigma2) * e_cal + np.sqrt(sigma2) * z
    want_xs = np.sqrt(a_prev) * x_0 + np.sqrt(1 - a_prev - sigma2) * e_cal + np.sqrt(sigma2) * z
    # float64, the same quantities in another association order: agreement to ~1e-15 relative
    for got, want in ((pred, want_pred), (prev_xt, want_xt), (prev_xs, want_xs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # one-step schedule: the predictions themselves
    s1, t1, p1 = ddcm_step(a_t, a_prev, x_s, x_t, e_s, e_t, x_0, z, eta, multistep=False)
    assert torch.equal(s1, x_0) and torch.equal(t1, pred) and torch.equal(p1, pred)
    # the source branch (x_t = x_s, e_t = e_s) predicts x_0 exactly: x_0 + 0
    # and moves exactly like the source
    own_s, same, pred_s = ddcm_step(a_t, a_prev, x_s, x_s, e_s, e_s, x_0, z, eta)
    assert torch.equal(pred_s, x_0) and torch.equal(same, own_s)


# -- reconstruction ----------------------------------------------------------------------------------
def test_equal_prompts_and_guidance_reconstruct_the_source_latent(pipe):
    """Source == target and equal guidance: the three branches see the same inputs (the refinement
    mapper is the identity, the attention controls swap equal rows), so e_t = e_s at every step
    and the target predicts x_0 + 0 / sqrt(a) = x_0: the only loss is the VAE's."""
    import torch

    from methods.diffusion.inversion import decode_latents

    x0 = latents0(pipe)
    m = tiny(source_guidance_scale=2.0)
    prompt = "a red thing on a wooden table"
    out = m.run_edit(pipe, x0, prompt, prompt, torch.Generator().manual_seed(0))
    # identical batch rows give identical results up to kernel choice per row: 1e-5 of latents ~1
    torch.testing.assert_close(out["edit"], x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["target"], out["source"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["mutual"], out["source"], rtol=0, atol=1e-5)
    tm = out["token_maps"]
    assert (tm.mapper[:10] == np.arange(10)).all() and (tm.alphas == 1).all() and tm.alpha_e.sum() == 0
    # at the image: the VAE round trip of the source, to one grey level
    recon = decode_latents(pipe, out["edit"]).astype(int)
    assert np.abs(recon - decode_latents(pipe, x0).astype(int)).max() <= 1
    # the demo's guidance (target 2, source 1) breaks e_t = e_s: not a reconstruction any more
    demo = tiny().run_edit(pipe, x0, prompt, prompt, torch.Generator().manual_seed(0))
    assert float((demo["edit"] - x0).abs().max()) > 1e-2


# -- attention control ----------------------------------------------------------------------------------
class Recording(UnifiedAttentionController):
    """Keeps what the control saw and returned at every layer."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.qkv, self.probs = [], []

    def on_qkv(self, ctx):
        r = super().on_qkv(ctx)
        if r is not None:
            self.qkv.append((ctx.step, ctx.layout, ctx.heads, ctx.query.clone(), ctx.key.clone(), ctx.value.clone(),
                             tuple(t.clone() for t in r)))
        return r

    def on_probs(self, ctx):
        r = super().on_probs(ctx)
        if r is not None:
            self.probs.append((ctx.step, ctx.layout, ctx.heads, ctx.probs.clone(), r.clone()))
        return r


def test_unified_attention_control_on_captured_attention(pipe, monkeypatch):
    import torch

    seen = []

    def recording(*a, **kw):
        seen.append(Recording(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(infedit, "UnifiedAttentionController", recording)
    m = tiny()
    out = m.run_edit(pipe, latents0(pipe), "a cat on a mat", "a dog on a mat", torch.Generator().manual_seed(0))
    ctrl, = seen
    assert out["info"]["self_control_steps"] == [0] and out["info"]["cross_control_steps"] == [0, 1]
    n_self = sum(1 for n in pipe.unet.attn_processors if "attn1" in n)
    n_cross = sum(1 for n in pipe.unet.attn_processors if "attn2" in n)
    assert len(ctrl.qkv) == STEPS * n_self and len(ctrl.probs) == STEPS * n_cross
    for step, layout, h, q, k, v, (q2, k2, v2) in ctrl.qkv:
        assert layout.branches == (0, 1, 2, 0, 1, 2)  # [uncond s, t, m, cond s, t, m]
        for half in (0, 3):
            s, t, mu = (slice((half + b) * h, (half + b + 1) * h) for b in range(3))
            if step == 0:  # (0 + 1) / 4 < 0.3: the target attends with the source's map, own values
                assert torch.equal(q2[t], q[s]) and torch.equal(k2[t], k[s]) and torch.equal(v2[t], v[t])
                assert torch.equal(q2[mu], q[s]) and torch.equal(k2[mu], k[s]) and torch.equal(v2[mu], v[s])
            else:  # mutual self-attention: target queries on the source's keys and values
                assert torch.equal(q2[t], q[t]) and torch.equal(k2[t], k[t]) and torch.equal(v2[t], v[t])
                assert torch.equal(q2[mu], q[t]) and torch.equal(k2[mu], k[s]) and torch.equal(v2[mu], v[s])
            assert torch.equal(q2[s], q[s]) and torch.equal(k2[s], k[s]) and torch.equal(v2[s], v[s])
    tm = out["token_maps"]
    idx, a = torch.as_tensor(tm.mapper), torch.as_tensor(tm.alphas)
    # tiny BPE: "c at" -> "d o g" (positions 2-4) are unaligned; the similarity search maps one of
    # them into the source's gap (positions 2-3), the other two keep their own maps
    new = [j for j in (2, 3, 4) if tm.alphas[j] == 1]
    assert len(new) == 1 and tm.mapper[new[0]] in (2, 3) and tm.alphas.sum() == len(tm.alphas) - 2
    assert tm.alpha_e.nonzero()[0].tolist() == [2, 3, 4] and tm.target_len == 10
    for step, layout, h, p, p2 in ctrl.probs:
        cond = [slice((3 + b) * h, (4 + b) * h) for b in range(3)]
        s, t, mu = cond
        refined = p[s][..., idx] * a + p[t] * (1 - a)
        if step in (0, 1):
            torch.testing.assert_close(p2[t], refined, rtol=0, atol=0)
            assert not torch.equal(p[t], refined)  # the control changed something
        else:
            assert torch.equal(p2[t], p[t])
        assert torch.equal(p2[: 3 * h], p[: 3 * h])  # the unconditional half is never touched
        assert torch.equal(p2[s], p[s]) and torch.equal(p2[mu], p[mu])
    assert ctrl.store.num_steps == STEPS
    assert all(m.shape[0] == 2 * ctrl.store.meta[n][2] for n, m in ctrl.store.sums.items())


# -- the blend ------------------------------------------------------------------------------------------
def _maps(k: int = 6):
    """Two branches (refined source, refined mutual) of 2 layer-heads at 4 x 4, K tokens: token 2 peaks
    at the top-left cell of the mutual maps, token 3 at the bottom-right of the source maps."""
    import torch

    maps = torch.full((2, 2, 4, 4, k), 0.01)
    maps[1, :, 0, 0, 2] = 1.0
    maps[0, :, 3, 3, 3] = 1.0
    return maps


def test_blend_keeps_the_target_in_its_word_mask_and_the_source_in_the_mutual_one():
    import torch

    k = 6
    maps = _maps(k)
    x_s, x_t, x_m = (torch.full((1, 4, 8, 8), v) for v in (1.0, 2.0, 3.0))
    e = np.zeros(k, np.float32)
    e[2] = 1
    mu = np.zeros(k, np.float32)
    mu[3] = 1
    tm = TokenMaps(np.arange(k), np.ones(k, np.float32), e, mu, target_len=5)
    out, masks = blend_latents(maps, x_s, x_t, x_m, tm, alpha_t=0.5, local_threshold=0.6, mutual_threshold=0.6,
                               use_xm=False)
    top_left = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    top_left[..., :2, :2] = True  # the 4 x 4 cell, nearest-resized to 8 x 8
    bottom_right = torch.zeros_like(top_left)
    bottom_right[..., 6:, 6:] = True
    assert torch.equal(masks["target"], top_left) and torch.equal(masks["mutual"], bottom_right)
    want = torch.full_like(x_t, 3.0)
    want[..., :2, :2] = 2.0
    want[..., 6:, 6:] = 1.0
    assert torch.equal(out, want)
    # no target blend words: the target is kept (then the mutual words still restore the source)
    none = TokenMaps(tm.mapper, tm.alphas, np.zeros(k, np.float32), mu, 5)
    out, _ = blend_latents(maps, x_s, x_t, x_m, none, 0.5, 0.6, 0.6, use_xm=False)
    want = torch.full_like(x_t, 2.0)
    want[..., 6:, 6:] = 1.0
    assert torch.equal(out, want)
    # tokens past target_len - 2 are ignored: token 3 outside [1, 3) gives no mutual mask
    short = TokenMaps(tm.mapper, tm.alphas, e, mu, target_len=3)
    _, masks = blend_latents(maps, x_s, x_t, x_m, short, 0.5, 0.6, 0.6, use_xm=False)
    assert not masks["mutual"].any()


def test_blend_threshold_follows_the_temperature_and_words_in_both_blends_take_the_mutual_branch():
    import torch

    k = 6
    maps = _maps(k)
    maps[1, :, 0, 1, 2] = 0.5  # a second cell at half the peak
    x_s, x_t, x_m = (torch.full((1, 4, 8, 8), v) for v in (1.0, 2.0, 3.0))
    e = np.zeros(k, np.float32)
    e[2] = 1
    tm = TokenMaps(np.arange(k), np.ones(k, np.float32), e, np.zeros(k, np.float32), 5)
    # a_t = 0.25: 0.15 / sqrt(0.25) = 0.3 < 0.4 -> the threshold is 0.4 and 0.5 passes
    _, masks = blend_latents(maps, x_s, x_t, x_m, tm, 0.25, 0.4, 0.6, use_xm=False)
    assert int(masks["target"].sum()) == 2 * 4
    # a_t = 0.01: 0.15 / 0.1 = 1.5 > 0.4: nothing passes (early steps blend nothing of the target in)
    out, masks = blend_latents(maps, x_s, x_t, x_m, tm, 0.01, 0.4, 0.6, use_xm=False)
    assert not masks["target"].any() and torch.equal(out, x_m)
    both = TokenMaps(tm.mapper, tm.alphas, e, e.copy(), 5)  # token 2 in both blends
    out, masks = blend_latents(maps, x_s, x_t, x_m, both, 0.25, 0.4, 0.6, use_xm=True)
    assert torch.equal(masks["both"], masks["target"]) and not masks["mutual"].any()
    assert torch.equal(out, x_m)  # use_xm: inside both-words mask the mutual branch, outside it too


# -- token alignment ---------------------------------------------------------------------------------------
def test_token_maps_align_swap_insertion_padding_and_refuse_missing_words():
    import torch

    B, E = 100, 101
    emb = torch.eye(12)
    # insertion: y = B 1 7 8 2 3 E against x = B 1 2 3 E: 7, 8 have no source token in their gap
    tm = token_maps([B, 1, 2, 3, E], [B, 1, 7, 8, 2, 3, E], [B, 7, 8, E], [B, 3, E], emb, emb, 12)
    assert tm.mapper[:7].tolist() == [0, 1, -1, -1, 2, 3, 4] and tm.alphas[:7].tolist() == [1, 1, 0, 0, 1, 1, 1]
    assert tm.mapper[7:].tolist() == [7, 8, 9, 10, 11]  # padding maps to itself (the official code)
    assert tm.alpha_e.nonzero()[0].tolist() == [2, 3] and tm.alpha_m.nonzero()[0].tolist() == [5]
    assert tm.target_len == 7
    # swap of a two-token word for one: the most similar (source-at-target, target-at-source) pair wins
    emb_x, emb_y = torch.eye(12), torch.eye(12)
    emb_y[3] = emb_x[2] * 0.1 + emb_x[3]  # cos(x[2], y[3]) small, cos(x[2], y[2]) = 1
    tm = token_maps([B, 1, 5, 6, E], [B, 1, 9, E], [B, 9, E], [B, E], emb_x, emb_y, 12)
    assert tm.mapper[2] in (2, 3) and tm.alphas[:4].tolist() == [1, 1, 1, 1]
    assert tm.mapper[2] == 2  # x_emb[2] . y_emb[2] = 1 beats x_emb[2] . y_emb[3]
    with pytest.raises(ValueError, match="target blend words are not in the target"):
        token_maps([B, 1, E], [B, 1, E], [B, 5, E], [B, E], emb, emb, 12)
    with pytest.raises(ValueError, match="not shared by the source and target"):
        token_maps([B, 1, 2, E], [B, 1, 3, E], [B, E], [B, 3, E], emb, emb, 12)
    # the official tie order (gap in the source first): a repeated token aligns with its *first* copy
    # (the project's P2P aligner, which prefers matches, takes the last: [0, 2, 3] and [0, -1, 1, 2])
    assert align_source_positions([B, 1, 1, E], [B, 1, E]) == [0, 1, 3]
    assert align_source_positions([B, 1, E], [B, 1, 1, E]) == [0, 1, -1, 2]


def test_blend_words_from_the_captions_and_bad_ones_skip_naming_the_field():
    m = tiny()
    s = Sample(id="s1", dataset="t", source=textured(16, 16), source_caption="A statue of an angel",
               target_caption="A statue with a torso of an angel")
    assert m.blend_words(s.source_caption, s.target_caption) == ("with torso", "")
    assert m.check(s) is None
    bad = tiny(local_blend="zebra")
    reason = bad.check(s)
    assert "zebra" in reason and "local_blend" in reason and "'s1'" in reason and "target_caption" in reason
    reason = tiny(mutual_blend="torso").check(s)
    assert "torso" in reason and "mutual_blend" in reason
    empty = Sample(id="s2", dataset="t", source=textured(16, 16), source_caption=" ", target_caption="x")
    assert "source_caption" in tiny().check(empty)


def test_token_level_blend_errors_become_skips(pipe):
    import torch

    m = tiny(mutual_blend="cat")  # a word of both captions, but the target's "cat" aligns elsewhere
    with pytest.raises(SkipSample, match="mutual_blend 'cat'"):
        m.run_edit(pipe, latents0(pipe), "a cat and a dog", "a dog and a cat", torch.Generator().manual_seed(0))


def test_a_v_prediction_model_is_refused_naming_it(pipe):
    import types

    import torch

    m = tiny(model="some/sd-2-1-768")
    v_pipe = types.SimpleNamespace(**{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")},
                                   scheduler=types.SimpleNamespace(config={**pipe.scheduler.config,
                                                                           "prediction_type": "v_prediction"}))
    with pytest.raises(SkipSample, match="some/sd-2-1-768' predicts 'v_prediction'"):
        m.run_edit(v_pipe, latents0(pipe), "a cat", "a dog", torch.Generator().manual_seed(0))


# -- costs, modes, the adapter ------------------------------------------------------------------------------
def test_one_batched_unet_call_per_step_and_the_mask_returned():
    s = Sample(id="c", dataset="t", source=textured(48, 64, 2), source_caption="a red thing",
               target_caption="a blue thing")
    out = tiny().edit(s, 0)
    calls, rows = out.info["network_calls"], out.info["network_rows"]
    # 3 branches x 2 guidance halves in one call per step; 4 prompts encoded; one VAE encode, one decode
    assert calls == {"unet": STEPS, "text_encoder": 4, "vae_encode": 1, "vae_decode": 1}
    assert rows["unet"] == 6 * STEPS
    assert out.image.shape == (48, 64, 3) and out.image.dtype == np.uint8
    assert out.mask is not None and out.mask.shape == (48, 64) and out.mask.dtype == bool
    assert out.info["local_blend_words"] == "blue" and out.info["timesteps"] == [999, 759, 499, 259]
    unguided = tiny(guidance_scale=1.0).edit(s, 0).info["network_rows"]
    assert unguided["unet"] == 3 * STEPS  # no classifier-free guidance: [source, target, mutual]
    # denoising mode, strength 0.5: the last 2 of the 4 LCM steps, windows counted from the start
    den = tiny(denoise=True, strength=0.5).edit(s, 0).info
    assert den["network_calls"]["unet"] == 2 and den["timesteps"] == [499, 259]
    assert den["self_control_steps"] == [] and den["cross_control_steps"] == []  # (0 + 2 + 1) / 4 > 0.7


def test_same_seed_same_edit_other_seed_other_edit():
    s = Sample(id="c", dataset="t", source=textured(64, 64, 2), source_caption="a red thing",
               target_caption="a blue thing")
    a, b, c = (tiny().edit(s, seed).image for seed in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_missing_weights_skip_every_sample_naming_them(builder, tmp_path, empty_hub):
    for sid, seed in (("a", 1), ("b", 2)):
        builder.add_simple(sid, seed=seed)
    builder.write()
    cfg = job_config(builder.config(), tmp_path / "res", metrics=PIXEL_L1, method={"name": "infedit"})
    out = run_job(cfg)
    edits = read_edits(out)
    assert out.counts == {"ok": 0, "skipped": 2, "failed": 0}
    for reason in edits.reason:
        assert "SimianLuo/LCM_Dreamshaper_v7" in reason and "backbone=tiny" in reason, reason
    assert len(read_scores(out)) == 0
    (what, problem), = InfEdit().weights_status()
    assert what == "SimianLuo/LCM_Dreamshaper_v7" and "backbone=tiny" in problem


def test_cli_run_on_the_sample_set_cached_scored_and_rerun_does_nothing(tmp_path):
    args = ["run", f"results_dir={tmp_path}", "metrics=pixel", "progress=false", "run_name=infedit",
            "method=infedit", "++method.backbone=tiny", "dataset.limit=2", "report=false"]
    assert main(args) == 0
    table, = (tmp_path / "infedit" / "jobs").glob("*/edits.parquet")
    edits = pd.read_parquet(table)
    assert len(edits) == 2 and (edits.status == "ok").all(), edits.reason.tolist()
    assert all("[RANDOM WEIGHTS]" in m for m in edits.method)
    assert (edits.unet_calls == STEPS).all() and (edits.unet_rows == 6 * STEPS).all()
    scores = pd.read_parquet(table.parent / "scores.parquet")
    assert len(scores) > 0 and scores.value.notna().all() and set(scores.sample_id) == set(edits.sample_id)
    blends = {}
    for key in edits.edit_key:
        folder = next((tmp_path / "infedit" / "edits").glob(f"*/{key}"))
        info = json.loads((folder / "edit.json").read_text())["info"]
        blends[info["source_prompt_text"]] = info["local_blend_words"]
    # the sample set's first two: the spoon removal (no new target word) and the blue cup
    assert blends == {"an espresso cup on a red saucer with a silver spoon on a wooden table": "",
                      "a red espresso cup full of coffee on a red saucer": "blue"}
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "infedit" / "edits").rglob("edit.json")}
    assert main(args) == 0  # the rerun: everything from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "infedit" / "edits").rglob("edit.json")} == mtimes
    assert pd.read_parquet(table).equals(edits)
