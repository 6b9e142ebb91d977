"""``pnp_inversion``: PnP Inversion, i.e. direct inversion with Prompt-to-Prompt editing (Ju, Zeng,
Bian, Liu & Xu, "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code", ICLR 2024;
official code ``cure-lab/PnPInversion``, ``run_editing_p2p.py --edit_method_list directinversion+p2p``).
One of PartEdit's real-image baselines (PartEdit Table 1, "PnPInversion", on SD 2.1; appendix L: the
code's default parameters, "default blending words between the object and their edited instruction").

Per edit (``P2PEditor.edit_image_directinversion``; the loop is :mod:`methods.diffusion`'s):

1. the source, resized to the working size, is encoded with the VAE (posterior mean);
2. DDIM inversion with the source caption at guidance 1, keeping every step's latent
   ``z*_0 .. z*_T`` (``DirectInversion.ddim_loop``: :func:`methods.diffusion.inversion.ddim_invert`);
3. the offsets (``DirectInversion.offset_calculate``): for every sampling step ``i``, one guided UNet
   call on the batch the edit uses (``[uncond x 2, source, target]`` on ``z*`` at that step, no
   attention control) and ``offset_i = z*_{prev} - DDIM_step(z*, eps_cfg)`` of the source row;
4. Prompt-to-Prompt sampling of [source caption, target caption] from ``z*_T`` at guidance 7.5 in one
   batch (:func:`methods.diffusion.inversion.ddim_sample_batch`) under the P2P attention controller,
   where after every step the source row gets its offset (the "3 lines":
   ``latents[:1] + noise_loss[:1]``; the target row is not corrected), then LocalBlend. The source
   branch therefore walks the inverted trajectory (to float rounding) and the target branch takes its
   attention from it. ``inversion: ddim`` leaves the offsets out (the script's ``ddim+p2p``; for
   comparisons);
5. the target row is decoded and resized back to the source size.

The P2P part is :mod:`methods.prompt_to_prompt`'s (its controller construction, mappers and
:class:`methods.diffusion.attention.LocalBlend`); the official settings of ``run_editing_p2p.py``:
``guidance_scale=7.5``, 50 DDIM steps, ``cross_replace_steps=0.4``, ``self_replace_steps=0.6``,
``AttentionRefine`` (``is_replace_controller=False``), LocalBlend on the blend words (``start_blend``
0.2, threshold 0.3), and the target blend word's cross-attention reweighted by 2
(``eq_params={"words": (blended_word[1],), "values": (2,)}``); the script does no blending and no
reweighting for a sample without blend words.

Blend words (``blend_words``): ``auto`` takes, in this order, the sample's ``meta["blended_word"]``
(PIE-Bench's "source_word target_word", split on whitespace as the script splits it), else its
``meta["subject"]`` (PartEdit-Bench's object: the source words are the subject's, the target words the
subject's and the target caption's words that the source caption lacks -- PartEdit's "statue" and
"statue with uniform torso"), else the words that differ between the captions (P2P's default);
``captions`` always the differing words; ``none`` no LocalBlend and no reweighting. Source words are
looked up in the source caption and target words in the target caption (``LocalBlend.__init__``'s
``get_word_inds(prompt, word)`` per prompt); the reweighted words are the target words that are not
source words (the edited words). The rule used and the words are in the edit's info.

Model: SD 2.1 as PartEdit ran it (``stabilityai/stable-diffusion-2-1-base``, epsilon prediction,
512 px); the official code loads ``CompVis/stable-diffusion-v1-4`` (set ``model``). The schedule is the
checkpoint's scheduler config as DDIM (the official ``DDIMSchedulerDev`` has SD's betas and
``set_alpha_to_one=False``). The official editor's extra reconstruction pass (an image for its
side-by-side figure, not used by the edit) is not run.

Cost per edit: ``steps`` UNet calls of 1 row (inversion) + ``steps`` of 4 rows (offsets) + ``steps``
of 4 rows (editing) with guidance; ``inversion: ddim`` drops the offsets' calls.
"""
from __future__ import annotations

