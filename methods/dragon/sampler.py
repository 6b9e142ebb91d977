"""The editing step loop of DiffEditor and DragonDiffusion (code ``src/models/Sampler.py:Sampler.edit``,
alg ``'D+'`` = DiffEditor, ``'D'`` = DragonDiffusion; paper Alg. 1, Eqs. 2, 4, 7, 8).

Every step ``i`` (timestep ``t``, next timestep ``t' = t - 1000 / T``):

1. noise prediction with classifier-free guidance over ``[uncond, cond]`` (one UNet call of two
   rows; ``guidance_scale == 1``: the cond row only), the memory bank and the image branch as
   the step's windows say;
2. energy guidance (Eq. 4) on guided steps: ``eps_g = eps + g`` with ``g`` from the energy
   object (``EnergyGuidance.gradient``: already scaled and regionally mixed); ``eps_g`` makes the
   x0 prediction, the direction term uses the unguided ``eps`` (as the code);
3. the DDIM step (Eq. 2) ``z' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s n``, regional SDE
   (Eq. 7) on the SDE window: ``s = eta * sqrt(var)`` with ``eta_in`` inside ``m_edit`` and
   ``eta_out`` outside, ONE noise draw ``n`` shared by both, ``z' = z'_out (1 - m) + z'_in m``;
4. time travel on its steps (when the step is guided): the step is done ``U`` times; after each
   repeat ``z'`` is rolled back to ``t`` by one deterministic DDIM inversion step
   (:func:`rollback`: the UNet at ``(z', t')`` with the cond text only, image branch and memory
   bank off), the last repeat's ``z'`` is kept (so U repeats cost U rollbacks, as the code).

Windows (``Plan``) are given as positions of the 50-step schedule the code hard-codes; a run with
``T != 50`` steps evaluates them at ``j = i * 50 // T`` (not specified by the paper).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..diffusion.inversion import DDIMSchedule, ddim_move
from .attention import MemoryBankController, dragon_processors, set_image_scale

if TYPE_CHECKING:  # pragma: no cover
    import torch

ALGORITHMS = ("diffeditor", "dragondiffusion")
GUIDANCE_RULES = ("code", "paper")
REFERENCE_STEPS = 50


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which step does what. Defaults: ``Sampler.edit`` / the attention processors of the code."""

    algorithm: str = "diffeditor"
    num_steps: int = 50
    guidance_end: int = 30  # energy guidance for j < 30 (paper: "the first n steps")
    guidance_dense_end: int = 10  # code: every step for j < 10, then even steps (paper rule: even only)
    guidance_rule: str = "code"
    sde: bool = True
    sde_window: tuple[int, int] = (11, 20)  # code: 10 < i < 20
    time_travel: bool = True
    time_travel_steps: tuple[int, ...] = (22, 24, 26, 28)  # code: 20 < i < 30 and i even
    time_travel_repeats: int = 3  # U
    image_window: tuple[int, int] = (10, 20)  # IPAttnProcessor: 10 <= iter_cur < 20
    bank_start: int = 5  # replace / concat for j >= 5
    bank_mix_end: int = 35  # mix for j <= 35

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        if self.guidance_rule not in GUIDANCE_RULES:
            raise ValueError(f"guidance_rule must be one of {list(GUIDANCE_RULES)}, got {self.guidance_rule!r}")
        if self.time_travel_repeats < 1:
            raise ValueError(f"time_travel_repeats must be >= 1, got {self.time_travel_repeats}")

    def position(self, i: int) -> int:
        return i * REFERENCE_STEPS // self.num_steps

    def guided(self, i: int) -> bool:
        j = self.position(i)
        if j >= self.guidance_end:
            return False
        if self.algorithm == "dragondiffusion":
            return True
        if self.guidance_rule == "code":
            return j % 2 == 0 or j < self.guidance_dense_end
        return j % 2 == 0

    def repeats(self, i: int, guided: bool) -> int:
        if self.algorithm != "diffeditor" or not self.time_travel or not guided:
            return 1
        return self.time_travel_repeats if self.position(i) in self.time_travel_steps else 1

    def sde_on(self, i: int) -> bool:
        lo, hi = self.sde_window
        return self.algorithm == "diffeditor" and self.sde and lo <= self.position(i) < hi

    def image_on(self, i: int) -> bool:
        lo, hi = self.image_window
        return lo <= self.position(i) < hi

    def bank_on(self, i: int, mode: str) -> bool:
        j = self.position(i)
        return j <= self.bank_mix_end if mode == "mix" else j >= self.bank_start


