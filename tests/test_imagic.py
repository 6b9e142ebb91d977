"""Imagic (methods/imagic.py): the three stages, the per-edit UNet copy, counts, skips, the harness run.

Everything runs on the tiny random-weight SD 1.5 backbone (methods.diffusion.tiny "sd15"): no network,
no real weights. The stage tests use learning rates far above the paper's (the tiny random model must
move within a few steps); the stages' code is the same.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import methods.imagic as mi  # registers "imagic" until methods/__init__ imports it
from harness.cli import main
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion.inversion import encode_prompt
from methods.diffusion.loading import ModelSpec, load_pipeline

from .conftest import PIXEL_L1, assert_missing_weights, job_config, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parent.parent
TARGET = "a photo of a blue cat"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    return load_pipeline(StableDiffusionPipeline,
                         ModelSpec(model="", backbone="tiny", tiny_kind="sd15", device="cpu")).pipeline


@pytest.fixture(scope="module")
def setup(pipe):
    """Source latents, e_tgt, the noise scheduler and a fixed probe set of (t, noise) draws: the
    reconstruction loss is measured on the same draws before and after each stage (the training
    losses are each at their own random draw: too noisy to compare step by step)."""
    sched = mi.noise_scheduler(pipe.scheduler.config)
    latents = mi.encode_latents(pipe, textured(64, 64, 1), "mean", torch.Generator().manual_seed(0))
    with torch.no_grad():
        e_tgt = encode_prompt(pipe, TARGET).float()
    g = torch.Generator().manual_seed(123)
    probes = [mi.draw(sched, latents, g) for _ in range(32)]
    return sched, latents, e_tgt, probes


def probe_loss(unet, setup, emb) -> float:
    sched, latents, _, probes = setup
    with torch.no_grad():
        return float(np.mean([float(mi.denoising_loss(unet, sched, latents, emb, t, n)) for t, n in probes]))


@pytest.fixture(scope="module")
def stages(pipe, setup):
    """Stage 1 (10 steps, lr 0.1) and stage 2 (20 steps, lr 1e-3) on a copy of the shared UNet."""
    sched, latents, e_tgt, _ = setup
    unet = mi.trainable_copy(pipe.unet)
    before_emb = probe_loss(unet, setup, e_tgt)
    e_opt, s1 = mi.optimise_embedding(unet, sched, latents, e_tgt, 10, 0.1, torch.Generator().manual_seed(1))
    after_emb = probe_loss(unet, setup, e_opt)
    s2 = mi.finetune(unet, sched, latents, e_opt, 20, 1e-3, torch.Generator().manual_seed(2))
    after_ft = probe_loss(unet, setup, e_opt)
    return dict(unet=unet, e_opt=e_opt, s1=s1, s2=s2, before_emb=before_emb, after_emb=after_emb, after_ft=after_ft)


def state(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def tiny(**kw) -> mi.Imagic:
    return mi.Imagic(mi.Imagic.parse_params({"backbone": "tiny", "device": "cpu", **kw}))


def sample(sid: str = "s", **fields) -> Sample:
    fields.setdefault("target_caption", TARGET)
    return Sample(id=sid, dataset="t", source=textured(48, 64, 3), meta={}, **fields)


# -- the stages -------------------------------------------------------------------------------------
def test_embedding_optimisation_lowers_the_reconstruction_loss(stages, setup, pipe):
    # measured on the same 32 fixed (t, noise) draws: a drop of > 1e-3 is far above float rounding
    # (~1e-7 on losses of order 1) and was 1.1424 -> 1.1364 when written
    assert stages["after_emb"] < stages["before_emb"] - 1e-3, (stages["before_emb"], stages["after_emb"])
    assert len(stages["s1"].losses) == 10
    # the UNet was frozen: the copy's weights still equal the shared UNet's after stage 1 alone
    sched, latents, e_tgt, _ = setup
    twin = mi.trainable_copy(pipe.unet)
    mi.optimise_embedding(twin, sched, latents, e_tgt, 2, 0.1, torch.Generator().manual_seed(1))
    ref = pipe.unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in twin.state_dict().items())
    assert not any(q.requires_grad for q in pipe.unet.parameters())


def test_finetuning_lowers_the_reconstruction_loss(stages):
    # 1.136 -> 0.476 when written: fine-tuning fits the single image
    assert stages["after_ft"] < 0.6 * stages["after_emb"], (stages["after_emb"], stages["after_ft"])
    assert len(stages["s2"].losses) == 20
    unet = stages["unet"]
    assert not unet.training and not any(q.requires_grad for q in unet.parameters())


def test_eta_zero_reconstructs_the_input_better_than_eta_one(stages, setup):
    # The fine-tuned model reconstructs the source (loss on the fixed probe draws) best with e_opt
    # (eta = 0), worse along the interpolation towards e_tgt. Measured on the reconstruction loss,
    # not on sampled images: with random tiny weights a 4-step sample from noise is nowhere near
    # the source for any eta (latent MSE ~1 against source latents of mean square ~2e-3).
    unet, e_opt, e_tgt = stages["unet"], stages["e_opt"], setup[2]
    losses = [probe_loss(unet, setup, mi.interpolate(e_tgt, e_opt, eta)) for eta in (0.0, 0.7, 1.0)]
    # 0.47608 < 0.47627 < 0.47647 when written: gaps of ~2e-4, three orders above float rounding
    assert losses[0] < losses[1] < losses[2], losses
    assert losses[2] - losses[0] > 1e-4, losses
    # the interpolation itself (paper Eq. 3)
    assert torch.allclose(mi.interpolate(e_tgt, e_opt, 0.0), e_opt) and torch.equal(mi.interpolate(e_tgt, e_opt, 1.0),
                                                                                   e_tgt)
    mid = mi.interpolate(e_tgt, e_opt, 0.25)
    assert torch.allclose(mid, 0.25 * e_tgt + 0.75 * e_opt)


# -- the adapter ------------------------------------------------------------------------------------
def test_edit_leaves_the_shared_unet_unchanged_and_counts(pipe):
    m = tiny()
    m.prepare()
    assert m._loaded.pipeline is pipe  # the process-wide cached pipeline other edits share
    before = state(pipe.unet)
    flags = [q.requires_grad for q in pipe.unet.parameters()]
    out = m.edit(sample(), 0)
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [q.requires_grad for q in pipe.unet.parameters()] == flags and not pipe.unet.training
    # and yet the fine-tuning ran: the copy's loss trajectory is recorded
    info = out.info
    assert info["finetune_stage"]["steps"] == 4 and info["embedding_stage"]["steps"] == 4
    assert info["embedding_shift"] > 0
    # counts: 4 + 4 optimisation forwards (1 row), 4 guided sampling steps as 2 calls of 1 row each
    assert info["network_calls"] == {"unet": 4 + 4 + 2 * 4, "text_encoder": 2, "vae_encode": 1, "vae_decode": 1}
    assert info["network_rows"] == info["network_calls"]
    assert info["auto_params"] == {"num_inference_steps": 4, "resolution": 64, "embedding_steps": 4,
                                   "finetune_steps": 4}
    assert out.image.shape == (48, 64, 3) and out.image.dtype == np.uint8
    # preparation = encoding + both stages; it is at least the two stages' own time
    assert info["prep_seconds"] >= info["embedding_stage"]["seconds"] + info["finetune_stage"]["seconds"]
    unguided = tiny(guidance_scale=1.0, embedding_steps=2, finetune_steps=3, num_inference_steps=5).edit(sample(), 0)
    assert unguided.info["network_calls"]["unet"] == 2 + 3 + 5


def test_same_seed_same_edit_other_seed_other_edit():
    m = tiny()
    a, b, c = m.edit(sample(), 3), m.edit(sample(), 3), m.edit(sample(), 4)
    # the very same computation (one thread, same seeded draws): bit-equal
    assert np.array_equal(a.image, b.image)
    assert a.info["embedding_stage"] == {**b.info["embedding_stage"], "seconds": a.info["embedding_stage"]["seconds"]}
    assert not np.array_equal(a.image, c.image)


def test_zero_steps_skip_the_stages_and_eta_one_is_then_plain_generation(pipe):
    out = tiny(embedding_steps=0, finetune_steps=0).edit(sample(), 0)
    assert out.info["embedding_shift"] == 0.0
    assert out.info["embedding_stage"]["loss_start"] is None and out.info["finetune_stage"]["loss_end"] is None
    assert out.info["network_calls"]["unet"] == 2 * 4


def test_half_precision_pipeline_fine_tunes_a_float32_copy():
    m = tiny(dtype="bf16", embedding_steps=1, finetune_steps=2, num_inference_steps=2)
    out = m.edit(sample(), 0)
    shared = m._loaded.pipeline.unet
    assert next(shared.parameters()).dtype == torch.bfloat16  # the shared UNet was not cast
    assert out.info["dtype"] == "bf16" and out.info["network_calls"]["unet"] == 1 + 2 + 2 * 2
    assert out.info["finetune_stage"]["loss_start"] is not None and np.isfinite(out.info["finetune_stage"]["loss_end"])
    assert mi.trainable_copy(shared).dtype == torch.float32


def test_params_auto_values_yaml_and_refusals():
    real = mi.Imagic.Params()
    assert (real.embedding_steps, real.embedding_lr, real.finetune_steps, real.finetune_lr) == (500, 1e-3, 1000, 2e-6)
    assert (real.eta, real.guidance_scale, real.num_inference_steps, real.resolution) == (0.7, 7.5, 50, 512)
    assert real.latent == "sample"
    cfg = yaml.safe_load((ROOT / "conf" / "method" / "imagic.yaml").read_text())
    assert cfg.pop("name") == "imagic" and METHODS.get("imagic") is mi.Imagic
    assert cfg == {f.name: f.default for f in dataclasses.fields(mi.Imagic.Params)}
    assert mi.Imagic.parse_params(cfg) == mi.Imagic.Params()
    for bad, match in (({"eta": -0.1}, "eta"), ({"embedding_steps": -1}, "embedding_steps"),
                       ({"finetune_lr": 0}, "finetune_lr"), ({"latent": "mode"}, "latent"),
                       ({"cpu_offload": True}, "cpu_offload")):
        with pytest.raises(Exception, match=match):
            mi.Imagic.parse_params({"backbone": "tiny", **bad})
    assert "target_caption" in tiny().check(sample(target_caption=" "))


def test_v_prediction_checkpoint_is_refused(pipe):
    cfg = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction").config
    with pytest.raises(ValueError, match="epsilon"):
        mi.noise_scheduler(cfg)


# -- the harness --------------------------------------------------------------------------------------
def test_missing_weights_give_skipped_rows(builder, tmp_path, empty_hub):
    builder.add_simple("a", seed=1)
    builder.add_simple("b", seed=2)
    cfg = job_config(builder.config(), tmp_path / "res", metrics=PIXEL_L1,
                     method={"name": "imagic", "device": "cpu"})
    assert_missing_weights(run_job(cfg), "stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_cli_run_cached_scored_and_rerun_does_nothing(tmp_path):
    args = ["run", f"results_dir={tmp_path}", "metrics=pixel", "progress=false", "run_name=im", "method=imagic",
            "++method.backbone=tiny", "++method.num_inference_steps=2",
            "dataset.ids=[coffee_cup_blue,chelsea_eyes_blue]", "report=false"]
    assert main(args) == 0
    table, = (tmp_path / "im" / "jobs").glob("*/edits.parquet")
    edits = pd.read_parquet(table)
    assert len(edits) == 2 and (edits.status == "ok").all(), edits.reason.tolist()
    assert all("[RANDOM WEIGHTS]" in m for m in edits.method)
    assert (edits.unet_calls == 4 + 4 + 2 * 2).all()
    assert (edits.prep_seconds > 0).all() and (edits.infer_seconds > 0).all()
    scores = pd.read_parquet(table.parent / "scores.parquet")
    assert len(scores) > 0 and scores.value.notna().all() and set(scores.sample_id) == set(edits.sample_id)
    for key in edits.edit_key:
        folder = next((tmp_path / "im" / "edits").glob(f"*/{key}"))
        info = json.loads((folder / "edit.json").read_text())["info"]
        assert info["eta"] == 0.7 and info["steps"] == 2 and info["finetune_stage"]["steps"] == 4
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "im" / "edits").rglob("edit.json")}
    assert main(args) == 0  # the rerun: everything from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "im" / "edits").rglob("edit.json")} == mtimes
    assert pd.read_parquet(table).equals(edits)
