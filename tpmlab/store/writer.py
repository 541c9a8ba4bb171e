"""Turning tensors into stored chunks and dense manifest entries."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any

import torch

from .backends import Backend
from .chunking import CHUNK_SIZE, content_digest, dtype_name, hash_bytes, split, tensor_bytes
from .io import IOStats


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


def write_tensor(
    backend: Backend, tensor: torch.Tensor, pool: Executor, stats: IOStats
) -> dict[str, Any]:
    """Store ``tensor``'s chunks (skipping those already stored); return its dense entry."""
    dtype_name(tensor.dtype)  # reject unsupported dtypes before any write
    chunks = list(split(tensor_bytes(tensor), CHUNK_SIZE))
    digests = list(pool.map(hash_bytes, chunks))
    first = {d: c for d, c in reversed(list(zip(digests, chunks)))}  # a repeated chunk once

    def put(item: tuple[str, memoryview]) -> None:
        digest, chunk = item
        if backend.exists("chunks", digest):
            stats.add(chunks_deduplicated=1, bytes_deduplicated=len(chunk))
        else:
            backend.put("chunks", digest, chunk)
            stats.add(chunks_written=1, bytes_written=len(chunk))

    for _ in pool.map(put, first.items()):
        pass
    repeats = len(chunks) - len(first)
    if repeats:
        stats.add(chunks_deduplicated=repeats,
                  bytes_deduplicated=sum(len(c) for c in chunks) - sum(len(c) for c in first.values()))
    return dense_entry(tensor, digests)
