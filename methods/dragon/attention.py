"""The two attention changes of DragonDiffusion / DiffEditor.

1. **Memory bank** (DragonDiffusion sec. 3.3 "visual cross-attention"; code
   ``src/unet/attention_processor.py:AttnProcessor``): during the DDIM inversion of the source
   (and, for paste / appearance, of the reference) every decoder ('up') self-attention stores its
   keys and values for every step; during editing the same layer at the same step reads them back:

   - ``replace`` (move, steps j >= 5): the layer's K/V are replaced by the stored source K/V;
   - ``concat`` (drag and face landmarks, j >= 5): the stored source K/V are appended to the
     layer's own (the query attends to both);
   - ``mix`` (paste / appearance, j <= 35): K/V = the stored base K/V at the positions outside
     the base mask ++ the stored reference K/V at the positions inside the reference mask.

   This is a :class:`MemoryBankController` on the shared ``EditingAttnProcessor`` seam
   (``methods/diffusion/attention.py``): its ``"qkv"`` hook sees the per-head K/V of each layer
   and may return new ones, which is exactly what the bank needs (no processor of our own).
   Keys are stored in that per-head layout ``(rows * heads, tokens, head_dim)`` (rows = the
   inverted images: 1, or 2 for base + reference); ``offload=True`` keeps them in host memory
   (the code's ``.cpu()``) and moves one layer's K/V to the device when it is read.

2. **Image prompt** (DiffEditor sec. 3.3, Eq. 5; code ``IPAttnProcessor``): decoupled
   cross-attention ``out = Attn(Q, K_text, V_text) + gamma * Attn(Q, K_img, V_img)`` with
   ``K_img = to_k_ip(c_im)``, ``V_img = to_v_ip(c_im)``. diffusers' own
   ``IPAdapterAttnProcessor2_0`` computes exactly this (its ``scale`` is gamma, and a scale of 0
   skips the image branch, leaving the text-only attention), so it is used as is. What it lacks
   is the code's step gating (image branch on only for 10 <= i < 20, off in the time-travel
   rollback): the sampler sets the processors' scale every step (:func:`set_image_scale`).
   Its weights come from the released checkpoint's ``ip_adapter`` part, whose layout is
   IP-Adapter's (``"{k}.to_k_ip.weight"``, k = 1, 3, 5, ... the position of each cross-attention
   processor in ``unet.attn_processors``, as diffusers' ``_convert_ip_adapter_attn_to_diffusers``
   numbers them); :func:`image_prompt_processors` builds the processors from it without touching
   the UNet's configuration (the loaded UNet is shared with other methods in the process).

torch / diffusers are imported lazily.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..diffusion.attention import AttentionContext, AttentionController, EditingAttnProcessor, layer_kind_from_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

BANK_MODES = ("concat", "replace", "mix")
PHASES = ("off", "save", "use")


class MemoryBank:
    """Keys and values of every decoder self-attention layer at every inversion step.

    ``put(step, name, key, value)`` / ``get(step, name, device, dtype)``; ``step`` is the index of
    the sampling step that uses the same timestep (the code's ``iter_cur``), ``name`` the layer's
    processor name. ``offload=True`` stores on the CPU.
    """

    def __init__(self, offload: bool = False) -> None:
        self.offload = bool(offload)
        self._kv: dict[tuple[int, str], tuple[Any, Any]] = {}

    def put(self, step: int, name: str, key: "torch.Tensor", value: "torch.Tensor") -> None:
        k, v = key.detach(), value.detach()
        if self.offload:
            k, v = k.to("cpu", copy=True), v.to("cpu", copy=True)
        else:
            k, v = k.clone(), v.clone()
        self._kv[(int(step), name)] = (k, v)

    def get(self, step: int, name: str, device: Any = None, dtype: Any = None) -> "tuple[torch.Tensor, torch.Tensor]":
        try:
            k, v = self._kv[(int(step), name)]
        except KeyError:
            raise KeyError(f"memory bank has no keys/values for step {step} layer {name!r} "
                           f"(stored: {len(self._kv)} entries)") from None
        return k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)

    def __len__(self) -> int:
        return len(self._kv)

    def steps(self) -> list[int]:
        return sorted({s for s, _ in self._kv})

    def names(self) -> list[str]:
        return sorted({n for _, n in self._kv})

    def nbytes(self) -> int:
        return int(sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._kv.values()))

    def device(self) -> str | None:
        for k, _ in self._kv.values():
            return str(k.device)
        return None


def grid_of(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) token grid of a layer with ``n_tokens`` tokens in a UNet run on ``latent_hw``
    latents (the code's ``scale = sqrt(H * W / N)``)."""
    lh, lw = latent_hw
    s = (lh * lw / n_tokens) ** 0.5
    h, w = max(1, round(lh / s)), max(1, round(lw / s))
    if h * w != n_tokens:
        raise ValueError(f"cannot place {n_tokens} tokens on a grid of aspect {lh}x{lw}")
    return h, w


def mask_tokens(mask: "torch.Tensor", n_tokens: int, latent_hw: tuple[int, int]) -> "torch.Tensor":
    """A (1, 1, h, w) latent-resolution mask -> bool (n_tokens,) at the layer's grid: nearest
    interpolation then > 0.5, as the code does with the image-resolution mask."""
    import torch.nn.functional as F

    gh, gw = grid_of(n_tokens, latent_hw)
    m = F.interpolate(mask.float(), size=(gh, gw), mode="nearest")
    return (m.reshape(-1) > 0.5)


class MemoryBankController(AttentionController):
    """Saves (``phase='save'``) or applies (``phase='use'``) the memory bank at the decoder
    self-attention layers; the sampler sets ``phase``, ``step`` and ``active`` through
    :meth:`set` before every UNet call (steps are driven by the caller: ``auto_step=False``).

    ``mode``: one of :data:`BANK_MODES`. ``base_mask`` / ``ref_mask`` (mix only): (1, 1, h, w)
    latent-resolution masks of the region in the base image and in the reference image;
    ``latent_hw``: the latent size the UNet runs at.
    """

    def __init__(self, bank: MemoryBank, mode: str, *, latent_hw: tuple[int, int],
                 base_mask: "torch.Tensor | None" = None, ref_mask: "torch.Tensor | None" = None) -> None:
        super().__init__(auto_step=False)
        if mode not in BANK_MODES:
            raise ValueError(f"memory bank mode must be one of {list(BANK_MODES)}, got {mode!r}")
        if mode == "mix" and (base_mask is None or ref_mask is None):
            raise ValueError("memory bank mode 'mix' needs base_mask and ref_mask")
        self.bank = bank
        self.mode = mode
        self.latent_hw = tuple(latent_hw)
        self.base_mask = base_mask
        self.ref_mask = ref_mask
        self.phase = "off"
        self.active = False
        self.applied = 0  # layer calls the bank changed (for tests and the info)
        self._token_masks: dict[int, tuple[Any, Any]] = {}

    def set(self, phase: str, step: int, active: bool = True) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {list(PHASES)}, got {phase!r}")
        self.phase, self.step, self.active = phase, int(step), bool(active)

    def reset(self) -> None:  # install() resets controllers; keep the caller's phase and step
        step = self.step
        super().reset()
        self.step = step

    def _masks(self, n: int) -> tuple[Any, Any]:
        if n not in self._token_masks:
            fg = mask_tokens(self.ref_mask, n, self.latent_hw)
            bg = ~mask_tokens(self.base_mask, n, self.latent_hw)
            self._token_masks[n] = (bg, fg)
        return self._token_masks[n]

    def on_qkv(self, ctx: AttentionContext) -> Any:
        import torch

        if ctx.place != "up" or ctx.kind != "self" or self.phase == "off":
            return None
        if self.phase == "save":
            self.bank.put(self.step, ctx.name, ctx.key, ctx.value)
            return None
        if not self.active:
            return None
        q, k, v = ctx.query, ctx.key, ctx.value
        assert q is not None and k is not None and v is not None
        h, b = ctx.heads, ctx.batch_size
        kr, vr = self.bank.get(self.step, ctx.name, device=k.device, dtype=k.dtype)
        if self.mode in ("replace", "concat"):
            ks, vs = kr[:h], vr[:h]  # the source image's rows
            ks, vs = ks.repeat(b, 1, 1), vs.repeat(b, 1, 1)
            if self.mode == "replace":
                k, v = ks, vs
            else:
                k, v = torch.cat([k, ks], dim=1), torch.cat([v, vs], dim=1)
        else:  # mix: base outside its mask ++ reference inside its mask
            if kr.shape[0] < 2 * h:
                raise ValueError("memory bank mode 'mix' needs the base and the reference inverted together")
            bg, fg = self._masks(int(kr.shape[1]))
            bg, fg = bg.to(kr.device), fg.to(kr.device)
            if not bool(bg.any()) and not bool(fg.any()):
                bg = torch.ones_like(bg)  # degenerate masks: the base's own keys
            k = torch.cat([kr[:h][:, bg], kr[h:2 * h][:, fg]], dim=1).repeat(b, 1, 1)
            v = torch.cat([vr[:h][:, bg], vr[h:2 * h][:, fg]], dim=1).repeat(b, 1, 1)
        self.applied += 1
        return q, k, v


# ---------------------------------------------------------------------------------------------
# Image prompt: diffusers' IPAdapterAttnProcessor2_0 on the cross-attention layers
# ---------------------------------------------------------------------------------------------
def _hidden_size(unet: Any, name: str) -> int:
    """The channel width of the attention layer ``name`` (diffusers' own rule in
    ``_convert_ip_adapter_attn_to_diffusers``)."""
    channels = list(unet.config.block_out_channels)
    if name.startswith("mid_block"):
        return channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(channels))[int(name.split(".")[1])]
    if name.startswith("down_blocks"):
        return channels[int(name.split(".")[1])]
    raise ValueError(f"unexpected attention layer {name!r}")


