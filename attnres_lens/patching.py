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
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .compat import PATCHING_HAS_REDUCE, TL_VERSION, ActivationCache, patching
from .interventions import (
    MODES,
    REPLACING_MODES,
    TARGETS,
    Family,
    Group,
    Intervention,
    MaskAllSourcesError,
    Slice,
    _as_index,
    _compile,
    _hooks_from_ops,
    _lookup,
    _Memo,
    _needed,
    _select,
    resolve_where,
)
from .names import GROUPINGS
from .metrics import per_prompt_kl, per_prompt_loss
from .model import DepthState, HookedAttnResTransformer
from .router import FAMILIES, RouterSpec

SWEEP_COLUMNS: tuple[str, ...] = (
    "router",
    "layer",
    "sublayer",
    "source",
    "family",
    "label",
    "mass",
    "metric_clean",
    "metric_ablated",
    "effect",
    "mass_per_prompt",
    "effect_per_prompt",
)
ENGINES: tuple[str, ...] = ("batched", "naive")
METRICS: tuple[str, ...] = ("loss", "kl")


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

    Each row of :func:`routing_index_df` is one patched forward: the clean value of the
    ``target`` (``"weight"``: ``alpha_source`` at ``blocks.{layer}.hook_{sublayer}_router_weights``;
    ``"source"``: ``v_source`` at ``..._router_sources``, so its key follows) replaces the
    corrupted one at every position (or at ``pos`` with ``by_pos=True``).

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
    return patching.generic_activation_patch(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        routing_patch_setter,
        f"{sublayer}_router_{what}",
        index_df=index_df,
        **tl_kwargs,
    )


# ============================================================================ metrics
class LogitDiff:
    """Metric ``logits[b, position, correct[b]] - logits[b, position, incorrect[b]]`` per prompt.

    ``correct``/``incorrect`` are token ids: an int for every prompt or one per prompt. With
    ``sweep_sources(batch_size=...)`` the sweep calls :meth:`subset` for each minibatch.
    """

    def __init__(self, correct: Any, incorrect: Any, position: int = -1):
        self.correct = torch.as_tensor(correct, dtype=torch.long).reshape(-1)
        self.incorrect = torch.as_tensor(incorrect, dtype=torch.long).reshape(-1)
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError(f"position must be an int, got {position!r}")
        self.position = position

    @property
    def positions(self) -> tuple[int, ...]:
        """The logit positions the metric reads (used for the routing mass)."""
        return (self.position,)

    def subset(self, index: Int[Tensor, " n"]) -> "LogitDiff":
        """The metric for the prompts ``index`` of the batch."""
        pick = lambda t: t if t.numel() == 1 else t[index.to(t.device)]  # noqa: E731
        return LogitDiff(pick(self.correct), pick(self.incorrect), self.position)

    def __call__(
        self, logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, " batch"]:
        batch = logits.shape[0]
        last = logits[:, self.position].float()
        rows = torch.arange(batch, device=logits.device)

        def ids(t: Tensor, name: str) -> Tensor:
            if t.numel() not in (1, batch):
                raise ValueError(f"{name} has {t.numel()} token ids for a batch of {batch}")
            return t.to(logits.device).expand(batch) if t.numel() == 1 else t.to(logits.device)

        return last[rows, ids(self.correct, "correct")] - last[rows, ids(self.incorrect, "incorrect")]


def logit_diff_metric(correct: Any, incorrect: Any, position: int = -1) -> LogitDiff:
    """A per-prompt logit-difference metric for :func:`sweep_sources` (see :class:`LogitDiff`)."""
    return LogitDiff(correct, incorrect, position)


