"""The study web app (harness/study/app.py) through Flask's test client: rater pages and answers,
anonymity of every page, URL and response, and bad requests rejected: unknown item, another
rater's item or token, out-of-range values, traversal attempts, oversized payloads, no token."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import sqlalchemy as sa

from harness.study import builder as B
from harness.study import db as D
from harness.study.app import MAX_PAYLOAD, SECURITY_HEADERS, create_app, required_cells

from ._study_fixtures import METHODS, label_words, study_run

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return study_run(tmp_path_factory)


@pytest.fixture(scope="module")
def studies(run, tmp_path_factory) -> dict[str, B.CreatedStudy]:
    root = tmp_path_factory.mktemp("app_studies")
    out = {}
    for design in ("sr", "upr", "mos", "2afc"):
        out[design] = B.create_study([run], design, root / design, raters=2, attention_checks=True, seed=5,
                                     ours=METHODS[1] if design == "2afc" else None)
    return out


def _client(st: B.CreatedStudy):
    return create_app(st.study_dir).test_client()


def _bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


class Links(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.urls: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.urls.append(v)


def page_data(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="page-data">(.*?)</script>', html, re.S).group(1))


def answers_for(data: dict, pick=lambda q, s: None) -> list[dict]:
    """A full, valid answer set for the page's item (``pick`` may override a value)."""
    qs = {q["id"]: q for q in data["questions"]}
    out = []
    for qid, slot in data["cells"]:
        q = qs[qid]
        v = pick(q, slot)
        if v is None:
            v = {"binary": 1, "scale": q.get("min", 0), "choice": 0}[q["kind"]]
        out.append({"question": qid, "slot": None if slot == -1 else slot, "value": v})
    return out


def _item_rows(st: B.CreatedStudy, rater: str) -> list[dict]:
    eng = D.make_engine(D.sqlite_url(st.study_dir))
    try:
        with eng.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.select(D.items_t).where(D.items_t.c.rater == rater)
                                                        .order_by(D.items_t.c.position))]
    finally:
        eng.dispose()


@pytest.mark.parametrize("design", ["sr", "upr", "mos", "2afc"])
def test_a_rater_answers_every_item_and_no_response_names_a_method(studies, design):
    st = studies[design]
    c = _client(st)
    tok = st.tokens["rater-01"]
    seen: list[str] = []
    bodies: list[str] = []
    items = _item_rows(st, "rater-01")
    for k in range(len(items)):
        r = c.get(f"/r/{tok}")
        assert r.status_code == 200
        html = r.get_data(as_text=True)
        bodies.append(html)
        data = page_data(html)
        # the next unanswered item by position, with its slots in the recorded order
        assert data["item"] == items[k]["id"] and data["done"] == k and data["total"] == len(items)
        slots = json.loads(items[k]["slots"])
        imgs = [u for u in Links(html).urls if u.startswith("/image/")]
        assert imgs == [f"/image/{items[k]['source_image']}"] + [f"/image/{s['image']}" for s in slots]
        assert data["cells"] == [list(x) for x in required_cells(st.meta["questions"], len(slots))]
        for u in Links(html).urls:
            resp = c.get(u)
            assert resp.status_code == 200, u
            seen.append(u)
            if not u.startswith("/image/"):
                bodies.append(resp.get_data(as_text=True))
        r = c.post("/api/answer", json={"item": data["item"], "answers": answers_for(data)}, headers=_bearer(tok))
        assert r.status_code == 200 and r.json == {"ok": True, "done": k + 1, "total": len(items)}
        bodies.append(r.get_data(as_text=True))
    r = c.get(f"/r/{tok}")
    assert r.status_code == 200 and "You have answered all" in r.get_data(as_text=True)
    bodies.append(r.get_data(as_text=True))
    bodies.append(c.get("/api/progress", headers=_bearer(tok)).get_data(as_text=True))
    bodies.append(c.get(f"/admin/{st.admin_token}").get_data(as_text=True))
    # anonymity: no method label, nor a distinctive part of one, in any page, URL or response
    for text in bodies + seen:
        for w in label_words():
            assert w not in text, (w, text[:200])
    f = D.answers_frame(st.study_dir)
    assert set(f.rater) == {"rater-01"} and f["item"].nunique() == len(items)
    assert len(f) == sum(len(required_cells(st.meta["questions"], len(json.loads(i["slots"])))) for i in items)


def test_resume_shows_the_first_unanswered_item_and_other_raters_are_separate(studies):
    st = studies["upr"]
    c = _client(st)
    t1, t2 = st.tokens["rater-02"], st.tokens["rater-01"]
    d1 = page_data(c.get(f"/r/{t1}").get_data(as_text=True))
    again = page_data(c.get(f"/r/{t1}").get_data(as_text=True))
    assert again["item"] == d1["item"]  # a reload (pause, resume) shows the same unanswered item
    assert c.post("/api/answer", json={"item": d1["item"], "answers": answers_for(d1)}, headers=_bearer(t1)).status_code == 200
    d2 = page_data(c.get(f"/r/{t1}").get_data(as_text=True))
    assert d2["item"] != d1["item"] and d2["done"] == 1
    # progress is per rater
    assert c.get("/api/progress", headers=_bearer(t1)).json["done"] == 1
    other = c.get("/api/progress", headers=_bearer(t2)).json
    assert other["done"] in (0, other["total"])  # untouched here (or finished by another test)


