"""Alpha-CLIP metrics of the PartEdit protocol: ``alpha_clip`` and its labelled stand-in ``masked_clip``.

Protocol (PartEdit, Cvejic et al. 2025, section 4.1 "Evaluation Metrics" and Table 1). Per edit,
three rows, all ``scale * cos`` (PartEdit prints x100; ``scale`` default 100), no clamp:

- ``<name>_fg`` (region ``edited``): alphaCLIP_FG, the similarity of the EDIT with alpha = the
  sample's edit mask vs the editing prompt (``text_field``, default ``target_caption``: PartEdit
  edits with a target prompt);
- ``<name>_bg`` (region ``unedited``): alphaCLIP_BG, the image-image similarity of the SOURCE and
  the EDIT, both with alpha = 1 - mask;
- ``<name>_avg`` (region ``all``): alphaCLIP_avg, the mean of the two for that edit (NaN when either
  is NaN). The paper's avg equals (mean FG + mean BG) / 2 when no edit has a NaN (Table 1:
  P2P (63.60 + 20.46) / 2 = 42.03); with NaNs the per-edit mean counts only edits that have both.

NaNs: no mask -> all three ``no_mask``; an empty edited (unedited) region -> fg (bg) and avg
``empty_region``; no prompt -> fg and avg ``missing:<field>``. ``text_field`` may be a list: the
fields are tried in order and a value computed from a later field carries the flag
``text:<field>`` (counted in tables, never silent). The suite's common keys ``regions``,
``reference`` and ``region_rule`` are accepted and ignored (these rows are fixed by the protocol).

Alpha-CLIP (Sun et al., CVPR 2024; github.com/SunzeY/AlphaCLIP, ``alpha_clip/model.py`` and
``alpha_clip.py``), facts reproduced here:

- the image encoder is OpenAI CLIP's ViT (QuickGELU, ``Resize`` shortest side bicubic +
  ``CenterCrop`` + OpenAI mean/std) whose patch embedding gets ``conv1_alpha`` =
  ``Conv2d(1, width, patch, stride=patch, bias=False)`` applied to the alpha channel and ADDED to
  ``conv1``'s output; everything after the patch embedding is unchanged. The text tower is the
  plain, frozen OpenAI CLIP text tower (model-zoo.md: "The text-encoder stays fixed"), so text
  embeddings come from the base CLIP (open_clip, ``pretrained=openai``);
- the released checkpoints (``alpha_vision_ckpt_pth``: ``clip_b16_grit1m_fultune_8xe.pth``,
  ``clip_l14_grit20m_fultune_2xe.pth``, ...) hold the VISUAL tower only: a state dict without
  prefix, loaded with ``model.visual.load_state_dict(...)`` (strict) into a model built with
  ``lora_adapt=False``, so they carry no LoRA parameters; the whole ViT is fine-tuned ("fultune"),
  so every visual weight comes from the checkpoint. Key names are open_clip's OpenAI ViT names
  (``conv1.weight``, ``class_embedding``, ``positional_embedding``, ``ln_pre.*``,
  ``transformer.resblocks.N.{ln_1,ln_2,mlp.c_fc,mlp.c_proj,attn.out_proj}.*``, ``ln_post.*``,
  ``proj``) plus ``conv1_alpha.weight``, except that Alpha-CLIP's attention holds its qkv
  projection as an ``nn.Linear``: ``attn.in_proj.weight`` / ``attn.in_proj.bias`` where
  nn.MultiheadAttention (open_clip) has ``attn.in_proj_weight`` / ``attn.in_proj_bias``
  (:func:`alpha_clip_state_to_open_clip` renames them);
- the alpha channel is the binary mask as uint8 0/255, ``ToTensor`` (-> 0/1), resized to the
  model's input size, ``Normalize(0.5, 0.26)``: 1 -> +1.923, 0 -> -1.923 (README's
  ``mask_transform``). Their README resizes the mask with ``Resize((224, 224))`` while the image
  goes through ``Resize(224) + CenterCrop(224)``, which only line up on square images; their
  ImageNet-S evaluation centre-crops image and mask together first. Here the mask gets the
  image's geometry: ``Resize(n)`` (shortest side; torchvision's default bilinear, antialias) +
  ``CenterCrop(n)`` on the tensor, identical to the README transform on square images and aligned
  with the image on all others;
- precision: the official ``load`` runs the model in fp16 on CUDA (``convert_weights``) and in
  fp32 on CPU; here it runs in fp32 (open_clip's default), so GPU numbers can differ from the
  official fp16 ones in the last digits.

Where it joins open_clip (no open_clip code is copied): the base model is open_clip's
OpenAI-architecture ViT (``create_model(model, pretrained=...)`` via ``_clip_models.load_clip``).
Its visual tower is deep-copied, ``conv1_alpha`` is registered on the copy (so the copy's state
dict has Alpha-CLIP's key layout), and a forward hook on the copy's ``conv1`` adds
``conv1_alpha(alpha)`` to the patch embedding of the current call (:func:`encode_image_alpha`
sets the alpha for that call). open_clip's ``VisionTransformer._embeds`` calls ``self.conv1``
first and then the class token, positional embedding, ``ln_pre``, transformer, ``ln_post`` and
``proj``, which is exactly Alpha-CLIP's forward after its patch embedding.

Weights, offline-first (nothing is downloaded):

- the base CLIP (text tower, preprocessing, and the visual tower of a smoke run) through
  ``_clip_models.resolve_weights``: ``weights_path``, then the Hugging Face hub cache and
  open_clip's URL cache, downloads only with ``EDIT_HARNESS_ALLOW_DOWNLOADS=1``;
- the Alpha-CLIP visual checkpoint from ``alpha_weights_path`` only (a file, or a folder holding
  one of the released file names for ``model``). They are Google Drive links in
  ``model-zoo.md`` of github.com/SunzeY/AlphaCLIP; :func:`resolve_alpha_weights` says so.

When the Alpha-CLIP checkpoint is missing: with ``fallback: masked_clip`` the metric runs the
``masked_clip`` stand-in below, and its ``weights()`` (the weights column of every table) starts
with ``STAND-IN for Alpha-CLIP``; otherwise with ``allow_random_weights: true`` it runs Alpha-CLIP
on the base visual tower plus a seeded random ``conv1_alpha`` (labelled ``RANDOM WEIGHTS (smoke
run)``); otherwise it is unavailable and ``available()`` says how to provide the checkpoint.

``masked_clip`` (the stand-in; no library implements it): plain CLIP on the image with every pixel
outside the region replaced by ``fill`` (default ``mean``: OpenAI CLIP's mean colour as uint8,
(122, 116, 104), the ``MASK_FILL`` of Alpha-CLIP's own ImageNet-S code, which CLIP's
normalisation maps to ~0; or ``black``, ``white``, or ``[r, g, b]``). ``crop: bbox`` also crops
to the region's bounding box, padded to a square with the fill so CLIP's centre crop keeps the
whole region; ``crop: none`` (default) keeps the full frame, like Alpha-CLIP's alpha does. The
same three rows, the same parameters minus the Alpha-CLIP ones.

Caching: models are loaded once per process; embeddings live in ``_clip_models.FEATURES`` keyed
by (model key, kind, sha1 of the bytes): the source with its alpha (or its filled image), the
prompts and the edits are each encoded once per process. ``feature_cache_dir`` also stores the
method-independent ones (sources, prompts) on disk as ``.npy`` (never for random weights).
torch, torchvision and open_clip are imported inside functions only.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import threading
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..registry import METRICS
from ..types import Sample, ScoreValue
from ._clip_models import FEATURES, RANDOM_WEIGHTS_TEXT, ClipBundle, Resolved, load_clip, resolve_weights
from .base import Metric, MetricUnavailable, ScoringItem, region_flag, resize_mask_like

# Alpha-CLIP's mask normalisation (README ``mask_transform``: Normalize(0.5, 0.26)).
ALPHA_MEAN = 0.5
ALPHA_STD = 0.26

# OpenAI CLIP's pixel mean; as uint8 (int(255 * c)) it is Alpha-CLIP's MASK_FILL.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
FILLS: dict[str, tuple[int, int, int]] = {
    "mean": tuple(int(255 * c) for c in OPENAI_MEAN),  # type: ignore[dict-item]
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
CROPS = ("none", "bbox")
FALLBACKS = ("none", "masked_clip")
TEXT_FIELDS = ("target_caption", "instruction", "source_caption")

MODEL_ZOO_URL = "https://github.com/SunzeY/AlphaCLIP/blob/main/model-zoo.md"
# Released Alpha-CLIP visual checkpoints per base CLIP (model-zoo.md), preferred first (the README's
# usage example loads clip_l14_grit20m_fultune_2xe.pth).
ALPHA_CHECKPOINTS: dict[str, tuple[str, ...]] = {
    "ViT-B-16": ("clip_b16_grit20m_fultune_2xe.pth", "clip_b16_grit1m+mim_fultune_4xe.pth",
                 "clip_b16_grit1m_fultune_8xe.pth"),
    "ViT-L-14": ("clip_l14_grit20m_fultune_2xe.pth", "clip_l14_grit1m+mim_fultune_6xe.pth",
                 "clip_l14_grit1m_fultune_8xe.pth"),
    "ViT-L-14-336": ("clip_l14@336_grit1m_fultune_8xe.pth",),
}

COMMON_DEFAULTS: dict[str, Any] = {
    "model": "ViT-L-14",
    "pretrained": "openai",
    "weights_path": None,
    "allow_random_weights": False,
    "device": "auto",
    "batch_size": 16,
    "scale": 100.0,
    "text_field": "target_caption",
    "feature_cache_dir": None,
}
MASKED_DEFAULTS: dict[str, Any] = {"fill": "mean", "crop": "none"}
ALPHA_DEFAULTS: dict[str, Any] = {"alpha_weights_path": None, "fallback": "none"}

_ALPHA_MODELS: dict[tuple, "AlphaClipBundle"] = {}
_LOCK = threading.Lock()


def _arch(model: str) -> str:
    """The Alpha-CLIP base name of an open_clip model name (``ViT-L-14-quickgelu`` -> ``ViT-L-14``)."""
    m = model.replace("/", "-")
    if m.endswith("@336px"):
        m = m[: -len("@336px")] + "-336"
    return m[: -len("-quickgelu")] if m.endswith("-quickgelu") else m


# --------------------------------------------------------------------------------------------
# Alpha-CLIP checkpoint resolution (torch-free)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AlphaResolved:
    """Where the Alpha-CLIP visual weights come from: origin is ``file`` or ``random``."""

    origin: str
    path: str | None
    where: str


def how_to_provide(model: str) -> str:
    """The fix named in every 'Alpha-CLIP weights missing' reason."""
    names = ALPHA_CHECKPOINTS.get(_arch(model))
    if names:
        which = f"for model={model}: {', '.join(names)}"
    else:
        which = "; ".join(f"{k}: {', '.join(v)}" for k, v in ALPHA_CHECKPOINTS.items())
        which = f"(model={model} has none; released ones per base model: {which})"
    return (
        f"Alpha-CLIP's visual checkpoints are published as Google Drive links in {MODEL_ZOO_URL} "
        f"({which}). Download one and set the metric param alpha_weights_path=<checkpoint file, or a folder "
        f"holding it> (e.g. metrics.items.alpha_clip.alpha_weights_path=/path/clip_l14_grit20m_fultune_2xe.pth "
        f"with model=ViT-L-14); or set fallback: masked_clip to run the masked-CLIP stand-in (labelled "
        f"STAND-IN in every table), or allow_random_weights: true for a smoke run"
    )


def _checkpoint_model(path: Path) -> str | None:
    """The base model a released checkpoint file name belongs to, or None for other names."""
    for arch, names in ALPHA_CHECKPOINTS.items():
        if path.name in names:
            return arch
    return None


def alpha_weights_problem(model: str, alpha_weights_path: str | None) -> tuple[str | None, str | None]:
    """(checkpoint file, None) when usable, else (None, short cause); no torch."""
    if not alpha_weights_path:
        return None, "no Alpha-CLIP checkpoint configured (alpha_weights_path is not set)"
    p = Path(os.path.expanduser(str(alpha_weights_path)))
    if p.is_dir():
        names = ALPHA_CHECKPOINTS.get(_arch(model), ())
        for name in names:
            if (p / name).is_file():
                return str(p / name), None
        return None, (f"alpha_weights_path folder '{p}' holds none of the Alpha-CLIP checkpoints for "
                      f"model={model} ({', '.join(names) or 'none released'})")
    if not p.is_file():
        return None, f"alpha_weights_path '{p}' does not exist"
    arch = _checkpoint_model(p)
    if arch is not None and arch != _arch(model):
        return None, (f"alpha_weights_path '{p.name}' is an Alpha-CLIP checkpoint of {arch}, but model={model}; "
                      f"set model: {arch}")
    return str(p), None


def resolve_alpha_weights(model: str, alpha_weights_path: str | None) -> AlphaResolved | str:
    """The Alpha-CLIP visual checkpoint to load, or the reason there is none and how to fix it."""
    path, cause = alpha_weights_problem(model, alpha_weights_path)
    if path is None:
        return f"Alpha-CLIP {model}: {cause}. {how_to_provide(model)}"
    return AlphaResolved("file", path, f"Alpha-CLIP visual checkpoint {path}")


# --------------------------------------------------------------------------------------------
# The Alpha-CLIP image encoder on open_clip's ViT
# --------------------------------------------------------------------------------------------
def alpha_clip_state_to_open_clip(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an Alpha-CLIP visual state dict to open_clip's OpenAI ViT names (see module doc).

    Only the qkv projection differs: ``attn.in_proj.{weight,bias}`` (Alpha-CLIP's ``nn.Linear``)
    -> ``attn.in_proj_{weight,bias}`` (``nn.MultiheadAttention``). A whole-model state dict is
    accepted too: its ``visual.`` keys are used, without the prefix. LoRA checkpoints
    (``lora_A``/``lora_B`` keys; the released ones have none) are refused: merge them first.
    """
    keys = list(state)
    if any(k.startswith("visual.") for k in keys):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    lora = [k for k in state if "lora_" in k]
    if lora:
        raise ValueError(f"Alpha-CLIP checkpoint has LoRA parameters ({lora[0]}, ...); the released checkpoints "
                         f"have none: merge the LoRA weights into the base weights first")
    out: dict[str, Any] = {}
    for k, v in state.items():
        k = k.replace(".attn.in_proj.weight", ".attn.in_proj_weight").replace(".attn.in_proj.bias", ".attn.in_proj_bias")
        out[k] = v
    return out


