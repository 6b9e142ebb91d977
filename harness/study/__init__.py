"""Human-evaluation studies over a run's edits, as the source papers ran them (issue 17).

- ``builder``: ``edit-harness study create``: items from stored edits, the papers' default
  questions per design, per-rater shuffled order and slot order (seeded, recorded), opaque image
  ids, optional attention checks, rater tokens (printed once, stored hashed).
- ``db``: the database (SQLAlchemy Core; SQLite file by default, PostgreSQL by URL), its schema
  and migrations, and ``answers_frame`` (one row per answer) for ``results``.
- ``app``: ``edit-harness study serve``: the rater and admin pages (Flask, served by waitress).
- ``results`` / ``stats``: the papers' tables from the answers.

Study folder: ``STUDY/study.json``, ``STUDY/study.sqlite`` (default database),
``STUDY/images/<opaque id>.png``.
"""

DESIGNS = ("sr", "upr", "mos", "2afc")
