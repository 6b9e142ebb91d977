"""Tasks sharing one run folder on a network file system: no locks, atomic renames in the same
folder, two processes computing the same edits never corrupt them, and a re-submitted sweep
computes only what is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

from harness.aggregate import load_run
from harness.cache import EditStore
from harness.fileio import TMP_PREFIX
from harness.runner import Job, JobConfig

from .conftest import REPO, job_config

RACER = r"""
import json, os, sys, time
from pathlib import Path
cfg = json.loads(sys.argv[1])
go = Path(sys.argv[2])
from harness.runner import Job, JobConfig
job = Job(JobConfig.from_mapping(cfg))
while not go.exists():  # both processes start editing at the same moment
    time.sleep(0.005)
out = job.run(cfg)
print(json.dumps({"computed": out.computed, "cached": out.cached}))
"""


def test_no_lock_is_relied_on():
    # NFS has no dependable flock/fcntl locks: the harness's writers use none
    for p in (REPO / "harness").rglob("*.py"):
        text = p.read_text(encoding="utf-8")
        assert "fcntl" not in text and "flock" not in text, p


def test_two_processes_racing_on_the_same_edits(builder, tmp_path):
    for i in range(24):
        builder.add_simple(f"s{i}", seed=i, h=64, w=64)
    cache = tmp_path / "cache"
    cfg = job_config(builder.config(), tmp_path, method={"name": "inpaint"}, cache_dir=str(cache), writers=2)
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, json.dumps(cfg), str(go)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    import time

    time.sleep(1.0)
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    # between them every edit was made (most by both: they raced on the same keys)
    assert all(o["computed"] + o["cached"] == 24 for o in outs)
    # every edit folder complete and readable, no temporary file left behind
    assert not [p for p in cache.rglob(f"{TMP_PREFIX}*")]
    assert not [p for p in (tmp_path / "test").rglob(f"{TMP_PREFIX}*")]
    job = Job(JobConfig.from_mapping(cfg))
    store = EditStore(cache)
    fresh = Job(JobConfig.from_mapping(job_config(builder.config(), tmp_path / "fresh", method={"name": "inpaint"})))
    for ref in job.dataset.refs():
        rec = store.get(job.key_for(ref))
        assert rec is not None and rec.status.value == "ok"
        json.loads((rec.folder / "edit.json").read_text())
        result, _ = fresh.compute(ref)
        np.testing.assert_array_equal(rec.image(), result.image)  # the same bytes as a lone run
    # the job's tables (written by both, atomically) read back whole
    scores, edits = load_run(tmp_path / "test")
    assert len(edits) == 24 and scores["value"].notna().all()
    # a third run finds everything
    assert Job(JobConfig.from_mapping(cfg)).run(cfg).computed == 0


def test_resubmitting_a_sharded_sweep_computes_only_what_is_missing(builder, tmp_path):
    for i in range(10):
        builder.add_simple(f"s{i}", seed=i)
    ds = {**builder.config(), "shard": None}  # as in every dataset YAML
    cache = tmp_path / "cache"

    def shard(i, n=3):
        cfg = job_config({**ds, "shard": f"{i}/{n}"}, tmp_path, method={"name": "inpaint"}, cache_dir=str(cache))
        return Job(JobConfig.from_mapping(cfg)).run(cfg)

    first = [shard(i) for i in range(3)]
    total = sum(o.computed for o in first)
    assert total == 10
    full, _ = load_run(tmp_path / "test")
    mtimes = {p: p.stat().st_mtime_ns for p in cache.rglob("edit.png")}
    # a task died: its shard folder never finished, and one edit it was writing is gone
    (g_dir,) = [p for p in (tmp_path / "test" / "jobs").iterdir() if p.name.endswith("shard1of3")]
    (g_dir / "manifest.json").unlink()
    lost = next(iter(sorted(cache.rglob("edit.json"))))
    lost.unlink()
    again = [shard(i) for i in range(3)]
    assert sum(o.computed for o in again) == 1  # the lost edit only
    assert sum(o.cached for o in again) == 9
    # finished edits were not written again
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.parent != lost.parent)
    scores, _ = load_run(tmp_path / "test")
    pd.testing.assert_frame_equal(scores, full, check_exact=True)
