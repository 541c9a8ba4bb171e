"""Errors of the gateway, each with the HTTP status it answers with.

The service turns them into ``{"error": <class name>, "message": ..., ...}`` bodies;
:class:`~tpmlab.gateway.client.GatewayBackend` turns such bodies back into the same
classes (plan errors into the :mod:`tpmlab.errors` class the engine would raise).
"""

from __future__ import annotations

from typing import Any

from ..errors import TpmlabError


class GatewayError(TpmlabError):
    """A request the gateway refused or could not serve."""

    status = 500

    def __init__(self, message: str, **extra: Any) -> None:
        self.message = message
        self.extra = extra
        super().__init__(message)


class BadRequestError(GatewayError):
    status = 400


class AuthenticationError(GatewayError):
    """No credential, or one that neither the ledger nor JupyterHub knows (401)."""

    status = 401


class TierError(GatewayError):
    """The plan needs a higher tier than the user has (403)."""

    status = 403


class QuotaError(GatewayError):
    """The request's estimated service units exceed the user's balance (402)."""

    status = 402


class NotFoundError(GatewayError):
    """No such model, request or user, or one that belongs to someone else (404)."""

    status = 404


class ConflictError(GatewayError):
    status = 409


class PayloadTooLargeError(GatewayError):
    status = 413


class RateLimitError(GatewayError):
    """Too many requests of this user in flight at once (429)."""

    status = 429


class UpstreamError(GatewayError):
    """JupyterHub or the engine could not be reached (503)."""

    status = 503


class GatewayTimeoutError(GatewayError):
    status = 504
