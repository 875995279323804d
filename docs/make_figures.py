"""Regenerate the figures of docs/concepts.md from the bundled models.

    python docs/make_figures.py

Runs the demo's protocol into a temporary directory and copies the figures the concepts page
shows into docs/figures/, plus a token-level routing view of one prompt.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

FIGURES = Path(__file__).resolve().parent / "figures"
KEEP = ("content_dependence.png", "trained_slice_mass.png", "trained_slice_effect.png", "trained_slice_scatter.png")


def main() -> None:
    from attnres_lens import bundled
    from attnres_lens.attribution import plot_token_routing
    from attnres_lens.demo import run_demo

    FIGURES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_demo(tmp, groups=("slice",), progress=False)
        for name in KEEP:
            shutil.copy(Path(tmp) / "figures" / name, FIGURES / name)
    model = bundled.load_attnres()
    prompt = "for item in items:\n    if item.ready():\n        yield item\n"
    plot_token_routing(model, prompt, router=[(1, "mlp"), (3, "mlp")], path=str(FIGURES / "token_routing.png"))
    print("wrote", ", ".join(sorted(p.name for p in FIGURES.iterdir())))


if __name__ == "__main__":
    main()
