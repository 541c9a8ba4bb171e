"""Small file-system helpers that stay safe when several processes (Dask
workers) write the same cache at once."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place,
    so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(tmp_dir: Path, final: Path) -> None:
    """Rename a fully written ``tmp_dir`` to ``final``; if another process won
    the race, keep its copy and drop ours.

    Temporary files are created private (0600/0700); the published cache is
    made readable to others, who may share it (one home per cluster).
    """
    for path in tmp_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_dir.chmod(0o755)
    try:
        os.rename(tmp_dir, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
