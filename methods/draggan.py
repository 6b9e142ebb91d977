"""``draggan``: DragGAN (Pan, Tewari, Leimkuehler, Liu, Meka, Theobalt, "Drag Your GAN: Interactive
Point-based Manipulation on the Generative Image Manifold", SIGGRAPH 2023), a GAN baseline of
DiffEditor's Table 1 (face landmark dragging), over a user's StyleGAN2 generator
(:mod:`methods.stylegan2`).

Preparation: GAN inversion of the source (:mod:`methods.stylegan2.inversion`; DragGAN's README
sends real images through PTI, so pivotal tuning is on by default). Inference: the drag
optimisation, then the final synthesis. One step, as the official ``viz/renderer.py``
``_render_drag_impl`` (our own code):

1. synthesise with ``w+`` whose first ``optimize_layers`` (6) vectors are optimised and the rest
   fixed to the inverted ones; the features of block ``feature_block`` (index 5: the 128 px block
   at 512 / 1024 px) are resized (bilinear) to the image size;
2. point tracking (paper sec. 3.3): each handle moves to the pixel of the ``2 r2' + 1`` square
   around it whose feature is nearest (L2) to the handle's feature in the first step's map;
3. stop when every handle is within ``max(2 R / 512, 2)`` px of its target, or after
   ``max_steps`` steps;
4. motion supervision (paper eq. 1): for each handle farther than 1 px from its target, the
   features of the pixels within ``r1'`` of it are pulled (L1) towards the detached features
   bilinearly sampled one unit step along the direction to the target; with a mask, ``lambda_mask``
   times the L1 distance of the features to the first step's inside the fixed region (the
   complement of the sample's edit mask: ``mask`` = the region that should change = DragGAN's
   "flexible area"); the code applies it only when the mask has both values;
5. one Adam step (``lr``) on the optimised vectors.

``r1' = round(r1 R / 512)``, ``r2' = round(r2 R / 512)`` (the code's scaling to the generator
resolution R). Points are (x, y) pixels of the source, scaled to R; the edit is resized back.

Defaults: ``r1`` 3, ``r2`` 12, ``feature_block`` 5, ``optimize_layers`` 6 (renderer and paper
sec. 4); ``lambda_mask`` 20 (``viz/drag_widget.py``: the GUI's value; the renderer's own default is
10); ``lr`` 2e-3 (paper sec. 4: Adam step 2e-3 for FFHQ,
AFHQCat, LSUN Car; the GUI's ``lr`` field starts at 1e-3).

Not specified by the paper (parameters): ``max_steps`` 300 (the GUI runs until stopped; the paper's
landmark experiment does not give a cap); the inversion (DiffEditor's Table 1 does not say how
DragGAN was given real faces; DragGAN's README: PTI; defaults: stylegan2-ada projector in ``w``
with 1000 steps, then PTI's 350 tuning steps); ``use_mask`` true (the fixed-region term needs a
mask; a sample without one runs without it); which 17 landmarks DiffEditor's 17-point setting drags
(``point_subset``: ``all`` default, ``17pt`` = the jaw line 0-16 of a ``dlib68`` face, our choice).

Network calls (``info["network_calls"]``): ``generator`` (synthesis network: 1 per projector /
tuning / drag step, + 1 final), ``generator_mapping`` (1: the projector's ``w_avg``), ``lpips``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import _check_number, auto_field
from .stylegan2.adapter import GanEditMethod

NAME = "draggan"


def scaled_radius(r: float, resolution: int) -> int:
    """The code's ``round(r / 512 * h)``."""
    return int(round(r / 512 * resolution))


