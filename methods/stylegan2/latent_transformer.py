"""UserControllableLT's latent transformer (Endo, "User-Controllable Latent Transformer for StyleGAN
Image Layout Editing", Computer Graphics Forum / Pacific Graphics 2022), the architecture of the
official ``endo-yuki-t/UserControllableLT`` ``models/networks/latent_transformer.py``
(``Network``), written here with plain tensor ops; parameter names match the official module so
its checkpoint's ``encoder.*`` weights load as they are.

``forward(w, x, y, alpha)``:

- ``w`` [B, Q, 512]: the latent vectors to transform (the first Q = 6 of w+);
- ``x`` [B, T, 3]: one "flow" token per point: ``(dx, dy, dz)``, a unit drag direction and a zoom
  value for the dragged point, zeros for a stop point;
- ``y`` [B, T, C]: the generator's feature at each point (``C`` = 512 at the 64 px block);
- tokens ``relu(layer3([relu(layer1(x)), relu(layer2(y))]))`` pass a transformer encoder
  (pre-norm self-attention + GELU MLP, ``depth`` 6); queries ``relu(layer4(w))`` plus a learned
  position embedding pass a transformer decoder (self-attention, cross-attention to the encoded
  tokens, MLP; ``depth`` 6); ``w_hat = w + alpha * mlp_head(h)``.

So ``alpha = 0`` (no drag: the code's ``alpha = |d| / 10``) gives ``w_hat = w`` exactly, whatever
the weights; that is the property the architecture guarantees and the tests check.

Checkpoint: a ``torch.save`` dict (``{'state_dict': {...}, 'opts': {...}}`` as the official
``training/coach.py`` writes, or the bare state dict) read with ``torch.load(weights_only=True)``;
keys under ``encoder.`` are the transformer's (the official ``StyleGANControler.load_weights``).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class LatentTransformerConfig:
    dim: int = 512  # w size (the official code hard-codes 512)
    feature_channels: int = 512  # channels of the generator features (layer2's input)
    flow_dim: int = 3  # (dx, dy, dz)
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 512
    num_queries: int = 6  # the position embedding's length (target layers 0-5)


TINY_TRANSFORMER = dict(depth=1, heads=2, dim_head=8, mlp_dim=32, num_queries=6)
TINY_TRANSFORMER_SEED = 0


def _split_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    b, n, hd = t.shape
    return t.reshape(b, n, h, hd // h).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.fn(self.norm(x), **kw)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # indices 0 (Linear), 1 (GELU), 2 (Dropout), 3 (Linear), 4 (Dropout) as the official Sequential
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0)) if not (heads == 1 and dim_head == dim) \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        return self.to_out(_merge_heads(attn @ v))


class CrossAttention(nn.Module):
    """Queries from the first ``query_length`` tokens, keys and values from the rest (official)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0)) if not (heads == 1 and dim_head == dim) \
            else nn.Identity()

    def forward(self, x_qkv: torch.Tensor, query_length: int = 1) -> torch.Tensor:
        k = _split_heads(self.to_k(x_qkv)[:, query_length:], self.heads)
        v = _split_heads(self.to_v(x_qkv)[:, query_length:], self.heads)
        q = _split_heads(self.to_q(x_qkv)[:, :query_length], self.heads)
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        return self.to_out(_merge_heads(attn @ v))


class TransformerEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head)),
                                                    PreNorm(dim, FeedForward(dim, mlp_dim))]) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class TransformerDecoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, num_queries: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, num_queries, dim))
        self.layers = nn.ModuleList([nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head)),
                                                    PreNorm(dim, CrossAttention(dim, heads, dim_head)),
                                                    PreNorm(dim, FeedForward(dim, mlp_dim))]) for _ in range(depth)])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embedding[:, : x.shape[1]]
        for sattn, cattn, ff in self.layers:
            x = sattn(x) + x
            x = cattn(torch.cat((x, y), dim=1), query_length=x.shape[1]) + x
            x = ff(x) + x
        return x


class LatentTransformer(nn.Module):
    """The official ``latent_transformer.Network`` (see the module docstring)."""

    def __init__(self, config: LatentTransformerConfig = LatentTransformerConfig()) -> None:
        super().__init__()
        c = config
        self.config = c
        self.transformer_encoder = TransformerEncoder(c.dim, c.depth, c.heads, c.dim_head, c.mlp_dim)
        self.transformer_decoder = TransformerDecoder(c.dim, c.depth, c.heads, c.dim_head, c.mlp_dim, c.num_queries)
        self.layer1 = nn.Linear(c.flow_dim, c.dim // 2)
        self.layer2 = nn.Linear(c.feature_channels, c.dim // 2)
        self.layer3 = nn.Linear(c.dim, c.dim)
        self.layer4 = nn.Linear(c.dim, c.dim)
        self.mlp_head = nn.Sequential(nn.Linear(c.dim, c.dim))

    def forward(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
        xh = F.relu(self.layer1(x))
        yh = F.relu(self.layer2(y))
        tokens = self.transformer_encoder(F.relu(self.layer3(torch.cat([xh, yh], dim=2))))
        h = self.transformer_decoder(F.relu(self.layer4(w)), tokens)
        return w + alpha * self.mlp_head(h)


def tiny_transformer(w_dim: int, feature_channels: int, seed: int = TINY_TRANSFORMER_SEED) -> LatentTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        m = LatentTransformer(LatentTransformerConfig(dim=w_dim, feature_channels=feature_channels, **TINY_TRANSFORMER))
    return m.eval().requires_grad_(False)


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> LatentTransformerConfig:
    """Sizes read off the tensors (heads from the defaults: the shapes give heads x dim_head only)."""
    depth = 0
    while f"transformer_encoder.layers.{depth}.0.norm.weight" in sd:
        depth += 1
    dim = int(sd["layer4.weight"].shape[0])
    inner = int(sd["transformer_encoder.layers.0.0.fn.to_qkv.weight"].shape[0]) // 3
    heads = 8 if inner % 8 == 0 else 1
    return LatentTransformerConfig(dim=dim, feature_channels=int(sd["layer2.weight"].shape[1]),
                                   flow_dim=int(sd["layer1.weight"].shape[1]), depth=depth, heads=heads,
                                   dim_head=inner // heads,
                                   mlp_dim=int(sd["transformer_encoder.layers.0.1.fn.net.0.weight"].shape[0]),
                                   num_queries=int(sd["transformer_decoder.pos_embedding"].shape[1]))


def load_transformer(path: str | os.PathLike, heads: int | None = None) -> LatentTransformer:
    """The latent transformer from a user's checkpoint (see the module docstring)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"UserControllableLT checkpoint '{p}' does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - say which file and why
        raise ValueError(f"{p}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{p}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if "layer4.weight" not in sd or "transformer_decoder.pos_embedding" not in sd:
        raise ValueError(f"{p}: no UserControllableLT latent transformer weights ('encoder.layer4.weight', "
                         f"'encoder.transformer_decoder.pos_embedding'); first keys: {', '.join(list(sd)[:5])}")
    config = config_from_state_dict(sd)
    if heads is not None:
        inner = config.heads * config.dim_head
        config = dataclasses.replace(config, heads=heads, dim_head=inner // heads)
    m = LatentTransformer(config)
    m.load_state_dict(sd, strict=True)
    return m.eval().requires_grad_(False)
