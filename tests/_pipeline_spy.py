"""Recording wrappers around the diffusers calls an adapter makes: what the pipeline really
received, and how many times the UNet really ran.

The wrappers are installed on the classes with pytest's ``monkeypatch`` (undone after the test),
so they also see the pipelines that ``methods.diffusion.loading`` caches per process. They call
the original unchanged: the edit is the same with or without them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np


@dataclasses.dataclass
class PipelineCall:
    method: str  # "__call__", "generate_mask", "invert", ...
    kwargs: dict[str, Any]
    generator_seed: int | None  # the generator's initial seed, read before the call
    generator_advanced: bool | None  # whether the call drew from the generator (its state moved)
    unet: list["UNetCall"]  # the UNet forwards this call ran
    result: Any  # what the call returned


@dataclasses.dataclass
class UNetCall:
    batch: int
    in_channels: int
    latent_hw: tuple[int, int]
    timestep: float


@dataclasses.dataclass
class Spy:
    pipeline: list[PipelineCall] = dataclasses.field(default_factory=list)
    unet: list[UNetCall] = dataclasses.field(default_factory=list)

    def calls(self, method: str = "__call__") -> list[PipelineCall]:
        return [c for c in self.pipeline if c.method == method]

    def clear(self) -> None:
        self.pipeline.clear()
        self.unet.clear()


def spy_diffusion(monkeypatch, pipeline_cls: type, methods: tuple[str, ...] = ("__call__",)) -> Spy:
    """Record every call of ``pipeline_cls.<methods>`` (keyword arguments, generator seed) and every
    ``UNet2DConditionModel.forward`` (batch, channels, latent size, timestep)."""
    import torch
    from diffusers import UNet2DConditionModel

    spy = Spy()

    def wrap(name: str, original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            assert not args, f"{pipeline_cls.__name__}.{name} called with positional arguments"
            gen = kwargs.get("generator")
            seed = before = None
            if isinstance(gen, torch.Generator):
                seed, before = gen.initial_seed(), gen.get_state().clone()
            first_unet = len(spy.unet)
            out = original(self, **kwargs)
            moved = None if before is None else not torch.equal(before, gen.get_state())
            spy.pipeline.append(PipelineCall(name, dict(kwargs), seed, moved, spy.unet[first_unet:], out))
            return out

        return wrapper

    for name in methods:
        monkeypatch.setattr(pipeline_cls, name, wrap(name, getattr(pipeline_cls, name)))

    unet_forward = UNet2DConditionModel.forward

    @functools.wraps(unet_forward)
    def forward(self, sample, timestep, *args, **kwargs):
        t = timestep.flatten()[0].item() if torch.is_tensor(timestep) else float(timestep)
        spy.unet.append(UNetCall(int(sample.shape[0]), int(sample.shape[1]), tuple(sample.shape[-2:]), float(t)))
        return unet_forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    return spy


def resized_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``mask`` resized to ``size_hw`` by nearest neighbour with PIL: what a pipeline's ``L`` mask
    image of the working size must hold (255 = repaint)."""
    from PIL import Image

    h, w = size_hw
    img = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
    return np.asarray(img.resize((w, h), Image.NEAREST))


def resized_source(source: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``source`` resized to ``size_hw`` bicubically with PIL (the adapters' documented resize)."""
    from PIL import Image

    h, w = size_hw
    return np.asarray(Image.fromarray(source).resize((w, h), Image.BICUBIC))
