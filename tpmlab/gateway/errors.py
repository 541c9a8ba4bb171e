"""Errors of the gateway, and the one place that maps any tpmlab error to an HTTP answer.

Every error the gateway answers with is a class: the gateway's own below (each with its
``status``) and the engine's :mod:`tpmlab.errors` classes, whose statuses
:data:`ENGINE_STATUS` gives by base class (a new :class:`~tpmlab.errors.PlanError`
subclass is a 400 without any change here). :func:`http_status` and :func:`error_body`
turn an error into the answer ``{"error": <class name>, "message": ..., ...}``;
:func:`error_class` turns a class name back into the class, so
:class:`~tpmlab.gateway.client.GatewayBackend` raises what the engine raised.
"""

from __future__ import annotations

from typing import Any

from .. import errors as engine_errors
from ..errors import (
    ExecutionError,
    LimitError,
    PlanError,
    RequestTimeoutError,
    TpmlabError,
    WeightsChangedError,
)


class GatewayError(TpmlabError):
    """A request the gateway refused or could not serve."""

    status = 500

    def __init__(self, message: str, **extra: Any) -> None:
        self.message = message
        self.extra = extra
        super().__init__(message)


class BadRequestError(GatewayError):
    """A malformed request: its body, headers or parameters (400)."""

    status = 400


class AuthenticationError(GatewayError):
    """No credential, or one that neither the ledger nor JupyterHub knows (401)."""

    status = 401


class QuotaError(GatewayError):
    """The request's hold (its worst case in service units) exceeds the user's available
    balance (402)."""

    status = 402


class TierError(GatewayError):
    """The plan needs a higher tier than the user has (403)."""

    status = 403


class NotFoundError(GatewayError):
    """No such model, request or user, or one that belongs to someone else (404)."""

    status = 404


class ConflictError(GatewayError):
    status = 409


class ResultGoneError(GatewayError):
    """The request finished, but its result is no longer kept (410): results are kept for a
    while and within a per-user byte budget."""

    status = 410


class PayloadTooLargeError(GatewayError):
    status = 413


class UnsupportedMediaTypeError(GatewayError):
    """A plan sent with a content type other than ``application/octet-stream`` (415)."""

    status = 415


class RateLimitError(GatewayError):
    """Too many requests of this user in flight, or too many failed authentications from
    this address (429, with ``Retry-After`` when known)."""

    status = 429


class UpstreamError(GatewayError):
    """JupyterHub or the engine could not be reached (503)."""

    status = 503


class BusyError(GatewayError):
    """The gateway is validating as many plans as it allows at once (503, ``Retry-After``)."""

    status = 503


class GatewayTimeoutError(GatewayError):
    status = 504


# Statuses of the engine's errors, by base class: the most specific base listed wins.
ENGINE_STATUS: dict[type[BaseException], int] = {
    LimitError: 413,  # a size limit of the plan or of the user's tier
    PlanError: 400,  # refused before running
    WeightsChangedError: 422,  # the plan wrote a deployed weight: refused, weights restored
    ExecutionError: 422,  # valid, but failed while running
    RequestTimeoutError: 504,
}


def http_status(error: BaseException) -> int:
    """The HTTP status of ``error``: its class's ``status``, or that of its nearest base in
    :data:`ENGINE_STATUS`; 500 for anything else (a bug, never a user's doing)."""
    for cls in type(error).__mro__:
        if cls in ENGINE_STATUS:
            return ENGINE_STATUS[cls]
        status = cls.__dict__.get("status")
        if isinstance(status, int):
            return status
    return 500


def error_body(error: BaseException) -> dict[str, Any]:
    """The JSON body of the answer to ``error``."""
    body: dict[str, Any] = {"error": type(error).__name__,
                            "message": getattr(error, "message", None) or str(error)}
    if isinstance(error, (PlanError, ExecutionError)):
        body.update(node=error.node, line=error.line)
    if isinstance(error, GatewayError):
        body.update({k: v for k, v in error.extra.items() if k not in body})
    return body


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


def error_class(name: str) -> type[TpmlabError] | None:
    """The tpmlab error class called ``name`` (engine or gateway), or None."""
    classes = {c.__name__: c for c in _subclasses(TpmlabError)
               if c.__module__ in (engine_errors.__name__, __name__)}
    return classes.get(name)
