"""PartEdit's experiments (conf/experiment/partedit_*.yaml) composed as `edit-harness run` composes
them, and the published-table mapping they are compared through (results/paper/partedit/table1.compare.yaml)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import harness.data
# The methods of Table 1 written for issue 14: imported here until methods/__init__.py imports them.
import methods.ef_ddpm  # noqa: F401
import methods.infedit  # noqa: F401
import methods.partedit  # noqa: F401
import methods.partedit_bench_results  # noqa: F401
import methods.pnp_inversion  # noqa: F401
from harness.aggregate import parse_params
from harness.cli import check_jobs, main
from harness.compare import compare, load_mapping
from harness.data import open_dataset
from harness.paper import load_table
from harness.runner import EDIT_COLUMNS, SCORE_COLUMNS, build_method, canonical_params

from .test_data_partedit_bench import row, write_parquet

TABLE1 = {  # experiment -> (split, its jobs' methods in order)
    "partedit_table1": ("synth", ["instruct_pix2pix", "partedit", "sdxl_inpaint", "blended_latent_diffusion_sdxl"]),
    "partedit_table1_p2p": ("synth", ["prompt_to_prompt"]),
    "partedit_table1_real": ("real", ["ef_ddpm", "infedit", "pnp_inversion"]),
    "partedit_table1_ledits": ("real", ["ledits_pp"]),
    "partedit_table1_ours_real": ("real", ["partedit"]),
}
PARTEDIT_METRICS = {"alpha_clip", "psnr", "ssim"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A two-split PartEdit-Bench copy in the downloaded layout: the experiments' dataset must open."""
    root = tmp_path_factory.mktemp("pe") / "PartEdit-Bench"
    write_parquet(root / "data" / "synth-00000-of-00001.parquet", [row(i) for i in range(3)])
    write_parquet(root / "data" / "real-00000-of-00001.parquet", [row(i) for i in range(2)])
    return root


def jobs_of(experiment: str, root: Path, *extra: str):
    return check_jobs([f"experiment={experiment}", f"dataset.root={root}", *extra], multirun=False)


def _check_protocol(cfg: dict, root: Path, split: str, run_name: str, tables: list[str]) -> None:
    ds, m = cfg["dataset"], cfg["metrics"]
    assert ds["format"] == "partedit_bench" and ds["root"] == str(root) and ds["split"] == split
    assert ds["name"] == f"partedit_bench_{split}" and ds["ids"] is None and ds["limit"] is None
    assert m["protocol"] == "partedit" and m["reference"] == "source" and m["regions"] == ["unedited"]
    assert set(m["items"]) == PARTEDIT_METRICS and m["items"]["alpha_clip"]["scale"] == 100
    assert m["allow_random_weights"] is False
    assert cfg["cache_dir"] == f"{cfg['results_dir']}/partedit_edits"  # one edit cache for every PartEdit run
    assert cfg["run_name"] == run_name and cfg["paper_tables"] == tables


# -- Table 1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", list(TABLE1))
def test_table1_experiments_jobs(experiment, bench):
    split, names = TABLE1[experiment]
    jobs = jobs_of(experiment, bench)
    assert [c["method"]["name"] for c in jobs.configs] == names
    for c in jobs.configs:
        _check_protocol(c, bench, split, experiment, ["partedit/table1"])
    # each job's dataset opens on the copy: the split's rows
    refs = open_dataset(jobs.configs[0]["dataset"]).refs()
    assert [r.id for r in refs] == ([f"synth_{i}" for i in range(3)] if split == "synth" else ["real_0", "real_1"])


