"""What the sidebar shows, collected from a Dask cluster and tpmlab's deployments.

Deployments are read, probed and removed through :mod:`tpmlab.cluster.deployments`
(typed records; how they are stored on the scheduler is that module's business); the
handlers and the frontend see plain JSON (documented in ``docs/rest-api.md``). Everything here is blocking (a synchronous
:class:`distributed.Client`) and is meant to run on :class:`ClusterState`'s own worker
thread, never on the Jupyter server's event loop.

Which cluster: ``address`` (a scheduler, e.g. ``"tls://10.0.0.5:8786"``; the credentials of
a cluster ``tpmlab lab`` started are found from ``$TPMLAB_CLUSTER_CREDENTIALS``), else none
until the first deploy action, which starts the embedded cluster with ``tpmlab.connect()``
(a ``LocalCluster`` of worker processes speaking TLS, dashboard on a free loopback port).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from tpmlab.tokens import gateway_token, token_sources

if TYPE_CHECKING:  # tpmlab.cluster (Dask, torch) is imported on the worker thread, when needed
    from tpmlab.cluster.deployments import DeploymentRecord, StageProbe

log = logging.getLogger(__name__)

LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "::1", ""}


@dataclass
class PendingDeploy:
    """A deploy action in progress (or failed) on the server."""

    name: str
    stages: int
    started: float = field(default_factory=time.time)
    error: str | None = None


def dashboard_link(scheduler_address: str | None, port: int | None, *, base_url: str = "/",
                   hub_prefix: str | None = None, proxy: bool = True) -> dict[str, str] | None:
    """Where the browser finds the Dask dashboard.

    ``{"url": ..., "direct": ...}``: ``direct`` is ``http://host:port/status``; ``url`` is the
    link to open. A dashboard on this machine (it listens on 127.0.0.1 only) is reached
    through jupyter-server-proxy at ``<prefix>proxy/<port>/status``, behind Jupyter's own
    login, as dask-labextension does; ``<prefix>`` is ``hub_prefix``
    (``JUPYTERHUB_SERVICE_PREFIX``) or the server's ``base_url``. ``proxy=False`` (the proxy
    is not enabled in this server) and a dashboard on another host: ``url`` is ``direct``.
    """
    if not port:
        return None
    parsed = urlparse(scheduler_address or "")
    # An in-process scheduler (inproc://) serves its dashboard on this machine.
    host = "127.0.0.1" if parsed.scheme in ("", "inproc") else (parsed.hostname or "127.0.0.1")
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    direct = f"http://{shown}:{port}/status"
    local = host in LOCAL_HOSTS or host in _own_names()
    if proxy and local:
        prefix = hub_prefix or base_url or "/"
        prefix = prefix if prefix.endswith("/") else prefix + "/"
        return {"url": f"{prefix}proxy/{port}/status", "direct": direct}
    return {"url": direct, "direct": direct}


def _own_names() -> set[str]:
    names = {socket.gethostname()}
    try:
        names.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return names


def worker_view(address: str, w: dict[str, Any]) -> dict[str, Any]:
    """One worker, from the scheduler's ``scheduler_info()["workers"][address]``."""
    metrics = w.get("metrics") or {}
    gpu_metrics = metrics.get("gpu") or {}
    gpu_info = w.get("gpu") or {}
    gpu = None
    if gpu_metrics or gpu_info:
        gpu = {"name": gpu_info.get("name"),
               "memory_used": gpu_metrics.get("memory-used"),
               "memory_total": gpu_info.get("memory-total"),
               "utilization": gpu_metrics.get("utilization")}
    return {
        "address": address,
        "name": str(w.get("name", address)),
        "host": w.get("host"),
        "nthreads": w.get("nthreads"),
        "memory": metrics.get("memory"),
        "memory_limit": w.get("memory_limit"),
        "cpu": metrics.get("cpu"),
        "executing": metrics.get("task_counts", {}).get("executing", metrics.get("executing")),
        "resources": w.get("resources") or {},
        "gpu": gpu,
        "status": w.get("status"),
    }


