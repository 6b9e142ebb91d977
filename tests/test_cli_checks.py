"""The command line a new user meets: a bad dataset key or value, or a bad value anywhere in a
sweep, is one line listing what exists, printed once, before any job runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.cli import main

from .conftest import REPO

FAST = ["metrics=pixel", "progress=false"]
SAMPLE_IDS = [json.loads(line)["id"] for line in (REPO / "datasets" / "sample" / "manifest.jsonl").read_text().splitlines()
              if line.strip()]


def _cli(args, tmp_path):
    """The installed command, as a user runs it (a separate process: what reaches the terminal)."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("override, expected", [
    ("dataset.limit=abc", "edit-harness: dataset.limit must be a whole number >= 1 (or null: every sample), got 'abc'"),
    ("dataset.limt=2", "edit-harness: unknown key 'dataset.limt' (did you mean 'dataset.limit'?); dataset 'sample' "
                       "has: extra_categories, format, ids, limit, manifest, mask_rule, mask_threshold, max_pixels, "
                       "name, root, shard, version"),
    ("dataset.ids=[coffee_remove_spon]", "edit-harness: dataset 'sample' has no sample 'coffee_remove_spon' "
                                          "(did you mean 'coffee_remove_spoon'?); its 22 sample ids: "
                                          + ", ".join(SAMPLE_IDS)),
])
def test_dataset_errors_are_one_line_listing_what_exists(override, expected, tmp_path):
    out = _cli(["run", *FAST, f"results_dir={tmp_path / 'results'}", override], tmp_path)
    assert out.returncode == 2
    # exactly one line, on stderr; no traceback, no Hydra hint, nothing on stdout
    assert out.stderr == expected + "\n", out.stderr
    assert out.stdout == ""
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("args, message", [
    # an added key the dataset's loader does not take
    (["+dataset.limt=2"], "dataset 'sample' has no key 'limt' (did you mean 'limit'?); its keys: extra_categories, "
                          "format, ids, limit, manifest"),
    (["dataset.ids=coffee_cup_blue"], "dataset.ids must be a list of sample ids, e.g. dataset.ids=[a,b], got "
                                      "'coffee_cup_blue'"),
    (["dataset.limit=0"], "dataset.limit must be a whole number >= 1 (or null: every sample), got 0"),
    (["dataset.shard=1/1"], "dataset 'sample': shard must look like 'i/n' with 0 <= i < n, got '1/1'"),
    (["seeed=3"], "unknown key 'seeed' (did you mean 'seed'?); the configuration has: method, dataset, metrics, "
                  "run_name"),
    (["method=inpaint,recolor"], "'method=inpaint,recolor' is a sweep: add -m to run one job per value"),
    # a published table that does not exist, or is not a list
    (["paper_tables=[zone/table7]"], "paper_tables: no published table 'zone/table7'; known: cpam/table2, "),
    (["paper_tables=[../../etc]"], "paper_tables: paper table name '../../etc' is not of the form '<paper>/<table>'"),
    (["paper_tables=zone/table1"], "paper_tables must be a list of published tables such as [zone/table1], got "
                                   "'zone/table1'"),
    # a table without a declared mapping cannot be compared
    (["paper_tables=[zone/table2]"], "paper_tables: no mapping for zone/table2: "),
])
def test_other_bad_keys_and_values_fail_before_hydra(args, message, tmp_path, capsys):
    assert main(["run", *FAST, f"results_dir={tmp_path}", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("edit-harness: " + message), captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    # the bad value is in the second job: the first must not run either
    (["method=inpaint", "method.radius=3,abc"],
     "edit-harness: job 2 of 2 (method.radius=abc): method 'inpaint': parameter 'radius' must be an integer, got 'abc'"),
    (["method=inpaint,nosuch"], "edit-harness: unknown method 'nosuch'; available: "),
    # a value one method of the grid takes and another refuses
    (["method=recolor,sdedit", "++method.strength=0.0"],
     "edit-harness: job 2 of 2 (method=sdedit): method 'sdedit': "),
    # a dataset value in the second job
    (["method=identity", "dataset.ids=[coffee_cup_blue],[nosuch]"],
     "edit-harness: job 2 of 2 (dataset.ids=[nosuch]): dataset 'sample' has no sample 'nosuch'; its 22 sample ids: "),
    # an experiment's own sweep (5 strengths) with a bad value for all of them
    (["experiment=recolor_strength", "method.space=bogus"],
     "edit-harness: job 1 of 5 (method.strength=0.0) and 4 more: method 'recolor': parameter 'space' must be one of "
     "['lab', 'hue'], got 'bogus'"),
])
def test_a_bad_value_anywhere_in_a_sweep_fails_before_the_first_job(args, message, tmp_path, capsys):
    assert main(["run", "-m", *FAST, f"results_dir={tmp_path}", "run_name=sweep", "dataset.limit=1", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message), captured.err
    assert captured.err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()  # no job ran, no Hydra folder either


def test_a_sweep_error_is_printed_once_without_traceback(tmp_path):
    out = _cli(["run", "-m", *FAST, f"results_dir={tmp_path / 'results'}", "method=recolor",
                "method.strength=0.5,7", "dataset.limit=1"], tmp_path)
    assert out.returncode == 2
    assert out.stderr == ("edit-harness: job 2 of 2 (method.strength=7): method 'recolor': recolor: 'strength' must be "
                          "a number in [0, 1], got 7.0\n")
    assert out.stdout == "" and not (tmp_path / "results").exists()


def test_valid_sweeps_pass_the_check():
    from harness.cli import check_jobs

    jobs = check_jobs(["method=recolor", "method.strength=0.0,0.5", "dataset.limit=2", "metrics=pixel"], multirun=True)
    assert jobs.points == [["method=recolor", "method.strength=0.0", "dataset.limit=2", "metrics=pixel"],
                           ["method=recolor", "method.strength=0.5", "dataset.limit=2", "metrics=pixel"]]
    assert jobs.swept == ["method.strength"] and jobs.multirun
    assert [c["method"]["strength"] for c in jobs.configs] == [0.0, 0.5]
    assert all(c["dataset"]["limit"] == 2 and c["metrics"]["protocol"] == "pixel" for c in jobs.configs)
    # an experiment's sweep params come first, as Hydra's basic sweeper orders them; its
    # hydra.mode makes it a sweep without -m
    jobs = check_jobs(["experiment=recolor_strength"], multirun=False)
    assert jobs.multirun and len(jobs.points) == 5
    assert [c["method"]["strength"] for c in jobs.configs] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [jobs.label(i) for i in range(2)] == ["method.strength=0.0", "method.strength=0.25"]
    # a single run is one job; ids that exist pass
    jobs = check_jobs(["dataset.ids=[coffee_cup_blue,flower_purple]"], multirun=False)
    assert len(jobs.points) == 1 and not jobs.multirun
    assert jobs.configs[0]["dataset"]["ids"] == ["coffee_cup_blue", "flower_purple"]


# -- the sweeper does not compose again the jobs the CLI checked ----------------------------------
def test_checked_sweeper_skips_only_the_jobs_the_cli_checked(monkeypatch):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from hydra_plugins.edit_harness_sweeper import CheckedBasicSweeper, checked_jobs

    validated = []
    monkeypatch.setattr(BasicSweeper, "validate_batch_is_legal", lambda self, batch: validated.append(batch))
    sweeper = CheckedBasicSweeper(max_batch_size=None)
    with checked_jobs([["method=inpaint", "method.radius=1"], ["method=inpaint", "method.radius=2"]]):
        sweeper.validate_batch_is_legal([["method=inpaint", "method.radius=1"], ["method=inpaint", "method.radius=2"]])
        assert validated == []  # every job of the batch was checked: no second composition
        sweeper.validate_batch_is_legal([["method=inpaint", "method.radius=1"], ["method=inpaint", "method.radius=3"]])
        assert len(validated) == 1  # one job the CLI did not check: Hydra validates the batch
    sweeper.validate_batch_is_legal([["method=inpaint", "method.radius=1"]])
    assert len(validated) == 2  # outside the CLI's block nothing counts as checked


def test_run_uses_the_checked_sweeper():
    from hydra import compose, initialize_config_dir

    from harness.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=recolor_strength"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.edit_harness_sweeper.CheckedBasicSweeper"
    assert "method.strength" in cfg.hydra.sweeper.params  # an experiment's own sweep still reaches it
