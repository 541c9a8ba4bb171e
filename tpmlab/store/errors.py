"""Errors raised by the weight store."""

from __future__ import annotations

from ..errors import TpmlabError


class StoreError(TpmlabError):
    """Base class of every error the weight store raises."""


class RefError(StoreError, LookupError):
    """A version reference (digest, digest prefix or tag) that names no single version."""

    http_status = 404


class StoreInputError(StoreError, ValueError):
    """An argument the store cannot take (a tag or key that is not a plain name, deltas
    without a parent, a tensor with no values); the message names it and what it must be."""

    http_status = 400


class StoreIntegrityError(StoreError):
    """Stored bytes that do not hash to the digest that names them, or that are missing.

    Attributes:
        tensor: the tensor whose data is affected (``None`` for a manifest problem).
        chunk: the digest of the affected chunk, or of the manifest/tensor content.
        reason: what is wrong, e.g. ``"missing"`` or ``"hash mismatch"``.
    """

    def __init__(self, message: str, *, tensor: str | None = None, chunk: str | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.tensor = tensor
        self.chunk = chunk
        self.reason = reason


class StoreLockedError(StoreError):
    """The store's lock could not be taken in time (a gc or commits hold it elsewhere)."""

    http_status = 503  # try again later


class UnsafeRefError(RefError):
    """A stored reference (tag) that is not a plain file, e.g. a symbolic link, is refused."""

    http_status = 500  # the store holds what it must not: its administrators mend it
