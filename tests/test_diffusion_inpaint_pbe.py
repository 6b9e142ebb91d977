"""The mask-given adapters sdxl_inpaint and paint_by_example through the whole harness.

Everything runs on ``backbone=tiny`` (random-weight tiny pipelines of the real diffusers classes:
methods/diffusion/tiny.py kinds ``sdxl_inpaint`` and ``paint_by_example``), 2 steps at 32 x 32,
except the missing-weights test, which points the hub cache at an empty folder.
"""
from __future__ import annotations

import numpy as np
import pytest

import methods.paint_by_example  # noqa: F401  (registers paint_by_example)
import methods.sdxl_inpaint  # noqa: F401  (registers sdxl_inpaint)
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion.tiny import TINY_KINDS, tiny_components, tiny_kind_for
from methods.paint_by_example import exemplar

from .conftest import (PIXEL_L1, TWO_SIZES, add_two_samples, assert_missing_weights, assert_skipped, job_config,
                       read_edits, read_scores, run_tiny_job, textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

KINDS = {"sdxl_inpaint": "sdxl_inpaint", "paint_by_example": "paint_by_example"}
FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 32}
REF_BOX = [4, 6, 20, 26]  # [top, left, bottom, right) of sample a's reference_mask


def _method(name: str, **extra) -> dict:
    return {"name": name, **FAST, **extra}


def _reference(builder, sid: str, seed: int, with_mask: bool = False) -> dict:
    """Write a 24 x 32 reference image (and, if asked, a box-shaped reference mask)."""
    rec = {"reference": builder.image(f"images/{sid}_ref.png", textured(24, 32, seed))}
    if with_mask:
        m = np.zeros((24, 32), dtype=bool)
        t, left, b, r = REF_BOX
        m[t:b, left:r] = True
        rec["reference_mask"] = builder.image(f"masks/{sid}_ref.png", m)
    return rec


def _two_samples(builder) -> None:
    add_two_samples(builder, a=_reference(builder, "a", 5, True), b=_reference(builder, "b", 6))


