"""ZONE's instruction-guided localisation: InstructPix2Pix cross-attention -> rough edit mask.

ZONE (Li et al., CVPR 2024, Sec. 4.2 and Eq. 4; code ``lsl001006/ZONE``) reads the cross-attention
of InstructPix2Pix while it edits: the map of the *first* token (BOS) covers the part of the image
that is kept, the map of the instruction's *last* token (its EOS slot) the part that is edited; the
difference of the two, thresholded, is the rough mask ``M_b``. Three pieces live here:

- :class:`ZoneCapture`: an attention controller that keeps the probabilities the official
  ``AttentionStore`` keeps (the two null-text rows of IP2P's guidance batch, cross-attention,
  summed over the steps) and averages them as ``msk_from_attn.aggregate_attention`` does.
- :func:`instruction_positions`: the token positions of the first and last map, as the code reads
  them (``tokenizer.encode(instruction)``: 0 and ``len - 1``).
- :func:`rough_mask`: the difference and threshold under the code's arithmetic (``rule="code"``:
  uint8 maps, saturating difference, PIL resize, doubling, cut at 108) or the paper's Eq. 4
  (``rule="paper"``: ``M^1 - M^L < T`` with ``T = 128``).

Which rule produced the paper's numbers: the released code (``show_diff_cross_attention``, the same
in every commit since the first, and the only implementation the authors published and ran) cuts
at 108 after doubling, i.e. keeps ``M^1 - M^L <= 54`` on the 0-255 scale, so ``rule="code"`` is the
default; the paper's ``T = 128`` on an undoubled difference is a different, looser cut that no
released code implements.

No torch import at module import time: the controller imports torch inside its methods.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np
from PIL import Image

from ..diffusion.attention import AttentionContext, AttentionStore, CaptureController

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "CODE_MAX_TOKENS",
    "LAYER_RULES",
    "MASK_RULES",
    "PAPER_BLOCKS",
    "ZoneCapture",
    "code_grid",
    "instruction_positions",
    "localise",
    "rough_mask",
]

#: ``layers=`` values of :class:`ZoneCapture`.
LAYER_RULES = ("code", "paper")
#: ``rule=`` values of :func:`rough_mask` and their default thresholds.
MASK_RULES = ("code", "paper")
DEFAULT_THRESHOLD = {"code": 108.0, "paper": 128.0}
#: The official AttentionStore keeps layers with at most 32 x 32 queries ("avoid memory overhead").
CODE_MAX_TOKENS = 32 * 32
#: The code aggregates ``from_where=['up', 'down']``: the middle block is never read.
CODE_PLACES = ("down", "up")
#: The paper's wording (supplement B): "the first three UNet upsampling blocks and the second to
#: the fourth downsampling blocks", as diffusers names them (0-based).
PAPER_BLOCKS = ("down_blocks.1", "down_blocks.2", "down_blocks.3", "up_blocks.0", "up_blocks.1", "up_blocks.2")


def code_grid(height: int, width: int) -> tuple[int, int]:
    """The attention grid the code aggregates at: ``(ceil(H / 32), ceil(W / 32))`` of the image
    (``show_diff_cross_attention``), 16 x 16 at 512 px."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return math.ceil(height / 32), math.ceil(width / 32)


def _as_grid(grid: int | Sequence[int] | None) -> tuple[int, int] | None:
    if grid is None:
        return None
    if isinstance(grid, bool):
        raise TypeError("grid must be an int, an (h, w) pair or None, not a bool")
    if isinstance(grid, int):
        h = w = grid
    else:
        h, w = (int(v) for v in grid)
    if h <= 0 or w <= 0:
        raise ValueError(f"grid must be positive, got {h}x{w}")
    return h, w


def _block_of(name: str) -> str:
    """``down_blocks.2`` of ``down_blocks.2.attentions.0.transformer_blocks.0.attn2``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts and parts[0] in ("down_blocks", "up_blocks") else parts[0]


def _shape_for(n: int, aspect: float) -> tuple[int, int]:
    """(h, w) with ``h * w == n`` and ``h / w`` closest to ``aspect``: a layer's query grid keeps
    the latent's aspect ratio (transformer blocks receive flattened tokens, so only n is known)."""
    best: tuple[int, int] | None = None
    for h in range(1, n + 1):
        if n % h:
            continue
        w = n // h
        if best is None or abs(h / w - aspect) < abs(best[0] / best[1] - aspect):
            best = (h, w)
    assert best is not None
    return best


