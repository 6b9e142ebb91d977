"""Tiny random-weight diffusion backbones for tests and smoke runs (``backbone=tiny``).

Every factory builds the *real* diffusers / transformers classes (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``CLIPTokenizer``,
``DDIMScheduler`` / ``EulerDiscreteScheduler``, and for Paint-by-Example diffusers'
``PaintByExampleImageEncoder`` with a transformers ``CLIPImageProcessor``) from small configs, so a
pipeline assembled from them runs the same code paths as Stable Diffusion 1.5, InstructPix2Pix,
SD inpainting, SDXL, SDXL inpainting and Paint-by-Example, only with a few thousand random
parameters. They are shaped like the real ones where it sets the cost and the code paths: the
VAE has as many down blocks as SD's (four; spatial factor 8, 4 latent channels), so a tiny run at
a working size sees latents of the real models' size for it; only the channel counts are tiny.
Initialisation is seeded inside ``torch.random.fork_rng`` so the weights are identical in every
process and the caller's RNG state is untouched.

``backbone=tiny`` also switches the adapters' ``"auto"`` parameters to small values
(:data:`TINY_RESOLUTION`, :data:`TINY_STEPS` and method-specific ones; see
``methods._diffusion_common.auto_field``), so that a smoke run takes seconds per edit.

Outputs made with these backbones are noise: every result must carry
:data:`RANDOM_WEIGHTS_LABEL` (``loading.load_pipeline`` sets it as ``weights_label``).

The tokenizer is a hand-written byte-level BPE vocabulary (see :func:`write_tiny_tokenizer`)
written to a temporary folder and loaded with transformers' ``CLIPTokenizer``; it tokenizes any
text (every byte has a token) and decodes lower-case words back to themselves.

No torch / diffusers / transformers import happens at module import time.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
import threading
from typing import Any

RANDOM_WEIGHTS_LABEL = "RANDOM WEIGHTS (tiny backbone, smoke run)"
TINY_KINDS = ("sd15", "ip2p", "sdxl", "inpaint", "sdxl_inpaint", "paint_by_example")
TINY_SEED = 0
MODEL_MAX_LENGTH = 77  # the CLIP text context length, as in the real models
# The VAE's spatial downsampling, as in SD 1.x / 2.x / XL (2 ** (number of down blocks - 1)).
VAE_SCALE_FACTOR = 8
# backbone=tiny defaults of the "auto" parameters: working size 64 x 64 (8 x 8 latents: every
# level of the tiny UNets sees at least 2 x 2; a multiple of LEDITS++'s 32) and 4 sampling steps
# (so that fractions of the schedule, e.g. SDEdit's strength 0.8 or P2P's 0.8 / 0.5 replace
# steps, still select a non-empty, proper part of it).
TINY_RESOLUTION = 64
TINY_STEPS = 4
# torch intra-op threads of a tiny edit (methods._diffusion_common.tiny_threads): its ops are too
# small to split across threads.
TINY_TORCH_THREADS = 1

# Merges of the hand-written BPE: a handful of frequent English pieces so that the tokenizer
# exercises real merging (not only single bytes). Any text still tokenizes without them.
_MERGES = (
    "t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>", "o f</w>",
    "e r</w>", "o n</w>", "t o</w>", "i s</w>", "e d</w>", "r e", "a t</w>",
)

_COMPONENTS: dict[str, dict[str, Any]] = {}
_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def _byte_unicode_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in character for each of the 256 byte values, by byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:  # unprintable bytes map past 255, in byte order
            table[b] = 256 + extra
            extra += 1
    return [chr(table[b]) for b in range(256)]


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """The hand-written BPE vocabulary and merges of the tiny CLIP tokenizer.

    Vocabulary: each byte's character, the same with the word-end marker ``</w>``, the result of
    every merge in :data:`_MERGES`, then ``<|startoftext|>`` and ``<|endoftext|>`` (last, as in
    CLIP's own vocabulary).
    """
    chars = _byte_unicode_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for m in _MERGES:
        a, b = m.split(" ")
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, list(_MERGES)


def write_tiny_tokenizer(folder: str | os.PathLike) -> str:
    """Write ``vocab.json`` and ``merges.txt`` of the tiny CLIP tokenizer into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    vocab, merges = tiny_vocab()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder)


