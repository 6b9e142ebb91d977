"""Loading diffusers pipelines for method adapters: offline-first, once per process.

A method describes its model with a :class:`ModelSpec` (a Hugging Face id or a local folder,
revision, variant, dtype, device, CPU offload, attention slicing, downloads, backbone) and calls
:func:`load_pipeline` from its ``prepare()``. The result, a :class:`LoadedPipeline`, is cached per
process under (pipeline class, spec): every sample and every parameter point of a sweep shares it.

Where the weights come from:

- ``backbone='tiny'``: random-weight tiny components of the real classes
  (:mod:`methods.diffusion.tiny`); ``revision`` is ``tiny-random-<kind>`` and ``weights_label``
  is :data:`RANDOM_WEIGHTS_LABEL`. The model id is ignored, so a method config keeps its real id
  and a smoke run only flips ``backbone``.
- a local folder (a ``save_pretrained`` output or a hub snapshot folder): loaded from there;
  ``revision`` is ``local-<sha1 of the file listing>`` (relative path, size, mtime of every file),
  so it changes whenever a file is replaced or edited.
- a hub id: ``from_pretrained(id, local_files_only=True)`` against the hub cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``, or the spec's
  ``cache_dir``); ``revision`` is the commit hash of the cached snapshot. Downloads happen only
  when the spec says ``allow_downloads`` or the environment has ``EDIT_HARNESS_ALLOW_DOWNLOADS=1``.

Missing weights raise :class:`MissingWeights` (a ``RuntimeError``) whose message names the model,
the revision, where it looked and every way to provide it; the runner turns a ``prepare()`` error
into a skipped row with that message as the reason.

Settings that cannot work are refused with :class:`UnsupportedSetting` (a ``ValueError``) before
anything is loaded: fp16 on CPU (many CPU kernels lack half precision, and where they exist the
results differ from GPU fp16: use fp32 or bf16), CPU offload without CUDA.

No torch / diffusers import happens at module import time; :func:`resolve_revision` (for a
method's ``model_revision()``, which the runner asks before ``prepare()``) stays torch-free.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Literal

from .tiny import RANDOM_WEIGHTS_LABEL, TINY_KINDS

ALLOW_DOWNLOADS_ENV = "EDIT_HARNESS_ALLOW_DOWNLOADS"
DTYPES = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cuda", "mps", "cpu")
BACKBONES = ("real", "tiny")

_PIPELINES: dict[tuple, "LoadedPipeline"] = {}
_LOCK = threading.RLock()


class MissingWeights(RuntimeError):
    """The model's weights are not on this machine (and downloads are not allowed)."""


class UnsupportedSetting(ValueError):
    """A dtype / device / offload combination that cannot run here."""


