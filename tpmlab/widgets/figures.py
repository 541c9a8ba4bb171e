"""Views to plotly figures, and figures to a static output that a saved notebook keeps.

``heatmap_figure(view)`` draws a :class:`~tpmlab.widgets.views.HeatmapView` (selection
outlined, marked columns shaded); :func:`static_bundle` gives the MIME bundle JupyterLab
renders without a kernel: ``application/vnd.plotly.v1+json`` (drawn by the labextension
bundled with plotly) plus a one-line ``text/plain`` for other viewers. No widget state and
no JavaScript travel with it, so a figure costs its data only (a few to a few hundred KB).
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from ..lenses.result import shown as number
from .views import HeatmapView

SELECT_COLOR = "#ff2d95"
MARK_COLOR = "rgba(255, 170, 0, 0.9)"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
#: plotly.js options for every dashboard figure (no logo, no "edit in Chart Studio" link)
CONFIG = {"displaylogo": False, "responsive": True}


def _selection_shapes(view: HeatmapView) -> list[dict[str, Any]]:
    shapes = []
    rows, cols = view.shape
    for c in view.marked_cols:
        shapes.append({"type": "rect", "xref": "x", "yref": "y", "x0": c - 0.5, "x1": c + 0.5,
                       "y0": -0.5, "y1": rows - 0.5, "line": {"color": MARK_COLOR, "width": 2,
                                                              "dash": "dot"}, "layer": "above"})
    if view.selected is not None:
        r, c = view.selected
        shapes.append({"type": "rect", "xref": "x", "yref": "y", "x0": -0.5, "x1": cols - 0.5,
                       "y0": r - 0.5, "y1": r + 0.5, "name": "selected-row",
                       "line": {"color": SELECT_COLOR, "width": 1}, "layer": "above"})
        shapes.append({"type": "rect", "xref": "x", "yref": "y", "x0": c - 0.5, "x1": c + 0.5,
                       "y0": r - 0.5, "y1": r + 0.5, "name": "selected-cell",
                       "line": {"color": SELECT_COLOR, "width": 3}, "layer": "above"})
    return shapes


def heatmap_trace(view: HeatmapView) -> dict[str, Any]:
    """The heatmap trace of ``view`` as a plain dict."""
    trace: dict[str, Any] = {
        "type": "heatmap", "z": view.z, "x": view.x, "y": view.y, "hovertext": view.hover,
        "hoverinfo": "text", "colorscale": view.colorscale, "xgap": 1, "ygap": 1,
        "colorbar": {"title": {"text": view.colorbar, "side": "right"}, "thickness": 12},
        "zmid": view.zmid, "zmin": view.zmin, "zmax": view.zmax, "name": "heatmap",
    }
    if view.text is not None:
        trace.update(text=view.text, texttemplate="%{text}", textfont={"size": 9})
    return trace


def heatmap_layout(view: HeatmapView, *, height: int | None = None) -> dict[str, Any]:
    rows, cols = view.shape
    return {
        "title": {"text": view.title, "font": {"size": 14}, "x": 0.01, "xanchor": "left"},
        "xaxis": {"title": {"text": view.x_title}, "type": "category", "tickangle": -45 if cols > 6 else 0,
                  "tickfont": {"size": 10}},
        "yaxis": {"title": {"text": view.y_title}, "type": "category", "tickfont": {"size": 10}},
        "shapes": _selection_shapes(view),
        "height": height or max(380, min(900, 130 + 20 * rows)),
        "width": max(560, min(1000, 190 + 58 * cols)),
        "margin": {"l": 60, "r": 20, "t": 40, "b": 80},
        "plot_bgcolor": "white", "template": "plotly_white", "clickmode": "event",
    }


def heatmap_figure(view: HeatmapView, *, height: int | None = None):
    """A ``plotly.graph_objects.Figure`` of ``view``."""
    import plotly.graph_objects as go

    return go.Figure(data=[heatmap_trace(view)], layout=heatmap_layout(view, height=height))


def memory_figure(view: HeatmapView, bars: dict[str, Any]):
    """The layer x tau heatmap beside before/after bars of the selected cell."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.22,
                        subplot_titles=("", f"P(answer) at {bars['title']}: before (grey), after (blue)"))
    trace = heatmap_trace(view)
    trace["colorbar"].update(x=0.49, len=0.9)
    fig.add_trace(go.Heatmap(**{k: v for k, v in trace.items() if k != "type"}), row=1, col=1)
    fig.add_trace(go.Bar(name="before", x=bars["prompts"], y=bars["before"], marker_color="#9aa5b1"),
                  row=1, col=2)
    fig.add_trace(go.Bar(name="after", x=bars["prompts"], y=bars["after"], marker_color="#2563eb"),
                  row=1, col=2)
    layout = heatmap_layout(view)
    fig.layout.annotations[0].font.size = 12
    fig.update_layout(title=layout["title"], shapes=layout["shapes"], height=layout["height"], width=900,
                      margin=layout["margin"], template="plotly_white", barmode="group",
                      showlegend=False, clickmode="event")
    fig.update_xaxes(title_text=view.x_title, type="category", row=1, col=1)
    fig.update_yaxes(title_text=view.y_title, type="category", row=1, col=1)
    fig.update_yaxes(title_text="probability", row=1, col=2, rangemode="tozero")
    return fig


