"""``ledits_pp`` / ``ledits_pp_sdxl``: LEDITS++ (Brack, Friedrich, Kornmeier, Tsaban, Schramowski,
Kersting, Passos, CVPR 2024) through diffusers' ``LEditsPPPipelineStableDiffusion`` and
``LEditsPPPipelineStableDiffusionXL``.

Two calls per edit, as in the pipelines' docstring example (diffusers 0.42,
``pipelines/ledits_pp/``):

1. ``pipe.invert(image, source_prompt, source_guidance_scale, num_inversion_steps, skip,
   generator)``: edit-friendly inversion. The last ``num_inversion_steps`` of a schedule of
   ``int(num_inversion_steps * (1 + skip))`` steps are kept; the noisy latents are drawn
   independently (seeded by the edit's seed), and the noise maps ``z_t`` that make the sampler
   hit them exactly are stored on the pipeline;
2. ``pipe(editing_prompt=[...], reverse_editing_direction=[...], edit_guidance_scale,
   edit_threshold, edit_warmup_steps, edit_cooldown_steps, use_cross_attn_mask,
   use_intersect_mask)``: denoising from the inverted latent with the stored noise maps, plus
   the LEDITS++ semantic guidance of each concept, masked implicitly (eq. 12 of the paper).

Without an editing concept (or with ``edit_guidance_scale`` 0) and with an empty source prompt
the second call retraces the inversion exactly: the output is the VAE round trip of the source
(the inversion is "perfect" up to the autoencoder, paper sec. 3.1). The SDXL pipeline zeroes the
last ``num_zero_noise_steps`` noise maps (default 3), which trades that exactness for less
high-frequency noise; set it to 0 for an exact reconstruction.

Mapping of the harness' sample fields to LEDITS++ concepts (a harness choice; LEDITS++ edits
with concepts, not with a target caption, and neither PartEdit nor CPAM states the mapping they
used):

- ``edit_concept`` (concept added, guidance toward it): ``target_caption`` (default; the prompt
  CPAM's CLIPScore and PartEdit's alphaCLIP_FG are measured against), ``instruction``, or
  ``target_only_words`` (the words of the target caption that are not in the source caption,
  e.g. "blue" for "a red car" -> "a blue car");
- ``remove_concept`` (concept removed, ``reverse_editing_direction=True``): ``none`` (default),
  ``source_caption``, or ``source_only_words`` (the words of the source caption missing from the
  target caption, e.g. "red"; none when there are none);
- ``source_prompt_field``: the inversion's source prompt: ``none`` (default: ``""``, the
  pipelines' default; LEDITS++ is caption-free, CPAM Table 1) or ``source_caption`` (PartEdit
  4.1 inverts with a source prompt, BLIP-2 captions in their case), used with classifier-free
  guidance ``guidance_scale`` (the pipelines' ``source_guidance_scale``, default 3.5).

Defaults are the pipelines' own signature defaults (diffusers 0.42):
``invert``: ``source_guidance_scale=3.5``, ``skip=0.15``, ``num_inversion_steps=30`` (SD) /
``50`` (SDXL), ``num_zero_noise_steps=3`` (SDXL); ``__call__``: ``edit_guidance_scale=5``,
``edit_threshold=0.9``, ``edit_warmup_steps=0``, ``edit_cooldown_steps=None``,
``use_intersect_mask=True`` (SD) / ``False`` (SDXL), ``use_cross_attn_mask=False``. The docstring
example and the TEdBench++ settings of the LEDITS++ authors use stronger edits (50 steps,
``skip`` 0.1, ``edit_guidance_scale`` 10-15, ``edit_threshold`` 0.6-0.75): sweep them.

Scheduler: LEDITS++ inverts with the second-order SDE-DPM-Solver++ (the pipelines replace any
other scheduler by ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
solver_order=2)``); ``scheduler=ddim`` gives the edit-friendly DDPM inversion of Huberman-
Spiegelglas et al. instead (the other scheduler the pipelines support). A fresh scheduler of the
chosen kind is built from the checkpoint's scheduler config for every edit, so the tiny backbone
(whose scheduler is DDIM / Euler) runs the same solver as the real checkpoints.

Exactness of the DPM-Solver++ path: the pipelines' scheduler (``final_sigmas_type="zero"``,
``lower_order_final=True``, the DPMSolverMultistepScheduler defaults) takes a first-order step to
sigma 0 at the end of sampling, while ``invert`` computed that last step with the second-order
formula, so even without an edit the output differs from the source's VAE round trip by half of
that step's second-order correction (small with real weights, large with random ones).
``exact_inversion=true`` samples with ``final_sigmas_type="sigma_min"``, ``lower_order_final=False``
(our choice, not the pipelines'): sampling then retraces the inversion exactly. The default keeps
the pipelines' behaviour. DDIM (eta 1) is exact either way. The pipelines'
DDIM inversion assumes epsilon prediction: ``scheduler=ddim`` on a v-prediction checkpoint
(e.g. ``stabilityai/stable-diffusion-2-1``) is refused.

Models: ``ledits_pp`` defaults to Stable Diffusion 1.5 (the pipeline's docstring example; CPAM
compares with LEDITS++ among SD-1.5 methods; ZONE C.1 runs every baseline on SD 1.5). PartEdit
(sec. 4.1) compares with LEDITS++ "with the same base model of SD2.1": override
``model=stabilityai/stable-diffusion-2-1-base`` (512, epsilon) or ``stabilityai/stable-diffusion-2-1``
(768 v-prediction, ``resolution=768``; DPM-Solver only) with ``source_prompt_field=source_caption``.
``ledits_pp_sdxl`` defaults to ``stabilityai/stable-diffusion-xl-base-1.0`` at 1024 x 1024.

The implicit cross-attention mask (``use_cross_attn_mask`` / ``use_intersect_mask``) reads the
UNet's cross-attention maps at 1/4 of the latent resolution (16 x 16 for SD 1.5 at 512, 32 x 32
for SDXL at 1024). A UNet without cross-attention at that level (the tiny test backbones) cannot
build it: ``prepare()`` refuses such a setting with a message naming the parameters, and the
runner records every sample skipped with it. The noise-quantile mask alone
(``use_intersect_mask=false``, ``use_cross_attn_mask=false``) works on any UNet.

The SDXL pipeline adds an invisible watermark when the ``invisible-watermark`` package is
installed, which makes the output depend on the environment: ``watermark=false`` (default) turns
it off, ``true`` asks for it (and fails without the package).

The working size must be a multiple of 32 (``invert`` refuses other sizes): the source is resized
(bicubic) to ``resolution`` x ``resolution`` (or, for ``resolution=null``, to its size rounded down
to a multiple of 32) and the edit is resized back to the source size.
"""
from __future__ import annotations

