"""Content digests of weights: the model version every result records.

The digest covers the stored tensors, tied duplicates counted once: for each
name in sorted order, the name, dtype, shape and raw bytes. Two sources with
the same digest hold bit-identical weights, whatever their names or folders.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from tpmlab.home import tpmlab_home
from tpmlab.models._fs import write_json_atomic

PREFIX = "sha256:"
#: written next to the weights by tpmlab's converters: {"version": "sha256:..."}
META_FILE = "tpmlab.json"


def weights_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``"sha256:<hex>"`` over ``(name, tensor)`` pairs, visited in sorted name order.

    ``named`` may be a lazy iterable (tensors read one at a time), but it must
    yield its names in sorted order; this is checked.
    """
    h = hashlib.sha256()
    last: str | None = None
    for name, tensor in named:
        if last is not None and name <= last:
            raise ValueError(f"weights_digest needs names in sorted order: {name!r} after {last!r}")
        last = name
        t = tensor.detach().to("cpu").contiguous()
        header = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0"
        h.update(header.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
        del tensor, t  # one tensor in flight: let it go before the next is made
    return PREFIX + h.hexdigest()


def json_digest(data: Any) -> str:
    """``"sha256:<hex>"`` of canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return PREFIX + hashlib.sha256(text.encode()).hexdigest()


def _cache_path(key: str) -> Path:
    return tpmlab_home() / "digests" / f"{key.removeprefix(PREFIX)}.json"


def cached_digest(key: str) -> str | None:
    """The digest stored under ``key`` (itself a digest of what identifies the
    weights), or ``None``."""
    path = _cache_path(key)
    try:
        return json.loads(path.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def store_digest(key: str, version: str, **about: Any) -> None:
    """Remember ``version`` under ``key``; ``about`` is kept for people reading the file."""
    write_json_atomic(_cache_path(key), {"version": version, **about})
