"""report/index.html (harness/html_report.py): built from real runs through the CLI, parsed with
the standard library's html.parser and checked against the Markdown report, the edit cache and
the dataset; opened in headless Chromium where Playwright and a Chromium are installed."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness import html_report as H
from harness.cli import main
from harness.report import write_report

from .conftest import DatasetBuilder, textured

FAST = ["metrics=pixel", "progress=false"]
METHODS = "method=identity,inpaint,recolor"
SCRIPT = "<script>alert(1)</script>"


# --------------------------------------------------------------------------------------------
# a parsed index.html
# --------------------------------------------------------------------------------------------
class Page(HTMLParser):
    """Tables (with the report file they render), images, links, <details> and text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.imgs: list[dict] = []
        self.links: list[str] = []
        self.details: list[str] = []
        self.pres: list[str] = []
        self._pre: list[str] | None = None
        self.texts: list[str] = []
        self._file: list[str | None] = []  # data-file of the enclosing <div>s
        self._cell: list[str] | None = None
        self._marks: list[str] = []
        self._summary: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            self._file.append(a.get("data-file"))
        elif tag == "table":
            f = next((x for x in reversed(self._file) if x), None)
            self.tables.append({"file": f, "header": [], "rows": [], "marks": []})
        elif tag == "tr":
            self._row: list[str] = []
            self._row_marks: list[str | None] = []
        elif tag in ("td", "th"):
            self._cell = []
            self._marks = []
        elif tag in ("strong", "u") and self._cell is not None:
            self._marks.append(tag)
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "summary":
            self._summary = []
        elif tag == "pre":
            self._pre = []

    def handle_endtag(self, tag):
        if tag == "div" and self._file:
            self._file.pop()
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._row_marks.append(self._marks[0] if self._marks else None)
            self._cell = None
        elif tag == "tr":
            t = self.tables[-1]
            if not t["header"]:
                t["header"] = self._row
            else:
                t["rows"].append(self._row)
                t["marks"].append(self._row_marks)
        elif tag == "summary" and self._summary is not None:
            self.details.append("".join(self._summary))
            self._summary = None
        elif tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._summary is not None:
            self._summary.append(data)
        if self._pre is not None:
            self._pre.append(data)
        self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def md_tables(path: Path) -> list[dict]:
    """The pipe tables of a Markdown file, parsed here independently of harness.html_report:
    cells split on unescaped '|', then report.md_escape undone."""
    out, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            block = [lines[i]] + [ln for ln in _take_rows(lines, i + 2)]
            cells = [[c.replace("\\|", "|").replace("\\\\", "\\").strip()
                      for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])] for ln in block]
            out.append({"header": cells[0], "rows": cells[1:]})
            i += 1 + len(block)
            continue
        i += 1
    return out


def _take_rows(lines, start):
    for ln in lines[start:]:
        if not ln.startswith("|"):
            return
        yield ln


def _plain(cell: str) -> tuple[str, str | None]:
    """A Markdown cell's text and its mark (strong for **x**, u for <u>x</u>)."""
    if cell.startswith("**") and cell.endswith("**") and len(cell) > 4:
        return cell[2:-2], "strong"
    if cell.startswith("<u>") and cell.endswith("</u>"):
        return cell[3:-4], "u"
    return cell, None


def decode(uri: str) -> Image.Image:
    head, b64 = uri.split(",", 1)
    assert head in ("data:image/jpeg;base64", "data:image/png;base64"), head
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    """identity, inpaint and recolor on 3 samples of the embedded set, protocol pixel."""
    results = tmp_path_factory.mktemp("html_sample")
    assert main(["run", "-m", METHODS, f"results_dir={results}", "dataset.limit=3", *FAST]) == 0
    return results / "sample-pixel"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """A generic dataset whose manifest holds an id and texts with HTML in them: the bad id is a
    failed row whose reason quotes it; a good sample carries HTML in its instruction."""
    root = tmp_path_factory.mktemp("html_hostile")
    b = DatasetBuilder(root / "data", name="hostile")
    target = b.image("images/a_ok_target.png", textured(48, 64, seed=7))
    b.add_simple("a_ok", category="change_color", seed=1, instruction=f"make it {SCRIPT} blue", target=target)
    b.add_simple("b_ok", category="change_color", seed=2)
    b.add(id=SCRIPT, source="images/a_ok.png", category="change_color")
    assert main(["run", "-m", "method=identity,recolor", f"results_dir={root / 'results'}",
                 f"dataset.root={b.root}", "dataset.name=hostile", *FAST]) == 0
    return root / "results" / "hostile-pixel"


