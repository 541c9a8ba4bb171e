"""Content digests of weights: the model version every result records.

A version digest covers the stored tensors, tied duplicates counted once: for each name
in sorted order, the name, dtype, shape and raw bytes. Two sources with the same digest
hold bit-identical weights, whatever their names or folders.

The digest names its scheme in its prefix (``docs/versions.md``):

* ``"v2:<hex>"`` (:data:`TREE`, what new versions get): each tensor's bytes are cut into
  4 MiB pieces at fixed offsets from the tensor's start, the pieces are hashed (SHA-256)
  on as many threads as there are cores, the piece hashes make the tensor's content
  digest (the same one the weight store records for the tensor,
  :func:`tpmlab.store.chunking.content_digest`), and one SHA-256 over the sorted
  ``name, dtype, shape, content digest`` lines makes the version. The result does not
  depend on the number of threads or on how the bytes were read.
* ``"sha256:<hex>"`` (:data:`LEGACY`, versions recorded before ``v2``): one SHA-256 stream
  over every tensor's header and bytes. Chained, so one core computes it. Versions of this
  scheme are still recognised and verified with it (:func:`same_weights`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from tpmlab.errors import TpmlabError
from tpmlab.home import tpmlab_home
from tpmlab.models._fs import write_json_atomic
from tpmlab.store.chunking import CHUNK_SIZE, content_digest, hash_bytes, tensor_bytes

PREFIX = "sha256:"
#: the single-stream scheme of versions recorded before v2 (and of :func:`json_digest`)
LEGACY = "sha256"
#: the piecewise scheme every new version gets
TREE = "v2"
CURRENT = TREE
#: a version's scheme by its prefix
SCHEMES = {"sha256:": LEGACY, "v2:": TREE}
#: ``read(offset, buffer)``: a tensor's bytes at ``offset``, ``len(buffer)`` of them
Read = Callable[[int, memoryview], "bytes | memoryview"]
#: written next to the weights by tpmlab's converters: {"version": "<scheme>:..."}
META_FILE = "tpmlab.json"


class UnknownVersionSchemeError(TpmlabError, ValueError):
    """A model version whose prefix names no digest scheme this tpmlab knows."""

    http_status = 400


def scheme_of(version: str) -> str:
    """The scheme of ``version`` (:data:`LEGACY` or :data:`TREE`)."""
    for prefix, scheme in SCHEMES.items():
        if version.startswith(prefix):
            return scheme
    raise UnknownVersionSchemeError(
        f"model version {version[:24]!r} names no known digest scheme (known prefixes: "
        f"{', '.join(SCHEMES)}); it was made by a newer tpmlab: upgrade tpmlab to read it")


def default_threads() -> int:
    """The threads a digest uses: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tree_version(records: Iterable[tuple[str, str, Sequence[int], str]]) -> str:
    """``"v2:<hex>"`` from ``(name, dtype, shape, content digest)`` per tensor, in sorted name
    order (checked). ``dtype`` is torch's name without ``torch.`` (``"bfloat16"``)."""
    h = hashlib.sha256(b"tpmlab.version/2\n")
    last: str | None = None
    for name, dtype, shape, content in records:
        if last is not None and name <= last:
            raise ValueError(f"a version digest needs names in sorted order: {name!r} after {last!r}")
        last = name
        h.update(f"{name}\0{dtype}\0{list(shape)}\0{content}\n".encode())
    return "v2:" + h.hexdigest()


class PieceHasher:
    """SHA-256 of byte pieces on a pool of threads (hashlib releases the GIL while it hashes,
    so the threads run on as many cores). :meth:`content` gives one tensor's content digest
    from a function that fills a buffer with the bytes at an offset of the tensor."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or default_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tpmlab-digest") \
            if self.threads > 1 else None
        self._local = threading.local()

    def __enter__(self) -> PieceHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _buffer(self) -> bytearray:
        buf = getattr(self._local, "buffer", None)
        if buf is None:  # one piece buffer per thread, reused: memory is threads x 4 MiB
            buf = self._local.buffer = bytearray(CHUNK_SIZE)
        return buf

    def map(self, fn: Callable[[Any], str], items: list[Any]) -> list[str]:
        if self._pool is None or len(items) < 2:
            return [fn(i) for i in items]
        return list(self._pool.map(fn, items))

    def contents(self, tensors: list[tuple[int, Read]]) -> list[str]:
        """The content digest of each ``(nbytes, read)``: ``read(offset, buffer)`` returns the
        tensor's bytes ``[offset, offset + len(buffer))``, in ``buffer`` (a per-thread piece
        buffer) or in a view of its own. All pieces of all the tensors go to the pool at once."""
        pieces = [(t, start, min(CHUNK_SIZE, n - start))
                  for t, (n, _) in enumerate(tensors) for start in range(0, n, CHUNK_SIZE)]

        def piece(item: tuple[int, int, int]) -> str:
            t, start, n = item
            return hash_bytes(tensors[t][1](start, memoryview(self._buffer())[:n]))

        hashes = iter(self.map(piece, pieces))
        return [content_digest([next(hashes) for _ in range(0, n, CHUNK_SIZE)], n)
                for n, _ in tensors]


def weights_digest(named: Iterable[tuple[str, torch.Tensor]], scheme: str = CURRENT,
                   threads: int | None = None) -> str:
    """The version digest of ``(name, tensor)`` pairs, visited in sorted name order, in
    ``scheme`` (:data:`TREE` unless told; :data:`LEGACY` to verify an old version).

    ``named`` may be a lazy iterable (tensors read one at a time), but it must
    yield its names in sorted order; this is checked.
    """
    if scheme == LEGACY:
        return _legacy_digest(named)
    if scheme != TREE:
        raise UnknownVersionSchemeError(f"unknown digest scheme {scheme!r}; known: {LEGACY}, {TREE}")

    def records(hasher: PieceHasher):
        for name, tensor in named:
            data = tensor_bytes(tensor)
            dtype = str(tensor.dtype).removeprefix("torch.")

            (content,) = hasher.contents(
                [(len(data), lambda start, buf, data=data: data[start:start + len(buf)])])
            yield name, dtype, list(tensor.shape), content
            del tensor, data  # one tensor in flight

    with PieceHasher(threads) as hasher:
        return tree_version(records(hasher))


def _legacy_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
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


def cache_key(what: dict[str, Any], scheme: str) -> str:
    """The digest cache's key for the weights ``what`` identifies, in ``scheme``: legacy
    entries keep the key they were written under, so versions computed before v2 are
    found (and verified) without reading the weights again."""
    return json_digest(what if scheme == LEGACY else {**what, "scheme": scheme})


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


def same_weights(recorded: str, model: Any) -> bool:
    """Whether version ``recorded`` (any scheme) names ``model``'s weights: equal to its
    version, or, in another scheme, equal to its weights' digest in that scheme (computed
    by its source once, then cached). ``model`` is a model source or anything with a
    ``version`` and a ``source``."""
    version = getattr(model, "version", None)
    if recorded == version:
        return True
    source = model if hasattr(model, "version_in") else getattr(model, "source", None)
    if source is None or not hasattr(source, "version_in") or not recorded or not version:
        return False
    try:
        scheme = scheme_of(recorded)
        if scheme == scheme_of(version) or source.version != version:
            return False  # same scheme, other digest; or a source of other weights
        return source.version_in(scheme) == recorded
    except (UnknownVersionSchemeError, NotImplementedError):
        return False
