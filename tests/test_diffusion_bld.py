"""Blended Latent Diffusion (SD and SDXL adapters) on tiny random-weight backbones.

Invariants: an all-zero mask gives back exactly the VAE reconstruction of the source (the
background is the source latents after the last blend); an all-one mask is plain text-guided
denoising from the noised source, i.e. diffusers' img2img pipeline fed the same source latents,
seed, scheduler and start step (computed independently); plus the whole harness, parameter
validation, the mask requirement and missing weights.
"""
from __future__ import annotations

import numpy as np
import pytest

import methods.blended_latent_diffusion as bld  # noqa: F401  (registers both methods)
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion.inversion import decode_latents, encode_image

from .conftest import (PIXEL_L1, TWO_SIZES, add_two_samples, assert_missing_weights, assert_skipped, job_config,
                       run_tiny_job, textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

KINDS = {"blended_latent_diffusion": "sd15", "blended_latent_diffusion_sdxl": "sdxl"}
FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 32}


def _method(name: str, **params):
    cls = METHODS.get(name)
    m = cls(cls.parse_params({**FAST, **params}))
    m.prepare()
    return m


def _sample(mask: np.ndarray, size: int = 32) -> Sample:
    return Sample(id="s", dataset="t", source=textured(size, size, seed=3), mask=mask,
                  target_caption="a blue thing")


# -- parameters -----------------------------------------------------------------------------------
def test_params_defaults_and_validation():
    sd = METHODS.get("blended_latent_diffusion").Params()
    assert sd.model == "stabilityai/stable-diffusion-2-1-base"
    assert (sd.num_inference_steps, sd.guidance_scale, sd.resolution) == (50, 7.5, 512)
    xl = METHODS.get("blended_latent_diffusion_sdxl").Params()
    assert xl.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (xl.num_inference_steps, xl.guidance_scale, xl.resolution) == (50, 5.0, 1024)
    for p in (sd, xl):
        assert (p.blending_percentage, p.blend_level, p.paste_back) == (0.25, "next", False)
    for name in KINDS:
        assert METHODS.get(name).requires == ("source", "mask", "target_caption")
        for bad, field in [
            ({"blending_percentage": 1.0}, "blending_percentage"),
            ({"blending_percentage": -0.1}, "blending_percentage"),
            ({"blending_percentage": "a"}, "blending_percentage"),
            ({"blend_level": "previous"}, "blend_level"),
            ({"paste_back": "yes"}, "paste_back"),
            ({"num_inference_steps": 0}, "num_inference_steps"),
            ({"resolution": 30}, "resolution"),
        ]:
            with pytest.raises(ParamError, match=field):
                METHODS.get(name).parse_params(bad)


def test_latent_mask_nearest_and_threshold():
    mask = np.zeros((32, 32), bool)
    mask[:16, 8:24] = True
    m = bld.latent_mask(mask, (16, 16))
    assert m.dtype == np.float32 and set(np.unique(m)) == {0.0, 1.0}
    expected = np.zeros((16, 16), np.float32)
    expected[:8, 4:12] = 1
    np.testing.assert_array_equal(m, expected)


# -- invariants -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KINDS))
def test_zero_mask_gives_the_vae_reconstruction(name):
    method = _method(name)
    pipe = method._loaded.pipeline
    sample = _sample(np.zeros((32, 32), bool))
    out = method.edit(sample, seed=0)
    z = encode_image(pipe, sample.source)
    np.testing.assert_array_equal(out.image, decode_latents(pipe, z))
    assert out.info["latent_mask_fraction"] == 0.0 and out.info["latent_mask_hw"] == list(z.shape[-2:])
    # the blend with the step's own noise level (the official scripts) leaves noise behind
    noisy = _method(name, blend_level="current").edit(sample, seed=0)
    assert np.abs(noisy.image.astype(int) - out.image.astype(int)).mean() > 1.0  # (32 levels here)


def _img2img(name: str, method, sample: Sample, seed: int):
    """Independent reference: diffusers' img2img pipeline on the source latents, same scheduler
    configuration, seed and start step (strength = 1 - blending_percentage)."""
    import torch
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionXLImg2ImgPipeline)

    base = method._loaded.pipeline
    p = method.params
    if name == "blended_latent_diffusion":
        pipe = StableDiffusionImg2ImgPipeline(**base.components)
        # as text_editing_SD2.py builds it (set after construction: the pipeline's constructor
        # rewrites a scheduler's steps_offset 0 to 1, the official script's scheduler keeps 0)
        pipe.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False)
        assert pipe.scheduler.config.steps_offset == 0
        kwargs = {}
    else:
        sched = EulerDiscreteScheduler.from_config(base.scheduler.config)
        pipe = StableDiffusionXLImg2ImgPipeline(**{**base.components, "scheduler": sched})
        kwargs = {"original_size": (32, 32), "target_size": (32, 32)}
    pipe.set_progress_bar_config(disable=True)
    z = encode_image(base, sample.source)
    with torch.inference_mode():
        out = pipe(prompt=sample.target_caption, image=z, strength=1.0 - p.blending_percentage,
                   num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kwargs)
    return out.images