def _alpha_hook(visual):
    def hook(module, inputs, output):
        alpha = visual.__dict__.get("_alpha_input")
        if alpha is None:
            raise RuntimeError("Alpha-CLIP visual tower called without an alpha channel; use encode_image_alpha()")
        return output + visual.conv1_alpha(alpha.to(device=output.device, dtype=output.dtype))

    return hook


def add_conv1_alpha(visual, init: str = "zeros"):
    """A copy of an open_clip ViT visual tower with Alpha-CLIP's ``conv1_alpha`` (see module doc).

    ``init``: ``zeros`` (Alpha-CLIP's own init: the tower then equals the plain CLIP tower) or
    ``random`` (torch's Conv2d init under seed 0, for smoke runs). The base tower is not touched.
    """
    import torch
    from torch import nn

    conv = getattr(visual, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(visual, "positional_embedding"):
        raise TypeError(f"Alpha-CLIP needs an open_clip ViT visual tower with conv1, got {type(visual).__name__}")
    if init not in ("zeros", "random"):
        raise ValueError(f"init must be zeros or random, got {init!r}")
    v = copy.deepcopy(visual)
    w = conv.weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        alpha_conv = nn.Conv2d(1, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride, bias=False)
    if init == "zeros":
        nn.init.zeros_(alpha_conv.weight)
    v.conv1_alpha = alpha_conv.to(device=w.device, dtype=w.dtype)
    v.conv1_alpha.requires_grad_(w.requires_grad)
    object.__setattr__(v, "_alpha_input", None)
    object.__setattr__(v, "_alpha_lock", threading.Lock())
    # The seam: conv1's output + conv1_alpha(alpha); the rest of open_clip's forward is unchanged.
    v.conv1.register_forward_hook(_alpha_hook(v))
    return v


def encode_image_alpha(visual, image, alpha):
    """Alpha-CLIP image features (unnormalised) of preprocessed images N x 3 x n x n and alphas N x 1 x n x n."""
    if image.shape[0] != alpha.shape[0] or alpha.shape[1] != 1 or tuple(alpha.shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(f"alpha must be N x 1 x H x W matching the image batch, got image {tuple(image.shape)} "
                         f"and alpha {tuple(alpha.shape)}")
    with visual._alpha_lock:
        object.__setattr__(visual, "_alpha_input", alpha)
        try:
            return visual(image)
        finally:
            object.__setattr__(visual, "_alpha_input", None)


def read_alpha_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """An Alpha-CLIP visual state dict from a ``.pth``/``.pt`` (torch.save) or ``.safetensors`` file."""
    p = str(path)
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Any = load_file(p, device="cpu")
    else:
        import torch

        state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"Alpha-CLIP checkpoint {p} is not a state dict (got {type(state).__name__})")
    return dict(state)


def load_alpha_visual_state(visual, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load an Alpha-CLIP visual state dict (Alpha-CLIP or open_clip key names) strictly into ``visual``."""
    import torch

    mapped = alpha_clip_state_to_open_clip(state)
    own = visual.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    shapes = [f"{k} {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise ValueError(f"Alpha-CLIP {source} does not fit this visual tower ({'; '.join(parts)}); "
                         f"check that the metric's model matches the checkpoint (clip_b16_* -> ViT-B-16, "
                         f"clip_l14_* -> ViT-L-14, clip_l14@336_* -> ViT-L-14-336)")
    with torch.no_grad():
        visual.load_state_dict({k: torch.as_tensor(v) for k, v in mapped.items()}, strict=True)


def alpha_transform(mask: np.ndarray, size: int, resize_mode: str = "shortest"):
    """The alpha channel of a bool HxW mask: 1 x size x size, (mask - 0.5) / 0.26 (see module doc)."""
    from torchvision import transforms as T

    m = (np.asarray(mask).astype(bool).astype(np.uint8) * 255)
    steps: list[Any] = [T.ToTensor()]
    if resize_mode == "squash":
        steps.append(T.Resize((size, size)))
    else:
        steps += [T.Resize(size), T.CenterCrop(size)]
    steps.append(T.Normalize(ALPHA_MEAN, ALPHA_STD))
    return T.Compose(steps)(m)


def _file_id(path: str | None) -> str:
    if not path:
        return "-"
    try:
        st = os.stat(path)
        return f"{path}|{st.st_size}|{int(st.st_mtime)}"
    except OSError:
        return path


def region_hash(image: np.ndarray, mask: np.ndarray) -> str:
    """sha1 of an image and its region mask (shape, dtype and bytes of both)."""
    a = np.ascontiguousarray(image)
    m = np.ascontiguousarray(np.asarray(mask, dtype=bool))
    h = hashlib.sha1(f"{a.shape}|{a.dtype}|{m.shape}|".encode())
    h.update(a.tobytes())
    h.update(m.tobytes())
    return h.hexdigest()


@dataclasses.dataclass(eq=False)
class AlphaClipBundle:
    """A loaded Alpha-CLIP: the base open_clip bundle (text tower, preprocessing) + the alpha visual tower."""

    base: ClipBundle
    visual: Any
    alpha: AlphaResolved
    key: str

    @property
    def random(self) -> bool:
        return self.alpha.origin == "random" or self.base.random

    @property
    def image_size(self) -> int:
        s = self.visual.image_size
        return int(s[0] if isinstance(s, (tuple, list)) else s)

    @property
    def resize_mode(self) -> str:
        return str(dict(self.base.resolved.preprocess).get("resize_mode", "shortest"))

    def embed_regions(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], batch_size: int = 16,
                      cache_dir: str | os.PathLike | None = None, persist: Sequence[bool] | None = None) -> np.ndarray:
        """Raw Alpha-CLIP image embeddings, N x D float64, of RGB uint8 images with alpha = their bool masks."""
        import torch
        from PIL import Image

        disk = None if (not cache_dir or self.random) else Path(os.path.expanduser(str(cache_dir))) / self.key
        hashes = [region_hash(im, m) for im, m in zip(images, masks)]
        out: list[np.ndarray | None] = [None] * len(images)
        todo: dict[str, list[int]] = {}
        for i, h in enumerate(hashes):
            v = FEATURES.get((self.key, "alpha_image", h), disk if (persist is None or persist[i]) else None)
            if v is not None:
                out[i] = v
            else:
                todo.setdefault(h, []).append(i)
        order = list(todo)
        n = self.image_size
        dev = self.base.device
        for start in range(0, len(order), max(1, int(batch_size))):
            chunk = order[start:start + max(1, int(batch_size))]
            first = [todo[h][0] for h in chunk]
            x = torch.stack([self.base.preprocess(Image.fromarray(np.asarray(images[i]))) for i in first])
            a = torch.stack([alpha_transform(masks[i], n, self.resize_mode) for i in first])
            with torch.no_grad():
                feats = encode_image_alpha(self.visual, x.to(dev), a.to(dev)).float().cpu().numpy()
            for j, h in enumerate(chunk):
                keep = persist is None or any(persist[i] for i in todo[h])
                FEATURES.put((self.key, "alpha_image", h), feats[j], disk if keep else None)
                for i in todo[h]:
                    out[i] = feats[j]
        return np.stack(out).astype(np.float64) if out else np.zeros((0, 0))


def load_alpha_clip(
    model: str,
    pretrained: str | None,
    weights_path: str | None,
    alpha: AlphaResolved,
    device: str = "auto",
    allow_random: bool = False,
) -> AlphaClipBundle:
    """Alpha-CLIP for these settings, loaded once per process (the base CLIP is shared with ``clip.py``)."""
    base = load_clip(model, pretrained, weights_path, device, allow_random)
    cache_key = (model, pretrained, base.resolved.origin, base.resolved.path, base.device, alpha.origin, alpha.path)
    with _LOCK:
        if cache_key in _ALPHA_MODELS:
            return _ALPHA_MODELS[cache_key]
    visual = add_conv1_alpha(base.model.visual, init="random" if alpha.origin == "random" else "zeros")
    if alpha.origin == "file":
        load_alpha_visual_state(visual, read_alpha_checkpoint(alpha.path), source=f"checkpoint {alpha.path}")
    visual = visual.eval().requires_grad_(False)
    key = hashlib.sha1(repr(("alpha_clip", base.key, alpha.origin, _file_id(alpha.path), ALPHA_MEAN, ALPHA_STD,
                             "geometry=image")).encode()).hexdigest()[:16]
    bundle = AlphaClipBundle(base, visual, alpha, key)
    with _LOCK:
        return _ALPHA_MODELS.setdefault(cache_key, bundle)


# --------------------------------------------------------------------------------------------
# Masked-CLIP stand-in (hand-written: no library has it)
# --------------------------------------------------------------------------------------------
def parse_fill(fill: Any) -> tuple[int, int, int]:
    """``mean`` | ``black`` | ``white`` | [r, g, b] (integers 0-255) -> an RGB uint8 triple."""
    if isinstance(fill, str):
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {', '.join(FILLS)} or [r, g, b], got {fill!r}")
        return FILLS[fill]
    try:
        vals = list(fill)
    except TypeError:
        vals = []
    ok = len(vals) == 3 and all(
        isinstance(c, (int, np.integer)) or (isinstance(c, float) and c.is_integer()) for c in vals
    ) and all(0 <= c <= 255 for c in vals)
    if not ok:
        raise ValueError(f"fill must be one of {', '.join(FILLS)} or [r, g, b] with integers in 0..255, got {fill!r}")
    return (int(vals[0]), int(vals[1]), int(vals[2]))


def fill_outside(image: np.ndarray, region: np.ndarray, fill: tuple[int, int, int], crop: str = "none") -> np.ndarray:
    """The image with every pixel outside ``region`` set to ``fill``; ``crop=bbox`` also crops to the
    region's bounding box and pads it to a centred square with ``fill``."""
    img = np.asarray(image)
    region = np.asarray(region, dtype=bool)
    out = img.copy()
    out[~region] = np.asarray(fill, dtype=img.dtype)
    if crop == "bbox":
        ys, xs = np.nonzero(region)
        out = out[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
        h, w = out.shape[:2]
        s = max(h, w)
        sq = np.empty((s, s, 3), dtype=img.dtype)
        sq[...] = np.asarray(fill, dtype=img.dtype)
        y0, x0 = (s - h) // 2, (s - w) // 2
        sq[y0:y0 + h, x0:x0 + w] = out
        out = sq
    return out


# --------------------------------------------------------------------------------------------
# Backends: how a (image, region) pair and a prompt are embedded
# --------------------------------------------------------------------------------------------
class _Backend:
    def available(self) -> str | None:
        raise NotImplementedError

    def weights(self) -> str:
        raise NotImplementedError

    def rule(self) -> str:
        raise NotImplementedError

    def load(self) -> None:
        raise NotImplementedError

    def embed_regions(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], persist: bool) -> np.ndarray:
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class _BaseClip:
    """The base open_clip model of a metric (resolution + loading through ``_clip_models``)."""

    def __init__(self, metric: "_RegionClipMetric"):
        self.m = metric
        self._resolved: Resolved | str | None = None
        self._bundle: ClipBundle | None = None

    def resolved(self) -> Resolved | str:
        if self._resolved is None:
            m = self.m
            self._resolved = resolve_weights(m.model_name, m.pretrained, m.weights_path, m.allow_random)
        return self._resolved

    def where(self) -> str:
        r = self.resolved()
        if isinstance(r, str):
            return f"open_clip {self.m.model_name} / pretrained={self.m.pretrained!r}; weights unavailable"
        return r.where + ("; QuickGELU" if r.quick_gelu else "")

    def bundle(self) -> ClipBundle:
        if self._bundle is None:
            m = self.m
            self._bundle = load_clip(m.model_name, m.pretrained, m.weights_path, m.device_param, m.allow_random)
        return self._bundle

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0))
        return self.bundle().embed_texts(list(texts), self.m.batch_size, self.m.feature_cache_dir)


