"""Errors of the models package, kept apart so every module can raise them."""

from __future__ import annotations

from tpmlab.errors import TpmlabError


class ModelNotFoundError(TpmlabError, KeyError):
    """A model name that no loader recognises.

    A ``KeyError`` (hence a ``LookupError``) so callers treating the registry as
    a mapping keep working; ``str()`` shows the message without ``KeyError``'s
    quoting.
    """

    http_status = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedArchitectureError(TpmlabError, ValueError):
    """A model whose architecture tpmlab has no adapter for, or whose adapter
    paths are missing from the model tree."""

    http_status = 400
