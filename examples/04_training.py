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
# # 04 · Training a tiny AttnRes model
#
# `attnres_lens.training` trains Block AttnRes models from scratch (routers zero-initialised, so
# routing is learned) and standard-residual Qwen3 baselines. The default corpus is the Python
# standard library's source, present on every machine. Here we train a very small kimi-flavour
# model for a few dozen steps on the first 200k bytes of it.

# %%
import torch
import matplotlib.pyplot as plt
from attnres_lens import HookedAttnResTransformer
from attnres_lens.training import TrainConfig, train

torch.manual_seed(0)             # reproducible outputs (committed executed)
torch.set_num_threads(1)
cfg = TrainConfig(
    arch="kimi", n_blocks=2, n_layers=2, d_model=64, n_heads=4, seq_len=64, batch_size=8,
    steps=60, warmup_steps=5, lr=1e-2, eval_every=20, eval_batches=2, save_every=30,
    max_tokens=200_000, threads=1, out_dir="runs/nb-kimi",
)
result = train(cfg)
print(f"eval loss {result.final_eval_loss:.3f} nats/byte; unigram baseline {result.unigram_eval_loss:.3f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([h["step"] for h in result.history], result.losses, label="train")
ax.plot([e["step"] for e in result.evals], [e["eval_loss"] for e in result.evals], "o-", label="held-out")
ax.axhline(result.unigram_eval_loss, ls="--", c="grey", label="unigram baseline")
ax.set_xlabel("step"); ax.set_ylabel("loss (nats/byte)"); ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Resume is exact
#
# Checkpoints (`runs/nb-kimi/checkpoints/step-N`) hold the model, optimizer, scheduler and RNG
# state. Resuming from step 30 reproduces the uninterrupted run's losses exactly.

# %%
resumed = train(TrainConfig(**{**cfg.to_dict(), "out_dir": "runs/nb-kimi-resumed"}),
                resume="runs/nb-kimi/checkpoints/step-000030", progress=False)
assert resumed.losses == result.losses
print("identical trajectory:", resumed.losses[-3:])

# %% [markdown]
# ## Load it back and look at the learned routing
#
# The run directory is a normal checkpoint in the `qwen3_attnres` layout.

# %%
from attnres_lens.attribution import routing_statistics
from attnres_lens.bundled import eval_tokens

model = HookedAttnResTransformer.from_pretrained("runs/nb-kimi")
stats = routing_statistics(model, eval_tokens(model, n_prompts=8, seq_len=64))
stats.routers[["router", "n_sources", "content_dependence", "entropy", "max_entropy"]]

# %% [markdown]
# ## The same from the command line
#
# `attnres-lens train` takes the same settings as flags (`attnres-lens train --help`). The
# standard-residual baseline is `--arch qwen3`, saved in Hugging Face's Qwen3 format, so it can
# be wrapped with `from_pretrained(..., flavour=...)`.

# %%
from attnres_lens.cli import main

main(["train", "--arch", "qwen3", "--n-layers", "2", "--d-model", "64", "--seq-len", "64",
      "--batch-size", "8", "--steps", "20", "--warmup-steps", "2", "--max-tokens", "100000",
      "--threads", "1", "--out", "runs/nb-qwen3", "--quiet"])
wrapped = HookedAttnResTransformer.from_pretrained("runs/nb-qwen3", flavour="cumulative", recency_bias=3.0)
wrapped.schedule
