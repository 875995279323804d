"""Depth circuits (issue P): the graph, edge scores, path patching, circuits, faithfulness,
discovery and the planted route, on both flavours. Tiny models; every check can fail."""

import json
import warnings

import numpy as np
import pytest
import torch
from reference import no_hooks_left, tiny_attnres

from attnres_lens import sweep_sources
from attnres_lens.attribution.estimate import estimate_effects
from attnres_lens.cache import source_members
from attnres_lens.circuits import (
    Ablation,
    EdgeEffects,
    Circuit,
    DepthGraph,
    circuit_ablated,
    discover,
    faithfulness,
    score_edges,
)
from attnres_lens.circuits.eap import gradient_edge_effects, path_points
from attnres_lens.circuits.faithfulness import measure_faithfulness
from attnres_lens.circuits.paths import path_patch
from attnres_lens.circuits.runs import AblatedRuns
from attnres_lens.metrics import Metric, logit_diff_metric, per_prompt_loss
from attnres_lens.selection import sweep_units


def prompts(n=6, pos=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 250, (n, pos), generator=g), torch.randint(1, 250, (n, pos), generator=g)


# ============================================================================ the graph
def test_graph_routing_edges_are_the_merged_slices(model):
    graph = DepthGraph.from_model(model)
    units = sweep_units(model, "slice", merge_duplicates=True)
    assert [e.key for e in graph.routing_edges] == [(u.router, u.source) for u in units]
    assert [e.slices for e in graph.routing_edges] == [u.slices for u in units]
    # every (router, source) of the model is in exactly one routing edge
    held = sorted(pair for e in graph.routing_edges for pair in e.slices)
    assert held == sorted((s.name, src.index) for s in model.router_specs for src in s.sources)
    members = source_members(model.cfg)
    for edge in graph.routing_edges:
        node = graph.node(edge.src)
        assert node.kind == "source"
        for index in edge.sources:
            assert sorted(members[edge.router][index]) == list(node.members)
        writers = {e.src for e in graph.edges if e.dst == node.id and e.kind == "writes"}
        expected = {"embed" if m == -1 else f"{'mlp' if m % 2 else 'attn'}.{m // 2}" for m in node.members}
        assert writers == expected


def test_graph_merges_the_cumulative_copies_and_reads_out(model):
    graph = DepthGraph.from_model(model)
    first = graph.routing_edges[0]
    assert first.router == "blocks.0.attn_router"
    if model.cfg.flavour == "cumulative":
        assert first.sources == (0, 1)  # the embedding is both H[0] and x
        (readout,) = graph.filter(kind="readout")
        assert graph.node(readout.src).members == tuple(range(-1, model.cfg.n_sublayers))
    else:
        assert first.sources == (0,)
        assert not graph.filter(kind="readout")
        assert [e.id for e in graph.filter(router=None, kind="reads") if e.dst == "logits"] == ["final_router -> logits"]


def test_graph_is_a_plain_value(model, tmp_path):
    graph = DepthGraph.from_model(model)
    assert len(list(graph)) == len(graph.edges)
    assert DepthGraph.from_json(graph.to_json()) == graph
    graph.to_json(tmp_path / "g.json")
    assert DepthGraph.from_json(tmp_path / "g.json") == graph
    assert json.loads(graph.to_json())["format"] == 1
    at_final = graph.filter(lambda e: e.dst == "logits")
    assert len(at_final) == 1
    with pytest.raises(ValueError, match="unknown edge kind 'route'"):
        graph.filter(kind="route")
    with pytest.raises(KeyError, match="no node 'nope'"):
        graph.node("nope")


def test_graph_with_heads(model):
    graph = DepthGraph.from_model(model, heads=True)
    heads = [n for n in graph.nodes if n.kind == "head"]
    assert len(heads) == model.cfg.n_layers * model.cfg.n_heads
    assert not [n for n in graph.nodes if n.kind == "attn"]
    reads = graph.filter(kind="reads", router="blocks.1.attn_router") or [
        e for e in graph.edges if e.src == "blocks.1.attn_router"]
    assert {e.dst for e in reads} == {f"attn.1.h{h}" for h in range(model.cfg.n_heads)}
    with pytest.raises(TypeError, match="heads"):
        DepthGraph.from_model(model, heads=1)


