"""``self_guidance``: Diffusion Self-Guidance (Epstein, Jabri, Poole, Efros, Holynski, "Diffusion
Self-Guidance for Controllable Image Generation", NeurIPS 2023), a baseline of DiffEditor's
Table 2 (object moving and appearance replacing; issue 16), on Stable Diffusion 1.5 and the shared
plumbing of ``methods/diffusion``. There is no official code (the paper ran on Imagen); no diffusers
pipeline or community pipeline implements it. Written from the paper; every choice it leaves open
is a parameter, listed below.

The paper's guidance (Eq. 3): ``eps~ = (1 + s) eps(z_t; t, y) - s eps(z_t; t) + v sigma_t
grad_{z_t} g(z_t; t, y)`` -- classifier-free guidance (here ``guidance_scale = 1 + s``) plus the
gradient of an energy ``g`` built from properties of the denoiser's cross-attention maps ``A``
(``H x W`` per token) and activations ``psi`` (Sec. 3.2):

- centroid(k) = ``sum_{h,w} (w, h) A_k / sum A_k`` (coordinates of pixel centres in [0, 1]);
- size(k) = ``mean_{h,w} A_k``;
- shape(k) = ``A_k``;
- appearance(k) = ``sum threshold(A_k) psi / sum threshold(A_k)`` (the activations averaged under
  the soft-thresholded attention: ``sigmoid(sharpness (normalise(A) - 0.5))``).

Real images (Sec. 4, "editing real images"): the properties of the *source* image come from the
denoiser run on the source noised to the same timestep with the same caption; every property
not edited is pulled towards the source's. Edits (L1 distances, each term weighted):

- ``move``: centroid of the object token -> source centroid + offset; its shape -> the source's
  shape translated by the offset; its size and appearance kept;
- ``appearance``: appearance of the object token -> the *reference* image's (its properties
  from the reference noised the same way); its shape and centroid kept (the layout stays);
- ``size``: size -> ``scale x`` the source's; centroid and appearance kept.

Inputs from the sample: the conditioning text is ``source_caption``; the object word is
``meta["object_prompt"]`` (the harness's object field), else the ``object_word`` parameter; its
tokens are found in the caption (a sample whose caption does not contain it is skipped). The move
offset is the mean of ``target_points - source_points`` (pixels), else ``meta["offset"]`` ``[dx,
dy]`` (pixels), else ``meta["mask_offset"]``; the appearance reference is ``reference`` (with
``reference_mask``, see ``reference_region``); the size factor is ``meta["scale"]``, else
``size_scale``. ``task: auto`` picks ``appearance`` when the sample has a reference image,
``move`` when it has an offset, ``size`` when it has a scale.

Not specified by the paper (ours, each a parameter):

- ``model`` SD 1.5 (the paper: Imagen; DiffEditor does not say what it ran Self-Guidance on);
- ``init``: ``noise`` (generate from ``N(0, I)`` drawn with the edit's seed, pulled to the source
  by the energies: the paper's real-image setting as we read it) | ``inversion`` (start from the
  DDIM inversion of the source with the caption);
- ``guidance_weight`` ``v`` and the term weights ``w_centroid``, ``w_shape``, ``w_size``,
  ``w_appearance``, ``w_layout`` (the layout term: the maps of every other word of the caption
  kept to the source's, in every task); ``guidance_start`` / ``guidance_end`` (fraction of the steps guided);
- the attention maps: cross-attention layers of ``attention_places``, head-averaged, resized
  (bilinear) to ``attention_grid`` x the latent grid and averaged over layers; the activations
  ``psi``: the output of ``up_blocks[appearance_block]``, resized likewise;
  ``threshold_sharpness`` of the soft threshold;
- ``reference_region``: ``attention`` (the reference's own attention for the token, as the paper)
  | ``mask`` (the reference's ``reference_mask`` as its shape when given);
- the noise used to noise the source / reference at each step: one fixed draw (seeded) for the
  whole edit.

Network counts per edit: ``unet``: per step 1 conditional call (with gradient when guided) + 1
unconditional call (``guidance_scale != 1``) + 1 call on the noised source and, for appearance,
1 on the noised reference, while guided; plus ``n`` inversion calls with ``init: inversion``.
"""
from __future__ import annotations

