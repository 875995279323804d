# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Interactive: plotly figures, token views and a live explorer
#
# `attnres_lens.viz` draws the routing and the mass-vs-effect results as interactive plotly
# figures (hover any cell for router, source, family, mass and effect with their CIs, the flag),
# shows which tokens route where (plotly and circuitsvis), and opens a live explorer where you
# zero, mask, scale or patch slices and see the predictions change at once.
#
# Everything runs offline on the two tiny models bundled with the library, on a CPU.
# The source of this notebook is `05_interactive.py` (a jupytext percent script); regenerate the
# notebook with `jupytext --to notebook --execute examples/05_interactive.py`.
#
# On GitHub, which does not run JavaScript, the figures below do not show; open the notebook in
# Jupyter, VS Code or nbviewer, or see the screenshots at the end.

# %%
import warnings

import plotly.io as pio
import torch

from attnres_lens import bundled, mass_vs_effect, viz

torch.set_num_threads(1)
torch.set_grad_enabled(False)
# plotly.js is written into the notebook once (no CDN), so the figures render offline
pio.renderers.default = "plotly_mimetype+notebook"

trained = bundled.load_attnres()
wrapped = bundled.load_wrapped_baseline()
tokens = bundled.eval_tokens(trained, n_prompts=20, seq_len=64)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 20 short prompts: rough but honest CIs for a demo
    reports = {
        "trained": mass_vs_effect(trained, tokens, n_boot=200, seed=0),
        "wrapped": mass_vs_effect(wrapped, tokens, n_boot=200, seed=0),
    }
print(reports["trained"].summary())

# %% [markdown]
# ## Routing mass: routers x sources
#
# Each cell is one depth-source slice: how much weight (mean alpha over tokens) the router puts
# on that source. Hover for the router, the source's label and family, the mass with its
# bootstrap CI, the effect of ablating it with its CI, its flag and how many copies were merged.

# %%
viz.plot_routing_heatmap(reports["trained"], title="trained: routing mass (mean alpha over tokens)")

# %% [markdown]
# ## Effect of zeroing each slice
#
# Red: the loss goes up when the slice is zeroed. Open circles: the effect's CI includes 0.
# Squares: the flags (much mass but no causal role, or a causal role with little mass).

# %%
viz.plot_effect_heatmap(reports["trained"])

# %%
viz.plot_mass_effect_scatter(reports["trained"])

# %% [markdown]
# The wrapped baseline routes by a fixed schedule (the recency bias), so its mass is the same at
# every token; compare where its effects sit.

# %%
viz.plot_mass_effect_scatter(reports["wrapped"], title="wrapped: mass vs effect")

# %% [markdown]
# ## Which tokens route where
#
# One prompt, one router: sources x tokens, hover for alpha.

# %%
text = trained.to_string(bundled.eval_tokens(trained, n_prompts=1, seq_len=128)[0])
other = trained.to_string(bundled.eval_tokens(trained, n_prompts=3, seq_len=128)[1])
viz.plot_token_routing(trained, text, "blocks.3.mlp_router")

# %% [markdown]
# The same with circuitsvis (optional: `pip install circuitsvis`): pick a source in the widget to
# colour the tokens by its weight; hover a token for all of them.

# %%
try:
    view = viz.token_routing_circuitsvis(trained, text, "blocks.3.mlp_router")
except ImportError as err:
    view = str(err)
view

# %% [markdown]
# ## The live explorer
#
# Pick a router; the prompt's tokens are shaded by their weight on one source (hover a token for
# all its weights). Set any source of any router to zero, mask, scale or patch (from the second
# prompt, same length): the metric, the top-5 next-token predictions and the loss per token update
# at once, rerunning only the sublayers after the earliest intervened router. "export code" writes
# the interventions as Python.

# %%
explorer = viz.explore(trained, text, patch_text=other, router="blocks.3.mlp_router")
explorer

# %% [markdown]
# What a click does, in code: the explorer's logic is a plain `ExplorerSession`.

# %%
session = explorer.session
session.set_choice("blocks.0.mlp_router", 0, "zero")                   # L0 mlp reads no embedding
session.set_choice("blocks.2.attn_router", 3, "scale", factor=0.5)     # L2 attn: the stream, halved
session.set_choice("blocks.3.mlp_router", 0, "patch", target="weight")  # L3 mlp: emb weight from the other prompt
explorer.update()
result = session.result()
print(f"loss: clean {result.metric_clean:.4f} -> intervened {result.metric_intervened:.4f}")
print(f"reran sublayers {result.rerun_from}.. in {1000 * result.seconds:.1f} ms")
print("top-5 clean:     ", [(p.token, round(p.prob, 3)) for p in result.top_clean])
print("top-5 intervened:", [(p.token, round(p.prob, 3)) for p in result.top_intervened])

# %%
print(session.code(include_run=False))

# %% [markdown]
# ## Files to share
#
# An explorer snapshot (the current view, self-contained) and the HTML report of both models:
# one page, plotly.js embedded once, opens offline by double-click.

# %%
explorer.snapshot_html("explorer.html")
path = viz.write_html_report(reports, "report.html", title="Bundled models: mass vs effect")
print(path, f"{path.stat().st_size / 1e6:.1f} MB")

# %% [markdown]
# Screenshots of the two pages in headless Chromium (what `tests/test_browser.py` checks):
#
# ![report.html](../docs/img/report.png)
#
# ![explorer snapshot](../docs/img/explorer.png)
