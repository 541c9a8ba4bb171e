"""Errors that tpmlab raises on purpose: each names the problem and, where known, the user's line.

Every deliberate error of every tpmlab package derives from :class:`TpmlabError`, and each
class states its ``http_status``: the status a gateway answers with when a request fails
with it (:mod:`tpmlab.gateway.errors` reads it there, and a client turns the answer back
into the same class).
"""

from __future__ import annotations

from typing import ClassVar


class TpmlabError(Exception):
    """Base class of every error tpmlab raises deliberately.

    ``http_status``: the HTTP status of a request that fails with this error; 500 (a fault
    on the serving side, not the caller's doing) unless the class says otherwise.
    """

    http_status: ClassVar[int] = 500


class _Located(TpmlabError):
    """An error about one plan node: the message ends with the node and the user's line."""

    def __init__(self, message: str, *, node: int | None = None, op: str | None = None,
                 line: str | None = None) -> None:
        self.message = message
        self.node, self.op, self.line = node, op, line
        where = ""
        if node is not None:
            where = f"node {node}" + (f" ({op})" if op else "")
        if line:
            where += (", " if where else "") + f"at {line}"
        super().__init__(f"{message} [{where}]" if where else message)


class PlanError(_Located):
    """A plan that cannot run: raised before anything runs where possible.

    ``node`` is the id of the plan node at fault, ``line`` the user's source line
    that created it ("file:lineno: code"), when known.
    """

    http_status = 400  # refused before running


class UnknownOpError(PlanError):
    """The plan uses an operation outside the whitelist."""


class PathError(PlanError):
    """The plan names a module path that the model does not have."""


class BackwardFlowError(PlanError):
    """A value would have to flow backward in the forward pass."""


class ShapeError(PlanError):
    """A write whose value does not fit the place it writes to, or an op on wrong shapes."""


class LimitError(PlanError):
    """The plan exceeds a size limit (saved bytes, constants, node count...)."""

    http_status = 413  # a size limit of the plan or of the user's tier


class SchemaError(PlanError):
    """The serialized plan is malformed or of an unsupported schema version."""


class ExecutionError(_Located):
    """The plan was valid but failed while running; the model is left as it was."""

    http_status = 422


class WeightsChangedError(ExecutionError):
    """A request changed a deployed weight at run time: the request failed and the weights
    were restored from their source before the next request ran."""


class IndexBoundsError(ShapeError, ExecutionError):
    """An index outside the value it indexes, found while the plan ran (an index tensor's
    values, a later generation step's shape): a fault of the plan, caught before the op ran
    (so a GPU never asserts), the model left as it was."""


class RequestTimeoutError(TpmlabError, TimeoutError):
    """A wait on the engine ran past its timeout."""

    http_status = 504


class NotSupportedError(TpmlabError):
    """A construct (often one of nnsight's) that a plan cannot express, or that tpmlab does
    not offer yet: the message names it and the form to use instead."""

    http_status = 400


class RemoteValueError(TpmlabError):
    """An operation a remote value cannot do: a reduction outside the whitelist
    (:data:`tpmlab.remote.REDUCTIONS`), a dim or an index outside the value's shape; the
    message names what was asked and what the value allows."""

    http_status = 400


class ModelUndeployedError(TpmlabError):
    """A request waited on a model that was undeployed (or its backend closed) before it
    ran: deploy the model again and resend it."""

    http_status = 503
