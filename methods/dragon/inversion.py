"""DDIM inversion of the source (and reference) with the memory bank (code:
``src/utils/inversion.py:DDIMInversion`` and the ``save_kv`` branch of
``src/unet/attention_processor.py``).

As the code: 50-step DDIM inversion conditioned on the text prompt only, no classifier-free
guidance, no image tokens (the demo inverts text-only; the paper's Fig. 10 inverts with the image
prompt, not offered here); every latent ``z_0 .. z_T`` is kept (the energies compare the
estimator's features of the edited latent with those of the inversion latent of the same step)
and every decoder self-attention layer stores its keys and values per step. Inversion step ``k``
evaluates the UNet on ``z_k`` at the label ``timesteps[T-1-k]`` (the step arithmetic of
:func:`methods.diffusion.inversion.ddim_invert`) and stores the K/V under the sampling step
``i = T-1-k`` that uses that timestep (the code's ``iter_cur``).

For paste / appearance the base and the reference are inverted together, one batch of two rows
with their own prompts (``demo/model.py:run_appearance``: ``ddim_inv(latent=cat([base, ref]))``):
latents and bank rows are [base, reference].
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..diffusion.inversion import DDIMSchedule, ddim_move
from .attention import MemoryBank, MemoryBankController, dragon_processors

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclasses.dataclass
class Inversion:
    """``latents[k]``: z_k, k = 0 .. T (``latents[T]`` is the start of sampling); rows [source]
    or [base, reference]. ``bank``: the memory bank (None when not kept)."""

    latents: list[Any]
    bank: MemoryBank | None

    def at_step(self, i: int) -> "torch.Tensor":
        """The inversion latent at sampling step ``i``'s timestep (the code's
        ``latent_noise_ref[-(i + 1)]``)."""
        return self.latents[len(self.latents) - 1 - i]

    def refs(self, i: int) -> dict[str, Any]:
        """``{'source': ..., 'reference': ...}`` at step ``i`` (reference only when inverted)."""
        z = self.at_step(i)
        out = {"source": z[:1]}
        if z.shape[0] > 1:
            out["reference"] = z[1:2]
        return out


def invert(unet: Any, schedule: DDIMSchedule, latents0: "torch.Tensor", cond: "torch.Tensor", *,
           keep_bank: bool = True, offload: bool = False, latent_hw: tuple[int, int] | None = None) -> Inversion:
    """DDIM-invert ``latents0`` (rows: source, or base + reference) with text embeddings ``cond``
    (one row per latent row, or one broadcast), keeping the memory bank when ``keep_bank``."""
    import torch

    n = len(schedule.timesteps)
    z = latents0.detach()
    cond = cond.to(device=z.device, dtype=z.dtype)
    if cond.shape[0] == 1 and z.shape[0] > 1:
        cond = cond.expand(z.shape[0], *cond.shape[1:])
    bank = MemoryBank(offload=offload) if keep_bank else None
    ctrl = None
    if bank is not None:
        hw = latent_hw or (int(z.shape[-2]), int(z.shape[-1]))
        ctrl = MemoryBankController(bank, "concat", latent_hw=hw)
    traj = [z]
    with torch.no_grad(), dragon_processors(unet, ctrl):
        for k, t in enumerate(reversed(schedule.timesteps)):
            if ctrl is not None:
                ctrl.set("save", n - 1 - k)
            eps = unet(z, t, encoder_hidden_states=cond).sample
            z = ddim_move(z, eps, schedule.alpha(schedule.prev(t)), schedule.alpha(t))
            traj.append(z)
    if ctrl is not None:
        ctrl.set("off", 0)
    return Inversion(latents=traj, bank=bank)
