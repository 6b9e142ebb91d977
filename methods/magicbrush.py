"""``magicbrush``: InstructPix2Pix fine-tuned on MagicBrush (Zhang et al., NeurIPS 2023 D&B).

The same diffusers pipeline as :mod:`methods.instruct_pix2pix` with MagicBrush's weights. The
MagicBrush README ("Load in Diffusers") points at two community conversions:
``vinesmsuic/magicbrush-paper`` (the paper's checkpoint) and ``vinesmsuic/magicbrush-jul7`` (the
better July 2023 checkpoint, ``MagicBrush-epoch-52-step-4999.ckpt``); the default is the latter,
the one ZONE's released code loads (``--magicbrush_path vinesmsuic/magicbrush-jul7``). Its main
branch holds ``.bin`` weights (diffusers loads them); a safetensors upload is on an open hub pull
request (``revision=refs/pr/2``). Sampling defaults are the pipeline's own, as for IP2P (ZONE,
appendix C.1: diffusers defaults for IP2P and MagicBrush; 512 x 512 inputs).
"""
from __future__ import annotations

import dataclasses

from harness.registry import METHODS

from .instruct_pix2pix import InstructPix2PixBase


@METHODS.register("magicbrush")
class MagicBrush(InstructPix2PixBase):
    """InstructPix2Pix pipeline with MagicBrush fine-tuned weights."""

    @dataclasses.dataclass(frozen=True)
    class Params(InstructPix2PixBase.Params):
        model: str = "vinesmsuic/magicbrush-jul7"  # MagicBrush README, "Load in Diffusers"
