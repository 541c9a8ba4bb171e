"""Sharded execution on Dask: pipeline stages held by worker-side actors.

``DaskBackend`` deploys a model as stages (:mod:`.partition`, :mod:`.placement`),
runs plans through them (:mod:`.actor`, :mod:`.stage`), shares deployments between
clients (:mod:`.deployments`) and starts the embedded cluster (:mod:`.embedded`).
"""

from .backend import DaskBackend, Deployment
from .errors import DeploymentError, StageLostError
from .placement import Placement, place_stages

__all__ = ["DaskBackend", "Deployment", "DeploymentError", "Placement", "StageLostError",
           "place_stages"]
