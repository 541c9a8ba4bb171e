"""The demo notebook is saved small: figures as static plotly outputs, no widget state."""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "lens_dashboards.ipynb"
PLOTLY = "application/vnd.plotly.v1+json"


def test_saved_demo_notebook_is_small_and_static():
    size = NOTEBOOK.stat().st_size
    nb = json.loads(NOTEBOOK.read_text())
    assert size < 400_000, f"{NOTEBOOK.name} is {size} bytes"
    assert "widgets" not in nb["metadata"]  # no saved widget state (plotly's alone is ~5 MB)
    dashboards = [c for c in nb["cells"] if c["cell_type"] == "code" and "tw.dashboard(" in "".join(c["source"])]
    assert len(dashboards) == 5
    for cell in dashboards:
        assert "nbval-ignore-output" in cell["metadata"].get("tags", [])
        figs = [o["data"][PLOTLY] for o in cell["outputs"] if PLOTLY in o.get("data", {})]
        assert len(figs) == 1 and figs[0]["data"][0]["type"] == "heatmap", "a static figure per dashboard"
        assert all(len(json.dumps(o)) < 150_000 for o in cell["outputs"])
    assert "Paris" in json.dumps(nb["cells"][4]["outputs"])  # the final layer's answer
