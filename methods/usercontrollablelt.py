"""``usercontrollablelt``: UserControllableLT (Endo, "User-Controllable Latent Transformer for
StyleGAN Image Layout Editing", Computer Graphics Forum / Pacific Graphics 2022), a GAN baseline of
DiffEditor's Table 1, over a StyleGAN2 generator (:mod:`methods.stylegan2`) and the official
latent transformer's weights (``transformer_path``: the official checkpoint, e.g.
``pretrained_models/latent_transformer/ffhq.pt``; architecture in
:mod:`methods.stylegan2.latent_transformer`). The official checkpoints also hold the generator the
transformer was trained with (rosinality's layout under ``decoder.*``, with its ``latent_avg``):
with ``generator_path: null`` (default) it is loaded from ``transformer_path``; a
``generator_path`` replaces it (it must be the same network for the transformer to make sense).

Preparation: GAN inversion of the source (:mod:`methods.stylegan2.inversion`). Inference, as the
official ``interface/inference.py`` ``translate`` (our own code):

- the generator's feature map at the ``feature_resolution`` block (64 px: the official
  ``return_feature_map`` output at ``i == 7``) of the current ``w+``, resized (nearest, the default
  of the official ``F.interpolate``) to a ``grid_size`` (256) square, the display size the official
  UI's points live in;
- a drag ``d`` (grid pixels) from point ``s`` becomes the token ``x = (d / |d|, dz = 0)`` with the
  feature ``y = f[:, :, s_y, s_x]``; stop points add tokens ``(0, 0, 0)`` with their features;
- ``w_hat = T(w[:, :6], x, y, alpha = |d| / 10)`` replaces the first ``target_layers`` (6) vectors;
  the image is ``G(w)`` with the generator's own noise (``randomize_noise=False``).

The official tool moves one point per call, from the original latent. A benchmark sample moves N
points; how DiffEditor ran it on 68 / 17 landmarks is not said. ``multi_point`` (not specified by
the paper):

- ``sequential`` (default): the drags are applied one after the other, each from the latent the
  previous one produced (its features recomputed: one synthesis per moving point);
- ``joint``: one call with one token per moving point (its own unit direction) and ``alpha`` the
  mean drag length / 10.

``stop_unmoved`` (default true, not specified): points whose target equals their source (within
half a grid pixel) are passed as the official "stop points" (tokens with zero vectors), the UI's
way of pinning content.

Not specified by the paper (parameters): ``multi_point``, ``stop_unmoved``; which 17 landmarks
DiffEditor's 17-point setting drags (``point_subset``: ``all`` default, ``17pt`` = the jaw line 0-16 of
a ``dlib68`` face, our choice; :meth:`~methods.stylegan2.adapter.GanEditMethod.drag_points`); the inversion (the
paper's 1.1 s preparation time suggests an encoder, as the community demo's pSp; none is offered
here: the stylegan2-ada projector in ``w+`` with ``inversion_steps`` steps, a parameter).

Network calls: ``generator`` (synthesis: projector steps, one per feature map, one final),
``generator_mapping``, ``lpips``, ``latent_transformer`` (one per drag call).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import _check_number, auto_field, check_choice
from .diffusion import counting
from .diffusion.loading import MissingWeights
from .diffusion.tiny import RANDOM_WEIGHTS_LABEL
from .stylegan2.adapter import GanEditMethod, file_revision

NAME = "usercontrollablelt"
MULTI_POINT = ("sequential", "joint")


def feature_map(G: Any, ws: Any, resolution: int, grid: int) -> Any:
    """The synthesis features of the ``resolution`` px block, nearest-resized to ``grid``."""
    import torch.nn.functional as F

    idx = G.synthesis.block_resolutions.index(resolution)
    _, feats = G.synthesis(ws, return_features=True)
    return F.interpolate(feats[idx], (grid, grid))


def drag_tokens(feat: Any, starts: np.ndarray, vectors: np.ndarray, stops: np.ndarray) -> tuple[Any, Any]:
    """(``x`` [1, T, 3], ``y`` [1, T, C]) for moving points (unit directions) and stop points (zeros);
    points are integer (x, y) grid pixels."""
    import torch

    rows_x, rows_y = [], []
    for (sx, sy), d in zip(starts, vectors):
        n = float(np.linalg.norm(d))
        rows_x.append([d[0] / n, d[1] / n, 0.0])
        rows_y.append(feat[0, :, int(sy), int(sx)])
    for sx, sy in stops:
        rows_x.append([0.0, 0.0, 0.0])
        rows_y.append(feat[0, :, int(sy), int(sx)])
    x = torch.tensor([rows_x], dtype=feat.dtype, device=feat.device)
    y = torch.stack(rows_y)[None]
    return x, y


def transform(T: Any, ws: Any, x: Any, y: Any, alpha: float, target_layers: int) -> Any:
    """``ws`` with its first ``target_layers`` vectors replaced by ``T(w, x, y, alpha)`` (official
    ``translate``); ``alpha == 0`` returns ``ws`` unchanged (no network call: the official code
    would divide by a zero drag length)."""
    if alpha == 0:
        return ws
    out = ws.clone()
    out[:, :target_layers] = T(ws[:, :target_layers], x, y, alpha=alpha)
    return out


@METHODS.register(NAME)
class UserControllableLT(GanEditMethod):
    """GAN inversion, then the latent transformer maps (w, drag vectors, features) to a new w."""

    version = "1"
    owner = f"method '{NAME}'"
    location_params = ("generator_path", "lpips_weights_path", "transformer_path")

    @dataclasses.dataclass(frozen=True)
    class Params(GanEditMethod.Params):
        transformer_path: str | None = None  # official latent transformer checkpoint (e.g. ffhq.pt)
        inversion_space: Literal["w", "w_plus"] = "w_plus"  # the transformer edits w+ vectors
        feature_resolution: int | Literal["auto"] = auto_field(64, 16)  # official: the 64 px block
        grid_size: int = 256  # official: features and points at 256 x 256
        target_layers: int = 6  # official target_layers = [0..5]
        multi_point: Literal["sequential", "joint"] = "sequential"  # not specified by the paper
        stop_unmoved: bool = True  # not specified: unmoved points become stop points
        transformer_heads: int = 8  # the checkpoint's shapes give heads x dim_head only (official: 8)

        def __post_init__(self) -> None:
            super().__post_init__()
            owner = f"method '{NAME}'"
            check_choice(owner, "multi_point", self.multi_point, MULTI_POINT)
            _check_number(owner, "feature_resolution", self.feature_resolution, 4, integer=True)
            _check_number(owner, "grid_size", self.grid_size, 1, integer=True)
            _check_number(owner, "target_layers", self.target_layers, 1, integer=True)
            _check_number(owner, "transformer_heads", self.transformer_heads, 1, integer=True)
            if self.feature_resolution & (self.feature_resolution - 1):
                raise ValueError(f"{owner}: 'feature_resolution' must be a power of two, got {self.feature_resolution}")

    # -- weights ----------------------------------------------------------------------------
    def generator_file(self) -> str | None:
        """``generator_path``, else the transformer checkpoint itself: the official checkpoints hold
        the generator the transformer was trained with (rosinality layout, ``decoder.*``)."""
        return self.params.generator_path or self.params.transformer_path

    def _generator_problem(self) -> str | None:
        p = self.params
        if p.backbone != "tiny" and not self.generator_file():
            return (f"method '{NAME}' needs a StyleGAN2 generator: set method.transformer_path=<the official "
                    "latent transformer checkpoint, which holds the generator it was trained with> or "
                    "method.generator_path=<a StyleGAN2 .pkl / .pt / .pth>; or smoke-run with method.backbone=tiny")
        return super()._generator_problem()

    def _transformer_problem(self) -> str | None:
        p = self.params
        if p.backbone == "tiny":
            return None
        import os

        if not p.transformer_path:
            return (f"method '{NAME}' needs the latent transformer's weights: set method.transformer_path=<the "
                    "official checkpoint, e.g. UserControllableLT's pretrained_models/latent_transformer/ffhq.pt>; "
                    "or smoke-run with method.backbone=tiny")
        if not os.path.isfile(os.path.expanduser(p.transformer_path)):
            return f"method '{NAME}': method.transformer_path '{p.transformer_path}' does not exist"
        return None

    def extra_weights_status(self) -> list[tuple[str, str | None]]:
        what = (f"latent transformer ({RANDOM_WEIGHTS_LABEL})" if self.params.backbone == "tiny"
                else f"latent transformer {self.params.transformer_path or '(method.transformer_path not set)'}")
        return [(what, self._transformer_problem())]

    def extra_revision(self) -> str:
        if self.params.backbone == "tiny":
            return "+tiny-random-latent-transformer"
        return "+" + file_revision("ucl-transformer", self.params.transformer_path)

    def prepare_extra(self) -> None:
        from .stylegan2.latent_transformer import load_transformer, tiny_transformer

        p = self.params
        problem = self._transformer_problem()
        if problem:
            self._loaded = None
            raise MissingWeights(problem)
        loaded = self._loaded
        assert loaded is not None
        G = loaded["G"]
        if p.feature_resolution not in G.synthesis.block_resolutions:
            self._loaded = None
            raise ValueError(f"method '{NAME}': feature_resolution {p.feature_resolution} is not a block of the "
                             f"{G.img_resolution} px generator ({G.synthesis.block_resolutions})")
        channels = getattr(G.synthesis, f"b{p.feature_resolution}").conv1.weight.shape[0]
        if p.backbone == "tiny":
            T = tiny_transformer(G.w_dim, int(channels))
        else:
            T = load_transformer(p.transformer_path, heads=p.transformer_heads)
            c = T.config
            if c.dim != G.w_dim or c.feature_channels != channels:
                self._loaded = None
                raise ValueError(f"method '{NAME}': the latent transformer takes w of {c.dim} and features of "
                                 f"{c.feature_channels} channels; the generator has w of {G.w_dim} and "
                                 f"{channels} channels at {p.feature_resolution} px")
        T = T.to(loaded["device"])
        counting.watch_module("latent_transformer", T)
        loaded["T"] = T
        loaded["info"]["latent_transformer"] = ("tiny" if p.backbone == "tiny" else str(p.transformer_path))

    # -- the edit ---------------------------------------------------------------------------
    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch

        loaded = self.ensure_loaded()
        p = self.params
        t0 = time.perf_counter()
        G, T = loaded["G"], loaded["T"]
        src = np.asarray(sample.source)
        hw = src.shape[:2]
        R, grid = G.img_resolution, p.grid_size
        src_pts, tgt_pts = self.drag_points(sample)
        handles = self.scale_points(src_pts, hw, R) * (grid / R)
        targets = self.scale_points(tgt_pts, hw, R) * (grid / R)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            inv, _, _ = self.invert(sample, seed)
        prep = time.perf_counter() - t0
        starts = np.clip(np.rint(handles), 0, grid - 1).astype(int)
        vectors = targets - handles
        lengths = np.linalg.norm(vectors, axis=1)
        moving = lengths >= 0.5
        stops = starts[~moving] if p.stop_unmoved else starts[:0]
        n_layers = min(p.target_layers, G.num_ws)
        ws = inv.ws
        calls = 0
        with torch.no_grad():
            if p.multi_point == "sequential":
                for i in np.flatnonzero(moving):
                    feat = feature_map(G, ws, p.feature_resolution, grid)
                    x, y = drag_tokens(feat, starts[i:i + 1], vectors[i:i + 1], stops)
                    ws = transform(T, ws, x, y, float(lengths[i]) / 10.0, n_layers)
                    calls += 1
            elif moving.any():
                feat = feature_map(G, ws, p.feature_resolution, grid)
                x, y = drag_tokens(feat, starts[moving], vectors[moving], stops)
                ws = transform(T, ws, x, y, float(lengths[moving].mean()) / 10.0, n_layers)
                calls += 1
            image = G.synthesis(ws)
        edited = self.from_generator(image, hw)
        info = {
            **loaded["info"],
            **self.inversion_info(inv),
            "point_subset": p.point_subset,
            "dragged_points": int(len(handles)),
            "multi_point": p.multi_point,
            "moving_points": int(moving.sum()),
            "stop_points": int(len(stops)),
            "transformer_calls": calls,
            "w_change": float((ws - inv.ws).norm()),
            "seed": int(seed),
            "prep_seconds": prep,
        }
        return MethodOutput(image=edited, info=info)
