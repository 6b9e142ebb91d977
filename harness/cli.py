"""The ``edit-harness`` command.

  edit-harness run [Hydra overrides]      one job, or a sweep with -m (Hydra multirun)
  edit-harness report RUN_DIR [...]       rebuild tables and plots from stored scores
  edit-harness score EDITS_DIR            score a folder of edits made elsewhere (<sample_id>.png)
  edit-harness validate DATASET           check a dataset (config name or folder)
  edit-harness gate RUN --baseline BASE   regression gate: exit 1 on a regression against a baseline run
                                          or a published table (paper/zone/table1)
  edit-harness compare RUN --paper P/T    a published table's numbers and the run's side by side
  edit-harness figures RUN_DIR            the papers' figures (CLIP-I vs CLIP-T, ablations, qualitative grids)
  edit-harness weights [NAME...]         which metric (and method) weights are present, how to provide the rest
                                          (NAME: a protocol, an experiment, or method=METHOD)
  edit-harness list                       methods, datasets, metrics, protocols, experiments
  edit-harness train-part-token ...       optimise a PartEdit part token from images and part masks
  edit-harness study create|serve|results ...  human-evaluation studies (SR, UPR, MOS, 2AFC) over a run's edits

`edit-harness COMMAND --help` (or `edit-harness help COMMAND`) describes each command.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .paths import CONF_DIR, config_file, group_options
from .registry import UnknownNameError

log = logging.getLogger("edit_harness")

USAGE = __doc__ or ""

#: Set by ``run -m`` in the environment of each job of a sweep (``hydra.job.env_set``): how
#: many jobs the sweep has, which override keys vary between them, and when it started.
SWEEP_JOBS_ENV = "EDIT_HARNESS_SWEEP_JOBS"
SWEEP_KEYS_ENV = "EDIT_HARNESS_SWEEP_KEYS"
SWEEP_START_ENV = "EDIT_HARNESS_SWEEP_START"


class UsageError(Exception):
    """A bad command line: printed without a traceback, exit code 2."""


def _group_options(group: str) -> list[str]:
    return group_options(group)


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def _config(group: str, name: str) -> dict[str, Any]:
    """A group option's YAML (the harness's own or a plugin package's), read as plain YAML."""
    path = config_file(group, name)
    if path is None:
        raise UsageError(f"unknown {group} '{name}'; available: {', '.join(_group_options(group))}")
    return _load_yaml(path)


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _listing(items: Sequence[str], most: int = 30) -> str:
    """Items joined by commas; a long list is cut, saying how many there are."""
    items = [str(i) for i in items]
    if len(items) <= most:
        return ", ".join(items)
    return ", ".join(items[:most]) + f", ... ({len(items)} in all)"


def _hydra_quote(value: str) -> str:
    """``value`` as a quoted Hydra override value, read back verbatim (spaces, commas, '=' and
    quotes in a path). Hydra's grammar: inside quotes a quote is escaped by a backslash, and
    backslashes are escaped only where they precede a quote or end the string."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(value))
    return "'" + value.replace("'", "\\'") + "'"


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------
GROUPS = ("method", "dataset", "metrics", "experiment")
#: Hydra's command-line flags that take a value (the next argument); ``--info`` takes one optionally.
_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd", "--experimental-rerun"}
_HYDRA_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_MULTIRUN_FLAGS = {"-m", "--multirun"}


def _split_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Hydra flags (with their values) and overrides: Hydra's parser wants flags first, the
    harness takes them anywhere."""
    flags: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            flags.append(a)
            takes = a in _HYDRA_VALUE_FLAGS or (a in ("--info", "-i") and i + 1 < len(args)
                                                and args[i + 1] in _HYDRA_INFO_VALUES)
            if takes and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            rest.append(a)
        i += 1
    return flags, rest


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
    cfg = _config("experiment", name)
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
    Hydra cannot parse is left to Hydra, which names the error. Values are checked by
    :func:`check_jobs`, which composes every job's configuration.
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
                    raise UsageError(f"unknown {key} '{c}'{_did_you_mean(c, options)}; available: {', '.join(options)}")
            if choices:
                chosen[key] = choices
        elif key.startswith("method."):
            params.append(key.split(".", 1)[1].split(".")[0])
    names = chosen.get("method")
    if names is None and "experiment" in chosen:
        names = [m for e in chosen["experiment"] for m in (_experiment_methods(e, parser) or ["identity"])]
    for name in dict.fromkeys(names or ["identity"]):
        try:
            # get(), not `in`: a method whose plugin failed to load is named with its entry point
            cls = registry.METHODS.get(name)
        except UnknownNameError as e:
            raise UsageError(f"method config '{name}' names no registered method: {e}") from None
        unknown = [p for p in dict.fromkeys(params) if p not in cls.param_names() and p != "name"]
        if unknown:
            listing = ", ".join(cls.param_names()) or "(none)"
            hint = _did_you_mean(unknown[0], cls.param_names()) if len(unknown) == 1 else ""
            raise UsageError(f"method '{name}' has no parameter(s) {', '.join(unknown)}{hint}; its parameters: {listing}")


# -- every job's configuration, checked before the first job runs -------------------------------
#: Keys ``open_dataset`` takes from a dataset config besides the loader's own parameters.
_DATASET_CARD_KEYS = ("format", "license", "description", "source", "how_to_obtain")


@dataclasses.dataclass
class Jobs:
    """The jobs a ``run`` command line makes (one, or a sweep's), each checked."""

    #: each job's overrides, as Hydra's basic sweeper makes them
    points: list[list[str]]
    #: each job's resolved configuration (without the ``hydra`` node)
    configs: list[dict[str, Any]]
    #: the override keys whose value differs between jobs, in command-line order
    swept: list[str]
    #: whether Hydra runs them as a multirun (-m, or the configuration's hydra.mode)
    multirun: bool = False

    def label(self, i: int) -> str:
        """What tells job ``i`` from the others: its values of the swept keys."""
        return " ".join(o for o in self.points[i] if _override_key(o) in self.swept)


