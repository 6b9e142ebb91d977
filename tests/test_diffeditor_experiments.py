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
    from harness.runner import build_method

    jobs = _jobs("diffeditor_table1")
    # every method at both settings of the table: all (68 points dragged) and 17pt (the jaw 0-16)
    assert jobs.swept == ["method", "method.point_subset"] and len(jobs.configs) == 10
    assert [(c["method"]["name"], c["method"]["point_subset"]) for c in jobs.configs] == [
        (m, p) for m in TABLE1 for p in ("all", "17pt")]
    for c in jobs.configs:
        assert build_method(c["method"]).resolved_params()["point_subset"] == c["method"]["point_subset"]
        assert c["metrics"]["protocol"] == "diffeditor" and set(c["metrics"]["items"]) >= {"landmark_mse", "fid"}
        assert c["dataset"]["name"] == "sample" and c["dataset"]["ids"] == FACE_IDS
        assert c["paper_tables"] == ["diffeditor/table1"]
    # the CelebA-HQ set: dataset=face_drag with ids=null (conf/dataset/face_drag.yaml)
    face = _jobs("diffeditor_table1", "dataset=face_drag", "dataset.root=datasets/sample", "dataset.ids=null")
    assert all(c["dataset"]["name"] == "face_drag" and c["dataset"]["ids"] is None for c in face.configs)
    assert len(face.configs) == 10


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
    tables = sorted((tmp_path / experiment / "jobs").glob("*/edits.parquet"))
    assert tables
    return (pd.concat([pd.read_parquet(t) for t in tables], ignore_index=True),
            pd.concat([pd.read_parquet(t.parent / "scores.parquet") for t in tables], ignore_index=True))


@pytest.mark.slow  # about 25 s of CPU (dlib, random Inception and CLIP built for two edits)
def test_tiny_table1_run_scores_landmarks_and_fid(tmp_path):
    require_methods(["dragondiffusion"])
    from harness.aggregate import parse_params
    from harness.cache import EditStore

    edits, scores = _tiny_run(tmp_path, "diffeditor_table1", "dragondiffusion", FACE_IDS[:1])
    # the two settings' jobs (point_subset all and 17pt), one edit each
    subsets = [parse_params(p)["point_subset"] for p in edits.params]
    assert sorted(subsets) == ["17pt", "all"] and list(edits.sample_id) == FACE_IDS[:1] * 2
    assert (edits.status == "ok").all(), edits.reason.tolist()
    assert (edits.prep_seconds > 0).all() and (edits.infer_seconds > 0).all()
    store = EditStore(tmp_path / "edits")
    dragged = {sub: store.get(key).meta["info"]["dragged_points"] for sub, key in zip(subsets, edits.edit_key)}
    assert dragged == {"all": 68, "17pt": 17}
    scores = scores[[parse_params(p)["point_subset"] == "all" for p in scores.params]]
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
    # every setting of every method; the setting selects the parameter point (17pt jobs for the
    # "17 points" rows, the all jobs for the 68-point and time rows) and, for 17 points, the
    # landmark region of the 17 dragged points (FID keeps its own region)
    assert all(v.setting is None and v.params == {} for v in m1.methods.values())
    assert {k: (v.params, v.region, v.metric_regions, v.categories) for k, v in m1.settings.items()} == {
        "68 points": ({"point_subset": "all"}, None, {}, None), "": ({"point_subset": "all"}, None, {}, None),
        "17 points": ({"point_subset": "17pt"}, None, {"Landmark MSE": "17pt"}, None)}
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
               categories: dict[str, str] | None = None, params: dict | None = None,
               seconds: tuple[float, float] = (1.0, 2.0)) -> None:
    """One job's scores.parquet / edits.parquet with the runner's columns; rows: (sample, metric,
    region, value); ``categories``: sample -> category (default face_drag); ``params``: the job's
    parameter point; ``seconds``: every edit's (preparation, inference) seconds."""
    job = f"{method}-face_drag-{len(list(run_dir.glob('jobs/*')))}"
    samples = sorted({r[0] for r in rows})
    base = {s: dict(run=run_dir.name, job=job, method=method, method_version="1", params=canonical_params(params or {}),
                    dataset="face_drag", sample_id=s, category=(categories or {}).get(s, "face_drag"), seed=0, edit_key=f"{job}-{s}")
            for s in samples}
    edits = [{**b, "status": "ok", "reason": None, "flags": "", "notes": "", "prep_seconds": seconds[0],
              "infer_seconds": seconds[1], "peak_memory_bytes": 1.0, "model_revision": None} for b in base.values()]
    scores = [{**base[s], "metric": m, "region": r, "value": float(v), "flag": None, "higher_is_better": False,
               "protocol": "diffeditor", "weights": "synthetic weights", "region_rule": "points",
               "mean_floor": math.nan} for s, m, r, v in rows]
    folder = run_dir / "jobs" / job
    folder.mkdir(parents=True)
    pd.DataFrame(scores).to_parquet(folder / "scores.parquet")
    pd.DataFrame(edits).to_parquet(folder / "edits.parquet")