def _edits(run: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((run / "jobs").glob("*/edits.parquet"))], ignore_index=True)


def _page(run: Path) -> tuple[str, Page]:
    text = (run / "report" / "index.html").read_text(encoding="utf-8")
    return text, Page(text)


# --------------------------------------------------------------------------------------------
# the report of a real run
# --------------------------------------------------------------------------------------------
def test_run_writes_index_html_and_report_returns_it(sample_run, tmp_path):
    # the run's own end-of-run report wrote it; write_report returns it under "index.html"
    assert (sample_run / "report" / "index.html").is_file()
    files = write_report(sample_run, tmp_path / "r1")
    assert files["index.html"] == tmp_path / "r1" / "index.html"
    again = write_report(sample_run, tmp_path / "r2")["index.html"]
    # deterministic, and no path of the machine in it: another folder gives the same bytes
    assert files["index.html"].read_bytes() == again.read_bytes()
    assert str(tmp_path).encode() not in again.read_bytes()
    # and `edit-harness report` writes it too
    out = tmp_path / "cli"
    assert main(["report", str(sample_run), "--out", str(out)]) == 0
    assert (out / "index.html").read_bytes() == files["index.html"].read_bytes()


def test_every_markdown_table_is_in_the_html_with_the_same_rows(sample_run):
    _, page = _page(sample_run)
    report = sample_run / "report"
    for name in ("table.md", "table_by_category.md", "edits.md"):
        want = md_tables(report / name)
        got = [t for t in page.tables if t["file"] == name]
        assert len(got) == len(want) >= 1, name
        for w, g in zip(want, got):
            assert g["header"] == [h.replace("`", "") for h in w["header"]]
            assert len(g["rows"]) == len(w["rows"])
            for wrow, grow, gmarks in zip(w["rows"], g["rows"], g["marks"]):
                plain = [_plain(c) for c in wrow]
                assert grow == [p for p, _ in plain]
                assert gmarks == [m for _, m in plain]
    main_table = next(t for t in page.tables if t["file"] == "table.md")
    assert [r[0] for r in main_table["rows"]] == ["identity", "inpaint", "recolor"]
    # a value as table.md prints it (identity changes nothing: l1 0 with a [0, 0] interval)
    l1 = main_table["header"].index("l1 [all] ↓")
    assert main_table["rows"][0][l1] == "0 [0, 0]"
    edits_table = next(t for t in page.tables if t["file"] == "edits.md")
    ok, skipped = edits_table["header"].index("ok"), edits_table["header"].index("skipped")
    assert [(r[0], r[ok], r[skipped]) for r in edits_table["rows"]] == [
        ("identity", "3", "0"), ("inpaint", "1", "2"), ("recolor", "2", "1")]


def test_plots_and_links_resolve(sample_run):
    text, page = _page(sample_run)
    report = sample_run / "report"
    plots = sorted(p.name for p in report.glob("plot_*.png"))
    assert plots  # bar charts of l1, l2 and the cost columns
    srcs = [i["src"] for i in page.imgs if not i["src"].startswith("data:")]
    assert sorted(srcs) == plots
    for src in srcs:
        with Image.open(report / src) as im:
            assert im.size[0] > 100
    local = [h for h in page.links if not h.startswith("#")]
    assert local, "the Files section links the report's files"
    for href in local:
        assert not re.match(r"^[a-z]+://", href), href  # nothing on a server
        assert (report / unquote(href)).is_file(), href
    # every section anchor the navigation names exists
    for anchor in [h[1:] for h in page.links if h.startswith("#")]:
        assert f'id="{anchor}"' in text
    assert "table.csv" in local and "table.tex" in local and "edits.md" in local


