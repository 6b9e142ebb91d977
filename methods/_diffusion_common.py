"""Shared plumbing for adapters that wrap a diffusers pipeline (InstructPix2Pix, MagicBrush, SDEdit).

A subclass of :class:`DiffusionMethod` names its pipeline class (imported lazily: importing
``methods`` must not import torch), the tiny backbone that fits it, the sample field that holds
its prompt, and how to call the pipeline. The base class does the rest:

- ``Params``: the common fields (model, revision, variant, dtype, device, cpu_offload,
  attention_slicing, allow_downloads, backbone, num_inference_steps, guidance_scale, resolution);
  a subclass extends it with ``@dataclasses.dataclass(frozen=True) class Params(DiffusionMethod.Params)``
  and may redefine a field to change its default.
- ``"auto"`` parameters (:func:`auto_field`): a parameter that makes a run costly (working size,
  steps, inversion steps ...) defaults to ``"auto"``, resolved when the parameters are built: the
  paper / library value with real weights, a small value with ``backbone=tiny``, so that
  ``method.backbone=tiny`` alone is a quick smoke run. An explicit value always wins. The resolved
  values are the parameters (``resolved_params()``: part of each edit's cache key) and the
  edit's ``info`` lists them under ``auto_params``.
- ``model_revision()``: :func:`methods.diffusion.loading.resolve_revision` (no loading, no torch);
  after ``prepare()`` the revision of the loaded weights.
- ``prepare()``: :func:`methods.diffusion.loading.load_pipeline` (cached per process, shared by
  every sample and every parameter point that loads the same weights). A ``MissingWeights`` error
  propagates; the runner records every sample skipped with its message.
- ``label()``: the method name, with ``[RANDOM WEIGHTS]`` appended for ``backbone=tiny`` so that
  every table row made with random weights says so.
- ``edit()``: source -> RGB PIL image resized (bicubic) to the working resolution -> pipeline with
  ``torch.Generator(device).manual_seed(seed)`` -> result resized (bicubic) back to the source size.
  ``info`` carries the loaded pipeline's summary (``weights``, ``revision``, ``model``, device,
  dtype ...), ``steps``, the working size and the prompt.
- network counts: every adapter's ``edit`` (the base's, or its own, wrapped in ``__init_subclass__``)
  counts the forward calls and batch rows of each network it runs (:mod:`.diffusion.counting`:
  hooks on the pipeline's modules, installed by :meth:`DiffusionMethod.begin_edit`), so adapters
  with their own loops are counted by the same mechanism; ``info["network_calls"]`` and
  ``info["network_rows"]`` record them, a first edit's pipeline loading excluded.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import os
import time
import types
from typing import Any, ClassVar, Literal

import numpy as np

from harness.method import Method
from harness.types import MethodOutput, Sample

from .diffusion import counting
from .diffusion.loading import (BACKBONES, DEVICES, DTYPES, LoadedPipeline, ModelSpec, hub_cache_dir, load_pipeline,
                                resolve_revision)
from .diffusion.tiny import RANDOM_WEIGHTS_LABEL, TINY_RESOLUTION, TINY_STEPS, TINY_TORCH_THREADS

# Stable Diffusion 1.x's VAE downsamples by 8: the working size must be a multiple of it.
SIZE_MULTIPLE = 8
# The default of a parameter whose value depends on the backbone (see auto_field).
AUTO = "auto"
RANDOM_WEIGHTS_TAG = "[RANDOM WEIGHTS]"
PROVIDE_WEIGHTS = ("download it on a machine with hub access and copy the hub cache here (HF_HOME / HF_HUB_CACHE), "
                   "set method.model to a local folder, allow downloads (method.allow_downloads=true or "
                   "EDIT_HARNESS_ALLOW_DOWNLOADS=1), or smoke-run with method.backbone=tiny")


def _check_number(owner: str, name: str, value: Any, minimum: float, *, integer: bool = False,
                  inclusive: bool = True) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{owner}: '{name}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        raise ValueError(f"{owner}: '{name}' must be {'>=' if inclusive else '>'} {minimum}, got {value!r}")


def working_size(height: int, width: int, resolution: int | None, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(height, width) the pipeline runs at: ``resolution`` x ``resolution``, or, for None, the
    source size rounded down to a multiple of ``multiple`` (at least ``multiple``)."""
    if resolution is not None:
        return int(resolution), int(resolution)
    return max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)


