"""Methods, metrics, dataset formats and configs from outside packages (entry points).

The end-to-end tests install ``tests/plugin_example`` (a method, a metric, a dataset format and
their YAMLs) into a temporary folder with pip (never into the shared environment) and run the
installed ``edit-harness`` with that folder on PYTHONPATH, from a working directory outside the
repository. The unit tests build registries on private entry point groups, so the harness's own
registries never see their plugins.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness import paths, plugins
from harness.registry import PluginLoadError, Registry, UnknownNameError


EXAMPLE = Path(__file__).resolve().parent / "plugin_example"
EDIT_HARNESS = Path(sys.executable).parent / "edit-harness"


# -- helpers ---------------------------------------------------------------------------------------
def _env(pythonpath: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(pythonpath)
    return env


def _cli(args: list[str], pythonpath: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The installed ``edit-harness`` command, run from ``cwd`` (outside the repository)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(EDIT_HARNESS), *args], cwd=cwd, env=_env(pythonpath), capture_output=True,
                          text=True, timeout=timeout)


def _fake_distribution(root: Path, name: str, entry_points: dict[str, dict[str, str]]) -> None:
    """An installed distribution as importlib.metadata sees it: a ``.dist-info`` folder with
    METADATA and entry_points.txt (what pip writes; no code needed for a broken entry point)."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def plugin_target(tmp_path_factory) -> Path:
    """tests/plugin_example installed by pip into a temporary folder (built from a copy, so that
    the build leaves nothing in the repository)."""
    base = tmp_path_factory.mktemp("plugin")
    src, target = base / "src", base / "target"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "ehx_plugin" / "conf" / "method" / "ehx_negate.yaml").is_file()
    return target


def _source(sample_id: str) -> np.ndarray:
    record = next(json.loads(line) for line in (paths.SAMPLE_DIR / "manifest.jsonl").read_text().splitlines()
                  if line.strip() and json.loads(line)["id"] == sample_id)
    return np.asarray(Image.open(paths.SAMPLE_DIR / record["source"]).convert("RGB")), record


# -- an outside package end to end -----------------------------------------------------------------
def test_outside_method_metric_and_dataset_run_in_a_sweep(plugin_target, tmp_path):
    results = tmp_path / "results"
    proc = _cli(["run", "-m", "method=ehx_negate,identity", "dataset=ehx_colors", "dataset.limit=2",
                 "metrics=ehx_pixel", f"results_dir={results}", "run_name=plug", "progress=false"],
                plugin_target, tmp_path / "cwd")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = results / "plug"
    jobs = sorted(p.name.split("-")[0] for p in (run / "jobs").iterdir())
    assert jobs == ["ehx_negate", "identity"]
    edits = pd.concat(pd.read_parquet(p) for p in (run / "jobs").rglob("edits.parquet"))
    scores = pd.concat(pd.read_parquet(p) for p in (run / "jobs").rglob("scores.parquet"))
    # The plugin's format: the first two samples of category change_color (not the manifest's first two).
    expected_ids = ["coffee_cup_blue", "chelsea_eyes_blue"]
    for method in ("ehx_negate", "identity"):
        rows = edits[edits.method == method]
        assert sorted(rows.sample_id) == sorted(expected_ids) and (rows.status == "ok").all(), rows
        assert set(rows.dataset) == {"ehx_colors"}
    assert set(scores.metric) == {"l1", "ehx_max_abs"} and set(scores.protocol) == {"ehx_pixel"}

    negate = edits[edits.method == "ehx_negate"].set_index("sample_id")
    for sid in expected_ids:
        src, record = _source(sid)
        key = negate.loc[sid, "edit_key"]
        edit = np.asarray(Image.open(run / "edits" / key[:2] / key / "edit.png").convert("RGB"))
        np.testing.assert_array_equal(edit, 255 - src)  # strength 1.0 (the plugin's YAML default)
        diff = np.abs(edit.astype(np.int32) - src)
        mask = np.asarray(Image.open(paths.SAMPLE_DIR / record["mask"]))
        assert set(np.unique(mask)) == {0, 255}  # a binary mask: no threshold rule involved
        inside = mask > 0
        mine = scores[(scores.method == "ehx_negate") & (scores.sample_id == sid)].set_index(["metric", "region"]).value
        # Max and count are exact; the L1 mean is the same float64 mean of the same integers over
        # the same pixels, summed perhaps in another order (1e-12 relative).
        assert mine["ehx_max_abs", "all"] == diff.max() / 255.0
        assert mine["ehx_max_abs", "edited"] == diff[inside].max() / 255.0
        assert mine["ehx_max_abs", "unedited"] == diff[~inside].max() / 255.0
        assert mine["l1", "all"] == pytest.approx(diff.mean() / 255.0, rel=1e-12)
        assert mine["l1", "edited"] == pytest.approx(diff[inside].mean() / 255.0, rel=1e-12)
        assert mine["ehx_max_abs", "all"] > 0.5  # a negative is far from its source
    ident = scores[scores.method == "identity"]
    assert len(ident) == 2 * 2 * 3 and (ident.value == 0).all()  # 2 samples x 2 metrics x 3 regions
    assert "ehx_negate" in (run / "report" / "table.md").read_text()


