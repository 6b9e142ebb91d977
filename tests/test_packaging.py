"""A real package: the sdist and the wheel carry the Hydra configs, the embedded sample set and
the Hydra plugin; an installed wheel runs from any folder with no checkout on the path.

The distributions are built the way a release is (sdist from the checkout, wheel from the
sdist), without build isolation or an index (the shared environment's setuptools; no network),
into temporary folders, and the wheel is installed with ``pip install --target`` into one too:
nothing is installed into the shared environment and nothing is left in the repository but the
egg-info that every install writes (git-ignored).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from harness import paths

from .conftest import REPO
from .test_plugins import plugin_target  # noqa: F401  (fixture: tests/plugin_example installed in a folder)

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, vendored by pip
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

RESOURCES = "harness/_resources"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _sample_files() -> set[str]:
    """The embedded sample set's data files (its build script stays in the repository)."""
    return {p.relative_to(REPO).as_posix() for p in (REPO / "datasets").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """An sdist built from the checkout and a wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    name = _ok(subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True,
                              timeout=300)).stdout.strip().splitlines()[-1]
    sdist = out / name
    with tarfile.open(sdist) as tar:
        # the "data" filter (no links out, no absolute paths) where this Python has it (3.10.12+, 3.11.4+)
        tar.extractall(out / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (src,) = (out / "src").iterdir()
    _ok(subprocess.run([*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out / "wheel"),
                        str(src)], capture_output=True, text=True, timeout=300))
    (wheel,) = (out / "wheel").glob("edit_harness-*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (``pip install --target``)."""
    target = tmp_path_factory.mktemp("target")
    _ok(subprocess.run([*PIP, "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(dists["wheel"])],
                       capture_output=True, text=True, timeout=300))
    return target


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(target)
    return env


# -- the package list and the checkout ------------------------------------------------------------------
def test_package_list_holds_every_python_package():
    """pyproject.toml lists its packages (a find directive cannot map conf/ and datasets/ into the
    package): a new package under harness/, methods/ or hydra_plugins/ must be listed too."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for top in ("harness", "methods")
             for p in (REPO / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    found |= {"hydra_plugins"} | {f"hydra_plugins.{p.name}" for p in (REPO / "hydra_plugins").iterdir()
                                  if p.is_dir() and p.name != "__pycache__"}
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == {"harness._resources.conf", "harness._resources.datasets",
                              "harness._resources.results.paper"}
    # hydra_plugins is a namespace package shared with other Hydra plugins: it must stay without __init__.py.
    assert not (REPO / "hydra_plugins" / "__init__.py").exists()


def test_a_checkout_reads_the_repository_folders():
    assert paths.RESOURCE_ROOT == REPO
    assert paths.CONF_DIR == REPO / "conf" and paths.SAMPLE_DIR == REPO / "datasets" / "sample"
    assert not (REPO / RESOURCES).exists()  # no copy of conf/ or datasets/ in the source tree


# -- what the distributions hold -------------------------------------------------------------------------
def test_wheel_holds_configs_sample_set_and_hydra_plugin_and_nothing_else(dists):
    with zipfile.ZipFile(dists["wheel"]) as z:
        infos = {i.filename: i for i in z.infolist()}
    names = set(infos)
    confs = {p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert len(confs) > 30 and {f"{RESOURCES}/{c}" for c in confs} <= names
    sample = _sample_files()
    assert "datasets/sample/card.yaml" in sample and "datasets/sample/manifest.jsonl" in sample
    assert {f"{RESOURCES}/{s}" for s in sample} <= names
    code = {p.relative_to(REPO).as_posix() for top in ("harness", "methods", "hydra_plugins")
            for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts}
    assert "hydra_plugins/edit_harness_searchpath/__init__.py" in code and code <= names
    paper = {p.relative_to(REPO).as_posix() for p in (REPO / "results" / "paper").rglob("*") if p.is_file()}
    assert "results/paper/zone/table1.csv" in paper and {f"{RESOURCES}/{p}" for p in paper} <= names
    # the study app's page templates, script and style sheet (package data of harness.study)
    study = {p.relative_to(REPO).as_posix() for sub in ("templates", "static")
             for p in (REPO / "harness" / "study" / sub).iterdir() if p.is_file()}
    assert "harness/study/templates/rater.html" in study and study <= names
    # Nothing else: no tests, results, top-level conf/ or datasets/, build script, caches.
    dist_info = {n for n in names if n.split("/")[0].endswith(".dist-info")}
    assert names - dist_info == (code | study | {f"{RESOURCES}/{c}" for c in confs}
                                 | {f"{RESOURCES}/{s}" for s in sample} | {f"{RESOURCES}/{p}" for p in paper})
    assert "hydra_plugins/__init__.py" not in names
    # Size: the sample set is about 3 MB of PNGs, the whole wheel compressed about the same.
    sample_bytes = sum(infos[f"{RESOURCES}/{s}"].file_size for s in sample)
    assert sample_bytes < 5_000_000 and dists["wheel"].stat().st_size < 8_000_000
    entry_points = [n for n in dist_info if n.endswith("entry_points.txt")]
    with zipfile.ZipFile(dists["wheel"]) as z:
        assert "edit-harness = harness.cli:main" in z.read(entry_points[0]).decode()


def test_sdist_holds_sources_configs_and_sample_set_but_no_results(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    assert {"pyproject.toml", "MANIFEST.in", "conf/config.yaml", "datasets/sample/build_sample_set.py",
            "hydra_plugins/edit_harness_searchpath/__init__.py", "tests/plugin_example/pyproject.toml"} <= names
    assert _sample_files() <= names
    assert "results/paper/zone/table1.csv" in names  # the published tables are sources
    assert not [n for n in names if (n.startswith("results/") and not n.startswith("results/paper/"))
                or n.startswith((".venv/", "build/")) or "__pycache__" in n]


# -- the installed wheel ---------------------------------------------------------------------------------
def test_installed_wheel_runs_from_any_folder_without_the_checkout(installed, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = _env(installed)
    # Where everything is imported from: the target folder, never the checkout.
    code = ("import json, os, sys, harness, methods, harness.paths as p\n"
            "from hydra.core.plugins import Plugins\n"
            "from hydra.plugins.search_path_plugin import SearchPathPlugin\n"
            "[plugin] = [c for c in Plugins.instance().discover(SearchPathPlugin)\n"
            "            if c.__name__ == 'EditHarnessSearchPathPlugin']\n"
            "print(json.dumps({'harness': harness.__file__, 'methods': methods.__file__, 'root': str(p.RESOURCE_ROOT),\n"
            "                  'plugin': sys.modules[plugin.__module__].__file__,\n"
            "                  'zone_table1_rows': len(__import__('harness.paper').paper.load_table('zone/table1')),\n"
            "                  'sys_path': [os.path.realpath(x) for x in sys.path if x]}))\n")
    where = json.loads(_ok(subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                                          capture_output=True, text=True, timeout=120)).stdout)
    target = installed.resolve()
    assert Path(where["harness"]).resolve() == target / "harness" / "__init__.py"
    assert Path(where["methods"]).resolve() == target / "methods" / "__init__.py"
    assert Path(where["root"]).resolve() == target / "harness" / "_resources"
    assert Path(where["plugin"]).resolve() == target / "hydra_plugins" / "edit_harness_searchpath" / "__init__.py"
    assert str(REPO.resolve()) not in where["sys_path"] and str(cwd.resolve()) not in where["sys_path"]
    # the published tables ship too (harness/paper.py reads them beside the configs)
    assert where["zone_table1_rows"] == len(pd.read_csv(REPO / "results" / "paper" / "zone" / "table1.csv"))

    script = installed / "bin" / "edit-harness"
    proc = _ok(subprocess.run([str(script), "run", "method=identity", "metrics=pixel", "dataset.limit=2",
                               "progress=false"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300))
    run = cwd / "results" / "sample-pixel"  # results_dir is relative to the working directory
    assert "identity" in proc.stdout and (run / "report" / "table.md").is_file()
    (job,) = (run / "jobs").iterdir()
    edits = pd.read_parquet(job / "edits.parquet")
    scores = pd.read_parquet(job / "scores.parquet")
    manifest = [json.loads(line) for line in (REPO / "datasets" / "sample" / "manifest.jsonl").read_text().splitlines()
                if line.strip()]
    first_two = [r["id"] for r in manifest[:2]]
    assert list(edits.sample_id) == first_two and (edits.status == "ok").all()
    # identity: each edit is its source (the wheel's copy of the sample set), every score 0
    for sid, key in zip(edits.sample_id, edits.edit_key):
        record = next(r for r in manifest if r["id"] == sid)
        src = np.asarray(Image.open(REPO / "datasets" / "sample" / record["source"]).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(run / "edits" / key[:2] / key / "edit.png").convert("RGB")), src)
    assert len(scores) == 2 * 2 * 3 and (scores.value == 0).all()  # 2 samples x (l1, l2) x 3 regions
    # list sees the wheel's configs: every protocol, dataset and experiment of the checkout
    out = _ok(subprocess.run([str(script), "list"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)).stdout
    for group, label in (("metrics", "protocols"), ("dataset", "datasets"), ("experiment", "experiments")):
        line = next(line for line in out.splitlines() if line.startswith(f"{label}:"))
        assert sorted(x.strip() for x in line.split(":", 1)[1].split(",")) == sorted(
            p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def test_installed_wheel_runs_an_outside_packages_method(installed, plugin_target, tmp_path):
    """The wheel's Hydra plugin puts an outside package's configs on the wheel's search path."""
    env = _env(installed)
    env["PYTHONPATH"] = os.pathsep.join([str(installed), str(plugin_target)])
    proc = _ok(subprocess.run([str(installed / "bin" / "edit-harness"), "run", "method=ehx_negate", "dataset=ehx_colors",
                               "dataset.limit=1", "metrics=pixel", "progress=false", "report=false"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300))
    (job,) = (tmp_path / "results" / "ehx_colors-pixel" / "jobs").iterdir()
    edits = pd.read_parquet(job / "edits.parquet")
    assert list(edits.sample_id) == ["coffee_cup_blue"] and list(edits.status) == ["ok"], proc.stdout + proc.stderr
    key = edits.edit_key.iloc[0]
    edit = np.asarray(Image.open(tmp_path / "results" / "ehx_colors-pixel" / "edits" / key[:2] / key / "edit.png"))
    src = np.asarray(Image.open(REPO / "datasets" / "sample" / "images" / "coffee.png").convert("RGB"))
    np.testing.assert_array_equal(edit, 255 - src)


@pytest.mark.slow
def test_installed_wheel_runs_the_default_experiment(installed, tmp_path):
    """The default experiment (every method; the diffusion baselines skipped without weights) from
    the wheel, on one sample with the model-free protocol (about a minute on 2 cores)."""
    proc = _ok(subprocess.run([str(installed / "bin" / "edit-harness"), "run", "experiment=default", "metrics=pixel",
                               "dataset.limit=1", "progress=false"], cwd=tmp_path, env=_env(installed),
                              capture_output=True, text=True, timeout=600))
    run = tmp_path / "results" / "default"
    experiment = yaml.safe_load((REPO / "conf" / "experiment" / "default.yaml").read_text())
    methods = experiment["hydra"]["sweeper"]["params"]["method"].split(",")
    assert len(methods) >= 20
    jobs = {p.name.rsplit("-", 2)[0] for p in (run / "jobs").iterdir()}
    assert jobs == set(methods), proc.stdout
    edits = pd.concat(pd.read_parquet(p) for p in (run / "jobs").rglob("edits.parquet"))
    assert (edits[edits.method.isin(["identity", "inpaint"])].status == "ok").all()
    assert (run / "report" / "table.md").is_file()
