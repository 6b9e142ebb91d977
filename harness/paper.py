"""The source papers' published tables, as data: ``results/paper/<paper>/<table>.csv``.

Each file is one tidy table, one printed number a row, with the columns of :data:`COLUMNS`. Values
are stored exactly as the paper prints them (``"0.87"``, ``"18.0"``), so the number of printed
decimals survives: :func:`load_table` returns it in a ``decimals`` column, which is what a
comparison needs to know how far a value was rounded. A table may have a sidecar
``<table>.yaml`` (source, caption summary, units, the bold / underline marks as printed, known
discrepancies in the paper), read with :func:`load_meta`.

The files live in the checkout's ``results/paper/`` (:data:`harness.paths.RESOURCE_ROOT`); where
they are absent (an installed wheel that does not carry them) every function here says so.

    from harness.paper import load_table, load_meta, tables
    tables()                          # ['cpam/table2', 'cpam/table3', ..., 'zone/table5']
    df = load_table("zone/table1")    # a validated pandas DataFrame, one printed number a row
    load_meta("zone/table1")["units"]["L1"]
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from .paths import RESOURCE_ROOT

#: Where the published tables are (a checkout's ``results/paper``).
PAPER_DIR = RESOURCE_ROOT / "results" / "paper"

#: The columns of every table file, in this order.
COLUMNS: tuple[str, ...] = (
    "paper", "table", "setting", "method", "metric", "value", "spread",
    "higher_is_better", "protocol", "scale", "notes",
)
#: Harness metric protocols a published number can correspond to ("" = none, e.g. a user study).
PROTOCOLS: frozenset[str] = frozenset({"", "zone", "partedit", "cpam", "diffeditor", "pie_bench", "magicbrush"})
#: Columns that must not be empty.
_REQUIRED = ("paper", "table", "method", "metric", "value", "higher_is_better", "scale")
# A table name is "<paper>/<table>": lower-case words only, so a name can never leave PAPER_DIR.
_NAME = re.compile(r"^[a-z0-9_]+/[a-z0-9_]+$")
# A printed number: optional sign, digits, optional decimals (no exponent: no paper prints one).
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")


class PaperTableError(ValueError):
    """A published table that is missing, or a file that breaks the schema (names file and line)."""


def _root(root: Path | None) -> Path:
    d = PAPER_DIR if root is None else Path(root)
    if not d.is_dir():
        raise PaperTableError(
            f"no published tables: {d} does not exist (they are in a checkout's results/paper/; "
            "this installation does not carry them)")
    return d


def tables(root: Path | None = None) -> list[str]:
    """Names (``"<paper>/<table>"``) of every published table file, sorted."""
    d = _root(root)
    return sorted(f"{p.parent.name}/{p.stem}" for p in d.glob("*/*.csv"))


def table_path(name: str, root: Path | None = None) -> Path:
    """The CSV file of table ``name`` (``"zone/table1"``); a clear error listing the tables if none."""
    if not _NAME.match(name):
        raise PaperTableError(f"paper table name {name!r} is not of the form '<paper>/<table>' (e.g. 'zone/table1')")
    p = _root(root) / f"{name}.csv"
    if not p.is_file():
        raise PaperTableError(f"no published table {name!r}; known: {', '.join(tables(root)) or 'none'}")
    return p


def _bool(text: str, where: str) -> bool:
    if text == "true":
        return True
    if text == "false":
        return False
    raise PaperTableError(f"{where}: higher_is_better {text!r} is not 'true' or 'false'")


def _number(text: str, field: str, where: str) -> float:
    if not _NUMBER.match(text):
        raise PaperTableError(f"{where}: {field} {text!r} is not a plain number as printed (e.g. 0.0426, 18.0)")
    return float(text)


def validate(df: pd.DataFrame, path: Path, name: str) -> pd.DataFrame:
    """Check the raw (all-text) rows of one table file against the schema and return the typed frame.

    ``value``, ``spread`` and ``scale`` become floats (an empty spread NaN), ``higher_is_better`` a
    bool, and a ``decimals`` column gives each value's printed decimals. Every error names the file
    and the line (line 1 is the header) with the method and the field.
    """
    if tuple(df.columns) != COLUMNS:
        raise PaperTableError(f"{path}: columns {list(df.columns)} != the schema's {list(COLUMNS)}")
    if df.empty:
        raise PaperTableError(f"{path}: no rows")
    paper, table = name.split("/")
    values, spreads, scales, hib, decimals = [], [], [], [], []
    seen: dict[tuple[str, str, str], int] = {}
    for i, row in enumerate(df.itertuples(index=False), start=2):
        r = row._asdict()
        where = f"{path} line {i} (method {r['method']!r}, metric {r['metric']!r})"
        for field in _REQUIRED:
            if not r[field].strip():
                raise PaperTableError(f"{where}: {field} is empty")
        if r["paper"] != paper or r["table"] != table:
            raise PaperTableError(f"{where}: paper/table {r['paper']}/{r['table']} != the file's {name}")
        if r["protocol"] not in PROTOCOLS:
            raise PaperTableError(f"{where}: protocol {r['protocol']!r} is not one of {sorted(PROTOCOLS)}")
        values.append(_number(r["value"], "value", where))
        decimals.append(len(r["value"].partition(".")[2]))
        spreads.append(_number(r["spread"], "spread", where) if r["spread"] else math.nan)
        if spreads[-1] < 0:
            raise PaperTableError(f"{where}: spread {r['spread']!r} is negative")
        scales.append(_number(r["scale"], "scale", where))
        if scales[-1] <= 0:
            raise PaperTableError(f"{where}: scale {r['scale']!r} is not positive")
        hib.append(_bool(r["higher_is_better"], where))
        key = (r["setting"], r["method"], r["metric"])
        if key in seen:
            raise PaperTableError(f"{where}: the same setting/method/metric as line {seen[key]}")
        seen[key] = i
    out = df.copy()
    out["value"] = values
    out["spread"] = spreads
    out["scale"] = scales
    out["higher_is_better"] = hib
    out["decimals"] = decimals
    return out


def load_table(name: str, root: Path | None = None) -> pd.DataFrame:
    """Published table ``name`` (``"zone/table1"``) as a validated DataFrame (see :func:`validate`)."""
    path = table_path(name, root)
    # All columns as text: the printed digits matter ("18.0"), and an empty setting stays "" (not NaN).
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    return validate(df, path, name)


def load_meta(name: str, root: Path | None = None) -> dict[str, Any]:
    """The sidecar ``<table>.yaml`` of table ``name`` (source, caption, units, marks), or {} if none."""
    import yaml

    p = table_path(name, root).with_suffix(".yaml")
    if not p.is_file():
        return {}
    meta = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(meta, dict):
        raise PaperTableError(f"{p}: not a mapping")
    return meta