def model_view(record: DeploymentRecord, live: set[str],
               probes: list[StageProbe] | None = None) -> dict[str, Any]:
    """One deployment, from the record :mod:`tpmlab.cluster.deployments` publishes.

    ``live``: the workers the scheduler knows now (a stage on any other worker is lost).
    ``probes``: per stage, what its actor answered (:func:`tpmlab.cluster.deployments.probe`):
    a ``"failed"`` probe makes the stage "unresponsive"; a ``"slow"`` one is not a health
    problem (a busy or first-contacted stage: health is judged by its worker);
    ``probes=None``: the stages were not asked, health is judged by their workers.
    """
    info = record.info
    stage_bytes = record.stage_bytes
    stages = []
    for k, (place, span) in enumerate(zip(record.placements, record.spans)):
        probe = probes[k] if probes is not None and k < len(probes) else None
        answered = probe is not None and probe.status == "answered"
        if place.worker not in live:
            stage_health = "lost"
        elif probe is not None and probe.status == "failed":
            stage_health = "unresponsive"  # its worker is up but the stage's actor failed
        else:
            stage_health = "ok"
        stages.append({
            "index": k,
            "worker": place.worker,
            "device": place.device,
            "layers": [span.first, span.last],
            "bytes": stage_bytes[k] if k < len(stage_bytes) else None,
            "health": stage_health,
            "requests": probe.requests if answered else None,
            "answered": answered,
            "rss": probe.rss if answered else None,
            "gpu_allocated": probe.cuda_allocated if answered else None,
            # peaks since the stage was loaded (its load included)
            "peak_rss": probe.peak_rss if answered else None,
            "gpu_peak": probe.cuda_peak if answered else None,
        })
    healths = {s["health"] for s in stages}
    health = "ok" if healths <= {"ok"} else ("lost" if "lost" in healths else "degraded")
    return {
        "name": info.name,
        "version": info.version,
        "family": info.family,
        "dtype": info.dtype,
        "n_layers": _n_layers([[s.first, s.last] for s in record.spans]),
        "stages": stages,
        "health": health,
        "state": "deployed",
        "error": None,
    }


def _n_layers(layers: list[list[int | None]]) -> int | None:
    lasts = [last for _, last in layers if last is not None]
    return max(lasts) + 1 if lasts else None