def test_table1_rows_with_parameters_of_their_own(bench):
    (p2p,) = jobs_of("partedit_table1_p2p", bench).configs
    assert {k: p2p["method"][k] for k in ("architecture", "model", "resolution", "self_replace_steps")} == {
        "architecture": "sdxl", "model": "stabilityai/stable-diffusion-xl-base-1.0", "resolution": 1024,
        "self_replace_steps": 0.4}
    (ledits,) = jobs_of("partedit_table1_ledits", bench).configs
    assert ledits["method"]["model"] == "stabilityai/stable-diffusion-2-1-base"
    assert ledits["method"]["source_prompt_field"] == "source_caption"
    (ours_real,) = jobs_of("partedit_table1_ours_real", bench).configs
    synth_partedit = jobs_of("partedit_table1", bench).configs[1]["method"]
    assert ours_real["method"] == {**synth_partedit, "source": "real"} and synth_partedit["source"] == "auto"
    # the paper's settings are the methods' defaults (sec. 4.1, appendix K)
    assert synth_partedit["guidance_scale"] == 7.5 and synth_partedit["guidance_real"] == 12.5
    assert synth_partedit["omega"] == 1.5 and synth_partedit["t_e"] == 50 and synth_partedit["scheduler"] == "ddim"
    for name in ("ef_ddpm", "pnp_inversion"):  # the paper's real-image baselines ran on SD 2.1
        cfg = next(c for c in jobs_of("partedit_table1_real", bench).configs if c["method"]["name"] == name)
        assert cfg["method"]["model"] == "stabilityai/stable-diffusion-2-1-base"


def _table1_points(bench) -> list[tuple[str, str, dict]]:
    """(experiment, method, parsed params) of every Table 1 job, as the run's tables record them."""
    out = []
    for experiment in TABLE1:
        for c in jobs_of(experiment, bench).configs:
            m = build_method(c["method"])
            out.append((experiment, c["method"]["name"], parse_params(canonical_params(m.resolved_params()))))
    return out


def test_every_mapped_row_of_table1_selects_exactly_one_job(bench):
    """Over the five runs, each paper method the mapping names matches one job (method + params):
    the two PartEdit rows, synthetic and real, are told apart by ``source``."""
    mapping = load_mapping("partedit/table1")
    assert mapping.unmapped_methods == {} and mapping.unmapped_metrics == {"Ours Pref. (%)": "user study, not a metric"}
    points = _table1_points(bench)
    assert len(points) == 10  # Table 1's ten rows, one job each
    chosen = {}
    for paper_method, mm in mapping.methods.items():
        hits = [(e, name) for e, name, p in points
                if name == mm.method and all(k in p and p[k] == v for k, v in mm.params.items())]
        assert len(hits) == 1, (paper_method, hits)
        chosen[paper_method] = hits[0]
    assert chosen == {
        "P2P": ("partedit_table1_p2p", "prompt_to_prompt"),
        "iP2P": ("partedit_table1", "instruct_pix2pix"),
        "PartEdit (Ours)": ("partedit_table1", "partedit"),
        "SDXL Inpainting": ("partedit_table1", "sdxl_inpaint"),
        "Latent Blending": ("partedit_table1", "blended_latent_diffusion_sdxl"),
        "Ledits++": ("partedit_table1_ledits", "ledits_pp"),
        "EF-DDPM": ("partedit_table1_real", "ef_ddpm"),
        "InfEdit": ("partedit_table1_real", "infedit"),
        "PnPInversion": ("partedit_table1_real", "pnp_inversion"),
        "Ours w/ Ledits++": ("partedit_table1_ours_real", "partedit"),
    }
    assert set(mapping.methods) == set(load_table("partedit/table1").method)


def _write_job(run_dir: Path, method: str, params: dict, dataset: str, metric: str, region: str,
               values: np.ndarray) -> None:
    """One job's scores.parquet / edits.parquet with the runner's columns."""
    pj = canonical_params(params)
    job = f"{method}-{dataset}-{metric}-" + "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    base = [dict(run=run_dir.name, job=job, method=method, method_version="1", params=pj, dataset=dataset,
                 sample_id=f"s{i:03d}", category="part", seed=0, edit_key=f"{job}-{i}") for i in range(len(values))]
    edits = [{**b, "status": "ok", "reason": None, "flags": "", "notes": "", "prep_seconds": 0.1,
              "infer_seconds": 0.2, "peak_memory_bytes": 1.0, "model_revision": None} for b in base]
    scores = [{**b, "metric": metric, "region": region, "value": float(v), "flag": None, "protocol": "partedit",
               "weights": "synthetic weights", "region_rule": "area", "higher_is_better": True,
               "mean_floor": math.nan} for b, v in zip(base, values)]
    d = run_dir / "jobs" / job
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(scores, columns=SCORE_COLUMNS).to_parquet(d / "scores.parquet", index=False)
    pd.DataFrame(edits, columns=EDIT_COLUMNS).to_parquet(d / "edits.parquet", index=False)


