"""The feature estimator of DragonDiffusion / DiffEditor's energy guidance.

Official code: ``src/unet/estimator.py`` (``MyUNet2DConditionModel``: a copy of the SD UNet whose
forward stops after the last requested up block and returns the outputs of up_blocks[1] and [2],
``up_ft_index = [1, 2]`` in ``src/demo/model.py``), loaded as a *second* SD 1.5 UNet next to the
sampling one (``src/models/dragondiff.py``). Ours runs a stock diffusers ``UNet2DConditionModel``
with forward hooks on the requested up blocks and stops the forward once the last one has run
(so the finer up blocks and ``conv_out`` are not computed, as in the code), without re-writing
diffusers' forward. The features stay differentiable with respect to the input latent.
"""
from __future__ import annotations

from typing import Any, Sequence

from methods.diffusion import counting

#: the up blocks whose outputs the energies use (demo/model.py: up_ft_index = [1, 2])
UP_FT_INDICES = (1, 2)


class _Stop(Exception):
    """Raised by the hook of the last needed up block to end the UNet's forward early."""


class FeatureEstimator:
    """Decoder features of a (second) SD UNet: ``features(z, t, text_emb)`` returns the outputs of
    ``up_blocks[i]`` for i in ``up_ft_indices`` (coarse to fine), differentiable wrt ``z``.

    Each ``features`` call is one forward call of ``unet``, counted under ``counter_name`` by
    :mod:`methods.diffusion.counting`. The module must not be the sampling UNet itself (it would
    be counted once, under whichever name watched it first): load a second copy, as the code does.
    Its parameters are frozen (``requires_grad_(False)``) and it is put in eval mode.
    """

    def __init__(self, unet: Any, counter_name: str = "estimator", up_ft_indices: Sequence[int] = UP_FT_INDICES):
        import torch

        if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "up_blocks"):
            raise TypeError(f"FeatureEstimator: expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
        idx = tuple(int(i) for i in up_ft_indices)
        if not idx or min(idx) < 0 or max(idx) >= len(unet.up_blocks):
            raise ValueError(f"FeatureEstimator: up_ft_indices {idx} out of range for a UNet with "
                             f"{len(unet.up_blocks)} up blocks")
        # counting keeps the first name a module was watched under (a private table read here
        # only to refuse double duty: the sampling UNet's calls must not count as estimator calls)
        watched = counting._watched.get(unet)
        if watched is not None and watched != counter_name:
            raise ValueError(f"FeatureEstimator: this UNet is already counted as '{watched}'; give the estimator its "
                             "own copy (the official code loads a second UNet)")
        self.unet = unet.eval().requires_grad_(False)
        self.counter_name = counter_name
        self.up_ft_indices = tuple(sorted(set(idx)))
        counting.watch_module(counter_name, unet)

    @property
    def dtype(self):
        return self.unet.dtype

    def features(self, z, t, text_emb) -> list:
        """Outputs of the chosen up blocks for latent ``z`` (B, 4, h, w) at timestep ``t`` with
        text embeddings ``text_emb`` (1 or B rows), in ``z``'s dtype."""
        captured: dict[int, Any] = {}
        last = self.up_ft_indices[-1]

        def hook_for(i: int):
            def hook(module, args, output):
                captured[i] = output[0] if isinstance(output, tuple) else output
                if i == last:
                    raise _Stop

            return hook

        if text_emb.shape[0] == 1 and z.shape[0] > 1:
            text_emb = text_emb.expand(z.shape[0], *text_emb.shape[1:])
        handles = [self.unet.up_blocks[i].register_forward_hook(hook_for(i)) for i in self.up_ft_indices]
        try:
            self.unet(z.to(self.dtype), t, encoder_hidden_states=text_emb.to(self.dtype))
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if set(captured) != set(self.up_ft_indices):  # pragma: no cover - a UNet that skips blocks
            raise RuntimeError(f"FeatureEstimator: up blocks {sorted(set(self.up_ft_indices) - set(captured))} did not run")
        return [captured[i].to(z.dtype) if captured[i].dtype != z.dtype else captured[i] for i in self.up_ft_indices]
