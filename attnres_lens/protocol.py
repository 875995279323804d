"""The paper's protocol as one call: schedule check, content dependence, mass vs effect, report.

"When Does Routing Become Interpretable?" compares a vanilla model wrapped with a routing
schedule against an AttnRes model whose routing was trained, under identical interventions.
:func:`run_protocol` does that for any list of models on the same tokens and writes

- ``report.md``: a summary table, how to read it, and per model the schedule check, routing
  statistics and :class:`~attnres_lens.attribution.MassEffectReport` tables with figures;
- ``summary.json``: the same numbers, machine-readable (fields in :data:`SUMMARY_FIELDS` and
  :data:`MODEL_FIELDS`);
- ``figures/*.png``: per model and grouping, mass and effect heatmaps and the mass-vs-effect
  scatter, plus ``content_dependence.png`` comparing the models router by router.

``attnres-lens demo`` runs it on the bundled models, ``attnres-lens probe`` on any checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .serialize import jsonable

#: Top-level keys of ``summary.json``.
SUMMARY_FIELDS = (
    "attnres_lens_version",
    "command",
    "created",
    "settings",
    "data",
    "models",
    "comparison",
    "figures",
    "report",
    "wall_s",
)
#: Keys of each entry of ``summary.json["models"]``.
MODEL_FIELDS = (
    "name",
    "description",
    "source",
    "flavour",
    "routing_mode",
    "n_blocks",
    "n_layers",
    "n_params",
    "schedule",
    "routing_learned",
    "verify_schedule_max_abs_dev",
    "loss",
    "content_dependence",
    "routing_weight_std",
    "routers",
    "routing_families",
    "groups",
    "extra",
)
#: Keys of each entry of ``summary.json["models"][name]["groups"]``.
GROUP_FIELDS = ("largest", "rank_correlation", "n_flags", "flags", "table", "timings", "figures")
DEFAULT_GROUPS = ("slice", "family_band")


@dataclass
class Subject:
    """One model of the comparison. ``name`` is a short key (``"wrapped"``, ``"trained"``)
    used in file names and tables; ``extra`` lands in ``summary.json`` as is."""

    name: str
    model: Any
    description: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class ProtocolResult:
    summary: dict
    reports: dict
    out_dir: Path

    def table(self) -> str:
        """The short plain-text summary table printed by the CLI."""
        return summary_table(self.summary)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _largest_text(group: dict) -> str:
    parts = []
    for kind in ("attn", "mlp"):
        info = group["largest"].get(kind)
        if info:
            parts.append(f"{kind} {'yes' if info['same'] else 'no'}")
    return ", ".join(parts) or "-"


def _rank_text(group: dict) -> str:
    rc = group["rank_correlation"].get("spearman")
    if not isinstance(rc, dict) or rc.get("estimate") is None or math.isnan(rc["estimate"]):
        return "-"
    return f"{rc['estimate']:+.2f} [{rc['low']:+.2f}, {rc['high']:+.2f}]"


def _schedule_text(entry: dict) -> str:
    schedule = entry["schedule"]
    if not entry["routing_learned"]:
        kind = schedule["kind"] + (f" b={schedule['bias']:g}" if schedule.get("bias") is not None else "")
        return f"{kind}: max |dev| {entry['verify_schedule_max_abs_dev']:.1e}"
    return "learned (no schedule)"


_GROUP_TITLES = {"slice": "slice", "family_band": "family x band", "family": "family"}


def summary_rows(summary: dict) -> list[tuple[str, list[str]]]:
    """The summary table as (row title, one cell per model)."""
    models = list(summary["models"].values())
    rows: list[tuple[str, list[str]]] = [
        ("loss (nats/token)", [_fmt(m["loss"]) for m in models]),
        ("routing", [_schedule_text(m) for m in models]),
        ("content dependence (max router)", [_fmt(m["content_dependence"], ".3f") for m in models]),
        (
            "routing weight std over tokens (mean/max)",
            [f"{_fmt(m['routing_weight_std']['mean'], '.3f')} / {_fmt(m['routing_weight_std']['max'], '.3f')}" for m in models],
        ),
    ]
    groups = list(dict.fromkeys(g for m in models for g in m["groups"]))
    for g in groups:
        label = _GROUP_TITLES.get(g, g)

        def cells(fn: Callable[[dict], str]) -> list[str]:
            return [fn(m["groups"][g]) if g in m["groups"] else "-" for m in models]

        rows.append((f"{label}: top mass is top effect?", cells(_largest_text)))
        rows.append((f"{label}: Spearman(mass, |effect|)", cells(_rank_text)))
        rows.append(
            (
                f"{label}: flags mass-only / effect-only",
                cells(lambda grp: f"{grp['n_flags']['mass without causal role']} / {grp['n_flags']['causal without mass']}"),
            )
        )
    return rows


def summary_table(summary: dict) -> str:
    names = list(summary["models"])
    rows = summary_rows(summary)
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    lines = [f"{'':<{w0}}  " + "  ".join(f"{n:<{w}}" for n, w in zip(names, widths))]
    lines.append("-" * len(lines[0]))
    for title, cells in rows:
        lines.append(f"{title:<{w0}}  " + "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def _markdown_summary(summary: dict) -> str:
    names = list(summary["models"])
    out = ["| | " + " | ".join(f"**{n}**" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for title, cells in summary_rows(summary):
        out.append(f"| {title.replace('|', chr(92) + '|')} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


@torch.no_grad()
def mean_loss(model: Any, tokens: Tensor, batch_size: Optional[int] = None) -> float:
    """Mean next-token loss over all predicted tokens of ``tokens`` ``[batch, pos]``."""
    total, count = 0.0, 0
    step = batch_size or tokens.shape[0]
    for chunk in tokens.split(step):
        per_token = model(chunk, return_type="loss", loss_per_token=True)
        total += float(per_token.double().sum())
        count += per_token.numel()
    return total / count


def _plot_content_dependence(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(summary["models"])
    routers = list(dict.fromkeys(r["router"] for m in summary["models"].values() for r in m["routers"]))
    fig = Figure(figsize=(max(6.0, 0.55 * len(routers) * max(1, len(names)) / 2 + 2.5), 3.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    top = 0.0
    for i, name in enumerate(names):
        values = {r["router"]: r["content_dependence"] for r in summary["models"][name]["routers"]}
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(routers))]
        ys = [values.get(r, float("nan")) for r in routers]
        bars = ax.bar(xs, ys, width=width, label=f"{name} (max {max(v for v in ys if v == v):.3f})")
        ax.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in ys], fontsize=6, padding=1)
        top = max([top] + [v for v in ys if v == v])
    labels = [r.replace("blocks.", "L").replace(".attn_router", " attn").replace(".mlp_router", " mlp").replace("_router", "") for r in routers]
    ax.set_xticks(range(len(routers)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("content dependence")
    ax.set_ylim(0, max(0.05, min(1.0, top * 1.25)))
    ax.set_title("Routing content dependence per router\n(0 = the same weights at every token: a schedule)", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=130)


def run_protocol(
    subjects: Sequence[Subject],
    tokens: Tensor,
    out_dir: Union[str, Path] = "attnres-report",
    *,
    mode: str = "zero",
    metric: str = "loss",
    groups: Sequence[str] = DEFAULT_GROUPS,
    batch_size: Optional[int] = None,
    n_boot: int = 200,
    seed: int = 0,
    bands: Any = None,
    progress: bool = True,
    command: str = "run_protocol",
    data: Optional[dict] = None,
    title: str = "Block AttnRes routing: mass vs causal effect",
    intro: str = "",
) -> ProtocolResult:
    """Measure every subject on ``tokens`` and write the report into ``out_dir``.

    For each model: its loss; ``verify_schedule`` when it was wrapped with a schedule (its
    routing is then a fixed function of the sources: the check must be ~1e-7); the routing
    statistics of :func:`attnres_lens.attribution.routing_statistics` (content dependence, the
    spread of the routing weights over tokens); and
    :func:`attnres_lens.attribution.mass_vs_effect` for each grouping in ``groups``, with
    ``mode``, ``metric``, ``n_boot``, ``seed``, ``bands`` and ``batch_size``.
    """
    from tqdm.auto import tqdm

    from . import __version__
    from .attribution import mass_vs_effect
    from .schedule import verify_schedule

    if not subjects:
        raise ValueError("run_protocol needs at least one model")
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    groups = list(groups)
    if not groups:
        raise ValueError("give at least one grouping (e.g. 'slice')")
    t_start = time.perf_counter()
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    n_steps = len(subjects) * (2 + 2 * len(groups)) + 1
    bar = tqdm(total=n_steps, disable=not progress, desc="attnres-lens", unit="step", leave=False)

    def advance(text: str) -> None:
        bar.set_postfix_str(text, refresh=False)
        bar.update(1)

    summary: dict[str, Any] = {
        "attnres_lens_version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "mode": mode,
            "metric": metric,
            "groups": groups,
            "n_boot": n_boot,
            "seed": seed,
            "batch_size": batch_size,
            "bands": None,
        },
        "data": {"n_prompts": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "n_tokens": int(tokens.numel()), **(data or {})},
        "models": {},
        "comparison": {},
        "figures": [],
        "report": "report.md",
        "wall_s": None,
    }
    reports: dict[str, dict[str, Any]] = {}
    for subject in subjects:
        model = subject.model
        bar.set_description(subject.name)
        entry: dict[str, Any] = {
            "name": subject.name,
            "description": subject.description,
            "source": subject.source,
            "flavour": model.cfg.flavour,
            "routing_mode": model.cfg.routing_mode,
            "n_blocks": model.cfg.n_blocks,
            "n_layers": model.cfg.n_layers,
            "n_params": sum(p.numel() for p in model.parameters()),
            "schedule": model.schedule.to_dict(),
            "routing_learned": not model.schedule.is_scheduled,
            "verify_schedule_max_abs_dev": None,
            "extra": dict(subject.extra),
        }
        model_tokens = tokens.to(model.embed.weight.device)
        entry["loss"] = mean_loss(model, model_tokens, batch_size)
        advance("loss")
        if model.schedule.is_scheduled:
            entry["verify_schedule_max_abs_dev"] = verify_schedule(model, model_tokens)
        advance("schedule check")
        reports[subject.name] = {}
        entry["groups"] = {}
        for g in groups:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "rough CIs" for few prompts: said in the report
                report = mass_vs_effect(
                    model, model_tokens, groups=g, mode=mode, metric=metric, n_boot=n_boot, seed=seed,
                    bands=bands, batch_size=batch_size,
                )
            advance(f"mass vs effect ({g})")
            reports[subject.name][g] = report
            figures = {}
            for kind, plot in (
                ("mass", report.plot_mass_heatmap),
                ("effect", report.plot_effect_heatmap),
                ("scatter", report.plot_scatter),
            ):
                path = fig_dir / f"{subject.name}_{g}_{kind}.png"
                plot(str(path))
                figures[kind] = f"figures/{path.name}"
                summary["figures"].append(figures[kind])
            advance(f"figures ({g})")
            d = report.to_dict()
            n_flags = {"mass without causal role": 0, "causal without mass": 0}
            for row in d.get("flags") or []:
                n_flags[row["flag"]] = n_flags.get(row["flag"], 0) + 1
            entry["groups"][g] = {
                "largest": d["largest"],
                "rank_correlation": d["rank_correlation"],
                "n_flags": n_flags,
                "flags": d["flags"],
                "table": d["table"],
                "timings": d["timings"],
                "figures": figures,
            }
            if summary["settings"]["bands"] is None:
                summary["settings"]["bands"] = report.settings.get("bands")
        routing = next(iter(reports[subject.name].values())).routing
        eligible = routing.slices.merge(
            routing.routers[["router", "n_sources"]], on="router"
        ).query("n_sources > 1")
        entry["content_dependence"] = float(routing.content_dependence)
        entry["routing_weight_std"] = {
            "mean": float(eligible["mass_std"].mean()) if len(eligible) else 0.0,
            "max": float(eligible["mass_std"].max()) if len(eligible) else 0.0,
        }
        entry["routers"] = jsonable(
            routing.routers[["router", "layer", "sublayer", "n_sources", "content_dependence", "entropy", "max_entropy"]]
        )
        entry["routing_families"] = jsonable(routing.family_bands)
        summary["models"][subject.name] = jsonable(entry)

    _plot_content_dependence(summary, fig_dir / "content_dependence.png")
    summary["figures"].append("figures/content_dependence.png")
    summary["comparison"] = _comparison(summary)
    advance("report")
    bar.close()
    summary["wall_s"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1) + "\n")
    (out / "report.md").write_text(_report_markdown(summary, reports, title=title, intro=intro))
    return ProtocolResult(summary=summary, reports=reports, out_dir=out)


def _comparison(summary: dict) -> dict:
    models = summary["models"]
    learned = [n for n, m in models.items() if m["routing_learned"]]
    scheduled = [n for n, m in models.items() if not m["routing_learned"]]
    cd = {n: m["content_dependence"] for n, m in models.items()}
    return {
        "content_dependence": cd,
        "learned_routing": learned,
        "scheduled_routing": scheduled,
        "max_schedule_deviation": max(
            (m["verify_schedule_max_abs_dev"] for m in models.values() if m["verify_schedule_max_abs_dev"] is not None),
            default=None,
        ),
        "structured_routing_only_when_trained": bool(
            learned and scheduled
            and min(cd[n] for n in learned) > 0.05
            and max(cd[n] for n in scheduled) < 1e-3
        ),
    }


def _report_markdown(summary: dict, reports: dict, *, title: str, intro: str) -> str:
    s = summary["settings"]
    d = summary["data"]
    lines = [
        f"# {title}",
        "",
        f"Written by `{summary['command']}` (attnres_lens {summary['attnres_lens_version']}, "
        f"{summary['created']}).",
        "",
    ]
    if intro:
        lines += [intro, ""]
    lines += [
        f"Data: {d['n_prompts']} prompts x {d['seq_len']} tokens"
        + (f" from {d['source']}" if d.get("source") else "")
        + ". "
        f"Intervention: `{s['mode']}` each depth-source slice (or group), metric `{s['metric']}`; "
        f"effect = metric(ablated) - metric(clean). Bootstrap over prompts: {s['n_boot']} resamples, "
        f"seed {s['seed']}, 95% CIs. Depth bands: {s['bands']}.",
        "",
        "## Summary",
        "",
        _markdown_summary(summary),
        "",
        "![content dependence per router](figures/content_dependence.png)",
        "",
        "## How to read this",
        "",
        "- **Routing schedule**: a wrapped vanilla model routes by a fixed schedule (zero "
        "queries; the recency bias b puts e^b / (e^b + n - 1) on the current stream). "
        "`verify_schedule` is the largest deviation of the routing weights seen at the hooks from "
        "that analytic prediction: ~1e-7 means the schedule is exactly what runs.",
        "- **Content dependence** (per router, in [0, 1]): how much the routing weights vary "
        "across tokens and prompts, normalised by the most they could vary at the same mean. "
        "Exactly 0 for a schedule; the table shows the largest router's value. The routing "
        "weight std is the standard deviation of a slice's weight over tokens (mean and max over "
        "slices of routers with more than one source).",
        "- **Mass vs effect**: *mass* is the mean routing weight of a slice; *effect* is the "
        "change of the metric when the slice is ablated. Mass describes where a router reads; "
        "only the effect is causal. A slice is flagged *mass without causal role* when it has "
        "appreciable mass but its effect's CI includes 0 or is below the practical threshold, "
        "and *causal without mass* in the opposite case (thresholds in each section).",
        "- **Largest mass = largest effect?**: per sublayer kind, whether the slice (group) with "
        "the most mass is also the one whose ablation matters most.",
        "",
    ]
    for name, entry in summary["models"].items():
        lines += [f"## {name}: {entry['description'] or entry['source']}", ""]
        lines += [
            f"- source: `{entry['source']}`",
            f"- flavour `{entry['flavour']}`, routing mode `{entry['routing_mode']}`, "
            f"{entry['n_blocks']} blocks, {entry['n_layers']} layers, {entry['n_params']:,} parameters",
            f"- loss on these tokens: {entry['loss']:.4f} nats/token",
            f"- routing: {_schedule_text(entry)}",
            f"- content dependence (max over routers): {entry['content_dependence']:.4f}",
        ]
        for key, value in entry.get("extra", {}).items():
            lines.append(f"- {key.replace('_', ' ')}: {value if not isinstance(value, float) else f'{value:.4f}'}")
        lines.append("")
        for g, report in reports[name].items():
            figs = entry["groups"][g]["figures"]
            heading = {"slice": "per depth-source slice", "family_band": "per family x sublayer x depth band", "family": "per family"}.get(g, g)
            lines += [
                f"### Mass vs effect, {heading}",
                "",
                f"![mass]({figs['mass']}) ![effect]({figs['effect']})",
                "",
                f"![mass vs effect]({figs['scatter']})",
                "",
                report.to_markdown(),
                "",
            ]
    lines += [
        "## Files",
        "",
        "- `summary.json`: every number above. Top-level keys: "
        + ", ".join(f"`{k}`" for k in SUMMARY_FIELDS)
        + "; per model (`models.<name>`): "
        + ", ".join(f"`{k}`" for k in MODEL_FIELDS)
        + "; per grouping (`models.<name>.groups.<grouping>`): "
        + ", ".join(f"`{k}`" for k in GROUP_FIELDS)
        + ".",
        "- `figures/`: the PNGs embedded above.",
        "",
    ]
    return "\n".join(lines)


def print_summary(result: ProtocolResult, out: Callable[[str], None] = print) -> None:
    out(result.table())