def test_table1_compares_both_settings(tmp_path):
    """A run of the five methods at both parameter points of the experiment (point_subset all and
    17pt, different scores and times): Landmark MSE (68 points) is each method's landmark_mse/68pt
    mean of the all job and FID its fid; Landmark MSE (17 points) is landmark_mse/17pt of the 17pt
    job and FID that job's fid; the time rows read the all job's seconds per edit; nothing is ambiguous."""
    run = tmp_path / "diffeditor_table1"
    n = 6
    noise = np.random.default_rng(16).standard_normal(n)
    noise -= noise.mean()  # exact means (to rounding)
    levels = {m: (10.0 + i, 30.0 + i) for i, m in enumerate(TABLE1)}
    for m, (mse, fid) in levels.items():
        for subset, k in (("all", 1.0), ("17pt", 5.0)):  # the 17pt job: other values everywhere
            rows = [(f"face_{i}", "landmark_mse", "68pt", k * mse + noise[i]) for i in range(n)]
            rows += [(f"face_{i}", "landmark_mse", "17pt", 2 * k * mse + noise[i]) for i in range(n)]
            rows += [("face_0", "fid", "all", k * fid)]  # a set metric: one row
            _write_job(run, m, rows, params={"point_subset": subset}, seconds=(k, 2 * k))
    res = compare(run, "diffeditor/table1")
    assert "ambiguous" not in set(res.frame["status"])
    f = res.frame.set_index(["setting", "paper_method", "paper_metric"])
    paper = load_table("diffeditor/table1")
    for name, m in zip(TABLE1_NAMES, TABLE1):
        r = f.loc[("68 points", name, "Landmark MSE")]
        assert r["status"] == "compared" and r["method"] == m and r["region"] == "68pt" and r["n"] == n
        assert r["params"] == "point_subset=all"
        assert r["ours_mean"] == pytest.approx(levels[m][0], abs=1e-9)
        published = float(paper[(paper.method == name) & (paper.metric == "Landmark MSE")
                                & (paper.setting == "68 points")].value.iloc[0])
        assert r["published"] == published and r["delta"] == pytest.approx(levels[m][0] - published, abs=1e-9)
        assert f.loc[("68 points", name, "FID")]["ours_mean"] == pytest.approx(levels[m][1])
        r17 = f.loc[("17 points", name, "Landmark MSE")]
        assert r17["status"] == "compared" and r17["region"] == "17pt" and r17["params"] == "point_subset=17pt"
        assert r17["ours_mean"] == pytest.approx(2 * 5.0 * levels[m][0], abs=1e-9) and r17["n"] == n
        f17 = f.loc[("17 points", name, "FID")]
        assert f17["status"] == "compared" and f17["region"] == "all" and f17["params"] == "point_subset=17pt"
        assert f17["ours_mean"] == pytest.approx(5.0 * levels[m][1])
        # the runner's seconds per edit (_write_job: 1 s preparation, 2 s inference)
        assert f.loc[("", name, "Preparing complexity")]["ours_mean"] == pytest.approx(1.0)
        assert f.loc[("", name, "Inference complexity")]["ours_mean"] == pytest.approx(2.0)
    assert (res.frame["status"] == "compared").sum() == 30  # all but the two no-edit reference numbers
    assert set(res.frame.loc[res.frame.status != "compared", "paper_method"]) == {"Initial distance (no edit)"}


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
