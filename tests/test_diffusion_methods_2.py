"""The diffusers-backed adapters diffedit and sd_inpaint through the whole harness.

Everything runs on ``backbone=tiny``: random-weight tiny pipelines of the real diffusers classes
(methods/diffusion/tiny.py), so no test touches the network or needs real weights.
"""
from __future__ import annotations

import pytest

import methods.diffedit  # noqa: F401  (registers diffedit)
import methods.sd_inpaint  # noqa: F401  (registers sd_inpaint)
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from methods.diffusion.tiny import TINY_KINDS, tiny_kind_for

from .conftest import PIXEL_L1, TWO_SIZES, add_two_samples, assert_skipped, job_config, read_scores, run_tiny_job

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
@pytest.mark.parametrize("name", sorted(METHODS_UNDER_TEST))
def test_tiny_edit_cached_scored_and_labelled(name, builder, tmp_path):
    kind = METHODS_UNDER_TEST[name][0]
    add_two_samples(builder)
    run = run_tiny_job(job_config(builder.config(), tmp_path / "res", method=_method(name), metrics=PIXEL), kind)
    for sid, (h, w) in TWO_SIZES.items():
        rec, info = run.records[sid]
        assert info["prompt"] == "a blue thing"
        mask = rec.mask()  # the method's mask, on the source grid
        assert mask is not None and mask.shape == (h, w)
        if name == "diffedit":
            assert info["source_caption"] == "a red thing" and info["mask_grid_hw"] == [16, 16]
            assert info["inpaint_strength"] == 0.8 and info["num_maps_per_mask"] == 2
        else:
            assert info["paste_back"] is True and info["strength"] == 1.0


def test_sd_inpaint_paste_back(builder, tmp_path):
    add_two_samples(builder)
    l1 = {}
    for paste in (True, False):
        out = run_job(job_config(builder.config(), tmp_path / f"res-{paste}",
                                 method=_method("sd_inpaint", paste_back=paste), metrics=PIXEL))
        assert out.counts["ok"] == 2
        l1[paste] = read_scores(out).set_index(["sample_id", "region"]).value
    for sid in TWO_SIZES:
        assert l1[True][(sid, "unedited")] == 0.0  # outside the mask: exactly the source
        assert l1[True][(sid, "edited")] > 0.0
        assert l1[False][(sid, "unedited")] > 0.0  # the whole image went through the VAE


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
