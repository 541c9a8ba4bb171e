"""Figures to a static output that a saved notebook keeps, and the detail panel's HTML.

The figures themselves are the lenses' own (``result.plot(metric, selected=...)``, drawn by
:mod:`tpmlab.lenses.plotting`); :func:`static_bundle` gives the MIME bundle JupyterLab
renders without a kernel: ``application/vnd.plotly.v1+json`` (drawn by the labextension
bundled with plotly) plus a one-line ``text/plain`` for other viewers. No widget state and
no JavaScript travel with it, so a figure costs its data only (a few to a few hundred KB).
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from ..lenses.contract import Cell
from ..lenses.result import shown as number

PLOTLY_MIME = "application/vnd.plotly.v1+json"
#: plotly.js options for every dashboard figure (no logo, no "edit in Chart Studio" link)
CONFIG = {"displaylogo": False, "responsive": True}


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


def detail_html(cell: Cell | None, *, marker: str = "") -> str:
    """The side panel's HTML for a cell's detail (``result.cell(row, col)``)."""
    cls = f"tpmlab-detail {marker}".strip()
    if cell is None:
        return f'<div class="{cls}"><i>Run the lens, then click a cell.</i></div>'
    parts = [f'<div class="{cls}">', f"<b>{escape(cell.title)}</b>"]
    if cell.token is not None:
        parts.append(f"<div>token <code>{escape(repr(cell.token))}</code></div>")
    for table in cell.tables:
        if not table.rows:
            continue
        parts.append('<table class="tpmlab-topk"><thead><tr>'
                     f"<th>{escape(table.header[0])}</th><th>{escape(table.header[1])}</th>"
                     "</tr></thead><tbody>")
        for key, val in table.rows:
            value = number(val) if isinstance(val, float) else str(val)
            parts.append(f"<tr><td><code>{escape(repr(key) if table.tokens else str(key))}</code>"
                         f"</td><td>{escape(value)}</td></tr>")
        parts.append("</tbody></table>")
    if cell.facts:
        parts.append('<table class="tpmlab-facts"><tbody>')
        parts += [f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in cell.facts.items()]
        parts.append("</tbody></table>")
    parts.append("</div>")
    return "".join(parts)