def placeholder_figure(message: str, height: int = 320):
    """An empty figure with a message (before the first result, or after an error)."""
    import plotly.graph_objects as go

    return go.Figure(layout={
        "height": height, "template": "plotly_white", "xaxis": {"visible": False},
        "yaxis": {"visible": False}, "margin": {"l": 20, "r": 20, "t": 30, "b": 20},
        "annotations": [{"text": escape(message), "showarrow": False, "font": {"size": 14},
                         "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}]})


def figure_json(fig) -> dict[str, Any]:
    """The figure as plain JSON (lists, numbers, strings), without the template's bulk
    replaced: plotly's own serializer handles numpy and NaN."""
    return json.loads(fig.to_json())


def static_bundle(fig, summary: str = "") -> dict[str, Any]:
    """A MIME bundle of ``fig`` for ``display(bundle, raw=True)``: the plotly mimetype
    (JupyterLab draws it with plotly's labextension, live kernel or not) and plain text."""
    spec = figure_json(fig)
    spec["config"] = dict(CONFIG)
    return {PLOTLY_MIME: spec, "text/plain": summary or "<plotly figure>"}


def detail_html(detail: dict[str, Any] | None, *, marker: str = "") -> str:
    """The side panel's HTML for a detail dict (see :mod:`tpmlab.widgets.views`)."""
    cls = f"tpmlab-detail {marker}".strip()
    if not detail:
        return f'<div class="{cls}"><i>Run the lens, then click a cell.</i></div>'
    parts = [f'<div class="{cls}">', f"<b>{escape(detail['title'])}</b>"]
    if detail.get("token") is not None:
        parts.append(f"<div>token <code>{escape(repr(detail['token']))}</code></div>")
    for key, header in (("top", "top_header"), ("more", "more_header")):
        rows = detail.get(key) or []
        if not rows:
            continue
        head = detail.get(header, ("token", "value"))
        parts.append('<table class="tpmlab-topk"><thead><tr>'
                     f"<th>{escape(head[0])}</th><th>{escape(head[1])}</th></tr></thead><tbody>")
        for tok, val in rows:
            shown = number(val) if isinstance(val, float) else str(val)
            parts.append(f"<tr><td><code>{escape(repr(tok) if key != 'top' or head[0] != 'prompt' else tok)}"
                         f"</code></td><td>{escape(shown)}</td></tr>")
        parts.append("</tbody></table>")
    facts = detail.get("facts") or {}
    if facts:
        parts.append('<table class="tpmlab-facts"><tbody>')
        parts += [f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in facts.items()]
        parts.append("</tbody></table>")
    parts.append("</div>")
    return "".join(parts)
