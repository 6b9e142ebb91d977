"""The runner: cache, resumption, failures that do not stop a sweep, bad method outputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import methods  # noqa: F401
from harness.cache import EditStore
from harness.runner import Job, JobConfig, run_job

from . import _test_methods_registry  # noqa: F401
from .conftest import REPO, job_config


def _scores(outcome) -> pd.DataFrame:
    return pd.read_parquet(outcome.job_dir / "scores.parquet")


def _edits(outcome) -> pd.DataFrame:
    return pd.read_parquet(outcome.job_dir / "edits.parquet")


def test_identity_end_to_end_and_rerun_is_cached(builder, tmp_path):
    for i in range(3):
        builder.add_simple(f"s{i}", seed=i)
    cfg = job_config(builder.config(), tmp_path / "res")
    first = run_job(cfg)
    assert first.counts == {"ok": 3, "skipped": 0, "failed": 0}
    assert first.computed == 3 and first.cached == 0 and first.scored == 3
    scores = _scores(first)
    assert set(scores.metric) == {"l1", "l2"}
    assert (scores.value == 0).all()
    assert set(scores.region) == {"all", "edited", "unedited"}
    assert (scores.protocol == "test").all()
    before = {p: p.read_bytes() for p in first.job_dir.glob("*.parquet")}
    second = run_job(cfg)
    assert second.computed == 0 and second.cached == 3 and second.scored == 0
    assert {p: p.read_bytes() for p in second.job_dir.glob("*.parquet")} == before


def test_edit_files_are_written_with_sidecar(builder, tmp_path):
    builder.add_simple("a")
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "inpaint"}))
    key = _edits(out).edit_key[0]
    folder = EditStore(tmp_path / "res" / "test" / "edits").folder(key)
    meta = json.loads((folder / "edit.json").read_text())
    assert meta["status"] == "ok" and meta["sample_id"] == "a" and meta["params"]["algorithm"] == "telea"
    assert (folder / "edit.png").is_file() and (folder / "mask.png").is_file()
    assert list((folder / "scores").glob("*.json"))
    assert not list(folder.glob(".tmp-*"))


def test_failures_are_recorded_and_retried(builder, tmp_path, monkeypatch):
    for i in range(4):
        builder.add_simple(f"s{i}")
    counter = tmp_path / "calls.txt"
    monkeypatch.setenv("TEST_FLAKY_IDS", "s1")
    monkeypatch.setenv("TEST_FLAKY_COUNTER", str(counter))
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "test_flaky"})
    out = run_job(cfg)
    assert out.counts == {"ok": 3, "skipped": 0, "failed": 1}
    edits = _edits(out).set_index("sample_id")
    assert "boom on s1" in edits.loc["s1", "reason"] and "sample 's1'" in edits.loc["s1", "reason"]
    failures = json.loads((out.job_dir / "failures.json").read_text())
    assert failures[0]["sample_id"] == "s1" and "RuntimeError" in failures[0]["traceback"]
    assert len(_scores(out).query("sample_id == 's1'")) == 0
    # The failure is retried, finished edits are not recomputed.
    monkeypatch.setenv("TEST_FLAKY_IDS", "")
    out2 = run_job(cfg)
    assert out2.counts == {"ok": 4, "skipped": 0, "failed": 0}
    assert out2.computed == 1 and out2.cached == 3
    assert counter.read_text().split() == ["s0", "s1", "s2", "s3", "s1"]


def test_bad_sample_files_do_not_stop_the_sweep(builder, tmp_path):
    builder.add_simple("good")
    builder.add_simple("trunc")
    p = builder.root / "images" / "trunc.png"
    p.write_bytes(p.read_bytes()[:100])
    builder.add(id="nofile", source="images/missing.png")
    with open(builder.root / "manifest.jsonl", "a") as f:
        f.write("{broken\n")
    out = run_job(job_config(builder.config(), tmp_path / "res"))
    edits = _edits(out).set_index("sample_id")
    assert out.counts["ok"] == 1 and out.counts["failed"] == 3
    assert "field 'source'" in edits.loc["trunc", "reason"]
    assert "file not found" in edits.loc["nofile", "reason"]
    assert "invalid JSON" in edits.loc["line4", "reason"]


def test_bad_method_outputs(builder, tmp_path):
    for sid in ("x_nan", "x_black", "x_gray", "x_small", "x_fine"):
        builder.add_simple(sid)
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "test_bad_output"}))
    e = _edits(out).set_index("sample_id")
    assert e.loc["x_nan", "status"] == "failed" and "NaN" in e.loc["x_nan", "reason"]
    assert e.loc["x_gray", "status"] == "failed" and "HxWx3" in e.loc["x_gray", "reason"]
    assert e.loc["x_black", "status"] == "ok" and e.loc["x_black", "flags"] == "all_black"
    assert e.loc["x_small", "status"] == "ok" and "size_differs" in e.loc["x_small", "flags"]
    assert e.loc["x_fine", "flags"] == ""
    s = _scores(out)
    assert s.query("sample_id == 'x_small'").value.notna().all()  # resized before scoring


def test_missing_fields_and_categories_are_skipped(builder, tmp_path):
    builder.add(id="nomask", source=builder.image("images/n.png", np.full((20, 20, 3), 100, np.uint8)), category="remove")
    builder.add_simple("wrongcat", category="add")
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "inpaint"}))
    e = _edits(out).set_index("sample_id")
    assert (e.status == "skipped").all()
    assert "mask" in e.loc["nomask", "reason"] and "nomask" in e.loc["nomask", "reason"]
    assert "remove" in e.loc["wrongcat", "reason"]


def test_unpreparable_method_skips_every_sample_with_reason(builder, tmp_path):
    builder.add_simple("a")
    builder.add_simple("b")
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "test_unprepared"})
    out = run_job(cfg)
    e = _edits(out)
    assert (e.status == "skipped").all()
    assert e.reason.str.contains("weights 'org/model' not found").all()
    assert run_job(cfg).computed == 2  # not cached: weights may appear later


def test_empty_and_full_masks_give_flagged_nan(builder, tmp_path):
    builder.add_simple("empty")
    builder.image("masks/empty.png", np.zeros((48, 64), np.uint8))
    builder.add_simple("full")
    builder.image("masks/full.png", np.full((48, 64), 255, np.uint8))
    out = run_job(job_config(builder.config(), tmp_path / "res"))
    s = _scores(out).set_index(["sample_id", "metric", "region"])
    assert np.isnan(s.loc[("empty", "l1", "edited"), "value"]) and s.loc[("empty", "l1", "edited"), "flag"] == "empty_region"
    assert np.isnan(s.loc[("full", "l1", "unedited"), "value"]) and s.loc[("full", "l1", "unedited"), "flag"] == "empty_region"
    assert s.loc[("full", "l1", "edited"), "value"] == 0


def test_same_seed_gives_identical_files(builder, tmp_path):
    for i in range(2):
        builder.add_simple(f"s{i}", seed=i, category="change_color", target_caption="a blue thing")
    outs = [run_job(job_config(builder.config(), tmp_path / f"r{k}", method={"name": "recolor"})) for k in range(2)]
    for name in ("scores.parquet",):
        assert (outs[0].job_dir / name).read_bytes() == (outs[1].job_dir / name).read_bytes()
    pngs = [sorted((tmp_path / f"r{k}").rglob("edit.png")) for k in range(2)]
    assert len(pngs[0]) == 2
    for a, b in zip(*pngs):
        assert a.relative_to(tmp_path / "r0") == b.relative_to(tmp_path / "r1")
        assert a.read_bytes() == b.read_bytes()


def test_unknown_names_fail_listing_what_exists(builder, tmp_path):
    from harness.method import ParamError
    from harness.registry import UnknownNameError

    builder.add_simple("a")
    with pytest.raises(UnknownNameError, match="available: .*identity.*inpaint"):
        Job(JobConfig.from_mapping(job_config(builder.config(), tmp_path, method={"name": "nope"})))
    with pytest.raises(ParamError, match="its parameters: algorithm"):
        Job(JobConfig.from_mapping(job_config(builder.config(), tmp_path, method={"name": "inpaint", "bogus": 1})))
    with pytest.raises(UnknownNameError, match="unknown metric 'nope'; available: .*l1"):
        Job(JobConfig.from_mapping(job_config(builder.config(), tmp_path, metrics={"items": {"nope": {}}})))
    with pytest.raises(UnknownNameError, match="dataset format"):
        Job(JobConfig.from_mapping(job_config({**builder.config(), "format": "nope"}, tmp_path)))


_KILL_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import methods, tests._test_methods_registry
from harness.runner import run_job
run_job(json.loads(sys.argv[1]))
"""


