"""``edit-harness study serve``: the rater and admin pages (Flask, served by waitress).

Pages are rendered on the server (Jinja with autoescape: every text escaped) with one small
vanilla script (``static/study.js``, no build step) for the keyboard and the answer POST.

Routes:
- ``GET /r/<token>``: the rater's next unanswered item (pause: close the page; resume: open the
  link again), or a thank-you page when done. Shows the source, the instruction / captions, the
  edits in the rater's recorded order as "Left"/"Right" (two) or "A", "B", ... (more): no method
  names anywhere.
- ``POST /api/answer`` (``Authorization: Bearer <token>``, JSON ``{"item", "answers": [{"question",
  "slot", "value"}]}``): every cell of the item at once, validated here (the item is the rater's,
  each question exists, each per-edit question answered once per edit, values in range), written
  in one transaction. An answered item is final: submitting it again is refused (409) so an
  attention check cannot be re-answered after the fact and no answer changes silently.
- ``GET /api/progress`` (bearer): the rater's own counts.
- ``GET /image/<32 hex>``: an image by its opaque id only (anything else 404: no path reaches the
  file system).
- ``GET /admin/<admin token>``: progress per rater (counts and times, not the answers).

Errors: 401 missing / unknown token, 404 unknown item (including another rater's: its existence
is not revealed), 400 invalid answers, 409 already answered, 413 payload over
:data:`MAX_PAYLOAD` bytes, 415 not JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from pathlib import Path
from typing import Any

from flask import Flask, abort, jsonify, render_template, request, send_file
from werkzeug.exceptions import HTTPException

from .db import AlreadyAnswered, StudyDB, StudyDBError

MAX_PAYLOAD = 8 * 1024  # bytes: an item's answers are a few hundred bytes
IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
ITEM_ID = re.compile(r"^[0-9a-f]{16}$")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page URL holds the rater's token
    "X-Frame-Options": "DENY",
}


class InvalidAnswer(ValueError):
    pass


def slot_names(n: int) -> list[str]:
    return ["Left", "Right"] if n == 2 else [chr(ord("A") + i) for i in range(n)]


def required_cells(questions: list[dict[str, Any]], n_slots: int) -> list[tuple[str, int]]:
    """(question id, slot) cells of an item, in the order the page walks them: each edit's
    per-edit questions, edit by edit, then the item-level (choice) questions with slot -1."""
    cells = [(q["id"], s) for s in range(n_slots) for q in questions if q["per_edit"]]
    return cells + [(q["id"], -1) for q in questions if not q["per_edit"]]


def _int_value(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and (not math.isfinite(v) or v != int(v)):
        return None
    return int(v)


def validate_answers(questions: list[dict[str, Any]], n_slots: int, answers: Any) -> list[tuple[str, int, float]]:
    """The item's answers as (question, slot, value) cells, or InvalidAnswer saying what is wrong."""
    if not isinstance(answers, list):
        raise InvalidAnswer("'answers' must be a list")
    by_id = {q["id"]: q for q in questions}
    need = required_cells(questions, n_slots)
    if len(answers) != len(need):
        raise InvalidAnswer(f"expected {len(need)} answers for this item, got {len(answers)}")
    got: dict[tuple[str, int], float] = {}
    for a in answers:
        if not isinstance(a, dict) or set(a) - {"question", "slot", "value"}:
            raise InvalidAnswer("each answer is {question, slot, value}")
        q = by_id.get(a.get("question")) if isinstance(a.get("question"), str) else None
        if q is None:
            raise InvalidAnswer("unknown question")
        slot = a.get("slot")
        slot = -1 if slot is None else _int_value(slot)
        if slot is None or (q["per_edit"] and not 0 <= slot < n_slots) or (not q["per_edit"] and slot != -1):
            raise InvalidAnswer(f"question {q['id']}: invalid slot")
        v = _int_value(a.get("value"))
        kind = q["kind"]
        ok = v is not None and ((kind == "binary" and v in (0, 1)) or (kind == "scale" and q["min"] <= v <= q["max"])
                                or (kind == "choice" and 0 <= v < n_slots))
        if not ok:
            raise InvalidAnswer(f"question {q['id']}: value out of range")
        if (q["id"], slot) in got:
            raise InvalidAnswer(f"question {q['id']}: answered twice")
        got[(q["id"], slot)] = float(v)
    if set(got) != set(need):
        raise InvalidAnswer("answers do not match the item's questions")
    return [(q, s, got[(q, s)]) for q, s in need]


