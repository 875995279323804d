"""The HTML report and an explorer snapshot, opened in a real headless Chromium (selenium).

Skipped, with the reason, where selenium, Chromium or chromedriver is missing (Debian:
``apt-get install chromium chromium-driver``). Each page must draw its plotly figures (the plot
elements are in the DOM), log no JavaScript error to the console, show the numbers on hover, and
render a screenshot that is not blank.
"""

from __future__ import annotations

import re
import shutil
import warnings

import numpy as np
import pytest
import torch

from attnres_lens import mass_vs_effect
from attnres_lens.viz import explore, write_html_report

from reference import tiny_attnres

pytest.importorskip("plotly")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> tuple[str, str]:
    binary = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", binary), ("chromedriver", driver)) if p is None)
        pytest.skip(f"no headless browser: {missing} not on PATH (Debian: apt-get install chromium chromium-driver)")
    return binary, driver


@pytest.fixture(scope="module")
def driver():
    binary, driver_path = _browser()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1400", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    browser.set_page_load_timeout(120)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def model():
    return tiny_attnres("cumulative", "block", n_layers=3, n_blocks=3, seed=1)


def _open(driver, path, n_plots: int) -> list[dict]:
    """Load ``path``, wait until its ``n_plots`` plotly figures are drawn, return the console."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(path.as_uri())
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.querySelectorAll('.js-plotly-plot .main-svg').length")
        >= 2 * n_plots  # plotly draws a main svg and a hover svg per figure
    )
    return driver.get_log("browser")


def _errors(log: list[dict]) -> list[dict]:
    return [entry for entry in log if entry.get("level") == "SEVERE"]


def _not_blank(driver, path) -> None:
    from PIL import Image

    driver.save_screenshot(str(path))
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    assert pixels.std() > 20.0, f"the screenshot {path} is nearly uniform (std {pixels.std():.1f})"
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 100, f"the screenshot {path} has only {colours} distinct colours"


def _hover(driver, div_id: str, row: int, column: int) -> str:
    """Move the mouse over cell (``row``, ``column``) of a heatmap, as a user does, and return
    the hover label's text."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.support.ui import WebDriverWait

    x, y = driver.execute_script(
        "const div = document.getElementById(arguments[0]); div.scrollIntoView();"
        "const xa = div._fullLayout.xaxis, ya = div._fullLayout.yaxis, box = div.getBoundingClientRect();"
        "return [Math.round(box.left + xa._offset + xa.c2p(arguments[2])),"
        "        Math.round(box.top + ya._offset + ya.c2p(arguments[1]))];",
        div_id, row, column,
    )
    action = ActionBuilder(driver)
    action.pointer_action.move_to_location(x, y)
    action.perform()
    script = (
        "const label = document.getElementById(arguments[0]).querySelector('.hoverlayer .hovertext');"
        "return label ? label.textContent : '';"
    )
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(script, div_id))
    return driver.execute_script(script, div_id)


