"""DragDiffusion's second stage: motion supervision and point tracking on the latent ``z_t``.

As the official ``utils/drag_utils.py`` (``Yujun-Shi/DragDiffusion``; written anew here):

- features: the UNet's decoder features (the official ``forward_unet_features`` returns the
  mid-block output followed by every up-block's output; ``unet_feature_idx = [3]`` picks the third
  up-block's), bilinearly resized to the supervision resolution (``sup_res = 0.5 x`` the image
  size) and concatenated over the chosen indices. Here forward hooks on the mid block and the up
  blocks capture them (:class:`FeatureTap`), so the UNet's own forward is untouched.
- motion supervision (Eq. 3 of the paper): for each handle ``p_i`` farther than 2 from its target
  ``t_i``, with ``d_i = (t_i - p_i) / |t_i - p_i|``, the L1 distance between the features of the
  ``(2 r_m + 1)^2`` patch around ``p_i`` (detached) and the same patch shifted by ``d_i``
  (bilinear), times ``(2 r_m + 1)^2`` (``F.l1_loss`` averages); plus, when a mask is given,
  ``lam * |(x_{t-1}(z) - x_{t-1}(z_orig)) * (1 - mask)|_1`` (the DDIM step of the current latent
  against the original one outside the editable region).
- point tracking (Eq. 4): each handle moves to the position in its ``(2 r_p + 1)^2``
  neighbourhood (clipped at the borders) whose feature is nearest (L1 over channels) to the
  *initial* handle's feature in the first step's feature map ``F0``.
- stop when every handle is within 2 of its target, else after ``n_pix_step`` Adam steps.

Points are ``(row, col)`` on the supervision grid, as the official code holds them.
The shifted patch is read with ``torch.nn.functional.grid_sample`` (bilinear, ``align_corners
=True``: the same weights as the official hand-written ``interpolate_feature_patch``; outside the
map it reads zeros where the official slicing would shrink the patch).
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

REACH = 2.0  # check_handle_reach_target / the per-handle skip: a handle within 2 of its target is done


class FeatureTap:
    """Capture the outputs of ``[mid_block, up_blocks[0], up_blocks[1], ...]`` of a diffusers
    UNet during its forward (the official ``return_intermediates`` list); :meth:`features` resizes
    and concatenates the chosen ones."""

    def __init__(self, unet: Any, indices: Sequence[int]) -> None:
        blocks = [unet.mid_block, *unet.up_blocks]
        bad = [i for i in indices if not 0 <= int(i) < len(blocks)]
        if bad:
            raise ValueError(f"dragdiffusion: unet_feature_idx {list(indices)} out of range: the UNet has "
                             f"{len(blocks)} decoder features (0 = mid block, 1..{len(blocks) - 1} = up blocks)")
        self.indices = [int(i) for i in indices]
        self.blocks = blocks
        self.captured: dict[int, Any] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "FeatureTap":
        for i in sorted(set(self.indices)):
            self._handles.append(self.blocks[i].register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int) -> Any:
        def hook(module: Any, args: Any, out: Any) -> None:
            self.captured[i] = out[0] if isinstance(out, tuple) else out
        return hook

    def features(self, size_hw: tuple[int, int]) -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        feats = [F.interpolate(self.captured[i].float(), size_hw, mode="bilinear") for i in self.indices]
        self.captured = {}
        return torch.cat(feats, dim=1)


def unet_features(unet: Any, tap: FeatureTap, z: "torch.Tensor", t: int, emb: "torch.Tensor",
                  size_hw: tuple[int, int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(eps, features)`` of one UNet call (the official ``forward_unet_features``)."""
    eps = unet(z, t, encoder_hidden_states=emb).sample
    return eps, tap.features(size_hw)