def test_grid_images_decode_with_the_expected_size_and_content(sample_run):
    _, page = _page(sample_run)
    edits = _edits(sample_run)
    ok = edits[edits["status"] == "ok"]
    by_class: dict[str, list[dict]] = {}
    for img in page.imgs:
        if img["src"].startswith("data:"):
            by_class.setdefault(img["class"], []).append(img)
    # one source and one dataset mask per sample (all 3 are shown), one edit and one difference
    # map per ok edit; the method masks are those the cache holds
    cache_masks = sum((sample_run / "edits" / k[:2] / k / "mask.png").is_file() for k in ok["edit_key"])
    assert cache_masks == 3  # inpaint 1 + recolor 2 (identity uses no mask)
    assert len(by_class["source"]) == 3
    assert len(by_class["edit"]) == len(by_class["diff"]) == len(ok) == 6
    assert len(by_class["mask"]) == 3 + cache_masks
    assert sorted(i["data-edit-key"] for i in by_class["edit"]) == sorted(ok["edit_key"])
    for cls, imgs in by_class.items():
        for img in imgs:
            im = decode(img["src"])
            assert im.size == (int(img["width"]), int(img["height"]))
            assert max(im.size) <= H.THUMB_MAX_SIDE
    for img in by_class["edit"]:
        k = img["data-edit-key"]
        full = Image.open(sample_run / "edits" / k[:2] / k / "edit.png").convert("RGB")
        thumb = decode(img["src"]).convert("RGB")
        w, h = full.size
        # aspect kept to the pixel, longest side the cap (the sample images are larger than it)
        assert max(w, h) > H.THUMB_MAX_SIDE and max(thumb.size) == H.THUMB_MAX_SIDE
        assert abs(thumb.size[0] / thumb.size[1] - w / h) < 1.0 / min(thumb.size)
        # the pixels are this edit's: JPEG (quality 85) of a Lanczos thumbnail differs from a
        # box-filtered one by a few levels on average; another image differs by tens
        ref = np.asarray(full.resize(thumb.size, Image.Resampling.BOX), dtype=float)
        assert np.abs(np.asarray(thumb, dtype=float) - ref).mean() < 4.0
    # identity changes nothing: its difference maps are black (JPEG keeps a constant block exact)
    ident = set(ok[ok["method"] == "identity"]["edit_key"])
    for img in by_class["diff"]:
        d = np.asarray(decode(img["src"]).convert("L"))
        if img["data-edit-key"] in ident:
            assert d.max() == 0
        else:
            assert d.max() > 100  # recolor / inpaint changed the masked region
    assert "clipped at 255" in page.text and f"×{H.DIFF_GAIN}" in page.text


def test_skipped_edits_show_their_reasons_in_grid_and_edits_section(sample_run):
    text, page = _page(sample_run)
    edits = _edits(sample_run)
    skipped = edits[edits["status"] == "skipped"]
    assert len(skipped) == 3
    for reason in skipped["reason"]:
        assert f"skipped: {reason}" in page.text  # the grid card of that edit
    assert "Skipped and failed" in page.text  # edits.md's section of reasons
    assert text.count('class="status skipped"') == 3


def test_manifests_are_collapsible_details(sample_run):
    text, page = _page(sample_run)
    jobs = sorted(p.name for p in (sample_run / "jobs").iterdir())
    assert len(jobs) == 3
    summaries = [s for s in page.details if "/jobs/" in s]
    assert [s.split(" ")[0] for s in summaries] == [f"sample-pixel/jobs/{j}" for j in jobs]
    # each <details> holds its job's manifest, whole: the <pre> text parses back to the file's JSON
    shown = [json.loads(p) for p in page.pres]
    assert shown == [json.loads((sample_run / "jobs" / j / "manifest.json").read_text()) for j in jobs]
    counts = [m["outcome"]["counts"] for m in shown]
    assert [s.split(" ", 1)[1] for s in summaries] == [
        f"(ok {c['ok']}, skipped {c['skipped']}, failed {c['failed']})" for c in counts]
    assert text.count("<details><summary>") == 3