def to_pil(image: np.ndarray, size_hw: tuple[int, int]) -> Any:
    """RGB uint8 HxWx3 -> PIL image of ``size_hw`` (bicubic; not resized when it already fits)."""
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    h, w = size_hw
    if pil.size != (w, h):
        pil = pil.resize((w, h), Image.BICUBIC)
    return pil


def from_pipeline_output(image: Any, size_hw: tuple[int, int]) -> np.ndarray:
    """A pipeline's ``output_type='np'`` image (float HxWx3 in [0, 1]) -> RGB uint8 of ``size_hw``
    (bicubic resize when the sizes differ)."""
    from PIL import Image

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[0]
    u8 = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    h, w = size_hw
    if u8.shape[:2] != (h, w):
        u8 = np.asarray(Image.fromarray(u8, mode="RGB").resize((w, h), Image.BICUBIC))
    return np.ascontiguousarray(u8)


@dataclasses.dataclass(frozen=True)
class Auto:
    """What an ``"auto"`` parameter becomes: ``real`` with real weights, ``tiny`` with the tiny
    random-weight backbone. A callable value is called with the parameters (the fields before
    this one already resolved) for a value that follows another parameter."""

    real: Any
    tiny: Any

    def value(self, params: Any) -> Any:
        v = self.tiny if params.backbone == "tiny" else self.real
        return v(params) if callable(v) else v


def auto_field(real: Any, tiny: Any) -> Any:
    """A ``Params`` field whose default is ``"auto"``: ``real`` with real weights, ``tiny`` with
    ``backbone=tiny`` (see :class:`Auto`); an explicit value (YAML, command line) replaces it.
    The field's type must accept ``Literal["auto"]``; the YAML default is ``auto``."""
    return dataclasses.field(default=AUTO, metadata={"auto": Auto(real, tiny)})


def auto_names(params_cls: type) -> tuple[str, ...]:
    """The names of ``params_cls``'s fields that accept ``"auto"`` (declared with :func:`auto_field`)."""
    return tuple(f.name for f in dataclasses.fields(params_cls) if "auto" in f.metadata)


def resolve_auto(params: Any) -> dict[str, Any]:
    """Replace each ``"auto"`` field of the frozen ``params`` by its value for ``params.backbone``
    (in field order, so that a callable sees the fields before it resolved); returns
    ``{field: value}`` of the fields it resolved, also kept as ``params.auto_resolved``. Fields
    not declared with :func:`auto_field` keep their value, "auto" included (``device: auto``
    is the loader's own choice; P2P's ``edit_kind: auto`` is the method's)."""
    resolved: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        rule = f.metadata.get("auto")
        if rule is None or not (isinstance(value, str) and value == AUTO):
            continue
        value = rule.value(params)
        # Params is frozen: its fields are set here, once, while it is being built (__post_init__).
        object.__setattr__(params, f.name, value)
        resolved[f.name] = value
    object.__setattr__(params, "auto_resolved", dict(resolved))
    return resolved


def tiny_threads(edit: Any) -> Any:
    """Run ``edit`` (a method's ``edit``) with :data:`TINY_TORCH_THREADS` torch intra-op threads when
    the method's backbone is tiny, restoring the count afterwards (a sweep may run real-weight
    jobs in the same process). The tiny models' convolutions and attention are too small to split:
    thread start-up and synchronisation dominate, and on a busy machine every op waits for a core
    for each of its threads (a tiny P2P edit: ~50 s with 2 threads on 2 busy cores, ~3 s with 1).
    With one thread a tiny edit is also the same computation on every machine."""

    @functools.wraps(edit)
    def wrapper(self: "DiffusionMethod", sample: Sample, seed: int) -> MethodOutput:
        if self.params.backbone != "tiny":
            return edit(self, sample, seed)
        import torch

        before = torch.get_num_threads()
        if before == TINY_TORCH_THREADS:
            return edit(self, sample, seed)
        torch.set_num_threads(TINY_TORCH_THREADS)
        try:
            return edit(self, sample, seed)
        finally:
            torch.set_num_threads(before)

    wrapper.tiny_threads = True  # type: ignore[attr-defined]
    return wrapper


