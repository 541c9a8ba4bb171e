"""Sharded execution on Dask: pipeline stages held by worker-side actors.

``DaskBackend`` deploys a model as stages (:mod:`.partition`, :mod:`.placement`),
runs plans through them (:mod:`.actor`, :mod:`.stage`), shares deployments between
clients (:mod:`.deployments`) and starts the embedded cluster (:mod:`.embedded`).
"""

from __future__ import annotations

from typing import Any

from .errors import DeploymentError, StageLostError
from .placement import Placement, place_stages

__all__ = ["DaskBackend", "Deployment", "DeploymentError", "Placement", "StageLostError",
           "place_stages"]


def __getattr__(name: str) -> Any:
    # the backend (torch, transformers, distributed) loads on first use, so that
    # ``connect()`` can start the workers' forkserver (:mod:`.warm_start`) before it
    if name in ("DaskBackend", "Deployment"):
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