class ZoneCapture(CaptureController):
    """Captures IP2P's cross-attention probabilities as the official ``AttentionStore`` does.

    ``rows``: the batch rows kept. IP2P's guidance batch is ``[text + image, null + image,
    null + zero-image]``; the code's controller stores ``attn[h // 3:]``, i.e. rows 1 and 2, the
    two null-text rows (the paper's "unconditional embeddings"), hence the default ``(1, 2)``.

    ``grid``: the query grid ``(h, w)`` (or one int for a square) the maps are read at. The code
    reads ``ceil(H / 32) x ceil(W / 32)`` of the image (:func:`code_grid`): 16 x 16 at 512 px,
    which on Stable Diffusion 1.5 are the cross-attention layers of ``down_blocks.2`` (2) and
    ``up_blocks.1`` (3). ``None`` derives it from the UNet's finest cross-attention grid (the
    latent, ``H / 8``) as a quarter of its side; that needs a square latent, otherwise pass it.

    ``layers``:

    - ``"code"`` (default): every down / up cross-attention layer whose query grid is ``grid``
      (``aggregate_attention`` with ``from_where=['up', 'down']``: the middle block is not read),
      maps averaged over layers, heads and the kept rows, each (layer, row, head) weighted alike
      (the code concatenates them and divides the sum by their number).
    - ``"paper"``: supplement B's wording, "the first three upsampling blocks and the second to the
      fourth downsampling blocks" (:data:`PAPER_BLOCKS`), at every resolution they have. On SD 1.5
      that is ``down_blocks.1`` (32 x 32, 2 layers), ``down_blocks.2`` (16 x 16, 2),
      ``up_blocks.1`` (16 x 16, 3) and ``up_blocks.2`` (32 x 32, 3): a superset of the code's five
      16 x 16 layers (``down_blocks.3`` and ``up_blocks.0`` have no attention). Maps at another
      grid are resized to ``grid`` before averaging (``torch.nn.functional.interpolate``:
      ``"area"`` when shrinking, an exact 2 x 2 mean from 32 x 32 to 16 x 16; ``"bilinear"`` when
      enlarging), as the paper's "average and resize" needs one grid.

    When no captured layer has the requested grid (``"code"``; e.g. the tiny backbone at 64 px asks
    for 2 x 2, which only its middle block has), the maps are read at the nearest grid *finer* than
    the requested one (the coarsest finer grid; the finest coarser one when there is none), and
    :attr:`grid_note` says so. After :meth:`token_maps`, :attr:`used_grid`, :attr:`used_layers`
    and :attr:`grid_note` record what was read; :meth:`info` returns them for an edit's ``info``.

    Memory: as the code's store, layers with more than 32 x 32 queries are not kept in ``"code"``
    mode unless the requested grid is that large; ``"paper"`` keeps its blocks' layers at any size.
    Steps end automatically (one UNet call per step, see :class:`AttentionController`); the maps
    are summed over steps (the code divides by the step count, which changes no mask: each map is
    scaled by its own maximum).
    """

    def __init__(
        self,
        rows: Sequence[int] = (1, 2),
        grid: int | Sequence[int] | None = None,
        layers: str = "code",
        *,
        image_size: Sequence[int] | None = None,
        **kw: Any,
    ) -> None:
        # Only cross-attention reaches the store; places are filtered by wants().
        super().__init__(AttentionStore(kinds=("cross",), places=("down", "mid", "up"), max_tokens=None), **kw)
        rows = tuple(int(r) for r in rows)
        if not rows or len(set(rows)) != len(rows) or min(rows) < 0:
            raise ValueError(f"ZoneCapture: rows must be distinct non-negative batch rows, got {rows}")
        if layers not in LAYER_RULES:
            raise ValueError(f"ZoneCapture: layers must be one of {', '.join(LAYER_RULES)}, got {layers!r}")
        self.rows = rows
        self.layers = layers
        self.grid = _as_grid(grid)
        if self.grid is None and image_size is not None:
            self.grid = code_grid(*image_size)
        self.max_cross_tokens = 0  # the finest cross-attention grid seen (tokens), for grid=None
        self.used_grid: tuple[int, int] | None = None
        self.used_layers: list[str] | None = None
        self.grid_note: str | None = None

    # -- capture -------------------------------------------------------------
    def keeps(self, ctx: AttentionContext) -> bool:
        """Whether this layer's probabilities are stored (see the class docstring)."""
        if ctx.kind != "cross":
            return False
        if self.layers == "paper":
            return _block_of(ctx.name) in PAPER_BLOCKS
        if ctx.place not in CODE_PLACES:
            return False
        bound = CODE_MAX_TOKENS if self.grid is None else max(CODE_MAX_TOKENS, self.grid[0] * self.grid[1])
        return ctx.n_query <= bound

    def _seen(self, ctx: AttentionContext) -> None:
        if ctx.kind == "cross":
            self.max_cross_tokens = max(self.max_cross_tokens, ctx.n_query)

    def on_qkv(self, ctx: AttentionContext) -> None:
        # Every layer passes here (a ControllerList's needs_probs stops at the first child that
        # says yes, so it does not reach every child): track the finest grid for grid=None.
        self._seen(ctx)
        return None

    def needs_probs(self, ctx: AttentionContext) -> bool:
        self._seen(ctx)
        return self.keeps(ctx)

    def wants(self, ctx: AttentionContext) -> bool:
        return self.keeps(ctx)

    def _selected_rows(self, ctx: AttentionContext) -> list[int]:
        if max(self.rows) >= ctx.batch_size:
            raise ValueError(
                f"ZoneCapture keeps batch rows {self.rows} but layer {ctx.name} was called with "
                f"{ctx.batch_size} rows; InstructPix2Pix's guidance batch is [text + image, "
                "null + image, null + zero-image] (3 rows)"
            )
        return list(self.rows)

    def reset(self) -> None:
        super().reset()
        self.max_cross_tokens = 0
        self.used_grid = self.used_layers = self.grid_note = None

    # -- reading -------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Steps summed into the maps (a step still open counts as one)."""
        return self.store.num_steps + (1 if self.store.step_store else 0)

    def _layer_sums(self) -> dict[str, "torch.Tensor"]:
        """Per-layer step sums, a step still open (``auto_step=False`` without ``step_end``)
        included, in capture (= forward) order."""
        out = dict(self.store.sums)
        for name, p in self.store.step_store.items():
            out[name] = out[name] + p if name in out else p
        return out

    def target_grid(self) -> tuple[int, int]:
        """The requested grid: ``grid`` / ``image_size``, else a quarter of the finest cross-attention
        grid's side (the code's ``ceil(H / 32)`` for a latent of ``H / 8``)."""
        if self.grid is not None:
            return self.grid
        n0 = self.max_cross_tokens
        side = math.isqrt(n0)
        if n0 == 0:
            raise ValueError("ZoneCapture: no cross-attention call was seen, so the grid is unknown")
        if side * side != n0:
            raise ValueError(
                f"ZoneCapture: the finest cross-attention grid has {n0} tokens, not a square; "
                "pass grid=(h, w) or image_size=(H, W)"
            )
        g = math.ceil(side / 4)
        return g, g

    def token_maps(self) -> np.ndarray:
        """``(n_tokens, h, w)`` float64: the step-summed probabilities of the kept rows, averaged
        over the selected layers, their heads and the kept rows (``aggregate_attention``).

        Sets :attr:`used_grid`, :attr:`used_layers` and :attr:`grid_note`."""
        import torch
        import torch.nn.functional as F

        sums = self._layer_sums()
        if not sums:
            raise ValueError(
                "ZoneCapture: no cross-attention maps were captured (install the controller on the "
                "InstructPix2Pix UNet with methods.diffusion.attention.install and run it first)"
            )
        gh, gw = self.target_grid()
        aspect = gh / gw
        note = None
        if self.layers == "code":
            picked = {n: m for n, m in sums.items() if m.shape[1] == gh * gw}
            if not picked:
                sizes = sorted({int(m.shape[1]) for m in sums.values()})
                finer = [s for s in sizes if s > gh * gw]
                n = min(finer) if finer else max(sizes)
                h, w = _shape_for(n, aspect)
                note = (
                    f"no down/up cross-attention layer has the code's {gh}x{gw} grid (grids captured: "
                    + ", ".join("%dx%d" % _shape_for(s, aspect) for s in sizes)
                    + f"); read the nearest {'finer' if finer else 'coarser'} grid {h}x{w}"
                )
                picked = {nm: m for nm, m in sums.items() if m.shape[1] == n}
                gh, gw = h, w
            parts = [m.reshape(-1, gh, gw, m.shape[-1]).to(torch.float64) for m in picked.values()]
        else:
            picked = sums
            parts = []
            for m in picked.values():
                h, w = _shape_for(int(m.shape[1]), aspect)
                x = m.reshape(-1, h, w, m.shape[-1]).to(torch.float64)
                if (h, w) != (gh, gw):
                    mode = "area" if h >= gh and w >= gw else "bilinear"
                    kw = {} if mode == "area" else {"align_corners": False}
                    x = F.interpolate(x.permute(0, 3, 1, 2), size=(gh, gw), mode=mode, **kw).permute(0, 2, 3, 1)
                parts.append(x)
            if any(int(m.shape[1]) != gh * gw for m in picked.values()):
                note = f"paper layers at several grids, resized to {gh}x{gw} before averaging"
        maps = torch.cat(parts, dim=0).mean(dim=0)  # (h, w, n_tokens)
        self.used_grid = (gh, gw)
        self.used_layers = list(picked)
        self.grid_note = note
        return maps.permute(2, 0, 1).cpu().numpy()

    def info(self) -> dict[str, Any]:
        """What the last :meth:`token_maps` read, for an edit's ``info`` (JSON-ready)."""
        return {
            "attention_layers_rule": self.layers,
            "attention_rows": list(self.rows),
            "attention_grid": list(self.used_grid) if self.used_grid else None,
            "attention_layers": list(self.used_layers) if self.used_layers is not None else None,
            "attention_grid_note": self.grid_note,
            "attention_steps": self.num_steps,
        }


