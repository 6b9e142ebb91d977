"""A human-evaluation study's answers -> the source papers' tables (``edit-harness study results STUDY``).

Input: ``STUDY/study.json`` (``design``, ``methods``, ``ours``, ``questions``, ``raters``, ``paper`` ...)
and the answers, one row per answer, as :func:`harness.study.db.answers_frame` returns them (columns
of :data:`REQUIRED`; ``check_kind``, ``duplicate_of``, ``answered_at`` optional). Output: one pandas
DataFrame per table (:func:`study_tables`), printed like every other report (:func:`main`) and
written as CSV (+ caption sidecar) and Markdown under ``STUDY/results/``.

The designs, as the papers define them:

- ``sr``, ZONE Table 2 (app. C.4): each rater's success rate of a method = accepted / answered edits
  of that method; the table gives the mean and the standard deviation over raters (``std_ddof``).
- ``upr``, ZONE Table 2 (app. C.4, eq. 9): ``UPR(i) = 100 * S_i / sum_j S_j``, ``S_i`` the total
  score of method i over all raters and sets. In the paper every set shows all methods and each is
  scored 1-10 (a ``scale`` question): ``S_i`` is the sum of those scores. A study whose UPR question
  is a ``choice`` (pick the best of the set) gets ``S_i`` = the number of times i was chosen: the same
  formula, but a different quantity from the paper's; the caption says which one a table holds.
  Only complete sets (every method of the set scored) count for scores (``upr_complete_sets_only``).
  95% interval: bootstrap over raters (a rater's scores stay together).
- ``mos``, CPAM Table 3 (sec. 5.5): per method and question the mean of the 1-6 scores, with the
  harness's seeded 95% percentile bootstrap (:func:`harness.aggregate.bootstrap_ci`) over the answers
  (``mos_bootstrap="answers"``, as every report's interval over samples) or over raters (``"raters"``).
- ``2afc``, PartEdit Table 1 (app. H): "Ours Pref. (%)" per opponent = 100 * (answers choosing
  ``ours``) / (answers of that pair), with a binomial interval (SciPy: Wilson score by default,
  ``binomial="exact"`` for Clopper-Pearson) and the two-sided exact binomial test against 50%.

Agreement: Krippendorff's alpha (the ``krippendorff`` package) per question, over the units rated by
two or more raters: nominal for sr (accept / reject), 2afc and a choice-UPR (the chosen method),
ordinal for mos and a scores-UPR (``mos_alpha_level`` / ``upr_alpha_level``: 1-6 and 1-10 are ranks).

Attention checks (items with ``attention_check``): a ``duplicate`` passes when the rater answered it
as the item it duplicates (same choice / accept; a score within ``duplicate_tolerance``), a ``broken``
edit passes when it is rejected (sr), not chosen (2afc, choice-UPR) or scored in the lowest
``broken_max_fraction`` of the scale (mos, scores-UPR). The broken edit of an item is known from the
answers' ``broken`` column (the rated / chosen image is the broken one), else from ``presentation``'s
``"broken:<method>"`` entry, else a ``broken_candidate`` column or the label :data:`BROKEN_LABEL`; in
an item of one edit it is that edit. The ``checks`` table gives each rater's pass rate;
``exclude_failed_checks`` drops every answer of a rater below ``min_check_pass_rate``. Check items
never count in any table.

Not specified by the papers (parameters, defaults here): the spread's ddof (ZONE: "standard
deviation", ``std_ddof=1``), the interval methods (none of the papers reports one), the alpha levels,
everything about attention checks (no paper describes any), and what a partly answered study counts
(every answer of a rater counts: a rater's SR is over the items they answered, each table row names
its raters and items).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..aggregate import BOOTSTRAP_SEED, CI_LEVEL, N_RESAMPLES, bootstrap_ci
from ..paper import PAPER_DIR, PaperTableError, load_table
from ..report import (TERMINAL_MARKS, _aligned, _md_caption, _write_text, fmt, md_escape, rank_marks,
                      write_frame_csv)
from .stats import ALPHA_LEVELS, BINOMIAL_METHODS, binomial_interval, binomial_p_value, krippendorff_alpha, \
    ratio_of_sums_ci

DESIGNS = {
    "sr": "success rate (accept / reject), mean +- std over raters (ZONE Table 2, app. C.4)",
    "upr": "user preference rate, 100 * S_i / sum_j S_j (ZONE Table 2, eq. 9)",
    "mos": "mean opinion score per question (CPAM Table 3, sec. 5.5)",
    "2afc": "two-alternative forced choice, Ours Pref. (%) per opponent (PartEdit Table 1, app. H)",
}
#: Columns every answers frame has (harness.study.db.answers_frame).
REQUIRED = ("rater", "item", "sample_id", "question", "method", "candidates", "value", "attention_check")
OPTIONAL = {"check_kind": None, "duplicate_of": None, "answered_at": math.nan, "position": math.nan,
            "presentation": None, "broken_candidate": None}
#: Label of the broken edit among a multi-candidate check's candidates, when the frame has no
#: ``broken_candidate`` column.
BROKEN_LABEL = "broken"
#: A question's kind when study.json gives none, per design; and a scale's range when it gives none.
DEFAULT_KIND = {"sr": "binary", "mos": "scale", "upr": "choice", "2afc": "choice"}
DEFAULT_RANGE = {"mos": (1, 6), "upr": (1, 10)}
#: Which published table(s) each paper's human study is: results/paper/<paper>/<table>.study.yaml.
STUDY_MAPPING_SUFFIX = ".study.yaml"
RESULTS_DIR = "results"


class StudyResultsError(Exception):
    """The study's answers cannot be summarised (no study, no answers, a bad answer): names the field."""


