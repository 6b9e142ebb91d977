"""DiffEditor's experiments (conf/experiment/diffeditor_*.yaml) composed as `edit-harness run` composes
them, the embedded samples they run on, tiny runs (Table 2's tasks; Table 1's face drag is slow), the
benchmark's refusals, and the published-table mappings
(results/paper/diffeditor/table*.compare.yaml) checked on synthetic scores."""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from harness.compare import compare, load_mapping
from harness.paper import load_table
from harness.runner import canonical_params

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "conf" / "experiment"
TABLE1 = ["usercontrollablelt", "draggan", "dragdiffusion", "dragondiffusion", "diffeditor"]
TABLE2 = ["paint_by_example", "self_guidance", "dragondiffusion", "diffeditor"]
TABLE1_NAMES = ["UserControllableLT", "DragGAN", "DragDiff", "DragonDiff", "DiffEditor (Ours)"]
TABLE2_NAMES = ["Pain-by-example", "Self-Guidance", "DragonDiff", "Ours"]
FACE_IDS = ["astronaut_smile", "grace_hopper_shift_right"]
TASK_IDS = {"paste": "astronaut_paste_dahlia", "move": "rocket_move_left", "appearance": "astronaut_suit_navy"}
ABLATION_IDS = ["rocket_drag_taller", "astronaut_smile", "rocket_move_left", "astronaut_paste_dahlia",
                "astronaut_suit_navy"]
# Method name -> module that registers it (until methods/__init__.py imports them all).
MODULES = {"diffeditor": "methods.diffeditor", "dragondiffusion": "methods.dragondiffusion",
           "dragdiffusion": "methods.dragdiffusion", "self_guidance": "methods.self_guidance",
           "draggan": "methods.draggan", "usercontrollablelt": "methods.usercontrollablelt",
           "paint_by_example": "methods.paint_by_example"}


def _experiment(name: str) -> dict:
    return yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())


