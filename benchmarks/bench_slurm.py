"""A sharded sweep on the local SLURM cluster (2 workers) against the same sweep in one process.

The sweep: identity and inpaint (classical) on N synthetic samples (default 10,000), pixel metrics
(l1, l2 on three regions). Measured, through the real CLI:

- ``local``: the sweep in one process (Hydra's basic launcher), everything computed;
- ``slurm``: the same sweep with ``dataset.shards=S`` through ``hydra/launcher=submitit_slurm``
  (2 * S array tasks, 2 running at a time), everything computed again (its own cache);
- ``slurm resubmit``: the same SLURM command again: every edit cached, so what is left is the
  fixed cost of a sharded sweep on SLURM (submission, task start-up, reading the cache, writing the
  tables): reported per task and per edit;
- ``merge``: :func:`harness.aggregate.load_run` on the sharded run (completeness check, reading and
  concatenating the shard tables), and the whole report (``edit-harness report``);
- the same fixed cost as a share of a tiny-backbone diffusion sweep of N edits (SDEdit with
  ``backbone=tiny``, its per-edit time measured on a few samples in one process).

Targets (issue 18): the merge of 10,000 edits under 10 s; submission overhead under 5% of a
tiny-backbone diffusion sweep's time.

Needs SLURM: uses $SLURM_CONF when set (partition: --partition), else installs and starts a
local single-node cluster with ci/slurm/ (root with apt-get) and stops it at the end.
Usage: python benchmarks/bench_slurm.py [--samples 10000] [--shards 2] [--size 32]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import make_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(cmd, env) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def _computed(run: Path) -> tuple[int, int]:
    ms = [json.loads(m.read_text())["outcome"] for m in (run / "jobs").glob("*/manifest.json")]
    return sum(m["computed"] for m in ms), sum(m["cached"] for m in ms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--partition", default="bench")
    ap.add_argument("--diffusion-samples", type=int, default=6)
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = None
        if "SLURM_CONF" not in env:
            if subprocess.run(["bash", str(REPO / "ci/slurm/setup.sh")]).returncode != 0:
                sys.exit("no SLURM here and it cannot be installed (needs root and apt-get)")
            state = tmp / "slurm"
            start = subprocess.run(["bash", str(REPO / "ci/slurm/start.sh"), str(state), a.partition],
                                   env={**env, "SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())},
                                   capture_output=True, text=True)
            if start.returncode != 0:
                sys.exit(f"ci/slurm/start.sh failed: {start.stderr}")
            env["SLURM_CONF"] = start.stdout.strip().splitlines()[-1].split("=", 1)[1]
        try:
            t0 = time.perf_counter()
            ds = make_dataset(tmp / "data", a.samples, a.size)
            print(f"dataset: {a.samples} samples {a.size}x{a.size} written in {time.perf_counter() - t0:.1f} s")
            base = [sys.executable, "-m", "harness.cli", "run", "-m", "method=identity,inpaint",
                    f"dataset.root={ds['root']}", "dataset.name=bench", "metrics=pixel", "progress=false",
                    "report=false", f"results_dir={tmp / 'res'}"]
            slurm = ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={a.partition}",
                     "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=60",
                     "hydra.launcher.array_parallelism=2", f"dataset.shards={a.shards}"]
            edits = 2 * a.samples
            tasks = 2 * a.shards
            t_local = _timed([*base, "run_name=local"], env)
            print(f"local, one process:            {t_local:8.1f} s  ({1e3 * t_local / edits:.2f} ms/edit), "
                  f"computed/cached {_computed(tmp / 'res' / 'local')}")
            t_local2 = _timed([*base, "run_name=local"], env)
            print(f"local rerun (all cached):      {t_local2:8.1f} s")
            t_slurm = _timed([*base, *slurm, "run_name=slurm"], env)
            print(f"slurm, {tasks} tasks, 2 workers:   {t_slurm:8.1f} s  ({1e3 * t_slurm / edits:.2f} ms/edit), "
                  f"speed-up {t_local / t_slurm:.2f}x, computed/cached {_computed(tmp / 'res' / 'slurm')}")
            t_re = _timed([*base, *slurm, "run_name=slurm"], env)
            print(f"slurm resubmit (all cached):   {t_re:8.1f} s  = {t_re / tasks:.1f} s/task, "
                  f"{1e3 * t_re / edits:.2f} ms/edit; computed/cached {_computed(tmp / 'res' / 'slurm')}")
            fixed = max(t_re - t_local2 / 2, 0.0)  # beyond the cache reads the 2 workers share
            code = ("import sys,time; from harness.aggregate import load_run; t=time.perf_counter(); "
                    "s,e=load_run(sys.argv[1]); print(time.perf_counter()-t, len(e), len(s))")
            out = subprocess.run([sys.executable, "-c", code, str(tmp / "res" / "slurm")], cwd=REPO, env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            t_merge, n_edits, n_scores = float(out[0]), int(out[1]), int(out[2])
            print(f"merge (check + load {n_edits} edits, {n_scores} score rows): {t_merge:.2f} s (target < 10 s)")
            t_report = _timed([sys.executable, "-m", "harness.cli", "report", str(tmp / "res" / "slurm")], env)
            print(f"report of the merged run (edit-harness report): {t_report:.1f} s")
            # a tiny-backbone diffusion sweep: its per-edit time, in one process
            d_ds = make_dataset(tmp / "ddata", a.diffusion_samples, 64, name="dbench")
            dcmd = [sys.executable, "-m", "harness.cli", "run", "method=sdedit", "method.backbone=tiny",
                    f"dataset.root={d_ds['root']}", "dataset.name=dbench", "metrics=pixel", "progress=false",
                    "report=false", f"results_dir={tmp / 'res'}", "run_name=diff"]
            t_one = _timed([*dcmd, "dataset.limit=1"], env)  # start-up and tiny-pipeline build
            t_all = _timed([*dcmd, f"cache_dir={tmp / 'dcache'}"], env)
            per_edit = max(t_all - t_one, 1e-9) / max(a.diffusion_samples - 1, 1)
            sweep = per_edit * edits
            print(f"tiny-backbone SDEdit: {per_edit:.2f} s/edit -> a {edits}-edit sweep ~{sweep:.0f} s in one process")
            print(f"fixed cost of the SLURM sweep (resubmit minus half the local cached rerun): {fixed:.1f} s "
                  f"= {100 * fixed / sweep:.2f}% of that diffusion sweep (target < 5%)")
        finally:
            if state is not None:
                subprocess.run(["bash", str(REPO / "ci/slurm/stop.sh"), str(state)])


if __name__ == "__main__":
    main()
