"""PartEdit's three-path SDXL sampler (paper sec. 3.3-3.4, Fig. 3; ``PartEditPipeline.__call__``
of ``Gorluxor/PartEdit`` ``stable_diffusion_xl_partedit.py``, read at af50018).

Rows (0-indexed): 0 = source ``P_src``, 1 = edit ``P_edit``, 2 = localisation (``P_src`` with the
part token in place of its text, :func:`localisation_embeds`), each twice for classifier-free
guidance (``[uncond x 3, cond x 3]``; the unconditional rows are SDXL's zero embedding, as the
pipeline without a negative prompt). **One batched UNet call of the 6 rows per step**; the
attention controller (:mod:`.controller`) does the query sharing, the capture, the P2P
replacement and the blend inside that call.

Latents. Synthetic (paper 3.3, the code): 3 rows of initial noise drawn together from a CPU
generator (the code's ``torch.Generator().manual_seed(seed)``; row 0 is then exactly what plain
SDXL draws for the same seed), row 1 := row 0; after every scheduler step row 2 := row 0 (the
code's ``latents[-1:] = latents[0]``, "latent tying"). Scheduler: ``ddim`` (paper 4.1: DDIM,
T = 50, eta 0), ``euler`` (the official demo's ``default_pipeline``), ``dpmsolver_sde`` (the code's
"leditspp" option: DPM-Solver++ SDE, order 2), each built from the checkpoint's scheduler config.

Real images (paper 3.4, "Ours w/ Ledits++"): the official release leaves this path disabled (the
``zs`` / ``latents_list`` hooks of ``__call__`` are commented out). Here the source is inverted
with the shared layer's edit-friendly DDPM inversion
(:func:`methods.diffusion.inversion.ddpm_edit_friendly_invert`, the noise space LEDITS++ builds
on) conditioned on the source prompt, and the three rows are sampled with the same stochastic
DDIM (eta 1) step driven by the inversion's noise maps ``z_t`` (:func:`ddpm_sample_with_noise`'s
step). As the paper says ("this estimated trajectory is then used as the source path"), row 0 is
set to the inverted trajectory ``x_t`` after every step, then row 2 := row 0.

``add_extra_step`` (the code's option, default off): one more UNet pass at the first timestep
before sampling, whose latents are then restored: its maps give the first real step a mask, so
that step is blended too (the controller's step counter includes the extra pass, as the code's).

torch and diffusers are imported lazily.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import numpy as np

SCHEDULERS = ("ddim", "euler", "dpmsolver_sde")


@dataclasses.dataclass
class Conditioning:
    """Text conditioning of the three rows: ``embeds`` ``(3, L, D)`` and ``pooled`` ``(3, P)`` of
    [source, edit, localisation]; ``uncond`` ``(1, L, D)`` / ``uncond_pooled`` ``(1, P)``: the
    unconditional pair shared by the three unconditional rows."""

    embeds: Any
    pooled: Any
    uncond: Any
    uncond_pooled: Any


@dataclasses.dataclass
class RealSource:
    """The inverted real image (edit-friendly DDPM): the schedule, the trajectory ``xts``
    (``xts[i]`` at ``timesteps[i]``), the noise maps ``zs`` and the clean latent ``x0``."""

    schedule: Any
    xts: list
    zs: list
    x0: Any
    eta: float = 1.0


@dataclasses.dataclass
class PartEditResult:
    """What :func:`sample` returns: the final latents (3 rows), the decoded edit and source
    (RGB uint8 of the working size), the initial latents and the timesteps run."""

    latents: Any
    edit: np.ndarray
    source: np.ndarray | None
    initial: Any
    timesteps: list[int]
    unet_passes: int


def localisation_embeds(source: Any, token: Any) -> Any:
    """The localisation row's embeddings from the source row's ``(L, D)`` and the part token
    ``(2, D)`` (row 0 background, row 1 part) as ``process_embeddings`` with ``PaddingStrategy.BG``
    (the default): positions 0-1 := the token (the background replaces the start token, the part
    is at index 1), positions 2..L-1 := the background token."""
    import torch

    if token.ndim != 2 or token.shape[0] != 2:
        raise ValueError(f"a part token must be (2, D) (background, part), got shape {tuple(token.shape)}")
    if token.shape[1] != source.shape[-1]:
        raise ValueError(f"the part token is {token.shape[1]} wide but the model's text embeddings are "
                         f"{source.shape[-1]} wide (a token trained for another model?)")
    token = token.to(device=source.device, dtype=source.dtype)
    out = torch.empty_like(source)
    out[:2] = token
    out[2:] = token[:1]
    return out


def encode_conditioning(pipe: Any, source_prompt: str, edit_prompt: str, token: Any) -> Conditioning:
    """SDXL text conditioning of the three rows (the pipeline's own ``encode_prompt``; the
    localisation row's pooled embedding is the source's, untouched by ``process_embeddings``)."""
    import torch

    from ..diffusion.inversion import encode_prompt_sdxl

    emb, pooled, u_emb, u_pooled = encode_prompt_sdxl(pipe, [source_prompt, edit_prompt])
    loc = localisation_embeds(emb[0], torch.as_tensor(token))
    return Conditioning(torch.cat([emb, loc[None]]), torch.cat([pooled, pooled[:1]]), u_emb, u_pooled)


def make_scheduler(template: Any, kind: str) -> Any:
    """A fresh scheduler of ``kind`` (:data:`SCHEDULERS`) from ``template``'s config (the
    checkpoint's noise schedule, spacing and offset)."""
    import diffusers

    if kind == "ddim":
        return diffusers.DDIMScheduler.from_config(template.config)
    if kind == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(template.config)
    if kind == "dpmsolver_sde":
        return diffusers.DPMSolverMultistepScheduler.from_config(template.config, algorithm_type="sde-dpmsolver++",
                                                                 solver_order=2)
    raise ValueError(f"partedit: unknown scheduler {kind!r}; one of {list(SCHEDULERS)}")