import dataclasses
import re
import threading
import time
from typing import Any, ClassVar, Literal


from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import (TINY_RESOLUTION, TINY_STEPS, DiffusionMethod, _check_number, auto_field, empty_text_reason,
                                from_pipeline_output, working_size)

# invert() refuses heights / widths that are not multiples of 32.
LEDITS_SIZE_MULTIPLE = 32
SCHEDULERS = ("dpmsolver++", "ddim")
EDIT_CONCEPTS = ("target_caption", "instruction", "target_only_words")
REMOVE_CONCEPTS = ("none", "source_caption", "source_only_words")
SOURCE_PROMPT_FIELDS = ("none", "source_caption")

# invert() keeps its state (latents, noise maps, timesteps) on the pipeline object, which is shared
# per process: one invert + edit pair at a time.
_PIPE_LOCK = threading.RLock()
_WORD = re.compile(r"[\w'-]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` (letters, digits, apostrophes, hyphens), in order."""
    return _WORD.findall(str(text).lower())


def only_words(text: str, other: str) -> str:
    """The words of ``text`` that do not occur in ``other``, in order, without repeats ("" if none)."""
    drop = set(words(other))
    seen: list[str] = []
    for w in words(text):
        if w not in drop and w not in seen:
            seen.append(w)
    return " ".join(seen)


def working_size32(height: int, width: int, resolution: int | None) -> tuple[int, int]:
    """(height, width) LEDITS++ runs at: ``resolution`` squared, or the source size rounded down to
    a multiple of 32 (at least 32): its ``invert()`` refuses other sizes."""
    return working_size(height, width, resolution, LEDITS_SIZE_MULTIPLE)


def has_quarter_res_cross_attention(unet_config: Any) -> bool:
    """Whether a UNet has cross-attention in a down or up block working at 1/4 of the latent
    resolution, where the LEDITS++ pipelines read their cross-attention masks
    (``att_res = latent size / 4``; down block ``i`` works at 1/2**i, up block ``j`` of ``n`` at
    1/2**(n-1-j); the mid block is not read)."""
    down = list(getattr(unet_config, "down_block_types", ()) or ())
    up = list(getattr(unet_config, "up_block_types", ()) or ())
    level = 2  # 1/4 = 1/2**2
    return (len(down) > level and "CrossAttn" in down[level]) or (
        len(up) > level and "CrossAttn" in up[len(up) - 1 - level]
    )


_DDIM_CLASS: list[type] = []


def _ddim_class() -> type:
    """``DDIMScheduler`` whose ``add_noise`` accepts float timesteps.

    diffusers 0.42's SD LEDITS++ ``invert`` noises the latents with ``add_noise(x0, noise,
    torch.Tensor([t]))``, a float tensor, which DDIM uses as an index (IndexError); the SDXL
    pipeline passes an integer tensor. Casting to long changes nothing else (the values are
    integer timesteps); the pipelines still see a ``DDIMScheduler`` (their isinstance checks).
    """
    if not _DDIM_CLASS:
        from diffusers import DDIMScheduler

        class LongTimestepDDIMScheduler(DDIMScheduler):
            def add_noise(self, original_samples, noise, timesteps):  # type: ignore[override]
                if timesteps.is_floating_point():
                    timesteps = timesteps.round().long()
                return super().add_noise(original_samples, noise, timesteps)

        _DDIM_CLASS.append(LongTimestepDDIMScheduler)
    return _DDIM_CLASS[0]


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ledits_pp: '{name}' must be one of {list(allowed)}, got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"ledits_pp: '{name}' must be true or false, got {value!r}")


