"""Attention plumbing shared by the attention-editing methods (issue 4).

One processor, :class:`EditingAttnProcessor`, is installed on every attention
layer of a diffusers ``UNet2DConditionModel``. It computes exactly what
diffusers' default ``AttnProcessor`` computes and, at three points, hands an
:class:`AttentionContext` to a pluggable :class:`AttentionController`:

``"qkv"``
    after the query/key/value projections (per-head layout ``(B*heads, N, d)``);
    a controller may return new ``(q, k, v)``. MasaCtrl's mutual self-attention
    (Cao et al., ICCV 2023, ``masactrl/masactrl.py``) and Plug-and-Play's
    self-attention injection (Tumanyan et al., CVPR 2023) live here.
``"probs"``
    after the softmax, ``(B*heads, N_q, N_k)``; a controller may return new
    probabilities. Prompt-to-Prompt (Hertz et al., ICLR 2023,
    ``google/prompt-to-prompt`` ``ptp_utils.py`` / ``AttentionControlEdit``)
    capture, word-swap replacement, refinement and reweighting live here
    (:class:`LocalBlend`, P2P's latent blending from the captured maps, runs
    between denoising steps, outside the processor).
``"out"``
    after the output projection (``to_out``), ``(B, N, C)``, before the 4-D
    reshape, the residual connection and the output rescale; a controller may
    return a new output. Masked blending of edit and source branches (as
    ZONE / PartEdit / CPAM need) and PnP-style feature substitution live here.

Batch layout. Editing methods run the source branch and one or more edit
branches in one batch, usually twice for classifier-free guidance (diffusers
order: all unconditional rows first, then all conditional rows). A
:class:`BatchLayout` says, for every batch row, which branch (0 = source,
1.. = edits) and which guidance half (``"uncond"``, ``"cond"`` or ``"none"``)
it is; controllers use it to find "the source row that goes with this edit
row". Without an explicit layout a controller assumes row 0 is the source and
every other row is an edit (no guidance).

Step counting (one approach, the Prompt-to-Prompt one). :func:`install` tells
the controller how many attention layers the UNet has (``num_layers``). Every
processor call ends with ``controller.layer_done()``; after
``num_layers * unet_calls_per_step`` calls the controller runs
:meth:`AttentionController.step_end` by itself, so a plain denoising loop
(one batched UNet call per step, CFG included) needs nothing more. Set
``unet_calls_per_step=2`` when the caller runs the unconditional and
conditional halves as two UNet calls (P2P's ``LOW_RESOURCE`` mode). Set
``auto_step=False`` to drive steps yourself, e.g. from a pipeline's
``callback_on_step_end``; the per-forward layer ordinals still reset every
``num_layers`` calls.

torch and diffusers are imported lazily: importing this module imports
neither.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "AttentionContext",
    "AttentionController",
    "AttentionStore",
    "BatchLayout",
    "BlendController",
    "CaptureController",
    "ControllerList",
    "EditingAttnProcessor",
    "InjectSelfAttentionController",
    "LocalBlend",
    "MutualSelfAttentionController",
    "RefineCrossAttentionController",
    "ReplaceCrossAttentionController",
    "attention_control",
    "install",
    "layer_place",
    "step_window",
]

PLACES = ("down", "mid", "up")
KINDS = ("cross", "self")


# ---------------------------------------------------------------------------
# Names, layouts, context
# ---------------------------------------------------------------------------


def layer_place(name: str) -> str:
    """Place of an attention layer in the UNet from its processor name.

    ``down_blocks.*`` -> ``"down"``, ``mid_block.*`` -> ``"mid"``,
    ``up_blocks.*`` -> ``"up"`` (P2P's ``place_in_unet``); anything else
    (e.g. a VAE attention or a bare module) -> ``"other"``.
    """
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    if name.startswith("up_blocks"):
        return "up"
    return "other"


def layer_kind_from_name(name: str) -> str | None:
    """``"self"`` for ``attn1``, ``"cross"`` for ``attn2`` (diffusers'
    ``BasicTransformerBlock`` naming), ``None`` when the name does not say."""
    parts = name.split(".")
    if "attn1" in parts:
        return "self"
    if "attn2" in parts:
        return "cross"
    return None


@dataclass(frozen=True)
class BatchLayout:
    """Role of every batch row: branch index (0 = source) and guidance half."""

    branches: tuple[int, ...]
    guidance: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.branches) != len(self.guidance):
            raise ValueError("branches and guidance must have one entry per batch row")
        bad = set(self.guidance) - {"uncond", "cond", "none"}
        if bad:
            raise ValueError(f"unknown guidance labels {sorted(bad)}")

    @classmethod
    def plain(cls, n_branches: int) -> "BatchLayout":
        """Rows ``[source, edit_1, ..]`` without classifier-free guidance."""
        return cls(tuple(range(n_branches)), ("none",) * n_branches)

    @classmethod
    def cfg(cls, n_branches: int) -> "BatchLayout":
        """diffusers' CFG order: ``[uncond(source, edits..), cond(source, edits..)]``
        (P2P and MasaCtrl batch their prompts the same way)."""
        return cls(
            tuple(range(n_branches)) * 2,
            ("uncond",) * n_branches + ("cond",) * n_branches,
        )

    @property
    def batch_size(self) -> int:
        return len(self.branches)

    def rows(self, guidance: str | Sequence[str] | None = None) -> list[int]:
        """Row indices, optionally only those of the given guidance half(s)."""
        if guidance is None:
            return list(range(self.batch_size))
        wanted = {guidance} if isinstance(guidance, str) else set(guidance)
        return [i for i, g in enumerate(self.guidance) if g in wanted]

    def edit_rows(self, guidance: str | Sequence[str] | None = None) -> list[int]:
        """Rows of edit branches (branch index > 0)."""
        return [i for i in self.rows(guidance) if self.branches[i] > 0]

    def source_row(self, row: int) -> int:
        """The source-branch row that goes with ``row``: same guidance half when
        there is one, otherwise any source row (PnP's layout
        ``[source, uncond edit, cond edit]`` has a single unguided source row)."""
        same = [i for i, (b, g) in enumerate(zip(self.branches, self.guidance)) if b == 0 and g == self.guidance[row]]
        if same:
            return same[0]
        anyrow = [i for i, b in enumerate(self.branches) if b == 0]
        if not anyrow:
            raise ValueError("batch layout has no source row (branch 0)")
        return anyrow[0]


@dataclass
class AttentionContext:
    """What a controller sees at one hook of one attention call.

    ``query``/``key``/``value``/``probs`` are in diffusers' per-head layout
    ``(batch * heads, tokens, ...)`` with the batch index outermost (row
    ``b * heads + h``); ``out`` is ``(batch, tokens, channels)``.
    """

    attn: Any
    name: str
    place: str
    kind: str
    step: int
    layer_index: int  # ordinal among layers of this kind in this UNet forward
    call_index: int  # ordinal among all attention layers in this UNet forward
    heads: int
    batch_size: int
    layout: BatchLayout
    stage: str = "qkv"
    spatial: tuple[int, int] | None = None  # (h, w) when the input was 4-D
    query: "torch.Tensor | None" = None
    key: "torch.Tensor | None" = None
    value: "torch.Tensor | None" = None
    probs: "torch.Tensor | None" = None
    out: "torch.Tensor | None" = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"

    @property
    def n_query(self) -> int:
        t = self.query if self.query is not None else self.probs
        if t is not None:
            return int(t.shape[1])
        assert self.out is not None
        return int(self.out.shape[1])

    def head_rows(self, row: int) -> slice:
        """Slice of the per-head tensors belonging to batch row ``row``."""
        return slice(row * self.heads, (row + 1) * self.heads)

    def token_grid(self, aspect: float = 1.0) -> tuple[int, int]:
        """(h, w) of the layer's query token grid: the 4-D input's shape when
        known, otherwise ``h * w == n_query`` with ``h / w`` closest to
        ``aspect`` (transformer blocks get flattened tokens)."""
        if self.spatial is not None:
            return self.spatial
        n = self.n_query
        best: tuple[int, int] | None = None
        for h in range(1, n + 1):
            if n % h:
                continue
            w = n // h
            score = abs((h / w) - aspect)
            if best is None or score < abs(best[0] / best[1] - aspect):
                best = (h, w)
        assert best is not None
        return best


def step_window(bounds: float | int | tuple[float, float] | None, num_steps: int | None) -> tuple[int, int]:
    """Step interval ``[start, end)`` from P2P-style bounds.

    A float ``f`` means ``(0, f)`` as a fraction of ``num_steps`` (P2P's
    ``cross_replace_steps=0.8``); an int ``n`` means steps ``[0, n)``; a pair of
    floats in [0, 1] is a fraction window, a pair of ints is a step window;
    ``None`` means all steps.
    """
    big = 1 << 30
    if bounds is None:
        return 0, big
    if isinstance(bounds, bool):
        raise TypeError("step bounds cannot be bool")
    if isinstance(bounds, int):
        return 0, bounds
    if isinstance(bounds, float):
        bounds = (0.0, bounds)
    lo, hi = bounds
    if isinstance(lo, float) or isinstance(hi, float):
        if num_steps is None:
            raise ValueError("fractional step bounds need num_steps")
        # P2P: int(bound * num_steps) for both ends.
        return int(lo * num_steps), int(hi * num_steps)
    return int(lo), int(hi)


# ---------------------------------------------------------------------------
# Controllers
# ---------------------------------------------------------------------------


class AttentionController:
    """Base controller: a no-op that counts layers and steps.

    Subclasses override :meth:`on_qkv`, :meth:`on_probs`, :meth:`on_out`
    (return ``None`` to leave things unchanged) and :meth:`on_step_end`.
    :meth:`needs_probs` says whether the probability matrix must be
    materialised for a layer; when no controller needs it the processor uses
    ``torch.nn.functional.scaled_dot_product_attention`` (the math of
    ``AttnProcessor2_0``) to save memory at 64x64 latents.
    """

    def __init__(
        self,
        layout: BatchLayout | None = None,
        unet_calls_per_step: int = 1,
        auto_step: bool = True,
    ) -> None:
        self.layout = layout
        self.unet_calls_per_step = unet_calls_per_step
        self.auto_step = auto_step
        self.num_layers: int | None = None  # set by install()
        self.step = 0
        self._calls = 0  # attention calls since the last step end
        self._forward_calls = 0  # attention calls in the current UNet forward
        self._kind_counts: dict[str, int] = {}

    # -- hooks -------------------------------------------------------------
    def __call__(self, ctx: AttentionContext) -> Any:
        """Dispatch ``ctx`` to the hook of its stage; return a replacement or None."""
        if ctx.stage == "qkv":
            return self.on_qkv(ctx)
        if ctx.stage == "probs":
            return self.on_probs(ctx)
        if ctx.stage == "out":
            return self.on_out(ctx)
        raise ValueError(f"unknown stage {ctx.stage!r}")

    def on_qkv(self, ctx: AttentionContext) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None":
        return None

    def on_probs(self, ctx: AttentionContext) -> "torch.Tensor | None":
        return None

    def on_out(self, ctx: AttentionContext) -> "torch.Tensor | None":
        return None

    def needs_probs(self, ctx: AttentionContext) -> bool:
        """Whether :meth:`on_probs` wants this layer's probabilities."""
        return type(self).on_probs is not AttentionController.on_probs

    def on_step_end(self) -> None:
        """Called once per denoising step, before the step counter advances."""

    # -- bookkeeping -------------------------------------------------------
    def layout_for(self, batch_size: int) -> BatchLayout:
        """The configured layout, or ``[source, edits..]`` when none was given."""
        if self.layout is not None:
            if self.layout.batch_size != batch_size:
                raise ValueError(
                    f"controller layout has {self.layout.batch_size} rows but the attention batch has {batch_size}"
                )
            return self.layout
        return BatchLayout.plain(batch_size)

    def layer_begin(self, kind: str) -> tuple[int, int]:
        """Start one attention call; returns (ordinal within kind, ordinal overall)
        in the current UNet forward."""
        if self.num_layers and self._forward_calls % self.num_layers == 0:
            self._forward_calls = 0
            self._kind_counts = {}
        idx = self._kind_counts.get(kind, 0)
        self._kind_counts[kind] = idx + 1
        return idx, self._forward_calls

    def layer_done(self) -> None:
        """End one attention call; ends the step after a full step of calls."""
        self._forward_calls += 1
        self._calls += 1
        if self.auto_step and self.num_layers and self._calls >= self.num_layers * self.unet_calls_per_step:
            self.step_end()

    def step_end(self) -> None:
        """End a denoising step (called automatically, or by the caller when
        ``auto_step=False``)."""
        self.on_step_end()
        self.step += 1
        self._calls = 0
        self._forward_calls = 0
        self._kind_counts = {}

    def reset(self) -> None:
        """Back to step 0 (between images / between inversion and editing)."""
        self.step = 0
        self._calls = 0
        self._forward_calls = 0
        self._kind_counts = {}


class ControllerList(AttentionController):
    """Runs several controllers in order; each sees the previous one's result
    (e.g. MasaCtrl K/V substitution followed by attention capture, as
    MasaCtrl's mask-guided variant does)."""

    def __init__(self, controllers: Sequence[AttentionController], **kw: Any) -> None:
        super().__init__(**kw)
        self.controllers = list(controllers)
        if self.layout is None:
            layouts = {c.layout for c in self.controllers if c.layout is not None}
            if len(layouts) == 1:
                self.layout = layouts.pop()
        for c in self.controllers:
            c.layout = self.layout

    def __call__(self, ctx: AttentionContext) -> Any:
        result = None
        for c in self.controllers:
            ctx.step = self.step  # children follow the list's step counter
            r = c(ctx)
            if r is None:
                continue
            result = r
            # Feed the replacement forward so the next controller sees it.
            if ctx.stage == "qkv":
                ctx.query, ctx.key, ctx.value = r
            elif ctx.stage == "probs":
                ctx.probs = r
            else:
                ctx.out = r
        return result

    def needs_probs(self, ctx: AttentionContext) -> bool:
        return any(c.needs_probs(ctx) for c in self.controllers)

    def step_end(self) -> None:
        for c in self.controllers:
            c.step_end()
        super().step_end()

    def reset(self) -> None:
        for c in self.controllers:
            c.reset()
        super().reset()


class AttentionStore:
    """Attention maps per layer, summed over steps (Prompt-to-Prompt's
    ``AttentionStore``: ``step_store`` folded into ``attention_store`` at each
    step end, ``get_average_attention`` divides by the step count).

    Maps are stored in the raw per-head layout ``(rows * heads, N_q, N_k)``
    for the rows the capturing controller selected. A layer is kept when its
    place and kind are wanted and ``N_q <= max_tokens`` (P2P keeps only
    layers up to 32x32 to bound memory). ``keep_steps=True`` also keeps every
    step's maps (ZONE / PartEdit read maps at chosen steps).
    """

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        places: Sequence[str] = PLACES,
        max_tokens: int | None = 32 * 32,
        keep_steps: bool = False,
        to_cpu: bool = False,
    ) -> None:
        self.kinds = tuple(kinds)
        self.places = tuple(places)
        self.max_tokens = max_tokens
        self.keep_steps = keep_steps
        self.to_cpu = to_cpu
        self.meta: dict[str, tuple[str, str, int]] = {}  # name -> (place, kind, heads)
        self.reset()

    def reset(self) -> None:
        self.num_steps = 0
        self.step_store: dict[str, "torch.Tensor"] = {}
        self.sums: dict[str, "torch.Tensor"] = {}
        self.steps: list[dict[str, "torch.Tensor"]] = []

    def wants(self, place: str, kind: str, n_query: int) -> bool:
        if kind not in self.kinds or place not in self.places:
            return False
        return self.max_tokens is None or n_query <= self.max_tokens

    def add(self, name: str, place: str, kind: str, heads: int, probs: "torch.Tensor") -> None:
        """Record one layer's maps for the current step. A layer called twice in
        a step (two UNet calls per step) has its rows concatenated."""
        probs = probs.detach()
        if self.to_cpu:
            probs = probs.cpu()
        self.meta[name] = (place, kind, heads)
        if name in self.step_store:
            import torch

            self.step_store[name] = torch.cat([self.step_store[name], probs], dim=0)
        else:
            self.step_store[name] = probs

    def end_step(self) -> None:
        """Fold the current step's maps into the running sums."""
        if not self.step_store:
            return
        for name, p in self.step_store.items():
            self.sums[name] = self.sums[name] + p if name in self.sums else p.clone()
        if self.keep_steps:
            self.steps.append(self.step_store)
        self.step_store = {}
        self.num_steps += 1

    def average(self, place: str | None = None, kind: str | None = None) -> dict[str, "torch.Tensor"]:
        """Per-layer maps averaged over the recorded steps (layer name -> tensor)."""
        out: dict[str, "torch.Tensor"] = {}
        for name, s in self.sums.items():
            p, k, _ = self.meta[name]
            if (place is None or p == place) and (kind is None or k == kind):
                out[name] = s / max(self.num_steps, 1)
        return out

    def maps(self, step: int | None = None) -> dict[str, "torch.Tensor"]:
        """Averaged maps (``step=None``) or one recorded step's maps."""
        if step is None:
            return self.average()
        if not self.keep_steps:
            raise ValueError("per-step maps need AttentionStore(keep_steps=True)")
        return self.steps[step]

    def aggregate(
        self,
        res: int | tuple[int, int],
        places: Sequence[str] = ("up", "down"),
        kind: str = "cross",
        batch_index: int = 0,
        step: int | None = None,
    ) -> "torch.Tensor":
        """P2P's ``aggregate_attention``: the maps of every stored layer at
        resolution ``res`` in ``places``, row ``batch_index`` of the stored rows,
        averaged over heads and layers -> ``(h, w, N_k)``."""
        import torch

        h, w = (res, res) if isinstance(res, int) else res
        picked = []
        for name, m in self.maps(step).items():
            p, k, heads = self.meta[name]
            if p not in places or k != kind or m.shape[1] != h * w:
                continue
            rows = m.shape[0] // heads
            if not 0 <= batch_index < rows:
                raise IndexError(f"batch_index {batch_index} out of range for {rows} stored rows")
            picked.append(m.reshape(rows, heads, h, w, m.shape[-1])[batch_index])
        if not picked:
            raise ValueError(f"no stored {kind} maps at {h}x{w} in {tuple(places)}")
        return torch.cat(picked, dim=0).mean(dim=0)