def instruction_positions(tokenizer: Any, instruction: str) -> tuple[int, int]:
    """(first, last) token positions of the maps the mask is made from, as the code reads them.

    ``show_diff_cross_attention`` takes ``tokens = tokenizer.encode(instruction)`` (BOS, the
    instruction's tokens, EOS) and reads the maps at 0 (BOS) and ``len(tokens) - 1``: the
    instruction's EOS slot in the text encoder's padded input. An instruction longer than the
    text context is truncated by the pipeline, whose EOS then sits at the last position: the last
    position is clipped to ``model_max_length - 1`` (the code would index past the maps).
    """
    ids = tokenizer.encode(instruction)
    n = len(ids)
    if n < 2:
        raise ValueError(f"tokenizer.encode({instruction!r}) gave {n} tokens; expected BOS ... EOS")
    max_len = int(getattr(tokenizer, "model_max_length", 77) or 77)
    if max_len > 10_000:  # transformers' "no limit" sentinel (VERY_LARGE_INTEGER): CLIP's context
        max_len = 77
    return 0, min(n - 1, max_len - 1)


def _check_map(name: str, m: Any) -> np.ndarray:
    a = np.asarray(m)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"rough_mask: the {name} map must be a non-empty 2-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"rough_mask: the {name} map has non-finite values")
    if a.max() <= 0:
        raise ValueError(f"rough_mask: the {name} map has no positive value (maximum {a.max()}); it cannot be scaled")
    return a


