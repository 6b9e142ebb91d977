"""``imagic``: Imagic (Kawar, Zada, Lang, Tov, Chang, Dekel, Mosseri, Irani, "Imagic: Text-Based Real
Image Editing with Diffusion Models", CVPR 2023) on Stable Diffusion 1.x: the fine-tuning baseline
("Imagic (FT)") of CPAM's Table 2, written on the shared plumbing of ``methods/diffusion``.

One edit, three stages (paper, Sec. 3 and Fig. 3):

1. **Text-embedding optimisation**: ``e_tgt`` = the CLIP text embedding of the target caption
   (``[1, 77, 768]``); ``e_opt``, initialised to ``e_tgt``, is optimised with Adam on the
   denoising loss ``|| eps - eps_theta(sqrt(a_t) x + sqrt(1 - a_t) eps, t, e_opt) ||^2`` of the
   source's latent ``x``, one random timestep (uniform over the training schedule) and one
   Gaussian noise draw per step; the model is frozen.
2. **Model fine-tuning**: with ``e_opt`` frozen, every UNet weight is optimised on the same loss
   (the paper fine-tunes the diffusion model; the community SD pipeline fine-tunes the UNet, VAE
   and text encoder frozen). The fine-tuning runs on a **copy** of the UNet (float32), made per
   edit: the loaded pipeline is shared by every edit and every method of the process
   (``load_pipeline`` caches it) and is never modified.
3. **Generation**: DDIM sampling (deterministic, DDIM's own eta = 0) from Gaussian noise with the
   fine-tuned UNet, conditioned on the interpolation ``eta * e_tgt + (1 - eta) * e_opt`` (paper,
   Eq. 3), classifier-free guided by the empty prompt's embedding. ``eta = 0`` reconstructs the
   input, ``eta = 1`` follows the target text; ``eta > 1`` extrapolates (the community pipeline
   allows it).

Defaults and their sources:

- ``embedding_steps`` 500, ``embedding_lr`` 1e-3, ``finetune_steps`` 1000, ``finetune_lr`` 2e-6,
  Adam (default betas): the Stable Diffusion implementation, diffusers' community pipeline
  ``examples/community/imagic_stable_diffusion.py`` (``ImagicStableDiffusionPipeline.train``
  defaults ``text_embedding_optimization_steps=500``, ``embedding_learning_rate=0.001``,
  ``model_fine_tuning_optimization_steps=1000``, ``diffusion_model_learning_rate=2e-6``,
  ``torch.optim.Adam``). The paper's Imagen values (100 steps at lr 1e-3, then 1500 steps at
  lr 5e-7) are for Imagen's 64 x 64 base model: set them explicitly to use them.
- ``eta`` 0.7: the middle of the interpolation range the paper's analysis of eta (Sec. 4)
  reports edits to appear in for most images (about 0.6-0.8; no copy of the Imagic paper is in
  the repository, so the range is quoted from memory of the paper, not checked). The community
  pipeline's ``__call__`` default is ``alpha=1.2`` (its README runs 1, 1.5 and 2): set ``eta``
  for those. The paper picks eta per image by hand; a benchmark run uses one value.
- ``num_inference_steps`` 50, ``guidance_scale`` 7.5, ``resolution`` 512: the community
  pipeline's ``__call__`` defaults and its README (image resized to 512 x 512, DDIM scheduler).
- ``model``: Stable Diffusion 1.5 (CPAM, Sec. 5, compares every method on SD-1.5; the community
  README loads ``CompVis/stable-diffusion-v1-4``).

Not specified by the paper (parameters; the values are the community pipeline's choices):

- ``latent``: ``sample`` = the VAE posterior is sampled with the edit's generator
  (``latent_dist.sample(generator)`` as the community pipeline), ``mean`` = its mean.
- timesteps for the losses: uniform integers in ``[0, num_train_timesteps)``; noise added with
  the checkpoint's training schedule (``scheduler.add_noise``); epsilon targets (a
  ``v_prediction`` checkpoint is refused with a message).
- one noise draw and one timestep per optimisation step (batch 1), no learning-rate schedule,
  no gradient accumulation (the community pipeline's ``gradient_accumulation_steps=1``).
- the unconditional embedding of guidance: the empty prompt's.

Deviations from the community pipeline, each for a reason:

- the UNet copy is float32 whatever ``dtype`` the pipeline is loaded in: Adam updates of lr 2e-6
  are below float16's resolution for weights of order 1; the VAE and text encoder keep ``dtype``.
- every random draw (VAE posterior, noise, timesteps, initial latent) comes from the edit's seeded
  generator (the community pipeline draws the training noise from torch's global generator), so
  that the same seed gives the same edit.
- ``cpu_offload`` is refused: the whole UNet is trained on the device.

Costs: preparation (``prep_seconds``) = image encoding + embedding optimisation + fine-tuning
(including the UNet copy); inference = sampling + decoding. Network counts: the UNet copy is
counted as ``unet`` (``copy.deepcopy`` keeps the shared UNet's counting hook): ``embedding_steps
+ finetune_steps`` forward calls of 1 row for the optimisation (backward passes are not calls),
then ``2 * num_inference_steps`` (``num_inference_steps`` with ``guidance_scale = 1``) for the
sampling; 2 text-encoder calls (target, empty), 1 VAE encode, 1 VAE decode.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import types
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import (TINY_RESOLUTION, TINY_STEPS, DiffusionMethod, _check_number, auto_field,
                                check_choice, from_pipeline_output)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

LATENTS = ("sample", "mean")
# Optimisation steps of each stage with backbone=tiny: enough to move the tiny model, a smoke run.
TINY_OPT_STEPS = 4
OWNER = "imagic"


@dataclasses.dataclass
class Stage:
    """What one optimisation stage did: the per-step training losses (each at its own random
    timestep and noise: noisy, compare windows, not single steps) and its wall time."""

    losses: list[float]
    seconds: float

    def summary(self) -> dict[str, float | None]:
        """Mean loss over the first and the last tenth of the steps (at least one step each; None
        for a stage of 0 steps)."""
        if not self.losses:
            return {"loss_start": None, "loss_end": None, "seconds": float(self.seconds)}
        k = max(1, len(self.losses) // 10)
        return {"loss_start": float(np.mean(self.losses[:k])), "loss_end": float(np.mean(self.losses[-k:])),
                "seconds": float(self.seconds)}


def noise_scheduler(scheduler_config: Any) -> Any:
    """A DDPM scheduler of the checkpoint's training noise schedule (``add_noise``); refuses
    checkpoints that do not predict epsilon (the losses and the DDIM sampler here assume it)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler_config)
    kind = sched.config.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise ValueError(f"{OWNER}: the checkpoint's scheduler predicts '{kind}'; Imagic here needs an "
                         f"epsilon-prediction model (Stable Diffusion 1.x)")
    return sched


