"""Diffusion adapters: time per edit, harness overhead per edit and peak memory.

Two sizes:
  tiny (default, CPU): the random-weight tiny backbones (methods/diffusion/tiny.py). For each
        method it times (a) the method alone: prepare() once, then edit() on every sample in a
        plain loop, and (b) the whole harness: a Job with scoring off (dataset parsing, cache
        keys, decode, checks, memory probe, atomic PNG + JSON writes, tables). The difference per
        edit is the harness overhead; the edits' pixels are compared to show both did the same.
  full: Stable Diffusion 1.5's full architecture with random weights (the same compute as the
        trained model: UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M parameters), saved once
        with save_pretrained to a temporary folder and loaded by the adapters' real loading path
        (method.model=<folder>). Meant for a GPU: time per edit and peak CUDA memory at 512 px.
        On CPU it runs but takes minutes per edit; use --steps to shorten.

Usage:
  python benchmarks/bench_diffusion.py                             # tiny, CPU, ip2p/sdedit/diffedit
  python benchmarks/bench_diffusion.py --methods all --n 4         # every diffusion adapter, tiny
  python benchmarks/bench_diffusion.py --size full --device cuda   # 512 px, 50 steps, SD 1.5 size
Prints one line per method; the tiny figures are recorded in the README.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import methods  # noqa: E402,F401
from _synthetic import make_dataset  # noqa: E402
from harness.data import open_dataset  # noqa: E402
from harness.registry import METHODS  # noqa: E402
from harness.runner import Job, JobConfig  # noqa: E402
from methods._diffusion_common import DiffusionMethod  # noqa: E402

DEFAULT_METHODS = ("instruct_pix2pix", "sdedit", "diffedit")
# Per-method parameters that keep a tiny run short without changing what runs.
FAST = {
    "diffedit": {"num_maps_per_mask": 2},
    "plug_and_play": {"inversion_steps": None},  # filled with --steps below
    "prompt_to_prompt": {"num_inner_steps": 2},
    "ledits_pp": {"use_intersect_mask": False},  # the tiny UNet has no 1/4-size cross-attention
}


def diffusion_methods() -> list[str]:
    return [n for n in METHODS.names() if issubclass(METHODS.get(n), DiffusionMethod)
            and n != "diffusers_pipeline"]  # the generic adapter needs a pipeline named in YAML


def method_params(name: str, backbone: str, steps: int, resolution: int, device: str, model: str | None) -> dict:
    cls = METHODS.get(name)
    fields = set(cls.param_names())
    p: dict = {"backbone": backbone, "num_inference_steps": steps, "device": device}
    if "resolution" in fields:
        p["resolution"] = resolution
    for k, v in FAST.get(name, {}).items():
        if k in fields:
            p[k] = steps if v is None else v
    if model is not None:
        p["model"] = model
    return {k: v for k, v in p.items() if k in fields}


def full_size_sd15(folder: Path, ip2p: bool) -> Path:
    """Save SD 1.5's full architecture with random weights (seeded) as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from methods.diffusion.tiny import tiny_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    # Stable Diffusion v1's published configs (unet/vae/text_encoder config.json of the checkpoint).
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=8 if ip2p else 4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=max(49408, len(tok)), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def run_one(name: str, ds_cfg: dict, params: dict, out: Path, seed: int, memory: str = "auto") -> dict:
    import pandas as pd

    cls = METHODS.get(name)
    method = cls(cls.parse_params(params))
    ds = open_dataset(ds_cfg)
    samples = [ds.load(r) for r in ds.refs()]
    t0 = time.perf_counter()
    method.prepare()
    load_s = time.perf_counter() - t0
    method.edit(samples[0], seed)  # warm-up (first-call allocations, kernel selection)
    direct, images = [], []
    for s in samples:
        t0 = time.perf_counter()
        images.append(method.edit(s, seed).image)
        direct.append(time.perf_counter() - t0)

    cfg = JobConfig(method={"name": name, **params}, dataset=ds_cfg, metrics={}, run_name=f"bench-{name}",
                    results_dir=str(out), progress=False, score=False, seed=seed, memory=memory)
    t0 = time.perf_counter()
    res = Job(cfg).run()
    harness_total = time.perf_counter() - t0
    edits = pd.read_parquet(res.job_dir / "edits.parquet")
    if res.counts["ok"] != len(samples):
        raise RuntimeError(f"{name}: {res.counts}; {edits.reason.dropna().tolist()[:1]}")
    from harness.cache import EditStore

    store = EditStore(out / f"bench-{name}" / "edits")
    same = True
    for s, img in zip(samples, images):
        key = edits.set_index("sample_id").loc[s.id, "edit_key"]
        from PIL import Image

        with Image.open(store.get(key).folder / "edit.png") as im:
            same &= bool(np.array_equal(np.asarray(im.convert("RGB")), img))
    n = len(samples)
    peak = edits.peak_memory_bytes.max()
    return {
        "method": name, "n": n, "load_s": load_s,
        "direct_ms": 1e3 * float(np.mean(direct)),
        "harness_ms": 1e3 * harness_total / n,
        "infer_ms": 1e3 * float(edits.infer_seconds.mean()),
        "peak_mib": float(peak) / 2**20 if np.isfinite(peak) else float("nan"),
        "same_pixels": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list, or 'all'")
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    ap.add_argument("--n", type=int, default=8, help="samples per method")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (tiny default 4; full default 50)")
    ap.add_argument("--resolution", type=int, default=None, help="working size (tiny default 64; full 512)")
    ap.add_argument("--image", type=int, default=None, help="synthetic source size (default = resolution)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared host)")
    a = ap.parse_args()
    import torch
    from diffusers.utils import logging as diffusers_logging

    torch.set_num_threads(a.threads)
    diffusers_logging.set_verbosity_error()  # e.g. LEDITS++'s size advice, repeated per edit
    full = a.size == "full"
    steps = a.steps or (50 if full else 4)
    res = a.resolution or (512 if full else 64)
    names = diffusion_methods() if a.methods == "all" else [m.strip() for m in a.methods.split(",") if m.strip()]
    if full:
        unsupported = [n for n in names if METHODS.get(n).tiny_kind not in ("sd15", "ip2p")]
        if unsupported:
            raise SystemExit(f"--size full builds SD 1.5 (and its 8-channel IP2P variant) only; drop {unsupported}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = make_dataset(tmp / "data", a.n, a.image or res, reference=True)  # reference: paint_by_example
        hw = torch.cuda.get_device_name(0) if a.device == "cuda" and torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {a.threads} torch thread(s))"
        print(f"diffusion adapters, {'SD 1.5 full size, random weights' if full else 'tiny random-weight backbones'}; "
              f"{a.n} samples, {steps} steps, {res} px working size; device {a.device}: {hw}")
        print(f"{'method':26s} {'load s':>7s} {'edit ms (method alone)':>23s} {'edit ms (harness)':>18s} "
              f"{'overhead ms':>12s} {'peak MiB':>9s}  same pixels")
        for name in names:
            model = None
            if full:
                ip2p = METHODS.get(name).tiny_kind == "ip2p"
                model = str(full_size_sd15(tmp / ("sd15-ip2p" if ip2p else "sd15"), ip2p))
            params = method_params(name, "real" if full else "tiny", steps, res, a.device, model)
            r = run_one(name, ds, params, tmp / "res", a.seed)
            print(f"{name:26s} {r['load_s']:7.2f} {r['direct_ms']:23.1f} {r['harness_ms']:18.1f} "
                  f"{r['harness_ms'] - r['direct_ms']:12.1f} {r['peak_mib']:9.1f}  {r['same_pixels']}")


if __name__ == "__main__":
    main()
