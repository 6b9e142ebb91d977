"""The pix2pix_zero adapter (diffusers' StableDiffusionPix2PixZeroPipeline) on the tiny sd15
backbone: through the whole harness, its parameters, its skips, and the invariant that without
cross-attention guidance and with a zero edit direction the edit is plain DDIM sampling from the
inverted latents, recomputed here with methods/diffusion/inversion.py on fresh copies of the tiny
components (default attention processors, not the pipeline's).
"""
from __future__ import annotations

import types

import numpy as np
import pytest

import methods.pix2pix_zero  # noqa: F401  (registers pix2pix_zero)
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion.inversion import ddim_invert, ddim_sample, decode_latents, encode_prompt
from methods.diffusion.tiny import tiny_sd15

from .conftest import (PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config, run_tiny_job,
                       textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

NAME = "pix2pix_zero"
# 128 px: 16 x 16 latents (the tiny VAE downsamples by 8, as SD's), the size the tolerances below
# were measured on
FAST = {"name": NAME, "backbone": "tiny", "num_inference_steps": 2, "resolution": 128}


def _method(**extra):
    params = {k: v for k, v in {**FAST, **extra}.items() if k != "name"}
    return METHODS.get(NAME).from_config(params)


# -- parameters ---------------------------------------------------------------------------------
def test_params_defaults_and_validation():
    p = METHODS.get(NAME).Params()
    assert p.model == "CompVis/stable-diffusion-v1-4"
    assert (p.num_inference_steps, p.guidance_scale, p.resolution) == (50, 5.0, 512)
    assert p.cross_attention_guidance_amount == 0.1
    assert (p.lambda_auto_corr, p.lambda_kl, p.num_reg_steps, p.num_auto_corr_rolls) == (20.0, 20.0, 5, 5)
    assert p.source_sentences is None and p.target_sentences is None
    ok = METHODS.get(NAME).parse_params({"source_sentences": ["a cat"], "target_sentences": ["a dog", "two dogs"]})
    assert ok.target_sentences == ("a dog", "two dogs")
    for bad, match in [
        ({"guidance_scale": 1.0}, "guidance_scale"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"cross_attention_guidance_amount": -0.1}, "cross_attention_guidance_amount"),
        ({"lambda_auto_corr": -1.0}, "lambda_auto_corr"),
        ({"lambda_kl": -1.0}, "lambda_kl"),
        ({"num_reg_steps": 1.5}, "num_reg_steps"),
        ({"num_auto_corr_rolls": 0}, "num_auto_corr_rolls"),
        ({"source_sentences": ["a cat"]}, "target_sentences"),
        ({"target_sentences": ["a dog"]}, "source_sentences"),
        ({"source_sentences": ["a cat", " "], "target_sentences": ["a dog"]}, "source_sentences"),
        ({"source_sentences": "a cat", "target_sentences": ["a dog"]}, "source_sentences"),
        ({"source_sentences": [], "target_sentences": ["a dog"]}, "source_sentences"),
        ({"resolution": 30}, "resolution"),
        ({"strength": 0.5}, "strength"),
    ]:
        with pytest.raises(ParamError, match=match):
            METHODS.get(NAME).parse_params(bad)


# -- the whole harness --------------------------------------------------------------------------
def test_tiny_edit_cached_scored_and_labelled(builder, tmp_path):
    add_two_samples(builder)
    run = run_tiny_job(job_config(builder.config(), tmp_path / "res", method=dict(FAST), metrics=PIXEL_L1), "sd15")
    for _, info in run.records.values():
        assert info["prompt"] == info["source_caption"] == "a red thing"
        assert info["target_caption"] == "a blue thing" and info["edit_direction_from"] == "captions"
        assert info["edit_direction_norm"] > 0
        assert info["guidance_scale"] == 5.0 and info["cross_attention_guidance_amount"] == 0.1
        assert (info["lambda_auto_corr"], info["lambda_kl"], info["num_reg_steps"], info["num_auto_corr_rolls"]) == (
            20.0, 20.0, 5, 5)


# -- invariants ---------------------------------------------------------------------------------
def _reference_edit(src: np.ndarray, caption: str, seed: int, steps: int, guidance: float,
                    inverted: "object | None" = None) -> tuple[np.ndarray, object]:
    """Plain CFG DDIM sampling (negative prompt = caption) from DDIM-inverted latents, on fresh
    copies of the tiny sd15 components. Without ``inverted``, the inversion is recomputed too:
    the VAE posterior sample drawn with the edit's seeded generator, then plain DDIM inversion
    (valid for the pipeline only with its regularisers off)."""
    import torch

    parts = tiny_sd15()
    comp = types.SimpleNamespace(**parts)
    cond = encode_prompt(comp, caption)
    if inverted is None:
        x = torch.from_numpy(src).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        gen = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            z0 = comp.vae.encode(x).latent_dist.sample(gen) * comp.vae.config.scaling_factor
        inverted = ddim_invert(comp.unet, comp.scheduler.config, z0, cond, steps)[-1]
    z = ddim_sample(comp.unet, comp.scheduler.config, inverted, cond, steps, guidance_scale=guidance, uncond=cond)
    return decode_latents(comp, z), inverted


