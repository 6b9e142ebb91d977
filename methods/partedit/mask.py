"""PartEdit's per-step part mask: aggregate the part token's cross-attention, then binarise.

PartEdit (Cvejic et al., 2025, Sec. 3.3, Eq. 4-5; code ``Gorluxor/PartEdit``,
``stable_diffusion_xl_partedit.py``) turns the part token's cross-attention maps of one denoising
step into the blending mask of the next step:

1. :func:`aggregate` — every selected layer's ``(h_l, w_l)`` map is bilinearly upsampled to
   ``size`` (1024 x 1024 in the code), the maps are averaged over the layers and the result is
   min-max normalised (``AttentionStore.calculate_mask_t_res`` -> ``aggregate_attention`` +
   ``min_max_norm``, eps 1e-6).
2. :func:`binarize` — the adaptive threshold of Eq. 5 (``Binarization.PARTEDIT``): with ``k`` the
   Otsu threshold of the normalised map, values below ``0.5 k`` become 0, values at or above
   ``omega * k`` become 1 and the values in between are kept (omega = 1.5).
3. :func:`otsu_threshold` — a torch port of ``skimage.filters.threshold_otsu(image, nbins=256)``
   that gives scikit-image's value bit for bit (see its docstring for how).

Which layers (:func:`layer_indices`): the code aggregates ``LAYERS_TO_USE`` = ``[24..59, 0..3]``,
indices into the list its ``AttentionStore`` appends to in *processor call order* (forward order:
down blocks, the middle block, up blocks); SDXL has 70 cross-attention layers. The paper
(Appendix E) names "the first 8 layers of the decoder", the layers the tokens are trained on
(``up_blocks.0.attentions.0.transformer_blocks.0-7.attn2``). Both are offered; an UNet that is not
SDXL-shaped (the tiny test backbone) gets a documented fallback that :func:`select_layers` reports.

No torch import at module import time.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "BINARIZE_RULES",
    "CODE_LAYERS",
    "LAYER_SETS",
    "LayerSelection",
    "PAPER_DECODER_LAYERS",
    "SDXL_CROSS_LAYERS",
    "aggregate",
    "binarize",
    "call_order",
    "code_map_grids",
    "cross_attention_layers",
    "layer_indices",
    "otsu_threshold",
    "part_mask",
    "select_layers",
    "time_aggregate",
]

#: ``LAYERS_TO_USE`` of the official code: indices into the call-ordered list of SDXL's 70
#: cross-attention layers (see :func:`code_map_grids` for what they are).
CODE_LAYERS: tuple[int, ...] = tuple(range(24, 60)) + (0, 1, 2, 3)
#: Number of cross-attention layers of SDXL base's UNet (4 + 20 down, 10 mid, 30 + 6 up).
SDXL_CROSS_LAYERS = 70
#: The paper's layer set: the first 8 cross-attention layers of the decoder (Appendix E).
PAPER_DECODER_LAYERS = 8
#: ``layer_set=`` values of :func:`select_layers` / :func:`layer_indices`.
LAYER_SETS = ("code", "code_name_order", "paper", "all")
#: ``rule=`` values of :func:`binarize` (the official ``Binarization`` enum's mask rules).
BINARIZE_RULES = ("partedit", "otsu", "binary_0.5", "none")
#: min-max epsilon of the code's ``min_max_norm``.
MIN_MAX_EPS = 1e-6


# ---------------------------------------------------------------------------
# Otsu
# ---------------------------------------------------------------------------


def _float_dtype(x: "torch.Tensor") -> "torch.dtype":
    import torch

    # scikit-image keeps float64 images in float64; every other input is compared as float32
    # (the maps the method thresholds are float32 or half; the code casts them to float32 too).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _numpy_histogram_counts(x: "torch.Tensor", nbins: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-row ``np.histogram(row, bins=nbins)`` counts and bin edges of ``x`` (rows, n).

    Written by hand because ``torch.histc`` / ``torch.histogram`` assign values that fall on an
    edge differently from NumPy: this reproduces NumPy's uniform-bin algorithm op for op (edges
    ``arange * ((max - min) / nbins) + min`` with the last edge = max, as ``np.linspace`` computes
    them in the array's dtype; index ``trunc((x - min) / (max - min) * nbins)`` followed by
    NumPy's one-ULP corrections against the edges), so the counts are identical.
    """
    import torch

    rows = x.shape[0]
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    step = (hi - lo) / nbins
    edges = torch.arange(nbins + 1, device=x.device, dtype=x.dtype)[None, :] * step + lo
    edges[:, -1:] = hi
    if bool((edges[:, 1:] <= edges[:, :-1]).any()):
        raise ValueError(
            f"Too many bins for data range: cannot create {nbins} finite-sized bins "
            "(the map's value range is below the dtype's resolution; numpy / scikit-image refuse it too)"
        )
    idx = (((x - lo) / (hi - lo)) * nbins).to(torch.int64)
    idx = torch.where(idx == nbins, idx - 1, idx)
    idx = idx - (x < edges.gather(1, idx)).to(torch.int64)
    inc = (x >= edges.gather(1, idx + 1)) & (idx != nbins - 1)
    idx = idx + inc.to(torch.int64)
    offsets = torch.arange(rows, device=x.device)[:, None] * nbins
    counts = torch.bincount((idx + offsets).reshape(-1), minlength=rows * nbins).reshape(rows, nbins)
    return counts, edges


