"""``blended_latent_diffusion`` / ``blended_latent_diffusion_sdxl``: Blended Latent Diffusion
(Avrahami, Fried & Lischinski, "Blended Latent Diffusion", ACM TOG 42(4), SIGGRAPH 2023;
official code ``omriav/blended-latent-diffusion``, scripts ``scripts/text_editing_SD2.py`` and
``scripts/text_editing_SDXL.py``) on Stable Diffusion 2.1-base and SDXL base 1.0.

The sample's mask is regenerated from the target caption while everything outside it is kept:

1. the source (resized to the working size) is VAE-encoded, posterior *mean* times the VAE's
   scaling factor (both official scripts, ``_image2latent``): ``z_src``;
2. the mask is resized to the latent grid with nearest-neighbour sampling and thresholded at 0.5
   (both scripts, ``_read_mask``: PIL ``NEAREST`` to 64 x 64 for SD2 at 512, 128 x 128 for SDXL at
   1024; here to the latent size of the working resolution): ``m``;
3. the schedule of ``num_inference_steps`` steps is cut: ``k = int(num_inference_steps *
   blending_percentage)`` leading (noisiest) timesteps are skipped, and the denoising starts from
   ``z_src`` noised to ``timesteps[k]`` with the seeded generator (the SDXL script; the paper's
   Algorithm 1 ``z_k ~ noise(z_init, k)``);
4. every remaining step is a classifier-free-guided text-to-image step toward the target caption
   (``eps_u + w (eps_c - eps_u)``, unconditional = the empty prompt; for SDXL the pipeline's own
   ``encode_prompt``, so SDXL base's ``force_zeros_for_empty_prompt`` zero negative embeddings,
   pooled ``text_embeds`` and ``time_ids`` (original = target size = working size, crop (0, 0)));
   after the step the latents outside ``m`` are replaced by ``z_src`` noised to the level the
   latents are now at (``blend_level='next'``: the next timestep; after the last step ``z_src``
   itself), with fresh noise drawn from the seeded generator for every step (the scripts draw
   fresh ``randn_like`` noise each step);
5. the latents are decoded; with ``paste_back`` the source pixels outside the sample's mask are
   copied back into the result (on the source grid).

Implementation choice: an own denoising loop rather than diffusers' inpaint pipelines with a
4-channel UNet. Those blend the same way but (a) VAE-encode by *sampling* the posterior, not its
mean, (b) reuse one fixed noise tensor for every blend, and (c) express the start through
``strength`` (``t_start = steps - int(steps * strength)``) and a pure-noise start at strength 1;
the own loop follows the official scripts in all three (posterior mean, fresh noise, the
``timesteps[int(len * blending_percentage):]`` cut) and keeps the scheduler the scripts use:

- SD: ``DDIMScheduler`` built as ``text_editing_SD2.py`` builds it -- the model's beta schedule
  (SD 2.1-base: scaled_linear 0.00085-0.012, the values the script hard-codes), ``clip_sample=False``,
  ``set_alpha_to_one=False``, the constructor's ``steps_offset=0`` and ``timestep_spacing='leading'``
  (timesteps 980, 960, ..., 0 for 50 steps); the model's ``prediction_type`` is kept (the script
  assumes epsilon, which SD 2.1-base is).
- SDXL: the pipeline's own scheduler, as the SDXL script (a ``StableDiffusionXLPipeline``
  subclass) uses it (SDXL base 1.0: ``EulerDiscreteScheduler``), with ``scale_model_input``.

Where this differs from the official scripts (documented choices):

- ``blend_level='next'`` (default) noises ``z_src`` to the level the latents have *after* the
  step (the next timestep; after the last step the clean ``z_src``), so that the background is
  exactly the source latents at the end. This is the convention of the repository's original LDM
  implementation (``ldm/models/diffusion/ddim.py`` blends with ``q_sample(x0, t)`` *before*
  denoising step ``t``) and of diffusers' inpaint pipelines. Both diffusers scripts instead blend
  after the step with ``add_noise(z_src, noise, t)`` at the timestep just denoised, one level
  noisier than the latents, and so leave ``sqrt(1 - alphas_cumprod[0])`` (about 0.03) of noise
  in the background at the end: ``blend_level='current'`` reproduces that.
- The SD2 script starts from pure Gaussian noise at ``timesteps[k]`` (``latents = torch.randn``,
  not the noised source), unlike its SDXL script and the paper's Algorithm 1; both adapters start
  from the noised source.
- The source is resized to the working size with the harness' bicubic resize (the scripts use
  bilinear) and the edit is resized back to the source size (bicubic).
- The paper's optional background-reconstruction step (a per-image fine-tune of the VAE decoder,
  ``scripts/reconstruct.py`` of the LDM version; absent from the SD2 / SDXL scripts) is not run;
  ``paste_back`` is the cheap equivalent for the unedited region (default false: the scripts'
  output is the decoded latents). An empty mask is accepted: the result is then the VAE
  reconstruction of the source (exactly, with ``blend_level='next'``).
- The scripts always apply guidance (SD2) or apply it for ``guidance_scale > 1`` (SDXL); both
  adapters apply it for ``guidance_scale > 1`` (diffusers' convention), else the conditional
  prediction alone.

Defaults (sources):

- ``model``: ``stabilityai/stable-diffusion-2-1-base`` (``text_editing_SD2.py --model_path``);
  ``stabilityai/stable-diffusion-xl-base-1.0`` (``text_editing_SDXL.py --model_path``).
- ``blending_percentage`` 0.25 (both scripts' ``--blending_start_percentage`` and
  ``edit_image(blending_percentage=0.25)``): 12 of 50 steps skipped, 38 run.
- ``num_inference_steps`` 50 (both ``edit_image`` defaults).
- ``guidance_scale`` 7.5 for SD (``text_editing_SD2.py``), 5.0 for SDXL
  (``text_editing_SDXL.py``, the same as ``StableDiffusionXLPipeline``'s default).
- ``resolution`` 512 for SD 2.1-base, 1024 for SDXL (the scripts' ``height`` / ``width``).
PartEdit (sec. 4, Table 1, Fig. 8) compares with "SDXL Latent Blending [2]" using ground-truth
masks; ZONE and CPAM cite Blended Latent Diffusion for SD. Neither states other settings, so the
official defaults are kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Any, ClassVar, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import TINY_RESOLUTION, TINY_STEPS, DiffusionMethod, auto_field, check_unit
from .sd_inpaint import masked_output

BLEND_LEVELS = ("next", "current")


def latent_mask(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """bool H x W mask -> float32 ``latent_hw`` mask of 0/1: PIL nearest resize, threshold 0.5
    (the official scripts' ``_read_mask``)."""
    from PIL import Image

    pil = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L")
    h, w = latent_hw
    if pil.size != (w, h):
        pil = pil.resize((w, h), Image.NEAREST)
    return (np.asarray(pil, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)


@contextlib.contextmanager
def _vae_in_fp32(vae: Any):
    """Run an fp16 VAE that asks for it (``force_upcast``) in fp32 for the block, then put it back
    (the SDXL script and diffusers' SDXL pipelines do the same: its fp16 VAE overflows)."""
    import torch

    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype=torch.float16)


def encode_source(pipe: Any, image_u8: np.ndarray) -> Any:
    """VAE posterior mean x scaling factor of an RGB uint8 image, in the UNet's dtype."""
    from .diffusion.inversion import encode_image

    with _vae_in_fp32(pipe.vae):
        z = encode_image(pipe, image_u8)
    return z.to(pipe.unet.dtype)


def decode(pipe: Any, latents: Any) -> np.ndarray:
    """Latents -> RGB uint8 image (clamped to [-1, 1], rounded)."""
    from .diffusion.inversion import decode_latents

    with _vae_in_fp32(pipe.vae):
        return decode_latents(pipe, latents)


def blend_denoise(
    unet_eps: Any,
    scheduler: Any,
    source_latents: Any,
    mask: Any,
    num_inference_steps: int,
    blending_percentage: float,
    generator: Any,
    blend_level: str = "next",
) -> Any:
    """The Blended Latent Diffusion loop; returns the final latents.

    ``unet_eps(x, t)`` is the (guided) model output at ``(x, t)`` for the scheduler's step;
    ``scheduler`` is a fresh scheduler (its timesteps are set here); ``mask`` is 1 where the
    latents are generated, 0 where the source is kept, broadcastable to ``source_latents``.
    """
    from diffusers.utils.torch_utils import randn_tensor

    scheduler.set_timesteps(num_inference_steps, device=source_latents.device)
    timesteps = scheduler.timesteps
    k = int(len(timesteps) * blending_percentage)
    run = timesteps[k:]
    if len(run) == 0:
        raise ValueError(
            f"blending_percentage {blending_percentage} skips all {len(timesteps)} steps; nothing to denoise"
        )

    def noise() -> Any:
        return randn_tensor(source_latents.shape, generator=generator, device=source_latents.device,
                            dtype=source_latents.dtype)

    latents = scheduler.add_noise(source_latents, noise(), run[:1])
    mask = mask.to(device=source_latents.device, dtype=source_latents.dtype)
    for i, t in enumerate(run):
        model_input = scheduler.scale_model_input(latents, t)
        eps = unet_eps(model_input, t)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        if blend_level == "current":
            background = scheduler.add_noise(source_latents, noise(), t.reshape(1))
        elif i + 1 < len(run):
            background = scheduler.add_noise(source_latents, noise(), run[i + 1:i + 2])
        else:
            background = source_latents
        latents = latents * mask + background * (1 - mask)
    return latents


class _BlendedLatentDiffusion(DiffusionMethod):
    """Shared code of the SD and SDXL variants."""

    version = "1"
    requires = ("source", "mask", "target_caption")
    prompt_field = "target_caption"
    owner: ClassVar[str] = "blended_latent_diffusion"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        # fraction of the schedule skipped: denoising starts from the source noised to timesteps[k],
        # k = int(steps * blending_percentage), in [0, 1)
        blending_percentage: float = 0.25
        blend_level: Literal["next", "current"] = "next"  # noise level of the background blend
        paste_back: bool = False  # copy the source pixels outside the mask back into the result

        def __post_init__(self) -> None:
            super().__post_init__()
            check_unit("blended_latent_diffusion", "blending_percentage", self.blending_percentage, high_open=True)
            if self.blend_level not in BLEND_LEVELS:
                raise ValueError(
                    f"blended_latent_diffusion: 'blend_level' must be one of {list(BLEND_LEVELS)}, got {self.blend_level!r}"
                )
            if not isinstance(self.paste_back, bool):
                raise ValueError(f"blended_latent_diffusion: 'paste_back' must be true or false, got {self.paste_back!r}")

    def __init__(self, params: "_BlendedLatentDiffusion.Params | None" = None):
        super().__init__(params)
        self._sample: Sample | None = None
        self._last: dict[str, Any] = {}

    # -- hooks for the two variants -----------------------------------------------------------
    def make_scheduler(self, pipe: Any) -> Any:
        """A fresh scheduler for one edit (the shared pipeline's scheduler is never mutated)."""
        raise NotImplementedError

    def conditioning(self, pipe: Any, prompt: str, size_hw: tuple[int, int], do_cfg: bool) -> Any:
        """``eps(x, t)``: the guided model output for the prompt."""
        raise NotImplementedError

    # -- the edit ------------------------------------------------------------------------------
    def run(self, pipe: Any, image_u8: np.ndarray, mask: np.ndarray, prompt: str, generator: Any) -> Any:
        """Final latents of the blended denoising of ``image_u8`` (working size) under ``mask``
        (bool, any size: resized to the latent grid)."""
        import torch

        p = self.params
        z_src = encode_source(pipe, image_u8)
        m = latent_mask(mask, tuple(z_src.shape[-2:]))
        m_t = torch.from_numpy(m)[None, None]
        eps = self.conditioning(pipe, prompt, image_u8.shape[:2], p.guidance_scale > 1.0)
        scheduler = self.make_scheduler(pipe)
        latents = blend_denoise(eps, scheduler, z_src, m_t, p.num_inference_steps, p.blending_percentage,
                                generator, p.blend_level)
        k = int(p.num_inference_steps * p.blending_percentage)
        self._last = {
            "scheduler": type(scheduler).__name__,
            "start_timestep": int(scheduler.timesteps[k]),
            "denoising_steps": int(len(scheduler.timesteps) - k),
            "latent_mask_hw": [int(m.shape[0]), int(m.shape[1])],
            "latent_mask_fraction": float(m.mean()),
        }
        return latents

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        assert self._sample is not None
        latents = self.run(pipe, np.asarray(image.convert("RGB")), self._sample.mask, prompt, generator)
        # uint8 -> [0, 1] float: from_pipeline_output rounds it back to the same uint8 values
        return types.SimpleNamespace(images=decode(pipe, latents).astype(np.float32) / 255.0)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        self._sample = sample
        self._last = {}
        try:
            out = super().edit(sample, seed)
        finally:
            self._sample = None
        return masked_output(sample, out.image, {**out.info, **self._last}, self.params.paste_back)

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {
            "blending_percentage": float(p.blending_percentage),
            "blend_level": p.blend_level,
            "paste_back": bool(p.paste_back),
        }


def _guided(unet_call: Any, guidance_scale: float, do_cfg: bool) -> Any:
    """``eps(x, t)`` from ``unet_call(x_batch, t)`` (the batch is [uncond, cond] when guiding)."""
    import torch

    def eps(x: Any, t: Any) -> Any:
        if not do_cfg:
            return unet_call(x, t)
        e_u, e_c = unet_call(torch.cat([x, x]), t).chunk(2)
        return e_u + guidance_scale * (e_c - e_u)

    return eps


@METHODS.register("blended_latent_diffusion")
class BlendedLatentDiffusion(_BlendedLatentDiffusion):
    """Blended Latent Diffusion on Stable Diffusion 2.1-base (``text_editing_SD2.py``)."""

    tiny_kind = "sd15"

    @dataclasses.dataclass(frozen=True)
    class Params(_BlendedLatentDiffusion.Params):
        model: str = "stabilityai/stable-diffusion-2-1-base"  # text_editing_SD2.py --model_path
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # text_editing_SD2.py edit_image default
        guidance_scale: float = 7.5  # text_editing_SD2.py edit_image default
        resolution: int | Literal["auto"] | None = auto_field(512, TINY_RESOLUTION)  # text_editing_SD2.py height / width

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def make_scheduler(self, pipe: Any) -> Any:
        from diffusers import DDIMScheduler

        # text_editing_SD2.py: DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=
        # "scaled_linear", clip_sample=False, set_alpha_to_one=False), other arguments default.
        return DDIMScheduler.from_config(
            pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=0,
            timestep_spacing="leading", thresholding=False,
        )

    def conditioning(self, pipe: Any, prompt: str, size_hw: tuple[int, int], do_cfg: bool) -> Any:
        import torch

        from .diffusion.inversion import encode_prompt

        cond = encode_prompt(pipe, prompt)
        emb = torch.cat([encode_prompt(pipe, ""), cond]) if do_cfg else cond
        emb = emb.to(pipe.unet.dtype)
        unet = pipe.unet

        def call(x: Any, t: Any) -> Any:
            return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]

        return _guided(call, float(self.params.guidance_scale), do_cfg)