@dataclasses.dataclass
class Conditioning:
    """Text embeddings (cond, uncond: ``[1, 77, D]``) and, for the image prompt, the image tokens
    (cond, uncond: ``[1, N, D]``) with the processors that read them and gamma."""

    cond: Any
    uncond: Any | None = None
    image_cond: Any | None = None
    image_uncond: Any | None = None
    ip_procs: Mapping[str, Any] | None = None
    ip_scale: float = 0.0


def _context(text: "torch.Tensor", image: "torch.Tensor | None", with_ip: bool) -> Any:
    # with image-prompt processors installed the UNet gets (text, [image tokens]) as diffusers'
    # own IP-Adapter path passes them; otherwise the text embeddings alone
    return (text, [image]) if with_ip else text


def predict(unet: Any, z: "torch.Tensor", t: int, c: Conditioning, guidance_scale: float) -> "torch.Tensor":
    """CFG noise prediction in one UNet call (``[uncond, cond]`` rows; cond only for scale 1)."""
    import torch

    with_ip = c.ip_procs is not None
    if guidance_scale == 1.0:
        return unet(z, t, encoder_hidden_states=_context(c.cond, c.image_cond, with_ip)).sample
    if c.uncond is None:
        raise ValueError("guidance_scale != 1 needs the unconditional text embedding")
    text = torch.cat([c.uncond, c.cond])
    image = torch.cat([c.image_uncond, c.image_cond]) if with_ip else None
    out = unet(torch.cat([z, z]), t, encoder_hidden_states=_context(text, image, with_ip)).sample
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def rollback(unet: Any, z_prev: "torch.Tensor", t_prev: int, a_prev: float, a_t: float,
             c: Conditioning) -> "torch.Tensor":
    """Time travel's rollback (Alg. 1 l. 20; code ``if repeat > 1``): one deterministic DDIM
    inversion step from ``(z_prev, t_prev)`` back to the noise level of ``t``, with the cond text
    only (the image branch off, the memory bank off: the caller's state)."""
    eps = unet(z_prev, t_prev, encoder_hidden_states=_context(c.cond, c.image_cond, c.ip_procs is not None)).sample
    return ddim_move(z_prev, eps, a_prev, a_t)


def sde_variance(a_t: float, a_prev: float) -> float:
    """DDIM's ``sigma_t^2 / eta^2`` (``DDIMScheduler._get_variance``)."""
    return (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)


@dataclasses.dataclass
class StepRecord:
    step: int
    position: int
    timestep: int
    guided: bool
    repeats: int
    sde: bool
    image: bool
    bank: bool
    outside_change: float = 0.0  # max |z' - z'_ODE| outside m_edit (the SDE noise actually added there)
    inside_change: float = 0.0


