"""The diffusers-backed adapters diffedit and sd_inpaint through the whole harness.

Everything runs on ``backbone=tiny``: random-weight tiny pipelines of the real diffusers classes
(methods/diffusion/tiny.py), so no test touches the network or needs real weights.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import methods.diffedit  # noqa: F401  (registers diffedit)
import methods.sd_inpaint  # noqa: F401  (registers sd_inpaint)
from harness.cache import EditStore
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from methods.diffusion.tiny import TINY_KINDS, tiny_kind_for

from ._pipeline_spy import resized_mask, resized_source, spy_diffusion
from .conftest import (PIXEL_L1, TWO_SIZES, add_two_samples, assert_skipped, job_config, read_edits, read_scores,
                       run_tiny_job)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# method -> (tiny backbone kind, extra fast parameters)
METHODS_UNDER_TEST = {
    "diffedit": ("sd15", {"num_maps_per_mask": 2}),
    "sd_inpaint": ("inpaint", {}),
}
FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 32}
PIXEL = PIXEL_L1


def _method(name: str, **extra) -> dict:
    return {"name": name, **FAST, **METHODS_UNDER_TEST[name][1], **extra}


# -- parameters and tiny kinds -------------------------------------------------------------------
def test_params_defaults_and_validation():
    de = METHODS.get("diffedit").Params()
    assert (de.resolution, de.mask_encode_strength, de.num_maps_per_mask, de.inpaint_strength) == (768, 0.5, 10, 0.8)
    assert (de.num_inference_steps, de.guidance_scale) == (50, 7.5)
    sd = METHODS.get("sd_inpaint").Params()
    assert sd.model == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert (sd.strength, sd.num_inference_steps, sd.guidance_scale, sd.paste_back, sd.resolution) == (1.0, 50, 7.5, True, 512)
    for name, bad, match in [
        ("diffedit", {"mask_encode_strength": 0.0}, "mask_encode_strength"),
        ("diffedit", {"mask_encode_strength": 1.5}, "mask_encode_strength"),
        ("diffedit", {"inpaint_strength": 1.2}, "inpaint_strength"),
        ("diffedit", {"num_maps_per_mask": 0}, "num_maps_per_mask"),
        ("diffedit", {"resolution": 770}, "resolution"),
        ("sd_inpaint", {"strength": 0.0}, "strength"),
        ("sd_inpaint", {"paste_back": "yes"}, "paste_back"),
    ]:
        with pytest.raises(ParamError, match=match):
            METHODS.get(name).parse_params(bad)


def test_tiny_inpaint_kind():
    from diffusers import (StableDiffusionDiffEditPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline, StableDiffusionInstructPix2PixPipeline,
                           StableDiffusionXLImg2ImgPipeline)

    assert "inpaint" in TINY_KINDS
    assert tiny_kind_for(StableDiffusionInpaintPipeline) == "inpaint"
    assert tiny_kind_for(StableDiffusionDiffEditPipeline) == "sd15"
    assert tiny_kind_for(StableDiffusionImg2ImgPipeline) == "sd15"
    assert tiny_kind_for(StableDiffusionInstructPix2PixPipeline) == "ip2p"
    assert tiny_kind_for(StableDiffusionXLImg2ImgPipeline) == "sdxl"


# -- the whole harness, tiny backbones ----------------------------------------------------------
def _source_and_mask(builder, sid: str) -> tuple[np.ndarray, np.ndarray]:
    """The sample's source and mask as written by the builder (add_simple's disc)."""
    source = np.asarray(Image.open(builder.root / "images" / f"{sid}.png"))
    mask = np.asarray(Image.open(builder.root / "masks" / f"{sid}.png")) > 127
    return source, mask


@pytest.mark.parametrize("name", sorted(METHODS_UNDER_TEST))
def test_tiny_edit_cached_scored_and_labelled(name, builder, tmp_path, monkeypatch):
    from diffusers import StableDiffusionDiffEditPipeline, StableDiffusionInpaintPipeline

    if name == "diffedit":
        spy = spy_diffusion(monkeypatch, StableDiffusionDiffEditPipeline, ("generate_mask", "invert", "__call__"))
    else:
        spy = spy_diffusion(monkeypatch, StableDiffusionInpaintPipeline)
    kind = METHODS_UNDER_TEST[name][0]
    add_two_samples(builder)
    run = run_tiny_job(job_config(builder.config(), tmp_path / "res", method=_method(name), metrics=PIXEL), kind)
    whole = run.scores.query("region == 'all'").value
    # random weights repaint the image (mean L1 ~0.28), sd_inpaint only inside its mask (~15%: ~0.03)
    assert len(whole) == 2 and (whole > 0.01).all()
    per_edit = 3 if name == "diffedit" else 1
    assert len(spy.pipeline) == 2 * per_edit  # the cached second run called nothing
    for n, (sid, (h, w)) in enumerate(TWO_SIZES.items()):  # the runner edits in manifest order
        rec, info = run.records[sid]
        assert info["prompt"] == "a blue thing"
        mask = rec.mask()  # the method's mask, on the source grid
        assert mask is not None and mask.shape == (h, w)
        source, sample_mask = _source_and_mask(builder, sid)
        work = resized_source(source, (32, 32))  # PIL bicubic, as the adapter resizes: the same call
        calls = spy.pipeline[n * per_edit:(n + 1) * per_edit]
        assert all(c.generator_seed == 0 for c in calls)
        if name == "diffedit":
            assert info["source_caption"] == "a red thing" and info["mask_grid_hw"] == [4, 4]  # 32 px / VAE factor 8
            assert info["inpaint_strength"] == 0.8 and info["num_maps_per_mask"] == 2
            gen, inv, edit = calls
            assert [c.method for c in calls] == ["generate_mask", "invert", "__call__"]
            # 1. the mask: source vs target caption, at mask_encode_strength 0.5 of 2 steps (one
            #    UNet run) on num_maps_per_mask 2 noised copies x [uncond, cond] x 2 captions = 8 rows
            assert np.array_equal(np.asarray(gen.kwargs["image"]), work)
            assert (gen.kwargs["source_prompt"], gen.kwargs["target_prompt"]) == ("a red thing", "a blue thing")
            assert {k: gen.kwargs[k] for k in ("num_maps_per_mask", "mask_encode_strength", "mask_thresholding_ratio",
                                               "num_inference_steps", "guidance_scale")} == {
                "num_maps_per_mask": 2, "mask_encode_strength": 0.5, "mask_thresholding_ratio": 3.0,
                "num_inference_steps": 2, "guidance_scale": 7.5}
            assert [(u.batch, u.latent_hw) for u in gen.unet] == [(8, (4, 4))]
            # 2. inversion with the source caption, int(2 * 0.8) = 1 step; guidance is left at
            #    invert()'s own default 7.5 (classifier-free: 2 rows), as in diffusers' DiffEdit guide
            assert np.array_equal(np.asarray(inv.kwargs["image"]), work)
            assert inv.kwargs["prompt"] == "a red thing" and inv.kwargs["inpaint_strength"] == 0.8
            assert inv.kwargs["num_inference_steps"] == 2 and "guidance_scale" not in inv.kwargs
            assert [(u.batch, u.latent_hw) for u in inv.unet] == [(2, (4, 4))]
            # 3. the edit: that mask and those latents, target caption, source caption as negative
            assert edit.kwargs["mask_image"] is gen.result and edit.kwargs["image_latents"] is inv.result.latents
            assert (edit.kwargs["prompt"], edit.kwargs["negative_prompt"]) == ("a blue thing", "a red thing")
            assert edit.kwargs["inpaint_strength"] == 0.8 and edit.kwargs["guidance_scale"] == 7.5
            assert [(u.batch, u.latent_hw) for u in edit.unet] == [(2, (4, 4))]
            # the returned mask is the generated one (latent grid) resized to the source, nearest
            grid = Image.fromarray((np.asarray(gen.result).reshape(4, 4) >= 0.5).astype(np.uint8) * 255)
            assert np.array_equal(mask, np.asarray(grid.resize((w, h), Image.NEAREST)) > 127)
            assert info["mask_fraction"] == pytest.approx(mask.mean())
        else:
            assert info["paste_back"] is True and info["strength"] == 1.0
            (call,) = calls
            kw = call.kwargs
            assert kw["prompt"] == "a blue thing" and np.array_equal(np.asarray(kw["image"]), work)
            assert np.array_equal(np.asarray(kw["mask_image"]), resized_mask(sample_mask, (32, 32)))
            assert (kw["height"], kw["width"], kw["strength"], kw["guidance_scale"]) == (32, 32, 1.0, 7.5)
            assert kw["num_inference_steps"] == 2 and call.generator_advanced
            # strength 1: both steps run, each one UNet forward of [uncond, cond] on 9 channels
            # (noisy latent + mask + masked-image latent)
            assert [(u.batch, u.in_channels, u.latent_hw) for u in call.unet] == [(2, 9, (4, 4))] * 2
            assert np.array_equal(mask, sample_mask)  # the sample's mask is returned with the edit


def test_sd_inpaint_paste_back(builder, tmp_path):
    add_two_samples(builder)
    l1, edits = {}, {}
    for paste in (True, False):
        out = run_job(job_config(builder.config(), tmp_path / f"res-{paste}",
                                 method=_method("sd_inpaint", paste_back=paste), metrics=PIXEL))
        assert out.counts["ok"] == 2
        l1[paste] = read_scores(out).set_index(["sample_id", "region"]).value
        store = EditStore(tmp_path / f"res-{paste}" / "test" / "edits")
        e = read_edits(out)
        edits[paste] = {sid: store.get(k).image() for sid, k in zip(e.sample_id, e.edit_key)}
    for sid in TWO_SIZES:
        source, mask = _source_and_mask(builder, sid)
        pasted, whole = edits[True][sid].astype(int), edits[False][sid].astype(int)
        # outside the mask: exactly the source; inside: exactly the pipeline's output (the same
        # computation with the same seed in both runs), which repainted most of the region
        assert np.array_equal(pasted[~mask], source[~mask])
        assert np.array_equal(pasted[mask], whole[mask])
        assert (np.abs(pasted - source).max(-1)[mask] > 2).mean() > 0.5
        # without paste-back the whole image went through the VAE: most unedited pixels moved
        assert (np.abs(whole - source).max(-1)[~mask] > 2).mean() > 0.5
        assert l1[True][(sid, "unedited")] == 0.0 and l1[True][(sid, "edited")] > 0.01
        assert l1[False][(sid, "unedited")] > 0.01


# -- skips --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,field", [
    ("diffedit", "source_caption"), ("diffedit", "target_caption"),
    ("sd_inpaint", "mask"), ("sd_inpaint", "target_caption"),
])
def test_sample_without_a_required_field_is_skipped(name, field, builder, tmp_path):
    builder.add_simple("ok")
    builder.add_simple("nofield", **{field: None})
    if field != "mask":
        builder.add_simple("blank", **{field: "   "})
    out = run_job(job_config(builder.config(), tmp_path / "res", method=_method(name), metrics=PIXEL))
    assert_skipped(out, {"nofield": field} if field == "mask" else {"nofield": field, "blank": field})


# The missing-weights skip of these adapters is tested with the others in test_diffusion_methods.py.
