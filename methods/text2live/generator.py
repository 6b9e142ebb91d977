"""Text2LIVE's edit-layer generator: a U-Net with skip connections ("skip" of Deep Image Prior,
Ulyanov et al. 2018), as Text2LIVE's ``models/networks.py`` ``define_G`` builds it.

Architecture (official ``models/backbone/skip.py`` with ``define_G``'s arguments): 3 input
channels (the RGB image in [0, 1]), 4 output channels (edit RGB + opacity); ``num_scales`` levels,
each level

- a skip branch: 1x1 conv to ``n11`` channels, BatchNorm, LeakyReLU(0.2);
- a deeper branch: 3x3 conv with stride 2 to ``n33d`` channels, BN, LeakyReLU, 3x3 conv, BN,
  LeakyReLU, the next level (except at the deepest), bilinear 2x upsampling;
- the two concatenated (centre-cropped to the smaller size when they differ), BN, 3x3 conv to
  ``n33u`` channels, BN, LeakyReLU, 1x1 conv, BN (not at the top level), LeakyReLU;

then a 1x1 conv to 4 channels, a fixed colour-decorrelation matrix on the RGB channels and a
sigmoid. Every 3x3 conv pads by reflection, every conv has a bias.

Written here with torch.nn (no library ships this network); the layer order, widths and the
colour matrix are the official ones, the code is ours.
"""
from __future__ import annotations

import torch
from torch import nn

#: LeakyReLU slope of Deep Image Prior's ``act("LeakyReLU")``.
LEAKY_SLOPE = 0.2

# The square root of the RGB colour-correlation matrix's SVD (rows: R, G, B), the first column
# divided by 1.6 ("saturate, empirical"), then divided by its largest column norm: Text2LIVE's
# ``DecorrelatedColorsToRGB`` (models/backbone/common.py, after Lucid / aphantasia).
_COLOR_SVD_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
_INV_COLOR_SCALE = 1.6


def min_input_side(num_scales: int) -> int:
    """The smallest side the generator accepts: every stride-2 level halves the side (rounding
    up) and reflection padding needs a side of at least 2 at the deepest level's 3x3 convs, so
    the input needs at least ``2 ** num_scales + 1`` pixels a side."""
    return 2 ** int(num_scales) + 1


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Deep Image Prior's ``conv(..., pad="reflection")``: reflection padding then an unpadded conv."""
    pad = (kernel - 1) // 2
    layers: list[nn.Module] = [nn.ReflectionPad2d(pad)] if pad else []
    layers.append(nn.Conv2d(in_ch, out_ch, kernel, stride, padding=0, bias=True))
    return nn.Sequential(*layers)


def _act() -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)


class _Concat(nn.Module):
    """Runs each branch on the same input and concatenates along channels, centre-cropping every
    result to the smallest height and width (the upsampled deeper branch can be one pixel larger)."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        h = min(o.shape[2] for o in outs)
        w = min(o.shape[3] for o in outs)
        cropped = []
        for o in outs:
            dh, dw = (o.shape[2] - h) // 2, (o.shape[3] - w) // 2
            cropped.append(o[:, :, dh:dh + h, dw:dw + w])
        return torch.cat(cropped, dim=1)


class DecorrelatedColorsToRGB(nn.Module):
    """A fixed linear map from a decorrelated colour space to RGB on channels 0-2 (the opacity
    channel passes unchanged); followed by the sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        m = torch.tensor(_COLOR_SVD_SQRT, dtype=torch.float32)
        m = m / torch.tensor([_INV_COLOR_SCALE, 1.0, 1.0])
        m = m / m.norm(dim=0).max()
        self.register_buffer("colcorr_t", m.T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("nchw,cd->ndhw", x[:, :3], self.colcorr_t)
        return torch.cat([rgb, x[:, 3:]], dim=1)


def _level(i: int, in_ch: int, down: list[int], up: list[int], skip: list[int]) -> nn.Sequential:
    """Level ``i`` of the U-Net (and, recursively, every deeper one)."""
    last = len(down) - 1
    deeper = nn.Sequential(
        _conv(in_ch, down[i], 3, stride=2), nn.BatchNorm2d(down[i]), _act(),
        _conv(down[i], down[i], 3), nn.BatchNorm2d(down[i]), _act(),
    )
    if i < last:
        deeper.append(_level(i + 1, down[i], down, up, skip))
        k = up[i + 1]
    else:
        k = down[i]
    deeper.append(nn.Upsample(scale_factor=2, mode="bilinear"))
    layers: list[nn.Module] = []
    if skip[i]:
        branch = nn.Sequential(_conv(in_ch, skip[i], 1), nn.BatchNorm2d(skip[i]), _act())
        layers.append(_Concat(branch, deeper))
    else:
        layers.append(deeper)
    layers += [nn.BatchNorm2d(skip[i] + k), _conv(skip[i] + k, up[i], 3), nn.BatchNorm2d(up[i]), _act(),
               _conv(up[i], up[i], 1)]
    if i > 0:  # the official skip() has no BatchNorm after the top level's 1x1 conv
        layers.append(nn.BatchNorm2d(up[i]))
    layers.append(_act())
    return nn.Sequential(*layers)


class SkipGenerator(nn.Module):
    """Image [B, 3, H, W] in [0, 1] -> [B, 4, H, W] in (0, 1): edit RGB (channels 0-2) and
    opacity (channel 3). ``n33d`` / ``n33u`` / ``n11``: channels of every level's down, up and
    skip convolutions (official ``skip_n33d``, ``skip_n33u``, ``skip_n11``)."""

    def __init__(self, num_scales: int, n33d: int, n33u: int, n11: int):
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"SkipGenerator: num_scales must be >= 1, got {num_scales}")
        self.num_scales = int(num_scales)
        down, up, skip = [n33d] * num_scales, [n33u] * num_scales, [n11] * num_scales
        self.body = _level(0, 3, down, up, skip)
        self.head = nn.Sequential(_conv(up[0], 4, 1), DecorrelatedColorsToRGB(), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = min(x.shape[-2:])
        if side < min_input_side(self.num_scales):
            raise ValueError(f"SkipGenerator with {self.num_scales} scales needs images of at least "
                             f"{min_input_side(self.num_scales)} px a side, got {tuple(x.shape[-2:])}")
        return self.head(self.body(x))
