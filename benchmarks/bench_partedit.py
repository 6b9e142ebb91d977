"""PartEdit per-edit time and peak memory, and the share of its per-step mask aggregation.

What it measures (``n`` edits after a warm-up, one prompt pair each, synthetic path):
  PartEdit edit: text encoding, the three-path loop (one batched UNet call of 6 rows per step under
        the PartEdit controller: query sharing, part-token capture, P2P replacement, blending) and
        the decode of the edit row -- :func:`methods.partedit.sampler.sample`;
  mask aggregation: the time inside the controller's mask function each step (the upsampling of every
        captured layer's map to ``mask_size``, the mean, min-max and the adaptive Otsu binarisation:
        :func:`methods.partedit.mask.part_mask`), CUDA-synchronised, and its share of the edit.
        Target (issue 14): under 10 % of the edit.
  reference (same run, same steps, size, scheduler and guidance): plain SDXL sampling of the source
        prompt through diffusers' ``StableDiffusionXLPipeline`` (2 CFG rows per step, decode
        included). PartEdit runs 3 paths, so about 3x is expected.
  peak memory: ``torch.cuda.max_memory_allocated`` per edit on a GPU; on the CPU the process's peak
        resident set size (``ru_maxrss``, a high-water mark for the whole process).

Sizes:
  tiny (default, CPU): the random-weight tiny SDXL (methods/diffusion/tiny.py), 64 px, 4 steps,
        mask size 64; its UNet is not SDXL-shaped, so the ``code`` layer set falls back to all 8
        cross-attention layers.
  --full: SDXL base 1.0's full architecture with random weights (UNet 2.6B, both text encoders,
        the VAE; random weights cost what trained ones do), fp16, 1024 px, 50 steps, mask size 1024,
        the code's 40 layers: the paper's setting. Needs a CUDA GPU: without one it says so and
        exits with status 2.

Usage:
  python benchmarks/bench_partedit.py               # tiny, CPU
  python benchmarks/bench_partedit.py --full        # on a GPU, full size
  python benchmarks/bench_partedit.py --n 3 --steps 4
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [("a photo of a cat in a park", "a photo of a tiger in a park"),
           ("a photo of a man in a city", "a photo of a robot in a city"),
           ("a photo of a car by the sea", "a photo of a truck by the sea")]


def full_sdxl(device: str, dtype) -> object:
    """SDXL base 1.0's architecture (its published unet / vae / text_encoder(_2) configs) with
    seeded random weights, built directly on ``device``; the tiny tokenizer stands in for CLIP's
    (token ids only index the embedding tables)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from methods.diffusion.tiny import tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        )
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=False)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
                                           **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         hidden_act="gelu", projection_dim=1280, **common))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl() -> object:
    from diffusers import StableDiffusionXLPipeline

    from methods.diffusion.loading import ModelSpec, load_pipeline

    return load_pipeline(StableDiffusionXLPipeline,
                         ModelSpec(model="", backbone="tiny", tiny_kind="sdxl", device="cpu")).pipeline