class CaptureController(AttentionController):
    """Stores attention probabilities in an :class:`AttentionStore` (P2P capture).

    ``rows="cond"`` keeps only the conditional rows when the layout has CFG
    halves (P2P records ``attn[h // 2:]``); ``"all"`` keeps every row.
    """

    def __init__(self, store: AttentionStore, rows: str = "cond", **kw: Any) -> None:
        super().__init__(**kw)
        if rows not in ("cond", "all"):
            raise ValueError("rows must be 'cond' or 'all'")
        self.store = store
        self.rows = rows

    def wants(self, ctx: AttentionContext) -> bool:
        """Whether this layer's probabilities are stored (subclasses choose other layers)."""
        return self.store.wants(ctx.place, ctx.kind, ctx.n_query)

    def needs_probs(self, ctx: AttentionContext) -> bool:
        return self.wants(ctx)

    def _selected_rows(self, ctx: AttentionContext) -> list[int]:
        """The batch rows stored (subclasses keep other rows)."""
        layout = ctx.layout
        if self.rows == "cond" and "cond" in layout.guidance:
            return layout.rows("cond")
        return layout.rows()

    def on_probs(self, ctx: AttentionContext) -> None:
        assert ctx.probs is not None
        if not self.wants(ctx):
            return None
        rows = self._selected_rows(ctx)
        p = ctx.probs
        if len(rows) != ctx.batch_size:
            b = ctx.batch_size
            p = p.reshape(b, ctx.heads, *p.shape[1:])[rows].reshape(len(rows) * ctx.heads, *p.shape[1:])
        self.store.add(ctx.name, ctx.place, ctx.kind, ctx.heads, p)
        return None

    def on_step_end(self) -> None:
        self.store.end_step()

    def reset(self) -> None:
        super().reset()
        self.store.reset()


