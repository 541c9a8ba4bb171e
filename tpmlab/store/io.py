"""Counters of chunk traffic, to see what an operation read or wrote."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class IOStats:
    """Chunk traffic since creation or the last ``reset()``; sizes in bytes.

    Attributes:
        chunks_read / bytes_read: chunks fetched from the object store.
        chunks_written / bytes_written: new chunks stored.
        chunks_deduplicated / bytes_deduplicated: chunks a commit found already stored.
    """

    chunks_read: int = 0
    bytes_read: int = 0
    chunks_written: int = 0
    bytes_written: int = 0
    chunks_deduplicated: int = 0
    bytes_deduplicated: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Add to counters by name, thread-safely."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def reset(self) -> None:
        """Set every counter to zero."""
        with self._lock:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, 0)

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
