"""Cost of attribution next to what it builds on, measured side by side in one process.

The model is the one of ``benchmarks/sweep.py`` (issue C): 12 layers, d_model 256, vocabulary
512, kimi flavour with 4 blocks, random router queries (and biases) drawn from N(0, 1); the data
are 4 x 128 random tokens; fp32 on CPU with one torch thread. It prints:

- ``mass_vs_effect / exact sweep``: a full :func:`attnres_lens.attribution.mass_vs_effect` over every
  slice with 200 bootstrap resamples (sweep + gradient estimates + routing statistics +
  bootstrap) against the exact sweep alone (:func:`attnres_lens.patching.sweep_sources`, same
  mode and slices). Target <= 1.2: the statistics must not dominate.
- ``gradient_attribution / forward``: every slice's first-order estimates (one forward with
  grad + one backward) against one plain forward (``torch.no_grad``). Target <= 3.
- ``screen / exact sweep``: ``mass_vs_effect(engine="screen")``'s sweep part (the ``readout``
  estimate of every slice, then the top-k and a random control subset exactly;
  :func:`attnres_lens.attribution.screen.screened_sweep`) against the exact batched sweep.
  Target <= 0.3.
- the estimators' fidelity on the bundled trained model (``attnres-cumulative-tiny``, 32 x 128
  held-out tokens; ``--fidelity-prompts``), zero and mask modes: per method of
  :func:`attnres_lens.attribution.estimate_effects` (``gradient`` is today's
  ``gradient_attribution``, the baseline row) Spearman(|estimate|, |exact|) and the top-5
  overlap with the exact sweep, and whether the screen's top 5 by |effect| equals the exact
  top 5 (target: at least 4 of 5).

Rounds are interleaved (sweep, report, forward, gradient, ...) so that machine noise hits every
contestant alike; the fastest round of each is compared (as in ``benchmarks/sweep.py``). Because
the exact sweep dominates and is noisy on a shared machine, it also prints the overhead measured
inside the same ``mass_vs_effect`` calls: ``1 + (gradient + routing + statistics) / sweep``.

    python benchmarks/attribution.py
    python benchmarks/attribution.py --flavour cumulative --mode full --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from attnres_lens import AttnResConfig, HookedAttnResTransformer
from attnres_lens.attribution import estimate_effects, gradient_attribution, mass_vs_effect
from attnres_lens.attribution.screen import screened_sweep
from attnres_lens.metrics import Metric
from attnres_lens.patching import sweep_sources
from attnres_lens.selection import resolve_bands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavour", default="kimi", choices=["kimi", "cumulative"])
    parser.add_argument("--mode", default="block", choices=["block", "full"], help="routing mode")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--ablation", default="zero", choices=["zero", "mask"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    parser.add_argument("--fidelity-prompts", type=int, default=32, help="prompts for the fidelity table (0: skip it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="bootstrap CIs over only")

    torch.manual_seed(0)
    cfg = AttnResConfig(
        flavour=args.flavour, routing_mode=args.mode, n_layers=args.layers, n_blocks=args.blocks,
        d_model=args.d_model, d_head=64, n_heads=args.d_model // 64, d_mlp=3 * args.d_model,
        d_vocab=args.vocab, n_ctx=max(args.tokens, 128),
    )
    model = HookedAttnResTransformer(cfg)
    with torch.no_grad():  # non-uniform routing, as in benchmarks/sweep.py
        for _, router in model.routers():
            router.proj.weight.normal_(0.0, 1.0)
            if router.bias is not None:
                router.bias.normal_(0.0, 1.0)
    tokens = torch.randint(cfg.d_vocab, (args.prompts, args.tokens), generator=torch.Generator().manual_seed(0))
    n_slices = len(model.source_table())
    print(
        f"model: {args.flavour} / {args.mode}, {args.layers} layers, {cfg.n_blocks} blocks, d_model={args.d_model}, "
        f"{n_slices} slices; data: {args.prompts} x {args.tokens} tokens; torch threads {torch.get_num_threads()}"
    )

    def sweep() -> None:
        sweep_sources(model, tokens, mode=args.ablation, progress=False)

    report_timings: list[dict] = []

    def report() -> None:
        rep = mass_vs_effect(model, tokens, mode=args.ablation, n_boot=args.n_boot, seed=0)
        report_timings.append(rep.timings)

    def forward() -> None:
        with torch.no_grad():
            model(tokens)

    def gradient() -> None:
        gradient_attribution(model, tokens)

    def screen() -> None:
        screened_sweep(
            model, [tokens], mode=args.ablation, metric=Metric.resolve("loss"), groups="slice", positions=None,
            batch_size=None, bands=resolve_bands(None, cfg.n_layers), merge_duplicates=True, engine="screen",
            k=None, control=None, seed=0, top_k=5,
        )

    contestants = {"sweep": sweep, "mass_vs_effect": report, "forward": forward, "gradient": gradient, "screen": screen}
    for fn in contestants.values():  # warm up
        fn()
    report_timings.clear()
    times: dict[str, list[float]] = {k: [] for k in contestants}
    for _ in range(args.rounds):
        for name, fn in contestants.items():
            reps = 1 if name in ("sweep", "mass_vs_effect", "screen") else 5
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - t0) / reps)
    med = {k: min(v) for k, v in times.items()}
    parts = {k: statistics.median(t[k] for t in report_timings) for k in report_timings[0]}

    print(f"exact sweep ({args.ablation}, every slice):   {med['sweep']:8.3f} s")
    print(
        f"mass_vs_effect (n_boot={args.n_boot}):        {med['mass_vs_effect']:8.3f} s   "
        f"[sweep {parts['sweep_s']:.3f} s, gradient + routing {parts['gradient_and_routing_s']:.3f} s, "
        f"statistics {parts['statistics_s']:.3f} s]"
    )
    ratio = med["mass_vs_effect"] / med["sweep"]
    print(f"  ratio mass_vs_effect / sweep:           {ratio:8.3f}   (target <= 1.2) {'OK' if ratio <= 1.2 else 'MISSED'}")
    extra = (parts["gradient_and_routing_s"] + parts["statistics_s"]) / parts["sweep_s"]
    print(f"  overhead inside the same calls:         {1 + extra:8.3f}   (1 + (gradient + routing + statistics) / sweep)")
    print(f"one forward (no grad):                    {med['forward'] * 1e3:8.1f} ms")
    print(f"gradient_attribution (fwd + bwd, all slices): {med['gradient'] * 1e3:8.1f} ms")
    g = med["gradient"] / med["forward"]
    print(f"  ratio gradient / forward:               {g:8.3f}   (target <= 3) {'OK' if g <= 3 else 'MISSED'}")
    r = med["screen"] / med["sweep"]
    print(f"screen (readout estimate + top-k + control exactly): {med['screen']:8.3f} s")
    print(f"  ratio screen / exact sweep:             {r:8.3f}   (target <= 0.3) {'OK' if r <= 0.3 else 'MISSED'}")
    if args.fidelity_prompts:
        fidelity(args.fidelity_prompts)


def fidelity(n_prompts: int) -> None:
    """Each estimator against the exact sweep on the bundled trained model, and the screen's top 5."""
    import numpy as np
    import scipy.stats

    from attnres_lens import bundled

    model = bundled.load_attnres()
    tokens = bundled.eval_tokens(model, n_prompts, 128)
    print(f"\nfidelity on the bundled trained model ({n_prompts} x 128 held-out tokens), vs the exact sweep:")
    print(f"{'mode':5s} {'method':9s} {'Spearman |.|':>12s} {'top-5':>6s} {'time s':>7s}")
    for mode in ("zero", "mask"):
        t0 = time.perf_counter()
        exact = sweep_sources(model, tokens, mode=mode, progress=False)
        exact_s = time.perf_counter() - t0
        effect = exact["effect"].to_numpy()
        defined = np.isfinite(effect)
        top = set(np.flatnonzero(defined)[np.argsort(-np.abs(effect[defined]))[:5]])
        print(f"{mode:5s} {'exact':9s} {'':>12s} {'':>6s} {exact_s:7.2f}")
        for method in ("gradient", "norm_fix", "readout"):
            t0 = time.perf_counter()
            est = estimate_effects(model, tokens, mode=mode, method=method)["estimate"].to_numpy()
            seconds = time.perf_counter() - t0
            rho = scipy.stats.spearmanr(np.abs(est[defined]), np.abs(effect[defined])).statistic
            top_est = set(np.flatnonzero(defined)[np.argsort(-np.abs(est[defined]))[:5]])
            print(f"{mode:5s} {method:9s} {rho:+12.3f} {len(top & top_est):4d}/5 {seconds:7.2f}")
        t0 = time.perf_counter()
        screened = mass_vs_effect(model, tokens, mode=mode, engine="screen", gradient=False, n_boot=100)
        seconds = time.perf_counter() - t0
        top_screen = set(screened.table.sort_values("abs_effect", ascending=False)["name"][:5])
        full = mass_vs_effect(model, tokens, mode=mode, gradient=False, n_boot=100)
        top_full = set(full.table.sort_values("abs_effect", ascending=False)["name"][:5])
        info = screened.settings["screen"]
        agree = len(top_screen & top_full)
        print(
            f"{mode:5s} screen: top-5 by |effect| equals the exact top-5 in {agree}/5 (target >= 4) "
            f"{'OK' if agree >= 4 else 'MISSED'}; {info['n_exact']} of {info['n_rows']} rows exact, "
            f"{info['n_misses']} control misses, bound {info['missed_bound']:.2f} rows; {seconds:.2f} s"
        )


if __name__ == "__main__":
    main()
