"""The papers' figures, checked for their data: ZONE's CLIP-I vs CLIP-T per category (the
lines' points are the per-category means), ablation bars and sweep curves (bar heights are the
means, error bars span the 95% CI bounds of the summary), and qualitative grids (one axes per
cell, each holding the source / edit / target pixels downscaled), as PNG and multi-page PDF."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.aggregate import expand_params, summarize
from harness.plots import (
    CATEGORY_MARKERS, Grid, figure_ablation, figure_clip_tradeoff, figure_grid, figure_metric_vs_param,
    figures_for_run, qualitative_grid, write_grid,
)

from .test_plots import _outside

CATS = ("add", "change_color", "remove")


def _scores(values: dict[tuple[str, str, str, str], list[float]]) -> pd.DataFrame:
    """Per-sample score rows from {(method, params, category, metric): values}."""
    rows = []
    for (method, params, cat, metric), vals in values.items():
        for i, v in enumerate(vals):
            rows.append(dict(run="r", method=method, params=params, dataset="d", sample_id=f"{cat}_{i}",
                             category=cat, metric=metric, region="all", value=v, higher_is_better=True,
                             protocol="zone", weights="w", region_rule="area", flag=""))
    return pd.DataFrame(rows)


def _clip_values() -> dict:
    rng = np.random.default_rng(3)
    vals = {}
    for mi, method in enumerate(("zone", "ip2p")):
        for ci, cat in enumerate(CATS):
            vals[(method, "{}", cat, "clip_i")] = list(0.6 + 0.1 * mi + 0.05 * ci + 0.02 * rng.random(5))
            vals[(method, "{}", cat, "clip_t")] = list(0.2 + 0.01 * mi + 0.02 * ci + 0.01 * rng.random(5))
    vals[("ip2p", "{}", "remove", "clip_t")] = [math.nan] * 5  # no finite CLIP-T in remove: not joined
    vals[("blank", "{}", "add", "clip_i")] = [math.nan] * 3  # no finite point at all: left out
    vals[("blank", "{}", "add", "clip_t")] = [0.3] * 3
    return vals


def _errorbar_segments(ax) -> list[np.ndarray]:
    """The segments of every error-bar LineCollection of ``ax`` (each (2, 2): two ends)."""
    from matplotlib.collections import LineCollection

    return [np.asarray(seg) for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]


def test_clip_tradeoff_points_are_the_per_category_means_and_error_bars_the_ci():
    vals = _clip_values()
    s = summarize(_scores(vals), ["method", "params"], per_category=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig, skipped, reason = figure_clip_tradeoff(s)
    assert reason is None
    assert skipped == ["blank: no category with finite clip_t and clip_i"]
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    # one joining line per method (legend with n), one proxy marker per category
    assert sorted(lines) == ["category: add", "category: change_color", "category: remove", "ip2p [n=5]",
                             "zone [n=5]"]
    for method, cats in (("zone", CATS), ("ip2p", CATS[:2])):
        ln = lines[f"{method} [n=5]"]
        want_x = [float(np.mean(vals[(method, "{}", c, "clip_t")])) for c in cats]
        want_y = [float(np.mean(vals[(method, "{}", c, "clip_i")])) for c in cats]
        # tolerance: summarize's np.mean of the same values, the same sum in the same order
        np.testing.assert_allclose(ln.get_xdata(), want_x, rtol=0, atol=1e-12)
        np.testing.assert_allclose(ln.get_ydata(), want_y, rtol=0, atol=1e-12)
    # category markers: the same marker for the same category in every method
    markers = {(float(ln.get_xdata()[0]), float(ln.get_ydata()[0])): ln.get_marker() for ln in ax.get_lines()
               if ln.get_label().startswith("_") and len(ln.get_xdata()) == 1}
    assert len(markers) == 5  # 3 zone points + 2 ip2p points
    for method, cats in (("zone", CATS), ("ip2p", CATS[:2])):
        for i, c in enumerate(cats):
            xy = (float(np.mean(vals[(method, "{}", c, "clip_t")])), float(np.mean(vals[(method, "{}", c, "clip_i")])))
            got = [mk for k, mk in markers.items() if np.allclose(k, xy, rtol=0, atol=1e-12)]
            assert got == [CATEGORY_MARKERS[i]]
            assert lines[f"category: {c}"].get_marker() == CATEGORY_MARKERS[i]
    # error bars: for every drawn point a vertical bar [ci_low, ci_high] of clip_i and a horizontal one of clip_t
    segs = _errorbar_segments(ax)
    assert len(segs) == 10
    for method, cats in (("zone", CATS), ("ip2p", CATS[:2])):
        for c in cats:
            ri = s[(s.method == method) & (s.category == c) & (s.metric == "clip_i")].iloc[0]
            rt = s[(s.method == method) & (s.category == c) & (s.metric == "clip_t")].iloc[0]
            vert = [g for g in segs if g[0, 0] == g[1, 0] == rt["mean"]]
            horiz = [g for g in segs if g[0, 1] == g[1, 1] == ri["mean"]]
            assert len(vert) == 1 and len(horiz) == 1
            np.testing.assert_allclose(sorted(vert[0][:, 1]), [ri["ci_low"], ri["ci_high"]], rtol=0, atol=1e-12)
            np.testing.assert_allclose(sorted(horiz[0][:, 0]), [rt["ci_low"], rt["ci_high"]], rtol=0, atol=1e-12)
    assert _outside(fig) == []
    title = ax.get_title().replace("\n", " ")
    assert "upper right is better" in title and "one line per method" in title


def test_clip_tradeoff_category_order_and_missing_metric():
    vals = _clip_values()
    s = summarize(_scores(vals), ["method", "params"], per_category=True)
    fig, _, _ = figure_clip_tradeoff(s, categories=["remove", "add", "change_color"], intervals=False)
    ln = next(x for x in fig.axes[0].get_lines() if x.get_label() == "zone [n=5]")
    want = [float(np.mean(vals[("zone", "{}", c, "clip_t")])) for c in ("remove", "add", "change_color")]
    np.testing.assert_allclose(ln.get_xdata(), want, rtol=0, atol=1e-12)
    assert _errorbar_segments(fig.axes[0]) == []
    with pytest.raises(ValueError, match=r"categories \['move'\] have no clip_t/clip_i rows"):
        figure_clip_tradeoff(s, categories=["move"])
    no_t = s[s.metric != "clip_t"]
    fig, skipped, reason = figure_clip_tradeoff(no_t)
    assert fig is None and reason == "no clip_t rows in region all"
    fig, _, reason = figure_clip_tradeoff(summarize(_scores(vals), ["method", "params"]))
    assert fig is None and "per_category=True" in reason


def _bar_heights_and_errors(ax):
    out = []
    for cont in ax.containers:
        if hasattr(cont, "patches"):
            heights = [p.get_height() for p in cont.patches]
            xs = [p.get_x() + p.get_width() / 2 for p in cont.patches]
            segs = cont.errorbar.lines[2][0].get_segments() if cont.errorbar is not None else []
            out.append((cont.get_label(), xs, heights, [np.asarray(g) for g in segs]))
    return out


def test_ablation_bars_are_the_means_with_ci_error_bars_by_category():
    vals = {}
    for k, strength in enumerate((0.25, 0.5, 1.0)):
        for ci, cat in enumerate(CATS):
            vals[("recolor", json.dumps({"strength": strength}), cat, "clip_i")] = [0.5 + 0.1 * k + 0.03 * ci,
                                                                                     0.52 + 0.1 * k, 0.47 + 0.01 * ci]
    s = summarize(_scores(vals), ["method", "params"], per_category=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig, skipped, reason = figure_ablation(s, "clip_i", by_category=True)
    assert reason is None and skipped == []
    assert _outside(fig) == []
    (ax,) = fig.axes
    bars = _bar_heights_and_errors(ax)
    assert [b[0] for b in bars] == ["recolor (strength=0.25) [n=3]", "recolor (strength=0.5) [n=3]",
                                   "recolor (strength=1.0) [n=3]"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CATS)
    for k, (label, xs, heights, segs) in enumerate(bars):
        params = json.dumps({"strength": (0.25, 0.5, 1.0)[k]})
        want = [float(np.mean(vals[("recolor", params, c, "clip_i")])) for c in CATS]
        np.testing.assert_allclose(heights, want, rtol=0, atol=1e-12)
        assert len(segs) == 3
        for j, c in enumerate(CATS):
            r = s[(s.params == params) & (s.category == c)].iloc[0]
            assert segs[j][0, 0] == pytest.approx(xs[j], abs=1e-12)
            np.testing.assert_allclose(sorted(segs[j][:, 1]), [r["ci_low"], r["ci_high"]], rtol=0, atol=1e-12)
    # explicit bar order and choice
    fig, _, _ = figure_ablation(s, "clip_i", by_category=True,
                                groups=["recolor (strength=1.0)", "recolor (strength=0.25)"])
    assert [b[0] for b in _bar_heights_and_errors(fig.axes[0])] == ["recolor (strength=1.0) [n=3]",
                                                                    "recolor (strength=0.25) [n=3]"]
    with pytest.raises(ValueError, match=r"groups \['recolor \(strength=2\)'\] not in the clip_i \[all\] rows"):
        figure_ablation(s, "clip_i", groups=["recolor (strength=2)"], by_category=True)
    # without categories: one cluster, one bar per parameter point, the overall means
    s_all = summarize(_scores(vals), ["method", "params"])
    fig, _, _ = figure_ablation(s_all, "clip_i")
    heights = [b[2][0] for b in _bar_heights_and_errors(fig.axes[0])]
    want = [float(np.mean([v for c in CATS for v in vals[("recolor", json.dumps({"strength": st}), c, "clip_i")]]))
            for st in (0.25, 0.5, 1.0)]
    np.testing.assert_allclose(heights, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ci_style", ["bars", "band"])
def test_metric_vs_param_draws_the_ci(ci_style):
    vals = {("recolor", json.dumps({"strength": st}), "add", "l1"): [0.1 * st, 0.1 * st + 0.02, 0.1 * st + 0.05]
            for st in (1, 2, 4)}
    sp = expand_params(summarize(_scores(vals), ["method", "params"]))
    fig, _, reason = figure_metric_vs_param(sp, "l1", "all", "strength", ci_style=ci_style)
    assert reason is None
    ax = fig.axes[0]
    (ln,) = [x for x in ax.get_lines() if x.get_label() == "recolor [n=3]"]
    np.testing.assert_array_equal(ln.get_xdata(), [1, 2, 4])
    rows = sp.sort_values("p.strength")
    np.testing.assert_allclose(ln.get_ydata(), rows["mean"], rtol=0, atol=1e-12)
    if ci_style == "bars":
        segs = _errorbar_segments(ax)
        assert len(segs) == 3
        for g, (_, r) in zip(sorted(segs, key=lambda g: g[0, 0]), rows.iterrows()):
            assert g[0, 0] == r["p.strength"]
            np.testing.assert_allclose(sorted(g[:, 1]), [r["ci_low"], r["ci_high"]], rtol=0, atol=1e-12)
        assert "error bars = 95%" in ax.get_title().replace("\n", " ")
    else:
        (band,) = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
        v = band.get_paths()[0].vertices
        for _, r in rows.iterrows():
            ys = v[np.isclose(v[:, 0], r["p.strength"]), 1]
            np.testing.assert_allclose([ys.min(), ys.max()], [r["ci_low"], r["ci_high"]], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="ci_style must be one of band, bars"):
        figure_metric_vs_param(sp, "l1", "all", "strength", ci_style="dots")


# ------------------------------------------------------------------------------------------------
# qualitative grids from a run on disk
# ------------------------------------------------------------------------------------------------
def _img(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _thumb(img: np.ndarray, max_side: int) -> np.ndarray:
    """The grid's downscaling, written out independently: longest side to max_side, Lanczos."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    f = max_side / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                  Image.Resampling.LANCZOS))