def tiny_tokenizer() -> Any:
    """A ``transformers.CLIPTokenizer`` loaded from the tiny vocabulary written to a temp folder."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="edit-harness-tiny-tok-") as d:
        write_tiny_tokenizer(d)
        return CLIPTokenizer.from_pretrained(d, model_max_length=MODEL_MAX_LENGTH)


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------
def _text_config(tokenizer: Any, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,  # >= 2 so clip_skip / SDXL's penultimate layer exist
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        layer_norm_eps=1e-5,
    )


def _ddim_sd15() -> Any:
    """DDIM with the scheduler values of Stable Diffusion 1.5's ``scheduler_config.json``."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _euler_sdxl() -> Any:
    """Euler with the scheduler values of SDXL base 1.0's ``scheduler_config.json``."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
        use_karras_sigmas=False,
    )


def _vae(scaling_factor: float) -> Any:
    """A four-level AutoencoderKL laid out like SD's (four down / up blocks: spatial factor
    :data:`VAE_SCALE_FACTOR` = 8, 4 latent channels, an attention mid block), with 32-64 channels
    (SD: 128-512) and one resnet per level (SD: two)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _sd_unet(in_channels: int) -> Any:
    """A three-level UNet laid out like SD 1.5's (cross-attention at the two finer levels and in
    the middle block, a plain block at the coarsest level), with 32-64 channels."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // VAE_SCALE_FACTOR,  # pipelines' default size: this x 8 pixels
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,  # SD 1.5's config value (diffusers reads it as the head count)
        norm_num_groups=32,
    )


def _sdxl_unet(in_channels: int = 4) -> Any:
    """A two-level SDXL-style UNet: linear projections, ``text_time`` added conditioning whose
    input size is 6 time ids x ``addition_time_embed_dim`` + the pooled text embedding (32).
    ``in_channels`` 9 = the SDXL inpainting layout (noisy latent + mask + masked-image latent)."""
    from diffusers import UNet2DConditionModel

    time_dim = 8
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // VAE_SCALE_FACTOR,  # pipelines' default size: this x 8 pixels
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + 32,
        cross_attention_dim=64,  # the two text encoders' hidden states concatenated (32 + 32)
        norm_num_groups=32,
    )


# Paint-by-Example's example-image encoder: a CLIP vision tower (32 x 32 input, 4 x 4 patches),
# whose projection (PROJ) is the UNet's cross-attention width, as 768 is in the real model.
_PBE_IMAGE_SIZE = 32
_PBE_PROJ = 32


def _pbe_image_encoder() -> Any:
    """diffusers' ``PaintByExampleImageEncoder`` on a small ``CLIPVisionConfig``: 5 vision layers,
    so that its mapper has (5 + 1) // 5 = 1 transformer block, projecting to :data:`_PBE_PROJ`."""
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        image_size=_PBE_IMAGE_SIZE,
        patch_size=4,
        projection_dim=_PBE_PROJ,
        layer_norm_eps=1e-5,
    )
    return PaintByExampleImageEncoder(config, proj_size=_PBE_PROJ)


def _pbe_feature_extractor() -> Any:
    """A ``CLIPImageProcessor`` built in code (no download): CLIP's resize (shortest edge,
    bicubic), center crop and OpenAI mean / std, at the tiny encoder's input size."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": _PBE_IMAGE_SIZE},
                              crop_size={"height": _PBE_IMAGE_SIZE, "width": _PBE_IMAGE_SIZE})


def _build(kind: str) -> dict[str, Any]:
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        if kind in ("sd15", "ip2p", "inpaint"):
            # sd15: noisy latent; ip2p: + image latent; inpaint: + mask (1) + masked-image latent (4)
            unet = _sd_unet(in_channels={"sd15": 4, "ip2p": 8, "inpaint": 9}[kind])
            vae = _vae(scaling_factor=0.18215)
            text_encoder = CLIPTextModel(_text_config(tokenizer))
            parts: dict[str, Any] = dict(
                unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_ddim_sd15()
            )
        elif kind in ("sdxl", "sdxl_inpaint"):
            # sdxl: noisy latent; sdxl_inpaint: + mask (1) + masked-image latent (4)
            unet = _sdxl_unet(in_channels={"sdxl": 4, "sdxl_inpaint": 9}[kind])
            vae = _vae(scaling_factor=0.13025)
            text_encoder = CLIPTextModel(_text_config(tokenizer))
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=32))
            parts = dict(
                unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=copy.deepcopy(tokenizer), scheduler=_euler_sdxl(),
            )
        elif kind == "paint_by_example":
            # Conditioned on the example image, not on text: no tokenizer / text encoder. The UNet
            # is SD 1.5-inpainting-like (9 channels); its cross-attention width is the encoder's
            # projection (32, like _sd_unet's cross_attention_dim).
            image_encoder = _pbe_image_encoder()
            unet = _sd_unet(in_channels=9)
            assert unet.config.cross_attention_dim == image_encoder.proj_size
            parts = dict(
                unet=unet, vae=_vae(scaling_factor=0.18215), image_encoder=image_encoder,
                feature_extractor=_pbe_feature_extractor(), scheduler=_ddim_sd15(),
            )
        else:
            raise ValueError(f"unknown tiny backbone kind {kind!r}; known: {', '.join(TINY_KINDS)}")
    for v in parts.values():
        if isinstance(v, torch.nn.Module):
            v.eval().requires_grad_(False)
    return parts


def tiny_components(kind: str) -> dict[str, Any]:
    """Fresh copies of the tiny components of ``kind`` (one of :data:`TINY_KINDS`).

    The components are built once per process and cached; each call returns deep copies, so a
    pipeline that moves its modules to another device / dtype or sets scheduler timesteps never
    affects another pipeline.
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny backbone kind {kind!r}; known: {', '.join(TINY_KINDS)}")
    with _LOCK:
        if kind not in _COMPONENTS:
            _COMPONENTS[kind] = _build(kind)
        return {k: copy.deepcopy(v) for k, v in _COMPONENTS[kind].items()}