class DiffusionMethod(Method):
    """Base of the adapters that run one diffusers pipeline per edit.

    Subclasses set :attr:`tiny_kind`, :attr:`prompt_field`, implement :meth:`pipeline_class` and
    :meth:`call_pipeline`, and extend :class:`Params`.
    """

    uses_torch = True
    # Pipelines, UNets and schedulers (diffusers), text encoders and tokenizers (transformers),
    # on torch: their versions are part of each edit's cache key (with numpy, Pillow, OpenCV).
    numeric_libraries = ("torch", "diffusers", "transformers")
    # Which tiny random-weight backbone (methods.diffusion.tiny) fits the pipeline class.
    tiny_kind: ClassVar[str] = "sd15"
    # The sample field holding the text the pipeline is conditioned on.
    prompt_field: ClassVar[str] = "target_caption"

    @dataclasses.dataclass(frozen=True)
    class Params:
        model: str = ""  # Hugging Face id or local folder (a save_pretrained / snapshot folder)
        revision: str | None = None  # hub branch / tag / commit; None = main
        variant: str | None = None  # weight-file variant, e.g. fp16
        dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # fp16 on CPU is refused by the loader
        device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
        cpu_offload: bool = False  # enable_model_cpu_offload() (CUDA only)
        attention_slicing: bool = False  # enable_attention_slicing()
        allow_downloads: bool = False  # also EDIT_HARNESS_ALLOW_DOWNLOADS=1
        backbone: Literal["real", "tiny"] = "real"  # tiny = random weights, smoke runs only
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)
        guidance_scale: float = 7.5
        # Side of the square the method runs at (source resized to it, edit resized back, bicubic);
        # None = the source size rounded down to a multiple of 8.
        resolution: int | Literal["auto"] | None = auto_field(512, TINY_RESOLUTION)

        def __post_init__(self) -> None:
            # "auto" fields first: every check below (and in subclasses, which call this first)
            # sees the resolved values.
            resolve_auto(self)
            owner = "diffusion method"
            if self.dtype not in DTYPES:
                raise ValueError(f"{owner}: 'dtype' must be one of {list(DTYPES)}, got {self.dtype!r}")
            if self.device not in DEVICES:
                raise ValueError(f"{owner}: 'device' must be one of {list(DEVICES)}, got {self.device!r}")
            if self.backbone not in BACKBONES:
                raise ValueError(f"{owner}: 'backbone' must be one of {list(BACKBONES)}, got {self.backbone!r}")
            if not isinstance(self.model, str) or (self.backbone == "real" and not self.model.strip()):
                raise ValueError(f"{owner}: 'model' must be a Hugging Face id or a local folder, got {self.model!r}")
            _check_number(owner, "num_inference_steps", self.num_inference_steps, 1, integer=True)
            _check_number(owner, "guidance_scale", self.guidance_scale, 0.0)
            if self.resolution is not None:
                _check_number(owner, "resolution", self.resolution, SIZE_MULTIPLE, integer=True)
                if self.resolution % SIZE_MULTIPLE:
                    raise ValueError(
                        f"{owner}: 'resolution' must be a multiple of {SIZE_MULTIPLE} (the VAE's downsampling), "
                        f"got {self.resolution!r}"
                    )

    def __init__(self, params: "DiffusionMethod.Params | None" = None):
        super().__init__(params)
        self._loaded: LoadedPipeline | None = None
        self._revision: str | None = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        # every adapter's own edit() (most extend the base's) runs tiny backbones single-threaded,
        # and counts its network calls (the outermost edit of the chain records them in the info)
        own = cls.__dict__.get("edit")
        if own is not None and not getattr(own, "counting_edit", False):
            cls.edit = counting.counting_edit(own if getattr(own, "tiny_threads", False) else tiny_threads(own))

    # -- hooks for subclasses ---------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def pipeline_class(cls) -> type:
        """The diffusers pipeline class (imported here, lazily)."""

    @abc.abstractmethod
    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        """Run ``pipe`` on the resized PIL ``image``; return its ``output_type='np'`` output."""

    def extra_info(self) -> dict[str, Any]:
        """Method-specific entries for an edit's info (e.g. strength, image guidance scale)."""
        return {}

    # -- Method hooks ---------------------------------------------------------------------
    def spec(self) -> ModelSpec:
        """The :class:`ModelSpec` these parameters describe."""
        p = self.params
        return ModelSpec(
            model=p.model,
            revision=p.revision,
            variant=p.variant,
            dtype=p.dtype,
            device=p.device,
            cpu_offload=p.cpu_offload,
            attention_slicing=p.attention_slicing,
            allow_downloads=p.allow_downloads,
            backbone=p.backbone,
            tiny_kind=self.tiny_kind,
        )

    def label(self) -> str:
        """The name in tables; random-weight (tiny backbone) runs say so in every row."""
        return f"{self.name} {RANDOM_WEIGHTS_TAG}" if self.params.backbone == "tiny" else self.name

    def model_revision(self) -> str | None:
        """The loaded weights' revision after ``prepare()``; before, resolved without loading
        (``tiny-random-<kind>``, ``local-<hash>``, the cached hub commit or ``uncached:<id>@<rev>``)."""
        if self._loaded is not None:
            return self._loaded.revision
        if self._revision is None:  # asked once per sample by the runner: resolve once
            # tiny_kind is set in the spec, so no pipeline class (no torch import) is needed.
            self._revision = resolve_revision(self.spec(), None)
        return self._revision

    def weights_status(self) -> list[tuple[str, str | None]]:
        """One entry: the pipeline's model, present when its revision resolves without loading
        (a tiny backbone, an existing local folder or a cached hub snapshot)."""
        rev = self.model_revision() or ""
        what = f"{self.params.model} ({RANDOM_WEIGHTS_LABEL})" if self.params.backbone == "tiny" else self.params.model
        if rev.startswith("uncached:"):
            return [(what, f"not in the Hugging Face hub cache {hub_cache_dir(None)}; {PROVIDE_WEIGHTS}")]
        if rev.startswith("missing-local:"):
            return [(what, f"the local folder does not exist; {PROVIDE_WEIGHTS}")]
        if rev.startswith("local-") and not os.path.isfile(os.path.join(os.path.expanduser(self.params.model),
                                                                          "model_index.json")):
            return [(what, "the local folder has no model_index.json (not a diffusers pipeline folder: "
                           "save one with pipeline.save_pretrained or download a hub snapshot)")]
        return [(what, None)]

    def weights_label(self) -> str:
        """Where the weights come from, for tables (the random-weights label for tiny)."""
        if self._loaded is not None:
            return self._loaded.weights_label
        return RANDOM_WEIGHTS_LABEL if self.params.backbone == "tiny" else str(self.params.model)

    def prepare(self) -> None:
        """Load the pipeline (once per process; ``MissingWeights`` propagates to the runner)."""
        self._loaded = load_pipeline(self.pipeline_class(), self.spec())

    # Sample text fields that must be non-empty when present (``requires`` covers absent ones).
    text_fields: ClassVar[tuple[str, ...] | None] = None  # None = (prompt_field,)

    def check(self, sample: Sample) -> str | None:
        return empty_text_reason(self.name, sample, self.text_fields or (self.prompt_field,))

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) this method runs at (a subclass with other size rules overrides it)."""
        return working_size(height, width, self.params.resolution)

    def begin_edit(self, sample: Sample, seed: int) -> "EditStart":
        """The common start of every adapter's ``edit``: the pipeline loaded (once), the source
        resized (bicubic) to :meth:`working_size`, and a generator seeded with ``seed`` on the
        pipeline's device (on the CPU for MPS, whose generators not every op supports; diffusers'
        docs seed there too). ``t0`` starts the edit's preparation timer."""
        import torch

        t0 = time.perf_counter()
        if self._loaded is None:
            self.prepare()
            counting.restart()  # loading (and whatever a prepare() precomputes) is not this edit's cost
            t0 = time.perf_counter()
        loaded = self._loaded
        assert loaded is not None
        # hooks once per module (idempotent): an adapter may have swapped a component since loading
        counting.watch_pipeline(loaded.pipeline)
        src = np.asarray(sample.source)
        h, w = src.shape[:2]
        size = self.working_size(h, w)
        gen_device = "cpu" if loaded.device == "mps" else loaded.device
        generator = torch.Generator(gen_device).manual_seed(int(seed))
        return EditStart(loaded, src, (h, w), size, to_pil(src, size), generator, t0)

    def edit_info(self, start: "EditStart", seed: int, prep_seconds: float, **entries: Any) -> dict[str, Any]:
        """An edit's ``info``: the loaded weights' summary, steps, guidance, :meth:`extra_info`,
        then ``entries`` (method-specific), the ``"auto"`` parameters as resolved for the backbone
        (``auto_params``), the working size, the seed and the preparation time
        (image conversion and resizing; model loading is ``prepare()``)."""
        p = self.params
        return {
            **start.loaded.info(),
            "steps": int(p.num_inference_steps),
            "guidance_scale": float(p.guidance_scale),
            **self.extra_info(),
            **entries,
            # the parameters left at "auto" and what the backbone made of them
            "auto_params": dict(getattr(p, "auto_resolved", {})),
            "working_size_hw": [int(start.size[0]), int(start.size[1])],
            "seed": int(seed),
            "prep_seconds": prep_seconds,
        }

    @counting.counting_edit
    @tiny_threads
    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch

        start = self.begin_edit(sample, seed)
        prompt = str(getattr(sample, self.prompt_field))
        prep = time.perf_counter() - start.t0
        with torch.inference_mode():
            out = self.call_pipeline(start.loaded.pipeline, start.image, prompt, start.generator)
        edited = from_pipeline_output(out.images, start.source_hw)
        info = self.edit_info(start, seed, prep, prompt_field=self.prompt_field, prompt=prompt)
        return MethodOutput(image=edited, info=info)


