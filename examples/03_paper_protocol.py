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
# # 03 · The paper's protocol: wrapped vs trained routing
#
# *When Does Routing Become Interpretable?* compares a vanilla model wrapped with a routing
# schedule against a Block AttnRes model whose routing was trained, under identical interventions,
# and tests whether routing **mass** predicts causal **effect**. Here: the two bundled tiny models.
# Both are cumulative-flavour AttnRes models with one block per layer once loaded, so every slice
# of one has a counterpart in the other.

# %%
import torch
from attnres_lens import bundled, verify_schedule
from attnres_lens.attribution import routing_statistics, mass_vs_effect

torch.manual_seed(0)             # reproducible outputs (committed executed)
torch.set_num_threads(1)
wrapped = bundled.load_wrapped_baseline()      # vanilla Qwen3, recency schedule b = 3
trained = bundled.load_attnres()               # routing trained from zero-initialised routers
tokens = bundled.eval_tokens(trained, n_prompts=20, seq_len=64)
with torch.no_grad():
    losses = {name: m(tokens, return_type="loss").item() for name, m in (("wrapped", wrapped), ("trained", trained))}
print("loss (nats/byte):", losses)

# %% [markdown]
# ## 1. The wrap is exactly its schedule
#
# `verify_schedule` compares the routing weights seen at the hooks with the analytic recency
# schedule `e^b / (e^b + n - 1)`.

# %%
print("wrapped: max |observed - analytic| =", verify_schedule(wrapped, tokens))

# %% [markdown]
# ## 2. Only trained routing depends on content
#
# Content dependence (per router, in [0, 1]) measures how much the routing weights vary across
# tokens and prompts. It is exactly 0 for a schedule.

# %%
stats = {name: routing_statistics(m, tokens) for name, m in (("wrapped", wrapped), ("trained", trained))}
for name, st in stats.items():
    print(f"{name:8s} content dependence: max over routers {st.content_dependence:.4f}")
stats["trained"].routers[["router", "n_sources", "content_dependence", "entropy", "max_entropy"]]

# %% [markdown]
# ## 3. Mass vs effect
#
# `mass_vs_effect` zeroes each slice, measures the change in loss per prompt, and bootstraps mass
# and effect over prompts. Flags mark slices with appreciable mass and no detectable effect
# (*mass without causal role*) and the converse.

# %%
reports = {name: mass_vs_effect(m, tokens, groups="slice", mode="zero", metric="loss", n_boot=200, seed=0)
           for name, m in (("wrapped", wrapped), ("trained", trained))}
print(reports["trained"].summary())

# %%
reports["trained"].flags[["name", "mass", "effect", "flag", "reason"]]

# %%
reports["trained"].plot_scatter()

# %%
reports["trained"].plot_mass_heatmap()

# %%
reports["trained"].plot_effect_heatmap()

# %% [markdown]
# Which tokens route where: one prompt, token by token, at the last MLP router (the figures above
# average over every token). Every `plot_*` also takes `backend="plotly"` for an interactive
# figure with hover (see `05_interactive`).

# %%
from attnres_lens.attribution import plot_token_routing

plot_token_routing(trained, "def add(a, b):\n    return a + b\n", router=(3, "mlp"))

# %% [markdown]
# Per family x sublayer x depth band (early/late halves of the layers), for both models:

# %%
for name, m in (("wrapped", wrapped), ("trained", trained)):
    band = mass_vs_effect(m, tokens, groups="family_band", mode="mask", n_boot=200, seed=0)
    print(f"--- {name}")
    print(band.table[["name", "mass", "effect", "effect_low", "effect_high", "flag"]].to_string(index=False))

# %% [markdown]
# ## 4. All of it in one call
#
# `attnres_lens.protocol.run_protocol` (what `attnres-lens demo` and `attnres-lens probe` run)
# writes `report.md`, `report.html` (interactive figures), `summary.json` and the figures.

# %%
from attnres_lens.protocol import Subject, run_protocol

result = run_protocol(
    [Subject("wrapped", wrapped, "vanilla Qwen3, recency schedule b = 3"),
     Subject("trained", trained, "Block AttnRes, trained routing")],
    tokens, "protocol-report", groups=("slice",), n_boot=200, progress=False,
)
print(result.table())
print(sorted(result.summary["models"]["trained"]))