# ============================================================================ exact scores
@pytest.mark.parametrize("ablation", ["corrupt", "mean", "zero"])
def test_exact_edge_scores_are_the_sweeps_slices(model, ablation):
    clean, corrupt = prompts()
    scores = score_edges(model, clean, corrupt if ablation == "corrupt" else None, ablation=ablation)
    kwargs = {"corrupt": dict(mode="patch", target="source", reference=corrupt),
              "mean": dict(mode="mean", target="source"), "zero": dict(mode="zero")}[ablation]
    sweep = sweep_sources(model, clean, progress=False, **kwargs)
    assert scores.keys == tuple(DepthGraph.from_model(model).routing_edges[i].id for i in range(len(sweep)))
    np.testing.assert_allclose(scores.effect, np.stack(sweep["effect_per_prompt"]), atol=2e-5)
    np.testing.assert_allclose(scores.mass, np.stack(sweep["mass_per_prompt"]), atol=1e-6)
    assert np.abs(scores.score).max() > 1e-3  # the edges do something on this model
    table = scores.table()
    assert list(table.columns) == ["edge", "mass", "effect", "abs_rank"]
    assert table.loc[table["abs_rank"] == 1, "edge"].item() == scores.ranking()[0]


def test_score_edges_refuses_bad_input(model):
    clean, corrupt = prompts()
    with pytest.raises(ValueError, match="unknown method 'acdc'"):
        score_edges(model, clean, corrupt, method="acdc")
    with pytest.raises(ValueError, match="'readout' estimates the 'zero' ablation"):
        score_edges(model, clean, corrupt, method="readout")
    with pytest.raises(ValueError, match="needs reference tokens"):
        score_edges(model, clean, ablation="corrupt")
    with pytest.raises(ValueError, match="corrupted tokens have shape"):
        score_edges(model, clean, corrupt[:3])
    with pytest.raises(ValueError, match="metric 'kl' has value and gradient 0"):
        score_edges(model, clean, corrupt, method="eap", metric="kl")
    with pytest.raises(ValueError, match="eap_ig' with ablation 'zero' is degenerate"):
        score_edges(model, clean, ablation="zero", method="eap_ig")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        score_edges(model, clean, corrupt, method="eap_ig", steps=0)


# ============================================================================ EAP, EAP-IG
def test_eap_is_the_first_order_term_of_exact_patching(model):
    """Moving every read by a small step: EAP's estimate and the exact effect agree to second order."""
    clean, _ = prompts()
    graph = DepthGraph.from_model(model)
    reads = Ablation.build(model, "mean", clean, clean).values
    errors = []
    for eps in (1e-2, 3e-3):
        gen = torch.Generator().manual_seed(0)
        moved = Ablation("corrupt", {k: v + eps * v.abs().mean() * torch.randn(v.shape, generator=gen)
                                     for k, v in reads.items()})
        runs = AblatedRuns.start(model, graph, clean, Metric.resolve("loss"), moved)
        exact = runs.metrics([[e] for e in graph.routing_edges]) - runs.clean_metric
        estimate = gradient_edge_effects(model, clean, per_prompt_loss, graph.routing_edges, moved, [0.0])
        assert np.abs(exact).max() > 1e-5
        errors.append(np.abs(exact - estimate).max() / np.abs(exact).max())
    assert errors[0] < 0.05 and errors[1] < errors[0] / 2


def test_eap_ig_is_complete(model):
    """EAP-IG's scores sum to the effect of ablating every edge, the more closely the more steps."""
    clean, corrupt = prompts()
    graph = DepthGraph.from_model(model)
    abl = Ablation.build(model, "corrupt", clean, corrupt)
    runs = AblatedRuns.start(model, graph, clean, Metric.resolve("loss"), abl)
    everything = runs.metrics([graph.routing_edges])[0] - runs.clean_metric
    gaps = [np.abs(gradient_edge_effects(model, clean, per_prompt_loss, graph.routing_edges, abl,
                                         path_points(k)).sum(0) - everything).max() for k in (2, 16)]
    assert np.abs(everything).max() > 1e-2
    assert gaps[1] < 0.15 * np.abs(everything).max() and gaps[1] < gaps[0] / 3


def test_estimators_are_methods_of_score_edges(model):
    clean, _ = prompts()
    scores = score_edges(model, clean, ablation="zero", method="readout")
    table = estimate_effects(model, clean, mode="zero", method="readout")
    np.testing.assert_allclose(scores.effect, np.stack(table["estimate_per_prompt"]), atol=1e-6)
    assert scores.method == "readout" and scores.ablation == "zero"