def test_list_and_precheck_see_the_outside_package(plugin_target, tmp_path):
    proc = _cli(["list"], plugin_target, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(":", 1)[0].strip(): line for line in proc.stdout.splitlines() if ":" in line}
    assert "ehx_negate" in lines["methods"] and "identity" in lines["methods"]
    assert "ehx_max_abs" in lines["metrics"] and "l1" in lines["metrics"]
    assert "ehx_colors" in lines["datasets"] and "sample" in lines["datasets"]
    assert "ehx_pixel" in lines["protocols"]
    assert "params strength" in lines["ehx_negate"]
    # The pre-check knows the plugin's parameters and lists its method among the others.
    proc = _cli(["run", "method=ehx_negate", "method.bogus=1"], plugin_target, tmp_path)
    assert proc.returncode == 2
    assert "method 'ehx_negate' has no parameter(s) bogus; its parameters: strength" in proc.stderr
    proc = _cli(["run", "method=ehx_nope"], plugin_target, tmp_path)
    assert proc.returncode == 2 and "unknown method 'ehx_nope'" in proc.stderr and "ehx_negate" in proc.stderr


def test_without_the_plugin_its_names_are_unknown(tmp_path):
    """The same commands without the outside package on the path: the names come from it alone."""
    proc = _cli(["list"], tmp_path / "empty", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ehx_negate" not in proc.stdout and "ehx_colors" not in proc.stdout and "identity" in proc.stdout


def test_a_broken_plugin_is_named_and_spares_other_commands(tmp_path):
    broken = tmp_path / "broken"
    _fake_distribution(broken, "ehx-broken", {
        plugins.METHODS_GROUP: {"ehx_missing": "ehx_no_such_module:Thing"},
        plugins.CONF_GROUP: {"ehx_gone": "ehx_no_such_package.conf"},
    })
    proc = _cli(["list"], broken, tmp_path / "cwd")
    assert proc.returncode == 0, proc.stderr
    methods_line = next(line for line in proc.stdout.splitlines() if line.startswith("methods:"))
    assert "identity" in methods_line and "ehx_missing" not in methods_line
    err = proc.stderr
    assert ("entry point 'ehx_missing = ehx_no_such_module:Thing' in group 'edit_harness.methods' "
            "(distribution ehx-broken 0.1) failed to load: ModuleNotFoundError") in err
    assert "entry point 'ehx_gone = ehx_no_such_package.conf' in group 'edit_harness.conf'" in err
    assert err.count("ehx_missing = ") == 1  # logged once
    # A run that does not use it is unaffected.
    results = tmp_path / "results"
    proc = _cli(["run", "method=identity", "dataset.limit=1", "metrics=pixel", "progress=false", "report=false",
                 f"results_dir={results}"], broken, tmp_path / "cwd")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = (results / "sample-pixel" / "jobs").iterdir()
    assert json.loads((job / "manifest.json").read_text())["outcome"]["counts"]["ok"] == 1


# -- registries and entry points (in process, private groups) -----------------------------------------
@pytest.fixture
def unit(tmp_path, monkeypatch):
    """A private entry point namespace: unique group and module names, a folder on sys.path."""
    tag = uuid.uuid4().hex[:8]
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))

    class Unit:
        def __init__(self):
            self.tag, self.root = tag, root
            self.group = f"ehx_unit_{tag}.things"

        def module(self, name: str, text: str) -> str:
            full = f"ehx_unit_{tag}_{name}"
            (root / f"{full}.py").write_text(text)
            monkeypatch.delitem(sys.modules, full, raising=False)
            return full

        def distribution(self, eps: dict[str, str], group: str | None = None) -> None:
            _fake_distribution(root, f"ehx-unit-{tag}", {group or self.group: eps})

    yield Unit()
    for name in [m for m in sys.modules if m.startswith(f"ehx_unit_{tag}")]:
        del sys.modules[name]


