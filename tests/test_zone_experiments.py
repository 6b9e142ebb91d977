"""ZONE's experiments (conf/experiment/zone_*.yaml) composed as `edit-harness run` composes them,
and the published-table mappings they are compared through (results/paper/zone/*.compare.yaml)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import harness.data
from harness.aggregate import parse_params
from harness.cli import check_jobs, main
from harness.compare import compare, load_mapping
from harness.data import open_dataset
from harness.data.zone import ACTIONS, convert_zone
from harness.paper import load_table
from harness.runner import EDIT_COLUMNS, SCORE_COLUMNS, build_method, canonical_params

from .conftest import REPO
from .test_data_zone import ZoneDownload

TABLE1_METHODS = ["diffedit", "text2live", "pix2pix_zero", "instruct_pix2pix", "magicbrush", "zone"]
ZONE_METRICS = {"l1", "l2", "lpips", "clip_i", "clip_t"}
BETAS = [0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0]


@pytest.fixture(scope="module")
def zone_root(tmp_path_factory) -> Path:
    """A converted three-sample ZONE set (one per action): the experiments' dataset must open."""
    tmp = tmp_path_factory.mktemp("zone")
    dl = ZoneDownload(tmp / "download")
    return convert_zone(dl.write_json(), dl.images, tmp / "zone").out


def jobs_of(experiment: str, root: Path, *extra: str):
    return check_jobs([f"experiment={experiment}", f"dataset.root={root}", *extra], multirun=False)


def _check_zone_protocol(cfg: dict, root: Path) -> None:
    ds, m = cfg["dataset"], cfg["metrics"]
    assert ds["name"] == "zone" and ds["format"] == "zone" and ds["root"] == str(root)
    assert ds["extra_categories"] == ["change"] and ds["limit"] is None and ds["ids"] is None
    assert m["protocol"] == "zone" and m["reference"] == "source" and m["regions"] == ["all"]
    assert set(m["items"]) == ZONE_METRICS and m["items"]["clip_t"]["text_field"] == "target_caption"
    assert m["allow_random_weights"] is False
    assert cfg["cache_dir"] == f"{cfg['results_dir']}/zone_edits"  # one edit cache for the ZONE experiments


# -- the jobs each experiment makes ------------------------------------------------------------
def test_zone_table1_jobs(zone_root):
    jobs = jobs_of("zone_table1", zone_root)
    assert jobs.multirun and jobs.swept == ["method"]
    assert jobs.points == [[f"method={m}", f"experiment=zone_table1", f"dataset.root={zone_root}"]
                           for m in TABLE1_METHODS]
    assert [c["method"]["name"] for c in jobs.configs] == TABLE1_METHODS
    for c in jobs.configs:
        _check_zone_protocol(c, zone_root)
        assert c["run_name"] == "zone_table1" and c["paper_tables"] == ["zone/table1"]
    # 512 px for every method, DiffEdit at 768 (appendix C.3): each method's `auto` with real weights
    sizes = {}
    for c in jobs.configs:
        method = build_method(c["method"])
        params = method.resolved_params()
        assert params.get("backbone", "real") == "real"
        sizes[c["method"]["name"]] = params.get("resolution")
    assert sizes["diffedit"] == 768
    assert sizes["instruct_pix2pix"] == sizes["magicbrush"] == sizes["pix2pix_zero"] == 512


def test_zone_fig6_jobs_are_table1s_methods_without_a_published_table(zone_root):
    fig6, table1 = jobs_of("zone_fig6", zone_root), jobs_of("zone_table1", zone_root)
    assert [c["method"] for c in fig6.configs] == [c["method"] for c in table1.configs]
    for c in fig6.configs:
        _check_zone_protocol(c, zone_root)
        assert c["run_name"] == "zone_fig6" and c["paper_tables"] == []
    # same method, params, dataset and cache: zone_fig6 reuses zone_table1's edits
    drop = ("run_name", "paper_tables")
    assert [{k: v for k, v in c.items() if k not in drop} for c in fig6.configs] == \
           [{k: v for k, v in c.items() if k not in drop} for c in table1.configs]
    # the figure's categories: ZONE's three actions, all present in the set
    assert sorted({r.category for r in open_dataset(fig6.configs[0]["dataset"]).refs()}) == list(ACTIONS)


