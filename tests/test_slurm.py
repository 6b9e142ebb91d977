"""A sharded sweep on a real single-node SLURM cluster (Debian's slurm-wlm and munge, configured and
started by ci/slurm/, stopped at the end of the session), submitted through Hydra's submitit_slurm
launcher exactly as a user does: every array task runs, the merged tables equal an unsharded local
run, FID over shards equals FID unsharded, and a task cancelled with scancel mid-run loses nothing
once the same command is submitted again, which recomputes nothing finished.

Skipped, with the reason, only where the packages cannot be installed (not root, no apt-get).
SLURM here has no accounting database (slurmdbd), so submitit cannot learn that a cancelled task
died (sacct answers "accounting storage is disabled") and its submitting process keeps waiting:
the test stops that process, as a user would stop a hung command, before submitting again.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.aggregate import load_run
from harness.merge import ShardError, sharded_jobs

from .conftest import REPO, DatasetBuilder

SLURM_DIR = REPO / "ci" / "slurm"
PARTITION = "harness"
MEASURED = ["prep_seconds", "infer_seconds", "peak_memory_bytes"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running single-node cluster: yields the environment that submits to it (SLURM_CONF)."""
    setup = subprocess.run(["bash", str(SLURM_DIR / "setup.sh")], capture_output=True, text=True, timeout=900)
    if setup.returncode != 0:
        pytest.skip(f"SLURM cannot be installed here: {setup.stderr.strip() or setup.stdout.strip()}")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    start = subprocess.run(["bash", str(SLURM_DIR / "start.sh"), str(state), PARTITION], capture_output=True,
                           text=True, timeout=120, env=env)
    try:
        assert start.returncode == 0, f"ci/slurm/start.sh failed: {start.stderr}\n{start.stdout}"
        conf = start.stdout.strip().splitlines()[-1].split("=", 1)[1]
        yield {**os.environ, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    finally:
        subprocess.run(["bash", str(SLURM_DIR / "stop.sh"), str(state)], timeout=60)


def _cli(*args):
    return [sys.executable, "-m", "harness.cli", *args]


def _sweep(results, run_name, *extra, launcher=True):
    hydra = ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}",
             "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
    return _cli("run", "-m", *(hydra if launcher else []), f"results_dir={results}", f"run_name={run_name}",
                "progress=false", *extra)


def _squeue(env) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, env=env, timeout=30)
    return [line for line in out.stdout.splitlines() if line.strip()]


def _dataset(root: Path, n: int, size: int = 48) -> DatasetBuilder:
    b = DatasetBuilder(root)
    for i in range(n):
        b.add_simple(f"s{i:03d}", seed=i, h=size, w=size)
    return b