def test_compare_tells_the_two_partedit_rows_apart_across_runs(tmp_path):
    """PartEdit's synthetic run (source auto, synth split) and its real run (source real, real split)
    compared together: each row is compared with its own run's PSNR, none is ambiguous."""
    noise = np.random.default_rng(14).standard_normal(20)
    noise -= noise.mean()  # exact means (to rounding): the job's mean is its level
    synth, real = tmp_path / "partedit_table1", tmp_path / "partedit_table1_ours_real"
    common = {"t_e": 50, "omega": 1.5}
    _write_job(synth, "partedit", {**common, "source": "auto"}, "partedit_bench_synth", "psnr", "unedited",
               31.0 + 0.5 * noise)
    _write_job(real, "partedit", {**common, "source": "real"}, "partedit_bench_real", "psnr", "unedited",
               26.0 + 0.5 * noise)
    res = compare([synth, real], "partedit/table1")
    f = res.frame.set_index(["paper_method", "paper_metric"])
    for name, dataset, mean, published in (("PartEdit (Ours)", "partedit_bench_synth", 31.0, 31.5),
                                           ("Ours w/ Ledits++", "partedit_bench_real", 26.0, 26.3)):
        r = f.loc[(name, "PSNR")]
        assert r["status"] == "compared" and r["dataset"] == dataset and r["n"] == 20
        assert r["ours_mean"] == pytest.approx(mean, abs=1e-12) and r["published"] == published
        assert r["delta"] == pytest.approx(mean - published, abs=1e-12)
    assert (res.frame["status"] == "compared").sum() == 2 and (res.frame["status"] == "ambiguous").sum() == 0


# -- ablations ---------------------------------------------------------------------------------
def test_partedit_ablation_jobs(bench):
    jobs = jobs_of("partedit_ablation", bench)
    assert jobs.swept == ["method.binarization", "method.layer_set"]
    points = [(c["method"]["binarization"], c["method"]["layer_set"]) for c in jobs.configs]
    assert points == [(b, layer) for b in ("partedit", "otsu", "binary_0.5", "none") for layer in ("code", "paper")]
    for c in jobs.configs:
        _check_protocol(c, bench, "synth", "partedit_ablation", [])
        assert c["method"]["name"] == "partedit" and c["method"]["omega"] == 1.5 and c["method"]["t_e"] == 50
    # the default point is Table 1's PartEdit job: same method config, dataset and cache
    table1 = jobs_of("partedit_table1", bench).configs[1]
    assert jobs.configs[0]["method"] == table1["method"] and jobs.configs[0]["dataset"] == table1["dataset"]
    assert jobs.configs[0]["cache_dir"] == table1["cache_dir"]


@pytest.mark.parametrize("experiment, key, values", [
    ("partedit_ablation_omega", "omega", [1.0, 1.25, 1.5, 2.0, 3.0]),
    ("partedit_ablation_te", "t_e", [0, 10, 20, 30, 40, 50]),
])
def test_partedit_ablation_sweeps(experiment, key, values, bench):
    jobs = jobs_of(experiment, bench)
    assert jobs.swept == [f"method.{key}"]
    assert [c["method"][key] for c in jobs.configs] == values
    table1 = jobs_of("partedit_table1", bench).configs[1]["method"]
    for c in jobs.configs:
        _check_protocol(c, bench, "synth", experiment, [])
        assert c["method"] == {**table1, key: c["method"][key]}  # one factor at a time
    # every point is a valid PartEdit parameter set
    for c in jobs.configs:
        assert build_method(c["method"]).params.__getattribute__(key) == c["method"][key]