def test_zone_ablation_jobs_are_the_switch_product_at_the_default_beta(zone_root):
    jobs = jobs_of("zone_ablation", zone_root)
    assert jobs.swept == ["method.use_sam", "method.use_smoother"]
    points = [(c["method"]["use_sam"], c["method"]["use_smoother"]) for c in jobs.configs]
    assert points == [(True, True), (True, False), (False, True), (False, False)]
    for c in jobs.configs:
        _check_zone_protocol(c, zone_root)
        assert c["method"]["name"] == "zone" and c["method"]["beta"] is None
        assert c["run_name"] == "zone_ablation" and c["paper_tables"] == ["zone/table5"]
    # every mapped row of Table 5 selects exactly one of these jobs' parameter points
    params = [parse_params(canonical_params(build_method(c["method"]).resolved_params())) for c in jobs.configs]
    mapping = load_mapping("zone/table5")
    chosen = {}
    for paper_method, mm in mapping.methods.items():
        hits = [i for i, p in enumerate(params) if all(k in p and p[k] == v for k, v in mm.params.items())]
        assert len(hits) == 1, paper_method
        chosen[paper_method] = points[hits[0]]
    assert chosen == {"ZONE w/o SAM": (False, True), "ZONE w/ SAM": (True, True),
                      "ZONE w/o Edge Smoother": (True, False), "ZONE w/ Edge Smoother": (True, True)}


def test_zone_ablation_beta_jobs(zone_root):
    jobs = jobs_of("zone_ablation_beta", zone_root)
    assert jobs.swept == ["method.beta"]
    assert [c["method"]["beta"] for c in jobs.configs] == BETAS
    for c in jobs.configs:
        _check_zone_protocol(c, zone_root)
        assert c["method"]["name"] == "zone" and c["method"]["use_sam"] is True and c["method"]["use_smoother"] is True
        assert c["run_name"] == "zone_ablation_beta" and c["paper_tables"] == []
    # the paper's two settings are points of the sweep (0.2 remove, 0.01 add and change)
    assert {0.01, 0.2} <= set(BETAS) and BETAS[0] == 0.0  # 0: InstructPix2Pix alone


