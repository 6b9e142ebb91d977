"""The edit-harness command: Hydra runs and sweeps, report, score, validate, list."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (the `test` extra: a broken install fails here)
import pandas as pd
import pytest
from PIL import Image

from harness.cli import main, precheck, UsageError

from .conftest import REPO

FAST = ["metrics=pixel", "progress=false"]


def _run(args, tmp_path, capsys=None):
    rc = main(["run", f"results_dir={tmp_path}", *FAST, *args])
    return rc


def test_unknown_method_lists_methods(tmp_path, capsys):
    assert main(["run", "method=nope", f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "identity" in err and "inpaint" in err


def test_unknown_dataset_and_protocol_list_options(tmp_path, capsys):
    assert main(["run", "dataset=nope"]) == 2
    assert "available: " in capsys.readouterr().err
    assert main(["run", "metrics=nope"]) == 2
    assert "default" in capsys.readouterr().err


def test_unknown_parameter_lists_parameters(tmp_path, capsys):
    assert main(["run", "method=inpaint", "method.bogus=3"]) == 2
    err = capsys.readouterr().err
    assert "no parameter(s) bogus" in err and "algorithm" in err and "radius" in err
    # In a sweep over methods, a parameter must exist in each of them.
    assert main(["run", "-m", "method=inpaint,recolor", "method.radius=3"]) == 2
    assert "method 'recolor' has no parameter(s) radius" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["++method.bogus=3"],  # the form the README recommends for a key the default method lacks
    ["+method.bogus=3"],
    ["~method.bogus"],
    ["method.bogus=1,2"],  # a sweep
    ["method.bogus=range(0,3)"],
])
def test_every_override_form_is_checked(args, capsys):
    assert main(["run", "method=inpaint", *args]) == 2
    err = capsys.readouterr().err
    assert "method 'inpaint' has no parameter(s) bogus" in err and "algorithm" in err


@pytest.mark.parametrize("args, message", [
    (["++method=nope"], "unknown method 'nope'"),
    (["+method=inpaint,nope"], "unknown method 'nope'"),
    (["method=choice(inpaint,nope)"], "unknown method 'nope'"),
    (["++dataset=nope"], "unknown dataset 'nope'"),
    (["metrics=default,nope"], "unknown metrics 'nope'"),
    (["+experiment=nope"], "unknown experiment 'nope'"),
    # a sweep over methods: the parameter must exist in each
    (["-m", "method=glob(in*)", "++method.radius=3"], "method 'infedit' has no parameter(s) radius"),
    # an experiment's methods, when the command line names none
    (["experiment=recolor_strength", "++method.radius=3"], "method 'recolor' has no parameter(s) radius"),
])
def test_unknown_names_fail_in_every_override_form(args, message, capsys):
    assert main(["run", *args]) == 2
    assert message in capsys.readouterr().err


def test_valid_override_forms_pass_the_precheck():
    for args in (["-m", "method=sdedit,masactrl", "++method.backbone=tiny", "++method.num_inference_steps=4"],
                 ["method=inpaint", "+method.radius=3", "~method.dilate", "method.algorithm=ns,telea"],
                 ["method=recolor", "method.strength=range(0,1,0.25)", "hydra/launcher=joblib", "+run_name=x"],
                 ["+experiment=recolor_strength", "method.strength=0.5"],
                 ["method=glob(re*)", "method.strength=1.0"],
                 ["dataset.ids=[a,b]", "method=identity", "method=null"],
                 ["method.pipeline='x.Y,z'", "method=diffusers_pipeline"]):
        precheck(args)  # raises UsageError on a wrong verdict
    # what Hydra cannot parse is left to Hydra, which names the error
    precheck(["method=a,,b"])
    with pytest.raises(UsageError):
        precheck(["method=inpaint", "method.x=1"])


def test_bad_parameter_value_fails_clearly(tmp_path, capsys):
    # refused before Hydra starts the job: nothing is written
    assert _run(["method=recolor", "method.strength=5.0", "dataset.limit=1"], tmp_path) == 2
    assert capsys.readouterr().err == "edit-harness: method 'recolor': recolor: 'strength' must be a number in [0, 1], got 5.0\n"
    assert not any(tmp_path.iterdir())


def test_single_run_writes_results_and_report(tmp_path):
    assert _run(["method=inpaint", "dataset.limit=4", "run_name=one"], tmp_path) == 0
    run = tmp_path / "one"
    jobs = list((run / "jobs").iterdir())
    assert len(jobs) == 1
    for f in ("scores.parquet", "edits.parquet", "manifest.json", "failures.json"):
        assert (jobs[0] / f).is_file()
    man = json.loads((jobs[0] / "manifest.json").read_text())
    assert man["method"]["name"] == "inpaint" and man["seed"] == 0 and man["versions"]["numpy"]
    assert man["config"]["dataset"]["limit"] == 4
    assert (run / "report" / "table.md").is_file() and (run / "report" / "table.tex").is_file()
    assert list((run / "report").glob("*.png"))


def test_multirun_sweep_and_report_rebuild(tmp_path):
    args = ["-m", "method=recolor", "method.strength=0.0,0.5,1.0", "dataset.limit=6", "run_name=sweep"]
    assert _run(args, tmp_path) == 0
    run = tmp_path / "sweep"
    assert len(list((run / "jobs").iterdir())) == 3
    report = run / "report"
    assert list(report.glob("plot_*_vs_strength.png"))
    before = {p.name: p.read_bytes() for p in report.iterdir() if p.is_file()}
    edits_before = sorted((run / "edits").rglob("edit.json"))
    shutil.rmtree(report)
    assert main(["report", str(run)]) == 0
    after = {p.name: p.read_bytes() for p in report.iterdir() if p.is_file()}
    assert before == after
    assert sorted((run / "edits").rglob("edit.json")) == edits_before
    # Rerunning the sweep recomputes nothing.
    assert _run(args, tmp_path) == 0
    for job in (run / "jobs").iterdir():
        outcome = json.loads((job / "manifest.json").read_text())["outcome"]
        assert outcome["computed"] == 0 and outcome["scored"] == 0


def test_two_runs_share_a_cache_dir(tmp_path):
    shared = tmp_path / "lab-cache"
    for name in ("first", "second"):
        assert _run(["method=inpaint", "dataset.limit=3", f"run_name={name}", f"cache_dir={shared}", "report=false"],
                    tmp_path) == 0
    (first,), (second,) = (list((tmp_path / n / "jobs").iterdir()) for n in ("first", "second"))
    outcome = json.loads((second / "manifest.json").read_text())["outcome"]
    assert outcome["computed"] == 0 and outcome["cached"] == 3 and outcome["scored"] == 0
    assert not (tmp_path / "second" / "edits").exists() and len(list(shared.rglob("edit.json"))) == 3
    for table in ("edits.parquet", "scores.parquet"):
        a, b = pd.read_parquet(first / table), pd.read_parquet(second / table)
        pd.testing.assert_frame_equal(a.drop(columns="run"), b.drop(columns="run"))


def test_joblib_launcher(tmp_path):
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=identity,inpaint",
            "dataset.limit=3", "run_name=par"]
    assert _run(args, tmp_path) == 0
    assert len(list((tmp_path / "par" / "jobs").iterdir())) == 2
    assert (tmp_path / "par" / "report" / "table.md").is_file()


def test_score_a_folder_of_outside_edits(tmp_path):
    from harness.data import GenericDataset

    ds = GenericDataset(REPO / "datasets" / "sample")
    refs = ds.refs()[:3]
    folder = tmp_path / "mine"
    folder.mkdir()
    for r in refs:
        Image.fromarray(ds.load(r).source).save(folder / f"{r.id}.png")
    rc = main(["score", str(folder), "--run-name", "outside", "--metrics", "pixel", f"results_dir={tmp_path}", "progress=false"])
    assert rc == 0
    scores = pd.concat(pd.read_parquet(p) for p in (tmp_path / "outside" / "jobs").rglob("scores.parquet"))
    edits = pd.concat(pd.read_parquet(p) for p in (tmp_path / "outside" / "jobs").rglob("edits.parquet"))
    assert set(scores.method) == {"mine"}
    ok = edits[edits.status == "ok"]
    assert set(ok.sample_id) == {r.id for r in refs}
    # the edits are the sources: every L1 and L2 row present and exactly 0 (pixel: regions all/edited/unedited;
    # a sample without a mask has no edited / unedited rows)
    mine = scores[scores.sample_id.isin(ok.sample_id)]
    whole = mine[mine.region == "all"]
    assert len(whole) == 2 * len(refs) and (whole.value == 0).all(), whole
    assert (mine.value.dropna() == 0).all()
    skipped = edits[edits.status == "skipped"]
    assert len(skipped) == len(ds.refs()) - 3 and skipped.reason.str.contains("no edit named").all()


def test_validate_command(builder, capsys):
    assert main(["validate", "sample"]) == 0
    assert "22 samples, 0 error(s), 0 warning(s)" in capsys.readouterr().out
    builder.add_simple("ok")
    builder.add(id="bad", source="images/none.png", category="remove")
    assert main(["validate", str(builder.root)]) == 1
    out = capsys.readouterr().out
    assert "ERROR sample 'bad', field 'source'" in out and "2 samples, 1 error(s), 0 warning(s)" in out


def test_list_command(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("identity", "inpaint", "recolor", "paste", "move", "lpips", "landmark_mse"):
        assert name in out


def test_console_script_help():
    exe = Path(sys.executable).parent / "edit-harness"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "edit-harness run" in out.stdout


def test_submitit_local_launcher(builder, tmp_path):
    for i in range(2):
        builder.add_simple(f"s{i}")
    args = ["-m", "hydra/launcher=submitit_local", "method=identity,inpaint", f"dataset.root={builder.root}",
            "dataset.name=syn", "run_name=sub"]
    assert _run(args, tmp_path) == 0
    jobs = sorted(p.name for p in (tmp_path / "sub" / "jobs").iterdir())
    assert [j.split("-")[0] for j in jobs] == ["identity", "inpaint"]
    assert (tmp_path / "sub" / "report" / "table.md").is_file()


def test_weights_command_lists_present_and_missing(monkeypatch, capsys):
    monkeypatch.setenv("EDIT_HARNESS_DLIB_PREDICTOR", "/nonexistent/predictor.dat")
    assert main(["weights", "default", "pixel"]) == 0
    out = capsys.readouterr().out
    assert "protocol default:" in out and "protocol pixel:" in out
    assert "MISSING  landmark_mse" in out and "/nonexistent/predictor.dat" in out
    assert "present  l1: none" in out
    assert main(["weights", "nope"]) == 2
    assert "protocols: " in capsys.readouterr().err
    # an experiment: the protocol it composes to (with its overrides), listed the same way
    assert main(["weights", "recolor_strength"]) == 0
    out = capsys.readouterr().out
    assert "experiment recolor_strength (protocol default):" in out and "MISSING  landmark_mse" in out
    # a paper protocol: its model metrics say how to get their weights
    assert main(["weights", "pie_bench"]) == 0
    out = capsys.readouterr().out
    assert "structure_distance" in out and "lpips" in out and "squeezenet1_1" in out


def test_weights_command_lists_the_experiments_method_models(empty_hub, capsys):
    assert main(["weights", "experiment=default"]) == 0
    out = capsys.readouterr().out
    assert "experiment default (protocol default):" in out
    assert "present  method identity: needs no weights" in out
    assert "MISSING  method instruct_pix2pix: timbrooks/instruct-pix2pix: not in the Hugging Face hub cache" in out
    assert "MISSING  method sdedit: stable-diffusion-v1-5/stable-diffusion-v1-5" in out
    assert "method model(s) missing" in out
    assert main(["weights", "experiment=nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def test_weights_command_for_one_method(empty_hub, capsys):
    """method=NAME: that method's weights with its YAML defaults (ZONE needs four), no metric lines."""
    assert main(["weights", "method=zone"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method zone:\n")
    assert "MISSING  method zone: timbrooks/instruct-pix2pix: not in the Hugging Face hub cache" in out
    assert "MISSING  method zone: vinesmsuic/magicbrush-jul7: not in the Hugging Face hub cache" in out
    assert "MISSING  method zone: SAM vit_h checkpoint: method.sam_checkpoint is not set" in out
    assert "present  method zone: ZONE action classifier (not set" in out
    assert "3 method model(s) missing" in out and "metric" not in out.replace("method model(s)", "")
    assert main(["weights", "method=identity"]) == 0
    assert "present  method identity: needs no weights" in capsys.readouterr().out
    assert main(["weights", "method=zoen"]) == 2
    assert "unknown method 'zoen' (did you mean 'zone'?)" in capsys.readouterr().err
