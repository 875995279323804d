"""Attribute metric changes to routing mass: routing statistics, mass-vs-effect reports with
bootstrap statistics, gradient attribution, and plots (``docs/attribution.md``).

Routing *mass* (``alpha``, the softmax weight a router puts on a source) is descriptive: it says
where a router reads, not what the model needs. Causal importance is measured by intervening
(:func:`attnres_lens.patching.sweep_sources`). This module puts the two side by side, with
honest uncertainty:

- :func:`routing_statistics`: per router and source, over the tokens of a dataset, the mass and
  its spread, and a *content dependence* in ``[0, 1]`` that is exactly 0 when routing does not
  depend on the input (a wrapped model with a schedule); aggregated per family and per
  family x sublayer x depth band.
- :func:`mass_vs_effect`: runs the exact sweep, then bootstraps over prompts
  (``scipy.stats.bootstrap``) the mass and the effect of every slice or group, the rank
  correlation between mass and ``|effect|``, and whether the largest-mass slice of each sublayer
  kind is also the largest-effect one. It flags "mass without causal role" and "causal without
  mass" and compares the exact effects with the gradient estimates.
- :func:`gradient_attribution`: first-order estimates of zeroing and of masking every slice from
  one forward and one backward pass.
- plots: mass and effect heatmaps (routers x sources, the Kimi report's layer-dependency style),
  a mass-vs-effect scatter with CIs, and :func:`plot_token_routing` for one prompt.

Conventions. The statistical unit is the *prompt* (one row of the token batch): every point
estimate here is a mean over prompts of per-prompt values, and every CI resamples prompts.
``effect = metric(ablated) - metric(clean)``, as in the sweep.

The package, one job per module: :mod:`.routing_stats`, :mod:`.gradients`, :mod:`.bootstrap`,
:mod:`.exact` (the sweep over several batches), :mod:`.mass_effect` (the named steps of
:func:`mass_vs_effect`), :mod:`.report` (:class:`MassEffectReport`), :mod:`.plots`;
:mod:`.data` and :mod:`.tables` hold the shared input and text helpers.
"""

from __future__ import annotations

from ..selection import default_bands
from .bootstrap import min_prompts_for_bootstrap
from .estimate import estimate_effects
from .gradients import gradient_attribution
from .mass_effect import mass_vs_effect
from .plots import plot_token_routing
from .report import MassEffectReport
from .routing_stats import RoutingStatistics, routing_statistics
from .thresholds import (
    DEFAULT_EFFECT_THRESHOLD,
    DEFAULT_LOW_MASS_THRESHOLD,
    DEFAULT_MASS_THRESHOLD,
    FLAG_CAUSAL_WITHOUT_MASS,
    FLAG_COMPENSATED_BY_DUPLICATE,
    FLAG_MASS_WITHOUT_CAUSAL_ROLE,
)

__all__ = [
    "DEFAULT_EFFECT_THRESHOLD",
    "DEFAULT_LOW_MASS_THRESHOLD",
    "DEFAULT_MASS_THRESHOLD",
    "FLAG_CAUSAL_WITHOUT_MASS",
    "FLAG_COMPENSATED_BY_DUPLICATE",
    "FLAG_MASS_WITHOUT_CAUSAL_ROLE",
    "MassEffectReport",
    "RoutingStatistics",
    "default_bands",
    "estimate_effects",
    "gradient_attribution",
    "mass_vs_effect",
    "min_prompts_for_bootstrap",
    "plot_token_routing",
    "routing_statistics",
]
