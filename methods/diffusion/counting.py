"""How many times each network ran in one edit: a cost figure that does not depend on the machine.

Unit. One **call** is one forward call of a network module on a batch of B rows; its **rows**
are B. A classifier-free-guided UNet step on ``[uncond, cond]`` is 1 call and 2 rows;
InstructPix2Pix's image + text guidance (``[cond, image-only, uncond]``) is 1 call and 3 rows;
a guided step that runs the two branches one after the other (``predict_eps``, null-text
inversion) is 2 calls and 2 rows. An edit's ``info`` records both per network:
``network_calls`` and ``network_rows`` (``{"unet": 50, "vae_encode": 1, "vae_decode": 1,
"text_encoder": 2}``); the runner's ``unet_calls`` / ``unet_rows`` columns and the
``cost_unet_evals`` cost column (= UNet calls) come from them.

Networks counted: every ``torch.nn.Module`` component of the loaded pipeline under its
component name (``unet``, ``text_encoder``, ``text_encoder_2``, ``image_encoder`` ...), the
VAE split into ``vae_encode`` (its ``encoder``) and ``vae_decode`` (its ``decoder``), and any
auxiliary network an adapter registers with :func:`watch_module` (an estimator UNet, SAM, a
CLIP). Counting is a forward pre-hook on each module (installed once per module, shared by
every pipeline holding it, so a module in two pipelines is never counted twice), so the
adapters' own loops (DDIM / null-text inversion, attention-controlled sampling) are counted by
the same mechanism as the diffusers pipelines' loops; a module called outside an edit is not
counted. Backward passes (null-text's optimisation) are not calls: each inner step is one
forward call.

Each thread counts into its own tally (the hook reads a thread-local), opened by
:func:`counting_edit` around an adapter's ``edit`` and cleared by :func:`restart` once the
pipeline is loaded, so that a first edit's one-time preparation is not counted.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import threading
import weakref
from typing import Any, Callable, Iterator

NETWORK_CALLS = "network_calls"
NETWORK_ROWS = "network_rows"
#: component name -> the submodules counted in its place (name, attribute)
SPLIT_COMPONENTS = {"vae": (("vae_encode", "encoder"), ("vae_decode", "decoder"))}

_local = threading.local()
# module -> the name it is counted under (its hook handle is kept alive by the module itself)
_watched: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_watch_lock = threading.Lock()


class Tally:
    """Calls and rows per network name for one edit."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.rows: collections.Counter[str] = collections.Counter()

    def clear(self) -> None:
        self.calls.clear()
        self.rows.clear()

    def add(self, name: str, rows: int) -> None:
        self.calls[name] += 1
        self.rows[name] += rows

    def as_info(self) -> dict[str, dict[str, int]]:
        """``{"network_calls": {...}, "network_rows": {...}}``, names sorted (JSON-stable)."""
        return {NETWORK_CALLS: {k: int(self.calls[k]) for k in sorted(self.calls)},
                NETWORK_ROWS: {k: int(self.rows[k]) for k in sorted(self.rows)}}


def _batch_rows(args: tuple, kwargs: dict) -> int:
    """B of a forward call: the leading size of its first tensor argument (positional first,
    then keyword); 1 when no tensor is passed (a call on non-tensor inputs still ran once)."""
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.ndim else 1
    return 1


def _hook(name: str) -> Callable[..., None]:
    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        tally = getattr(_local, "tally", None)
        if tally is not None:
            tally.add(name, _batch_rows(args, kwargs))

    return pre_hook


def watch_module(name: str, module: Any) -> None:
    """Count ``module``'s forward calls under ``name`` (idempotent; a module already watched keeps
    its first name). For auxiliary networks an adapter runs besides its pipeline."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"watch_module: '{name}' is not a torch.nn.Module but {type(module).__name__}")
    with _watch_lock:
        if module in _watched:
            return
        module.register_forward_pre_hook(_hook(name), with_kwargs=True)
        _watched[module] = name


def watch_pipeline(pipe: Any) -> None:
    """Watch every network component of a diffusers pipeline (see the module docstring)."""
    import torch

    components = getattr(pipe, "components", None) or {}
    for name, comp in components.items():
        if not isinstance(comp, torch.nn.Module):
            continue  # tokenizers, schedulers, feature extractors, absent (None) components
        split = SPLIT_COMPONENTS.get(name)
        parts = [(n, getattr(comp, a, None)) for n, a in split] if split else []
        if parts and all(isinstance(m, torch.nn.Module) for _, m in parts):
            for n, m in parts:
                watch_module(n, m)
        else:
            watch_module(name, comp)


def current() -> Tally | None:
    """This thread's open tally, or None outside an edit."""
    return getattr(_local, "tally", None)


def restart() -> None:
    """Clear this thread's open tally (after one-time preparation such as loading the pipeline)."""
    tally = current()
    if tally is not None:
        tally.clear()


@contextlib.contextmanager
def counting() -> Iterator[Tally]:
    """Open a tally for this thread; a nested ``counting()`` shares the outer one."""
    outer = current()
    if outer is not None:
        yield outer
        return
    tally = Tally()
    _local.tally = tally
    try:
        yield tally
    finally:
        _local.tally = None


def counting_edit(edit: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a method's ``edit(sample, seed)``: the outermost call counts every network call of the
    edit and adds ``network_calls`` / ``network_rows`` to the returned output's ``info``
    (``super().edit`` inside an adapter's ``edit`` shares the tally)."""

    @functools.wraps(edit)
    def wrapper(self: Any, sample: Any, seed: int) -> Any:
        if current() is not None:
            return edit(self, sample, seed)
        with counting() as tally:
            out = edit(self, sample, seed)
        out.info.update(tally.as_info())
        return out

    wrapper.counting_edit = True  # type: ignore[attr-defined]
    return wrapper
