"""``write_html_report``: one self-contained HTML page for one or more mass-vs-effect reports.

For each model (a key of the dict ``run_protocol`` results hold): the report's summary, its
interactive figures (routing heatmap, effect heatmap, mass-vs-effect scatter, with hover on every
cell and point), the flagged rows, the table and the routing tables. plotly.js is embedded once,
so the page opens offline by double-click.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import pandas as pd

from .figures import figure_html, plot_effect_heatmap, plot_mass_effect_scatter, plot_routing_heatmap

TABLE_COLUMNS = (
    "name", "family", "band", "mass", "mass_low", "mass_high", "effect", "effect_low", "effect_high",
    "grad_estimate", "content_dependence", "eligible", "flag", "n_copies",
)
PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; padding: 0 1.5em; max-width: 1200px; color: #222; }
.table-scroll { overflow-x: auto; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.3em; }
table.dataframe { border-collapse: collapse; font-size: 12px; }
table.dataframe td, table.dataframe th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
details { margin: 0.6em 0; } pre { background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; }
nav a { margin-right: 1em; }
"""


def _table_html(df: pd.DataFrame, columns: Any = None) -> str:
    if columns is not None:
        df = df[[c for c in columns if c in df]]
    scalar = [c for c in df if not df[c].map(lambda v: hasattr(v, "__len__") and not isinstance(v, str)).any()]
    table = df[scalar].to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0, escape=True)
    return f'<div class="table-scroll">{table}</div>'


def _check(reports: Any) -> dict[str, Any]:
    if not isinstance(reports, Mapping) or not reports:
        raise TypeError(
            "reports must be a non-empty dict of model name -> MassEffectReport (e.g. "
            f"{{'trained': report}}), got {type(reports).__name__}"
        )
    for name, report in reports.items():
        if not isinstance(name, str):
            raise TypeError(f"report names must be strings, got {name!r}")
        missing = [a for a in ("table", "flags", "settings", "source_table", "routing") if not hasattr(report, a)]
        if missing:
            raise TypeError(f"reports[{name!r}] is a {type(report).__name__}, not a MassEffectReport (no {missing})")
    return dict(reports)


def report_section(name: str, report: Any, *, first: bool) -> str:
    """The HTML of one model's report; ``first`` embeds plotly.js."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in name)
    figures = []
    try:
        figures.append(plot_routing_heatmap(report, title=f"{name}: routing mass (mean over tokens)"))
    except ValueError:  # a grouped report without routing statistics: no routers x sources mass
        pass
    figures.append(plot_effect_heatmap(report))
    figures.append(plot_mass_effect_scatter(report))
    parts = [f'<h2 id="{slug}">{html.escape(name)}</h2>', f"<pre>{html.escape(report.summary())}</pre>"]
    for i, fig in enumerate(figures):
        parts.append(figure_html(fig, include_plotlyjs=first and i == 0, div_id=f"{slug}-figure-{i}"))
    if len(report.flags):
        parts += ["<h3>Flagged rows</h3>", _table_html(report.flags)]
    parts += ["<details open><summary><b>Mass vs effect table</b></summary>",
              _table_html(report.table, TABLE_COLUMNS), "</details>"]
    routing = report.routing
    if routing is not None:
        parts.append(f"<h3>Routing statistics ({routing.n_prompts} prompts, {routing.n_tokens} tokens)</h3>")
        for label, df in (("per family", routing.families), ("per family x sublayer x depth band", routing.family_bands),
                          ("per router", routing.routers), ("per slice", routing.slices)):
            parts += [f"<details><summary>{label}</summary>", _table_html(df), "</details>"]
    return "\n".join(parts)


def write_html_report(
    reports: Any,
    path: Union[str, Path],
    *,
    title: str = "attnres_lens: routing mass vs causal effect",
    intro: str = "",
) -> Path:
    """Write ``reports`` (model name -> :class:`~attnres_lens.attribution.MassEffectReport`) as
    one self-contained HTML page at ``path`` and return the path. ``intro`` is plain text shown
    under the title. Everything is checked before the file is written."""
    reports = _check(reports)
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the directory of {str(path)!r} does not exist")
    sections = [report_section(name, report, first=i == 0) for i, (name, report) in enumerate(reports.items())]
    nav = " ".join(f'<a href="#{"".join(c if c.isalnum() else "-" for c in n)}">{html.escape(n)}</a>' for n in reports)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        + (f"<p>{html.escape(intro)}</p>" if intro else "")
        + f"<nav>{nav}</nav>"
        + "".join(sections)
        + "</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
