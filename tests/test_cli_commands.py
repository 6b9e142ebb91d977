"""The commands a new user meets: score a folder against any dataset, compare runs without
overwriting a report, the progress of a sweep, --help everywhere, validate's levels, the
compact terminal table, configs found wherever harness.paths finds them."""
from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from harness.cli import main

FAST = ["metrics=pixel", "progress=false"]


def _run(tmp_path, *args) -> int:
    return main(["run", f"results_dir={tmp_path}", *FAST, *args])


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- score ------------------------------------------------------------------------------------
def test_score_takes_a_dataset_folder_and_names_stray_edit_files(builder, tmp_path, capsys):
    for i in range(3):
        builder.add_simple(f"s{i}", seed=i)
    edits = tmp_path / "mine"
    edits.mkdir()
    for sid in ("s0", "s1"):
        Image.open(builder.root / "images" / f"{sid}.png").save(edits / f"{sid}.png")
    Image.open(builder.root / "images" / "s1.png").save(edits / "s1.jpg", quality=95)  # a second file for s1
    Image.open(builder.root / "images" / "s2.png").save(edits / "s_2.png")  # misnamed
    (edits / "notes.txt").write_text("not an image: not an edit")
    rc = main(["score", str(edits), "--dataset", str(builder.root), "--run-name", "outside", *FAST,
               f"results_dir={tmp_path / 'results'}"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "edit-harness: warning: edit file 's_2.png' matches no sample id of dataset 'synthetic' (closest: s2)",
        "edit-harness: warning: sample 's1' has several edit files (s1.jpg, s1.png): using s1.jpg",
    ]
    assert f"2 of 3 samples have an edit in {edits}; the others are recorded as skipped" in captured.out
    job = next((tmp_path / "results" / "outside" / "jobs").iterdir())
    table = pd.read_parquet(job / "edits.parquet").set_index("sample_id")
    assert table.status.to_dict() == {"s0": "ok", "s1": "ok", "s2": "skipped"}
    assert set(table.dataset) == {"synthetic"} and set(table.method) == {"mine"}
    scores = pd.read_parquet(job / "scores.parquet")
    whole = scores[(scores.region == "all") & (scores.sample_id == "s0")]
    assert sorted(whole.metric) == ["l1", "l2"] and (whole.value == 0).all()  # s0's edit is its source
    # the folder's location on this machine is in no table (a reason names the folder, not its path)
    for name in ("edits.parquet", "scores.parquet"):
        frame = pd.read_parquet(job / name)
        assert not any(frame[c].astype(str).str.contains(str(tmp_path)).any() for c in frame.columns), name
    assert table.loc["s2", "reason"] == "sample 's2': no edit named 's2.<png|jpg|...>' in the edits folder 'mine'"
    for f in (tmp_path / "results" / "outside" / "report").iterdir():
        if f.suffix in (".md", ".csv", ".txt", ".tex"):
            assert str(tmp_path) not in f.read_text(), f.name


def test_score_fails_when_no_file_matches_a_sample(builder, tmp_path, capsys):
    for i in range(3):
        builder.add_simple(f"s{i}", seed=i)
    edits = tmp_path / "wrong"
    edits.mkdir()
    Image.open(builder.root / "images" / "s0.png").save(edits / "sample-0.png")
    rc = main(["score", str(edits), "--dataset", str(builder.root), *FAST, f"results_dir={tmp_path / 'results'}"])
    assert rc == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "edit-harness: warning: edit file 'sample-0.png' matches no sample id of dataset 'synthetic'",
        f"edit-harness: no file in {edits} is named after one of the 3 selected samples of dataset 'synthetic' "
        "(<sample_id>.png); sample ids: s0, s1, s2",
    ]
    assert not (tmp_path / "results").exists()


