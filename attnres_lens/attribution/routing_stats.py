"""Descriptive routing statistics over a dataset: mass, its spread, content dependence."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .. import distributed
from ..names import SUBLAYERS
from ..router import FAMILIES, RouterSpec
from ..selection import BandsLike, band_of, resolve_bands
from .data import as_batches, capture_weights_hooks, split_batch
from .tables import markdown_table

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


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


class RoutingAccumulator:
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
            stats = self.moments[spec.name].finish()  # columns: the sources, then the families
            keys = {"router": spec.name, "layer": spec.layer, "sublayer": spec.sublayer, "band": band_of(spec, self.bands)}
            for source in spec.sources:
                slice_rows.append({**keys, "source": source.index, "family": source.family, "label": source.label,
                                   **_stat_columns(stats, source.index)})
                prompt_mass[(spec.name, source.index)] = stats["prompt_mass"][source.index]
            for j, (family, members) in enumerate(self.family_index[spec.name]):
                family_rows.append({**keys, "family": family, "n_sources": len(members),
                                    **_stat_columns(stats, spec.n_sources + j)})
            router_rows.append({**keys, **self._router_columns(spec, stats)})
        families = _with_int_layer(pd.DataFrame(family_rows))
        return RoutingStatistics(
            slices=_with_int_layer(pd.DataFrame(slice_rows)),
            routers=_with_int_layer(pd.DataFrame(router_rows)),
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

    def _router_columns(self, spec: RouterSpec, stats: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """A router's pooled content dependence and its mean routing entropy."""
        n_sources = spec.n_sources
        variance, mass = stats["var"][:n_sources], stats["mass"][:n_sources]
        bound = float((mass * (1 - mass)).sum())
        total_variance = float(np.clip(variance, 0, None).sum())
        dependence = 0.0 if total_variance <= 0.0 or bound <= 0.0 else min(1.0, math.sqrt(total_variance / bound))
        return {
            "n_sources": n_sources,
            "content_dependence": dependence,
            "entropy": self.entropy_sum[spec.name] / max(self.n_tokens, 1),
            "max_entropy": math.log(n_sources),
        }


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
            return col.map({k: i for i, k in enumerate(SUBLAYERS)})
        return col.map({b: i for i, b in enumerate(order or [])}).fillna(len(order or []))

    return out.sort_values(sort_cols, key=keyfn, kind="stable").reset_index(drop=True)


@dataclass
class RoutingStatistics:
    """Descriptive routing statistics over a dataset (:func:`routing_statistics`).

    - ``slices``: one row per router and source: ``mass`` (mean over tokens), ``mass_std``
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
            markdown_table(self.families, floatfmt),
            "",
            "#### Per family x sublayer x depth band",
            markdown_table(self.family_bands, floatfmt),
        ]
        return "\n".join(parts)


def routing_statistics(
    model: "HookedAttnResTransformer",
    tokens_or_batches: Any,
    *,
    bands: BandsLike = None,
    batch_size: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
) -> RoutingStatistics:
    """Routing mass, its spread, and content dependence over a dataset (see
    :class:`RoutingStatistics`). ``bands`` maps band names to layers (default: early/late
    halves). One forward per batch.

    A padded ``[batch, pos]`` tensor takes its ``attention_mask`` (1 = real token; a list of
    strings derives it): its prompts are unpadded and run by length, so every statistic is
    over the real tokens only, exactly the prompts run one by one."""
    acc = RoutingAccumulator(model, resolve_bands(bands, model.cfg.n_layers))
    accumulate_routing(model, as_batches(model, tokens_or_batches, attention_mask), batch_size, acc)
    return acc.finish()


def accumulate_routing(
    model: "HookedAttnResTransformer", batches: list[Tensor], batch_size: Optional[int], acc: "RoutingAccumulator"
) -> None:
    """One no-grad forward per chunk, feeding every router's weights to ``acc`` in order (under
    a process group the chunks are shared across the ranks and the weights gathered)."""
    chunks = [chunk for batch in batches for chunk in split_batch(batch, batch_size)]
    for weights in distributed.ordered_map(lambda chunk: _routing_weights(model, chunk), chunks):
        acc.update(weights)


def _routing_weights(model: "HookedAttnResTransformer", chunk: Tensor) -> dict[str, Tensor]:
    """Every router's weights on ``chunk`` (on the CPU, to travel between ranks)."""
    store: dict[str, Tensor] = {}
    with torch.no_grad():
        model.run_with_hooks(chunk, return_type=None, fwd_hooks=capture_weights_hooks(model, store))
    return {name: weights.detach().cpu() for name, weights in store.items()}



__all__ = ["RoutingAccumulator", "RoutingStatistics", "accumulate_routing", "routing_statistics"]
