"""Re-running a finished sweep of >= 1000 edits (target: <= 5 s), through the real CLI.

The sweep: inpaint at 10 radii (a Hydra multirun of 10 jobs) on 100 synthetic 64x64 samples,
scored with the full default protocol (l1, l2, psnr, ssim, lpips alex and vgg). The first run computes
everything; the rerun must find every edit and score in the cache and rebuild nothing.
Usage: python benchmarks/bench_rerun.py [--samples 100]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import make_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    radii = ",".join(str(r) for r in range(1, 11))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = make_dataset(tmp / "data", a.samples, a.size)
        cmd = [sys.executable, "-m", "harness.cli", "run", "-m", "method=inpaint", f"method.radius={radii}",
               f"dataset.root={ds['root']}", "dataset.name=bench", f"results_dir={tmp / 'res'}", "run_name=rerun",
               "metrics=default", "progress=false"]
        timings = []
        for label in ("first run", "rerun", "rerun again"):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
            timings.append(time.perf_counter() - t0)
            print(f"{label:12s}: {timings[-1]:6.2f} s")
        computed = sum(json.loads(m.read_text())["outcome"]["computed"]
                       for m in (tmp / "res" / "rerun" / "jobs").glob("*/manifest.json"))
        edits = sum(1 for _ in (tmp / "res" / "rerun" / "edits").rglob("edit.json"))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import harness.cli"], cwd=REPO, check=True)
        startup = time.perf_counter() - t0
    print(f"edits in the sweep: {edits} (10 jobs); computed on the last rerun: {computed}")
    print(f"python + harness.cli import alone: {startup:.2f} s")
    best = min(timings[1:])
    print(f"rerun of a finished {edits}-edit sweep: {best:.2f} s (target <= 5 s: {'PASS' if best <= 5 else 'FAIL'}); "
          f"ratio rerun / first run: {best / timings[0]:.3f}")


if __name__ == "__main__":
    main()