def _bearer() -> str | None:
    h = request.headers.get("Authorization", "")
    return h[7:].strip() if h.startswith("Bearer ") else None


def create_app(study_dir: str | Path, db_url: str | None = None) -> Flask:
    study_dir = Path(study_dir).resolve()
    meta_path = study_dir / "study.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{study_dir}: no study.json; create the study with `edit-harness study create`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    questions = meta["questions"]
    images = study_dir / "images"
    db = StudyDB.for_study(study_dir, db_url)

    app = Flask(__name__, template_folder="templates", static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_PAYLOAD
    app.config["JSON_SORT_KEYS"] = True
    app.extensions["study_db"] = db

    @app.after_request
    def _headers(resp):
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        if request.path.startswith(("/r/", "/admin/", "/api/")):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        if request.path.startswith("/api/"):
            return jsonify({"error": e.description or e.name}), e.code
        return render_template("message.html", title=e.name, message=e.description or ""), e.code

    @app.get("/")
    def index():
        return render_template("message.html", title="Image editing study",
                               message="Open the personal link you were given to take part.")

    @app.get("/favicon.ico")
    def favicon():  # browsers ask for it; none, without a 404 in the console
        return "", 204

    @app.get("/r/<token>")
    def rater_page(token: str):
        rater = db.rater_for_token(token)
        if rater is None:
            abort(401, "This link is not valid.")
        done, total = db.progress(rater)
        item = db.next_item(rater)
        if item is None:
            return render_template("done.html", done=done, total=total)
        n = len(item["slots"])
        names = slot_names(n)
        page = {
            "item": item["id"], "questions": questions, "slots": n, "slot_names": names,
            "cells": [list(c) for c in required_cells(questions, n)], "done": done, "total": total,
        }
        return render_template("rater.html", item=item, names=names, questions=questions, page=page,
                               done=done, total=total, position=done + 1,
                               per_edit=[q for q in questions if q["per_edit"]],
                               choice=[q for q in questions if not q["per_edit"]])

    @app.post("/api/answer")
    def answer():
        rater = db.rater_for_token(_bearer())
        if rater is None:
            abort(401, "missing or unknown token")
        if not request.is_json:
            abort(415, "send application/json")
        payload = request.get_json(silent=True)
        if not isinstance(payload, dict) or set(payload) - {"item", "answers"}:
            abort(400, "expected {item, answers}")
        item_id = payload.get("item")
        if not isinstance(item_id, str) or not ITEM_ID.match(item_id):
            abort(404, "unknown item")
        item = db.item(item_id)
        if item is None or item["rater"] != rater:
            abort(404, "unknown item")
        try:
            cells = validate_answers(questions, len(item["slots"]), payload.get("answers"))
            db.save_answers(rater, item_id, cells)
        except InvalidAnswer as e:
            abort(400, str(e))
        except AlreadyAnswered:
            abort(409, "this item is already answered")
        except StudyDBError:
            abort(404, "unknown item")
        done, total = db.progress(rater)
        return jsonify({"ok": True, "done": done, "total": total})

    @app.get("/api/progress")
    def progress():
        rater = db.rater_for_token(_bearer())
        if rater is None:
            abort(401, "missing or unknown token")
        done, total = db.progress(rater)
        return jsonify({"done": done, "total": total})

    @app.get("/image/<image_id>")
    def image(image_id: str):
        if not IMAGE_ID.match(image_id):
            abort(404)
        p = images / f"{image_id}.png"
        if not p.is_file():
            abort(404)
        return send_file(p, mimetype="image/png", max_age=3600, download_name=f"{image_id}.png")

    @app.get("/admin/<token>")
    def admin(token: str):
        if not db.is_admin(token):
            abort(401, "This link is not valid.")
        rows = db.rater_progress()
        for r in rows:
            r["last_text"] = (_dt.datetime.fromtimestamp(r["last"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                              if r["last"] else "-")
        return render_template("admin.html", rows=rows, design=meta["design"], n_questions=len(questions),
                               done=sum(r["done"] for r in rows), total=sum(r["total"] for r in rows))

    return app


def make_server(study_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int = 4,
                db_url: str | None = None):
    """A waitress server for the study (``.effective_port``, ``.run()``, ``.close()``; the Flask
    app as ``.study_app``)."""
    from waitress.server import create_server

    app = create_app(study_dir, db_url)
    server = create_server(app, host=host, port=port, threads=threads, max_request_body_size=MAX_PAYLOAD * 4)
    server.study_app = app
    return server
