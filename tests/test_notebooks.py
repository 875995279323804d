"""The example notebooks: each ``examples/0N_name.ipynb`` is committed executed, matches its
jupytext source ``0N_name.py``, shows its figures as images (not a ``<Figure ...>`` text repr),
and runs top to bottom (nbclient, a fresh kernel per notebook, in a temporary working directory)
on the bundled tiny models. ``python tools/execute_notebooks.py`` regenerates them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("0[0-9]_*.py"))
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"

#: Per notebook, a piece of the source of each cell whose output must be a figure.
FIGURE_CELLS = {
    "01_quickstart": ["fig, ax = plt.subplots", "plot_token_routing(trained"],
    "03_paper_protocol": [
        'reports["trained"].plot_scatter()',
        'reports["trained"].plot_mass_heatmap()',
        'reports["trained"].plot_effect_heatmap()',
        "plot_token_routing(trained",
    ],
    "04_training": ["fig, ax = plt.subplots"],
    "05_interactive": [
        'viz.plot_routing_heatmap(reports["trained"]',
        'viz.plot_effect_heatmap(reports["trained"])',
        'viz.plot_mass_effect_scatter(reports["trained"])',
    ],
    "06_circuits": ["fig, ax = plt.subplots", "circuit_figure(graph, exact, circuit)"],
}


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _is_figure(output: dict) -> bool:
    data = output.get("data", {})
    html = data.get("text/html", "")
    html = "".join(html) if isinstance(html, list) else html
    return "image/png" in data or PLOTLY in data or "plotly-graph-div" in html


def _assert_figures_shown(nb, stem: str) -> None:
    cells = _code_cells(nb)
    for needle in FIGURE_CELLS.get(stem, []):
        matching = [cell for cell in cells if needle in cell.source]
        assert len(matching) == 1, f"{stem}: {len(matching)} cells contain {needle!r}"
        outputs = matching[0].get("outputs", [])
        shown = [sorted(out.get("data", {})) or out.get("output_type") for out in outputs]
        assert any(_is_figure(out) for out in outputs), f"{stem}: the cell {needle!r} shows no figure, only {shown}"


def _stderr(nb) -> str:
    return "".join(
        out.get("text", "") for cell in _code_cells(nb) for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stderr"
    )


def test_every_notebook_has_a_script_and_the_five_exist():
    stems = {p.stem for p in NOTEBOOKS}
    assert stems == {p.stem for p in SCRIPTS}, "each examples/0N_name.ipynb is paired with 0N_name.py"
    for prefix in ("01_quickstart", "02_interventions", "03_paper_protocol", "04_training", "05_interactive"):
        assert prefix in stems, f"examples/{prefix}.ipynb is missing"
    assert set(FIGURE_CELLS) <= stems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_committed_notebook_matches_its_script(script):
    """The .ipynb holds the cells of its jupytext script, in order (``jupytext --sync`` or
    ``python tools/execute_notebooks.py`` after editing the script)."""
    from_script = jupytext.read(script)
    committed = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    expected = [(c.cell_type, c.source.strip()) for c in from_script.cells]
    actual = [(c.cell_type, c.source.strip()) for c in committed.cells]
    assert actual == expected, f"{script.name} and {script.stem}.ipynb differ: regenerate the notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed_with_its_figures(path):
    """What a reader sees on GitHub: every code cell ran, no errors, the figures are images."""
    nb = nbformat.read(path, as_version=4)
    cells = _code_cells(nb)
    assert cells and all(cell.execution_count is not None for cell in cells), f"{path.name} is not executed"
    assert not [out for c in cells for out in c.outputs if out.output_type == "error"]
    assert sum(_is_figure(out) for c in cells for out in c.outputs) >= len(FIGURE_CELLS.get(path.stem, []))
    _assert_figures_shown(nb, path.stem)
    assert "IProgress not found" not in _stderr(nb)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    for cell in _code_cells(nb):  # start from nothing: the figures checked below are this run's
        cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    # what Jupyter gives a kernel (CI exports MPLBACKEND=Agg, which would hide pyplot figures)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [out for cell in _code_cells(nb) for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    _assert_figures_shown(nb, path.stem)
    stderr = _stderr(nb)
    assert "IProgress not found" not in stderr and "TqdmWarning" not in stderr, stderr[:500]
