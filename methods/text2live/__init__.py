"""``text2live``: Text2LIVE (Bar-Tal, Ofri-Amar, Fridman, Kasten, Dekel, "Text2LIVE: Text-Driven
Layered Image and Video Editing", ECCV 2022), image editing, as its official code
(``omerbt/Text2LIVE``: ``train_image.py``, ``configs/image_config.yaml``) runs it.

Per edit, a fresh generator (:mod:`.generator`) is optimised on the one input image
(:mod:`.optimise`) to predict an RGBA edit layer that, composited over the input, matches the
texts under CLIP losses (:mod:`.losses`, :mod:`.clip`). The edit is the final composite; the mask
is the edit layer's opacity above ``mask_threshold``.

Texts, from the sample (ZONE's loader puts the edited objects in ``meta``):

- screen text (describes the edit layer alone, over a green screen): ``meta["target_object"]``,
  else the ``target_caption``;
- composition text (describes the whole edited image): the ``target_caption``;
- source text (describes the input; the direction loss goes from it to the composition text):
  the ``source_caption``, else ``meta["source_object"]``; a sample with neither is skipped,
  naming both fields.

The edit's info records each text and the field it came from.

- bootstrap text (only with ``bootstrap_epoch > 0``: the region to edit in the input, official
  ``bootstrap_text``): ``meta["source_object"]``; a sample without it is then skipped, naming it.

Defaults: ``configs/image_config.yaml`` of the official code (each parameter's YAML comment names
its key). The relevancy "bootstrap" term (Chefer et al.'s CLIP relevancy maps as an opacity
target, :meth:`.clip.ClipExtractor.relevance`) is off there (``bootstrap_epoch: -1``); the
golden-horse example turns it on with ``bootstrap_epoch: 1000``. The relevancy maps use the loss
CLIP (the official code loads ViT-B/32 again for them: the same weights with the default
``clip_model``). The official negative bootstrap (``use_negative_bootstrap``, off, with keys the
image config does not define) is not offered. ``d_divisible_crops`` (official 1, a no-op) is not a
parameter; ``seed: -1`` (random) is the harness's seed.

CLIP: open_clip's ``ViT-B-32`` with OpenAI's weights (official ``clip_model_name: ViT-B/32``,
loaded with OpenAI's ``clip.load``, i.e. QuickGELU), found offline as the CLIP metrics find them
(:func:`harness.metrics._clip_models.resolve_weights`: ``clip_weights_path``, the Hugging Face hub
cache, open_clip's URL cache, downloads only with ``EDIT_HARNESS_ALLOW_DOWNLOADS=1``); missing
weights skip every sample with a reason naming what to provide.

``backbone: tiny`` (smoke runs): a random-weight open_clip ``CLIP`` (ViT image tower, 32 px input,
patch 8, width 32) and the "auto" parameters at small values (4 steps, 32 px working size, 4 CLIP
views, a 3-level generator of 8 channels); every table row says RANDOM WEIGHTS.

Network calls (``info["network_calls"]`` / ``network_rows``): ``clip_image`` (one call per image
tower forward: 4 per training image per step for the CLIP views, each of ``n_aug`` rows, 2 for
the structure tokens, and with the bootstrap term 1 for the relevancy map during its steps),
``clip_text`` (3 per edit, 4 with the bootstrap term), ``generator`` (one per training image per
step, plus the final render).

No torch import at module import time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Literal

import numpy as np

from harness.method import Method
from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SkipSample

from .._diffusion_common import (RANDOM_WEIGHTS_TAG, _check_number, auto_field, check_choice, check_unit,
                                 resolve_auto, tiny_threads)
from ..diffusion import counting
from ..diffusion.loading import DEVICES, MissingWeights, resolve_device
from ..diffusion.tiny import RANDOM_WEIGHTS_LABEL

NAME = "text2live"
OWNER = f"method '{NAME}'"
BACKBONES = ("real", "tiny")
OPTIMIZERS = ("madgrad", "adam", "radam", "rmsprop", "sgd")  # official get_optimizer's choices
SCHEDULERS = ("exponential", "none")  # train_image.py applies only 'exponential'; anything else keeps lr
CRITERIA = ("spherical", "cosine")
BOOTSTRAP_SCHEDULERS = ("linear", "exponential", "none")  # official bootstrap_scheduler's choices
ALLOW_DOWNLOADS_ENV = "EDIT_HARNESS_ALLOW_DOWNLOADS"
TINY_REVISION = "tiny-random-open_clip-vit"  # = clip.TINY_REVISION (kept here: no torch import)


@dataclasses.dataclass(frozen=True)
class Texts:
    """The three texts of one edit and the sample field each came from."""

    screen: str
    comp: str
    src: str
    screen_from: str
    comp_from: str
    src_from: str
    bootstrap: str | None = None
    bootstrap_from: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {"screen": self.screen, "comp": self.comp, "src": self.src}


def _meta_text(sample: Sample, key: str) -> str | None:
    """``sample.meta[key]`` as text; None when absent; a bad value raises SkipSample naming it."""
    value = (sample.meta or {}).get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SkipSample(f"{OWNER}: sample '{sample.id}' has meta.{key} = {value!r}; it must be non-empty text")
    return value.strip()


def texts_for(sample: Sample, bootstrap: bool = False) -> Texts:
    """The screen, composition and source texts of ``sample`` (see the module doc), and with
    ``bootstrap`` the bootstrap text, or SkipSample naming the sample and the missing or empty field."""
    comp = (sample.target_caption or "").strip()
    if not comp:
        raise SkipSample(f"{OWNER} needs a non-empty target_caption (the composition text); "
                         f"sample '{sample.id}' has {'an empty one' if sample.target_caption is not None else 'none'}")
    target_object = _meta_text(sample, "target_object")
    screen, screen_from = (target_object, "meta.target_object") if target_object else (comp, "target_caption")
    source_caption = (sample.source_caption or "").strip()
    if source_caption:
        src, src_from = source_caption, "source_caption"
    else:
        source_object = _meta_text(sample, "source_object")
        if not source_object:
            raise SkipSample(f"{OWNER} needs a source text: sample '{sample.id}' has no non-empty source_caption "
                             f"and no meta.source_object")
        src, src_from = source_object, "meta.source_object"
    if not bootstrap:
        return Texts(screen, comp, src, screen_from, "target_caption", src_from)
    region = _meta_text(sample, "source_object")
    if not region:
        raise SkipSample(f"{OWNER} with bootstrap_epoch > 0 needs the region to edit as meta.source_object "
                         f"(the bootstrap text); sample '{sample.id}' has none")
    return Texts(screen, comp, src, screen_from, "target_caption", src_from, region, "meta.source_object")


@METHODS.register(NAME)
class Text2LIVE(Method):
    """Text2LIVE: a per-image optimised RGBA edit layer under CLIP losses."""

    version = "1"
    requires = ("source", "target_caption")
    uses_torch = True
    # the generator and losses (torch), the augmentations and resizes (torchvision), CLIP
    # (open_clip), the official optimiser (madgrad)
    numeric_libraries = ("torch", "torchvision", "open_clip_torch", "madgrad")
    location_params = ("clip_weights_path",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        backbone: Literal["real", "tiny"] = "real"  # tiny = random-weight tiny CLIP, smoke runs only
        device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
        clip_model: str = "ViT-B-32"  # official clip_model_name: "ViT-B/32"
        clip_pretrained: str | None = "openai"  # OpenAI's weights, as the official clip.load
        clip_weights_path: str | None = None  # a checkpoint file or folder (see harness.metrics._clip_models)
        n_epochs: int | Literal["auto"] = auto_field(1000, 4)  # official n_epochs (one step each)
        lr: float = 0.0025  # official lr
        optimizer: Literal["madgrad", "adam", "radam", "rmsprop", "sgd"] = "madgrad"  # official optimizer
        scheduler_policy: Literal["exponential", "none"] = "exponential"  # official scheduler_policy
        gamma: float = 0.99  # official gamma (lr decay per step)
        min_lr: float = 0.00001  # official min_lr
        # official resize_input: the input's short side is resized to it (bilinear); None = as is
        resize_input: int | Literal["auto"] | None = auto_field(512, 32)
        source_image_every: int = 75  # official source_image_every
        crops_min_cover: float = 0.85  # official crops_min_cover
        flip_p: float = 0.5  # official flip_p
        jitter_p: float = 0.1  # official jitter_p
        scale_min: float = 0.8  # official scale_min
        scale_max: float = 1.2  # official scale_max
        text_criterion: Literal["spherical", "cosine"] = "spherical"  # official text_criterion
        lambda_structure: float = 2.0  # official lambda_structure
        lambda_screen: float = 1.0  # official lambda_screen
        lambda_sparsity: float = 6.0  # official lambda_sparsity
        lambda_alpha_l0: float = 0.01  # official lambda_alpha_l0
        lambda_alpha_l1: float = 0.01  # official lambda_alpha_l1
        lambda_composition: float = 1.0  # official lambda_composition
        bootstrap_epoch: int = -1  # official bootstrap_epoch (-1: the relevancy term is off; > 0: its steps)
        lambda_bootstrap: float = 10.0  # official lambda_bootstrap
        lambda_bootstrap_min: float = 0.0  # official lambda_bootstrap_min
        bootstrap_scheduler: Literal["linear", "exponential", "none"] = "linear"  # official bootstrap_scheduler
        bootstrapping_min_cover: float = 1.0  # official bootstrapping_min_cover
        # official relevancy_num_layers (blocks after it make the relevancy map); the tiny CLIP has 2
        relevancy_num_layers: int | Literal["auto"] = auto_field(10, 0)
        n_aug: int | Literal["auto"] = auto_field(16, 4)  # official n_aug (CLIP views per image)
        clip_affine_transform_fill: float = 1.0  # official clip_affine_transform_fill
        skip_n33d: int | Literal["auto"] = auto_field(128, 8)  # official skip_n33d
        skip_n33u: int | Literal["auto"] = auto_field(128, 8)  # official skip_n33u
        skip_n11: int = 4  # official skip_n11
        num_scales: int | Literal["auto"] = auto_field(7, 3)  # official num_scales
        mask_threshold: float = 0.5  # opacity above it -> the edit's mask (not in the official code)

        def __post_init__(self) -> None:
            resolve_auto(self)
            check_choice(OWNER, "backbone", self.backbone, BACKBONES)
            check_choice(OWNER, "device", self.device, DEVICES)
            check_choice(OWNER, "optimizer", self.optimizer, OPTIMIZERS)
            check_choice(OWNER, "scheduler_policy", self.scheduler_policy, SCHEDULERS)
            check_choice(OWNER, "text_criterion", self.text_criterion, CRITERIA)
            if not isinstance(self.clip_model, str) or not self.clip_model.strip():
                raise ValueError(f"{OWNER}: 'clip_model' must be an open_clip model name, got {self.clip_model!r}")
            for name in ("n_epochs", "source_image_every", "n_aug", "skip_n33d", "skip_n33u", "num_scales"):
                _check_number(OWNER, name, getattr(self, name), 1, integer=True)
            _check_number(OWNER, "skip_n11", self.skip_n11, 0, integer=True)
            if self.resize_input is not None:
                _check_number(OWNER, "resize_input", self.resize_input, 1, integer=True)
            _check_number(OWNER, "lr", self.lr, 0.0, inclusive=False)
            _check_number(OWNER, "min_lr", self.min_lr, 0.0)
            check_unit(OWNER, "gamma", self.gamma, low_open=True)
            for name in ("lambda_structure", "lambda_screen", "lambda_sparsity", "lambda_alpha_l0",
                         "lambda_alpha_l1", "lambda_composition"):
                _check_number(OWNER, name, getattr(self, name), 0.0)
            if not any(getattr(self, n) > 0 for n in ("lambda_structure", "lambda_screen", "lambda_sparsity",
                                                       "lambda_composition")):
                raise ValueError(f"{OWNER}: every loss weight is 0; nothing to optimise")
            for name in ("flip_p", "jitter_p", "clip_affine_transform_fill", "mask_threshold"):
                check_unit(OWNER, name, getattr(self, name))
            check_unit(OWNER, "crops_min_cover", self.crops_min_cover, low_open=True)
            _check_number(OWNER, "scale_min", self.scale_min, 0.0, inclusive=False)
            if self.scale_max < self.scale_min:
                raise ValueError(f"{OWNER}: 'scale_max' ({self.scale_max}) must be >= 'scale_min' ({self.scale_min})")
            _check_number(OWNER, "bootstrap_epoch", self.bootstrap_epoch, -1, integer=True)
            _check_number(OWNER, "lambda_bootstrap", self.lambda_bootstrap, 0.0)
            _check_number(OWNER, "lambda_bootstrap_min", self.lambda_bootstrap_min, 0.0)
            check_choice(OWNER, "bootstrap_scheduler", self.bootstrap_scheduler, BOOTSTRAP_SCHEDULERS)
            check_unit(OWNER, "bootstrapping_min_cover", self.bootstrapping_min_cover, low_open=True)
            _check_number(OWNER, "relevancy_num_layers", self.relevancy_num_layers, -1, integer=True)

        @property
        def bootstrapping(self) -> bool:
            """Whether the relevancy bootstrap term is on (official: bootstrap_epoch > 0 and lambda_bootstrap > 0)."""
            return self.bootstrap_epoch > 0 and self.lambda_bootstrap > 0

    def __init__(self, params: "Text2LIVE.Params | None" = None):
        super().__init__(params)
        self._clip: dict[str, Any] | None = None
        self._revision: str | None = None

    # -- weights ----------------------------------------------------------------------------
    def _resolved(self) -> Any:
        """``harness.metrics._clip_models.resolve_weights`` for the CLIP parameters (torch-free):
        a ``Resolved`` or the reason there are none."""
        from harness.metrics._clip_models import resolve_weights

        p = self.params
        return resolve_weights(p.clip_model, p.clip_pretrained, p.clip_weights_path, allow_random=False)

    def _what(self) -> str:
        p = self.params
        if p.backbone == "tiny":
            return f"CLIP open_clip tiny ViT ({RANDOM_WEIGHTS_LABEL})"
        return f"CLIP open_clip {p.clip_model} / pretrained={p.clip_pretrained!r}"

    def _missing_message(self, reason: str) -> str:
        p = self.params
        # the lookup's own reason, less its advice to the CLIP metrics (their parameter names)
        reason = reason.split(". Provide them with the metric param")[0].replace(
            "given in the metric config", "given as method.clip_weights_path")
        return (f"{self._what()} for Text2LIVE's losses is not on this machine ({reason}). Provide it with "
                f"method.clip_weights_path=<checkpoint file, a folder with the weights or open_clip_config.json, "
                f"or a Hugging Face hub cache folder>, put it in the Hugging Face hub cache (HF_HOME / HF_HUB_CACHE) "
                f"or open_clip's ~/.cache/clip, or set {ALLOW_DOWNLOADS_ENV}=1 to let open_clip download "
                f"'{p.clip_model}' / '{p.clip_pretrained}'; or smoke-run with method.backbone=tiny")

    def model_revision(self) -> str | None:
        """``tiny-random-open_clip-vit``; for real weights, where they are (a hash of the file's
        path, size and modification time, or of a folder's listing), ``download:...`` or
        ``missing:...`` (resolved without loading)."""
        if self._revision is None:
            self._revision = self._compute_revision()
        return self._revision

    def _compute_revision(self) -> str:
        p = self.params
        if p.backbone == "tiny":
            return TINY_REVISION
        r = self._resolved()
        if isinstance(r, str):
            return f"missing:{p.clip_model}/{p.clip_pretrained}"
        if r.origin == "download":
            return f"download:{p.clip_model}/{p.clip_pretrained}"
        if r.origin == "local_dir":
            from ..diffusion.loading import listing_hash

            return f"clip-local-{listing_hash(r.path)}"
        st = os.stat(r.path)
        ident = f"{os.path.basename(r.path)}\t{st.st_size}\t{st.st_mtime_ns}"
        return f"clip-file-{hashlib.sha1(ident.encode()).hexdigest()[:16]}"

    def weights_status(self) -> list[tuple[str, str | None]]:
        if self.params.backbone == "tiny":
            return [(self._what(), None)]
        r = self._resolved()
        return [(self._what(), self._missing_message(r) if isinstance(r, str) else None)]

    def label(self) -> str:
        return f"{self.name} {RANDOM_WEIGHTS_TAG}" if self.params.backbone == "tiny" else self.name

    def prepare(self) -> None:
        """Load CLIP (once per process; ``MissingWeights`` when absent) and check the optimiser's
        package; the runner turns an error here into skipped rows naming it."""
        from .optimise import MissingDependency, madgrad_available

        p = self.params
        if p.optimizer == "madgrad" and not madgrad_available():
            raise MissingDependency("text2live: optimizer 'madgrad' (the official setting) needs the 'madgrad' "
                                    "package: pip install madgrad (or set method.optimizer=adam)")
        device = resolve_device(p.device)
        if p.backbone == "tiny":
            from .clip import tiny_clip

            model, tokenizer = tiny_clip()
            model = model.to(device)
            info = {"model": "tiny:open_clip-vit", "revision": TINY_REVISION, "weights": RANDOM_WEIGHTS_LABEL,
                    "random_weights": True}
        else:
            from harness.metrics._clip_models import load_clip

            r = self._resolved()
            if isinstance(r, str):
                raise MissingWeights(self._missing_message(r))
            bundle = load_clip(p.clip_model, p.clip_pretrained, p.clip_weights_path, device)
            model, tokenizer = bundle.model, bundle.tokenizer
            info = {"model": f"{p.clip_model}/{p.clip_pretrained}", "revision": self.model_revision(),
                    "weights": r.where, "random_weights": False}
        from .clip import ClipExtractor, check_layout

        check_layout(model, self._what())
        extractor = ClipExtractor(model, tokenizer, p.n_aug, p.clip_affine_transform_fill, device)
        counting.watch_module("clip_image", extractor.image)
        counting.watch_module("clip_text", extractor.text)
        self._clip = {"extractor": extractor, "device": device, "info": {**info, "device": device}}

    def check(self, sample: Sample) -> str | None:
        try:
            texts_for(sample, self.params.bootstrapping)
        except SkipSample as e:
            return str(e)
        return None

    # -- the edit ---------------------------------------------------------------------------
    @counting.counting_edit
    @tiny_threads
    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch
        from PIL import Image

        from .generator import SkipGenerator, min_input_side
        from .losses import Bootstrap
        from .optimise import CropSettings, build, smallest_crop_side

        t0 = time.perf_counter()
        if self._clip is None:
            self.prepare()
            counting.restart()  # loading CLIP is not this edit's cost
            t0 = time.perf_counter()
        assert self._clip is not None
        p = self.params
        texts = texts_for(sample, p.bootstrapping)
        extractor, device = self._clip["extractor"], self._clip["device"]

        src = np.ascontiguousarray(sample.source)
        h0, w0 = src.shape[:2]
        pil = Image.fromarray(src, mode="RGB")
        if p.resize_input is not None:
            import torchvision.transforms.functional as TF

            pil = TF.resize(pil, p.resize_input)  # official transforms.Resize(resize_input) on the PIL image
        w, h = pil.size
        crops = CropSettings(p.flip_p, p.jitter_p, p.scale_min, p.scale_max, p.crops_min_cover, p.source_image_every)
        need = min_input_side(p.num_scales)
        if smallest_crop_side(h, w, crops) < need:
            raise SkipSample(
                f"{OWNER}: sample '{sample.id}' field 'source': at the working size {h} x {w} (source {h0} x {w0}, "
                f"resize_input={p.resize_input}) a training crop can be {smallest_crop_side(h, w, crops)} px, below "
                f"the {need} px a {p.num_scales}-scale generator needs; raise resize_input or lower num_scales")
        image = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
        weights = {k: getattr(p, k) for k in ("lambda_structure", "lambda_screen", "lambda_sparsity",
                                              "lambda_alpha_l0", "lambda_alpha_l1", "lambda_composition")}
        bootstrap = (Bootstrap(texts.bootstrap, p.bootstrap_epoch, p.lambda_bootstrap, p.lambda_bootstrap_min,
                               p.bootstrap_scheduler, p.bootstrapping_min_cover, p.relevancy_num_layers)
                     if p.bootstrapping and texts.bootstrap else None)
        prep = time.perf_counter() - t0

        cuda = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(seed))
            rng = np.random.default_rng(int(seed))
            run = build(lambda: SkipGenerator(p.num_scales, p.skip_n33d, p.skip_n33u, p.skip_n11), extractor,
                        image, texts.as_dict(), weights, p.text_criterion, p.optimizer, p.lr, p.min_lr, p.gamma,
                        p.scheduler_policy, crops, rng, bootstrap)
            counting.watch_module("generator", run.generator)
            for _ in range(p.n_epochs):
                run.step()
            out = run.result()
        bad = [i for i, r in enumerate(run.history) if not np.isfinite(r["loss"])]
        if bad or not bool(torch.isfinite(out["composite"]).all()):
            # a diverged optimisation (e.g. a learning rate far above the official one): a failed row
            raise ValueError(f"{OWNER}: sample '{sample.id}': the optimisation diverged (non-finite "
                             f"{'loss from step ' + str(bad[0]) if bad else 'edit layer'}); lower method.lr")

        composite = out["composite"][0].permute(1, 2, 0).float().cpu().numpy()
        alpha = out["alpha"][0, 0].float().cpu().numpy()
        edited = np.clip(np.rint(composite * 255.0), 0, 255).astype(np.uint8)
        if (h, w) != (h0, w0):  # back to the source size (bicubic image, bilinear opacity)
            edited = np.asarray(Image.fromarray(edited, mode="RGB").resize((w0, h0), Image.BICUBIC))
            alpha = np.asarray(Image.fromarray(alpha, mode="F").resize((w0, h0), Image.BILINEAR))
        mask = alpha > p.mask_threshold
        info = {
            **self._clip["info"],
            "steps": int(p.n_epochs),
            "texts": {"screen_text": texts.screen, "comp_text": texts.comp, "src_text": texts.src},
            "text_fields": {"screen_text": texts.screen_from, "comp_text": texts.comp_from,
                            "src_text": texts.src_from},
            "bootstrap": ({"text": texts.bootstrap, "text_field": texts.bootstrap_from, "epochs": p.bootstrap_epoch}
                          if bootstrap is not None else None),
            "losses_first": run.history[0],
            "losses_last": run.history[-1],
            "loss_history": [r["loss"] for r in run.history],
            "alpha_mean": float(np.mean(alpha)),
            "mask_threshold": float(p.mask_threshold),
            "mask_fraction": float(np.mean(mask)),
            "auto_params": dict(getattr(p, "auto_resolved", {})),
            "working_size_hw": [int(h), int(w)],
            "seed": int(seed),
            "prep_seconds": prep,
        }
        return MethodOutput(image=np.ascontiguousarray(edited), mask=mask, info=info)
