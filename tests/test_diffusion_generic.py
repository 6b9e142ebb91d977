"""``diffusers_pipeline``: a diffusers pipeline wrapped from its config alone, through the harness.

Runs on ``backbone=tiny`` (random-weight tiny pipelines of the real diffusers classes), no network.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import methods.diffusers_pipeline  # noqa: F401  (registers the method)
import methods.sdedit  # noqa: F401
from harness.cache import EditStore
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods._diffusion_common import RANDOM_WEIGHTS_TAG
from methods.diffusers_pipeline import DiffusersPipeline

from ._pipeline_spy import resized_source, spy_diffusion
from .conftest import (PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config, read_edits,
                       run_tiny_job)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 32}
IMG2IMG = {
    "name": "diffusers_pipeline",
    "pipeline": "diffusers.StableDiffusionImg2ImgPipeline",
    "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "inputs": {"image": "source", "prompt": "target_caption"},
    "call_args": {"strength": 0.8},
    "guidance_scale": 7.5,
    **FAST,
}
IP2P = {
    "name": "diffusers_pipeline",
    "pipeline": "diffusers.StableDiffusionInstructPix2PixPipeline",
    "model": "timbrooks/instruct-pix2pix",
    "inputs": {"image": "source", "prompt": "instruction"},
    "call_args": {"image_guidance_scale": 1.5},
    **FAST,
}
PIXEL = PIXEL_L1


def _pngs(results, outcome) -> dict[str, bytes]:
    store = EditStore(results / "test" / "edits")
    e = read_edits(outcome)
    return {sid: (store.folder(k) / "edit.png").read_bytes() for sid, k in zip(e.sample_id, e.edit_key)}


def _two_samples(builder) -> None:
    add_two_samples(builder, a={"instruction": "make it blue"}, b={"instruction": "turn it green"})


def _method(cfg: dict) -> DiffusersPipeline:
    return METHODS.get("diffusers_pipeline").from_config({k: v for k, v in cfg.items() if k != "name"})


# -- through the harness ------------------------------------------------------------------------
def test_img2img_from_config_matches_sdedit_byte_for_byte(builder, tmp_path, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline

    spy = spy_diffusion(monkeypatch, StableDiffusionImg2ImgPipeline)
    _two_samples(builder)
    res = tmp_path / "res"
    run = run_tiny_job(job_config(builder.config(), res, method=IMG2IMG, metrics=PIXEL), "sd15")
    for _, info in run.records.values():
        assert info["pipeline"] == "diffusers.StableDiffusionImg2ImgPipeline"
        assert info["pipeline_class"].endswith("StableDiffusionImg2ImgPipeline")
        assert info["call_args"] == {"strength": 0.8}
        assert info["inputs"] == {"image": "source", "prompt": "target_caption"}
        assert info["texts"] == {"prompt": "a blue thing"}
    # What the pipeline really received: the mapped fields, the constant and common arguments,
    # the seeded generator; int(2 * 0.8) = 1 step run (one UNet forward of [uncond, cond]).
    calls = spy.calls()
    assert len(calls) == 2  # the cached second run called nothing
    for sid, call in zip(("a", "b"), calls):
        kw = call.kwargs
        assert set(kw) == {"image", "prompt", "strength", "num_inference_steps", "guidance_scale", "generator",
                           "output_type"}
        assert (kw["prompt"], kw["strength"], kw["num_inference_steps"], kw["guidance_scale"]) == (
            "a blue thing", 0.8, 2, 7.5)
        source = np.asarray(Image.open(builder.root / "images" / f"{sid}.png"))
        assert np.array_equal(np.asarray(kw["image"]), resized_source(source, (32, 32)))
        assert call.generator_seed == 0 and [(u.batch, u.latent_hw) for u in call.unet] == [(2, (4, 4))]  # 32 px / 8

    sdedit = {"name": "sdedit", "strength": 0.8, "guidance_scale": 7.5, **FAST}
    spy.clear()
    ref = run_job(job_config(builder.config(), tmp_path / "ref", method=sdedit, metrics=PIXEL))
    assert ref.counts["ok"] == 2
    # The adapter calls the same pipeline with the same arguments, so the same computation (same
    # weights, inputs, kernels, threads in this process) gives the same bytes.
    for mine, theirs in zip(calls, spy.calls()):
        assert {k: v for k, v in mine.kwargs.items() if k not in ("image", "generator")} == \
            {k: v for k, v in theirs.kwargs.items() if k not in ("image", "generator")}
    assert _pngs(res, run.outcome) == _pngs(tmp_path / "ref", ref)  # a config reproduces the adapter


def test_instruct_pix2pix_from_config_runs(builder, tmp_path, monkeypatch):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    spy = spy_diffusion(monkeypatch, StableDiffusionInstructPix2PixPipeline)
    _two_samples(builder)
    out = run_job(job_config(builder.config(), tmp_path / "res", method=IP2P, metrics=PIXEL))
    assert out.counts == {"ok": 2, "skipped": 0, "failed": 0}, read_edits(out).reason.tolist()
    assert (read_edits(out).model_revision == "tiny-random-ip2p").all()
    mine = spy.calls()
    assert [c.kwargs["prompt"] for c in mine] == ["make it blue", "turn it green"]
    assert all(c.kwargs["image_guidance_scale"] == 1.5 and len(c.unet) == 2 for c in mine)  # 2 steps run
    spy.clear()
    ref = run_job(job_config(builder.config(), tmp_path / "ref", metrics=PIXEL,
                             method={"name": "instruct_pix2pix", **FAST}))
    # the same pipeline called with the same arguments: the same computation, the same bytes
    for a, b in zip(mine, spy.calls()):
        assert {k: v for k, v in a.kwargs.items() if k not in ("image", "generator")} == \
            {k: v for k, v in b.kwargs.items() if k not in ("image", "generator")}
        assert np.array_equal(np.asarray(a.kwargs["image"]), np.asarray(b.kwargs["image"]))
    assert _pngs(tmp_path / "res", out) == _pngs(tmp_path / "ref", ref)


def test_sample_lacking_a_mapped_field_is_skipped_naming_it(builder, tmp_path, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline

    spy = spy_diffusion(monkeypatch, StableDiffusionImg2ImgPipeline)
    builder.add_simple("ok")
    builder.add_simple("nocap", source_caption=None)
    builder.add_simple("blank", source_caption="  ")
    cfg = {**IMG2IMG, "inputs": {"image": "source", "prompt": "target_caption", "negative_prompt": "source_caption"}}
    out = run_job(job_config(builder.config(), tmp_path / "res", method=cfg, metrics=PIXEL))
    assert_skipped(out, {"nocap": "source_caption", "blank": "source_caption"})
    assert _method(cfg).requires == ("source", "target_caption", "source_caption")
    # the one edited sample: each mapped field reached its call argument
    (call,) = spy.calls()
    assert (call.kwargs["prompt"], call.kwargs["negative_prompt"]) == ("a blue thing", "a red thing")


def test_missing_weights_skip_naming_the_model(builder, tmp_path, empty_hub):
    _two_samples(builder)
    cfg = {**IMG2IMG, "backbone": "real", "model": "someone/not-cached-model"}
    out = run_job(job_config(builder.config(), tmp_path / "res", method=cfg, metrics=PIXEL))
    assert_missing_weights(out, "someone/not-cached-model")


# -- configuration errors ------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"pipeline": "diffusers.AutoencoderKL"}, r"'pipeline'.*not a subclass of diffusers\.DiffusionPipeline"),
    ({"pipeline": "collections.OrderedDict"}, r"'pipeline'.*not a subclass"),
    ({"pipeline": "diffusers.NoSuchPipeline"}, r"'pipeline'.*has no attribute 'NoSuchPipeline'"),
    ({"pipeline": "no_such_package.Pipe"}, r"'pipeline'.*cannot import module 'no_such_package'"),
    ({"pipeline": "StableDiffusionImg2ImgPipeline"}, r"'pipeline' must be an import path"),
    ({"pipeline": ""}, r"'pipeline'.*required"),
    ({"inputs": {"image": "source", "prompt": "caption"}}, r"'inputs'.*unknown sample field 'caption'"),
    ({"inputs": ["source", "target_caption"]}, r"'inputs' must be a mapping"),
    ({"inputs": None}, r"'inputs'.*required"),
    ({"call_args": "strength=0.8"}, r"'call_args' must be a mapping"),
    ({"call_args": {"num_inference_steps": 5}}, r"'call_args' must not set 'num_inference_steps'.*method parameter"),
    ({"call_args": {"generator": 1}}, r"'call_args' must not set 'generator'"),
    ({"call_args": {"strenght": 0.8}}, r"'call_args'.*\['strenght'\].*does not take"),
    ({"inputs": {"image": "source", "mask_image": "mask"}}, r"'inputs'.*\['mask_image'\].*does not take"),
    ({"output": "images[0]; import os"}, r"'output'"),
    ({"tiny_kind": "sd3"}, r"'tiny_kind'"),
])
def test_bad_configs_name_the_parameter(change, match):
    with pytest.raises(ParamError, match=match):
        _method({**IMG2IMG, **change})


def test_yaml_override_form_and_conversions():
    m = _method({**IMG2IMG, "inputs": {"image": "source", "prompt": "target_caption"}, "tiny_kind": "sd15"})
    assert m.tiny_kind == "sd15" and m.spec().tiny_kind == "sd15"
    assert m.label() == f"diffusers_pipeline {RANDOM_WEIGHTS_TAG}"
    assert _method(IP2P).tiny_kind == "ip2p"  # from the class name
    mask = np.zeros((40, 36), bool)
    mask[10:30, 5:20] = True
    pil = m._convert("mask", mask, (40, 36), (32, 32))
    assert pil.mode == "L" and pil.size == (32, 32) and set(np.unique(np.asarray(pil))) == {0, 255}
    pts = m._convert("source_points", np.array([[36.0, 40.0]]), (40, 36), (32, 32))
    assert np.allclose(pts, [[32.0, 32.0]])
    img = m._convert("source", np.zeros((40, 36, 3), np.uint8), (40, 36), (32, 32))
    assert img.mode == "RGB" and img.size == (32, 32)
    # outputs: PIL, float numpy and uint8 numpy all come back RGB uint8 at the source size
    for out in (Image.new("RGB", (32, 32)), np.zeros((1, 32, 32, 3), np.float32), np.zeros((32, 32, 3), np.uint8)):
        arr = m._to_rgb_u8(out, (40, 36))
        assert arr.shape == (40, 36, 3) and arr.dtype == np.uint8
    s = Sample(id="x", dataset="d", source=np.zeros((8, 8, 3), np.uint8), target_caption="   ")
    assert "target_caption" in m.check(s)
