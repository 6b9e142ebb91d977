"""Harness overhead per edit with the identity method, metrics excluded (target: <= 20 ms).

Measures, on the same synthetic 512x512 samples:
  floor:   a plain sequential loop doing what any harness that stores PNG edits must do:
           decode the source and mask PNGs, copy the image, encode the edit (Pillow, level 1);
  harness: the whole runner per edit (manifest parsing, cache key, decode, method call, checks,
           memory probe, atomic PNG + JSON writes, tables), identity method, scoring disabled.
Usage: python benchmarks/bench_overhead.py [--n 200] [--size 512]
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import methods  # noqa: E402,F401
from _synthetic import make_dataset  # noqa: E402
from harness.runner import Job, JobConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = make_dataset(tmp / "data", a.n, a.size)
        t0 = time.perf_counter()
        for i in range(a.n):
            with Image.open(tmp / "data" / "images" / f"{i:05d}.png") as im:
                src = np.asarray(im.convert("RGB"))
            with Image.open(tmp / "data" / "masks" / f"{i:05d}.png") as im:
                np.asarray(im.convert("L"))
            buf = io.BytesIO()
            Image.fromarray(src.copy()).save(buf, format="PNG", compress_level=1)
        floor = (time.perf_counter() - t0) / a.n

        cfg = JobConfig(method={"name": "identity"}, dataset=ds, metrics={}, run_name="bench",
                        results_dir=str(tmp / "res"), progress=False, score=False)
        t0 = time.perf_counter()
        job = Job(cfg)
        out = job.run()
        harness = (time.perf_counter() - t0) / a.n
        assert out.computed == a.n
        import pandas as pd

        infer = pd.read_parquet(out.job_dir / "edits.parquet").infer_seconds.mean()
        t0 = time.perf_counter()
        Job(cfg).run()
        rerun = (time.perf_counter() - t0) / a.n

    overhead = harness - infer
    print(f"edits: {a.n} identity edits of {a.size}x{a.size} px, scoring off")
    print(f"plain loop (decode, copy, encode PNG):         {floor * 1e3:7.2f} ms/edit")
    print(f"harness, first run (all edits computed):        {harness * 1e3:7.2f} ms/edit")
    print(f"  of which identity's own edit time:            {infer * 1e3:7.2f} ms/edit")
    print(f"harness overhead per edit (metrics excluded):   {overhead * 1e3:7.2f} ms/edit  "
          f"(target <= 20 ms: {'PASS' if overhead <= 0.020 else 'FAIL'})")
    print(f"ratio harness / floor:                          {harness / floor:7.2f}x")
    print(f"harness, cached rerun:                          {rerun * 1e3:7.2f} ms/edit")


if __name__ == "__main__":
    main()
