"""Interactive lens dashboards for Jupyter (ipywidgets + plotly).

    >>> import tpmlab, tpmlab.widgets
    >>> model = tpmlab.connect("local").model()
    >>> tpmlab.widgets.dashboard(model, "logit", prompt="The Eiffel Tower is located in the city of")

One class per lens (:class:`LogitLensDashboard`, :class:`TunedLensDashboard`,
:class:`AttentionLensDashboard`, :class:`MemoryInjectionDashboard`,
:class:`PatchingDashboard`). What they show is computed by plain functions in
:mod:`tpmlab.widgets.views` (result + controls -> data) and drawn by
:mod:`tpmlab.widgets.figures`; requests run as background :mod:`tpmlab.widgets.jobs`.
Needs the ``lab`` extra (ipywidgets, plotly, anywidget).
"""

from __future__ import annotations

from .dashboards import (
    ALIASES,
    DASHBOARDS,
    AttentionLensDashboard,
    LensDashboard,
    LogitLensDashboard,
    MemoryInjectionDashboard,
    PatchingDashboard,
    TunedLensDashboard,
    dashboard,
)
from .jobs import Cancelled, Job

__all__ = ["ALIASES", "DASHBOARDS", "AttentionLensDashboard", "Cancelled", "Job", "LensDashboard",
           "LogitLensDashboard", "MemoryInjectionDashboard", "PatchingDashboard",
           "TunedLensDashboard", "dashboard"]
