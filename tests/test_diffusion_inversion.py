"""Tests of methods.diffusion.inversion: DDIM, null-text and edit-friendly DDPM inversion.

Everything runs on the tiny random-weight SD 1.5-like components of methods.diffusion.tiny
(8x8 latents, 3-5 steps), plus an analytic "eps does not depend on x" model for which DDIM
inversion is exact, so the inversion convention itself is checked to float precision.
"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

from methods.diffusion import inversion as inv
from methods.diffusion.tiny import tiny_sd15

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def parts() -> dict:
    return tiny_sd15()


@pytest.fixture(scope="module")
def pipe(parts) -> types.SimpleNamespace:
    """The SD-like attributes the helpers read (tokenizer, text_encoder, vae)."""
    return types.SimpleNamespace(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"])


@pytest.fixture(scope="module")
def embs(pipe) -> tuple:
    return inv.encode_prompt(pipe, "a photo of a cat"), inv.encode_prompt(pipe, "")


def _z0(seed: int = 0) -> "torch.Tensor":
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# One scheduler step computed by diffusers vs by inversion.py from the same inputs: the library
# computes the coefficients in float32 tensors, inversion.py in double and applies them to float32
# latents, so they differ by a few float32 ulp of the step's terms (|sigma z| up to ~10 at the
# small-sigma last step): <= 1.5e-6 measured. The wrong means and sigmas tried (sigma without its
# square root, the mean without -sigma^2, beta_t as the variance) move steps by >= ~1e-2 and fail.
STEP_TOL = 1e-5
# A whole chain of 5 such steps: those ulp go through up to 5 UNet calls, amplified ~16x by CFG 7.5
# (measured <= 4e-5 on latents of magnitude ~3).
CHAIN_TOL = 2e-4


def _eps(unet, x, t, cond, uncond, guidance):
    """The classifier-free-guided noise prediction, written here: two UNet calls."""
    with torch.no_grad():
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        if guidance == 1.0:
            return eps_c
        eps_u = unet(x, t, encoder_hidden_states=uncond).sample
    return eps_u + guidance * (eps_c - eps_u)


def _config(parts, **over) -> dict:
    """The tiny SD 1.5 scheduler config with overrides. ``_use_default_values`` is dropped: from_config
    would otherwise replace the keys it lists (timestep_spacing among them) by the class defaults."""
    cfg = {k: v for k, v in parts["scheduler"].config.items() if k != "_use_default_values"}
    return {**cfg, **over}


class _XFreeUNet:
    """eps(x, t, emb) that does not depend on x: DDIM inversion with the P2P convention
    (eps evaluated at the *target* timestep's label) is then exactly invertible."""

    def __init__(self) -> None:
        self.pattern = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))

    def __call__(self, x, t, encoder_hidden_states):
        eps = torch.sin(torch.tensor(float(t)) / 97.0) * self.pattern + encoder_hidden_states.mean()
        return types.SimpleNamespace(sample=eps.expand_as(x))


# ------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------
def test_schedule_matches_diffusers_ddim(parts):
    s = inv.make_schedule(parts["scheduler"], 5)
    assert s.timesteps == (801, 601, 401, 201, 1)  # SD 1.5: leading spacing, steps_offset=1
    assert s.stride == 200
    assert s.alpha(-199) == pytest.approx(float(parts["scheduler"].alphas_cumprod[0]))  # set_alpha_to_one=False
    # the deterministic DDIM move agrees with DDIMScheduler.step(eta=0)
    from diffusers import DDIMScheduler

    d = DDIMScheduler.from_config(parts["scheduler"].config)
    d.set_timesteps(5)
    x, eps = _z0(1), _z0(2)
    ref = d.step(eps, 601, x, eta=0.0).prev_sample
    ours = inv.ddim_move(x, eps, s.alpha(601), s.alpha(401))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        inv.make_schedule(parts["scheduler"], 0)