@pytest.mark.parametrize("name", sorted(KINDS))
def test_full_mask_is_plain_denoising_from_the_noised_source(name):
    import torch

    # 4 steps, the default blending_percentage 0.25: 1 step skipped, 3 run (img2img strength 0.75)
    method = _method(name, num_inference_steps=4)
    sample = _sample(np.ones((32, 32), bool))
    ref = _img2img(name, method, sample, seed=5)
    pipe = method._loaded.pipeline
    with torch.inference_mode():
        ours = method.run(pipe, sample.source, sample.mask, sample.target_caption,
                          torch.Generator("cpu").manual_seed(5))
    assert method._last["denoising_steps"] == 3
    # our loop vs the pipeline's: the same steps in other code (float32 rounding of the scheduler
    # arithmetic through 3 UNet calls of a tiny model)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # and the edit through the adapter is the decode of our latents: the same computation again, bit
    # for bit (decoding ref instead could flip a uint8 rounding where ours and ref differ)
    out = method.edit(sample, seed=5)
    np.testing.assert_array_equal(out.image, decode_latents(pipe, ours))


def test_partial_mask_keeps_the_background_latents():
    import torch

    method = _method("blended_latent_diffusion")
    pipe = method._loaded.pipeline
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    sample = _sample(mask)
    with torch.inference_mode():
        z = encode_image(pipe, sample.source)
        lat = method.run(pipe, sample.source, mask, sample.target_caption, torch.Generator("cpu").manual_seed(0))
    m = torch.from_numpy(bld.latent_mask(mask, tuple(z.shape[-2:])))[None, None].bool().expand_as(z)
    torch.testing.assert_close(lat[~m], z[~m], rtol=0, atol=0)
    assert (lat[m] - z[m]).abs().max() > 1e-3  # the masked latents were generated


# -- the whole harness ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KINDS))
def test_tiny_edit_cached_scored_and_labelled(name, builder, tmp_path):
    add_two_samples(builder)
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": name, **FAST, "paste_back": True},
                     metrics=PIXEL_L1)
    run = run_tiny_job(cfg, KINDS[name])
    for sid, (h, w) in TWO_SIZES.items():
        rec, info = run.records[sid]
        assert info["prompt"] == "a blue thing"
        assert info["blending_percentage"] == 0.25 and info["blend_level"] == "next" and info["paste_back"] is True
        assert info["denoising_steps"] == 2 and info["latent_mask_hw"] == [4, 4]  # 32 px / tiny VAE factor 8
        assert info["scheduler"] == ("DDIMScheduler" if KINDS[name] == "sd15" else "EulerDiscreteScheduler")
        mask = rec.mask()
        assert mask is not None and mask.shape == (h, w)
    scores = run.scores.set_index(["sample_id", "region"]).value
    for sid in TWO_SIZES:
        assert scores[(sid, "unedited")] == 0.0  # paste_back: outside the mask exactly the source
        assert scores[(sid, "edited")] > 0.0  # random weights: the masked region changed


@pytest.mark.parametrize("name,field", [
    ("blended_latent_diffusion", "mask"), ("blended_latent_diffusion_sdxl", "mask"),
    ("blended_latent_diffusion", "target_caption"),
])
def test_sample_without_a_required_field_is_skipped(name, field, builder, tmp_path):
    builder.add_simple("ok")
    builder.add_simple("nofield", **{field: None})
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": name, **FAST}, metrics=PIXEL_L1))
    assert_skipped(out, {"nofield": field})


@pytest.mark.parametrize("name", sorted(KINDS))
def test_missing_weights_skip_every_sample(name, builder, tmp_path, empty_hub):
    builder.add_simple("a")
    builder.add_simple("b", seed=2)
    model = METHODS.get(name).Params().model
    out = run_job(job_config(builder.config(), tmp_path / "res",
                             method={"name": name, "num_inference_steps": 2}, metrics=PIXEL_L1))
    assert_missing_weights(out, model)