@dataclasses.dataclass(frozen=True)
class Options:
    """How the tables are computed (see the module doc); every default is stated in the captions."""

    exclude_failed_checks: bool = False
    min_check_pass_rate: float = 1.0
    duplicate_tolerance: float = 1.0
    broken_max_fraction: float = 1.0 / 3.0
    std_ddof: int = 1
    binomial: str = "wilson"
    mos_bootstrap: str = "answers"
    mos_alpha_level: str = "ordinal"
    upr_alpha_level: str = "ordinal"
    upr_complete_sets_only: bool = True
    n_resamples: int = N_RESAMPLES
    level: float = CI_LEVEL
    seed: int = BOOTSTRAP_SEED

    def __post_init__(self) -> None:
        if self.binomial not in BINOMIAL_METHODS:
            raise StudyResultsError(f"binomial {self.binomial!r} is not one of {sorted(BINOMIAL_METHODS)}")
        if self.mos_bootstrap not in ("answers", "raters"):
            raise StudyResultsError(f"mos_bootstrap {self.mos_bootstrap!r} is not 'answers' or 'raters'")
        for name in ("mos_alpha_level", "upr_alpha_level"):
            if getattr(self, name) not in ALPHA_LEVELS:
                raise StudyResultsError(f"{name} {getattr(self, name)!r} is not one of {list(ALPHA_LEVELS)}")
        if not 0.0 <= self.min_check_pass_rate <= 1.0 or not 0.0 <= self.broken_max_fraction <= 1.0:
            raise StudyResultsError("min_check_pass_rate and broken_max_fraction are fractions in [0, 1]")


# ----------------------------------------------------------------------------------------------
# the study and its answers
# ----------------------------------------------------------------------------------------------
def load_study(study_dir: Path) -> dict[str, Any]:
    """``STUDY/study.json``, checked: a known design, a question list; clear errors otherwise."""
    p = Path(study_dir) / "study.json"
    if not p.is_file():
        raise StudyResultsError(f"{study_dir}: no study here ({p} does not exist; create one with "
                                "`edit-harness study create`)")
    try:
        study = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StudyResultsError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(study, dict):
        raise StudyResultsError(f"{p}: not a JSON object")
    if study.get("design") not in DESIGNS:
        raise StudyResultsError(f"{p}: design {study.get('design')!r} is not one of {sorted(DESIGNS)}")
    if study["design"] == "2afc" and not study.get("ours"):
        raise StudyResultsError(f"{p}: design 2afc needs 'ours' (the method every other one is compared with)")
    return study


