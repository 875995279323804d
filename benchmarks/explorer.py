"""Benchmark: how long one explorer update takes on the bundled models (128-token prompt).

An update is what happens when the user ticks a slice: the session turns its choices into
interventions, reruns from the cached clean state before the earliest intervened router
(``model.run_from``) to the logits, and the widget redraws its views (routing tokens,
predictions, loss per token). Three timings per router position (first, middle, last router),
each a fresh set of choices (no result cache hit):

- ``full``: ``run_with_interventions`` on the whole prompt plus the same loss/top-k (what a
  naive explorer would do);
- ``session``: :meth:`ExplorerSession.result` (prefix reuse);
- ``widget``: the ipywidgets explorer's whole update (session + every view), driven by setting
  the slice's dropdown, as a click in the notebook does.

Target: widget < 0.3 s per update on this CPU.

Run::

    python benchmarks/explorer.py                  # 1 thread, 20 repeats
    python benchmarks/explorer.py --threads 2 --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnres_lens import bundled
from attnres_lens.interventions import run_with_interventions
from attnres_lens.metrics import next_token_loss
from attnres_lens.viz import ExplorerSession, explore


def _median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def bench_model(name: str, model, text: str, repeats: int) -> None:
    start = time.perf_counter()
    explorer = explore(model, text)
    setup = time.perf_counter() - start
    session: ExplorerSession = explorer.session
    n_pos = session.tokens.shape[1]
    specs = model.router_specs
    print(f"\n{name}: {len(specs)} routers, {model.cfg.n_sublayers} sublayers, {n_pos} tokens; "
          f"explorer set-up (clean run + widgets) {1000 * setup:.1f} ms")
    print(f"{'router':>22} {'full ms':>9} {'session ms':>11} {'widget ms':>10} {'full/session':>13}")
    worst = 0.0
    for spec in (specs[0], specs[len(specs) // 2], specs[-1]):
        full, fast, widget = [], [], []
        for i in range(repeats):
            factor = 0.5 + i / (10 * repeats)  # a new factor each time: never a cache hit
            session.reset()
            session.set_choice(spec.name, 0, "scale", factor=factor)
            t0 = time.perf_counter()
            session.result()
            fast.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = run_with_interventions(model, session.tokens, session.interventions())
                float(next_token_loss(logits, session.tokens))
                torch.softmax(logits[0, -1], -1).topk(5)
            full.append(time.perf_counter() - t0)
        explorer.router.value = spec.name
        for i in range(repeats):
            row = explorer.slice_rows.children[0].children
            row[1].value = 0.25 + i / (10 * repeats)  # the factor box; its handler reruns
            if i == 0:
                row[0].value = "scale"
            widget.append(explorer.last_update_seconds)
        row[0].value = "none"
        f, s, w = _median_ms(full), _median_ms(fast), _median_ms(widget)
        worst = max(worst, max(widget) * 1000)
        print(f"{spec.name:>22} {f:9.2f} {s:11.2f} {w:10.2f} {f / s:13.2f}x")
    print(f"slowest widget update {worst:.1f} ms; target < 300 ms: {'met' if worst < 300 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = bundled.load_attnres()
    tokens = bundled.eval_tokens(trained, n_prompts=1, seq_len=args.seq_len)[0]
    text = trained.to_string(tokens)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} updates")
    bench_model(f"trained ({bundled.ATTNRES_MODEL})", trained, text, args.repeats)
    bench_model(f"wrapped ({bundled.BASELINE_MODEL}, recency schedule)", bundled.load_wrapped_baseline(), text, args.repeats)


if __name__ == "__main__":
    main()