def test_sharded_sweep_on_slurm_equals_a_local_run_fid_included(slurm, tmp_path):
    data = _dataset(tmp_path / "data", 8)
    common = [f"dataset.root={data.root}", "dataset.name=syn", "metrics=pixel",
              "+metrics.items.fid={allow_random_weights: true, stats_cache_dir: null}"]
    sub = subprocess.run(_sweep(tmp_path, "slurm", "method=identity,inpaint", "dataset.shards=2", *common),
                         cwd=REPO, env=slurm, capture_output=True, text=True, timeout=600)
    assert sub.returncode == 0, sub.stderr[-4000:]
    # every array task ran on the cluster and returned (submitit's result file of each)
    results = sorted((tmp_path / "slurm" / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 4
    for r in results:
        with open(r, "rb") as f:
            assert pickle.load(f)[0] == "success"
    groups = sharded_jobs(tmp_path / "slurm")
    assert sorted(g.count for g in groups) == [2, 2] and all(len(g.folders) == 2 for g in groups)
    # the unsharded local run of the same sweep
    local = subprocess.run(_sweep(tmp_path, "local", "method=identity,inpaint", *common, launcher=False),
                           cwd=REPO, env=slurm, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-4000:]
    s_sl, e_sl = load_run(tmp_path / "slurm")
    s_lo, e_lo = load_run(tmp_path / "local")
    is_set = s_sl["metric"] == "fid"
    assert is_set.sum() == 2 and s_sl[is_set]["value"].notna().all()
    drop = ["run"]
    pixel_sl, pixel_lo = s_sl[~is_set].drop(columns=drop), s_lo[s_lo["metric"] != "fid"].drop(columns=drop)
    pd.testing.assert_frame_equal(pixel_sl.reset_index(drop=True), pixel_lo.reset_index(drop=True), check_exact=True)
    pd.testing.assert_frame_equal(e_sl.drop(columns=drop + MEASURED), e_lo.drop(columns=drop + MEASURED),
                                  check_exact=True)
    fid_sl = s_sl[is_set].drop(columns=drop).reset_index(drop=True)
    fid_lo = s_lo[s_lo["metric"] == "fid"].drop(columns=drop).reset_index(drop=True)
    pd.testing.assert_frame_equal(fid_sl.drop(columns="value"), fid_lo.drop(columns="value"), check_exact=True)
    # the same features summed in the same order give the same value; the Inception's float32
    # features of an image may differ in the last bits between batches of other images (the
    # shards batch other images together), which FID carries at about that relative size
    for a, b in zip(fid_sl["value"], fid_lo["value"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9)


def test_scancel_mid_run_then_resubmit_loses_and_redoes_nothing(slurm, tmp_path):
    n = 64
    data = _dataset(tmp_path / "data", n, size=256)  # inpainting (radius 20) ~0.3 s an edit: ~10 s a task
    cache = tmp_path / "cache"
    common = [f"dataset.root={data.root}", "dataset.name=syn", "metrics=pixel", "method=inpaint",
              "method.radius=20", "dataset.shards=2", f"cache_dir={cache}"]
    cmd = _sweep(tmp_path, "run", *common)
    first = subprocess.Popen(cmd, cwd=REPO, env=slurm, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    victim = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and victim is None:
            running = [line.split()[0] for line in _squeue(slurm) if line.split()[1] == "RUNNING"]
            done = len(list(cache.rglob("edit.json"))) if cache.is_dir() else 0
            if running and 1 <= done < 20:
                victim = sorted(running)[-1]
                # submitit's task ignores SLURM's SIGTERM; SLURM kills it KillWait (1 s,
                # ci/slurm/slurm.conf.in) later, well before its ~10 s of edits end
                subprocess.run(["scancel", victim], env=slurm, check=True, timeout=30)
                break
            time.sleep(0.05)
        assert victim is not None, "no task was seen running with edits half done"
        while _squeue(slurm) and time.time() < deadline:
            time.sleep(0.2)
        assert not _squeue(slurm)
    finally:
        # without accounting, submitit cannot see that the cancelled task died: stop its wait
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGINT)
            try:
                first.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait(timeout=30)
    run = tmp_path / "run"
    logs = "\n".join(f"{p}: {p.read_text()[-600:]}" for p in sorted((run / ".submitit").glob("*/*_log.err")))
    jobs = sorted(p.name for p in (run / "jobs").iterdir()) if (run / "jobs").is_dir() else []
    assert len(jobs) < 2, f"cancelled {victim}, yet both shards finished: {jobs}\n{logs}"
    with pytest.raises(ShardError, match=r"shard\(s\) .* (missing|not finished)"):
        load_run(run)
    finished = {p: p.stat().st_mtime_ns for p in cache.rglob("edit.png") if (p.parent / "edit.json").is_file()}
    assert 0 < len(finished) < n

    again = subprocess.run(cmd, cwd=REPO, env=slurm, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    # nothing finished was computed again; the missing edits were
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    manifests = [json.loads((f / "manifest.json").read_text()) for g in sharded_jobs(run) for f in g.folders.values()]
    computed = sum(m["outcome"]["computed"] for m in manifests)
    cached = sum(m["outcome"]["cached"] for m in manifests)
    assert computed == n - len(finished) and cached == len(finished)
    # nothing lost: the merged tables equal one local run's over the same cache (all cached)
    local = subprocess.run(_sweep(tmp_path, "local", *[c for c in common if c != "dataset.shards=2"], launcher=False),
                           cwd=REPO, env=slurm, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-4000:]
    s_sl, e_sl = load_run(run)
    s_lo, e_lo = load_run(tmp_path / "local")
    assert len(e_sl) == n and (e_sl["status"] == "ok").all()
    pd.testing.assert_frame_equal(s_sl.drop(columns="run"), s_lo.drop(columns="run"), check_exact=True)
    pd.testing.assert_frame_equal(e_sl.drop(columns="run"), e_lo.drop(columns="run"), check_exact=True)


def test_gpu_memory_and_time_options_reach_the_sbatch_script(tmp_path):
    """Hydra's launcher options become #SBATCH lines of the script submitit writes (no cluster needed:
    the script is built by the launcher's own executor from the composed launcher config)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from harness.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=2",
                                           "hydra.launcher.mem_gb=64", "hydra.launcher.timeout_min=180",
                                           "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=8",
                                           "hydra.launcher.array_parallelism=16"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    # the launcher's own mapping (BaseSubmititLauncher.launch): queue-generic keys as they are,
    # the rest prefixed with the executor's name; the executor then writes the sbatch script
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in launcher.items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path))
    executor.update_parameters(**params)
    text = executor._executor._make_submission_file_text("python -m x", "0")
    assert "#SBATCH --gpus-per-node=2" in text
    assert "#SBATCH --mem=64GB" in text
    assert "#SBATCH --time=180" in text
    assert "#SBATCH --partition=gpu" in text
    assert "#SBATCH --cpus-per-task=8" in text


def test_tiny_backbone_smoke_experiment_on_slurm(slurm, tmp_path):
    """experiment=slurm_smoke: tiny-backbone SDEdit, 2 shards as 2 array tasks on the partition
    named by $EDIT_HARNESS_PARTITION; each task prepares (loads) its pipeline once; merged report."""
    env = {**slurm, "EDIT_HARNESS_PARTITION": PARTITION}
    out = subprocess.run(_cli("run", "experiment=slurm_smoke", "dataset.limit=4", f"results_dir={tmp_path}",
                              "progress=false"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "slurm_smoke"
    (g,) = sharded_jobs(run)
    assert g.count == 2 and len(g.folders) == 2
    assert len(list((run / ".submitit").glob("*/*_result.pkl"))) == 2
    manifests = [json.loads((f / "manifest.json").read_text()) for f in g.folders.values()]
    assert {m["method"]["name"] for m in manifests} == {"sdedit"}
    assert all(m["config"]["method"]["backbone"] == "tiny" for m in manifests)
    # every edit computed once, by the task of its shard; a task with edits built its pipeline
    assert sum(m["outcome"]["computed"] for m in manifests) == 4
    assert all(m["method"]["load_seconds"] > 0 for m in manifests if m["outcome"]["computed"])
    scores, edits = load_run(run)
    assert len(edits) == 4 and (edits["status"] == "ok").all()
    assert edits["unet_calls"].gt(0).all()  # the tiny UNet ran, counted per edit
    assert (run / "report" / "table.md").is_file()
