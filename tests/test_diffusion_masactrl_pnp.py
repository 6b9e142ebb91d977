"""MasaCtrl and Plug-and-Play (DDIM inversion + attention / feature injection) on the tiny SD 1.5
backbone: their invariants against plain DDIM sampling, and both adapters through the whole
harness. Everything runs on random-weight tiny models (methods/diffusion/tiny.py): no network,
no real weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import methods.masactrl  # noqa: F401  (registers masactrl)
import methods.plug_and_play  # noqa: F401  (registers plug_and_play)
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job

from .conftest import (PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config, run_tiny_job,
                       textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 32}
# Fast parameters that keep the injections active on the tiny UNet (7 self-attention layers,
# 6 decoder layers): MasaCtrl from step 1 and layer 3; PnP inverts with as many steps as it samples.
EXTRA = {"masactrl": {"start_step": 1, "start_layer": 3}, "plug_and_play": {"inversion_steps": 2}}
PNP_NEG = "ugly, blurry, black, low res, unrealistic"
ROOT = Path(__file__).resolve().parents[1]


def _method(name: str, **extra) -> dict:
    return {"name": name, **FAST, **EXTRA[name], **extra}


def _make(name: str, **params):
    cls = METHODS.get(name)
    return cls(cls.parse_params({**FAST, **EXTRA[name], **params}))


# Two rows of one batched UNet call with the same inputs: the GEMM / convolution kernels may block
# a batch's rows differently (bit-equal with AVX2 kernels; P2P's rows were 3.5e-5 apart with AVX-512
# ones); float32 rounding (~1e-7 relative) through 2 tiny-UNet calls, amplified ~16x by CFG 7.5, on
# latents of magnitude ~5: ~1e-4 at most. A branch fed the wrong row moves by >= 1e-2.
ROWS = 5e-4


def _close(a, b, tol=1e-3) -> bool:
    """Equal up to float rounding on latents of magnitude ~5; the default 1e-3 is for batched (several
    branches and CFG halves in one UNet call) vs separate UNet calls: as ROWS, with the batched
    and the separate kernels rounding differently."""
    return float((a - b).abs().max()) <= tol


@pytest.fixture(scope="module")
def tiny():
    """The shared tiny SD 1.5 pipeline and the 16 x 16 latent of a 128 x 128 textured image (the
    tiny VAE downsamples by 8, as SD's)."""
    from methods.diffusion.inversion import encode_image
    from methods.diffusion.loading import load_pipeline

    m = _make("masactrl")
    pipe = load_pipeline(m.pipeline_class(), m.spec()).pipeline
    return pipe, encode_image(pipe, textured(128, 128, seed=3))


def _emb(pipe, z0, *prompts):
    from methods.masactrl import text_embeddings

    return text_embeddings(pipe, list(prompts), z0).chunk(len(prompts))


# -- parameters ---------------------------------------------------------------------------------
def test_params_defaults_yaml_and_validation():
    mc = METHODS.get("masactrl").Params()
    assert (mc.start_step, mc.start_layer, mc.num_inference_steps, mc.guidance_scale) == (4, 10, 50, 7.5)
    assert (mc.inversion_guidance_scale, mc.source_prompt, mc.resolution) == (7.5, "source_caption", 512)
    assert mc.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    pnp = METHODS.get("plug_and_play").Params()
    assert (pnp.num_inference_steps, pnp.guidance_scale, pnp.pnp_f_t, pnp.pnp_attn_t) == (50, 7.5, 0.8, 0.5)
    assert (pnp.negative_prompt, pnp.inversion_steps, pnp.feature_layer, pnp.attn_start_layer) == (PNP_NEG, 999, 4, 4)
    assert (pnp.source_prompt, pnp.source_branch, pnp.model) == ("empty", "inversion", mc.model)
    for name in ("masactrl", "plug_and_play"):  # the YAML mirrors every field with its default
        conf = yaml.safe_load((ROOT / "conf" / "method" / f"{name}.yaml").read_text())
        assert conf.pop("name") == name
        cls = METHODS.get(name)
        # "auto" fields stay "auto" in both; they resolve alike when parsed
        assert conf == {f.name: f.default for f in dataclasses.fields(cls.Params)}
        assert cls.parse_params(conf) == cls.Params()
    for name, bad, match in [
        ("masactrl", {"start_step": -1}, "start_step"),
        ("masactrl", {"start_layer": 2.5}, "start_layer"),
        ("masactrl", {"inversion_guidance_scale": -1.0}, "inversion_guidance_scale"),
        ("masactrl", {"source_prompt": "target"}, "source_prompt"),
        ("masactrl", {"resolution": 30}, "resolution"),
        ("plug_and_play", {"pnp_f_t": 1.5}, "pnp_f_t"),
        ("plug_and_play", {"pnp_attn_t": -0.1}, "pnp_attn_t"),
        ("plug_and_play", {"inversion_steps": 0}, "inversion_steps"),
        ("plug_and_play", {"feature_layer": -1}, "feature_layer"),
        ("plug_and_play", {"attn_start_layer": -2}, "attn_start_layer"),
        ("plug_and_play", {"source_branch": "both"}, "source_branch"),
        ("plug_and_play", {"source_prompt": "caption"}, "source_prompt"),
        ("plug_and_play", {"negative_prompt": 3}, "negative_prompt"),
    ]:
        with pytest.raises(ParamError, match=match):
            METHODS.get(name).parse_params(bad)


# -- MasaCtrl invariants ------------------------------------------------------------------------
def test_masactrl_without_control_is_plain_ddim_from_the_inversion(tiny):
    from methods.diffusion.inversion import ddim_invert, ddim_sample, make_schedule

    pipe, z0 = tiny
    m = _make("masactrl", start_step=2, start_layer=0)  # start_step >= steps: control never active
    out = m.run_edit(pipe, z0, "a red thing", "a blue thing")
    sched = make_schedule(pipe.scheduler, 2)
    null, src, tgt = _emb(pipe, z0, "", "a red thing", "a blue thing")
    # the inversion: source prompt, CFG 7.5 against "" (MasaCtrlPipeline.invert)
    z_T = ddim_invert(pipe.unet, sched, z0, src, 2, guidance_scale=7.5, uncond=null)[-1]
    assert _close(out["z_T"], z_T, 1e-5)  # the same ddim_invert call: equal but for rounding
    assert _close(out["edit"], ddim_sample(pipe.unet, sched, z_T, tgt, 2, 7.5, null))
    assert _close(out["source"], ddim_sample(pipe.unet, sched, z_T, src, 2, 7.5, null))


def test_masactrl_same_prompt_reconstructs_and_control_edits(tiny):
    from methods.diffusion.inversion import ddim_sample, make_schedule

    pipe, z0 = tiny
    m = _make("masactrl", start_step=0, start_layer=0)  # control at every step and layer
    same = m.run_edit(pipe, z0, "a red thing", "a red thing")
    assert _close(same["edit"], same["source"], ROWS)  # target branch == source branch (rows of one batch)
    null, src = _emb(pipe, z0, "", "a red thing")
    recon = ddim_sample(pipe.unet, make_schedule(pipe.scheduler, 2), same["z_T"], src, 2, 7.5, null)
    assert _close(same["source"], recon)
    # With different prompts the control changes the target branch, never the source branch.
    ctrl = m.run_edit(pipe, z0, "a red thing", "a blue thing")
    free = m.run_edit(pipe, z0, "a red thing", "a blue thing", start_step=2)
    assert float((ctrl["edit"] - free["edit"]).abs().max()) > 1e-2
    # the source row gets the same inputs, shapes and kernels in both runs (equal bit for bit here)
    assert _close(ctrl["source"], free["source"], 1e-6)


# -- Plug-and-Play invariants -------------------------------------------------------------------
def test_pnp_without_injection_is_guided_ddim_from_the_inversion(tiny):
    from methods.diffusion.inversion import ddim_invert, ddim_sample, make_schedule

    pipe, z0 = tiny
    m = _make("plug_and_play", pnp_f_t=0.0, pnp_attn_t=0.0)
    out = m.run_edit(pipe, z0, "", "a blue thing")
    assert (out["info"]["feature_injection_steps"], out["info"]["attention_injection_steps"]) == (0, 0)
    sched = make_schedule(pipe.scheduler, 2)
    empty, neg, tgt = _emb(pipe, z0, "", PNP_NEG, "a blue thing")
    traj = ddim_invert(pipe.unet, sched, z0, empty, 2)  # unguided, prompt "" (preprocess.py)
    # the same ddim_invert call (equal but for rounding); the source branch is z_0 itself
    assert _close(out["z_start"], traj[-1], 1e-5) and _close(out["source"], z0, 0.0)
    assert _close(out["edit"], ddim_sample(pipe.unet, sched, traj[-1], tgt, 2, 7.5, neg))


def test_pnp_same_prompt_equals_source_reconstruction(tiny):
    from methods.diffusion.inversion import ddim_sample, make_schedule

    pipe, z0 = tiny
    m = _make("plug_and_play", source_branch="reconstruction", source_prompt="source_caption",
              guidance_scale=1.0, pnp_f_t=1.0, pnp_attn_t=1.0)
    out = m.run_edit(pipe, z0, "a red thing", "a red thing")
    assert _close(out["edit"], out["source"], ROWS)  # rows of one batched call
    (src,) = _emb(pipe, z0, "a red thing")
    assert _close(out["source"], ddim_sample(pipe.unet, make_schedule(pipe.scheduler, 2), out["z_start"], src, 2))


def test_pnp_each_injection_acts_and_is_removed(tiny):
    from methods.diffusion.attention import EditingAttnProcessor

    pipe, z0 = tiny
    procs = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    base = _make("plug_and_play", pnp_f_t=0.0, pnp_attn_t=0.0).run_edit(pipe, z0, "", "a blue thing")["edit"]
    feat = _make("plug_and_play", pnp_f_t=1.0, pnp_attn_t=0.0).run_edit(pipe, z0, "", "a blue thing")
    attn = _make("plug_and_play", pnp_f_t=0.0, pnp_attn_t=1.0).run_edit(pipe, z0, "", "a blue thing")
    assert float((feat["edit"] - base).abs().max()) > 1e-2
    assert float((attn["edit"] - base).abs().max()) > 1e-2
    # tiny UNet: 3 up blocks x 2 layers; decoder layer 4 = up_blocks[2] (up_blocks[0] has no attention)
    assert feat["info"]["feature_module"] == "up_blocks.2.resnets.0.conv2"
    assert attn["info"]["attention_layers"] == ["up_blocks.2.attentions.0", "up_blocks.2.attentions.1"]
    # the shared pipeline is left as it was: no hook, the original attention processors
    assert not pipe.unet.up_blocks[2].resnets[0].conv2._forward_hooks
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == procs
    assert not any(isinstance(v, EditingAttnProcessor) for v in pipe.unet.attn_processors.values())


def test_pnp_finer_inversion_schedule(tiny):
    from methods.diffusion.inversion import ddim_invert, make_schedule

    pipe, z0 = tiny
    # 4 inversion steps (timesteps 1, 251, 501, 751) hold the 2 sampling timesteps (501, 1)
    out = _make("plug_and_play", inversion_steps=4).run_edit(pipe, z0, "", "a blue thing")
    (empty,) = _emb(pipe, z0, "")
    traj = ddim_invert(pipe.unet, make_schedule(pipe.scheduler, 4), z0, empty, 4)
    assert _close(out["z_start"], traj[3], 1e-5)  # the latent at timestep 501
    with pytest.raises(ValueError, match="inversion_steps"):  # 3 sampling steps: 667, 334 missing
        _make("plug_and_play", inversion_steps=2, num_inference_steps=3).run_edit(pipe, z0, "", "x")
    with pytest.raises(ValueError, match="inversion_steps"):  # timestep 1000 does not exist
        _make("plug_and_play", inversion_steps=1000).run_edit(pipe, z0, "", "x")


# -- the whole harness --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["masactrl", "plug_and_play"])
def test_tiny_edit_cached_scored_and_labelled(name, builder, tmp_path):
    add_two_samples(builder, b={"source_caption": None})
    run = run_tiny_job(job_config(builder.config(), tmp_path / "res", method=_method(name), metrics=PIXEL_L1), "sd15")
    for sid, (_, info) in run.records.items():
        assert info["prompt"] == "a blue thing"
        if name == "masactrl":
            # source_caption when present, "" otherwise (a missing caption is not a skip)
            assert info["source_prompt_text"] == ("a red thing" if sid == "a" else "")
            assert (info["start_step"], info["start_layer"], info["inversion_guidance_scale"]) == (1, 3, 7.5)
        else:
            assert info["source_prompt_text"] == ""  # source_prompt=empty, as pnp-diffusers
            assert (info["pnp_f_t"], info["pnp_attn_t"], info["inversion_steps"]) == (0.8, 0.5, 2)
            assert (info["feature_injection_steps"], info["attention_injection_steps"]) == (1, 1)
            assert info["negative_prompt"] == PNP_NEG and info["source_branch"] == "inversion"


@pytest.mark.parametrize("name", ["masactrl", "plug_and_play"])
def test_sample_without_target_caption_is_skipped(name, builder, tmp_path):
    builder.add_simple("ok")
    builder.add_simple("nofield", target_caption=None)
    builder.add_simple("blank", target_caption="   ")
    out = run_job(job_config(builder.config(), tmp_path / "res", method=_method(name), metrics=PIXEL_L1))
    assert_skipped(out, {"nofield": "target_caption", "blank": "target_caption"})


@pytest.mark.parametrize("name", ["masactrl", "plug_and_play"])
def test_uncached_real_model_skips_every_sample(name, builder, tmp_path, empty_hub):
    builder.add_simple("a")
    builder.add_simple("b", seed=2)
    model = METHODS.get(name).Params().model
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": name, "num_inference_steps": 2},
                             metrics=PIXEL_L1))
    assert_missing_weights(out, model)
