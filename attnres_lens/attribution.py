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
"""

from __future__ import annotations

import inspect
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import scipy.stats
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .patching import default_bands
from .serialize import jsonable
from .router import FAMILIES, RouterSpec

if TYPE_CHECKING:  # annotations only
    from matplotlib.figure import Figure

    from .model import HookedAttnResTransformer

__all__ = [
    "DEFAULT_EFFECT_THRESHOLD",
    "DEFAULT_LOW_MASS_THRESHOLD",
    "DEFAULT_MASS_THRESHOLD",
    "FLAG_CAUSAL_WITHOUT_MASS",
    "FLAG_MASS_WITHOUT_CAUSAL_ROLE",
    "MassEffectReport",
    "RoutingStatistics",
    "default_bands",
    "gradient_attribution",
    "mass_vs_effect",
    "min_prompts_for_bootstrap",
    "plot_token_routing",
    "routing_statistics",
]

#: A slice (or group) with at least this mean routing weight carries "appreciable" mass.
DEFAULT_MASS_THRESHOLD = 0.2
#: A slice (or group) below this mean routing weight carries "little" mass.
DEFAULT_LOW_MASS_THRESHOLD = 0.05
#: Effects smaller than this (in metric units; for the default loss metric, nats per token,
#: i.e. about a 1% change in perplexity) are practically negligible.
DEFAULT_EFFECT_THRESHOLD = 0.01

FLAG_MASS_WITHOUT_CAUSAL_ROLE = "mass without causal role"
FLAG_CAUSAL_WITHOUT_MASS = "causal without mass"

BandsLike = Optional[Mapping[str, Iterable[int]]]

_SUBLAYER_KINDS = ("attn", "mlp", "final")


# =============================================================================== inputs
def _as_batches(model: "HookedAttnResTransformer", data: Any) -> list[Tensor]:
    """Normalise ``tokens_or_batches`` to a list of ``[batch, pos]`` token tensors.

    Accepts a token tensor, a sequence of token tensors (batches, possibly of different
    lengths), a string or a sequence of strings (each a prompt; prompts of equal token length
    are batched together, so nothing is padded)."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, Tensor):
        batches = [data]
    elif isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise ValueError("the dataset is empty: pass at least one prompt (token tensor or text)")
        if all(isinstance(item, str) for item in data):
            by_length: dict[int, list[Tensor]] = {}
            for text in data:
                toks = model.to_tokens(text)[0]
                by_length.setdefault(int(toks.shape[0]), []).append(toks)
            batches = [torch.stack(rows) for rows in by_length.values()]
        elif all(isinstance(item, Tensor) for item in data):
            batches = list(data)
        else:
            raise TypeError(
                "tokens_or_batches must be a token tensor, a list of token tensors, a string or a "
                f"list of strings; got a {type(data).__name__} of "
                f"{sorted({type(item).__name__ for item in data})}"
            )
    else:
        raise TypeError(
            "tokens_or_batches must be a token tensor, a list of token tensors, a string or a list "
            f"of strings; got {type(data).__name__}"
        )
    out = []
    for batch in batches:
        if batch.ndim >= 1 and batch.numel() == 0:
            continue
        out.append(model.validate_tokens(batch))
    if not out or sum(int(b.shape[0]) for b in out) == 0:
        raise ValueError("the dataset is empty: it holds no tokens")
    return out