def test_zone_table1_without_the_data_is_one_line_naming_the_root(tmp_path, monkeypatch, capsys):
    """The card's root (data/zone) exists neither here nor among the harness's resources: the
    run stops before any job with one line, no traceback, naming the root to set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness.data, "RESOURCE_ROOT", tmp_path / "resources")
    assert main(["run", "experiment=zone_table1", f"results_dir={tmp_path / 'results'}"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "Traceback" not in out.err
    assert out.err.startswith("edit-harness: job 1 of 6 (method=diffedit) and 5 more: dataset folder not found: "
                              "data/zone (expected ZONE's test set converted by `python -m harness.data.zone`")
    assert "how to obtain dataset 'zone' (set dataset.root=PATH to point at it)" in out.err
    assert "https://drive.google.com/file/d/1lAwpENoDcO1QyFuwz3iKJJ7DmDTFMvIU" in out.err
    assert not (tmp_path / "results").exists()


def test_the_sample_set_has_every_zone_action():
    """A ZONE smoke run on the embedded set edits every action: add and remove are categories there,
    change is each change_* category (the mapping the card and experiments state)."""
    counts: dict[str, int] = {}
    for line in (REPO / "datasets" / "sample" / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        cat = rec.get("category")
        action = "change" if cat.startswith("change_") else cat
        if action in ACTIONS:
            assert rec["instruction"] and rec["source_caption"] and rec["target_caption"], rec["id"]
            counts[action] = counts.get(action, 0) + 1
    assert counts == {"add": 1, "remove": 4, "change": 8}


# -- the published tables' mappings ------------------------------------------------------------
def test_table1_maps_all_six_methods():
    m = load_mapping("zone/table1")
    assert m.unmapped_methods == {} and m.unmapped_metrics == {}
    assert {k: v.method for k, v in m.methods.items()} == {
        "DiffEdit": "diffedit", "Text2LIVE": "text2live", "Pix2Pix-Zero": "pix2pix_zero",
        "InstructPix2Pix": "instruct_pix2pix", "MagicBrush": "magicbrush", "ZONE (Ours)": "zone"}
    assert all(v.params == {} for v in m.methods.values())
    assert sorted(v.method for v in m.methods.values()) == sorted(TABLE1_METHODS)


def _write_zone_job(run_dir: Path, params: dict, clip_i: np.ndarray) -> None:
    """One ZONE job's scores.parquet / edits.parquet with the runner's columns (CLIP-I, region all)."""
    pj = canonical_params(params)
    job = "zone-zone-" + "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    base = [dict(run=run_dir.name, job=job, method="zone", method_version="1", params=pj, dataset="zone",
                 sample_id=f"s{i:03d}", category=ACTIONS[i % 3], seed=0, edit_key=f"{job}-{i}")
            for i in range(len(clip_i))]
    edits = [{**b, "status": "ok", "reason": None, "flags": "", "notes": "", "prep_seconds": 0.1,
              "infer_seconds": 0.2, "peak_memory_bytes": 1.0, "model_revision": None} for b in base]
    scores = [{**b, "metric": "clip_i", "region": "all", "value": float(v), "flag": None, "protocol": "zone",
               "weights": "synthetic weights", "region_rule": "area", "higher_is_better": True,
               "mean_floor": math.nan} for b, v in zip(base, clip_i)]
    d = run_dir / "jobs" / job
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(scores, columns=SCORE_COLUMNS).to_parquet(d / "scores.parquet", index=False)
    pd.DataFrame(edits, columns=EDIT_COLUMNS).to_parquet(d / "edits.parquet", index=False)


def test_table5_compares_clip_i_per_arm_and_leaves_upr_to_human_evaluation(tmp_path):
    """A run holding the ablation's four switch points and two beta points: each CLIP-I row of
    Table 5 is compared with the one matching point; the UPR rows are unmapped, with the reason."""
    rng = np.random.default_rng(5)
    noise = rng.standard_normal(30)
    noise -= noise.mean()  # exact means (to rounding): the arm's mean is its level
    levels = {(True, True, None): 0.97, (False, True, None): 0.95, (True, False, None): 0.96,
              (False, False, None): 0.94, (True, True, 0.2): 0.90, (True, True, 0.0): 0.91}
    run = tmp_path / "zone_ablation"
    for (sam, smooth, beta), level in levels.items():
        _write_zone_job(run, {"use_sam": sam, "use_smoother": smooth, "beta": beta, "num_inference_steps": 20},
                        level + 0.004 * noise)
    res = compare(run, "zone/table5")
    assert res.unmapped_methods == [] and res.unmapped_metrics == ["UPR (%)"]
    f = res.frame.set_index(["paper_method", "paper_metric"])
    ours = {"ZONE w/o SAM": 0.95, "ZONE w/ SAM": 0.97, "ZONE w/o Edge Smoother": 0.96, "ZONE w/ Edge Smoother": 0.97}
    published = {"ZONE w/o SAM": 0.95, "ZONE w/ SAM": 0.97, "ZONE w/o Edge Smoother": 0.97, "ZONE w/ Edge Smoother": 0.97}
    for name, mean in ours.items():
        row = f.loc[(name, "CLIP-I")]
        assert row["status"] == "compared" and row["n"] == 30 and row["method"] == "zone"
        assert row["ours_mean"] == pytest.approx(mean, abs=1e-12)  # mean of level + zero-mean noise
        assert row["published"] == published[name]
        assert row["delta"] == pytest.approx(mean - published[name], abs=1e-12)
        upr = f.loc[(name, "UPR (%)")]
        assert upr["status"] == "not in this run" and upr["why"] == "human evaluation (issue 17)"
    assert (res.frame["status"] == "compared").sum() == 4 and len(res.frame) == 8
    assert len(load_table("zone/table5")) == 8


def test_zone_table1_smoke_command_of_its_comment():
    """The smoke run zone_table1.yaml documents: the sample set, one sample per ZONE action, every
    method's random-weight backbone, its own run and cache."""
    jobs = check_jobs(["experiment=zone_table1", "dataset=sample",
                       "dataset.ids=[chelsea_add_sunglasses,coffee_remove_spoon,coffee_cup_blue]",
                       "++method.backbone=tiny", "metrics.allow_random_weights=true", "run_name=zone_smoke",
                       "cache_dir=results/zone_smoke/edits"], multirun=False)
    assert [c["method"]["name"] for c in jobs.configs] == TABLE1_METHODS
    for c in jobs.configs:
        assert c["method"]["backbone"] == "tiny" and c["dataset"]["name"] == "sample"
        assert c["metrics"]["protocol"] == "zone" and c["metrics"]["allow_random_weights"] is True
        assert c["run_name"] == "zone_smoke" and c["cache_dir"] == "results/zone_smoke/edits"
    refs = open_dataset(jobs.configs[0]["dataset"]).refs()
    assert [(r.id, r.category) for r in refs] == [("coffee_remove_spoon", "remove"),  # manifest order
                                                  ("coffee_cup_blue", "change_color"),
                                                  ("chelsea_add_sunglasses", "add")]


def test_the_zone_method_takes_the_sets_actions_from_their_category(zone_root):
    """ZONE's ``auto`` action reads the sample's category: the set's add / change / remove must each
    decide it (source ``category``), not fall through to the instruction's keywords. The
    instructions here say another action than the category, so the keyword rule would differ."""
    from methods.zone.action import resolve_action

    ds = open_dataset({"format": "zone", "root": str(zone_root)})
    for ref in ds.refs():
        s = ds.load(ref)
        misleading = {"add": "remove the glasses", "change": "add a stripe", "remove": "make it red"}[s.category]
        assert resolve_action("auto", misleading, s.category, None) == (s.category, "category"), s.id