def denoising_loss(unet: Any, sched: Any, latents: "torch.Tensor", emb: "torch.Tensor", t: "torch.Tensor",
                   noise: "torch.Tensor") -> "torch.Tensor":
    """``mean || noise - eps_theta(add_noise(latents, noise, t), t, emb) ||^2`` (Imagic's loss, the
    standard diffusion objective), under the caller's grad mode. ``t``: ``[1]`` integer timestep."""
    import torch.nn.functional as F

    noisy = sched.add_noise(latents, noise, t)
    p = next(unet.parameters())
    pred = unet(noisy.to(p.dtype), t, encoder_hidden_states=emb.to(p.dtype)).sample
    return F.mse_loss(pred.float(), noise.float())


def draw(sched: Any, latents: "torch.Tensor", generator: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One training draw: a timestep uniform over ``[0, num_train_timesteps)`` and a Gaussian noise
    of the latents' shape, both from ``generator``."""
    import torch

    t = torch.randint(int(sched.config.num_train_timesteps), (1,), generator=generator,
                      device=generator.device).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device,
                        dtype=torch.float32).to(latents.device)
    return t, noise


def optimise_embedding(unet: Any, sched: Any, latents: "torch.Tensor", e_tgt: "torch.Tensor", steps: int,
                       lr: float, generator: Any) -> tuple["torch.Tensor", Stage]:
    """Stage 1: ``e_opt`` (float32, initialised to ``e_tgt``) optimised with Adam(lr) for ``steps``
    steps of :func:`denoising_loss`; ``unet`` frozen (its ``requires_grad`` flags are restored).
    Returns the detached ``e_opt`` and the stage's record."""
    import torch

    t0 = time.perf_counter()
    e_opt = e_tgt.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([e_opt], lr=lr)
    flags = [q.requires_grad for q in unet.parameters()]
    unet.requires_grad_(False)
    losses: list[float] = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                t, noise = draw(sched, latents, generator)
                loss = denoising_loss(unet, sched, latents, e_opt, t, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for q, flag in zip(unet.parameters(), flags):
            q.requires_grad_(flag)
    return e_opt.detach(), Stage(losses, time.perf_counter() - t0)


def finetune(unet: Any, sched: Any, latents: "torch.Tensor", e_opt: "torch.Tensor", steps: int, lr: float,
             generator: Any) -> Stage:
    """Stage 2: every weight of ``unet`` (modified in place: pass a copy) optimised with Adam(lr)
    for ``steps`` steps of :func:`denoising_loss` conditioned on the frozen ``e_opt``. The UNet is
    left in eval mode without gradients."""
    import torch

    t0 = time.perf_counter()
    unet.requires_grad_(True)
    unet.train()
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    emb = e_opt.detach()
    losses: list[float] = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                t, noise = draw(sched, latents, generator)
                loss = denoising_loss(unet, sched, latents, emb, t, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        unet.requires_grad_(False)
        unet.eval()
        del opt  # Adam's two moments per weight: free them before sampling
    return Stage(losses, time.perf_counter() - t0)


def trainable_copy(unet: Any) -> Any:
    """A float32 copy of ``unet`` to fine-tune. ``copy.deepcopy`` keeps the module's forward hooks,
    so the copy's calls are counted under the shared UNet's name (``unet``) by the same counting
    hook (:mod:`methods.diffusion.counting`): it must not be watched a second time."""
    import torch

    twin = copy.deepcopy(unet)
    if next(twin.parameters()).dtype != torch.float32:
        twin = twin.to(dtype=torch.float32)
    return twin


def interpolate(e_tgt: "torch.Tensor", e_opt: "torch.Tensor", eta: float) -> "torch.Tensor":
    """The paper's Eq. 3: ``eta * e_tgt + (1 - eta) * e_opt``."""
    return eta * e_tgt.float() + (1.0 - eta) * e_opt.float()


def encode_latents(pipe: Any, image: Any, mode: str, generator: Any) -> "torch.Tensor":
    """Scaled VAE latents ``[1, 4, H/8, W/8]`` (float32) of an RGB uint8 image: the posterior's
    sample (drawn with ``generator``, as the community pipeline) or its mean."""
    import torch

    arr = np.asarray(image)
    vae = pipe.vae
    p = next(vae.parameters())
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].to(device=p.device, dtype=torch.float32)
    x = (x / 127.5 - 1.0).to(p.dtype)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = dist.mean if mode == "mean" else dist.sample(generator=generator)
    return (z * vae.config.scaling_factor).float()


def generate(unet: Any, scheduler_config: Any, cond: "torch.Tensor", uncond: "torch.Tensor",
             shape: tuple[int, ...], steps: int, guidance_scale: float, generator: Any) -> "torch.Tensor":
    """Stage 3: DDIM sampling (:func:`methods.diffusion.inversion.ddim_sample`) from Gaussian noise
    drawn with ``generator``, conditioned on ``cond`` and guided by ``uncond``."""
    import torch

    from .diffusion.inversion import ddim_sample

    p = next(unet.parameters())
    z_T = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(p.device)
    return ddim_sample(unet, scheduler_config, z_T.to(p.dtype), cond.to(p.dtype), steps, guidance_scale,
                       uncond.to(p.dtype))


@METHODS.register("imagic")
class Imagic(DiffusionMethod):
    """Text-embedding optimisation, UNet fine-tuning (on a per-edit copy), interpolated generation."""

    version = "1"
    requires = ("source", "target_caption")
    tiny_kind = "sd15"
    prompt_field = "target_caption"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # CPAM Sec. 5: SD-1.5 for every method
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # community __call__ default
        guidance_scale: float = 7.5  # community __call__ default
        resolution: int | Literal["auto"] | None = auto_field(512, TINY_RESOLUTION)  # community README: 512 x 512
        eta: float = 0.7  # paper Sec. 4 (0.6-0.8 usually good); community __call__ default alpha=1.2
        embedding_steps: int | Literal["auto"] = auto_field(500, TINY_OPT_STEPS)  # community train() default
        embedding_lr: float = 1e-3  # community train() default (also the paper's Imagen value)
        finetune_steps: int | Literal["auto"] = auto_field(1000, TINY_OPT_STEPS)  # community train() default
        finetune_lr: float = 2e-6  # community train() default (Imagen: 5e-7)
        latent: Literal["sample", "mean"] = "sample"  # not specified by the paper; community: posterior sample

        def __post_init__(self) -> None:
            super().__post_init__()
            _check_number(OWNER, "eta", self.eta, 0.0)
            _check_number(OWNER, "embedding_steps", self.embedding_steps, 0, integer=True)
            _check_number(OWNER, "finetune_steps", self.finetune_steps, 0, integer=True)
            _check_number(OWNER, "embedding_lr", self.embedding_lr, 0.0, inclusive=False)
            _check_number(OWNER, "finetune_lr", self.finetune_lr, 0.0, inclusive=False)
            check_choice(OWNER, "latent", self.latent, LATENTS)
            if self.cpu_offload:
                raise ValueError(f"{OWNER}: 'cpu_offload' is not supported: the whole UNet is fine-tuned on the device")

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        """The three stages on the working-size PIL ``image``; a namespace with ``images`` (float
        ``[1, H, W, 3]`` in [0, 1], the pipelines' ``output_type='np'`` convention), ``prep_end``
        (``perf_counter`` when fine-tuning ended) and ``info`` (the stages' records)."""
        import torch

        from .diffusion.inversion import decode_latents, encode_prompt

        p = self.params
        sched = noise_scheduler(pipe.scheduler.config)
        with torch.no_grad():
            e_tgt = encode_prompt(pipe, prompt).float()
            uncond = encode_prompt(pipe, "").float()
        latents = encode_latents(pipe, np.asarray(image), p.latent, generator)
        unet = trainable_copy(pipe.unet)
        device = next(unet.parameters()).device
        latents, e_tgt, uncond = (x.to(device) for x in (latents, e_tgt, uncond))
        try:
            e_opt, stage1 = optimise_embedding(unet, sched, latents, e_tgt, int(p.embedding_steps),
                                               float(p.embedding_lr), generator)
            stage2 = finetune(unet, sched, latents, e_opt, int(p.finetune_steps), float(p.finetune_lr), generator)
            prep_end = time.perf_counter()
            cond = interpolate(e_tgt, e_opt, float(p.eta))
            z0 = generate(unet, pipe.scheduler.config, cond, uncond, tuple(latents.shape),
                          int(p.num_inference_steps), float(p.guidance_scale), generator)
        finally:
            del unet  # the per-edit copy (and its gradients) is dropped with the edit
        u8 = decode_latents(pipe, z0)
        info = {
            "embedding_stage": {"steps": int(p.embedding_steps), **stage1.summary()},
            "finetune_stage": {"steps": int(p.finetune_steps), **stage2.summary()},
            # how far stage 1 moved the embedding (relative L2): 0 when it did not run
            "embedding_shift": float((e_opt - e_tgt).norm() / e_tgt.norm()),
        }
        # from_pipeline_output maps [0, 1] floats back to uint8 with rint: exact for k / 255.
        return types.SimpleNamespace(images=u8[None].astype(np.float32) / 255.0, prep_end=prep_end, info=info)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        """The base's edit, with preparation = image encoding + embedding optimisation + fine-tuning
        and inference = sampling + decoding."""
        start = self.begin_edit(sample, seed)
        prompt = str(sample.target_caption)
        out = self.call_pipeline(start.loaded.pipeline, start.image, prompt, start.generator)
        edited = from_pipeline_output(out.images, start.source_hw)
        info = self.edit_info(start, seed, out.prep_end - start.t0, prompt_field=self.prompt_field, prompt=prompt,
                              **out.info)
        return MethodOutput(image=edited, info=info)

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {
            "eta": float(p.eta),
            "embedding_lr": float(p.embedding_lr),
            "finetune_lr": float(p.finetune_lr),
            "latent": str(p.latent),
            "scheduler": "DDIM (eta 0) sampling; DDPM training noise schedule",
            "optimizer": "Adam",
        }