# ------------------------------------------------------------------------------------------
# (a) DDIM inversion
# ------------------------------------------------------------------------------------------
def test_ddim_invert_exact_for_x_independent_model(embs):
    """The convention (eps at the current latent with the next timestep's label) is exactly
    undone by DDIM sampling when eps does not depend on x -- also under CFG."""
    cond, uncond = embs
    unet = _XFreeUNet()
    z0 = _z0()
    cfg = tiny_sd15()["scheduler"].config
    for g in (1.0, 7.5):
        traj = inv.ddim_invert(unet, cfg, z0, cond, 6, guidance_scale=g, uncond=uncond)
        assert len(traj) == 7 and traj[0] is not None and torch.equal(traj[0], z0)
        rec = inv.ddim_sample(unet, cfg, traj[-1], cond, 6, guidance_scale=g, uncond=uncond)
        torch.testing.assert_close(rec, z0, atol=1e-4, rtol=1e-4)
        # start_step: sampling from an intermediate latent of the trajectory
        rec2 = inv.ddim_sample(unet, cfg, traj[6 - 2], cond, 6, guidance_scale=g, uncond=uncond, start_step=2)
        torch.testing.assert_close(rec2, z0, atol=1e-4, rtol=1e-4)


# SD 1.5's schedule, and trailing spacing with set_alpha_to_one (the inverse scheduler's
# initial_alpha_cumprod and the forward one's final_alpha_cumprod then both 1.0)
INVERSE_CONFIGS = [{}, {"timestep_spacing": "trailing", "set_alpha_to_one": True}]


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("over", INVERSE_CONFIGS, ids=["leading", "trailing"])
def test_ddim_invert_equals_diffusers_inverse_scheduler(parts, embs, guidance, over):
    """ddim_invert is diffusers' DDIMInverseScheduler loop (``for t in timesteps: eps = unet(z, t);
    z = step(eps, t, z)``, as StableDiffusionDiffEditPipeline.invert runs it) on the same config. The
    conventions agree: the inverse scheduler's timesteps are the forward ones reversed, and its step
    at label ``t`` goes from ``a[t - stride]`` (``initial_alpha_cumprod`` below 0, which equals the
    forward scheduler's ``final_alpha_cumprod``: alphas_cumprod[0], or 1 with set_alpha_to_one)
    to ``a[t]`` with eps evaluated at the current latent and label ``t``."""
    cond, uncond = embs
    unet, n = parts["unet"], 5
    cfg = _config(parts, **over)
    traj = inv.ddim_invert(unet, cfg, _z0(), cond, n, guidance_scale=guidance, uncond=uncond)
    lib = DDIMInverseScheduler.from_config(cfg)
    lib.set_timesteps(n)
    assert lib.timesteps.tolist() == list(reversed(inv.make_schedule(cfg, n).timesteps))
    assert len(traj) == n + 1
    z = traj[0]
    for k, t in enumerate(lib.timesteps):
        # one step from our latent: the step arithmetic alone
        step = lib.step(_eps(unet, traj[k], t, cond, uncond, guidance), t, traj[k]).prev_sample
        torch.testing.assert_close(step, traj[k + 1], atol=STEP_TOL, rtol=0, msg=f"step {k} (t={int(t)})")
        # the library's own chain
        z = lib.step(_eps(unet, z, t, cond, uncond, guidance), t, z).prev_sample
    torch.testing.assert_close(z, traj[-1], atol=CHAIN_TOL, rtol=0)


