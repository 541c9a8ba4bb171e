"""Interactive lens dashboards for Jupyter (ipywidgets + plotly).

    >>> import tpmlab, tpmlab.widgets
    >>> model = tpmlab.connect("local").model()
    >>> tpmlab.widgets.dashboard(model, "logit", prompt="The Eiffel Tower is located in the city of")

One dashboard, :class:`LensDashboard`, serves every lens: it reads the lens's view
(inputs, options, axes, metrics, detail panel; see :mod:`tpmlab.lenses.contract`), shows
the result's own figure and cell details (:mod:`tpmlab.widgets.figures` keeps a static
copy for saved notebooks), and runs requests as background :mod:`tpmlab.widgets.jobs`
whose progress callback the lens calls between passes. Needs the ``lab`` extra
(ipywidgets, plotly, anywidget).
"""

from __future__ import annotations

from ..lenses.contract import Cancelled
from .dashboards import LensDashboard, dashboard
from .jobs import Job

__all__ = ["Cancelled", "Job", "LensDashboard", "dashboard"]
