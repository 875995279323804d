"""Bootstrap over prompts and rank statistics (scipy is imported on first use).

The statistical unit is the *prompt*: every estimate is a mean over prompts of per-prompt
values, and every CI resamples prompts. :func:`bootstrap_statistics` resamples prompt indices
once for everything (paired resamples) and hands back each statistic under its own name.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..bootstrap_limits import min_prompts_for_bootstrap, min_resamples_for_bootstrap

#: The CI methods of ``scipy.stats.bootstrap``.
CI_METHODS: tuple[str, ...] = ("percentile", "basic", "BCa")


def check_bootstrap_size(n_prompts: int, confidence: float, n_boot: int) -> None:
    """Refuse too few prompts or resamples for a CI at ``confidence``; warn under 20 prompts."""
    needed = min_prompts_for_bootstrap(confidence)
    if n_prompts < needed:
        raise ValueError(
            f"too few prompts for a bootstrap: got {n_prompts}, need at least {needed} for a "
            f"{confidence:.0%} CI (with fewer, every resample CI is just the data range); "
            "20 or more give usable intervals"
        )
    min_boot = min_resamples_for_bootstrap(confidence)
    if n_boot < min_boot:
        raise ValueError(
            f"n_boot={n_boot} is too few bootstrap resamples for a {confidence:.0%} CI: each tail "
            f"needs at least one resample, so n_boot >= {min_boot} (200 or more recommended)"
        )
    if n_prompts < 20:
        warnings.warn(
            f"bootstrap CIs over only {n_prompts} prompts are rough; use 20 or more prompts for "
            "intervals you can lean on",
            stacklevel=3,
        )


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho between ``x[:, b]`` and ``y[:, b]`` for every column ``b`` (ranks from
    ``scipy.stats.rankdata``, average ties, then Pearson on the ranks)."""
    import scipy.stats

    x_ranks = scipy.stats.rankdata(x, axis=0)
    y_ranks = scipy.stats.rankdata(y, axis=0)
    x_ranks = x_ranks - x_ranks.mean(0)
    y_ranks = y_ranks - y_ranks.mean(0)
    denominator = np.sqrt((x_ranks * x_ranks).sum(0) * (y_ranks * y_ranks).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, (x_ranks * y_ranks).sum(0) / denominator, np.nan)


def kendall_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau between ``x[:, b]`` and ``y[:, b]`` for every column ``b``."""
    import scipy.stats

    out = np.full(x.shape[1], np.nan)
    if x.shape[0] < 2:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for column in range(x.shape[1]):
            out[column] = scipy.stats.kendalltau(x[:, column], y[:, column]).statistic
    return out


@functools.lru_cache(maxsize=None)
def bootstrap_rng_argument() -> str:
    """scipy >= 1.15 names ``scipy.stats.bootstrap``'s generator ``rng``; older releases ``random_state``."""
    import scipy.stats

    return "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


@dataclass
class Interval:
    """A bootstrapped statistic: point ``estimate``, CI ``low``/``high`` and the resampled values
    (``distribution``, last axis the resamples); one entry per row of the statistic."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    distribution: np.ndarray


#: Statistics of the row means (named ``[k, resamples]`` arrays) computed on every resample.
Derived = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def bootstrap_statistics(
    per_prompt: Mapping[str, np.ndarray],
    derived: Optional[Derived] = None,
    *,
    n_boot: int,
    confidence: float,
    seed: int,
    method: str,
) -> dict[str, Interval]:
    """Bootstrap over prompts the means of every row of each ``per_prompt[name]`` ``[rows,
    prompts]`` and the ``derived`` statistics of those means (e.g. rank correlations), in one
    ``scipy.stats.bootstrap`` call: the resampled objects are prompt indices, so every statistic
    sees the same resamples (paired), and the means come from one matrix product per batch of
    resamples. Returns an :class:`Interval` per name (``per_prompt``'s and ``derived``'s)."""
    import scipy.stats

    names = list(per_prompt)
    stacked = np.vstack([np.asarray(per_prompt[name], dtype=float) for name in names])
    bounds = np.cumsum([0] + [np.asarray(per_prompt[name]).shape[0] for name in names])
    n_prompts = stacked.shape[1]

    def named_statistics(means: np.ndarray) -> dict[str, np.ndarray]:
        out = {name: means[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}
        if derived is not None:
            out.update({name: np.atleast_2d(values) for name, values in derived(out).items()})
        return out

    layout = {name: values.shape[0] for name, values in named_statistics(stacked.mean(1, keepdims=True)).items()}

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        index = np.asarray(index).astype(np.intp)
        lead = index.shape[:-1]
        flat = index.reshape(-1, index.shape[-1])
        n_resamples, size = flat.shape
        counts = np.zeros((n_resamples, n_prompts))  # how often each prompt is drawn
        np.add.at(counts, (np.repeat(np.arange(n_resamples), size), flat.ravel()), 1.0)
        values = np.vstack(list(named_statistics(stacked @ counts.T / size).values()))
        return values.reshape(values.shape[0], *lead)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (constant) rows: handled below
        result = scipy.stats.bootstrap(
            (np.arange(n_prompts),), statistic, n_resamples=n_boot, vectorized=True,
            confidence_level=confidence, method=method,
            **{bootstrap_rng_argument(): np.random.default_rng(seed)},
        )
    estimate = statistic(np.arange(n_prompts))
    low = np.asarray(result.confidence_interval.low, dtype=float)
    high = np.asarray(result.confidence_interval.high, dtype=float)
    distribution = np.asarray(result.bootstrap_distribution, dtype=float)
    # BCa is undefined for a statistic that never varies: its CI is the point itself.
    constant = np.nanmax(distribution, -1) - np.nanmin(distribution, -1) == 0
    low = np.where(np.isnan(low) & constant, estimate, low)
    high = np.where(np.isnan(high) & constant, estimate, high)
    intervals, start = {}, 0
    for name, size in layout.items():
        part = slice(start, start + size)
        intervals[name] = Interval(estimate[part], low[part], high[part], distribution[part])
        start += size
    return intervals


__all__ = [
    "CI_METHODS",
    "Interval",
    "bootstrap_rng_argument",
    "bootstrap_statistics",
    "check_bootstrap_size",
    "kendall_columns",
    "min_prompts_for_bootstrap",
    "spearman_columns",
]
