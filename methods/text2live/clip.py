"""CLIP for Text2LIVE's losses, on open_clip: the image tower with gradients to its input, its
tokens for the structure loss, the text tower, the CLIP augmentations, and a tiny random-weight
model for smoke runs.

What the official ``models/clip_extractor.py`` (with its patched OpenAI CLIP, ``CLIP/clip/model.py``)
does, and how it is done here:

- **image embedding** of an image [1, 3, H, W] in [0, 1]: ``n_aug`` views (the whole image resized
  to the CLIP input size, then ``n_aug - 1`` random crops of 60-100 % of each side resized to that
  size), each through the CLIP augmentations (below), normalised with OpenAI's mean / std, through
  the image tower: [n_aug, D] raw (unnormalised) embeddings. Each call of the tower is one forward
  call of :class:`ClipImageTower` (counted by ``methods.diffusion.counting``).
- **structure tokens**: the image resized so its short side is the CLIP input size (long side at
  most 380 / 224 of it), normalised, through every transformer block but the last; the tokens
  (class token included) give the cosine self-similarity matrix of the structure loss.
- **positional embeddings** are interpolated (bicubic) when the patch grid differs from the
  model's (non-square views), as the official patched CLIP does (after DINO). The official code
  passes (width, height) where the interpolation expects (rows, columns), which transposes the
  grid of a non-square image; here rows follow the height. Square images (ZONE's set) never
  interpolate, so both agree there.
- **text embeddings**: raw ``encode_text`` outputs of every template-composed prompt.
- **relevancy maps** (the optional bootstrap term): Chefer et al.'s gradient-weighted attention
  rule on the image tower (:meth:`ClipExtractor.relevance`), the official ``ClipRelevancy``; the
  attention probabilities come from :func:`block_with_probs`, a written-out copy of open_clip's
  block that keeps them in the autograd graph.

The augmentations are torchvision's transforms with the official arguments (they run on tensors,
differentiably): horizontal flip p=0.5; with p=0.8 an affine of up to 15 degrees and 10 % shift;
a perspective distortion of scale 0.4 with p=0.5; with p=0.7 a colour jitter of 0.1 in
brightness, contrast, saturation and hue; greyscale with p=0.15; fill value of the affine and
perspective ``clip_affine_transform_fill`` (official 1: white).
"""
from __future__ import annotations

import math
import threading
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn
from torchvision.transforms import InterpolationMode

#: OpenAI CLIP's normalisation (the official ``ClipExtractor.clip_normalize``).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: The official code's CLIP input size (224, ViT-B/32's) and the two caps on the long side it
#: uses (380 for the structure tokens, 320 for the augmented views); kept as ratios of the
#: model's own input size so that the tiny model sees the same geometry.
OFFICIAL_INPUT_SIZE = 224
STRUCTURE_MAX_SIZE = 380
VIEWS_MAX_SIZE = 320
#: The crop scale range of the extra views (official ``augment_input``: uniform in [0.6, 1]).
VIEW_CROP_MIN = 0.6
#: The official code resized tensors with torchvision 0.11, whose tensor ``Resize`` did not
#: antialias (torchvision >= 0.17 does by default): kept off to compute what the official did.
ANTIALIAS = False

#: Tiny random-weight CLIP (backbone=tiny): open_clip's own CLIP class, ViT image tower and
#: causal text tower with OpenAI's tokenizer and vocabulary (49408 tokens, context 77), only
#: narrow and shallow; QuickGELU as OpenAI's models.
TINY_CLIP = dict(
    embed_dim=32,
    vision=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
    text=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
)
TINY_SEED = 0
TINY_REVISION = "tiny-random-open_clip-vit"

_TINY: dict[str, Any] = {}
_LOCK = threading.Lock()


def tiny_clip() -> tuple[Any, Any]:
    """(model, tokenizer): the tiny random-weight open_clip CLIP, built once per process with a
    seeded init inside ``fork_rng`` (identical in every process; the caller's RNG untouched)."""
    with _LOCK:
        if "model" not in _TINY:
            import open_clip
            from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TINY_SEED)
                model = CLIP(TINY_CLIP["embed_dim"], CLIPVisionCfg(**TINY_CLIP["vision"]),
                             CLIPTextCfg(**TINY_CLIP["text"]), quick_gelu=True)
            _TINY["model"] = model.eval().requires_grad_(False)
            _TINY["tokenizer"] = open_clip.get_tokenizer("ViT-B-32")  # OpenAI's BPE, shipped in open_clip
        return _TINY["model"], _TINY["tokenizer"]


