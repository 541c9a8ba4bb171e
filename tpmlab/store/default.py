"""The default store: the one under tpmlab's home folder."""

from __future__ import annotations

from ..home import tpmlab_home
from .store import Store


def default_store() -> Store:
    """The store at ``tpmlab_home()/store`` (``$TPMLAB_HOME`` or ``~/.cache/tpmlab``)."""
    return Store(tpmlab_home() / "store")
