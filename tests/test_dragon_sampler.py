"""The DiffEditor / DragonDiffusion step loop (methods/dragon/sampler.py) on tiny models."""
from __future__ import annotations

import dataclasses
import types

import pytest

from ._dragon import tiny_sd15_latent

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N = 50  # the code's windows are 50-step positions: the plan's own step count


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd15_latent(N)


@pytest.fixture(scope="module")
def inverted(tiny):
    from methods.dragon.inversion import invert

    pipe, z0, cond, _, sched = tiny
    return invert(pipe.unet, sched, z0, cond)


class FakeGuidance:
    """The energy guidance's interface with a smooth, deterministic term (the sampler's tests
    need a guided step, not E's energies): g = 0.05 * tanh(z) + 0.01 * source."""

    def __init__(self):
        self.calls = []

    def gradient(self, z, t, refs, text_emb):
        import torch

        self.calls.append(int(t))
        return 0.05 * torch.tanh(z) + 0.01 * refs["source"]


def _plan(**kw):
    from methods.dragon.sampler import Plan

    return Plan(num_steps=N, **kw)


def _region():
    import torch

    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:6, 1:5] = 1
    return m


def test_plan_windows_are_the_codes():
    from methods.dragon.sampler import Plan

    p = _plan()
    guided = [i for i in range(N) if p.guided(i)]
    assert guided == list(range(10)) + list(range(10, 30, 2))
    assert [i for i in range(N) if p.repeats(i, p.guided(i)) > 1] == [22, 24, 26, 28]
    assert all(p.repeats(i, p.guided(i)) == 3 for i in (22, 24, 26, 28))
    assert [i for i in range(N) if p.sde_on(i)] == list(range(11, 20))
    assert [i for i in range(N) if p.image_on(i)] == list(range(10, 20))
    assert [i for i in range(N) if p.bank_on(i, "concat")] == list(range(5, 50))
    assert [i for i in range(N) if p.bank_on(i, "mix")] == list(range(36))
    paper = _plan(guidance_rule="paper")
    assert [i for i in range(N) if paper.guided(i)] == list(range(0, 30, 2))
    dragon = Plan(algorithm="dragondiffusion", num_steps=N)
    assert [i for i in range(N) if dragon.guided(i)] == list(range(30))
    assert not any(dragon.sde_on(i) or dragon.repeats(i, True) > 1 for i in range(N))
    # another step count: windows at the 50-step position j = i * 50 // T
    ten = Plan(num_steps=10)
    assert [ten.position(i) for i in range(10)] == list(range(0, 50, 5))
    assert [i for i in range(10) if ten.sde_on(i)] == [3]  # j = 15
    with pytest.raises(ValueError, match="algorithm"):
        Plan(algorithm="dragon")


def test_everything_off_is_plain_ddim_from_the_inverted_latent(tiny, inverted):
    """Energy scale 0 (no guidance object), SDE and time travel off, memory bank off, CFG 1:
    the loop is deterministic DDIM sampling from z_T, i.e. exactly the shared layer's ddim_sample
    (same UNet calls on the same inputs, the same DDIM arithmetic: bit-identical), which
    reconstructs the source to the inversion's own error."""
    import torch

    from methods.diffusion.inversion import ddim_sample
    from methods.dragon.sampler import Conditioning, sample

    pipe, z0, cond, uncond, sched = tiny
    z_T = inverted.latents[-1]
    trace = []
    out = sample(pipe.unet, sched, z_T, _plan(sde=False, time_travel=False), Conditioning(cond, uncond),
                 guidance_scale=1.0, trace=trace)
    ref = ddim_sample(pipe.unet, sched, z_T, cond, N)
    assert torch.equal(out, ref)
    assert not any(r.guided or r.sde or r.bank or r.repeats > 1 for r in trace) and len(trace) == N
    # (random weights reconstruct poorly; the error is the inversion's own, to the bit)
    assert (out - z0).abs().max().item() == (ref - z0).abs().max().item()
    # a denoiser whose eps does not depend on its input makes DDIM inversion exact: the loop then
    # reconstructs the source (float32 over 50 steps: 1e-4 of latents of order 0.1)
    from methods.dragon.inversion import invert

    const = ConstEps(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)))
    inv = invert(const, sched, z0, cond, keep_bank=False)
    rec = sample(const, sched, inv.latents[-1], _plan(sde=False, time_travel=False), Conditioning(cond, uncond),
                 guidance_scale=1.0)
    assert torch.allclose(rec, z0, rtol=0, atol=1e-4), (rec - z0).abs().max()
    # with CFG too: the plain batched CFG DDIM loop
    from methods.dragon.sampler import plain_sample

    c = Conditioning(cond, uncond)
    assert torch.equal(sample(pipe.unet, sched, z_T, _plan(sde=False, time_travel=False), c, guidance_scale=5.0),
                       plain_sample(pipe.unet, sched, z_T, c, 5.0))


