"""Interventions on depth-source slices: zero, mask, scale, mean-ablate, patch, resample.

A *depth-source slice* is one source ``i`` of one router (``docs/concepts.md``)::

    logit_i = w . RMSNorm_g(v_i) (+ b on the last source)     # hook_logits  [batch, pos, source]
    alpha   = softmax_i(logit_i)                               # hook_weights [batch, pos, source]
    out     = sum_i alpha_i * v_i                              # hook_out     [batch, pos, d_model]

An :class:`Intervention` is a small declarative value: *where* (a :class:`Slice`, a
:class:`Family` at a router, or a :class:`Group` across routers), *how* (a mode), on *what*
(a target, for the replacing modes) and *with what* (a value), optionally restricted to some
positions and batch items. Modes, exactly:

- ``zero``: ``alpha_i := 0`` after the softmax; the other weights are untouched, so the weights
  no longer sum to 1 and ``out = sum_{j != i} alpha_j v_j``.
- ``mask``: ``logit_i := -inf`` before the softmax, so the remaining sources are renormalised:
  ``alpha_j = exp(logit_j) / sum_{k not masked} exp(logit_k)``. Masking every source of a router
  (at any position) is an error.
- ``scale``: ``alpha_i := s * alpha_i`` after the softmax (no renormalisation); ``s = 1`` is the
  identity, ``s = 0`` is ``zero``.
- ``patch``: replace the target by its value in another run (an ``ActivationCache``; for a single
  slice also a tensor), batch item ``b`` from item ``b`` (or from the one item of a batch-1 cache).
- ``mean``: replace the target by its mean over a reference batch (tokens, or a cache of the
  reference run), per position, or also over positions with ``average_positions=True``.
- ``resample``: replace the target at batch item ``b`` by its value at item ``perm[b]`` of the
  same run (``reference=None``; ``perm`` a seeded derangement, see :func:`resample_indices`) or
  at item ``idx[b]`` of a reference batch (``idx`` drawn uniformly with the seed).

Targets of ``patch``, ``mean`` and ``resample``:

- ``weight``: ``alpha_i := r_i`` at ``hook_weights`` (other weights untouched).
- ``source``: ``v_i := r_i`` at ``hook_sources``, *before* the keys are computed, so the key
  ``RMSNorm(v_i)``, hence every weight of the router, follows the new value.
- ``contribution``: ``out := out - alpha_i v_i + r_i`` at ``hook_out``, where ``alpha_i`` and
  ``v_i`` are the weight and source this router actually used in this run and ``r_i`` is the
  replacement's ``alpha_i v_i``; the weights and the other contributions are untouched.

Interventions compose: a list applies together. At one router they act in forward order
(sources, logits, weights, out) and, within one hook point, in list order.
:func:`to_hooks` gives TransformerLens ``(hook_name, fn)`` pairs for ``model.run_with_hooks``;
:func:`model_with_interventions` is a context manager that always removes them;
:func:`run_with_interventions` runs the model once with them.

The package: :mod:`.spec` holds the values (:class:`Intervention`, the modes, the
constructors), :mod:`.providers` where replacing modes take their values, and :mod:`.compile`
the per-mode ops and the hooks. Where-values (:class:`Slice`, :class:`Family`, :class:`Group`)
and their resolution live in :mod:`attnres_lens.selection`.
"""

from __future__ import annotations

from ..names import TARGETS, router_name
from ..selection import Family, Group, Slice, describe_router, resolve_where
from .compile import apply_interventions, model_with_interventions, run_with_interventions, to_hooks
from .spec import (
    MODES,
    REPLACING_MODES,
    Intervention,
    MaskAllSourcesError,
    mask,
    mean_ablate,
    patch,
    resample,
    resample_indices,
    scale,
    zero,
)

__all__ = [
    "Family",
    "Group",
    "Intervention",
    "MODES",
    "MaskAllSourcesError",
    "Slice",
    "TARGETS",
    "apply_interventions",
    "describe_router",
    "mask",
    "mean_ablate",
    "model_with_interventions",
    "patch",
    "resample",
    "resample_indices",
    "resolve_where",
    "router_name",
    "run_with_interventions",
    "scale",
    "to_hooks",
    "zero",
]
