"""DINO metrics: ``dino`` (MagicBrush's DINO similarity) and ``structure_distance`` (PIE-Bench).

Both run a DINO ViT (Caron et al., ICCV 2021; ``facebookresearch/dino``) built with timm's
``VisionTransformer`` in DINO's exact architecture: class token, absolute position embedding that
includes the class token, ``qkv_bias=True``, ``LayerNorm(eps=1e-6)``, exact GELU, no pre-norm, no
fc-norm, no head (``num_classes=0``), no layer scale, no register tokens. timm's parameter names
are DINO's own (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.norm1``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1/fc2``,
``norm.*``), so the official ``torch.hub`` state dicts load with ``strict`` key matching; DINO's
pretrain checkpoints carry no head (their hub models are built with ``num_classes=0``). The
forward is written here (:class:`DinoBundle`) rather than timm's, to reproduce DINO's
``prepare_tokens``: the patch grid is flattened row-major and the position embedding is
interpolated DINO's way (bicubic with ``scale_factor = (grid + 0.1) / sqrt(N)``, DINO issue #8)
when the grid is not the trained square one; timm resamples by target size instead.

``dino`` (MagicBrush ``evaluation/image_eval.py``, ``eval_clip_i(metric='dino')``)
    ``torch.hub.load('facebookresearch/dino:main', 'dino_vits16')`` called on one image:
    ``model(x)`` = the CLS token after the final LayerNorm. Each image (the edit at ITS OWN size:
    MagicBrush resizes the edit to the ground truth only for L1/L2) goes through
    ``Resize(256, interpolation=3)`` (PIL bicubic, shorter side to 256, on the PIL image),
    ``CenterCrop(224)``, ``ToTensor``, ``Normalize`` (ImageNet mean/std). The value is the cosine
    of the two CLS embeddings (``1 - scipy.spatial.distance.cosine`` on float32 features; here in
    float64), times ``scale`` (default 1: MagicBrush reports the plain cosine, no x100, no clamp).
    ``reference``: ``target`` (MagicBrush's ground truth) or ``source``; a sample without the
    reference gives NaN flagged ``missing:<reference>``. Region ``all`` only; the suite's common
    ``regions``/``region_rule`` keys are accepted and ignored. Higher is better.

``structure_distance`` (PIE-Bench ``evaluation/matrics_calculator.py``)
    PIE-Bench's ``MetricsCalculator.calculate_structure_distance`` calls a copy of Splice's
    ``LossG.calculate_global_ssim_loss`` with DINO ViT-B/8 (``dino_vitb8``). What it does, step by
    step, and what we reproduce:

    - images: ``np.array(PIL image).astype(np.float32)``: float values in **[0, 255]** (it does
      NOT divide by 255; its PSNR/LPIPS/MSE/SSIM helpers do). Splice's original transform first
      maps its [-1, 1] images to [0, 1]; PIE-Bench's copy dropped that step, so the ImageNet
      normalisation runs on 0-255 values. ``pixel_max`` (default 255) reproduces that; 1 gives the
      Splice/DINO convention.
    - ``transforms.Resize(224, max_size=480)`` on the float tensor: the shorter side to 224
      (longer side ``int(224 * long / short)``, capped at 480), bilinear. PIE-Bench pins
      torchvision 0.13.1, where a TENSOR resize has no antialiasing (``antialias`` defaulted to
      False for tensors until torchvision 0.17): ``antialias`` (default False) reproduces it.
      A 512x512 PIE-Bench image becomes 224x224: 28x28 patches + CLS = 785 tokens.
    - ``transforms.Normalize`` with ImageNet mean/std.
    - keys of block ``layer_num=11`` (the last of 12): the output of ``blocks[11].attn.qkv``
      (captured by a forward hook there) reshaped to (tokens, 3, heads, head_dim), the key part,
      all tokens INCLUDING the CLS token, heads concatenated per token -> (T, heads*head_dim).
      Here the forward stops right after that linear layer (nothing later is needed).
    - self-similarity: cosine matrix ``K K^T / clamp(|k_i| |k_j|, min=1e-8)`` (T x T).
    - value: ``F.mse_loss`` of the edit's and the source's self-similarity matrices (mean over
      the T*T entries), float32 as in the script. Lower is better.
    - whole images: ``evaluate.py``'s ``structure_distance`` passes no masks (source vs edit).
      Its ``structure_distance_edit_part`` / ``_unedit_part`` variants multiply both 0-255 images
      by the mask (resp. 1 - mask) before the transform and give "nan" when that region is empty:
      ``image_region`` (``all`` default, ``edited``, ``unedited``, or a list) gives those as
      regions ``edited``/``unedited`` (no mask -> NaN ``no_mask``, empty -> NaN ``empty_region``).
      The suite's common ``regions``/``region_rule`` keys are accepted and ignored, so PIE-Bench's
      protocol (``regions: [unedited]`` for its background metrics) still gets the whole-image
      structure distance its table reports.
    - PIE-Bench's table prints structure distance x10^3: the protocol sets that (``report_scale:
      1000`` in ``conf/metrics/pie_bench.yaml``, or ``scale: 1000`` here); ``scale`` defaults to 1.
    - sizes: PIE-Bench asserts equal shapes (its edits are 512x512, the rightmost 512x512 crop of
      a wider output). Here an edit of another size is first resized to the reference's size
      (bicubic, the harness's rule, :func:`~harness.metrics.base.resize_like`), so both token
      grids match.

Weights (offline-first; resolution never imports torch, so cached reruns stay torch-free):
  1. ``weights_path``: a state dict file (DINO's ``dino_*_pretrain.pth``, a timm checkpoint
     ``.safetensors``/``.bin``/``.pth``, or a DINO training checkpoint whose ``teacher`` holds
     ``backbone.*``), or a folder holding one of those names or a Hugging Face hub cache;
  2. torch hub's cache: ``<torch.hub.get_dir()>/checkpoints/<official file name>`` (hub dir =
     ``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``), i.e. what
     ``torch.hub.load('facebookresearch/dino:main', '<model>')`` downloaded;
  3. the Hugging Face hub cache of timm's copy (``timm/vit_small_patch16_224.dino``, ...), looked
     up with ``huggingface_hub.try_to_load_from_cache`` (local files only; never a download);
  4. only with ``allow_random_weights: true``: seeded random weights (``weights()`` says
     ``RANDOM WEIGHTS (smoke run)``).
  Otherwise the metric is unavailable, with a reason naming the three ways to provide weights.
  No download is ever attempted.

Caching (per process): each network is loaded once per (model, weights, device). Features of
images that do not depend on the method are kept in memory keyed by the sha1 of the image bytes:
CLS embeddings (all images; they are tiny) for ``dino``, and for ``structure_distance`` the
reference's block-11 keys (T x D float32; the T x T self-similarity is a cheap product of them,
recomputed identically on use, and for non-square inputs the keys are the smaller of the two).
The key cache is bounded (``feature_cache_mb``, default 2048 MB: 700 PIE-Bench sources at 2.4 MB
each fit); once full it keeps what it has (``_feature_cache``: the right policy for sweeps that
scan the dataset in the same order for each method). Scoring a second method on the same dataset
runs the network on its edits only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from ..registry import METRICS
from ..types import Sample, ScoreValue
from ._clip_models import RANDOM_WEIGHTS_TEXT
from ._feature_cache import FeatureCache, image_hash
from .base import (
    REFERENCES,
    Metric,
    MetricUnavailable,
    ScoringItem,
    region_flag,
    resize_like,
    resize_mask_like,
    resolve_device,
)
from .perceptual import torch_hub_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_URL = "https://dl.fbaipublicfiles.com/dino"
HF_WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
SELF_SIM_EPS = 1e-8  # Splice's attn_cosine_sim clamp
IMAGE_REGIONS = ("all", "edited", "unedited")


@dataclasses.dataclass(frozen=True)
class DinoArch:
    """One DINO ViT of ``facebookresearch/dino``'s hubconf and its timm / HF counterparts."""

    name: str  # torch hub entry point
    label: str
    timm_name: str  # timm architecture with the same layout
    patch: int
    dim: int
    heads: int
    depth: int
    file: str  # the official checkpoint file (torch hub caches it under this name)

    @property
    def url(self) -> str:
        return f"{DINO_URL}/{self.file[:-4]}/{self.file}"

    @property
    def hf_repo(self) -> str:
        return f"timm/{self.timm_name}.dino"


