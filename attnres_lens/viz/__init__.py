"""Interactive views of routing: plotly figures, a live explorer widget and an HTML report.

Every function imports its plotting/widget library (plotly, ipywidgets, circuitsvis) when
called, so ``import attnres_lens.viz`` costs nothing extra::

    from attnres_lens import viz
    viz.plot_routing_heatmap(report)            # routers x sources, hover for every number
    viz.plot_effect_heatmap(report)
    viz.plot_mass_effect_scatter(report)        # with both bootstrap CIs
    viz.plot_token_routing(model, text, "blocks.3.mlp_router")
    viz.token_routing_circuitsvis(model, text, "blocks.3.mlp_router")
    viz.explore(model, text, patch_text=other)  # the live explorer (ipywidgets)
    viz.write_html_report({"trained": report}, "report.html")
"""

from .explorer import Explorer, explore
from .figures import figure_html, plot_effect_heatmap, plot_mass_effect_scatter, plot_routing_heatmap
from .html_report import write_html_report, write_markdown_html
from .session import CHOICES, ExplorerResult, ExplorerSession, Prediction, SliceChoice
from .tokens import TokenRouting, plot_token_routing, token_routing, token_routing_circuitsvis

__all__ = [
    "CHOICES",
    "Explorer",
    "ExplorerResult",
    "ExplorerSession",
    "Prediction",
    "SliceChoice",
    "TokenRouting",
    "explore",
    "figure_html",
    "plot_effect_heatmap",
    "plot_mass_effect_scatter",
    "plot_routing_heatmap",
    "plot_token_routing",
    "token_routing",
    "token_routing_circuitsvis",
    "write_html_report",
    "write_markdown_html",
]
