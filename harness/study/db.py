"""A study's database: schema, migrations, writes of the builder and the app, ``answers_frame``.

SQLAlchemy Core rather than the standard library's ``sqlite3``: the same statements run on the
default SQLite file and on PostgreSQL given by URL (a lab sharing one study), with the engine's
connection pool serving waitress's threads.

Durability (SQLite): WAL journal with ``synchronous=FULL``. In WAL mode a commit is one append to
the write-ahead log; NORMAL already survives a killed *process* (kill -9: the log is in the OS
page cache and replayed on the next open), but can lose the last commits on a power loss or OS
crash. FULL fsyncs the log on every commit, so a committed answer survives both; answers arrive a
few per minute per rater, so the fsync's cost (~ms) does not matter. WAL also lets the admin page
read while a rater writes.

Every answer of an item is written in one transaction (all of the item's questions or none), and
an item once answered is final: re-submitting it is refused (``AlreadyAnswered``). The unique key
(rater, item, question, slot) enforces one answer per cell in the database itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import sqlalchemy as sa

SCHEMA_VERSION = 1
SQLITE_NAME = "study.sqlite"

metadata = sa.MetaData()

meta_t = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
raters_t = sa.Table(
    "raters", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)
items_t = sa.Table(
    "items", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("rater", sa.String(64), sa.ForeignKey("raters.id"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("unit", sa.Text, nullable=False),  # the same content across raters
    sa.Column("sample_id", sa.Text, nullable=False),
    sa.Column("texts", sa.Text, nullable=False),  # JSON list of [label, text]
    sa.Column("source_image", sa.String(32), nullable=False),
    sa.Column("slots", sa.Text, nullable=False),  # JSON list of {"image", "method", "broken"} in shown order
    sa.Column("check_kind", sa.String(16), nullable=True),  # None | duplicate | broken
    sa.Column("duplicate_of", sa.String(32), nullable=True),
    sa.Column("first_shown_at", sa.Float, nullable=True),
    sa.UniqueConstraint("rater", "position", name="uq_items_rater_position"),
)
answers_t = sa.Table(
    "answers", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rater", sa.String(64), sa.ForeignKey("raters.id"), nullable=False),
    sa.Column("item", sa.String(32), sa.ForeignKey("items.id"), nullable=False),
    sa.Column("question", sa.String(64), nullable=False),
    sa.Column("slot", sa.Integer, nullable=False),  # per-edit question: the slot rated; choice: -1
    sa.Column("value", sa.Float, nullable=False),  # binary 1/0, scale score, choice: the slot chosen
    sa.Column("answered_at", sa.Float, nullable=False),
    sa.Column("shown_at", sa.Float, nullable=True),
    sa.UniqueConstraint("rater", "item", "question", "slot", name="uq_answers_cell"),
)
sa.Index("ix_items_rater", items_t.c.rater, items_t.c.position)
sa.Index("ix_answers_rater", answers_t.c.rater, answers_t.c.item)

# Migrations: MIGRATIONS[v] upgrades a database at schema version v to v + 1 (inside one
# transaction). Version 1 is the first schema; a database newer than this code is refused.
MIGRATIONS: dict[int, Any] = {}


class StudyDBError(RuntimeError):
    pass


class AlreadyAnswered(StudyDBError):
    pass


def hash_token(token: str) -> str:
    """SHA-256 of a token. Tokens are 32 random bytes (``secrets.token_urlsafe``), so a fast hash
    suffices: there is nothing to brute-force, unlike a password."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def sqlite_url(study_dir: str | Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / SQLITE_NAME}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> sa.Engine:
    """An engine for ``url``; SQLite connections get WAL + synchronous=FULL (module docstring)."""
    try:
        engine = sa.create_engine(url, future=True, pool_pre_ping=not url.startswith("sqlite"))
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as e:
        raise StudyDBError(f"database URL {url!r}: {e}") from e
    except ModuleNotFoundError as e:
        raise StudyDBError(f"database URL {url!r} needs the driver {e.name!r} (pip install psycopg[binary] "
                           "for postgresql+psycopg://)") from e
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def schema_version(conn: sa.Connection) -> int | None:
    if not sa.inspect(conn).has_table("meta"):
        return None
    v = conn.execute(sa.select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar()
    return None if v is None else int(v)


def migrate(engine: sa.Engine) -> int:
    """Create the schema, or bring an older one up to :data:`SCHEMA_VERSION`; returns the version."""
    with engine.begin() as conn:
        v = schema_version(conn)
        if v is None:
            metadata.create_all(conn)
            conn.execute(sa.insert(meta_t).values(key="schema_version", value=str(SCHEMA_VERSION)))
            return SCHEMA_VERSION
        if v > SCHEMA_VERSION:
            raise StudyDBError(f"the study database has schema version {v}, newer than this edit-harness "
                               f"({SCHEMA_VERSION}); upgrade edit-harness")
        while v < SCHEMA_VERSION:
            MIGRATIONS[v](conn)
            v += 1
            conn.execute(sa.update(meta_t).where(meta_t.c.key == "schema_version").values(value=str(v)))
        return v


class StudyDB:
    """The study's database: what the builder writes and the app reads and writes."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        migrate(self.engine)

    @classmethod
    def for_study(cls, study_dir: str | Path, db_url: str | None = None) -> "StudyDB":
        if db_url is None:
            meta = json.loads((Path(study_dir) / "study.json").read_text(encoding="utf-8"))
            db_url = meta.get("db_url")
        return cls(db_url or sqlite_url(study_dir))

    def dispose(self) -> None:
        self.engine.dispose()

    # -- builder -------------------------------------------------------------------------------
    def is_empty(self) -> bool:
        with self.engine.connect() as c:
            return c.execute(sa.select(sa.func.count()).select_from(raters_t)).scalar() == 0

    def write_study(self, raters: Mapping[str, str], items: Sequence[Mapping[str, Any]], admin_token: str) -> None:
        """Raters (id -> token, stored hashed), their items and the admin token, in one transaction."""
        now = time.time()
        with self.engine.begin() as c:
            c.execute(sa.insert(raters_t), [{"id": r, "token_hash": hash_token(t), "created_at": now}
                                            for r, t in raters.items()])
            rows = []
            for it in items:
                rows.append({**{k: it[k] for k in ("id", "rater", "position", "unit", "sample_id", "source_image",
                                                   "check_kind", "duplicate_of")},
                             "texts": json.dumps(it["texts"]), "slots": json.dumps(it["slots"])})
            for i in range(0, len(rows), 500):
                c.execute(sa.insert(items_t), rows[i:i + 500])
            c.execute(sa.insert(meta_t).values(key="admin_token_hash", value=hash_token(admin_token)))

    # -- tokens --------------------------------------------------------------------------------
    def rater_for_token(self, token: str | None) -> str | None:
        if not token or len(token) > 200:
            return None
        h = hash_token(token)
        with self.engine.connect() as c:
            row = c.execute(sa.select(raters_t.c.id, raters_t.c.token_hash).where(raters_t.c.token_hash == h)).first()
        return row.id if row is not None and hmac.compare_digest(row.token_hash, h) else None

    def is_admin(self, token: str | None) -> bool:
        if not token or len(token) > 200:
            return False
        with self.engine.connect() as c:
            v = c.execute(sa.select(meta_t.c.value).where(meta_t.c.key == "admin_token_hash")).scalar()
        return v is not None and hmac.compare_digest(v, hash_token(token))

    # -- rater side ----------------------------------------------------------------------------
    @staticmethod
    def _item(row) -> dict[str, Any]:
        d = dict(row._mapping)
        d["texts"] = json.loads(d["texts"])
        d["slots"] = json.loads(d["slots"])
        return d

    def item(self, item_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(items_t).where(items_t.c.id == item_id)).first()
        return None if row is None else self._item(row)

    def progress(self, rater: str) -> tuple[int, int]:
        """(items answered, items) of one rater."""
        with self.engine.connect() as c:
            total = c.execute(sa.select(sa.func.count()).select_from(items_t).where(items_t.c.rater == rater)).scalar()
            done = c.execute(sa.select(sa.func.count(sa.distinct(answers_t.c.item))).where(answers_t.c.rater == rater)
                             ).scalar()
        return int(done), int(total)

    def next_item(self, rater: str, mark_shown: bool = True) -> dict[str, Any] | None:
        """The rater's first unanswered item by position (resume after a pause), or None when done;
        its first showing time is recorded."""
        answered = sa.select(answers_t.c.item).where(answers_t.c.rater == rater)
        with self.engine.begin() as c:
            row = c.execute(sa.select(items_t).where(items_t.c.rater == rater, items_t.c.id.not_in(answered))
                            .order_by(items_t.c.position).limit(1)).first()
            if row is None:
                return None
            if mark_shown and row.first_shown_at is None:
                c.execute(sa.update(items_t).where(items_t.c.id == row.id, items_t.c.first_shown_at.is_(None))
                          .values(first_shown_at=time.time()))
        return self._item(row)

    def save_answers(self, rater: str, item_id: str, cells: Iterable[tuple[str, int, float]]) -> float:
        """All answers of one item (question, slot, value) in one transaction; refuses an item
        already answered. Validation of the values is the caller's (app.validate_answers)."""
        now = time.time()
        with self.engine.begin() as c:
            item = c.execute(sa.select(items_t.c.rater, items_t.c.first_shown_at).where(items_t.c.id == item_id)).first()
            if item is None or item.rater != rater:
                raise StudyDBError("unknown item")
            if c.execute(sa.select(sa.func.count()).select_from(answers_t)
                         .where(answers_t.c.rater == rater, answers_t.c.item == item_id)).scalar():
                raise AlreadyAnswered(item_id)
            try:
                c.execute(sa.insert(answers_t), [{"rater": rater, "item": item_id, "question": q, "slot": int(s),
                                                  "value": float(v), "answered_at": now,
                                                  "shown_at": item.first_shown_at} for q, s, v in cells])
            except sa.exc.IntegrityError as e:  # a concurrent submission of the same item won the race
                raise AlreadyAnswered(item_id) from e
        return now

    # -- admin ---------------------------------------------------------------------------------
    def rater_progress(self) -> list[dict[str, Any]]:
        """Per rater: items, answered, last answer time (no answers' contents)."""
        with self.engine.connect() as c:
            totals = dict(c.execute(sa.select(items_t.c.rater, sa.func.count()).group_by(items_t.c.rater)).all())
            done = dict(c.execute(sa.select(answers_t.c.rater, sa.func.count(sa.distinct(answers_t.c.item)))
                                  .group_by(answers_t.c.rater)).all())
            last = dict(c.execute(sa.select(answers_t.c.rater, sa.func.max(answers_t.c.answered_at))
                                  .group_by(answers_t.c.rater)).all())
            raters = [r for (r,) in c.execute(sa.select(raters_t.c.id).order_by(raters_t.c.id))]
        return [{"rater": r, "total": int(totals.get(r, 0)), "done": int(done.get(r, 0)), "last": last.get(r)}
                for r in raters]

    def answer_rows(self) -> list[dict[str, Any]]:
        j = answers_t.join(items_t, answers_t.c.item == items_t.c.id)
        with self.engine.connect() as c:
            rows = c.execute(sa.select(answers_t, items_t.c.position, items_t.c.unit, items_t.c.sample_id,
                                       items_t.c.slots, items_t.c.check_kind, items_t.c.duplicate_of)
                             .select_from(j).order_by(answers_t.c.rater, items_t.c.position, answers_t.c.question,
                                                      answers_t.c.slot)).all()
        return [dict(r._mapping) for r in rows]


ANSWER_COLUMNS = ["rater", "item", "sample_id", "question", "method", "candidates", "value", "attention_check",
                  "check_kind", "duplicate_of", "answered_at", "position", "presentation",
                  # beyond the interface: which slot, whether the rated / chosen image is the broken
                  # check image, the item's content key across raters, when the item was first shown
                  "slot", "broken", "unit", "shown_at"]


def answers_frame(study_dir: str | Path, db_url: str | None = None) -> pd.DataFrame:
    """One row per answer (the interface of harness/study/results.py).

    Per-edit questions (sr, mos, upr scores): ``method`` is the rated edit's method and ``value``
    the answer (sr 1 accept / 0 reject; the score). Choice questions (2afc, upr pick-the-best):
    ``method`` is the chosen edit's method and ``value`` 1.0. ``candidates``: the item's methods,
    sorted, '|'-joined. ``presentation``: JSON list of the methods in the order shown (left to
    right), a broken check image as ``"broken:<method>"``.
    """
    study_dir = Path(study_dir)
    meta = json.loads((study_dir / "study.json").read_text(encoding="utf-8"))
    qkind = {q["id"]: q for q in meta["questions"]}
    db = StudyDB(db_url or meta.get("db_url") or sqlite_url(study_dir))
    try:
        rows = db.answer_rows()
    finally:
        db.dispose()
    out = []
    for r in rows:
        slots = json.loads(r["slots"])
        q = qkind.get(r["question"], {})
        if q.get("kind") == "choice":
            slot, value = int(r["value"]), 1.0
        else:
            slot, value = int(r["slot"]), float(r["value"])
        s = slots[slot]
        out.append({
            "rater": r["rater"], "item": r["item"], "sample_id": r["sample_id"], "question": r["question"],
            "method": s["method"], "candidates": "|".join(sorted({x["method"] for x in slots})), "value": value,
            "attention_check": r["check_kind"] is not None, "check_kind": r["check_kind"],
            "duplicate_of": r["duplicate_of"], "answered_at": float(r["answered_at"]), "position": int(r["position"]),
            "presentation": json.dumps([("broken:" if x.get("broken") else "") + x["method"] for x in slots]),
            "slot": slot, "broken": bool(s.get("broken")), "unit": r["unit"], "shown_at": r["shown_at"],
        })
    df = pd.DataFrame(out, columns=ANSWER_COLUMNS)
    if len(df) == 0:
        df = df.astype({"value": "float64", "answered_at": "float64", "attention_check": bool})
    return df
