"""FID and KID between the set of a job's edits and a reference set (set metrics).

Both are :class:`~harness.metrics.base.SetMetric`: the runner streams the job's ok edits through
:meth:`update` in batches and calls :meth:`compute_set` once. Rows: ``fid`` gives one row
(region ``all``); ``kid`` gives two rows, region ``all`` = the KID mean over subsets and region
``std`` = its standard deviation over subsets (torchmetrics' ``(kid_mean, kid_std)``), so the
std travels through the same tables and never hides in a flag.

Feature extractor
    torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF FID Inception, 2015-12-05 weights,
    ``pt_inception-2015-12-05-6726825d.pth``), pool3 2048-d features, through torchmetrics'
    ``NoTrainInceptionV3`` wrapper (the network torchmetrics' FID/KID use). Weights come from, in
    order: ``weights_path``; the torch hub cache ``<torch.hub.get_dir()>/checkpoints/`` holding
    ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's name) or
    ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's name; same weights); else the
    metric is unavailable and says where to put the file. ``allow_random_weights: true`` builds
    the network with seeded random weights for smoke runs (``weights()`` then says
    ``RANDOM WEIGHTS (smoke run)``). NO download is ever attempted: the network is built with a
    weights file we load ourselves (``torch.load(weights_only=True)``), never torch-fidelity's
    URL fallback.

Modes (``mode``), i.e. how an RGB uint8 image reaches the 299x299 network input:
    ``torchmetrics`` (default): exactly ``torchmetrics.image.fid.FrechetInceptionDistance()`` of
        the installed torchmetrics: uint8 input, ``torch.nn.functional.interpolate`` bilinear
        with ``antialias=True`` (torchmetrics' default since it gained the ``antialias``
        argument), float32 network. Checked in the tests against torchmetrics itself.
    ``torch_fidelity``: torch-fidelity's own resize (``interpolate_bilinear_2d_like_tensorflow1x``,
        the original TF FID resize; = torchmetrics with ``antialias=False`` and older versions).
    ``clean``: clean-fid's "clean" resize: each channel as a float32 PIL image (mode ``F``)
        resized to 299x299 with PIL bicubic, clipped to [0, 255], fed as float (not re-quantised).
        The few PIL lines are written here (clean-fid is a test dependency only); the tests check
        them bit for bit against ``cleanfid.resize.build_resizer("clean")``, and the features
        against clean-fid's folder pipeline feeding the same network. The network is torch-fidelity's
        Inception after its resize step ((x - 128) / 128, then the layers), as clean-fid's
        TorchScript export of the same TF graph computes it (same weights; values agree closely,
        not bit for bit, with clean-fid's own network).

Reference set
    ``reference_dir``: a folder of images (recursive; png/jpg/jpeg/bmp/webp/tif), e.g. CelebA-HQ.
        Its statistics are computed once and cached on disk in ``stats_cache_dir`` (default
        ``~/.cache/edit-harness/fid``; null disables the disk cache) as ``ref-<key>.npz``, key = hash of
        (sorted relative file names + sizes + mtimes, extractor identity = mode + weights file
        sha256 (or random seed), and for KID the feature cap/seed). A second use loads the file.
    else ``reference``: ``source`` (default: the job's source images, works on any dataset) or
        ``target`` (the ground-truth targets; items without one do not contribute). These images
        arrive with the edits in :meth:`update`, so the reference set is only known at the end; they
        are cached per image instead, ``features/<extractor key>/<content sha1>.npy`` (2048 float32)
        under ``stats_cache_dir``: a later job over the same images (another method, a rerun) does
        not run the network on them again. A source image shared by several samples (same content
        hash) counts once in the reference set.
    ``regions``/``region_rule`` from the suite config are accepted and ignored (whole images).

Statistics (streaming, constant memory)
    FID: per batch, features (float32 from the network) are cast to float64 and added to a
    feature sum and an outer-product sum (``X^T X``), as torchmetrics does; mean and covariance
    ``(sum_outer - n mu mu^T) / (n - 1)`` at the end; FID = torchmetrics' ``_compute_fid`` in float64
    (``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 sum sqrt(eig(S1 S2))``). No image or feature is kept.
    KID: needs the features themselves. Each side keeps at most ``kid_max_features`` (default
    10000) rows as float32 (lossless: the network outputs float32; 10000 x 2048 x 4 B = 80 MB per
    side), by seeded reservoir sampling beyond the cap. KID = mean and std (population std, as
    torchmetrics) over ``kid_subsets`` (100) subsets of ``kid_subset_size`` (1000) rows drawn
    without replacement from each side (seeded, ``seed``), unbiased MMD^2 with the polynomial
    kernel ``(x.y / d + 1)^3`` (torchmetrics' ``poly_mmd``, here on float64). torchmetrics raises
    when a side has fewer rows than ``subset_size``; here the subset size is clipped to the
    smaller side and the rows get flag ``subset_size=<m>``.
    Fewer than 2 edits or 2 reference images: NaN rows flagged ``too_few`` (a covariance, and the
    unbiased MMD, need 2 samples).

Shards (``dataset.shard=i/n``, harness.merge)
    A shard of a job does not compute the set's value: between :meth:`begin_log` and
    :meth:`take_log` it keeps what :meth:`update` saw (each edit's float32 feature row, its
    reference image's content hash, each new reference image's features), which the runner stores
    in the shard's folder. The merge puts every shard's rows in the order an unsharded job streams
    its set (sample id order) and :meth:`replay` feeds them in the same batches, so the float64
    sums, and so FID (and KID's reservoir and subsets), are those of the unsharded job. A reference
    image shared by samples of different shards counts once, as unsharded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from ..fileio import atomic_write
from ..registry import METRICS
from ..types import ScoreValue
from ._feature_cache import image_hash
from .base import resolve_device, MetricUnavailable, ScoringItem, SetMetric
from .perceptual import torch_hub_dir

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity downloads the same weights under this name into the same hub folder.
INCEPTION_FILES = (INCEPTION_FILE, "weights-inception-2015-12-05-6726825d.pth")
MODES = ("torchmetrics", "torch_fidelity", "clean")
REFERENCES = ("source", "target")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
INPUT_SIZE = 299
FEATURE_DIM = 2048
RANDOM_WEIGHTS = "RANDOM WEIGHTS (smoke run)"
MODE_TEXT = {
    "torchmetrics": "torchmetrics FID input: uint8, bilinear antialias resize to 299 (torch interpolate)",
    "torch_fidelity": "torch-fidelity input: uint8, TF1-compatible bilinear resize to 299 (no antialias)",
    "clean": "clean-fid resize: per-channel float PIL bicubic to 299, clip [0,255], float input "
             "(= cleanfid.resize.build_resizer('clean'))",
}

# (weights file or 'random:<seed>', antialias, device) -> network; loaded once per process.
_MODELS: dict[tuple[str, bool, str], Any] = {}
_LOCK = threading.Lock()
_FILE_HASHES: dict[tuple[str, int, int], str] = {}

FeatureFn = Callable[[list[np.ndarray]], np.ndarray]


# --------------------------------------------------------------------------------------------
# Weights (no torch import)
# --------------------------------------------------------------------------------------------
def resolve_inception(weights_path: str | None = None) -> Path | str:
    """The Inception weights file to use, or the reason none is usable (names file and place)."""
    hub = torch_hub_dir() / "checkpoints"
    if weights_path:
        p = Path(os.path.expanduser(str(weights_path)))
        if p.is_file():
            return p
        return f"FID Inception: weights_path '{p}' given in the metric config does not exist"
    for name in INCEPTION_FILES:
        if (hub / name).is_file():
            return hub / name
    return (
        f"FID Inception: weights file {INCEPTION_FILE} not found (no download is attempted). Provide one of: "
        f"(a) weights_path=<local {INCEPTION_FILE}> in the metric config; (b) the file at "
        f"{hub / INCEPTION_FILE} (torch hub cache; set TORCH_HOME to the folder holding hub/checkpoints/; "
        f"torch-fidelity's name {INCEPTION_FILES[1]} is accepted too). It is pytorch-fid's / torch-fidelity's "
        f"release asset (github.com/mseitzer/pytorch-fid releases fid_weights). "
        f"Or set allow_random_weights: true for a smoke run (numbers meaningless)"
    )


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def _short_hash(obj: Any, n: int = 20) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------
def _inception_class():
    """torchmetrics' NoTrainInceptionV3 (torch-fidelity's FeatureExtractorInceptionV3) that skips
    the state-dict load in its constructor, so that nothing is downloaded or unpickled there."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    class _NoLoadInceptionV3(NoTrainInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # type: ignore[override]
            if isinstance(state_dict, dict) and not state_dict:  # the constructor's empty placeholder
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    return _NoLoadInceptionV3


