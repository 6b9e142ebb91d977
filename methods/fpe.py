"""``fpe``: Free-Prompt-Editing (Liu, Zhang, Mao, Yuan, Luo, "Towards Understanding Cross and
Self-Attention in Stable Diffusion for Text-Guided Image Editing", CVPR 2024) for real images on
Stable Diffusion 1.5, written on the shared plumbing of ``methods/diffusion`` (a CPAM baseline,
issue 15; no diffusers pipeline implements it).

FPE edits by *self-attention map replacement* alone: the source and target prompts are denoised
side by side from the inverted latent, and during a window of denoising steps the target
branch's self-attention probability maps are replaced by the source branch's (cross-attention is
left alone: the paper finds the self-attention maps carry the layout and the cross-attention
maps the semantics of the new prompt).

One edit, as in the official real-image example (``alibaba/EasyNLP``,
``diffusion/FreePromptEditing/edit_real.ipynb`` with ``Freeprompt/diffuser_utils.py``
``FreePromptPipeline.invert`` / ``__call__`` and ``Freeprompt/freeprompt.py``
``SelfAttentionControlEdit``):

1. the source (resized to the working resolution) is VAE-encoded (posterior mean, as
   ``image2latent``) and DDIM-inverted with the source prompt, classifier-free guided with the
   empty prompt as the unconditional one (``invert(..., guidance_scale=7.5)``) -- or, with
   ``inversion: null_text``, null-text inverted as ``null_text_w_FPE.ipynb`` does
   (:func:`methods.diffusion.inversion.null_text_invert`, its optimised unconditional embedding
   of each step then used by every unconditional row);
2. the source branch (source prompt) and the target branch (target caption) are denoised in one
   UNet batch per step laid out ``[uncond source, uncond target, cond source, cond target]``
   (unconditional prompt ``""``), classifier-free guidance ``guidance_scale``; with
   ``source_branch: inversion`` (the default, the notebook's ``ref_intermediate_latents=
   latents_list``) the source branch's latent at every step is the inversion trajectory's latent
   of that timestep instead of its own denoised one;
3. ``SelfAttentionControlEdit.forward``: at denoising steps ``[int(n * self_replace_start),
   int(n * self_replace_end))`` and in the self-attention layers with at most
   ``self_replace_max_tokens`` tokens, each target row's self-attention probabilities become the
   source row's of the same guidance half -- only in the conditional half by default (the
   official ``AttentionControl.__call__`` edits ``attn[h // 2:]``). This is the ``"probs"`` hook
   of :class:`methods.diffusion.attention.EditingAttnProcessor` (:class:`SelfAttentionMapReplace`).
   The target branch is the edit (the notebook saves ``results[1]``).

Defaults and their sources:

- ``self_replace_end`` 0.8 (``self_replace_steps = .8`` in ``edit_real.ipynb``,
  ``null_text_w_FPE.ipynb`` and ``edit_fake.ipynb``), ``self_replace_start`` 0.0 (a float
  ``self_replace_steps`` means ``(0, f)``); 50 steps: replacement during steps 0-39.
- ``self_replace_max_tokens``: ``replace_self_attention`` replaces only when
  ``att_replace.shape[2] <= 32 ** 2``, i.e. at 512 x 512 (a 64 x 64 latent) every self-attention
  layer but the 64 x 64 ones. ``None`` (default) states that rule relative to the latent:
  ``(h / 2) * (w / 2)`` tokens of an ``h x w`` latent (1024 at 512 x 512), so that the same
  layers are replaced at other working sizes (and on the tiny backbone, whose finest level is
  excluded likewise).
- ``num_inference_steps`` 50, ``guidance_scale`` 7.5, ``inversion_guidance_scale`` 7.5: the
  notebook's ``NUM_DIFFUSION_STEPS = 50``, ``pipe(prompts, guidance_scale=7.5)`` and
  ``pipe.invert(..., guidance_scale=7.5, num_inference_steps=50)``.
- ``model``: Stable Diffusion 1.5 (the notebooks load ``runwayml/stable-diffusion-v1-5``; CPAM,
  sec. 5, runs on SD-1.5; the maintained mirror id of runwayml's weights).
- ``resolution`` 512: ``load_image`` resizes the source to 512 x 512 (here bicubic, as every
  diffusion adapter of the harness; the edit is resized back to the source size).
- scheduler: the checkpoint's scheduler configuration as a DDIM schedule (``make_schedule``);
  the notebooks build ``DDIMScheduler(beta_start=0.00085, beta_end=0.012, "scaled_linear",
  clip_sample=False, set_alpha_to_one=False)``, the same noise schedule (SD 1.5's own config also
  sets ``steps_offset=1``, which shifts the timesteps by one).
- null-text (``inversion: null_text``): ``num_inner_steps`` 10, ``early_stop_epsilon`` 1e-5, Adam
  lr ``1e-2 * (1 - i / 100)`` (``NullInversion.invert`` / ``null_optimization`` of
  ``null_text_w_FPE.ipynb``, prompt-to-prompt's).

Not specified by the paper (choices of the official code, or ours, each a parameter):

- ``inversion`` ``ddim``: the paper's real-image experiments do not say which inversion; the
  official real-image example uses DDIM (``edit_real.ipynb``), a second notebook null-text.
- ``source_prompt`` ``source_caption``: ``edit_real.ipynb`` inverts with ``source_prompt = ""``,
  ``null_text_w_FPE.ipynb`` with the data set's source prompt. Benchmark samples usually come
  with a source caption, so by default the sample's ``source_caption`` is used when present and
  non-empty, ``""`` otherwise (as :mod:`methods.masactrl`); ``empty`` always uses ``""``.
- ``source_branch`` ``inversion``: ``edit_real.ipynb`` passes ``ref_intermediate_latents``
  (the source branch replays the inversion); ``null_text_w_FPE.ipynb`` denoises the source
  branch itself (``denoise``).
- ``replace_guidance`` ``cond``: the official controller edits the conditional half only
  (``both`` also replaces the unconditional rows' maps).

No library implements the replacement; it is the few lines of :class:`SelfAttentionMapReplace`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

from harness.registry import METHODS
from harness.types import Sample

from ._diffusion_common import (TINY_STEPS, DiffusionMethod, InvertAndEditMethod, _check_number, auto_field,
                                check_choice, check_unit, text_embeddings)
from .diffusion.attention import AttentionContext, AttentionController

SOURCE_PROMPTS = ("source_caption", "empty")
INVERSIONS = ("ddim", "null_text")
SOURCE_BRANCHES = ("inversion", "denoise")
REPLACE_GUIDANCE = ("cond", "both")


class SelfAttentionMapReplace(AttentionController):
    """FPE's self-attention map replacement (``SelfAttentionControlEdit``) on the ``"probs"``
    hook: at steps ``[window[0], window[1])``, in self-attention layers of at most ``max_tokens``
    query tokens, every edit row of the guidance halves ``guidance`` gets the probabilities of
    its source row (:meth:`BatchLayout.source_row`: same half). Other layers keep the
    memory-saving attention path (:meth:`needs_probs` is False there).

    ``replaced``: the names of the layers replaced at least once (for the edit's info and tests).
    """

    def __init__(self, window: tuple[int, int], max_tokens: int, guidance: tuple[str, ...] = ("cond", "none"),
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.window = (int(window[0]), int(window[1]))
        self.max_tokens = int(max_tokens)
        self.guidance = tuple(guidance)
        self.replaced: set[str] = set()

    def active(self, ctx: AttentionContext) -> bool:
        return (ctx.kind == "self" and self.window[0] <= ctx.step < self.window[1]
                and ctx.n_query <= self.max_tokens)

    def needs_probs(self, ctx: AttentionContext) -> bool:
        return self.active(ctx)

    def on_probs(self, ctx: AttentionContext) -> "Any":
        if not self.active(ctx):
            return None
        p = ctx.probs
        assert p is not None
        pairs = [(r, ctx.layout.source_row(r)) for r in ctx.layout.edit_rows(self.guidance)]
        if not pairs:
            return None
        new = p.clone()
        for r, s in pairs:
            new[ctx.head_rows(r)] = p[ctx.head_rows(s)]
        self.replaced.add(ctx.name)
        return new

    def reset(self) -> None:
        super().reset()
        self.replaced = set()


@METHODS.register("fpe")
class FreePromptEditing(InvertAndEditMethod):
    """Inversion, then joint source/target denoising with self-attention map replacement."""

    version = "1"
    requires = ("source", "target_caption")  # source_caption is optional (see source_prompt)

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # notebooks: runwayml/stable-diffusion-v1-5
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # NUM_DIFFUSION_STEPS = 50
        guidance_scale: float = 7.5  # pipe(prompts, guidance_scale=7.5); unconditional prompt ""
        # replacement window [int(n * start), int(n * end)) (self_replace_steps = .8 -> (0, .8))
        self_replace_start: float = 0.0
        self_replace_end: float = 0.8
        # layers replaced: <= this many self-attention tokens; None = a quarter of the latent's
        # tokens (the official 32 ** 2 of a 64 x 64 latent)
        self_replace_max_tokens: int | None = None
        replace_guidance: Literal["cond", "both"] = "cond"  # official: attn[h // 2:] (conditional half)
        inversion: Literal["ddim", "null_text"] = "ddim"  # edit_real.ipynb: DDIM (null_text_w_FPE.ipynb)
        inversion_guidance_scale: float = 7.5  # FreePromptPipeline.invert(guidance_scale=7.5); ddim only
        source_branch: Literal["inversion", "denoise"] = "inversion"  # ref_intermediate_latents=latents_list
        source_prompt: Literal["source_caption", "empty"] = "source_caption"  # empty = edit_real.ipynb's ""
        num_inner_steps: int = 10  # null-text: NullInversion.invert default
        early_stop_epsilon: float = 1e-5  # null-text: NullInversion.invert default
        null_text_lr: float = 1e-2  # null-text: Adam lr 1e-2 * (1 - i / 100)

        def __post_init__(self) -> None:
            super().__post_init__()
            owner = "fpe"
            check_unit(owner, "self_replace_start", self.self_replace_start)
            check_unit(owner, "self_replace_end", self.self_replace_end)
            if self.self_replace_end < self.self_replace_start:
                raise ValueError(f"{owner}: 'self_replace_end' ({self.self_replace_end!r}) must be >= "
                                 f"'self_replace_start' ({self.self_replace_start!r})")
            if self.self_replace_max_tokens is not None:
                _check_number(owner, "self_replace_max_tokens", self.self_replace_max_tokens, 1, integer=True)
            check_choice(owner, "replace_guidance", self.replace_guidance, REPLACE_GUIDANCE)
            check_choice(owner, "inversion", self.inversion, INVERSIONS)
            _check_number(owner, "inversion_guidance_scale", self.inversion_guidance_scale, 0.0)
            check_choice(owner, "source_branch", self.source_branch, SOURCE_BRANCHES)
            check_choice(owner, "source_prompt", self.source_prompt, SOURCE_PROMPTS)
            _check_number(owner, "num_inner_steps", self.num_inner_steps, 1, integer=True)
            _check_number(owner, "early_stop_epsilon", self.early_stop_epsilon, 0.0)
            _check_number(owner, "null_text_lr", self.null_text_lr, 0.0, inclusive=False)

    def source_prompt_for(self, sample: Sample) -> str:
        if self.params.source_prompt == "empty" or sample.source_caption is None:
            return ""
        return str(sample.source_caption).strip()

    def window(self) -> tuple[int, int]:
        """The replacement's step window ``[start, end)`` (``int(n * fraction)`` as the official
        ``SelfAttentionControlEdit``)."""
        n = int(self.params.num_inference_steps)
        return int(n * self.params.self_replace_start), int(n * self.params.self_replace_end)

    def max_tokens(self, latent_hw: tuple[int, int]) -> int:
        """Self-attention layers with at most this many tokens are replaced."""
        if self.params.self_replace_max_tokens is not None:
            return int(self.params.self_replace_max_tokens)
        return max(1, (latent_hw[0] // 2) * (latent_hw[1] // 2))

    def run_edit(self, pipe: Any, latents0: Any, source_prompt: str, target_prompt: str,
                 controller: AttentionController | None = None) -> dict[str, Any]:
        """Invert and edit. Returns ``edit`` (target branch), ``source`` (source branch's final
        latent), ``z_T`` (the inverted latent both start from), ``trajectory`` (the inversion's
        ``[z_0 .. z_T]``), ``uncond_per_step`` (null-text embeddings or None) and ``info``.

        ``controller``: extra controller run after the replacement (tests capture attention)."""
        import torch

        from .diffusion.attention import BatchLayout, ControllerList, attention_control
        from .diffusion.inversion import ddim_invert, ddim_sample_batch, make_schedule, null_text_invert

        p = self.params
        n = int(p.num_inference_steps)
        sched = make_schedule(pipe.scheduler, n)
        # The harness edits under torch.inference_mode(); null-text optimisation needs autograd, so
        # the inputs are cloned into normal tensors and everything below runs outside it.
        with torch.inference_mode(False):
            z0 = latents0.clone()
            with torch.no_grad():
                null, src, tgt = text_embeddings(pipe, ["", source_prompt, target_prompt], z0).chunk(3)
            t0 = time.perf_counter()
            uncond_steps = None
            if p.inversion == "null_text":
                pipe.unet.requires_grad_(False)  # only the null-text embedding is optimised
                z_T, uncond_steps, traj = null_text_invert(
                    pipe.unet, sched, z0, src, null, n, guidance_scale=float(p.guidance_scale),
                    inner_steps=int(p.num_inner_steps), lr=float(p.null_text_lr),
                    early_stop=float(p.early_stop_epsilon))
            else:
                traj = ddim_invert(pipe.unet, sched, z0, src, n, guidance_scale=float(p.inversion_guidance_scale),
                                   uncond=null)
                z_T = traj[-1]
            inversion_seconds = time.perf_counter() - t0
            guided = float(p.guidance_scale) != 1.0
            layout = BatchLayout.cfg(2) if guided else BatchLayout.plain(2)  # [(uncond) src, tgt, (cond) src, tgt]
            window = self.window()
            max_tokens = self.max_tokens(tuple(z0.shape[-2:]))
            halves = ("cond", "none") if p.replace_guidance == "cond" else ("cond", "uncond", "none")
            fpe = SelfAttentionMapReplace(window, max_tokens, guidance=halves, layout=layout)
            ctrl: AttentionController = fpe if controller is None else ControllerList([fpe, controller], layout=layout)

            def replay(z: Any, i: int) -> Any:
                # ref_intermediate_latents: before step i + 1 the source row is the inversion's
                # latent of that timestep (traj[n - i - 1]; after the last step, z_0 itself)
                z = z.clone()
                z[0:1] = traj[n - i - 1].to(z)
                return z

            t1 = time.perf_counter()
            with torch.no_grad(), attention_control(pipe.unet, ctrl):
                lat = ddim_sample_batch(pipe.unet, sched, z_T, torch.cat([src, tgt]), n,
                                        guidance_scale=float(p.guidance_scale), uncond=null,
                                        uncond_per_step=uncond_steps,
                                        callback=replay if p.source_branch == "inversion" else None)
            editing_seconds = time.perf_counter() - t1
        info = {
            "self_replace_window": [window[0], min(window[1], n)],
            "self_replace_max_tokens_used": max_tokens,
            "self_replaced_layers": len(fpe.replaced),
            "inversion_seconds": inversion_seconds,
            "editing_seconds": editing_seconds,
        }
        return {"edit": lat[1:2], "source": lat[0:1], "z_T": z_T, "trajectory": traj,
                "uncond_per_step": uncond_steps, "replaced_layers": sorted(fpe.replaced), "info": info}

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        info: dict[str, Any] = {
            "self_replace_start": float(p.self_replace_start),
            "self_replace_end": float(p.self_replace_end),
            "self_replace_max_tokens": p.self_replace_max_tokens,
            "replace_guidance": p.replace_guidance,
            "inversion": p.inversion,
            "source_branch": p.source_branch,
            "source_prompt": p.source_prompt,
            "unconditional_prompt": "",
        }
        if p.inversion == "null_text":
            info.update(num_inner_steps=int(p.num_inner_steps), early_stop_epsilon=float(p.early_stop_epsilon),
                        null_text_lr=float(p.null_text_lr))
        else:
            info["inversion_guidance_scale"] = float(p.inversion_guidance_scale)
        return info
