"""``diffusers_pipeline``: any diffusers image-editing pipeline, configured from YAML alone.

A new diffusers method needs no code: the config names the pipeline class (an import path), the
weights, which sample field feeds which call argument, and the constant call arguments::

    method=diffusers_pipeline
    method.pipeline=diffusers.StableDiffusionImg2ImgPipeline
    method.model=stable-diffusion-v1-5/stable-diffusion-v1-5
    method.inputs={image:source,prompt:target_caption}
    method.call_args={strength:0.8}

(the Hydra override form of the YAML example in ``conf/method/diffusers_pipeline.yaml``; with the
same seed, resolution and steps it gives byte-identical edits to the ``sdedit`` adapter).

Parameters beyond the common :class:`DiffusionMethod.Params`:

- ``pipeline``: import path ``package.module.Class`` (or ``package.module:Class``), imported
  explicitly; it must be a subclass of ``diffusers.DiffusionPipeline``.
- ``inputs``: call argument -> sample field (one of :data:`harness.types.SAMPLE_FIELDS`).
  Images (``source``, ``target``, ``reference``) are passed as PIL RGB resized (bicubic) to the
  working size; masks (``mask``, ``reference_mask``) as PIL ``L`` (255 = edit) resized (nearest,
  so they stay binary) to the same size; points (``source_points``, ``target_points``) as float
  (N, 2) arrays scaled to the working size; text and numbers as they are. ``requires`` is
  ``source`` plus every mapped field, so the runner skips a sample lacking one, naming it.
- ``call_args``: constant keyword arguments (e.g. ``strength``). Every name in ``inputs`` and
  ``call_args`` must be a parameter that the pipeline's ``__call__`` declares. ``num_inference_steps`` and
  ``guidance_scale`` are the common parameters, passed when the pipeline's ``__call__`` takes them;
  repeating them here is refused (one source of truth). ``generator`` is set from the seed and
  ``output_type`` defaults to ``np`` (float images in [0, 1]).
- ``output``: accessor of the edited image on the pipeline output: attribute names and integer /
  quoted-string indices, e.g. ``images[0]`` (default). No code is evaluated.
- ``tiny_kind``: tiny backbone for ``backbone=tiny`` (``sd15`` | ``ip2p`` | ``sdxl``); null = from
  the pipeline class name (:func:`methods.diffusion.tiny.tiny_kind_for`).

Unknown sample fields, non-mapping ``inputs`` / ``call_args``, call arguments the pipeline does not
take, a bad import path or a class that is not a diffusers pipeline are :class:`ParamError` at
construction, naming the parameter. The pipeline class, the mapping and the call arguments are
recorded in every edit's info.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import time
from typing import Any, Mapping

import numpy as np

from harness.method import ParamError
from harness.registry import METHODS
from harness.types import SAMPLE_FIELDS, MethodOutput, Sample

from ._diffusion_common import DiffusionMethod, from_pipeline_output, to_pil
from .diffusion.tiny import TINY_KINDS

NAME = "diffusers_pipeline"
IMAGE_FIELDS = ("source", "target", "reference")
MASK_FIELDS = ("mask", "reference_mask")
POINT_FIELDS = ("source_points", "target_points")
TEXT_FIELDS = ("instruction", "source_caption", "target_caption", "category", "part", "session", "point_layout")
# Set by the adapter itself; not allowed as mapped inputs nor constant call arguments.
RESERVED_ARGS = ("generator",)
# Common parameters that the adapter passes itself (when the pipeline's __call__ takes them).
COMMON_CALL_ARGS = ("num_inference_steps", "guidance_scale")
DEFAULT_OUTPUT = "images[0]"

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*([.:][A-Za-z_]\w*)$")
_ACCESSOR_TOKEN = re.compile(r"\.?([A-Za-z_]\w*)|\[\s*(-?\d+)\s*\]|\[\s*(['\"])(.*?)\3\s*\]")


def parse_output_accessor(text: str) -> list[tuple[str, Any]]:
    """``images[0]`` / ``.images[0]`` / ``images['edit']`` -> [('attr', 'images'), ('item', 0)].

    Raises ValueError for anything else (no code is evaluated)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"'output' must be an accessor such as {DEFAULT_OUTPUT!r}, got {text!r}")
    s = text.strip()
    steps: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(s):
        m = _ACCESSOR_TOKEN.match(s, pos)
        if not m or (m.group(1) is not None and steps and not s[pos] == "."):
            raise ValueError(
                f"'output' must be attribute names and [index] / ['key'] items, e.g. {DEFAULT_OUTPUT!r}; "
                f"cannot parse {text!r} at {s[pos:]!r}"
            )
        if m.group(1) is not None:
            steps.append(("attr", m.group(1)))
        elif m.group(2) is not None:
            steps.append(("item", int(m.group(2))))
        else:
            steps.append(("item", m.group(4)))
        pos = m.end()
    return steps


