"""Text2LIVE's per-image optimisation (official ``train_image.py`` with ``datasets/image_dataset.py``).

Each step (official "epoch"): the internal dataset gives a random crop of the input (colour
jitter with probability ``jitter_p``, horizontal flip with ``flip_p``, a random rescale in
[``scale_min``, ``scale_max``], a random crop covering ``crops_min_cover`` .. 1 of each side) and,
every ``source_image_every`` steps starting with the first, the whole input; the generator maps
each to an edit layer composited over it; the losses (:class:`.losses.Text2LIVELoss`) are summed,
back-propagated, and the optimiser steps; with ``scheduler_policy: exponential`` the learning
rate becomes ``max(min_lr, gamma * lr)`` after each step.

The edit is the generator's output on the whole input after the last step, composited over it
(the official code renders it the same way, with the generator in training mode: BatchNorm uses
the image's own statistics, as during the optimisation).

Random numbers: the caller seeds torch's global RNG (the generator's initialisation, the crop
positions, every augmentation, the template indices) and passes a numpy generator (the rescale
and crop-size draws, the number of templates per term, which the official code drew from
``np.random``), so a seed fixes the edit on the CPU. On CUDA the draws are the same, but some
backward kernels (bilinear upsampling, grid sampling) accumulate with atomic adds, so two runs
can differ in the last bits and drift apart over the steps (torch's deterministic mode has no
deterministic version of them to switch to).

The input augmentations run on the image tensor (the official code ran them on the PIL image,
rounding to 8 bits after each).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from .clip import ANTIALIAS
from .losses import Bootstrap, Text2LIVELoss, render

OPTIMIZERS = ("madgrad", "adam", "radam", "rmsprop", "sgd")
#: The official ``get_optimizer``'s fixed settings: MADGRAD with weight decay 0.01 and momentum
#: 0.9, RMSprop with weight decay 0.01; the others torch's defaults.
MADGRAD_WEIGHT_DECAY = 0.01
MADGRAD_MOMENTUM = 0.9
RMSPROP_WEIGHT_DECAY = 0.01


class MissingDependency(RuntimeError):
    """A package a parameter needs is not installed."""


def madgrad_available() -> bool:
    try:
        import madgrad  # noqa: F401
    except ImportError:
        return False
    return True


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """The official ``get_optimizer`` (MADGRAD from the ``madgrad`` package, Facebook Research's
    reference implementation; the rest from torch.optim)."""
    if name == "madgrad":
        try:
            from madgrad import MADGRAD
        except ImportError:
            raise MissingDependency("text2live: optimizer 'madgrad' (the official setting) needs the 'madgrad' "
                                    "package: pip install madgrad (or set method.optimizer=adam)") from None
        return MADGRAD(params, lr=lr, weight_decay=MADGRAD_WEIGHT_DECAY, momentum=MADGRAD_MOMENTUM)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=RMSPROP_WEIGHT_DECAY)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"text2live: optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


@dataclasses.dataclass(frozen=True)
class CropSettings:
    """The internal dataset's settings (official ``flip_p``, ``jitter_p``, ``scale_min``,
    ``scale_max``, ``crops_min_cover``, ``source_image_every``)."""

    flip_p: float
    jitter_p: float
    scale_min: float
    scale_max: float
    crops_min_cover: float
    source_image_every: int


def random_crop(image: torch.Tensor, s: CropSettings, rng: np.random.Generator) -> torch.Tensor:
    """One training crop of ``image`` ([1, 3, H, W] in [0, 1]), official ``input_transforms``."""
    x = T.RandomApply([T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1)], p=s.jitter_p)(image)
    x = T.RandomHorizontalFlip(p=s.flip_p)(x)
    h, w = x.shape[-2:]
    scale = rng.uniform(s.scale_min, s.scale_max)
    x = TF.resize(x, [int(h * scale), int(w * scale)], antialias=ANTIALIAS)
    if s.crops_min_cover < 1:
        h, w = x.shape[-2:]
        cover = rng.uniform(s.crops_min_cover, 1)
        x = T.RandomCrop((int(h * cover), int(w * cover)))(x)
    return x


def smallest_crop_side(h: int, w: int, s: CropSettings) -> int:
    """The smallest side a training crop of an h x w input can have (for the generator's minimum)."""
    return int(int(min(h, w) * s.scale_min) * s.crops_min_cover)


@dataclasses.dataclass
class Optimisation:
    """State and history of one edit's optimisation."""

    generator: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Text2LIVELoss
    image: torch.Tensor  # [1, 3, H, W] in [0, 1]
    crops: CropSettings
    rng: np.random.Generator
    lr: float
    min_lr: float
    gamma: float
    scheduler_policy: str
    step_index: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def inputs_for(self, step: int) -> list[torch.Tensor]:
        """This step's training images: a random crop, then the whole image on every
        ``source_image_every``-th step (official order: crop first, in ``LossG``'s lists)."""
        out = [random_crop(self.image, self.crops, self.rng)]
        if step % self.crops.source_image_every == 0:
            out.append(self.image)
        return out

    def losses(self, inputs: list[torch.Tensor], step: int | None = None) -> dict[str, torch.Tensor]:
        """The loss terms for ``inputs``; ``step`` (0-based) for the bootstrap term (None: left out)."""
        renders = [render(self.generator(x), x) for x in inputs]
        return self.loss(renders, inputs, step)

    def step(self) -> dict[str, float]:
        """One optimisation step; returns its loss terms (floats) and learning rate."""
        inputs = self.inputs_for(self.step_index)
        self.optimizer.zero_grad()
        losses = self.losses(inputs, self.step_index)
        losses["loss"].backward()
        self.optimizer.step()
        lr_used = self.optimizer.param_groups[0]["lr"]
        if self.scheduler_policy == "exponential":
            for group in self.optimizer.param_groups:
                group["lr"] = max(self.min_lr, self.gamma * group["lr"])
        record = {k: float(v.detach()) for k, v in losses.items()}
        record["lr"] = float(lr_used)
        self.history.append(record)
        self.step_index += 1
        return record

    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor]:
        """The edit layer on the whole image, composited (generator in training mode, as trained)."""
        return render(self.generator(self.image), self.image)


def build(generator_factory: Callable[[], torch.nn.Module], extractor: Any, image: torch.Tensor,
          texts: dict[str, str], weights: dict[str, float], criterion: str, optimizer: str, lr: float,
          min_lr: float, gamma: float, scheduler_policy: str, crops: CropSettings,
          rng: np.random.Generator, bootstrap: Bootstrap | None = None) -> Optimisation:
    """A fresh generator (built by ``generator_factory`` under the caller's seeded RNG), its
    optimiser and the loss with the text embeddings computed."""
    gen = generator_factory().to(image.device)
    gen.train()
    opt = make_optimizer(optimizer, gen.parameters(), lr)
    loss = Text2LIVELoss(extractor, texts, weights, criterion, rng, bootstrap)
    return Optimisation(gen, opt, loss, image, crops, rng, lr, min_lr, gamma, scheduler_policy)
