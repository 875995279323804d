"""Benchmark: a full depth-source patching sweep, three ways, on the same model and slices.

- TL loop: ``transformer_lens.patching.generic_activation_patch`` with one ``index_df`` row per
  slice (what ``get_act_patch_routing`` does): one full forward per slice;
- naive: ``sweep_sources(engine="naive")``: one full hooked forward per slice;
- batched: ``sweep_sources(engine="batched")``: clean-prefix reuse + stacked interventions.

The sweep patches each routing weight ``alpha_i`` of every attention and MLP router from a
clean run into a corrupted run (the final router has no layer, so TL cannot address it; it is
left out of all three) and scores the mean next-token loss.

It also times one clean forward ``T`` and prints the *suffix-recompute limit*
``sum over slices of (n_sublayers - k) / n_sublayers * T`` (``k`` the intervened sublayer): the
time an engine that recomputes exactly the sublayers after the intervention, one slice at a
time, would take. Targets: batched / TL loop <= 0.25, batched / limit <= 1.3.

With ``--positions last`` it instead measures position-restricted sweeps (issue H 3):

- the batched sweep at all positions against ``positions=[-1]`` (which reruns only the last
  position, reading the clean keys/values of the others), same model, slices and mode; target
  ``last / all <= 0.1``;
- ``get_act_patch_routing(..., by_pos=True)`` (the batched engine behind TL's loop) against
  TL's own loop (``generic_activation_patch``, one forward per (layer, source, pos)), on a
  smaller batch (``--by-pos-batch`` x ``--by-pos-pos`` tokens), with the largest difference.

Run (fp32, CPU)::

    python benchmarks/sweep.py                 # 12 layers, d_model 256, 4 x 128 tokens
    python benchmarks/sweep.py --threads 2 --repeats 5
    python benchmarks/sweep.py --positions last
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time

import numpy as np
import torch

from attnres_lens import AttnResConfig, HookedAttnResTransformer
from attnres_lens.compat import PATCHING_HAS_REDUCE, TL_VERSION, patching
from attnres_lens.patching import (
    get_act_patch_routing,
    per_prompt_loss,
    routing_index_df,
    routing_patch_setter,
    sweep_sources,
)


def build_model(args: argparse.Namespace) -> HookedAttnResTransformer:
    torch.manual_seed(args.seed)
    cfg = AttnResConfig(
        d_model=args.d_model,
        d_head=64,
        n_layers=args.n_layers,
        n_blocks=args.n_blocks,
        d_vocab=args.d_vocab,
        flavour=args.flavour,
        routing_mode=args.routing_mode,
        n_ctx=max(args.pos, 128),
    )
    model = HookedAttnResTransformer(cfg)
    with torch.no_grad():  # non-uniform routing
        for _, router in model.routers():
            router.proj.weight.normal_(0.0, 1.0)
            if router.bias is not None:
                router.bias.normal_(0.0, 1.0)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-vocab", type=int, default=512)
    parser.add_argument("--n-blocks", type=int, default=4)
    parser.add_argument("--flavour", default="kimi", choices=["kimi", "cumulative"])
    parser.add_argument("--routing-mode", default="block", choices=["block", "full"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (min is reported)")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--positions", default="all", choices=["all", "last"],
                        help="'last': time position-restricted sweeps against all-position ones")
    parser.add_argument("--by-pos-batch", type=int, default=2, help="--positions last: TL by-pos tokens, batch")
    parser.add_argument("--by-pos-pos", type=int, default=8, help="--positions last: TL by-pos tokens, positions")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args)
    if args.positions == "last":
        positions_benchmark(model, args)
        return
    clean_tokens = torch.randint(0, args.d_vocab, (args.batch, args.pos))
    corrupted_tokens = torch.randint(0, args.d_vocab, (args.batch, args.pos))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: "router" in n)

    routers = [s.name for s in model.router_specs if s.sublayer != "final"]
    specs = [s for s in model.router_specs if s.sublayer != "final"]
    n_slices = sum(s.n_sources for s in specs)
    n_sub = model.cfg.n_sublayers
    # sublayers k..n_sub-1 must be recomputed after an intervention at sublayer k
    fractions = [(n_sub - s.step) / n_sub for s in specs for _ in s.sources]
    strict = [(n_sub - s.step - 1) / n_sub for s in specs for _ in s.sources]

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return per_prompt_loss(logits, corrupted_tokens).mean()

    def run_tl() -> np.ndarray:
        out = []
        for sub in ("attn", "mlp"):
            values = patching.generic_activation_patch(
                model,
                corrupted_tokens,
                clean_cache,
                tl_metric,
                routing_patch_setter,
                f"{sub}_router_weights",
                index_df=routing_index_df(model, sub),
            )
            out.append(values.detach().numpy())
        return np.concatenate(out)

    # TL's rows: every attention router's sources, then every MLP router's (routing_index_df)
    tl_order = [
        (sub, int(layer), int(source))
        for sub in ("attn", "mlp")
        for layer, source in routing_index_df(model, sub).itertuples(index=False)
    ]

    def run_ours(engine: str) -> np.ndarray:
        df = sweep_sources(
            model,
            corrupted_tokens,
            mode="patch",
            reference=clean_cache,
            target="weight",
            metric="loss",
            engine=engine,
            routers=routers,
            progress=False,
            max_batch_tokens=args.max_batch_tokens,
        )
        by_slice = {
            (row.sublayer, int(row.layer), int(row.source)): row.metric_ablated
            for row in df.itertuples(index=False)
        }
        return np.array([by_slice[key] for key in tl_order])

    def clean_forward() -> None:
        with torch.no_grad():
            model(corrupted_tokens)

    # warm-up (allocator, rotary tables)
    clean_forward()
    times: dict[str, list[float]] = {"clean forward": [], "TL loop": [], "naive": [], "batched": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (
            ("clean forward", lambda: [clean_forward() for _ in range(3)]),
            ("TL loop", run_tl),
            ("naive", lambda: run_ours("naive")),
            ("batched", lambda: run_ours("batched")),
        ):
            with contextlib.redirect_stderr(io.StringIO()):  # TL's own tqdm bar
                start = time.perf_counter()
                value = fn()
                elapsed = time.perf_counter() - start
            times[name].append(elapsed / 3 if name == "clean forward" else elapsed)
            results[name] = value

    tl, naive, batched = results["TL loop"], results["naive"], results["batched"]
    best = {name: min(ts) for name, ts in times.items()}
    limit = sum(fractions) * best["clean forward"]
    cfg = model.cfg
    print(
        f"model: {cfg.flavour}/{cfg.routing_mode}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_blocks} blocks, d_vocab {cfg.d_vocab}; tokens {args.batch} x {args.pos}; fp32 CPU, "
        f"{torch.get_num_threads()} thread(s); TransformerLens {TL_VERSION} "
        f"(reduce= {'yes' if PATCHING_HAS_REDUCE else 'no'})"
    )
    print(f"slices: {n_slices} (all attention and MLP router sources), patch alpha clean -> corrupted, metric: loss")
    print(f"max |batched - naive| = {np.abs(batched - naive).max():.2e}, max |batched - TL| = {np.abs(batched - tl).max():.2e}")
    for name in times:
        spread = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{name:>14}: min {best[name]:8.3f} s   (runs: {spread}; median {statistics.median(times[name]):.3f})")
    print(f"{'limit':>14}: {limit:8.3f} s   (sum of suffix fractions {sum(fractions):.2f} x clean forward)")
    print(f"batched / TL loop = {best['batched'] / best['TL loop']:.3f}   (target <= 0.25)")
    print(f"batched / naive   = {best['batched'] / best['naive']:.3f}")
    print(f"batched / limit   = {best['batched'] / limit:.3f}   (target <= 1.3)")
    strict_limit = sum(strict) * best["clean forward"]
    print(
        f"(counting only the sublayers strictly after the intervened one, the limit is "
        f"{strict_limit:.3f} s and batched / limit = {best['batched'] / strict_limit:.3f})"
    )
    sys.stdout.flush()


def best_of(repeats: int, fns: dict) -> tuple[dict, dict]:
    """Interleaved repetitions of each function: the min time and the last value of each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    values = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            with contextlib.redirect_stderr(io.StringIO()):  # TL's own tqdm bar
                start = time.perf_counter()
                values[name] = fn()
                times[name].append(time.perf_counter() - start)
    return times, values