import dataclasses
import time
import types
from typing import Any, ClassVar, Literal, Sequence

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SkipSample

from ._diffusion_common import (TINY_STEPS, DiffusionMethod, _check_number, auto_field, check_choice, check_unit,
                                to_pil)
from .diffusion.attention import AttentionContext, AttentionController

TASKS = ("auto", "move", "appearance", "size")
INITS = ("noise", "inversion")
REFERENCE_REGIONS = ("attention", "mask")
PLACES = ("down", "mid", "up")


# -- properties (Sec. 3.2) ---------------------------------------------------------------------------
def normalise(a: "Any") -> "Any":
    """Per-map min-max normalisation of ``[B, H, W]`` maps to [0, 1]."""
    lo = a.flatten(1).min(1).values[:, None, None]
    hi = a.flatten(1).max(1).values[:, None, None]
    return (a - lo) / (hi - lo).clamp_min(1e-8)


def soft_threshold(a: "Any", sharpness: float) -> "Any":
    import torch

    return torch.sigmoid(sharpness * (normalise(a) - 0.5))


def centroid(a: "Any") -> "Any":
    """``[B, H, W]`` maps -> ``[B, 2]`` (x, y) centroids, pixel centres at ``(j + 0.5) / W``."""
    import torch

    b, h, w = a.shape
    ys = (torch.arange(h, dtype=a.dtype, device=a.device) + 0.5) / h
    xs = (torch.arange(w, dtype=a.dtype, device=a.device) + 0.5) / w
    total = a.sum((1, 2)).clamp_min(1e-12)
    cx = (a.sum(1) * xs).sum(1) / total
    cy = (a.sum(2) * ys).sum(1) / total
    return torch.stack([cx, cy], 1)


def size(a: "Any") -> "Any":
    return a.mean((1, 2))


def appearance(a: "Any", feat: "Any", sharpness: float) -> "Any":
    """``[B, C]``: activations ``feat [B, C, H, W]`` averaged under the soft-thresholded map."""
    thr = soft_threshold(a, sharpness)
    return (feat * thr[:, None]).sum((2, 3)) / thr.sum((1, 2))[:, None].clamp_min(1e-12)


