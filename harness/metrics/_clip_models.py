"""Shared CLIP model loading and embedding for the CLIP metrics (``clip.py``), via open_clip.

Weights are resolved offline-first, in this order, without importing torch or open_clip (so a
suite whose scores are all cached never pays for that import, ~5-9 s):

  1. ``weights_path`` from the metric config:
       - a checkpoint file (``.pt``/``.pth``/``.bin``/``.safetensors``; OpenAI's JIT ``ViT-B-32.pt``
         works too), passed to open_clip as ``pretrained=<file>``;
       - a folder holding ``open_clip_config.json`` + weights (a downloaded HF repo snapshot such
         as ``timm/vit_base_patch32_clip_224.openai``), loaded as ``local-dir:<folder>``;
       - a folder holding one of the tag's weight files (``open_clip_model.safetensors``,
         ``open_clip_pytorch_model.bin``, or the basename of the tag's URL);
       - a Hugging Face hub cache folder (with ``models--org--name`` inside).
  2. files already on disk: the Hugging Face hub cache (``$HF_HUB_CACHE`` / ``$HF_HOME/hub``,
     default ``~/.cache/huggingface/hub``) for the tag's ``hf_hub`` repo, looked up with
     ``huggingface_hub.try_to_load_from_cache`` (never touches the network), then open_clip's
     URL cache ``~/.cache/clip/<file>``.
  3. only with ``EDIT_HARNESS_ALLOW_DOWNLOADS=1`` in the environment: open_clip downloads the tag.
  4. only with the metric param ``allow_random_weights: true``: random initial weights (a smoke
     run; ``weights()`` says ``RANDOM WEIGHTS (smoke run)``, and the init is seeded).
  Otherwise the metric is unavailable, with a reason naming the model, the tag and the fixes.

In the default mode open_clip is only ever given a local file or folder, so it cannot download.

OpenAI tags. open_clip 3.x builds ``ViT-B-32`` with nn.GELU even for ``pretrained='openai'``
(it only warns about the QuickGELU mismatch); OpenAI CLIP was trained with QuickGELU. We pass
``force_quick_gelu=True`` whenever the tag's config says ``quick_gelu`` so the network matches
OpenAI's ``clip.load`` (which MagicBrush and the torchmetrics/HF CLIP port use). The tag's
preprocessing (mean/std, bicubic, resize shortest side + centre crop) is forced too, because
open_clip only merges it when given the tag name, not a file. For ``openai`` tags that transform
equals OpenAI CLIP's ``_transform``: Resize(n_px, BICUBIC) on the PIL image, CenterCrop(n_px),
RGB, ToTensor, Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD).

Precision. ``precision="fp32"`` (default) runs the network in float32. ``"fp16"`` is what OpenAI's
``clip.load`` builds on a CUDA device (and so what MagicBrush's ``image_eval.py`` ran): conv,
linear and attention weights and the two projections in float16 (``convert_weights``), LayerNorm
computed in float32 and cast back, the image cast to float16 before the network; open_clip's
``precision="fp16"`` builds exactly that layout (``convert_weights_to_lp``, ``LayerNormFp32``).
Embeddings are returned as float32 either way. :func:`load_clip` builds fp16 on any device; the
metrics refuse fp16 off CUDA (``clip.py``).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import atomic_write
from ._feature_cache import image_hash
from .base import resolve_device

ALLOW_DOWNLOADS_ENV = "EDIT_HARNESS_ALLOW_DOWNLOADS"
RANDOM_WEIGHTS_TEXT = "RANDOM WEIGHTS (smoke run)"
HF_WEIGHTS_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
PRECISIONS = ("fp32", "fp16")

_MODELS: dict[tuple, "ClipBundle"] = {}
_LOCK = threading.Lock()


def downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOADS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------
# open_clip's pretrained-tag table without importing open_clip (whose __init__ imports torch)
# --------------------------------------------------------------------------------------------
_META_PKG = "_edit_harness_open_clip_meta"
_pretrained_mod: Any = None


def _pretrained_module():
    """open_clip's ``pretrained`` module; loaded torch-free when open_clip is not imported yet.

    The module only needs ``constants``/``version`` from its package and imports
    ``safetensors.torch`` optionally; we load it from open_clip's folder under a private package
    name (open_clip's ``__init__`` is not run) with ``safetensors.torch`` masked for the import.
    """
    global _pretrained_mod
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.pretrained")
    if _pretrained_mod is not None:
        return _pretrained_mod
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    with _LOCK:
        try:
            pkg = types.ModuleType(_META_PKG)
            pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
            sys.modules[_META_PKG] = pkg
            masked = "safetensors.torch" not in sys.modules
            if masked:
                sys.modules["safetensors.torch"] = None  # type: ignore[assignment]
            try:
                _pretrained_mod = importlib.import_module(_META_PKG + ".pretrained")
            finally:
                if masked:
                    sys.modules.pop("safetensors.torch", None)
        except Exception:  # an unexpected open_clip layout: fall back to the real import
            _pretrained_mod = importlib.import_module("open_clip.pretrained")
    return _pretrained_mod


def tag_config(model: str, pretrained: str | None) -> dict[str, Any]:
    """open_clip's config for (model, pretrained tag): url, hf_hub, quick_gelu, preprocessing."""
    if not pretrained:
        return {}
    mod = _pretrained_module()
    if mod is None:
        return {}
    return dict(mod.get_pretrained_cfg(model.replace("/", "-"), pretrained) or {})


# --------------------------------------------------------------------------------------------
# Weight resolution (torch-free)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where the weights come from: origin is file | local_dir | download | random."""

    origin: str
    path: str | None
    where: str  # human-readable source, for weights()
    quick_gelu: bool
    preprocess: tuple[tuple[str, Any], ...]  # tag preprocessing forced onto the transform


def _hf_cached(repo_file: str, cache_dir: str | None = None) -> str | None:
    """A locally cached file of an ``org/name/[filename]`` hf_hub entry, or None (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id, filename = os.path.split(repo_file)  # 'org/name/' -> default names; 'org/name/file'
    names = (filename,) if filename else HF_WEIGHTS_NAMES
    if filename.endswith((".bin", ".pth")):
        names = (filename[:-4] + ".safetensors", filename)
    for name in names:
        try:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        except Exception:
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _url_cache_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/clip"))


def resolve_weights(
    model: str, pretrained: str | None, weights_path: str | None = None, allow_random: bool = False
) -> Resolved | str:
    """The weights to load for (model, pretrained), or the reason there are none (see module doc)."""
    try:
        cfg = tag_config(model, pretrained)
    except Exception:
        cfg = {}
    if importlib.util.find_spec("open_clip") is None:
        return "CLIP metrics need the 'open_clip_torch' package: pip install 'open_clip_torch>=3.0'"
    qg = bool(cfg.get("quick_gelu", False))
    pp = tuple((k, cfg[k]) for k in PREPROCESS_KEYS if k in cfg)
    label = f"open_clip {model} / pretrained={pretrained!r}"
    url = cfg.get("url") or ""
    url_name = os.path.basename(url) if url else None

    if weights_path:
        p = Path(os.path.expanduser(str(weights_path)))
        if p.is_file():
            return Resolved("file", str(p), f"{label}, weights_path file {p}", qg, pp)
        if p.is_dir():
            if (p / "open_clip_config.json").is_file():
                # open_clip would silently build random weights from a config-only folder.
                if not any(any(p.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
                    return f"CLIP {label}: weights_path folder '{p}' has open_clip_config.json but no .safetensors/.bin/.pth weights"
                return Resolved("local_dir", str(p), f"open_clip local-dir {p} (weights_path)", False, ())
            for name in HF_WEIGHTS_NAMES + ((url_name,) if url_name else ()):
                if (p / name).is_file():
                    return Resolved("file", str(p / name), f"{label}, weights_path file {p / name}", qg, pp)
            if cfg.get("hf_hub"):
                hit = _hf_cached(cfg["hf_hub"], cache_dir=str(p))
                if hit:
                    return Resolved("file", hit, f"{label}, HF hub cache under weights_path {hit}", qg, pp)
            return (
                f"CLIP {label}: weights_path folder '{p}' holds no open_clip_config.json, none of "
                f"{', '.join(HF_WEIGHTS_NAMES + ((url_name,) if url_name else ()))}, and no HF hub cache of "
                f"{cfg.get('hf_hub') or '(no hf_hub entry for this tag)'}"
            )
        return f"CLIP {label}: weights_path '{p}' given in the metric config does not exist"

    if pretrained and not cfg and os.path.isfile(os.path.expanduser(pretrained)):
        f = os.path.expanduser(pretrained)
        return Resolved("file", f, f"open_clip {model}, pretrained file {f}", False, ())

    if cfg.get("hf_hub"):
        hit = _hf_cached(cfg["hf_hub"])
        if hit:
            return Resolved("file", hit, f"{label}, HF hub cache {hit}", qg, pp)
    if url_name and (_url_cache_dir() / url_name).is_file():
        f = _url_cache_dir() / url_name
        return Resolved("file", str(f), f"{label}, open_clip URL cache {f}", qg, pp)

    if pretrained and not cfg:
        known = "(none)"
        try:
            mod = _pretrained_module()
            known = ", ".join(mod.list_pretrained_tags_by_model(model.replace("/", "-"))) or "(none)"
        except Exception:
            pass
        unknown = f"CLIP: '{pretrained}' is not an open_clip pretrained tag of model '{model}' (known tags: {known}) nor a file"
        if allow_random:
            return Resolved("random", None, f"open_clip {model}, {RANDOM_WEIGHTS_TEXT}", qg, pp)
        return unknown
    if pretrained and downloads_allowed():
        return Resolved("download", None, f"{label}, downloaded by open_clip ({ALLOW_DOWNLOADS_ENV}=1)", qg, pp)
    if allow_random:
        return Resolved("random", None, f"open_clip {model}, {RANDOM_WEIGHTS_TEXT}", qg, pp)
    if not pretrained:
        return (
            f"CLIP open_clip {model}: no pretrained tag and no weights_path given; set pretrained=<tag> or "
            f"weights_path=<file>, or allow_random_weights: true for a smoke run"
        )

    hf = cfg.get("hf_hub") or ""
    places = []
    if hf:
        places.append(f"the Hugging Face hub cache entry {hf.rstrip('/')} (under $HF_HUB_CACHE or $HF_HOME/hub)")
    if url_name:
        places.append(f"{_url_cache_dir() / url_name}")
    return (
        f"CLIP {label}: weights not found locally (looked in {'; '.join(places) or 'no known location'}). "
        f"Provide them with the metric param weights_path=<checkpoint file, or a folder with the weights / "
        f"open_clip_config.json, or an HF hub cache folder>, or set {ALLOW_DOWNLOADS_ENV}=1 to let open_clip "
        f"download them, or set allow_random_weights: true for a smoke run with random weights"
    )


# --------------------------------------------------------------------------------------------
# Loaded model + embedding with a content-hash feature cache
# --------------------------------------------------------------------------------------------
class FeatureCache:
    """Embeddings keyed by (model key, kind, content sha1): in memory (LRU) and optionally on disk."""

    def __init__(self, max_items: int = 100_000):
        self.max_items = max_items
        self._mem: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, disk_dir: Path | None = None) -> np.ndarray | None:
        with self._lock:
            v = self._mem.get(key)
            if v is not None:
                self._mem.move_to_end(key)
                return v
        if disk_dir is not None:
            f = disk_dir / f"{key[1]}_{key[2]}.npy"
            if f.is_file():
                try:
                    v = np.load(f, allow_pickle=False)
                except (OSError, ValueError):
                    return None
                self.put(key, v)
                return v
        return None

    def put(self, key: tuple, value: np.ndarray, disk_dir: Path | None = None) -> None:
        value = np.asarray(value, dtype=np.float32)
        value.setflags(write=False)
        with self._lock:
            self._mem[key] = value
            self._mem.move_to_end(key)
            while len(self._mem) > self.max_items:
                self._mem.popitem(last=False)
        if disk_dir is not None:
            atomic_write(disk_dir / f"{key[1]}_{key[2]}.npy", lambda fh: np.save(fh, value))

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()

    def __len__(self) -> int:
        return len(self._mem)


FEATURES = FeatureCache()


def text_hash(text: str) -> str:
    return hashlib.sha1(("text|" + text).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Forward passes: the same numbers as encode_image / encode_text, with less work
# --------------------------------------------------------------------------------------------
# Both shortcuts are exact rearrangements of open_clip's forward (no approximation; they differ
# from encode_image / encode_text only by float32 rounding, ~1e-7, tested in test_metrics_clip.py),
# written by hand because open_clip has no such entry points. Any model outside the checked
# layout falls back to open_clip's own forward.

def _plain_block(blk: Any) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    return isinstance(blk, ResidualAttentionBlock) and not hasattr(blk, "ln_1_kv")


def _cls_only_layout(model: Any) -> bool:
    """A CLIP whose image embedding is ln_post(class token) @ proj after a plain transformer."""
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import Transformer, VisionTransformer

    v = getattr(model, "visual", None)
    return (type(model).encode_image in (CLIP.encode_image, CustomTextCLIP.encode_image)
            and type(v) is VisionTransformer and v.attn_pool is None and v.pool_type == "tok"
            and not v.output_tokens and type(v.transformer) is Transformer and v.transformer.batch_first
            and len(v.transformer.resblocks) > 0 and all(_plain_block(b) for b in v.transformer.resblocks)
            and not v.training)


def encode_image_cls(model: Any, x: Any) -> Any:
    """``model.encode_image(x)`` with the last block computed for the class token alone.

    The pooled output reads only the class token, and after the last attention nothing mixes
    tokens, so the last block needs the other tokens only as keys and values: its query,
    output projection and MLP run on one token instead of all (for ViT-B/32, 50 -> 1; about 7%
    of the network's FLOPs saved).
    """
    if not _cls_only_layout(model):
        return model.encode_image(x)
    v = model.visual
    t = v._embeds(x)
    blocks = v.transformer.resblocks
    for blk in blocks[:-1]:
        t = blk(t)
    last = blocks[-1]
    y = last.ln_1(t)
    h = t[:, :1] + last.ls_1(last.attention(q_x=y[:, :1], k_x=y, v_x=y))
    h = h + last.ls_2(last.mlp(last.ln_2(h)))
    pooled = v.ln_post(h[:, 0])  # LayerNorm is per token: same either side of the pooling
    return pooled @ v.proj if v.proj is not None else pooled


def _causal(mask: Any) -> bool:
    import torch

    n = mask.shape[-1]
    return mask.dim() == 2 and bool(torch.equal(torch.isinf(mask) & (mask < 0),
                                                torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)))


def encode_text_trimmed(model: Any, tokens: Any) -> Any:
    """``model.encode_text(tokens)`` run on the tokens up to the batch's last end-of-text token.

    The text tower is causal and its embedding is read at the end-of-text token, so the padding
    after it cannot change the result: a 12-token caption costs 12/77 of the full context.
    """
    import torch
    from open_clip.model import CLIP
    from open_clip.transformer import Transformer

    mask = getattr(model, "attn_mask", None)
    pool = getattr(model, "text_pool_type", None)
    if (type(model) is not CLIP or mask is None or pool not in ("argmax", "eos") or model.training
            or type(model.transformer) is not Transformer or not model.transformer.batch_first
            or not all(_plain_block(b) for b in model.transformer.resblocks) or not _causal(mask)):
        return model.encode_text(tokens)
    if pool == "argmax":
        idx = tokens.argmax(dim=-1)
    else:
        idx = (tokens == model.text_eos_id).int().argmax(dim=-1)
    n = int(idx.max()) + 1
    dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :n]).to(dtype) + model.positional_embedding[:n].to(dtype)
    x = model.transformer(x, attn_mask=mask[:n, :n])
    x = model.ln_final(x)[torch.arange(x.shape[0], device=x.device), idx]
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


@dataclasses.dataclass(eq=False)
class ClipBundle:
    """A loaded open_clip model with its eval transform and tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    resolved: Resolved
    key: str  # identifies weights + preprocessing + device (+ precision) for the feature cache
    precision: str = "fp32"

    @property
    def random(self) -> bool:
        return self.resolved.origin == "random"

    def _disk(self, cache_dir: str | os.PathLike | None) -> Path | None:
        # Random weights are never persisted (a different process could init differently).
        if not cache_dir or self.random:
            return None
        return Path(os.path.expanduser(str(cache_dir))) / self.key

    def _run(self, kind: str, inputs: Sequence[Any], hashes: Sequence[str], batch_size: int,
             cache_dir: str | os.PathLike | None, persist: Sequence[bool] | None) -> np.ndarray:
        import torch

        disk = self._disk(cache_dir)
        out: list[np.ndarray | None] = [None] * len(inputs)
        todo: dict[str, list[int]] = {}
        for i, h in enumerate(hashes):
            v = FEATURES.get((self.key, kind, h), disk if (persist is None or persist[i]) else None)
            if v is not None:
                out[i] = v
            else:
                todo.setdefault(h, []).append(i)
        order = list(todo)
        bs = max(1, int(batch_size))
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            first = [todo[h][0] for h in chunk]
            with torch.no_grad():
                if kind == "image":
                    from PIL import Image

                    x = torch.stack([self.preprocess(Image.fromarray(np.asarray(inputs[i]))) for i in first])
                    # fp16: the image enters the network in float16 (OpenAI's image.type(self.dtype)).
                    dtype = torch.float16 if self.precision == "fp16" else torch.float32
                    feats = encode_image_cls(self.model, x.to(self.device, dtype=dtype))
                else:
                    tok = self.tokenizer([str(inputs[i]) for i in first])
                    feats = encode_text_trimmed(self.model, tok.to(self.device))
            feats = feats.float().cpu().numpy()
            for j, h in enumerate(chunk):
                keep = persist is None or any(persist[i] for i in todo[h])
                FEATURES.put((self.key, kind, h), feats[j], disk if keep else None)
                for i in todo[h]:
                    out[i] = feats[j]
        return np.stack(out).astype(np.float64) if out else np.zeros((0, 0))

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 16,
                     cache_dir: str | os.PathLike | None = None, persist: Sequence[bool] | None = None) -> np.ndarray:
        """Raw (unnormalised) image embeddings, N x D float64, of RGB uint8 HxWx3 arrays."""
        for img in images:
            a = np.asarray(img)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise TypeError(f"expected an RGB uint8 HxWx3 image, got {a.dtype} {a.shape}")
        return self._run("image", images, [image_hash(im) for im in images], batch_size, cache_dir, persist)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 16,
                    cache_dir: str | os.PathLike | None = None) -> np.ndarray:
        """Raw (unnormalised) text embeddings, N x D float64."""
        return self._run("text", texts, [text_hash(t) for t in texts], batch_size, cache_dir, None)