def track_points(feat: Any, refs: list[Any], points: list[tuple[int, int]], r: int) -> list[tuple[int, int]]:
    """Nearest-neighbour point tracking: for each (x, y) point, the pixel of the square of radius
    ``r`` around it (clipped to the map) whose feature is nearest in L2 to ``refs[i]`` ([C]); ties
    go to the first pixel in row-major order (``torch.min``'s, as the code)."""
    import torch

    _, _, h, w = feat.shape
    out = []
    with torch.no_grad():
        for (x, y), ref in zip(points, refs):
            top, bottom = max(y - r, 0), min(y + r + 1, h)
            left, right = max(x - r, 0), min(x + r + 1, w)
            patch = feat[:, :, top:bottom, left:right]
            dist = torch.linalg.norm(patch - ref.reshape(1, -1, 1, 1), dim=1)
            idx = int(torch.argmin(dist.reshape(-1)))
            width = right - left
            out.append((left + idx % width, top + idx // width))
    return out


def motion_loss(feat: Any, points: list[tuple[int, int]], targets: np.ndarray, r1: int) -> Any:
    """Motion supervision (paper eq. 1, the code's form): for each handle farther than 1 px from
    its target, L1 between the features of the pixels strictly within ``r1`` of the handle and the
    detached features bilinearly sampled at those pixels plus the unit direction to the target."""
    import torch
    import torch.nn.functional as F

    _, _, h, w = feat.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=feat.device, dtype=torch.float32),
                            torch.arange(w, device=feat.device, dtype=torch.float32), indexing="ij")
    loss = feat.new_zeros(())
    for (x, y), (tx, ty) in zip(points, targets):
        d = torch.tensor([tx - x, ty - y], dtype=torch.float32, device=feat.device)
        norm = torch.linalg.norm(d)
        if norm <= 1:
            continue
        inside = ((xs - x) ** 2 + (ys - y) ** 2).sqrt() < r1
        qy, qx = torch.where(inside)
        if qy.numel() == 0:
            continue
        d = d / (norm + 1e-7)
        gx = (qx.float() + d[0]) / (w - 1) * 2 - 1
        gy = (qy.float() + d[1]) / (h - 1) * 2 - 1
        grid = torch.stack([gx, gy], dim=-1)[None, None]
        shifted = F.grid_sample(feat.float(), grid, align_corners=True).squeeze(2)  # [1, C, n]
        loss = loss + F.l1_loss(feat[:, :, qy, qx], shifted.detach())
    return loss


@dataclasses.dataclass
class DragResult:
    ws: Any  # [1, num_ws, w_dim] final w+
    image: Any  # [1, 3, R, R] final synthesis
    points: list[tuple[int, int]]  # tracked handles (generator pixels)
    steps: int  # optimisation steps run
    stopped: bool  # every handle reached its target
    losses: list[float]