def test_user_text_is_escaped(hostile_run):
    text, page = _page(hostile_run)
    edits = _edits(hostile_run)
    failed = edits[edits["status"] == "failed"]
    assert len(failed) == 2 and all(SCRIPT in r for r in failed["reason"])  # the bad id, once per method
    # the only <script> element is the page's own sorting code; the planted ones are text
    assert text.lower().count("<script") == 1
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert SCRIPT in page.text  # shown, as text
    for reason in failed["reason"]:
        assert f"failed: {reason}" in page.text  # grid cards
    assert f"make it {SCRIPT} blue" in page.text  # the sample's instruction
    # and in the edits section's reasons
    assert page.text.count(SCRIPT) >= 4


def test_ground_truth_shown_and_diff_against_it(hostile_run, tmp_path):
    files = write_report(hostile_run, tmp_path / "r")
    page = Page(files["index.html"].read_text())
    assert [i.get("class") for i in page.imgs].count("target") == 1  # a_ok has a ground truth, b_ok none
    path = H.write_html_report(hostile_run, tmp_path / "r", files, diff_against="target")
    page = Page(path.read_text())
    edits = _edits(hostile_run).query("method == 'identity' and status == 'ok'")
    key = dict(zip(edits["sample_id"], edits["edit_key"]))
    diffs = {i["data-edit-key"]: i for i in page.imgs if i.get("class") == "diff"}
    # identity's edit is the source: against a_ok's ground truth the map is |source - target| x4
    # (computed here from the dataset files; 48x64 is below the thumbnail cap, so no resize)
    src = np.asarray(Image.open(hostile_run.parents[1] / "data" / "images" / "a_ok.png"), dtype=float)
    tgt = np.asarray(Image.open(hostile_run.parents[1] / "data" / "images" / "a_ok_target.png"), dtype=float)
    want = np.clip(np.rint(np.abs(src - tgt).mean(-1) * H.DIFF_GAIN), 0, 255)
    got = np.asarray(decode(diffs[key["a_ok"]]["src"]).convert("L"), dtype=float)
    assert got.shape == want.shape and want.mean() > 20  # the two images differ by their noise
    # JPEG (quality 85) of a map that is pure noise loses detail (about 5 levels per pixel here)
    # but keeps block means and the pattern: another reference would be off by ~35 on average
    assert abs(got.mean() - want.mean()) < 1.0
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9
    assert diffs[key["a_ok"]]["alt"].startswith("difference vs ground truth")
    # b_ok has no ground truth: against its source, identity's map is black
    assert np.asarray(decode(diffs[key["b_ok"]]["src"]).convert("L")).max() == 0
    assert diffs[key["b_ok"]]["alt"].startswith("difference vs source")
    assert "the source where a sample has none" in page.text
    with pytest.raises(ValueError, match="diff_against must be one of source, target"):
        H.write_html_report(hostile_run, tmp_path / "r", files, diff_against="gt")


def test_grid_cap_samples_evenly_and_says_how_many_were_left_out(sample_run, tmp_path):
    files = write_report(sample_run, tmp_path / "r")
    path = H.write_html_report(sample_run, tmp_path / "r", files, max_samples=2)
    page = Page(path.read_text(encoding="utf-8"))
    shown = [i for i in page.imgs if i.get("class") == "source"]
    assert len(shown) == 2
    assert "Showing 2 of 3 samples; 1 left out" in page.text
    ids = sorted(_edits(sample_run)["sample_id"].unique())
    heads = re.findall(r"<h3>sample / ([^ <]+)", path.read_text())
    assert heads == [ids[0], ids[2]]  # evenly spaced: first and last
    # the image budget caps too: 3 groups -> 3 + 9 = 12 images a sample, 30 allow 2
    path = H.write_html_report(sample_run, tmp_path / "r", files, max_images=30)
    assert "Showing 2 of 3 samples" in path.read_text()
    assert "at most 50 samples and 30 images (12 per sample here)" in path.read_text()
    # the default cap is what the docstring and the page say
    assert H.GRID_MAX_SAMPLES == 50 and H.GRID_MAX_IMAGES == 600


