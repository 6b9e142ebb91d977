"""CLIP metrics with open_clip: ``clip_i``, ``clip_t``, ``clip_directional``, ``clipscore``.

Model loading, the offline-first weight resolution and the feature cache are in
``_clip_models.py`` (torch and open_clip are imported only when a model is loaded).

Embeddings. Each image (RGB uint8) goes through the model's own open_clip eval transform at its
own size (for ``openai`` tags: bicubic resize of the shortest side, centre crop, OpenAI mean/std
= OpenAI CLIP's ``_transform``); the edit is NOT first resized to the reference's size. Texts
go through open_clip's tokenizer (77 tokens, truncated). Embeddings are L2-normalised in float64
and compared by cosine.

Values. ``value = scale * cos``, then the ``clamp`` rule:

- ``none``: no clamp (MagicBrush CLIP-I / CLIP-T: ``scale=1``, ``clamp=none``);
- ``per_image``: each edit's value is ``max(scale * cos, 0)`` (PIE-Bench CLIP: ``scale=100``,
  ``clamp=per_image``, ViT-L-14, whole image and edited part);
- ``mean``: the protocol clamps the MEAN, not the edits (torchmetrics ``CLIPScore``:
  ``max(mean(100 * cos), 0)``). Per-edit rows are written UNCLAMPED (so per-edit plots and
  breakdowns stay exact); the metric says so in its ``region_rule`` text (written into tables)
  and exposes ``mean_clamp_min = 0.0``: the aggregate that reproduces the protocol is
  ``max(mean, 0)`` (:func:`clamped_mean`). With the torchmetrics-sized numbers (100*cos of real
  image/caption pairs, ~20-35) the clamp never binds in practice.

``clipscore`` defaults (``scale=100``, ``clamp=mean``, ViT-L-14 ``openai``) make it equal
torchmetrics' ``CLIPScore()`` default (``openai/clip-vit-large-patch14``) up to the preprocessing
implementation (torchvision vs transformers' CLIPImageProcessor, both bicubic shortest-side +
centre crop) and the batching of the mean.

``clip_directional`` (InstructPix2Pix): cos(ê(edit) - ê(source), t̂(target_caption) -
t̂(source_caption)) with ê, t̂ the L2-normalised embeddings. When a direction vanishes the cosine
is undefined: identical captions (or text embeddings closer than 1e-6) give NaN flagged
``zero_text_direction``; an edit whose image embedding equals the source's (an identity edit)
gives NaN flagged ``zero_image_direction``. These NaNs are excluded from means and counted.

Precision (``precision``): ``fp32`` (default) or ``fp16``, OpenAI's mixed float16 as ``clip.load``
builds it on a GPU, which is how MagicBrush's ``image_eval.py`` computed CLIP-I and CLIP-T
(``_clip_models.py``). fp16 needs a CUDA device: on any other device the metric is unavailable
with the reason (CPU float16 kernels give neither the GPU's numbers nor usable speed: ViT-B/32
took ~8 s per image on 2 cores), never silently run in another precision. The precision is named
in every table.

Image (``clip_t``/``clipscore``, ``image_field``): ``edit`` (default), or ``source`` / ``target``:
the sample's own image, whatever the edit (PIE-Bench's ``clip_similarity_source_image``: the
source image vs the source prompt, the score the benchmark reports beside the edits').

Regions. These metrics report region ``all`` (the whole image). ``clip_t``/``clipscore`` with
``image_region: edited`` report region ``edited``: the edit multiplied by the sample's mask
(zero outside; PIE-Bench's "edited part": target image * mask), the mask resized nearest to the
edit's grid; no mask -> NaN ``no_mask``, empty mask -> NaN ``empty_region``. The suite's common
``regions``/``region_rule`` keys are accepted and ignored; ``reference`` is used by ``clip_i``
only (source | target; a sample without target gives NaN ``missing:target``).

Missing fields give NaN rows flagged ``missing:<field>`` (captions are not in ``requires``, so
samples without them are counted, not silently skipped).

Caching. Embeddings are cached in-process by (model key, sha1 of the image bytes / caption), so
a source image or caption shared by many methods/metrics is encoded once per process, and an
edit scored by several CLIP metrics is encoded once. ``feature_cache_dir`` also stores the
method-independent embeddings (source/target images, captions) as ``.npy`` files under
``<dir>/<model key>/`` (never for random weights).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import numpy as np

from ..registry import METRICS
from ..types import Sample, ScoreValue
from .base import REFERENCES, Metric, MetricUnavailable, ScoringItem, region_flag, resize_mask_like, resolve_device
from ._clip_models import RANDOM_WEIGHTS_TEXT, Resolved, load_clip, resolve_weights  # noqa: F401

CLAMPS = ("none", "per_image", "mean")
TEXT_FIELDS = ("target_caption", "instruction", "source_caption")
IMAGE_FIELDS = ("edit", "source", "target")
IMAGE_REGIONS = ("all", "edited")
DIRECTION_EPS = 1e-6

COMMON_DEFAULTS: dict[str, Any] = {
    "model": "ViT-B-32",
    "pretrained": "openai",
    "weights_path": None,
    "allow_random_weights": False,
    "device": "auto",
    "batch_size": 16,
    "scale": 1.0,
    "clamp": "none",
    "feature_cache_dir": None,
    "precision": "fp32",
}
PRECISION_TEXT = {
    "fp32": "fp32",
    "fp16": "fp16 (OpenAI clip.load on CUDA: fp16 weights and activations, LayerNorm in fp32)",
}


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of raw embeddings (each row L2-normalised first)."""
    return np.sum(normalize_rows(a) * normalize_rows(b), axis=-1)


