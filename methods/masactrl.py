"""``masactrl``: MasaCtrl (Cao, Wang, Qi, Shan, Qie, Zheng, "MasaCtrl: Tuning-Free Mutual
Self-Attention Control for Consistent Image Synthesis and Editing", ICCV 2023) for real images on
Stable Diffusion 1.x, written on the shared plumbing of ``methods/diffusion`` (no diffusers
pipeline implements it).

One edit, as in the official real-image example (``TencentARC/MasaCtrl``,
``playground_real.ipynb``, with ``masactrl/diffuser_utils.py`` ``MasaCtrlPipeline.invert`` /
``__call__`` and ``masactrl/masactrl.py`` ``MutualSelfAttentionControl``):

1. the source (resized to the working resolution) is VAE-encoded (posterior mean, as the
   official ``image2latent``) and DDIM-inverted with the *source prompt*, classifier-free guided
   with the empty prompt as the unconditional one (``invert(..., guidance_scale=7.5)``);
2. the source branch (source prompt) and the target branch (target caption) are denoised jointly
   from the same inverted latent ``z_T``, in one UNet batch per step laid out as the official
   pipeline's ``[uncond source, uncond target, cond source, cond target]`` (unconditional prompt
   ``""``), with classifier-free guidance ``guidance_scale``;
3. from denoising step ``start_step`` on and in self-attention layers ``start_layer`` and later
   (layers counted over the UNet's self-attention layers in forward order: 16 in SD 1.x, so the
   default 10 is the decoder's last six), the target branch's queries attend to the *source*
   branch's keys and values (same guidance half): ``MutualSelfAttentionController`` of
   ``methods/diffusion/attention.py``. The source branch is left untouched; the target branch is
   the edit (the official notebook saves ``image_masactrl[-1:]``).

Source prompt: the official real-image example inverts and reconstructs with ``source_prompt =
""``. Benchmark samples usually come with a source caption, so by default (``source_prompt:
source_caption``) the sample's ``source_caption`` is used when present and non-empty, ``""``
otherwise (the sample is not skipped: the caption is optional); ``source_prompt: empty`` always
uses ``""`` as the notebook does. The text used is recorded in the edit's info.

Defaults and their sources:

- ``start_step`` 4, ``start_layer`` 10: ``STEP = 4``, ``LAYPER = 10`` in
  ``playground_real.ipynb`` (also ``MutualSelfAttentionControl(start_step=4, start_layer=10)``
  defaults in ``masactrl/masactrl.py``).
- ``num_inference_steps`` 50, ``guidance_scale`` 7.5: ``MasaCtrlPipeline.__call__`` defaults and
  the notebook's ``invert(..., num_inference_steps=50)`` / ``model(prompts, guidance_scale=7.5)``.
- ``inversion_guidance_scale`` 7.5: ``MasaCtrlPipeline.invert`` default, passed explicitly in the
  notebook (with the notebook's empty source prompt the guidance is a no-op: both halves see the
  same text).
- ``model``: Stable Diffusion 1.5 (the notebook loads ``CompVis/stable-diffusion-v1-4`` with
  ``runwayml/stable-diffusion-v1-5`` as the commented alternative; CPAM, sec. 5, runs on SD-1.5
  and compares with MasaCtrl; the maintained mirror id of runwayml's weights).
- ``resolution`` 512: the notebook resizes the source to 512 x 512 (here bicubic, as every
  diffusion adapter of the harness; the edit is resized back to the source size).
- scheduler: the checkpoint's scheduler configuration as a DDIM schedule (``make_schedule``);
  the notebook builds ``DDIMScheduler(beta_start=0.00085, beta_end=0.012, "scaled_linear",
  clip_sample=False, set_alpha_to_one=False)``, the same noise schedule (SD 1.5's own config also
  sets ``steps_offset=1``, which shifts the timesteps by one).

Not implemented: the mask-guided variant (``MutualSelfAttentionControlMask``) and the
notebook's commented alternative of replaying the inversion latents in the source branch
(``ref_intermediate_latents``).

This module also holds :class:`InvertAndEditMethod`, the base of the adapters that DDIM-invert the
source and denoise with attention control on a ``StableDiffusionPipeline`` (MasaCtrl,
Plug-and-Play).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from harness.registry import METHODS
from harness.types import Sample

from ._diffusion_common import (TINY_STEPS, DiffusionMethod, InvertAndEditMethod, _check_number, auto_field,
                                check_choice, text_embeddings)
from .diffusion.inversion import ddim_move

SOURCE_PROMPTS = ("source_caption", "empty")


@METHODS.register("masactrl")
class MasaCtrl(InvertAndEditMethod):
    """DDIM inversion, then joint source/target denoising with mutual self-attention."""

    version = "1"
    requires = ("source", "target_caption")  # source_caption is optional (see source_prompt)

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD 1.5 (notebook alternative; CPAM sec. 5)
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # MasaCtrlPipeline.__call__ / invert default
        guidance_scale: float = 7.5  # notebook: model(prompts, guidance_scale=7.5)
        # notebook STEP = 4: mutual self-attention from this denoising step on; tiny: 1, so that it
        # acts within the tiny backbone's 4 steps
        start_step: int | Literal["auto"] = auto_field(4, 1)
        # notebook LAYPER = 10: from this self-attention layer on (16 in SD 1.x; 10-15 are decoder
        # layers); tiny: 3, the tiny UNet's decoder layers (3-6 of its 7)
        start_layer: int | Literal["auto"] = auto_field(10, 3)
        inversion_guidance_scale: float = 7.5  # MasaCtrlPipeline.invert default (uncond = "")
        source_prompt: Literal["source_caption", "empty"] = "source_caption"  # empty = the notebook's ""

        def __post_init__(self) -> None:
            super().__post_init__()
            _check_number("masactrl", "start_step", self.start_step, 0, integer=True)
            _check_number("masactrl", "start_layer", self.start_layer, 0, integer=True)
            _check_number("masactrl", "inversion_guidance_scale", self.inversion_guidance_scale, 0.0)
            check_choice("masactrl", "source_prompt", self.source_prompt, SOURCE_PROMPTS)

    def source_prompt_for(self, sample: Sample) -> str:
        if self.params.source_prompt == "empty" or sample.source_caption is None:
            return ""
        return str(sample.source_caption).strip()

    def run_edit(self, pipe: Any, latents0: Any, source_prompt: str, target_prompt: str,
                 start_step: int | None = None, start_layer: int | None = None) -> dict[str, Any]:
        """Invert and edit. Returns ``edit`` (target branch), ``source`` (source branch) and
        ``z_T`` (the inverted latent both start from), all ``[1, C, h, w]``.

        ``start_step`` / ``start_layer`` override the parameters (tests)."""
        import torch

        from .diffusion.attention import BatchLayout, MutualSelfAttentionController, attention_control
        from .diffusion.inversion import ddim_invert, make_schedule

        p = self.params
        n = int(p.num_inference_steps)
        unet = pipe.unet
        sched = make_schedule(pipe.scheduler, n)
        null, src, tgt = text_embeddings(pipe, ["", source_prompt, target_prompt], latents0).chunk(3)
        traj = ddim_invert(unet, sched, latents0, src, n, guidance_scale=float(p.inversion_guidance_scale),
                           uncond=null)
        z_T = traj[-1]
        guided = float(p.guidance_scale) != 1.0
        if guided:
            layout = BatchLayout.cfg(2)  # [uncond src, uncond tgt, cond src, cond tgt]
            text = torch.cat([null, null, src, tgt])
        else:
            layout = BatchLayout.plain(2)  # [src, tgt]
            text = torch.cat([src, tgt])
        ctrl = MutualSelfAttentionController(
            start_step=p.start_step if start_step is None else start_step,
            start_layer=p.start_layer if start_layer is None else start_layer,
            layout=layout,
            auto_step=False,
        )
        lat = torch.cat([z_T, z_T])  # [source branch, target branch]
        with torch.no_grad(), attention_control(unet, ctrl):
            for t in sched.timesteps:
                model_in = torch.cat([lat, lat]) if guided else lat
                eps = unet(model_in, t, encoder_hidden_states=text).sample
                if guided:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + float(p.guidance_scale) * (eps_c - eps_u)
                lat = ddim_move(lat, eps, sched.alpha(t), sched.alpha(sched.prev(t)))
                ctrl.step_end()
        return {"edit": lat[1:2], "source": lat[0:1], "z_T": z_T, "info": {}}

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {
            "start_step": int(p.start_step),
            "start_layer": int(p.start_layer),
            "inversion_guidance_scale": float(p.inversion_guidance_scale),
            "source_prompt": p.source_prompt,
            "unconditional_prompt": "",
        }
