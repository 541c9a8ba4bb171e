"""The manifest of a version: what it holds, and the digest that names it.

A manifest is JSON::

    {"format": "tpmlab.store/1", "hash": "sha256", "chunk_size": 4194304,
     "parent": "<digest>" | null, "message": "...", "timestamp": "2026-01-01T00:00:00Z",
     "config": {...},
     "tensors": {"<name>": <entry>, ...}}

A *dense entry* is ``{"dtype", "shape", "nbytes", "content", "chunks": [digest, ...]}``;
a *low-rank entry* has ``"delta": {"kind": "lowrank", "base": <entry>, "u": <entry>,
"v": <entry>}`` instead of ``"chunks"`` (see ``tpmlab.store.delta``). ``content`` is
the digest of the tensor's bytes (``chunking.content_digest``) whatever the entry kind.

The version digest is the SHA-256 of the canonical JSON of ``format``, ``config`` and,
per tensor, ``dtype``, ``shape`` and ``content`` only. It depends on the weights and the
config and nothing else (not the parent, message, time, nor dense-vs-delta storage):
the same weights always have the same digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .chunking import CHUNK_SIZE, HASH_NAME, hash_bytes

FORMAT = "tpmlab.store/1"


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, ASCII only, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def version_digest(config: dict[str, Any], tensors: dict[str, dict[str, Any]]) -> str:
    """The digest naming a version with these tensor entries and this config."""
    identity = {
        "format": FORMAT,
        "config": config,
        "tensors": {
            name: {"dtype": e["dtype"], "shape": e["shape"], "content": e["content"]}
            for name, e in tensors.items()
        },
    }
    return hash_bytes(canonical_json(identity))


def make_manifest(
    *, config: dict[str, Any], tensors: dict[str, dict[str, Any]], parent: str | None,
    message: str, timestamp: str,
) -> dict[str, Any]:
    """A manifest dict (see the module docstring)."""
    return {
        "format": FORMAT, "hash": HASH_NAME, "chunk_size": CHUNK_SIZE,
        "parent": parent, "message": message, "timestamp": timestamp,
        "config": config, "tensors": tensors,
    }


def parse_manifest(data: bytes, digest: str) -> dict[str, Any]:
    """Parse stored manifest bytes; ``ValueError`` if they are not a manifest of this format."""
    m = json.loads(data)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"manifest {digest} has format {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("chunk_size") != CHUNK_SIZE or m.get("hash") != HASH_NAME:
        raise ValueError(
            f"manifest {digest} uses chunk_size={m.get('chunk_size')} hash={m.get('hash')}, "
            f"this tpmlab reads chunk_size={CHUNK_SIZE} hash={HASH_NAME}"
        )
    return m


def iter_chunks(entry: dict[str, Any]) -> Iterator[str]:
    """Every chunk digest an entry needs, including those of delta bases and factors."""
    if "delta" in entry:
        d = entry["delta"]
        for part in ("base", "u", "v"):
            yield from iter_chunks(d[part])
    else:
        yield from entry["chunks"]


def manifest_chunks(m: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(tensor name, chunk digest)`` for every chunk a manifest references."""
    for name, entry in m["tensors"].items():
        for digest in iter_chunks(entry):
            yield name, digest


def stored_nbytes(entry: dict[str, Any]) -> int:
    """Bytes of chunk data an entry points at (for a delta: base + factors)."""
    if "delta" in entry:
        d = entry["delta"]
        return sum(stored_nbytes(d[p]) for p in ("base", "u", "v"))
    return int(entry["nbytes"])


@dataclass(frozen=True)
class VersionInfo:
    """One version in a history.

    Attributes:
        digest: the version digest (64 hex digits).
        parent: the parent's digest, or ``None`` for a root version.
        message: the commit message.
        timestamp: commit time, ISO-8601 UTC (``"2026-01-01T00:00:00Z"``).
        n_tensors: number of tensors.
        nbytes: total size of the tensors' values in bytes.
        n_deltas: how many tensors are stored as low-rank deltas.
    """

    digest: str
    parent: str | None
    message: str
    timestamp: str
    n_tensors: int
    nbytes: int
    n_deltas: int

    @classmethod
    def from_manifest(cls, digest: str, m: dict[str, Any]) -> VersionInfo:
        tensors = m["tensors"]
        return cls(
            digest=digest, parent=m["parent"], message=m["message"], timestamp=m["timestamp"],
            n_tensors=len(tensors), nbytes=sum(int(e["nbytes"]) for e in tensors.values()),
            n_deltas=sum("delta" in e for e in tensors.values()),
        )

    @property
    def short(self) -> str:
        """The first 12 hex digits of the digest."""
        return self.digest[:12]