def load_clip(
    model: str = "ViT-B-32",
    pretrained: str | None = "openai",
    weights_path: str | None = None,
    device: str = "auto",
    allow_random: bool = False,
    precision: str = "fp32",
) -> ClipBundle:
    """The open_clip model for these settings, loaded once per process (see module doc).

    Raises MetricUnavailable (from ``base``) with the resolution's reason when nothing is usable.
    """
    from .base import MetricUnavailable

    if precision not in PRECISIONS:
        raise ValueError(f"CLIP precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    r = resolve_weights(model, pretrained, weights_path, allow_random)
    if isinstance(r, str):
        raise MetricUnavailable(r)
    dev = resolve_device(str(device or "auto"))
    cache_key = (model, pretrained, r.origin, r.path, dev, precision)
    with _LOCK:
        if cache_key in _MODELS:
            return _MODELS[cache_key]
    import torch
    import open_clip

    pp = dict(r.preprocess)
    if r.origin == "local_dir":
        name = f"local-dir:{r.path}"
        net, _, preprocess = open_clip.create_model_and_transforms(name, precision=precision)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        kw: dict[str, Any] = dict(
            force_quick_gelu=r.quick_gelu,
            image_mean=pp.get("mean"),
            image_std=pp.get("std"),
            image_interpolation=pp.get("interpolation"),
            image_resize_mode=pp.get("resize_mode"),
            precision=precision,
        )
        if r.origin == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None, **kw)
        elif r.origin == "download":
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, **kw)
        else:
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=r.path, **kw)
        tokenizer = open_clip.get_tokenizer(model)
    net = net.eval().requires_grad_(False).to(dev)
    ident: tuple = (model, pretrained, r.origin, r.path, r.quick_gelu, r.preprocess, torch.device(dev).type)
    if precision != "fp32":  # fp32 keys unchanged: feature caches written before precision existed stay valid
        ident += (precision,)
    h = hashlib.sha1(repr(ident).encode()).hexdigest()[:16]
    bundle = ClipBundle(net, preprocess, tokenizer, dev, r, key=h, precision=precision)
    with _LOCK:
        return _MODELS.setdefault(cache_key, bundle)