# -- without the data ------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment, n, first", [
    ("partedit_table1", 4, "method=instruct_pix2pix"),
    ("partedit_ablation", 8, "method.binarization=partedit method.layer_set=code"),
])
def test_without_the_data_the_run_is_one_line_naming_the_root(experiment, n, first, tmp_path, monkeypatch, capsys):
    """The card's root (data/partedit_bench) exists neither here nor among the harness's resources:
    the run stops before any job with one line, no traceback, naming the root to set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness.data, "RESOURCE_ROOT", tmp_path / "resources")
    assert main(["run", f"experiment={experiment}", f"results_dir={tmp_path / 'results'}"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "Traceback" not in out.err
    assert out.err.startswith(f"edit-harness: job 1 of {n} ({first}) and {n - 1} more: dataset "
                              "'partedit_bench_synth': PartEdit-Bench not found: data/partedit_bench (expected the "
                              "downloaded dataset folder with data/synth-*.parquet, or one .parquet file)"), out.err
    assert "how to obtain dataset 'partedit_bench_synth' (set dataset.root=PATH to point at it)" in out.err
    assert "huggingface-cli download Aleksandar/PartEdit-Bench --repo-type dataset --revision v1.1" in out.err
    assert not (tmp_path / "results").exists()


def test_partedit_table1_smoke_command_of_its_comment():
    """The smoke run partedit_table1.yaml documents: the sample set's three part edits, every
    method's random-weight backbone, its own run and cache."""
    jobs = check_jobs(["experiment=partedit_table1", "dataset=sample",
                       "dataset.ids=[astronaut_hair_pink,grace_hopper_head_statue,astronaut_torso_armor]",
                       "++method.backbone=tiny", "metrics.allow_random_weights=true", "run_name=partedit_smoke",
                       "cache_dir=results/partedit_smoke/edits"], multirun=False)
    assert [c["method"]["name"] for c in jobs.configs] == TABLE1["partedit_table1"][1]
    for c in jobs.configs:
        assert c["method"]["backbone"] == "tiny" and c["dataset"]["name"] == "sample"
        assert c["metrics"]["protocol"] == "partedit" and c["metrics"]["allow_random_weights"] is True
        assert c["run_name"] == "partedit_smoke" and c["cache_dir"] == "results/partedit_smoke/edits"
    ds = open_dataset(jobs.configs[0]["dataset"])
    samples = [ds.load(r) for r in ds.refs()]
    assert [(s.id, s.category, s.part, s.meta["token_cls"]) for s in samples] == [
        ("astronaut_hair_pink", "part", "hair", "human_hair"),
        ("grace_hopper_head_statue", "part", "head", "human_head"),
        ("astronaut_torso_armor", "part", "torso", "human_torso_custom")]
    assert all("seed" not in s.meta for s in samples)  # no seed: PartEdit's source=auto takes the real-image path


