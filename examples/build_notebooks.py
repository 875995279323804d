"""Write the example notebooks (without outputs) from the cell sources below.

    python examples/build_notebooks.py

The notebooks are the source of truth users open; this script only keeps them easy to review
and regenerate. ``tests/test_notebooks.py`` executes every notebook in ``examples/``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


QUICKSTART = [
    md("""
# 01 · Quickstart: load, cache, read the routing

`attnres_lens` exposes the routing of Block Attention Residuals (AttnRes) models as TransformerLens
hook points. This notebook uses the two tiny byte-level models bundled with the library:

- `attnres-cumulative-tiny`: a Block AttnRes model (cumulative flavour) whose routing was trained;
- `qwen3-tiny`: a standard-residual Qwen3 of the same shape, which we *wrap* as an AttnRes model.

Everything runs on a CPU in seconds.
"""),
    code("""
import torch
import matplotlib.pyplot as plt
from attnres_lens import HookedAttnResTransformer, bundled, verify_schedule, expected_weights_table

torch.set_grad_enabled(False)   # inference only in this notebook
trained = bundled.load_attnres()
print(trained.extra_repr())
print(f"{sum(p.numel() for p in trained.parameters()):,} parameters; tokenizer: {trained.tokenizer}")
"""),
    md("""
## Load or wrap

`from_pretrained` detects what a directory (or an in-memory Hugging Face model) holds. A vanilla
Qwen3 has no routers, so it is *wrapped* with a schedule that reproduces it: `kimi` + `uniform`
(every router averages its sources) or `cumulative` + `recency` with a bias `b`.
"""),
    code("""
hf_qwen3 = bundled.load_baseline_hf()                     # a transformers.Qwen3ForCausalLM
uniform = HookedAttnResTransformer.from_pretrained(hf_qwen3, flavour="kimi")
recency = bundled.load_wrapped_baseline(recency_bias=3.0)  # cumulative flavour, b = 3

tokens = trained.to_tokens("def greet(name):\\n    return 'hello ' + name\\n")
with torch.no_grad():
    hf_logits = hf_qwen3(input_ids=tokens).logits
print("uniform wrap vs Hugging Face logits, max |diff|:", float((uniform(tokens) - hf_logits).abs().max()))
print("schedules:", uniform.schedule, recency.schedule, trained.schedule, sep="\\n  ")
"""),
    md("""
## Run with a cache

Every router exposes `hook_sources` `[batch, pos, source, d_model]`, `hook_logits` and
`hook_weights` `[batch, pos, source]` (the routing mass, alpha) and `hook_out`.
"""),
    code("""
logits, cache = trained.run_with_cache(tokens)
router_hooks = [name for name in cache.keys() if name.endswith("router.hook_weights")]
print(router_hooks)
alpha = cache["blocks.3.mlp_router.hook_weights"]
print("alpha:", tuple(alpha.shape), "sums to 1:", torch.allclose(alpha.sum(-1), torch.ones(1)))
print("greedy next bytes:", repr(trained.to_string(logits.argmax(-1)[0])))
"""),
    md("""
## The source table

What does source `i` of a router mean? `source_table()` answers for every router: its family
(`embedding`, `history`, `current`) and a label.
"""),
    code("""
table = trained.source_table()
table[table.router == "blocks.3.mlp_router"]
"""),
    md("""
## A routing heatmap

Mean routing mass per router (rows) and source (columns) on a few hundred bytes of held-out
text: the layer-dependency view of the Kimi report.
"""),
    code("""
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
"""),
    md("""
Token by token, for one prompt (`attnres_lens.attribution.plot_token_routing`):
"""),
    code("""
from attnres_lens.attribution import plot_token_routing

plot_token_routing(trained, "for i in range(10):\\n    print(i)\\n", router=[(1, "attn"), (3, "mlp")])
"""),
    md("""
## A wrap's routing is a checkable schedule

With zero queries and bias `b`, a router with `n` sources puts `e^b / (e^b + n - 1)` on the current
stream, whatever the input. `verify_schedule` returns the largest deviation of the weights observed
at the hooks from that prediction.
"""),
    code("""
print("recency wrap, max |observed - analytic|:", verify_schedule(recency, text_tokens))
expected_weights_table(recency).head(7)
"""),
    code("""
