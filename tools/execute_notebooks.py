"""Execute the example notebooks from their jupytext sources and write them with outputs.

    python tools/execute_notebooks.py                      # every examples/0N_*.py
    python tools/execute_notebooks.py examples/03_paper_protocol.py

Each ``examples/0N_name.py`` (a jupytext percent script, the source you edit) is run top to
bottom in a fresh kernel, in a temporary working directory (files a notebook writes do not land
in the repository), with one CPU thread, and written to ``examples/0N_name.ipynb`` with its
outputs and figures, so that GitHub and nbviewer show them. Timing metadata is not recorded.
``tests/test_notebooks.py`` checks that every committed notebook matches its script.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import jupytext
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def execute(script: Path) -> Path:
    notebook = jupytext.read(script)
    with tempfile.TemporaryDirectory() as workdir:
        NotebookClient(
            notebook, timeout=900, kernel_name="python3", record_timing=False,
            resources={"metadata": {"path": workdir}},
        ).execute()
    target = script.with_suffix(".ipynb")
    jupytext.write(notebook, target, fmt="ipynb")
    return target


def main(argv: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # what Jupyter gives a kernel (a CI-wide MPLBACKEND=Agg would hide pyplot figures)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    scripts = [Path(a) for a in argv] or sorted(EXAMPLES.glob("0[0-9]_*.py"))
    for script in scripts:
        print(f"executing {script} ...", flush=True)
        print(f"  wrote {execute(script)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
