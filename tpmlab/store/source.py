"""The store as seen from the rest of tpmlab: the default store and model sources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .store import Store

if TYPE_CHECKING:
    from .model_source import StoreSource


def _home() -> Path:
    try:
        from tpmlab.models.home import tpmlab_home
    except ImportError:  # same rule as tpmlab.models.tpmlab_home, for installs without it
        path = Path(os.environ.get("TPMLAB_HOME") or "~/.cache/tpmlab").expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tpmlab_home()


def default_store() -> Store:
    """The store at ``tpmlab_home()/store`` (``$TPMLAB_HOME`` or ``~/.cache/tpmlab``)."""
    return Store(_home() / "store")


def source_for(name: str, ref: str, store: Store | None = None) -> StoreSource:
    """A ``tpmlab.models`` model source whose weights are version ``ref`` of ``store``.

    ``ref`` is resolved once, here: the source's ``version`` is that full store digest
    even if a tag moves later. ``store`` defaults to ``default_store()``.
    """
    from .model_source import StoreSource

    return StoreSource(name, ref, store if store is not None else default_store())