def apply_scale_clamp(cos: float, scale: float, clamp: str) -> float:
    v = float(scale) * float(cos)
    return max(v, 0.0) if clamp == "per_image" else v


def clamped_mean(values: Sequence[float]) -> float:
    """The ``clamp=mean`` aggregate (torchmetrics CLIPScore): max(mean of non-NaN values, 0)."""
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float("nan") if a.size == 0 else max(float(a.mean()), 0.0)


class _ClipMetric(Metric):
    """Shared parameters, weight resolution and loading of the CLIP metrics (see module doc)."""

    higher_is_better: ClassVar[bool] = True
    version: ClassVar[str] = "1"
    numeric_libraries: ClassVar[tuple[str, ...]] = ("numpy", "pillow", "torch", "torchvision", "open_clip_torch")
    param_defaults: ClassVar[dict[str, Any]] = dict(COMMON_DEFAULTS)

    def __init__(
        self,
        *,
        protocol: str = "default",
        name: str | None = None,
        reference: str | None = None,
        regions: Sequence[str] | None = None,  # suite common key: ignored (see image_region)
        region_rule: str | None = None,  # suite common key: ignored
        **params: Any,
    ):
        super().__init__(protocol=protocol, name=name, **params)
        p = self.params
        self.model_name = str(p["model"])
        self.pretrained = None if p["pretrained"] in (None, "", "none", "None") else str(p["pretrained"])
        self.read_model_params()
        self.clamp = str(p["clamp"])
        if self.clamp not in CLAMPS:
            raise ValueError(f"metric '{self.name}': clamp must be one of {', '.join(CLAMPS)}, got {self.clamp!r}")
        self.feature_cache_dir = p["feature_cache_dir"]
        self.precision_param = str(p["precision"])
        if self.precision_param not in PRECISION_TEXT:
            raise ValueError(f"metric '{self.name}': precision must be one of {', '.join(PRECISION_TEXT)}, "
                             f"got {p['precision']!r}")
        self.reference = str(reference or "source")
        if self.reference not in REFERENCES:
            raise ValueError(f"metric '{self.name}': reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        # For the torchmetrics protocol: the value to clamp the aggregate mean at (None = no clamp).
        self.mean_clamp_min: float | None = 0.0 if self.clamp == "mean" else None
        self._resolved: Resolved | str | None = None
        self._bundle = None

    # -- description ----------------------------------------------------------------------
    def resolved(self) -> Resolved | str:
        if self._resolved is None:
            self._resolved = resolve_weights(self.model_name, self.pretrained, self.weights_path, self.allow_random)
        return self._resolved

    def precision_problem(self) -> str | None:
        """Why the configured precision cannot run on this metric's device, or None.

        fp16 is refused off CUDA (module doc). With ``device: auto`` this asks torch whether CUDA
        is there, so an fp16 protocol imports torch even when all its scores are cached."""
        if self.precision_param != "fp16":
            return None
        dev = resolve_device(self.device_param)
        if dev.startswith("cuda"):
            return None
        return (f"CLIP '{self.name}': precision fp16 reproduces CLIP run in float16 on a CUDA GPU (OpenAI clip.load, "
                f"as MagicBrush's image_eval.py), but the device here is '{dev}'; CPU float16 kernels give neither the "
                f"GPU's numbers nor usable speed. Run on a GPU, or set precision: fp32 (the harness's default)")

    def available(self) -> str | None:
        r = self.resolved()
        return r if isinstance(r, str) else self.precision_problem()

    def precision(self) -> str | None:
        return PRECISION_TEXT[self.precision_param]

    def weights(self) -> str:
        r = self.resolved()
        if isinstance(r, str):
            return f"open_clip {self.model_name} / pretrained={self.pretrained!r}; weights unavailable"
        return r.where + ("; QuickGELU" if r.quick_gelu else "")

    def value_rule(self) -> str:
        s = "100*cos" if self.scale == 100 else ("cos" if self.scale == 1 else f"{self.scale:g}*cos")
        if self.clamp == "per_image":
            return f"{s}, clamped at 0 per edit"
        if self.clamp == "mean":
            return f"{s}; per-edit values unclamped, the protocol's mean is max(mean, 0) (torchmetrics CLIPScore)"
        return f"{s}, no clamp"

    def region_rule(self) -> str:
        return f"whole image; {self.value_rule()}"

    # -- model ----------------------------------------------------------------------------
    def load(self) -> None:
        if self._bundle is not None:
            return
        r = self.resolved()
        if isinstance(r, str):
            raise MetricUnavailable(r)
        problem = self.precision_problem()
        if problem:
            raise MetricUnavailable(problem)
        self._bundle = load_clip(self.model_name, self.pretrained, self.weights_path, self.device_param, self.allow_random,
                                 precision=self.precision_param)

    @property
    def bundle(self):
        self.load()
        return self._bundle

    def embed_images(self, images: Sequence[np.ndarray], persist: bool) -> np.ndarray:
        if not images:
            return np.zeros((0, 0))
        return self.bundle.embed_images(list(images), self.batch_size, self.feature_cache_dir, [persist] * len(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0))
        return self.bundle.embed_texts(list(texts), self.batch_size, self.feature_cache_dir)

    def value(self, cos: float) -> float:
        return apply_scale_clamp(cos, self.scale, self.clamp)


@METRICS.register("clip_i")
class ClipI(_ClipMetric):
    """CLIP-I: cosine of the image embeddings of the edit and the reference image. Higher is better.

    ``reference`` (suite common key): ``source`` (ZONE) or ``target`` (MagicBrush's ground truth).
    Params: model, pretrained, weights_path, allow_random_weights, device, batch_size, scale (1),
    clamp (none), feature_cache_dir.
    """

    requires: ClassVar[tuple[str, ...]] = ("source",)

    def region_rule(self) -> str:
        return f"whole image, edit vs {self.reference}; {self.value_rule()}"

    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        out: list[list[ScoreValue] | None] = [None] * len(items)
        idx, edits, refs = [], [], []
        for i, it in enumerate(items):
            ref = it.sample.target if self.reference == "target" else it.sample.source
            if ref is None:
                out[i] = self.nan_rows(f"missing:{self.reference}")
                continue
            idx.append(i)
            edits.append(np.asarray(it.edit))
            refs.append(np.asarray(ref))
        if idx:
            cos = cosine_rows(self.embed_images(edits, persist=False), self.embed_images(refs, persist=True))
            for k, i in enumerate(idx):
                out[i] = [ScoreValue(self.name, "all", self.value(cos[k]))]
        return out  # type: ignore[return-value]


@METRICS.register("clip_t")
class ClipT(_ClipMetric):
    """CLIP-T: cosine of the edit's image embedding and a caption's text embedding. Higher is better.

    Params: the common ones (scale 1, clamp none) plus ``text_field`` (target_caption |
    instruction | source_caption; default target_caption), ``image_region`` (``all``: whole
    edit; ``edited``: edit * mask, zero outside, region ``edited``; or a list of both) and
    ``image_field`` (``edit``, default; ``source`` / ``target``: the sample's image instead of the
    edit, NaN ``missing:<field>`` without it).
    """

    requires: ClassVar[tuple[str, ...]] = ()
    param_defaults: ClassVar[dict[str, Any]] = {**COMMON_DEFAULTS, "text_field": "target_caption", "image_region": "all",
                                                "image_field": "edit"}

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.text_field = str(self.params["text_field"])
        if self.text_field not in TEXT_FIELDS:
            raise ValueError(f"metric '{self.name}': text_field must be one of {', '.join(TEXT_FIELDS)}, got {self.text_field!r}")
        ir = self.params["image_region"]
        ir = (ir,) if isinstance(ir, str) else tuple(ir)
        bad = [r for r in ir if r not in IMAGE_REGIONS]
        if bad or not ir:
            raise ValueError(f"metric '{self.name}': image_region must be {' or '.join(IMAGE_REGIONS)} (or a list), got {self.params['image_region']!r}")
        self._regions = tuple(dict.fromkeys(ir))
        self.image_field = str(self.params["image_field"])
        if self.image_field not in IMAGE_FIELDS:
            raise ValueError(f"metric '{self.name}': image_field must be one of {', '.join(IMAGE_FIELDS)}, got {self.image_field!r}")

    def regions(self) -> tuple[str, ...]:
        return self._regions

    def region_rule(self) -> str:
        img = "edit" if self.image_field == "edit" else f"{self.image_field} image"
        parts = {"all": f"whole {img}", "edited": f"{img} * mask (zero outside the edited region, PIE-Bench)"}
        return f"{'; '.join(parts[r] for r in self._regions)} vs {self.text_field}; {self.value_rule()}"

    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        jobs: list[tuple[int, str, np.ndarray, str]] = []  # (item, region, image, text)
        rows: list[dict[str, ScoreValue]] = [{} for _ in items]
        for i, it in enumerate(items):
            text = getattr(it.sample, self.text_field)
            if text is None:
                for r in self._regions:
                    rows[i][r] = ScoreValue(self.name, r, math.nan, f"missing:{self.text_field}")
                continue
            edit = np.asarray(it.edit) if self.image_field == "edit" else getattr(it.sample, self.image_field)
            if edit is None:
                for r in self._regions:
                    rows[i][r] = ScoreValue(self.name, r, math.nan, f"missing:{self.image_field}")
                continue
            edit = np.asarray(edit)
            for r in self._regions:
                if r == "all":
                    jobs.append((i, r, edit, str(text)))
                    continue
                m = it.sample.mask
                if m is None:
                    rows[i][r] = ScoreValue(self.name, r, math.nan, "no_mask")
                    continue
                m = resize_mask_like(m, edit.shape[:2])
                flag = region_flag(m)
                if flag:
                    rows[i][r] = ScoreValue(self.name, r, math.nan, flag)
                    continue
                jobs.append((i, r, (edit * m[..., None]).astype(np.uint8), str(text)))
        if jobs:
            # A sample's own image does not depend on the method: kept in the feature cache.
            img = self.embed_images([j[2] for j in jobs], persist=self.image_field != "edit")
            txt = self.embed_texts([j[3] for j in jobs])
            cos = cosine_rows(img, txt)
            for k, (i, r, _, _) in enumerate(jobs):
                rows[i][r] = ScoreValue(self.name, r, self.value(cos[k]))
        return [[d[r] for r in self._regions] for d in rows]


@METRICS.register("clipscore")
class ClipScore(ClipT):
    """CLIPScore (torchmetrics): 100 * cos(edit, caption); the protocol clamps the mean at 0.

    Same parameters as ``clip_t``; defaults ``model=ViT-L-14``, ``pretrained=openai``,
    ``scale=100``, ``clamp=mean`` = torchmetrics' ``CLIPScore()`` (openai/clip-vit-large-patch14).
    Per-edit rows are unclamped with ``clamp=mean`` (module doc); ``clamp=per_image`` gives
    ``max(100*cos, 0)`` per edit (PIE-Bench's use of CLIPScore on one image at a time).
    """

    param_defaults: ClassVar[dict[str, Any]] = {
        **ClipT.param_defaults, "model": "ViT-L-14", "scale": 100.0, "clamp": "mean",
    }


@METRICS.register("clip_directional")
class ClipDirectional(_ClipMetric):
    """Directional CLIP similarity (InstructPix2Pix). Higher is better.

    cos(ê(edit) - ê(source), t̂(target_caption) - t̂(source_caption)) on L2-normalised embeddings;
    NaN flagged ``zero_text_direction`` / ``zero_image_direction`` when a direction vanishes, and
    ``missing:<field>`` when a caption is missing. Params: the common ones (scale 1, clamp none).
    """

    requires: ClassVar[tuple[str, ...]] = ("source",)

    def region_rule(self) -> str:
        return f"whole image, (edit - source) vs (target_caption - source_caption) directions; {self.value_rule()}"

    def score_batch(self, items: Sequence[ScoringItem]) -> list[list[ScoreValue]]:
        out: list[list[ScoreValue] | None] = [None] * len(items)
        idx: list[int] = []
        for i, it in enumerate(items):
            flag = self.missing_flag(it.sample, ("source", "source_caption", "target_caption"))
            if flag:
                out[i] = self.nan_rows(flag)
            elif it.sample.source_caption.strip() == it.sample.target_caption.strip():
                out[i] = self.nan_rows("zero_text_direction")
            else:
                idx.append(i)
        if idx:
            s: list[Sample] = [items[i].sample for i in idx]
            e_edit = normalize_rows(self.embed_images([np.asarray(items[i].edit) for i in idx], persist=False))
            e_src = normalize_rows(self.embed_images([np.asarray(x.source) for x in s], persist=True))
            t_tgt = normalize_rows(self.embed_texts([str(x.target_caption) for x in s]))
            t_src = normalize_rows(self.embed_texts([str(x.source_caption) for x in s]))
            d_img, d_txt = e_edit - e_src, t_tgt - t_src
            n_img, n_txt = np.linalg.norm(d_img, axis=-1), np.linalg.norm(d_txt, axis=-1)
            for k, i in enumerate(idx):
                if n_txt[k] < DIRECTION_EPS:
                    out[i] = self.nan_rows("zero_text_direction")
                elif n_img[k] < DIRECTION_EPS:
                    out[i] = self.nan_rows("zero_image_direction")
                else:
                    cos = float(np.dot(d_img[k], d_txt[k]) / (n_img[k] * n_txt[k]))
                    out[i] = [ScoreValue(self.name, "all", self.value(cos))]
        return out  # type: ignore[return-value]