# -- the Alpha-CLIP stand-in label in every table ----------------------------------------------------
TINY_CLIP = "edit-harness-tiny-partedit-clip"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def test_the_alpha_clip_stand_in_is_labelled_in_every_table_that_uses_it(bench, tmp_path, fresh_clip_features):
    """A PartEdit-protocol run (two methods on the bench's synth split, Alpha-CLIP's checkpoint
    absent: the masked-CLIP stand-in) and its report: every table file that shows an alpha_clip
    number (table.md / .csv caption / .tex, the per-category tables, the side by side with Table 1)
    says STAND-IN for Alpha-CLIP."""
    from harness.report import write_report
    from harness.runner import run_job

    from .conftest import job_config, register_open_clip_config

    register_open_clip_config(tmp_path, TINY_CLIP, TINY_CLIP_CFG)
    metrics = {"protocol": "partedit", "reference": "source", "region_rule": "area", "regions": ["unedited"],
               "items": {"alpha_clip": {"scale": 100, "fallback": "masked_clip", "text_field": "target_caption",
                                        "model": TINY_CLIP, "pretrained": None, "allow_random_weights": True,
                                        "device": "cpu"},
                         "psnr": {"data_range": 1.0}, "ssim": {"data_range": 1.0, "border": "keep"}}}
    dataset = {"name": "partedit_bench_synth", "format": "partedit_bench", "root": str(bench), "split": "synth"}
    results = tmp_path / "results"
    for method in ({"name": "identity"}, {"name": "partedit_bench_results", "path": str(bench)}):
        out = run_job(job_config(dataset, results, method=method, metrics=metrics, run_name="pe",
                                 paper_tables=["partedit/table1"]))
        assert out is not None
    run = results / "pe"
    scores = pd.concat(pd.read_parquet(p) for p in run.rglob("scores.parquet"))
    ac = scores[scores.metric.str.startswith("alpha_clip")]
    assert len(ac) == 2 * 3 * 3 and ac.value.notna().all()  # 2 methods x 3 samples x (fg, bg, avg)
    assert ac.weights.str.startswith("STAND-IN for Alpha-CLIP").all()
    # identity leaves the unedited region as it is: PSNR inf (flagged), SSIM 1
    ident = scores[(scores.method == "identity") & (scores.metric == "ssim")]
    assert ident.value.tolist() == pytest.approx([1.0, 1.0, 1.0])
    report = tmp_path / "report"
    write_report(run, report)
    using = {}
    for p in sorted(report.rglob("*")):
        if p.suffix not in (".md", ".csv", ".tex", ".txt", ".html") or p.name.startswith("edits") or p.name.endswith(".caption.txt"):
            continue
        text = p.read_text()
        caption = p.with_suffix(".caption.txt")
        if p.suffix == ".csv" and caption.is_file():  # a CSV's caption is its .caption.txt sidecar
            text += caption.read_text()
        if "alpha_clip" in text:
            using[p.relative_to(report).as_posix()] = "STAND-IN for Alpha-CLIP" in text
    assert {"table.md", "table.csv", "table.tex", "table_by_category.md", "table_by_category.csv",
            "table_by_category.tex", "summary.csv", "summary_by_category.csv", "index.html"} <= set(using), sorted(using)
    # table_terminal.txt (the table `edit-harness run` prints) too: its "Weights of" lines
    assert {k: v for k, v in using.items() if not v} == {}
    assert STAND_IN_RUN.setdefault("report", report) == report


STAND_IN_RUN: dict[str, Path] = {}


def test_the_terminal_table_labels_the_alpha_clip_stand_in(bench, tmp_path, fresh_clip_features):
    if "report" not in STAND_IN_RUN:
        test_the_alpha_clip_stand_in_is_labelled_in_every_table_that_uses_it(bench, tmp_path, None)
    text = (STAND_IN_RUN["report"] / "table_terminal.txt").read_text()
    assert "alpha_clip" in text and "Weights of alpha_clip_fg: STAND-IN for Alpha-CLIP" in text


def test_the_side_by_side_with_table1_labels_the_alpha_clip_stand_in(tmp_path):
    """compare.md / .tex / .csv caption of a run scored with the stand-in say so (its weights column)."""
    from harness.compare import write_compare

    stand_in = "STAND-IN for Alpha-CLIP: masked CLIP ViT-B-16 (openai)"
    run = tmp_path / "partedit_table1"
    vals = np.full(5, 60.0)
    for metric, region in (("alpha_clip_fg", "edited"), ("alpha_clip_bg", "unedited"), ("alpha_clip_avg", "all")):
        _write_job(run, "partedit", {"source": "auto"}, "partedit_bench_synth", metric, region, vals)
    # the helper writes "synthetic weights": set the stand-in label as the metric writes it
    for p in run.rglob("scores.parquet"):
        df = pd.read_parquet(p)
        df["weights"] = stand_in
        df.to_parquet(p, index=False)
    res = compare(run, "partedit/table1")
    assert (res.frame["status"] == "compared").sum() == 3
    files = write_compare(res, tmp_path / "cmp")
    for kind in ("md", "tex", "html"):
        assert stand_in in files[kind].read_text(), kind
    assert stand_in in (tmp_path / "cmp" / "compare.caption.txt").read_text()