def test_score_checks_its_extra_overrides(builder, tmp_path, capsys):
    builder.add_simple("s0")
    edits = tmp_path / "mine"
    edits.mkdir()
    rc = main(["score", str(edits), "--dataset", str(builder.root), *FAST, "dataset.limt=1"])
    assert rc == 2
    assert "unknown key 'dataset.limt' (did you mean 'dataset.limit'?)" in capsys.readouterr().err


# -- report -----------------------------------------------------------------------------------
def test_report_of_several_runs_never_overwrites_a_runs_report(tmp_path, capsys):
    assert _run(tmp_path, "method=identity", "dataset.limit=2", "run_name=a") == 0
    assert _run(tmp_path, "method=inpaint", "dataset.limit=2", "run_name=b", "report=false") == 0
    a, b = tmp_path / "a", tmp_path / "b"
    before = _snapshot(a / "report")
    capsys.readouterr()
    assert main(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    combined = tmp_path / "report-a+b"
    assert out.startswith(f"report written to {combined}\n")
    assert _snapshot(a / "report") == before and not (b / "report").exists()
    table = pd.read_csv(combined / "table.csv")
    assert sorted(set(table.method)) == ["identity", "inpaint"]
    # --out: exactly there
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    assert capsys.readouterr().out.startswith(f"report written to {tmp_path / 'cmp'}\n")
    assert (tmp_path / "cmp" / "table.md").is_file() and _snapshot(a / "report") == before
    # one run: its own report, as before
    assert main(["report", str(b)]) == 0
    assert capsys.readouterr().out.startswith(f"report written to {b / 'report'}\n")


def test_report_prints_the_compact_terminal_table(tmp_path, capsys):
    assert _run(tmp_path, "method=inpaint", "dataset.limit=2", "run_name=t", "report=false") == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "t" / "report"
    terminal = (report / "table_terminal.txt").read_text()
    assert terminal != (report / "table.md").read_text()
    assert out == f"report written to {report}\n" + terminal.rstrip("\n") + "\n"


# -- progress ---------------------------------------------------------------------------------
JOB_LINE = re.compile(r"job (\d) of (\d): (.*) \[\d+:\d\d into the sweep\]")


def test_a_sweep_prints_one_line_per_job(tmp_path, capsys):
    args = ["-m", "method=recolor", "method.strength=0.0,1.0", "dataset.limit=1", "run_name=s", "report=false"]
    assert _run(tmp_path, *args) == 0
    out = capsys.readouterr().out
    lines = [JOB_LINE.fullmatch(line).groups() for line in out.splitlines() if line.startswith("job ")]
    assert lines == [("1", "2", "method.strength=0.0"), ("2", "2", "method.strength=1.0")]
    assert re.search(r"^sweep done: 2 job\(s\) in \d+:\d\d$", out, re.M)
    assert "\r" not in out  # plain lines: a log file gets no redrawn bar


def test_sweep_progress_reaches_launcher_processes(tmp_path):
    # a fresh process: joblib's workers, started by the launcher, print the lines
    args = ["run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=identity,inpaint",
            "dataset.limit=1", "run_name=par", "report=false", f"results_dir={tmp_path}", *FAST]
    out = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = sorted(JOB_LINE.fullmatch(line).groups() for line in out.stdout.splitlines() if line.startswith("job "))
    assert lines == [("1", "2", "method=identity"), ("2", "2", "method=inpaint")]
    assert re.search(r"^sweep done: 2 job\(s\) in \d+:\d\d$", out.stdout, re.M)


# -- help -------------------------------------------------------------------------------------
def test_run_help_prints_ours_and_starts_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    text = out.stdout
    assert text.startswith("usage: edit-harness run [-m]")
    assert "A job is one method with one parameter point on one dataset" in " ".join(text.split())
    from harness.cli import CONF_DIR

    datasets = ", ".join(sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")))
    for line in (f"  dataset:    {datasets}", "  inpaint:", "examples:",
                 "  edit-harness run -m method=recolor method.strength=0,0.5,1", "--hydra-help"):
        assert line in text, line
    assert not list(tmp_path.iterdir())  # no results/ folder: nothing ran
    hydra = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--hydra-help"], capture_output=True,
                           text=True, cwd=tmp_path, timeout=120)
    assert hydra.returncode == 0 and "Hydra (" in hydra.stdout and not list(tmp_path.iterdir())


def test_the_parametrised_help_test_covers_every_command():
    from harness.cli import COMMANDS

    assert set(COMMANDS) == set(HELP_COMMANDS)


HELP_COMMANDS = ["report", "score", "validate", "weights", "list", "gate", "figures", "compare", "train-part-token",
                 "study"]


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: edit-harness {command}")
    assert "options:" in out and "-h, --help" in out
    with pytest.raises(SystemExit):
        main(["help", command])
    assert capsys.readouterr().out == out


# -- validate ---------------------------------------------------------------------------------
def test_validate_prints_levels_and_fails_only_on_errors(builder, capsys):
    builder.add_simple("ok")
    builder.add_simple("nocat", category=None)
    assert main(["validate", str(builder.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("WARNING sample 'nocat', field 'category': 1 sample(s) have no category (nocat)")
    assert out[-1].startswith("dataset 'synthetic' v1: 2 samples, 0 error(s), 1 warning(s); categories: -=1, remove=1")
    builder.add(id="bad", source="images/none.png", category="remove")
    assert main(["validate", str(builder.root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in out[:-1]] == ["ERROR", "WARNING"]
    assert out[0].startswith("ERROR sample 'bad', field 'source'")
    assert "3 samples, 1 error(s), 1 warning(s)" in out[-1]


# -- configs wherever harness.paths finds them (plugin packages' config folders) ---------------
def test_configs_are_found_through_harness_paths(builder, tmp_path, monkeypatch, capsys):
    from harness import paths

    builder.add_simple("s0")
    extra = tmp_path / "plugin_conf"
    (extra / "dataset").mkdir(parents=True)
    (extra / "dataset" / "mine.yaml").write_text(f"name: mine\nformat: generic\nroot: {builder.root}\n")
    (extra / "metrics").mkdir()
    (extra / "metrics" / "tinyproto.yaml").write_text("protocol: tinyproto\nitems:\n  l1: {}\n")
    monkeypatch.setattr(paths, "config_dirs", lambda: [paths.CONF_DIR, extra])
    assert main(["validate", "mine"]) == 0
    assert capsys.readouterr().out.startswith("dataset 'mine' v1: 1 samples, 0 error(s), 0 warning(s)")
    assert main(["weights", "tinyproto"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["protocol tinyproto:", "  present  l1: none"]
    assert main(["validate", "mien"]) == 2
    assert "unknown dataset 'mien': not a config (did you mean 'mine'?)" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly():
    """`edit-harness list | head -1`: the reader closes the pipe; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the command (still importing) writes anything
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc == 141  # 128 + SIGPIPE, as a shell reports a tool stopped by a closed pipe


def test_figures_command_draws_the_grid_and_names_what_it_could_not(tmp_path, capsys):
    assert _run(tmp_path, "-m", "method=identity,recolor", "dataset.ids=[coffee_cup_blue,flower_purple]",
                "run_name=figs", "report=false") == 0
    run = tmp_path / "figs"
    capsys.readouterr()
    assert main(["figures", str(run), "--methods", "recolor", "--format", "pdf"]) == 0
    out = capsys.readouterr().out.splitlines()
    grid = run / "report" / "figures" / "fig_grid.pdf"
    assert f"wrote {grid}" in out and grid.read_bytes().startswith(b"%PDF-")
    assert not list((run / "report" / "figures").glob("*.png"))  # --format pdf only
    # pixel protocol: no CLIP rows, so ZONE's Figure 6 is not drawn, and the reason is printed
    assert any(line.startswith("not drawn: clip_i vs clip_t") for line in out)
    assert main(["figures", str(run), "--methods", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["figures", str(tmp_path / "nothing")]) == 2