def test_unreachable_dataset_leaves_the_edits_and_says_so(sample_run, tmp_path):
    run = tmp_path / "sample-pixel"
    shutil.copytree(sample_run, run)
    for man in (run / "jobs").glob("*/manifest.json"):
        d = json.loads(man.read_text())
        d["config"]["dataset"]["root"] = str(tmp_path / "gone")
        d["config"]["cache_dir"] = str(tmp_path / "also-gone")  # falls back to the run's own edits/
        man.write_text(json.dumps(d))
    files = write_report(run, run / "report")
    text = files["index.html"].read_text()
    page = Page(text)
    cls = [i.get("class") for i in page.imgs if i["src"].startswith("data:")]
    assert cls.count("source") == 0 and cls.count("diff") == 0
    assert cls.count("edit") == 6 and cls.count("mask") == 3
    assert "Dataset 'sample' could not be opened here" in page.text
    assert "the grid shows the edits only" in page.text


def test_missing_cache_edit_is_named_not_fatal(sample_run, tmp_path):
    run = tmp_path / "sample-pixel"
    shutil.copytree(sample_run, run)
    ok = _edits(run).query("status == 'ok'")
    k = ok["edit_key"].iloc[0]
    shutil.rmtree(run / "edits" / k[:2] / k)
    for man in (run / "jobs").glob("*/manifest.json"):
        d = json.loads(man.read_text())
        d["config"]["cache_dir"] = str(run / "edits")
        man.write_text(json.dumps(d))
    page = Page(write_report(run, run / "report")["index.html"].read_text())
    assert [i.get("class") for i in page.imgs].count("edit") == 5
    assert "edit not found in the cache" in page.text


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------
def test_diff_map_values():
    src = np.zeros((4, 6, 3), np.uint8)
    edit = src.copy()
    edit[0, 0] = (30, 0, 0)       # mean 10 -> x4 = 40
    edit[1, 1] = (200, 200, 200)  # 200 x 4 clipped at 255
    d = H.diff_map(edit, src)
    assert d.shape == (4, 6) and d.dtype == np.uint8
    assert d[0, 0] == 40 and d[1, 1] == 255 and d.sum() == 40 + 255
    # a reference of another size is resized to the edit's size (a constant stays constant)
    big = np.full((8, 12, 3), 10, np.uint8)
    assert (H.diff_map(np.full((4, 6, 3), 13, np.uint8), big) == 12).all()


def test_pick_evenly():
    assert H.pick_evenly(3, 5) == [0, 1, 2]
    assert H.pick_evenly(10, 1) == [0]
    assert H.pick_evenly(10, 3) == [0, 4, 9] or H.pick_evenly(10, 3) == [0, 5, 9]
    idx = H.pick_evenly(1000, 50)
    assert len(idx) == 50 and idx[0] == 0 and idx[-1] == 999 and idx == sorted(set(idx))


def test_markdown_subset_escapes_and_keeps_marks():
    md = "\n".join([
        "# Title <b>",
        "",
        "- caption a_b_c",
        "  - nested `code`",
        "",
        "| Method | v |",
        "|---|---:|",
        r"| x \| y <i> | **0.5 [0.1, 0.9]** |",
        r"| back\\slash | <u>0.4</u> |",
        "",
        "_No scores._",
    ])
    out = H.markdown_to_html(md, level=3).replace("\n", "")
    assert "<h3>Title &lt;b&gt;</h3>" in out
    assert '<details class="caption">' in out and "<ul><li>caption a_b_c<ul><li>nested" in out
    assert out.index("</details>") < out.index("<table")  # the caption closes before the table
    assert "<code>code</code>" in out
    assert "<td>x | y &lt;i&gt;</td>" in out
    assert '<td class="num"><strong>0.5 [0.1, 0.9]</strong></td>' in out
    assert "<td>back\\slash</td>" in out and '<td class="num"><u>0.4</u></td>' in out
    assert "<p><em>No scores.</em></p>" in out
    assert H.split_row(r"| a \| b | c\\ |") == ["a | b", "c\\"]
    assert out.count("<ul>") == out.count("</ul>") == 2


