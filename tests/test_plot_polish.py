"""What a reader of the figures relies on (issue K 19): a symlog axis says so and where it is
linear; names of flagged points stay inside the axes and clear each other; points drawn on top
of one another stay several (translucent, edged, counted ``×n``, never moved); token labels of
``plot_token_routing`` are legible (no two overlap, blanks and newlines visible, a minimum size)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from attnres_lens import plot_token_routing, viz
from attnres_lens.attribution.plot_marks import POINT_ALPHA, coincident_clusters
from attnres_lens.attribution.plots import MIN_TOKEN_FONTSIZE
from attnres_lens.attribution.thresholds import FLAG_CAUSAL_WITHOUT_MASS, FLAG_MASS_WITHOUT_CAUSAL_ROLE
from attnres_lens.viz.tokens import tick_token

POINT = ["mass", "mass_low", "mass_high", "effect", "effect_low", "effect_high"]


def _with_rows(report, rows: dict[int, dict]):
    """A copy of ``report`` whose table rows ``i`` take the given values."""
    table = report.table.copy()
    for i, values in rows.items():
        for column, value in values.items():
            table.loc[table.index[i], column] = value
    return type(report)(**{**report.__dict__, "table": table})


def _drawn(fig):
    """``fig`` laid out and drawn (constrained layout applied); its renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _point(mass, effect, flag=None):
    row = dict(zip(POINT, [mass, mass - 0.01, mass + 0.01, effect, effect * 0.9, effect * 1.1]))
    return row if flag is None else {**row, "flag": flag}


# ============================================================================ symlog axes
def _linthresh_in(label: str) -> float:
    found = re.search(r"symlog scale, linear within \u00b1([0-9.e+-]+)\)", label)
    assert found, label
    return float(found.group(1))


def test_a_symlog_axis_says_so_with_its_linthresh_and_a_linear_one_does_not(report):
    huge = _with_rows(report, {0: _point(0.6, 80.0)})
    ax = huge.plot_scatter(yscale="symlog").axes[0]
    assert ax.get_yscale() == "symlog"
    linthresh = ax.yaxis.get_transform().linthresh
    assert _linthresh_in(ax.get_ylabel()) == pytest.approx(linthresh, rel=0.05)
    assert linthresh == pytest.approx(max(report.settings["effect_threshold"], 80.0 * 1.1e-3 / 1.1))
    assert huge.plot_scatter().axes[0].get_yscale() == "symlog"  # auto: one catastrophic row
    linear = report.plot_scatter(yscale="linear").axes[0]
    assert linear.get_yscale() == "linear" and "symlog" not in linear.get_ylabel()

    grad = report.plot_gradient_vs_exact(scale="symlog").axes[0]
    for axis, label in ((grad.xaxis, grad.get_xlabel()), (grad.yaxis, grad.get_ylabel())):
        assert _linthresh_in(label) == pytest.approx(axis.get_transform().linthresh, rel=0.05)
    grad = report.plot_gradient_vs_exact(scale="linear").axes[0]
    assert "symlog" not in grad.get_xlabel() + grad.get_ylabel()

    heat = huge.plot_effect_heatmap(scale="symlog")
    bar = heat.axes[1]  # the colour bar
    assert _linthresh_in(bar.get_ylabel()) == pytest.approx(bar.yaxis.get_transform().linthresh, rel=0.05)
    assert "symlog" not in report.plot_effect_heatmap(scale="linear").axes[1].get_ylabel()


# ============================================================================ point labels
@pytest.mark.parametrize("yscale", ["linear", "symlog"])
def test_flagged_point_labels_stay_inside_the_axes_and_clear_each_other(report, yscale):
    long_name = "L9 mlp: [7] after block 6 = a long source name"
    corners = {
        0: {**_point(1.0, 60.0, FLAG_MASS_WITHOUT_CAUSAL_ROLE), "name": long_name},  # top right
        1: _point(0.99, -40.0, FLAG_MASS_WITHOUT_CAUSAL_ROLE),  # bottom right
        2: {**_point(0.0, 55.0, FLAG_CAUSAL_WITHOUT_MASS), "abs_effect": 55.0},  # top left
        3: _point(0.97, 58.0, FLAG_MASS_WITHOUT_CAUSAL_ROLE),  # crowding the top-right one
        4: _point(0.98, 59.0, FLAG_MASS_WITHOUT_CAUSAL_ROLE),
    }
    fig = _with_rows(report, corners).plot_scatter(yscale=yscale, max_labels=20)
    renderer = _drawn(fig)
    ax = fig.axes[0]
    labels = [text for text in ax.texts if not text.get_text().startswith("\u00d7")]
    assert long_name in [label.get_text() for label in labels]
    inside_axes = ax.get_window_extent(renderer)
    inside_figure = fig.bbox
    extents = [Text.get_window_extent(label, renderer) for label in labels]  # the text, not its leader line
    for label, extent in zip(labels, extents):
        for box, what in ((inside_axes, "axes"), (inside_figure, "figure")):
            assert box.x0 - 0.5 <= extent.x0 and extent.x1 <= box.x1 + 0.5, (label.get_text(), what)
            assert box.y0 - 0.5 <= extent.y0 and extent.y1 <= box.y1 + 0.5, (label.get_text(), what)
    for i, a in enumerate(extents):
        for b in extents[i + 1:]:
            assert not a.overlaps(b), "two point labels overlap"