def _override_key(text: str) -> str:
    return text.split("=", 1)[0].lstrip("+~")


def _dataset_keys(fmt: str, yaml_keys: Iterable[str], shown: bool = False) -> list[str]:
    """The keys a dataset config of format ``fmt`` may hold: its loader's named parameters, the
    card keys ``open_dataset`` reads, and the keys its YAML has. ``shown``: the ones worth
    listing in a message (the card's descriptive keys left out)."""
    import inspect

    from .data import DATASET_FORMATS

    keys = set(yaml_keys) | {"format"}
    try:
        loader = DATASET_FORMATS.get(fmt)
        keys |= {p.name for p in inspect.signature(loader).parameters.values()
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    except UnknownNameError:
        pass
    return sorted(keys - set(_DATASET_CARD_KEYS) | ({"format"} if shown else set(_DATASET_CARD_KEYS)))


def _unknown_key(cfg, key: str) -> str | None:
    """The message for a ``key=value`` override whose key the composed config lacks, else None."""
    from omegaconf import DictConfig

    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None  # a list index or a leaf: Hydra says what is wrong
        if part not in node:
            where = ".".join(parts[:depth])
            options = [str(k) for k in node.keys()]
            if where == "dataset":
                options = _dataset_keys(str(node.get("format", "generic")), options, shown=True)
                owner = f"dataset '{node.get('name', '?')}'"
            else:
                options = [o for o in options if o != "hydra"]
                owner = f"'{where}'" if where else "the configuration"
            close = difflib.get_close_matches(part, options, n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr('.'.join([*parts[:depth], c])) for c in close)}?)" if close else ""
            return (f"unknown key '{key}'{hint}; {owner} has: {', '.join(options) or 'no keys'}"
                    + ("" if where in ("", "dataset") else f" (add a new key with +{key}=...)"))
        node = node[part]
    return None


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (Hydra and OmegaConf write several), with its cause's."""
    text = " ".join(str(e).split())
    cause = e.__cause__
    if cause is not None and str(cause) not in ("", "None") and str(cause).split("\n")[0] not in text:
        text += f": {str(cause).splitlines()[0]}"
    return text


def check_dataset(cfg: Mapping[str, Any], yaml_keys: Iterable[str] = ()) -> None:
    """A job's resolved dataset config: every key known to its loader, the subset parameters of
    the right type, the dataset openable and every id in ``ids`` present. UsageError otherwise,
    listing what exists."""
    from .data import open_dataset

    cfg = dict(cfg)
    fmt = str(cfg.get("format", "generic"))
    name = cfg.get("name") or fmt
    known = _dataset_keys(fmt, yaml_keys)
    for k in cfg:
        if k not in known:
            shown = _dataset_keys(fmt, yaml_keys, shown=True)
            raise UsageError(f"dataset '{name}' has no key '{k}'{_did_you_mean(k, shown)}; its keys: {', '.join(shown)}")
    limit = cfg.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"dataset.limit must be a whole number >= 1 (or null: every sample), got {limit!r}")
    ids = cfg.get("ids")
    if ids is not None and not isinstance(ids, (list, tuple)):
        raise UsageError(f"dataset.ids must be a list of sample ids, e.g. dataset.ids=[a,b], got {ids!r}")
    try:
        ds = open_dataset(cfg)
        ds.refs()
        return
    except UnknownNameError as e:
        raise UsageError(str(e)) from None
    except KeyError as e:
        if not ids:
            raise UsageError(f"dataset '{name}': {e.args[0] if e.args else e}") from None
        problem = str(e.args[0] if e.args else e)
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    # An id in ``ids`` the loader does not have: list the ones it has, the closest first.
    everything = open_dataset({**cfg, "ids": None, "limit": None, "shard": None}).refs()
    have = [r.id for r in everything]
    missing = [i for i in ids if str(i) not in set(have)]
    if not missing:  # ids of another kind (MagicBrush session ids): the loader's message
        raise UsageError(problem)
    parts = []
    for i in missing:
        quoted = " (ids are strings: quote it)" if not isinstance(i, str) else ""
        parts.append(f"'{i}'{quoted}{_did_you_mean(str(i), have)}")
    raise UsageError(f"dataset '{name}' has no sample {', '.join(parts)}; its {len(have)} sample ids: {_listing(have)}")