import dataclasses
import time
import types
from typing import Any, Literal, Sequence

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import TINY_STEPS, DiffusionMethod, _check_number, auto_field, check_choice, check_unit
from .ef_ddpm import SD21_MODEL, CaptionedInversionMethod
from .prompt_to_prompt import (MAX_TOKENS, PromptToPrompt, _token_encoder, captions_reason, differing_words, norm_word,
                               split_words, word_positions)

INVERSIONS = ("direct", "ddim")
BLEND_RULES = ("auto", "captions", "none")


def blend_words_for(sample: Sample, rule: str) -> tuple[list[str], list[str], str]:
    """``(source words, target words, where from)`` of a sample under ``rule`` (see the module
    docstring); where from is ``meta.blended_word``, ``meta.subject``, ``captions`` or ``none``."""
    source, target = str(sample.source_caption), str(sample.target_caption)
    if rule == "none":
        return [], [], "none"
    meta = sample.meta or {}
    if rule == "auto":
        pair = meta.get("blended_word")
        if isinstance(pair, str) and len(pair.split()) >= 2:
            words = pair.split()  # run_editing_p2p.py: blended_word.split(" ") -> [0] source, [1] target
            return [words[0]], [words[1]], "meta.blended_word"
        subject = meta.get("subject")
        if isinstance(subject, str) and subject.split():
            src = subject.split()
            seen = {norm_word(w) for w in split_words(source)}
            added = [w for w in split_words(target) if norm_word(w) not in seen]
            return src, src + [w for w in added if norm_word(w) not in {norm_word(s) for s in src}], "meta.subject"
    ws, wt = differing_words(source, target)
    return ws, wt, "captions"


def direct_inversion_offsets(unet: Any, sched: Any, trajectory: Sequence[Any], conds: Any, uncond: Any,
                             guidance_scale: float) -> list[Any]:
    """PnP Inversion's offsets (``DirectInversion.offset_calculate``): for sampling step ``i``
    (``timesteps[i] -> prev``), ``z*_prev - DDIM_step(z*_t, eps)`` of the source row, where ``z*`` is
    the inverted ``trajectory`` (``[z*_0 .. z*_T]`` of :func:`ddim_invert`), ``eps`` the guided
    prediction of one UNet call on every branch of ``conds`` at ``z*_t`` -- the batch
    :func:`methods.diffusion.inversion.ddim_sample_batch` evaluates, with the same arithmetic, so the
    corrected source row matches the trajectory to float rounding. No attention control is installed
    here (the official code registers none). Hand-written: no library computes these offsets.
    Returns one ``[1, C, h, w]`` tensor per step."""
    import torch

    from .diffusion.inversion import ddim_move

    n = len(sched.timesteps)
    if len(trajectory) != n + 1:
        raise ValueError(f"the trajectory needs {n + 1} latents (z*_0 .. z*_T), got {len(trajectory)}")
    b = conds.shape[0]
    guided = guidance_scale != 1.0
    offsets = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            z_t = trajectory[n - i]
            z = z_t.expand(b, *z_t.shape[1:]).clone()
            if guided:
                u = uncond.to(z).expand(b, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond.to(z)
                out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([u, conds.to(z)])).sample
                eps_u, eps_c = out.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            else:
                eps = unet(z, t, encoder_hidden_states=conds.to(z)).sample
            prev = ddim_move(z, eps, sched.alpha(t), sched.alpha(sched.prev(t)))
            offsets.append(trajectory[n - i - 1] - prev[:1])
    return offsets


class DirectInversionStep:
    """The callback after every sampling step: the source row gets its offset (``add_offset``), then
    LocalBlend (when there is one) blends the target rows with the corrected source, as
    ``direct_inversion_p2p_guidance_diffusion_step`` then ``controller.step_callback`` do.
    ``trace`` keeps the source row after every step (for tests and diagnostics)."""

    def __init__(self, offsets: Sequence[Any] | None, blend: Any = None, keep_trace: bool = False) -> None:
        self.offsets = offsets
        self.blend = blend
        self.keep_trace = keep_trace
        self.trace: list[Any] = []

    def __call__(self, latents: Any, step: int) -> Any:
        import torch

        if self.offsets is not None:
            latents = torch.cat([latents[:1] + self.offsets[step].to(latents), latents[1:]])
        if self.blend is not None:
            latents = self.blend(latents, step)
        if self.keep_trace:
            self.trace.append(latents[:1].clone())
        return latents


