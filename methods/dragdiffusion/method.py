"""``dragdiffusion``: DragDiffusion (Shi, Xue, Liew, Pan, Yan, Zhang, Tan, Bai, "DragDiffusion:
Harnessing Diffusion Models for Interactive Point-based Image Editing", CVPR 2024), a baseline of
DiffEditor's Table 1 (issue 16), on Stable Diffusion 1.5 and the shared plumbing of
``methods/diffusion``. Official code: ``Yujun-Shi/DragDiffusion`` (``drag_pipeline.py``,
``utils/drag_utils.py``, ``utils/lora_utils.py``, ``utils/ui_utils.py`` ``run_drag``); ours is
written anew from it.

One edit (``run_drag``):

1. the source (resized to the working size) is VAE-encoded; LoRA (rank 16) is fine-tuned on it
   with the prompt (:mod:`.lora`);
2. with the LoRA, DDIM inversion (guidance 1) of the posterior mean with the prompt for
   ``round(inversion_strength * n)`` of the ``n`` steps (0.7 x 50 = 35): ``z_t`` at timestep
   ``timesteps[n - 35]``;
3. motion supervision and point tracking optimise ``z_t`` (:mod:`.drag`): UNet decoder features
   (``unet_feature_idx`` 3) at half the image size, ``r_m`` 1, ``r_p`` 3, Adam lr 0.01, at most
   ``n_pix_step`` 80 steps, mask term ``lam`` 0.1 outside the editable region when a mask is given;
4. the original ``z_t`` and the optimised one are denoised side by side (one UNet batch, guidance
   1) over the remaining 35 steps with MasaCtrl's mutual self-attention (the optimised branch's
   queries attend to the original branch's keys and values from ``start_step`` 0 and
   self-attention layer ``start_layer`` 10 on: ``MutualSelfAttentionControl`` of
   ``utils/attn_utils.py``, the shared :class:`MutualSelfAttentionController`); the optimised
   branch is the edit.

Inputs: ``source_points`` -> handles, ``target_points`` -> targets (``(x, y)`` pixels of the
source, mapped to the supervision grid and rounded as ``run_drag``); ``mask`` (optional) = the
editable region (``run_drag``: no mask drawn = no mask term); the prompt is the sample's
``source_caption`` (``""`` when absent; ``prompt: empty`` always ``""``). Face samples
(``point_layout`` dlib68) are dragged point by point like any other.

Defaults and their sources (the current release's UI ``drag_ui.py`` and
``drag_bench_evaluation/run_lora_training.py`` / ``run_drag_diffusion.py``, which produced the
paper's DragBench numbers): ``lora_steps`` 80, ``lora_lr`` 5e-4, ``lora_batch_size`` 4,
``lora_rank`` 16, ``n_pix_step`` 80, ``inversion_strength`` 0.7, ``latent_lr`` 0.01, ``lam`` 0.1,
``r_m`` 1, ``r_p`` 3, ``unet_feature_idx`` [3], supervision at ``0.5 x`` the image size, 50 DDIM
steps, guidance 1, ``start_step`` 0, ``start_layer`` 10, SD 1.5 (``runwayml/stable-diffusion-v1-5``
in the UI; the maintained mirror id here), 512 x 512. The first public release (v0.1.0) used
``lora_steps`` 200, ``lora_lr`` 2e-4, ``n_pix_step`` 40 and ``inversion_strength`` 0.75: set those
to reproduce it.

Differences from the official code (each kept small, none a parameter of the method):
the official pipeline runs the UNet in float16 with ``autocast`` + ``GradScaler`` during the
latent optimisation and LoRA training; here everything runs in the pipeline's ``dtype``
(float32 by default, as DiffEditor timed every method); the random draws come from the edit's
seeded generator; the edit is resized back to the source size bicubic (official: bilinear), as
every adapter of the harness.

Not specified by the paper (choices, each a parameter): ``prompt`` (the paper asks the user for a
prompt; benchmark samples carry a ``source_caption``); which 17 landmarks DiffEditor's 17-point
setting drags (``point_subset``: ``all`` = every point of the sample, default; ``17pt`` = the jaw
line 0-16 of a ``dlib68`` face, the harness's choice; :func:`methods._common.handle_points`).

Costs: preparation = VAE encoding + LoRA fine-tuning + inversion; inference = latent optimisation
+ denoising + decoding. Network counts per edit: ``unet_lora_train`` ``lora_steps`` calls of
``lora_batch_size`` rows (fine-tuning forwards, apart); ``unet`` = ``k`` inversion calls + 1
(reference features) + the optimisation's forwards (``n_pix_step``, fewer when the handles
arrive early) + ``k`` denoising calls of 2 rows; 1 text-encoder, 1 VAE encode, 1 VAE decode.
"""
from __future__ import annotations