def test_ddim_invert_then_sample_reconstructs_tiny_unet(parts, embs):
    """Tiny random UNet (far from the linear regime): the reconstruction error of its own
    inversion is well below the error of sampling from another latent's inverted noise."""
    cond, _ = embs
    unet, sched = parts["unet"], parts["scheduler"]
    z0 = _z0()
    traj = inv.ddim_invert(unet, sched, z0, cond, 5)
    assert len(traj) == 6 and all(z.shape == z0.shape for z in traj)
    rec = inv.ddim_sample(unet, sched, traj[-1], cond, 5)
    err = _rel(rec, z0)
    other = inv.ddim_invert(unet, sched, _z0(5), cond, 5)[-1]
    baseline = _rel(inv.ddim_sample(unet, sched, other, cond, 5), z0)
    print(f"DDIM g=1 relative reconstruction error {err:.3f} (other latent's noise: {baseline:.3f})")
    assert err < 0.6 * baseline


# ------------------------------------------------------------------------------------------
# (b) null-text inversion
# ------------------------------------------------------------------------------------------
def test_null_text_beats_plain_ddim_at_guidance_7_5(parts, embs):
    """The issue's invariant: with CFG 7.5, sampling from the DDIM-inverted z_T with the
    null-text-optimised per-step embeddings reconstructs z_0 better than with the plain
    unconditional embedding."""
    cond, uncond = embs
    unet, sched = parts["unet"], parts["scheduler"]
    z0, n = _z0(), 5
    params_before = [p.detach().clone() for p in unet.parameters()]
    zT, per_step, pivot = inv.null_text_invert(unet, sched, z0, cond, uncond, n, guidance_scale=7.5,
                                               inner_steps=10, lr=0.1)
    plain_traj = inv.ddim_invert(unet, sched, z0, cond, n)
    assert len(pivot) == n + 1 and torch.equal(zT, pivot[-1])
    torch.testing.assert_close(pivot[-1], plain_traj[-1])
    assert len(per_step) == n and all(u.shape == uncond.shape and not u.requires_grad for u in per_step)
    assert all(torch.equal(a, b) for a, b in zip(params_before, unet.parameters()))

    err_plain = _rel(inv.ddim_sample(unet, sched, zT, cond, n, 7.5, uncond), z0)
    err_null = _rel(inv.ddim_sample(unet, sched, zT, cond, n, 7.5, uncond_per_step=per_step), z0)
    print(f"CFG 7.5 relative reconstruction error: plain DDIM {err_plain:.3f}, null-text {err_null:.3f}")
    assert err_null < 0.5 * err_plain

    # the reference's defaults (lr 1e-2, 10 inner steps) also improve, if less on this model
    _, per_step_d, _ = inv.null_text_invert(unet, sched, z0, cond, uncond, n)
    err_default = _rel(inv.ddim_sample(unet, sched, zT, cond, n, 7.5, uncond_per_step=per_step_d), z0)
    print(f"null-text with default lr 1e-2: {err_default:.3f}")
    assert err_default < 0.9 * err_plain


def test_ddim_sample_argument_checks(parts, embs):
    cond, uncond = embs
    z = _z0()
    with pytest.raises(ValueError):
        inv.ddim_sample(parts["unet"], parts["scheduler"], z, cond, 3, 7.5, uncond_per_step=[uncond])
    with pytest.raises(ValueError):  # guidance without an unconditional embedding
        inv.ddim_sample(parts["unet"], parts["scheduler"], z, cond, 3, 7.5)