@METHODS.register("pnp_inversion")
class PnPInversion(CaptionedInversionMethod):
    """DDIM inversion with direct (offset) correction of the source branch, then Prompt-to-Prompt."""

    version = "1"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = SD21_MODEL  # PartEdit's SD 2.1; the official code's is CompVis/stable-diffusion-v1-4
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # P2PEditor num_ddim_steps
        guidance_scale: float = 7.5  # run_editing_p2p.py guidance_scale (offsets and editing)
        inversion: Literal["direct", "ddim"] = "direct"  # ddim = no offsets (the script's ddim+p2p)
        edit_kind: Literal["auto", "replace", "refine"] = "refine"  # make_controller(is_replace_controller=False)
        cross_replace_steps: float = 0.4  # run_editing_p2p.py
        self_replace_steps: float = 0.6  # run_editing_p2p.py
        blend_words: Literal["auto", "captions", "none"] = "auto"
        blend_threshold: float = 0.3  # LocalBlend th=(.3, .3)
        blend_start: float = 0.2  # LocalBlend start_blend
        reweight_value: float = 2.0  # eq_params values (2,) on the edited target words; 1 = no reweighting

        def __post_init__(self) -> None:
            super().__post_init__()
            owner = "pnp_inversion"
            check_choice(owner, "inversion", self.inversion, INVERSIONS)
            check_choice(owner, "edit_kind", self.edit_kind, ("auto", "replace", "refine"))
            check_choice(owner, "blend_words", self.blend_words, BLEND_RULES)
            check_unit(owner, "cross_replace_steps", self.cross_replace_steps)
            check_unit(owner, "self_replace_steps", self.self_replace_steps)
            check_unit(owner, "blend_threshold", self.blend_threshold, high_open=True)
            check_unit(owner, "blend_start", self.blend_start)
            _check_number(owner, "reweight_value", self.reweight_value, 0.0)

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        """Invert and edit the resized PIL ``image`` (captions and blend words from the sample being
        edited; ``prompt`` is its target caption); returns an object with ``images`` (float
        ``1 x H x W x 3`` in [0, 1]). DDIM is deterministic: ``generator`` is not used."""
        from .diffusion.inversion import decode_latents

        assert self._sample is not None, "call_pipeline runs inside edit()"
        out = self.run_edit(pipe, np.asarray(image), self._sample)
        self._run_info = out["info"]
        u8 = decode_latents(pipe, out["edit"][1:2])  # the target branch
        # from_pipeline_output maps [0, 1] floats back to uint8 with rint: exact for k / 255
        return types.SimpleNamespace(images=u8[None].astype(np.float32) / 255.0)

    def check(self, sample: Sample) -> str | None:
        return captions_reason(self.name, sample, self.params.edit_kind)

    # -- controller -----------------------------------------------------------------------
    def build_controller(self, tokenizer: Any, sample: Sample, latent_hw: tuple[int, int],
                         layout: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(attention controller, LocalBlend or None, info): Prompt-to-Prompt's construction
        (:meth:`methods.prompt_to_prompt.PromptToPrompt.build_controller` with this method's
        settings), the LocalBlend word weights then set per caption (source words in the source
        caption, target words in the target caption) as the official ``LocalBlend`` does."""
        p = self.params
        source, target = str(sample.source_caption), str(sample.target_caption)
        words_s, words_t, rule = blend_words_for(sample, p.blend_words)
        edited = [w for w in words_t if norm_word(w) not in {norm_word(s) for s in words_s}]
        reweight = tuple(w for w in edited if norm_word(w)) if p.reweight_value != 1.0 else ()
        blend = rule != "none" and bool(words_s or words_t)
        p2p = PromptToPrompt(PromptToPrompt.Params(
            model=p.model, backbone=p.backbone, num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale, resolution=p.resolution, edit_kind=p.edit_kind,
            cross_replace_steps=p.cross_replace_steps, self_replace_steps=p.self_replace_steps,
            reweight_words=reweight or None, reweight_values=(float(p.reweight_value),) * len(reweight) or None,
            local_blend=blend, blend_threshold=p.blend_threshold, blend_start=p.blend_start,
        ))
        controller, local_blend, info = p2p.build_controller(tokenizer, source, target, latent_hw, layout)
        info = {k: v for k, v in info.items() if not k.startswith("blend_words")}
        info.update(blend_words_rule=rule, blend_words_source=list(words_s), blend_words_target=list(words_t),
                    reweight_words=list(reweight), reweight_value=float(p.reweight_value) if reweight else None)
        if local_blend is not None:
            max_len = int(getattr(tokenizer, "model_max_length", MAX_TOKENS) or MAX_TOKENS)
            encode = _token_encoder(tokenizer)
            pos_s, miss_s = word_positions(encode, source, words_s, max_len)
            pos_t, miss_t = word_positions(encode, target, words_t, max_len)
            alpha = np.zeros((2, max_len), dtype=np.float32)
            alpha[0, pos_s] = 1.0
            alpha[1, pos_t] = 1.0
            local_blend.word_alpha = alpha
            info["blend_words_missing"] = {"source": miss_s, "target": miss_t}
        return controller, local_blend, info

    # -- the edit --------------------------------------------------------------------------
    def run_edit(self, pipe: Any, image: np.ndarray, sample: Sample, keep_trace: bool = False) -> dict[str, Any]:
        """Invert and edit the working-size ``image``: ``{"edit": [2, C, h, w] final latents (row 0
        source, row 1 target), "z0", "trajectory", "trace" (source row after every step, when
        ``keep_trace``), "info"}``."""
        from .diffusion.attention import BatchLayout, attention_control
        from .diffusion.inversion import ddim_invert, ddim_sample_batch, encode_image, encode_prompt, make_schedule

        p = self.params
        n = int(p.num_inference_steps)
        sched = make_schedule(pipe.scheduler, n)
        source, target = str(sample.source_caption), str(sample.target_caption)
        z0 = encode_image(pipe, image)
        conds = encode_prompt(pipe, [source, target]).to(z0)
        uncond = encode_prompt(pipe, "").to(z0)
        t0 = time.perf_counter()
        trajectory = ddim_invert(pipe.unet, sched, z0, conds[:1], n)  # DirectInversion.ddim_loop: guidance 1
        offsets = (direct_inversion_offsets(pipe.unet, sched, trajectory, conds, uncond, p.guidance_scale)
                   if p.inversion == "direct" else None)
        info: dict[str, Any] = {"inversion": p.inversion, "inversion_seconds": time.perf_counter() - t0}
        layout = BatchLayout.cfg(2) if p.guidance_scale != 1.0 else BatchLayout.plain(2)
        controller, blend, cinfo = self.build_controller(pipe.tokenizer, sample, tuple(z0.shape[-2:]), layout)
        info.update(cinfo)
        step = DirectInversionStep(offsets, blend, keep_trace)
        t1 = time.perf_counter()
        with attention_control(pipe.unet, controller):
            latents = ddim_sample_batch(pipe.unet, sched, trajectory[-1], conds, n, guidance_scale=p.guidance_scale,
                                        uncond=uncond, callback=step)
        info["editing_seconds"] = time.perf_counter() - t1
        if blend is not None:
            info["blend_grid_hw"] = list(blend.used_grid) if blend.used_grid else None
            if blend.last_mask is not None:
                info["blend_mask_fraction"] = float(blend.last_mask[1].float().mean())
        return {"edit": latents, "z0": z0, "trajectory": trajectory, "trace": step.trace, "info": info}

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        # deterministic (DDIM, eta 0): the seed is recorded
        p = self.params
        return self.edit_with_captions(sample, seed, cross_replace_steps=float(p.cross_replace_steps),
                                       self_replace_steps=float(p.self_replace_steps))


__all__ = ["DirectInversionStep", "PnPInversion", "blend_words_for", "direct_inversion_offsets"]
