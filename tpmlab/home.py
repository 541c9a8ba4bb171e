"""Where tpmlab keeps converted weights, tokenizers and digests on disk."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "TPMLAB_HOME"


def tpmlab_home() -> Path:
    """Return ``$TPMLAB_HOME`` (or ``~/.cache/tpmlab``), creating it on demand.

    Read on every call, not once at import, so tests and Dask workers can point
    it elsewhere through the environment.
    """
    root = os.environ.get(HOME_ENV) or os.path.join("~", ".cache", "tpmlab")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
