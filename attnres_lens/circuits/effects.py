"""The typed result every edge-scoring method returns (one row per routing edge).

This is the small stand-in for issue N's ``Effects`` (unit keys, ``effect[unit, prompt]``,
``mass[unit, prompt]``) until that lands; the fields are the same, so switching is local.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True, eq=False)
class EdgeEffects:
    """Per routing edge (``keys``: edge ids, in the graph's order) and prompt: ``effect`` (the
    metric's change when the edge is ablated, measured or estimated) and ``mass`` (the clean
    routing weight of the edge's sources, copies summed, averaged over the positions the metric
    reads). ``clean`` is the clean metric per prompt; ``method`` and ``ablation`` say how."""

    keys: tuple[str, ...]
    effect: np.ndarray  # [unit, prompt]
    mass: np.ndarray  # [unit, prompt]
    clean: np.ndarray  # [prompt]
    method: str
    ablation: str

    def __post_init__(self) -> None:
        n = len(self.keys)
        for name in ("effect", "mass"):
            value = np.asarray(getattr(self, name), dtype=float)
            if value.ndim != 2 or value.shape[0] != n or value.shape[1] != len(self.clean):
                raise ValueError(f"{name} must be [unit, prompt] = [{n}, {len(self.clean)}], got {value.shape}")
            object.__setattr__(self, name, value)

    @property
    def score(self) -> np.ndarray:
        """The mean effect over prompts, per edge."""
        return self.effect.mean(axis=1)

    def ranking(self) -> list[str]:
        """Edge ids by decreasing ``|score|`` (ties keep the graph's order)."""
        order = np.argsort(-np.abs(self.score), kind="stable")
        return [self.keys[i] for i in order]

    def top(self, k: int) -> list[str]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        return self.ranking()[:k]

    def table(self) -> pd.DataFrame:
        """One row per edge: ``edge``, ``mass``, ``effect`` (means over prompts), ``abs_rank``."""
        score = self.score
        ranks = np.empty(len(score), dtype=int)
        ranks[np.argsort(-np.abs(score), kind="stable")] = np.arange(1, len(score) + 1)
        return pd.DataFrame({"edge": list(self.keys), "mass": self.mass.mean(axis=1), "effect": score,
                             "abs_rank": ranks})


__all__ = ["EdgeEffects"]
