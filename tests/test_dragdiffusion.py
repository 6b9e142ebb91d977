"""DragDiffusion (methods/dragdiffusion/): LoRA on the source, DDIM inversion to z_t, motion
supervision + point tracking on z_t, denoising with mutual self-attention. Tiny random-weight SD
backbone (64 x 64 images: 8 x 8 latents, 32 x 32 supervision grid), no network.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import methods.dragdiffusion  # noqa: F401  (registers dragdiffusion; the lead adds it to methods/__init__.py)
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion import inversion as inv
from methods.dragdiffusion import drag, lora

from .conftest import (assert_missing_weights, assert_skipped, disc_mask, job_config, run_tiny_job, textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
CLS = METHODS.get("dragdiffusion")
FAST = {"backbone": "tiny", "num_inference_steps": 4, "resolution": 64}
PIXEL_L1 = {"protocol": "test", "regions": ["all"], "items": {"l1": {}}}
# Two rows of one batched UNet call against a one-row call: float32 rounding (~1e-7 relative)
# through 3 tiny-UNet calls on latents of magnitude ~5 (as tests/test_fpe.py's ROWS).
ROWS = 5e-4


def _method(**kw):
    return CLS(CLS.parse_params({**FAST, **kw}))


def _sample(**kw):
    rec = dict(id="s", dataset="t", source=textured(64, 64, seed=4), source_caption="a thing",
               source_points=np.array([[20.0, 20.0]]), target_points=np.array([[40.0, 30.0]]), point_layout="drag",
               mask=disc_mask(64, 64, 25, 30, 15))
    rec.update(kw)
    return Sample(**rec)


@pytest.fixture(scope="module")
def tiny():
    m = _method()
    m.prepare()
    pipe = m._loaded.pipeline
    return pipe


def _run(pipe, m, sample=None, **kw):
    sample = sample or _sample()
    inputs = m.drag_inputs(sample, sample.source.shape[:2], (64, 64))
    from methods._diffusion_common import to_pil

    return m.run_drag(pipe, to_pil(sample.source, (64, 64)), "a thing", inputs,
                      torch.Generator().manual_seed(0), **kw)


# -- parameters ------------------------------------------------------------------------------------
def test_defaults_are_the_official_ones_and_the_yaml_mirrors_them():
    p = CLS.Params()
    assert (p.num_inference_steps, p.inversion_strength, p.guidance_scale, p.resolution) == (50, 0.7, 1.0, 512)
    assert (p.lora_steps, p.lora_lr, p.lora_batch_size, p.lora_rank) == (80, 5e-4, 4, 16)
    assert (p.n_pix_step, p.latent_lr, p.lam, p.r_m, p.r_p) == (80, 0.01, 0.1, 1, 3)
    assert (p.unet_feature_idx, p.sup_res_factor, p.start_step, p.start_layer) == ((3,), 0.5, 0, 10)
    assert CLS(p).inversion_steps() == 35  # round(0.7 * 50)
    conf = yaml.safe_load((REPO / "conf/method/dragdiffusion.yaml").read_text())
    assert conf.pop("name") == "dragdiffusion"
    fields = {f.name: (list(f.default) if isinstance(f.default, tuple) else f.default)
              for f in dataclasses.fields(CLS.Params)}
    assert conf == fields
    assert CLS.parse_params(conf) == CLS.Params()
    with pytest.raises(ValueError, match="inversion_strength"):
        _method(inversion_strength=0.0)
    with pytest.raises(ValueError, match="unet_feature_idx"):
        _method(unet_feature_idx=[])
    with pytest.raises(ValueError, match="guidance_scale"):
        _method(guidance_scale=7.5)


# -- the pieces ------------------------------------------------------------------------------------
def test_motion_supervision_is_zero_when_handles_are_on_their_targets():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 5, 16, 16, generator=g, requires_grad=True)
    pts = torch.tensor([[5.0, 6.0], [10.0, 3.0]])
    loss = drag.motion_supervision_loss(feat, pts, pts.clone(), r_m=1)
    assert float(loss.detach()) == 0.0
    near = pts + torch.tensor([[1.0, 1.0], [0.0, 1.5]])  # within 2: done, no term either
    assert float(drag.motion_supervision_loss(feat, pts, near, r_m=1).detach()) == 0.0
    far = pts + torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    loss = drag.motion_supervision_loss(feat, pts, far, r_m=1)
    # d = (0, 1): the patch moved one column right, by hand: 9 * mean |F[r, c+1] - F[r, c]|
    f = feat.detach()[0]
    expected = 9 * (f[:, 4:7, 6:9] - f[:, 4:7, 5:8]).abs().mean()  # around (5, 6): rows 4-6, cols 5-7
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert feat.grad is not None and float(feat.grad.abs().sum()) > 0


def test_shifted_patch_is_bilinear():
    feat = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    whole = drag.shifted_patch(feat, 2, 5, 3, 6, torch.tensor(1.0), torch.tensor(-1.0))
    assert torch.equal(whole, feat[:, :, 3:6, 2:5])
    half = drag.shifted_patch(feat, 2, 5, 3, 6, torch.tensor(0.5), torch.tensor(0.25))
    hand = (0.5 * 0.75 * feat[:, :, 2:5, 3:6] + 0.5 * 0.75 * feat[:, :, 3:6, 3:6]
            + 0.5 * 0.25 * feat[:, :, 2:5, 4:7] + 0.5 * 0.25 * feat[:, :, 3:6, 4:7])
    assert torch.allclose(half, hand, atol=1e-4)


def test_point_tracking_finds_the_moved_feature():
    g = torch.Generator().manual_seed(1)
    f0 = torch.randn(1, 8, 16, 16, generator=g)
    f1 = torch.randn(1, 8, 16, 16, generator=g)
    f1[:, :, 7, 6] = f0[:, :, 5, 5]  # the handle's feature moved by (2, 1)
    init = torch.tensor([[5.0, 5.0]])
    assert drag.point_tracking(f0, f1, init.clone(), init, r_p=3).tolist() == [[7.0, 6.0]]
    # from the current position (6, 5), searching the neighbourhood of that
    assert drag.point_tracking(f0, f1, torch.tensor([[6.0, 5.0]]), init, r_p=1).tolist() == [[7.0, 6.0]]
    f1[:, :, 7, 6] = torch.randn(8, generator=g)
    f1[:, :, 13, 13] = f0[:, :, 5, 5]  # out of the r_p = 3 window: not found there
    assert drag.point_tracking(f0, f1, init.clone(), init, r_p=3).tolist() != [[13.0, 13.0]]


def test_lora_with_zero_steps_leaves_the_unet_bit_identical_and_is_removed(tiny):
    unet = tiny.unet
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        before = unet(x, 501, encoder_hidden_states=emb).sample
    with lora.attached_lora(unet, 4) as params:
        assert params and all(p.requires_grad for p in params)
        with torch.no_grad():
            attached = unet(x, 501, encoder_hidden_states=emb).sample
        assert torch.equal(attached, before)  # the up matrices start at zero
        with torch.no_grad():
            for p in params:
                p.add_(0.05)
            moved = unet(x, 501, encoder_hidden_states=emb).sample
        assert float((moved - before).abs().max()) > 1e-3
    assert not any("lora" in n for n, _ in unet.named_parameters())
    assert not any(p.requires_grad for p in unet.parameters())
    with torch.no_grad():
        assert torch.equal(unet(x, 501, encoder_hidden_states=emb).sample, before)


def test_lora_training_is_counted_apart_and_removed_after_the_edit(tiny):
    m = _method(n_pix_step=0, mutual_self_attention=False)
    out = m.edit(_sample(), 0)
    nc, nr = out.info["network_calls"], out.info["network_rows"]
    assert (nc["unet_lora_train"], nr["unet_lora_train"]) == (2, 2 * 2)  # 2 steps of batch 2
    # 3 inversion + 3 denoising calls (2 rows)
    assert (nc["unet"], nr["unet"]) == (6, 3 + 6)
    assert out.info["lora_stage"]["steps"] == 2 and not any("lora" in n for n, _ in tiny.unet.named_parameters())


# -- the whole method ------------------------------------------------------------------------------
def test_without_lora_optimisation_and_control_it_is_ddim_inversion_and_sampling(tiny):
    pipe = tiny
    m = _method(lora_steps=0, n_pix_step=0, mutual_self_attention=False)
    out = _run(pipe, m)
    n, k = 4, 3
    assert out["info"]["inversion_steps"] == k and out["info"]["drag_steps"] == 0
    text = inv.encode_prompt(pipe, "a thing")
    sched = inv.make_schedule(pipe.scheduler, n)
    traj = inv.ddim_invert(pipe.unet, sched, out["z0"], text, n)
    # the partial inversion is the first k steps of the full one (same calls, same arithmetic)
    assert torch.equal(out["z_t"], traj[k])
    assert torch.equal(out["z_t_optimised"], out["z_t"])
    plain = inv.ddim_sample(pipe.unet, sched, traj[k], text, n, start_step=n - k)
    assert float((out["edit"] - plain).abs().max()) < ROWS
    assert float((out["source"] - plain).abs().max()) < ROWS
    # reconstruction to the inversion's own error
    own = float((plain - out["z0"]).abs().mean())
    assert abs(float((out["edit"] - out["z0"]).abs().mean()) - own) < ROWS


def test_optimisation_moves_the_latent_and_mutual_attention_changes_only_the_edit(tiny):
    pipe = tiny
    out = _run(pipe, _method(lora_steps=0, n_pix_step=2, mutual_self_attention=True))
    assert out["info"]["drag_steps"] == 2 and out["info"]["mask_term"] is True
    assert float((out["z_t_optimised"] - out["z_t"]).abs().max()) > 1e-4
    ref = _run(pipe, _method(lora_steps=0, n_pix_step=0, mutual_self_attention=False))
    # the original branch attends to itself either way
    assert float((out["source"] - ref["source"]).abs().max()) < ROWS
    assert float((out["edit"] - ref["edit"]).abs().max()) > 1e-3


def test_handles_on_their_targets_stop_the_optimisation_at_once(tiny):
    pts = np.array([[20.0, 20.0]])
    out = _run(tiny, _method(lora_steps=0, n_pix_step=3), _sample(target_points=pts.copy(), source_points=pts))
    assert out["info"]["drag_steps"] == 0 and out["info"]["handles_reached"] is True
    assert torch.equal(out["z_t_optimised"], out["z_t"])


def test_points_map_to_the_supervision_grid_as_run_drag():
    m = _method()
    s = _sample(source=textured(48, 96, 1), source_points=np.array([[48.0, 12.0]]),
                target_points=np.array([[95.0, 47.0]]), mask=None)
    got = m.drag_inputs(s, (48, 96), (64, 64))
    assert got["sup_hw"] == (32, 32) and got["mask"] is None
    # row = y / H * 32, col = x / W * 32, rounded (clipped into the grid)
    assert got["handles"].tolist() == [[8.0, 16.0]] and got["targets"].tolist() == [[31.0, 31.0]]


# -- the harness -----------------------------------------------------------------------------------
def _face_points():
    rng = np.random.default_rng(0)
    src = np.stack([rng.uniform(12, 36, 68), rng.uniform(10, 30, 68)], 1)
    return src.round(1).tolist(), (src + [3.0, 0.0]).round(1).tolist()


def test_drag_and_face_samples_through_the_harness(builder, tmp_path):
    fs, ft = _face_points()
    builder.add_simple("drag", h=48, w=64, category="move", seed=1, source_points=[[20, 20]],
                       target_points=[[34, 26]], point_layout="drag")
    builder.add_simple("face", h=40, w=48, category="face_drag", seed=2, source_points=fs, target_points=ft,
                       point_layout="dlib68")
    builder.add_simple("nopoints", h=40, w=48)
    method = {"name": "dragdiffusion", "backbone": "tiny", "num_inference_steps": 4, "resolution": 64}
    cfg = job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1)
    assert_skipped(run_job({**cfg, "run_name": "skip"}), {"nopoints": "source_points"})
    builder.records = [r for r in builder.records if r["id"] != "nopoints"]
    builder.write()
    run = run_tiny_job(cfg, "sd15", sizes={"drag": (48, 64), "face": (40, 48)})
    for sid in ("drag", "face"):
        info = run.info(sid)
        assert info["network_calls"]["unet_lora_train"] == 2 and info["inversion_steps"] == 3
        assert info["network_calls"]["unet"] == 3 + 1 + info["drag_steps"] + 3
        assert info["prompt"] == "a red thing" and len(info["handles_final"]) == (1 if sid == "drag" else 68)
    assert run.edits.loc["drag", "prep_seconds"] > 0 and run.edits.loc["drag", "infer_seconds"] > 0


def test_uncached_real_model_skips_every_sample(builder, tmp_path, empty_hub):
    for sid in ("a", "b"):
        builder.add_simple(sid, source_points=[[5, 5]], target_points=[[9, 9]], point_layout="drag")
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "dragdiffusion"}, metrics=PIXEL_L1)
    assert_missing_weights(run_job(cfg), "stable-diffusion-v1-5/stable-diffusion-v1-5")