def tiny_sd15() -> dict[str, Any]:
    """Stable Diffusion 1.5-like components: unet (4 input channels), vae, text_encoder,
    tokenizer, scheduler (DDIM, SD 1.5 values)."""
    return tiny_components("sd15")


def tiny_ip2p() -> dict[str, Any]:
    """InstructPix2Pix-like components: as :func:`tiny_sd15` with an 8-input-channel UNet
    (noisy latent + image latent)."""
    return tiny_components("ip2p")


def tiny_inpaint() -> dict[str, Any]:
    """Stable Diffusion inpainting-like components: as :func:`tiny_sd15` with a 9-input-channel
    UNet (noisy latent + mask + masked-image latent), as in ``stable-diffusion-inpainting``."""
    return tiny_components("inpaint")


def tiny_sdxl() -> dict[str, Any]:
    """SDXL-like components: unet (``text_time`` conditioning), vae, text_encoder,
    text_encoder_2 (with projection), tokenizer, tokenizer_2, scheduler (Euler, SDXL values)."""
    return tiny_components("sdxl")


def tiny_sdxl_inpaint() -> dict[str, Any]:
    """SDXL inpainting-like components: as :func:`tiny_sdxl` with a 9-input-channel UNet (noisy
    latent + mask + masked-image latent), as in ``stable-diffusion-xl-1.0-inpainting-0.1``."""
    return tiny_components("sdxl_inpaint")


def tiny_paint_by_example() -> dict[str, Any]:
    """Paint-by-Example-like components: unet (9 input channels, cross-attention width = the image
    encoder's projection), vae, image_encoder (diffusers' ``PaintByExampleImageEncoder``),
    feature_extractor (``CLIPImageProcessor``), scheduler (DDIM, SD 1.5 values)."""
    return tiny_components("paint_by_example")


def tiny_kind_for(pipeline_cls: type) -> str:
    """The tiny backbone that fits a pipeline class: ``ip2p`` for InstructPix2Pix pipelines,
    ``paint_by_example`` for Paint-by-Example, ``sdxl_inpaint`` for SDXL inpainting ones,
    ``sdxl`` for the other SDXL ones, ``inpaint`` for the other inpainting ones, else ``sd15``."""
    name = pipeline_cls.__name__
    if "InstructPix2Pix" in name:
        return "ip2p"
    if "PaintByExample" in name:
        return "paint_by_example"
    if "XL" in name:
        return "sdxl_inpaint" if "Inpaint" in name else "sdxl"
    if "Inpaint" in name:
        return "inpaint"
    return "sd15"


# Components no pipeline runs without, even where diffusers lists them as optional (the SDXL
# pipelines list their text encoders / tokenizers, which refiner checkpoints omit): a kind that
# lacks one is an error, not a None.
_CORE_COMPONENTS = frozenset({"unet", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"})


def tiny_pipeline(kind: str, pipeline_cls: type) -> Any:
    """Assemble ``pipeline_cls`` from fresh tiny components of ``kind``.

    Components the class does not take are dropped; the kind's own components come first
    (``paint_by_example`` builds its ``image_encoder`` and ``feature_extractor``); optional ones
    the kind lacks are filled in: ``safety_checker`` / ``feature_extractor`` / ``image_encoder`` = None,
    ``requires_safety_checker`` = False, an ``inverse_scheduler`` (DiffEdit) = DDIM inverse
    built from the scheduler's config, and any other component the class lists as optional
    (``_optional_components``) = None, except the core ones (UNet, VAE, scheduler, text encoders,
    tokenizers). A required or core component that the kind lacks is an error.
    """
    parts = tiny_components(kind)
    sig = inspect.signature(pipeline_cls.__init__)
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    fill: dict[str, Any] = {
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }
    kwargs: dict[str, Any] = {}
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in parts:
            kwargs[name] = parts[name]
        elif name in fill:
            kwargs[name] = fill[name]
        elif name == "inverse_scheduler":
            from diffusers import DDIMInverseScheduler

            kwargs[name] = DDIMInverseScheduler.from_config(parts["scheduler"].config)
        elif name in getattr(pipeline_cls, "_optional_components", ()) and name not in _CORE_COMPONENTS:
            kwargs[name] = None  # e.g. Pix2Pix-Zero's caption_generator / caption_processor
        elif p.default is inspect.Parameter.empty:
            raise TypeError(
                f"{pipeline_cls.__name__} needs component '{name}', which the tiny '{kind}' backbone "
                f"does not build (it has {', '.join(sorted(parts))})"
            )
    pipe = pipeline_cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
