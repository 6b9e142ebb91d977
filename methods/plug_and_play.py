"""``plug_and_play``: Plug-and-Play diffusion features (Tumanyan, Geyer, Bagon, Dekel,
"Plug-and-Play Diffusion Features for Text-Driven Image-to-Image Translation", CVPR 2023) for real
images on Stable Diffusion, written on the shared plumbing of ``methods/diffusion`` (no diffusers
pipeline implements it). The reference is the authors' diffusers port
``MichalGeyer/pnp-diffusers`` (``preprocess.py``, ``pnp.py``, ``pnp_utils.py``,
``config_pnp.yaml``); the original LDM code is ``MichalGeyer/plug-and-play``.

One edit:

1. the source (resized to the working resolution) is VAE-encoded (posterior mean) and
   DDIM-inverted *without guidance* with the source-branch prompt over ``inversion_steps`` steps
   (``preprocess.py``: ``--steps 999``, ``--inversion_prompt ''``), keeping the latent at every
   inversion timestep;
2. sampling runs ``num_inference_steps`` DDIM steps from the inverted latent at the first
   sampling timestep (``pnp.py`` loads ``noisy_latents_{timesteps[0]}``). Each step is one UNet
   batch ``[source, uncond edit, cond edit]``: the source row is the source branch at that
   timestep, conditioned on the source-branch prompt (``pnp_guidance_embeds``); the edit rows are
   the edit latent with the negative prompt and the target caption, combined with
   classifier-free guidance ``guidance_scale``;
3. injection (``pnp_utils.py``), during the first ``int(num_inference_steps * pnp_f_t)`` steps:
   the residual branch of the decoder's ``feature_layer``-th ResNet block (its ``conv2`` output,
   before the skip connection is added) in both edit rows is replaced by the source row's; during
   the first ``int(num_inference_steps * pnp_attn_t)`` steps the self-attention queries and keys
   of decoder layers ``attn_start_layer`` and later are replaced by the source row's
   (``InjectSelfAttentionController`` of ``methods/diffusion/attention.py``, restricted to those
   layers). Decoder layers are counted as the official code counts them: the up blocks' ResNet
   blocks (each with its attention block, if any) in forward order, 0-based, so for SD 1.x layer 4
   is ``up_blocks[1].resnets[1]`` and layers 4-11 are ``up_blocks[1].attentions[1:]``,
   ``up_blocks[2]`` and ``up_blocks[3]`` (``pnp_utils.py``: "injecting attention in blocks 4 - 11
   of the decoder, so not in the first block of the lowest resolution"); the official code patches
   ``transformer_blocks[0].attn1`` of each, here every transformer block's (SD 1.x has one). The
   residual-feature injection is a torch forward hook on that ``conv2`` (the shared attention module has no hook
   for ResNet features); it is always removed, so the cached pipeline stays clean.

Source branch (``source_branch``): ``inversion`` (default, ``pnp-diffusers``): the source row is
fed the inversion latent of that timestep (``load_source_latents_t``), so the inversion timesteps
must include every sampling timestep (true for 999 inversion steps, or for ``inversion_steps ==
num_inference_steps``; otherwise the edit fails naming ``inversion_steps``).
``reconstruction`` (the original LDM repo, ``run_features_extraction.py``: features are saved while
*sampling* from the inverted latent with the empty prompt and guidance 1): the source row is
denoised jointly, DDIM-stepped with its own (unguided) noise prediction; here that reconstruction
runs at ``num_inference_steps`` steps, not the original's 999.

Source-branch prompt (``source_prompt``): ``empty`` (default): ``""`` for inversion and for the
source row, as ``pnp-diffusers`` (``--inversion_prompt ''``; ``pnp_guidance_embeds =
get_text_embeds("", "")``) and the original repo (``prompt = ""`` for real images).
``source_caption``: the sample's source caption (``""`` when it has none) for both; note that
``pnp-diffusers`` conditions the source row on ``""`` even when it inverts with a prompt, here the
source row uses the prompt it was inverted with.

Defaults and their sources (``pnp-diffusers``):

- ``num_inference_steps`` 50 (``n_timesteps``), ``guidance_scale`` 7.5, ``pnp_f_t`` 0.8,
  ``pnp_attn_t`` 0.5, ``negative_prompt`` "ugly, blurry, black, low res, unrealistic":
  ``config_pnp.yaml``.
- ``inversion_steps`` 999: ``preprocess.py`` ``--steps`` default (also the original repo's
  ``ddim_inversion_steps = 999``); 1000 is impossible with SD's 1000-step training schedule and
  ``steps_offset=1`` (the last timestep would be 1000). Costly (999 UNet calls per edit): lower it
  to ``num_inference_steps`` for sweeps.
- ``feature_layer`` 4, ``attn_start_layer`` 4: ``pnp_utils.py`` (``up_blocks[1].resnets[1]``;
  attention res_dict ``{1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}``); paper sec. 4: features from
  layer 4, self-attention from layers 4-11.
- ``model``: Stable Diffusion 1.5 (``pnp-diffusers`` supports ``sd_version: '1.5'`` =
  ``runwayml/stable-diffusion-v1-5``; its config default is 2.1-base; CPAM, sec. 5, runs on SD-1.5
  and compares with PnP). ``resolution`` 512: ``pnp.py`` resizes to 512 x 512 (Lanczos; here
  bicubic, as every diffusion adapter of the harness, edit resized back to the source size).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from harness.registry import METHODS
from harness.types import Sample

from ._diffusion_common import (TINY_STEPS, DiffusionMethod, InvertAndEditMethod, _check_number, auto_field,
                                check_choice, check_unit, text_embeddings)
from .diffusion.inversion import ddim_move

PNP_NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"  # pnp-diffusers config_pnp.yaml
SOURCE_PROMPTS = ("empty", "source_caption")
SOURCE_BRANCHES = ("inversion", "reconstruction")


def decoder_layers(unet: Any) -> list[tuple[int, int, bool]]:
    """The UNet decoder's layers in forward order: ``(up block, index in block, has attention)``
    per ResNet block (its attention block, when the up block has one, shares the index)."""
    layers = []
    for b, block in enumerate(unet.up_blocks):
        n_attn = len(getattr(block, "attentions", None) or ())
        for i in range(len(block.resnets)):
            layers.append((b, i, i < n_attn))
    return layers


def _injection_controller(**kw: Any) -> Any:
    """``InjectSelfAttentionController`` restricted to the attention layers named in ``prefixes``."""
    from .diffusion.attention import InjectSelfAttentionController

    class DecoderLayerInjection(InjectSelfAttentionController):
        def __init__(self, prefixes: tuple[str, ...], **kw: Any) -> None:
            super().__init__(**kw)
            self.prefixes = prefixes

        def on_qkv(self, ctx: Any):
            if not ctx.name.startswith(self.prefixes):
                return None
            return super().on_qkv(ctx)

    return DecoderLayerInjection(**kw)


@METHODS.register("plug_and_play")
class PlugAndPlay(InvertAndEditMethod):
    """DDIM inversion, then guided sampling with the source's decoder features and self-attention
    injected."""

    version = "1"
    requires = ("source", "target_caption")  # source_caption only with source_prompt=source_caption

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD 1.5 (pnp-diffusers sd_version '1.5')
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # config_pnp.yaml n_timesteps
        guidance_scale: float = 7.5  # config_pnp.yaml
        pnp_f_t: float = 0.8  # config_pnp.yaml: residual features injected in the first 80% of steps
        pnp_attn_t: float = 0.5  # config_pnp.yaml: self-attention q, k injected in the first 50% of steps
        negative_prompt: str = PNP_NEGATIVE_PROMPT  # config_pnp.yaml negative_prompt
        # preprocess.py --steps; tiny: num_inference_steps (the other inversion schedule that holds
        # every sampling timestep), not 999 UNet calls
        inversion_steps: int | Literal["auto"] = auto_field(999, lambda p: p.num_inference_steps)
        feature_layer: int = 4  # pnp_utils.py: up_blocks[1].resnets[1] (decoder layer 4)
        attn_start_layer: int = 4  # pnp_utils.py: self-attention in decoder layers 4-11
        source_prompt: Literal["empty", "source_caption"] = "empty"  # preprocess.py --inversion_prompt ''
        source_branch: Literal["inversion", "reconstruction"] = "inversion"  # pnp-diffusers: inversion latents

        def __post_init__(self) -> None:
            super().__post_init__()
            owner = "plug_and_play"
            check_unit(owner, "pnp_f_t", self.pnp_f_t)
            check_unit(owner, "pnp_attn_t", self.pnp_attn_t)
            if not isinstance(self.negative_prompt, str):
                raise ValueError(f"{owner}: 'negative_prompt' must be a string, got {self.negative_prompt!r}")
            _check_number(owner, "inversion_steps", self.inversion_steps, 1, integer=True)
            _check_number(owner, "feature_layer", self.feature_layer, 0, integer=True)
            _check_number(owner, "attn_start_layer", self.attn_start_layer, 0, integer=True)
            check_choice(owner, "source_prompt", self.source_prompt, SOURCE_PROMPTS)
            check_choice(owner, "source_branch", self.source_branch, SOURCE_BRANCHES)

    def source_prompt_for(self, sample: Sample) -> str:
        if self.params.source_prompt == "empty" or sample.source_caption is None:
            return ""
        return str(sample.source_caption).strip()

    def run_edit(self, pipe: Any, latents0: Any, source_prompt: str, target_prompt: str) -> dict[str, Any]:
        """Invert and edit. Returns ``edit`` (final edit latents), ``source`` (the source branch's
        last latent: ``z_0`` of the inversion, or the reconstruction), ``z_start`` (the latent
        sampling starts from) and the injection windows in ``info``."""
        import torch

        from .diffusion.attention import BatchLayout, attention_control
        from .diffusion.inversion import ddim_invert, make_schedule

        p = self.params
        n = int(p.num_inference_steps)
        unet = pipe.unet
        sched = make_schedule(pipe.scheduler, n)
        n_train = int(pipe.scheduler.config.num_train_timesteps)
        inv_sched = make_schedule(pipe.scheduler, int(p.inversion_steps))
        if max(inv_sched.timesteps) >= n_train:
            raise ValueError(
                f"plug_and_play: 'inversion_steps' = {p.inversion_steps} reaches timestep {max(inv_sched.timesteps)}, "
                f"beyond the {n_train}-step training schedule (the official value is 999)"
            )
        layers = decoder_layers(unet)
        if p.feature_layer >= len(layers):
            raise ValueError(f"plug_and_play: 'feature_layer' = {p.feature_layer} but the UNet decoder has "
                             f"{len(layers)} layers")
        fb, fi, _ = layers[p.feature_layer]
        conv = unet.up_blocks[fb].resnets[fi].conv2
        prefixes = tuple(f"up_blocks.{b}.attentions.{i}." for b, i, has in layers[p.attn_start_layer:] if has)

        src, neg, tgt = text_embeddings(pipe, [source_prompt, p.negative_prompt, target_prompt], latents0).chunk(3)
        traj = ddim_invert(unet, inv_sched, latents0, src, int(p.inversion_steps))  # unguided, as preprocess.py
        # traj[k + 1] sits at the k-th inversion timestep in ascending order
        at = {t: traj[k + 1] for k, t in enumerate(reversed(inv_sched.timesteps))}
        missing = [t for t in sched.timesteps if t not in at]
        if (p.source_branch == "inversion" and missing) or sched.timesteps[0] not in at:
            raise ValueError(
                f"plug_and_play: the inversion with 'inversion_steps' = {p.inversion_steps} has no latent at the "
                f"sampling timestep(s) {missing} of num_inference_steps = {n} (use 999 or num_inference_steps)"
            )

        layout = BatchLayout((0, 1, 1), ("none", "uncond", "cond"))  # pnp.py: [source, uncond, cond]
        text = torch.cat([src, neg, tgt])
        f_steps = int(n * p.pnp_f_t)  # pnp.py: timesteps[:int(n_timesteps * pnp_f_t)]
        attn_steps = int(n * p.pnp_attn_t)
        ctrl = _injection_controller(prefixes=prefixes, steps=(0, attn_steps), places=("up",), inject=("q", "k"),
                                     layout=layout, auto_step=False)
        state = {"step": 0}

        def inject_features(module: Any, inputs: Any, output: Any) -> Any:
            if state["step"] >= f_steps:
                return None
            new = output.clone()
            for r in layout.edit_rows():
                new[r] = output[layout.source_row(r)]
            return new

        x = at[sched.timesteps[0]]
        z_start = x
        x_src = x
        g = float(p.guidance_scale)
        with torch.no_grad(), attention_control(unet, ctrl):
            handle = conv.register_forward_hook(inject_features)
            try:
                for i, t in enumerate(sched.timesteps):
                    state["step"] = i
                    source_in = at[t] if p.source_branch == "inversion" else x_src
                    eps = unet(torch.cat([source_in, x, x]), t, encoder_hidden_states=text).sample
                    eps_s, eps_u, eps_c = eps.chunk(3)
                    a_t, a_prev = sched.alpha(t), sched.alpha(sched.prev(t))
                    x = ddim_move(x, eps_u + g * (eps_c - eps_u), a_t, a_prev)
                    if p.source_branch == "reconstruction":
                        x_src = ddim_move(x_src, eps_s, a_t, a_prev)
                    ctrl.step_end()
            finally:
                handle.remove()
        source_final = traj[0] if p.source_branch == "inversion" else x_src
        info = {
            "feature_injection_steps": f_steps,
            "attention_injection_steps": attn_steps,
            "feature_module": f"up_blocks.{fb}.resnets.{fi}.conv2",
            "attention_layers": [pre.rstrip(".") for pre in prefixes],
        }
        return {"edit": x, "source": source_final, "z_start": z_start, "info": info}

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {
            "pnp_f_t": float(p.pnp_f_t),
            "pnp_attn_t": float(p.pnp_attn_t),
            "negative_prompt": p.negative_prompt,
            "inversion_steps": int(p.inversion_steps),
            "inversion_guidance_scale": 1.0,
            "feature_layer": int(p.feature_layer),
            "attn_start_layer": int(p.attn_start_layer),
            "source_prompt": p.source_prompt,
            "source_branch": p.source_branch,
        }
