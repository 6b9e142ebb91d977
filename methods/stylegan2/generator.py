"""StyleGAN2 generator (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN",
CVPR 2020) in plain PyTorch, laid out as NVIDIA's ``stylegan2-ada-pytorch``
(``training/networks.py``: ``Generator``, ``MappingNetwork``, ``SynthesisNetwork``,
``SynthesisBlock``, ``SynthesisLayer``, ``ToRGBLayer``, ``FullyConnectedLayer``) so that its
``G_ema`` state dict loads key for key. Our own code; the formulas:

- mapping: ``z`` normalised by its second moment, ``num_layers`` equalised-lr fully connected
  layers (weight gain ``lr_multiplier / sqrt(fan_in)``, bias gain ``lr_multiplier``, leaky ReLU
  0.2 times sqrt(2)), broadcast to ``num_ws`` vectors; truncation ``w_avg + psi (w - w_avg)``.
- modulated convolution (paper eq. 1-3): ``w'_ijk = s_i w_ijk``, demodulated by
  ``1 / sqrt(sum_ik w'_ijk^2 + 1e-8)``; the up-sampling layers are a transposed convolution of
  stride 2 followed by the [1, 3, 3, 1] FIR filter with gain 4 (NVIDIA's fast path of
  ``conv2d_resample``; the tests check it against the reference path "zero-insert, filter,
  convolve with the flipped kernel"); noise ``noise_strength * noise`` added after the convolution; bias, leaky
  ReLU times sqrt(2), optional clamp (``conv_clamp``).
- skip architecture: each block's toRGB (modulated 1x1, no demodulation, style scaled by
  ``1 / sqrt(in_channels)``) added to the FIR-up-sampled image of the block before.
- ``w`` indices: block ``b`` uses ``num_conv + num_torgb`` consecutive vectors starting at the
  sum of the previous blocks' ``num_conv`` (a toRGB shares its vector with the next block's first
  conv): 18 vectors at 1024 px, 16 at 512, 14 at 256.

``upfirdn2d`` (NVIDIA's custom CUDA op) is :func:`upfirdn2d` here: zero insertion, padding and a
depthwise ``conv2d`` -- what NVIDIA's own ``_upfirdn2d_ref`` computes; no library ships it.

Checkpoints (:func:`load_generator`):

- ``.pt`` / ``.pth``: a ``torch.save`` of the ``G_ema`` state dict (or a dict holding it under
  ``G_ema`` / ``g_ema_nvidia`` / ``state_dict``), read with ``torch.load(weights_only=True)``. The
  architecture (z/w sizes, mapping depth, resolution, channels) is read off the tensor shapes;
  what the shapes do not carry (``conv_clamp``, the mapping's ``lr_multiplier``) comes from the
  caller (defaults: NVIDIA's, ``conv_clamp=None`` as the official FFHQ config-f conversions).
- ``.pkl``: NVIDIA's network snapshot, read by :class:`RestrictedUnpickler`. Their modules are
  pickled by ``torch_utils.persistence``, which stores each class's *source code* and re-executes
  it on load; we never do: the one reconstruction function is mapped to ours, which keeps only the
  recorded object state (parameters, buffers, sub-modules, ``init_kwargs``) and drops the source;
  ``dnnlib.EasyDict`` becomes a dict; tensors are rebuilt by torch's own rebuild functions, and a
  storage's bytes are read with ``torch.load(weights_only=True)``. Any other global in the file
  (``os.system`` ...) is refused with an error naming it. ``G_ema`` is then copied into our module
  (``conv_clamp`` and the mapping's ``lr_multiplier`` from its ``init_kwargs``).
- rosinality's ``stylegan2-pytorch`` layout (``g_ema`` with ``style.N`` / ``convs.N`` /
  ``to_rgbs.N`` keys, e.g. ``stylegan2-ffhq-config-f.pt``; also the ``decoder.*`` generator inside
  UserControllableLT's checkpoints) is renamed to NVIDIA's (:func:`rosinality_to_nvidia`): the two
  implementations compute the same network (equalised-lr mapping with lr multiplier 0.01, modulated
  3x3 convolutions whose transposed up-sampling is followed by the same [1, 3, 3, 1] blur, noise
  ``weight * noise`` before the biased leaky ReLU, toRGB with the skip up-sampled by the same FIR
  filter, the same w indices); the one numerical difference is where demodulation's 1e-8 sits
  (rosinality scales the kernel by ``1 / sqrt(fan_in)`` before it), a relative change far below
  float32 rounding for real weights. ``w_avg`` is the checkpoint's ``latent_avg`` when it has one,
  else the mean ``w`` of 10000 mapped normal ``z`` (seed 0).
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)
LRELU_SLOPE = 0.2
RESAMPLE_KERNEL = (1.0, 3.0, 3.0, 1.0)


# ------------------------------------------------------------------------------------------------
# FIR resampling (NVIDIA's upfirdn2d, reference semantics)
# ------------------------------------------------------------------------------------------------
def setup_filter(taps: tuple[float, ...] = RESAMPLE_KERNEL) -> torch.Tensor:
    """The 2-D FIR filter of a 1-D kernel: outer product, normalised to sum 1 (NVIDIA's
    ``setup_filter`` for a 4-tap kernel, which it keeps non-separable)."""
    f = torch.tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1,
              padding: tuple[int, int, int, int] = (0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Up-sample by zero insertion (``up``), pad (``padding`` = x0, x1, y0, y1; negative crops),
    convolve every channel with the 2-D filter ``f`` times ``gain`` (a true convolution: the
    filter is flipped before the correlation), keep every ``down``-th pixel."""
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    px0, px1, py0, py1 = padding
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    k = (f * gain).flip([0, 1]).to(x.dtype)
    k = k[None, None].repeat(c, 1, 1, 1)
    x = F.conv2d(x, k, groups=c)
    return x[:, :, ::down, ::down]


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """FIR up-sampling by ``up`` keeping the image's alignment (NVIDIA ``upsample2d``)."""
    fw = f.shape[-1]
    p0, p1 = (fw + up - 1) // 2, (fw - up) // 2
    return upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up * up)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True,
                     up: int = 1, padding: int = 0, resample_filter: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """StyleGAN2's modulated convolution (grouped over the batch): ``weight`` [O, I, k, k] scaled
    by ``styles`` [B, I] per input channel, demodulated per output channel; ``up=2`` is the
    transposed-convolution-plus-FIR path (zero insertion, filter with gain 4, flipped kernel)."""
    b = x.shape[0]
    o, i, kh, kw = weight.shape
    w = weight[None] * styles[:, None, :, None, None]  # [B, O, I, k, k]
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    w = w.reshape(b * o, i, kh, kw)
    x = x.reshape(1, b * i, *x.shape[2:])
    if up > 1:
        # NVIDIA's fast path of conv2d_resample: a transposed convolution of stride ``up`` (4x fewer
        # multiply-adds than convolving the zero-inserted image), then the FIR filter (gain up^2)
        assert resample_filter is not None
        fw = resample_filter.shape[-1]
        p0 = padding + (fw + up - 1) // 2 - (kw - 1)
        p1 = padding + (fw - up) // 2 - (kw - up)
        wt = w.reshape(b, o, i, kh, kw).transpose(1, 2).reshape(b * i, o, kh, kw)
        x = F.conv_transpose2d(x, wt, stride=up, groups=b)
        x = upfirdn2d(x, resample_filter, padding=(p0, p1, p0, p1), gain=up * up)
    else:
        x = F.conv2d(x, w, padding=padding, groups=b)
    x = x.reshape(b, o, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x


def bias_act(x: torch.Tensor, b: torch.Tensor, act: str, gain: float | None = None,
             clamp: float | None = None) -> torch.Tensor:
    """Bias, activation (``linear`` or leaky ReLU 0.2 with default gain sqrt(2)), clamp."""
    x = x + b.reshape([1, -1] + [1] * (x.ndim - 2)).to(x.dtype)
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE) * (SQRT2 if gain is None else gain)
    elif gain is not None and gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