# -- tiny kinds ---------------------------------------------------------------------------------
def test_tiny_kinds_build_the_real_classes():
    from diffusers import (AutoencoderKL, PaintByExamplePipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    assert {"sdxl_inpaint", "paint_by_example"} <= set(TINY_KINDS)
    assert tiny_kind_for(StableDiffusionXLInpaintPipeline) == "sdxl_inpaint"
    assert tiny_kind_for(PaintByExamplePipeline) == "paint_by_example"
    # the existing mappings are unchanged
    assert tiny_kind_for(StableDiffusionXLImg2ImgPipeline) == "sdxl"
    assert tiny_kind_for(StableDiffusionXLPipeline) == "sdxl"
    assert tiny_kind_for(StableDiffusionInpaintPipeline) == "inpaint"

    xl = tiny_components("sdxl_inpaint")
    assert set(xl) == {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
    assert type(xl["unet"]) is UNet2DConditionModel and type(xl["vae"]) is AutoencoderKL
    assert type(xl["text_encoder"]) is CLIPTextModel and type(xl["text_encoder_2"]) is CLIPTextModelWithProjection
    assert isinstance(xl["tokenizer_2"], CLIPTokenizer)
    ucfg = xl["unet"].config
    assert (ucfg.in_channels, ucfg.out_channels, ucfg.addition_embed_type) == (9, 4, "text_time")
    assert ucfg.cross_attention_dim == xl["text_encoder"].config.hidden_size + xl["text_encoder_2"].config.hidden_size
    assert tiny_components("sdxl")["unet"].config.in_channels == 4  # the plain SDXL kind is untouched

    pbe = tiny_components("paint_by_example")
    assert set(pbe) == {"unet", "vae", "image_encoder", "feature_extractor", "scheduler"}
    assert type(pbe["image_encoder"]) is PaintByExampleImageEncoder
    assert isinstance(pbe["feature_extractor"], CLIPImageProcessor)
    assert pbe["unet"].config.in_channels == 9
    assert pbe["unet"].config.cross_attention_dim == pbe["image_encoder"].proj_size
    crop = pbe["feature_extractor"].crop_size
    assert (crop["height"], crop["width"]) == (pbe["image_encoder"].config.image_size,) * 2


# -- parameters ---------------------------------------------------------------------------------
def test_params_defaults_and_validation():
    xl = METHODS.get("sdxl_inpaint").Params()
    assert xl.model == "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
    assert (xl.num_inference_steps, xl.guidance_scale, xl.strength) == (20, 8.0, 0.99)
    assert (xl.resolution, xl.paste_back) == (1024, False)
    pbe = METHODS.get("paint_by_example").Params()
    assert pbe.model == "Fantasy-Studio/Paint-by-Example"
    assert (pbe.num_inference_steps, pbe.guidance_scale, pbe.resolution) == (50, 5.0, 512)
    assert (pbe.reference_fit, pbe.crop_reference, pbe.paste_back) == ("stretch", True, False)
    assert METHODS.get("sdxl_inpaint").requires == ("source", "mask", "target_caption")
    assert METHODS.get("paint_by_example").requires == ("source", "mask", "reference")
    for name, bad, match in [
        ("sdxl_inpaint", {"strength": 0.0}, "strength"),
        ("sdxl_inpaint", {"strength": 1.01}, "strength"),
        ("sdxl_inpaint", {"paste_back": "yes"}, "paste_back"),
        ("sdxl_inpaint", {"resolution": 1020}, "resolution"),
        ("sdxl_inpaint", {"num_inference_steps": 0}, "num_inference_steps"),
        ("paint_by_example", {"reference_fit": "squash"}, "reference_fit"),
        ("paint_by_example", {"crop_reference": "no"}, "crop_reference"),
        ("paint_by_example", {"paste_back": 1}, "paste_back"),
        ("paint_by_example", {"guidance_scale": -1.0}, "guidance_scale"),
        ("paint_by_example", {"strength": 0.5}, "strength"),  # no such parameter
    ]:
        with pytest.raises(ParamError, match=match):
            METHODS.get(name).parse_params(bad)


def test_exemplar_crops_to_the_reference_mask_box():
    ref = textured(24, 32, 3)
    m = np.zeros((24, 32), dtype=bool)
    m[5:9, 10:12] = True
    m[15, 20] = True
    s = Sample(id="x", dataset="d", source=textured(8, 8), reference=ref, reference_mask=m)
    crop, box = exemplar(s, True)
    assert box == [5, 10, 16, 21] and np.array_equal(crop, ref[5:16, 10:21])
    assert exemplar(s, False)[1] is None and exemplar(s, False)[0] is s.reference
    no_mask = Sample(id="y", dataset="d", source=textured(8, 8), reference=ref)
    assert exemplar(no_mask, True)[1] is None


# -- the whole harness, tiny backbones ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KINDS))
def test_tiny_edit_cached_scored_and_labelled(name, builder, tmp_path):
    _two_samples(builder)
    cfg = job_config(builder.config(), tmp_path / "res", method=_method(name), metrics=PIXEL_L1)
    run = run_tiny_job(cfg, KINDS[name])
    for sid, (h, w) in TWO_SIZES.items():
        rec, info = run.records[sid]
        assert info["paste_back"] is False
        mask = rec.mask()  # the sample's mask, returned with the edit
        assert mask is not None and mask.shape == (h, w) and mask.any()
        if name == "sdxl_inpaint":
            assert info["prompt"] == "a blue thing" and info["guidance_scale"] == 8.0
            assert info["strength"] == 0.99 and info["denoising_steps"] == 1  # int(2 * 0.99)
        else:
            assert info["guidance_scale"] == 5.0 and info["condition"] == "reference"
            assert info["reference_fit"] == "stretch"
            if sid == "a":  # the reference has a reference_mask: cropped to its box
                t, left, b, r = REF_BOX
                assert info["reference_crop_box"] == REF_BOX and info["reference_size_hw"] == [b - t, r - left]
            else:
                assert info["reference_crop_box"] is None and info["reference_size_hw"] == [24, 32]
    scores = run.scores.set_index(["sample_id", "region"]).value
    for sid in TWO_SIZES:
        assert scores[(sid, "unedited")] > 0  # paste_back=false: the whole image went through the VAE


@pytest.mark.parametrize("name", sorted(KINDS))
def test_paste_back_keeps_the_unedited_region_exactly(name, builder, tmp_path):
    _two_samples(builder)
    out = run_job(job_config(builder.config(), tmp_path / "res", method=_method(name, paste_back=True),
                             metrics=PIXEL_L1))
    assert out.counts == {"ok": 2, "skipped": 0, "failed": 0}, read_edits(out).reason.tolist()
    l1 = read_scores(out).set_index(["sample_id", "region"]).value
    for sid in TWO_SIZES:
        assert l1[(sid, "unedited")] == 0.0  # outside the mask: exactly the source
        assert l1[(sid, "edited")] > 0.0


# -- skips --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,field", [
    ("paint_by_example", "reference"), ("paint_by_example", "mask"),
    ("sdxl_inpaint", "mask"), ("sdxl_inpaint", "target_caption"),
])
def test_sample_without_a_required_field_is_skipped(name, field, builder, tmp_path):
    builder.add_simple("ok", **_reference(builder, "ok", 1))
    lacking = _reference(builder, "nofield", 2)
    lacking[field] = None
    if field == "reference":
        lacking.pop("reference_mask", None)
    builder.add_simple("nofield", **lacking)
    builder.add_simple("emptymask", mask=builder.image("masks/emptymask_zero.png", np.zeros((48, 64), dtype=bool)),
                       **_reference(builder, "emptymask", 3))
    out = run_job(job_config(builder.config(), tmp_path / "res", method=_method(name), metrics=PIXEL_L1))
    assert_skipped(out, {"nofield": f"field(s) {field}", "emptymask": "non-empty mask"})


@pytest.mark.parametrize("name", sorted(KINDS))
def test_uncached_real_model_skips_every_sample(name, builder, tmp_path, empty_hub):
    _two_samples(builder)
    model = METHODS.get(name).Params().model
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": name}, metrics=PIXEL_L1))
    assert_missing_weights(out, model)