# ============================================================================ circuits, faithfulness
def test_circuit_json_and_context_manager(model, tmp_path):
    clean, corrupt = prompts(12)
    graph = DepthGraph.from_model(model)
    circuit = Circuit.of(graph.routing_edges[::3], label="every third")
    assert Circuit.from_json(circuit.to_json()) == circuit
    circuit.to_json(tmp_path / "c.json")
    assert Circuit.from_json(tmp_path / "c.json") == circuit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = faithfulness(model, circuit, clean, corrupt=corrupt, n_boot=40)
    with circuit_ablated(model, circuit, "corrupt", reference=corrupt):
        logits = model(clean)
    assert no_hooks_left(model)
    np.testing.assert_allclose(per_prompt_loss(logits, clean).mean().item(), f.metric[0], atol=1e-5)
    assert f.low[0] <= f.estimate[0] <= f.high[0]
    with pytest.raises(RuntimeError, match="boom"):
        with circuit_ablated(model, circuit, "mean", reference=clean):
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    with pytest.raises(KeyError, match="the circuit names 1 edge"):
        with circuit_ablated(model, Circuit.of(["embed -> nowhere"]), "zero"):
            pass
    with pytest.raises(ValueError, match="unknown ablation 'resample'"):
        with circuit_ablated(model, circuit, "resample"):
            pass
    assert no_hooks_left(model)