def test_registry_loads_entry_points_lazily_and_once(unit, monkeypatch):
    reg_mod = unit.module("reg", "")
    thing = unit.module("thing", "class Thing:\n    pass\n")
    # Module form: importing the module registers the name with the registry's decorator.
    deco = unit.module("deco", f"from {reg_mod} import REG\n\n@REG.register('decorated')\nclass D:\n    pass\n")
    unit.distribution({"plain": f"{thing}:Thing", "decorated": deco})
    reg = Registry("thing", entry_point_group=unit.group)
    importlib.import_module(reg_mod).REG = reg

    calls = []
    real = plugins.entry_points
    monkeypatch.setattr(plugins, "entry_points", lambda group: calls.append(group) or real(group))
    assert calls == []  # nothing is loaded when the registry is made
    assert reg.names() == ["decorated", "plain"]
    assert reg.get("plain").__name__ == "Thing" and reg.get("plain").name == "plain"
    assert reg.get("decorated").__name__ == "D"
    assert "plain" in reg and list(reg) == ["decorated", "plain"] and reg.load_errors() == []
    assert calls == [unit.group]  # one scan, however many lookups


def test_broken_entry_points_are_recorded_named_and_raised_on_lookup(unit, caplog):
    reg_mod = unit.module("reg3", "")
    # The harness's own entries: registered by importing ``builtin`` before any plugin loads.
    builtin = unit.module("builtin", f"from {reg_mod} import REG\n\n@REG.register('own')\nclass Own:\n    pass\n")
    reg = Registry("thing", builtin=builtin, entry_point_group=unit.group)
    importlib.import_module(reg_mod).REG = reg
    good = unit.module("good", "class Good:\n    pass\n")
    other = unit.module("other", "class Other:\n    pass\n")
    exits = unit.module("exits", "raise SystemExit(3)\n")
    quiet = unit.module("quiet", "X = 1\n")
    unit.distribution({
        "good": f"{good}:Good",
        "own": f"{other}:Other",            # a name the harness already has
        "missing": f"ehx_unit_{unit.tag}_nowhere:Thing",
        "exits": f"{exits}:Anything",       # a plugin must not end the process
        "silent": quiet,                    # a module that registers nothing by that name
    })
    caplog.set_level(logging.WARNING, logger="edit_harness")
    assert reg.names() == ["good", "own"]
    assert reg.get("own").__name__ == "Own"  # the harness's own entry keeps its name
    errors = {e.name: e for e in reg.load_errors()}
    assert sorted(errors) == ["exits", "missing", "own", "silent"]
    dist = f"ehx-unit-{unit.tag} 0.1"
    assert str(errors["missing"]) == (
        f"entry point 'missing = ehx_unit_{unit.tag}_nowhere:Thing' in group '{unit.group}' (distribution {dist}) "
        f"failed to load: ModuleNotFoundError: No module named 'ehx_unit_{unit.tag}_nowhere'")
    assert "ValueError: thing 'own' is already registered" in str(errors["own"])
    assert "SystemExit: 3" in str(errors["exits"])
    assert f"importing module '{quiet}' registered no thing named 'silent'" in str(errors["silent"])
    # Each failure is logged once, not on every lookup.
    reg.names(), reg.load_errors()
    assert sorted(r.getMessage().split("'")[1].split(" =")[0] for r in caplog.records) == sorted(errors)
    with pytest.raises(PluginLoadError) as e:
        reg.get("missing")
    assert str(e.value).startswith("thing 'missing' is not available: entry point 'missing = ")
    with pytest.raises(UnknownNameError) as e:
        reg.get("nope")
    assert "unknown thing 'nope'; available: good, own; plugins that failed to load: " in str(e.value)
    assert "entry point 'exits = " in str(e.value)


def test_an_entry_point_must_name_what_it_registers(unit):
    reg_mod = unit.module("reg2", "")
    mod = unit.module("named", f"from {reg_mod} import REG\n\n@REG.register('real_name')\nclass C:\n    pass\n")
    unit.distribution({"other_name": f"{mod}:C"})
    reg = Registry("thing", entry_point_group=unit.group)
    importlib.import_module(reg_mod).REG = reg
    assert reg.names() == ["real_name"]  # the decorator ran; the mismatched entry point did not register
    (err,) = reg.load_errors()
    assert "is registered as thing 'real_name', but the entry point names it 'other_name'" in err.error