def downloads_allowed(spec_allows: bool = False) -> bool:
    """Whether downloads are allowed: by the spec, or by ``EDIT_HARNESS_ALLOW_DOWNLOADS=1``."""
    env = os.environ.get(ALLOW_DOWNLOADS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return bool(spec_allows) or env


def hub_cache_dir(explicit: str | os.PathLike | None = None) -> str:
    """The Hugging Face hub cache folder, read from the environment at call time.

    (``huggingface_hub.constants`` freezes the environment when it is first imported; reading it
    here lets a process, or a test, point ``HF_HOME`` / ``HF_HUB_CACHE`` elsewhere later.)
    """
    if explicit:
        return os.path.expanduser(str(explicit))
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which pipeline weights to load and how.

    model: a Hugging Face hub id (``org/name``) or a local folder.
    revision: hub branch / tag / commit (None = ``main``); ignored for local folders.
    variant: weight-file variant (e.g. ``fp16`` for ``*.fp16.safetensors``), or None.
    dtype: ``fp32`` | ``fp16`` | ``bf16`` (fp16 on CPU is refused).
    device: ``auto`` (CUDA, else MPS, else CPU) | ``cuda`` | ``mps`` | ``cpu``.
    cpu_offload: ``enable_model_cpu_offload()`` (CUDA only).
    attention_slicing: ``enable_attention_slicing()``.
    allow_downloads: let diffusers download missing files (also ``EDIT_HARNESS_ALLOW_DOWNLOADS=1``).
    backbone: ``real`` (the weights above) | ``tiny`` (random-weight tiny components; smoke runs).
    tiny_kind: which tiny backbone (one of ``tiny.TINY_KINDS``); None = from the pipeline class.
    cache_dir: hub cache folder; None = from the environment (see :func:`hub_cache_dir`).
    """

    model: str
    revision: str | None = None
    variant: str | None = None
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    cpu_offload: bool = False
    attention_slicing: bool = False
    allow_downloads: bool = False
    backbone: Literal["real", "tiny"] = "real"
    tiny_kind: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UnsupportedSetting(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise UnsupportedSetting(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.backbone not in BACKBONES:
            raise UnsupportedSetting(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.tiny_kind is not None and self.tiny_kind not in TINY_KINDS:
            raise UnsupportedSetting(f"tiny_kind must be one of {list(TINY_KINDS)} or None, got {self.tiny_kind!r}")
        if self.backbone == "real" and not str(self.model or "").strip():
            raise UnsupportedSetting("model (a Hugging Face id or a local folder) is empty")

    @property
    def is_local(self) -> bool:
        """Whether ``model`` names a local folder (it exists, or it is written as a path)."""
        m = str(self.model)
        if os.path.isdir(os.path.expanduser(m)):
            return True
        return m.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(m) or m.count("/") > 1


@dataclasses.dataclass(eq=False)
class LoadedPipeline:
    """A loaded pipeline plus what results must record about it.

    revision: ``tiny-random-<kind>`` | ``local-<hash>`` | the hub commit hash.
    weights_label: where the weights came from, for tables; :data:`RANDOM_WEIGHTS_LABEL` for tiny.
    """

    pipeline: Any
    spec: ModelSpec
    revision: str
    device: str
    dtype: str
    weights_label: str
    source: str  # the folder the weights were read from, or 'tiny:<kind>'

    @property
    def random_weights(self) -> bool:
        return self.spec.backbone == "tiny"

    def info(self) -> dict[str, Any]:
        """A JSON-able summary for an edit's sidecar / the run manifest."""
        return {
            "model": self.spec.model if self.spec.backbone == "real" else f"tiny:{self.source.split(':', 1)[-1]}",
            "revision": self.revision,
            "weights": self.weights_label,
            "random_weights": self.random_weights,
            "device": self.device,
            "dtype": self.dtype,
            "cpu_offload": self.spec.cpu_offload,
            "attention_slicing": self.spec.attention_slicing,
        }


# --------------------------------------------------------------------------------------------
# Revisions (torch-free)
# --------------------------------------------------------------------------------------------
def listing_hash(folder: str | os.PathLike) -> str:
    """sha1 of a folder's file listing: relative path, size and mtime (ns) of every file.

    Symlinks are followed (a hub snapshot links into ``blobs/``). Content is not read: weight
    files are gigabytes; a replaced or edited file changes its size or mtime.
    """
    root = Path(os.path.expanduser(str(folder)))
    rows = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            rows.append(f"{p.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(rows).encode("utf-8")).hexdigest()


def _hub_snapshot(spec: ModelSpec) -> str | None:
    """The cached snapshot folder of a hub id at the spec's revision, or None (no network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return snapshot_download(
            spec.model, revision=spec.revision, cache_dir=hub_cache_dir(spec.cache_dir), local_files_only=True
        )
    except Exception:  # LocalEntryNotFoundError, a malformed id, a broken cache entry
        return None


def resolve_revision(spec: ModelSpec, pipeline_cls: type | None = None) -> str:
    """The revision string results record for ``spec``, without loading anything.

    ``tiny-random-<kind>``, ``local-<listing hash>``, the cached hub commit hash, or, when the hub
    id is not cached, ``uncached:<id>@<revision>`` (the pipeline cannot be prepared then anyway,
    unless downloads are allowed; after a download :func:`load_pipeline` records the commit).
    """
    if spec.backbone == "tiny":
        return f"tiny-random-{_tiny_kind(spec, pipeline_cls)}"
    if spec.is_local:
        p = os.path.expanduser(spec.model)
        return f"local-{listing_hash(p)}" if os.path.isdir(p) else f"missing-local:{spec.model}"
    snap = _hub_snapshot(spec)
    if snap:
        return Path(snap).name
    return f"uncached:{spec.model}@{spec.revision or 'main'}"


def _tiny_kind(spec: ModelSpec, pipeline_cls: type | None) -> str:
    if spec.tiny_kind:
        return spec.tiny_kind
    if pipeline_cls is None:
        return "sd15"
    from .tiny import tiny_kind_for

    return tiny_kind_for(pipeline_cls)


# --------------------------------------------------------------------------------------------
# Device / dtype
# --------------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``mps`` when available, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _check_settings(spec: ModelSpec, device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UnsupportedSetting("device=cuda was asked for, but CUDA is not available here; use device=auto or cpu")
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UnsupportedSetting("device=mps was asked for, but MPS is not available here; use device=auto or cpu")
    if spec.dtype == "fp16" and device == "cpu":
        raise UnsupportedSetting(
            f"dtype=fp16 on the CPU is refused for model '{spec.model}': half-precision CPU kernels are "
            f"missing or slow and their results differ from GPU fp16; use dtype=fp32 (or bf16) on the CPU, "
            f"or run on a GPU"
        )
    if spec.cpu_offload and device != "cuda":
        raise UnsupportedSetting(
            f"cpu_offload=true needs a CUDA device (offload moves each model onto the GPU when it runs); "
            f"the device here is '{device}': set cpu_offload=false"
        )


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _missing_message(spec: ModelSpec, pipeline_cls: type, looked: str, cause: str | None = None) -> str:
    rev = spec.revision or "main"
    lines = [
        f"weights of model '{spec.model}' (revision {rev}"
        + (f", variant {spec.variant}" if spec.variant else "")
        + f") for {pipeline_cls.__name__} are not on this machine; looked in {looked}.",
        "Provide them in one of these ways:",
        f"  - on a machine with hub access run `huggingface-cli download {spec.model}"
        + (f" --revision {spec.revision}" if spec.revision else "")
        + "` (or `hf download ...`), then copy its hub cache folder here and point HF_HOME (or "
        "HF_HUB_CACHE) at it;",
        "  - or put a save_pretrained / snapshot folder on this machine and set the method's model "
        "parameter to that local path;",
        f"  - or allow downloads: set {ALLOW_DOWNLOADS_ENV}=1 or the method's allow_downloads=true;",
        "  - or, for a smoke run with random weights, set backbone=tiny.",
    ]
    if cause:
        lines.append(f"(loader said: {cause})")
    return "\n".join(lines)


def _load_tiny(pipeline_cls: type, spec: ModelSpec, device: str) -> tuple[Any, str, str, str]:
    from .tiny import tiny_pipeline

    kind = _tiny_kind(spec, pipeline_cls)
    pipe = tiny_pipeline(kind, pipeline_cls)
    pipe.to(dtype=_torch_dtype(spec.dtype))
    return pipe, f"tiny-random-{kind}", RANDOM_WEIGHTS_LABEL, f"tiny:{kind}"


def _load_real(pipeline_cls: type, spec: ModelSpec) -> tuple[Any, str, str, str]:
    allow = downloads_allowed(spec.allow_downloads)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(spec.dtype)}
    if spec.variant:
        kwargs["variant"] = spec.variant
    if _takes(pipeline_cls, "safety_checker"):
        # Benchmark edits are scored, not shown to end users; the checker would blank images.
        kwargs.update(safety_checker=None, requires_safety_checker=False)

    if spec.is_local:
        folder = os.path.expanduser(spec.model)
        if not os.path.isdir(folder):
            raise MissingWeights(_missing_message(spec, pipeline_cls, f"the local folder {folder} (it does not exist)"))
        try:
            pipe = pipeline_cls.from_pretrained(folder, local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise MissingWeights(
                _missing_message(spec, pipeline_cls, f"the local folder {folder}", f"{type(e).__name__}: {e}")
            ) from e
        return pipe, f"local-{listing_hash(folder)}", f"{spec.model} (local folder)", folder

    cache = hub_cache_dir(spec.cache_dir)
    snap = _hub_snapshot(spec)
    if snap is None and not allow:
        raise MissingWeights(
            _missing_message(spec, pipeline_cls, f"the Hugging Face hub cache {cache} (no snapshot of this id/revision)")
        )
    try:
        pipe = pipeline_cls.from_pretrained(
            spec.model, revision=spec.revision, cache_dir=cache, local_files_only=not allow, **kwargs
        )
    except OSError as e:  # diffusers reports absent files (incomplete snapshot, no network) as OSError
        raise MissingWeights(
            _missing_message(spec, pipeline_cls, f"the Hugging Face hub cache {cache}", f"{type(e).__name__}: {e}")
        ) from e
    snap = snap or _hub_snapshot(spec)
    revision = Path(snap).name if snap else f"{spec.model}@{spec.revision or 'main'}"
    return pipe, revision, f"{spec.model}@{revision[:12]}", snap or cache


def _takes(pipeline_cls: type, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(pipeline_cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _cache_key(pipeline_cls: type, spec: ModelSpec, device: str) -> tuple:
    real = spec.backbone == "real"
    return (
        f"{pipeline_cls.__module__}.{pipeline_cls.__qualname__}",
        spec.backbone,
        # a tiny backbone ignores model / revision / variant / downloads / cache_dir
        os.path.abspath(os.path.expanduser(spec.model)) if real and spec.is_local else (spec.model if real else None),
        spec.revision if real else None,
        spec.variant if real else None,
        _tiny_kind(spec, pipeline_cls) if not real else None,
        hub_cache_dir(spec.cache_dir) if real and not spec.is_local else None,
        spec.dtype,
        device,
        spec.cpu_offload,
        spec.attention_slicing,
    )


def load_pipeline(pipeline_cls: type, spec: ModelSpec) -> LoadedPipeline:
    """The pipeline ``pipeline_cls`` with ``spec``'s weights, loaded once per process and shared.

    A second call with the same class and an equivalent spec returns the same object. A local
    folder is reloaded when its listing changed (its revision is part of the key).

    Raises :class:`MissingWeights` when the weights are not here, :class:`UnsupportedSetting` for
    a dtype / device / offload combination that cannot run.
    """
    device = resolve_device(spec.device)
    _check_settings(spec, device)
    key = _cache_key(pipeline_cls, spec, device)
    if spec.backbone == "real" and spec.is_local and os.path.isdir(os.path.expanduser(spec.model)):
        key = key + (listing_hash(spec.model),)
    with _LOCK:
        hit = _PIPELINES.get(key)
        if hit is not None:
            return hit
        if spec.backbone == "tiny":
            pipe, revision, label, source = _load_tiny(pipeline_cls, spec, device)
        else:
            pipe, revision, label, source = _load_real(pipeline_cls, spec)
        if spec.cpu_offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        if spec.attention_slicing:
            pipe.enable_attention_slicing()
        pipe.set_progress_bar_config(disable=True)  # the runner has its own progress bar
        loaded = LoadedPipeline(pipe, spec, revision, device, spec.dtype, label, source)
        _PIPELINES[key] = loaded
        return loaded


def clear_cache() -> None:
    """Forget every loaded pipeline (tests; freeing memory between unrelated sweeps)."""
    with _LOCK:
        _PIPELINES.clear()
