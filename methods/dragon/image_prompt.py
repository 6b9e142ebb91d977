"""DiffEditor's image-prompt encoder (paper sec. 3.3, Fig. 4; code ``src/models/dragondiff.py``:
``init_proj`` / ``get_image_embeds`` / ``load_adapter``).

- Image encoder: OpenCLIP ViT-H/14 as a transformers ``CLIPVisionModelWithProjection``
  (``h94/IP-Adapter``, subfolder ``models/image_encoder``); its **penultimate** hidden state
  (257 tokens x 1280) is used. Input: the image resized to 256 x 256 (PIL bicubic), then
  ``CLIPImageProcessor()`` (resize 224, centre crop, OpenAI mean / std).
- Projection: a Perceiver resampler (code: depth 4, 12 heads x 64, 64 queries, 1280 -> 768,
  ff_mult 4; the paper describes an N = 8 block QFormer without self-attention, the released
  checkpoint is the resampler). The checkpoint ``ip_sd15_64.bin`` has IP-Adapter-Plus's layout
  (``image_proj``: ``latents``, ``proj_in``, ``layers.{i}.0`` attention, ``layers.{i}.1`` FFN,
  ``proj_out``, ``norm_out``; ``ip_adapter``: per-layer ``to_k_ip`` / ``to_v_ip``), so diffusers'
  own ``IPAdapterPlusImageProjection`` is built from it by diffusers' own converter
  (``UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers``, which reads depth,
  heads, queries and widths from the tensors and does not modify the UNet).
- Unconditional image tokens: the encoder on an all-zero (already normalised) image, as the code.
- Reference tasks (paste, appearance): the tokens of the base and of the reference are
  concatenated (64 + 64), as ``demo/model.py:run_appearance``.

The weights are read from a LOCAL file (``method.ip_weights``); the encoder from a hub id / local
folder (``method.image_encoder``). Missing ones raise :class:`MissingWeights` naming the parameter.
:func:`tiny_image_prompt` builds random-weight stand-ins of the same classes (and writes a
checkpoint in the released layout, loaded through the same reader) for tests and tiny runs.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Mapping

from ..diffusion.loading import MissingWeights, downloads_allowed

PROMPT_SIZE = 256  # dragondiff.py: img.resize((256, 256)) before the CLIP processor
IMAGE_ENCODER_ID = "h94/IP-Adapter"
IMAGE_ENCODER_SUBFOLDER = "models/image_encoder"


@dataclasses.dataclass
class ImagePrompt:
    """The encoder, its processor, the projection and the per-layer image K/V weights."""

    encoder: Any  # transformers CLIPVisionModelWithProjection
    processor: Any  # transformers CLIPImageProcessor
    projection: Any  # diffusers IPAdapterPlusImageProjection
    ip_state: Mapping[str, Any]  # "{k}.to_k_ip.weight" / "{k}.to_v_ip.weight"
    label: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.projection.latents.shape[1])

    def encode(self, images: list[Any]) -> tuple[Any, Any]:
        """(cond, uncond) image tokens ``[1, num_tokens * len(images), D]`` of PIL ``images``."""
        import torch
        from PIL import Image

        p = next(self.encoder.parameters())
        conds, unconds = [], []
        with torch.no_grad():
            for im in images:
                small = im.convert("RGB").resize((PROMPT_SIZE, PROMPT_SIZE), Image.BICUBIC)
                pix = self.processor(images=[small], return_tensors="pt").pixel_values.to(p.device, p.dtype)
                h = self.encoder(pix, output_hidden_states=True).hidden_states[-2]
                conds.append(self.projection(h))
                h0 = self.encoder(torch.zeros_like(pix), output_hidden_states=True).hidden_states[-2]
                unconds.append(self.projection(h0))
        return torch.cat(conds, dim=1), torch.cat(unconds, dim=1)

    def processors(self, unet: Any, scale: float = 0.0) -> dict[str, Any]:
        from .attention import image_prompt_processors

        return image_prompt_processors(unet, self.ip_state, self.num_tokens, scale, source=self.label or "ip_weights")


def read_ip_checkpoint(path: str, *, param: str = "method.ip_weights") -> tuple[dict[str, Any], dict[str, Any]]:
    """(image_proj state, ip_adapter state) of an IP-Adapter-layout checkpoint: a torch file with
    ``{"image_proj": ..., "ip_adapter": ...}`` or a safetensors file with ``image_proj.*`` /
    ``ip_adapter.*`` keys (diffusers' loader accepts both)."""
    import torch

    if not path:
        raise MissingWeights(f"'{param}' is not set: DiffEditor's image prompt needs the released encoder weights "
                             f"ip_sd15_64.bin (Hugging Face 'Adapter/DragonDiffusion', file model/ip_sd15_64.bin) "
                             f"as a local file, or image_prompt=false")
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise MissingWeights(f"'{param}' = {path!r} does not exist: download ip_sd15_64.bin from Hugging Face "
                             f"'Adapter/DragonDiffusion' (model/ip_sd15_64.bin) and point {param} at it, "
                             f"or set image_prompt=false")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        flat = load_file(path, device="cpu")
        state: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
        for k, v in flat.items():
            head, _, rest = k.partition(".")
            if head in state:
                state[head][rest] = v
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or "image_proj" not in state or "ip_adapter" not in state:
        raise ValueError(f"'{param}' = {path!r}: not an image-prompt checkpoint (needs 'image_proj' and 'ip_adapter')")
    return dict(state["image_proj"]), dict(state["ip_adapter"])


def build_projection(unet: Any, image_proj_state: Mapping[str, Any], *, param: str = "method.ip_weights") -> Any:
    """diffusers' ``IPAdapterPlusImageProjection`` from the released layout (diffusers' converter)."""
    if "latents" not in image_proj_state or "proj_in.weight" not in image_proj_state:
        raise ValueError(f"'{param}': image_proj is not a resampler (no 'latents' / 'proj_in.weight')")
    proj = unet._convert_ip_adapter_image_proj_to_diffusers(dict(image_proj_state), low_cpu_mem_usage=False)
    p = next(unet.parameters())
    return proj.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)