@METHODS.register("blended_latent_diffusion_sdxl")
class BlendedLatentDiffusionSDXL(_BlendedLatentDiffusion):
    """Blended Latent Diffusion on SDXL base 1.0 (``text_editing_SDXL.py``)."""

    tiny_kind = "sdxl"

    @dataclasses.dataclass(frozen=True)
    class Params(_BlendedLatentDiffusion.Params):
        model: str = "stabilityai/stable-diffusion-xl-base-1.0"  # text_editing_SDXL.py --model_path
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # text_editing_SDXL.py edit_image default
        guidance_scale: float = 5.0  # text_editing_SDXL.py edit_image default
        resolution: int | Literal["auto"] | None = auto_field(1024, TINY_RESOLUTION)  # text_editing_SDXL.py height / width

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def make_scheduler(self, pipe: Any) -> Any:
        # the SDXL script uses the pipeline's own scheduler (SDXL base 1.0: EulerDiscreteScheduler)
        return type(pipe.scheduler).from_config(pipe.scheduler.config)

    def conditioning(self, pipe: Any, prompt: str, size_hw: tuple[int, int], do_cfg: bool) -> Any:
        import torch

        device = pipe.unet.device
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg
        )
        size = (int(size_hw[0]), int(size_hw[1]))
        proj = getattr(pipe.text_encoder_2, "config", None)
        proj_dim = int(proj.projection_dim) if proj is not None else int(ppe.shape[-1])
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj_dim)
        if do_cfg:
            pe, ppe, time_ids = torch.cat([npe, pe]), torch.cat([nppe, ppe]), torch.cat([time_ids, time_ids])
        dtype = pipe.unet.dtype
        pe, ppe, time_ids = pe.to(device, dtype), ppe.to(device, dtype), time_ids.to(device, dtype)
        unet = pipe.unet
        added = {"text_embeds": ppe, "time_ids": time_ids}

        def call(x: Any, t: Any) -> Any:
            return unet(x, t, encoder_hidden_states=pe, added_cond_kwargs=added, return_dict=False)[0]

        return _guided(call, float(self.params.guidance_scale), do_cfg)
