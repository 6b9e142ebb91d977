"""`edit-harness study create` (harness/study/builder.py) and the study database
(harness/study/db.py): items from a real run's stored edits, seeded per-rater shuffling recorded
in the database, anonymity of the study folder, attention checks, clear errors, hashed tokens,
schema versions, answers_frame."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from PIL import Image

from harness.cli import main
from harness.study import builder as B
from harness.study import db as D

from ._study_fixtures import METHODS, label_words, study_run, token_of

HEX32 = re.compile(r"^[0-9a-f]{32}\.png$")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return study_run(tmp_path_factory)


def _items(study: Path) -> pd.DataFrame:
    eng = D.make_engine(D.sqlite_url(study))
    try:
        with eng.connect() as c:
            df = pd.read_sql(sa.select(D.items_t).order_by(D.items_t.c.rater, D.items_t.c.position), c)
    finally:
        eng.dispose()
    df["slots"] = df["slots"].map(json.loads)
    df["methods"] = df["slots"].map(lambda s: tuple(x["method"] for x in s))
    return df


def _edit_pngs(run: Path) -> dict[bytes, str]:
    """bytes of every edit.png of the run -> its method label (as the builder labels them)."""
    edits = pd.concat([pd.read_parquet(p) for p in (run / "jobs").glob("*/edits.parquet")])
    out = {}
    for r in edits[edits.status == "ok"].to_dict("records"):
        p = json.loads(r["params"])
        lab = r["method"] if not p else f"{r['method']} (space={p['space']}, strength={p['strength']})"
        out[(run / "edits" / r["edit_key"][:2] / r["edit_key"] / "edit.png").read_bytes()] = lab
    return out


def test_labels_and_common_samples_from_the_run(run):
    r = B.collect_edits([run])
    assert r.labels == sorted(METHODS)
    assert sorted(k[1] for k in r.edits) == ["chelsea_eyes_blue", "coffee_cup_blue", "flower_purple"]
    assert all(sorted(v) == sorted(METHODS) for v in r.edits.values())


@pytest.mark.parametrize("design,k,per_rater", [("sr", 3, 3), ("upr", 3, 3), ("mos", 1, 9), ("2afc", 2, 6)])
def test_each_design_items_questions_and_study_json(run, tmp_path, design, k, per_rater):
    ours = METHODS[2] if design == "2afc" else None
    st = B.create_study([run], design, tmp_path / "s", raters=2, seed=3, ours=ours)
    meta = json.loads((tmp_path / "s" / "study.json").read_text())
    for key in ("design", "methods", "ours", "questions", "seed", "raters", "runs", "created_at", "db_url",
                "attention_checks", "paper"):
        assert key in meta, key
    assert meta["design"] == design and meta["methods"] == sorted(METHODS) and meta["seed"] == 3
    assert meta["raters"] == ["rater-01", "rater-02"] and meta["db_url"] is None
    assert meta["paper"] == {"sr": "zone", "upr": "zone", "mos": "cpam", "2afc": "partedit"}[design]
    assert meta["questions"] == B.validate_questions(B.default_questions(design), k)
    assert meta["edits_per_item"] == k
    assert per_rater == B.per_rater_items_expected(3, 3, design, k)
    items = _items(tmp_path / "s")
    assert len(items) == 2 * per_rater and meta["n_items"] == 2 * per_rater
    for rater, g in items.groupby("rater"):
        assert list(g.position) == list(range(per_rater))
        assert g.check_kind.isna().all()
        # every (sample, method) edit shown exactly the design's number of times
        shown = pd.Series([(s, m) for s, ms in zip(g.sample_id, g.methods) for m in ms]).value_counts()
        assert len(shown) == 9
        if design == "2afc":  # ours meets each of the two others once per sample
            assert all(n == (2 if m == ours else 1) for (_, m), n in shown.items())
        else:  # every edit shown once per rater
            assert (shown == 1).all()
        if design == "2afc":
            assert all(ours in ms and len(ms) == 2 for ms in g.methods)
            assert sorted(m for ms in g.methods for m in ms if m != ours) == sorted(
                [m for m in METHODS if m != ours] * 3)
        else:
            assert all(len(ms) == k for ms in g.methods)
    defaults = {"sr": ["success"], "upr": ["preference"], "mos": ["object_retention", "background_retention",
                                                                  "realism", "satisfaction"], "2afc": ["preference"]}
    assert [q["id"] for q in meta["questions"]] == defaults[design]
    assert set(st.tokens) == set(meta["raters"])


def test_upr_variants_paper_scores_and_choice(run, tmp_path):
    B.create_study([run], "upr", tmp_path / "p", raters=1)
    B.create_study([run], "upr", tmp_path / "c", raters=1, upr_variant="choice")
    p = json.loads((tmp_path / "p" / "study.json").read_text())["questions"]
    c = json.loads((tmp_path / "c" / "study.json").read_text())["questions"]
    assert p == [{**B.UPR_PAPER_QUESTIONS[0]}] and (p[0]["min"], p[0]["max"], p[0]["per_edit"]) == (1, 10, True)
    assert c[0]["kind"] == "choice" and c[0]["per_edit"] is False


def test_shuffling_is_seeded_per_rater_and_recorded(run, tmp_path):
    def seqs(study):
        items = _items(study)
        return {r: list(zip(g.sample_id, g.methods)) for r, g in items.groupby("rater")}

    a = seqs(B.create_study([run], "upr", tmp_path / "a", raters=3, seed=7).study_dir)
    b = seqs(B.create_study([run], "upr", tmp_path / "b", raters=3, seed=7).study_dir)
    c = seqs(B.create_study([run], "upr", tmp_path / "c", raters=3, seed=8).study_dir)
    assert a == b  # same seed: the same orders (item ids and image ids are random, the orders are not)
    assert a != c
    # raters differ from each other: 3 samples x 3! slot orders; all three equal by chance has
    # probability (1 / (3! * 3!^3))^2 ~ 1e-9 under uniform shuffles (and is deterministic here)
    assert len({tuple(v) for v in a.values()}) == 3
    # reproducible from the recorded seed: the builder's rng stream for rater 0
    rng = np.random.default_rng([7, 0])
    common = ["chelsea_eyes_blue", "coffee_cup_blue", "flower_purple"]
    units = [(s, tuple(sorted(METHODS)[i] for i in rng.permutation(3))) for s in common]
    assert a["rater-01"] == [units[i] for i in rng.permutation(3)]


def test_study_folder_is_anonymous_and_images_are_the_edits(run, tmp_path):
    st = B.create_study([run], "sr", tmp_path / "s", raters=2, attention_checks=True)
    names = sorted(p.relative_to(st.study_dir).as_posix() for p in st.study_dir.rglob("*") if p.is_file())
    assert all(n in ("study.json", "study.sqlite", "study.sqlite-wal", "study.sqlite-shm")
               or (n.startswith("images/") and HEX32.match(n[7:])) for n in names), names
    for w in label_words():
        assert not any(w in n for n in names)
    by_bytes = _edit_pngs(run)
    items = _items(st.study_dir)
    for it in items.itertuples():
        for s in it.slots:
            data = (st.study_dir / "images" / f"{s['image']}.png").read_bytes()
            if s["broken"]:
                assert data not in by_bytes
            else:
                assert by_bytes[data] == s["method"]  # the copy is byte-identical to that method's edit.png
        with Image.open(st.study_dir / "images" / f"{it.source_image}.png") as im:
            assert im.mode == "RGB"
    # tokens: never in study.json, only hashed in the database file
    blob = b"".join((st.study_dir / n).read_bytes() for n in names if n.startswith("study."))
    for tok in [*st.tokens.values(), st.admin_token]:
        assert tok.encode() not in blob
        assert D.hash_token(tok).encode() in blob


def test_attention_checks_duplicate_and_broken(run, tmp_path):
    st = B.create_study([run], "2afc", tmp_path / "s", raters=3, ours=METHODS[0], attention_checks=True, seed=1)
    items = _items(st.study_dir)
    for rater, g in items.groupby("rater"):
        assert len(g) == 6 + 2 and list(g.position) == list(range(8))
        dup = g[g.check_kind == "duplicate"]
        brk = g[g.check_kind == "broken"]
        assert len(dup) == 1 and len(brk) == 1
        orig = g[g.id == dup.iloc[0].duplicate_of]
        assert len(orig) == 1 and pd.isna(orig.iloc[0].check_kind)
        assert orig.iloc[0].position < dup.iloc[0].position
        assert orig.iloc[0].unit == dup.iloc[0].unit and sorted(orig.iloc[0].methods) == sorted(dup.iloc[0].methods)
        b = brk.iloc[0]
        bslot = [s for s in b.slots if s["broken"]]
        assert len(bslot) == 1
        twin = g[(g.unit == b.unit) & g.check_kind.isna()].iloc[0]
        good = next(s for s in twin.slots if s["method"] == bslot[0]["method"])
        with Image.open(st.study_dir / "images" / f"{good['image']}.png") as im:
            a = np.asarray(im.convert("RGB"))
        with Image.open(st.study_dir / "images" / f"{bslot[0]['image']}.png") as im:
            x = np.asarray(im.convert("RGB"))
        # the same pixels, permuted: equal multisets of colours, not the same image
        assert a.shape == x.shape and not np.array_equal(a, x)
        key = lambda arr: np.sort(arr.reshape(-1, 3).view([("", arr.dtype)] * 3).ravel())  # noqa: E731
        assert np.array_equal(key(a), key(x))


def test_clear_errors(run, tmp_path):
    with pytest.raises(B.StudyError, match="no run folder"):
        B.create_study([tmp_path / "nope"], "sr", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(B.StudyError, match="no jobs found"):
        B.create_study([tmp_path / "empty"], "sr", tmp_path / "o2")
    with pytest.raises(B.StudyError, match=r"unknown method\(s\) 'diffedit'; the runs hold: identity"):
        B.create_study([run], "sr", tmp_path / "o3", methods=["identity", "diffedit"])
    with pytest.raises(B.StudyError, match="needs --ours"):
        B.create_study([run], "2afc", tmp_path / "o4")
    with pytest.raises(B.StudyError, match="--samples: no edit of sample"):
        B.create_study([run], "sr", tmp_path / "o5", samples=["rocket_move_left"])
    with pytest.raises(B.StudyError, match="--design must be one of"):
        B.create_study([run], "likert", tmp_path / "o6")
    with pytest.raises(B.StudyError, match="scale 1..12 must lie within 0..10"):
        B.create_study([run], "mos", tmp_path / "o7", questions=[{"id": "q", "text": "t", "kind": "scale",
                                                                  "min": 1, "max": 12}])
    with pytest.raises(B.StudyError, match="choice question needs at least two edits"):
        B.create_study([run], "mos", tmp_path / "o8", questions=[{"id": "q", "text": "t", "kind": "choice"}])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(B.StudyError, match="not empty"):
        B.create_study([run], "sr", tmp_path / "full")
    for o in ("o3", "o4", "o5", "o6", "o7", "o8"):  # a refused study leaves no half-built folder
        assert not (tmp_path / o / "study.json").exists() and not (tmp_path / o / "study.sqlite").exists()


def test_no_common_samples(run, tmp_path):
    # a second run whose only method edited a sample the first run's methods did not
    other = tmp_path / "results"
    assert main(["run", "method=inpaint", f"results_dir={other}", "run_name=other", "metrics=pixel",
                 "progress=false", "dataset.ids=[coffee_remove_spoon]"]) == 0
    with pytest.raises(B.StudyError, match="no sample has an ok edit of every chosen method"):
        B.create_study([run, other / "other"], "sr", tmp_path / "o", methods=["inpaint", "identity"])


def test_cli_create_prints_links_once_and_errors_exit_2(run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["study", "create", str(run), "--design", "mos", "--raters", "2", "--out", str(out),
                 "--max-samples", "1", "--base-url", "http://lab:9000"]) == 0
    text = capsys.readouterr().out
    links = re.findall(r"http://lab:9000/r/\S+", text)
    admin = re.findall(r"http://lab:9000/admin/(\S+)", text)
    assert len(links) == 2 and len(admin) == 1
    db = D.StudyDB.for_study(out)
    try:
        assert {db.rater_for_token(token_of(u)) for u in links} == {"rater-01", "rater-02"}
        assert db.is_admin(admin[0]) and not db.is_admin(token_of(links[0]))
        assert db.rater_for_token(admin[0]) is None
    finally:
        db.dispose()
    qf = tmp_path / "q.yaml"
    qf.write_text('- {id: ok, text: "Fine?", kind: binary}\n')
    assert main(["study", "create", str(run), "--design", "sr", "--questions", str(qf), "--out",
                 str(tmp_path / "q"), "--raters", "1"]) == 0
    assert json.loads((tmp_path / "q" / "study.json").read_text())["questions"] == [
        {"id": "ok", "text": "Fine?", "kind": "binary", "per_edit": True}]
    qf.write_text("- {id: [\n")
    capsys.readouterr()
    assert main(["study", "create", str(run), "--design", "sr", "--questions", str(qf), "--out", str(tmp_path / "y")]) == 2
    assert "--questions: " in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["study", "create", str(tmp_path / "none"), "--design", "sr", "--out", str(tmp_path / "z")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_schema_version_recorded_and_a_newer_database_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    db = D.StudyDB(url)
    db.dispose()
    eng = D.make_engine(url)
    try:
        assert D.migrate(eng) == D.SCHEMA_VERSION  # idempotent on an up-to-date database
        with eng.begin() as c:
            assert D.schema_version(c) == D.SCHEMA_VERSION
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            c.execute(sa.update(D.meta_t).where(D.meta_t.c.key == "schema_version").values(value="99"))
        with pytest.raises(D.StudyDBError, match="schema version 99, newer"):
            D.migrate(eng)
    finally:
        eng.dispose()


def test_answers_frame_per_edit_and_choice_rows(run, tmp_path):
    st = B.create_study([run], "upr", tmp_path / "s", raters=2, upr_variant="choice", attention_checks=True)
    db = D.StudyDB.for_study(st.study_dir)
    items = _items(st.study_dir)
    try:
        r1 = items[(items.rater == "rater-01") & items.check_kind.isna()].iloc[0]
        db.save_answers("rater-01", r1.id, [("best", -1, 2.0)])
        with pytest.raises(D.AlreadyAnswered):
            db.save_answers("rater-01", r1.id, [("best", -1, 0.0)])
        with pytest.raises(D.StudyDBError, match="unknown item"):  # another rater's item
            db.save_answers("rater-02", r1.id, [("best", -1, 0.0)])
        brk = items[(items.rater == "rater-02") & (items.check_kind == "broken")].iloc[0]
        bslot = next(i for i, s in enumerate(brk.slots) if s["broken"])
        db.save_answers("rater-02", brk.id, [("best", -1, float(bslot))])
    finally:
        db.dispose()
    f = D.answers_frame(st.study_dir)
    assert list(f.columns[:13]) == ["rater", "item", "sample_id", "question", "method", "candidates", "value",
                                    "attention_check", "check_kind", "duplicate_of", "answered_at", "position",
                                    "presentation"]
    assert len(f) == 2
    a = f[f.rater == "rater-01"].iloc[0]
    assert a.method == r1.methods[2] and a.value == 1.0 and a.candidates == "|".join(sorted(METHODS))
    assert json.loads(a.presentation) == list(r1.methods) and a.position == r1.position and not a.attention_check
    b = f[f.rater == "rater-02"].iloc[0]
    assert b.attention_check and b.check_kind == "broken" and b.broken and b.method == brk.slots[bslot]["method"]
    assert json.loads(b.presentation)[bslot].startswith("broken:")


# ----------------------------------------------------------------------------------------------
# PostgreSQL by URL (where a server can be started here)
# ----------------------------------------------------------------------------------------------
def _pg_bin() -> Path | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL server (Debian's postgresql binaries), or skip."""
    pytest.importorskip("psycopg", reason="PostgreSQL test: the psycopg driver is not installed")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL test: no server binaries (apt-get install postgresql)")
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user, in a
        # folder that user can reach (pytest's tmp folders are private to root)
        if shutil.which("runuser") is None:
            pytest.skip("PostgreSQL test: running as root without runuser")
        root = Path(tempfile.mkdtemp(prefix="study-pg-"))
        shutil.chown(root, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    else:
        root = tmp_path_factory.mktemp("pg")
    data = root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "study", "--auth=trust", "-E",
                        "UTF8"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"PostgreSQL test: initdb failed: {r.stderr[-300:]}")
    r = subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "-l", str(root / "log"), "-w",
                        "start"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"PostgreSQL test: server did not start: {r.stderr[-300:]}")
    try:
        yield f"postgresql+psycopg://study@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        if run_as:
            shutil.rmtree(root, ignore_errors=True)