@dataclass
class _Metric:
    name: str
    fn: Any  # "loss" | "kl" | callable

    @classmethod
    def make(cls, metric: Any) -> "_Metric":
        if isinstance(metric, str):
            if metric not in METRICS:
                raise ValueError(
                    f"unknown metric {metric!r}; valid: {METRICS}, logit_diff_metric(...) or a "
                    "callable (logits, tokens) -> [batch] tensor"
                )
            return cls(metric, metric)
        if not callable(metric):
            raise TypeError(f"metric must be 'loss', 'kl' or a callable, got {metric!r}")
        return cls(getattr(metric, "__name__", type(metric).__name__), metric)

    def for_batch(self, index: Tensor) -> "_Metric":
        if callable(self.fn) and hasattr(self.fn, "subset"):
            return _Metric(self.name, self.fn.subset(index))
        return self

    def read_positions(self, n_pos: int) -> list[int]:
        if self.fn == "loss":
            return list(range(n_pos - 1))
        if self.fn == "kl":
            return list(range(n_pos))
        positions = getattr(self.fn, "positions", None)
        if positions is None:
            return list(range(n_pos))
        return _select("metric positions", _as_index("positions", positions), n_pos, "metric")

    def __call__(self, logits: Tensor, tokens: Tensor, clean_log_probs: Optional[Tensor]) -> Tensor:
        if self.fn == "loss":
            return per_prompt_loss(logits, tokens)
        if self.fn == "kl":
            return per_prompt_kl(logits, clean_log_probs)
        out = self.fn(logits, tokens)
        out = torch.as_tensor(out)
        if out.ndim != 1 or out.shape[0] != logits.shape[0]:
            raise ValueError(
                f"metric {self.name!r} must return a [batch] tensor of length {logits.shape[0]} "
                f"(one value per prompt), got shape {tuple(out.shape)}"
            )
        return out.detach().float()


# ============================================================================ sweep units
@dataclass
class _Unit:
    meta: dict
    where: Any
    start: int = 0  # the first sublayer step it touches
    touched: Any = None  # [(RouterSpec, sources)]


def default_bands(n_layers: int) -> dict[str, tuple[int, ...]]:
    """Early/late halves of the layers: ``early = [0, ceil(L/2))``, ``late`` = the rest (a
    one-layer model has only ``early``)."""
    half = math.ceil(n_layers / 2)
    bands = {"early": tuple(range(half)), "late": tuple(range(half, n_layers))}
    return {name: layers for name, layers in bands.items() if layers}


def _layers_text(layers: Sequence[int]) -> str:
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"
    return ",".join(map(str, layers))


def _units(
    model: HookedAttnResTransformer, groups: Any, bands: Any, routers: Optional[Sequence[str]]
) -> list[_Unit]:
    specs = model.router_specs
    if routers is not None:
        names = {s.name for s in specs}
        routers = list(routers)
        bad = [r for r in routers if r not in names]
        if bad:
            raise KeyError(f"unknown routers {bad}; routers are {[s.name for s in specs]}")
        if not (isinstance(groups, str) and groups in ("slice", "family")):
            raise ValueError("routers= only applies to groups='slice' or groups='family'")
        specs = [s for s in specs if s.name in set(routers)]
    if bands is not None and not (isinstance(groups, str) and groups == "family_band"):
        raise ValueError("bands= only applies to groups='family_band'")
    units: list[_Unit] = []
    if isinstance(groups, str):
        if groups not in GROUPINGS:
            raise ValueError(f"unknown groups {groups!r}; valid: {GROUPINGS} or a mapping label -> slices")
        if groups == "slice":
            for spec in specs:
                for src in spec.sources:
                    meta = dict(router=spec.name, layer=spec.layer, sublayer=spec.sublayer,
                                source=src.index, family=src.family, label=src.label)
                    units.append(_Unit(meta, Slice(spec.name, src.index)))
        elif groups == "family":
            for spec in specs:
                for fam in spec.families():
                    labels = [s.label for s in spec.sources if s.family == fam]
                    meta = dict(router=spec.name, layer=spec.layer, sublayer=spec.sublayer,
                                source=None, family=fam, label=f"{fam}: {', '.join(labels)}")
                    units.append(_Unit(meta, Family(spec.name, fam)))
        else:
            band_map = default_bands(model.cfg.n_layers) if bands is None else _check_bands(bands, model.cfg.n_layers)
            for fam in FAMILIES:
                for sub in ("attn", "mlp"):
                    for band, layers in band_map.items():
                        members = [
                            s for s in specs
                            if s.sublayer == sub and s.layer in layers and fam in s.families()
                        ]
                        if not members:
                            continue
                        label = f"{fam}, {sub}, {band} (layers {_layers_text(list(layers))})"
                        meta = dict(router=None, layer=None, sublayer=sub, source=None, family=fam, label=label)
                        units.append(_Unit(meta, Group(families=fam, sublayers=sub, layers=tuple(layers), label=label)))
                final = [s for s in specs if s.sublayer == "final" and fam in s.families()]
                if final:
                    label = f"{fam}, final"
                    meta = dict(router=None, layer=None, sublayer="final", source=None, family=fam, label=label)
                    units.append(_Unit(meta, Group(families=fam, sublayers="final", label=label)))
    elif isinstance(groups, Mapping):
        if not groups:
            raise ValueError("groups mapping is empty")
        for label, members in groups.items():
            if not isinstance(label, str):
                raise TypeError(f"group labels must be str, got {label!r}")
            group = Group(slices=tuple(members), label=label)
            units.append(_Unit(dict(label=label), group))
    else:
        raise TypeError(f"groups must be one of {GROUPINGS} or a mapping label -> [(router, source)], got {groups!r}")
    order = {s.name: s.step for s in model.router_specs}
    for unit in units:
        unit.touched = resolve_where(model, unit.where)
        unit.start = min(order[spec.name] for spec, _ in unit.touched)
        if isinstance(groups, Mapping):
            unit.meta = _group_meta(unit.meta["label"], unit.touched)
    return units


