"""The HTML report and an explorer snapshot, opened in a real headless Chromium (selenium).

Skipped, with the reason, where selenium, Chromium or chromedriver is missing (Debian:
``apt-get install chromium chromium-driver``). Each page must draw its plotly figures (the plot
elements are in the DOM), log no JavaScript error to the console, show the numbers on hover, and
render a screenshot that is not blank.
"""

from __future__ import annotations

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