# ------------------------------------------------------------------------------------------
# (c) edit-friendly DDPM inversion
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_ddpm_edit_friendly_reconstructs_exactly(parts, embs, guidance):
    cond, uncond = embs
    unet, sched = parts["unet"], parts["scheduler"]
    z0, n = _z0(), 5
    g = torch.Generator().manual_seed(3)
    xT, zs, xts = inv.ddpm_edit_friendly_invert(unet, sched, z0, cond, n, eta=1.0, guidance_scale=guidance,
                                                uncond=uncond, generator=g, return_xts=True)
    assert len(zs) == n and len(xts) == n and torch.equal(xts[0], xT)
    rec = inv.ddpm_sample_with_noise(unet, sched, xT, zs, cond, guidance, uncond)
    err = float((rec - z0).abs().max())
    print(f"edit-friendly DDPM (g={guidance}) max abs reconstruction error {err:.2e}")
    torch.testing.assert_close(rec, z0, atol=1e-4, rtol=0)
    # skip: start from an intermediate x_t with the remaining noise maps
    rec_skip = inv.ddpm_sample_with_noise(unet, sched, xts[2], zs, cond, guidance, uncond, skip=2)
    torch.testing.assert_close(rec_skip, z0, atol=1e-4, rtol=0)
    # the noise maps carry the image: sampling with fresh noise does not reconstruct
    fresh = [torch.randn(z.shape, generator=torch.Generator().manual_seed(10 + i)) for i, z in enumerate(zs)]
    assert _rel(inv.ddpm_sample_with_noise(unet, sched, xT, fresh, cond, guidance, uncond), z0) > 0.05


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_ddpm_edit_friendly_steps_are_diffusers_ddim_eta_1_and_the_ddpm_posterior(parts, embs, guidance):
    """The noise maps are those of diffusers' samplers, computed independently by the library:

    - DDIMScheduler.step(eps, t, x_t, eta=1, variance_noise=zs[i]) -- the sampler of
      inbarhub/DDPM_inversion -- takes every x_t of the inversion to the next one (x_0 at the end),
      one step at a time and as a whole chain from x_T;
    - DDPMScheduler.step (the posterior q(x_prev | x_t, x0_hat), "fixed_small" variance, in
      coefficient form) gives the same step with zs[i] as its noise, except at the last step, where
      DDPM's alpha_prev is 1 (no noise) and DDIM's is final_alpha_cumprod (alphas_cumprod[0] for SD).

    The reconstruction test above holds whatever the step's mean and sigma are (the inversion and the
    sampler share them); these do not.
    """
    cond, uncond = embs
    unet, cfg, n = parts["unet"], _config(parts), 5
    z0 = _z0()
    x_T, zs, xts = inv.ddpm_edit_friendly_invert(unet, cfg, z0, cond, n, eta=1.0, guidance_scale=guidance,
                                                  uncond=uncond, generator=torch.Generator().manual_seed(3),
                                                  return_xts=True)
    targets = xts[1:] + [z0]
    assert len(zs) == n and len(targets) == n
    ddim = DDIMScheduler.from_config(cfg)
    ddim.set_timesteps(n)
    assert tuple(ddim.timesteps.tolist()) == inv.make_schedule(cfg, n).timesteps
    x = x_T
    for i, t in enumerate(ddim.timesteps):
        eps = _eps(unet, xts[i], t, cond, uncond, guidance)
        step = ddim.step(eps, t, xts[i], eta=1.0, variance_noise=zs[i]).prev_sample
        torch.testing.assert_close(step, targets[i], atol=STEP_TOL, rtol=0, msg=f"DDIM eta=1, step {i}")
        x = ddim.step(_eps(unet, x, t, cond, uncond, guidance), t, x, eta=1.0, variance_noise=zs[i]).prev_sample
    torch.testing.assert_close(x, z0, atol=CHAIN_TOL, rtol=0)

    ddpm = DDPMScheduler.from_config(cfg)
    ddpm.set_timesteps(n)
    assert ddpm.config.variance_type == "fixed_small" and not ddpm.config.clip_sample
    assert ddpm.timesteps.tolist() == ddim.timesteps.tolist()
    for i, t in enumerate(ddpm.timesteps[:-1]):
        eps = _eps(unet, xts[i], t, cond, uncond, guidance)
        # DDPMScheduler draws its own noise (torch.randn with the generator): two draws give its
        # posterior standard deviation and mean, mean + std * noise_k = step_k
        draws = [torch.randn(eps.shape, generator=torch.Generator().manual_seed(s)) for s in (20, 21)]
        steps = [ddpm.step(eps, t, xts[i], generator=torch.Generator().manual_seed(s)).prev_sample for s in (20, 21)]
        dn, ds = draws[0] - draws[1], steps[0] - steps[1]
        std = float((ds * dn).sum() / (dn * dn).sum())
        torch.testing.assert_close(ds, std * dn, atol=STEP_TOL, rtol=0)  # the draws are the library's noise
        mean = steps[0] - std * draws[0]
        torch.testing.assert_close(mean + std * zs[i], targets[i], atol=STEP_TOL, rtol=0, msg=f"DDPM, step {i}")