def test_html_report_in_chromium(driver, model, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = torch.randint(1, 250, (20, 8), generator=torch.Generator().manual_seed(2))
        report = mass_vs_effect(model, tokens, n_boot=60, gradient=False)
    path = write_html_report({"tiny": report}, tmp_path / "report.html")
    log = _open(driver, path, n_plots=3)
    assert _errors(log) == [], f"JavaScript errors: {_errors(log)}"
    count = driver.execute_script
    assert count("return document.querySelectorAll('.js-plotly-plot').length") == 3
    assert count("return document.querySelectorAll('#tiny-figure-0 .heatmaplayer image').length") == 1
    assert count("return document.querySelectorAll('#tiny-figure-1 .heatmaplayer image').length") == 1
    assert count("return document.querySelectorAll('#tiny-figure-2 .scatterlayer .point').length") == len(report.table)
    assert count("return document.querySelectorAll('table.dataframe').length") >= 2
    row = report.table.iloc[1]  # L0 mlp, source 0 (emb): heatmap row 1, column 0 (L0 attn is one merged row)
    assert (row["router"], row["source"], row["label"]) == ("blocks.0.mlp_router", 0, "emb")
    text = _hover(driver, "tiny-figure-1", 1, 0)
    assert "blocks.0.mlp_router" in text and "source: emb" in text and "family: embedding" in text
    assert f"effect: {row['effect']:+.4f} [{row['effect_low']:+.4f}, {row['effect_high']:+.4f}]" in text
    assert f"mass: {row['mass']:.3f} [" in text and "merged copies: 1" in text
    _not_blank(driver, tmp_path / "report.png")


def test_explorer_snapshot_in_chromium(driver, model, tmp_path):
    explorer = explore(model, "def f(x):\n    return x + 1", patch_text="class A(B):\n    pass  # ok")
    router = model.router_specs[3].name
    explorer.router.value = router
    explorer.slice_rows.children[0].children[0].value = "zero"
    explorer.slice_rows.children[1].children[0].value = "patch"
    path = tmp_path / "explorer.html"
    explorer.snapshot_html(path)
    log = _open(driver, path, n_plots=2)
    assert _errors(log) == [], f"JavaScript errors: {_errors(log)}"
    count = driver.execute_script
    n_tokens = len(explorer.session.str_tokens)
    assert count("return document.querySelectorAll('.ar-routing .ar-token').length") == n_tokens
    assert count("return document.querySelectorAll('.ar-loss .ar-token').length") == n_tokens
    assert count("return document.querySelectorAll('#routing-heatmap .heatmaplayer image').length") == 1
    assert count("return document.querySelectorAll('#loss-per-token .scatterlayer .trace').length") == 2
    title = count("return document.querySelector('.ar-routing .ar-token').title")
    assert all(s.label in title for s in model.router_specs[3].sources)
    text = _hover(driver, "routing-heatmap", 1, 2)  # source 1 (patched) at position 2
    alpha = explorer.session.result().routing[router][2, 1]
    assert alpha != pytest.approx(explorer.session.clean_routing[router][2, 1], abs=1e-3)
    assert f"mass = {alpha:.3f}" in text
    _not_blank(driver, tmp_path / "explorer.png")


def test_circuit_figure_in_chromium(driver, model, tmp_path):
    from attnres_lens.circuits import Circuit, DepthGraph, circuit_figure, score_edges

    clean = torch.randint(1, 250, (4, 8), generator=torch.Generator().manual_seed(2))
    corrupt = torch.randint(1, 250, (4, 8), generator=torch.Generator().manual_seed(3))
    graph = DepthGraph.from_model(model)
    scores = score_edges(model, clean, corrupt, graph=graph)
    path = tmp_path / "circuit.html"
    circuit_figure(graph, scores, Circuit.of(scores.top(3)), path=path)
    log = _open(driver, path, n_plots=1)
    assert _errors(log) == [], f"JavaScript errors: {_errors(log)}"
    div = driver.execute_script("return document.querySelector('.js-plotly-plot').id")
    top = scores.keys.index(scores.ranking()[0])
    edge = graph.routing_edges[top]
    from attnres_lens.circuits.figure import node_positions

    xy = node_positions(graph)
    mid_x, mid_y = (xy[edge.src][0] + xy[edge.dst][0]) / 2, (xy[edge.src][1] + xy[edge.dst][1]) / 2
    text = _hover(driver, div, mid_y, mid_x)
    assert edge.id in text and f"effect: {scores.score[top]:+.4f}" in text and "in circuit: yes" in text
    _not_blank(driver, tmp_path / "circuit.png")


# ----------------------------------------------------------------------------- report.html = report.md + more (issue 25 Q 3)
@pytest.fixture(scope="module")
def protocol_report(model, tmp_path_factory):
    from attnres_lens.protocol import Subject, run_protocol

    out = tmp_path_factory.mktemp("protocol") / "report"
    tokens = torch.randint(1, 250, (8, 10), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_protocol([Subject("tiny", model, description="a tiny cumulative model")], tokens, out,
                     groups=["slice", "family_band"], n_boot=40, progress=False)
    return out


def _plain(markdown_text: str) -> str:
    """What a reader sees of one line of markdown: no markup, one space between words."""
    text = markdown_text.replace("\\|", "|").replace("**", "").replace("`", "")
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    return " ".join(text.split())


def _markdown_parts(markdown: str) -> dict[str, list]:
    """report.md's parts, read independently of the library's converter."""
    lines, parts = markdown.splitlines(), {"headings": [], "items": [], "paragraphs": [], "images": [], "tables": [], "code": []}
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = lines.index("```", i + 1)
            parts["code"].append(" ".join("\n".join(lines[i + 1:end]).split()))
            i = end
        elif re.match(r"#{1,6} ", line):
            parts["headings"].append(_plain(line.lstrip("#")))
        elif line.startswith("|"):
            parts["tables"].append([_plain(c) for c in re.split(r"(?<!\\)\|", line)[1:-1]])  # the header row
            while i + 1 < len(lines) and lines[i + 1].startswith("|"):
                i += 1
        elif line.startswith("- "):
            parts["items"].append(_plain(line[2:]))
        elif "![" in line:
            parts["images"] += re.findall(r"!\[[^\]]*\]\(([^)]+)\)", line)
        elif line.strip():
            parts["paragraphs"].append(_plain(line))
        i += 1
    return parts


def test_report_html_holds_every_part_of_report_md(driver, protocol_report):
    """Every heading, list item, paragraph, fenced block, table (by its header) and figure of
    report.md is in report.html, as a reader of the page sees it; each figure of a grouping also
    has its interactive version, and each grouping the whole table."""
    md = _markdown_parts((protocol_report / "report.md").read_text())
    assert md["headings"] and md["tables"] and md["images"] and md["items"] and md["code"]
    page = protocol_report / "report.html"
    n_plots = sum(1 for p in md["images"] if "content_dependence" not in p)
    assert _errors(_open(driver, page, n_plots)) == []
    js = driver.execute_script
    texts = lambda selector: [" ".join(t.split()) for t in js(
        f"return [...document.querySelectorAll({selector!r})].map(e => e.innerText)")]
    assert texts("h1, h2, h3") == md["headings"]
    for kind, selector in (("items", "li"), ("paragraphs", "p"), ("code", "pre")):
        shown = set(texts(selector))
        missing = [x for x in md[kind] if x not in shown]
        assert missing == [], (kind, missing[:3])
    headers = [[" ".join(c.split()) for c in row] for row in js(
        "return [...document.querySelectorAll('table.report-table')].map(t => [...t.querySelectorAll('thead th')].map(c => c.innerText))")]
    assert headers == md["tables"]
    images = js("return [...document.querySelectorAll('img[data-path]')].map(i => [i.dataset.path, i.naturalWidth])")
    assert [p for p, _ in images] == md["images"] and all(width > 100 for _, width in images)
    interactive = js("return [...document.querySelectorAll('.interactive .js-plotly-plot')].length")
    assert interactive == n_plots
    assert len(texts("details summary")) >= 2 and "The whole table (every column)" in texts("details summary")


_BOXES = """
return [...document.querySelectorAll('.js-plotly-plot')].map(plot => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const all = sel => [...plot.querySelectorAll(sel)].filter(e => e.textContent.trim()).map(e => [e.textContent, box(e)]);
  const bg = plot.querySelector('.cartesianlayer .bg, .bglayer rect');
  return {id: plot.id, svg: box(plot.querySelector('.main-svg')), area: bg ? box(bg) : null,
          colourbar: all('.colorbar text'), titles: all('.g-xtitle text, .g-ytitle text, .g-gtitle text'),
          ticks: all('.xtick text, .ytick text'), legend: all('.legend text'),
          rows: plot.querySelectorAll('.ytick').length};
});
"""


def _overlap(a, b, slack: float = 1.0) -> bool:
    return a[0] < b[2] - slack and b[0] < a[2] - slack and a[1] < b[3] - slack and b[1] < a[3] - slack


def test_no_figure_label_of_report_html_overlaps_or_is_clipped(driver, protocol_report):
    """Measured in the page: every colour-bar label, axis title, tick label and legend entry lies
    inside its figure, no two of them overlap, and a heatmap gives each row room (the family x
    band heatmap was squashed into ~50 px, its colour-bar labels on top of each other)."""
    md = _markdown_parts((protocol_report / "report.md").read_text())
    _open(driver, protocol_report / "report.html", sum(1 for p in md["images"] if "content_dependence" not in p))
    for plot in driver.execute_script(_BOXES):
        labels = plot["colourbar"] + plot["titles"] + plot["legend"]
        svg = plot["svg"]
        for text, b in labels + plot["ticks"]:
            assert svg[0] - 1 <= b[0] and b[2] <= svg[2] + 1 and svg[1] - 1 <= b[1] and b[3] <= svg[3] + 1, (plot["id"], text, b, svg)
        for i, (text_a, a) in enumerate(labels):
            for text_b, b in labels[i + 1:] + plot["ticks"]:
                assert not _overlap(a, b), (plot["id"], text_a, text_b, a, b)
        if plot["area"] is not None and plot["rows"]:
            height = plot["area"][3] - plot["area"][1]
            assert height / plot["rows"] >= 18, (plot["id"], height, plot["rows"])
