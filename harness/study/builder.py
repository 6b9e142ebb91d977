"""``edit-harness study create``: a study from a run's stored edits.

Designs and their default questions (the papers' user studies):

- ``sr`` (ZONE, Table 2 and supp. C.4): the source, the instruction and captions, and a few edits
  of different methods in shuffled order ("three results randomly selected from the six methods
  each time"); each edit accepted or rejected. Success rate = accepted / shown, per rater.
- ``upr`` (ZONE, supp. C.4, eq. 9): every method's edit of a sample, shuffled; variant ``paper``
  (default): each edit scored 1-10, UPR(i) = 100 * S_i / sum_j S_j; variant ``choice``: the
  rater picks the best edit (the same formula over the counts of picks).
- ``mos`` (CPAM, Table 3, Sec. 5.5): one edit at a time, four 1-6 scores (1 very bad, 6 very
  good): object retention, background retention, realism, satisfaction.
- ``2afc`` (PartEdit, Table 1 and App. H): ours against each other method, random sides; "select
  the method that changes ONLY the part specified and keeps the rest of the image unchanged".

Not specified by the papers (parameters, recorded in study.json): edits per item for ``sr`` (ZONE
shows three; default ``min(3, methods)``) and ``mos`` (default 1); the order of items (shuffled per
rater); the attention checks (a duplicated item re-shuffled, and an item with one edit replaced by
its pixels randomly permuted: an obviously broken image); the question wording beyond the quoted
parts.

Anonymity: images are copied under random ids (``images/<32 hex>.png``); which method made which
image is only in the database (items.slots), never in study.json, file names, pages or responses.
Shuffling: numpy ``default_rng([seed, rater index])`` per rater (recorded: the item positions and
slot orders in the database, the seed in study.json).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from . import DESIGNS
from .db import StudyDB, sqlite_url

PAPERS = {"sr": "zone", "upr": "zone", "mos": "cpam", "2afc": "partedit"}
UPR_VARIANTS = ("paper", "choice")
QUESTION_ID = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
KINDS = ("binary", "choice", "scale")
DEFAULT_RATERS = 5  # ZONE: five volunteers for the success rate

SR_QUESTIONS = [{
    "id": "success", "kind": "binary", "per_edit": True,
    "text": "Accept or reject each edit: does it do what the instruction (output caption) asks, look "
            "realistic, and keep the regions it should not edit unchanged?"}]
UPR_PAPER_QUESTIONS = [{
    "id": "preference", "kind": "scale", "min": 1, "max": 10, "per_edit": True,
    "text": "Score each edit from 1 to 10 for how well it follows the instruction and how similar it stays "
            "to the original image (10 = most preferred)."}]
UPR_CHOICE_QUESTIONS = [{
    "id": "best", "kind": "choice", "per_edit": False,
    "text": "Which edit is best: it follows the instruction and stays closest to the original elsewhere?"}]
MOS_QUESTIONS = [
    {"id": "object_retention", "kind": "scale", "min": 1, "max": 6, "per_edit": True,
     "text": "Object retention: how well does the edit keep the main object's appearance and details? "
             "(1 very bad, 6 very good)"},
    {"id": "background_retention", "kind": "scale", "min": 1, "max": 6, "per_edit": True,
     "text": "Background retention: how well is the background kept intact? (1 very bad, 6 very good)"},
    {"id": "realism", "kind": "scale", "min": 1, "max": 6, "per_edit": True,
     "text": "Realism: how realistic is the edit? (1 very bad, 6 very good)"},
    {"id": "satisfaction", "kind": "scale", "min": 1, "max": 6, "per_edit": True,
     "text": "Satisfaction: how well does the edited image match the editing prompt? (1 very bad, 6 very good)"},
]
AFC_QUESTIONS = [{
    "id": "preference", "kind": "choice", "per_edit": False,
    "text": "Which edit changes ONLY what the instruction asks for and keeps the rest of the image unchanged?"}]


class StudyError(ValueError):
    """A study cannot be built as asked; the message says why."""


def default_questions(design: str, upr_variant: str = "paper") -> list[dict[str, Any]]:
    if design == "sr":
        return [dict(q) for q in SR_QUESTIONS]
    if design == "upr":
        return [dict(q) for q in (UPR_PAPER_QUESTIONS if upr_variant == "paper" else UPR_CHOICE_QUESTIONS)]
    if design == "mos":
        return [dict(q) for q in MOS_QUESTIONS]
    return [dict(q) for q in AFC_QUESTIONS]


def validate_questions(questions: Any, slots_per_item: int) -> list[dict[str, Any]]:
    """Questions as the app needs them; a clear error naming the question and field otherwise.
    Scales are answered with the digit keys, so a scale spans at most 0..10 (0 is the key of 10)."""
    if not isinstance(questions, list) or not questions:
        raise StudyError("questions: expected a non-empty list of {id, text, kind[, min, max, per_edit]}")
    out, seen = [], set()
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            raise StudyError(f"questions[{i}]: expected a mapping, got {type(q).__name__}")
        qid = q.get("id")
        if not isinstance(qid, str) or not QUESTION_ID.match(qid):
            raise StudyError(f"questions[{i}].id: {qid!r} is not a lower-case identifier of at most 32 characters")
        if qid in seen:
            raise StudyError(f"questions[{i}].id: {qid!r} appears twice")
        seen.add(qid)
        text = q.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > 2000:
            raise StudyError(f"question {qid!r}: text must be a non-empty string of at most 2000 characters")
        kind = q.get("kind")
        if kind not in KINDS:
            raise StudyError(f"question {qid!r}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        d = {"id": qid, "text": text, "kind": kind}
        if kind == "choice":
            if q.get("per_edit"):
                raise StudyError(f"question {qid!r}: a choice question picks one edit of the item; per_edit must be false")
            if slots_per_item < 2:
                raise StudyError(f"question {qid!r}: a choice question needs at least two edits per item")
            d["per_edit"] = False
        else:
            d["per_edit"] = bool(q.get("per_edit", True))
            if not d["per_edit"] and slots_per_item != 1:
                raise StudyError(f"question {qid!r}: a {kind} question about a whole item of several edits must be "
                                 "per_edit (one answer per edit)")
        if kind == "scale":
            lo, hi = q.get("min"), q.get("max")
            if not (isinstance(lo, int) and isinstance(hi, int)) or isinstance(lo, bool) or isinstance(hi, bool):
                raise StudyError(f"question {qid!r}: a scale needs integer min and max")
            if not (0 <= lo < hi <= 10):
                raise StudyError(f"question {qid!r}: scale {lo}..{hi} must lie within 0..10 (digit keys)")
            d["min"], d["max"] = lo, hi
        out.append(d)
    return out


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"--questions: no file {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml / json syntax errors of a user's file: say which file
        raise StudyError(f"--questions: {p} cannot be parsed: {type(e).__name__}: {e}") from e
    return data.get("questions", data) if isinstance(data, dict) else data


# ----------------------------------------------------------------------------------------------
# the runs' edits
# ----------------------------------------------------------------------------------------------
@dataclass
class RunEdits:
    labels: list[str]  # method labels, sorted
    edits: dict[tuple[str, str], dict[str, Path]]  # (dataset, sample id) -> label -> edit.png
    dataset_cfg: dict[str, Any]  # dataset -> its config (to load the source)
    skipped: dict[str, int] = field(default_factory=dict)


def collect_edits(run_dirs: Sequence[str | Path]) -> RunEdits:
    """The ok edits of one or more run folders, found the way the HTML report finds them
    (harness/html_report.py: the job's cache_dir, then the run's edits/). A method run at several
    parameter points (or in several runs, or with several seeds) is labelled like the report's
    grid ("method (a=1)", then "run: method (a=1)" or "... seed 1" where still ambiguous); a method
    with one parameter point by its name."""
    from harness.aggregate import params_sort_key
    from harness.html_report import _group_label, _load_jobs

    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise StudyError(f"no run folder {d}")
    jobs = _load_jobs(dirs)
    for d in dirs:
        if not any(j.run_dir == d for j in jobs):
            raise StudyError(f"{d}: no jobs found (expected {d}/jobs/<job>/edits.parquet); is this a run folder?")
    found: dict[tuple, dict[tuple[str, str], Path]] = {}
    ds_cfg: dict[str, Any] = {}
    for job in jobs:
        e = job.edits
        if not len(e):
            continue
        for r in e.to_dict("records"):
            g = (str(r["run"]), str(r["method"]), str(r["params"]), int(r["seed"]))
            found.setdefault(g, {})
            if r["status"] != "ok":
                continue
            key = str(r["edit_key"])
            folder = next((s / key[:2] / key for s in job.stores() if (s / key[:2] / key / "edit.png").is_file()), None)
            if folder is None:
                continue
            sk = (str(r["dataset"]), str(r["sample_id"]))
            found[g].setdefault(sk, folder / "edit.png")
            ds_cfg.setdefault(sk[0], job.dataset_config())
    groups = sorted(found, key=lambda g: (g[0], g[1], params_sort_key(g[2]), g[3]))
    names: dict[tuple, str] = {}
    for method in sorted({g[1] for g in groups}):
        mine = [g for g in groups if g[1] == method]
        if len(mine) == 1:  # one parameter point of this method: its name
            names[mine[0]] = method
            continue
        multi_run = len({g[0] for g in mine}) > 1 and len({(g[2], g[3]) for g in mine}) < len(mine)
        multi_seed = len({(g[0], g[2]) for g in mine}) < len(mine)
        for g in mine:
            names[g] = _group_label(g, multi_run, multi_seed)
    edits: dict[tuple[str, str], dict[str, Path]] = {}
    for g, per in found.items():
        for sk, p in per.items():
            edits.setdefault(sk, {})[names[g]] = p
    return RunEdits(sorted(names.values()), edits, ds_cfg)


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------
@dataclass
class CreatedStudy:
    study_dir: Path
    meta: dict[str, Any]
    tokens: dict[str, str]  # rater id -> token (shown once, stored hashed)
    admin_token: str


def _new_id(nbytes: int = 16) -> str:
    return secrets.token_hex(nbytes)


def broken_image(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An obviously broken edit: the image's pixels randomly permuted (same colours, no structure)."""
    h, w = img.shape[:2]
    flat = img.reshape(h * w, -1)
    return flat[rng.permutation(h * w)].reshape(img.shape)


