"""Forward-pass cost of the hooked AttnRes model relative to Hugging Face's Qwen3.

Both wraps are built from the same random ``Qwen3ForCausalLM`` and timed side by side,
interleaved round by round, so that machine noise hits every contestant alike. Prints the
median and minimum time of each and the ratios ours / HF (target <= 1.10), with no hooks
attached.

    python benchmarks/forward.py            # ~30M parameters, 256 tokens, fp32 CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from attnres_lens import HookedAttnResTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    hf_cfg = Qwen3Config(
        vocab_size=32000,
        hidden_size=args.d_model,
        intermediate_size=3 * args.d_model,
        num_hidden_layers=args.layers,
        num_attention_heads=args.d_model // 64,
        num_key_value_heads=max(1, args.d_model // 128),
        head_dim=64,
        max_position_embeddings=4096,
    )
    hf = Qwen3ForCausalLM(hf_cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    contestants = {
        "hf": hf,
        "cumulative": HookedAttnResTransformer.from_pretrained(
            hf, flavour="cumulative", recency_bias=3.0, n_blocks=args.blocks
        ),
        "kimi": HookedAttnResTransformer.from_pretrained(hf, flavour="kimi", n_blocks=args.blocks),
    }
    tokens = torch.randint(0, hf_cfg.vocab_size, (args.batch, args.tokens))
    times: dict[str, list[float]] = {name: [] for name in contestants}
    with torch.inference_mode():
        for model in contestants.values():  # warm-up
            model(tokens)
        for _ in range(args.rounds):
            for name, model in contestants.items():
                start = time.perf_counter()
                model(tokens)
                times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    print(
        f"config: {n_params / 1e6:.1f}M params, {args.layers} layers, d_model {args.d_model}, "
        f"{args.blocks} blocks, {args.batch}x{args.tokens} tokens, fp32, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds"
    )
    for name, t in med.items():
        print(f"  {name:<11} median {t * 1e3:8.2f} ms   min {best[name] * 1e3:8.2f} ms")
    # Each round times all contestants back to back, so the per-round ratio cancels slow
    # drifts in machine load; its median is the headline figure. Contention only ever adds
    # time, so the ratio of minima is a second, load-insensitive estimate.
    for name in ("cumulative", "kimi"):
        per_round = statistics.median(a / b for a, b in zip(times[name], times["hf"]))
        print(
            f"ratio {name} / hf: {per_round:.3f} (median of per-round ratios), "
            f"{best[name] / best['hf']:.3f} (ratio of minima)  target <= 1.10"
        )


if __name__ == "__main__":
    main()
