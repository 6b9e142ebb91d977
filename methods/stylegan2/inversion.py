"""GAN inversion of a real image into a StyleGAN2 generator: the projector of NVIDIA's
``stylegan2-ada-pytorch`` (``projector.py``, ``project``) and, optionally, PTI's pivotal tuning
(Roich et al., "Pivotal Tuning for Latent-based Editing of Real Images", TOG 2022; official
``danielroich/PTI``: ``training/projectors/w_projector.py``, ``training/coaches/base_coach.py``,
``configs/hyperparameters.py``) -- DragGAN's README sends real images through PTI.

Projection (our code, the projector's schedule):

- start from ``w_avg`` (mean of the mapping of ``w_avg_samples`` normal ``z``; ``w_std`` their
  RMS distance to it); optimise one ``w`` (``space: w``, broadcast to every layer, as both official
  projectors) or every layer's vector (``space: w_plus``) with Adam (betas 0.9, 0.999), jointly
  with the generator's noise maps (re-drawn normal, renormalised to zero mean / unit variance after
  each step, penalised by the multi-scale autocorrelation term times ``noise_regularize``);
- per step ``t = i / steps``: latent noise ``w_std * initial_noise_factor * max(0, 1 - t /
  noise_ramp)^2`` added to ``w``; learning rate ``lr * rampdown * rampup`` with a cosine ramp-down
  over the last ``lr_rampdown`` and a linear ramp-up over the first ``lr_rampup`` fraction;
- loss: LPIPS VGG (the harness's LPIPS, :func:`harness.metrics.perceptual.load_lpips_model`, on
  images area-downsampled to at most 256 px as the projector does) plus ``pixel_weight`` times
  the mean squared error on [-1, 1] images. The official projector measures the distance with its
  own VGG16 TorchScript (``metrics/vgg16.pt``, LPIPS features without the learned weights); the
  LPIPS v0.1 VGG used here is the network PTI uses for the same purpose.
- as in both official projectors the optimised noise maps belong to a copy of the generator and
  are dropped: the result is ``w`` (the edit then synthesises with the generator's own noise).

Pivotal tuning (``tune_steps > 0``): the synthesis network is fine-tuned (Adam, ``tune_lr``) so
that ``G(w_pivot)`` matches the image under LPIPS + ``tune_l2_weight`` x MSE, stopping early when
LPIPS falls below ``tune_lpips_threshold`` (PTI: 350 steps, 3e-4, 1, 0.06). The tuned copy is
returned (the caller's generator is never modified).

Every network run is counted (:mod:`methods.diffusion.counting`): ``generator`` (synthesis),
``generator_mapping`` and ``lpips``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from .generator import Generator

SPACES = ("w", "w_plus")


@dataclasses.dataclass(frozen=True)
class ProjectorSettings:
    """Defaults: stylegan2-ada-pytorch ``projector.py`` ``project()`` keyword defaults."""

    steps: int = 1000  # num_steps
    space: Literal["w", "w_plus"] = "w"  # both official projectors optimise one w
    w_avg_samples: int = 10000  # w_avg_samples
    lr: float = 0.1  # initial_learning_rate
    initial_noise_factor: float = 0.05  # initial_noise_factor
    lr_rampdown: float = 0.25  # lr_rampdown_length
    lr_rampup: float = 0.05  # lr_rampup_length
    noise_ramp: float = 0.75  # noise_ramp_length
    noise_regularize: float = 1e5  # regularize_noise_weight
    pixel_weight: float = 0.0  # MSE weight (the ada projector: perceptual loss only)
    lpips_size: int = 256  # images larger than this are area-downsampled before LPIPS
    tune_steps: int = 0  # PTI max_pti_steps (350) when pivotal tuning is on
    tune_lr: float = 3e-4  # PTI pti_learning_rate
    tune_l2_weight: float = 1.0  # PTI pt_l2_lambda
    tune_lpips_threshold: float = 0.06  # PTI LPIPS_value_threshold


@dataclasses.dataclass
class Inversion:
    ws: torch.Tensor  # [1, num_ws, w_dim]
    generator: Generator  # the caller's generator, or the pivotally tuned copy
    history: list[float]  # projection loss per step
    tune_history: list[float]
    tuned: bool


def _lr_at(s: ProjectorSettings, t: float) -> float:
    ramp = min(1.0, (1.0 - t) / s.lr_rampdown) if s.lr_rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp = ramp * (min(1.0, t / s.lr_rampup) if s.lr_rampup > 0 else 1.0)
    return s.lr * ramp


def noise_regularization(noise: torch.Tensor) -> torch.Tensor:
    """The projector's noise penalty: squared autocorrelation at shift 1 (both axes) of the map
    and of its 2x average-pooled versions down to 8 px."""
    x = noise[None, None]
    reg = x.new_zeros(())
    while True:
        reg = reg + (x * torch.roll(x, shifts=1, dims=3)).mean() ** 2
        reg = reg + (x * torch.roll(x, shifts=1, dims=2)).mean() ** 2
        if x.shape[2] <= 8:
            return reg
        x = F.avg_pool2d(x, kernel_size=2)


def _for_lpips(img: torch.Tensor, size: int) -> torch.Tensor:
    if img.shape[-1] > size:
        img = F.interpolate(img, size=(size, size), mode="area")
    return img


def w_stats(G: Generator, samples: int, seed: int, device: Any) -> tuple[torch.Tensor, float]:
    """(``w_avg`` [1, 1, w_dim], ``w_std``) of ``samples`` mapped normal ``z`` (the projector's)."""
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(samples, G.z_dim, generator=gen).to(device)
    with torch.no_grad():
        w = G.mapping(z)[:, :1]
    w_avg = w.mean(0, keepdim=True)
    w_std = float(((w - w_avg).square().sum() / samples) ** 0.5)
    return w_avg, w_std


def project(G: Generator, target: torch.Tensor, lpips_model: Any, settings: ProjectorSettings, seed: int = 0,
            progress: Callable[[int, float], None] | None = None) -> Inversion:
    """Invert ``target`` ([1, 3, R, R] in [-1, 1], the generator's resolution) into ``G``."""
    s = settings
    device = target.device
    if target.shape[-2:] != (G.img_resolution, G.img_resolution):
        raise ValueError(f"projector: target is {tuple(target.shape[-2:])}, the generator makes "
                         f"{G.img_resolution} x {G.img_resolution}")
    gen = torch.Generator().manual_seed(int(seed))
    w_avg, w_std = w_stats(G, s.w_avg_samples, seed, device)
    Gp = copy.deepcopy(G).eval().requires_grad_(False)  # its noise maps are optimised and dropped
    noise_bufs = [layer.noise_const for layer in Gp.synthesis.noise_layers().values()]
    with torch.no_grad():
        for buf in noise_bufs:
            buf.copy_(torch.randn(buf.shape, generator=gen).to(device))
    for buf in noise_bufs:
        buf.requires_grad_(True)
    w_opt = (w_avg.repeat(1, G.num_ws, 1) if s.space == "w_plus" else w_avg).clone().detach().requires_grad_(True)
    opt = torch.optim.Adam([w_opt, *noise_bufs], betas=(0.9, 0.999), lr=s.lr)
    target_small = _for_lpips(target, s.lpips_size)
    history: list[float] = []
    for step in range(s.steps):
        t = step / s.steps
        ramp = max(0.0, 1.0 - t / s.noise_ramp) ** 2 if s.noise_ramp > 0 else 0.0
        noise_scale = w_std * s.initial_noise_factor * ramp
        for g in opt.param_groups:
            g["lr"] = _lr_at(s, t)
        w_noise = torch.randn(w_opt.shape, generator=gen).to(device) * noise_scale
        ws = w_opt + w_noise
        if s.space == "w":
            ws = ws.repeat(1, G.num_ws, 1)
        synth = Gp.synthesis(ws)
        loss = lpips_model(_for_lpips(synth, s.lpips_size), target_small).mean()
        if s.pixel_weight > 0:
            loss = loss + s.pixel_weight * F.mse_loss(synth, target)
        reg = sum((noise_regularization(b) for b in noise_bufs), synth.new_zeros(()))
        total = loss + s.noise_regularize * reg
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        with torch.no_grad():
            for buf in noise_bufs:
                buf -= buf.mean()
                buf *= buf.square().mean().rsqrt()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step, history[-1])
    ws = w_opt.detach()
    if s.space == "w":
        ws = ws.repeat(1, G.num_ws, 1)
    del Gp
    if s.tune_steps <= 0:
        return Inversion(ws, G, history, [], False)
    Gt, tune_history = pivotal_tuning(G, ws, target, lpips_model, s)
    return Inversion(ws, Gt, history, tune_history, True)


def pivotal_tuning(G: Generator, ws: torch.Tensor, target: torch.Tensor, lpips_model: Any,
                   s: ProjectorSettings) -> tuple[Generator, list[float]]:
    """PTI: fine-tune a copy of the synthesis network around the pivot ``ws``."""
    Gt = copy.deepcopy(G).eval()
    Gt.mapping.requires_grad_(False)
    Gt.synthesis.requires_grad_(True)
    params = [p for p in Gt.synthesis.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.tune_lr)
    target_small = _for_lpips(target, s.lpips_size)
    history: list[float] = []
    for _ in range(s.tune_steps):
        synth = Gt.synthesis(ws)
        lp = lpips_model(_for_lpips(synth, s.lpips_size), target_small).mean()
        history.append(float(lp.detach()))
        if history[-1] <= s.tune_lpips_threshold:
            break
        loss = lp + s.tune_l2_weight * F.mse_loss(synth, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return Gt.requires_grad_(False), history