# --------------------------------------------------------------------------------------------
# headless Chromium (where installed)
# --------------------------------------------------------------------------------------------
def _chromium() -> tuple[object, str | None]:
    """(playwright sync_playwright, Chromium executable or None for Playwright's own), or skip."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("headless Chromium test: Playwright is not installed (pip install playwright)")
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return sync_playwright, exe
    with sync_playwright() as p:
        if Path(p.chromium.executable_path).is_file():
            return sync_playwright, None
    pytest.skip("headless Chromium test: no Chromium found (apt-get install chromium, or playwright install chromium)")


def test_opens_in_headless_chromium_sorts_and_renders_every_image(sample_run, tmp_path):
    sync_playwright, exe = _chromium()
    index = sample_run / "report" / "index.html"
    shot = tmp_path / "shot.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(index.as_uri())
            page.wait_for_load_state("load")
            # every image (embedded or relative) decoded by the browser
            broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                                   ".map(i => i.alt)")
            n_img = page.evaluate("document.images.length")
            assert n_img == 3 + 3 + 6 + 3 + 6 + len(list(index.parent.glob("plot_*.png"))) and broken == []
            assert all(u.startswith(("file://", "data:")) for u in requests)  # no server, no network
            # sorting: the first table by its l1 [edited] column, ascending then descending
            table = page.locator("table.sortable").first
            col = page.evaluate("Array.from(document.querySelector('table.sortable').tHead.rows[0].cells)"
                                ".findIndex(c => c.textContent.startsWith('l1 [edited]'))")
            assert col > 0
            first = lambda: page.evaluate(  # noqa: E731
                "Array.from(document.querySelector('table.sortable').tBodies[0].rows).map(r => r.cells[0].textContent)")
            assert first() == ["identity", "inpaint", "recolor"]
            table.locator("thead th").nth(col).click()
            assert first() == ["identity", "inpaint", "recolor"]  # 0 < 0.2066 < 0.2532
            table.locator("thead th").nth(col).click()
            assert first() == ["recolor", "inpaint", "identity"]
            page.screenshot(path=str(shot), full_page=True)
            assert errors == []
        finally:
            browser.close()
    with Image.open(shot) as im:
        assert im.size[0] == 1280 and im.size[1] > 2000  # the whole page: tables, plots, grid


def test_comparison_of_two_runs_labels_each_column_with_its_run(sample_run, tmp_path):
    other_results = tmp_path / "results"
    assert main(["run", "method=identity", f"results_dir={other_results}", "run_name=other",
                 "dataset.limit=2", *FAST]) == 0
    other = other_results / "other"
    files = write_report([sample_run, other], tmp_path / "report-both")
    text = files["index.html"].read_text()
    page = Page(text)
    assert "edit-harness report: sample-pixel, other" in page.text
    labels = re.findall(r'<div class="label">([^<]*)</div>', text)
    assert {"other: identity", "sample-pixel: identity", "sample-pixel: recolor (space=lab, strength=0.8)"} <= set(labels)
    # 3 samples; `other` edited only the first 2, its card for the third says so
    assert text.count("no edit of this sample") == 1
    assert [i.get("class") for i in page.imgs].count("edit") == 6 + 2
    # the manifests of both runs' jobs
    assert sum(s.startswith("other/jobs/") for s in page.details) == 1
    assert sum(s.startswith("sample-pixel/jobs/") for s in page.details) == 3
