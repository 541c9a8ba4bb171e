"""The multi-user gateway: authentication (API keys, JupyterHub tokens), tiers decided
from the validated plan, service-unit holds and charges in a SQL ledger shared by any
number of gateways, cross-user batching, Prometheus metrics. Researchers reach it with
``tpmlab.connect(gateway=URL, token=...)``.

Modules: :mod:`.core` (admission, batching, charging), :mod:`.sessions` (a
``model.session()`` as one request), :mod:`.app` (HTTP API),
:mod:`.auth` and :mod:`.throttle` (who is asking; failed attempts per address),
:mod:`.tiers`, :mod:`.sizing` (validation with the tier's limits, and whether every save
was sized), :mod:`.units` (holds and charges), :mod:`.ledger`, :mod:`.records` (what
finished requests keep), :mod:`.errors` (every error's HTTP status), :mod:`.metrics`,
:mod:`.client` (:class:`GatewayBackend`), :mod:`.server` (uvicorn in a thread),
:mod:`.cli`.
"""

from __future__ import annotations

from .client import GatewayBackend

__all__ = ["GatewayBackend"]