def _group_meta(label: str, touched: list[tuple[RouterSpec, tuple[int, ...]]]) -> dict:
    def common(values: list) -> Any:
        return values[0] if len(set(values)) == 1 else None

    specs = [spec for spec, _ in touched]
    pairs = [(spec, i) for spec, sources in touched for i in sources]
    return dict(
        router=common([s.name for s in specs]),
        layer=common([s.layer for s in specs]),
        sublayer=common([s.sublayer for s in specs]),
        source=pairs[0][1] if len(pairs) == 1 else None,
        family=common([spec.sources[i].family for spec, i in pairs]),
        label=label,
    )


def _check_bands(bands: Any, n_layers: int) -> dict[str, tuple[int, ...]]:
    if not isinstance(bands, Mapping) or not bands:
        raise TypeError(f"bands must be a non-empty mapping name -> layers, got {bands!r}")
    out = {}
    for name, layers in bands.items():
        if not isinstance(name, str):
            raise TypeError(f"band names must be str, got {name!r}")
        layers = tuple(layers)
        if not layers:
            raise ValueError(f"band {name!r} has no layers")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"band {name!r} must hold int layers, got {layer!r}")
            if not 0 <= layer < n_layers:
                raise IndexError(f"band {name!r}: layer {layer} out of range 0..{n_layers - 1}")
        out[name] = layers
    return out


# ============================================================================ the sweep
@dataclass
class _Clean:
    states: list[DepthState]
    logits: Tensor
    weights: dict[str, Tensor]


def _clean_pass(model: HookedAttnResTransformer, tokens: Tensor) -> _Clean:
    """One clean forward that keeps the state before every sublayer and every routing weight."""
    weights: dict[str, Tensor] = {}

    def capture(name: str) -> Callable:
        def hook(x: Tensor, hook: Any) -> None:
            weights[name] = x.detach()

        return hook

    hooks = [(f"{spec.name}.hook_weights", capture(spec.name)) for spec in model.router_specs]
    states = []
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        state = model.initial_state(tokens)
        for k in range(model.cfg.n_sublayers):
            states.append(state)
            state = model.step(k, state)
        states.append(state)
        logits = model.readout(state)
    return _Clean(states, logits, weights)


