"""attnres_lens.viz without a browser: the explorer's logic, the figures' data, the HTML files.

The explorer's rerun from the cached clean prefix is checked against a full forward with the
same interventions; the figures against the report's own numbers; the exported code by running it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from attnres_lens import mass_vs_effect
from attnres_lens.interventions import Intervention, Slice, run_with_interventions
from attnres_lens.metrics import next_token_loss
from attnres_lens.viz import (
    ExplorerSession,
    explore,
    figure_html,
    plot_effect_heatmap,
    plot_mass_effect_scatter,
    plot_routing_heatmap,
    plot_token_routing,
    token_routing_circuitsvis,
    write_html_report,
)

from reference import tiny_attnres

pytest.importorskip("plotly")

FLAVOURS = [("kimi", "block", 4, 2), ("cumulative", "block", 3, 3), ("kimi", "full", 2, 2)]


def _tokens(pos: int = 12, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 250, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cumulative():
    return tiny_attnres("cumulative", "block", n_layers=3, n_blocks=3, seed=1)


@pytest.fixture(scope="module")
def report(cumulative):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mass_vs_effect(cumulative, _tokens(8, seed=2, batch=20), n_boot=60, gradient=False)


def _external(page: str) -> list[str]:
    """Scripts, styles or links the page would fetch (plotly.js mentions a topojson CDN in a
    default it only reads for geo maps, so the text alone proves nothing)."""
    return re.findall(r"""<(?:script|link|img|iframe)[^>]+(?:src|href)=["']?(?:https?:)?//[^"'> ]+""", page)


# ---------------------------------------------------------------------------- the session
def _choices(model):
    """A mix of every choice, on an early and a late router."""
    names = [s.name for s in model.router_specs]
    early, late = model.router_specs[1], model.router_specs[-1]
    return [  # late first, so the rerun starts later, then earlier
        (late.name, late.n_sources - 1, "scale", {"factor": 0.3}),
        (late.name, 0, "patch", {"target": "source"}),
        (names[-2], 0, "mask", {}),
        (early.name, 0, "zero", {}),
    ]


@pytest.mark.parametrize("flavour,routing_mode,n_layers,n_blocks", FLAVOURS)
def test_rerun_from_the_clean_prefix_equals_a_full_forward(flavour, routing_mode, n_layers, n_blocks):
    model = tiny_attnres(flavour, routing_mode, n_layers=n_layers, n_blocks=n_blocks, seed=3)
    tokens, other = _tokens(seed=4), _tokens(seed=5)
    session = ExplorerSession(model, tokens, patch_text=other, top_k=3)
    clean = session.result()
    with torch.no_grad():
        full_clean = model(tokens)
    assert clean.rerun_from is None
    assert clean.metric_clean == pytest.approx(float(next_token_loss(full_clean, tokens)), abs=1e-5)
    for router, source, mode, kw in _choices(model):
        session.set_choice(router, source, mode, **kw)
        result = session.result()
        with torch.no_grad():
            full = run_with_interventions(model, tokens, session.interventions())
        assert result.metric_intervened == pytest.approx(float(next_token_loss(full, tokens)), abs=1e-5)
        np.testing.assert_allclose(
            result.loss_intervened, (-torch.log_softmax(full[0, :-1], -1).gather(-1, tokens[0, 1:, None])[:, 0]).numpy(),
            atol=1e-5,
        )
        probs = torch.softmax(full[0, -1], -1)
        assert [p.token_id for p in result.top_intervened] == probs.topk(3).indices.tolist()
        steps = {spec.name: spec.step for spec in model.router_specs}
        assert result.rerun_from == min(steps[c.router] for c in session.choices)
        assert result.metric_clean == clean.metric_clean


def test_routing_as_run_is_clean_before_and_edited_at_the_router(cumulative):
    session = ExplorerSession(cumulative, _tokens(seed=6))
    specs = cumulative.router_specs
    target = specs[3]
    session.set_choice(target.name, 0, "zero")
    result = session.result()
    for spec in specs[:3]:
        np.testing.assert_array_equal(result.routing[spec.name], session.clean_routing[spec.name])
    edited = result.routing[target.name]
    assert np.all(edited[:, 0] == 0.0)
    np.testing.assert_allclose(edited[:, 1:], session.clean_routing[target.name][:, 1:], atol=1e-6)
    # a later router reads an edited stream, so its routing moves
    assert not np.allclose(result.routing[specs[-1].name], session.clean_routing[specs[-1].name])


def test_results_are_cached_per_set_of_choices_and_reset_restores_the_clean_run(cumulative):
    session = ExplorerSession(cumulative, _tokens(seed=7))
    clean = session.result()
    router = cumulative.router_specs[2].name
    session.set_choice(router, 1, "mask")
    first = session.result()
    assert session.result() is first
    session.set_choice(router, 1, "none")
    assert session.result() is clean
    session.set_choice(router, 1, "mask")
    assert session.result() is first
    session.reset()
    assert session.choices == [] and session.result() is clean


@pytest.mark.parametrize("as_text", [True, False])
def test_exported_code_reproduces_the_intervened_run(cumulative, as_text):
    prompt, other = ("def f(x):\n    return", "class A(B):\n    pass") if as_text else (_tokens(seed=8), _tokens(seed=9))
    session = ExplorerSession(cumulative, prompt, patch_text=other)
    for router, source, mode, kw in _choices(cumulative):
        session.set_choice(router, source, mode, **kw)
    code = session.code()
    assert "Intervention(Slice(" in code and "patch_cache" in code
    namespace = {"model": cumulative}
    exec(code, namespace)
    interventions = namespace["interventions"]
    assert all(isinstance(i, Intervention) for i in interventions)
    assert interventions[0].where == Slice(cumulative.router_specs[1].name, 0)  # forward order
    assert [(i.where, i.mode, i.target) for i in interventions] == [
        (i.where, i.mode, i.target) for i in session.interventions()
    ]
    loss = float(next_token_loss(namespace["logits"], session.tokens))
    assert loss == pytest.approx(session.result().metric_intervened, abs=1e-5)
    lines_only = session.code(include_run=False)
    assert "run_with_interventions" not in lines_only and "interventions = [" in lines_only


def test_session_rejects_bad_choices(cumulative):
    session = ExplorerSession(cumulative, _tokens(seed=10))
    router = cumulative.router_specs[1].name
    with pytest.raises(KeyError, match="no router named 'blocks.9.attn_router'"):
        session.set_choice("blocks.9.attn_router", 0, "zero")
    with pytest.raises(ValueError, match=r"source must be an int in \[0, 2\)"):
        session.set_choice(router, 5, "zero")
    with pytest.raises(ValueError, match="unknown choice 'ablate'"):
        session.set_choice(router, 0, "ablate")
    with pytest.raises(ValueError, match="set_patch_text"):
        session.set_choice(router, 0, "patch")
    with pytest.raises(ValueError, match="unknown patch target 'stream'"):
        session.set_choice(router, 0, "zero", target="stream")
    with pytest.raises(ValueError, match="has 5 tokens and the prompt 12"):
        session.set_patch_text(_tokens(pos=5))
    with pytest.raises(ValueError, match="finite"):
        session.set_choice(router, 0, "scale", factor=float("inf"))
    assert session.choices == []
    with pytest.raises(ValueError, match=r"position must be an int in \[-12, 12\)"):
        ExplorerSession(cumulative, _tokens(seed=10), position=12)
    with pytest.raises(ValueError, match="metric must be 'loss'"):
        ExplorerSession(cumulative, _tokens(seed=10), metric="kl")


def test_a_callable_metric_and_another_position(cumulative):
    tokens = _tokens(seed=11)

    def last_logit(logits, toks):
        return float(logits[0, -1, 7])

    session = ExplorerSession(cumulative, tokens, metric=last_logit, position=3, top_k=2)
    session.set_choice(cumulative.router_specs[-1].name, 0, "zero")
    result = session.result()
    with torch.no_grad():
        full = run_with_interventions(cumulative, tokens, session.interventions())
    assert result.metric_name == "last_logit"
    assert result.metric_intervened == pytest.approx(float(full[0, -1, 7]), abs=1e-5)
    assert result.position == 3
    assert [p.token_id for p in result.top_intervened] == torch.softmax(full[0, 3], -1).topk(2).indices.tolist()


# ---------------------------------------------------------------------------- the widget
def test_the_widget_drives_the_session_and_shows_its_results(cumulative, tmp_path):
    pytest.importorskip("ipywidgets")
    explorer = explore(cumulative, "def f(x):\n    return x", patch_text="class AB(CD):\n    pass")
    session = explorer.session
    router = cumulative.router_specs[2].name
    explorer.router.value = router
    assert len(explorer.slice_rows.children) == session.specs[router].n_sources
    explorer.slice_rows.children[0].children[0].value = "zero"
    assert session.choices[0].router == router and session.choices[0].mode == "zero"
    result = session.result()
    assert f"{result.metric_intervened:.4f}" in explorer.predictions.value
    assert explorer.status.value.count("ms") == 2 and "reran sublayers 2..5" in explorer.status.value
    row = explorer.slice_rows.children[1].children
    row[1].value = 0.25
    row[0].value = "scale"
    assert session.choice(router, 1).factor == 0.25
    explorer.slice_rows.children[0].children[0].value = "patch"
    explorer.target.value = "contribution"
    assert session.choice(router, 0).target == "contribution"
    explorer.export_button.click()
    assert "Intervention(Slice('blocks.1.attn_router', 1), 'scale', value=0.25)" in explorer.code.value
    # a bad second prompt: a message, the old one stays
    explorer.patch_text.value = "short"
    assert "has 5 tokens" in explorer.message.value and session.patch_text == "class AB(CD):\n    pass"
    page = explorer.snapshot_html(tmp_path / "snapshot.html")
    assert (tmp_path / "snapshot.html").read_text(encoding="utf-8") == page
    assert page.count('class="plotly-graph-div"') == 2 and page.count("plotly.js v") == 1
    assert _external(page) == []
    explorer.reset_button.click()
    assert session.choices == []
    assert all(r.children[0].value == "none" for r in explorer.slice_rows.children)
    assert "no interventions" in explorer.chosen.value


# ---------------------------------------------------------------------------- figures
def _cell(fig, row_label, column_label, trace=0):
    t = fig.data[trace]
    return list(t.y).index(row_label), list(t.x).index(column_label)


def test_routing_heatmap_shows_the_routing_statistics_with_hover(report):
    """Every slice of the routing statistics in its cell; a copy merged with its first holder
    (the report merges duplicates) adds its mass to the holder's cell, as in the effect heatmap."""
    fig = plot_routing_heatmap(report)
    slices = report.routing.slices
    copy_of = report.source_table.set_index(["router", "source"])["duplicate_of"]
    mass_of = slices.set_index(["router", "source"])["mass"]
    n_copies = int(copy_of.notna().sum())
    assert n_copies == report.settings["duplicates"]["n_pairs"] > 0
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isfinite(z).sum() == len(slices) - n_copies
    merged_trace = [t for t in fig.data if t.name == "copy merged under its first holder"]
    assert len(merged_trace) == 1 and len(merged_trace[0].x) == n_copies
    table = report.table.set_index(["router", "source"])
    labels = report.source_table.set_index(["router", "source"])["label"]
    for _, row in slices.iterrows():
        layer, sub = int(row["layer"]), row["sublayer"]
        r, c = _cell(fig, f"L{layer} {sub}", row["label"])
        text = fig.data[0].text[r][c]
        key = (row["router"], int(row["source"]))
        if not pd.isna(copy_of[key]):  # a copy: empty, marked, its mass in its first holder's cell
            holder = (row["router"], int(copy_of[key]))
            assert np.isnan(z[r, c]) and f"= {labels[holder]}" in list(merged_trace[0].text)
            assert z[_cell(fig, f"L{layer} {sub}", labels[holder])] == pytest.approx(mass_of[key] + mass_of[holder])
            assert f"the same tensor as {labels[holder]}" in merged_trace[0].hovertext[
                list(zip(merged_trace[0].y, merged_trace[0].x)).index((f"L{layer} {sub}", row["label"]))]
            continue
        copies = [k for k in copy_of.index if k[0] == key[0] and not pd.isna(copy_of[k]) and int(copy_of[k]) == key[1]]
        assert z[r, c] == pytest.approx(row["mass"] + sum(mass_of[k] for k in copies))
        assert row["router"] in text and f"source: {row['label']}" in text and f"family: {row['family']}" in text
        t_row = table.loc[key]
        copies = int(t_row["n_copies"])
        if copies == 1:  # a merged row's mass CI is the pair's, not this source's
            assert f"[{t_row['mass_low']:.3f}, {t_row['mass_high']:.3f}]" in text
        assert f"effect: {t_row['effect']:+.4f} [{t_row['effect_low']:+.4f}" in text
        assert f"flag: {t_row['flag'] or 'none'}" in text and f"merged copies: {copies}" in text


def test_effect_heatmap_and_scatter_carry_the_table(report):
    table = report.table
    heat = plot_effect_heatmap(report)
    z = np.asarray(heat.data[0].z, dtype=float)
    labels = report.source_table.set_index(["router", "source"])["label"]
    for _, row in table.iterrows():  # a merged row sits in its first holder's column
        r, c = _cell(heat, f"L{int(row['layer'])} {row['sublayer']}", labels[(row["router"], int(row["source"]))])
        assert z[r, c] == pytest.approx(row["effect"])
    assert heat.data[0].zmin == -heat.data[0].zmax == -np.abs(table["effect"]).max()
    scatter = plot_mass_effect_scatter(report)
    xs = np.concatenate([np.asarray(t.x) for t in scatter.data])
    assert sorted(xs) == pytest.approx(sorted(table["mass"]))
    for trace in scatter.data:
        for x, y, up, text in zip(trace.x, trace.y, trace.error_y.array, trace.text):
            row = table[(table["mass"] == x) & (table["effect"] == y)].iloc[0]
            assert up == pytest.approx(max(0.0, row["effect_high"] - row["effect"]))
            assert row["router"] in text


def test_merged_copies_show_in_the_hover(report):
    merged = report.table.copy()
    merged["n_copies"] = np.arange(len(merged)) % 3 + 1
    report2 = type(report)(**{**report.__dict__, "table": merged})
    fig = plot_effect_heatmap(report2)
    texts = [t for row in fig.data[0].text for t in row if t]
    counts = sorted(int(re.search(r"merged copies: (\d+)", t).group(1)) for t in texts)
    assert counts == sorted(merged["n_copies"].tolist())


@pytest.mark.parametrize("flavour,groups", [("cumulative", "family_band"), ("kimi", "family")])
def test_grouped_reports_lay_out_by_family(flavour, groups):
    model = tiny_attnres(flavour, "block", n_layers=3, n_blocks=3 if flavour == "cumulative" else 2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grouped = mass_vs_effect(model, _tokens(8, seed=2, batch=20), n_boot=60, gradient=False, groups=groups)
    heat = plot_effect_heatmap(grouped)
    assert set(heat.data[0].x) <= {"embedding", "current", "history"}
    if groups == "family":  # one row per router, the kimi final router last
        assert list(heat.data[0].y) == [f"L{l} {s}" for l in range(3) for s in ("attn", "mlp")] + ["final"]
    assert np.isfinite(np.asarray(heat.data[0].z, dtype=float)).sum() == len(grouped.table)
    plot_routing_heatmap(grouped)  # from the routing statistics
    no_routing = type(grouped)(**{**grouped.__dict__, "routing": None})
    with pytest.raises(ValueError, match="neither routing statistics"):
        plot_routing_heatmap(no_routing)


def test_token_routing_figure_and_circuitsvis_show_the_cached_weights(cumulative):
    text = "import os\nprint(os)"
    router = cumulative.router_specs[3].name
    _, cache = cumulative.run_with_cache(text, names_filter=[f"{router}.hook_weights"])
    expected = cache[f"{router}.hook_weights"][0].numpy()
    fig = plot_token_routing(cumulative, text, router)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), expected.T, atol=1e-6)
    assert len(fig.data[0].x) == len(cumulative.to_str_tokens(text))
    with pytest.raises(ValueError, match="unknown router 'blocks.7.mlp_router'"):
        plot_token_routing(cumulative, text, "blocks.7.mlp_router")
    cv = pytest.importorskip("circuitsvis")
    assert cv is not None
    rendered = token_routing_circuitsvis(cumulative, text, router)
    import json

    src = rendered.local_src
    assert "CircuitsVis.ColoredTokensMulti" in src
    props = json.loads(src[src.index("ColoredTokensMulti,") + len("ColoredTokensMulti,") : src.rindex(")")])
    spec = cumulative.router_specs[3]
    assert props["labels"] == [f"L1 mlp: {s.label} ({s.family})" for s in spec.sources]
    np.testing.assert_allclose(np.array(props["values"]), expected, atol=1e-6)
    assert len(props["tokens"]) == expected.shape[0]


