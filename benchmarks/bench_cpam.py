"""CPAM per-edit cost: inversion (preparation) vs editing (inference), and peak memory.

What it measures (``n`` edits after one warm-up, each a synthetic textured image with a disc mask,
edit type ``replace``, the method's defaults otherwise), through the adapter's ``edit`` exactly as
the runner calls it:
  preparation: the source's resize and VAE encoding plus the inversion (null-text by default:
        ``N`` pivot UNet calls, then per step 1 conditional call, up to ``null_inner_steps``
        optimisation calls with a backward pass each, and 2 calls for the step) -- what the
        runner records as ``prep_seconds``;
  inference: the two-branch loop (one UNet call of 4 rows per step under Preservation Adaptation,
        Localized Extraction and the attention capture for M_t) and the decode -- the runner's
        ``infer_seconds`` (the edit's total minus preparation);
  UNet calls of each edit (the adapter's own count, ``info["network_calls"]``);
  peak memory: ``torch.cuda.max_memory_allocated`` per edit on a GPU; on the CPU the process's
        peak resident set size (``ru_maxrss``, a high-water mark for the whole process).

Sizes:
  tiny (default, CPU): the random-weight tiny SD 1.5 (methods/diffusion/tiny.py), 64 px, 4 steps,
        2 null-text inner steps (the tiny "auto" values).
  --full: Stable Diffusion 1.5's full architecture with random weights (benchmarks/bench_diffusion.py's
        ``full_size_sd15``; random weights cost what trained ones do), fp32, 512 px, 50 steps, 10
        null-text inner steps: the paper's setting. Needs a CUDA GPU: without one it says so and
        exits with status 2.

Usage:
  python benchmarks/bench_cpam.py                    # tiny, CPU
  python benchmarks/bench_cpam.py --inversion ddim   # plain DDIM inversion instead of null-text
  python benchmarks/bench_cpam.py --full             # on a GPU, full size
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def synthetic_sample(i: int, size: int):
    """A textured RGB image (smooth gradients plus seeded noise) with a centred disc as M_s."""
    from harness.types import Sample

    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 / (size - 1), y * 255 / (size - 1), (x + y) * 127 / (2 * size - 2)], -1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    mask = (y - size / 2) ** 2 + (x - size / 2) ** 2 <= (size / 4) ** 2
    return Sample(id=f"bench{i}", dataset="bench", source=img, mask=mask, category="change_object",
                  source_caption="a photo of a cat on a sofa", target_caption="a photo of a dog on a sofa",
                  meta={"object_prompt": "dog"})


def peak(device: str) -> float:
    """Peak memory in GiB since the last reset (CUDA) or of the process (CPU, max RSS)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="SD 1.5's full architecture, random weights, on a CUDA GPU")
    ap.add_argument("--n", type=int, default=3, help="edits timed (after one warm-up)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (tiny default 4, full 50)")
    ap.add_argument("--inversion", default="null_text", choices=["null_text", "ddim"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared host)")
    a = ap.parse_args()
    import torch
    from diffusers.utils import logging as diffusers_logging

    if a.full and not torch.cuda.is_available():
        print("bench_cpam --full needs a CUDA GPU (SD 1.5's full architecture at 512 px: null-text inversion of "
              "50 steps x up to 10 optimisation passes, then 50 steps of 4 rows, takes many minutes per edit on a "
              "CPU); none is available here. Run without --full for the tiny CPU benchmark.", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    diffusers_logging.set_verbosity_error()
    import methods.cpam  # noqa: F401  (registers cpam)
    from harness.registry import METHODS

    cls = METHODS.get("cpam")
    device = "cuda" if a.full else "cpu"
    params: dict = {"inversion": a.inversion, "device": device}
    tmp = None
    if a.full:
        from bench_diffusion import full_size_sd15

        tmp = tempfile.TemporaryDirectory(prefix="bench_cpam_")
        params["model"] = str(full_size_sd15(Path(tmp.name) / "sd15", ip2p=False))
    else:
        params["backbone"] = "tiny"
    if a.steps:
        params["num_inference_steps"] = a.steps
    method = cls(cls.parse_params(params))
    p = method.params
    t_load = time.perf_counter()
    method.prepare()
    load_s = time.perf_counter() - t_load
    size = int(p.resolution)
    print(f"CPAM benchmark: {'SD 1.5 full architecture (random weights), CUDA' if a.full else 'tiny SD 1.5, CPU'}; "
          f"{size} px, {p.num_inference_steps} steps, inversion {p.inversion} "
          f"(inner steps {p.null_inner_steps}), guidance {p.guidance_scale}; load {load_s:.1f} s")
    method.edit(synthetic_sample(99, size), 0)  # warm-up (kernels, caches)
    rows = []
    for i in range(a.n):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = method.edit(synthetic_sample(i, size), 0)
        if device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        prep = float(out.info["prep_seconds"])
        rows.append((prep, total - prep, total, int(out.info["network_calls"]["unet"]), peak(device)))
    print(f"{'edit':>4} {'prep (inversion) s':>19} {'inference s':>12} {'total s':>8} {'UNet calls':>10} "
          f"{'peak GiB':>9}")
    for i, (prep, inf, total, calls, mem) in enumerate(rows):
        print(f"{i:>4} {prep:19.3f} {inf:12.3f} {total:8.3f} {calls:10d} {mem:9.3f}")
    arr = np.asarray([r[:3] for r in rows])
    print(f"mean {arr[:, 0].mean():19.3f} {arr[:, 1].mean():12.3f} {arr[:, 2].mean():8.3f}   "
          f"(inversion = {100 * arr[:, 0].mean() / arr[:, 2].mean():.0f} % of the edit)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