def _capture_inversion(method, monkeypatch) -> list:
    """Wrap the loaded pipeline's invert to record the latents the edit starts from."""
    pipe = method._loaded.pipeline
    seen: list = []
    original = pipe.invert

    def invert(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.latents.detach().clone())
        return out

    monkeypatch.setattr(pipe, "invert", invert)
    return seen


@pytest.mark.parametrize("regularise", [True, False])
def test_no_guidance_no_direction_is_plain_ddim_sampling(regularise, monkeypatch):
    reg = {} if regularise else {"lambda_auto_corr": 0.0, "lambda_kl": 0.0}
    m = _method(cross_attention_guidance_amount=0.0, **reg)
    m.prepare()
    src = textured(128, 128, seed=3)
    sample = Sample(id="s", dataset="d", source=src, source_caption="a red thing", target_caption="a red thing")
    seen = _capture_inversion(m, monkeypatch)
    out = m.edit(sample, seed=7)
    monkeypatch.undo()
    assert out.info["edit_direction_norm"] == 0.0
    assert out.image.shape == (128, 128, 3)
    ref, inverted = _reference_edit(src, "a red thing", 7, 2, 5.0, inverted=seen[0] if regularise else None)
    if not regularise:
        # without the regularisers the pipeline's inversion is plain DDIM inversion
        np.testing.assert_allclose(seen[0].numpy(), inverted.numpy(), atol=1e-4)
    diff = np.abs(out.image.astype(int) - ref.astype(int))
    assert diff.max() <= 1, diff.max()  # float rounding only
    # and the edit is not trivially the source (random weights change the image)
    assert np.abs(out.image.astype(int) - src.astype(int)).mean() > 1


def test_regularisation_direction_and_guidance_change_the_edit():
    src = textured(128, 128, seed=3)
    same = Sample(id="s", dataset="d", source=src, source_caption="a red thing", target_caption="a red thing")
    other = Sample(id="s", dataset="d", source=src, source_caption="a red thing", target_caption="a blue thing")
    base = _method(cross_attention_guidance_amount=0.0).edit(same, seed=7).image.astype(int)
    # the same call again, the same computation: bit for bit
    assert (_method(cross_attention_guidance_amount=0.0).edit(same, seed=7).image == base).all()
    # the edit direction (target caption) changes the result (mean 5.8 uint8 levels here)
    edited = _method(cross_attention_guidance_amount=0.0).edit(other, seed=7).image.astype(int)
    assert np.abs(edited - base).mean() > 1.0
    # the inversion's regularisers change the result (mean 22 levels here)
    assert np.abs(_method(cross_attention_guidance_amount=0.0, lambda_kl=0.0, lambda_auto_corr=0.0)
                  .edit(same, seed=7).image.astype(int) - base).mean() > 1.0
    # cross-attention guidance changes the result once there is an edit direction to steer; on the
    # tiny random model the default-sized amounts move only a few pixels by 1 level (mean 0.04 at
    # 0.5), so a large amount is used (mean 1.4 levels at 20)
    guided = _method(cross_attention_guidance_amount=20.0).edit(other, seed=7).image.astype(int)
    assert np.abs(guided - edited).mean() > 0.5
    # fixed sentence lists: identical lists give a zero direction, as identical captions do
    fixed = _method(cross_attention_guidance_amount=0.0, source_sentences=["a cat", "two cats"],
                    target_sentences=["a cat", "two cats"]).edit(other, seed=7)
    assert fixed.info["edit_direction_norm"] == 0.0 and fixed.info["edit_direction_from"] == "sentences"
    assert (fixed.image == base).all()  # both directions exactly 0: the same computation as base


# -- skips --------------------------------------------------------------------------------------
def test_uncached_real_model_skips_every_sample(builder, tmp_path, empty_hub):
    builder.add_simple("a")
    builder.add_simple("b", seed=2)
    model = METHODS.get(NAME).Params().model
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": NAME, "num_inference_steps": 2},
                     metrics=PIXEL_L1)
    assert_missing_weights(run_job(cfg), model)


@pytest.mark.parametrize("field", ["source_caption", "target_caption"])
def test_sample_without_a_caption_is_skipped(field, builder, tmp_path):
    builder.add_simple("ok")
    builder.add_simple("nofield", **{field: None})
    builder.add_simple("blank", **{field: "   "})
    out = run_job(job_config(builder.config(), tmp_path / "res", method=dict(FAST), metrics=PIXEL_L1))
    assert_skipped(out, {"nofield": field, "blank": field})


def test_fixed_sentences_do_not_need_the_target_caption(builder, tmp_path):
    builder.add_simple("notarget", target_caption=None)
    builder.add_simple("nosource", source_caption=None)
    method = {**FAST, "source_sentences": ["a red thing"], "target_sentences": ["a blue thing", "blue things"]}
    out = run_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1))
    assert_skipped(out, {"nosource": "source_caption"})  # and "notarget" edited