def test_faithfulness_of_full_and_empty(model):
    clean, corrupt = prompts(12)
    graph = DepthGraph.from_model(model)
    runs = AblatedRuns.start(model, graph, clean, Metric.resolve("loss"),
                             Ablation.build(model, "corrupt", clean, corrupt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = measure_faithfulness(runs, [Circuit.of(graph.routing_edges), Circuit.of([])], n_boot=40)
    np.testing.assert_allclose(f.estimate, [1.0, 0.0], atol=1e-9)
    assert f.empty != f.full


# ============================================================================ discovery
@pytest.mark.parametrize("method", ["exact_greedy", "eap_ig"])
def test_discover_evaluates_every_circuit_exactly(model, method):
    clean, corrupt = prompts(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = discover(model, clean, corrupt=corrupt, method=method, sizes=[0, 2, 5, len(DepthGraph.from_model(model).routing_edges)],
                         n_boot=40, per_round=4)
        check = faithfulness(model, curve.circuit(5), clean, corrupt=corrupt, n_boot=40)
    assert curve.at(0) == pytest.approx(0.0) and curve.faithfulness.estimate[-1] == pytest.approx(1.0)
    assert curve.at(5) == pytest.approx(check.estimate[0], abs=1e-9)
    assert set(curve.circuit(2).edges) <= set(curve.circuit(5).edges)
    assert 0.0 <= curve.auc <= 1.5
    assert len(curve.order) == len(DepthGraph.from_model(model).routing_edges)


def test_exact_greedy_beats_a_bad_ranking(kimi):
    """The greedy's small circuits recover more than circuits of the *least* important edges."""
    clean, corrupt = prompts(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = discover(kimi, clean, corrupt=corrupt, method="exact_greedy", sizes=[4], n_boot=40, per_round=3)
        worst = faithfulness(kimi, Circuit.of(curve.order[-4:]), clean, corrupt=corrupt, n_boot=40)
    assert curve.at(4) > worst.estimate[0] + 0.2


# ============================================================================ the planted route
def planted(flavour):
    """Only attention 0 writes anything (every other sublayer's output projection is zero); the
    prompts differ at position 0 only, and the metric reads the last position. So the corrupted
    token reaches the metric only by attention 0 copying it from position 0: through the edge
    embedding -> blocks.0.attn_router and, in kimi, the final router's read of the block holding
    attention 0 (the cumulative readout reads the stream itself, which is no routing edge)."""
    model = tiny_attnres(flavour, seed=3)
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            block.mlp.down_proj.weight.zero_()
            if layer:
                block.attn.o_proj.weight.zero_()
        model.blocks[0].attn.o_proj.weight.mul_(4.0)
    clean = torch.randint(1, 250, (12, 6), generator=torch.Generator().manual_seed(5))
    corrupt = clean.clone()
    corrupt[:, 0] = (clean[:, 0] + 17) % 250 + 1
    metric = logit_diff_metric(clean[:, 0], corrupt[:, 0], position=-1)
    route = {"src[-1] -> blocks.0.attn_router"}
    if flavour == "kimi":
        route.add("src[0,1,2,3] -> final_router")
    return model, clean, corrupt, metric, route


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_planted_route_is_recovered_by_every_method(flavour):
    model, clean, corrupt, metric, route = planted(flavour)
    exact = score_edges(model, clean, corrupt, metric=metric)
    inert = [k for k in exact.keys if k not in route]
    assert np.abs(exact.effect[[exact.keys.index(k) for k in route]]).mean() > 1e-2
    assert np.abs(exact.effect[[exact.keys.index(k) for k in inert]]).max() < 1e-6
    for method in ("exact", "eap", "eap_ig"):
        scores = exact if method == "exact" else score_edges(model, clean, corrupt, metric=metric, method=method,
                                                             steps=4)
        assert set(scores.top(len(route))) == route, method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("exact_greedy", "eap", "eap_ig"):
            curve = discover(model, clean, metric, method, corrupt=corrupt, sizes=[len(route)], n_boot=40,
                             per_round=8, steps=4)
            assert set(curve.circuit(len(route)).edges) == route, method
            assert curve.at(len(route)) == pytest.approx(1.0, abs=1e-4), method


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_planted_route_under_zero_ablation_by_the_estimators(flavour):
    """``alpha := 0`` also removes the embedding's direct read by the kimi final router, which
    moves the logits at the last position: by construction that edge carries the metric too."""
    model, clean, _, metric, route = planted(flavour)
    if flavour == "kimi":
        route = route | {"src[-1] -> final_router"}
    exact = score_edges(model, clean, ablation="zero", metric=metric)
    inert = [i for i, k in enumerate(exact.keys) if k not in route]
    assert np.abs(exact.effect[inert]).max() < 1e-6
    for method in ("exact", "eap", "gradient", "norm_fix", "readout"):
        scores = exact if method == "exact" else score_edges(model, clean, ablation="zero", metric=metric, method=method)
        assert set(scores.top(len(route))) == route, method


# ============================================================================ path patching
def hand_path_patch(model, clean, corrupt, steps, final, stream_hook=None):
    """Path patching by hand: ``steps`` are (router, source indices, output hook of the node it
    feeds); the sender is the embedding; ``final``: the readout's (router, indices) or None
    (then ``stream_hook`` takes the change)."""
    store = {}
    model.run_with_hooks(corrupt, fwd_hooks=[("hook_embed", lambda x, hook: store.__setitem__("e", x.clone()))])
    model.run_with_hooks(clean, fwd_hooks=[("hook_embed", lambda x, hook: store.__setitem__("c", x.clone()))])
    delta = store["e"] - store["c"]
    for router, indices, out_hook in steps:
        def add(x, hook, d=delta, s=indices):
            x = x.clone()
            for i in s:
                x[:, :, i] += d
            return x

        def grab(x, hook, key):
            store[key] = x.clone()

        model.run_with_hooks(clean, fwd_hooks=[(f"{router}.hook_sources", add),
                                               (out_hook, lambda x, hook: grab(x, hook, "new"))])
        model.run_with_hooks(clean, fwd_hooks=[(out_hook, lambda x, hook: grab(x, hook, "old"))])
        delta = store["new"] - store["old"]
    if final is not None:
        router, indices = final

        def add_final(x, hook, d=delta):
            x = x.clone()
            for i in indices:
                x[:, :, i] += d
            return x

        logits = model.run_with_hooks(clean, fwd_hooks=[(f"{router}.hook_sources", add_final)])
    else:
        logits = model.run_with_hooks(clean, fwd_hooks=[(stream_hook, lambda x, hook: x + delta)])
    return (per_prompt_loss(logits, clean) - per_prompt_loss(model(clean), clean)).numpy()


def test_path_patching_matches_hand_written_hooks_kimi(kimi):
    clean, corrupt = prompts(4)
    route = ["embed", "src[-1]", "blocks.1.attn_router", "attn.1", "src[0,1,2,3]", "blocks.2.mlp_router",
             "mlp.2", "src[4,5,6,7]", "final_router", "logits"]
    with torch.no_grad():
        ours = path_patch(kimi, clean, corrupt, route)
        spec = {s.name: s for s in kimi.router_specs}
        assert spec["blocks.2.mlp_router"].sources[1].label == "block 0"
        hand = hand_path_patch(kimi, clean, corrupt,
                               [("blocks.1.attn_router", [0], "blocks.1.hook_attn_out"),
                                ("blocks.2.mlp_router", [1], "blocks.2.hook_mlp_out")],
                               ("final_router", [2]))
    np.testing.assert_allclose(ours, hand, atol=1e-6)
    assert np.abs(ours).max() > 1e-4
    assert no_hooks_left(kimi)


def test_path_patching_matches_hand_written_hooks_cumulative():
    model = tiny_attnres("cumulative")
    clean, corrupt = prompts(4)
    route = ["embed", "src[-1]", "blocks.0.attn_router", "attn.0", "src[-1,0,1,2]", "blocks.1.mlp_router",
             "mlp.1", "src[-1,0,1,2,3,4,5,6,7]", "logits"]
    graph = DepthGraph.from_model(model)
    read = graph.routing_edge("blocks.1.mlp_router", 0)
    assert graph.edge("src[-1,0,1,2] -> blocks.1.mlp_router").sources == (1,)
    with torch.no_grad():
        ours = path_patch(model, clean, corrupt, route, graph=graph)
        hand = hand_path_patch(model, clean, corrupt,
                               [("blocks.0.attn_router", [0, 1], "blocks.0.hook_attn_out"),
                                ("blocks.1.mlp_router", [1], "blocks.1.hook_mlp_out")],
                               None, stream_hook="blocks.3.hook_resid_post")
    np.testing.assert_allclose(ours, hand, atol=1e-6)
    assert np.abs(ours).max() > 1e-4
    assert read.sources == (0,)


def test_path_patching_of_a_head_and_bad_routes(kimi):
    clean, corrupt = prompts(4)
    graph = DepthGraph.from_model(kimi, heads=True)
    with torch.no_grad():
        heads = [path_patch(kimi, clean, corrupt, [f"attn.1.h{h}", "src[0,1,2,3]", "final_router", "logits"],
                            graph=graph) for h in range(kimi.cfg.n_heads)]
        whole = path_patch(kimi, clean, corrupt, ["attn.1", "src[0,1,2,3]", "final_router", "logits"])
    assert all(np.abs(h).max() > 0 for h in heads)
    assert not np.allclose(heads[0], whole)
    with pytest.raises(ValueError, match="no edge of the graph"):
        path_patch(kimi, clean, corrupt, ["embed", "src[-1]", "logits"])
    with pytest.raises(ValueError, match="starts at the embedding, a sublayer or a head"):
        path_patch(kimi, clean, corrupt, ["src[-1]", "final_router", "logits"])
    assert no_hooks_left(kimi)


# ============================================================================ the figure
def test_circuit_figure_shows_scores_mass_and_the_circuit(model, tmp_path):
    pytest.importorskip("plotly")
    from attnres_lens.circuits import circuit_figure

    clean, corrupt = prompts(4)
    graph = DepthGraph.from_model(model)
    scores = score_edges(model, clean, corrupt, graph=graph)
    circuit = Circuit.of(scores.top(3))
    fig = circuit_figure(graph, scores, circuit, path=tmp_path / "c.html")
    hover = next(t for t in fig.data if t.name == "routing edges")
    assert list(hover.customdata) == list(scores.keys)
    np.testing.assert_allclose(hover.marker.color, scores.score)
    assert hover.marker.cmin == -np.abs(scores.score).max()
    top = scores.keys.index(scores.ranking()[0])
    assert f"mass: {scores.mass[top].mean():.3f}" in hover.text[top]
    assert f"effect: {scores.score[top]:+.4f}" in hover.text[top] and "in circuit: yes" in hover.text[top]
    lines = {t.name: t for t in fig.data if t.name in scores.keys}
    assert {k for k, t in lines.items() if t.line.dash == "solid"} == set(circuit.edges)
    widths = np.array([lines[k].line.width for k in scores.keys])
    assert widths[top] == widths.max()
    html = (tmp_path / "c.html").read_text()
    assert '<script src="http' not in html and len(html) > 1_000_000  # plotly.js embedded: opens offline
    with pytest.raises(ValueError, match="must end in .html"):
        circuit_figure(graph, scores, path=tmp_path / "c.png")
    with pytest.raises(ValueError, match="one row per routing edge"):
        circuit_figure(graph, EdgeEffects(scores.keys[:2], scores.effect[:2], scores.mass[:2], scores.clean, "x", "y"))
