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
# # 01 · Quickstart: load, cache, read the routing
#
# `attnres_lens` exposes the routing of Block Attention Residuals (AttnRes) models as TransformerLens
# hook points. This notebook uses the two tiny byte-level models bundled with the library:
#
# - `attnres-cumulative-tiny`: a Block AttnRes model (cumulative flavour) whose routing was trained;
# - `qwen3-tiny`: a standard-residual Qwen3 of the same shape, which we *wrap* as an AttnRes model.
#
# Everything runs on a CPU in seconds.

# %%
import torch
import matplotlib.pyplot as plt
from attnres_lens import HookedAttnResTransformer, bundled, verify_schedule, expected_weights_table

torch.set_grad_enabled(False)   # inference only in this notebook
torch.manual_seed(0)             # reproducible outputs (committed executed)
torch.set_num_threads(1)
trained = bundled.load_attnres()
print(trained.extra_repr())
print(f"{sum(p.numel() for p in trained.parameters()):,} parameters; tokenizer: {trained.tokenizer}")

# %% [markdown]
# ## Load or wrap
#
# `from_pretrained` detects what a directory (or an in-memory Hugging Face model) holds. A vanilla
# Qwen3 has no routers, so it is *wrapped* with a schedule that reproduces it: `kimi` + `uniform`
# (every router averages its sources) or `cumulative` + `recency` with a bias `b`.

# %%
hf_qwen3 = bundled.load_baseline_hf()                     # a transformers.Qwen3ForCausalLM
uniform = HookedAttnResTransformer.from_pretrained(hf_qwen3, flavour="kimi")
recency = bundled.load_wrapped_baseline(recency_bias=3.0)  # cumulative flavour, b = 3

tokens = trained.to_tokens("def greet(name):\n    return 'hello ' + name\n")
with torch.no_grad():
    hf_logits = hf_qwen3(input_ids=tokens).logits
print("uniform wrap vs Hugging Face logits, max |diff|:", float((uniform(tokens) - hf_logits).abs().max()))
print("schedules:", uniform.schedule, recency.schedule, trained.schedule, sep="\n  ")

# %% [markdown]
# ## Run with a cache
#
# Every router exposes `hook_sources` `[batch, pos, source, d_model]`, `hook_logits` and
# `hook_weights` `[batch, pos, source]` (the routing mass, alpha) and `hook_out`.

# %%
logits, cache = trained.run_with_cache(tokens)
router_hooks = [name for name in cache.keys() if name.endswith("router.hook_weights")]
print(router_hooks)
alpha = cache["blocks.3.mlp_router.hook_weights"]
print("alpha:", tuple(alpha.shape), "sums to 1:", torch.allclose(alpha.sum(-1), torch.ones(1)))
print("greedy next bytes:", repr(trained.to_string(logits.argmax(-1)[0])))

# %% [markdown]
# ## The source table
#
# What does source `i` of a router mean? `source_table()` answers for every router: its family
# (`embedding`, `history`, `current`) and a label.

# %%
table = trained.source_table()
table[table.router == "blocks.3.mlp_router"]

# %% [markdown]
# ## A routing heatmap
#
# Mean routing mass per router (rows) and source (columns) on a few hundred bytes of held-out
# text: the layer-dependency view of the Kimi report.

# %%
text_tokens = bundled.eval_tokens(trained, n_prompts=8, seq_len=128)
_, cache = trained.run_with_cache(text_tokens, names_filter=lambda n: n.endswith("router.hook_weights"))

labels = list(dict.fromkeys(table.sort_values("source").label))
labels = ["emb"] + [l for l in labels if l not in ("emb", "stream")] + ["stream"]
routers = list(dict.fromkeys(table.router))
grid = torch.full((len(routers), len(labels)), float("nan"))
for r, router in enumerate(routers):
    mass = cache[f"{router}.hook_weights"].mean(dim=(0, 1))
    for _, row in table[table.router == router].iterrows():
        grid[r, labels.index(row.label)] = mass[row.source]

fig, ax = plt.subplots(figsize=(6, 4))
im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1)
ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
ax.set_yticks(range(len(routers)), [r.replace("blocks.", "L").replace("_router", "") for r in routers])
fig.colorbar(im, label="mean routing weight")
ax.set_title("trained model: routing mass")
fig.tight_layout()

# %% [markdown]
# Token by token, for one prompt (`attnres_lens.attribution.plot_token_routing`):

# %%
from attnres_lens.attribution import plot_token_routing

plot_token_routing(trained, "for i in range(10):\n    print(i)\n", router=[(1, "attn"), (3, "mlp")])

# %% [markdown]
# ## A wrap's routing is a checkable schedule
#
# With zero queries and bias `b`, a router with `n` sources puts `e^b / (e^b + n - 1)` on the current
# stream, whatever the input. `verify_schedule` returns the largest deviation of the weights observed
# at the hooks from that prediction.

# %%
print("recency wrap, max |observed - analytic|:", verify_schedule(recency, text_tokens))
expected_weights_table(recency).head(7)

# %%
try:
    verify_schedule(trained, text_tokens)
except ValueError as err:
    print("trained model:", err)
