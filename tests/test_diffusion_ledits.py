"""LEDITS++ adapters (ledits_pp on SD, ledits_pp_sdxl on SDXL) through diffusers' LEDITS++ pipelines.

Everything runs on ``backbone=tiny`` (random-weight tiny pipelines of the real diffusers classes,
methods/diffusion/tiny.py) at 32 x 32 with 2 steps; no test touches the network. The tiny UNets
have no cross-attention at 1/4 of the latent size, so runs that edit use the noise-quantile mask
only (use_intersect_mask=false); the default intersect mask is checked to be refused with a clear
reason on them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import methods.ledits_pp as ledits
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods._diffusion_common import from_pipeline_output, to_pil

from .conftest import (PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config, read_edits,
                       run_tiny_job, textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
KINDS = {"ledits_pp": "sd15", "ledits_pp_sdxl": "sdxl"}
# The tiny UNets lack cross-attention at 1/4 latent size: noise-quantile mask only.
FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 32, "use_intersect_mask": False}


def _sample(**kw) -> Sample:
    base = dict(id="s", dataset="unit", source=textured(48, 64, 3), source_caption="a red car on a road",
                target_caption="a blue car on a road", instruction="make the car blue")
    base.update(kw)
    return Sample(**base)


# -- parameters ---------------------------------------------------------------------------------
def test_params_defaults_and_yaml():
    sd, xl = METHODS.get("ledits_pp").Params(), METHODS.get("ledits_pp_sdxl").Params()
    assert sd.model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and sd.resolution == 512
    assert xl.model == "stabilityai/stable-diffusion-xl-base-1.0" and xl.resolution == 1024
    # the pipelines' signature defaults (diffusers 0.42)
    assert (sd.num_inference_steps, xl.num_inference_steps) == (30, 50)
    for p in (sd, xl):
        assert (p.guidance_scale, p.skip, p.edit_guidance_scale, p.edit_threshold) == (3.5, 0.15, 5.0, 0.9)
        assert (p.edit_warmup_steps, p.edit_cooldown_steps, p.use_cross_attn_mask) == (0, None, False)
        assert (p.scheduler, p.exact_inversion) == ("dpmsolver++", False)
        assert (p.edit_concept, p.remove_concept, p.source_prompt_field) == ("target_caption", "none", "none")
    assert (sd.use_intersect_mask, xl.use_intersect_mask) == (True, False)
    assert (xl.num_zero_noise_steps, xl.watermark) == (3, False)
    for name in KINDS:  # the YAML mirrors every field with its default and parses back to them
        conf = yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())
        assert conf.pop("name") == name
        cls = METHODS.get(name)
        assert conf == {f.name: f.default for f in dataclasses.fields(cls.Params)}
        assert cls.parse_params(conf) == cls.Params()


@pytest.mark.parametrize("name,bad,field", [
    ("ledits_pp", {"resolution": 48}, "resolution"),  # a multiple of 8, not of 32
    ("ledits_pp", {"skip": 1.0}, "skip"),
    ("ledits_pp", {"skip": -0.1}, "skip"),
    ("ledits_pp", {"edit_guidance_scale": -1.0}, "edit_guidance_scale"),
    ("ledits_pp", {"edit_threshold": 1.5}, "edit_threshold"),
    ("ledits_pp", {"edit_warmup_steps": -1}, "edit_warmup_steps"),
    ("ledits_pp", {"edit_cooldown_steps": 0}, "edit_cooldown_steps"),
    ("ledits_pp", {"edit_warmup_steps": 3, "edit_cooldown_steps": 3}, "edit_cooldown_steps"),
    ("ledits_pp", {"scheduler": "euler"}, "scheduler"),
    ("ledits_pp", {"edit_concept": "caption"}, "edit_concept"),
    ("ledits_pp", {"remove_concept": "target_caption"}, "remove_concept"),
    ("ledits_pp", {"source_prompt_field": "instruction"}, "source_prompt_field"),
    ("ledits_pp", {"exact_inversion": "yes"}, "exact_inversion"),
    ("ledits_pp", {"num_zero_noise_steps": 0}, "num_zero_noise_steps"),  # SDXL only
    ("ledits_pp_sdxl", {"num_zero_noise_steps": -1}, "num_zero_noise_steps"),
    ("ledits_pp_sdxl", {"watermark": "no"}, "watermark"),
    ("ledits_pp_sdxl", {"use_intersect_mask": 1}, "use_intersect_mask"),
])
def test_param_validation(name, bad, field):
    with pytest.raises(ParamError, match=field):
        METHODS.get(name).parse_params(bad)


# -- mapping of sample fields to LEDITS++ concepts ------------------------------------------------
def test_concepts_and_requires_follow_params():
    cls = METHODS.get("ledits_pp")
    s = _sample()
    cases = [
        ({}, ["a blue car on a road"], [False], "", ("source", "target_caption")),
        ({"edit_concept": "instruction"}, ["make the car blue"], [False], "", ("source", "instruction")),
        ({"edit_concept": "target_only_words", "remove_concept": "source_only_words"},
         ["blue", "red"], [False, True], "", ("source", "target_caption", "source_caption")),
        ({"remove_concept": "source_caption", "source_prompt_field": "source_caption"},
         ["a blue car on a road", "a red car on a road"], [False, True], "a red car on a road",
         ("source", "target_caption", "source_caption")),
    ]
    for params, prompts, reverse, source, requires in cases:
        m = cls.from_config(params)
        assert m.concepts(s) == (prompts, reverse, source), params
        assert m.requires == requires, params
        assert m.check(s) is None
    # no source-only word: nothing is removed; no target-only word: the sample is skipped
    same = _sample(target_caption="A red car, on a road!")
    m = cls.from_config({"edit_concept": "target_caption", "remove_concept": "source_only_words"})
    assert m.concepts(same)[:2] == (["A red car, on a road!"], [False])
    reason = cls.from_config({"edit_concept": "target_only_words"}).check(same)
    assert reason and "target_only_words" in reason and "'s'" in reason
    assert ledits.only_words("a Red red car", "the car") == "a red"


def test_quarter_resolution_cross_attention_rule():
    sd15 = SimpleNamespace(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    sdxl = SimpleNamespace(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    tiny = SimpleNamespace(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    assert ledits.has_quarter_res_cross_attention(sd15) and ledits.has_quarter_res_cross_attention(sdxl)
    assert not ledits.has_quarter_res_cross_attention(tiny)
    assert ledits.working_size32(48, 100, None) == (32, 96) and ledits.working_size32(20, 20, None) == (32, 32)


# -- the whole harness, tiny backbones ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KINDS))
def test_tiny_edit_cached_scored_and_labelled(name, builder, tmp_path):
    add_two_samples(builder)
    method = {"name": name, **FAST, "remove_concept": "source_only_words"}
    run = run_tiny_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1), KINDS[name])
    for _, info in run.records.values():
        assert info["num_inversion_steps"] == 2
        # "a red thing" -> "a blue thing": add the target caption, remove the source-only word
        assert info["editing_prompt"] == ["a blue thing", "red"]
        assert info["reverse_editing_direction"] == [False, True] and info["source_prompt"] == ""
        assert info["scheduler"].startswith("DPMSolverMultistepScheduler")
        assert info["edit_guidance_scale"] == 5.0 and info["use_intersect_mask"] is False


def test_intersect_mask_on_a_unet_without_quarter_res_attention_is_skipped(builder, tmp_path):
    add_two_samples(builder)
    method = {"name": "ledits_pp", **FAST, "use_intersect_mask": True}
    out = run_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1))
    assert out.counts == {"ok": 0, "skipped": 2, "failed": 0}
    for reason in read_edits(out).reason:
        assert "could not be prepared" in reason and "use_intersect_mask=false" in reason


def test_watermark_without_its_package_is_skipped(builder, tmp_path):
    from diffusers.utils import is_invisible_watermark_available

    if is_invisible_watermark_available():
        pytest.skip("invisible-watermark is installed here")
    add_two_samples(builder)
    method = {"name": "ledits_pp_sdxl", **FAST, "watermark": True}
    out = run_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1))
    assert out.counts == {"ok": 0, "skipped": 2, "failed": 0}
    assert all("invisible-watermark" in r and "watermark=false" in r for r in read_edits(out).reason)


def test_sample_without_a_needed_field_is_skipped(builder, tmp_path):
    builder.add_simple("ok")
    builder.add_simple("nosrc", source_caption=None)
    builder.add_simple("same", target_caption="a red thing")  # no target-only word
    method = {"name": "ledits_pp", **FAST, "edit_concept": "target_only_words"}
    out = run_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1))
    assert_skipped(out, {"nosrc": "source_caption", "same": "target_only_words"})


# -- invariant: no edit guidance = the inversion's reconstruction = the source's VAE round trip ----
def _vae_round_trip(pipe, source: np.ndarray, size: int) -> np.ndarray:
    import torch

    x = pipe.image_processor.preprocess(to_pil(source, (size, size)))
    with torch.no_grad():
        dec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
    return from_pipeline_output(pipe.image_processor.postprocess(dec, output_type="np"), source.shape[:2])


@pytest.mark.parametrize("name,extra", [
    ("ledits_pp", {"scheduler": "ddim"}),
    ("ledits_pp", {"exact_inversion": True}),
    ("ledits_pp_sdxl", {"exact_inversion": True, "num_zero_noise_steps": 0}),
])
def test_zero_edit_guidance_reproduces_the_vae_round_trip(name, extra):
    cls = METHODS.get(name)
    s = _sample()
    recon = cls.from_config({**FAST, **extra, "edit_guidance_scale": 0.0})
    out = recon.edit(s, seed=3).image
    ref = _vae_round_trip(recon._loaded.pipeline, s.source, 32)
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.05, (diff.max(), diff.mean())  # uint8 rounding only
    # another seed draws other noise maps, and still reconstructs
    assert np.abs(recon.edit(s, seed=4).image.astype(int) - ref.astype(int)).max() <= 3

    edit = cls.from_config({**FAST, **extra, "remove_concept": "source_only_words"})
    first, again = edit.edit(s, seed=3), edit.edit(s, seed=3)
    assert np.array_equal(first.image, again.image)  # seeded
    assert first.info["editing_prompt"] == ["a blue car on a road", "red"]
    assert np.abs(first.image.astype(int) - ref.astype(int)).mean() > 1.0  # guidance changed the image


# -- missing weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KINDS))
def test_uncached_real_model_skips_every_sample(name, builder, tmp_path, empty_hub):
    add_two_samples(builder)
    model = METHODS.get(name).Params().model
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": name, "num_inference_steps": 2},
                     metrics=PIXEL_L1)
    assert_missing_weights(run_job(cfg), model)