import dataclasses
import time
import types
from typing import Any, ClassVar, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SampleError, SkipSample

from .._common import check_point_subset, handle_points
from .._diffusion_common import (TINY_STEPS, DiffusionMethod, _check_number, auto_field, check_choice,
                                 from_pipeline_output)

PROMPTS = ("source_caption", "empty")
TINY_OPT_STEPS = 2  # tiny backbone: LoRA and latent-optimisation steps


@METHODS.register("dragdiffusion")
class DragDiffusion(DiffusionMethod):
    """LoRA on the source, DDIM inversion to ``z_t``, motion supervision + point tracking on
    ``z_t``, then denoising with mutual self-attention to the original branch."""

    version = "1"
    requires = ("source", "source_points", "target_points")
    prompt_field: ClassVar[str] = "source_caption"
    tiny_kind: ClassVar[str] = "sd15"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # drag_ui.py: runwayml/stable-diffusion-v1-5
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # args.n_inference_step = 50
        guidance_scale: float = 1.0  # args.guidance_scale = 1.0 (inversion, optimisation and denoising); only 1
        inversion_strength: float = 0.7  # drag_ui.py (v0.1.0: 0.75): round(0.7 * 50) = 35 steps
        lora_steps: int | Literal["auto"] = auto_field(80, TINY_OPT_STEPS)  # drag_ui.py lora_step (v0.1.0: 200)
        lora_lr: float = 5e-4  # drag_ui.py lora_lr (v0.1.0: 2e-4)
        lora_batch_size: int | Literal["auto"] = auto_field(4, 2)  # drag_ui.py lora_batch_size
        lora_rank: int = 16  # drag_ui.py lora_rank
        n_pix_step: int | Literal["auto"] = auto_field(80, TINY_OPT_STEPS)  # drag_ui.py (v0.1.0: 40)
        latent_lr: float = 0.01  # drag_ui.py latent_lr
        lam: float = 0.1  # drag_ui.py lam: mask term weight
        r_m: int = 1  # run_drag args.r_m
        r_p: int = 3  # run_drag args.r_p
        unet_feature_idx: tuple[int, ...] = (3,)  # run_drag args.unet_feature_idx = [3]
        sup_res_factor: float = 0.5  # run_drag args.sup_res_h = int(0.5 * full_h)
        mutual_self_attention: bool = True  # run_drag: MutualSelfAttentionControl during denoising
        start_step: int = 0  # drag_ui.py start_step
        # drag_ui.py start_layer 10 (of SD's 16 self-attention layers); tiny: 3 (decoder of 7)
        start_layer: int | Literal["auto"] = auto_field(10, 3)
        use_mask: bool = True  # the sample's mask as the editable region (run_drag: none drawn = no term)
        # not specified by the paper: the prompt (the user's in the UI)
        prompt: Literal["source_caption", "empty"] = "source_caption"
        # the points dragged (methods/_common.py handle_points): all | 17pt / 68pt of a dlib68 face
        # (DiffEditor sec. 4.2 / Table 1: 17- and 68-landmark dragging; which 17: not specified, jaw 0-16)
        point_subset: str = "all"

        def __post_init__(self) -> None:
            super().__post_init__()
            o = "dragdiffusion"
            if self.guidance_scale != 1.0:
                # run_drag fixes args.guidance_scale = 1.0 for real images (the classifier-free-guided
                # variant, drag_diffusion_update_gen, is for the official UI's generated images)
                raise ValueError(f"{o}: 'guidance_scale' must be 1.0 (real-image DragDiffusion runs unguided), "
                                 f"got {self.guidance_scale!r}")
            _check_number(o, "inversion_strength", self.inversion_strength, 0.0, inclusive=False)
            if self.inversion_strength > 1.0:
                raise ValueError(f"{o}: 'inversion_strength' must be in (0, 1], got {self.inversion_strength!r}")
            if round(self.inversion_strength * self.num_inference_steps) < 1:
                raise ValueError(f"{o}: round(inversion_strength * num_inference_steps) must be >= 1, got "
                                 f"{self.inversion_strength!r} x {self.num_inference_steps!r}")
            _check_number(o, "lora_steps", self.lora_steps, 0, integer=True)
            _check_number(o, "lora_lr", self.lora_lr, 0.0, inclusive=False)
            _check_number(o, "lora_batch_size", self.lora_batch_size, 1, integer=True)
            _check_number(o, "lora_rank", self.lora_rank, 1, integer=True)
            _check_number(o, "n_pix_step", self.n_pix_step, 0, integer=True)
            _check_number(o, "latent_lr", self.latent_lr, 0.0, inclusive=False)
            _check_number(o, "lam", self.lam, 0.0)
            _check_number(o, "r_m", self.r_m, 0, integer=True)
            _check_number(o, "r_p", self.r_p, 0, integer=True)
            if not self.unet_feature_idx:
                raise ValueError(f"{o}: 'unet_feature_idx' must name at least one decoder feature")
            for i in self.unet_feature_idx:
                _check_number(o, "unet_feature_idx", i, 0, integer=True)
            _check_number(o, "sup_res_factor", self.sup_res_factor, 0.0, inclusive=False)
            _check_number(o, "start_step", self.start_step, 0, integer=True)
            _check_number(o, "start_layer", self.start_layer, 0, integer=True)
            check_choice(o, "prompt", self.prompt, PROMPTS)
            check_point_subset(o, self.point_subset)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def check(self, sample: Sample) -> str | None:
        # the caption is optional (see ``prompt``); the points themselves are checked in edit()
        try:
            handle_points(sample, self.params.point_subset)
        except SampleError as e:
            return f"method 'dragdiffusion': {e}"
        return None

    def prompt_for(self, sample: Sample) -> str:
        if self.params.prompt == "empty" or sample.source_caption is None:
            return ""
        return str(sample.source_caption).strip()

    def inversion_steps(self) -> int:
        """``k = round(inversion_strength * n)``: the inversion's steps and the denoising's."""
        return int(round(float(self.params.inversion_strength) * int(self.params.num_inference_steps)))

    # -- the edit ---------------------------------------------------------------------------------
    def drag_inputs(self, sample: Sample, source_hw: tuple[int, int], size: tuple[int, int]) -> dict[str, Any]:
        """Handles / targets on the supervision grid (rows, cols, rounded) and the editable mask
        on it (or None), as ``run_drag`` maps them."""
        import torch
        import torch.nn.functional as F

        try:
            src_pts, tgt_pts = handle_points(sample, self.params.point_subset)
        except SampleError as e:
            raise SkipSample(str(e)) from e
        src = np.asarray(src_pts, dtype=np.float64)
        tgt = np.asarray(tgt_pts, dtype=np.float64)
        if src.ndim != 2 or src.shape[1] != 2 or src.shape != tgt.shape or len(src) == 0:
            raise SkipSample(f"source_points / target_points must be two lists of the same N >= 1 (x, y) points, "
                             f"got shapes {src.shape} and {tgt.shape}")
        if not (np.isfinite(src).all() and np.isfinite(tgt).all()):
            raise SkipSample("source_points / target_points hold a non-finite coordinate")
        h, w = source_hw
        sup = (int(self.params.sup_res_factor * size[0]), int(self.params.sup_res_factor * size[1]))
        if min(sup) < 1:
            raise SkipSample(f"the supervision grid {sup} is empty (sup_res_factor too small for the working size)")

        def grid(pts: np.ndarray) -> "torch.Tensor":
            rc = np.stack([pts[:, 1] / h * sup[0], pts[:, 0] / w * sup[1]], axis=1)
            rc = np.round(rc)
            rc[:, 0] = np.clip(rc[:, 0], 0, sup[0] - 1)
            rc[:, 1] = np.clip(rc[:, 1], 0, sup[1] - 1)
            return torch.from_numpy(rc).float()

        mask = None
        if self.params.use_mask and sample.mask is not None:
            m = torch.from_numpy(np.asarray(sample.mask, dtype=bool).astype(np.float32))[None, None]
            mask = F.interpolate(m, sup, mode="nearest")
        return {"handles": grid(src), "targets": grid(tgt), "mask": mask, "sup_hw": sup}

    def run_drag(self, pipe: Any, image: Any, prompt: str, inputs: dict[str, Any], generator: Any,
                 controller: Any = None) -> dict[str, Any]:
        """The four stages on the resized PIL ``image``; returns the final latents of both
        branches (``edit``, ``source``), the inverted ``z_t`` and optimised ``z_t``, the tracked
        handles, the stage timings and info. ``controller`` replaces the mutual self-attention
        controller (tests)."""
        import torch
        import torch.nn.functional as F

        from ..diffusion.attention import BatchLayout, MutualSelfAttentionController, attention_control
        from ..diffusion.inversion import ddim_move, encode_prompt, make_schedule, predict_eps
        from . import drag, lora

        p = self.params
        n, k = int(p.num_inference_steps), self.inversion_steps()
        sched = make_schedule(pipe.scheduler, n)
        unet, vae = pipe.unet, pipe.vae
        # The harness edits under torch.inference_mode(); LoRA training and the latent
        # optimisation need autograd: everything below runs outside it, on fresh tensors.
        with torch.inference_mode(False):
            t0 = time.perf_counter()
            dev, dt = next(unet.parameters()).device, next(unet.parameters()).dtype
            arr = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            with torch.no_grad():
                posterior = vae.encode(arr.to(next(vae.parameters()).device, next(vae.parameters()).dtype)).latent_dist
                text = encode_prompt(pipe, prompt).to(dev, dt)
            sf = float(vae.config.scaling_factor)
            z0 = (posterior.mean * sf).to(dev, dt)
            stage = lora.LoraStage(0, [], 0.0)
            # the LoRA's initial down matrices from the edit's seed (peft draws them from torch's
            # global generator): the same edit every time
            ctx = (lora.attached_lora(unet, int(p.lora_rank), seed=generator.initial_seed()) if int(p.lora_steps) > 0
                   else _no_lora())
            with ctx as params:
                if params:
                    stage = lora.train_lora(unet, params, pipe.scheduler, posterior, text, int(p.lora_steps),
                                            float(p.lora_lr), int(p.lora_batch_size), generator, sf)
                t1 = time.perf_counter()
                ascending = list(reversed(sched.timesteps))[:k]  # DragPipeline.invert: the first k steps
                z = z0
                with torch.no_grad():
                    for t in ascending:
                        eps = predict_eps(unet, z, t, text)
                        z = ddim_move(z, eps, sched.alpha(sched.prev(t)), sched.alpha(t))
                z_t = z
                inversion_seconds = time.perf_counter() - t1
                prep_end = time.perf_counter()
                t_opt = sched.timesteps[n - k]

                def step_fn(eps: Any, x: Any) -> Any:
                    return ddim_move(x, eps, sched.alpha(t_opt), sched.alpha(sched.prev(t_opt)))

                mask = inputs["mask"]
                if mask is not None:
                    mask = F.interpolate(mask, tuple(z_t.shape[-2:]), mode="nearest").to(dev, dt)
                if int(p.n_pix_step) > 0:
                    with drag.FeatureTap(unet, p.unet_feature_idx) as tap:
                        res = drag.drag_update(unet, tap, z_t, t_opt, text, inputs["handles"].to(dev),
                                               inputs["targets"].to(dev), mask, inputs["sup_hw"], step_fn,
                                               n_pix_step=int(p.n_pix_step), lr=float(p.latent_lr),
                                               r_m=int(p.r_m), r_p=int(p.r_p), lam=float(p.lam))
                else:
                    res = drag.DragResult(z_t, inputs["handles"], 0, drag.reached(inputs["handles"], inputs["targets"]),
                                          [], 0.0)
                t2 = time.perf_counter()
                if controller is None and p.mutual_self_attention:
                    controller = MutualSelfAttentionController(start_step=int(p.start_step),
                                                               start_layer=int(p.start_layer),
                                                               layout=BatchLayout.plain(2))
                lat = torch.cat([z_t, res.latent.to(dt)])  # [original branch, optimised branch]
                emb = text.expand(2, *text.shape[1:])
                with torch.no_grad(), attention_control(unet, controller):
                    for t in sched.timesteps[n - k:]:
                        eps = unet(lat, t, encoder_hidden_states=emb).sample
                        lat = ddim_move(lat, eps, sched.alpha(t), sched.alpha(sched.prev(t)))
                denoise_seconds = time.perf_counter() - t2
        info = {
            "inversion_steps": k,
            "optimised_timestep": int(t_opt),
            "lora_stage": stage.summary(),
            "drag_steps": res.steps,
            "handles_reached": bool(res.reached),
            "handles_final": [[float(v) for v in r] for r in res.handles.cpu()],
            "supervision_hw": list(inputs["sup_hw"]),
            "mask_term": mask is not None and float(mask.sum()) != 0.0,
            "drag_first_loss": res.losses[0] if res.losses else None,
            "drag_last_loss": res.losses[-1] if res.losses else None,
            "lora_seconds": stage.seconds,
            "inversion_seconds": inversion_seconds,
            "drag_seconds": res.seconds,
            "denoise_seconds": denoise_seconds,
        }
        return {"edit": lat[1:2], "source": lat[0:1], "z0": z0, "z_t": z_t, "z_t_optimised": res.latent,
                "handles": res.handles, "prep_end": prep_end, "t0": t0, "info": info}

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        from ..diffusion.inversion import decode_latents

        assert self._inputs is not None, "call_pipeline runs inside edit()"
        out = self.run_drag(pipe, image, prompt, self._inputs, generator)
        u8 = decode_latents(pipe, out["edit"])
        # from_pipeline_output maps [0, 1] floats back to uint8 with rint: exact for k / 255.
        return types.SimpleNamespace(images=u8.astype(np.float32) / 255.0, prep_end=out["prep_end"], info=out["info"])

    _inputs: dict[str, Any] | None = None

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        """Preparation = encoding + LoRA + inversion; inference = optimisation + denoising + decoding."""
        start = self.begin_edit(sample, seed)
        self._inputs = inputs = self.drag_inputs(sample, start.source_hw, start.size)
        prompt = self.prompt_for(sample)
        try:
            out = self.call_pipeline(start.loaded.pipeline, start.image, prompt, start.generator)
        finally:
            self._inputs = None
        edited = from_pipeline_output(out.images, start.source_hw)
        info = self.edit_info(start, seed, out.prep_end - start.t0, prompt_field=self.prompt_field, prompt=prompt,
                              dragged_points=int(len(inputs["handles"])), **out.info)
        return MethodOutput(image=edited, info=info)

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {name: getattr(p, name) if not isinstance(getattr(p, name), tuple) else list(getattr(p, name))
                for name in ("inversion_strength", "lora_steps", "lora_lr", "lora_batch_size", "lora_rank",
                             "n_pix_step", "latent_lr", "lam", "r_m", "r_p", "unet_feature_idx", "sup_res_factor",
                             "mutual_self_attention", "start_step", "start_layer", "use_mask", "prompt", "point_subset")}


class _no_lora:
    """The LoRA context when no fine-tuning runs (``lora_steps`` 0): the UNet as loaded."""

    def __enter__(self) -> list:
        return []

    def __exit__(self, *exc: Any) -> None:
        return None