def test_postgresql_by_url(run, tmp_path, postgres):
    from harness.study.app import create_app

    st = B.create_study([run], "2afc", tmp_path / "s", raters=2, ours=METHODS[0], db_url=postgres, max_samples=1)
    assert not (st.study_dir / "study.sqlite").exists()
    assert json.loads((st.study_dir / "study.json").read_text())["db_url"] == postgres
    c = create_app(st.study_dir).test_client()
    tok = st.tokens["rater-01"]
    html = c.get(f"/r/{tok}").get_data(as_text=True)
    item = re.search(r'"item": "([0-9a-f]{16})"', html).group(1)
    r = c.post("/api/answer", json={"item": item, "answers": [{"question": "preference", "slot": None, "value": 1}]},
               headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200 and r.json["done"] == 1
    f = D.answers_frame(st.study_dir)
    assert len(f) == 1 and f.iloc[0]["item"] == item and f.iloc[0]["rater"] == "rater-01"
    with pytest.raises(B.StudyError, match="already holds a study"):
        B.create_study([run], "2afc", tmp_path / "s2", raters=1, ours=METHODS[0], db_url=postgres)


def test_sr_edits_per_item_splits_each_samples_methods(run, tmp_path):
    st = B.create_study([run], "sr", tmp_path / "s", raters=2, edits_per_item=2, seed=2)
    items = _items(st.study_dir)
    for rater, g in items.groupby("rater"):
        assert len(g) == B.per_rater_items_expected(3, 3, "sr", 2) == 6
        for sample, gs in g.groupby("sample_id"):
            assert sorted(len(m) for m in gs.methods) == [1, 2]
            assert sorted(m for ms in gs.methods for m in ms) == sorted(METHODS)  # each edit once
    with pytest.raises(B.StudyError, match="--edits-per-item 4 must lie in 1..3"):
        B.create_study([run], "sr", tmp_path / "t", edits_per_item=4)


def test_serve_a_missing_study_exits_2(tmp_path, capsys):
    assert main(["study", "serve", str(tmp_path / "none")]) == 2
    assert "no study.json" in capsys.readouterr().err
