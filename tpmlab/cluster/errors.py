"""Errors of the sharded engine: each names the stage, its layers and its worker."""

from __future__ import annotations

from ..errors import ExecutionError, LimitError, TpmlabError


class DeploymentError(TpmlabError):
    """A model could not be placed on the cluster (too few workers or GPUs, a stage failed to load)."""

    http_status = 503


class StageLostError(ExecutionError):
    """A stage's worker died while a request ran on it.

    The request failed; the deployment has already been healed (the lost stages were
    loaded again on live workers), so running the request again works. Behind the gateway
    it is a 503 (the service could not finish it, and a retry is expected to work), not a
    422 (a fault of the plan).
    """

    http_status = 503


class ClusterSecurityError(TpmlabError):
    """A cluster's credentials are missing, unreadable or not private to their owner."""


class RemoteLimitError(LimitError):
    """A request's remote saves would take an owner past the bytes or values they may keep
    on one stage's worker (``max_remote_bytes`` / ``max_remote_values``)."""


class RemoteValueGone(TpmlabError):
    """A remote value is no longer on its worker (freed, expired, or its worker restarted)."""

    http_status = 410