def min_prompts_for_bootstrap(confidence: float = 0.95) -> int:
    """The fewest prompts for which a percentile bootstrap CI at ``confidence`` is not simply
    the range of the data.

    With ``n`` prompts, a resample consists of one prompt repeated ``n`` times with probability
    ``n ** -n`` for each prompt; when that exceeds the tail mass ``(1 - confidence) / 2`` the CI
    endpoints are the smallest and largest per-prompt values whatever the data. The smallest
    ``n`` with ``n ** -n <= (1 - confidence) / 2`` is 4 at 95% and 5 at 99.9%."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    tail = (1.0 - confidence) / 2.0
    n = 2
    while n ** (-n) > tail:
        n += 1
    return n


def _check_bootstrap_size(n_prompts: int, confidence: float, n_boot: int) -> None:
    needed = min_prompts_for_bootstrap(confidence)
    if n_prompts < needed:
        raise ValueError(
            f"too few prompts for a bootstrap: got {n_prompts}, need at least {needed} for a "
            f"{confidence:.0%} CI (with fewer, every resample CI is just the data range); "
            "20 or more give usable intervals"
        )
    min_boot = math.ceil(2.0 / (1.0 - confidence))
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


# =============================================================================== bands
def _resolve_bands(model: "HookedAttnResTransformer", bands: BandsLike) -> dict[str, tuple[int, ...]]:
    n_layers = model.cfg.n_layers
    if bands is None:
        return default_bands(n_layers)
    if not isinstance(bands, Mapping) or not bands:
        raise ValueError(
            "bands must be a non-empty mapping from band name to the layers it holds, e.g. "
            f"{default_bands(n_layers)}"
        )
    resolved: dict[str, tuple[int, ...]] = {}
    owner: dict[int, str] = {}
    for name, layers in bands.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"band names must be non-empty strings, got {name!r}")
        layers = tuple(layers)
        if not layers:
            raise ValueError(f"band {name!r} holds no layers")
        for layer in layers:
            if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not 0 <= layer < n_layers:
                raise ValueError(
                    f"band {name!r} names layer {layer!r}, but the model's layers are 0..{n_layers - 1}"
                )
            if int(layer) in owner:
                raise ValueError(f"layer {layer} is in two bands: {owner[int(layer)]!r} and {name!r}")
            owner[int(layer)] = name
        resolved[name] = tuple(int(layer) for layer in layers)
    return resolved


def _band_of(spec: RouterSpec, bands: Mapping[str, tuple[int, ...]]) -> Optional[str]:
    """The band of a router's layer (``None`` for the final router, which is its own sublayer
    kind ``"final"`` in band groupings, as in :func:`attnres_lens.patching.sweep_sources`, and for
    layers no band holds)."""
    if spec.layer is None:
        return None
    for name, layers in bands.items():
        if spec.layer in layers:
            return name
    return None


# =============================================================================== routing statistics
class _Moments:
    """Per-prompt means and variances of a few columns, for exact two-pass statistics.

    Values are stored relative to the first token seen (a reference), so a column that never
    changes gives a variance of exactly 0.0 (not a rounding residue)."""

    def __init__(self) -> None:
        self.ref: Optional[Tensor] = None
        self.means: list[Tensor] = []  # [batch, column] each, relative to ref
        self.vars: list[Tensor] = []
        self.lengths: list[int] = []
        self.lo: Optional[Tensor] = None
        self.hi: Optional[Tensor] = None

    def update(self, x: Float[Tensor, "batch pos column"]) -> None:
        x = x.detach().to("cpu", torch.float64)
        if self.ref is None:
            self.ref = x[0, 0].clone()
        d = x - self.ref
        mean = d.mean(1)
        self.means.append(mean)
        self.vars.append((d - mean[:, None]).pow(2).mean(1))
        self.lengths += [x.shape[1]] * x.shape[0]
        lo, hi = x.amin((0, 1)), x.amax((0, 1))
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def finish(self) -> dict[str, np.ndarray]:
        means = torch.cat(self.means)  # [prompts, column]
        within = torch.cat(self.vars)
        w = torch.tensor(self.lengths, dtype=torch.float64)[:, None]
        w = w / w.sum()
        mean = (w * means).sum(0)
        between = (w * (means - mean).pow(2)).sum(0)
        within_mean = (w * within).sum(0)
        mass = self.ref + mean
        prompt_mass = self.ref + means
        return {
            "mass": mass.numpy(),
            "var": (within_mean + between).numpy(),
            "within": within_mean.numpy(),
            "between": between.numpy(),
            "min": self.lo.numpy(),
            "max": self.hi.numpy(),
            "prompt_mass": prompt_mass.numpy().T,  # [column, prompts]
        }


def _normalised_dependence(var: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """``std / sqrt(m (1 - m))``: 0 for a fixed weight, 1 for all-or-nothing routing."""
    bound = mass * (1.0 - mass)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sqrt(np.clip(var, 0.0, None) / bound)
    out = np.where((var <= 0.0) | (bound <= 0.0), 0.0, out)
    return np.clip(out, 0.0, 1.0)


class _RoutingAccumulator:
    """Streams routing weights batch by batch into per-slice and per-family moments."""

    def __init__(self, model: "HookedAttnResTransformer", bands: Mapping[str, tuple[int, ...]]):
        self.model = model
        self.bands = bands
        self.specs = model.router_specs
        self.family_index = {
            spec.name: [
                (fam, [s.index for s in spec.sources if s.family == fam]) for fam in spec.families()
            ]
            for spec in self.specs
        }
        self.moments = {spec.name: _Moments() for spec in self.specs}
        self.entropy_sum = {spec.name: 0.0 for spec in self.specs}
        self.n_tokens = 0
        self.n_prompts = 0

    def update(self, weights: Mapping[str, Tensor]) -> None:
        for spec in self.specs:
            w = weights[spec.name].detach().to("cpu", torch.float64)
            fams = [w[..., idx].sum(-1) for _, idx in self.family_index[spec.name]]
            self.moments[spec.name].update(torch.cat([w, torch.stack(fams, -1)], -1))
            p = w.clamp_min(1e-300)
            self.entropy_sum[spec.name] += float(-(w * p.log()).sum())
        first = weights[self.specs[0].name]
        self.n_tokens += int(first.shape[0] * first.shape[1])
        self.n_prompts += int(first.shape[0])

    def finish(self) -> "RoutingStatistics":
        slice_rows, family_rows, router_rows = [], [], []
        prompt_mass: dict[tuple[str, int], np.ndarray] = {}
        for spec in self.specs:
            st = self.moments[spec.name].finish()
            band = _band_of(spec, self.bands)
            base = {"router": spec.name, "layer": spec.layer, "sublayer": spec.sublayer, "band": band}
            n = spec.n_sources
            for src in spec.sources:
                i = src.index
                slice_rows.append(
                    {
                        **base,
                        "source": i,
                        "family": src.family,
                        "label": src.label,
                        **_stat_columns(st, i),
                    }
                )
                prompt_mass[(spec.name, i)] = st["prompt_mass"][i]
            for j, (fam, idx) in enumerate(self.family_index[spec.name]):
                family_rows.append({**base, "family": fam, "n_sources": len(idx), **_stat_columns(st, n + j)})
            var, mass = st["var"][:n], st["mass"][:n]
            bound = float((mass * (1 - mass)).sum())
            total_var = float(np.clip(var, 0, None).sum())
            router_rows.append(
                {
                    **base,
                    "n_sources": n,
                    "content_dependence": 0.0
                    if total_var <= 0.0 or bound <= 0.0
                    else min(1.0, math.sqrt(total_var / bound)),
                    "entropy": self.entropy_sum[spec.name] / max(self.n_tokens, 1),
                    "max_entropy": math.log(n),
                }
            )
        slices = _with_int_layer(pd.DataFrame(slice_rows))
        families = _with_int_layer(pd.DataFrame(family_rows))
        routers = _with_int_layer(pd.DataFrame(router_rows))
        return RoutingStatistics(
            slices=slices,
            routers=routers,
            router_families=families,
            families=_aggregate_families(families, ["family"]),
            family_bands=_aggregate_families(
                families[families["band"].notna() | (families["sublayer"] == "final")],
                ["family", "sublayer", "band"],
                order=list(self.bands),
            ),
            bands=dict(self.bands),
            n_prompts=self.n_prompts,
            n_tokens=self.n_tokens,
            prompt_mass=prompt_mass,
        )


def _stat_columns(st: Mapping[str, np.ndarray], i: int) -> dict[str, float]:
    var = float(max(st["var"][i], 0.0))
    mass = float(st["mass"][i])
    return {
        "mass": mass,
        "mass_std": math.sqrt(var),
        "mass_min": float(st["min"][i]),
        "mass_max": float(st["max"][i]),
        "between_prompt_std": math.sqrt(max(float(st["between"][i]), 0.0)),
        "within_prompt_std": math.sqrt(max(float(st["within"][i]), 0.0)),
        "content_dependence": float(_normalised_dependence(np.array([var]), np.array([mass]))[0]),
    }


def _with_int_layer(df: pd.DataFrame) -> pd.DataFrame:
    if "layer" in df:
        df["layer"] = df["layer"].astype("Int64")
    return df


def _aggregate_families(
    families: pd.DataFrame, keys: list[str], order: Optional[list[str]] = None
) -> pd.DataFrame:
    rows = []
    for key, part in families.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        var = part["mass_std"].to_numpy() ** 2
        mass = part["mass"].to_numpy()
        bound = float((mass * (1 - mass)).sum())
        rows.append(
            {
                **dict(zip(keys, key)),
                "n_routers": len(part),
                "mass": float(mass.mean()),
                "mass_router_min": float(mass.min()),
                "mass_router_max": float(mass.max()),
                "mass_std": float(math.sqrt(var.mean())),
                "content_dependence": 0.0
                if var.sum() <= 0 or bound <= 0
                else float(min(1.0, math.sqrt(var.sum() / bound))),
            }
        )
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    sort_cols = []
    fam_rank = {f: i for i, f in enumerate(FAMILIES)}
    if "sublayer" in keys:
        sort_cols.append("sublayer")
    if "band" in keys and order is not None:
        sort_cols.append("band")
    sort_cols.append("family")

    def keyfn(col: pd.Series) -> pd.Series:
        if col.name == "family":
            return col.map(fam_rank)
        if col.name == "sublayer":
            return col.map({k: i for i, k in enumerate(_SUBLAYER_KINDS)})
        return col.map({b: i for i, b in enumerate(order or [])}).fillna(len(order or []))

    return out.sort_values(sort_cols, key=keyfn, kind="stable").reset_index(drop=True)


@dataclass
class RoutingStatistics:
    """Descriptive routing statistics over a dataset (:func:`routing_statistics`).

    - ``slices``: one row per router and source: ``mass`` (mean alpha over tokens), ``mass_std``
      (its standard deviation over tokens), ``mass_min``/``mass_max``, ``between_prompt_std``
      (std over prompts of the per-prompt mean) and ``within_prompt_std`` (root mean
      within-prompt variance over positions; ``mass_std**2 = between**2 + within**2``), and
      ``content_dependence = mass_std / sqrt(mass * (1 - mass))`` in ``[0, 1]``: 0 when the
      weight is the same at every token (a schedule), 1 when it switches between 0 and 1.
    - ``routers``: per router, ``content_dependence = sqrt(sum_i var_i / sum_i m_i (1 - m_i))``
      (the same normalisation over the whole weight vector) and the mean routing ``entropy``
      (nats; ``max_entropy = log n_sources``).
    - ``router_families``: like ``slices`` for the family mass (the sum of alpha over the
      family's sources) at each router.
    - ``families`` / ``family_bands``: ``router_families`` aggregated over routers, per family and
      per family x sublayer x depth band (the final router is sublayer ``"final"`` with no band):
      ``mass`` is the mean over routers, ``mass_router_min``
      and ``..._max`` its range over routers, ``mass_std`` the root mean token variance and
      ``content_dependence`` the pooled normalised measure.
    """

    slices: pd.DataFrame
    routers: pd.DataFrame
    router_families: pd.DataFrame
    families: pd.DataFrame
    family_bands: pd.DataFrame
    bands: dict[str, tuple[int, ...]]
    n_prompts: int
    n_tokens: int
    prompt_mass: dict = field(repr=False, default_factory=dict)

    @property
    def content_dependence(self) -> float:
        """The largest router-level content dependence: 0 exactly for a schedule."""
        return float(self.routers["content_dependence"].max())

    def to_markdown(self, floatfmt: str = ".4f") -> str:
        parts = [
            f"### Routing statistics ({self.n_prompts} prompts, {self.n_tokens} tokens)",
            "",
            "#### Per family",
            _markdown_table(self.families, floatfmt),
            "",
            "#### Per family x sublayer x depth band",
            _markdown_table(self.family_bands, floatfmt),
        ]
        return "\n".join(parts)


def _capture_weights_hooks(model: "HookedAttnResTransformer", store: dict) -> list[tuple[str, Callable]]:
    def hook(tensor: Tensor, hook: Any) -> None:
        store[hook.name.rsplit(".hook_weights", 1)[0]] = tensor

    return [(f"{spec.name}.hook_weights", hook) for spec in model.router_specs]


def _split(batch: Tensor, batch_size: Optional[int]) -> list[Tensor]:
    if batch_size is None or batch_size >= batch.shape[0]:
        return [batch]
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    return list(batch.split(batch_size))


def routing_statistics(
    model: "HookedAttnResTransformer",
    tokens_or_batches: Any,
    *,
    bands: BandsLike = None,
    batch_size: Optional[int] = None,
) -> RoutingStatistics:
    """Routing mass, its spread, and content dependence over a dataset (see
    :class:`RoutingStatistics`). ``bands`` maps band names to layers (default: early/late
    halves). One forward per batch."""
    acc = _RoutingAccumulator(model, _resolve_bands(model, bands))
    _accumulate_routing(model, _as_batches(model, tokens_or_batches), batch_size, acc)
    return acc.finish()


def _accumulate_routing(
    model: "HookedAttnResTransformer", batches: list[Tensor], batch_size: Optional[int], acc: "_RoutingAccumulator"
) -> None:
    """One no-grad forward per chunk, feeding every router's weights to ``acc``."""
    store: dict[str, Tensor] = {}
    hooks = _capture_weights_hooks(model, store)
    with torch.no_grad():
        for batch in batches:
            for chunk in _split(batch, batch_size):
                store.clear()
                model.run_with_hooks(chunk, return_type=None, fwd_hooks=hooks)
                acc.update(store)


# =============================================================================== metrics
def _metric_for_prompts(metric: Any, start: int, stop: int) -> Any:
    """The metric restricted to prompts ``start..stop-1`` of the dataset (metrics with per-prompt
    data, such as :func:`attnres_lens.patching.logit_diff_metric`, carry ``subset``)."""
    if callable(metric) and hasattr(metric, "subset"):
        return metric.subset(torch.arange(start, stop))
    return metric


def _differentiable_metric(metric: Any) -> Optional[Callable[..., Tensor]]:
    """The per-prompt metric ``(logits, tokens) -> [batch]`` to differentiate, or ``None`` when
    a first-order estimate is meaningless: ``"kl"`` from the clean distribution has value and
    gradient 0 at the clean run, so every first-order estimate of it is exactly 0."""
    from .metrics import per_prompt_loss

    if isinstance(metric, str):
        if metric == "loss":
            return per_prompt_loss
        if metric == "kl":
            return None
        raise ValueError(f"unknown metric {metric!r}: use 'loss', 'kl', logit_diff_metric(...) or a callable")
    if callable(metric):
        return metric
    raise TypeError(f"metric must be 'loss', 'kl' or a callable, got {metric!r}")


def _metric_name(metric: Any) -> str:
    if isinstance(metric, str):
        return metric
    return getattr(metric, "__name__", type(metric).__name__)


# =============================================================================== gradient attribution
def _positions_list(positions: Any, n_pos: int) -> Optional[list[int]]:
    if positions is None:
        return None
    if isinstance(positions, slice):
        return list(range(n_pos))[positions]
    if isinstance(positions, Tensor):
        positions = positions.reshape(-1).tolist()
    if isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
        positions = [positions]
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not -n_pos <= int(p) < n_pos:
            raise ValueError(f"position {p!r} is out of range for sequences of length {n_pos}")
        out.append(int(p) % n_pos)
    if not out:
        raise ValueError("positions is empty; pass None to act on every position")
    return out


def _positions_mask(positions: Any, n_pos: int) -> Optional[Float[Tensor, " n_pos"]]:
    chosen = _positions_list(positions, n_pos)
    if chosen is None:
        return None
    mask = torch.zeros(n_pos, dtype=torch.float64)
    mask[chosen] = 1.0
    return mask


def _gradient_pass(
    model: "HookedAttnResTransformer", tokens: Int[Tensor, "batch pos"], metric_fn: Callable[..., Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
    """One forward and one backward: the routing weights and logits of every router and the
    gradient of the per-prompt metric with respect to the weights (``[batch, pos, source]``
    each). Prompts do not interact, so the gradient of the *sum* of the per-prompt metrics gives
    every prompt's own gradient."""
    store: dict[str, Tensor] = {}
    logit_store: dict[str, Tensor] = {}
    hooks = _capture_weights_hooks(model, store)

    def keep_logits(tensor: Tensor, hook: Any) -> None:
        logit_store[hook.name.rsplit(".hook_logits", 1)[0]] = tensor.detach()

    hooks += [(f"{spec.name}.hook_logits", keep_logits) for spec in model.router_specs]

    def make_leaf(tensor: Tensor, hook: Any) -> Tensor:
        # A fresh leaf at the embedding: the graph exists whatever the parameters'
        # requires_grad, and autograd.grad computes no parameter gradient.
        return tensor.detach().requires_grad_(True)

    names = [spec.name for spec in model.router_specs]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", make_leaf), *hooks])
        values = metric_fn(logits, tokens)
        if not isinstance(values, Tensor) or values.shape != (tokens.shape[0],):
            raise ValueError(
                "the metric must return one value per prompt, a tensor of shape "
                f"[{tokens.shape[0]}], got "
                f"{tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}"
            )
        if not values.requires_grad:
            raise ValueError("the metric's value does not depend differentiably on the logits")
        grads = torch.autograd.grad(values.sum(), [store[n] for n in names], allow_unused=True)
    weights = {n: store[n].detach() for n in names}
    gradients = {n: torch.zeros_like(weights[n]) if g is None else g.detach() for n, g in zip(names, grads)}
    return weights, logit_store, gradients, values.detach()


def _estimates(
    w: Float[Tensor, "batch pos source"],
    logits: Float[Tensor, "batch pos source"],
    g: Float[Tensor, "batch pos source"],
    members: Sequence[int],
    pos_mask: Optional[Float[Tensor, " pos"]],
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """Per-prompt first-order estimates, at one router, of zeroing and of masking the sources
    ``S = members`` (``[batch]`` each, summed over the intervened positions).

    zero: ``alpha'_S = 0`` -> ``dL ~ -sum_{i in S} g_i alpha_i``.
    mask: ``alpha'_j = alpha_j / (1 - s)`` off ``S`` (``s = sum_S alpha``), ``0`` on ``S`` ->
    ``dL ~ sum_j g_j (alpha'_j - alpha_j) = (s G - sum_S g_i alpha_i) / (1 - s)`` with
    ``G = sum_j g_j alpha_j``; for one source ``alpha_i (G - g_i) / (1 - alpha_i)``. The
    renormalised ``alpha'`` is computed as the softmax of the logits with ``S`` removed, which
    stays exact where ``alpha_S`` rounds to 1. NaN where ``S`` is every source (masking is
    undefined)."""
    w = w.double()
    g = g.double()
    idx = list(members)
    ga = g * w
    zero = -ga[..., idx].sum(-1)  # [batch, pos]
    if len(idx) == w.shape[-1]:
        mask = torch.full_like(zero, float("nan"))
    else:
        masked_logits = logits.double().clone()
        masked_logits[..., idx] = float("-inf")
        renormalised = torch.softmax(masked_logits, dim=-1)
        mask = (g * (renormalised - w)).sum(-1)
    if pos_mask is not None:
        pm = pos_mask.to(zero.device)
        zero = zero * pm
        mask = torch.where(pm.bool(), mask, torch.zeros_like(mask))
    return zero.sum(-1), mask.sum(-1)


def _per_source(
    w: Float[Tensor, "batch pos source"],
    logits: Float[Tensor, "batch pos source"],
    g: Float[Tensor, "batch pos source"],
    pos_mask: Optional[Float[Tensor, " pos"]],
    need_mask: bool,
) -> dict[str, Optional[Tensor]]:
    """Every source of one router at once (``[batch, source]`` each, summed over the intervened
    positions): the zero and mask estimates of :func:`_estimates` for single sources, and the
    sums of alpha and of the gradient."""
    w = w.double()
    g = g.double()
    pm = torch.ones(w.shape[1], dtype=torch.float64, device=w.device) if pos_mask is None else pos_mask.to(w.device)
    pm = pm[None, :, None]
    out: dict[str, Optional[Tensor]] = {
        "zero": -(g * w * pm).sum(1),
        "mass": (w * pm).sum(1),
        "grad": (g * pm).sum(1),
        "mask": None,
    }
    if need_mask:
        b, p, n = w.shape
        if n == 1:
            out["mask"] = torch.full((b, 1), float("nan"), dtype=torch.float64, device=w.device)
        else:
            cols = []
            step = max(1, (1 << 24) // max(1, b * p * n))  # sources per chunk: bounded memory
            for start in range(0, n, step):
                idx = torch.arange(start, min(n, start + step), device=w.device)
                masked = logits.double().unsqueeze(-2).repeat(1, 1, len(idx), 1)  # [b, p, k, n]
                masked[..., torch.arange(len(idx)), idx] = float("-inf")
                delta = torch.softmax(masked, dim=-1) - w.unsqueeze(-2)
                cols.append(((g.unsqueeze(-2) * delta).sum(-1) * pm).sum(1))  # [b, k]
            out["mask"] = torch.cat(cols, dim=-1)
    return out


def _gradient_rows(
    model: "HookedAttnResTransformer",
    batches: list[Tensor],
    metric: Any,
    groups: Sequence[Sequence[tuple[str, int]]],
    positions: Any,
    batch_size: Optional[int],
    acc: Optional[_RoutingAccumulator] = None,
    kinds: tuple[str, ...] = ("zero", "mask"),
) -> dict[str, np.ndarray]:
    """Per-group, per-prompt gradient estimates (``[group, prompt]``) over all batches, for the
    estimates named in ``kinds``; also the per-prompt mean alpha and mean gradient of every
    group (summed over its sources). Zeroing is linear in the sources, so a group's zero
    estimate is the sum of its slices'; a group's mask estimate renormalises over the whole set
    at each router (:func:`_estimates`)."""
    metric_fn = _differentiable_metric(metric)
    if metric_fn is None:
        raise ValueError(
            "metric 'kl' has value and gradient 0 at the clean run: every first-order estimate is 0 "
            "(use 'loss', a logit difference or another metric that is not minimal at the clean run)"
        )
    need_mask = "mask" in kinds
    cols: dict[str, list[Tensor]] = {"zero": [], "mask": [], "mass": [], "grad": []}
    metric_vals = []
    by_router: list[dict[str, list[int]]] = []
    for members in groups:
        per: dict[str, list[int]] = {}
        for router, source in members:
            per.setdefault(router, []).append(int(source))
        by_router.append(per)
    used = {router for per in by_router for router in per}
    offset = 0
    for batch in batches:
        for chunk in _split(batch, batch_size):
            fn = _metric_for_prompts(metric_fn, offset, offset + chunk.shape[0])
            offset += chunk.shape[0]
            weights, logits, gradients, values = _gradient_pass(model, chunk, fn)
            if acc is not None:
                acc.update(weights)
            pos_mask = _positions_mask(positions, chunk.shape[1])
            n_read = chunk.shape[1] if pos_mask is None else float(pos_mask.sum())
            src = {
                r: _per_source(weights[r], logits[r], gradients[r], pos_mask, need_mask) for r in used
            }
            out = {k: torch.zeros(len(groups), chunk.shape[0], dtype=torch.float64) for k in cols}
            for k, per in enumerate(by_router):
                for router, idx in per.items():
                    s = src[router]
                    out["zero"][k] += s["zero"][:, idx].sum(-1).cpu()
                    out["mass"][k] += (s["mass"][:, idx].sum(-1) / n_read).cpu()
                    out["grad"][k] += (s["grad"][:, idx].sum(-1) / n_read).cpu()
                    if not need_mask:
                        continue
                    if len(idx) == 1:
                        out["mask"][k] += s["mask"][:, idx[0]].cpu()
                    else:
                        _, mk = _estimates(weights[router], logits[router], gradients[router], idx, pos_mask)
                        out["mask"][k] += mk.cpu()
            if not need_mask:
                out["mask"].fill_(float("nan"))
            for k in cols:
                cols[k].append(out[k])
            metric_vals.append(values.double().cpu())
    result = {k: torch.cat(v, 1).numpy() for k, v in cols.items()}
    result["metric"] = torch.cat(metric_vals).numpy()
    return result


def gradient_attribution(
    model: "HookedAttnResTransformer",
    tokens: Any,
    metric: Any = "loss",
    *,
    positions: Any = None,
    batch_size: Optional[int] = None,
) -> pd.DataFrame:
    """First-order estimates of the effect of zeroing and of masking every depth-source slice,
    all from one forward and one backward pass per batch.

    With ``g_i = d metric / d alpha_i`` at each token (the total derivative: routers downstream
    react to the change, as they do in the exact sweep) and ``G = sum_j alpha_j g_j`` (the
    router's alpha-weighted gradient), summed over the intervened positions and averaged over
    prompts:

    - ``zero_estimate = -alpha_i g_i``. Zeroing moves ``alpha_i`` by ``-alpha_i`` and leaves the
      others alone (attribution patching; the sign makes it an estimate of
      ``effect = ablated - clean``, so it is ``-(alpha_i dL/dalpha_i)``).
    - ``mask_estimate = alpha_i (G - g_i) / (1 - alpha_i)``. Masking renormalises:
      ``alpha'_j = alpha_j / (1 - alpha_i)`` for ``j != i`` and ``alpha'_i = 0``, so the first-order
      change ``sum_j g_j (alpha'_j - alpha_j) = alpha_i/(1-alpha_i) sum_{j != i} g_j alpha_j -
      g_i alpha_i`` simplifies to this; it is evaluated as ``sum_j g_j (alpha'_j - alpha_j)`` with
      ``alpha'`` the softmax of the logits without ``i`` (exact even where ``alpha_i`` rounds to
      1). NaN for a router's only source (masking it is undefined).

    ``metric``: ``"loss"`` (mean next-token loss per prompt), a callable ``(logits, tokens) ->
    [batch]`` such as :func:`attnres_lens.patching.logit_diff_metric`; ``"kl"`` is refused (its
    gradient at the clean run is 0). ``positions``: only these positions are intervened on.

    Columns: ``router, layer, sublayer, source, family, label``, ``mass`` (mean alpha), ``grad``
    (mean ``g_i`` per token), ``zero_estimate``, ``mask_estimate``, ``metric_clean``, and the
    per-prompt arrays ``zero_estimate_per_prompt`` and ``mask_estimate_per_prompt``.
    """
    batches = _as_batches(model, tokens)
    table = model.source_table()
    groups = [[(r, int(s))] for r, s in zip(table["router"], table["source"])]
    res = _gradient_rows(model, batches, metric, groups, positions, batch_size)
    table["mass"] = res["mass"].mean(1)
    table["grad"] = res["grad"].mean(1)
    table["zero_estimate"] = res["zero"].mean(1)
    table["mask_estimate"] = res["mask"].mean(1)
    table["metric_clean"] = float(res["metric"].mean())
    table["zero_estimate_per_prompt"] = list(res["zero"])
    table["mask_estimate_per_prompt"] = list(res["mask"])
    return table


# =============================================================================== exact sweep
def _sweep(
    model: "HookedAttnResTransformer",
    batches: list[Tensor],
    *,
    mode: str,
    metric: Any,
    groups: Any,
    positions: Any,
    batch_size: Optional[int],
    engine: str,
    bands: Optional[Mapping[str, tuple[int, ...]]],
    progress: bool,
) -> pd.DataFrame:
    """:func:`attnres_lens.patching.sweep_sources` on every batch; per-prompt arrays are
    concatenated across batches and the means recomputed over all prompts."""
    from .patching import sweep_sources

    tables = []
    offset = 0
    for batch in batches:
        n = int(batch.shape[0])
        with warnings.catch_warnings():
            # rows masking every source of a router come back NaN with a warning; they are
            # dropped (and listed) by mass_vs_effect
            warnings.filterwarnings("ignore", message=".*mask every source of a router.*")
            tables.append(
                sweep_sources(
                    model,
                    batch,
                    mode=mode,
                    metric=_metric_for_prompts(metric, offset, offset + n),
                    groups=groups,
                    positions=positions,
                    batch_size=batch_size,
                    engine=engine,
                    bands=bands if isinstance(groups, str) and groups == "family_band" else None,
                    progress=progress,
                )
            )
        offset += n
    out = tables[0].copy().reset_index(drop=True)
    out.attrs = dict(tables[0].attrs)
    if len(tables) > 1:
        for col in ("mass_per_prompt", "effect_per_prompt"):
            out[col] = [np.concatenate([np.asarray(t[col].iloc[k]) for t in tables]) for k in range(len(out))]
        out.attrs["metric_clean_per_prompt"] = np.concatenate(
            [np.asarray(t.attrs.get("metric_clean_per_prompt", [])) for t in tables]
        )
    out["mass"] = [float(np.mean(v)) for v in out["mass_per_prompt"]]
    out["effect"] = [float(np.mean(v)) for v in out["effect_per_prompt"]]
    clean = np.asarray(out.attrs.get("metric_clean_per_prompt", []), dtype=float)
    if clean.size:
        out["metric_clean"] = float(clean.mean())
        out["metric_ablated"] = out["metric_clean"] + out["effect"]
    return out


# =============================================================================== statistics
def _spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho between ``x[:, b]`` and ``y[:, b]`` for every column ``b`` (ranks from
    ``scipy.stats.rankdata``, average ties, then Pearson on the ranks)."""
    rx = scipy.stats.rankdata(x, axis=0)
    ry = scipy.stats.rankdata(y, axis=0)
    rx = rx - rx.mean(0)
    ry = ry - ry.mean(0)
    den = np.sqrt((rx * rx).sum(0) * (ry * ry).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (rx * ry).sum(0) / den, np.nan)


def _kendall_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.full(x.shape[1], np.nan)
    if x.shape[0] < 2:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in range(x.shape[1]):
            out[b] = scipy.stats.kendalltau(x[:, b], y[:, b]).statistic
    return out


#: scipy >= 1.15 names the generator ``rng``; older releases call it ``random_state``.
_BOOTSTRAP_RNG = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


@dataclass
class _Boot:
    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    distribution: np.ndarray


def _bootstrap(
    per_prompt: np.ndarray,
    extra: Optional[Callable[[np.ndarray], np.ndarray]],
    *,
    n_boot: int,
    confidence: float,
    seed: int,
    method: str,
) -> _Boot:
    """Bootstrap over prompts of the means of every row of ``per_prompt`` ``[rows, prompts]``
    and of ``extra(means)`` (statistics of the row means, e.g. rank correlations), in one
    ``scipy.stats.bootstrap`` call: the resampled objects are prompt indices, so every
    statistic sees the same resamples (paired), and the means of all rows come from one matrix
    product per batch of resamples."""
    n = per_prompt.shape[1]

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.asarray(idx).astype(np.intp)
        lead = idx.shape[:-1]
        flat = idx.reshape(-1, idx.shape[-1])
        b, m = flat.shape
        counts = np.zeros((b, n))
        np.add.at(counts, (np.repeat(np.arange(b), m), flat.ravel()), 1.0)
        means = per_prompt @ counts.T / m  # [rows, b]
        out = means if extra is None else np.vstack([means, extra(means)])
        return out.reshape(out.shape[0], *lead)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (constant) rows: handled below
        res = scipy.stats.bootstrap(
            (np.arange(n),),
            statistic,
            n_resamples=n_boot,
            vectorized=True,
            confidence_level=confidence,
            method=method,
            **{_BOOTSTRAP_RNG: np.random.default_rng(seed)},
        )
    estimate = statistic(np.arange(n))
    low = np.asarray(res.confidence_interval.low, dtype=float)
    high = np.asarray(res.confidence_interval.high, dtype=float)
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    # BCa is undefined for a statistic that never varies: its CI is the point itself.
    flat = np.nanmax(dist, -1) - np.nanmin(dist, -1) == 0
    low = np.where(np.isnan(low) & flat, estimate, low)
    high = np.where(np.isnan(high) & flat, estimate, high)
    return _Boot(estimate, low, high, dist)


def _row_name(row: Any) -> str:
    """A short human name for a table row: ``"L3 mlp: [1] block 0"`` (slice), ``"L3 mlp:
    history"`` (family at a router), else the group's label."""
    router, source, label = row.get("router"), row.get("source"), row.get("label")
    if not _is_na(router):
        head = _router_label(row.get("layer"), row.get("sublayer"))
        if not _is_na(source):
            return f"{head}: [{int(source)}] {label}"
        if not _is_na(row.get("family")):
            return f"{head}: {row['family']}"
    return str(label)


def _markdown_table(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A GitHub-markdown table (no dependency on ``tabulate``)."""

    def cell(v: Any) -> str:
        if _is_na(v):
            return ""
        if isinstance(v, (float, np.floating)):
            return format(float(v), floatfmt)
        return str(v).replace("|", "\\|")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


# =============================================================================== report
_FAMILY_COLOURS = {"embedding": "#1f77b4", "current": "#ff7f0e", "history": "#2ca02c"}
_SUBLAYER_MARKERS = {"attn": "o", "mlp": "s", "final": "^"}


@dataclass
class MassEffectReport:
    """What :func:`mass_vs_effect` found. All effects are ``metric(ablated) - metric(clean)``.

    - ``table``: one row per slice or group: its keys (``router, layer, sublayer, source,
      family, label`` as in the sweep, plus ``band``), ``name``, ``mass`` with its bootstrap CI
      ``mass_low``/``mass_high``, ``effect`` with ``effect_low``/``effect_high``, ``abs_effect``,
      ``effect_ci_excludes_zero``, ``content_dependence`` (slices), the gradient estimate of
      the same intervention ``grad_estimate`` (with its CI) when available, ``eligible`` (False
      for single-source routers, whose mass is 1 by construction: they are kept in the table
      but left out of flags, the largest-slice comparison and the correlations) and ``flag``.
    - ``flags``: the flagged rows (``flag`` is :data:`FLAG_MASS_WITHOUT_CAUSAL_ROLE` or
      :data:`FLAG_CAUSAL_WITHOUT_MASS`) with a human ``reason``.
    - ``largest``: per sublayer kind (``"attn"``, ``"mlp"``), the largest-mass and the
      largest-``|effect|`` rows, whether they coincide (``same``; rows tied for the largest mass,
      ``n_tied_for_mass``, all count as largest) and in what fraction of the bootstrap resamples
      they coincide (``p_same``).
    - ``rank_correlation``: Spearman and Kendall between mass and ``|effect|`` over the eligible
      rows (``estimate``, ``low``, ``high``: a bootstrap CI over prompts; ``pvalue`` from scipy,
      which treats rows as independent: read the CI).
    - ``gradient_agreement``: how the first-order estimate ranks rows compared with the exact
      effect (Spearman/Kendall, sign agreement, top-k overlap) and ``disagreements``, the rows
      where they part (sign flips on a significant effect, or an error above half the effect).
    - ``routing``: :class:`RoutingStatistics` on the same tokens; ``sweep``: the raw sweep table
      (per-prompt arrays included); ``settings`` and ``timings``.
    """

    table: pd.DataFrame
    flags: pd.DataFrame
    largest: dict
    rank_correlation: dict
    gradient_agreement: Optional[dict]
    routing: Optional[RoutingStatistics]
    sweep: pd.DataFrame
    settings: dict
    timings: dict
    source_table: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        s = self.settings
        lines = [
            f"mass vs effect: mode={s['mode']!r}, metric={s['metric']!r}, groups={s['groups']!r}, "
            f"{s['n_prompts']} prompts, {s['n_boot']} bootstrap resamples, "
            f"{s['confidence']:.0%} CIs ({s['ci_method']})",
            f"clean metric: {s['metric_clean']:.4f}; thresholds: mass >= {s['mass_threshold']} "
            f"(appreciable), mass < {s['low_mass_threshold']} (little), |effect| >= "
            f"{s['effect_threshold']} (practical)",
        ]
        for kind, info in self.largest.items():
            verdict = "the same" if info["same"] else "different"
            lines.append(
                f"{kind}: largest mass {info['largest_mass']} ({info['mass']:.3f}); largest |effect| "
                f"{info['largest_effect']} ({info['effect']:+.4f}): {verdict} "
                f"(same in {info['p_same']:.0%} of resamples)"
            )
        for name, rc in self.rank_correlation.items():
            if isinstance(rc, dict):
                lines.append(
                    f"{name} (mass, |effect|) = {rc['estimate']:+.3f} "
                    f"[{rc['low']:+.3f}, {rc['high']:+.3f}] over {self.rank_correlation['n']} rows"
                )
        counts = self.flags["flag"].value_counts().to_dict() if len(self.flags) else {}
        lines.append(
            f"flags: {counts.get(FLAG_MASS_WITHOUT_CAUSAL_ROLE, 0)} '{FLAG_MASS_WITHOUT_CAUSAL_ROLE}', "
            f"{counts.get(FLAG_CAUSAL_WITHOUT_MASS, 0)} '{FLAG_CAUSAL_WITHOUT_MASS}'"
        )
        if self.gradient_agreement:
            g = self.gradient_agreement
            lines.append(
                f"gradient ({g['estimate']}) vs exact: Spearman {g['spearman']:+.3f}, Kendall "
                f"{g['kendall']:+.3f}, |.| Spearman {g['spearman_abs']:+.3f}, sign agreement "
                f"{g['sign_agreement']:.0%}, top-{g['top_k']} overlap {g['top_k_overlap']}/{g['top_k']}, "
                f"{len(g['disagreements'])} disagreements"
            )
        return "\n".join(lines)

    _TABLE_COLUMNS = (
        "name", "mass", "mass_low", "mass_high", "effect", "effect_low", "effect_high",
        "grad_estimate", "content_dependence", "flag",
    )

    def to_markdown(self, floatfmt: str = ".4f", max_rows: Optional[int] = None) -> str:
        """The summary, the table (CIs as ``[low, high]``) and the flags, as markdown."""
        t = self.table
        view = pd.DataFrame({"row": t["name"]})
        view["mass [CI]"] = [
            f"{m:{floatfmt}} [{lo:{floatfmt}}, {hi:{floatfmt}}]"
            for m, lo, hi in zip(t["mass"], t["mass_low"], t["mass_high"])
        ]
        view["effect [CI]"] = [
            f"{e:+{floatfmt}} [{lo:+{floatfmt}}, {hi:+{floatfmt}}]"
            for e, lo, hi in zip(t["effect"], t["effect_low"], t["effect_high"])
        ]
        if "grad_estimate" in t and t["grad_estimate"].notna().any():
            view["gradient est."] = [
                "" if pd.isna(g) else f"{g:+{floatfmt}}" for g in t["grad_estimate"]
            ]
        if "content_dependence" in t and t["content_dependence"].notna().any():
            view["content dep."] = [
                "" if pd.isna(c) else f"{c:.3f}" for c in t["content_dependence"]
            ]
        view["flag"] = t["flag"]
        if max_rows is not None:
            view = view.head(max_rows)
        parts = ["```", self.summary(), "```", "", _markdown_table(view)]
        if len(self.flags):
            parts += ["", "**Flags**", ""]
            parts += [f"- {r['name']}: **{r['flag']}** ({r['reason']})" for _, r in self.flags.iterrows()]
        if self.gradient_agreement and len(self.gradient_agreement["disagreements"]):
            d = self.gradient_agreement["disagreements"]
            parts += ["", "**Where the gradient estimate and the exact effect disagree**", ""]
            parts.append(_markdown_table(d, floatfmt))
        return "\n".join(parts)

    def to_dict(self) -> dict:
        """Everything but the per-prompt arrays, as plain JSON-serialisable Python."""
        table = self.table.drop(columns=[c for c in self.table if c.endswith("_per_prompt")])
        out = {
            "settings": self.settings,
            "timings": self.timings,
            "table": table,
            "flags": self.flags,
            "largest": self.largest,
            "rank_correlation": self.rank_correlation,
            "gradient_agreement": self.gradient_agreement,
        }
        if self.routing is not None:
            out["routing"] = {
                "families": self.routing.families,
                "family_bands": self.routing.family_bands,
                "routers": self.routing.routers,
                "bands": self.routing.bands,
            }
        return jsonable(out)

    def to_json(self, path: Optional[str] = None, indent: int = 2) -> str:
        """:meth:`to_dict` as a JSON string (also written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    # ------------------------------------------------------------------ plots
    def plot_mass_heatmap(self, path: Optional[str] = None, annotate: Optional[bool] = None) -> "Figure":
        """Mean routing mass, routers (layer x sublayer) down, sources across (labelled from
        ``source_table()``); flagged cells outlined."""
        return _heatmap(self, "mass", path=path, annotate=annotate)

    def plot_effect_heatmap(
        self, path: Optional[str] = None, annotate: Optional[bool] = None, scale: str = "auto"
    ) -> "Figure":
        """The exact effect of the intervention, same layout as :meth:`plot_mass_heatmap`
        (diverging colours centred on 0; cells whose CI includes 0 are hatched). ``scale``:
        ``"linear"``, ``"symlog"`` or ``"auto"`` (symlog when the largest effect is over 30 times
        the median one, so that one catastrophic slice does not wash the others out)."""
        return _heatmap(self, "effect", path=path, annotate=annotate, scale=scale)

    def plot_scatter(
        self, path: Optional[str] = None, annotate_flags: bool = True, max_labels: int = 8, yscale: str = "auto"
    ) -> "Figure":
        """Mass against effect with bootstrap CIs on both, coloured by family, one marker per
        sublayer kind (hollow: single-source routers); the thresholds drawn; up to
        ``max_labels`` flagged rows named. ``yscale``: ``"linear"``, ``"symlog"`` or ``"auto"``
        (as for :meth:`plot_effect_heatmap`)."""
        return _scatter(self, path=path, annotate_flags=annotate_flags, max_labels=max_labels, yscale=yscale)

    def plot_gradient_vs_exact(self, path: Optional[str] = None, scale: str = "auto") -> "Figure":
        """The gradient estimate against the exact effect (with CIs), identity line drawn;
        ``scale`` as for :meth:`plot_effect_heatmap` (on both axes)."""
        return _gradient_scatter(self, path=path, scale=scale)


# =============================================================================== mass vs effect
_CI_METHODS = ("percentile", "basic", "BCa")
_GROUP_KINDS = ("slice", "family", "family_band")
_SPEC_KEYS = ("family", "families", "sublayer", "sublayers", "band", "bands", "layers")
_SUBLAYERS = ("attn", "mlp", "final")


def _is_na(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _names(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _select_slices(
    model: "HookedAttnResTransformer", name: str, spec: Mapping, bands: Mapping[str, tuple[int, ...]]
) -> list[tuple[str, int]]:
    """The slices a group *description* selects: ``{"family": ..., "sublayer": ..., "band": ...,
    "layers": ...}`` (each optional, a name or a list; ``None`` = any). Bands and layers select
    attention and MLP routers by layer; the final router only through ``sublayer="final"``."""
    unknown = [k for k in spec if k not in _SPEC_KEYS]
    if unknown:
        raise ValueError(f"group {name!r} has unknown keys {unknown}; a group description takes {_SPEC_KEYS}")
    fams = _names(spec.get("family", spec.get("families")))
    for fam in fams:
        if fam not in FAMILIES:
            raise ValueError(f"group {name!r} names unknown family {fam!r}; families are {FAMILIES}")
    subs = _names(spec.get("sublayer", spec.get("sublayers")))
    for sub in subs:
        if sub not in _SUBLAYERS:
            raise ValueError(f"group {name!r} names unknown sublayer {sub!r}; sublayers are {_SUBLAYERS}")
    band_names = _names(spec.get("band", spec.get("bands")))
    layers: Optional[set[int]] = None
    for band in band_names:
        if band not in bands:
            raise ValueError(f"group {name!r} names unknown band {band!r}; bands are {list(bands)}")
        layers = (layers or set()) | set(bands[band])
    if spec.get("layers") is not None:
        explicit = list(spec["layers"])
        for layer in explicit:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < model.cfg.n_layers:
                raise ValueError(
                    f"group {name!r} names layer {layer!r}; the model's layers are 0..{model.cfg.n_layers - 1}"
                )
        layers = set(int(x) for x in explicit) if layers is None else layers & set(int(x) for x in explicit)
    out = []
    for rs in model.router_specs:
        if subs and rs.sublayer not in subs:
            continue
        if layers is not None and (rs.layer is None or rs.layer not in layers):
            if not (rs.layer is None and "final" in subs):
                continue
        out += [(rs.name, s.index) for s in rs.sources if not fams or s.family in fams]
    if not out:
        raise ValueError(f"group {name!r} ({dict(spec)}) selects no source of this model")
    return out


def _resolve_groups(
    model: "HookedAttnResTransformer", groups: Any, bands: Mapping[str, tuple[int, ...]]
) -> tuple[Any, Optional[list[list[tuple[str, int]]]]]:
    """What to pass to ``sweep_sources(groups=...)``, and for a mapping the slices of each group.

    A mapping's values are either lists of ``(router, source)`` pairs (as in ``sweep_sources``)
    or descriptions ``{"family": ..., "sublayer": ..., "band": ..., "layers": ...}``, checked
    against the known families, sublayers and ``bands``."""
    if isinstance(groups, str):
        if groups not in _GROUP_KINDS:
            raise ValueError(f"unknown groups {groups!r}; valid: {_GROUP_KINDS} or a mapping name -> group")
        return groups, None
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(
            f"groups must be one of {_GROUP_KINDS} or a non-empty mapping name -> group (a list of "
            f"(router, source) pairs or a description with keys {_SPEC_KEYS}); got {groups!r}"
        )
    from .interventions import Group, resolve_where

    resolved: dict[str, list[tuple[str, int]]] = {}
    for name, spec in groups.items():
        if not isinstance(name, str):
            raise TypeError(f"group names must be str, got {name!r}")
        if isinstance(spec, Mapping):
            resolved[name] = _select_slices(model, name, spec, bands)
        else:
            touched = resolve_where(model, Group(slices=tuple(spec), label=name))  # validates
            resolved[name] = [(rs.name, i) for rs, sources in touched for i in sources]
    return resolved, list(resolved.values())


def _members_and_bands(
    model: "HookedAttnResTransformer",
    sweep: pd.DataFrame,
    groups: Any,
    explicit: Optional[list[list[tuple[str, int]]]],
    bands: Mapping[str, tuple[int, ...]],
) -> tuple[list[list[tuple[str, int]]], list[Optional[str]]]:
    """The slices behind every sweep row, and its depth band (``None`` when it spans several,
    or for the final router)."""
    specs = {s.name: s for s in model.router_specs}
    members: list[list[tuple[str, int]]] = []
    row_bands: list[Optional[str]] = []
    for k, (_, row) in enumerate(sweep.iterrows()):
        band: Optional[str] = None
        if explicit is not None:
            m = explicit[k]
        elif groups == "slice":
            m = [(row["router"], int(row["source"]))]
        elif groups == "family":
            rs = specs[row["router"]]
            m = [(rs.name, s.index) for s in rs.sources if s.family == row["family"]]
        else:  # family_band: rows are family x sublayer x band, the final router its own kind
            fam, sub = row["family"], row["sublayer"]
            if sub == "final":
                chosen = [s for s in specs.values() if s.sublayer == "final"]
            else:
                label = str(row["label"])
                matches = [b for b in bands if label.startswith(f"{fam}, {sub}, {b} (")]
                if len(matches) != 1:
                    raise RuntimeError(f"cannot tell which band the sweep row {label!r} is; bands are {list(bands)}")
                band = matches[0]
                chosen = [s for s in specs.values() if s.sublayer == sub and s.layer in bands[band]]
            m = [(s.name, src.index) for s in chosen for src in s.sources if src.family == fam]
        if explicit is not None or groups in ("slice", "family"):
            found = {_band_of(specs[r], bands) for r, _ in m}
            band = found.pop() if len(found) == 1 else None
        members.append(m)
        row_bands.append(band)
    return members, row_bands


def _undefined_rows(model: "HookedAttnResTransformer", mode: str, members: list) -> list[int]:
    """Rows whose intervention is undefined: masking every source of a router."""
    if mode != "mask":
        return []
    n_sources = {s.name: s.n_sources for s in model.router_specs}
    out = []
    for k, m in enumerate(members):
        per: dict[str, set[int]] = {}
        for r, i in m:
            per.setdefault(r, set()).add(i)
        if any(len(v) == n_sources[r] for r, v in per.items()):
            out.append(k)
    return out


def _check_finite(sweep: pd.DataFrame) -> None:
    clean = np.asarray(sweep.attrs.get("metric_clean_per_prompt", sweep["metric_clean"]), dtype=float)
    if not np.all(np.isfinite(clean)):
        prompts = np.flatnonzero(~np.isfinite(clean)).tolist()
        raise ValueError(
            f"the metric is not finite on the clean run (prompt(s) {prompts[:10]}); a metric must "
            "return finite values"
        )
    for _, row in sweep.iterrows():
        values = np.asarray(row["effect_per_prompt"], dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            prompts = np.flatnonzero(bad).tolist()
            raise ValueError(
                f"the metric is not finite after ablating {_row_name(row)} (router="
                f"{row.get('router')!r}, source={row.get('source')!r}, family={row.get('family')!r}, "
                f"label={row.get('label')!r}) on prompt(s) {prompts[:10]} (value "
                f"{values[bad][0]}); a metric must return finite values for every slice"
            )


def mass_vs_effect(
    model: "HookedAttnResTransformer",
    tokens_or_batches: Any,
    *,
    groups: Any = "slice",
    mode: str = "zero",
    metric: Any = "loss",
    n_boot: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    ci_method: str = "percentile",
    mass_threshold: float = DEFAULT_MASS_THRESHOLD,
    low_mass_threshold: float = DEFAULT_LOW_MASS_THRESHOLD,
    effect_threshold: float = DEFAULT_EFFECT_THRESHOLD,
    bands: BandsLike = None,
    positions: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    engine: str = "batched",
    gradient: bool = True,
    progress: bool = False,
    top_k: int = 5,
) -> MassEffectReport:
    """Compare routing mass with causal effect, slice by slice (or group by group).

    Runs the exact sweep (:func:`attnres_lens.patching.sweep_sources` with ``mode``,
    ``metric``, ``groups``, ``bands``, ``positions``, ``batch_size``, ``engine``) on every batch
    of ``tokens_or_batches`` (a token tensor, a list of token tensors, or text), then
    bootstraps over prompts with ``scipy.stats.bootstrap`` (``n_boot`` resamples, ``seed``,
    ``confidence``, ``ci_method``): the mean mass and mean effect of every row, the rank
    correlations between mass and ``|effect|``, and whether the largest-mass row of each
    sublayer kind is also the largest-effect row. All statistics share the same resamples.

    Flags (only rows of routers with more than one source):

    - :data:`FLAG_MASS_WITHOUT_CAUSAL_ROLE`: ``mass >= mass_threshold`` and the effect's CI
      includes 0 or ``|effect| < effect_threshold``;
    - :data:`FLAG_CAUSAL_WITHOUT_MASS`: ``mass < low_mass_threshold``, the effect's CI excludes 0
      and ``|effect| >= effect_threshold``.

    Defaults: ``mass_threshold=0.2``, ``low_mass_threshold=0.05``, ``effect_threshold=0.01``
    (metric units: nats per token for ``"loss"``, about a 1% perplexity change).

    With ``gradient=True`` (modes ``"zero"`` and ``"mask"``), also computes
    :func:`gradient_attribution`'s estimate of the same intervention for every row (one forward
    and one backward per batch) and compares it with the exact effect. The same pass feeds
    :func:`routing_statistics` (``report.routing``).

    Raises ``ValueError`` for an empty dataset, too few prompts for a bootstrap (at least
    :func:`min_prompts_for_bootstrap` ``(confidence)``, 4 at 95%), groups naming unknown
    families or bands, and a metric that is not finite for some slice (named).
    """
    t_start = time.perf_counter()
    batches = _as_batches(model, tokens_or_batches)
    n_prompts = sum(int(b.shape[0]) for b in batches)
    if ci_method not in _CI_METHODS:
        raise ValueError(f"ci_method must be one of {_CI_METHODS}, got {ci_method!r}")
    for name, value in (("mass_threshold", mass_threshold), ("low_mass_threshold", low_mass_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if low_mass_threshold > mass_threshold:
        raise ValueError(
            f"low_mass_threshold={low_mass_threshold} must not exceed mass_threshold={mass_threshold}"
        )
    if not effect_threshold >= 0.0:
        raise ValueError(f"effect_threshold must be >= 0 (metric units), got {effect_threshold!r}")
    _check_bootstrap_size(n_prompts, confidence, n_boot)
    resolved = _resolve_bands(model, bands)
    sweep_groups, explicit = _resolve_groups(model, groups, resolved)

    t0 = time.perf_counter()
    sweep = _sweep(
        model, batches, mode=mode, metric=metric, groups=sweep_groups, positions=positions,
        batch_size=batch_size, engine=engine, bands=resolved, progress=progress,
    )
    t_sweep = time.perf_counter() - t0
    members, row_bands = _members_and_bands(model, sweep, sweep_groups, explicit, resolved)
    undefined = _undefined_rows(model, mode, members)
    undefined_names = [_row_name(sweep.iloc[k]) for k in undefined]
    if undefined:
        keep = [k for k in range(len(sweep)) if k not in set(undefined)]
        attrs = sweep.attrs
        sweep = sweep.iloc[keep].reset_index(drop=True)
        sweep.attrs = attrs
        members = [members[k] for k in keep]
        row_bands = [row_bands[k] for k in keep]
    if len(sweep) == 0:
        raise ValueError(f"no row left to report: every row's {mode!r} intervention is undefined")
    _check_finite(sweep)

    # ---- gradient estimates + routing statistics (one forward + backward per batch)
    t0 = time.perf_counter()
    acc = _RoutingAccumulator(model, resolved)
    grad_pp: Optional[np.ndarray] = None
    estimate_kind = mode if mode in ("zero", "mask") else None
    if gradient and estimate_kind is not None and _differentiable_metric(metric) is not None:
        res = _gradient_rows(model, batches, metric, members, positions, batch_size, acc, kinds=(estimate_kind,))
        grad_pp = res[estimate_kind]
    else:
        _accumulate_routing(model, batches, batch_size, acc)
    routing = acc.finish()
    t_grad = time.perf_counter() - t0

    # ---- statistics
    t0 = time.perf_counter()
    report = _assemble(
        model, sweep, members, row_bands, grad_pp, routing, explicit is not None,
        n_boot=n_boot, seed=seed, confidence=confidence, ci_method=ci_method,
        mass_threshold=mass_threshold, low_mass_threshold=low_mass_threshold,
        effect_threshold=effect_threshold, top_k=top_k, estimate_kind=estimate_kind,
    )
    t_stats = time.perf_counter() - t0
    report.settings.update(
        mode=mode,
        metric=_metric_name(metric),
        groups=groups if isinstance(groups, str) else list(groups),
        undefined_rows=undefined_names,
        n_prompts=n_prompts,
        n_tokens=int(sum(b.numel() for b in batches)),
        n_boot=n_boot,
        seed=seed,
        confidence=confidence,
        ci_method=ci_method,
        bands={k: list(v) for k, v in resolved.items()},
        positions=_positions_list(positions, int(batches[0].shape[1])),
        engine=engine,
    )
    report.timings = {
        "sweep_s": t_sweep,
        "gradient_and_routing_s": t_grad,
        "statistics_s": t_stats,
        "total_s": time.perf_counter() - t_start,
    }
    return report


def _assemble(
    model: "HookedAttnResTransformer",
    sweep: pd.DataFrame,
    members: list,
    row_bands: list,
    grad_pp: Optional[np.ndarray],
    routing: RoutingStatistics,
    named_groups: bool,
    *,
    n_boot: int,
    seed: int,
    confidence: float,
    ci_method: str,
    mass_threshold: float,
    low_mass_threshold: float,
    effect_threshold: float,
    top_k: int,
    estimate_kind: Optional[str],
) -> MassEffectReport:
    n_rows = len(sweep)
    mass_pp = np.vstack([np.asarray(v, dtype=float) for v in sweep["mass_per_prompt"]])
    eff_pp = np.vstack([np.asarray(v, dtype=float) for v in sweep["effect_per_prompt"]])
    n_sources = {s.name: s.n_sources for s in model.router_specs}
    eligible = np.array(
        [bool(m) and any(n_sources.get(r, 2) > 1 for r, _ in m) if m else True for m in members]
    )
    sublayers = (
        sweep["sublayer"].astype(object).to_numpy() if "sublayer" in sweep else np.full(n_rows, None)
    )
    kinds = [k for k in ("attn", "mlp") if np.any(eligible & (sublayers == k))]
    kind_rows = {k: np.flatnonzero(eligible & (sublayers == k)) for k in kinds}
    elig = np.flatnonzero(eligible)

    blocks = [mass_pp, eff_pp] + ([grad_pp] if grad_pp is not None else [])
    per_prompt = np.vstack(blocks)

    def extra(means: np.ndarray) -> np.ndarray:
        m = means[:n_rows][elig]
        e = np.abs(means[n_rows : 2 * n_rows][elig])
        out = [_spearman_columns(m, e), _kendall_columns(m, e)]
        for k in kinds:
            rows = kind_rows[k]
            mk = means[:n_rows][rows]
            ek = np.abs(means[n_rows : 2 * n_rows][rows])
            top = mk >= mk.max(0) - 1e-12  # rows tied for the largest mass
            out.append(top[ek.argmax(0), np.arange(mk.shape[1])].astype(float))
        return np.vstack(out)

    boot = _bootstrap(per_prompt, extra, n_boot=n_boot, confidence=confidence, seed=seed, method=ci_method)
    est, lo, hi = boot.estimate, boot.low, boot.high

    table = sweep.drop(columns=[c for c in ("mass_per_prompt", "effect_per_prompt") if c in sweep]).copy()
    table.attrs = {}  # the sweep's attrs hold arrays, which pandas cannot compare when combining
    table.insert(table.columns.get_loc("sublayer") + 1, "band", row_bands)
    names = list(sweep["label"]) if named_groups else [_row_name(r) for _, r in sweep.iterrows()]
    table.insert(0, "name", [str(n) for n in names])
    table["mass"] = est[:n_rows]
    table["mass_low"] = lo[:n_rows]
    table["mass_high"] = hi[:n_rows]
    table["effect"] = est[n_rows : 2 * n_rows]
    table["effect_low"] = lo[n_rows : 2 * n_rows]
    table["effect_high"] = hi[n_rows : 2 * n_rows]
    table["abs_effect"] = np.abs(table["effect"])
    excludes_zero = (table["effect_low"] > 0) | (table["effect_high"] < 0)
    table["effect_ci_excludes_zero"] = excludes_zero
    if grad_pp is not None:
        table["grad_estimate"] = est[2 * n_rows : 3 * n_rows]
        table["grad_low"] = lo[2 * n_rows : 3 * n_rows]
        table["grad_high"] = hi[2 * n_rows : 3 * n_rows]
    else:
        table["grad_estimate"] = np.nan
    if "source" in table and "router" in table and table["source"].notna().all():
        cd = routing.slices.set_index(["router", "source"])["content_dependence"]
        table["content_dependence"] = [
            cd.get((r, int(s)), np.nan) for r, s in zip(table["router"], table["source"])
        ]
    else:
        table["content_dependence"] = np.nan
    table["eligible"] = eligible
    negligible = table["abs_effect"] < effect_threshold
    no_role = eligible & (table["mass"] >= mass_threshold) & (~excludes_zero | negligible)
    causal = eligible & (table["mass"] < low_mass_threshold) & excludes_zero & ~negligible
    table["flag"] = np.where(no_role, FLAG_MASS_WITHOUT_CAUSAL_ROLE, np.where(causal, FLAG_CAUSAL_WITHOUT_MASS, ""))

    reasons = []
    for _, r in table.iterrows():
        ci = f"effect {r['effect']:+.4g} [{r['effect_low']:+.4g}, {r['effect_high']:+.4g}]"
        if r["flag"] == FLAG_MASS_WITHOUT_CAUSAL_ROLE:
            why = "CI includes 0" if not r["effect_ci_excludes_zero"] else f"|effect| < {effect_threshold}"
            reasons.append(f"mass {r['mass']:.3f} >= {mass_threshold}; {ci}: {why}")
        elif r["flag"] == FLAG_CAUSAL_WITHOUT_MASS:
            reasons.append(f"mass {r['mass']:.3f} < {low_mass_threshold}; {ci}, |effect| >= {effect_threshold}")
        else:
            reasons.append("")
    flags = table.loc[table["flag"] != "", [c for c in table if c in (
        "name", "router", "layer", "sublayer", "band", "source", "family", "label", "mass", "mass_low",
        "mass_high", "effect", "effect_low", "effect_high", "flag")]].copy()
    flags["reason"] = [reasons[i] for i in flags.index]
    flags = flags.reset_index(drop=True)

    # ---- extra statistics: rank correlations and largest-row agreement
    k_extra = n_rows * len(blocks)
    rank_correlation: dict = {"n": int(len(elig)), "between": "mass and |effect|"}
    m_pt = table["mass"].to_numpy()[elig]
    e_pt = table["abs_effect"].to_numpy()[elig]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = scipy.stats.spearmanr(m_pt, e_pt) if len(elig) > 1 else None
        kd = scipy.stats.kendalltau(m_pt, e_pt) if len(elig) > 1 else None
    for j, (name, res) in enumerate((("spearman", sp), ("kendall", kd))):
        rank_correlation[name] = {
            "estimate": float("nan") if res is None else float(res.statistic),
            "low": float(lo[k_extra + j]),
            "high": float(hi[k_extra + j]),
            "pvalue": float("nan") if res is None else float(res.pvalue),
        }
    largest: dict = {}
    for j, k in enumerate(kinds):
        rows = kind_rows[k]
        masses = table["mass"].to_numpy()[rows]
        tied = rows[masses >= masses.max() - 1e-12]
        ie = rows[int(np.argmax(table["abs_effect"].to_numpy()[rows]))]
        im = ie if ie in tied else tied[0]
        largest[k] = {
            "largest_mass": table["name"].iloc[im],
            "mass": float(table["mass"].iloc[im]),
            "largest_effect": table["name"].iloc[ie],
            "effect": float(table["effect"].iloc[ie]),
            "same": bool(im == ie),
            "n_tied_for_mass": int(len(tied)),
            "p_same": float(np.nanmean(boot.distribution[k_extra + 2 + j])),
        }

    agreement = None
    if grad_pp is not None:
        agreement = _gradient_agreement(table, eligible, effect_threshold, top_k, estimate_kind)

    settings = {
        "mass_threshold": mass_threshold,
        "low_mass_threshold": low_mass_threshold,
        "effect_threshold": effect_threshold,
        "metric_clean": float(np.mean(np.asarray(sweep["metric_clean"], dtype=float))),
        "gradient_estimate": estimate_kind if grad_pp is not None else None,
    }
    return MassEffectReport(
        table=table.reset_index(drop=True),
        flags=flags,
        largest=largest,
        rank_correlation=rank_correlation,
        gradient_agreement=agreement,
        routing=routing,
        sweep=sweep,
        settings=settings,
        timings={},
        source_table=model.source_table(),
    )


def _gradient_agreement(
    table: pd.DataFrame, eligible: np.ndarray, effect_threshold: float, top_k: int, kind: Optional[str]
) -> dict:
    rows = table[eligible & table["grad_estimate"].notna().to_numpy()]
    g = rows["grad_estimate"].to_numpy()
    e = rows["effect"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = float(scipy.stats.spearmanr(g, e).statistic) if len(rows) > 1 else float("nan")
        kd = float(scipy.stats.kendalltau(g, e).statistic) if len(rows) > 1 else float("nan")
        spa = float(scipy.stats.spearmanr(np.abs(g), np.abs(e)).statistic) if len(rows) > 1 else float("nan")
    sig = rows["effect_ci_excludes_zero"].to_numpy() & (np.abs(e) >= effect_threshold)
    sign_ok = np.sign(g) == np.sign(e)
    k = min(top_k, len(rows))
    top_exact = set(rows.index[np.argsort(-np.abs(e))[:k]])
    top_grad = set(rows.index[np.argsort(-np.abs(g))[:k]])
    err = np.abs(g - e)
    bad = (sig & ~sign_ok) | (err > np.maximum(effect_threshold, 0.5 * np.abs(e)))
    dis = rows.loc[bad, ["name", "mass", "effect", "effect_low", "effect_high", "grad_estimate"]].copy()
    dis["error"] = (dis["grad_estimate"] - dis["effect"]).to_numpy()
    dis["why"] = [
        "sign differs" if (s and not ok) else "off by more than half"
        for s, ok in zip(sig[bad], sign_ok[bad])
    ]
    dis = dis.reindex(dis["error"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    return {
        "estimate": kind,
        "n": int(len(rows)),
        "spearman": sp,
        "kendall": kd,
        "spearman_abs": spa,
        "sign_agreement": float(sign_ok[sig].mean()) if sig.any() else float("nan"),
        "n_significant": int(sig.sum()),
        "top_k": int(k),
        "top_k_overlap": int(len(top_exact & top_grad)),
        "max_abs_error": float(err.max()) if len(err) else float("nan"),
        "disagreements": dis,
    }


# =============================================================================== plots
def _new_figure(width: float, height: float) -> "Figure":
    # The object-oriented API: no pyplot state, works under any backend (PNG through Agg).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: "Figure", path: Optional[str]) -> "Figure":
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


def _router_label(layer: Any, sublayer: Any) -> str:
    if sublayer == "final" or _is_na(layer):
        return "final" if sublayer == "final" else str(sublayer)
    return f"L{int(layer)} {sublayer}"


def _source_columns(source_table: pd.DataFrame) -> list[str]:
    """Source labels in reading order: the embedding, completed sources by first appearance,
    then the in-progress ('current') ones."""
    labels = {"embedding": [], "history": [], "current": []}
    for fam, label in zip(source_table["family"], source_table["label"]):
        if label not in labels[fam]:
            labels[fam].append(label)
    seen: list[str] = []
    for fam in ("embedding", "history", "current"):
        seen += [lab for lab in labels[fam] if lab not in seen]
    return seen


def _grid(report: MassEffectReport) -> tuple[list[str], list[str], list[tuple[int, int]], str, str]:
    """Row labels, column labels and the (row, column) cell of every table row."""
    t = report.table
    st = report.source_table
    slice_level = "source" in t and t["source"].notna().all() and "router" in t
    if slice_level:
        routers = list(dict.fromkeys(st["router"]))
        first = st.drop_duplicates("router").set_index("router")
        row_labels = [_router_label(first.loc[r, "layer"], first.loc[r, "sublayer"]) for r in routers]
        cols = _source_columns(st)
        label_of = st.set_index(["router", "source"])["label"]
        cells = [
            (routers.index(r), cols.index(label_of[(r, int(s))])) for r, s in zip(t["router"], t["source"])
        ]
        return row_labels, cols, cells, "router (layer x sublayer)", "source"
    fams = [f for f in FAMILIES if f in set(t.get("family", []))]
    if "router" in t and t["router"].notna().all():
        routers = [r for r in dict.fromkeys(st["router"]) if r in set(t["router"])]
        first = st.drop_duplicates("router").set_index("router")
        row_labels = [_router_label(first.loc[r, "layer"], first.loc[r, "sublayer"]) for r in routers]
        cells = [(routers.index(r), fams.index(f)) for r, f in zip(t["router"], t["family"])]
        return row_labels, fams, cells, "router (layer x sublayer)", "source family"
    keys = []
    for _, r in t.iterrows():
        parts = [str(r[c]) for c in ("sublayer", "band") if c in t and not _is_na(r[c])]
        keys.append(" ".join(parts) if parts else "all")
    bands = list(report.settings.get("bands", {}) or {})
    order = {k: i for i, k in enumerate(_SUBLAYER_KINDS)}

    def sort_key(key: str) -> tuple:
        head, _, band = key.partition(" ")
        return (order.get(head, 9), bands.index(band) if band in bands else 9, key)

    row_labels = sorted(dict.fromkeys(keys), key=sort_key)
    if "family" in t and t["family"].notna().all():
        cells = [(row_labels.index(k), fams.index(f)) for k, f in zip(keys, t["family"])]
        return row_labels, fams, cells, "sublayer x depth band", "source family"
    names = list(t["name"])
    return row_labels, names, [(row_labels.index(k), i) for i, k in enumerate(keys)], "group", "group"


def _heatmap(
    report: MassEffectReport, value: str, *, path: Optional[str], annotate: Optional[bool], scale: str = "auto"
) -> "Figure":
    from matplotlib.patches import Patch, Rectangle

    rows, cols, cells, row_title, col_title = _grid(report)
    t = report.table
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in zip(cells, t[value].to_numpy(dtype=float)):
        grid[r, c] = v
    width = min(24.0, 2.8 + 0.42 * len(cols))
    height = min(30.0, 1.6 + 0.3 * len(rows))
    fig = _new_figure(max(width, 5.5), max(height, 3.2))
    ax = fig.add_subplot()
    ax.set_facecolor("#e6e6e6")
    masked = np.ma.masked_invalid(grid)
    if value == "mass":
        im = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=max(1e-12, float(np.nanmax(grid))), aspect="auto")
        title = "Routing mass (mean alpha over prompts)"
        bar = "mass"
    else:
        from matplotlib.colors import Normalize, SymLogNorm

        s = report.settings
        lim = float(np.nanmax(np.abs(grid))) or 1.0
        sizes = np.abs(grid[np.isfinite(grid)])
        typical = float(np.median(sizes[sizes > 0])) if (sizes > 0).any() else lim
        if scale == "auto":
            scale = "symlog" if lim > 30 * typical else "linear"
        if scale == "symlog":  # one huge cell would otherwise wash every other cell out
            linthresh = max(float(s.get("effect_threshold", 0.0)), lim * 1e-3)
            norm = SymLogNorm(linthresh=linthresh, vmin=-lim, vmax=lim, base=10)
        elif scale == "linear":
            norm = Normalize(vmin=-lim, vmax=lim)
        else:
            raise ValueError(f"scale must be 'auto', 'linear' or 'symlog', got {scale!r}")
        im = ax.imshow(masked, cmap="RdBu_r", norm=norm, aspect="auto")
        title = f"Effect of {s.get('mode', '?')}-ablation on {s.get('metric', '?')} (ablated - clean)"
        bar = f"effect ({s.get('metric', 'metric')}){', symlog' if scale == 'symlog' else ''}"
    fig.colorbar(im, ax=ax, label=bar, shrink=0.8)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(col_title)
    ax.set_ylabel(row_title)
    ax.set_title(title, fontsize=10)
    if annotate is None:
        annotate = grid.size <= 400
    if annotate:
        for (r, c), v in zip(cells, t[value].to_numpy(dtype=float)):
            if not math.isfinite(v):
                continue
            rgba = im.cmap(im.norm(v))
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            text = f"{v:.2f}" if value == "mass" else f"{v:+.2g}"
            ax.text(c, r, text, ha="center", va="center", fontsize=6.5, color="black" if lum > 0.5 else "white")
    handles = []
    if value == "effect":
        for (r, c), ok in zip(cells, t["effect_ci_excludes_zero"].to_numpy()):
            if not ok:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#888888", lw=0))
        handles.append(Patch(facecolor="white", edgecolor="#888888", hatch="///", label="CI includes 0"))
    styles = {
        FLAG_MASS_WITHOUT_CAUSAL_ROLE: dict(edgecolor="black", linestyle="-"),
        FLAG_CAUSAL_WITHOUT_MASS: dict(edgecolor="#d62728", linestyle="--"),
    }
    for (r, c), flag in zip(cells, t["flag"]):
        if flag in styles:
            ax.add_patch(Rectangle((c - 0.44, r - 0.44), 0.88, 0.88, fill=False, lw=2.0, **styles[flag]))
    for flag, st in styles.items():
        if (t["flag"] == flag).any():
            handles.append(Patch(facecolor="none", lw=2.0, label=flag, **st))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", fontsize=7, ncol=len(handles), frameon=False)
    return _save(fig, path)


def _scatter(
    report: MassEffectReport, *, path: Optional[str], annotate_flags: bool, max_labels: int = 8, yscale: str = "auto"
) -> "Figure":
    from matplotlib.lines import Line2D

    t = report.table
    s = report.settings
    fig = _new_figure(7.5, 5.2)
    ax = fig.add_subplot()
    fams = t["family"] if "family" in t else pd.Series(["history"] * len(t))
    subs = t["sublayer"] if "sublayer" in t else pd.Series(["attn"] * len(t))
    eligible = t["eligible"] if "eligible" in t else pd.Series([True] * len(t))
    for (fam, sub, ok), part in t.groupby([fams, subs, eligible], sort=False):
        xerr = np.vstack([part["mass"] - part["mass_low"], part["mass_high"] - part["mass"]]).clip(0)
        yerr = np.vstack([part["effect"] - part["effect_low"], part["effect_high"] - part["effect"]]).clip(0)
        colour = _FAMILY_COLOURS.get(fam, "#7f7f7f")
        ax.errorbar(
            part["mass"], part["effect"], xerr=xerr, yerr=yerr, fmt=_SUBLAYER_MARKERS.get(sub, "o"),
            color=colour, ecolor=colour, elinewidth=0.7, capsize=2, markersize=5, alpha=0.8,
            linestyle="none", markerfacecolor=colour if ok else "none",
        )
    ax.axhline(0.0, color="black", lw=0.8)
    thr = s["effect_threshold"]
    ax.axhspan(-thr, thr, color="#bbbbbb", alpha=0.35, lw=0)
    ax.axvline(s["mass_threshold"], color="black", lw=0.8, ls="--")
    ax.axvline(s["low_mass_threshold"], color="#d62728", lw=0.8, ls=":")
    if annotate_flags:
        span = float(np.nanmax(t["effect_high"]) - np.nanmin(t["effect_low"])) or 1.0
        stacked: dict[tuple[int, int], int] = {}
        flagged = t[t["flag"] != ""]
        # name the most telling flagged rows: the largest mass without a role, the largest
        # effect without mass
        no_role = flagged[flagged["flag"] == FLAG_MASS_WITHOUT_CAUSAL_ROLE].nlargest(max_labels, "mass")
        causal = flagged[flagged["flag"] == FLAG_CAUSAL_WITHOUT_MASS].nlargest(max_labels, "abs_effect")
        for _, r in pd.concat([causal, no_role]).head(max_labels).iterrows():
            spot = (round(r["mass"] * 25), round(r["effect"] / span * 25))  # labels that would overlap
            k = stacked.get(spot, 0)
            stacked[spot] = k + 1
            ax.annotate(
                r["name"], (r["mass"], r["effect"]), xytext=(6, 6 + 10 * k), textcoords="offset points", fontsize=7,
                color="black" if r["flag"] == FLAG_MASS_WITHOUT_CAUSAL_ROLE else "#d62728",
            )
    handles = [
        Line2D([], [], color=c, marker="o", ls="none", label=f) for f, c in _FAMILY_COLOURS.items() if f in set(fams)
    ] + [
        Line2D([], [], color="#555555", marker=m, ls="none", label=k) for k, m in _SUBLAYER_MARKERS.items() if k in set(subs)
    ] + (
        [Line2D([], [], color="#555555", marker="o", markerfacecolor="none", ls="none", label="single-source router")]
        if not eligible.all()
        else []
    ) + [
        Line2D([], [], color="black", ls="--", lw=0.8, label=f"appreciable mass >= {s['mass_threshold']}"),
        Line2D([], [], color="#d62728", ls=":", lw=0.8, label=f"little mass < {s['low_mass_threshold']}"),
        Line2D([], [], color="#bbbbbb", lw=6, alpha=0.6, label=f"|effect| < {thr}"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="best")
    lim = float(np.nanmax(np.abs(t["effect"]))) or 1.0
    sizes = np.abs(t["effect"].to_numpy(dtype=float))
    typical = float(np.median(sizes[sizes > 0])) if (sizes > 0).any() else lim
    if yscale == "auto":
        yscale = "symlog" if lim > 30 * typical else "linear"
    if yscale == "symlog":
        ax.set_yscale("symlog", linthresh=max(thr, lim * 1e-3))
        top = float(np.nanmax(t["effect_high"]))
        bottom = float(np.nanmin(t["effect_low"]))
        ax.set_ylim(min(bottom * 1.6, -thr * 1.5), max(top * 1.6, thr * 1.5))
    elif yscale != "linear":
        raise ValueError(f"yscale must be 'auto', 'linear' or 'symlog', got {yscale!r}")
    ax.set_xlabel("routing mass (mean alpha), bootstrap CI")
    ax.set_ylabel(f"effect on {s['metric']} ({s['mode']}-ablated - clean), bootstrap CI")
    ax.set_title(f"Mass vs effect ({s['n_prompts']} prompts, {s['confidence']:.0%} CIs)", fontsize=10)
    ax.set_xlim(-0.03, 1.03)
    return _save(fig, path)


def _gradient_scatter(report: MassEffectReport, *, path: Optional[str], scale: str = "auto") -> "Figure":
    t = report.table
    if not t["grad_estimate"].notna().any():
        raise ValueError("this report has no gradient estimates (gradient=False, or a mode/metric without one)")
    fig = _new_figure(6.0, 5.2)
    ax = fig.add_subplot()
    for fam, part in t.groupby(t["family"] if "family" in t else pd.Series(["history"] * len(t)), sort=False):
        yerr = np.vstack([part["effect"] - part["effect_low"], part["effect_high"] - part["effect"]]).clip(0)
        ax.errorbar(part["grad_estimate"], part["effect"], yerr=yerr, fmt="o", markersize=4, capsize=2,
                    color=_FAMILY_COLOURS.get(fam, "#7f7f7f"), label=fam, linestyle="none", alpha=0.85)
    lo = float(np.nanmin([t["grad_estimate"].min(), t["effect_low"].min()]))
    hi = float(np.nanmax([t["grad_estimate"].max(), t["effect_high"].max()]))
    line = np.linspace(lo, hi, 400)
    ax.plot(line, line, color="black", lw=0.8, ls="--", label="y = x")
    values = np.abs(np.concatenate([t["grad_estimate"].to_numpy(float), t["effect"].to_numpy(float)]))
    values = values[np.isfinite(values) & (values > 0)]
    lim = float(values.max()) if values.size else 1.0
    if scale == "auto":
        scale = "symlog" if values.size and lim > 30 * float(np.median(values)) else "linear"
    if scale == "symlog":
        linthresh = lim * 1e-3
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_yscale("symlog", linthresh=linthresh)
    elif scale != "linear":
        raise ValueError(f"scale must be 'auto', 'linear' or 'symlog', got {scale!r}")
    g = report.gradient_agreement or {}
    ax.set_title(
        f"Gradient ({g.get('estimate')}) vs exact: Spearman {g.get('spearman', float('nan')):+.2f}", fontsize=10
    )
    ax.set_xlabel("first-order (gradient) estimate")
    ax.set_ylabel("exact effect, bootstrap CI")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _token_label(text: str) -> str:
    """A token as a tick label: control characters escaped, blanks made visible."""
    if not text.strip() or not text.isprintable():
        return text.encode("unicode_escape").decode("ascii").replace(" ", "\u2423")
    return text


def plot_token_routing(
    model: "HookedAttnResTransformer",
    text_or_tokens: Any,
    router: Any = None,
    *,
    path: Optional[str] = None,
    max_tokens: int = 64,
) -> "Figure":
    """Routing weights of one prompt, token by token: for each chosen router, a sources x
    positions heatmap of alpha (labels from ``source_table()``, tokens on the x axis).

    ``router``: a router name (``"blocks.3.mlp_router"``, ``"final_router"``), a
    ``(layer, "attn"|"mlp")`` pair, ``"final"``, a list of those, ``"all"``, or ``None`` (the
    final router in kimi models, the last MLP router in cumulative ones). Only the first
    ``max_tokens`` positions are drawn."""
    if isinstance(text_or_tokens, str):
        tokens = model.to_tokens(text_or_tokens)
    elif isinstance(text_or_tokens, Tensor):
        tokens = model.validate_tokens(text_or_tokens)
    else:
        raise TypeError(f"text_or_tokens must be a string or a token tensor, got {type(text_or_tokens).__name__}")
    if tokens.shape[0] != 1:
        raise ValueError(f"plot_token_routing shows one prompt; got a batch of {tokens.shape[0]}")
    specs = {s.name: s for s in model.router_specs}
    names = _resolve_routers(model, router)
    hooks = [f"{n}.hook_weights" for n in names]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks, return_type=None)
    n_pos = min(int(tokens.shape[1]), max_tokens)
    strs = [_token_label(s) for s in model.to_str_tokens(tokens[0, :n_pos])]
    heights = [max(1.0, 0.28 * specs[n].n_sources + 0.9) for n in names]
    fig = _new_figure(min(22.0, 3.0 + 0.28 * n_pos), min(40.0, sum(heights) + 0.6))
    axes = fig.subplots(len(names), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, name in zip(axes, names):
        w = cache[f"{name}.hook_weights"][0, :n_pos].float().cpu().numpy().T  # [source, pos]
        im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        spec = specs[name]
        ax.set_yticks(range(spec.n_sources), [f"{s.label} \u00b7 {s.family}" for s in spec.sources], fontsize=7)
        ax.set_xticks(range(n_pos), strs, fontsize=7, rotation=90)
        ref = w[:, :1]
        spread = float(np.sqrt(((w - w.mean(1, keepdims=True)) ** 2).mean(1).sum())) if not np.all(w == ref) else 0.0
        ax.set_title(f"{_router_label(spec.layer, spec.sublayer)} ({name}): token std of alpha = {spread:.3f}",
                     fontsize=9, loc="left")
        fig.colorbar(im, ax=ax, label="alpha", pad=0.01, fraction=0.03)
    axes[-1].set_xlabel("token")
    return _save(fig, path)


def _resolve_routers(model: "HookedAttnResTransformer", router: Any) -> list[str]:
    specs = model.router_specs
    names = [s.name for s in specs]
    if router is None:
        return [names[-1]]
    if isinstance(router, str) and router == "all":
        return names
    items = router if isinstance(router, list) else [router]
    out = []
    for item in items:
        if isinstance(item, str) and item in names:
            out.append(item)
        elif item == "final" and model.final_router is not None:
            out.append("final_router")
        elif isinstance(item, tuple) and len(item) == 2 and f"blocks.{item[0]}.{item[1]}_router" in names:
            out.append(f"blocks.{item[0]}.{item[1]}_router")
        else:
            raise ValueError(f"unknown router {item!r}; routers are {names} (or (layer, 'attn'|'mlp'), 'final', 'all')")
    return out