try:
    verify_schedule(trained, text_tokens)
except ValueError as err:
    print("trained model:", err)
"""),
]


TRAINING = [
    md("""
# 04 · Training a tiny AttnRes model

`attnres_lens.training` trains Block AttnRes models from scratch (routers zero-initialised, so
routing is learned) and standard-residual Qwen3 baselines. The default corpus is the Python
standard library's source, present on every machine. Here we train a very small kimi-flavour
model for a few dozen steps on the first 200k bytes of it.
"""),
    code("""
import torch
import matplotlib.pyplot as plt
from attnres_lens import HookedAttnResTransformer
from attnres_lens.training import TrainConfig, train

cfg = TrainConfig(
    arch="kimi", n_blocks=2, n_layers=2, d_model=64, n_heads=4, seq_len=64, batch_size=8,
    steps=60, warmup_steps=5, lr=1e-2, eval_every=20, eval_batches=2, save_every=30,
    max_tokens=200_000, threads=1, out_dir="runs/nb-kimi",
)
result = train(cfg)
print(f"eval loss {result.final_eval_loss:.3f} nats/byte; unigram baseline {result.unigram_eval_loss:.3f}")
"""),
    code("""
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([h["step"] for h in result.history], result.losses, label="train")
ax.plot([e["step"] for e in result.evals], [e["eval_loss"] for e in result.evals], "o-", label="held-out")
ax.axhline(result.unigram_eval_loss, ls="--", c="grey", label="unigram baseline")
ax.set_xlabel("step"); ax.set_ylabel("loss (nats/byte)"); ax.legend()
fig.tight_layout()
"""),
    md("""
## Resume is exact

Checkpoints (`runs/nb-kimi/checkpoints/step-N`) hold the model, optimizer, scheduler and RNG
state. Resuming from step 30 reproduces the uninterrupted run's losses exactly.
"""),
    code("""
resumed = train(TrainConfig(**{**cfg.to_dict(), "out_dir": "runs/nb-kimi-resumed"}),
                resume="runs/nb-kimi/checkpoints/step-000030", progress=False)
assert resumed.losses == result.losses
print("identical trajectory:", resumed.losses[-3:])
"""),
    md("""
## Load it back and look at the learned routing

The run directory is a normal checkpoint in the `qwen3_attnres` layout.
"""),
    code("""
from attnres_lens.attribution import routing_statistics
from attnres_lens.bundled import eval_tokens

model = HookedAttnResTransformer.from_pretrained("runs/nb-kimi")
stats = routing_statistics(model, eval_tokens(model, n_prompts=8, seq_len=64))
stats.routers[["router", "n_sources", "content_dependence", "entropy", "max_entropy"]]
"""),
    md("""
## The same from the command line

`attnres-lens train` takes the same settings as flags (`attnres-lens train --help`). The
standard-residual baseline is `--arch qwen3`, saved in Hugging Face's Qwen3 format, so it can
be wrapped with `from_pretrained(..., flavour=...)`.
"""),
    code("""
from attnres_lens.cli import main

main(["train", "--arch", "qwen3", "--n-layers", "2", "--d-model", "64", "--seq-len", "64",
      "--batch-size", "8", "--steps", "20", "--warmup-steps", "2", "--max-tokens", "100000",
      "--threads", "1", "--out", "runs/nb-qwen3", "--quiet"])
wrapped = HookedAttnResTransformer.from_pretrained("runs/nb-qwen3", flavour="cumulative", recency_bias=3.0)
wrapped.schedule
"""),
]


INTERVENTIONS = [
    md("""
# 02 · Interventions on depth-source slices

A *depth-source slice* is one source `i` of one router. `attnres_lens.interventions` describes an
intervention as a small value (where, how, with what) that turns into TransformerLens hooks;
`attnres_lens.patching` has TL-style patching and fast exact sweeps. Definitions of every mode
are in the module docstring: `zero` sets `alpha_i := 0` after the softmax, `mask` sets
`logit_i := -inf` before it (the rest renormalise), `scale` multiplies `alpha_i`, and `patch`,
`mean`, `resample` replace the weight, the source value or the contribution `alpha_i v_i`.
"""),
    code("""