def test_time_travel_with_one_repeat_equals_none(tiny, inverted):
    import torch

    from methods.diffusion import counting
    from methods.diffusion.inversion import make_schedule
    from methods.dragon.sampler import Conditioning, Plan, sample

    pipe, _, cond, uncond, _ = tiny
    n = 10  # a short schedule: step i sits at the 50-step position 5 i; time travel at i = 4 (j = 20)
    sched = make_schedule(pipe.scheduler, n)
    counting.watch_module("unet", pipe.unet)
    z_T = inverted.latents[-1]
    c = Conditioning(cond, uncond)
    outs, calls = {}, {}
    for key, kw in {"off": dict(time_travel=False), "u1": dict(time_travel=True, time_travel_repeats=1),
                    "u3": dict(time_travel=True)}.items():
        g = FakeGuidance()
        plan = Plan(num_steps=n, sde=False, time_travel_steps=(20,), **kw)
        with counting.counting() as tally:
            outs[key] = sample(pipe.unet, sched, z_T, plan, c, guidance_scale=5.0, guidance=g,
                               refs=lambda i: {"source": z_T})
        calls[key] = (tally.calls["unet"], len(g.calls))
    guided = [i for i in range(n) if plan.guided(i)]
    assert guided == [0, 1, 2, 4] and plan.repeats(4, True) == 3
    assert torch.equal(outs["off"], outs["u1"])
    assert not torch.equal(outs["off"], outs["u3"])
    # U = 3: 2 more guided predictions and 3 rollbacks on the time-travel step (the code's count)
    assert calls["off"] == calls["u1"] == (n, len(guided))
    assert calls["u3"] == (n + 2 + 3, len(guided) + 2)


class ConstEps:
    """A 'UNet' whose prediction ignores its input: the rollback then inverts the DDIM step exactly."""

    def __init__(self, eps):
        self.eps = eps
        self.seen = []

    def __call__(self, x, t, encoder_hidden_states=None):
        self.seen.append((int(t), encoder_hidden_states))
        return types.SimpleNamespace(sample=self.eps.expand_as(x))