def create_study(run_dirs: Sequence[str | Path], design: str, out: str | Path, *, methods: Sequence[str] | None = None,
                 ours: str | None = None, questions: list[dict[str, Any]] | None = None, raters: int = DEFAULT_RATERS,
                 samples: Sequence[str] | None = None, attention_checks: bool = False, seed: int = 0,
                 db_url: str | None = None, edits_per_item: int | None = None, upr_variant: str = "paper",
                 max_samples: int | None = None) -> CreatedStudy:
    """Build a study folder (module docstring); returns it with the rater and admin tokens."""
    from harness.html_report import _rgb, _Sources

    if design not in DESIGNS:
        raise StudyError(f"--design must be one of {', '.join(DESIGNS)}, not {design!r}")
    if upr_variant not in UPR_VARIANTS:
        raise StudyError(f"--upr-variant must be one of {', '.join(UPR_VARIANTS)}, not {upr_variant!r}")
    if not isinstance(raters, int) or raters < 1:
        raise StudyError(f"--raters must be a positive integer, not {raters!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise StudyError(f"{out} exists and is not empty; choose a new --out folder")
    run = collect_edits(run_dirs)
    if not run.labels:
        raise StudyError("the runs hold no edits")
    chosen = list(methods) if methods else list(run.labels)
    unknown = [m for m in chosen if m not in run.labels]
    if unknown:
        raise StudyError(f"unknown method(s) {', '.join(map(repr, unknown))}; the runs hold: {', '.join(run.labels)}")
    if len(set(chosen)) != len(chosen):
        raise StudyError("--methods lists a method twice")
    if design == "2afc":
        if ours is None:
            raise StudyError("--design 2afc needs --ours METHOD (the method compared with each other one)")
        if ours not in chosen:
            raise StudyError(f"--ours {ours!r} is not among the study's methods: {', '.join(chosen)}")
        if len(chosen) < 2:
            raise StudyError("--design 2afc needs at least two methods")
    elif ours is not None and ours not in chosen:
        raise StudyError(f"--ours {ours!r} is not among the study's methods: {', '.join(chosen)}")
    if design == "upr" and len(chosen) < 2:
        raise StudyError("--design upr needs at least two methods")
    # samples every chosen method has an edit of
    common = sorted(sk for sk, per in run.edits.items() if all(m in per for m in chosen))
    multi_ds = len({sk[0] for sk in run.edits}) > 1
    sid = (lambda sk: f"{sk[0]}/{sk[1]}") if multi_ds else (lambda sk: sk[1])
    if samples:
        by_id = {sid(sk): sk for sk in run.edits}
        missing = [s for s in samples if s not in by_id]
        if missing:
            raise StudyError(f"--samples: no edit of sample(s) {', '.join(map(repr, missing))} in the runs")
        lacking = [s for s in samples if by_id[s] not in common]
        if lacking:
            raise StudyError(f"--samples: {', '.join(map(repr, lacking))} lack an edit of some chosen method")
        common = [by_id[s] for s in samples]
    if not common:
        raise StudyError(f"no sample has an ok edit of every chosen method ({', '.join(chosen)}); "
                         "choose fewer --methods or other runs")
    if max_samples is not None:
        common = common[:max_samples]
    # slots per item and questions
    if design == "sr":
        k = edits_per_item or min(3, len(chosen))
    elif design == "mos":
        k = edits_per_item or 1
    elif design == "upr":
        k = len(chosen)
    else:
        k = 2
    if not 1 <= k <= len(chosen):
        raise StudyError(f"--edits-per-item {k} must lie in 1..{len(chosen)} (the number of methods)")
    qs = validate_questions(questions if questions is not None else default_questions(design, upr_variant),
                            k if design in ("sr", "mos") else (len(chosen) if design == "upr" else 2))
    if design in ("sr", "mos") and k < len(chosen) and len(chosen) % k and any(q["kind"] == "choice" for q in qs):
        raise StudyError("choice questions need every item to hold the same number of edits: "
                         f"{len(chosen)} methods do not split into items of {k}")

    # images, copied under opaque ids
    out.mkdir(parents=True, exist_ok=True)
    img_dir = out / "images"
    img_dir.mkdir()
    try:
        sources = _Sources()
        src_img: dict[tuple[str, str], str] = {}
        edit_img: dict[tuple[tuple[str, str], str], str] = {}
        texts: dict[tuple[str, str], list[list[str]]] = {}
        for sk in common:
            sample, why = sources.sample(run.dataset_cfg.get(sk[0]), sk[0], sk[1])
            if sample is None:
                raise StudyError(f"sample {sid(sk)!r}: its source image cannot be loaded for the raters: {why}")
            iid = _new_id()
            Image.fromarray(_rgb(sample.source)).save(img_dir / f"{iid}.png")
            src_img[sk] = iid
            texts[sk] = [[lab, str(getattr(sample, f))] for f, lab in
                         (("instruction", "Instruction"), ("source_caption", "Original caption"),
                          ("target_caption", "Output caption")) if getattr(sample, f, None)]
            for m in chosen:
                iid = _new_id()
                shutil.copyfile(run.edits[sk][m], img_dir / f"{iid}.png")
                edit_img[(sk, m)] = iid

        def slot(sk, m, broken=False):
            return {"image": edit_img[(sk, m)], "method": m, "broken": broken}

        tokens = {f"rater-{i + 1:02d}": secrets.token_urlsafe(24) for i in range(raters)}
        admin_token = secrets.token_urlsafe(24)
        items: list[dict[str, Any]] = []
        for ri, rater in enumerate(tokens):
            rng = np.random.default_rng([int(seed), ri])
            units: list[tuple[tuple[str, str], list[str]]] = []
            for sk in common:
                if design in ("sr", "mos"):
                    order = [chosen[i] for i in rng.permutation(len(chosen))]
                    units += [(sk, order[i:i + k]) for i in range(0, len(order), k)]
                elif design == "upr":
                    units.append((sk, [chosen[i] for i in rng.permutation(len(chosen))]))
                else:
                    for other in chosen:
                        if other != ours:
                            pair = [ours, other]
                            units.append((sk, pair if rng.random() < 0.5 else pair[::-1]))
            mine = []
            for sk, ms in (units[i] for i in rng.permutation(len(units))):
                mine.append({"id": _new_id(8), "rater": rater, "unit": f"{sid(sk)}|" + "|".join(sorted(ms)),
                             "sample_id": sid(sk), "texts": texts[sk], "source_image": src_img[sk],
                             "slots": [slot(sk, m) for m in ms], "check_kind": None, "duplicate_of": None, "_sk": sk})
            if attention_checks and mine:
                # a duplicate of one item, its edits re-shuffled, somewhere after the original
                j = int(rng.integers(len(mine)))
                orig = mine[j]
                dup = {**orig, "id": _new_id(8), "check_kind": "duplicate", "duplicate_of": orig["id"],
                       "slots": [orig["slots"][i] for i in rng.permutation(len(orig["slots"]))]}
                mine.insert(int(rng.integers(j + 1, len(mine) + 1)), dup)
                # an obviously broken edit: one edit of another item with its pixels permuted
                b = mine[int(rng.integers(len(mine)))]
                bs = int(rng.integers(len(b["slots"])))
                victim = b["slots"][bs]
                with Image.open(img_dir / f"{victim['image']}.png") as im:
                    arr = np.asarray(im.convert("RGB"))
                bid = _new_id()
                Image.fromarray(broken_image(arr, rng)).save(img_dir / f"{bid}.png")
                bslots = [dict(s) for s in b["slots"]]
                bslots[bs] = {"image": bid, "method": victim["method"], "broken": True}
                mine.insert(int(rng.integers(len(mine) + 1)),
                            {**b, "id": _new_id(8), "check_kind": "broken", "duplicate_of": None, "slots": bslots})
            for pos, it in enumerate(mine):
                it["position"] = pos
                it.pop("_sk", None)
            items += mine

        meta = {
            "design": design, "methods": chosen, "ours": ours if design == "2afc" else None, "questions": qs,
            "seed": int(seed), "raters": list(tokens), "runs": [str(Path(d).resolve()) for d in run_dirs],
            "created_at": time.time(), "db_url": db_url, "attention_checks": bool(attention_checks),
            "paper": PAPERS[design], "edits_per_item": k, "upr_variant": upr_variant if design == "upr" else None,
            "samples": [sid(sk) for sk in common], "n_items": len(items),
            "shuffle": "numpy default_rng([seed, rater index]): item order and slot order per rater",
        }
        db = StudyDB(db_url or sqlite_url(out))
        try:
            if not db.is_empty():
                raise StudyError(f"the database {db_url} already holds a study; give each study its own database")
            db.write_study(tokens, items, admin_token)
        finally:
            db.dispose()
        (out / "study.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except BaseException:
        if db_url is None or not (out / "study.json").exists():
            shutil.rmtree(img_dir, ignore_errors=True)
            for p in (out / "study.sqlite", out / "study.sqlite-wal", out / "study.sqlite-shm"):
                p.unlink(missing_ok=True)
        raise
    return CreatedStudy(out, meta, tokens, admin_token)


def per_rater_items_expected(n_samples: int, n_methods: int, design: str, k: int) -> int:
    """Items per rater without attention checks (used by tests and the CLI summary)."""
    if design in ("sr", "mos"):
        return n_samples * math.ceil(n_methods / k)
    if design == "upr":
        return n_samples
    return n_samples * (n_methods - 1)
