"""Errors of the gateway, and the one place that turns any tpmlab error into an HTTP answer
and an answer back into the error.

Every error the gateway answers with is a :class:`~tpmlab.errors.TpmlabError`, and its
class states its status (``http_status``: plan errors 400, size limits 413, failures while
running 422, a timeout 504, the gateway's own errors below theirs). :func:`http_status` and
:func:`error_body` turn an error into the answer ``{"error": <class name>, "message": ...,
...}``; :func:`error_from_answer` turns an answer back into an error of the class it names
(or, for an answer that names none, the gateway error class of its status), so
:class:`~tpmlab.gateway.client.GatewayBackend` raises what the server raised.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ExecutionError, PlanError, TpmlabError

#: modules that define the error classes a gateway's answer can name; imported when an
#: answer names a class not loaded yet
ERROR_MODULES = ("tpmlab.errors", "tpmlab.gateway.errors", "tpmlab.models.errors",
                 "tpmlab.store.errors", "tpmlab.cluster.errors", "tpmlab.ir.rows",
                 "tpmlab.ir.ops")


class GatewayError(TpmlabError):
    """A request the gateway refused or could not serve."""

    http_status = 500

    def __init__(self, message: str, **extra: Any) -> None:
        self.message = message
        self.extra = extra
        super().__init__(message)


class BadRequestError(GatewayError):
    """A malformed request: its body, headers or parameters (400)."""

    http_status = 400


class AuthenticationError(GatewayError):
    """No credential, or one that neither the ledger nor JupyterHub knows (401)."""

    http_status = 401


class QuotaError(GatewayError):
    """The request's hold (its worst case in service units) exceeds the user's available
    balance (402)."""

    http_status = 402


class TierError(GatewayError):
    """The plan needs a higher tier than the user has (403)."""

    http_status = 403


class NotFoundError(GatewayError):
    """No such model, request or user, or one that belongs to someone else (404)."""

    http_status = 404


class MethodNotAllowedError(GatewayError):
    """A path that exists, asked with a method it does not serve (405)."""

    http_status = 405


class ConflictError(GatewayError):
    http_status = 409


class ResultGoneError(GatewayError):
    """The request finished, but its result is no longer kept (410): results are kept for a
    while and within a per-user byte budget."""

    http_status = 410


class PayloadTooLargeError(GatewayError):
    http_status = 413


class UnsupportedMediaTypeError(GatewayError):
    """A plan sent with a content type other than ``application/octet-stream`` (415)."""

    http_status = 415


class RateLimitError(GatewayError):
    """Too many requests of this user in flight, or too many failed authentications from
    this address (429, with ``Retry-After`` when known)."""

    http_status = 429


class UpstreamError(GatewayError):
    """JupyterHub or the engine could not be reached (503)."""

    http_status = 503


class BusyError(GatewayError):
    """The gateway is validating as many plans as it allows at once (503, ``Retry-After``)."""

    http_status = 503


class GatewayTimeoutError(GatewayError):
    http_status = 504


class LedgerError(TpmlabError):
    """A ledger operation that cannot be done (unknown user, duplicate name, a balance that
    would go below zero...) (400)."""

    http_status = 400


def http_status(error: BaseException) -> int:
    """The HTTP status of ``error``: its class's ``http_status``; 500 for an error that is no
    :class:`~tpmlab.errors.TpmlabError` (a bug, never a user's doing)."""
    return error.http_status if isinstance(error, TpmlabError) else 500


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
    """``cls`` and every class below it, once each (a class with two tpmlab bases, such as
    IndexBoundsError, is reached along both)."""
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(c for c in _subclasses(sub) if c not in out)
    return out


def _public(cls: type) -> bool:
    return cls.__module__.startswith("tpmlab.") and not cls.__name__.startswith("_")


def error_classes() -> dict[str, type[TpmlabError]]:
    """Every tpmlab error class by name (those of :data:`ERROR_MODULES` and any other loaded)."""
    for name in ERROR_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a part not installed here: its errors cannot be raised here either
            pass
    return {c.__name__: c for c in _subclasses(TpmlabError) if _public(c)}


def error_class(name: str) -> type[TpmlabError] | None:
    """The tpmlab error class called ``name``, or None."""
    loaded = {c.__name__: c for c in _subclasses(TpmlabError) if _public(c)}
    return loaded[name] if name in loaded else error_classes().get(name)


def class_for_status(status: int) -> type[GatewayError]:
    """The gateway error class of ``status`` (the first declared with it), for an answer
    that names no class; :class:`GatewayError` for a status none declares."""
    return next((c for c in _subclasses(GatewayError) if c.__module__ == __name__
                 and c.http_status == status), GatewayError)


def error_from_answer(status: int, body: Any, text: str = "") -> TpmlabError:
    """The error an error answer stands for: the class its body names (rebuilt with the
    node and line of a plan error, the extra fields of a gateway error), else the gateway
    error class of ``status``. ``text``: the raw body, used when it is not JSON."""
    body = body if isinstance(body, dict) else {}
    message = str(body.get("message", text[:500]))
    cls = error_class(str(body.get("error", "")))
    if cls is not None and issubclass(cls, (PlanError, ExecutionError)):
        return cls(message, node=body.get("node"), line=body.get("line"))
    if cls is not None and not issubclass(cls, GatewayError):
        try:
            return cls(message)
        except TypeError:  # a class built from more than a message: keep its status at least
            cls = None
    if cls is None:
        cls = class_for_status(status)
    extra = {k: v for k, v in body.items() if k not in ("error", "message")}
    return cls(f"{message} (HTTP {status})", **extra)


def as_gateway_error(e: Exception) -> Exception:
    """An engine's failure as the gateway answers it: a tpmlab error as it is (it carries its
    own status), a lookup that failed as not found, anything else as the engine's failure."""
    if isinstance(e, TpmlabError):
        return e
    if isinstance(e, LookupError):
        return NotFoundError(str(e))
    return ExecutionError(f"the engine failed: {type(e).__name__}: {e}")