def _otsu_from_histogram(counts: np.ndarray, centers: np.ndarray) -> float:
    """scikit-image's between-class variance maximisation on one histogram.

    Runs in NumPy on the ``nbins``-long histogram (the per-pixel work, the histogram, stays on
    the tensor's device): scikit-image accumulates float32 counts with ``np.cumsum``, i.e.
    sequentially in float32, while ``torch.cumsum`` accumulates float32 in double on the CPU; on a
    flat variance curve (a near-uniform map) that rounding difference moves the argmax by a bin.
    """
    counts = counts.astype(np.float32, copy=False)
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centers) / weight1
    mean2 = (np.cumsum((counts * centers)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return centers[int(np.argmax(variance12))]


def otsu_threshold(x: "torch.Tensor", nbins: int = 256, *, batched: bool = False) -> "torch.Tensor":
    """Otsu's threshold of ``x``, equal to ``skimage.filters.threshold_otsu(x, nbins)``.

    ``x`` is one map of any shape (flattened, as scikit-image does), or, with ``batched=True``,
    a batch of maps along dim 0 (one threshold each). Float64 input is thresholded in float64,
    anything else as float32 (scikit-image's value on the float32 copy). A constant map's
    threshold is its value (scikit-image's rule). Returns a 0-d tensor (``(B,)`` when batched) on
    ``x``'s device. Non-finite values raise ``ValueError`` (NumPy refuses a non-finite range).

    The port: the histogram is NumPy's uniform-bin histogram over ``[min, max]`` computed in torch
    (:func:`_numpy_histogram_counts`), bin centers ``(e[:-1] + e[1:]) / 2`` in the same dtype, and
    scikit-image's variance maximisation on the 256 counts (:func:`_otsu_from_histogram`).
    """
    import torch

    if nbins < 1:
        raise ValueError(f"nbins must be positive, got {nbins}")
    dtype = _float_dtype(x)
    flat = x.detach().to(dtype)
    if batched:
        if flat.ndim < 1 or flat.shape[0] == 0:
            raise ValueError(f"batched Otsu needs a non-empty leading batch dim, got shape {tuple(x.shape)}")
        flat = flat.reshape(flat.shape[0], -1)
    else:
        flat = flat.reshape(1, -1)
    if flat.shape[1] == 0:
        raise ValueError("Otsu threshold of an empty map")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("Otsu threshold: the map has non-finite values (nan / inf)")
    out = torch.empty(flat.shape[0], dtype=dtype)
    constant = (flat == flat[:, :1]).all(dim=1).cpu()
    varying = (~constant).nonzero().flatten().tolist()
    for i in constant.nonzero().flatten().tolist():
        out[i] = flat[i, 0].cpu()
    if varying:
        rows = flat[varying]
        counts, edges = _numpy_histogram_counts(rows, nbins)
        centers = ((edges[:, :-1] + edges[:, 1:]) / 2.0).cpu().numpy()
        counts_np = counts.cpu().numpy()
        for j, i in enumerate(varying):
            out[i] = float(_otsu_from_histogram(counts_np[j], centers[j]))
    out = out.to(x.device)
    return out if batched else out[0]


# ---------------------------------------------------------------------------
# Binarisation (Eq. 5)
# ---------------------------------------------------------------------------


def binarize(
    m: "torch.Tensor",
    *,
    omega: float = 1.5,
    rule: str = "partedit",
    threshold: "float | torch.Tensor | None" = None,
    return_threshold: bool = False,
) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """Binarise a min-max normalised map ``m`` (any shape; one Otsu threshold over all of it).

    Rules (the official ``Binarization`` enum's mask rules):

    - ``"partedit"`` (``Binarization.PARTEDIT``, Eq. 5): ``k`` = Otsu(m); ``m < 0.5 k`` -> 0,
      ``m >= omega * k`` -> 1, values in between kept.
    - ``"otsu"`` (``BINARY_OTSU``): ``m < k`` -> 0, ``m >= k`` -> 1.
    - ``"binary_0.5"`` (``BINARY_0_5``): a fixed cut at 0.5 (no Otsu).
    - ``"none"`` (``P2P`` / ``PROVIDED_MASK``): the map unchanged (a soft mask).

    The enum's ``DISABLED`` means "do not blend at all", which is the controller's business, not
    a mask rule. ``threshold`` overrides the Otsu ``k`` (e.g. one computed elsewhere).
    ``omega`` is used by ``"partedit"`` only. Returns a new tensor (``m`` is not modified), and
    with ``return_threshold=True`` also the ``k`` used (the code's ``last_otsu``; NaN for rules
    without Otsu).
    """
    import torch

    if rule not in BINARIZE_RULES:
        raise ValueError(f"unknown binarisation rule {rule!r}; known: {', '.join(BINARIZE_RULES)}")
    if rule == "partedit" and not omega > 0:
        raise ValueError(f"omega must be positive, got {omega}")
    out = m.clone()
    if rule in ("partedit", "otsu"):
        k = otsu_threshold(m) if threshold is None else torch.as_tensor(threshold, dtype=torch.float64)
        kf = float(k)
        lower, upper = (0.5 * kf, omega * kf) if rule == "partedit" else (kf, kf)
    else:
        k = torch.tensor(float("nan"))
        lower = upper = 0.5
    if rule != "none":
        # The code's order: zero below the lower cut first, then one at / above the upper cut.
        out[m < lower] = 0
        out[m >= upper] = 1
    if return_threshold:
        return out, torch.as_tensor(k).to(m.device)
    return out


# ---------------------------------------------------------------------------
# Aggregation (Eq. 4, as the code computes it)
# ---------------------------------------------------------------------------


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, bool):
        raise TypeError("size must be an int or an (h, w) pair, not a bool")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {h}x{w}")
    return h, w


def _as_map(m: "torch.Tensor", index: int) -> "torch.Tensor":
    """A layer map as ``(h, w)``: accepts ``(h, w)`` or ``(1, h, w)`` / ``(1, 1, h, w)``."""
    t = m
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"aggregate: map {index} must be (h, w), got shape {tuple(m.shape)}")
    return t


