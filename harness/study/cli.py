"""``edit-harness study create | serve | results``: the arguments (harness/cli.py dispatches here)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import DESIGNS


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Human-evaluation studies over a run's edits "
                                "(success rate, user preference, mean opinion score, 2AFC).")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="build a study from stored edits")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) holding jobs/ and edits")
    c.add_argument("--design", required=True, choices=DESIGNS,
                   help="sr: accept/reject (ZONE); upr: user preference (ZONE); mos: 1-6 scores (CPAM); "
                        "2afc: ours vs each other (PartEdit)")
    c.add_argument("--methods", nargs="+", help="method labels to include (default: every method in the runs)")
    c.add_argument("--ours", help="2afc: the method compared with each other method")
    c.add_argument("--questions", help="JSON or YAML file: a list of {id, text, kind: binary|choice|scale, "
                                       "min, max, per_edit} replacing the design's default questions")
    c.add_argument("--raters", type=int, default=5, help="number of rater links (default 5)")
    c.add_argument("--samples", nargs="+", help="sample ids to include (default: every sample that each method "
                                                "has an edit of)")
    c.add_argument("--max-samples", type=int, help="at most this many samples (the first by id)")
    c.add_argument("--attention-checks", action="store_true",
                   help="add per rater a duplicated item and an item with an obviously broken edit")
    c.add_argument("--edits-per-item", type=int, help="sr / mos: edits shown together (default sr 3, mos 1)")
    c.add_argument("--upr-variant", choices=("paper", "choice"), default="paper",
                   help="upr: paper = score each edit 1-10 (ZONE eq. 9), choice = pick the best")
    c.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    c.add_argument("--out", help="study folder to create (default: study-<design>)")
    c.add_argument("--db", dest="db_url", help="database URL (default: STUDY/study.sqlite), e.g. "
                                               "postgresql+psycopg://user:pw@host/db")
    c.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="where the study will be served, for the printed links")
    s = sub.add_parser("serve", help="serve a study to its raters")
    s.add_argument("study", help="study folder")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--threads", type=int, default=4)
    r = sub.add_parser("results", help="the papers' tables from a study's answers")
    r.add_argument("study", help="study folder")
    r.add_argument("--out", help="output folder (default: STUDY/results)")
    r.add_argument("--exclude-failed-checks", action="store_true",
                   help="drop every answer of a rater who failed an attention check")
    return p


def _create(a: argparse.Namespace) -> int:
    from .builder import StudyError, create_study, load_questions

    try:
        questions = load_questions(a.questions) if a.questions else None
        st = create_study(a.runs, a.design, a.out or f"study-{a.design}", methods=a.methods, ours=a.ours,
                          questions=questions, raters=a.raters, samples=a.samples,
                          attention_checks=a.attention_checks, seed=a.seed, db_url=a.db_url,
                          edits_per_item=a.edits_per_item, upr_variant=a.upr_variant, max_samples=a.max_samples)
    except (StudyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = st.meta
    base = a.base_url.rstrip("/")
    print(f"Study {st.study_dir}: design {m['design']}, {len(m['methods'])} methods, {len(m['samples'])} samples, "
          f"{m['n_items']} items over {len(st.tokens)} raters.")
    print("Rater links (shown only now; the database keeps only their hashes):")
    for rater, tok in st.tokens.items():
        print(f"  {rater}: {base}/r/{tok}")
    print(f"Admin (progress per rater): {base}/admin/{st.admin_token}")
    print(f"Serve with: edit-harness study serve {st.study_dir}")
    return 0


def _serve(a: argparse.Namespace) -> int:
    from .app import make_server

    try:
        server = make_server(a.study, a.host, a.port, threads=a.threads)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Serving study {a.study} on http://{a.host}:{server.effective_port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def _results(a: argparse.Namespace) -> int:
    study = Path(a.study)
    if not (study / "study.json").is_file():
        print(f"error: {study}: no study.json; is this a study folder?", file=sys.stderr)
        return 2
    from . import results

    out = Path(a.out) if a.out else study / "results"
    return int(results.main(study, out, exclude_failed_checks=a.exclude_failed_checks) or 0)


def main(argv: Sequence[str] | None = None, prog: str = "edit-harness study") -> int:
    a = _parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    return {"create": _create, "serve": _serve, "results": _results}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
