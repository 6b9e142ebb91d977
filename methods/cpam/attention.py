"""CPAM's two attention mechanisms (Vo et al., "CPAM: Context-Preserving Adaptive Manipulation for
Zero-Shot Real Image Editing", sec. 4.2 Preservation Adaptation and 4.3 Localized Extraction), as
controllers on the shared processor's hooks (:mod:`methods.diffusion.attention`).

Preservation Adaptation (PA, Eq. 1-3), on every SELF-attention layer, for each target row ``r`` of
the batch and its source row ``s`` (``BatchLayout.source_row``: the "intermediate latent" row of the
same guidance half)::

    SC_bg = Att(Q_r, K_s, V_s; keys inside M_s masked out)                       (Eq. 1)
    SC_fg = Att(Q_r, K_s, V_s; keys outside M_t masked out)  if step >= start_step
                                                             and l >= start_layer and retain_object
          = Att(Q_r, K_r, V_r)                               otherwise            (Eq. 2)
    SC    = M_t * SC_fg + (1 - M_t) * SC_bg      (M_t at the query positions)     (Eq. 3)

Localized Extraction (LE, Eq. 4), on every CROSS-attention layer, for each conditional target row:
queries inside M_t attend to the target prompt's keys/values only, the others to the null prompt's
keys/values only. Computed as ONE attention over the concatenated keys ``[K_target; K_null]`` with
an additive mask per query (``-inf`` on the null keys inside M_t and on the target keys outside).
For a binary M_t (the paper's ``Extract(Q, M)`` takes the pixels where ``M = 1``) this is exactly
Eq. 4: the softmax over the allowed keys only is the attention of that query subset to that prompt,
and putting each output back at its pixel is the concatenation ``(+)`` in pixel order
(``tests/test_cpam_attention.py`` checks it against the two attentions combined by M_t).

How the computation is taken over. The shared :class:`EditingAttnProcessor` lets a controller
replace ``(q, k, v)`` (``"qkv"``), the probabilities (``"probs"``) or the projected output
(``"out"``), but not return the attention result itself, and CPAM's masked attentions need a
per-query additive key mask that ``(q, k, v)`` cannot carry. Both controllers therefore work at
the ``"out"`` hook: the context still holds the layer's ``q, k, v``; the controller recomputes the
target rows' attention with :func:`masked_attention`, applies the layer's own output projection
(``attn.to_out``) and replaces those rows. The processor's own attention for those rows is thus
computed and discarded (one extra attention per target row; correct, not the cheapest). Because
``to_out`` is affine (linear + bias, dropout off in eval) and ``M_t + (1 - M_t) = 1``, Eq. 3 is
applied after the projection: ``to_out(M SC_fg + (1-M) SC_bg) = M to_out(SC_fg) + (1-M) to_out(SC_bg)``
(equal up to float rounding), which lets the "own self-attention" branch reuse the processor's
output unchanged. A cheaper wiring needs one more hook in the shared processor (an ``"attend"``
stage after ``"qkv"`` whose controller result, ``(B * heads, N, d)``, replaces the attention
computation), after which :func:`masked_attention` would be called there instead.

Parameters the paper does not specify (each one is a constructor parameter):

* layer ordinal ``l``: the ordinal of the self-attention layer among self-attention layers in the
  UNet forward's call order (``AttentionContext.layer_index``; SD1.5: 0-15, down 0-5, mid 6, up
  7-15), as the first author's thesis code (``OIIctrl``, MasaCtrl-derived) counts them.
* ``t > T`` and ``l > L`` with T = 3, L = 8: the thesis code, where these values come from, uses
  ``step >= start_step`` and ``layer >= start_layer`` with 0-based steps; ``inclusive=True``
  (default) follows it, ``inclusive=False`` gives the strict ``>``.
* the "random 10% of layers with normal self-attention": ``plain_fraction`` of the
  ``num_self_layers`` self-attention ordinals, ``round(plain_fraction * num_self_layers)`` of
  them (half up: 2 of SD1.5's 16 at 0.1), drawn with ``numpy.random.default_rng(plain_seed)``
  once (``plain_redraw="once"``, default) or redrawn each step (``"per_step"``); the draw is
  recorded in :attr:`PreservationAdaptation.plain_layers_by_step`. Absent from the thesis code.
  On a plain layer the target rows keep their own self-attention (PA and its background
  preservation are off there).
* ``value_blend``: the thesis code's object branch uses ``V = 0.4 V_clean + 0.6 V_inter`` with
  ``V_clean`` from a latent 5 inversion steps cleaner (``value_blend=0.4``, ``clean_branch`` = the
  branch index of those rows); ``None`` (default) is the paper's ``V_i``.
* ``mask_clamp``: the thesis clamps M_t to ``[0.01, 0.99]`` in Eq. 3; ``None`` (default) uses M_t.
* key masks are binary: a key is inside a mask where the mask, resized to the layer grid, is
  ``>= 0.5``; :class:`StaticMasks` resizes with ``mode="nearest"`` (the thesis'
  ``F.interpolate`` default) so binary masks stay binary.
* a query whose keys are all masked (e.g. M_s covering the whole image) gets a zero attention
  output instead of softmax's NaN; Eq. 3 weighs it by 0 wherever the masks are consistent.
* which rows: PA changes every edit row (branch > 0, both CFG halves, as the thesis' target rows);
  LE changes the conditional edit rows (the unconditional ones already attend to the null prompt).
  The null prompt's keys/values come from ``null_embedding`` when given, otherwise from the
  unconditional row of the same branch.

torch is imported lazily: importing this module does not import it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..diffusion.attention import AttentionContext, AttentionController, BatchLayout

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "LocalizedExtraction",
    "MaskProvider",
    "PreservationAdaptation",
    "StaticMasks",
    "masked_attention",
    "masked_attention_probs",
    "plain_layer_count",
]

#: ``mask_provider(step, (h, w)) -> (M_s, M_t)``: both masks at the layer's query grid, values in
#: [0, 1], as arrays or tensors of shape ``(h, w)``.
MaskProvider = Callable[[int, "tuple[int, int]"], "tuple[Any, Any]"]


# ---------------------------------------------------------------------------
# The masked attention itself
# ---------------------------------------------------------------------------


def _additive(key_mask: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    import torch

    if key_mask.dtype == torch.bool:
        # True = the key takes part (torch SDPA's boolean convention).
        zero = torch.zeros((), dtype=dtype, device=key_mask.device)
        return torch.where(key_mask, zero, torch.full((), float("-inf"), dtype=dtype, device=key_mask.device))
    return key_mask.to(dtype)


def masked_attention_probs(
    q: "torch.Tensor", k: "torch.Tensor", key_mask: "torch.Tensor | None" = None, scale: float | None = None
) -> "torch.Tensor":
    """``softmax(q k^T * scale + mask)`` over the keys, ``(..., N_q, N_k)``.

    ``q``: ``(..., N_q, d)``; ``k``: ``(..., N_k, d)``. ``key_mask`` broadcasts to
    ``(..., N_q, N_k)``: boolean (True = the key takes part, False = ``-inf``) or an additive float
    mask. ``scale`` defaults to ``1 / sqrt(d)``. Scores and softmax are computed in float32 (as
    diffusers' ``upcast_softmax``). A query row whose keys are all masked gets probabilities 0
    (softmax would give NaN). One batched softmax: no loop over heads, queries or keys.
    """
    import torch

    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_mask is not None:
        scores = scores + _additive(key_mask.to(scores.device), torch.float32)
    probs = torch.softmax(scores, dim=-1)
    if key_mask is not None:
        # all keys at -inf: softmax is 0/0 = NaN there; such a query attends to nothing
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
        probs = probs.masked_fill(dead, 0.0)
    return probs


def masked_attention(
    q: "torch.Tensor",
    k: "torch.Tensor",
    v: "torch.Tensor",
    key_mask: "torch.Tensor | None" = None,
    scale: float | None = None,
) -> "torch.Tensor":
    """Attention with an additive key mask: ``masked_attention_probs(q, k, key_mask, scale) @ v``,
    ``(..., N_q, d_v)`` in ``v``'s dtype. Equals ``torch.nn.functional.scaled_dot_product_attention``
    with ``attn_mask=key_mask`` wherever a query has at least one allowed key; zero elsewhere."""
    probs = masked_attention_probs(q, k, key_mask, scale)
    return (probs @ v.float()).to(v.dtype)


# ---------------------------------------------------------------------------
# Masks at the layer grid
# ---------------------------------------------------------------------------


def _as_2d(name: str, m: Any) -> "torch.Tensor":
    import torch

    t = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).float()
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {tuple(t.shape)}")
    return t


def _resize(m: "torch.Tensor", grid: tuple[int, int], mode: str) -> "torch.Tensor":
    import torch.nn.functional as F

    if tuple(m.shape) == tuple(grid):
        return m
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(m[None, None], size=grid, mode=mode, **kw)[0, 0]


class StaticMasks:
    """A :data:`MaskProvider` with fixed ``M_s`` and ``M_t`` resized to each layer's grid
    (``mode``: ``F.interpolate`` mode, ``"nearest"`` keeps binary masks binary). ``target_mask``
    may also be a callable ``step -> (H, W) mask`` (mask refinement: M_s for the first T_m steps,
    then the refined M_t, see :mod:`methods.cpam.masks`); it is called once per step (the first
    layer that asks), and its mask serves every layer of that step."""

    def __init__(self, source_mask: Any, target_mask: Any, *, mode: str = "nearest") -> None:
        self.source = _as_2d("source_mask", source_mask)
        self.target = target_mask if callable(target_mask) else _as_2d("target_mask", target_mask)
        self.mode = mode
        self._cache: dict[tuple, Any] = {}
        self._step: int | None = None
        self._step_masks: dict[Any, Any] = {}

    @property
    def aspect(self) -> float:
        """Height / width of the masks: the controllers find a flattened layer's token grid with it."""
        return float(self.source.shape[0]) / float(self.source.shape[1])

    def __call__(self, step: int, grid: tuple[int, int]) -> tuple["torch.Tensor", "torch.Tensor"]:
        if callable(self.target):
            if self._step != step:  # a new step: ask once, then serve every layer of the step
                self._step = step
                self._step_masks = {"full": _as_2d("target_mask", self.target(step))}
            if grid not in self._step_masks:
                self._step_masks[grid] = _resize(self._step_masks["full"], grid, self.mode)
            tgt = self._step_masks[grid]
        else:
            key = ("t", tuple(grid))
            if key not in self._cache:
                self._cache[key] = _resize(self.target, grid, self.mode)
            tgt = self._cache[key]
        key = ("s", tuple(grid))
        if key not in self._cache:
            self._cache[key] = _resize(self.source, grid, self.mode)
        return self._cache[key], tgt


def _grid(ctx: AttentionContext, provider: MaskProvider) -> tuple[int, int]:
    """The layer's query grid. SD's transformer blocks hand the processor flattened tokens, so for
    a non-square latent the grid is found with the masks' aspect ratio (``provider.aspect`` when
    the provider has one, else square)."""
    return ctx.token_grid(aspect=float(getattr(provider, "aspect", 1.0)))


def _masks_at(provider: MaskProvider, step: int, grid: tuple[int, int], like: "torch.Tensor"):
    import torch

    m_s, m_t = provider(step, grid)
    out = []
    for name, m in (("M_s", m_s), ("M_t", m_t)):
        t = _as_2d(name, m)
        if tuple(t.shape) != tuple(grid):
            raise ValueError(f"mask_provider returned {name} of shape {tuple(t.shape)} for a {grid} layer grid")
        if torch.isnan(t).any() or float(t.min()) < 0.0 or float(t.max()) > 1.0:
            raise ValueError(f"mask_provider returned {name} with values outside [0, 1]")
        out.append(t.to(device=like.device, dtype=torch.float32).reshape(-1))
    return out[0], out[1]


def plain_layer_count(fraction: float, num_self_layers: int) -> int:
    """How many self-attention layers run plain self-attention: ``fraction * n`` rounded half up."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"plain_fraction must be in [0, 1], got {fraction}")
    return int(math.floor(fraction * num_self_layers + 0.5))


def _project(attn: Any, sc: "torch.Tensor") -> "torch.Tensor":
    """``(rows * heads, N, d)`` attention result -> the layer's ``(rows, N, C)`` projected output."""
    h = attn.batch_to_head_dim(sc)
    return attn.to_out[1](attn.to_out[0](h))


# ---------------------------------------------------------------------------
# Preservation Adaptation
# ---------------------------------------------------------------------------


class PreservationAdaptation(AttentionController):
    """Paper sec. 4.2 (PA): the target branch's SELF-attention queries the source branch's keys and
    values, split into a background branch (keys inside the source mask M_s masked out) and an
    object branch (keys inside the target mask M_t, used when step >= ``start_step``, self-attention
    ordinal >= ``start_layer`` and ``retain_object``, else the target's own self-attention),
    combined ``SC = M_t * SC_fg + (1 - M_t) * SC_bg``. See the module docstring for the choices
    the paper leaves open.

    ``target_branches``: the branch indices PA changes (default: every branch > 0 except
    ``clean_branch``). ``clean_branch``: branch of the cleaner-latent rows ``value_blend`` reads.
    ``num_self_layers``: self-attention layers per UNet forward (SD1.5: 16).
    """

    def __init__(
        self,
        *,
        mask_provider: MaskProvider,
        start_step: int = 3,
        start_layer: int = 8,
        retain_object: bool = True,
        plain_fraction: float = 0.1,
        plain_seed: int = 0,
        plain_redraw: str = "once",
        num_self_layers: int = 16,
        inclusive: bool = True,
        value_blend: float | None = None,
        clean_branch: int | None = None,
        target_branches: Sequence[int] | None = None,
        mask_clamp: tuple[float, float] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if plain_redraw not in ("once", "per_step"):
            raise ValueError(f"plain_redraw must be 'once' or 'per_step', got {plain_redraw!r}")
        if num_self_layers < 1:
            raise ValueError("num_self_layers must be >= 1")
        if value_blend is not None:
            if not 0.0 <= value_blend <= 1.0:
                raise ValueError(f"value_blend must be in [0, 1] or None, got {value_blend}")
            if clean_branch is None:
                raise ValueError("value_blend needs clean_branch (the branch of the cleaner-latent rows)")
        if mask_clamp is not None and not 0.0 <= mask_clamp[0] <= mask_clamp[1] <= 1.0:
            raise ValueError(f"mask_clamp must be (lo, hi) with 0 <= lo <= hi <= 1, got {mask_clamp}")
        self.mask_provider = mask_provider
        self.start_step = int(start_step)
        self.start_layer = int(start_layer)
        self.retain_object = bool(retain_object)
        self.plain_fraction = float(plain_fraction)
        self.plain_seed = int(plain_seed)
        self.plain_redraw = plain_redraw
        self.num_self_layers = int(num_self_layers)
        self.n_plain = plain_layer_count(self.plain_fraction, self.num_self_layers)
        self.inclusive = bool(inclusive)
        self.value_blend = value_blend
        self.clean_branch = clean_branch
        self.target_branches = None if target_branches is None else tuple(int(b) for b in target_branches)
        self.mask_clamp = mask_clamp
        self._rng = np.random.default_rng(self.plain_seed)
        self._once: tuple[int, ...] | None = None
        #: step -> the self-attention ordinals that ran plain self-attention (the recorded draw)
        self.plain_layers_by_step: dict[int, tuple[int, ...]] = {}

    # -- the seeded plain-layer choice ---------------------------------------
    def _draw(self) -> tuple[int, ...]:
        picked = self._rng.choice(self.num_self_layers, size=self.n_plain, replace=False)
        return tuple(sorted(int(i) for i in picked))

    def plain_layers(self, step: int) -> tuple[int, ...]:
        """The self-attention ordinals with plain self-attention at ``step`` (drawn on first use)."""
        if step not in self.plain_layers_by_step:
            if self.plain_redraw == "once":
                if self._once is None:
                    self._once = self._draw()
                self.plain_layers_by_step[step] = self._once
            else:
                self.plain_layers_by_step[step] = self._draw()
        return self.plain_layers_by_step[step]

    def reset(self) -> None:
        super().reset()
        # the same seed gives the same draw after a reset (one image after another)
        self._rng = np.random.default_rng(self.plain_seed)
        self._once = None
        self.plain_layers_by_step = {}

    # -- rules ---------------------------------------------------------------
    def object_active(self, step: int, layer: int) -> bool:
        """Eq. 2's condition: object branch adapts the source's object (else own self-attention)."""
        if not self.retain_object:
            return False
        if self.inclusive:
            return step >= self.start_step and layer >= self.start_layer
        return step > self.start_step and layer > self.start_layer

    def _rows(self, layout: BatchLayout) -> list[int]:
        rows = []
        for r in layout.edit_rows():
            b = layout.branches[r]
            if self.clean_branch is not None and b == self.clean_branch:
                continue
            if self.target_branches is not None and b not in self.target_branches:
                continue
            rows.append(r)
        return rows

    def _clean_row(self, layout: BatchLayout, row: int) -> int:
        same = [i for i, (b, g) in enumerate(zip(layout.branches, layout.guidance))
                if b == self.clean_branch and g == layout.guidance[row]]
        anyrow = [i for i, b in enumerate(layout.branches) if b == self.clean_branch]
        if not (same or anyrow):
            raise ValueError(f"value_blend: the batch layout has no row of clean_branch {self.clean_branch}")
        return (same or anyrow)[0]

    def on_out(self, ctx: AttentionContext) -> "torch.Tensor | None":
        import torch

        if ctx.kind != "self":
            return None
        layer = ctx.layer_index
        if layer >= self.num_self_layers:
            raise ValueError(
                f"self-attention layer ordinal {layer} ({ctx.name}) >= num_self_layers={self.num_self_layers}; "
                "set num_self_layers to the UNet's number of self-attention layers"
            )
        layout = ctx.layout
        rows = self._rows(layout)
        if not rows or layer in self.plain_layers(ctx.step):
            return None
        q, k, v, out = ctx.query, ctx.key, ctx.value, ctx.out
        assert q is not None and k is not None and v is not None and out is not None
        m_s, m_t = _masks_at(self.mask_provider, ctx.step, _grid(ctx, self.mask_provider), q)
        def stack(t: "torch.Tensor", which: list[int]) -> "torch.Tensor":
            return torch.cat([t[ctx.head_rows(i)] for i in which])

        src = [layout.source_row(r) for r in rows]
        q_t, k_s, v_s = stack(q, rows), stack(k, src), stack(v, src)
        scale = ctx.attn.scale
        # Eq. 1: background branch, source keys inside M_s masked out (one batched softmax)
        bg = _project(ctx.attn, masked_attention(q_t, k_s, v_s, (m_s < 0.5)[None, None, :], scale))
        if self.object_active(ctx.step, layer):
            v_fg = v_s
            if self.value_blend is not None:
                v_c = stack(v, [self._clean_row(layout, r) for r in rows])
                v_fg = self.value_blend * v_c + (1.0 - self.value_blend) * v_s
            # Eq. 2, first case: source keys outside M_t masked out
            fg = _project(ctx.attn, masked_attention(q_t, k_s, v_fg, (m_t >= 0.5)[None, None, :], scale))
        else:
            fg = out[rows]  # Eq. 2, second case: the target's own self-attention (the processor's)
        w = m_t if self.mask_clamp is None else m_t.clamp(*self.mask_clamp)
        w = w.to(out.dtype)[None, :, None]
        new = out.clone()
        new[rows] = w * fg.to(out.dtype) + (1 - w) * bg.to(out.dtype)  # Eq. 3
        return new


# ---------------------------------------------------------------------------
# Localized Extraction
# ---------------------------------------------------------------------------


class LocalizedExtraction(AttentionController):
    """Paper sec. 4.3 (LE, Eq. 4): in the target branch's CROSS-attention, queries inside M_t attend
    to the target prompt, the others to the null prompt. Implemented as one attention over the keys
    and values of both prompts ``[target; null]`` with an additive mask per query, which for a binary
    M_t is exactly Eq. 4 (module docstring). M_t comes from ``mask_provider`` (its second mask),
    binarised at 0.5.

    ``null_embedding``: the null prompt's text embedding ``(L, C)`` or ``(1, L, C)``, projected with
    the layer's ``to_k`` / ``to_v``; ``None`` takes the keys/values of the unconditional row of the
    same branch (CFG layout). ``start_step`` / ``end_step``: the steps LE runs at (default all).
    ``capture=True`` keeps every computed probability matrix in :attr:`captured` as
    ``(layer name, step, row, probs (heads, N_q, L_target + L_null))`` for inspection.
    """

    def __init__(
        self,
        *,
        mask_provider: MaskProvider,
        null_embedding: Any = None,
        start_step: int = 0,
        end_step: int | None = None,
        target_branches: Sequence[int] | None = None,
        capture: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.mask_provider = mask_provider
        self.null_embedding = null_embedding
        self.start_step = int(start_step)
        self.end_step = end_step
        self.target_branches = None if target_branches is None else tuple(int(b) for b in target_branches)
        self.capture = capture
        self.captured: list[tuple[str, int, int, "torch.Tensor"]] = []

    def _rows(self, layout: BatchLayout) -> list[int]:
        half = "cond" if "cond" in layout.guidance else "none"
        rows = layout.edit_rows(half)
        if self.target_branches is not None:
            rows = [r for r in rows if layout.branches[r] in self.target_branches]
        return rows

    def _null_kv(self, ctx: AttentionContext, row: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        attn = ctx.attn
        if self.null_embedding is not None:
            e = torch.as_tensor(self.null_embedding).to(device=ctx.query.device, dtype=ctx.query.dtype)
            if e.ndim == 2:
                e = e[None]
            if attn.norm_cross:
                e = attn.norm_encoder_hidden_states(e)
            return attn.head_to_batch_dim(attn.to_k(e)), attn.head_to_batch_dim(attn.to_v(e))
        layout = ctx.layout
        b = layout.branches[row]
        un = [i for i, (bb, g) in enumerate(zip(layout.branches, layout.guidance)) if bb == b and g == "uncond"]
        if not un:
            raise ValueError(
                "LocalizedExtraction: no null_embedding given and the batch layout has no unconditional row "
                f"for branch {b} to take the null prompt's keys/values from"
            )
        return ctx.key[ctx.head_rows(un[0])], ctx.value[ctx.head_rows(un[0])]

    def on_out(self, ctx: AttentionContext) -> "torch.Tensor | None":
        import torch

        if ctx.kind != "cross" or ctx.step < self.start_step:
            return None
        if self.end_step is not None and ctx.step >= self.end_step:
            return None
        rows = self._rows(ctx.layout)
        if not rows:
            return None
        q, k, v, out = ctx.query, ctx.key, ctx.value, ctx.out
        assert q is not None and k is not None and v is not None and out is not None
        _, m_t = _masks_at(self.mask_provider, ctx.step, _grid(ctx, self.mask_provider), q)
        inside = (m_t >= 0.5)[:, None]  # (N_q, 1)
        new = out.clone()
        for r in rows:  # one batched attention per target row (rows: usually one)
            k_n, v_n = self._null_kv(ctx, r)
            k_t, v_t = k[ctx.head_rows(r)], v[ctx.head_rows(r)]
            n_t, n_n = k_t.shape[1], k_n.shape[1]
            is_target_key = torch.cat([torch.ones(n_t, dtype=torch.bool), torch.zeros(n_n, dtype=torch.bool)])
            is_target_key = is_target_key.to(q.device)[None, :]
            allowed = torch.where(inside, is_target_key, ~is_target_key)  # (N_q, L_t + L_n)
            kk, vv = torch.cat([k_t, k_n], dim=1), torch.cat([v_t, v_n], dim=1)
            qr = q[ctx.head_rows(r)]
            probs = masked_attention_probs(qr, kk, allowed[None], ctx.attn.scale)
            if self.capture:
                self.captured.append((ctx.name, ctx.step, r, probs.detach().cpu()))
            sc = (probs @ vv.float()).to(vv.dtype)
            new[r] = _project(ctx.attn, sc)[0].to(out.dtype)
        return new

    def reset(self) -> None:
        super().reset()
        self.captured = []
