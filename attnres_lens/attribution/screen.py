"""The screen: rank every row with the fast estimate, measure the top rows and a random
control subset exactly, and bound what the estimate may have missed (AtP*'s recipe)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..interventions import Intervention
from ..metrics import Metric
from ..effects import Effects, grouping_kind
from ..patching import SweepResult
from ..selection import SweepUnit
from ..sweep_engine import Rerun, clean_pass, default_budget, first_position, run_batched
from .estimate import ChunkRun, estimate_keeping_clean_runs
from .tables import row_name

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer

#: ``mass_vs_effect`` engines that use the estimate.
SCREEN_ENGINES: tuple[str, ...] = ("estimate", "screen")


def screened_sweep(
    model: "HookedAttnResTransformer",
    batches: list[torch.Tensor],
    *,
    mode: str,
    metric: Metric,
    groups: Any,
    positions: Any,
    batch_size: Optional[int],
    bands: Mapping[str, tuple[int, ...]],
    merge_duplicates: bool,
    engine: str,
    k: Optional[int],
    control: Optional[int],
    seed: int,
    top_k: int,
) -> tuple[SweepResult, dict]:
    """A :class:`SweepResult` whose rows carry the exact effect where measured and the estimate
    elsewhere, and the screen's account (``settings["screen"]``)."""
    estimates, chunks = estimate_keeping_clean_runs(
        model, batches, mode=mode, metric=metric, groups=groups, positions=positions, batch_size=batch_size,
        merge_duplicates=merge_duplicates, bands=bands,
    )
    units = estimates.attrs.pop("units")  # (pandas deep-copies attrs on every derived frame)
    estimate = estimates["estimate"].to_numpy()
    defined = np.flatnonzero(np.isfinite(estimate))
    undefined = tuple(int(i) for i in np.flatnonzero(~np.isfinite(estimate)))
    measured, top, controls = _choose_rows(estimate, defined, engine, k, control, seed, top_k)
    estimate_per_prompt = np.vstack([np.asarray(v, dtype=float) for v in estimates["estimate_per_prompt"]])
    effect = estimate_per_prompt.copy()
    clean = np.asarray(estimates.attrs["metric_clean_per_prompt"], dtype=float)
    if measured:
        clean = exact_rows(model, chunks, units, measured, mode, metric, positions, effect)
    effects = Effects(
        units=tuple(units), grouping=grouping_kind(groups),
        mass=np.vstack([np.asarray(v, dtype=float) for v in estimates["mass_per_prompt"]]),
        effect=effect, clean=clean, undefined=undefined, estimate=estimate_per_prompt,
        exact=np.array([i in set(measured) for i in range(len(units))], dtype=bool),
        settings=dict(mode=mode, target=None, metric=metric.name, engine=engine),
    )
    info = _screen_info(effects.table(), top, controls, defined, engine)
    return SweepResult(effects), info


def exact_rows(
    model: "HookedAttnResTransformer",
    chunks: list[ChunkRun],
    units: list[SweepUnit],
    rows: list[int],
    mode: str,
    metric: Metric,
    positions: Any,
    effect: np.ndarray,
) -> np.ndarray:
    """The exact effect of ``units[i]`` for every ``i`` in ``rows``, written into ``effect[i]``
    (``[unit, prompt]``), by the batched engine, all rows in one call per minibatch, each
    minibatch starting from the estimator's clean run where it was kept; returns the clean
    metric per prompt."""
    clean_metric = np.zeros(effect.shape[1])
    for chunk in chunks:
        run = chunk.clean if chunk.clean is not None else clean_pass(model, chunk.tokens)
        chunk_metric = metric.for_prompts(torch.arange(chunk.rows.start, chunk.rows.stop))
        clean_values = chunk_metric(run.logits, chunk.tokens, None).double()
        n_pos = chunk.tokens.shape[1]
        reruns = []
        for i in rows:
            iv = Intervention(units[i].where, mode, positions=positions)
            reruns.append(Rerun(i, iv, units[i].start, first_position(iv, n_pos)))
        with tqdm(total=len(reruns), disable=True) as bar:
            values = run_batched(model, chunk.tokens, reruns, chunk_metric, run, None,
                                 default_budget(model, chunk.tokens.numel()), bar)
        for i in rows:
            effect[i, chunk.rows] = (values[i].double() - clean_values).cpu().numpy()
        clean_metric[chunk.rows] = clean_values.cpu().numpy()
    return clean_metric


def _choose_rows(
    estimate: np.ndarray, defined: np.ndarray, engine: str, k: Optional[int], control: Optional[int], seed: int, top_k: int
) -> tuple[list[int], list[int], list[int]]:
    """The rows to measure: the ``k`` largest ``|estimate|`` and ``control`` random others.

    Default ``k = max(top_k + 1, 5% of the rows)``: one row beyond the ``top_k`` reported, as
    the most exact work bought. The top rows are typically the early, full-depth ones (each
    about one forward), and on the bundled trained model a second spare row changed nothing
    (``docs/attribution.md``)."""
    if engine == "estimate":
        return [], [], []
    n = len(defined)
    k = max(top_k + 1, math.ceil(0.05 * n)) if k is None else k
    for name, value in (("screen_k", k), ("screen_control", control)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    k = min(k, n)
    order = defined[np.argsort(-np.abs(estimate[defined]), kind="stable")]
    top = [int(i) for i in order[:k]]
    rest = order[k:]
    control = min(max(3, k // 2) if control is None else control, len(rest))
    rng = np.random.default_rng(seed)
    controls = sorted(int(i) for i in rng.choice(rest, size=control, replace=False)) if control else []
    return sorted(top + controls), top, controls


def _screen_info(table: pd.DataFrame, top: list[int], controls: list[int], defined: np.ndarray, engine: str) -> dict:
    """The screen's account: what was measured, the misses in the control subset and the bound."""
    info: dict = {"engine": engine, "n_rows": int(len(defined)), "n_exact": int(len(top) + len(controls)),
                  "k": len(top), "n_control": len(controls)}
    if engine == "estimate" or not top:
        return info
    abs_effect = table["effect"].abs().to_numpy()
    threshold = float(abs_effect[top].min())  # the smallest exact |effect| among the top-k
    misses = [i for i in controls if abs_effect[i] > threshold]
    unmeasured = int(len(defined) - len(top) - len(controls))
    c = len(controls)
    upper = _miss_rate_upper(len(misses), c) if c else 1.0
    info.update(
        threshold=threshold,
        misses=[row_name(table.iloc[i]) for i in misses],
        n_misses=len(misses),
        miss_rate_upper95=upper,
        n_unmeasured=unmeasured,
        missed_bound=float(upper * unmeasured),
    )
    return info


def _miss_rate_upper(m: int, c: int) -> float:
    """A one-sided 95% (Clopper-Pearson) upper bound on a rate with ``m`` hits in ``c`` draws."""
    import scipy.stats

    if m >= c:
        return 1.0
    return float(scipy.stats.beta.ppf(0.95, m + 1, c - m))


def add_screen_columns(report: Any, result: SweepResult) -> None:
    """Copy the screen's ``estimate`` and ``exact`` columns into the report's table, row by
    row matched on the unit key."""
    screened = result.effects
    estimate, exact = screened.estimate.mean(axis=1), screened.exact
    row_of = {key: row for row, key in enumerate(screened.keys)}
    rows = [row_of[key] for key in report.effects.keys]
    report.table["estimate"] = estimate[rows]
    report.table["exact"] = np.asarray(exact, dtype=bool)[rows]


__all__ = ["SCREEN_ENGINES", "add_screen_columns", "exact_rows", "screened_sweep"]