def questions_of(study: Mapping[str, Any], answers: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Question id -> {id, text, kind, min, max}: study.json's, else the answers' ids with the design's
    default kind (a UPR question scored per method, several rows per set, is a scale)."""
    design = study["design"]
    out: dict[str, dict[str, Any]] = {}
    for q in study.get("questions") or []:
        if not isinstance(q, dict) or not q.get("id"):
            raise StudyResultsError(f"study.json: question {q!r} has no 'id'")
        out[str(q["id"])] = dict(q, id=str(q["id"]), kind=q.get("kind") or DEFAULT_KIND[design])
    for qid in sorted(set(answers["question"].astype(str)) - set(out)):
        if out:  # study.json lists its questions: an answer to another one is an error
            raise StudyResultsError(f"answers to question {qid!r}, which study.json does not list "
                                    f"(its questions: {', '.join(out)})")
        kind = DEFAULT_KIND[design]
        if design == "upr" and answers[answers["question"] == qid].duplicated(["rater", "item"]).any():
            kind = "scale"
        out[qid] = {"id": qid, "text": qid, "kind": kind}
    for q in out.values():
        if q["kind"] not in ("binary", "choice", "scale"):
            raise StudyResultsError(f"study.json: question {q['id']!r} kind {q['kind']!r} is not binary, choice "
                                    "or scale")
        if q["kind"] == "scale":
            lo, hi = DEFAULT_RANGE.get(design, (1, 6))
            q["min"], q["max"] = float(q.get("min", lo)), float(q.get("max", hi))
            if not q["min"] < q["max"]:
                raise StudyResultsError(f"study.json: question {q['id']!r}: min {q['min']} >= max {q['max']}")
    return out


def _require_columns(answers: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in answers.columns]
    if missing:
        raise StudyResultsError(f"answers lack column(s) {', '.join(missing)} (expected those of "
                                f"harness.study.db.answers_frame: {', '.join(REQUIRED)})")


def _where(r: Mapping[str, Any]) -> str:
    return f"answer of rater {r['rater']!r}, item {r['item']!r}, question {r['question']!r}"


def prepare_answers(answers: pd.DataFrame, study: Mapping[str, Any],
                    questions: Mapping[str, Mapping[str, Any]]) -> tuple[pd.DataFrame, list[str]]:
    """Typed, validated answers (one per rater, item, question[, method]) and notes on what was dropped.

    A bad answer (a value outside its question's range, a chosen method not among the candidates, a
    missing value) is an error naming the rater, the item, the question and the field: the server
    validates every answer, so a bad one here means a damaged database, not a rater's slip.
    """
    _require_columns(answers)
    df = answers.copy()
    for c, default in OPTIONAL.items():
        if c not in df.columns:
            df[c] = default
    for c in ("rater", "item", "sample_id", "question", "method", "candidates"):
        bad = df[c].isna()
        if bad.any():
            raise StudyResultsError(f"{_where(df[bad].iloc[0])}: field {c!r} is empty")
        df[c] = df[c].astype(str)
    df["attention_check"] = df["attention_check"].map(lambda v: bool(v) if isinstance(v, (bool, np.bool_)) or
                                                      (v is not None and v == v) else False).astype(bool)
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    design = study["design"]
    for r in df.to_dict("records"):
        q = questions[r["question"]]
        v = r["value"]
        if not math.isfinite(v):
            raise StudyResultsError(f"{_where(r)}: field 'value' {v!r} is not a number")
        if r["method"] not in r["candidates"].split("|"):
            raise StudyResultsError(f"{_where(r)}: field 'method' {r['method']!r} is not one of the item's "
                                    f"candidates {r['candidates']!r}")
        if q["kind"] == "binary" and v not in (0.0, 1.0):
            raise StudyResultsError(f"{_where(r)}: field 'value' {v!r} is not 1 (accept) or 0 (reject)")
        if q["kind"] == "choice" and v != 1.0:
            raise StudyResultsError(f"{_where(r)}: field 'value' {v!r} of a choice is not 1.0")
        if q["kind"] == "scale" and not q["min"] <= v <= q["max"]:
            raise StudyResultsError(f"{_where(r)}: field 'value' {v!r} is outside {q['min']:g}-{q['max']:g}")
    if design == "2afc":  # a check item may pair a broken edit with any method
        ours = str(study["ours"])
        for r in df[~df["attention_check"]].to_dict("records"):
            cands = r["candidates"].split("|")
            if ours not in cands or len(cands) != 2:
                raise StudyResultsError(f"{_where(r)}: field 'candidates' {r['candidates']!r} is not a pair of "
                                        f"ours ({ours!r}) and one opponent")
    # Which edit of a check item is the broken one: W's ``broken`` column (the answered / chosen image
    # is the broken one), else the ``presentation``'s "broken:<method>" entry, else a
    # ``broken_candidate`` column or the label BROKEN_LABEL among the candidates.
    df["_broken_label"] = [_broken_label(r) for r in df.to_dict("records")]
    if "broken" in answers.columns:
        df["broken"] = df["broken"].map(lambda v: bool(v) if v is not None and v == v else False).astype(bool)
        df["_broken_known"] = True
    else:
        df["broken"] = df["_broken_label"].notna() & (df["method"] == df["_broken_label"])
        df["_broken_known"] = df["_broken_label"].notna()
    notes: list[str] = []
    # One answer per rater, item, question, and edit for a per-edit question: the newest.
    per_edit = df["question"].map(lambda q: questions[q]["kind"] != "choice")
    df["_edit_key"] = np.where(per_edit, df["method"], "")
    key = ["rater", "item", "question", "_edit_key"]
    df = df.sort_values(["answered_at"], kind="stable", na_position="first")
    dup = df.duplicated(key, keep="last")
    if dup.any():
        notes.append(f"{int(dup.sum())} earlier answer(s) replaced by the same rater's later answer to the same "
                     "item and question")
        df = df[~dup]
    return df.sort_values(["rater", "item", "question", "method"], kind="stable").reset_index(drop=True), notes


def _broken_label(r: Mapping[str, Any]) -> str | None:
    pres = r.get("presentation")
    if isinstance(pres, str) and "broken:" in pres:
        try:
            for x in json.loads(pres):
                if isinstance(x, str) and x.startswith("broken:"):
                    return x[len("broken:"):]
        except ValueError:
            pass
    lab = r.get("broken_candidate")
    if isinstance(lab, str) and lab:
        return lab
    return BROKEN_LABEL if BROKEN_LABEL in r["candidates"].split("|") else None


def _method_order(study: Mapping[str, Any], df: pd.DataFrame) -> list[str]:
    """study.json's method order, then any other label in the answers (sorted)."""
    seen = [str(m) for m in study.get("methods") or []]
    extra = sorted({m for c in df["candidates"] for m in c.split("|")} - set(seen) - {BROKEN_LABEL})
    return seen + extra


# ----------------------------------------------------------------------------------------------
# attention checks
# ----------------------------------------------------------------------------------------------
def _low(v: float, q: Mapping[str, Any], frac: float) -> bool:
    return (v - q["min"]) / (q["max"] - q["min"]) <= frac + 1e-12


def check_results(df: pd.DataFrame, questions: Mapping[str, Mapping[str, Any]], opts: Options) -> pd.DataFrame:
    """One row per answered check item: rater, item, kind, passed (True / False / None = not scorable), why."""
    out = []
    checks = df[df["attention_check"]]
    main = df[~df["attention_check"]]
    for (rater, item), rows in checks.groupby(["rater", "item"], sort=True):
        kind = rows["check_kind"].dropna()
        kind = str(kind.iloc[0]) if len(kind) else ""
        rec: dict[str, Any] = {"rater": rater, "item": item, "kind": kind or "(none)", "passed": None, "why": ""}
        results = []
        if kind == "duplicate":
            of = rows["duplicate_of"].dropna()
            orig = main[(main["rater"] == rater) & (main["item"] == str(of.iloc[0]))] if len(of) else main.iloc[0:0]
            if orig.empty:
                rec["why"] = "the duplicated item is not answered (or not recorded)"
            for qid, qrows in rows.groupby("question"):
                q = questions[qid]
                o = orig[orig["question"] == qid]
                if o.empty:
                    continue
                if q["kind"] == "scale":
                    a = qrows.set_index("method")["value"]
                    b = o.set_index("method")["value"]
                    common = a.index.intersection(b.index)
                    results.append(len(common) == len(a) == len(b)
                                   and bool((abs(a[common] - b[common]) <= opts.duplicate_tolerance).all()))
                else:  # binary: same accept / reject; choice: the same method chosen
                    results.append(sorted(zip(qrows["method"], qrows["value"])) == sorted(zip(o["method"], o["value"])))
        elif kind == "broken":
            for qid, qrows in rows.groupby("question"):
                q = questions[qid]
                if not qrows["_broken_known"].any():
                    if qrows["candidates"].iloc[0].count("|") == 0:  # one edit shown: it is the broken one
                        qrows = qrows.assign(broken=True)
                    else:
                        rec["why"] = "which edit of the item is the broken one is not recorded"
                        continue
                if q["kind"] == "choice":  # passed: the broken image was not chosen
                    results.append(not bool(qrows["broken"].any()))
                    continue
                bad = qrows[qrows["broken"]]
                if bad.empty:
                    rec["why"] = "the broken edit was not rated"
                elif q["kind"] == "binary":  # passed: rejected
                    results.append(bool((bad["value"] == 0.0).all()))
                else:  # passed: scored in the lowest broken_max_fraction of the scale
                    results.append(all(_low(v, q, opts.broken_max_fraction) for v in bad["value"]))
        else:
            rec["why"] = f"unknown check kind {kind!r}"
        if results:
            rec["passed"] = all(results)
            rec["why"] = ""
        out.append(rec)
    return pd.DataFrame(out, columns=["rater", "item", "kind", "passed", "why"])


def checks_table(df: pd.DataFrame, per_check: pd.DataFrame, opts: Options) -> pd.DataFrame:
    """Per rater: checks scored and passed (all, duplicates, broken edits), pass rate, failed, excluded."""
    recs = []
    for rater in sorted(df["rater"].unique()):
        c = per_check[per_check["rater"] == rater]
        scored = c[c["passed"].notna()]
        passed = int(scored["passed"].astype(bool).sum())
        rate = passed / len(scored) if len(scored) else math.nan
        failed = bool(len(scored)) and rate < opts.min_check_pass_rate
        rec = {"rater": rater, "n_answers": int((df["rater"] == rater).sum()), "n_checks": len(scored),
               "passed": passed, "pass_rate": rate}
        for kind in ("duplicate", "broken"):
            k = scored[scored["kind"] == kind]
            rec[f"{kind}_passed"] = f"{int(k['passed'].astype(bool).sum())}/{len(k)}"
        rec["not_scorable"] = int(c["passed"].isna().sum())
        rec["failed"] = failed
        rec["excluded"] = failed and opts.exclude_failed_checks
        recs.append(rec)
    return pd.DataFrame(recs)


# ----------------------------------------------------------------------------------------------
# the designs
# ----------------------------------------------------------------------------------------------
def _std(x: pd.Series, ddof: int) -> float:
    return float(x.std(ddof=ddof)) if len(x) > ddof else math.nan


def _set_count(d: pd.DataFrame) -> int:
    """Distinct items by content (sample and candidates): what a rater is shown, whatever its item id."""
    return int(d[["sample_id", "candidates"]].drop_duplicates().shape[0])


def sr_tables(d: pd.DataFrame, methods: Sequence[str], questions: Mapping[str, Mapping[str, Any]],
              opts: Options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """SR per method (mean, std over raters of each rater's accept %) and per rater x method."""
    rows, by_rater = [], []
    for qid in [q for q in questions if questions[q]["kind"] == "binary"]:
        dq = d[d["question"] == qid]
        for m in methods:
            dm = dq[dq["method"] == m]
            per = dm.groupby("rater")["value"].agg(["sum", "size"])
            rates = 100.0 * per["sum"] / per["size"]
            for rater, r in per.iterrows():
                by_rater.append({"design": "sr", "question": qid, "method": m, "rater": rater,
                                 "accepted": int(r["sum"]), "n_items": int(r["size"]),
                                 "sr": 100.0 * r["sum"] / r["size"]})
            rows.append({"design": "sr", "question": qid, "method": m,
                         "sr": float(rates.mean()) if len(rates) else math.nan, "std": _std(rates, opts.std_ddof),
                         "n_raters": len(per), "n_items": int(dm["sample_id"].nunique()), "n_answers": len(dm)})
    return pd.DataFrame(rows), pd.DataFrame(by_rater)


def upr_table(d: pd.DataFrame, methods: Sequence[str], questions: Mapping[str, Mapping[str, Any]],
              opts: Options) -> tuple[pd.DataFrame, list[str]]:
    """UPR(i) = 100 S_i / sum_j S_j per question (eq. 9), with a rater-bootstrap interval."""
    rows, notes = [], []
    for qid, q in questions.items():
        dq = d[d["question"] == qid]
        scores = q["kind"] == "scale"
        if scores and opts.upr_complete_sets_only and len(dq):
            g = dq.groupby(["rater", "item"])  # scored methods are among the candidates (validated): count them
            complete = g["method"].nunique() == g["candidates"].first().str.count(r"\|") + 1
            keep = complete[complete].index
            n_drop = len(complete) - len(keep)
            if n_drop:
                notes.append(f"UPR {qid}: {n_drop} incompletely scored set(s) left out (upr_complete_sets_only)")
            dq = dq.set_index(["rater", "item"]).loc[keep].reset_index() if len(keep) else dq.iloc[0:0]
        per = dq.pivot_table(index="rater", columns="method", values="value", aggfunc="sum", fill_value=0.0)
        per = per.reindex(columns=list(methods), fill_value=0.0)
        s = per.sum(axis=0)
        total = float(s.sum())
        num = per.to_numpy()
        lo, hi = ratio_of_sums_ci(num, np.repeat(num.sum(1, keepdims=True), num.shape[1], axis=1),
                                  opts.n_resamples, opts.level, opts.seed) if len(per) else ([math.nan] * len(methods),) * 2
        for j, m in enumerate(methods):
            rows.append({"design": "upr", "question": qid, "method": m, "S": float(s[m]),
                         "upr": 100.0 * float(s[m]) / total if total else math.nan,
                         "ci_low": 100.0 * lo[j], "ci_high": 100.0 * hi[j],
                         "S_is": "sum of scores" if scores else "times chosen",
                         "n_raters": int(dq["rater"].nunique()), "n_items": _set_count(dq),
                         "n_answers": int(dq[["rater", "item"]].drop_duplicates().shape[0])})
    return pd.DataFrame(rows), notes


def mos_table(d: pd.DataFrame, methods: Sequence[str], questions: Mapping[str, Mapping[str, Any]],
              opts: Options) -> pd.DataFrame:
    """MOS per method x question: mean, bootstrap 95% interval, std, counts."""
    rows = []
    for qid in [q for q in questions if questions[q]["kind"] == "scale"]:
        dq = d[d["question"] == qid]
        for m in methods:
            dm = dq[dq["method"] == m]
            v = dm["value"].to_numpy()
            if opts.mos_bootstrap == "answers":
                lo, hi = bootstrap_ci(v, opts.n_resamples, opts.level, opts.seed)
            else:
                g = dm.groupby("rater")["value"].agg(["sum", "size"])
                a, b = ratio_of_sums_ci(g["sum"].to_numpy(), g["size"].to_numpy(), opts.n_resamples, opts.level,
                                        opts.seed) if len(g) else ([math.nan], [math.nan])
                lo, hi = float(a[0]), float(b[0])
            rows.append({"design": "mos", "question": qid, "method": m,
                         "mos": float(v.mean()) if len(v) else math.nan, "ci_low": lo, "ci_high": hi,
                         "std": _std(dm["value"], opts.std_ddof), "n_raters": int(dm["rater"].nunique()),
                         "n_items": int(dm["sample_id"].nunique()), "n_answers": len(dm)})
    return pd.DataFrame(rows)


def afc_table(d: pd.DataFrame, ours: str, methods: Sequence[str], questions: Mapping[str, Mapping[str, Any]],
              opts: Options) -> pd.DataFrame:
    """Ours Pref. (%) per opponent: 100 k / n, binomial interval, two-sided binomial p vs 50%."""
    rows = []
    for qid in questions:
        dq = d[d["question"] == qid]
        opponent = dq["candidates"].map(lambda c: next(x for x in c.split("|") if x != ours))
        for m in [m for m in methods if m != ours]:
            dm = dq[opponent == m]
            k, n = int((dm["method"] == ours).sum()), len(dm)
            lo, hi = binomial_interval(k, n, opts.level, opts.binomial)
            rows.append({"design": "2afc", "question": qid, "ours": ours, "opponent": m,
                         "pref": 100.0 * k / n if n else math.nan, "ci_low": 100.0 * lo, "ci_high": 100.0 * hi,
                         "k": k, "n": n, "p_value": binomial_p_value(k, n),
                         "n_raters": int(dm["rater"].nunique()), "n_items": int(dm["sample_id"].nunique())})
    return pd.DataFrame(rows)


def agreement_table(d: pd.DataFrame, design: str, questions: Mapping[str, Mapping[str, Any]],
                    opts: Options) -> pd.DataFrame:
    """Krippendorff's alpha per question over the units two or more raters rated."""
    rows = []
    for qid, q in questions.items():
        dq = d[d["question"] == qid]
        if q["kind"] == "choice":  # the unit: the set shown (by content); rated: the chosen method
            unit, value, level = ("sample_id", "candidates"), "method", "nominal"
        elif q["kind"] == "binary":  # the unit: one edit (sample, method), whichever item showed it
            unit, value, level = ("sample_id", "method"), "value", "nominal"
        else:
            unit, value = ("sample_id", "method"), "value"
            level = opts.upr_alpha_level if design == "upr" else opts.mos_alpha_level
        try:
            a = krippendorff_alpha(dq, unit, level, value=value)
        except ValueError as e:  # a rater who rated the same unit twice outside the checks
            a = {"alpha": math.nan, "level": level, "n_raters": int(dq["rater"].nunique()), "n_units": 0,
                 "n_values": 0, "why": str(e)}
        rows.append({"design": design, "question": qid, "coefficient": "Krippendorff's alpha", **a,
                     "unit": " x ".join(unit), "rated": value})
    return pd.DataFrame(rows)


def study_tables(study_dir: Path, answers: pd.DataFrame | None = None, *, exclude_failed_checks: bool = False,
                 options: Options | None = None, paper_root: Path | None = None) -> dict[str, pd.DataFrame]:
    """The study's tables: the design's (``sr`` + ``sr_by_rater`` / ``upr`` / ``mos`` / ``2afc``),
    ``agreement``, ``checks`` (per rater), ``published`` (when study.json names its ``paper``), and
    ``notes`` (one column: what was left out and why). ``answers`` defaults to the study's database
    (:func:`harness.study.db.answers_frame`)."""
    study_dir = Path(study_dir)
    opts = options or Options()
    if exclude_failed_checks:
        opts = dataclasses.replace(opts, exclude_failed_checks=True)
    study = load_study(study_dir)
    if answers is None:
        from .db import answers_frame

        answers = answers_frame(study_dir)
    if answers is None or len(answers) == 0:
        raise StudyResultsError(f"{study_dir}: the study has no answers yet (share the rater links of "
                                "`edit-harness study serve`)")
    _require_columns(answers)
    questions = questions_of(study, answers)
    df, notes = prepare_answers(answers, study, questions)
    design = study["design"]
    per_check = check_results(df, questions, opts)
    checks = checks_table(df, per_check, opts)
    excluded = list(checks.loc[checks["excluded"], "rater"])
    if excluded:
        notes.append(f"excluded by the attention checks (pass rate < {opts.min_check_pass_rate:g}): "
                     + ", ".join(excluded))
        df = df[~df["rater"].isin(excluded)]
    n_check_rows = int(df["attention_check"].sum())
    main = df[~df["attention_check"]]
    if n_check_rows:
        notes.append(f"{n_check_rows} answer(s) to attention-check items are not in the tables")
    if main.empty:
        raise StudyResultsError(f"{study_dir}: no answers left to summarise ("
                                + ("every rater was excluded by the attention checks" if excluded
                                   else "only attention-check items were answered") + ")")
    methods = _method_order(study, df)
    tables: dict[str, pd.DataFrame] = {}
    if design == "sr":
        tables["sr"], tables["sr_by_rater"] = sr_tables(main, methods, questions, opts)
    elif design == "upr":
        tables["upr"], more = upr_table(main, methods, questions, opts)
        notes += more
    elif design == "mos":
        tables["mos"] = mos_table(main, methods, questions, opts)
    else:
        tables["2afc"] = afc_table(main, str(study["ours"]), methods, questions, opts)
    tables["agreement"] = agreement_table(main, design, questions, opts)
    tables["checks"] = checks
    if study.get("paper"):
        tables["published"] = published_side_by_side(tables, study, paper_root, opts)
    tables["notes"] = pd.DataFrame({"note": notes}, dtype=object)
    # the study itself, one row: what every caption names (design, raters, items, options)
    tables["study"] = pd.DataFrame([{
        "study": study_dir.name, "design": design, "n_raters": int(main["rater"].nunique()),
        "n_items": int(main["sample_id"].nunique()), "n_answers": len(main), "ours": study.get("ours"),
        "paper": study.get("paper"), "questions": json.dumps(list(questions.values()), sort_keys=True),
        "options": json.dumps(dataclasses.asdict(opts), sort_keys=True)}])
    tables = {k: v.reset_index(drop=True) for k, v in tables.items()}
    return tables


# ----------------------------------------------------------------------------------------------
# published side by side
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StudyMapping:
    path: Path
    table: str
    ours: dict[str, str]          # setting -> harness method of the paper's "Ours" ("" = every setting)
    methods: dict[str, str]       # paper method -> harness method
    metrics: dict[str, dict[str, Any]]   # paper metric -> {design, statistic, question}
    unmapped: dict[str, str]      # paper method or metric -> why


STATISTICS = {"sr": "sr", "upr": "upr", "mos": "mos", "2afc": "pref"}
#: Statuses of a published row: compared; the study has nothing for it; ours exists but is another
#: quantity (a UPR over other methods, or counting picks instead of summing scores).
NOT_IN_STUDY = "not in this study"
PUBLISHED_STATUSES = ("compared", NOT_IN_STUDY, "not comparable")


def study_mappings(paper: str, root: Path | None = None) -> list[StudyMapping]:
    """Every ``results/paper/<paper>/*.study.yaml`` of ``paper``, parsed and checked."""
    import yaml

    base = Path(root) if root is not None else PAPER_DIR
    files = sorted((base / paper).glob(f"*{STUDY_MAPPING_SUFFIX}")) if (base / paper).is_dir() else []
    if not files:
        raise StudyResultsError(f"no published human study of paper {paper!r}: no {base / paper}/"
                                f"*{STUDY_MAPPING_SUFFIX}")
    out = []
    for path in files:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        table = f"{paper}/{path.name[:-len(STUDY_MAPPING_SUFFIX)]}"
        if not isinstance(raw, dict) or raw.get("table") != table:
            raise StudyResultsError(f"{path}: 'table' {raw.get('table') if isinstance(raw, dict) else None!r} "
                                    f"!= {table!r}")
        extra = sorted(set(raw) - {"table", "ours", "methods", "metrics"})
        if extra:
            raise StudyResultsError(f"{path}: unknown key(s) {', '.join(extra)}; allowed: table, ours, methods, metrics")
        ours = raw.get("ours") or {}
        ours = {"": str(ours)} if isinstance(ours, str) else {str(k): str(v) for k, v in ours.items()}
        m = StudyMapping(path, table, ours, {}, {}, {})
        for name, v in (raw.get("methods") or {}).items():
            if not isinstance(v, dict) or not (("method" in v) ^ ("unmapped" in v)):
                raise StudyResultsError(f"{path}: method {name!r}: expected {{method: NAME}} or {{unmapped: WHY}}")
            if "unmapped" in v:
                m.unmapped[name] = str(v["unmapped"])
            else:
                m.methods[name] = str(v["method"])
        for name, v in (raw.get("metrics") or {}).items():
            if not isinstance(v, dict) or not (("design" in v) ^ ("unmapped" in v)):
                raise StudyResultsError(f"{path}: metric {name!r}: expected {{design: D, ...}} or {{unmapped: WHY}}")
            if "unmapped" in v:
                m.unmapped[name] = str(v["unmapped"])
                continue
            if v["design"] not in DESIGNS:
                raise StudyResultsError(f"{path}: metric {name!r}: design {v['design']!r} not in {sorted(DESIGNS)}")
            bad = sorted(set(v) - {"design", "question"})
            if bad:
                raise StudyResultsError(f"{path}: metric {name!r}: unknown key(s) {', '.join(bad)}")
            m.metrics[name] = {"design": v["design"], "question": v.get("question")}
        try:
            paper_df = load_table(table, root)
        except PaperTableError as e:
            raise StudyResultsError(str(e)) from None
        stray = sorted((set(m.methods) | set(m.metrics) | set(m.unmapped))
                       - set(paper_df["method"]) - set(paper_df["metric"]))
        if stray:
            raise StudyResultsError(f"{path}: {', '.join(map(repr, stray))} not in published table {table}")
        out.append(m)
    return out


PUBLISHED_COLUMNS = ("table", "setting", "paper_method", "paper_metric", "published", "published_spread", "design",
                     "question", "method", "ours", "ours_low", "ours_high", "interval", "delta", "in_interval",
                     "n_raters", "n_items", "status", "why")


def _pick_question(tab: pd.DataFrame, want: str | None) -> tuple[pd.DataFrame, str]:
    qs = list(dict.fromkeys(tab["question"]))
    if want is not None:
        return tab[tab["question"] == want], ("" if want in qs else f"the study has no question {want!r}")
    if len(qs) > 1:
        return tab.iloc[0:0], f"the study has several questions ({', '.join(qs)}): name one in the mapping"
    return tab, ""


def published_side_by_side(tables: Mapping[str, pd.DataFrame], study: Mapping[str, Any],
                           root: Path | None = None, options: Options | None = None) -> pd.DataFrame:
    """One row per published human-study number of the study's paper, ours beside it."""
    opts = options or Options()
    design = study["design"]
    rows = []
    for mp in study_mappings(str(study["paper"]), root):
        paper_df = load_table(mp.table, root)
        for r in paper_df.itertuples(index=False):
            if r.metric not in mp.metrics:
                continue  # not a human-study number (a metric: edit-harness compare)
            spec = mp.metrics[r.metric]
            row: dict[str, Any] = {c: None for c in PUBLISHED_COLUMNS}
            row.update(table=mp.table, setting=r.setting, paper_method=r.method, paper_metric=r.metric,
                       published=float(r.value), published_spread=float(r.spread), design=spec["design"],
                       question=spec["question"], status=NOT_IN_STUDY, n_raters=0, n_items=0,
                       _decimals=int(r.decimals))
            method = mp.methods.get(r.method)
            ours = mp.ours.get(r.setting, mp.ours.get(""))
            if method is None:
                row["why"] = mp.unmapped.get(r.method, "method not mapped")
            elif spec["design"] != design:
                row["why"] = f"a {spec['design']} number; this study is {design}"
            elif design == "2afc" and ours != str(study.get("ours")):
                row["why"] = f"the paper's Ours is {ours}; this study's is {study.get('ours')}"
            else:
                row["method"] = method
                tab = tables[design]
                key = "opponent" if design == "2afc" else "method"
                hit, why = _pick_question(tab[tab[key] == method], spec["question"])
                stat = STATISTICS[design]
                if not (tab[key] == method).any():
                    row["why"] = f"method {method} not studied"
                elif why:
                    row["why"] = why
                elif hit.empty or not (hit.iloc[0]["n_raters"] > 0 and math.isfinite(hit.iloc[0][stat])):
                    row["why"] = f"the study has no answers for {method}"
                else:
                    h = hit.iloc[0]
                    row.update(question=h["question"], ours=float(h[stat]), delta=float(h[stat]) - float(r.value),
                               n_raters=int(h["n_raters"]), n_items=int(h["n_items"]), status="compared", why="")
                    if design == "sr":
                        lo, hi, row["interval"] = h["sr"] - h["std"], h["sr"] + h["std"], "+- std over raters"
                    else:
                        lo, hi = h["ci_low"], h["ci_high"]
                        row["interval"] = {"upr": "95% bootstrap over raters", "mos": "95% bootstrap",
                                           "2afc": f"95% {BINOMIAL_METHODS[opts.binomial]}"}[design]
                    row.update(ours_low=float(lo), ours_high=float(hi))
                    row["in_interval"] = ("n/a" if not (math.isfinite(lo) and math.isfinite(hi))
                                          else "yes" if lo <= float(r.value) <= hi else "no")
                    if design == "upr":  # a share of a total: the same total, or another quantity
                        paper_set = {mp.methods[m] for m in set(paper_df["method"]) if m in mp.methods}
                        study_set = set(tab.loc[tab["question"] == h["question"], "method"])
                        if h["S_is"] != "sum of scores":
                            row.update(status="not comparable", why="this study's UPR counts picks (a choice "
                                       "question); the paper's S_i sums 1-10 scores (eq. 9)")
                        elif study_set != paper_set:
                            row.update(status="not comparable", why=f"UPR sums to 100 over this study's "
                                       f"{len(study_set)} methods, the paper's over its {len(paper_set)}")
            rows.append(row)
    return pd.DataFrame(rows, columns=[*PUBLISHED_COLUMNS, "_decimals"])


# ----------------------------------------------------------------------------------------------
# display: the report's formatting (fmt, aligned text columns, Markdown escaping, best marks)
# ----------------------------------------------------------------------------------------------
def _pct_ci(r: Mapping[str, Any], col: str) -> str:
    return f"{fmt(r[col])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" if math.isfinite(r["ci_low"]) else fmt(r[col])


# table name -> (columns: (header, cell function), number of left-aligned columns, column marked best)
_VIEWS: dict[str, tuple[list[tuple[str, Callable[[Mapping[str, Any]], str]]], int, str | None]] = {
    "sr": ([("Question", lambda r: r["question"]), ("Method", lambda r: r["method"]),
            ("SR (%)", lambda r: f"{fmt(r['sr'])} ± {fmt(r['std'])}"), ("Raters", lambda r: str(r["n_raters"])),
            ("Items", lambda r: str(r["n_items"])), ("Answers", lambda r: str(r["n_answers"]))], 2, "sr"),
    "sr_by_rater": ([("Question", lambda r: r["question"]), ("Method", lambda r: r["method"]),
                     ("Rater", lambda r: r["rater"]), ("SR (%)", lambda r: fmt(r["sr"])),
                     ("Accepted", lambda r: f"{r['accepted']}/{r['n_items']}")], 3, None),
    "upr": ([("Question", lambda r: r["question"]), ("Method", lambda r: r["method"]),
             ("UPR (%) [95% CI]", lambda r: _pct_ci(r, "upr")), ("S_i", lambda r: fmt(r["S"])),
             ("S_i is", lambda r: r["S_is"]), ("Raters", lambda r: str(r["n_raters"])),
             ("Sets", lambda r: str(r["n_items"]))], 2, "upr"),
    "mos": ([("Question", lambda r: r["question"]), ("Method", lambda r: r["method"]),
             ("MOS [95% CI]", lambda r: _pct_ci(r, "mos")), ("Std", lambda r: fmt(r["std"])),
             ("Raters", lambda r: str(r["n_raters"])), ("Items", lambda r: str(r["n_items"])),
             ("Answers", lambda r: str(r["n_answers"]))], 2, "mos"),
    "2afc": ([("Question", lambda r: r["question"]), ("Ours", lambda r: r["ours"]),
              ("Opponent", lambda r: r["opponent"]), ("Ours Pref. (%) [95% CI]", lambda r: _pct_ci(r, "pref")),
              ("k/n", lambda r: f"{r['k']}/{r['n']}"), ("p (vs 50%)", lambda r: fmt(r["p_value"], 3)),
              ("Raters", lambda r: str(r["n_raters"])), ("Items", lambda r: str(r["n_items"]))], 3, None),
    "agreement": ([("Question", lambda r: r["question"]), ("Coefficient", lambda r: r["coefficient"]),
                   ("Level", lambda r: r["level"]), ("Alpha", lambda r: fmt(r["alpha"], 3)),
                   ("Raters", lambda r: str(r["n_raters"])), ("Units (2+ raters)", lambda r: str(r["n_units"])),
                   ("Unit", lambda r: r["unit"]), ("Why n/a", lambda r: r["why"] or "")], 3, None),
    "checks": ([("Rater", lambda r: r["rater"]), ("Checks passed", lambda r: f"{r['passed']}/{r['n_checks']}"),
                ("Pass rate", lambda r: fmt(r["pass_rate"], 3)), ("Duplicate", lambda r: r["duplicate_passed"]),
                ("Broken", lambda r: r["broken_passed"]), ("Not scorable", lambda r: str(r["not_scorable"])),
                ("Failed", lambda r: "yes" if r["failed"] else "no"),
                ("Excluded", lambda r: "yes" if r["excluded"] else "no")], 1, None),
}


def _published_cells(r: Mapping[str, Any]) -> list[str]:
    d = int(r["_decimals"])
    pub = f"{r['published']:.{d}f}" + (f" ± {r['published_spread']:.{d}f}" if math.isfinite(r["published_spread"])
                                        else "")
    if r["status"] == NOT_IN_STUDY:
        return [r["setting"], r["paper_method"], r["paper_metric"], pub, "—", "", "", "", f"{r['status']}: {r['why']}"]
    num = lambda v: f"{v:.{d + 1}f}" if math.isfinite(v) else fmt(v)  # noqa: E731
    ours = (f"{num(r['ours'])} ± {num(r['ours'] - r['ours_low'])}" if r["design"] == "sr"
            else f"{num(r['ours'])} [{num(r['ours_low'])}, {num(r['ours_high'])}]")
    last = f"{r['method']} {r['question']}" + (f" ({r['status']}: {r['why']})" if r["status"] != "compared" else "")
    return [r["setting"], r["paper_method"], r["paper_metric"], pub, ours, f"{r['delta']:+.{d + 1}f}",
            r["in_interval"], f"{r['n_raters']}/{r['n_items']}", last]


_PUBLISHED_HEAD = ["Setting", "Paper method", "Metric", "Published", "Ours", "Delta", "In interval",
                   "Raters/items", "Harness method, question / why not compared"]


def _view(name: str, df: pd.DataFrame) -> tuple[list[str], list[list[str]], int]:
    if name == "published":
        return list(_PUBLISHED_HEAD), [_published_cells(r) for r in df.to_dict("records")], 3
    if name == "notes":
        return ["Note"], [[str(n)] for n in df["note"]], 1
    cols, left, best = _VIEWS[name]
    recs = df.to_dict("records")
    body = [[f(r) for _, f in cols] for r in recs]
    if best is not None and recs:  # best / second per question, like every report's tables
        stat_col = [h for h, _ in cols].index({"sr": "SR (%)", "upr": "UPR (%) [95% CI]", "mos": "MOS [95% CI]"}[best])
        for q in dict.fromkeys(r["question"] for r in recs):
            idx = [i for i, r in enumerate(recs) if r["question"] == q]
            for i, mk in zip(idx, rank_marks([recs[i][best] for i in idx], True)):
                body[i][stat_col] += TERMINAL_MARKS[mk] if mk else " "
    return [h for h, _ in cols], body, left


def caption(name: str, tables: Mapping[str, pd.DataFrame]) -> list[str]:
    """Caption lines of table ``name``: design, raters, items, how each number is computed."""
    a = tables["study"].iloc[0]
    o = json.loads(a["options"])
    head = f"study {a['study']}: design {a['design']}, {a['n_raters']} raters, {a['n_items']} items (samples), " \
           f"{a['n_answers']} answers (attention checks excluded); per row: its raters and items"
    ci = f"{o['level']:.0%} percentile bootstrap, {o['n_resamples']} resamples, seed {o['seed']}"
    lines = {
        "sr": [f"SR: {DESIGNS['sr']}", head,
               f"A rater's SR of a method = 100 * accepted / answered; mean ± std (ddof {o['std_ddof']}) over raters",
               "* best, + second best per question"],
        "sr_by_rater": ["SR per rater", head, "accepted / answered edits of the method, per rater"],
        "upr": [f"UPR: {DESIGNS['upr']}", head,
                "S_i = sum of the 1-10 scores of method i (the paper's eq. 9) when the question is a scale; "
                "the number of times i was chosen when it is a choice (column 'S_i is'); sums to 100 over the "
                "study's methods", f"95% interval: {ci} over raters", "* best, + second best per question"],
        "mos": [f"MOS: {DESIGNS['mos']}", head,
                f"95% interval: {ci} over the {o['mos_bootstrap']}", "* best, + second best per question"],
        "2afc": [f"2AFC: {DESIGNS['2afc']}", head,
                 f"Ours Pref. = 100 * k / n, k = answers choosing ours among the n of the pair; "
                 f"{o['level']:.0%} {BINOMIAL_METHODS[o['binomial']]} (scipy.stats.binomtest); p: two-sided exact "
                 "binomial test against 50%"],
        "agreement": ["Inter-rater agreement: Krippendorff's alpha (krippendorff package)", head,
                      f"nominal for accept / reject and choices, {o['mos_alpha_level']} for MOS scores, "
                      f"{o['upr_alpha_level']} for UPR scores; units rated by two or more raters only"],
        "checks": ["Attention checks per rater", head,
                   f"duplicate: answered as the original (scores within {o['duplicate_tolerance']:g}); broken edit: "
                   f"rejected / not chosen / scored in the lowest {o['broken_max_fraction']:.3g} of the scale",
                   f"failed: pass rate below {o['min_check_pass_rate']:g}; failed raters "
                   + ("are EXCLUDED from every table" if o["exclude_failed_checks"]
                      else "are kept (exclude them with --exclude-failed-checks)")],
        "published": [f"Published human study of {a['paper']} side by side with this study", head,
                      "Ours: SR mean ± std over raters; UPR, MOS, 2AFC with their 95% intervals; delta = ours - "
                      "published; in interval: the published value lies inside ours",
                      "Mappings: " + ", ".join(f"results/paper/{t}{STUDY_MAPPING_SUFFIX}"
                                               for t in dict.fromkeys(tables["published"]["table"]))
                      if "published" in tables and len(tables["published"]) else "Mappings: none"],
        "notes": ["Notes", head],
        "study": ["The study", head, "questions and options as JSON"],
    }[name]
    return lines


def _order(tables: Mapping[str, pd.DataFrame]) -> list[str]:
    order = ["sr", "sr_by_rater", "upr", "mos", "2afc", "agreement", "checks", "published", "notes"]
    return [n for n in order if n in tables and (n != "notes" or len(tables[n]))]


def terminal(tables: Mapping[str, pd.DataFrame]) -> str:
    """All tables as aligned text, each under its caption's first lines."""
    out = []
    for name in _order(tables):
        cap = caption(name, tables)
        df = tables[name]
        more = ""
        if name == "published":  # the terminal shows what was compared; every row is in results.md
            n_other = int((df["status"] == NOT_IN_STUDY).sum())
            df = df[df["status"] != NOT_IN_STUDY]
            more = f"{n_other} more published number(s) not in this study: results.md, published.csv" if n_other else ""
        head, body, left = _view(name, df)
        if name == "published" and body:  # its last column is text: left-aligned
            w = max(len(head[-1]), *(len(c[-1]) for c in body))
            head = [*head[:-1], head[-1].ljust(w)]
            body = [[*c[:-1], c[-1].ljust(w)] for c in body]
        out += [cap[0], *(f"  {ln}" for ln in cap[2:]), *(_aligned(head, body, left) if body else ["(no rows)"])]
        out += [more, ""] if more else [""]
    out.insert(0, caption("study", tables)[1])
    return "\n".join(out).rstrip() + "\n"


def markdown(tables: Mapping[str, pd.DataFrame]) -> str:
    lines = []
    for name in _order(tables):
        head, body, _ = _view(name, tables[name])
        md = _md_caption(caption(name, tables))
        md[0] = "#" + md[0]  # each table a section of one file
        lines += [*md, "", "| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(md_escape(c) for c in cells) + " |" for cells in body] + [""]
    return "\n".join([f"# Human-evaluation study {tables['study'].iloc[0]['study']}", "", *lines])


def write_results(tables: Mapping[str, pd.DataFrame], out_dir: Path) -> dict[str, Path]:
    """``<table>.csv`` (+ ``.caption.txt``) per table and ``results.md`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name in [*_order(tables), *(n for n in ("notes", "study") if n not in _order(tables))]:
        df = tables[name][[c for c in tables[name].columns if not c.startswith("_")]]
        files[name], _ = write_frame_csv(out_dir / f"{name}.csv", df, caption(name, tables))
    files["md"] = out_dir / "results.md"
    _write_text(files["md"], markdown(tables))
    return files


def main(study_dir: str | Path, out_dir: str | Path | None = None, *, exclude_failed_checks: bool = False,
         options: Options | None = None, answers: pd.DataFrame | None = None) -> int:
    """``edit-harness study results STUDY``: print the tables, write them under ``STUDY/results/``.

    Returns 0; a study that cannot be summarised prints the reason to stderr and returns 2.
    """
    study_dir = Path(study_dir)
    try:
        tables = study_tables(study_dir, answers, exclude_failed_checks=exclude_failed_checks, options=options)
    except StudyResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(terminal(tables))
    files = write_results(tables, Path(out_dir) if out_dir is not None else study_dir / RESULTS_DIR)
    print(f"Wrote {files['md']} and {len(files) - 1} CSV table(s) beside it.")
    return 0
