"""``ef_ddpm``: edit-friendly DDPM inversion and editing (Huberman-Spiegelglas, Kulikov & Michaeli,
"An Edit Friendly DDPM Noise Space: Inversion and Manipulations", CVPR 2024; official code
``inbarhub/DDPM_inversion``, ``main_run.py --mode our_inv``). One of PartEdit's real-image baselines
(PartEdit Table 1, "EF-DDPM", run "with the same base model of SD2.1", sec. 4.1).

Per edit (no diffusers pipeline does this; the loop is :mod:`methods.diffusion.inversion`'s):

1. the source, resized to the working size, is encoded with the VAE (posterior mean: the official
   ``latent_dist.mode()``, the same for a Gaussian);
2. edit-friendly inversion with the *source* caption at ``source_guidance_scale``
   (:func:`methods.diffusion.inversion.ddpm_edit_friendly_invert`, the official
   ``inversion_forward_process``): an independent noisy latent ``x_t`` for every step, then the
   noise maps ``z_t`` that make the DDPM sampler hit them exactly. The independent draws come from
   a generator seeded with the edit's seed;
3. as the official code does after inverting (``zs[0] = 0`` in ``inversion_forward_process``: its
   ``zs[0]`` is the last sampling step's map), the last step's noise map is zeroed
   (``zero_last_noise``), so that step is the sampler's mean; ``zero_last_noise: false`` keeps it, and
   sampling with the source caption then reconstructs the source latent to float rounding (the
   edit-friendly property, tested);
4. DDPM sampling with the *target* caption at ``guidance_scale`` (``cfg_tar``) from step ``skip``
   (T_skip: start from ``x_{T - skip}`` of the inversion and use its noise maps from there on;
   :func:`methods.diffusion.inversion.ddpm_sample_with_noise`, the official
   ``inversion_reverse_process``);
5. decode, resize back to the source size.

Defaults (``main_run.py`` argparse defaults and README usage example): ``num_diffusion_steps=100``,
``cfg_src=3.5``, ``cfg_tar=15``, ``skip=36``, ``eta=1``; 512 x 512 (``load_512``). The official code
loads ``CompVis/stable-diffusion-v1-4``; the default here is SD 2.1 as PartEdit ran the baseline
(``stabilityai/stable-diffusion-2-1-base``: the epsilon-prediction 512 px SD 2.1; the 768 px
``stable-diffusion-2-1`` predicts v, which the inversion refuses with a message). The DDIM-spaced
schedule is built from the checkpoint's scheduler config (the official code does the same:
``DDIMScheduler.from_config(model_id, subfolder="scheduler")``).

``eta`` other than 1: the shared sampler is the DDIM-paper step (direction term
``sqrt(1 - a_prev - eta^2 var)``); the official ``reverse_step`` / ``inversion_forward_process`` write
``sqrt(1 - a_prev - eta * var)`` with noise ``eta * sqrt(var)``, so the two agree exactly at the default
``eta = 1`` only (both invert and sample with the same step, so reconstruction is exact either way).

Cost: every step of the inversion and of the sampling evaluates the UNet twice (unconditional and
conditional in separate calls, as the official code does): ``2 * steps + 2 * (steps - skip)`` UNet
calls per edit (``steps + (steps - skip)`` with guidance 1 on both sides). The inversion runs every
step even though the edit only uses the maps from ``skip`` on, as the official code does.
"""
from __future__ import annotations

import dataclasses
import time
import types
from typing import Any, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import (TINY_STEPS, DiffusionMethod, _check_number, auto_field, empty_text_reason,
                                from_pipeline_output)

SD21_MODEL = "stabilityai/stable-diffusion-2-1-base"
# The official skip (36 of 100 steps); the tiny backbone's default skips 1 of its steps.
OFFICIAL_SKIP = 36
TINY_SKIP = 1


def require_epsilon_prediction(owner: str, model: str, pipe: Any) -> None:
    """Refuse a checkpoint that does not predict the noise: the inversions of
    :mod:`methods.diffusion.inversion` are written for epsilon prediction (SD 2.1's 768 px
    ``stabilityai/stable-diffusion-2-1`` predicts v). Raised from ``prepare()``, so every sample of the
    job is skipped with this reason instead of failing one by one."""
    prediction = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"{owner}: model {model!r} is a {prediction!r} model; the inversion needs an epsilon-prediction "
            f"model (SD 2.1 at 512 px: {SD21_MODEL})"
        )


class CaptionedInversionMethod(DiffusionMethod):
    """What EF-DDPM and PnPInversion share: an SD text-to-image pipeline of an epsilon-prediction
    checkpoint, an edit that inverts the source with its source caption and samples with its
    target caption (``call_pipeline`` reads the sample being edited from ``self._sample`` and
    leaves its own facts in ``self._run_info``)."""

    requires = ("source", "source_caption", "target_caption")
    tiny_kind = "sd15"
    prompt_field = "target_caption"
    text_fields = ("source_caption", "target_caption")

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def __init__(self, params: "DiffusionMethod.Params | None" = None):
        super().__init__(params)
        self._sample: Sample | None = None
        self._run_info: dict[str, Any] = {}

    def prepare(self) -> None:
        super().prepare()
        assert self._loaded is not None
        require_epsilon_prediction(self.name, self.params.model, self._loaded.pipeline)

    def edit_with_captions(self, sample: Sample, seed: int, **info: Any) -> MethodOutput:
        """Run ``call_pipeline`` on ``sample`` with its target caption; the edit's info gets
        ``info``, what ``call_pipeline`` recorded, the prompts and the timings."""
        import torch

        start = self.begin_edit(sample, seed)
        prep = time.perf_counter() - start.t0
        torch.manual_seed(int(seed))  # what draws noise draws it from the edit's generator; this is for safety
        target = str(sample.target_caption)
        self._sample, self._run_info = sample, {}
        try:
            with torch.inference_mode():
                out = self.call_pipeline(start.loaded.pipeline, start.image, target, start.generator)
            run_info = self._run_info
        finally:
            self._sample, self._run_info = None, {}
        meta = self.edit_info(start, seed, prep, **info, **run_info, prompt_field=self.prompt_field, prompt=target,
                              source_caption=str(sample.source_caption))
        return MethodOutput(image=from_pipeline_output(out.images, start.source_hw), info=meta)