def show(times: dict) -> None:
    for name, ts in times.items():
        spread = ", ".join(f"{t:.3f}" for t in ts)
        print(f"{name:>22}: min {min(ts):8.3f} s   (runs: {spread})")


def positions_benchmark(model: HookedAttnResTransformer, args: argparse.Namespace) -> None:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.d_vocab, (args.batch, args.pos), generator=gen)
    routers = [s.name for s in model.router_specs if s.sublayer != "final"]

    def sweep(positions):
        return sweep_sources(model, tokens, mode="zero", metric="loss", positions=positions, routers=routers,
                             progress=False, max_batch_tokens=args.max_batch_tokens)

    print(
        f"model: {cfg.flavour}/{cfg.routing_mode}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_blocks} blocks, d_vocab {cfg.d_vocab}; fp32 CPU, {torch.get_num_threads()} thread(s); "
        f"TransformerLens {TL_VERSION}"
    )
    sweep([-1])  # warm-up
    times, values = best_of(args.repeats, {"batched, all positions": lambda: sweep(None),
                                           "batched, positions=[-1]": lambda: sweep([-1])})
    n_rows = len(values["batched, all positions"])
    print(f"sweep_sources(mode='zero', metric='loss'): {n_rows} slices, tokens {args.batch} x {args.pos}")
    show(times)
    ratio = min(times["batched, positions=[-1]"]) / min(times["batched, all positions"])
    print(f"positions=[-1] / all positions = {ratio:.3f}   (target <= 0.1)")

    # TL-style patching by position: TL's loop (one forward per row) against the batched engine
    small = torch.randint(0, args.d_vocab, (args.by_pos_batch, args.by_pos_pos), generator=gen)
    clean = torch.randint(0, args.d_vocab, (args.by_pos_batch, args.by_pos_pos), generator=gen)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: "router" in n)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return per_prompt_loss(logits, small).mean()

    index_df = routing_index_df(model, "attn", by_pos=True, n_pos=args.by_pos_pos)
    times, values = best_of(args.repeats, {
        "TL loop (by pos)": lambda: patching.generic_activation_patch(
            model, small, clean_cache, metric, routing_patch_setter, "attn_router_weights", index_df=index_df),
        "batched (by pos)": lambda: get_act_patch_routing(model, small, clean_cache, metric, "attn", by_pos=True),
    })
    diff = (values["TL loop (by pos)"] - values["batched (by pos)"]).abs().max().item()
    print(
        f"get_act_patch_routing(sublayer='attn', by_pos=True): {len(index_df)} rows (layer, source, pos), "
        f"tokens {args.by_pos_batch} x {args.by_pos_pos}; max |batched - TL loop| = {diff:.2e}"
    )
    show(times)
    ratio = min(times["batched (by pos)"]) / min(times["TL loop (by pos)"])
    print(f"batched / TL loop (by pos) = {ratio:.3f}   (speed-up {1 / ratio:.1f}x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
