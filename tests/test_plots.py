"""Plots that do not mislead: n in every legend entry, all-zero and single-point series left out
(and listed in the report), every text inside the figure (annotations inside the axes, checked
with matplotlib's renderer), and no warning while drawing."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from harness.aggregate import expand_params, load_run, summarize
from harness.plots import figure_bars, figure_metric_vs_param, n_text, plot_bars, series_skip_reason
from harness.report import write_report

from .test_report import sweep, three_methods, write_job

LONG_METRIC = "clip_similarity_source_with_a_very_long_descriptive_name_for_testing_layout"


def _legend_texts(fig) -> list[str]:
    (ax,) = fig.axes
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _outside(fig) -> list[str]:
    """Every text that leaves the figure (titles, axis and tick labels, legend) or, for annotations
    placed in the axes, the axes; measured with the figure's own renderer after a draw."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    fb = fig.bbox
    eps = 1.0  # px: a glyph's antialiased edge may touch the border

    def inside(b, box) -> bool:
        return b.x0 >= box.x0 - eps and b.y0 >= box.y0 - eps and b.x1 <= box.x1 + eps and b.y1 <= box.y1 + eps

    bad = []
    for ax in fig.axes:
        if not inside(ax.get_tightbbox(r), fb):
            bad.append(f"axes decorations {ax.get_tightbbox(r)}")
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):  # the tick labels drawn: those of ticks within the view
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) * 1e-9
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if lo - span <= tick.get_loc() <= hi + span:
                    texts += [tick.label1, tick.label2]
        leg = ax.get_legend()
        if leg is not None:
            texts += list(leg.get_texts())
            if not inside(leg.get_window_extent(r), fb):
                bad.append("legend")
        for t in texts:
            if t.get_visible() and t.get_text() and not inside(t.get_window_extent(r), fb):
                bad.append(f"text {t.get_text()!r}")
        for t in ax.texts:  # annotations belong inside the axes
            if t.get_text() and not inside(t.get_window_extent(r), ax.bbox):
                bad.append(f"annotation {t.get_text()!r}")
    return bad


def _summary(rows: list[dict]) -> pd.DataFrame:
    base = dict(run="r1", dataset="d", n_nan=0, n_inf=0, flags="", higher_is_better=False, protocol="p",
                weights="none", region_rule="area")
    cols = ["run", "dataset", "method", "params", "metric", "region", "mean", "ci_low", "ci_high", "n", "n_nan",
            "n_inf", "flags", "higher_is_better", "protocol", "weights", "region_rule"]
    return pd.DataFrame([{**base, **r} for r in rows], columns=cols)


def _pt(method: str, params: str, mean: float, n: int, metric: str = "l1", region: str = "all", half: float = 0.01):
    return dict(method=method, params=params, metric=metric, region=region, mean=mean, ci_low=mean - half,
                ci_high=mean + half, n=n)


def test_series_skip_rules():
    assert series_skip_reason([0.0, 0.0, math.nan]) == "all values 0"
    assert series_skip_reason([math.inf, math.nan]) == "no finite value (inf or n/a)"
    assert series_skip_reason([0.3, math.nan], min_points=2) == "a single point"
    assert series_skip_reason([0.3, math.nan]) is None
    assert series_skip_reason([0.0, 0.2], min_points=2) is None
    assert n_text([4, 4]) == "n=4" and n_text([5, 3, 4]) == "n=3–5"


def test_sweep_plot_legend_shows_n_and_skips_zero_and_single_point_series():
    rows = [_pt("a", f'{{"r": {r}}}', 0.1 * r, n) for r, n in ((1, 5), (2, 3), (3, 4))]  # n varies
    rows += [_pt("b", f'{{"r": {r}}}', 0.2 + 0.01 * r, 6) for r in (1, 2, 3)]
    rows += [_pt("z", f'{{"r": {r}}}', 0.0, 6, half=0.0) for r in (1, 2, 3)]  # all zero
    rows += [_pt("one", '{"r": 2}', 0.5, 6)]  # a single point
    rows += [_pt("gap", f'{{"r": {r}}}', v, 6) for r, v in ((1, 0.4), (2, math.nan), (3, math.inf))]
    sp = expand_params(_summary(rows))
    fig, skipped, reason = figure_metric_vs_param(sp, "l1", "all", "r")
    assert reason is None
    assert _legend_texts(fig) == ["a [n=3–5]", "b [n=6]"]
    assert skipped == ["gap: a single point", "one: a single point", "z: all values 0"]
    assert _outside(fig) == []
    # nothing left: no figure, and why
    fig, skipped, reason = figure_metric_vs_param(expand_params(_summary(rows[6:10])), "l1", "all", "r")
    assert fig is None and skipped == ["one: a single point", "z: all values 0"]
    assert reason == "no series left to draw (one: a single point; z: all values 0)"


def test_bar_plot_legend_shows_n_and_skips_all_zero_groups(tmp_path):
    rows = [_pt("a", "{}", 0.1, 4, region="all"), _pt("a", "{}", 0.2, 3, region="edited"),
            _pt("b", "{}", 0.3, 4, region="all"), _pt("b", "{}", math.nan, 0, region="edited"),
            _pt("identity", "{}", 0.0, 4, region="all", half=0.0), _pt("identity", "{}", 0.0, 4, region="edited",
                                                                    half=0.0)]
    s = _summary(rows)
    fig, skipped, reason = figure_bars(s, "l1")
    assert reason is None and skipped == ["identity: all values 0"]
    assert _legend_texts(fig) == ["a [n=3–4]", "b [n=4]"]  # b's edited bar is n/a: not counted
    assert [t.get_text() for t in fig.axes[0].texts] == ["n/a"]
    assert _outside(fig) == []
    # a single bar left: no plot
    res = plot_bars(_summary(rows[:1] + rows[4:]), "l1", tmp_path / "p.png")
    assert res.path is None and not (tmp_path / "p.png").exists()
    assert res.reason == "a single value (see the table) (identity: all values 0)"