def check_layout(model: Any, what: str) -> None:
    """Refuse a CLIP whose image tower is not a plain open_clip ViT with class-token pooling: the
    structure loss reads the tokens before the last block and the views need interpolated
    positional embeddings, which only that layout has here."""
    from open_clip.transformer import Transformer, VisionTransformer

    from open_clip.transformer import ResidualAttentionBlock

    v = getattr(model, "visual", None)
    if (type(v) is not VisionTransformer or v.attn_pool is not None or v.pool_type != "tok"
            or type(v.transformer) is not Transformer or len(v.transformer.resblocks) < 2
            or not all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                       and isinstance(b.attn, nn.MultiheadAttention) for b in v.transformer.resblocks)):
        raise ValueError(f"text2live: CLIP model {what} has no plain ViT image tower with class-token pooling "
                         f"(got {type(v).__name__}); Text2LIVE's structure loss needs one (use ViT-B-32, "
                         f"ViT-B-16 or ViT-L-14)")


def block_with_probs(blk: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``ResidualAttentionBlock`` forward on batch-first tokens [B, T, C], with its
    attention probabilities [B, heads, T, T] kept in the autograd graph (``nn.MultiheadAttention``
    does not return per-head probabilities with gradients): the relevancy maps need both. The
    same computation as the block (pre-norm attention, layer scale, pre-norm MLP), written out."""
    attn = blk.attn
    y = blk.ln_1(x)
    b, t, c = y.shape
    heads = attn.num_heads
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
    probs = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(c // heads), dim=-1)
    o = (probs @ v).transpose(1, 2).reshape(b, t, c)
    x = x + blk.ls_1(attn.out_proj(o))
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, probs


class ClipImageTower(nn.Module):
    """open_clip's ViT image tower with interpolated positional embeddings.

    ``forward(x)``: [B, 3, H, W] normalised images -> [B, D] raw embeddings;
    ``forward(x, mode="tokens")``: -> [B, T, width] tokens after every block but the last;
    ``forward(x, mode="probs")``: -> ([B, D] embeddings, every block's [B, heads, T, T] attention
    probabilities), for the relevancy maps.
    """

    def __init__(self, visual: Any):
        super().__init__()
        self.visual = visual

    @property
    def input_size(self) -> int:
        return int(self.visual.image_size[0])

    def positional(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The positional embedding for a ``grid_hw`` patch grid: the model's own, or its patch
        part resized bicubically (the class token's unchanged)."""
        v = self.visual
        pos = v.positional_embedding
        if tuple(grid_hw) == tuple(v.grid_size):
            return pos
        gh0, gw0 = v.grid_size
        patch = pos[1:].reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=tuple(grid_hw), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(grid_hw[0] * grid_hw[1], -1)
        return torch.cat([pos[:1], patch], dim=0)

    def forward(self, x: torch.Tensor, mode: str = "embed") -> Any:
        if mode not in ("embed", "tokens", "probs"):
            raise ValueError(f"ClipImageTower: mode must be embed, tokens or probs, got {mode!r}")
        v = self.visual
        t = v.conv1(x)  # [B, width, gh, gw]
        grid = (t.shape[2], t.shape[3])
        t = t.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(t.dtype).view(1, 1, -1).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1) + self.positional(grid).to(t.dtype)
        t = v.ln_pre(v.patch_dropout(t))
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", True)
        probs = []
        if mode == "probs":  # batch-first tokens through the written-out blocks
            for blk in blocks:
                t, p = block_with_probs(blk, t)
                probs.append(p)
        else:
            if not batch_first:
                t = t.transpose(0, 1)
            for blk in blocks[:-1]:
                t = blk(t)
            if mode == "tokens":
                return t if batch_first else t.transpose(0, 1)
            t = blocks[-1](t)
            if not batch_first:
                t = t.transpose(0, 1)
        pooled, _ = v._pool(t)
        emb = pooled @ v.proj if v.proj is not None else pooled
        return (emb, probs) if mode == "probs" else emb


class ClipTextTower(nn.Module):
    """``encode_text`` of a CLIP as its own module (so that its calls are counted apart)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def attn_cosine_sim(tokens: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[B, T, C] -> [B, T, T] cosine similarity of every pair of tokens (the official
    ``attn_cosine_sim``: the product of the norms clamped at ``eps``)."""
    norm = tokens.norm(dim=2, keepdim=True)
    factor = torch.clamp(norm @ norm.transpose(1, 2), min=eps)
    return (tokens @ tokens.transpose(1, 2)) / factor


