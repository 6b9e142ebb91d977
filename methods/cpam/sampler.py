"""CPAM's inversion of the real image and its two-branch sampling loop (Vo et al., sec. 4.1,
Algorithm 1, sec. 5.1).

- :func:`invert`: the source latent inverted with the source prompt, by null-text inversion (the
  paper: "deterministic inversion technique of DDIM with null-text guided") or plain DDIM
  (option; the author's thesis code inverts with plain DDIM). Both come from
  :mod:`methods.diffusion.inversion`.
- :func:`sample`: one UNet batch per step with two branches, laid out as
  :meth:`BatchLayout.cfg(2) <methods.diffusion.attention.BatchLayout.cfg>` ``[uncond source,
  uncond target, cond source, cond target]`` (``BatchLayout.plain(2)`` without guidance). The
  source branch is not sampled: every step it is re-set to the *intermediate latent* ``z_i``
  (Algorithm 1 (b)), the inversion latent of this step (``intermediate="same_step"``) or of
  ``cleaner_k`` steps less noise (``"cleaner"``, the thesis' other row); the target branch
  starts from ``z_T`` and is denoised with the target prompt under the caller's attention
  controller (Preservation Adaptation, Localized Extraction). The unconditional embedding of a
  step is the null-text one of that step (or the empty prompt's after plain DDIM inversion),
  for both branches.

torch is imported inside the functions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from ..diffusion.attention import AttentionController  # torch-free at import

INVERSIONS = ("null_text", "ddim")
INTERMEDIATES = ("same_step", "cleaner")


@dataclasses.dataclass
class Inversion:
    """An inverted source: the trajectory ``[z_0, ..., z_T]`` (``z_j`` at sampling timestep
    ``timesteps[T - j]``) and, for null-text inversion, the per-step unconditional embeddings."""

    trajectory: list[Any]
    uncond_per_step: list[Any] | None
    kind: str

    @property
    def z_T(self) -> Any:
        return self.trajectory[-1]

    def uncond(self, step: int, null: Any) -> Any:
        """The unconditional embedding of sampling step ``step``: null-text's, else ``null``."""
        return self.uncond_per_step[step] if self.uncond_per_step is not None else null

    def intermediate(self, step: int, intermediate: str = "same_step", cleaner_k: int = 5) -> Any:
        """The source branch's latent at sampling step ``step`` (timestep ``timesteps[step]``):
        the inversion latent of the same noise level, or the one ``cleaner_k`` steps cleaner
        (clamped at ``z_0``)."""
        n = len(self.trajectory) - 1
        j = n - step
        if intermediate == "cleaner":
            j = max(j - int(cleaner_k), 0)
        return self.trajectory[j]


def invert(unet: Any, schedule: Any, latents0: Any, cond: Any, null: Any, num_steps: int, *,
           kind: str = "null_text", guidance_scale: float = 7.5, inner_steps: int = 10, lr: float = 1e-2,
           early_stop: float = 1e-5) -> Inversion:
    """Invert ``latents0`` with the source prompt embedding ``cond``.

    ``null_text``: :func:`methods.diffusion.inversion.null_text_invert` (pivot = unguided DDIM
    inversion, then per-step null embeddings optimised for CFG ``guidance_scale``), as the
    paper; ``ddim``: :func:`methods.diffusion.inversion.ddim_invert` unguided (the pivot alone;
    sampling then uses ``null``, the empty prompt, as the unconditional embedding)."""
    from ..diffusion.inversion import ddim_invert, null_text_invert

    if kind == "null_text":
        _, per_step, traj = null_text_invert(unet, schedule, latents0, cond, null, num_steps,
                                             guidance_scale=guidance_scale, inner_steps=inner_steps, lr=lr,
                                             early_stop=early_stop)
        return Inversion(list(traj), list(per_step), kind)
    if kind == "ddim":
        return Inversion(list(ddim_invert(unet, schedule, latents0, cond, num_steps, guidance_scale=1.0)), None, kind)
    raise ValueError(f"cpam: 'inversion' must be one of {list(INVERSIONS)}, got {kind!r}")


