"""The paper's protocol as one call: schedule check, content dependence, mass vs effect, report.

"When Does Routing Become Interpretable?" compares a vanilla model wrapped with a routing
schedule against an AttnRes model whose routing was trained, under identical interventions.
:func:`run_protocol` does that for any list of models on the same tokens and writes

- ``report.md``: a summary table, how to read it, and per model the schedule check, routing
  statistics and :class:`~attnres_lens.attribution.MassEffectReport` tables with figures;
- ``summary.json``: the same numbers, machine-readable (fields in :data:`SUMMARY_FIELDS` and
  :data:`MODEL_FIELDS`);
- ``figures/*.png``: per model and grouping, mass and effect heatmaps and the mass-vs-effect
  scatter, plus ``content_dependence.png`` comparing the models router by router;
- ``report.html``: ``report.md`` element for element, each figure followed by its interactive
  (plotly) version and each grouping by the whole table and the routing tables, self-contained
  (opens offline); written when plotly is installed (the ``viz`` extra).

``attnres-lens demo`` runs it on the bundled models, ``attnres-lens probe`` on any checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import distributed
from .records import RecordsRecoveredWarning
from .outputs import OutputLockedError, check_output_dir, output_lock, staged_output_dir
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
    "tokenizer",
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
GROUP_FIELDS = ("largest", "rank_correlation", "n_flags", "flags", "duplicates", "table", "timings", "figures")
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


@dataclass(frozen=True)
class ProtocolSettings:
    """How every subject is measured (the ``settings`` of ``summary.json``)."""

    mode: str = "zero"
    metric: str = "loss"
    groups: tuple[str, ...] = DEFAULT_GROUPS
    n_boot: int = 200
    seed: int = 0
    batch_size: Optional[int] = None
    bands: Any = None
    merge_duplicates: bool = True

    def mass_vs_effect_options(self) -> dict[str, Any]:
        return {"mode": self.mode, "metric": self.metric, "n_boot": self.n_boot, "seed": self.seed,
                "bands": self.bands, "batch_size": self.batch_size, "merge_duplicates": self.merge_duplicates}


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
    overwrite: bool = False,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    discard_checkpoints: bool = False,
    merge_duplicates: bool = True,
) -> ProtocolResult:
    """Measure every subject on ``tokens`` and write the report into ``out_dir``.

    For each model: its loss; ``verify_schedule`` when it was wrapped with a schedule (its
    routing is then a fixed function of the sources: the check must be ~1e-7); the routing
    statistics of :func:`attnres_lens.attribution.routing_statistics` (content dependence, the
    spread of the routing weights over tokens); and
    :func:`attnres_lens.attribution.mass_vs_effect` for each grouping in ``groups``, with
    ``mode``, ``metric``, ``n_boot``, ``seed``, ``bands`` and ``batch_size``; copies of one
    tensor at a router are one slice unless ``merge_duplicates=False`` (each group's
    ``duplicates`` entry says how many pairs there are and where).

    ``out_dir`` must not exist or be empty unless ``overwrite=True``, which replaces it. The run
    writes into a temporary directory beside it that takes its place only when everything
    succeeded, so a failed run leaves nothing behind and never mixes with an earlier run.

    With ``checkpoint_dir``, every finished sweep unit is recorded there (one store per model
    and grouping) and a rerun with the same models, tokens and arguments recomputes only what
    is missing. With ``discard_checkpoints=True`` they are removed once the report is written,
    or when the run fails in a way a rerun cannot mend (an interruption or a stalled rank keeps
    them to resume from), while the run still holds ``out_dir``'s lock: a next run on
    ``out_dir`` never sees them half-removed. Under ``torchrun`` the sweeps are shared across
    the ranks; rank 0 alone writes ``out_dir``, and only once every unit is present
    (``docs/scale.md``). One run at a time
    writes ``out_dir``: a second is refused (:class:`~attnres_lens.outputs.OutputLockedError`,
    naming the first one's pid).
    """
    settings = ProtocolSettings(
        mode=mode, metric=metric, groups=tuple(groups), n_boot=n_boot, seed=seed, batch_size=batch_size, bands=bands,
        merge_duplicates=merge_duplicates,
    )
    _check_subjects(subjects, settings)
    check_output_dir(out_dir, overwrite=overwrite)
    with _one_writer(out_dir):
        try:
            result = _run_protocol(subjects, tokens, out_dir, settings, progress=progress, command=command, data=data,
                                   title=title, intro=intro, overwrite=overwrite, checkpoint_dir=checkpoint_dir)
        except (KeyboardInterrupt, distributed.RankStalledError):
            raise  # a rerun resumes from the finished units
        except BaseException:
            if discard_checkpoints:
                _discard(checkpoint_dir)
            raise
        if discard_checkpoints:
            _discard(checkpoint_dir)
        return result


def _discard(checkpoint_dir: Optional[Union[str, Path]]) -> None:
    """Remove a run's unit records (rank 0, which holds the output lock)."""
    if checkpoint_dir is not None and distributed.is_writer():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


@contextlib.contextmanager
def _one_writer(out_dir: Union[str, Path]):
    """Hold ``out_dir``'s lock (rank 0) for the whole run; every rank refuses when it is taken."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if distributed.is_writer():
            try:
                stack.enter_context(output_lock(Path(out_dir).expanduser()))
            except OutputLockedError as err:
                refusal = str(err)
        refusals = [text for part in distributed.gather_lists([refusal]) for text in part if text]
        if refusals:
            raise OutputLockedError(refusals[0])
        yield


def _run_protocol(subjects: Sequence[Subject], tokens: Tensor, out_dir: Union[str, Path], settings: "ProtocolSettings",
                  *, progress: bool, command: str, data: Optional[dict], title: str, intro: str, overwrite: bool,
                  checkpoint_dir: Optional[Union[str, Path]]) -> ProtocolResult:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    writer = distributed.is_writer()
    progress = progress and writer
    n_steps = len(subjects) * (2 + len(settings.groups)) + 1
    summary = _new_summary(settings, tokens, command, data)
    reports: dict[str, dict[str, Any]] = {}
    with tqdm(total=n_steps, disable=not progress, desc="attnres-lens", unit="step", leave=False) as bar:

        def advance(text: str) -> None:
            bar.set_postfix_str(text, refresh=False)
            bar.update(1)

        for subject in subjects:
            bar.set_description(subject.name)
            checkpoints = None if checkpoint_dir is None else Path(checkpoint_dir) / subject.name
            entry, reports[subject.name] = _measure_subject(subject, tokens, settings, advance, checkpoints)
            summary["models"][subject.name] = jsonable(entry)
            summary["figures"] += [path for group in entry["groups"].values() for path in group["figures"].values()]
            for report in reports[subject.name].values():
                if summary["settings"]["bands"] is None:
                    summary["settings"]["bands"] = report.settings.get("bands")
        summary["figures"].append("figures/content_dependence.png")
        summary["comparison"] = _comparison(summary)
        advance("report")
    summary["wall_s"] = time.perf_counter() - t_start
    if writer:  # every unit is present by now: the report is complete, and lands whole or not at all
        with staged_output_dir(out_dir, overwrite=overwrite) as staging:
            _write_report(staging, summary, reports, title=title, intro=intro)
    distributed.barrier()
    return ProtocolResult(summary=summary, reports=reports, out_dir=Path(out_dir).expanduser())


def _write_report(out: Path, summary: dict, reports: dict, *, title: str, intro: str) -> None:
    """``figures/``, ``summary.json``, ``report.md`` and ``report.html`` into ``out``."""
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for name, model_reports in reports.items():
        for grouping, report in model_reports.items():
            _write_report_figures(report, fig_dir, f"{name}_{grouping}")
    _plot_content_dependence(summary, fig_dir / "content_dependence.png")
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1) + "\n")
    markdown = _report_markdown(summary, reports, title=title, intro=intro)
    (out / "report.md").write_text(markdown)
    _write_html_report(markdown, summary, reports, out / "report.html", title=title)


def _write_html_report(markdown: str, summary: dict, reports: dict, path: Path, *, title: str) -> None:
    """``report.html``: ``report.md`` element for element (:func:`attnres_lens.viz.write_markdown_html`),
    with each PNG followed by its interactive version and each grouping's section closed by the
    whole table and the routing tables. Needs plotly (the ``viz`` extra); without it the page is
    skipped with a warning naming the install command."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        warnings.warn("report.html not written: it needs plotly (pip install 'attnres_lens[viz]')", stacklevel=3)
        return
    from .viz import plot_effect_heatmap, plot_mass_effect_scatter, plot_routing_heatmap, write_markdown_html
    from .viz.html_report import report_extras

    figures, extras = {}, {}
    for name, groups in reports.items():
        for grouping, report in groups.items():
            paths = summary["models"][name]["groups"][grouping]["figures"]
            try:
                figures[paths["mass"]] = [plot_routing_heatmap(report, title=f"{name}: routing mass (mean over tokens)")]
            except ValueError:  # a grouped report without routing statistics: no routers x sources mass
                pass
            figures[paths["effect"]] = [plot_effect_heatmap(report)]
            figures[paths["scatter"]] = [plot_mass_effect_scatter(report)]
            extras[paths["scatter"]] = report_extras(report)
    write_markdown_html(markdown, path, base_dir=path.parent, title=title, figures=figures, extras=extras)


def _check_subjects(subjects: Sequence[Subject], settings: ProtocolSettings) -> None:
    if not subjects:
        raise ValueError("run_protocol needs at least one model")
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if not settings.groups:
        raise ValueError("give at least one grouping (e.g. 'slice')")


def _new_summary(settings: ProtocolSettings, tokens: Tensor, command: str, data: Optional[dict]) -> dict[str, Any]:
    """``summary.json`` before any model is measured (keys in :data:`SUMMARY_FIELDS`)."""
    from . import __version__

    return {
        "attnres_lens_version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**dataclasses.asdict(settings), "groups": list(settings.groups), "bands": None},
        "data": {"n_prompts": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "n_tokens": int(tokens.numel()), **(data or {})},
        "models": {},
        "comparison": {},
        "figures": [],
        "report": "report.md",
        "wall_s": None,
    }


def _measure_subject(
    subject: Subject,
    tokens: Tensor,
    settings: ProtocolSettings,
    advance: Callable[[str], None],
    checkpoint_dir: Optional[Path] = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One model's entry of ``summary.json`` (keys in :data:`MODEL_FIELDS`) and its
    :class:`MassEffectReport` per grouping (figures are named, not yet written)."""
    from .attribution import mass_vs_effect
    from .schedule import verify_schedule

    model = subject.model
    entry = _model_facts(subject)
    model_tokens = tokens.to(model.embed.weight.device)
    entry["loss"] = mean_loss(model, model_tokens, settings.batch_size)
    advance("loss")
    if model.schedule.is_scheduled:
        entry["verify_schedule_max_abs_dev"] = verify_schedule(model, model_tokens)
    advance("schedule check")
    reports: dict[str, Any] = {}
    entry["groups"] = {}
    for grouping in settings.groups:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "rough CIs" for few prompts: said in the report
            warnings.simplefilter("always", RecordsRecoveredWarning)  # torn records: the user must hear of them
            report = mass_vs_effect(
                model, model_tokens, groups=grouping, **settings.mass_vs_effect_options(),
                checkpoint_dir=None if checkpoint_dir is None else checkpoint_dir / grouping,
            )
        advance(f"mass vs effect ({grouping})")
        reports[grouping] = report
        figures = _report_figure_names(f"{subject.name}_{grouping}")
        entry["groups"][grouping] = _group_entry(report, figures)
    entry.update(_routing_entry(next(iter(reports.values())).routing))
    return entry, reports


def _model_facts(subject: Subject) -> dict[str, Any]:
    """What a model is, before anything is measured."""
    from .loading import tokenizer_name

    model = subject.model
    return {
        "name": subject.name,
        "description": subject.description,
        "source": subject.source,
        "flavour": model.cfg.flavour,
        "routing_mode": model.cfg.routing_mode,
        "n_blocks": model.cfg.n_blocks,
        "n_layers": model.cfg.n_layers,
        "n_params": sum(p.numel() for p in model.parameters()),
        "tokenizer": tokenizer_name(model.tokenizer),
        "schedule": model.schedule.to_dict(),
        "routing_learned": not model.schedule.is_scheduled,
        "verify_schedule_max_abs_dev": None,
        "extra": dict(subject.extra),
    }


_FIGURE_KINDS = ("mass", "effect", "scatter")


def _report_figure_names(stem: str) -> dict[str, str]:
    """kind -> the path, relative to the report, of one report's figures."""
    return {kind: f"figures/{stem}_{kind}.png" for kind in _FIGURE_KINDS}


def _write_report_figures(report: Any, fig_dir: Path, stem: str) -> None:
    """The mass and effect heatmaps and the scatter of one report."""
    plots = {"mass": report.plot_mass_heatmap, "effect": report.plot_effect_heatmap, "scatter": report.plot_scatter}
    for kind in _FIGURE_KINDS:
        plots[kind](str(fig_dir / f"{stem}_{kind}.png"))


def _group_entry(report: Any, figures: dict[str, str]) -> dict[str, Any]:
    """One grouping's entry (keys in :data:`GROUP_FIELDS`)."""
    report_dict = report.to_dict()
    n_flags = {"mass without causal role": 0, "causal without mass": 0}
    for row in report_dict.get("flags") or []:
        n_flags[row["flag"]] = n_flags.get(row["flag"], 0) + 1
    return {
        "largest": report_dict["largest"],
        "rank_correlation": report_dict["rank_correlation"],
        "n_flags": n_flags,
        "flags": report_dict["flags"],
        "duplicates": report_dict["settings"].get("duplicates"),
        "table": report_dict["table"],
        "timings": report_dict["timings"],
        "figures": figures,
    }


def _routing_entry(routing: Any) -> dict[str, Any]:
    """Content dependence and the spread of the routing weights (routers with > 1 source)."""
    eligible = routing.slices.merge(routing.routers[["router", "n_sources"]], on="router").query("n_sources > 1")
    columns = ["router", "layer", "sublayer", "n_sources", "content_dependence", "entropy", "max_entropy"]
    return {
        "content_dependence": float(routing.content_dependence),
        "routing_weight_std": {
            "mean": float(eligible["mass_std"].mean()) if len(eligible) else 0.0,
            "max": float(eligible["mass_std"].max()) if len(eligible) else 0.0,
        },
        "routers": jsonable(routing.routers[columns]),
        "routing_families": jsonable(routing.family_bands),
    }


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


_HOW_TO_READ = [
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
_GROUP_HEADINGS = {
    "slice": "per depth-source slice",
    "family_band": "per family x sublayer x depth band",
    "family": "per family",
}


def _report_markdown(summary: dict, reports: dict, *, title: str, intro: str) -> str:
    """``report.md``: header, summary table, how to read it, one section per model, files."""
    lines = _report_header(summary, title, intro) + _HOW_TO_READ
    for name, entry in summary["models"].items():
        lines += _model_section(entry, reports[name])
    lines += _files_section()
    return "\n".join(lines)


def _report_header(summary: dict, title: str, intro: str) -> list[str]:
    settings, data = summary["settings"], summary["data"]
    lines = [
        f"# {title}",
        "",
        f"Written by `{summary['command']}` (attnres_lens {summary['attnres_lens_version']}, "
        f"{summary['created']}).",
        "",
    ]
    if intro:
        lines += [intro, ""]
    return lines + [
        f"Data: {data['n_prompts']} prompts x {data['seq_len']} tokens"
        + (f" from {data['source']}" if data.get("source") else "")
        + ". "
        f"Intervention: `{settings['mode']}` each depth-source slice (or group), metric "
        f"`{settings['metric']}`; effect = metric(ablated) - metric(clean). Bootstrap over prompts: "
        f"{settings['n_boot']} resamples, seed {settings['seed']}, 95% CIs. Depth bands: {settings['bands']}.",
        "",
        "## Summary",
        "",
        _markdown_summary(summary),
        "",
        "![content dependence per router](figures/content_dependence.png)",
        "",
    ]


def _model_section(entry: dict, reports: dict) -> list[str]:
    lines = [f"## {entry['name']}: {entry['description'] or entry['source']}", ""]
    lines += [
        f"- source: `{entry['source']}`",
        f"- flavour `{entry['flavour']}`, routing mode `{entry['routing_mode']}`, "
        f"{entry['n_blocks']} blocks, {entry['n_layers']} layers, {entry['n_params']:,} parameters",
        f"- tokenizer: {entry['tokenizer']}",
        f"- loss on these tokens: {entry['loss']:.4f} nats/token",
        f"- routing: {_schedule_text(entry)}",
        f"- content dependence (max over routers): {entry['content_dependence']:.4f}",
    ]
    for key, value in entry.get("extra", {}).items():
        lines.append(f"- {key.replace('_', ' ')}: {value if not isinstance(value, float) else f'{value:.4f}'}")
    lines.append("")
    for grouping, report in reports.items():
        figures = entry["groups"][grouping]["figures"]
        lines += [
            f"### Mass vs effect, {_GROUP_HEADINGS.get(grouping, grouping)}",
            "",
            f"![mass]({figures['mass']}) ![effect]({figures['effect']})",
            "",
            f"![mass vs effect]({figures['scatter']})",
            "",
            report.to_markdown(),
            "",
        ]
    return lines


def _files_section() -> list[str]:
    return [
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
        "- `report.html`: this report, each figure followed by its interactive version (hover any cell), "
        "and the whole tables; self-contained.",
        "",
    ]


def print_summary(result: ProtocolResult, out: Callable[[str], None] = print) -> None:
    out(result.table())
