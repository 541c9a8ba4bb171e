"""The manifest of a version: what it holds, and the digest that names it.

A manifest is JSON::

    {"format": "tpmlab.store/2", "hash": "sha256", "chunk_size": 4194304,
     "parent": "<digest>" | null, "message": "...", "timestamp": "2026-01-01T00:00:00Z",
     "history": "<history digest>", "parent_history": "<the parent's history digest>" | null,
     "config": {...},
     "tensors": {"<name>": <entry>, ...}}

A *dense entry* is ``{"dtype", "shape", "nbytes", "content", "chunks": [digest, ...]}``;
a *low-rank entry* has ``"delta": {"kind": "lowrank", "base": <entry>, "u": <entry>,
"v": <entry>}`` instead of ``"chunks"`` (see ``tpmlab.store.delta``). ``content`` is
the digest of the tensor's bytes (``chunking.content_digest``) whatever the entry kind.

The version digest is the SHA-256 of the canonical JSON of the identity tag
``"tpmlab.store/1"``, ``config`` and, per tensor, ``dtype``, ``shape`` and ``content``
only. It depends on the weights and the config and nothing else (not the parent,
message, time, nor dense-vs-delta storage): the same weights always have the same digest.

The *history record* of a version is its ``parent``, ``message`` and ``timestamp``. Its
digest (``history``) is the SHA-256 of the canonical JSON of those, the version digest,
and the parent's history digest (``parent_history``), so records chain as commits do in
git: editing any version's record changes its digest, which no longer matches the one
stored beside it nor the ``parent_history`` its children recorded. ``Store.verify``
checks both.

Manifests written before history records existed have format ``"tpmlab.store/1"`` and
no ``history``/``parent_history``; they load as before (their version digests do not
change), ``verify`` lists them as unsealed, and ``Store.seal_history`` (``tpmlab store
seal``) writes their records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .chunking import CHUNK_SIZE, HASH_NAME, hash_bytes

FORMAT = "tpmlab.store/2"
"""The format of manifests this tpmlab writes (with a history record)."""
LEGACY_FORMAT = "tpmlab.store/1"
"""Manifests without a history record; still read."""
IDENTITY = "tpmlab.store/1"
"""The tag hashed into every version digest. It never changes, so digests stay the same."""
HISTORY = "tpmlab.store/history/1"


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, ASCII only, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def version_digest(config: dict[str, Any], tensors: dict[str, dict[str, Any]]) -> str:
    """The digest naming a version with these tensor entries and this config."""
    identity = {
        "format": IDENTITY,
        "config": config,
        "tensors": {
            name: {"dtype": e["dtype"], "shape": e["shape"], "content": e["content"]}
            for name, e in tensors.items()
        },
    }
    return hash_bytes(canonical_json(identity))


def history_digest(version: str, parent: str | None, parent_history: str | None, message: str,
                   timestamp: str) -> str:
    """The digest of a version's history record (see the module docstring)."""
    record = {"format": HISTORY, "version": version, "parent": parent,
              "parent_history": parent_history, "message": message, "timestamp": timestamp}
    return hash_bytes(canonical_json(record))


def seal(m: dict[str, Any], version: str, parent_history: str | None) -> dict[str, Any]:
    """``m`` (a manifest of ``version``) with its history record's digest, in this format."""
    return {**m, "format": FORMAT, "parent_history": parent_history,
            "history": history_digest(version, m["parent"], parent_history, m["message"],
                                      m["timestamp"])}


def make_manifest(
    *, version: str, config: dict[str, Any], tensors: dict[str, dict[str, Any]],
    parent: str | None, parent_history: str | None, message: str, timestamp: str,
) -> dict[str, Any]:
    """A manifest dict of ``version`` (see the module docstring)."""
    m = {
        "format": FORMAT, "hash": HASH_NAME, "chunk_size": CHUNK_SIZE,
        "parent": parent, "message": message, "timestamp": timestamp,
        "config": config, "tensors": tensors,
    }
    return seal(m, version, parent_history)


def is_sealed(m: dict[str, Any]) -> bool:
    """Whether the manifest carries a history record (format 2)."""
    return m.get("format") == FORMAT


def parse_manifest(data: bytes, digest: str) -> dict[str, Any]:
    """Parse stored manifest bytes; ``ValueError`` if they are not a manifest this tpmlab reads."""
    m = json.loads(data)
    if not isinstance(m, dict) or m.get("format") not in (FORMAT, LEGACY_FORMAT):
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"manifest {digest} has format {found!r}, expected {FORMAT!r} "
                         f"(or {LEGACY_FORMAT!r})")
    if m.get("chunk_size") != CHUNK_SIZE or m.get("hash") != HASH_NAME:
        raise ValueError(
            f"manifest {digest} uses chunk_size={m.get('chunk_size')} hash={m.get('hash')}, "
            f"this tpmlab reads chunk_size={CHUNK_SIZE} hash={HASH_NAME}"
        )
    for key, kind in (("parent", (str, type(None))), ("message", str), ("timestamp", str)):
        if not isinstance(m.get(key), kind):
            raise ValueError(f"manifest {digest} has a bad {key!r}: {m.get(key)!r}")
    if is_sealed(m) and not (isinstance(m.get("history"), str)
                             and isinstance(m.get("parent_history"), (str, type(None)))):
        raise ValueError(f"manifest {digest} has format {FORMAT!r} but no history record")
    return m


def history_problem(m: dict[str, Any], version: str) -> str | None:
    """What is wrong with a sealed manifest's own history record, or ``None``."""
    actual = history_digest(version, m["parent"], m["parent_history"], m["message"],
                            m["timestamp"])
    if actual != m["history"]:
        return (f"the history record of version {version[:12]} (parent, message, timestamp) "
                f"was edited: it hashes to {actual[:12]}, not to its recorded {m['history'][:12]}")
    return None


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
        history: the digest of its history record (``None`` for a version written before
            history records existed, until ``Store.seal_history`` runs).
    """

    digest: str
    parent: str | None
    message: str
    timestamp: str
    n_tensors: int
    nbytes: int
    n_deltas: int
    history: str | None = None

    @classmethod
    def from_manifest(cls, digest: str, m: dict[str, Any]) -> VersionInfo:
        tensors = m["tensors"]
        return cls(
            digest=digest, parent=m["parent"], message=m["message"], timestamp=m["timestamp"],
            n_tensors=len(tensors), nbytes=sum(int(e["nbytes"]) for e in tensors.values()),
            n_deltas=sum("delta" in e for e in tensors.values()), history=m.get("history"),
        )

    @property
    def short(self) -> str:
        """The first 12 hex digits of the digest."""
        return self.digest[:12]
