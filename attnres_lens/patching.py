"""Activation patching and exact sweeps over depth-source slices.

Two entry points:

- :func:`get_act_patch_routing` looks and behaves like the ``get_act_patch_*`` functions of
  ``transformer_lens.patching`` (same arguments, same return conventions) and is built on
  ``generic_activation_patch``, with an ``index_df`` of the valid ``(layer, source[, pos])``
  rows of one sublayer's routers (routers have different numbers of sources, so the rows are
  not a rectangle).
- :func:`sweep_sources` intervenes on every slice (or family, or group) in turn and returns a
  ``pandas.DataFrame`` with the routing mass, the metric with and without the intervention and
  the effect, per prompt as well as averaged. Its ``engine="batched"`` gives the same numbers as
  one hooked forward per slice (``engine="naive"``) while recomputing only what changes: the
  clean prefix before the intervened sublayer is computed once (:class:`~attnres_lens.DepthState`
  is kept before every sublayer) and several interventions run in one forward, stacked along
  the batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .compat import PATCHING_HAS_REDUCE, TL_VERSION, ActivationCache, patching
from .depth_patching import get_act_patch_depth_state
from .effects import SWEEP_COLUMNS, Effects, grouping_kind
from .interventions import MODES, REPLACING_MODES, TARGETS, Intervention, MaskAllSourcesError
from .interventions.compile import compile_interventions
from .interventions.providers import HOOKS_OF_TARGET, ReferenceMemo, cache_mapping, lookup_router_tensor
from .metrics import METRICS, LogitDiff, Metric, logit_diff_metric, non_finite_prompts, per_prompt_kl, per_prompt_loss
from .model import HookedAttnResTransformer
from .selection import (
    IndexSelector,
    Slice,
    SweepUnit,
    Touched,
    as_index,
    default_bands,
    select_indices,
    sweep_units,
)
from .sweep_engine import BatchedPatchRuns, Rerun, default_budget
from .sweep_plan import (
    ENGINES,
    Local,
    NonFiniteMetricWarning,
    SweepResult,
    SweepSpec,
    UndefinedInterventionWarning,
    execute,
    execute_prompts,
    measure,
    plan,
    warn_if_not_finite,
)
from .sweep_sharded import Sharded




# ============================================================================ TL-style patching
def routing_index_df(
    model: HookedAttnResTransformer,
    sublayer: str = "attn",
    by_pos: bool = False,
    n_pos: Optional[int] = None,
) -> pd.DataFrame:
    """The valid ``(layer, source)`` rows (``(layer, source, pos)`` with ``by_pos``) of the
    ``sublayer`` routers, in forward order: the ``index_df`` of :func:`get_act_patch_routing`."""
    if sublayer not in ("attn", "mlp"):
        raise ValueError(
            f"sublayer must be 'attn' or 'mlp', got {sublayer!r} (the final router has no layer, "
            "so TransformerLens' layer-indexed patching cannot name it; sweep it with "
            "sweep_sources)"
        )
    if by_pos and (n_pos is None or n_pos < 1):
        raise ValueError(f"by_pos=True needs n_pos >= 1, got {n_pos!r}")
    rows = []
    for spec in model.router_specs:
        if spec.sublayer != sublayer:
            continue
        for src in spec.sources:
            if by_pos:
                rows.extend((spec.layer, src.index, pos) for pos in range(n_pos))
            else:
                rows.append((spec.layer, src.index))
    columns = ["layer", "source", "pos"] if by_pos else ["layer", "source"]
    return pd.DataFrame(rows, columns=columns)


def routing_patch_setter(
    corrupted_activation: Tensor, index: Sequence[int], clean_activation: Tensor
) -> Tensor:
    """Patch setter for router activations ``[batch, pos, source, ...]``: ``index`` is
    ``[layer, source]`` (every position) or ``[layer, source, pos]``."""
    if len(index) == 2:
        _, source = index
        corrupted_activation[:, :, source] = clean_activation[:, :, source]
    elif len(index) == 3:
        _, source, pos = index
        corrupted_activation[:, pos, source] = clean_activation[:, pos, source]
    else:
        raise ValueError(f"index must be [layer, source] or [layer, source, pos], got {list(index)}")
    return corrupted_activation


def get_act_patch_routing(
    model: HookedAttnResTransformer,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: Any,
    sublayer: str = "attn",
    by_pos: bool = False,
    *,
    target: str = "weight",
    **tl_kwargs: Any,
) -> Any:
    """Patch each routing slice of one sublayer's routers from the clean run into the corrupted
    run, like ``transformer_lens.patching.get_act_patch_*``.

    Each row of :func:`routing_index_df` is one patched run: the clean value of the
    ``target`` (``"weight"``: ``alpha_source`` at ``blocks.{layer}.hook_{sublayer}_router_weights``;
    ``"source"``: ``v_source`` at ``..._router_sources``, so its key follows) replaces the
    corrupted one at every position (or at ``pos`` with ``by_pos=True``).

    TransformerLens' ``generic_activation_patch`` runs the loop and shapes the result, but the
    patched runs come from the exact batched engine of :func:`sweep_sources`: each row reruns
    only the sublayers from its router on and (``by_pos``) only the positions from ``pos`` on,
    several rows per forward. The values equal one hooked forward per row to float rounding.
    (When the clean activations do not have the corrupted run's ``[batch or 1, pos]`` layout,
    every row is one hooked forward, as in TransformerLens.)

    Args:
        model: the model (in eval mode, as TransformerLens 4 requires).
        corrupted_tokens: ``[batch, pos]`` tokens of the corrupted run.
        clean_cache: ``ActivationCache`` of the clean run (``model.run_with_cache``), holding the
            block-level aliases ``blocks.{l}.hook_{sublayer}_router_{weights|sources}``.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce=`` under TL 4).
        sublayer: ``"attn"`` or ``"mlp"``.
        by_pos: one row per ``(layer, source, pos)`` instead of ``(layer, source)``.
        target: ``"weight"`` or ``"source"``.
        **tl_kwargs: passed to ``generic_activation_patch``: ``return_index_df``, and under
            TransformerLens 4.x ``reduce=`` and ``baseline=``.

    Returns:
        Whatever ``generic_activation_patch`` returns with an ``index_df``: a flat tensor with one
        value per row of :func:`routing_index_df` (with ``return_index_df=True`` also the
        ``index_df``), or under TL 4.x a ``PatchingResult`` when ``reduce="none"``,
        ``baseline=True`` or a mapping of metrics is given.
    """
    allowed = {"return_index_df", "reduce", "baseline"}
    unknown = sorted(set(tl_kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"get_act_patch_routing got unexpected keyword arguments {unknown}; it passes "
            f"{sorted(allowed)} to transformer_lens.patching.generic_activation_patch"
        )
    if not PATCHING_HAS_REDUCE:
        given = sorted({"reduce", "baseline"} & set(tl_kwargs))
        if given:
            raise TypeError(
                f"{given} need TransformerLens >= 4 (whose generic_activation_patch takes "
                f"reduce=/baseline=); the installed TransformerLens is {TL_VERSION}"
            )
    if target not in ("weight", "source"):
        raise ValueError(
            f"target must be 'weight' or 'source' for TL-style patching, got {target!r} (a "
            "contribution patch spans two hook points; use sweep_sources(mode='patch', "
            "target='contribution'))"
        )
    corrupted_tokens = model.validate_tokens(corrupted_tokens)
    index_df = routing_index_df(model, sublayer, by_pos, corrupted_tokens.shape[1])
    what = "weights" if target == "weight" else "sources"
    cache_keys = clean_cache.cache_dict if isinstance(clean_cache, ActivationCache) else clean_cache
    if not isinstance(cache_keys, Mapping):
        raise TypeError(f"clean_cache must be an ActivationCache, got {type(clean_cache).__name__}")
    missing = [
        f"blocks.{layer}.hook_{sublayer}_router_{what}"
        for layer in sorted(set(index_df["layer"].tolist()))
        if f"blocks.{layer}.hook_{sublayer}_router_{what}" not in cache_keys
    ]
    if missing:
        raise KeyError(
            f"clean_cache lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}, which patching the "
            f"{sublayer} routers' {what} needs; cache them with model.run_with_cache (names_filter "
            "may use these names)"
        )
    runs = _batched_patch_runs(model, corrupted_tokens, cache_keys, index_df, sublayer, target)
    return patching.generic_activation_patch(
        runs,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        routing_patch_setter,
        f"{sublayer}_router_{what}",
        index_df=index_df,
        **tl_kwargs,
    )


def _batched_patch_runs(
    model: HookedAttnResTransformer,
    tokens: Tensor,
    cache: Mapping,
    index_df: pd.DataFrame,
    sublayer: str,
    target: str,
) -> Any:
    """The model TL's loop runs, its rows answered by the batched engine when the clean
    activations line up with the corrupted run (``[batch or 1, pos, ...]``); else the model."""
    what = "weights" if target == "weight" else "sources"
    specs = {spec.layer: spec for spec in model.router_specs if spec.sublayer == sublayer}
    values = {layer: {f"{spec.name}.hook_{what}": cache[f"blocks.{layer}.hook_{sublayer}_router_{what}"]}
              for layer, spec in specs.items()}
    batch, n_pos = tokens.shape
    if any(t.ndim < 2 or t.shape[0] not in (batch, 1) or t.shape[1] != n_pos
           for value in values.values() for t in value.values()):
        return model  # TL's own loop then patches (or fails) as it always did
    reruns, hook_names = [], []
    for row in index_df.itertuples(index=False, name=None):
        layer, source, pos = (int(i) for i in row) if len(row) == 3 else (int(row[0]), int(row[1]), None)
        spec = specs[layer]
        iv = Intervention(Slice(spec.name, source), "patch", target=target, value=values[layer], positions=pos)
        reruns.append(Rerun(tuple(int(i) for i in row), iv, spec.step, pos or 0))
        hook_names.append(f"blocks.{layer}.hook_{sublayer}_router_{what}")
    return BatchedPatchRuns(model, tokens, reruns, hook_names, default_budget(model, tokens.numel()))


# ============================================================================ the sweep
def sweep_sources(
    model: HookedAttnResTransformer,
    tokens: Union[Int[Tensor, "batch pos"], str, list[str]],
    *,
    mode: str = "zero",
    metric: Any = "loss",
    groups: Any = "slice",
    positions: Any = None,
    batch_size: Optional[int] = None,
    engine: str = "batched",
    bands: Any = None,
    reference: Any = None,
    progress: bool = True,
    max_batch_tokens: Optional[int] = None,
    target: Optional[str] = None,
    factor: Optional[float] = None,
    seed: int = 0,
    routers: Optional[Sequence[str]] = None,
    checkpoint_dir: Any = None,
    merge_duplicates: bool = True,
    attention_mask: Optional[Tensor] = None,
) -> pd.DataFrame:
    """Intervene on each depth-source slice (or family, or group) in turn and measure the effect.

    Args:
        model: the model.
        tokens: ``[batch, pos]`` prompts, or strings (tokenised and padded by ``to_tokens``,
            which gives their attention mask).
        mode: ``"zero"``, ``"mask"``, ``"scale"`` (needs ``factor``), ``"mean"`` (over
            ``reference``, by default the swept prompts), ``"patch"`` (needs ``reference``: tokens
            or a cache of the run to patch from) or ``"resample"`` (within each batch, or from
            ``reference``). Definitions: :mod:`attnres_lens.interventions`.
        metric: ``"loss"`` (mean next-token loss of each prompt), ``"kl"`` (``KL(clean ||
            intervened)`` of the next-token distributions, averaged over positions),
            :func:`logit_diff_metric`, or any callable ``(logits, tokens) -> [batch]`` tensor.
            A callable may carry ``positions`` (the logit positions it reads, for ``mass``) and
            ``subset(index)`` (its restriction to a minibatch).
        groups: ``"slice"`` (one row per router x source), ``"family"`` (router x family),
            ``"family_band"`` (family x sublayer x depth band across routers; the final router
            is its own sublayer ``"final"``), or a mapping ``label -> [(router, source), ...]``.
        positions: intervene only at these positions (default: all).
        batch_size: prompts per minibatch (default: all at once). Per-prompt results do not
            depend on it, except that ``resample`` without a reference resamples within a
            minibatch.
        engine: ``"batched"`` (clean-prefix reuse + stacked interventions; exact) or
            ``"naive"`` (one hooked forward per row).
        bands: ``family_band`` only: ``{name: layers}``; default :func:`default_bands`.
        reference: see ``mode``.
        progress: show a tqdm progress bar.
        max_batch_tokens: the batched engine's memory budget: at most this many tokens
            (stacked interventions x prompts x positions) per forward. Default: about 1 GiB.
        target: ``"weight"`` (default), ``"source"`` or ``"contribution"`` for mean/patch/resample.
        factor: the factor of ``mode="scale"``.
        seed: the resampling seed.
        routers: restrict ``"slice"``/``"family"`` sweeps to these routers.
        checkpoint_dir: record every finished row there and, on a rerun with the same model,
            tokens and arguments, recompute only the missing rows (``docs/scale.md``). Under an
            initialised ``torch.distributed`` process group (``torchrun``) the rows are shared
            across the ranks and gathered, with or without it.
        merge_duplicates: treat copies of one tensor at a router (the cumulative flavour's
            snapshot that equals the stream, ``model.source_table()["duplicate_of"]``) as one
            slice (default): its row intervenes on every copy with the same mode, its mass is
            the sum of the copies' masses, and it is keyed by the first copy. ``False``: one
            row per copy (zeroing one copy is then largely undone by the other, through the
            sublayer's input norm).
        attention_mask: ``[batch, pos]``, 1 = real token, for padded ``tokens`` (right or left
            padding). The prompts are unpadded and swept by length, so pads enter no metric and no
            mass, and every per-prompt value (and ``positions``, which counts from each prompt's
            own start or end) is the one the prompt has run alone; the means are over prompts.
            Modes that read other prompts of the batch (``patch``, and ``mean``/``resample``
            without ``reference``) need prompts of one length.

    Returns:
        A DataFrame with one row per slice or group and columns ``router, layer, sublayer,
        source, family, label`` (``None``/``<NA>`` where a column does not apply to a group;
        ``label`` then describes the group), ``n_copies`` (slice rows: how many sources hold
        the slice's tensor), ``mass``, ``metric_clean``, ``metric_ablated``,
        ``effect`` (means over prompts) and ``mass_per_prompt``, ``effect_per_prompt`` (1-D
        float arrays over prompts; ``effect = metric_ablated - metric_clean`` per prompt).

        ``mass`` is the clean routing weight of the row's sources, averaged over the tokens the
        metric reads (the logit positions it scores, intersected with ``positions`` when given;
        if the intersection is empty, over ``positions``). For a family or group it is, per
        router, the *sum* of the weights of its sources there (the share of that router's read
        the group holds), then the *mean* over the routers it spans. Rows whose intervention is
        undefined (masking every source of a router) get ``NaN`` and a warning.
        ``df.attrs`` holds ``metric_clean_per_prompt``, ``mode``, ``target``, ``metric`` and
        ``engine``.
    """
    spec = SweepSpec(mode=mode, metric=metric, groups=groups, positions=positions, batch_size=batch_size,
                     engine=engine, bands=bands, target=target, factor=factor, seed=seed, routers=routers,
                     merge_duplicates=merge_duplicates, max_batch_tokens=max_batch_tokens, reference=reference,
                     progress=progress)
    sharded = checkpoint_dir is not None or distributed.is_active()
    effects = execute_prompts(plan(model, spec), tokens, attention_mask, Sharded(checkpoint_dir) if sharded else Local())
    warn_if_not_finite(effects)
    return effects.sweep_table()


def run_sweep(model: HookedAttnResTransformer, tokens: Union[Int[Tensor, "batch pos"], str, list[str]], **kwargs: Any) -> SweepResult:
    """:func:`sweep_sources` (same arguments but ``checkpoint_dir``; one process), returning
    the table together with its units (a :class:`SweepResult`, whose ``effects`` is the
    :class:`~attnres_lens.effects.Effects`).

    ``unit_indices=[i, ...]`` sweeps only those rows of the full sweep (in that order);
    ``attention_mask=`` (or strings for ``tokens``) as in :func:`sweep_sources`."""
    unit_indices = kwargs.pop("unit_indices", None)
    attention_mask = kwargs.pop("attention_mask", None)
    if not isinstance(model, HookedAttnResTransformer):
        raise TypeError(f"model must be a HookedAttnResTransformer, got {type(model).__name__}")
    swept = plan(model, SweepSpec(**kwargs))
    if attention_mask is None and isinstance(tokens, Tensor):
        return SweepResult(measure(swept, tokens, unit_indices=unit_indices))
    if unit_indices is not None:
        raise ValueError("unit_indices= sweeps rows of one unpadded batch; pass tokens without attention_mask")
    return SweepResult(execute_prompts(swept, tokens, attention_mask))


__all__ = [
    "LogitDiff",
    "NonFiniteMetricWarning",
    "ENGINES",
    "SWEEP_COLUMNS",
    "SweepResult",
    "SweepSpec",
    "UndefinedInterventionWarning",
    "default_bands",
    "get_act_patch_depth_state",
    "get_act_patch_routing",
    "logit_diff_metric",
    "per_prompt_kl",
    "per_prompt_loss",
    "routing_index_df",
    "routing_patch_setter",
    "run_sweep",
    "sweep_sources",
]
