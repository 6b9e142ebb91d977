"""CPAM's experiments (conf/experiment/cpam_*.yaml) composed as `edit-harness run` composes them,
and the published-table mapping they are compared through (results/paper/cpam/table2.compare.yaml)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import harness.data
import methods.cpam  # noqa: F401  (registers "cpam" until methods/__init__ imports it)
import methods.fpe  # noqa: F401  (registers "fpe")
import methods.imagic  # noqa: F401  (registers "imagic")
from harness.cli import check_jobs, main
from harness.compare import compare, load_mapping
from harness.data import open_dataset
from harness.data.imba import EDIT_TYPES
from harness.runner import EDIT_COLUMNS, SCORE_COLUMNS, build_method, canonical_params

from .conftest import REPO, DatasetBuilder, disc_mask, textured
from .test_data_tedbench import row as ted_row
from .test_data_tedbench import write_parquet

# Table 2's rows, in its order (SDEdit, MasaCtrl, PnP, FPE, DiffEdit, Pix2Pix-Zero, LEDITS++, Imagic, CPAM)
TABLE2_METHODS = ["sdedit", "masactrl", "plug_and_play", "fpe", "diffedit", "pix2pix_zero", "ledits_pp", "imagic",
                  "cpam"]
PAPER_NAMES = ["SDEdit", "MasaCtrl", "PnP", "FPE", "DiffEdit", "Pix2Pix-Zero", "LEDITS++", "Imagic (FT)", "CPAM (Ours)"]


@pytest.fixture(scope="module")
def ted_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ted") / "tedbench"
    write_parquet(root / "data" / "val-00000-of-00001.parquet", [ted_row(i) for i in range(3)])
    return root


@pytest.fixture(scope="module")
def imba_root(tmp_path_factory) -> Path:
    """One sample per IMBA edit type."""
    b = DatasetBuilder(tmp_path_factory.mktemp("imba") / "imba", name="imba")
    for i, t in enumerate(EDIT_TYPES):
        src = b.image(f"images/{t}.png", textured(48, 64, i))
        mask = b.image(f"masks/{t}.png", disc_mask(48, 64, 24, 32, 10))
        b.add(id=f"s_{t}", source=src, mask=mask, category=t, target_caption=f"a photo after {t}",
              meta={"object_prompt": "dog"})
    return b.root


def jobs_of(experiment: str, root: Path, *extra: str):
    return check_jobs([f"experiment={experiment}", f"dataset.root={root}", *extra], multirun=False)


def _check_cpam_protocol(cfg: dict) -> None:
    m = cfg["metrics"]
    assert m["protocol"] == "cpam" and m["reference"] == "source" and m["regions"] == ["unedited"]
    assert set(m["items"]) == {"clipscore", "lpips_background"}
    assert m["items"]["clipscore"]["text_field"] == "target_caption" and m["allow_random_weights"] is False
    assert cfg["cache_dir"] == f"{cfg['results_dir']}/cpam_edits"  # one edit cache for the CPAM experiments


def _missing_fields(cfg: dict) -> dict[str, list[str]]:
    """Per job's method: the fields it requires that the dataset's first sample lacks."""
    ds = open_dataset(cfg["dataset"])
    sample = ds.load(ds.refs()[0])
    method = build_method(cfg["method"])
    return {cfg["method"]["name"]: sample.missing([f for f in method.requires])}


# -- the jobs each experiment makes ------------------------------------------------------------
def test_cpam_table2_runs_the_nine_methods_on_tedbench_with_empty_source_captions(ted_root):
    jobs = jobs_of("cpam_table2", ted_root)
    assert jobs.multirun and jobs.swept == ["method"]
    assert jobs.points == [[f"method={m}", "experiment=cpam_table2", f"dataset.root={ted_root}"]
                           for m in TABLE2_METHODS]
    assert [c["method"]["name"] for c in jobs.configs] == TABLE2_METHODS
    missing: dict[str, list[str]] = {}
    for c in jobs.configs:
        _check_cpam_protocol(c)
        ds = c["dataset"]
        assert ds["name"] == "tedbench" and ds["format"] == "tedbench" and ds["root"] == str(ted_root)
        assert ds["source_caption_rule"] == "empty" and ds["limit"] is None and ds["ids"] is None
        assert c["run_name"] == "cpam_table2" and c["paper_tables"] == ["cpam/table2"]
        assert build_method(c["method"]).resolved_params().get("backbone", "real") == "real"
        missing.update(_missing_fields(c))
    # every method has the fields it needs on TEdBench (the empty source caption included), except
    # what TEdBench cannot give: a mask (background LPIPS is then NaN, flagged no_mask)
    assert {m: f for m, f in missing.items() if f} == {m: ["mask"] for m in missing if "mask" in missing[m]}
    assert all(f in ([], ["mask"]) for f in missing.values())


def test_cpam_table2_imba_is_the_same_jobs_on_an_imba_folder(imba_root, ted_root):
    jobs = jobs_of("cpam_table2_imba", imba_root)
    ted = jobs_of("cpam_table2", ted_root)
    assert jobs.swept == ["method"] and [c["method"] for c in jobs.configs] == [c["method"] for c in ted.configs]
    for c in jobs.configs:
        _check_cpam_protocol(c)
        assert c["dataset"]["format"] == "imba" and c["dataset"]["root"] == str(imba_root)
        assert "source_caption_rule" not in c["dataset"]
        assert c["run_name"] == "cpam_table2_imba" and c["paper_tables"] == ["cpam/table2"]
    ds = open_dataset(jobs.configs[0]["dataset"])
    assert sorted(r.category for r in ds.refs()) == sorted(EDIT_TYPES.values())


def test_cpam_table2_without_the_data_is_one_line_naming_the_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness.data, "RESOURCE_ROOT", tmp_path / "resources")
    assert main(["run", "experiment=cpam_table2", f"results_dir={tmp_path / 'results'}"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "Traceback" not in out.err
    assert out.err.startswith("edit-harness: job 1 of 9 (method=sdedit) and 8 more: dataset 'tedbench': TEdBench not "
                              "found: data/tedbench")
    assert "huggingface-cli download bahjat-kawar/tedbench" in out.err
    assert not (tmp_path / "results").exists()


# -- the published table's mapping --------------------------------------------------------------
def test_table2_maps_all_nine_methods():
    m = load_mapping("cpam/table2")
    assert m.unmapped_methods == {} and m.unmapped_metrics == {}
    assert {k: v.method for k, v in m.methods.items()} == dict(zip(PAPER_NAMES, TABLE2_METHODS))
    assert all(v.params == {} for v in m.methods.values())
    assert {k: (v.metric, v.region, v.factor) for k, v in m.metrics.items()} == {
        "CLIPScore": ("clipscore", "all", 1.0), "LPIPS (background)": ("lpips_background", "unedited", 1.0)}


def _write_job(run_dir: Path, method: str, clip: np.ndarray, lpips: np.ndarray | None) -> None:
    """One job's scores.parquet / edits.parquet with the runner's columns: clipscore on the whole
    image; lpips_background on the unedited region, NaN flagged no_mask when ``lpips`` is None."""
    job = f"{method}-tedbench-0"
    base = [dict(run=run_dir.name, job=job, method=method, method_version="1", params=canonical_params({}),
                 dataset="tedbench", sample_id=f"tedbench_{i:03d}", category=None, seed=0, edit_key=f"{job}-{i}")
            for i in range(len(clip))]
    edits = [{**b, "status": "ok", "reason": None, "flags": "", "notes": "", "prep_seconds": 0.1,
              "infer_seconds": 0.2, "peak_memory_bytes": 1.0, "model_revision": None} for b in base]
    common = dict(protocol="cpam", weights="synthetic weights", region_rule="zero_fill", mean_floor=math.nan)
    scores = [{**b, "metric": "clipscore", "region": "all", "value": float(v), "flag": None,
               "higher_is_better": True, **common} for b, v in zip(base, clip)]
    for i, b in enumerate(base):
        v = math.nan if lpips is None else float(lpips[i])
        scores.append({**b, "metric": "lpips_background", "region": "unedited", "value": v,
                       "flag": "no_mask" if lpips is None else None, "higher_is_better": False, **common})
    d = run_dir / "jobs" / job
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(scores, columns=SCORE_COLUMNS).to_parquet(d / "scores.parquet", index=False)
    pd.DataFrame(edits, columns=EDIT_COLUMNS).to_parquet(d / "edits.parquet", index=False)


def test_a_tedbench_run_compares_clipscore_and_names_the_dataset(tmp_path):
    """A run of the nine methods on TEdBench (no masks): every CLIPScore row is compared with its
    method's mean; background LPIPS has no value; the caption names IMBA for the paper and
    tedbench for ours."""
    rng = np.random.default_rng(2)
    noise = rng.standard_normal(20)
    noise -= noise.mean()  # exact means (to rounding): the job's mean is its level
    run = tmp_path / "cpam_table2"
    levels = {m: 27.0 + 0.25 * i for i, m in enumerate(TABLE2_METHODS)}
    for m, level in levels.items():
        _write_job(run, m, level + 0.5 * noise, None)
    res = compare(run, "cpam/table2")
    f = res.frame.set_index(["paper_method", "paper_metric"])
    assert len(f) == 18
    for name, m in zip(PAPER_NAMES, TABLE2_METHODS):
        r = f.loc[(name, "CLIPScore")]
        assert r["status"] == "compared" and r["method"] == m and r["dataset"] == "tedbench" and r["n"] == 20
        assert r["ours_mean"] == pytest.approx(levels[m], abs=1e-9)
        assert r["delta"] == pytest.approx(levels[m] - r["published"], abs=1e-9)
        lp = f.loc[(name, "LPIPS (background)")]
        # no mask on TEdBench: no background LPIPS value (NaN rows, n = 0): not compared, and why
        assert lp["method"] == m and lp["n"] == 0 and math.isnan(lp["ours_mean"])
        assert lp["status"] == "not in this run" and "has no value on any sample" in lp["why"]
    caption = "\n".join(res.caption)
    assert "dataset: IMBA (built on TEdBench), 104 samples" in caption
    assert "Ours: protocol cpam; weights: synthetic weights; dataset: tedbench; samples per value (n): 20" in caption
    assert "Compared: 9 of 18 published numbers" in caption  # the 9 LPIPS rows have no value
    assert res.unmapped_methods == [] and res.unmapped_metrics == []


def test_cpam_on_tedbench_without_a_mask_skips_naming_why(ted_root):
    """TEdBench has no masks and no points: CPAM's source mask M_s cannot be made (SAM needs points
    or a box), so each sample is skipped with that reason; the experiment's comment says so and
    points at cpam_table2_imba."""
    from harness.types import SkipSample

    (cfg,) = [c for c in jobs_of("cpam_table2", ted_root).configs if c["method"]["name"] == "cpam"]
    ds = open_dataset(cfg["dataset"])
    sample = ds.load(ds.refs()[0])
    with pytest.raises(SkipSample, match=r"method 'cpam': sample 'tedbench_000' has no mask; SAM from its points/box "
                                         r"failed"):
        build_method(cfg["method"]).source_mask(sample)
    text = (REPO / "conf" / "experiment" / "cpam_table2.yaml").read_text()
    assert "experiment=cpam_table2_imba" in text and "TEdBench" in text


# -- the ablations -------------------------------------------------------------------------------
ABLATIONS = {
    "cpam_ablation": (["method.use_pa", "method.use_le"],
                      [(True, True), (True, False), (False, True), (False, False)]),
    "cpam_ablation_t": (["method.start_step"], [(0,), (1,), (3,), (5,), (10,), (25,), (50,)]),
    "cpam_ablation_l": (["method.start_layer"], [(0,), (4,), (8,), (10,), (12,), (16,)]),
    "cpam_ablation_mask": (["method.mask_strategy"], [("attention",), ("convex_hull",), ("dilate",), ("source",)]),
}
DEFAULTS = {"use_pa": True, "use_le": True, "start_step": 3, "start_layer": 8, "mask_strategy": "attention"}


@pytest.mark.parametrize("experiment", list(ABLATIONS))
def test_ablation_jobs_sweep_one_factor_at_the_defaults(experiment, imba_root):
    swept, points = ABLATIONS[experiment]
    jobs = jobs_of(experiment, imba_root)
    assert jobs.swept == swept
    keys = [k.split(".", 1)[1] for k in swept]
    got = []
    for c in jobs.configs:
        _check_cpam_protocol(c)
        assert c["method"]["name"] == "cpam" and c["dataset"]["format"] == "imba"
        assert c["run_name"] == experiment and c["paper_tables"] == []
        params = build_method(c["method"]).resolved_params()
        got.append(tuple(params[k] for k in keys))
        # every factor not swept here is at the paper's default (T = 3, L = 8 with real weights)
        assert {k: params[k] for k in DEFAULTS if k not in keys} == {k: v for k, v in DEFAULTS.items() if k not in keys}
    assert got == points


def test_the_default_point_of_every_ablation_is_table2s_cpam_job(imba_root):
    """The ablations share cpam_table2_imba's edit cache, and each contains its CPAM job's
    parameter point exactly once: that edit is made once for all of them."""
    (table2,) = [c for c in jobs_of("cpam_table2_imba", imba_root).configs if c["method"]["name"] == "cpam"]
    ref = canonical_params(build_method(table2["method"]).resolved_params())
    for experiment in ABLATIONS:
        jobs = jobs_of(experiment, imba_root)
        same = [c for c in jobs.configs if canonical_params(build_method(c["method"]).resolved_params()) == ref]
        assert len(same) == 1, experiment
        assert same[0]["cache_dir"] == table2["cache_dir"] and same[0]["dataset"] == table2["dataset"]


SMOKE_IDS = ["astronaut_shuttle_to_plant", "astronaut_shuttle_side_view", "rocket_sky_sunset", "coffee_remove_spoon",
             "chelsea_add_sunglasses"]


def test_the_sample_set_has_every_cpam_edit_type():
    """At least one embedded sample per CPAM edit type (sec. 4.4), read as CPAM reads the category,
    each with a mask and a target caption; the pose / view sample also names its object."""
    from harness.data.imba import CATEGORY_EDIT_TYPES as CATEGORY_EDIT_TYPE  # the categories CPAM reads too

    counts: dict[str, int] = {}
    ds = harness.data.GenericDataset(REPO / "datasets" / "sample")
    for ref in ds.refs():
        edit_type = CATEGORY_EDIT_TYPE.get(ref.category)
        if edit_type is None:
            continue
        s = ds.load(ref)
        assert s.mask is not None and s.mask.any() and s.target_caption, ref.id
        counts[edit_type] = counts.get(edit_type, 0) + 1
    assert counts == {"replace": 1, "pose_view": 1, "background": 1, "remove": 4, "add": 1}
    (pose,) = [ds.load(r) for r in ds.refs() if r.category == "change_pose"]
    assert pose.id == "astronaut_shuttle_side_view" and pose.meta["object_prompt"] == "space shuttle model"
    assert "space shuttle model" in pose.target_caption
    # the same hand-made object mask as the replace sample of the same photo
    (replace,) = [ds.load(r) for r in ds.refs() if r.id == "astronaut_shuttle_to_plant"]
    np.testing.assert_array_equal(pose.mask, replace.mask)


def test_the_smoke_commands_of_the_comments_compose_on_the_sample_set():
    ids = "[" + ",".join(SMOKE_IDS) + "]"
    for experiment, n in (("cpam_table2", 9), ("cpam_ablation", 4)):
        text = (REPO / "conf" / "experiment" / f"{experiment}.yaml").read_text()
        assert f"'dataset.ids={ids}'" in text  # the comment's command is the one composed here
        jobs = check_jobs([f"experiment={experiment}", "dataset=sample", f"dataset.ids={ids}",
                           "++method.backbone=tiny", "metrics.allow_random_weights=true"], multirun=False)
        assert len(jobs.configs) == n
        ds = open_dataset(jobs.configs[0]["dataset"])
        cats = sorted(ds.load(r).category for r in ds.refs())
        assert cats == ["add", "change_background", "change_object", "change_pose", "remove"]
