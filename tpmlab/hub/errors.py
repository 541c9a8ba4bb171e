"""Errors of the JupyterHub configuration."""

from __future__ import annotations

from ..errors import TpmlabError


class HubConfigError(TpmlabError, ValueError):
    """A ``tpmlab hub-config`` option that cannot be used as given."""