# ============================================================================ coincident points
def test_coincident_points_are_counted_translucent_and_not_moved(report):
    same = _point(0.5, 0.02)
    crowded = _with_rows(report, {2: same, 3: same, 4: same})
    fig = crowded.plot_scatter(annotate_flags=False)
    ax = fig.axes[0]
    counts = [text for text in ax.texts if text.get_text().startswith("\u00d7")]
    spot = [text for text in counts if text.xy == (0.5, 0.02)]
    assert [text.get_text() for text in spot] == ["\u00d73"]
    assert "n points at one spot (not moved)" in [t.get_text() for t in ax.get_legend().get_texts()]
    drawn = []
    for container in ax.containers:
        markers = container.lines[0]
        assert markers.get_alpha() == POINT_ALPHA < 1
        assert markers.get_markeredgewidth() > 0
        assert markers.get_markeredgecolor() != markers.get_markerfacecolor()
        drawn += list(zip(markers.get_xdata(), markers.get_ydata()))
    assert sorted(drawn) == sorted(zip(crowded.table["mass"], crowded.table["effect"]))  # no jitter
    assert drawn.count((0.5, 0.02)) == 3
    assert crowded.table["mass"].iloc[2:5].tolist() == [0.5, 0.5, 0.5]  # the data is untouched

    twin = report.table["grad_estimate"].iloc[0], report.table["effect"].iloc[0]
    grad = _with_rows(report, {1: {"grad_estimate": twin[0], "effect": twin[1]}}).plot_gradient_vs_exact().axes[0]
    assert [t.get_text() for t in grad.texts if tuple(t.xy) == tuple(twin)] == ["\u00d72"]
    assert all(c.lines[0].get_alpha() < 1 for c in grad.containers)


def test_coincident_clusters_group_points_closer_than_the_threshold():
    points = np.array([[0.5, 0.5], [0.505, 0.495], [0.9, 0.1], [0.5, 0.6], [0.9, 0.105], [np.nan, 0.5]])
    assert coincident_clusters(points, within=0.012) == [[0, 1], [2, 4]]
    assert coincident_clusters(points, within=0.001) == []


# ============================================================================ token labels
def _tick_labels(ax):
    return [label for label in ax.get_xticklabels() if label.get_visible() and label.get_text()]


def _assert_legible(fig, renderer):
    for ax in [a for a in fig.axes if a.get_label() != "<colorbar>"]:
        labels = _tick_labels(ax)
        assert labels
        assert all(label.get_fontsize() >= MIN_TOKEN_FONTSIZE for label in labels)
        spans = sorted((e.x0, e.x1) for e in (label.get_window_extent(renderer) for label in labels))
        for (_, right), (left, _) in zip(spans, spans[1:]):
            assert right <= left, "two token labels overlap"


def test_token_labels_are_legible_and_show_blanks_and_newlines(cumulative):
    text = "def f(a, b):\n    return a + b\n\nprint( f(1, 2) )\n# sixty\n"
    text = (text * 2)[:60]
    assert len(cumulative.to_str_tokens(text)) == 60
    fig = plot_token_routing(cumulative, text, router=[(1, "mlp"), (2, "attn")])
    _assert_legible(fig, _drawn(fig))
    shown = [label.get_text() for label in _tick_labels(fig.axes[0])]
    assert len(shown) == 60  # all fit: none left out
    assert shown.count("\\n") == text.count("\n") and shown.count("\u2423") == text.count(" ")
    assert [a for a in fig.axes if a.get_label() != "<colorbar>"][-1].get_xlabel() == "token"  # nothing left out


def test_too_many_tokens_are_labelled_one_in_k_and_the_axis_says_so(cumulative):
    text = "for i in range(10):\n    print(i)\n" * 12  # 396 characters, one token each
    n_tokens = len(cumulative.to_str_tokens(text))
    fig = plot_token_routing(cumulative, text, router=(1, "mlp"), max_tokens=300)
    ax = fig.axes[0]
    _assert_legible(fig, _drawn(fig))
    step = int(re.search(rf"token \(first 300 of {n_tokens}; one in (\d+) labelled\)", ax.get_xlabel()).group(1))
    assert step > 1
    assert [t for t in ax.get_xticks()] == list(range(0, 300, step))
    assert set(ax.get_xticks()) | set(ax.get_xticks(minor=True)) == set(range(300))  # every position has a tick
    strs = cumulative.to_str_tokens(text)
    assert [label.get_text() for label in _tick_labels(ax)] == [tick_token(strs[i]) for i in range(0, 300, step)]
    assert plot_token_routing(cumulative, text, router=(1, "mlp")).axes[0].get_xlabel() == f"token (first 64 of {n_tokens})"


def test_plotly_token_labels_are_thinned_and_show_blanks(cumulative):
    text = "for i in range(10):\n    print(i)\n" * 6
    fig = viz.plot_token_routing(cumulative, text, "blocks.1.mlp_router", max_tokens=200)
    axis = fig.layout.xaxis
    step = math.ceil(len(cumulative.to_str_tokens(text)) / 64)
    assert list(axis.tickvals) == list(range(0, len(fig.data[0].x), step)) and len(axis.tickvals) <= 64
    assert "\u2423" in axis.ticktext and "\\n" in axis.ticktext
    assert f"one in {step} labelled" in axis.title.text


@pytest.mark.parametrize(
    "token, shown",
    [(" print", "\u2423print"), ("x ", "x\u2423"), ("a b", "a b"), ("  ", "\u2423\u2423"), ("\n", "\\n"),
     ("\n  ", "\\n\u2423\u2423"), ("\t", "\\t"), ("word", "word")],
)
def test_tick_token_shows_blanks_at_the_ends_and_escapes_control_characters(token, shown):
    assert tick_token(token) == shown