class BlendController(AttentionController):
    """Blends every edit row's attention output with its source row's under a
    mask: ``out = m * edit + (1 - m) * source``, ``m`` the ``(H, W)`` mask
    resized (bilinear) to the layer's token grid. 1 = take the edit.

    Applied to the attention branch output (after ``to_out``, before the
    residual). Restrict with ``places``, ``kinds`` and ``steps`` (bounds as in
    :func:`step_window`).
    """

    def __init__(
        self,
        mask: Any,
        places: Sequence[str] | None = None,
        kinds: Sequence[str] = KINDS,
        steps: float | int | tuple[float, float] | None = None,
        num_steps: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.mask = mask
        self.places = None if places is None else tuple(places)
        self.kinds = tuple(kinds)
        self.window = step_window(steps, num_steps)
        self._cache: dict[tuple, "torch.Tensor"] = {}

    def full_mask(self, like: "torch.Tensor") -> "torch.Tensor":
        """The mask as a float ``(H, W)`` tensor on ``like``'s device."""
        import torch

        m = torch.as_tensor(self.mask).to(device=like.device, dtype=torch.float32)
        if m.ndim != 2:
            m = m.reshape(m.shape[-2], m.shape[-1])  # accept (1, H, W) / (1, 1, H, W)
        return m

    def mask_at(self, h: int, w: int, like: "torch.Tensor") -> "torch.Tensor":
        """The mask resized (bilinear) to ``(h, w)`` and flattened to ``(h * w, 1)``."""
        import torch.nn.functional as F

        key = (h, w, like.device, like.dtype)
        if key not in self._cache:
            m = self.full_mask(like)
            if tuple(m.shape) != (h, w):
                m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            self._cache[key] = m.reshape(h * w, 1).to(like.dtype)
        return self._cache[key]

    def on_out(self, ctx: AttentionContext) -> "torch.Tensor | None":
        if self.places is not None and ctx.place not in self.places:
            return None
        if ctx.kind not in self.kinds or not (self.window[0] <= ctx.step < self.window[1]):
            return None
        out = ctx.out
        assert out is not None
        full = self.full_mask(out)
        h, w = ctx.token_grid(aspect=full.shape[0] / full.shape[1])
        m = self.mask_at(h, w, out)
        new = out.clone()
        for r in ctx.layout.edit_rows():
            s = ctx.layout.source_row(r)
            # m * edit + (1 - m) * source: exact source at m == 0, exact edit at m == 1.
            new[r] = m * out[r] + (1 - m) * out[s]
        return new


class MutualSelfAttentionController(AttentionController):
    """MasaCtrl mutual self-attention (Cao et al., ICCV 2023): from step
    ``start_step`` and self-attention layer ``start_layer`` on, every edit
    row's self-attention queries the *source* row's keys and values (same
    guidance half). Layers are counted over self-attention layers in forward
    order, which is MasaCtrl's ``cur_att_layer // 2`` for SD (16 layers; the
    default ``start_layer=10`` is the decoder). ``end_step``/``end_layer``
    close the windows (``None`` = to the end).
    """

    def __init__(
        self,
        start_step: int = 4,
        start_layer: int = 10,
        end_step: int | None = None,
        end_layer: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.start_step = start_step
        self.start_layer = start_layer
        self.end_step = end_step
        self.end_layer = end_layer

    def active(self, ctx: AttentionContext) -> bool:
        if ctx.kind != "self":
            return False
        if ctx.step < self.start_step or (self.end_step is not None and ctx.step >= self.end_step):
            return False
        if ctx.layer_index < self.start_layer or (self.end_layer is not None and ctx.layer_index >= self.end_layer):
            return False
        return True

    def on_qkv(self, ctx: AttentionContext):
        if not self.active(ctx):
            return None
        q, k, v = ctx.query, ctx.key, ctx.value
        assert k is not None and v is not None
        k, v = k.clone(), v.clone()
        for r in ctx.layout.edit_rows():
            s = ctx.layout.source_row(r)
            k[ctx.head_rows(r)] = ctx.key[ctx.head_rows(s)]
            v[ctx.head_rows(r)] = ctx.value[ctx.head_rows(s)]
        return q, k, v


class InjectSelfAttentionController(AttentionController):
    """Plug-and-Play self-attention injection (Tumanyan et al., CVPR 2023,
    ``pnp-diffusers``): for steps in ``steps`` and layers in ``places``, every
    edit row's self-attention query and key are taken from the source row, so
    the edit reuses the source's attention map (its values stay its own).
    ``inject`` picks which of ``"q"``, ``"k"``, ``"v"`` are copied.
    """

    def __init__(
        self,
        steps: float | int | tuple[float, float] | None = 0.5,
        num_steps: int | None = None,
        places: Sequence[str] = ("up",),
        inject: Sequence[str] = ("q", "k"),
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.window = step_window(steps, num_steps)
        self.places = tuple(places)
        self.inject = tuple(inject)

    def on_qkv(self, ctx: AttentionContext):
        if ctx.kind != "self" or ctx.place not in self.places:
            return None
        if not (self.window[0] <= ctx.step < self.window[1]):
            return None
        src = {"q": ctx.query, "k": ctx.key, "v": ctx.value}
        new = {n: (t.clone() if n in self.inject else t) for n, t in src.items()}
        for r in ctx.layout.edit_rows():
            s = ctx.layout.source_row(r)
            for n in self.inject:
                new[n][ctx.head_rows(r)] = src[n][ctx.head_rows(s)]
        return new["q"], new["k"], new["v"]


class ReplaceCrossAttentionController(AttentionController):
    """Prompt-to-Prompt word swap (``AttentionReplace``): during the
    cross-replace window each edit row's cross-attention probabilities become
    the source row's mapped through ``mapper``
    (``einsum('hpw,wn->hpn', source, mapper[e])``), and during the
    self-replace window each edit row's self-attention probabilities become
    the source's for layers with ``N_q <= self_max_tokens`` (P2P: 16x16).

    ``mapper``: ``(K, K)`` or ``(n_edits, K, K)`` token mapping (identity =
    same tokens); ``cross_replace_steps``/``self_replace_steps`` as in P2P
    (fraction of ``num_steps`` or windows, see :func:`step_window`).
    ``token_alpha``: optional ``(num_steps, n_edits, K)`` per-token blend
    weights overriding the window (P2P's per-word ``cross_replace_steps`` dict);
    result = ``alpha * replaced + (1 - alpha) * edit``. ``guidance``: which CFG
    halves are edited (P2P edits only the conditional half).

    ``equalizer``: optional ``(K,)`` or ``(n_edits, K)`` per-token scales
    multiplied into the replaced cross-attention (P2P's ``AttentionReweight``
    wrapping a replace/refine controller: ``replaced * equalizer``, applied
    only inside the cross-replace window, probabilities not renormalised).
    Subclasses change the mapping by overriding :meth:`map_cross`.
    """

    def __init__(
        self,
        mapper: Any,
        num_steps: int,
        cross_replace_steps: float | int | tuple[float, float] = 0.8,
        self_replace_steps: float | int | tuple[float, float] = 0.0,
        self_max_tokens: int = 16 * 16,
        token_alpha: Any = None,
        guidance: Sequence[str] = ("cond", "none"),
        equalizer: Any = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.mapper = mapper
        self.num_steps = num_steps
        self.cross_window = step_window(cross_replace_steps, num_steps)
        self.self_window = step_window(self_replace_steps, num_steps)
        self.self_max_tokens = self_max_tokens
        self.token_alpha = token_alpha
        self.guidance = tuple(guidance)
        self.equalizer = equalizer

    def needs_probs(self, ctx: AttentionContext) -> bool:
        """Cross-attention always; self-attention only where it is replaced (the other
        self-attention layers keep the memory-saving path)."""
        if ctx.kind == "self":
            return self.self_window[0] <= ctx.step < self.self_window[1] and ctx.n_query <= self.self_max_tokens
        return True

    def _edit_pairs(self, ctx: AttentionContext) -> list[tuple[int, int, int]]:
        """(edit row, source row, edit number starting at 0)."""
        return [(r, ctx.layout.source_row(r), ctx.layout.branches[r] - 1) for r in ctx.layout.edit_rows(self.guidance)]

    def map_cross(self, source: "torch.Tensor", edit: "torch.Tensor", e: int) -> "torch.Tensor":
        """The edit row's new cross-attention ``(heads, N_q, K)`` from the source
        row's ``source`` (and its own ``edit``) for edit number ``e``:
        ``einsum('hpw,wn->hpn', source, mapper[e])`` (P2P ``AttentionReplace``)."""
        import torch

        mapper = torch.as_tensor(self.mapper).to(source)
        m = mapper if mapper.ndim == 2 else mapper[e]
        return torch.einsum("hpw,wn->hpn", source, m)

    def on_probs(self, ctx: AttentionContext) -> "torch.Tensor | None":
        import torch

        p = ctx.probs
        assert p is not None
        if ctx.kind == "self":
            if not (self.self_window[0] <= ctx.step < self.self_window[1]) or ctx.n_query > self.self_max_tokens:
                return None
            new = p.clone()
            for r, s, _ in self._edit_pairs(ctx):
                new[ctx.head_rows(r)] = p[ctx.head_rows(s)]
            return new
        # cross-attention
        if self.token_alpha is not None:
            if ctx.step >= len(self.token_alpha):
                return None
            alpha_all = torch.as_tensor(self.token_alpha[ctx.step]).to(p)
        elif self.cross_window[0] <= ctx.step < self.cross_window[1]:
            alpha_all = None
        else:
            return None
        new = p.clone()
        for r, s, e in self._edit_pairs(ctx):
            replaced = self.map_cross(p[ctx.head_rows(s)], p[ctx.head_rows(r)], e)
            if self.equalizer is not None:
                eq = torch.as_tensor(self.equalizer).to(p)
                eq = eq if eq.ndim == 1 else eq[e]
                replaced = replaced * eq.reshape(1, 1, -1)
            if alpha_all is not None:
                a = alpha_all[e].reshape(1, 1, -1)
                replaced = a * replaced + (1 - a) * p[ctx.head_rows(r)]
            new[ctx.head_rows(r)] = replaced
        return new


class RefineCrossAttentionController(ReplaceCrossAttentionController):
    """Prompt-to-Prompt prompt refinement (``AttentionRefine``): the prompts
    differ by added/removed tokens, so each edit token either has an aligned
    source token or none.

    ``mapper``: ``(K,)`` or ``(n_edits, K)`` integer index of the source token
    aligned with every edit token (any value where there is none);
    ``alphas``: same shape, 1 where a source token is aligned, 0 where not.
    The edit row's cross-attention becomes
    ``source[..., mapper] * alphas + edit * (1 - alphas)``: aligned tokens take
    the source's maps, new tokens keep their own. Everything else (windows,
    self-attention replacement, ``token_alpha``, ``equalizer``, ``guidance``)
    is :class:`ReplaceCrossAttentionController`'s.
    """

    def __init__(self, mapper: Any, alphas: Any, num_steps: int, **kw: Any) -> None:
        super().__init__(mapper, num_steps, **kw)
        self.alphas = alphas

    def map_cross(self, source: "torch.Tensor", edit: "torch.Tensor", e: int) -> "torch.Tensor":
        import torch

        idx = torch.as_tensor(self.mapper, device=source.device).long()
        idx = idx if idx.ndim == 1 else idx[e]
        alpha = torch.as_tensor(self.alphas).to(source)
        alpha = (alpha if alpha.ndim == 1 else alpha[e]).reshape(1, 1, -1)
        idx = idx.clamp(0, source.shape[-1] - 1)  # unaligned tokens: alpha 0, index unused
        return source[..., idx] * alpha + edit * (1 - alpha)


class LocalBlend:
    """Prompt-to-Prompt's ``LocalBlend``: after each denoising step, keep the
    source branch's latents outside the region the edited words attend to.

    ``word_alpha``: ``(n_branches, K)`` 0/1 weights of the blend words' tokens
    in every branch's prompt (branch 0 = source). The mask of a branch is its
    cross-attention maps from ``store`` (summed over the steps so far, rows as
    stored by a :class:`CaptureController` with ``rows="cond"``: one per
    branch) at the token grid ``grid`` in ``places``, weighted by
    ``word_alpha`` and summed over tokens, averaged over heads and layers,
    max-pooled with a ``(2 * pool + 1)`` square window (stride 1), resized
    (nearest) to the latent grid, divided by its maximum and thresholded
    (``> threshold``); every edit branch's mask is united with the source's.
    Then ``x = mask * x + (1 - mask) * x[0]``: exactly the source where the
    mask is 0, the edit where it is 1. Blending starts at step ``start_step``.

    P2P's values (``null_text_w_ptp.ipynb`` / ``prompt-to-prompt_stable.ipynb``):
    threshold 0.3, pool 1 (3x3), ``start_blend=0.2`` of the steps, maps at
    16 x 16 (a quarter of SD's 64 x 64 latent) from the down and up blocks.
    ``grid=None`` picks the stored down/up grid closest to a quarter of the
    latent size (the coarsest one when none is that coarse).
    """

    def __init__(
        self,
        store: AttentionStore,
        word_alpha: Any,
        threshold: float = 0.3,
        start_step: int = 0,
        pool: int = 1,
        grid: tuple[int, int] | None = None,
        places: Sequence[str] = ("down", "up"),
    ) -> None:
        self.store = store
        self.word_alpha = word_alpha
        self.threshold = threshold
        self.start_step = start_step
        self.pool = pool
        self.grid = grid
        self.places = tuple(places)
        self.last_mask: "torch.Tensor | None" = None
        self.used_grid: tuple[int, int] | None = None

    def pick_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The token grid the maps are read at (see the class docstring)."""
        if self.grid is not None:
            return self.grid
        h, w = latent_hw
        target = max(1, (h // 4) * (w // 4))
        sizes = sorted({int(m.shape[1]) for n, m in self.store.sums.items()
                        if self.store.meta[n][0] in self.places and self.store.meta[n][1] == "cross"})
        if not sizes:
            raise ValueError("LocalBlend: no cross-attention maps stored in " + str(self.places))
        at_most = [n for n in sizes if n <= target]
        n = max(at_most) if at_most else min(sizes)
        # the layer grids keep the latent's aspect: side = sqrt(n * aspect)
        gh = max(1, round((n * h / w) ** 0.5))
        return gh, n // gh

    def maps(self, latent_hw: tuple[int, int]) -> "torch.Tensor":
        """``(n_branches, L * heads, gh, gw, K)``: the stored cross maps at the grid."""
        import torch

        gh, gw = self.pick_grid(latent_hw)
        self.used_grid = (gh, gw)
        picked = []
        for name, m in self.store.sums.items():
            place, kind, heads = self.store.meta[name]
            if place not in self.places or kind != "cross" or m.shape[1] != gh * gw:
                continue
            rows = m.shape[0] // heads
            picked.append(m.reshape(rows, heads, gh, gw, m.shape[-1]))
        if not picked:
            raise ValueError(f"LocalBlend: no stored cross maps at {gh}x{gw}")
        return torch.cat(picked, dim=1)

    def compute_mask(self, latent_hw: tuple[int, int]) -> "torch.Tensor":
        """``(n_branches, 1, H, W)`` 0/1 mask (float) from the stored maps."""
        import torch
        import torch.nn.functional as F

        maps = self.maps(latent_hw)
        alpha = torch.as_tensor(self.word_alpha).to(maps)
        if alpha.shape[0] != maps.shape[0] or alpha.shape[-1] != maps.shape[-1]:
            raise ValueError(f"LocalBlend: word_alpha {tuple(alpha.shape)} does not fit maps {tuple(maps.shape)}")
        m = (maps * alpha[:, None, None, None, :]).sum(-1).mean(1)[:, None]  # (B, 1, gh, gw)
        if self.pool > 0:
            k = self.pool
            m = F.max_pool2d(m, (2 * k + 1, 2 * k + 1), (1, 1), padding=(k, k))
        m = F.interpolate(m, size=tuple(latent_hw))  # nearest, as P2P
        peak = m.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
        mask = (m / peak) > self.threshold
        mask = mask[:1] | mask
        return mask.to(maps.dtype)

    @staticmethod
    def apply(latents: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
        """``mask * latents + (1 - mask) * latents[0]`` (P2P's ``x[:1] + mask * (x - x[:1])``
        written so that a 0/1 mask gives the source or the edit bit for bit); row 0 (source)
        unchanged."""
        mask = mask.to(latents)
        out = mask * latents + (1 - mask) * latents[:1]
        out[0] = latents[0]
        return out

    def __call__(self, latents: "torch.Tensor", step: int) -> "torch.Tensor":
        """Blend the latents after denoising step ``step`` (0-based)."""
        if step < self.start_step:
            return latents
        mask = self.compute_mask(tuple(latents.shape[-2:]))
        self.last_mask = mask
        return self.apply(latents, mask)


# ---------------------------------------------------------------------------
# Processor and installation
# ---------------------------------------------------------------------------


class EditingAttnProcessor:
    """diffusers attention processor with controller hooks.

    Without a controller (or with a no-op one) the result equals diffusers'
    ``AttnProcessor`` (same calls in the same order: spatial norm, 4-D
    flattening, mask preparation, group norm, ``norm_cross``, per-head
    ``get_attention_scores``, ``to_out``, residual, rescale). When no
    controller needs the probabilities it uses ``scaled_dot_product_attention``
    instead, which equals ``AttnProcessor2_0``.
    """

    def __init__(self, controller: AttentionController | None = None, name: str = "", place: str | None = None) -> None:
        self.controller = controller
        self.name = name
        self.place = place if place is not None else layer_place(name)
        self.static_kind = layer_kind_from_name(name)

    def __call__(
        self,
        attn: Any,
        hidden_states: "torch.Tensor",
        encoder_hidden_states: "torch.Tensor | None" = None,
        attention_mask: "torch.Tensor | None" = None,
        temb: "torch.Tensor | None" = None,
        *args: Any,
        **kwargs: Any,
    ) -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        ctrl = self.controller
        # P2P's test: a call with encoder states is cross-attention.
        kind = "cross" if encoder_hidden_states is not None else (self.static_kind or "self")
        residual = hidden_states

        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        spatial = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            spatial = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        ctx = None
        if ctrl is not None:
            layer_index, call_index = ctrl.layer_begin(kind)
            ctx = AttentionContext(
                attn=attn,
                name=self.name,
                place=self.place,
                kind=kind,
                step=ctrl.step,
                layer_index=layer_index,
                call_index=call_index,
                heads=attn.heads,
                batch_size=batch_size,
                layout=ctrl.layout_for(batch_size),
                stage="qkv",
                spatial=spatial,
                query=query,
                key=key,
                value=value,
            )
            r = ctrl(ctx)
            if r is not None:
                query, key, value = r
                ctx.query, ctx.key, ctx.value = query, key, value

        if ctrl is None or ctrl.needs_probs(ctx):
            attention_probs = attn.get_attention_scores(query, key, attention_mask)
            if ctx is not None:
                ctx.stage, ctx.probs = "probs", attention_probs
                r = ctrl(ctx)
                if r is not None:
                    attention_probs = r
            hidden_states = torch.bmm(attention_probs, value)
        else:
            # Memory-saving path (AttnProcessor2_0 math): no probs materialised.
            h = attn.heads
            b = query.shape[0] // h
            q4, k4, v4 = (t.reshape(b, h, t.shape[1], t.shape[2]) for t in (query, key, value))
            mask4 = None
            if attention_mask is not None:
                mask4 = attention_mask.reshape(b, h, -1, attention_mask.shape[-1])
            hidden_states = F.scaled_dot_product_attention(
                q4, k4, v4, attn_mask=mask4, dropout_p=0.0, is_causal=False, scale=attn.scale
            )
            hidden_states = hidden_states.reshape(b * h, hidden_states.shape[2], hidden_states.shape[3])
            hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.batch_to_head_dim(hidden_states)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if ctx is not None:
            ctx.stage, ctx.out = "out", hidden_states
            r = ctrl(ctx)
            if r is not None:
                hidden_states = r

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor

        if ctrl is not None:
            ctrl.layer_done()
        return hidden_states


def install(model: Any, controller: AttentionController | None) -> Callable[[], None]:
    """Put an :class:`EditingAttnProcessor` with ``controller`` on every
    attention layer of ``model`` (anything with diffusers' ``attn_processors``
    / ``set_attn_processor``), set ``controller.num_layers`` and reset it.
    Returns a function that puts the original processors back."""
    original = dict(model.attn_processors)
    procs = {}
    for key in original:
        name = key[: -len(".processor")] if key.endswith(".processor") else key
        procs[key] = EditingAttnProcessor(controller, name=name)
    model.set_attn_processor(dict(procs))  # diffusers pops entries from the dict it is given
    if controller is not None:
        controller.num_layers = len(procs)
        controller.reset()

    def restore() -> None:
        model.set_attn_processor(dict(original))  # diffusers pops from the dict: pass a copy

    return restore


@contextlib.contextmanager
def attention_control(model: Any, controller: AttentionController | None) -> Iterator[AttentionController | None]:
    """Context manager form of :func:`install`: processors restored on exit,
    exceptions included."""
    restore = install(model, controller)
    try:
        yield controller
    finally:
        restore()