def _expand(state: DepthState, n: int) -> DepthState:
    if n == 1:
        return state
    rep = lambda t: t.repeat(n, *([1] * (t.ndim - 1)))  # noqa: E731
    return DepthState(
        tuple(rep(t) for t in state.completed), None if state.current is None else rep(state.current)
    )


def _default_budget(model: HookedAttnResTransformer, tokens_per_prompt_batch: int) -> int:
    """Tokens per stacked forward: about 1 GiB of activations and logits."""
    cfg = model.cfg
    max_sources = max(spec.n_sources for spec in model.router_specs)
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    per_token = itemsize * (2 * cfg.d_vocab + cfg.d_model * (max_sources + 8) + 3 * cfg.d_mlp)
    return max(tokens_per_prompt_batch, min(1 << 15, (1 << 30) // per_token))


def _prepare_reference(
    model: HookedAttnResTransformer,
    mode: str,
    reference: Any,
    tokens: Tensor,
    names: list[str],
    batch_size: int,
) -> Optional[dict[str, Tensor]]:
    """The reference activations the sweep's interventions read, as ``{hook name: tensor}``."""
    if mode not in REPLACING_MODES:
        if reference is not None:
            raise ValueError(f"reference= is used by modes {REPLACING_MODES}, not by {mode!r}")
        return None
    if reference is None:
        if mode == "patch":
            raise ValueError(
                "mode 'patch' needs reference=: the tokens or the ActivationCache of the run to patch from"
            )
        if mode == "resample":
            return None  # within each batch
        reference = tokens  # mean over the swept prompts themselves
    if isinstance(reference, (ActivationCache, Mapping)):
        cache = reference.cache_dict if isinstance(reference, ActivationCache) else reference
        out = {}
        for name in names:
            router, what = name.rsplit(".hook_", 1)
            spec = model.router_specs[[s.name for s in model.router_specs].index(router)]
            out[name] = _lookup(cache, spec, what)
        return out
    if not isinstance(reference, Tensor):
        raise TypeError(f"reference must be integer tokens or an ActivationCache, got {type(reference).__name__}")
    ref_tokens = model.validate_tokens(reference)
    if mode == "patch" and ref_tokens.shape != tokens.shape:
        raise ValueError(
            f"patch reference tokens have shape {tuple(ref_tokens.shape)} but the swept tokens have "
            f"{tuple(tokens.shape)}: patching pairs prompt b with reference prompt b"
        )
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for start in range(0, ref_tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(ref_tokens[start : start + batch_size], names_filter=names)
            for n in names:
                parts[n].append(cache.cache_dict[n])
    return {n: torch.cat(ts) for n, ts in parts.items()}


def sweep_sources(
    model: HookedAttnResTransformer,
    tokens: Int[Tensor, "batch pos"],
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
) -> pd.DataFrame:
    """Intervene on each depth-source slice (or family, or group) in turn and measure the effect.

    Args:
        model: the model.
        tokens: ``[batch, pos]`` prompts.
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

    Returns:
        A DataFrame with one row per slice or group and columns ``router, layer, sublayer,
        source, family, label`` (``None``/``<NA>`` where a column does not apply to a group;
        ``label`` then describes the group), ``mass``, ``metric_clean``, ``metric_ablated``,
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
    if not isinstance(model, HookedAttnResTransformer):
        raise TypeError(f"model must be a HookedAttnResTransformer, got {type(model).__name__}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {MODES}")
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {ENGINES}")
    if mode in REPLACING_MODES:
        target = "weight" if target is None else target
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; valid targets: {TARGETS}")
    elif target is not None:
        raise ValueError(f"target= applies to modes {REPLACING_MODES}, not to {mode!r}")
    if mode == "scale":
        if factor is None:
            raise ValueError("mode 'scale' needs factor=")
    elif factor is not None:
        raise ValueError(f"factor= applies to mode 'scale', not to {mode!r}")
    tokens = model.validate_tokens(tokens)
    n_prompts, n_pos = tokens.shape
    metric_obj = _Metric.make(metric)
    if metric_obj.fn == "loss" and n_pos < 2:
        raise ValueError("metric 'loss' needs at least 2 positions (it scores next-token predictions)")
    pos_sel = _as_index("positions", positions)
    int_positions = _select("positions", pos_sel, n_pos, "sweep_sources(positions=...)")
    if batch_size is None:
        batch_size = n_prompts
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if max_batch_tokens is not None and (
        isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1
    ):
        raise ValueError(f"max_batch_tokens must be a positive int or None, got {max_batch_tokens!r}")
    smallest = n_prompts - (math.ceil(n_prompts / batch_size) - 1) * batch_size
    if mode == "resample" and reference is None and smallest < 2:
        raise ValueError(
            f"resampling within the batch needs minibatches of at least 2 prompts, but {n_prompts} "
            f"prompts in minibatches of {batch_size} leave one of {smallest}; change batch_size or "
            "pass reference="
        )

    units = _units(model, groups, bands, routers)
    needed_names = []
    if mode in REPLACING_MODES:
        for spec in {spec.name: spec for u in units for spec, _ in u.touched}.values():
            needed_names += [f"{spec.name}.hook_{w}" for w in _needed(target)]
    ref = _prepare_reference(model, mode, reference, tokens, needed_names, batch_size)
    value_all: Any = factor if mode == "scale" else ref
    if mode == "patch":
        for name, t in ref.items():
            if t.ndim < 1 or t.shape[0] not in (n_prompts, 1):
                raise ValueError(
                    f"patch reference {name} has batch {t.shape[0] if t.ndim else None}, but "
                    f"{n_prompts} prompts are swept: it must be {n_prompts} (or 1)"
                )

    def intervention(unit: _Unit, value: Any) -> Intervention:
        return Intervention(unit.where, mode, target=target, value=value, positions=pos_sel, seed=seed)

    # Units whose intervention is undefined (mask of every source at a router).
    undefined = set()
    memo = _Memo()
    for i, unit in enumerate(units):
        try:
            _compile(model, [intervention(unit, value_all)], memo=memo)
        except MaskAllSourcesError:
            undefined.add(i)
    if undefined:
        warnings.warn(
            f"{len(undefined)} rows mask every source of a router (undefined: nothing left to route "
            f"to); their metric_ablated and effect are NaN: {[units[i].meta['label'] for i in sorted(undefined)][:6]}",
            stacklevel=2,
        )

    ablated = np.full((len(units), n_prompts), np.nan)
    mass = np.full((len(units), n_prompts), np.nan)
    clean_values = np.zeros(n_prompts)
    runnable = [i for i in range(len(units)) if i not in undefined]
    n_batches = math.ceil(n_prompts / batch_size)
    bar = tqdm(total=len(units) * n_batches, disable=not progress, desc="sweep_sources")
    try:
        for start in range(0, n_prompts, batch_size):
            stop = min(start + batch_size, n_prompts)
            mb_tokens = tokens[start:stop]
            mb_index = torch.arange(start, stop)
            mb_metric = metric_obj.for_batch(mb_index)
            if mode == "patch":
                value = {n: (t if t.shape[0] == 1 else t[start:stop]) for n, t in ref.items()}
            else:
                value = value_all
            clean = _clean_pass(model, mb_tokens)
            clean_log_probs = F.log_softmax(clean.logits.float(), dim=-1) if metric_obj.fn == "kl" else None
            clean_values[start:stop] = mb_metric(clean.logits, mb_tokens, clean_log_probs).cpu().double().numpy()
            read = sorted(set(mb_metric.read_positions(n_pos)) & set(int_positions)) or int_positions
            for i in range(len(units)):
                mass[i, start:stop] = _mass(clean.weights, units[i].touched, read).cpu().double().numpy()
            ivs = {i: intervention(units[i], value) for i in runnable}
            if engine == "naive":
                results = _run_naive(model, mb_tokens, ivs, mb_metric, clean_log_probs, bar)
            else:
                budget = max_batch_tokens or _default_budget(model, mb_tokens.numel())
                results = _run_batched(model, mb_tokens, ivs, units, mb_metric, clean, clean_log_probs, budget, bar)
            for i, vals in results.items():
                ablated[i, start:stop] = vals.cpu().double().numpy()
            bar.update(len(undefined))
    finally:
        bar.close()

    effect = ablated - clean_values[None, :]
    rows = []
    for i, unit in enumerate(units):
        row = {key: unit.meta.get(key) for key in SWEEP_COLUMNS[:6]}
        row.update(
            mass=float(mass[i].mean()),
            metric_clean=float(clean_values.mean()),
            metric_ablated=float(ablated[i].mean()),
            effect=float(effect[i].mean()),
            mass_per_prompt=mass[i].copy(),
            effect_per_prompt=effect[i].copy(),
        )
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    df["layer"] = df["layer"].astype("Int64")
    df["source"] = df["source"].astype("Int64")
    df.attrs.update(
        metric_clean_per_prompt=clean_values,
        mode=mode,
        target=target,
        metric=metric_obj.name,
        engine=engine,
    )
    return df


def _mass(
    weights: dict[str, Tensor], touched: list[tuple[RouterSpec, tuple[int, ...]]], read: list[int]
) -> Float[Tensor, " batch"]:
    per_router = []
    for spec, sources in touched:
        w = weights[spec.name]  # [batch, pos, source]
        p = torch.tensor(read, device=w.device)
        s = torch.tensor(sources, device=w.device)
        per_router.append(w[:, p][:, :, s].float().sum(dim=-1).mean(dim=-1))
    return torch.stack(per_router).mean(dim=0)


def _run_naive(
    model: HookedAttnResTransformer,
    tokens: Tensor,
    ivs: dict[int, Intervention],
    metric: _Metric,
    clean_log_probs: Optional[Tensor],
    bar: Any,
) -> dict[int, Tensor]:
    """One full hooked forward per row."""
    memo = _Memo()
    out = {}
    for i, iv in ivs.items():
        hooks = _hooks_from_ops(_compile(model, [iv], memo=memo))
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        out[i] = metric(logits, tokens, clean_log_probs)
        bar.update(1)
    return out


def _run_batched(
    model: HookedAttnResTransformer,
    tokens: Tensor,
    ivs: dict[int, Intervention],
    units: list[_Unit],
    metric: _Metric,
    clean: _Clean,
    clean_log_probs: Optional[Tensor],
    budget: int,
    bar: Any,
) -> dict[int, Tensor]:
    """Rerun only the suffix from each row's first intervened sublayer, several rows per forward.

    Rows that start at the same sublayer ``k`` share the clean state before ``k``; it is
    repeated along the batch (row ``j`` of a stack owns items ``j*B .. j*B + B - 1``) and each
    row's interventions are compiled onto its own items. The suffix then runs once for the stack.
    """
    batch, n_pos = tokens.shape
    per_stack = max(1, budget // (batch * n_pos))
    by_start: dict[int, list[int]] = {}
    for i in ivs:
        by_start.setdefault(units[i].start, []).append(i)
    memo = _Memo()
    out = {}
    for k in sorted(by_start):
        members = by_start[k]
        for first in range(0, len(members), per_stack):
            stack = members[first : first + per_stack]
            ops = []
            for j, i in enumerate(stack):
                ops += _compile(model, [ivs[i]], offset=j * batch, local_batch=batch, memo=memo)
            hooks = _hooks_from_ops(ops)
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                state = model.run_from(_expand(clean.states[k], len(stack)), k)
                logits = model.readout(state)
            for j, i in enumerate(stack):
                out[i] = metric(logits[j * batch : (j + 1) * batch], tokens, clean_log_probs)
            bar.update(len(stack))
    return out


__all__ = [
    "LogitDiff",
    "SWEEP_COLUMNS",
    "default_bands",
    "get_act_patch_routing",
    "logit_diff_metric",
    "per_prompt_kl",
    "per_prompt_loss",
    "routing_index_df",
    "routing_patch_setter",
    "sweep_sources",
]