class ClusterState:
    """Collects the sidebar's status; owns the server's Dask client (and, after an embedded
    deploy, the embedded cluster). All public methods block: call them from a thread."""

    def __init__(self, address: str | None = None, *, base_url: str = "/",
                 hub_prefix: str | None = None, connect_timeout: float = 10.0,
                 embedded_options: dict[str, Any] | None = None, proxy: bool = True,
                 gateway: GatewayUsage | None = None) -> None:
        self.address = address or None
        self.base_url = base_url
        self.hub_prefix = hub_prefix
        self.proxy = proxy  # jupyter-server-proxy serves <base_url>proxy/<port>/ here
        self.connect_timeout = connect_timeout
        self.embedded_options = dict(embedded_options or {})
        self.client: Any = None
        self.lab: Any = None  # a tpmlab Lab, created on the first deploy action
        self.pending: dict[str, PendingDeploy] = {}
        self._lock = threading.RLock()
        self.gateway = gateway  # where the user's usage comes from (None: no gateway, no usage)

    # -- connection --------------------------------------------------------------------------------
    def _client(self) -> Any:
        if self.client is not None and self.client.status == "running":
            return self.client
        if self.lab is not None and hasattr(self.lab.backend, "client"):
            self.client = self.lab.backend.client
            return self.client
        if not self.address:
            return None
        from distributed import Client

        from tpmlab.cluster.security import client_security

        # a cluster `tpmlab lab` started: its credentials, named in $TPMLAB_CLUSTER_CREDENTIALS
        self.client = Client(self.address, timeout=self.connect_timeout, set_as_default=False,
                             security=client_security(self.address))
        return self.client

    def _backend(self) -> Any:
        """The tpmlab backend that deploys from the server (attaching or embedded)."""
        if self.lab is None:
            import tpmlab

            if self.address:  # share the status client: one connection per server
                self.lab = tpmlab.connect(self.address, client=self._client())
            else:
                # the embedded cluster itself: not connect()'s default, which is the
                # deployment's gateway where $TPMLAB_GATEWAY is set (a Hub's servers)
                from tpmlab.cluster import DaskBackend

                opts = {"dashboard_address": "127.0.0.1:0", **self.embedded_options}
                self.lab = tpmlab.Lab(DaskBackend(**opts))
            self.client = getattr(self.lab.backend, "client", None)
        return self.lab.backend

    # -- status ------------------------------------------------------------------------------------
    def status(self, user: str | None = None) -> dict[str, Any]:
        """Everything the sidebar shows (see docs/rest-api.md, ``GET /tpmlab/api/status``)."""
        with self._lock:
            out: dict[str, Any] = {"time": time.time(), "cluster": None, "models": [],
                                   "requests": None, "usage": None, "errors": []}
            try:
                client = self._client()
            except Exception as e:
                out["errors"].append(f"cannot reach the scheduler {self.address}: "
                                     f"{type(e).__name__}: {e}")
                client = None
            if client is None:
                out["cluster"] = {"connected": False, "address": self.address,
                                  "embedded": self.address is None, "workers": [],
                                  "dashboard": None}
            else:
                try:
                    out["cluster"] = self._cluster(client)
                    out["models"] = self._models(client, set(out["cluster"]["addresses"]))
                    out["requests"] = _requests(out["models"])
                except Exception as e:
                    log.debug("status failed", exc_info=True)
                    out["errors"].append(f"{type(e).__name__}: {e}")
                    out["cluster"] = {"connected": False, "address": self.address,
                                      "embedded": self.address is None, "workers": [],
                                      "dashboard": None}
            out["models"] += [self._pending_view(p) for p in self.pending.values()
                              if p.name not in {m["name"] for m in out["models"]}]
            if self.gateway is not None:  # the shared deployment behind the gateway
                out["usage"] = self.gateway()
                served, error = self.gateway.models()
                names = {m["name"] for m in out["models"]}
                out["models"] += [m for m in served if m["name"] not in names]
                if error:
                    out["errors"].append(error)
            return out

    def _cluster(self, client: Any) -> dict[str, Any]:
        info = client.scheduler_info(n_workers=-1)
        workers = info.get("workers", {})
        port = (info.get("services") or {}).get("dashboard")
        address = info.get("address") or getattr(client.scheduler, "address", None)
        return {
            "connected": True,
            "address": address,
            "embedded": self.address is None,
            "workers": [worker_view(a, w) for a, w in sorted(workers.items())],
            "addresses": sorted(workers),
            "total_memory": sum(w.get("memory_limit") or 0 for w in workers.values()),
            "dashboard": dashboard_link(address, port, base_url=self.base_url,
                                        hub_prefix=self.hub_prefix, proxy=self.proxy),
        }

    def _models(self, client: Any, live: set[str]) -> list[dict[str, Any]]:
        from tpmlab.cluster import deployments

        return [model_view(record, live, deployments.probe(client, record))
                for record in deployments.list_deployments(client)]

    @staticmethod
    def _pending_view(p: PendingDeploy) -> dict[str, Any]:
        return {"name": p.name, "version": None, "family": None, "dtype": None,
                "n_layers": None, "stages": [], "health": "failed" if p.error else "deploying",
                "state": "failed" if p.error else "deploying", "error": p.error,
                "requested_stages": p.stages}

    # -- actions -----------------------------------------------------------------------------------
    def available(self) -> list[str]:
        try:
            from tpmlab.models import available_models

            return list(available_models())
        except Exception:
            return []

    def begin_deploy(self, name: str, stages: int) -> PendingDeploy:
        with self._lock:
            p = self.pending[name] = PendingDeploy(name, stages)
            return p

    def deploy(self, name: str, stages: int) -> None:
        """Deploy ``name`` as ``stages`` pipeline stages (blocks until loaded); on failure the
        error stays visible in the status until the next deploy or undeploy of ``name``."""
        p = self.pending.get(name) or self.begin_deploy(name, stages)
        try:
            backend = self._backend()
            backend.deploy(name, stages=stages)
            with self._lock:
                self.pending.pop(name, None)
        except Exception as e:
            log.warning("deploying %s failed:\n%s", name, traceback.format_exc())
            p.error = f"{type(e).__name__}: {e}"

    def undeploy(self, name: str) -> list[str]:
        """Remove ``name`` from the cluster (every version published under it). Clients that
        still hold its stages keep them until they let go. Returns the removed keys."""
        with self._lock:
            removed = []
            if self.pending.pop(name, None) is not None:
                removed.append(name)
            client = self._client()
            if client is not None:
                from tpmlab.cluster import deployments

                removed += deployments.remove(client, name)
            if self.lab is not None:  # and the server's own hold, if it deployed them
                self.lab.models.pop(name, None)
                try:
                    self.lab.backend.undeploy(name)
                except Exception:
                    log.debug("backend undeploy", exc_info=True)
            return removed

    def close(self) -> None:
        with self._lock:
            if self.lab is not None:
                try:
                    self.lab.close()
                except Exception:
                    log.debug("closing the lab", exc_info=True)
                self.lab = None
            if self.client is not None:
                try:
                    self.client.close()
                except Exception:
                    pass
                self.client = None


