"""Figures of lens results: a lens's grid as a plotly heatmap, and bars of a selected cell.

:class:`HeatmapView` is plain data (numbers and strings) computed from a result and a
metric by :meth:`~tpmlab.lenses.result.LensResult.grid`; :func:`heatmap_figure` draws it
(the selected cell outlined, marked columns drawn as a band) and :func:`figure` adds the
bars a lens's view asks for. The dashboard shows the same figure as ``result.plot()``.
plotly is imported only when a figure is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .contract import Bars

SELECT_COLOR = "#ff2d95"
MARK_COLOR = "rgba(255, 170, 0, 0.9)"


@dataclass
class HeatmapView:
    """One heatmap: ``z[row][col]`` with row labels ``y`` and column labels ``x``.

    ``text``: the word written in each cell (or ``None``); ``hover``: each cell's hover
    text (HTML); ``selected``: the highlighted ``(row, col)``; ``marked_cols``: columns
    drawn as a band (the subject tokens of a causal trace)."""

    z: list[list[float | None]]
    x: list[str]
    y: list[str]
    text: list[list[str]] | None
    hover: list[list[str]]
    title: str
    x_title: str
    y_title: str
    colorbar: str
    colorscale: str = "Viridis"
    zmid: float | None = None
    zmin: float | None = None
    zmax: float | None = None
    selected: tuple[int, int] | None = None
    marked_cols: list[int] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.y), len(self.x)


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


def heatmap_with_bars(view: HeatmapView, bars: Bars):
    """The heatmap beside grouped bars (the selected cell's values, e.g. per prompt)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.22,
                        subplot_titles=("", bars.title))
    trace = heatmap_trace(view)
    trace["colorbar"].update(x=0.49, len=0.9)
    fig.add_trace(go.Heatmap(**{k: v for k, v in trace.items() if k != "type"}), row=1, col=1)
    for name, values, colour in bars.series:
        fig.add_trace(go.Bar(name=name, x=list(bars.categories), y=list(values), marker_color=colour),
                      row=1, col=2)
    layout = heatmap_layout(view)
    fig.layout.annotations[0].font.size = 12
    fig.update_layout(title=layout["title"], shapes=layout["shapes"], height=layout["height"], width=900,
                      margin=layout["margin"], template="plotly_white", barmode="group",
                      showlegend=False, clickmode="event")
    fig.update_xaxes(title_text=view.x_title, type="category", row=1, col=1)
    fig.update_yaxes(title_text=view.y_title, type="category", row=1, col=1)
    fig.update_yaxes(title_text=bars.y_title, row=1, col=2, rangemode="tozero")
    return fig
