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
# # 02 · Interventions on depth-source slices
#
# A *depth-source slice* is one source `i` of one router. `attnres_lens.interventions` describes an
# intervention as a small value (where, how, with what) that turns into TransformerLens hooks;
# `attnres_lens.patching` has TL-style patching and fast exact sweeps. Definitions of every mode
# are in the module docstring: `zero` sets `alpha_i := 0` after the softmax, `mask` sets
# `logit_i := -inf` before it (the rest renormalise), `scale` multiplies `alpha_i`, and `patch`,
# `mean`, `resample` replace the weight, the source value or the contribution `alpha_i v_i`.

# %%
import torch
from attnres_lens import bundled
from attnres_lens.interventions import (
    Slice, Family, Group, zero, mask, scale, patch, mean_ablate, resample,
    run_with_interventions, model_with_interventions, to_hooks,
)

torch.set_grad_enabled(False)   # no gradients needed in this notebook
torch.manual_seed(0)             # reproducible outputs (committed executed)
torch.set_num_threads(1)
model = bundled.load_attnres()
tokens = bundled.eval_tokens(model, n_prompts=8, seq_len=96)
clean_loss = float(model(tokens, return_type="loss"))
model.source_table().query("router == 'blocks.2.attn_router'")

# %% [markdown]
# ## One slice
#
# Zero the embedding source (index 0) of layer 2's attention router, at every position:

# %%
where = Slice("blocks.2.attn_router", 0)          # or Slice.at(2, "attn", 0)
loss = run_with_interventions(model, tokens, [zero(where)], return_type="loss")
print(f"clean {clean_loss:.4f}  zeroed {float(loss):.4f}  effect {float(loss) - clean_loss:+.4f}")

# %% [markdown]
# Interventions are plain TransformerLens hooks, so they compose with `run_with_hooks` and with a
# context manager that always removes them:

# %%
hooks = to_hooks(model, [mask(where, positions=range(48, 96)), scale(Slice("blocks.3.mlp_router", -1), 0.5)])
print([name for name, _ in hooks])
with model_with_interventions(model, [mask(where)]):
    masked = float(model(tokens, return_type="loss"))
after = float(model(tokens, return_type="loss"))
print(f"masked {masked:.4f}; after the block the model is clean again: {after == clean_loss}")

# %% [markdown]
# ## Dose-response
#
# `scale` multiplies the weight of a slice: `s = 1` is the identity, `s = 0` is `zero`.

# %%
current = Slice("blocks.3.attn_router", -1)     # the current stream, the last source
for s in (1.0, 0.75, 0.5, 0.25, 0.0):
    l = float(run_with_interventions(model, tokens, [scale(current, s)], return_type="loss"))
    print(f"scale {s:4.2f}: loss {l:.4f}")

# %% [markdown]
# ## Families and groups
#
# The paper masks mutually exclusive source families across sublayers and depths. A `Family` is
# every source of one family at one router; a `Group` selects across routers by family,
# sublayer and layers (a depth band).

# %%
early = range(0, 2)
late = range(2, 4)
for label, group in {
    "history, attn, late": Group(families="history", sublayers="attn", layers=late),
    "embedding, mlp, early": Group(families="embedding", sublayers="mlp", layers=early),
    "embedding, everywhere": Group(families="embedding"),
}.items():
    l = float(run_with_interventions(model, tokens, [mask(group)], return_type="loss"))
    print(f"mask {label:24s}: effect {l - clean_loss:+.4f}")
l = float(run_with_interventions(model, tokens, [zero(Family("blocks.3.mlp_router", "history"))], return_type="loss"))
print(f"zero history at blocks.3.mlp_router: effect {l - clean_loss:+.4f}")

# %% [markdown]
# ## Patching, mean-ablation, resampling
#
# `patch` takes values from another run's cache (TL's clean-to-corrupted patching); `mean_ablate`
# from the mean over a reference batch; `resample` from other prompts. The `target` says what is
# replaced: the weight, the source value (its key follows), or the contribution `alpha_i v_i`.

# %%
other = bundled.eval_tokens(model, n_prompts=16, seq_len=96)[8:]
_, other_cache = model.run_with_cache(other)
for name, iv in {
    "patch weight from other prompts": patch(where, other_cache, target="weight"),
    "patch source value": patch(where, other_cache, target="source"),
    "mean-ablate contribution": mean_ablate(where, other, target="contribution"),
    "resample weight within batch": resample(where, target="weight", seed=0),
}.items():
    l = float(run_with_interventions(model, tokens, [iv], return_type="loss"))
    print(f"{name:32s}: effect {l - clean_loss:+.4f}")

# %% [markdown]
# ## TransformerLens-style patching
#
# `get_act_patch_routing` has the signature and return conventions of
# `transformer_lens.patching.get_act_patch_*`: one patched forward per `(layer, source)` row of
# `routing_index_df`, built on `generic_activation_patch`.

# %%
from attnres_lens.patching import get_act_patch_routing, routing_index_df

clean, corrupted = tokens[:4], other[:4]
clean_logits, clean_cache = model.run_with_cache(clean)

def metric(logits):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), clean[:, 1:].flatten())

print(f"metric on the clean run {float(metric(clean_logits)):.4f}, on the corrupted run {float(metric(model(corrupted))):.4f}")
result = get_act_patch_routing(model, corrupted, clean_cache, metric, sublayer="attn")
index = routing_index_df(model, "attn")
index.assign(patched_metric=result.tolist())

# %% [markdown]
# ## Sweeps
#
# `sweep_sources` intervenes on every slice (or family, or family x sublayer x band group) and
# measures the effect, per prompt. The batched engine reuses the clean prefix before each
# intervention and stacks several interventions per forward; it gives the same numbers as one
# forward per slice.

# %%
from attnres_lens.patching import sweep_sources

sweep = sweep_sources(model, tokens, mode="zero", metric="loss", groups="slice", progress=False)
sweep[["router", "source", "family", "label", "mass", "effect"]].sort_values("effect", ascending=False).head(8)

# %%
naive = sweep_sources(model, tokens, mode="zero", metric="loss", groups="slice", engine="naive", progress=False)
print("batched == naive:", float((sweep["effect"] - naive["effect"]).abs().max()))
bands = sweep_sources(model, tokens, mode="mask", groups="family_band", progress=False)
bands[["label", "mass", "effect"]]