import torch
from attnres_lens import bundled
from attnres_lens.interventions import (
    Slice, Family, Group, zero, mask, scale, patch, mean_ablate, resample,
    run_with_interventions, model_with_interventions, to_hooks,
)

torch.set_grad_enabled(False)   # no gradients needed in this notebook
model = bundled.load_attnres()
tokens = bundled.eval_tokens(model, n_prompts=8, seq_len=96)
clean_loss = float(model(tokens, return_type="loss"))
model.source_table().query("router == 'blocks.2.attn_router'")
"""),
    md("""
## One slice

Zero the embedding source (index 0) of layer 2's attention router, at every position:
"""),
    code("""
where = Slice("blocks.2.attn_router", 0)          # or Slice.at(2, "attn", 0)
loss = run_with_interventions(model, tokens, [zero(where)], return_type="loss")
print(f"clean {clean_loss:.4f}  zeroed {float(loss):.4f}  effect {float(loss) - clean_loss:+.4f}")
"""),
    md("""
Interventions are plain TransformerLens hooks, so they compose with `run_with_hooks` and with a
context manager that always removes them:
"""),
    code("""
hooks = to_hooks(model, [mask(where, positions=range(48, 96)), scale(Slice("blocks.3.mlp_router", -1), 0.5)])
print([name for name, _ in hooks])
with model_with_interventions(model, [mask(where)]):
    masked = float(model(tokens, return_type="loss"))
after = float(model(tokens, return_type="loss"))
print(f"masked {masked:.4f}; after the block the model is clean again: {after == clean_loss}")
"""),
    md("""
## Dose-response

`scale` multiplies the weight of a slice: `s = 1` is the identity, `s = 0` is `zero`.
"""),
    code("""
current = Slice("blocks.3.attn_router", -1)     # the current stream, the last source
for s in (1.0, 0.75, 0.5, 0.25, 0.0):
    l = float(run_with_interventions(model, tokens, [scale(current, s)], return_type="loss"))
    print(f"scale {s:4.2f}: loss {l:.4f}")
"""),
    md("""
## Families and groups

The paper masks mutually exclusive source families across sublayers and depths. A `Family` is
every source of one family at one router; a `Group` selects across routers by family,
sublayer and layers (a depth band).
"""),
    code("""
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
"""),
    md("""
## Patching, mean-ablation, resampling

`patch` takes values from another run's cache (TL's clean-to-corrupted patching); `mean_ablate`
from the mean over a reference batch; `resample` from other prompts. The `target` says what is
replaced: the weight, the source value (its key follows), or the contribution `alpha_i v_i`.
"""),
    code("""
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
"""),
    md("""
## TransformerLens-style patching

`get_act_patch_routing` has the signature and return conventions of
`transformer_lens.patching.get_act_patch_*`: one patched forward per `(layer, source)` row of
`routing_index_df`, built on `generic_activation_patch`.
"""),
    code("""
from attnres_lens.patching import get_act_patch_routing, routing_index_df

clean, corrupted = tokens[:4], other[:4]
clean_logits, clean_cache = model.run_with_cache(clean)

def metric(logits):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), clean[:, 1:].flatten())

print(f"metric on the clean run {float(metric(clean_logits)):.4f}, on the corrupted run {float(metric(model(corrupted))):.4f}")
result = get_act_patch_routing(model, corrupted, clean_cache, metric, sublayer="attn")
index = routing_index_df(model, "attn")
index.assign(patched_metric=result.tolist())
"""),
    md("""
## Sweeps

`sweep_sources` intervenes on every slice (or family, or family x sublayer x band group) and
measures the effect, per prompt. The batched engine reuses the clean prefix before each
intervention and stacks several interventions per forward; it gives the same numbers as one
forward per slice.
"""),
    code("""
from attnres_lens.patching import sweep_sources

sweep = sweep_sources(model, tokens, mode="zero", metric="loss", groups="slice", progress=False)
sweep[["router", "source", "family", "label", "mass", "effect"]].sort_values("effect", ascending=False).head(8)
"""),
    code("""
naive = sweep_sources(model, tokens, mode="zero", metric="loss", groups="slice", engine="naive", progress=False)
print("batched == naive:", float((sweep["effect"] - naive["effect"]).abs().max()))
bands = sweep_sources(model, tokens, mode="mask", groups="family_band", progress=False)
bands[["label", "mass", "effect"]]
"""),
]


PROTOCOL = [
    md("""