def drag(G: Any, w0: Any, handles: np.ndarray, targets: np.ndarray, *, fixed_mask: Any = None, r1: float = 3,
         r2: float = 12, lambda_mask: float = 20.0, lr: float = 2e-3, feature_block: int = 5,
         optimize_layers: int = 6, max_steps: int = 300) -> DragResult:
    """DragGAN's optimisation from ``w0`` (see the module docstring); ``handles`` / ``targets``
    (N, 2) (x, y) in generator pixels; ``fixed_mask`` [R, R] float (1 = keep) or None."""
    import torch
    import torch.nn.functional as F

    R = G.img_resolution
    n_opt = min(int(optimize_layers), w0.shape[1])
    w_opt = w0[:, :n_opt].detach().clone().requires_grad_(True)
    w_rest = w0[:, n_opt:].detach()
    opt = torch.optim.Adam([w_opt], lr=lr)
    points = [(int(round(x)), int(round(y))) for x, y in np.asarray(handles, dtype=np.float64)]
    points = [(min(max(x, 0), R - 1), min(max(y, 0), R - 1)) for x, y in points]
    targets = np.asarray(targets, dtype=np.float64)
    r1p, r2p = scaled_radius(r1, R), scaled_radius(r2, R)
    stop_dist = max(2 / 512 * R, 2)
    use_mask = fixed_mask is not None and float(fixed_mask.min()) == 0 and float(fixed_mask.max()) == 1
    feat0 = refs = None
    losses: list[float] = []
    steps = 0
    stopped = False
    while True:
        if all(np.hypot(tx - x, ty - y) <= stop_dist for (x, y), (tx, ty) in zip(points, targets)):
            stopped = True
            break
        if steps >= max_steps:
            break
        ws = torch.cat([w_opt, w_rest], dim=1)
        _, feats = G.synthesis(ws, return_features=True)
        feat = F.interpolate(feats[feature_block], [R, R], mode="bilinear")
        if feat0 is None:
            feat0 = feat.detach()
            refs = [feat0[0, :, y, x] for x, y in points]
        points = track_points(feat, refs, points, r2p)
        if all(np.hypot(tx - x, ty - y) <= stop_dist for (x, y), (tx, ty) in zip(points, targets)):
            stopped = True  # the code checks after tracking and skips the update
            break
        loss = motion_loss(feat, points, targets, r1p)
        if use_mask:
            m = fixed_mask[None, None].to(feat.dtype)
            loss = loss + lambda_mask * F.l1_loss(feat * m, feat0 * m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        steps += 1
    with torch.no_grad():
        ws = torch.cat([w_opt.detach(), w_rest], dim=1)
        image = G.synthesis(ws)
    return DragResult(ws, image, points, steps, stopped, losses)


@METHODS.register(NAME)
class DragGAN(GanEditMethod):
    """GAN inversion, then DragGAN's motion supervision and point tracking on w+."""

    version = "1"
    owner = f"method '{NAME}'"

    @dataclasses.dataclass(frozen=True)
    class Params(GanEditMethod.Params):
        tune_steps: int | Literal["auto"] = auto_field(350, 5)  # PTI max_pti_steps (pivotal tuning on)
        r1: float | Literal["auto"] = auto_field(3.0, 24.0)  # motion-supervision radius (512-px units)
        r2: float | Literal["auto"] = auto_field(12.0, 96.0)  # tracking radius (512-px units)
        lambda_mask: float = 20.0  # drag_widget.py lambda_mask (renderer default 10)
        lr: float = 2e-3  # paper sec. 4 (FFHQ)
        feature_block: int | Literal["auto"] = auto_field(5, 2)  # synthesis block whose features are used
        optimize_layers: int = 6  # first w+ vectors optimised (renderer: ws[:, :6])
        max_steps: int | Literal["auto"] = auto_field(300, 5)  # not specified by the paper
        use_mask: bool = True  # fixed region = complement of the sample's mask, when it has one

        def __post_init__(self) -> None:
            super().__post_init__()
            owner = f"method '{NAME}'"
            for name in ("r1", "r2", "lr"):
                _check_number(owner, name, getattr(self, name), 0.0, inclusive=False)
            _check_number(owner, "lambda_mask", self.lambda_mask, 0.0)
            _check_number(owner, "feature_block", self.feature_block, 0, integer=True)
            _check_number(owner, "optimize_layers", self.optimize_layers, 1, integer=True)
            _check_number(owner, "max_steps", self.max_steps, 0, integer=True)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch

        loaded = self.ensure_loaded()
        p = self.params
        t0 = time.perf_counter()
        G = loaded["G"]
        if p.feature_block >= len(G.synthesis.block_resolutions):
            raise ValueError(f"method '{NAME}': feature_block {p.feature_block} but the generator has "
                             f"{len(G.synthesis.block_resolutions)} synthesis blocks")
        src = np.asarray(sample.source)
        hw = src.shape[:2]
        R = G.img_resolution
        src_pts, tgt_pts = self.drag_points(sample)
        handles = self.scale_points(src_pts, hw, R)
        targets = self.scale_points(tgt_pts, hw, R)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            inv, _, _ = self.invert(sample, seed)
        fixed = None
        if p.use_mask and sample.mask is not None:
            from PIL import Image

            m = Image.fromarray(np.asarray(sample.mask, dtype=np.uint8) * 255).resize((R, R), Image.NEAREST)
            m = np.asarray(m) > 127
            fixed = torch.from_numpy((~m).astype(np.float32)).to(loaded["device"])
        prep = time.perf_counter() - t0
        res = drag(inv.generator, inv.ws, handles, targets, fixed_mask=fixed, r1=p.r1, r2=p.r2,
                   lambda_mask=p.lambda_mask, lr=p.lr, feature_block=p.feature_block,
                   optimize_layers=p.optimize_layers, max_steps=p.max_steps)
        edited = self.from_generator(res.image, hw)
        back = np.asarray(res.points, dtype=np.float64) * np.array([hw[1] / R, hw[0] / R])
        info = {
            **loaded["info"],
            **self.inversion_info(inv),
            "point_subset": p.point_subset,
            "dragged_points": int(len(handles)),
            "drag_steps": res.steps,
            "reached_targets": bool(res.stopped),
            "tracked_points": back.round(2).tolist(),
            "motion_loss_first": res.losses[0] if res.losses else None,
            "motion_loss_last": res.losses[-1] if res.losses else None,
            "mask_term": fixed is not None,
            "radii_px": [scaled_radius(p.r1, R), scaled_radius(p.r2, R)],
            "seed": int(seed),
            "prep_seconds": prep,
        }
        return MethodOutput(image=edited, info=info)