def _code_uint8(m: np.ndarray) -> np.ndarray:
    """``(255 * map / map.max()).astype(uint8)`` as the code computes it on a float32 torch tensor:
    float32 arithmetic, then truncation (not rounding) to uint8; values are in [0, 255]."""
    x = m.astype(np.float32)
    scaled = (np.float32(255) * x) / x.max()
    return np.clip(scaled, 0, 255).astype(np.uint8)  # clip only guards negative inputs


def rough_mask(
    first: np.ndarray,
    last: np.ndarray,
    size: tuple[int, int],
    rule: str = "code",
    threshold: float | None = None,
) -> np.ndarray:
    """ZONE's rough mask ``M_b`` (bool ``(H, W)``, True = edit region) from the first and last
    token maps (``(h, w)`` each, any positive scale) and the image ``size = (H, W)``.

    ``rule="code"`` (``msk_from_attn.show_diff_cross_attention``), threshold default 108:

    1. each map scaled to 0-255 by its own maximum, truncated to uint8 (:func:`_code_uint8`);
    2. ``cv2.subtract(first, last)``: uint8 saturating, so ``last > first`` gives 0 (edit side);
    3. resized to ``(W, H)`` with PIL's default filter for that call (``Image.resize`` without
       ``resample``: bicubic for uint8 images since Pillow 7; the code pins Pillow 10.0.1);
    4. ``cv2.convertScaleAbs(alpha=2)``: doubled and saturated, so differences of 128 or more
       become 255;
    5. ``> threshold`` -> 255, then ``bitwise_not``: True where ``min(2 * d, 255) <= threshold``,
       i.e. ``d <= 54`` at the default 108.

    ``rule="paper"`` (Eq. 4), threshold default 128: each map scaled to 0-255 by its own maximum
    (float, no truncation), resized to ``(W, H)`` (PIL bicubic, float), ``M_b = 1`` where
    ``M^1 - M^L < T`` (signed difference, strict).
    """
    if rule not in MASK_RULES:
        raise ValueError(f"rough_mask: rule must be one of {', '.join(MASK_RULES)}, got {rule!r}")
    f = _check_map("first", first)
    l_ = _check_map("last", last)
    if f.shape != l_.shape:
        raise ValueError(f"rough_mask: first map {f.shape} and last map {l_.shape} differ in shape")
    H, W = (int(v) for v in size)
    if H <= 0 or W <= 0:
        raise ValueError(f"rough_mask: size must be positive (H, W), got {size}")
    t = DEFAULT_THRESHOLD[rule] if threshold is None else float(threshold)
    if rule == "code":
        diff = cv2.subtract(_code_uint8(f), _code_uint8(l_))  # uint8 saturating, as the code
        # The code resizes the 3-channel copy; Pillow resamples every band of an 8-bit image alike,
        # so one band gives the same values.
        diff = np.asarray(Image.fromarray(diff).resize((W, H), Image.Resampling.BICUBIC))
        doubled = cv2.convertScaleAbs(diff, alpha=2, beta=0)  # saturate(|2 d|)
        return doubled <= t
    scaled = []
    for m in (f, l_):
        s = (255.0 * m.astype(np.float64) / m.max()).astype(np.float32)  # PIL's float images are 32-bit
        scaled.append(np.asarray(Image.fromarray(s).resize((W, H), Image.Resampling.BICUBIC), dtype=np.float64))
    return (scaled[0] - scaled[1]) < t


def localise(
    capture: ZoneCapture,
    tokenizer: Any,
    instruction: str,
    size: tuple[int, int],
    *,
    rule: str = "code",
    threshold: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The rough mask ``M_b`` of one edit from a :class:`ZoneCapture` that watched its sampling:
    :meth:`ZoneCapture.token_maps`, the maps at :func:`instruction_positions`, :func:`rough_mask`.
    Returns the mask and a JSON-ready ``info`` (rule, threshold, token positions and what the
    capture read: :meth:`ZoneCapture.info`)."""
    maps = capture.token_maps()
    first, last = instruction_positions(tokenizer, instruction)
    if last >= maps.shape[0]:
        raise ValueError(f"localise: token position {last} is past the {maps.shape[0]} captured tokens")
    mask = rough_mask(maps[first], maps[last], size, rule=rule, threshold=threshold)
    info = {
        "mask_rule": rule,
        "mask_threshold": DEFAULT_THRESHOLD[rule] if threshold is None else float(threshold),
        "token_positions": [first, last],
        **capture.info(),
    }
    return mask, info