def test_ddpm_edit_friendly_needs_positive_eta(parts, embs):
    with pytest.raises(ValueError):
        inv.ddpm_edit_friendly_invert(parts["unet"], parts["scheduler"], _z0(), embs[0], 3, eta=0.0)


# ------------------------------------------------------------------------------------------
# (d) determinism
# ------------------------------------------------------------------------------------------
def test_determinism_with_fixed_generator(parts, embs):
    cond, uncond = embs
    unet, sched = parts["unet"], parts["scheduler"]
    z0 = _z0()

    def run(seed):
        return inv.ddpm_edit_friendly_invert(unet, sched, z0, cond, 3, guidance_scale=3.5, uncond=uncond,
                                             generator=torch.Generator().manual_seed(seed))

    (a_T, a_zs), (b_T, b_zs), (c_T, _) = run(11), run(11), run(12)
    # the same computation twice (same inputs, kernels, shapes and thread count): bit for bit
    assert torch.equal(a_T, b_T) and len(a_zs) == len(b_zs) == 3
    assert all(torch.equal(x, y) for x, y in zip(a_zs, b_zs))
    assert float((a_T - c_T).abs().max()) > 0.1  # another seed, other noise (unit variance)
    # DDIM and null-text inversion are deterministic without a generator
    t1, t2 = inv.ddim_invert(unet, sched, z0, cond, 3), inv.ddim_invert(unet, sched, z0, cond, 3)
    assert len(t1) == len(t2) == 4 and all(torch.equal(x, y) for x, y in zip(t1, t2))
    _, u1, _ = inv.null_text_invert(unet, sched, z0, cond, uncond, 2, inner_steps=2)
    _, u2, _ = inv.null_text_invert(unet, sched, z0, cond, uncond, 2, inner_steps=2)
    assert len(u1) == len(u2) == 2 and all(torch.equal(x, y) for x, y in zip(u1, u2))
    assert all(float((u - uncond).abs().max()) > 1e-3 for u in u1)  # optimised: Adam moves by ~lr (1e-2)


# ------------------------------------------------------------------------------------------
# (e) pipeline helpers
# ------------------------------------------------------------------------------------------
def test_encode_decode_round_trip_shapes(pipe):
    img = np.random.default_rng(0).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    lat = inv.encode_image(pipe, img)
    assert lat.shape == (1, 4, 4, 6)  # the tiny VAE downsamples by 8, as SD's
    assert torch.equal(lat, inv.encode_image(pipe, img))  # posterior mean: deterministic
    out = inv.decode_latents(pipe, lat)
    assert out.shape == img.shape and out.dtype == np.uint8
    with pytest.raises(ValueError):
        inv.encode_image(pipe, img.astype(np.float32))


def test_encode_prompt(pipe, embs):
    cond, uncond = embs
    assert cond.shape == uncond.shape == (1, 77, 32)
    assert float((cond - uncond).abs().max()) > 0.1  # another prompt, another embedding (measured 2.5)
    assert inv.encode_prompt(pipe, ["a", "b"]).shape == (2, 77, 32)


# ------------------------------------------------------------------------------------------
# (f) import hygiene
# ------------------------------------------------------------------------------------------
def test_import_does_not_import_torch():
    pre = subprocess.run([sys.executable, "-c", "import sys, methods.diffusion; sys.exit('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True)
    if pre.returncode != 0:
        pytest.skip("the methods.diffusion package itself imports torch")
    code = "import sys, methods.diffusion.inversion; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