def _requests(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests in flight per model, as the stages report them (queued ones are known only to
    a gateway)."""
    running = []
    for m in models:
        counts = [s["requests"] for s in m["stages"] if s["requests"] is not None]
        if counts:
            running.append({"model": m["name"], "running": max(counts),
                            "per_stage": [s["requests"] for s in m["stages"]]})
    return {"running": running, "queued": None}


GATEWAY_ENV = "TPMLAB_GATEWAY"
"""The URL of the deployment's gateway, in the Jupyter server's environment."""
USAGE_UNIT = "SU"  # the gateway's service units (tpmlab.gateway.units)


class GatewayUsage:
    """The user's service units as the deployment's gateway reports them (``GET /v1/me``).

    Blocking (``urllib``: the server extension needs no HTTP client of the gateway's), so it
    runs on :class:`ClusterState`'s thread like everything else here. The answer is the
    sidebar's ``usage`` (docs/rest-api.md): ``{"used", "quota", "unit", "balance", "tier",
    "user"}``, ``used``/``quota``/``balance`` in service units (``quota`` is every unit
    granted so far), or ``{"error": ...}`` naming what went wrong.
    """

    def __init__(self, url: str, token: str | None, *, timeout: float = 3.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_env(cls, environ: Any = None) -> GatewayUsage | None:
        """The gateway named by ``$TPMLAB_GATEWAY``, or ``None`` when it is not set; the
        user's token as :func:`tpmlab.tokens.gateway_token` finds it."""
        env = os.environ if environ is None else environ
        url = (env.get(GATEWAY_ENV) or "").strip()
        if not url:
            return None
        return cls(url, gateway_token(env))

    def __repr__(self) -> str:
        return f"GatewayUsage({self.url!r})"

    def _get(self, path: str) -> Any:
        """``GET {url}{path}`` with the user's token: the JSON answer, or
        ``{"error": ...}`` naming what went wrong."""
        import json
        import urllib.error
        import urllib.request

        if not self.token:
            return {"error": f"no token for the gateway {self.url}: set one of "
                             f"{token_sources()}"}
        request = urllib.request.Request(
            f"{self.url}{path}", headers={"Authorization": f"Bearer {self.token}",
                                          "Accept": "application/json",
                                          "User-Agent": "tpmlab-server"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return {"error": f"the gateway {self.url} answered {e.code}: {_gateway_message(e)}"}
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            return {"error": f"cannot reach the gateway {self.url}: {reason}"}
        except ValueError as e:
            return {"error": f"the gateway {self.url} sent something that is not JSON: {e}"}

    def __call__(self) -> dict[str, Any]:
        me = self._get("/v1/me")
        if "error" in me:
            return me
        try:
            return {"used": float(me["used"]), "quota": float(me["allocated"]),
                    "balance": float(me["balance"]), "unit": USAGE_UNIT, "tier": me.get("tier"),
                    "user": me.get("name")}
        except (KeyError, TypeError, ValueError):
            return {"error": f"the gateway {self.url} answered without used/allocated/balance"}

    def models(self) -> tuple[list[dict[str, Any]], str | None]:
        """The models the gateway serves, as the sidebar shows deployments (no stages of
        theirs are visible from here), and the error that kept them from view, if any."""
        entries = self._get("/v1/models")
        if isinstance(entries, dict):
            return [], entries.get("error", f"the gateway {self.url} sent no model list")
        views = []
        for e in entries:
            if isinstance(e, dict) and isinstance(e.get("name"), str):
                views.append({"name": e["name"], "version": e.get("version"),
                              "family": e.get("family"), "dtype": e.get("dtype"),
                              "n_layers": None, "stages": [], "health": "ok",
                              "state": "deployed", "error": None, "gateway": self.url})
        return views, None


def _gateway_message(e: Any) -> str:
    """The ``message`` of a gateway error body (``{"error", "message"}``), else its reason."""
    import json

    try:
        return str(json.loads(e.read())["message"])
    except Exception:
        return str(e.reason)
