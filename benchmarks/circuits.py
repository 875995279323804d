"""Depth circuits: how faithful and how fast each edge-scoring method is against exact edge
patching, on the bundled trained model and on a 12-layer benchmark model, in one run.

For each model it prints, per method (``exact``, ``eap``, ``eap_ig``; the library's estimators
only estimate the ``zero`` ablation, so they are listed with ``--ablation zero``):

- ``Spearman``: Spearman's rho of |score| with |exact score| over the routing edges;
- ``top-k``: how many of the exact top-k edges (by |score|) the method's top-k holds;
- ``AUC``: the area under the faithfulness curve of the method's circuits (top-k by its ranking,
  every k, each circuit evaluated exactly; ``exact_greedy``: the nested circuits of exact greedy
  pruning), faithfulness against the fraction of edges kept;
- ``F@10``: the faithfulness of its 10-edge circuit;
- ``time / exact``: the method's scoring time over the exact edge sweep's (for
  ``exact_greedy`` the pruning itself).

It ends with the check of issue P: on the bundled trained model, the EAP-IG top-10 circuit's
faithfulness within 0.05 of exact greedy's 10-edge circuit.

The bundled model's data are held-out text windows (``bundled.eval_tokens``): the first half
are the clean prompts, the second half the corrupted ones (``--ablation corrupt``, the default),
metric: next-token loss. The benchmark model is the one of ``benchmarks/attribution.py`` (kimi,
12 layers, 4 blocks, d_model 256, random router queries N(0, 1)) on random tokens.

    python benchmarks/circuits.py
    python benchmarks/circuits.py --prompts 32 --tokens 128 --ablation mean
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch
from scipy.stats import spearmanr

from attnres_lens import AttnResConfig, HookedAttnResTransformer, bundled
from attnres_lens.circuits import DepthGraph, discover, score_edges


def benchmark_model(tokens: int) -> HookedAttnResTransformer:
    torch.manual_seed(0)
    cfg = AttnResConfig(flavour="kimi", routing_mode="block", n_layers=12, n_blocks=4, d_model=256, d_head=64,
                        n_heads=4, d_mlp=768, d_vocab=512, n_ctx=max(tokens, 128))
    model = HookedAttnResTransformer(cfg)
    with torch.no_grad():
        for _, router in model.routers():
            router.proj.weight.normal_(0.0, 1.0)
    return model.eval()


def run(name: str, model, clean, corrupt, args, per_round: int, sizes) -> dict:
    graph = DepthGraph.from_model(model)
    n_edges = len(graph.routing_edges)
    print(f"\n{name}: {n_edges} routing edges; {clean.shape[0]} x {clean.shape[1]} tokens; ablation {args.ablation}")
    ref = dict(corrupt=corrupt) if args.ablation == "corrupt" else dict(ablation=args.ablation)
    methods = ["exact", "eap", "eap_ig"] + (["gradient", "norm_fix", "readout"] if args.ablation == "zero" else [])
    if args.ablation == "zero":
        methods.remove("eap_ig")  # refused: the straight path to zero reads is flat (see circuits.eap)
    scores, seconds = {}, {}
    for method in methods:
        start = time.perf_counter()
        scores[method] = score_edges(model, clean, metric="loss", method=method, steps=args.steps, graph=graph, **ref)
        seconds[method] = time.perf_counter() - start
    exact = np.abs(scores["exact"].score)
    k = min(args.top_k, n_edges)
    top_exact = set(scores["exact"].top(k))
    curves = {}
    for method in ["exact_greedy"] + methods:
        start = time.perf_counter()
        curves[method] = discover(model, clean, "loss", method, sizes=sizes, steps=args.steps, per_round=per_round,
                                  n_boot=args.n_boot, **ref)
        if method == "exact_greedy":
            seconds[method] = time.perf_counter() - start  # pruning and evaluation together
    print(f"{'method':13s} {'Spearman':>9s} {'top-' + str(k):>7s} {'AUC':>6s} {'F@10':>6s} {'time / exact':>13s}")
    for method in ["exact_greedy"] + methods:
        curve = curves[method]
        f10 = curve.at(10) if 10 in curve.sizes else float("nan")
        if method == "exact_greedy":
            rho, overlap = float("nan"), len(set(curve.order[:k]) & top_exact)
        else:
            rho = spearmanr(np.abs(scores[method].score), exact)[0]
            overlap = len(set(scores[method].top(k)) & top_exact)
        print(f"{method:13s} {rho:+9.3f} {overlap:4d}/{k:<2d} {curve.auc:6.3f} {f10:6.3f} "
              f"{seconds[method] / seconds['exact']:13.2f}")
    print(f"(exact edge sweep: {seconds['exact']:.2f} s)")
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="clean prompts of the bundled model (as many corrupted)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--bench-prompts", type=int, default=4)
    parser.add_argument("--ablation", default="corrupt", choices=["corrupt", "mean", "zero"])
    parser.add_argument("--steps", type=int, default=8, help="EAP-IG's points")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-benchmark-model", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="bootstrap CIs over only")

    trained = bundled.load_attnres()
    windows = bundled.eval_tokens(trained, 2 * args.prompts, args.tokens)
    clean, corrupt = windows[: args.prompts], windows[args.prompts :]
    curves = run(f"bundled trained model ({bundled.ATTNRES_MODEL})", trained, clean, corrupt, args, 1, None)
    if not args.skip_benchmark_model:
        model = benchmark_model(args.tokens)
        gen = torch.Generator().manual_seed(0)
        bench = torch.randint(512, (2 * args.bench_prompts, args.tokens), generator=gen)
        n_edges = len(DepthGraph.from_model(model).routing_edges)
        sizes = sorted(set(np.linspace(0, n_edges, 21).round().astype(int).tolist()) | {10})
        run("12-layer benchmark model (kimi, 4 blocks, d_model 256)", model, bench[: args.bench_prompts],
            bench[args.bench_prompts :], args, max(1, math.ceil(n_edges / 25)), sizes)
    greedy, eap_ig = curves["exact_greedy"].at(10), curves.get("eap_ig")
    if eap_ig is not None:
        gap = greedy - eap_ig.at(10)
        print(f"\nissue P check (bundled model): F(exact greedy, 10 edges) = {greedy:.3f}, F(EAP-IG top 10) = "
              f"{eap_ig.at(10):.3f}, gap {gap:+.3f}: {'holds' if gap <= 0.05 else 'does NOT hold'} (<= 0.05)")


if __name__ == "__main__":
    main()