# ------------------------------------------------------------------------------------------------
# Layers (names as NVIDIA's)
# ------------------------------------------------------------------------------------------------
class FullyConnectedLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_multiplier: float = 1.0,
                 activation: str = "linear") -> None:
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = self.bias * self.bias_gain
        return bias_act(x.matmul(w.t()), b, self.activation)


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, num_ws: int, num_layers: int = 8, lr_multiplier: float = 0.01,
                 w_avg_beta: float = 0.995) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, w_dim, num_ws, num_layers
        feats = [z_dim] + [w_dim] * num_layers
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", FullyConnectedLayer(feats[idx], feats[idx + 1], activation="lrelu",
                                                          lr_multiplier=lr_multiplier))
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        x = x[:, None].repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            x = self.w_avg.lerp(x, truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: int = 1,
                 kernel_size: int = 3, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.up, self.resolution, self.conv_clamp = up, resolution, conv_clamp
        self.padding = kernel_size // 2
        self.register_buffer("resample_filter", setup_filter())
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        styles = self.affine(w)
        n = (self.noise_const if noise is None else noise) * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, demodulate=True, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, noise=n)
        return bias_act(x, self.bias, "lrelu", clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias, "linear", clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        self.register_buffer("resample_filter", setup_filter())
        self.num_conv = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_torgb = 1

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                noise: Mapping[str, torch.Tensor] | None = None, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        noise = noise or {}
        if self.in_channels == 0:
            x = self.const[None].repeat(ws.shape[0], 1, 1, 1)
            x = self.conv1(x, ws[:, 0], noise.get(prefix + "conv1"))
        else:
            assert x is not None
            x = self.conv0(x, ws[:, 0], noise.get(prefix + "conv0"))
            x = self.conv1(x, ws[:, 1], noise.get(prefix + "conv1"))
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        y = self.torgb(x, ws[:, self.num_conv])
        img = y if img is None else img + y
        return x, img


class SynthesisNetwork(nn.Module):
    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channels: Mapping[int, int],
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2 ** i for i in range(2, int(math.log2(img_resolution)) + 1)]
        self.num_ws = 0
        for res in self.block_resolutions:
            in_ch = channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_ch, channels[res], w_dim, res, img_channels, conv_clamp=conv_clamp)
            self.num_ws += block.num_conv
            if res == self.block_resolutions[-1]:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def block_ws(self, ws: torch.Tensor) -> list[torch.Tensor]:
        out, idx = [], 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            out.append(ws[:, idx: idx + block.num_conv + block.num_torgb])
            idx += block.num_conv
        return out

    def forward(self, ws: torch.Tensor, noise: Mapping[str, torch.Tensor] | None = None,
                return_features: bool = False) -> Any:
        x = img = None
        feats = []
        for res, cur in zip(self.block_resolutions, self.block_ws(ws)):
            x, img = getattr(self, f"b{res}")(x, img, cur, noise, prefix=f"b{res}.")
            feats.append(x)
        return (img, feats) if return_features else img

    def noise_layers(self) -> dict[str, SynthesisLayer]:
        """``"b<res>.conv<i>"`` -> layer, every layer with a noise input."""
        return {f"b{res}.{n}": getattr(getattr(self, f"b{res}"), n) for res in self.block_resolutions
                for n in ("conv0", "conv1") if hasattr(getattr(self, f"b{res}"), n)}


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """What defines the architecture (NVIDIA's init_kwargs, channels listed per resolution)."""

    z_dim: int = 512
    w_dim: int = 512
    img_resolution: int = 1024
    img_channels: int = 3
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    channels: tuple[int, ...] = (512, 512, 512, 512, 512, 256, 128, 64, 32)  # res 4, 8, ..., img_resolution
    conv_clamp: float | None = None

    def channels_dict(self) -> dict[int, int]:
        res = [2 ** i for i in range(2, int(math.log2(self.img_resolution)) + 1)]
        if len(res) != len(self.channels):
            raise ValueError(f"StyleGAN2 config: {len(self.channels)} channel counts for {len(res)} resolutions "
                             f"4..{self.img_resolution}")
        return dict(zip(res, self.channels))

    @staticmethod
    def nvidia(img_resolution: int, channel_base: int = 32768, channel_max: int = 512, **kw: Any) -> "GeneratorConfig":
        """NVIDIA's channel rule ``min(channel_base // res, channel_max)``."""
        res = [2 ** i for i in range(2, int(math.log2(img_resolution)) + 1)]
        return GeneratorConfig(img_resolution=img_resolution,
                               channels=tuple(min(channel_base // r, channel_max) for r in res), **kw)


#: random-weight tiny generator for tests and smoke runs: 32 px, w of 32, 4 synthesis blocks
TINY_CONFIG = GeneratorConfig(z_dim=32, w_dim=32, img_resolution=32, mapping_layers=2, channels=(32, 32, 16, 16))
TINY_SEED = 0
TINY_REVISION = "tiny-random-stylegan2"


class Generator(nn.Module):
    """``G(z)`` = ``synthesis(mapping(z))``; ``synthesis(ws, return_features=True)`` also returns
    every block's feature map (DragGAN's ``feat`` list: index 5 is the 128 px block)."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.z_dim, self.w_dim = config.z_dim, config.w_dim
        self.img_resolution, self.img_channels = config.img_resolution, config.img_channels
        self.synthesis = SynthesisNetwork(config.w_dim, config.img_resolution, config.img_channels,
                                          config.channels_dict(), conv_clamp=config.conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, self.num_ws, config.mapping_layers,
                                      config.mapping_lr_multiplier)

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, **kw: Any) -> Any:
        return self.synthesis(self.mapping(z, truncation_psi), **kw)


def tiny_generator(seed: int = TINY_SEED) -> Generator:
    """The random-weight tiny generator (deterministic in ``seed``); ``w_avg`` = the mean ``w``
    of 1000 ``z`` (what NVIDIA's training tracks), ``noise_strength`` 0.1 so that noise counts."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        G = Generator(TINY_CONFIG)
    with torch.no_grad():
        for layer in G.synthesis.noise_layers().values():
            layer.noise_strength.fill_(0.1)
        z = torch.randn(1000, TINY_CONFIG.z_dim, generator=g)
        G.mapping.w_avg.copy_(G.mapping(z)[:, 0].mean(0))
    return G.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A generator checkpoint that cannot be read as a StyleGAN2 (stylegan2-ada-pytorch) G_ema."""


def config_from_state_dict(sd: Mapping[str, torch.Tensor], *, conv_clamp: float | None = None,
                           mapping_lr_multiplier: float = 0.01, where: str = "state dict") -> GeneratorConfig:
    """The :class:`GeneratorConfig` whose parameters have the shapes of ``sd`` (NVIDIA key names)."""
    if any(k.startswith(("convs.", "to_rgbs.", "style.")) for k in sd):
        raise CheckpointError(f"{where}: rosinality's stylegan2-pytorch layout (convs.N, to_rgbs.N): rename it with "
                              "rosinality_to_nvidia first (load_generator does)")
    if "mapping.embed.weight" in sd:
        raise CheckpointError(f"{where}: a class-conditional generator (mapping.embed); only unconditional "
                              "generators (c_dim = 0) are supported")
    if "mapping.fc0.weight" not in sd or "synthesis.b4.const" not in sd:
        raise CheckpointError(f"{where}: no 'mapping.fc0.weight' / 'synthesis.b4.const': not a stylegan2-ada-pytorch "
                              f"G_ema state dict (first keys: {', '.join(list(sd)[:5])})")
    n_map = 0
    while f"mapping.fc{n_map}.weight" in sd:
        n_map += 1
    res = 4
    channels = []
    while f"synthesis.b{res}.conv1.weight" in sd:
        channels.append(int(sd[f"synthesis.b{res}.conv1.weight"].shape[0]))
        res *= 2
    return GeneratorConfig(z_dim=int(sd["mapping.fc0.weight"].shape[1]),
                           w_dim=int(sd[f"mapping.fc{n_map - 1}.weight"].shape[0]), img_resolution=res // 2,
                           img_channels=int(sd[f"synthesis.b{res // 2}.torgb.weight"].shape[0]), mapping_layers=n_map,
                           mapping_lr_multiplier=mapping_lr_multiplier, channels=tuple(channels), conv_clamp=conv_clamp)


def is_rosinality(sd: Mapping[str, Any]) -> bool:
    return "input.input" in sd and "conv1.conv.weight" in sd and "style.1.weight" in sd


def rosinality_to_nvidia(sd: Mapping[str, torch.Tensor], latent_avg: torch.Tensor | None = None,
                         where: str = "state dict") -> dict[str, torch.Tensor]:
    """rosinality's ``Generator`` state dict under NVIDIA's names (see the module docstring)."""
    if not is_rosinality(sd):
        raise CheckpointError(f"{where}: not a rosinality stylegan2-pytorch generator (no input.input / conv1 / style.1)")
    out: dict[str, torch.Tensor] = {}
    n_map = 0
    while f"style.{n_map + 1}.weight" in sd:
        out[f"mapping.fc{n_map}.weight"] = sd[f"style.{n_map + 1}.weight"]
        out[f"mapping.fc{n_map}.bias"] = sd[f"style.{n_map + 1}.bias"]
        n_map += 1
    f = setup_filter()

    def layer(dst: str, src: str, noise: str | None, res: int) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        out[f"{dst}.bias"] = sd[f"{src}.activate.bias"]
        out[f"{dst}.noise_strength"] = sd[f"{src}.noise.weight"].reshape([])
        n = sd.get(f"noises.{noise}") if noise else None
        out[f"{dst}.noise_const"] = (n.reshape(res, res) if n is not None
                                     else torch.randn([res, res], generator=torch.Generator().manual_seed(0)))
        out[f"{dst}.resample_filter"] = f.clone()

    def torgb(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(-1)

    out["synthesis.b4.const"] = sd["input.input"][0]
    out["synthesis.b4.resample_filter"] = f.clone()
    layer("synthesis.b4.conv1", "conv1", "noise_0", 4)
    torgb("synthesis.b4.torgb", "to_rgb1")
    i, res = 0, 8
    while f"convs.{2 * i}.conv.weight" in sd:
        b = f"synthesis.b{res}"
        out[f"{b}.resample_filter"] = f.clone()
        layer(f"{b}.conv0", f"convs.{2 * i}", f"noise_{2 * i + 1}", res)
        layer(f"{b}.conv1", f"convs.{2 * i + 1}", f"noise_{2 * i + 2}", res)
        torgb(f"{b}.torgb", f"to_rgbs.{i}")
        i, res = i + 1, res * 2
    if latent_avg is not None:
        out["mapping.w_avg"] = torch.as_tensor(latent_avg).reshape(-1, out["mapping.fc0.weight"].shape[0])[0]
    return out


def generator_from_state_dict(sd: Mapping[str, torch.Tensor], *, conv_clamp: float | None = None,
                              mapping_lr_multiplier: float = 0.01, where: str = "state dict") -> Generator:
    config = config_from_state_dict(sd, conv_clamp=conv_clamp, mapping_lr_multiplier=mapping_lr_multiplier,
                                    where=where)
    G = Generator(config)
    own = G.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{where}: keys do not match a StyleGAN2 G_ema of {config.img_resolution} px "
                              f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{where}: '{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    G.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in sd.items()})
    return G.eval().requires_grad_(False)


class _Persistent:
    """What a ``torch_utils.persistence`` object becomes: its class name and recorded state."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.class_name = meta.get("class_name")
        self.state = meta.get("state") or {}


def _reconstruct_persistent_obj(meta: Any) -> _Persistent:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("persistent object record of an unknown form")
    return _Persistent(meta)  # meta["module_src"] (source code) is deliberately never executed


class _EasyDict(dict):
    """What ``dnnlib.EasyDict`` (a dict subclass) becomes: a plain dict subclass without its code."""


def _storage_from_bytes(b: bytes) -> Any:
    return torch.load(io.BytesIO(b), weights_only=True)


class RestrictedUnpickler(pickle.Unpickler):
    """Reads NVIDIA network pickles without running code from them (see the module docstring)."""

    MAPPED = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("dnnlib", "EasyDict"): _EasyDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    }

    def find_class(self, module: str, name: str) -> Any:
        fn = self.MAPPED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a network pickle (only "
                                         f"stylegan2-ada-pytorch persistent modules, tensors and dicts are read)")
        return fn


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """A persistent module's parameters and buffers (recursively) as a flat state dict."""
    state = obj.state if isinstance(obj, _Persistent) else {}
    for group in ("_parameters", "_buffers"):
        for k, v in (state.get(group) or {}).items():
            if v is not None and k not in (state.get("_non_persistent_buffers_set") or set()):
                out[prefix + k] = torch.as_tensor(v.detach() if hasattr(v, "detach") else v)
    for k, m in (state.get("_modules") or {}).items():
        if isinstance(m, _Persistent):
            _flatten(m, f"{prefix}{k}.", out)


def read_pickle(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(``G_ema`` state dict, its ``init_kwargs``) from an NVIDIA network pickle."""
    with open(path, "rb") as f:
        data = RestrictedUnpickler(f).load()
    if not isinstance(data, dict) or not isinstance(data.get("G_ema"), _Persistent):
        raise CheckpointError(f"{path}: no 'G_ema' network in this pickle (keys: "
                              f"{', '.join(map(str, data)) if isinstance(data, dict) else type(data).__name__})")
    g = data["G_ema"]
    sd: dict[str, torch.Tensor] = {}
    _flatten(g, "", sd)
    return sd, dict(g.state.get("init_kwargs") or {})


def load_generator(path: str | os.PathLike, *, conv_clamp: float | None = None,
                   mapping_lr_multiplier: float = 0.01) -> Generator:
    """A user's StyleGAN2 checkpoint (see the module docstring) as our :class:`Generator`."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"StyleGAN2 generator checkpoint '{p}' does not exist")
    if p.suffix == ".pkl":
        sd, kwargs = read_pickle(p)
        syn = dict(kwargs.get("synthesis_kwargs") or {})
        mapk = dict(kwargs.get("mapping_kwargs") or {})
        if kwargs.get("c_dim"):
            raise CheckpointError(f"{p}: a class-conditional generator (c_dim={kwargs['c_dim']}); only "
                                  "unconditional generators are supported")
        return generator_from_state_dict(sd, conv_clamp=syn.get("conv_clamp", conv_clamp),
                                         mapping_lr_multiplier=mapk.get("lr_multiplier", mapping_lr_multiplier),
                                         where=str(p))
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file and the reason
        raise CheckpointError(f"{p}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{p}: expected a state dict, got {type(ckpt).__name__}")
    sd: Any = ckpt
    for key in ("G_ema", "g_ema", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    if any(k.startswith("decoder.") for k in sd):  # UserControllableLT / pSp-style: the generator is decoder.*
        sd = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    if is_rosinality(sd):
        sd = rosinality_to_nvidia(sd, ckpt.get("latent_avg"), where=str(p))
    if "mapping.w_avg" not in sd and "mapping.fc0.weight" in sd:
        w_dim = config_from_state_dict(sd, where=str(p)).w_dim
        G = generator_from_state_dict({**sd, "mapping.w_avg": torch.zeros(w_dim)}, conv_clamp=conv_clamp,
                                      mapping_lr_multiplier=mapping_lr_multiplier, where=str(p))
        with torch.no_grad():  # no recorded average: the mean w of 10000 normal z (seed 0)
            z = torch.randn(10000, G.z_dim, generator=torch.Generator().manual_seed(0))
            G.mapping.w_avg.copy_(G.mapping(z)[:, 0].mean(0))
        return G
    return generator_from_state_dict(sd, conv_clamp=conv_clamp, mapping_lr_multiplier=mapping_lr_multiplier,
                                     where=str(p))


def save_state_dict(G: Generator, path: str | os.PathLike) -> None:
    """``torch.save`` of ``G``'s state dict under NVIDIA's key names (what :func:`load_generator` reads)."""
    torch.save({"G_ema": G.state_dict()}, path)