def translate(a: "Any", offset_xy: Sequence[float]) -> "Any":
    """Maps ``[B, H, W]`` moved by ``offset_xy`` (fractions of the width / height), bilinear, zeros
    shifted in."""
    import torch
    import torch.nn.functional as F

    b = a.shape[0]
    theta = torch.tensor([[1.0, 0.0, -2.0 * float(offset_xy[0])], [0.0, 1.0, -2.0 * float(offset_xy[1])]],
                         dtype=a.dtype, device=a.device)[None].expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, 1, *a.shape[1:]], align_corners=False)
    return F.grid_sample(a[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


# -- capture ---------------------------------------------------------------------------------------------
class TokenAttention(AttentionController):
    """Keeps (with their autograd graph) the head-averaged cross-attention probabilities of
    ``tokens`` in the layers of ``places`` while :attr:`armed`; other layers and unarmed calls
    take the fused attention path."""

    def __init__(self, tokens: Sequence[int], places: Sequence[str], aspect: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.tokens = list(tokens)
        self.places = tuple(places)
        self.aspect = float(aspect)
        self.armed = False
        self.maps: list[Any] = []

    def needs_probs(self, ctx: AttentionContext) -> bool:
        return self.armed and ctx.kind == "cross" and ctx.place in self.places

    def on_probs(self, ctx: AttentionContext) -> None:
        if not self.needs_probs(ctx):
            return None
        p = ctx.probs
        b = ctx.batch_size
        p = p.reshape(b, ctx.heads, p.shape[1], p.shape[2]).mean(1)[:, :, self.tokens]  # [B, N, T]
        h, w = ctx.token_grid(self.aspect)
        self.maps.append(p.permute(0, 2, 1).reshape(b, len(self.tokens), h, w))
        return None

    def take(self, grid: tuple[int, int]) -> Any:
        """``[B, T, H, W]``: the captured maps resized to ``grid`` and averaged over layers."""
        import torch
        import torch.nn.functional as F

        if not self.maps:
            raise RuntimeError(f"self_guidance: no cross-attention layer in places {list(self.places)} was captured")
        out = torch.stack([F.interpolate(m, grid, mode="bilinear", align_corners=False) for m in self.maps]).mean(0)
        self.maps = []
        return out


def token_indices(tokenizer: Any, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in ``prompt``'s token ids (BOS at 0); [] when absent."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    sub = tokenizer(word, add_special_tokens=False).input_ids
    if not sub:
        return []
    for i in range(1, len(ids) - len(sub) + 1):
        if ids[i:i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    return []


@dataclasses.dataclass
class Task:
    kind: str  # move | appearance | size
    word: str
    offset_xy: tuple[float, float] = (0.0, 0.0)  # fractions of width / height
    scale: float = 1.0
    reference: Any = None  # RGB uint8
    reference_mask: Any = None  # bool


@METHODS.register("self_guidance")
class SelfGuidance(DiffusionMethod):
    """Classifier-free-guided DDIM sampling plus the gradient of attention-property energies."""

    version = "1"
    requires = ("source", "source_caption")
    prompt_field: ClassVar[str] = "source_caption"
    tiny_kind: ClassVar[str] = "sd15"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # not specified (paper: Imagen)
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)
        guidance_scale: float = 7.5  # 1 + s of Eq. 3 (SD's usual scale; not specified)
        task: Literal["auto", "move", "appearance", "size"] = "auto"
        object_word: str | None = None  # used when the sample has no meta.object_prompt
        size_scale: float = 1.5  # size task when the sample has no meta.scale
        # --- not specified by the paper ---
        init: Literal["noise", "inversion"] = "noise"
        guidance_weight: float = 1000.0  # v of Eq. 3
        guidance_start: float = 0.0  # guided steps: [int(n * start), int(n * end))
        guidance_end: float = 1.0
        w_centroid: float = 1.0
        w_shape: float = 1.0
        w_size: float = 1.0
        w_appearance: float = 1.0
        w_layout: float = 1.0  # every other word's map kept to the source's
        attention_places: tuple[str, ...] = ("up",)
        attention_grid: float = 0.5  # maps resized to this fraction of the latent grid
        appearance_block: int = -2  # psi: output of up_blocks[appearance_block]
        threshold_sharpness: float = 10.0
        reference_region: Literal["attention", "mask"] = "attention"

        def __post_init__(self) -> None:
            super().__post_init__()
            o = "self_guidance"
            check_choice(o, "task", self.task, TASKS)
            check_choice(o, "init", self.init, INITS)
            check_choice(o, "reference_region", self.reference_region, REFERENCE_REGIONS)
            _check_number(o, "size_scale", self.size_scale, 0.0, inclusive=False)
            _check_number(o, "guidance_weight", self.guidance_weight, 0.0)
            check_unit(o, "guidance_start", self.guidance_start)
            check_unit(o, "guidance_end", self.guidance_end)
            if self.guidance_end < self.guidance_start:
                raise ValueError(f"{o}: 'guidance_end' must be >= 'guidance_start'")
            for name in ("w_centroid", "w_shape", "w_size", "w_appearance", "w_layout", "threshold_sharpness"):
                _check_number(o, name, getattr(self, name), 0.0)
            if not self.attention_places or any(p not in PLACES for p in self.attention_places):
                raise ValueError(f"{o}: 'attention_places' must be a non-empty subset of {list(PLACES)}, "
                                 f"got {self.attention_places!r}")
            check_unit(o, "attention_grid", self.attention_grid, low_open=True)
            if self.object_word is not None and not str(self.object_word).strip():
                raise ValueError(f"{o}: 'object_word' must be null or a non-empty word")

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def window(self) -> tuple[int, int]:
        n = int(self.params.num_inference_steps)
        return int(n * self.params.guidance_start), int(n * self.params.guidance_end)

    # -- the sample -> the task -----------------------------------------------------------------------
    def task_for(self, sample: Sample) -> Task:
        p = self.params
        meta = sample.meta or {}
        word = meta.get("object_prompt") or p.object_word
        if not word or not str(word).strip():
            raise SkipSample("self_guidance needs the object word: meta.object_prompt or the 'object_word' parameter")
        h, w = np.asarray(sample.source).shape[:2]
        offset = None
        if sample.source_points is not None and sample.target_points is not None:
            d = np.asarray(sample.target_points, float) - np.asarray(sample.source_points, float)
            offset = d.reshape(-1, 2).mean(0)
        else:
            for key in ("offset", "mask_offset"):
                if key in meta:
                    try:
                        offset = np.asarray(meta[key], float).reshape(2)
                    except (TypeError, ValueError):
                        raise SkipSample(f"meta.{key} must be [dx, dy] in pixels, got {meta[key]!r}") from None
                    break
        kind = p.task
        if kind == "auto":
            kind = ("appearance" if sample.reference is not None else "move" if offset is not None
                    else "size" if "scale" in meta else None)
            if kind is None:
                raise SkipSample("self_guidance (task auto) needs a reference image (appearance), points or "
                                 "meta.offset (move), or meta.scale (size)")
        if kind == "move" and offset is None:
            raise SkipSample("self_guidance move needs source_points/target_points or meta.offset")
        if kind == "appearance" and sample.reference is None:
            raise SkipSample("self_guidance appearance needs the reference field")
        scale = float(meta.get("scale", p.size_scale))
        off = (0.0, 0.0) if offset is None else (float(offset[0]) / w, float(offset[1]) / h)
        return Task(kind, str(word).strip(), off, scale, sample.reference, sample.reference_mask)

    # -- the energy ------------------------------------------------------------------------------------
    def properties(self, maps: Any, feat: Any, n_object: int, object_map: Any = None) -> dict[str, Any]:
        """Properties from the captured maps ``[B, T, H, W]`` (the object's ``n_object`` tokens
        first, averaged into its map, unless ``object_map`` replaces it; every other word token
        after) and the activations ``feat``."""
        obj = maps[:, :n_object].mean(1) if object_map is None else object_map
        return {"map": obj, "others": maps[:, n_object:], "centroid": centroid(obj), "size": size(obj),
                "appearance": appearance(obj, feat, float(self.params.threshold_sharpness))}

    def energy(self, cur: dict[str, Any], src: dict[str, Any], task: Task, ref: dict[str, Any] | None) -> Any:
        """``g`` of the task (L1 terms, weighted), plus the layout term: every other word's map
        kept to the source's (the paper keeps every property not edited)."""
        layout = (cur["others"] - src["others"]).abs().mean() if cur["others"].shape[1] else cur["map"].sum() * 0.0
        return self.params.w_layout * layout + self.task_energy(cur, src, task, ref)

    def task_energy(self, cur: dict[str, Any], src: dict[str, Any], task: Task, ref: dict[str, Any] | None) -> Any:
        p = self.params
        if task.kind == "move":
            goal = src["centroid"] + cur["centroid"].new_tensor(task.offset_xy)
            return (p.w_centroid * (cur["centroid"] - goal).abs().sum()
                    + p.w_shape * (cur["map"] - translate(src["map"], task.offset_xy)).abs().mean()
                    + p.w_size * (cur["size"] - src["size"]).abs().sum()
                    + p.w_appearance * (cur["appearance"] - src["appearance"]).abs().mean())
        if task.kind == "size":
            return (p.w_size * (cur["size"] - task.scale * src["size"]).abs().sum()
                    + p.w_centroid * (cur["centroid"] - src["centroid"]).abs().sum()
                    + p.w_appearance * (cur["appearance"] - src["appearance"]).abs().mean())
        assert ref is not None
        return (p.w_appearance * (cur["appearance"] - ref["appearance"]).abs().mean()
                + p.w_shape * (cur["map"] - src["map"]).abs().mean()
                + p.w_centroid * (cur["centroid"] - src["centroid"]).abs().sum())

    def observe(self, unet: Any, ctrl: TokenAttention, tap: dict[int, Any], block: Any, z: Any, t: int,
                cond: Any, grid: tuple[int, int]) -> tuple[Any, Any, Any]:
        """One conditional UNet call with capture: ``(eps, maps [B, T, H, W], activations)``."""
        import torch.nn.functional as F

        ctrl.armed = True
        try:
            eps = unet(z, t, encoder_hidden_states=cond).sample
        finally:
            ctrl.armed = False
        import torch

        maps = ctrl.take(grid)
        feat = tap.pop("feat")
        feat = feat.float() if feat.dtype in (torch.float16, torch.bfloat16) else feat  # properties in >= fp32
        feat = F.interpolate(feat, grid, mode="bilinear", align_corners=False)
        return eps, maps.to(feat.dtype), feat

    def sample_latents(self, pipe: Any, z0: Any, prompt: str, task: Task, generator: Any,
                       z_ref0: Any = None) -> dict[str, Any]:
        """Generate from ``init`` with self-guidance toward the task. Returns ``latents`` and info."""
        import torch
        import torch.nn.functional as F

        from .diffusion.attention import attention_control
        from .diffusion.inversion import ddim_invert, ddim_move, encode_prompt, make_schedule

        p = self.params
        n = int(p.num_inference_steps)
        sched = make_schedule(pipe.scheduler, n)
        unet = pipe.unet
        dev, dt = z0.device, z0.dtype
        cond = encode_prompt(pipe, prompt).to(dev, dt)
        uncond = encode_prompt(pipe, "").to(dev, dt)
        tokens = token_indices(pipe.tokenizer, prompt, task.word)
        ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
        others = [i for i in range(1, len(ids) - 1) if i not in tokens]  # every other word (no BOS / EOS)
        if not tokens:
            raise SkipSample(f"the object word {task.word!r} is not in the caption {prompt!r}")
        w_cfg = float(p.guidance_scale)
        noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(dev, dt)
        if p.init == "inversion":
            z = ddim_invert(unet, sched, z0, cond, n)[-1]
        else:
            z = noise.clone()
        lo, hi = self.window()
        guided = float(p.guidance_weight) != 0.0 and hi > lo
        lh, lw = z0.shape[-2:]
        grid = (max(1, int(round(lh * p.attention_grid))), max(1, int(round(lw * p.attention_grid))))
        ctrl = TokenAttention(tokens + others, p.attention_places, aspect=lh / lw) if guided else None
        tap: dict[int, Any] = {}
        block = unet.up_blocks[int(p.appearance_block)]
        hook = block.register_forward_hook(lambda m, a, o: tap.__setitem__("feat", o[0] if isinstance(o, tuple) else o))
        ref_map = None
        if task.kind == "appearance" and task.reference_mask is not None and p.reference_region == "mask":
            m = torch.from_numpy(np.asarray(task.reference_mask, dtype=np.float32))[None, None]
            ref_map = F.interpolate(m, grid, mode="bilinear", align_corners=False)[:, 0].to(dev, dt)
        energies: list[float] = []
        try:
            with attention_control(unet, ctrl) if guided else _nullcontext():
                for i, t in enumerate(sched.timesteps):
                    a_t = sched.alpha(t)
                    if guided and lo <= i < hi:
                        with torch.no_grad():
                            zs = a_t ** 0.5 * z0 + (1 - a_t) ** 0.5 * noise
                            _, m_s, f_s = self.observe(unet, ctrl, tap, block, zs, t, cond, grid)
                            src = self.properties(m_s, f_s, len(tokens))
                            ref = None
                            if task.kind == "appearance":
                                zr = a_t ** 0.5 * z_ref0 + (1 - a_t) ** 0.5 * noise
                                _, m_r, f_r = self.observe(unet, ctrl, tap, block, zr, t, cond, grid)
                                ref = self.properties(m_r, f_r, len(tokens), ref_map)
                        with torch.enable_grad():
                            zg = z.detach().requires_grad_(True)
                            eps_c, m_c, f_c = self.observe(unet, ctrl, tap, block, zg, t, cond, grid)
                            g = self.energy(self.properties(m_c, f_c, len(tokens)), src, task, ref)
                            grad, = torch.autograd.grad(g, zg)
                        energies.append(float(g.detach()))
                        eps_c = eps_c.detach()
                    else:
                        grad = None
                        with torch.no_grad():
                            eps_c = unet(z, t, encoder_hidden_states=cond).sample
                    with torch.no_grad():
                        if w_cfg != 1.0:
                            eps_u = unet(z, t, encoder_hidden_states=uncond).sample
                            eps = eps_u + w_cfg * (eps_c - eps_u)
                        else:
                            eps = eps_c
                        if grad is not None:
                            eps = eps + float(p.guidance_weight) * (1.0 - a_t) ** 0.5 * grad
                        z = ddim_move(z.detach(), eps, a_t, sched.alpha(sched.prev(t)))
        finally:
            hook.remove()
        return {"latents": z, "info": {"task": task.kind, "object_word": task.word, "object_tokens": tokens,
                                       "offset_xy": list(task.offset_xy), "scale": task.scale,
                                       "guided_window": [lo, min(hi, n)],
                                       "energy_first": energies[0] if energies else None,
                                       "energy_last": energies[-1] if energies else None}}

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        import torch

        from .diffusion.inversion import decode_latents, encode_image

        task = self._task
        assert task is not None, "call_pipeline runs inside edit()"
        with torch.inference_mode(False):
            z0 = encode_image(pipe, np.asarray(image)).clone()
            z_ref = None
            if task.kind == "appearance":
                z_ref = encode_image(pipe, np.asarray(to_pil(np.asarray(task.reference), np.asarray(image).shape[:2])))
                z_ref = z_ref.clone()
            t0 = time.perf_counter()
            out = self.sample_latents(pipe, z0, prompt, task, generator, z_ref)
            out["info"]["sampling_seconds"] = time.perf_counter() - t0
        self._extra = out["info"]
        u8 = decode_latents(pipe, out["latents"])
        return types.SimpleNamespace(images=u8.astype(np.float32) / 255.0)

    _task: Task | None = None
    _extra: dict[str, Any] = {}

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        self._task, self._extra = self.task_for(sample), {}
        try:
            out = super().edit(sample, seed)
            extra = self._extra
        finally:
            self._task, self._extra = None, {}
        out.info.update(extra)
        return out

    def extra_info(self) -> dict[str, Any]:
        p = self.params
        return {"init": p.init, "guidance_weight": float(p.guidance_weight),
                "guidance_window_fraction": [float(p.guidance_start), float(p.guidance_end)],
                "energy_weights": {"centroid": p.w_centroid, "shape": p.w_shape, "size": p.w_size,
                            "appearance": p.w_appearance, "layout": p.w_layout},
                "attention_places": list(p.attention_places), "attention_grid": float(p.attention_grid),
                "appearance_block": int(p.appearance_block), "threshold_sharpness": float(p.threshold_sharpness),
                "reference_region": p.reference_region}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
