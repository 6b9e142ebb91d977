"""PartEdit's part-token training: optimise a ``(2, D)`` token whose cross-attention matches part masks.

What the paper (Sec. 3.1-3.2, Appendix K) and the released training code (``11314/PartEdit`` at
876d8fe59f1f: ``src/unified_training.py``, ``src/main_logic.py``, ``configs/quadruped_head.yaml``)
do, and what this module does the same way:

1. Each training image goes through SDXL img2img at ``strength`` 0.25 (the last 12 of 50
   scheduler steps), guidance 7.5, the empty prompt, with no gradients. At the hooked
   cross-attention layers (``up_blocks.0.attentions.0.transformer_blocks.0-7.attn2``: the paper's
   "first 8 decoder layers") the *queries* are recorded — the code's OVAM hooker keeps the
   unconditional row of the guidance batch and applies ``to_q`` to it. Here the shared attention
   plumbing does the recording: :class:`QueryCapture`, a controller at the ``"qkv"`` hook.
2. The token's maps are then recomputed from those queries at every epoch, with gradients, as the
   code's OVAM evaluator does (no UNet pass per epoch): per layer and image, the attention
   *scores* ``scale * q k^T`` of the two token rows (``k = to_k(token)``; no softmax), summed over
   heads and steps, bilinearly resized to the largest layer grid, averaged over layers, resized to
   the mask size (1024 for SDXL); then min-max normalised over the whole batch (eps 1e-8).
   Because heads and steps are summed, ``sum_t sum_h scale q_th k_h^T = scale (sum_t q_t) k^T``:
   we keep one step-summed query matrix per layer and image (exactly the same maps, 12 x less
   memory than keeping every step).
3. The target is ``[1 - mask, mask]`` (row 0 = background token, row 1 = part token; masks
   binarised at 0.5 after resizing); the loss is the code's default MSE (``l2``) or the paper's BCE
   (``loss="bce"``, Eq. 3, on the min-max normalised maps as the code computes it); AdamW at
   lr 30, StepLR(80, 0.7), 2000 full-batch epochs, a seeded random normal init
   (``torch.randn_like``).

Tiny backbone: its UNet's decoder has 4 cross-attention layers, so the 8 hooked layers fall back
to all 4 (``info["layers_note"]`` says so), and maps are at the tiny grids.

Command: ``python -m methods.partedit.train --images DIR --masks DIR --out token.pt`` (also writes
``token.pt.json``: the settings, layers, per-epoch losses and which weights were used).
No torch import at module import time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from ..diffusion.attention import AttentionContext, AttentionController, BatchLayout, attention_control
from .mask import select_layers
from .tokens import random_part_token, save_part_token

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "LOSSES",
    "QueryCapture",
    "TrainConfig",
    "TrainResult",
    "load_dataset_pairs",
    "load_training_pairs",
    "main",
    "token_maps",
    "train_part_token",
]

#: ``loss=`` values: the code's ``l2`` (default) and the paper's BCE. The code's other options are
#: not offered: ``bcelog`` scales the target by the maps' maximum (targets > 1 make BCE-with-logits
#: unbounded below: the loss runs to -inf), ``nll`` / ``cross`` treat the two rows as classes of a
#: softmax the maps never went through.
LOSSES = ("mse", "bce")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


@dataclass
class TrainConfig:
    """Token-training settings; defaults are the released code's (``configs/quadruped_head.yaml``).

    ``image_size`` / ``mask_size``: None = the pipeline's default size (1024 for SDXL, the code's
    ``resize``). ``layer_set``: :func:`methods.partedit.mask.select_layers`'s ``"paper"`` set = the
    8 hooked layers. ``rows``: which guidance row's queries are recorded (``"uncond"``, the OVAM
    hooker's default, or ``"cond"``).
    """

    epochs: int = 2000
    lr: float = 30.0
    step_size: int = 80
    gamma: float = 0.7
    loss: str = "mse"
    optimizer: str = "adamw"
    strength: float = 0.25
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    prompt: str = ""
    image_size: int | None = None
    mask_size: int | None = None
    layer_set: str = "paper"
    rows: str = "uncond"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(
                f"strength {self.strength} x {self.num_inference_steps} steps runs no denoising step"
            )
        if self.rows not in ("uncond", "cond"):
            raise ValueError(f"rows must be 'uncond' or 'cond', got {self.rows!r}")
        for name in ("image_size", "mask_size"):
            v = getattr(self, name)
            if v is not None and v < 8:
                raise ValueError(f"{name} must be >= 8 pixels, got {v}")


@dataclass
class TrainResult:
    """The trained ``(2, D)`` token (CPU float32), the loss of every epoch (before its update)
    and what was used (layers, steps, sizes, settings)."""

    token: "torch.Tensor"
    losses: list[float]
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Query capture (shared attention plumbing)
# ---------------------------------------------------------------------------


class QueryCapture(AttentionController):
    """Records, at the ``"qkv"`` hook of the chosen cross-attention layers, the queries of one
    guidance row, summed over the steps: per layer an ``(N, heads * d)`` float32 matrix (the
    per-head layout put back together), with the layer's module, grid and step count."""

    def __init__(self, layers: Sequence[str], rows: str = "uncond", aspect: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.layers = tuple(layers)
        self.rows = rows
        self.aspect = aspect
        self.sums: dict[str, "torch.Tensor"] = {}
        self.calls: dict[str, int] = {}
        self.modules: dict[str, Any] = {}
        self.grids: dict[str, tuple[int, int]] = {}

    def clear(self) -> None:
        """Forget the recorded queries (between images)."""
        self.sums, self.calls = {}, {}

    def _row(self, layout: BatchLayout) -> int:
        if self.rows in layout.guidance:
            return layout.rows(self.rows)[0]
        return 0  # no guidance batch (guidance_scale <= 1): the only row

    def on_qkv(self, ctx: AttentionContext):
        import torch

        if ctx.kind != "cross" or ctx.name not in self.layers:
            return None
        assert ctx.query is not None
        row = self._row(ctx.layout)
        q = ctx.query[ctx.head_rows(row)].detach().to(torch.float32)  # (heads, N, d)
        q = q.permute(1, 0, 2).reshape(q.shape[1], -1)  # (N, heads * d): diffusers' batch_to_head_dim
        self.sums[ctx.name] = self.sums[ctx.name] + q if ctx.name in self.sums else q.clone()
        self.calls[ctx.name] = self.calls.get(ctx.name, 0) + 1
        self.modules[ctx.name] = ctx.attn
        self.grids[ctx.name] = ctx.token_grid(self.aspect)
        return None


# ---------------------------------------------------------------------------
# Maps with gradients
# ---------------------------------------------------------------------------


@dataclass
class _LayerKeys:
    name: str
    weight: "torch.Tensor"  # to_k weight, float32, detached
    bias: "torch.Tensor | None"
    scale: float
    grid: tuple[int, int]


def token_maps(
    token: "torch.Tensor",
    queries: Sequence[Sequence["torch.Tensor"]],
    layers: Sequence[_LayerKeys],
    size: tuple[int, int],
) -> "torch.Tensor":
    """The token's maps ``(images, 2, H, W)`` (not normalised) from step-summed queries:
    per layer ``scale * Q k^T`` (the code's pre-softmax scores summed over heads and steps),
    resized (bilinear) to the largest layer grid, averaged over layers, resized to ``size``."""
    import torch
    import torch.nn.functional as F

    big = (max(l.grid[0] for l in layers), max(l.grid[1] for l in layers))
    out = []
    for per_image in queries:
        acc = None
        for q, lk in zip(per_image, layers):
            k = F.linear(token, lk.weight, lk.bias)  # (2, inner)
            s = (q @ k.T) * lk.scale  # (N, 2)
            m = s.T.reshape(1, 2, *lk.grid)
            if lk.grid != big:
                m = F.interpolate(m, size=big, mode="bilinear", align_corners=False)
            acc = m if acc is None else acc + m
        assert acc is not None
        acc = acc / len(layers)
        if big != size:
            acc = F.interpolate(acc, size=size, mode="bilinear", align_corners=False)
        out.append(acc[0])
    return torch.stack(out)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _default_size(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def _mask_tensor(mask: Any, size: tuple[int, int], label: str) -> "torch.Tensor":
    """A mask (PIL image or array, any value range with 0 = background) resized bilinearly to
    ``size`` and binarised at 0.5 (the training data loader's rule), as float32 ``(H, W)``."""
    import torch

    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(mask, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[..., 0] if arr.shape[-1] in (1, 3, 4) else arr[0]
        if arr.ndim != 2:
            raise ValueError(f"{label}: mask must be 2-D, got shape {arr.shape}")
        if arr.size and arr.max() > 1.0:
            arr = arr / 255.0
    pil = Image.fromarray(arr.astype(np.float32), mode="F").resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy((np.asarray(pil) > 0.5).astype(np.float32))


def train_part_token(
    pipe: Any,
    images: Sequence[Image.Image],
    masks: Sequence[Any],
    *,
    config: TrainConfig | None = None,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Optimise a part token on ``images`` and their part ``masks`` (see the module docstring).

    Images are resized (bicubic) to ``image_size`` squared and masks (bilinear, then > 0.5) to
    ``mask_size`` squared, as the code's loader resizes both to ``resize`` (1024).
    ``pipe``: an SDXL img2img pipeline (``StableDiffusionXLImg2ImgPipeline``; any img2img pipeline
    with ``strength`` works). ``names`` label the samples in errors. Masks that are empty after
    resizing are skipped, as the code's loader drops them (``info["skipped"]`` lists them); none
    left is an error.
    """
    import torch

    cfg = config or TrainConfig()
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    if not images:
        raise ValueError("no training images")
    labels = list(names) if names is not None else [f"sample {i}" for i in range(len(images))]
    side = cfg.image_size or _default_size(pipe)
    msize = cfg.mask_size or side
    mask_hw = (msize, msize)

    targets, used, skipped = [], [], []
    for i, (img, m) in enumerate(zip(images, masks)):
        t = _mask_tensor(m, mask_hw, labels[i])
        if float(t.sum()) == 0:
            skipped.append(f"{labels[i]}: empty mask")
            continue
        targets.append(t)
        used.append(i)
    if not used:
        raise ValueError(f"no usable training pair (all masks empty): {'; '.join(skipped)}")

    selection = select_layers(pipe.unet, cfg.layer_set)
    layout = BatchLayout.cfg(1) if cfg.guidance_scale > 1 else BatchLayout.plain(1)
    capture = QueryCapture(selection.names, rows=cfg.rows, layout=layout)

    queries: list[list["torch.Tensor"]] = []
    steps_per_image: list[int] = []
    with attention_control(pipe.unet, capture):
        for i in used:
            capture.clear()
            img = images[i].convert("RGB").resize((side, side), Image.BICUBIC)
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)  # the code: set_seed(1 + seed) per image
            pipe(prompt=cfg.prompt, image=img, strength=cfg.strength, num_inference_steps=cfg.num_inference_steps,
                 guidance_scale=cfg.guidance_scale, generator=gen, output_type="latent")
            missing = [n for n in selection.names if n not in capture.sums]
            if missing:
                raise RuntimeError(f"{labels[i]}: no queries captured at {missing}")
            queries.append([capture.sums[n] for n in selection.names])
            steps_per_image.append(capture.calls[selection.names[0]])

    dev = queries[0][0].device  # where the UNet ran (its weights may live elsewhere under offloading)
    layers = []
    for n in selection.names:
        mod = capture.modules[n]
        w = mod.to_k.weight.detach().to(dev, torch.float32)
        b = None if mod.to_k.bias is None else mod.to_k.bias.detach().to(dev, torch.float32)
        layers.append(_LayerKeys(n, w, b, float(mod.scale), capture.grids[n]))
    dim = layers[0].weight.shape[1]

    target_mask = torch.stack(targets).to(dev)  # (B, H, W)
    target = torch.stack([1 - target_mask, target_mask], dim=1)  # row 0 background, row 1 part

    x = random_part_token(dim, cfg.seed).to(target.device).requires_grad_(True)
    opt = (torch.optim.AdamW([x], lr=cfg.lr) if cfg.optimizer == "adamw" else torch.optim.SGD([x], lr=cfg.lr))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    loss_fn = {"mse": torch.nn.MSELoss(), "bce": torch.nn.BCELoss()}[cfg.loss]

    losses: list[float] = []
    epochs = range(cfg.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="part token", unit="epoch")
    for _ in epochs:
        opt.zero_grad()
        maps = token_maps(x, queries, layers, mask_hw)
        lo, hi = maps.min(), maps.max()
        maps = (maps - lo) / (hi - lo + 1e-8)  # the code's min-max over the whole batch
        loss = loss_fn(maps, target)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at epoch {len(losses)} (lr {cfg.lr} too high?)")
        losses.append(value)
        loss.backward()
        opt.step()
        sched.step()

    info = {
        "config": asdict(cfg),
        "layers": list(selection.names),
        "layer_set": selection.requested,
        "layers_used": selection.used,
        "layers_note": selection.note,
        "grids": [list(l.grid) for l in layers],
        "steps_per_image": steps_per_image,
        "image_size": side,
        "mask_size": msize,
        "images": [labels[i] for i in used],
        "skipped": skipped,
        "dim": dim,
    }
    return TrainResult(x.detach().cpu().to(torch.float32), losses, info)


# ---------------------------------------------------------------------------
# Data folders and command line
# ---------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def load_training_pairs(
    images_dir: str | os.PathLike, masks_dir: str | os.PathLike
) -> tuple[list[Image.Image], list[Image.Image], list[str]]:
    """Images in ``images_dir`` and the same-named masks (any image extension) in ``masks_dir``.

    Only files directly in the two folders are read (a link pointing outside its folder is
    refused). Errors name the file: a missing mask, an unreadable image or mask, a mask whose size
    differs from its image's.
    """
    idir, mdir = Path(images_dir).expanduser(), Path(masks_dir).expanduser()
    for d, what in ((idir, "images"), (mdir, "masks")):
        if not d.is_dir():
            raise ValueError(f"{what} folder {d} does not exist")
    masks_by_stem: dict[str, Path] = {}
    for p in sorted(mdir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in masks_by_stem:
                raise ValueError(f"two masks for '{p.stem}': {masks_by_stem[p.stem]} and {p}")
            masks_by_stem[p.stem] = p
    image_paths = [p for p in sorted(idir.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not image_paths:
        raise ValueError(f"images folder {idir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    images, masks, names = [], [], []
    for p in image_paths:
        mp = masks_by_stem.get(p.stem)
        if mp is None:
            raise ValueError(f"image {p}: no mask named '{p.stem}.*' in {mdir}")
        for f, folder in ((p, idir), (mp, mdir)):
            if not _inside(f, folder):
                raise ValueError(f"{f} points outside its folder {folder}; refusing to read it")
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except Exception as err:
            raise ValueError(f"image {p}: cannot be read as an image ({err})") from err
        try:
            with Image.open(mp) as im:
                msk = im.convert("L")
        except Exception as err:
            raise ValueError(f"mask {mp}: cannot be read as an image ({err})") from err
        if msk.size != img.size:
            raise ValueError(f"mask {mp}: size {msk.size[0]}x{msk.size[1]} differs from its image {p} "
                             f"({img.size[0]}x{img.size[1]})")
        images.append(img)
        masks.append(msk)
        names.append(p.name)
    return images, masks, names


def load_dataset_pairs(
    root: str | os.PathLike, part: str | None = None
) -> tuple[list[Image.Image], list[np.ndarray], list[str], list[str]]:
    """Source images and edit masks of a generic-format dataset folder (``harness.data``'s loader,
    which reads nothing outside the folder), optionally only the samples whose ``part`` is
    ``part`` (case-insensitive). Returns images, masks, sample ids, and the samples left out
    with why (a sample that fails to load, one without a mask, one of another part)."""
    from harness.data.generic import GenericDataset
    from harness.types import SampleError

    ds = GenericDataset(root)
    images, masks, names, skipped = [], [], [], []
    want = part.lower() if part else None
    for ref in ds.refs():
        try:
            sample = ds.load(ref)
        except SampleError as err:
            skipped.append(str(err))
            continue
        if want is not None and (sample.part or "").lower() != want:
            continue
        if sample.mask is None:
            skipped.append(f"sample '{sample.id}', field 'mask': no mask")
            continue
        images.append(Image.fromarray(sample.source))
        masks.append(sample.mask.astype(np.float32))
        names.append(sample.id)
    if not images:
        detail = f"; left out: {'; '.join(skipped)}" if skipped else ""
        which = f" with part '{part}'" if part else ""
        raise ValueError(f"dataset {root}: no sample{which} with an image and a mask{detail}")
    return images, masks, names, skipped


def _parser(prog: str = "python -m methods.partedit.train") -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Optimise a PartEdit part token (2 x D: background, part) from images and part masks "
                    "and write it as .pt or .safetensors (the format the partedit method loads).",
    )
    p.add_argument("--images", help="folder of training images")
    p.add_argument("--masks", help="folder of part masks named like the images (white = part)")
    p.add_argument("--dataset", help="instead of --images/--masks: a generic-format dataset folder (source + mask)")
    p.add_argument("--part", help="with --dataset: only samples whose part is this")
    p.add_argument("--out", required=True, help="token file to write (.pt or .safetensors)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="SDXL weights: hub id or local folder (default: %(default)s)")
    p.add_argument("--revision", default=None, help="hub revision of --model")
    p.add_argument("--backbone", choices=("real", "tiny"), default="real",
                   help="'tiny': random-weight tiny SDXL (smoke runs; the token is meaningless)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="pipeline dtype for the img2img pass (maps and optimisation are float32)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--step-size", type=int, default=d.step_size, help="StepLR step size")
    p.add_argument("--gamma", type=float, default=d.gamma, help="StepLR gamma")
    p.add_argument("--loss", choices=LOSSES, default=d.loss, help="mse (code default) or bce (paper)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer)
    p.add_argument("--strength", type=float, default=d.strength)
    p.add_argument("--steps", type=int, default=d.num_inference_steps,
                   help="scheduler steps (img2img runs strength x steps)")
    p.add_argument("--guidance", type=float, default=d.guidance_scale)
    p.add_argument("--image-size", type=int, default=None, help="image side (default: the model's, 1024 for SDXL)")
    p.add_argument("--mask-size", type=int, default=None, help="mask side for the loss (default: the image side)")
    p.add_argument("--layer-set", choices=("paper", "code", "code_name_order", "all"), default=d.layer_set,
                   help="hooked layers (paper = the code's 8 up_blocks.0.attentions.0 layers)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m methods.partedit.train") -> int:
    """Command line entry point; returns the exit status (0 ok, 2 bad input, 3 missing weights)."""
    from ..diffusion.loading import MissingWeights, ModelSpec, UnsupportedSetting, load_pipeline

    args = _parser(prog).parse_args(argv)
    out = Path(args.out).expanduser()
    if out.suffix.lower() not in (".pt", ".safetensors"):
        print(f"error: --out {out}: the token file must end in .pt or .safetensors", file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig(
            epochs=args.epochs, lr=args.lr, step_size=args.step_size, gamma=args.gamma, loss=args.loss,
            optimizer=args.optimizer, strength=args.strength, num_inference_steps=args.steps,
            guidance_scale=args.guidance, image_size=args.image_size, mask_size=args.mask_size,
            layer_set=args.layer_set, seed=args.seed,
        )
        if args.dataset and (args.images or args.masks):
            raise ValueError("give either --dataset or --images and --masks, not both")
        if args.dataset:
            images, masks, names, left_out = load_dataset_pairs(args.dataset, args.part)
            for s in left_out:
                print(f"left out {s}")
        elif args.images and args.masks:
            images, masks, names = load_training_pairs(args.images, args.masks)
        else:
            raise ValueError("--images and --masks (or --dataset) are required")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from diffusers import StableDiffusionXLImg2ImgPipeline

    try:
        spec = ModelSpec(model=args.model, revision=args.revision, dtype=args.dtype, device=args.device,
                         backbone=args.backbone, tiny_kind="sdxl" if args.backbone == "tiny" else None)
        loaded = load_pipeline(StableDiffusionXLImg2ImgPipeline, spec)
    except MissingWeights as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except UnsupportedSetting as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = train_part_token(loaded.pipeline, images, masks, config=cfg, names=names, progress=args.progress)
    except (ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_part_token(result.token, out)
    # A sidecar says what made the token (a tiny-backbone token is random-weight, not a real part).
    sidecar = out.with_name(out.name + ".json")
    record = dict(result.info, weights=loaded.info(), losses=result.losses)
    sidecar.write_text(json.dumps(record, indent=1, default=str) + "\n")
    note = f" ({result.info['layers_note']})" if result.info["layers_note"] else ""
    print(f"wrote {out}: token {tuple(result.token.shape)} from {len(result.info['images'])} images, "
          f"{len(result.info['layers'])} layers{note}; loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g} "
          f"over {len(result.losses)} epochs; weights: {loaded.weights_label}")
    for s in result.info["skipped"]:
        print(f"skipped {s}")
    return 0


if __name__ == "__main__":  # pragma: no cover - command line
    sys.exit(main())
