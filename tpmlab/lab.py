"""``tpmlab.connect()``: the notebook's entry point to an engine."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .ir.validate import Limits
from .runtime.backend import Backend, LocalBackend
from .tracing.model import LabModel

if TYPE_CHECKING:  # distributed is imported only when a cluster is used
    from distributed.security import Security


class Lab:
    """A connection to where models run. ``lab.model(name)`` deploys (or attaches to) a model."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.models: dict[str, LabModel] = {}

    def model(self, name: str = "smollm2-135m", **options: Any) -> LabModel:
        from .models import resolve

        if name not in self.models:
            source = resolve(name)
            info = self.backend.deploy(name, **options)
            self.models[name] = LabModel(
                name, info, source, lab=self, limits=getattr(self.backend, "limits", None),
                run_plan=lambda blob, timeout: self.run_values(name, blob, timeout=timeout),
                run_session=(lambda blob, timeout: self.run_session(name, blob, timeout=timeout))
                if hasattr(self.backend, "run_session_values") else None)
        return self.models[name]

    def run(self, model: str, plan: bytes, *, timeout: float | None = None,
            limits: Limits | None = None) -> bytes:
        """Run plan bytes; result bytes. ``limits`` tighten the engine's own for this request."""
        return self.backend.run(model, plan, timeout=timeout, limits=limits)

    def run_values(self, model: str, plan: bytes, *, timeout: float | None = None,
                   limits: Limits | None = None) -> tuple[dict[int, Any], dict[str, Any]]:
        """Run a plan; saved values and provenance (in-process backends skip the result codec)."""
        return self.backend.run_values(model, plan, timeout=timeout, limits=limits)

    def run_session(self, model: str, session: bytes, *, timeout: float | None = None,
                    limits: Limits | None = None) -> list[tuple[dict[int, Any], dict[str, Any]]]:
        """Run a session envelope (:mod:`tpmlab.ir.session`) as one request; each trace's
        saved values and provenance, in order."""
        return self.backend.run_session_values(model, session, timeout=timeout, limits=limits)

    def release_remote(self, model: str | None = None) -> int:
        """Free the remote values (``.save(remote=True)``) this lab handed out, of ``model``
        or of every model; how many were freed (see :mod:`tpmlab.remote`)."""
        release = getattr(self.backend, "release_remote", None)
        return release(model) if release is not None else 0

    def undeploy(self, name: str) -> None:
        self.models.pop(name, None)
        self.backend.undeploy(name)

    def close(self) -> None:
        self.models.clear()
        self.backend.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(address: Any = None, *, security: Security | None = None,
            gateway: str | None = None,
            token: str | None = None, **options: Any) -> Lab:
    """Connect to an engine; every engine gives the same :class:`Lab` API.

    ``connect()``: attach to ``$TPMLAB_SCHEDULER`` if set (``tpmlab lab`` sets it, and
    ``$TPMLAB_CLUSTER_CREDENTIALS`` with it, for its kernels), else start an embedded Dask
    ``LocalCluster`` of worker processes sized to this machine, speaking TLS under
    credentials made for it, so that only this process reaches it;
    ``lab.model(name, stages=N)`` splits a model over N of them. In a script, call it under
    ``if __name__ == "__main__":`` (worker processes re-run the script). Its workers are
    forked from a server process that imported torch and transformers once, started here
    so that it imports while this process does (``warm_start=False``: spawn each worker
    as a fresh interpreter).
    ``connect("tls://host:port", security=...)``: attach to a running Dask scheduler whose
    workers hold the pipeline stages; ``security``: a :class:`distributed.security.Security`
    (dask-jobqueue's and dask-gateway's clusters have it as ``cluster.security``; clusters
    started by ``tpmlab lab`` are found by their address). A ``tcp://`` address on another
    host warns once: anyone who reaches it runs code on the workers (see docs/hpc.md).
    ``connect(cluster)``: a Dask cluster object, e.g. a dask-gateway cluster
    (``dask_gateway.Gateway().new_cluster()``: workers the researcher scales from
    JupyterHub), with its own credentials; same as
    ``connect(cluster.scheduler_address, security=cluster.security)``.
    ``connect("local")``: models run whole in this process (no cluster).
    ``connect(gateway="https://...", token=...)``: a shared deployment behind the
    multi-user gateway (token: a tpmlab API key or a JupyterHub API token).
    ``connect()`` where ``$TPMLAB_GATEWAY`` is set and ``$TPMLAB_SCHEDULER`` is not (a
    JupyterHub single-user server set up by ``tpmlab hub-config``): that gateway, with the
    server's own Hub token.
    """
    if gateway is None and address is None and not os.environ.get("TPMLAB_SCHEDULER"):
        gateway = os.environ.get("TPMLAB_GATEWAY") or None
    if gateway is not None:
        from .gateway.client import GatewayBackend

        return Lab(GatewayBackend(gateway, token=token, **options))
    if address is None:  # set by `tpmlab lab` (and by admins) for kernels to share a cluster
        address = os.environ.get("TPMLAB_SCHEDULER") or None
    if address == "local":
        return Lab(LocalBackend(**options))
    if address is None and options.get("warm_start", True):
        from .cluster.warm_start import ensure_server

        ensure_server()  # the workers' imports run while this process imports the engine
    from .cluster import DaskBackend  # the sharded engine

    if address is not None:
        from .cluster.security import client_security, cluster_endpoint

        if not isinstance(address, str):  # a cluster object: its address and credentials
            address, security = cluster_endpoint(address, security)

        security = client_security(address, security)
    return Lab(DaskBackend(address, security=security, **options))
