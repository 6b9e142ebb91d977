"""ZONE's fused InstructPix2Pix sampler (paper sec. 4.2, Eq. 5; code ``null_text_w_ptp.py``
``text2image_instructpix2pix_blend`` and ``inference.py`` ``fused_ip2p``), and the input
preparation of ``ptp_utils.check_image_size``.

The loop. InstructPix2Pix (IP2P) and MagicBrush (MB) denoise in lock-step from the same initial
noise, each with its own scheduler instance (both built from IP2P's scheduler config, as the
code does: ``DPMSolverMultistepScheduler.from_config(ip2p_pipe.scheduler.config)`` twice). MB
is conditioned on IP2P's text embeddings and IP2P's VAE image latents (the MB pipeline's own
text encoder and VAE never run). Every step:

1. MB: one UNet call on the 3 guidance rows [text + image, null + image, null + no image]
   (diffusers' IP2P layout), guidance ``e_u + s_T (e_t - e_i) + s_I (e_i - e_u)``, its own
   scheduler step on its own latent (MB's trajectory is never fused);
2. IP2P: the same on the IP2P latent (the attention controller, if any, is on this UNet only);
3. fusion: ``z_ip2p <- (z_ip2p + beta * z_mb) / (1 + beta)`` (Eq. 5).

Two UNet calls per step, nothing more; counted as ``unet`` (IP2P) and ``unet_magicbrush``
(:func:`call_counted_as`). The fused IP2P latent is decoded with IP2P's VAE: the
canvas ``I_sty``. With ``mb_unet=None`` the loop is IP2P alone (the same operations in the same
order without steps 1 and 3): with ``beta = 0`` the fused loop gives it bit for bit, since
``z + 0 * z_mb`` is ``z`` exactly and division by 1 is exact.

Noise. The code draws the initial noise with a CPU ``torch.Generator`` (seed 42) whatever the
device; :func:`fused_sample` does the same with the caller's generator, so an edit's noise is the
same on every device.

torch and diffusers are imported lazily (importing ``methods`` imports neither).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from ..diffusion import counting

#: ``check_image_size`` defaults: longest side at most 512, both sides padded to a multiple of 32.
MAX_SIZE = 512
SIDE_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class Padding:
    """How :func:`prepare_input` turned a source of ``source_hw`` into the working image:
    resized to ``resized_hw`` (longest side <= max size), then padded with black by ``top``,
    ``bottom``, ``left``, ``right`` pixels to ``padded_hw``."""

    source_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    top: int
    bottom: int
    left: int
    right: int

    @property
    def padded_hw(self) -> tuple[int, int]:
        return (self.resized_hw[0] + self.top + self.bottom, self.resized_hw[1] + self.left + self.right)


def plan_input(source_hw: tuple[int, int], max_size: int | None = MAX_SIZE,
               multiple: int = SIDE_MULTIPLE) -> Padding:
    """The resize and padding ``check_image_size`` applies to an image of ``source_hw``:
    when a side exceeds ``max_size`` the longest side becomes ``max_size`` and the other
    ``int(side * max_size / longest)`` (truncated, as the code); then each side is padded up to
    the next multiple of ``multiple``, half (rounded down) before, the rest after.
    ``max_size=None`` never resizes."""
    h, w = int(source_hw[0]), int(source_hw[1])
    rh, rw = h, w
    if max_size is not None and (w > max_size or h > max_size):
        if w > h:
            rw, rh = max_size, int(h * max_size / w)
        else:
            rh, rw = max_size, int(w * max_size / h)
    th, tw = math.ceil(rh / multiple) * multiple, math.ceil(rw / multiple) * multiple
    py, px = th - rh, tw - rw
    return Padding((h, w), (rh, rw), py // 2, py - py // 2, px // 2, px - px // 2)


def prepare_input(image: np.ndarray, max_size: int | None = MAX_SIZE,
                  multiple: int = SIDE_MULTIPLE) -> tuple[np.ndarray, Padding]:
    """RGB uint8 ``image`` -> (working image, :class:`Padding`) as ``check_image_size``: resized
    (PIL bicubic, the default resampling of ``Image.resize`` the code calls) when a side exceeds
    ``max_size``, then centred black padding (``ImageOps.expand`` with ``fill='black'``) to
    multiples of ``multiple``."""
    from PIL import Image, ImageOps

    plan = plan_input(image.shape[:2], max_size, multiple)
    pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    if plan.resized_hw != plan.source_hw:
        pil = pil.resize((plan.resized_hw[1], plan.resized_hw[0]), Image.BICUBIC)
    if plan.padded_hw != plan.resized_hw:
        pil = ImageOps.expand(pil, (plan.left, plan.top, plan.right, plan.bottom), fill="black")
    return np.asarray(pil), plan


def undo_padding(array: np.ndarray, plan: Padding, *, is_mask: bool = False) -> np.ndarray:
    """Crop the padding off a working-size image or mask and resize it back to the source size
    (bicubic for images, nearest for bool masks), so the edit and its masks have the source's
    size. Nothing is resampled when the working image was not resized."""
    from PIL import Image

    h, w = plan.padded_hw
    if array.shape[:2] != (h, w):
        raise ValueError(f"undo_padding: expected a {h}x{w} array, got {array.shape[:2]}")
    rh, rw = plan.resized_hw
    crop = array[plan.top:plan.top + rh, plan.left:plan.left + rw]
    if (rh, rw) == plan.source_hw:
        return np.ascontiguousarray(crop)
    sh, sw = plan.source_hw
    if is_mask:
        pil = Image.fromarray(crop.astype(np.uint8) * 255, mode="L").resize((sw, sh), Image.NEAREST)
        return np.asarray(pil) > 127
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop), mode="RGB").resize((sw, sh), Image.BICUBIC))


def fuse(z_ip2p: Any, z_mb: Any, beta: float) -> Any:
    """Eq. 5: ``(z_ip2p + beta * z_mb) / (1 + beta)``, in this order of operations (the code's)."""
    return (z_ip2p + beta * z_mb) / (1 + beta)


def guided(noise_pred: Any, guidance_scale: float, image_guidance_scale: float) -> Any:
    """InstructPix2Pix's two-way classifier-free guidance on the rows [text+image, image, none]
    (paper Eq. 2; diffusers' pipeline and the code compute it in this form and order)."""
    text, image, uncond = noise_pred.chunk(3)
    return uncond + guidance_scale * (text - image) + image_guidance_scale * (image - uncond)


@dataclasses.dataclass
class FusedResult:
    """What :func:`fused_sample` returns: the fused IP2P latent (decoded: ``image``, RGB uint8 of
    the working size), MB's own final latent (None without MB), the initial noise, and the
    timesteps run."""

    latents: Any
    latents_mb: Any
    image: np.ndarray
    noise: Any
    timesteps: list[int]


MAGICBRUSH_COUNT = "unet_magicbrush"


def call_counted_as(name: str, module: Any, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)``, counted (:mod:`methods.diffusion.counting`) as one call of
    ``name`` with the batch rows of its first tensor, and under no other name.

    Why: MagicBrush's loaded pipeline is cached per process and shared with the ``magicbrush``
    adapter, which watches its UNet as ``unet``; a module keeps the first name it is watched under,
    so a hook alone would count ZONE's MagicBrush calls as IP2P's (or the ``magicbrush`` adapter's
    as ZONE's, the other way round). The module's own hooks count into a scratch tally that is
    dropped (counting has no public way to do this: its thread-local tally is swapped here)."""
    import torch

    outer = counting.current()
    if outer is None:
        return module(*args, **kwargs)
    counting._local.tally = counting.Tally()  # the module's hooks, if any, count here: discarded
    try:
        out = module(*args, **kwargs)
    finally:
        counting._local.tally = outer
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    outer.add(name, int(first.shape[0]) if first is not None and first.ndim else 1)
    return out


def make_scheduler(template: Any, scheduler: str) -> Any:
    """A fresh scheduler instance of class ``scheduler`` (a diffusers class name) built from the
    config of ``template`` (IP2P's own scheduler, as the code builds both from it);
    ``"checkpoint"`` = the template's own class."""
    import diffusers

    cls = type(template) if scheduler == "checkpoint" else getattr(diffusers, str(scheduler), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"zone: unknown diffusers scheduler class {scheduler!r}")
    return cls.from_config(template.config)


def fused_sample(
    pipe: Any,
    mb_unet: Any | None,
    image: np.ndarray,
    instruction: str,
    *,
    steps: int,
    guidance_scale: float,
    image_guidance_scale: float,
    beta: float,
    generator: Any,
    scheduler: str = "DPMSolverMultistepScheduler",
    on_step: Callable[[int, Any, Any, Any], None] | None = None,
) -> FusedResult:
    """Run the fused loop (see the module docstring) of IP2P ``pipe`` (a diffusers
    ``StableDiffusionInstructPix2PixPipeline``: its tokenizer, text encoder, VAE, UNet and
    scheduler config) and MagicBrush's ``mb_unet`` on the working-size RGB uint8 ``image``.

    ``mb_unet=None`` runs IP2P alone. ``generator`` draws the initial noise (a CPU generator, as
    the code's). ``on_step(i, t, z_ip2p_before_fusion, z_mb)`` is called after each step's two
    scheduler steps, before the fusion (for tests and diagnostics).
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor
    from PIL import Image

    device = pipe.unet.device
    dtype = pipe.unet.dtype
    with torch.inference_mode():
        # [text, null, null] rows, as diffusers' IP2P pipeline builds them (negative prompt "")
        embeds = pipe._encode_prompt(instruction, device, 1, True, None)
        pixels = pipe.image_processor.preprocess(Image.fromarray(np.ascontiguousarray(image), mode="RGB"))
        # [image, image, zeros] latents (VAE mode, unscaled), IP2P's VAE for both UNets
        image_latents = pipe.prepare_image_latents(pixels, 1, 1, embeds.dtype, device, True)

        sched = make_scheduler(pipe.scheduler, scheduler)
        sched_mb = make_scheduler(pipe.scheduler, scheduler) if mb_unet is not None else None
        sched.set_timesteps(steps, device=device)
        if sched_mb is not None:
            sched_mb.set_timesteps(steps, device=device)
        h, w = image_latents.shape[-2:]
        shape = (1, pipe.vae.config.latent_channels, h, w)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
        latents = noise * sched.init_noise_sigma
        latents_mb = latents.clone() if mb_unet is not None else None

        def denoise(unet: Any, sch: Any, z: Any, t: Any, count_as: str | None = None) -> Any:
            x = sch.scale_model_input(torch.cat([z] * 3), t)
            x = torch.cat([x, image_latents], dim=1)
            if count_as is None:
                eps = unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
            else:
                eps = call_counted_as(count_as, unet, x, t, encoder_hidden_states=embeds, return_dict=False)[0]
            return sch.step(guided(eps, guidance_scale, image_guidance_scale), t, z, return_dict=False)[0]

        timesteps = list(sched.timesteps)
        for i, t in enumerate(timesteps):
            if mb_unet is not None:
                latents_mb = denoise(mb_unet, sched_mb, latents_mb, t, MAGICBRUSH_COUNT)
            latents = denoise(pipe.unet, sched, latents, t)
            if on_step is not None:
                on_step(i, t, latents, latents_mb)
            if mb_unet is not None:
                latents = fuse(latents, latents_mb, beta)

        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        out = pipe.image_processor.postprocess(decoded, output_type="np", do_denormalize=[True])
    u8 = np.clip(np.rint(np.asarray(out[0], dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return FusedResult(latents, latents_mb, np.ascontiguousarray(u8), noise, [int(t) for t in timesteps])