# DINO's hubconf.py: vit_small = 384-d, 6 heads; vit_base = 768-d, 12 heads; 12 blocks each.
ARCHS: dict[str, DinoArch] = {
    a.name: a for a in (
        DinoArch("dino_vits16", "ViT-S/16", "vit_small_patch16_224", 16, 384, 6, 12, "dino_deitsmall16_pretrain.pth"),
        DinoArch("dino_vits8", "ViT-S/8", "vit_small_patch8_224", 8, 384, 6, 12, "dino_deitsmall8_pretrain.pth"),
        DinoArch("dino_vitb16", "ViT-B/16", "vit_base_patch16_224", 16, 768, 12, 12, "dino_vitbase16_pretrain.pth"),
        DinoArch("dino_vitb8", "ViT-B/8", "vit_base_patch8_224", 8, 768, 12, 12, "dino_vitbase8_pretrain.pth"),
    )
}

_MODELS: dict[tuple, "DinoBundle"] = {}
_LOCK = threading.Lock()


def arch_of(model: str) -> DinoArch:
    try:
        return ARCHS[str(model)]
    except KeyError:
        raise ValueError(f"unknown DINO model {model!r}; known: {', '.join(ARCHS)}") from None


# --------------------------------------------------------------------------------------------
# Weight resolution (torch-free)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where the weights come from: origin is file | torch_hub | hf_cache | random."""

    origin: str
    path: str | None
    where: str  # human-readable, for weights()


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (as huggingface_hub does at import)."""
    home = os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
    default = os.path.join(os.path.expanduser(home), "hub")
    return Path(os.path.expanduser(os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", default))))


def _hf_cached(repo_id: str, cache_dir: Path) -> str | None:
    """A cached weights file of ``repo_id`` under ``cache_dir``, or None (never touches the network)."""
    if not cache_dir.is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in HF_WEIGHTS_NAMES:
        try:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=str(cache_dir))
        except Exception:
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def resolve_weights(model: str, weights_path: str | None = None, allow_random: bool = False) -> Resolved | str:
    """The DINO weights to load for ``model``, or the reason there are none (see module doc)."""
    arch = arch_of(model)
    if importlib.util.find_spec("timm") is None:
        return "DINO metrics need the 'timm' package (it builds the ViT): pip install 'timm>=1.0'"
    label = f"DINO {arch.name} ({arch.label})"
    if weights_path:
        p = Path(os.path.expanduser(str(weights_path)))
        if p.is_file():
            return Resolved("file", str(p), f"{label}, weights_path file {p}")
        if p.is_dir():
            for name in (arch.file,) + HF_WEIGHTS_NAMES:
                if (p / name).is_file():
                    return Resolved("file", str(p / name), f"{label}, weights_path file {p / name}")
            hit = _hf_cached(arch.hf_repo, p)
            if hit:
                return Resolved("file", hit, f"{label}, HF hub cache under weights_path {hit}")
            return (f"{label}: weights_path folder '{p}' holds none of {', '.join((arch.file,) + HF_WEIGHTS_NAMES)} "
                    f"and no Hugging Face hub cache of {arch.hf_repo}")
        return f"{label}: weights_path '{p}' given in the metric config does not exist"

    hub_file = torch_hub_dir() / "checkpoints" / arch.file
    if hub_file.is_file():
        return Resolved("torch_hub", str(hub_file), f"{label}, torch hub cache {hub_file}")
    hf_dir = hf_hub_cache_dir()
    hit = _hf_cached(arch.hf_repo, hf_dir)
    if hit:
        return Resolved("hf_cache", hit, f"{label}, HF hub cache {hit}")
    if allow_random:
        return Resolved("random", None, f"{label}, {RANDOM_WEIGHTS_TEXT}")
    return (
        f"{label}: weights not found locally (no download is attempted). Provide them in one of three ways: "
        f"(1) the metric param weights_path=<file>: the official DINO state dict {arch.file} ({arch.url}), "
        f"or timm's model.safetensors of {arch.hf_repo}; "
        f"(2) put {arch.file} at {hub_file} (torch hub's cache, where "
        f"torch.hub.load('facebookresearch/dino:main', '{arch.name}') saves it; set TORCH_HOME to the folder "
        f"holding hub/checkpoints/); "
        f"(3) the Hugging Face hub cache of {arch.hf_repo} under {hf_dir} (HF_HUB_CACHE / HF_HOME/hub; e.g. "
        f"`huggingface-cli download {arch.hf_repo}` on a machine with access, then copy the cache). "
        f"Or set allow_random_weights: true for a smoke run with random weights (numbers meaningless)"
    )


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------
def dino_state_dict(obj: Any) -> dict[str, Any]:
    """The backbone state dict in DINO's (= timm's) key layout from a loaded checkpoint object.

    Accepts a plain state dict (DINO's ``*_pretrain.pth``, timm's files), one wrapped under
    ``state_dict``/``model``, or a DINO training checkpoint (``teacher`` with ``module.`` and
    ``backbone.`` prefixes and a ``head.*`` projection head, dropped as DINO's
    ``utils.load_pretrained_weights`` does).
    """
    if isinstance(obj, dict):
        for wrapper in ("teacher", "state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise TypeError(f"expected a state dict, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        k = str(k)
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head."):  # DINO's projection head / a classifier: not part of the backbone
            continue
        out[k] = v
    return out


def _read_checkpoint(path: str) -> Any:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
def dino_pos_embed(pos_embed: Any, height: int, width: int, patch: int) -> Any:
    """DINO's ``interpolate_pos_encoding`` for an input of ``height`` x ``width`` pixels.

    Written out because timm's resampling differs: DINO interpolates bicubically with a SCALE
    FACTOR of ``(grid + 0.1) / sqrt(N)`` (the 0.1 avoids a floating-point off-by-one, DINO issue
    #8), and keeps the trained embedding when the token count matches and the input is square.
    """
    import torch
    import torch.nn.functional as F

    n = pos_embed.shape[1] - 1
    gh, gw = height // patch, width // patch
    if gh * gw == n and height == width:
        return pos_embed
    dim = pos_embed.shape[-1]
    side = int(math.sqrt(n))
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / math.sqrt(n), (gw + 0.1) / math.sqrt(n)), mode="bicubic")
    if grid.shape[-2:] != (gh, gw):
        raise RuntimeError(f"DINO position embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(gh, gw)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def build_dino(arch: DinoArch) -> Any:
    """timm's VisionTransformer in DINO's architecture (random weights; see module doc)."""
    from functools import partial

    import timm
    import torch.nn as nn

    return timm.create_model(
        arch.timm_name, pretrained=False, num_classes=0, img_size=224, patch_size=arch.patch,
        embed_dim=arch.dim, depth=arch.depth, num_heads=arch.heads, mlp_ratio=4.0,
        qkv_bias=True, qk_norm=False, init_values=None, class_token=True, reg_tokens=0,
        no_embed_class=False, pre_norm=False, fc_norm=False, global_pool="token",
        dynamic_img_size=False, norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU,
        drop_rate=0.0, pos_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
    )


def _plain_timm_block(blk: Any) -> bool:
    """A timm ViT block whose attention is plain softmax attention over a packed qkv."""
    import torch.nn as nn
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    a = getattr(blk, "attn", None)
    return (type(blk) is Block and type(a) is Attention and getattr(a, "gate", None) is None
            and all(isinstance(getattr(a, m, None), nn.Identity) for m in ("q_norm", "k_norm", "norm"))
            and a.qkv.out_features == 3 * a.attn_dim)


@dataclasses.dataclass(eq=False)
class DinoBundle:
    """A loaded DINO ViT and the forward passes the metrics need."""

    net: Any
    arch: DinoArch
    device: str
    resolved: Resolved
    key: str  # identifies weights + device for the feature cache

    @property
    def random(self) -> bool:
        return self.resolved.origin == "random"

    def tokens(self, x: Any) -> Any:
        """DINO's ``prepare_tokens``: patch embedding (conv, row-major flatten), CLS, position embedding."""
        import torch

        net = self.net
        b, _, h, w = x.shape
        t = net.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([net.cls_token.expand(b, -1, -1), t], dim=1)
        return t + dino_pos_embed(net.pos_embed, h, w, self.arch.patch)

    def cls_full(self, x: Any) -> Any:
        """DINO's ``forward`` as written: every token through every block, then the CLS token, B x D."""
        t = self.tokens(x)
        for blk in self.net.blocks:
            t = blk(t)
        return self.net.norm(t)[:, 0]

    def cls(self, x: Any) -> Any:
        """:meth:`cls_full`'s numbers with the last block computed for the CLS token alone.

        Only the CLS token is read, and after the last attention nothing mixes tokens, so the
        other tokens are needed there only as keys and values: the last block's query, output
        projection and MLP run on one token instead of 197 (ViT-S/16; about 7% of the FLOPs).
        Exact up to float32 rounding (tested against :meth:`cls_full`); written by hand because
        timm's ``Attention`` takes no separate query. Other block layouts use :meth:`cls_full`.
        """
        import torch.nn.functional as F

        blocks = self.net.blocks
        last = blocks[-1]
        if self.net.training or not _plain_timm_block(last):
            return self.cls_full(x)
        t = self.tokens(x)
        for blk in blocks[:-1]:
            t = blk(t)
        attn = last.attn
        y = last.norm1(t)
        b, n, _ = y.shape
        heads, hd, dim = attn.num_heads, attn.head_dim, attn.attn_dim
        w, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(y[:, :1], w[:dim], None if bias is None else bias[:dim])
        kv = F.linear(y, w[dim:], None if bias is None else bias[dim:])
        q = q.reshape(b, 1, heads, hd).transpose(1, 2)
        k, v = kv.reshape(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, dim)
        h = t[:, :1] + last.ls1(attn.proj(o))
        h = h + last.ls2(last.mlp(last.norm2(h)))
        return self.net.norm(h)[:, 0]

    def keys(self, x: Any, layer: int) -> Any:
        """Block ``layer``'s attention keys, all tokens, heads concatenated: B x T x D.

        ``qkv`` is laid out (3, heads, head_dim) along its last axis (DINO's and timm's reshape),
        so the key slice ``[D:2D]`` is already the per-token concatenation of the heads' keys.
        """
        t = self.tokens(x)
        for blk in self.net.blocks[:layer]:
            t = blk(t)
        blk = self.net.blocks[layer]
        qkv = blk.attn.qkv(blk.norm1(t))
        d = qkv.shape[-1] // 3
        return qkv[..., d:2 * d]


def load_dino(model: str, weights_path: str | None = None, device: str = "auto", allow_random: bool = False) -> DinoBundle:
    """The DINO network for these settings, loaded once per process; MetricUnavailable if none."""
    arch = arch_of(model)
    r = resolve_weights(model, weights_path, allow_random)
    if isinstance(r, str):
        raise MetricUnavailable(r)
    dev = resolve_device(str(device or "auto"))
    cache_key = (arch.name, r.origin, r.path, dev)
    with _LOCK:
        if cache_key in _MODELS:
            return _MODELS[cache_key]
    import torch

    if r.origin == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = build_dino(arch)
    else:
        # Built on the meta device (no random init to throw away), then the checkpoint's tensors
        # are assigned in; the ViT has no buffers, so every tensor comes from the file.
        with torch.device("meta"):
            net = build_dino(arch)
        try:
            sd = dino_state_dict(_read_checkpoint(str(r.path)))
        except Exception as e:
            raise MetricUnavailable(f"DINO {arch.name}: cannot read weights file {r.path}: {e}") from e
        expected = net.state_dict()
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise MetricUnavailable(
                f"DINO {arch.name}: {r.path} is not a {arch.label} DINO state dict "
                f"(missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"unexpected keys: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''})")
        bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
               if tuple(sd[k].shape) != tuple(v.shape)]
        if bad:  # another architecture's weights
            raise MetricUnavailable(f"DINO {arch.name}: {r.path} does not fit {arch.label}: {'; '.join(bad[:3])}")
        sd = {k: v.float().contiguous() for k, v in sd.items()}
        net.load_state_dict(sd, strict=True, assign=True)
    net = net.eval().requires_grad_(False).to(dev)
    h = hashlib.sha1(repr((arch.name, r.origin, r.path, torch.device(dev).type)).encode()).hexdigest()[:16]
    bundle = DinoBundle(net, arch, dev, r, h)
    with _LOCK:
        return _MODELS.setdefault(cache_key, bundle)