def test_sigkill_mid_sweep_then_rerun_loses_nothing(builder, tmp_path):
    n = 8
    for i in range(n):
        builder.add_simple(f"s{i}", seed=i)
    cfg = job_config(builder.config(), tmp_path / "killed", method={"name": "test_slow", "sleep": 0.3})
    stderr = tmp_path / "child.err"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_SCRIPT.format(repo=str(REPO)), json.dumps(cfg)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
        )
    edits_root = tmp_path / "killed" / "test" / "edits"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(edits_root.rglob("edit.json"))) < 3:
        time.sleep(0.05)
    exited = proc.poll()  # a child that ended by itself (crashed) says why
    if exited is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(edits_root.rglob("edit.json")))
    assert exited is None, f"the sweep ended by itself (exit {exited}) before the kill: {stderr.read_text()[-2000:]}"
    assert 3 <= done < n, done
    resumed = run_job(cfg)
    assert resumed.cached == done and resumed.computed == n - done
    reference = run_job(job_config(builder.config(), tmp_path / "clean", method={"name": "test_slow", "sleep": 0.3}))
    assert reference.computed == n
    # Same scores table, byte for byte, as an uninterrupted run.
    assert (resumed.job_dir / "scores.parquet").read_bytes() == (reference.job_dir / "scores.parquet").read_bytes()


