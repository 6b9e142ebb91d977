"""DragGAN and UserControllableLT per-edit cost: preparation (GAN inversion) vs inference (drag
optimisation / latent transformer + synthesis), network calls and peak memory; at full size beside
DiffEditor's Table 1 (A100: UserControllableLT 1.1 s + 0.04 s, DragGAN 50.22 s + 6.28 s).

Each method edits the embedded one-point drag sample ``rocket_drag_taller`` (one handle, 48 px up;
DiffEditor times "1 point" dragging) through the adapter's ``edit`` as the runner calls it, after a
warm-up edit; preparation = the adapter's ``prep_seconds``, inference = the rest.

Sizes:
  tiny (default, CPU): the adapters' ``backbone=tiny`` (32 px random generator) and tiny "auto" values.
  --full: random-weight checkpoints of the real architectures written to a temporary folder and
        loaded through the real loaders (``generator_path`` / ``transformer_path``): DragGAN on a
        512 px NVIDIA-layout StyleGAN2 (DragGAN's FFHQ 512 generator's shape), UserControllableLT on
        a 1024 px one with the full latent transformer (its FFHQ checkpoint's shape); the methods'
        real defaults (projector 1000 steps, PTI 350, drag up to 300 steps). Random weights cost
        what trained ones do per step, but the drag runs to ``max_steps`` (random features do not
        converge), so its inference time is reported with the step count and the time per step.
        ``--steps N`` caps every loop (inversion, tuning, drag) at N for a quick CPU measurement.

Usage:
  python benchmarks/bench_gan_drag.py                      # tiny, CPU
  python benchmarks/bench_gan_drag.py --full               # full size (GPU: minutes; CPU: use --steps)
  python benchmarks/bench_gan_drag.py --full --steps 3     # per-step costs at full size on a CPU
  python benchmarks/bench_gan_drag.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import timed_edits  # noqa: E402

SAMPLE_ID = "rocket_drag_taller"
PAPER = {"usercontrollablelt": (1.1, 0.04), "draggan": (50.22, 6.28)}  # DiffEditor Table 1, A100


def load_sample():
    from harness.data import GenericDataset

    ds = GenericDataset(REPO / "datasets" / "sample", ids=[SAMPLE_ID])
    (ref,) = ds.refs()
    return ds.load(ref)


def full_checkpoints(folder: Path) -> dict[str, Path]:
    """Random-weight checkpoints in the official layouts (seeded)."""
    import torch

    from methods.stylegan2.generator import Generator, GeneratorConfig, save_state_dict
    from methods.stylegan2.latent_transformer import LatentTransformer

    out = {}
    for res in (512, 1024):
        p = folder / f"stylegan2_{res}_random.pt"
        if not p.is_file():
            torch.manual_seed(res)
            save_state_dict(Generator(GeneratorConfig.nvidia(res)), p)
        out[f"g{res}"] = p
    p = folder / "ucl_ffhq_random.pt"
    if not p.is_file():
        torch.manual_seed(0)
        torch.save({"state_dict": {"encoder." + k: v for k, v in LatentTransformer().state_dict().items()}}, p)
    out["transformer"] = p
    return out


def build(name: str, full: bool, steps: int | None, ckpts: dict[str, Path] | None, device: str):
    from harness.registry import METHODS
    import methods.draggan  # noqa: F401
    import methods.usercontrollablelt  # noqa: F401

    cls = METHODS.get(name)
    params: dict = {"device": device}
    if full:
        assert ckpts is not None
        if name == "draggan":
            params["generator_path"] = str(ckpts["g512"])
        else:
            params.update(generator_path=str(ckpts["g1024"]), transformer_path=str(ckpts["transformer"]))
    else:
        params["backbone"] = "tiny"
    if steps:
        params.update(inversion_steps=steps)
        if name == "draggan":
            params.update(tune_steps=steps, max_steps=steps)
    return cls(cls.parse_params(params))


def measure(method, sample, device: str, n: int) -> list[dict]:
    rows = []
    for _i, out, prep, infer, peak in timed_edits(method, sample, n, device):
        drag_steps = out.info.get("drag_steps", out.info.get("transformer_calls"))
        rows.append({"method": method.name, "prep_s": prep, "infer_s": infer, "drag_steps": drag_steps,
                     "inversion_steps": out.info["inversion"]["steps"],
                     "tune_steps": out.info["inversion"]["tune_steps_run"],
                     "network_calls": out.info["network_calls"], "peak_gib": peak})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="cap inversion / tuning / drag loops at N steps")
    ap.add_argument("--methods", nargs="+", default=["usercontrollablelt", "draggan"])
    ap.add_argument("-n", type=int, default=1, help="timed edits per method (after one warm-up)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.full:
        torch.set_num_threads(1)
    sample = load_sample()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = full_checkpoints(Path(tmp)) if args.full else None
        for name in args.methods:
            rows += measure(build(name, args.full, args.steps, ckpts, device), sample, device, args.n)
    print(f"device: {device}{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}; "
          f"{'full size' if args.full else 'tiny'}{f', loops capped at {args.steps} steps' if args.steps else ''}")
    for r in rows:
        paper = PAPER[r["method"]]
        per_step = r["infer_s"] / r["drag_steps"] if r["drag_steps"] else float("nan")
        print(f"{r['method']:>20}: prep {r['prep_s']:8.2f} s (inversion {r['inversion_steps']} + tuning "
              f"{r['tune_steps']} steps)  infer {r['infer_s']:7.2f} s ({r['drag_steps']} drag steps / transformer "
              f"calls, {per_step:.3f} s each)  peak {r['peak_gib']:.2f} GiB  calls {r['network_calls']}"
              + (f"  | paper (A100) {paper[0]} s + {paper[1]} s" if args.full else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
