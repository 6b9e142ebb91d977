"""The ``edit-harness`` command.

  edit-harness run [Hydra overrides]      one job, or a sweep with -m (Hydra multirun)
  edit-harness report RUN_DIR [...]       rebuild tables and plots from stored scores
  edit-harness score EDITS_DIR            score a folder of edits made elsewhere (<sample_id>.png)
  edit-harness validate DATASET           check a dataset (config name or folder)
  edit-harness weights [PROTOCOL...]      which metric (and method) weights are present, how to provide the rest
  edit-harness list                       methods, datasets, metrics, protocols, experiments
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .registry import UnknownNameError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
log = logging.getLogger("edit_harness")

USAGE = __doc__ or ""


class UsageError(Exception):
    """A bad command line: printed without a traceback, exit code 2."""


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------
GROUPS = ("method", "dataset", "metrics", "experiment")


def _choices(override, options: list[str]) -> list[str]:
    """The group options an override selects (one, or a sweep's), as strings; null left out."""
    from hydra.core.override_parser.types import ValueType

    if override.is_delete():
        return []
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        return list(override.value().filter(options))
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    value = override.value()
    return [] if value is None else [str(value)]


def _experiment_methods(name: str, parser) -> list[str] | None:
    """The methods an experiment runs (its sweep's ``method``, or its ``override /method``)."""
    cfg = _load_yaml(CONF_DIR / "experiment" / f"{name}.yaml")
    sweep = ((cfg.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    if sweep.get("method") is not None:
        return _choices(parser.parse_override(f"method={sweep['method']}"), _group_options("method"))
    for d in cfg.get("defaults") or []:
        if isinstance(d, dict):
            for k, v in d.items():
                if str(k).replace("override", "").strip().lstrip("/") == "method" and v is not None:
                    return [str(v)]
    return None


def precheck(overrides: Sequence[str]) -> None:
    """Fail fast, listing what exists, on unknown methods, datasets, protocols and parameters.

    Hydra would also reject these, but without listing a method's parameters. Overrides are read
    with Hydra's own parser, so every form Hydra takes is checked alike: ``key=v``, ``+key=v``,
    ``++key=v``, ``~key``, sweeps (``a,b``, ``choice()``, ``range()``, ``glob()``). A token
    Hydra cannot parse is left to Hydra, which names the error.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from . import registry
    import methods  # noqa: F401  (registers every method)

    parser = OverridesParser.create()
    chosen: dict[str, list[str]] = {}
    params: list[str] = []
    for text in overrides:
        if text.startswith("-"):
            continue  # a Hydra flag (-m, --cfg ...)
        try:
            o = parser.parse_override(text)
        except HydraException:
            continue
        key = o.key_or_group
        if key in GROUPS and o.package is None:
            options = _group_options(key)
            choices = _choices(o, options)
            for c in choices:
                if c not in options:
                    raise UsageError(f"unknown {key} '{c}'; available: {', '.join(options)}")
            if choices:
                chosen[key] = choices
        elif key.startswith("method."):
            params.append(key.split(".", 1)[1].split(".")[0])
    names = chosen.get("method")
    if names is None and "experiment" in chosen:
        names = [m for e in chosen["experiment"] for m in (_experiment_methods(e, parser) or ["identity"])]
    for name in dict.fromkeys(names or ["identity"]):
        if name not in registry.METHODS:
            raise UsageError(
                f"method config '{name}' names no registered method; registered: {', '.join(registry.METHODS.names())}"
            )
        cls = registry.METHODS.get(name)
        unknown = [p for p in dict.fromkeys(params) if p not in cls.param_names() and p != "name"]
        if unknown:
            listing = ", ".join(cls.param_names()) or "(none)"
            raise UsageError(f"method '{name}' has no parameter(s) {', '.join(unknown)}; its parameters: {listing}")


def _hydra_run(overrides: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg) -> None:
        from .method import ParamError
        from .runner import Job, JobConfig

        resolved = OmegaConf.to_container(cfg, resolve=True)
        try:
            job = Job(JobConfig.from_mapping(resolved))
        except (UnknownNameError, ParamError, ValueError, FileNotFoundError, KeyError) as e:
            log.error("%s", e)
            print(f"edit-harness: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        job.run(resolved)
        if cfg.report and HydraConfig.get().mode != RunMode.MULTIRUN:
            report_run([job.run_dir], job.run_dir / "report")

    # Hydra's parser wants flags before overrides; accept them anywhere.
    flags = [a for a in overrides if a.startswith("-")]
    rest = [a for a in overrides if not a.startswith("-")]
    sys.argv = ["edit-harness run", *flags, *rest]
    task()
    return 0


# ----------------------------------------------------------------------------------------------
# report / score / validate / list
# ----------------------------------------------------------------------------------------------
def report_run(
    run_dirs: Sequence[Path], out_dir: Path, per_category: bool = True, force: bool = False, quiet: bool = False
) -> dict[str, Path] | None:
    """Write tables and plots for run dirs; skipped when the stored scores have not changed.

    The report is a pure function of the jobs' tables, so a digest of those files (and the
    report options) written beside the report tells whether it is up to date.
    """
    import hashlib

    from .fileio import save_bytes
    from .runner import job_dirs

    out_dir = Path(out_dir)
    h = hashlib.sha256(f"per_category={per_category};".encode())
    for d in job_dirs(run_dirs):
        for name in ("scores.parquet", "edits.parquet"):
            h.update(f"{d.name}/{name}:".encode())
            h.update((d / name).read_bytes())
    digest = h.hexdigest()
    stamp = out_dir / ".inputs-digest"
    if not force and stamp.is_file() and stamp.read_text() == digest and (out_dir / "table.md").is_file():
        if not quiet:
            print(f"report in {out_dir} is up to date")
        return None
    from .report import write_report

    files = write_report([Path(d) for d in run_dirs], out_dir, per_category=per_category)
    save_bytes(stamp, digest.encode())
    if not quiet:
        print(f"report written to {out_dir}")
        table = out_dir / "table.md"
        if table.is_file():
            print(table.read_text())
    return files


def _cmd_report(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="edit-harness report", description="Rebuild tables and plots from stored scores.")
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="output folder (default: <first run dir>/report)")
    ap.add_argument("--no-per-category", action="store_true")
    a = ap.parse_args(argv)
    for d in a.run_dirs:
        if not (d / "jobs").is_dir():
            raise UsageError(f"{d} is not a run directory (it has no jobs/ folder)")
    report_run(a.run_dirs, a.out or a.run_dirs[0] / "report", per_category=not a.no_per_category, force=True)
    return 0


def _cmd_score(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="edit-harness score",
        description="Score a folder of edits made elsewhere: one image per sample, named <sample_id>.png (or .jpg/.jpeg/.webp).",
    )
    ap.add_argument("edits_dir", type=Path)
    ap.add_argument("--dataset", default="sample", help=f"dataset config ({', '.join(_group_options('dataset'))})")
    ap.add_argument("--metrics", default="default", help=f"protocol ({', '.join(_group_options('metrics'))})")
    ap.add_argument("--name", help="method name shown in tables (default: the folder's name)")
    ap.add_argument("--run-name", help="results/<run-name> (default: score-<folder name>)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = ap.parse_intermixed_args(argv)
    if not a.edits_dir.is_dir():
        raise UsageError(f"edits folder not found: {a.edits_dir}")
    label = a.name or a.edits_dir.resolve().name
    overrides = [
        "method=folder",
        f"method.path={a.edits_dir.resolve()}",
        f"method.label={label}",
        f"dataset={a.dataset}",
        f"metrics={a.metrics}",
        f"run_name={a.run_name or 'score-' + label}",
        *a.overrides,
    ]
    precheck(overrides)
    return _hydra_run(overrides)


def _cmd_validate(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="edit-harness validate", description="Check every sample of a dataset.")
    ap.add_argument("dataset", help="a dataset config name (conf/dataset/) or a folder with manifest.jsonl")
    a = ap.parse_args(argv)
    from .data import open_dataset

    if (CONF_DIR / "dataset" / f"{a.dataset}.yaml").is_file():
        cfg = _load_yaml(CONF_DIR / "dataset" / f"{a.dataset}.yaml")
    elif Path(a.dataset).is_dir():
        cfg = {"root": a.dataset, "format": "generic"}
    else:
        raise UsageError(f"unknown dataset '{a.dataset}': not a config ({', '.join(_group_options('dataset'))}) nor a folder")
    ds = open_dataset(cfg)
    refs = ds.refs()
    problems = ds.validate()
    for p in problems:
        print(f"ERROR {p}")
    cats: dict[str, int] = {}
    for r in refs:
        cats[r.category or "-"] = cats.get(r.category or "-", 0) + 1
    print(f"dataset '{ds.name}' v{ds.version}: {len(refs)} samples, {len(problems)} problem(s); categories: "
          + ", ".join(f"{k}={v}" for k, v in sorted(cats.items())))
    return 1 if problems else 0


def _experiment_config(name: str) -> tuple[dict, list[tuple[str, dict]]]:
    """An experiment's metrics config and its methods, composed by Hydra (interpolations resolved).

    Methods: ``(name, parameters)`` for each method the experiment's sweep lists
    (``hydra.sweeper.params.method``), else the single composed method; parameters are the
    method's YAML defaults with the experiment's overrides.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)
        sweep = OmegaConf.select(cfg, "hydra.sweeper.params.method")
        names = [m.strip() for m in str(sweep).split(",") if m.strip()] if sweep else [str(cfg.method.name)]
        methods = []
        for m in names:
            mc = compose(config_name="config", overrides=[f"experiment={name}", f"method={m}"])
            methods.append((m, OmegaConf.to_container(mc.method, resolve=True)))
    return OmegaConf.to_container(cfg.metrics, resolve=True), methods


def _print_method_weights(methods: list[tuple[str, dict]]) -> int:
    """Print each method's weights (present or how to provide them); returns how many are missing."""
    from .registry import METHODS
    import methods as _methods  # noqa: F401  (registers the methods)

    missing = 0
    for name, params in methods:
        cls = METHODS.get(name)
        method = cls.from_config({k: v for k, v in params.items() if k != "name"})
        needs = method.weights_status()
        if not needs:
            print(f"  present  method {name}: needs no weights")
        for what, problem in needs:
            if problem:
                missing += 1
                print(f"  MISSING  method {name}: {what}: {problem}")
            else:
                print(f"  present  method {name}: {what} ({method.model_revision()})")
    return missing


def _cmd_weights(argv: Sequence[str]) -> int:
    protocols, experiments = _group_options("metrics"), _group_options("experiment")
    ap = argparse.ArgumentParser(
        prog="edit-harness weights",
        description="Which weights each metric of a protocol needs (for an experiment: also each of its methods), "
                    "which are present here, and how to provide the missing ones.",
    )
    ap.add_argument("names", nargs="*", metavar="PROTOCOL|EXPERIMENT",
                    help=f"protocols ({', '.join(protocols)}) or experiments ({', '.join(experiments)}); "
                         "experiment=NAME for an experiment that shares a protocol's name (default); "
                         "default: every protocol")
    a = ap.parse_args(argv)
    from .scoring import MetricSuite

    missing = missing_methods = 0
    for name in a.names or protocols:
        methods: list[tuple[str, dict]] = []
        # experiment=NAME / metrics=NAME say which group a name shared by both means
        kind, _, bare = name.rpartition("=")
        if kind and kind not in ("experiment", "metrics"):
            raise UsageError(f"'{name}': write PROTOCOL, EXPERIMENT, metrics=PROTOCOL or experiment=EXPERIMENT")
        if kind == "experiment" and bare not in experiments:
            raise UsageError(f"unknown experiment '{bare}'; experiments: {', '.join(experiments)}")
        name = bare
        if name in protocols and kind != "experiment":
            cfg, title = _load_yaml(CONF_DIR / "metrics" / f"{name}.yaml"), f"protocol {name}"
        elif name in experiments:
            cfg, methods = _experiment_config(name)
            title = f"experiment {name} (protocol {cfg.get('protocol', '?')})"
        else:
            raise UsageError(f"unknown protocol or experiment '{name}'; protocols: {', '.join(protocols)}; "
                             f"experiments: {', '.join(experiments)}")
        suite = MetricSuite(cfg)
        print(f"{title}:")
        for e in suite.entries:
            if e.unavailable:
                missing += 1
                print(f"  MISSING  {e.name}: {e.unavailable}")
            else:
                print(f"  present  {e.name}: {e.metric.weights()}")
        missing_methods += _print_method_weights(methods)
    print(f"{missing} metric(s) unavailable" if missing else "all metric weights present")
    if missing_methods:
        print(f"{missing_methods} method model(s) missing: those methods' edits are skipped, naming the model")
    return 0


def _cmd_list(argv: Sequence[str]) -> int:
    from . import metrics  # noqa: F401
    from .registry import METHODS, METRICS
    import methods  # noqa: F401

    print("methods:     " + ", ".join(METHODS.names()))
    print("datasets:    " + ", ".join(_group_options("dataset")))
    print("metrics:     " + ", ".join(METRICS.names()))
    print("protocols:   " + ", ".join(_group_options("metrics")))
    print("experiments: " + ", ".join(_group_options("experiment")))
    for name in METHODS.names():
        cls = METHODS.get(name)
        print(f"  {name}: params {', '.join(cls.param_names()) or '(none)'}; needs {', '.join(cls.requires)}")
    return 0


COMMANDS = {"report": _cmd_report, "score": _cmd_score, "validate": _cmd_validate, "weights": _cmd_weights, "list": _cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "run":
            if any(a in ("-h", "--help") for a in rest):
                return _hydra_run(rest)
            precheck(rest)
            return _hydra_run(rest)
        if cmd in COMMANDS:
            return COMMANDS[cmd](rest)
        raise UsageError(f"unknown command '{cmd}'; commands: run, {', '.join(COMMANDS)}")
    except (UsageError, UnknownNameError) as e:
        print(f"edit-harness: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
