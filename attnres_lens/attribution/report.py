"""What :func:`~attnres_lens.attribution.mass_vs_effect` returns: :class:`MassEffectReport`,
its thresholds and flags."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from ..effects import Effects
from ..serialize import jsonable
from . import plots
from .routing_stats import RoutingStatistics
from .thresholds import FLAG_CAUSAL_WITHOUT_MASS, FLAG_COMPENSATED_BY_DUPLICATE, FLAG_MASS_WITHOUT_CAUSAL_ROLE
from .tables import markdown_table

if TYPE_CHECKING:  # annotations only
    from matplotlib.figure import Figure



def duplicates_line(duplicates: dict) -> str:
    """One line on the duplicate pairs (copies of one tensor at a router): merged or not, where."""
    where = "; ".join(duplicates["where"][:8]) + (" ..." if len(duplicates["where"]) > 8 else "")
    if duplicates["merged"]:
        return (f"duplicates: {duplicates['n_pairs']} pairs of copies of one tensor, each merged into one "
                f"slice (mass summed, every copy intervened on): {where}")
    return (f"duplicates: {duplicates['n_pairs']} pairs of copies of one tensor reported per copy "
            f"(merge_duplicates=False); {duplicates.get('n_compensated', 0)} copies flagged "
            f"'{FLAG_COMPENSATED_BY_DUPLICATE}': {where}")


#: What report.md says about the ``estimate`` column (engines "estimate" and "screen").
ESTIMATE_NOTE = (
    "The `estimate` column is the fast estimate of each row's effect (`estimate_effects`, method "
    "`readout`: the intervened router and sublayer and the final readout recomputed exactly, the "
    "paths through later sublayers to first order; see docs/attribution.md, \"Fast estimates and "
    "the screen\"). It ranks rows well but usually underestimates large effects, so a gap between "
    "`estimate` and `effect` on a measured row is expected, not a bug. Rows marked \"no (estimate)\" "
    "were not measured: their `effect` *is* the estimate."
)


def screen_line(screen: dict) -> str:
    """One line on the screen: what was measured exactly and what it may have missed."""
    if screen["engine"] == "estimate" or not screen.get("k"):
        return f"engine 'estimate': no row measured exactly; every effect is the estimate ({screen['n_rows']} rows)"
    misses = ", ".join(screen["misses"][:4]) or "none"
    return (
        f"screen: {screen['k']} rows of largest estimated |effect| and {screen['n_control']} random control "
        f"rows measured exactly ({screen['n_exact']} of {screen['n_rows']}); control rows the estimate "
        f"missed: {screen['n_misses']} ({misses}); 95% bound on such rows among the "
        f"{screen['n_unmeasured']} unmeasured: {screen['missed_bound']:.1f}"
    )


@dataclass
class MassEffectReport:
    """What :func:`mass_vs_effect` found. All effects are ``metric(ablated) - metric(clean)``.

    - ``table``: one row per slice or group: its keys (``router, layer, sublayer, source,
      family, label`` as in the sweep, plus ``band``), ``name``, ``mass`` with its bootstrap CI
      ``mass_low``/``mass_high``, ``effect`` with ``effect_low``/``effect_high``, ``abs_effect``,
      ``effect_ci_excludes_zero``, ``content_dependence`` (slices), the gradient estimate of
      the same intervention ``grad_estimate`` (with its CI) when available, ``structural``
      (the row's mass is fixed by construction: a single-source router's, a copy merged with
      the router's only other source, ...; ``structural_reason`` says which) and ``eligible``
      (its negation: structural rows are kept in the table but left out of the flags, the
      largest-mass comparison and the correlations) and ``flag``.
    - ``flags``: the flagged rows (``flag`` is :data:`FLAG_MASS_WITHOUT_CAUSAL_ROLE`,
      :data:`FLAG_CAUSAL_WITHOUT_MASS`, or in per-copy reports
      :data:`FLAG_COMPENSATED_BY_DUPLICATE`) with a human ``reason``. Slice rows that merge
      copies of one tensor have ``n_copies`` 2 and a label such as ``"after block 0 = stream"``;
      ``settings["duplicates"]`` counts the pairs and says where they are.
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
    - ``effects``: the :class:`~attnres_lens.effects.Effects` of the table's rows (per-prompt
      mass and effect, ``effects.table()``, ``effects.per_prompt()``); ``grouping``: their
      grouping kind, which the plots read.
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
    #: the defined rows' per-prompt mass and effect, row for row with ``table``
    effects: Optional[Effects] = field(repr=False, default=None)

    @property
    def grouping(self) -> Optional[str]:
        """The grouping kind of the rows (``"slice"``, ``"family"``, ``"family_band"``, ``"named"``)."""
        return None if self.effects is None else self.effects.grouping

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
        n_structural = int(self.table["structural"].sum()) if "structural" in self.table else 0
        if n_structural:
            lines.append(f"structural rows (mass fixed by construction, left out of the comparisons): {n_structural}")
        counts = self.flags["flag"].value_counts().to_dict() if len(self.flags) else {}
        flag_text = (
            f"flags: {counts.get(FLAG_MASS_WITHOUT_CAUSAL_ROLE, 0)} '{FLAG_MASS_WITHOUT_CAUSAL_ROLE}', "
            f"{counts.get(FLAG_CAUSAL_WITHOUT_MASS, 0)} '{FLAG_CAUSAL_WITHOUT_MASS}'"
        )
        if counts.get(FLAG_COMPENSATED_BY_DUPLICATE):
            flag_text += f", {counts[FLAG_COMPENSATED_BY_DUPLICATE]} '{FLAG_COMPENSATED_BY_DUPLICATE}'"
        lines.append(flag_text)
        screen = self.settings.get("screen")
        if screen is not None:
            lines.append(screen_line(screen))
        duplicates = self.settings.get("duplicates")
        if duplicates and duplicates["n_pairs"]:
            lines.append(duplicates_line(duplicates))
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
        screen = self.settings.get("screen")
        if screen is not None and "estimate" in t:
            view["estimate"] = [f"{e:+{floatfmt}}" for e in t["estimate"]]
            view["exact?"] = ["yes" if x else "no (estimate)" for x in t["exact"]]
        structural = t["structural"] if "structural" in t else pd.Series(False, index=t.index)
        view["flag"] = np.where(structural, "structural", t["flag"])
        if max_rows is not None:
            view = view.head(max_rows)
        parts = ["```", self.summary(), "```", ""]
        if screen is not None:
            parts += [ESTIMATE_NOTE, ""]
        parts.append(markdown_table(view))
        if structural.any():
            parts += ["", "**Structural rows**: their mass is fixed by construction, not a routing decision, so "
                      "they are left out of the correlations, the largest-mass comparison and the flags", ""]
            parts += [f"- {r['name']}: mass {r['mass']:{floatfmt}}, effect {r['effect']:+{floatfmt}}: {r['structural_reason']}"
                      for _, r in t[structural].iterrows()]
        if len(self.flags):
            parts += ["", "**Flags**", ""]
            parts += [f"- {r['name']}: **{r['flag']}** ({r['reason']})" for _, r in self.flags.iterrows()]
        if self.gradient_agreement and len(self.gradient_agreement["disagreements"]):
            d = self.gradient_agreement["disagreements"]
            parts += ["", "**Where the gradient estimate and the exact effect disagree**", ""]
            parts.append(markdown_table(d, floatfmt))
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
    def plot_mass_heatmap(
        self, path: Optional[str] = None, annotate: Optional[bool] = None, *, backend: str = "matplotlib"
    ) -> Any:
        """Mean routing mass, routers (layer x sublayer) down, sources across (labelled from
        ``source_table()``); flagged cells outlined.

        ``backend``: ``"matplotlib"`` (a figure that displays inline as a PNG; ``path`` any format
        matplotlib writes) or ``"plotly"`` (:func:`attnres_lens.viz.plot_routing_heatmap`: hover a
        cell for its router, source, family, mass and effect with CIs, flag and merged copies;
        ``path`` an ``.html`` page; ``annotate`` is for matplotlib)."""
        if plots.check_backend(backend) == "plotly":
            plots.check_plotly_path(path)
            from ..viz import plot_routing_heatmap

            return plots.save_plotly(plot_routing_heatmap(self), path)
        return plots.heatmap(self, "mass", path=path, annotate=annotate)

    def plot_effect_heatmap(
        self, path: Optional[str] = None, annotate: Optional[bool] = None, scale: str = "auto",
        *, backend: str = "matplotlib",
    ) -> Any:
        """The exact effect of the intervention, same layout as :meth:`plot_mass_heatmap`
        (diverging colours centred on 0; cells whose CI includes 0 are hatched). ``scale``:
        ``"linear"``, ``"symlog"`` or ``"auto"`` (symlog when the largest effect is over 30 times
        the median one, so that one catastrophic slice does not wash the others out).
        ``backend``: as for :meth:`plot_mass_heatmap` (plotly:
        :func:`attnres_lens.viz.plot_effect_heatmap`)."""
        if plots.check_backend(backend) == "plotly":
            plots.check_plotly_path(path)
            from ..viz import plot_effect_heatmap

            return plots.save_plotly(plot_effect_heatmap(self), path)
        return plots.heatmap(self, "effect", path=path, annotate=annotate, scale=scale)

    def plot_scatter(
        self, path: Optional[str] = None, annotate_flags: bool = True, max_labels: int = 8, yscale: str = "auto",
        *, backend: str = "matplotlib",
    ) -> Any:
        """Mass against effect with bootstrap CIs on both, coloured by family, one marker per
        sublayer kind (hollow: single-source routers); the thresholds drawn; up to
        ``max_labels`` flagged rows named. ``yscale``: ``"linear"``, ``"symlog"`` or ``"auto"``
        (as for :meth:`plot_effect_heatmap`). ``backend``: as for :meth:`plot_mass_heatmap`
        (plotly: :func:`attnres_lens.viz.plot_mass_effect_scatter`)."""
        if plots.check_backend(backend) == "plotly":
            plots.check_plotly_path(path)
            from ..viz import plot_mass_effect_scatter

            return plots.save_plotly(plot_mass_effect_scatter(self), path)
        return plots.scatter(self, path=path, annotate_flags=annotate_flags, max_labels=max_labels, yscale=yscale)

    def plot_gradient_vs_exact(self, path: Optional[str] = None, scale: str = "auto") -> "Figure":
        """The gradient estimate against the exact effect (with CIs), identity line drawn;
        ``scale`` as for :meth:`plot_effect_heatmap` (on both axes)."""
        return plots.gradient_scatter(self, path=path, scale=scale)



__all__ = ["MassEffectReport"]