# 03 · The paper's protocol: wrapped vs trained routing

*When Does Routing Become Interpretable?* compares a vanilla model wrapped with a routing
schedule against a Block AttnRes model whose routing was trained, under identical interventions,
and tests whether routing **mass** predicts causal **effect**. Here: the two bundled tiny models.
Both are cumulative-flavour AttnRes models with one block per layer once loaded, so every slice
of one has a counterpart in the other.
"""),
    code("""
import torch
from attnres_lens import bundled, verify_schedule
from attnres_lens.attribution import routing_statistics, mass_vs_effect

wrapped = bundled.load_wrapped_baseline()      # vanilla Qwen3, recency schedule b = 3
trained = bundled.load_attnres()               # routing trained from zero-initialised routers
tokens = bundled.eval_tokens(trained, n_prompts=20, seq_len=64)
with torch.no_grad():
    losses = {name: m(tokens, return_type="loss").item() for name, m in (("wrapped", wrapped), ("trained", trained))}
print("loss (nats/byte):", losses)
"""),
    md("""
## 1. The wrap is exactly its schedule

`verify_schedule` compares the routing weights seen at the hooks with the analytic recency
schedule `e^b / (e^b + n - 1)`.
"""),
    code("""
print("wrapped: max |observed - analytic| =", verify_schedule(wrapped, tokens))
"""),
    md("""
## 2. Only trained routing depends on content

Content dependence (per router, in [0, 1]) measures how much the routing weights vary across
tokens and prompts. It is exactly 0 for a schedule.
"""),
    code("""
stats = {name: routing_statistics(m, tokens) for name, m in (("wrapped", wrapped), ("trained", trained))}
for name, st in stats.items():
    print(f"{name:8s} content dependence: max over routers {st.content_dependence:.4f}")
stats["trained"].routers[["router", "n_sources", "content_dependence", "entropy", "max_entropy"]]
"""),
    md("""
## 3. Mass vs effect

`mass_vs_effect` zeroes each slice, measures the change in loss per prompt, and bootstraps mass
and effect over prompts. Flags mark slices with appreciable mass and no detectable effect
(*mass without causal role*) and the converse.
"""),
    code("""
reports = {name: mass_vs_effect(m, tokens, groups="slice", mode="zero", metric="loss", n_boot=200, seed=0)
           for name, m in (("wrapped", wrapped), ("trained", trained))}
print(reports["trained"].summary())
"""),
    code("""
reports["trained"].flags[["name", "mass", "effect", "flag", "reason"]]
"""),
    code("""
reports["trained"].plot_scatter()
"""),
    code("""
reports["trained"].plot_mass_heatmap()
"""),
    code("""
reports["trained"].plot_effect_heatmap()
"""),
    md("""
Per family x sublayer x depth band (early/late halves of the layers), for both models:
"""),
    code("""
for name, m in (("wrapped", wrapped), ("trained", trained)):
    band = mass_vs_effect(m, tokens, groups="family_band", mode="mask", n_boot=200, seed=0)
    print(f"--- {name}")
    print(band.table[["name", "mass", "effect", "effect_low", "effect_high", "flag"]].to_string(index=False))
"""),
    md("""
## 4. All of it in one call

`attnres_lens.protocol.run_protocol` (what `attnres-lens demo` and `attnres-lens probe` run)
writes `report.md`, `summary.json` and the figures.
"""),
    code("""
from attnres_lens.protocol import Subject, run_protocol

result = run_protocol(
    [Subject("wrapped", wrapped, "vanilla Qwen3, recency schedule b = 3"),
     Subject("trained", trained, "Block AttnRes, trained routing")],
    tokens, "protocol-report", groups=("slice",), n_boot=200, progress=False,
)
print(result.table())
print(sorted(result.summary["models"]["trained"]))
"""),
]


NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_interventions.ipynb": INTERVENTIONS,
    "03_paper_protocol.ipynb": PROTOCOL,
    "04_training.ipynb": TRAINING,
}


def build(names: list[str] | None = None) -> None:
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    import sys

    build(sys.argv[1:] or None)