def test_rollback_inverts_the_forward_step(tiny, inverted):
    import torch

    from methods.diffusion.inversion import ddim_move
    from methods.dragon.sampler import Conditioning, rollback

    pipe, _, cond, uncond, sched = tiny
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    fake = ConstEps(eps)
    c = Conditioning(cond, uncond)
    for i in (22, 24, 26, 28, 49):
        t = sched.timesteps[i]
        a_t, t_prev = sched.alpha(t), sched.prev(t)
        a_prev = sched.alpha(t_prev)
        z = inverted.at_step(i)
        z_prev = ddim_move(z, eps, a_t, a_prev)
        back = rollback(fake, z_prev, t_prev, a_prev, a_t, c)
        # float32: two affine maps with coefficients up to 1/sqrt(a) ~ 14: a few ulps of |z| ~ 1
        assert torch.allclose(back, z, rtol=0, atol=2e-5), (i, (back - z).abs().max())
        # the rollback's UNet call: the previous timestep, the cond text only (no uncond row)
        assert fake.seen[-1][0] == t_prev and fake.seen[-1][1] is cond
    # with the real UNet: one DDIM inversion step from (z', t') to t's noise level
    t = sched.timesteps[22]
    z_prev = inverted.at_step(23)
    with torch.no_grad():
        back = rollback(pipe.unet, z_prev, sched.prev(t), sched.alpha(sched.prev(t)), sched.alpha(t), c)
        e = pipe.unet(z_prev, sched.prev(t), encoder_hidden_states=cond).sample
    assert torch.equal(back, ddim_move(z_prev, e, sched.alpha(sched.prev(t)), sched.alpha(t)))


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_regional_sde_adds_noise_only_inside_the_edit_region(tiny, inverted, variant):
    """Code (eta 0.4 inside, 0 outside): the noise actually added outside m_edit (z' minus the
    deterministic step) is exactly zero at every SDE step, inside it is not; the paper's
    (0.4, 0.2) adds noise outside too. One seeded draw: the same seed, the same result."""
    import torch

    from methods.diffusion.inversion import make_schedule
    from methods.dragon.sampler import Conditioning, Plan, sample

    pipe, _, cond, uncond, _ = tiny
    n = 10
    sched = make_schedule(pipe.scheduler, n)
    plan = Plan(num_steps=n, time_travel=False, sde_window=(10, 40))  # steps 2..7 (positions 10..35)
    z_T = inverted.latents[-1]
    m = _region()
    eta_out = 0.0 if variant == "code" else 0.2
    c = Conditioning(cond, uncond)
    runs = []
    for seed in (0, 0, 1):
        trace = []
        z = sample(pipe.unet, sched, z_T, plan, c, guidance_scale=5.0, m_edit=m, eta_in=0.4, eta_out=eta_out,
                   generator=torch.Generator().manual_seed(seed), trace=trace)
        runs.append((z, trace))
    z, trace = runs[0]
    sde = [r for r in trace if r.sde]
    assert [r.step for r in sde] == list(range(2, 8))
    assert all(r.inside_change > 0 for r in sde)
    if variant == "code":
        assert all(r.outside_change == 0.0 for r in trace)
    else:
        assert all(r.outside_change > 0 for r in sde)
    assert all(r.outside_change == r.inside_change == 0.0 for r in trace if not r.sde)
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][0], runs[2][0])
    # eta 0 everywhere: the deterministic loop
    off = sample(pipe.unet, sched, z_T, dataclasses.replace(plan, sde=False), c, guidance_scale=5.0, m_edit=m)
    zero = sample(pipe.unet, sched, z_T, plan, c, guidance_scale=5.0, m_edit=m, eta_in=0.0, eta_out=0.0,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(off, zero)


def test_sde_step_formula_one_shared_draw(tiny, inverted):
    """One SDE step recomputed by hand from Eq. 2 / 7 with the sampler's own noise draw: inside
    sigma_in = 0.4 sqrt(var), outside sigma_out = 0.2 sqrt(var), the same n in both."""
    import torch

    from methods.dragon.sampler import Conditioning, predict, sample, sde_variance

    pipe, _, cond, uncond, sched = tiny
    i = 12
    z = inverted.at_step(i)
    m = _region()
    from methods.dragon.sampler import Plan

    # step i alone: the schedule sliced to that one step
    one = dataclasses.replace(sched, timesteps=(sched.timesteps[i],))
    plan = Plan(num_steps=1, sde_window=(0, 1), time_travel=False)
    c = Conditioning(cond, uncond)
    out = sample(pipe.unet, one, z, plan, c, guidance_scale=5.0, m_edit=m, eta_in=0.4, eta_out=0.2,
                 generator=torch.Generator().manual_seed(5))
    t = sched.timesteps[i]
    a_t, a_p = sched.alpha(t), sched.alpha(sched.prev(t))
    with torch.no_grad():
        eps = predict(pipe.unet, z, t, c, 5.0)
    n = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    var = sde_variance(a_t, a_p)
    assert var == pytest.approx(float(pipe.scheduler._get_variance(t, sched.prev(t))), rel=1e-5)
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5

    def step(eta):
        s = eta * var ** 0.5
        return a_p ** 0.5 * x0 + (1 - a_p - s * s) ** 0.5 * eps + s * n

    want = step(0.2) * (1 - m) + step(0.4) * m
    assert torch.allclose(out, want, rtol=0, atol=1e-6)


def test_guidance_term_enters_x0_only(tiny, inverted):
    """A guided step: x0 from eps + g, the direction from the unguided eps (Sampler.edit)."""
    import torch

    from methods.dragon.sampler import Conditioning, Plan, predict, sample

    pipe, _, cond, uncond, sched = tiny
    i = 3
    z = inverted.at_step(i)
    one = dataclasses.replace(sched, timesteps=(sched.timesteps[i],))
    g = FakeGuidance()
    c = Conditioning(cond, uncond)
    out = sample(pipe.unet, one, z, Plan(num_steps=1, sde=False, time_travel=False), c, guidance_scale=5.0,
                 guidance=g, refs=lambda _: inverted.refs(i))
    t = sched.timesteps[i]
    a_t, a_p = sched.alpha(t), sched.alpha(sched.prev(t))
    with torch.no_grad():
        eps = predict(pipe.unet, z, t, c, 5.0)
    gv = 0.05 * torch.tanh(z) + 0.01 * inverted.refs(i)["source"]
    x0 = (z - (1 - a_t) ** 0.5 * (eps + gv)) / a_t ** 0.5
    assert torch.allclose(out, a_p ** 0.5 * x0 + (1 - a_p) ** 0.5 * eps, rtol=0, atol=1e-6)
    assert g.calls == [int(t)]