class _MaskedBackend(_Backend):
    def __init__(self, metric: "_RegionClipMetric", cause: str | None = None):
        self.base = _BaseClip(metric)
        self.m = metric
        self.cause = cause  # why Alpha-CLIP is not used (alpha_clip's fallback), None for masked_clip

    def available(self) -> str | None:
        r = self.base.resolved()
        if not isinstance(r, str):
            return None
        if self.cause:
            return f"{self.cause}; its fallback, the masked-CLIP stand-in, needs the base CLIP: {r}"
        return f"masked_clip (STAND-IN for Alpha-CLIP) needs CLIP: {r}"

    def describe(self) -> str:
        crop = ", cropped to the region's bounding box padded square" if self.m.crop == "bbox" else ""
        return f"outside the region filled with {self.m.fill_name} {self.m.fill}{crop}"

    def weights(self) -> str:
        why = f" ({self.cause})" if self.cause else ""
        return (f"STAND-IN for Alpha-CLIP{why}: masked CLIP {self.m.model_name}/{self.m.pretrained} "
                f"({self.describe()}); {self.base.where()}")

    def rule(self) -> str:
        return f"STAND-IN masked CLIP: {self.describe()}"

    def load(self) -> None:
        r = self.base.resolved()
        if isinstance(r, str):
            raise MetricUnavailable(r)
        self.base.bundle()

    def embed_regions(self, images, masks, persist):
        if not images:
            return np.zeros((0, 0))
        filled = [fill_outside(im, mk, self.m.fill, self.m.crop) for im, mk in zip(images, masks)]
        return self.base.bundle().embed_images(filled, self.m.batch_size, self.m.feature_cache_dir,
                                               [persist] * len(filled))

    def embed_texts(self, texts):
        return self.base.embed_texts(texts)