class _LEditsPP(DiffusionMethod):
    """Shared adapter: edit-friendly inversion, then LEDITS++ semantic guidance toward / away from
    concepts taken from the sample (see the module docstring for the mapping)."""

    version = "1"
    # The defaults' needs; an instance's needs follow its parameters (see __init__).
    requires = ("source", "target_caption")
    tiny_kind: ClassVar[str] = "sd15"
    prompt_field = "target_caption"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD 1.5 (the pipeline's docstring example)
        num_inference_steps: int | Literal["auto"] = auto_field(30, TINY_STEPS)  # invert()'s num_inversion_steps default (steps kept after skip)
        guidance_scale: float = 3.5  # invert()'s source_guidance_scale default (used with a source prompt)
        resolution: int | Literal["auto"] | None = auto_field(512, TINY_RESOLUTION)  # SD 1.5's native size; a multiple of 32 (invert() refuses others)
        skip: float = 0.15  # invert() default: fraction of the schedule's first steps skipped, in [0, 1)
        edit_guidance_scale: float = 5.0  # __call__ default; s_e of eq. 12
        edit_threshold: float = 0.9  # __call__ default; lambda of eq. 12 (mask quantile), in [0, 1]
        edit_warmup_steps: int = 0  # __call__ default: steps without edit guidance at the start
        edit_cooldown_steps: int | None = None  # __call__ default: step after which guidance stops; None = never
        use_cross_attn_mask: bool = False  # __call__ default (implied by use_intersect_mask)
        # __call__ default (SD): cross-attention mask AND noise-quantile mask; tiny: false, the tiny
        # UNet has no cross-attention at 1/4 of the latent size (prepare() would refuse true)
        use_intersect_mask: bool | Literal["auto"] = auto_field(True, False)
        scheduler: Literal["dpmsolver++", "ddim"] = "dpmsolver++"  # the pipelines' choice (sde-dpmsolver++, order 2)
        # dpmsolver++ only: sample with final_sigmas_type=sigma_min, lower_order_final=false so that
        # sampling retraces the inversion exactly (false = the pipelines' scheduler, see docstring)
        exact_inversion: bool = False
        edit_concept: Literal["target_caption", "instruction", "target_only_words"] = "target_caption"
        remove_concept: Literal["none", "source_caption", "source_only_words"] = "none"
        source_prompt_field: Literal["none", "source_caption"] = "none"  # invert()'s default source_prompt=""

        def __post_init__(self) -> None:
            super().__post_init__()
            owner = "ledits_pp"
            if self.resolution is not None and self.resolution % LEDITS_SIZE_MULTIPLE:
                raise ValueError(
                    f"{owner}: 'resolution' must be a multiple of {LEDITS_SIZE_MULTIPLE} (LEDITS++ invert() "
                    f"refuses other sizes), got {self.resolution!r}"
                )
            _check_number(owner, "skip", self.skip, 0.0)
            if self.skip >= 1.0:
                raise ValueError(f"{owner}: 'skip' must be in [0, 1), got {self.skip!r}")
            _check_number(owner, "edit_guidance_scale", self.edit_guidance_scale, 0.0)
            _check_number(owner, "edit_threshold", self.edit_threshold, 0.0)
            if self.edit_threshold > 1.0:
                raise ValueError(f"{owner}: 'edit_threshold' must be in [0, 1] (a quantile), got {self.edit_threshold!r}")
            _check_number(owner, "edit_warmup_steps", self.edit_warmup_steps, 0, integer=True)
            if self.edit_cooldown_steps is not None:
                _check_number(owner, "edit_cooldown_steps", self.edit_cooldown_steps, 1, integer=True)
                if self.edit_cooldown_steps <= self.edit_warmup_steps:
                    raise ValueError(
                        f"{owner}: 'edit_cooldown_steps' ({self.edit_cooldown_steps}) must exceed "
                        f"'edit_warmup_steps' ({self.edit_warmup_steps}), else no step is guided"
                    )
            _flag("use_cross_attn_mask", self.use_cross_attn_mask)
            _flag("use_intersect_mask", self.use_intersect_mask)
            _flag("exact_inversion", self.exact_inversion)
            _choice("scheduler", self.scheduler, SCHEDULERS)
            _choice("edit_concept", self.edit_concept, EDIT_CONCEPTS)
            _choice("remove_concept", self.remove_concept, REMOVE_CONCEPTS)
            _choice("source_prompt_field", self.source_prompt_field, SOURCE_PROMPT_FIELDS)

    def __init__(self, params: "_LEditsPP.Params | None" = None):
        super().__init__(params)
        p = self.params
        needs = ["source", "instruction" if p.edit_concept == "instruction" else "target_caption"]
        if p.edit_concept == "target_only_words" or p.remove_concept != "none" or p.source_prompt_field != "none":
            needs.append("source_caption")
        if p.remove_concept == "source_only_words":
            needs.append("target_caption")
        # Instance attributes shadow the class defaults: the runner asks self.requires.
        self.requires = tuple(dict.fromkeys(needs))
        self.prompt_field = "instruction" if p.edit_concept == "instruction" else "target_caption"
        self._sample: Sample | None = None
        self._concepts: tuple[list[str], list[bool], str] | None = None
        self._scheduler_config: dict[str, Any] | None = None

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import LEditsPPPipelineStableDiffusion

        return LEditsPPPipelineStableDiffusion

    def prepare(self) -> None:
        super().prepare()
        pipe = self._loaded.pipeline
        p = self.params
        if (p.use_cross_attn_mask or p.use_intersect_mask) and not has_quarter_res_cross_attention(pipe.unet.config):
            raise ValueError(
                f"method '{self.name}': use_cross_attn_mask / use_intersect_mask need the UNet's cross-attention "
                f"maps at 1/4 of the latent resolution, and this UNet ({self._loaded.weights_label}; down blocks "
                f"{list(pipe.unet.config.down_block_types)}) has no cross-attention there; set "
                f"use_intersect_mask=false and use_cross_attn_mask=false (noise-quantile mask only)"
            )
        if p.scheduler == "ddim" and pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                f"method '{self.name}': scheduler=ddim: the LEDITS++ DDIM inversion assumes epsilon prediction, "
                f"and model '{p.model}' predicts '{pipe.scheduler.config.prediction_type}'; use scheduler=dpmsolver++"
            )
        # The checkpoint's scheduler config (the pipeline may already have swapped the class); every
        # edit builds a fresh scheduler of the chosen kind from it.
        self._scheduler_config = dict(pipe.scheduler.config)

    def _fresh_scheduler(self) -> Any:
        from diffusers import DPMSolverMultistepScheduler

        cfg = self._scheduler_config
        assert cfg is not None
        if self.params.scheduler == "ddim":
            # clip_sample off, as the pipelines' __init__ forces it
            return _ddim_class().from_config(cfg, clip_sample=False)
        # what the pipelines' __init__ builds from any scheduler they do not support
        extra: dict[str, Any] = {}
        if self.params.exact_inversion:
            # second order up to the last step, which ends at sigma_min, as the inversion computes it
            extra = {"final_sigmas_type": "sigma_min", "lower_order_final": False, "euler_at_final": False}
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="sde-dpmsolver++", solver_order=2, **extra)

    # -- samples ----------------------------------------------------------------------------
    def concepts(self, sample: Sample) -> tuple[list[str], list[bool], str]:
        """(editing prompts, reverse flags, source prompt) for ``sample``."""
        p = self.params
        if p.edit_concept == "target_only_words":
            add = only_words(str(sample.target_caption), str(sample.source_caption))
        else:
            add = str(getattr(sample, p.edit_concept)).strip()
        prompts, reverse = [add], [False]
        remove = ""
        if p.remove_concept == "source_caption":
            remove = str(sample.source_caption).strip()
        elif p.remove_concept == "source_only_words":
            remove = only_words(str(sample.source_caption), str(sample.target_caption))
        if remove:
            prompts.append(remove)
            reverse.append(True)
        source = "" if p.source_prompt_field == "none" else str(sample.source_caption).strip()
        return prompts, reverse, source

    def check(self, sample: Sample) -> str | None:
        blank = empty_text_reason(self.name, sample, [f for f in self.requires if f != "source"])
        if blank:
            return blank
        if self.params.edit_concept == "target_only_words" and not only_words(
            str(sample.target_caption), str(sample.source_caption)
        ):
            return (
                f"method '{self.name}' (edit_concept=target_only_words) found no word of the target_caption "
                f"missing from the source_caption in sample '{sample.id}'"
            )
        return None

    # -- editing ----------------------------------------------------------------------------
    def _invert_kwargs(self) -> dict[str, Any]:
        return {}

    def _call_kwargs(self, generator: Any) -> dict[str, Any]:
        return {"generator": generator}

    def _before_call(self, pipe: Any) -> None:
        """Per-edit pipeline settings beyond the scheduler (SDXL: the watermark)."""

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        p = self.params
        assert self._sample is not None
        prompts, reverse, source = self.concepts(self._sample)
        self._concepts = (prompts, reverse, source)
        w, h = image.size
        with _PIPE_LOCK:
            pipe.scheduler = self._fresh_scheduler()
            self._before_call(pipe)
            pipe.invert(
                image=image,
                source_prompt=source,
                source_guidance_scale=p.guidance_scale,
                num_inversion_steps=p.num_inference_steps,
                skip=p.skip,
                generator=generator,
                height=h,
                width=w,
                **self._invert_kwargs(),
            )
            return pipe(
                editing_prompt=prompts,
                reverse_editing_direction=reverse,
                edit_guidance_scale=p.edit_guidance_scale,
                edit_threshold=p.edit_threshold,
                edit_warmup_steps=p.edit_warmup_steps,
                edit_cooldown_steps=p.edit_cooldown_steps,
                use_cross_attn_mask=p.use_cross_attn_mask,
                use_intersect_mask=p.use_intersect_mask,
                output_type="np",
                **self._call_kwargs(generator),
            )

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        return working_size32(height, width, self.params.resolution)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch

        start = self.begin_edit(sample, seed)
        prep = time.perf_counter() - start.t0
        self._sample, self._concepts = sample, None
        try:
            with torch.inference_mode():
                out = self.call_pipeline(start.loaded.pipeline, start.image, "", start.generator)
            prompts, reverse, source = self._concepts  # type: ignore[misc]
        finally:
            self._sample, self._concepts = None, None
        p = self.params
        info = self.edit_info(
            start, seed, prep,
            prompt_field=self.prompt_field, prompt=prompts[0], editing_prompt=prompts,
            reverse_editing_direction=reverse, source_prompt=source, edit_concept=p.edit_concept,
            remove_concept=p.remove_concept, source_prompt_field=p.source_prompt_field,
        )
        return MethodOutput(image=from_pipeline_output(out.images, start.source_hw), info=info)

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {
            "num_inversion_steps": int(p.num_inference_steps),
            "schedule_steps": int(p.num_inference_steps * (1 + p.skip)),
            "skip": float(p.skip),
            "source_guidance_scale": float(p.guidance_scale),
            "edit_guidance_scale": float(p.edit_guidance_scale),
            "edit_threshold": float(p.edit_threshold),
            "edit_warmup_steps": int(p.edit_warmup_steps),
            "edit_cooldown_steps": p.edit_cooldown_steps,
            "use_cross_attn_mask": bool(p.use_cross_attn_mask),
            "use_intersect_mask": bool(p.use_intersect_mask),
            "scheduler": "DPMSolverMultistepScheduler(sde-dpmsolver++, order 2)"
            if p.scheduler == "dpmsolver++" else "DDIMScheduler (edit-friendly DDPM, eta 1)",
            "exact_inversion": bool(p.exact_inversion),
        }


