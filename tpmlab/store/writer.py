"""Turning tensors into stored chunks and dense manifest entries."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any

import torch

from .chunking import CHUNK_SIZE, content_digest, dtype_name, hash_bytes, split, tensor_bytes
from .io import IOStats
from .objects import ObjectStore


def dense_entry(tensor: torch.Tensor, chunks: list[str]) -> dict[str, Any]:
    """The manifest entry of a tensor stored as ``chunks``."""
    nbytes = tensor.numel() * tensor.element_size()
    return {
        "dtype": dtype_name(tensor.dtype),
        "shape": list(tensor.shape),
        "nbytes": nbytes,
        "content": content_digest(chunks, nbytes),
        "chunks": chunks,
    }


def hash_tensor(tensor: torch.Tensor, pool: Executor) -> dict[str, Any]:
    """The dense entry ``tensor`` would have, without storing anything."""
    dtype_name(tensor.dtype)
    data = tensor_bytes(tensor)
    return dense_entry(tensor, list(pool.map(hash_bytes, split(data, CHUNK_SIZE))))


def write_chunks(
    objects: ObjectStore, tensor: torch.Tensor, entry: dict[str, Any], pool: Executor, stats: IOStats
) -> None:
    """Store the chunks of ``tensor`` (whose dense entry is ``entry``) not already stored."""
    digests = entry["chunks"]
    unique = list(dict.fromkeys(digests))
    present = dict(zip(unique, pool.map(lambda d: objects.exists("chunks", d), unique)))
    missing = {d for d, ok in present.items() if not ok}
    sizes = [min(CHUNK_SIZE, entry["nbytes"] - i * CHUNK_SIZE) for i in range(len(digests))]
    written = set()
    if missing:
        jobs = []
        for digest, chunk in zip(digests, split(tensor_bytes(tensor), CHUNK_SIZE)):
            if digest in missing and digest not in written:
                written.add(digest)
                jobs.append((digest, chunk))

        def put(item: tuple[str, memoryview]) -> None:
            objects.put("chunks", item[0], item[1])

        for _ in pool.map(put, jobs):
            pass
    n_written = sum(sizes[digests.index(d)] for d in written)
    stats.add(chunks_written=len(written), bytes_written=n_written,
              chunks_deduplicated=len(digests) - len(written),
              bytes_deduplicated=int(entry["nbytes"]) - n_written)

