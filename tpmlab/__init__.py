"""tpmlab: trace, patch and visualize large language models sharded over Dask, from Jupyter.

``import tpmlab`` loads only the client (``connect``, ``Lab`` and the tracing API). The
other subpackages load on first use as attributes, so ``tpmlab.lenses.get("logit")``,
``tpmlab.widgets.dashboard(...)`` and ``tpmlab.store.Store(...)`` work after a plain
``import tpmlab`` without slowing it down.
"""

from __future__ import annotations

import importlib
from typing import Any

from .openmp_wait import prefer_short_spin

prefer_short_spin()  # before anything below loads torch

from ._version import __version__  # noqa: E402
from .errors import ExecutionError, PlanError, TpmlabError  # noqa: E402
from .lab import Lab, connect  # noqa: E402

__all__ = ["Lab", "connect", "PlanError", "ExecutionError", "TpmlabError", "__version__"]

# Subpackages imported on first attribute access (PEP 562): some need optional extras
# (widgets: ipywidgets and plotly; gateway: fastapi; server: jupyter_server) and all of
# them cost import time that a notebook using only the client should not pay.
LAZY_SUBPACKAGES = frozenset({
    "cluster", "gateway", "ir", "lenses", "models", "runtime", "server", "store", "tracing",
    "widgets",
})


def __getattr__(name: str) -> Any:
    if name in LAZY_SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)  # also binds it on this module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | LAZY_SUBPACKAGES)
