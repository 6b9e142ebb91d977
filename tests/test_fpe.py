"""FPE, Free-Prompt-Editing (methods/fpe.py): DDIM / null-text inversion, then joint source/target
denoising where the target's self-attention probability maps are replaced by the source's within a
step window. Everything runs on ``backbone=tiny`` (random-weight tiny SD 1.5 pipeline, 2 steps,
128 x 128 sources: 16 x 16 latents), no network.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import methods.fpe  # noqa: F401  (registers fpe; the lead adds it to methods/__init__.py)
from harness.cli import main
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion import inversion as inv
from methods.diffusion.attention import AttentionStore, BatchLayout, CaptureController

from .conftest import (PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config, run_tiny_job,
                       textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
CLS = METHODS.get("fpe")
STEPS = 2
FAST = {"backbone": "tiny", "num_inference_steps": STEPS, "resolution": 128}
SRC, TGT = "a red thing", "a blue thing"
# Two rows of one batched UNet call, or the probability-materialising attention path against
# torch's fused one: float32 rounding (~1e-7 relative) through 2 tiny-UNet calls, amplified ~16x by
# CFG 7.5, on latents of magnitude ~5: ~1e-4 at most (as tests/test_diffusion_masactrl_pnp.py's
# ROWS). A branch that really changed moves by >= 1e-2 on this backbone.
ROWS = 5e-4
CHANGED = 1e-2


def _method(**kw):
    return CLS(CLS.parse_params({**FAST, **kw}))


def _dist(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def tiny():
    """The shared tiny pipeline and the 16 x 16 latent of a 128 x 128 textured image."""
    m = _method()
    m.prepare()
    pipe = m._loaded.pipeline
    return pipe, inv.encode_image(pipe, textured(128, 128, seed=3))


def _emb(pipe, z0, *prompts):
    from methods._diffusion_common import text_embeddings

    return text_embeddings(pipe, list(prompts), z0).chunk(len(prompts))


# -- parameters --------------------------------------------------------------------------------------
def test_params_defaults_are_the_official_ones_and_validated():
    p = CLS.Params()
    assert (p.self_replace_start, p.self_replace_end, p.self_replace_max_tokens) == (0.0, 0.8, None)
    assert (p.num_inference_steps, p.guidance_scale, p.inversion_guidance_scale, p.resolution) == (50, 7.5, 7.5, 512)
    assert (p.inversion, p.source_branch, p.replace_guidance, p.source_prompt) == (
        "ddim", "inversion", "cond", "source_caption")
    assert (p.num_inner_steps, p.early_stop_epsilon, p.null_text_lr) == (10, 1e-5, 1e-2)
    assert p.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    m = CLS(p)
    assert m.window() == (0, 40)  # self_replace_steps = .8 of 50 steps: int(50 * .8)
    assert m.max_tokens((64, 64)) == 32 ** 2  # the official threshold at 512 x 512
    assert m.max_tokens((16, 16)) == 64
    assert _method(self_replace_max_tokens=5).max_tokens((64, 64)) == 5
    tiny = CLS.parse_params({"backbone": "tiny"})
    assert (tiny.num_inference_steps, tiny.resolution) == (4, 64)
    assert CLS(tiny).window() == (0, 3)  # int(4 * 0.8)
    for bad, match in [({"self_replace_end": 1.5}, "self_replace_end"),
                       ({"self_replace_start": 0.6, "self_replace_end": 0.5}, "self_replace_start"),
                       ({"self_replace_max_tokens": 0}, "self_replace_max_tokens"),
                       ({"replace_guidance": "uncond"}, "replace_guidance"),
                       ({"inversion": "ddpm"}, "inversion"),
                       ({"source_branch": "both"}, "source_branch"),
                       ({"source_prompt": "caption"}, "source_prompt"),
                       ({"num_inner_steps": 0}, "num_inner_steps"),
                       ({"null_text_lr": 0.0}, "null_text_lr")]:
        with pytest.raises(ParamError, match=match):
            CLS.parse_params(bad)


def test_yaml_mirrors_every_param():
    conf = yaml.safe_load((REPO / "conf/method/fpe.yaml").read_text())
    assert conf.pop("name") == "fpe"
    assert conf == {f.name: f.default for f in dataclasses.fields(CLS.Params)}
    assert CLS.parse_params(conf) == CLS.Params()


# -- plain sampling where nothing is replaced ---------------------------------------------------------
@pytest.mark.parametrize("source_branch", ["inversion", "denoise"])
def test_empty_window_is_plain_sampling_from_the_inversion(tiny, source_branch):
    pipe, z0 = tiny
    out = _method(self_replace_end=0.0, source_branch=source_branch).run_edit(pipe, z0, SRC, TGT)
    assert out["info"]["self_replace_window"] == [0, 0] and out["info"]["self_replaced_layers"] == 0
    sched = inv.make_schedule(pipe.scheduler, STEPS)
    null, src, tgt = _emb(pipe, z0, "", SRC, TGT)
    # the inversion: source prompt, CFG 7.5 against "" (FreePromptPipeline.invert): the same call
    traj = inv.ddim_invert(pipe.unet, sched, z0, src, STEPS, guidance_scale=7.5, uncond=null)
    assert torch.equal(out["z_T"], traj[-1])
    assert all(torch.equal(a, b) for a, b in zip(out["trajectory"], traj))
    # plain batched DDIM sampling of [source, target] from z_T, no attention control installed: the
    # target row sees the same inputs in a batch of the same shape (the source row's contents may
    # differ: replayed or denoised; rows do not interact); the editing processor's fused path vs
    # diffusers' own processor: rounding only
    plain = inv.ddim_sample_batch(pipe.unet, sched, traj[-1], torch.cat([src, tgt]), STEPS, 7.5, uncond=null)
    assert _dist(out["edit"], plain[1:2]) <= ROWS
    # and the single-prompt sampler (separate CFG calls: other kernels, rounding only)
    assert _dist(out["edit"], inv.ddim_sample(pipe.unet, sched, traj[-1], tgt, STEPS, 7.5, null)) <= 1e-3
    if source_branch == "denoise":
        assert _dist(out["source"], plain[0:1]) <= ROWS
    else:  # replayed: after the last step the source row is the inversion's z_0, the encoded source
        assert torch.equal(out["source"], z0)


def test_same_prompt_with_full_window_equals_plain_sampling(tiny):
    """Target == source prompt: the replaced maps are the target's own, so the edit is the plain
    reconstruction from the inversion (up to the rounding of the probability path)."""
    pipe, z0 = tiny
    out = _method(self_replace_end=1.0, source_branch="denoise").run_edit(pipe, z0, SRC, SRC)
    assert out["info"]["self_replace_window"] == [0, STEPS] and out["info"]["self_replaced_layers"] == 4
    sched = inv.make_schedule(pipe.scheduler, STEPS)
    null, src = _emb(pipe, z0, "", SRC)
    recon = inv.ddim_sample_batch(pipe.unet, sched, out["z_T"], torch.cat([src, src]), STEPS, 7.5, uncond=null)
    assert _dist(out["edit"], recon[1:2]) <= ROWS and _dist(out["edit"], out["source"]) <= ROWS


def test_source_branch_replays_the_inversion_at_every_step(tiny, monkeypatch):
    """``source_branch: inversion`` (the notebook's ``ref_intermediate_latents``): before step
    ``i`` the source row is the inversion's latent of that step's timestep, ``traj[n - i]``."""
    pipe, z0 = tiny
    real = inv.ddim_sample_batch
    seen = []

    def spy(*args, callback=None, **kw):
        def recording(z, i):
            z = callback(z, i)
            seen.append((i, z.clone()))
            return z
        return real(*args, callback=recording if callback is not None else None, **kw)

    monkeypatch.setattr(inv, "ddim_sample_batch", spy)
    n = 3
    out = _method(num_inference_steps=n).run_edit(pipe, z0, SRC, TGT)
    traj = out["trajectory"]
    assert len(traj) == n + 1 and [i for i, _ in seen] == list(range(n))
    for i, z in seen:  # after step i: the latent step i + 1 starts from
        assert torch.equal(z[0:1], traj[n - i - 1]), i
        assert _dist(z[1:2], traj[n - i - 1]) > CHANGED  # the target row is its own (another prompt)
    seen.clear()
    _method(num_inference_steps=n, source_branch="denoise").run_edit(pipe, z0, SRC, TGT)
    assert seen == []  # no replay


# -- the replacement, on captured attention ----------------------------------------------------------
def _captured(tiny, **kw):
    pipe, z0 = tiny
    store = AttentionStore(kinds=("self",), max_tokens=None, keep_steps=True)
    out = _method(**kw).run_edit(pipe, z0, SRC, TGT, controller=CaptureController(store, rows="all"))
    return out, store


@pytest.mark.parametrize("guidance", ["cond", "both"])
def test_within_the_window_target_self_attention_is_the_source_s(tiny, guidance):
    # window [1, 2) of 2 steps (int(2 * 0.5) = 1); a latent of 16 x 16: layers of <= 64 tokens
    out, store = _captured(tiny, self_replace_start=0.5, self_replace_end=1.0, replace_guidance=guidance)
    assert out["info"]["self_replace_window"] == [1, 2] and out["info"]["self_replace_max_tokens_used"] == 64
    layout = BatchLayout.cfg(2)  # rows [uncond src, uncond tgt, cond src, cond tgt]
    assert len(store.steps) == STEPS and len(store.steps[0]) == 7  # the tiny UNet's 7 self-attention layers
    replaced, kept, trivial = [], [], []
    for step in range(STEPS):
        for name, maps in store.steps[step].items():
            heads = store.meta[name][2]
            m = maps.reshape(layout.batch_size, heads, *maps.shape[1:])
            for src_row, tgt_row, half in [(2, 3, "cond"), (0, 1, "uncond")]:
                same = torch.equal(m[tgt_row], m[src_row])
                # At step 0 both branches start from the same z_T: the unconditional rows (same
                # text "") are the same computation on the same input everywhere, and so is the
                # UNet's first self-attention of the conditional rows (no text has entered yet).
                if step == 0 and (half == "uncond" or name.startswith("down_blocks.0.")):
                    assert same, (name, half)
                    trivial.append(name)
                elif step == 1 and maps.shape[1] <= 64 and (half == "cond" or guidance == "both"):
                    assert same, (step, name, half)  # replaced: the very source probabilities
                    replaced.append(name)
                else:  # not replaced: other prompts / other latents, the maps really differ
                    assert _dist(m[tgt_row], m[src_row]) > 1e-4, (step, name, half)
                    kept.append(name)
    # 4 layers of <= 64 tokens (down 1, mid, up 1 x 2) at step 1, in one or both halves
    assert len(replaced) == 4 * (2 if guidance == "both" else 1)
    assert sorted(set(replaced)) == out["replaced_layers"] and len(out["replaced_layers"]) == 4
    assert len(trivial) == 8 and len(kept) == 2 * STEPS * 7 - 8 - len(replaced)


def test_replacement_changes_the_edit_not_the_source(tiny):
    pipe, z0 = tiny
    free = _method(self_replace_end=0.0, source_branch="denoise").run_edit(pipe, z0, SRC, TGT)
    fpe = _method(self_replace_end=1.0, source_branch="denoise").run_edit(pipe, z0, SRC, TGT)
    assert _dist(fpe["edit"], free["edit"]) > CHANGED
    assert _dist(fpe["source"], free["source"]) <= ROWS  # the source row is never replaced
    # a threshold below every layer's token count replaces nothing: the plain edit again
    none = _method(self_replace_end=1.0, self_replace_max_tokens=3, source_branch="denoise").run_edit(
        pipe, z0, SRC, TGT)
    assert none["info"]["self_replaced_layers"] == 0 and _dist(none["edit"], free["edit"]) <= ROWS


def test_null_text_inversion_reconstructs_the_source_branch(tiny):
    pipe, z0 = tiny
    with torch.inference_mode():  # as the harness calls it: the optimisation must still get gradients
        out = _method(inversion="null_text", num_inner_steps=3, source_branch="denoise").run_edit(
            pipe, z0, SRC, TGT)
    assert len(out["uncond_per_step"]) == STEPS
    sched = inv.make_schedule(pipe.scheduler, STEPS)
    (src,) = _emb(pipe, z0, SRC)
    # the pivot: unguided DDIM inversion with the source prompt (null_text_w_FPE.ipynb / P2P)
    assert torch.equal(out["z_T"], inv.ddim_invert(pipe.unet, sched, z0, src, STEPS)[-1])
    # the source branch, denoised with the optimised embeddings, equals ddim_sample with them
    ref = inv.ddim_sample(pipe.unet, sched, out["z_T"], src, STEPS, 7.5, uncond_per_step=out["uncond_per_step"])
    assert _dist(out["source"], ref) <= 1e-3  # batched vs separate CFG calls (see ROWS)


# -- the harness: counts, skips, CLI ------------------------------------------------------------------
def _sample():
    return Sample(id="s", dataset="t", source=textured(128, 128, seed=5), source_caption=SRC,
                  target_caption=TGT, meta={})


@pytest.mark.parametrize("kw, calls, rows", [
    ({}, 2 * STEPS + STEPS, 2 * STEPS + 4 * STEPS),  # guided inversion (2 calls of 1 row) + edit (4 rows)
    ({"inversion_guidance_scale": 1.0, "guidance_scale": 1.0}, 2 * STEPS, STEPS + 2 * STEPS),  # [src, tgt]
])
def test_network_counts(kw, calls, rows):
    out = _method(**kw).edit(_sample(), 0)
    nc, nr = out.info["network_calls"], out.info["network_rows"]
    assert (nc["unet"], nr["unet"]) == (calls, rows)
    assert (nc["vae_encode"], nc["vae_decode"]) == (1, 1)
    assert out.info["source_prompt_text"] == SRC and out.info["self_replace_window"] == [0, 1]
    assert out.info["inversion"] == "ddim" and out.info["self_replaced_layers"] == 4


def test_sample_without_target_caption_is_skipped(builder, tmp_path):
    builder.add_simple("ok")
    builder.add_simple("nofield", target_caption=None)
    builder.add_simple("blank", target_caption="   ")
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "fpe", **FAST, "resolution": 32},
                             metrics=PIXEL_L1))
    assert_skipped(out, {"nofield": "target_caption", "blank": "target_caption"})


def test_uncached_real_model_skips_every_sample(builder, tmp_path, empty_hub):
    add_two_samples(builder)
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "fpe", "num_inference_steps": 2},
                     metrics=PIXEL_L1)
    assert_missing_weights(run_job(cfg), "stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_tiny_edit_through_the_harness_cached_scored_and_labelled(builder, tmp_path):
    add_two_samples(builder, b={"source_caption": None})
    method = {"name": "fpe", "backbone": "tiny", "num_inference_steps": 2, "resolution": 32}
    run = run_tiny_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1), "sd15")
    for sid, (_, info) in run.records.items():
        assert info["prompt"] == "a blue thing"
        # source_caption when present, "" otherwise (a missing caption is not a skip)
        assert info["source_prompt_text"] == ("a red thing" if sid == "a" else "")
        # 32 x 32: a 4 x 4 latent, layers of <= 4 tokens (down 1, mid, up 1 x 2) at step 0 of 2
        assert info["self_replace_window"] == [0, 1] and info["self_replace_max_tokens_used"] == 4
        assert info["self_replaced_layers"] == 4 and info["inversion"] == "ddim"
        assert info["network_calls"]["unet"] == 2 * 2 + 2 and info["network_rows"]["unet"] == 2 * 2 + 4 * 2


def test_cli_run_on_the_sample_set_cached_scored_and_rerun_does_nothing(tmp_path):
    args = ["run", f"results_dir={tmp_path}", "metrics=pixel", "progress=false", "run_name=fpe",
            "method=fpe", "++method.backbone=tiny", "++method.num_inference_steps=2", "dataset.limit=2",
            "report=false"]
    assert main(args) == 0
    table, = (tmp_path / "fpe" / "jobs").glob("*/edits.parquet")
    edits = pd.read_parquet(table)
    assert len(edits) == 2 and (edits.status == "ok").all(), edits.reason.tolist()
    assert all("[RANDOM WEIGHTS]" in m for m in edits.method)
    assert (edits.unet_calls == 2 * 2 + 2).all() and (edits.unet_rows == 2 * 2 + 4 * 2).all()
    scores = pd.read_parquet(table.parent / "scores.parquet")
    assert len(scores) > 0 and scores.value.notna().all() and set(scores.sample_id) == set(edits.sample_id)
    for key in edits.edit_key:
        folder = next((tmp_path / "fpe" / "edits").glob(f"*/{key}"))
        info = json.loads((folder / "edit.json").read_text())["info"]
        # tiny: 64 x 64 working size, an 8 x 8 latent: layers of <= 16 tokens replaced at step 0
        assert info["self_replace_window"] == [0, 1] and info["self_replace_max_tokens_used"] == 16
        assert info["self_replaced_layers"] == 4 and info["auto_params"] == {"resolution": 64}
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "fpe" / "edits").rglob("edit.json")}
    assert main(args) == 0  # the rerun: everything from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "fpe" / "edits").rglob("edit.json")} == mtimes
    assert pd.read_parquet(table).equals(edits)
