"""A rater completes a short study of each design in a real Chromium (Playwright driving Debian's
chromium, never Playwright's own download) with the keyboard (and the mouse for one item),
reloads mid-way and resumes, and the database then holds exactly the answers typed. A screenshot
of each design's page is written under the test's tmp folder and, where the environment variable
EDIT_HARNESS_ARTEFACTS names a folder, to ``$EDIT_HARNESS_ARTEFACTS/study/<design>.png``."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.study import builder as B
from harness.study import db as D

from ._study_fixtures import METHODS, label_words, served, study_run

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium_path() -> str:
    for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if p and Path(p).is_file():
            return p
    pytest.skip("browser test: no system Chromium (make install puts Debian's chromium in /usr/bin/chromium)")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test: Playwright is not installed (pip install playwright)")
    exe = _chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return study_run(tmp_path_factory)


def _key_for(q: dict, n_slots: int, pos: int, slot: int, qi: int) -> tuple[str, int]:
    """The key a rater presses for a cell and the value it means (varied so that a mix-up of
    cells, slots or items would show in the database)."""
    if q["kind"] == "binary":
        return ("a", 1) if (pos + slot) % 2 == 0 else ("r", 0)
    if q["kind"] == "scale":
        v = q["min"] + (pos + slot + qi) % (q["max"] - q["min"] + 1)
        return ("0" if v == 10 else str(v)), v
    v = pos % n_slots
    if n_slots == 2:
        return ("ArrowLeft" if v == 0 else "ArrowRight"), v
    return str(v + 1), v


def _answer_current(page, pos: int, mouse: bool = False) -> dict[tuple[str, str, int], int]:
    """Answer the shown item cell by cell (keys, or clicks); returns what was answered."""
    data = page.evaluate("JSON.parse(document.getElementById('page-data').textContent)")
    qs = {q["id"]: (i, q) for i, q in enumerate(data["questions"])}
    out = {}
    for qid, slot in data["cells"]:
        qi, q = qs[qid]
        key, v = _key_for(q, data["slots"], pos, slot, qi)
        if mouse:
            page.click(f'.cell[data-question="{qid}"][data-slot="{slot}"] button[data-value="{v}"]')
        else:
            page.keyboard.press(key)
        out[(data["item"], qid, slot)] = v
    return out


def _expected_rows(expected: dict, questions: list[dict]) -> set[tuple]:
    kinds = {q["id"]: q["kind"] for q in questions}
    rows = set()
    for (item, qid, slot), v in expected.items():
        if kinds[qid] == "choice":  # answers_frame: the chosen slot, value 1
            rows.add((item, qid, v, 1.0))
        else:
            rows.add((item, qid, slot, float(v)))
    return rows


@pytest.mark.parametrize("design", ["sr", "upr", "mos", "2afc"])
def test_rater_completes_a_study_with_the_keyboard_and_resumes(browser, run, tmp_path, design):
    st = B.create_study([run], design, tmp_path / "study", raters=2, attention_checks=True, max_samples=2, seed=11,
                        ours=METHODS[0] if design == "2afc" else None)
    tok = st.tokens["rater-01"]
    db = D.StudyDB.for_study(st.study_dir)
    _, total = db.progress("rater-01")
    db.dispose()
    shot = tmp_path / f"{design}.png"
    expected: dict = {}
    with served(st.study_dir) as base:
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        hosts: set[str] = set()
        page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
        page.goto(f"{base}/r/{tok}")
        for pos in range(total):
            assert page.inner_text("#progress-text") == f"Item {pos + 1} of {total}"
            data = page.evaluate("JSON.parse(document.getElementById('page-data').textContent)")
            assert data["done"] == pos
            if pos == total // 2:
                # pause mid-item: half the cells answered, then the page reloaded: the same item
                # comes back, nothing of it saved
                page.keyboard.press(_key_for(data["questions"][0], data["slots"], pos, 0, 0)[0])
                page.reload()
                again = page.evaluate("JSON.parse(document.getElementById('page-data').textContent)")
                assert again["item"] == data["item"] and again["done"] == pos
                assert page.locator('button[aria-pressed="true"]').count() == 0
            assert page.is_disabled("#submit")
            got = _answer_current(page, pos, mouse=(pos == 0 and design == "sr"))
            expected.update(got)
            assert page.is_enabled("#submit")
            assert page.locator('button[aria-pressed="true"]').count() == len(got)
            if pos == 1:
                page.screenshot(path=str(shot), full_page=True)
            with page.expect_navigation():
                if pos == 0 and design == "sr":
                    page.click("#submit")
                else:
                    page.keyboard.press("Enter")
        assert "You have answered all" in page.inner_text("#done-message")
        page.reload()  # done stays done
        assert "You have answered all" in page.inner_text("#done-message")
        html = page.content()
        ctx.close()
    assert errors == []
    assert hosts == {base.split("/")[2]}  # nothing but the study server was asked for anything
    assert not any(w in html for w in label_words())
    f = D.answers_frame(st.study_dir)
    assert set(f.rater) == {"rater-01"} and f["item"].nunique() == total
    got_rows = {(r["item"], r["question"], int(r["slot"]), float(r["value"])) for r in f.to_dict("records")}
    assert len(f) == len(expected) and got_rows == _expected_rows(expected, st.meta["questions"])
    assert sorted(f.groupby("item").position.first()) == list(range(total))
    # and the answers summarise into the paper's table (harness/study/results.py)
    from harness.cli import main

    assert main(["study", "results", str(st.study_dir)]) == 0
    assert (st.study_dir / "results" / "results.md").is_file()
    art = os.environ.get("EDIT_HARNESS_ARTEFACTS")
    if art:
        dest = Path(art) / "study"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest / f"{design}.png")
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[0] == 1280 and im.size[1] >= 600