def _make_run(tmp_path: Path, with_clip: bool = True) -> tuple[Path, dict]:
    """A dataset folder (3 samples, one with a target) and a run with two methods (recolor at two
    strengths, inpaint), their edits in the run's cache, and clip_i / clip_t scores."""
    ds = tmp_path / "ds"
    (ds / "img").mkdir(parents=True)
    srcs = {"s1": _img(300, 200, 1), "s2": _img(120, 160, 2), "s3": _img(64, 64, 3)}
    tgt = _img(300, 200, 9)
    lines = []
    for sid, a in srcs.items():
        Image.fromarray(a).save(ds / "img" / f"{sid}.png")
        rec = {"id": sid, "source": f"img/{sid}.png", "category": {"s1": "add", "s2": "remove", "s3": "add"}[sid],
               "target_caption": "x"}
        if sid == "s1":
            Image.fromarray(tgt).save(ds / "img" / "s1_t.png")
            rec["target"] = "img/s1_t.png"
        lines.append(json.dumps(rec))
    (ds / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "results" / "run"
    dataset_cfg = {"format": "generic", "root": str(ds), "name": "mini", "manifest": "manifest.jsonl"}
    edits_img = {}
    jobs = {"recolor-a": ("recolor", '{"strength": 0.5}'), "recolor-b": ("recolor", '{"strength": 1.0}'),
            "inpaint-a": ("inpaint", '{"radius": 3}')}
    for j, (job, (method, params)) in enumerate(jobs.items()):
        jd = run / "jobs" / job
        jd.mkdir(parents=True)
        (jd / "manifest.json").write_text(json.dumps({"job": job, "config": {"dataset": dataset_cfg,
                                                                              "cache_dir": None}}))
        erows, srows = [], []
        for i, sid in enumerate(srcs):
            key = f"{j:02d}{i:02d}" + "ab" * 10
            status = "skipped" if (method == "inpaint" and sid == "s2") else "ok"
            if status == "ok":
                e = _img(*srcs[sid].shape[:2], seed=100 + 10 * j + i)
                edits_img[(job, sid)] = e
                (run / "edits" / key[:2] / key).mkdir(parents=True)
                Image.fromarray(e).save(run / "edits" / key[:2] / key / "edit.png")
            cat = json.loads(lines[i])["category"]
            erows.append(dict(run="run", job=job, method=method, params=params, dataset="mini", sample_id=sid,
                              category=cat, seed=0, edit_key=key, status=status,
                              reason="method 'inpaint' needs field 'mask' of sample s2" if status != "ok" else None))
            if status == "ok" and with_clip:
                for metric, base in (("clip_i", 0.8), ("clip_t", 0.25)):
                    srows.append(dict(run="run", job=job, method=method, params=params, dataset="mini",
                                      sample_id=sid, category=cat, seed=0, edit_key=key, metric=metric, region="all",
                                      value=base + 0.01 * j + 0.003 * i, flag="", protocol="zone", weights="w",
                                      region_rule="area", higher_is_better=True))
        pd.DataFrame(erows).to_parquet(jd / "edits.parquet")
        if srows:
            pd.DataFrame(srows).to_parquet(jd / "scores.parquet")
    return run, {"srcs": srcs, "target": tgt, "edits": edits_img}


def _cell_pixels(ax) -> np.ndarray | None:
    ims = ax.get_images()
    return None if not ims else np.asarray(ims[0].get_array())


def test_grid_cells_hold_the_downscaled_source_edit_and_target_pixels(tmp_path):
    run, data = _make_run(tmp_path)
    g = qualitative_grid(run)  # defaults: every method in table order, first samples by id
    assert g.rows == ["s1", "s2", "s3"]
    assert g.columns == ["source", "inpaint", "recolor (strength=0.5)", "recolor (strength=1.0)", "target"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = figure_grid(g, max_side=100)
    assert len(fig.axes) == 3 * 5
    assert _outside(fig) == []  # titles, row labels and the notes of empty cells lie inside
    col_job = {1: "inpaint-a", 2: "recolor-a", 3: "recolor-b"}
    for r, sid in enumerate(g.rows):
        for c in range(5):
            ax = fig.axes[r * 5 + c]
            assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
            got = _cell_pixels(ax)
            if c == 0:
                want = data["srcs"][sid]
            elif c == 4:
                want = data["target"] if sid == "s1" else None
            else:
                want = data["edits"].get((col_job[c], sid))
            if want is None:
                assert got is None
                note = " ".join(t.get_text() for t in ax.texts).replace("\n", " ")
                want_note = "no target" if c == 4 else "skipped: method 'inpaint' needs field 'mask' of sample s2"
                assert note == want_note
            else:
                np.testing.assert_array_equal(got, _thumb(want, 100))
        assert fig.axes[r * 5].get_ylabel() == sid
    titles = [fig.axes[c].get_title().replace("\n", " ") for c in range(5)]
    assert titles == ["source", "inpaint", "recolor (strength=0.5)", "recolor (strength=1.0)", "target"]
    # s1 (300x200) was downscaled to 100x67; s3 (64x64) kept as is
    assert _cell_pixels(fig.axes[0]).shape == (100, 67, 3) and _cell_pixels(fig.axes[10]).shape == (64, 64, 3)


def test_grid_method_order_and_sample_choice_are_configurable(tmp_path):
    run, data = _make_run(tmp_path)
    g = qualitative_grid(run, methods=["recolor", "inpaint"], sample_ids=["s3", "s1"], target=False)
    assert g.rows == ["s3", "s1"]
    assert g.columns == ["source", "recolor (strength=0.5)", "recolor (strength=1.0)", "inpaint"]
    np.testing.assert_array_equal(g.cells[0][3].image, data["edits"][("inpaint-a", "s3")])
    np.testing.assert_array_equal(g.cells[1][0].image, data["srcs"]["s1"])
    assert qualitative_grid(run, n_samples=2).rows == ["s1", "s2"]
    with pytest.raises(ValueError, match=r"no method\(s\) ledits; the run's methods: inpaint, recolor"):
        qualitative_grid(run, methods=["ledits"])
    with pytest.raises(ValueError, match=r"no sample 's4' in the run's edits \(closest: s3, s2, s1\)"):
        qualitative_grid(run, sample_ids=["s4"])
    # an edit whose file left the cache says so in its cell
    (next((run / "edits").glob("01*/*")) / "edit.png").unlink()
    g = qualitative_grid(run, methods=["recolor"], sample_ids=["s1"])
    assert g.cells[0][2].image is None and g.cells[0][2].note == "edit 0100abababababababababab not in the cache"
    # an edit_key that is not a cache key (a hand-edited table) opens no file: the cell says so
    job = run / "jobs" / "inpaint-a" / "edits.parquet"
    e = pd.read_parquet(job)
    e.loc[e.sample_id == "s1", "edit_key"] = "../../../ds/img/s1"
    e.to_parquet(job)
    g = qualitative_grid(run, methods=["inpaint"], sample_ids=["s1"], target=False)
    assert g.cells[0][1].image is None
    assert g.cells[0][1].note == "edit_key '../../../ds/img/s1' of sample s1 is not a cache key"


def _pdf_pages(data: bytes) -> int:
    # matplotlib writes each page object uncompressed as "/Type /Page" (the tree is "/Type /Pages")
    return len(re.findall(rb"/Type\s*/Page(?![a-z])", data))


def test_grid_pdf_pages_and_pngs(tmp_path):
    from matplotlib.backends.backend_pdf import PdfPages

    run, _ = _make_run(tmp_path)
    g = qualitative_grid(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = write_grid(g, tmp_path / "g.png", tmp_path / "g.pdf", rows_per_page=2)
    assert [p.name for p in files] == ["g.png", "g_p2.png", "g.pdf"]
    pdf = (tmp_path / "g.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert _pdf_pages(pdf) == 2
    # the counter agrees with matplotlib's own page count for the same pages
    with PdfPages(tmp_path / "check.pdf") as pp:
        for k in range(2):
            pp.savefig(figure_grid(Grid(g.rows[2 * k:2 * k + 2], g.columns, g.cells[2 * k:2 * k + 2])))
        assert pp.get_pagecount() == 2
    assert _pdf_pages((tmp_path / "check.pdf").read_bytes()) == 2
    # PNG page 1 holds 2 rows, page 2 one: heights differ by a cell
    h1, h2 = Image.open(tmp_path / "g.png").size[1], Image.open(tmp_path / "g_p2.png").size[1]
    assert h1 - h2 == 256  # a cell is max_side (256) pixels: 1.6 in at 160 dpi
    # same content, same bytes
    again = write_grid(g, tmp_path / "h.png", tmp_path / "h.pdf", rows_per_page=2)
    assert again[2].read_bytes() == pdf and again[0].read_bytes() == (tmp_path / "g.png").read_bytes()
    with pytest.raises(ValueError, match="rows_per_page must be >= 1"):
        write_grid(g, None, tmp_path / "x.pdf", rows_per_page=0)


def test_figures_for_run_draws_what_the_run_supports(tmp_path):
    run, _ = _make_run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = figures_for_run(run, tmp_path / "figs", n_samples=3)
    assert sorted(res.files) == sorted([
        "fig_clip_i_vs_clip_t.png", "fig_clip_i_vs_clip_t.pdf", "fig_ablation_clip_i.png", "fig_ablation_clip_i.pdf",
        "fig_ablation_clip_t.png", "fig_ablation_clip_t.pdf", "fig_clip_i_vs_strength.png",
        "fig_clip_i_vs_strength.pdf", "fig_clip_t_vs_strength.png", "fig_clip_t_vs_strength.pdf",
        "fig_grid.png", "fig_grid.pdf"])
    for name, p in res.files.items():
        data = p.read_bytes()
        if name.endswith(".pdf"):
            assert data.startswith(b"%PDF-") and _pdf_pages(data) == 1  # 3 samples: one page
        else:
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # inpaint has no strength parameter: it is not part of the sweep figures (no note either)
    assert res.notes == []
    # a run without CLIP scores: the trade-off figure is not drawn, and why
    run2, _ = _make_run(tmp_path / "b", with_clip=False)
    res = figures_for_run(run2, tmp_path / "figs2", formats=("pdf",))
    assert sorted(res.files) == ["fig_grid.pdf"] and res.notes == ["no scores: no metric figure"]
    with pytest.raises(ValueError, match="formats must be among png, pdf"):
        figures_for_run(run2, tmp_path / "figs3", formats=("svg",))


def test_grid_per_dataset_when_the_run_holds_several(tmp_path):
    """Sample ids are unique within a dataset only: a run over two datasets gets one grid each,
    and qualitative_grid asks which one."""
    run, data = _make_run(tmp_path)
    # a second dataset: the same folder under another name, edited by one job
    jd = run / "jobs" / "recolor-other"
    jd.mkdir()
    man = json.loads((run / "jobs" / "recolor-a" / "manifest.json").read_text())
    man["config"]["dataset"]["name"] = "other"
    (jd / "manifest.json").write_text(json.dumps(man))
    e = pd.read_parquet(run / "jobs" / "recolor-a" / "edits.parquet").assign(dataset="other", job="recolor-other")
    e.to_parquet(jd / "edits.parquet")
    with pytest.raises(ValueError, match=r"several datasets \(mini, other\); pick one with dataset="):
        qualitative_grid(run)
    g = qualitative_grid(run, dataset="other")
    assert g.columns == ["source", "recolor", "target"]
    np.testing.assert_array_equal(g.cells[2][1].image, data["edits"][("recolor-a", "s3")])
    res = figures_for_run(run, tmp_path / "figs", formats=("pdf",), ablation_metrics=[])
    assert sorted(n for n in res.files if "grid" in n) == ["fig_grid_mini.pdf", "fig_grid_other.pdf"]


def test_plot_wrappers_write_png_and_pdf_or_say_why_not(tmp_path):
    from harness.plots import plot_ablation, plot_clip_tradeoff

    s = summarize(_scores(_clip_values()), ["method", "params"], per_category=True)
    res = plot_clip_tradeoff(s, tmp_path / "c.pdf", categories=["add", "remove"])
    assert res.path == tmp_path / "c.pdf" and res.path.read_bytes().startswith(b"%PDF-")
    assert res.skipped == ["blank: no category with finite clip_t and clip_i"]
    res = plot_ablation(s, "clip_t", tmp_path / "a.png", by_category=True, groups=["zone"])
    assert res.path is not None and res.path.read_bytes()[:4] == b"\x89PNG"
    res = plot_ablation(s, "lpips", tmp_path / "none.png")
    assert res.path is None and res.reason == "no rows for lpips [all]" and not (tmp_path / "none.png").exists()
    with pytest.raises(ValueError, match=r"a figure is written as \.png or \.pdf, not \.svg"):
        plot_clip_tradeoff(s, tmp_path / "c.svg")


def test_grid_of_a_sharded_run_finds_every_source(tmp_path):
    """A sharded job's folders (<job>~shard<i>of<n>) share its job id; each manifest names its own
    shard of the dataset, yet every sample's source is found (in whichever shard it is)."""
    import hashlib

    run, data = _make_run(tmp_path)
    job = run / "jobs" / "recolor-a"
    manifest = json.loads((job / "manifest.json").read_text())
    edits = pd.read_parquet(job / "edits.parquet")
    shard_of = lambda sid: int(hashlib.sha1(sid.encode()).hexdigest(), 16) % 2  # noqa: E731
    for i in range(2):
        d = run / "jobs" / f"recolor-a~shard{i}of2"
        d.mkdir()
        cfg = {**manifest["config"], "dataset": {**manifest["config"]["dataset"], "shard": f"{i}/2"}}
        (d / "manifest.json").write_text(json.dumps({**manifest, "config": cfg}))
        edits[[shard_of(s) == i for s in edits["sample_id"]]].to_parquet(d / "edits.parquet")
    shutil.rmtree(job)
    assert {shard_of(s) for s in data["srcs"]} == {0, 1}  # both shards hold samples
    g = qualitative_grid(run, methods=["recolor"])
    fig = figure_grid(g, max_side=100)
    for r, sid in enumerate(g.rows):
        np.testing.assert_array_equal(_cell_pixels(fig.axes[r * len(g.columns)]), _thumb(data["srcs"][sid], 100))