def _manifest() -> dict[str, dict]:
    lines = (REPO / "datasets" / "sample" / "manifest.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, filter(None, lines))}


def require_methods(names) -> None:
    """Register the methods an experiment sweeps, or skip naming the ones that are not there yet."""
    missing = []
    for name in dict.fromkeys(names):
        if not (REPO / "conf" / "method" / f"{name}.yaml").is_file():
            missing.append(f"{name} (no conf/method/{name}.yaml)")
            continue
        try:
            importlib.import_module(MODULES[name])
        except ImportError as e:
            missing.append(f"{name} ({MODULES[name]}: {e})")
    if missing:
        pytest.skip("methods not in this checkout yet: " + "; ".join(missing))


# -- the YAMLs themselves (no method needed) ----------------------------------------------------
@pytest.mark.parametrize("name, methods, tables, ids", [
    ("diffeditor_table1", TABLE1, ["diffeditor/table1"], FACE_IDS),
    ("diffeditor_table2", TABLE2, ["diffeditor/table2"], list(TASK_IDS.values())),
    ("diffeditor_ablation", ["diffeditor"], [], ABLATION_IDS),
])
def test_experiment_files(name, methods, tables, ids):
    e = _experiment(name)
    assert e["defaults"] == [{"override /dataset": "sample"}, {"override /metrics": "diffeditor"}]
    assert e["run_name"] == name and e["paper_tables"] == tables
    assert e["cache_dir"] == "${results_dir}/diffeditor_edits"  # one edit cache for all three
    assert e["hydra"]["mode"] == "MULTIRUN"
    assert e["hydra"]["sweeper"]["params"]["method"].split(",") == methods
    assert e["dataset"]["ids"] == ids
    manifest = _manifest()
    assert all(i in manifest for i in ids)


def test_the_embedded_samples_cover_every_task():
    """The experiments' default samples: two face drags (68 dlib points), a generic drag, a move, a
    paste and an appearance replacement, each with the fields its task needs."""
    from harness.data import GenericDataset

    ds = GenericDataset(REPO / "datasets" / "sample")
    refs = {r.id: r for r in ds.refs()}
    for sid in FACE_IDS:
        s = ds.load(refs[sid])
        assert s.category == "face_drag" and s.point_layout == "dlib68" and s.target_points.shape == (68, 2)
    drag = ds.load(refs["rocket_drag_taller"])
    assert drag.category == "drag" and drag.point_layout == "drag" and drag.source_points.shape == (1, 2)
    (x, y), (tx, ty) = drag.source_points[0], drag.target_points[0]
    assert tx == x and ty == y - 48 and drag.mask[int(y), int(x)] and drag.mask[int(ty), int(tx)]
    assert drag.mask.sum() < 0.1 * drag.mask.size  # a region around the rocket's top, not the image
    move = ds.load(refs[TASK_IDS["move"]])
    assert move.category == "move" and move.source_points.shape == (1, 2) and move.mask.any()
    for task in ("paste", "appearance"):
        s = ds.load(refs[TASK_IDS[task]])
        assert s.category == task and s.reference is not None and s.reference_mask is not None and s.mask.any()
        assert s.reference_mask.shape == s.reference.shape[:2] and s.reference_mask.any()
        assert s.target_caption and s.target_caption != s.source_caption
    app = ds.load(refs[TASK_IDS["appearance"]])
    # the reference object is Grace Hopper's dark jacket: dark pixels, in the lower half of her photo
    ys, _ = np.nonzero(app.reference_mask)
    assert ys.mean() > 0.65 * app.reference.shape[0]
    assert app.reference[app.reference_mask].mean() < 60
    # the appearance sample's region is the astronaut's suit torso (the part sample's mask)
    np.testing.assert_array_equal(app.mask, ds.load(refs["astronaut_torso_armor"]).mask)


# -- composed as `run` composes them (needs the methods) ------------------------------------------
def _jobs(experiment: str, *extra: str):
    from harness.cli import check_jobs

    return check_jobs([f"experiment={experiment}", *extra], multirun=False)


def test_table1_jobs():
    require_methods(TABLE1)
    jobs = _jobs("diffeditor_table1")
    assert jobs.swept == ["method"] and [c["method"]["name"] for c in jobs.configs] == TABLE1
    for c in jobs.configs:
        assert c["metrics"]["protocol"] == "diffeditor" and set(c["metrics"]["items"]) >= {"landmark_mse", "fid"}
        assert c["dataset"]["name"] == "sample" and c["dataset"]["ids"] == FACE_IDS
        assert c["paper_tables"] == ["diffeditor/table1"]
    # the CelebA-HQ set: dataset=face_drag with ids=null (conf/dataset/face_drag.yaml)
    face = _jobs("diffeditor_table1", "dataset=face_drag", "dataset.root=datasets/sample", "dataset.ids=null")
    assert all(c["dataset"]["name"] == "face_drag" and c["dataset"]["ids"] is None for c in face.configs)


def test_table2_jobs():
    require_methods(TABLE2)
    jobs = _jobs("diffeditor_table2")
    assert jobs.swept == ["method"] and [c["method"]["name"] for c in jobs.configs] == TABLE2
    for c in jobs.configs:
        assert c["metrics"]["items"]["clip_t"]["text_field"] == "target_caption"
        assert c["dataset"]["ids"] == list(TASK_IDS.values())


def test_ablation_jobs_are_the_eight_switch_settings():
    require_methods(["diffeditor"])
    from harness.runner import build_method

    jobs = _jobs("diffeditor_ablation")
    keys = ["image_prompt", "regional_sde", "time_travel"]
    assert jobs.swept == [f"method.{k}" for k in keys]
    got = []
    for c in jobs.configs:
        params = build_method(c["method"]).resolved_params()
        got.append(tuple(params[k] for k in keys))
    assert sorted(got) == sorted((a, b, t) for a in (True, False) for b in (True, False) for t in (True, False))
    # the full method's point is the default diffeditor job of the tables (one edit, shared cache)
    (full,) = [c for c, g in zip(jobs.configs, got) if g == (True, True, True)]
    (table2,) = _jobs("diffeditor_table2", "method=diffeditor").configs
    assert table2["cache_dir"] == full["cache_dir"]
    assert canonical_params(build_method(full["method"]).resolved_params()) == \
        canonical_params(build_method(table2["method"]).resolved_params())


# -- tiny runs through the harness ---------------------------------------------------------------
TINY = ["++method.backbone=tiny", "metrics.allow_random_weights=true", "progress=false", "report=false"]


def _tiny_run(tmp_path, experiment: str, method: str, ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    from harness.cli import main

    args = ["run", f"experiment={experiment}", f"method={method}", f"dataset.ids=[{','.join(ids)}]",
            f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'edits'}", *TINY]
    assert main(args) == 0
    (table,) = (tmp_path / experiment / "jobs").glob("*/edits.parquet")
    return pd.read_parquet(table), pd.read_parquet(table.parent / "scores.parquet")


@pytest.mark.slow  # about 15 s of CPU (dlib, random Inception and CLIP built for one edit)
def test_tiny_table1_run_scores_landmarks_and_fid(tmp_path):
    require_methods(["dragondiffusion"])
    edits, scores = _tiny_run(tmp_path, "diffeditor_table1", "dragondiffusion", FACE_IDS[:1])
    assert list(edits.sample_id) == FACE_IDS[:1] and (edits.status == "ok").all(), edits.reason.tolist()
    assert (edits.prep_seconds > 0).all() and (edits.infer_seconds > 0).all()
    rows = scores.set_index(["sample_id", "metric", "region"])["value"]
    for sid in FACE_IDS[:1]:
        # the no-edit distance is the sample's own (source vs target points, both known exactly)
        rec = _manifest()[sid]
        d = np.sum((np.asarray(rec["source_points"], float) - np.asarray(rec["target_points"], float)) ** 2, axis=1)
        assert rows[(sid, "landmark_mse_noedit", "68pt")] == pytest.approx(d.mean())
        assert rows[(sid, "landmark_mse_noedit", "17pt")] == pytest.approx(d[:17].mean())
    # the edit's landmarks were scored (random weights: any face or none; a NaN names why)
    lm = scores[scores.metric == "landmark_mse"]
    assert set(lm.region) == {"68pt", "17pt"} and (lm.value.notna() | lm.flag.notna()).all()
    # FID is a set metric: one edit is too few for a covariance, a NaN row flagged so
    fid = scores[scores.metric == "fid"]
    assert len(fid) == 1 and fid.value.isna().all() and (fid.flag == "too_few").all()


def test_tiny_table2_run_edits_every_task(tmp_path):
    require_methods(["diffeditor"])
    edits, scores = _tiny_run(tmp_path, "diffeditor_table2", "diffeditor", list(TASK_IDS.values()))
    assert sorted(edits.sample_id) == sorted(TASK_IDS.values()) and (edits.status == "ok").all(), edits.reason.tolist()
    clip = scores[(scores.metric == "clip_t") & (scores.region == "all")]
    assert set(clip.sample_id) == set(TASK_IDS.values()) and clip.value.notna().all()


# -- the published tables' mappings (synthetic scores; no method needed) ---------------------------
def test_table_mappings_name_the_experiments_methods():
    m1 = load_mapping("diffeditor/table1")
    assert {k: v.method for k, v in m1.methods.items()} == dict(zip(TABLE1_NAMES, TABLE1))
    # the 68-point rows and the time rows (setting ""), which are the runner's cost columns
    assert all(v.setting == ("68 points", "") and v.params == {} for v in m1.methods.values())
    assert set(m1.unmapped_methods) == {"Initial distance (no edit)"}
    assert {k: (v.metric, v.region) for k, v in m1.metrics.items()} == {
        "Landmark MSE": ("landmark_mse", "68pt"), "FID": ("fid", "all"),
        "Preparing complexity": ("cost_prep_s", "all"), "Inference complexity": ("cost_infer_s", "all")}
    assert not m1.unmapped_metrics
    m2 = load_mapping("diffeditor/table2")
    assert {k: v.method for k, v in m2.methods.items()} == dict(zip(TABLE2_NAMES, TABLE2))
    assert m2.methods["Pain-by-example"].setting == ("Pasting",)
    # each task's column reads the scores of that task's samples only
    assert {k: v.categories for k, v in m2.settings.items()} == {
        "Pasting": ("paste",), "Moving": ("move",), "Replacing": ("appearance",)}
    assert {k: (v.metric, v.region, v.factor) for k, v in m2.metrics.items()} == {"CLIP": ("clip_t", "all", 1.0)}


def _write_job(run_dir: Path, method: str, rows: list[tuple[str, str, str, float]],
               categories: dict[str, str] | None = None) -> None:
    """One job's scores.parquet / edits.parquet with the runner's columns; rows: (sample, metric,
    region, value); ``categories``: sample -> category (default face_drag)."""
    job = f"{method}-face_drag-0"
    samples = sorted({r[0] for r in rows})
    base = {s: dict(run=run_dir.name, job=job, method=method, method_version="1", params=canonical_params({}),
                    dataset="face_drag", sample_id=s, category=(categories or {}).get(s, "face_drag"), seed=0, edit_key=f"{job}-{s}")
            for s in samples}
    edits = [{**b, "status": "ok", "reason": None, "flags": "", "notes": "", "prep_seconds": 1.0,
              "infer_seconds": 2.0, "peak_memory_bytes": 1.0, "model_revision": None} for b in base.values()]
    scores = [{**base[s], "metric": m, "region": r, "value": float(v), "flag": None, "higher_is_better": False,
               "protocol": "diffeditor", "weights": "synthetic weights", "region_rule": "points",
               "mean_floor": math.nan} for s, m, r, v in rows]
    folder = run_dir / "jobs" / job
    folder.mkdir(parents=True)
    pd.DataFrame(scores).to_parquet(folder / "scores.parquet")
    pd.DataFrame(edits).to_parquet(folder / "edits.parquet")


def test_table1_compares_the_68_point_rows_only(tmp_path):
    """A run of the five methods: Landmark MSE (68 points) is each method's landmark_mse/68pt mean and
    FID its fid; the time rows read the runner's seconds per edit; the 17-point rows say why they are not compared."""
    run = tmp_path / "diffeditor_table1"
    n = 6
    noise = np.random.default_rng(16).standard_normal(n)
    noise -= noise.mean()  # exact means (to rounding)
    levels = {m: (10.0 + i, 30.0 + i) for i, m in enumerate(TABLE1)}
    for m, (mse, fid) in levels.items():
        rows = [(f"face_{i}", "landmark_mse", "68pt", mse + noise[i]) for i in range(n)]
        rows += [(f"face_{i}", "landmark_mse", "17pt", 2 * mse + noise[i]) for i in range(n)]
        rows += [("face_0", "fid", "all", fid)]  # a set metric: one row
        _write_job(run, m, rows)
    res = compare(run, "diffeditor/table1")
    f = res.frame.set_index(["setting", "paper_method", "paper_metric"])
    paper = load_table("diffeditor/table1")
    for name, m in zip(TABLE1_NAMES, TABLE1):
        r = f.loc[("68 points", name, "Landmark MSE")]
        assert r["status"] == "compared" and r["method"] == m and r["region"] == "68pt" and r["n"] == n
        assert r["ours_mean"] == pytest.approx(levels[m][0], abs=1e-9)
        published = float(paper[(paper.method == name) & (paper.metric == "Landmark MSE")
                                & (paper.setting == "68 points")].value.iloc[0])
        assert r["published"] == published and r["delta"] == pytest.approx(levels[m][0] - published, abs=1e-9)
        assert f.loc[("68 points", name, "FID")]["ours_mean"] == pytest.approx(levels[m][1])
        for metric in ("Landmark MSE", "FID"):
            r17 = f.loc[("17 points", name, metric)]
            assert r17["status"] == "not in this run" and r17["why"] == "method mapped for setting '68 points' / '' only"
        # the runner's seconds per edit (_write_job: 1 s preparation, 2 s inference)
        assert f.loc[("", name, "Preparing complexity")]["ours_mean"] == pytest.approx(1.0)
        assert f.loc[("", name, "Inference complexity")]["ours_mean"] == pytest.approx(2.0)
    assert (res.frame["status"] == "compared").sum() == 20


def test_table2_pastes_only_with_paint_by_example(tmp_path):
    run = tmp_path / "diffeditor_table2"
    task_value = {"paste": 0.0, "move": 0.001, "appearance": 0.002}  # a different score per task
    for i, m in enumerate(TABLE2):
        rows = [(s, "clip_t", "all", 0.25 + 0.01 * i + task_value[t]) for t, s in TASK_IDS.items()]
        _write_job(run, m, rows, categories={s: t for t, s in TASK_IDS.items()})
    res = compare(run, "diffeditor/table2")
    f = res.frame.set_index(["setting", "paper_method", "paper_metric"])
    # each column is the method's score on that task's sample only
    assert f.loc[("Pasting", "Pain-by-example", "CLIP")]["ours_mean"] == pytest.approx(0.25)
    assert f.loc[("Moving", "DragonDiff", "CLIP")]["ours_mean"] == pytest.approx(0.271)
    assert f.loc[("Replacing", "Ours", "CLIP")]["ours_mean"] == pytest.approx(0.282)
    assert f.loc[("Replacing", "Ours", "CLIP")]["n"] == 1
    assert (res.frame["status"] == "compared").sum() == 9  # every published number of Table 2


# -- the speed benchmark's checks (its tiny run is in the report; --full needs a GPU) --------------
def test_benchmark_refuses_full_size_without_a_gpu_and_unknown_methods(monkeypatch, capsys):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_diffeditor", REPO / "benchmarks" / "bench_diffeditor.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.PAPER == {"diffeditor": (3.53, 13.88), "dragondiffusion": (3.53, 15.00)}  # Table 1, A100
    monkeypatch.setattr(sys, "argv", ["bench_diffeditor.py", "--methods", "diffeditor,nosuch"])
    assert bench.main() == 2 and "unknown method(s) nosuch" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench_diffeditor.py", "--full"])
    assert bench.main() == 2 and "--full needs a CUDA GPU" in capsys.readouterr().err