@dataclasses.dataclass
class EditStart:
    """What :meth:`DiffusionMethod.begin_edit` prepares for one edit."""

    loaded: LoadedPipeline
    source: np.ndarray  # RGB uint8, the sample's size
    source_hw: tuple[int, int]
    size: tuple[int, int]  # working (height, width)
    image: Any  # the source as a PIL image of the working size
    generator: Any  # torch.Generator seeded with the edit's seed
    t0: float  # perf_counter at the start of the edit's preparation


def empty_text_reason(method: str, sample: Sample, fields: tuple[str, ...] | list[str]) -> str | None:
    """The skip reason when one of ``fields`` holds blank text, else None (absent fields are
    the runner's ``requires`` check)."""
    for field in fields:
        text = getattr(sample, field)
        if text is not None and not str(text).strip():
            return f"method '{method}' needs a non-empty {field}; sample '{sample.id}' has an empty one"
    return None


def use_ddim_pair(pipe: Any) -> None:
    """Set a DDIM scheduler and its inverse built from the checkpoint's scheduler config, as
    diffusers' real-image examples of DiffEdit and Pix2Pix-Zero do (a checkpoint has no
    ``inverse_scheduler``). The loaded pipeline is shared (cached per class and weights), so this
    is done once: every instance of these methods wants the same pair."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if not isinstance(getattr(pipe, "inverse_scheduler", None), DDIMInverseScheduler):
        pipe.inverse_scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)


def check_unit(owner: str, name: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` must be a number in the unit interval, ends open or closed as asked."""
    _check_number(owner, name, value, 0.0, inclusive=not low_open)
    if value > 1.0 or (high_open and value == 1.0):
        raise ValueError(f"{owner}: '{name}' must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, "
                         f"got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: '{name}' must be one of {list(choices)}, got {value!r}")


