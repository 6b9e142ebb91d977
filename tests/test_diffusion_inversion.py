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

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from methods.diffusion import inversion as inv  # noqa: E402
from methods.diffusion.tiny import tiny_sd15  # noqa: E402

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
    assert torch.equal(a_T, b_T) and all(torch.equal(x, y) for x, y in zip(a_zs, b_zs))
    assert not torch.equal(a_T, c_T)
    # DDIM and null-text inversion are deterministic without a generator
    assert all(torch.equal(x, y) for x, y in zip(inv.ddim_invert(unet, sched, z0, cond, 3),
                                                 inv.ddim_invert(unet, sched, z0, cond, 3)))
    _, u1, _ = inv.null_text_invert(unet, sched, z0, cond, uncond, 2, inner_steps=2)
    _, u2, _ = inv.null_text_invert(unet, sched, z0, cond, uncond, 2, inner_steps=2)
    assert all(torch.equal(x, y) for x, y in zip(u1, u2))


# ------------------------------------------------------------------------------------------
# (e) pipeline helpers
# ------------------------------------------------------------------------------------------
def test_encode_decode_round_trip_shapes(pipe):
    img = np.random.default_rng(0).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    lat = inv.encode_image(pipe, img)
    assert lat.shape == (1, 4, 16, 24)  # the tiny VAE downsamples by 2
    assert torch.equal(lat, inv.encode_image(pipe, img))  # posterior mean: deterministic
    out = inv.decode_latents(pipe, lat)
    assert out.shape == img.shape and out.dtype == np.uint8
    with pytest.raises(ValueError):
        inv.encode_image(pipe, img.astype(np.float32))


def test_encode_prompt(pipe, embs):
    cond, uncond = embs
    assert cond.shape == uncond.shape == (1, 77, 32)
    assert not torch.equal(cond, uncond)
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