def test_set_metrics_stream_in_batches_and_are_cached(builder, tmp_path):
    from . import _test_methods_registry as reg

    for i in range(5):
        builder.add_simple(f"s{i}", seed=i)
    metrics = {"protocol": "test", "batch_size": 2, "items": {"l1": {}, "test_set_mean": {}}}
    cfg = job_config(builder.config(), tmp_path / "res", metrics=metrics)
    reg.SET_CALLS.clear()
    out = run_job(cfg)
    assert reg.SET_CALLS == [2, 2, 1]
    s = _scores(out)
    rows = s[s.metric == "test_set_mean"].set_index("region")
    assert list(rows.sample_id.unique()) == ["__set__"]
    assert rows.loc["count", "value"] == 5
    assert set(s[s.metric == "l1"].sample_id) == {f"s{i}" for i in range(5)}
    reg.SET_CALLS.clear()
    again = run_job(cfg)
    assert reg.SET_CALLS == []  # cached
    assert (again.job_dir / "scores.parquet").read_bytes() == (out.job_dir / "scores.parquet").read_bytes()


def test_a_metric_error_on_one_edit_is_flagged_and_not_cached(builder, tmp_path):
    for i in range(4):
        builder.add_simple(f"s{i}", seed=i)
    metrics = {"protocol": "test", "batch_size": 4, "items": {"test_raises_on": {"bad": ["s2"]}, "l1": {}}}
    cfg = job_config(builder.config(), tmp_path / "res", metrics=metrics)
    out = run_job(cfg)
    s = _scores(out).query("metric == 'test_raises_on'").set_index("sample_id")
    assert s.loc["s2", "flag"] == "error:ValueError" and np.isnan(s.loc["s2", "value"])
    assert s.drop("s2").value.notna().all()  # the rest of the batch was scored one by one
    man = json.loads((out.job_dir / "manifest.json").read_text())
    assert "cannot score s2" in man["metric_errors"]["test_raises_on"][0]["error"]
    assert run_job(cfg).scored == 1  # only the errored score is retried