def test_config_trees_from_entry_points(unit, tmp_path):
    pkg = f"ehx_unit_{unit.tag}_confpkg"
    (unit.root / pkg / "conf" / "method").mkdir(parents=True)
    (unit.root / pkg / "__init__.py").write_text("")
    (unit.root / pkg / "conf" / "method" / "m.yaml").write_text("name: m\n")
    (unit.root / pkg / "empty").mkdir()
    (unit.root / pkg / "paths.py").write_text(f"TREE = {str(unit.root / pkg / 'conf')!r}\n")
    group = f"ehx_unit_{unit.tag}.conf"
    unit.distribution({
        "a_package": f"{pkg}.conf",           # a namespace package: the folder itself
        "b_attribute": f"{pkg}.paths:TREE",    # a path attribute (the same folder: listed once)
        "c_missing": f"{pkg}.nowhere",
        "d_no_groups": f"{pkg}.empty",
        "e_module": f"{pkg}.paths",
    }, group=group)
    dirs, errors = plugins.load_config_trees(group)
    assert dirs == [(unit.root / pkg / "conf").resolve()]
    by_name = {e.name: e.error for e in errors}
    assert sorted(by_name) == ["c_missing", "d_no_groups", "e_module"]
    assert by_name["c_missing"] == f"ModuleNotFoundError: no package named '{pkg}.nowhere'"
    assert "holds none of the config groups method, dataset, metrics, experiment" in by_name["d_no_groups"]
    assert by_name["e_module"] == f"ValueError: '{pkg}.paths' is a module, not a package (a folder of config groups)"


def test_config_dirs_merge_plugin_trees_after_the_harness(tmp_path, monkeypatch):
    tree = tmp_path / "conf"
    (tree / "method").mkdir(parents=True)
    (tree / "method" / "ehx_mine.yaml").write_text("name: ehx_mine\n")
    (tree / "method" / "identity.yaml").write_text("name: not_the_harness_identity\n")
    monkeypatch.setattr(plugins, "plugin_config_dirs", lambda: [tree])
    assert paths.config_dirs() == [paths.CONF_DIR, tree]
    assert "ehx_mine" in paths.group_options("method") and "inpaint" in paths.group_options("method")
    assert paths.config_file("method", "ehx_mine") == tree / "method" / "ehx_mine.yaml"
    # The harness's own tree comes first, in Hydra's search path as here.
    assert paths.config_file("method", "identity") == paths.CONF_DIR / "method" / "identity.yaml"


def test_search_path_plugin_adds_trees_only_to_edit_harness(tmp_path, monkeypatch):
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra_plugins.edit_harness_searchpath import EditHarnessSearchPathPlugin

    tree = tmp_path / "conf"
    monkeypatch.setattr(paths, "config_dirs", lambda: [paths.CONF_DIR, tree])
    other = ConfigSearchPathImpl()
    other.append("main", f"file://{tmp_path / 'someone_elses_app'}")
    EditHarnessSearchPathPlugin().manipulate_search_path(other)
    assert [e.path for e in other.get_path()] == [f"file://{tmp_path / 'someone_elses_app'}"]
    ours = ConfigSearchPathImpl()
    ours.append("hydra", "pkg://hydra.conf")
    ours.append("main", f"file://{paths.CONF_DIR}")
    EditHarnessSearchPathPlugin().manipulate_search_path(ours)
    assert [(e.provider, e.path) for e in ours.get_path()] == [
        ("hydra", "pkg://hydra.conf"), ("main", f"file://{paths.CONF_DIR}"), ("edit-harness-plugin", f"file://{tree}")]


def test_the_installed_search_path_plugin_is_found_outside_the_checkout(tmp_path):
    """Hydra discovers hydra_plugins/edit_harness_searchpath through the install (`make install`
    is editable: the namespace package's path must hold the checkout's folder), not through the
    working directory."""
    code = ("from hydra.core.plugins import Plugins\n"
            "from hydra.plugins.search_path_plugin import SearchPathPlugin\n"
            "import sys\n"
            "print([p.__module__ for p in Plugins.instance().discover(SearchPathPlugin)])\n"
            "print(sys.modules['hydra_plugins.edit_harness_searchpath'].__file__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found, where = proc.stdout.splitlines()
    assert "hydra_plugins.edit_harness_searchpath" in found, "reinstall: make install"
    assert Path(where).parts[-3:] == ("hydra_plugins", "edit_harness_searchpath", "__init__.py")
    assert not Path(where).is_relative_to(tmp_path)
