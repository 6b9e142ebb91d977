"""The mask-given adapters sdxl_inpaint and paint_by_example through the whole harness.

Everything runs on ``backbone=tiny`` (random-weight tiny pipelines of the real diffusers classes:
methods/diffusion/tiny.py kinds ``sdxl_inpaint`` and ``paint_by_example``), 2 steps at 32 x 32,
except the missing-weights test, which points the hub cache at an empty folder.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import methods.paint_by_example  # noqa: F401  (registers paint_by_example)
import methods.sdxl_inpaint  # noqa: F401  (registers sdxl_inpaint)
from harness.cache import EditStore
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion.tiny import TINY_KINDS, tiny_components, tiny_kind_for
from methods.paint_by_example import exemplar

from ._pipeline_spy import resized_mask, resized_source, spy_diffusion
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
def _pipeline_class(name: str) -> type:
    from diffusers import PaintByExamplePipeline, StableDiffusionXLInpaintPipeline

    return {"sdxl_inpaint": StableDiffusionXLInpaintPipeline, "paint_by_example": PaintByExamplePipeline}[name]


def _inputs(builder, sid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sample's source, mask and reference as written by the builder."""
    def read(rel):
        return np.asarray(Image.open(builder.root / rel))

    return read(f"images/{sid}.png"), read(f"masks/{sid}.png") > 127, read(f"images/{sid}_ref.png")


def pbe_crop_size() -> tuple[int, int]:
    """(height, width) of the tiny Paint-by-Example image processor's crop."""
    crop = tiny_components("paint_by_example")["feature_extractor"].crop_size
    return crop["height"], crop["width"]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_tiny_edit_cached_scored_and_labelled(name, builder, tmp_path, monkeypatch):
    spy = spy_diffusion(monkeypatch, _pipeline_class(name))
    _two_samples(builder)
    cfg = job_config(builder.config(), tmp_path / "res", method=_method(name), metrics=PIXEL_L1)
    run = run_tiny_job(cfg, KINDS[name])
    calls = spy.calls()
    assert len(calls) == 2 and len(spy.pipeline) == 2  # the cached second run called nothing
    for (sid, (h, w)), call in zip(TWO_SIZES.items(), calls):  # the runner edits in manifest order
        rec, info = run.records[sid]
        assert info["paste_back"] is False
        mask = rec.mask()  # the sample's mask, returned with the edit
        source, sample_mask, ref = _inputs(builder, sid)
        assert mask is not None and np.array_equal(mask, sample_mask)
        # What the pipeline really received: the source and its mask at the working size (PIL
        # bicubic / nearest, the adapters' own resize calls), the settings, the seeded generator.
        kw = call.kwargs
        assert np.array_equal(np.asarray(kw["image"]), resized_source(source, (32, 32)))
        assert np.array_equal(np.asarray(kw["mask_image"]), resized_mask(sample_mask, (32, 32)))
        assert kw["num_inference_steps"] == 2 and call.generator_seed == 0 and call.generator_advanced
        if name == "sdxl_inpaint":
            assert info["prompt"] == "a blue thing" and info["guidance_scale"] == 8.0
            assert info["strength"] == 0.99 and info["denoising_steps"] == 1  # int(2 * 0.99)
            assert kw["prompt"] == "a blue thing" and (kw["guidance_scale"], kw["strength"]) == (8.0, 0.99)
            assert (kw["height"], kw["width"]) == (32, 32)
            # int(2 * 0.99) = 1 step really run: one UNet forward of [uncond, cond], 9 channels, on
            # the 4 x 4 latent of 32 x 32 (the tiny VAE downsamples by 8, as SD's)
            assert [(u.batch, u.in_channels, u.latent_hw) for u in call.unet] == [(2, 9, (4, 4))]
        else:
            assert info["guidance_scale"] == 5.0 and info["condition"] == "reference"
            assert info["reference_fit"] == "stretch"
            assert "prompt" not in kw and kw["guidance_scale"] == 5.0
            # the exemplar: the reference (cropped to its reference_mask's box when there is one)
            # stretched, bicubic, to the image encoder's input size
            crop = pbe_crop_size()
            if sid == "a":  # the reference has a reference_mask: cropped to its box
                t, left, b, r = REF_BOX
                assert info["reference_crop_box"] == REF_BOX and info["reference_size_hw"] == [b - t, r - left]
                ref = ref[t:b, left:r]
            else:
                assert info["reference_crop_box"] is None and info["reference_size_hw"] == [24, 32]
            assert np.array_equal(np.asarray(kw["example_image"]), resized_source(ref, crop))
            # both steps run, each one UNet forward of [uncond, cond] on 9 channels
            assert [(u.batch, u.in_channels, u.latent_hw) for u in call.unet] == [(2, 9, (4, 4))] * 2
        edit = rec.image().astype(int)
        # paste_back=false: the whole image went through the VAE, most pixels outside the mask too
        assert (np.abs(edit - source).max(-1)[~mask] > 2).mean() > 0.5
    scores = run.scores.set_index(["sample_id", "region"]).value
    for sid in TWO_SIZES:
        assert scores[(sid, "unedited")] > 0.01


@pytest.mark.parametrize("name", sorted(KINDS))
def test_paste_back_keeps_the_unedited_region_exactly(name, builder, tmp_path):
    _two_samples(builder)
    images = {}
    for paste in (True, False):
        out = run_job(job_config(builder.config(), tmp_path / f"res-{paste}", method=_method(name, paste_back=paste),
                                 metrics=PIXEL_L1))
        assert out.counts == {"ok": 2, "skipped": 0, "failed": 0}, read_edits(out).reason.tolist()
        store = EditStore(tmp_path / f"res-{paste}" / "test" / "edits")
        e = read_edits(out)
        images[paste] = {sid: store.get(k).image().astype(int) for sid, k in zip(e.sample_id, e.edit_key)}
        if paste:
            l1 = read_scores(out).set_index(["sample_id", "region"]).value
    for sid in TWO_SIZES:
        source, mask, _ = _inputs(builder, sid)
        pasted, whole = images[True][sid], images[False][sid]
        # outside the mask: exactly the source; inside: exactly the pipeline's output (the same
        # computation with the same seed in both runs), which repainted most of the region
        assert np.array_equal(pasted[~mask], source[~mask])
        assert np.array_equal(pasted[mask], whole[mask])
        assert (np.abs(pasted - source).max(-1)[mask] > 2).mean() > 0.5
        assert l1[(sid, "unedited")] == 0.0 and l1[(sid, "edited")] > 0.01


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

