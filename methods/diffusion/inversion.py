"""Latent-space inversion of real images for diffusion editing methods.

Three inversions, written against a bare ``UNet2DConditionModel``, a scheduler configuration and
text embeddings (no pipeline class is assumed), all in the VAE's latent space:

- :func:`ddim_invert` / :func:`ddim_sample`: deterministic DDIM inversion and sampling
  (Song et al., ICLR 2021; the convention of prompt-to-prompt's ``ddim_loop`` and diffusers'
  ``DDIMInverseScheduler``); :func:`ddim_sample_batch` samples several prompts side by side in
  one UNet batch (for attention-editing controllers).
- :func:`null_text_invert`: null-text inversion (Mokady et al., "Null-text Inversion for Editing
  Real Images using Guided Diffusion Models", CVPR 2023; reference code
  ``google/prompt-to-prompt/null_text_w_ptp.ipynb``).
- :func:`ddpm_edit_friendly_invert` / :func:`ddpm_sample_with_noise`: edit-friendly DDPM noise
  space (Huberman-Spiegelglas, Kulikov & Michaeli, "An Edit Friendly DDPM Noise Space:
  Inversion and Manipulations", CVPR 2024; reference code ``inbarhub/DDPM_inversion``).

No library offers null-text inversion or edit-friendly DDPM inversion, so the step arithmetic
here is hand-written from the papers' equations (the DDIM update is written out too, rather than
calling ``DDIMScheduler.step``, so that the very same arithmetic is used under autograd in the
null-text optimisation and in sampling). The scheduler configuration only supplies the noise
schedule (``alphas_cumprod``), the timestep spacing and ``set_alpha_to_one``; a DDIM scheduler is
built from it with :meth:`diffusers.DDIMScheduler.from_config`.

Notation: ``a_t`` is ``alphas_cumprod[t]``; timesteps come from ``DDIMScheduler.set_timesteps``
(descending, e.g. 901, 801, ..., 1 for 10 steps of SD 1.5's schedule) and the timestep before
the last one (``t - 1000 // num_steps < 0``) uses ``final_alpha_cumprod`` (``alphas_cumprod[0]``
for SD 1.5, whose ``set_alpha_to_one`` is False), exactly as diffusers' DDIM does.

Classifier-free guidance: ``eps = eps_u + w * (eps_c - eps_u)``; with ``w == 1`` only the
conditional branch is evaluated. The two branches are evaluated in *separate* UNet calls (not one
batch of two) so that every function here computes bit-identical noise predictions for the same
inputs: inversions and the samplers that replay them agree to float rounding.

No torch / diffusers import happens at module import time.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

__all__ = [
    "DDIMSchedule",
    "make_schedule",
    "encode_prompt",
    "encode_prompt_sdxl",
    "PooledTextUNet",
    "encode_image",
    "decode_latents",
    "predict_eps",
    "ddim_invert",
    "ddim_sample",
    "ddim_sample_batch",
    "null_text_invert",
    "ddpm_edit_friendly_invert",
    "ddpm_sample_with_noise",
]


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DDIMSchedule:
    """The discrete schedule an inversion walks.

    timesteps: the sampling timesteps, descending (``timesteps[0]`` is the noisiest).
    alphas_cumprod: ``a_t`` for every training timestep (float32 CPU tensor).
    final_alpha_cumprod: ``a`` used for the timestep before the last (negative index).
    stride: ``num_train_timesteps // num_steps``; the previous timestep of ``t`` is ``t - stride``.
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: Any
    final_alpha_cumprod: float
    stride: int

    def alpha(self, t: int) -> float:
        """``a_t``, or ``final_alpha_cumprod`` for a negative ``t`` (before the last step)."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def prev(self, t: int) -> int:
        """The timestep one sampling step less noisy than ``t`` (negative after the last)."""
        return t - self.stride


def make_schedule(scheduler_config: Any, num_steps: int) -> DDIMSchedule:
    """Build the DDIM schedule of ``num_steps`` steps from a scheduler or its config.

    ``scheduler_config`` may be a scheduler instance (its ``.config`` is read), a
    ``FrozenDict`` / dict config. A :class:`diffusers.DDIMScheduler` is built from it (extra keys
    of other schedulers, e.g. Euler's, are ignored by ``from_config``), so the noise schedule,
    ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` of the model are respected.
    """
    from diffusers import DDIMScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    config = getattr(scheduler_config, "config", scheduler_config)
    sched = DDIMScheduler.from_config(dict(config))
    if sched.config.prediction_type != "epsilon":
        raise ValueError(
            f"only epsilon-prediction models are supported, the scheduler says {sched.config.prediction_type!r}"
        )
    sched.set_timesteps(num_steps)
    timesteps = tuple(int(t) for t in sched.timesteps)
    return DDIMSchedule(
        timesteps=timesteps,
        alphas_cumprod=sched.alphas_cumprod.detach().clone().float(),
        final_alpha_cumprod=float(sched.final_alpha_cumprod),
        stride=sched.config.num_train_timesteps // num_steps,
    )


# --------------------------------------------------------------------------------------------
# Pipeline helpers (SD-like: one tokenizer + one CLIP text encoder, an AutoencoderKL)
# --------------------------------------------------------------------------------------------
def encode_prompt(pipe: Any, prompt: str | Sequence[str]) -> "torch.Tensor":
    """Text embeddings (``[B, 77, D]``) of ``prompt`` for an SD 1.x/2.x-like pipeline.

    Tokenises to the tokenizer's full context length (padding to ``model_max_length``, as the
    SD pipelines and prompt-to-prompt do, so ``encode_prompt(pipe, "")`` is the usual
    unconditional "null-text" embedding) and returns the text encoder's last hidden state.
    SDXL (two encoders, pooled embeddings): :func:`encode_prompt_sdxl` and :class:`PooledTextUNet`.
    """
    import torch

    if getattr(pipe, "text_encoder_2", None) is not None:
        raise NotImplementedError("encode_prompt supports single-text-encoder (SD 1.x/2.x-like) pipelines")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    tok = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    enc = pipe.text_encoder
    device = next(enc.parameters()).device
    with torch.no_grad():
        out = enc(tok.input_ids.to(device))
    return out[0]


def encode_prompt_sdxl(
    pipe: Any, prompt: str | Sequence[str]
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """SDXL text conditioning through the pipeline's own ``encode_prompt`` (both text encoders,
    penultimate hidden states concatenated, pooled projection of the second):
    ``(embeds [B, 77, D], pooled [B, P], uncond [1, 77, D], uncond_pooled [1, P])``.

    The unconditional pair is what the pipeline uses for classifier-free guidance without a
    negative prompt: zeros when its ``force_zeros_for_empty_prompt`` is set (SDXL base), else the
    encoding of ``""``. Pack a pair for the functions of this module with
    :meth:`PooledTextUNet.pack` and call them with a :class:`PooledTextUNet`.
    """
    import torch

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    device = next(pipe.text_encoder_2.parameters()).device
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    return emb, pooled, neg[:1], neg_pooled[:1]


class PooledTextUNet:
    """An SDXL UNet seen as an SD-like ``unet(x, t, encoder_hidden_states=emb)``, so that every
    function of this module (inversions, null-text optimisation, samplers) works on SDXL unchanged.

    The pooled text embedding travels inside the sequence: :meth:`pack` appends it to the token
    embeddings as ``ceil(P / D)`` extra tokens (zero-padded); the call splits them off and passes
    ``added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}`` to the real UNet (SDXL's
    micro-conditioning: ``time_ids`` from the pipeline's ``_get_add_time_ids``). A null-text
    optimisation of a packed unconditional embedding therefore optimises its pooled part too.
    Attention processors are the real UNet's (:attr:`unet`): install controllers there.
    """

    def __init__(self, unet: Any, time_ids: "torch.Tensor", seq_len: int, pooled_dim: int) -> None:
        self.unet = unet
        self.time_ids = time_ids
        self.seq_len = int(seq_len)
        self.pooled_dim = int(pooled_dim)

    @staticmethod
    def pack(embeds: "torch.Tensor", pooled: "torch.Tensor") -> "torch.Tensor":
        """``[B, L, D]`` + ``[B, P]`` -> ``[B, L + ceil(P / D), D]``."""
        import torch

        b, _, d = embeds.shape
        n = -(-pooled.shape[-1] // d)
        extra = torch.zeros(b, n * d, dtype=embeds.dtype, device=embeds.device)
        extra[:, : pooled.shape[-1]] = pooled.to(embeds)
        return torch.cat([embeds, extra.reshape(b, n, d)], dim=1)

    def __call__(self, x: "torch.Tensor", t: Any, encoder_hidden_states: "torch.Tensor", **kw: Any) -> Any:
        emb = encoder_hidden_states
        b = emb.shape[0]
        text = emb[:, : self.seq_len]
        pooled = emb[:, self.seq_len :].reshape(b, -1)[:, : self.pooled_dim]
        time_ids = self.time_ids.to(device=x.device, dtype=x.dtype)
        time_ids = time_ids.expand(b, time_ids.shape[-1]) if time_ids.shape[0] == 1 else time_ids
        return self.unet(x, t, encoder_hidden_states=text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, **kw)


def encode_image(pipe: Any, image: Any) -> "torch.Tensor":
    """Latents ``[1, C, H/f, W/f]`` of an RGB uint8 image ``H x W x 3`` (numpy array or PIL).

    The image is mapped to ``[-1, 1]``, encoded with ``pipe.vae`` and the posterior *mean* is
    taken (deterministic, as DDPM_inversion and the diffusers community null-text pipeline do),
    then multiplied by ``vae.config.scaling_factor``. H and W must be multiples of the VAE's
    downsampling factor.
    """
    import numpy as np
    import torch

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got shape {arr.shape} dtype {arr.dtype}")
    vae = pipe.vae
    p = next(vae.parameters())
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].to(device=p.device, dtype=torch.float32)
    x = (x / 127.5 - 1.0).to(p.dtype)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean
    return latents * vae.config.scaling_factor


def decode_latents(pipe: Any, latents: "torch.Tensor") -> "np.ndarray":
    """Decode latents ``[1, C, h, w]`` (scaled by the VAE's scaling factor) to an RGB uint8
    image ``H x W x 3`` (the first of the batch)."""
    import torch

    vae = pipe.vae
    p = next(vae.parameters())
    with torch.no_grad():
        x = vae.decode(latents.to(device=p.device, dtype=p.dtype) / vae.config.scaling_factor).sample
    x = ((x[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


# --------------------------------------------------------------------------------------------
# Noise prediction and the DDIM step
# --------------------------------------------------------------------------------------------
def predict_eps(
    unet: Any,
    x: "torch.Tensor",
    t: int,
    cond: "torch.Tensor",
    guidance_scale: float = 1.0,
    uncond: "torch.Tensor | None" = None,
) -> "torch.Tensor":
    """Classifier-free-guided noise prediction ``eps_u + w (eps_c - eps_u)`` at ``(x, t)``.

    With ``guidance_scale == 1`` only the conditional branch runs (``uncond`` is not needed).
    Embeddings with batch 1 are broadcast to the batch of ``x``. Runs under the caller's grad
    mode (the null-text optimisation differentiates through it).
    """
    eps_c = _unet(unet, x, t, cond)
    if guidance_scale == 1.0:
        return eps_c
    if uncond is None:
        raise ValueError("guidance_scale != 1 needs an unconditional embedding (uncond)")
    eps_u = _unet(unet, x, t, uncond)
    return eps_u + guidance_scale * (eps_c - eps_u)


def _unet(unet: Any, x: "torch.Tensor", t: int, emb: "torch.Tensor") -> "torch.Tensor":
    emb = emb.to(device=x.device, dtype=x.dtype)
    if emb.shape[0] == 1 and x.shape[0] > 1:
        emb = emb.expand(x.shape[0], *emb.shape[1:])
    return unet(x, t, encoder_hidden_states=emb).sample


def ddim_move(x: "torch.Tensor", eps: "torch.Tensor", a_from: float, a_to: float) -> "torch.Tensor":
    """Deterministic DDIM move (eta = 0) of ``x`` from noise level ``a_from`` to ``a_to``:
    ``x0 = (x - sqrt(1-a_from) eps) / sqrt(a_from)``; ``sqrt(a_to) x0 + sqrt(1-a_to) eps``.
    Used both downwards (sampling) and upwards (inversion)."""
    x0 = (x - (1.0 - a_from) ** 0.5 * eps) / a_from**0.5
    return a_to**0.5 * x0 + (1.0 - a_to) ** 0.5 * eps


def _as_schedule(scheduler_config: Any, num_steps: int) -> DDIMSchedule:
    if isinstance(scheduler_config, DDIMSchedule):
        if len(scheduler_config.timesteps) != num_steps:
            raise ValueError("a DDIMSchedule passed as scheduler_config must have num_steps timesteps")
        return scheduler_config
    return make_schedule(scheduler_config, num_steps)


# --------------------------------------------------------------------------------------------
# DDIM inversion / sampling
# --------------------------------------------------------------------------------------------
def ddim_invert(
    unet: Any,
    scheduler_config: Any,
    latents0: "torch.Tensor",
    cond: "torch.Tensor",
    num_steps: int,
    guidance_scale: float = 1.0,
    uncond: "torch.Tensor | None" = None,
) -> list["torch.Tensor"]:
    """Deterministic DDIM inversion; returns the trajectory ``[z_0, z_1, ..., z_T]``.

    Reproduces prompt-to-prompt's ``NullInversion.ddim_loop`` / ``next_step`` and diffusers'
    ``DDIMInverseScheduler`` (with ``set_alpha_to_one`` semantics of the forward scheduler):
    walking the sampling timesteps in ascending order ``t_1 < t_2 < ... < t_T``, step ``k``
    predicts ``eps = eps_theta(z_{k-1}, t_k)`` -- the *current, less noisy* latent evaluated at
    the *next* timestep's label -- and moves ``z_{k-1}`` from noise level ``a_{t_{k-1}}`` (the
    clean start uses ``final_alpha_cumprod``) up to ``a_{t_k}`` with the DDIM formula. This is
    the usual linearisation ``eps(z_k, t_k) ~ eps(z_{k-1}, t_k)``, so :func:`ddim_sample`
    reconstructs ``z_0`` only approximately (exactly in the limit of small steps).

    ``z_j`` (``j >= 1``) sits at timestep ``schedule.timesteps[T - j]``; ``z_T`` is the start of
    :func:`ddim_sample`.
    """
    import torch

    sched = _as_schedule(scheduler_config, num_steps)
    ascending = list(reversed(sched.timesteps))
    z = latents0.detach()
    traj = [z]
    with torch.no_grad():
        for t in ascending:
            eps = predict_eps(unet, z, t, cond, guidance_scale, uncond)
            z = ddim_move(z, eps, sched.alpha(sched.prev(t)), sched.alpha(t))
            traj.append(z)
    return traj


def ddim_sample(
    unet: Any,
    scheduler_config: Any,
    z_T: "torch.Tensor",
    cond: "torch.Tensor",
    num_steps: int,
    guidance_scale: float = 1.0,
    uncond: "torch.Tensor | None" = None,
    uncond_per_step: Sequence["torch.Tensor"] | None = None,
    start_step: int = 0,
) -> "torch.Tensor":
    """Deterministic DDIM sampling (eta = 0) from ``z_T`` down to ``z_0`` with CFG.

    Step ``i`` (``timesteps[i] -> timesteps[i] - stride``) uses ``eps(z, timesteps[i])``, as
    ``DDIMScheduler.step`` with ``eta=0``. ``uncond_per_step`` (the output of
    :func:`null_text_invert`) replaces ``uncond`` with one embedding per step, indexed by the
    step number ``i`` (so it has ``num_steps`` entries; steps before ``start_step`` are skipped).
    ``start_step`` starts from the latent at ``timesteps[start_step]``, i.e. pass
    ``trajectory[num_steps - start_step]`` of :func:`ddim_invert` as ``z_T``.
    """
    import torch

    sched = _as_schedule(scheduler_config, num_steps)
    if uncond_per_step is not None and len(uncond_per_step) != num_steps:
        raise ValueError(f"uncond_per_step needs {num_steps} embeddings, got {len(uncond_per_step)}")
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step must be in [0, {num_steps}], got {start_step}")
    z = z_T.detach()
    with torch.no_grad():
        for i in range(start_step, num_steps):
            t = sched.timesteps[i]
            u = uncond_per_step[i] if uncond_per_step is not None else uncond
            eps = predict_eps(unet, z, t, cond, guidance_scale, u)
            z = ddim_move(z, eps, sched.alpha(t), sched.alpha(sched.prev(t)))
    return z


def ddim_sample_batch(
    unet: Any,
    scheduler_config: Any,
    z_T: "torch.Tensor",
    conds: "torch.Tensor",
    num_steps: int,
    guidance_scale: float = 1.0,
    uncond: "torch.Tensor | None" = None,
    uncond_per_step: Sequence["torch.Tensor"] | None = None,
    callback: Any = None,
) -> "torch.Tensor":
    """Deterministic DDIM sampling of several prompts side by side from one start, in *one* UNet
    call per step (the batch attention-editing methods need: Prompt-to-Prompt's
    ``text2image_ldm_stable`` without ``low_resource``).

    ``conds``: ``[B, L, D]`` text embeddings, one per branch (branch 0 is the source by
    convention); ``z_T``: ``[1, C, h, w]`` (shared by every branch) or ``[B, C, h, w]``. With
    ``guidance_scale != 1`` the UNet batch is ``[uncond x B, conds]`` (diffusers' CFG order, what
    :meth:`methods.diffusion.attention.BatchLayout.cfg` describes) with ``uncond`` (or
    ``uncond_per_step[i]`` at step ``i``, e.g. from :func:`null_text_invert`) broadcast to every
    branch; with ``guidance_scale == 1`` only ``conds`` (``BatchLayout.plain``). The step is the
    same arithmetic as :func:`ddim_sample`, whose single-prompt result it matches up to the
    float rounding of batching. ``callback(latents, step) -> latents`` runs after every step
    (e.g. :class:`methods.diffusion.attention.LocalBlend`). Attention control is the caller's
    (install it on ``unet`` around this call). Returns the ``[B, C, h, w]`` final latents.
    """
    import torch

    sched = _as_schedule(scheduler_config, num_steps)
    if uncond_per_step is not None and len(uncond_per_step) != num_steps:
        raise ValueError(f"uncond_per_step needs {num_steps} embeddings, got {len(uncond_per_step)}")
    guided = guidance_scale != 1.0
    if guided and uncond is None and uncond_per_step is None:
        raise ValueError("guidance_scale != 1 needs an unconditional embedding (uncond or uncond_per_step)")
    b = conds.shape[0]
    z = z_T.detach()
    if z.shape[0] == 1 and b > 1:
        z = z.expand(b, *z.shape[1:])
    z = z.clone()
    conds = conds.detach().to(device=z.device, dtype=z.dtype)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            if guided:
                u = uncond_per_step[i] if uncond_per_step is not None else uncond
                u = u.detach().to(device=z.device, dtype=z.dtype)
                u = u.expand(b, *u.shape[1:]) if u.shape[0] == 1 else u
                out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([u, conds])).sample
                eps_u, eps_c = out.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            else:
                eps = unet(z, t, encoder_hidden_states=conds).sample
            z = ddim_move(z, eps, sched.alpha(t), sched.alpha(sched.prev(t)))
            if callback is not None:
                z = callback(z, i)
    return z


# --------------------------------------------------------------------------------------------
# Null-text inversion (Mokady et al., CVPR 2023)
# --------------------------------------------------------------------------------------------
def null_text_invert(
    unet: Any,
    scheduler_config: Any,
    latents0: "torch.Tensor",
    cond: "torch.Tensor",
    uncond_init: "torch.Tensor",
    num_steps: int,
    guidance_scale: float = 7.5,
    inner_steps: int = 10,
    lr: float = 1e-2,
    early_stop: float = 1e-5,
) -> tuple["torch.Tensor", list["torch.Tensor"], list["torch.Tensor"]]:
    """Null-text inversion: per-step unconditional embeddings that make CFG DDIM sampling from
    the DDIM-inverted ``z_T`` retrace the inversion trajectory.

    Reproduces Mokady et al. (CVPR 2023), Algorithm 1, and ``null_optimization`` of
    ``google/prompt-to-prompt/null_text_w_ptp.ipynb``:

    1. pivot: ``z*_0 .. z*_T`` = :func:`ddim_invert` with guidance 1 (conditional only);
    2. ``z = z*_T``, ``u = uncond_init``; for every sampling step ``i`` (timestep ``t``):
       optimise ``u`` (initialised from the previous step's result) with Adam, at most
       ``inner_steps`` iterations, on ``|| DDIM_step(z, eps_cfg(z, t; cond, u)) - z*_{t-1} ||^2``
       (mean squared error), stopping early when the loss falls below
       ``early_stop + i * 2e-5`` (the reference's slack growing with the step), with the
       reference's learning-rate decay ``lr * (1 - i / 100)``;
       then ``z = DDIM_step(z, eps_cfg(z, t; cond, u*))`` with the optimised ``u*``.

    Returns ``(z_T, uncond_per_step, trajectory)``: ``z_T`` the pivot's noisy end (the start of
    sampling), ``uncond_per_step[i]`` the optimised embedding for sampling step ``i`` (detached,
    feed to :func:`ddim_sample`'s ``uncond_per_step``), and ``trajectory`` the pivot
    ``[z*_0, ..., z*_T]``. The UNet's parameters are not changed (only the embedding gets
    gradients; the UNet may have ``requires_grad_(False)``).
    """
    import torch

    sched = _as_schedule(scheduler_config, num_steps)
    pivot = ddim_invert(unet, sched, latents0, cond, num_steps, guidance_scale=1.0)
    cond = cond.detach().to(device=latents0.device, dtype=latents0.dtype)
    u = uncond_init.detach().to(device=latents0.device, dtype=latents0.dtype).clone()
    z = pivot[-1]
    per_step: list[torch.Tensor] = []
    for i, t in enumerate(sched.timesteps):
        a_t, a_prev = sched.alpha(t), sched.alpha(sched.prev(t))
        target = pivot[num_steps - i - 1]  # z*_{t-1}: the pivot one step less noisy
        with torch.no_grad():
            eps_c = _unet(unet, z, t, cond)  # fixed during the inner loop
        u = u.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
        with torch.enable_grad():
            for _ in range(inner_steps):
                eps_u = _unet(unet, z, t, u)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
                loss = torch.nn.functional.mse_loss(ddim_move(z, eps, a_t, a_prev), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if loss.item() < early_stop + i * 2e-5:
                    break
        u = u.detach()
        per_step.append(u.clone())
        with torch.no_grad():  # take the step with the optimised embedding (same arithmetic as ddim_sample)
            eps = predict_eps(unet, z, t, cond, guidance_scale, u)
            z = ddim_move(z, eps, a_t, a_prev)
    return pivot[-1], per_step, pivot


# --------------------------------------------------------------------------------------------
# Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024)
# --------------------------------------------------------------------------------------------
def _ddpm_mean_sigma(
    x: "torch.Tensor", eps: "torch.Tensor", a_t: float, a_prev: float, eta: float
) -> tuple["torch.Tensor", float]:
    """Mean and standard deviation of the stochastic DDIM step ``t -> prev`` (Song et al.,
    eq. 12) with ``sigma_t = eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev))``.

    With ``eta = 1`` this is the DDPM posterior ``q(x_{t-1} | x_t, x0_hat)`` variance, i.e. the
    sampler of DDPM_inversion (which uses diffusers' DDIM variance with eta=1 rather than
    ``DDPMScheduler.step``; on a strided schedule this is DDPM's posterior over the skipped
    interval)."""
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    sigma = eta * variance**0.5
    x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
    mean = a_prev**0.5 * x0 + max(1.0 - a_prev - sigma**2, 0.0) ** 0.5 * eps
    return mean, sigma


def ddpm_edit_friendly_invert(
    unet: Any,
    scheduler_config: Any,
    latents0: "torch.Tensor",
    cond: "torch.Tensor",
    num_steps: int,
    eta: float = 1.0,
    guidance_scale: float = 3.5,
    uncond: "torch.Tensor | None" = None,
    generator: "torch.Generator | None" = None,
    return_xts: bool = False,
) -> tuple["torch.Tensor", list["torch.Tensor"]] | tuple["torch.Tensor", list["torch.Tensor"], list["torch.Tensor"]]:
    """Edit-friendly DDPM inversion; returns ``(x_T, zs)`` (and the ``xts`` if ``return_xts``).

    Reproduces Huberman-Spiegelglas et al. (CVPR 2024), Algorithm 1, and
    ``inversion_forward_process`` of ``inbarhub/DDPM_inversion``:

    1. for every sampling timestep ``t`` draw ``x_t = sqrt(a_t) x_0 + sqrt(1-a_t) n_t`` with
       *independent* ``n_t ~ N(0, I)`` (from ``generator``) -- not a Markov chain;
    2. for each sampling step ``i`` (``t -> prev``, noisiest first) compute the sampler's mean
       ``mu_t(x_t)`` with the CFG noise prediction (``cond``, ``uncond``, ``guidance_scale``) and
       the noise map ``z_i = (x_prev - mu_t(x_t)) / sigma_t`` (``x_prev = x_0`` at the last step);
    3. as in the reference, ``x_prev`` is then replaced by ``mu_t(x_t) + sigma_t z_i`` so that the
       float rounding of the division is not carried into the next step.

    :func:`ddpm_sample_with_noise` with these ``zs`` and the same ``cond`` / ``uncond`` /
    ``guidance_scale`` / ``eta`` then reproduces ``x_0`` to float rounding. ``xts[i]`` is the
    latent at ``timesteps[i]`` (``xts[0] = x_T``); ``zs[i]`` belongs to sampling step ``i``.
    The sampler is the stochastic DDIM step with variance ``eta^2`` times the DDPM posterior
    variance (see :func:`_ddpm_mean_sigma`); ``eta`` must be > 0.
    """
    import torch

    if eta <= 0:
        raise ValueError("edit-friendly DDPM inversion needs eta > 0 (sigma_t divides the noise maps)")
    sched = _as_schedule(scheduler_config, num_steps)
    x0 = latents0.detach()
    # 1. independent samples of q(x_t | x_0) for every sampling timestep
    xts: list[torch.Tensor] = []
    for t in sched.timesteps:
        n = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        a = sched.alpha(t)
        xts.append(a**0.5 * x0 + (1.0 - a) ** 0.5 * n)
    # 2.-3. noise maps that make the sampler hit the next x_t exactly
    zs: list[torch.Tensor] = []
    x_t = xts[0]
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            a_t, a_prev = sched.alpha(t), sched.alpha(sched.prev(t))
            eps = predict_eps(unet, x_t, t, cond, guidance_scale, uncond)
            mean, sigma = _ddpm_mean_sigma(x_t, eps, a_t, a_prev, eta)
            x_prev = xts[i + 1] if i + 1 < num_steps else x0
            z = (x_prev - mean) / sigma
            zs.append(z)
            x_t = mean + sigma * z  # the corrected latent the sampler will see
            if i + 1 < num_steps:
                xts[i + 1] = x_t
    if return_xts:
        return xts[0], zs, xts
    return xts[0], zs


def ddpm_sample_with_noise(
    unet: Any,
    scheduler_config: Any,
    x_T: "torch.Tensor",
    zs: Sequence["torch.Tensor"],
    cond: "torch.Tensor",
    guidance_scale: float = 3.5,
    uncond: "torch.Tensor | None" = None,
    skip: int = 0,
    eta: float = 1.0,
) -> "torch.Tensor":
    """Stochastic DDIM/DDPM sampling driven by given noise maps (``inversion_reverse_process`` of
    ``inbarhub/DDPM_inversion``): ``x_prev = mu_t(x_t) + sigma_t zs[i]``.

    The number of steps is ``len(zs)`` (the inversion's). ``skip`` starts at sampling step
    ``skip``: ``x_T`` must then be the latent at ``timesteps[skip]`` (``xts[skip]`` of
    :func:`ddpm_edit_friendly_invert` with ``return_xts=True``) and ``zs[skip:]`` are used --
    the paper's ``T_skip`` for edits that keep more of the input's structure. An edit passes a
    different ``cond`` (target prompt) with the source's ``zs``.
    """
    import torch

    num_steps = len(zs)
    sched = _as_schedule(scheduler_config, num_steps)
    if not 0 <= skip <= num_steps:
        raise ValueError(f"skip must be in [0, {num_steps}], got {skip}")
    x = x_T.detach()
    with torch.no_grad():
        for i in range(skip, num_steps):
            t = sched.timesteps[i]
            eps = predict_eps(unet, x, t, cond, guidance_scale, uncond)
            mean, sigma = _ddpm_mean_sigma(x, eps, sched.alpha(t), sched.alpha(sched.prev(t)), eta)
            x = mean + sigma * zs[i].to(device=x.device, dtype=x.dtype)
    return x