def test_circuitsvis_missing_gives_an_install_hint(cumulative, monkeypatch):
    monkeypatch.setitem(sys.modules, "circuitsvis", None)
    monkeypatch.setitem(sys.modules, "circuitsvis.tokens", None)
    with pytest.raises(ImportError, match="pip install circuitsvis"):
        token_routing_circuitsvis(cumulative, "abc")


# ---------------------------------------------------------------------------- HTML
def test_figure_html_embeds_plotly_and_never_a_cdn(report):
    fig = plot_routing_heatmap(report)
    embedded = figure_html(fig)
    assert "plotly.js v" in embedded and _external(embedded) == [] and len(embedded) > 1_000_000
    bare = figure_html(fig, include_plotlyjs=False)
    assert "plotly.js v" not in bare and len(bare) < 200_000
    assert _external('<script src="https://cdn.plot.ly/plotly.min.js">') != []
    with pytest.raises(ValueError, match="a CDN is never used"):
        figure_html(fig, include_plotlyjs="cdn")


def test_html_report_is_self_contained(report, tmp_path):
    path = write_html_report({"tiny": report, "tiny again": report}, tmp_path / "report.html", title="T", intro="hi")
    page = path.read_text(encoding="utf-8")
    assert page.count("plotly.js v") == 1
    assert _external(page) == [] and not re.search(r"<script[^>]+src=", page)
    assert page.count('class="plotly-graph-div"') == 6
    assert 'id="tiny"' in page and 'id="tiny-again"' in page and "<p>hi</p>" in page
    assert report.table["name"].iloc[0] in page and "Routing statistics" in page


def test_html_report_checks_before_writing(report, tmp_path):
    with pytest.raises(TypeError, match="non-empty dict of model name"):
        write_html_report([report], tmp_path / "a.html")
    with pytest.raises(TypeError, match="non-empty dict"):
        write_html_report({}, tmp_path / "a.html")
    with pytest.raises(TypeError, match=r"reports\['x'\] is a str, not a MassEffectReport"):
        write_html_report({"x": "report"}, tmp_path / "a.html")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_html_report({"x": report}, tmp_path / "missing" / "a.html")
    assert list(tmp_path.iterdir()) == []


def test_importing_viz_loads_no_plotting_or_widget_library():
    code = (
        "import sys, attnres_lens.viz; "
        "print(sorted(m for m in ('plotly', 'ipywidgets', 'circuitsvis') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