# --------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------
def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.setflags(write=False)
    return a


CLS_FEATURES = FeatureCache(256 << 20)  # CLS embeddings: 1.5-3 KB each
KEY_FEATURES = FeatureCache(0)  # block keys of reference images; budget set by the metrics


def _check_rgb(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise TypeError(f"expected an RGB uint8 HxWx3 image, got {a.dtype} {a.shape}")
    return a


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------
def magicbrush_transform() -> Callable[[Any], Any]:
    """MagicBrush's DINO transform (torchvision, on PIL images): Resize(256, bicubic), CenterCrop(224),
    ToTensor, Normalize(ImageNet)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def splice_global_transform(x: Any, size: int = 224, max_size: int | None = 480, antialias: bool = False) -> Any:
    """PIE-Bench's copy of Splice's global transform on a float B x 3 x H x W batch:
    ``Resize(size, max_size)`` (bilinear; torchvision 0.13's tensor default: no antialias), then
    ImageNet ``Normalize``."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = TF.resize(x, size, interpolation=InterpolationMode.BILINEAR, max_size=max_size, antialias=antialias)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def key_self_similarity(keys: Any) -> Any:
    """Splice's ``attn_cosine_sim`` of B x T x D keys: B x T x T cosine matrix (norm product clamped at 1e-8)."""
    import torch

    norm = keys.norm(dim=-1, keepdim=True)
    factor = torch.clamp(norm @ norm.transpose(-1, -2), min=SELF_SIM_EPS)
    return (keys @ keys.transpose(-1, -2)) / factor


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
COMMON_DEFAULTS: dict[str, Any] = {
    "model": "dino_vits16",
    "weights_path": None,
    "allow_random_weights": False,
    "device": "auto",
    "batch_size": 16,
    "scale": 1.0,
}


class _DinoMetric(Metric):
    """Shared parameters, weight resolution and loading of the DINO metrics (see module doc)."""

    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ("source",)
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow", "torch", "torchvision", "timm")
    param_defaults: ClassVar[dict[str, Any]] = dict(COMMON_DEFAULTS)

    def __init__(
        self,
        *,
        protocol: str = "default",
        name: str | None = None,
        reference: str | None = None,
        regions: Sequence[str] | None = None,  # suite common key: ignored (module doc)
        region_rule: str | None = None,  # suite common key: ignored
        **params: Any,
    ):
        super().__init__(protocol=protocol, name=name, **params)
        p = self.params
        self.arch = arch_of(p["model"])
        self.read_model_params()
        self.reference = str(reference or "source")
        if self.reference not in REFERENCES:
            raise ValueError(f"metric '{self.name}': reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        self._resolved: Resolved | str | None = None
        self._bundle: DinoBundle | None = None

    # -- description ----------------------------------------------------------------------
    def resolved(self) -> Resolved | str:
        if self._resolved is None:
            self._resolved = resolve_weights(self.arch.name, self.weights_path, self.allow_random)
        return self._resolved

    def available(self) -> str | None:
        r = self.resolved()
        return r if isinstance(r, str) else None

    def weights(self) -> str:
        r = self.resolved()
        if isinstance(r, str):
            return f"DINO {self.arch.name} ({self.arch.label}); weights unavailable"
        return r.where

    def precision(self) -> str | None:
        return "fp32"  # MagicBrush and PIE-Bench run DINO in float32 (torch.hub model, no .half())

    def scale_text(self) -> str:
        return "" if self.scale == 1 else f", x{self.scale:g}"

    # -- model ----------------------------------------------------------------------------
    def load(self) -> None:
        if self._bundle is None:
            self._bundle = load_dino(self.arch.name, self.weights_path, self.device_param, self.allow_random)

    @property
    def bundle(self) -> DinoBundle:
        self.load()
        return self._bundle  # type: ignore[return-value]

    def reference_image(self, sample: Sample) -> np.ndarray | None:
        return sample.target if self.reference == "target" else sample.source


@METRICS.register("dino")
class Dino(_DinoMetric):
    """MagicBrush's DINO similarity: cos of DINO ViT-S/16 CLS embeddings, edit vs reference. Higher is better.

    Params: model (``dino_vits16``; also dino_vits8, dino_vitb16, dino_vitb8), weights_path (None),
    allow_random_weights (False), device (auto), batch_size (16), scale (1.0: plain cosine).
    ``reference`` (suite common key): source | target (MagicBrush: target).
    """

    higher_is_better: ClassVar[bool] = True

    def region_rule(self) -> str:
        return (f"whole image, edit vs {self.reference}; cos of DINO {self.arch.label} CLS (resize 256 bicubic, "
                f"centre crop 224, ImageNet normalize), no clamp{self.scale_text()}")

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """CLS embeddings (N x D float64) of RGB uint8 images, through MagicBrush's transform; cached by sha1."""
        import torch
        from PIL import Image

        bundle = self.bundle
        hashes = [image_hash(_check_rgb(im)) for im in images]
        out: dict[str, np.ndarray] = {}
        todo: dict[str, np.ndarray] = {}
        for h, im in zip(hashes, images):
            v = CLS_FEATURES.get((bundle.key, "cls", h))
            if v is not None:
                out[h] = v
            else:
                todo.setdefault(h, im)
        order = list(todo)
        transform = magicbrush_transform()
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            x = torch.stack([transform(Image.fromarray(np.asarray(todo[h]))) for h in chunk]).to(bundle.device)
            with torch.no_grad():
                feats = bundle.cls(x).float().cpu().numpy()
            for h, f in zip(chunk, feats):
                CLS_FEATURES.put((bundle.key, "cls", h), _frozen(f))
                out[h] = f
        if not hashes:
            return np.zeros((0, self.arch.dim))
        return np.stack([out[h] for h in hashes]).astype(np.float64)

    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        out: list[list[ScoreValue] | None] = [None] * len(items)
        idx, edits, refs = [], [], []
        for i, it in enumerate(items):
            ref = self.reference_image(it.sample)
            if ref is None:
                out[i] = self.nan_rows(f"missing:{self.reference}")
                continue
            idx.append(i)
            edits.append(np.asarray(it.edit))
            refs.append(np.asarray(ref))
        if idx:
            feats = self.embed(edits + refs)
            a, b = feats[:len(idx)], feats[len(idx):]
            cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
            for k, i in enumerate(idx):
                out[i] = [ScoreValue(self.name, "all", self.scale * float(cos[k]))]
        return out  # type: ignore[return-value]


def reference_model_and_transform(metric: Dino) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """The loaded network as MagicBrush's script calls it (``model(x)`` -> CLS, B x D) and its transform.

    For side-by-side checks (``benchmarks/bench_scoring.py``): the same weights, one image at a time.
    """
    bundle = metric.bundle

    def model(x: Any) -> Any:
        return bundle.cls_full(x.to(bundle.device))

    return model, magicbrush_transform()


@METRICS.register("structure_distance")
class StructureDistance(_DinoMetric):
    """PIE-Bench's structure distance: MSE of DINO ViT-B/8 block-11 key self-similarity. Lower is better.

    Params: model (``dino_vitb8``), weights_path (None), allow_random_weights (False), device (auto),
    batch_size (8), scale (1.0; PIE-Bench prints x1000, set by its protocol), layer (11), resize
    (224), max_size (480), pixel_max (255.0: PIE-Bench feeds 0-255 floats), antialias (False:
    torchvision 0.13's tensor resize), image_region (``all``; ``edited``/``unedited``/a list: the
    script's ``*_edit_part``/``*_unedit_part`` variants), feature_cache_mb (2048).
    ``reference`` (suite common key): source (PIE-Bench) | target.
    """

    higher_is_better: ClassVar[bool] = False
    param_defaults: ClassVar[dict[str, Any]] = {
        **COMMON_DEFAULTS, "model": "dino_vitb8", "batch_size": 8, "layer": 11, "resize": 224, "max_size": 480,
        "pixel_max": 255.0, "antialias": False, "image_region": "all", "feature_cache_mb": 2048,
    }

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        p = self.params
        self.layer = int(p["layer"])
        if not 0 <= self.layer < self.arch.depth:
            raise ValueError(f"metric '{self.name}': layer must be in 0..{self.arch.depth - 1}, got {self.layer}")
        self.resize = int(p["resize"])
        self.max_size = None if p["max_size"] in (None, "none", "None") else int(p["max_size"])
        if self.resize < self.arch.patch or (self.max_size is not None and self.max_size <= self.resize):
            raise ValueError(f"metric '{self.name}': need resize >= {self.arch.patch} and max_size > resize, "
                             f"got resize={self.resize}, max_size={self.max_size}")
        self.pixel_max = float(p["pixel_max"])
        if not self.pixel_max > 0:
            raise ValueError(f"metric '{self.name}': pixel_max must be > 0, got {self.pixel_max}")
        self.antialias = bool(p["antialias"])
        ir = p["image_region"]
        ir = (ir,) if isinstance(ir, str) else tuple(ir)
        bad = [r for r in ir if r not in IMAGE_REGIONS]
        if bad or not ir:
            raise ValueError(f"metric '{self.name}': image_region must be among {', '.join(IMAGE_REGIONS)} (or a list), "
                             f"got {p['image_region']!r}")
        self._regions = tuple(dict.fromkeys(ir))
        self.cache_bytes = int(float(p["feature_cache_mb"]) * (1 << 20))
        KEY_FEATURES.grow(self.cache_bytes)

    def regions(self) -> tuple[str, ...]:
        return self._regions

    def region_rule(self) -> str:
        parts = {"all": "whole image", "edited": "both images x mask (zero outside)",
                 "unedited": "both images x (1 - mask)"}
        size = f"{self.resize}" + (f" (max {self.max_size})" if self.max_size else "")
        return (f"{'; '.join(parts[r] for r in self._regions)}, edit vs {self.reference}: MSE of DINO {self.arch.label} "
                f"block-{self.layer} key self-similarity (PIE-Bench); input [0, {self.pixel_max:g}] floats, bilinear "
                f"resize {size}{'' if self.antialias else ' without antialias'}, ImageNet normalize{self.scale_text()}")

    def prep_key(self) -> tuple:
        """What, besides the network, determines the keys of an image."""
        return ("keys", self.layer, self.resize, self.max_size, self.pixel_max, self.antialias)

    def compute_keys(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> list[Any]:
        """Block keys (T x D float32 tensors on the device) of each (image, mask) pair, grouped by size in batches."""
        import torch

        bundle = self.bundle
        dev = bundle.device
        out: list[Any] = [None] * len(images)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape[:2]), []).append(i)
        for idx in by_shape.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                x = torch.from_numpy(np.stack([images[i] for i in chunk])).permute(0, 3, 1, 2).to(dev).float()
                if self.pixel_max != 255.0:
                    x = x / (255.0 / self.pixel_max)
                if any(masks[i] is not None for i in chunk):
                    m = np.stack([np.ones(images[i].shape[:2], bool) if masks[i] is None else masks[i] for i in chunk])
                    x = x * torch.from_numpy(m).to(dev).float()[:, None]
                x = splice_global_transform(x, self.resize, self.max_size, self.antialias)
                with torch.no_grad():
                    k = bundle.keys(x, self.layer).float()
                for j, i in enumerate(chunk):
                    out[i] = k[j]
        return out

    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        import torch
        import torch.nn.functional as F

        rows: list[dict[str, ScoreValue]] = [{} for _ in items]
        jobs: list[tuple[int, str, np.ndarray, np.ndarray, np.ndarray | None]] = []  # item, region, ref, edit, mask
        for i, it in enumerate(items):
            ref = self.reference_image(it.sample)
            if ref is None:
                for r in self._regions:
                    rows[i][r] = ScoreValue(self.name, r, math.nan, f"missing:{self.reference}")
                continue
            ref = _check_rgb(ref)
            edit = resize_like(_check_rgb(it.edit), ref.shape[:2])
            for r in self._regions:
                mask = None
                if r != "all":
                    if it.sample.mask is None:
                        rows[i][r] = ScoreValue(self.name, r, math.nan, "no_mask")
                        continue
                    m = resize_mask_like(it.sample.mask, ref.shape[:2])
                    mask = m if r == "edited" else ~m
                    flag = region_flag(mask)
                    if flag:
                        rows[i][r] = ScoreValue(self.name, r, math.nan, flag)
                        continue
                jobs.append((i, r, ref, edit, mask))
        if jobs:
            bundle = self.bundle
            pk = self.prep_key()
            # Reference keys: from the cache, else computed once per distinct (image, mask) and cached.
            # Edit keys are looked up too (an unchanged edit hits its source's entry) but not stored.
            needed: dict[str, tuple[np.ndarray, np.ndarray | None, bool]] = {}
            pairs: list[tuple[str, str]] = []
            for _, _, ref, edit, mask in jobs:
                hr, he = image_hash(ref, mask), image_hash(edit, mask)
                needed[hr] = (ref, mask, True)
                if he not in needed:
                    needed[he] = (edit, mask, False)
                pairs.append((hr, he))
            feats: dict[str, Any] = {}
            todo: list[str] = []
            for h in needed:
                v = KEY_FEATURES.get((bundle.key, pk, h))
                if v is not None:
                    feats[h] = torch.tensor(v, device=bundle.device)  # a copy: cached arrays are read-only
                else:
                    todo.append(h)
            computed = self.compute_keys([needed[h][0] for h in todo], [needed[h][1] for h in todo])
            for h, k in zip(todo, computed):
                feats[h] = k
                if needed[h][2]:
                    KEY_FEATURES.put((bundle.key, pk, h), _frozen(k.cpu().numpy()))
            with torch.no_grad():
                for (i, r, *_), (hr, he) in zip(jobs, pairs):
                    s_ref = key_self_similarity(feats[hr][None])
                    s_edit = key_self_similarity(feats[he][None])
                    mse = float(F.mse_loss(s_edit, s_ref))
                    rows[i][r] = ScoreValue(self.name, r, self.scale * mse)
        return [[d[r] for r in self._regions] for d in rows]
