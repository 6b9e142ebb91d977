"""``zone``: ZONE, zero-shot instruction-guided local editing (Li et al., CVPR 2024;
``shared/papers/zone.md``; official code ``lsl001006/ZONE``, read at 97885847c38a).

One edit (``inference.py`` ``fused_ip2p``, in its order):

0. input preparation (``ptp_utils.check_image_size``): longest side <= ``resolution`` (512),
   centred black padding to multiples of ``size_multiple`` (32) -- :mod:`.sampler`;
1. the action (add / change / remove) -- :mod:`.action` (classifier, category or keyword rule);
2. the fused InstructPix2Pix sampler (sec. 4.2, Eq. 5), IP2P's cross-attention captured by
   :class:`.localise.ZoneCapture` on the IP2P UNet only -- :mod:`.sampler`; decoded: the canvas
   ``I_sty``;
3. the rough mask ``M_b`` from the captured maps (Eq. 4; ``mask_rule`` paper / code) --
   :mod:`.localise`;
4. SAM automatic masks + Region-IoU (sec. 4.3, Eq. 6) on the canvas, on the source for remove
   (the code) -> ``M_f`` -- :mod:`.refine`; ``use_sam=false`` (Table 5's "w/o SAM"): ``M_f = M_b``;
5. the FFT edge smoother (sec. 4.4, Eq. 7-8): dilation, low-pass difference, binarise, close,
   fill -> ``M_f*``; the composite: source, ``M_f*`` pixels from the canvas, the ring
   ``M_f* xor M_f`` blended ``feather_alpha * canvas + (1 - feather_alpha) * source`` (the code's
   0.6 ring) -- :mod:`.smoother`; ``use_smoother=false`` (Table 5's "w/o edge smoother"): the
   canvas pasted through ``M_f`` (the paper's "naive" stitch, sec. 4.4), no ring.

Frames. The sampler and the rough mask work on the prepared (padded) image; the canvas and
the rough mask are brought back to the source frame (padding cropped; resized back, bicubic /
nearest, only for a source larger than ``resolution``) and SAM, the smoother and the composite
run there, so every pixel outside the final mask is the source's own. For a 512 x 512 source
(ZONE's test set) this is exactly the code's frame.

Output: the composite; ``mask`` = every pixel taken wholly or partly from the canvas
(``M_f* | M_f``); ``info``: the action and its source, beta, the mask rule, the capture grid and
layers, SAM's choice, mask areas, per-stage seconds, and the rough, SAM and final masks as
base64 1-bit PNGs under ``zone_masks`` (:func:`decode_mask` reads one back).

Seed: the code seeds a CPU ``torch.Generator`` with 42; here the harness seed seeds a CPU
generator the same way (``seed=42`` gives the code's initial noise).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import os
import threading
import time
from typing import Any, ClassVar, Literal, Mapping

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from .._diffusion_common import (PROVIDE_WEIGHTS, RANDOM_WEIGHTS_TAG, DiffusionMethod, _check_number, auto_field,
                                 check_choice, check_unit)
from ..diffusion import counting
from ..diffusion.loading import MissingWeights, ModelSpec, hub_cache_dir, load_pipeline, resolve_revision
from ..diffusion.tiny import RANDOM_WEIGHTS_LABEL, TINY_RESOLUTION, TINY_SEED, TINY_STEPS
from . import action as action_mod

OWNER = "zone"
SCHEDULERS = ("DPMSolverMultistepScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler",
              "EulerDiscreteScheduler", "UniPCMultistepScheduler", "checkpoint")
MASK_RULES = ("code", "paper")  # localise.MASK_RULES (not imported here: it imports OpenCV)
LAYER_RULES = ("code", "paper")  # localise.LAYER_RULES
SAM_VARIANTS = ("vit_h", "vit_l", "vit_b")
#: MagicBrush's stand-in with the tiny backbone: IP2P's tiny UNet architecture, other random weights.
TINY_MAGICBRUSH_REVISION = "tiny-random-ip2p-seed1"
#: ``classifier_checkpoint`` value for a random-weight classifier (``backbone=tiny`` only).
RANDOM_CLASSIFIER = "random"


def provide_sam(variant: str) -> str:
    """How to provide the SAM checkpoint of ``variant``."""
    from .refine import SAM_CHECKPOINTS, SAM_DOWNLOAD_URL

    return (f"download {SAM_DOWNLOAD_URL}{SAM_CHECKPOINTS[variant]} (segment-anything README, model checkpoints) "
            f"on a machine with access and set method.sam_checkpoint to its local path, or run without SAM "
            f"(method.use_sam=false, the paper's Table 5 ablation), or smoke-run with method.backbone=tiny "
            f"(random-weight SAM)")



PROVIDE_CLASSIFIER = ("copy ckpts/action_classifier.pth from the ZONE repository (lsl001006/ZONE) here and set "
                      "method.classifier_checkpoint to its path, or set classifier_checkpoint=null (the action "
                      "then comes from the sample's category or the instruction's keywords) or method.action="
                      "add|change|remove")

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------------
# Masks in the edit's info
# --------------------------------------------------------------------------------------------
def encode_mask(mask: np.ndarray) -> str:
    """A bool HxW mask as a base64 (ASCII) 1-bit PNG (Pillow mode ``1``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).convert("1").save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(s: str) -> np.ndarray:
    """The bool HxW mask of one ``info["zone_masks"]`` entry (an :func:`encode_mask` string)::

        from methods.zone.method import decode_mask
        final = decode_mask(json.load(open("edit.json"))["info"]["zone_masks"]["final"])
    """
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(s.encode("ascii")))) as im:
        return np.asarray(im.convert("L")) > 127