class ClipExtractor:
    """Image embeddings of augmented views, structure tokens and text embeddings (see module doc)."""

    def __init__(self, model: Any, tokenizer: Any, n_aug: int, affine_fill: float, device: Any):
        self.image = ClipImageTower(model.visual)
        self.text = ClipTextTower(model)
        self.tokenizer = tokenizer
        self.device = device
        self.n_aug = int(n_aug)
        size = self.image.input_size
        self.input_size = size
        # the official caps on the long side, at the same ratio to this model's input size
        self.structure_max = int(round(STRUCTURE_MAX_SIZE * size / OFFICIAL_INPUT_SIZE))
        self.views_max = int(round(VIEWS_MAX_SIZE * size / OFFICIAL_INPUT_SIZE))
        self.normalize = T.Normalize(mean=OPENAI_MEAN, std=OPENAI_STD)
        fill = float(affine_fill)
        self.augs = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.RandomAffine(degrees=15, translate=(0.1, 0.1), fill=fill,
                                          interpolation=InterpolationMode.BILINEAR)], p=0.8),
            T.RandomPerspective(distortion_scale=0.4, p=0.5, interpolation=InterpolationMode.BILINEAR, fill=fill),
            T.RandomApply([T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1)], p=0.7),
            T.RandomGrayscale(p=0.15),
        ])

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """[1, 3, H, W] in [0, 1] -> [n_aug, 3, h, w] augmented views (official ``augment_input``;
        crop scales and positions from torch's global RNG, as there)."""
        first = T.Resize(self.input_size, max_size=self.views_max, antialias=ANTIALIAS)(x)
        h, w = first.shape[-2:]
        out = [self.augs(first)]
        side_y, side_x = x.shape[2:4]
        for _ in range(self.n_aug - 1):
            s = torch.zeros(1).uniform_(VIEW_CROP_MIN, 1).item()
            crop = T.RandomCrop(size=(int(side_y * s), int(side_x * s)))(x)
            crop = T.Resize((h, w), antialias=ANTIALIAS)(crop)
            out.append(self.augs(crop))
        return torch.cat(out)

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """[n_aug, D] raw CLIP embeddings of ``n_aug`` augmented views of ``x`` ([1, 3, H, W])."""
        return self.image(self.normalize(self.views(x)))

    def self_similarity(self, x: torch.Tensor) -> torch.Tensor:
        """[1, T, T] cosine self-similarity of the structure tokens of ``x`` ([1, 3, H, W])."""
        x = T.Resize(self.input_size, max_size=self.structure_max, antialias=ANTIALIAS)(x)
        return attn_cosine_sim(self.image(self.normalize(x), mode="tokens"))

    def relevance(self, x: torch.Tensor, text_e: torch.Tensor, start_layer: int) -> torch.Tensor:
        """[S, S] relevancy map in [0, 1] of ``x`` ([1, 3, h, w] in [0, 1]) for one text
        embedding ``text_e`` ([1, D]), S the CLIP input size: Chefer et al.'s rule for
        transformers (the official ``ClipRelevancy``, after Transformer-MM-Explainability).

        The image (resized to S x S) goes through the tower keeping every block's attention
        probabilities A; for the CLIP logit ``l = exp(logit_scale) * cos(E(x), text_e)`` and each
        block after ``start_layer`` (official ``relevancy_num_layers``), ``cam = mean over heads of
        max(0, dl/dA * A)`` and ``R <- R + cam @ R`` from ``R = I``; the class token's row of R over
        the patches, bilinearly upsampled to S x S and min-max normalised, is the map. No
        gradient leaves this function.
        """
        s = self.input_size
        x = self.normalize(T.Resize((s, s), antialias=ANTIALIAS)(x)).detach().requires_grad_(True)
        with torch.enable_grad():
            img_e, probs = self.image(x, mode="probs")
            logit = self.logit_scale * F.cosine_similarity(img_e, text_e.to(img_e.dtype)).sum()
            chosen = [p for i, p in enumerate(probs) if i > start_layer]
            grads = torch.autograd.grad(logit, chosen) if chosen else []
        n_tok = probs[0].shape[-1]
        rel = torch.eye(n_tok, dtype=img_e.dtype, device=img_e.device)
        for p, g in zip(chosen, grads):
            cam = (g * p).clamp(min=0).mean(dim=1)[0]  # [T, T]
            rel = rel + cam @ rel
        grid = self.image.visual.grid_size
        patch = rel[0, 1:].reshape(1, 1, grid[0], grid[1]).detach()
        patch = F.interpolate(patch, size=(s, s), mode="bilinear", align_corners=False)[0, 0]
        lo, hi = patch.min(), patch.max()
        # a constant map (no block counted, or no positive contribution) is all zeros, not 0/0
        return (patch - lo) / (hi - lo).clamp_min(1e-12)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.text.model.logit_scale.detach().exp()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), D] raw CLIP text embeddings (one tower call for the batch)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.text(tokens).float()