def import_pipeline_class(path: str) -> type:
    """Import ``package.module.Class`` (or ``package.module:Class``) and check that it is a
    ``diffusers.DiffusionPipeline`` subclass; ValueError naming ``pipeline`` otherwise."""
    if not isinstance(path, str) or not _IMPORT_PATH.match(path.strip()):
        raise ValueError(
            f"'pipeline' must be an import path such as 'diffusers.StableDiffusionImg2ImgPipeline', got {path!r}"
        )
    path = path.strip()
    if ":" in path:
        module_name, attr = path.split(":", 1)
    else:
        module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"'pipeline' {path!r}: cannot import module {module_name!r} ({e})") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"'pipeline' {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    except ImportError as e:  # diffusers' lazy modules import on attribute access
        raise ValueError(f"'pipeline' {path!r}: cannot import {attr!r} ({e})") from None
    from diffusers import DiffusionPipeline

    if not (isinstance(obj, type) and issubclass(obj, DiffusionPipeline)):
        raise ValueError(
            f"'pipeline' {path!r} is {obj!r}, not a subclass of diffusers.DiffusionPipeline"
        )
    return obj


def _plain_mapping(name: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"'{name}' must be a mapping (call argument -> value), got {type(value).__name__} {value!r}")
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise ValueError(f"'{name}': call argument names must be identifiers, got {k!r}")
        out[k] = dict(v) if isinstance(v, Mapping) else (list(v) if isinstance(v, tuple) else v)
    return out


