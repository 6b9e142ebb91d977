"""Wall time of a tiny-backbone smoke run of every diffusion baseline, through the real CLI.

Runs, in a fresh process, exactly what a user types for a smoke run (``backbone=tiny`` and nothing
else about the methods: working size, steps, inversion steps ... come from tiny mode's ``"auto"``
defaults)::

  edit-harness run -m method=<every diffusion baseline> ++method.backbone=tiny dataset.limit=2 \\
      metrics=pixel results_dir=<tmp> run_name=tinysmoke progress=false

on the embedded sample set, then prints per method the wall time, the edits made and the
resolved parameters, and the total. The baselines are every ``conf/method`` config of a diffusion
adapter (SDXL variants and Paint-by-Example included) except ``diffusers_pipeline``, whose pipeline
is named by the user.

Per-method time: Hydra's basic launcher runs the jobs one after another in one process, and each
job writes its ``manifest.json`` last, so a method's time is the time from the previous job's
manifest (for the first job: from the process start, i.e. including the Python / torch / diffusers
imports) to its own. ``report`` is the time after the last job (tables and plots of the sweep).

Usage:
  python benchmarks/bench_tiny_smoke.py                 # every diffusion baseline, 2 samples
  python benchmarks/bench_tiny_smoke.py --methods sdedit,diffedit --limit 4
  python benchmarks/bench_tiny_smoke.py --threads 1     # OMP / MKL threads of the run (default: torch's)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def diffusion_baselines() -> list[str]:
    """Every shipped method config of a diffusion adapter, but the generic ``diffusers_pipeline``."""
    import methods  # noqa: F401  (registers the methods)
    from harness.cli import CONF_DIR
    from harness.registry import METHODS
    from methods._diffusion_common import DiffusionMethod

    names = [p.stem for p in sorted((CONF_DIR / "method").glob("*.yaml"))]
    return [n for n in names if n in METHODS and issubclass(METHODS.get(n), DiffusionMethod)
            and n != "diffusers_pipeline"]


def cli() -> list[str]:
    """The installed ``edit-harness`` next to this Python, else ``python -m harness.cli``."""
    exe = Path(sys.executable).with_name("edit-harness")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("edit-harness")
    return [found] if found else [sys.executable, "-m", "harness.cli"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="all", help="comma list of method configs, or 'all' (default)")
    ap.add_argument("--limit", type=int, default=2, help="samples per method (dataset.limit; default 2)")
    ap.add_argument("--ids", default=None,
                    help="comma list of sample ids instead of --limit (dataset.ids), e.g. one with a reference "
                         "image for paint_by_example: coffee_remove_spoon,astronaut_paste_dahlia")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS / MKL_NUM_THREADS for the run")
    ap.add_argument("--keep", type=Path, default=None, help="results folder to keep (default: a temporary one)")
    a = ap.parse_args()
    names = diffusion_baselines() if a.methods == "all" else [m.strip() for m in a.methods.split(",") if m.strip()]

    with tempfile.TemporaryDirectory(prefix="tinysmoke-") as tmp:
        results = a.keep or Path(tmp)
        subset = f"dataset.ids=[{a.ids}]" if a.ids else f"dataset.limit={a.limit}"
        cmd = [*cli(), "run", "-m", f"method={','.join(names)}", "++method.backbone=tiny", subset,
               "metrics=pixel", f"results_dir={results}", "run_name=tinysmoke", "progress=false"]
        env = dict(os.environ)
        if a.threads:
            env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        t1 = time.time()
        if proc.returncode != 0:
            sys.stdout.write(proc.stdout[-4000:])
            sys.stderr.write(proc.stderr[-4000:])
            print(f"edit-harness exited with {proc.returncode}", file=sys.stderr)
            return proc.returncode

        import pandas as pd

        jobs = []
        for manifest in (results / "tinysmoke" / "jobs").glob("*/manifest.json"):
            m = json.loads(manifest.read_text())
            edits = pd.read_parquet(manifest.parent / "edits.parquet")
            jobs.append((manifest.stat().st_mtime, m, edits))
        jobs.sort(key=lambda j: j[0])
        print(f"{len(names)} diffusion baselines, backbone=tiny, {subset}; "
              f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}")
        print(f"{'method':32s} {'seconds':>8s} {'ok':>3s} {'skip':>4s} {'size':>5s} {'steps':>5s}  "
              f"other auto parameters")
        prev, bad = t0, []
        for end, m, edits in jobs:
            p = m["method"]["params"]
            ok = int((edits.status == "ok").sum())
            skipped = int((edits.status == "skipped").sum())  # e.g. no reference image: not an error
            if ok + skipped != len(edits):
                bad.append((m["method"]["name"], edits.query("status == 'failed'").reason.tolist()[:1]))
            other = {k: p[k] for k in ("inversion_steps", "num_inner_steps", "start_step", "start_layer",
                                        "use_intersect_mask") if k in p}
            print(f"{m['method']['name']:32s} {end - prev:8.1f} {ok:3d} {skipped:4d} {str(p.get('resolution')):>5s} "
                  f"{p['num_inference_steps']:5d}  {other or ''}")
            prev = end
        print(f"{'report (tables, plots)':32s} {t1 - prev:8.1f}")
        print(f"{'total':32s} {t1 - t0:8.1f}   ({len(jobs)} jobs of {len(names)} methods)")
        if len(jobs) != len(names) or bad:
            print(f"failed edits: {bad}; jobs {len(jobs)} of {len(names)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
