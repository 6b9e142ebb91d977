"""PartEdit's attention controller: one :class:`~methods.diffusion.attention.AttentionController`
doing, on the three-branch batch, what the official ``PartEditCrossAttnProcessor`` +
``AttentionStore`` + Prompt-to-Prompt ``AttentionReplace`` do together
(``Gorluxor/PartEdit`` ``stable_diffusion_xl_partedit.py``, read at af50018).

Batch layout (:func:`partedit_layout`): branches 0 = source, 1 = edit, 2 = localisation, in
diffusers' CFG order ``[uncond(src, edit, loc), cond(src, edit, loc)]`` (``[src, edit, loc]``
without guidance). At the three hooks of :class:`~methods.diffusion.attention.EditingAttnProcessor`:

(a) ``"qkv"``, every attention module (self and cross): **query sharing** -- the localisation
    rows' queries (both CFG halves) := the source rows' (the processor's
    ``query[[loc, loc + bs]] = query[[0, bs]]``). Not described in the paper: ``query_sharing``.
(b) ``"probs"``, cross-attention: **capture** of the part token's map -- cond half, localisation
    row, token ``token_index`` (1: the code's token order is [background, part]), summed over the
    heads (``AttentionStore.forward``), on the layers ``capture_layers`` (call-order indices among
    the cross-attention modules, :func:`methods.partedit.mask.layer_indices`). Captured *before*
    the replacement below, as the code stores before ``AttentionControlEdit`` replaces.
(c) ``"probs"``, cross-attention, cond half: **Prompt-to-Prompt word swap** -- every non-source
    row (edit *and* localisation: the code's ``attn[1:]``) takes the source row's maps through the
    word mapper, weighted per token and step by ``alpha`` (``n_cross_replace``
    ``{default: 1.0, <edit word>: 0.4}``: every token at every step except the edit word after
    40 % of the steps); the localisation row's mapper is the identity (its prompt is the
    source's). Self-attention replacement is off (``n_self_replace`` 0.0). The shared
    :class:`~methods.diffusion.attention.ReplaceCrossAttentionController` does exactly this with a
    per-edit ``(n_edits, K, K)`` mapper and ``(steps, n_edits, K)`` alphas, so it is reused as is
    (delegated to, after the capture). Not described in the paper: ``p2p_replace``.
(d) ``"out"``, every attention module (self and cross, after ``to_out``): **feature blending**
    (paper Eq. 6) -- for ``start_step < step < t_e`` the edit rows of both halves become
    ``(1 - M) * source + M * edit`` with ``M`` the *previous* step's part mask, resized bilinearly
    to the layer's token grid. The code blends self-attention too (``blend_self_attention``); the
    paper says "after attention layers".

At every step end the captured maps go through ``mask_fn`` (the aggregation and adaptive
binarisation of :mod:`methods.partedit.mask`) and become the mask of the next step; step 0 has no
mask, so it is never blended (the code's ``cur_step > start_editing_at``) unless the caller runs
the code's ``add_extra_step`` (an extra UNet pass at the first timestep whose maps give step 1 its
mask; see :mod:`.sampler`).

Test hook: ``forced_mask`` replaces every computed mask (still from step ``start_step + 1`` on,
as the code's ``PROVIDED_MASK`` strategy), so a test can pin the blend to all zeros / all ones.

torch is imported lazily.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..diffusion.attention import AttentionContext, AttentionController, BatchLayout, ReplaceCrossAttentionController

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

SOURCE, EDIT, LOCALISATION = 0, 1, 2
#: the part token's position in the localisation row (the code's ``index_inside_batch`` = 1)
PART_TOKEN_INDEX = 1


def partedit_layout(guided: bool = True) -> BatchLayout:
    """The three-branch layout: ``[uncond(src, edit, loc), cond(src, edit, loc)]`` with CFG,
    ``[src, edit, loc]`` without."""
    return BatchLayout.cfg(3) if guided else BatchLayout.plain(3)


class PartEditController(AttentionController):
    """See the module docstring.

    ``mask_fn(maps)``: the captured maps of one step (a list of ``(h, w)`` float tensors, one per
    captured layer in call order) -> the ``(S, S)`` part mask in [0, 1].
    ``capture_layers``: call-order cross-attention indices to capture (None = every one).
    ``p2p``: the Prompt-to-Prompt controller of (c), or None (``p2p_replace=false``).
    ``t_e``: blending happens at controller steps ``start_step < step < t_e``.
    ``blend_kinds``: attention kinds blended (``("self", "cross")``: the code).
    ``keep_masks`` / ``keep_maps``: keep every step's mask in :attr:`masks` / captured maps in
    :attr:`maps_per_step` (tests, visualisation).
    """

    def __init__(
        self,
        layout: BatchLayout,
        mask_fn: Callable[[list["torch.Tensor"]], "torch.Tensor"],
        *,
        capture_layers: Sequence[int] | None = None,
        token_index: int = PART_TOKEN_INDEX,
        query_sharing: bool = True,
        p2p: ReplaceCrossAttentionController | None = None,
        blend: bool = True,
        blend_kinds: Sequence[str] = ("self", "cross"),
        t_e: int = 50,
        start_step: int = 0,
        forced_mask: Any = None,
        keep_masks: bool = False,
        keep_maps: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(layout=layout, **kw)
        if set(layout.branches) != {SOURCE, EDIT, LOCALISATION}:
            raise ValueError("PartEditController needs a layout with the branches source (0), edit (1), "
                             "localisation (2)")
        self.mask_fn = mask_fn
        self.capture_layers = None if capture_layers is None else frozenset(int(i) for i in capture_layers)
        self.token_index = int(token_index)
        self.query_sharing = bool(query_sharing)
        self.p2p = p2p
        if p2p is not None:
            p2p.layout = layout
        self.blend = bool(blend)
        self.blend_kinds = tuple(blend_kinds)
        self.t_e = int(t_e)
        self.start_step = int(start_step)
        self.forced_mask = forced_mask
        self.keep_masks = keep_masks
        self.keep_maps = keep_maps
        guided = "cond" in layout.guidance
        half = "cond" if guided else "none"
        self._loc_capture_row = next(i for i, (b, g) in enumerate(zip(layout.branches, layout.guidance))
                                     if b == LOCALISATION and g == half)
        self._pairs_loc = [(r, layout.source_row(r)) for r in range(layout.batch_size)
                           if layout.branches[r] == LOCALISATION]
        self._pairs_edit = [(r, layout.source_row(r)) for r in range(layout.batch_size)
                            if layout.branches[r] == EDIT]
        self.reset_state()

    # -- state -------------------------------------------------------------------------------
    def reset_state(self) -> None:
        self.mask: "torch.Tensor | None" = None  # the mask the current step blends with
        self.last_mask: "torch.Tensor | None" = None  # the most recent mask computed
        self.used_mask: "torch.Tensor | None" = None  # the mask of the last blended step
        self.masks: list["torch.Tensor"] = []
        self.maps_per_step: list[dict[int, "torch.Tensor"]] = []  # with keep_maps: {layer: (h, w) map}
        self.captured_layers: list[int] = []  # layers captured in the last step with maps
        self.blended_steps: list[int] = []
        self.aggregation_seconds = 0.0  # time in mask_fn (the upsampling + aggregation)
        self._step_maps: dict[int, "torch.Tensor"] = {}
        self._resized: dict[tuple, "torch.Tensor"] = {}

    def reset(self) -> None:
        super().reset()
        self.reset_state()
        if self.p2p is not None:
            self.p2p.reset()

    # -- (a) query sharing ---------------------------------------------------------------------
    def on_qkv(self, ctx: AttentionContext):
        if not self.query_sharing:
            return None
        q = ctx.query
        assert q is not None
        q = q.clone()
        for r, s in self._pairs_loc:
            q[ctx.head_rows(r)] = ctx.query[ctx.head_rows(s)]
        return q, ctx.key, ctx.value

    # -- (b) capture, (c) P2P ------------------------------------------------------------------
    def needs_probs(self, ctx: AttentionContext) -> bool:
        if ctx.kind == "cross":
            return True  # captured and / or replaced
        return self.p2p is not None and self.p2p.needs_probs(ctx)

    def captures(self, ctx: AttentionContext) -> bool:
        return ctx.kind == "cross" and (self.capture_layers is None or ctx.layer_index in self.capture_layers)

    def on_probs(self, ctx: AttentionContext) -> "torch.Tensor | None":
        p = ctx.probs
        assert p is not None
        if self.captures(ctx):
            row = p[ctx.head_rows(self._loc_capture_row), :, self.token_index]  # (heads, N_q)
            h, w = ctx.token_grid()
            self._step_maps[ctx.layer_index] = row.sum(0).float().reshape(h, w)
        if self.p2p is not None:
            return self.p2p.on_probs(ctx)
        return None

    # -- (d) blending ------------------------------------------------------------------------
    def blending(self, step: int) -> bool:
        """Whether controller step ``step`` blends (a mask exists and ``start_step < step < t_e``)."""
        have = self.forced_mask is not None or self.mask is not None
        return self.blend and have and self.start_step < step < self.t_e

    def _current_mask(self, like: "torch.Tensor") -> "torch.Tensor":
        import torch

        if self.forced_mask is not None:
            m = torch.as_tensor(self.forced_mask)
        else:
            assert self.mask is not None
            m = self.mask
        m = m.to(device=like.device, dtype=torch.float32)
        return m.reshape(m.shape[-2], m.shape[-1])

    def mask_at(self, h: int, w: int, like: "torch.Tensor") -> "torch.Tensor":
        """The current mask resized (bilinear, the code's ``F.interpolate``) to ``(h, w)``, as
        ``(h * w, 1)`` in ``like``'s dtype; cached per step."""
        import torch.nn.functional as F

        key = (self.step, h, w, like.device, like.dtype)
        hit = self._resized.get(key)
        if hit is None:
            m = self._current_mask(like)
            if tuple(m.shape) != (h, w):
                m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            hit = self._resized[key] = m.reshape(h * w, 1).to(like.dtype)
        return hit

    def on_out(self, ctx: AttentionContext) -> "torch.Tensor | None":
        if ctx.kind not in self.blend_kinds or not self.blending(ctx.step):
            return None
        out = ctx.out
        assert out is not None
        h, w = ctx.token_grid()
        m = self.mask_at(h, w, out)
        new = out.clone()
        for r, s in self._pairs_edit:
            # the code's order of operations: (1 - M) * source + M * edit (exact at M = 0 and 1)
            new[r] = (1 - m) * out[s] + m * out[r]
        if not self.blended_steps or self.blended_steps[-1] != ctx.step:
            self.blended_steps.append(ctx.step)
            self.used_mask = self._current_mask(out).detach()
        return new

    # -- step end: the next step's mask --------------------------------------------------------
    def on_step_end(self) -> None:
        if self.p2p is not None:
            self.p2p.step = self.step
        if not self._step_maps:
            return
        layers = sorted(self._step_maps)
        maps = [self._step_maps[i] for i in layers]
        if maps[0].is_cuda:  # time the aggregation itself, not queued kernels before it
            import torch

            torch.cuda.synchronize(maps[0].device)
        t0 = time.perf_counter()
        mask = self.mask_fn(maps)
        if mask.is_cuda:
            import torch

            torch.cuda.synchronize(mask.device)
        self.aggregation_seconds += time.perf_counter() - t0
        self.captured_layers = layers
        self.mask = self.last_mask = mask.detach()
        if self.keep_masks:
            self.masks.append(self.mask)
        if self.keep_maps:
            self.maps_per_step.append(dict(self._step_maps))
        self._step_maps = {}
        self._resized = {}
