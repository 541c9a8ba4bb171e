"""Reading tensors back from chunks, checking every byte against its digest."""

from __future__ import annotations

import math
from concurrent.futures import Executor
from typing import Any

import torch

from .chunking import CHUNK_SIZE, content_digest, empty_buffer, from_bytes, hash_bytes, parse_dtype
from .delta import apply_low_rank
from .errors import StoreIntegrityError
from .io import IOStats
from .objects import ObjectStore
from .writer import hash_tensor


def check_dense_entry(label: str, entry: dict[str, Any]) -> None:
    """Check that a dense entry is self-consistent (sizes, chunk count, content digest)."""
    dtype = parse_dtype(entry["dtype"])
    nbytes = int(entry["nbytes"])
    want = math.prod(entry["shape"]) * dtype.itemsize
    n_chunks = math.ceil(nbytes / CHUNK_SIZE)
    problem = None
    if nbytes != want:
        problem = f"nbytes {nbytes} but shape {entry['shape']} of {entry['dtype']} is {want} bytes"
    elif len(entry["chunks"]) != n_chunks:
        problem = f"{len(entry['chunks'])} chunks listed for {nbytes} bytes, expected {n_chunks}"
    elif content_digest(entry["chunks"], nbytes) != entry["content"]:
        problem = "chunk list does not match the tensor's content digest"
    if problem:
        raise StoreIntegrityError(
            f"manifest entry of tensor {label!r} is inconsistent: {problem}",
            tensor=label, chunk=entry.get("content"), reason="bad entry",
        )


class Reader:
    """Reads manifest entries into tensors through ``objects``, counting into ``stats``."""

    def __init__(self, objects: ObjectStore, pool: Executor, stats: IOStats) -> None:
        self.objects = objects
        self.pool = pool
        self.stats = stats

    def read_chunk(self, label: str, index: int, digest: str, length: int) -> bytes:
        """Chunk ``index`` of tensor ``label``, verified; ``StoreIntegrityError`` if bad."""
        try:
            data = self.objects.get("chunks", digest)
        except KeyError:
            raise StoreIntegrityError(
                f"chunk {index} of tensor {label!r} ({digest}) is missing from the store",
                tensor=label, chunk=digest, reason="missing",
            ) from None
        self.stats.add(chunks_read=1, bytes_read=len(data))
        if len(data) != length or hash_bytes(data) != digest:
            raise StoreIntegrityError(
                f"chunk {index} of tensor {label!r} ({digest}) is corrupted: "
                f"{len(data)} bytes (expected {length}) hashing to {hash_bytes(data)}",
                tensor=label, chunk=digest, reason="hash mismatch",
            )
        return data

    def read(self, entries: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tensors for ``{label: entry}``; dense chunks are fetched in parallel across tensors.

        Entries with the same content (e.g. tied embeddings) are read once; each label
        still gets its own tensor (a copy), so editing one in place leaves the others.
        """
        dense = {k: e for k, e in entries.items() if "delta" not in e}
        first: dict[tuple, str] = {}  # content identity -> first label reading it
        jobs = []
        buffers = {}
        for label, entry in dense.items():
            check_dense_entry(label, entry)
            ident = (entry["content"], entry["dtype"], tuple(entry["shape"]))
            if ident in first:
                continue
            first[ident] = label
            flat, arr = empty_buffer(int(entry["nbytes"]))
            buffers[label] = flat
            for i, digest in enumerate(entry["chunks"]):
                start = i * CHUNK_SIZE
                jobs.append((label, i, digest, arr, start, min(CHUNK_SIZE, arr.size - start)))

        def fetch(job: tuple) -> None:
            label, i, digest, arr, start, length = job
            arr[start : start + length] = memoryview(self.read_chunk(label, i, digest, length))

        for _ in self.pool.map(fetch, jobs):
            pass
        out: dict[str, torch.Tensor] = {}
        for label, entry in dense.items():
            ident = (entry["content"], entry["dtype"], tuple(entry["shape"]))
            owner = first[ident]
            if owner == label:
                out[label] = from_bytes(buffers[label], parse_dtype(entry["dtype"]), entry["shape"])
            else:
                out[label] = out[owner].clone()
        for label, entry in entries.items():
            if "delta" in entry:
                out[label] = self.read_delta(label, entry)
        return {k: out[k] for k in entries}

    def read_delta(self, label: str, entry: dict[str, Any]) -> torch.Tensor:
        """Reconstruct a low-rank entry and check its bytes against its content digest."""
        d = entry["delta"]
        if d.get("kind") != "lowrank":
            raise StoreIntegrityError(
                f"tensor {label!r} has an unknown delta kind {d.get('kind')!r}",
                tensor=label, reason="bad entry",
            )
        parts = self.read({
            f"{label} (delta base)": d["base"],
            f"{label} (delta U)": d["u"],
            f"{label} (delta V)": d["v"],
        })
        base, u, v = parts.values()
        tensor = apply_low_rank(base, u, v)
        got = hash_tensor(tensor, self.pool)
        if (got["dtype"], got["shape"], got["content"]) != (entry["dtype"], entry["shape"], entry["content"]):
            raise StoreIntegrityError(
                f"tensor {label!r}: reconstructing its low-rank delta gives content {got['content']}, "
                f"the manifest records {entry['content']}",
                tensor=label, chunk=entry["content"], reason="delta mismatch",
            )
        return tensor