def image_prompt_processors(unet: Any, ip_state: Mapping[str, Any], num_tokens: int, scale: float = 0.0,
                            *, source: str = "ip_adapter") -> dict[str, Any]:
    """One ``IPAdapterAttnProcessor2_0`` per cross-attention layer of ``unet`` (keyed by processor
    name), its ``to_k_ip`` / ``to_v_ip`` loaded from ``ip_state`` (IP-Adapter layout), on the UNet's
    device and dtype. A missing or mis-shaped key is an error naming ``source``."""
    import torch
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    p = next(unet.parameters())
    cross_dim = int(unet.config.cross_attention_dim)
    procs: dict[str, Any] = {}
    key_id = 1
    for key in unet.attn_processors:
        name = key[: -len(".processor")] if key.endswith(".processor") else key
        if key.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(unet, name)
        proc = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=cross_dim,
                                         num_tokens=(int(num_tokens),), scale=float(scale))
        state = {}
        for part in ("to_k_ip", "to_v_ip"):
            w = ip_state.get(f"{key_id}.{part}.weight")
            if w is None:
                raise KeyError(f"{source}: no '{key_id}.{part}.weight' for cross-attention layer {name!r} "
                               f"(is this an SD 1.5 image-prompt checkpoint?)")
            if tuple(w.shape) != (hidden, cross_dim):
                raise ValueError(f"{source}: '{key_id}.{part}.weight' has shape {tuple(w.shape)}, layer {name!r} "
                                 f"needs {(hidden, cross_dim)}")
            state[f"{part}.0.weight"] = w
        proc.load_state_dict(state)
        procs[key] = proc.to(device=p.device, dtype=p.dtype).requires_grad_(False)
        key_id += 2
    return procs


def set_image_scale(procs: Mapping[str, Any] | None, scale: float) -> None:
    """Gate the image branch: gamma for every processor (0 skips the branch)."""
    for proc in (procs or {}).values():
        proc.scale = [float(scale)]


@contextlib.contextmanager
def dragon_processors(unet: Any, controller: MemoryBankController | None,
                      ip_procs: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Install the memory-bank controller on every self-attention layer (``EditingAttnProcessor``)
    and the image-prompt processors on the cross-attention layers; other layers keep their
    processors. Everything is put back on exit (the UNet is shared). With neither, nothing is
    touched."""
    if controller is None and not ip_procs:
        yield
        return
    original = dict(unet.attn_processors)
    procs: dict[str, Any] = {}
    n_self = 0
    for key, proc in original.items():
        name = key[: -len(".processor")] if key.endswith(".processor") else key
        if controller is not None and layer_kind_from_name(name) == "self":
            procs[key] = EditingAttnProcessor(controller, name=name)
            n_self += 1
        elif ip_procs is not None and key in ip_procs:
            procs[key] = ip_procs[key]
        else:
            procs[key] = proc
    unet.set_attn_processor(dict(procs))  # diffusers pops from the dict it is given
    if controller is not None:
        controller.num_layers = n_self
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))
