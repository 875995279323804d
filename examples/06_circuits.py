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
# # 06 · Depth circuits: routing edges as a circuit graph
#
# Every routing weight of a Block AttnRes model is an edge (source `i` feeds router `r` with
# mass `alpha[r, i]`). This notebook builds the depth graph of the bundled trained model,
# scores every edge exactly and with EAP / EAP-IG, patches a path, and discovers circuits,
# checking every fast ranking by exact evaluation of the circuits it picks (`docs/circuits.md`).
#
# Everything runs offline on the tiny bundled model, on a CPU. The source of this notebook is
# `06_circuits.py` (a jupytext percent script).

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
import plotly.io as pio
import torch
from scipy.stats import spearmanr

from attnres_lens import bundled
from attnres_lens.circuits import Circuit, DepthGraph, circuit_figure, discover, faithfulness, score_edges
from attnres_lens.circuits.paths import path_patch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="bootstrap CIs over only")
pio.renderers.default = "plotly_mimetype+notebook"

model = bundled.load_attnres()
graph = DepthGraph.from_model(model)
windows = bundled.eval_tokens(model, n_prompts=24, seq_len=32)
clean, corrupt = windows[:12], windows[12:]
print(f"{len(graph.nodes)} nodes, {len(graph.edges)} edges, {len(graph.routing_edges)} routing edges")

# %% [markdown]
# ## Edge scores: exact, EAP, EAP-IG on one API
# Ablating an edge replaces that one router's read of the source by the corrupted run's
# (`ablation="corrupt"`); every other reader stays clean.

# %%
exact = score_edges(model, clean, corrupt, metric="loss")
eap = score_edges(model, clean, corrupt, metric="loss", method="eap")
eap_ig = score_edges(model, clean, corrupt, metric="loss", method="eap_ig", steps=4)
for name, scores in (("eap", eap), ("eap_ig", eap_ig)):
    rho = spearmanr(np.abs(scores.score), np.abs(exact.score))[0]
    overlap = len(set(scores.top(5)) & set(exact.top(5)))
    print(f"{name:7s} Spearman |.| vs exact {rho:+.3f}, top-5 overlap {overlap}/5")
exact.table().sort_values("abs_rank").head(8)

# %% [markdown]
# ## Path patching: the embedding's effect along one route only

# %%
route = ["embed", "src[-1]", "blocks.1.attn_router", "attn.1", "src[-1,0,1,2]", "blocks.1.mlp_router",
         "mlp.1", "src[-1,0,1,2,3,4,5,6,7]", "logits"]
print(f"effect along the route: {path_patch(model, clean, corrupt, route).mean():+.4f} nats")

# %% [markdown]
# ## Faithfulness curves: every method's circuits evaluated exactly

# %%
sizes = [0, 2, 4, 6, 8, 10, 14, 18, 24]
curves = {method: discover(model, clean, "loss", method, corrupt=corrupt, sizes=sizes, steps=4, per_round=3,
                           n_boot=200)
          for method in ("exact_greedy", "exact", "eap", "eap_ig")}
fig, ax = plt.subplots(figsize=(6, 3.5))
for method, curve in curves.items():
    f = curve.faithfulness
    ax.errorbar(curve.sizes, f.estimate, yerr=[f.estimate - f.low, f.high - f.estimate], label=f"{method} (AUC {curve.auc:.2f})",
                marker="o", capsize=2)
ax.set_xlabel("routing edges kept")
ax.set_ylabel("faithfulness")
ax.legend()
plt.show()

# %% [markdown]
# ## The discovered circuit

# %%
circuit = curves["exact_greedy"].circuit(10)
f = faithfulness(model, circuit, clean, "loss", corrupt=corrupt, n_boot=200)
print(f"exact greedy, 10 edges: faithfulness {f.estimate[0]:.3f} [{f.low[0]:.3f}, {f.high[0]:.3f}]")
print(Circuit.from_json(circuit.to_json()) == circuit)
circuit_figure(graph, exact, circuit)