# --------------------------------------------------------------------------------------------
# Checkpoint files (SAM, classifier): revisions and presence, without loading
# --------------------------------------------------------------------------------------------
def file_revision(path: str | None) -> str:
    """``none``, ``missing:<path>``, or ``file-<size>-<mtime_ns>`` of a checkpoint file (not its
    content: SAM ViT-H is 2.4 GB; a replaced file changes its size or mtime)."""
    if not path:
        return "none"
    p = os.path.expanduser(path)
    if not os.path.isfile(p):
        return f"missing:{path}"
    st = os.stat(p)
    return f"file-{st.st_size}-{st.st_mtime_ns}"


def _cached(key: tuple, build: Any) -> Any:
    """One instance per process of what ``build()`` makes (SAM generators, MagicBrush's tiny
    UNet, classifiers): every parameter point of a sweep that needs the same one shares it."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


@dataclasses.dataclass
class Stages:
    """Everything an edit computes before the composite (tests compose from it)."""

    source: np.ndarray  # RGB uint8, the sample's size
    canvas: np.ndarray  # I_sty in the source frame
    rough: np.ndarray  # M_b (bool, source frame)
    sam: np.ndarray | None  # SAM's pick (bool), None without SAM
    fine: np.ndarray  # M_f (SAM's pick, or M_b without SAM)
    final: np.ndarray  # M_f* (the smoother's mask, or M_f without the smoother)
    info: dict[str, Any]


@METHODS.register("zone")
class Zone(DiffusionMethod):
    """ZONE: fused IP2P + MagicBrush canvas, attention-located, SAM-refined, FFT-smoothed layer."""

    version = "1"
    requires = ("source", "instruction")
    tiny_kind = "ip2p"
    prompt_field = "instruction"
    # paths of checkpoint files on this machine: in the cache key, out of the tables' params column
    location_params: ClassVar[tuple[str, ...]] = ("classifier_checkpoint", "sam_checkpoint")

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        # -- the two instruction models (sec. 4.2; inference.py model_init_insert) --
        model: str = "timbrooks/instruct-pix2pix"  # IP2P: inference.py --instructpix2pix_path default
        magicbrush_model: str = "vinesmsuic/magicbrush-jul7"  # inference.py --magicbrush_path default
        magicbrush_revision: str | None = None  # hub branch / tag / commit of MagicBrush; None = main
        # -- the fused sampler (null_text_w_ptp.py text2image_instructpix2pix_blend) --
        scheduler: str = "DPMSolverMultistepScheduler"  # inference.py: DPMSolverMultistep from IP2P's config, both pipes
        num_inference_steps: int | Literal["auto"] = auto_field(20, TINY_STEPS)  # --inference_steps 20; appendix B: 20 steps
        guidance_scale: float = 7.5  # text scale s_T: the code's --image_guidance_scale 7.5 is passed as the text scale
        image_guidance_scale: float = 1.5  # image scale s_I: the function's default (not on the command line)
        beta_remove: float = 0.2  # Eq. 5 beta for remove (sec. 4.2; --blend_beta 0.2)
        beta_other: float = 0.01  # Eq. 5 beta for add / change (sec. 4.2; hard-coded 0.01 in the code)
        beta: float | None = None  # one beta for every action (overrides both; appendix C.5's beta ablation)
        # longest side of the working image (check_image_size max_size=512); None = never resized
        resolution: int | Literal["auto"] | None = auto_field(512, TINY_RESOLUTION)
        size_multiple: int = 32  # check_image_size side_multiple: centred black padding to multiples of this
        # -- the action (sec. 4.2, appendix B; msk_from_attn.py action_classify) --
        action: Literal["auto", "add", "change", "remove"] = "auto"  # auto: classifier, else category, else keywords
        classifier_checkpoint: str | None = None  # the official ckpts/action_classifier.pth (local path); "random": tiny only
        classifier_quirk: Literal["code", "argmax"] = "code"  # code: cls_predict's token-index argmax; argmax: plain
        # -- localisation (sec. 4.2, Eq. 4; msk_from_attn.py show_diff_cross_attention) --
        attention_layers: Literal["code", "paper"] = "code"  # code: down/up layers at ceil(H/32); paper: appendix B blocks
        mask_rule: Literal["code", "paper"] = "code"  # code: 2x saturating difference > 108, inverted; paper: < T
        threshold: float | None = None  # None = the rule's own (code 108, paper T = 128)
        # -- SAM + Region-IoU (sec. 4.3, Eq. 6; utils/mask_utils.py get_finemask_everything) --
        use_sam: bool = True  # Table 5 ablation: false = the rough mask is the fine mask
        sam_variant: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"  # inference.py: sam_model_registry["vit_h"]
        sam_checkpoint: str | None = None  # local path of the SAM checkpoint (sam_vit_h_4b8939.pth)
        sam_settings: dict[str, Any] | None = None  # SamAutomaticMaskGenerator keyword arguments; None = library defaults (the code)
        sam_on_source_for_remove: bool = True  # inference.py: SAM on the original image when REMOVE (not in the paper)
        sam_min_area: int = 64  # mask_utils.filter_small_regions threshold (the code's 64); 0 = no filtering
        sam_area_quirk: bool = True  # filter_small_regions: area = label index x pixels, bbox cleared (the code)
        # -- edge smoother and composite (sec. 4.4, Eq. 7-8; mask_utils.dilate_mask / subtract_fft_images) --
        use_smoother: bool = True  # Table 5 ablation: false = the canvas pasted through M_f, no ring
        dilate_kernel: int = 3  # dilate_mask: 3x3 rectangular kernel
        dilate_iterations: int = 4  # --dilate_strength 4
        d0: float = 200.0  # ideal low-pass radius D0 at d0_reference_size px (sec. 4.4: 200 for 512 x 512)
        d0_reference_size: int = 512  # D0 scales with the image: d0 * side / d0_reference_size
        fft_threshold: float = 30.0  # --threshold 30 (subtract_fft_images' own default is 35)
        fft_wrap_uint8: bool = True  # the code casts |ifft| to uint8 (values > 255 wrap); false = clip
        fft_grey: Literal["code", "bt601"] = "code"  # code: COLOR_RGB2GRAY on BGR-ordered arrays (R, B weights swapped)
        close_kernel: int = 21  # subtract_fft_images: 21 x 21 morphological closing
        feather_alpha: float = 0.6  # --alpha 0.6: ring pixels = alpha * canvas + (1 - alpha) * source (not in the paper)

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice(OWNER, "scheduler", self.scheduler, SCHEDULERS)
            _check_number(OWNER, "image_guidance_scale", self.image_guidance_scale, 0.0)
            for name in ("beta_remove", "beta_other"):
                _check_number(OWNER, name, getattr(self, name), 0.0)
            if self.beta is not None:
                _check_number(OWNER, "beta", self.beta, 0.0)
            _check_number(OWNER, "size_multiple", self.size_multiple, 8, integer=True)
            if self.size_multiple % 8:
                raise ValueError(f"{OWNER}: 'size_multiple' must be a multiple of 8 (the VAE's downsampling), "
                                 f"got {self.size_multiple!r}")
            check_choice(OWNER, "action", self.action, ("auto", *action_mod.ACTIONS))
            check_choice(OWNER, "classifier_quirk", self.classifier_quirk, action_mod.QUIRKS)
            if self.classifier_checkpoint is not None:
                if not isinstance(self.classifier_checkpoint, str) or not self.classifier_checkpoint.strip():
                    raise ValueError(f"{OWNER}: 'classifier_checkpoint' must be null, a path or '{RANDOM_CLASSIFIER}', "
                                     f"got {self.classifier_checkpoint!r}")
                if self.classifier_checkpoint == RANDOM_CLASSIFIER and self.backbone != "tiny":
                    raise ValueError(f"{OWNER}: classifier_checkpoint={RANDOM_CLASSIFIER} (random weights) is for "
                                     f"smoke runs with backbone=tiny only")
            check_choice(OWNER, "attention_layers", self.attention_layers, LAYER_RULES)
            check_choice(OWNER, "mask_rule", self.mask_rule, MASK_RULES)
            if self.threshold is not None:
                _check_number(OWNER, "threshold", self.threshold, 0.0)
            check_choice(OWNER, "sam_variant", self.sam_variant, SAM_VARIANTS)
            if self.sam_checkpoint is not None and (not isinstance(self.sam_checkpoint, str)
                                                    or not self.sam_checkpoint.strip()):
                raise ValueError(f"{OWNER}: 'sam_checkpoint' must be null or a path, got {self.sam_checkpoint!r}")
            if self.sam_settings is not None:
                if not isinstance(self.sam_settings, Mapping) or not all(isinstance(k, str) for k in self.sam_settings):
                    raise ValueError(f"{OWNER}: 'sam_settings' must be null or a mapping of SamAutomaticMaskGenerator "
                                     f"arguments, got {self.sam_settings!r}")
                # a plain dict, so the parameters serialise and compare the same however they came
                object.__setattr__(self, "sam_settings", dict(self.sam_settings))
            _check_number(OWNER, "sam_min_area", self.sam_min_area, 0, integer=True)
            _check_number(OWNER, "dilate_kernel", self.dilate_kernel, 1, integer=True)
            _check_number(OWNER, "dilate_iterations", self.dilate_iterations, 0, integer=True)
            _check_number(OWNER, "d0", self.d0, 0.0, inclusive=False)
            _check_number(OWNER, "d0_reference_size", self.d0_reference_size, 1, integer=True)
            _check_number(OWNER, "fft_threshold", self.fft_threshold, 0.0)
            _check_number(OWNER, "close_kernel", self.close_kernel, 1, integer=True)
            check_unit(OWNER, "feather_alpha", self.feather_alpha)
            check_choice(OWNER, "fft_grey", self.fft_grey, ("code", "bt601"))

    def __init__(self, params: "Zone.Params | None" = None):
        super().__init__(params)
        self._mb_unet: Any = None
        self._mb_revision: str | None = None
        self._sam: Any = None
        self._classifier: Any = None
        self._beta = 0.0  # this edit's Eq. 5 beta (set by run_stages before the sampler runs)

    # -- weights -----------------------------------------------------------------------------
    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        return StableDiffusionInstructPix2PixPipeline

    def magicbrush_spec(self) -> ModelSpec:
        """MagicBrush's :class:`ModelSpec`: IP2P's settings with MagicBrush's model and revision."""
        p = self.params
        return dataclasses.replace(self.spec(), model=p.magicbrush_model, revision=p.magicbrush_revision)

    def label(self) -> str:
        return f"{self.name} {RANDOM_WEIGHTS_TAG}" if self.params.backbone == "tiny" else self.name

    def _sam_tiny(self) -> bool:
        """A random-weight SAM: tiny backbone and no checkpoint given."""
        return self.params.backbone == "tiny" and not self.params.sam_checkpoint

    def model_revision(self) -> str | None:
        """Every weight source of the edit: IP2P, MagicBrush, SAM and classifier files."""
        if self._revision is None:
            p = self.params
            ip2p = self._loaded.revision if self._loaded is not None else resolve_revision(self.spec(), None)
            mb = (TINY_MAGICBRUSH_REVISION if p.backbone == "tiny"
                  else self._mb_revision or resolve_revision(self.magicbrush_spec(), None))
            sam = ("tiny-random-sam" if self._sam_tiny() else file_revision(p.sam_checkpoint)) if p.use_sam else "off"
            cls = ("tiny-random-mlp" if p.classifier_checkpoint == RANDOM_CLASSIFIER
                   else file_revision(p.classifier_checkpoint))
            self._revision = f"ip2p={ip2p};magicbrush={mb};sam={sam};classifier={cls}"
        return self._revision

    def weights_status(self) -> list[tuple[str, str | None]]:
        """IP2P, MagicBrush, the SAM checkpoint and the classifier checkpoint: present or how to
        provide them (``edit-harness weights``)."""
        p = self.params
        out: list[tuple[str, str | None]] = []
        for what, spec, param in ((p.model, self.spec(), "model"),
                                  (p.magicbrush_model, self.magicbrush_spec(), "magicbrush_model")):
            rev = resolve_revision(spec, None)
            provide = PROVIDE_WEIGHTS.replace("method.model", f"method.{param}")
            if p.backbone == "tiny":
                out.append((f"{what} ({RANDOM_WEIGHTS_LABEL})", None))
            elif rev.startswith("uncached:"):
                out.append((what, f"not in the Hugging Face hub cache {hub_cache_dir(None)}; {provide}"))
            elif rev.startswith("missing-local:"):
                out.append((what, f"the local folder does not exist; {provide}"))
            else:
                out.append((what, None))
        if p.use_sam:
            what = f"SAM {p.sam_variant} checkpoint"
            if self._sam_tiny():
                out.append((f"{what} ({RANDOM_WEIGHTS_LABEL})", None))
            elif not p.sam_checkpoint:
                out.append((what, f"method.sam_checkpoint is not set; {provide_sam(p.sam_variant)}"))
            elif not os.path.isfile(os.path.expanduser(p.sam_checkpoint)):
                out.append((f"{what} {p.sam_checkpoint}", f"the file does not exist; {provide_sam(p.sam_variant)}"))
            else:
                out.append((f"{what} {p.sam_checkpoint}", None))
        if p.classifier_checkpoint == RANDOM_CLASSIFIER:
            out.append((f"ZONE action classifier ({RANDOM_WEIGHTS_LABEL})", None))
        elif p.classifier_checkpoint:
            path = os.path.expanduser(p.classifier_checkpoint)
            out.append((f"ZONE action classifier {p.classifier_checkpoint}",
                        None if os.path.isfile(path) else f"the file does not exist; {PROVIDE_CLASSIFIER}"))
        else:  # optional: without it the action comes from the category or the keywords
            out.append(("ZONE action classifier (not set: method.classifier_checkpoint=null, the action comes "
                        "from the sample's category or the instruction's keywords; to use the official one: "
                        "copy ckpts/action_classifier.pth from lsl001006/ZONE and set method.classifier_checkpoint)",
                        None))
        return out

    def prepare(self) -> None:
        """Load IP2P, MagicBrush's UNet, SAM's mask generator and the classifier. Everything missing
        is reported at once in one ``MissingWeights`` (the runner's skip reason)."""
        p = self.params
        problems: list[str] = []
        try:
            self._loaded = load_pipeline(self.pipeline_class(), self.spec())
        except MissingWeights as e:
            problems.append(f"InstructPix2Pix: {e}")
        if p.backbone == "tiny":
            if self._loaded is not None:
                self._mb_unet = _cached(("mb-tiny", p.dtype, self._loaded.device), self._tiny_magicbrush_unet)
                self._mb_revision = TINY_MAGICBRUSH_REVISION
        else:
            try:
                mb = load_pipeline(self.pipeline_class(), self.magicbrush_spec())
                self._mb_unet, self._mb_revision = mb.pipeline.unet, mb.revision
            except MissingWeights as e:
                problems.append(f"MagicBrush: {e}\n(for MagicBrush the model parameter is method.magicbrush_model)")
        if p.use_sam:
            if p.sam_checkpoint and not os.path.isfile(os.path.expanduser(p.sam_checkpoint)):
                problems.append(f"SAM {p.sam_variant} checkpoint {p.sam_checkpoint} does not exist; {provide_sam(p.sam_variant)}")
            elif not p.sam_checkpoint and p.backbone != "tiny":
                problems.append(f"SAM {p.sam_variant} checkpoint: method.sam_checkpoint is not set; {provide_sam(p.sam_variant)}")
        if p.classifier_checkpoint and p.classifier_checkpoint != RANDOM_CLASSIFIER \
                and not os.path.isfile(os.path.expanduser(p.classifier_checkpoint)):
            problems.append(f"ZONE action classifier checkpoint {p.classifier_checkpoint} does not exist; "
                            f"{PROVIDE_CLASSIFIER}")
        if problems:
            self._loaded = None
            raise MissingWeights("\n".join(problems))
        assert self._loaded is not None
        device = self._loaded.device
        if p.use_sam:
            self._sam = self._load_sam(device)
        if p.classifier_checkpoint:
            self._classifier = self._load_classifier()
        counting.watch_pipeline(self._loaded.pipeline)
        # MagicBrush's UNet is counted by the sampler (sampler.call_counted_as), not watched: the
        # magicbrush adapter may share the loaded module and watch it as "unet"
        if self._classifier is not None:
            counting.watch_module("action_classifier", self._classifier)
        self._revision = None  # recomputed from the loaded weights

    def _tiny_magicbrush_unet(self) -> Any:
        """MagicBrush's stand-in with the tiny backbone: IP2P's tiny UNet architecture with its own
        random weights (seed TINY_SEED + 1), so the two UNets of the fused loop differ."""
        import torch

        unet = self._loaded.pipeline.unet
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED + 1)
            mb = type(unet).from_config(unet.config)
        return mb.to(device=unet.device, dtype=unet.dtype).eval().requires_grad_(False)

    def _load_sam(self, device: str) -> Any:
        """SAM's automatic mask generator (:func:`.refine.load_sam_generator`, cached per process;
        it registers SAM's encoder and decoder for counting as ``sam`` / ``sam_decoder``)."""
        from . import refine

        p = self.params
        tiny = self._sam_tiny()
        ckpt = None if tiny else os.path.expanduser(p.sam_checkpoint)
        return refine.load_sam_generator(p.sam_variant, ckpt, device=device, settings=dict(p.sam_settings or {}),
                                         tiny=tiny)

    def _load_classifier(self) -> Any:
        p = self.params
        width = int(self._loaded.pipeline.text_encoder.config.hidden_size)
        if p.classifier_checkpoint == RANDOM_CLASSIFIER:
            return _cached(("cls-random", width), lambda: action_mod.random_mlp(width, TINY_SEED))
        path = os.path.expanduser(p.classifier_checkpoint)
        return _cached(("cls", path, file_revision(path), width), lambda: action_mod.load_classifier(path, width))

    # -- the stages ----------------------------------------------------------------------------
    def beta_for(self, action: str) -> float:
        """Eq. 5's beta for ``action``: ``beta`` when set, else beta_remove / beta_other."""
        p = self.params
        if p.beta is not None:
            return float(p.beta)
        return float(p.beta_remove if action == "remove" else p.beta_other)

    def decide_action(self, sample: Sample) -> dict[str, Any]:
        """The edit's action and what decided it (``action``, ``action_source``; with a
        classifier also its label and whether its weights are random)."""
        p = self.params
        out: dict[str, Any] = {}
        label = None
        if p.action == "auto" and self._classifier is not None:
            pipe = self._loaded.pipeline
            label, _ = action_mod.classify(self._classifier, pipe.tokenizer, pipe.text_encoder,
                                           str(sample.instruction), p.classifier_quirk)
            out["classifier_label"] = label
            out["classifier_quirk"] = p.classifier_quirk
            out["classifier_random_weights"] = p.classifier_checkpoint == RANDOM_CLASSIFIER
        action, source = action_mod.resolve_action(p.action, str(sample.instruction), sample.category, label)
        if source == "classifier" and p.classifier_checkpoint == RANDOM_CLASSIFIER:
            source = f"classifier {RANDOM_WEIGHTS_TAG}"
        return {"action": action, "action_source": source, **out}

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        """The fused sampler on the prepared (padded) RGB ``image`` with MagicBrush's UNet, the
        beta of ``self._beta`` (set by :meth:`run_stages`); returns its :class:`FusedResult`."""
        from .sampler import fused_sample

        p = self.params
        return fused_sample(pipe, self._mb_unet, np.asarray(image), prompt, steps=int(p.num_inference_steps),
                            guidance_scale=p.guidance_scale, image_guidance_scale=p.image_guidance_scale,
                            beta=self._beta, generator=generator, scheduler=p.scheduler)

    def run_stages(self, sample: Sample, seed: int) -> Stages:
        """Every stage up to the composite (see the module docstring)."""
        import torch

        from ..diffusion.attention import attention_control
        from . import localise, smoother
        from .sampler import prepare_input, undo_padding

        p = self.params
        t0 = time.perf_counter()
        if self._loaded is None:
            self.prepare()
            counting.restart()  # loading is not this edit's cost
            t0 = time.perf_counter()
        pipe = self._loaded.pipeline
        src = np.ascontiguousarray(np.asarray(sample.source))
        work, plan = prepare_input(src, p.resolution, p.size_multiple)
        prep = time.perf_counter() - t0

        t1 = time.perf_counter()
        decided = self.decide_action(sample)
        act = decided["action"]
        self._beta = self.beta_for(act)
        # the code's generator: a CPU torch.Generator (inference.py), seeded with the harness seed
        generator = torch.Generator("cpu").manual_seed(int(seed))
        # the code's capture: the two null-text rows, grid ceil(H / 32) of the prepared image
        capture = localise.ZoneCapture(rows=(1, 2), layers=p.attention_layers, image_size=plan.padded_hw)
        with attention_control(pipe.unet, capture):
            fused = self.call_pipeline(pipe, work, str(sample.instruction), generator)
        first, last = localise.instruction_positions(pipe.tokenizer, str(sample.instruction))
        maps = capture.token_maps()
        rough_work = localise.rough_mask(maps[first], maps[last], plan.padded_hw, rule=p.mask_rule,
                                         threshold=p.threshold)
        canvas = undo_padding(fused.image, plan)
        rough = undo_padding(np.asarray(rough_work, dtype=bool), plan, is_mask=True)
        sampling_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        sam_mask, sam_info = None, {}
        if p.use_sam:
            on_source = act == "remove" and p.sam_on_source_for_remove
            sam_mask, sam_info = self.refine(src if on_source else canvas, rough)
            sam_info = {"image": "source" if on_source else "canvas", **sam_info}
        fine = sam_mask if sam_mask is not None else rough
        sam_s = time.perf_counter() - t2

        t3 = time.perf_counter()
        if p.use_smoother:
            dilated = smoother.dilate(fine, kernel=p.dilate_kernel, iterations=p.dilate_iterations)
            final = np.asarray(smoother.fft_edge_mask(canvas, src, dilated, d0=p.d0,
                                                      reference_size=p.d0_reference_size,
                                                      threshold=p.fft_threshold, close_kernel=p.close_kernel,
                                                      wrap_uint8=p.fft_wrap_uint8, grey=p.fft_grey), dtype=bool)
        else:
            final = fine
        smooth_s = time.perf_counter() - t3

        info = {
            **self._loaded.info(),
            "magicbrush_revision": self._mb_revision,
            "steps": int(p.num_inference_steps),
            "guidance_scale": float(p.guidance_scale),
            "image_guidance_scale": float(p.image_guidance_scale),
            "scheduler": p.scheduler,
            **decided,
            "beta": self._beta,
            "mask_rule": p.mask_rule,
            "threshold": float(localise.DEFAULT_THRESHOLD[p.mask_rule] if p.threshold is None else p.threshold),
            "used_grid": _plain(capture.used_grid),
            "used_layers": _plain(capture.used_layers),
            **_plain(capture.info()),
            "token_positions": [int(first), int(last)],
            "use_sam": bool(p.use_sam),
            "sam": _plain(sam_info),
            "use_smoother": bool(p.use_smoother),
            "auto_params": dict(getattr(p, "auto_resolved", {})),
            "working_size_hw": [int(x) for x in plan.padded_hw],
            "padding_tblr": [plan.top, plan.bottom, plan.left, plan.right],
            "seed": int(seed),
            "prompt_field": self.prompt_field,
            "prompt": str(sample.instruction),
            "prep_seconds": prep,
            "stage_seconds": {"sampling": sampling_s, "sam": sam_s, "smoothing": smooth_s},
        }
        return Stages(src, canvas, rough, sam_mask, fine, final, info)

    def refine(self, image: np.ndarray, rough: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """SAM's automatic masks on ``image``, the segment of highest Region-IoU with ``rough``."""
        from . import refine

        mask, info = refine.refine_mask(self._sam, image, rough, min_area=self.params.sam_min_area,
                                        quirk=self.params.sam_area_quirk)
        return np.asarray(mask, dtype=bool), {**self._sam.info(), **info}

    def blend(self, source: np.ndarray, canvas: np.ndarray, fine: np.ndarray, final: np.ndarray) -> np.ndarray:
        """The composite: ``final`` from the canvas, the ring ``final xor fine`` feathered
        (``feather_alpha``), the rest the source; without the smoother ``final`` is ``fine``, so
        the ring is empty and the canvas is pasted through ``fine``."""
        from . import smoother

        return np.asarray(smoother.composite(source, canvas, fine, final, alpha=self.params.feather_alpha),
                          dtype=np.uint8)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        st = self.run_stages(sample, seed)
        t = time.perf_counter()
        image = self.blend(st.source, st.canvas, st.fine, st.final)
        st.info["stage_seconds"]["smoothing"] += time.perf_counter() - t
        used = st.final | st.fine  # every pixel taken wholly or partly from the canvas
        n = float(used.size)
        st.info["mask_areas"] = {k: (float(m.sum() / n) if m is not None else None)
                                 for k, m in (("rough", st.rough), ("sam", st.sam), ("final", st.final),
                                              ("composite", used))}
        st.info["zone_masks"] = {"rough": encode_mask(st.rough),
                                 "sam": encode_mask(st.sam) if st.sam is not None else None,
                                 "final": encode_mask(st.final)}
        return MethodOutput(image=image, mask=used, info=st.info)


def _plain(v: Any) -> Any:
    """JSON-able form of info values (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v