@METHODS.register("ef_ddpm")
class EditFriendlyDDPM(CaptionedInversionMethod):
    """Edit-friendly DDPM inversion with the source caption, then sampling with the target caption."""

    version = "1"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = SD21_MODEL  # PartEdit's SD 2.1; the official code's is CompVis/stable-diffusion-v1-4
        num_inference_steps: int | Literal["auto"] = auto_field(100, TINY_STEPS)  # num_diffusion_steps
        guidance_scale: float = 15.0  # cfg_tar: CFG of the sampling with the target caption
        source_guidance_scale: float = 3.5  # cfg_src: CFG of the inversion with the source caption
        skip: int | Literal["auto"] = auto_field(OFFICIAL_SKIP, TINY_SKIP)  # T_skip: sampling steps skipped
        eta: float = 1.0  # DDPM (eta 1); > 0 (the noise maps divide by sigma_t)
        zero_last_noise: bool = True  # the official zs[0] = 0: the last step is the sampler's mean

        def __post_init__(self) -> None:
            super().__post_init__()
            owner = "ef_ddpm"
            _check_number(owner, "source_guidance_scale", self.source_guidance_scale, 0.0)
            _check_number(owner, "eta", self.eta, 0.0, inclusive=False)
            _check_number(owner, "skip", self.skip, 0, integer=True)
            if self.skip >= self.num_inference_steps:
                raise ValueError(
                    f"{owner}: 'skip' must be below num_inference_steps ({self.num_inference_steps}: at least one "
                    f"sampling step with the target caption), got {self.skip!r}"
                )
            if not isinstance(self.zero_last_noise, bool):
                raise ValueError(f"{owner}: 'zero_last_noise' must be true or false, got {self.zero_last_noise!r}")

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        """Invert the resized PIL ``image`` with the source caption of the sample being edited and
        sample with ``prompt``; returns an object with ``images`` (float ``1 x H x W x 3`` in [0, 1])."""
        from .diffusion.inversion import decode_latents

        assert self._sample is not None, "call_pipeline runs inside edit()"
        out = self.invert_and_sample(pipe, np.asarray(image), str(self._sample.source_caption), prompt, generator)
        self._run_info = out["info"]
        u8 = decode_latents(pipe, out["edit"])
        # from_pipeline_output maps [0, 1] floats back to uint8 with rint: exact for k / 255
        return types.SimpleNamespace(images=u8[None].astype(np.float32) / 255.0)

    def check(self, sample: Sample) -> str | None:
        return empty_text_reason(self.name, sample, ("source_caption", "target_caption"))

    def invert_and_sample(self, pipe: Any, image: np.ndarray, source: str, target: str,
                          generator: Any) -> dict[str, Any]:
        """The edit's latents: ``{"x0": source latent, "edit": edited latent, "xts", "zs" (as used),
        "info"}`` (tests reach the intermediate values here)."""
        from .diffusion.inversion import (ddpm_edit_friendly_invert, ddpm_sample_with_noise, encode_image,
                                          encode_prompt, make_schedule)

        p = self.params
        n = int(p.num_inference_steps)
        sched = make_schedule(pipe.scheduler, n)
        x0 = encode_image(pipe, image)
        cond_src = encode_prompt(pipe, source).to(x0)
        cond_tar = encode_prompt(pipe, target).to(x0)
        uncond = encode_prompt(pipe, "").to(x0)
        t0 = time.perf_counter()
        _, zs, xts = ddpm_edit_friendly_invert(pipe.unet, sched, x0, cond_src, n, eta=p.eta,
                                               guidance_scale=p.source_guidance_scale, uncond=uncond,
                                               generator=generator, return_xts=True)
        inversion_seconds = time.perf_counter() - t0
        zs = list(zs)
        if p.zero_last_noise:
            zs[-1] = zs[-1].new_zeros(zs[-1].shape)
        t1 = time.perf_counter()
        edit = ddpm_sample_with_noise(pipe.unet, sched, xts[p.skip], zs, cond_tar, guidance_scale=p.guidance_scale,
                                      uncond=uncond, skip=int(p.skip), eta=p.eta)
        info = {
            "source_guidance_scale": float(p.source_guidance_scale),
            "skip": int(p.skip),
            "eta": float(p.eta),
            "zero_last_noise": bool(p.zero_last_noise),
            "sampling_steps": n - int(p.skip),
            "inversion_seconds": inversion_seconds,
            "editing_seconds": time.perf_counter() - t1,
        }
        return {"x0": x0, "edit": edit, "xts": xts, "zs": zs, "info": info}

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        return self.edit_with_captions(sample, seed)


__all__ = ["CaptionedInversionMethod", "EditFriendlyDDPM", "require_epsilon_prediction"]