@pytest.mark.parametrize("kind", ["sweep", "bars"])
def test_every_text_inside_the_figure_with_long_names_and_many_series(kind):
    hib_long = LONG_METRIC
    long_params = '{{"guidance_scale_for_the_text_condition": {r}, "inversion_steps": 50, "mode": "{m}"}}'
    rows = []
    for k in range(14):
        for r in (1, 10, 100, 1000):  # ratio >= 100: log scale
            params = long_params.format(r=r, m=f"variant_with_a_long_name_{k}")
            rows.append(_pt(f"method_with_a_long_name_{k % 3}", params, -0.5 + 0.1 * k + 1e-3 * r, 10 + k,
                            metric=hib_long, region="unedited_region_of_the_image"))
    s = _summary(rows)
    if kind == "sweep":
        fig, skipped, _ = figure_metric_vs_param(expand_params(s), hib_long, "unedited_region_of_the_image",
                                                 "guidance_scale_for_the_text_condition")
        assert fig.axes[0].get_xscale() == "log"
        assert len(_legend_texts(fig)) == 14 and not skipped
    else:
        s = s[s["params"].str.contains('"guidance_scale_for_the_text_condition": 10,')]
        s = pd.concat([s, s.assign(region="all", mean=math.inf)], ignore_index=True)
        fig, skipped, _ = figure_bars(s, hib_long)
        assert len(_legend_texts(fig)) == 14 and not skipped
        assert [t.get_text() for t in fig.axes[0].texts] == ["inf"] * 14
    assert _outside(fig) == []
    # the data area keeps its planned width (a long legend widens the figure, it does not squeeze the plot)
    ax = fig.axes[0]
    assert ax.get_position().width * fig.get_figwidth() >= 0.95 * 3.4


def test_report_under_warnings_as_errors_lists_skipped_series(tmp_path):
    """The report's plots on awkward data (inf, NaN, a constant series, all-zero values, a single
    point, a value clamped above its CI) raise no warning, and table.md says what was left out."""
    run = tmp_path / "run"
    for r in (1, 3, 10):
        write_job(run, f"j_in_{r}", "inpaint", {"radius": r},
                  {("l1", "all"): [0.01 * r, 0.02 * r, math.nan],
                   ("psnr", "all"): [math.inf if r == 1 else 40.0, 30.0 + r, 20.0],  # radius 1: mean inf
                   ("l1", "edited"): [0.0, 0.0, 0.0]})
    write_job(run, "j_rc_1", "recolor", {"radius": 5}, {("l1", "all"): [0.3, 0.31, 0.32], ("psnr", "all"): [25.0] * 3,
                                                         ("l1", "edited"): [0.1, 0.2, 0.3]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = write_report(run, tmp_path / "out")
    md = files["table.md"].read_text()
    plots = md.split("## Plots", 1)[1]
    assert "- plot_l1_all_vs_radius.png" in plots and "- plot_psnr_all_vs_radius.png" in plots
    # l1 [edited]: inpaint all zero, recolor a single point -> not drawn
    assert ("- l1 [edited] vs radius: no series left to draw (inpaint: all values 0; recolor: a single point)"
            in plots)
    assert "- plot_l1_all_vs_radius.png: recolor: a single point" in plots
    assert not (tmp_path / "out" / "plot_l1_edited_vs_radius.png").exists()
    # every plot written is a PNG whose legend names n
    scores, _ = load_run(run)
    sp = expand_params(summarize(scores, ["run", "method", "params"]))
    fig, _, _ = figure_metric_vs_param(sp, "l1", "all", "radius")
    assert _legend_texts(fig) == ["inpaint [n=2]"]
    fig, skipped, _ = figure_metric_vs_param(sp, "psnr", "all", "radius")
    assert _legend_texts(fig) == ["inpaint [n=3]"] and skipped == ["recolor: a single point"]
    assert [t.get_text() for t in fig.axes[0].texts] == ["1 point(s) not finite (inf or n/a), not drawn"]
    assert _outside(fig) == []
    for name in files:
        if name.endswith(".png"):
            assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bar_report_lists_skipped_series(tmp_path):
    run = tmp_path / "run"
    three_methods(run)
    write_job(run, "j_id", "identity", {}, {("l1", "unedited"): [0.0] * 4, ("psnr", "unedited"): [math.inf] * 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = write_report(run, tmp_path / "out", cost_columns=False)
    plots = files["table.md"].read_text().split("## Plots", 1)[1]
    assert "- plot_bars_l1.png: identity: all values 0" in plots
    assert "- plot_bars_psnr.png: identity: no finite value (inf or n/a)" in plots


def test_sweep_report_plots_have_no_warnings(tmp_path):
    sweep(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = write_report(tmp_path / "run", tmp_path / "out")
    assert sum(n.endswith(".png") for n in files) == 6  # l1 all/unedited, lpips, 3 cost columns
    assert np.all([files[n].stat().st_size > 1000 for n in files if n.endswith(".png")])
