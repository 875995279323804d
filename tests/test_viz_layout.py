"""One heatmap layout (viz.layout) drawn by both plotting libraries: the PNG (matplotlib) and
the HTML (plotly) figures show the same cells, and a merged duplicate sits in the same place in
the mass and the effect heatmap, in the HTML report as in the PNG."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from attnres_lens import mass_vs_effect, viz
from attnres_lens.viz.layout import effect_heatmap, mass_heatmap

from reference import tiny_attnres

pytest.importorskip("plotly")


@pytest.fixture(scope="module")
def model():
    return tiny_attnres("cumulative", "block", n_layers=3, n_blocks=3, seed=1)


@pytest.fixture(scope="module")
def report(model):
    tokens = torch.randint(1, 250, (20, 8), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mass_vs_effect(model, tokens, n_boot=60, gradient=False)


def _png_grid(fig):
    """What a matplotlib heatmap shows: row/column labels, values (NaN where masked), the
    ``= x`` marks by cell, the outlined and hatched cells."""
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    values = np.where(np.ma.getmaskarray(image), np.nan, np.ma.getdata(image)).astype(float)
    merged = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
              for t in ax.texts if t.get_text().startswith("= ")}
    outlined = {(round(p.get_y() + 0.44), round(p.get_x() + 0.44)) for p in ax.patches if p.get_linewidth() == 2.0}
    hatched = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches if p.get_hatch()}
    return dict(rows=[t.get_text() for t in ax.get_yticklabels()],
                columns=[t.get_text() for t in ax.get_xticklabels()],
                values=values, merged=merged, outlined=outlined, hatched=hatched, title=ax.get_title())


def _array(value):
    """A plotly array as numpy: nested lists (None for a gap) or, in an HTML page, plotly's
    typed-array encoding ``{"dtype", "bdata" (base64), "shape"}``."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return flat.reshape([int(n) for n in str(value["shape"]).split(",")]).astype(float)
    return np.array([[np.nan if v is None else v for v in row] for row in value], dtype=float)


def _plotly_grid(data, layout):
    """The same, read from a plotly figure's traces (dicts, as in the HTML page)."""
    heat = data[0]
    rows, columns = list(heat["y"]), list(heat["x"])

    def cells(trace):
        return {(rows.index(y), columns.index(x)) for x, y in zip(trace["x"], trace["y"])}

    merged, outlined, hatched = {}, set(), set()
    for trace in data[1:]:
        if trace.get("mode") == "text":
            merged.update(dict(zip([(rows.index(y), columns.index(x)) for x, y in zip(trace["x"], trace["y"])],
                                   trace["text"])))
        elif trace["marker"]["symbol"] == "square-open":
            outlined |= cells(trace)
        else:
            hatched |= cells(trace)
    z = _array(heat["z"])
    title = layout["title"]["text"] if isinstance(layout["title"], dict) else layout["title"]
    return dict(rows=rows, columns=columns, values=z, merged=merged, outlined=outlined, hatched=hatched, title=title)


def _same(png, html):
    assert png["rows"] == html["rows"] and png["columns"] == html["columns"]
    assert png["title"] == html["title"]
    assert np.array_equal(np.isnan(png["values"]), np.isnan(html["values"]))
    assert np.allclose(png["values"], html["values"], equal_nan=True, rtol=1e-6, atol=1e-9)
    assert png["merged"] == html["merged"]
    assert png["outlined"] == html["outlined"] and png["hatched"] == html["hatched"]


@pytest.mark.parametrize("quantity", ["mass", "effect"])
def test_png_and_plotly_draw_the_same_cells(report, quantity):
    png_fig = report.plot_mass_heatmap() if quantity == "mass" else report.plot_effect_heatmap(scale="linear")
    html_fig = viz.plot_routing_heatmap(report) if quantity == "mass" else viz.plot_effect_heatmap(report)
    png, html = _png_grid(png_fig), _plotly_grid([t.to_plotly_json() for t in html_fig.data],
                                                  html_fig.layout.to_plotly_json())
    _same(png, html)
    heat = mass_heatmap(report) if quantity == "mass" else effect_heatmap(report)
    assert png["rows"] == list(heat.rows) and np.allclose(png["values"], heat.values, equal_nan=True)
    assert len(heat.filled()) == int(np.isfinite(png["values"]).sum()) > 0
    if quantity == "effect":  # every table row in its cell, the hatching where its CI includes 0
        assert len(heat.filled()) == len(report.table)
        assert len(png["hatched"]) == int((~report.table["effect_ci_excludes_zero"].astype(bool)).sum())


