"""Figures: mass and effect heatmaps, the mass-vs-effect scatter, gradient vs exact, and the
routing of one prompt token by token. matplotlib is imported inside the functions (object API,
no pyplot state), so importing this module costs nothing."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..names import SUBLAYERS
from ..router import FAMILIES
from .tables import is_missing, router_label
from .thresholds import FLAG_CAUSAL_WITHOUT_MASS, FLAG_MASS_WITHOUT_CAUSAL_ROLE

if TYPE_CHECKING:  # annotations only
    from matplotlib.figure import Figure

    from ..model import HookedAttnResTransformer
    from .report import MassEffectReport

FAMILY_COLOURS = {"embedding": "#1f77b4", "current": "#ff7f0e", "history": "#2ca02c"}
SUBLAYER_MARKERS = {"attn": "o", "mlp": "s", "final": "^"}


def new_figure(width: float, height: float) -> "Figure":
    # The object-oriented API: no pyplot state, works under any backend (PNG through Agg).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def axis_scale(values: Any, scale: str, argument: str = "scale") -> tuple[str, float]:
    """The scale to draw ``values`` on and their largest magnitude (1.0 when all are 0).

    ``scale``: ``"linear"``, ``"symlog"`` or ``"auto"``: symlog when the largest ``|value|`` is
    over 30 times the median non-zero one, so that one catastrophic slice does not wash the
    others out."""
    if scale not in ("auto", "linear", "symlog"):
        raise ValueError(f"{argument} must be 'auto', 'linear' or 'symlog', got {scale!r}")
    sizes = np.abs(np.asarray(values, dtype=float)).ravel()
    sizes = sizes[np.isfinite(sizes) & (sizes > 0)]
    largest = float(sizes.max()) if sizes.size else 1.0
    if scale == "auto":
        scale = "symlog" if sizes.size and largest > 30 * float(np.median(sizes)) else "linear"
    return scale, largest


def save_figure(fig: "Figure", path: Optional[str]) -> "Figure":
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig



def source_columns(source_table: pd.DataFrame) -> list[str]:
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


def cell_layout(report: MassEffectReport) -> tuple[list[str], list[str], list[tuple[int, int]], str, str]:
    """Row labels, column labels and the (row, column) cell of every table row."""
    t = report.table
    st = report.source_table
    slice_level = "source" in t and t["source"].notna().all() and "router" in t
    if slice_level:
        routers = list(dict.fromkeys(st["router"]))
        first = st.drop_duplicates("router").set_index("router")
        row_labels = [router_label(first.loc[r, "layer"], first.loc[r, "sublayer"]) for r in routers]
        cols = source_columns(st)
        label_of = st.set_index(["router", "source"])["label"]
        cells = [
            (routers.index(r), cols.index(label_of[(r, int(s))])) for r, s in zip(t["router"], t["source"])
        ]
        return row_labels, cols, cells, "router (layer x sublayer)", "source"
    fams = [f for f in FAMILIES if f in set(t.get("family", []))]
    if "router" in t and t["router"].notna().all():
        routers = [r for r in dict.fromkeys(st["router"]) if r in set(t["router"])]
        first = st.drop_duplicates("router").set_index("router")
        row_labels = [router_label(first.loc[r, "layer"], first.loc[r, "sublayer"]) for r in routers]
        cells = [(routers.index(r), fams.index(f)) for r, f in zip(t["router"], t["family"])]
        return row_labels, fams, cells, "router (layer x sublayer)", "source family"
    keys = []
    for _, r in t.iterrows():
        parts = [str(r[c]) for c in ("sublayer", "band") if c in t and not is_missing(r[c])]
        keys.append(" ".join(parts) if parts else "all")
    bands = list(report.settings.get("bands", {}) or {})
    order = {k: i for i, k in enumerate(SUBLAYERS)}

    def sort_key(key: str) -> tuple:
        head, _, band = key.partition(" ")
        return (order.get(head, 9), bands.index(band) if band in bands else 9, key)

    row_labels = sorted(dict.fromkeys(keys), key=sort_key)
    if "family" in t and t["family"].notna().all():
        cells = [(row_labels.index(k), fams.index(f)) for k, f in zip(keys, t["family"])]
        return row_labels, fams, cells, "sublayer x depth band", "source family"
    names = list(t["name"])
    return row_labels, names, [(row_labels.index(k), i) for i, k in enumerate(keys)], "group", "group"


def heatmap(
    report: MassEffectReport, value: str, *, path: Optional[str], annotate: Optional[bool], scale: str = "auto"
) -> "Figure":
    from matplotlib.patches import Patch, Rectangle

    rows, cols, cells, row_title, col_title = cell_layout(report)
    t = report.table
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in zip(cells, t[value].to_numpy(dtype=float)):
        grid[r, c] = v
    width = min(24.0, 2.8 + 0.42 * len(cols))
    height = min(30.0, 1.6 + 0.3 * len(rows))
    fig = new_figure(max(width, 5.5), max(height, 3.2))
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
        scale, lim = axis_scale(grid, scale)
        if scale == "symlog":
            linthresh = max(float(s.get("effect_threshold", 0.0)), lim * 1e-3)
            norm = SymLogNorm(linthresh=linthresh, vmin=-lim, vmax=lim, base=10)
        else:
            norm = Normalize(vmin=-lim, vmax=lim)
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
    return save_figure(fig, path)


def scatter(
    report: MassEffectReport, *, path: Optional[str], annotate_flags: bool, max_labels: int = 8, yscale: str = "auto"
) -> "Figure":
    from matplotlib.lines import Line2D

    t = report.table
    s = report.settings
    fig = new_figure(7.5, 5.2)
    ax = fig.add_subplot()
    fams = t["family"] if "family" in t else pd.Series(["history"] * len(t))
    subs = t["sublayer"] if "sublayer" in t else pd.Series(["attn"] * len(t))
    eligible = t["eligible"] if "eligible" in t else pd.Series([True] * len(t))
    for (fam, sub, ok), part in t.groupby([fams, subs, eligible], sort=False):
        xerr = np.vstack([part["mass"] - part["mass_low"], part["mass_high"] - part["mass"]]).clip(0)
        yerr = np.vstack([part["effect"] - part["effect_low"], part["effect_high"] - part["effect"]]).clip(0)
        colour = FAMILY_COLOURS.get(fam, "#7f7f7f")
        ax.errorbar(
            part["mass"], part["effect"], xerr=xerr, yerr=yerr, fmt=SUBLAYER_MARKERS.get(sub, "o"),
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
        Line2D([], [], color=c, marker="o", ls="none", label=f) for f, c in FAMILY_COLOURS.items() if f in set(fams)
    ] + [
        Line2D([], [], color="#555555", marker=m, ls="none", label=k) for k, m in SUBLAYER_MARKERS.items() if k in set(subs)
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
    yscale, lim = axis_scale(t["effect"].to_numpy(dtype=float), yscale, "yscale")
    if yscale == "symlog":
        ax.set_yscale("symlog", linthresh=max(thr, lim * 1e-3))
        top = float(np.nanmax(t["effect_high"]))
        bottom = float(np.nanmin(t["effect_low"]))
        ax.set_ylim(min(bottom * 1.6, -thr * 1.5), max(top * 1.6, thr * 1.5))
    ax.set_xlabel("routing mass (mean alpha), bootstrap CI")
    ax.set_ylabel(f"effect on {s['metric']} ({s['mode']}-ablated - clean), bootstrap CI")
    ax.set_title(f"Mass vs effect ({s['n_prompts']} prompts, {s['confidence']:.0%} CIs)", fontsize=10)
    ax.set_xlim(-0.03, 1.03)
    return save_figure(fig, path)


def gradient_scatter(report: MassEffectReport, *, path: Optional[str], scale: str = "auto") -> "Figure":
    t = report.table
    if not t["grad_estimate"].notna().any():
        raise ValueError("this report has no gradient estimates (gradient=False, or a mode/metric without one)")
    fig = new_figure(6.0, 5.2)
    ax = fig.add_subplot()
    for fam, part in t.groupby(t["family"] if "family" in t else pd.Series(["history"] * len(t)), sort=False):
        yerr = np.vstack([part["effect"] - part["effect_low"], part["effect_high"] - part["effect"]]).clip(0)
        ax.errorbar(part["grad_estimate"], part["effect"], yerr=yerr, fmt="o", markersize=4, capsize=2,
                    color=FAMILY_COLOURS.get(fam, "#7f7f7f"), label=fam, linestyle="none", alpha=0.85)
    lo = float(np.nanmin([t["grad_estimate"].min(), t["effect_low"].min()]))
    hi = float(np.nanmax([t["grad_estimate"].max(), t["effect_high"].max()]))
    line = np.linspace(lo, hi, 400)
    ax.plot(line, line, color="black", lw=0.8, ls="--", label="y = x")
    values = np.concatenate([t["grad_estimate"].to_numpy(float), t["effect"].to_numpy(float)])
    scale, lim = axis_scale(values, scale)
    if scale == "symlog":
        ax.set_xscale("symlog", linthresh=lim * 1e-3)
        ax.set_yscale("symlog", linthresh=lim * 1e-3)
    g = report.gradient_agreement or {}
    ax.set_title(
        f"Gradient ({g.get('estimate')}) vs exact: Spearman {g.get('spearman', float('nan')):+.2f}", fontsize=10
    )
    ax.set_xlabel("first-order (gradient) estimate")
    ax.set_ylabel("exact effect, bootstrap CI")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def token_label(text: str) -> str:
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
    names = routers_to_plot(model, router)
    hooks = [f"{n}.hook_weights" for n in names]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks, return_type=None)
    n_pos = min(int(tokens.shape[1]), max_tokens)
    strs = [token_label(s) for s in model.to_str_tokens(tokens[0, :n_pos])]
    heights = [max(1.0, 0.28 * specs[n].n_sources + 0.9) for n in names]
    fig = new_figure(min(22.0, 3.0 + 0.28 * n_pos), min(40.0, sum(heights) + 0.6))
    axes = fig.subplots(len(names), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, name in zip(axes, names):
        w = cache[f"{name}.hook_weights"][0, :n_pos].float().cpu().numpy().T  # [source, pos]
        im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        spec = specs[name]
        ax.set_yticks(range(spec.n_sources), [f"{s.label} \u00b7 {s.family}" for s in spec.sources], fontsize=7)
        ax.set_xticks(range(n_pos), strs, fontsize=7, rotation=90)
        ref = w[:, :1]
        spread = float(np.sqrt(((w - w.mean(1, keepdims=True)) ** 2).mean(1).sum())) if not np.all(w == ref) else 0.0
        ax.set_title(f"{router_label(spec.layer, spec.sublayer)} ({name}): token std of alpha = {spread:.3f}",
                     fontsize=9, loc="left")
        fig.colorbar(im, ax=ax, label="alpha", pad=0.01, fraction=0.03)
    axes[-1].set_xlabel("token")
    return save_figure(fig, path)


def routers_to_plot(model: "HookedAttnResTransformer", router: Any) -> list[str]:
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


__all__ = ["gradient_scatter", "heatmap", "new_figure", "plot_token_routing", "save_figure", "scatter"]