def load_inception(weights: Path | None, antialias: bool, device: str = "cpu", random_seed: int = 0):
    """The FID Inception (pool3 2048-d) with ``weights`` (None: seeded random), cached per process."""
    key = (str(Path(weights).resolve()) if weights is not None else f"random:{random_seed}", bool(antialias), device)
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
        import torch

        cls = _inception_class()
        with tempfile.TemporaryDirectory() as td:
            empty = Path(td) / "empty.pth"
            torch.save({}, empty)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(random_seed))
                model = cls(name="inception-v3-compat", features_list=[str(FEATURE_DIM)],
                            feature_extractor_weights_path=str(empty), antialias=bool(antialias))
                if weights is None:
                    # Default init shrinks activations layer by layer to ~0; He-normal convs keep
                    # the scale so that random features are not degenerate.
                    for m in model.modules():
                        if isinstance(m, torch.nn.Conv2d):
                            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if weights is not None:
            sd = torch.load(str(weights), map_location="cpu", weights_only=True)
            model.load_state_dict(sd, strict=True)
        model = model.eval().requires_grad_(False).to(device)
        _MODELS[key] = model
        return model


def clean_resize(img: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's 'clean' resize: per channel float32 PIL image, bicubic, clip to [0, 255]."""
    from PIL import Image

    chans = []
    for c in range(3):
        im = Image.fromarray(np.ascontiguousarray(img[:, :, c]).astype(np.float32))
        assert im.mode == "F"
        chans.append(np.asarray(im.resize((size, size), resample=Image.BICUBIC)).clip(0, 255).reshape(size, size, 1))
    return np.concatenate(chans, axis=2).astype(np.float32)


def inception_from_299(model, x):
    """Pool3 features of float N x 3 x 299 x 299 input in [0, 255]: torch-fidelity's forward
    after its resize step ((x - 128) / 128, then the layers in its order)."""
    import torch

    x = (x - 128) / 128
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                 "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
        x = getattr(model, name)(x)
    return torch.flatten(x, 1)


# --------------------------------------------------------------------------------------------
# Accumulation and math
# --------------------------------------------------------------------------------------------
class FeatureStats:
    """Streaming statistics of one side: float64 sum and outer-product sum (FID) and/or a bounded
    float32 reservoir of feature rows (KID)."""

    def __init__(self, moments: bool = True, keep: int = 0, seed: int = 0):
        self.moments = moments
        self.keep = int(keep)
        self.n = 0
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None
        self.rows: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats)
        if f.ndim != 2:
            raise ValueError(f"features must be N x D, got shape {f.shape}")
        if f.shape[0] == 0:
            return
        if self.moments:
            f64 = f.astype(np.float64)
            if self.sum is None:
                self.sum = np.zeros(f.shape[1], np.float64)
                self.outer = np.zeros((f.shape[1], f.shape[1]), np.float64)
            self.sum += f64.sum(axis=0)
            self.outer += f64.T @ f64
        if self.keep > 0:
            f32 = f.astype(np.float32)
            have = 0 if self.rows is None else self.rows.shape[0]
            take = min(self.keep - have, f32.shape[0])
            if take > 0:
                self.rows = f32[:take].copy() if self.rows is None else np.concatenate([self.rows, f32[:take]])
            for i in range(take, f32.shape[0]):  # reservoir sampling (Algorithm R) beyond the cap
                j = int(self._rng.integers(0, self.n + i + 1))
                if j < self.keep:
                    self.rows[j] = f32[i]
        self.n += f.shape[0]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance, torchmetrics' formula."""
        assert self.sum is not None and self.outer is not None and self.n >= 2
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov

    # -- disk -----------------------------------------------------------------------------
    def save(self, path: Path, meta: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {"n": np.array(self.n), "meta": np.array(json.dumps(meta))}
        if self.sum is not None:
            arrays["sum"] = self.sum
            arrays["outer"] = self.outer
        if self.rows is not None:
            arrays["rows"] = self.rows
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: Path, moments: bool, keep: int) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as z:
            s = cls(moments=moments, keep=keep)
            s.n = int(z["n"])
            if moments:
                if "sum" not in z:
                    raise ValueError(f"{path}: no moments stored")
                s.sum, s.outer = z["sum"].astype(np.float64), z["outer"].astype(np.float64)
            if keep:
                if "rows" not in z:
                    raise ValueError(f"{path}: no feature rows stored")
                s.rows = z["rows"].astype(np.float32)
        return s


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID of two Gaussians with torchmetrics' ``_compute_fid`` in float64."""
    import torch
    from torchmetrics.image.fid import _compute_fid

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
    return float(_compute_fid(t(mu1), t(sigma1), t(mu2), t(sigma2)))