def load_image_prompt(unet: Any, weights: str | None, encoder: str = IMAGE_ENCODER_ID,
                      subfolder: str = IMAGE_ENCODER_SUBFOLDER, *, allow_downloads: bool = False,
                      weights_param: str = "method.ip_weights",
                      encoder_param: str = "method.image_encoder") -> ImagePrompt:
    """The released image prompt: encoder from ``encoder`` (hub id or local folder; a folder that
    holds ``subfolder`` or is itself the encoder folder), projection and image K/V weights from the
    local file ``weights``."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    proj_state, ip_state = read_ip_checkpoint(weights or "", param=weights_param)
    p = next(unet.parameters())
    src = os.path.expanduser(str(encoder))
    kwargs: dict[str, Any] = {"torch_dtype": p.dtype}
    if os.path.isdir(src):
        if subfolder and os.path.isdir(os.path.join(src, subfolder)):
            kwargs["subfolder"] = subfolder
    else:
        kwargs["subfolder"] = subfolder
        kwargs["local_files_only"] = not downloads_allowed(allow_downloads)
    try:
        enc = CLIPVisionModelWithProjection.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise MissingWeights(f"'{encoder_param}' = {encoder!r} (subfolder {subfolder!r}): the OpenCLIP ViT-H/14 image "
                             f"encoder could not be loaded ({type(e).__name__}: {first}); "
                             f"put the h94/IP-Adapter snapshot in the hub cache or point {encoder_param} at a local "
                             f"folder") from e
    enc = enc.to(p.device).eval().requires_grad_(False)
    proj = build_projection(unet, proj_state, param=weights_param)
    return ImagePrompt(enc, CLIPImageProcessor(), proj, ip_state, label=weights_param)


# ---------------------------------------------------------------------------------------------
# Tiny random-weight stand-ins (tests, backbone=tiny)
# ---------------------------------------------------------------------------------------------
TINY_ENCODER_SIZE = 32
TINY_QUERIES = 8
TINY_HIDDEN = 64  # one head of 64 (diffusers' converter reads heads = width // 64)


def tiny_ip_state(unet: Any, embed_dim: int, *, queries: int = TINY_QUERIES, hidden: int = TINY_HIDDEN,
                  depth: int = 4, ff_mult: int = 4, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Random tensors in the released checkpoint's layout (IP-Adapter-Plus resampler + per-layer
    to_k_ip / to_v_ip) for ``unet``: what :func:`read_ip_checkpoint` reads."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out_dim = int(unet.config.cross_attention_dim)

    def r(*shape: int, scale: float = 0.2) -> Any:
        return torch.randn(*shape, generator=g) * scale

    proj: dict[str, Any] = {
        "latents": r(1, queries, hidden), "proj_in.weight": r(hidden, embed_dim), "proj_in.bias": r(hidden),
        "proj_out.weight": r(out_dim, hidden), "proj_out.bias": r(out_dim),
        "norm_out.weight": 1 + r(out_dim, scale=0.05), "norm_out.bias": r(out_dim, scale=0.05),
    }
    for i in range(depth):
        pre = f"layers.{i}."
        proj.update({
            pre + "0.norm1.weight": 1 + r(hidden, scale=0.05), pre + "0.norm1.bias": r(hidden, scale=0.05),
            pre + "0.norm2.weight": 1 + r(hidden, scale=0.05), pre + "0.norm2.bias": r(hidden, scale=0.05),
            pre + "0.to_q.weight": r(hidden, hidden), pre + "0.to_kv.weight": r(2 * hidden, hidden),
            pre + "0.to_out.weight": r(hidden, hidden),
            pre + "1.0.weight": 1 + r(hidden, scale=0.05), pre + "1.0.bias": r(hidden, scale=0.05),
            pre + "1.1.weight": r(hidden * ff_mult, hidden), pre + "1.3.weight": r(hidden, hidden * ff_mult),
        })
    ip: dict[str, Any] = {}
    key_id = 1
    from .attention import _hidden_size

    for key in unet.attn_processors:
        if key.endswith("attn1.processor"):
            continue
        width = _hidden_size(unet, key[: -len(".processor")])
        ip[f"{key_id}.to_k_ip.weight"] = r(width, out_dim)
        ip[f"{key_id}.to_v_ip.weight"] = r(width, out_dim)
        key_id += 2
    return {"image_proj": proj, "ip_adapter": ip}


def tiny_image_prompt(unet: Any, folder: str | None = None, seed: int = 0) -> ImagePrompt:
    """A random-weight image prompt of the released classes for ``unet`` (tiny CLIP vision tower,
    32 x 32 input; resampler with 8 queries), its checkpoint written to ``folder`` (a temporary one
    by default) and read back by :func:`load_image_prompt`'s reader."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                              image_size=TINY_ENCODER_SIZE, patch_size=4, projection_dim=32, layer_norm_eps=1e-5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = CLIPVisionModelWithProjection(config)
    folder = folder or tempfile.mkdtemp(prefix="tiny_ip_")
    path = os.path.join(folder, "tiny_ip_sd15.bin")
    torch.save(tiny_ip_state(unet, config.hidden_size, seed=seed), path)
    proj_state, ip_state = read_ip_checkpoint(path)
    p = next(unet.parameters())
    enc = enc.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_ENCODER_SIZE},
                                   crop_size={"height": TINY_ENCODER_SIZE, "width": TINY_ENCODER_SIZE})
    return ImagePrompt(enc, processor, build_projection(unet, proj_state), ip_state,
                       label="tiny image prompt (random weights)")