@METHODS.register("ledits_pp")
class LEditsPP(_LEditsPP):
    """LEDITS++ on Stable Diffusion 1.x / 2.x (``LEditsPPPipelineStableDiffusion``)."""


@METHODS.register("ledits_pp_sdxl")
class LEditsPPSDXL(_LEditsPP):
    """LEDITS++ on SDXL (``LEditsPPPipelineStableDiffusionXL``)."""

    tiny_kind = "sdxl"

    @dataclasses.dataclass(frozen=True)
    class Params(_LEditsPP.Params):
        model: str = "stabilityai/stable-diffusion-xl-base-1.0"  # SDXL base 1.0
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # SDXL invert()'s num_inversion_steps default
        resolution: int | Literal["auto"] | None = auto_field(1024, TINY_RESOLUTION)  # SDXL's native size
        use_intersect_mask: bool = False  # SDXL __call__ default
        num_zero_noise_steps: int = 3  # SDXL invert() default: last noise maps set to zero
        watermark: bool = False  # SDXL invisible watermark (pipeline default: on when the package is installed)

        def __post_init__(self) -> None:
            super().__post_init__()
            _check_number("ledits_pp_sdxl", "num_zero_noise_steps", self.num_zero_noise_steps, 0, integer=True)
            _flag("watermark", self.watermark)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import LEditsPPPipelineStableDiffusionXL

        return LEditsPPPipelineStableDiffusionXL

    def _invert_kwargs(self) -> dict[str, Any]:
        return {"num_zero_noise_steps": self.params.num_zero_noise_steps}

    def _call_kwargs(self, generator: Any) -> dict[str, Any]:
        return {}  # the SDXL __call__ takes no generator (its VAE decode is deterministic)

    def prepare(self) -> None:
        if self.params.watermark:
            from diffusers.utils import is_invisible_watermark_available

            if not is_invisible_watermark_available():
                raise RuntimeError(
                    f"method '{self.name}': watermark=true needs the invisible-watermark package; install it "
                    f"or set watermark=false"
                )
        super().prepare()

    def _before_call(self, pipe: Any) -> None:
        if not self.params.watermark:
            pipe.watermark = None
            return
        from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

        pipe.watermark = StableDiffusionXLWatermarker()

    def extra_info(self) -> dict[str, Any]:
        return {**super().extra_info(), "num_zero_noise_steps": int(self.params.num_zero_noise_steps),
                "watermark": bool(self.params.watermark)}
