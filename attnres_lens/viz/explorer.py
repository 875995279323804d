"""``explore(model, text)``: a live ipywidgets explorer of routing and slice interventions.

Pick a router and see its routing per token (hover a token for its weights over sources); set
each source of that router to zero, mask, scale or patch (from a second prompt); read the
metric, the top-k next-token predictions (clean vs intervened) and the loss per token at once;
reset; export the chosen interventions as Python. All the logic lives in
:class:`~attnres_lens.viz.session.ExplorerSession` (tested without a browser); this module only
lays out widgets and calls it. :meth:`Explorer.snapshot_html` writes the current view as a
self-contained HTML page (plotly.js embedded, no widget manager or CDN needed).
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, Optional, Union

from .render import choices_html, loss_tokens_html, predictions_html, routing_tokens_html, status_html
from .session import CHOICES, ExplorerSession

WIDGETS_HINT = "the explorer needs ipywidgets: pip install ipywidgets (or pip install 'attnres_lens[viz]')"


def _widgets() -> Any:
    try:
        import ipywidgets
    except ImportError as err:  # pragma: no cover - ipywidgets is a declared extra
        raise ImportError(WIDGETS_HINT) from err
    return ipywidgets


class Explorer:
    """The widget around an :class:`ExplorerSession` (``explorer.session``). Display it in a
    notebook (it is its own widget view); ``explorer.widget`` is the ipywidgets box."""

    def __init__(self, session: ExplorerSession, *, router: Optional[str] = None):
        w = _widgets()
        self.session = session
        self.last_update_seconds = 0.0
        names = session.routers
        self.router = w.Dropdown(
            options=[(f"{session.router_label(n)} ({n})", n) for n in names],
            value=router if router is not None else names[-1],
            description="router",
        )
        self.colour_source = w.Dropdown(description="shade by")
        self.target = w.Dropdown(options=["weight", "source", "contribution"], value="weight", description="patch target")
        self.patch_text = w.Textarea(
            value=session.patch_text if isinstance(session.patch_text, str) else "",
            placeholder="second prompt for 'patch' (same number of tokens)",
            description="patch from",
            layout=w.Layout(width="95%", height="60px"),
            continuous_update=False,
        )
        self.routing_view = w.HTML()
        self.slice_rows = w.VBox()
        self.chosen = w.HTML()
        self.predictions = w.HTML()
        self.loss_view = w.HTML()
        self.status = w.HTML()
        self.message = w.HTML()
        self.reset_button = w.Button(description="reset", icon="undo")
        self.export_button = w.Button(description="export code", icon="code")
        self.code = w.Textarea(layout=w.Layout(width="95%", height="140px", display="none"))
        self.router.observe(lambda _: self._router_changed(), names="value")
        self.colour_source.observe(lambda _: self._show_routing(), names="value")
        self.patch_text.observe(lambda _: self._patch_changed(), names="value")
        self.target.observe(lambda _: self._target_changed(), names="value")
        self.reset_button.on_click(lambda _: self.reset())
        self.export_button.on_click(lambda _: self._export())
        self.widget = w.VBox(
            [
                w.HBox([self.router, self.colour_source]),
                self.routing_view,
                w.HTML("<b>Interventions on this router's sources</b>"),
                self.slice_rows,
                w.HBox([self.target, self.reset_button, self.export_button]),
                self.patch_text,
                self.message,
                self.chosen,
                w.HBox([self.predictions, self.loss_view]),
                self.status,
                self.code,
            ]
        )
        self._router_changed()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ events
    def _router_changed(self) -> None:
        w = _widgets()
        spec = self.session.specs[self.router.value]
        labels = [f"{s.label} ({s.family})" for s in spec.sources]
        self.colour_source.options = [(label, i) for i, label in enumerate(labels)]
        self.colour_source.value = len(labels) - 1
        rows = []
        for src, label in zip(spec.sources, labels):
            current = self.session.choice(spec.name, src.index)
            mode = w.Dropdown(options=list(CHOICES), value=current.mode if current else "none",
                              description=label, style={"description_width": "160px"})
            factor = w.FloatText(value=current.factor if current and current.mode == "scale" else 0.5,
                                 description="factor", layout=w.Layout(width="160px"))
            handler = self._slice_handler(spec.name, src.index, mode, factor)
            mode.observe(handler, names="value")
            factor.observe(handler, names="value")
            rows.append(w.HBox([mode, factor]))
        self.slice_rows.children = rows
        self.update()

    def _slice_handler(self, router: str, source: int, mode: Any, factor: Any) -> Any:
        def handler(_: Any) -> None:
            try:
                self.session.set_choice(router, source, mode.value, factor=factor.value, target=self.target.value)
                self.message.value = ""
            except ValueError as err:
                self.message.value = f'<span style="color:#d62728">{html.escape(str(err))}</span>'
                mode.value = "none"
                return
            self.update()

        return handler

    def _patch_changed(self) -> None:
        text = self.patch_text.value
        if not text:
            return
        try:
            self.session.set_patch_text(text)
            self.message.value = ""
        except ValueError as err:
            self.message.value = f'<span style="color:#d62728">{html.escape(str(err))}</span>'
            return
        self.update()

    def _target_changed(self) -> None:
        for c in self.session.choices:
            if c.mode == "patch":
                self.session.set_choice(c.router, c.source, "patch", target=self.target.value)
        self.update()

    def reset(self) -> None:
        """Clear every choice and show the clean run."""
        self.session.reset()
        self._router_changed()

    def _export(self) -> None:
        self.code.value = self.session.code()
        self.code.layout.display = None

    # ------------------------------------------------------------------ views
    def _show_routing(self) -> None:
        if self.colour_source.value is None:
            return
        name = self.router.value
        spec = self.session.specs[name]
        result = self.session.result()
        self.routing_view.value = routing_tokens_html(
            self.session.str_tokens, result.routing[name], [s.label for s in spec.sources], self.colour_source.value
        )

    def update(self) -> None:
        """Recompute (only what the choices need) and refresh every view."""
        start = time.perf_counter()
        session = self.session
        result = session.result()
        self._show_routing()
        self.chosen.value = choices_html(session.choices, session.router_label)
        self.predictions.value = predictions_html(result, session.str_tokens)
        self.loss_view.value = loss_tokens_html(session.str_tokens, result.loss_clean, result.loss_intervened)
        self.last_update_seconds = time.perf_counter() - start
        self.status.value = status_html(result, session.model.cfg.n_sublayers).replace(
            "</span>", f"; view updated in {1000 * self.last_update_seconds:.1f} ms</span>"
        )

    # ------------------------------------------------------------------ snapshot
    def snapshot_html(self, path: Union[str, Path, None] = None, *, title: str = "attnres_lens explorer") -> str:
        """The current view as one self-contained HTML page (plotly.js embedded once): the
        routing of the selected router per token (tokens and an interactive heatmap), the chosen
        interventions, the predictions, the loss per token and the code. Written to ``path``
        if given; returned either way."""
        from .snapshot import snapshot_page

        page = snapshot_page(self.session, self.router.value, self.colour_source.value, title=title)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page


def explore(
    model: Any,
    text: Any,
    *,
    patch_text: Any = None,
    router: Optional[str] = None,
    metric: Any = "loss",
    top_k: int = 5,
    position: int = -1,
) -> Explorer:
    """The live explorer on ``text`` (a string or tokens of one prompt). ``patch_text`` is the
    second prompt that ``patch`` takes values from; ``router`` the router shown first (default:
    the last). Display the returned :class:`Explorer` in a notebook."""
    session = ExplorerSession(model, text, patch_text=patch_text, metric=metric, top_k=top_k, position=position)
    return Explorer(session, router=router)