def _quick_gelu(model: str, r: Resolved) -> bool:
    """Whether the base CLIP is built with QuickGELU (tag config, ``-quickgelu`` model, local-dir config)."""
    if r.quick_gelu or model.endswith("-quickgelu"):
        return True
    if r.origin == "local_dir" and r.path:
        import json

        try:
            cfg = json.loads((Path(r.path) / "open_clip_config.json").read_text())
        except (OSError, ValueError):
            return False
        return bool((cfg.get("model_cfg") or {}).get("quick_gelu", False))
    return False


class _AlphaBackend(_Backend):
    def __init__(self, metric: "_RegionClipMetric", alpha: AlphaResolved):
        self.base = _BaseClip(metric)
        self.m = metric
        self.alpha = alpha
        self._bundle: AlphaClipBundle | None = None

    def available(self) -> str | None:
        r = self.base.resolved()
        if isinstance(r, str):
            return f"Alpha-CLIP needs its base CLIP (text tower and preprocessing): {r}"
        if self.alpha.origin == "file" and r.origin != "random" and not _quick_gelu(self.m.model_name, r):
            return (f"Alpha-CLIP checkpoints are fine-tuned from OpenAI CLIP (QuickGELU), but the base "
                    f"{self.m.model_name}/pretrained={self.m.pretrained!r} resolves without QuickGELU; "
                    f"use pretrained: openai (with weights_path for a local OpenAI checkpoint)")
        return None

    def weights(self) -> str:
        if self.alpha.origin == "random":
            vis = (f"Alpha-CLIP {self.m.model_name}: {RANDOM_WEIGHTS_TEXT} conv1_alpha (seeded), "
                   f"visual tower of the base")
        else:
            vis = f"{self.alpha.where} (visual tower + conv1_alpha)"
        return f"{vis}; base CLIP (text tower): {self.base.where()}"

    def rule(self) -> str:
        return "Alpha-CLIP, alpha = region mask normalised (m - 0.5) / 0.26"

    def load(self) -> None:
        if self._bundle is not None:
            return
        reason = self.available()
        if reason:
            raise MetricUnavailable(reason)
        m = self.m
        self._bundle = load_alpha_clip(m.model_name, m.pretrained, m.weights_path, self.alpha, m.device_param,
                                       m.allow_random)

    @property
    def bundle(self) -> AlphaClipBundle:
        self.load()
        return self._bundle  # type: ignore[return-value]

    def embed_regions(self, images, masks, persist):
        if not images:
            return np.zeros((0, 0))
        return self.bundle.embed_regions(list(images), list(masks), self.m.batch_size, self.m.feature_cache_dir,
                                         [persist] * len(images))

    def embed_texts(self, texts):
        if not texts:
            return np.zeros((0, 0))
        return self.bundle.base.embed_texts(list(texts), self.m.batch_size, self.m.feature_cache_dir)