def _check_job(cfg: Mapping[str, Any], dataset_yaml_keys: list[str], cache: dict[str, str | None]) -> None:
    """A resolved job configuration: its method's parameters, dataset and metrics protocol."""
    from .method import ParamError
    from .runner import build_method

    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be a whole number, got {seed!r}")
    try:
        build_method(cfg.get("method") or {})
    except UnknownNameError as e:
        raise UsageError(str(e)) from None
    except (ParamError, ValueError, TypeError, KeyError) as e:
        raise UsageError(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from None

    def once(what: str, check) -> None:
        # datasets and protocols are checked once per distinct configuration
        if what not in cache:
            try:
                check()
                cache[what] = None
            except UsageError as e:
                cache[what] = str(e)
        if cache[what]:
            raise UsageError(cache[what])

    tables = cfg.get("paper_tables") or []

    def check_tables() -> None:
        from .compare import CompareError, load_mapping
        from .paper import PaperTableError, table_path

        if isinstance(tables, str) or not isinstance(tables, (list, tuple)):
            raise UsageError(f"paper_tables must be a list of published tables such as [zone/table1], got {tables!r}")
        for t in tables:
            try:
                table_path(str(t))
                load_mapping(str(t))
            except (PaperTableError, CompareError) as e:
                raise UsageError(f"paper_tables: {e}") from None

    once("paper_tables:" + json.dumps(tables, default=str), check_tables)
    dataset = dict(cfg.get("dataset") or {})
    once("dataset:" + json.dumps(dataset, sort_keys=True, default=str), lambda: check_dataset(dataset, dataset_yaml_keys))
    if cfg.get("score", True):
        metrics = cfg.get("metrics") or {}

        def check_metrics() -> None:
            from .scoring import MetricSuite

            try:
                MetricSuite(metrics)
            except UnknownNameError as e:
                raise UsageError(str(e)) from None
            except (ValueError, TypeError, KeyError) as e:
                raise UsageError(f"metrics protocol '{metrics.get('protocol', '?')}': {e}") from None

        once("metrics:" + json.dumps(metrics, sort_keys=True, default=str), check_metrics)


def check_jobs(overrides: Sequence[str], multirun: bool) -> Jobs | None:
    """Compose and check the configuration of every job ``run`` would launch, before any runs.

    The jobs are made as Hydra's basic sweeper makes them (an experiment's
    ``hydra.sweeper.params`` first, then the command line; every combination of the sweeps),
    and each is composed with Hydra's own config loader. A key the configuration lacks, a
    value a method, dataset or protocol refuses, an id ``dataset.ids`` names that the dataset
    does not have: a UsageError naming the job and listing what exists, so that a sweep never
    fails at its tenth job on a value its command line held from the start.

    Composing each job the way Hydra does costs about 0.1 s a job, so jobs that share their
    config group choices share one composition (Hydra applies value overrides after composing
    the groups, with ``ConfigLoaderImpl._apply_overrides_to_config``; so does this check).
    Returns None where the jobs cannot be known beforehand (a sweeper other than the basic one).
    """
    from hydra import initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="edit_harness"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        parsed = []
        for text in overrides:
            try:
                parsed.append(parser.parse_override(text))
            except HydraException as e:
                raise UsageError(f"cannot read override '{text}': {_one_line(e)}") from None

        def is_group(o) -> bool:
            return o.package is not None or loader.repository.group_exists(o.key_or_group)

        # The sweep's settings (an experiment's hydra.mode and sweeper params, another sweeper)
        # are in the Hydra config that the command line's fixed choices compose to.
        fixed = [o.input_line for o in parsed if not o.is_sweep_override() and (is_group(o) or o.is_hydra_override())]
        try:
            master = loader.load_configuration("config", fixed, run_mode=RunMode.MULTIRUN)
        except (HydraException, OmegaConfBaseException) as e:
            raise UsageError(_one_line(e)) from None
        multirun = multirun or OmegaConf.select(master, "hydra.mode") == RunMode.MULTIRUN
        if not multirun:
            for o in parsed:
                if o.is_sweep_override():
                    raise UsageError(f"'{o.input_line}' is a sweep: add -m to run one job per value "
                                     f"(or write a list as key=[a,b], a string as key='a,b')")
            points = [overrides]
        else:
            sweeper = OmegaConf.select(master, "hydra.sweeper._target_") or ""
            if not sweeper.endswith("BasicSweeper"):
                return None
            params = OmegaConf.select(master, "hydra.sweeper.params") or {}
            try:
                from .merge import expand_shards

                # an experiment's sweep may hold dataset.shards: N (expanded by our sweeper alike)
                fixed_params = expand_shards([f"{k}={v}" for k, v in params.items()])
            except ValueError as e:
                raise UsageError(str(e)) from None
            try:
                grid = parser.parse_overrides(fixed_params + overrides)
                points = BasicSweeper.split_arguments(grid, None)[0]
            except HydraException as e:
                raise UsageError(_one_line(e)) from None
        values: dict[str, set[str]] = {}
        for p in points:
            for o in p:
                values.setdefault(_override_key(o), set()).add(o)
        swept = [k for k, v in values.items() if len(v) > 1]
        jobs = Jobs(points=[list(p) for p in points], configs=[], swept=swept, multirun=multirun)

        composed: dict[tuple[str, ...], Any] = {}
        if not any(o.is_hydra_override() for o in parsed if o.input_line in fixed):
            composed[tuple(fixed)] = _job_part(master)  # the groups of a job with no swept group
        cache: dict[str, str | None] = {}
        errors: dict[str, list[int]] = {}
        for i, point in enumerate(jobs.points):
            try:
                jobs.configs.append(_compose_job(loader, parser, point, composed, is_group, ConfigLoaderImpl, cache))
            except UsageError as e:
                errors.setdefault(str(e), []).append(i)
                jobs.configs.append({})
    if errors:
        lines = []
        for message, where in errors.items():
            if len(jobs.points) == 1:
                lines.append(message)
                continue
            first = where[0]
            more = f" and {len(where) - 1} more" if len(where) > 1 else ""
            lines.append(f"job {first + 1} of {len(jobs.points)} ({jobs.label(first) or 'the sweep'}){more}: {message}")
        raise UsageError("\n".join(lines))
    return jobs


def _job_part(cfg):
    """A composed config without its ``hydra`` node (most of it, and copied for each job)."""
    from omegaconf import OmegaConf

    job = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    OmegaConf.set_struct(job, True)
    return job


def _compose_job(loader, parser, point: list[str], composed: dict, is_group, impl, cache: dict) -> dict[str, Any]:
    """One job's configuration: its groups composed (shared between jobs), its values applied."""
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = parser.parse_overrides(point)
    except HydraException as e:
        raise UsageError(_one_line(e)) from None
    groups = tuple(o.input_line for o in parsed if is_group(o) and not o.is_hydra_override())
    values = [o for o in parsed if not is_group(o) and not o.is_hydra_override()]
    if groups not in composed:
        try:
            composed[groups] = _job_part(loader.load_configuration("config", list(groups), run_mode=RunMode.RUN))
        except (HydraException, OmegaConfBaseException) as e:
            composed[groups] = UsageError(_one_line(e))
    base = composed[groups]
    if isinstance(base, UsageError):
        raise base
    dataset_yaml_keys = [str(k) for k in (base.get("dataset") or {}).keys()]
    cfg = base.copy()
    for o in values:
        if not (o.is_add() or o.is_force_add() or o.is_delete()):
            problem = _unknown_key(cfg, o.key_or_group)
            if problem:
                raise UsageError(problem)
        try:
            impl._apply_overrides_to_config([o], cfg)
        except (HydraException, OmegaConfBaseException) as e:
            raise UsageError(_one_line(e)) from None
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        if "hydra" in str(e):  # ${hydra:...} is only known inside a running job
            return OmegaConf.to_container(cfg, resolve=False)
        raise UsageError(_one_line(e)) from None
    _check_job(resolved, dataset_yaml_keys, cache)
    return resolved


RUN_HELP = """\
usage: edit-harness run [-m] [GROUP=OPTION ...] [KEY=VALUE ...]

Run one job, or with -m (Hydra multirun) a sweep: one job per combination of the values given
as a,b,c or range(start,stop,step), choice(...) or glob(...). A job is one method with one
parameter point on one dataset, scored by one metrics protocol. Jobs of a run share the folder
{results}/<run_name>/: edits/ (the edit cache: a rerun computes only what is missing),
jobs/<method>-<dataset>-<hash>/ (scores.parquet, edits.parquet, manifest.json, failures.json)
and report/ (tables and plots, rebuilt at the end). Every job's configuration is checked before
the first one runs.

config groups (GROUP=OPTION):
{groups}

method parameters (method.NAME=VALUE; `edit-harness list` lists every method's):
{params}

dataset keys: dataset.limit=N (first N samples), dataset.shard=i/n (the samples whose id
  hashes to shard i of n), dataset.shards=N (with -m: one job per shard; the report merges them),
  dataset.ids=[a,b] (these samples), dataset.root=PATH (the dataset's folder)
other keys (KEY=VALUE): {keys}

examples:
  edit-harness run method=inpaint dataset.limit=4 metrics=pixel
  edit-harness run method=inpaint method.algorithm=ns method.radius=5
  edit-harness run -m method=inpaint,recolor dataset.limit=4 run_name=try
  edit-harness run -m method=recolor method.strength=0,0.5,1
  edit-harness run -m hydra/launcher=joblib hydra.launcher.n_jobs=2 method=identity,inpaint
  edit-harness run -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu method=identity,inpaint dataset.shards=8
  edit-harness run experiment=default

Hydra's own options (--cfg job, --info, ...): edit-harness run --hydra-help
"""


def run_help() -> str:
    """``edit-harness run --help``: what a job is, the groups, their options, examples."""
    import textwrap

    from .registry import METHODS
    import methods  # noqa: F401  (registers every method)

    def wrapped(head: str, items: Sequence[str], width: int) -> str:
        return textwrap.fill(", ".join(items) or "(none)", width=100, initial_indent=f"  {head:<{width}} ",
                             subsequent_indent=" " * (width + 3), break_on_hyphens=False)

    groups = "\n".join(wrapped(g + ":", _group_options(g), 11) for g in GROUPS)
    names = [n for n in METHODS.names() if config_file("method", n) is not None]
    # The diffusion adapters share their loading parameters (DiffusionMethod): listed once.
    loaders = [set(METHODS.get(n).param_names()) for n in names if "backbone" in METHODS.get(n).param_names()]
    shared = set.intersection(*loaders) if loaders else set()
    lines = []
    width = max(len(n) for n in names) + 1
    for n in names:
        own = METHODS.get(n).param_names()
        mine = [p for p in own if p not in shared] + (["+diffusion"] if shared <= set(own) and shared else [])
        lines.append(wrapped(n + ":", mine, width))
    if shared:
        first = next(n for n in names if shared <= set(METHODS.get(n).param_names()))
        lines.append(wrapped("+diffusion:", [p for p in METHODS.get(first).param_names() if p in shared], width))
    top = _load_yaml(CONF_DIR / "config.yaml")
    keys = ", ".join(k for k in top if k not in ("defaults", "hydra"))
    return RUN_HELP.format(results=top.get("results_dir", "results"), groups=groups, params="\n".join(lines),
                           keys=keys)


def _hydra_run(overrides: list[str], jobs: Jobs | None = None) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg) -> None:
        from .method import ParamError
        from .runner import Job, JobConfig
        from .types import DatasetError

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            _announce_job(hc.job.num, list(hc.overrides.task), cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        try:
            job = Job(JobConfig.from_mapping(resolved))
        except (UnknownNameError, ParamError, ValueError, FileNotFoundError, KeyError) as e:
            # checked before Hydra started (check_jobs); printed once, without a traceback
            print(f"edit-harness: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
            raise SystemExit(2) from None
        try:
            job.run(resolved)
        except DatasetError as e:
            print(f"edit-harness: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if cfg.report and hc.mode != RunMode.MULTIRUN:
            report_run([job.run_dir], job.run_dir / "report")

    flags, rest = _split_flags(overrides)
    if jobs is not None:
        # Hydra sets hydra.job.env_set in each job's environment whatever the launcher (in this
        # process, joblib's reused workers, submitit's processes on other machines).
        sweep = {SWEEP_JOBS_ENV: str(len(jobs.points)), SWEEP_KEYS_ENV: json.dumps(jobs.swept),
                 SWEEP_START_ENV: repr(time.time())}
        rest = [*rest, *(f"++hydra.job.env_set.{k}={_hydra_quote(v)}" for k, v in sweep.items())]
    argv = sys.argv
    sys.argv = ["edit-harness run", *flags, *rest]
    from hydra_plugins.edit_harness_sweeper import checked_jobs

    try:
        with checked_jobs(jobs.points if jobs is not None else []):
            task()
    finally:
        sys.argv = argv
    return 0


def _announce_job(num: int, task_overrides: list[str], cfg) -> None:
    """The sweep's progress, one line a job: ``job k of N: <what differs>``. Plain lines (no
    redrawn bar) read the same in a terminal, a log file and a SLURM output file."""
    total = os.environ.get(SWEEP_JOBS_ENV, "?")
    try:
        swept = set(json.loads(os.environ.get(SWEEP_KEYS_ENV, "[]")))
    except ValueError:
        swept = set()
    label = " ".join(o for o in task_overrides if _override_key(o) in swept) or str(cfg.method.get("name", ""))
    since = ""
    start = os.environ.get(SWEEP_START_ENV)
    if start:
        try:
            since = f" [{_duration(time.time() - float(start))} into the sweep]"
        except ValueError:
            pass
    print(f"job {num + 1} of {total}: {label}{since}", flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ----------------------------------------------------------------------------------------------
# report / score / validate / list
# ----------------------------------------------------------------------------------------------
def report_run(
    run_dirs: Sequence[Path], out_dir: Path, per_category: bool = True, force: bool = False, quiet: bool = False,
    strict: bool = False,
) -> dict[str, Path] | None:
    """Write tables and plots for run dirs; skipped when the stored scores have not changed.

    A run whose sharded jobs are incomplete (a shard still running, or one that died) gets no
    report: with ``strict`` the :class:`harness.merge.ShardError` is raised (``edit-harness
    report``), else its message is printed and None returned (the end of one shard's job, or of
    a sweep that ran some shards only).

    The report is a pure function of the jobs' tables, so a digest of those files (and the
    report options) written beside the report tells whether it is up to date. Prints where the
    report is, and the compact terminal table (``terminal`` among the report's files; else
    ``table.md``).
    """
    from .fileio import save_bytes
    from .runner import job_dirs

    out_dir = Path(out_dir)
    h = hashlib.sha256(f"per_category={per_category};".encode())
    for d in job_dirs(run_dirs):
        for name in ("scores.parquet", "edits.parquet"):
            h.update(f"{d.name}/{name}:".encode())
            h.update((d / name).read_bytes())
    # the published tables the jobs name, and their files (a corrected table or mapping redoes the report)
    from .paper import PaperTableError, table_path
    from .report import run_paper_tables

    for table in run_paper_tables(run_dirs):
        h.update(f"paper:{table}:".encode())
        try:
            csv_file = table_path(table)  # checks the name's form: nothing outside results/paper/ is read
        except PaperTableError:
            continue  # the report says why it is not compared
        for f in (csv_file, csv_file.with_suffix(".yaml"), csv_file.with_suffix(".compare.yaml")):
            h.update(f.read_bytes() if f.is_file() else b"-")
    digest = h.hexdigest()
    stamp = out_dir / ".inputs-digest"
    if not force and stamp.is_file() and stamp.read_text() == digest and (out_dir / "table.md").is_file() \
            and (out_dir / "table_terminal.txt").is_file() and (out_dir / "index.html").is_file():
        if not quiet:
            print(f"report in {out_dir} is up to date")
        return None
    from .merge import ShardError
    from .report import write_report

    try:
        files = write_report([Path(d) for d in run_dirs], out_dir, per_category=per_category)
    except ShardError as e:
        if strict:
            raise
        print(f"report not built: {e}", file=sys.stderr)
        return None
    save_bytes(stamp, digest.encode())
    if not quiet:
        print(f"report written to {out_dir}")
        terminal = (files or {}).get("terminal")
        table = Path(terminal) if terminal else out_dir / "table.md"
        if table.is_file():
            print(table.read_text().rstrip("\n"))
    return files


def default_report_dir(run_dirs: Sequence[Path]) -> Path:
    """Where ``report`` writes without ``--out``: one run's own ``report/``; for several runs a
    new folder beside the first, named after them (``report-A+B``), so that no run's own
    report is overwritten by a comparison."""
    runs = list(dict.fromkeys(Path(d).resolve() for d in run_dirs))
    if len(runs) == 1:
        return Path(run_dirs[0]) / "report"
    name = "report-" + "+".join(r.name for r in runs)
    if len(name) > 100:  # many runs: a short, still unique, name
        tag = hashlib.sha256("\n".join(map(str, runs)).encode()).hexdigest()[:8]
        name = f"report-{runs[0].name}-and-{len(runs) - 1}-more-{tag}"
    return Path(run_dirs[0]).parent / name


def _cmd_report(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="edit-harness report",
        description="Rebuild tables and plots from the scores stored in run folders (results/<run_name>/). "
                    "Several runs are compared in one table, written to a new folder: a run's own report/ "
                    "is never overwritten by a comparison.",
    )
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/report for one run; for several, "
                                             "report-<run>+<run> beside the first)")
    ap.add_argument("--no-per-category", action="store_true", help="skip the per-category tables")
    a = ap.parse_args(argv)
    for d in a.run_dirs:
        if not (d / "jobs").is_dir():
            raise UsageError(f"{d} is not a run directory (it has no jobs/ folder)")
    report_run(a.run_dirs, a.out or default_report_dir(a.run_dirs), per_category=not a.no_per_category, force=True,
               strict=True)
    return 0


def _dataset_overrides(choice: str) -> list[str]:
    """Overrides selecting a dataset given as a config name or as a folder with a manifest."""
    if config_file("dataset", choice) is not None:
        return [f"dataset={choice}"]
    folder = Path(choice).expanduser()
    if not folder.is_dir():
        options = _group_options("dataset")
        raise UsageError(f"unknown dataset '{choice}': not a config{_did_you_mean(choice, options)} "
                         f"({', '.join(options)}) nor a folder")
    from .data import GenericDataset

    try:
        name = GenericDataset(folder).name  # its card's name, else the folder's
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{folder} is not a dataset folder: {e}") from None
    return ["dataset=sample", f"dataset.root={_hydra_quote(str(folder.resolve()))}",
            f"dataset.name={_hydra_quote(name)}", "dataset.format=generic", "dataset.manifest=null"]


def _check_edit_files(folder: Path, dataset: Mapping[str, Any]) -> None:
    """Name every edit file that matches no sample id (with the closest ids) and every sample
    with several files; a UsageError when no selected sample has an edit."""
    from .data import open_dataset
    from methods.folder import match_edits

    everything = [r.id for r in open_dataset({**dataset, "ids": None, "limit": None, "shard": None}).refs()]
    selected = [r.id for r in open_dataset(dataset).refs()]
    name = dataset.get("name") or "?"
    m = match_edits(folder, everything, selected)
    for file, close in m.unmatched.items():
        hint = f" (closest: {', '.join(close)})" if close else ""
        print(f"edit-harness: warning: edit file '{file}' matches no sample id of dataset '{name}'{hint}", file=sys.stderr)
    for sid, files in m.several.items():
        print(f"edit-harness: warning: sample '{sid}' has several edit files ({', '.join(files)}): using {files[0]}",
              file=sys.stderr)
    if not m.matched:
        raise UsageError(f"no file in {folder} is named after one of the {len(selected)} selected samples of dataset "
                         f"'{name}' (<sample_id>.png); sample ids: {_listing(selected, 10)}")
    print(f"{len(m.matched)} of {len(selected)} samples have an edit in {folder}"
          + ("" if len(m.matched) == len(selected) else "; the others are recorded as skipped"))


def _cmd_score(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="edit-harness score",
        description="Score a folder of edits made elsewhere: one image per sample, named <sample_id>.png "
                    "(or .jpg/.jpeg/.webp/.bmp/.tif). They go through the same cache, scoring and report as "
                    "the harness's methods (method 'folder').",
    )
    ap.add_argument("edits_dir", type=Path, metavar="EDITS_DIR")
    ap.add_argument("--dataset", default="sample",
                    help=f"a dataset config ({', '.join(_group_options('dataset'))}) or a folder with manifest.jsonl")
    ap.add_argument("--metrics", default="default", help=f"protocol ({', '.join(_group_options('metrics'))})")
    ap.add_argument("--name", help="method name shown in tables (default: the folder's name)")
    ap.add_argument("--run-name", help="results/<run-name> (default: score-<folder name>)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (dataset.limit=N, results_dir=PATH, ...)")
    a = ap.parse_intermixed_args(argv)
    if not a.edits_dir.is_dir():
        raise UsageError(f"edits folder not found: {a.edits_dir}")
    label = a.name or a.edits_dir.resolve().name
    overrides = [
        "method=folder",
        f"method.path={_hydra_quote(str(a.edits_dir.resolve()))}",
        f"method.label={_hydra_quote(label)}",
        *_dataset_overrides(a.dataset),
        f"metrics={a.metrics}",
        f"run_name={_hydra_quote(a.run_name or 'score-' + label)}",
        *a.overrides,
    ]
    precheck(overrides)
    jobs = check_jobs(overrides, multirun=False)
    assert jobs is not None  # a single job is always known
    _check_edit_files(a.edits_dir, jobs.configs[0]["dataset"])
    return _hydra_run(overrides)


def _cmd_validate(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="edit-harness validate",
        description="Check every sample of a dataset: decode each file, check each field. Prints each problem "
                    "(ERROR: the sample cannot be used; WARNING: it can, with a caveat) and exits 1 if any is an "
                    "error.",
    )
    ap.add_argument("dataset", help=f"a dataset config name ({', '.join(_group_options('dataset'))}) "
                                    "or a folder with manifest.jsonl")
    a = ap.parse_args(argv)
    from .data import open_dataset

    path = config_file("dataset", a.dataset)
    if path is not None:
        cfg = _load_yaml(path)
    elif Path(a.dataset).is_dir():
        # a folder's card may name its format (a converted ZONE set says format: zone, whose loader
        # adds that set's own checks); otherwise the generic format
        from .data.generic import GenericDataset
        from .registry import DATASET_FORMATS

        fmt = GenericDataset.read_card(Path(a.dataset)).get("format") or "generic"
        if fmt not in DATASET_FORMATS.names():
            raise UsageError(f"{Path(a.dataset) / 'card.yaml'}: format '{fmt}' is not a dataset format "
                             f"({', '.join(DATASET_FORMATS.names())})")
        cfg = {"root": a.dataset, "format": fmt}
    else:
        options = _group_options("dataset")
        raise UsageError(f"unknown dataset '{a.dataset}': not a config{_did_you_mean(a.dataset, options)} "
                         f"({', '.join(options)}) nor a folder")
    try:
        ds = open_dataset(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    try:
        refs = ds.refs()
        problems = ds.validate()
    except (ValueError, KeyError) as e:
        # a dataset-level problem (an annotation file that is not UTF-8 JSON, a missing key)
        raise UsageError(f"dataset '{a.dataset}': {e.args[0] if isinstance(e, KeyError) and e.args else e}") from None
    errors = 0
    for p in problems:
        level = getattr(p, "level", "error")
        errors += level == "error"
        print(f"{level.upper()} {p}")
    cats: dict[str, int] = {}
    for r in refs:
        cats[r.category or "-"] = cats.get(r.category or "-", 0) + 1
    print(f"dataset '{ds.name}' v{ds.version}: {len(refs)} samples, {errors} error(s), "
          f"{len(problems) - errors} warning(s); categories: " + ", ".join(f"{k}={v}" for k, v in sorted(cats.items())))
    return 1 if errors else 0


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
            elif len(needs) == 1:  # the method's revision names this one model
                print(f"  present  method {name}: {what} ({method.model_revision()})")
            else:  # the revision combines every entry's: it would not describe this one
                print(f"  present  method {name}: {what}")
    return missing


def _cmd_weights(argv: Sequence[str]) -> int:
    protocols, experiments = _group_options("metrics"), _group_options("experiment")
    ap = argparse.ArgumentParser(
        prog="edit-harness weights",
        description="Which weights each metric of a protocol needs (for an experiment: also each of its methods), "
                    "which are present here, and how to provide the missing ones.",
    )
    ap.add_argument("names", nargs="*", metavar="PROTOCOL|EXPERIMENT|method=METHOD",
                    help=f"protocols ({', '.join(protocols)}) or experiments ({', '.join(experiments)}); "
                         "experiment=NAME for an experiment that shares a protocol's name (default); "
                         "method=NAME for one method's weights with its YAML defaults; default: every protocol")
    a = ap.parse_args(argv)
    from .scoring import MetricSuite

    missing = missing_methods = 0
    for name in a.names or protocols:
        methods: list[tuple[str, dict]] = []
        # experiment=NAME / metrics=NAME say which group a name shared by both means
        kind, _, bare = name.rpartition("=")
        if kind == "method":
            options = _group_options("method")
            if bare not in options:
                raise UsageError(f"unknown method '{bare}'{_did_you_mean(bare, options)}; methods: {', '.join(options)}")
            print(f"method {bare}:")
            missing_methods += _print_method_weights([(bare, _config("method", bare))])
            continue
        if kind and kind not in ("experiment", "metrics"):
            raise UsageError(f"'{name}': write PROTOCOL, EXPERIMENT, metrics=PROTOCOL, experiment=EXPERIMENT or "
                             "method=METHOD")
        if kind == "experiment" and bare not in experiments:
            raise UsageError(f"unknown experiment '{bare}'; experiments: {', '.join(experiments)}")
        name = bare
        if name in protocols and kind != "experiment":
            cfg, title = _config("metrics", name), f"protocol {name}"
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
    if not a.names or any(not n.startswith("method=") for n in a.names):
        print(f"{missing} metric(s) unavailable" if missing else "all metric weights present")
    if missing_methods:
        print(f"{missing_methods} method model(s) missing: those methods' edits are skipped, naming the model")
    return 0


def _cmd_list(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="edit-harness list",
        description="List what a run can use: methods (with their parameters and the sample fields they need), "
                    "datasets, metrics, metric protocols and experiments, including those of installed plugins.",
    )
    ap.parse_args(argv)
    from . import metrics  # noqa: F401
    from .registry import METHODS, METRICS
    import methods  # noqa: F401

    print("methods:     " + ", ".join(METHODS.names()))
    print("datasets:    " + ", ".join(_group_options("dataset")))
    print("metrics:     " + ", ".join(METRICS.names()))
    print("protocols:   " + ", ".join(_group_options("metrics")))
    print("experiments: " + ", ".join(_group_options("experiment")))
    from .plugins import load_errors

    for err in load_errors():
        print(f"plugin not loaded: {err}")
    for name in METHODS.names():
        cls = METHODS.get(name)
        print(f"  {name}: params {', '.join(cls.param_names()) or '(none)'}; needs {', '.join(cls.requires)}")
    return 0


def _comma_list(*texts: str | None) -> list[str]:
    """Option values given as repeated flags and / or comma-separated lists, in order."""
    return [v.strip() for text in texts if text for v in text.split(",") if v.strip()]


def _cmd_gate(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="edit-harness gate",
        description="Regression gate: compare every method x parameter point x metric x region of RUN with the "
                    "same cell of a baseline run (95% bootstrap interval of the change of the mean: paired when "
                    "both runs scored the same samples, unpaired otherwise). A cell regressed when the whole "
                    "interval lies beyond its tolerance on the metric's bad side, improved on the good side, else "
                    "it is unchanged. Exit 0: no regression; 1: a regression; 2: could not compare (different "
                    "protocol, weights or region rule, a metric missing from the run, no common method).",
        epilog="examples: edit-harness gate results/pr --baseline results/main --tolerance l1=abs:0.01 "
               "--tolerance psnr=rel:0.05 --junit gate.xml; edit-harness gate results/zone --baseline "
               "paper/zone/table1 --tolerance default=rel:0.05",
    )
    ap.add_argument("run_dir", type=Path, metavar="RUN", help="the run folder to check (results/<run>)")
    ap.add_argument("--baseline", required=True, metavar="BASELINE_RUN|paper/TABLE",
                    help="the baseline run folder, or a published table (paper/zone/table1): each mapped cell of "
                         "the run against the printed number, through results/paper/<paper>/<table>.compare.yaml")
    ap.add_argument("--tolerance", action="append", default=[], metavar="METRIC=abs:V|rel:F",
                    help="allowed change per metric (METRIC, metric/region, or 'default' for the others): abs:V in "
                         "the metric's units, rel:F as a fraction of the baseline mean; default abs:0. Repeat the "
                         "flag or separate with commas: l1=abs:0.01,psnr=rel:0.05")
    ap.add_argument("--metrics", action="append", default=[], metavar="METRIC[,METRIC...]",
                    help="gate only these metrics (or metric/region); each must be scored in both runs")
    ap.add_argument("--junit", type=Path, metavar="PATH", help="also write JUnit XML (one test case per cell)")
    a = ap.parse_intermixed_args(argv)
    from .gate import GateError, gate, gate_paper, paper_table_name, parse_tolerance, write_junit

    try:
        tolerances = dict(parse_tolerance(t) for t in _comma_list(*a.tolerance))
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        table = paper_table_name(a.baseline)
        result = (gate_paper(a.run_dir, table, tolerances, _comma_list(*a.metrics) or None) if table
                  else gate(a.run_dir, a.baseline, tolerances, _comma_list(*a.metrics) or None))
    except GateError as e:
        print(f"edit-harness gate: could not compare: {e}", file=sys.stderr)
        if a.junit:
            write_junit(a.junit, None, error=str(e))
        return 2
    print(result.table())
    if a.junit:
        write_junit(a.junit, result)
        print(f"JUnit XML written to {a.junit}")
    return result.exit_code


def _cmd_figures(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="edit-harness figures",
        description="Draw the papers' figures a run's scores support, as PNG and PDF: mean CLIP-I against "
                    "mean CLIP-T per edit category (ZONE's Figure 6), each metric against each swept "
                    "parameter, ablation bars, and a qualitative grid (rows: samples; columns: source, "
                    "each method's edit, target). Figures that cannot be drawn are listed with the reason.",
        epilog="example: edit-harness figures results/default --methods recolor,inpaint --n-samples 4 --format pdf",
    )
    ap.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    ap.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/report/figures)")
    ap.add_argument("--methods", help="grid columns, in this order (default: every method, table order)")
    ap.add_argument("--samples", help="grid rows: sample ids, in this order")
    ap.add_argument("--n-samples", type=int, default=6, help="grid rows when --samples is not given (first N ids)")
    ap.add_argument("--format", default="png,pdf", help="png, pdf or both (comma-separated)")
    ap.add_argument("--rows-per-page", type=int, default=8)
    ap.add_argument("--no-target", action="store_true", help="leave the ground-truth column out of the grid")
    ap.add_argument("--no-grid", action="store_true", help="draw the score figures only")
    a = ap.parse_args(argv)
    if not (a.run_dir / "jobs").is_dir():
        raise UsageError(f"{a.run_dir} is not a run directory (it has no jobs/ folder)")
    from .plots import figures_for_run

    out = a.out or a.run_dir / "report" / "figures"
    try:
        res = figures_for_run(a.run_dir, out, formats=_comma_list(a.format), grid=not a.no_grid,
                              methods=_comma_list(a.methods) or None, sample_ids=_comma_list(a.samples) or None,
                              n_samples=a.n_samples,
                              target=False if a.no_target else None, rows_per_page=a.rows_per_page)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in sorted(res.files):
        print(f"wrote {res.files[name]}")
    for note in res.notes:
        print(f"not drawn: {note}")
    return 0


def _cmd_compare(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="edit-harness compare",
        description="A published table (results/paper/<paper>/<table>.csv) and the runs' scores side by side: one "
                    "row per paper method x metric with the value as printed, ours (mean and 95% bootstrap "
                    "interval, converted to the paper's scale), delta = ours - published, whether the published "
                    "value lies in our interval, and n. Names are matched by the table's declared mapping, "
                    "<table>.compare.yaml; unmapped names are listed and their rows read 'not in this run'. "
                    "Exit 2 when the comparison cannot be made (no mapping, no run, a protocol mismatch).",
        epilog="example: edit-harness compare results/zone --paper zone/table1 --out results/zone/report/side",
    )
    ap.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN", help="run folder(s) (results/<run>)")
    ap.add_argument("--paper", required=True, metavar="PAPER/TABLE", help="published table, e.g. zone/table1")
    ap.add_argument("--out", type=Path, help="output folder (default: RUN/report/compare-<paper>-<table>)")
    ap.add_argument("--allow-protocol-mismatch", action="store_true",
                    help="compare a run scored under another protocol than the table's (the caption says so)")
    a = ap.parse_intermixed_args(argv)
    from .compare import CompareError, compare, terminal, write_compare

    try:
        result = compare(a.run_dirs, a.paper, allow_protocol_mismatch=a.allow_protocol_mismatch)
    except CompareError as e:
        print(f"edit-harness compare: cannot compare: {e}", file=sys.stderr)
        return 2
    out = a.out or a.run_dirs[0] / "report" / f"compare-{a.paper.replace('/', '-')}"
    print(terminal(result))
    for path in write_compare(result, out).values():
        print(f"wrote {path}")
    return 0


def _cmd_train_part_token(argv: Sequence[str]) -> int:
    """PartEdit's part-token training (methods/partedit/train.py has the arguments and the method)."""
    from methods.partedit.train import main as train_main

    return int(train_main(list(argv), prog="edit-harness train-part-token") or 0)


def _cmd_study(argv: Sequence[str]) -> int:
    """Human-evaluation studies: create, serve, results (harness/study/cli.py has the arguments)."""
    from harness.study.cli import main as study_main

    return int(study_main(list(argv), prog="edit-harness study") or 0)


COMMANDS = {"report": _cmd_report, "score": _cmd_score, "validate": _cmd_validate, "weights": _cmd_weights,
            "list": _cmd_list, "gate": _cmd_gate, "figures": _cmd_figures, "compare": _cmd_compare,
            "train-part-token": _cmd_train_part_token, "study": _cmd_study}


def _run(rest: list[str]) -> int:
    flags, overrides = _split_flags(rest)
    if "--hydra-help" in flags:
        return _hydra_run(rest)  # Hydra's own help
    if "-h" in flags or "--help" in flags:
        print(run_help())
        return 0
    precheck(rest)
    multirun = any(f in _MULTIRUN_FLAGS for f in flags)
    # dataset.shards=N: the sweep of its N shards, dataset.shard=0/N,...,N-1/N (harness.merge)
    from .merge import SHARDS_KEY, expand_shards

    if any(_override_key(o) == SHARDS_KEY for o in overrides):
        if not multirun:
            raise UsageError(f"{SHARDS_KEY}=N runs one job per shard: add -m (or run one shard with dataset.shard=i/N)")
        try:
            expanded = expand_shards(overrides)
        except ValueError as e:
            raise UsageError(str(e)) from None
        rest = [*flags, *expanded]
        overrides = expanded
    if any(f not in _MULTIRUN_FLAGS for f in flags):
        # --cfg, --info, -cn ...: Hydra's own modes, which run no job of this command line's
        return _hydra_run(rest)
    jobs = check_jobs(overrides, multirun)
    return _hydra_run(rest, jobs if jobs is not None and jobs.multirun else None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"] and len(argv) > 1:
        argv = [argv[1], "--help"]  # edit-harness help COMMAND
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "run":
            return _run(rest)
        if cmd in COMMANDS:
            return COMMANDS[cmd](rest)
        raise UsageError(f"unknown command '{cmd}'{_did_you_mean(cmd, ['run', *COMMANDS])}; "
                         f"commands: run, {', '.join(COMMANDS)}")
    except (UsageError, UnknownNameError) as e:
        print(f"edit-harness: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`edit-harness list | head`): stop quietly, as Unix tools do; the
        # flush at exit must not write to the closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except Exception as e:
        from .merge import ShardError

        if not isinstance(e, ShardError):
            raise
        # a run whose shards are incomplete or doubled: what is missing and how to finish it
        print(f"edit-harness: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
