"""The smallest bootstrap a confidence interval can rest on, in plain Python (no torch, numpy
or scipy), so that the command line refuses ``--prompts 3`` or ``--n-boot 10`` before it
imports anything heavy. :mod:`attnres_lens.attribution.bootstrap` applies the same limits."""

from __future__ import annotations

import math


def min_prompts_for_bootstrap(confidence: float = 0.95) -> int:
    """The fewest prompts for which a percentile bootstrap CI at ``confidence`` is not simply
    the range of the data.

    With ``n`` prompts, a resample consists of one prompt repeated ``n`` times with probability
    ``n ** -n`` for each prompt; when that exceeds the tail mass ``(1 - confidence) / 2`` the CI
    endpoints are the smallest and largest per-prompt values whatever the data. The smallest
    ``n`` with ``n ** -n <= (1 - confidence) / 2`` is 4 at 95% and 5 at 99.9%."""
    _check_confidence(confidence)
    tail = (1.0 - confidence) / 2.0
    n = 2
    while n ** (-n) > tail:
        n += 1
    return n


def min_resamples_for_bootstrap(confidence: float = 0.95) -> int:
    """The fewest resamples for a CI at ``confidence``: each tail needs at least one
    (``ceil(2 / (1 - confidence))``, 40 at 95%)."""
    _check_confidence(confidence)
    return math.ceil(2.0 / (1.0 - confidence))


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