class InvertAndEditMethod(DiffusionMethod):
    """Base of adapters that DDIM-invert the source on a ``StableDiffusionPipeline`` and denoise
    with attention control in their own loop (MasaCtrl, Plug-and-Play); the pipeline supplies
    the components.

    Subclasses implement :meth:`run_edit` (latents in, latents and extras out) and
    :meth:`source_prompt_for`.
    """

    tiny_kind: ClassVar[str] = "sd15"
    prompt_field: ClassVar[str] = "target_caption"

    def __init__(self, params: "InvertAndEditMethod.Params | None" = None):
        super().__init__(params)
        self._sample: Sample | None = None
        self._extra: dict[str, Any] = {}

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    @abc.abstractmethod
    def source_prompt_for(self, sample: Sample) -> str:
        """The text the source branch is inverted / conditioned with."""

    @abc.abstractmethod
    def run_edit(self, pipe: Any, latents0: Any, source_prompt: str, target_prompt: str) -> dict[str, Any]:
        """Invert ``latents0`` and edit; a dict with at least ``"edit"`` (final latents
        ``[1, C, h, w]``), plus whatever tests want to inspect."""

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        from .diffusion.inversion import decode_latents, encode_image

        assert self._sample is not None
        latents0 = encode_image(pipe, np.asarray(image))
        source_prompt = self.source_prompt_for(self._sample)
        out = self.run_edit(pipe, latents0, source_prompt, prompt)
        self._extra = {"source_prompt_text": source_prompt, **out.get("info", {})}
        u8 = decode_latents(pipe, out["edit"])
        # from_pipeline_output maps [0, 1] floats back to uint8 with rint: exact for k / 255.
        return types.SimpleNamespace(images=u8.astype(np.float32) / 255.0)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        self._sample, self._extra = sample, {}
        try:
            out = super().edit(sample, seed)
            extra = self._extra
        finally:
            self._sample, self._extra = None, {}
        out.info.update(extra)
        return out


def text_embeddings(pipe: Any, prompts: list[str], like: Any) -> Any:
    """``encode_prompt`` of each prompt, concatenated, on ``like``'s device and dtype."""
    import torch

    from .diffusion.inversion import encode_prompt

    return torch.cat([encode_prompt(pipe, p) for p in prompts]).to(device=like.device, dtype=like.dtype)
