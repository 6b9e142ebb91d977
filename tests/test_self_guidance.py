"""Self-Guidance (methods/self_guidance.py): CFG DDIM sampling plus the gradient of energies on the
object token's cross-attention properties. Tiny random-weight SD backbone (64 x 64 images), no
network.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import methods.self_guidance as sg  # registers self_guidance; the lead adds it to methods/__init__.py
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion import inversion as inv
from methods.diffusion.attention import attention_control

from .conftest import assert_missing_weights, assert_skipped, job_config, run_tiny_job, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
CLS = METHODS.get("self_guidance")
FAST = {"backbone": "tiny", "num_inference_steps": 3, "resolution": 64}
PIXEL_L1 = {"protocol": "test", "regions": ["all"], "items": {"l1": {}}}
CAPTION = "a red rocket on a pad"


def _method(**kw):
    return CLS(CLS.parse_params({**FAST, **kw}))


def _move_sample(**kw):
    rec = dict(id="s", dataset="t", source=textured(64, 64, seed=4), source_caption=CAPTION,
               source_points=np.array([[20.0, 20.0]]), target_points=np.array([[36.0, 28.0]]), point_layout="drag",
               meta={"object_prompt": "rocket"})
    rec.update(kw)
    return Sample(**rec)


@pytest.fixture(scope="module")
def pipe():
    m = _method()
    m.prepare()
    return m._loaded.pipeline


def test_defaults_and_the_yaml_mirror_every_param():
    conf = yaml.safe_load((REPO / "conf/method/self_guidance.yaml").read_text())
    assert conf.pop("name") == "self_guidance"
    fields = {f.name: (list(f.default) if isinstance(f.default, tuple) else f.default)
              for f in dataclasses.fields(CLS.Params)}
    assert conf == fields
    assert CLS.parse_params(conf) == CLS.Params()
    with pytest.raises(ValueError, match="attention_places"):
        _method(attention_places=["left"])
    with pytest.raises(ValueError, match="guidance_end"):
        _method(guidance_start=0.8, guidance_end=0.2)


# -- properties against hand computation ---------------------------------------------------------
def test_centroid_size_and_translation_of_a_synthetic_map():
    a = torch.zeros(1, 4, 8)
    a[0, 1, 2] = 1.0  # pixel centre ((2 + .5) / 8, (1 + .5) / 4)
    a[0, 3, 6] = 3.0  # ((6 + .5) / 8, (3 + .5) / 4)
    c = sg.centroid(a)[0].tolist()
    assert c == pytest.approx([(2.5 / 8 + 3 * 6.5 / 8) / 4, (1.5 / 4 + 3 * 3.5 / 4) / 4])
    assert float(sg.size(a)[0]) == pytest.approx(4.0 / 32)
    moved = sg.translate(a, (2 / 8, -1 / 4))  # two columns right, one row up: an exact pixel shift
    expect = torch.zeros(1, 4, 8)
    expect[0, 0, 4] = 1.0  # (1, 2) -> (0, 4); (3, 6) -> (2, 8) left the map
    assert torch.allclose(moved, expect, atol=1e-6)


def test_appearance_is_the_thresholded_attention_weighted_mean():
    a = torch.zeros(1, 2, 2)
    a[0, 0, 0] = 1.0
    feat = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)
    thr = torch.sigmoid(10 * (torch.tensor([[1.0, 0.0], [0.0, 0.0]]) - 0.5))
    expect = (feat[0] * thr).sum((1, 2)) / thr.sum()
    assert torch.allclose(sg.appearance(a, feat, 10.0)[0], expect)


def test_token_indices_find_the_word_in_the_caption(pipe):
    idx = sg.token_indices(pipe.tokenizer, CAPTION, "rocket")
    ids = pipe.tokenizer(CAPTION).input_ids
    word = pipe.tokenizer("rocket", add_special_tokens=False).input_ids
    assert idx and [ids[i] for i in idx] == word
    assert sg.token_indices(pipe.tokenizer, CAPTION, "giraffe") == []


# -- the sampler -----------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["noise", "inversion"])
def test_guidance_weight_zero_is_the_plain_sampler_exactly(pipe, init):
    m = _method(guidance_weight=0.0, init=init)
    task = m.task_for(_move_sample())
    z0 = inv.encode_image(pipe, textured(64, 64, seed=4))
    out = m.sample_latents(pipe, z0, CAPTION, task, torch.Generator().manual_seed(7))
    cond, null = inv.encode_prompt(pipe, CAPTION), inv.encode_prompt(pipe, "")
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))
    sched = inv.make_schedule(pipe.scheduler, 3)
    start = noise if init == "noise" else inv.ddim_invert(pipe.unet, sched, z0, cond, 3)[-1]
    plain = inv.ddim_sample(pipe.unet, sched, start, cond, 3, guidance_scale=7.5, uncond=null)
    assert torch.equal(out["latents"], plain)
    assert out["info"]["energy_first"] is None


def test_guidance_changes_the_sample(pipe):
    z0 = inv.encode_image(pipe, textured(64, 64, seed=4))
    outs = [_method(guidance_weight=w).sample_latents(pipe, z0, CAPTION, _method().task_for(_move_sample()),
                                                      torch.Generator().manual_seed(7))
            for w in (0.0, 1000.0)]
    assert float((outs[0]["latents"] - outs[1]["latents"]).abs().max()) > 1e-3
    assert outs[1]["info"]["energy_first"] > 0


@pytest.mark.parametrize("kind", ["move", "size", "appearance"])
def test_energy_gradient_matches_finite_differences(pipe, kind):
    """The autograd gradient of g(z_t) through the tiny UNet's attention (float64 copy) against
    central differences along a random direction: O(h^2) error, h = 1e-4, float64 rounding."""
    m = _method()
    sample = _move_sample(reference=textured(64, 64, seed=9)) if kind == "appearance" else _move_sample()
    task = dataclasses.replace(m.task_for(sample), kind=kind)
    unet = copy.deepcopy(pipe.unet).double()
    tokens = sg.token_indices(pipe.tokenizer, CAPTION, "rocket")
    others = [i for i in range(1, 6) if i not in tokens]  # a few other words' tokens: the layout term
    ctrl = sg.TokenAttention(tokens + others, ("up",))
    tap = {}
    block = unet.up_blocks[-2]
    hook = block.register_forward_hook(lambda mod, a, o: tap.__setitem__("feat", o))
    g = torch.Generator().manual_seed(3)
    cond = inv.encode_prompt(pipe, CAPTION).double()
    z_src, z_ref, z = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    grid, t = (4, 4), 501
    try:
        with attention_control(unet, ctrl), torch.no_grad():
            _, ms, fs = m.observe(unet, ctrl, tap, block, z_src, t, cond, grid)
            _, mr, fr = m.observe(unet, ctrl, tap, block, z_ref, t, cond, grid)
            n_obj = len(tokens)
            src, ref = m.properties(ms, fs, n_obj), m.properties(mr, fr, n_obj)

            def energy(x):
                _, mc, fc = m.observe(unet, ctrl, tap, block, x, t, cond, grid)
                return m.energy(m.properties(mc, fc, n_obj), src, task, ref)

            with torch.enable_grad():
                zg = z.clone().requires_grad_(True)
                grad, = torch.autograd.grad(energy(zg), zg)
            d = torch.randn(z.shape, generator=g, dtype=torch.float64)
            h = 1e-4
            fd = (energy(z + h * d) - energy(z - h * d)) / (2 * h)
    finally:
        hook.remove()
    analytic = float((grad * d).sum())
    assert abs(analytic) > 1e-6
    assert float(fd) == pytest.approx(analytic, rel=1e-4, abs=1e-8)


# -- the harness -----------------------------------------------------------------------------------
def test_move_and_appearance_through_the_harness(builder, tmp_path):
    ref = builder.image("images/ref.png", textured(40, 40, seed=8))
    common = dict(source_caption=CAPTION, meta={"object_prompt": "rocket"})
    builder.add_simple("move", h=48, w=64, category="move", seed=1, source_points=[[20, 20]],
                       target_points=[[34, 26]], point_layout="drag", **common)
    builder.add_simple("appearance", h=40, w=48, category="change_object", seed=2, reference=ref, **common)
    builder.add_simple("noword", h=40, w=48, source_points=[[5, 5]], target_points=[[9, 9]], point_layout="drag",
                       meta={})
    builder.add_simple("absent", h=40, w=48, source_points=[[5, 5]], target_points=[[9, 9]], point_layout="drag",
                       meta={"object_prompt": "giraffe"})
    method = {"name": "self_guidance", **FAST}
    cfg = job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1)
    assert_skipped(run_job({**cfg, "run_name": "skips"}), {"noword": "object_prompt", "absent": "giraffe"})
    builder.records = [r for r in builder.records if r["id"] in ("move", "appearance")]
    builder.write()
    run = run_tiny_job(cfg, "sd15", sizes={"move": (48, 64), "appearance": (40, 48)})
    mv, ap = run.info("move"), run.info("appearance")
    assert mv["task"] == "move" and ap["task"] == "appearance"
    assert mv["offset_xy"] == pytest.approx([14 / 64, 6 / 48])
    # per guided step: conditional (with gradient) + unconditional + noised source (+ noised reference)
    assert mv["network_calls"]["unet"] == 3 * 3 and ap["network_calls"]["unet"] == 4 * 3
    assert ap["network_calls"]["vae_encode"] == 2


def test_uncached_real_model_skips_every_sample(builder, tmp_path, empty_hub):
    for sid in ("a", "b"):
        builder.add_simple(sid, source_points=[[5, 5]], target_points=[[9, 9]], point_layout="drag",
                           meta={"object_prompt": "thing"})
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "self_guidance"}, metrics=PIXEL_L1)
    assert_missing_weights(run_job(cfg), "stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_reference_mask_can_stand_for_the_reference_attention(pipe):
    from .conftest import disc_mask

    sample = Sample(id="r", dataset="t", source=textured(64, 64, seed=4), source_caption=CAPTION,
                    reference=textured(64, 64, seed=9), reference_mask=disc_mask(64, 64, 20, 40, 12),
                    meta={"object_prompt": "rocket"})
    z0 = inv.encode_image(pipe, textured(64, 64, seed=4))
    zr = inv.encode_image(pipe, textured(64, 64, seed=9))
    outs = {}
    for region in ("attention", "mask"):
        m = _method(reference_region=region)
        task = m.task_for(sample)
        assert task.kind == "appearance"
        outs[region] = m.sample_latents(pipe, z0, CAPTION, task, torch.Generator().manual_seed(7), zr)
    assert float((outs["attention"]["latents"] - outs["mask"]["latents"]).abs().max()) > 1e-4