def sample(unet: Any, schedule: Any, inv: Inversion, src: Any, tgt: Any, null: Any, num_steps: int, *,
           guidance_scale: float = 7.5, controller: Any = None, intermediate: str = "same_step",
           cleaner_k: int = 5, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Denoise the target branch from ``inv.z_T`` beside the re-set source branch (module
    docstring). ``controller`` (installed on ``unet`` for the loop, stepped by hand after each
    UNet call) edits the attention; ``on_step(i)`` runs before step ``i``'s UNet call (the
    mask refinement updates the controllers' masks there). Returns ``edit`` (``[1, C, h, w]``,
    the target branch's ``z_0``) and ``layout``."""
    import torch

    from ..diffusion.attention import BatchLayout, attention_control
    from ..diffusion.inversion import ddim_move

    if intermediate not in INTERMEDIATES:
        raise ValueError(f"cpam: 'intermediate' must be one of {list(INTERMEDIATES)}, got {intermediate!r}")
    guided = float(guidance_scale) != 1.0
    layout = BatchLayout.cfg(2) if guided else BatchLayout.plain(2)
    z = inv.z_T.detach().clone()
    like = dict(device=z.device, dtype=z.dtype)
    src, tgt, null = (e.detach().to(**like) for e in (src, tgt, null))
    if controller is not None and getattr(controller, "layout", None) is None:
        controller.layout = layout
    with torch.no_grad(), attention_control(unet, controller):
        if controller is not None:
            controller.auto_step = False  # one UNet call per step; stepped below
            controller.reset()
        for i, t in enumerate(schedule.timesteps):
            if on_step is not None:
                on_step(i)
            zi = inv.intermediate(i, intermediate, cleaner_k).to(**like)
            lat = torch.cat([zi, z])  # [source branch, target branch]
            if guided:
                u = inv.uncond(i, null).to(**like)
                text = torch.cat([u, u, src, tgt])
                eps = unet(torch.cat([lat, lat]), t, encoder_hidden_states=text).sample
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + float(guidance_scale) * (eps_c - eps_u)
            else:
                eps = unet(lat, t, encoder_hidden_states=torch.cat([src, tgt])).sample
            # only the target branch moves: the source branch is re-set from the inversion
            z = ddim_move(z, eps[1:2], schedule.alpha(t), schedule.alpha(schedule.prev(t)))
            if controller is not None:
                controller.step_end()
    return {"edit": z, "layout": layout}


def reference_sample(unet: Any, schedule: Any, inv: Inversion, cond: Any, null: Any, num_steps: int,
                     guidance_scale: float) -> Any:
    """Plain CFG DDIM sampling of ``cond`` from ``inv.z_T`` with the inversion's unconditional
    embeddings (:func:`methods.diffusion.inversion.ddim_sample`): with ``cond`` = the source
    prompt this is the inversion's own reconstruction, the yardstick of the tests."""
    from ..diffusion.inversion import ddim_sample

    per_step: Sequence[Any] | None = inv.uncond_per_step
    return ddim_sample(unet, schedule, inv.z_T, cond, num_steps, guidance_scale=guidance_scale,
                       uncond=None if per_step is not None else null, uncond_per_step=per_step)



class TokenMapCapture(AttentionController):
    """Collects, per step, the target row's cross-attention to ``positions`` as one ``(h, w)``
    map per layer (heads averaged, the tokens summed), reduced at once so that nothing of size
    ``layers x steps x N_q x 77`` is kept (at 512 px a kept store would be gigabytes); the maps
    feed :class:`methods.cpam.masks.AttentionMaskRefiner`. The row read is the batch's last, the
    target's conditional one in both layouts :func:`sample` uses. The processor's probabilities
    are read before Localized Extraction replaces the layer's output (``"out"`` hook), so these
    are the target prompt's own attention maps."""

    def __init__(self, positions: Sequence[int], **kw: Any) -> None:
        super().__init__(**kw)
        self.positions = [int(p) for p in positions]
        self.current: list[Any] = []
        self.steps: list[list[Any]] = []  # steps[k]: the layer maps of step k

    def needs_probs(self, ctx: Any) -> bool:
        return ctx.kind == "cross" and bool(self.positions)

    def on_probs(self, ctx: Any) -> None:
        if not self.needs_probs(ctx):
            return None
        h, w = ctx.token_grid()
        row = ctx.probs[ctx.head_rows(ctx.batch_size - 1)]  # (heads, N_q, L)
        self.current.append(row[..., self.positions].sum(-1).mean(0).reshape(h, w).float().cpu().numpy())
        return None

    def on_step_end(self) -> None:
        self.steps.append(self.current)
        self.current = []

    def reset(self) -> None:
        super().reset()
        self.current, self.steps = [], []