@METHODS.register(NAME)
class DiffusersPipeline(DiffusionMethod):
    """Wrap any diffusers image-editing pipeline from its config (see the module docstring)."""

    version = "1"
    requires = ("source",)  # per instance: source + the fields named in ``inputs``
    tiny_kind = "sd15"  # per instance: the ``tiny_kind`` parameter, else from the pipeline class
    prompt_field = ""

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        pipeline: str = ""  # import path of a diffusers.DiffusionPipeline subclass (required)
        model: str = ""  # Hugging Face id or local folder (required unless backbone=tiny)
        inputs: dict[str, str] | None = None  # call argument -> sample field (required)
        call_args: dict[str, Any] | None = None  # constant keyword arguments; null = none
        output: str = DEFAULT_OUTPUT  # accessor of the edited image on the pipeline output
        tiny_kind: str | None = None  # sd15 | ip2p | sdxl for backbone=tiny; null = from the class name

        def __post_init__(self) -> None:
            owner = NAME
            if not isinstance(self.pipeline, str) or not self.pipeline.strip():
                raise ValueError(
                    f"{owner}: 'pipeline' (import path of a diffusers pipeline class, e.g. "
                    f"'diffusers.StableDiffusionImg2ImgPipeline') is required"
                )
            super().__post_init__()
            inputs = _plain_mapping("inputs", self.inputs)
            if not inputs:
                raise ValueError(
                    f"{owner}: 'inputs' (call argument -> sample field, e.g. {{image: source, prompt: target_caption}}) "
                    f"is required, got {self.inputs!r}"
                )
            for arg, field in inputs.items():
                if field not in SAMPLE_FIELDS:
                    raise ValueError(
                        f"{owner}: 'inputs' maps call argument {arg!r} to unknown sample field {field!r}; "
                        f"known fields: {', '.join(SAMPLE_FIELDS)}"
                    )
            call_args = _plain_mapping("call_args", self.call_args) or {}
            for arg in RESERVED_ARGS:
                for pname, mapping in (("inputs", inputs), ("call_args", call_args)):
                    if arg in mapping:
                        raise ValueError(f"{owner}: '{pname}' must not set {arg!r}: the adapter sets it from the seed")
            for arg in COMMON_CALL_ARGS:
                for pname, mapping in (("inputs", inputs), ("call_args", call_args)):
                    if arg in mapping:
                        raise ValueError(
                            f"{owner}: '{pname}' must not set {arg!r}: use the method parameter "
                            f"'{arg}' (method.{arg}=...), which is passed to the pipeline"
                        )
            both = sorted(set(inputs) & set(call_args))
            if both:
                raise ValueError(f"{owner}: call argument(s) {both} are set both in 'inputs' and in 'call_args'")
            try:
                parse_output_accessor(self.output)
            except ValueError as e:
                raise ValueError(f"{owner}: {e}") from None
            if self.tiny_kind is not None and self.tiny_kind not in TINY_KINDS:
                raise ValueError(f"{owner}: 'tiny_kind' must be one of {list(TINY_KINDS)} or null, got {self.tiny_kind!r}")
            object.__setattr__(self, "inputs", inputs)
            object.__setattr__(self, "call_args", call_args or None)

    def __init__(self, params: "DiffusersPipeline.Params | None" = None):
        super().__init__(params)
        p = self.params
        try:
            cls = import_pipeline_class(p.pipeline)
        except ValueError as e:
            raise ParamError(f"method '{NAME}': {e}") from None
        self._pipeline_cls = cls
        self._call_params = self._check_call_signature(cls)
        from .diffusion.tiny import tiny_kind_for

        self.tiny_kind = p.tiny_kind or tiny_kind_for(cls)  # instance value used by spec()
        fields = list(dict.fromkeys(("source", *p.inputs.values())))
        self.requires = tuple(fields)  # Method.cannot_handle reads self.requires
        self._output = parse_output_accessor(p.output)

    def _check_call_signature(self, cls: type) -> set[str]:
        """The keyword names ``cls.__call__`` declares; every mapped input and constant call
        argument must be among them. A ``**kwargs`` catch-all does not count: in diffusers it only
        swallows deprecated arguments (``callback``, ``callback_steps``), so a misspelt name
        would be ignored silently."""
        p = self.params
        sig = inspect.signature(cls.__call__)
        names = {n for n, q in sig.parameters.items()
                 if n != "self" and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)}
        for pname, mapping in (("inputs", p.inputs), ("call_args", p.call_args or {})):
            unknown = sorted(set(mapping) - names)
            if unknown:
                raise ParamError(
                    f"method '{NAME}': '{pname}' names call argument(s) {unknown} that "
                    f"{cls.__name__}.__call__ does not take; it takes: {', '.join(sorted(names))}"
                )
        return names

    def _takes(self, arg: str) -> bool:
        return arg in self._call_params

    # -- DiffusionMethod hooks ----------------------------------------------------------------
    def pipeline_class(self) -> type:  # type: ignore[override]  (per instance: from the params)
        return self._pipeline_cls

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("diffusers_pipeline builds its call in edit()")

    def check(self, sample: Sample) -> str | None:
        for arg, field in self.params.inputs.items():
            value = getattr(sample, field)
            if isinstance(value, str) and not value.strip():
                return (
                    f"method '{self.name}' needs a non-empty {field} (call argument {arg!r}); "
                    f"sample '{sample.id}' has an empty one"
                )
        return None

    # -- the call ---------------------------------------------------------------------------
    def _convert(self, field: str, value: Any, src_hw: tuple[int, int], size: tuple[int, int]) -> Any:
        from PIL import Image

        h, w = size
        if field in IMAGE_FIELDS:
            return to_pil(np.asarray(value), size)
        if field in MASK_FIELDS:
            arr = np.asarray(value)
            if arr.dtype != np.uint8:
                arr = np.where(arr.astype(bool), 255, 0).astype(np.uint8)
            pil = Image.fromarray(np.ascontiguousarray(arr), mode="L")
            return pil if pil.size == (w, h) else pil.resize((w, h), Image.NEAREST)
        if field in POINT_FIELDS:
            pts = np.asarray(value, dtype=np.float32).reshape(-1, 2).copy()
            pts[:, 0] *= w / src_hw[1]
            pts[:, 1] *= h / src_hw[0]
            return pts
        if field in TEXT_FIELDS:
            return str(value)
        return value

    def _extract(self, out: Any) -> Any:
        obj = out
        for kind, key in self._output:
            try:
                obj = getattr(obj, key) if kind == "attr" else obj[key]
            except (AttributeError, KeyError, IndexError, TypeError) as e:
                raise RuntimeError(
                    f"method '{NAME}': 'output' {self.params.output!r} does not apply to the "
                    f"{type(out).__name__} the pipeline returned ({type(e).__name__}: {e})"
                ) from None
        return obj

    @staticmethod
    def _to_rgb_u8(image: Any, size_hw: tuple[int, int]) -> np.ndarray:
        """PIL / numpy (float in [0, 1] or uint8) / torch (CHW or HWC, [0, 1]) -> RGB uint8 of size_hw."""
        from PIL import Image

        h, w = size_hw
        if isinstance(image, Image.Image):
            pil = image.convert("RGB")
            if pil.size != (w, h):
                pil = pil.resize((w, h), Image.BICUBIC)
            return np.ascontiguousarray(np.asarray(pil))
        if type(image).__module__.startswith("torch"):
            image = image.detach().float().cpu().numpy()
            if image.ndim == 4:
                image = image[0]
            if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
                image = np.moveaxis(image, 0, -1)
        arr = np.asarray(image)
        if arr.ndim == 4:
            arr = arr[0]
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise RuntimeError(f"method '{NAME}': the pipeline output is not an image (shape {arr.shape})")
        arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3]
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        return from_pipeline_output(arr, size_hw)

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch

        start = self.begin_edit(sample, seed)
        p = self.params
        kwargs: dict[str, Any] = {}
        texts: dict[str, str] = {}
        for arg, field in p.inputs.items():
            kwargs[arg] = self._convert(field, getattr(sample, field), start.source_hw, start.size)
            if isinstance(kwargs[arg], str):
                texts[arg] = kwargs[arg]
        for arg in COMMON_CALL_ARGS:
            if self._takes(arg):
                kwargs[arg] = getattr(p, arg)
        kwargs.update(p.call_args or {})
        if "output_type" not in kwargs and self._takes("output_type"):
            kwargs["output_type"] = "np"
        if self._takes("generator"):
            kwargs["generator"] = start.generator
        prep = time.perf_counter() - start.t0
        with torch.inference_mode():
            out = start.loaded.pipeline(**kwargs)
        edited = self._to_rgb_u8(self._extract(out), start.source_hw)
        info = self.edit_info(
            start, seed, prep,
            pipeline=p.pipeline,
            pipeline_class=f"{self._pipeline_cls.__module__}.{self._pipeline_cls.__qualname__}",
            inputs=dict(p.inputs), call_args=dict(p.call_args or {}), output=p.output,
            **{k: kwargs[k] for k in COMMON_CALL_ARGS if k in kwargs},
            steps=int(kwargs.get("num_inference_steps", p.num_inference_steps)),
            passed=sorted(kwargs), texts=texts,
        )
        return MethodOutput(image=edited, info=info)
