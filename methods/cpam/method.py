"""``cpam``: CPAM, context-preserving adaptive manipulation for zero-shot real image editing (Vo,
Do, Nguyen, Tran, Le, 2025; ``shared/papers/cpam.md``). No official code exists; the choices the
paper leaves open are parameters (below), several with the first author's thesis code
(``vdkhoi20/thesis`` ``OIIctrl/``, MasaCtrl-derived) as the hint for their default.

One edit (Algorithm 1, sec. 5.1):

1. the source (resized, bicubic, to the working size) is VAE-encoded and inverted with the
   source prompt: null-text inversion (the paper, "DDIM with null-text guided") or plain DDIM
   (``inversion: ddim``, the thesis code) -- :func:`.sampler.invert`; recorded as preparation
   (``prep_seconds``);
2. the source mask ``M_s``: the sample's mask, else SAM from ``meta`` points / box
   (:func:`.masks.source_mask_from_sam`); the target mask ``M_t`` by the edit type's strategy
   (:func:`.masks.target_mask`), for the attention strategy refined from the target branch's
   cross-attention maps after the first ``refine_steps`` (T_m) steps
   (:func:`.masks.refine_schedule`, :func:`.masks.attention_target_mask`);
3. the two-branch loop (:func:`.sampler.sample`): the source branch re-set to the inversion
   latent of each step, the target branch denoised from ``z_T`` with the target prompt under
   Preservation Adaptation on self-attention (``use_pa``) and Localized Extraction on
   cross-attention (``use_le``) -- :mod:`.attention`; recorded as inference.

Edit type (``edit_type: auto``) from the sample: ``meta["edit_type"]`` when it is one of
:data:`.masks.EDIT_TYPES`, else the category: ``change_object`` -> replace, ``change_pose`` ->
pose_view, ``change_background`` -> background, ``remove`` -> remove, ``add`` -> add; any other
category -> replace (the paper's general object edit; noted in the info).

Prompts: target = ``target_caption``; source (inversion and source branch) = ``source_caption``
when present, else ``""`` (CPAM is caption-free, Table 1); the removal edit uses ``""`` for every
prompt (thesis ``api_main``: "remove: all prompts ''"), changeable with ``remove_prompts``.

Not specified by the paper (each a parameter; default and its source):

- ``intermediate``: the "intermediate latent" ``z_i`` of Algorithm 1 = the inversion latent of
  the same step (``same_step``, default) or ``cleaner_k`` (5, thesis) steps cleaner (``cleaner``).
- ``retain_object``: Eq. 2's "object is retained": ``auto`` = ``meta["retain_object"]`` when the
  sample has it (IMBA's label), else true for pose_view only (the thesis' pose/view preset
  adapts the object from step 3 / layer 8; its replace/add presets use layer 17, i.e. never).
- ``start_step`` (T = 3) / ``start_layer`` (L = 8): paper values, counted as C1's controller does
  (0-based, inclusive; self-attention layers in forward order); tiny: 1 / 3.
- ``plain_fraction`` 0.1 (paper), ``plain_seed`` 0, ``plain_redraw`` once: which layers run
  normal self-attention (the paper: "randomly ... 10% of the layers").
- ``value_blend``: not used (the paper's V_i); the thesis' ``0.4 V_clean + 0.6 V_inter`` needs a
  third batch branch and is not offered (``intermediate: cleaner`` makes the source row itself
  the cleaner latent instead).
- the background edit's M_s: the sample's mask as given, which for ``change_background`` /
  ``background`` samples is the background itself (IMBA's convention, harness/data/imba.py;
  the paper: "when M_s is the mask of the background"); M_t = M_s.
- ``mask_strategy`` (replace / pose_view; :data:`.masks.STRATEGIES`): ``attention`` (default, the
  paper's first option: M_s for the first T_m steps, then the refined attention mask),
  ``convex_hull`` (the paper's second), ``dilate`` (the thesis presets), ``source``;
  ``mask_dilation`` 0.1 the scale of hull / dilate / add expansion (thesis ``expand_mask``).
- ``refine_steps`` T_m = 1 (thesis config ``STEP_CHANGE_MASK``; its class default 5);
  ``attention_threshold`` 0.25 (thesis): :class:`.masks.AttentionMaskRefiner` over the target
  row's cross-attention maps (every layer of every step so far, heads averaged).
- ``mask_tokens``: the target-prompt tokens whose cross-attention makes M_t: ``meta
  ["object_prompt"]``'s words when all found in the target prompt, else every word of the
  target prompt (thesis).
- M_s on the latent grid: the pixel mask box-averaged to the latent grid, cells at >= 0.5 inside;
  the controllers resize it to each layer's grid (nearest).
- ``inversion_guidance`` 7.5: CFG the null-text optimisation targets (= sampling guidance);
  ``null_inner_steps`` 10 (tiny 2), ``null_lr`` 1e-2, ``null_early_stop`` 1e-5 (null-text
  inversion's, Mokady et al.).
- ``sam_variant`` / ``sam_checkpoint``: the SAM that makes M_s from ``source_points`` /
  ``meta["points"]`` / ``meta["box"]`` for a sample without a mask (ZONE's SAM loader); missing
  -> the sample is skipped naming ``method.sam_checkpoint``; with ``backbone: tiny`` and no
  checkpoint, ZONE's random-weight tiny SAM (smoke runs; ``source_mask_from`` says so).

Output: the target branch decoded, resized (bicubic) to the source size; ``mask`` = the target
mask M_t of the last step, resized (nearest) to the source size (empty for removal, M_t = 0);
``info`` has M_s / M_t areas, the edit type and how it was decided, the plain layers drawn, the
inversion kind and the stage times. torch is imported lazily.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SkipSample

from .._diffusion_common import (DiffusionMethod, _check_number, auto_field, check_choice, check_unit,
                                 from_pipeline_output, text_embeddings)
from .masks import EDIT_TYPES, STRATEGIES
from .sampler import INTERMEDIATES, INVERSIONS

OWNER = "cpam"
EDIT_TYPE_CHOICES = ("auto", "replace", "pose_view", "background", "remove", "add")
#: harness category -> CPAM edit type (the inverse of harness.data.imba.EDIT_TYPES)
CATEGORY_EDIT_TYPE = {
    "change_object": "replace",
    "change_pose": "pose_view",
    "change_background": "background",
    "remove": "remove",
    "add": "add",
}
RETAIN_CHOICES = ("auto", "true", "false")
SOURCE_PROMPTS = ("source_caption", "empty")
MASK_TOKENS = ("object_prompt", "all")
REMOVE_PROMPTS = ("empty", "captions")


@METHODS.register("cpam")
class CPAM(DiffusionMethod):
    """CPAM on Stable Diffusion 1.5 (see the module docstring)."""

    version: ClassVar[str] = "1"
    tiny_kind: ClassVar[str] = "sd15"
    prompt_field: ClassVar[str] = "target_caption"
    requires: ClassVar[tuple[str, ...]] = ("source", "target_caption")

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # sec. 5.1: SD-1.5 (runwayml mirror)
        num_inference_steps: int | Literal["auto"] = auto_field(50, 4)  # sec. 5.1: 50 DDIM steps
        guidance_scale: float = 7.5  # sec. 5.1
        # -- inversion (sec. 5.1: DDIM inversion with null-text guidance) --
        inversion: Literal["null_text", "ddim"] = "null_text"
        inversion_guidance: float = 7.5  # the CFG null-text optimises for (not specified: = guidance)
        null_inner_steps: int | Literal["auto"] = auto_field(10, 2)  # null-text inversion's 10 (Mokady et al.)
        null_lr: float = 1e-2
        null_early_stop: float = 1e-5
        source_prompt: Literal["source_caption", "empty"] = "source_caption"
        remove_prompts: Literal["empty", "captions"] = "empty"  # thesis: removal runs with "" prompts
        # -- sampling batch (not specified) --
        intermediate: Literal["same_step", "cleaner"] = "same_step"
        cleaner_k: int = 5  # thesis: the clean row is 5 inversion steps cleaner
        # -- Preservation Adaptation (sec. 4.2) --
        use_pa: bool = True
        use_le: bool = True
        start_step: int | Literal["auto"] = auto_field(3, 1)  # T = 3 (Eq. 2); tiny: within 4 steps
        start_layer: int | Literal["auto"] = auto_field(8, 3)  # L = 8 (Eq. 2); tiny: its decoder layers
        retain_object: Literal["auto", "true", "false"] = "auto"
        plain_fraction: float = 0.1  # sec. 4.2.3: "10% of the layers"
        plain_seed: int = 0
        plain_redraw: Literal["once", "per_step"] = "once"
        # -- masks (sec. 4.4) --
        edit_type: Literal["auto", "replace", "pose_view", "background", "remove", "add"] = "auto"
        # replace / pose_view M_t: attention (paper's first option, with refinement), convex_hull, dilate, source
        mask_strategy: Literal["attention", "convex_hull", "dilate", "source"] = "attention"
        mask_dilation: float = 0.1  # thesis expand_mask scale (hull, dilate and add)
        refine_steps: int = 1  # T_m (not given; thesis config STEP_CHANGE_MASK = 1)
        sam_variant: str = "vit_h"  # SAM for M_s from points / box (samples without a mask)
        sam_checkpoint: str | None = None
        attention_threshold: float = 0.25  # thesis MaskExpand threshold
        mask_tokens: Literal["object_prompt", "all"] = "object_prompt"

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice(OWNER, "inversion", self.inversion, INVERSIONS)
            check_choice(OWNER, "intermediate", self.intermediate, INTERMEDIATES)
            check_choice(OWNER, "edit_type", self.edit_type, EDIT_TYPE_CHOICES)
            check_choice(OWNER, "retain_object", str(self.retain_object).lower(), RETAIN_CHOICES)
            check_choice(OWNER, "source_prompt", self.source_prompt, SOURCE_PROMPTS)
            check_choice(OWNER, "remove_prompts", self.remove_prompts, REMOVE_PROMPTS)
            check_choice(OWNER, "plain_redraw", self.plain_redraw, ("once", "per_step"))
            check_choice(OWNER, "mask_tokens", self.mask_tokens, MASK_TOKENS)
            check_choice(OWNER, "mask_strategy", self.mask_strategy, STRATEGIES)
            _check_number(OWNER, "inversion_guidance", self.inversion_guidance, 0.0)
            _check_number(OWNER, "null_inner_steps", self.null_inner_steps, 1, integer=True)
            _check_number(OWNER, "null_lr", self.null_lr, 0.0, inclusive=False)
            _check_number(OWNER, "null_early_stop", self.null_early_stop, 0.0)
            _check_number(OWNER, "cleaner_k", self.cleaner_k, 0, integer=True)
            _check_number(OWNER, "start_step", self.start_step, 0, integer=True)
            _check_number(OWNER, "start_layer", self.start_layer, 0, integer=True)
            _check_number(OWNER, "plain_seed", self.plain_seed, 0, integer=True)
            _check_number(OWNER, "refine_steps", self.refine_steps, 0, integer=True)
            _check_number(OWNER, "mask_dilation", self.mask_dilation, 0.0)
            check_unit(OWNER, "plain_fraction", self.plain_fraction)
            check_unit(OWNER, "attention_threshold", self.attention_threshold)
            if self.resolution is None:
                raise ValueError(f"{OWNER}: 'resolution' must be set (the masks live on the square latent grid)")

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("cpam runs its own inversion and two-branch loop (edit())")

    # -- samples -----------------------------------------------------------------------------------
    def edit_type_for(self, sample: Sample) -> tuple[str, str]:
        """(edit type, where it came from) by the rule of the module docstring."""
        if self.params.edit_type != "auto":
            return self.params.edit_type, "parameter"
        meta = sample.meta or {}
        if str(meta.get("edit_type") or "") in EDIT_TYPES:
            return str(meta["edit_type"]), "meta.edit_type"
        if sample.category in CATEGORY_EDIT_TYPE:
            return CATEGORY_EDIT_TYPE[sample.category], f"category {sample.category}"
        return "replace", f"category {sample.category!r} has no CPAM edit type: replace (the general object edit)"

    def retain_for(self, sample: Sample, edit_type: str) -> bool:
        r = str(self.params.retain_object).lower()
        if r != "auto":
            return r == "true"
        meta = sample.meta or {}
        if isinstance(meta.get("retain_object"), bool):
            return bool(meta["retain_object"])
        return edit_type == "pose_view"

    def prompts(self, sample: Sample, edit_type: str) -> tuple[str, str]:
        """(source prompt, target prompt)."""
        if edit_type == "remove" and self.params.remove_prompts == "empty":
            return "", ""
        src = "" if self.params.source_prompt == "empty" or sample.source_caption is None else str(sample.source_caption)
        return src.strip(), str(sample.target_caption or "").strip()

    def has_sam_prompt(self, sample: Sample) -> bool:
        meta = sample.meta or {}
        return sample.source_points is not None or meta.get("points") is not None or meta.get("box") is not None

    def check(self, sample: Sample) -> str | None:
        blank = sample.target_caption is not None and not str(sample.target_caption).strip()
        if blank and self.edit_type_for(sample)[0] != "remove":  # removal runs with "" prompts anyway
            return f"method '{self.name}' needs a non-empty target_caption; sample '{sample.id}' has an empty one"
        if sample.mask is None and not self.has_sam_prompt(sample):
            return (f"method '{self.name}' needs the source mask M_s: sample '{sample.id}' has no mask and no "
                    f"points (source_points / meta['points']) or box (meta['box']) to get one from SAM")
        return None

    def source_mask(self, sample: Sample) -> tuple[np.ndarray, str]:
        """M_s at the source's size (bool) and where it came from."""
        if sample.mask is not None:
            m = np.asarray(sample.mask).astype(bool)
            if m.shape != np.asarray(sample.source).shape[:2]:
                raise SkipSample(f"method '{self.name}': sample '{sample.id}' field 'mask' has shape {m.shape}, "
                                 f"the source is {np.asarray(sample.source).shape[:2]}")
            return m, "sample mask"
        from .masks import load_sam_predictor, source_mask_from_sam

        p = self.params
        meta = sample.meta or {}
        points = sample.source_points if sample.source_points is not None else meta.get("points")
        try:
            device = str(self._loaded.device) if self._loaded is not None else "cpu"
            # tiny backbone without a checkpoint: ZONE's random-weight SAM (smoke runs, labelled)
            tiny = p.backbone == "tiny" and not p.sam_checkpoint
            predictor = load_sam_predictor(p.sam_variant, p.sam_checkpoint, device=device, tiny=tiny,
                                           param="method.sam_checkpoint")
            m = source_mask_from_sam(predictor, np.asarray(sample.source), points=points, box=meta.get("box"))
        except Exception as e:  # MissingWeights (SAM not installed / not cached) and bad prompts
            raise SkipSample(f"method '{self.name}': sample '{sample.id}' has no mask; SAM from its points/box "
                             f"failed: {e}") from e
        label = f"SAM {p.sam_variant}" if not tiny else "SAM (random weights, tiny backbone)"
        return np.asarray(m).astype(bool), label

    # -- the edit --------------------------------------------------------------------------------------
    def mask_token_positions(self, pipe: Any, sample: Sample, target: str) -> tuple[list[int], str]:
        """Target-prompt token positions whose cross-attention makes the attention M_t."""
        from ..prompt_to_prompt import MAX_TOKENS, _token_encoder, split_words, word_positions

        encode = _token_encoder(pipe.tokenizer)
        k = int(getattr(pipe.tokenizer, "model_max_length", MAX_TOKENS) or MAX_TOKENS)
        obj = str((sample.meta or {}).get("object_prompt") or "").strip()
        if self.params.mask_tokens == "object_prompt" and obj:
            pos, missing = word_positions(encode, target, split_words(obj), k)
            if pos and not missing:
                return sorted(set(pos)), f"object_prompt {obj!r}"
        pos, _ = word_positions(encode, target, split_words(target), k)
        return sorted(set(pos)), "every target word"

    def run(self, pipe: Any, latents0: Any, m_s: np.ndarray, sample: Sample, edit_type: str, retain: bool,
            timings: dict[str, float]) -> dict[str, Any]:
        """Invert ``latents0`` and edit (steps 1-3 of the module docstring) on the latent grid.
        ``m_s``: M_s at the latent grid (float in [0, 1]). Returns ``edit`` (latents), ``m_t``
        (the last step's M_t, latent grid), ``inversion`` and the info entries."""
        from ..diffusion.attention import ControllerList
        from ..diffusion.inversion import make_schedule
        from . import masks
        from .attention import LocalizedExtraction, PreservationAdaptation, StaticMasks
        from .sampler import TokenMapCapture, invert
        from .sampler import sample as cpam_sample

        p = self.params
        n = int(p.num_inference_steps)
        t0 = time.perf_counter()
        sched = make_schedule(pipe.scheduler, n)
        src_text, tgt_text = self.prompts(sample, edit_type)
        null, src, tgt = text_embeddings(pipe, ["", src_text, tgt_text], latents0).chunk(3)
        inv = invert(pipe.unet, sched, latents0, src, null, n, kind=p.inversion,
                     guidance_scale=float(p.inversion_guidance), inner_steps=int(p.null_inner_steps),
                     lr=float(p.null_lr), early_stop=float(p.null_early_stop))
        timings["inversion"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        m_s_bool = m_s >= 0.5
        uses_attention = p.mask_strategy == "attention" and edit_type in ("replace", "pose_view")
        store: Any = None
        positions: list[int] = []
        token_rule = ""
        refiner = None
        if uses_attention:
            positions, token_rule = self.mask_token_positions(pipe, sample, tgt_text)
            store = TokenMapCapture(positions)
            refiner = masks.AttentionMaskRefiner(m_s_bool, t_m=int(p.refine_steps),
                                                 threshold=float(p.attention_threshold))
            static_t = None
        else:
            scale = float(p.mask_dilation)
            static_t = masks.target_mask(edit_type, m_s_bool, strategy=p.mask_strategy, hull_scale=scale,
                                         dilate_scale=scale, add_dilate_scale=scale).astype(np.float32)
        state: dict[str, Any] = {"m_t": static_t, "added": 0}

        def target_at(step: int) -> np.ndarray:
            if refiner is None:
                return static_t
            if state.get("step") == step:  # asked by every layer: computed once per step
                return state["m_t"]
            # fold in the steps finished since the last call (the thesis' running mean)
            while state["added"] < len(store.steps):
                k = state["added"]
                for layer_map in store.steps[k]:
                    refiner.add(k, layer_map)
                state["added"] += 1
            state["m_t"] = refiner.mask(step).astype(np.float32)
            state["step"] = step
            return state["m_t"]

        provider = StaticMasks(m_s, target_at)
        ctrls: list[Any] = []
        pa = None
        if p.use_pa:
            pa = PreservationAdaptation(mask_provider=provider, start_step=int(p.start_step),
                                        start_layer=int(p.start_layer), retain_object=retain,
                                        plain_fraction=float(p.plain_fraction), plain_seed=int(p.plain_seed),
                                        plain_redraw=p.plain_redraw, num_self_layers=self_layer_count(pipe.unet))
            ctrls.append(pa)
        if p.use_le:
            ctrls.append(LocalizedExtraction(mask_provider=provider, null_embedding=null[0]))
        if store is not None:
            ctrls.append(store)
        controller = ControllerList(ctrls) if ctrls else None
        out = cpam_sample(pipe.unet, sched, inv, src, tgt, null, n, guidance_scale=float(p.guidance_scale),
                          controller=controller, intermediate=p.intermediate, cleaner_k=int(p.cleaner_k))
        if state["m_t"] is None:  # no controller asked for M_t (PA and LE off): the last step's
            target_at(n - 1)
        timings["sampling"] = time.perf_counter() - t1
        info = {
            "edit_type": edit_type,
            "retain_object": bool(retain),
            "source_prompt_text": src_text,
            "target_prompt_text": tgt_text,
            "mask_strategy": p.mask_strategy,
            "uses_attention_mask": bool(uses_attention),
            "mask_token_positions": [int(i) for i in positions],
            "mask_token_rule": token_rule,
            "plain_layers": ({str(k): list(v) for k, v in pa.plain_layers_by_step.items()} if pa is not None else {}),
        }
        return {"edit": out["edit"], "m_t": state["m_t"], "inversion": inv, "info": info,
                "embeddings": (null, src, tgt), "schedule": sched,
                "token_maps": store.steps if store is not None else None}

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        from PIL import Image

        from ..diffusion.inversion import decode_latents, encode_image

        start = self.begin_edit(sample, seed)
        pipe = start.loaded.pipeline
        edit_type, type_rule = self.edit_type_for(sample)
        retain = self.retain_for(sample, edit_type)
        m_src, m_rule = self.source_mask(sample)
        h, w = start.size
        lh, lw = h // 8, w // 8
        # M_s on the latent grid: area-averaged then binarised at 0.5 (a pixel mask -> latent cells)
        m_lat = np.asarray(Image.fromarray(m_src.astype(np.uint8) * 255).resize((lw, lh), Image.BOX),
                           dtype=np.float32) / 255.0
        m_lat = (m_lat >= 0.5).astype(np.float32)
        latents0 = encode_image(pipe, np.asarray(start.image))
        timings: dict[str, float] = {}
        prep0 = time.perf_counter() - start.t0
        out = self.run(pipe, latents0, m_lat, sample, edit_type, retain, timings)
        u8 = decode_latents(pipe, out["edit"])
        image = from_pipeline_output(u8.astype(np.float32) / 255.0, start.source_hw)
        sh, sw = start.source_hw
        m_t = np.asarray(Image.fromarray((out["m_t"] >= 0.5).astype(np.uint8) * 255).resize((sw, sh), Image.NEAREST)) > 0
        info = self.edit_info(
            start, seed, prep0 + timings["inversion"],  # inversion = preparation (the runner's prep_seconds)
            edit_type_rule=type_rule, source_mask_from=m_rule,
            source_mask_area=float(m_lat.mean()), target_mask_area=float((out["m_t"] >= 0.5).mean()),
            inversion=self.params.inversion, stage_seconds=dict(timings), **out["info"],
        )
        return MethodOutput(image=image, mask=m_t, info=info)


def self_layer_count(unet: Any) -> int:
    """Self-attention layers in one UNet forward (SD 1.5: 16; the tiny UNet fewer): the ``attn1``
    modules, which diffusers' transformer blocks use for self-attention."""
    return sum(1 for name in unet.attn_processors if name.endswith("attn1.processor"))