def time_ids(pipe: Any, height: int, width: int, dtype: Any) -> Any:
    """SDXL micro-conditioning ``(1, 6)``: original = target = the working size, no crop (the
    pipeline's defaults; the code uses the same ids for the unconditional rows)."""
    return pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)


def invert_real(pipe: Any, vae: Any, image: np.ndarray, cond: Conditioning, *, steps: int, guidance_scale: float,
                eta: float, generator: Any) -> RealSource:
    """Edit-friendly DDPM inversion of the RGB uint8 ``image`` (working size) conditioned on the
    source prompt with guidance ``guidance_scale`` (see the module docstring)."""
    import types

    from ..diffusion.inversion import PooledTextUNet, ddpm_edit_friendly_invert, encode_image, make_schedule

    z0 = encode_image(types.SimpleNamespace(vae=vae), image).to(dtype=pipe.unet.dtype)
    h, w = image.shape[:2]
    ids = time_ids(pipe, h, w, z0.dtype).to(z0.device)
    unet = PooledTextUNet(pipe.unet, ids, cond.embeds.shape[1], cond.pooled.shape[-1])
    src = PooledTextUNet.pack(cond.embeds[:1], cond.pooled[:1]).to(z0)
    unc = PooledTextUNet.pack(cond.uncond, cond.uncond_pooled).to(z0)
    schedule = make_schedule(pipe.scheduler, steps)
    _, zs, xts = ddpm_edit_friendly_invert(unet, schedule, z0, src, steps, eta=eta, guidance_scale=guidance_scale,
                                           uncond=unc, generator=generator, return_xts=True)
    return RealSource(schedule, list(xts), list(zs), z0, eta)


def _step_kwargs(scheduler: Any, generator: Any, eta: float) -> dict[str, Any]:
    """The extra ``step`` arguments the scheduler takes (diffusers' ``prepare_extra_step_kwargs``)."""
    names = set(inspect.signature(scheduler.step).parameters)
    kw: dict[str, Any] = {}
    if "eta" in names:
        kw["eta"] = eta
    if "generator" in names:
        kw["generator"] = generator
    return kw


