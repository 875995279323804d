"""Self-contained HTML pages of mass-vs-effect reports (plotly.js embedded once: they open
offline by double-click).

- :func:`write_html_report`: for each report (name -> :class:`MassEffectReport`), its summary,
  interactive figures (routing heatmap, effect heatmap, mass-vs-effect scatter, with hover on
  every cell and point), the flagged rows, the table and the routing tables.
- :func:`write_markdown_html`: a markdown report (``report.md`` of ``run_protocol``) as HTML,
  element for element (every heading, table, list, fact and figure, the PNGs embedded), with
  interactive figures and extra tables placed after the PNGs they go with. ``report.html`` is
  written this way, so it is ``report.md`` and more, never less.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd

from .figures import figure_html, plot_effect_heatmap, plot_mass_effect_scatter, plot_routing_heatmap

TABLE_COLUMNS = (
    "name", "family", "band", "mass", "mass_low", "mass_high", "effect", "effect_low", "effect_high",
    "grad_estimate", "content_dependence", "structural", "structural_reason", "flag", "n_copies",
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


# ============================================================================ markdown -> HTML
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def slug(text: str) -> str:
    """The id of a heading: its words, lower case, joined by ``-``."""
    return re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-") or "section"


def inline_html(text: str) -> str:
    """One line of markdown's inline syntax as HTML: ``code``, **bold**, *italic*, ``\\|``."""
    pieces = re.split(r"(`[^`]*`)", text)
    out = []
    for piece in pieces:
        if len(piece) >= 2 and piece.startswith("`") and piece.endswith("`"):
            out.append(f"<code>{html.escape(piece[1:-1])}</code>")
            continue
        piece = html.escape(piece.replace("\\|", "|"))
        piece = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", piece)
        piece = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", piece)
        out.append(piece)
    return "".join(out)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def _table(rows: Sequence[str]) -> str:
    head, body = _cells(rows[0]), [_cells(r) for r in rows[2:]]
    parts = ['<div class="table-scroll"><table class="dataframe report-table"><thead><tr>']
    parts += [f"<th>{inline_html(c)}</th>" for c in head]
    parts.append("</tr></thead><tbody>")
    for row in body:
        parts.append("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def markdown_html(
    markdown: str,
    base_dir: Union[str, Path],
    *,
    after_image: Optional[Mapping[str, str]] = None,
    after_section: Optional[Mapping[str, str]] = None,
) -> str:
    """The HTML body of ``markdown``: headings (with ids), paragraphs, lists, fenced blocks, pipe
    tables and images (read from ``base_dir`` and embedded). ``after_image[path]`` is HTML placed
    after the line holding that image; ``after_section[path]`` at the end of the section (up to
    the next heading) holding it."""
    base_dir, after_image, after_section = Path(base_dir), after_image or {}, after_section or {}
    out: list[str] = []
    pending: list[str] = []  # after_section HTML owed at the next heading
    ids: dict[int, str] = {}  # the id of the latest heading of each level (h3 ids extend their h2's)
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append(f"<pre>{html.escape(chr(10).join(lines[i + 1:end]))}</pre>")
            i = end + 1
            continue
        heading = re.match(r"(#{1,6}) (.*)", line)
        if heading:
            out += pending
            pending = []
            level, text = len(heading.group(1)), heading.group(2)
            ids[level] = slug(text) if level <= 2 else f"{ids.get(level - 1, 'section')}--{slug(text)}"
            out.append(f'<h{level} id="{ids[level]}">{inline_html(text)}</h{level}>')
        elif line.startswith("|"):
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
            out.append(_table(lines[i:end]))
            i = end
            continue
        elif line.startswith("- "):
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("- ")), len(lines))
            out.append("<ul>" + "".join(f"<li>{inline_html(item[2:])}</li>" for item in lines[i:end]) + "</ul>")
            i = end
            continue
        elif _IMAGE.search(line) and not _IMAGE.sub("", line).strip():  # a line of images only
            images = _IMAGE.findall(line)
            out.append('<div class="figures">' + "".join(
                f'<figure><img src="{_png(base_dir / path)}" alt="{html.escape(alt)}" data-path="{html.escape(path)}">'
                f"<figcaption>{html.escape(alt)}</figcaption></figure>"
                for alt, path in images
            ) + "</div>")
            out += [after_image[path] for _, path in images if path in after_image]
            pending += [after_section[path] for _, path in images if path in after_section]
        elif line.strip():
            out.append(f"<p>{inline_html(line)}</p>")
        i += 1
    return "\n".join(out + pending)


def write_markdown_html(
    markdown: str,
    path: Union[str, Path],
    *,
    base_dir: Union[str, Path],
    title: str,
    figures: Optional[Mapping[str, Sequence[Any]]] = None,
    extras: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write ``markdown`` as one self-contained page at ``path`` (see :func:`markdown_html`):
    ``figures[image path]`` are the plotly figures shown after that PNG (its interactive
    versions), ``extras[image path]`` HTML closing that image's section."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the directory of {str(path)!r} does not exist")
    first = True
    after_image = {}
    for key, figs in (figures or {}).items():
        blocks = []
        for n, fig in enumerate(figs):
            div = f"interactive-{slug(key)}-{n}"
            blocks.append(f'<div class="interactive">{figure_html(fig, include_plotlyjs=first, div_id=div)}</div>')
            first = False
        after_image[key] = "".join(blocks)
    body = markdown_html(markdown, base_dir, after_image=after_image, after_section=extras)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}{MARKDOWN_STYLE}</style></head><body>"
        + body
        + "</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


MARKDOWN_STYLE = """
.figures { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; }
figure img { max-width: 100%; } figcaption { font-size: 12px; color: #555; }
.interactive { margin: 0.5em 0 1em; } code { background: #f2f2f2; padding: 0 3px; }
"""


def report_extras(report: Any) -> str:
    """What the HTML page adds to a report's markdown: the whole table and the routing tables."""
    parts = ["<details><summary><b>The whole table</b> (every column)</summary>",
             _table_html(report.table, TABLE_COLUMNS), "</details>"]
    routing = report.routing
    if routing is not None:
        parts.append(f"<details><summary><b>Routing statistics</b> ({routing.n_prompts} prompts, {routing.n_tokens} tokens)</summary>")
        for label, df in (("per family", routing.families), ("per family x sublayer x depth band", routing.family_bands),
                          ("per router", routing.routers), ("per slice", routing.slices)):
            parts += [f"<h4>{label}</h4>", _table_html(df)]
        parts.append("</details>")
    return "\n".join(parts)