def kid_from_features(fx: np.ndarray, fy: np.ndarray, subsets: int, subset_size: int, degree: int = 3,
                      gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float, int]:
    """(mean, population std, subset size used) of torchmetrics' ``poly_mmd`` over random subsets."""
    import torch
    from torchmetrics.image.kid import poly_mmd

    m = min(int(subset_size), fx.shape[0], fy.shape[0])
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.asarray(fx, np.float64))
    y = torch.from_numpy(np.asarray(fy, np.float64))
    vals = []
    for _ in range(int(subsets)):
        ix = torch.from_numpy(rng.permutation(fx.shape[0])[:m])
        iy = torch.from_numpy(rng.permutation(fy.shape[0])[:m])
        vals.append(float(poly_mmd(x[ix], y[iy], degree, gamma, coef)))
    v = np.asarray(vals, np.float64)
    return float(v.mean()), float(v.std()), m


# --------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------
class InceptionSetMetric(SetMetric):
    """Shared machinery of FID and KID: feature extraction, reference set, caches."""

    higher_is_better: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    param_defaults: ClassVar[dict[str, Any]] = {
        "reference_dir": None,
        "stats_cache_dir": "~/.cache/edit-harness/fid",
        "weights_path": None,
        "allow_random_weights": False,
        "random_seed": 0,
        "mode": "torchmetrics",
        "device": "auto",
        "max_batch": 32,
    }
    uses_moments: ClassVar[bool] = True
    # Inception features (torch, torch-fidelity's network), Pillow / torchvision resizing,
    # torchmetrics' FID and KID formulas.
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow", "torch", "torchvision", "torchmetrics",
                                                    "torch-fidelity")
    keeps_rows: ClassVar[bool] = False

    def __init__(self, *, protocol: str = "default", name: str | None = None, reference: str = "source",
                 regions: Any = None, region_rule: Any = None, **params: Any):
        super().__init__(protocol=protocol, name=name, **params)
        p = self.params
        self.reference_dir = Path(os.path.expanduser(str(p["reference_dir"]))) if p["reference_dir"] else None
        if self.reference_dir is None and reference not in REFERENCES:
            raise ValueError(f"metric '{self.name}': reference must be one of {', '.join(REFERENCES)} "
                             f"(or give reference_dir), got {reference!r}")
        self.reference = "dir" if self.reference_dir is not None else reference
        self.mode = str(p["mode"])
        if self.mode not in MODES:
            raise ValueError(f"metric '{self.name}': mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.cache_dir = Path(os.path.expanduser(str(p["stats_cache_dir"]))) if p["stats_cache_dir"] else None
        self.allow_random = bool(p["allow_random_weights"])
        self.random_seed = int(p["random_seed"])
        self.device_param = str(p["device"])
        self.max_batch = int(p["max_batch"])
        self._model = None
        self._device = "cpu"
        self._feature_fn: FeatureFn | None = None
        self._feature_key: str | None = None
        self._ref_dir_stats: FeatureStats | None = None
        self.reset()

    # -- configuration hooks --------------------------------------------------------------
    def _keep(self) -> int:
        return 0

    def _stats(self, seed_offset: int = 0) -> FeatureStats:
        return FeatureStats(moments=self.uses_moments, keep=self._keep(), seed=self._seed() + seed_offset)

    def _seed(self) -> int:
        return 0

    def reset(self) -> None:
        super().reset()
        self._edits = self._stats(0)
        self._ref = self._stats(1)
        self._seen_refs: set[str] = set()
        self._log: dict[str, Any] | None = None

    # -- shards: a shard logs its features, the merge replays every shard's in one order ---------
    def begin_log(self) -> None:
        """From now until :meth:`take_log`, keep what :meth:`update` sees: each edit's feature row,
        the content hash of its reference image ('' for none) and each new reference image's
        features. A shard of a sharded job stores this (harness.merge.write_set_parts)."""
        self._log = {"edit": [], "ref_hash": [], "ref_rows": {}}

    def take_log(self) -> dict[str, Any]:
        """The log since :meth:`begin_log`: ``edit`` (N x D float32), ``ref_hash`` (N strings),
        ``ref_rows`` (hash -> D features of each reference image seen)."""
        log, self._log = self._log, None
        if log is None:
            raise RuntimeError(f"metric '{self.name}': take_log() without begin_log()")
        edit = np.concatenate(log["edit"]) if log["edit"] else np.zeros((0, FEATURE_DIM), np.float32)
        return {"edit": edit, "ref_hash": list(log["ref_hash"]), "ref_rows": dict(log["ref_rows"])}

    def replay(self, edit_rows: np.ndarray, ref_hashes: Sequence[str], ref_rows: dict[str, np.ndarray],
               batch_size: int) -> list[ScoreValue]:
        """The set's values from logged features (every shard's, in the unsharded job's order),
        fed in batches of ``batch_size`` exactly as :meth:`update` adds them in an unsharded job:
        the same rows, the same float64 sums in the same order, so the same value (FID, and KID's
        reservoir and subsets). The reference side counts each image (content hash) once."""
        self.reset()
        edit_rows = np.asarray(edit_rows)
        for start in range(0, edit_rows.shape[0], int(batch_size)):
            self._edits.add(edit_rows[start : start + batch_size])
            if self.reference_dir is not None:
                continue
            new: list[str] = []
            for h in ref_hashes[start : start + batch_size]:
                if h and h not in self._seen_refs and h not in new:
                    new.append(h)
            if new:
                self._ref.add(np.stack([np.asarray(ref_rows[h]) for h in new]))
                self._seen_refs.update(new)
        return self.compute_set()

    # -- description ----------------------------------------------------------------------
    def _resolved(self) -> Path | str | None:
        """Weights file, None for random weights, or the reason the metric cannot run."""
        r = resolve_inception(self.params["weights_path"])
        if isinstance(r, str) and self.allow_random and not self.params["weights_path"]:
            return None
        return r

    def available(self) -> str | None:
        if self._feature_fn is not None:
            return None
        for pkg in ("torch", "torch_fidelity", "torchmetrics"):
            if importlib.util.find_spec(pkg) is None:
                return f"{self.name} needs the '{pkg}' package: pip install {pkg.replace('_', '-')}"
        if self.reference_dir is not None and not self.reference_dir.is_dir():
            return f"{self.name}: reference_dir '{self.reference_dir}' is not a folder"
        r = self._resolved()
        return r if isinstance(r, str) else None

    def weights(self) -> str:
        ref = f"reference {self.reference_dir}" if self.reference_dir is not None else f"reference: job {self.reference} images"
        if self._feature_fn is not None:
            return f"custom feature extractor {self._feature_key}; {ref}"
        r = self._resolved()
        if isinstance(r, str):
            return f"FID InceptionV3 (torch-fidelity, TF 2015-12-05) pool3 2048-d; weights unavailable; {ref}"
        w = RANDOM_WEIGHTS + f" seed {self.random_seed}" if r is None else f"weights {r}"
        return f"FID InceptionV3 (torch-fidelity, TF 2015-12-05) pool3 2048-d, {w}; {MODE_TEXT[self.mode]}; {ref}"

    def region_rule(self) -> str:
        return "whole images, one value per job (set metric)"

    # -- features -------------------------------------------------------------------------
    def set_feature_extractor(self, fn: FeatureFn | None, key: str = "custom") -> None:
        """Replace the Inception by ``fn(list of RGB uint8 HxWx3) -> N x D array`` (tests, other
        backbones); ``key`` names it in cache keys."""
        self._feature_fn = fn
        self._feature_key = key if fn is not None else None
        self._ref_dir_stats = None

    def feature_key(self) -> str:
        """Identity of the feature extractor for cache keys: mode + weights hash (or seed)."""
        if self._feature_fn is not None:
            return f"custom:{self._feature_key}"
        r = self._resolved()
        if isinstance(r, str):
            raise MetricUnavailable(r)
        w = f"random:{self.random_seed}" if r is None else f"sha256:{file_sha256(r)}"
        return f"inception-2015-12-05/pool3-2048/{w}/mode:{self.mode}"

    def load(self) -> None:
        if self._feature_fn is not None or self._model is not None:
            return
        r = self._resolved()
        if isinstance(r, str):
            raise MetricUnavailable(r)
        dev = resolve_device(self.device_param)
        self._device = dev
        self._model = load_inception(r, antialias=self.mode != "torch_fidelity", device=dev, random_seed=self.random_seed)

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N x 2048 features (float32) of RGB uint8 HxWx3 images."""
        images = [np.asarray(im) for im in images]
        for im in images:
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                raise TypeError(f"{self.name}: expected RGB uint8 HxWx3 images, got {im.dtype} {im.shape}")
        if not images:
            return np.zeros((0, FEATURE_DIM), np.float32)
        if self._feature_fn is not None:
            return np.asarray(self._feature_fn(list(images)))
        self.load()
        import torch

        out: list[np.ndarray | None] = [None] * len(images)
        if self.mode == "clean":
            groups = {(INPUT_SIZE, INPUT_SIZE): list(range(len(images)))}
        else:
            groups = {}
            for i, im in enumerate(images):  # the resize runs on a stacked tensor: group equal sizes
                groups.setdefault(im.shape[:2], []).append(i)
        with torch.no_grad():
            for idx in groups.values():
                for start in range(0, len(idx), self.max_batch):
                    chunk = idx[start : start + self.max_batch]
                    if self.mode == "clean":
                        x = np.stack([clean_resize(images[i]) for i in chunk]).transpose(0, 3, 1, 2)
                        x = torch.from_numpy(np.ascontiguousarray(x)).to(self._device)
                        f = inception_from_299(self._model, x)
                    else:
                        x = np.stack([images[i] for i in chunk]).transpose(0, 3, 1, 2)
                        f = self._model(torch.from_numpy(np.ascontiguousarray(x)).to(self._device))
                    f = f.float().cpu().numpy()
                    for j, i in enumerate(chunk):
                        out[i] = f[j]
        return np.stack(out).astype(np.float32)  # type: ignore[arg-type]

    # -- reference: per-image cache (source / target) ---------------------------------------
    def _feature_dir(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "features" / _short_hash(self.feature_key())

    def _reference_features(self, images: list[np.ndarray], hashes: list[str]) -> np.ndarray:
        """Features of reference images, read from / written to the per-image cache."""
        fdir = self._feature_dir()
        feats: list[np.ndarray | None] = [None] * len(images)
        missing = []
        for i, h in enumerate(hashes):
            p = fdir / h[:2] / f"{h}.npy" if fdir is not None else None
            if p is not None and p.is_file():
                try:
                    feats[i] = np.load(p, allow_pickle=False)
                    continue
                except (OSError, ValueError):
                    pass
            missing.append(i)
        if missing:
            new = self.extract([images[i] for i in missing])
            for i, f in zip(missing, new):
                feats[i] = f
                if fdir is not None:
                    p = fdir / hashes[i][:2] / f"{hashes[i]}.npy"
                    # float32 for the Inception; as given otherwise
                    atomic_write(p, lambda fh, f=f: np.save(fh, np.asarray(f)))
        return np.stack(feats)  # type: ignore[arg-type]

    # -- reference: folder -------------------------------------------------------------------
    def reference_files(self) -> list[Path]:
        assert self.reference_dir is not None
        return sorted((p for p in self.reference_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS),
                      key=lambda p: p.relative_to(self.reference_dir).as_posix())

    def reference_key(self) -> str:
        """Hash of (folder identity, extractor identity, what is stored)."""
        assert self.reference_dir is not None
        files = []
        for p in self.reference_files():
            st = p.stat()
            files.append([p.relative_to(self.reference_dir).as_posix(), st.st_size, st.st_mtime_ns])
        return _short_hash({"files": files, "extractor": self.feature_key(), "moments": self.uses_moments,
                            "keep": self._keep(), "seed": self._seed() + 1}, 32)

    def reference_dir_stats(self) -> FeatureStats:
        """The folder's statistics: from memory, the disk cache, or computed (then cached)."""
        if self._ref_dir_stats is not None:
            return self._ref_dir_stats
        key = self.reference_key()
        path = self.cache_dir / f"ref-{key}.npz" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                self._ref_dir_stats = FeatureStats.load(path, self.uses_moments, self._keep())
                return self._ref_dir_stats
            except (OSError, ValueError, KeyError):
                pass
        from PIL import Image

        stats = self._stats(1)
        files = self.reference_files()
        for start in range(0, len(files), self.max_batch):
            batch = []
            for p in files[start : start + self.max_batch]:
                with Image.open(p) as im:
                    batch.append(np.asarray(im.convert("RGB")))
            stats.add(self.extract(batch))
        if path is not None:
            stats.save(path, {"reference_dir": str(self.reference_dir), "files": len(files),
                              "extractor": self.feature_key()})
        self._ref_dir_stats = stats
        return stats

    # -- set protocol ---------------------------------------------------------------------
    def update(self, items: Sequence[ScoringItem]) -> None:
        if not items:
            return
        feats = self.extract([np.asarray(it.edit) for it in items])
        self._edits.add(feats)
        log = self._log
        if log is not None:
            log["edit"].append(np.asarray(feats))
        if self.reference_dir is not None:
            if log is not None:
                log["ref_hash"].extend([""] * len(items))
            return
        imgs, hashes, item_hashes = [], [], []
        for it in items:
            ref = it.sample.source if self.reference == "source" else it.sample.target
            if ref is None:
                item_hashes.append("")
                continue
            ref = np.asarray(ref)
            h = image_hash(ref)
            item_hashes.append(h)
            if h in self._seen_refs or h in hashes:
                continue
            imgs.append(ref)
            hashes.append(h)
        if log is not None:
            log["ref_hash"].extend(item_hashes)
        if imgs:
            rows = self._reference_features(imgs, hashes)
            self._ref.add(rows)
            self._seen_refs.update(hashes)
            if log is not None:
                log["ref_rows"].update(zip(hashes, np.asarray(rows)))

    def _reference_stats(self) -> FeatureStats:
        return self.reference_dir_stats() if self.reference_dir is not None else self._ref

    def compute_set(self) -> list[ScoreValue]:
        if self._edits.n < 2:
            return self.nan_rows("too_few")
        ref = self._reference_stats()
        if ref.n < 2:
            return self.nan_rows("too_few")
        return self._compute(self._edits, ref)

    def _compute(self, edits: FeatureStats, ref: FeatureStats) -> list[ScoreValue]:
        raise NotImplementedError


@METRICS.register("fid")
class FID(InceptionSetMetric):
    """Fréchet Inception Distance between the job's edits and the reference set. Lower is better.

    Parameters (defaults): ``reference`` (source | target; from the suite's common keys),
    ``reference_dir`` (None; a folder of reference images, overrides ``reference``),
    ``stats_cache_dir`` (~/.cache/edit-harness/fid), ``weights_path`` (None),
    ``allow_random_weights`` (False), ``random_seed`` (0), ``mode`` (torchmetrics |
    torch_fidelity | clean), ``device`` (auto), ``max_batch`` (32 images per forward pass).
    """

    uses_moments = True

    def _compute(self, edits: FeatureStats, ref: FeatureStats) -> list[ScoreValue]:
        mu1, s1 = ref.mean_cov()
        mu2, s2 = edits.mean_cov()
        return [ScoreValue(self.name, "all", frechet_distance(mu1, s1, mu2, s2))]


@METRICS.register("kid")
class KID(InceptionSetMetric):
    """Kernel Inception Distance (unbiased MMD^2, cubic polynomial kernel). Lower is better.

    Rows: region ``all`` = mean over subsets, region ``std`` = population std over subsets.
    Parameters: those of :class:`FID` plus ``kid_subsets`` (100), ``kid_subset_size`` (1000),
    ``kid_degree`` (3), ``kid_gamma`` (None = 1/D), ``kid_coef`` (1.0), ``kid_max_features``
    (10000 rows kept per side, reservoir-sampled beyond), ``seed`` (0; subsets and reservoir).
    """

    uses_moments = False
    param_defaults: ClassVar[dict[str, Any]] = {
        **InceptionSetMetric.param_defaults,
        "kid_subsets": 100,
        "kid_subset_size": 1000,
        "kid_degree": 3,
        "kid_gamma": None,
        "kid_coef": 1.0,
        "kid_max_features": 10000,
        "seed": 0,
    }

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        for k in ("kid_subsets", "kid_subset_size", "kid_degree", "kid_max_features"):
            if int(self.params[k]) < 1:
                raise ValueError(f"metric '{self.name}': {k} must be >= 1, got {self.params[k]!r}")

    def _keep(self) -> int:
        return int(self.params["kid_max_features"])

    def _seed(self) -> int:
        return int(self.params["seed"]) * 1000

    def regions(self) -> tuple[str, ...]:
        return ("all", "std")

    def _compute(self, edits: FeatureStats, ref: FeatureStats) -> list[ScoreValue]:
        p = self.params
        gamma = None if p["kid_gamma"] is None else float(p["kid_gamma"])
        mean, std, m = kid_from_features(ref.rows, edits.rows, int(p["kid_subsets"]), int(p["kid_subset_size"]),
                                         int(p["kid_degree"]), gamma, float(p["kid_coef"]), int(p["seed"]))
        flag = f"subset_size={m}" if m < int(p["kid_subset_size"]) else None
        return [ScoreValue(self.name, "all", mean, flag), ScoreValue(self.name, "std", std, flag)]
