"""The multi-user gateway: authentication (API keys, JupyterHub tokens), tiers decided
from the validated plan, service-unit quotas in a SQL ledger, cross-user batching,
Prometheus metrics. Researchers reach it with ``tpmlab.connect(gateway=URL, token=...)``.

Modules: :mod:`.core` (admission, batching, charging), :mod:`.app` (HTTP API),
:mod:`.auth`, :mod:`.tiers`, :mod:`.units`, :mod:`.ledger`, :mod:`.client`
(:class:`GatewayBackend`), :mod:`.server` (uvicorn in a thread), :mod:`.cli`.
"""

from __future__ import annotations

from .client import GatewayBackend

__all__ = ["GatewayBackend"]