def sample(unet: Any, schedule: DDIMSchedule, z_T: "torch.Tensor", plan: Plan, c: Conditioning, *,
           guidance_scale: float = 5.0, guidance: Any = None, refs: Callable[[int], Mapping[str, Any]] | None = None,
           bank: MemoryBankController | None = None, m_edit: "torch.Tensor | None" = None,
           eta_in: float = 0.4, eta_out: float = 0.0, generator: Any = None,
           trace: list[StepRecord] | None = None) -> "torch.Tensor":
    """Run the loop of the module docstring from ``z_T``; returns ``z_0``.

    ``guidance``: an object with ``gradient(z_t, t, refs, text_emb)`` (the energy guidance) or
    None; ``refs(i)``: the inversion latents at step ``i`` it compares with; ``bank``: the
    memory-bank controller (its ``mode`` and the bank filled by the inversion) or None;
    ``m_edit``: (1, 1, h, w) region of the regional SDE; ``generator``: the SDE noise.
    """
    import torch

    n = len(schedule.timesteps)
    if n != plan.num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps, the schedule {n}")
    z = z_T.detach()
    m = None
    if m_edit is not None:
        m = m_edit.to(device=z.device, dtype=z.dtype)
    with dragon_processors(unet, bank, c.ip_procs):
        for i, t in enumerate(schedule.timesteps):
            guided = guidance is not None and plan.guided(i)
            reps = plan.repeats(i, guided)
            sde = plan.sde_on(i) and (eta_in > 0 or eta_out > 0)
            image = c.ip_procs is not None and plan.image_on(i)
            bank_on = bank is not None and plan.bank_on(i, bank.mode)
            rec = StepRecord(i, plan.position(i), int(t), guided, reps, sde, image, bank_on)
            a_t = schedule.alpha(t)
            t_prev = schedule.prev(t)
            a_prev = schedule.alpha(t_prev)
            z_prev = z
            for r in range(reps):
                if bank is not None:
                    bank.set("use", i, bank_on)
                set_image_scale(c.ip_procs, c.ip_scale if image else 0.0)
                with torch.no_grad():
                    eps = predict(unet, z, t, c, guidance_scale)
                eps_x0 = eps
                if guided:
                    g = guidance.gradient(z, int(t), refs(i) if refs is not None else {}, c.cond)
                    eps_x0 = eps + g.detach().to(eps.dtype)
                with torch.no_grad():
                    x0 = (z - (1.0 - a_t) ** 0.5 * eps_x0) / a_t**0.5
                    z_ode = a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps
                    if sde:
                        if m is None:
                            raise ValueError("regional SDE needs m_edit")
                        var = sde_variance(a_t, a_prev)
                        s_in, s_out = eta_in * var**0.5, eta_out * var**0.5
                        noise = torch.randn(z.shape, generator=generator, device=generator.device if generator
                                            is not None else z.device, dtype=z.dtype).to(z.device)
                        z_in = a_prev**0.5 * x0 + (1.0 - a_prev - s_in**2) ** 0.5 * eps + s_in * noise
                        z_out = a_prev**0.5 * x0 + (1.0 - a_prev - s_out**2) ** 0.5 * eps + s_out * noise
                        z_prev = z_out * (1 - m) + z_in * m
                        change = z_prev - z_ode
                        rec.outside_change = max(rec.outside_change, float((change * (1 - m)).abs().max()))
                        rec.inside_change = max(rec.inside_change, float((change * m).abs().max()))
                    else:
                        z_prev = z_ode
                    if reps > 1:
                        if bank is not None:
                            bank.set("use", i, False)
                        set_image_scale(c.ip_procs, 0.0)
                        z = rollback(unet, z_prev, t_prev, a_prev, a_t, c)
            z = z_prev
            if trace is not None:
                trace.append(rec)
    if bank is not None:
        bank.set("off", 0)
    return z


def plain_sample(unet: Any, schedule: DDIMSchedule, z_T: "torch.Tensor", c: Conditioning,
                 guidance_scale: float) -> "torch.Tensor":
    """Deterministic DDIM from ``z_T`` with CFG in one batched call: the reference the sampler
    reduces to with everything off (tests)."""
    import torch

    z = z_T.detach()
    with torch.no_grad():
        for t in schedule.timesteps:
            eps = predict(unet, z, t, c, guidance_scale)
            z = ddim_move(z, eps, schedule.alpha(t), schedule.alpha(schedule.prev(t)))
    return z


def steps_summary(trace: Sequence[StepRecord]) -> dict[str, list[int]]:
    """Step indices per feature (for the edit's info)."""
    return {
        "guided_steps": [r.step for r in trace if r.guided],
        "time_travel_steps": [r.step for r in trace if r.repeats > 1],
        "sde_steps": [r.step for r in trace if r.sde],
        "image_prompt_steps": [r.step for r in trace if r.image],
        "memory_bank_steps": [r.step for r in trace if r.bank],
    }