def aggregate(
    maps: Sequence["torch.Tensor"],
    size: int | tuple[int, int] = 1024,
    *,
    normalize: bool = True,
) -> "torch.Tensor":
    """Mean over layers of the maps bilinearly upsampled to ``size``, min-max normalised.

    Each map is ``(h_l, w_l)``; the upsampling is ``F.interpolate(mode="bilinear")`` with
    ``align_corners=False`` and no antialiasing (the code's ``pack_interpolate_unpack``).
    Memory: one map is upsampled at a time into a float32 running sum, never a stack of all
    layers at ``size`` (40 x 1024^2 x 4 bytes = 168 MB per step in the code). ``normalize``:
    the code's ``min_max_norm`` ``(a - min) / (max - min + 1e-6)``. Returns float32 ``(H, W)``.
    """
    import torch
    import torch.nn.functional as F

    if len(maps) == 0:
        raise ValueError("aggregate: no attention maps given (no layer was captured)")
    h, w = _size(size)
    acc: "torch.Tensor | None" = None
    for i, m in enumerate(maps):
        t = _as_map(m, i).to(torch.float32)
        if tuple(t.shape) != (h, w):
            t = F.interpolate(t[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        if acc is None:
            acc = torch.zeros((h, w), dtype=torch.float32, device=t.device)
        acc.add_(t)
    assert acc is not None
    acc.div_(len(maps))
    if normalize:
        lo, hi = acc.min(), acc.max()
        acc = (acc - lo) / (hi - lo + MIN_MAX_EPS)
    return acc


def part_mask(
    maps: Sequence["torch.Tensor"],
    *,
    size: int | tuple[int, int] = 1024,
    omega: float = 1.5,
    rule: str = "partedit",
    return_threshold: bool = False,
) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """:func:`aggregate` then :func:`binarize`: one step's part mask ``(H, W)`` in [0, 1]."""
    return binarize(aggregate(maps, size), omega=omega, rule=rule, return_threshold=return_threshold)


def code_map_grids(latent: int = 128) -> list[tuple[int, int]]:
    """Token grids of the code's 40 aggregated layers on SDXL at ``latent`` x ``latent`` latents
    (128 for 1024 px), in ``CODE_LAYERS`` order: call-order 24-33 (middle block) and 34-59
    (``up_blocks.0``) at latent/4, 0-3 (``down_blocks.1``) at latent/2."""
    grids: list[tuple[int, int]] = []
    for i in CODE_LAYERS:
        g = latent // 2 if i < 4 or i >= 64 else latent // 4
        grids.append((g, g))
    return grids


def time_aggregate(
    grids: Sequence[tuple[int, int]] | None = None,
    size: int | tuple[int, int] = 1024,
    *,
    device: Any = "cpu",
    dtype: Any = None,
    repeats: int = 3,
    binarise: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Time one step's mask computation (upsample + mean + min-max, and the binarisation when
    ``binarise``) on random maps of the given grids (default: :func:`code_map_grids`, the code's
    40 layers at 1024 px). Returns ``{"seconds": best of repeats, "layers": n, "size": H}``;
    the benchmark compares it with the edit's per-step time (the issue's < 10 % budget).
    CUDA work is synchronised before the clock is read."""
    import torch

    grids = list(code_map_grids() if grids is None else grids)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.float32 if dtype is None else dtype
    maps = [torch.rand(gh, gw, generator=g).to(device=device, dtype=dtype) for gh, gw in grids]
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = aggregate(maps, size)
        if binarise:
            out = binarize(out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "layers": float(len(grids)), "size": float(_size(size)[0])}


# ---------------------------------------------------------------------------
# Layer sets
# ---------------------------------------------------------------------------

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _call_key(name: str) -> tuple:
    """Sort key giving diffusers' forward order of ``UNet2DConditionModel`` attention layers:
    down blocks, the middle block, then up blocks; inside a block by attention, transformer block,
    then ``attn1`` before ``attn2``. (``attn_processors`` lists names in *module registration*
    order, where ``up_blocks`` come before ``mid_block``: not the call order.)"""
    parts = name.split(".")
    head = _BLOCK_ORDER.get(parts[0], 3)
    nums = tuple(int(n) for n in re.findall(r"\d+", ".".join(parts[1:])))
    return (head, nums)


def call_order(names: Sequence[str]) -> list[str]:
    """Attention processor names sorted into forward call order (see :func:`_call_key`)."""
    return sorted(names, key=_call_key)


def cross_attention_layers(unet_or_names: Any) -> list[str]:
    """Call-ordered names (without ``.processor``) of the cross-attention (``attn2``) layers of
    a diffusers UNet, or of a sequence of processor names."""
    return call_order(_registration_order(unet_or_names))


@dataclass(frozen=True)
class LayerSelection:
    """Which cross-attention layers a mask aggregates, and why.

    ``indices`` are call-order indices among the cross-attention layers, ``names`` the layers'
    names, ``requested`` the asked-for set, ``used`` the set actually used (differs on a fallback)
    and ``note`` says what the fallback was (empty when none)."""

    requested: str
    used: str
    indices: tuple[int, ...]
    names: tuple[str, ...]
    note: str = ""

    @property
    def fallback(self) -> bool:
        return self.requested != self.used


def _registration_order(unet_or_names: Any) -> list[str]:
    names = list(unet_or_names.attn_processors) if hasattr(unet_or_names, "attn_processors") else list(unet_or_names)
    names = [n[: -len(".processor")] if n.endswith(".processor") else n for n in names]
    return [n for n in names if n.split(".")[-1] == "attn2"]


def _decoder(layers: Sequence[str]) -> list[int]:
    return [i for i, n in enumerate(layers) if n.startswith("up_blocks")]


def select_layers(unet_or_names: Any, layer_set: str = "code") -> LayerSelection:
    """The layers of ``layer_set`` on this UNet (or list of processor names).

    - ``"code"``: ``CODE_LAYERS`` (the official ``LAYERS_TO_USE``) when the UNet has SDXL's 70
      cross-attention layers; on any other UNet (the tiny test backbone has 8) the indices do
      not name the same layers, so the fallback is **every cross-attention layer** (``used="all"``).
    - ``"code_name_order"``: ``CODE_LAYERS`` read as indices into ``unet.attn_processors``'s
      *registration* order (where ``up_blocks`` precede ``mid_block``): all 36 up-block layers and
      the 4 of ``down_blocks.1``. The code indexes a call-ordered list, so ``"code"`` is what it
      runs; this set is what the same numbers name in registration order (the numbering in which
      the paper's "first 8 decoder layers [24, 32]" fits), offered for the ablation. Same
      fallback as ``"code"``; needs a UNet (or names in registration order).
    - ``"paper"``: the first 8 decoder cross-attention layers in call order (on SDXL
      ``up_blocks.0.attentions.0.transformer_blocks.0-7.attn2``, the training layers); a decoder
      with fewer has all of its cross-attention layers used (``used="decoder"``).
    - ``"all"``: every cross-attention layer.
    """
    if layer_set not in LAYER_SETS:
        raise ValueError(f"unknown layer set {layer_set!r}; known: {', '.join(LAYER_SETS)}")
    layers = cross_attention_layers(unet_or_names)
    if not layers:
        raise ValueError("the UNet has no cross-attention (attn2) layers")
    n = len(layers)
    note = ""
    used = layer_set
    if layer_set in ("code", "code_name_order"):
        if n == SDXL_CROSS_LAYERS and layer_set == "code":
            idx = list(CODE_LAYERS)
        elif n == SDXL_CROSS_LAYERS:
            registered = _registration_order(unet_or_names)
            idx = sorted(layers.index(registered[i]) for i in CODE_LAYERS)
        else:
            idx = list(range(n))
            used = "all"
            note = (
                f"layer_set {layer_set!r} names SDXL's cross-attention layers 24-59 and 0-3 "
                f"(of {SDXL_CROSS_LAYERS}); this UNet has {n}: using all {n} cross-attention layers instead"
            )
    elif layer_set == "paper":
        dec = _decoder(layers)
        if len(dec) >= PAPER_DECODER_LAYERS:
            idx = dec[:PAPER_DECODER_LAYERS]
        else:
            if not dec:
                raise ValueError(
                    "layer_set 'paper' needs decoder (up_blocks) cross-attention layers; this UNet has none")
            idx = dec
            used = "decoder"
            note = (
                f"layer_set 'paper' is the first {PAPER_DECODER_LAYERS} decoder cross-attention layers; "
                f"this UNet's decoder has {len(dec)}: using all of them"
            )
    else:
        idx = list(range(n))
    return LayerSelection(layer_set, used, tuple(idx), tuple(layers[i] for i in idx), note)


def layer_indices(unet: Any, layer_set: str = "code") -> list[int]:
    """Call-order indices (among cross-attention layers) of ``layer_set`` on ``unet``; see
    :func:`select_layers`, which also reports a fallback."""
    return list(select_layers(unet, layer_set).indices)
