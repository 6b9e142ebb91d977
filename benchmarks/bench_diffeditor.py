"""DiffEditor and DragonDiffusion per-edit cost: preparation (inversion) vs inference, network
evaluations, peak memory; at full size compared with the paper's Table 1.

What it measures, for each method (``diffeditor``, ``dragondiffusion``; found through the method
registry), ``n`` edits after one warm-up, through the adapter's ``edit`` exactly as the runner calls
it, on one-point dragging (the setting of DiffEditor's timings, Table 1: "tested on one point
dragging, with the image resolution being 512 x 512"): the embedded sample ``rocket_drag_taller``
(one handle point, its target 48 px above, the editable region around the rocket's top):
  preparation: VAE encoding, text embeddings, DDIM inversion with the memory bank and, for
        DiffEditor, the image-prompt tokens -- the runner's ``prep_seconds``;
  inference: the guided step loop (energy guidance through the estimator UNet, memory bank, image
        prompt window, regional SDE, time travel) and the decode -- the runner's ``infer_seconds``;
  network evaluations of each edit (the adapter's own count, ``info["network_calls"]``): ``unet``
        (inversion + sampling + time-travel rollbacks), ``estimator`` (the guidance's second UNet,
        forward passes; each has a backward pass too), ``image_encoder`` / ``image_proj``;
  peak memory: ``torch.cuda.max_memory_allocated`` per edit on a GPU; on the CPU the process's peak
        resident set size (``ru_maxrss``, a high-water mark for the whole process).

Sizes:
  tiny (default, CPU): the random-weight tiny SD 1.5 and tiny image prompt of the methods'
        ``backbone=tiny``, 64 px working size, 10 steps (the methods' tiny "auto" values).
  --full: Stable Diffusion 1.5's full architecture with random weights (benchmarks/bench_diffusion.py's
        ``full_size_sd15``; random weights cost what trained ones do), an OpenCLIP ViT-H/14-sized
        CLIP vision tower and a released-layout image-prompt checkpoint (64 queries, 1280 -> 768),
        random too, fp32 (the paper's precision), 512 px, 50 steps; prints each time beside the
        paper's A100 numbers (DiffEditor 3.53 s + 13.88 s, DragonDiffusion 3.53 s + 15.00 s) and the
        ratio. Needs a CUDA GPU: without one it says so and exits with status 2.

Usage:
  python benchmarks/bench_diffeditor.py                       # tiny, CPU, both methods
  python benchmarks/bench_diffeditor.py --methods diffeditor  # one method
  python benchmarks/bench_diffeditor.py --full                # on a GPU, full size
  python benchmarks/bench_diffeditor.py --json out.json       # also write the rows
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import timed_edits  # noqa: E402

SAMPLE_ID = "rocket_drag_taller"
MODULES = {"diffeditor": "methods.diffeditor", "dragondiffusion": "methods.dragondiffusion"}
#: DiffEditor Table 1 (sec. 4.2): seconds per edit, one-point dragging, 512 x 512, A100, float32
PAPER = {"diffeditor": (3.53, 13.88), "dragondiffusion": (3.53, 15.00)}
COUNTED = ("unet", "estimator", "image_encoder", "image_proj")


def load_sample():
    from harness.data import GenericDataset

    ds = GenericDataset(REPO / "datasets" / "sample", ids=[SAMPLE_ID])
    (ref,) = ds.refs()
    return ds.load(ref)


def full_size_image_prompt(folder: Path, unet) -> tuple[Path, Path]:
    """A ViT-H/14-sized CLIP vision tower (h94/IP-Adapter's image_encoder config) and an image-prompt
    checkpoint in the released layout (resampler: 64 queries of 768 = 12 heads x 64, depth 4,
    ff_mult 4, 1280 -> 768; per-layer to_k_ip / to_v_ip), random weights (seeded)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from methods.dragon.image_prompt import tiny_ip_state

    enc_dir, ckpt = folder / "image_encoder", folder / "ip_sd15_64_random.bin"
    if not (enc_dir / "config.json").is_file():
        torch.manual_seed(0)
        cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                               num_hidden_layers=32, image_size=224, patch_size=14, projection_dim=1024,
                               hidden_act="gelu", layer_norm_eps=1e-5)
        CLIPVisionModelWithProjection(cfg).save_pretrained(enc_dir)
    if not ckpt.is_file():
        torch.save(tiny_ip_state(unet, 1280, queries=64, hidden=768, depth=4, ff_mult=4, seed=0), ckpt)
    return enc_dir, ckpt