def shifted_patch(feat: "torch.Tensor", r1: int, r2: int, c1: int, c2: int, dy: Any, dx: Any) -> "torch.Tensor":
    """The patch ``feat[..., r1:r2, c1:c2]`` shifted by the real offset ``(dy, dx)``, bilinear
    (differentiable in ``feat``)."""
    import torch
    import torch.nn.functional as F

    h, w = feat.shape[-2:]
    rows = torch.arange(r1, r2, device=feat.device, dtype=feat.dtype) + dy
    cols = torch.arange(c1, c2, device=feat.device, dtype=feat.dtype) + dx
    gy, gx = torch.meshgrid(rows, cols, indexing="ij")
    # align_corners=True: pixel index i <-> normalised coordinate -1 + 2 i / (size - 1)
    grid = torch.stack([2 * gx / max(w - 1, 1) - 1, 2 * gy / max(h - 1, 1) - 1], dim=-1)[None]
    grid = grid.expand(feat.shape[0], *grid.shape[1:])
    return F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def motion_supervision_loss(feat: "torch.Tensor", handles: "torch.Tensor", targets: "torch.Tensor",
                            r_m: int) -> "torch.Tensor":
    """Eq. 3's motion term over all handles (zero, with a gradient path, when every handle is
    within :data:`REACH` of its target)."""
    import torch.nn.functional as F

    _, _, h, w = feat.shape
    loss = feat.sum() * 0.0
    for p, q in zip(handles, targets):
        dist = (q - p).norm()
        if dist < REACH:
            continue
        d = (q - p) / dist
        r1, r2 = max(0, int(p[0]) - r_m), min(h, int(p[0]) + r_m + 1)
        c1, c2 = max(0, int(p[1]) - r_m), min(w, int(p[1]) + r_m + 1)
        ref = feat[:, :, r1:r2, c1:c2].detach()
        moved = shifted_patch(feat, r1, r2, c1, c2, d[0], d[1])
        loss = loss + ((2 * r_m + 1) ** 2) * F.l1_loss(ref, moved)
    return loss


def point_tracking(f0: "torch.Tensor", f1: "torch.Tensor", handles: "torch.Tensor", handles_init: "torch.Tensor",
                   r_p: int) -> "torch.Tensor":
    """Eq. 4: new handle positions (``[N, 2]`` rows / cols, float)."""
    import torch

    out = handles.clone()
    _, _, h, w = f0.shape
    with torch.no_grad():
        for i in range(len(handles)):
            p0, p = handles_init[i], handles[i]
            ref = f0[:, :, int(p0[0]), int(p0[1])]
            r1, r2 = max(0, int(p[0]) - r_p), min(h, int(p[0]) + r_p + 1)
            c1, c2 = max(0, int(p[1]) - r_p), min(w, int(p[1]) + r_p + 1)
            dist = (ref[:, :, None, None] - f1[:, :, r1:r2, c1:c2]).abs().sum(dim=1)[0]
            row, col = divmod(int(dist.argmin()), dist.shape[-1])
            out[i, 0], out[i, 1] = r1 + row, c1 + col
    return out


def reached(handles: "torch.Tensor", targets: "torch.Tensor") -> bool:
    return bool(((handles - targets).norm(dim=-1) < REACH).all())


@dataclasses.dataclass
class DragResult:
    latent: "torch.Tensor"
    handles: "torch.Tensor"  # final tracked handles (supervision grid, rows / cols)
    steps: int  # optimisation steps taken (Adam updates)
    reached: bool
    losses: list[float]
    seconds: float


def drag_update(unet: Any, tap: FeatureTap, z: "torch.Tensor", t: int, emb: "torch.Tensor",
                handles: "torch.Tensor", targets: "torch.Tensor", mask: "torch.Tensor | None",
                size_hw: tuple[int, int], step_fn: Any, *, n_pix_step: int, lr: float, r_m: int, r_p: int,
                lam: float) -> DragResult:
    """Optimise ``z`` (at timestep ``t``) by motion supervision and point tracking (the official
    ``drag_diffusion_update``). ``mask``: ``[1, 1, h, w]`` editable region on the latent grid (1 =
    editable) or None; ``step_fn(eps, z)``: the DDIM step from ``t``."""
    import torch

    t0 = time.perf_counter()
    handles = handles.clone().float()
    targets = targets.float()
    with torch.no_grad():
        eps0, f0 = unet_features(unet, tap, z, t, emb, size_hw)
        prev0 = step_fn(eps0, z)
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    init = handles.clone()
    use_mask = mask is not None and float(mask.sum()) != 0.0
    losses: list[float] = []
    done, steps = False, 0
    for i in range(n_pix_step):
        eps, f1 = unet_features(unet, tap, z, t, emb, size_hw)
        if i != 0:
            handles = point_tracking(f0, f1, handles, init, r_p)
        if reached(handles, targets):
            done = True
            break
        loss = motion_supervision_loss(f1, handles, targets, r_m)
        if use_mask:
            loss = loss + lam * ((step_fn(eps, z) - prev0) * (1.0 - mask)).abs().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        losses.append(float(loss.detach()))
    done = done or reached(handles, targets)
    return DragResult(z.detach(), handles, steps, done, losses, time.perf_counter() - t0)