@pytest.mark.parametrize("scale", ["symlog", "linear"])
def test_both_renderers_share_the_effect_colour_scale(report, scale):
    heat = effect_heatmap(report, scale=scale)
    bar = report.plot_effect_heatmap(scale=scale).axes[1]
    assert bar.get_ylabel() == heat.colour.label
    low, high = bar.get_ylim()
    assert (low, high) == pytest.approx((-np.abs(report.table["effect"]).max(),) * 1 + (np.abs(report.table["effect"]).max(),))
    trace = viz.plot_effect_heatmap(report, scale=scale).data[0]
    assert trace.colorscale == viz.plot_effect_heatmap(report, scale="linear").data[0].colorscale
    if scale == "symlog":  # plotly draws sign * log10(1 + |v| / linthresh), labelled in real values
        t = heat.colour.linthresh
        assert np.allclose(np.asarray(trace.z, float), np.sign(heat.values) * np.log10(1 + np.abs(heat.values) / t),
                           equal_nan=True)
        assert f"{heat.colour.high:+.2g}" in trace.colorbar.ticktext
    else:
        assert trace.zmax == heat.colour.high == -trace.zmin


def _plotly_figures(page: str) -> dict[str, tuple[list, dict]]:
    """div id -> (data, layout) of every ``Plotly.newPlot`` call of an HTML page."""
    decoder = json.JSONDecoder()
    figures = {}
    for found in re.finditer(r'Plotly\.newPlot\(\s*"([^"]+)",\s*', page):
        data, end = decoder.raw_decode(page, found.end())
        layout, _ = decoder.raw_decode(page, re.match(r",\s*", page[end:]).end() + end)
        figures[found.group(1)] = (data, layout)
    return figures


def test_merged_duplicates_sit_alike_in_mass_and_effect_html_and_png(report, tmp_path):
    duplicates = report.source_table[report.source_table["duplicate_of"].notna()]
    assert report.settings["duplicates"]["merged"] and len(duplicates) == report.settings["duplicates"]["n_pairs"] > 0
    page = viz.write_html_report({"tiny": report}, tmp_path / "report.html").read_text(encoding="utf-8")
    figures = _plotly_figures(page)
    html_mass, html_effect = (_plotly_grid(*figures[f"tiny-figure-{i}"]) for i in (0, 1))
    png_mass = _png_grid(report.plot_mass_heatmap(path=str(tmp_path / "mass.png")))
    png_effect = _png_grid(report.plot_effect_heatmap(path=str(tmp_path / "effect.png")))
    assert (tmp_path / "mass.png").read_bytes()[:4] == (tmp_path / "effect.png").read_bytes()[:4] == b"\x89PNG"
    labels = report.source_table.set_index(["router", "source"])["label"]
    names = {r: f"L{int(l)} {s}" for r, l, s in zip(report.source_table["router"], report.source_table["layer"],
                                                      report.source_table["sublayer"])}
    for grid in (html_mass, html_effect, png_mass, png_effect):
        for _, copy in duplicates.iterrows():
            holder = labels[(copy["router"], int(copy["duplicate_of"]))]
            r = grid["rows"].index(names[copy["router"]])
            at_copy, at_holder = grid["columns"].index(copy["label"]), grid["columns"].index(holder)
            assert np.isnan(grid["values"][r, at_copy]) and np.isfinite(grid["values"][r, at_holder])
            assert grid["merged"][(r, at_copy)] == f"= {holder}"
        assert len(grid["merged"]) == len(duplicates)
    assert html_mass["merged"] == html_effect["merged"] == png_mass["merged"] == png_effect["merged"]
    filled = [{tuple(c) for c in np.argwhere(np.isfinite(g["values"]))} for g in (html_mass, html_effect, png_mass)]
    assert filled[0] == filled[1] == filled[2]  # every slice report: the same cells in both heatmaps


@pytest.mark.parametrize("flavour,groups", [("cumulative", "family_band"), ("kimi", "family")])
def test_grouped_reports_lay_out_by_their_recorded_grouping(flavour, groups):
    model = tiny_attnres(flavour, "block", n_layers=3, n_blocks=3 if flavour == "cumulative" else 2, seed=1)
    tokens = torch.randint(1, 250, (20, 8), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grouped = mass_vs_effect(model, tokens, n_boot=60, gradient=False, groups=groups)
    heat = effect_heatmap(grouped)
    assert heat.column_title == "source family" and heat.merged == ()
    _same(_png_grid(grouped.plot_effect_heatmap(scale="linear")),
          _plotly_grid([t.to_plotly_json() for t in viz.plot_effect_heatmap(grouped).data],
                       viz.plot_effect_heatmap(grouped).layout.to_plotly_json()))
    if groups == "family_band":  # sublayer order, then band order
        assert list(heat.rows) == [f"{s} {b}" for s in ("attn", "mlp") for b in grouped.settings["bands"]]
    with pytest.raises(ValueError, match=r"grouping must be one of \['slice', 'family', 'family_band', 'named'\]"):
        effect_heatmap(grouped, grouping="families")
    with pytest.raises(ValueError, match=rf"not grouped by 'slice': they have no \[.*'source'\] \(the report was built with groups='{groups}'"):
        effect_heatmap(grouped, grouping="slice")


def test_the_layout_imports_no_plotting_library():
    code = ("import sys, attnres_lens.viz.layout; "
            "print(sorted(m for m in ('matplotlib', 'plotly') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