def test_missing_weights_report_the_metric_unavailable_with_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("EDIT_HARNESS_DLIB_PREDICTOR", "/nonexistent/predictor.dat")
    sample = {"name": "sample", "format": "generic", "root": str(REPO / "datasets" / "sample"), "ids": ["astronaut_smile"]}
    metrics = {"protocol": "test", "items": {"l1": {}, "landmark_mse": {}}}
    out = run_job(job_config(sample, tmp_path / "res", metrics=metrics))
    s = _scores(out)
    lm = s[s.metric == "landmark_mse"]
    assert len(lm) and lm.value.isna().all() and (lm.flag == "unavailable").all()
    assert s[s.metric == "l1"].value.notna().all()
    man = json.loads((out.job_dir / "manifest.json").read_text())
    assert "/nonexistent/predictor.dat" in man["metrics"]["landmark_mse"]["unavailable"]
    # not cached: once the weights are there, the metric is computed
    monkeypatch.delenv("EDIT_HARNESS_DLIB_PREDICTOR")
    again = run_job(job_config(sample, tmp_path / "res", metrics=metrics))
    assert again.scored == 1 and _scores(again).query("metric == 'landmark_mse'").value.notna().all()


def test_mean_floor_travels_from_metric_to_summary(builder, tmp_path):
    """A protocol that clamps the mean (CLIPScore) keeps per-edit rows raw; the summary clamps."""
    from harness.aggregate import load_run, summarize

    for i in range(3):
        builder.add_simple(f"s{i}", seed=i)
    metrics = {"protocol": "test", "items": {
        "clamped": {"metric": "test_signed_mean", "offset": 1000.0, "floor": 0.0},
        "raw": {"metric": "test_signed_mean", "offset": 1000.0},
    }}
    out = run_job(job_config(builder.config(), tmp_path / "res", metrics=metrics))
    s = _scores(out)
    assert (s.value < 0).all()  # per-edit rows unclamped
    assert s.set_index("metric").loc["clamped", "mean_floor"].eq(0.0).all()
    assert s.set_index("metric").loc["raw", "mean_floor"].isna().all()
    scores, _ = load_run(out.job_dir.parent.parent)
    summ = summarize(scores).set_index("metric")
    assert summ.loc["clamped", "mean"] == 0.0 and "mean_clamped_at: 0" in summ.loc["clamped", "flags"]
    assert summ.loc["raw", "mean"] < -700


def test_a_metric_that_fails_to_load_is_unavailable_not_fatal(builder, tmp_path):
    for i in range(3):
        builder.add_simple(f"s{i}", seed=i)
    metrics = {"protocol": "test", "regions": ["all"], "items": {"broken": {"metric": "test_load_fails"}, "l1": {}}}
    out = run_job(job_config(builder.config(), tmp_path / "res", metrics=metrics))
    s = _scores(out)
    broken = s[s.metric.str.startswith("broken")]
    # NaN rows under every name the metric writes, flagged, for every edit; l1 unaffected
    assert sorted(broken.metric.unique()) == ["broken_a", "broken_b"] and len(broken) == 6
    assert broken.value.isna().all() and (broken.flag == "unavailable").all()
    assert s[s.metric == "l1"].value.notna().all()
    man = json.loads((out.job_dir / "manifest.json").read_text())
    assert "checkpoint is corrupt" in json.dumps(man)
    assert run_job(job_config(builder.config(), tmp_path / "res", metrics=metrics)).scored == 3  # retried


# -- peak memory per edit ------------------------------------------------------------------------
def test_memory_probe_kinds_and_rss_peak():
    from harness.runner import _MemoryProbe, _rss_bytes

    if _rss_bytes() == 0:
        pytest.skip("no /proc/self/statm on this platform: the rss probe falls back to tracemalloc")
    with _MemoryProbe("auto", uses_torch=False) as p:
        a = np.ones(2**20, dtype=np.float64)  # 8 MiB, seen by tracemalloc (NumPy reports to it)
    assert p.kind == "tracemalloc" and p.peak >= 8 * 2**20
    del a
    start = _rss_bytes()
    with _MemoryProbe("auto", uses_torch=True) as p:  # a torch method on the CPU: resident set size
        b = np.ones(64 * 2**17, dtype=np.float64)  # 64 MiB, touched, so resident
        time.sleep(0.05)  # at least a few 5 ms samples while it is alive
        del b
    assert p.kind == "rss" and p.peak - start >= 48 * 2**20  # the process's peak, the array included
    with _MemoryProbe("off") as p:
        pass
    assert p.kind == "off" and p.peak is None
    with pytest.raises(ValueError, match="memory must be"):
        _MemoryProbe("heap")