def build(name: str, full: bool, steps: int | None, folder: Path | None, device: str):
    import importlib

    from harness.registry import METHODS

    importlib.import_module(MODULES[name])
    cls = METHODS.get(name)
    params: dict = {"device": device}
    if full:
        from bench_diffusion import full_size_sd15

        params["model"] = str(full_size_sd15(folder / "sd15", ip2p=False))
        params["resolution"] = 512
        if name == "diffeditor":
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(params["model"], subfolder="unet")
            enc, ckpt = full_size_image_prompt(folder, unet)
            del unet
            params.update(image_encoder=str(enc), image_encoder_subfolder="", ip_weights=str(ckpt))
    else:
        params["backbone"] = "tiny"
    if steps:
        params["num_inference_steps"] = steps
    method = cls(cls.parse_params(params))
    t0 = time.perf_counter()
    method.prepare()
    return method, time.perf_counter() - t0


def bench(name: str, a, folder: Path | None, device: str) -> list[dict]:
    import torch

    method, load_s = build(name, a.full, a.steps, folder, device)
    p = method.params
    sample = load_sample()
    print(f"\n{name}: {'SD 1.5 full architecture (random weights), CUDA, fp32' if a.full else 'tiny SD 1.5, CPU'}; "
          f"working area {p.resolution}^2 px, {p.num_inference_steps} steps; load {load_s:.1f} s; "
          f"sample {SAMPLE_ID} (one-point drag)")
    rows = []
    for i, out, prep, infer, peak in timed_edits(method, sample, a.n, device):
        calls = out.info.get("network_calls") or {}
        rows.append({"method": name, "edit": i, "prep_s": prep, "infer_s": infer, "total_s": prep + infer,
                     **{k: int(calls.get(k, 0)) for k in COUNTED}, "peak_gib": peak,
                     "task": out.info.get("task"), "steps": int(p.num_inference_steps)})
    print(f"{'edit':>4} {'prep s':>8} {'infer s':>8} {'total s':>8} {'UNet':>5} {'estim.':>6} {'img enc':>7} "
          f"{'peak GiB':>9}")
    for r in rows:
        print(f"{r['edit']:>4} {r['prep_s']:8.3f} {r['infer_s']:8.3f} {r['total_s']:8.3f} {r['unet']:5d} "
              f"{r['estimator']:6d} {r['image_encoder']:7d} {r['peak_gib']:9.3f}")
    prep = float(np.mean([r["prep_s"] for r in rows]))
    infer = float(np.mean([r["infer_s"] for r in rows]))
    print(f"mean {prep:8.3f} {infer:8.3f} {prep + infer:8.3f}")
    if a.full:
        pp, pi = PAPER[name]
        print(f"paper (A100, fp32): prep {pp:.2f} s, inference {pi:.2f} s, total {pp + pi:.2f} s; "
              f"ours / paper: prep {prep / pp:.2f}, inference {infer / pi:.2f}, total {(prep + infer) / (pp + pi):.2f} "
              f"({'faster' if prep + infer < pp + pi else 'slower'} than the paper)")
    del method
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="SD 1.5's full architecture, random weights, on a CUDA GPU")
    ap.add_argument("--methods", default="diffeditor,dragondiffusion", help="comma-separated (default both)")
    ap.add_argument("--n", type=int, default=2, help="edits timed per method (after one warm-up)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (tiny default 10, full 50)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared host)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    a = ap.parse_args()
    import torch
    from diffusers.utils import logging as diffusers_logging

    names = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODULES]
    if unknown:
        print(f"bench_diffeditor: unknown method(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}",
              file=sys.stderr)
        return 2
    if a.full and not torch.cuda.is_available():
        print("bench_diffeditor --full needs a CUDA GPU (SD 1.5's full architecture at 512 px: 50 inversion steps, "
              "then up to 50 guided steps with a backward pass through a second UNet each, takes many minutes per "
              "edit on a CPU); none is available here. Run without --full for the tiny CPU benchmark.",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    diffusers_logging.set_verbosity_error()
    device = "cuda" if a.full else "cpu"
    tmp = tempfile.TemporaryDirectory(prefix="bench_diffeditor_") if a.full else None
    rows: list[dict] = []
    try:
        for name in names:
            rows += bench(name, a, Path(tmp.name) if tmp else None, device)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if a.json:
        a.json.write_text(json.dumps({"full": a.full, "device": device, "rows": rows,
                                      "paper": {k: {"prep_s": v[0], "infer_s": v[1]} for k, v in PAPER.items()}},
                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
