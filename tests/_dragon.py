"""Shared set-up of the DragonDiffusion / DiffEditor tests: tiny SD 1.5 components and one image."""
from __future__ import annotations

from .conftest import textured


def tiny_sd15_latent(steps: int):
    """(pipe, z0, cond, uncond, schedule): a tiny random-weight SD 1.5 pipeline, the latent of a
    64 x 64 textured image, the embeddings of "a red thing" and of "", and a ``steps``-step DDIM schedule."""
    import torch
    from diffusers import StableDiffusionPipeline

    from methods.diffusion.inversion import encode_image, encode_prompt, make_schedule
    from methods.diffusion.tiny import tiny_sd15

    pipe = StableDiffusionPipeline(**tiny_sd15(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with torch.no_grad():
        z0 = encode_image(pipe, textured(64, 64, seed=3))
        cond = encode_prompt(pipe, "a red thing")
        uncond = encode_prompt(pipe, "")
    return pipe, z0, cond, uncond, make_schedule(pipe.scheduler, steps)
