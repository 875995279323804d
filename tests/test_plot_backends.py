"""Report and token-routing figures: they display inline (IPython's own formatter gives
``image/png``, no pyplot or magic), and ``backend="plotly"`` gives the interactive figures of
:mod:`attnres_lens.viz`, holding the report's own numbers."""

from __future__ import annotations

import io
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from attnres_lens import plot_token_routing


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figures(report, model):
    text = torch.randint(1, 250, (1, 10), generator=torch.Generator().manual_seed(3))
    return {
        "mass heatmap": report.plot_mass_heatmap(),
        "effect heatmap": report.plot_effect_heatmap(),
        "scatter": report.plot_scatter(),
        "gradient vs exact": report.plot_gradient_vs_exact(),
        "token routing": plot_token_routing(model, text, "all"),
    }


def test_matplotlib_figures_display_as_png_in_ipython(report, cumulative):
    from IPython.core.formatters import DisplayFormatter

    formatter = DisplayFormatter()
    for what, fig in _figures(report, cumulative).items():
        data, _ = formatter.format(fig)
        assert "image/png" in data, f"{what}: IPython shows only {sorted(data)}"
        png = data["image/png"]
        assert isinstance(png, bytes) and png.startswith(PNG_MAGIC), what
        image = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
        width, height = fig.get_size_inches() * 100
        assert image.shape == (round(height), round(width)), what
        assert image.std() > 10, f"{what}: the PNG is blank"


def test_matplotlib_figures_still_pickle_and_save(report, tmp_path):
    fig = report.plot_scatter(path=str(tmp_path / "scatter.pdf"))
    assert (tmp_path / "scatter.pdf").read_bytes().startswith(b"%PDF")
    again = pickle.loads(pickle.dumps(fig))
    assert again._repr_png_().startswith(PNG_MAGIC)


def test_plotly_backend_gives_the_viz_figures(report, cumulative, tmp_path):
    go = pytest.importorskip("plotly.graph_objects")
    from attnres_lens import viz

    mass = report.plot_mass_heatmap(backend="plotly")
    effect = report.plot_effect_heatmap(backend="plotly")
    scatter = report.plot_scatter(backend="plotly")
    for fig, reference in ((mass, viz.plot_routing_heatmap(report)), (effect, viz.plot_effect_heatmap(report)),
                           (scatter, viz.plot_mass_effect_scatter(report))):
        assert isinstance(fig, go.Figure)
        assert fig.to_json() == reference.to_json()
    table = report.table
    z = np.asarray(effect.data[0].z, dtype=float)
    assert np.isclose(np.nansum(z), table["effect"].sum())
    tokens = torch.randint(1, 250, (1, 10), generator=torch.Generator().manual_seed(3))
    routing = plot_token_routing(cumulative, tokens, "blocks.1.mlp_router", backend="plotly", path=str(tmp_path / "t.html"))
    assert isinstance(routing, go.Figure)
    _, cache = cumulative.run_with_cache(tokens, names_filter=["blocks.1.mlp_router.hook_weights"])
    alpha = cache["blocks.1.mlp_router.hook_weights"][0].numpy()  # [pos, source]
    assert np.allclose(np.asarray(routing.data[0].z, dtype=float), alpha.T, atol=1e-6)
    page = (tmp_path / "t.html").read_text()
    assert "Plotly.newPlot" in page
    assert not re.search(r"""<script[^>]+src=["']?(?:https?:)?//""", page), "the page fetches a script"
    report.plot_scatter(backend="plotly", path=str(tmp_path / "scatter.html"))
    assert (tmp_path / "scatter.html").stat().st_size > 1_000_000  # plotly.js embedded: opens offline


def test_unknown_backend_and_bad_plotly_path_fail_clearly(report, cumulative, tmp_path):
    for call in (report.plot_mass_heatmap, report.plot_effect_heatmap, report.plot_scatter):
        with pytest.raises(ValueError, match=r"backend must be one of \['matplotlib', 'plotly'\], got 'bokeh'"):
            call(backend="bokeh")
        with pytest.raises(ValueError, match=r"path must end in \.html"):
            call(backend="plotly", path=str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="backend must be one of"):
        plot_token_routing(cumulative, "abc", backend="svg")
    with pytest.raises(ValueError, match="draws one router"):
        plot_token_routing(cumulative, "abc", "all", backend="plotly")
    assert not list(tmp_path.iterdir())


def test_run_protocol_without_plotly_says_report_html_needs_the_viz_extra(cumulative, tmp_path, monkeypatch):
    from attnres_lens.protocol import Subject, run_protocol

    monkeypatch.setitem(__import__("sys").modules, "plotly", None)  # as if plotly were not installed
    tokens = torch.randint(1, 250, (6, 8), generator=torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match=r"report.html not written: it needs plotly \(pip install 'attnres_lens\[viz\]'\)"):
        run_protocol([Subject("tiny", cumulative)], tokens, tmp_path / "out", groups=("family",), n_boot=40,
                     progress=False)
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.md", "summary.json", "figures"} <= written and "report.html" not in written
