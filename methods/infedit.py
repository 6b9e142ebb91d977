"""InfEdit: inversion-free image editing (Xu, Huang, Gong et al., "Inversion-Free Image Editing
with Natural Language", CVPR 2024; official code ``sled-group/InfEdit``: ``pipeline_ead.py`` holds
the sampler, ``app_infedit.py`` the attention control and the demo's defaults, ``seq_aligner.py``
the token alignment). A baseline of PartEdit's Table 1 (real images).

The edit, as the official code runs it (our own code on the shared diffusion layer):

1. **Denoising Diffusion Consistent Model (DDCM) virtual inversion.** No inversion is run. Three
   branches start from the same Gaussian noise ``z`` (``denoise=true``: from the source latent
   noised to the first timestep, the demo's "Denoising Mode"): the source ``x_s`` (source
   prompt), the target ``x_t`` (target prompt) and the mutual ``x_m`` (source prompt, self-attention
   mixed with the target's; see 2). Every step runs the three branches in one batched UNet call
   (six rows with classifier-free guidance) on an LCM scheduler's timesteps and moves them with
   :func:`ddcm_step` (``pipeline_ead.ddcm_sampler``): with ``e_c = (x_s - sqrt(a_t) x_0) /
   sqrt(1 - a_t)`` the noise that makes the source branch predict ``x_0`` exactly, the target's
   prediction is ``x_0 + ((x_t - x_s) - sqrt(1 - a_t) (e_t - e_s)) / sqrt(a_t)`` and both move to
   the next timestep with the calibrated noise ``(e_t - e_s) + e_c`` plus fresh noise (eta = 1:
   all fresh, LCM's multistep sampling). The source branch always predicts ``x_0`` itself, so
   when target and source see the same prompt (and guidance) the target predicts ``x_0`` exactly:
   the only reconstruction error is the VAE's. The edit is the decoded *prediction* ``x_0^t`` of
   the last step (the pipeline decodes ``pred_x0``), not the latents.
2. **Unified attention control** (``AttentionControlEdit`` in ``app_infedit.py``), every layer:
   - self-attention, both guidance halves: while ``(step + 1) / N < self_replace_steps`` the
     target row attends with the *source's* queries and keys (its own values) and the mutual row
     is the source's self-attention; afterwards the target is left alone and the mutual row
     attends with the *target's* queries to the source's keys and values (mutual self-attention);
   - cross-attention, conditional half: the P2P refinement map of the source row (aligned
     tokens take the source's maps, new tokens keep the target's) replaces the target row while
     ``(step + 1) / N <= cross_replace_steps``; the refined source and mutual maps are summed
     over steps for the blend;
   - local blend after every step but the first: ``mask_e`` (the target blend words' map from the
     refined mutual maps, threshold ``max(temperature / sqrt(a_t), local_threshold)``) keeps the
     target inside and takes the mutual branch outside; ``mask_m`` (the mutual blend words on the
     refined source maps, ``mutual_threshold``) puts the source back; at the next-to-last step
     words in both blends take the mutual branch. A mask is the blend words' maxima over tokens
     of the head- and layer-mean maps at a quarter of the latent grid (SD: the 16 x 16 down and
     up cross layers, ``down_cross[2:4] + up_cross[:3]``), resized (nearest) to the latent,
     divided by its maximum and thresholded.

Defaults: the official demo's (``app_infedit.py``, Gradio widgets): ``SimianLuo/LCM_Dreamshaper_v7``
with ``LCMScheduler`` (``original_inference_steps`` 50, the pipeline's default), 15 steps, target
guidance 2, source guidance 1, cross / self control schedules 0.7 / 0.3, blend thresholds 0.6 /
0.6, eta 1, 512 x 512, denoising mode off. PartEdit (supplementary) ran InfEdit "with default
parameter values provided in their demo/code", with blend words from the captions' difference;
it ran its other real-image baselines on SD 2.1, but InfEdit's default model is its LCM, kept
here (set ``model`` for another one).

Differences from the official code, each a documented choice:
- the source latent is the VAE posterior's mean (the harness's convention; the official samples
  it with the generator), so an edit is a function of its seed only through the noise;
- the UNet is called without LCM's guidance embedding (``timestep_cond``), as the official
  pipeline does (it runs real classifier-free guidance instead).

torch and diffusers are imported lazily.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, ClassVar, Literal, Sequence

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SkipSample

from ._diffusion_common import (TINY_STEPS, DiffusionMethod, InvertAndEditMethod, _check_number, auto_field,
                                check_unit, empty_text_reason, text_embeddings)
from .diffusion.attention import AttentionContext, AttentionController, AttentionStore, BatchLayout
from .prompt_to_prompt import differing_words, norm_word, split_words

BRANCHES = ("source", "target", "mutual")  # batch branch indices 0, 1, 2
# LocalBlend.__call__'s default temperature: the target blend threshold is at least
# temperature / sqrt(alpha_bar_t) (looser early, when the maps are noisy).
TEMPERATURE = 0.15


# --------------------------------------------------------------------------------------------
# Token alignment (seq_aligner.get_mapper)
# --------------------------------------------------------------------------------------------
def align_source_positions(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """For every position of the target ids ``y``, the aligned position in the source ids ``x``
    or -1: ``seq_aligner.global_align`` (Needleman-Wunsch, match 1, mismatch -1, gap 0) with its
    tie order (a gap in ``x`` first, then a gap in ``y``, then the diagonal), which decides which
    copy of a repeated token is aligned. Written by hand: the tie order is the official code's,
    and the project's P2P aligner (``prompt_to_prompt.align_tokens``) prefers matches."""
    n, k = len(x), len(y)
    d = np.zeros((n + 1, k + 1), dtype=np.int64)
    trace = np.zeros((n + 1, k + 1), dtype=np.int8)
    trace[0, 1:] = 1
    trace[1:, 0] = 2
    for i in range(1, n + 1):
        for j in range(1, k + 1):
            left = d[i, j - 1]
            up = d[i - 1, j]
            diag = d[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            d[i, j] = max(left, up, diag)
            trace[i, j] = 1 if d[i, j] == left else (2 if d[i, j] == up else 3)
    out = [-1] * k
    i, j = n, k
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif trace[i, j] == 1:
            j -= 1
        else:
            i -= 1
    return out


@dataclasses.dataclass
class TokenMaps:
    """The refinement mapping and blend-word weights of one (source, target) pair, length K."""

    mapper: np.ndarray  # int64 (K,): source position of every target position (-1: none)
    alphas: np.ndarray  # float (K,): 1 where the target token takes the source's map
    alpha_e: np.ndarray  # float (K,): target blend ("local") tokens, in target positions
    alpha_m: np.ndarray  # float (K,): mutual blend tokens, in target positions
    target_len: int  # target ids with start and end tokens (LocalBlend's ``len``)


def token_maps(x: Sequence[int], y: Sequence[int], local: Sequence[int], mutual: Sequence[int],
               x_emb: Any, y_emb: Any, max_len: int) -> TokenMaps:
    """``seq_aligner.get_mapper`` for source ids ``x``, target ids ``y``, local / mutual blend
    ids (all with start and end tokens) and the text encoder's outputs of the padded source and
    target (``(K, D)``).

    Aligned target tokens map to their source token; in each run of unaligned target tokens the
    one pair (target position, source position in the gap) with the highest cosine similarity is
    mapped too (so a swapped word takes the replaced word's map); the official code compares the
    *source* embedding at the target position with the *target* embedding at the source position,
    kept as is. Padding maps to itself. A local blend token mapped to by that pair also marks the
    target position. Raises ValueError naming a blend word that the target does not contain.
    """
    import torch
    import torch.nn.functional as F

    x, y = list(x), list(y)
    aligned = align_source_positions(x, y)
    alphas = np.ones(max_len, dtype=np.float32)
    mapper = np.zeros(max_len, dtype=np.int64)
    alphas[: len(y)] = [0.0 if a < 0 else 1.0 for a in aligned]
    mapper[: len(y)] = aligned
    mapper[len(y):] = len(y) + np.arange(max_len - len(y))
    alpha_e = np.zeros(max_len, dtype=np.float32)
    alpha_m = np.zeros(max_len, dtype=np.float32)
    local_set = set(local)

    i = 0
    while i < len(y):
        if alphas[i] == 0:
            start = i
            while alphas[i] == 0:
                i += 1
            best: tuple[float, int, int] | None = None
            for i_t in range(start, i):
                for i_s in range(int(mapper[start - 1]) + 1, int(mapper[i])):
                    sim = float(F.cosine_similarity(torch.as_tensor(x_emb[i_t]), torch.as_tensor(y_emb[i_s]), dim=0))
                    if best is None or sim > best[0]:
                        best = (sim, i_s, i_t)
            if best is not None:
                _, i_s, i_t = best
                mapper[i_t] = i_s
                alphas[i_t] = 1.0
                if x[i_s] in local_set:
                    alpha_e[i_t] = 1.0
        i += 1

    # the local blend tokens, found in order in the target
    i, j = 1, 1
    while i < len(y) - 1 and j < len(local) - 1:
        while local[j] != y[i]:
            i += 1
            if i >= len(y) - 1:
                raise ValueError("the target blend words are not in the target caption (in this order)")
        alpha_e[i] = 1.0
        j += 1
    # the mutual blend tokens: in the target, aligned with the same token of the source
    i, j = 1, 1
    while i < len(y) - 1 and j < len(mutual) - 1:
        while mutual[j] != y[i]:
            i += 1
            if i >= len(y) - 1:
                raise ValueError("the mutual blend words are not in the target caption (in this order)")
        if mutual[j] != x[int(mapper[i])]:
            raise ValueError("the mutual blend words are not shared by the source and target captions")
        alpha_m[i] = 1.0
        j += 1
    return TokenMaps(mapper, alphas, alpha_e, alpha_m, len(y))


# --------------------------------------------------------------------------------------------
# The DDCM step (pipeline_ead.ddcm_sampler)
# --------------------------------------------------------------------------------------------
def ddcm_step(alpha_t: float, alpha_prev: float, x_s: Any, x_t: Any, e_s: Any, e_t: Any, x_0: Any,
              noise: Any, eta: float = 1.0, multistep: bool = True) -> tuple[Any, Any, Any]:
    """One DDCM step: ``(prev_x_s, prev_x_t, pred_x0_t)``.

    ``alpha_t`` / ``alpha_prev`` are the cumulative alphas of this and the next timestep,
    ``e_s`` / ``e_t`` the (guided) noise predictions of the source and this branch. ``eta`` scales
    the fresh-noise variance ``eta * (1 - alpha_prev)`` (1 = LCM's multistep sampling: no
    deterministic direction). ``multistep=False`` (a one-step schedule) returns the predictions.
    """
    beta_t, beta_prev = 1.0 - alpha_t, 1.0 - alpha_prev
    var = eta * beta_prev
    e_c = (x_s - alpha_t ** 0.5 * x_0) / beta_t ** 0.5
    pred_x0 = x_0 + ((x_t - x_s) - beta_t ** 0.5 * (e_t - e_s)) / alpha_t ** 0.5
    eps = (e_t - e_s) + e_c
    direction = (beta_prev - var) ** 0.5 * eps
    if not multistep:
        return x_0, pred_x0, pred_x0
    fresh = var ** 0.5 * noise
    prev_xt = alpha_prev ** 0.5 * pred_x0 + direction + fresh
    prev_xs = alpha_prev ** 0.5 * x_0 + direction + fresh
    return prev_xs, prev_xt, pred_x0


# --------------------------------------------------------------------------------------------
# Unified attention control (app_infedit.AttentionRefine / AttentionControlEdit)
# --------------------------------------------------------------------------------------------
class UnifiedAttentionController(AttentionController):
    """InfEdit's attention control on a ``[source, target, mutual]`` batch (see the module
    docstring). ``start_steps`` offsets the step count (denoising mode starts later); the
    refined source and mutual cross maps of the conditional half go to ``store`` (two rows:
    refined source, refined mutual) for :func:`blend_latents`."""

    def __init__(self, mapper: Any, alphas: Any, num_steps: int, start_steps: int,
                 cross_replace_steps: float, self_replace_steps: float, store: AttentionStore,
                 layout: BatchLayout, **kw: Any) -> None:
        super().__init__(layout=layout, **kw)
        self.mapper = mapper
        self.alphas = alphas
        self.num_steps = num_steps
        self.start_steps = start_steps
        self.cross_replace_steps = cross_replace_steps
        self.self_replace_steps = self_replace_steps
        self.store = store

    def progress(self, step: int) -> float:
        """The official ``(cur_step + start_steps + 1) / num_steps`` of a step."""
        return (step + self.start_steps + 1) / self.num_steps

    def self_control(self, step: int) -> bool:
        """Whether the target takes the source's self-attention map at ``step``."""
        return self.progress(step) < self.self_replace_steps

    def cross_control(self, step: int) -> bool:
        """Whether the target's cross-attention is the refined source's at ``step``."""
        return self.progress(step) <= self.cross_replace_steps

    def branch_rows(self, layout: BatchLayout, halves: Sequence[str]) -> list[tuple[int, int, int]]:
        """``(source, target, mutual)`` rows of each guidance half in ``halves``."""
        out = []
        for g in halves:
            rows = {layout.branches[r]: r for r in layout.rows(g)}
            if sorted(rows) == [0, 1, 2]:
                out.append((rows[0], rows[1], rows[2]))
        return out

    def on_qkv(self, ctx: AttentionContext):
        if ctx.kind != "self":
            return None
        q0, k0, v0 = ctx.query, ctx.key, ctx.value
        assert q0 is not None and k0 is not None and v0 is not None
        q, k, v = q0.clone(), k0.clone(), v0.clone()
        inside = self.self_control(ctx.step)
        hr = ctx.head_rows
        for s, t, m in self.branch_rows(ctx.layout, sorted(set(ctx.layout.guidance))):
            if inside:
                q[hr(t)], k[hr(t)] = q0[hr(s)], k0[hr(s)]
                q[hr(m)], k[hr(m)], v[hr(m)] = q0[hr(s)], k0[hr(s)], v0[hr(s)]
            else:
                q[hr(m)], k[hr(m)], v[hr(m)] = q0[hr(t)], k0[hr(s)], v0[hr(s)]
        return q, k, v

    def needs_probs(self, ctx: AttentionContext) -> bool:
        return ctx.kind == "cross"

    def refine(self, maps: "Any", edit: "Any") -> "Any":
        """``maps[..., mapper] * alphas + edit * (1 - alphas)`` (``AttentionRefine``)."""
        import torch

        idx = torch.as_tensor(self.mapper, device=maps.device).long()
        a = torch.as_tensor(self.alphas).to(maps).reshape(1, 1, -1)
        return maps[..., idx] * a + edit * (1 - a)

    def on_probs(self, ctx: AttentionContext):
        if ctx.kind != "cross":
            return None
        import torch

        p = ctx.probs
        assert p is not None
        halves = ("cond",) if "cond" in ctx.layout.guidance else ("none",)
        new = p.clone()
        hr = ctx.head_rows
        for s, t, m in self.branch_rows(ctx.layout, halves):
            base = self.refine(p[hr(s)], p[hr(t)])
            mutual = self.refine(p[hr(m)], p[hr(t)])
            if self.cross_control(ctx.step):
                new[hr(t)] = base
            if self.store.wants(ctx.place, "cross", ctx.n_query):
                self.store.add(ctx.name, ctx.place, "cross", ctx.heads, torch.cat([base, mutual]))
        return new

    def on_step_end(self) -> None:
        self.store.end_step()

    def reset(self) -> None:
        super().reset()
        self.store.reset()


def blend_grid(store: AttentionStore, latent_hw: tuple[int, int],
               places: Sequence[str] = ("down", "up")) -> tuple[int, int]:
    """The token grid the blend reads: a quarter of the latent (SD at 64 x 64: the 16 x 16 down
    and up cross layers, the official ``down_cross[2:4] + up_cross[:3]``), else the largest stored
    grid below it, else the coarsest stored one (small backbones)."""
    h, w = latent_hw
    target = max(1, (h // 4) * (w // 4))
    sizes = sorted({int(m.shape[1]) for n, m in store.sums.items() if store.meta[n][0] in places})
    if not sizes:
        raise ValueError(f"InfEdit blend: no cross-attention maps stored in {tuple(places)}")
    below = [n for n in sizes if n <= target]
    n = max(below) if below else min(sizes)
    gh = max(1, round((n * h / w) ** 0.5))
    return gh, n // gh


def blend_maps(store: AttentionStore, latent_hw: tuple[int, int]) -> "Any":
    """``(2, L * heads, gh, gw, K)``: the summed refined source (0) and mutual (1) cross maps of
    the down and up layers at :func:`blend_grid`."""
    import torch

    gh, gw = blend_grid(store, latent_hw)
    picked = []
    for name, m in store.sums.items():
        place, _, heads = store.meta[name]
        if place in ("down", "up") and m.shape[1] == gh * gw:
            picked.append(m.reshape(2, heads, gh, gw, m.shape[-1]))
    return torch.cat(picked, dim=1)


def word_mask(maps: "Any", weights: "Any", threshold: float, target_len: int, latent_hw: tuple[int, int]) -> "Any":
    """``LocalBlend.get_mask``: ``maps`` ``(L * heads, gh, gw, K)`` weighted by the word weights,
    tokens ``1 .. target_len - 2``, mean over heads and layers, max over tokens, nearest-resized to
    the latent, divided by its maximum, ``> threshold`` -> bool ``(1, 1, H, W)``. No word (all-zero
    maps) gives an all-false mask (the official 0 / 0 compares false)."""
    import torch
    import torch.nn.functional as F

    w = torch.as_tensor(weights).to(maps).reshape(1, 1, 1, -1)
    m = (maps * w)[..., 1: target_len - 1].mean(0).amax(-1)  # (gh, gw)
    m = F.interpolate(m[None, None], size=tuple(latent_hw))
    peak = m.amax()
    if float(peak) <= 0.0:
        return torch.zeros_like(m, dtype=torch.bool)
    return (m / peak) > threshold


def blend_latents(maps: "Any", x_s: "Any", x_t: "Any", x_m: "Any", tm: TokenMaps, alpha_t: float,
                  local_threshold: float, mutual_threshold: float, use_xm: bool,
                  temperature: float = TEMPERATURE) -> tuple["Any", dict[str, "Any"]]:
    """``LocalBlend.__call__``: the blended target latents and the three masks."""
    import torch

    hw = tuple(x_t.shape[-2:])
    a_e = torch.as_tensor(tm.alpha_e).to(maps)
    a_m = torch.as_tensor(tm.alpha_m).to(maps)
    a_me = ((a_e > 0) & (a_m > 0)).to(maps)
    thresh_e = max(temperature / alpha_t ** 0.5, local_threshold)
    mask_e = word_mask(maps[1], a_e, thresh_e, tm.target_len, hw)
    mask_m = word_mask(maps[0], a_m - a_me, mutual_threshold, tm.target_len, hw)
    mask_me = word_mask(maps[1], a_me, local_threshold, tm.target_len, hw)
    out = x_t if float(a_e.sum()) == 0 else torch.where(mask_e, x_t, x_m)
    out = torch.where(mask_m, x_s, out)
    if use_xm:
        out = torch.where(mask_me, x_m, out)
    return out, {"target": mask_e, "mutual": mask_m, "both": mask_me}


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------
@METHODS.register("infedit")
class InfEdit(InvertAndEditMethod):
    """DDCM virtual inversion with unified attention control, on an LCM."""

    version = "1"
    requires = ("source", "source_caption", "target_caption")
    text_fields: ClassVar[tuple[str, ...]] = ("source_caption", "target_caption")

    def __init__(self, params: "InfEdit.Params | None" = None):
        super().__init__(params)
        self._mask: Any = None  # the last target-blend mask of the edit in progress

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "SimianLuo/LCM_Dreamshaper_v7"  # app_infedit.py model_id_or_path
        num_inference_steps: int | Literal["auto"] = auto_field(15, TINY_STEPS)  # demo "Inference steps"
        original_inference_steps: int = 50  # EditPipeline.__call__ default, passed to LCMScheduler
        guidance_scale: float = 2.0  # demo "Target guidance scale"
        source_guidance_scale: float = 1.0  # demo "Source guidance scale"
        cross_replace_steps: float = 0.7  # demo "Cross attn control schedule"
        self_replace_steps: float = 0.3  # demo "Self attn control schedule"
        local_threshold: float = 0.6  # demo "Target blend thresh" (thresh_e)
        mutual_threshold: float = 0.6  # demo "Source blend thresh" (thresh_m)
        temperature: float = TEMPERATURE  # LocalBlend.__call__ default
        eta: float = 1.0  # demo: pipe(..., eta=1)
        denoise: bool = False  # demo "Denoising Mode" (off)
        strength: float = 0.7  # demo "Strength" (denoising mode only)
        # Target blend words ("local"): None = the target caption's words that the source lacks
        # (PartEdit's blend words from the captions' difference); "" = no target blend.
        local_blend: str | None = None
        mutual_blend: str = ""  # demo "Source blend" ("mutual"), a phrase of both captions
        negative_prompt: str = ""  # demo "Negative prompt" (the target's unconditional text)
        positive_prompt: str = ""  # demo "Positive prompt" (the source's unconditional text)

        def __post_init__(self) -> None:
            super().__post_init__()
            owner = "infedit"
            _check_number(owner, "original_inference_steps", self.original_inference_steps, 1, integer=True)
            if self.num_inference_steps > self.original_inference_steps:
                raise ValueError(f"{owner}: 'num_inference_steps' ({self.num_inference_steps}) must not exceed "
                                 f"'original_inference_steps' ({self.original_inference_steps}): LCMScheduler "
                                 "picks the steps among those")
            _check_number(owner, "source_guidance_scale", self.source_guidance_scale, 0.0)
            for name in ("cross_replace_steps", "self_replace_steps", "local_threshold", "mutual_threshold", "eta"):
                check_unit(owner, name, getattr(self, name))
            _check_number(owner, "temperature", self.temperature, 0.0)
            check_unit(owner, "strength", self.strength, low_open=True)
            for name in ("local_blend", "mutual_blend", "negative_prompt", "positive_prompt"):
                value = getattr(self, name)
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{owner}: '{name}' must be a string, got {value!r}")

    # -- words ---------------------------------------------------------------------------
    def source_prompt_for(self, sample: Sample) -> str:
        return str(sample.source_caption).strip()

    def blend_words(self, source: str, target: str) -> tuple[str, str]:
        """(target blend, mutual blend) phrases for this pair of captions."""
        p = self.params
        local = " ".join(differing_words(source, target)[1]) if p.local_blend is None else p.local_blend.strip()
        return local, p.mutual_blend.strip()

    def check(self, sample: Sample) -> str | None:
        reason = empty_text_reason(self.name, sample, self.text_fields)
        if reason:
            return reason
        source, target = str(sample.source_caption).strip(), str(sample.target_caption).strip()
        local, mutual = self.blend_words(source, target)
        tw, sw = {norm_word(w) for w in split_words(target)}, {norm_word(w) for w in split_words(source)}
        lost = [w for w in split_words(local) if norm_word(w) not in tw]
        if lost:
            return (f"method '{self.name}': target blend words {lost} (local_blend) are not in sample "
                    f"'{sample.id}''s target_caption {target!r}")
        lost = [w for w in split_words(mutual) if norm_word(w) not in tw or norm_word(w) not in sw]
        if lost:
            return (f"method '{self.name}': mutual blend words {lost} (mutual_blend) are not in both of sample "
                    f"'{sample.id}''s source_caption and target_caption")
        return None

    # -- the edit --------------------------------------------------------------------------
    def scheduler(self, pipe: Any) -> Any:
        """A fresh ``LCMScheduler`` from the checkpoint's scheduler config (the official demo's
        ``LCMScheduler.from_config``; the tiny backbone's is SD 1.5's), timesteps set. Fresh per
        edit: the loaded pipeline is shared and a scheduler keeps a step index."""
        from diffusers import LCMScheduler

        kind = pipe.scheduler.config.get("prediction_type", "epsilon")
        if kind != "epsilon":
            # the DDCM step (and LCM_Dreamshaper) work with noise predictions; a v-prediction model
            # (e.g. stabilityai/stable-diffusion-2-1 at 768) would be misread silently
            raise SkipSample(f"method '{self.name}': the DDCM step needs a noise-predicting (epsilon) model; "
                             f"model '{self.params.model}' predicts {kind!r} (use e.g. "
                             "stabilityai/stable-diffusion-2-1-base or the default LCM)")
        sched = LCMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(int(self.params.num_inference_steps), device=pipe.unet.device,
                            original_inference_steps=int(self.params.original_inference_steps))
        return sched

    def token_maps(self, pipe: Any, source: str, target: str, src_emb: Any, tgt_emb: Any) -> TokenMaps:
        tok = pipe.tokenizer
        k = int(tok.model_max_length)

        def ids(text: str) -> list[int]:
            return list(tok(text, truncation=True, max_length=k).input_ids)

        local, mutual = self.blend_words(source, target)
        try:
            return token_maps(ids(source), ids(target), ids(local), ids(mutual), src_emb[0], tgt_emb[0], k)
        except ValueError as e:
            raise SkipSample(f"method '{self.name}': {e} (local_blend {local!r}, mutual_blend {mutual!r})") from e

    def run_edit(self, pipe: Any, latents0: Any, source_prompt: str, target_prompt: str,
                 generator: Any = None) -> dict[str, Any]:
        """Edit the source latents ``latents0`` (``[1, C, h, w]``). Returns ``edit`` (the last
        step's target prediction, what is decoded), ``source`` / ``target`` / ``mutual`` (the
        branches' last latents), ``masks`` (the last blend's), ``controller`` and ``info``."""
        import torch

        from .diffusion.attention import attention_control

        p = self.params
        unet = pipe.unet
        sched = self.scheduler(pipe)
        n = int(p.num_inference_steps)
        start = n - math.trunc(n * float(p.strength)) if p.denoise else 0
        timesteps = sched.timesteps[start:]
        guided = float(p.guidance_scale) > 1.0  # the pipeline's do_classifier_free_guidance
        tgt, neg, src, pos = text_embeddings(
            pipe, [target_prompt, p.negative_prompt, source_prompt, p.positive_prompt], latents0).chunk(4)
        tm = self.token_maps(pipe, source_prompt, target_prompt, src, tgt)
        if guided:
            layout = BatchLayout.cfg(3)  # [uncond s, t, m, cond s, t, m] (the pipeline's stacking)
            text = torch.cat([pos, neg, pos, src, tgt, src])
        else:
            layout = BatchLayout.plain(3)
            text = torch.cat([src, tgt, src])
        store = AttentionStore(kinds=("cross",), places=("down", "up"))  # P2P's <= 32 x 32 layers
        ctrl = UnifiedAttentionController(tm.mapper, tm.alphas, n, start, float(p.cross_replace_steps),
                                          float(p.self_replace_steps), store, layout)
        noise0 = torch.randn(latents0.shape, generator=generator, device=latents0.device, dtype=latents0.dtype)
        x_0 = latents0
        x = sched.add_noise(x_0, noise0, timesteps[:1]) if p.denoise else noise0
        x_s = x_t = x_m = x
        acp = sched.alphas_cumprod
        all_t = [int(t) for t in sched.timesteps]
        pred = x_0
        masks: dict[str, Any] = {}
        gs, gt = float(p.source_guidance_scale), float(p.guidance_scale)
        with torch.no_grad(), attention_control(unet, ctrl):
            for i, t in enumerate(timesteps):
                lat = torch.cat([x_s, x_t, x_m])
                model_in = sched.scale_model_input(torch.cat([lat, lat]) if guided else lat, t)
                eps = unet(model_in, t, encoder_hidden_states=text).sample
                if guided:
                    u, c = eps.chunk(2)
                    e_s = u[0:1] + gs * (c[0:1] - u[0:1])
                    e_t = u[1:2] + gt * (c[1:2] - u[1:2])
                    e_m = u[2:3] + gs * (c[2:3] - u[2:3])
                else:
                    e_s, e_t, e_m = eps.chunk(3)
                noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
                k = all_t.index(int(t))
                # the official uses this timestep again after the last one (its prediction is the output)
                t_prev = all_t[k + 1] if k + 1 < len(all_t) else int(t)
                a_t, a_prev = float(acp[int(t)]), float(acp[t_prev])
                multi = len(all_t) > 1
                _, new_t, pred = ddcm_step(a_t, a_prev, x_s, x_t, e_s, e_t, x_0, noise, float(p.eta), multi)
                x_s, x_m, _ = ddcm_step(a_t, a_prev, x_s, x_m, e_s, e_m, x_0, noise, float(p.eta), multi)
                x_t = new_t
                if i > 0:  # AttentionControlEdit.step_callback: no blend after the first step
                    use_xm = i + start + 2 == n
                    x_t, masks = blend_latents(blend_maps(store, tuple(x_t.shape[-2:])), x_s, x_t, x_m, tm, a_t,
                                               float(p.local_threshold), float(p.mutual_threshold), use_xm,
                                               float(p.temperature))
        local, mutual = self.blend_words(source_prompt, target_prompt)
        info = {
            "local_blend_words": local,
            "mutual_blend_words": mutual,
            "timesteps": [int(t) for t in timesteps],
            "self_control_steps": [i for i in range(len(timesteps)) if ctrl.self_control(i)],
            "cross_control_steps": [i for i in range(len(timesteps)) if ctrl.cross_control(i)],
        }
        return {"edit": pred, "source": x_s, "target": x_t, "mutual": x_m, "masks": masks, "controller": ctrl,
                "token_maps": tm, "info": info}

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        from .diffusion.inversion import decode_latents, encode_image

        assert self._sample is not None
        latents0 = encode_image(pipe, np.asarray(image))
        source_prompt = self.source_prompt_for(self._sample)
        out = self.run_edit(pipe, latents0, source_prompt, prompt, generator)
        self._extra = {"source_prompt_text": source_prompt, **out["info"]}
        self._mask = out["masks"].get("target") if out["info"]["local_blend_words"] else None
        u8 = decode_latents(pipe, out["edit"])
        # from_pipeline_output maps [0, 1] floats back to uint8 with rint: exact for k / 255.
        return types.SimpleNamespace(images=u8.astype(np.float32) / 255.0)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        self._mask = None
        out = super().edit(sample, seed)
        if self._mask is not None:
            # the last target-blend mask (latent grid), nearest-resized to the source: the region
            # the target branch kept
            from PIL import Image

            m = self._mask[0, 0].cpu().numpy().astype(np.uint8) * 255
            h, w = np.asarray(sample.source).shape[:2]
            out.mask = np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) > 127
        self._mask = None
        return out

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {
            "scheduler": "LCMScheduler",
            "original_inference_steps": int(p.original_inference_steps),
            "source_guidance_scale": float(p.source_guidance_scale),
            "cross_replace_steps": float(p.cross_replace_steps),
            "self_replace_steps": float(p.self_replace_steps),
            "local_threshold": float(p.local_threshold),
            "mutual_threshold": float(p.mutual_threshold),
            "eta": float(p.eta),
            "denoise": bool(p.denoise),
        }