class Peak:
    """Peak memory of a block: CUDA allocator peak on a GPU, the process's max RSS on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.value = 0.0

    def __enter__(self) -> "Peak":
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def partedit_edit(pipe, src: str, edit: str, *, steps: int, size: int, mask_size: int, seed: int,
                  layer_set: str) -> dict:
    """One PartEdit edit (synthetic path, the method's defaults: DDIM, guidance 7.5, t_e 50, P2P on)."""
    import torch

    from methods.diffusion.attention import attention_control
    from methods.partedit import mask as mask_mod
    from methods.partedit import sampler as smp
    from methods.partedit import tokens
    from methods.partedit.method import PartEdit
    from methods.prompt_to_prompt import differing_words

    width = int(pipe.unet.config.cross_attention_dim)
    method = PartEdit(PartEdit.parse_params({"backbone": "tiny", "num_inference_steps": steps,
                                             "mask_size": mask_size, "layer_set": layer_set}))
    token = tokens.random_part_token(width, seed)
    t0 = time.perf_counter()
    cond = smp.encode_conditioning(pipe, src, edit, token)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    ctrl, info = method.build_controller(pipe, src, edit, differing_words(src, edit)[1], True,
                                         (size // f, size // f))
    with attention_control(pipe.unet, ctrl):
        res = smp.sample(pipe, cond, height=size, width=size, steps=steps, guidance_scale=7.5,
                         generator=torch.Generator().manual_seed(seed), scheduler="ddim", decode_source=False)
    sync(str(pipe.unet.device.type))
    total = time.perf_counter() - t0
    sel = mask_mod.select_layers(pipe.unet, layer_set)
    return {"seconds": total, "aggregation": ctrl.aggregation_seconds, "passes": res.unet_passes,
            "layers": len(sel.indices), "layer_set_used": sel.used, "blended": len(ctrl.blended_steps),
            "image": res.edit}


def reference_edit(pipe, prompt: str, *, steps: int, size: int, seed: int) -> float:
    """Plain SDXL sampling of one prompt (diffusers' pipeline, DDIM, CFG 7.5, decode included)."""
    import torch
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    t0 = time.perf_counter()
    pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np",
         generator=torch.Generator().manual_seed(seed))
    sync(str(pipe.unet.device.type))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="SDXL's full architecture, random weights, on a CUDA GPU")
    ap.add_argument("--n", type=int, default=3, help="edits timed (after one warm-up)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (tiny default 4, full 50)")
    ap.add_argument("--layer-set", default="code", help="mask layer set (code: the official 40 layers)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared host)")
    a = ap.parse_args()
    import torch
    from diffusers.utils import logging as diffusers_logging

    if a.full and not torch.cuda.is_available():
        print("bench_partedit --full needs a CUDA GPU (SDXL's full architecture at 1024 px, 3 paths x 50 steps, "
              "takes many minutes per edit on a CPU); none is available here. Run without --full for the tiny "
              "CPU benchmark.", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    diffusers_logging.set_verbosity_error()
    steps = a.steps or (50 if a.full else 4)
    size = 1024 if a.full else 64
    mask_size = 1024 if a.full else 64
    device = "cuda" if a.full else "cpu"
    t_build = time.perf_counter()
    pipe = full_sdxl(device, torch.float16) if a.full else tiny_sdxl()
    t_build = time.perf_counter() - t_build
    hw = torch.cuda.get_device_name(0) if a.full else f"CPU ({os.cpu_count()} cores, {a.threads} torch thread(s))"
    print(f"PartEdit, {'SDXL full architecture, random weights, fp16' if a.full else 'tiny random-weight SDXL'}; "
          f"{a.n} edits, {steps} steps, {size} px, mask size {mask_size}; {hw} (models built in {t_build:.1f} s)")

    partedit_edit(pipe, *PROMPTS[0], steps=steps, size=size, mask_size=mask_size, seed=0, layer_set=a.layer_set)
    reference_edit(pipe, PROMPTS[0][0], steps=steps, size=size, seed=0)  # warm-ups
    runs, refs, peaks, ref_peaks = [], [], [], []
    for i in range(a.n):
        src, edit = PROMPTS[i % len(PROMPTS)]
        with Peak(device) as pk:
            runs.append(partedit_edit(pipe, src, edit, steps=steps, size=size, mask_size=mask_size, seed=i,
                                      layer_set=a.layer_set))
        peaks.append(pk.value)
        with Peak(device) as pk:
            refs.append(reference_edit(pipe, src, steps=steps, size=size, seed=i))
        ref_peaks.append(pk.value)
    per_edit = float(np.mean([r["seconds"] for r in runs]))
    agg = float(np.mean([r["aggregation"] for r in runs]))
    ref = float(np.mean(refs))
    r0 = runs[0]
    share = agg / per_edit
    ms = lambda s: f"{1e3 * s:10.1f} ms"  # noqa: E731
    mem = "GiB allocated (CUDA peak)" if a.full else "GiB process max RSS (high-water mark)"
    print(f"PartEdit edit (3 paths)           {ms(per_edit)}   = 1.00   peak {max(peaks):6.2f} {mem}")
    print(f"  mask aggregation (all steps)    {ms(agg)}   = {share:4.2f}   "
          f"({r0['layers']} layers, layer set {a.layer_set} -> {r0['layer_set_used']}, upsampled to {mask_size}^2, "
          f"{steps} steps; target < 0.10: {'PASS' if share < 0.10 else 'FAIL'})")
    print(f"  per step                        {ms(agg / steps)}")
    print(f"reference: plain SDXL sampling    {ms(ref)}   peak {max(ref_peaks):6.2f} {mem}")
    print(f"PartEdit / plain SDXL             {per_edit / ref:10.2f} x  (3 paths of 2 CFG rows vs 1 path)")
    print(f"UNet passes per edit              {r0['passes']} (one batched call of 6 rows per step); "
          f"blended steps {r0['blended']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
