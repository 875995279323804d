"""``DisplayFigure``: a matplotlib ``Figure`` that shows itself inline in Jupyter and VS Code.

A bare ``matplotlib.figure.Figure`` built with the object API (no pyplot) has no IPython display
formatter until pyplot is imported, so a notebook cell ending in one prints only
``<Figure size ...>``. ``_repr_png_`` renders it to PNG bytes instead, with no magic and no
pyplot state. Imported by :func:`attnres_lens.attribution.plots.new_figure` when a figure is
drawn, so that importing the plotting module does not import matplotlib."""

from __future__ import annotations

import io

from matplotlib.figure import Figure

#: Resolution of the inline PNG (``savefig(path)`` keeps its own ``dpi``).
DISPLAY_DPI = 100


class DisplayFigure(Figure):
    """A ``matplotlib.figure.Figure`` that IPython displays as ``image/png``."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DISPLAY_DPI)
        return buffer.getvalue()


__all__ = ["DISPLAY_DPI", "DisplayFigure"]