def test_bad_answers_are_rejected_and_nothing_is_written(studies):
    st = studies["mos"]
    c = _client(st)
    tok, other_tok = st.tokens["rater-02"], st.tokens["rater-01"]
    data = page_data(c.get(f"/r/{tok}").get_data(as_text=True))
    other_item = _item_rows(st, "rater-01")[-1]["id"]
    good = answers_for(data)
    h = _bearer(tok)
    cases = {
        "unknown item": ({"item": "0" * 16, "answers": good}, h, 404),
        "malformed item id": ({"item": "../../x", "answers": good}, h, 404),
        "another rater's item": ({"item": other_item, "answers": good}, h, 404),
        "another rater's token": ({"item": data["item"], "answers": good}, _bearer(other_tok), 404),
        "score above range": ({"item": data["item"], "answers": answers_for(data, lambda q, s: 7)}, h, 400),
        "score below range": ({"item": data["item"], "answers": answers_for(data, lambda q, s: 0)}, h, 400),
        "fractional score": ({"item": data["item"], "answers": answers_for(data, lambda q, s: 2.5)}, h, 400),
        "boolean score": ({"item": data["item"], "answers": answers_for(data, lambda q, s: True)}, h, 400),
        "string score": ({"item": data["item"], "answers": answers_for(data, lambda q, s: "3")}, h, 400),
        "unknown question": ({"item": data["item"], "answers": [{**good[0], "question": "nope"}] + good[1:]}, h, 400),
        "missing answer": ({"item": data["item"], "answers": good[:-1]}, h, 400),
        "duplicate answer": ({"item": data["item"], "answers": good[:-1] + good[:1]}, h, 400),
        "slot out of range": ({"item": data["item"], "answers": [{**good[0], "slot": 5}] + good[1:]}, h, 400),
        "extra field": ({"item": data["item"], "answers": good, "rater": "rater-01"}, h, 400),
        "answers not a list": ({"item": data["item"], "answers": {"a": 1}}, h, 400),
        "missing token": ({"item": data["item"], "answers": good}, {}, 401),
        "unknown token": ({"item": data["item"], "answers": good}, _bearer("x" * 32), 401),
        "admin token is not a rater": ({"item": data["item"], "answers": good}, _bearer(st.admin_token), 401),
        "basic auth": ({"item": data["item"], "answers": good}, {"Authorization": f"Basic {tok}"}, 401),
    }
    for name, (body, headers, code) in cases.items():
        r = c.post("/api/answer", json=body, headers=headers)
        assert r.status_code == code, (name, r.status_code, r.get_data(as_text=True))
        assert set(r.json) == {"error"}, name
    r = c.post("/api/answer", data="item=x", headers={**h, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = c.post("/api/answer", data="{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400
    big = json.dumps({"item": data["item"], "answers": good, "pad": "x" * MAX_PAYLOAD})
    r = c.post("/api/answer", data=big, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert len(D.answers_frame(st.study_dir).query("rater == 'rater-02'")) == 0  # nothing was written
    # the good answer is accepted once; re-submitting the item is refused, the first answer kept
    assert c.post("/api/answer", json={"item": data["item"], "answers": good}, headers=h).status_code == 200
    r = c.post("/api/answer", json={"item": data["item"], "answers": answers_for(data, lambda q, s: 6)}, headers=h)
    assert r.status_code == 409
    f = D.answers_frame(st.study_dir).query("rater == 'rater-02'")
    assert len(f) == 4 and (f.value == 1).all()


def test_choice_values_range_over_the_slots(studies):
    st = studies["2afc"]
    c = _client(st)
    tok = st.tokens["rater-02"]
    data = page_data(c.get(f"/r/{tok}").get_data(as_text=True))
    assert data["slots"] == 2 and data["slot_names"] == ["Left", "Right"]
    for bad in (2, -1):
        r = c.post("/api/answer", json={"item": data["item"], "answers": answers_for(data, lambda q, s: bad)},
                   headers=_bearer(tok))
        assert r.status_code == 400
    ans = [{"question": "preference", "slot": 0, "value": 1}]  # a choice is about the item, not a slot
    assert c.post("/api/answer", json={"item": data["item"], "answers": ans}, headers=_bearer(tok)).status_code == 400
    ans = [{"question": "preference", "slot": None, "value": 1}]
    assert c.post("/api/answer", json={"item": data["item"], "answers": ans}, headers=_bearer(tok)).status_code == 200
    f = D.answers_frame(st.study_dir).query("rater == 'rater-02'")
    slots = json.loads(_item_rows(st, "rater-02")[0]["slots"])
    assert len(f) == 1 and f.iloc[0].method == slots[1]["method"] and f.iloc[0].value == 1.0


@pytest.mark.parametrize("path", [
    "/image/../../etc/passwd", "/image/..%2f..%2fetc%2fpasswd", "/image/%2e%2e/%2e%2e/etc/passwd",
    "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/image/..%5c..%5cstudy.json", "/image/....//....//etc/passwd",
    "/image/" + "0" * 32, "/image/" + "A" * 32, "/image/study.json", "/image/../study.json", "/static/../study.json",
    "/static/..%2fstudy.json", "/static/%2e%2e/app.py", "/images/x.png", "/study.sqlite", "/r/", "/admin/",
    "/image/%00", "/image/" + "a" * 31 + "%00",
])
def test_traversal_and_unknown_paths_are_404(studies, path):
    st = studies["sr"]
    c = _client(st)
    r = c.get(path)
    assert r.status_code in (404, 405), path
    body = r.get_data()
    assert b"root:" not in body and b'"design"' not in body and b"SQLite" not in body


def test_images_served_by_id_only_with_headers(studies):
    st = studies["sr"]
    c = _client(st)
    some = next((st.study_dir / "images").glob("*.png"))
    r = c.get(f"/image/{some.stem}")
    assert r.status_code == 200 and r.mimetype == "image/png" and r.data == some.read_bytes()
    for k, v in SECURITY_HEADERS.items():
        assert r.headers[k] == v
    page = c.get(f"/r/{st.tokens['rater-02']}")
    assert page.headers["Cache-Control"] == "no-store" and page.headers["Referrer-Policy"] == "no-referrer"


def test_unknown_tokens_and_admin_view(studies):
    st = studies["sr"]
    c = _client(st)
    assert c.get("/r/not-a-token").status_code == 401
    assert c.get("/r/" + "x" * 500).status_code == 401
    assert c.get(f"/admin/{st.tokens['rater-01']}").status_code == 401  # a rater is not the admin
    assert c.get("/admin/wrong").status_code == 401
    assert c.get("/api/progress").status_code == 401
    r = c.get(f"/admin/{st.admin_token}")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    rows = re.findall(r"<tr><td>(rater-\d+)</td><td>(\d+)</td><td>(\d+)</td>", html)
    prog = {p["rater"]: p for p in D.StudyDB.for_study(st.study_dir).rater_progress()}
    assert [r[0] for r in rows] == ["rater-01", "rater-02"]
    assert all(int(d) == prog[rt]["done"] and int(t) == prog[rt]["total"] for rt, d, t in rows)
    # the admin page shows progress, not answers: no question id or answer value column
    assert "satisfaction" not in html and "value" not in html.lower()


def test_text_is_escaped(run, tmp_path):
    st = B.create_study([run], "sr", tmp_path / "s", raters=1, max_samples=1,
                        questions=[{"id": "ok", "text": f"Is it {SCRIPT} fine?", "kind": "binary"}])
    eng = D.make_engine(D.sqlite_url(st.study_dir))
    with eng.begin() as c:  # hostile dataset texts (they come from the user's dataset)
        c.execute(sa.update(D.items_t).values(texts=json.dumps([["Instruction", f"make it {SCRIPT} blue"]])))
    eng.dispose()
    html = _client(st).get(f"/r/{st.tokens['rater-01']}").get_data(as_text=True)
    assert SCRIPT not in html
    assert "make it &lt;script&gt;alert(1)&lt;/script&gt; blue" in html
    assert "Is it &lt;script&gt;alert(1)&lt;/script&gt; fine?" in html
    assert page_data(html)["questions"][0]["text"] == f"Is it {SCRIPT} fine?"  # JSON block: escaped, decodes back


def test_create_answer_and_results_through_the_cli(run, tmp_path, capsys):
    from harness.cli import main

    study = tmp_path / "s"
    assert main(["study", "create", str(run), "--design", "sr", "--raters", "2", "--out", str(study)]) == 0
    links = re.findall(r"/r/(\S+)", capsys.readouterr().out)
    c = create_app(study).test_client()
    for tok in links:
        while (r := c.get(f"/r/{tok}")) and "page-data" in r.get_data(as_text=True):
            data = page_data(r.get_data(as_text=True))
            ans = answers_for(data, lambda q, s: s % 2)  # accept the first edit shown, reject the second ...
            assert c.post("/api/answer", json={"item": data["item"], "answers": ans}, headers=_bearer(tok)).status_code == 200
    f = D.answers_frame(study)
    assert len(f) == 2 * 3 * 3 and set(f.value) == {0.0, 1.0}
    assert (f.value == (f.slot % 2).astype(float)).all()
    capsys.readouterr()
    assert main(["study", "results", str(study)]) == 0
    out = capsys.readouterr().out
    assert "SR: success rate" in out and (study / "results" / "results.md").is_file()
    # the CLI's SR per method = accepted / shown, recomputed here from the answers
    sr = f.groupby(["method", "rater"]).value.mean().groupby("method").mean() * 100
    for m, v in sr.items():
        assert re.search(rf"{re.escape(m)}\s+{v:.2f}", out) or re.search(rf"{re.escape(m)}\s+{v:.4g}", out), (m, v, out)