class _Unavailable(_Backend):
    def __init__(self, metric: "_RegionClipMetric", reason: str):
        self.m = metric
        self.reason = reason

    def available(self) -> str | None:
        return self.reason

    def weights(self) -> str:
        return f"Alpha-CLIP {self.m.model_name}; weights unavailable"

    def rule(self) -> str:
        return "Alpha-CLIP, alpha = region mask normalised (m - 0.5) / 0.26"

    def load(self) -> None:
        raise MetricUnavailable(self.reason)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


class _RegionClipMetric(Metric):
    """The PartEdit fg/bg/avg rows over a backend (see module doc)."""

    higher_is_better: ClassVar[bool] = True
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ("source",)
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow", "torch", "torchvision", "open_clip_torch")
    param_defaults: ClassVar[dict[str, Any]] = {**COMMON_DEFAULTS, **MASKED_DEFAULTS}

    def __init__(
        self,
        *,
        protocol: str = "default",
        name: str | None = None,
        reference: str | None = None,  # suite common keys: accepted and ignored (module doc)
        regions: Sequence[str] | None = None,
        region_rule: str | None = None,
        **params: Any,
    ):
        super().__init__(protocol=protocol, name=name, **params)
        p = self.params
        self.model_name = str(p["model"])
        self.pretrained = None if p["pretrained"] in (None, "", "none", "None") else str(p["pretrained"])
        self.read_model_params()
        tf = p["text_field"]
        self.text_fields = (tf,) if isinstance(tf, str) else tuple(str(f) for f in tf)
        bad = [f for f in self.text_fields if f not in TEXT_FIELDS]
        if bad or not self.text_fields:
            raise ValueError(f"metric '{self.name}': text_field must be one of {', '.join(TEXT_FIELDS)} (or a list "
                             f"of them, tried in order), got {tf!r}")
        self.feature_cache_dir = p["feature_cache_dir"]
        self.fill = parse_fill(p["fill"])
        self.fill_name = p["fill"] if isinstance(p["fill"], str) else "rgb"
        self.crop = str(p["crop"])
        if self.crop not in CROPS:
            raise ValueError(f"metric '{self.name}': crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        self._backend: _Backend | None = None

    # -- rows -----------------------------------------------------------------------------
    @property
    def fg_name(self) -> str:
        return f"{self.name}_fg"

    @property
    def bg_name(self) -> str:
        return f"{self.name}_bg"

    @property
    def avg_name(self) -> str:
        return f"{self.name}_avg"

    def regions(self) -> tuple[str, ...]:
        return ("edited", "unedited", "all")

    def output_rows(self) -> list[tuple[str, str]]:
        return [(self.fg_name, "edited"), (self.bg_name, "unedited"), (self.avg_name, "all")]

    # -- description ----------------------------------------------------------------------
    def make_backend(self) -> _Backend:
        raise NotImplementedError

    @property
    def backend(self) -> _Backend:
        if self._backend is None:
            self._backend = self.make_backend()
        return self._backend

    def available(self) -> str | None:
        return self.backend.available()

    def weights(self) -> str:
        return self.backend.weights()

    def precision(self) -> str | None:
        return "fp32"

    def value_rule(self) -> str:
        s = "100*cos" if self.scale == 100 else ("cos" if self.scale == 1 else f"{self.scale:g}*cos")
        return f"{s}, no clamp"

    def region_rule(self) -> str:
        text = " | ".join(self.text_fields)
        return (f"{self.fg_name} (edited): edit with region = mask vs {text}; "
                f"{self.bg_name} (unedited): source vs edit, both with region = 1 - mask; "
                f"{self.avg_name} (all): mean of fg and bg per edit; {self.backend.rule()}; {self.value_rule()}")

    def load(self) -> None:
        self.backend.load()

    # -- scoring --------------------------------------------------------------------------
    def pick_text(self, sample: Sample) -> tuple[str | None, str | None]:
        """(prompt, flag): the first present of ``text_fields``; a later one flags ``text:<field>``."""
        for k, f in enumerate(self.text_fields):
            t = getattr(sample, f)
            if t is not None and str(t).strip():
                return str(t), (None if k == 0 else f"text:{f}")
        return None, f"missing:{self.text_fields[0]}"

    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        nan = math.nan
        fg: list[tuple[float, str | None]] = [(nan, None)] * len(items)
        bg: list[tuple[float, str | None]] = [(nan, None)] * len(items)
        fg_jobs: list[tuple[int, np.ndarray, np.ndarray, str, str | None]] = []
        bg_jobs: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for i, it in enumerate(items):
            s = it.sample
            edit = np.asarray(it.edit)
            src = np.asarray(s.source)
            if s.mask is None:
                fg[i] = bg[i] = (nan, "no_mask")
                continue
            m_src = resize_mask_like(s.mask, src.shape[:2])
            m_edit = resize_mask_like(s.mask, edit.shape[:2])
            text, tflag = self.pick_text(s)
            flag = region_flag(m_edit)
            if flag:
                fg[i] = (nan, flag)
            elif text is None:
                fg[i] = (nan, tflag)
            else:
                fg_jobs.append((i, edit, m_edit, text, tflag))
            u_src, u_edit = ~m_src, ~m_edit
            flag = region_flag(u_src) or region_flag(u_edit)
            if flag:
                bg[i] = (nan, flag)
            else:
                bg_jobs.append((i, src, u_src, edit, u_edit))
        if fg_jobs:
            img = self.backend.embed_regions([j[1] for j in fg_jobs], [j[2] for j in fg_jobs], persist=False)
            txt = self.backend.embed_texts([j[3] for j in fg_jobs])
            for k, c in enumerate(_cosine(img, txt)):
                fg[fg_jobs[k][0]] = (self.scale * float(c), fg_jobs[k][4])
        if bg_jobs:
            e_src = self.backend.embed_regions([j[1] for j in bg_jobs], [j[2] for j in bg_jobs], persist=True)
            e_edit = self.backend.embed_regions([j[3] for j in bg_jobs], [j[4] for j in bg_jobs], persist=False)
            for k, c in enumerate(_cosine(e_src, e_edit)):
                bg[bg_jobs[k][0]] = (self.scale * float(c), None)
        out = []
        for (fv, ff), (bv, bf) in zip(fg, bg):
            if math.isnan(fv) or math.isnan(bv):
                avg = (nan, ff if math.isnan(fv) else bf)
            else:
                avg = ((fv + bv) / 2.0, ff or bf)
            out.append([
                ScoreValue(self.fg_name, "edited", fv, ff),
                ScoreValue(self.bg_name, "unedited", bv, bf),
                ScoreValue(self.avg_name, "all", avg[0], avg[1]),
            ])
        return out


@METRICS.register("masked_clip")
class MaskedClip(_RegionClipMetric):
    """STAND-IN for Alpha-CLIP: the PartEdit fg/bg/avg rows with plain CLIP on masked images. Higher is better.

    Rows ``<name>_fg`` (edited), ``<name>_bg`` (unedited), ``<name>_avg`` (all); see the module doc.
    Params: model (ViT-L-14), pretrained (openai), weights_path, allow_random_weights, device,
    batch_size (16), scale (100), text_field (target_caption, or a list tried in order),
    feature_cache_dir, fill (mean | black | white | [r, g, b]), crop (none | bbox).
    ``weights()`` always starts with ``STAND-IN for Alpha-CLIP``.
    """

    def make_backend(self) -> _Backend:
        return _MaskedBackend(self)


@METRICS.register("alpha_clip")
class AlphaClip(_RegionClipMetric):
    """Alpha-CLIP fg/bg/avg of the PartEdit protocol (module doc). Higher is better.

    Params: those of ``masked_clip`` plus ``alpha_weights_path`` (the Alpha-CLIP visual checkpoint,
    a file or a folder holding a released one for ``model``) and ``fallback`` (``none``: unavailable
    without the checkpoint; ``masked_clip``: run the labelled stand-in, which uses ``fill``/``crop``).
    Without the checkpoint and without fallback, ``allow_random_weights: true`` runs Alpha-CLIP on
    the base visual tower with a seeded random ``conv1_alpha`` (smoke run).
    """

    param_defaults: ClassVar[dict[str, Any]] = {**COMMON_DEFAULTS, **ALPHA_DEFAULTS, **MASKED_DEFAULTS}

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.alpha_weights_path = self.params["alpha_weights_path"]
        self.fallback = str(self.params["fallback"] or "none")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"metric '{self.name}': fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")

    def make_backend(self) -> _Backend:
        r = resolve_alpha_weights(self.model_name, self.alpha_weights_path)
        if isinstance(r, AlphaResolved):
            return _AlphaBackend(self, r)
        _, cause = alpha_weights_problem(self.model_name, self.alpha_weights_path)
        if self.fallback == "masked_clip":
            return _MaskedBackend(self, cause=f"Alpha-CLIP weights missing: {cause}")
        if self.allow_random:
            return _AlphaBackend(self, AlphaResolved("random", None, f"Alpha-CLIP {self.model_name}, {RANDOM_WEIGHTS_TEXT}"))
        return _Unavailable(self, r)