def decode(vae: Any, latents: Any) -> np.ndarray:
    """Latents ``(1, C, h, w)`` -> RGB uint8 with ``vae`` (its own dtype)."""
    import types

    from ..diffusion.inversion import decode_latents

    return decode_latents(types.SimpleNamespace(vae=vae), latents)


def sample(
    pipe: Any,
    cond: Conditioning,
    *,
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    generator: Any,
    scheduler: str = "ddim",
    eta: float = 0.0,
    real: RealSource | None = None,
    add_extra_step: bool = False,
    vae: Any = None,
    on_step: Callable[[int, Any, Any], None] | None = None,
    decode_source: bool = True,
) -> PartEditResult:
    """Run the three-path loop (module docstring) with whatever controller is installed on
    ``pipe.unet``. ``generator``: a CPU generator for the initial noise (synthetic) and the SDE
    scheduler's noise. ``on_step(i, t, latents)`` is called after each step, after the tying.
    ``vae``: the VAE that decodes (default ``pipe.vae``); ``decode_source=False`` skips decoding
    the source row (``PartEditResult.source`` is then None)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    vae = vae if vae is not None else pipe.vae
    guided = guidance_scale > 1.0  # the code's do_classifier_free_guidance
    emb = cond.embeds.to(device=device, dtype=dtype)
    pooled = cond.pooled.to(device=device, dtype=dtype)
    if guided:
        emb = torch.cat([cond.uncond.to(emb).expand(3, -1, -1), emb])
        pooled = torch.cat([cond.uncond_pooled.to(pooled).expand(3, -1), pooled])
    ids = time_ids(pipe, height, width, dtype).to(device).repeat(emb.shape[0], 1)
    added = {"text_embeds": pooled, "time_ids": ids}

    with torch.inference_mode():
        if real is None:
            sched = make_scheduler(pipe.scheduler, scheduler)
            sched.set_timesteps(steps, device=device)
            timesteps = list(sched.timesteps)
            f = 2 ** (len(vae.config.block_out_channels) - 1)
            shape = (3, unet.config.in_channels, height // f, width // f)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * sched.init_noise_sigma
            latents[1] = latents[0]
            kw = _step_kwargs(sched, generator, eta)
        else:
            sched = None
            timesteps = list(real.schedule.timesteps)
            if len(real.zs) != len(timesteps):
                raise ValueError("the inversion's noise maps do not match its schedule")
            latents = real.xts[0].to(device=device, dtype=dtype).expand(3, -1, -1, -1).clone()
        initial = latents.clone()
        seq = ([timesteps[0]] if add_extra_step else []) + timesteps
        passes = 0
        i = 0
        for k, t in enumerate(seq):
            x = torch.cat([latents] * 2) if guided else latents
            if sched is not None:
                x = sched.scale_model_input(x, t)
            eps = unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample
            passes += 1
            if add_extra_step and k == 0:
                # the code: the extra pass only gives maps; the latents are restored, no step
                latents = initial.clone()
                continue
            if guided:
                u, c = eps.chunk(2)
                eps = u + guidance_scale * (c - u)
            if real is None:
                latents = sched.step(eps, t, latents, **kw).prev_sample
            else:
                from ..diffusion.inversion import _ddpm_mean_sigma  # the sampler step of ddpm_sample_with_noise

                sch = real.schedule
                tt = int(t)
                mean, sigma = _ddpm_mean_sigma(latents, eps, sch.alpha(tt), sch.alpha(sch.prev(tt)), real.eta)
                latents = mean + sigma * real.zs[i].to(latents)
                # the inverted trajectory is the source path (paper 3.4)
                latents[0] = (real.xts[i + 1] if i + 1 < len(timesteps) else real.x0).to(latents)
            latents[2] = latents[0]  # latent tying (the code: latents[-1:] = latents[0])
            if on_step is not None:
                on_step(i, t, latents)
            i += 1
        edit_img = decode(vae, latents[1:2])
        src_img = decode(vae, latents[0:1]) if decode_source else None
    return PartEditResult(latents, edit_img, src_img, initial, [int(t) for t in timesteps], passes)
